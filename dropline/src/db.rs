//! The MySQL side: the pool and the schema's migrations, kept in this crate
//! because the ingress (events, lookups) and the settler (orders) share it.

use std::time::Duration;

use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::ConnectOptions;
use std::str::FromStr;

use crate::config::MysqlArgs;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Connects a pool; `create_database` also creates the database first,
/// which the local stack and tests want and production does not need.
pub async fn connect(args: &MysqlArgs) -> Result<MySqlPool, sqlx::Error> {
    let options = MySqlConnectOptions::from_str(&args.url)?
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_millis(500));
    MySqlPoolOptions::new()
        .max_connections(args.pool_size)
        .acquire_timeout(Duration::from_millis(args.acquire_timeout_ms))
        .connect_with(options)
        .await
}

/// Creates the database named in the URL if it does not exist yet.
pub async fn create_database(url: &str) -> Result<(), sqlx::Error> {
    use sqlx::migrate::MigrateDatabase;
    if !sqlx::MySql::database_exists(url).await? {
        sqlx::MySql::create_database(url).await?;
    }
    Ok(())
}

/// Brings the schema up to date. Every stage calls this at start, so on a
/// fresh database several run it at once; they take turns under a named
/// lock. (sqlx takes one too, with `GET_LOCK(name, -1)`, but MariaDB reads a
/// negative timeout as "do not wait" and answers NULL without locking, so
/// two stages would apply the same migration together and leave it half
/// done.) The migrations run on the connection that holds the lock.
pub async fn migrate(pool: &MySqlPool) -> Result<(), sqlx::migrate::MigrateError> {
    const WAIT_SECS: u32 = 120;
    let mut conn = pool.acquire().await?;
    let (locked,): (Option<i64>,) =
        sqlx::query_as("SELECT GET_LOCK(CONCAT('dropline-migrate:', COALESCE(DATABASE(), '')), ?)")
            .bind(WAIT_SECS)
            .fetch_one(&mut *conn)
            .await?;
    if locked != Some(1) {
        return Err(sqlx::migrate::MigrateError::Execute(sqlx::Error::Protocol(format!(
            "another process held the migration lock for {WAIT_SECS}s"
        ))));
    }
    let migrated = MIGRATOR.run_direct(&mut *conn).await;
    sqlx::query("SELECT RELEASE_LOCK(CONCAT('dropline-migrate:', COALESCE(DATABASE(), '')))")
        .execute(&mut *conn)
        .await?;
    migrated
}

/// Whether `e` says the server could not be reached rather than that the
/// query was wrong: the connection failed or was cut, no connection came
/// free in time, or the server reported a connection exception (SQLSTATE
/// class 08, as when it shuts down). Worth retrying while MySQL restarts.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => true,
        sqlx::Error::Database(e) => e.code().is_some_and(|c| c.starts_with("08")),
        _ => false,
    }
}

/// Unix milliseconds as a UTC timestamp (the schema's DATETIME(3)).
pub fn from_ms(ms: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

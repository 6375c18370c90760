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
        .acquire_timeout(Duration::from_secs(5))
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

/// Brings the schema up to date. Stages that start together on a fresh
/// database can race to record the same migration (every statement in it is
/// idempotent, only the bookkeeping row collides), so a failure is retried:
/// the retry finds the migration recorded and has nothing left to do.
pub async fn migrate(pool: &MySqlPool) -> Result<(), sqlx::migrate::MigrateError> {
    let mut attempt = 0;
    loop {
        match MIGRATOR.run(pool).await {
            Ok(()) => return Ok(()),
            Err(e) if attempt < 3 => {
                attempt += 1;
                tracing::warn!(error = %e, attempt, "migration raced another start; retrying");
                tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
            }
            Err(e) => return Err(e),
        }
    }
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

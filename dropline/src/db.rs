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
    let (pool, options) = pool_options(args)?;
    pool.connect_with(options).await
}

/// The same pool, connecting on first use: building it reaches no server
/// (for a router driven in tests with MySQL down).
pub fn connect_lazy(args: &MysqlArgs) -> Result<MySqlPool, sqlx::Error> {
    let (pool, options) = pool_options(args)?;
    Ok(pool.connect_lazy_with(options))
}

fn pool_options(args: &MysqlArgs) -> Result<(MySqlPoolOptions, MySqlConnectOptions), sqlx::Error> {
    let options = MySqlConnectOptions::from_str(&args.url)?
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_millis(500));
    let pool = MySqlPoolOptions::new()
        .max_connections(args.pool_size)
        .acquire_timeout(Duration::from_millis(args.acquire_timeout_ms));
    Ok((pool, options))
}

/// Creates the database named in the URL if it does not exist yet.
pub async fn create_database(url: &str) -> Result<(), sqlx::Error> {
    use sqlx::migrate::MigrateDatabase;
    if !sqlx::MySql::database_exists(url).await? {
        sqlx::MySql::create_database(url).await?;
    }
    Ok(())
}

/// [`connect`], then [`migrate`], waiting out a server that cannot be
/// reached yet (starting, restarting, at its connection limit) with
/// backoff, while the stage stays not ready: a stage started before its
/// database must not exit for it. Anything else (a URL that does not
/// parse, a schema the migrations refuse) fails at once. `Ok(None)`:
/// shutdown came first.
pub async fn connect_and_migrate(
    args: &MysqlArgs,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<Option<MySqlPool>, sqlx::migrate::MigrateError> {
    let mut delay = Duration::from_millis(200);
    loop {
        let attempt = async {
            let pool = connect(args).await?;
            migrate(&pool).await?;
            Ok::<_, sqlx::migrate::MigrateError>(pool)
        };
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            attempt = attempt => attempt,
        };
        match attempt {
            Ok(pool) => return Ok(Some(pool)),
            Err(sqlx::migrate::MigrateError::Execute(e)) if unreachable(&e) => {
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "mysql cannot be reached yet");
            }
            Err(e) => return Err(e),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// The server is not there, or not taking connections (SQLSTATE class 08:
/// connection exceptions, "too many connections" among them).
fn unreachable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(e) => e.code().is_some_and(|state| state.starts_with("08")),
        _ => false,
    }
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use tokio_util::sync::CancellationToken;

    use super::*;

    /// Nothing listens on port 1: the stage waits, and only shutdown ends
    /// the wait, with no error to exit on.
    #[tokio::test]
    async fn a_server_not_reachable_yet_is_waited_for_until_shutdown() {
        let args = MysqlArgs::new("mysql://root@127.0.0.1:1/dropline", 1);
        let shutdown = CancellationToken::new();
        let waiting = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { connect_and_migrate(&args, &shutdown).await }
        });
        let mut waiting = std::pin::pin!(waiting);
        let still = tokio::time::timeout(Duration::from_millis(1500), &mut waiting).await;
        assert!(still.is_err(), "it gave up before shutdown: {still:?}");
        let stopped = Instant::now();
        shutdown.cancel();
        let waited = waiting.await.unwrap();
        assert!(matches!(waited, Ok(None)), "{waited:?}");
        assert!(stopped.elapsed() < Duration::from_secs(1), "shutdown ended the wait at once");
    }

    #[tokio::test]
    async fn a_url_that_does_not_parse_fails_at_once() {
        let args = MysqlArgs::new("mysql://root@127.0.0.1:1/dropline?ssl-mode=sometimes", 1);
        let failed = connect_and_migrate(&args, &CancellationToken::new()).await;
        assert!(failed.is_err(), "{failed:?}");
    }
}

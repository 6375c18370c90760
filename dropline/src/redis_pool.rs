//! The pool of Redis connections every stage uses: deadpool, managing
//! redis-rs multiplexed connections, with every wait bounded
//! ([`crate::config::RedisArgs::pool`]).
//!
//! deadpool-redis's own manager checks a connection (UNWATCH, PING) each
//! time it is taken from the pool: one more round trip for every Redis call
//! Dropline makes. The bench counted it: of the three commands a refusal
//! after a sell-out cost, two were that check. This manager checks a
//! connection when it was last checked more than [`CHECK_EVERY`] ago, or
//! when a call on it failed since, and trusts it otherwise: a connection
//! that broke fails one call (whose caller answers 503, or retries), and the
//! next checkout checks it and replaces it. The check also drops a WATCH
//! that a failed transaction left behind.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub use deadpool::managed::TimeoutType;
use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};
pub use redis;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client, RedisError};

/// How long a connection is trusted after its last check.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

pub type Pool = managed::Pool<Manager, Connection>;
pub type PoolError = managed::PoolError<RedisError>;

#[derive(Debug, thiserror::Error)]
pub enum CreatePoolError {
    #[error("the Redis URL is not valid: {0}")]
    Url(#[source] RedisError),
    #[error("building the Redis pool: {0}")]
    Build(#[from] managed::BuildError),
}

/// A multiplexed connection, when it was last known to work, and whether a
/// call on it failed since.
pub struct Checked {
    conn: MultiplexedConnection,
    checked_at: Instant,
    failed: bool,
}

/// Opens connections with the deployment's timeouts, and checks them
/// before reuse at most once per [`CHECK_EVERY`].
pub struct Manager {
    client: Client,
    config: AsyncConnectionConfig,
    checks: AtomicU64,
}

impl Manager {
    pub fn new(url: &str, config: AsyncConnectionConfig) -> Result<Self, CreatePoolError> {
        Ok(Manager { client: Client::open(url).map_err(CreatePoolError::Url)?, config, checks: AtomicU64::new(0) })
    }
}

impl managed::Manager for Manager {
    type Type = Checked;
    type Error = RedisError;

    async fn create(&self) -> Result<Checked, RedisError> {
        let conn = self.client.get_multiplexed_async_connection_with_config(&self.config).await?;
        Ok(Checked { conn, checked_at: Instant::now(), failed: false })
    }

    async fn recycle(&self, c: &mut Checked, _: &Metrics) -> RecycleResult<RedisError> {
        if !c.failed && c.checked_at.elapsed() < CHECK_EVERY {
            return Ok(());
        }
        // A numbered PING, so an answer left over from an abandoned call
        // cannot pass for this one; UNWATCH in the same round trip drops
        // any WATCH a failed transaction left on the connection.
        let n = self.checks.fetch_add(1, Ordering::Relaxed).to_string();
        let (echo,): (String,) =
            redis::pipe().cmd("UNWATCH").ignore().cmd("PING").arg(&n).query_async(&mut c.conn).await?;
        if echo != n {
            return Err(RecycleError::message("the connection answered another PING"));
        }
        (c.checked_at, c.failed) = (Instant::now(), false);
        Ok(())
    }
}

/// A connection taken from the [`Pool`]; back in the pool when dropped.
pub struct Connection {
    object: managed::Object<Manager>,
}

impl From<managed::Object<Manager>> for Connection {
    fn from(object: managed::Object<Manager>) -> Self {
        Connection { object }
    }
}

impl Deref for Connection {
    type Target = MultiplexedConnection;

    fn deref(&self) -> &MultiplexedConnection {
        &self.object.conn
    }
}

impl DerefMut for Connection {
    fn deref_mut(&mut self) -> &mut MultiplexedConnection {
        &mut self.object.conn
    }
}

/// Every call goes through here: one that fails marks its connection for
/// a check at its next checkout.
impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        Box::pin(async move {
            let answer = self.object.conn.req_packed_command(cmd).await;
            self.object.failed |= answer.is_err();
            answer
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        Box::pin(async move {
            let answer = self.object.conn.req_packed_commands(cmd, offset, count).await;
            self.object.failed |= answer.is_err();
            answer
        })
    }

    fn get_db(&self) -> i64 {
        self.object.conn.get_db()
    }
}

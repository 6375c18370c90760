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
//!
//! The same pool serves one Redis or a Redis Cluster
//! ([`crate::config::RedisArgs::cluster`]). A cluster connection holds a
//! multiplexed connection to every node, routes each command by its keys'
//! hash slot, follows MOVED and ASK redirections and learns the new
//! topology after a failover. Every script and transaction Dropline runs
//! touches one event's keys, which share the hash tag `{<event>}`
//! (`stock::keys`), or one buyer's, so each goes to one slot; a command
//! whose keys span slots fails with CROSSSLOT, which the cluster tests
//! would catch.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub use deadpool::managed::TimeoutType;
use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};
pub use redis;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{AsyncConnectionConfig, Client, RedisError, RedisResult};

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

/// A connection to one Redis, or to every node of a Redis Cluster.
#[derive(Clone)]
pub enum Link {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Link::Single(c) => c.req_packed_command(cmd),
            Link::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Link::Single(c) => c.req_packed_commands(cmd, offset, count),
            Link::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Link::Single(c) => c.get_db(),
            Link::Cluster(c) => c.get_db(),
        }
    }
}

impl Link {
    /// Every key matching `pattern`: SCAN of one Redis, or of every primary
    /// of a cluster (SCAN itself reads one node's keys only).
    pub async fn keys_matching(&mut self, pattern: &str) -> RedisResult<Vec<String>> {
        let routes = match self {
            Link::Single(_) => vec![None],
            Link::Cluster(_) => self
                .primaries()
                .await?
                .into_iter()
                .map(|(host, port)| Some(RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port })))
                .collect(),
        };
        let mut keys = Vec::new();
        for route in routes {
            let mut cursor = 0u64;
            loop {
                let mut scan = redis::cmd("SCAN");
                scan.arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(1000);
                let answer = match (&mut *self, &route) {
                    (Link::Cluster(c), Some(route)) => c.route_command(scan, route.clone()).await?,
                    (link, _) => scan.query_async(link).await?,
                };
                let (next, batch): (u64, Vec<String>) = redis::from_redis_value(answer)?;
                keys.extend(batch);
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(keys)
    }
}

impl Link {
    /// The host and port of every primary serving slots of a cluster (as
    /// CLUSTER NODES names them); empty for one Redis.
    pub async fn primaries(&mut self) -> RedisResult<Vec<(String, u16)>> {
        let Link::Cluster(c) = self else { return Ok(Vec::new()) };
        let random = RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random);
        let nodes: String =
            redis::from_redis_value(c.route_command(redis::cmd("CLUSTER").arg("NODES").clone(), random).await?)?;
        Ok(primaries(&nodes))
    }
}

/// The primaries that serve slots, from CLUSTER NODES: `host:port` of each
/// line flagged master and not failed.
fn primaries(nodes: &str) -> Vec<(String, u16)> {
    nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags = fields.get(2)?;
            let serves = fields.len() > 8;
            if !flags.split(',').any(|f| f == "master") || flags.contains("fail") || !serves {
                return None;
            }
            let addr = fields.get(1)?.split('@').next()?;
            let (host, port) = addr.rsplit_once(':')?;
            Some((host.to_owned(), port.parse().ok()?))
        })
        .collect()
}

/// A connection, when it was last known to work, and whether a call on it
/// failed since.
pub struct Checked {
    conn: Link,
    checked_at: Instant,
    failed: bool,
}

/// Where new connections go.
enum Target {
    Single(Client, AsyncConnectionConfig),
    Cluster(ClusterClient),
}

/// Opens connections with the deployment's timeouts, and checks them
/// before reuse at most once per [`CHECK_EVERY`].
pub struct Manager {
    target: Target,
    checks: AtomicU64,
}

impl Manager {
    pub fn new(url: &str, config: AsyncConnectionConfig) -> Result<Self, CreatePoolError> {
        let client = Client::open(url).map_err(CreatePoolError::Url)?;
        Ok(Manager { target: Target::Single(client, config), checks: AtomicU64::new(0) })
    }

    /// A manager of cluster connections, which find the cluster from any of
    /// `seeds`, with these timeouts for each node's connection and each
    /// command.
    pub fn cluster(seeds: &[&str], connect: Duration, response: Duration) -> Result<Self, CreatePoolError> {
        let client = ClusterClient::builder(seeds.iter().copied())
            .connection_timeout(connect)
            .response_timeout(response)
            .build()
            .map_err(CreatePoolError::Url)?;
        Ok(Manager { target: Target::Cluster(client), checks: AtomicU64::new(0) })
    }
}

impl managed::Manager for Manager {
    type Type = Checked;
    type Error = RedisError;

    async fn create(&self) -> Result<Checked, RedisError> {
        let conn = match &self.target {
            Target::Single(client, config) => {
                Link::Single(client.get_multiplexed_async_connection_with_config(config).await?)
            }
            Target::Cluster(client) => Link::Cluster(client.get_async_connection().await?),
        };
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
        let echo: String = match &mut c.conn {
            Link::Single(conn) => {
                let (echo,): (String,) =
                    redis::pipe().cmd("UNWATCH").ignore().cmd("PING").arg(&n).query_async(conn).await?;
                echo
            }
            // A cluster connection watches its nodes itself: it reconnects
            // one that broke and learns the topology again after a
            // failover. A check here would go to every node (PING is routed
            // to all of them) and discard a good connection whenever one
            // node is down. Dropline sends no WATCH.
            Link::Cluster(_) => return Ok(()),
        };
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
    type Target = Link;

    fn deref(&self) -> &Link {
        &self.object.conn
    }
}

impl DerefMut for Connection {
    fn deref_mut(&mut self) -> &mut Link {
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

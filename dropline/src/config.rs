//! Settings every stage shares. Each is a flag and a `DROPLINE_*` variable,
//! with a default that works on the local stack; stages flatten these groups
//! into their own clap config.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use serde::{Serialize, Serializer};

#[derive(Debug, Clone, Args, Serialize)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers.
    #[arg(long = "kafka-brokers", env = "DROPLINE_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Prefix of every topic name, `<prefix>.intents` and so on.
    #[arg(long, env = "DROPLINE_TOPIC_PREFIX", default_value = "dropline")]
    pub topic_prefix: String,
    /// How long the producer waits to fill a batch.
    #[arg(long = "kafka-linger-ms", env = "DROPLINE_KAFKA_LINGER_MS", default_value_t = 5)]
    pub linger_ms: u64,
    /// How long a produced message may wait for the broker before it fails:
    /// Kafka's own default delivery timeout. Not a buyer's wait (the
    /// ingress's request timeout bounds that); shorter only makes the
    /// producer give up on records it must send again anyway, and every
    /// record given up while in flight makes the idempotent producer start a
    /// new epoch, which tansu 0.6 dies of (README, Known limits).
    #[arg(long = "kafka-message-timeout-ms", env = "DROPLINE_KAFKA_MESSAGE_TIMEOUT_MS", default_value_t = 120_000)]
    pub message_timeout_ms: u64,
    /// Messages the producer may hold unacknowledged; past this the ingress
    /// refuses at once and the stages wait for room (`kafka::WhenFull`).
    #[arg(
        long = "kafka-producer-queue-max-messages",
        env = "DROPLINE_KAFKA_PRODUCER_QUEUE_MAX_MESSAGES",
        default_value_t = 100_000
    )]
    pub producer_queue_max_messages: u64,
    /// Longest a consumer's fetch waits at the broker for new messages. It
    /// bounds how stale an idle partition's next message can be when the
    /// broker does not answer a waiting fetch as soon as data arrives.
    #[arg(long = "kafka-fetch-wait-max-ms", env = "DROPLINE_KAFKA_FETCH_WAIT_MAX_MS", default_value_t = 50)]
    pub fetch_wait_max_ms: u64,
    /// How long the group waits for a consumer's heartbeat before it hands
    /// the consumer's partitions to others. A static member restarted within
    /// it takes its partitions straight back; one that died holds them
    /// unconsumed until it ends. Raise it where a slow broker makes healthy
    /// consumers miss heartbeats (their logs say SESSTMOUT); lower it to hand
    /// a dead instance's partitions over sooner. Kafka's brokers accept 6 s
    /// to 30 min by default.
    #[arg(long = "kafka-session-timeout-ms", env = "DROPLINE_KAFKA_SESSION_TIMEOUT_MS", default_value_t = 10_000)]
    pub session_timeout_ms: u64,
    /// Static group membership: a stable id per consumer instance (a
    /// StatefulSet pod name, say). A restarted instance then takes its
    /// partitions back at once instead of waiting for the group to notice
    /// the old session died. Default: `<stage>-consumer@<hostname>`, unique
    /// as long as one host runs one instance of each stage; give each
    /// instance its own id to run more (on Kafka; tansu stalls a group that
    /// has seen two static ids). An empty value opts out (dynamic
    /// membership).
    #[arg(long = "kafka-group-instance-id", env = "DROPLINE_KAFKA_GROUP_INSTANCE_ID")]
    pub group_instance_id: Option<String>,
    /// Attempts at a message that fails for a reason of its own (not an
    /// unavailable dependency) before it goes to the dead-letter topic.
    #[arg(
        long = "kafka-permanent-failure-attempts",
        env = "DROPLINE_KAFKA_PERMANENT_FAILURE_ATTEMPTS",
        default_value_t = 5
    )]
    pub permanent_failure_attempts: u32,
    /// Partitions of topics created at start; existing topics are kept as
    /// they are.
    #[arg(long = "topic-partitions", env = "DROPLINE_TOPIC_PARTITIONS", default_value_t = 6)]
    pub partitions: i32,
    /// Replicas of each partition of topics created at start: 1 on the local
    /// single broker; 3 on a production cluster (k8s/ sets it), so a topic
    /// a stage creates before the cluster's operator does is as durable as
    /// the operator's would be. -1 takes the broker's default.
    #[arg(long = "topic-replication-factor", env = "DROPLINE_TOPIC_REPLICATION_FACTOR", default_value_t = 1)]
    pub replication_factor: i32,
}

impl KafkaArgs {
    pub fn topics(&self) -> crate::messages::Topics {
        crate::messages::Topics::with_prefix(&self.topic_prefix)
    }

    /// The static member id of consumer `client`, `None` for dynamic
    /// membership.
    pub fn instance_id(&self, client: &str) -> Option<String> {
        match &self.group_instance_id {
            Some(id) if id.is_empty() => None,
            Some(id) => Some(id.clone()),
            None => Some(format!("{client}@{}", hostname())),
        }
    }

    pub fn check(&self, problems: &mut Problems) {
        if let Some(id) = self.group_instance_id.as_deref().filter(|id| !id.is_empty()) {
            if id.len() > 200 || !id.bytes().all(|b| b.is_ascii_graphic()) {
                problems.add("DROPLINE_KAFKA_GROUP_INSTANCE_ID must be at most 200 visible ASCII characters");
            }
        }
        if self.brokers.trim().is_empty() {
            problems.add("DROPLINE_KAFKA_BROKERS is empty");
        }
        let prefix_ok = !self.topic_prefix.is_empty()
            && self.topic_prefix.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        problems.require(prefix_ok, "DROPLINE_TOPIC_PREFIX must be non-empty ASCII letters, digits, '.', '_' or '-'");
        problems.within("DROPLINE_KAFKA_FETCH_WAIT_MAX_MS", self.fetch_wait_max_ms, 1..=10_000);
        problems.require(self.message_timeout_ms > 0, "DROPLINE_KAFKA_MESSAGE_TIMEOUT_MS must be positive");
        problems.within("DROPLINE_KAFKA_SESSION_TIMEOUT_MS", self.session_timeout_ms, 6_000..=1_800_000);
        problems.within("DROPLINE_KAFKA_PERMANENT_FAILURE_ATTEMPTS", self.permanent_failure_attempts, 1..=100);
        problems.within("DROPLINE_TOPIC_PARTITIONS", self.partitions, 1..=1024);
        problems.require(
            self.replication_factor == -1 || (1..=16).contains(&self.replication_factor),
            "DROPLINE_TOPIC_REPLICATION_FACTOR must be -1 (the broker's default) or 1 to 16",
        );
        problems.within("DROPLINE_KAFKA_PRODUCER_QUEUE_MAX_MESSAGES", self.producer_queue_max_messages, 1..=10_000_000);
    }
}

/// Kafka settings parsed from `flags` as a stage parses them, for unit tests
/// of the clients built from them.
#[cfg(test)]
pub(crate) fn kafka_args(flags: &[&str]) -> KafkaArgs {
    #[derive(clap::Parser)]
    struct Flags {
        #[command(flatten)]
        kafka: KafkaArgs,
    }
    <Flags as clap::Parser>::parse_from(std::iter::once("test").chain(flags.iter().copied())).kafka
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct RedisArgs {
    /// Redis holding the stock ledger. With DROPLINE_REDIS_CLUSTER, one or
    /// more of the cluster's nodes, comma-separated: the client learns the
    /// rest from them.
    #[arg(id = "redis_url", long = "redis-url", env = "DROPLINE_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    #[serde(serialize_with = "redacted_urls")]
    pub url: String,
    /// The URL names nodes of a Redis Cluster: commands go to the node that
    /// serves their keys' hash slot, and the client follows the cluster
    /// through resharding and failover.
    #[arg(
        id = "redis_cluster",
        long = "redis-cluster",
        env = "DROPLINE_REDIS_CLUSTER",
        default_value_t = false,
        action = clap::ArgAction::Set
    )]
    pub cluster: bool,
    /// Connections in the pool.
    #[arg(id = "redis_pool_size", long = "redis-pool-size", env = "DROPLINE_REDIS_POOL_SIZE", default_value_t = 32)]
    pub pool_size: usize,
    /// Namespace of every Dropline key, so deployments (or tests) can share
    /// a Redis.
    #[arg(id = "redis_key_prefix", long = "redis-key-prefix", env = "DROPLINE_REDIS_KEY_PREFIX", default_value = "dl")]
    pub key_prefix: String,
    /// How long a caller waits for a free pooled connection before it fails
    /// (the ingress then answers 503 with Retry-After) instead of queueing
    /// without bound.
    #[arg(long = "redis-pool-wait-timeout-ms", env = "DROPLINE_REDIS_POOL_WAIT_TIMEOUT_MS", default_value_t = 5_000)]
    pub pool_wait_timeout_ms: u64,
    /// How long opening a new connection may take.
    #[arg(long = "redis-connect-timeout-ms", env = "DROPLINE_REDIS_CONNECT_TIMEOUT_MS", default_value_t = 5_000)]
    pub connect_timeout_ms: u64,
    /// How long checking a pooled connection before reuse may take.
    #[arg(long = "redis-recycle-timeout-ms", env = "DROPLINE_REDIS_RECYCLE_TIMEOUT_MS", default_value_t = 5_000)]
    pub recycle_timeout_ms: u64,
    /// How long one command (a script call included) may take to answer.
    /// The redis client's own default is 500 ms, which a batch of 2,000
    /// intents on a busy Redis can pass: the call then fails although the
    /// script ran, and the batch is redone (the scripts are idempotent).
    #[arg(long = "redis-response-timeout-ms", env = "DROPLINE_REDIS_RESPONSE_TIMEOUT_MS", default_value_t = 5_000)]
    pub response_timeout_ms: u64,
}

impl RedisArgs {
    /// Settings for `url` with a pool of `pool_size` and the default
    /// timeouts, for tools and tests that do not parse a command line: a
    /// pool with the redis client's own 500 ms response timeout fails on a
    /// busy CI machine (seen: a fault scenario's roll-back "timed out").
    pub fn new(url: impl Into<String>, pool_size: usize) -> Self {
        Self {
            url: url.into(),
            cluster: false,
            pool_size,
            key_prefix: "dl".into(),
            pool_wait_timeout_ms: 5_000,
            connect_timeout_ms: 5_000,
            recycle_timeout_ms: 5_000,
            response_timeout_ms: 5_000,
        }
    }

    pub fn check(&self, problems: &mut Problems) {
        if self.key_prefix.is_empty()
            || !self.key_prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            problems.add("DROPLINE_REDIS_KEY_PREFIX must be non-empty ASCII letters, digits, '-' or '_'");
        }
        let urls: Vec<&str> = self.url.split(',').map(str::trim).collect();
        if urls.iter().any(|u| !u.starts_with("redis://") && !u.starts_with("rediss://")) {
            problems.add("DROPLINE_REDIS_URL must start with redis:// or rediss://");
        }
        if urls.len() > 1 && !self.cluster {
            problems.add("DROPLINE_REDIS_URL lists several nodes: set DROPLINE_REDIS_CLUSTER=true for a Redis Cluster");
        }
        problems.require(self.pool_size > 0, "DROPLINE_REDIS_POOL_SIZE must be positive");
        for (name, ms) in [
            ("DROPLINE_REDIS_POOL_WAIT_TIMEOUT_MS", self.pool_wait_timeout_ms),
            ("DROPLINE_REDIS_CONNECT_TIMEOUT_MS", self.connect_timeout_ms),
            ("DROPLINE_REDIS_RECYCLE_TIMEOUT_MS", self.recycle_timeout_ms),
            ("DROPLINE_REDIS_RESPONSE_TIMEOUT_MS", self.response_timeout_ms),
        ] {
            problems.within(name, ms, 1..=600_000);
        }
    }

    /// A pool whose every wait is bounded: without timeouts deadpool waits
    /// for a free connection forever, and a stalled Redis piles up callers.
    pub fn pool(&self) -> Result<crate::redis_pool::Pool, crate::redis_pool::CreatePoolError> {
        use crate::redis_pool::{Manager, Pool};
        use deadpool::managed::{PoolConfig, Timeouts};
        let connect = Duration::from_millis(self.connect_timeout_ms);
        let connection = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(connect))
            .set_response_timeout(Some(Duration::from_millis(self.response_timeout_ms)));
        let mut pool = PoolConfig::new(self.pool_size);
        pool.timeouts = Timeouts {
            wait: Some(Duration::from_millis(self.pool_wait_timeout_ms)),
            create: Some(connect),
            recycle: Some(Duration::from_millis(self.recycle_timeout_ms)),
        };
        let manager = if self.cluster {
            let seeds: Vec<&str> = self.url.split(',').map(str::trim).collect();
            Manager::cluster(&seeds, connect, Duration::from_millis(self.response_timeout_ms))?
        } else {
            Manager::new(&self.url, connection)?
        };
        Ok(Pool::builder(manager).config(pool).runtime(deadpool::Runtime::Tokio1).build()?)
    }
}

/// The payment provider's API: where the ingress opens payments and the
/// settlers' refund worker makes refunds.
#[derive(Debug, Clone, Args, Serialize)]
pub struct ProviderArgs {
    #[arg(long, env = "DROPLINE_PAYMENT_PROVIDER_URL", default_value = "http://127.0.0.1:8090")]
    #[serde(serialize_with = "redacted_url")]
    pub payment_provider_url: String,
}

impl ProviderArgs {
    pub fn check(&self, problems: &mut Problems) {
        let url = &self.payment_provider_url;
        if !url.starts_with("http://") && !url.starts_with("https://") {
            problems.add("DROPLINE_PAYMENT_PROVIDER_URL must be an http(s) URL");
        }
    }

    /// The API's root, without a trailing slash.
    pub fn base(&self) -> &str {
        self.payment_provider_url.trim_end_matches('/')
    }
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct MysqlArgs {
    /// MySQL (or MariaDB) holding events, orders and payments.
    #[arg(
        id = "mysql_url",
        long = "mysql-url",
        env = "DROPLINE_MYSQL_URL",
        default_value = "mysql://root@127.0.0.1:3306/dropline"
    )]
    #[serde(serialize_with = "redacted_url")]
    pub url: String,
    /// Connections in the pool.
    #[arg(id = "mysql_pool_size", long = "mysql-pool-size", env = "DROPLINE_MYSQL_POOL_SIZE", default_value_t = 10)]
    pub pool_size: u32,
    /// How long a caller waits for a free pooled connection (or a new one)
    /// before it fails; the ingress then answers 503 with Retry-After.
    #[arg(long = "mysql-acquire-timeout-ms", env = "DROPLINE_MYSQL_ACQUIRE_TIMEOUT_MS", default_value_t = 5_000)]
    pub acquire_timeout_ms: u64,
}

impl MysqlArgs {
    /// Settings for `url` with a pool of `pool_size` and the default acquire
    /// timeout, for tools and tests that do not parse a command line.
    pub fn new(url: impl Into<String>, pool_size: u32) -> Self {
        Self { url: url.into(), pool_size, acquire_timeout_ms: 5_000 }
    }
}

impl MysqlArgs {
    pub fn check(&self, problems: &mut Problems) {
        if !self.url.starts_with("mysql://") && !self.url.starts_with("mariadb://") {
            problems.add("DROPLINE_MYSQL_URL must start with mysql://");
        }
        problems.require(self.pool_size > 0, "DROPLINE_MYSQL_POOL_SIZE must be positive");
        problems.within("DROPLINE_MYSQL_ACQUIRE_TIMEOUT_MS", self.acquire_timeout_ms, 1..=600_000);
    }
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct OpsArgs {
    /// Where /healthz, /readyz and /metrics listen [default: 127.0.0.1 and
    /// the stage's own port: ingress 9100, allocator 9101, settler 9102,
    /// expirer 9103, notifier 9104].
    #[arg(long = "ops-addr", env = "DROPLINE_OPS_ADDR")]
    pub addr: Option<SocketAddr>,
    /// How long a SIGTERM drain may take before in-flight work is abandoned
    /// (it is redelivered: nothing is committed for it).
    #[arg(long = "drain-timeout-secs", env = "DROPLINE_DRAIN_TIMEOUT_SECS", default_value_t = 20)]
    pub drain_timeout_secs: u64,
}

impl OpsArgs {
    /// The ops address, or the stage's default port on loopback.
    pub fn addr_or(&self, default_port: u16) -> SocketAddr {
        self.addr.unwrap_or(SocketAddr::from(([127, 0, 0, 1], default_port)))
    }
}

/// What every stage has: the broker, the Redis ledger and its own ops
/// endpoints. Serialized flat, as if its fields were the stage's own.
#[derive(Debug, Clone, Args, Serialize)]
pub struct SharedArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub redis: RedisArgs,
    #[command(flatten)]
    pub ops: OpsArgs,
}

impl SharedArgs {
    pub fn check(&self, problems: &mut Problems) {
        self.kafka.check(problems);
        self.redis.check(problems);
    }
}

/// This host's name (a pod's name in Kubernetes), for default instance ids.
pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Every problem found in a config, reported together.
#[derive(Debug, Default)]
pub struct Problems(Vec<String>);

impl Problems {
    pub fn add(&mut self, problem: impl Into<String>) {
        self.0.push(problem.into());
    }

    /// Adds `problem` unless `ok`.
    pub fn require(&mut self, ok: bool, problem: impl Into<String>) {
        if !ok {
            self.add(problem);
        }
    }

    /// `setting` must lie in `range`: "<setting> must be <start> to <end>".
    pub fn within<T: PartialOrd + fmt::Display>(
        &mut self,
        setting: &str,
        value: T,
        range: std::ops::RangeInclusive<T>,
    ) {
        if !range.contains(&value) {
            self.add(format!("{setting} must be {} to {}", range.start(), range.end()));
        }
    }

    pub fn into_result(self) -> Result<(), ConfigError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(self.0))
        }
    }
}

/// A config that cannot run, with every reason.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError(pub Vec<String>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration: {}", self.0.join("; "))
    }
}

/// Serializes a URL for the effective-config log, password masked.
pub fn redacted_url<T: AsRef<str>, S: Serializer>(url: &T, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_url(url.as_ref()))
}

/// [`redacted_url`] of each URL in a comma-separated list (a cluster's
/// nodes).
pub fn redacted_urls<T: AsRef<str>, S: Serializer>(urls: &T, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&urls.as_ref().split(',').map(redact_url).collect::<Vec<_>>().join(","))
}

/// Serializes a URL for the effective-config log as its scheme, host and
/// port only: for a URL whose path or query may carry a token (a host's
/// webhook endpoint).
pub fn url_origin<T: AsRef<str>, S: Serializer>(url: &T, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&origin(url.as_ref()))
}

/// A URL's scheme, host and port, `/...` for whatever followed; the
/// credentials dropped. Not a URL at all: `(unparsable)`.
pub fn origin(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return "(unparsable)".into() };
    // Credentials end at the last `@` before any query or fragment, even
    // when someone put a `/` in a password.
    let before_query = rest.split(['?', '#']).next().unwrap_or_default();
    let rest = before_query.rsplit_once('@').map_or(rest, |(creds, _)| &rest[creds.len() + 1..]);
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let tail = if rest.len() > host.len() { "/..." } else { "" };
    format!("{scheme}://{host}{tail}")
}

/// Masks the password of a URL before it is logged.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.find(':') {
                Some(colon) => format!("{}{}:***{}", &url[..scheme + 3], &creds[..colon], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_origin_keeps_the_scheme_host_and_port_only() {
        assert_eq!(origin("https://hooks.example.com/t/abc?key=secret"), "https://hooks.example.com/...");
        assert_eq!(origin("http://user:pw@127.0.0.1:9180/webhooks"), "http://127.0.0.1:9180/...");
        assert_eq!(origin("http://127.0.0.1:9180"), "http://127.0.0.1:9180");
        assert_eq!(origin("not a url"), "(unparsable)");
        assert_eq!(origin("http://user:PASS/WORD@example.com/"), "http://example.com/...");
        assert_eq!(origin("https://h.example/in?mail=a@b.example"), "https://h.example/...");
    }

    #[test]
    fn passwords_are_masked() {
        assert_eq!(redact_url("mysql://root:secret@db:3306/x"), "mysql://root:***@db:3306/x");
        assert_eq!(redact_url("mysql://root@db/x"), "mysql://root@db/x");
        assert_eq!(redact_url("redis://127.0.0.1"), "redis://127.0.0.1");
    }

    #[test]
    fn problems_are_reported_together() {
        let mut p = Problems::default();
        p.add("a");
        p.add("b");
        assert_eq!(p.into_result().unwrap_err().to_string(), "invalid configuration: a; b");
    }
}

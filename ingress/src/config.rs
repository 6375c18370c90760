use std::net::SocketAddr;

use clap::Parser;
use dropline::config::{MysqlArgs, Problems, SharedArgs};
use dropline::secrets::{self, Secret};
use serde::Serialize;

/// The ingress: Dropline's HTTP API for buyers, admins and the payment
/// provider's webhooks.
#[derive(Debug, Clone, Parser, Serialize)]
#[command(name = "dropline-ingress", version)]
pub struct IngressConfig {
    /// Where the public API listens.
    #[arg(long, env = "DROPLINE_LISTEN_ADDR", default_value = "127.0.0.1:8080")]
    pub listen_addr: SocketAddr,
    /// HS256 secret buyers' tokens are signed with (shared with the
    /// storefront's login). At least 32 random bytes; never a published
    /// value.
    #[arg(long, env = "DROPLINE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<Secret>,
    /// HS256 secret admins' tokens are signed with: a different one, held
    /// only by operators' tooling.
    #[arg(long, env = "DROPLINE_ADMIN_JWT_SECRET", hide_env_values = true)]
    pub admin_jwt_secret: Option<Secret>,
    /// The `iss` every token must carry (and `dropctl token` sets).
    #[arg(long, env = "DROPLINE_JWT_ISSUER", default_value = dropline::auth::DEFAULT_ISSUER)]
    pub jwt_issuer: String,
    /// An identity provider's signing keys, as a JWKS file path or http(s)
    /// URL: buyers' RS256 and ES256 tokens are checked against them (beside
    /// the HS256 tokens signed with DROPLINE_JWT_SECRET). Empty: none.
    #[arg(long, env = "DROPLINE_JWKS_URL", default_value = "")]
    pub jwks_url: String,
    /// The `iss` the identity provider's tokens carry (required with
    /// DROPLINE_JWKS_URL).
    #[arg(long, env = "DROPLINE_JWKS_ISSUER", default_value = "")]
    pub jwks_issuer: String,
    /// The `aud` the identity provider puts in tokens for Dropline.
    #[arg(long, env = "DROPLINE_JWKS_AUDIENCE", default_value = "dropline-buyer")]
    pub jwks_audience: String,
    /// How often the identity provider's keys are read again (a token
    /// naming a key not yet seen reads them at once, at most every 5 s).
    #[arg(long, env = "DROPLINE_JWKS_REFRESH_SECS", default_value_t = 300)]
    pub jwks_refresh_secs: u64,
    /// Secret the payment provider signs its webhooks with.
    #[arg(long, env = "DROPLINE_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<Secret>,
    /// How far a webhook's signed timestamp may be from now.
    #[arg(long, env = "DROPLINE_WEBHOOK_TOLERANCE_SECS", default_value_t = 300)]
    pub webhook_tolerance_secs: i64,
    #[command(flatten)]
    #[serde(flatten)]
    pub provider: dropline::config::ProviderArgs,
    /// How much longer a hold lasts once its buyer starts paying, so a buyer
    /// in the middle of paying does not race the deadline. Granted once per
    /// hold, however many attempts follow. At most 900 (15 minutes); 0
    /// grants none.
    #[arg(long, env = "DROPLINE_PAYMENT_HOLD_EXTENSION_SECS", default_value_t = 120)]
    pub payment_hold_extension_secs: u64,
    /// Purchases admitted per second by this process, all buyers together.
    #[arg(long, env = "DROPLINE_ADMIT_PER_SEC", default_value_t = 20_000)]
    pub admit_per_sec: u32,
    /// Burst above the admission rate.
    #[arg(long, env = "DROPLINE_ADMIT_BURST", default_value_t = 5_000)]
    pub admit_burst: u32,
    /// Purchases one buyer may make per second.
    #[arg(long, env = "DROPLINE_USER_PER_SEC", default_value_t = 2)]
    pub user_per_sec: u32,
    /// Burst above one buyer's rate.
    #[arg(long, env = "DROPLINE_USER_BURST", default_value_t = 5)]
    pub user_burst: u32,
    /// Waiting-room requests (joins, status, challenges) one buyer may make
    /// per second.
    #[arg(long, env = "DROPLINE_ROOM_USER_PER_SEC", default_value_t = 5)]
    pub room_user_per_sec: u32,
    /// Burst above one buyer's waiting-room rate.
    #[arg(long, env = "DROPLINE_ROOM_USER_BURST", default_value_t = 10)]
    pub room_user_burst: u32,
    /// Requests one client address may make per second to the buyers' API
    /// (payments, cancels, webhooks and the admin API aside). Generous: many
    /// buyers can share an address behind a carrier's NAT.
    #[arg(long, env = "DROPLINE_IP_PER_SEC", default_value_t = 200)]
    pub ip_per_sec: u32,
    /// Burst above one address's rate.
    #[arg(long, env = "DROPLINE_IP_BURST", default_value_t = 400)]
    pub ip_burst: u32,
    /// The deployment's own proxies (load balancers), as comma-separated
    /// addresses or CIDR networks: only a request from one of them has its
    /// client read from `X-Forwarded-For`. Empty: every peer is the client.
    #[arg(long, env = "DROPLINE_TRUSTED_PROXIES", default_value = "")]
    pub trusted_proxies: String,
    /// Joins of one event's waiting room per second, by this process.
    #[arg(long, env = "DROPLINE_JOINS_PER_EVENT_PER_SEC", default_value_t = 5_000)]
    pub joins_per_event_per_sec: u32,
    /// Burst above one event's join rate.
    #[arg(long, env = "DROPLINE_JOINS_PER_EVENT_BURST", default_value_t = 10_000)]
    pub joins_per_event_burst: u32,
    /// Payments, cancels and payment webhooks per second, by this process:
    /// a budget of their own, which no purchase flood uses up.
    #[arg(long, env = "DROPLINE_ORDER_ACTIONS_PER_SEC", default_value_t = 5_000)]
    pub order_actions_per_sec: u32,
    /// Burst above the order actions' rate.
    #[arg(long, env = "DROPLINE_ORDER_ACTIONS_BURST", default_value_t = 2_000)]
    pub order_actions_burst: u32,
    /// How long event details are cached in the process.
    #[arg(long, env = "DROPLINE_EVENT_CACHE_TTL_MS", default_value_t = 5_000)]
    pub event_cache_ttl_ms: u64,
    /// Largest request body accepted.
    #[arg(long, env = "DROPLINE_MAX_BODY_BYTES", default_value_t = 16 * 1024)]
    pub max_body_bytes: usize,
    /// How long idempotency records (and intent status) stay in Redis.
    #[arg(long, env = "DROPLINE_IDEMPOTENCY_TTL_SECS", default_value_t = 86_400)]
    pub idempotency_ttl_secs: u64,
    /// How long a request owns its Idempotency-Key while it produces the
    /// intent; copies sent meanwhile get 409 `idempotency_in_progress`. Once
    /// it runs out (the owner crashed, or its request timed out), a retry
    /// takes the key over and produces the intent again. At least the
    /// request timeout, or slow owners are taken over needlessly
    /// (harmless: the same intent is produced twice).
    #[arg(long, env = "DROPLINE_IDEMPOTENCY_LEASE_MS", default_value_t = 10_000)]
    pub idempotency_lease_ms: u64,
    /// How long a client has to send a complete request head (request line
    /// and headers). hyper starts this clock whenever it waits for a head, so
    /// it also bounds how long a kept-alive connection may sit between
    /// requests.
    #[arg(long, env = "DROPLINE_HTTP_HEADER_READ_TIMEOUT_MS", default_value_t = 5_000)]
    pub http_header_read_timeout_ms: u64,
    /// How long a request may take from its head to its answer, reading the
    /// body included; past it the answer is 503 `request_timeout`.
    #[arg(long, env = "DROPLINE_HTTP_REQUEST_TIMEOUT_MS", default_value_t = 10_000)]
    pub http_request_timeout_ms: u64,
    /// A connection on which no byte moves either way for this long is
    /// closed: a client that stalls mid-body or stops reading its answer.
    #[arg(long, env = "DROPLINE_HTTP_IDLE_TIMEOUT_SECS", default_value_t = 30)]
    pub http_idle_timeout_secs: u64,
    /// Open connections at most. Each costs a file descriptor: keep it well
    /// below the process's limit (`ulimit -n`), which Redis, MySQL and Kafka
    /// connections share.
    #[arg(long, env = "DROPLINE_HTTP_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub http_max_connections: usize,
    /// Purchases answered at once by this process; more are refused at once
    /// with 429 `busy`. Size it as the purchase rate the broker sustains
    /// times the answer time you accept: 256 is half a second at 512 per
    /// second. Past it, purchases would queue in the producer for seconds
    /// and time out instead.
    #[arg(long, env = "DROPLINE_PURCHASES_MAX_IN_FLIGHT", default_value_t = 256)]
    pub purchases_max_in_flight: usize,
    /// Event searches (`GET /v1/events`) served at once; more are refused at
    /// once with 503 `overloaded`. Below the MySQL pool size, so searches
    /// never take every connection from the purchase path.
    #[arg(long, env = "DROPLINE_SEARCH_MAX_CONCURRENT_REQUESTS", default_value_t = 4)]
    pub search_max_concurrent_requests: usize,
    /// How long MySQL may run one search query before it stops it.
    #[arg(long, env = "DROPLINE_SEARCH_STATEMENT_TIMEOUT_MS", default_value_t = 2_000)]
    pub search_statement_timeout_ms: u64,
    /// Server-sent event streams open at once on this process; more are
    /// refused with 503 `streams_full` (their buyers poll meanwhile). Each
    /// holds a connection, so it must be below DROPLINE_HTTP_MAX_CONNECTIONS
    /// (streams never take every connection from purchases); unset, it is
    /// four fifths of it.
    #[arg(long, env = "DROPLINE_MAX_STREAMS")]
    pub max_streams: Option<usize>,
    /// How often the in-memory snapshot of events and their availability,
    /// which every event read is answered from, is refreshed.
    #[arg(long, env = "DROPLINE_SNAPSHOT_REFRESH_MS", default_value_t = 500)]
    pub snapshot_refresh_ms: u64,
    /// The allocators' consumer group: a queued purchase's place in their
    /// line is read from its committed offsets.
    #[arg(long, env = "DROPLINE_ALLOCATOR_GROUP", default_value = "dropline-allocator")]
    pub allocator_group: String,
    #[command(flatten)]
    pub mysql: MysqlArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub shared: SharedArgs,
}

dropline::stage_config!(IngressConfig, "ingress", 9100, |config, p| {
    config.mysql.check(p);
    let secrets = [
        ("DROPLINE_JWT_SECRET", &config.jwt_secret),
        ("DROPLINE_ADMIN_JWT_SECRET", &config.admin_jwt_secret),
        ("DROPLINE_WEBHOOK_SECRET", &config.webhook_secret),
    ];
    for (name, value) in secrets {
        secrets::check_setting(name, value, p);
    }
    // One secret in two roles would let whoever holds it for one (the
    // storefront, the provider) act in the other.
    for (i, (a, va)) in secrets.iter().enumerate() {
        for (b, vb) in &secrets[i + 1..] {
            if !secrets::exposed(va).is_empty() && va == vb {
                p.add(format!("{a} and {b} must differ"));
            }
        }
    }
    if !config.jwks_url.is_empty() {
        p.require(!config.jwks_issuer.trim().is_empty(), "DROPLINE_JWKS_ISSUER is required with DROPLINE_JWKS_URL");
        p.require(!config.jwks_audience.trim().is_empty(), "DROPLINE_JWKS_AUDIENCE must not be empty");
        p.within("DROPLINE_JWKS_REFRESH_SECS", config.jwks_refresh_secs, 1..=86_400);
    }
    if config.jwt_issuer.trim().is_empty() {
        p.add("DROPLINE_JWT_ISSUER is empty");
    }
    p.require(config.webhook_tolerance_secs > 0, "DROPLINE_WEBHOOK_TOLERANCE_SECS must be positive");
    config.provider.check(p);
    p.within("DROPLINE_PAYMENT_HOLD_EXTENSION_SECS", config.payment_hold_extension_secs, 0..=900);
    for (name, v) in [
        ("DROPLINE_ADMIT_PER_SEC", config.admit_per_sec),
        ("DROPLINE_ADMIT_BURST", config.admit_burst),
        ("DROPLINE_USER_PER_SEC", config.user_per_sec),
        ("DROPLINE_USER_BURST", config.user_burst),
        ("DROPLINE_ROOM_USER_PER_SEC", config.room_user_per_sec),
        ("DROPLINE_ROOM_USER_BURST", config.room_user_burst),
        ("DROPLINE_IP_PER_SEC", config.ip_per_sec),
        ("DROPLINE_IP_BURST", config.ip_burst),
        ("DROPLINE_JOINS_PER_EVENT_PER_SEC", config.joins_per_event_per_sec),
        ("DROPLINE_JOINS_PER_EVENT_BURST", config.joins_per_event_burst),
        ("DROPLINE_ORDER_ACTIONS_PER_SEC", config.order_actions_per_sec),
        ("DROPLINE_ORDER_ACTIONS_BURST", config.order_actions_burst),
    ] {
        if v == 0 {
            p.add(format!("{name} must be positive"));
        }
    }
    if let Err(e) = config.trusted_proxies.parse::<crate::peer::TrustedProxies>() {
        p.add(format!("DROPLINE_TRUSTED_PROXIES: {e}"));
    }
    p.within("DROPLINE_SNAPSHOT_REFRESH_MS", config.snapshot_refresh_ms, 50..=1_000);
    p.require(config.idempotency_ttl_secs > 0, "DROPLINE_IDEMPOTENCY_TTL_SECS must be positive");
    if config.idempotency_lease_ms == 0 || config.idempotency_lease_ms / 1000 >= config.idempotency_ttl_secs {
        p.add("DROPLINE_IDEMPOTENCY_LEASE_MS must be positive and shorter than DROPLINE_IDEMPOTENCY_TTL_SECS");
    }
    p.require(config.max_body_bytes >= 256, "DROPLINE_MAX_BODY_BYTES must be at least 256");
    config.check_http(p, open_files_limit());
});

impl IngressConfig {
    /// Event streams open at once at most: as set, or four fifths of the
    /// connections.
    pub fn stream_limit(&self) -> usize {
        self.max_streams.unwrap_or(self.http_max_connections / 5 * 4)
    }

    /// Every rate limiter's rate and burst.
    pub fn rates(&self) -> crate::limits::Rates {
        crate::limits::Rates {
            admit: (self.admit_per_sec, self.admit_burst),
            user: (self.user_per_sec, self.user_burst),
            room_user: (self.room_user_per_sec, self.room_user_burst),
            ip: (self.ip_per_sec, self.ip_burst),
            joins_per_event: (self.joins_per_event_per_sec, self.joins_per_event_burst),
            order_actions: (self.order_actions_per_sec, self.order_actions_burst),
        }
    }

    /// The front door's timeouts and limits. `open_files` is the process's
    /// soft RLIMIT_NOFILE, when known.
    fn check_http(&self, p: &mut Problems, open_files: Option<u64>) {
        p.within("DROPLINE_HTTP_HEADER_READ_TIMEOUT_MS", self.http_header_read_timeout_ms, 100..=300_000);
        p.within("DROPLINE_HTTP_REQUEST_TIMEOUT_MS", self.http_request_timeout_ms, 100..=300_000);
        // The idle clock runs while a handler works and while hyper waits for
        // a head; it must not close a connection either of those would keep.
        let idle_ms = self.http_idle_timeout_secs.saturating_mul(1000);
        if idle_ms <= self.http_request_timeout_ms.max(self.http_header_read_timeout_ms) {
            p.add(
                "DROPLINE_HTTP_IDLE_TIMEOUT_SECS must be longer than DROPLINE_HTTP_REQUEST_TIMEOUT_MS and \
                 DROPLINE_HTTP_HEADER_READ_TIMEOUT_MS",
            );
        }
        p.require(self.http_max_connections > 0, "DROPLINE_HTTP_MAX_CONNECTIONS must be positive");
        p.require(
            self.max_streams.is_none_or(|n| n < self.http_max_connections),
            "DROPLINE_MAX_STREAMS must be below DROPLINE_HTTP_MAX_CONNECTIONS",
        );
        if let Some(limit) = open_files {
            let needed = self.http_max_connections as u64 + RESERVED_FDS;
            if needed > limit {
                p.add(format!(
                    "DROPLINE_HTTP_MAX_CONNECTIONS ({}) plus {RESERVED_FDS} descriptors for everything else exceeds \
                     the open-files limit ({limit}): lower it or raise `ulimit -n`",
                    self.http_max_connections
                ));
            }
        }
        p.within("DROPLINE_PURCHASES_MAX_IN_FLIGHT", self.purchases_max_in_flight, 1..=100_000);
        if self.search_max_concurrent_requests == 0
            || self.search_max_concurrent_requests >= self.mysql.pool_size as usize
        {
            p.add("DROPLINE_SEARCH_MAX_CONCURRENT_REQUESTS must be 1 to DROPLINE_MYSQL_POOL_SIZE - 1");
        }
        p.within("DROPLINE_SEARCH_STATEMENT_TIMEOUT_MS", self.search_statement_timeout_ms, 10..=60_000);
    }
}

/// Descriptors kept for what is not an API connection: the Redis and MySQL
/// pools, librdkafka's sockets, the ops listener, logs.
const RESERVED_FDS: u64 = 1024;

/// The soft limit on open files, from `/proc/self/limits` (Linux); `None`
/// elsewhere or when unlimited.
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    // "Max open files            65536                65536                files"
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;
    use dropline::stage::StageConfig;

    use super::*;

    use std::sync::LazyLock;

    static BUYER: LazyLock<String> = LazyLock::new(dropline::secrets::random);
    static ADMIN: LazyLock<String> = LazyLock::new(dropline::secrets::random);
    static WEBHOOK: LazyLock<String> = LazyLock::new(dropline::secrets::random);

    fn with(jwt: &str, admin: &str, webhook: &str) -> IngressConfig {
        IngressConfig::parse_from([
            "ingress".to_owned(),
            format!("--jwt-secret={jwt}"),
            format!("--admin-jwt-secret={admin}"),
            format!("--webhook-secret={webhook}"),
        ])
    }

    fn problems(config: &IngressConfig) -> Vec<String> {
        config.validate().err().map(|e| e.0).unwrap_or_default()
    }

    #[test]
    fn the_command_line_is_well_formed_and_random_secrets_validate() {
        IngressConfig::command().debug_assert();
        with(&BUYER, &ADMIN, &WEBHOOK).validate().unwrap();
    }

    #[test]
    fn the_effective_config_log_shows_no_secret() {
        let mut config = with(&BUYER, &ADMIN, &WEBHOOK);
        config.mysql.url = "mysql://dropline:hunter2-mysql@db:3306/dropline".into();
        config.shared.redis.url = "redis://:hunter2-redis@cache:6379".into();
        config.provider.payment_provider_url = "https://shop:hunter2-psp@psp.example".into();
        let logged = dropline::stage::effective(&config);
        for secret in [BUYER.as_str(), &ADMIN, &WEBHOOK, "hunter2-mysql", "hunter2-redis", "hunter2-psp"] {
            assert!(!logged.contains(secret), "{secret} is in the log line: {logged}");
        }
        assert!(logged.contains("\"jwt_secret\":\"***\""), "{logged}");
        let debugged = format!("{config:?}");
        for secret in [BUYER.as_str(), &ADMIN, &WEBHOOK] {
            assert!(!debugged.contains(secret), "{secret} shows in Debug: {debugged}");
        }
        assert!(logged.contains("\"admit_per_sec\":20000"), "{logged}");
    }

    #[test]
    fn without_secrets_every_missing_one_is_named() {
        // Empty flags, not none: the environment of whoever runs the test
        // must not fill them in.
        let p = problems(&with("", "", ""));
        assert_eq!(
            p,
            [
                "DROPLINE_JWT_SECRET is not set",
                "DROPLINE_ADMIN_JWT_SECRET is not set",
                "DROPLINE_WEBHOOK_SECRET is not set"
            ]
        );
    }

    #[test]
    fn published_short_placeholder_and_shared_secrets_are_refused_together() {
        let p = problems(&with("dropline-local-jwt-secret", "too-short", "change-me-to-the-provider-signing-secret"));
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].starts_with("DROPLINE_JWT_SECRET is a value published"), "{p:?}");
        assert!(p[1].starts_with("DROPLINE_ADMIN_JWT_SECRET is shorter than 32 bytes"), "{p:?}");
        assert!(p[2].starts_with("DROPLINE_WEBHOOK_SECRET is a value published"), "{p:?}");
        let p = problems(&with("<a-random-value-of-at-least-32-bytes>", &ADMIN, &WEBHOOK));
        assert_eq!(p.len(), 1);
        assert!(p[0].starts_with("DROPLINE_JWT_SECRET looks like a placeholder"), "{p:?}");
        assert_eq!(
            problems(&with(&BUYER, &BUYER, &WEBHOOK)),
            ["DROPLINE_JWT_SECRET and DROPLINE_ADMIN_JWT_SECRET must differ"]
        );
    }

    #[test]
    fn the_connection_cap_must_fit_the_open_files_limit() {
        let config = IngressConfig::parse_from(["ingress", "--http-max-connections=10000"]);
        let mut p = Problems::default();
        config.check_http(&mut p, Some(65_536));
        assert!(p.into_result().is_ok());
        let mut p = Problems::default();
        config.check_http(&mut p, Some(4_096));
        let e = p.into_result().unwrap_err();
        assert!(e.0.iter().any(|m| m.contains("open-files limit (4096)")), "{e}");
        assert!(open_files_limit().is_some(), "this test runs on Linux");
    }

    #[test]
    fn every_timeout_problem_is_reported_at_once() {
        let config = IngressConfig::parse_from([
            "ingress",
            "--http-header-read-timeout-ms=0",
            "--http-request-timeout-ms=60000",
            "--http-idle-timeout-secs=30",
            "--http-max-connections=0",
            "--search-max-concurrent-requests=10",
        ]);
        let e = config.validate().unwrap_err();
        let door = e.0.iter().filter(|m| m.starts_with("DROPLINE_HTTP_") || m.starts_with("DROPLINE_SEARCH_"));
        assert_eq!(door.count(), 4, "{e}");
    }
}

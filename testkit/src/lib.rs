//! What Dropline's tests share, whichever crate they live in.
//!
//! - [`Secrets`]: signing secrets, random per run.
//! - [`brokers`], [`redis_url`], [`mysql_server`]: the local services, as
//!   the environment names them.
//! - [`Deployment`]: a test's own database, topic prefix, Redis key prefix
//!   and consumer groups on those services, and the flags that point a
//!   stage at them.
//! - [`eventually`]: waiting on a condition with a deadline.
//! - [`refused`], [`assert_problem`]: problem+json answers.
//! - [`event_body`], [`create_event`]: an event through the admin API.

use std::net::SocketAddr;
use std::time::Duration;

use dropline::auth::Tokens;
use dropline::config::MysqlArgs;
use dropline::stock::Ledger;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::MySqlPool;

/// Signing secrets of one test deployment, random per run: a fixed test
/// value would be a published one, which the services refuse.
#[derive(Debug, Clone)]
pub struct Secrets {
    pub jwt: String,
    pub admin_jwt: String,
    pub webhook: String,
    /// The notifier's webhook signing secret.
    pub notify: String,
}

impl Secrets {
    pub fn generate() -> Secrets {
        use dropline::secrets::random;
        Secrets { jwt: random(), admin_jwt: random(), webhook: random(), notify: random() }
    }

    pub fn tokens(&self) -> Tokens {
        Tokens::new(self.jwt.as_bytes(), self.admin_jwt.as_bytes(), dropline::auth::DEFAULT_ISSUER)
    }

    /// The variables the ingress, paysim and the notifier read them from.
    pub fn env(&self) -> [(&'static str, String); 4] {
        [
            ("DROPLINE_JWT_SECRET", self.jwt.clone()),
            ("DROPLINE_ADMIN_JWT_SECRET", self.admin_jwt.clone()),
            ("DROPLINE_WEBHOOK_SECRET", self.webhook.clone()),
            ("DROPLINE_NOTIFY_SECRET", self.notify.clone()),
        ]
    }

    /// The ingress's flags for them.
    pub fn ingress_args(&self) -> [String; 3] {
        [
            format!("--jwt-secret={}", self.jwt),
            format!("--admin-jwt-secret={}", self.admin_jwt),
            format!("--webhook-secret={}", self.webhook),
        ]
    }
}

/// `defaults`, less those `more` gives again (by flag name), then `more`.
pub fn with_overrides(defaults: impl IntoIterator<Item = String>, more: &[String]) -> Vec<String> {
    let name = |arg: &str| arg.split('=').next().unwrap_or_default().to_owned();
    defaults.into_iter().filter(|d| !more.iter().any(|m| name(m) == name(d))).chain(more.iter().cloned()).collect()
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

pub fn brokers() -> String {
    env_or("DROPLINE_KAFKA_BROKERS", "127.0.0.1:9092")
}

pub fn redis_url() -> String {
    env_or("DROPLINE_REDIS_URL", "redis://127.0.0.1:6379")
}

/// The tests' Redis settings: `DROPLINE_REDIS_URL`, a Redis Cluster if
/// `DROPLINE_REDIS_CLUSTER=true` (scripts/test.sh runs the Redis suites
/// again on the local cluster so).
pub fn redis(pool_size: usize) -> dropline::config::RedisArgs {
    let mut args = dropline::config::RedisArgs::new(redis_url(), pool_size);
    args.cluster = std::env::var("DROPLINE_REDIS_CLUSTER").is_ok_and(|v| v == "true");
    args
}

/// The server part of the MySQL URL, without a database.
pub fn mysql_server() -> String {
    env_or("DROPLINE_TEST_MYSQL_SERVER", "mysql://root@127.0.0.1:3306")
}

/// One test's corner of the local services: the database
/// `dropline_<name>`, topics and Redis keys under the prefix `name`,
/// consumer groups `<name>-<stage>`, and secrets of its own. Tests that use
/// one each run in parallel.
pub struct Deployment {
    pub name: String,
    pub secrets: Secrets,
    pub keys: Tokens,
    pub db: MySqlPool,
    pub ledger: Ledger,
}

impl Deployment {
    /// Creates the database (empty: the first stage to start migrates it).
    pub async fn create() -> Deployment {
        dropline::telemetry::init_logs();
        let name = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let db_url = format!("{}/dropline_{name}", mysql_server());
        dropline::db::create_database(&db_url).await.expect("create the test database");
        let db = dropline::db::connect(&MysqlArgs::new(db_url, 5)).await.unwrap();
        let pool = redis(16).pool().unwrap();
        let secrets = Secrets::generate();
        Deployment { ledger: Ledger::new(pool, &name), keys: secrets.tokens(), secrets, db, name }
    }

    pub fn mysql_url(&self) -> String {
        format!("{}/dropline_{}", mysql_server(), self.name)
    }

    /// The flags every stage takes: the broker and topics, a short drain,
    /// the ops endpoints on a free port.
    pub fn stage_args(&self) -> [String; 5] {
        [
            format!("--kafka-brokers={}", brokers()),
            format!("--topic-prefix={}", self.name),
            "--topic-partitions=3".to_owned(),
            "--drain-timeout-secs=5".to_owned(),
            "--ops-addr=127.0.0.1:0".to_owned(),
        ]
    }

    /// The Redis flags of the stages that use it.
    pub fn redis_args(&self) -> [String; 2] {
        [format!("--redis-url={}", redis_url()), format!("--redis-key-prefix={}", self.name)]
    }

    /// An ingress's command line on this deployment: generous rate limits,
    /// a short event cache and a 1 KiB body limit. A flag in `more`
    /// replaces the default of the same name.
    pub fn ingress_args(&self, more: &[String]) -> Vec<String> {
        let defaults = [
            format!("--mysql-url={}", self.mysql_url()),
            "--user-per-sec=1000".to_owned(),
            "--user-burst=1000".to_owned(),
            "--room-user-per-sec=1000".to_owned(),
            "--room-user-burst=1000".to_owned(),
            // Every test buyer comes from 127.0.0.1.
            "--ip-per-sec=1000000".to_owned(),
            "--ip-burst=1000000".to_owned(),
            "--event-cache-ttl-ms=200".to_owned(),
            "--max-body-bytes=1024".to_owned(),
            // Tests' holds last seconds: starting to pay adds 2 s.
            "--payment-hold-extension-secs=2".to_owned(),
            format!("--allocator-group={}-allocator", self.name),
        ]
        .into_iter()
        .chain(self.redis_args())
        .chain(self.secrets.ingress_args())
        .chain(self.stage_args());
        ["ingress".to_owned()].into_iter().chain(with_overrides(defaults, more)).collect()
    }

    pub fn token(&self, user: &str) -> String {
        self.keys.buyer.mint(user, 600).unwrap()
    }

    pub fn admin_token(&self) -> String {
        self.keys.admin.mint("admin", 600).unwrap()
    }

    /// Drops the test database, once the stages on it have stopped.
    pub async fn drop_database(&self) {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS dropline_{}", self.name)).execute(&self.db).await;
    }
}

/// Polls `probe` until it yields `Some`, failing the test after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    eventually_or(what, timeout, probe, String::new).await
}

/// [`eventually`], whose failure also says what `explain` finds then (the
/// logs of what did not get there, say).
pub async fn eventually_or<T, F, Fut>(
    what: &str,
    timeout: Duration,
    mut probe: F,
    explain: impl FnOnce() -> String,
) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out waiting for {what}\n{}", explain());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client for a test's ingress, pooling connections as a well-behaved
/// buyer's app does: none is reused after 2 s idle, well under the
/// ingress's keep-alive (it closes an idle connection at its header-read
/// timeout, 5 s). A connection reused just as the ingress closes it would
/// meet a reset instead of an answer (seen in CI: a burst's copies sent on
/// connections pooled 5 s before).
pub fn http_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder().pool_idle_timeout(Duration::from_secs(2))
}

/// [`http_builder`]'s client, as it comes.
pub fn http() -> reqwest::Client {
    http_builder().build().expect("a plain reqwest client builds")
}

pub fn addr_of(url: &str) -> SocketAddr {
    url.trim_start_matches("http://").parse().unwrap()
}

/// Checks an answer is the problem+json refusal `status` with `code`.
pub fn assert_problem(got: StatusCode, content_type: Option<&str>, body: &Value, status: StatusCode, code: &str) {
    assert_eq!((got, body["code"].as_str()), (status, Some(code)), "{body}");
    assert_eq!(content_type, Some("application/problem+json"), "{body}");
    assert_eq!(body["status"], status.as_u16(), "{body}");
    assert!(body["title"].is_string(), "{body}");
}

/// Sends a request and checks it was refused with `status` and `code`.
pub async fn refused(req: reqwest::RequestBuilder, status: StatusCode, code: &str) -> Value {
    let r = req.send().await.unwrap();
    let got = r.status();
    let content_type = r.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned());
    let body: Value = r.json().await.unwrap_or(Value::Null);
    assert_problem(got, content_type.as_deref(), &body, status, code);
    body
}

/// An admin's request for an event of 5 tickets whose sale opens in
/// `opens_in_secs` (negative: it is on) and runs for an hour.
pub fn event_body(opens_in_secs: i64) -> Value {
    let now = chrono::Utc::now();
    json!({
        "name": "API test", "venue": "Hall",
        "starts_at": now + chrono::Duration::days(1),
        "sale_opens_at": now + chrono::Duration::seconds(opens_in_secs),
        "sale_closes_at": now + chrono::Duration::seconds(opens_in_secs + 3600),
        "capacity": 5, "price_cents": 1200, "currency": "EUR",
        "per_user_limit": 2, "hold_ttl_secs": 60,
    })
}

/// Creates an event through the ingress at `api`; its id.
pub async fn create_event(http: &reqwest::Client, api: &str, admin_token: &str, body: &Value) -> u64 {
    let r = http.post(format!("{api}/v1/admin/events")).bearer_auth(admin_token).json(body).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    r.json::<Value>().await.unwrap()["id"].as_u64().unwrap()
}

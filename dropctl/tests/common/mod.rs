//! A whole Dropline deployment inside the test process: the five stages,
//! the payment simulator and the host's webhook receiver, on the real local
//! Redis, MariaDB and broker, with a database, topic prefix and consumer
//! groups of its own; and the stages as processes, for the scenarios that
//! kill them.

#![allow(dead_code)]

use std::ops::Deref;
use std::time::Duration;

use clap::Parser;
use dropline::config::KafkaArgs;
use dropline::kafka::{Publisher, WhenFull};
use dropline::messages::Topics;
use dropline_testkit::Deployment;
// Shared with the other crates' tests; each test here uses some.
#[allow(unused_imports)]
pub use dropline_testkit::{brokers, eventually, eventually_or, mysql_server, redis, redis_url, Secrets};
use sqlx::MySqlPool;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct KafkaOnly {
    #[command(flatten)]
    kafka: KafkaArgs,
}

#[derive(Parser)]
struct PipelineOnly {
    #[command(flatten)]
    pipeline: dropctl::quiet::PipelineArgs,
}

/// A deployment's broker and consumer groups, as the tests name them
/// (`<name>-allocator` and so on), for the drill's wait.
pub fn pipeline(brokers: &str, name: &str) -> dropctl::quiet::PipelineArgs {
    PipelineOnly::parse_from([
        "pipeline".to_owned(),
        format!("--kafka-brokers={brokers}"),
        format!("--topic-prefix={name}"),
        format!("--allocator-group={name}-allocator"),
        format!("--settler-group={name}-settler"),
        format!("--expirer-group={name}-expirer"),
        format!("--notifier-group={name}-notifier"),
    ])
    .pipeline
}

/// The five stages, the payment simulator and the webhook receiver on a
/// [`Deployment`] of their own (its database, prefixes and secrets are the
/// stack's, through `Deref`).
pub struct Stack {
    deployment: Deployment,
    pub api: String,
    pub paysim: String,
    /// What the host's endpoint received from the notifier.
    pub inbox: std::sync::Arc<dropctl::receiver::Inbox>,
    pub topics: Topics,
    pub kafka: KafkaArgs,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    stages: Vec<(&'static str, CancellationToken, JoinHandle<()>)>,
    expirer_config: Option<dropline_expirer::ExpirerConfig>,
}

#[derive(Default)]
pub struct Options {
    /// More ingress flags; one replaces the default of the same name.
    pub ingress_args: Vec<String>,
    /// More notifier flags, likewise.
    pub notifier_args: Vec<String>,
}

impl Stack {
    pub async fn start(options: Options) -> Stack {
        let deployment = Deployment::create().await;
        let name = deployment.name.clone();
        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api_addr = listener.local_addr().unwrap();
        let paysim = dropline_paysim::start(
            dropline_paysim::PaysimConfig::parse_from([
                "paysim",
                "--listen-addr=127.0.0.1:0",
                &format!("--webhook-url=http://{api_addr}/v1/webhooks/payments"),
                &format!("--webhook-secret={}", deployment.secrets.webhook),
                "--max-attempts=3",
            ]),
            shutdown.clone(),
        )
        .await
        .unwrap();

        let ingress_args: Vec<String> = [format!("--payment-provider-url=http://{}", paysim.addr)]
            .into_iter()
            .chain(options.ingress_args)
            .collect();
        let ingress_config = dropline_ingress::IngressConfig::parse_from(deployment.ingress_args(&ingress_args));
        let ingress = dropline_ingress::start_on(listener, ingress_config, shutdown.clone()).await.unwrap();
        tasks.push(tokio::spawn(async move {
            let _ = ingress.task.await;
        }));

        let common = deployment.stage_args();
        let [redis, redis_prefix] = deployment.redis_args();
        let group = |stage: &str| format!("--group-id={name}-{stage}");
        let allocator = dropline_allocator::AllocatorConfig::parse_from(
            ["allocator".to_owned(), group("allocator"), redis.clone(), redis_prefix.clone()]
                .into_iter()
                .chain(common.iter().cloned()),
        );
        let settler = dropline_settler::SettlerConfig::parse_from(
            [
                "settler".to_owned(),
                group("settler"),
                format!("--mysql-url={}", deployment.mysql_url()),
                redis.clone(),
                redis_prefix.clone(),
                "--batch-linger-ms=5".to_owned(),
                "--drift-interval-secs=1".to_owned(),
                "--rebuild-grace-ms=3000".to_owned(),
                format!("--payment-provider-url=http://{}", paysim.addr),
                "--refund-poll-ms=100".to_owned(),
                "--refund-retry-base-ms=200".to_owned(),
                "--milestone-poll-ms=100".to_owned(),
            ]
            .into_iter()
            .chain(common.iter().cloned()),
        );
        let expirer = dropline_expirer::ExpirerConfig::parse_from(
            ["expirer".to_owned(), group("expirer"), redis, redis_prefix, "--tick-ms=50".to_owned()]
                .into_iter()
                .chain(common.iter().cloned()),
        );
        let receiver = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let receiver_addr = receiver.local_addr().unwrap();
        let notify_secret = deployment.secrets.notify.clone();
        let inbox = std::sync::Arc::new(dropctl::receiver::Inbox::default());
        tasks.push(tokio::spawn(dropctl::receiver::serve(
            receiver,
            notify_secret.clone().into_bytes(),
            inbox.clone(),
            shutdown.clone(),
        )));
        let notifier_defaults = [
            group("notifier"),
            format!("--mysql-url={}", deployment.mysql_url()),
            format!("--notify-url=http://{receiver_addr}/webhooks"),
            format!("--notify-secret={notify_secret}"),
            "--tick-ms=20".to_owned(),
            "--backoff-base-ms=50".to_owned(),
            "--backoff-max-ms=500".to_owned(),
            "--max-attempts=100".to_owned(),
            "--attempt-timeout-ms=2000".to_owned(),
        ]
        .into_iter()
        .chain(common.iter().cloned());
        let notifier = dropline_notifier::NotifierConfig::parse_from(
            ["notifier".to_owned()]
                .into_iter()
                .chain(dropline_testkit::with_overrides(notifier_defaults, &options.notifier_args)),
        );
        let mut stages = Vec::new();
        let s = shutdown.child_token();
        let t = tokio::spawn({
            let s = s.clone();
            async move { dropline_notifier::run(notifier, s).await.unwrap() }
        });
        stages.push(("notifier", s, t));
        let s = shutdown.child_token();
        let t = tokio::spawn({
            let s = s.clone();
            async move { dropline_allocator::run(allocator, s).await.unwrap() }
        });
        stages.push(("allocator", s, t));
        let s = shutdown.child_token();
        let t = tokio::spawn({
            let s = s.clone();
            async move { dropline_settler::run(settler, s).await.unwrap() }
        });
        stages.push(("settler", s, t));
        let kafka = KafkaOnly::parse_from(["kafka".to_owned()].into_iter().chain(common[..3].iter().cloned())).kafka;
        let mut stack = Stack {
            api: format!("http://{api_addr}"),
            paysim: format!("http://{}", paysim.addr),
            inbox,
            topics: kafka.topics(),
            kafka,
            deployment,
            shutdown,
            tasks,
            stages,
            expirer_config: Some(expirer),
        };
        stack.start_expirer();
        stack
    }

    /// Starts (again) the expirer, in the same consumer group.
    pub fn start_expirer(&mut self) {
        let Some(config) = self.expirer_config.clone() else { return };
        let s = self.shutdown.child_token();
        let t = tokio::spawn({
            let s = s.clone();
            async move { dropline_expirer::run(config, s).await.unwrap() }
        });
        self.stages.push(("expirer", s, t));
    }

    /// Drains one stage as SIGTERM would, and waits until it has stopped.
    pub async fn stop_stage(&mut self, name: &str) {
        let i = self.stages.iter().position(|(n, _, _)| *n == name).expect("a running stage");
        let (_, token, task) = self.stages.remove(i);
        token.cancel();
        tokio::time::timeout(Duration::from_secs(30), task).await.expect("the stage drains in time").unwrap();
    }

    /// The stack's broker and consumer groups.
    pub fn pipeline(&self) -> dropctl::quiet::PipelineArgs {
        pipeline(&self.kafka.brokers, &self.name)
    }

    /// The checked books of `event` once its deadlines have passed and the
    /// pipeline is quiet, the provider's refunds compared: every row must
    /// hold.
    pub async fn books_balance(&self, event: u64) -> dropctl::invariants::Verdict {
        let quiet = dropctl::quiet::Quiet {
            pipeline: Some(self.pipeline()),
            past_deadlines: true,
            grace: dropctl::invariants::production_grace(),
            timeout: Duration::from_secs(90),
        };
        assert!(dropctl::quiet::wait_quiet(&self.db, event, &quiet).await.unwrap(), "event {event} never went quiet");
        let options = dropctl::invariants::CheckOptions { provider: Some(self.paysim.clone()), ..Default::default() };
        let verdict = dropctl::invariants::verify(&self.db, &self.ledger, event, &options).await.unwrap();
        assert!(verdict.all_hold(), "{verdict}");
        verdict
    }

    /// The types of the webhooks the host received that `keep` selects, in
    /// the order they arrived, once there are `count` of them (within 60 s).
    pub async fn told(&self, count: usize, keep: impl Fn(&dropctl::receiver::Delivered) -> bool) -> Vec<String> {
        eventually(&format!("{count} webhooks"), Duration::from_secs(60), || async {
            let kinds: Vec<String> = self.inbox.deliveries().into_iter().filter(|d| keep(d)).map(|d| d.kind).collect();
            (kinds.len() >= count).then_some(kinds)
        })
        .await
    }

    /// Redis loses the event's ledger: its stock, buyers, decisions, holds
    /// and free units.
    pub async fn lose_ledger(&self, event: u64) {
        let keys = dropline::stock::EventKeys::new(&self.name, event);
        let mut conn = self.ledger.pool().get().await.unwrap();
        let _: i64 = dropline::redis_pool::redis::cmd("DEL")
            .arg(&[&keys.stock, &keys.users, &keys.decisions, &keys.holds, &keys.free])
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(self.ledger.levels(event).await.unwrap(), None);
    }

    /// `user` opens a payment for their held order: the answer (checkout
    /// URL, payment id, pay_before).
    pub async fn start_payment(&self, user: &str, order: uuid::Uuid) -> serde_json::Value {
        let r = dropline_testkit::http()
            .post(format!("{}/v1/orders/{order}/payments", self.api))
            .bearer_auth(self.token(user))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), reqwest::StatusCode::CREATED);
        r.json().await.unwrap()
    }

    /// A publisher on the stack's broker, for records a test writes
    /// straight to a topic (duplicates, poison).
    pub fn publisher(&self) -> Publisher {
        Publisher::new(&self.kafka, "test-producer", WhenFull::Wait).unwrap()
    }

    /// The first `count` messages on the stack's dead-letter topic (each
    /// within 30 s).
    pub async fn dead_letters(&self, count: usize) -> Vec<rdkafka::message::OwnedMessage> {
        use rdkafka::consumer::{Consumer, StreamConsumer};
        let consumer: StreamConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &self.kafka.brokers)
            .set("group.id", format!("{}-dlq-reader", self.name))
            .set("auto.offset.reset", "earliest")
            .create()
            .unwrap();
        consumer.subscribe(&[&self.topics.dead_letter]).unwrap();
        let mut out = Vec::new();
        while out.len() < count {
            let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await.expect("a dead letter");
            out.push(m.unwrap().detach());
        }
        out
    }

    /// Stops every stage (a graceful drain) and drops the test database.
    /// An event on sale since a few seconds ago, for an hour; two units
    /// per buyer at most.
    pub async fn open_event(&self, capacity: u32, hold_ttl_secs: u32) -> u64 {
        let now = chrono::Utc::now();
        let body = serde_json::json!({
            "name": "Pipeline test", "venue": "Test Hall",
            "starts_at": now + chrono::Duration::days(1),
            "sale_opens_at": now - chrono::Duration::seconds(5),
            "sale_closes_at": now + chrono::Duration::hours(1),
            "capacity": capacity, "price_cents": 1000, "currency": "EUR",
            "per_user_limit": 2, "hold_ttl_secs": hold_ttl_secs,
        });
        let api = dropctl::api::Api::new(&self.api).unwrap();
        let event = api.create_event(&self.admin_token(), &body).await.unwrap();
        event["id"].as_u64().unwrap()
    }

    /// Waits until the settlers recorded the event's sale as opened: its
    /// first change, which a test's own changes then come after.
    pub async fn wait_opened(&self, event: u64) {
        eventually("the sale's opening recorded", Duration::from_secs(30), || async {
            let opened: Option<chrono::DateTime<chrono::Utc>> =
                sqlx::query_scalar("SELECT opened_at FROM events WHERE id = ?")
                    .bind(event)
                    .fetch_one(&self.db)
                    .await
                    .unwrap();
            opened.map(|_| ())
        })
        .await
    }

    /// Gives `event` a waiting room on `terms` (as the admin API takes
    /// them); the answer's status.
    pub async fn set_room(&self, event: u64, terms: &serde_json::Value) -> reqwest::StatusCode {
        dropline_testkit::http()
            .put(format!("{}/v1/admin/events/{event}/waiting-room", self.api))
            .bearer_auth(self.admin_token())
            .json(terms)
            .send()
            .await
            .unwrap()
            .status()
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks.into_iter().chain(self.stages.into_iter().map(|(_, _, t)| t)) {
            tokio::time::timeout(Duration::from_secs(30), t).await.expect("stages drain in time").unwrap();
        }
        self.deployment.drop_database().await;
    }
}

impl Deref for Stack {
    type Target = Deployment;

    fn deref(&self) -> &Deployment {
        &self.deployment
    }
}

/// A copy of every Redis key matching `pattern`, as a lagging replica
/// would have them: value and expiry (a fence's lease, say, must still run
/// out after a roll-back). On a Redis Cluster, of every primary.
pub async fn redis_snapshot(pool: &dropline::redis_pool::Pool, pattern: &str) -> Vec<RedisKeyCopy> {
    let mut conn = pool.get().await.unwrap();
    let keys = conn.keys_matching(pattern).await.unwrap();
    let mut out = Vec::new();
    for key in keys {
        let (dump, expires_at_ms): (Option<Vec<u8>>, i64) = dropline::redis_pool::redis::pipe()
            .atomic()
            .cmd("DUMP")
            .arg(&key)
            .cmd("PEXPIRETIME")
            .arg(&key)
            .query_async(&mut *conn)
            .await
            .unwrap();
        out.extend(dump.map(|dump| RedisKeyCopy { key, dump, expires_at_ms }));
    }
    out
}

/// One key of a [`redis_snapshot`]; `expires_at_ms` is a Unix time, or
/// negative for none.
pub struct RedisKeyCopy {
    key: String,
    dump: Vec<u8>,
    expires_at_ms: i64,
}

/// A key's hash tag (what Redis Cluster hashes), or the whole key.
fn hash_tag(key: &str) -> &str {
    match key.split_once('{').and_then(|(_, rest)| rest.split_once('}')) {
        Some((tag, _)) if !tag.is_empty() => tag,
        _ => key,
    }
}

/// Puts a snapshot back: Redis forgets every write since, as after a
/// failover to a replica that had not received them. Keys keep their
/// expiry time; one already past is gone. On one Redis every key changes at
/// once, in one transaction; on a cluster, each hash tag's keys (an event's
/// ledger) do, as a node that failed over loses its own writes.
pub async fn redis_roll_back(pool: &dropline::redis_pool::Pool, pattern: &str, snapshot: &[RedisKeyCopy]) {
    let mut conn = pool.get().await.unwrap();
    let now = conn.keys_matching(pattern).await.unwrap();
    let one_node = matches!(*conn, dropline::redis_pool::Link::Single(_));
    let group = |key: &str| if one_node { String::new() } else { hash_tag(key).to_owned() };
    let transaction = || {
        let mut pipe = dropline::redis_pool::redis::pipe();
        pipe.atomic();
        pipe
    };
    let mut pipes: std::collections::BTreeMap<String, dropline::redis_pool::redis::Pipeline> = Default::default();
    for key in now.iter().filter(|k| !snapshot.iter().any(|c| c.key == **k)) {
        pipes.entry(group(key)).or_insert_with(transaction).del(key).ignore();
    }
    for copy in snapshot {
        // With ABSTTL, 0 means no expiry.
        let at = copy.expires_at_ms.max(0);
        let pipe = pipes.entry(group(&copy.key)).or_insert_with(transaction);
        pipe.cmd("RESTORE").arg(&copy.key).arg(at).arg(&copy.dump).arg("REPLACE").arg("ABSTTL").ignore();
    }
    for pipe in pipes.values() {
        let _: () = pipe.query_async(&mut *conn).await.unwrap();
    }
}

/// Dropline's binaries (and other servers) as real processes, for the tests
/// that need separate processes: the monitoring test and the fault scenarios.
pub mod process {
    use std::path::{Path, PathBuf};
    use std::process::Stdio;
    use std::time::Duration;

    use tokio::process::{Child, Command};

    pub fn repo() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    /// target/debug, next to this test binary (target/debug/deps/...).
    pub fn bin_dir() -> PathBuf {
        std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().to_owned()
    }

    /// A port free now that no other process of this test binary was given.
    /// Scenarios run in parallel and restart their processes on the ports
    /// they were given, so a port free now may be one that another
    /// scenario's broker or database is about to take back: handed out
    /// twice, one of the two processes dies of "address in use" (seen in
    /// CI: a scenario's broker, while its stages waited on whatever held
    /// its port).
    pub fn free_port() -> u16 {
        static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
            std::sync::Mutex::new(std::collections::BTreeSet::new());
        loop {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            if GIVEN.lock().unwrap().insert(port) {
                return port;
            }
        }
    }

    pub struct Process {
        pub name: &'static str,
        pub child: Child,
    }

    impl Process {
        /// SIGTERM, as Kubernetes would, then wait for a clean drain.
        pub async fn terminate(self) {
            let name = self.name;
            let exit = self.stop(Duration::from_secs(30)).await;
            assert!(exit.success(), "{name} exits cleanly after SIGTERM: {exit}");
        }

        /// SIGTERM, then the exit status, which must come within `limit`.
        pub async fn stop(mut self, limit: Duration) -> std::process::ExitStatus {
            let pid = self.child.id().expect("still running");
            let status = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status().unwrap();
            assert!(status.success());
            let exit = tokio::time::timeout(limit, self.child.wait()).await;
            let exit = exit.unwrap_or_else(|_| panic!("{} still running {limit:?} after SIGTERM", self.name));
            exit.unwrap()
        }
    }

    pub fn spawn(name: &'static str, program: PathBuf, env: &[(&str, String)], args: &[String]) -> Process {
        spawn_in(name, program, env, args, None)
    }

    /// [`spawn`], its log lines appended to `log` (a stage restarted after
    /// a kill goes on in the same file), for a failing test to show.
    pub fn spawn_logged(
        name: &'static str,
        program: PathBuf,
        env: &[(&str, String)],
        log: &std::path::Path,
    ) -> Process {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        spawn_with(name, program, env, &[], None, |cmd| {
            cmd.stdout(file);
        })
    }

    /// [`spawn`], in the working directory `cwd`.
    pub fn spawn_in(
        name: &'static str,
        program: PathBuf,
        env: &[(&str, String)],
        args: &[String],
        cwd: Option<&std::path::Path>,
    ) -> Process {
        spawn_with(name, program, env, args, cwd, |_| {})
    }

    fn spawn_with(
        name: &'static str,
        program: PathBuf,
        env: &[(&str, String)],
        args: &[String],
        cwd: Option<&std::path::Path>,
        configure: impl FnOnce(&mut Command),
    ) -> Process {
        assert!(
            !program.is_absolute() || program.exists(),
            "{} is missing: run `cargo build --bins` first (scripts/test.sh does)",
            program.display()
        );
        let mut cmd = Command::new(program);
        cmd.args(args).kill_on_drop(true).stderr(Stdio::inherit());
        if std::env::var_os("DROPLINE_TEST_STAGE_LOGS").is_none() {
            cmd.stdout(Stdio::null());
        }
        if let Some(dir) = cwd {
            cmd.current_dir(dir);
        }
        configure(&mut cmd);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Process { name, child: cmd.spawn().unwrap() }
    }

    impl Process {
        /// SIGKILL: no drain, no offset commit, as a crash would.
        pub async fn kill9(mut self) {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
    }

    /// A MariaDB server of one test's own, on a data directory under the
    /// test's directory: for the scenarios that crash the database, which
    /// the shared server must never be. Root logs in over TCP without a
    /// password, as on the shared one.
    pub struct Mariadb {
        pub port: u16,
        dir: PathBuf,
        server: Option<Process>,
    }

    impl Mariadb {
        /// Initialises a data directory in `dir` and starts the server on a
        /// free port.
        pub async fn start(dir: &Path) -> Mariadb {
            let out = Command::new("mariadb-install-db")
                // --no-defaults must come first, or /etc/mysql is read.
                .arg("--no-defaults")
                .arg(format!("--datadir={}", dir.join("mysql").display()))
                .args(["--auth-root-authentication-method=normal", "--skip-test-db"])
                .args(Self::tuning())
                .output()
                .await
                .expect("mariadb-install-db runs (apt-get install mariadb-server)");
            assert!(out.status.success(), "mariadb-install-db failed: {}", String::from_utf8_lossy(&out.stderr));
            let mut mariadb = Mariadb { port: free_port(), dir: dir.to_owned(), server: None };
            mariadb.run().await;
            mariadb
        }

        /// The server part of its URL, without a database.
        pub fn url(&self) -> String {
            format!("mysql://root@127.0.0.1:{}", self.port)
        }

        /// Starts the server on its data directory and port (after a crash:
        /// InnoDB recovers first) and waits until root can log in.
        pub async fn run(&mut self) {
            assert!(self.server.is_none(), "the server is already running");
            let dir = &self.dir;
            let mariadbd = PathBuf::from("/usr/sbin/mariadbd");
            let args = [
                "--no-defaults".to_owned(),
                format!("--datadir={}", dir.join("mysql").display()),
                format!("--port={}", self.port),
                "--bind-address=127.0.0.1".to_owned(),
                format!("--socket={}", dir.join("mysql.sock").display()),
                format!("--pid-file={}", dir.join("mysql.pid").display()),
                format!("--log-error={}", dir.join("mysql.err").display()),
                // install-db granted root@127.0.0.1; no DNS lookups per connection.
                "--skip-name-resolve".to_owned(),
            ];
            let args: Vec<String> = args.into_iter().chain(Self::tuning()).collect();
            let program = if mariadbd.exists() { mariadbd } else { PathBuf::from("mariadbd") };
            self.server = Some(spawn_in("mariadb", program, &[], &args, Some(dir)));
            let url = self.url();
            super::eventually("mariadb up", Duration::from_secs(60), || {
                let url = url.clone();
                async move {
                    use sqlx::Connection;
                    sqlx::MySqlConnection::connect(&url).await.ok()?.close().await.ok()
                }
            })
            .await;
        }

        /// SIGKILL: a crash, with every connection cut and whatever was not
        /// committed lost.
        pub async fn kill9(&mut self) {
            self.server.take().expect("a running server").kill9().await;
        }

        /// Options for both the bootstrap and the server: a small footprint
        /// that starts fast (and a table cache small enough not to ask for
        /// more open files than the limit allows), and as root (mariadbd
        /// refuses to run as root unless told) the current user.
        fn tuning() -> Vec<String> {
            let mut args: Vec<String> =
                ["--innodb-buffer-pool-size=16M", "--innodb-log-file-size=8M", "--table-open-cache=400"]
                    .map(String::from)
                    .into();
            let root = std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0);
            if root {
                args.push("--user=root".to_owned());
            }
            args
        }
    }
}

/// The drop every fault scenario runs, at `scale` times the CI size:
/// payers, late payers (whose money must be recorded for refund),
/// cancellers and walk-aways, with every payment webhook sent three times.
/// Checked with the production grace, once the pipeline at `brokers` under
/// topic prefix and group names `name` has caught up, its refunds compared
/// with those of the provider at `provider`.
pub fn fault_drop(scenario: &str, scale: u32, brokers: &str, name: &str, provider: &str) -> dropctl::drill::DropPlan {
    dropctl::drill::DropPlan {
        tickets: 25 * scale,
        oversell_allowance: 0,
        buyers: 75 * scale,
        concurrency: 6 * scale as usize,
        hold_ttl_secs: 8,
        per_user_limit: 2,
        pay_share: 0.4,
        cancel_share: 0.25,
        late_pay_share: 0.1,
        payment_trouble_share: 0.1,
        paid_cancel_share: 0.1,
        webhook_copies: 3,
        user_prefix: format!("{scenario}-"),
        // The production grace: a shorter one in the settler would end
        // holds an expirer lost before the check could see them late.
        grace: dropctl::invariants::production_grace(),
        pipeline: Some(pipeline(brokers, name)),
        provider: Some(provider.to_owned()),
        room: None,
    }
}

/// Waits until a drop's flood is under way: some intents decided and
/// recorded, with most of the crowd still to come.
pub async fn flood_under_way(db: &MySqlPool) {
    intents_recorded(db, 10).await;
}

/// Waits until the settler has recorded at least `count` decided intents.
pub async fn intents_recorded(db: &MySqlPool, count: i64) {
    eventually(&format!("{count} intents recorded"), Duration::from_secs(60), || async move {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM intents").fetch_one(db).await.ok()?;
        (n >= count).then_some(())
    })
    .await;
}

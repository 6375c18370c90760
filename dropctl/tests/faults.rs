//! Fault scenarios: a drop runs while a stage is killed with SIGKILL (no
//! drain, no offset commit) and restarted, or while Redis, the broker or
//! MariaDB fails; after the pipeline settles, every invariant must hold.
//!
//! Each scenario runs its own Redis (append-only file, fsync always) and
//! its own broker (tansu with sqlite storage, which survives a restart) on
//! free ports, plus its own database on the shared MariaDB (or, for the
//! scenario that crashes it, a MariaDB server of its own), so restarting
//! or flushing them never disturbs other tests. The services run as real
//! processes (`cargo build --bins` first; scripts/test.sh does).
//!
//! Every scenario prints its table of invariants; `scripts/faults.sh` runs
//! the full version (a drop eight times larger) one scenario at a time.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use common::process::{bin_dir, free_port, spawn, spawn_in, spawn_logged, Mariadb, Process};
use common::{eventually, Secrets};
use dropctl::api::Api;
use dropctl::drill::{self, DropReport};
use dropline::stock::Ledger;

const STAGES: [&str; 5] = ["ingress", "allocator", "settler", "expirer", "notifier"];

/// The stages' drain timeout here: shorter than the default, so the
/// scenario that outlasts it stays short.
const DRAIN_TIMEOUT_SECS: u64 = 10;

#[derive(Default)]
struct ClusterOptions {
    /// Run a MariaDB server of the cluster's own instead of a database on
    /// the shared one, for scenarios that stop it.
    private_mariadb: bool,
}

#[derive(Clone, Copy)]
enum Service {
    Redis,
    Broker,
}

struct Cluster {
    name: String,
    secrets: Secrets,
    dir: PathBuf,
    db_url: String,
    redis_port: u16,
    kafka_port: u16,
    api_port: u16,
    paysim_port: u16,
    ops: BTreeMap<&'static str, u16>,
    redis: Option<Process>,
    broker: Option<Process>,
    mariadb: Option<Mariadb>,
    stages: BTreeMap<&'static str, Process>,
    _paysim: Process,
    /// The host's endpoint, in the test process: what the notifier
    /// delivered, each webhook id once.
    inbox: std::sync::Arc<dropctl::receiver::Inbox>,
    receiver_port: u16,
    stop_receiver: tokio_util::sync::CancellationToken,
}

impl Cluster {
    async fn start() -> Cluster {
        Cluster::start_with(ClusterOptions::default()).await
    }

    async fn start_with(options: ClusterOptions) -> Cluster {
        dropline::telemetry::init_logs();
        let name = format!("f{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let dir = std::env::temp_dir().join(format!("dropline-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mariadb = if options.private_mariadb { Some(Mariadb::start(&dir).await) } else { None };
        let server = mariadb.as_ref().map_or_else(common::mysql_server, Mariadb::url);
        let db_url = format!("{server}/dropline_{name}");
        dropline::db::create_database(&db_url).await.unwrap();
        let (api_port, paysim_port) = (free_port(), free_port());
        let secrets = Secrets::generate();
        let paysim = spawn(
            "paysim",
            bin_dir().join("dropline-paysim"),
            &[
                ("DROPLINE_LOG", "warn".into()),
                ("DROPLINE_PAYSIM_LISTEN_ADDR", format!("127.0.0.1:{paysim_port}")),
                ("DROPLINE_PAYSIM_WEBHOOK_URL", format!("http://127.0.0.1:{api_port}/v1/webhooks/payments")),
                ("DROPLINE_WEBHOOK_SECRET", secrets.webhook.clone()),
            ],
            &[],
        );
        let receiver = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let receiver_port = receiver.local_addr().unwrap().port();
        let inbox = std::sync::Arc::new(dropctl::receiver::Inbox::default());
        let stop_receiver = tokio_util::sync::CancellationToken::new();
        tokio::spawn(dropctl::receiver::serve(
            receiver,
            secrets.notify.clone().into_bytes(),
            inbox.clone(),
            stop_receiver.clone(),
        ));
        let mut cluster = Cluster {
            name,
            secrets,
            dir,
            db_url,
            redis_port: free_port(),
            kafka_port: free_port(),
            api_port,
            paysim_port,
            ops: STAGES.into_iter().map(|s| (s, free_port())).collect(),
            redis: None,
            broker: None,
            mariadb,
            stages: BTreeMap::new(),
            _paysim: paysim,
            inbox,
            receiver_port,
            stop_receiver,
        };
        cluster.start_redis().await;
        cluster.start_broker().await;
        for stage in STAGES {
            cluster.start_stage(stage);
        }
        cluster.wait_ready().await;
        cluster
    }

    /// Waits for every stage to report ready; past a minute, fails with
    /// the last log lines of those that did not.
    async fn wait_ready(&self) {
        let waiting = std::sync::Mutex::new(Vec::new());
        let probe = || async {
            let mut not_ready = Vec::new();
            for (stage, port) in &self.ops {
                let answer = reqwest::get(format!("http://127.0.0.1:{port}/readyz")).await;
                if !answer.is_ok_and(|a| a.status().is_success()) {
                    not_ready.push(*stage);
                }
            }
            let done = not_ready.is_empty();
            *waiting.lock().unwrap() = not_ready;
            done.then_some(())
        };
        let explain = || {
            let waiting = waiting.lock().unwrap().clone();
            let logs: Vec<String> = waiting
                .iter()
                .map(|stage| {
                    let log = std::fs::read_to_string(self.dir.join(format!("{stage}.log"))).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(15).collect();
                    format!("{stage}:\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
                })
                .collect();
            format!("not ready: {waiting:?}\n{}", logs.join("\n"))
        };
        common::eventually_or("every stage ready", Duration::from_secs(60), probe, explain).await;
    }

    /// kill -9 of one of the cluster's services, then a start on its own
    /// data a moment later.
    async fn crash_and_restart(mut self, service: Service) -> Self {
        let process = match service {
            Service::Redis => self.redis.take(),
            Service::Broker => self.broker.take(),
        };
        process.expect("the service is running").kill9().await;
        // The outage itself, not a wait for a condition: kill9 has already
        // reaped the process, and the restart below waits for readiness.
        tokio::time::sleep(Duration::from_millis(300)).await;
        match service {
            Service::Redis => self.start_redis().await,
            Service::Broker => self.start_broker().await,
        }
        self
    }

    async fn start_redis(&mut self) {
        let port = self.redis_port;
        self.redis = Some(spawn_in(
            "redis",
            PathBuf::from("redis-server"),
            &[],
            &[
                format!("--port {port}"),
                "--bind 127.0.0.1".into(),
                "--save \"\"".into(),
                "--appendonly yes".into(),
                "--appendfsync always".into(),
            ]
            .iter()
            .flat_map(|a| a.split(' ').map(|s| s.trim_matches('"').to_owned()))
            .collect::<Vec<_>>(),
            Some(&self.dir),
        ));
        eventually("redis up", Duration::from_secs(20), || async move {
            let client = dropline::redis_pool::redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
            let mut conn = client.get_multiplexed_async_connection().await.ok()?;
            dropline::redis_pool::redis::cmd("PING").query_async::<String>(&mut conn).await.ok()
        })
        .await;
    }

    async fn start_broker(&mut self) {
        let port = self.kafka_port;
        let url = format!("tcp://127.0.0.1:{port}");
        let tansu = std::env::var("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/tansu")).unwrap();
        self.broker = Some(spawn_in(
            "tansu",
            if tansu.exists() { tansu } else { PathBuf::from("tansu") },
            &[],
            &[
                "broker".into(),
                format!("--listener-url={url}"),
                format!("--advertised-listener-url={url}"),
                "--storage-engine=sqlite://tansu.db".into(),
            ],
            Some(&self.dir),
        ));
        eventually("broker up", Duration::from_secs(20), || async move {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
        })
        .await;
    }

    fn env(&self, stage: &str) -> Vec<(&'static str, String)> {
        let name = &self.name;
        let mut env = vec![
            // To the stage's log file in the scenario's folder, shown if it fails.
            ("DROPLINE_LOG", std::env::var("DROPLINE_TEST_STAGE_LOGS").unwrap_or_else(|_| "info".into())),
            ("DROPLINE_KAFKA_BROKERS", format!("127.0.0.1:{}", self.kafka_port)),
            ("DROPLINE_KAFKA_FETCH_WAIT_MAX_MS", "10".into()),
            ("DROPLINE_TOPIC_PREFIX", name.clone()),
            ("DROPLINE_TOPIC_PARTITIONS", "2".into()),
            ("DROPLINE_REDIS_URL", format!("redis://127.0.0.1:{}", self.redis_port)),
            ("DROPLINE_REDIS_KEY_PREFIX", name.clone()),
            ("DROPLINE_MYSQL_URL", self.db_url.clone()),
            ("DROPLINE_OPS_ADDR", format!("127.0.0.1:{}", self.ops[stage])),
            ("DROPLINE_ALLOCATOR_GROUP", format!("{name}-allocator")),
            ("DROPLINE_SETTLER_GROUP", format!("{name}-settler")),
            ("DROPLINE_EXPIRER_GROUP", format!("{name}-expirer")),
            ("DROPLINE_NOTIFIER_GROUP", format!("{name}-notifier")),
            ("DROPLINE_SETTLER_DRIFT_INTERVAL_SECS", "1".into()),
            ("DROPLINE_EXPIRER_TICK_MS", "50".into()),
            ("DROPLINE_NOTIFY_URL", format!("http://127.0.0.1:{}/webhooks", self.receiver_port)),
            ("DROPLINE_NOTIFIER_TICK_MS", "20".into()),
            ("DROPLINE_NOTIFIER_BACKOFF_BASE_MS", "50".into()),
            ("DROPLINE_NOTIFIER_BACKOFF_MAX_MS", "1000".into()),
            ("DROPLINE_DRAIN_TIMEOUT_SECS", DRAIN_TIMEOUT_SECS.to_string()),
        ];
        env.extend(self.secrets.env());
        if stage != "ingress" {
            env.push(("DROPLINE_KAFKA_GROUP_INSTANCE_ID", format!("{name}-{stage}-0")));
        }
        if stage == "ingress" {
            // Every buyer k6 plays comes from 127.0.0.1.
            env.push(("DROPLINE_IP_PER_SEC", "1000000".into()));
            env.push(("DROPLINE_IP_BURST", "1000000".into()));
            env.push(("DROPLINE_LISTEN_ADDR", format!("127.0.0.1:{}", self.api_port)));
            // The drop's holds last 8 s: starting to pay adds 3 s.
            env.push(("DROPLINE_PAYMENT_HOLD_EXTENSION_SECS", "3".into()));
        }
        if stage == "ingress" || stage == "settler" {
            env.push(("DROPLINE_PAYMENT_PROVIDER_URL", format!("http://127.0.0.1:{}", self.paysim_port)));
        }
        env
    }

    fn start_stage(&mut self, stage: &'static str) {
        let log = self.dir.join(format!("{stage}.log"));
        let process = spawn_logged(stage, bin_dir().join(format!("dropline-{stage}")), &self.env(stage), &log);
        self.stages.insert(stage, process);
    }

    async fn kill9(&mut self, stage: &str) {
        self.stages.remove(stage).expect("a running stage").kill9().await;
    }

    fn ledger(&self) -> Ledger {
        let pool =
            dropline::config::RedisArgs::new(format!("redis://127.0.0.1:{}", self.redis_port), 16).pool().unwrap();
        Ledger::new(pool, &self.name)
    }

    /// Runs a drop while `fault` happens a moment after it starts, then
    /// checks the books.
    async fn drop_with<F, Fut>(mut self, scenario: &str, fault: F) -> DropReport
    where
        F: FnOnce(Self) -> Fut,
        Fut: std::future::Future<Output = Self>,
    {
        let keys = self.secrets.tokens();
        let db = dropline::db::connect(&dropline::config::MysqlArgs::new(self.db_url.clone(), 3)).await.unwrap();
        let ledger = self.ledger();
        let api = Api::new(&format!("http://127.0.0.1:{}", self.api_port)).unwrap();
        // CI runs the short version; scripts/faults.sh the full one.
        let scale: u32 = std::env::var("DROPLINE_FAULTS_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
        let plan = common::fault_drop(
            scenario,
            scale,
            &format!("127.0.0.1:{}", self.kafka_port),
            &self.name,
            &format!("http://127.0.0.1:{}", self.paysim_port),
        );
        let probe = db.clone();
        let drop = tokio::spawn(async move { drill::run(&api, &keys, &db, &ledger, &plan).await });
        // Strike mid-flood.
        common::flood_under_way(&probe).await;
        self = fault(self).await;
        let report = drop.await.unwrap().unwrap_or_else(|e| panic!("{scenario}: the drop failed: {e:#}"));
        let verdict = report.verdict.clone().expect("a verdict");
        println!("{scenario}: invariants\n{verdict}");
        assert!(report.passed(), "{scenario}: {report:#?}\n{verdict}");
        // The host got every change of the sale once, whatever was
        // repeated (a notifier killed after a send and before its record
        // sends it again, under the same id, which the receiver drops).
        let changes = self
            .inbox
            .deliveries()
            .iter()
            .filter(|d| d.event_id == report.event_id && d.kind != dropline::messages::REMINDER_KIND)
            .count() as u64;
        let m = &verdict.mysql;
        assert_eq!(
            changes,
            m.order_changes - m.changes_dead_lettered,
            "{scenario}: {:?}\n{verdict}",
            self.inbox.summary()
        );
        assert_eq!(self.inbox.summary().bad_signatures, 0);
        println!("{scenario}: the host received {changes} changes; {:?}", self.inbox.summary());
        self.stop_receiver.cancel();
        for stage in STAGES {
            if let Some(p) = self.stages.remove(stage) {
                p.terminate().await;
            }
        }
        if let Some(mut mariadb) = self.mariadb.take() {
            mariadb.kill9().await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        report
    }
}

async fn kill_and_restart(stage: &'static str) {
    Cluster::start()
        .await
        .drop_with(&format!("kill-9-{stage}"), |mut c| async move {
            if stage == "notifier" {
                // Strike while it delivers, not before it started.
                eventually("the notifier to deliver", Duration::from_secs(60), || async {
                    (c.inbox.summary().delivered >= 5).then_some(())
                })
                .await;
            }
            c.kill9(stage).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            c.start_stage(stage);
            c
        })
        .await;
}

/// One scenario a stage: kill -9 of it mid-drop, then a start again.
macro_rules! kill_9_mid_drop {
    ($($test:ident: $stage:literal),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $test() {
            kill_and_restart($stage).await;
        }
    )*};
}
kill_9_mid_drop!(
    kill_9_of_the_allocator_mid_drop_loses_and_doubles_nothing: "allocator",
    kill_9_of_the_settler_mid_drop_loses_and_doubles_nothing: "settler",
    kill_9_of_the_expirer_mid_drop_loses_and_doubles_nothing: "expirer",
    kill_9_of_the_ingress_mid_drop_loses_and_doubles_nothing: "ingress",
    kill_9_of_the_notifier_mid_drop_loses_and_doubles_nothing: "notifier",
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_flush_mid_drop_is_rebuilt_from_mysql() {
    Cluster::start()
        .await
        .drop_with("redis-flush", |c| async move {
            let mut conn = c.ledger().pool().get().await.unwrap();
            let _: () = dropline::redis_pool::redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
            c
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_mid_drop_keeps_its_append_only_file() {
    Cluster::start().await.drop_with("redis-restart", |c| c.crash_and_restart(Service::Redis)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_drop_loses_and_doubles_nothing() {
    Cluster::start().await.drop_with("broker-restart", |c| c.crash_and_restart(Service::Broker)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_failover_that_loses_recent_writes_sells_nothing_twice() {
    Cluster::start()
        .await
        .drop_with("redis-lost-writes", |c| async move {
            // The replica stops hearing from the primary; the primary keeps
            // deciding for a while; then the replica takes over.
            let ledger = c.ledger();
            let snapshot = common::redis_snapshot(ledger.pool(), "*").await;
            let probe = dropline::db::connect(&dropline::config::MysqlArgs::new(c.db_url.clone(), 1)).await.unwrap();
            let count = || async {
                let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM intents").fetch_one(&probe).await.unwrap();
                n
            };
            let at_snapshot = count().await;
            // Ten more decisions, or as many as the flood still had in it:
            // on a busy machine most of a short drop's purchases can be in
            // by the snapshot. Any decision after it is a write to lose.
            let last_change = std::cell::Cell::new((at_snapshot, tokio::time::Instant::now()));
            eventually("more decisions recorded after the snapshot", Duration::from_secs(60), || async {
                let n = count().await;
                if n != last_change.get().0 {
                    last_change.set((n, tokio::time::Instant::now()));
                }
                let flood_over = last_change.get().1.elapsed() >= Duration::from_secs(2);
                (n >= at_snapshot + 10 || (n > at_snapshot && flood_over)).then_some(())
            })
            .await;
            common::redis_roll_back(ledger.pool(), "*", &snapshot).await;
            c
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mariadb_crash_and_restart_mid_drop_loses_and_doubles_nothing() {
    Cluster::start_with(ClusterOptions { private_mariadb: true })
        .await
        .drop_with("mariadb-restart", |mut c| async move {
            let crashed = tokio::time::Instant::now();
            let mariadb = c.mariadb.as_mut().expect("a private MariaDB");
            mariadb.kill9().await;
            // The event list is answered from the ingress's snapshot, MySQL
            // or not; a read it cannot serve from memory (an event it does
            // not know) is refused as retryable, not failed.
            let listing = reqwest::get(format!("http://127.0.0.1:{}/v1/events", c.api_port)).await.unwrap();
            assert_eq!(listing.status(), reqwest::StatusCode::OK);
            let page: serde_json::Value = listing.json().await.unwrap();
            assert!(!page["events"].as_array().unwrap().is_empty(), "{page}");
            let unknown = reqwest::get(format!("http://127.0.0.1:{}/v1/events/999999", c.api_port)).await.unwrap();
            assert_eq!(unknown.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(unknown.headers()["content-type"], "application/problem+json");
            assert!(unknown.headers().contains_key("retry-after"));
            // Down longer than the pools' 5 s acquire timeout (dropline::db):
            // a shorter outage only stalls callers while the pool retries the
            // refused connection, a longer one makes the settler's batch
            // writes, the reconciler, the ingress' reads and the drill's
            // polls fail and retry. Then crash recovery on the same data
            // directory.
            tokio::time::sleep_until(crashed + Duration::from_secs(6)).await;
            mariadb.run().await;
            c
        })
        .await;
}

/// A drain that cannot finish (its commits and its Kafka clients' close wait
/// on a broker that is gone) still ends within the drain timeout: the
/// process exits, and an orchestrator waiting to replace it is not held up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stages_stopped_while_the_broker_is_down_exit_within_their_drain_timeout() {
    let mut c = Cluster::start().await;
    c.broker.take().unwrap().kill9().await;
    // Some margin past the timeout for a busy machine: what is checked is
    // that the process ends at all, not to the second.
    let limit = Duration::from_secs(DRAIN_TIMEOUT_SECS + 15);
    let mut stopping = tokio::task::JoinSet::new();
    for stage in STAGES {
        let process = c.stages.remove(stage).unwrap();
        stopping.spawn(async move { (stage, process.stop(limit).await) });
    }
    while let Some(stopped) = stopping.join_next().await {
        let (stage, status) = stopped.unwrap();
        println!("{stage}: {status}");
        // 0 after a drain that finished, 2 after one that timed out; never
        // killed by a signal.
        assert!(matches!(status.code(), Some(0 | 2)), "{stage}: {status}");
    }
    let _ = std::fs::remove_dir_all(&c.dir);
}

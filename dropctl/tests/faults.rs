//! Fault scenarios: a drop runs while a stage is killed with SIGKILL (no
//! drain, no offset commit) and restarted, while Redis (one, or a primary
//! of a Redis Cluster), the broker or MariaDB fails, or while instances of
//! every stage leave and join; after the pipeline settles, every invariant
//! must hold.
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
use dropline::redis_pool::redis;
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
    /// How many instances of a stage run, where more than one: the first is
    /// named after its stage, the others `<stage>-2`, `<stage>-3`...
    instances: &'static [(&'static str, usize)],
    /// Partitions of every topic: 2 unless told.
    partitions: Option<u32>,
    /// Run the ledger on a Redis Cluster of the cluster's own (three
    /// primaries, three replicas) instead of one Redis.
    redis_cluster: bool,
}

/// The name of a stage's `n`th instance (from 1).
fn instance_name(stage: &str, n: usize) -> String {
    if n == 1 {
        stage.to_owned()
    } else {
        format!("{stage}-{n}")
    }
}

/// The stage an instance runs.
fn stage_of(instance: &str) -> &'static str {
    STAGES
        .into_iter()
        .find(|s| instance == *s || instance.strip_prefix(s).is_some_and(|n| n.starts_with('-')))
        .unwrap_or_else(|| panic!("{instance} is not an instance of a stage"))
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
    /// The first ingress's port, where the provider sends its webhooks.
    api_port: u16,
    /// Every ingress instance's port.
    api_ports: BTreeMap<String, u16>,
    paysim_port: u16,
    /// Each instance's ops port.
    ops: BTreeMap<String, u16>,
    partitions: u32,
    /// Several instances of a stage join their group dynamically: tansu
    /// stalls a group that has seen two static member ids (README).
    dynamic_membership: bool,
    redis: Option<Process>,
    /// The Redis Cluster's nodes by port, when it runs on one.
    redis_nodes: BTreeMap<u16, Process>,
    broker: Option<Process>,
    mariadb: Option<Mariadb>,
    /// The running instances, by name.
    stages: BTreeMap<String, Process>,
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
            api_ports: BTreeMap::from([("ingress".to_owned(), api_port)]),
            paysim_port,
            ops: BTreeMap::new(),
            partitions: options.partitions.unwrap_or(2),
            dynamic_membership: !options.instances.is_empty(),
            redis: None,
            redis_nodes: BTreeMap::new(),
            broker: None,
            mariadb,
            stages: BTreeMap::new(),
            _paysim: paysim,
            inbox,
            receiver_port,
            stop_receiver,
        };
        if options.redis_cluster {
            cluster.start_redis_cluster().await;
        } else {
            cluster.start_redis().await;
        }
        cluster.start_broker().await;
        for stage in STAGES {
            let count = options.instances.iter().find(|(s, _)| *s == stage).map_or(1, |(_, n)| *n);
            for n in 1..=count {
                cluster.start_instance(&instance_name(stage, n));
            }
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
                    not_ready.push(stage.clone());
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

    /// The Redis URL the stages get: the one Redis, or the cluster's nodes.
    fn redis_url(&self) -> String {
        if self.redis_nodes.is_empty() {
            format!("redis://127.0.0.1:{}", self.redis_port)
        } else {
            self.redis_nodes.keys().map(|port| format!("redis://127.0.0.1:{port}")).collect::<Vec<_>>().join(",")
        }
    }

    /// Six redis-server nodes in cluster mode on free ports (each with its
    /// cluster bus on a free port of its own), made one cluster of three
    /// primaries with a replica each by `redis-cli --cluster create`, as
    /// scripts/lib.sh does for the local stack. A primary is declared failed
    /// after 1 s.
    async fn start_redis_cluster(&mut self) {
        let ports: Vec<u16> = (0..6).map(|_| free_port()).collect();
        for &port in &ports {
            let bus = free_port();
            let dir = self.dir.join(format!("redis-{port}"));
            std::fs::create_dir_all(&dir).unwrap();
            let args: Vec<String> = [
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                &bus.to_string(),
                "--cluster-node-timeout",
                "1000",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
            ]
            .iter()
            .map(|a| (*a).to_owned())
            .collect();
            self.redis_nodes.insert(port, spawn_in("redis", PathBuf::from("redis-server"), &[], &args, Some(&dir)));
        }
        for &port in &ports {
            eventually("a redis cluster node up", Duration::from_secs(20), || async move {
                std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
            })
            .await;
        }
        let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let created = tokio::process::Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&nodes)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .await
            .unwrap();
        assert!(created.status.success(), "redis-cli --cluster create: {}", String::from_utf8_lossy(&created.stdout));
        let first = ports[0];
        eventually("the redis cluster ok", Duration::from_secs(60), || async move {
            let info = tokio::process::Command::new("redis-cli")
                .args(["-p", &first.to_string(), "cluster", "info"])
                .output()
                .await
                .ok()?;
            String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok").then_some(())
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

    fn env(&self, instance: &str) -> Vec<(&'static str, String)> {
        let name = &self.name;
        let stage = stage_of(instance);
        let mut env = vec![
            // To the stage's log file in the scenario's folder, shown if it fails.
            ("DROPLINE_LOG", std::env::var("DROPLINE_TEST_STAGE_LOGS").unwrap_or_else(|_| "info".into())),
            ("DROPLINE_KAFKA_BROKERS", format!("127.0.0.1:{}", self.kafka_port)),
            ("DROPLINE_KAFKA_FETCH_WAIT_MAX_MS", "10".into()),
            ("DROPLINE_TOPIC_PREFIX", name.clone()),
            ("DROPLINE_TOPIC_PARTITIONS", self.partitions.to_string()),
            ("DROPLINE_REDIS_URL", self.redis_url()),
            ("DROPLINE_REDIS_CLUSTER", (!self.redis_nodes.is_empty()).to_string()),
            ("DROPLINE_REDIS_KEY_PREFIX", name.clone()),
            ("DROPLINE_MYSQL_URL", self.db_url.clone()),
            ("DROPLINE_OPS_ADDR", format!("127.0.0.1:{}", self.ops[instance])),
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
            let id = if self.dynamic_membership { String::new() } else { format!("{name}-{instance}") };
            env.push(("DROPLINE_KAFKA_GROUP_INSTANCE_ID", id));
        }
        if stage == "ingress" {
            // Every buyer k6 plays comes from 127.0.0.1.
            env.push(("DROPLINE_IP_PER_SEC", "1000000".into()));
            env.push(("DROPLINE_IP_BURST", "1000000".into()));
            env.push(("DROPLINE_LISTEN_ADDR", format!("127.0.0.1:{}", self.api_ports[instance])));
            // The drop's holds last 8 s: starting to pay adds 3 s.
            env.push(("DROPLINE_PAYMENT_HOLD_EXTENSION_SECS", "3".into()));
        }
        if stage == "ingress" || stage == "settler" {
            env.push(("DROPLINE_PAYMENT_PROVIDER_URL", format!("http://127.0.0.1:{}", self.paysim_port)));
        }
        env
    }

    /// Starts an instance (again, on the ports it had, if it ran before).
    fn start_instance(&mut self, instance: &str) {
        let stage = stage_of(instance);
        self.ops.entry(instance.to_owned()).or_insert_with(free_port);
        if stage == "ingress" {
            self.api_ports.entry(instance.to_owned()).or_insert_with(free_port);
        }
        let log = self.dir.join(format!("{instance}.log"));
        let process = spawn_logged(stage, bin_dir().join(format!("dropline-{stage}")), &self.env(instance), &log);
        self.stages.insert(instance.to_owned(), process);
    }

    async fn kill9(&mut self, instance: &str) {
        self.stages.remove(instance).expect("a running instance").kill9().await;
    }

    /// SIGTERM, as a scale-down or a rollout sends it: the instance drains
    /// and exits cleanly.
    async fn terminate(&mut self, instance: &str) {
        self.stages.remove(instance).expect("a running instance").terminate().await;
    }

    fn ledger(&self) -> Ledger {
        let mut args = dropline::config::RedisArgs::new(self.redis_url(), 16);
        args.cluster = !self.redis_nodes.is_empty();
        let pool = args.pool().unwrap();
        Ledger::new(pool, &self.name)
    }

    /// Runs a drop while `fault` happens a moment after it starts, then
    /// checks the books.
    async fn drop_with<F, Fut>(self, scenario: &str, fault: F) -> DropReport
    where
        F: FnOnce(Self) -> Fut,
        Fut: std::future::Future<Output = Self>,
    {
        let (cluster, mut reports) = self.drops_with(scenario, 1, fault).await;
        cluster.finish().await;
        reports.remove(0)
    }

    /// Runs `events` drops at once, each of its own event, its buyers' requests
    /// spread over every ingress in turn, while `fault` happens a moment after
    /// they start; then checks the books of each.
    async fn drops_with<F, Fut>(mut self, scenario: &str, events: usize, fault: F) -> (Self, Vec<DropReport>)
    where
        F: FnOnce(Self) -> Fut,
        Fut: std::future::Future<Output = Self>,
    {
        let keys = self.secrets.tokens();
        let db = dropline::db::connect(&dropline::config::MysqlArgs::new(self.db_url.clone(), 3)).await.unwrap();
        let ledger = self.ledger();
        let ingresses: Vec<String> = self.api_ports.values().map(|port| format!("http://127.0.0.1:{port}")).collect();
        let api = Api::spread(&ingresses).unwrap();
        // CI runs the short version; scripts/faults.sh the full one.
        let scale: u32 = std::env::var("DROPLINE_FAULTS_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
        let mut drops = Vec::new();
        for i in 0..events {
            let name = if events == 1 { scenario.to_owned() } else { format!("{scenario}-{i}") };
            let plan = common::fault_drop(
                &name,
                scale,
                &format!("127.0.0.1:{}", self.kafka_port),
                &self.name,
                &format!("http://127.0.0.1:{}", self.paysim_port),
            );
            let (api, keys, db, ledger) = (api.clone(), keys.clone(), db.clone(), ledger.clone());
            drops.push((name, tokio::spawn(async move { drill::run(&api, &keys, &db, &ledger, &plan).await })));
        }
        // Strike mid-flood.
        common::flood_under_way(&db).await;
        self = fault(self).await;
        let mut reports = Vec::new();
        for (name, drop) in drops {
            let report = drop.await.unwrap().unwrap_or_else(|e| panic!("{name}: the drop failed: {e:#}"));
            let verdict = report.verdict.clone().expect("a verdict");
            println!("{name}: invariants\n{verdict}");
            assert!(report.passed(), "{name}: {report:#?}\n{verdict}");
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
                "{name}: {:?}\n{verdict}",
                self.inbox.summary()
            );
            println!("{name}: the host received {changes} changes");
            reports.push(report);
        }
        assert_eq!(self.inbox.summary().bad_signatures, 0);
        println!("{scenario}: {:?}", self.inbox.summary());
        (self, reports)
    }

    /// Drains every instance (each must exit cleanly) and removes what the
    /// cluster left.
    async fn finish(mut self) {
        self.stop_receiver.cancel();
        for (_, process) in std::mem::take(&mut self.stages) {
            process.terminate().await;
        }
        if let Some(mut mariadb) = self.mariadb.take() {
            mariadb.kill9().await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// Every decision on the cluster's decisions topic, from its start to
    /// its end: copies an allocator published again after a rebalance
    /// included.
    async fn decisions(&self) -> Vec<dropline::messages::Decision> {
        use rdkafka::consumer::{Consumer, StreamConsumer};
        use rdkafka::{Message, Offset, TopicPartitionList};
        let topic = format!("{}.decisions", self.name);
        let consumer: StreamConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", format!("127.0.0.1:{}", self.kafka_port))
            .set("group.id", format!("{}-decisions-reader", self.name))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut ends = BTreeMap::new();
        let mut partitions = TopicPartitionList::new();
        for partition in 0..self.partitions as i32 {
            let (low, high) = consumer.fetch_watermarks(&topic, partition, Duration::from_secs(10)).unwrap();
            if high > low {
                ends.insert(partition, high);
                partitions.add_partition_offset(&topic, partition, Offset::Beginning).unwrap();
            }
        }
        consumer.assign(&partitions).unwrap();
        let mut decisions = Vec::new();
        while !ends.is_empty() {
            let read = tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await;
            let m = read.expect("the rest of the decisions topic").unwrap();
            decisions.push(serde_json::from_slice(m.payload().expect("a decision")).unwrap());
            if ends.get(&m.partition()).is_some_and(|end| m.offset() + 1 >= *end) {
                ends.remove(&m.partition());
            }
        }
        decisions
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
            c.start_instance(stage);
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

/// Many instances of every stage share three drops at once, through two
/// ingresses: 2 ingresses, 3 allocators, 2 settlers, 2 expirers and a
/// notifier, on topics of six partitions, each buyer's requests spread over
/// both ingresses. Mid-flood one instance of each leaves (SIGTERM, as a
/// scale-down or a rollout ends a pod), new allocator, settler and expirer
/// instances join and the ingress comes back: each change of membership is
/// a rebalance, and the leaving expirer hands its waiting holds over. Every
/// instance that leaves drains and exits cleanly, each drop's invariants
/// hold, and every accepted intent is decided exactly once: one decision
/// each, or copies of it (an allocator that lost its partition before its
/// offset was stored publishes again) that all agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_instances_leaving_and_joining_mid_drop_decide_every_intent_once() {
    let options = ClusterOptions {
        instances: &[("ingress", 2), ("allocator", 3), ("settler", 2), ("expirer", 2)],
        partitions: Some(6),
        ..Default::default()
    };
    let (cluster, reports) = Cluster::start_with(options)
        .await
        .drops_with("scale-out", 3, |mut c| async move {
            let db = dropline::db::connect(&dropline::config::MysqlArgs::new(c.db_url.clone(), 1)).await.unwrap();
            let decided = || async {
                let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM intents").fetch_one(&db).await.unwrap();
                n
            };
            // Each leave, then its replacement's join: two rebalances of
            // its group, while the flood and its holds go on.
            for (leaves, joins) in [
                ("allocator-2", "allocator-4"),
                ("settler-2", "settler-3"),
                ("expirer", "expirer-3"),
                ("ingress-2", "ingress-2"),
            ] {
                c.terminate(leaves).await;
                c.start_instance(joins);
                println!("scale-out: {leaves} left, {joins} joined; {} intents recorded", decided().await);
            }
            c
        })
        .await;
    let decisions = cluster.decisions().await;
    for report in &reports {
        let mut outcomes: BTreeMap<uuid::Uuid, Vec<&dropline::messages::Outcome>> = BTreeMap::new();
        for d in decisions.iter().filter(|d| d.event_id == report.event_id) {
            outcomes.entry(d.intent_id).or_default().push(&d.outcome);
        }
        assert_eq!(outcomes.len() as u64, report.accepted, "event {}: intents decided vs accepted", report.event_id);
        for (intent, copies) in &outcomes {
            assert!(copies.windows(2).all(|w| w[0] == w[1]), "intent {intent} decided differently: {copies:?}");
        }
        let copies: usize = outcomes.values().map(Vec::len).sum();
        println!("event {}: {} intents decided, {copies} decisions published", report.event_id, outcomes.len());
    }
    cluster.finish().await;
}

/// The ledger on a Redis Cluster, and the primary serving the drop's event
/// killed mid-flood (kill -9, no shutdown): the cluster promotes its
/// replica after the node timeout, and the promoted replica may lack the
/// primary's last writes (replication is asynchronous). The stages follow
/// the cluster to the new primary; every invariant holds, since a unit the
/// new primary hands out a second time meets MySQL's unit rows (the later
/// hold is voided and its buyer told).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_primary_killed_mid_drop_fails_over_and_sells_nothing_twice() {
    Cluster::start_with(ClusterOptions { redis_cluster: true, ..Default::default() })
        .await
        .drop_with("redis-cluster-failover", |mut c| async move {
            let db = dropline::db::connect(&dropline::config::MysqlArgs::new(c.db_url.clone(), 1)).await.unwrap();
            let (event,): (u64,) = sqlx::query_as("SELECT MAX(id) FROM events").fetch_one(&db).await.unwrap();
            let pool = c.ledger().pool().clone();
            let key = dropline::stock::EventKeys::new(&c.name, event).stock;
            let slot: u16 = {
                let mut conn = pool.get().await.unwrap();
                redis::cmd("CLUSTER").arg("KEYSLOT").arg(&key).query_async(&mut *conn).await.unwrap()
            };
            let primary = primary_port(&pool, slot).await;
            c.redis_nodes.remove(&primary).expect("a node of the cluster").kill9().await;
            println!("redis-cluster-failover: killed the primary on :{primary} serving slot {slot} of event {event}");
            // Asked of a surviving node: the slot has a new primary.
            let survivor = *c.redis_nodes.keys().next().unwrap();
            eventually("a replica promoted in its place", Duration::from_secs(60), || async move {
                let pool = dropline::config::RedisArgs::new(format!("redis://127.0.0.1:{survivor}"), 1).pool().ok()?;
                let moved = primary_port(&pool, slot).await;
                (moved != primary).then_some(())
            })
            .await;
            c
        })
        .await;
}

/// The port of the node that serves `slot` as primary, from CLUSTER SLOTS.
async fn primary_port(pool: &dropline::redis_pool::Pool, slot: u16) -> u16 {
    let mut conn = pool.get().await.unwrap();
    let ranges: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query_async(&mut *conn).await.unwrap();
    for range in ranges {
        let redis::Value::Array(fields) = range else { continue };
        let start: u16 = redis::from_redis_value(fields[0].clone()).unwrap();
        let end: u16 = redis::from_redis_value(fields[1].clone()).unwrap();
        if (start..=end).contains(&slot) {
            // [host, port, id, and from Redis 7 a map of hostnames]
            let node: Vec<redis::Value> = redis::from_redis_value(fields[2].clone()).unwrap();
            return redis::from_redis_value(node[1].clone()).unwrap();
        }
    }
    panic!("no node serves slot {slot}")
}

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
    Cluster::start_with(ClusterOptions { private_mariadb: true, ..Default::default() })
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
    for (instance, process) in std::mem::take(&mut c.stages) {
        stopping.spawn(async move { (instance, process.stop(limit).await) });
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

//! The README's recovery steps, run exactly as written against a local
//! stack of their own: a drop runs on `scripts/stack.sh up`, the allocator,
//! the settler and the expirer are killed with SIGKILL mid-flood, and the
//! stack is recovered with `scripts/stack.sh up`, or with
//! `scripts/stack.sh down` followed by `up`; and a k6 drop
//! (`scripts/loadtest.sh drop`) runs through a settler's kill -9 and `up`. Afterwards every invariant must hold: every accepted
//! purchase decided once, every acknowledged payment one paid order or one
//! refund record, nothing sold twice. The same recovery holds on a stack
//! of several instances per stage (`DROPLINE_STACK_SCALE`), one instance of
//! each consumer killed.
//!
//! Each scenario has its own state folder (so its own broker, on sqlite, as
//! the local stack runs it by default), ports, database, key prefix and
//! topics; Redis and MariaDB are the machine's. The binaries must be built
//! first (`scripts/test.sh` does); the script is told not to build again,
//! since a nested cargo would wait on this test's own build lock.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{eventually, Secrets};
use dropctl::api::Api;
use dropctl::drill;
use dropline::stock::Ledger;

struct LocalStack {
    name: String,
    secrets: Secrets,
    kafka_port: u16,
    state: PathBuf,
    env: Vec<(&'static str, String)>,
    /// Its ingresses' APIs (one per ingress instance).
    apis: Vec<String>,
    db_url: String,
    /// Its paysim's API.
    provider: String,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

/// The ports a scenario's stack listens on: each pick is `n` consecutive
/// ports, free now, apart from every earlier pick (which nothing listens on
/// yet, so "free" alone would not keep them apart), and below the kernel's
/// ephemeral range (32768 and up here): a port the kernel may hand to any
/// outgoing connection meanwhile can be taken by the time the stage binds
/// it (CI saw an ingress refused its port so).
#[derive(Default)]
struct Ports(Vec<u16>);

impl Ports {
    fn pick(&mut self, n: u16) -> u16 {
        use rand::Rng;
        loop {
            let base = rand::rng().random_range(20_000..32_000 - n);
            let run = base..base + n;
            if !self.0.iter().any(|p| run.contains(p))
                && run.clone().all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
            {
                self.0.extend(run);
                return base;
            }
        }
    }
}

impl LocalStack {
    /// One instance of each stage, as `scripts/stack.sh up` runs by default.
    fn new() -> LocalStack {
        Self::scaled("")
    }

    /// The instances `scale` (DROPLINE_STACK_SCALE) asks for: its
    /// ingresses listen on consecutive ports, its ops endpoints on ten per
    /// instance, and its topics have six partitions, enough for every
    /// consumer to hold some (each is ready only then).
    fn scaled(scale: &str) -> LocalStack {
        let name = format!("r{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let state = std::env::temp_dir().join(format!("dropline-{name}"));
        std::fs::create_dir_all(&state).unwrap();
        let count = |stage: &str| {
            scale
                .split_whitespace()
                .find_map(|entry| entry.strip_prefix(stage)?.strip_prefix('='))
                .map_or(1, |n| n.parse::<u16>().expect("an instance count"))
        };
        let ingresses = count("ingress");
        // Instance k of a stage has its ops port at the base + 10 k + the
        // stage's place (scripts/stack.sh).
        let most = ["ingress", "allocator", "settler", "expirer", "notifier"].map(count).into_iter().max().unwrap();
        let mut ports = Ports::default();
        let api_port = ports.pick(ingresses);
        let db_url = format!("{}/dropline_{name}", common::mysql_server());
        let secrets = Secrets::generate();
        let kafka_port = ports.pick(1);
        let paysim = format!("127.0.0.1:{}", ports.pick(1));
        let mut env = vec![
            ("DROPLINE_STATE_DIR", state.display().to_string()),
            // The test build's binaries, unless told (DROPLINE_PROFILE=release
            // runs the scenarios on the binaries a drop would use).
            ("DROPLINE_PROFILE", std::env::var("DROPLINE_PROFILE").unwrap_or_else(|_| "debug".into())),
            ("DROPLINE_SKIP_BUILD", "1".into()),
            ("KAFKA_PORT", kafka_port.to_string()),
            ("PROMETHEUS_PORT", ports.pick(1).to_string()),
            ("DROPLINE_OPS_PORT_BASE", ports.pick(10 * most).to_string()),
            ("DROPLINE_STACK_SCALE", scale.to_owned()),
            ("INGRESS_ADDR", format!("127.0.0.1:{api_port}")),
            ("PAYSIM_ADDR", paysim.clone()),
            ("RECEIVER_ADDR", format!("127.0.0.1:{}", ports.pick(1))),
            ("DROPLINE_MYSQL_URL", db_url.clone()),
            ("DROPLINE_REDIS_KEY_PREFIX", name.clone()),
            ("DROPLINE_TOPIC_PREFIX", name.clone()),
            ("DROPLINE_TOPIC_PARTITIONS", if scale.is_empty() { "2" } else { "6" }.into()),
            ("DROPLINE_ALLOCATOR_GROUP", format!("{name}-allocator")),
            ("DROPLINE_SETTLER_GROUP", format!("{name}-settler")),
            ("DROPLINE_EXPIRER_GROUP", format!("{name}-expirer")),
            ("DROPLINE_NOTIFIER_GROUP", format!("{name}-notifier")),
            ("DROPLINE_ADMIT_PER_SEC", "100000".into()),
            ("DROPLINE_ADMIT_BURST", "100000".into()),
            ("DROPLINE_LOG", "warn".into()),
        ];
        env.extend(secrets.env());
        let apis = (0..ingresses).map(|k| format!("http://127.0.0.1:{}", api_port + k)).collect();
        LocalStack { name, secrets, kafka_port, state, env, apis, db_url, provider: format!("http://{paysim}") }
    }

    /// Runs `scripts/stack.sh <args>` as a user would, and insists it
    /// succeeds.
    fn stack(&self, args: &[&str]) {
        let status = Command::new("bash")
            .arg(repo_root().join("scripts/stack.sh"))
            .args(args)
            .current_dir(repo_root())
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .status()
            .expect("bash runs");
        assert!(status.success(), "scripts/stack.sh {} failed: {status}", args.join(" "));
    }

    fn kill9(&self, stage: &str) {
        let pid = std::fs::read_to_string(self.state.join(format!("{stage}.pid"))).expect("the stage's pid file");
        let status = Command::new("kill").args(["-9", pid.trim()]).status().unwrap();
        assert!(status.success(), "kill -9 {stage}");
    }

    /// Until the killed process is gone (or a zombie nobody reaped yet).
    async fn wait_dead(&self, stage: &str) {
        let pid = std::fs::read_to_string(self.state.join(format!("{stage}.pid"))).unwrap();
        let stat = format!("/proc/{}/stat", pid.trim());
        eventually(&format!("{stage} to die"), Duration::from_secs(10), || {
            let stat = stat.clone();
            async move {
                let gone = std::fs::read_to_string(&stat)
                    .map_or(true, |s| s.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with(['Z', 'X'])));
                gone.then_some(())
            }
        })
        .await;
    }

    fn ledger(&self) -> Ledger {
        let pool = common::redis(16).pool().unwrap();
        Ledger::new(pool, &self.name)
    }

    /// A drop during which the instances `kill` (the allocator, the settler
    /// and the expirer, say) die by SIGKILL and `recover` brings the stack
    /// back.
    async fn drop_with_recovery(self, scenario: &str, kill: &[&str], recover: &'static [&'static [&'static str]]) {
        dropline::telemetry::init_logs();
        // Armed first: a stack that fails to come up is still taken down.
        let _down = Down(&self);
        self.stack(&["up"]);
        let keys = self.secrets.tokens();
        let db = dropline::db::connect(&dropline::config::MysqlArgs::new(self.db_url.clone(), 3)).await.unwrap();
        let api = Api::spread(&self.apis).unwrap();
        let brokers = format!("127.0.0.1:{}", self.kafka_port);
        let plan = common::fault_drop(scenario, 2, &brokers, &self.name, &self.provider);
        let probe = db.clone();
        let ledger = self.ledger();
        let drop = tokio::spawn(async move { drill::run(&api, &keys, &db, &ledger, &plan).await });
        common::flood_under_way(&probe).await;
        // Every consumer dies, one after the other, as in a cascade.
        for instance in kill {
            self.kill9(instance);
            self.wait_dead(instance).await;
        }
        for step in recover {
            self.stack(step);
        }
        let report = drop.await.unwrap().unwrap_or_else(|e| panic!("{scenario}: the drop failed: {e:#}"));
        let verdict = report.verdict.clone().expect("a verdict");
        println!("{scenario}: invariants\n{verdict}");
        assert!(report.passed(), "{scenario}: {report:#?}\n{verdict}");
    }
}

/// Stops the scenario's stack however the scenario ends, a failed
/// assertion included, and removes its folder unless it failed.
struct Down<'a>(&'a LocalStack);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let stopped = Command::new("bash")
            .arg(repo_root().join("scripts/stack.sh"))
            .arg("down")
            .current_dir(repo_root())
            .envs(self.0.env.iter().map(|(k, v)| (*k, v.as_str())))
            .status();
        if !matches!(stopped, Ok(s) if s.success()) {
            eprintln!("stopping the scenario's stack failed: {stopped:?}");
        }
        if std::thread::panicking() {
            // The services' and the broker's logs, for whoever reads the failure.
            eprintln!("the failed scenario's logs are kept in {}", self.0.state.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0.state);
        }
    }
}

/// One scenario at a time: each runs a whole local stack of processes, and
/// two at once on a small machine would only test its scheduler.
static ONE_STACK_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_then_either_recovery_the_readme_gives_loses_nothing() {
    let _turn = ONE_STACK_AT_A_TIME.lock().await;
    let consumers = ["allocator", "settler", "expirer"];
    LocalStack::new().drop_with_recovery("recover-up", &consumers, &[&["up"]]).await;
    LocalStack::new().drop_with_recovery("recover-down-up", &consumers, &[&["down"], &["up"]]).await;
}

/// The README's scaled stack (`DROPLINE_STACK_SCALE="ingress=2
/// allocator=3 settler=2 expirer=2" scripts/stack.sh up`): buyers spread
/// over both ingresses, one instance of each consumer dies by SIGKILL
/// mid-flood (its partitions move to the others of its group), and
/// `scripts/stack.sh up` starts it again (they move back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_one_instance_of_each_consumer_in_a_scaled_stack_then_up_loses_nothing() {
    let _turn = ONE_STACK_AT_A_TIME.lock().await;
    LocalStack::scaled("ingress=2 allocator=3 settler=2 expirer=2")
        .drop_with_recovery("recover-scaled", &["allocator-1", "settler-1", "expirer-1"], &[&["up"]])
        .await;
}

/// The settler's kill -9 at the scale of a load test, where a helper's
/// drill once panicked the broker after every recovery: the README's
/// `scripts/loadtest.sh drop` floods the stack, the settler dies mid-flood,
/// and `scripts/stack.sh up` starts it again while the crowd keeps coming.
/// The load test's own verdict must be PASS: no failed request, every
/// accepted purchase decided, then `dropctl check` on its event (every
/// invariant, with the count of accepted purchases). The crowd grows with
/// DROPLINE_FAULTS_SCALE: at 8 (`scripts/faults.sh`) it is the README's
/// default drop, 2,000 tickets and 800 purchases a second, which with a
/// 5 s message timeout panicked the broker and broke the books (and with
/// DROPLINE_PROFILE=release it is the drill as a user runs it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_settler_in_a_k6_drop_then_up_loses_nothing() {
    let out = k6_drop_through_a_kill("settler").await;
    assert!(out.contains("verdict: PASS"), "the k6 drop through the settler's kill -9 failed:\n{out}");
}

/// The ingress's kill -9 in the same drop: buyers whose requests were cut
/// off retry with their keys, as the README asks (k6's buyers do), so every
/// purchase the ingress produced before it died is answered once, and the
/// books count it. Requests refused while it was down fail k6's error-rate
/// threshold by design; the invariants and "every accepted purchase
/// decided" must hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_ingress_in_a_k6_drop_then_up_loses_nothing() {
    let out = k6_drop_through_a_kill("ingress").await;
    assert!(
        out.contains("invariants hold") && out.contains("ok   dropline_undecided"),
        "the k6 drop through the ingress's kill -9 broke the books:\n{out}"
    );
}

/// Runs `scripts/loadtest.sh drop` on a local stack of its own, kills
/// `stage` with SIGKILL well into the flood, recovers with `scripts/stack.sh
/// up`, and returns the end of the load test's output.
async fn k6_drop_through_a_kill(stage: &str) -> String {
    let _turn = ONE_STACK_AT_A_TIME.lock().await;
    dropline::telemetry::init_logs();
    let scale: u32 = std::env::var("DROPLINE_FAULTS_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let stack = LocalStack::new();
    let _down = Down(&stack);
    stack.stack(&["up"]);
    let reports = stack.state.join("reports");
    let k6 = tokio::process::Command::new("bash")
        .arg(repo_root().join("scripts/loadtest.sh"))
        .arg("drop")
        .args(["-e", &format!("TICKETS={}", 250 * scale), "-e", &format!("PEAK_RATE={}", (100 * scale).min(800))])
        .args(["-e", "RAMP=10s", "-e", "HOLD=20s", "-e", "HOLD_TTL_SECS=10", "-e", "LATENCY_SLOS=off"])
        .current_dir(repo_root())
        .envs(stack.env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("DROPLINE_LOADTEST_REPORTS", &reports)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("bash runs");
    // Its output is read as it comes: a full pipe would stall k6, and the
    // flood with it.
    let k6 = tokio::spawn(k6.wait_with_output());
    let db = dropline::db::connect(&dropline::config::MysqlArgs::new(stack.db_url.clone(), 2)).await.unwrap();
    // Well into the flood, with a backlog behind the stage when it dies:
    // twice as many decisions recorded as there are tickets (at 8, a
    // settler's kill at half that did not stall the broker even with a
    // lossy 5 s message timeout; this one did).
    common::intents_recorded(&db, 500 * i64::from(scale)).await;
    stack.kill9(stage);
    stack.wait_dead(stage).await;
    stack.stack(&["up"]);
    let run = k6.await.unwrap().unwrap();
    let tail = |b: &[u8]| {
        let s = String::from_utf8_lossy(b);
        s.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    };
    let out = tail(&run.stdout);
    println!("{out}");
    format!("{out}\n(exit: {}; stderr:)\n{}", run.status, tail(&run.stderr))
}

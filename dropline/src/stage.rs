//! The stage kit: what every Dropline process does around its own logic,
//! written once.
//!
//! [`main`] is a stage binary's whole `main`: JSON logs, flags and
//! environment through clap, SIGTERM/SIGINT, the stage's `run`, and a drain
//! bounded by `DROPLINE_DRAIN_TIMEOUT_SECS`, after which the process exits
//! with the work it had in hand abandoned (nothing of it was committed, so
//! it is redelivered). [`Stage::start`] is the first step of every `run`:
//! the config is checked (every problem at once) and logged, the metrics
//! recorder is installed and described, and the ops server (`/healthz`,
//! `/readyz`, `/metrics`) is listening, not ready yet.

use std::fmt::Display;
use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use rdkafka::consumer::StreamConsumer;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, Problems, SharedArgs};
use crate::kafka::{DeadLetters, GroupContext, Publisher, WhenFull};
use crate::messages::Topics;
use crate::ops::Readiness;

/// What the kit needs to know of a stage's config. Its `Serialize` is the
/// effective-config log: secrets are [`crate::secrets::Secret`]s, and URLs
/// with passwords are serialized through
/// [`crate::config::redacted_url`].
pub trait StageConfig: clap::Parser + serde::Serialize {
    /// Which stage this is.
    const STAGE: StageInfo;

    /// The settings every stage has.
    fn shared(&self) -> &SharedArgs;
    /// Adds every problem of the stage's own settings to `p`.
    fn check(&self, p: &mut Problems);

    /// Every problem of the config, reported together.
    fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Problems::default();
        self.shared().check(&mut p);
        self.check(&mut p);
        p.into_result()
    }
}

/// What the kit knows of a stage besides its config.
pub struct StageInfo {
    /// Its name in logs and metrics: `allocator`, `settler`.
    pub name: &'static str,
    /// Its ops port on loopback unless `DROPLINE_OPS_ADDR` says otherwise.
    pub ops_port: u16,
    /// Its own metrics, described at start.
    pub metrics: &'static [crate::telemetry::Metric],
}

/// Why a stage could not start, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("ops server: {0}")]
    Ops(#[from] std::io::Error),
    #[error(transparent)]
    KafkaSetup(#[from] crate::kafka::KafkaSetupError),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("redis pool: {0}")]
    RedisPool(#[from] crate::redis_pool::CreatePoolError),
    #[error("mysql: {0}")]
    Mysql(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// A consumer stage's Kafka clients, each set up the one way.
pub struct Consumer {
    /// False until the stage sets it; then it follows the assignment.
    pub ready: Readiness,
    pub topics: Topics,
    /// `<stage>-producer`, waiting for room when its queue is full.
    pub publisher: Publisher,
    pub dead_letters: DeadLetters,
    /// `<stage>-consumer`, subscribed, with the group watch running.
    pub consumer: StreamConsumer<GroupContext>,
}

/// A started stage: its readiness (false until the stage sets it) and where
/// its ops endpoints listen.
pub struct Stage {
    pub ready: Readiness,
    pub ops_addr: SocketAddr,
}

impl Stage {
    pub async fn start<C: StageConfig>(config: &C, shutdown: &CancellationToken) -> Result<Stage, StageError> {
        config.validate()?;
        tracing::info!(stage = C::STAGE.name, config = %effective(config), "effective config");
        // The recorder first: metrics described or created before it exists
        // would go nowhere.
        let prometheus = crate::telemetry::metrics();
        crate::telemetry::describe(C::STAGE.metrics);
        crate::telemetry::describe(crate::kafka::metrics::ALL);
        let ready = Readiness::default();
        let addr = config.shared().ops.addr_or(C::STAGE.ops_port);
        let (ops_addr, _) = crate::ops::serve(addr, ready.clone(), prometheus, shutdown.clone()).await?;
        tracing::info!(stage = C::STAGE.name, %ops_addr, "ops endpoints listening");
        Ok(Stage { ready, ops_addr })
    }

    /// [`Stage::start`] for a consumer stage, then its Kafka clients: every
    /// topic exists, the publisher and the dead-letter topic are ready, and
    /// the consumer is subscribed in `group_id` to the topics `subscribe`
    /// picks.
    pub async fn start_consumer<C: StageConfig>(
        config: &C,
        group_id: &str,
        subscribe: fn(&Topics) -> Vec<&str>,
        shutdown: &CancellationToken,
    ) -> Result<Consumer, StageError> {
        let ready = Stage::start(config, shutdown).await?.ready;
        let kafka = &config.shared().kafka;
        let topics = kafka.topics();
        crate::kafka::ensure_topics(kafka, &topics.all()).await?;
        let publisher = Publisher::new(kafka, client_name(C::STAGE.name, "producer"), WhenFull::Wait)?;
        let dead_letters = DeadLetters::new(publisher.clone(), topics.dead_letter.clone(), C::STAGE.name);
        let consumer = crate::kafka::subscribed(
            kafka,
            group_id,
            client_name(C::STAGE.name, "consumer"),
            &subscribe(&topics),
            &ready,
            shutdown,
        )?;
        Ok(Consumer { ready, topics, publisher, dead_letters, consumer })
    }
}

/// `<stage>-<role>`, the client label of metrics and logs. Made once per
/// started stage and kept for the process's life, as labels must be.
fn client_name(stage: &str, role: &str) -> &'static str {
    Box::leak(format!("{stage}-{role}").into_boxed_str())
}

/// For each stage's own tests: its command line is well formed, its
/// defaults (what the local stack runs) pass validation with only the
/// `required` flags given (secrets, which have no default), and its metrics
/// follow the naming scheme.
pub fn assert_defaults_valid<C: StageConfig>(required: &[String]) {
    C::command().debug_assert();
    let args = std::iter::once(C::STAGE.name.to_owned()).chain(required.iter().cloned());
    if let Err(e) = C::parse_from(args).validate() {
        panic!("{}'s defaults do not validate: {e}", C::STAGE.name);
    }
    crate::telemetry::assert_naming_scheme(C::STAGE.name, C::STAGE.metrics);
}

/// A stage's [`StageConfig`]: its config type (a clap struct with a
/// flattened `shared: SharedArgs`), its name, its ops port, and the checks
/// of its own settings, which add every problem to `p`. Its metrics are its
/// crate's `metrics::ALL`.
///
/// ```ignore
/// dropline::stage_config!(AllocatorConfig, "allocator", 9101, |config, p| {
///     p.within("DROPLINE_ALLOCATOR_BATCH_MAX", config.batch_max, 1..=10_000);
/// });
/// ```
// `crate::metrics` is meant: the calling stage's own table.
#[allow(clippy::crate_in_macro_def)]
#[macro_export]
macro_rules! stage_config {
    ($config:ident, $name:literal, $port:literal, |$this:ident, $p:ident| $check:block) => {
        impl $crate::stage::StageConfig for $config {
            const STAGE: $crate::stage::StageInfo =
                $crate::stage::StageInfo { name: $name, ops_port: $port, metrics: crate::metrics::ALL };

            fn check(&self, $p: &mut $crate::config::Problems) {
                let $this = self;
                $check
            }

            fn shared(&self) -> &$crate::config::SharedArgs {
                &self.shared
            }
        }
    };
}

/// A stage's config test, in its own crate: `config_tests!(AllocatorConfig)`
/// checks [`assert_defaults_valid`] for it; the flags that have no default
/// follow (`config_tests!(NotifierConfig, format!("--notify-secret={}",
/// dropline::secrets::random()))`).
#[macro_export]
macro_rules! config_tests {
    ($config:ty $(, $required:expr)* $(,)?) => {
        #[cfg(test)]
        mod config_tests {
            #[test]
            fn the_command_line_is_well_formed_and_the_defaults_validate() {
                $crate::stage::assert_defaults_valid::<$config>(&[$($required),*]);
            }
        }
    };
}

/// The config as the start-up log shows it: every setting, as JSON, with
/// secrets and passwords masked.
pub fn effective<C: StageConfig>(config: &C) -> String {
    serde_json::to_string(config).expect("a config serializes")
}

/// Runs a stage binary to its end and returns its exit code: 0 after a clean
/// stop, 1 if `run` failed, 2 if the drain outlasted its timeout.
pub async fn main<C, F, Fut, E>(run: F) -> ExitCode
where
    C: StageConfig,
    F: FnOnce(C, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    crate::telemetry::init_logs();
    let config = C::parse();
    let drain = Duration::from_secs(config.shared().ops.drain_timeout_secs);
    let shutdown = crate::shutdown::on_signals();
    // The watchdog is a thread of its own, outside the runtime: what
    // outlasts a drain is often a blocking call (a Kafka client closing
    // against a broker that is down), which would hold up a timer on the
    // runtime and the runtime's own shutdown alike.
    let watched = shutdown.clone();
    tokio::spawn(async move {
        watched.cancelled().await;
        std::thread::spawn(move || {
            std::thread::sleep(drain);
            tracing::error!(
                stage = C::STAGE.name,
                drain_timeout_secs = drain.as_secs(),
                "the drain did not finish in time; exiting with the work in hand abandoned (it is redelivered)"
            );
            std::process::exit(2);
        });
    });
    let result = run(config, shutdown).await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(stage = C::STAGE.name, error = %e, "stage failed");
            ExitCode::FAILURE
        }
    }
}

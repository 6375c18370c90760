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

use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, OpsArgs};
use crate::ops::Readiness;

/// What the kit needs to know of a stage's config. Its `Serialize` is the
/// effective-config log: secrets and URLs with passwords are serialized
/// through [`crate::config::redacted_secret`] and
/// [`crate::config::redacted_url`].
pub trait StageConfig: clap::Parser + serde::Serialize {
    /// The stage's name in logs: `allocator`, `settler`.
    const NAME: &'static str;
    /// Its ops port on loopback unless `DROPLINE_OPS_ADDR` says otherwise.
    const DEFAULT_OPS_PORT: u16;

    /// Every problem of the config, reported together.
    fn validate(&self) -> Result<(), ConfigError>;
    fn ops(&self) -> &OpsArgs;
    /// Describes the stage's own metrics.
    fn describe_metrics();
}

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("ops server: {0}")]
    Ops(#[from] std::io::Error),
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
        tracing::info!(stage = C::NAME, config = %effective(config), "effective config");
        // The recorder first: metrics described or created before it exists
        // would go nowhere.
        let prometheus = crate::telemetry::metrics();
        C::describe_metrics();
        crate::kafka::metrics::describe();
        let ready = Readiness::default();
        let addr = config.ops().addr_or(C::DEFAULT_OPS_PORT);
        let (ops_addr, _) = crate::ops::serve(addr, ready.clone(), prometheus, shutdown.clone()).await?;
        tracing::info!(stage = C::NAME, %ops_addr, "ops endpoints listening");
        Ok(Stage { ready, ops_addr })
    }
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
    let drain = Duration::from_secs(config.ops().drain_timeout_secs);
    let shutdown = crate::shutdown::on_signals();
    let running = run(config, shutdown.clone());
    let result = tokio::select! {
        result = running => result,
        _ = async { shutdown.cancelled().await; tokio::time::sleep(drain).await } => {
            tracing::error!(stage = C::NAME, drain_timeout_secs = drain.as_secs(),
                "the drain did not finish in time; exiting with the work in hand abandoned (it is redelivered)");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(stage = C::NAME, error = %e, "stage failed");
            ExitCode::FAILURE
        }
    }
}

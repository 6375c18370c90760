//! Logs and metrics set up the same way in every stage: JSON logs through
//! `tracing`, and one Prometheus recorder per process with shared buckets.

use std::sync::OnceLock;

use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;
use tracing_subscriber::EnvFilter;

/// Latency buckets in seconds, from a fast Redis call to a slow drain.
const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Batch sizes, in messages or rows.
const SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0];

/// JSON logs to stdout, filtered by `DROPLINE_LOG` (default `info`). Safe to
/// call more than once; the first call wins (tests start several stages).
pub fn init_logs() {
    let filter = EnvFilter::try_from_env("DROPLINE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().json().flatten_event(true).with_env_filter(filter).try_init();
}

/// The process' Prometheus recorder, installed on first use.
pub fn metrics() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                // A gauge nobody sets any more (a partition moved to another
                // consumer) disappears instead of freezing at its last value.
                .idle_timeout(MetricKindMask::GAUGE, Some(Duration::from_secs(60)))
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_size".into()), SIZE_BUCKETS))
                .expect("bucket lists are non-empty")
                .install_recorder()
                .expect("no other metrics recorder is installed")
        })
        .clone()
}

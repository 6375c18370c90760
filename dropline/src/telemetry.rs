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

/// One metric as every stage declares it: its name, what `/metrics` says of
/// it, and the series that exist from the start, so that a dashboard or an
/// alert reads a 0 and not "no data". A stage lists its metrics in one table
/// (`StageConfig::STAGE.metrics`); the kit describes them all at start-up, and
/// [`assert_naming_scheme`] holds every table to one naming scheme.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    /// What `counter!`, `gauge!` and `histogram!` are called with.
    pub name: &'static str,
    kind: Kind,
    help: &'static str,
    unit: Option<metrics::Unit>,
    zero: Zero,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

#[derive(Debug, Clone, Copy)]
enum Zero {
    Nothing,
    /// The one series without labels.
    Unlabelled,
    /// One series per value of one label.
    Each(&'static str, &'static [&'static str]),
}

impl Metric {
    pub const fn counter(name: &'static str, help: &'static str) -> Metric {
        Metric { name, kind: Kind::Counter, help, unit: None, zero: Zero::Nothing }
    }

    pub const fn gauge(name: &'static str, help: &'static str) -> Metric {
        Metric { name, kind: Kind::Gauge, help, unit: None, zero: Zero::Nothing }
    }

    /// A histogram in seconds (`_seconds`) or a count of items (`_size`).
    pub const fn histogram(name: &'static str, help: &'static str) -> Metric {
        Metric { name, kind: Kind::Histogram, help, unit: None, zero: Zero::Nothing }
    }

    pub const fn unit(self, unit: metrics::Unit) -> Metric {
        Metric { unit: Some(unit), ..self }
    }

    /// The unlabelled series exists from the start at 0.
    pub const fn from_zero(self) -> Metric {
        Metric { zero: Zero::Unlabelled, ..self }
    }

    /// A series per value of `label` exists from the start at 0.
    pub const fn from_zero_for(self, label: &'static str, values: &'static [&'static str]) -> Metric {
        Metric { zero: Zero::Each(label, values), ..self }
    }
}

/// Describes every metric of `table` to the installed recorder and creates
/// its starting series. `increment(0)` and `set(0)` create a series without
/// changing one that is already there.
pub fn describe(table: &[Metric]) {
    for m in table {
        let unit = m.unit.or(match m.kind {
            Kind::Histogram if m.name.ends_with("_seconds") => Some(metrics::Unit::Seconds),
            Kind::Histogram => Some(metrics::Unit::Count),
            _ => None,
        });
        match (m.kind, unit) {
            (Kind::Counter, Some(u)) => metrics::describe_counter!(m.name, u, m.help),
            (Kind::Counter, None) => metrics::describe_counter!(m.name, m.help),
            (Kind::Gauge, Some(u)) => metrics::describe_gauge!(m.name, u, m.help),
            (Kind::Gauge, None) => metrics::describe_gauge!(m.name, m.help),
            (Kind::Histogram, Some(u)) => metrics::describe_histogram!(m.name, u, m.help),
            (Kind::Histogram, None) => metrics::describe_histogram!(m.name, m.help),
        }
        let labels: Vec<Vec<(&str, &str)>> = match m.zero {
            Zero::Nothing => vec![],
            Zero::Unlabelled => vec![vec![]],
            Zero::Each(label, values) => values.iter().map(|v| vec![(label, *v)]).collect(),
        };
        for series in labels {
            let series: Vec<metrics::Label> = series.into_iter().map(|(k, v)| metrics::Label::new(k, v)).collect();
            match m.kind {
                Kind::Counter => metrics::counter!(m.name, series).increment(0),
                Kind::Gauge => metrics::gauge!(m.name, series).set(0.0),
                Kind::Histogram => {}
            }
        }
    }
}

/// The naming scheme of every Dropline metric, checked in each stage's
/// tests: `dropline_<stage>_…`, counters end in `_total`, histograms in
/// `_seconds` or `_size`, gauges name their unit and are never `_total`;
/// every metric says what it counts, and no name is declared twice.
pub fn assert_naming_scheme(stage: &str, table: &[Metric]) {
    let prefix = format!("dropline_{stage}_");
    let mut seen = std::collections::HashSet::new();
    for m in table {
        let n = m.name;
        assert!(seen.insert(n), "{n} is declared twice");
        assert!(n.starts_with(&prefix), "{n} does not start with {prefix}");
        assert!(n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'), "{n}: [a-z0-9_] only");
        assert!(m.help.len() > 10, "{n} does not say what it counts");
        let ok = match m.kind {
            Kind::Counter => n.ends_with("_total"),
            Kind::Histogram => n.ends_with("_seconds") || n.ends_with("_size"),
            Kind::Gauge => !n.ends_with("_total"),
        };
        assert!(ok, "{n}: a {:?}'s name breaks the scheme", m.kind);
        let starts = !matches!(m.zero, Zero::Nothing);
        assert!(!(starts && m.kind == Kind::Histogram), "{n}: a histogram has no starting value");
    }
}

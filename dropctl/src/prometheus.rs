//! A small client of Prometheus' HTTP query API: the demo reads its headline
//! numbers with it, and the monitoring test evaluates every dashboard query
//! and alert expression.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;

#[derive(Clone)]
pub struct Prometheus {
    base: String,
    http: reqwest::Client,
}

/// One series of an answer: its labels and its samples (time, value).
#[derive(Debug, Clone)]
pub struct Series {
    pub labels: BTreeMap<String, String>,
    pub samples: Vec<(f64, f64)>,
}

#[derive(Deserialize)]
struct Answer {
    status: String,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    data: Option<Data>,
}

#[derive(Deserialize)]
struct Data {
    #[serde(rename = "resultType")]
    result_type: String,
    result: serde_json::Value,
}

#[derive(Deserialize)]
struct RawSeries {
    #[serde(default)]
    metric: BTreeMap<String, String>,
    #[serde(default)]
    value: Option<(f64, String)>,
    #[serde(default)]
    values: Vec<(f64, String)>,
}

impl Prometheus {
    pub fn new(base: &str) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
        Ok(Self { base: base.trim_end_matches('/').to_owned(), http })
    }

    pub async fn ready(&self) -> bool {
        let r = self.http.get(format!("{}/-/ready", self.base)).send().await;
        r.is_ok_and(|r| r.status().is_success())
    }

    /// Evaluates `expr` at `at` (Unix seconds).
    pub async fn instant(&self, expr: &str, at: f64) -> anyhow::Result<Vec<Series>> {
        let at = format!("{at:.3}");
        self.query("/api/v1/query", &[("query", expr), ("time", &at)]).await
    }

    /// Evaluates `expr` from `start` to `end` every `step` seconds.
    pub async fn range(&self, expr: &str, start: f64, end: f64, step: f64) -> anyhow::Result<Vec<Series>> {
        let (start, end, step) = (format!("{start:.3}"), format!("{end:.3}"), format!("{step}"));
        self.query("/api/v1/query_range", &[("query", expr), ("start", &start), ("end", &end), ("step", &step)]).await
    }

    async fn query(&self, path: &str, params: &[(&str, &str)]) -> anyhow::Result<Vec<Series>> {
        let answer: Answer = self
            .http
            .get(format!("{}{path}", self.base))
            .query(params)
            .send()
            .await
            .context("querying prometheus")?
            .json()
            .await?;
        if answer.status != "success" {
            bail!("prometheus refused {:?}: {}", params[0].1, answer.error.unwrap_or_default());
        }
        let data = answer.data.context("no data in a successful answer")?;
        match data.result_type.as_str() {
            "vector" | "matrix" => {
                let raw: Vec<RawSeries> = serde_json::from_value(data.result)?;
                Ok(raw
                    .into_iter()
                    .map(|r| {
                        let samples = r.value.into_iter().chain(r.values).map(|(t, v)| (t, parse(&v))).collect();
                        Series { labels: r.metric, samples }
                    })
                    .collect())
            }
            "scalar" => {
                let (t, v): (f64, String) = serde_json::from_value(data.result)?;
                Ok(vec![Series { labels: BTreeMap::new(), samples: vec![(t, parse(&v))] }])
            }
            other => bail!("unexpected result type {other}"),
        }
    }
}

fn parse(v: &str) -> f64 {
    v.parse().unwrap_or(f64::NAN)
}

/// The demo's headline numbers, read from Prometheus.
#[derive(Debug, Clone, Default)]
pub struct Headline {
    pub peak_admitted_per_sec: Option<f64>,
    pub p99_decision_secs: Option<f64>,
}

/// Reads the headline numbers of the drop that ran from `start` to `end`
/// (Unix seconds), the only one running then.
pub async fn headline(prom: &Prometheus, start: f64, end: f64) -> anyhow::Result<Headline> {
    let window = (end - start).ceil().max(1.0);
    let first = |s: Vec<Series>| s.first().and_then(|s| s.samples.first()).map(|(_, v)| *v).filter(|v| v.is_finite());
    let peak = prom
        .instant(
            &format!(
                "max_over_time(sum(rate(dropline_ingress_purchases_total{{outcome=\"admitted\"}}[3s]))[{window}s:1s])"
            ),
            end,
        )
        .await?;
    let p99 = prom
        .instant(
            &format!(
                "histogram_quantile(0.99, sum by (le) (increase(dropline_allocator_intent_to_decision_seconds_bucket[{window}s])))"
            ),
            end,
        )
        .await?;
    Ok(Headline { peak_admitted_per_sec: first(peak), p99_decision_secs: first(p99) })
}

//! Load for the rows of the performance report that wrk cannot make
//! (scripts/bench.sh):
//!
//! - [`streams`]: thousands of buyers following their purchase on its event
//!   stream at once: what a stream costs the ingress in memory, and how soon
//!   a decision reaches its stream.
//! - [`sold_out`]: an event whose one unit is sold and paid for, for the
//!   refusals that follow a sell-out.
//! - [`paced`]: purchases at a fixed rate, open loop, for the purchase
//!   answer's latency below the ingress' maximum (wrk sends as fast as it is
//!   answered, so its latencies are those of a saturated server).

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use dropline::auth::Tokens;
use serde::Serialize;
use serde_json::json;
use tokio::sync::{Barrier, Semaphore};
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::api::{Api, Opened, Purchase};

/// The value at quantile `q` (0 to 1) of `sorted`, nearest rank.
pub fn quantile<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    let rank = (sorted.len() as f64 * q).ceil() as usize;
    (!sorted.is_empty()).then(|| sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Latencies in milliseconds: p50, p99, p99.9 and the largest.
#[derive(Debug, Default, Serialize)]
pub struct Latencies {
    pub count: usize,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub p999_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

impl Latencies {
    fn of(mut ms: Vec<f64>) -> Self {
        ms.sort_by(f64::total_cmp);
        Latencies {
            count: ms.len(),
            p50_ms: quantile(&ms, 0.5),
            p99_ms: quantile(&ms, 0.99),
            p999_ms: quantile(&ms, 0.999),
            max_ms: ms.last().copied(),
        }
    }
}

/// Creates an event on sale now with stock for `capacity` and holds that
/// outlast the run; its id.
async fn open_event(api: &Api, tokens: &Tokens, name: &str, capacity: u64, hold_ttl_secs: u32) -> anyhow::Result<u64> {
    let admin = tokens.admin.mint("dropctl-load", 3600)?;
    let now = chrono::Utc::now();
    let event = api
        .create_event(
            &admin,
            &json!({
                "name": name,
                "venue": "Loopback Arena",
                "starts_at": now + chrono::Duration::days(30),
                "sale_opens_at": now - chrono::Duration::seconds(1),
                "sale_closes_at": now + chrono::Duration::hours(6),
                "capacity": capacity,
                "price_cents": 100,
                "currency": "EUR",
                "per_user_limit": 100,
                "hold_ttl_secs": hold_ttl_secs,
            }),
        )
        .await?;
    event["id"].as_u64().context("event id")
}

/// A process's resident memory, from /proc.
fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .with_context(|| format!("no VmRSS for process {pid}"))?;
    Ok(kib * 1024)
}

/// Stops a process (SIGSTOP) until dropped, which resumes it (SIGCONT),
/// whatever way the caller leaves.
struct Paused(u32);

impl Paused {
    fn new(pid: u32) -> anyhow::Result<Self> {
        signal("-STOP", pid)?;
        Ok(Paused(pid))
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        if let Err(e) = signal("-CONT", self.0) {
            eprintln!("could not resume process {}: {e:#}", self.0);
        }
    }
}

fn signal(which: &str, pid: u32) -> anyhow::Result<()> {
    let status = Command::new("kill").arg(which).arg(pid.to_string()).status()?;
    if !status.success() {
        bail!("kill {which} {pid} failed: {status}");
    }
    Ok(())
}

/// A purchase, retried while the ingress asks to come back later.
async fn purchase(api: &Api, token: &str, event_id: u64) -> anyhow::Result<Uuid> {
    let key = Uuid::new_v4().to_string();
    for _ in 0..100 {
        match api.purchase(token, event_id, &key, 1).await? {
            Purchase::Accepted(intent) => return Ok(intent),
            Purchase::RetryAfter(wait) => tokio::time::sleep(wait.min(Duration::from_millis(200))).await,
            Purchase::Refused(code) => bail!("purchase refused: {code}"),
        }
    }
    bail!("purchase still turned away after 100 tries")
}

/// Creates an event of one unit and buys it: purchased, held, paid (a
/// hold would lapse and put the unit back on sale), and told sold out; its
/// id.
pub async fn sold_out(api: &Api, tokens: &Tokens) -> anyhow::Result<u64> {
    let event_id = open_event(api, tokens, "sold-out bench", 1, 300).await?;
    let token = tokens.buyer.mint(&format!("sold-out-{}", Uuid::new_v4().simple()), 3600)?;
    let intent = purchase(api, &token, event_id).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let order = loop {
        let status = api.intent(&token, intent).await?;
        if let Some(order) = status.order.as_ref().and_then(|o| o["order_id"].as_str()) {
            break order.parse()?;
        }
        if status.status != "queued" || Instant::now() > deadline {
            bail!("the one unit was not held: {status:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    match api.pay(&token, order, 1).await?.as_str() {
        "captured" => {}
        other => bail!("paying for the one unit answered {other}"),
    }
    // Until the door has seen the sell-out (twice in a row: the second is
    // refused before its key is claimed), which starts the hold-off after
    // which the ingress refuses the event's purchases with nothing read.
    let mut refused = 0;
    for _ in 0..100 {
        match api.purchase(&token, event_id, &Uuid::new_v4().to_string(), 1).await? {
            Purchase::Refused(code) if code == "sold_out" => refused += 1,
            _ => refused = 0,
        }
        if refused == 2 {
            return Ok(event_id);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the door did not see the sell-out within 10 s")
}

#[derive(Debug, Serialize)]
pub struct StreamsReport {
    pub streams: u32,
    /// The ingress' resident memory with every purchase made and no stream
    /// open, then with every stream open and waiting.
    pub rss_before_bytes: u64,
    pub rss_open_bytes: u64,
    /// Streams open at that moment (the rest failed to open in time).
    pub open: u32,
    pub bytes_per_stream: f64,
    /// From each hold's decision (the allocator's clock) to its `held`
    /// event arriving on the stream.
    pub decision_to_stream: Latencies,
    /// Streams that ended or failed before their `held` event.
    pub missed: u32,
    pub open_secs: f64,
}

/// `streams` buyers each make a purchase while the allocator is paused,
/// open its event stream and wait there; the ingress' memory is read with
/// every stream open; then the allocator resumes and decides them all at
/// once, as at a sale's opening, and each stream's `held` event is timed
/// from its decision.
pub async fn streams(
    api: &Api,
    tokens: &Tokens,
    streams: u32,
    ingress_pid: u32,
    allocator_pid: u32,
) -> anyhow::Result<StreamsReport> {
    // Long enough to outlast the opening of every stream; short, because a
    // hold still waiting keeps the expirers' group offset (and so a later
    // check's wait for a quiet pipeline) where it is.
    const HOLD_TTL_SECS: u32 = 30;
    const OPEN_WITHIN: Duration = Duration::from_secs(20);
    let event_id = open_event(api, tokens, "streams bench", streams.into(), HOLD_TTL_SECS).await?;
    let prefix = format!("streams-{}-", Uuid::new_v4().simple());
    let buyers: Vec<String> =
        (0..streams).map(|i| tokens.buyer.mint(&format!("{prefix}{i}"), 3600)).collect::<Result<_, _>>()?;
    let paused = Paused::new(allocator_pid)?;

    let gate = Arc::new(Semaphore::new(256));
    let mut buying = JoinSet::new();
    for (i, token) in buyers.iter().enumerate() {
        let (api, token, gate) = (api.clone(), token.clone(), gate.clone());
        buying.spawn(async move {
            let _permit = gate.acquire_owned().await?;
            anyhow::Ok((i, purchase(&api, &token, event_id).await?))
        });
    }
    let mut intents = vec![Uuid::nil(); buyers.len()];
    while let Some(done) = buying.join_next().await {
        let (i, intent) = done??;
        intents[i] = intent;
    }
    let rss_before = rss_bytes(ingress_pid)?;

    // Every stream open and its first (queued) event read, then the
    // allocator goes on.
    let opened = Arc::new(Barrier::new(buyers.len() + 1));
    let open = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let mut following = JoinSet::new();
    let started = Instant::now();
    for (token, intent) in buyers.into_iter().zip(intents) {
        let (api, gate, opened, open) = (api.clone(), gate.clone(), opened.clone(), open.clone());
        following.spawn(async move {
            // Opened and its first event read within the bound, or missed:
            // the allocator stays paused until every stream is either.
            let opening = async {
                let _permit = gate.acquire_owned().await.ok()?;
                let stream = api.stream(&token, &format!("/v1/intents/{intent}/events"), None).await;
                let Ok(Opened::Stream(mut stream)) = stream else { return None };
                stream.next().await.ok().flatten()?;
                Some(stream)
            };
            let stream = tokio::time::timeout(OPEN_WITHIN, opening).await.ok().flatten();
            if stream.is_some() {
                open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            opened.wait().await;
            let mut stream = stream?;
            loop {
                let event = stream.next().await.ok()??;
                let status = event.json().ok()?;
                if status["status"] == "held" {
                    let arrived_ms = chrono::Utc::now().timestamp_millis();
                    let expires = status["order"]["expires_at"].as_str()?;
                    let expires_ms = chrono::DateTime::parse_from_rfc3339(expires).ok()?.timestamp_millis();
                    let decided_ms = expires_ms - i64::from(HOLD_TTL_SECS) * 1000;
                    return Some((arrived_ms - decided_ms).max(0) as f64);
                }
            }
        });
    }
    opened.wait().await;
    let open_secs = started.elapsed().as_secs_f64();
    let rss_open = rss_bytes(ingress_pid)?;
    let open = open.load(std::sync::atomic::Ordering::Relaxed);
    drop(paused);

    let mut latencies = Vec::with_capacity(streams as usize);
    let mut missed = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    while let Ok(Some(done)) = tokio::time::timeout_at(deadline, following.join_next()).await {
        match done? {
            Some(ms) => latencies.push(ms),
            None => missed += 1,
        }
    }
    missed += following.len() as u32;
    Ok(StreamsReport {
        streams,
        rss_before_bytes: rss_before,
        rss_open_bytes: rss_open,
        open,
        bytes_per_stream: rss_open.saturating_sub(rss_before) as f64 / f64::from(open.max(1)),
        decision_to_stream: Latencies::of(latencies),
        missed,
        open_secs,
    })
}

#[derive(Debug, Serialize)]
pub struct PacedReport {
    pub rate_per_sec: f64,
    pub secs: f64,
    pub sent: u64,
    /// Answers by kind: accepted, come back later, a refusal's problem
    /// code, or "error" (a transport failure or an unexpected answer).
    pub statuses: BTreeMap<String, u64>,
    /// From when each accepted purchase was due to its 202: a late start
    /// (the client or a full connection pool holding it back) counts
    /// against the server, as it would for a buyer. Other answers are only
    /// counted, in `statuses`: a fast refusal is no answer to time.
    pub answer: Latencies,
}

/// Purchases at `rate` per second for `secs`, each due at its own instant
/// whatever the answers before it, as buyers arrive.
pub async fn paced(api: &Api, tokens: &Tokens, rate: f64, secs: f64) -> anyhow::Result<PacedReport> {
    if !(rate > 0.0 && secs > 0.0) {
        bail!("a paced run needs a positive rate and duration");
    }
    let event_id = open_event(api, tokens, "paced bench", 10_000_000, 30).await?;
    let token = tokens.buyer.mint(&format!("paced-{}", Uuid::new_v4().simple()), 3600)?;
    let total = (rate * secs) as u64;
    let mut statuses = BTreeMap::new();
    let mut answered = Vec::with_capacity(total as usize);
    let mut record = |(answer, ms): (String, f64)| {
        if answer == "accepted" {
            answered.push(ms);
        }
        *statuses.entry(answer).or_insert(0) += 1;
    };
    let start = tokio::time::Instant::now();
    let mut sending = JoinSet::new();
    for i in 0..total {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due).await;
        let (api, token) = (api.clone(), token.clone());
        sending.spawn(async move {
            let answer = match api.purchase(&token, event_id, &Uuid::new_v4().to_string(), 1).await {
                Ok(Purchase::Accepted(_)) => "accepted".to_owned(),
                Ok(Purchase::RetryAfter(_)) => "come back later (429 or 503)".to_owned(),
                Ok(Purchase::Refused(code)) => code,
                Err(_) => "error".to_owned(),
            };
            (answer, due.elapsed().as_secs_f64() * 1000.0)
        });
        // Reaped as it goes, so the set holds only what is in flight.
        while let Some(done) = sending.try_join_next() {
            record(done?);
        }
    }
    while let Some(done) = sending.join_next().await {
        record(done?);
    }
    Ok(PacedReport { rate_per_sec: rate, secs, sent: total, statuses, answer: Latencies::of(answered) })
}

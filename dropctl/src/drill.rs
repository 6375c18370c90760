//! A flash sale, played out: an event with N tickets, M > N buyers arriving
//! at once, then each buyer with a hold pays, cancels or walks away. Used by
//! the demo (`dropctl demo`) and by the end-to-end tests.
//!
//! With a waiting room ([`RoomPlan`]) the sale opens a few seconds later:
//! every buyer first joins the pre-queue, the draw at the opening places
//! them, and each buys once admitted; the published draw is then checked.
//!
//! The crowd acts in two waves with a barrier between them: first every
//! buyer tries to buy and learns their outcome; only then do holders pay or
//! cancel. At the barrier the sale must be sold out with exactly N units
//! held, and after the second wave and the expiries the books must balance.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use dropline::auth::Tokens;
use dropline::stock::{Ledger, StockLevels};
use rand::seq::SliceRandom;
use serde_json::json;
use sqlx::MySqlPool;
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::api::{Api, Purchase};
use crate::invariants::{self, CheckOptions, OrderCounts, Verdict};
use crate::quiet::{self, PipelineArgs, Quiet};

#[derive(Debug, Clone)]
pub struct DropPlan {
    pub tickets: u32,
    pub buyers: u32,
    /// Buyers in flight at once.
    pub concurrency: usize,
    pub hold_ttl_secs: u32,
    pub per_user_limit: u32,
    /// Shares of holders who pay and who cancel; the rest walk away and
    /// their holds expire.
    pub pay_share: f64,
    pub cancel_share: f64,
    /// Share of holders who open a payment in time but complete it only
    /// after their hold expired: their money must be recorded for refund.
    pub late_pay_share: f64,
    /// How many times the provider sends each payment webhook.
    pub webhook_copies: u32,
    /// Prefix of buyer ids, so several drills can share a deployment.
    pub user_prefix: String,
    /// How late a hold may end past its deadline (the check's grace;
    /// [`invariants::production_grace`] unless a test needs another).
    pub grace: Duration,
    /// The deployment's consumer groups: the drill checks once they have
    /// caught up. Without it, it checks once the deadlines and their grace
    /// windows have passed.
    pub pipeline: Option<PipelineArgs>,
    /// Sell through a waiting room.
    pub room: Option<RoomPlan>,
}

/// A drop through a waiting room.
#[derive(Debug, Clone, Copy)]
pub struct RoomPlan {
    /// The sale opens (and the pre-queue is drawn) this long after the
    /// event is created; the pre-queue is open from the start. At least 6 s:
    /// a room is set at least 5 s before its opening.
    pub opens_in_secs: u32,
    pub outflow_per_sec: u32,
    pub time_to_act_secs: u32,
    /// A proof of work each buyer solves to join (0: none).
    pub proof_of_work_bits: u8,
}

/// What the drill found of a waiting room's draw.
#[derive(Debug, Clone, Default)]
pub struct DrawReport {
    pub entrants: u64,
    pub seed_commitment: String,
    /// Buyers whose ticket was in the draw (they joined before the opening).
    pub buyers_drawn: u64,
    /// Why the published draw does not hold, if it does not.
    pub mismatch: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Held(Uuid),
    Rejected(String),
    /// Refused at the door (sold out, closed) without being queued.
    Refused(String),
}

struct Buyer {
    /// Their waiting-room ticket, when the drop has a room.
    ticket: Option<Uuid>,
    token: String,
    outcome: Outcome,
}

#[derive(Debug, Clone, Default)]
pub struct DropReport {
    pub event_id: u64,
    pub tickets: u32,
    pub buyers: u32,
    pub accepted: u64,
    pub held: u64,
    pub rejected: Vec<(String, u64)>,
    pub refused_at_door: Vec<(String, u64)>,
    pub flood_secs: f64,
    /// When the flood started and the drop ended, Unix seconds.
    pub started_at: f64,
    pub ended_at: f64,
    pub at_sellout_redis: StockLevels,
    pub at_sellout_mysql_held: u64,
    pub paid: u64,
    pub refunds: u64,
    pub cancelled: u64,
    pub walked_away: u64,
    /// Holders whose hold lapsed before they could pay or cancel.
    pub too_late: u64,
    /// Holds the record refused (only a Redis that lost writes causes
    /// these); their buyers were told so, and any payment is refunded.
    pub voided: u64,
    pub settled: bool,
    pub verdict: Option<Verdict>,
    /// With a waiting room: its draw, checked.
    pub draw: Option<DrawReport>,
}

impl DropReport {
    pub fn oversold(&self) -> u64 {
        self.verdict.as_ref().map_or(0, |v| (v.mysql.held + v.mysql.paid).saturating_sub(v.mysql.capacity))
    }

    pub fn final_counts(&self) -> OrderCounts {
        self.verdict.as_ref().map(|v| v.mysql.clone()).unwrap_or_default()
    }

    /// All the stock was handed out, the pipeline settled, every invariant
    /// holds, and every payment the provider had acknowledged is recorded:
    /// as the paid order's one capture, or for refund.
    pub fn passed(&self) -> bool {
        let m = self.final_counts();
        self.held >= u64::from(self.tickets)
            && m.captured_payments == self.paid
            && m.refunds == self.refunds
            && self.settled
            && self.verdict.as_ref().is_some_and(|v| v.all_hold())
            && self.draw.as_ref().is_none_or(|d| d.mismatch.is_none())
    }

    /// The flood ended with exactly N units held, in Redis and in MySQL, and
    /// none left. Holds that lapse before every buyer was answered (a slow
    /// or faulty pipeline) go back on sale and are sold again, so this is
    /// asked of healthy runs only.
    pub fn sold_out_exactly(&self) -> bool {
        let n = u64::from(self.tickets);
        self.held == n
            && self.at_sellout_redis.available == 0
            && self.at_sellout_redis.held == n
            && self.at_sellout_mysql_held == n
    }
}

fn tally(items: impl Iterator<Item = String>) -> Vec<(String, u64)> {
    let mut counts: std::collections::BTreeMap<String, u64> = Default::default();
    for i in items {
        *counts.entry(i).or_default() += 1;
    }
    counts.into_iter().collect()
}

pub async fn run(
    api: &Api,
    tokens: &Tokens,
    db: &MySqlPool,
    ledger: &Ledger,
    plan: &DropPlan,
) -> anyhow::Result<DropReport> {
    if plan.buyers <= plan.tickets {
        bail!("a drop needs more buyers than tickets");
    }
    let admin = tokens.admin.mint("dropctl", 3600)?;
    let now = chrono::Utc::now();
    let opens_in = plan.room.map_or(-1, |r| i64::from(r.opens_in_secs));
    let event = api
        .create_event(
            &admin,
            &json!({
                "name": format!("Dropline demo drop {}", now.format("%H:%M:%S")),
                "venue": "Loopback Arena",
                "starts_at": now + chrono::Duration::days(30),
                "sale_opens_at": now + chrono::Duration::seconds(opens_in),
                "sale_closes_at": now + chrono::Duration::hours(1),
                "capacity": plan.tickets,
                "price_cents": 4_500,
                "currency": "EUR",
                "per_user_limit": plan.per_user_limit,
                "hold_ttl_secs": plan.hold_ttl_secs,
            }),
        )
        .await?;
    let event_id = event["id"].as_u64().context("event id")?;
    if let Some(room) = plan.room {
        api.set_room(&admin, event_id, room.outflow_per_sec, room.time_to_act_secs, room.proof_of_work_bits).await?;
    }
    let mut report = DropReport { event_id, tickets: plan.tickets, buyers: plan.buyers, ..Default::default() };

    // Wave one: the flood.
    let started = Instant::now();
    report.started_at = unix_now();
    let gate = Arc::new(Semaphore::new(plan.concurrency.max(1)));
    let mut tasks = Vec::with_capacity(plan.buyers as usize);
    let through_room = plan.room.is_some();
    let proof_of_work = plan.room.is_some_and(|r| r.proof_of_work_bits > 0);
    for i in 0..plan.buyers {
        let (api, gate) = (api.clone(), gate.clone());
        let token = tokens.buyer.mint(&format!("{}{i}", plan.user_prefix), 3600)?;
        tasks.push(tokio::spawn(async move {
            let (outcome, ticket) = if through_room {
                wait_in_line(&api, &gate, &token, event_id, proof_of_work).await?
            } else {
                let _permit = gate.acquire_owned().await?;
                (buy(&api, &token, event_id, None).await?, None)
            };
            anyhow::Ok(Buyer { token, outcome, ticket })
        }));
    }
    let mut buyers = Vec::with_capacity(tasks.len());
    for t in tasks {
        buyers.push(t.await??);
    }
    report.flood_secs = started.elapsed().as_secs_f64();
    report.accepted = buyers.iter().filter(|b| !matches!(b.outcome, Outcome::Refused(_))).count() as u64;
    report.held = buyers.iter().filter(|b| matches!(b.outcome, Outcome::Held(_))).count() as u64;
    report.rejected = tally(buyers.iter().filter_map(|b| match &b.outcome {
        Outcome::Rejected(r) => Some(r.clone()),
        _ => None,
    }));
    report.refused_at_door = tally(buyers.iter().filter_map(|b| match &b.outcome {
        Outcome::Refused(r) => Some(r.clone()),
        _ => None,
    }));
    if through_room {
        let draw = persist(Instant::now() + Duration::from_secs(30), || api.draw(event_id)).await?;
        let drawn: std::collections::HashSet<Uuid> = draw.order.iter().copied().collect();
        report.draw = Some(DrawReport {
            entrants: draw.order.len() as u64,
            seed_commitment: draw.seed_commitment.clone(),
            buyers_drawn: buyers.iter().filter(|b| b.ticket.is_some_and(|t| drawn.contains(&t))).count() as u64,
            mismatch: dropline::room::draw::verify(&draw).err().map(|e| e.to_string()),
        });
    }

    // The barrier: the settler has recorded every decision.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        report.at_sellout_redis = ledger.levels(event_id).await?.unwrap_or_default();
        // A MySQL restart only delays the barrier.
        match invariants::mysql_counts(db, event_id, Duration::ZERO).await {
            Ok(m) => {
                report.at_sellout_mysql_held = m.held;
                if m.intents == report.accepted {
                    break;
                }
            }
            Err(e) if e.downcast_ref().is_some_and(dropline::db::is_transient) => {
                tracing::warn!(error = %format!("{e:#}"), event_id, "mysql unavailable at the barrier; polling on");
            }
            Err(e) => return Err(e),
        }
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Wave two: holders decide.
    let mut holders: Vec<(String, Uuid)> = buyers
        .into_iter()
        .filter_map(|b| match b.outcome {
            Outcome::Held(order) => Some((b.token, order)),
            _ => None,
        })
        .collect();
    holders.shuffle(&mut rand::rng());
    let n = holders.len();
    let share = |s: f64| (n as f64 * s).round() as usize;
    let paying = share(plan.pay_share).min(n);
    let late = share(plan.late_pay_share).min(n - paying);
    let cancelling = share(plan.cancel_share).min(n - paying - late);
    report.walked_away = (n - paying - late - cancelling) as u64;
    let ttl = Duration::from_secs(plan.hold_ttl_secs.into());
    let copies = plan.webhook_copies.max(1);
    let mut tasks = Vec::new();
    let acting: Vec<(String, Uuid)> = holders.iter().take(paying + late + cancelling).cloned().collect();
    for (i, (token, order)) in acting.into_iter().enumerate() {
        let (api, gate) = (api.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            if i < paying {
                let _permit = gate.acquire_owned().await?;
                persist(deadline, || api.pay(&token, order, copies)).await
            } else if i < paying + late {
                // Opens the payment now, completes it after the deadline.
                let checkout = {
                    let _permit = gate.clone().acquire_owned().await?;
                    match persist(deadline, || api.start_payment(&token, order)).await? {
                        Ok(checkout) => checkout,
                        Err(code) => return Ok(code),
                    }
                };
                tokio::time::sleep(ttl + Duration::from_millis(1500)).await;
                let _permit = gate.acquire_owned().await?;
                persist(deadline, || api.confirm(&checkout, copies)).await
            } else {
                let _permit = gate.acquire_owned().await?;
                persist(deadline, || api.cancel(&token, order)).await
            }
        }));
    }
    let mut captured = Vec::new();
    for (t, (token, order)) in tasks.into_iter().zip(&holders) {
        let answer: anyhow::Result<String> = t.await?;
        match answer?.as_str() {
            "captured" => {
                report.paid += 1;
                captured.push((token.clone(), *order));
            }
            "order_voided" | "voided" => report.voided += 1,
            "refund_required" => report.refunds += 1,
            "cancelled" => report.cancelled += 1,
            // The hold lapsed before the holder acted (a slow or faulty
            // pipeline): it expires like a walk-away's.
            "order_expired" | "order_not_held" | "expired" => report.too_late += 1,
            other => bail!("unexpected answer from a holder's action: {other}"),
        }
    }

    // The walk-aways expire; then the books must balance. The wait is for
    // the pipeline to catch up, never for the books to look right.
    let payments = report.paid + report.refunds;
    let settle = Quiet {
        pipeline: plan.pipeline.clone(),
        past_deadlines: true,
        grace: plan.grace,
        timeout: ttl + plan.grace + Duration::from_secs(60),
    };
    report.settled = quiet::wait_quiet(db, event_id, &settle).await?;
    // A payment captured for a hold the record later voided is refunded:
    // ask, as the buyer's app would, how each paid order ended.
    for (token, order) in &captured {
        let state = persist(Instant::now() + Duration::from_secs(30), || api.order_state(token, *order)).await?;
        if state == "voided" {
            report.paid -= 1;
            report.refunds += 1;
            report.voided += 1;
        }
    }
    let options =
        CheckOptions { accepted: Some(report.accepted), acknowledged_payments: Some(payments), grace: plan.grace };
    report.verdict = Some(invariants::verify(db, ledger, event_id, &options).await?);
    report.ended_at = unix_now();
    Ok(report)
}

fn unix_now() -> f64 {
    chrono::Utc::now().timestamp_millis() as f64 / 1000.0
}

/// Retries a buyer's call while the service is unreachable or answers 5xx
/// (an order whose records are catching up after a fault answers 503), as a
/// buyer's app would (every call here is safe to repeat), until `deadline`:
/// after the Retry-After the server asked for, capped at 5 s, or else after
/// a backoff of up to 1 s.
async fn persist<T, F, Fut>(deadline: Instant, mut call: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut wait = Duration::from_millis(100);
    loop {
        match call().await {
            Err(e) if crate::api::is_retryable(&e) && Instant::now() < deadline => {
                let asked = crate::api::retry_after(&e).map(|d| d.min(Duration::from_secs(5)));
                tokio::time::sleep(asked.unwrap_or(wait).min(deadline.saturating_duration_since(Instant::now()))).await;
                wait = (wait * 2).min(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

/// One buyer in a waiting room: joins, follows their ticket (as often as
/// its wait estimate suggests), and buys once admitted. Holds a permit of
/// `gate` only while a request is in flight, so the whole crowd can wait in
/// line at once.
async fn wait_in_line(
    api: &Api,
    gate: &Arc<Semaphore>,
    token: &str,
    event_id: u64,
    proof_of_work: bool,
) -> anyhow::Result<(Outcome, Option<Uuid>)> {
    let deadline = Instant::now() + Duration::from_secs(180);
    let ticket = {
        let _permit = gate.acquire().await?;
        persist(deadline, || api.join(token, event_id, proof_of_work)).await?.ticket_id
    };
    loop {
        let standing = {
            let _permit = gate.acquire().await?;
            persist(deadline, || api.standing(token, event_id)).await?
        };
        let pause = match standing.status.as_str() {
            "admitted" => {
                let _permit = gate.acquire().await?;
                return Ok((buy(api, token, event_id, standing.admission_token.as_deref()).await?, Some(ticket)));
            }
            "sold_out" | "closed" | "lapsed" | "purchased" => {
                return Ok((Outcome::Refused(format!("{} (waiting room)", standing.status)), Some(ticket)));
            }
            "waiting" => standing.estimated_wait_secs.map_or(500, |s| (s * 500).clamp(250, 2_000)),
            _ => 1_000,
        };
        if Instant::now() > deadline {
            bail!("ticket {ticket} was never let through");
        }
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

/// One buyer: purchase (retrying politely on 429/503 with the same
/// Idempotency-Key), then follow the intent until it is decided.
async fn buy(api: &Api, token: &str, event_id: u64, admission: Option<&str>) -> anyhow::Result<Outcome> {
    let key = Uuid::new_v4().to_string();
    let deadline = Instant::now() + Duration::from_secs(120);
    let intent = loop {
        match persist(deadline, || api.purchase_in_turn(token, event_id, &key, 1, admission)).await? {
            Purchase::Accepted(id) => break id,
            Purchase::Refused(code) => return Ok(Outcome::Refused(code)),
            Purchase::RetryAfter(wait) => {
                if Instant::now() > deadline {
                    bail!("purchase kept being deferred");
                }
                tokio::time::sleep(wait).await;
            }
        }
    };
    let mut backoff = Duration::from_millis(50);
    loop {
        let status = persist(deadline, || api.intent(token, intent)).await?;
        match status.status.as_str() {
            "queued" => {}
            "rejected" => return Ok(Outcome::Rejected(status.reason.unwrap_or_default())),
            _ => return Ok(Outcome::Held(intent)),
        }
        if Instant::now() > deadline {
            bail!("intent {intent} was never decided");
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

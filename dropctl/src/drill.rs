//! A flash sale, played out: an event with N tickets, M > N buyers arriving
//! at once, then each buyer with a hold pays, cancels or walks away. Used by
//! the demo (`dropctl demo`) and by the end-to-end tests.
//!
//! With a waiting room ([`RoomPlan`]) the sale opens a few seconds later:
//! every buyer first joins the pre-queue and follows their ticket on its
//! event stream, the draw at the opening places them, and each buys once
//! admitted; the published draw is then checked, and what the buyers saw
//! of the line reported ([`LineReport`]).
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

use crate::api::{Api, Opened, Purchase, Ticket};
use crate::invariants::{self, CheckOptions, OrderCounts, Verdict};
use crate::load::quantile;
use crate::quiet::{self, PipelineArgs, Quiet};

#[derive(Debug, Clone)]
pub struct DropPlan {
    pub tickets: u32,
    /// Tickets the host accepts to sell beyond them (the event's oversell
    /// allowance): the drop sells out at tickets + allowance.
    pub oversell_allowance: u32,
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
    /// Share of the payers the provider gives trouble, in three equal
    /// parts: a card declined first (the buyer tries again and pays), a
    /// confirmation that times out (the buyer confirms again), a payment
    /// confirmed twice (two webhooks of two event ids). Each must end as one
    /// paid order.
    pub payment_trouble_share: f64,
    /// Share of the payers who then cancel their paid order, within the
    /// event's cancellation policy (the drill sets one: until the sale
    /// closes, [`POLICY_REFUND_PERCENT`] refunded).
    pub paid_cancel_share: f64,
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
    /// The payment provider's API: the check compares its refunds with the
    /// record's.
    pub provider: Option<String>,
    /// Sell through a waiting room.
    pub room: Option<RoomPlan>,
}

/// The share of a paid order's price the drill's cancellation policy
/// refunds.
pub const POLICY_REFUND_PERCENT: u8 = 80;

/// What the provider did to a payer, and how many paid all the same.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PaymentTroubles {
    pub declined_then_paid: u64,
    pub timed_out_then_paid: u64,
    pub confirmed_twice: u64,
}

/// The trouble a payer meets at the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trouble {
    Declined,
    TimedOut,
    Doubled,
}

impl Trouble {
    const ALL: [Trouble; 3] = [Trouble::Declined, Trouble::TimedOut, Trouble::Doubled];
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
    /// From the sale's opening to the draw, by the ingress' clock.
    pub secs_after_opening: Option<f64>,
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
    /// What they saw of the line.
    line: LineView,
    /// When their hold was decided (Unix ms, the allocator's clock).
    held_at_ms: Option<i64>,
    token: String,
    outcome: Outcome,
}

#[derive(Debug, Clone, Default)]
pub struct DropReport {
    pub event_id: u64,
    pub tickets: u32,
    pub oversell_allowance: u32,
    pub buyers: u32,
    pub accepted: u64,
    pub held: u64,
    pub rejected: Vec<(String, u64)>,
    pub refused_at_door: Vec<(String, u64)>,
    pub flood_secs: f64,
    /// When the flood started and the drop ended, Unix seconds.
    pub started_at: f64,
    pub ended_at: f64,
    /// Redis's stock the moment the flood's last buyer was answered.
    pub at_sellout_redis: StockLevels,
    /// Units the record holds as held (or as a hold that has since ended)
    /// once it has every decision of the flood.
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
    /// Payers the provider gave trouble who paid all the same: after a
    /// declined card, after a timeout, confirmed twice.
    pub troubles: PaymentTroubles,
    /// Payers who then cancelled within the policy (their units back on
    /// sale, the policy's share refunded; counted in `refunds`, not `paid`).
    pub cancelled_after_paying: u64,
    pub settled: bool,
    pub verdict: Option<Verdict>,
    /// With a waiting room: its draw, checked.
    pub draw: Option<DrawReport>,
    /// With a waiting room: what its buyers saw of the line.
    pub line: Option<LineReport>,
    /// To the last unit's hold (its decision time), from the sale's opening
    /// when the drop has a waiting room, else from the flood's start; when
    /// every unit was held in the flood.
    pub sell_out_secs: Option<f64>,
}

/// What the buyers in a waiting room saw of the line, on their tickets'
/// event streams.
#[derive(Debug, Clone, Default)]
pub struct LineReport {
    /// Buyers who followed their ticket on its stream (the rest polled:
    /// the ingress had no stream to spare).
    pub streamed: u64,
    pub events: u64,
    /// From the last hold's decision to each waiting buyer's `sold_out`
    /// event: the 99th percentile, and how many got one.
    pub sold_out_p99: Option<Duration>,
    pub told_sold_out: u64,
    /// How far off the first wait estimate each admitted buyer was shown,
    /// against when they were let through: the 90th percentile, as a share
    /// of the real wait (of a second, for shorter waits: estimates are in
    /// whole seconds).
    pub eta_error_p90: Option<f64>,
    pub estimated: u64,
}

impl LineReport {
    fn of(buyers: &[Buyer]) -> Self {
        let last_hold = buyers.iter().filter_map(|b| b.held_at_ms).max();
        let mut sold_out: Vec<Duration> = buyers
            .iter()
            .filter_map(|b| Some(Duration::from_millis((b.line.sold_out_at_ms? - last_hold?).max(0) as u64)))
            .collect();
        let mut errors: Vec<f64> = buyers
            .iter()
            .filter_map(|b| {
                let ((shown_at, estimate), admitted_at) = (b.line.first_estimate?, b.line.admitted_at?);
                let real = admitted_at.saturating_duration_since(shown_at).as_secs_f64();
                Some((estimate as f64 - real).abs() / real.max(1.0))
            })
            .collect();
        sold_out.sort();
        errors.sort_by(f64::total_cmp);
        LineReport {
            streamed: buyers.iter().filter(|b| b.line.streamed).count() as u64,
            events: buyers.iter().map(|b| b.line.events).sum(),
            sold_out_p99: quantile(&sold_out, 0.99),
            told_sold_out: sold_out.len() as u64,
            eta_error_p90: quantile(&errors, 0.90),
            estimated: errors.len() as u64,
        }
    }
}

impl DropReport {
    /// Units held or sold beyond the capacity at the end (inside the
    /// allowance, if the invariants hold).
    pub fn oversold(&self) -> u64 {
        self.verdict.as_ref().map_or(0, |v| v.mysql.oversold())
    }

    /// Every unit the drop may sell: its tickets and the allowance.
    pub fn units(&self) -> u64 {
        u64::from(self.tickets) + u64::from(self.oversell_allowance)
    }

    pub fn final_counts(&self) -> OrderCounts {
        self.verdict.as_ref().map(|v| v.mysql.clone()).unwrap_or_default()
    }

    /// All the stock was handed out, the pipeline settled, every invariant
    /// holds, and every payment the provider had acknowledged is recorded:
    /// as the paid order's one capture, or for refund.
    pub fn passed(&self) -> bool {
        let m = self.final_counts();
        self.held >= self.units()
            && m.captured_payments == self.paid
            && m.refunds == self.refunds
            && self.settled
            && self.verdict.as_ref().is_some_and(|v| v.all_hold())
            && self.draw.as_ref().is_none_or(|d| d.mismatch.is_none())
    }

    /// The flood ended with exactly N units held (tickets and allowance), in
    /// Redis and in MySQL, and
    /// none left. Holds that lapse before every buyer was answered (a slow
    /// or faulty pipeline) go back on sale and are sold again, so this is
    /// asked of healthy runs only.
    pub fn sold_out_exactly(&self) -> bool {
        let n = self.units();
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
    let event_id = open(api, tokens, plan).await?;
    play(api, tokens, db, ledger, plan, event_id).await
}

/// Creates the drop's event (and its waiting room); its id.
pub async fn open(api: &Api, tokens: &Tokens, plan: &DropPlan) -> anyhow::Result<u64> {
    if u64::from(plan.buyers) <= u64::from(plan.tickets) + u64::from(plan.oversell_allowance) {
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
                "oversell_allowance": plan.oversell_allowance,
                "price_cents": 4_500,
                "currency": "EUR",
                "per_user_limit": plan.per_user_limit,
                "hold_ttl_secs": plan.hold_ttl_secs,
            }),
        )
        .await?;
    let event_id = event["id"].as_u64().context("event id")?;
    let policy = json!({ "until": now + chrono::Duration::hours(1), "refund_percent": POLICY_REFUND_PERCENT });
    // Both calls set what they say, so a retry after a 503 (a deadlock the
    // record broke, say, with other hosts' changes at the same moment) or a
    // lost answer is safe.
    let deadline = Instant::now() + Duration::from_secs(30);
    let policy = json!({ "cancellation": policy });
    persist(deadline, || api.change_event(&admin, event_id, &policy)).await?;
    if let Some(room) = plan.room {
        persist(deadline, || {
            api.set_room(&admin, event_id, room.outflow_per_sec, room.time_to_act_secs, room.proof_of_work_bits)
        })
        .await?;
    }
    Ok(event_id)
}

/// Plays the drop out on the event [`open`] created.
pub async fn play(
    api: &Api,
    tokens: &Tokens,
    db: &MySqlPool,
    ledger: &Ledger,
    plan: &DropPlan,
    event_id: u64,
) -> anyhow::Result<DropReport> {
    let mut report = DropReport {
        event_id,
        tickets: plan.tickets,
        oversell_allowance: plan.oversell_allowance,
        buyers: plan.buyers,
        ..Default::default()
    };

    // Wave one: the flood.
    let started = Instant::now();
    report.started_at = unix_now();
    let gate = Arc::new(Semaphore::new(plan.concurrency.max(1)));
    let mut tasks = Vec::with_capacity(plan.buyers as usize);
    let through_room = plan.room.is_some();
    let ttl_ms = i64::from(plan.hold_ttl_secs) * 1000;
    let proof_of_work = plan.room.is_some_and(|r| r.proof_of_work_bits > 0);
    let opens_at = match through_room {
        true => Some(room_time(&api.room(event_id).await?, "sale_opens_at").context("the room's opening")?),
        false => None,
    };
    for i in 0..plan.buyers {
        let (api, gate) = (api.clone(), gate.clone());
        let token = tokens.buyer.mint(&format!("{}{i}", plan.user_prefix), 3600)?;
        tasks.push(tokio::spawn(async move {
            let ((outcome, expires_at_ms), ticket, line) = if through_room {
                wait_in_line(&api, &gate, &token, event_id, proof_of_work).await?
            } else {
                let _permit = gate.acquire_owned().await?;
                (buy(&api, &token, event_id, None).await?, None, LineView::default())
            };
            let held_at_ms = expires_at_ms.map(|ms| ms - ttl_ms);
            anyhow::Ok(Buyer { token, outcome, ticket, line, held_at_ms })
        }));
    }
    let mut buyers = Vec::with_capacity(tasks.len());
    for t in tasks {
        buyers.push(t.await??);
    }
    report.flood_secs = started.elapsed().as_secs_f64();
    report.accepted = buyers.iter().filter(|b| !matches!(b.outcome, Outcome::Refused(_))).count() as u64;
    report.held = buyers.iter().filter(|b| matches!(b.outcome, Outcome::Held(_))).count() as u64;
    // Sampled before anything else can take time: holds lapse from here on.
    report.at_sellout_redis = ledger.levels(event_id).await?.unwrap_or_default();
    let last_hold_ms = buyers.iter().filter_map(|b| b.held_at_ms).max();
    report.sell_out_secs = last_hold_ms
        .filter(|_| report.held >= report.units())
        .map(|ms| (ms as f64 / 1000.0 - opens_at.unwrap_or(report.started_at)).max(0.0));
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
            secs_after_opening: room_time(&api.room(event_id).await?, "drawn_at")
                .zip(opens_at)
                .map(|(drawn, opened)| drawn - opened),
        });
        report.line = Some(LineReport::of(&buyers));
    }

    // The barrier: the settler has recorded every decision. The counts are
    // read one query after another, the orders' units before the intents:
    // units read before the last batch committed would be short, so once
    // every intent is in they are read again (a decision's order is written
    // in its transaction).
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut all_decided = false;
    loop {
        // A MySQL restart only delays the barrier.
        match invariants::mysql_counts(db, event_id, Duration::ZERO).await {
            Ok(m) => {
                // A hold that lapsed while the barrier waited was still one
                // of the flood's.
                report.at_sellout_mysql_held = m.held + m.expired + m.paid + m.cancelled;
                if all_decided {
                    break;
                }
                all_decided = m.intents == report.accepted;
                if all_decided {
                    continue;
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
    let troubled = (paying as f64 * plan.payment_trouble_share).round() as usize;
    // The last of the payers (not the troubled ones) cancel once paid.
    let cancelling_paid = ((paying as f64 * plan.paid_cancel_share).round() as usize).min(paying - troubled);
    let late = share(plan.late_pay_share).min(n - paying);
    let cancelling = share(plan.cancel_share).min(n - paying - late);
    report.walked_away = (n - paying - late - cancelling) as u64;
    let copies = plan.webhook_copies.max(1);
    let mut tasks = Vec::new();
    let acting: Vec<(String, Uuid)> = holders.iter().take(paying + late + cancelling).cloned().collect();
    for (i, (token, order)) in acting.into_iter().enumerate() {
        let (api, gate) = (api.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            if i < troubled {
                let _permit = gate.acquire_owned().await?;
                pay_through(&api, deadline, &token, order, Trouble::ALL[i % 3]).await
            } else if i < paying {
                let _permit = gate.acquire_owned().await?;
                let paid = persist(deadline, || api.pay(&token, order, copies)).await?;
                if i < paying - cancelling_paid || paid != "captured" {
                    return Ok(paid);
                }
                // Changes their mind: within the policy, so the order is
                // cancelled and the policy's share refunded.
                match persist(deadline, || api.cancel(&token, order)).await?.as_str() {
                    "cancelled" => Ok("cancelled_after_paying".to_owned()),
                    other => bail!("a paid order's cancel within the policy answered {other}"),
                }
            } else if i < paying + late {
                // Opens the payment now, completes it after the deadline
                // (the one starting the payment extended).
                let checkout = {
                    let _permit = gate.clone().acquire_owned().await?;
                    match persist(deadline, || api.start_payment(&token, order)).await? {
                        Ok(checkout) => checkout,
                        Err(code) => return Ok(code),
                    }
                };
                let late_by = (checkout.pay_before - chrono::Utc::now()).to_std().unwrap_or_default();
                tokio::time::sleep(late_by + Duration::from_millis(1500)).await;
                let _permit = gate.acquire_owned().await?;
                persist(deadline, || api.confirm(&checkout.url, copies)).await
            } else {
                let _permit = gate.acquire_owned().await?;
                persist(deadline, || api.cancel(&token, order)).await
            }
        }));
    }
    let mut captured = Vec::new();
    for (i, (t, (token, order))) in tasks.into_iter().zip(&holders).enumerate() {
        let answer: anyhow::Result<String> = t.await?;
        match answer?.as_str() {
            "captured" => {
                report.paid += 1;
                captured.push((token.clone(), *order));
                if i < troubled {
                    let t = &mut report.troubles;
                    *match Trouble::ALL[i % 3] {
                        Trouble::Declined => &mut t.declined_then_paid,
                        Trouble::TimedOut => &mut t.timed_out_then_paid,
                        Trouble::Doubled => &mut t.confirmed_twice,
                    } += 1;
                }
            }
            "cancelled_after_paying" => {
                report.cancelled_after_paying += 1;
                report.refunds += 1;
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
        // A hold lasts its TTL, and a payer's extension (at most 15 min) on
        // top: the wait is bounded by the pipeline catching up, not this.
        timeout: Duration::from_secs(plan.hold_ttl_secs.into()) + plan.grace + Duration::from_secs(120),
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
    let options = CheckOptions {
        accepted: Some(report.accepted),
        acknowledged_payments: Some(payments),
        grace: plan.grace,
        provider: plan.provider.clone(),
    };
    report.verdict = Some(invariants::verify(db, ledger, event_id, &options).await?);
    report.ended_at = unix_now();
    Ok(report)
}

/// A payer the provider gives `trouble`, paying all the same as a buyer's
/// app would: after a declined card, they open the payment again (the same
/// payment; the hold is not extended twice) and pay; after a timeout, they
/// confirm again (the same capture). Returns Dropline's answer to the
/// payment's webhook, as [`Api::pay`] does.
async fn pay_through(
    api: &Api,
    deadline: Instant,
    token: &str,
    order: Uuid,
    trouble: Trouble,
) -> anyhow::Result<String> {
    let checkout = match persist(deadline, || api.start_payment(token, order)).await? {
        Ok(checkout) => checkout,
        Err(code) => return Ok(code),
    };
    match trouble {
        Trouble::Declined => {
            if !persist(deadline, || api.confirm_declined(&checkout.url)).await? {
                bail!("the provider did not decline order {order}'s card as asked");
            }
            match persist(deadline, || api.start_payment(token, order)).await? {
                Ok(again) => persist(deadline, || api.confirm(&again.url, 1)).await,
                Err(code) => Ok(code),
            }
        }
        Trouble::TimedOut => {
            if !api.confirm_timing_out(&checkout.url, 1_000).await? {
                bail!("the provider did not time out on order {order} as asked");
            }
            persist(deadline, || api.confirm(&checkout.url, 1)).await
        }
        Trouble::Doubled => persist(deadline, || api.confirm_twice(&checkout.url)).await,
    }
}

/// A time field of a room's view, in Unix seconds.
fn room_time(room: &serde_json::Value, field: &str) -> Option<f64> {
    let at = chrono::DateTime::parse_from_rfc3339(room[field].as_str()?).ok()?;
    Some(at.timestamp_millis() as f64 / 1000.0)
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

/// What one buyer in a waiting room saw of the line.
#[derive(Debug, Clone, Copy, Default)]
struct LineView {
    /// Followed on the ticket's event stream (not polled).
    streamed: bool,
    events: u64,
    /// The first wait estimate shown while waiting, and when.
    first_estimate: Option<(Instant, u64)>,
    admitted_at: Option<Instant>,
    /// When they were told it is sold out (Unix ms).
    sold_out_at_ms: Option<i64>,
}

/// What a buyer does next about their ticket.
enum Next {
    Wait,
    Buy(Option<String>),
    Leave(String),
}

impl LineView {
    /// Takes in the ticket as it stands now.
    fn saw(&mut self, ticket: &Ticket) -> Next {
        let now = Instant::now();
        match ticket.status.as_str() {
            "admitted" => {
                self.admitted_at.get_or_insert(now);
                Next::Buy(ticket.admission_token.clone())
            }
            "sold_out" => {
                self.sold_out_at_ms.get_or_insert_with(|| chrono::Utc::now().timestamp_millis());
                Next::Leave("sold_out (waiting room)".into())
            }
            "closed" | "lapsed" | "purchased" => Next::Leave(format!("{} (waiting room)", ticket.status)),
            _ => {
                if let (None, Some(estimate)) = (self.first_estimate, ticket.estimated_wait_secs) {
                    self.first_estimate = Some((now, estimate));
                }
                Next::Wait
            }
        }
    }
}

/// One buyer in a waiting room: joins, follows their ticket on its event
/// stream (reconnecting with Last-Event-ID; polling while the ingress has
/// no stream to spare), and buys once admitted. Holds a permit of `gate`
/// only while a request is in flight, so the whole crowd can wait in line
/// at once.
async fn wait_in_line(
    api: &Api,
    gate: &Arc<Semaphore>,
    token: &str,
    event_id: u64,
    proof_of_work: bool,
) -> anyhow::Result<((Outcome, Option<i64>), Option<Uuid>, LineView)> {
    let deadline = Instant::now() + Duration::from_secs(180);
    let ticket = {
        let _permit = gate.acquire().await?;
        persist(deadline, || api.join(token, event_id, proof_of_work)).await?
    };
    let mut line = LineView::default();
    let mut next = line.saw(&ticket);
    let path = format!("/v1/events/{event_id}/queue/events");
    let mut last: Option<String> = None;
    loop {
        match next {
            Next::Buy(admission) => {
                let _permit = gate.acquire().await?;
                let outcome = buy(api, token, event_id, admission.as_deref()).await?;
                return Ok((outcome, Some(ticket.ticket_id), line));
            }
            Next::Leave(why) => return Ok(((Outcome::Refused(why), None), Some(ticket.ticket_id), line)),
            Next::Wait => {}
        }
        if Instant::now() > deadline {
            bail!("ticket {} was never let through", ticket.ticket_id);
        }
        let opened = {
            let _permit = gate.acquire().await?;
            api.stream(token, &path, last.as_deref()).await
        };
        match opened {
            Ok(Opened::Stream(mut stream)) => {
                line.streamed = true;
                // Until a state to act on, the deadline, or the stream
                // drops (then it reconnects where it was, after a pause if
                // it said nothing).
                let mut said = false;
                while let Ok(Ok(Some(event))) = tokio::time::timeout_at(deadline.into(), stream.next()).await {
                    said = true;
                    line.events += 1;
                    last = event.id.clone();
                    next = line.saw(&serde_json::from_str(&event.data)?);
                    if !matches!(next, Next::Wait) {
                        break;
                    }
                }
                if !said {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            Ok(Opened::Ended) => {
                let _permit = gate.acquire().await?;
                next = line.saw(&persist(deadline, || api.standing(token, event_id)).await?);
            }
            Err(e) if crate::api::is_retryable(&e) => {
                // No stream now: poll once, then try the stream again.
                let pause = crate::api::retry_after(&e).unwrap_or(Duration::from_secs(1)).min(Duration::from_secs(5));
                let standing = {
                    let _permit = gate.acquire().await?;
                    persist(deadline, || api.standing(token, event_id)).await?
                };
                next = line.saw(&standing);
                if matches!(next, Next::Wait) {
                    tokio::time::sleep(pause).await;
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// One buyer: purchase (retrying politely on 429/503 with the same
/// Idempotency-Key), then follow the intent until it is decided. With a
/// hold, when it expires (Unix ms).
async fn buy(api: &Api, token: &str, event_id: u64, admission: Option<&str>) -> anyhow::Result<(Outcome, Option<i64>)> {
    let key = Uuid::new_v4().to_string();
    let deadline = Instant::now() + Duration::from_secs(120);
    let intent = loop {
        match persist(deadline, || api.purchase_in_turn(token, event_id, &key, 1, admission)).await? {
            Purchase::Accepted(id) => break id,
            Purchase::Refused(code) => return Ok((Outcome::Refused(code), None)),
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
            "rejected" => return Ok((Outcome::Rejected(status.reason.unwrap_or_default()), None)),
            _ => {
                let expires = status.order.as_ref().and_then(|o| o["expires_at"].as_str());
                let expires = expires.and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
                return Ok((Outcome::Held(intent), expires.map(|t| t.timestamp_millis())));
            }
        }
        if Instant::now() > deadline {
            bail!("intent {intent} was never decided");
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

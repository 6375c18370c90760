//! The purchase path: validate, admit, record the idempotency key, produce
//! the intent, and answer 202 only once the broker has it.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use dropline::kafka::{PublishError, Record, Written};
use dropline::messages::{now_ms, OutcomeKind, PurchaseIntent, RejectReason};
use dropline::stock::{DoorOutcome, LedgerError, Verdict};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::extract::{AdmissionToken, Buyer, EventId, IdempotencyKey, IntentId, JsonBody};
use crate::intents::{intent_id, IntentRecord, KeyClaim, KeyRecord, KeyState, Settled, StoredRefusal};
use crate::layers::{Counter, Outcome, RequestId};
use crate::live::IntentStatus;
use crate::metrics::PURCHASES;
use crate::orders::{not_ready, Lookup, OrderView};
use crate::problem::{ErrorCode, Problem};
use crate::record;
use crate::state::AppState;
use dropline::auth::AdmissionClaims;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurchaseRequest {
    quantity: u32,
}

#[derive(Debug, Serialize)]
struct Accepted {
    intent_id: Uuid,
    event_id: u64,
    quantity: u32,
    status: &'static str,
    status_url: String,
}

/// Purchases by outcome: `admitted` and `replayed` as the handler marks
/// them, a refusal by its code.
pub const COUNTER: Counter = Counter { metric: PURCHASES.name, label: "outcome", of_problem: refused_as };

fn refused_as(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::RateLimited => "rate_limited",
        ErrorCode::Busy => "shed",
        ErrorCode::SoldOut => "sold_out",
        ErrorCode::SaleNotOpen => "sale_not_open",
        ErrorCode::SaleClosed => "sale_closed",
        ErrorCode::SalePaused => "sale_paused",
        ErrorCode::AdmissionRequired | ErrorCode::AdmissionInvalid | ErrorCode::TurnLapsed | ErrorCode::TurnUsed => {
            "no_admission"
        }
        ErrorCode::BrokerUnavailable | ErrorCode::DependencyUnavailable => "unavailable",
        ErrorCode::IdempotencyInProgress => "in_progress",
        _ => "invalid",
    }
}

pub async fn create(
    State(app): State<Arc<AppState>>,
    Buyer(claims): Buyer,
    EventId(event_id): EventId,
    IdempotencyKey(key): IdempotencyKey,
    AdmissionToken(admission): AdmissionToken,
    RequestId(ref request_id): RequestId,
    JsonBody(request): JsonBody<PurchaseRequest>,
) -> Result<Response, Problem> {
    let event = app.events.get(event_id).await.map_err(|e| Problem::unavailable("mysql", &e))?;
    let event = event.ok_or(ErrorCode::EventNotFound)?;
    if request.quantity == 0 || request.quantity > event.terms.per_user_limit {
        return Err(Problem::new(ErrorCode::InvalidBody)
            .errors(vec![format!("quantity: must be 1 to {} for this event", event.terms.per_user_limit)]));
    }

    // An event with a waiting room sells only to buyers whose turn it is.
    let turn = match app.rooms.get(event_id).await? {
        Some(_) => Some(app.rooms.admission(admission.as_deref(), event_id, &claims.sub)?),
        None => None,
    };
    app.limits.admit(&claims.sub).map_err(|r| Problem::new(ErrorCode::RateLimited).retry_after(r.retry_after_secs))?;

    // Sold out (a room's with nobody waiting, as the keeper last saw it;
    // an event's, as its ledger said at most a quarter second ago): refused
    // from memory, and nothing is written. Once the sell-out has settled
    // (see `accepted`), a purchase this replica knows was never accepted
    // is refused with nothing read at all; any other first reads its key,
    // so a retry of one already answered (or still being answered) gets
    // that answer again, its 202. If units come back, the next try is a
    // new one.
    let id = intent_id(event_id, &claims.sub, &key);
    let sold_out = match turn {
        Some(_) => app.rooms.sold_out_and_empty(event_id),
        None => app.events.recently_available(event_id).await == Some(0),
    };
    if !sold_out {
        app.accepted.reopened(event_id);
    } else if app.accepted.refusable(&event, id) {
        return Err(sold_out_refusal());
    } else {
        let record = app.intents.key_record(&claims.sub, &key).await.map_err(|e| Problem::unavailable("redis", &e))?;
        match record {
            // As claim.lua tells a key first used for another event or
            // quantity. (Once the sell-out has settled, one first used for
            // another event is told sold out above: nothing is read to
            // see the reuse.)
            Some(record) if record.intent_id != id || record.intent.quantity != request.quantity => {
                return Err(reused())
            }
            // Its owner died or gave up, and the intent may be on Kafka: the
            // claim below takes the key over and produces it again, as
            // before the sell-out (never refused at the door).
            Some(KeyRecord { state: KeyState::Busy { until_ms, .. }, .. }) if until_ms <= now_ms() => {}
            Some(record) => return answer_from(&record).map(|answer| Outcome("replayed").mark(answer)),
            None => return Err(sold_out_refusal()),
        }
    }

    let mut intent =
        IntentRecord { event_id, user_id: claims.sub.clone(), quantity: request.quantity, accepted_at_ms: now_ms() };
    // The key is checked before the sale's state, so a retry of a purchase
    // that was accepted gets the same 202 even after the event sold out.
    let lease = Duration::from_millis(app.config.idempotency_lease_ms);
    let claim = app.intents.claim(&key, id, &intent, lease).await.map_err(|e| Problem::unavailable("redis", &e))?;
    let (owner, fresh) = match claim {
        KeyClaim::Reused => return Err(reused()),
        // A replayed refusal is counted under its code, as it was.
        KeyClaim::Final(record) => return replay(&record).map(|accepted| Outcome("replayed").mark(accepted)),
        KeyClaim::Busy { .. } => return Err(in_progress()),
        KeyClaim::New { owner } => (owner, true),
        // The owner before this request died or gave up: the intent may be
        // on Kafka already (the broker acked, then the answer was lost), so
        // it must not be refused now. Produce it again, exactly as first
        // recorded; the allocator decides it once.
        KeyClaim::TakenOver { owner, intent: first } => {
            intent = first;
            (owner, false)
        }
    };
    match decide(&app, &key, &owner, id, &intent, &event, fresh, turn.as_ref(), request_id).await {
        Ok(answer) => answer,
        Err(problem) => {
            // No final answer, and the intent may have reached the broker:
            // hand the key to the next retry, which will produce it again.
            if let Err(e) = app.intents.release(&intent.user_id, &key, &owner).await {
                tracing::warn!(error = %e, %id, "could not release an idempotency key; its lease will run out");
            }
            Err(problem)
        }
    }
}

/// The owner's part: refuse at the door or produce, then record the final
/// answer and give it (or, if another request took the key over meanwhile,
/// the answer the key has now). An error is no answer: the key is given up.
#[allow(clippy::too_many_arguments)]
async fn decide(
    app: &AppState,
    key: &str,
    owner: &str,
    id: Uuid,
    intent: &IntentRecord,
    event: &crate::events::Event,
    fresh: bool,
    turn: Option<&AdmissionClaims>,
    request_id: &str,
) -> Result<Result<Response, Problem>, Problem> {
    // Cheap answers at the door, for new keys only. The allocator decides
    // for real; these spare it (and the buyer) a round trip that cannot
    // succeed.
    if fresh {
        // A turn that ran out is no final answer: the key is given back, so
        // the buyer can retry with a new turn.
        if let Some(turn) = turn {
            app.rooms.turn_open(turn).await?;
        }
        if let Err(refused) = door(app, event, intent.event_id).await {
            if let Some(answer) = refuse(app, key, owner, id, intent, refused).await? {
                return Ok(answer);
            }
        }
    }

    // Indexed before it is produced, so an intent on Kafka is always known
    // to the status and order endpoints (unless Redis loses the index).
    app.intents.index(id, intent).await.map_err(|e| Problem::unavailable("redis", &e))?;
    let written = produce(app, intent, id, request_id).await?;
    let record = KeyRecord { intent_id: id, intent: intent.clone(), state: KeyState::Accepted };
    let (settled, located) =
        tokio::join!(app.intents.settle(key, owner, &record), app.intents.locate(id, intent, written));
    if let Err(e) = located {
        tracing::debug!(error = %e, %id, "could not record where the intent was written; no place in line shown");
    }
    match settled {
        Ok(Settled::Done | Settled::Gone) => {}
        Ok(Settled::Lost(current)) => return Ok(answer_from(&current)),
        // The intent is on Kafka: 202 is the truth whatever happens to the
        // record. If it stays busy, a retry takes it over once the lease
        // runs out, produces again, and is told 202 too.
        Err(e) => tracing::warn!(error = %e, %id, "could not record an accepted purchase; answering anyway"),
    }
    if let Some(turn) = turn {
        app.rooms.used(turn, id, intent.quantity).await;
    }
    Ok(Ok(Outcome("admitted").mark(accepted(id, intent))))
}

/// Refuses at the door, for good: the refusal is recorded as its intent's
/// decision in the ledger (so a copy of the intent already on Kafka, which
/// a lost idempotency record would hide, is decided the same way) and as
/// the key's final answer. `None` when the door must not refuse after all:
/// the intent was decided already, or the ledger cannot say (it is missing
/// or being rebuilt), so it must be produced.
async fn refuse(
    app: &AppState,
    key: &str,
    owner: &str,
    id: Uuid,
    intent: &IntentRecord,
    refused: Problem,
) -> Result<Option<Result<Response, Problem>>, Problem> {
    let reason = match refused.code {
        ErrorCode::SoldOut => RejectReason::SoldOut,
        ErrorCode::SaleNotOpen => RejectReason::SaleNotOpen,
        ErrorCode::SaleClosed => RejectReason::SaleClosed,
        ErrorCode::SalePaused => RejectReason::SalePaused,
        _ => return Err(refused),
    };
    match app.ledger.refuse_at_door(intent.event_id, id, reason).await {
        Ok(DoorOutcome::Refused(_)) => {}
        Ok(DoorOutcome::Decided(_)) | Err(LedgerError::NoLedger(_) | LedgerError::Fenced(_)) => return Ok(None),
        Err(e) => return Err(Problem::unavailable("redis", &e)),
    }
    let answer = StoredRefusal::of(&refused);
    let record = KeyRecord { intent_id: id, intent: intent.clone(), state: KeyState::Refused { answer } };
    match app.intents.settle(key, owner, &record).await.map_err(|e| Problem::unavailable("redis", &e))? {
        Settled::Done | Settled::Gone => Ok(Some(Err(refused))),
        Settled::Lost(current) => Ok(Some(answer_from(&current))),
    }
}

/// The answer a key's record gives: its final answer, or "in progress".
fn answer_from(record: &KeyRecord) -> Result<Response, Problem> {
    match &record.state {
        KeyState::Busy { .. } => Err(in_progress()),
        _ => replay(record),
    }
}

/// A key's final answer, again.
fn replay(record: &KeyRecord) -> Result<Response, Problem> {
    match &record.state {
        KeyState::Accepted => Ok(accepted(record.intent_id, &record.intent)),
        KeyState::Refused { answer } => Err(answer.replay()),
        KeyState::Busy { .. } => Err(in_progress()),
    }
}

/// The answer to a copy of a request still being answered. An owner
/// normally answers within milliseconds (the lease only bounds one that
/// died), so the copy is asked back in a second, not at the lease's end.
fn in_progress() -> Problem {
    Problem::new(ErrorCode::IdempotencyInProgress)
        .detail("a request with this Idempotency-Key is being answered; retry to get its answer")
        .retry_after(1)
}

/// Refusals that need no decision: the sale's window, a pause its host
/// made, and a sell-out seen within the last quarter second.
async fn door(app: &AppState, event: &crate::events::Event, event_id: u64) -> Result<(), Problem> {
    let now = chrono::Utc::now();
    if event.cancelled_at.is_some() {
        return Err(Problem::new(ErrorCode::SaleClosed).detail("the event was cancelled"));
    }
    if now < event.terms.sale_opens_at {
        return Err(
            Problem::new(ErrorCode::SaleNotOpen).detail(format!("the sale opens at {}", event.terms.sale_opens_at))
        );
    }
    if now >= event.terms.sale_closes_at {
        return Err(ErrorCode::SaleClosed.into());
    }
    if event.paused_at.is_some() {
        return Err(ErrorCode::SalePaused.into());
    }
    if app.events.recently_available(event_id).await == Some(0) {
        return Err(sold_out_refusal());
    }
    Ok(())
}

fn reused() -> Problem {
    Problem::new(ErrorCode::IdempotencyKeyReused)
        .detail("this Idempotency-Key was first used for another event or quantity")
}

fn sold_out_refusal() -> Problem {
    Problem::new(ErrorCode::SoldOut).retry_after(5)
}

/// Produces the intent and waits for the broker's acknowledgement. A full
/// local queue fails at once: under a flood, waiting would only pile up
/// connections.
async fn produce(app: &AppState, record: &IntentRecord, id: Uuid, request_id: &str) -> Result<Written, Problem> {
    let intent = PurchaseIntent {
        intent_id: id,
        event_id: record.event_id,
        user_id: record.user_id.clone(),
        quantity: record.quantity,
        accepted_at_ms: record.accepted_at_ms,
    };
    let payload = serde_json::to_vec(&intent).map_err(|_| Problem::new(ErrorCode::Internal))?;
    let key = record.event_id.to_string();
    let record = Record::new(&app.topics.intents, &key, &payload).request_id(Some(request_id));
    match app.publisher.publish_at(record).await {
        Ok(written) => Ok(written),
        Err(PublishError::QueueFull(_)) => {
            Err(Problem::new(ErrorCode::BrokerUnavailable).detail("intake is saturated").retry_after(1))
        }
        Err(e) => {
            tracing::warn!(error = %e, "intent not acknowledged by the broker");
            Err(Problem::new(ErrorCode::BrokerUnavailable).retry_after(1))
        }
    }
}

fn accepted(id: Uuid, record: &IntentRecord) -> Response {
    let status_url = format!("/v1/intents/{id}");
    let body = Accepted {
        intent_id: id,
        event_id: record.event_id,
        quantity: record.quantity,
        status: "queued",
        status_url: status_url.clone(),
    };
    (StatusCode::ACCEPTED, [("location", status_url)], Json(body)).into_response()
}

/// How long an intent may look undecided in the ledger before MySQL is
/// asked too: a ledger that came back behind has lost decisions the settler
/// recorded, and would show them queued until it is rebuilt. Younger intents
/// are simply queued, which spares MySQL the polls of a flood.
const QUEUED_CHECK_AFTER_MS: i64 = 2_000;

/// `GET /v1/intents/{id}`: where a purchase stands. Only its buyer sees it.
pub async fn status(
    State(app): State<Arc<AppState>>,
    Buyer(claims): Buyer,
    IntentId(id): IntentId,
) -> Result<Response, Problem> {
    let current = current(&app, id, &claims.sub).await?.ok_or(ErrorCode::NotFound)?;
    Ok(Json(current.status).into_response())
}

/// An intent's status, and where the broker wrote it while it is queued.
pub(super) struct Current {
    pub status: IntentStatus,
    pub written: Option<(i32, i64)>,
}

/// Where `user`'s intent `id` stands now; `None` if they have no such
/// intent.
pub(super) async fn current(app: &AppState, id: Uuid, user: &str) -> Result<Option<Current>, Problem> {
    let entry = app.intents.get(id).await.map_err(|e| Problem::unavailable("redis", &e))?;
    let Some(entry) = entry.filter(|r| r.intent.user_id == user) else {
        return Ok(settled_status(app, id, user).await?.map(|status| Current { status, written: None }));
    };
    let record = &entry.intent;
    let verdict = app.ledger.verdict(record.event_id, id).await.map_err(|e| Problem::unavailable("redis", &e))?;
    let mut ahead = None;
    let (status, reason, order) = match verdict {
        None => {
            if now_ms() - record.accepted_at_ms > QUEUED_CHECK_AFTER_MS {
                if let Some(settled) = settled_status(app, id, user).await? {
                    return Ok(Some(Current { status: settled, written: None }));
                }
            }
            ahead = entry.written.and_then(|(partition, offset)| app.allocation.ahead(partition, offset));
            ("queued", None, None)
        }
        Some(Verdict::Rejected { reason, .. }) => ("rejected", Some(reason), None),
        Some(Verdict::Held { .. }) => {
            let order = order_of(app, id, user).await?;
            (order.state.as_str(), None, Some(order))
        }
    };
    let status = IntentStatus {
        intent_id: id,
        event_id: record.event_id,
        quantity: record.quantity,
        status,
        ahead,
        reason,
        order,
    };
    let written = entry.written.filter(|_| status.status == "queued");
    Ok(Some(Current { status, written }))
}

/// The order of an intent decided held. It exists, so if it cannot be
/// found its records are catching up: retry, never 404.
async fn order_of(app: &AppState, id: Uuid, user: &str) -> Result<OrderView, Problem> {
    match app.orders.find(id, user).await? {
        Lookup::Found(order) => Ok(order),
        Lookup::Pending | Lookup::Unknown => Err(not_ready()),
    }
}

/// An intent's status from the settler's record, if it has the intent.
async fn settled_status(app: &AppState, id: Uuid, user: &str) -> Result<Option<IntentStatus>, Problem> {
    let intent = record::intent(&app.db, id, user).await.map_err(|e| Problem::unavailable("mysql", &e))?;
    let Some(intent) = intent else { return Ok(None) };
    let (status, reason, order) = if intent.outcome == OutcomeKind::Held {
        let order = order_of(app, id, user).await?;
        (order.state.as_str(), None, Some(order))
    } else {
        ("rejected", intent.reason(), None)
    };
    let (event_id, quantity) = (intent.event_id, intent.quantity);
    Ok(Some(IntentStatus { intent_id: id, event_id, quantity, status, ahead: None, reason, order }))
}

//! Live status over server-sent events: a purchase's whole life
//! (`GET /v1/intents/{id}/events`) and a queue ticket's
//! (`GET /v1/events/{id}/queue/events`).
//!
//! Each event is the same JSON body as the resource's `GET`, named by its
//! status (`event: held`), with an id that stands for that state. A stream
//! resumed with `Last-Event-ID` sends the state as it is now, unless it is
//! the one the buyer last had; states passed in between are not replayed
//! (the current one carries what they told). Once the state is final
//! (paid, rejected, cancelled, expired, voided; purchased, lapsed, closed)
//! the stream ends, and a reconnection that already has the final state is
//! answered `204`, which tells an `EventSource` to stop reconnecting.
//!
//! Every stream is fed by the process's shared subscription ([`Live`]); a
//! stream reads the stores once when it opens, and after that only when its
//! own state moves on in a way the subscription cannot say (its turn
//! started or ended, the draw placed it, a purchase of its buyer was
//! decided, the allocators passed its intent).
//! Comment lines keep an idle stream's connection alive. Changes of place
//! are sent at most once a second; a change of status at once.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use dropline::room::{Phase, Standing};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::time::Instant;
use uuid::Uuid;

use super::purchases::{self, Current};
use super::rooms::{room_budget, room_of, ticket_view};
use crate::extract::{Buyer, EventId, IntentId, LastEventId};
use crate::live::{rank_of, IntentStatus, IntentUpdate, RoomPulse, StreamPermit, Subscription};
use crate::metrics::STREAM_EVENTS;
use crate::problem::{ErrorCode, Problem};
use crate::record::RoomRow;
use crate::state::AppState;

/// Changes of place (fewer people ahead) are sent at most this often.
const PLACE_EVERY: Duration = Duration::from_secs(1);

/// The ingress that took a purchase made with a turn marks the turn used
/// just after the broker acknowledged the purchase, so its decision can
/// reach a stream first: a turn still open after a decision is read again
/// this much later, a few times.
const RECHECK: Duration = Duration::from_millis(200);
const RECHECKS: u8 = 3;

/// Reads of the record, RECHECK apart, before a lapse the line alone
/// suggests is shown (two seconds: the keeper ends a turn within a tenth).
const LAPSE_CONFIRMATIONS: u8 = 10;

/// How long past a hold's deadline its stream reads it again, should its
/// end not have reached the feed.
const HOLD_END_GRACE: Duration = Duration::from_secs(5);

/// A stream ends after this long (the client reconnects where it was), so
/// none lives on forever.
const MAX_LIFETIME: Duration = Duration::from_secs(3600);

/// How long a browser waits before reconnecting a dropped stream.
const RETRY: Duration = Duration::from_secs(2);

/// `GET /v1/intents/{id}/events`
pub async fn intent(
    State(app): State<Arc<AppState>>,
    Buyer(claims): Buyer,
    IntentId(id): IntentId,
    LastEventId(last): LastEventId,
) -> Result<Response, Problem> {
    let permit = app.live.permit(&claims.sub)?;
    // Subscribed before the read: a change after it is not missed.
    let watch = app.live.watch_intent(id);
    let Current { status, written } = purchases::current(&app, id, &claims.sub).await?.ok_or(ErrorCode::NotFound)?;
    if status.is_final() && last.as_deref() == Some(status.event_id().as_str()) {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let (tx, rx) = mpsc::channel(4);
    let stream =
        IntentStream { app: app.clone(), user: claims.sub, watch, current: status, written, tx, last, _permit: permit };
    tokio::spawn(stream.run());
    Ok(sse(&app, rx))
}

/// `GET /v1/events/{id}/queue/events`
pub async fn ticket(
    State(app): State<Arc<AppState>>,
    Buyer(claims): Buyer,
    EventId(event_id): EventId,
    LastEventId(last): LastEventId,
) -> Result<Response, Problem> {
    room_budget(&app, &claims.sub, None)?;
    let row = room_of(&app, event_id).await?;
    let permit = app.live.permit(&claims.sub)?;
    let pulses = app.live.watch_room(event_id);
    let decided = app.live.watch_buyer(event_id, &claims.sub);
    let own = app.rooms.live.standing(event_id, &claims.sub).await.map_err(|e| Problem::unavailable("redis", &e))?;
    // The first view checks the ticket is there, before the stream starts.
    let view = ticket_view(&app, &row, &claims.sub, own.clone())?;
    if view.is_final() && last.as_deref() == Some(view.event_id().as_str()) {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let own = own.ok_or(ErrorCode::Internal)?;
    let (tx, rx) = mpsc::channel(4);
    let stream =
        TicketStream { app: app.clone(), row, user: claims.sub, own, pulses, decided, tx, last, _permit: permit };
    tokio::spawn(stream.run());
    Ok(sse(&app, rx))
}

/// The response streaming what `rx` gets, with comment-line heartbeats
/// well inside the connection's idle timeout.
fn sse(app: &AppState, mut rx: mpsc::Receiver<Event>) -> Response {
    let heartbeat = Duration::from_secs(app.config.http_idle_timeout_secs.clamp(2, 30) / 2);
    let events = futures::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|e| e.map(Ok::<_, Infallible>)));
    let mut response = Sse::new(events).keep_alive(KeepAlive::new().interval(heartbeat)).into_response();
    // Proxies that buffer answers would hold the events back.
    response.headers_mut().insert("x-accel-buffering", axum::http::HeaderValue::from_static("no"));
    response
}

/// One event: named by its status, with its id and the resource's body.
fn event(name: &'static str, id: &str, body: &impl Serialize, first: bool) -> Option<Event> {
    let event = Event::default().event(name).id(id).json_data(body).ok()?;
    Some(if first { event.retry(RETRY) } else { event })
}

/// Sends `event`; false once the buyer is gone.
async fn send(tx: &mpsc::Sender<Event>, event: Option<Event>, stream: &'static str) -> bool {
    let Some(event) = event else {
        tracing::error!(stream, "a stream event could not be written");
        return false;
    };
    metrics::counter!(STREAM_EVENTS.name, "stream" => stream).increment(1);
    tx.send(event).await.is_ok()
}

struct IntentStream {
    app: Arc<AppState>,
    user: String,
    watch: Subscription<Uuid, IntentUpdate>,
    current: IntentStatus,
    written: Option<(i32, i64)>,
    tx: mpsc::Sender<Event>,
    /// The buyer's last event id, when resuming.
    last: Option<String>,
    _permit: StreamPermit,
}

impl IntentStream {
    async fn run(mut self) {
        let mut line = self.app.allocation.updates();
        let mut shown = self.last.take();
        // A resumed stream never shows a state behind the one its buyer had
        // (a store that came back behind would).
        let had = shown.as_deref().and_then(rank_of_event_id);
        let mut shown_at = Instant::now() - PLACE_EVERY;
        let mut sent_any = false;
        // The last read of the stores, for what the feed may not say: a
        // decision made before it caught up, an end nobody published.
        let mut read_at = Instant::now();
        let ends_at = Instant::now() + MAX_LIFETIME;
        loop {
            let id = self.current.event_id();
            let behind = had.is_some_and(|had| had > self.current.rank());
            let moved_on = shown.as_ref().is_none_or(|s| s.split('.').next() != Some(self.current.status));
            let due = moved_on || shown_at.elapsed() >= PLACE_EVERY;
            if !behind && shown.as_deref() != Some(id.as_str()) && due {
                if !send(&self.tx, event(self.current.status, &id, &self.current, !sent_any), "intent").await {
                    return;
                }
                (shown, shown_at, sent_any) = (Some(id), Instant::now(), true);
            }
            if self.current.is_final() {
                return;
            }
            let queued = self.current.rank() == 0;
            // A hold is read again once its deadline (and the expirer's
            // grace) passed, should its end not reach the feed.
            let check_at = self.current.order.as_ref().map(|o| {
                let left = (o.expires_at - chrono::Utc::now()).to_std().unwrap_or_default();
                Instant::now() + left + HOLD_END_GRACE
            });
            let mut read_again = false;
            tokio::select! {
                _ = self.tx.closed() => return,
                _ = self.app.live.shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(ends_at) => return,
                changed = self.watch.rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let update = self.watch.rx.borrow_and_update().clone();
                    if let Some(update) = update.filter(|u| u.0 == self.user && u.1.rank() > self.current.rank()) {
                        self.current = update.1.clone();
                    }
                }
                _ = sleep_until(check_at.filter(|_| !queued)) => read_again = true,
                _ = line.changed(), if queued => {
                    let Some((partition, offset)) = self.written else { continue };
                    if self.app.allocation.passed(partition, offset) {
                        // Decided, and its decision not heard of (made before
                        // this replica's feed caught up): read it, at most
                        // once a second while it stays so.
                        read_again = read_at.elapsed() >= PLACE_EVERY;
                    } else {
                        self.current.ahead = self.app.allocation.ahead(partition, offset);
                    }
                }
            }
            if read_again {
                read_at = Instant::now();
                match purchases::current(&self.app, self.current.intent_id, &self.user).await {
                    Ok(Some(now)) if now.status.rank() > self.current.rank() => self.current = now.status,
                    Ok(_) => {}
                    Err(e) => tracing::debug!(code = e.code.as_str(), "stream re-read failed"),
                }
            }
        }
    }
}

/// The rank of the state an event id stands for (its status, before any
/// `.`), if it names one.
fn rank_of_event_id(id: &str) -> Option<u8> {
    let status = id.split('.').next()?;
    ["queued", "held", "paid", "rejected", "cancelled", "expired", "voided"].contains(&status).then(|| rank_of(status))
}

struct TicketStream {
    app: Arc<AppState>,
    row: Arc<RoomRow>,
    user: String,
    /// The buyer's own standing as last read.
    own: Standing,
    pulses: Subscription<u64, Option<RoomPulse>>,
    /// The buyer's purchases at the event being decided: one made with the
    /// turn used it.
    decided: Subscription<(u64, String), u64>,
    tx: mpsc::Sender<Event>,
    last: Option<String>,
    _permit: StreamPermit,
}

/// Why a ticket's stream reads the buyer's record again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reread {
    /// The draw placed the pre-queue.
    Placed,
    /// The line reached the ticket: its turn started (or it was passed).
    TurnStarted,
    /// The turn's time is up: used, or lapsed.
    TurnEnded,
    /// A purchase of the buyer's was decided: the turn may be used.
    Decided,
}

impl TicketStream {
    async fn run(mut self) {
        let mut shown = self.last.take();
        let mut shown_status: Option<&'static str> = None;
        let mut shown_at = Instant::now() - PLACE_EVERY;
        let mut reread: Option<Reread> = None;
        // After a decision: when to read the turn again, and how many more
        // times (see RECHECK).
        let mut recheck: Option<(Instant, u8)> = None;
        let mut decision = false;
        // When to read the record again after a read failed, or to confirm
        // a lapse the line alone suggests; and how many confirmations are
        // left before the line's word is taken.
        let mut retry_at: Option<Instant> = None;
        let mut confirmations = LAPSE_CONFIRMATIONS;
        let closes = self.row.sale_closes_at;
        let ends_at = Instant::now() + MAX_LIFETIME;
        loop {
            if retry_at.is_some_and(|at| at <= Instant::now()) {
                retry_at = None;
                reread = None;
            }
            let pulse = *self.pulses.rx.borrow_and_update();
            let mut standing = merged(&self.own, pulse.as_ref());
            let mut due = due(&standing, Utc::now().timestamp_millis());
            let recheck_due = recheck.is_some_and(|(at, _)| at <= Instant::now());
            if std::mem::take(&mut decision) || self.decided.rx.has_changed().unwrap_or(false) || recheck_due {
                self.decided.rx.borrow_and_update();
                due = Some(Reread::Decided);
                reread = None;
                recheck = match recheck {
                    Some((_, 0)) => None,
                    Some((_, left)) => Some((Instant::now() + RECHECK, left - 1)),
                    None => Some((Instant::now() + RECHECK, RECHECKS)),
                };
            }
            if due.is_some() && due != reread {
                match self.app.rooms.live.standing(self.row.event_id, &self.user).await {
                    Ok(Some(own)) => {
                        reread = due;
                        self.own = own;
                        standing = merged(&self.own, pulse.as_ref());
                        if self.own.ended.is_some() || self.own.turn_ends_ms.is_none() {
                            recheck = None;
                        }
                    }
                    // Not read: the same reason reads again shortly.
                    Ok(None) => retry_at = Some(Instant::now() + RECHECK),
                    Err(e) => {
                        tracing::debug!(error = %e, "ticket stream re-read failed");
                        retry_at = Some(Instant::now() + RECHECK);
                    }
                }
            }
            let view = match ticket_view(&self.app, &self.row, &self.user, Some(standing)) {
                Ok(view) => view,
                Err(e) => {
                    tracing::debug!(code = e.code.as_str(), "ticket stream ended");
                    return;
                }
            };
            // A lapse is final: it is shown only once the record says so
            // (the keeper ends a turn within a tick of its deadline, and a
            // purchase made just before it marks the turn used once the
            // broker acknowledged it), or the record stays silent a while.
            let unconfirmed = self.own.ended != Some(dropline::room::TurnEnd::Lapsed);
            if view.status == "lapsed" && unconfirmed && confirmations > 0 {
                confirmations -= 1;
                reread = None;
                retry_at = Some(Instant::now() + RECHECK);
                tokio::select! {
                    _ = self.tx.closed() => return,
                    _ = tokio::time::sleep(RECHECK) => continue,
                }
            }
            let id = view.event_id();
            let pending = shown.as_deref() != Some(id.as_str());
            let moved_on = shown_status != Some(view.status);
            let mut flush_at = None;
            if pending && (moved_on || shown_at.elapsed() >= PLACE_EVERY) {
                if !send(&self.tx, event(view.status, &id, &view, shown_status.is_none()), "ticket").await {
                    return;
                }
                (shown, shown_status, shown_at) = (Some(id), Some(view.status), Instant::now());
            } else if pending {
                flush_at = Some(shown_at + PLACE_EVERY);
            }
            if view.is_final() {
                return;
            }
            let turn_ends = self.own.turn_ends_ms.filter(|_| self.own.ended.is_none());
            let wake_at = [turn_ends, Some(closes.timestamp_millis())].into_iter().flatten().min().map(|ms| {
                Instant::now() + Duration::from_millis((ms - Utc::now().timestamp_millis()).max(0) as u64 + 1)
            });
            tokio::select! {
                _ = self.tx.closed() => return,
                _ = self.app.live.shutdown.cancelled() => return,
                changed = self.pulses.rx.changed() => if changed.is_err() { return },
                _ = self.decided.rx.changed(), if self.own.turn_ends_ms.is_some() && self.own.ended.is_none() => {
                    decision = true;
                }
                _ = sleep_until(flush_at) => {}
                _ = sleep_until(recheck.map(|(at, _)| at)) => {}
                _ = sleep_until(retry_at) => {}
                _ = sleep_until(wake_at) => {}
                _ = tokio::time::sleep_until(ends_at) => return,
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The buyer's own standing, with the line as the keeper last left it.
/// The line only ever moves on, so the further of the two is taken.
fn merged(own: &Standing, pulse: Option<&RoomPulse>) -> Standing {
    let Some(p) = pulse else { return own.clone() };
    let phase_rank = |p: Phase| match p {
        Phase::PreQueue => 0,
        Phase::Drawing => 1,
        Phase::Open => 2,
    };
    Standing {
        phase: if phase_rank(p.phase) > phase_rank(own.phase) { p.phase } else { own.phase },
        now_serving: own.now_serving.max(p.now_serving),
        available: if p.phase == Phase::Open { p.available } else { own.available },
        outflow_per_sec: p.outflow_per_sec,
        measured_per_sec: p.measured_per_sec.or(own.measured_per_sec),
        ..own.clone()
    }
}

/// What the line did that the buyer's own record must be read for.
fn due(s: &Standing, now_ms: i64) -> Option<Reread> {
    if s.ended.is_some() || s.ticket.is_none() {
        return None;
    }
    match (s.place, s.turn_ends_ms) {
        (None, _) if s.phase == Phase::Open => Some(Reread::Placed),
        (Some(_), Some(end)) if end <= now_ms => Some(Reread::TurnEnded),
        (Some(place), None) if place <= s.now_serving => Some(Reread::TurnStarted),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standing(place: Option<u64>, serving: u64) -> Standing {
        Standing {
            phase: Phase::Open,
            ticket: Some(uuid::Uuid::nil()),
            place,
            now_serving: serving,
            turn_ends_ms: None,
            ended: None,
            available: 10,
            outflow_per_sec: 5,
            measured_per_sec: None,
        }
    }

    #[test]
    fn a_ticket_reads_its_record_only_when_its_own_turn_moves() {
        assert_eq!(due(&standing(Some(9), 3), 0), None, "waiting: the line says it all");
        assert_eq!(due(&standing(None, 3), 0), Some(Reread::Placed));
        assert_eq!(due(&standing(Some(3), 3), 0), Some(Reread::TurnStarted));
        let admitted = Standing { turn_ends_ms: Some(5_000), ..standing(Some(3), 3) };
        assert_eq!(due(&admitted, 4_999), None);
        assert_eq!(due(&admitted, 5_000), Some(Reread::TurnEnded));
        let used = Standing { ended: Some(dropline::room::TurnEnd::Used), ..admitted };
        assert_eq!(due(&used, 9_000), None);
    }

    #[test]
    fn the_line_never_goes_back_when_merged() {
        let own = standing(Some(40), 30);
        let older = RoomPulse {
            phase: Phase::Open,
            now_serving: 25,
            available: 4,
            outflow_per_sec: 5,
            measured_per_sec: Some(4.5),
            at: Utc::now(),
        };
        let merged = merged(&own, Some(&older));
        assert_eq!((merged.now_serving, merged.available, merged.place), (30, 4, Some(40)));
        let early = RoomPulse { phase: Phase::PreQueue, ..older };
        assert_eq!(super::merged(&own, Some(&early)).phase, Phase::Open);
    }
}

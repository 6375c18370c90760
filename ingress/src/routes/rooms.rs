//! Waiting rooms: admins set them up and change their outflow; buyers join,
//! see where they stand and get their turn; anyone reads a room and,
//! once drawn, its draw.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use dropline::room::draw::Beacon;
use dropline::room::{Join, Mode, Phase, Standing, TurnEnd};
use serde::Serialize;
use uuid::Uuid;

use crate::extract::{Admin, Buyer, EventId, JoinProof, JsonBody, NoBody};
use crate::metrics::ROOM_JOINS;
use crate::problem::{ErrorCode, Problem};
use crate::record::RoomRow;
use crate::rooms::{BeaconRandomness, RoomChange, RoomTerms, SET_BEFORE_OPENING};
use crate::state::AppState;

/// A room as anyone may see it.
#[derive(Serialize)]
struct RoomView {
    event_id: u64,
    mode: Mode,
    prequeue_opens_at: DateTime<Utc>,
    sale_opens_at: DateTime<Utc>,
    outflow_per_sec: u32,
    time_to_act_secs: u32,
    /// Zero bits a join's proof of work must have; 0: none.
    proof_of_work_bits: u8,
    /// SHA-256 of the draw's seed, published from the start.
    seed_commitment: String,
    /// The beacon round mixed into the draw, named from the start; its
    /// randomness once entered. The draw waits for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    beacon: Option<Beacon>,
    /// scheduled, pre_queue, drawing, open, closed.
    phase: &'static str,
    /// Tickets waiting for the draw (before the opening).
    pre_queue: u64,
    /// Places handed out.
    in_line: u64,
    /// Sold out with nobody waiting: joins are refused (`409 sold_out`)
    /// until held units come back.
    sold_out: bool,
    now_serving: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    entrants: Option<u64>,
    /// Published at the opening: the hash of the pre-queue's ticket ids.
    #[serde(skip_serializing_if = "Option::is_none")]
    list_hash: Option<String>,
    /// Published after the draw.
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    drawn_at: Option<DateTime<Utc>>,
}

/// A buyer's ticket and where it stands.
#[derive(Serialize)]
pub(super) struct TicketView {
    event_id: u64,
    ticket_id: Uuid,
    /// pre_queue, drawing, waiting (in a lottery: waitlisted), sold_out,
    /// admitted, purchased, lapsed, closed.
    pub status: &'static str,
    /// 1 is first; absent until the draw places a pre-queue ticket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub place: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ahead: Option<u64>,
    now_serving: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    estimated_wait_secs: Option<u64>,
    /// When the draw places the pre-queue: the sale's opening.
    draw_at: DateTime<Utc>,
    /// While admitted: send as `Dropline-Admission` with the purchase.
    #[serde(skip_serializing_if = "Option::is_none")]
    admission_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    turn_ends_at: Option<DateTime<Utc>>,
}

impl TicketView {
    /// Nothing more will happen to the ticket: its turn was used or ran
    /// out, or the sale closed.
    pub fn is_final(&self) -> bool {
        matches!(self.status, "purchased" | "lapsed" | "closed")
    }

    /// The stream event's id: the same standing, the same id (the wait
    /// estimate and the token's signature time aside).
    pub fn event_id(&self) -> String {
        let turn = self.turn_ends_at.map_or(0, |t| t.timestamp_millis());
        match (self.place, self.ahead) {
            (Some(place), Some(ahead)) => format!("{}.{place}.{ahead}.{turn}", self.status),
            (Some(place), None) => format!("{}.{place}.{turn}", self.status),
            _ => self.status.to_owned(),
        }
    }
}

/// A buyer's waiting-room request within their budget (and a join within
/// the event's).
pub(super) fn room_budget(app: &AppState, user: &str, joining: Option<u64>) -> Result<(), Problem> {
    app.limits.room(user, joining).map_err(|r| Problem::new(ErrorCode::RateLimited).retry_after(r.retry_after_secs))
}

pub(super) async fn room_of(app: &AppState, event_id: u64) -> Result<Arc<RoomRow>, Problem> {
    let event = app.events.get(event_id).await.map_err(|e| Problem::unavailable("mysql", &e))?;
    event.ok_or(ErrorCode::EventNotFound)?;
    app.rooms.get(event_id).await?.ok_or_else(|| ErrorCode::NoWaitingRoom.into())
}

/// `PUT /v1/admin/events/{id}/waiting-room`
pub async fn set(
    State(app): State<Arc<AppState>>,
    _: Admin,
    EventId(event_id): EventId,
    JsonBody(terms): JsonBody<RoomTerms>,
) -> Result<Response, Problem> {
    let event = app.events.get(event_id).await.map_err(|e| Problem::unavailable("mysql", &e))?;
    let event = event.ok_or(ErrorCode::EventNotFound)?;
    let terms = terms.as_recorded();
    Problem::unless_valid(terms.problems(event.terms.sale_opens_at), "the waiting room is not valid")?;
    let existing = app.rooms.load(event_id).await?;
    if existing.is_none() && Utc::now() + SET_BEFORE_OPENING > event.terms.sale_opens_at {
        return Err(Problem::new(ErrorCode::WaitingRoomTooLate).detail(format!(
            "set it at least {} s before the sale opens ({})",
            SET_BEFORE_OPENING.as_secs(),
            event.terms.sale_opens_at
        )));
    }
    let (row, created) = app.rooms.create(event_id, &terms).await?;
    tracing::info!(event_id, created, commitment = %row.seed_commitment, "waiting room set");
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    let location = format!("/v1/events/{event_id}/waiting-room");
    Ok((status, [("location", location)], Json(view(&app, &row).await?)).into_response())
}

/// `PATCH /v1/admin/events/{id}/waiting-room`: the outflow and the join
/// difficulty, also during the sale.
pub async fn change(
    State(app): State<Arc<AppState>>,
    _: Admin,
    EventId(event_id): EventId,
    JsonBody(change): JsonBody<RoomChange>,
) -> Result<Response, Problem> {
    Problem::unless_valid(change.problems(), "the change is not valid")?;
    room_of(&app, event_id).await?;
    app.rooms.change(event_id, &change).await?;
    tracing::info!(event_id, outflow = ?change.outflow_per_sec, bits = ?change.proof_of_work_bits, "waiting room changed");
    let row = app.rooms.load(event_id).await?.ok_or(ErrorCode::NoWaitingRoom)?;
    Ok(Json(view(&app, &row).await?).into_response())
}

/// `PUT /v1/admin/events/{id}/waiting-room/beacon`: the named beacon
/// round's randomness, once it is published. The draw waits for it.
pub async fn set_beacon(
    State(app): State<Arc<AppState>>,
    _: Admin,
    EventId(event_id): EventId,
    JsonBody(entered): JsonBody<BeaconRandomness>,
) -> Result<Response, Problem> {
    Problem::unless_valid(entered.problems(), "the randomness is not valid")?;
    room_of(&app, event_id).await?;
    let row = app.rooms.set_beacon(event_id, &entered).await?;
    tracing::info!(event_id, round = ?row.beacon_round, "beacon randomness entered");
    Ok(Json(view(&app, &row).await?).into_response())
}

/// `GET /v1/events/{id}/waiting-room`
pub async fn get_one(State(app): State<Arc<AppState>>, EventId(event_id): EventId) -> Result<Response, Problem> {
    let row = room_of(&app, event_id).await?;
    Ok(Json(view(&app, &row).await?).into_response())
}

async fn view(app: &AppState, row: &RoomRow) -> Result<RoomView, Problem> {
    let summary = app.rooms.live.summary(row.event_id).await.map_err(|e| Problem::unavailable("redis", &e))?;
    let now = Utc::now();
    let phase = match &summary {
        _ if now >= row.sale_closes_at => "closed",
        _ if now < row.prequeue_opens_at => "scheduled",
        Some(s) if s.phase == Phase::Open => "open",
        Some(s) if s.phase == Phase::Drawing => "drawing",
        _ if now >= row.sale_opens_at => "drawing",
        _ => "pre_queue",
    };
    let s = summary.as_ref();
    Ok(RoomView {
        event_id: row.event_id,
        mode: row.mode,
        prequeue_opens_at: row.prequeue_opens_at,
        sale_opens_at: row.sale_opens_at,
        outflow_per_sec: row.outflow_per_sec,
        time_to_act_secs: row.time_to_act_secs,
        proof_of_work_bits: row.proof_of_work_bits,
        seed_commitment: row.seed_commitment.clone(),
        beacon: row.beacon(),
        phase,
        pre_queue: s.map_or(0, |s| s.pre_queue),
        in_line: s.map_or(0, |s| s.in_line),
        sold_out: app.rooms.sold_out_and_empty(row.event_id),
        now_serving: s.map_or(0, |s| s.now_serving),
        // The record's draw first: it outlives the room's Redis state.
        entrants: row.entrants.map(u64::from).or_else(|| s.and_then(|s| s.entrants)),
        list_hash: row.list_hash.clone().or_else(|| s.and_then(|s| s.list_hash.clone())),
        seed: row.drawn_at.map(|_| hex::encode(&row.seed)).or_else(|| s.and_then(|s| s.seed.clone())),
        drawn_at: row.drawn_at.or_else(|| s.and_then(|s| s.drawn_ms).and_then(DateTime::from_timestamp_millis)),
    })
}

/// `GET /v1/events/{id}/waiting-room/draw`: the seed, the list hash and the
/// drawn order, for anyone to check (`dropctl verify-draw`), from the
/// record.
pub async fn draw(State(app): State<Arc<AppState>>, EventId(event_id): EventId) -> Result<Response, Problem> {
    let row = room_of(&app, event_id).await?;
    let Some(published) = app.rooms.published(&row).await? else {
        return Err(Problem::new(ErrorCode::DrawNotDone).detail(format!("it is made at {}", row.sale_opens_at)));
    };
    Ok(Json(&*published).into_response())
}

#[derive(Serialize)]
struct Challenge {
    /// Find a nonce such that SHA-256(challenge ":" nonce) starts with
    /// `difficulty_bits` zero bits; join with `Dropline-Proof:
    /// <challenge>:<nonce>`.
    challenge: String,
    difficulty_bits: u8,
    algorithm: &'static str,
    expires_at: DateTime<Utc>,
}

/// `GET /v1/events/{id}/queue/challenge`: a proof-of-work challenge to join
/// with, for this buyer.
pub async fn challenge(
    State(app): State<Arc<AppState>>,
    Buyer(claims): Buyer,
    EventId(event_id): EventId,
) -> Result<Response, Problem> {
    room_budget(&app, &claims.sub, None)?;
    let row = room_of(&app, event_id).await?;
    let now = Utc::now();
    let bits = row.proof_of_work_bits;
    let challenge = app.rooms.challenges.issue(event_id, &claims.sub, bits, now.timestamp());
    let expires_at = now + chrono::Duration::seconds(dropline::room::proof::CHALLENGE_TTL_SECS);
    Ok(Json(Challenge { challenge, difficulty_bits: bits, algorithm: "SHA-256", expires_at }).into_response())
}

/// `POST /v1/events/{id}/queue`: join the line, or get back one's ticket.
pub async fn join(
    State(app): State<Arc<AppState>>,
    Buyer(claims): Buyer,
    EventId(event_id): EventId,
    JoinProof(proof): JoinProof,
    _: NoBody,
) -> Result<Response, Problem> {
    room_budget(&app, &claims.sub, Some(event_id))?;
    let row = room_of(&app, event_id).await?;
    // After the sell-out, with nobody left waiting, a join could only be
    // told so: it is, from memory, and no store is asked.
    if app.rooms.sold_out_and_empty(event_id) {
        return Err(Problem::new(ErrorCode::SoldOut)
            .detail("nobody is waiting and nothing is left; joins reopen if held units come back")
            .retry_after(5));
    }
    let redis = |e: dropline::room::RoomError| Problem::unavailable("redis", &e);
    if row.proof_of_work_bits > 0 && proof.is_none() {
        // A buyer asking again for the ticket they hold needs no new proof.
        let held = app.rooms.live.standing(event_id, &claims.sub).await.map_err(redis)?;
        if let Some(held) = held.filter(|s| s.ticket.is_some() && s.ended != Some(TurnEnd::Lapsed)) {
            metrics::counter!(ROOM_JOINS.name, "outcome" => "existing").increment(1);
            return Ok(Json(ticket_view(&app, &row, &claims.sub, Some(held))?).into_response());
        }
    }
    app.rooms.proof(&row, proof.as_deref(), &claims.sub)?;
    let joined = app.rooms.live.join(event_id, &claims.sub, Utc::now().timestamp_millis()).await.map_err(redis)?;
    let status = match joined {
        Join::Joined(_) => StatusCode::CREATED,
        Join::Existing(_) => StatusCode::OK,
        Join::NotOpen { .. } => {
            return Err(Problem::new(ErrorCode::QueueNotOpen)
                .detail(format!("the pre-queue opens at {}", row.prequeue_opens_at))
                .retry_after(retry_secs(row.prequeue_opens_at)));
        }
        Join::Closed => return Err(ErrorCode::SaleClosed.into()),
        Join::EntriesClosed => {
            return Err(
                Problem::new(ErrorCode::LotteryClosed).detail(format!("entries closed at {}", row.sale_opens_at))
            )
        }
        // The record has the room and Redis not (yet): the keepers put it
        // back within a second.
        Join::NoRoom => return Err(Problem::new(ErrorCode::DependencyUnavailable).retry_after(1)),
    };
    let outcome = if status == StatusCode::CREATED { "joined" } else { "existing" };
    metrics::counter!(ROOM_JOINS.name, "outcome" => outcome).increment(1);
    let standing = app.rooms.live.standing(event_id, &claims.sub).await.map_err(redis)?;
    let view = ticket_view(&app, &row, &claims.sub, standing)?;
    let location = format!("/v1/events/{event_id}/queue");
    Ok((status, [("location", location)], Json(view)).into_response())
}

/// `GET /v1/events/{id}/queue`: where the buyer stands, and their
/// admission once it is their turn.
pub async fn standing(
    State(app): State<Arc<AppState>>,
    Buyer(claims): Buyer,
    EventId(event_id): EventId,
) -> Result<Response, Problem> {
    room_budget(&app, &claims.sub, None)?;
    let row = room_of(&app, event_id).await?;
    let standing =
        app.rooms.live.standing(event_id, &claims.sub).await.map_err(|e| Problem::unavailable("redis", &e))?;
    Ok(Json(ticket_view(&app, &row, &claims.sub, standing)?).into_response())
}

pub(super) fn ticket_view(
    app: &AppState,
    row: &RoomRow,
    user: &str,
    standing: Option<Standing>,
) -> Result<TicketView, Problem> {
    let s = standing.ok_or_else(|| Problem::new(ErrorCode::DependencyUnavailable).retry_after(1))?;
    let ticket = s.ticket.ok_or(ErrorCode::NotInQueue)?;
    let now = Utc::now();
    let now_ms = now.timestamp_millis();
    let ahead = s.place.map(|p| p.saturating_sub(s.now_serving + 1));
    let open_turn = s.turn_ends_ms.filter(|end| *end > now_ms);
    let status = match (s.ended, open_turn, s.place) {
        _ if now >= row.sale_closes_at => "closed",
        (Some(TurnEnd::Used), _, _) => "purchased",
        (Some(TurnEnd::Lapsed), _, _) => "lapsed",
        (None, Some(_), _) => "admitted",
        (None, None, None) if s.phase == Phase::PreQueue => "pre_queue",
        (None, None, None) => "drawing",
        (None, None, Some(p)) if p <= s.now_serving => "lapsed",
        (None, None, Some(_)) if s.available == 0 => "sold_out",
        (None, None, Some(_)) if row.mode == Mode::Lottery => "waitlisted",
        (None, None, Some(_)) => "waiting",
    };
    let waiting = matches!(status, "waiting" | "waitlisted");
    let rate = s.measured_per_sec.filter(|r| *r > 0.0).unwrap_or(f64::from(s.outflow_per_sec.max(1)));
    let admission_token = match (status, open_turn) {
        ("admitted", Some(end)) => Some(
            app.rooms
                .admissions
                .mint(user, row.event_id, ticket, end)
                .map_err(|e| Problem::new(ErrorCode::Internal).detail(e.to_string()))?,
        ),
        _ => None,
    };
    Ok(TicketView {
        event_id: row.event_id,
        ticket_id: ticket,
        status,
        place: s.place,
        ahead: ahead.filter(|_| waiting || status == "sold_out"),
        now_serving: s.now_serving,
        // Until the line moves (the draw waits for a beacon round, say)
        // there is no estimate; once it does, the buyer's own turn included.
        estimated_wait_secs: ahead
            .filter(|_| waiting && s.phase == Phase::Open)
            .map(|a| ((a + 1) as f64 / rate).ceil() as u64),
        draw_at: row.sale_opens_at,
        turn_ends_at: admission_token.as_ref().and(open_turn).and_then(DateTime::from_timestamp_millis),
        admission_token,
    })
}

/// Seconds until `at`, at least one.
fn retry_secs(at: DateTime<Utc>) -> u64 {
    (at - Utc::now()).num_seconds().max(1) as u64
}

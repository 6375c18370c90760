//! Waiting rooms as the ingress runs them: their terms on the record, a
//! short cache for the purchase path, admission tokens, and the keeper that
//! draws each room at its opening and lets buyers through.
//!
//! The line itself is in Redis ([`dropline::room`]): every replica runs a
//! keeper, and the scripts make their work add up to one room's, whichever
//! replica does it.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Datelike, Utc};
use dropline::auth::{AdmissionClaims, AdmissionKeys};
use dropline::room::draw::PublishedDraw;
use dropline::room::proof::{self, Challenges};
use dropline::room::{Mode, Phase, RoomError, RoomSettings, Rooms};
use moka::future::Cache;
use serde::Deserialize;
use sqlx::MySqlPool;
use tokio_util::sync::CancellationToken;

use crate::live::{Live, RoomPulse};
use crate::metrics::{ROOM_DRAWS, ROOM_TURNS};
use crate::problem::{ErrorCode, Problem};
use crate::record::{self, RoomRow};

/// How long a room (or its absence) is cached for the purchase path.
const CACHE_TTL: Duration = Duration::from_secs(1);

/// How long before the opening a room must be set: every replica's cache
/// must know of it before a purchase can be made.
pub const SET_BEFORE_OPENING: Duration = Duration::from_secs(5);

/// How often each replica's keeper lets buyers through, and how often it
/// reads which rooms are live.
const TICK: Duration = Duration::from_millis(100);
const REFRESH: Duration = Duration::from_secs(1);

/// Longest time to act.
pub const MAX_TIME_TO_ACT_SECS: u32 = 3600;
pub const MAX_OUTFLOW_PER_SEC: u32 = 100_000;

/// How long Redis keeps a room after its sale closed.
const RETENTION_MS: i64 = 7 * 24 * 3600 * 1000;

/// An admin's request to give an event a waiting room.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RoomTerms {
    /// `fcfs` (the default) or `lottery`.
    #[serde(default)]
    pub mode: Mode,
    /// When buyers may start joining, at or before the sale's opening.
    pub prequeue_opens_at: DateTime<Utc>,
    /// Buyers let through per second (in a lottery: after the winners, as
    /// their turns lapse).
    pub outflow_per_sec: u32,
    /// How long an admitted buyer has to buy.
    pub time_to_act_secs: u32,
    /// Zero bits a join's proof of work must have (0, the default: none).
    #[serde(default)]
    pub proof_of_work_bits: u8,
    /// A public randomness beacon round, published after the opening, to
    /// mix into the draw (none by default).
    #[serde(default)]
    pub beacon: Option<BeaconTerms>,
}

/// Which beacon round a draw mixes in, named before anyone joins.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BeaconTerms {
    /// The beacon, as buyers can look it up (a drand chain's hash, say).
    pub name: String,
    pub round: u64,
}

/// An admin entering a beacon round's randomness, as the beacon published it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BeaconRandomness {
    /// Hex, 16 to 64 bytes.
    pub randomness: String,
}

impl BeaconRandomness {
    pub fn problems(&self) -> Vec<String> {
        match hex::decode(&self.randomness) {
            Ok(bytes) if bytes.iter().all(|b| *b == 0) => vec!["randomness: all zeros is no beacon's output".into()],
            Ok(bytes) if (16..=64).contains(&bytes.len()) => Vec::new(),
            _ => vec!["randomness: must be 16 to 64 bytes in hex".into()],
        }
    }
}

impl RoomTerms {
    /// The terms as the record keeps them: times to the millisecond.
    pub fn as_recorded(mut self) -> Self {
        use chrono::SubsecRound;
        self.prequeue_opens_at = self.prequeue_opens_at.trunc_subsecs(3);
        self
    }

    /// Every reason these terms do not fit an event opening at `sale_opens_at`.
    pub fn problems(&self, sale_opens_at: DateTime<Utc>) -> Vec<String> {
        let mut p = Vec::new();
        if !(2000..=9998).contains(&self.prequeue_opens_at.year()) {
            p.push("prequeue_opens_at: must be in the years 2000 to 9998".into());
        } else if self.prequeue_opens_at > sale_opens_at {
            p.push("prequeue_opens_at: must be at or before the sale's opening".into());
        }
        p.extend(outflow_problem(self.outflow_per_sec));
        if self.time_to_act_secs == 0 || self.time_to_act_secs > MAX_TIME_TO_ACT_SECS {
            p.push(format!("time_to_act_secs: must be 1 to {MAX_TIME_TO_ACT_SECS}"));
        }
        p.extend(bits_problem(self.proof_of_work_bits));
        if let Some(beacon) = &self.beacon {
            let len = beacon.name.chars().count();
            if len == 0 || len > 100 || beacon.name.chars().any(char::is_control) {
                p.push("beacon.name: must be 1 to 100 printable characters".into());
            }
            if beacon.round == 0 || beacon.round > i64::MAX as u64 {
                p.push("beacon.round: must be a positive round number".into());
            }
        }
        p
    }
}

fn outflow_problem(outflow: u32) -> Option<String> {
    (outflow == 0 || outflow > MAX_OUTFLOW_PER_SEC)
        .then(|| format!("outflow_per_sec: must be 1 to {MAX_OUTFLOW_PER_SEC}"))
}

fn bits_problem(bits: u8) -> Option<String> {
    (bits > proof::MAX_BITS).then(|| format!("proof_of_work_bits: must be 0 to {}", proof::MAX_BITS))
}

/// A change to a room, also during its sale: what is given changes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoomChange {
    pub outflow_per_sec: Option<u32>,
    pub proof_of_work_bits: Option<u8>,
}

impl RoomChange {
    pub fn problems(&self) -> Vec<String> {
        let mut p: Vec<String> = self.outflow_per_sec.and_then(outflow_problem).into_iter().collect();
        p.extend(self.proof_of_work_bits.and_then(bits_problem));
        if self.outflow_per_sec.is_none() && self.proof_of_work_bits.is_none() {
            p.push("give outflow_per_sec, proof_of_work_bits or both".into());
        }
        p
    }
}

impl RoomRow {
    pub fn terms(&self) -> RoomTerms {
        RoomTerms {
            mode: self.mode,
            prequeue_opens_at: self.prequeue_opens_at,
            outflow_per_sec: self.outflow_per_sec,
            time_to_act_secs: self.time_to_act_secs,
            proof_of_work_bits: self.proof_of_work_bits,
            beacon: match (&self.beacon_name, self.beacon_round) {
                (Some(name), Some(round)) => Some(BeaconTerms { name: name.clone(), round }),
                _ => None,
            },
        }
    }

    /// The beacon round the draw mixes in, with its randomness once entered.
    pub fn beacon(&self) -> Option<dropline::room::draw::Beacon> {
        let (name, round) = (self.beacon_name.clone()?, self.beacon_round?);
        Some(dropline::room::draw::Beacon { name, round, randomness: self.beacon_randomness.clone() })
    }

    pub fn settings(&self) -> RoomSettings {
        let closes = self.sale_closes_at.timestamp_millis();
        RoomSettings {
            mode: self.mode,
            drawn: self.drawn_at.is_some(),
            prequeue_opens_ms: self.prequeue_opens_at.timestamp_millis(),
            sale_opens_ms: self.sale_opens_at.timestamp_millis(),
            sale_closes_ms: closes,
            outflow_per_sec: self.outflow_per_sec,
            time_to_act_ms: u64::from(self.time_to_act_secs) * 1000,
            retain_until_ms: closes + i64::from(MAX_TIME_TO_ACT_SECS) * 1000 + RETENTION_MS,
        }
    }
}

/// The ingress's view of every waiting room.
#[derive(Clone)]
pub struct WaitingRooms {
    db: MySqlPool,
    pub live: Rooms,
    pub admissions: AdmissionKeys,
    pub challenges: Challenges,
    cache: Cache<u64, Option<Arc<RoomRow>>>,
    /// Published draws, which never change once made.
    draws: Cache<u64, Arc<PublishedDraw>>,
    /// Rooms sold out with nobody waiting, as this replica's keeper last
    /// saw them (every tick): their joins are refused from memory.
    closed: Arc<std::sync::RwLock<HashSet<u64>>>,
}

impl WaitingRooms {
    pub fn new(db: MySqlPool, live: Rooms, admin_secret: &[u8], issuer: &str) -> Self {
        let cache = Cache::builder().max_capacity(100_000).time_to_live(CACHE_TTL).build();
        Self {
            db,
            live,
            admissions: AdmissionKeys::derived(admin_secret, issuer),
            challenges: Challenges::derived(admin_secret),
            cache,
            draws: Cache::builder().max_capacity(64).time_to_live(Duration::from_secs(600)).build(),
            closed: Arc::default(),
        }
    }

    /// Whether `event_id`'s room is sold out with nobody waiting, as of the
    /// keeper's last tick (at most a tenth of a second ago, while it runs).
    pub fn sold_out_and_empty(&self, event_id: u64) -> bool {
        self.closed.read().unwrap_or_else(|e| e.into_inner()).contains(&event_id)
    }

    fn mark(&self, event_id: u64, sold_out_and_empty: bool) {
        let mut closed = self.closed.write().unwrap_or_else(|e| e.into_inner());
        if sold_out_and_empty {
            closed.insert(event_id);
        } else {
            closed.remove(&event_id);
        }
    }

    /// `room`'s draw as the record keeps it; `None` until it is made.
    pub async fn published(&self, room: &RoomRow) -> Result<Option<Arc<PublishedDraw>>, Problem> {
        if let Some(draw) = self.draws.get(&room.event_id).await {
            return Ok(Some(draw));
        }
        let mysql = |e: sqlx::Error| Problem::unavailable("mysql", &e);
        // The cached row may be a second old: the record says.
        let Some(row) = record::room(&self.db, room.event_id).await.map_err(mysql)? else { return Ok(None) };
        let (Some(list_hash), Some(order)) =
            (row.list_hash.clone(), record::drawn_order(&self.db, row.event_id).await.map_err(mysql)?)
        else {
            return Ok(None);
        };
        let draw = Arc::new(PublishedDraw {
            event_id: row.event_id,
            seed_commitment: row.seed_commitment.clone(),
            seed: hex::encode(&row.seed),
            list_hash,
            beacon: row.beacon(),
            order,
        });
        self.draws.insert(row.event_id, draw.clone()).await;
        Ok(Some(draw))
    }

    /// An event's room, from the cache when fresh.
    pub async fn get(&self, event_id: u64) -> Result<Option<Arc<RoomRow>>, Problem> {
        self.cache
            .try_get_with(event_id, async { Ok(record::room(&self.db, event_id).await?.map(Arc::new)) })
            .await
            .map_err(|e: Arc<sqlx::Error>| Problem::unavailable("mysql", &e))
    }

    /// An event's room, from the record.
    pub async fn load(&self, event_id: u64) -> Result<Option<RoomRow>, Problem> {
        record::room(&self.db, event_id).await.map_err(|e| Problem::unavailable("mysql", &e))
    }

    /// Gives an event a room with a fresh seed. The same terms again are
    /// the same room (a retried request); other terms are refused.
    pub async fn create(&self, event_id: u64, terms: &RoomTerms) -> Result<(RoomRow, bool), Problem> {
        let seed = dropline::room::draw::new_seed();
        let mysql = |e: sqlx::Error| Problem::unavailable("mysql", &e);
        let created = record::insert_room(&self.db, event_id, terms, &seed).await.map_err(mysql)?;
        let row = record::room(&self.db, event_id).await.map_err(mysql)?.ok_or(ErrorCode::Internal)?;
        if !created && row.terms() != *terms {
            return Err(Problem::new(ErrorCode::WaitingRoomExists).detail(
                "change the outflow with PATCH; the pre-queue's opening and the time to act are fixed once set",
            ));
        }
        self.live.open(event_id, &row.settings()).await.map_err(|e| Problem::unavailable("redis", &e))?;
        self.cache.invalidate(&event_id).await;
        Ok((row, created))
    }

    pub async fn change(&self, event_id: u64, change: &RoomChange) -> Result<(), Problem> {
        let (outflow, bits) = (change.outflow_per_sec, change.proof_of_work_bits);
        let changed = record::change_room(&self.db, event_id, outflow, bits).await;
        if !changed.map_err(|e| Problem::unavailable("mysql", &e))? {
            return Err(ErrorCode::NoWaitingRoom.into());
        }
        // A room missing from Redis is put back by the keepers, from the
        // record, with the new outflow.
        if let Some(outflow) = outflow {
            self.live.set_outflow(event_id, outflow).await.map_err(|e| Problem::unavailable("redis", &e))?;
        }
        self.cache.invalidate(&event_id).await;
        Ok(())
    }

    /// Enters the randomness of `event_id`'s beacon round, once: the same
    /// value again is fine; another is refused.
    pub async fn set_beacon(&self, event_id: u64, entered: &BeaconRandomness) -> Result<RoomRow, Problem> {
        let mysql = |e: sqlx::Error| Problem::unavailable("mysql", &e);
        // Taken only once the list is fixed and its hash published: known
        // before that, the randomness would let whoever enters it predict
        // (and, by adding tickets, steer) the order.
        let named = record::room(&self.db, event_id).await.map_err(mysql)?.ok_or(ErrorCode::NoWaitingRoom)?;
        if named.beacon_round.is_none() {
            return Err(ErrorCode::NoBeacon.into());
        }
        let summary = self.live.summary(event_id).await.map_err(|e| Problem::unavailable("redis", &e))?;
        if summary.and_then(|s| s.list_hash).is_none() {
            return Err(Problem::new(ErrorCode::BeaconTooEarly)
                .detail("enter it once the sale has opened and the room shows its list_hash"));
        }
        let randomness = entered.randomness.to_ascii_lowercase();
        record::set_beacon_randomness(&self.db, event_id, &randomness).await.map_err(mysql)?;
        let row = record::room(&self.db, event_id).await.map_err(mysql)?.ok_or(ErrorCode::NoWaitingRoom)?;
        match &row.beacon_randomness {
            Some(set) if *set == randomness => {
                self.cache.invalidate(&event_id).await;
                Ok(row)
            }
            _ => Err(Problem::new(ErrorCode::BeaconAlreadySet).detail("the round's randomness was entered before")),
        }
    }

    /// Checks a join's proof of work against `room`'s difficulty.
    pub fn proof(&self, room: &RoomRow, proof: Option<&str>, user: &str) -> Result<(), Problem> {
        if room.proof_of_work_bits == 0 {
            return Ok(());
        }
        let challenge_url = format!("/v1/events/{}/queue/challenge", room.event_id);
        let proof = proof.ok_or_else(|| {
            Problem::new(ErrorCode::ProofRequired).detail(format!("solve a challenge from GET {challenge_url}"))
        })?;
        let now = Utc::now().timestamp();
        self.challenges
            .verify(proof, room.event_id, user, room.proof_of_work_bits, now)
            .map_err(|e| Problem::new(ErrorCode::ProofInvalid).detail(e.to_string()))
    }

    /// Checks a purchase's admission to `event_id` for `user`: the token's
    /// signature, event and buyer always; the end of the turn only when
    /// `in_time` is asked (a retry of a purchase accepted in time is not).
    pub fn admission(&self, token: Option<&str>, event_id: u64, user: &str) -> Result<AdmissionClaims, Problem> {
        let token = token.ok_or_else(|| {
            Problem::new(ErrorCode::AdmissionRequired)
                .detail(format!("join with POST /v1/events/{event_id}/queue and buy once it says you are admitted"))
        })?;
        let claims = self.admissions.verify(token).map_err(|e| {
            tracing::debug!(error = %e, "admission token refused");
            Problem::new(ErrorCode::AdmissionInvalid).detail("the token is not an admission this deployment gave")
        })?;
        if claims.event_id != event_id {
            return Err(Problem::new(ErrorCode::AdmissionInvalid).detail("the token is for another event"));
        }
        if claims.sub != user {
            return Err(Problem::new(ErrorCode::AdmissionInvalid).detail("the token is another buyer's"));
        }
        Ok(claims)
    }

    /// The turn of `claims` is still open.
    pub fn in_time(claims: &AdmissionClaims) -> Result<(), Problem> {
        if Utc::now().timestamp() >= claims.exp {
            return Err(ErrorCode::TurnLapsed.into());
        }
        Ok(())
    }

    /// A fresh purchase with `claims` may go on: the turn has not ended,
    /// and has not bought yet (a turn buys once; a buyer who wants more
    /// units asks for them in that one purchase).
    pub async fn turn_open(&self, claims: &AdmissionClaims) -> Result<(), Problem> {
        Self::in_time(claims)?;
        let used = self.live.turn_used(claims.event_id, claims.ticket).await;
        if used.map_err(|e| Problem::unavailable("redis", &e))? {
            return Err(Problem::new(ErrorCode::TurnUsed).detail("a purchase made with this turn was accepted"));
        }
        Ok(())
    }

    /// The purchase `intent_id` of `quantity` units, made with `claims`,
    /// was accepted: the turn is used.
    pub async fn used(&self, claims: &AdmissionClaims, intent_id: uuid::Uuid, quantity: u32) {
        match self.live.used(claims.event_id, claims.ticket, intent_id, quantity).await {
            Ok(true) => metrics::counter!(ROOM_TURNS.name, "result" => "used").increment(1),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, event_id = claims.event_id, "could not end a used turn; it lapses"),
        }
    }
}

/// Runs this replica's keeper until shutdown: every tick, each live room
/// is drawn once its sale opens, and lets its next buyers through; the
/// line as the tick left it goes to the room's streams on this replica.
pub async fn keep(rooms: WaitingRooms, feed: Arc<Live>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut live: Vec<RoomRow> = Vec::new();
    let mut refreshed: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if refreshed.is_none_or(|at| at.elapsed() >= REFRESH) {
            match refresh(&rooms).await {
                Ok(rows) => live = rows,
                Err(e) => tracing::warn!(error = %e, "could not read the live waiting rooms"),
            }
            refreshed = Some(tokio::time::Instant::now());
        }
        for room in &mut live {
            if let Err(e) = keep_one(&rooms, &feed, room).await {
                tracing::warn!(error = %e, event_id = room.event_id, "waiting room step failed; retried next tick");
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum KeepError {
    #[error(transparent)]
    Room(#[from] RoomError),
    #[error("mysql: {0}")]
    Mysql(#[from] sqlx::Error),
}

/// The live rooms, each made sure of in Redis (a room Redis lost comes back
/// empty, with its terms).
async fn refresh(rooms: &WaitingRooms) -> Result<Vec<RoomRow>, KeepError> {
    let rows = record::live_rooms(&rooms.db).await?;
    for row in &rows {
        if rooms.live.open(row.event_id, &row.settings()).await? {
            tracing::warn!(event_id = row.event_id, "waiting room set up in redis from the record");
        }
        rooms.live.set_outflow(row.event_id, row.outflow_per_sec).await?;
    }
    Ok(rows)
}

async fn keep_one(rooms: &WaitingRooms, live: &Live, room: &mut RoomRow) -> Result<(), KeepError> {
    let now = Utc::now();
    let still = |phase| RoomPulse {
        phase,
        now_serving: 0,
        available: 0,
        outflow_per_sec: room.outflow_per_sec,
        measured_per_sec: None,
        at: now,
    };
    if now < room.sale_opens_at {
        live.pulse(room.event_id, still(Phase::PreQueue));
        return Ok(());
    }
    let id = room.event_id;
    if room.drawn_at.is_none() {
        let randomness = room.beacon_randomness.as_deref().and_then(|h| hex::decode(h).ok());
        let beacon = room.beacon_round.map(|_| randomness.as_deref());
        if let Some(order) = rooms.live.draw_if_due(id, &room.seed, beacon, now.timestamp_millis()).await? {
            metrics::counter!(ROOM_DRAWS.name).increment(1);
            tracing::info!(event_id = id, entrants = order.len(), "waiting room drawn");
        }
        // Whoever drew, the record takes what Redis published (once): the
        // list hash and the whole order, so the draw can be checked for as
        // long as the record keeps the room.
        if let Some(summary) = rooms.live.summary(id).await? {
            if let (Some(hash), Some(n), Some(ms)) = (&summary.list_hash, summary.entrants, summary.drawn_ms) {
                let order = rooms.live.drawn_order(id, n).await?;
                let at = DateTime::from_timestamp_millis(ms).unwrap_or(now);
                record::record_draw(&rooms.db, id, hash, &order, at).await?;
                room.drawn_at = Some(at);
            }
        }
    }
    let step = rooms.live.advance(id, Utc::now().timestamp_millis()).await?;
    rooms.mark(id, step.sold_out_and_empty);
    live.pulse(
        id,
        match step.available {
            Some(available) => RoomPulse {
                phase: Phase::Open,
                now_serving: step.now_serving,
                available,
                measured_per_sec: step.measured_per_sec,
                ..still(Phase::Open)
            },
            None => still(Phase::Drawing),
        },
    );
    if step.admitted > 0 {
        metrics::counter!(ROOM_TURNS.name, "result" => "admitted").increment(step.admitted);
    }
    if step.lapsed > 0 {
        metrics::counter!(ROOM_TURNS.name, "result" => "lapsed").increment(step.lapsed);
    }
    Ok(())
}

//! Waiting rooms: one line per event, in Redis, shared by every ingress
//! replica and kept across their restarts.
//!
//! A room opens its pre-queue before the sale. At the opening the pre-queue
//! is frozen and placed by an auditable [`draw`]; later arrivals join the
//! back. Buyers are then let through in order at the room's outflow, while
//! stock remains, each with a time to act. Only the Lua scripts in `lua/`
//! change a room, and every one of them runs on the event's hash slot.

pub mod draw;
pub mod proof;

use std::sync::LazyLock;

use redis::{self, Script};
use uuid::Uuid;

use crate::stock::keys::{Keys, RoomKeys};

macro_rules! room_script {
    ($file:literal) => {
        LazyLock::new(|| Script::new(concat!(include_str!("lua/keys.lua"), include_str!($file))))
    };
}

static OPEN: LazyLock<Script> = room_script!("lua/open.lua");
static JOIN: LazyLock<Script> = room_script!("lua/join.lua");
static FREEZE: LazyLock<Script> = room_script!("lua/freeze.lua");
static DRAW: LazyLock<Script> = room_script!("lua/draw.lua");
static LISTED: LazyLock<Script> = room_script!("lua/listed.lua");
static ADVANCE: LazyLock<Script> = room_script!("lua/advance.lua");
static TICKET: LazyLock<Script> = room_script!("lua/ticket.lua");
static USED: LazyLock<Script> = room_script!("lua/used.lua");
static OUTFLOW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
          redis.call('HSET', KEYS[1], 'outflow', ARGV[1])
          return 1",
    )
});

/// How a room orders its buyers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The pre-queue is drawn at the opening; later arrivals join the back,
    /// first come first served; the line moves at the outflow.
    #[default]
    Fcfs,
    /// Entries are taken until the opening only; the draw's first entrants,
    /// as many as there are units, are all let through at once; the rest
    /// move up in drawn order (at the outflow) as winners' turns lapse.
    Lottery,
}

crate::messages::named!(Mode { Fcfs => "fcfs", Lottery => "lottery" });

/// A room's settings, as its Redis state starts from them.
#[derive(Debug, Clone, Copy)]
pub struct RoomSettings {
    pub mode: Mode,
    /// The record has the room's draw: a room set up again after Redis lost
    /// it starts drawn, with an empty line.
    pub drawn: bool,
    pub prequeue_opens_ms: i64,
    pub sale_opens_ms: i64,
    pub sale_closes_ms: i64,
    pub outflow_per_sec: u32,
    pub time_to_act_ms: u64,
    /// When Redis may forget the room.
    pub retain_until_ms: i64,
}

/// Where a room's line stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Taking tickets for the draw (or not yet: see the pre-queue's opening).
    PreQueue,
    /// The opening has passed; the draw is being written.
    Drawing,
    /// Drawn: the line moves.
    Open,
}

impl Phase {
    fn parse(raw: &str) -> Result<Phase, RoomError> {
        match raw {
            "prequeue" => Ok(Phase::PreQueue),
            "frozen" => Ok(Phase::Drawing),
            "drawn" => Ok(Phase::Open),
            other => Err(RoomError::Corrupt(format!("room state {other:?}"))),
        }
    }
}

/// What a join did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Join {
    Joined(Uuid),
    /// The buyer holds this ticket already.
    Existing(Uuid),
    NoRoom,
    NotOpen {
        prequeue_opens_ms: i64,
    },
    Closed,
    /// A lottery takes entries only until the opening.
    EntriesClosed,
}

/// How a buyer's turn ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnEnd {
    /// They bought (a purchase with their admission was accepted).
    Used,
    /// Their time to act ran out.
    Lapsed,
}

/// A buyer's standing in a room, as read in one step.
#[derive(Debug, Clone)]
pub struct Standing {
    pub phase: Phase,
    pub ticket: Option<Uuid>,
    /// 1 is first; `None` until the draw places a pre-queue ticket.
    pub place: Option<u64>,
    pub now_serving: u64,
    /// The end of the buyer's turn, while it is open.
    pub turn_ends_ms: Option<i64>,
    pub ended: Option<TurnEnd>,
    pub available: u64,
    pub outflow_per_sec: u32,
    /// Buyers let through per second over the last ten seconds or so.
    pub measured_per_sec: Option<f64>,
}

/// What one call of the admission step did, and the line as it left it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Advanced {
    pub admitted: u64,
    pub lapsed: u64,
    pub now_serving: u64,
    /// `None` until the room is drawn (the line does not move before).
    pub available: Option<u64>,
    /// Sold out with nobody left waiting: a join could only be told so.
    pub sold_out_and_empty: bool,
    /// Buyers let through per second over the last ten seconds or so.
    pub measured_per_sec: Option<f64>,
}

/// A room as a whole, for its public page and the keeper.
#[derive(Debug, Clone)]
pub struct Summary {
    pub phase: Phase,
    pub outflow_per_sec: u32,
    pub now_serving: u64,
    /// Places handed out so far (the pre-queue's, once frozen, included).
    pub in_line: u64,
    /// Tickets in the pre-queue (counted while it is open).
    pub pre_queue: u64,
    pub entrants: Option<u64>,
    pub list_hash: Option<String>,
    pub seed: Option<String>,
    pub drawn_ms: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum RoomError {
    #[error("redis pool: {0}")]
    Pool(#[from] crate::redis_pool::PoolError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("the waiting room's state is damaged: {0}")]
    Corrupt(String),
}

/// Every event's waiting room, on a Redis pool.
#[derive(Clone)]
pub struct Rooms {
    pool: crate::redis_pool::Pool,
    keys: Keys,
}

impl Rooms {
    pub fn new(pool: crate::redis_pool::Pool, key_prefix: &str) -> Self {
        Self { pool, keys: Keys::new(key_prefix) }
    }

    async fn call<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        event_id: u64,
        args: &[String],
    ) -> Result<T, RoomError> {
        let keys: RoomKeys = self.keys.room(event_id);
        let mut invocation = script.prepare_invoke();
        for key in keys.all() {
            invocation.key(key);
        }
        for arg in args {
            invocation.arg(arg);
        }
        let mut conn = self.pool.get().await?;
        Ok(invocation.invoke_async(&mut conn).await?)
    }

    /// Sets up the room in Redis unless it is there; true when it was not.
    pub async fn open(&self, event_id: u64, s: &RoomSettings) -> Result<bool, RoomError> {
        let args = [
            s.prequeue_opens_ms.to_string(),
            s.sale_opens_ms.to_string(),
            s.sale_closes_ms.to_string(),
            s.outflow_per_sec.to_string(),
            s.time_to_act_ms.to_string(),
            s.retain_until_ms.to_string(),
            s.mode.as_str().to_owned(),
            u8::from(s.drawn).to_string(),
            crate::messages::now_ms().to_string(),
        ];
        let created: i64 = self.call(&OPEN, event_id, &args).await?;
        Ok(created == 1)
    }

    /// Changes how many buyers a second are let through; false when the
    /// room is not in Redis.
    pub async fn set_outflow(&self, event_id: u64, per_sec: u32) -> Result<bool, RoomError> {
        let mut conn = self.pool.get().await?;
        let done: i64 =
            OUTFLOW.prepare_invoke().key(&self.keys.room(event_id).conf).arg(per_sec).invoke_async(&mut conn).await?;
        Ok(done == 1)
    }

    /// `user` joins the line (or gets back their ticket).
    pub async fn join(&self, event_id: u64, user: &str, now_ms: i64) -> Result<Join, RoomError> {
        let fresh = Uuid::new_v4();
        let answer: Vec<String> =
            self.call(&JOIN, event_id, &[user.to_owned(), fresh.to_string(), now_ms.to_string()]).await?;
        let ticket = |raw: &str| Uuid::parse_str(raw).map_err(|_| RoomError::Corrupt(format!("ticket {raw:?}")));
        match answer.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
            ["joined", t] => Ok(Join::Joined(ticket(t)?)),
            ["existing", t] => Ok(Join::Existing(ticket(t)?)),
            ["no_room"] => Ok(Join::NoRoom),
            ["not_open", at] => Ok(Join::NotOpen { prequeue_opens_ms: at.parse().unwrap_or_default() }),
            ["closed"] => Ok(Join::Closed),
            ["entries_closed"] => Ok(Join::EntriesClosed),
            other => Err(RoomError::Corrupt(format!("join answered {other:?}"))),
        }
    }

    /// At or after the opening, freezes the pre-queue and publishes its list
    /// hash, then draws its order and writes it: from `seed`, or, for a room
    /// that named a beacon round, from the seed mixed with the round's
    /// `randomness` (no draw until it is given). `Ok(Some(order))` when
    /// this call drew; `None` when it is not time, the beacon's randomness
    /// is awaited, the room is drawn already, or another replica wrote the
    /// draw first.
    pub async fn draw_if_due(
        &self,
        event_id: u64,
        seed: &[u8],
        beacon: Option<Option<&[u8]>>,
        now_ms: i64,
    ) -> Result<Option<Vec<Uuid>>, RoomError> {
        // Waiting for a beacon round whose list hash is out already: nothing
        // to do until the randomness comes, and no need to read the whole
        // pre-queue again every tick.
        if beacon == Some(None) && self.summary(event_id).await?.is_some_and(|s| s.list_hash.is_some()) {
            return Ok(None);
        }
        let answer: Vec<String> = self.call(&FREEZE, event_id, &[now_ms.to_string()]).await?;
        let Some((first, tickets)) = answer.split_first() else {
            return Err(RoomError::Corrupt("freeze answered nothing".into()));
        };
        if first != "frozen" {
            return Ok(None);
        }
        let tickets = tickets
            .iter()
            .map(|t| Uuid::parse_str(t).map_err(|_| RoomError::Corrupt(format!("pre-queue ticket {t:?}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let list_hash = draw::list_hash(&tickets);
        let _: i64 = self.call(&LISTED, event_id, std::slice::from_ref(&list_hash)).await?;
        let draw_seed = match beacon {
            None => seed.to_vec(),
            Some(None) => return Ok(None),
            Some(Some(randomness)) => draw::beacon_seed(seed, randomness).to_vec(),
        };
        let order = draw::order(&draw_seed, &list_hash, &tickets);
        let keys = self.keys.room(event_id);
        let mut invocation = DRAW.prepare_invoke();
        for key in keys.all() {
            invocation.key(key);
        }
        invocation.arg(&list_hash).arg(hex::encode(seed)).arg(now_ms);
        for ticket in &order {
            invocation.arg(ticket.to_string());
        }
        let mut conn = self.pool.get().await?;
        let drew: i64 = invocation.invoke_async(&mut conn).await?;
        Ok((drew == 1).then_some(order))
    }

    /// Ends lapsed turns and lets the next buyers through.
    pub async fn advance(&self, event_id: u64, now_ms: i64) -> Result<Advanced, RoomError> {
        let (admitted, lapsed, now_serving, available, waiting, oldest, newest): (
            u64,
            u64,
            u64,
            i64,
            i64,
            String,
            String,
        ) = self.call(&ADVANCE, event_id, &[now_ms.to_string()]).await?;
        Ok(Advanced {
            admitted,
            lapsed,
            now_serving,
            available: u64::try_from(available).ok(),
            sold_out_and_empty: available == 0 && waiting == 0,
            measured_per_sec: measured(&oldest, &newest),
        })
    }

    /// Ends `ticket`'s turn as used by the purchase `intent_id` of
    /// `quantity` units; false when the turn was not open.
    pub async fn used(&self, event_id: u64, ticket: Uuid, intent_id: Uuid, quantity: u32) -> Result<bool, RoomError> {
        let args = [ticket.to_string(), intent_id.to_string(), quantity.to_string()];
        let done: i64 = self.call(&USED, event_id, &args).await?;
        Ok(done == 1)
    }

    /// Whether `ticket`'s turn was used already (a turn buys once).
    pub async fn turn_used(&self, event_id: u64, ticket: Uuid) -> Result<bool, RoomError> {
        let mut conn = self.pool.get().await?;
        let ended: Option<String> = redis::cmd("HGET")
            .arg(&self.keys.room(event_id).ended)
            .arg(ticket.to_string())
            .query_async(&mut conn)
            .await?;
        Ok(ended.as_deref() == Some("used"))
    }

    /// Where `user` stands; `None` when the event has no room in Redis.
    pub async fn standing(&self, event_id: u64, user: &str) -> Result<Option<Standing>, RoomError> {
        let raw: Option<Vec<String>> = self.call(&TICKET, event_id, &[user.to_owned()]).await?;
        raw.map(|r| standing(&r)).transpose()
    }

    /// The room as a whole; `None` when it is not in Redis.
    pub async fn summary(&self, event_id: u64) -> Result<Option<Summary>, RoomError> {
        let keys = self.keys.room(event_id);
        let mut conn = self.pool.get().await?;
        let (fields, pre_queue): (Vec<Option<String>>, u64) = redis::pipe()
            .cmd("HMGET")
            .arg(&keys.conf)
            .arg(&["state", "outflow", "serving", "next_pos", "entrants", "list_hash", "seed", "drawn_ms"])
            .cmd("SCARD")
            .arg(&keys.pre)
            .query_async(&mut conn)
            .await?;
        let [state, outflow, serving, next_pos, entrants, list_hash, seed, drawn_ms] =
            <[Option<String>; 8]>::try_from(fields).map_err(|_| RoomError::Corrupt("room fields".into()))?;
        let Some(state) = state else { return Ok(None) };
        let phase = Phase::parse(&state)?;
        let number = |v: Option<String>| v.and_then(|v| v.parse::<u64>().ok());
        Ok(Some(Summary {
            phase,
            outflow_per_sec: number(outflow).unwrap_or_default() as u32,
            now_serving: number(serving).unwrap_or_default(),
            in_line: if phase == Phase::PreQueue { pre_queue } else { number(next_pos).unwrap_or_default() },
            pre_queue,
            entrants: number(entrants),
            list_hash,
            seed,
            drawn_ms: number(drawn_ms).map(|v| v as i64),
        }))
    }

    /// The drawn order: the `entrants` tickets of places 1 to `entrants`.
    pub async fn drawn_order(&self, event_id: u64, entrants: u64) -> Result<Vec<Uuid>, RoomError> {
        if entrants == 0 {
            return Ok(Vec::new());
        }
        let keys = self.keys.room(event_id);
        let mut conn = self.pool.get().await?;
        let raw: Vec<String> =
            redis::cmd("ZRANGE").arg(&keys.line).arg(1).arg(entrants).arg("BYSCORE").query_async(&mut conn).await?;
        raw.iter().map(|t| Uuid::parse_str(t).map_err(|_| RoomError::Corrupt(format!("ticket {t:?}")))).collect()
    }
}

fn standing(raw: &[String]) -> Result<Standing, RoomError> {
    let [state, ticket, place, serving, deadline, ended, available, outflow, oldest, newest] = raw else {
        return Err(RoomError::Corrupt(format!("ticket answered {raw:?}")));
    };
    let opt = |v: &String| (!v.is_empty()).then(|| v.clone());
    let number = |v: &String| v.parse::<f64>().ok();
    Ok(Standing {
        phase: Phase::parse(state)?,
        ticket: opt(ticket).and_then(|t| Uuid::parse_str(&t).ok()),
        place: number(place).map(|p| p as u64),
        now_serving: number(serving).unwrap_or_default() as u64,
        turn_ends_ms: number(deadline).map(|d| d as i64),
        ended: match ended.as_str() {
            "used" => Some(TurnEnd::Used),
            "lapsed" => Some(TurnEnd::Lapsed),
            _ => None,
        },
        available: number(available).unwrap_or_default() as u64,
        outflow_per_sec: number(outflow).unwrap_or_default() as u32,
        measured_per_sec: measured(oldest, newest),
    })
}

/// The rate between two `ms:serving` samples, once they are a second apart.
fn measured(oldest: &str, newest: &str) -> Option<f64> {
    let parse = |s: &str| {
        let (ms, serving) = s.split_once(':')?;
        Some((ms.parse::<f64>().ok()?, serving.parse::<f64>().ok()?))
    };
    let ((t0, s0), (t1, s1)) = (parse(oldest)?, parse(newest)?);
    (t1 - t0 >= 1000.0).then(|| (s1 - s0) * 1000.0 / (t1 - t0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_are_stored_and_sent_by_one_name() {
        for mode in Mode::ALL {
            assert_eq!(mode.as_str().parse::<Mode>(), Ok(*mode));
            assert_eq!(serde_json::to_value(mode).unwrap(), mode.as_str());
        }
        assert!("draw".parse::<Mode>().is_err());
    }

    #[test]
    fn the_outflow_is_measured_between_samples_a_second_apart() {
        assert_eq!(measured("1000:0", "3000:100"), Some(50.0));
        assert_eq!(measured("1000:0", "1500:100"), None);
        assert_eq!(measured("", "1500:100"), None);
    }
}

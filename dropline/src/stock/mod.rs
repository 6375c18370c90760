//! The stock ledger: the Lua scripts that are the only code allowed to
//! change it, and its Redis keys ([`keys`]).
//!
//! Scripts are loaded with `redis::Script`, which calls EVALSHA and reloads
//! on NOSCRIPT.

pub mod keys;

use std::sync::LazyLock;

use redis::{self, AsyncCommands, Script, ScriptInvocation};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use uuid::Uuid;

use crate::messages::{now_ms, OrderChange, OrderState, PaymentRecord, RejectReason};
use crate::redis_pool::Link;
pub use keys::{EventKeys, Keys};

static PREWARM: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/prewarm.lua")));
static ALLOCATE: LazyLock<Script> =
    LazyLock::new(|| Script::new(concat!(include_str!("lua/guard.lua"), include_str!("lua/allocate.lua"))));
/// Renews or lifts a fence only if it is still the caller's: a rebuild whose
/// fence expired must not renew or delete the next rebuild's.
static FENCE_OWNED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
          if ARGV[2] == 'lift' then redis.call('DEL', KEYS[1]) else redis.call('EXPIRE', KEYS[1], ARGV[2]) end
          return 1",
    )
});
static RESIZE: LazyLock<Script> =
    LazyLock::new(|| Script::new(concat!(include_str!("lua/guard.lua"), include_str!("lua/resize.lua"))));
/// Sets or clears an existing ledger's `paused` field.
static PAUSE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/guard.lua"),
        r"
local refused = refuse_unless_ledger(KEYS[1], KEYS[2])
if refused then
  return refused
end
return redis.call('HSET', KEYS[1], 'paused', ARGV[1])
"
    ))
});
static DOOR: LazyLock<Script> =
    LazyLock::new(|| Script::new(concat!(include_str!("lua/guard.lua"), include_str!("lua/door.lua"))));
/// Stamps an allocator's in-flight mark with Redis' own time (ms).
static MARK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local t = redis.call('TIME')
          redis.call('HSET', KEYS[1], ARGV[1], t[1] * 1000 + math.floor(t[2] / 1000))
          redis.call('EXPIRE', KEYS[1], 86400)
          return 1",
    )
});
/// Counts the in-flight marks renewed within ARGV[1] ms, by the clock of
/// the node that keeps them.
static LIVE_MARKS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local t = redis.call('TIME')
          local now = t[1] * 1000 + math.floor(t[2] / 1000)
          local marks = redis.call('HVALS', KEYS[1])
          local live = 0
          for _, at in ipairs(marks) do
            if now - tonumber(at) < tonumber(ARGV[1]) then live = live + 1 end
          end
          return live",
    )
});
/// How long a rebuild's staged keys outlive a process that died before it
/// committed them.
const STAGED_RESTORE_TTL_SECS: u64 = 3600;
static COMMIT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/commit.lua")));
static HOLD: LazyLock<Script> =
    LazyLock::new(|| Script::new(concat!(include_str!("lua/guard.lua"), include_str!("lua/hold.lua"))));

/// What the ledger is asked to load for one event.
#[derive(Debug, Clone)]
pub struct SaleRules {
    pub capacity: u32,
    /// Units it may sell beyond the capacity: unit numbers run from 1 to
    /// capacity + oversell_allowance.
    pub oversell_allowance: u32,
    pub per_user_limit: u32,
    pub hold_ttl_ms: u64,
    pub opens_at_ms: i64,
    pub closes_at_ms: i64,
    pub price_cents: u64,
    /// When Redis may forget the ledger; MySQL stays the record after that.
    pub retain_until_ms: i64,
    /// The host paused the sale: every intent is refused `sale_paused`.
    pub paused: bool,
}

impl SaleRules {
    /// Every unit the sale may hand out: the capacity and the allowance.
    pub fn sellable(&self) -> u32 {
        self.capacity + self.oversell_allowance
    }
}

/// An intent still to decide, as the allocation script takes it.
#[derive(Debug, Clone)]
pub struct Undecided<'a> {
    pub intent_id: Uuid,
    pub user_id: &'a str,
    pub quantity: u32,
}

/// A decision as the allocation script records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "o", rename_all = "snake_case")]
pub enum Verdict {
    Held {
        #[serde(rename = "exp")]
        expires_at_ms: i64,
        #[serde(rename = "a")]
        amount_cents: u64,
        #[serde(rename = "at")]
        decided_at_ms: i64,
        /// The unit numbers the hold took.
        #[serde(rename = "n", default, skip_serializing_if = "Vec::is_empty")]
        units: Vec<u32>,
    },
    Rejected {
        #[serde(rename = "r")]
        reason: RejectReason,
        #[serde(rename = "at")]
        decided_at_ms: i64,
    },
}

/// A hold as the ledger keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    #[serde(rename = "u")]
    pub user_id: String,
    #[serde(rename = "q")]
    pub quantity: u32,
    #[serde(rename = "a")]
    pub amount_cents: u64,
    #[serde(rename = "s")]
    pub state: OrderState,
    #[serde(rename = "exp")]
    pub expires_at_ms: i64,
    #[serde(rename = "end", default, skip_serializing_if = "Option::is_none")]
    pub ended_at_ms: Option<i64>,
    #[serde(rename = "pay", default, skip_serializing_if = "Option::is_none")]
    pub payment_id: Option<String>,
    /// The unit numbers the hold took (empty for a hold restored after it
    /// ended: its units went back).
    #[serde(rename = "n", default, skip_serializing_if = "Vec::is_empty")]
    pub units: Vec<u32>,
    /// When the buyer started paying: the deadline was extended then, and
    /// is never extended again.
    #[serde(rename = "ps", default, skip_serializing_if = "Option::is_none")]
    pub payment_started_at_ms: Option<i64>,
    /// A paid order its buyer cancelled within the event's policy: the
    /// cents refunded of its payment.
    #[serde(rename = "rf", default, skip_serializing_if = "Option::is_none")]
    pub refund_cents: Option<u64>,
}

impl Hold {
    /// The order change that tells the settler this hold is in its state.
    pub fn order_event(&self, order_id: Uuid, event_id: u64, payment: Option<PaymentRecord>) -> OrderChange {
        OrderChange {
            order_id,
            event_id,
            user_id: self.user_id.clone(),
            quantity: self.quantity,
            amount_cents: self.amount_cents,
            state: self.state,
            expires_at_ms: self.expires_at_ms,
            at_ms: self.ended_at_ms.unwrap_or_else(now_ms),
            payment,
            payment_started_at_ms: self.payment_started_at_ms,
            payment_failure: None,
            refund_cents: self.refund_cents,
        }
    }
}

/// An event's ledger as the record (MySQL) says it should be: what a
/// rebuild writes back into Redis.
#[derive(Debug, Clone)]
pub struct Restore {
    pub rules: SaleRules,
    /// Every order of the event, in whatever state it is.
    pub holds: Vec<(Uuid, Hold)>,
    /// Every decided intent of the event.
    pub decisions: Vec<(Uuid, Verdict)>,
}

impl Restore {
    /// The counters the holds add up to.
    pub fn levels(&self) -> StockLevels {
        let units =
            |state| self.holds.iter().filter(|(_, h)| h.state == state).map(|(_, h)| u64::from(h.quantity)).sum();
        let (held, sold): (u64, u64) = (units(OrderState::Held), units(OrderState::Paid));
        StockLevels {
            capacity: self.rules.capacity.into(),
            allowance: self.rules.oversell_allowance.into(),
            available: u64::from(self.rules.sellable()).saturating_sub(held + sold),
            held,
            sold,
        }
    }
}

/// What recording a refusal at the door found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DoorOutcome {
    /// The intent stands refused for this reason (now, or since an earlier
    /// refusal of the same intent).
    Refused(RejectReason),
    /// The intent was decided before: this decision stands.
    Decided(Verdict),
}

/// What a payment did to its hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PayOutcome {
    /// The hold is paid by this payment.
    Paid(Hold),
    /// The money must be returned; the hold ended some other way.
    Refund(Hold),
    UnknownOrder,
}

/// What asking for a new capacity or allowance did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resized {
    /// The ledger has what was asked for: this many units it may sell
    /// (capacity and allowance), this many of them available.
    To { sellable: u32, available: u64 },
    /// Refused: unit numbers up to this one have been handed out.
    InUse { handed_out: u32 },
}

/// What asking to end a hold (cancel or expire) found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndOutcome {
    /// The hold is in this final state (moved there now or earlier).
    Ended(Hold),
    /// Expire only: the deadline is this many milliseconds ahead.
    NotDue {
        remaining_ms: u64,
    },
    UnknownOrder,
}

/// The counters of an event's ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct StockLevels {
    pub capacity: u64,
    /// The units the host accepts to sell beyond the capacity.
    pub allowance: u64,
    pub available: u64,
    pub held: u64,
    pub sold: u64,
}

impl StockLevels {
    /// Every unit the sale may hand out.
    pub fn sellable(&self) -> u64 {
        self.capacity + self.allowance
    }

    /// available + held + sold = capacity + allowance, the conservation
    /// invariant (with no allowance, = capacity).
    pub fn is_conserved(&self) -> bool {
        self.available + self.held + self.sold == self.sellable()
    }

    /// The units held or sold beyond the capacity, inside the allowance.
    pub fn oversold(&self) -> u64 {
        (self.held + self.sold).saturating_sub(self.capacity)
    }
}

#[derive(Debug, Error)]
pub enum LedgerError {
    #[error("event {0} has no stock ledger in redis")]
    NoLedger(u64),
    #[error("event {0}'s ledger is fenced for a rebuild")]
    Fenced(u64),
    #[error("event {0}'s rebuild lost its fence (it expired); nothing was restored")]
    FenceLost(u64),
    #[error("event {0}'s ledger is damaged ({1}); it must be rebuilt")]
    Damaged(u64, String),
    #[error("redis pool: {0}")]
    Pool(#[from] crate::redis_pool::PoolError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("ledger returned an unreadable record: {0}")]
    Corrupt(String),
}

impl LedgerError {
    /// Worth retrying later, as opposed to a bug or bad data.
    pub fn is_transient(&self) -> bool {
        !matches!(self, LedgerError::Corrupt(_))
    }
}

/// A rebuild's hold on an event's fence.
#[derive(Debug, Clone)]
pub struct Fence {
    pub event_id: u64,
    token: String,
}

/// The stock ledger of every event, on a Redis pool.
#[derive(Clone)]
pub struct Ledger {
    pool: crate::redis_pool::Pool,
    keys: Keys,
}

impl Ledger {
    /// A ledger whose keys all start with `prefix` (`DROPLINE_REDIS_KEY_PREFIX`).
    pub fn new(pool: crate::redis_pool::Pool, prefix: &str) -> Self {
        Self { pool, keys: Keys::new(prefix) }
    }

    /// The ledger's namespace, for other keys of the same deployment.
    pub fn prefix(&self) -> &str {
        self.keys.prefix()
    }

    /// The deployment's keys.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn pool(&self) -> &crate::redis_pool::Pool {
        &self.pool
    }

    /// Loads an event's stock unless its ledger already exists. Returns
    /// whether it was created now.
    pub async fn prewarm(&self, event_id: u64, rules: &SaleRules) -> Result<bool, LedgerError> {
        let keys = self.keys.event(event_id);
        let mut conn = self.pool.get().await?;
        let created: i64 = PREWARM
            .key(&keys.stock)
            .arg(rules.capacity)
            .arg(rules.per_user_limit)
            .arg(rules.hold_ttl_ms)
            .arg(rules.opens_at_ms)
            .arg(rules.closes_at_ms)
            .arg(rules.price_cents)
            .arg(rules.retain_until_ms)
            .arg(u8::from(rules.paused))
            .arg(rules.oversell_allowance)
            .invoke_async(&mut conn)
            .await?;
        Ok(created == 1)
    }

    /// Decides a batch of intents of one event in one script call. The
    /// verdicts come back in the order of `intents`.
    pub async fn allocate(&self, event_id: u64, intents: &[Undecided<'_>]) -> Result<Vec<Verdict>, LedgerError> {
        if intents.is_empty() {
            return Ok(Vec::new());
        }
        let keys = self.keys.event(event_id);
        let mut invocation = invoke(&ALLOCATE, &keys.allocate());
        for intent in intents {
            invocation.arg(intent.intent_id.to_string()).arg(intent.user_id).arg(intent.quantity);
        }
        let mut conn = self.pool.get().await?;
        let raw: Vec<String> = invocation.invoke_async(&mut conn).await.map_err(|e| no_ledger(e, event_id))?;
        if raw.len() != intents.len() {
            return Err(LedgerError::Corrupt(format!("{} verdicts for {} intents", raw.len(), intents.len())));
        }
        raw.iter().map(|r| decode(r)).collect()
    }

    /// Records that the ingress refuses an intent at the door for `reason`,
    /// so that a copy of it already on Kafka is decided the same way. When
    /// the intent was decided already, nothing is recorded and its decision
    /// is returned: the door must not contradict it.
    pub async fn refuse_at_door(
        &self,
        event_id: u64,
        intent_id: Uuid,
        reason: RejectReason,
    ) -> Result<DoorOutcome, LedgerError> {
        let keys = self.keys.event(event_id);
        let mut conn = self.pool.get().await?;
        let (outcome, body): (String, String) = invoke(&DOOR, &keys.door())
            .arg(intent_id.to_string())
            .arg(reason.as_str())
            .invoke_async(&mut conn)
            .await
            .map_err(|e| no_ledger(e, event_id))?;
        match outcome.as_str() {
            "refused" => body
                .parse()
                .map(DoorOutcome::Refused)
                .map_err(|_| LedgerError::Corrupt(format!("door refusal reason {body:?}"))),
            "decided" => Ok(DoorOutcome::Decided(decode(&body)?)),
            other => Err(LedgerError::Corrupt(format!("door script answered {other}"))),
        }
    }

    /// Applies a confirmed payment to a hold.
    pub async fn pay(&self, event_id: u64, order_id: Uuid, payment_id: &str) -> Result<PayOutcome, LedgerError> {
        let (outcome, hold) = match self.end_hold(event_id, "pay", order_id, &[payment_id]).await? {
            HoldAnswer::Done(outcome, hold) => (outcome, hold),
            HoldAnswer::NotDue(_) => return Err(LedgerError::Corrupt("pay answered not_due".into())),
        };
        Ok(match (outcome.as_str(), hold) {
            ("paid", Some(h)) => PayOutcome::Paid(h),
            ("refund", Some(h)) => PayOutcome::Refund(h),
            ("unknown", _) => PayOutcome::UnknownOrder,
            (other, _) => return Err(LedgerError::Corrupt(format!("pay answered {other}"))),
        })
    }

    /// Pauses or resumes a live sale: while paused, every intent is
    /// refused `sale_paused`. Only a ledger that is there: without one,
    /// the pre-warm or the rebuild reads the pause from the record.
    pub async fn set_paused(&self, event_id: u64, paused: bool) -> Result<(), LedgerError> {
        let keys = self.keys.event(event_id);
        let mut conn = self.pool.get().await?;
        let _: i64 = invoke(&PAUSE, &keys.resize())
            .arg(u8::from(paused))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| no_ledger(e, event_id))?;
        Ok(())
    }

    /// Gives a live sale the capacity and oversell allowance of `rules`:
    /// more stock to sell, or less of the stock nobody was ever given (see
    /// resize.lua).
    pub async fn resize(&self, event_id: u64, rules: &SaleRules) -> Result<Resized, LedgerError> {
        let keys = self.keys.event(event_id);
        let mut conn = self.pool.get().await?;
        let (outcome, first, second): (String, u64, u64) = invoke(&RESIZE, &keys.resize())
            .arg(rules.capacity)
            .arg(rules.oversell_allowance)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| no_ledger(e, event_id))?;
        let units = |n: u64| u32::try_from(n).map_err(|_| LedgerError::Corrupt(format!("resize answered {n} units")));
        match outcome.as_str() {
            "resized" => Ok(Resized::To { sellable: units(first)?, available: second }),
            "in_use" => Ok(Resized::InUse { handed_out: units(first)? }),
            other => Err(LedgerError::Corrupt(format!("resize answered {other}"))),
        }
    }

    /// Notes that the buyer started paying for a held order, extending its
    /// deadline by `extension_ms` the first time (never again, whatever the
    /// retries). Answers the hold as it is then: still held, or ended (a
    /// deadline already past expires it here).
    pub async fn start_payment(
        &self,
        event_id: u64,
        order_id: Uuid,
        extension_ms: u64,
    ) -> Result<Option<Hold>, LedgerError> {
        match self.end_hold(event_id, "start", order_id, &[&extension_ms.to_string()]).await? {
            HoldAnswer::Done(outcome, hold) if outcome == "unknown" || hold.is_some() => Ok(hold),
            HoldAnswer::Done(outcome, _) => Err(LedgerError::Corrupt(format!("start answered {outcome}"))),
            HoldAnswer::NotDue(_) => Err(LedgerError::Corrupt("start answered not_due".into())),
        }
    }

    /// Cancels a hold on behalf of its buyer.
    pub async fn cancel(&self, event_id: u64, order_id: Uuid, user_id: &str) -> Result<EndOutcome, LedgerError> {
        ended(self.end_hold(event_id, "cancel", order_id, &[user_id]).await?)
    }

    /// Cancels a paid order on behalf of its buyer, within the event's
    /// policy (the caller's check): its units go back on sale, and
    /// `refund_cents` of its payment is noted for refund.
    pub async fn cancel_paid(
        &self,
        event_id: u64,
        order_id: Uuid,
        user_id: &str,
        refund_cents: u64,
    ) -> Result<EndOutcome, LedgerError> {
        ended(self.end_hold(event_id, "cancel_paid", order_id, &[user_id, &refund_cents.to_string()]).await?)
    }

    /// Expires a hold whose deadline has passed.
    pub async fn expire(&self, event_id: u64, order_id: Uuid) -> Result<EndOutcome, LedgerError> {
        ended(self.end_hold(event_id, "expire", order_id, &[""]).await?)
    }

    /// Runs hold.lua's `op` on one hold, with the op's arguments (ARGV[3]
    /// on).
    async fn end_hold(
        &self,
        event_id: u64,
        op: &str,
        order_id: Uuid,
        args: &[&str],
    ) -> Result<HoldAnswer, LedgerError> {
        let keys = self.keys.event(event_id);
        let mut conn = self.pool.get().await?;
        let (outcome, body): (String, String) = invoke(&HOLD, &keys.hold())
            .arg(op)
            .arg(order_id.to_string())
            .arg(args)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| no_ledger(e, event_id))?;
        if outcome == "not_due" {
            let remaining: u64 = body.parse().map_err(|_| LedgerError::Corrupt(body.clone()))?;
            return Ok(HoldAnswer::NotDue(remaining));
        }
        let hold = if body.is_empty() { None } else { Some(decode(&body)?) };
        Ok(HoldAnswer::Done(outcome, hold))
    }

    /// Fences an event: allocation and hold changes are refused until
    /// [`Ledger::unfence`], or `ttl_secs` after the last
    /// [`Ledger::renew_fence`], so a crashed rebuild does not stop the sale
    /// for good. `None`, fencing nothing, when the event is fenced already:
    /// another rebuild is under way. The fence carries a token of its
    /// owner's, so only its owner renews, restores under it or lifts it.
    pub async fn fence(&self, event_id: u64, ttl_secs: u64) -> Result<Option<Fence>, LedgerError> {
        let keys = self.keys.event(event_id);
        let token = Uuid::new_v4().simple().to_string();
        let mut conn = self.pool.get().await?;
        let set: Option<String> = redis::cmd("SET")
            .arg(&keys.fence)
            .arg(&token)
            .arg("NX")
            .arg("EX")
            .arg(ttl_secs)
            .query_async(&mut conn)
            .await?;
        Ok(set.map(|_| Fence { event_id, token }))
    }

    /// Extends the fence by `ttl_secs`; false if it is no longer ours.
    pub async fn renew_fence(&self, fence: &Fence, ttl_secs: u64) -> Result<bool, LedgerError> {
        self.fence_owned(fence, &ttl_secs.to_string()).await
    }

    /// Lifts the fence if it is still ours; false if it had expired (and
    /// perhaps been taken by another rebuild, whose fence stays).
    pub async fn unfence(&self, fence: &Fence) -> Result<bool, LedgerError> {
        self.fence_owned(fence, "lift").await
    }

    async fn fence_owned(&self, fence: &Fence, action: &str) -> Result<bool, LedgerError> {
        let keys = self.keys.event(fence.event_id);
        let mut conn = self.pool.get().await?;
        let done: i64 = FENCE_OWNED.key(&keys.fence).arg(&fence.token).arg(action).invoke_async(&mut conn).await?;
        Ok(done == 1)
    }

    /// An allocator is about to decide intents of `event_id` and publish
    /// the decisions: until [`Ledger::published`], a rebuild of the event
    /// waits (a decision taken before the fence must reach Kafka, and so
    /// MySQL, before the ledger is rebuilt from MySQL). Called again on
    /// every retry, so a live allocator's entry never goes stale.
    pub async fn publishing(&self, event_id: u64, token: &str) -> Result<(), LedgerError> {
        let keys = self.keys.event(event_id);
        let mut conn = self.pool.get().await?;
        // Stamped with Redis' clock, which the rebuild reads too: the hosts'
        // clocks need not agree.
        let _: () = MARK.key(&keys.in_flight).arg(token).invoke_async(&mut conn).await?;
        Ok(())
    }

    /// The decisions of `token` are acknowledged by Kafka (or were never
    /// taken).
    pub async fn published(&self, event_id: u64, token: &str) -> Result<(), LedgerError> {
        let keys = self.keys.event(event_id);
        let mut conn = self.pool.get().await?;
        let _: () = conn.hdel(&keys.in_flight, token).await?;
        Ok(())
    }

    /// Allocators' publishes of `event_id` still under way: entries renewed
    /// within `stale_after_ms`. An older one belongs to an allocator that
    /// died; whatever it had sent reached the broker long ago or never will.
    pub async fn in_flight(&self, event_id: u64, stale_after_ms: i64) -> Result<usize, LedgerError> {
        let keys = self.keys.event(event_id);
        let mut conn = self.pool.get().await?;
        // Counted by the node that keeps the marks, with its own clock (the
        // one MARK stamped them with), also on a cluster.
        let live: usize = LIVE_MARKS.key(&keys.in_flight).arg(stale_after_ms).invoke_async(&mut conn).await?;
        Ok(live)
    }

    /// Records that the record has no such event: intents for it can never
    /// be decided. Kept a day.
    pub async fn mark_unknown_event(&self, event_id: u64) -> Result<(), LedgerError> {
        let key = self.keys.unknown_events();
        let mut conn = self.pool.get().await?;
        let _: () =
            redis::pipe().sadd(&key, event_id).ignore().expire(&key, 86_400).ignore().query_async(&mut conn).await?;
        Ok(())
    }

    pub async fn is_unknown_event(&self, event_id: u64) -> Result<bool, LedgerError> {
        let key = self.keys.unknown_events();
        let mut conn = self.pool.get().await?;
        Ok(conn.sismember(&key, event_id).await?)
    }

    /// Replaces an event's ledger with `restore`, all at once, so no reader
    /// sees half of it, and only while `fence` is still the event's: a
    /// rebuild that lost its fence (it expired) changes nothing. The new
    /// ledger is first written to staged copies of its keys (they expire
    /// within the hour if this process dies before it commits), then
    /// `commit.lua` checks the fence and swaps them in, in one step.
    pub async fn restore(&self, fence: &Fence, restore: &Restore) -> Result<StockLevels, LedgerError> {
        let event_id = fence.event_id;
        let keys = self.keys.event(event_id);
        let levels = restore.levels();
        let rules = &restore.rules;
        let mut users: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
        for (_, h) in &restore.holds {
            if matches!(h.state, OrderState::Held | OrderState::Paid) {
                *users.entry(h.user_id.as_str()).or_default() += u64::from(h.quantity);
            }
        }
        let staged: Vec<String> = keys.rebuilt().iter().map(|k| format!("{k}:restore:{}", fence.token)).collect();
        let [stock, users_key, decisions, holds, free_key] =
            [&staged[0], &staged[1], &staged[2], &staged[3], &staged[4]];
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.del(&staged).ignore();
        // Every unit no live hold has is free again: the lowest numbers, as
        // many as are available (a live order from before unit numbers
        // existed owns some unnamed ones).
        let taken: std::collections::HashSet<u32> = restore
            .holds
            .iter()
            .filter(|(_, h)| h.state.is_live())
            .flat_map(|(_, h)| h.units.iter().copied())
            .collect();
        let free: Vec<u32> =
            (1..=rules.sellable()).filter(|u| !taken.contains(u)).take(levels.available as usize).collect();
        for chunk in free.chunks(1000) {
            pipe.rpush(free_key, chunk).ignore();
        }
        for chunk in users.iter().collect::<Vec<_>>().chunks(1000) {
            pipe.hset_multiple(users_key, &chunk.iter().map(|(u, n)| (**u, **n)).collect::<Vec<_>>()).ignore();
        }
        for chunk in restore.decisions.chunks(1000) {
            let fields: Vec<(String, String)> = chunk.iter().map(|(id, v)| (id.to_string(), encode(v))).collect();
            pipe.hset_multiple(decisions, &fields).ignore();
        }
        for chunk in restore.holds.chunks(1000) {
            let fields: Vec<(String, String)> = chunk.iter().map(|(id, h)| (id.to_string(), encode(h))).collect();
            pipe.hset_multiple(holds, &fields).ignore();
        }
        // The stock hash is what marks the ledger present (and, staged, the
        // rebuild not yet committed).
        pipe.hset_multiple(
            stock,
            &[
                ("capacity", levels.capacity.to_string()),
                ("allowance", levels.allowance.to_string()),
                ("available", levels.available.to_string()),
                ("held", levels.held.to_string()),
                ("sold", levels.sold.to_string()),
                ("next_unit", (u64::from(rules.sellable()) + 1).to_string()),
                ("limit", rules.per_user_limit.to_string()),
                ("ttl_ms", rules.hold_ttl_ms.to_string()),
                ("opens_ms", rules.opens_at_ms.to_string()),
                ("closes_ms", rules.closes_at_ms.to_string()),
                ("price", rules.price_cents.to_string()),
                ("retain_ms", rules.retain_until_ms.to_string()),
                ("paused", u8::from(rules.paused).to_string()),
            ],
        )
        .ignore();
        for key in &staged {
            pipe.cmd("EXPIRE").arg(key).arg(STAGED_RESTORE_TTL_SECS).ignore();
        }
        let mut conn = self.pool.get().await?;
        let _: () = pipe.query_async(&mut conn).await?;
        let mut commit = COMMIT.key(&keys.fence);
        commit.key(&keys.rebuilt()).key(&staged).arg(&fence.token).arg(rules.retain_until_ms);
        let applied: i64 = commit.invoke_async(&mut conn).await?;
        if applied != 1 {
            return Err(LedgerError::FenceLost(event_id));
        }
        Ok(levels)
    }

    /// Reads one hold, if the ledger still has it.
    pub async fn hold(&self, event_id: u64, order_id: Uuid) -> Result<Option<Hold>, LedgerError> {
        let keys = self.keys.event(event_id);
        let mut conn = self.pool.get().await?;
        let raw: Option<String> = conn.hget(&keys.holds, order_id.to_string()).await?;
        raw.as_deref().map(decode).transpose()
    }

    /// Every hold the ledger has for an event (what a rebuild compares).
    pub async fn holds(&self, event_id: u64) -> Result<std::collections::HashMap<Uuid, Hold>, LedgerError> {
        let keys = self.keys.event(event_id);
        let mut conn = self.pool.get().await?;
        let raw: std::collections::HashMap<String, String> = conn.hgetall(&keys.holds).await?;
        raw.iter()
            .map(|(id, h)| {
                let id = Uuid::parse_str(id).map_err(|_| LedgerError::Corrupt(format!("hold id {id:?}")))?;
                Ok((id, decode(h)?))
            })
            .collect()
    }

    /// Why an event's ledger cannot be trusted to decide, if it cannot: its
    /// available count disagrees with the units it has left to hand out.
    pub async fn damage(&self, event_id: u64) -> Result<Option<String>, LedgerError> {
        let keys = self.keys.event(event_id);
        let mut conn = self.pool.get().await?;
        let (fields, free): (Vec<Option<u64>>, u64) = redis::pipe()
            .cmd("HMGET")
            .arg(&keys.stock)
            .arg(&["capacity", "available", "next_unit", "allowance"])
            .llen(&keys.free)
            .query_async(&mut conn)
            .await?;
        Ok(match fields.as_slice() {
            [Some(capacity), Some(available), Some(next_unit), allowance]
                if *available != free + (capacity + allowance.unwrap_or(0) + 1).saturating_sub(*next_unit) =>
            {
                Some(format!(
                    "{available} available but {free} released and {} never used units",
                    (capacity + allowance.unwrap_or(0) + 1).saturating_sub(*next_unit)
                ))
            }
            [Some(_), Some(_), None, _] => Some("no unit numbers (a ledger from before them)".to_owned()),
            _ => None,
        })
    }

    /// Asks the reconciler (in the settlers) to rebuild an event's ledger:
    /// what a stage does when it finds the ledger missing or damaged.
    pub async fn request_rebuild(&self, event_id: u64, why: &str) -> Result<(), LedgerError> {
        let mut conn = self.pool.get().await?;
        let _: () = conn.hset(self.keys.rebuild_requests(), event_id, why).await?;
        Ok(())
    }

    /// Takes the pending rebuild requests: event id and why.
    pub async fn take_rebuild_requests(&self) -> Result<Vec<(u64, String)>, LedgerError> {
        let key = self.keys.rebuild_requests();
        let mut conn = self.pool.get().await?;
        let (requests,): (std::collections::HashMap<u64, String>,) =
            redis::pipe().atomic().hgetall(&key).del(&key).ignore().query_async(&mut conn).await?;
        Ok(requests.into_iter().collect())
    }

    /// Reads the decision recorded for an intent, if any.
    pub async fn verdict(&self, event_id: u64, intent_id: Uuid) -> Result<Option<Verdict>, LedgerError> {
        let keys = self.keys.event(event_id);
        let mut conn = self.pool.get().await?;
        let raw: Option<String> = conn.hget(&keys.decisions, intent_id.to_string()).await?;
        raw.as_deref().map(decode).transpose()
    }

    /// Reads an event's counters; `None` when the ledger does not exist.
    pub async fn levels(&self, event_id: u64) -> Result<Option<StockLevels>, LedgerError> {
        let keys = self.keys.event(event_id);
        let mut conn = self.pool.get().await?;
        let f: Vec<Option<u64>> =
            redis::cmd("HMGET").arg(&keys.stock).arg(&LEVEL_FIELDS).query_async(&mut conn).await?;
        Ok(levels_from(&f))
    }

    /// The counters of several events, in one pipelined round trip; `None`
    /// for an event the ledger does not have. On a Redis Cluster a pipeline
    /// must stay in one hash slot, and each event has its own: there the
    /// reads go one per event, all at once over the cluster's multiplexed
    /// connections.
    pub async fn levels_of(&self, event_ids: &[u64]) -> Result<Vec<Option<StockLevels>>, LedgerError> {
        if event_ids.is_empty() {
            return Ok(Vec::new());
        }
        let read = |id: &u64| {
            let mut cmd = redis::cmd("HMGET");
            cmd.arg(&self.keys.event(*id).stock).arg(&LEVEL_FIELDS);
            cmd
        };
        let mut conn = self.pool.get().await?;
        let all: Vec<Vec<Option<u64>>> = match &*conn {
            Link::Single(_) => {
                let mut pipe = redis::pipe();
                for id in event_ids {
                    pipe.add_command(read(id));
                }
                pipe.query_async(&mut conn).await?
            }
            Link::Cluster(cluster) => {
                let reads = event_ids.iter().map(|id| {
                    let (cmd, mut cluster) = (read(id), cluster.clone());
                    async move { cmd.query_async::<Vec<Option<u64>>>(&mut cluster).await }
                });
                futures::future::try_join_all(reads).await?
            }
        };
        Ok(all.iter().map(|f| levels_from(f)).collect())
    }

    /// Units a user holds or bought for an event.
    pub async fn user_units(&self, event_id: u64, user_id: &str) -> Result<u64, LedgerError> {
        let keys = self.keys.event(event_id);
        let mut conn = self.pool.get().await?;
        let n: Option<u64> = conn.hget(&keys.users, user_id).await?;
        Ok(n.unwrap_or(0))
    }
}

/// The stock hash's counters, in the order [`levels_from`] reads them.
const LEVEL_FIELDS: [&str; 5] = ["capacity", "available", "held", "sold", "allowance"];

/// The counters an `HMGET` of [`LEVEL_FIELDS`] read; `None` unless all are
/// there (a ledger from before allowances has none: 0).
fn levels_from(f: &[Option<u64>]) -> Option<StockLevels> {
    match f {
        [Some(capacity), Some(available), Some(held), Some(sold), allowance] => Some(StockLevels {
            capacity: *capacity,
            allowance: allowance.unwrap_or(0),
            available: *available,
            held: *held,
            sold: *sold,
        }),
        _ => None,
    }
}

/// What the hold script answered, before it is read for one operation.
enum HoldAnswer {
    NotDue(u64),
    Done(String, Option<Hold>),
}

/// A call of `script` on `keys`, its arguments to add.
fn invoke<'a>(script: &'a Script, keys: &[&str]) -> ScriptInvocation<'a> {
    let mut invocation = script.prepare_invoke();
    for key in keys {
        invocation.key(*key);
    }
    invocation
}

fn ended(answer: HoldAnswer) -> Result<EndOutcome, LedgerError> {
    let (outcome, hold) = match answer {
        HoldAnswer::NotDue(remaining_ms) => return Ok(EndOutcome::NotDue { remaining_ms }),
        HoldAnswer::Done(outcome, hold) => (outcome, hold),
    };
    match (outcome.as_str(), hold) {
        ("unknown", _) => Ok(EndOutcome::UnknownOrder),
        ("cancelled" | "expired" | "paid" | "voided", Some(h)) => Ok(EndOutcome::Ended(h)),
        (other, _) => Err(LedgerError::Corrupt(format!("hold script answered {other}"))),
    }
}

fn no_ledger(e: redis::RedisError, event_id: u64) -> LedgerError {
    match e.code() {
        Some("NOLEDGER") => LedgerError::NoLedger(event_id),
        Some("FENCED") => LedgerError::Fenced(event_id),
        Some("CORRUPT") => LedgerError::Damaged(event_id, e.detail().unwrap_or_default().to_owned()),
        _ => LedgerError::Redis(e),
    }
}

/// The scripts' JSON encoding of a ledger record.
fn encode<T: Serialize>(record: &T) -> String {
    serde_json::to_string(record).expect("ledger records serialize")
}

fn decode<T: serde::de::DeserializeOwned>(raw: &str) -> Result<T, LedgerError> {
    serde_json::from_str(raw).map_err(|e| LedgerError::Corrupt(format!("{e}: {raw}")))
}

//! The stock ledger: Redis keys and the Lua scripts that are the only code
//! allowed to change them.
//!
//! All of an event's keys share one hash tag (`{dl:<event>}`), so each script
//! touches a single Redis Cluster slot and runs atomically. Scripts are loaded
//! with `redis::Script`, which calls EVALSHA and reloads on NOSCRIPT.

use std::sync::LazyLock;

use deadpool_redis::redis::{self, AsyncCommands, Script};
use serde::Deserialize;
use thiserror::Error;
use uuid::Uuid;

use crate::messages::{OrderState, RejectReason};

static PREWARM: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/prewarm.lua")));
static ALLOCATE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/allocate.lua")));
static HOLD: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/hold.lua")));

/// Redis keys of one event's ledger.
#[derive(Debug, Clone)]
pub struct EventKeys {
    pub stock: String,
    pub users: String,
    pub decisions: String,
    pub holds: String,
}

impl EventKeys {
    pub fn new(prefix: &str, event_id: u64) -> Self {
        let tag = format!("{prefix}:{{{event_id}}}");
        Self {
            stock: format!("{tag}:stock"),
            users: format!("{tag}:users"),
            decisions: format!("{tag}:decisions"),
            holds: format!("{tag}:holds"),
        }
    }
}

/// What the ledger is asked to load for one event.
#[derive(Debug, Clone)]
pub struct SaleRules {
    pub capacity: u32,
    pub per_user_limit: u32,
    pub hold_ttl_ms: u64,
    pub opens_at_ms: i64,
    pub closes_at_ms: i64,
    pub price_cents: u64,
    /// When Redis may forget the ledger; MySQL stays the record after that.
    pub retain_until_ms: i64,
}

/// One intent as the allocation script sees it.
#[derive(Debug, Clone)]
pub struct Claim<'a> {
    pub intent_id: Uuid,
    pub user_id: &'a str,
    pub quantity: u32,
}

/// A decision as the allocation script records it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "o", rename_all = "snake_case")]
pub enum Verdict {
    Held {
        #[serde(rename = "exp")]
        expires_at_ms: i64,
        #[serde(rename = "a")]
        amount_cents: u64,
        #[serde(rename = "at")]
        decided_at_ms: i64,
    },
    Rejected {
        #[serde(rename = "r")]
        reason: RejectReason,
        #[serde(rename = "at")]
        decided_at_ms: i64,
    },
}

/// A hold as the ledger keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
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
    #[serde(rename = "end", default)]
    pub ended_at_ms: Option<i64>,
    #[serde(rename = "pay", default)]
    pub payment_id: Option<String>,
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

/// The four counters of an event's ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct StockLevels {
    pub capacity: u64,
    pub available: u64,
    pub held: u64,
    pub sold: u64,
}

impl StockLevels {
    /// available + held + sold = capacity, the conservation invariant.
    pub fn is_conserved(&self) -> bool {
        self.available + self.held + self.sold == self.capacity
    }
}

#[derive(Debug, Error)]
pub enum LedgerError {
    #[error("event {0} has no stock ledger in redis")]
    NoLedger(u64),
    #[error("redis pool: {0}")]
    Pool(#[from] deadpool_redis::PoolError),
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

/// The stock ledger of every event, on a Redis pool.
#[derive(Clone)]
pub struct Ledger {
    pool: deadpool_redis::Pool,
    prefix: std::sync::Arc<str>,
}

impl Ledger {
    /// A ledger whose keys all start with `prefix` (`DROPLINE_REDIS_KEY_PREFIX`).
    pub fn new(pool: deadpool_redis::Pool, prefix: &str) -> Self {
        Self { pool, prefix: prefix.into() }
    }

    /// The ledger's namespace, for other keys of the same deployment.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn keys(&self, event_id: u64) -> EventKeys {
        EventKeys::new(&self.prefix, event_id)
    }

    pub fn pool(&self) -> &deadpool_redis::Pool {
        &self.pool
    }

    /// Loads an event's stock unless its ledger already exists. Returns
    /// whether it was created now.
    pub async fn prewarm(&self, event_id: u64, rules: &SaleRules) -> Result<bool, LedgerError> {
        let keys = self.keys(event_id);
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
            .invoke_async(&mut conn)
            .await?;
        Ok(created == 1)
    }

    /// Decides a batch of intents of one event in one script call. The
    /// verdicts come back in the order of `claims`.
    pub async fn allocate(&self, event_id: u64, claims: &[Claim<'_>]) -> Result<Vec<Verdict>, LedgerError> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        let keys = self.keys(event_id);
        let mut invocation = ALLOCATE.prepare_invoke();
        invocation.key(&keys.stock).key(&keys.users).key(&keys.decisions).key(&keys.holds);
        for claim in claims {
            invocation.arg(claim.intent_id.to_string()).arg(claim.user_id).arg(claim.quantity);
        }
        let mut conn = self.pool.get().await?;
        let raw: Vec<String> = invocation.invoke_async(&mut conn).await.map_err(|e| no_ledger(e, event_id))?;
        if raw.len() != claims.len() {
            return Err(LedgerError::Corrupt(format!("{} verdicts for {} intents", raw.len(), claims.len())));
        }
        raw.iter().map(|r| decode(r)).collect()
    }

    /// Applies a confirmed payment to a hold.
    pub async fn pay(&self, event_id: u64, order_id: Uuid, payment_id: &str) -> Result<PayOutcome, LedgerError> {
        let (outcome, hold) = match self.end_hold(event_id, "pay", order_id, payment_id).await? {
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

    /// Cancels a hold on behalf of its buyer.
    pub async fn cancel(&self, event_id: u64, order_id: Uuid, user_id: &str) -> Result<EndOutcome, LedgerError> {
        ended(self.end_hold(event_id, "cancel", order_id, user_id).await?)
    }

    /// Expires a hold whose deadline has passed.
    pub async fn expire(&self, event_id: u64, order_id: Uuid) -> Result<EndOutcome, LedgerError> {
        ended(self.end_hold(event_id, "expire", order_id, "").await?)
    }

    async fn end_hold(&self, event_id: u64, op: &str, order_id: Uuid, arg: &str) -> Result<HoldAnswer, LedgerError> {
        let keys = self.keys(event_id);
        let mut conn = self.pool.get().await?;
        let (outcome, body): (String, String) = HOLD
            .key(&keys.stock)
            .key(&keys.users)
            .key(&keys.holds)
            .arg(op)
            .arg(order_id.to_string())
            .arg(arg)
            .invoke_async(&mut conn)
            .await?;
        if outcome == "not_due" {
            let remaining: u64 = body.parse().map_err(|_| LedgerError::Corrupt(body.clone()))?;
            return Ok(HoldAnswer::NotDue(remaining));
        }
        let hold = if body.is_empty() { None } else { Some(decode(&body)?) };
        Ok(HoldAnswer::Done(outcome, hold))
    }

    /// Reads one hold, if the ledger still has it.
    pub async fn hold(&self, event_id: u64, order_id: Uuid) -> Result<Option<Hold>, LedgerError> {
        let keys = self.keys(event_id);
        let mut conn = self.pool.get().await?;
        let raw: Option<String> = conn.hget(&keys.holds, order_id.to_string()).await?;
        raw.as_deref().map(decode).transpose()
    }

    /// Reads the decision recorded for an intent, if any.
    pub async fn verdict(&self, event_id: u64, intent_id: Uuid) -> Result<Option<Verdict>, LedgerError> {
        let keys = self.keys(event_id);
        let mut conn = self.pool.get().await?;
        let raw: Option<String> = conn.hget(&keys.decisions, intent_id.to_string()).await?;
        raw.as_deref().map(decode).transpose()
    }

    /// Reads an event's counters; `None` when the ledger does not exist.
    pub async fn levels(&self, event_id: u64) -> Result<Option<StockLevels>, LedgerError> {
        let keys = self.keys(event_id);
        let mut conn = self.pool.get().await?;
        let f: Vec<Option<u64>> = redis::cmd("HMGET")
            .arg(&keys.stock)
            .arg(&["capacity", "available", "held", "sold"])
            .query_async(&mut conn)
            .await?;
        match f.as_slice() {
            [Some(capacity), Some(available), Some(held), Some(sold)] => {
                Ok(Some(StockLevels { capacity: *capacity, available: *available, held: *held, sold: *sold }))
            }
            _ => Ok(None),
        }
    }

    /// Units a user holds or bought for an event.
    pub async fn user_units(&self, event_id: u64, user_id: &str) -> Result<u64, LedgerError> {
        let keys = self.keys(event_id);
        let mut conn = self.pool.get().await?;
        let n: Option<u64> = conn.hget(&keys.users, user_id).await?;
        Ok(n.unwrap_or(0))
    }
}

/// What the hold script answered, before it is read for one operation.
enum HoldAnswer {
    NotDue(u64),
    Done(String, Option<Hold>),
}

fn ended(answer: HoldAnswer) -> Result<EndOutcome, LedgerError> {
    let (outcome, hold) = match answer {
        HoldAnswer::NotDue(remaining_ms) => return Ok(EndOutcome::NotDue { remaining_ms }),
        HoldAnswer::Done(outcome, hold) => (outcome, hold),
    };
    match (outcome.as_str(), hold) {
        ("unknown", _) => Ok(EndOutcome::UnknownOrder),
        ("cancelled" | "expired" | "paid", Some(h)) => Ok(EndOutcome::Ended(h)),
        (other, _) => Err(LedgerError::Corrupt(format!("hold script answered {other}"))),
    }
}

fn no_ledger(e: redis::RedisError, event_id: u64) -> LedgerError {
    if e.code() == Some("NOLEDGER") {
        LedgerError::NoLedger(event_id)
    } else {
        LedgerError::Redis(e)
    }
}

fn decode<T: serde::de::DeserializeOwned>(raw: &str) -> Result<T, LedgerError> {
    serde_json::from_str(raw).map_err(|e| LedgerError::Corrupt(format!("{e}: {raw}")))
}

//! The record's check on every new hold, inside the settler's transaction:
//! its units must not belong to another live order, and its buyer must stay
//! within the event's limit. Redis decides first and fast; this is what a
//! Redis that lost writes cannot get past.
//!
//! Holds end on another topic than the one that creates them, so the record
//! may still show a competitor as held when Redis has already released it
//! and handed its units on. A held competitor is therefore looked up in the
//! ledger: if Redis says it ended (expired or cancelled), its end is on its
//! way and is applied now; if Redis says anything else (held, paid, or does
//! not know it), the competitor keeps what it has and the new hold is
//! voided. Voiding is the safe way round: a buyer may lose a hold that a
//! damaged ledger gave them, but no unit is ever sold twice.

use std::collections::{HashMap, HashSet};

use chrono::Utc;
use dropline::messages::OrderState;
use dropline::stock::{Ledger, LedgerError};
use uuid::Uuid;

use crate::record::{events, orders, units, Tx};

/// Why a batch could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("mysql: {0}")]
    Mysql(#[from] sqlx::Error),
    /// Asking the ledger whether a competing hold ended.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// A new hold's claim on its units, as its decision carries it.
#[derive(Debug, Clone)]
pub struct Claim {
    pub order_id: String,
    pub event_id: u64,
    pub user_id: String,
    pub units: Vec<u32>,
}

/// A hold the record refused, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Void {
    pub event_id: u64,
    pub order_id: String,
    pub reason: VoidReason,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VoidReason {
    /// The unit belongs to a live order.
    UnitTaken { unit: u32, by: String },
    /// A unit number the event does not have.
    NoSuchUnit { unit: u32 },
    /// The buyer would own more than the limit.
    OverLimit { units: u64, limit: u32 },
}

impl VoidReason {
    pub fn label(&self) -> &'static str {
        match self {
            VoidReason::UnitTaken { .. } => "unit_taken",
            VoidReason::NoSuchUnit { .. } => "no_such_unit",
            VoidReason::OverLimit { .. } => "over_limit",
        }
    }
}

impl std::fmt::Display for VoidReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VoidReason::UnitTaken { unit, by } => write!(f, "unit {unit} belongs to live order {by}"),
            VoidReason::NoSuchUnit { unit } => {
                write!(f, "unit {unit} is beyond the event's capacity and oversell allowance")
            }
            VoidReason::OverLimit { units, limit } => write!(f, "the buyer would own {units} units, limit {limit}"),
        }
    }
}

/// The events of a batch's claims, locked for its transaction: one
/// transaction at a time checks an event's claims.
///
/// Two settlers meet on an event only while its partition changes hands
/// (the one that lost it may still be writing its last batch), but then
/// both could find a unit free and both grant it. The event's row, locked
/// before the batch writes or reads anything, makes the second wait and
/// then see the first one's units. Every write of `order_units` is made
/// under this lock, so the check reads units and live orders without
/// locking them: locking reads of rows the record does not have yet lock
/// the gaps around them, and the gap after one event's last unit is the
/// gap before the next event's first, so settlers writing neighbouring
/// events (other partitions) waited on each other and deadlocked
/// (docs/performance-analysis.md, "Scale-out on one machine"). An event
/// the record lacks has no row to lock: its units are read locked, as
/// before.
pub struct Locked {
    /// event -> (sellable units, per-buyer limit), for the events the
    /// record has.
    limits: HashMap<u64, (u32, u32)>,
}

impl Locked {
    pub async fn lock(tx: &mut Tx<'_>, claims: &[Claim]) -> Result<Locked, WriteError> {
        let events: Vec<u64> = claims.iter().map(|c| c.event_id).collect();
        Ok(Locked { limits: events::lock_limits(tx, &events).await? })
    }
}

/// Checks and records the claims of one batch, in batch order (the order
/// the ledger decided them), their events locked first. Returns the unit
/// rows written and the voids.
pub async fn settle(
    tx: &mut Tx<'_>,
    ledger: &Ledger,
    locked: &Locked,
    claims: &[Claim],
) -> Result<(usize, Vec<Void>), WriteError> {
    let mut events: Vec<u64> = claims.iter().map(|c| c.event_id).collect();
    events.sort_unstable();
    events.dedup();
    let (mut written, mut voided) = (0, Vec::new());
    for event_id in events {
        let claims: Vec<&Claim> = claims.iter().filter(|c| c.event_id == event_id).collect();
        let rules = locked.limits.get(&event_id).copied();
        let mut event = EventClaims::load(tx, ledger, event_id, rules, &claims).await?;
        for claim in &claims {
            if let Some(reason) = event.check(tx, claim).await? {
                event.void(tx, claim, reason.clone()).await?;
                voided.push(Void { event_id, order_id: claim.order_id.clone(), reason });
            }
        }
        written += event.write_units(tx).await?;
    }
    Ok((written, voided))
}

/// What the record says about one event's claims, kept current while the
/// batch's claims are checked one after the other.
struct EventClaims<'a> {
    ledger: &'a Ledger,
    event_id: u64,
    /// The units it may sell: its capacity and oversell allowance.
    sellable: u32,
    limit: u32,
    /// unit -> the order that has it.
    owners: HashMap<u32, String>,
    /// The state of every order involved.
    states: HashMap<String, OrderState>,
    /// buyer -> their live orders and quantities.
    live: HashMap<String, HashMap<String, u32>>,
    /// Claims of this batch not checked yet: they do not count against a
    /// buyer's limit before their turn.
    pending: HashSet<String>,
    /// Units to record: (unit, order).
    granted: Vec<(u32, String)>,
}

impl<'a> EventClaims<'a> {
    async fn load(
        tx: &mut Tx<'_>,
        ledger: &'a Ledger,
        event_id: u64,
        rules: Option<(u32, u32)>,
        claims: &[&Claim],
    ) -> Result<EventClaims<'a>, WriteError> {
        // Only a hand-made message names an event the record lacks: its
        // units are still kept unique, with no bounds to check.
        let (sellable, limit) = rules.unwrap_or_else(|| {
            tracing::warn!(event_id, "a hold for an event MySQL does not have");
            (u32::MAX, u32::MAX)
        });
        let claimed: Vec<u32> = claims.iter().flat_map(|c| c.units.iter().copied()).collect();
        let lock_units = rules.is_none();
        let owners: HashMap<u32, String> =
            units::owners(tx, event_id, &claimed, lock_units).await?.into_iter().collect();
        let buyers: Vec<&str> = {
            let mut b: Vec<&str> = claims.iter().map(|c| c.user_id.as_str()).collect();
            b.sort_unstable();
            b.dedup();
            b
        };
        let mut live: HashMap<String, HashMap<String, u32>> = HashMap::new();
        let mut states = HashMap::new();
        for order in orders::live_of_buyers(tx, event_id, &buyers).await? {
            states.insert(order.order_id.clone(), order.state);
            live.entry(order.user_id).or_default().insert(order.order_id, order.quantity);
        }
        let mut unknown: Vec<&str> = owners
            .values()
            .map(String::as_str)
            .chain(claims.iter().map(|c| c.order_id.as_str()))
            .filter(|id| !states.contains_key(*id))
            .collect();
        unknown.sort_unstable();
        unknown.dedup();
        states.extend(orders::states(tx, &unknown).await?);
        let pending = claims.iter().map(|c| c.order_id.clone()).collect();
        Ok(EventClaims { ledger, event_id, sellable, limit, owners, states, live, pending, granted: Vec::new() })
    }

    /// Why the record refuses `claim`, if it does. A claim it accepts owns
    /// its units from now on.
    async fn check(&mut self, tx: &mut Tx<'_>, claim: &Claim) -> Result<Option<VoidReason>, WriteError> {
        self.pending.remove(&claim.order_id);
        // An order that already ended (its end overtook its decision) or
        // was voided holds nothing to protect.
        if !self.states.get(&claim.order_id).is_some_and(|s| s.is_live()) {
            return Ok(None);
        }
        for &unit in &claim.units {
            if unit == 0 || unit > self.sellable {
                return Ok(Some(VoidReason::NoSuchUnit { unit }));
            }
            let Some(owner) = self.owners.get(&unit).cloned() else { continue };
            if owner != claim.order_id && self.still_live(tx, &owner).await? {
                return Ok(Some(VoidReason::UnitTaken { unit, by: owner }));
            }
        }
        let mut units = self.buyer_units(&claim.user_id);
        if units > u64::from(self.limit) {
            // Orders the record still has as held may have ended in Redis.
            let others: Vec<String> =
                self.live.get(&claim.user_id).into_iter().flatten().map(|(o, _)| o.clone()).collect();
            for other in others.iter().filter(|o| **o != claim.order_id) {
                self.still_live(tx, other).await?;
            }
            units = self.buyer_units(&claim.user_id);
            if units > u64::from(self.limit) {
                return Ok(Some(VoidReason::OverLimit { units, limit: self.limit }));
            }
        }
        for &unit in &claim.units {
            if self.owners.get(&unit) != Some(&claim.order_id) {
                self.owners.insert(unit, claim.order_id.clone());
                self.granted.push((unit, claim.order_id.clone()));
            }
        }
        Ok(None)
    }

    /// Units the buyer's live orders own, this batch's unchecked claims
    /// aside.
    fn buyer_units(&self, user_id: &str) -> u64 {
        self.live
            .get(user_id)
            .into_iter()
            .flatten()
            .filter(|(order, _)| !self.pending.contains(*order))
            .filter(|(order, _)| self.states.get(*order).is_some_and(|s| s.is_live()))
            .map(|(_, q)| u64::from(*q))
            .sum()
    }

    /// Whether `order` still holds or owns stock. A held order that the
    /// ledger says has expired or been cancelled is ended in the record now,
    /// with the ledger's time; its own event will find it done.
    async fn still_live(&mut self, tx: &mut Tx<'_>, order: &str) -> Result<bool, WriteError> {
        match self.states.get(order) {
            Some(OrderState::Held) => {}
            // A paid order may have been cancelled within the policy (or
            // with its event) and its units sold again before that change
            // reached the record: the ledger says.
            Some(OrderState::Paid) => return self.still_paid(tx, order).await,
            Some(state) => return Ok(state.is_live()),
            // Not in the record at all: its decision is not written yet, so
            // it cannot have taken the unit before this claim.
            None => return Ok(false),
        }
        let Ok(id) = Uuid::parse_str(order) else { return Ok(true) };
        let Some(hold) = self.ledger.hold(self.event_id, id).await? else { return Ok(true) };
        if !matches!(hold.state, OrderState::Expired | OrderState::Cancelled) {
            return Ok(true);
        }
        let at = hold.ended_at_ms.map(dropline::db::from_ms).unwrap_or_else(Utc::now);
        if !orders::end_held(tx, order, hold.state, at).await? {
            // Its state moved since it was read (paid, say, by a batch of
            // order changes, which does not lock the event): that state
            // decides.
            return self.moved(tx, order).await;
        }
        tracing::info!(
            event_id = self.event_id,
            order_id = order,
            state = hold.state.as_str(),
            "the ledger ended this hold before its event reached the record; ended it here too"
        );
        self.states.insert(order.to_owned(), hold.state);
        Ok(false)
    }

    /// Whether a paid order in the record still is; one the ledger has
    /// cancelled with its refund is cancelled here too, its payment marked
    /// for refund of that share, in this transaction.
    async fn still_paid(&mut self, tx: &mut Tx<'_>, order: &str) -> Result<bool, WriteError> {
        let Ok(id) = Uuid::parse_str(order) else { return Ok(true) };
        let Some(hold) = self.ledger.hold(self.event_id, id).await? else { return Ok(true) };
        let (OrderState::Cancelled, Some(refund_cents)) = (hold.state, hold.refund_cents) else { return Ok(true) };
        let at = hold.ended_at_ms.map(dropline::db::from_ms).unwrap_or_else(Utc::now);
        if !orders::cancel_paid(tx, order, refund_cents, at).await? {
            return self.moved(tx, order).await;
        }
        crate::record::payments::refund_unpaid(tx, &[order]).await?;
        tracing::info!(
            event_id = self.event_id,
            order_id = order,
            refund_cents,
            "the ledger cancelled this paid order before its change reached the record; cancelled it here too"
        );
        self.states.insert(order.to_owned(), OrderState::Cancelled);
        Ok(false)
    }

    /// Whether `order`, whose state moved since this batch read it, is live
    /// in its latest committed state (read locked, so it stays so).
    async fn moved(&mut self, tx: &mut Tx<'_>, order: &str) -> Result<bool, WriteError> {
        let Some(state) = orders::state_locked(tx, order).await? else { return Ok(false) };
        self.states.insert(order.to_owned(), state);
        Ok(state.is_live())
    }

    async fn void(&mut self, tx: &mut Tx<'_>, claim: &Claim, reason: VoidReason) -> Result<(), WriteError> {
        tracing::warn!(event_id = self.event_id, order_id = %claim.order_id, user_id = %claim.user_id, %reason,
            "the record refused a hold the ledger gave; the order is voided");
        ::metrics::counter!(crate::metrics::VOIDED.name, "reason" => reason.label()).increment(1);
        orders::void(tx, &claim.order_id, Utc::now()).await?;
        units::release(tx, &claim.order_id).await?;
        self.owners.retain(|_, o| *o != claim.order_id);
        self.granted.retain(|(_, o)| *o != claim.order_id);
        self.states.insert(claim.order_id.clone(), OrderState::Voided);
        Ok(())
    }

    async fn write_units(&self, tx: &mut Tx<'_>) -> Result<usize, WriteError> {
        units::grant(tx, self.event_id, &self.granted).await?;
        Ok(self.granted.len())
    }
}

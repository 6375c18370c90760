//! Events: the admin API's records in MySQL, read from the in-memory
//! snapshot ([`crate::snapshot`]) with a short-lived cache for what it does
//! not have yet, the stock ledger's pre-warm, and a host's changes of a
//! live sale.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
pub use dropline::events::{Event, EventTerms};
use dropline::stock::{Ledger, LedgerError, Resized, StockLevels};
use moka::future::Cache;
use serde::Deserialize;
use sqlx::MySqlPool;

use crate::problem::{ErrorCode, Problem};

use crate::record;
pub use crate::record::SearchTimeout;
use crate::snapshot::Catalog;

/// How long the door trusts its last read of an event's stock.
pub const AVAILABLE_TTL: Duration = Duration::from_millis(250);

/// What a host may change about an event, on sale or not: its capacity and
/// oversell allowance (stock added, or stock never handed out taken back),
/// its date and its cancellation policy. A field it does not know is
/// refused, and so is a `null` (it would read as "leave it", which a host
/// sending `"oversell_allowance": null` to clear one does not mean).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventChanges {
    #[serde(default, deserialize_with = "not_null")]
    pub capacity: Option<u32>,
    #[serde(default, deserialize_with = "not_null")]
    pub oversell_allowance: Option<u32>,
    #[serde(default, deserialize_with = "not_null")]
    pub starts_at: Option<DateTime<Utc>>,
    #[serde(default, deserialize_with = "not_null")]
    pub cancellation: Option<CancellationPolicy>,
}

/// A field given a value; absent is `None` (the field's default), `null`
/// an error.
fn not_null<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d)?
        .map(Some)
        .ok_or_else(|| serde::de::Error::custom("null is not a value here; leave the field out to keep it"))
}

/// Until when a buyer may cancel a paid order (`null`: never), and the
/// share of its price refunded then.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancellationPolicy {
    pub until: Option<DateTime<Utc>>,
    pub refund_percent: u8,
}

/// A cancelled event changes no more.
fn refuse_if_cancelled(event: &Event) -> Result<(), Problem> {
    match event.cancelled_at {
        Some(at) => Err(Problem::new(ErrorCode::EventCancelled).detail(format!("the event was cancelled at {at}"))),
        None => Ok(()),
    }
}

/// Events in MySQL, with a cache for the purchase path: events are read on
/// every purchase and change rarely (a host's [`Events::change`]).
#[derive(Clone)]
pub struct Events {
    db: MySqlPool,
    ledger: Ledger,
    search_timeout: SearchTimeout,
    cache: Cache<u64, Option<Arc<Event>>>,
    available: Cache<u64, u64>,
    /// Every event and its counters, in memory.
    pub catalog: Arc<Catalog>,
}

impl Events {
    pub fn new(db: MySqlPool, ledger: Ledger, ttl: Duration) -> Self {
        let catalog = Arc::new(Catalog::new(db.clone(), ledger.clone()));
        Self {
            db,
            ledger,
            search_timeout: SearchTimeout::None,
            // Misses are cached too, so a flood of unknown ids costs MySQL
            // one query per id and TTL; the capacity bounds memory.
            cache: Cache::builder().max_capacity(100_000).time_to_live(ttl).build(),
            // A sold-out answer at the door spares the pipeline the flood that
            // follows a sell-out. Short-lived: cancelled and expired holds
            // bring stock back.
            available: Cache::builder().max_capacity(10_000).time_to_live(AVAILABLE_TTL).build(),
            catalog,
        }
    }

    /// Searches bounded on the server as `timeout` says: a slow `LIKE`
    /// cannot hold a pooled connection for longer.
    pub fn with_search_timeout(mut self, timeout: SearchTimeout) -> Self {
        self.search_timeout = timeout;
        self
    }

    pub async fn create(&self, new: &EventTerms) -> Result<Event, sqlx::Error> {
        let id = record::insert_event(&self.db, new).await?;
        self.load(id).await?.ok_or(sqlx::Error::RowNotFound)
    }

    async fn load(&self, id: u64) -> Result<Option<Event>, sqlx::Error> {
        Event::load(&self.db, id).await
    }

    /// An event: from the snapshot, or (created on another replica since
    /// its last refresh) from MySQL through a short cache.
    pub async fn get(&self, id: u64) -> Result<Option<Arc<Event>>, Arc<sqlx::Error>> {
        if let Some((event, _)) = self.catalog.get(id) {
            return Ok(Some(event));
        }
        self.cache.try_get_with(id, async { Ok(self.load(id).await?.map(Arc::new)) }).await
    }

    /// Events whose name or venue contains `q`, by id, after `after`: from
    /// the snapshot once it is loaded, from MySQL before.
    pub async fn search(&self, q: Option<&str>, after: u64, limit: u32) -> Result<Vec<Event>, sqlx::Error> {
        if self.catalog.is_loaded() {
            return Ok(self.catalog.search(q, after, limit).iter().map(|e| Event::clone(e)).collect());
        }
        record::search_events(&self.db, self.search_timeout, q, after, limit).await
    }

    /// Applies a host's changes to the record and to the live ledger.
    ///
    /// The order of the two writes keeps the ledger from ever selling a
    /// unit the record would refuse: less stock comes out of Redis first
    /// (refused there if units beyond it were ever handed out), under the
    /// event's row lock; then the record changes; then
    /// [`Events::sync_ledger`] gives the ledger the record's capacity and
    /// allowance (more stock goes in only once the record has it: the
    /// settler voids a unit beyond the record's capacity and allowance). If a step fails the answer is an
    /// error and the same call again completes it.
    pub async fn change(&self, id: u64, changes: &EventChanges) -> Result<Event, Problem> {
        let mysql = |e: sqlx::Error| Problem::unavailable("mysql", &e);
        let mut tx = self.db.begin().await.map_err(mysql)?;
        let event = record::lock_event(&mut tx, id).await.map_err(mysql)?.ok_or(ErrorCode::EventNotFound)?;
        refuse_if_cancelled(&event)?;
        let mut terms = event.terms.clone();
        terms.capacity = changes.capacity.unwrap_or(terms.capacity);
        terms.oversell_allowance = changes.oversell_allowance.unwrap_or(terms.oversell_allowance);
        terms.starts_at = changes.starts_at.unwrap_or(terms.starts_at);
        let mut problems = terms.problems();
        let policy = changes.cancellation.unwrap_or(CancellationPolicy {
            until: event.cancel_paid_until,
            refund_percent: event.cancel_refund_percent,
        });
        if policy.refund_percent > 100 {
            problems.push("cancellation.refund_percent: must be 0 to 100".into());
        }
        // A reschedule moves the event to a date still ahead (every holder
        // is told of it).
        if changes.starts_at.is_some_and(|at| at != event.terms.starts_at && at <= Utc::now()) {
            problems.push("starts_at: a new date must be in the future".into());
        }
        Problem::unless_valid(problems, "the change is not valid")?;
        if terms.rules().sellable() < event.terms.rules().sellable() {
            self.resize(&event, &terms).await?;
        }
        record::change_event(&mut tx, id, &terms, &policy).await.map_err(mysql)?;
        tx.commit().await.map_err(mysql)?;
        self.sync_ledger(id).await
    }

    /// Pauses or resumes the sale, in the record and in the live ledger.
    /// A pause stops the ledger first (no sale after this returns), under
    /// the event's row lock, then records it; a resume records it, and
    /// [`Events::sync_ledger`] then lets the ledger sell. If a step fails the
    /// sale stays stopped and the same call again completes it. Pausing a
    /// paused sale (or resuming a running one) announces nothing.
    pub async fn set_paused(&self, id: u64, paused: bool) -> Result<Event, Problem> {
        let mysql = |e: sqlx::Error| Problem::unavailable("mysql", &e);
        let mut tx = self.db.begin().await.map_err(mysql)?;
        let event = record::lock_event(&mut tx, id).await.map_err(mysql)?.ok_or(ErrorCode::EventNotFound)?;
        refuse_if_cancelled(&event)?;
        if paused {
            self.pause_ledger(&event, true).await?;
        }
        record::set_paused(&mut tx, id, paused).await.map_err(mysql)?;
        tx.commit().await.map_err(mysql)?;
        self.sync_ledger(id).await
    }

    /// Cancels the event: its sale stops for good (the live ledger first,
    /// then the record, which announces `event.cancelled` once). Ending its
    /// orders is the caller's next step (see `routes::events::cancel`).
    pub async fn cancel(&self, id: u64) -> Result<Event, Problem> {
        let mysql = |e: sqlx::Error| Problem::unavailable("mysql", &e);
        let mut tx = self.db.begin().await.map_err(mysql)?;
        let event = record::lock_event(&mut tx, id).await.map_err(mysql)?.ok_or(ErrorCode::EventNotFound)?;
        if event.cancelled_at.is_none() {
            self.pause_ledger(&event, true).await?;
            record::cancel_event(&mut tx, id).await.map_err(mysql)?;
        }
        tx.commit().await.map_err(mysql)?;
        self.sync_ledger(id).await
    }

    /// Gives the live ledger what the record has now (its capacity and
    /// allowance, paused or not), under the event's row lock like every host change, so the
    /// ledger ends at the record's latest change whatever ran in between:
    /// another host's change, or a retry after a write to Redis failed. The
    /// event is then put in this ingress' snapshot and cache at once (the
    /// others re-read it within a refresh).
    async fn sync_ledger(&self, id: u64) -> Result<Event, Problem> {
        let mysql = |e: sqlx::Error| Problem::unavailable("mysql", &e);
        let mut tx = self.db.begin().await.map_err(mysql)?;
        let event = record::lock_event(&mut tx, id).await.map_err(mysql)?.ok_or(ErrorCode::EventNotFound)?;
        self.resize(&event, &event.terms).await?;
        self.pause_ledger(&event, event.rules().paused).await?;
        tx.commit().await.map_err(mysql)?;
        self.cache.invalidate(&id).await;
        let levels = self.levels(id).await.ok().flatten();
        self.catalog.insert(event.clone(), levels);
        Ok(event)
    }

    /// Pauses or resumes the live ledger. Without one (before the pre-warm,
    /// or lost by Redis) there is nothing to stop: the pre-warm or the
    /// rebuild reads the pause from the record.
    async fn pause_ledger(&self, event: &Event, paused: bool) -> Result<(), Problem> {
        match self.ledger.set_paused(event.id, paused).await {
            Ok(()) | Err(LedgerError::NoLedger(_)) => Ok(()),
            Err(e) => Err(Problem::unavailable("redis", &e)),
        }
    }

    /// The event as the record has it now, not as a snapshot had it.
    pub async fn fresh(&self, id: u64) -> Result<Option<Event>, sqlx::Error> {
        self.load(id).await
    }

    /// Gives the live ledger the capacity and allowance of `terms`. Before
    /// the pre-warm there is no
    /// ledger: the pre-warm reads the record. After the opening, a missing
    /// ledger is one Redis lost: nothing is known of the units handed out
    /// until it is rebuilt from the record, so the change waits for that.
    async fn resize(&self, event: &Event, terms: &EventTerms) -> Result<(), Problem> {
        match self.ledger.resize(event.id, &terms.rules()).await {
            Ok(Resized::To { .. }) => Ok(()),
            Ok(Resized::InUse { handed_out }) => Err(Problem::new(ErrorCode::CapacityInUse).detail(format!(
                "units 1 to {handed_out} have been handed out; the capacity and the oversell allowance together \
                 can be {handed_out} or more"
            ))),
            Err(LedgerError::NoLedger(_)) if Utc::now() < event.terms.sale_opens_at => Ok(()),
            Err(LedgerError::NoLedger(_)) => {
                let why = "a capacity change found no ledger after the opening";
                self.ledger.request_rebuild(event.id, why).await.map_err(|e| Problem::unavailable("redis", &e))?;
                Err(Problem::new(ErrorCode::DependencyUnavailable)
                    .detail("the sale's ledger is being rebuilt; retry the change shortly")
                    .retry_after(2))
            }
            Err(e) => Err(Problem::unavailable("redis", &e)),
        }
    }

    /// Loads the event's stock into Redis unless it is there already.
    pub async fn prewarm(&self, event: &Event) -> Result<bool, dropline::stock::LedgerError> {
        self.ledger.prewarm(event.id, &event.rules()).await
    }

    pub async fn levels(&self, id: u64) -> Result<Option<StockLevels>, dropline::stock::LedgerError> {
        self.ledger.levels(id).await
    }

    /// Units available, as of at most a quarter second ago.
    /// Concurrent callers share one read of the ledger.
    pub async fn recently_available(&self, id: u64) -> Option<u64> {
        let read = async { self.ledger.levels(id).await.ok().flatten().map(|l| l.available).ok_or(()) };
        self.available.try_get_with(id, read).await.ok()
    }
}

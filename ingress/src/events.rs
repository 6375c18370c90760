//! Events: the admin API's records in MySQL, read from the in-memory
//! snapshot ([`crate::snapshot`]) with a short-lived cache for what it does
//! not have yet, and the stock ledger's pre-warm.

use std::sync::Arc;
use std::time::Duration;

pub use dropline::events::{Event, EventTerms};
use dropline::stock::{Ledger, StockLevels};
use moka::future::Cache;
use sqlx::MySqlPool;

use crate::record;
pub use crate::record::SearchTimeout;
use crate::snapshot::Catalog;

/// How long the door trusts its last read of an event's stock.
pub const AVAILABLE_TTL: Duration = Duration::from_millis(250);

/// Events in MySQL, with a cache for the purchase path: events are read on
/// every purchase and change never once created.
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

    /// Loads the event's stock into Redis unless it is there already.
    pub async fn prewarm(&self, event: &Event) -> Result<bool, dropline::stock::LedgerError> {
        self.ledger.prewarm(event.id, &event.terms.rules()).await
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

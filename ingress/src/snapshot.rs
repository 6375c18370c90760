//! The read path: every event and its availability, in memory. Event
//! list, search, detail and availability are answered from it, with no
//! MySQL query and no Redis command per request; the purchase path and the
//! waiting rooms read their event from it too.
//!
//! One task per ingress refreshes it every `DROPLINE_SNAPSHOT_REFRESH_MS`:
//! the events created since the last refresh (events never change once
//! created), then the counters of every event whose sale has not been over
//! for an hour, in one pipelined round trip per 500 events. An event this
//! replica creates is in its snapshot at once; one created on another
//! replica within the refresh.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::Utc;
use dropline::events::{Event, COLUMNS};
use dropline::stock::{Ledger, StockLevels};
use sqlx::MySqlPool;
use tokio_util::sync::CancellationToken;

/// Events read from MySQL per query.
const PAGE: u32 = 5_000;
/// Counters read per pipelined round trip.
const LEVELS_PER_TRIP: usize = 500;
/// Refreshes between two reads of the whole events table.
const WHOLE_EVERY: u32 = 120;
/// How long after its sale closed an event's counters are still read.
const COUNTERS_AFTER_CLOSE: chrono::Duration = chrono::Duration::hours(1);

/// How far back each refresh re-reads the events a host changed: far more
/// than a refresh period, so a refresh that failed now and then misses
/// none (the whole table is read again every [`WHOLE_EVERY`] refreshes
/// anyway).
const CHANGES_WINDOW_SECS: u32 = 10;

/// An event as listed; a host's change replaces it.
struct Listed {
    event: Arc<Event>,
    /// Name and venue, lower-cased, for search.
    haystack: String,
}

/// The events and their counters as of one refresh.
#[derive(Default, Clone)]
struct Snapshot {
    events: BTreeMap<u64, Arc<Listed>>,
    levels: HashMap<u64, StockLevels>,
}

/// The snapshot and how it is refreshed.
pub struct Catalog {
    db: MySqlPool,
    ledger: Ledger,
    current: RwLock<Arc<Snapshot>>,
    /// Set once a refresh has read the whole events table.
    loaded: std::sync::atomic::AtomicBool,
    /// The highest id read from MySQL (not one a create inserted: an event
    /// created at once on another replica may have a lower one), and the
    /// refreshes since the table was last read whole.
    read_up_to: std::sync::Mutex<(u64, u32)>,
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("mysql: {0}")]
    Mysql(#[from] sqlx::Error),
    #[error("redis: {0}")]
    Redis(#[from] dropline::stock::LedgerError),
}

fn listed(event: Event) -> Arc<Listed> {
    let haystack = format!("{}\n{}", event.terms.name, event.terms.venue).to_lowercase();
    Arc::new(Listed { event: Arc::new(event), haystack })
}

impl Catalog {
    pub fn new(db: MySqlPool, ledger: Ledger) -> Self {
        Self { db, ledger, current: RwLock::default(), loaded: Default::default(), read_up_to: Default::default() }
    }

    fn now(&self) -> Arc<Snapshot> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether a refresh has read every event yet.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(std::sync::atomic::Ordering::Acquire)
    }

    /// An event and its counters as of the last refresh.
    pub fn get(&self, id: u64) -> Option<(Arc<Event>, Option<StockLevels>)> {
        let snapshot = self.now();
        snapshot.events.get(&id).map(|e| (e.event.clone(), snapshot.levels.get(&id).copied()))
    }

    /// Events whose name or venue contains `q` (case aside), by id, after
    /// `after`; at most `limit`.
    pub fn search(&self, q: Option<&str>, after: u64, limit: u32) -> Vec<Arc<Event>> {
        let q = q.map(str::to_lowercase);
        let snapshot = self.now();
        snapshot
            .events
            .range(after.saturating_add(1)..)
            .filter(|(_, e)| q.as_deref().is_none_or(|q| e.haystack.contains(q)))
            .take(limit as usize)
            .map(|(_, e)| e.event.clone())
            .collect()
    }

    /// Puts an event this replica just created in the snapshot.
    pub fn insert(&self, event: Event, levels: Option<StockLevels>) {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        let mut next = Snapshot::clone(&current);
        if let Some(levels) = levels {
            next.levels.insert(event.id, levels);
        }
        next.events.insert(event.id, listed(event));
        *current = Arc::new(next);
    }

    /// Reads the events created since the last refresh, those a host
    /// changed lately, and the counters of those on sale (or recently).
    pub async fn refresh(&self) -> Result<(), CatalogError> {
        let before = self.now();
        let mut added = Vec::new();
        // Ids are handed out before their rows commit, so one can appear
        // below the highest read: the whole table is read again now and
        // then (search may miss such an event until then; a read of it by
        // id goes to MySQL while the snapshot lacks it).
        let (mut after, since_whole) = *self.read_up_to.lock().unwrap_or_else(|e| e.into_inner());
        let whole = since_whole >= WHOLE_EVERY;
        if whole {
            after = 0;
        }
        loop {
            let page: Vec<Event> =
                sqlx::query_as(&format!("SELECT {COLUMNS} FROM events WHERE id > ? ORDER BY id LIMIT ?"))
                    .bind(after)
                    .bind(PAGE)
                    .fetch_all(&self.db)
                    .await?;
            let full = page.len() == PAGE as usize;
            after = page.last().map_or(after, |e| e.id);
            added.extend(page);
            if !full {
                break;
            }
        }
        // The events a host changed lately, by the database's clock.
        let changed: Vec<Event> = sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM events WHERE changed_at >= UTC_TIMESTAMP(3) - INTERVAL {CHANGES_WINDOW_SECS} SECOND"
        ))
        .fetch_all(&self.db)
        .await?;
        added.extend(changed);
        {
            let mut read_up_to = self.read_up_to.lock().unwrap_or_else(|e| e.into_inner());
            read_up_to.0 = read_up_to.0.max(after);
            read_up_to.1 = if whole { 0 } else { since_whole + 1 };
        }
        let horizon = Utc::now() - COUNTERS_AFTER_CLOSE;
        let mut read: Vec<u64> =
            before.events.values().filter(|e| e.event.terms.sale_closes_at > horizon).map(|e| e.event.id).collect();
        // Every new event once, whenever its sale was.
        read.extend(added.iter().map(|e| e.id).filter(|id| !before.events.contains_key(id)));
        let mut levels = Vec::with_capacity(read.len());
        for ids in read.chunks(LEVELS_PER_TRIP) {
            levels.extend(ids.iter().copied().zip(self.ledger.levels_of(ids).await?));
        }
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        // From the snapshot as it is now: an event a create inserted while
        // this refresh ran stays.
        let mut next = Snapshot::clone(&current);
        for event in added {
            next.events.insert(event.id, listed(event));
        }
        for (id, l) in levels {
            match l {
                Some(l) => next.levels.insert(id, l),
                None => next.levels.remove(&id),
            };
        }
        *current = Arc::new(next);
        drop(current);
        self.loaded.store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Refreshes every `every` until shutdown.
    pub async fn keep(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        dropline::shutdown::every(every, &shutdown, || async {
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %e, "event snapshot not refreshed; answering from the last one");
            }
        })
        .await;
    }
}

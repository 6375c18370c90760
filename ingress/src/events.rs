//! Events: the admin API's records in MySQL, a short-lived in-process cache
//! in front of them for the purchase path, and the stock ledger's pre-warm.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
pub use dropline::events::Event;
use dropline::stock::{Ledger, StockLevels};
use moka::future::Cache;
use serde::Deserialize;
use sqlx::MySqlPool;

/// An admin's request to create an event.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewEvent {
    pub name: String,
    pub venue: String,
    pub starts_at: DateTime<Utc>,
    pub sale_opens_at: DateTime<Utc>,
    pub sale_closes_at: DateTime<Utc>,
    pub capacity: u32,
    pub price_cents: u64,
    pub currency: String,
    pub per_user_limit: u32,
    pub hold_ttl_secs: u32,
}

pub const MAX_CAPACITY: u32 = 10_000_000;
pub const MAX_PER_USER_LIMIT: u32 = 100;
pub const MAX_HOLD_TTL_SECS: u32 = 24 * 3600;

impl NewEvent {
    /// Every reason the event cannot be created, empty when it can.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        for (field, value) in [("name", &self.name), ("venue", &self.venue)] {
            let len = value.trim().chars().count();
            if len == 0 || len > 200 {
                p.push(format!("{field}: must be 1 to 200 characters"));
            }
        }
        if self.sale_closes_at <= self.sale_opens_at {
            p.push("sale_closes_at: must be after sale_opens_at".into());
        }
        if self.capacity == 0 || self.capacity > MAX_CAPACITY {
            p.push(format!("capacity: must be 1 to {MAX_CAPACITY}"));
        }
        if self.currency.len() != 3 || !self.currency.bytes().all(|b| b.is_ascii_uppercase()) {
            p.push("currency: must be a three-letter ISO 4217 code such as EUR".into());
        }
        if self.per_user_limit == 0 || self.per_user_limit > MAX_PER_USER_LIMIT {
            p.push(format!("per_user_limit: must be 1 to {MAX_PER_USER_LIMIT}"));
        }
        if self.hold_ttl_secs == 0 || self.hold_ttl_secs > MAX_HOLD_TTL_SECS {
            p.push(format!("hold_ttl_secs: must be 1 to {MAX_HOLD_TTL_SECS}"));
        }
        if self.price_cents > 1_000_000_000 {
            p.push("price_cents: must be at most 1000000000".into());
        }
        p
    }
}

/// Events in MySQL, with a cache for the purchase path: events are read on
/// every purchase and change never once created.
/// How a search query is bounded on the server, which MySQL and MariaDB
/// spell differently: each ignores (MariaDB) or refuses (MySQL) the other's
/// form, so the server is asked once at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchTimeout {
    /// `SET STATEMENT max_statement_time=<secs> FOR SELECT ...`
    MariaDb {
        ms: u64,
    },
    /// `SELECT /*+ MAX_EXECUTION_TIME(<ms>) */ ...`
    MySql {
        ms: u64,
    },
    None,
}

impl SearchTimeout {
    pub async fn detect(db: &MySqlPool, ms: u64) -> Result<Self, sqlx::Error> {
        let (version,): (String,) = sqlx::query_as("SELECT VERSION()").fetch_one(db).await?;
        Ok(if version.to_ascii_lowercase().contains("mariadb") {
            SearchTimeout::MariaDb { ms }
        } else {
            SearchTimeout::MySql { ms }
        })
    }

    /// `select_rest` is the statement after its `SELECT`.
    fn bound(self, select_rest: &str) -> String {
        match self {
            SearchTimeout::MariaDb { ms } => {
                format!("SET STATEMENT max_statement_time={}.{:03} FOR SELECT {select_rest}", ms / 1000, ms % 1000)
            }
            SearchTimeout::MySql { ms } => format!("SELECT /*+ MAX_EXECUTION_TIME({ms}) */ {select_rest}"),
            SearchTimeout::None => format!("SELECT {select_rest}"),
        }
    }
}

#[derive(Clone)]
pub struct Events {
    db: MySqlPool,
    ledger: Ledger,
    search_timeout: SearchTimeout,
    cache: Cache<u64, Option<Arc<Event>>>,
    available: Cache<u64, u64>,
}

impl Events {
    pub fn new(db: MySqlPool, ledger: Ledger, ttl: Duration) -> Self {
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
            available: Cache::builder().max_capacity(10_000).time_to_live(Duration::from_millis(250)).build(),
        }
    }

    /// Searches bounded on the server as `timeout` says: a slow `LIKE`
    /// cannot hold a pooled connection for longer.
    pub fn with_search_timeout(mut self, timeout: SearchTimeout) -> Self {
        self.search_timeout = timeout;
        self
    }

    pub async fn create(&self, new: &NewEvent) -> Result<Event, sqlx::Error> {
        let id = sqlx::query(
            "INSERT INTO events (name, venue, starts_at, sale_opens_at, sale_closes_at, capacity, price_cents, \
             currency, per_user_limit, hold_ttl_secs) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(new.name.trim())
        .bind(new.venue.trim())
        .bind(new.starts_at)
        .bind(new.sale_opens_at)
        .bind(new.sale_closes_at)
        .bind(new.capacity)
        .bind(new.price_cents)
        .bind(&new.currency)
        .bind(new.per_user_limit)
        .bind(new.hold_ttl_secs)
        .execute(&self.db)
        .await?
        .last_insert_id();
        self.load(id).await?.ok_or(sqlx::Error::RowNotFound)
    }

    async fn load(&self, id: u64) -> Result<Option<Event>, sqlx::Error> {
        Event::load(&self.db, id).await
    }

    /// An event, from the cache when it is fresh.
    pub async fn get(&self, id: u64) -> Result<Option<Arc<Event>>, Arc<sqlx::Error>> {
        self.cache.try_get_with(id, async { Ok(self.load(id).await?.map(Arc::new)) }).await
    }

    /// Events whose name or venue contains `q`, by id, after `after`.
    pub async fn search(&self, q: Option<&str>, after: u64, limit: u32) -> Result<Vec<Event>, sqlx::Error> {
        let pattern = q.map(|q| format!("%{}%", q.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")));
        let sql = self.search_timeout.bound(&format!(
            "{} FROM events WHERE id > ? AND (? IS NULL OR name LIKE ? OR venue LIKE ?) ORDER BY id LIMIT ?",
            dropline::events::COLUMNS
        ));
        sqlx::query_as::<_, Event>(&sql)
            .bind(after)
            .bind(&pattern)
            .bind(&pattern)
            .bind(&pattern)
            .bind(limit)
            .fetch_all(&self.db)
            .await
    }

    /// Loads the event's stock into Redis unless it is there already.
    pub async fn prewarm(&self, event: &Event) -> Result<bool, dropline::stock::LedgerError> {
        self.ledger.prewarm(event.id, &event.rules()).await
    }

    pub async fn levels(&self, id: u64) -> Result<Option<StockLevels>, dropline::stock::LedgerError> {
        self.ledger.levels(id).await
    }

    /// Units available, as of at most a quarter second ago.
    pub async fn recently_available(&self, id: u64) -> Option<u64> {
        if let Some(n) = self.available.get(&id).await {
            return Some(n);
        }
        let levels = self.ledger.levels(id).await.ok()??;
        self.available.insert(id, levels.available).await;
        Some(levels.available)
    }
}

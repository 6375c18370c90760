//! Events as the record keeps them, as an admin creates them, and the sale
//! rules the stock ledger is loaded with. Shared by the ingress (which
//! creates and serves events) and the settler (which rebuilds a lost ledger
//! from the record).

use chrono::{DateTime, Datelike, Utc};
use serde::{Deserialize, Serialize};
use sqlx::MySqlPool;

use crate::stock::SaleRules;

/// How long Redis keeps a ledger after the sale closed and the last hold
/// ended; MySQL is the record afterwards.
const LEDGER_RETENTION_MS: i64 = 7 * 24 * 3600 * 1000;

pub const COLUMNS: &str = "id, name, venue, starts_at, sale_opens_at, sale_closes_at, capacity, \
                           oversell_allowance, price_cents, currency, per_user_limit, hold_ttl_secs, created_at, \
                           paused_at, cancel_paid_until, cancel_refund_percent, cancelled_at, opened_at, sold_out_at";

/// A sale event as the record keeps it: the terms an admin set, with the
/// id and creation time the record gave it. Its JSON is flat, as the API
/// has always served it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Event {
    pub id: u64,
    #[serde(flatten)]
    #[sqlx(flatten)]
    pub terms: EventTerms,
    pub created_at: DateTime<Utc>,
    /// Since when its host has paused the sale; none while it runs.
    pub paused_at: Option<DateTime<Utc>>,
    /// Until when a buyer may cancel a paid order (none: never)...
    pub cancel_paid_until: Option<DateTime<Utc>>,
    /// ...and the share of its price refunded then, in percent.
    pub cancel_refund_percent: u8,
    /// When its host cancelled the event: its sale stopped for good.
    pub cancelled_at: Option<DateTime<Utc>>,
    /// When its sale opened, once a settler saw it open.
    pub opened_at: Option<DateTime<Utc>>,
    /// Since when every unit it may sell (capacity plus allowance) is paid
    /// for; none while some are not.
    pub sold_out_at: Option<DateTime<Utc>>,
}

impl Event {
    /// The cents refunded of a paid order of `amount_cents` its buyer
    /// cancels at `now`, or `None` when the policy does not allow it then.
    /// A cancelled event refunds all of it, whatever the policy.
    pub fn refund_on_cancel(&self, amount_cents: u64, now: DateTime<Utc>) -> Option<u64> {
        if self.cancelled_at.is_some() {
            return Some(amount_cents);
        }
        let until = self.cancel_paid_until?;
        (now < until).then(|| amount_cents * u64::from(self.cancel_refund_percent.min(100)) / 100)
    }

    /// The rules the stock ledger enforces for this event: a cancelled
    /// event's sale is paused for good.
    pub fn rules(&self) -> SaleRules {
        SaleRules { paused: self.paused_at.is_some() || self.cancelled_at.is_some(), ..self.terms.rules() }
    }

    pub async fn load(db: &MySqlPool, id: u64) -> Result<Option<Event>, sqlx::Error> {
        sqlx::query_as::<_, Event>(&format!("SELECT {COLUMNS} FROM events WHERE id = ?"))
            .bind(id)
            .fetch_optional(db)
            .await
    }

    /// The event once any host's change of it under way has committed or
    /// rolled back (a shared lock waits for its row lock). A ledger rebuild
    /// reads the event this way after fencing the ledger: a change that
    /// wrote the ledger before the fence has its record committed by then,
    /// and one that comes after it is refused by the fence.
    pub async fn load_settled(db: &MySqlPool, id: u64) -> Result<Option<Event>, sqlx::Error> {
        sqlx::query_as::<_, Event>(&format!("SELECT {COLUMNS} FROM events WHERE id = ? LOCK IN SHARE MODE"))
            .bind(id)
            .fetch_optional(db)
            .await
    }
}

/// The terms of a sale event: what it sells, when, at what price and how
/// many per buyer. An admin's request to create an event is these terms,
/// untrusted until [`EventTerms::problems`] finds nothing wrong (strict:
/// an unknown field is refused).
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
#[serde(deny_unknown_fields)]
pub struct EventTerms {
    pub name: String,
    pub venue: String,
    pub starts_at: DateTime<Utc>,
    pub sale_opens_at: DateTime<Utc>,
    pub sale_closes_at: DateTime<Utc>,
    pub capacity: u32,
    /// Units the host accepts to sell beyond the capacity (design note 002:
    /// overbooking against no-shows); none unless given.
    #[serde(default)]
    pub oversell_allowance: u32,
    pub price_cents: u64,
    pub currency: String,
    pub per_user_limit: u32,
    pub hold_ttl_secs: u32,
}

pub const MAX_CAPACITY: u32 = 10_000_000;
pub const MAX_PER_USER_LIMIT: u32 = 100;
pub const MAX_HOLD_TTL_SECS: u32 = 24 * 3600;

impl EventTerms {
    /// The rules the stock ledger enforces for this event.
    pub fn rules(&self) -> SaleRules {
        let closes = self.sale_closes_at.timestamp_millis();
        SaleRules {
            capacity: self.capacity,
            oversell_allowance: self.oversell_allowance,
            per_user_limit: self.per_user_limit,
            hold_ttl_ms: u64::from(self.hold_ttl_secs) * 1000,
            opens_at_ms: self.sale_opens_at.timestamp_millis(),
            closes_at_ms: closes,
            price_cents: self.price_cents,
            retain_until_ms: closes + i64::from(self.hold_ttl_secs) * 1000 + LEDGER_RETENTION_MS,
            paused: false,
        }
    }

    /// Every reason the event cannot be created, empty when it can.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        for (field, value) in [("name", &self.name), ("venue", &self.venue)] {
            let len = value.trim().chars().count();
            if len == 0 || len > 200 {
                p.push(format!("{field}: must be 1 to 200 characters"));
            }
        }
        // MySQL keeps DATETIME from year 1000 to 9999 (MariaDB stores a
        // date past them as zeros, which then reads back as an error); a
        // sale before 2000 is a typo either way.
        for (field, at) in [
            ("starts_at", self.starts_at),
            ("sale_opens_at", self.sale_opens_at),
            ("sale_closes_at", self.sale_closes_at),
        ] {
            if !(2000..=9998).contains(&at.year()) {
                p.push(format!("{field}: must be in the years 2000 to 9998"));
            }
        }
        if self.sale_closes_at <= self.sale_opens_at {
            p.push("sale_closes_at: must be after sale_opens_at".into());
        }
        if self.capacity == 0 || self.capacity > MAX_CAPACITY {
            p.push(format!("capacity: must be 1 to {MAX_CAPACITY}"));
        }
        if self.oversell_allowance > self.capacity
            || u64::from(self.capacity) + u64::from(self.oversell_allowance) > u64::from(MAX_CAPACITY)
        {
            p.push(format!("oversell_allowance: must be at most the capacity, and with it at most {MAX_CAPACITY}"));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn event(starts_at: &str) -> EventTerms {
        EventTerms {
            name: "n".into(),
            venue: "v".into(),
            starts_at: starts_at.parse().unwrap(),
            sale_opens_at: "2026-01-01T00:00:00Z".parse().unwrap(),
            sale_closes_at: "2026-01-02T00:00:00Z".parse().unwrap(),
            capacity: 1,
            oversell_allowance: 0,
            price_cents: 1,
            currency: "EUR".into(),
            per_user_limit: 1,
            hold_ttl_secs: 1,
        }
    }

    #[test]
    fn dates_the_record_cannot_keep_are_refused() {
        assert!(event("2026-03-01T20:00:00Z").problems().is_empty());
        for bad in ["+10000-01-01T00:00:00Z", "0001-01-01T00:00:00Z", "1999-12-31T23:59:59Z"] {
            assert_eq!(event(bad).problems(), ["starts_at: must be in the years 2000 to 9998"], "{bad}");
        }
    }
}

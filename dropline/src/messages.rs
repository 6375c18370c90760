//! The contract between the stages: topic names and what travels on them.
//!
//! | topic          | key      | producer           | consumers        |
//! |----------------|----------|--------------------|------------------|
//! | `intents`      | event id | ingress            | allocator        |
//! | `decisions`    | event id | allocator          | settler          |
//! | `hold-expiry`  | event id | allocator          | expirer          |
//! | `order-events` | order id | ingress, expirer   | settler          |
//! | `dead-letter`  | original | every consumer     | operators        |
//!
//! Messages are JSON, so a dead letter can be read with any Kafka tool.
//! Every message carries the ids that make its effect idempotent downstream.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The topics of one Dropline deployment. A prefix lets several deployments
/// (or parallel tests) share a broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    pub intents: String,
    pub decisions: String,
    pub hold_expiry: String,
    pub order_events: String,
    pub dead_letter: String,
}

impl Topics {
    pub fn with_prefix(prefix: &str) -> Self {
        Self {
            intents: format!("{prefix}.intents"),
            decisions: format!("{prefix}.decisions"),
            hold_expiry: format!("{prefix}.hold-expiry"),
            order_events: format!("{prefix}.order-events"),
            dead_letter: format!("{prefix}.dead-letter"),
        }
    }

    pub fn all(&self) -> [&str; 5] {
        [&self.intents, &self.decisions, &self.hold_expiry, &self.order_events, &self.dead_letter]
    }
}

/// A buyer's request to buy, accepted by the ingress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurchaseIntent {
    /// Derived from the user and their Idempotency-Key, so a retried request
    /// produces the same intent and downstream dedup catches it.
    pub intent_id: Uuid,
    pub event_id: u64,
    pub user_id: String,
    pub quantity: u32,
    pub accepted_at_ms: i64,
}

/// Why an intent got no hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    SoldOut,
    LimitReached,
    SaleNotOpen,
    SaleClosed,
}

impl RejectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::SoldOut => "sold_out",
            RejectReason::LimitReached => "limit_reached",
            RejectReason::SaleNotOpen => "sale_not_open",
            RejectReason::SaleClosed => "sale_closed",
        }
    }
}

/// The allocator's decision on one intent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub intent_id: Uuid,
    pub event_id: u64,
    pub user_id: String,
    pub quantity: u32,
    pub decided_at_ms: i64,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Outcome {
    /// A hold was created; its order id is the intent id. `units` are the
    /// unit numbers (1 to capacity) the ledger handed out for it: MySQL
    /// refuses a unit that a live order already has.
    Held {
        expires_at_ms: i64,
        amount_cents: u64,
        #[serde(default)]
        units: Vec<u32>,
    },
    Rejected {
        reason: RejectReason,
    },
}

/// A delayed message: release this hold at `expires_at_ms` unless it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldExpiry {
    pub order_id: Uuid,
    pub event_id: u64,
    pub expires_at_ms: i64,
}

/// The lifecycle state of an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderState {
    Held,
    Paid,
    Cancelled,
    Expired,
    /// The record refused the hold: one of its units, or the buyer's limit,
    /// was already taken by a live order (Redis had lost writes when it
    /// decided). Any payment for it is refunded.
    Voided,
}

impl OrderState {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderState::Held => "held",
            OrderState::Paid => "paid",
            OrderState::Cancelled => "cancelled",
            OrderState::Expired => "expired",
            OrderState::Voided => "voided",
        }
    }

    pub fn is_final(self) -> bool {
        !matches!(self, OrderState::Held)
    }

    /// Holds or owns stock: held or paid.
    pub fn is_live(self) -> bool {
        matches!(self, OrderState::Held | OrderState::Paid)
    }
}

/// An order reached a state. The settler applies these idempotently and
/// never moves an order backwards, so duplicates and reordering are harmless.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderEvent {
    pub order_id: Uuid,
    pub event_id: u64,
    pub user_id: String,
    pub quantity: u32,
    pub amount_cents: u64,
    pub state: OrderState,
    pub expires_at_ms: i64,
    pub at_ms: i64,
    /// Set when a payment came with this event: the one that paid the order,
    /// or one that must be refunded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment: Option<PaymentRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRecord {
    /// The provider's webhook event id. A provider may deliver one payment
    /// under several, so it identifies the delivery, not the payment.
    pub provider_event_id: String,
    /// The provider's payment id: the key of the payment's one row.
    pub payment_id: String,
    pub amount_cents: u64,
    pub disposition: PaymentDisposition,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentDisposition {
    /// The payment paid the order.
    Captured,
    /// The order had already ended; the money goes back to the buyer.
    RefundRequired,
}

impl PaymentDisposition {
    pub fn as_str(self) -> &'static str {
        match self {
            PaymentDisposition::Captured => "captured",
            PaymentDisposition::RefundRequired => "refund_required",
        }
    }
}

/// The current time as Unix milliseconds.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_round_trip_with_tagged_outcomes() {
        let d = Decision {
            intent_id: Uuid::nil(),
            event_id: 7,
            user_id: "u1".into(),
            quantity: 2,
            decided_at_ms: 1,
            outcome: Outcome::Rejected { reason: RejectReason::SoldOut },
        };
        let json = serde_json::to_string(&d).unwrap();
        assert!(json.contains(r#""outcome":{"type":"rejected","reason":"sold_out"}"#), "{json}");
        assert_eq!(serde_json::from_str::<Decision>(&json).unwrap(), d);
    }

    #[test]
    fn topics_share_the_prefix() {
        let t = Topics::with_prefix("t1");
        assert_eq!(t.intents, "t1.intents");
        assert!(t.all().iter().all(|n| n.starts_with("t1.")));
    }
}

//! The contract between the stages: topic names and what travels on them.
//!
//! | topic          | key      | producer           | consumers        |
//! |----------------|----------|--------------------|------------------|
//! | `intents`      | event id | ingress            | allocator        |
//! | `decisions`    | event id | allocator          | settler          |
//! | `hold-expiry`  | event id | allocator          | expirer          |
//! | `order-events` | order id | ingress, expirer   | settler          |
//! | `changes`      | order id | settler (outbox)   | notifier         |
//! | `dead-letter`  | original | every consumer     | operators        |
//!
//! `order-events` carries what the other stages ask of the record (a hold
//! paid, cancelled, expired); `changes` carries what the record then did,
//! each change once, as its outbox has it ([`Change`]).
//!
//! Messages are JSON, so a dead letter can be read with any Kafka tool.
//! Every message carries the ids that make its effect idempotent downstream.
//! The enums the record keeps in columns (order state, payment disposition,
//! reject reason, outcome) are stored there under the same names.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// `as_str` and `FromStr` for an enum that travels and is stored by name
/// (its serde name, as the tests check), and its MySQL column type: an
/// `ENUM` or text column, written with `as_str` and read with `FromStr`.
/// (sqlx's derive wants a column's flags to be exactly `ENUM`, which a
/// `NOT NULL` column's are not.)
macro_rules! named {
    ($ty:ident { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            #[cfg(test)]
            const ALL: &'static [$ty] = &[$($ty::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }
        }

        impl std::str::FromStr for $ty {
            type Err = $crate::messages::UnknownName;

            fn from_str(name: &str) -> Result<Self, $crate::messages::UnknownName> {
                match name {
                    $($name => Ok($ty::$variant),)+
                    _ => Err($crate::messages::UnknownName { of: stringify!($ty), name: name.to_owned() }),
                }
            }
        }

        impl sqlx::Type<sqlx::MySql> for $ty {
            fn type_info() -> sqlx::mysql::MySqlTypeInfo {
                <str as sqlx::Type<sqlx::MySql>>::type_info()
            }

            fn compatible(ty: &sqlx::mysql::MySqlTypeInfo) -> bool {
                <str as sqlx::Type<sqlx::MySql>>::compatible(ty)
            }
        }

        impl<'q> sqlx::Encode<'q, sqlx::MySql> for $ty {
            fn encode_by_ref(&self, buf: &mut Vec<u8>) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                <&str as sqlx::Encode<sqlx::MySql>>::encode_by_ref(&self.as_str(), buf)
            }
        }

        impl<'r> sqlx::Decode<'r, sqlx::MySql> for $ty {
            fn decode(value: sqlx::mysql::MySqlValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
                Ok(<&str as sqlx::Decode<sqlx::MySql>>::decode(value)?.parse::<$ty>()?)
            }
        }
    };
}

pub(crate) use named;

/// A name no variant of the enum `of` has.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no {of} is called {name:?}")]
pub struct UnknownName {
    pub of: &'static str,
    pub name: String,
}

/// The topics of one Dropline deployment. A prefix lets several deployments
/// (or parallel tests) share a broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    pub intents: String,
    pub decisions: String,
    pub hold_expiry: String,
    pub order_changes: String,
    /// The record's changes, from its outbox, for the notifier.
    pub changes: String,
    pub dead_letter: String,
}

impl Topics {
    pub fn with_prefix(prefix: &str) -> Self {
        Self {
            intents: format!("{prefix}.intents"),
            decisions: format!("{prefix}.decisions"),
            hold_expiry: format!("{prefix}.hold-expiry"),
            order_changes: format!("{prefix}.order-events"),
            changes: format!("{prefix}.changes"),
            dead_letter: format!("{prefix}.dead-letter"),
        }
    }

    pub fn all(&self) -> [&str; 6] {
        [&self.intents, &self.decisions, &self.hold_expiry, &self.order_changes, &self.changes, &self.dead_letter]
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
    /// The host paused the sale.
    SalePaused,
}

named!(RejectReason {
    SoldOut => "sold_out",
    LimitReached => "limit_reached",
    SaleNotOpen => "sale_not_open",
    SaleClosed => "sale_closed",
    SalePaused => "sale_paused",
});

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

impl Outcome {
    pub fn kind(&self) -> OutcomeKind {
        match self {
            Outcome::Held { .. } => OutcomeKind::Held,
            Outcome::Rejected { .. } => OutcomeKind::Rejected,
        }
    }
}

/// An intent's outcome without its details, as the record's `intents`
/// table keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeKind {
    Held,
    Rejected,
}

named!(OutcomeKind {
    Held => "held",
    Rejected => "rejected",
});

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

named!(OrderState {
    Held => "held",
    Paid => "paid",
    Cancelled => "cancelled",
    Expired => "expired",
    Voided => "voided",
});

impl OrderState {
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
pub struct OrderChange {
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
    /// When the buyer started paying, once they have: the hold's deadline
    /// was extended then, once (`expires_at_ms` is the extended one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_started_at_ms: Option<i64>,
    /// Set when the provider declined an attempt to pay: the hold runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_failure: Option<PaymentFailure>,
    /// A paid order cancelled within the event's policy: the cents of its
    /// payment to refund.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refund_cents: Option<u64>,
}

/// An attempt to pay that the provider declined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentFailure {
    /// The provider's webhook event id: one per declined attempt, the same
    /// on every redelivery of it.
    pub provider_event_id: String,
    pub payment_id: String,
    /// The provider's reason, as it gave it (`card_declined`).
    pub reason: String,
}

/// A step of paying that is not the payment itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentStep {
    /// The buyer started paying; the hold was extended once.
    Started,
    /// The provider declined an attempt; the hold runs on until its
    /// deadline, for the buyer to try again.
    Failed,
}

/// What happened to an event: its host's changes, and its sale's
/// milestones as the record sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventChange {
    /// Its sale opened.
    Opened,
    /// Stock added mid-sale, or never-sold stock taken back (the capacity
    /// or the oversell allowance).
    CapacityChanged,
    /// The event moved to another date.
    Rescheduled,
    /// The host paused the sale, or resumed it.
    Paused,
    Resumed,
    /// The cancellation and refund policy changed.
    PolicyChanged,
    /// The host cancelled the event: its holds are released and its paid
    /// orders refunded (each order's own changes say so).
    Cancelled,
    /// Every unit it may sell (capacity and allowance) is paid for...
    SoldOut,
    /// ...and then no longer: a paid order cancelled, or more stock.
    BackOnSale,
}

named!(EventChange {
    Opened => "opened",
    CapacityChanged => "capacity_changed",
    Rescheduled => "rescheduled",
    Paused => "paused",
    Resumed => "resumed",
    PolicyChanged => "policy_changed",
    Cancelled => "cancelled",
    SoldOut => "sold_out",
    BackOnSale => "back_on_sale",
});

named!(PaymentStep {
    Started => "started",
    Failed => "failed",
});

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

named!(PaymentDisposition {
    Captured => "captured",
    RefundRequired => "refund_required",
});

/// Where a refund stands. Its changes are `requested` and `refunded`; a
/// provider call that failed leaves it `failed` until the retry that works,
/// and a refusal for good leaves it `rejected`, for an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefundState {
    Requested,
    Refunded,
    Failed,
    Rejected,
}

named!(RefundState {
    Requested => "requested",
    Refunded => "refunded",
    Failed => "failed",
    Rejected => "rejected",
});

/// One change the record made, as its outbox wrote it (in the same
/// transaction), published once per change on `changes`. `change_id` is
/// what a receiver deduplicates on: a change published again (the relay
/// crashed between the broker's ack and marking it) keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub change_id: Uuid,
    /// The outbox's sequence number: the order changes were written in.
    pub seq: u64,
    pub event_id: u64,
    pub changed_at_ms: i64,
    #[serde(flatten)]
    pub subject: ChangeSubject,
}

/// What changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "subject", rename_all = "snake_case")]
pub enum ChangeSubject {
    /// An order reached a state.
    Order { order_id: Uuid, user_id: String, quantity: u32, amount_cents: u64, expires_at_ms: i64, state: OrderState },
    /// A payment of an order is being refunded (`requested`), or its money
    /// is back with the buyer (`refunded`).
    Refund {
        order_id: Uuid,
        user_id: String,
        refund_id: Uuid,
        payment_id: String,
        amount_cents: u64,
        #[serde(rename = "refund_state")]
        state: RefundState,
    },
    /// Something happened to the event. The change itself concerns no
    /// order in particular; a reschedule and a cancel are also told to each
    /// ticket holder, as a change of the event with their order (`holder`).
    Event {
        #[serde(rename = "event_change")]
        change: EventChange,
        /// The event as the change left it.
        capacity: u32,
        /// (None in a change written before allowances.)
        #[serde(default)]
        oversell_allowance: u32,
        starts_at_ms: i64,
        /// The ticket holder it is told to, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        holder: Option<Holder>,
    },
    /// The buyer started paying for an order, or an attempt was declined.
    Payment {
        order_id: Uuid,
        user_id: String,
        amount_cents: u64,
        /// The hold's deadline as the step left it.
        expires_at_ms: i64,
        #[serde(rename = "payment_step")]
        step: PaymentStep,
        /// The provider's payment (known for a failure).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        payment_id: Option<String>,
        /// Why the provider declined it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
}

/// A ticket holder told of a change of their event: their live order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub order_id: Uuid,
    pub user_id: String,
}

impl Change {
    /// The key it is published under: changes of one order (a holder's
    /// changes of the event included) stay in order, and so do those of one
    /// event.
    pub fn key(&self) -> String {
        match self.order_id() {
            Some(order_id) => order_id.to_string(),
            None => format!("event-{}", self.event_id),
        }
    }

    /// The order it concerns; none for a change of the event.
    pub fn order_id(&self) -> Option<Uuid> {
        match &self.subject {
            ChangeSubject::Order { order_id, .. }
            | ChangeSubject::Refund { order_id, .. }
            | ChangeSubject::Payment { order_id, .. } => Some(*order_id),
            ChangeSubject::Event { holder, .. } => holder.as_ref().map(|h| h.order_id),
        }
    }

    /// The buyer it concerns; none for a change of the event that is not
    /// told to a holder.
    pub fn user_id(&self) -> Option<&str> {
        match &self.subject {
            ChangeSubject::Order { user_id, .. }
            | ChangeSubject::Refund { user_id, .. }
            | ChangeSubject::Payment { user_id, .. } => Some(user_id),
            ChangeSubject::Event { holder, .. } => holder.as_ref().map(|h| h.user_id.as_str()),
        }
    }

    /// Its name in a webhook: `order.paid`, `order.refunded`.
    pub fn kind(&self) -> String {
        match &self.subject {
            ChangeSubject::Order { state, .. } => format!("order.{}", state.as_str()),
            ChangeSubject::Refund { state: RefundState::Refunded, .. } => "order.refunded".to_owned(),
            ChangeSubject::Refund { state, .. } => format!("order.refund_{}", state.as_str()),
            ChangeSubject::Payment { step, .. } => format!("order.payment_{}", step.as_str()),
            ChangeSubject::Event { change, .. } => format!("event.{}", change.as_str()),
        }
    }
}

/// The kind of the notifier's reminder webhook: a hold still held shortly
/// before its deadline. Reminders are notifications of no change.
pub const REMINDER_KIND: &str = "order.hold_expiring";

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
    fn names_are_the_serde_names_and_read_back() {
        fn check<T>(all: &[T], name: fn(&T) -> &'static str)
        where
            T: Serialize + std::str::FromStr<Err = UnknownName> + PartialEq + std::fmt::Debug,
        {
            for v in all {
                assert_eq!(serde_json::to_value(v).unwrap(), name(v), "{v:?}");
                assert_eq!(&name(v).parse::<T>().unwrap(), v);
            }
            assert!("nonsense".parse::<T>().is_err());
        }
        check(RejectReason::ALL, |v| v.as_str());
        check(OutcomeKind::ALL, |v| v.as_str());
        check(OrderState::ALL, |v| v.as_str());
        check(PaymentDisposition::ALL, |v| v.as_str());
        check(RefundState::ALL, |v| v.as_str());
        check(PaymentStep::ALL, |v| v.as_str());
        check(EventChange::ALL, |v| v.as_str());
    }

    #[test]
    fn changes_travel_flat_with_their_subject_named() {
        let change = Change {
            change_id: Uuid::nil(),
            seq: 3,
            event_id: 7,
            changed_at_ms: 1,
            subject: ChangeSubject::Order {
                order_id: Uuid::nil(),
                user_id: "u1".into(),
                quantity: 1,
                amount_cents: 1000,
                expires_at_ms: 2,
                state: OrderState::Paid,
            },
        };
        let json = serde_json::to_value(&change).unwrap();
        assert_eq!((json["subject"].as_str(), json["state"].as_str()), (Some("order"), Some("paid")), "{json}");
        assert_eq!(serde_json::from_value::<Change>(json).unwrap(), change);
        assert_eq!(change.kind(), "order.paid");

        let refund = Change {
            subject: ChangeSubject::Refund {
                order_id: Uuid::nil(),
                user_id: "u1".into(),
                refund_id: Uuid::max(),
                payment_id: "pay_1".into(),
                amount_cents: 1000,
                state: RefundState::Requested,
            },
            ..change
        };
        let json = serde_json::to_value(&refund).unwrap();
        assert_eq!((json["subject"].as_str(), json["refund_state"].as_str()), (Some("refund"), Some("requested")));
        assert_eq!(serde_json::from_value::<Change>(json).unwrap(), refund);
        assert_eq!(refund.kind(), "order.refund_requested");
        assert_eq!(refund.key(), Uuid::nil().to_string());
    }

    #[test]
    fn topics_share_the_prefix() {
        let t = Topics::with_prefix("t1");
        assert_eq!(t.intents, "t1.intents");
        assert!(t.all().iter().all(|n| n.starts_with("t1.")));
    }
}

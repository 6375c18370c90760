//! What the buyers' event streams are fed from: one shared subscription per
//! ingress process, never a poll per stream.
//!
//! - Decisions and order changes, read from the ends of their topics by one
//!   consumer ([`Live::follow`]), each handed to the streams of its intent
//!   (an order's id is its intent's). A stream takes a state from it only
//!   if it is further along the purchase's life than the one it showed, so
//!   a duplicate or a late message changes nothing.
//! - Each waiting room's line as this replica's keeper leaves it every tick
//!   ([`Live::pulse`]): a ticket's stream works its place out from it and
//!   reads its own record only when its turn starts or ends, or the draw
//!   places it.
//! - The allocators' line, as [`crate::allocation::AllocationLine`] reads it,
//!   for a queued purchase's place.
//!
//! Streams are counted: past the bound a new one is refused with 503
//! `streams_full` and a `Retry-After`.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use dropline::config::KafkaArgs;
use dropline::db::from_ms;
use dropline::messages::{Decision, OrderChange, OrderState, Outcome, RejectReason, Topics};
use dropline::room::Phase;
use rdkafka::Message;
use serde::Serialize;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::metrics::OPEN_STREAMS;
use crate::orders::{OrderView, Source};
use crate::problem::{ErrorCode, Problem};

/// Where a purchase stands: the body of `GET /v1/intents/{id}` and of each
/// event on its stream.
#[derive(Debug, Clone, Serialize)]
pub struct IntentStatus {
    pub intent_id: Uuid,
    pub event_id: u64,
    pub quantity: u32,
    /// queued, rejected, or the order's state: held, paid, cancelled,
    /// expired, voided.
    pub status: &'static str,
    /// While queued: intents of the event ahead of this one that the
    /// allocators have not decided yet (as of their last commit, at most
    /// about a second ago).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ahead: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<RejectReason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order: Option<OrderView>,
}

impl IntentStatus {
    /// How far along a purchase's life this is: queued, then held, then
    /// paid, then an end that gives the units back (or was never given
    /// them). A state never gives way to one with a lower rank.
    pub fn rank(&self) -> u8 {
        rank_of(self.status)
    }

    /// Nothing more will happen to it that its buyer waits for.
    pub fn is_final(&self) -> bool {
        self.rank() >= 2
    }

    /// The stream event's id: the same state, the same id, so a stream
    /// resumed with it sends only what changed.
    pub fn event_id(&self) -> String {
        match self.ahead {
            Some(ahead) => format!("{}.{ahead}", self.status),
            None => self.status.to_owned(),
        }
    }

    /// The state an allocator's decision puts its intent in.
    pub fn decided(d: &Decision) -> (String, Self) {
        let (status, reason, order) = match &d.outcome {
            Outcome::Held { expires_at_ms, amount_cents, .. } => {
                let order = order_view(
                    d.intent_id,
                    d.event_id,
                    &d.user_id,
                    d.quantity,
                    *amount_cents,
                    OrderState::Held,
                    *expires_at_ms,
                );
                ("held", None, Some(order))
            }
            Outcome::Rejected { reason } => ("rejected", Some(*reason), None),
        };
        let status = IntentStatus {
            intent_id: d.intent_id,
            event_id: d.event_id,
            quantity: d.quantity,
            status,
            ahead: None,
            reason,
            order,
        };
        (d.user_id.clone(), status)
    }

    /// The state an order change puts the order's intent in.
    pub fn changed(c: &OrderChange) -> (String, Self) {
        let order =
            order_view(c.order_id, c.event_id, &c.user_id, c.quantity, c.amount_cents, c.state, c.expires_at_ms);
        let status = IntentStatus {
            intent_id: c.order_id,
            event_id: c.event_id,
            quantity: c.quantity,
            status: c.state.as_str(),
            ahead: None,
            reason: None,
            order: Some(order),
        };
        (c.user_id.clone(), status)
    }
}

/// How far along a purchase's life `status` is (see [`IntentStatus::rank`]).
pub fn rank_of(status: &str) -> u8 {
    match status {
        "queued" => 0,
        "held" => 1,
        "paid" => 2,
        _ => 3,
    }
}

fn order_view(
    order_id: Uuid,
    event_id: u64,
    user: &str,
    quantity: u32,
    amount_cents: u64,
    state: OrderState,
    expires_at_ms: i64,
) -> OrderView {
    OrderView {
        order_id,
        event_id,
        quantity,
        amount_cents,
        state,
        expires_at: from_ms(expires_at_ms),
        order_url: format!("/v1/orders/{order_id}"),
        user_id: user.to_owned(),
        source: Source::Ledger,
    }
}

/// A waiting room's line as a keeper tick left it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoomPulse {
    pub phase: Phase,
    pub now_serving: u64,
    pub available: u64,
    pub outflow_per_sec: u32,
    pub measured_per_sec: Option<f64>,
    /// When the tick saw it.
    pub at: DateTime<Utc>,
}

/// The latest update of an intent: its buyer, and the state it is in.
pub type IntentUpdate = Option<Arc<(String, IntentStatus)>>;

/// Watch channels by key, each there while someone subscribes to it.
struct Registry<K, T> {
    map: Mutex<HashMap<K, watch::Sender<T>>>,
}

impl<K: Hash + Eq + Clone, T: Default> Registry<K, T> {
    fn new() -> Arc<Self> {
        Arc::new(Self { map: Mutex::default() })
    }

    fn subscribe(self: &Arc<Self>, key: K) -> Subscription<K, T> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let rx = map.entry(key.clone()).or_insert_with(|| watch::channel(T::default()).0).subscribe();
        Subscription { registry: self.clone(), key, rx }
    }

    /// Changes `key`'s value, if anyone subscribes to it; `change` says
    /// whether it did (its subscribers wake only then).
    fn send(&self, key: &K, change: impl FnOnce(&mut T) -> bool) {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = map.get(key) {
            tx.send_if_modified(change);
        }
    }
}

/// A stream's subscription to one key; the key leaves the registry with
/// its last subscriber.
pub struct Subscription<K: Hash + Eq, T> {
    registry: Arc<Registry<K, T>>,
    key: K,
    pub rx: watch::Receiver<T>,
}

impl<K: Hash + Eq, T> Drop for Subscription<K, T> {
    fn drop(&mut self) {
        let mut map = self.registry.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(&self.key).is_some_and(|tx| tx.receiver_count() <= 1) {
            map.remove(&self.key);
        }
    }
}

/// The shared subscription and the streams' bound.
pub struct Live {
    intents: Arc<Registry<Uuid, IntentUpdate>>,
    /// Decisions per buyer and event, counted: a purchase made with a turn
    /// was decided, so the turn was used.
    buyers: Arc<Registry<(u64, String), u64>>,
    /// Each room's line, for the rooms whose tickets have streams here.
    rooms: Arc<Registry<u64, Option<RoomPulse>>>,
    permits: Arc<Semaphore>,
    max_streams: usize,
    /// Streams open per buyer: no buyer may take every slot.
    per_buyer: Arc<Mutex<HashMap<String, usize>>>,
    /// Streams end when the ingress stops, so the drain is not held up.
    pub shutdown: CancellationToken,
}

/// Streams one buyer may have open at once on one replica (a page's
/// ticket and purchase streams, a reconnection overlapping its old one).
pub const STREAMS_PER_BUYER: usize = 4;

/// One stream's slot; gives it back when dropped.
pub struct StreamPermit {
    _slot: OwnedSemaphorePermit,
    buyer: String,
    per_buyer: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut open = self.per_buyer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.buyer) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.buyer);
            }
        }
        metrics::gauge!(OPEN_STREAMS.name).decrement(1.0);
    }
}

impl Live {
    pub fn new(max_streams: usize, shutdown: CancellationToken) -> Self {
        Self {
            intents: Registry::new(),
            buyers: Registry::new(),
            rooms: Registry::new(),
            permits: Arc::new(Semaphore::new(max_streams)),
            max_streams,
            per_buyer: Arc::default(),
            shutdown,
        }
    }

    /// A slot for one more of `buyer`'s streams: 429 past the buyer's
    /// share, 503 while all are taken.
    pub fn permit(&self, buyer: &str) -> Result<StreamPermit, Problem> {
        let mut open = self.per_buyer.lock().unwrap_or_else(|e| e.into_inner());
        let theirs = open.entry(buyer.to_owned()).or_default();
        if *theirs >= STREAMS_PER_BUYER {
            return Err(Problem::new(ErrorCode::RateLimited)
                .detail(format!("{STREAMS_PER_BUYER} streams open for you here already; close one"))
                .retry_after(5));
        }
        let slot = self.permits.clone().try_acquire_owned().map_err(|_| {
            Problem::new(ErrorCode::StreamsFull)
                .detail(format!("this replica has {} streams open; poll meanwhile", self.max_streams))
                .retry_after(5)
        })?;
        *theirs += 1;
        drop(open);
        metrics::gauge!(OPEN_STREAMS.name).increment(1.0);
        Ok(StreamPermit { _slot: slot, buyer: buyer.to_owned(), per_buyer: self.per_buyer.clone() })
    }

    /// Subscribes to `id`'s changes: subscribe before reading its state, so
    /// nothing that happens after the read is missed.
    pub fn watch_intent(&self, id: Uuid) -> Subscription<Uuid, IntentUpdate> {
        self.intents.subscribe(id)
    }

    /// Counts the decisions of `user`'s purchases at `event_id`.
    pub fn watch_buyer(&self, event_id: u64, user: &str) -> Subscription<(u64, String), u64> {
        self.buyers.subscribe((event_id, user.to_owned()))
    }

    /// `event_id`'s line as this replica's keeper leaves it (from its
    /// next tick on).
    pub fn watch_room(&self, event_id: u64) -> Subscription<u64, Option<RoomPulse>> {
        self.rooms.subscribe(event_id)
    }

    /// The keeper's tick on `event_id`'s room; its streams wake only when
    /// the line changed.
    pub fn pulse(&self, event_id: u64, pulse: RoomPulse) {
        self.rooms.send(&event_id, |last| {
            let changed = last.is_none_or(|l| RoomPulse { at: pulse.at, ..l } != pulse);
            *last = Some(pulse);
            changed
        });
    }

    /// Hands a decision or an order change to the streams of its intent.
    fn deliver(&self, decisions_topic: &str, topic: &str, payload: &[u8]) {
        let update = if topic == decisions_topic {
            serde_json::from_slice::<Decision>(payload).map(|d| IntentStatus::decided(&d))
        } else {
            serde_json::from_slice::<OrderChange>(payload).map(|c| IntentStatus::changed(&c))
        };
        // What no stage could read goes to the dead letters there; here it
        // is only not pushed.
        let Ok(update) = update else { return };
        if topic == decisions_topic {
            self.buyers.send(&(update.1.event_id, update.0.clone()), |n| {
                *n += 1;
                true
            });
        }
        // The two topics are not ordered against each other (a paid order's
        // change can come before its hold's decision): only a state further
        // along replaces the one kept, so none is lost before a stream
        // reads it.
        let id = update.1.intent_id;
        self.intents.send(&id, |latest| {
            let further = latest.as_ref().is_none_or(|l| update.1.rank() > l.1.rank());
            if further {
                *latest = Some(Arc::new(update));
            }
            further
        });
    }

    /// Reads the decisions and order changes from their ends until shutdown.
    pub async fn follow(self: Arc<Self>, kafka: KafkaArgs, topics: Topics) {
        let names = [topics.decisions.clone(), topics.order_changes.clone()];
        let consumer = loop {
            match dropline::kafka::tail(&kafka, "ingress-live", &names, Duration::from_secs(5)).await {
                Ok(consumer) => break consumer,
                Err(e) => tracing::warn!(error = %e, "cannot follow decisions and order changes; streams wait"),
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        };
        loop {
            let received = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                received = consumer.recv() => received,
            };
            match received {
                Ok(m) => self.deliver(&topics.decisions, m.topic(), m.payload().unwrap_or_default()),
                Err(e) => tracing::debug!(error = %e, "live feed: kafka error"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(s: &'static str) -> IntentStatus {
        IntentStatus {
            intent_id: Uuid::nil(),
            event_id: 1,
            quantity: 1,
            status: s,
            ahead: None,
            reason: None,
            order: None,
        }
    }

    #[test]
    fn a_purchase_only_moves_forward() {
        let life = ["queued", "held", "paid", "expired"];
        for pair in life.windows(2) {
            assert!(status(pair[0]).rank() < status(pair[1]).rank(), "{pair:?}");
        }
        assert_eq!(status("rejected").rank(), status("cancelled").rank());
        assert!(!status("held").is_final() && status("paid").is_final() && status("voided").is_final());
    }

    #[test]
    fn event_ids_follow_the_state() {
        let mut queued = status("queued");
        queued.ahead = Some(12);
        assert_eq!(queued.event_id(), "queued.12");
        assert_eq!(status("held").event_id(), "held");
    }

    #[tokio::test]
    async fn streams_are_bounded_and_their_slots_come_back() {
        let live = Live::new(2, CancellationToken::new());
        let (a, _b) = (live.permit("ann").unwrap(), live.permit("bob").unwrap());
        let refused = live.permit("cy").err().expect("a third stream is refused");
        assert_eq!((refused.code, refused.retry_after_secs), (ErrorCode::StreamsFull, Some(5)));
        drop(a);
        assert!(live.permit("cy").is_ok());
        assert!(live.per_buyer.lock().unwrap().get("ann").is_none(), "a buyer with no stream is forgotten");
    }

    #[tokio::test]
    async fn no_buyer_takes_more_than_their_share_of_streams() {
        let live = Live::new(100, CancellationToken::new());
        let mine: Vec<_> = (0..STREAMS_PER_BUYER).map(|_| live.permit("greedy").unwrap()).collect();
        assert_eq!(live.permit("greedy").err().unwrap().code, ErrorCode::RateLimited);
        assert!(live.permit("modest").is_ok(), "others still get theirs");
        drop(mine);
        assert!(live.permit("greedy").is_ok());
    }

    #[test]
    fn a_late_state_never_replaces_one_further_along() {
        let live = Arc::new(Live::new(10, CancellationToken::new()));
        let id = Uuid::new_v4();
        let watch = live.watch_intent(id);
        let change = |s: OrderState| OrderChange {
            order_id: id,
            event_id: 1,
            user_id: "ann".into(),
            quantity: 1,
            amount_cents: 100,
            state: s,
            expires_at_ms: 0,
            at_ms: 0,
            payment: None,
            payment_started_at_ms: None,
            payment_failure: None,
            refund_cents: None,
        };
        let topic = "t.order-events";
        live.deliver("t.decisions", topic, &serde_json::to_vec(&change(OrderState::Paid)).unwrap());
        live.deliver("t.decisions", topic, &serde_json::to_vec(&change(OrderState::Held)).unwrap());
        assert_eq!(watch.rx.borrow().as_ref().unwrap().1.status, "paid");
    }

    #[tokio::test]
    async fn an_intent_leaves_the_registry_with_its_last_stream() {
        let live = Arc::new(Live::new(10, CancellationToken::new()));
        let id = Uuid::new_v4();
        let (first, second) = (live.watch_intent(id), live.watch_intent(id));
        drop(first);
        assert!(live.intents.map.lock().unwrap().contains_key(&id));
        drop(second);
        assert!(live.intents.map.lock().unwrap().is_empty());
    }
}

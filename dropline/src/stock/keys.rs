//! Every Redis key Dropline uses, named in one place. All start with the
//! deployment's prefix (`DROPLINE_REDIS_KEY_PREFIX`), so deployments and
//! parallel tests share a Redis. Scripts are handed their keys from here
//! (as `KEYS`, in the order each script's header lists) and never build one.
//!
//! | key                           | what                                    | written by          |
//! |-------------------------------|-----------------------------------------|---------------------|
//! | `<prefix>:{<event>}:<part>`   | an event's ledger, see [`EventKeys`]    | the stock scripts   |
//! | `<prefix>:{<event>}:room:<part>` | its waiting room, see [`RoomKeys`]   | the room scripts    |
//! | `<prefix>:unknown-events`     | events the record does not have         | settler             |
//! | `<prefix>:rebuild-requests`   | event -> why its ledger needs a rebuild | allocator, ingress  |
//! | `<prefix>:idem:<key name>`    | an Idempotency-Key's record             | ingress (its Lua)   |
//! | `<prefix>:intent:<intent id>` | the intent index                        | ingress             |
//!
//! An event's keys share one hash tag (`{<event>}`), so a script that
//! touches them runs in a single Redis Cluster slot, atomically.

use std::sync::Arc;

use uuid::Uuid;

/// Namespace of idempotency record names: UUIDv5 of "key\0buyer".
const KEY_NAMESPACE: Uuid = Uuid::from_u128(0x8b47_21d0_6e3a_4c95_b1f8_0a7c_2e64_d593);

/// The keys of one deployment.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: Arc<str>,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self { prefix: prefix.into() }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The keys of one event's ledger.
    pub fn event(&self, event_id: u64) -> EventKeys {
        EventKeys::new(&self.prefix, event_id)
    }

    /// The keys of one event's waiting room.
    pub fn room(&self, event_id: u64) -> RoomKeys {
        RoomKeys::new(&self.prefix, event_id)
    }

    /// Events the record has no row for: their intents can never be decided.
    pub fn unknown_events(&self) -> String {
        format!("{}:unknown-events", self.prefix)
    }

    /// Events whose ledger a stage found missing or damaged, and why.
    pub fn rebuild_requests(&self) -> String {
        format!("{}:rebuild-requests", self.prefix)
    }

    /// The record of `idempotency_key` as `user_id` used it. The name hashes
    /// both: a key is any visible ASCII, a buyer's id anything at all.
    pub fn idempotency(&self, user_id: &str, idempotency_key: &str) -> String {
        let name = Uuid::new_v5(&KEY_NAMESPACE, format!("{idempotency_key}\0{user_id}").as_bytes());
        format!("{}:idem:{name}", self.prefix)
    }

    /// A `SCAN` pattern for every idempotency record.
    pub fn idempotency_pattern(&self) -> String {
        format!("{}:idem:*", self.prefix)
    }

    /// The intent index entry of `intent_id`.
    pub fn intent(&self, intent_id: Uuid) -> String {
        format!("{}:intent:{intent_id}", self.prefix)
    }
}

/// Redis keys of one event's ledger.
#[derive(Debug, Clone)]
pub struct EventKeys {
    pub stock: String,
    pub users: String,
    pub decisions: String,
    pub holds: String,
    pub fence: String,
    /// Unit numbers released by ended holds, handed out again first.
    pub free: String,
    /// Allocators' decisions on their way to Kafka: batch token -> when the
    /// allocator last said it is still publishing (ms). A rebuild waits for
    /// it to empty (see [`super::Ledger::publishing`]).
    pub in_flight: String,
    /// Intents the ingress refused at the door, and why (see door.lua).
    /// A rebuild leaves it alone: it is no copy of anything in MySQL.
    pub refused: String,
}

impl EventKeys {
    pub fn new(prefix: &str, event_id: u64) -> Self {
        let tag = format!("{prefix}:{{{event_id}}}");
        Self {
            stock: format!("{tag}:stock"),
            users: format!("{tag}:users"),
            decisions: format!("{tag}:decisions"),
            holds: format!("{tag}:holds"),
            fence: format!("{tag}:fence"),
            free: format!("{tag}:free"),
            in_flight: format!("{tag}:in-flight"),
            refused: format!("{tag}:refused"),
        }
    }

    /// allocate.lua's keys.
    pub fn allocate(&self) -> [&str; 7] {
        [&self.stock, &self.users, &self.decisions, &self.holds, &self.fence, &self.free, &self.refused]
    }

    /// door.lua's keys.
    pub fn door(&self) -> [&str; 4] {
        [&self.stock, &self.decisions, &self.fence, &self.refused]
    }

    /// hold.lua's keys.
    pub fn hold(&self) -> [&str; 5] {
        [&self.stock, &self.users, &self.holds, &self.fence, &self.free]
    }

    /// resize.lua's keys (and the pause's): the stock hash and its fence.
    pub fn resize(&self) -> [&str; 2] {
        [&self.stock, &self.fence]
    }

    /// What a rebuild replaces from the record.
    pub fn rebuilt(&self) -> [&str; 5] {
        [&self.stock, &self.users, &self.decisions, &self.holds, &self.free]
    }
}

/// Redis keys of one event's waiting room (see [`crate::room`]). They share
/// the event's hash tag: the admission script reads the ledger's stock.
#[derive(Debug, Clone)]
pub struct RoomKeys {
    /// The room's settings and counters (state, outflow, now serving...).
    pub conf: String,
    /// Tickets that joined before the opening, waiting for the draw.
    pub pre: String,
    /// The line: ticket -> place (1 is first).
    pub line: String,
    /// Buyer -> their ticket.
    pub users: String,
    /// Admitted tickets -> the deadline of their turn (ms).
    pub admitted: String,
    /// Tickets whose turn ended -> `used` or `lapsed`.
    pub ended: String,
    /// Recent (ms, now serving) samples, newest first: the measured outflow.
    pub samples: String,
    /// Purchases made with a turn and not decided yet: intent id -> units
    /// asked for. Until they are decided, those units count as spoken for.
    pub pending: String,
    /// The event's stock hash, read for what remains.
    pub stock: String,
    /// The event's decisions, read for which pending purchases are decided.
    pub decisions: String,
}

impl RoomKeys {
    pub fn new(prefix: &str, event_id: u64) -> Self {
        let tag = format!("{prefix}:{{{event_id}}}");
        Self {
            conf: format!("{tag}:room:conf"),
            pre: format!("{tag}:room:pre"),
            line: format!("{tag}:room:line"),
            users: format!("{tag}:room:users"),
            admitted: format!("{tag}:room:admitted"),
            ended: format!("{tag}:room:ended"),
            samples: format!("{tag}:room:samples"),
            pending: format!("{tag}:room:pending"),
            stock: format!("{tag}:stock"),
            decisions: format!("{tag}:decisions"),
        }
    }

    /// Every key, in the order each room script's header lists them.
    pub fn all(&self) -> [&str; 10] {
        [
            &self.conf,
            &self.pre,
            &self.line,
            &self.users,
            &self.admitted,
            &self.ended,
            &self.samples,
            &self.pending,
            &self.stock,
            &self.decisions,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_keep_their_layout() {
        let keys = Keys::new("dl");
        assert_eq!(keys.event(7).stock, "dl:{7}:stock");
        assert_eq!(keys.event(7).in_flight, "dl:{7}:in-flight");
        assert_eq!(keys.room(7).line, "dl:{7}:room:line");
        assert_eq!(keys.room(7).stock, keys.event(7).stock, "the room reads its event's stock");
        assert_eq!(keys.room(7).decisions, keys.event(7).decisions, "and its decisions");
        assert_eq!(keys.intent(Uuid::nil()), "dl:intent:00000000-0000-0000-0000-000000000000");
        let record = keys.idempotency("amy", "k1");
        assert!(record.starts_with("dl:idem:") && record.len() == "dl:idem:".len() + 36, "{record}");
        assert_ne!(record, keys.idempotency("amy", "k2"));
        assert_ne!(record, keys.idempotency("bob", "k1"));
    }
}

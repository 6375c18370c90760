//! Idempotency records, and the index from an intent (or order) id to its
//! event and buyer.
//!
//! Two kinds of Redis record, both kept `DROPLINE_IDEMPOTENCY_TTL_SECS` and
//! named in [`dropline::stock::keys`]:
//! - `<prefix>:idem:<hash of buyer and key>`: what an Idempotency-Key was
//!   first used for (event, quantity, intent id) and where its request
//!   stands: `busy` (owned by one request, for a lease), `accepted` (202) or
//!   `refused` (the refusal at the door, replayed as it was). One per buyer
//!   and key, whatever the event, so a key reused for another event or
//!   quantity is caught. claim.lua records "busy" atomically with the key,
//!   and only the request that owns the record moves it on (settle.lua), so
//!   copies of one request sent at once get the owner's final answer or
//!   "in progress", never two different answers. A record that was answered
//!   is never deleted.
//! - `<prefix>:intent:<intent id>`: the event, buyer and quantity of an
//!   intent that was produced (or is being produced), for the status and
//!   order endpoints. Written before the intent is produced.
//!
//! The intent id is derived from the event, the buyer and their key, so a
//! retry after an ambiguous broker failure produces the *same* intent, which
//! the allocator then decides only once; and a key used again for another
//! event once its record expired is another intent.
//!
//! Upgrading from ids of (buyer, key) (namespace `6d2f3b1c-…`, records at
//! `<prefix>:intent:<id>` with an `ok` flag): the old intent records still
//! answer the status and order endpoints (the `ok` flag is ignored), but a
//! retry, after the upgrade, of a key first sent to an old ingress finds no
//! idempotency record and maps to a new intent id: if its first copy was
//! accepted, the buyer can end up with two intents for one purchase (the
//! per-user limit still caps their units). Drain the intake (let buyers'
//! retries settle) before rolling the ingress over.

use std::sync::LazyLock;
use std::time::Duration;

use dropline::kafka::Written;
use dropline::redis_pool::redis::{self, AsyncCommands, Script};
use dropline::stock::Keys;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::problem::{ErrorCode, Problem};

static CLAIM: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/claim.lua")));
static SETTLE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/settle.lua")));

/// Namespace of intent ids: UUIDv5 of "event\0key\0buyer". (Ids of
/// "buyer\0key" under 6d2f3b1c-8a4e-4f0b-9c57-1e2da3b4c5d6 came before.)
const INTENT_NAMESPACE: Uuid = Uuid::from_u128(0x3f1e_9a52_c7d4_4b86_a0e1_5c2b_7d98_e4f3);

/// The intent a buyer's purchase with `idempotency_key` maps to. The key is
/// visible ASCII (the extractor checks), so it holds no NUL and the name
/// splits one way only, whatever the buyer's id holds.
pub fn intent_id(event_id: u64, user_id: &str, idempotency_key: &str) -> Uuid {
    let name = format!("{event_id}\0{idempotency_key}\0{user_id}");
    Uuid::new_v5(&INTENT_NAMESPACE, name.as_bytes())
}

/// An intent as the index keeps it (and as it is produced).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntentRecord {
    #[serde(rename = "e")]
    pub event_id: u64,
    #[serde(rename = "u")]
    pub user_id: String,
    #[serde(rename = "q")]
    pub quantity: u32,
    /// When the key was first claimed: every copy of the intent carries it.
    #[serde(rename = "at")]
    pub accepted_at_ms: i64,
}

/// An intent as the index keeps it: the intent, and once the broker
/// acknowledged it, its partition and offset on the intents topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    #[serde(flatten)]
    pub intent: IntentRecord,
    #[serde(rename = "w", default, skip_serializing_if = "Option::is_none")]
    pub written: Option<(i32, i64)>,
}

/// An Idempotency-Key's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    #[serde(rename = "id")]
    pub intent_id: Uuid,
    #[serde(flatten)]
    pub intent: IntentRecord,
    #[serde(flatten)]
    pub state: KeyState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "st", rename_all = "snake_case")]
pub enum KeyState {
    /// A request owns the key until `until` (Redis ms); 0 once it gave up.
    Busy {
        own: String,
        #[serde(rename = "until")]
        until_ms: i64,
    },
    /// The broker acknowledged the intent; the buyer was told 202.
    Accepted,
    /// Refused at the door, with this answer.
    Refused {
        #[serde(rename = "ans")]
        answer: StoredRefusal,
    },
}

/// A refusal as it was answered, to be answered again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRefusal {
    #[serde(rename = "s")]
    pub status: u16,
    #[serde(rename = "c")]
    pub code: String,
    #[serde(rename = "d", default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(rename = "r", default, skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u64>,
}

impl StoredRefusal {
    pub fn of(problem: &Problem) -> Self {
        Self {
            status: problem.code.status().as_u16(),
            code: problem.code.as_str().to_owned(),
            detail: problem.detail.clone(),
            retry_after_secs: problem.retry_after_secs,
        }
    }

    /// The refusal, answered again.
    pub fn replay(&self) -> Problem {
        let Some(code) = ErrorCode::parse(&self.code) else {
            tracing::error!(code = %self.code, "stored refusal with an unknown code");
            return Problem::new(ErrorCode::Internal);
        };
        let mut problem = Problem::new(code);
        problem.detail = self.detail.clone();
        problem.retry_after_secs = self.retry_after_secs;
        problem
    }
}

/// What claiming a key found.
#[derive(Debug)]
pub enum KeyClaim {
    /// The key is new and this request owns it: it may refuse at the door.
    New { owner: String },
    /// This request took the key over from an owner whose lease ran out:
    /// the intent may be on Kafka, so it must be produced, never refused.
    /// The intent as first recorded.
    TakenOver { owner: String, intent: IntentRecord },
    /// Another request owns the key for this much longer.
    Busy { lease_left: Duration },
    /// The key's final answer.
    Final(KeyRecord),
    /// The key was first used for another event or quantity.
    Reused,
}

/// What settling a key found.
#[derive(Debug)]
pub enum Settled {
    /// Written as asked.
    Done,
    /// Another request owns the key now, or answered it: this record.
    Lost(KeyRecord),
    /// There was nothing to give up.
    Gone,
}

#[derive(Clone)]
pub struct IntentStore {
    pool: dropline::redis_pool::Pool,
    keys: Keys,
    ttl_secs: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis pool: {0}")]
    Pool(#[from] dropline::redis_pool::PoolError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("unreadable intent record: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("idempotency script answered {0:?}")]
    Script(String),
}

impl IntentStore {
    pub fn new(pool: dropline::redis_pool::Pool, prefix: &str, ttl_secs: u64) -> Self {
        Self { pool, keys: Keys::new(prefix), ttl_secs }
    }

    /// Claims `idempotency_key` for a request for `intent` (intent `id`);
    /// a request that gets to own it holds it for `lease`.
    pub async fn claim(
        &self,
        idempotency_key: &str,
        id: Uuid,
        intent: &IntentRecord,
        lease: Duration,
    ) -> Result<KeyClaim, StoreError> {
        let owner = Uuid::new_v4().simple().to_string();
        // The record less its state, which the script adds.
        let fresh = serde_json::json!({
            "id": id, "e": intent.event_id, "u": intent.user_id, "q": intent.quantity, "at": intent.accepted_at_ms,
        });
        let mut conn = self.pool.get().await?;
        let (outcome, raw, left_ms): (String, String, u64) = CLAIM
            .key(self.keys.idempotency(&intent.user_id, idempotency_key))
            .arg(fresh.to_string())
            .arg(id.to_string())
            .arg(intent.quantity)
            .arg(&owner)
            .arg(lease.as_millis() as u64)
            .arg(self.ttl_secs)
            .invoke_async(&mut conn)
            .await?;
        Ok(match outcome.as_str() {
            "new" => KeyClaim::New { owner },
            "takeover" => KeyClaim::TakenOver { owner, intent: serde_json::from_str::<KeyRecord>(&raw)?.intent },
            "busy" => KeyClaim::Busy { lease_left: Duration::from_millis(left_ms) },
            "final" => KeyClaim::Final(serde_json::from_str(&raw)?),
            "reused" => KeyClaim::Reused,
            other => return Err(StoreError::Script(other.to_owned())),
        })
    }

    /// Writes the key's final answer, if `owner` still owns it.
    pub async fn settle(&self, idempotency_key: &str, owner: &str, record: &KeyRecord) -> Result<Settled, StoreError> {
        self.run_settle(&record.intent.user_id, idempotency_key, owner, &serde_json::to_string(record)?).await
    }

    /// Claims `idempotency_key` and records its intent as accepted, as a
    /// request does once the broker acknowledged it: what `dropctl check`
    /// and the tests that break it read. `false` if the key had an owner or
    /// an answer already.
    pub async fn record_accepted(
        &self,
        idempotency_key: &str,
        id: Uuid,
        intent: &IntentRecord,
    ) -> Result<bool, StoreError> {
        let KeyClaim::New { owner } = self.claim(idempotency_key, id, intent, Duration::from_secs(5)).await? else {
            return Ok(false);
        };
        let record = KeyRecord { intent_id: id, intent: intent.clone(), state: KeyState::Accepted };
        Ok(matches!(self.settle(idempotency_key, &owner, &record).await?, Settled::Done))
    }

    /// Gives the key up without a final answer (the request failed after
    /// it may have produced the intent): the next request takes it over.
    pub async fn release(&self, user_id: &str, idempotency_key: &str, owner: &str) -> Result<Settled, StoreError> {
        self.run_settle(user_id, idempotency_key, owner, "").await
    }

    async fn run_settle(
        &self,
        user_id: &str,
        idempotency_key: &str,
        owner: &str,
        record: &str,
    ) -> Result<Settled, StoreError> {
        let mut conn = self.pool.get().await?;
        let (outcome, raw): (String, String) = SETTLE
            .key(self.keys.idempotency(user_id, idempotency_key))
            .arg(owner)
            .arg(record)
            .arg(self.ttl_secs)
            .invoke_async(&mut conn)
            .await?;
        Ok(match outcome.as_str() {
            "done" => Settled::Done,
            "lost" => Settled::Lost(serde_json::from_str(&raw)?),
            "gone" => Settled::Gone,
            other => return Err(StoreError::Script(other.to_owned())),
        })
    }

    /// A key's record, if Redis has it.
    pub async fn key_record(&self, user_id: &str, idempotency_key: &str) -> Result<Option<KeyRecord>, StoreError> {
        let mut conn = self.pool.get().await?;
        let raw: Option<String> = conn.get(self.keys.idempotency(user_id, idempotency_key)).await?;
        Ok(raw.as_deref().map(serde_json::from_str).transpose()?)
    }

    /// Indexes an intent about to be produced.
    pub async fn index(&self, id: Uuid, intent: &IntentRecord) -> Result<(), StoreError> {
        let mut conn = self.pool.get().await?;
        let _: () = conn.set_ex(self.keys.intent(id), serde_json::to_string(intent)?, self.ttl_secs).await?;
        Ok(())
    }

    /// Adds where the broker wrote an indexed intent, for its place in the
    /// allocators' line.
    pub async fn locate(&self, id: Uuid, intent: &IntentRecord, at: Written) -> Result<(), StoreError> {
        let entry = IndexEntry { intent: intent.clone(), written: Some((at.partition, at.offset)) };
        let mut conn = self.pool.get().await?;
        let _: () = conn.set_ex(self.keys.intent(id), serde_json::to_string(&entry)?, self.ttl_secs).await?;
        Ok(())
    }

    /// An intent from the index: one that was produced (or was about to
    /// be), so its id was, or may have been, handed to its buyer.
    pub async fn get(&self, id: Uuid) -> Result<Option<IndexEntry>, StoreError> {
        let mut conn = self.pool.get().await?;
        let raw: Option<String> = conn.get(self.keys.intent(id)).await?;
        Ok(raw.as_deref().map(serde_json::from_str).transpose()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intent_ids_are_stable_per_event_user_and_key() {
        assert_eq!(intent_id(1, "alice", "k1"), intent_id(1, "alice", "k1"));
        assert_ne!(intent_id(1, "alice", "k1"), intent_id(1, "alice", "k2"));
        assert_ne!(intent_id(1, "alice", "k1"), intent_id(1, "bob", "k1"));
        assert_ne!(intent_id(1, "alice", "k1"), intent_id(2, "alice", "k1"));
        // The separators keep the parts apart; the key is visible ASCII (no
        // NUL), so the buyer's id goes last, where a NUL in it moves nothing.
        assert_ne!(intent_id(12, "a", "k"), intent_id(1, "a", "2k"));
        assert_ne!(intent_id(1, "a\0b", "k"), intent_id(1, "a", "k"));
    }

    #[test]
    fn records_keep_their_shape_on_the_wire() {
        let intent =
            IntentRecord { event_id: 7, user_id: "amy".into(), quantity: 2, accepted_at_ms: 1_700_000_000_123 };
        let record = KeyRecord {
            intent_id: intent_id(7, "amy", "k"),
            intent: intent.clone(),
            state: KeyState::Refused {
                answer: StoredRefusal { status: 409, code: "sold_out".into(), detail: None, retry_after_secs: Some(5) },
            },
        };
        let raw = serde_json::to_string(&record).unwrap();
        assert_eq!(serde_json::from_str::<KeyRecord>(&raw).unwrap(), record);
        let busy: KeyRecord = serde_json::from_str(
            r#"{"id":"3f1e9a52-c7d4-4b86-a0e1-5c2b7d98e4f3","e":7,"u":"amy","q":2,"at":1700000000123,"st":"busy","own":"x","until":0}"#,
        )
        .unwrap();
        assert_eq!(busy.state, KeyState::Busy { own: "x".into(), until_ms: 0 });
        // An intent record written before the upgrade still reads.
        let legacy: IntentRecord = serde_json::from_str(r#"{"e":7,"u":"amy","q":2,"ok":true,"at":1}"#).unwrap();
        assert_eq!(legacy.event_id, 7);
    }

    #[test]
    fn a_stored_refusal_replays_as_it_was_answered() {
        let problem = Problem::new(ErrorCode::SoldOut).detail("gone").retry_after(5);
        let replayed = StoredRefusal::of(&problem).replay();
        assert_eq!(
            (replayed.code, replayed.detail, replayed.retry_after_secs),
            (ErrorCode::SoldOut, Some("gone".into()), Some(5))
        );
    }
}

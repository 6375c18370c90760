//! Intent records: the ingress' idempotency store and the index from an
//! intent (or order) id to its event and buyer.
//!
//! The intent id is derived from the buyer and their Idempotency-Key, so a
//! retry after an ambiguous broker failure produces the *same* intent, which
//! the allocator then decides only once. The record, written with SET NX
//! before producing, remembers what the key was first used for (a reuse for
//! another request is refused) and whether the broker acknowledged it (a
//! replay of an acknowledged request is answered without producing again).

use deadpool_redis::redis::{self, AsyncCommands};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Namespace of intent ids (UUIDv5 of "user\0idempotency key").
const INTENT_NAMESPACE: Uuid = Uuid::from_u128(0x6d2f_3b1c_8a4e_4f0b_9c57_1e2d_a3b4_c5d6);

pub fn intent_id(user_id: &str, idempotency_key: &str) -> Uuid {
    let mut name = Vec::with_capacity(user_id.len() + idempotency_key.len() + 1);
    name.extend_from_slice(user_id.as_bytes());
    name.push(0);
    name.extend_from_slice(idempotency_key.as_bytes());
    Uuid::new_v5(&INTENT_NAMESPACE, &name)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntentRecord {
    #[serde(rename = "e")]
    pub event_id: u64,
    #[serde(rename = "u")]
    pub user_id: String,
    #[serde(rename = "q")]
    pub quantity: u32,
    /// The broker acknowledged the intent; the buyer was told 202.
    #[serde(rename = "ok")]
    pub accepted: bool,
    #[serde(rename = "at")]
    pub accepted_at_ms: i64,
}

impl IntentRecord {
    /// Same purchase: the key is being retried, not reused.
    pub fn same_request(&self, other: &IntentRecord) -> bool {
        self.event_id == other.event_id && self.user_id == other.user_id && self.quantity == other.quantity
    }
}

pub enum Reservation {
    /// The key is new; the record is written, not yet accepted.
    New,
    /// The key was seen before, with this record.
    Existing(IntentRecord),
}

#[derive(Clone)]
pub struct IntentStore {
    pool: deadpool_redis::Pool,
    prefix: String,
    ttl_secs: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis pool: {0}")]
    Pool(#[from] deadpool_redis::PoolError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("unreadable intent record: {0}")]
    Corrupt(#[from] serde_json::Error),
}

impl IntentStore {
    pub fn new(pool: deadpool_redis::Pool, prefix: &str, ttl_secs: u64) -> Self {
        Self { pool, prefix: prefix.to_owned(), ttl_secs }
    }

    fn key(&self, intent_id: Uuid) -> String {
        format!("{}:intent:{intent_id}", self.prefix)
    }

    pub async fn reserve(&self, id: Uuid, record: &IntentRecord) -> Result<Reservation, StoreError> {
        let mut conn = self.pool.get().await?;
        let body = serde_json::to_string(record)?;
        let set: Option<String> = redis::cmd("SET")
            .arg(self.key(id))
            .arg(&body)
            .arg("NX")
            .arg("EX")
            .arg(self.ttl_secs)
            .query_async(&mut conn)
            .await?;
        if set.is_some() {
            return Ok(Reservation::New);
        }
        let existing: Option<String> = conn.get(self.key(id)).await?;
        match existing {
            Some(raw) => Ok(Reservation::Existing(serde_json::from_str(&raw)?)),
            // Expired between the two calls: the key is as good as new.
            None => Ok(Reservation::New),
        }
    }

    pub async fn mark_accepted(&self, id: Uuid, record: &IntentRecord) -> Result<(), StoreError> {
        let mut conn = self.pool.get().await?;
        let accepted = IntentRecord { accepted: true, ..record.clone() };
        let _: () = redis::cmd("SET")
            .arg(self.key(id))
            .arg(serde_json::to_string(&accepted)?)
            .arg("EX")
            .arg(self.ttl_secs)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Drops a reservation whose intent was never produced.
    pub async fn forget(&self, id: Uuid) -> Result<(), StoreError> {
        let mut conn = self.pool.get().await?;
        let _: () = conn.del(self.key(id)).await?;
        Ok(())
    }

    pub async fn get(&self, id: Uuid) -> Result<Option<IntentRecord>, StoreError> {
        let mut conn = self.pool.get().await?;
        let raw: Option<String> = conn.get(self.key(id)).await?;
        Ok(raw.as_deref().map(serde_json::from_str).transpose()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intent_ids_are_stable_per_user_and_key() {
        assert_eq!(intent_id("alice", "k1"), intent_id("alice", "k1"));
        assert_ne!(intent_id("alice", "k1"), intent_id("alice", "k2"));
        assert_ne!(intent_id("alice", "k1"), intent_id("bob", "k1"));
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(intent_id("ab", "c"), intent_id("a", "bc"));
    }
}

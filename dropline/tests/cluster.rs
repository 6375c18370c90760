//! Dropline's keys on a real Redis Cluster: the local one of three primaries
//! and three replicas that scripts/test.sh starts
//! (DROPLINE_TEST_REDIS_CLUSTER_URL, default its node on port 7000).
//!
//! scripts/test.sh also runs the Redis suites (the ledger's scripts, the
//! ingress's rooms and API, the pipeline's drop) on this cluster, where a
//! script or transaction whose keys span two hash slots fails. These tests
//! show that such a failure is what the cluster gives, and that what spans
//! the whole cluster (a SCAN) reaches every primary.

use dropline::redis_pool::redis::{self, ErrorKind, ServerErrorKind};
use dropline::redis_pool::Pool;
use dropline::stock::{EventKeys, Keys};
use uuid::Uuid;

fn cluster(pool_size: usize) -> Pool {
    let url = std::env::var("DROPLINE_TEST_REDIS_CLUSTER_URL").unwrap_or_else(|_| "redis://127.0.0.1:7000".into());
    let mut args = dropline::config::RedisArgs::new(url, pool_size);
    args.cluster = true;
    args.pool().unwrap()
}

fn prefix() -> String {
    format!("ct{}", &Uuid::new_v4().simple().to_string()[..10])
}

async fn slot(pool: &Pool, key: &str) -> u16 {
    let mut conn = pool.get().await.unwrap();
    redis::cmd("CLUSTER").arg("KEYSLOT").arg(key).query_async(&mut conn).await.unwrap()
}

/// The primary serving `slot`, from CLUSTER SLOTS.
async fn primary_of(pool: &Pool, slot: u16) -> String {
    let mut conn = pool.get().await.unwrap();
    let ranges: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query_async(&mut conn).await.unwrap();
    for range in ranges {
        let redis::Value::Array(fields) = range else { panic!("CLUSTER SLOTS answered {range:?}") };
        let (start, end): (u16, u16) =
            (redis::from_redis_value(fields[0].clone()).unwrap(), redis::from_redis_value(fields[1].clone()).unwrap());
        if (start..=end).contains(&slot) {
            // [host, port, id, and from Redis 7 a map of hostnames]
            let node: Vec<redis::Value> = redis::from_redis_value(fields[2].clone()).unwrap();
            let host: String = redis::from_redis_value(node[0].clone()).unwrap();
            let port: u16 = redis::from_redis_value(node[1].clone()).unwrap();
            return format!("{host}:{port}");
        }
    }
    panic!("no primary serves slot {slot}")
}

/// The cluster refuses a script whose keys are two events' (two hash
/// slots), through the same pool and client the stages use; the same
/// script on one event's keys runs.
#[tokio::test]
async fn a_script_given_two_events_keys_is_refused_as_cross_slot() {
    let pool = cluster(2);
    let prefix = prefix();
    let first = EventKeys::new(&prefix, 1);
    let mut other = 2;
    while slot(&pool, &EventKeys::new(&prefix, other).stock).await == slot(&pool, &first.stock).await {
        other += 1;
    }
    let second = EventKeys::new(&prefix, other);
    let script = redis::Script::new("return redis.call('EXISTS', KEYS[1]) + redis.call('EXISTS', KEYS[2])");
    let mut conn = pool.get().await.unwrap();
    let refused = script.key(&first.stock).key(&second.stock).invoke_async::<i64>(&mut *conn).await.unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Server(ServerErrorKind::CrossSlot), "{refused}");
    let ran: i64 = script.key(&first.stock).key(&first.users).invoke_async(&mut *conn).await.unwrap();
    assert_eq!(ran, 0);
}

/// Every key of one event (its ledger and its waiting room) is in one hash
/// slot, so each script runs on one node, atomically; different events
/// spread over every primary.
#[tokio::test]
async fn an_events_keys_share_one_slot_and_events_spread_over_every_primary() {
    let pool = cluster(2);
    let keys = Keys::new(&prefix());
    let mut primaries = std::collections::BTreeSet::new();
    for event in 1..=30 {
        let ledger = keys.event(event);
        let room = keys.room(event);
        let mut all: Vec<&str> = ledger.allocate().to_vec();
        all.extend([ledger.in_flight.as_str(), room.conf.as_str(), room.pre.as_str(), room.line.as_str()]);
        all.extend([room.users.as_str(), room.admitted.as_str(), room.ended.as_str(), room.samples.as_str()]);
        all.extend([room.pending.as_str(), room.stock.as_str(), room.decisions.as_str()]);
        let first = slot(&pool, all[0]).await;
        for key in &all {
            assert_eq!(slot(&pool, key).await, first, "{key} is not in the slot of {}", all[0]);
        }
        primaries.insert(primary_of(&pool, first).await);
    }
    assert_eq!(primaries.len(), 3, "30 events all on {primaries:?}");
}

/// A SCAN reads one node's keys; `keys_matching` reads every primary's, so
/// the invariant check finds every idempotency record of a cluster.
#[tokio::test]
async fn keys_matching_finds_the_keys_of_every_primary() {
    let pool = cluster(2);
    let keys = Keys::new(&prefix());
    let mut conn = pool.get().await.unwrap();
    let written: Vec<String> = (0..60).map(|i| keys.idempotency(&format!("buyer-{i}"), "key")).collect();
    for key in &written {
        let () = redis::cmd("SET").arg(key).arg("{}").arg("EX").arg(60).query_async(&mut *conn).await.unwrap();
    }
    let mut found = conn.keys_matching(&keys.idempotency_pattern()).await.unwrap();
    found.sort();
    let mut expected = written.clone();
    expected.sort();
    assert_eq!(found, expected);
    // One node alone holds only its share.
    let (_, one_node): (u64, Vec<String>) = redis::cmd("SCAN")
        .arg(0)
        .arg("MATCH")
        .arg(keys.idempotency_pattern())
        .arg("COUNT")
        .arg(100_000)
        .query_async(&mut *conn)
        .await
        .unwrap();
    assert!(one_node.len() < written.len(), "one node answered all {} keys", one_node.len());
    let () = redis::cmd("DEL").arg(&written).query_async(&mut *conn).await.unwrap();
}

//! The stock ledger's scripts, and the pool they run over, against a real
//! Redis (DROPLINE_REDIS_URL, default 127.0.0.1:6379), or a Redis Cluster
//! with DROPLINE_REDIS_CLUSTER=true (scripts/test.sh runs them on both).
//! Each test uses its own random event id.

use std::time::Duration;

use dropline::messages::{OrderState, RejectReason};
use dropline::stock::{
    DoorOutcome, EndOutcome, Ledger, LedgerError, PayOutcome, Resized, SaleRules, StockLevels, Undecided, Verdict,
};
use uuid::Uuid;

fn redis_url() -> String {
    std::env::var("DROPLINE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn redis(pool_size: usize) -> dropline::config::RedisArgs {
    let mut args = dropline::config::RedisArgs::new(redis_url(), pool_size);
    args.cluster = std::env::var("DROPLINE_REDIS_CLUSTER").is_ok_and(|v| v == "true");
    args
}

fn ledger() -> Ledger {
    let pool = redis(16).pool().unwrap();
    Ledger::new(pool, "dltest")
}

fn now_ms() -> i64 {
    dropline::messages::now_ms()
}

/// The rules of a sale on now, without an oversell allowance.
fn on_sale(capacity: u32, per_user_limit: u32, hold_ttl_ms: u64) -> SaleRules {
    SaleRules {
        capacity,
        oversell_allowance: 0,
        per_user_limit,
        hold_ttl_ms,
        opens_at_ms: now_ms() - 1_000,
        closes_at_ms: now_ms() + 600_000,
        price_cents: 2_500,
        retain_until_ms: now_ms() + 600_000,
        paused: false,
    }
}

/// A fresh event, on sale now.
async fn event(ledger: &Ledger, capacity: u32, per_user_limit: u32, hold_ttl_ms: u64) -> u64 {
    let id = rand_id();
    assert!(ledger.prewarm(id, &on_sale(capacity, per_user_limit, hold_ttl_ms)).await.unwrap());
    id
}

fn rand_id() -> u64 {
    // Far above any id MySQL hands out locally, and unique per test.
    (Uuid::new_v4().as_u128() as u64 >> 8) | (1 << 60)
}

fn intent(user: &str, quantity: u32) -> (Uuid, String, u32) {
    (Uuid::new_v4(), user.to_owned(), quantity)
}

async fn decide(ledger: &Ledger, event: u64, intents: &[(Uuid, String, u32)]) -> Vec<Verdict> {
    let undecided: Vec<Undecided<'_>> =
        intents.iter().map(|(id, u, q)| Undecided { intent_id: *id, user_id: u, quantity: *q }).collect();
    ledger.allocate(event, &undecided).await.unwrap()
}

async fn levels(ledger: &Ledger, event: u64) -> StockLevels {
    let l = ledger.levels(event).await.unwrap().unwrap();
    assert!(l.is_conserved(), "available + held + sold != capacity: {l:?}");
    l
}

fn is_held(v: &Verdict) -> bool {
    matches!(v, Verdict::Held { .. })
}

/// Polls `expire` until the hold's deadline has passed by the ledger's clock.
async fn expire_when_due(ledger: &Ledger, event: u64, order: Uuid) -> EndOutcome {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match ledger.expire(event, order).await.unwrap() {
            EndOutcome::NotDue { remaining_ms } => {
                assert!(tokio::time::Instant::now() < deadline, "hold never became due");
                tokio::time::sleep(Duration::from_millis(remaining_ms.max(1))).await;
            }
            other => return other,
        }
    }
}

#[tokio::test]
async fn two_buyers_racing_for_the_last_ticket_get_one_hold() {
    let ledger = ledger();
    let event = event(&ledger, 1, 1, 60_000).await;
    let a = intent("alice", 1);
    let b = intent("bob", 1);
    let (a, b) = ([a], [b]);
    let (va, vb) = tokio::join!(decide(&ledger, event, &a), decide(&ledger, event, &b));
    let held = [&va[0], &vb[0]].iter().filter(|v| is_held(v)).count();
    assert_eq!(held, 1, "{va:?} {vb:?}");
    let loser = if is_held(&va[0]) { &vb[0] } else { &va[0] };
    assert!(matches!(loser, Verdict::Rejected { reason: RejectReason::SoldOut, .. }));
    assert_eq!(levels(&ledger, event).await, StockLevels { capacity: 1, allowance: 0, available: 0, held: 1, sold: 0 });
}

#[tokio::test]
async fn a_flood_in_many_batches_never_oversells() {
    let ledger = ledger();
    let event = event(&ledger, 50, 2, 60_000).await;
    let mut tasks = Vec::new();
    for batch in 0..20 {
        let ledger = ledger.clone();
        tasks.push(tokio::spawn(async move {
            let intents: Vec<_> = (0..25).map(|i| intent(&format!("u{batch}-{i}"), 1 + (i % 2))).collect();
            let verdicts = decide(&ledger, event, &intents).await;
            intents.iter().zip(verdicts).filter(|(_, v)| is_held(v)).map(|(c, _)| c.2 as u64).sum::<u64>()
        }));
    }
    let mut units = 0;
    for t in tasks {
        units += t.await.unwrap();
    }
    assert_eq!(units, 50, "exactly the capacity is held");
    assert_eq!(levels(&ledger, event).await.held, 50);
}

#[tokio::test]
async fn a_redelivered_intent_gets_its_first_decision_and_takes_stock_once() {
    let ledger = ledger();
    let event = event(&ledger, 5, 4, 60_000).await;
    let c = intent("carol", 2);
    let first = decide(&ledger, event, std::slice::from_ref(&c)).await;
    // Again alone, and again twice inside one batch.
    let again = decide(&ledger, event, std::slice::from_ref(&c)).await;
    let twice = decide(&ledger, event, &[c.clone(), c.clone()]).await;
    assert!(is_held(&first[0]));
    assert_eq!(first, again);
    assert_eq!(twice, vec![first[0].clone(), first[0].clone()]);
    assert_eq!(levels(&ledger, event).await, StockLevels { capacity: 5, allowance: 0, available: 3, held: 2, sold: 0 });
    assert_eq!(ledger.user_units(event, "carol").await.unwrap(), 2);
}

#[tokio::test]
async fn the_per_user_limit_counts_holds_and_purchases() {
    let ledger = ledger();
    let event = event(&ledger, 100, 3, 60_000).await;
    let v = decide(&ledger, event, &[intent("dave", 2), intent("dave", 2), intent("dave", 1), intent("erin", 3)]).await;
    assert!(is_held(&v[0]));
    assert!(matches!(v[1], Verdict::Rejected { reason: RejectReason::LimitReached, .. }));
    assert!(is_held(&v[2]), "2 + 1 is within the limit of 3");
    assert!(is_held(&v[3]), "another buyer has their own limit");
    assert_eq!(ledger.user_units(event, "dave").await.unwrap(), 3);
}

#[tokio::test]
async fn a_sale_not_yet_open_or_closed_rejects_and_takes_nothing() {
    let ledger = ledger();
    let id = rand_id();
    let future = SaleRules {
        capacity: 10,
        oversell_allowance: 0,
        per_user_limit: 2,
        hold_ttl_ms: 60_000,
        opens_at_ms: now_ms() + 60_000,
        closes_at_ms: now_ms() + 120_000,
        price_cents: 100,
        retain_until_ms: now_ms() + 600_000,
        paused: false,
    };
    ledger.prewarm(id, &future).await.unwrap();
    let v = decide(&ledger, id, &[intent("fay", 1)]).await;
    assert!(matches!(v[0], Verdict::Rejected { reason: RejectReason::SaleNotOpen, .. }));
    let closed_id = rand_id();
    let closed = SaleRules { opens_at_ms: now_ms() - 120_000, closes_at_ms: now_ms() - 60_000, ..future };
    ledger.prewarm(closed_id, &closed).await.unwrap();
    let v = decide(&ledger, closed_id, &[intent("fay", 1)]).await;
    assert!(matches!(v[0], Verdict::Rejected { reason: RejectReason::SaleClosed, .. }));
    assert_eq!(levels(&ledger, id).await.available, 10);
    assert_eq!(levels(&ledger, closed_id).await.available, 10);
}

#[tokio::test]
async fn prewarming_twice_never_resets_a_live_ledger() {
    let ledger = ledger();
    let event = event(&ledger, 3, 3, 60_000).await;
    decide(&ledger, event, &[intent("gus", 2)]).await;
    let rules = SaleRules {
        capacity: 3,
        oversell_allowance: 0,
        per_user_limit: 3,
        hold_ttl_ms: 60_000,
        opens_at_ms: 0,
        closes_at_ms: now_ms() + 1,
        price_cents: 1,
        retain_until_ms: now_ms() + 600_000,
        paused: false,
    };
    assert!(!ledger.prewarm(event, &rules).await.unwrap());
    assert_eq!(levels(&ledger, event).await.available, 1);
}

#[tokio::test]
async fn an_intent_for_an_event_without_a_ledger_is_not_decided() {
    let ledger = ledger();
    let c = intent("hal", 1);
    let err =
        ledger.allocate(rand_id(), &[Undecided { intent_id: c.0, user_id: &c.1, quantity: 1 }]).await.unwrap_err();
    assert!(matches!(err, dropline::stock::LedgerError::NoLedger(_)), "{err}");
}

#[tokio::test]
async fn cancel_returns_the_stock_at_once_and_only_once() {
    let ledger = ledger();
    let event = event(&ledger, 2, 2, 60_000).await;
    let c = intent("ivy", 2);
    decide(&ledger, event, std::slice::from_ref(&c)).await;
    assert_eq!(ledger.cancel(event, c.0, "mallory").await.unwrap(), EndOutcome::UnknownOrder, "not her order");
    let EndOutcome::Ended(h) = ledger.cancel(event, c.0, "ivy").await.unwrap() else { panic!() };
    assert_eq!(h.state, OrderState::Cancelled);
    let EndOutcome::Ended(h) = ledger.cancel(event, c.0, "ivy").await.unwrap() else { panic!() };
    assert_eq!(h.state, OrderState::Cancelled);
    assert_eq!(levels(&ledger, event).await, StockLevels { capacity: 2, allowance: 0, available: 2, held: 0, sold: 0 });
    assert_eq!(ledger.user_units(event, "ivy").await.unwrap(), 0);
    // The stock can be bought again, and a payment for the cancelled hold
    // is a refund.
    assert!(is_held(&decide(&ledger, event, &[intent("jon", 2)]).await[0]));
    assert!(matches!(ledger.pay(event, c.0, "pay-1").await.unwrap(), PayOutcome::Refund(_)));
    assert_eq!(levels(&ledger, event).await.sold, 0);
}

#[tokio::test]
async fn a_payment_in_time_sells_and_a_redelivered_one_is_the_same_payment() {
    let ledger = ledger();
    let event = event(&ledger, 2, 2, 60_000).await;
    let c = intent("kim", 1);
    decide(&ledger, event, std::slice::from_ref(&c)).await;
    let PayOutcome::Paid(h) = ledger.pay(event, c.0, "pay-1").await.unwrap() else { panic!() };
    assert_eq!(h.state, OrderState::Paid);
    assert_eq!(h.amount_cents, 2_500);
    assert!(matches!(ledger.pay(event, c.0, "pay-1").await.unwrap(), PayOutcome::Paid(_)));
    // A second, different payment for the same order must be refunded.
    assert!(matches!(ledger.pay(event, c.0, "pay-2").await.unwrap(), PayOutcome::Refund(_)));
    assert_eq!(levels(&ledger, event).await, StockLevels { capacity: 2, allowance: 0, available: 1, held: 0, sold: 1 });
    // Paid holds are not expired or cancelled.
    let EndOutcome::Ended(h) = expire_when_due(&ledger, event, c.0).await else { panic!() };
    assert_eq!(h.state, OrderState::Paid);
    assert_eq!(ledger.cancel(event, c.0, "kim").await.unwrap(), EndOutcome::Ended(h));
}

#[tokio::test]
async fn a_payment_after_expiry_is_a_refund_and_the_stock_comes_back_once() {
    let ledger = ledger();
    let event = event(&ledger, 1, 1, 30).await;
    let c = intent("lee", 1);
    decide(&ledger, event, std::slice::from_ref(&c)).await;
    let EndOutcome::Ended(h) = expire_when_due(&ledger, event, c.0).await else { panic!() };
    assert_eq!(h.state, OrderState::Expired);
    let PayOutcome::Refund(h) = ledger.pay(event, c.0, "late").await.unwrap() else { panic!() };
    assert_eq!(h.state, OrderState::Expired);
    // Expiring again changes nothing.
    expire_when_due(&ledger, event, c.0).await;
    assert_eq!(levels(&ledger, event).await, StockLevels { capacity: 1, allowance: 0, available: 1, held: 0, sold: 0 });
}

#[tokio::test]
async fn a_payment_racing_the_expiry_ends_the_hold_exactly_once() {
    let ledger = ledger();
    for _ in 0..20 {
        let event = event(&ledger, 1, 1, 5).await;
        let c = intent("max", 1);
        decide(&ledger, event, std::slice::from_ref(&c)).await;
        // Race the payment against the expirer around the deadline.
        let (paid, expired) = tokio::join!(ledger.pay(event, c.0, "p"), expire_when_due(&ledger, event, c.0));
        let paid = paid.unwrap();
        let EndOutcome::Ended(final_hold) = expired else { panic!() };
        let l = levels(&ledger, event).await;
        match paid {
            PayOutcome::Paid(_) => {
                assert_eq!(final_hold.state, OrderState::Paid);
                assert_eq!(l, StockLevels { capacity: 1, allowance: 0, available: 0, held: 0, sold: 1 });
            }
            PayOutcome::Refund(_) => {
                assert_eq!(final_hold.state, OrderState::Expired);
                assert_eq!(l, StockLevels { capacity: 1, allowance: 0, available: 1, held: 0, sold: 0 });
            }
            PayOutcome::UnknownOrder => panic!("the hold exists"),
        }
    }
}

#[tokio::test]
async fn a_payment_after_the_deadline_expires_the_hold_itself() {
    let ledger = ledger();
    let event = event(&ledger, 1, 1, 20).await;
    let c = intent("ned", 1);
    decide(&ledger, event, std::slice::from_ref(&c)).await;
    // Wait until the ledger's clock is past the deadline without expiring.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let h = ledger.hold(event, c.0).await.unwrap().unwrap();
        let t: (i64, i64) = dropline::redis_pool::redis::cmd("TIME")
            .query_async(&mut ledger.pool().get().await.unwrap())
            .await
            .unwrap();
        if t.0 * 1000 + t.1 / 1000 > h.expires_at_ms {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let PayOutcome::Refund(h) = ledger.pay(event, c.0, "late").await.unwrap() else { panic!() };
    assert_eq!(h.state, OrderState::Expired);
    assert_eq!(levels(&ledger, event).await.available, 1);
}

fn units_of(v: &Verdict) -> Vec<u32> {
    match v {
        Verdict::Held { units, .. } => units.clone(),
        Verdict::Rejected { .. } => Vec::new(),
    }
}

#[tokio::test]
async fn every_held_unit_has_its_own_number_within_capacity() {
    let ledger = ledger();
    let event = event(&ledger, 7, 3, 60_000).await;
    let intents: Vec<_> = (0..6).map(|i| intent(&format!("u{i}"), 2)).collect();
    let verdicts = decide(&ledger, event, &intents).await;
    let mut units: Vec<u32> = verdicts.iter().flat_map(units_of).collect();
    // Three holds of two, then one unit left: the fourth is sold out.
    assert_eq!(verdicts.iter().filter(|v| is_held(v)).count(), 3);
    units.sort_unstable();
    assert_eq!(units, vec![1, 2, 3, 4, 5, 6]);
    for (id, _, _) in intents.iter().take(3) {
        let hold = ledger.hold(event, *id).await.unwrap().unwrap();
        assert_eq!(hold.units.len(), 2);
    }
    assert_eq!(ledger.damage(event).await.unwrap(), None);
}

#[tokio::test]
async fn an_oversell_allowance_sells_that_many_units_more_and_no_more() {
    let ledger = ledger();
    let event = event(&ledger, 4, 2, 60_000).await;
    // The host accepts to oversell 2 of 4: six units, numbered 1 to 6.
    let rules = |capacity, oversell_allowance| SaleRules { oversell_allowance, ..on_sale(capacity, 2, 60_000) };
    assert_eq!(ledger.resize(event, &rules(4, 2)).await.unwrap(), Resized::To { sellable: 6, available: 6 });
    let intents: Vec<_> = (0..4).map(|i| intent(&format!("u{i}"), 2)).collect();
    let verdicts = decide(&ledger, event, &intents).await;
    let mut units: Vec<u32> = verdicts.iter().flat_map(units_of).collect();
    units.sort_unstable();
    assert_eq!(units, vec![1, 2, 3, 4, 5, 6]);
    assert!(matches!(verdicts[3], Verdict::Rejected { reason: RejectReason::SoldOut, .. }), "{verdicts:?}");
    let l = levels(&ledger, event).await;
    assert_eq!(l, StockLevels { capacity: 4, allowance: 2, available: 0, held: 6, sold: 0 });
    assert_eq!((l.sellable(), l.oversold()), (6, 2));
    // Taking the allowance back would drop units handed out: refused, and
    // nothing changed. Moving it into the capacity keeps the six.
    assert_eq!(ledger.resize(event, &rules(4, 0)).await.unwrap(), Resized::InUse { handed_out: 6 });
    assert_eq!(ledger.resize(event, &rules(5, 1)).await.unwrap(), Resized::To { sellable: 6, available: 0 });
    let l = levels(&ledger, event).await;
    assert_eq!((l.capacity, l.allowance, l.oversold()), (5, 1, 1));
    // More allowance is more to sell, at once.
    assert_eq!(ledger.resize(event, &rules(5, 2)).await.unwrap(), Resized::To { sellable: 7, available: 1 });
    let v = decide(&ledger, event, &[intent("u9", 1)]).await;
    assert_eq!(units_of(&v[0]), vec![7]);
    assert_eq!(ledger.damage(event).await.unwrap(), None);
}

#[tokio::test]
async fn released_units_are_handed_out_again_and_paid_ones_never() {
    let ledger = ledger();
    let event = event(&ledger, 3, 3, 60_000).await;
    let (a, b) = (intent("alice", 2), intent("bob", 1));
    let v = decide(&ledger, event, &[a.clone(), b.clone()]).await;
    let (units_a, units_b) = (units_of(&v[0]), units_of(&v[1]));
    ledger.cancel(event, a.0, "alice").await.unwrap();
    assert!(matches!(ledger.pay(event, b.0, "pay-b").await.unwrap(), PayOutcome::Paid(_)));
    let c = intent("carol", 2);
    let v = decide(&ledger, event, std::slice::from_ref(&c)).await;
    let mut units_c = units_of(&v[0]);
    units_c.sort_unstable();
    assert_eq!(units_c, units_a, "carol gets alice's released units");
    assert!(!units_c.iter().any(|u| units_b.contains(u)), "never bob's paid unit");
    let sold_out = decide(&ledger, event, &[intent("dave", 1)]).await;
    assert!(matches!(sold_out[0], Verdict::Rejected { reason: RejectReason::SoldOut, .. }), "{sold_out:?}");
    assert_eq!(ledger.damage(event).await.unwrap(), None);
}

#[tokio::test]
async fn a_fence_is_renewed_restored_under_and_lifted_only_by_its_owner() {
    let ledger = ledger();
    let id = event(&ledger, 10, 2, 60_000).await;
    let fence = ledger.fence(id, 30).await.unwrap().expect("the event was not fenced");
    assert!(ledger.fence(id, 30).await.unwrap().is_none(), "a second rebuild must not fence again");
    assert!(ledger.renew_fence(&fence, 30).await.unwrap());

    // The fence expires (a rebuild that stalled) and another rebuild takes
    // it: the first may neither renew, restore under, nor lift it.
    let mut conn = ledger.pool().get().await.unwrap();
    let key = dropline::stock::EventKeys::new("dltest", id).fence;
    let _: () = dropline::redis_pool::redis::cmd("DEL").arg(&key).query_async(&mut conn).await.unwrap();
    let second = ledger.fence(id, 30).await.unwrap().expect("the expired fence is free");
    assert!(!ledger.renew_fence(&fence, 30).await.unwrap());
    let restore = dropline::stock::Restore { rules: on_sale(10, 2, 60_000), holds: Vec::new(), decisions: Vec::new() };
    let before = ledger.levels(id).await.unwrap();
    let lost = ledger.restore(&fence, &restore).await;
    assert!(matches!(lost, Err(dropline::stock::LedgerError::FenceLost(e)) if e == id), "{lost:?}");
    assert_eq!(ledger.levels(id).await.unwrap(), before, "a restore without its fence changed the ledger");
    assert!(!ledger.unfence(&fence).await.unwrap());
    let still: Option<String> = dropline::redis_pool::redis::cmd("GET").arg(&key).query_async(&mut conn).await.unwrap();
    assert!(still.is_some(), "the first rebuild lifted the second one's fence");

    // Its owner restores. A cluster client resends a call whose answer it
    // lost (to a newly promoted primary, say): the commit sent again after
    // it applied changes nothing and still reports the rebuild in place.
    ledger.restore(&second, &restore).await.unwrap();
    let restored = ledger.levels(id).await.unwrap();
    let token: String = dropline::redis_pool::redis::cmd("GET").arg(&key).query_async(&mut conn).await.unwrap();
    let keys = dropline::stock::EventKeys::new("dltest", id);
    let staged: Vec<String> = keys.rebuilt().iter().map(|k| format!("{k}:restore:{token}")).collect();
    let resent: i64 = dropline::redis_pool::redis::Script::new(include_str!("../src/stock/lua/commit.lua"))
        .key(&keys.fence)
        .key(&keys.rebuilt())
        .key(&staged)
        .arg(&token)
        .arg(now_ms() + 600_000)
        .invoke_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(resent, 1, "a resent commit reports the rebuild in place");
    assert_eq!(ledger.levels(id).await.unwrap(), restored, "a resent commit changed the ledger");
    assert_eq!(restored.map(|l| l.available), Some(10));
    assert!(ledger.unfence(&second).await.unwrap());
    let held = decide(&ledger, id, &[intent("erin", 2)]).await;
    assert!(is_held(&held[0]), "the restored ledger decides: {held:?}");
    assert!(ledger.fence(id, 30).await.unwrap().is_some());
}

#[tokio::test]
async fn in_flight_marks_count_until_published_or_stale() {
    let ledger = ledger();
    let id = event(&ledger, 10, 2, 60_000).await;
    assert_eq!(ledger.in_flight(id, 5_000).await.unwrap(), 0);
    ledger.publishing(id, "allocator-a").await.unwrap();
    ledger.publishing(id, "allocator-b").await.unwrap();
    assert_eq!(ledger.in_flight(id, 5_000).await.unwrap(), 2);
    ledger.published(id, "allocator-a").await.unwrap();
    assert_eq!(ledger.in_flight(id, 5_000).await.unwrap(), 1);
    // A mark not renewed within the grace belongs to a dead allocator (with
    // no grace at all, every mark is stale).
    assert_eq!(ledger.in_flight(id, 0).await.unwrap(), 0);
}

#[tokio::test]
async fn a_refusal_at_the_door_decides_its_intent_and_never_contradicts_a_decision() {
    let ledger = ledger();
    let event = event(&ledger, 5, 2, 60_000).await;
    // Refused at the door while a copy of the intent is still on Kafka: the
    // copy is rejected for the door's reason, with stock to spare.
    let refused = intent("amy", 1);
    let door = ledger.refuse_at_door(event, refused.0, RejectReason::SoldOut).await.unwrap();
    assert_eq!(door, DoorOutcome::Refused(RejectReason::SoldOut));
    // A second refusal keeps the first reason.
    let again = ledger.refuse_at_door(event, refused.0, RejectReason::SaleClosed).await.unwrap();
    assert_eq!(again, DoorOutcome::Refused(RejectReason::SoldOut));
    let verdicts = decide(&ledger, event, &[refused.clone(), intent("ben", 1)]).await;
    assert!(matches!(verdicts[0], Verdict::Rejected { reason: RejectReason::SoldOut, .. }), "{verdicts:?}");
    assert!(is_held(&verdicts[1]));
    assert_eq!(levels(&ledger, event).await.held, 1);

    // An intent decided before is never refused at the door: its decision
    // comes back and nothing is recorded.
    let held = intent("cat", 1);
    let first = decide(&ledger, event, std::slice::from_ref(&held)).await;
    let door = ledger.refuse_at_door(event, held.0, RejectReason::SoldOut).await.unwrap();
    assert_eq!(door, DoorOutcome::Decided(first[0].clone()));
    assert_eq!(decide(&ledger, event, &[held]).await, first);

    // Without a ledger the door cannot know, and refuses nothing.
    let err = ledger.refuse_at_door(rand_id(), Uuid::new_v4(), RejectReason::SoldOut).await.unwrap_err();
    assert!(matches!(err, LedgerError::NoLedger(_)), "{err}");
}

#[derive(clap::Parser)]
struct RedisOnly {
    #[command(flatten)]
    redis: dropline::config::RedisArgs,
}

/// A caller waiting for a connection from a full pool gives up after the
/// wait timeout instead of queueing forever.
#[tokio::test]
async fn a_full_redis_pool_times_out_its_waiters() {
    use clap::Parser;
    let args = RedisOnly::parse_from([
        "t".to_owned(),
        format!("--redis-url={}", redis_url()),
        "--redis-pool-size=1".to_owned(),
        "--redis-pool-wait-timeout-ms=100".to_owned(),
    ])
    .redis;
    let pool = args.pool().unwrap();
    let _held = pool.get().await.expect("the local Redis is up");
    let started = std::time::Instant::now();
    let waited = tokio::time::timeout(Duration::from_secs(3), pool.get()).await.expect("the wait is bounded");
    assert!(matches!(waited, Err(dropline::redis_pool::PoolError::Timeout(dropline::redis_pool::TimeoutType::Wait))));
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
}

/// A pooled connection is trusted for a second after its last check, so a
/// Redis call costs no extra round trip; one that broke meanwhile fails one
/// call, and the next checkout checks it and opens another.
#[tokio::test]
async fn a_pooled_connection_that_broke_is_replaced_at_its_next_checkout() {
    use dropline::redis_pool::{redis, CHECK_EVERY};
    // One connection to one node, cluster or not: the test kills it by id.
    let pool = dropline::config::RedisArgs::new(redis_url(), 1).pool().unwrap();
    let client_id = |mut conn: dropline::redis_pool::Connection| async move {
        redis::cmd("CLIENT").arg("ID").query_async::<i64>(&mut conn).await
    };
    // The connection is opened (and so checked) after this.
    let trusted_until = std::time::Instant::now() + CHECK_EVERY;
    let first = client_id(pool.get().await.unwrap()).await.unwrap();
    // Killed from outside, as a Redis restart or a proxy would.
    let mut killer = redis::Client::open(redis_url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let killed: i64 = redis::cmd("CLIENT").arg("KILL").arg("ID").arg(first).query_async(&mut killer).await.unwrap();
    assert_eq!(killed, 1);
    // Within the second it is handed out unchecked, and its call fails
    // (on a machine slow enough to pass the second, it was checked and
    // replaced already: the call then succeeds on a new connection).
    let unchecked = client_id(pool.get().await.unwrap()).await;
    if std::time::Instant::now() < trusted_until {
        assert!(unchecked.is_err(), "a killed connection answered: {unchecked:?}");
    }
    // The failure marked it: the next checkout checks it at once, finds it
    // dead and opens another, without waiting out the second.
    let second = client_id(pool.get().await.unwrap()).await.unwrap();
    assert_ne!(second, first);
}

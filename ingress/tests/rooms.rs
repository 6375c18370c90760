//! Waiting rooms against the real Redis, MariaDB and broker: a pre-queue
//! drawn at the opening and checked against its published seed, buyers let
//! through in drawn order while stock remains, turns that run out, the
//! purchase path refusing whoever has no turn, and bad input on every new
//! endpoint.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::Ingress;
use dropline::room::draw::{self, PublishedDraw};
use dropline_testkit::{event_body, eventually, http, refused};
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

/// Seconds from now to a sale's opening: the room must be set at least 5 s
/// before it.
const OPENS_IN: i64 = 7;

/// An event opening in [`OPENS_IN`] s with a room whose pre-queue is open.
async fn event_with_room(stack: &Ingress, capacity: u32, outflow: u32, time_to_act: u32) -> u64 {
    let mut body = event_body(OPENS_IN);
    body["capacity"] = json!(capacity);
    body["per_user_limit"] = json!(1);
    let event = stack.create_event(&body).await;
    let room = json!({
        "prequeue_opens_at": chrono::Utc::now() - chrono::Duration::seconds(1),
        "outflow_per_sec": outflow,
        "time_to_act_secs": time_to_act,
    });
    let r = set_room(stack, event, &room).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    event
}

async fn set_room(stack: &Ingress, event: u64, room: &Value) -> reqwest::Response {
    http()
        .put(format!("{}/v1/admin/events/{event}/waiting-room", stack.api))
        .bearer_auth(stack.admin_token())
        .json(room)
        .send()
        .await
        .unwrap()
}

async fn get_json(req: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let r = req.send().await.unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn join(stack: &Ingress, event: u64, user: &str) -> (StatusCode, Value) {
    get_json(http().post(format!("{}/v1/events/{event}/queue", stack.api)).bearer_auth(stack.token(user))).await
}

async fn standing(stack: &Ingress, event: u64, user: &str) -> Value {
    let (status, body) =
        get_json(http().get(format!("{}/v1/events/{event}/queue", stack.api)).bearer_auth(stack.token(user))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

async fn room(stack: &Ingress, event: u64) -> Value {
    let (status, body) = get_json(http().get(format!("{}/v1/events/{event}/waiting-room", stack.api))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

fn purchase(stack: &Ingress, event: u64, user: &str, key: &str, admission: Option<&str>) -> reqwest::RequestBuilder {
    let req = stack.purchase(&http(), event, user, key);
    match admission {
        Some(token) => req.header("dropline-admission", token),
        None => req,
    }
}

/// Waits for the room's draw; the draw as published.
async fn published_draw(stack: &Ingress, event: u64) -> PublishedDraw {
    eventually("the draw", Duration::from_secs(20), || async {
        let r = http().get(format!("{}/v1/events/{event}/waiting-room/draw", stack.api)).send().await.unwrap();
        if r.status() == StatusCode::OK {
            Some(r.json().await.unwrap())
        } else {
            None
        }
    })
    .await
}

/// `users` in the order the draw placed them.
async fn in_drawn_order<'a>(stack: &Ingress, event: u64, draw: &PublishedDraw, users: &[&'a str]) -> Vec<&'a str> {
    let mut by_ticket = HashMap::new();
    for user in users {
        let ticket = standing(stack, event, user).await["ticket_id"].as_str().unwrap().parse::<Uuid>().unwrap();
        by_ticket.insert(ticket, *user);
    }
    draw.order.iter().map(|t| by_ticket[t]).collect()
}

/// Waits until `user` is admitted; their admission token.
async fn admitted(stack: &Ingress, event: u64, user: &str) -> String {
    eventually(&format!("{user} admitted"), Duration::from_secs(30), || async {
        let s = standing(stack, event, user).await;
        (s["status"] == "admitted").then(|| s["admission_token"].as_str().unwrap().to_owned())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pre_queue_is_drawn_verifiably_and_let_through_in_drawn_order_while_stock_remains() {
    const BUYERS: usize = 40;
    const CAPACITY: u64 = 5;
    let stack = Ingress::start(&[]).await;
    let event = event_with_room(&stack, CAPACITY as u32, 50, 60).await;
    let before = room(&stack, event).await;
    assert_eq!(before["phase"], "pre_queue", "{before}");
    let commitment = before["seed_commitment"].as_str().unwrap().to_owned();
    assert!(before.get("seed").is_none(), "the seed is secret until the draw: {before}");

    let users: Vec<String> = (0..BUYERS).map(|i| format!("fan-{i}")).collect();
    let mut tickets = HashMap::new();
    for user in &users {
        let (status, body) = join(&stack, event, user).await;
        assert_eq!((status, body["status"].as_str()), (StatusCode::CREATED, Some("pre_queue")), "{body}");
        tickets.insert(user.clone(), body["ticket_id"].as_str().unwrap().parse::<Uuid>().unwrap());
    }
    // Joining again is the same ticket.
    let (status, again) = join(&stack, event, &users[0]).await;
    assert_eq!((status, again["ticket_id"].as_str()), (StatusCode::OK, Some(tickets[&users[0]].to_string().as_str())));
    assert_eq!(room(&stack, event).await["pre_queue"], BUYERS);
    refused(
        http().get(format!("{}/v1/events/{event}/waiting-room/draw", stack.api)),
        StatusCode::CONFLICT,
        "draw_not_done",
    )
    .await;
    // No turn, no purchase: the queue cannot be bypassed.
    refused(purchase(&stack, event, &users[0], "early", None), StatusCode::FORBIDDEN, "admission_required").await;

    // The opening: the draw is published and checks out.
    let published = published_draw(&stack, event).await;
    assert_eq!(draw::verify(&published), Ok(()));
    assert_eq!(published.seed_commitment, commitment, "the commitment published before the pre-queue");
    let mut drawn = published.order.clone();
    drawn.sort_unstable();
    let mut joined: Vec<Uuid> = tickets.values().copied().collect();
    joined.sort_unstable();
    assert_eq!(drawn, joined, "the draw covers exactly the pre-queue");
    assert_eq!(published.list_hash, draw::list_hash(&joined), "a buyer can check their ticket is in the list");
    let after = room(&stack, event).await;
    assert_eq!(
        (after["list_hash"].as_str(), after["entrants"].as_u64()),
        (Some(published.list_hash.as_str()), Some(BUYERS as u64))
    );

    // Every buyer's place is their place in the published order.
    let place_of: HashMap<Uuid, u64> = published.order.iter().enumerate().map(|(i, t)| (*t, i as u64 + 1)).collect();
    let by_place: Vec<&String> = {
        let mut v: Vec<&String> = users.iter().collect();
        v.sort_by_key(|u| place_of[&tickets[*u]]);
        v
    };

    // A late arrival goes to the back.
    let (status, late) = join(&stack, event, "late-fan").await;
    assert_eq!(status, StatusCode::CREATED, "{late}");
    assert_eq!(late["place"], BUYERS as u64 + 1, "{late}");

    // Buyers are let through in drawn order, no more at once than the
    // stock: the first five, and never the sixth while they hold it.
    let first_five = eventually("five turns given", Duration::from_secs(20), || async {
        let r = room(&stack, event).await;
        assert!(r["now_serving"].as_u64().unwrap() <= CAPACITY, "more turns than units: {r}");
        (r["now_serving"] == CAPACITY).then_some(r)
    })
    .await;
    for (i, user) in by_place.iter().enumerate() {
        let s = standing(&stack, event, user).await;
        assert_eq!(s["place"], i as u64 + 1, "{s}");
        let expected = if (i as u64) < CAPACITY { "admitted" } else { "waiting" };
        assert_eq!(s["status"], expected, "{user} at place {}: {s} (room {first_five})", i + 1);
        if expected == "waiting" {
            assert_eq!(s["ahead"], i as u64 - CAPACITY, "{s}");
            assert!(s["estimated_wait_secs"].as_u64().is_some(), "{s}");
        }
    }

    // The first buyer buys with their turn; others' and forged turns fail.
    let first = by_place[0];
    let token = admitted(&stack, event, first).await;
    let second_token = admitted(&stack, event, by_place[1]).await;
    refused(purchase(&stack, event, first, "theirs", Some(&second_token)), StatusCode::FORBIDDEN, "admission_invalid")
        .await;
    let forged = format!("{}x", &token[..token.len() - 1]);
    refused(purchase(&stack, event, first, "forged", Some(&forged)), StatusCode::FORBIDDEN, "admission_invalid").await;
    refused(purchase(&stack, event, first, "no-turn", None), StatusCode::FORBIDDEN, "admission_required").await;
    let bought = purchase(&stack, event, first, "mine", Some(&token)).send().await.unwrap();
    assert_eq!(bought.status(), StatusCode::ACCEPTED);
    let again = purchase(&stack, event, first, "mine", Some(&token)).send().await.unwrap();
    assert_eq!(again.status(), StatusCode::ACCEPTED, "a retry with the key is answered the same");
    // A turn buys once: more units are asked for in that one purchase.
    refused(purchase(&stack, event, first, "more", Some(&token)), StatusCode::FORBIDDEN, "turn_used").await;
    assert_eq!(standing(&stack, event, first).await["status"], "purchased");

    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_not_taken_in_time_lapses_and_the_next_buyer_gets_it() {
    let stack = Ingress::start(&[]).await;
    let event = event_with_room(&stack, 1, 10, 2).await;
    for user in ["ann", "ben", "cat"] {
        assert_eq!(join(&stack, event, user).await.0, StatusCode::CREATED);
    }
    let published = published_draw(&stack, event).await;
    let order = in_drawn_order(&stack, event, &published, &["ann", "ben", "cat"]).await;

    // One unit: one turn at a time. The first lets it run out.
    let token = admitted(&stack, event, order[0]).await;
    let last_ahead = std::cell::Cell::new(u64::MAX);
    let next = eventually("the second buyer's turn", Duration::from_secs(20), || async {
        let s = standing(&stack, event, order[1]).await;
        if let Some(ahead) = s["ahead"].as_u64() {
            assert!(ahead <= last_ahead.get(), "a place went backwards: {s}");
            last_ahead.set(ahead);
        }
        (s["status"] == "admitted").then_some(s)
    })
    .await;
    // Read at once: the second's turn lasts 2 s.
    assert_eq!(standing(&stack, event, order[2]).await["status"], "waiting");
    assert!(next["turn_ends_at"].is_string(), "{next}");
    assert_eq!(standing(&stack, event, order[0]).await["status"], "lapsed");
    refused(purchase(&stack, event, order[0], "late", Some(&token)), StatusCode::FORBIDDEN, "turn_lapsed").await;

    // Who lost their turn may join again, at the back.
    let (status, rejoined) = join(&stack, event, order[0]).await;
    assert_eq!(status, StatusCode::CREATED, "{rejoined}");
    assert_eq!(rejoined["place"], 4, "{rejoined}");
    let first_ticket = published.order[0].to_string();
    assert_ne!(rejoined["ticket_id"].as_str(), Some(first_ticket.as_str()), "a new ticket: {rejoined}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_to_the_room_endpoints_are_refused_and_change_nothing() {
    let stack = Ingress::start(&[]).await;
    let api = stack.api.clone();
    let mut body = event_body(60);
    body["capacity"] = json!(3);
    let event = stack.create_event(&body).await;
    let put = |room: Value| {
        http().put(format!("{api}/v1/admin/events/{event}/waiting-room")).bearer_auth(stack.admin_token()).json(&room)
    };
    let valid = json!({
        "prequeue_opens_at": chrono::Utc::now() + chrono::Duration::seconds(30),
        "outflow_per_sec": 100, "time_to_act_secs": 120,
    });

    // Nothing set yet.
    refused(http().get(format!("{api}/v1/events/{event}/waiting-room")), StatusCode::NOT_FOUND, "no_waiting_room")
        .await;
    refused(
        http().post(format!("{api}/v1/events/{event}/queue")).bearer_auth(stack.token("amy")),
        StatusCode::NOT_FOUND,
        "no_waiting_room",
    )
    .await;
    refused(http().get(format!("{api}/v1/events/999999999/waiting-room")), StatusCode::NOT_FOUND, "event_not_found")
        .await;

    // Bad terms, each named.
    let mut bad = valid.clone();
    bad["outflow_per_sec"] = json!(0);
    bad["time_to_act_secs"] = json!(0);
    bad["prequeue_opens_at"] = json!(chrono::Utc::now() + chrono::Duration::seconds(120));
    bad["beacon"] = json!({"name": "", "round": 0});
    bad["proof_of_work_bits"] = json!(29);
    let answer = refused(put(bad), StatusCode::BAD_REQUEST, "invalid_body").await;
    assert_eq!(answer["errors"].as_array().unwrap().len(), 6, "{answer}");
    let mut unknown = valid.clone();
    unknown["seed"] = json!("00");
    refused(put(unknown), StatusCode::UNPROCESSABLE_ENTITY, "invalid_body_shape").await;
    refused(put(json!({"outflow_per_sec": "fast"})), StatusCode::UNPROCESSABLE_ENTITY, "invalid_body_shape").await;
    refused(
        http().put(format!("{api}/v1/admin/events/{event}/waiting-room")).bearer_auth(stack.token("amy")).json(&valid),
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;
    refused(http().get(format!("{api}/v1/events/{event}/waiting-room")), StatusCode::NOT_FOUND, "no_waiting_room")
        .await;

    // Set, idempotently; other terms are refused.
    assert_eq!(put(valid.clone()).send().await.unwrap().status(), StatusCode::CREATED);
    assert_eq!(put(valid.clone()).send().await.unwrap().status(), StatusCode::OK);
    let mut other = valid.clone();
    other["time_to_act_secs"] = json!(30);
    refused(put(other), StatusCode::CONFLICT, "waiting_room_exists").await;

    // The pre-queue is not open yet; nobody is in it.
    refused(
        http().post(format!("{api}/v1/events/{event}/queue")).bearer_auth(stack.token("amy")),
        StatusCode::CONFLICT,
        "queue_not_open",
    )
    .await;
    refused(
        http().get(format!("{api}/v1/events/{event}/queue")).bearer_auth(stack.token("amy")),
        StatusCode::NOT_FOUND,
        "not_in_queue",
    )
    .await;
    refused(http().post(format!("{api}/v1/events/{event}/queue")), StatusCode::UNAUTHORIZED, "unauthorized").await;

    // The outflow changes; nothing else does, and a bad one is refused.
    let patch = |change: Value| {
        http()
            .patch(format!("{api}/v1/admin/events/{event}/waiting-room"))
            .bearer_auth(stack.admin_token())
            .json(&change)
    };
    refused(patch(json!({"outflow_per_sec": 0})), StatusCode::BAD_REQUEST, "invalid_body").await;
    refused(patch(json!({"time_to_act_secs": 5})), StatusCode::UNPROCESSABLE_ENTITY, "invalid_body_shape").await;
    let (status, changed) = get_json(patch(json!({"outflow_per_sec": 7}))).await;
    assert_eq!((status, changed["outflow_per_sec"].as_u64()), (StatusCode::OK, Some(7)), "{changed}");
    let now = room(&stack, event).await;
    assert_eq!((now["outflow_per_sec"].as_u64(), now["time_to_act_secs"].as_u64()), (Some(7), Some(120)), "{now}");

    // Too late: an event already on sale cannot get a room.
    let on_sale = stack.create_event(&event_body(-5)).await;
    let late = http()
        .put(format!("{api}/v1/admin/events/{on_sale}/waiting-room"))
        .bearer_auth(stack.admin_token())
        .json(&json!({"prequeue_opens_at": chrono::Utc::now() - chrono::Duration::seconds(60), "outflow_per_sec": 1, "time_to_act_secs": 1}));
    refused(late, StatusCode::CONFLICT, "waiting_room_too_late").await;
    // ... and sells as before, no admission needed.
    let r = stack.purchase(&http(), on_sale, "amy", "k1").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    // A malformed admission header is refused as such.
    refused(
        stack.purchase(&http(), event, "amy", "k2").header("dropline-admission", "a b"),
        StatusCode::BAD_REQUEST,
        "invalid_header",
    )
    .await;
    stack.stop().await;
}

/// Waits until `user`'s ticket reads `status`.
async fn until_status(stack: &Ingress, event: u64, user: &str, status: &str) -> Value {
    eventually(&format!("{user} {status}"), Duration::from_secs(20), || async {
        let s = standing(stack, event, user).await;
        (s["status"] == status).then_some(s)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everyone_waiting_learns_of_the_sell_out_and_admission_resumes_when_stock_comes_back() {
    let stack = Ingress::start(&[]).await;
    let event = event_with_room(&stack, 2, 50, 60).await;
    let users = ["ada", "bea", "cy", "dee"];
    for user in users {
        assert_eq!(join(&stack, event, user).await.0, StatusCode::CREATED);
    }
    let published = published_draw(&stack, event).await;
    let order = in_drawn_order(&stack, event, &published, &users).await;

    // The two admitted buy. Until their purchases are decided, their units
    // stay spoken for: nobody else is let through. The allocator (not
    // running here) would decide them: the test does, with the ledger's own
    // script.
    let mut holds = Vec::new();
    for user in &order[..2] {
        let token = admitted(&stack, event, user).await;
        let r = purchase(&stack, event, user, "buy", Some(&token)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        let intent: Uuid = r.json::<Value>().await.unwrap()["intent_id"].as_str().unwrap().parse().unwrap();
        holds.push((intent, *user));
    }
    // One admission step (the keepers' own call) after both purchases, so
    // the check below does not hang on a keeper's timing.
    let rooms = dropline::room::Rooms::new(stack.ledger.pool().clone(), &stack.name);
    let step = rooms.advance(event, chrono::Utc::now().timestamp_millis()).await.unwrap();
    assert_eq!((step.admitted, step.now_serving), (0, 2), "units of undecided purchases are spoken for");
    let undecided: Vec<_> = holds
        .iter()
        .map(|(intent, user)| dropline::stock::Undecided { intent_id: *intent, user_id: user, quantity: 1 })
        .collect();
    let verdicts = stack.ledger.allocate(event, &undecided).await.unwrap();
    assert!(verdicts.iter().all(|v| matches!(v, dropline::stock::Verdict::Held { .. })), "{verdicts:?}");

    // Sold out: both still waiting learn it, and nobody is let through.
    for user in &order[2..] {
        let s = until_status(&stack, event, user, "sold_out").await;
        assert!(s.get("admission_token").is_none(), "{s}");
    }
    assert_eq!(room(&stack, event).await["now_serving"], 2);

    // A hold comes back: the next in line is let through, and only them.
    stack.ledger.cancel(event, holds[0].0, holds[0].1).await.unwrap();
    admitted(&stack, event, order[2]).await;
    let last = until_status(&stack, event, order[3], "waiting").await;
    assert_eq!(last["ahead"], 0, "{last}");
    assert_eq!(room(&stack, event).await["now_serving"], 3);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lottery_lets_all_its_winners_through_at_once_and_losers_move_up_as_turns_lapse() {
    const UNITS: u64 = 3;
    let stack = Ingress::start(&[]).await;
    let mut body = event_body(OPENS_IN);
    body["capacity"] = json!(UNITS);
    let event = stack.create_event(&body).await;
    let lottery = json!({
        "mode": "lottery",
        "prequeue_opens_at": chrono::Utc::now(),
        "outflow_per_sec": 1,
        "time_to_act_secs": 2,
    });
    assert_eq!(set_room(&stack, event, &lottery).await.status(), StatusCode::CREATED);
    assert_eq!(room(&stack, event).await["mode"], "lottery");
    let users: Vec<String> = (0..8).map(|i| format!("entrant-{i}")).collect();
    let mut by_ticket = HashMap::new();
    for user in &users {
        let (status, ticket) = join(&stack, event, user).await;
        assert_eq!((status, ticket["status"].as_str()), (StatusCode::CREATED, Some("pre_queue")), "{ticket}");
        by_ticket.insert(ticket["ticket_id"].as_str().unwrap().parse::<Uuid>().unwrap(), user.clone());
    }

    // At the draw every winner is let through in one step, though the
    // outflow is one a second.
    let serving = eventually("the winners let through", Duration::from_secs(20), || async {
        let r = room(&stack, event).await;
        (r["now_serving"].as_u64().unwrap() > 0).then(|| r["now_serving"].as_u64().unwrap())
    })
    .await;
    assert_eq!(serving, UNITS);
    let (_, published) = get_json(http().get(format!("{}/v1/events/{event}/waiting-room/draw", stack.api))).await;
    let published: PublishedDraw = serde_json::from_value(published).unwrap();
    assert_eq!(draw::verify(&published), Ok(()));
    let order: Vec<&String> = published.order.iter().map(|t| &by_ticket[t]).collect();
    for (i, user) in order.iter().enumerate() {
        let s = standing(&stack, event, user).await;
        // A winner's 2 s turn may have run out by the time it is read.
        let expected: &[&str] = if (i as u64) < UNITS { &["admitted", "lapsed"] } else { &["waitlisted"] };
        assert!(expected.contains(&s["status"].as_str().unwrap()), "{user} drawn {}: {s}", i + 1);
    }

    // Entries closed at the opening; an entrant gets their ticket back.
    refused(
        http().post(format!("{}/v1/events/{event}/queue", stack.api)).bearer_auth(stack.token("latecomer")),
        StatusCode::CONFLICT,
        "lottery_closed",
    )
    .await;
    assert_eq!(join(&stack, event, order[0]).await.0, StatusCode::OK);

    // The winners let their turns lapse: the first on the waiting list
    // moves up.
    admitted(&stack, event, order[UNITS as usize]).await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_that_asks_a_proof_of_work_lets_in_only_the_buyer_who_solved_their_own_challenge() {
    let stack = Ingress::start(&[]).await;
    let api = stack.api.clone();
    let event = stack.create_event(&event_body(60)).await;
    let terms = json!({
        "prequeue_opens_at": chrono::Utc::now(),
        "outflow_per_sec": 10, "time_to_act_secs": 60, "proof_of_work_bits": 12,
    });
    assert_eq!(set_room(&stack, event, &terms).await.status(), StatusCode::CREATED);
    assert_eq!(room(&stack, event).await["proof_of_work_bits"], 12);
    let challenge_of = |user: &str| {
        let req = http().get(format!("{api}/v1/events/{event}/queue/challenge")).bearer_auth(stack.token(user));
        async move {
            let (status, body) = get_json(req).await;
            assert_eq!((status, body["difficulty_bits"].as_u64()), (StatusCode::OK, Some(12)), "{body}");
            body["challenge"].as_str().unwrap().to_owned()
        }
    };
    let join_with = |user: &str, proof: &str| {
        http()
            .post(format!("{api}/v1/events/{event}/queue"))
            .bearer_auth(stack.token(user))
            .header("dropline-proof", proof)
    };

    refused(
        http().post(format!("{api}/v1/events/{event}/queue")).bearer_auth(stack.token("amy")),
        StatusCode::PRECONDITION_REQUIRED,
        "proof_required",
    )
    .await;
    let challenge = challenge_of("amy").await;
    let proof = dropline::room::proof::solve(&challenge, 12);
    // Someone else's solution, an unsolved nonce and a forged challenge.
    refused(join_with("bob", &proof), StatusCode::FORBIDDEN, "proof_invalid").await;
    let unsolved =
        (0u64..).map(|n| n.to_string()).find(|n| dropline::room::proof::zero_bits(&challenge, n) < 12).unwrap();
    refused(join_with("amy", &format!("{challenge}:{unsolved}")), StatusCode::FORBIDDEN, "proof_invalid").await;
    let forged = challenge.replacen(":12:", ":1:", 1);
    refused(join_with("amy", &dropline::room::proof::solve(&forged, 1)), StatusCode::FORBIDDEN, "proof_invalid").await;
    refused(join_with("amy", "not a proof"), StatusCode::BAD_REQUEST, "invalid_header").await;
    assert_eq!(room(&stack, event).await["pre_queue"], 0, "no refused join made a ticket");

    let r = join_with("amy", &proof).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let ticket = r.json::<Value>().await.unwrap()["ticket_id"].clone();
    assert_eq!(room(&stack, event).await["pre_queue"], 1);
    // Asking again for the ticket she holds needs no new proof.
    let (status, again) = join(&stack, event, "amy").await;
    assert_eq!((status, &again["ticket_id"]), (StatusCode::OK, &ticket), "{again}");

    // Harder now: a solution at the old difficulty no longer does.
    let patch = |change: Value| {
        http()
            .patch(format!("{api}/v1/admin/events/{event}/waiting-room"))
            .bearer_auth(stack.admin_token())
            .json(&change)
    };
    refused(patch(json!({"proof_of_work_bits": 40})), StatusCode::BAD_REQUEST, "invalid_body").await;
    refused(patch(json!({})), StatusCode::BAD_REQUEST, "invalid_body").await;
    let old = dropline::room::proof::solve(&challenge_of("cy").await, 12);
    let (status, changed) = get_json(patch(json!({"proof_of_work_bits": 14}))).await;
    assert_eq!((status, changed["proof_of_work_bits"].as_u64()), (StatusCode::OK, Some(14)), "{changed}");
    refused(join_with("cy", &old), StatusCode::FORBIDDEN, "proof_invalid").await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draw_that_names_a_beacon_round_waits_for_its_randomness_and_mixes_it_in() {
    let stack = Ingress::start(&[]).await;
    let api = stack.api.clone();
    let event = stack.create_event(&event_body(OPENS_IN)).await;
    let terms = json!({
        "prequeue_opens_at": chrono::Utc::now(),
        "outflow_per_sec": 10, "time_to_act_secs": 60,
        "beacon": {"name": "drand quicknet 52db9ba7", "round": 1234567},
    });
    assert_eq!(set_room(&stack, event, &terms).await.status(), StatusCode::CREATED);
    let named = room(&stack, event).await;
    assert_eq!(named["beacon"], json!({"name": "drand quicknet 52db9ba7", "round": 1234567}), "{named}");
    // Known before the list is fixed, the randomness would predict the order.
    let early = http()
        .put(format!("{api}/v1/admin/events/{event}/waiting-room/beacon"))
        .bearer_auth(stack.admin_token())
        .json(&json!({ "randomness": "c3".repeat(32) }));
    refused(early, StatusCode::CONFLICT, "beacon_too_early").await;
    let mut joined = Vec::new();
    for i in 0..12 {
        let (status, ticket) = join(&stack, event, &format!("b{i}")).await;
        assert_eq!(status, StatusCode::CREATED);
        joined.push(ticket["ticket_id"].as_str().unwrap().parse::<Uuid>().unwrap());
    }

    // The opening: the list is frozen and its hash published; the draw
    // waits for the round.
    let waiting = eventually("the list hash", Duration::from_secs(20), || async {
        let r = room(&stack, event).await;
        r["list_hash"].is_string().then_some(r)
    })
    .await;
    assert_eq!(waiting["phase"], "drawing", "{waiting}");
    assert_eq!(waiting["list_hash"].as_str(), Some(draw::list_hash(&joined).as_str()));
    assert!(waiting.get("seed").is_none(), "no seed before the draw: {waiting}");
    refused(http().get(format!("{api}/v1/events/{event}/waiting-room/draw")), StatusCode::CONFLICT, "draw_not_done")
        .await;

    let beacon = |randomness: &str| {
        http()
            .put(format!("{api}/v1/admin/events/{event}/waiting-room/beacon"))
            .bearer_auth(stack.admin_token())
            .json(&json!({ "randomness": randomness }))
    };
    refused(beacon("not hex"), StatusCode::BAD_REQUEST, "invalid_body").await;
    refused(beacon("abcd"), StatusCode::BAD_REQUEST, "invalid_body").await;
    refused(beacon(&"00".repeat(32)), StatusCode::BAD_REQUEST, "invalid_body").await;
    let randomness = "a1".repeat(32);
    assert_eq!(beacon(&randomness).send().await.unwrap().status(), StatusCode::OK);
    assert_eq!(beacon(&randomness).send().await.unwrap().status(), StatusCode::OK, "the same value again");
    refused(beacon(&"b2".repeat(32)), StatusCode::CONFLICT, "beacon_already_set").await;

    let published = published_draw(&stack, event).await;
    assert_eq!(published.beacon.as_ref().and_then(|b| b.randomness.as_deref()), Some(randomness.as_str()));
    assert_eq!(published.list_hash, waiting["list_hash"].as_str().unwrap(), "the list hash published before");
    assert_eq!(draw::verify(&published), Ok(()));
    let mut without = published.clone();
    without.beacon = None;
    assert!(draw::verify(&without).is_err(), "the order is not the seed's alone");

    // A room without a beacon takes no randomness.
    let plain = stack.create_event(&event_body(60)).await;
    let plain_terms = json!({"prequeue_opens_at": chrono::Utc::now(), "outflow_per_sec": 1, "time_to_act_secs": 60});
    assert_eq!(set_room(&stack, plain, &plain_terms).await.status(), StatusCode::CREATED);
    refused(
        http()
            .put(format!("{api}/v1/admin/events/{plain}/waiting-room/beacon"))
            .bearer_auth(stack.admin_token())
            .json(&json!({ "randomness": randomness })),
        StatusCode::CONFLICT,
        "no_beacon",
    )
    .await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_redis_lost_after_its_draw_comes_back_drawn_and_buyers_join_again_at_the_back() {
    let stack = Ingress::start(&[]).await;
    let event = event_with_room(&stack, 2, 10, 60).await;
    for user in ["eve", "fay"] {
        assert_eq!(join(&stack, event, user).await.0, StatusCode::CREATED);
    }
    eventually("the draw", Duration::from_secs(20), || async {
        (room(&stack, event).await["phase"] == "open").then_some(())
    })
    .await;

    // Redis loses the room (not the ledger).
    let keys = dropline::stock::Keys::new(&stack.name).room(event);
    let mut conn = stack.ledger.pool().get().await.unwrap();
    let lost =
        [&keys.conf, &keys.pre, &keys.line, &keys.users, &keys.admitted, &keys.ended, &keys.samples, &keys.pending];
    let _: i64 = dropline::redis_pool::redis::cmd("DEL").arg(&lost).query_async(&mut conn).await.unwrap();

    // The keepers set it up again from the record, drawn: the line moves
    // for whoever joins again. (Until they have, the room reads as a plain
    // open line with no draw: wait for the draw, not just the phase.)
    let back = eventually("the room set up again", Duration::from_secs(20), || async {
        let r = http().get(format!("{}/v1/events/{event}/waiting-room", stack.api)).send().await.unwrap();
        let body: Value = r.json().await.unwrap();
        (body["phase"] == "open" && body["entrants"] != 0).then_some(body)
    })
    .await;
    assert_eq!(back["in_line"], 0, "{back}");
    // The draw stays published and checkable: the record keeps it.
    assert_eq!(back["entrants"], 2, "{back}");
    let kept = published_draw(&stack, event).await;
    assert_eq!(draw::verify(&kept), Ok(()));
    assert_eq!(kept.order.len(), 2);
    assert_eq!(back["list_hash"].as_str(), Some(kept.list_hash.as_str()));
    refused(
        http().get(format!("{}/v1/events/{event}/queue", stack.api)).bearer_auth(stack.token("eve")),
        StatusCode::NOT_FOUND,
        "not_in_queue",
    )
    .await;
    let (status, again) = join(&stack, event, "eve").await;
    assert_eq!((status, again["place"].as_u64()), (StatusCode::CREATED, Some(1)), "{again}");
    admitted(&stack, event, "eve").await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_reads_carry_validators_and_a_matching_if_none_match_gets_304() {
    let stack = Ingress::start(&[]).await;
    let event = event_with_room(&stack, 2, 10, 60).await;
    assert_eq!(join(&stack, event, "gus").await.0, StatusCode::CREATED);
    published_draw(&stack, event).await;
    for (path, max_age) in [
        (format!("/v1/events/{event}/waiting-room/draw"), 300),
        (format!("/v1/events/{event}"), 1),
        ("/v1/events".to_owned(), 1),
    ] {
        let url = format!("{}{path}", stack.api);
        let first = http().get(&url).send().await.unwrap();
        assert_eq!(first.status(), StatusCode::OK, "{path}");
        let tag = first.headers()["etag"].to_str().unwrap().to_owned();
        assert_eq!(first.headers()["cache-control"], format!("public, max-age={max_age}").as_str(), "{path}");
        let body = first.bytes().await.unwrap();
        let again = http().get(&url).header("if-none-match", &tag).send().await.unwrap();
        // A live read may have changed in between: then it is a new body.
        if again.status() == StatusCode::OK {
            assert_ne!(again.headers()["etag"].to_str().unwrap(), tag, "{path}: same tag, sent again");
            continue;
        }
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED, "{path}");
        assert_eq!(again.headers()["etag"].to_str().unwrap(), tag);
        assert!(again.bytes().await.unwrap().is_empty());
        let other = http().get(&url).header("if-none-match", "\"not-it\"").send().await.unwrap();
        assert_eq!(other.status(), StatusCode::OK, "{path}");
        assert!(!body.is_empty());
    }
    // The draw does not change: 304 every time.
    let url = format!("{}/v1/events/{event}/waiting-room/draw", stack.api);
    let tag = http().get(&url).send().await.unwrap().headers()["etag"].to_str().unwrap().to_owned();
    let r = http().get(&url).header("if-none-match", format!("W/{tag}")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bot_hammering_the_room_with_one_token_and_a_join_flood_are_refused_with_retry_after() {
    let stack = Ingress::start(&[
        "--room-user-per-sec=1".to_owned(),
        "--room-user-burst=3".to_owned(),
        "--joins-per-event-per-sec=1".to_owned(),
        "--joins-per-event-burst=5".to_owned(),
    ])
    .await;
    let event = stack.create_event(&event_body(60)).await;
    let terms = json!({"prequeue_opens_at": chrono::Utc::now(), "outflow_per_sec": 10, "time_to_act_secs": 60});
    assert_eq!(set_room(&stack, event, &terms).await.status(), StatusCode::CREATED);

    // One buyer, one token, polling as fast as it can: its burst, then 429.
    let poll = || http().get(format!("{}/v1/events/{event}/queue", stack.api)).bearer_auth(stack.token("bot"));
    let mut answers = Vec::new();
    for _ in 0..6 {
        answers.push(poll().send().await.unwrap());
    }
    let limited: Vec<_> = answers.iter().filter(|r| r.status() == StatusCode::TOO_MANY_REQUESTS).collect();
    assert!(limited.len() >= 2, "{:?}", answers.iter().map(|r| r.status()).collect::<Vec<_>>());
    assert!(limited.iter().all(|r| r.headers().contains_key("retry-after")));
    refused(poll(), StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;

    // The event's joins: five at once, then 429, for any buyer.
    let mut statuses = Vec::new();
    for i in 0..7 {
        statuses.push(join(&stack, event, &format!("fan-{i}")).await.0);
    }
    let joined = statuses.iter().filter(|s| **s == StatusCode::CREATED).count();
    let refused_joins = statuses.iter().filter(|s| **s == StatusCode::TOO_MANY_REQUESTS).count();
    assert_eq!(joined + refused_joins, 7, "{statuses:?}");
    assert!((5..=6).contains(&joined) && refused_joins >= 1, "{statuses:?}");
    assert_eq!(room(&stack, event).await["pre_queue"], joined, "a refused join made no ticket");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_sell_out_with_nobody_waiting_joins_are_refused_from_memory_until_stock_comes_back() {
    let stack = Ingress::start(&[]).await;
    let event = event_with_room(&stack, 1, 50, 60).await;
    assert_eq!(join(&stack, event, "una").await.0, StatusCode::CREATED);
    published_draw(&stack, event).await;
    let token = admitted(&stack, event, "una").await;
    let r = purchase(&stack, event, "una", "k", Some(&token)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let intent: Uuid = r.json::<Value>().await.unwrap()["intent_id"].as_str().unwrap().parse().unwrap();
    let undecided = [dropline::stock::Undecided { intent_id: intent, user_id: "una", quantity: 1 }];
    stack.ledger.allocate(event, &undecided).await.unwrap();

    // Sold out, nobody waiting: the room says so, and a join is told so
    // without a ticket made.
    eventually("the room sold out", Duration::from_secs(10), || async {
        (room(&stack, event).await["sold_out"] == true).then_some(())
    })
    .await;
    let (status, closed) = join(&stack, event, "late").await;
    assert_eq!((status, closed["code"].as_str()), (StatusCode::CONFLICT, Some("sold_out")), "{closed}");
    assert_eq!(room(&stack, event).await["in_line"], 1, "no ticket was made");
    // Purchases too: a new one is told sold out and nothing is recorded; a
    // retry of the accepted one still gets its 202.
    refused(purchase(&stack, event, "una", "k2", Some(&token)), StatusCode::CONFLICT, "sold_out").await;
    let key = dropline_ingress::intents::IntentStore::new(stack.ledger.pool().clone(), &stack.name, 60);
    assert!(key.key_record("una", "k2").await.unwrap().is_none(), "nothing written for the refusal");
    let again = purchase(&stack, event, "una", "k", Some(&token)).send().await.unwrap();
    assert_eq!(again.status(), StatusCode::ACCEPTED);

    // The hold comes back: joins reopen within a keeper's tick or so.
    stack.ledger.cancel(event, intent, "una").await.unwrap();
    let reopened = eventually("joins reopened", Duration::from_secs(10), || async {
        let (status, body) = join(&stack, event, "late").await;
        (status == StatusCode::CREATED).then_some(body)
    })
    .await;
    assert_eq!(reopened["place"], 2, "{reopened}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pre_queue_of_two_thousand_buyers_is_drawn_and_checks_against_its_published_seed() {
    use futures::StreamExt;
    const BUYERS: usize = 2_000;
    let stack = Ingress::start(&[]).await;
    // Time enough for two thousand joins before the opening.
    let mut body = event_body(20);
    body["capacity"] = json!(100);
    let event = stack.create_event(&body).await;
    let terms = json!({ "prequeue_opens_at": chrono::Utc::now(), "outflow_per_sec": 500, "time_to_act_secs": 60 });
    assert_eq!(set_room(&stack, event, &terms).await.status(), StatusCode::CREATED);
    let commitment = room(&stack, event).await["seed_commitment"].as_str().unwrap().to_owned();

    let tickets: Vec<(String, Uuid)> = futures::stream::iter(0..BUYERS)
        .map(|i| {
            let stack = &stack;
            async move {
                let user = format!("crowd-{i}");
                let (status, body) = join(stack, event, &user).await;
                assert_eq!(status, StatusCode::CREATED, "{body}");
                (user, body["ticket_id"].as_str().unwrap().parse::<Uuid>().unwrap())
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let before_opening = room(&stack, event).await;
    assert_eq!(
        (before_opening["phase"].as_str(), before_opening["pre_queue"].as_u64()),
        (Some("pre_queue"), Some(2_000))
    );

    // The draw: published, checked against the seed committed to before
    // anyone joined, covering exactly the pre-queue.
    let published = eventually("the draw", Duration::from_secs(60), || async {
        let r = http().get(format!("{}/v1/events/{event}/waiting-room/draw", stack.api)).send().await.unwrap();
        if r.status() == StatusCode::OK {
            Some(r.json::<PublishedDraw>().await.unwrap())
        } else {
            None
        }
    })
    .await;
    assert_eq!(draw::verify(&published), Ok(()));
    assert_eq!(published.seed_commitment, commitment);
    let mut drawn = published.order.clone();
    drawn.sort_unstable();
    let mut joined: Vec<Uuid> = tickets.iter().map(|(_, t)| *t).collect();
    joined.sort_unstable();
    assert_eq!(drawn, joined, "every ticket drawn, once");
    // A tampered order does not check out.
    let mut tampered = published.clone();
    tampered.order.swap(7, 1_500);
    assert!(draw::verify(&tampered).is_err());
    // Buyers (a sample) find themselves where the published order puts them.
    for (user, ticket) in tickets.iter().step_by(97) {
        let place = published.order.iter().position(|t| t == ticket).unwrap() as u64 + 1;
        assert_eq!(standing(&stack, event, user).await["place"], place, "{user}");
    }
    stack.stop().await;
}

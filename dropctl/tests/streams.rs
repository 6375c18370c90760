//! Live status over server-sent events, on the whole pipeline: a purchase's
//! stream from queued to paid or expired, resumed after a disconnect; a
//! queue ticket's from the pre-queue to its turn, through a sell-out and
//! stock coming back; heartbeats that keep a quiet stream open; and the
//! bound on open streams.

mod common;

use std::time::Duration;

use common::{Options, Stack};
use dropctl::api::{Api, EventStream, Opened, Purchase, StreamEvent};
use dropline_testkit::{eventually, http};
use reqwest::StatusCode;
use serde_json::json;
use uuid::Uuid;

/// How long a test waits for the next event on a stream.
const NEXT_EVENT: Duration = Duration::from_secs(30);

async fn open(api: &Api, token: &str, path: &str, last: Option<&str>) -> EventStream {
    match api.stream(token, path, last).await.unwrap() {
        Opened::Stream(stream) => stream,
        Opened::Ended => panic!("{path} answered 204"),
    }
}

async fn next(stream: &mut EventStream) -> Option<StreamEvent> {
    tokio::time::timeout(NEXT_EVENT, stream.next()).await.expect("an event in time").unwrap()
}

/// Reads events until one named `name`; every event read, that one last.
async fn until(stream: &mut EventStream, name: &str) -> Vec<StreamEvent> {
    let mut seen = Vec::new();
    loop {
        let event = tokio::time::timeout(NEXT_EVENT, stream.next())
            .await
            .unwrap_or_else(|_| panic!("no {name} in time: {seen:?}"))
            .unwrap()
            .unwrap_or_else(|| panic!("the stream ended before {name}: {seen:?}"));
        let done = event.name == name;
        seen.push(event);
        if done {
            return seen;
        }
    }
}

/// Buys one unit, retrying with the same key when told to come back (as
/// a buyer does when the broker is slow to acknowledge).
async fn purchase(api: &Api, token: &str, event: u64, admission: Option<&str>) -> Uuid {
    let key = Uuid::new_v4().to_string();
    eventually("the purchase accepted", Duration::from_secs(30), || async {
        match api.purchase_in_turn(token, event, &key, 1, admission).await.unwrap() {
            Purchase::Accepted(id) => Some(id),
            Purchase::RetryAfter(_) => None,
            other => panic!("purchase not accepted: {other:?}"),
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purchase_stream_shows_the_whole_life_of_a_hold_and_resumes_after_a_disconnect() {
    let stack = Stack::start(Options::default()).await;
    let api = Api::new(&stack.api).unwrap();
    let event = stack.open_event(5, 60).await;
    let token = stack.token("streamer");
    let intent = purchase(&api, &token, event, None).await;
    let path = format!("/v1/intents/{intent}/events");

    // From queued (if the stream opens before the decision) to held.
    let mut stream = open(&api, &token, &path, None).await;
    let seen = until(&mut stream, "held").await;
    assert!(seen.iter().all(|e| ["queued", "held"].contains(&e.name.as_str())), "{seen:?}");
    let held = seen.last().unwrap();
    let body = held.json().unwrap();
    assert_eq!(
        (body["intent_id"].as_str(), body["order"]["state"].as_str()),
        (Some(&*intent.to_string()), Some("held"))
    );
    let held_id = held.id.clone().expect("events carry ids");
    drop(stream);

    // Paid while nobody listens; the resumed stream sends what changed
    // since the last event it had, and ends there.
    assert_eq!(api.pay(&token, intent, 1).await.unwrap(), "captured");
    let mut resumed = open(&api, &token, &path, Some(&held_id)).await;
    let paid = next(&mut resumed).await.expect("the paid event");
    assert_eq!(paid.name, "paid", "{paid:?}");
    assert_eq!(paid.json().unwrap()["order"]["state"], "paid");
    assert!(next(&mut resumed).await.is_none(), "a final state ends the stream");
    // A reconnection that has the final state already is told to stop.
    let again = api.stream(&token, &path, paid.id.as_deref()).await.unwrap();
    assert!(matches!(again, Opened::Ended));
    // Without the id it gets the state once more, then the end.
    let mut fresh = open(&api, &token, &path, None).await;
    assert_eq!(next(&mut fresh).await.unwrap().name, "paid");
    assert!(next(&mut fresh).await.is_none());

    // Another buyer's intent is not found on their stream.
    let r = http().get(format!("{}{path}", stack.api)).bearer_auth(stack.token("someone-else")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_left_unpaid_reaches_its_stream_as_expired_while_heartbeats_keep_it_open() {
    // Heartbeats every second keep the stream past the three-second idle
    // timeout while nothing else is sent.
    let ingress_args =
        ["--http-idle-timeout-secs=3", "--http-request-timeout-ms=2000", "--http-header-read-timeout-ms=2000"];
    let options = Options { ingress_args: ingress_args.map(String::from).to_vec(), ..Default::default() };
    let stack = Stack::start(options).await;
    let api = Api::new(&stack.api).unwrap();
    let event = stack.open_event(5, 8).await;
    let token = stack.token("forgetful");
    let intent = purchase(&api, &token, event, None).await;
    let mut stream = open(&api, &token, &format!("/v1/intents/{intent}/events"), None).await;
    until(&mut stream, "held").await;
    let held_at = std::time::Instant::now();
    let expired = until(&mut stream, "expired").await;
    assert!(held_at.elapsed() > Duration::from_secs(3), "quiet for longer than the idle timeout");
    assert_eq!(expired.len(), 1, "nothing between held and expired: {expired:?}");
    assert_eq!(expired[0].json().unwrap()["order"]["state"], "expired");
    assert!(stream.heartbeats >= 2, "a quiet stream gets heartbeats: {}", stream.heartbeats);
    assert!(next(&mut stream).await.is_none());
    let levels = stack.ledger.levels(event).await.unwrap().unwrap();
    assert_eq!((levels.available, levels.held), (5, 0));
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_stream_follows_the_line_through_a_sell_out_and_stock_coming_back() {
    let stack = Stack::start(Options::default()).await;
    let api = Api::new(&stack.api).unwrap();
    let now = chrono::Utc::now();
    let opens_at = now + chrono::Duration::seconds(7);
    let body = json!({
        "name": "Stream test", "venue": "Test Hall",
        "starts_at": now + chrono::Duration::days(1),
        "sale_opens_at": opens_at, "sale_closes_at": now + chrono::Duration::hours(1),
        "capacity": 1, "price_cents": 1000, "currency": "EUR", "per_user_limit": 1, "hold_ttl_secs": 60,
    });
    let event = api.create_event(&stack.admin_token(), &body).await.unwrap()["id"].as_u64().unwrap();
    let room = json!({ "prequeue_opens_at": now, "outflow_per_sec": 10, "time_to_act_secs": 60 });
    assert_eq!(stack.set_room(event, &room).await, StatusCode::CREATED);
    let path = format!("/v1/events/{event}/queue/events");
    // Not in the line yet: no stream.
    let r = http().get(format!("{}{path}", stack.api)).bearer_auth(stack.token("fan-a")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    let buyers = ["fan-a", "fan-b"];
    let mut streams = Vec::new();
    for buyer in buyers {
        api.join(&stack.token(buyer), event, false).await.unwrap();
        let mut stream = open(&api, &stack.token(buyer), &path, None).await;
        assert_eq!(next(&mut stream).await.unwrap().name, "pre_queue");
        streams.push(stream);
    }
    // The draw places both; the first is let through (one unit), and the
    // other learns it is sold out once that buyer holds it.
    let mut placed = Vec::new();
    for stream in &mut streams {
        let seen = until_any(stream, &["admitted", "waiting"]).await;
        placed.push(seen.last().unwrap().json().unwrap());
    }
    let winner = placed.iter().position(|t| t["place"] == 1).unwrap_or_else(|| panic!("nobody first: {placed:?}"));
    let (loser, winner_name) = (1 - winner, buyers[winner]);
    // Second in line: one ahead until the line reaches the first.
    assert_eq!(placed[loser]["place"], 2, "{placed:?}");
    assert!(placed[loser]["ahead"].as_u64() <= Some(1), "{placed:?}");
    // The first in line may be admitted by the very tick that drew the line.
    let admitted = match placed[winner]["status"].as_str() {
        Some("admitted") => placed[winner].clone(),
        _ => until(&mut streams[winner], "admitted").await.last().unwrap().json().unwrap(),
    };
    let admission = admitted["admission_token"].as_str().unwrap().to_owned();
    let token = stack.token(winner_name);
    let intent = purchase(&api, &token, event, Some(&admission)).await;
    let mut held = open(&api, &token, &format!("/v1/intents/{intent}/events"), None).await;
    until(&mut held, "held").await;
    let sold_out = until(&mut streams[loser], "sold_out").await;
    assert_eq!(sold_out.last().unwrap().json().unwrap()["ahead"], 0, "{sold_out:?}");
    // The winner's turn is used: its stream ends as purchased.
    until(&mut streams[winner], "purchased").await;

    // The hold is cancelled: the unit comes back and the waiting buyer's
    // turn comes, on the stream, with a token that buys.
    assert_eq!(api.cancel(&token, intent).await.unwrap(), "cancelled");
    let admitted = until(&mut streams[loser], "admitted").await;
    let admission = admitted.last().unwrap().json().unwrap()["admission_token"].as_str().unwrap().to_owned();
    purchase(&api, &stack.token(buyers[loser]), event, Some(&admission)).await;
    stack.stop().await;
}

/// Reads events until one named any of `names`.
async fn until_any(stream: &mut EventStream, names: &[&str]) -> Vec<StreamEvent> {
    let mut seen = Vec::new();
    loop {
        let event = next(stream).await.unwrap_or_else(|| panic!("the stream ended: {seen:?}"));
        let done = names.contains(&event.name.as_str());
        seen.push(event);
        if done {
            return seen;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_the_bound_are_refused_with_retry_after_and_bad_requests_get_problems() {
    let options = Options { ingress_args: vec!["--max-streams=1".into()], ..Default::default() };
    let stack = Stack::start(options).await;
    let api = Api::new(&stack.api).unwrap();
    let event = stack.open_event(5, 60).await;
    let token = stack.token("greedy-watcher");
    let intent = purchase(&api, &token, event, None).await;
    let url = format!("{}/v1/intents/{intent}/events", stack.api);
    let mut first = open(&api, &token, &format!("/v1/intents/{intent}/events"), None).await;
    next(&mut first).await.unwrap();
    let refused = dropline_testkit::refused(
        http().get(&url).bearer_auth(&token),
        StatusCode::SERVICE_UNAVAILABLE,
        "streams_full",
    )
    .await;
    assert!(refused["detail"].as_str().unwrap().contains("1 streams"), "{refused}");
    let r = http().get(&url).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.headers()["retry-after"], "5");
    // Polling still answers.
    let s = api.intent(&token, intent).await.unwrap();
    assert!(["queued", "held"].contains(&s.status.as_str()), "{s:?}");
    // Once the stream closes, its slot is free again.
    drop(first);
    eventually("a free stream slot", Duration::from_secs(10), || async {
        matches!(api.stream(&token, &format!("/v1/intents/{intent}/events"), None).await, Ok(Opened::Stream(_)))
            .then_some(())
    })
    .await;

    // Bad input: a malformed id, a bad Last-Event-ID, no token.
    let base = &stack.api;
    dropline_testkit::refused(
        http().get(format!("{base}/v1/intents/not-a-uuid/events")).bearer_auth(&token),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    dropline_testkit::refused(
        http().get(&url).bearer_auth(&token).header("last-event-id", "a b"),
        StatusCode::BAD_REQUEST,
        "invalid_header",
    )
    .await;
    dropline_testkit::refused(http().get(&url), StatusCode::UNAUTHORIZED, "unauthorized").await;
    dropline_testkit::refused(
        http().get(format!("{base}/v1/events/{event}/queue/events")).bearer_auth(&token),
        StatusCode::NOT_FOUND,
        "no_waiting_room",
    )
    .await;
    stack.stop().await;
}

//! The provider's record of captured payments survives a restart of the
//! simulator, so an audit can hold Dropline's record against it.

use clap::Parser;
use dropline_paysim::{start, PaysimConfig};
use tokio_util::sync::CancellationToken;

fn config(captures: &std::path::Path) -> PaysimConfig {
    // A webhook target nobody listens on: the capture is recorded before
    // any delivery.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    config_to(captures, closed)
}

fn config_to(captures: &std::path::Path, webhooks: std::net::SocketAddr) -> PaysimConfig {
    // A random secret: published ones are refused.
    let secret = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
    PaysimConfig::parse_from([
        "paysim".to_owned(),
        "--listen-addr=127.0.0.1:0".to_owned(),
        format!("--webhook-url=http://{webhooks}/v1/webhooks/payments"),
        format!("--webhook-secret={secret}"),
        "--max-attempts=1".to_owned(),
        format!("--captures-path={}", captures.display()),
    ])
}

async fn captured(http: &reqwest::Client, addr: std::net::SocketAddr) -> Vec<serde_json::Value> {
    let body: serde_json::Value =
        http.get(format!("http://{addr}/v1/captures")).send().await.unwrap().json().await.unwrap();
    body["captures"].as_array().unwrap().clone()
}

/// Opens a payment for a new order and confirms it: the buyer paid.
async fn pay(http: &reqwest::Client, addr: std::net::SocketAddr, amount_cents: u64) -> (uuid::Uuid, String) {
    let order = uuid::Uuid::new_v4();
    let session: serde_json::Value = http
        .post(format!("http://{addr}/v1/payments"))
        .header("idempotency-key", order.to_string())
        .json(&serde_json::json!({ "order_id": order, "amount_cents": amount_cents, "currency": "EUR" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let payment_id = session["payment_id"].as_str().unwrap().to_owned();
    let confirmed = http.post(format!("http://{addr}/checkout/{payment_id}/confirm")).send().await.unwrap();
    assert_eq!(confirmed.status(), 202);
    (order, payment_id)
}

#[tokio::test]
async fn captured_payments_are_read_back_after_a_restart() {
    let dir = std::env::temp_dir().join(format!("paysim-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("captures.jsonl");
    let http = reqwest::Client::new();

    let stop = CancellationToken::new();
    let first = start(config(&path), stop.clone()).await.unwrap();
    let (order, payment_id) = pay(&http, first.addr, 4500).await;
    assert_eq!(captured(&http, first.addr).await.len(), 1);
    stop.cancel();
    first.task.await.unwrap();

    let second = start(config(&path), CancellationToken::new()).await.unwrap();
    let after = captured(&http, second.addr).await;
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(after[0]["payment_id"], payment_id);
    assert_eq!(after[0]["order_id"], order.to_string());
    assert_eq!(after[0]["amount_cents"], 4500);
    assert_eq!(after[0]["status"], "succeeded");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_line_cut_short_by_a_crash_is_dropped_and_the_next_capture_starts_clean() {
    let dir = std::env::temp_dir().join(format!("paysim-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("captures.jsonl");
    let order = uuid::Uuid::new_v4();
    let whole = serde_json::json!({
        "payment_id": "pay_whole", "order_id": order, "amount_cents": 100, "currency": "EUR",
        "webhook_id": "evt_whole", "captured_at": 0,
    });
    std::fs::write(&path, format!("{whole}\n{{\"payment_id\":\"pay_torn\",\"ord")).unwrap();
    let http = reqwest::Client::new();
    let stop = CancellationToken::new();
    let sim = start(config(&path), stop.clone()).await.unwrap();
    assert_eq!(captured(&http, sim.addr).await.len(), 1);
    let (_, id) = pay(&http, sim.addr, 200).await;
    stop.cancel();
    sim.task.await.unwrap();
    let again = start(config(&path), CancellationToken::new()).await.unwrap();
    let ids: Vec<String> =
        captured(&http, again.addr).await.iter().map(|c| c["payment_id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert!(ids.contains(&"pay_whole".to_owned()) && ids.contains(&id), "{ids:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A webhook endpoint that acknowledges everything and sends each body it
/// got down `tx`.
async fn receiver(tx: tokio::sync::mpsc::UnboundedSender<serde_json::Value>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/v1/webhooks/payments",
        axum::routing::post(move |axum::Json(body): axum::Json<serde_json::Value>| async move {
            let _ = tx.send(body);
            "ok"
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

#[tokio::test]
async fn a_webhook_still_unacknowledged_at_a_restart_is_delivered_after_it_once() {
    let dir = std::env::temp_dir().join(format!("paysim-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("captures.jsonl");
    let http = reqwest::Client::new();

    // Captured while Dropline was unreachable, and the one attempt failed.
    let stop = CancellationToken::new();
    let first = start(config(&path), stop.clone()).await.unwrap();
    let (order, payment_id) = pay(&http, first.addr, 700).await;
    let shown = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            let p: serde_json::Value = http
                .get(format!("http://{}/v1/payments/{payment_id}", first.addr))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if !p["deliveries"].as_array().unwrap().is_empty() {
                break p;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the one delivery attempt was made");
    assert_eq!(shown["acknowledged"], false, "{shown}");
    stop.cancel();
    first.task.await.unwrap();

    // Restarted with Dropline up: the webhook goes out without anyone asking.
    let (tx, mut got) = tokio::sync::mpsc::unbounded_channel();
    let dropline = receiver(tx).await;
    let stop = CancellationToken::new();
    let second = start(config_to(&path, dropline), stop.clone()).await.unwrap();
    let webhook = tokio::time::timeout(std::time::Duration::from_secs(10), got.recv()).await.unwrap().unwrap();
    assert_eq!(webhook["payment_id"], payment_id);
    assert_eq!(webhook["order_id"], order.to_string());
    let acknowledged = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            if captured(&http, second.addr).await[0]["acknowledged"] == true {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    });
    acknowledged.await.expect("the delivery was noted as acknowledged");
    stop.cancel();
    second.task.await.unwrap();

    // Acknowledged once: a third start knows it and owes nothing.
    let third = start(config(&path), CancellationToken::new()).await.unwrap();
    assert_eq!(captured(&http, third.addr).await[0]["acknowledged"], true);
    let _ = std::fs::remove_dir_all(&dir);
}

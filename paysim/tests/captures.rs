//! The provider's record of captured payments survives a restart of the
//! simulator, so an audit can hold Dropline's record against it.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use dropline_paysim::{start, PaysimConfig, Running};
use tokio_util::sync::CancellationToken;

/// A test's own folder for the captures file, removed at the end.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let dir = std::env::temp_dir().join(format!("paysim-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn captures(&self) -> PathBuf {
        self.0.join("captures.jsonl")
    }

    /// A simulator keeping its record here, its webhooks going nowhere.
    async fn sim(&self) -> Sim {
        Sim::start(config(&self.captures())).await
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running simulator, what stops it, and a client of its API.
struct Sim {
    running: Running,
    stop: CancellationToken,
    http: reqwest::Client,
}

impl Sim {
    async fn start(config: PaysimConfig) -> Sim {
        let stop = CancellationToken::new();
        Sim { running: start(config, stop.clone()).await.unwrap(), stop, http: reqwest::Client::new() }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.running.addr)
    }

    /// The provider's record: every capture, with whether Dropline
    /// acknowledged its webhook.
    async fn captured(&self) -> Vec<serde_json::Value> {
        let body: serde_json::Value =
            self.http.get(self.url("/v1/captures")).send().await.unwrap().json().await.unwrap();
        body["captures"].as_array().unwrap().clone()
    }

    /// A payment as the provider shows it, if it answers.
    async fn payment(&self, payment_id: &str) -> Option<serde_json::Value> {
        self.http.get(self.url(&format!("/v1/payments/{payment_id}"))).send().await.ok()?.json().await.ok()
    }

    /// Opens a payment for a new order and confirms it: the buyer paid.
    async fn pay(&self, amount_cents: u64) -> (uuid::Uuid, String) {
        let order = uuid::Uuid::new_v4();
        let session: serde_json::Value = self
            .http
            .post(self.url("/v1/payments"))
            .header("idempotency-key", order.to_string())
            .json(&serde_json::json!({ "order_id": order, "amount_cents": amount_cents, "currency": "EUR" }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let payment_id = session["payment_id"].as_str().unwrap().to_owned();
        let confirmed = self.http.post(self.url(&format!("/checkout/{payment_id}/confirm"))).send().await.unwrap();
        assert_eq!(confirmed.status(), 202);
        (order, payment_id)
    }

    async fn stop(self) {
        self.stop.cancel();
        self.running.task.await.unwrap();
    }
}

/// Polls `probe` until it yields `Some`, failing after 10 s.
async fn until<T, Fut: std::future::Future<Output = Option<T>>>(what: &str, probe: impl FnMut() -> Fut) -> T {
    dropline_testkit::eventually(what, Duration::from_secs(10), probe).await
}

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

#[tokio::test]
async fn captured_payments_are_read_back_after_a_restart() {
    let scratch = Scratch::new();
    let first = scratch.sim().await;
    let (order, payment_id) = first.pay(4500).await;
    assert_eq!(first.captured().await.len(), 1);
    first.stop().await;

    let second = scratch.sim().await;
    let after = second.captured().await;
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(after[0]["payment_id"], payment_id);
    assert_eq!(after[0]["order_id"], order.to_string());
    assert_eq!(after[0]["amount_cents"], 4500);
    assert_eq!(after[0]["status"], "succeeded");
}

#[tokio::test]
async fn a_line_cut_short_by_a_crash_is_dropped_and_the_next_capture_starts_clean() {
    let scratch = Scratch::new();
    let order = uuid::Uuid::new_v4();
    let whole = serde_json::json!({
        "payment_id": "pay_whole", "order_id": order, "amount_cents": 100, "currency": "EUR",
        "webhook_id": "evt_whole", "captured_at": 0,
    });
    std::fs::write(scratch.captures(), format!("{whole}\n{{\"payment_id\":\"pay_torn\",\"ord")).unwrap();
    let sim = scratch.sim().await;
    assert_eq!(sim.captured().await.len(), 1);
    let (_, id) = sim.pay(200).await;
    sim.stop().await;
    let again = scratch.sim().await;
    let ids: Vec<String> =
        again.captured().await.iter().map(|c| c["payment_id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert!(ids.contains(&"pay_whole".to_owned()) && ids.contains(&id), "{ids:?}");
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
    let scratch = Scratch::new();
    // Captured while Dropline was unreachable, and the one attempt failed.
    let first = scratch.sim().await;
    let (order, payment_id) = first.pay(700).await;
    let shown = until("the one delivery attempt", || async {
        let p = first.payment(&payment_id).await?;
        (!p["deliveries"].as_array()?.is_empty()).then_some(p)
    })
    .await;
    assert_eq!(shown["acknowledged"], false, "{shown}");
    first.stop().await;

    // Restarted with Dropline up: the webhook goes out without anyone asking.
    let (tx, mut got) = tokio::sync::mpsc::unbounded_channel();
    let dropline = receiver(tx).await;
    let second = Sim::start(config_to(&scratch.captures(), dropline)).await;
    let webhook = tokio::time::timeout(Duration::from_secs(10), got.recv()).await.unwrap().unwrap();
    assert_eq!(webhook["payment_id"], payment_id);
    assert_eq!(webhook["order_id"], order.to_string());
    until("the delivery noted as acknowledged", || async {
        (second.captured().await[0]["acknowledged"] == true).then_some(())
    })
    .await;
    second.stop().await;

    // Acknowledged once: a third start knows it and owes nothing.
    let third = scratch.sim().await;
    assert_eq!(third.captured().await[0]["acknowledged"], true);
}

//! paysim: a payment provider for the local stack, so the demo, the tests
//! and the load tests exercise the real payment path, signed webhooks and
//! all.
//!
//! - `POST /v1/payments` opens a payment for an order (idempotent on the
//!   `Idempotency-Key`, which the ingress sets to the order id).
//! - `POST /checkout/{payment_id}/confirm` is the buyer paying. paysim then
//!   posts a signed `payment.succeeded` webhook to Dropline and retries it
//!   with backoff until it is acknowledged. `?wait=true` answers only once
//!   the webhook was acknowledged (or given up); `?copies=N` sends the same
//!   webhook N times, as real providers sometimes do. `?outcome=` plays
//!   what can go wrong at a provider:
//!   - `decline`: the card is declined. Nothing is captured, the payment
//!     stays open for another attempt, and a `payment.failed` webhook (its
//!     own event id per attempt) tells Dropline; the buyer gets 402.
//!   - `timeout`: the payment is captured but the buyer's call times out
//!     (504), and the webhook follows only after `delay_ms` (default 2000).
//!     Confirming again is safe: it answers the same capture.
//!   - `double`: the payment is confirmed twice: one capture, announced by
//!     two webhooks under two different event ids, at the same time.
//! - `POST /v1/payments/{payment_id}/redeliver` sends the webhook again.
//! - `GET /v1/captures` lists every captured payment, and whether Dropline
//!   acknowledged its webhook.
//!
//! With a captures file, the record survives a restart: captures are
//! appended (and synced) before anyone is told, acknowledgements go to a
//! second file beside it (`<captures>.acked`), and at start every capture
//! whose webhook was never acknowledged is delivered again, as a real
//! provider keeps retrying across its own deploys.
//! - `GET /v1/payments/{payment_id}` shows a payment and its deliveries.
//! - `POST /v1/refunds` gives (part of) a captured payment's money back,
//!   once per `Idempotency-Key` (Dropline's refund id): the same key always
//!   answers the same refund, another key may not take more than is left.
//!   Refunds are appended (and synced) to `<captures>.refunds` before they
//!   are answered. `GET /v1/refunds` lists them.
//! - `POST /v1/faults` makes the next refund calls fail, so the tests and the
//!   demo see Dropline retry: `refund_failures` answer 503 and make no
//!   refund; `refund_lost_answers` make the refund and answer 502, as a
//!   provider whose answer was lost on the way.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use dropline::config::{ConfigError, Problems};
use dropline::payments::{
    self, CreatePayment, CreateRefund, PaymentSession, PaymentWebhook, ProviderRefund, PAYMENT_FAILED,
    PAYMENT_SUCCEEDED, SIGNATURE_HEADER,
};
use dropline::secrets::{exposed, Secret};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Parser)]
#[command(name = "dropline-paysim", version)]
pub struct PaysimConfig {
    /// Where paysim listens.
    #[arg(long, env = "DROPLINE_PAYSIM_LISTEN_ADDR", default_value = "127.0.0.1:8090")]
    pub listen_addr: SocketAddr,
    /// Dropline's webhook endpoint.
    #[arg(long, env = "DROPLINE_PAYSIM_WEBHOOK_URL", default_value = "http://127.0.0.1:8080/v1/webhooks/payments")]
    pub webhook_url: String,
    /// The secret webhooks are signed with (Dropline's DROPLINE_WEBHOOK_SECRET;
    /// the local stack generates it in .dropline/secrets.env).
    #[arg(long, env = "DROPLINE_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<Secret>,
    /// Webhook deliveries tried before giving up. The wait between two
    /// doubles from 200 ms up to a minute, so the default keeps trying for
    /// about an hour: longer than a local broker outage and its recovery.
    #[arg(long, env = "DROPLINE_PAYSIM_MAX_ATTEMPTS", default_value_t = 70)]
    pub max_attempts: u32,
    /// A file where every captured payment is appended (and synced) before
    /// its webhook is sent, and read back at start: the provider's own
    /// record, which an audit compares with Dropline's. Acknowledged
    /// webhooks are noted in `<path>.acked`; the others are delivered again
    /// at start. None: memory only.
    #[arg(long, env = "DROPLINE_PAYSIM_CAPTURES_PATH")]
    pub captures_path: Option<std::path::PathBuf>,
    /// Payments kept in memory; past this, new payments are refused.
    #[arg(long, env = "DROPLINE_PAYSIM_MAX_PAYMENTS", default_value_t = 1_000_000)]
    pub max_payments: usize,
}

impl PaysimConfig {
    /// paysim signs with the same secret the ingress checks, so it passes
    /// the same checks: a published or weak secret is refused here too.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Problems::default();
        dropline::secrets::check_setting("DROPLINE_WEBHOOK_SECRET", &self.webhook_secret, &mut p);
        p.require(self.max_attempts > 0, "DROPLINE_PAYSIM_MAX_ATTEMPTS must be positive");
        p.into_result()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Payment {
    pub payment_id: String,
    pub order_id: uuid::Uuid,
    pub amount_cents: u64,
    pub currency: String,
    pub status: &'static str,
    /// The webhook event id; the same on every redelivery.
    pub webhook_id: Option<String>,
    /// Whether Dropline acknowledged the webhook (2xx).
    pub acknowledged: bool,
    /// Attempts declined so far (each announced by its own webhook).
    pub declines: u32,
    pub deliveries: Vec<Delivery>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Delivery {
    pub status: Option<u16>,
    pub body: String,
}

#[derive(Default)]
struct Book {
    payments: HashMap<String, Payment>,
    by_order: HashMap<uuid::Uuid, String>,
    /// By idempotency key.
    refunds: HashMap<String, ProviderRefund>,
    /// What each payment has had back so far.
    refunded_cents: HashMap<String, u64>,
    faults: Faults,
}

/// Refund calls to fail on purpose, counted down as they happen. A field
/// it does not know is refused, not ignored: a misspelled fault would
/// otherwise set nothing, silently.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    /// The next calls answer 503 without refunding.
    #[serde(default)]
    pub refund_failures: u32,
    /// The next calls refund, then answer 502: the answer was lost.
    #[serde(default)]
    pub refund_lost_answers: u32,
}

impl Book {
    fn add_refund(&mut self, refund: ProviderRefund) {
        *self.refunded_cents.entry(refund.payment_id.clone()).or_default() += refund.amount_cents;
        self.refunds.insert(refund.idempotency_key.clone(), refund);
    }
}

/// One captured payment as the provider's record keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Capture {
    pub payment_id: String,
    pub order_id: uuid::Uuid,
    pub amount_cents: u64,
    pub currency: String,
    pub webhook_id: String,
    pub captured_at: i64,
}

struct Sim {
    config: PaysimConfig,
    /// The append-only record of captures, and the one of acknowledged
    /// webhooks beside it, when configured.
    captures: Option<Mutex<std::fs::File>>,
    acked: Option<Mutex<std::fs::File>>,
    refunds: Option<Mutex<std::fs::File>>,
    public_url: String,
    book: Mutex<Book>,
    http: reqwest::Client,
}

pub struct Running {
    pub addr: SocketAddr,
    pub task: tokio::task::JoinHandle<()>,
}

pub async fn start(config: PaysimConfig, shutdown: CancellationToken) -> anyhow::Result<Running> {
    config.validate()?;
    let listener = TcpListener::bind(config.listen_addr).await?;
    let addr = listener.local_addr()?;
    let mut book = Book::default();
    let (captures, acked, refunds) = match &config.captures_path {
        Some(path) => {
            let file = open_captures(path)?;
            let acked_path = beside(path, ".acked");
            let acked_file = open_captures(&acked_path)?;
            let acked: std::collections::HashSet<String> =
                std::fs::read_to_string(&acked_path)?.lines().map(str::to_owned).collect();
            for c in read_lines::<Capture>(path)? {
                let acknowledged = acked.contains(&c.payment_id);
                book.by_order.insert(c.order_id, c.payment_id.clone());
                book.payments.insert(
                    c.payment_id.clone(),
                    Payment {
                        payment_id: c.payment_id,
                        order_id: c.order_id,
                        amount_cents: c.amount_cents,
                        currency: c.currency,
                        status: "succeeded",
                        webhook_id: Some(c.webhook_id),
                        acknowledged,
                        declines: 0,
                        deliveries: Vec::new(),
                    },
                );
            }
            let refunds_path = beside(path, ".refunds");
            let refunds_file = open_captures(&refunds_path)?;
            for r in read_lines::<ProviderRefund>(&refunds_path)? {
                book.add_refund(r);
            }
            tracing::info!(path = %path.display(), captured = book.payments.len(), refunds = book.refunds.len(),
                "captures and refunds read back");
            (Some(Mutex::new(file)), Some(Mutex::new(acked_file)), Some(Mutex::new(refunds_file)))
        }
        None => (None, None, None),
    };
    let unacknowledged: Vec<PaymentWebhook> =
        book.payments.values().filter(|p| !p.acknowledged).map(succeeded).collect();
    let sim = Arc::new(Sim {
        public_url: format!("http://{addr}"),
        config,
        captures,
        acked,
        refunds,
        book: Mutex::new(book),
        http: reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?,
    });
    let app = Router::new()
        .route("/v1/payments", post(create))
        .route("/v1/payments/{payment_id}", get(show))
        .route("/v1/captures", get(list_captures))
        .route("/v1/payments/{payment_id}/redeliver", post(redeliver))
        .route("/checkout/{payment_id}/confirm", post(confirm))
        .route("/v1/refunds", post(refund).get(list_refunds))
        .route("/v1/faults", post(set_faults))
        .route("/healthz", get(|| async { "ok" }));
    if !unacknowledged.is_empty() {
        tracing::info!(count = unacknowledged.len(), "delivering again the webhooks never acknowledged");
    }
    for webhook in unacknowledged {
        let sim = sim.clone();
        tokio::spawn(async move { deliver(&sim, &webhook).await });
    }
    let app = app.with_state(sim);
    tracing::info!(%addr, "paysim serving");
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await {
            tracing::error!(error = %e, "paysim failed");
        }
    });
    Ok(Running { addr, task })
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

async fn create(State(sim): State<Arc<Sim>>, headers: HeaderMap, Json(req): Json<CreatePayment>) -> Response {
    let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok());
    if key != Some(req.order_id.to_string().as_str()) {
        return error(StatusCode::BAD_REQUEST, "the Idempotency-Key must be the order id");
    }
    let mut book = sim.book.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(existing) = book.by_order.get(&req.order_id).and_then(|id| book.payments.get(id)) {
        return Json(session(&sim, existing)).into_response();
    }
    if book.payments.len() >= sim.config.max_payments {
        return error(StatusCode::SERVICE_UNAVAILABLE, "payment book full");
    }
    let payment = Payment {
        payment_id: format!("pay_{}", uuid::Uuid::new_v4().simple()),
        order_id: req.order_id,
        amount_cents: req.amount_cents,
        currency: req.currency,
        status: "pending",
        webhook_id: None,
        acknowledged: false,
        declines: 0,
        deliveries: Vec::new(),
    };
    let body = session(&sim, &payment);
    book.by_order.insert(req.order_id, payment.payment_id.clone());
    book.payments.insert(payment.payment_id.clone(), payment);
    (StatusCode::CREATED, Json(body)).into_response()
}

fn session(sim: &Sim, p: &Payment) -> PaymentSession {
    PaymentSession {
        payment_id: p.payment_id.clone(),
        checkout_url: format!("{}/checkout/{}", sim.public_url, p.payment_id),
        amount_cents: p.amount_cents,
        currency: p.currency.clone(),
    }
}

async fn show(State(sim): State<Arc<Sim>>, Path(id): Path<String>) -> Response {
    let book = sim.book.lock().unwrap_or_else(|p| p.into_inner());
    match book.payments.get(&id) {
        Some(p) => Json(p.clone()).into_response(),
        None => error(StatusCode::NOT_FOUND, "no such payment"),
    }
}

#[derive(Debug, Deserialize)]
struct ConfirmOptions {
    #[serde(default)]
    wait: bool,
    #[serde(default)]
    copies: Option<u32>,
    #[serde(default)]
    outcome: ConfirmOutcome,
    /// `timeout` only: how long the webhook is held back.
    #[serde(default)]
    delay_ms: Option<u64>,
}

/// What a confirmation does at the provider.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ConfirmOutcome {
    #[default]
    Succeed,
    Decline,
    Timeout,
    Double,
}

/// The reason a declined attempt gives.
pub const DECLINE_REASON: &str = "card_declined";

/// The buyer completed the payment at the provider (or tried to).
async fn confirm(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    Query(options): Query<ConfirmOptions>,
) -> Response {
    if options.outcome == ConfirmOutcome::Decline {
        return decline(sim, &id, options.wait).await;
    }
    let webhook = {
        let mut book = sim.book.lock().unwrap_or_else(|p| p.into_inner());
        let Some(p) = book.payments.get_mut(&id) else { return error(StatusCode::NOT_FOUND, "no such payment") };
        if p.status != "succeeded" {
            let webhook_id = format!("evt_{}", uuid::Uuid::new_v4().simple());
            let capture = Capture {
                payment_id: p.payment_id.clone(),
                order_id: p.order_id,
                amount_cents: p.amount_cents,
                currency: p.currency.clone(),
                webhook_id: webhook_id.clone(),
                captured_at: chrono::Utc::now().timestamp(),
            };
            // On record before it counts as captured and before anyone is
            // told, under the book's lock so two confirmations cannot both
            // skip it. A failed write leaves the payment pending: the
            // buyer's retry tries again.
            if let Err(e) = append_capture(&sim, &capture) {
                tracing::error!(error = %e, payment_id = %id, "recording the capture failed");
                return error(StatusCode::SERVICE_UNAVAILABLE, "the capture could not be recorded");
            }
            p.status = "succeeded";
            p.webhook_id = Some(webhook_id);
        }
        succeeded(p)
    };
    match options.outcome {
        ConfirmOutcome::Timeout => {
            let delay = Duration::from_millis(options.delay_ms.unwrap_or(2_000).min(60_000));
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                deliver(&sim, &webhook).await
            });
            error(StatusCode::GATEWAY_TIMEOUT, "the provider did not answer in time")
        }
        ConfirmOutcome::Double => {
            // The second confirmation's announcement: the same payment,
            // another event id.
            let again = PaymentWebhook { id: format!("evt_{}", uuid::Uuid::new_v4().simple()), ..webhook.clone() };
            let (sim2, again) = (sim.clone(), again);
            let second = tokio::spawn(async move { deliver(&sim2, &again).await });
            let first = deliver_copies(sim, webhook, 1, options.wait).await;
            if options.wait && second.await.ok().flatten().is_none() {
                return error(StatusCode::BAD_GATEWAY, "the second webhook was never acknowledged");
            }
            first
        }
        ConfirmOutcome::Succeed | ConfirmOutcome::Decline => {
            let copies = options.copies.unwrap_or(1).clamp(1, 10);
            deliver_copies(sim, webhook, copies, options.wait).await
        }
    }
}

/// A declined attempt: nothing captured, the payment stays open, and
/// Dropline hears of it by a `payment.failed` webhook of its own event id.
async fn decline(sim: Arc<Sim>, id: &str, wait: bool) -> Response {
    let webhook = {
        let mut book = sim.book.lock().unwrap_or_else(|p| p.into_inner());
        let Some(p) = book.payments.get_mut(id) else { return error(StatusCode::NOT_FOUND, "no such payment") };
        if p.status == "succeeded" {
            return error(StatusCode::CONFLICT, "the payment was captured already");
        }
        p.declines += 1;
        PaymentWebhook {
            id: format!("evt_{}", uuid::Uuid::new_v4().simple()),
            kind: PAYMENT_FAILED.to_owned(),
            failure_reason: Some(DECLINE_REASON.to_owned()),
            ..succeeded(p)
        }
    };
    let answer = serde_json::json!({ "status": "declined", "reason": DECLINE_REASON, "webhook_id": webhook.id });
    if wait {
        if deliver(&sim, &webhook).await.is_none() {
            return error(StatusCode::BAD_GATEWAY, "the webhook was never acknowledged");
        }
    } else {
        tokio::spawn(async move { deliver(&sim, &webhook).await });
    }
    (StatusCode::PAYMENT_REQUIRED, Json(answer)).into_response()
}

async fn redeliver(State(sim): State<Arc<Sim>>, Path(id): Path<String>) -> Response {
    let webhook = {
        let book = sim.book.lock().unwrap_or_else(|p| p.into_inner());
        let Some(p) = book.payments.get(&id) else { return error(StatusCode::NOT_FOUND, "no such payment") };
        if p.webhook_id.is_none() {
            return error(StatusCode::CONFLICT, "the payment was not confirmed");
        }
        succeeded(p)
    };
    deliver_copies(sim, webhook, 1, true).await
}

fn read_lines<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> anyhow::Result<Vec<T>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    text.lines().map(|l| Ok(serde_json::from_str(l)?)).collect()
}

fn append_capture(sim: &Sim, capture: &Capture) -> std::io::Result<()> {
    append_line(&sim.captures, capture)
}

/// Appends one JSON line to a record, synced, if there is a record.
fn append_line(file: &Option<Mutex<std::fs::File>>, item: &impl Serialize) -> std::io::Result<()> {
    let Some(file) = file else { return Ok(()) };
    let mut line = serde_json::to_vec(item).expect("records serialize");
    line.push(b'\n');
    append_synced(file, &line)
}

fn append_synced(file: &Mutex<std::fs::File>, line: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = file.lock().unwrap_or_else(|p| p.into_inner());
    file.write_all(line)?;
    file.sync_data()
}

/// The record kept beside the captures file: `<captures><suffix>`.
fn beside(captures: &std::path::Path, suffix: &str) -> std::path::PathBuf {
    let mut name = captures.as_os_str().to_owned();
    name.push(suffix);
    name.into()
}

/// Notes that Dropline acknowledged `payment_id`'s webhook, once. A note
/// lost to a crash costs one more delivery at the next start, which
/// Dropline takes as a duplicate.
fn acknowledge(sim: &Sim, payment_id: &str) {
    {
        let mut book = sim.book.lock().unwrap_or_else(|p| p.into_inner());
        match book.payments.get_mut(payment_id) {
            Some(p) if !p.acknowledged => p.acknowledged = true,
            _ => return,
        }
    }
    if let Some(file) = &sim.acked {
        if let Err(e) = append_synced(file, format!("{payment_id}\n").as_bytes()) {
            tracing::warn!(error = %e, payment_id, "noting the acknowledgement failed; it is delivered again at start");
        }
    }
}

/// Opens the record for appending, first cutting a line a crash left
/// unfinished (its capture was never acknowledged: the append is synced
/// before the payment counts), so the next line starts clean.
fn open_captures(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    let file = std::fs::OpenOptions::new().create(true).read(true).append(true).open(path)?;
    let bytes = std::fs::read(path)?;
    let whole = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    if whole < bytes.len() {
        tracing::warn!(path = %path.display(), cut = bytes.len() - whole, "cutting an unfinished capture line");
        file.set_len(whole as u64)?;
    }
    Ok(file)
}

/// `GET /v1/captures`: every captured payment, the provider's side of an
/// audit.
async fn list_captures(State(sim): State<Arc<Sim>>) -> Response {
    let book = sim.book.lock().unwrap_or_else(|p| p.into_inner());
    let mut captured: Vec<&Payment> = book.payments.values().filter(|p| p.status == "succeeded").collect();
    captured.sort_by(|a, b| a.payment_id.cmp(&b.payment_id));
    Json(serde_json::json!({ "captures": captured })).into_response()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Fail,
    LoseAnswer,
}

/// `POST /v1/refunds`: one refund per idempotency key.
async fn refund(State(sim): State<Arc<Sim>>, headers: HeaderMap, Json(req): Json<CreateRefund>) -> Response {
    let key = match headers.get("idempotency-key").and_then(|v| v.to_str().ok()) {
        Some(k) if !k.is_empty() && k.len() <= payments::MAX_PROVIDER_ID_BYTES => k.to_owned(),
        _ => return error(StatusCode::BAD_REQUEST, "a refund needs an Idempotency-Key of 1 to 128 bytes"),
    };
    let mut book = sim.book.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(existing) = book.refunds.get(&key) {
        if existing.payment_id != req.payment_id || existing.amount_cents != req.amount_cents {
            return error(StatusCode::CONFLICT, "this Idempotency-Key was used for another refund");
        }
        return Json(existing.clone()).into_response();
    }
    let fault = if book.faults.refund_failures > 0 {
        book.faults.refund_failures -= 1;
        Some(Fault::Fail)
    } else if book.faults.refund_lost_answers > 0 {
        book.faults.refund_lost_answers -= 1;
        Some(Fault::LoseAnswer)
    } else {
        None
    };
    if fault == Some(Fault::Fail) {
        tracing::warn!(payment_id = %req.payment_id, key, "refund failed on purpose");
        return error(StatusCode::SERVICE_UNAVAILABLE, "the refund failed; retry it");
    }
    let Some(payment) = book.payments.get(&req.payment_id).filter(|p| p.status == "succeeded") else {
        return error(StatusCode::NOT_FOUND, "no captured payment with this id");
    };
    let left = payment.amount_cents.saturating_sub(book.refunded_cents.get(&req.payment_id).copied().unwrap_or(0));
    if req.amount_cents == 0 || req.amount_cents > left {
        return error(StatusCode::UNPROCESSABLE_ENTITY, &format!("a refund of 1 to {left} cents is possible"));
    }
    let refund = ProviderRefund {
        refund_id: format!("re_{}", uuid::Uuid::new_v4().simple()),
        payment_id: req.payment_id,
        amount_cents: req.amount_cents,
        idempotency_key: key,
        status: payments::REFUND_SUCCEEDED.to_owned(),
        created_at: chrono::Utc::now().timestamp(),
    };
    // On record before it is answered, under the book's lock: a crash
    // after it keeps the refund, and the caller's retry gets it back.
    if let Err(e) = append_line(&sim.refunds, &refund) {
        tracing::error!(error = %e, "recording the refund failed");
        return error(StatusCode::SERVICE_UNAVAILABLE, "the refund could not be recorded");
    }
    tracing::info!(refund_id = %refund.refund_id, payment_id = %refund.payment_id, amount_cents = refund.amount_cents,
        "refunded");
    book.add_refund(refund.clone());
    if fault == Some(Fault::LoseAnswer) {
        return error(StatusCode::BAD_GATEWAY, "the refund was made but its answer was lost");
    }
    (StatusCode::CREATED, Json(refund)).into_response()
}

/// `GET /v1/refunds`: every refund made, the provider's side of an audit.
async fn list_refunds(State(sim): State<Arc<Sim>>) -> Response {
    let book = sim.book.lock().unwrap_or_else(|p| p.into_inner());
    let mut refunds: Vec<&ProviderRefund> = book.refunds.values().collect();
    refunds.sort_by(|a, b| a.refund_id.cmp(&b.refund_id));
    Json(serde_json::json!({ "refunds": refunds })).into_response()
}

/// `POST /v1/faults`: adds to the faults to come; answers what is pending.
async fn set_faults(State(sim): State<Arc<Sim>>, Json(add): Json<Faults>) -> Response {
    let mut book = sim.book.lock().unwrap_or_else(|p| p.into_inner());
    book.faults.refund_failures = book.faults.refund_failures.saturating_add(add.refund_failures);
    book.faults.refund_lost_answers = book.faults.refund_lost_answers.saturating_add(add.refund_lost_answers);
    Json(book.faults).into_response()
}

/// The `payment.succeeded` webhook of a confirmed payment.
fn succeeded(p: &Payment) -> PaymentWebhook {
    PaymentWebhook {
        id: p.webhook_id.clone().unwrap_or_default(),
        kind: PAYMENT_SUCCEEDED.to_owned(),
        payment_id: p.payment_id.clone(),
        order_id: p.order_id,
        amount_cents: p.amount_cents,
        currency: p.currency.clone(),
        created_at: chrono::Utc::now().timestamp(),
        failure_reason: None,
    }
}

async fn deliver_copies(sim: Arc<Sim>, webhook: PaymentWebhook, copies: u32, wait: bool) -> Response {
    let mut tasks = Vec::new();
    for _ in 0..copies {
        let (sim, webhook) = (sim.clone(), webhook.clone());
        tasks.push(tokio::spawn(async move { deliver(&sim, &webhook).await }));
    }
    if !wait {
        return (StatusCode::ACCEPTED, Json(serde_json::json!({ "status": "succeeded", "delivery": "queued" })))
            .into_response();
    }
    let mut last = None;
    for t in tasks {
        last = t.await.ok().flatten();
    }
    match last {
        Some(d) => {
            Json(serde_json::json!({ "status": "succeeded", "webhook_status": d.status, "webhook_body": d.body }))
                .into_response()
        }
        None => error(StatusCode::BAD_GATEWAY, "the webhook was never acknowledged"),
    }
}

/// Posts the webhook until a 2xx, with capped backoff. Returns the
/// acknowledging delivery, or `None` after the last attempt.
async fn deliver(sim: &Sim, webhook: &PaymentWebhook) -> Option<Delivery> {
    let body = serde_json::to_vec(webhook).expect("webhooks serialize");
    let mut delay = Duration::from_millis(200);
    for attempt in 1..=sim.config.max_attempts {
        let signature = payments::sign(exposed(&sim.config.webhook_secret), chrono::Utc::now().timestamp(), &body);
        let sent = sim
            .http
            .post(&sim.config.webhook_url)
            .header("content-type", "application/json")
            .header(SIGNATURE_HEADER, signature)
            .body(body.clone())
            .send()
            .await;
        let delivery = match sent {
            Ok(r) => {
                let status = r.status().as_u16();
                Delivery { status: Some(status), body: r.text().await.unwrap_or_default() }
            }
            Err(e) => Delivery { status: None, body: e.to_string() },
        };
        let acknowledged = delivery.status.is_some_and(|s| (200..300).contains(&s));
        record(sim, &webhook.payment_id, delivery.clone());
        if acknowledged {
            if webhook.kind == PAYMENT_SUCCEEDED {
                acknowledge(sim, &webhook.payment_id);
            }
            return Some(delivery);
        }
        tracing::warn!(payment_id = %webhook.payment_id, attempt, status = ?delivery.status, "webhook not acknowledged");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(60));
    }
    None
}

fn record(sim: &Sim, payment_id: &str, delivery: Delivery) {
    let mut book = sim.book.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = book.payments.get_mut(payment_id) {
        // Keep the last few; a payment retried for hours must not grow.
        if p.deliveries.len() >= 20 {
            p.deliveries.remove(0);
        }
        p.deliveries.push(delivery);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_webhook_secret_is_checked() {
        let parse =
            |secret: &str| PaysimConfig::parse_from(["paysim".to_owned(), format!("--webhook-secret={secret}")]);
        let unset = parse("").validate().unwrap_err().to_string();
        assert!(unset.contains("DROPLINE_WEBHOOK_SECRET is not set"), "{unset}");
        let published = parse("dropline-local-webhook-secret").validate().unwrap_err().to_string();
        assert!(published.contains("DROPLINE_WEBHOOK_SECRET is a value published"), "{published}");
        parse(&dropline::secrets::random()).validate().unwrap();
    }
}

//! A webhook receiver: the host's end of the notifier, for the local stack,
//! the demo and the tests (`dropctl receive`).
//!
//! It does what a host's endpoint should: it checks each webhook's
//! signature (the `dropline-signature` header, with the notifier's secret,
//! within 5 minutes), refuses what does not verify, and deduplicates on the
//! webhook's id, answering 200 to a copy without counting it twice. It
//! shows what it received at `GET /deliveries`; with a record file
//! (`dropctl receive --record`, as the local stack runs it) every webhook
//! received is appended there and read back at start, so a restarted
//! receiver still knows what it got and still drops a copy.
//!
//! It can also play an outage ([`Inbox::set_down`]): every webhook is
//! answered 503 and counted as refused, as a host's endpoint that is down
//! behind its load balancer would answer.

use std::collections::{BTreeMap, HashSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use dropline::payments;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Largest webhook body taken.
const MAX_BODY: usize = 64 * 1024;

/// How far a signature's timestamp may be from the receiver's clock.
const TOLERANCE_SECS: i64 = 300;

/// One webhook received, the first time its id came.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Delivered {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub event_id: u64,
    pub buyer: Option<String>,
    pub order_id: Option<String>,
    /// The change's place in the record's outbox (none for reminders).
    pub seq: Option<u64>,
    pub received_at_ms: i64,
}

/// What the receiver has seen.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Summary {
    /// Webhooks received, each id once.
    pub delivered: u64,
    /// Copies of a webhook received before (same id).
    pub duplicates: u64,
    /// Webhooks refused: their signature did not verify.
    pub bad_signatures: u64,
    /// Webhooks answered 503 while the receiver played an outage.
    pub refused: u64,
    /// Deliveries by type (`order.paid`, ...).
    pub by_type: BTreeMap<String, u64>,
}

#[derive(Default)]
struct State {
    delivered: Vec<Delivered>,
    seen: HashSet<String>,
    summary: Summary,
    down: bool,
    /// Webhooks answered 503 during an outage, by the order they name.
    refused_by_order: BTreeMap<String, u64>,
    /// Where each webhook received is appended, if anywhere.
    record: Option<std::fs::File>,
}

/// What the receiver received; shared with whoever started it.
#[derive(Default)]
pub struct Inbox {
    state: Mutex<State>,
}

impl Inbox {
    /// An inbox that appends what it receives to `path` (JSON lines), and
    /// starts from what the file already holds.
    pub fn recorded(path: &std::path::Path) -> std::io::Result<Inbox> {
        let mut state = State::default();
        if let Ok(text) = std::fs::read_to_string(path) {
            // A line cut short by a crash mid-write is the last one: skip it.
            for d in text.lines().filter_map(|l| serde_json::from_str::<Delivered>(l).ok()) {
                state.add(d);
            }
        }
        state.record = Some(std::fs::OpenOptions::new().create(true).append(true).open(path)?);
        Ok(Inbox { state: Mutex::new(state) })
    }

    pub fn summary(&self) -> Summary {
        self.state.lock().expect("not poisoned").summary.clone()
    }

    /// Every webhook received once, in arrival order.
    pub fn deliveries(&self) -> Vec<Delivered> {
        self.state.lock().expect("not poisoned").delivered.clone()
    }

    /// Webhooks about `order_id` answered 503 during an outage.
    pub fn refused_for(&self, order_id: &str) -> u64 {
        self.state.lock().expect("not poisoned").refused_by_order.get(order_id).copied().unwrap_or(0)
    }

    /// Plays an outage (every webhook answered 503) or ends it.
    pub fn set_down(&self, down: bool) {
        self.state.lock().expect("not poisoned").down = down;
    }

    fn take(&self, body: &[u8], signature: Option<&str>, secret: &[u8]) -> (StatusCode, &'static str) {
        let mut state = self.state.lock().expect("not poisoned");
        if state.down {
            state.summary.refused += 1;
            let order = serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|b| b["data"]["order_id"].as_str().map(str::to_owned));
            if let Some(order) = order {
                *state.refused_by_order.entry(order).or_default() += 1;
            }
            return (StatusCode::SERVICE_UNAVAILABLE, "down");
        }
        if payments::verify(secret, signature, body, chrono::Utc::now().timestamp(), TOLERANCE_SECS).is_err() {
            state.summary.bad_signatures += 1;
            return (StatusCode::UNAUTHORIZED, "bad signature");
        }
        #[derive(Deserialize)]
        struct Webhook {
            id: String,
            #[serde(rename = "type")]
            kind: String,
            event_id: u64,
            buyer: Option<String>,
            seq: Option<u64>,
            data: Option<serde_json::Value>,
        }
        let Ok(webhook) = serde_json::from_slice::<Webhook>(body) else {
            return (StatusCode::BAD_REQUEST, "not a webhook");
        };
        if state.seen.contains(&webhook.id) {
            state.summary.duplicates += 1;
            return (StatusCode::OK, "duplicate");
        }
        let order_id = webhook.data.as_ref().and_then(|d| d["order_id"].as_str()).map(str::to_owned);
        let delivered = Delivered {
            id: webhook.id,
            kind: webhook.kind,
            event_id: webhook.event_id,
            buyer: webhook.buyer,
            order_id,
            seq: webhook.seq,
            received_at_ms: chrono::Utc::now().timestamp_millis(),
        };
        if let Some(file) = state.record.as_mut() {
            use std::io::Write;
            let mut line = serde_json::to_vec(&delivered).expect("json");
            line.push(b'\n');
            if let Err(e) = file.write_all(&line) {
                // Not taken: the notifier sends it again.
                tracing::warn!(error = %e, "recording a webhook failed");
                return (StatusCode::INTERNAL_SERVER_ERROR, "not recorded");
            }
        }
        state.add(delivered);
        (StatusCode::OK, "ok")
    }
}

impl State {
    fn add(&mut self, d: Delivered) {
        self.seen.insert(d.id.clone());
        self.summary.delivered += 1;
        *self.summary.by_type.entry(d.kind.clone()).or_default() += 1;
        self.delivered.push(d);
    }
}

/// What `GET /deliveries` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub summary: Summary,
    pub deliveries: Vec<Delivered>,
}

/// Serves `POST /webhooks` and `GET /deliveries` on `listener` until
/// `shutdown`, verifying with `secret`.
pub async fn serve(listener: TcpListener, secret: Vec<u8>, inbox: Arc<Inbox>, shutdown: CancellationToken) {
    let secret: Arc<[u8]> = secret.into();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    continue;
                }
            },
        };
        let (inbox, secret, shutdown) = (inbox.clone(), secret.clone(), shutdown.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, inbox.clone(), secret.clone()));
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    inbox: Arc<Inbox>,
    secret: Arc<[u8]>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let answer = |status: StatusCode, body: Vec<u8>| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert("content-type", "application/json".parse().expect("static"));
        Ok(r)
    };
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/webhooks") => {
            let signature =
                req.headers().get(payments::SIGNATURE_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned);
            let Ok(body) = Limited::new(req.into_body(), MAX_BODY).collect().await else {
                return answer(StatusCode::PAYLOAD_TOO_LARGE, br#"{"error":"body too large"}"#.to_vec());
            };
            let (status, what) = inbox.take(&body.to_bytes(), signature.as_deref(), &secret);
            answer(status, serde_json::to_vec(&serde_json::json!({ "result": what })).expect("json"))
        }
        (&Method::GET, "/deliveries") => {
            let report = Report { summary: inbox.summary(), deliveries: inbox.deliveries() };
            answer(StatusCode::OK, serde_json::to_vec(&report).expect("json"))
        }
        (&Method::GET, "/healthz") => answer(StatusCode::OK, b"{}".to_vec()),
        _ => answer(StatusCode::NOT_FOUND, br#"{"error":"not found"}"#.to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_inbox_remembers_across_a_restart_and_still_drops_a_copy() {
        let secret = dropline::secrets::random();
        let path = std::env::temp_dir().join(format!("dropline-inbox-{}.jsonl", uuid::Uuid::new_v4()));
        let body = serde_json::to_vec(&serde_json::json!({
            "id": "c-1", "type": "order.held", "event_id": 7, "buyer": "ann", "seq": 1,
            "data": { "order_id": "o-1" },
        }))
        .unwrap();
        let signed = || payments::sign(secret.as_bytes(), chrono::Utc::now().timestamp(), &body);
        let first = Inbox::recorded(&path).unwrap();
        assert_eq!(first.take(&body, Some(&signed()), secret.as_bytes()), (StatusCode::OK, "ok"));
        assert_eq!(first.take(b"{}", Some("t=1,v1=00"), secret.as_bytes()).0, StatusCode::UNAUTHORIZED);
        drop(first);
        let again = Inbox::recorded(&path).unwrap();
        assert_eq!(again.summary().delivered, 1);
        assert_eq!(again.deliveries()[0].order_id.as_deref(), Some("o-1"));
        assert_eq!(again.take(&body, Some(&signed()), secret.as_bytes()), (StatusCode::OK, "duplicate"));
        assert_eq!((again.summary().delivered, again.summary().duplicates), (1, 1));
        std::fs::remove_file(&path).unwrap();
    }
}

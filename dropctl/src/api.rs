//! A typed client of Dropline's HTTP API, as a buyer or an admin uses it.

use std::time::Duration;

use anyhow::{bail, Context};
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

/// The server was unreachable or answered 5xx (an order whose records are
/// catching up after a fault, say): worth retrying, as a buyer's app would,
/// with the same idempotency key, after `retry_after` if the server said.
#[derive(Debug, thiserror::Error)]
#[error("unavailable: {what}")]
pub struct Unavailable {
    pub what: String,
    pub retry_after: Option<Duration>,
}

impl Unavailable {
    fn new(what: String) -> Self {
        Self { what, retry_after: None }
    }
}

/// Whether `e` is worth retrying: a transport failure or a 5xx.
pub fn is_retryable(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Unavailable>().is_some() || e.downcast_ref::<reqwest::Error>().is_some()
}

/// How long the server asked a retry of `e` to wait, if it did.
pub fn retry_after(e: &anyhow::Error) -> Option<Duration> {
    e.downcast_ref::<Unavailable>().and_then(|u| u.retry_after)
}

fn retry_after_header(r: &reqwest::Response) -> Option<Duration> {
    r.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).map(Duration::from_secs)
}

fn unavailable_if_5xx(r: &reqwest::Response, what: &str) -> anyhow::Result<()> {
    let status = r.status();
    if status.is_server_error() {
        return Err(
            Unavailable { what: format!("{what} answered {status}"), retry_after: retry_after_header(r) }.into()
        );
    }
    Ok(())
}

/// How long a pooled connection to the ingress may sit idle before it is
/// dropped: under the ingress's keep-alive, which ends at its header-read
/// timeout (5 s by default). A connection idle for as long as that can be
/// reused just as the ingress closes it, and the request sent on it then
/// meets a reset instead of an answer.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(2);

/// A payment opened with the provider: where the buyer pays, and until
/// when (the hold's deadline, extended once when the payment started).
#[derive(Debug, Clone)]
pub struct Checkout {
    pub url: String,
    pub pay_before: chrono::DateTime<chrono::Utc>,
}

#[derive(Clone)]
pub struct Api {
    /// The ingresses' base URLs, each request sent to the next in turn.
    bases: std::sync::Arc<[String]>,
    turn: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    http: reqwest::Client,
}

/// How a purchase request was answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purchase {
    Accepted(Uuid),
    /// Refused at the door with this problem code (sold_out, sale_closed...).
    Refused(String),
    /// Come back later (429 or 503), after this long.
    RetryAfter(Duration),
}

#[derive(Debug, Clone, Deserialize)]
pub struct IntentStatus {
    pub status: String,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub order: Option<Value>,
}

impl Api {
    pub fn new(base: &str) -> anyhow::Result<Self> {
        Self::spread(&[base])
    }

    /// A client of several ingresses behind no balancer: each request goes
    /// to the next one in turn, as a round-robin balancer would send it, so
    /// one buyer's requests land on different ingresses, and a retry after
    /// a transport failure (an ingress gone) goes to another.
    pub fn spread(bases: &[impl AsRef<str>]) -> anyhow::Result<Self> {
        if bases.is_empty() {
            bail!("no ingress URL");
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(512)
            .build()?;
        let bases = bases.iter().map(|b| b.as_ref().trim_end_matches('/').to_owned()).collect();
        Ok(Self { bases, turn: Default::default(), http })
    }

    /// The base URL of the next request.
    fn base(&self) -> &str {
        let turn = self.turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        &self.bases[turn % self.bases.len()]
    }

    /// A host's change of an event (`PATCH /v1/admin/events/{id}`).
    pub async fn change_event(&self, admin_token: &str, event_id: u64, changes: &Value) -> anyhow::Result<Value> {
        let url = format!("{}/v1/admin/events/{event_id}", self.base());
        self.admin(self.http.patch(url), admin_token, changes, StatusCode::OK, "changing the event").await
    }

    pub async fn create_event(&self, admin_token: &str, event: &Value) -> anyhow::Result<Value> {
        let url = format!("{}/v1/admin/events", self.base());
        self.admin(self.http.post(url), admin_token, event, StatusCode::CREATED, "creating the event").await
    }

    /// An admin call with a JSON body; its answer if it is `expected`.
    async fn admin(
        &self,
        request: reqwest::RequestBuilder,
        admin_token: &str,
        body: &Value,
        expected: StatusCode,
        what: &str,
    ) -> anyhow::Result<Value> {
        let r = request.bearer_auth(admin_token).json(body).send().await?;
        let status = r.status();
        unavailable_if_5xx(&r, what)?;
        let answer: Value = r.json().await?;
        if status != expected {
            bail!("{what} failed: {status} {answer}");
        }
        Ok(answer)
    }

    pub async fn purchase(&self, token: &str, event_id: u64, key: &str, quantity: u32) -> anyhow::Result<Purchase> {
        self.purchase_in_turn(token, event_id, key, quantity, None).await
    }

    /// A purchase, with the buyer's waiting-room admission when the event
    /// has a room.
    pub async fn purchase_in_turn(
        &self,
        token: &str,
        event_id: u64,
        key: &str,
        quantity: u32,
        admission: Option<&str>,
    ) -> anyhow::Result<Purchase> {
        let mut request = self
            .http
            .post(format!("{}/v1/events/{event_id}/purchases", self.base()))
            .bearer_auth(token)
            .header("idempotency-key", key)
            .json(&json!({ "quantity": quantity }));
        if let Some(admission) = admission {
            request = request.header("dropline-admission", admission);
        }
        let r = request.send().await?;
        let status = r.status();
        let retry_after = retry_after_header(&r);
        if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
            unavailable_if_5xx(&r, "the purchase")?;
        }
        let body: Value = r.json().await.context("purchase answer is not JSON")?;
        match status {
            StatusCode::ACCEPTED => Ok(Purchase::Accepted(body["intent_id"].as_str().unwrap_or_default().parse()?)),
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                Ok(Purchase::RetryAfter(retry_after.unwrap_or(Duration::from_secs(1))))
            }
            // Another copy of this request is being answered: its answer
            // is this one's too, once it is recorded.
            StatusCode::CONFLICT if body["code"] == "idempotency_in_progress" => {
                Ok(Purchase::RetryAfter(retry_after.unwrap_or(Duration::from_secs(1))))
            }
            StatusCode::CONFLICT => Ok(Purchase::Refused(body["code"].as_str().unwrap_or("conflict").to_owned())),
            // The turn ran out before the purchase was made.
            StatusCode::FORBIDDEN if body["code"] == "turn_lapsed" => Ok(Purchase::Refused("turn_lapsed".into())),
            _ => bail!("purchase answered {status}: {body}"),
        }
    }

    pub async fn intent(&self, token: &str, intent_id: Uuid) -> anyhow::Result<IntentStatus> {
        let r = self.http.get(format!("{}/v1/intents/{intent_id}", self.base())).bearer_auth(token).send().await?;
        let status = r.status();
        unavailable_if_5xx(&r, "intent status")?;
        // The buyer was told 202, so the intent exists: a 404 means its
        // record was lost with Redis and it is not decided (so not in MySQL)
        // yet. Ask again.
        if status == StatusCode::NOT_FOUND {
            return Err(Unavailable::new(format!("intent {intent_id} not known yet")).into());
        }
        if status != StatusCode::OK {
            bail!("intent {intent_id} answered {status}: {}", r.text().await.unwrap_or_default());
        }
        Ok(r.json().await?)
    }

    /// Opens a payment, then completes it at the provider's checkout and
    /// waits until the provider's webhook was acknowledged. Returns what
    /// Dropline said of it: captured or refund_required.
    /// `order_expired` when the hold lapsed before the payment could start.
    pub async fn pay(&self, token: &str, order_id: Uuid, webhook_copies: u32) -> anyhow::Result<String> {
        match self.start_payment(token, order_id).await? {
            Ok(checkout) => self.confirm(&checkout.url, webhook_copies).await,
            Err(code) => Ok(code),
        }
    }

    /// Opens a payment with the provider; returns its checkout, or the
    /// problem code when the order can no longer be paid (it expired).
    pub async fn start_payment(&self, token: &str, order_id: Uuid) -> anyhow::Result<Result<Checkout, String>> {
        let r =
            self.http.post(format!("{}/v1/orders/{order_id}/payments", self.base())).bearer_auth(token).send().await?;
        let status = r.status();
        unavailable_if_5xx(&r, "starting the payment")?;
        let body: Value = r.json().await?;
        if status == StatusCode::CONFLICT {
            return Ok(Err(body["code"].as_str().unwrap_or("conflict").to_owned()));
        }
        if status != StatusCode::CREATED {
            bail!("starting the payment answered {status}: {body}");
        }
        let pay_before = body["pay_before"].as_str().context("no pay_before")?;
        Ok(Ok(Checkout {
            url: body["checkout_url"].as_str().context("no checkout_url")?.to_owned(),
            pay_before: chrono::DateTime::parse_from_rfc3339(pay_before)?.with_timezone(&chrono::Utc),
        }))
    }

    /// The buyer pays at the provider's checkout; the provider sends its
    /// webhook `copies` times (as providers sometimes do) and answers once
    /// Dropline acknowledged it. Returns Dropline's answer to the webhook.
    pub async fn confirm(&self, checkout: &str, copies: u32) -> anyhow::Result<String> {
        self.confirm_as(checkout, &format!("copies={copies}")).await
    }

    /// A confirmation the provider turns into a capture announced twice,
    /// under two event ids (paysim's `outcome=double`). Returns Dropline's
    /// answer to the first webhook.
    pub async fn confirm_twice(&self, checkout: &str) -> anyhow::Result<String> {
        self.confirm_as(checkout, "outcome=double").await
    }

    async fn confirm_as(&self, checkout: &str, how: &str) -> anyhow::Result<String> {
        let r = self.http.post(format!("{checkout}/confirm?wait=true&{how}")).send().await?;
        let status = r.status();
        unavailable_if_5xx(&r, "checkout")?;
        let body: Value = r.json().await?;
        if !status.is_success() {
            bail!("checkout answered {status}: {body}");
        }
        let webhook: Value = serde_json::from_str(body["webhook_body"].as_str().unwrap_or("{}"))?;
        Ok(webhook["status"].as_str().unwrap_or("unknown").to_owned())
    }

    /// A card the provider declines: true once the provider said so (402)
    /// and Dropline acknowledged the `payment.failed` webhook.
    pub async fn confirm_declined(&self, checkout: &str) -> anyhow::Result<bool> {
        let r = self.http.post(format!("{checkout}/confirm?wait=true&outcome=decline")).send().await?;
        unavailable_if_5xx(&r, "checkout")?;
        Ok(r.status() == StatusCode::PAYMENT_REQUIRED)
    }

    /// A confirmation the provider captures but does not answer in time
    /// (paysim's `outcome=timeout`; its webhook follows `delay_ms` later).
    /// True when it timed out as asked.
    pub async fn confirm_timing_out(&self, checkout: &str, delay_ms: u64) -> anyhow::Result<bool> {
        let r = self.http.post(format!("{checkout}/confirm?outcome=timeout&delay_ms={delay_ms}")).send().await?;
        Ok(r.status() == StatusCode::GATEWAY_TIMEOUT)
    }

    /// The order's state as its buyer sees it (held, paid, cancelled,
    /// expired, or voided when the record refused the hold).
    pub async fn order_state(&self, token: &str, order_id: Uuid) -> anyhow::Result<String> {
        let r = self.http.get(format!("{}/v1/orders/{order_id}", self.base())).bearer_auth(token).send().await?;
        let status = r.status();
        unavailable_if_5xx(&r, "order")?;
        let body: Value = r.json().await?;
        if status != StatusCode::OK {
            bail!("order {order_id} answered {status}: {body}");
        }
        Ok(body["state"].as_str().context("no state")?.to_owned())
    }

    /// Cancels a hold; returns the order's state afterwards.
    pub async fn cancel(&self, token: &str, order_id: Uuid) -> anyhow::Result<String> {
        let r =
            self.http.post(format!("{}/v1/orders/{order_id}/cancel", self.base())).bearer_auth(token).send().await?;
        unavailable_if_5xx(&r, "cancel")?;
        let body: Value = r.json().await?;
        Ok(body["state"].as_str().or_else(|| body["code"].as_str()).unwrap_or("unknown").to_owned())
    }

    /// A waiting room's published draw.
    pub async fn draw(&self, event_id: u64) -> anyhow::Result<dropline::room::draw::PublishedDraw> {
        let r = self.http.get(format!("{}/v1/events/{event_id}/waiting-room/draw", self.base())).send().await?;
        let status = r.status();
        unavailable_if_5xx(&r, "draw")?;
        if status != StatusCode::OK {
            let body: Value = r.json().await.unwrap_or(Value::Null);
            bail!("event {event_id}'s draw answered {status}: {body}");
        }
        Ok(r.json().await?)
    }

    /// A waiting room as anyone may see it (`GET /v1/events/{id}/waiting-room`).
    pub async fn room(&self, event_id: u64) -> anyhow::Result<Value> {
        let r = self.http.get(format!("{}/v1/events/{event_id}/waiting-room", self.base())).send().await?;
        let status = r.status();
        unavailable_if_5xx(&r, "waiting room")?;
        let body: Value = r.json().await.unwrap_or(Value::Null);
        if status != StatusCode::OK {
            bail!("event {event_id}'s waiting room answered {status}: {body}");
        }
        Ok(body)
    }

    /// Gives an event a waiting room whose pre-queue opens now.
    pub async fn set_room(
        &self,
        admin_token: &str,
        event_id: u64,
        outflow_per_sec: u32,
        time_to_act_secs: u32,
        proof_of_work_bits: u8,
    ) -> anyhow::Result<Value> {
        let r = self
            .http
            .put(format!("{}/v1/admin/events/{event_id}/waiting-room", self.base()))
            .bearer_auth(admin_token)
            .json(&json!({
                "prequeue_opens_at": chrono::Utc::now(),
                "outflow_per_sec": outflow_per_sec,
                "time_to_act_secs": time_to_act_secs,
                "proof_of_work_bits": proof_of_work_bits,
            }))
            .send()
            .await?;
        let status = r.status();
        let body: Value = r.json().await?;
        if !status.is_success() {
            bail!("setting the waiting room failed: {status} {body}");
        }
        Ok(body)
    }

    /// Joins an event's waiting room (or gets one's ticket back), solving
    /// its proof of work first when it asks for one.
    pub async fn join(&self, token: &str, event_id: u64, proof_of_work: bool) -> anyhow::Result<Ticket> {
        let mut request = self.http.post(format!("{}/v1/events/{event_id}/queue", self.base())).bearer_auth(token);
        if proof_of_work {
            let r = self.http.get(format!("{}/v1/events/{event_id}/queue/challenge", self.base())).bearer_auth(token);
            let r = r.send().await?;
            unavailable_if_5xx(&r, "challenge")?;
            let body: Value = r.json().await?;
            let challenge = body["challenge"].as_str().context("no challenge")?.to_owned();
            let bits = body["difficulty_bits"].as_u64().context("no difficulty")? as u8;
            let proof = tokio::task::spawn_blocking(move || dropline::room::proof::solve(&challenge, bits)).await?;
            request = request.header("dropline-proof", proof);
        }
        self.ticket(request.send().await?, "join").await
    }

    /// Where the buyer's ticket stands.
    pub async fn standing(&self, token: &str, event_id: u64) -> anyhow::Result<Ticket> {
        let r = self.http.get(format!("{}/v1/events/{event_id}/queue", self.base())).bearer_auth(token).send().await?;
        self.ticket(r, "queue").await
    }

    /// Opens the event stream at `path` (`/v1/intents/{id}/events`,
    /// `/v1/events/{id}/queue/events`), resuming after `last_event_id`.
    pub async fn stream(&self, token: &str, path: &str, last_event_id: Option<&str>) -> anyhow::Result<Opened> {
        let mut request = self
            .http
            .get(format!("{}{path}", self.base()))
            .bearer_auth(token)
            .header("accept", "text/event-stream")
            .timeout(STREAM_TIMEOUT);
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let r = request.send().await?;
        unavailable_if_5xx(&r, path)?;
        match r.status() {
            StatusCode::TOO_MANY_REQUESTS => Err(Unavailable {
                what: format!("{path} answered {}", r.status()),
                retry_after: retry_after_header(&r),
            }
            .into()),
            StatusCode::NO_CONTENT => Ok(Opened::Ended),
            StatusCode::OK => Ok(Opened::Stream(EventStream { response: r, buffer: Vec::new(), heartbeats: 0 })),
            status => bail!("{path} answered {status}: {}", r.text().await.unwrap_or_default()),
        }
    }

    async fn ticket(&self, r: reqwest::Response, what: &str) -> anyhow::Result<Ticket> {
        let status = r.status();
        unavailable_if_5xx(&r, what)?;
        if status == StatusCode::TOO_MANY_REQUESTS {
            return Err(
                Unavailable { what: format!("{what} answered {status}"), retry_after: retry_after_header(&r) }.into()
            );
        }
        if !status.is_success() {
            bail!("{what} answered {status}: {}", r.text().await.unwrap_or_default());
        }
        Ok(r.json().await?)
    }
}

/// How long a stream may stay open.
const STREAM_TIMEOUT: Duration = Duration::from_secs(3600);

/// What opening an event stream got.
pub enum Opened {
    Stream(EventStream),
    /// `204`: the state is final and the buyer has it; nothing more comes.
    Ended,
}

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamEvent {
    pub id: Option<String>,
    pub name: String,
    pub data: String,
}

impl StreamEvent {
    pub fn json(&self) -> anyhow::Result<Value> {
        Ok(serde_json::from_str(&self.data)?)
    }
}

/// A `text/event-stream` answer, read event by event.
pub struct EventStream {
    response: reqwest::Response,
    buffer: Vec<u8>,
    /// Comment-only blocks (the server's heartbeats) read so far.
    pub heartbeats: u64,
}

impl EventStream {
    /// The next event; `None` once the server ended the stream.
    pub async fn next(&mut self) -> anyhow::Result<Option<StreamEvent>> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
                match parse_event(&String::from_utf8_lossy(&block)) {
                    Some(event) => return Ok(Some(event)),
                    None => self.heartbeats += 1,
                }
                continue;
            }
            match self.response.chunk().await? {
                Some(bytes) => self.buffer.extend_from_slice(&bytes),
                None => return Ok(None),
            }
        }
    }
}

/// An event block's fields; `None` for a block with no data (a comment).
fn parse_event(block: &str) -> Option<StreamEvent> {
    let (mut id, mut name, mut data) = (None, "message".to_owned(), Vec::new());
    for line in block.lines() {
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => id = Some(value.to_owned()),
            "event" => name = value.to_owned(),
            "data" => data.push(value),
            _ => {}
        }
    }
    (!data.is_empty()).then(|| StreamEvent { id, name, data: data.join("\n") })
}

/// A waiting-room ticket as its buyer sees it.
#[derive(Debug, Clone, Deserialize)]
pub struct Ticket {
    pub ticket_id: Uuid,
    pub status: String,
    #[serde(default)]
    pub place: Option<u64>,
    #[serde(default)]
    pub estimated_wait_secs: Option<u64>,
    #[serde(default)]
    pub admission_token: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_blocks_read_as_events_and_comments_as_none() {
        let event = parse_event("retry: 2000\nid: held\nevent: held\ndata: {\"a\":\ndata: 1}\n\n").unwrap();
        assert_eq!(event, StreamEvent { id: Some("held".into()), name: "held".into(), data: "{\"a\":\n1}".into() });
        assert_eq!(event.json().unwrap()["a"], 1);
        assert_eq!(parse_event(":\n\n"), None, "a heartbeat");
        assert_eq!(parse_event("data: x\n\n").unwrap().name, "message");
    }
}

//! One webhook: what it carries, how it is signed and sent, and how long to
//! wait before the next attempt.
//!
//! Every webhook is a JSON body POSTed to the host's endpoint with
//! - `dropline-webhook-id`: the body's `id` (the change's id, or a
//!   reminder's), for the host's logs. The host deduplicates on the body's
//!   `id`, which the signature covers; the header is not signed;
//! - `dropline-signature`: `t=<unix seconds>,v1=<hex HMAC-SHA256 of
//!   "<t>.<body>">`, the same scheme as the payment webhooks Dropline itself
//!   checks (`dropline::payments::verify` checks these too).
//!
//! Any 2xx answer delivers it. Anything else (another status, a refused
//! connection, a timeout) is a failed attempt; redirects are not followed.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use dropline::messages::{Change, ChangeSubject};
use dropline::payments;
use dropline::secrets::Secret;
use serde_json::{json, Value};
use uuid::Uuid;

/// The header carrying the webhook's id.
pub const ID_HEADER: &str = "dropline-webhook-id";

/// The body of a change's webhook.
pub fn change_body(change: &Change) -> Value {
    let data = match &change.subject {
        ChangeSubject::Order { order_id, quantity, amount_cents, expires_at_ms, state, .. } => json!({
            "order_id": order_id,
            "state": state,
            "quantity": quantity,
            "amount_cents": amount_cents,
            "expires_at": rfc3339(*expires_at_ms),
        }),
        ChangeSubject::Refund { order_id, refund_id, payment_id, amount_cents, state, .. } => json!({
            "order_id": order_id,
            "refund_id": refund_id,
            "payment_id": payment_id,
            "refund_state": state,
            "amount_cents": amount_cents,
        }),
        ChangeSubject::Event { change, capacity, oversell_allowance, starts_at_ms, holder } => {
            let mut data = json!({
                "event_change": change,
                "capacity": capacity,
                "oversell_allowance": oversell_allowance,
                "starts_at": rfc3339(*starts_at_ms),
            });
            // Told to a ticket holder: about their order.
            if let Some(h) = holder {
                data["order_id"] = json!(h.order_id);
            }
            data
        }
        ChangeSubject::Payment { order_id, amount_cents, expires_at_ms, step, payment_id, reason, .. } => {
            let mut data = json!({
                "order_id": order_id,
                "payment_step": step,
                "amount_cents": amount_cents,
                "expires_at": rfc3339(*expires_at_ms),
            });
            // A start names no payment and no reason: absent, not null.
            for (field, value) in [("payment_id", payment_id), ("reason", reason)] {
                if let Some(v) = value {
                    data[field] = json!(v);
                }
            }
            data
        }
    };
    let mut body = json!({
        "id": change.change_id,
        "type": change.kind(),
        "created_at": rfc3339(change.changed_at_ms),
        "seq": change.seq,
        "event_id": change.event_id,
        "data": data,
    });
    // A change of the event not told to a holder concerns all its buyers,
    // none in particular.
    if let Some(buyer) = change.user_id() {
        body["buyer"] = json!(buyer);
    }
    body
}

/// What a reminder is about: a hold still held shortly before its deadline.
#[derive(Debug, Clone)]
pub struct Reminder {
    pub id: Uuid,
    pub event_id: u64,
    pub order_id: Uuid,
    pub user_id: String,
    pub quantity: u32,
    pub amount_cents: u64,
    pub expires_at: DateTime<Utc>,
}

pub use dropline::messages::REMINDER_KIND;

/// The body of a reminder's webhook.
pub fn reminder_body(r: &Reminder) -> Value {
    json!({
        "id": r.id,
        "type": REMINDER_KIND,
        "created_at": rfc3339(Utc::now().timestamp_millis()),
        "event_id": r.event_id,
        "buyer": r.user_id,
        "data": {
            "order_id": r.order_id,
            "state": "held",
            "quantity": r.quantity,
            "amount_cents": r.amount_cents,
            "expires_at": rfc3339(r.expires_at.timestamp_millis()),
        },
    })
}

fn rfc3339(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms).unwrap_or_default().to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Why an attempt failed: short, for the logs and the record.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Failed {
    #[error("the endpoint answered {0}")]
    Status(u16),
    #[error("{0}")]
    Transport(String),
}

/// The host's endpoint and the client that sends to it. Cheap to clone.
#[derive(Clone)]
pub struct Webhooks {
    client: reqwest::Client,
    url: reqwest::Url,
    secret: Secret,
}

impl Webhooks {
    pub fn new(url: &str, secret: Secret, attempt_timeout: Duration) -> Result<Self, WebhooksError> {
        let client = reqwest::Client::builder()
            .timeout(attempt_timeout)
            .connect_timeout(attempt_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("dropline-notifier/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let url = reqwest::Url::parse(url).map_err(|e| WebhooksError::Url(e.to_string()))?;
        Ok(Self { client, url, secret })
    }

    /// One attempt at delivering `body` under `id`.
    pub async fn send(&self, id: Uuid, body: &Value) -> Result<(), Failed> {
        let body = serde_json::to_vec(body).expect("webhook bodies serialize");
        let signature = payments::sign(self.secret.expose(), Utc::now().timestamp(), &body);
        let sent = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(ID_HEADER, id.to_string())
            .header(payments::SIGNATURE_HEADER, signature)
            .body(body)
            .send()
            .await;
        match sent {
            Ok(response) if response.status().is_success() => Ok(()),
            Ok(response) => Err(Failed::Status(response.status().as_u16())),
            // Without the URL, which may carry a token.
            Err(e) => Err(Failed::Transport(transport_problem(e))),
        }
    }
}

fn transport_problem(e: reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "could not connect".into()
    } else {
        e.without_url().to_string().chars().take(200).collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WebhooksError {
    #[error("http client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("notify url: {0}")]
    Url(String),
}

pub use dropline::retry::Backoff;

#[cfg(test)]
mod tests {
    use super::*;
    use dropline::messages::OrderState;

    /// The bodies have exactly the fields `docs/openapi.json` gives the
    /// host's webhook (`Notification`), its required ones included.
    #[test]
    fn the_bodies_are_what_the_api_document_promises() {
        let doc: Value = serde_json::from_str(include_str!("../../docs/openapi.json")).unwrap();
        let schema = &doc["components"]["schemas"]["Notification"];
        let check = |body: &Value, schema: &Value, at: &str| {
            let fields: Vec<&String> = body.as_object().unwrap().keys().collect();
            for f in &fields {
                assert!(schema["properties"].get(f.as_str()).is_some(), "{at}.{f} is not in the document");
            }
            for r in schema["required"].as_array().unwrap() {
                assert!(body.get(r.as_str().unwrap()).is_some(), "{at}.{r} is required by the document");
            }
        };
        let held = change(OrderState::Held);
        let kinds = &schema["properties"]["type"]["enum"];
        let refund = Change {
            subject: ChangeSubject::Refund {
                order_id: Uuid::new_v4(),
                user_id: "buyer-1".into(),
                refund_id: Uuid::new_v4(),
                payment_id: "pay_1".into(),
                amount_cents: 2000,
                state: dropline::messages::RefundState::Refunded,
            },
            ..held.clone()
        };
        let declined = Change {
            subject: ChangeSubject::Payment {
                order_id: Uuid::new_v4(),
                user_id: "buyer-1".into(),
                amount_cents: 2000,
                expires_at_ms: 1_700_000_700_000,
                step: dropline::messages::PaymentStep::Failed,
                payment_id: Some("pay_1".into()),
                reason: Some("card_declined".into()),
            },
            ..held.clone()
        };
        let rescheduled = Change {
            subject: ChangeSubject::Event {
                change: dropline::messages::EventChange::Rescheduled,
                capacity: 500,
                oversell_allowance: 10,
                starts_at_ms: 1_800_000_000_000,
                holder: None,
            },
            ..held.clone()
        };
        let told_to_ann = Change {
            subject: ChangeSubject::Event {
                change: dropline::messages::EventChange::Rescheduled,
                capacity: 500,
                oversell_allowance: 10,
                starts_at_ms: 1_800_000_000_000,
                holder: Some(dropline::messages::Holder { order_id: Uuid::nil(), user_id: "ann".into() }),
            },
            ..held.clone()
        };
        assert_eq!(change_body(&told_to_ann)["buyer"], "ann");
        assert!(change_body(&rescheduled).get("buyer").is_none());
        for body in [
            change_body(&rescheduled),
            change_body(&told_to_ann),
            change_body(&declined),
            change_body(&held),
            change_body(&change(OrderState::Voided)),
            reminder_body(&reminder()),
            change_body(&refund),
        ] {
            check(&body, schema, "body");
            check(&body["data"], &schema["properties"]["data"], "data");
            assert!(kinds.as_array().unwrap().contains(&body["type"]), "{} is in the document's enum", body["type"]);
        }
    }

    fn change(state: OrderState) -> Change {
        Change {
            change_id: Uuid::new_v4(),
            seq: 9,
            event_id: 4,
            changed_at_ms: 1_700_000_000_123,
            subject: ChangeSubject::Order {
                order_id: Uuid::new_v4(),
                user_id: "buyer-1".into(),
                quantity: 2,
                amount_cents: 2000,
                expires_at_ms: 1_700_000_600_000,
                state,
            },
        }
    }

    fn reminder() -> Reminder {
        Reminder {
            id: Uuid::new_v4(),
            event_id: 4,
            order_id: Uuid::new_v4(),
            user_id: "buyer-1".into(),
            quantity: 1,
            amount_cents: 1000,
            expires_at: Utc::now(),
        }
    }

    #[test]
    fn a_change_names_its_id_kind_and_buyer_and_verifies_with_the_payment_scheme() {
        let change = change(OrderState::Held);
        let body = change_body(&change);
        assert_eq!(body["id"], change.change_id.to_string());
        assert_eq!(body["type"], "order.held");
        assert_eq!(body["buyer"], "buyer-1");
        assert_eq!(body["created_at"], "2023-11-14T22:13:20.123Z");
        let secret = dropline::secrets::random();
        let bytes = serde_json::to_vec(&body).unwrap();
        let header = payments::sign(secret.as_bytes(), 1_000, &bytes);
        assert!(payments::verify(secret.as_bytes(), Some(&header), &bytes, 1_010, 300).is_ok());
        assert!(payments::verify(b"another-secret-of-thirty-two-bytes!", Some(&header), &bytes, 1_010, 300).is_err());
    }
}

//! The payment provider's webhook contract: its body and its signature.
//!
//! The provider signs `"<unix seconds>.<raw body>"` with HMAC-SHA256 under a
//! shared secret and sends `Dropline-Signature: t=<unix seconds>,v1=<hex>`.
//! Binding the timestamp into the MAC makes a captured request useless once
//! it is older than the tolerance.
//!
//! The header is read by anyone who can reach the endpoint, so its size and
//! its number of `v1` entries are bounded before any MAC is computed: an
//! attacker cannot make the ingress hash the body thousands of times.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use uuid::Uuid;

pub const SIGNATURE_HEADER: &str = "dropline-signature";
/// The webhook type that confirms a payment.
pub const PAYMENT_SUCCEEDED: &str = "payment.succeeded";
/// The webhook type of an attempt to pay that the provider declined. The
/// payment stays open: the buyer may try again.
pub const PAYMENT_FAILED: &str = "payment.failed";
/// Most `v1` entries a signature header may carry: two cover a secret
/// rollover (old and new); a few more leave the provider room.
pub const MAX_SIGNATURES: usize = 4;
/// Longest signature header accepted: the timestamp and [`MAX_SIGNATURES`]
/// hex SHA-256 values with room to spare.
pub const MAX_SIGNATURE_HEADER_BYTES: usize = 512;

type HmacSha256 = Hmac<Sha256>;

/// What the provider posts when a payment succeeded. Unknown fields are
/// ignored: a provider adds fields to its webhooks without notice, and
/// refusing them would refuse every payment from then on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentWebhook {
    /// Unique per webhook event; a redelivery carries the same id.
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub payment_id: String,
    pub order_id: Uuid,
    pub amount_cents: u64,
    /// ISO 4217, in whatever case the provider writes it (some send "eur").
    pub currency: String,
    pub created_at: i64,
    /// Why an attempt failed (`payment.failed` only), in the provider's
    /// words: `card_declined`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
}

/// The longest provider id the record keeps (`payments.payment_id` and
/// `payments.provider_event_id`).
pub const MAX_PROVIDER_ID_BYTES: usize = 128;

impl PaymentWebhook {
    /// Why the record could not keep this webhook, if it could not. The
    /// ingress checks it before acknowledging: a payment taken in must never
    /// be lost on its way to MySQL.
    pub fn problem(&self) -> Option<String> {
        [("id", &self.id), ("payment_id", &self.payment_id)].into_iter().find_map(|(field, value)| {
            (value.is_empty() || value.len() > MAX_PROVIDER_ID_BYTES)
                .then(|| format!("{field}: must be 1 to {MAX_PROVIDER_ID_BYTES} bytes"))
        })
    }
}

/// The ingress asks the provider to start a payment for an order. The order
/// id doubles as the provider's idempotency key: one payment per order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatePayment {
    pub order_id: Uuid,
    pub amount_cents: u64,
    pub currency: String,
}

/// The provider's answer: where the buyer completes the payment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentSession {
    pub payment_id: String,
    pub checkout_url: String,
    pub amount_cents: u64,
    pub currency: String,
}

/// Dropline asks the provider to give a payment's money back, with its own
/// refund id as the `Idempotency-Key`: a call retried after a timeout or a
/// crash names the same refund, and the provider makes it once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateRefund {
    pub payment_id: String,
    pub amount_cents: u64,
}

/// The provider's refund: its id is unique per refund made, and the same
/// for every call under one idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderRefund {
    pub refund_id: String,
    pub payment_id: String,
    pub amount_cents: u64,
    /// The key it was made under: Dropline's refund id.
    pub idempotency_key: String,
    /// `succeeded` once the money is on its way back; a provider may answer
    /// `pending` first (asked again, the key answers its state then).
    pub status: String,
    pub created_at: i64,
}

/// The status of a refund the provider has made.
pub const REFUND_SUCCEEDED: &str = "succeeded";

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the signature header is missing")]
    Missing,
    #[error("the signature header is malformed")]
    Malformed,
    #[error("the signature header is longer than {MAX_SIGNATURE_HEADER_BYTES} bytes")]
    TooLong,
    #[error("the signature header carries more than {MAX_SIGNATURES} signatures")]
    TooManySignatures,
    #[error("the signature's timestamp is outside the tolerance")]
    Stale,
    #[error("the signature does not match")]
    Mismatch,
}

/// The header value for `body` signed at `timestamp` (Unix seconds).
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mac = keyed(secret, timestamp, body);
    format!("t={timestamp},v1={}", hex::encode(mac.finalize().into_bytes()))
}

fn keyed(secret: &[u8], timestamp: i64, body: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret).expect("hmac takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// Checks a signature header against the raw body. The header's length and
/// its number of signatures are checked before any MAC is computed; the body
/// is then hashed once and each signature compared in constant time
/// (`verify_slice`). The timestamp must be within `tolerance_secs` of `now`
/// either way.
pub fn verify(
    secret: &[u8],
    header: Option<&str>,
    body: &[u8],
    now: i64,
    tolerance_secs: i64,
) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    if header.len() > MAX_SIGNATURE_HEADER_BYTES {
        return Err(SignatureError::TooLong);
    }
    let mut timestamp = None;
    let mut signatures = Vec::with_capacity(MAX_SIGNATURES);
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => timestamp = Some(v.parse::<i64>().map_err(|_| SignatureError::Malformed)?),
            Some(("v1", v)) => {
                if signatures.len() == MAX_SIGNATURES {
                    return Err(SignatureError::TooManySignatures);
                }
                signatures.push(hex::decode(v).map_err(|_| SignatureError::Malformed)?);
            }
            Some(_) => {}
            None => return Err(SignatureError::Malformed),
        }
    }
    let timestamp = timestamp.ok_or(SignatureError::Malformed)?;
    if signatures.is_empty() {
        return Err(SignatureError::Malformed);
    }
    // abs_diff: a timestamp near i64::MIN must not overflow the subtraction.
    let tolerance = u64::try_from(tolerance_secs).unwrap_or(0);
    if now.abs_diff(timestamp) > tolerance {
        return Err(SignatureError::Stale);
    }
    // Several v1 values let the provider roll its secret without downtime.
    // The body is hashed once; each comparison finishes a copy of the state.
    let mac = keyed(secret, timestamp, body);
    let matched = signatures.iter().any(|sig| mac.clone().verify_slice(sig).is_ok());
    if matched {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_body_verifies() {
        let h = sign(b"k", 1000, b"{}");
        assert_eq!(verify(b"k", Some(&h), b"{}", 1010, 300), Ok(()));
    }

    #[test]
    fn tampering_staleness_and_garbage_are_refused() {
        let h = sign(b"k", 1000, b"{}");
        assert_eq!(verify(b"k", Some(&h), b"{ }", 1000, 300), Err(SignatureError::Mismatch));
        assert_eq!(verify(b"other", Some(&h), b"{}", 1000, 300), Err(SignatureError::Mismatch));
        assert_eq!(verify(b"k", Some(&h), b"{}", 1301, 300), Err(SignatureError::Stale));
        assert_eq!(verify(b"k", Some(&h), b"{}", 699, 300), Err(SignatureError::Stale));
        assert_eq!(verify(b"k", None, b"{}", 1000, 300), Err(SignatureError::Missing));
        assert_eq!(verify(b"k", Some("t=x,v1=00"), b"{}", 1000, 300), Err(SignatureError::Malformed));
        assert_eq!(verify(b"k", Some("t=1000"), b"{}", 1000, 300), Err(SignatureError::Malformed));
        assert_eq!(verify(b"k", Some("t=1000,v1=zz"), b"{}", 1000, 300), Err(SignatureError::Malformed));
    }

    #[test]
    fn timestamps_at_the_ends_of_i64_are_stale_not_a_panic() {
        for (now, t) in
            [(1000, i64::MIN), (1000, i64::MIN + 1), (1000, i64::MAX), (i64::MIN, i64::MAX), (i64::MAX, i64::MIN)]
        {
            let h = format!("t={t},v1={}", "00".repeat(32));
            assert_eq!(verify(b"k", Some(&h), b"{}", now, 300), Err(SignatureError::Stale), "now {now}, t {t}");
        }
    }

    #[test]
    fn a_rolled_secret_verifies_within_the_bound() {
        let good = sign(b"new", 1000, b"{}");
        let old = sign(b"old", 1000, b"{}");
        let v1 = |h: &str| h.split_once(",v1=").unwrap().1.to_owned();
        let pair = format!("t=1000,v1={},v1={}", v1(&old), v1(&good));
        assert_eq!(verify(b"new", Some(&pair), b"{}", 1000, 300), Ok(()));
        let four = format!("t=1000,v1={0},v1={0},v1={0},v1={1}", v1(&old), v1(&good));
        assert_eq!(verify(b"new", Some(&four), b"{}", 1000, 300), Ok(()));
    }

    #[test]
    fn too_many_signatures_or_a_long_header_are_refused_before_hashing() {
        let good = sign(b"k", 1000, b"{}");
        let sig = good.split_once(",v1=").unwrap().1;
        // The valid signature last: refused all the same, on the count alone.
        let five = format!("t=1000{},v1={sig}", ",v1=00".repeat(MAX_SIGNATURES));
        assert!(five.len() <= MAX_SIGNATURE_HEADER_BYTES);
        assert_eq!(verify(b"k", Some(&five), b"{}", 1000, 300), Err(SignatureError::TooManySignatures));
        let flood = format!("t=1000{}", ",v1=00".repeat(5_000));
        assert_eq!(verify(b"k", Some(&flood), b"{}", 1000, 300), Err(SignatureError::TooLong));
        let padded = format!("t=1000,v1={sig},{}", "x=y,".repeat(200));
        assert_eq!(verify(b"k", Some(&padded), b"{}", 1000, 300), Err(SignatureError::TooLong));
    }

    #[test]
    fn unknown_webhook_fields_are_accepted() {
        let body = r#"{"id":"evt_1","type":"payment.succeeded","payment_id":"pay_1",
            "order_id":"6f1c1d7e-2b1a-4c8e-9a59-3a8f1c1d7e2b","amount_cents":4500,"currency":"eur",
            "created_at":1000,"livemode":false,"metadata":{"k":"v"}}"#;
        let hook: PaymentWebhook = serde_json::from_str(body).unwrap();
        assert_eq!((hook.payment_id.as_str(), hook.amount_cents, hook.currency.as_str()), ("pay_1", 4500, "eur"));
    }
}

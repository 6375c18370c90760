//! The payment provider's webhook contract: its body and its signature.
//!
//! The provider signs `"<unix seconds>.<raw body>"` with HMAC-SHA256 under a
//! shared secret and sends `Dropline-Signature: t=<unix seconds>,v1=<hex>`.
//! Binding the timestamp into the MAC makes a captured request useless once
//! it is older than the tolerance.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use uuid::Uuid;

pub const SIGNATURE_HEADER: &str = "dropline-signature";
/// The webhook type that confirms a payment.
pub const PAYMENT_SUCCEEDED: &str = "payment.succeeded";

type HmacSha256 = Hmac<Sha256>;

/// What the provider posts when a payment succeeded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaymentWebhook {
    /// Unique per webhook event; a redelivery carries the same id.
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub payment_id: String,
    pub order_id: Uuid,
    pub amount_cents: u64,
    pub currency: String,
    pub created_at: i64,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the signature header is missing")]
    Missing,
    #[error("the signature header is malformed")]
    Malformed,
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

/// Checks a signature header against the raw body. The comparison is
/// constant-time (`verify_slice`); the timestamp must be within
/// `tolerance_secs` of `now` either way.
pub fn verify(
    secret: &[u8],
    header: Option<&str>,
    body: &[u8],
    now: i64,
    tolerance_secs: i64,
) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => timestamp = Some(v.parse::<i64>().map_err(|_| SignatureError::Malformed)?),
            Some(("v1", v)) => signatures.push(hex::decode(v).map_err(|_| SignatureError::Malformed)?),
            Some(_) => {}
            None => return Err(SignatureError::Malformed),
        }
    }
    let timestamp = timestamp.ok_or(SignatureError::Malformed)?;
    if signatures.is_empty() {
        return Err(SignatureError::Malformed);
    }
    if (now - timestamp).abs() > tolerance_secs {
        return Err(SignatureError::Stale);
    }
    // Several v1 values let the provider roll its secret without downtime.
    let matched = signatures.iter().any(|sig| keyed(secret, timestamp, body).verify_slice(sig).is_ok());
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
}

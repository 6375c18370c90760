//! Reading requests: the bearer token, the Idempotency-Key, ids in paths and
//! JSON bodies, each failure mapped to its problem code.

use axum::http::{header, HeaderMap};
use dropline::auth::{Claims, Tokens};
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::problem::{ErrorCode, Problem};

pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// A buyer's token: signed with the buyer secret, for the buyer audience.
pub fn bearer(tokens: &Tokens, headers: &HeaderMap) -> Result<Claims, Problem> {
    let token = token_of(headers)?;
    tokens.buyer.verify(token).map_err(|e| Problem::new(ErrorCode::Unauthorized).detail(e.to_string()))
}

/// An admin's token: signed with the admin secret, for the admin audience.
/// A valid buyer token is told apart (403) from no valid token at all (401).
pub fn admin(tokens: &Tokens, headers: &HeaderMap) -> Result<Claims, Problem> {
    let token = token_of(headers)?;
    tokens.admin.verify(token).map_err(|e| {
        if tokens.buyer.verify(token).is_ok() {
            Problem::new(ErrorCode::Forbidden).detail("a buyer token does not grant the admin API")
        } else {
            Problem::new(ErrorCode::Unauthorized).detail(e.to_string())
        }
    })
}

fn token_of(headers: &HeaderMap) -> Result<&str, Problem> {
    let value = headers.get(header::AUTHORIZATION).ok_or(ErrorCode::Unauthorized)?;
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .ok_or_else(|| Problem::new(ErrorCode::Unauthorized).detail("expected 'Authorization: Bearer <token>'"))?;
    Ok(token.trim())
}

/// The Idempotency-Key: 1 to 255 visible ASCII characters.
pub fn idempotency_key(headers: &HeaderMap) -> Result<String, Problem> {
    let value = headers.get(IDEMPOTENCY_KEY).ok_or(ErrorCode::MissingIdempotencyKey)?;
    let key = value.to_str().map_err(|_| invalid_key())?;
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid_key());
    }
    Ok(key.to_owned())
}

fn invalid_key() -> Problem {
    Problem::new(ErrorCode::InvalidHeader).detail("Idempotency-Key must be 1 to 255 visible ASCII characters")
}

pub fn event_id(raw: &str) -> Result<u64, Problem> {
    raw.parse::<u64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| Problem::new(ErrorCode::EventNotFound).detail("event ids are positive integers"))
}

pub fn uuid(raw: &str, missing: ErrorCode) -> Result<Uuid, Problem> {
    Uuid::parse_str(raw).map_err(|_| Problem::new(missing).detail("ids are UUIDs"))
}

/// A JSON body: the content type must say JSON, the bytes must parse.
pub fn json<T: DeserializeOwned>(headers: &HeaderMap, body: &[u8]) -> Result<T, Problem> {
    let is_json =
        headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).and_then(|v| v.split(';').next()).is_some_and(
            |v| {
                let v = v.trim();
                v.eq_ignore_ascii_case("application/json") || v.to_ascii_lowercase().ends_with("+json")
            },
        );
    if !is_json {
        return Err(ErrorCode::UnsupportedMediaType.into());
    }
    serde_json::from_slice(body).map_err(|e| Problem::new(ErrorCode::InvalidBody).detail(e.to_string()))
}

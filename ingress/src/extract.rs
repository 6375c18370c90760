//! Reading requests: the bearer token, the Idempotency-Key, ids in paths and
//! JSON bodies, each failure mapped to its problem code.

use axum::http::{header, HeaderMap};
use dropline::auth::{Claims, TokenKeys};
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::problem::{ErrorCode, Problem};

pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

pub fn bearer(keys: &TokenKeys, headers: &HeaderMap) -> Result<Claims, Problem> {
    let value = headers.get(header::AUTHORIZATION).ok_or(ErrorCode::Unauthorized)?;
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .ok_or_else(|| Problem::new(ErrorCode::Unauthorized).detail("expected 'Authorization: Bearer <token>'"))?;
    keys.verify(token.trim()).map_err(|e| Problem::new(ErrorCode::Unauthorized).detail(e.to_string()))
}

pub fn admin(keys: &TokenKeys, headers: &HeaderMap) -> Result<Claims, Problem> {
    let claims = bearer(keys, headers)?;
    if !claims.is_admin() {
        return Err(Problem::new(ErrorCode::Forbidden).detail("the admin scope is required"));
    }
    Ok(claims)
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

//! Reading requests: the bearer token, the Idempotency-Key, ids in paths,
//! search parameters, JSON bodies and signed webhooks, each as an axum
//! extractor whose every failure is its problem answer.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use dropline::auth::{Claims, Tokens};
use dropline::payments::{self, PaymentWebhook, SignatureError, SIGNATURE_HEADER};
use serde::de::{self, DeserializeOwned, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use uuid::Uuid;

use crate::problem::{ErrorCode, Problem};
use crate::state::AppState;

pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// A buyer, by their bearer token.
pub struct Buyer(pub Claims);

impl FromRequestParts<Arc<AppState>> for Buyer {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<AppState>) -> Result<Self, Problem> {
        bearer(app, &parts.headers).await.map(Buyer)
    }
}

/// An admin, by their bearer token.
pub struct Admin;

impl FromRequestParts<Arc<AppState>> for Admin {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<AppState>) -> Result<Self, Problem> {
        admin(&app.tokens, &parts.headers).map(|_| Admin)
    }
}

/// The request's Idempotency-Key.
pub struct IdempotencyKey(pub String);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Problem> {
        idempotency_key(&parts.headers).map(IdempotencyKey)
    }
}

/// The `Dropline-Admission` header, when sent: a buyer's turn out of a
/// waiting room (checked by the handler, which knows the event).
pub struct AdmissionToken(pub Option<String>);

/// The `Dropline-Proof` header, when sent: a solved join challenge
/// (checked by the handler, which knows the room's difficulty).
pub struct JoinProof(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for AdmissionToken {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Problem> {
        optional_token(&parts.headers, "dropline-admission", "Dropline-Admission").map(AdmissionToken)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for JoinProof {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Problem> {
        optional_token(&parts.headers, "dropline-proof", "Dropline-Proof").map(JoinProof)
    }
}

/// The `Last-Event-ID` a reconnecting event stream sends: the id of the
/// last event it had.
pub struct LastEventId(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for LastEventId {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Problem> {
        optional_token(&parts.headers, "last-event-id", "Last-Event-ID").map(LastEventId)
    }
}

/// A header carrying a token the ingress issued, if sent: once at most,
/// 1 to 4096 visible ASCII characters.
fn optional_token(headers: &HeaderMap, name: &str, shown: &str) -> Result<Option<String>, Problem> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else { return Ok(None) };
    if values.next().is_some() {
        return Err(Problem::new(ErrorCode::InvalidHeader).detail(format!("one {shown} header at most")));
    }
    match value.to_str() {
        Ok(token) if !token.is_empty() && token.len() <= 4096 && token.bytes().all(|b| b.is_ascii_graphic()) => {
            Ok(Some(token.to_owned()))
        }
        _ => Err(Problem::new(ErrorCode::InvalidHeader)
            .detail(format!("{shown} must be 1 to 4096 visible ASCII characters, as the ingress gave it"))),
    }
}

/// The event id in the path.
pub struct EventId(pub u64);

/// The order id in the path.
pub struct OrderId(pub Uuid);

/// The intent id in the path.
pub struct IntentId(pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for EventId {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        event_id(&path(parts, state).await?).map(EventId).map_err(IntoResponse::into_response)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for OrderId {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        uuid(&path(parts, state).await?, ErrorCode::OrderNotFound).map(OrderId).map_err(IntoResponse::into_response)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for IntentId {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        uuid(&path(parts, state).await?, ErrorCode::NotFound).map(IntentId).map_err(IntoResponse::into_response)
    }
}

/// The route's one path parameter, as axum decodes it.
async fn path<S: Send + Sync>(parts: &mut Parts, state: &S) -> Result<String, Response> {
    let Path(raw) = Path::<String>::from_request_parts(parts, state).await.map_err(IntoResponse::into_response)?;
    Ok(raw)
}

/// A search's parameters: `q=<text>&after=<id>&limit=<1..100>`, each once
/// at most.
pub struct SearchQuery {
    pub q: Option<String>,
    pub after: u64,
    pub limit: u32,
}

impl<S: Send + Sync> FromRequestParts<S> for SearchQuery {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Problem> {
        let mut search = SearchQuery { q: None, after: 0, limit: 20 };
        let mut errors = Vec::new();
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(parts.uri.query().unwrap_or(""))
            .map_err(|e| Problem::new(ErrorCode::InvalidQuery).detail(e.to_string()))?;
        let mut seen = Vec::new();
        for (k, v) in pairs {
            if seen.contains(&k) {
                errors.push(format!("{k}: given more than once"));
                continue;
            }
            seen.push(k.clone());
            match k.as_str() {
                "q" if v.chars().count() <= 200 => search.q = Some(v).filter(|s| !s.is_empty()),
                "q" => errors.push("q: at most 200 characters".to_owned()),
                "after" => match v.parse() {
                    Ok(n) => search.after = n,
                    Err(_) => errors.push("after: must be an event id".to_owned()),
                },
                "limit" => match v.parse() {
                    Ok(n) if (1..=100).contains(&n) => search.limit = n,
                    _ => errors.push("limit: must be 1 to 100".to_owned()),
                },
                other => errors.push(format!("{other}: unknown parameter")),
            }
        }
        if !errors.is_empty() {
            return Err(Problem::new(ErrorCode::InvalidQuery).errors(errors));
        }
        Ok(search)
    }
}

/// A JSON body of the documented shape (see [`json`]), read up to the
/// configured size.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<AppState>> for JsonBody<T> {
    type Rejection = Problem;

    async fn from_request(request: Request, app: &Arc<AppState>) -> Result<Self, Problem> {
        let (parts, body) = request.into_parts();
        let body = read_body(&parts.headers, body, app.config.max_body_bytes).await?;
        json(&parts.headers, &body).map(JsonBody)
    }
}

/// The body of a route that takes none (cancel, start a payment, pre-warm):
/// empty, or the empty JSON object `{}` that some clients send for every
/// POST. Anything else is refused like a body off its documented shape, so
/// a client that believes it sent options learns that they were ignored.
pub struct NoBody;

/// The most a body of [`NoBody`] is read: `{}` with whitespace around it.
const NO_BODY_LIMIT: usize = 64;

impl<S: Send + Sync> FromRequest<S> for NoBody {
    type Rejection = Problem;

    async fn from_request(request: Request, _: &S) -> Result<Self, Problem> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Empty {}

        let (parts, body) = request.into_parts();
        let body = read_body(&parts.headers, body, NO_BODY_LIMIT).await.map_err(|p| {
            if p.code == ErrorCode::PayloadTooLarge {
                Problem::new(ErrorCode::InvalidBodyShape).detail("this request takes no body")
            } else {
                p
            }
        })?;
        if body.is_empty() {
            return Ok(NoBody);
        }
        json::<Empty>(&parts.headers, &body).map(|_| NoBody)
    }
}

/// A payment webhook whose signature holds. The signature covers the raw
/// bytes, so nothing is parsed before it holds; then fields the provider
/// added are ignored, and anything else off the documented shape is refused
/// like every other body.
pub struct SignedWebhook(pub PaymentWebhook);

impl FromRequest<Arc<AppState>> for SignedWebhook {
    type Rejection = Problem;

    async fn from_request(request: Request, app: &Arc<AppState>) -> Result<Self, Problem> {
        let (parts, body) = request.into_parts();
        let raw = read_body(&parts.headers, body, app.config.max_body_bytes).await?;
        let signature = parts.headers.get(SIGNATURE_HEADER).and_then(|v| v.to_str().ok());
        let now = chrono::Utc::now().timestamp();
        payments::verify(
            dropline::secrets::exposed(&app.config.webhook_secret),
            signature,
            &raw,
            now,
            app.config.webhook_tolerance_secs,
        )
        .map_err(|e| {
            // Every other failure, an oversized header included, is
            // refused before a MAC is computed or is a mismatch.
            let code = if e == SignatureError::Stale { ErrorCode::StaleSignature } else { ErrorCode::InvalidSignature };
            Problem::new(code).detail(e.to_string())
        })?;
        let webhook: PaymentWebhook = json_lenient(&parts.headers, &raw)?;
        match webhook.problem() {
            Some(problem) => Err(Problem::new(ErrorCode::InvalidBody).detail(problem)),
            None => Ok(SignedWebhook(webhook)),
        }
    }
}

/// Reads a body of at most `limit` bytes, as sent: a body announced (by its
/// Content-Length) past the limit is refused before a byte of it is read,
/// and a compressed one is refused (415) rather than stored or parsed as
/// if it were plain JSON.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, Problem> {
    for encoding in headers.get_all(header::CONTENT_ENCODING) {
        let plain = encoding.to_str().is_ok_and(|e| e.split(',').all(|e| e.trim().eq_ignore_ascii_case("identity")));
        if !plain {
            return Err(Problem::new(ErrorCode::UnsupportedMediaType).detail("bodies are not accepted compressed"));
        }
    }
    let too_large = || Problem::new(ErrorCode::PayloadTooLarge).detail(format!("at most {limit} bytes"));
    if axum::body::HttpBody::size_hint(&body).lower() > limit as u64 {
        return Err(too_large());
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        // to_bytes reports an oversized body as a length-limit error; any
        // other failure is the client's connection breaking.
        if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>()) {
            too_large()
        } else {
            Problem::new(ErrorCode::InvalidBody).detail("the body could not be read")
        }
    })
}

/// A buyer's token: signed with the buyer secret, for the buyer audience.
/// A buyer's token: HS256 signed with the buyer secret, or, with an
/// identity provider configured, RS256 or ES256 signed with one of its keys.
async fn bearer(app: &AppState, headers: &HeaderMap) -> Result<Claims, Problem> {
    let token = token_of(headers)?;
    let unauthorized = |e: &dyn std::fmt::Display| Problem::new(ErrorCode::Unauthorized).detail(e.to_string());
    match (&app.identity, jsonwebtoken::decode_header(token)) {
        (Some(jwks), Ok(header)) if header.alg != jsonwebtoken::Algorithm::HS256 => {
            jwks.verify(token, &header).await.map_err(|e| unauthorized(&e))
        }
        _ => app.tokens.buyer.verify(token).map_err(|e| unauthorized(&e)),
    }
}

/// An admin's token: signed with the admin secret, for the admin audience.
/// A valid buyer token is told apart (403) from no valid token at all (401).
fn admin(tokens: &Tokens, headers: &HeaderMap) -> Result<Claims, Problem> {
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
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next().ok_or(ErrorCode::Unauthorized)?;
    if values.next().is_some() {
        return Err(Problem::new(ErrorCode::Unauthorized).detail("one Authorization header at most"));
    }
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .ok_or_else(|| Problem::new(ErrorCode::Unauthorized).detail("expected 'Authorization: Bearer <token>'"))?;
    Ok(token.trim())
}

/// The Idempotency-Key: 1 to 255 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<String, Problem> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
    let value = values.next().ok_or(ErrorCode::MissingIdempotencyKey)?;
    if values.next().is_some() {
        return Err(Problem::new(ErrorCode::InvalidHeader).detail("one Idempotency-Key header at most"));
    }
    let key = value.to_str().map_err(|_| invalid_key())?;
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid_key());
    }
    Ok(key.to_owned())
}

fn invalid_key() -> Problem {
    Problem::new(ErrorCode::InvalidHeader).detail("Idempotency-Key must be 1 to 255 visible ASCII characters")
}

/// An event id as the API writes it: digits, no sign, no leading zero. One
/// event has one URL, so caches and logs never see `01` and `+1` as others.
fn event_id(raw: &str) -> Result<u64, Problem> {
    let canonical = !raw.starts_with('0') && raw.bytes().all(|b| b.is_ascii_digit());
    canonical
        .then(|| raw.parse::<u64>().ok())
        .flatten()
        .ok_or_else(|| Problem::new(ErrorCode::EventNotFound).detail("event ids are positive integers"))
}

/// A UUID in its hyphenated form only (not braced, `urn:uuid:` or simple),
/// for the same reason.
/// An id written the one way ids are given out: a lower-case hyphenated
/// UUID.
fn uuid(raw: &str, missing: ErrorCode) -> Result<Uuid, Problem> {
    Uuid::parse_str(raw)
        .ok()
        .filter(|id| id.hyphenated().to_string() == raw)
        .ok_or_else(|| Problem::new(missing).detail("ids are lower-case hyphenated UUIDs"))
}

/// A JSON body of the documented shape: a JSON object with each key once,
/// at any depth, and no field `T` does not know. Not JSON at all is 400
/// `invalid_body`; JSON of another shape (an array, a wrong type, an unknown
/// or repeated field) is 422 `invalid_body_shape`.
fn json<T: DeserializeOwned>(headers: &HeaderMap, body: &[u8]) -> Result<T, Problem> {
    parse(headers, body, true)
}

/// [`json`] for a sender that may add fields we do not read (the payment
/// provider's webhooks): unknown fields are ignored, everything else is as
/// strict.
fn json_lenient<T: DeserializeOwned>(headers: &HeaderMap, body: &[u8]) -> Result<T, Problem> {
    parse(headers, body, false)
}

fn parse<T: DeserializeOwned>(headers: &HeaderMap, body: &[u8], deny_unknown: bool) -> Result<T, Problem> {
    let mut types = headers.get_all(header::CONTENT_TYPE).iter();
    let (content_type, again) = (types.next(), types.next());
    if again.is_some() {
        return Err(Problem::new(ErrorCode::InvalidHeader).detail("one Content-Type header at most"));
    }
    if !content_type.and_then(|v| v.to_str().ok()).is_some_and(is_json_utf8) {
        return Err(ErrorCode::UnsupportedMediaType.into());
    }
    // serde's derived structs also accept an array of their fields in order
    // and keep the last of repeated keys in some shapes; one pass over the
    // document refuses both before `T` sees it.
    let shape = serde_json::from_slice::<Shape>(body).map_err(body_error)?;
    let Shape::Object(keys) = shape else {
        return Err(Problem::new(ErrorCode::InvalidBodyShape).detail("the body must be a JSON object"));
    };
    if deny_unknown {
        if let Some(known) = fields_of::<T>() {
            let unknown: Vec<String> =
                keys.iter().filter(|k| !known.contains(&k.as_str())).map(|k| format!("{k}: unknown field")).collect();
            if !unknown.is_empty() {
                return Err(Problem::new(ErrorCode::InvalidBodyShape).errors(unknown));
            }
        }
    }
    serde_json::from_slice(body).map_err(body_error)
}

/// `application/json` or `*/*+json`, in UTF-8 (RFC 8259) if a charset is
/// named at all.
fn is_json_utf8(value: &str) -> bool {
    let mut parts = value.split(';');
    let essence = parts.next().unwrap_or("").trim().to_ascii_lowercase();
    let json = essence == "application/json" || (essence.contains('/') && essence.ends_with("+json"));
    json && parts.all(|param| match param.split_once('=') {
        Some((name, v)) if name.trim().eq_ignore_ascii_case("charset") => {
            v.trim().trim_matches('"').eq_ignore_ascii_case("utf-8")
        }
        _ => true,
    })
}

/// serde_json's own classification: bytes that are not JSON are the
/// client's syntax error, JSON that does not fit is the shape's.
fn body_error(e: serde_json::Error) -> Problem {
    use serde_json::error::Category;
    let code = match e.classify() {
        Category::Data => ErrorCode::InvalidBodyShape,
        Category::Syntax | Category::Eof | Category::Io => ErrorCode::InvalidBody,
    };
    Problem::new(code).detail(e.to_string())
}

/// A JSON document walked once: an object's keys (top level only), or
/// anything else. Walking it refuses a key repeated in any object.
enum Shape {
    Object(Vec<String>),
    Other,
}

impl<'de> Deserialize<'de> for Shape {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ShapeVisitor)
    }
}

struct ShapeVisitor;

impl<'de> Visitor<'de> for ShapeVisitor {
    type Value = Shape;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("JSON")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Shape, A::Error> {
        let mut keys: Vec<String> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(de::Error::custom(format_args!("duplicate field `{key}`")));
            }
            map.next_value::<Shape>()?;
            keys.push(key);
        }
        Ok(Shape::Object(keys))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Shape, A::Error> {
        while seq.next_element::<Shape>()?.is_some() {}
        Ok(Shape::Other)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Shape, E> {
        Ok(Shape::Other)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Shape, E> {
        Ok(Shape::Other)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Shape, E> {
        Ok(Shape::Other)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Shape, E> {
        Ok(Shape::Other)
    }

    fn visit_str<E>(self, _: &str) -> Result<Shape, E> {
        Ok(Shape::Other)
    }

    fn visit_unit<E>(self) -> Result<Shape, E> {
        Ok(Shape::Other)
    }
}

/// The field names a derived `Deserialize` asks for, so any body type is
/// checked for unknown fields whether or not it says `deny_unknown_fields`.
/// `None` for a type that is not a plain struct (a flattened one asks for a
/// map): then `T` alone decides.
fn fields_of<T: DeserializeOwned>() -> Option<&'static [&'static str]> {
    struct Probe<'a>(&'a mut Option<&'static [&'static str]>);

    impl<'de> Deserializer<'de> for Probe<'_> {
        type Error = de::value::Error;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = Some(fields);
            Err(de::Error::custom("probed"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
            unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }

    let mut fields = None;
    let _ = T::deserialize(Probe(&mut fields));
    fields
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    struct Strict {
        #[allow(dead_code)]
        quantity: u32,
    }

    fn headers(content_type: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        h
    }

    fn code(body: &str) -> ErrorCode {
        json::<Strict>(&headers("application/json"), body.as_bytes()).unwrap_err().code
    }

    #[test]
    fn only_an_object_of_the_documented_shape_is_accepted() {
        assert!(json::<Strict>(&headers("application/json; charset=UTF-8"), br#"{"quantity": 1}"#).is_ok());
        assert_eq!(code("[1]"), ErrorCode::InvalidBodyShape, "serde would read an array as the fields in order");
        assert_eq!(code("1"), ErrorCode::InvalidBodyShape);
        assert_eq!(code(r#"{"quantity": "1"}"#), ErrorCode::InvalidBodyShape);
        assert_eq!(code(r#"{"quantity": 1, "price": 0}"#), ErrorCode::InvalidBodyShape, "no deny_unknown_fields");
        assert_eq!(code(r#"{"quantity": 1, "quantity": 2}"#), ErrorCode::InvalidBodyShape);
        assert_eq!(code(r#"{"quantity": 1, "x": {"a": 1, "\u0061": 2}}"#), ErrorCode::InvalidBodyShape);
        assert_eq!(code(r#"{"quantity": "#), ErrorCode::InvalidBody);
        assert_eq!(code("{} x"), ErrorCode::InvalidBody);
    }

    #[test]
    fn the_lenient_reader_ignores_unknown_fields_only() {
        let h = headers("application/json");
        assert!(json_lenient::<Strict>(&h, br#"{"quantity": 1, "extra": [1, 2]}"#).is_ok());
        let repeated = json_lenient::<Strict>(&h, br#"{"quantity": 1, "quantity": 1}"#).unwrap_err();
        assert_eq!(repeated.code, ErrorCode::InvalidBodyShape);
    }

    #[test]
    fn the_content_type_must_be_json_in_utf8() {
        for ok in ["application/json", "application/merge-patch+json", "Application/JSON; charset=\"utf-8\""] {
            assert!(json::<Strict>(&headers(ok), br#"{"quantity": 1}"#).is_ok(), "{ok}");
        }
        for bad in ["text/plain", "application/json; charset=latin1", "+json"] {
            let e = json::<Strict>(&headers(bad), br#"{"quantity": 1}"#).unwrap_err();
            assert_eq!(e.code, ErrorCode::UnsupportedMediaType, "{bad}");
        }
        let mut two = headers("application/json");
        two.append(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert_eq!(json::<Strict>(&two, br#"{"quantity": 1}"#).unwrap_err().code, ErrorCode::InvalidHeader);
    }
}

//! Every error the ingress answers with: one stable code, mapped to an HTTP
//! status and an `application/problem+json` body (RFC 9457). The code is also
//! the bounded `error_code` label of the request metrics.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Declares [`ErrorCode`] with each variant's stable string, so the list
/// of codes, their strings and [`ErrorCode::ALL`] cannot drift apart.
macro_rules! error_codes {
    ($($variant:ident => $code:literal,)*) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum ErrorCode {
            $($variant,)*
        }

        impl ErrorCode {
            /// Every code, in declaration order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $code,)*
                }
            }
        }
    };
}

error_codes! {
    Unauthorized => "unauthorized",
    Forbidden => "forbidden",
    NotFound => "not_found",
    MethodNotAllowed => "method_not_allowed",
    UnsupportedMediaType => "unsupported_media_type",
    PayloadTooLarge => "payload_too_large",
    InvalidBody => "invalid_body",
    InvalidBodyShape => "invalid_body_shape",
    InvalidHeader => "invalid_header",
    InvalidQuery => "invalid_query",
    InvalidPath => "invalid_path",
    MissingIdempotencyKey => "missing_idempotency_key",
    IdempotencyKeyReused => "idempotency_key_reused",
    IdempotencyInProgress => "idempotency_in_progress",
    EventNotFound => "event_not_found",
    OrderNotFound => "order_not_found",
    SaleNotOpen => "sale_not_open",
    SaleClosed => "sale_closed",
    SalePaused => "sale_paused",
    SoldOut => "sold_out",
    NoWaitingRoom => "no_waiting_room",
    WaitingRoomExists => "waiting_room_exists",
    WaitingRoomTooLate => "waiting_room_too_late",
    CapacityInUse => "capacity_in_use",
    CancellationNotAllowed => "cancellation_not_allowed",
    EventCancelled => "event_cancelled",
    QueueNotOpen => "queue_not_open",
    LotteryClosed => "lottery_closed",
    NotInQueue => "not_in_queue",
    DrawNotDone => "draw_not_done",
    NoBeacon => "no_beacon",
    BeaconAlreadySet => "beacon_already_set",
    BeaconTooEarly => "beacon_too_early",
    AdmissionRequired => "admission_required",
    ProofRequired => "proof_required",
    ProofInvalid => "proof_invalid",
    AdmissionInvalid => "admission_invalid",
    TurnLapsed => "turn_lapsed",
    TurnUsed => "turn_used",
    OrderNotHeld => "order_not_held",
    OrderExpired => "order_expired",
    OrderVoided => "order_voided",
    OrderNotReady => "order_not_ready",
    InvalidSignature => "invalid_signature",
    StaleSignature => "stale_signature",
    RateLimited => "rate_limited",
    Busy => "busy",
    Overloaded => "overloaded",
    StreamsFull => "streams_full",
    RequestTimeout => "request_timeout",
    BrokerUnavailable => "broker_unavailable",
    DependencyUnavailable => "dependency_unavailable",
    PaymentProviderUnavailable => "payment_provider_unavailable",
    Internal => "internal",
}

impl ErrorCode {
    /// The code whose stable string is `code` (a stored answer's).
    pub fn parse(code: &str) -> Option<ErrorCode> {
        Self::ALL.iter().copied().find(|c| c.as_str() == code)
    }

    pub fn status(self) -> StatusCode {
        use ErrorCode::*;
        match self {
            Unauthorized | InvalidSignature | StaleSignature => StatusCode::UNAUTHORIZED,
            Forbidden | AdmissionRequired | AdmissionInvalid | TurnLapsed | TurnUsed | ProofInvalid => {
                StatusCode::FORBIDDEN
            }
            ProofRequired => StatusCode::PRECONDITION_REQUIRED,
            NotFound | EventNotFound | OrderNotFound | NoWaitingRoom | NotInQueue => StatusCode::NOT_FOUND,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            InvalidBody | InvalidHeader | InvalidQuery | InvalidPath | MissingIdempotencyKey => StatusCode::BAD_REQUEST,
            IdempotencyKeyReused | InvalidBodyShape => StatusCode::UNPROCESSABLE_ENTITY,
            IdempotencyInProgress
            | SaleNotOpen
            | SaleClosed
            | SalePaused
            | SoldOut
            | OrderNotHeld
            | OrderExpired
            | OrderVoided
            | WaitingRoomExists
            | WaitingRoomTooLate
            | CapacityInUse
            | CancellationNotAllowed
            | EventCancelled
            | QueueNotOpen
            | LotteryClosed
            | NoBeacon
            | BeaconAlreadySet
            | BeaconTooEarly
            | DrawNotDone => StatusCode::CONFLICT,
            RateLimited | Busy => StatusCode::TOO_MANY_REQUESTS,
            BrokerUnavailable | DependencyUnavailable | OrderNotReady | Overloaded | StreamsFull | RequestTimeout => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            PaymentProviderUnavailable => StatusCode::BAD_GATEWAY,
            Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn title(self) -> &'static str {
        use ErrorCode::*;
        match self {
            Unauthorized => "A valid bearer token is required",
            Forbidden => "The token does not grant this",
            NotFound => "No such resource",
            MethodNotAllowed => "Method not allowed on this resource",
            UnsupportedMediaType => "The body must be application/json",
            PayloadTooLarge => "The body is too large",
            InvalidBody => "The body is not valid",
            InvalidBodyShape => "The body is not a JSON object of the documented shape",
            InvalidHeader => "A header is not valid",
            InvalidQuery => "The query string is not valid",
            InvalidPath => "The path is not valid",
            MissingIdempotencyKey => "An Idempotency-Key header is required",
            IdempotencyKeyReused => "The Idempotency-Key was used for a different request",
            IdempotencyInProgress => "A request with this Idempotency-Key is in progress; retry later",
            EventNotFound => "No such event",
            OrderNotFound => "No such order",
            SaleNotOpen => "The sale has not opened yet",
            SaleClosed => "The sale has closed",
            SalePaused => "The sale is paused by its host; try again once it resumes",
            SoldOut => "The event is sold out",
            NoWaitingRoom => "The event has no waiting room",
            WaitingRoomExists => "The event has a waiting room already, with other terms",
            WaitingRoomTooLate => "A waiting room must be set before the sale opens",
            QueueNotOpen => "The waiting room's pre-queue has not opened yet",
            LotteryClosed => "The lottery took entries until the sale opened",
            NotInQueue => "You have not joined this event's waiting room",
            DrawNotDone => "The waiting room's draw has not been made yet",
            NoBeacon => "The waiting room names no beacon round",
            BeaconAlreadySet => "The beacon round's randomness was entered already, with another value",
            BeaconTooEarly => "The beacon round's randomness is taken only once the pre-queue's list is fixed",
            AdmissionRequired => "This event sells through its waiting room: a Dropline-Admission token is required",
            AdmissionInvalid => "The admission token is not valid for this buyer and event",
            ProofRequired => "This waiting room asks for a proof of work to join: a Dropline-Proof header",
            ProofInvalid => "The proof of work is not valid",
            TurnLapsed => "Your turn to buy has run out; join the waiting room again",
            TurnUsed => "Your turn bought already; a turn buys once",
            CapacityInUse => "The capacity cannot drop below the units already handed out",
            CancellationNotAllowed => "The event's policy does not allow cancelling a paid order now",
            EventCancelled => "The event was cancelled; it can no longer change",
            OrderNotHeld => "The order is no longer held",
            OrderExpired => "The order's hold has expired",
            OrderVoided => "The order was withdrawn: its ticket was already sold to an earlier buyer",
            OrderNotReady => "The order's records are catching up; retry later",
            InvalidSignature => "The webhook signature is not valid",
            StaleSignature => "The webhook signature is too old or too new",
            RateLimited => "Too many requests",
            Busy => "Too many purchases are being answered at once; retry shortly",
            Overloaded => "Too many requests of this kind at once; retry later",
            StreamsFull => "Too many event streams are open; poll the resource, or retry later",
            RequestTimeout => "The request took too long; retry later",
            BrokerUnavailable => "The request could not be queued; retry later",
            DependencyUnavailable => "A backing service is unavailable; retry later",
            PaymentProviderUnavailable => "The payment provider did not answer",
            Internal => "Internal error",
        }
    }
}

/// An error answer: a code plus what the caller needs to fix it.
#[derive(Debug)]
pub struct Problem {
    pub code: ErrorCode,
    pub detail: Option<String>,
    pub errors: Vec<String>,
    pub retry_after_secs: Option<u64>,
}

impl Problem {
    pub fn new(code: ErrorCode) -> Self {
        Self { code, detail: None, errors: Vec::new(), retry_after_secs: None }
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn errors(mut self, errors: Vec<String>) -> Self {
        self.errors = errors;
        self
    }

    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs.max(1));
        self
    }

    /// `400 invalid_body` naming every problem of a body, if it has any.
    pub fn unless_valid(problems: Vec<String>, detail: &str) -> Result<(), Problem> {
        if problems.is_empty() {
            return Ok(());
        }
        Err(Problem::new(ErrorCode::InvalidBody).detail(detail).errors(problems))
    }

    /// For a backing service that failed: logged here, reported as 503.
    pub fn unavailable(what: &str, error: &dyn std::fmt::Display) -> Self {
        tracing::warn!(error = %error, what, "dependency failed");
        Problem::new(ErrorCode::DependencyUnavailable).retry_after(1)
    }
}

impl From<ErrorCode> for Problem {
    fn from(code: ErrorCode) -> Self {
        Problem::new(code)
    }
}

#[derive(Serialize)]
struct Body<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    code: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'a str>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    errors: &'a [String],
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = self.code.status();
        let body = Body {
            kind: format!("urn:dropline:problem:{}", self.code.as_str()),
            title: self.code.title(),
            status: status.as_u16(),
            code: self.code.as_str(),
            detail: self.detail.as_deref(),
            errors: &self.errors,
        };
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let mut response = (status, bytes).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if let Some(secs) = self.retry_after_secs {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response.extensions_mut().insert(self.code);
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_parses_back_from_its_string_and_the_strings_are_unique() {
        for &code in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(code.as_str()), Some(code));
        }
        let mut names: Vec<_> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ErrorCode::ALL.len());
        assert_eq!(ErrorCode::parse("no_such_code"), None);
        assert_eq!(ErrorCode::IdempotencyInProgress.status(), StatusCode::CONFLICT);
    }
}

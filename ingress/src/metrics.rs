//! The ingress' metrics, declared in one place.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

pub const REQUESTS: &str = "dropline_ingress_requests_total";
pub const REQUEST_DURATION: &str = "dropline_ingress_request_duration_seconds";
pub const PURCHASES: &str = "dropline_ingress_purchases_total";
pub const WEBHOOKS: &str = "dropline_ingress_webhooks_total";
pub const OPEN_CONNECTIONS: &str = "dropline_ingress_open_connections";
pub const EVICTED_CONNECTIONS: &str = "dropline_ingress_evicted_connections_total";

pub fn describe() {
    describe_counter!(REQUESTS, "HTTP requests answered, by route template, status and error code.");
    describe_histogram!(REQUEST_DURATION, Unit::Seconds, "Time to answer an HTTP request, by route template.");
    describe_counter!(
        PURCHASES,
        "Purchase requests by outcome: admitted (queued for allocation), replayed, rate_limited, sold_out, \
         sale_not_open, sale_closed, unavailable, invalid, and in_progress (a copy of a request still being \
         answered)."
    );
    describe_counter!(WEBHOOKS, "Payment webhooks by result: captured, refund_required, ignored, rejected.");
    describe_gauge!(OPEN_CONNECTIONS, "Client connections open on the API listener.");
    describe_counter!(
        EVICTED_CONNECTIONS,
        "Idle client connections closed to make room for a new one at the connection cap."
    );
    metrics::gauge!(OPEN_CONNECTIONS).set(0.0);
    metrics::counter!(EVICTED_CONNECTIONS).increment(0);
    // Every series exists from the start, so dashboards and alerts see a 0
    // rather than no data. increment(0) creates without changing a value.
    for outcome in [
        "admitted",
        "replayed",
        "in_progress",
        "rate_limited",
        "sold_out",
        "sale_not_open",
        "sale_closed",
        "unavailable",
        "invalid",
    ] {
        metrics::counter!(PURCHASES, "outcome" => outcome).increment(0);
    }
    for result in ["captured", "refund_required", "ignored", "rejected"] {
        metrics::counter!(WEBHOOKS, "result" => result).increment(0);
    }
}

//! The allocator's metrics, declared in one place.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

pub const DECISIONS: &str = "dropline_allocator_decisions_total";
pub const LUA_DURATION: &str = "dropline_allocator_lua_duration_seconds";
pub const DECISION_LATENCY: &str = "dropline_allocator_intent_to_decision_seconds";
pub const LEDGER_ERRORS: &str = "dropline_allocator_ledger_errors_total";
pub const STOCK: &str = "dropline_allocator_stock_units";

pub fn describe() {
    describe_counter!(
        DECISIONS,
        "Intents decided, by outcome: held, sold_out, limit_reached, sale_not_open, sale_closed."
    );
    describe_histogram!(LUA_DURATION, Unit::Seconds, "Time of one allocation script call (one event, many intents).");
    describe_histogram!(DECISION_LATENCY, Unit::Seconds, "Time from the ingress accepting an intent to its decision.");
    describe_counter!(LEDGER_ERRORS, "Allocation script calls that failed and were retried, by kind.");
    describe_gauge!(
        STOCK,
        Unit::Count,
        "Units of a recently sold event by state (available, held, sold), sampled from the ledger."
    );
    // Every series exists from the start: a 0, not "no data".
    for outcome in ["held", "sold_out", "limit_reached", "sale_not_open", "sale_closed"] {
        metrics::counter!(DECISIONS, "outcome" => outcome).increment(0);
    }
    for kind in ["no_ledger", "fenced", "redis", "corrupt"] {
        metrics::counter!(LEDGER_ERRORS, "kind" => kind).increment(0);
    }
}

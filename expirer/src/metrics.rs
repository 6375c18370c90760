//! The expirer's metrics, declared in one place.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

pub const PENDING: &str = "dropline_expirer_pending_holds";
pub const LATENESS: &str = "dropline_expirer_release_lateness_seconds";
pub const HOLDS_ENDED: &str = "dropline_expirer_holds_total";

pub fn describe() {
    describe_gauge!(PENDING, "Holds waiting in memory for their deadline.");
    describe_histogram!(LATENESS, Unit::Seconds, "Time past the deadline at which a hold was released.");
    describe_counter!(
        HOLDS_ENDED,
        "Holds seen at their deadline, by the state found: expired (released now or by a late payment), \
         paid, cancelled, unknown (not in the ledger)."
    );
    // Every series exists from the start: a 0, not "no data".
    for state in ["expired", "paid", "cancelled", "unknown"] {
        metrics::counter!(HOLDS_ENDED, "state" => state).increment(0);
    }
}

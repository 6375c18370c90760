//! The settler's metrics, declared in one place.

use metrics::{describe_counter, describe_gauge, Unit};

pub const ROWS: &str = "dropline_settler_rows_total";
pub const WRITE_ERRORS: &str = "dropline_settler_write_errors_total";
pub const DRIFT: &str = "dropline_settler_ledger_drift_units";
pub const REBUILDS: &str = "dropline_settler_ledger_rebuilds_total";
pub const VOIDED: &str = "dropline_settler_voided_orders_total";
pub const OVERDUE_ENDED: &str = "dropline_settler_overdue_holds_ended_total";

pub fn describe() {
    describe_counter!(ROWS, "Rows written (inserted or upserted), by table.");
    describe_counter!(WRITE_ERRORS, "Batch transactions that failed and were retried.");
    describe_gauge!(
        DRIFT,
        Unit::Count,
        "Units the Redis ledger counts minus units MySQL records, per event and state (held, sold). Non-zero for \
         more than the settler's lag means the two disagree."
    );
    describe_counter!(
        REBUILDS,
        "Event ledgers rebuilt from MySQL, by reason: missing (Redis lost them), drift (Redis and MySQL disagreed \
         for several passes), damaged (the units and counters disagree), requested (an allocator found it missing or damaged), lost_hold (a hold held in MySQL past its deadline is not in Redis), refused (MySQL voided a hold Redis gave)."
    );
    describe_counter!(
        VOIDED,
        "Holds the record refused because a unit or the buyer's limit was already taken by a live order, by reason. \
         Only a Redis that lost writes causes these."
    );
    describe_counter!(
        OVERDUE_ENDED,
        "Holds the reconciler ended because they outlived their deadline and grace (the expirer missed them)."
    );
    metrics::counter!(WRITE_ERRORS).increment(0);
    metrics::counter!(REBUILDS, "reason" => "missing").increment(0);
    metrics::counter!(VOIDED, "reason" => "unit_taken").increment(0);
    metrics::counter!(OVERDUE_ENDED).increment(0);
}

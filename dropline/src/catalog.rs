//! Every metric Dropline exports, in one place: what an SRE's dashboards
//! and alerts can read, and the one naming scheme they all follow
//! (`dropline_<stage>_…`, see [`crate::telemetry::assert_naming_scheme`]).
//! A stage describes its own table at start (`StageConfig::STAGE.metrics`); the
//! Kafka clients' and the consumer loop's are described for every stage.
//! The tables are alike in shape by design: a metric is data, not logic.

use metrics::Unit;

use crate::telemetry::Metric;

/// Metrics of every Kafka client and of the consumer loop, declared once
/// for all stages. `client` labels name the stage and role
/// (`allocator-consumer`, `ingress-producer`) of librdkafka's, the group's
/// and the publisher's figures; `stage` labels the loop's (`allocator`,
/// `expirer`).
pub mod kafka {
    use super::*;

    pub const CONSUMER_LAG: Metric = Metric::gauge(
        "dropline_kafka_consumer_lag_messages",
        "Messages between a partition's end and the consumer's position, per topic and partition.",
    );
    pub const BROKER_RTT: Metric = Metric::gauge(
        "dropline_kafka_broker_rtt_seconds",
        "p99 round-trip time to each broker over librdkafka's last statistics window.",
    )
    .unit(Unit::Seconds);
    pub const CLIENT_QUEUE: Metric = Metric::gauge(
        "dropline_kafka_client_queue_messages",
        "Messages waiting in the client's local queues (a producer's unsent messages).",
    );
    pub const DEAD_LETTERS: Metric = Metric::counter(
        "dropline_kafka_dead_letters_total",
        "Messages parked on the dead-letter topic, by stage and reason.",
    );
    pub const ASSIGNED_PARTITIONS: Metric = Metric::gauge(
        "dropline_kafka_consumer_assigned_partitions",
        "Partitions this consumer holds now; a consumer stage is ready only above 0.",
    );
    pub const UNOWNED_PARTITIONS: Metric = Metric::gauge(
        "dropline_kafka_consumer_group_unowned_partitions",
        "Partitions of the consumer's topics that no member of its group owns, as the group describes itself.",
    );
    pub const APPLY_RETRIES: Metric = Metric::counter(
        "dropline_kafka_apply_retries_total",
        "Failed attempts to apply a batch, by stage and kind: unavailable (a dependency is down; retried without \
         limit) or permanent (retried a bounded number of times, then dead-lettered).",
    );
    pub const BATCH_SIZE: Metric =
        Metric::histogram("dropline_kafka_batch_size", "Messages per batch the consumer loop hands to its stage.");
    pub const BATCH_DURATION: Metric = Metric::histogram(
        "dropline_kafka_batch_duration_seconds",
        "Time from a batch's receipt to the stage having taken it and its finished offsets being stored (for a batch \
         stage, its whole effect; the expirer only schedules the holds).",
    );
    pub const PAUSED_PARTITIONS: Metric = Metric::gauge(
        "dropline_kafka_paused_partitions",
        "Partitions paused because the stage keeps too many of their messages in memory (the expirer's waiting holds).",
    );
    pub const PUBLISHED: Metric = Metric::counter(
        "dropline_kafka_publish_total",
        "Records published, by client, topic and outcome: acked, queue_full (the local queue had no room), timed_out \
         (no acknowledgement within the message timeout) or refused.",
    );
    pub const PUBLISH_DURATION: Metric = Metric::histogram(
        "dropline_kafka_publish_duration_seconds",
        "Time from publishing a record to the broker's acknowledgement, by client and topic.",
    );
    pub const PUBLISH_IN_FLIGHT: Metric = Metric::gauge(
        "dropline_kafka_publish_in_flight_messages",
        "Records the producer held (queued or awaiting acknowledgement) when it last published, by client.",
    );

    pub const ALL: &[Metric] = &[
        CONSUMER_LAG,
        BROKER_RTT,
        CLIENT_QUEUE,
        DEAD_LETTERS,
        ASSIGNED_PARTITIONS,
        UNOWNED_PARTITIONS,
        APPLY_RETRIES,
        BATCH_SIZE,
        BATCH_DURATION,
        PAUSED_PARTITIONS,
        PUBLISHED,
        PUBLISH_DURATION,
        PUBLISH_IN_FLIGHT,
    ];
}

/// The ingress' own metrics.
pub mod ingress {
    use super::*;

    pub const REQUESTS: Metric = Metric::counter(
        "dropline_ingress_requests_total",
        "HTTP requests answered, by route template, status and error code.",
    );
    pub const REQUEST_DURATION: Metric = Metric::histogram(
        "dropline_ingress_request_duration_seconds",
        "Time to answer an HTTP request, by route template.",
    );
    pub const PURCHASES: Metric = Metric::counter(
        "dropline_ingress_purchases_total",
        "Purchase requests by outcome: admitted (queued for allocation), replayed, rate_limited, sold_out, \
         shed (the in-flight cap was reached), sale_not_open, sale_closed, sale_paused, no_admission (a waiting room's event, without a valid turn), unavailable, invalid, and in_progress (a copy of a request still being answered).",
    )
    .from_zero_for(
        "outcome",
        &[
            "admitted",
            "replayed",
            "in_progress",
            "rate_limited",
            "shed",
            "sold_out",
            "sale_not_open",
            "sale_closed",
            "sale_paused",
            "no_admission",
            "unavailable",
            "invalid",
        ],
    );
    pub const WEBHOOKS: Metric = Metric::counter(
        "dropline_ingress_webhooks_total",
        "Payment webhooks by result: captured, refund_required, declined (a card the provider declined), ignored, rejected.",
    )
    .from_zero_for("result", &["captured", "refund_required", "declined", "ignored", "rejected"]);
    pub const OPEN_CONNECTIONS: Metric =
        Metric::gauge("dropline_ingress_open_connections", "Client connections open on the API listener.").from_zero();
    pub const EVICTED_CONNECTIONS: Metric = Metric::counter(
        "dropline_ingress_evicted_connections_total",
        "Idle client connections closed to make room for a new one at the connection cap.",
    )
    .from_zero();

    pub const ROOM_JOINS: Metric = Metric::counter(
        "dropline_ingress_room_joins_total",
        "Waiting-room joins by outcome: joined (a new ticket), existing (the buyer's ticket again).",
    )
    .from_zero_for("outcome", &["joined", "existing"]);
    pub const ROOM_TURNS: Metric = Metric::counter(
        "dropline_ingress_room_turns_total",
        "Waiting-room turns by stage: admitted (let through by this replica's keeper), used (a purchase with the \
         turn accepted), lapsed (its time to act ran out).",
    )
    .from_zero_for("result", &["admitted", "used", "lapsed"]);
    pub const ROOM_DRAWS: Metric = Metric::counter(
        "dropline_ingress_room_draws_total",
        "Waiting-room draws written by this replica (one per room across all replicas).",
    )
    .from_zero();
    pub const OPEN_STREAMS: Metric = Metric::gauge(
        "dropline_ingress_open_streams",
        "Server-sent event streams open on this replica (intents' and queue tickets').",
    )
    .from_zero();
    pub const STREAM_EVENTS: Metric =
        Metric::counter("dropline_ingress_stream_events_total", "Events sent on server-sent event streams, by stream.")
            .from_zero_for("stream", &["intent", "ticket"]);

    pub const ALL: &[Metric] = &[
        REQUESTS,
        REQUEST_DURATION,
        PURCHASES,
        WEBHOOKS,
        OPEN_CONNECTIONS,
        EVICTED_CONNECTIONS,
        ROOM_JOINS,
        ROOM_TURNS,
        ROOM_DRAWS,
        OPEN_STREAMS,
        STREAM_EVENTS,
    ];
}

/// The allocator's own metrics.
pub mod allocator {
    use super::*;

    pub const DECISIONS: Metric = Metric::counter(
        "dropline_allocator_decisions_total",
        "Intents decided, by outcome: held, sold_out, limit_reached, sale_not_open, sale_closed, sale_paused.",
    )
    .from_zero_for("outcome", &["held", "sold_out", "limit_reached", "sale_not_open", "sale_closed", "sale_paused"]);
    pub const LUA_DURATION: Metric = Metric::histogram(
        "dropline_allocator_lua_duration_seconds",
        "Time of one allocation script call (one event, many intents).",
    );
    pub const DECISION_LATENCY: Metric = Metric::histogram(
        "dropline_allocator_intent_to_decision_seconds",
        "Time from the ingress accepting an intent to its decision.",
    );
    pub const LEDGER_ERRORS: Metric = Metric::counter(
        "dropline_allocator_ledger_errors_total",
        "Allocation script calls that failed and were retried, by kind.",
    )
    .from_zero_for("kind", &["no_ledger", "fenced", "redis", "corrupt"]);
    pub const STOCK: Metric = Metric::gauge(
        "dropline_allocator_stock_units",
        "Units of a recently sold event by state (available, held, sold), sampled from the ledger.",
    )
    .unit(Unit::Count);

    pub const ALL: &[Metric] = &[DECISIONS, LUA_DURATION, DECISION_LATENCY, LEDGER_ERRORS, STOCK];
}

/// The settler's own metrics.
pub mod settler {
    use super::*;

    pub const ROWS: Metric =
        Metric::counter("dropline_settler_rows_total", "Rows written (inserted or upserted), by table.");
    pub const WRITE_ERRORS: Metric =
        Metric::counter("dropline_settler_write_errors_total", "Batch transactions that failed and were retried.")
            .from_zero();
    pub const DRIFT: Metric = Metric::gauge(
        "dropline_settler_ledger_drift_units",
        "Units the Redis ledger counts minus units MySQL records, per event and state (held, sold). Non-zero for more \
         than the settler's lag means the two disagree.",
    )
    .unit(Unit::Count);
    pub const REBUILDS: Metric = Metric::counter(
        "dropline_settler_ledger_rebuilds_total",
        "Event ledgers rebuilt from MySQL, by reason: missing (Redis lost them), drift (Redis and MySQL disagreed for \
         several passes), damaged (the units and counters disagree), requested (an allocator found it missing or \
         damaged), lost_hold (a hold held in MySQL past its deadline is not in Redis), refused (MySQL voided a hold \
         Redis gave).",
    )
    .from_zero_for("reason", &["missing"]);
    pub const VOIDED: Metric = Metric::counter(
        "dropline_settler_voided_orders_total",
        "Holds the record refused because a unit or the buyer's limit was already taken by a live order, by reason. \
         Only a Redis that lost writes causes these.",
    )
    .from_zero_for("reason", &["unit_taken"]);
    pub const OVERDUE_ENDED: Metric = Metric::counter(
        "dropline_settler_overdue_holds_ended_total",
        "Holds the reconciler ended because they outlived their deadline and grace (the expirer missed them).",
    )
    .from_zero();

    pub const MILESTONES: Metric = Metric::counter(
        "dropline_settler_milestones_total",
        "Milestones of a sale the settlers recorded (each announced as the event's change), by milestone: opened, \
         sold_out (every unit it may sell paid for), back_on_sale.",
    )
    .from_zero_for("milestone", &["opened", "sold_out", "back_on_sale"]);

    pub const OUTBOX_PUBLISHED: Metric = Metric::counter(
        "dropline_settler_outbox_published_total",
        "Changes of the record (outbox rows) published on the changes topic.",
    )
    .from_zero();
    pub const OUTBOX_LAG: Metric = Metric::gauge(
        "dropline_settler_outbox_lag_seconds",
        "Age of the oldest change not published yet, as this settler last read it (the relay at each read, the \
         others every second); 0 when none waits.",
    )
    .unit(Unit::Seconds)
    .from_zero();
    pub const OUTBOX_RELAYING: Metric = Metric::gauge(
        "dropline_settler_outbox_relaying",
        "1 while this settler holds the database's relay lock and publishes its outbox; one settler does.",
    )
    .from_zero();

    pub const REFUND_CALLS: Metric = Metric::counter(
        "dropline_settler_refund_calls_total",
        "Refund calls to the payment provider, by result: refunded (the provider made or had made it), failed \
         (retried with backoff), rejected (refused for good: an operator's case).",
    )
    .from_zero_for("result", &["refunded", "failed", "rejected"]);
    pub const REFUNDS_WAITING: Metric = Metric::gauge(
        "dropline_settler_refunds_waiting",
        "Refunds not made by the provider yet (requested, failed or rejected), as this settler last counted them.",
    )
    .from_zero();
    pub const OLDEST_REFUND: Metric = Metric::gauge(
        "dropline_settler_oldest_refund_waiting_seconds",
        "Age of the oldest refund the provider has not confirmed; 0 when none waits.",
    )
    .unit(Unit::Seconds)
    .from_zero();

    pub const ALL: &[Metric] = &[
        ROWS,
        WRITE_ERRORS,
        DRIFT,
        REBUILDS,
        VOIDED,
        OVERDUE_ENDED,
        MILESTONES,
        OUTBOX_PUBLISHED,
        OUTBOX_LAG,
        OUTBOX_RELAYING,
        REFUND_CALLS,
        REFUNDS_WAITING,
        OLDEST_REFUND,
    ];
}

/// The expirer's own metrics.
pub mod expirer {
    use super::*;

    pub const PENDING: Metric =
        Metric::gauge("dropline_expirer_pending_holds", "Holds waiting in memory for their deadline.");
    pub const LATENESS: Metric = Metric::histogram(
        "dropline_expirer_release_lateness_seconds",
        "Time past the deadline at which a hold was released.",
    );
    pub const HOLDS_ENDED: Metric = Metric::counter(
        "dropline_expirer_holds_total",
        "Holds seen at their deadline, by the state found: expired (released now or by a late payment), paid, \
         cancelled, unknown (not in the ledger).",
    )
    .from_zero_for("state", &["expired", "paid", "cancelled", "unknown"]);

    pub const ALL: &[Metric] = &[PENDING, LATENESS, HOLDS_ENDED];
}

/// The notifier's own metrics.
pub mod notifier {
    use super::*;

    pub const NOTIFICATIONS: Metric = Metric::counter(
        "dropline_notifier_notifications_total",
        "Changes whose webhook was settled, by outcome: delivered, or dead_lettered after its last attempt failed.",
    )
    .from_zero_for("outcome", &["delivered", "dead_lettered"]);
    pub const ATTEMPTS: Metric = Metric::counter(
        "dropline_notifier_attempts_total",
        "Webhook attempts at the host's endpoint, by result: ok (a 2xx answer) or failed.",
    )
    .from_zero_for("result", &["ok", "failed"]);
    pub const DELIVERY_LATENCY: Metric = Metric::histogram(
        "dropline_notifier_delivery_seconds",
        "Time from a change being written in the record to its webhook being delivered.",
    );
    pub const PENDING: Metric =
        Metric::gauge("dropline_notifier_pending_changes", "Changes read and waiting to be delivered or recorded.");
    pub const REMINDERS: Metric = Metric::counter(
        "dropline_notifier_reminders_total",
        "Reminders of holds about to expire, by outcome: sent, or failed (tried again until the deadline).",
    )
    .from_zero_for("outcome", &["sent", "failed"]);

    pub const ALL: &[Metric] = &[NOTIFICATIONS, ATTEMPTS, DELIVERY_LATENCY, PENDING, REMINDERS];
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    #[test]
    fn every_metric_follows_the_naming_scheme_and_has_one_name() {
        let tables = [
            ("kafka", super::kafka::ALL),
            ("ingress", super::ingress::ALL),
            ("allocator", super::allocator::ALL),
            ("settler", super::settler::ALL),
            ("expirer", super::expirer::ALL),
            ("notifier", super::notifier::ALL),
        ];
        let mut names = HashSet::new();
        for (stage, table) in tables {
            crate::telemetry::assert_naming_scheme(stage, table);
            for m in table {
                assert!(names.insert(m.name), "{} is declared twice", m.name);
            }
        }
    }
}

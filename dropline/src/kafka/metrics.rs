//! Metrics of every Kafka client and of the consumer loop, declared once
//! for all stages. `client` labels name the stage and role
//! (`allocator-consumer`, `ingress-producer`) of librdkafka's, the group's
//! and the publisher's figures; `stage` labels the loop's (`allocator`,
//! `expirer`).

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

pub const CONSUMER_LAG: &str = "dropline_kafka_consumer_lag_messages";
pub const BROKER_RTT: &str = "dropline_kafka_broker_rtt_seconds";
pub const CLIENT_QUEUE: &str = "dropline_kafka_client_queue_messages";
pub const DEAD_LETTERS: &str = "dropline_kafka_dead_letters_total";
pub const ASSIGNED_PARTITIONS: &str = "dropline_kafka_consumer_assigned_partitions";
pub const UNOWNED_PARTITIONS: &str = "dropline_kafka_consumer_group_unowned_partitions";
pub const APPLY_RETRIES: &str = "dropline_kafka_apply_retries_total";
pub const BATCH_SIZE: &str = "dropline_kafka_batch_size";
pub const BATCH_DURATION: &str = "dropline_kafka_batch_duration_seconds";
pub const PAUSED_PARTITIONS: &str = "dropline_kafka_paused_partitions";
pub const PUBLISHED: &str = "dropline_kafka_publish_total";
pub const PUBLISH_DURATION: &str = "dropline_kafka_publish_duration_seconds";
pub const PUBLISH_IN_FLIGHT: &str = "dropline_kafka_publish_in_flight_messages";

pub fn describe() {
    describe_gauge!(
        CONSUMER_LAG,
        "Messages between a partition's end and the consumer's position, per topic and partition."
    );
    describe_gauge!(
        BROKER_RTT,
        Unit::Seconds,
        "p99 round-trip time to each broker over librdkafka's last statistics window."
    );
    describe_gauge!(CLIENT_QUEUE, "Messages waiting in the client's local queues (a producer's unsent messages).");
    describe_counter!(DEAD_LETTERS, "Messages parked on the dead-letter topic, by stage and reason.");
    describe_gauge!(ASSIGNED_PARTITIONS, "Partitions this consumer holds now; a consumer stage is ready only above 0.");
    describe_gauge!(
        UNOWNED_PARTITIONS,
        "Partitions of the consumer's topics that no member of its group owns, as the group describes itself."
    );
    describe_counter!(
        APPLY_RETRIES,
        "Failed attempts to apply a batch, by stage and kind: unavailable (a dependency is down; retried \
         without limit) or permanent (retried a bounded number of times, then dead-lettered)."
    );
    describe_histogram!(BATCH_SIZE, Unit::Count, "Messages per batch the consumer loop hands to its stage.");
    describe_histogram!(
        BATCH_DURATION,
        Unit::Seconds,
        "Time from a batch's receipt to the stage having taken it and its finished offsets being stored (for \
         a batch stage, its whole effect; the expirer only schedules the holds)."
    );
    describe_gauge!(
        PAUSED_PARTITIONS,
        "Partitions paused because the stage keeps too many of their messages in memory (the expirer's \
         waiting holds)."
    );
    describe_counter!(
        PUBLISHED,
        "Records published, by client, topic and outcome: acked, queue_full (the local queue had no room), \
         timed_out (no acknowledgement within the message timeout) or refused."
    );
    describe_histogram!(
        PUBLISH_DURATION,
        Unit::Seconds,
        "Time from publishing a record to the broker's acknowledgement, by client and topic."
    );
    describe_gauge!(
        PUBLISH_IN_FLIGHT,
        "Records the producer held (queued or awaiting acknowledgement) when it last published, by client."
    );
}

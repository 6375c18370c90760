use clap::Parser;
use dropline::config::{ConfigError, KafkaArgs, OpsArgs, Problems, RedisArgs};

/// Where the ops endpoints listen unless configured.
pub const DEFAULT_OPS_PORT: u16 = 9103;

/// The expirer: releases holds that were not paid by their deadline.
#[derive(Debug, Clone, Parser, serde::Serialize)]
#[command(name = "dropline-expirer", version)]
pub struct ExpirerConfig {
    /// Consumer group shared by all expirers.
    #[arg(long, env = "DROPLINE_EXPIRER_GROUP", default_value = "dropline-expirer")]
    pub group_id: String,
    /// Holds waiting for their deadline, per partition, before the partition
    /// is paused until some are released.
    #[arg(long, env = "DROPLINE_EXPIRER_MAX_PENDING_PER_PARTITION", default_value_t = 20_000)]
    pub max_pending_per_partition: usize,
    /// How often due holds are looked for.
    #[arg(long, env = "DROPLINE_EXPIRER_TICK_MS", default_value_t = 250)]
    pub tick_ms: u64,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub redis: RedisArgs,
    #[command(flatten)]
    pub ops: OpsArgs,
}

impl dropline::stage::StageConfig for ExpirerConfig {
    const NAME: &'static str = "expirer";
    const DEFAULT_OPS_PORT: u16 = DEFAULT_OPS_PORT;

    fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Problems::default();
        self.kafka.check(&mut p);
        self.redis.check(&mut p);
        p.require(!self.group_id.is_empty(), "DROPLINE_EXPIRER_GROUP must not be empty");
        p.within("DROPLINE_EXPIRER_MAX_PENDING_PER_PARTITION", self.max_pending_per_partition, 2..=1_000_000);
        p.within("DROPLINE_EXPIRER_TICK_MS", self.tick_ms, 10..=5_000);
        p.into_result()
    }

    fn ops(&self) -> &OpsArgs {
        &self.ops
    }

    fn describe_metrics() {
        crate::metrics::describe();
    }
}

dropline::config_tests!(super::ExpirerConfig);

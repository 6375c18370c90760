use clap::Parser;
use dropline::config::SharedArgs;

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
    #[serde(flatten)]
    pub shared: SharedArgs,
}

dropline::stage_config!(ExpirerConfig, "expirer", 9103, |config, p| {
    p.require(!config.group_id.is_empty(), "DROPLINE_EXPIRER_GROUP must not be empty");
    p.within("DROPLINE_EXPIRER_MAX_PENDING_PER_PARTITION", config.max_pending_per_partition, 2..=1_000_000);
    p.within("DROPLINE_EXPIRER_TICK_MS", config.tick_ms, 10..=5_000);
});

dropline::config_tests!(super::ExpirerConfig);

use clap::Parser;
use dropline::config::SharedArgs;

/// The allocator: consumes purchase intents and decides them in batches with
/// one Lua script call per event and batch.
#[derive(Debug, Clone, Parser, serde::Serialize)]
#[command(name = "dropline-allocator", version)]
pub struct AllocatorConfig {
    /// Consumer group shared by all allocators.
    #[arg(long, env = "DROPLINE_ALLOCATOR_GROUP", default_value = "dropline-allocator")]
    pub group_id: String,
    /// Most intents decided in one batch. One script call per event and
    /// batch holds Redis for about 2 µs per intent; 2,000 keeps that near
    /// 4 ms while reaching the one-call-per-intent ceiling (measured: 500 per
    /// batch gave 0.6 of it, 2,000 gave 1.0; see docs/PERFORMANCE.md).
    #[arg(long, env = "DROPLINE_ALLOCATOR_BATCH_MAX", default_value_t = 2000)]
    pub batch_max: usize,
    /// How long a batch waits to fill after its first intent.
    #[arg(long, env = "DROPLINE_ALLOCATOR_BATCH_LINGER_MS", default_value_t = 5)]
    pub batch_linger_ms: u64,
    #[command(flatten)]
    #[serde(flatten)]
    pub shared: SharedArgs,
}

dropline::stage_config!(AllocatorConfig, "allocator", 9101, |config, p| {
    p.require(!config.group_id.is_empty(), "DROPLINE_ALLOCATOR_GROUP must not be empty");
    p.within("DROPLINE_ALLOCATOR_BATCH_MAX", config.batch_max, 1..=10_000);
    p.require(config.batch_linger_ms <= 1000, "DROPLINE_ALLOCATOR_BATCH_LINGER_MS must be at most 1000");
});

dropline::config_tests!(super::AllocatorConfig);

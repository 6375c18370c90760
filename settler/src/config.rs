use clap::Parser;
use dropline::config::{MysqlArgs, SharedArgs};

/// The settler: persists what the other stages decided into MySQL.
#[derive(Debug, Clone, Parser, serde::Serialize)]
#[command(name = "dropline-settler", version)]
pub struct SettlerConfig {
    /// Consumer group shared by all settlers.
    #[arg(long, env = "DROPLINE_SETTLER_GROUP", default_value = "dropline-settler")]
    pub group_id: String,
    /// Most messages written in one transaction.
    #[arg(long, env = "DROPLINE_SETTLER_BATCH_MAX", default_value_t = 1000)]
    pub batch_max: usize,
    /// How long a batch waits to fill after its first message.
    #[arg(long, env = "DROPLINE_SETTLER_BATCH_LINGER_MS", default_value_t = 20)]
    pub batch_linger_ms: u64,
    /// How often the ledger in Redis is compared with the orders in MySQL.
    #[arg(long, env = "DROPLINE_SETTLER_DRIFT_INTERVAL_SECS", default_value_t = 5)]
    pub drift_interval_secs: u64,
    /// Passes the same drift must last (with the settlers caught up) before
    /// the reconciler rebuilds the event's ledger from MySQL.
    #[arg(long, env = "DROPLINE_SETTLER_REPAIR_AFTER_PASSES", default_value_t = 3)]
    pub repair_after_passes: u32,
    /// How long past its deadline a hold may stay held in MySQL before the
    /// reconciler ends it (the expirer normally ends it on time).
    #[arg(long, env = "DROPLINE_SETTLER_OVERDUE_GRACE_SECS", default_value_t = 30)]
    pub overdue_grace_secs: u64,
    /// How long an allocator's in-flight mark counts without being renewed;
    /// past it, a rebuild takes that allocator for dead and goes on. At least
    /// 3000: allocators renew every second and pause at most 2 s.
    #[arg(long, env = "DROPLINE_SETTLER_REBUILD_GRACE_MS", default_value_t = 6_000)]
    pub rebuild_grace_ms: u64,
    /// How long a rebuild waits for the settlers to record everything on Kafka.
    #[arg(long, env = "DROPLINE_SETTLER_REBUILD_TIMEOUT_SECS", default_value_t = 120)]
    pub rebuild_timeout_secs: u64,
    /// How often the outbox is read for changes when no batch of this
    /// settler wrote any (changes another process made).
    #[arg(long, env = "DROPLINE_SETTLER_OUTBOX_POLL_MS", default_value_t = 250)]
    pub outbox_poll_ms: u64,
    /// How often the settler looks for sales that opened, sold out or came
    /// back on sale (each announced as the event's change).
    #[arg(long, env = "DROPLINE_SETTLER_MILESTONE_POLL_MS", default_value_t = 1_000)]
    pub milestone_poll_ms: u64,
    #[command(flatten)]
    #[serde(flatten)]
    pub provider: dropline::config::ProviderArgs,
    /// How often refunds due are looked for.
    #[arg(long, env = "DROPLINE_SETTLER_REFUND_POLL_MS", default_value_t = 500)]
    pub refund_poll_ms: u64,
    /// How long one refund call to the provider may take.
    #[arg(long, env = "DROPLINE_SETTLER_REFUND_TIMEOUT_MS", default_value_t = 10_000)]
    pub refund_timeout_ms: u64,
    /// The wait after a refund's first failed call; it doubles after each
    /// failure (with jitter), up to DROPLINE_SETTLER_REFUND_RETRY_MAX_SECS.
    /// A refund is retried until the provider makes it.
    #[arg(long, env = "DROPLINE_SETTLER_REFUND_RETRY_BASE_MS", default_value_t = 1_000)]
    pub refund_retry_base_ms: u64,
    #[arg(long, env = "DROPLINE_SETTLER_REFUND_RETRY_MAX_SECS", default_value_t = 300)]
    pub refund_retry_max_secs: u64,
    #[command(flatten)]
    pub mysql: MysqlArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub shared: SharedArgs,
}

impl SettlerConfig {
    pub fn rebuild_options(&self) -> crate::rebuild::RebuildOptions {
        crate::rebuild::RebuildOptions {
            settler_group: self.group_id.clone(),
            in_flight_grace: std::time::Duration::from_millis(self.rebuild_grace_ms),
            catch_up_timeout: std::time::Duration::from_secs(self.rebuild_timeout_secs),
            fence_ttl_secs: self.rebuild_timeout_secs + 60,
        }
    }

    pub fn refund_options(&self) -> crate::refunds::RefundOptions {
        use std::time::Duration;
        crate::refunds::RefundOptions {
            provider_url: self.provider.base().to_owned(),
            poll: Duration::from_millis(self.refund_poll_ms),
            timeout: Duration::from_millis(self.refund_timeout_ms),
            backoff: dropline::retry::Backoff {
                base: Duration::from_millis(self.refund_retry_base_ms),
                max: Duration::from_secs(self.refund_retry_max_secs),
                attempts: u32::MAX,
            },
        }
    }

    pub fn reconcile_options(&self) -> crate::reconcile::ReconcileOptions {
        crate::reconcile::ReconcileOptions {
            every: std::time::Duration::from_secs(self.drift_interval_secs),
            repair_after: self.repair_after_passes,
            overdue_grace: std::time::Duration::from_secs(self.overdue_grace_secs),
            rebuild: self.rebuild_options(),
        }
    }
}

dropline::stage_config!(SettlerConfig, "settler", 9102, |config, p| {
    config.mysql.check(p);
    p.within("DROPLINE_SETTLER_DRIFT_INTERVAL_SECS", config.drift_interval_secs, 1..=3600);
    p.require(config.repair_after_passes > 0, "DROPLINE_SETTLER_REPAIR_AFTER_PASSES must be positive");
    // An allocator renews its in-flight marks every second while it
    // publishes and pauses at most 2 s between attempts: a shorter grace
    // would take a live allocator for a dead one.
    p.require(config.rebuild_grace_ms >= 3_000, "DROPLINE_SETTLER_REBUILD_GRACE_MS must be at least 3000");
    p.require(config.rebuild_timeout_secs > 0, "DROPLINE_SETTLER_REBUILD_TIMEOUT_SECS must be positive");
    p.require(!config.group_id.is_empty(), "DROPLINE_SETTLER_GROUP must not be empty");
    p.within("DROPLINE_SETTLER_BATCH_MAX", config.batch_max, 1..=5_000);
    p.within("DROPLINE_SETTLER_OUTBOX_POLL_MS", config.outbox_poll_ms, 10..=60_000);
    p.within("DROPLINE_SETTLER_MILESTONE_POLL_MS", config.milestone_poll_ms, 10..=60_000);
    p.require(config.batch_linger_ms <= 5_000, "DROPLINE_SETTLER_BATCH_LINGER_MS must be at most 5000");
    config.provider.check(p);
    p.within("DROPLINE_SETTLER_REFUND_POLL_MS", config.refund_poll_ms, 10..=60_000);
    p.within("DROPLINE_SETTLER_REFUND_TIMEOUT_MS", config.refund_timeout_ms, 100..=120_000);
    p.within("DROPLINE_SETTLER_REFUND_RETRY_BASE_MS", config.refund_retry_base_ms, 10..=600_000);
    p.within("DROPLINE_SETTLER_REFUND_RETRY_MAX_SECS", config.refund_retry_max_secs, 1..=86_400);
});

dropline::config_tests!(super::SettlerConfig);

use std::time::Duration;

use clap::Parser;
use dropline::config::{MysqlArgs, SharedArgs};
use dropline::secrets::Secret;

/// The notifier: delivers the record's changes to the host as signed
/// webhooks.
#[derive(Debug, Clone, Parser, serde::Serialize)]
#[command(name = "dropline-notifier", version)]
pub struct NotifierConfig {
    /// Consumer group shared by all notifiers.
    #[arg(long, env = "DROPLINE_NOTIFIER_GROUP", default_value = "dropline-notifier")]
    pub group_id: String,
    /// The host's notification endpoint (HTTP or HTTPS). The local stack's
    /// default is its webhook receiver (`dropctl receive`).
    #[arg(long, env = "DROPLINE_NOTIFY_URL", default_value = "http://127.0.0.1:9180/webhooks")]
    #[serde(serialize_with = "dropline::config::url_origin")]
    pub notify_url: String,
    /// The secret webhooks are signed with (HMAC-SHA256 over the timestamp
    /// and the body); the host checks it. The local stack generates it in
    /// .dropline/secrets.env.
    #[arg(long, env = "DROPLINE_NOTIFY_SECRET", hide_env_values = true)]
    pub notify_secret: Option<Secret>,
    /// How long one delivery attempt may take.
    #[arg(long, env = "DROPLINE_NOTIFIER_ATTEMPT_TIMEOUT_MS", default_value_t = 5_000)]
    pub attempt_timeout_ms: u64,
    /// Attempts at a webhook before it is dead-lettered. The wait between
    /// two doubles from the backoff base up to its cap, with jitter: the
    /// defaults keep trying for about 40 minutes.
    #[arg(long, env = "DROPLINE_NOTIFIER_MAX_ATTEMPTS", default_value_t = 15)]
    pub max_attempts: u32,
    /// The first wait after a failed attempt.
    #[arg(long, env = "DROPLINE_NOTIFIER_BACKOFF_BASE_MS", default_value_t = 1_000)]
    pub backoff_base_ms: u64,
    /// The longest wait between two attempts.
    #[arg(long, env = "DROPLINE_NOTIFIER_BACKOFF_MAX_MS", default_value_t = 300_000)]
    pub backoff_max_ms: u64,
    /// How long before a hold's deadline its buyer is reminded, if it is
    /// still held then; 0 sends no reminders.
    #[arg(long, env = "DROPLINE_NOTIFIER_REMINDER_LEAD_SECS", default_value_t = 60)]
    pub reminder_lead_secs: u64,
    /// Webhooks sent at once.
    #[arg(long, env = "DROPLINE_NOTIFIER_CONCURRENCY", default_value_t = 64)]
    pub concurrency: usize,
    /// Changes waiting for delivery, per partition, before the partition is
    /// paused until some are delivered.
    #[arg(long, env = "DROPLINE_NOTIFIER_MAX_PENDING_PER_PARTITION", default_value_t = 10_000)]
    pub max_pending_per_partition: usize,
    /// How often due deliveries (and reminders) are looked for.
    #[arg(long, env = "DROPLINE_NOTIFIER_TICK_MS", default_value_t = 100)]
    pub tick_ms: u64,
    #[command(flatten)]
    pub mysql: MysqlArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub shared: SharedArgs,
}

impl NotifierConfig {
    pub fn attempt_timeout(&self) -> Duration {
        Duration::from_millis(self.attempt_timeout_ms)
    }

    pub fn backoff(&self) -> crate::deliver::Backoff {
        crate::deliver::Backoff {
            base: Duration::from_millis(self.backoff_base_ms),
            max: Duration::from_millis(self.backoff_max_ms),
            attempts: self.max_attempts,
        }
    }
}

dropline::stage_config!(NotifierConfig, "notifier", 9104, |config, p| {
    config.mysql.check(p);
    p.require(!config.group_id.is_empty(), "DROPLINE_NOTIFIER_GROUP must not be empty");
    match reqwest::Url::parse(&config.notify_url) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => {}
        _ => p.add(format!(
            "DROPLINE_NOTIFY_URL must be an http or https URL with a host, not {:?}",
            dropline::config::origin(&config.notify_url)
        )),
    }
    dropline::secrets::check_setting("DROPLINE_NOTIFY_SECRET", &config.notify_secret, p);
    p.within("DROPLINE_NOTIFIER_ATTEMPT_TIMEOUT_MS", config.attempt_timeout_ms, 100..=120_000);
    p.within("DROPLINE_NOTIFIER_MAX_ATTEMPTS", config.max_attempts, 1..=100);
    p.within("DROPLINE_NOTIFIER_BACKOFF_BASE_MS", config.backoff_base_ms, 1..=600_000);
    p.require(
        config.backoff_max_ms >= config.backoff_base_ms,
        "DROPLINE_NOTIFIER_BACKOFF_MAX_MS must be at least DROPLINE_NOTIFIER_BACKOFF_BASE_MS",
    );
    p.within("DROPLINE_NOTIFIER_REMINDER_LEAD_SECS", config.reminder_lead_secs, 0..=86_400);
    p.within("DROPLINE_NOTIFIER_CONCURRENCY", config.concurrency, 1..=4_096);
    p.within("DROPLINE_NOTIFIER_MAX_PENDING_PER_PARTITION", config.max_pending_per_partition, 2..=1_000_000);
    p.within("DROPLINE_NOTIFIER_TICK_MS", config.tick_ms, 10..=5_000);
});

dropline::config_tests!(super::NotifierConfig, format!("--notify-secret={}", dropline::secrets::random()));

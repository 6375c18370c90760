use std::net::SocketAddr;

use clap::Parser;
use dropline::config::{redact_url, ConfigError, KafkaArgs, MysqlArgs, OpsArgs, Problems, RedisArgs};
use dropline::secrets;

/// The ingress: Dropline's HTTP API for buyers, admins and the payment
/// provider's webhooks.
#[derive(Debug, Clone, Parser)]
#[command(name = "dropline-ingress", version)]
pub struct IngressConfig {
    /// Where the public API listens.
    #[arg(long, env = "DROPLINE_LISTEN_ADDR", default_value = "127.0.0.1:8080")]
    pub listen_addr: SocketAddr,
    /// HS256 secret buyers' tokens are signed with (shared with the
    /// storefront's login). At least 32 random bytes; never a published
    /// value.
    #[arg(long, env = "DROPLINE_JWT_SECRET", default_value = "", hide_default_value = true, hide_env_values = true)]
    pub jwt_secret: String,
    /// HS256 secret admins' tokens are signed with: a different one, held
    /// only by operators' tooling.
    #[arg(
        long,
        env = "DROPLINE_ADMIN_JWT_SECRET",
        default_value = "",
        hide_default_value = true,
        hide_env_values = true
    )]
    pub admin_jwt_secret: String,
    /// The `iss` every token must carry (and `dropctl token` sets).
    #[arg(long, env = "DROPLINE_JWT_ISSUER", default_value = dropline::auth::DEFAULT_ISSUER)]
    pub jwt_issuer: String,
    /// Secret the payment provider signs its webhooks with.
    #[arg(
        long,
        env = "DROPLINE_WEBHOOK_SECRET",
        default_value = "",
        hide_default_value = true,
        hide_env_values = true
    )]
    pub webhook_secret: String,
    /// How far a webhook's signed timestamp may be from now.
    #[arg(long, env = "DROPLINE_WEBHOOK_TOLERANCE_SECS", default_value_t = 300)]
    pub webhook_tolerance_secs: i64,
    /// The payment provider's API.
    #[arg(long, env = "DROPLINE_PAYMENT_PROVIDER_URL", default_value = "http://127.0.0.1:8090")]
    pub payment_provider_url: String,
    /// Purchases admitted per second by this process, all buyers together.
    #[arg(long, env = "DROPLINE_ADMIT_PER_SEC", default_value_t = 20_000)]
    pub admit_per_sec: u32,
    /// Burst above the admission rate.
    #[arg(long, env = "DROPLINE_ADMIT_BURST", default_value_t = 5_000)]
    pub admit_burst: u32,
    /// Purchases one buyer may make per second.
    #[arg(long, env = "DROPLINE_USER_PER_SEC", default_value_t = 2)]
    pub user_per_sec: u32,
    /// Burst above one buyer's rate.
    #[arg(long, env = "DROPLINE_USER_BURST", default_value_t = 5)]
    pub user_burst: u32,
    /// How long event details are cached in the process.
    #[arg(long, env = "DROPLINE_EVENT_CACHE_TTL_MS", default_value_t = 5_000)]
    pub event_cache_ttl_ms: u64,
    /// Largest request body accepted.
    #[arg(long, env = "DROPLINE_MAX_BODY_BYTES", default_value_t = 16 * 1024)]
    pub max_body_bytes: usize,
    /// How long idempotency records (and intent status) stay in Redis.
    #[arg(long, env = "DROPLINE_IDEMPOTENCY_TTL_SECS", default_value_t = 86_400)]
    pub idempotency_ttl_secs: u64,
    /// How long a request owns its Idempotency-Key while it produces the
    /// intent; copies sent meanwhile get 409 `idempotency_in_progress`. Once
    /// it runs out (the owner crashed), a retry takes the key over and
    /// produces the intent again. Longer than a produce can take
    /// (`DROPLINE_KAFKA_MESSAGE_TIMEOUT_MS`), or slow owners are taken over
    /// needlessly (harmless: the same intent is produced twice).
    #[arg(long, env = "DROPLINE_IDEMPOTENCY_LEASE_MS", default_value_t = 10_000)]
    pub idempotency_lease_ms: u64,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub redis: RedisArgs,
    #[command(flatten)]
    pub mysql: MysqlArgs,
    #[command(flatten)]
    pub ops: OpsArgs,
}

impl IngressConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Problems::default();
        self.kafka.check(&mut p);
        self.redis.check(&mut p);
        self.mysql.check(&mut p);
        let secrets = [
            ("DROPLINE_JWT_SECRET", &self.jwt_secret),
            ("DROPLINE_ADMIN_JWT_SECRET", &self.admin_jwt_secret),
            ("DROPLINE_WEBHOOK_SECRET", &self.webhook_secret),
        ];
        for (name, value) in secrets {
            secrets::check_setting(name, value, &mut p);
        }
        // One secret in two roles would let whoever holds it for one (the
        // storefront, the provider) act in the other.
        for (i, (a, va)) in secrets.iter().enumerate() {
            for (b, vb) in &secrets[i + 1..] {
                if !va.is_empty() && va == vb {
                    p.add(format!("{a} and {b} must differ"));
                }
            }
        }
        if self.jwt_issuer.trim().is_empty() {
            p.add("DROPLINE_JWT_ISSUER is empty");
        }
        if self.webhook_tolerance_secs <= 0 {
            p.add("DROPLINE_WEBHOOK_TOLERANCE_SECS must be positive");
        }
        if !self.payment_provider_url.starts_with("http://") && !self.payment_provider_url.starts_with("https://") {
            p.add("DROPLINE_PAYMENT_PROVIDER_URL must be an http(s) URL");
        }
        for (name, v) in [
            ("DROPLINE_ADMIT_PER_SEC", self.admit_per_sec),
            ("DROPLINE_ADMIT_BURST", self.admit_burst),
            ("DROPLINE_USER_PER_SEC", self.user_per_sec),
            ("DROPLINE_USER_BURST", self.user_burst),
        ] {
            if v == 0 {
                p.add(format!("{name} must be positive"));
            }
        }
        if self.idempotency_ttl_secs == 0 {
            p.add("DROPLINE_IDEMPOTENCY_TTL_SECS must be positive");
        }
        if self.idempotency_lease_ms == 0 || self.idempotency_lease_ms / 1000 >= self.idempotency_ttl_secs {
            p.add("DROPLINE_IDEMPOTENCY_LEASE_MS must be positive and shorter than DROPLINE_IDEMPOTENCY_TTL_SECS");
        }
        if self.max_body_bytes < 256 {
            p.add("DROPLINE_MAX_BODY_BYTES must be at least 256");
        }
        p.into_result()
    }

    /// The effective config for the start-up log, secrets masked.
    pub fn log_effective(&self) {
        tracing::info!(
            listen_addr = %self.listen_addr,
            ops_addr = %self.ops.addr_or(crate::DEFAULT_OPS_PORT),
            kafka_brokers = %self.kafka.brokers,
            topic_prefix = %self.kafka.topic_prefix,
            redis_url = %redact_url(&self.redis.url),
            mysql_url = %redact_url(&self.mysql.url),
            payment_provider_url = %self.payment_provider_url,
            admit_per_sec = self.admit_per_sec,
            admit_burst = self.admit_burst,
            user_per_sec = self.user_per_sec,
            user_burst = self.user_burst,
            jwt_issuer = %self.jwt_issuer,
            idempotency_ttl_secs = self.idempotency_ttl_secs,
            idempotency_lease_ms = self.idempotency_lease_ms,
            jwt_secret = "***",
            admin_jwt_secret = "***",
            webhook_secret = "***",
            "ingress config"
        );
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    const BUYER: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";
    const ADMIN: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f91";
    const WEBHOOK: &str = "5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d";

    fn with(jwt: &str, admin: &str, webhook: &str) -> IngressConfig {
        IngressConfig::parse_from([
            "ingress".to_owned(),
            format!("--jwt-secret={jwt}"),
            format!("--admin-jwt-secret={admin}"),
            format!("--webhook-secret={webhook}"),
        ])
    }

    fn problems(config: &IngressConfig) -> Vec<String> {
        config.validate().err().map(|e| e.0).unwrap_or_default()
    }

    #[test]
    fn the_command_line_is_well_formed_and_random_secrets_validate() {
        IngressConfig::command().debug_assert();
        with(BUYER, ADMIN, WEBHOOK).validate().unwrap();
    }

    #[test]
    fn without_secrets_every_missing_one_is_named() {
        // Empty flags, not none: the environment of whoever runs the test
        // must not fill them in.
        let p = problems(&with("", "", ""));
        assert_eq!(
            p,
            [
                "DROPLINE_JWT_SECRET is not set",
                "DROPLINE_ADMIN_JWT_SECRET is not set",
                "DROPLINE_WEBHOOK_SECRET is not set"
            ]
        );
    }

    #[test]
    fn published_short_placeholder_and_shared_secrets_are_refused_together() {
        let p = problems(&with("dropline-local-jwt-secret", "too-short", "change-me-to-the-provider-signing-secret"));
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].starts_with("DROPLINE_JWT_SECRET is a value published"), "{p:?}");
        assert!(p[1].starts_with("DROPLINE_ADMIN_JWT_SECRET is shorter than 32 bytes"), "{p:?}");
        assert!(p[2].starts_with("DROPLINE_WEBHOOK_SECRET is a value published"), "{p:?}");
        let p = problems(&with("<a-random-value-of-at-least-32-bytes>", ADMIN, WEBHOOK));
        assert_eq!(p.len(), 1);
        assert!(p[0].starts_with("DROPLINE_JWT_SECRET looks like a placeholder"), "{p:?}");
        assert_eq!(
            problems(&with(BUYER, BUYER, WEBHOOK)),
            ["DROPLINE_JWT_SECRET and DROPLINE_ADMIN_JWT_SECRET must differ"]
        );
    }

    /// The manifests' placeholders must not start a deployment.
    #[test]
    fn the_k8s_placeholders_are_refused() {
        let manifest = include_str!("../../k8s/config.yaml");
        let value = |name: &str| {
            let line = manifest.lines().find(|l| l.trim_start().starts_with(&format!("{name}:"))).unwrap();
            line.split_once(':').unwrap().1.trim().trim_matches('"').to_owned()
        };
        let config =
            with(&value("DROPLINE_JWT_SECRET"), &value("DROPLINE_ADMIN_JWT_SECRET"), &value("DROPLINE_WEBHOOK_SECRET"));
        assert_eq!(problems(&config).len(), 3, "{:?}", problems(&config));
    }
}

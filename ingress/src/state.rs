//! What every request handler shares.

use std::sync::Arc;
use std::time::Duration;

use dropline::auth::Tokens;
use dropline::kafka::{Publisher, Record};
use dropline::messages::{OrderChange, Topics};
use dropline::secrets::exposed;
use dropline::stock::Ledger;
use sqlx::MySqlPool;
use tokio_util::sync::CancellationToken;

use crate::accepted::Accepted;
use crate::allocation::AllocationLine;
use crate::config::IngressConfig;
use crate::events::{self, Events};
use crate::identity::Jwks;
use crate::intents::IntentStore;
use crate::limits::Limits;
use crate::live::Live;
use crate::orders::Orders;
use crate::peer::TrustedProxies;
use crate::problem::{ErrorCode, Problem};
use crate::rooms::WaitingRooms;

/// Everything a request handler needs.
pub struct AppState {
    pub config: IngressConfig,
    pub tokens: Tokens,
    pub events: Events,
    pub intents: IntentStore,
    pub orders: Orders,
    pub rooms: WaitingRooms,
    pub allocation: AllocationLine,
    /// The purchases accepted per event, from the intents topic.
    pub accepted: Arc<Accepted>,
    pub live: Arc<Live>,
    pub ledger: Ledger,
    pub db: MySqlPool,
    pub publisher: Publisher,
    pub topics: Topics,
    pub limits: Arc<Limits>,
    /// An identity provider's keys, when one is configured.
    pub identity: Option<Arc<Jwks>>,
    /// Whose `X-Forwarded-For` is believed.
    pub proxies: TrustedProxies,
    pub http: reqwest::Client,
}

impl AppState {
    /// The handlers' state over the given clients.
    pub(crate) fn new(
        config: IngressConfig,
        db: MySqlPool,
        redis: dropline::redis_pool::Pool,
        publisher: Publisher,
        search_timeout: events::SearchTimeout,
        shutdown: CancellationToken,
    ) -> Result<AppState, reqwest::Error> {
        let ledger = Ledger::new(redis.clone(), &config.shared.redis.key_prefix);
        let prefix = &config.shared.redis.key_prefix;
        let rooms = WaitingRooms::new(
            db.clone(),
            dropline::room::Rooms::new(redis.clone(), prefix),
            exposed(&config.admin_jwt_secret),
            &config.jwt_issuer,
        );
        let intents = IntentStore::new(redis, prefix, config.idempotency_ttl_secs);
        Ok(AppState {
            tokens: Tokens::new(exposed(&config.jwt_secret), exposed(&config.admin_jwt_secret), &config.jwt_issuer),
            events: Events::new(db.clone(), ledger.clone(), Duration::from_millis(config.event_cache_ttl_ms))
                .with_search_timeout(search_timeout),
            orders: Orders::new(intents.clone(), ledger.clone(), db.clone()),
            rooms,
            allocation: AllocationLine::default(),
            accepted: Arc::new(Accepted::new(
                Duration::from_millis(config.http_request_timeout_ms) + events::AVAILABLE_TTL,
            )),
            live: Arc::new(Live::new(config.stream_limit(), shutdown)),
            intents,
            ledger,
            db,
            publisher,
            topics: config.shared.kafka.topics(),
            limits: Arc::new(Limits::new(config.rates())),
            proxies: config.trusted_proxies.parse().unwrap_or_default(),
            identity: (!config.jwks_url.is_empty()).then(|| {
                let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap_or_default();
                Arc::new(Jwks::new(&config.jwks_url, &config.jwks_issuer, &config.jwks_audience, http))
            }),
            http: reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?,
            config,
        })
    }

    /// Puts an order's new state on Kafka and waits for the ack.
    pub async fn publish_order_event(&self, event: &OrderChange, request_id: &str) -> Result<(), Problem> {
        let payload = serde_json::to_vec(event).map_err(|_| Problem::new(ErrorCode::Internal))?;
        let key = event.order_id.to_string();
        let record = Record::new(&self.topics.order_changes, &key, &payload).request_id(Some(request_id));
        self.publisher.publish(record).await.map_err(|e| {
            tracing::warn!(error = %e, order_id = %event.order_id, "order change not acknowledged");
            Problem::new(ErrorCode::BrokerUnavailable).retry_after(1)
        })
    }
}

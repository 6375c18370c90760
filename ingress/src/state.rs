//! What every request handler shares.

use std::sync::Arc;

use dropline::auth::Tokens;
use dropline::kafka;
use dropline::messages::{OrderEvent, Topics};
use dropline::stock::Ledger;
use sqlx::MySqlPool;

use crate::config::IngressConfig;
use crate::events::Events;
use crate::intents::IntentStore;
use crate::limits::Limits;
use crate::orders::Orders;
use crate::problem::{ErrorCode, Problem};

/// Everything a request handler needs.
pub struct AppState {
    pub config: IngressConfig,
    pub tokens: Tokens,
    pub events: Events,
    pub intents: IntentStore,
    pub orders: Orders,
    pub ledger: Ledger,
    pub db: MySqlPool,
    pub producer: kafka::Producer,
    pub topics: Topics,
    pub limits: Arc<Limits>,
    pub http: reqwest::Client,
}

impl AppState {
    /// Puts an order's new state on Kafka and waits for the ack.
    pub async fn publish_order_event(&self, event: &OrderEvent, request_id: &str) -> Result<(), Problem> {
        let payload = serde_json::to_vec(event).map_err(|_| Problem::new(ErrorCode::Internal))?;
        let headers = kafka::request_id_headers(Some(request_id));
        kafka::send_acked(&self.producer, &self.topics.order_events, &event.order_id.to_string(), &payload, headers)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, order_id = %event.order_id, "order event not acknowledged");
                Problem::new(ErrorCode::BrokerUnavailable).retry_after(1)
            })
    }
}

//! The ingress: Dropline's HTTP front door.
//!
//! - [`routes`]: the API. Buyers purchase (`POST /v1/events/{id}/purchases`),
//!   follow their intent and order, cancel and pay; admins create events;
//!   the payment provider calls the webhook. [`extract`] reads requests
//!   (tokens, keys, ids, bodies); [`layers`] wrap every route (request id,
//!   metrics, timeouts, load shedding).
//! - [`intents`]: idempotency records and the intent index in Redis;
//!   [`allocation`]: where a queued intent stands in the allocators' line;
//!   [`accepted`]: the intents accepted per event, which let a sell-out's
//!   flood be refused from memory.
//! - [`events`]: events in MySQL behind the in-memory [`snapshot`] every
//!   read comes from, and the pre-warm.
//! - [`rooms`]: waiting rooms: their record, admission tokens and the
//!   keeper that draws each room and lets its buyers through.
//! - [`live`]: what the event streams are fed from: one subscription to
//!   decisions and order changes per process, and each room's line.
//! - [`orders`]: an order's live state (Redis) or settled state (MySQL).
//! - [`record`]: the ingress's SQL (events, and orders and intents looked
//!   up once Redis no longer has them).
//! - [`identity`]: buyers' tokens from an identity provider (JWKS).
//! - [`limits`]: governor admission control: global, per buyer, per client
//!   address ([`peer`]: who the client is, behind trusted proxies), per event.
//! - [`problem`]: the error codes and their problem+json answers.
//! - [`server`]: the listener: connection cap, header-read and idle
//!   timeouts, the drain.
//! - [`state`]: what every handler shares; [`config`], [`metrics`]:
//!   settings and metric names.

pub mod accepted;
pub mod allocation;
pub mod config;
pub mod events;
mod extract;
pub mod identity;
pub mod intents;
mod layers;
pub mod limits;
pub mod live;
pub mod metrics;
pub mod orders;
pub mod peer;
pub mod problem;
pub mod record;
pub mod rooms;
mod routes;
pub mod server;
pub mod snapshot;
mod state;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dropline::kafka::{self, Publisher, WhenFull};
use dropline::stage::{Stage, StageConfig};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::IngressConfig;

use crate::state::AppState;

/// Why the ingress could not start. What every stage can meet is a
/// [`StageError`](dropline::stage::StageError); the rest is the ingress's.
#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    #[error(transparent)]
    Stage(#[from] dropline::stage::StageError),
    #[error("http client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("listening: {0}")]
    Listen(#[from] std::io::Error),
    #[error("the identity provider's keys: {0}")]
    Identity(#[from] identity::JwksError),
    #[error("stopped while waiting for {0} to be reachable")]
    StoppedWaiting(&'static str),
}

/// `?` on a setup step's error, through the stage error it is.
macro_rules! setup_errors {
    ($($error:ty),*) => {$(
        impl From<$error> for IngressError {
            fn from(e: $error) -> Self {
                IngressError::Stage(e.into())
            }
        }
    )*};
}
setup_errors!(
    sqlx::Error,
    sqlx::migrate::MigrateError,
    dropline::redis_pool::CreatePoolError,
    kafka::KafkaSetupError,
    rdkafka::error::KafkaError,
    dropline::config::ConfigError
);

/// The API over clients that connect on first use: building it reaches no
/// service, and neither does a request refused before its handler reads a
/// store. For driving the handlers without a socket or a running stack
/// (`tower::ServiceExt::oneshot`); [`start_on`] serves the same routes.
pub fn router(config: IngressConfig) -> Result<axum::Router, IngressError> {
    config.validate()?;
    let db = dropline::db::connect_lazy(&config.mysql)?;
    let redis = config.shared.redis.pool()?;
    let publisher = Publisher::new(&config.shared.kafka, "ingress-producer", WhenFull::Refuse)?;
    let state = AppState::new(config, db, redis, publisher, events::SearchTimeout::None, CancellationToken::new())?;
    Ok(routes::router(Arc::new(state)))
}

/// A started ingress.
pub struct Running {
    pub api_addr: SocketAddr,
    pub ops_addr: SocketAddr,
    pub task: JoinHandle<()>,
}

/// Serves until `shutdown`, then drains: readiness goes false, no new
/// connections are taken, requests in flight finish, the producer flushes.
pub async fn run(config: IngressConfig, shutdown: CancellationToken) -> Result<(), IngressError> {
    let running = start(config, shutdown).await?;
    let _ = running.task.await;
    Ok(())
}

/// Binds the configured address and starts serving.
pub async fn start(config: IngressConfig, shutdown: CancellationToken) -> Result<Running, IngressError> {
    let listener = TcpListener::bind(config.listen_addr).await?;
    start_on(listener, config, shutdown).await
}

/// Starts serving on a listener bound by the caller (tests bind first, to
/// hand the address to the payment provider before the ingress is up).
pub async fn start_on(
    listener: TcpListener,
    config: IngressConfig,
    shutdown: CancellationToken,
) -> Result<Running, IngressError> {
    let Stage { ready, ops_addr } = Stage::start(&config, &shutdown).await?;

    let Some(db) = dropline::db::connect_and_migrate(&config.mysql, &shutdown).await? else {
        return Err(IngressError::StoppedWaiting("mysql"));
    };
    let search_timeout = events::SearchTimeout::detect(&db, config.search_statement_timeout_ms).await?;
    let redis = config.shared.redis.pool()?;
    let topics = config.shared.kafka.topics();
    kafka::ensure_topics(&config.shared.kafka, &topics.all()).await?;
    let publisher = Publisher::new(&config.shared.kafka, "ingress-producer", WhenFull::Refuse)?;
    let state =
        Arc::new(AppState::new(config.clone(), db, redis, publisher.clone(), search_timeout, shutdown.clone())?);
    tokio::spawn(limits::prune_periodically(state.limits.clone(), Duration::from_secs(10), shutdown.clone()));
    if let Some(jwks) = &state.identity {
        match jwks.refresh().await {
            Ok(n) => tracing::info!(keys = n, "identity provider's keys read"),
            // A file is the deployment's own: one that cannot be read is a
            // mistake to fix now. A provider's URL may be down for a while.
            Err(e) if jwks.is_file() => return Err(e.into()),
            Err(e) => tracing::warn!(error = %e, "could not read the identity provider's keys; retried"),
        }
        let every = Duration::from_secs(config.jwks_refresh_secs);
        tokio::spawn(jwks.clone().keep_fresh(every, shutdown.clone()));
    }
    // The read path answers from memory: loaded before the ingress is
    // ready, then refreshed.
    if let Err(e) = state.events.catalog.refresh().await {
        tracing::warn!(error = %e, "event snapshot not loaded yet; reads go to the stores until it is");
    }
    let every = Duration::from_millis(config.snapshot_refresh_ms);
    tokio::spawn(state.events.catalog.clone().keep(every, shutdown.clone()));
    tokio::spawn(rooms::keep(state.rooms.clone(), state.live.clone(), shutdown.clone()));
    tokio::spawn(state.live.clone().follow(config.shared.kafka.clone(), topics.clone()));
    state
        .accepted
        .clone()
        .follow(
            config.shared.kafka.clone(),
            topics.intents.clone(),
            state.db.clone(),
            state.events.catalog.clone(),
            shutdown.clone(),
        )
        .await;
    tokio::spawn(state.allocation.clone().follow(
        config.shared.kafka.clone(),
        config.allocator_group.clone(),
        topics.intents.clone(),
        shutdown.clone(),
    ));

    let api_addr = listener.local_addr()?;
    let app = routes::router(state);
    ready.set(true);
    tracing::info!(%api_addr, %ops_addr, "ingress serving");

    let drain = Duration::from_secs(config.shared.ops.drain_timeout_secs);
    let limits = server::ConnLimits {
        header_read_timeout: Duration::from_millis(config.http_header_read_timeout_ms),
        idle_timeout: Duration::from_secs(config.http_idle_timeout_secs),
        max_connections: config.http_max_connections,
    };
    let task = tokio::spawn(async move {
        server::serve(listener, app, limits, ready, shutdown, drain).await;
        // Order events of requests that finished are acknowledged already;
        // this only flushes what is still queued.
        let _ = tokio::task::spawn_blocking(move || publisher.flush(Duration::from_secs(5))).await;
        tracing::info!("ingress stopped");
    });
    Ok(Running { api_addr, ops_addr, task })
}

//! The operations endpoints every stage serves on its own port: `/healthz`
//! (the process is alive), `/readyz` (it should receive work) and `/metrics`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Whether the stage wants work, and whether it is healthy.
///
/// Ready means serving and, for a consumer, holding partitions: it starts
/// false, goes true once the stage's dependencies answered (and the group
/// assigned it work), and false again as soon as draining starts. Healthy is
/// false only when the stage knows it is stuck (a consumer left without
/// partitions while the group leaves some unowned), so a restart is due.
#[derive(Clone)]
pub struct Readiness(Arc<Flags>);

struct Flags {
    serving: AtomicBool,
    assigned: AtomicBool,
    healthy: AtomicBool,
}

impl Default for Readiness {
    fn default() -> Self {
        Self(Arc::new(Flags {
            serving: AtomicBool::new(false),
            assigned: AtomicBool::new(true),
            healthy: AtomicBool::new(true),
        }))
    }
}

impl Readiness {
    /// The stage starts or stops taking work.
    pub fn set(&self, ready: bool) {
        self.0.serving.store(ready, Ordering::Release);
    }

    /// A consumer gained or lost its last partition.
    pub fn set_assigned(&self, assigned: bool) {
        self.0.assigned.store(assigned, Ordering::Release);
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.0.healthy.store(healthy, Ordering::Release);
    }

    pub fn get(&self) -> bool {
        self.0.serving.load(Ordering::Acquire) && self.0.assigned.load(Ordering::Acquire)
    }

    pub fn healthy(&self) -> bool {
        self.0.healthy.load(Ordering::Acquire)
    }
}

#[derive(Clone)]
struct OpsState {
    ready: Readiness,
    metrics: PrometheusHandle,
}

/// The ops routes, for stages that serve them on a listener of their own
/// choosing (the ingress merges them into its public router too).
pub fn router(ready: Readiness, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render))
        .with_state(OpsState { ready, metrics })
}

/// Binds `addr` and serves the ops routes until `shutdown`. Returns the bound
/// address (port 0 picks one) and the server task.
pub async fn serve(
    addr: SocketAddr,
    ready: Readiness,
    metrics: PrometheusHandle,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = router(ready, metrics);
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await;
        if let Err(e) = served {
            tracing::error!(error = %e, "ops server failed");
        }
    });
    Ok((bound, task))
}

async fn healthz(State(state): State<OpsState>) -> (StatusCode, &'static str) {
    if state.ready.healthy() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "stuck: no partitions while the group leaves some unowned")
    }
}

async fn readyz(State(state): State<OpsState>) -> (StatusCode, &'static str) {
    if state.ready.get() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn render(State(state): State<OpsState>) -> String {
    state.metrics.render()
}

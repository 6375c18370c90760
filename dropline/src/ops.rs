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

/// Whether the stage wants work. It starts false, goes true once the stage's
/// dependencies answered, and false again as soon as draining starts.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
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
        .route("/healthz", get(|| async { "ok" }))
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

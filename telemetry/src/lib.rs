//! What every ferrolb binary serves and sets up the same way: the `/metrics`, `/healthz` and
//! `/readyz` endpoints, the log format, and the signals that stop it.

#![forbid(unsafe_code)]

#[cfg(feature = "testing")]
pub mod testing;
pub mod vital;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

/// What a binary exposes: its metrics in the Prometheus text format, whether it is ready, and
/// whether it is healthy (a part stuck, as kube-proxy's `/healthz` tells when its rules are
/// stale, is not).
pub trait Telemetry: Send + Sync + 'static {
    fn encode(&self) -> String;
    fn ready(&self) -> bool;
    fn healthy(&self) -> bool {
        true
    }
}

async fn metrics<T: Telemetry>(State(t): State<Arc<T>>) -> (StatusCode, [(&'static str, &'static str); 1], String) {
    (StatusCode::OK, [("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], t.encode())
}

async fn healthz<T: Telemetry>(State(t): State<Arc<T>>) -> (StatusCode, &'static str) {
    if t.healthy() { (StatusCode::OK, "ok\n") } else { (StatusCode::SERVICE_UNAVAILABLE, "unhealthy\n") }
}

async fn readyz<T: Telemetry>(State(t): State<Arc<T>>) -> (StatusCode, &'static str) {
    if t.ready() { (StatusCode::OK, "ok\n") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready\n") }
}

/// The `/metrics`, `/healthz`, `/livez` and `/readyz` server, its port already bound: a port in
/// use is a start-up error that names the address, not a server that silently never runs.
pub struct Server {
    listener: tokio::net::TcpListener,
    app: Router,
}

/// The metrics address could not be bound (in use, not ours, not an address of this host).
#[derive(Debug, thiserror::Error)]
#[error("cannot serve /metrics, /healthz and /readyz on {addr}")]
pub struct BindError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Binds `addr` now, for [`Server::serve`] to answer on.
pub async fn bind<T: Telemetry>(addr: SocketAddr, t: Arc<T>) -> Result<Server, BindError> {
    let app = Router::new()
        .route("/metrics", get(metrics::<T>))
        .route("/healthz", get(healthz::<T>))
        .route("/livez", get(healthz::<T>))
        .route("/readyz", get(readyz::<T>))
        .with_state(t);
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| BindError { addr, source })?;
    Ok(Server { listener, app })
}

impl Server {
    /// Serves `/metrics`, `/healthz` and `/livez` (both 503 when not healthy) and `/readyz`
    /// until `shutdown` resolves.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
        axum::serve(self.listener, self.app).with_graceful_shutdown(shutdown).await
    }
}

/// Logs to stderr at `level` (tracing's EnvFilter syntax), as `json` or text.
pub fn init_logs(format: &str, level: &str) -> Result<(), tracing_subscriber::filter::ParseError> {
    let filter = tracing_subscriber::EnvFilter::try_new(level)?;
    let sub = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == "json" {
        sub.json().init()
    } else {
        sub.init()
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
}

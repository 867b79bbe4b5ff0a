//! `ferrolb-controller`: parse flags, build, run, shut down.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use ferrolb_controller::controller::{self, Settings};
use ferrolb_controller::metrics::Metrics;
use ferrolb_controller::service::ClassPolicy;

#[derive(Parser, Debug)]
#[command(name = "ferrolb-controller", version, about = "Assigns external IPs to LoadBalancer Services")]
struct Args {
    /// Namespace of the IPAddressPools, L2Advertisements and the leader Lease.
    #[arg(long, env = "FERROLB_NAMESPACE", default_value = "ferrolb-system")]
    namespace: String,
    /// The load balancer class served.
    #[arg(long, env = "FERROLB_LB_CLASS", default_value = ferrolb_api::annotations::DEFAULT_LOAD_BALANCER_CLASS)]
    lb_class: String,
    /// Serve only Services whose spec.loadBalancerClass names our class.
    #[arg(long, env = "FERROLB_REQUIRE_LB_CLASS", default_value_t = false)]
    require_lb_class: bool,
    /// Also read metallb.io/v1beta1 IPAddressPools (from --metallb-namespace).
    #[arg(long, env = "FERROLB_METALLB_COMPAT", default_value_t = false)]
    metallb_compat: bool,
    #[arg(long, env = "FERROLB_METALLB_NAMESPACE", default_value = "metallb-system")]
    metallb_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, env = "FERROLB_LEASE_NAME", default_value = "ferrolb-controller")]
    lease_name: String,
    /// Seconds a leader's lease lasts without renewal: a standby takes over within this after
    /// the leader dies (at once when it stops cleanly).
    #[arg(long, env = "FERROLB_LEASE_DURATION", default_value_t = 15)]
    lease_duration: u64,
    /// Identity in the Lease (default: the pod name, else host name and pid).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "FERROLB_METRICS_ADDR", default_value = "0.0.0.0:7472")]
    metrics_addr: SocketAddr,
    /// Log format: text or json.
    #[arg(long, env = "FERROLB_LOG_FORMAT", default_value = "text")]
    log_format: String,
    /// Log level filter (tracing EnvFilter syntax).
    #[arg(long, env = "FERROLB_LOG_LEVEL", default_value = "info")]
    log_level: String,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    ferrolb_telemetry::init_logs(&args.log_format, &args.log_level).context("--log-level")?;

    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let settings = Settings {
        class: ClassPolicy { class: args.lb_class.clone(), require: args.require_lb_class },
        namespace: args.namespace.clone(),
        metallb_namespace: args.metallb_compat.then(|| args.metallb_namespace.clone()),
        lease_name: args.lease_name.clone(),
        lease_duration: Duration::from_secs(args.lease_duration),
        lease_grace: Duration::from_secs((args.lease_duration / 3).max(1)),
        identity,
    };
    let metrics = Arc::new(Metrics::default());
    // Bound first: a port in use is a start-up error naming it.
    let server = ferrolb_telemetry::bind(args.metrics_addr, metrics.clone()).await?;
    let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut vital = ferrolb_telemetry::vital::Vital::new();
    vital.spawn("metrics server", server.serve(stopped(stop_rx.clone())));
    vital.add("controller", controller::run(client, settings, metrics, stopped(stop_rx.clone())));
    let signal = async move {
        ferrolb_telemetry::shutdown_signal().await;
        let _ = stop_tx.send(true);
    };
    vital.run(signal).await?;
    Ok(())
}

//! `ferrolb-speaker`: parse flags, build, run, shut down.
//!
//! `ferrolb-speaker respond --ip …` answers ARP/NDP for fixed addresses on this host's
//! interfaces (no cluster needed): the layer-2 part on its own, for drills and debugging.
//! The cluster mode (membership, election from the API, data plane) is built on the same parts.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use ferrolb_speaker::l2::responder::{ANNOUNCE_SCHEDULE, Announced, L2Event, Responder, usable_interfaces};

#[derive(Parser)]
#[command(name = "ferrolb-speaker", version, about = "ferrolb's per-node speaker")]
struct Cli {
    /// Log format: text or json.
    #[arg(long, env = "FERROLB_LOG_FORMAT", default_value = "text", global = true)]
    log_format: String,
    /// Log level filter (tracing EnvFilter syntax).
    #[arg(long, env = "FERROLB_LOG_LEVEL", default_value = "info", global = true)]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run in a cluster: membership, election, and ARP/NDP for the addresses this node wins.
    Run {
        /// This node's name.
        #[arg(long, env = "NODE_NAME")]
        node: String,
        /// This node's address, where the membership listens (usually status.hostIP).
        #[arg(long, env = "NODE_IP")]
        node_ip: std::net::IpAddr,
        /// Namespace of the IPAddressPools and L2Advertisements.
        #[arg(long, env = "FERROLB_NAMESPACE", default_value = "ferrolb-system")]
        namespace: String,
        /// UDP port of the speakers' membership.
        #[arg(long, env = "FERROLB_MEMBERSHIP_PORT", default_value_t = 7946)]
        membership_port: u16,
        /// Secret (in --namespace) whose key `secretkey` holds the membership's shared secret:
        /// only speakers that know it join.
        #[arg(long, env = "FERROLB_MEMBERSHIP_SECRET", conflicts_with = "secret_file")]
        membership_secret: Option<String>,
        /// File holding the membership's shared secret (a mounted Secret, say), instead.
        #[arg(long, env = "FERROLB_MEMBERSHIP_SECRET_FILE")]
        secret_file: Option<std::path::PathBuf>,
        /// The load balancer class served.
        #[arg(long, env = "FERROLB_LB_CLASS", default_value = ferrolb_api::annotations::DEFAULT_LOAD_BALANCER_CLASS)]
        lb_class: String,
        /// Serve only Services whose spec.loadBalancerClass names our class.
        #[arg(long, env = "FERROLB_REQUIRE_LB_CLASS", default_value_t = false)]
        require_lb_class: bool,
        /// Address of /metrics, /healthz and /readyz.
        #[arg(long, env = "FERROLB_METRICS_ADDR", default_value = "0.0.0.0:7472")]
        metrics_addr: std::net::SocketAddr,
    },
    /// Answer ARP and NDP for fixed addresses until SIGTERM, after announcing them.
    Respond {
        /// An address to announce (repeat for more).
        #[arg(long = "ip", required = true)]
        ips: Vec<IpAddr>,
        /// Interfaces to answer on (default: every usable one).
        #[arg(long = "interface")]
        interfaces: Vec<String>,
    },
}

async fn respond(ips: Vec<IpAddr>, only: Vec<String>) -> Result<()> {
    let mut want = Announced::default();
    for ip in &ips {
        want.insert(*ip);
    }
    let ifaces: Vec<_> =
        usable_interfaces().into_iter().filter(|i| only.is_empty() || only.contains(&i.name)).collect();
    if ifaces.is_empty() {
        bail!(
            "no usable interface (up, with a MAC, not loopback){}",
            if only.is_empty() { String::new() } else { format!(" among {only:?}") }
        );
    }
    let events: Arc<dyn Fn(L2Event) + Send + Sync> = Arc::new(|e| tracing::debug!(event = ?e, "l2"));
    let mut responders = BTreeMap::new();
    for i in &ifaces {
        let r = Responder::start(i, events.clone()).with_context(|| format!("opening a raw socket on {}", i.name))?;
        let taken = r.set(&want);
        tracing::info!(interface = %i.name, mac = %r.mac, addresses = ?taken, "answering");
        responders.insert(i.name.clone(), Arc::new(r));
    }
    for r in responders.values() {
        let r = r.clone();
        let ips = ips.clone();
        tokio::spawn(async move {
            let mut last = std::time::Duration::ZERO;
            for at in ANNOUNCE_SCHEDULE {
                tokio::time::sleep(*at - last).await;
                last = *at;
                for ip in &ips {
                    r.announce(*ip);
                }
            }
        });
    }
    ferrolb_telemetry::shutdown_signal().await;
    tracing::info!("stopping");
    Ok(())
}

/// The key of the membership Secret that holds the shared secret (as MetalLB's memberlist).
const SECRET_KEY: &str = "secretkey";

/// The shared secret from Secret `name`: key `secretkey`, not empty.
async fn read_secret(client: &kube::Client, namespace: &str, name: &str) -> Result<Vec<u8>> {
    let api: kube::Api<k8s_openapi::api::core::v1::Secret> = kube::Api::namespaced(client.clone(), namespace);
    let secret = api.get(name).await.with_context(|| format!("reading the membership Secret {namespace}/{name}"))?;
    let value = secret.data.and_then(|mut d| d.remove(SECRET_KEY)).map(|b| b.0).unwrap_or_default();
    if value.is_empty() {
        bail!("the membership Secret {namespace}/{name} has no key {SECRET_KEY:?} (or it is empty)");
    }
    Ok(value)
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    ferrolb_telemetry::init_logs(&cli.log_format, &cli.log_level).context("--log-level")?;
    match cli.command {
        Command::Respond { ips, interfaces } => respond(ips, interfaces).await,
        Command::Run {
            node,
            node_ip,
            namespace,
            membership_port,
            membership_secret,
            secret_file,
            lb_class,
            require_lb_class,
            metrics_addr,
        } => {
            let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
            let secret = match (secret_file, membership_secret) {
                (Some(p), _) => Some(std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?),
                (None, Some(name)) => Some(read_secret(&client, &namespace, &name).await?),
                (None, None) => None,
            };
            let settings = ferrolb_speaker::announcer::Settings {
                node,
                class: ferrolb_config::ClassPolicy { class: lb_class, require: require_lb_class },
                namespace,
                membership_port,
                node_ip,
                secret,
            };
            let metrics = Arc::new(ferrolb_speaker::metrics::Metrics::default());
            let server = tokio::spawn(ferrolb_telemetry::serve(metrics_addr, metrics.clone(), std::future::pending()));
            let r =
                ferrolb_speaker::announcer::run(client, settings, metrics, ferrolb_telemetry::shutdown_signal()).await;
            server.abort();
            r
        }
    }
}

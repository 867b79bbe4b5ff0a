//! `ferrolb-speaker`: parse flags, build, run, shut down.
//!
//! `ferrolb-speaker respond --ip …` answers ARP/NDP for fixed addresses on this host's
//! interfaces (no cluster needed): the layer-2 part on its own, for drills and debugging.
//! The cluster mode (membership, election from the API, data plane) is built on the same parts.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
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

/// `ferrolb-speaker run`'s flags.
#[derive(Args)]
struct RunArgs {
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
    /// Run the membership without a secret: any host on the node network can then speak for
    /// any speaker. Without it, a secret is required.
    #[arg(long, env = "FERROLB_INSECURE_MEMBERSHIP", conflicts_with_all = ["membership_secret", "secret_file"])]
    insecure_membership: bool,
    /// The load balancer class served.
    #[arg(long, env = "FERROLB_LB_CLASS", default_value = ferrolb_api::annotations::DEFAULT_LOAD_BALANCER_CLASS)]
    lb_class: String,
    /// Serve only Services whose spec.loadBalancerClass names our class.
    #[arg(long, env = "FERROLB_REQUIRE_LB_CLASS", default_value_t = false)]
    require_lb_class: bool,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "FERROLB_METRICS_ADDR", default_value = "0.0.0.0:7472")]
    metrics_addr: std::net::SocketAddr,
    /// Data plane: `full` (ClusterIP, NodePort, externalIPs and LoadBalancer; no kube-proxy
    /// needed), `lb-only` (LoadBalancer addresses only, beside kube-proxy) or `off`.
    #[arg(long, env = "FERROLB_DATAPLANE", value_enum, default_value = "full")]
    dataplane: Dataplane,
    /// Addresses NodePorts and health check node ports are served on (default: the Node's
    /// InternalIPs). Loopback addresses are never used.
    #[arg(long = "nodeport-address", env = "FERROLB_NODEPORT_ADDRESSES", value_delimiter = ',')]
    nodeport_addresses: Vec<IpAddr>,
    /// Honour a Service's spec.externalIPs only within these CIDRs (comma-separated; default:
    /// any, as kube-proxy). Others are left out, with a Warning Event on the Service.
    #[arg(long = "external-ip-cidrs", env = "FERROLB_EXTERNAL_IP_CIDRS", value_delimiter = ',')]
    external_ip_cidrs: Vec<ipnetwork::IpNetwork>,
    /// The speakers' DaemonSet (in --namespace). When it is gone or being deleted at
    /// shutdown, ferrolb is being uninstalled: the speaker then removes its nftables tables
    /// and its ServiceL2Statuses. Otherwise (a restart, an upgrade) the tables stay, so
    /// forwarding has no gap.
    #[arg(long, env = "FERROLB_DAEMONSET")]
    daemonset: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Dataplane {
    Full,
    LbOnly,
    Off,
}

#[derive(Subcommand)]
enum Command {
    /// Run in a cluster: membership, election, ARP/NDP for the addresses this node wins, and
    /// the nftables data plane.
    Run(Box<RunArgs>),
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

/// The cluster mode: the announcer and the data plane over one set of watches, until SIGTERM.
async fn run(a: RunArgs) -> Result<()> {
    use ferrolb_speaker::dataplane::{self, DataplaneSettings, metrics::DataplaneMetrics, model, source};
    if a.secret_file.is_none() && a.membership_secret.is_none() && !a.insecure_membership {
        bail!(
            "no membership secret: any host on the node network could speak for a speaker. Give \
             --membership-secret (the chart does with speaker.memberlist.enabled=true, its default, \
             or names your own Secret with speaker.memberlist.existingSecret) or --secret-file, \
             or run without one on purpose: --insecure-membership (speaker.memberlist.enabled=false)"
        );
    }
    let families = vec![model::Family::V4, model::Family::V6];
    let dp_metrics = Arc::new(DataplaneMetrics::default());
    let mut metrics = ferrolb_speaker::metrics::Metrics::default();
    if a.dataplane != Dataplane::Off {
        metrics.add_dataplane(dp_metrics.clone());
    }
    let metrics = Arc::new(metrics);
    // Bound first: a port in use is a start-up error naming it.
    let server = ferrolb_telemetry::bind(a.metrics_addr, metrics.clone()).await?;
    let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
    let secret = match (&a.secret_file, &a.membership_secret) {
        (Some(p), _) => {
            let s = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            ferrolb_speaker::membership::check_secret(&s).with_context(|| format!("in {}", p.display()))?;
            Some(s)
        }
        (None, Some(name)) => Some(read_secret(&client, &a.namespace, name).await?),
        (None, None) => {
            tracing::warn!("the membership runs without a secret (--insecure-membership)");
            None
        }
    };
    let mut settings = ferrolb_speaker::announcer::Settings {
        node: a.node.clone(),
        class: ferrolb_config::ClassPolicy { class: a.lb_class, require: a.require_lb_class },
        namespace: a.namespace,
        membership_port: a.membership_port,
        node_ip: a.node_ip,
        secret,
        handovers: None,
        avoid: None,
        status_owner: None,
    };

    // One SIGTERM stops both parts.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        ferrolb_telemetry::shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let own_ds = a.daemonset.as_deref().map(|ds| OwnDaemonSet::watch(&client, &settings.namespace, ds));
    if let Some(own) = &own_ds {
        settings.status_owner = own.owner().await;
    }
    let (handover_tx, handover_rx) = tokio::sync::watch::channel(Vec::new());
    let (avoid_tx, avoid_rx) = tokio::sync::watch::channel(std::collections::BTreeSet::new());
    if a.dataplane != Dataplane::Off {
        settings.handovers = Some(Arc::new(handover_tx));
        settings.avoid = Some(Arc::new(avoid_tx));
    }
    let cluster = ferrolb_speaker::watch::Cluster::start(&client);
    let mode = match a.dataplane {
        Dataplane::Full => Some(model::Mode::Full),
        Dataplane::LbOnly => Some(model::Mode::LbOnly),
        Dataplane::Off => None,
    };
    let dp = async {
        let Some(mode) = mode else {
            // Switched off: take away what an earlier run programmed.
            let mut runner = dataplane::runner::Runner::new(Default::default());
            for f in &families {
                if let Err(e) = runner.delete(*f).await {
                    tracing::warn!(error = %e, "removing the data plane's table");
                }
            }
            // Nothing more to do, which is no reason to stop.
            stopped(stop_rx.clone()).await;
            return Ok(());
        };
        let source = source::SourceSettings {
            node: a.node.clone(),
            mode,
            node_ips: a.nodeport_addresses.clone(),
            pod_cidrs: Vec::new(),
            external_ip_cidrs: a.external_ip_cidrs.clone(),
        };
        let mut s = DataplaneSettings::new(source, families.clone());
        s.health_check_addresses = a.nodeport_addresses.clone();
        s.handovers = Some(handover_rx);
        s.avoid = Some(avoid_rx);
        s.warnings = dataplane::events::WarningEvents::start(client.clone(), a.node.clone(), cluster.services.clone());
        dataplane::run(&cluster, s, dp_metrics, stopped(stop_rx.clone())).await
    };
    let namespace = settings.namespace.clone();
    let announcer =
        ferrolb_speaker::announcer::run(client.clone(), &cluster, settings, metrics, stopped(stop_rx.clone()));
    // Each part is vital: one that ends before SIGTERM ends the process (logged, exit code 1).
    // (The two parts are joined in place rather than added to the set: they borrow the watches.)
    use ferrolb_telemetry::vital::{Ended, Outcome, Vital, exit};
    let mut vital = Vital::new();
    vital.spawn("metrics server", server.serve(stopped(stop_rx.clone())));
    let stopping = stop_rx.clone();
    let injected = |task: &str| {
        if ferrolb_telemetry::vital::fault_injected(task) {
            let how = ferrolb_telemetry::vital::How::Panicked(format!(
                "fault injected by {}",
                ferrolb_telemetry::vital::FAULT_END_TASK_ENV
            ));
            exit(&Ended { task: task.to_string(), how });
        }
    };
    let guard = |task: &str, r: Result<()>| -> Result<()> {
        if !*stopping.borrow() {
            let how = match &r {
                Ok(()) => Ok::<(), String>(()).how(),
                Err(e) => Err::<(), String>(format!("{e:#}")).how(),
            };
            exit(&Ended { task: task.to_string(), how });
        }
        r
    };
    let parts = async {
        let (ra, rd) = tokio::join!(
            async {
                injected("announcer");
                guard("announcer", announcer.await)
            },
            async {
                injected("data plane");
                guard("data plane", dp.await)
            }
        );
        ra.and(rd)
    };
    let ended: Result<()> = {
        let mut parts = std::pin::pin!(parts);
        let mut server_ended = false;
        loop {
            tokio::select! {
                r = &mut parts => break r,
                e = vital.next_end(), if !server_ended => {
                    // The metrics server stops at SIGTERM too; only before it is that fatal.
                    if !*stop_rx.borrow() {
                        exit(&e);
                    }
                    server_ended = true;
                }
            }
        }
    };
    if let Some(own) = &own_ds
        && own.uninstalling()
    {
        let ds = a.daemonset.as_deref().unwrap_or_default();
        tracing::info!(daemonset = %ds, "ferrolb is being uninstalled: removing this node's tables and statuses");
        let mut runner = dataplane::runner::Runner::new(Default::default());
        for f in &families {
            if let Err(e) = runner.delete(*f).await {
                tracing::warn!(error = %e, "removing the data plane's table");
            }
        }
        match ferrolb_speaker::status::delete_own(client, &namespace, &a.node).await {
            Ok(n) => tracing::info!(deleted = n, "ServiceL2Statuses of this node removed"),
            Err(e) => tracing::warn!(error = %e, "removing this node's ServiceL2Statuses"),
        }
    }
    ended
}

/// The speakers' own DaemonSet, watched (by name) from the start: at shutdown it tells an
/// uninstall (the DaemonSet deleted) from a restart or an upgrade. It must be watched before:
/// an uninstall deletes the speakers' permissions together with the DaemonSet, so nothing can
/// be asked at shutdown.
struct OwnDaemonSet {
    store: kube::runtime::reflector::Store<k8s_openapi::api::apps::v1::DaemonSet>,
    synced: Arc<std::sync::atomic::AtomicBool>,
}

impl OwnDaemonSet {
    fn watch(client: &kube::Client, namespace: &str, name: &str) -> Self {
        let api: kube::Api<k8s_openapi::api::apps::v1::DaemonSet> = kube::Api::namespaced(client.clone(), namespace);
        let cfg = kube::runtime::watcher::Config::default().fields(&format!("metadata.name={name}"));
        let store = ferrolb_speaker::watch::watch_with(api, cfg, Vec::new());
        let synced = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, ready) = (synced.clone(), store.clone());
        tokio::spawn(async move {
            if ready.wait_until_ready().await.is_ok() {
                flag.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        });
        OwnDaemonSet { store, synced }
    }

    /// Its owner reference, once it is seen (a few seconds at most).
    async fn owner(&self) -> Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference> {
        let ds = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            loop {
                if let Some(ds) = self.store.state().into_iter().next() {
                    return ds;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        })
        .await
        .ok()?;
        use kube::Resource;
        ds.controller_owner_ref(&()).map(|mut o| {
            o.controller = Some(false);
            o.block_owner_deletion = None;
            o
        })
    }

    /// Gone or being deleted, as far as the watch has seen. Unknown (never listed) is no: keeping
    /// the rules is the safe side.
    fn uninstalling(&self) -> bool {
        if !self.synced.load(std::sync::atomic::Ordering::Relaxed) {
            return false;
        }
        self.store.state().first().is_none_or(|ds| ds.metadata.deletion_timestamp.is_some())
    }
}

/// The key of the membership Secret that holds the shared secret (as MetalLB's memberlist).
const SECRET_KEY: &str = "secretkey";

/// The shared secret from Secret `name`: key `secretkey`, not empty nor short.
async fn read_secret(client: &kube::Client, namespace: &str, name: &str) -> Result<Vec<u8>> {
    let api: kube::Api<k8s_openapi::api::core::v1::Secret> = kube::Api::namespaced(client.clone(), namespace);
    let secret = api.get(name).await.with_context(|| format!("reading the membership Secret {namespace}/{name}"))?;
    let value = secret.data.and_then(|mut d| d.remove(SECRET_KEY)).map(|b| b.0).unwrap_or_default();
    if value.is_empty() {
        bail!("the membership Secret {namespace}/{name} has no key {SECRET_KEY:?} (or it is empty)");
    }
    ferrolb_speaker::membership::check_secret(&value)
        .with_context(|| format!("in key {SECRET_KEY:?} of the membership Secret {namespace}/{name}"))?;
    Ok(value)
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    ferrolb_telemetry::init_logs(&cli.log_format, &cli.log_level).context("--log-level")?;
    match cli.command {
        Command::Respond { ips, interfaces } => respond(ips, interfaces).await,
        Command::Run(args) => run(*args).await,
    }
}

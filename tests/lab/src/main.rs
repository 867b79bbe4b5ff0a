//! `ferrolb-lab`: bring the lab up, take it down, look inside.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use ferrolb_lab::paths::Paths;
use ferrolb_lab::plan::{IpFamily, Plan};
use ferrolb_lab::{agent, hostname, lifecycle};

#[derive(Parser)]
#[command(
    name = "ferrolb-lab",
    version,
    about = "A real Kubernetes control plane and a multi-host network on one machine"
)]
struct Cli {
    /// Where the lab keeps its state (certificates, kubeconfig, logs, pids).
    #[arg(long, env = "FERROLB_LAB_DIR", default_value = "/run/ferrolb-lab", global = true)]
    lab_dir: PathBuf,
    /// Log format of the long-running parts (agent): text or json.
    #[arg(long, env = "FERROLB_LOG_FORMAT", default_value = "text", global = true)]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the control plane, the hosts and the node agents; returns when every node is Ready.
    Up {
        /// Number of nodes (node-1 … node-N).
        #[arg(long, env = "FERROLB_LAB_NODES", default_value_t = 3)]
        nodes: u8,
        /// Address families of the cluster.
        #[arg(long, env = "FERROLB_LAB_IP_FAMILY", value_enum, default_value_t = IpFamily::Dual)]
        ip_family: IpFamily,
    },
    /// Stop every process and remove every namespace, link and file of the lab.
    Down,
    /// Show the lab's processes, hosts and nodes.
    Status,
    /// Print the path of the lab's kubeconfig.
    Kubeconfig,
    /// Run the pinned kubectl against the lab: ferrolb-lab kubectl -- get pods -A
    Kubectl {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run a command on a host (client, node-1, …): ferrolb-lab exec client -- curl …
    Exec {
        host: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
    /// The node agent of one node (started by `up`).
    #[command(hide = true)]
    Agent {
        #[arg(long)]
        node: String,
        #[arg(long)]
        index: u8,
        /// Where the ferrolb binaries that ferrolb images run are (default: beside this one).
        #[arg(long, env = "FERROLB_BIN_DIR")]
        bin_dir: Option<PathBuf>,
    },
    /// Ask the API server who we are (SelfSubjectReview) with $KUBECONFIG and print the user:
    /// how the lab's tests see that a ferrolb image's pod gets its ServiceAccount's token.
    #[command(hide = true)]
    Whoami,
    /// Rehearse a failure while the client sends 100 req/s to a LoadBalancer service:
    /// `drill cordon node-2`, `drill crash --announcer hostname-svc-lb`, then
    /// `drill uncordon node-2`, `drill restore node-2`.
    Drill {
        action: ferrolb_lab::drill::Action,
        /// The node (or give --announcer).
        node: Option<String>,
        /// Act on the node that announces this service (namespace/name or name in default);
        /// it is also the service loaded.
        #[arg(long)]
        announcer: Option<String>,
        /// The service loaded when a NODE is named.
        #[arg(long, default_value = "default/hostname-svc-lb")]
        service: String,
        /// Load the service's IPv6 EXTERNAL-IP.
        #[arg(long)]
        ipv6: bool,
        /// ferrolb's namespace (where the ServiceL2Statuses are).
        #[arg(long, default_value = "ferrolb-system")]
        ferrolb_namespace: String,
        #[arg(long, default_value_t = 100)]
        rate: u32,
        /// Seconds of load after the action (2 s run before it).
        #[arg(long, default_value_t = 8.0)]
        seconds: f64,
        /// Print one JSON object: announcer_before, announcer_after, requests, failed, max_gap_ms, …
        #[arg(long)]
        json: bool,
        /// api-outage: crash this node 10 s into the outage (only the membership can see it).
        #[arg(long)]
        crash: Option<String>,
    },
    /// Send HTTP GETs at a steady rate, each on a new connection, and print a JSON report:
    /// requests, failed, max_gap_ms, answers per pod. Run it on a host:
    /// ferrolb-lab exec client -- ferrolb-lab load http://192.0.2.200/
    Load {
        url: String,
        /// Requests per second.
        #[arg(long, default_value_t = 100)]
        rate: u32,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// A request not answered within this many milliseconds fails.
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        /// Add every request (sent, answered) to the report.
        #[arg(long)]
        timeline: bool,
    },
    /// Watch the membership of a lab running ferrolb for MINUTES with no fault: every suspicion
    /// and death its speakers log in that time is a false one. Prints them; exits 1 if any.
    Idle {
        #[arg(long, default_value_t = 30.0)]
        minutes: f64,
    },
    /// Many faults, some at once, for MINUTES under load (100 req/s to a Cluster and a Local
    /// LoadBalancer service, both families), with a split-brain watch from the client: cordons,
    /// speaker kills, node crashes, link flaps, 5 % loss, controller leader kills, kube-apiserver
    /// and etcd restarts. Prints the tables (or --json); exits 1 when a goal is missed.
    Chaos {
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
        /// Same seed, same schedule.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 100)]
        rate: u32,
        #[arg(long, default_value = "default/hostname-svc-lb")]
        cluster_service: String,
        #[arg(long, default_value = "default/hostname-svc-lb-local")]
        local_service: String,
        #[arg(long, default_value = "ferrolb-system")]
        ferrolb_namespace: String,
        /// A request not answered within this many milliseconds fails (3000: one lost SYN is
        /// retransmitted after 1 s and still counts as answered, late).
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
        /// Print the schedule for this seed and length, and do nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Watch for two announcers at once: who-has / NS for every IP every interval, from this
    /// host; prints a JSON summary (runs, overlaps, changes) at the end.
    #[command(hide = true)]
    SplitBrain {
        #[arg(long = "ip", required = true)]
        ips: Vec<std::net::IpAddr>,
        #[arg(long, default_value = "eth0")]
        interface: String,
        #[arg(long, default_value_t = 5000)]
        interval_us: u64,
        #[arg(long)]
        seconds: f64,
    },
    /// Broadcast ARP who-has for IP at a steady rate and print each reply (time, MAC, µs):
    /// the client's view of a failover, for the speaker benchmark.
    #[command(hide = true)]
    ArpProbe {
        ip: std::net::Ipv4Addr,
        #[arg(long, default_value = "eth0")]
        interface: String,
        /// Microseconds between requests.
        #[arg(long, default_value_t = 5000)]
        interval_us: u64,
        #[arg(long)]
        count: Option<u64>,
        /// Seconds to run.
        #[arg(long)]
        seconds: Option<f64>,
    },
    /// Flood TO with UDP datagrams from several threads and print a JSON report (datagrams,
    /// bytes, mbit_s, frames_s): unrelated traffic for the layer-2 flood test.
    #[command(hide = true)]
    Blast {
        to: std::net::SocketAddr,
        #[arg(long, default_value_t = 1472)]
        size: usize,
        #[arg(long, default_value_t = 2)]
        threads: usize,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Megabits per second to aim at (default: as fast as it goes).
        #[arg(long)]
        mbit: Option<f64>,
    },
    /// The demo image's HTTP server (run by the agent for alicek106/rr-test:echo-hostname).
    #[command(hide = true)]
    HostnameServer {
        #[arg(long)]
        pod: String,
        #[arg(long = "port", default_value = "80")]
        ports: Vec<u16>,
    },
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == "json" { b.json().init() } else { b.init() }
}

fn exec_replace(program: &std::path::Path, args: &[String]) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(program).args(args).exec();
    Err(err).with_context(|| format!("running {}", program.display()))
}

async fn run(cli: Cli) -> Result<()> {
    let paths = Paths { root: cli.lab_dir.clone() };
    match cli.command {
        Command::Up { nodes, ip_family } => lifecycle::up(&paths, Plan { nodes, family: ip_family }).await,
        Command::Down => {
            lifecycle::down(&paths)?;
            eprintln!("lab: down; no namespace, link, process or file of the lab is left");
            Ok(())
        }
        Command::Status => lifecycle::status(&paths).await,
        Command::Kubeconfig => {
            println!("{}", paths.kubeconfig().display());
            Ok(())
        }
        Command::Kubectl { args } => {
            if !paths.kubeconfig().exists() {
                bail!("the lab is not up ({} is missing): run 'ferrolb-lab up'", paths.kubeconfig().display());
            }
            let mut full = vec![format!("--kubeconfig={}", paths.kubeconfig().display())];
            full.extend(args);
            exec_replace(&lifecycle::kubectl()?, &full)
        }
        Command::Exec { host, command } => {
            let plan = lifecycle::current_plan(&paths).context("the lab is not up: run 'ferrolb-lab up'")?;
            if plan.host(&host).is_none() {
                let names: Vec<String> = plan.hosts().into_iter().map(|h| h.name).collect();
                bail!("no host {host:?} in the lab; hosts are: {}", names.join(", "));
            }
            let mut full = vec!["netns".to_string(), "exec".into(), host];
            full.extend(command);
            exec_replace(std::path::Path::new("ip"), &full)
        }
        Command::Agent { node, index, bin_dir } => {
            init_tracing(&cli.log_format);
            tracing::info!(%node, "starting node agent");
            agent::run(paths, index, bin_dir).await
        }
        Command::Drill { action: ferrolb_lab::drill::Action::ApiOutage, seconds, rate, json, crash, .. } => {
            let o = ferrolb_lab::outage::Outage {
                seconds,
                rate,
                services: vec!["default/hostname-svc-lb".into(), "default/hostname-svc-lb-local".into()],
                crash,
            };
            let outcome = ferrolb_lab::outage::run(&paths, &o).await?;
            if json {
                println!("{}", serde_json::to_string(&outcome)?);
                eprintln!("{}", ferrolb_lab::outage::describe(&outcome));
            } else {
                println!("{}", ferrolb_lab::outage::describe(&outcome));
            }
            let problems = outcome.problems();
            if !problems.is_empty() {
                bail!("api-outage: {}", problems.join("; "));
            }
            Ok(())
        }
        Command::Drill { action, node, announcer, service, ipv6, ferrolb_namespace, rate, seconds, json, .. } => {
            let drill = ferrolb_lab::drill::Drill {
                action,
                node,
                announcer: announcer.is_some(),
                service: announcer.unwrap_or(service),
                ipv6,
                ferrolb_namespace,
                rate,
                before: std::time::Duration::from_secs(2),
                after: std::time::Duration::from_secs_f64(seconds.max(0.0)),
            };
            let outcome = ferrolb_lab::drill::run(&paths, &drill).await?;
            if json {
                println!("{}", serde_json::to_string(&outcome)?);
            } else {
                println!("{}", ferrolb_lab::drill::describe(&outcome));
            }
            Ok(())
        }
        Command::Load { url, rate, seconds, timeout_ms, timeline } => {
            let (target, path) = ferrolb_lab::load::target(&url)?;
            let load = ferrolb_lab::load::Load {
                target,
                path,
                rate,
                duration: std::time::Duration::from_secs_f64(seconds.max(0.0)),
                timeout: std::time::Duration::from_millis(timeout_ms),
                timeline,
            };
            let report = ferrolb_lab::load::run(&load).await;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        Command::ArpProbe { ip, interface, interval_us, count, seconds } => {
            ferrolb_lab::arp_probe::run(ferrolb_lab::arp_probe::Probe {
                ip,
                interface,
                interval: std::time::Duration::from_micros(interval_us.max(1)),
                count,
                duration: seconds.map(std::time::Duration::from_secs_f64),
            })
        }
        Command::Chaos {
            minutes,
            seed,
            rate,
            cluster_service,
            local_service,
            ferrolb_namespace,
            timeout_ms,
            dry_run,
            json,
        } => {
            let c = ferrolb_lab::chaos::Chaos {
                duration: std::time::Duration::from_secs_f64((minutes * 60.0).max(0.0)),
                seed,
                rate,
                cluster_service,
                local_service,
                ferrolb_namespace,
                timeout: std::time::Duration::from_millis(timeout_ms),
            };
            if dry_run {
                let plan = lifecycle::current_plan(&paths).context("the lab is not up")?;
                let nodes: Vec<String> = plan.nodes().into_iter().map(|n| n.name).collect();
                println!("{}", serde_json::to_string_pretty(&ferrolb_lab::chaos::schedule(seed, c.duration, &nodes))?);
                return Ok(());
            }
            let outcome = ferrolb_lab::chaos::run(&paths, &c).await?;
            if json {
                println!("{}", serde_json::to_string(&outcome)?);
                eprintln!("{}", ferrolb_lab::chaos::describe(&outcome));
            } else {
                println!("{}", ferrolb_lab::chaos::describe(&outcome));
            }
            if !outcome.goals_met() {
                bail!("chaos: a goal was missed (see above)");
            }
            Ok(())
        }
        Command::Idle { minutes } => {
            let plan = lifecycle::current_plan(&paths).context("the lab is not up")?;
            let nodes: Vec<String> = plan.nodes().into_iter().map(|n| n.name).collect();
            let now_ms = || {
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
            };
            let start = now_ms();
            let minutes = minutes.max(0.0);
            eprintln!("idle: watching the membership of {} for {minutes} min", nodes.join(", "));
            tokio::time::sleep(std::time::Duration::from_secs_f64(minutes * 60.0)).await;
            let end = now_ms();
            let within = |v: Vec<ferrolb_lab::chaos::MemberEvent>| -> Vec<_> {
                v.into_iter().filter(|e| e.at_ms >= start && e.at_ms <= end).collect()
            };
            let suspicions = within(ferrolb_lab::chaos::suspicions(&paths, &nodes));
            let deaths = within(ferrolb_lab::chaos::deaths(&paths, &nodes));
            println!(
                "idle {minutes} min, {} speakers: {} suspicions, {} deaths",
                nodes.len(),
                suspicions.len(),
                deaths.len()
            );
            for (what, list) in [("suspected", &suspicions), ("declared dead", &deaths)] {
                for e in list {
                    println!("  {:8.1} s {} {what} {}", (e.at_ms - start) as f64 / 1000.0, e.observer, e.node);
                }
            }
            if !suspicions.is_empty() || !deaths.is_empty() {
                bail!("idle: the membership suspected a live speaker");
            }
            Ok(())
        }
        Command::SplitBrain { ips, interface, interval_us, seconds } => {
            let w = ferrolb_lab::splitbrain::Watch {
                ips,
                interface,
                interval: std::time::Duration::from_micros(interval_us.max(100)),
                duration: std::time::Duration::from_secs_f64(seconds.max(0.0)),
                keep: std::time::Duration::from_micros(interval_us.max(100) * 4),
            };
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let summary = tokio::task::spawn_blocking(move || ferrolb_lab::splitbrain::run(&w, stop)).await??;
            println!("{}", serde_json::to_string(&summary)?);
            Ok(())
        }
        Command::Blast { to, size, threads, seconds, mbit } => {
            let duration = std::time::Duration::from_secs_f64(seconds.max(0.0));
            let report = ferrolb_lab::blast::run(&ferrolb_lab::blast::Blast { to, size, threads, duration, mbit })?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        Command::HostnameServer { pod, ports } => hostname::serve(pod, ports).await,
        Command::Whoami => {
            use k8s_openapi::api::authentication::v1::SelfSubjectReview;
            let client = kube::Client::try_default().await.context("building a client from $KUBECONFIG")?;
            let review = kube::Api::<SelfSubjectReview>::all(client)
                .create(&kube::api::PostParams::default(), &SelfSubjectReview::default())
                .await
                .context("SelfSubjectReview")?;
            let user = review.status.and_then(|s| s.user_info).and_then(|u| u.username).unwrap_or_default();
            println!("user: {user}");
            Ok(())
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferrolb-lab: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

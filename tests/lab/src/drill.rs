//! `ferrolb-lab drill`: the failure rehearsals a user runs before trusting a load balancer.
//!
//! ```text
//!   client: `ferrolb-lab load` 100 req/s to the EXTERNAL-IP ──────────────────────────────>
//!                       │ 2 s                                   │
//!                       └─ cordon NODE / crash NODE ────────────┴─ report: announcer before
//!                                                                  and after (ServiceL2Status),
//!                                                                  requests, failed, longest gap
//! ```
//!
//! `crash` is a power loss, as near as the lab gets: the node's agent and every process in its
//! namespaces (its speaker, its pods) are killed with SIGKILL and its LAN link goes down; nothing
//! says goodbye. `uncordon` and `restore` undo them (`restore` brings the link up and restarts the
//! node's agent, which starts its pods again).

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Node, Service};
use kube::api::{Api, Patch, PatchParams};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::Serialize;
use serde_json::json;

use crate::lifecycle;
use crate::load::Report;
use crate::paths::Paths;

/// What the drill does to the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Cordon,
    Crash,
    Uncordon,
    Restore,
    /// Stop kube-apiserver for `--seconds` under load (outage.rs); no NODE.
    ApiOutage,
}

/// The drill's settings.
#[derive(Clone, Debug)]
pub struct Drill {
    pub action: Action,
    /// The node; `None` with `announcer`: the node announcing the service.
    pub node: Option<String>,
    /// `namespace/name` (or `name` in `default`) of the LoadBalancer service to load.
    pub service: String,
    /// Take the node that announces `service`.
    pub announcer: bool,
    pub ipv6: bool,
    /// Namespace of the ServiceL2Status objects (ferrolb's namespace).
    pub ferrolb_namespace: String,
    pub rate: u32,
    /// Load before the action, and after it.
    pub before: Duration,
    pub after: Duration,
}

/// What a user wants to know afterwards.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    pub drill: Action,
    pub node: String,
    pub service: String,
    pub ip: String,
    pub announcer_before: Option<String>,
    pub announcer_after: Option<String>,
    pub requests: u64,
    pub failed: u64,
    pub max_gap_ms: u64,
    pub errors: std::collections::BTreeMap<String, u64>,
}

fn split_service(s: &str) -> (String, String) {
    match s.split_once('/') {
        Some((ns, name)) => (ns.to_string(), name.to_string()),
        None => ("default".to_string(), s.to_string()),
    }
}

/// The node named in the service's ServiceL2Status, if any. With ferrolb's CRDs not installed
/// (a lab running another load balancer, or none) no announcer is known: `None`.
async fn announcer(client: &kube::Client, ferrolb_ns: &str, service: &str) -> Result<Option<String>> {
    let (ns, name) = split_service(service);
    let gvk = kube::api::GroupVersionKind::gvk("ferrolb.io", "v1beta1", "ServiceL2Status");
    let ar = kube::api::ApiResource::from_gvk_with_plural(&gvk, "servicel2statuses");
    let api: Api<kube::api::DynamicObject> = Api::namespaced_with(client.clone(), ferrolb_ns, &ar);
    // A resource that is not installed answers a plain-text 404, which `get_opt` does not
    // take for "not found".
    let obj = match api.get_opt(&format!("{ns}.{name}")).await {
        Ok(obj) => obj,
        Err(kube::Error::Api(s)) if s.code == 404 => None,
        Err(e) => return Err(e).context("reading ServiceL2Statuses"),
    };
    Ok(obj.and_then(|o| o.data["status"]["node"].as_str().map(str::to_string)))
}

/// The node that answers ARP (IPv4) or NDP (IPv6) for `ip` on the LAN, asked from the client:
/// whatever announces it, ferrolb or another load balancer. The client's own kernel does the
/// asking (it resolves the address to send a datagram there); its neighbour entry then holds
/// the MAC that answered, which is one node's eth0. `None` when nobody answers.
async fn announcer_on_wire(paths: &Paths, ip: IpAddr) -> Result<Option<String>> {
    const CLIENT: &str = "client";
    let plan = lifecycle::current_plan(paths).context("the lab is not up: run 'ferrolb-lab up'")?;
    let dst = ip.to_string();
    // Forget what the client knew, so that the answer is today's.
    let _ = crate::cmd::ip_in(CLIENT, &["neigh", "flush", "to", &dst, "dev", "eth0"]);
    send_from(CLIENT, ip).with_context(|| format!("sending to {ip} from the {CLIENT} host"))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let mac = loop {
        let out = crate::cmd::stdout("ip", &["-n", CLIENT, "-j", "neigh", "show", "to", &dst, "dev", "eth0"])?;
        let entries: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        let entry = entries.as_array().and_then(|a| a.first()).cloned().unwrap_or_default();
        if let Some(mac) = entry["lladdr"].as_str() {
            break mac.to_lowercase();
        }
        let failed = entry["state"].as_array().is_some_and(|s| s.iter().any(|x| x == "FAILED"));
        if failed || tokio::time::Instant::now() > deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for node in plan.nodes() {
        let out = crate::cmd::stdout("ip", &["-n", &node.name, "-j", "link", "show", "eth0"])?;
        let links: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        if links[0]["address"].as_str().is_some_and(|a| a.eq_ignore_ascii_case(&mac)) {
            return Ok(Some(node.name));
        }
    }
    bail!("{mac} answers for {ip}, and it is no node's eth0")
}

/// Sends one datagram to `ip` (the discard port) from network namespace `ns`: a thread of
/// ours enters it for that, so that its kernel resolves the address.
fn send_from(ns: &str, ip: IpAddr) -> Result<()> {
    let netns =
        std::fs::File::open(format!("/run/netns/{ns}")).with_context(|| format!("no network namespace {ns}"))?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || -> Result<()> {
                nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).context("entering it")?;
                let any: IpAddr = if ip.is_ipv6() { "::".parse()? } else { "0.0.0.0".parse()? };
                let sock = std::net::UdpSocket::bind((any, 0))?;
                sock.send_to(b"ferrolb-lab drill: who answers?", (ip, 9))?;
                Ok(())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the thread sending from {ns} panicked"))?
    })
}

/// Who announces `service`: its ServiceL2Status, else (ferrolb's CRDs missing, or no status
/// yet) whoever answers for `ip` on the wire.
async fn who_announces(
    paths: &Paths,
    client: &kube::Client,
    ferrolb_ns: &str,
    service: &str,
    ip: IpAddr,
) -> Result<Option<String>> {
    match announcer(client, ferrolb_ns, service).await? {
        Some(node) => Ok(Some(node)),
        None => announcer_on_wire(paths, ip).await,
    }
}

/// The service's EXTERNAL-IP of the family asked for.
async fn external_ip(client: &kube::Client, service: &str, ipv6: bool) -> Result<IpAddr> {
    let ips = lb_ips(client, service).await?;
    ips.iter().copied().find(|ip| ip.is_ipv6() == ipv6).with_context(|| {
        format!("{service} has no {} EXTERNAL-IP (it has {ips:?})", if ipv6 { "IPv6" } else { "IPv4" })
    })
}

/// The service's EXTERNAL-IPs (`namespace/name`, or `name` in `default`), as its status lists them.
pub async fn lb_ips(client: &kube::Client, service: &str) -> Result<Vec<IpAddr>> {
    let (ns, name) = split_service(service);
    let svc = Api::<Service>::namespaced(client.clone(), &ns)
        .get(&name)
        .await
        .with_context(|| format!("reading Service {service}"))?;
    Ok(svc
        .status
        .and_then(|s| s.load_balancer)
        .and_then(|l| l.ingress)
        .unwrap_or_default()
        .iter()
        .filter_map(|i| i.ip.as_deref()?.parse().ok())
        .collect())
}

pub async fn set_unschedulable(client: &kube::Client, node: &str, on: bool) -> Result<()> {
    Api::<Node>::all(client.clone())
        .patch(node, &PatchParams::default(), &Patch::Merge(json!({"spec": {"unschedulable": on}})))
        .await
        .with_context(|| format!("{} {node}", if on { "cordoning" } else { "uncordoning" }))?;
    Ok(())
}

/// Every process in the node's namespace and its pods' namespaces.
pub fn node_processes(node: &str) -> Vec<i32> {
    let index = node.trim_start_matches("node-");
    let pod_prefix = format!("flbpod-{index}-");
    let mut pids = Vec::new();
    for ns in crate::netns::lab_namespaces() {
        if (ns == node || ns.starts_with(&pod_prefix))
            && let Ok(out) = std::process::Command::new("ip").args(["netns", "pids", &ns]).output()
        {
            pids.extend(String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
        }
    }
    pids
}

pub async fn act(paths: &Paths, client: &kube::Client, action: Action, node: &str) -> Result<()> {
    match action {
        Action::Cordon => set_unschedulable(client, node, true).await,
        Action::Uncordon => set_unschedulable(client, node, false).await,
        Action::Crash => {
            // The agent first, so it does not restart what dies next.
            for pid in crate::procs::pids_mentioning(&format!("--node={node}")) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            for pid in node_processes(node) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            crate::cmd::ip_in(node, &["link", "set", "eth0", "down"])?;
            Ok(())
        }
        Action::Restore => {
            crate::cmd::ip_in(node, &["link", "set", "eth0", "up"])?;
            let plan = lifecycle::current_plan(paths).context("the lab is not up")?;
            lifecycle::up(paths, plan).await
        }
        Action::ApiOutage => bail!("api-outage acts on the control plane, not on node {node}"),
    }
}

fn check_node(paths: &Paths, node: &str) -> Result<()> {
    let plan = lifecycle::current_plan(paths).context("the lab is not up: run 'ferrolb-lab up'")?;
    if !plan.nodes().iter().any(|n| n.name == node) {
        let names: Vec<String> = plan.nodes().into_iter().map(|n| n.name).collect();
        bail!("no node {node:?} in the lab; nodes are: {}", names.join(", "));
    }
    Ok(())
}

/// Runs the drill: load, act, load, report. `uncordon` and `restore` only act.
pub async fn run(paths: &Paths, d: &Drill) -> Result<Outcome> {
    let client = crate::kube_client(paths).await?;
    let service = if d.service.contains('/') { d.service.clone() } else { format!("default/{}", d.service) };
    let mut before = announcer(&client, &d.ferrolb_namespace, &service).await?;
    let node = match (&d.node, d.announcer) {
        (Some(n), false) => n.clone(),
        (None, true) => {
            if before.is_none() {
                let ip = external_ip(&client, &service, d.ipv6).await?;
                before = announcer_on_wire(paths, ip).await?;
            }
            before.clone().with_context(|| {
                format!(
                    "nobody announces {service}: no ServiceL2Status in {}, and nobody answers for its address on the LAN",
                    d.ferrolb_namespace
                )
            })?
        }
        _ => bail!("name a NODE or give --announcer (not both)"),
    };
    check_node(paths, &node)?;
    if matches!(d.action, Action::Uncordon | Action::Restore) {
        act(paths, &client, d.action, &node).await?;
        let after = announcer(&client, &d.ferrolb_namespace, &service).await?;
        return Ok(Outcome {
            drill: d.action,
            node,
            service,
            ip: String::new(),
            announcer_before: before.clone(),
            announcer_after: after,
            requests: 0,
            failed: 0,
            max_gap_ms: 0,
            errors: Default::default(),
        });
    }
    let ip = external_ip(&client, &service, d.ipv6).await?;
    if before.is_none() {
        before = announcer_on_wire(paths, ip).await?;
    }
    let url = if ip.is_ipv6() { format!("http://[{ip}]/") } else { format!("http://{ip}/") };
    let total = d.before + d.after;
    let exe = std::env::current_exe().context("locating ferrolb-lab")?;
    let load = tokio::process::Command::new("ip")
        .args(["netns", "exec", "client"])
        .arg(&exe)
        .args(["load", &url, "--rate", &d.rate.to_string(), "--seconds", &total.as_secs_f64().to_string()])
        .args(["--timeout-ms", "1000"])
        .kill_on_drop(true)
        .output();
    let drive = async {
        tokio::time::sleep(d.before).await;
        act(paths, &client, d.action, &node).await
    };
    let (out, acted) = tokio::join!(load, drive);
    acted?;
    let out = out.context("running the load from the client")?;
    if !out.status.success() {
        bail!("the load from the client failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let report: Report = serde_json::from_slice(&out.stdout).context("reading the load report")?;
    Ok(Outcome {
        drill: d.action,
        node,
        service: service.clone(),
        ip: ip.to_string(),
        announcer_before: before,
        announcer_after: who_announces(paths, &client, &d.ferrolb_namespace, &service, ip).await?,
        requests: report.requests,
        failed: report.failed,
        max_gap_ms: report.max_gap_ms,
        errors: report.errors,
    })
}

/// The outcome for people.
pub fn describe(o: &Outcome) -> String {
    let who = |a: &Option<String>| a.clone().unwrap_or_else(|| "nobody".into());
    if o.requests == 0 {
        return format!("{:?} {}: done; {} is announced by {}", o.drill, o.node, o.service, who(&o.announcer_after));
    }
    let mut s = format!(
        "drill {:?} {} ({} at {})\n  announcer before: {}\n  announcer after:  {}\n  requests: {}, failed: {}, longest gap: {} ms",
        o.drill,
        o.node,
        o.service,
        o.ip,
        who(&o.announcer_before),
        who(&o.announcer_after),
        o.requests,
        o.failed,
        o.max_gap_ms
    );
    for (why, n) in &o.errors {
        s.push_str(&format!("\n  {n} × {why}"));
    }
    s
}

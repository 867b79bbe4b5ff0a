//! `ferrolb-lab chaos`: many faults, some at once, under steady load, with a watch for two
//! announcers at once. What a user would want to know before trusting a load balancer with a
//! cluster that meets more than one clean failure.
//!
//! ```text
//!   client: load 100 req/s × {Cluster, Local} × {IPv4, IPv6}, new connection each ─────────────>
//!   client: split-brain watch, who-has / NS for every LB address every 5 ms ──────────────────>
//!   root:   Service addresses, every second (a change is a renumbering) ───────────────────────>
//!   node lane:    cordon … speaker SIGKILL … crash/restore … link flap … 5 % loss … (one at a time)
//!   control lane: controller leader SIGKILL … kube-apiserver restart … etcd restart …
//!   ──> report: requests, failed, success %, longest gap, worst gap per fault kind,
//!               split-brain windows, address changes, announcer changes and their reasons
//! ```
//!
//! The schedule is a pure function of the seed and the length: same seed, same schedule. The two
//! lanes run side by side, so control-plane faults meet node faults. Requests that failed
//! because the Cluster service sent them to pods of a crashed node (after the address had moved,
//! before the node came back) are counted apart: no load balancer can save those before
//! Kubernetes learns the node is gone.
//!
//! The lab's kernel has no `sch_netem`; the 5 % loss is nftables' `numgen random` dropping
//! 5 % of the frames in and out of the node's LAN link (netdev ingress and egress hooks).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::Api;
use kube::api::ListParams;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::drill::{Action, act, set_unschedulable};
use crate::load::Report;
use crate::paths::Paths;
use crate::splitbrain::{Overlap, SPLIT_BRAIN, Summary};
use crate::{control_plane, lifecycle, procs};

/// A kind of fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Cordon,
    SpeakerKill,
    Crash,
    LinkFlap,
    PacketLoss,
    ControllerKill,
    ApiserverRestart,
    EtcdRestart,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Cordon => "cordon",
            Kind::SpeakerKill => "speaker-kill",
            Kind::Crash => "crash",
            Kind::LinkFlap => "link-flap",
            Kind::PacketLoss => "packet-loss",
            Kind::ControllerKill => "controller-kill",
            Kind::ApiserverRestart => "apiserver-restart",
            Kind::EtcdRestart => "etcd-restart",
        }
    }
}

const NODE_KINDS: [Kind; 5] = [Kind::Cordon, Kind::SpeakerKill, Kind::Crash, Kind::LinkFlap, Kind::PacketLoss];
const CONTROL_KINDS: [Kind; 3] = [Kind::ControllerKill, Kind::ApiserverRestart, Kind::EtcdRestart];

/// One planned fault: after a pause (from the end of the previous fault of its lane), do it,
/// hold it (cordoned, crashed, link down, lossy), undo it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Planned {
    pub lane: String,
    pub pause_s: f64,
    pub kind: Kind,
    pub node: Option<String>,
    pub hold_s: f64,
}

/// splitmix64: a tiny generator whose sequence never changes with a crate's version, so a seed
/// names the same schedule for good.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `[lo, hi)`, to the tenth of a second.
    fn secs(&mut self, lo: f64, hi: f64) -> f64 {
        let steps = ((hi - lo) * 10.0).max(1.0) as u64;
        lo + (self.next() % steps) as f64 / 10.0
    }
    fn pick<T: Clone>(&mut self, from: &[T]) -> T {
        from[(self.next() % from.len() as u64) as usize].clone()
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, (self.next() % (i as u64 + 1)) as usize);
        }
    }
}

/// How long a kind is held, and the time it takes to undo (a crashed node's restore).
fn hold(rng: &mut Rng, kind: Kind) -> f64 {
    match kind {
        Kind::Cordon => rng.secs(5.0, 15.0),
        Kind::Crash => rng.secs(10.0, 15.0),
        Kind::LinkFlap => 2.0,
        Kind::PacketLoss => 30.0,
        _ => 0.0,
    }
}

fn undo_estimate(kind: Kind) -> f64 {
    if kind == Kind::Crash { 10.0 } else { 0.0 }
}

/// The schedule for `total` on `nodes`: a node lane and a control lane, each a sequence that
/// first holds every kind of its lane once (in a seeded order), then seeded picks, until its
/// planned time reaches the end less a quiet 15 s.
pub fn schedule(seed: u64, total: Duration, nodes: &[String]) -> Vec<Planned> {
    let mut rng = Rng(seed);
    let end = total.as_secs_f64() - 15.0;
    let mut out = Vec::new();
    for (lane, kinds, pause) in [("node", &NODE_KINDS[..], (3.0, 8.0)), ("control", &CONTROL_KINDS[..], (10.0, 25.0))] {
        let mut first: Vec<Kind> = kinds.to_vec();
        rng.shuffle(&mut first);
        // The first fault comes after 10 s of calm, so the load has a baseline.
        let mut t = 10.0 - pause.0;
        let mut i = 0;
        loop {
            let kind = if i < first.len() { first[i] } else { rng.pick(kinds) };
            let p = rng.secs(pause.0, pause.1);
            let h = hold(&mut rng, kind);
            let node = (lane == "node").then(|| rng.pick(nodes));
            if t + p + h + undo_estimate(kind) > end {
                break;
            }
            t += p + h + undo_estimate(kind);
            out.push(Planned { lane: lane.into(), pause_s: p, kind, node, hold_s: h });
            i += 1;
        }
    }
    out
}

/// A fault as it happened (unix milliseconds).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Done {
    pub kind: Kind,
    pub node: Option<String>,
    pub start_ms: u64,
    /// When it was undone (and, for a crash, the node was back with its pods Ready).
    pub end_ms: u64,
    pub note: String,
}

/// The chaos run's settings.
#[derive(Clone, Debug)]
pub struct Chaos {
    pub duration: Duration,
    pub seed: u64,
    pub rate: u32,
    /// `namespace/name` of a Cluster and a Local LoadBalancer service.
    pub cluster_service: String,
    pub local_service: String,
    pub ferrolb_namespace: String,
    /// A request not answered within this fails (long enough for one SYN retransmission).
    pub timeout: Duration,
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// One load stream's outcome.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stream {
    pub service: String,
    pub policy: String,
    pub ip: IpAddr,
    pub requests: u64,
    pub failed: u64,
    /// Failed requests sent to a crashed or cut-off node's pods before its death was detected
    /// (Cluster only; see [`excluded_windows`]).
    pub excluded: u64,
    pub max_gap_ms: u64,
    pub errors: BTreeMap<String, u64>,
}

/// A fault's effect.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FaultOutcome {
    pub kind: Kind,
    pub node: Option<String>,
    /// Seconds from the start of the run.
    pub at_s: f64,
    pub duration_s: f64,
    /// The longest time without an answer on any stream, from the fault to 5 s after its end.
    pub worst_gap_ms: u64,
    /// Failed requests sent in that window (all streams, excluded ones not counted).
    pub failed: u64,
    /// A crash or link flap: from the fault until every other speaker had declared the
    /// node's speaker dead (and steered new connections away from its pods); `None` if one
    /// did not within the fault.
    #[serde(default)]
    pub detected_ms: Option<u64>,
    pub note: String,
}

/// An address that moved, and what was going on then.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AnnouncerChange {
    pub ip: IpAddr,
    pub at_s: f64,
    pub from: String,
    pub to: String,
    /// Time in which nobody answered for the address.
    pub silence_ms: u64,
    pub reason: String,
}

/// A Service whose addresses changed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AddressChange {
    pub service: String,
    pub at_s: f64,
    pub before: Vec<String>,
    pub after: Vec<String>,
}

/// Everything the run measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Outcome {
    pub seed: u64,
    pub seconds: f64,
    pub schedule: Vec<Planned>,
    pub faults: Vec<FaultOutcome>,
    pub streams: Vec<Stream>,
    pub requests: u64,
    pub failed: u64,
    pub excluded: u64,
    /// Answered / (requests − excluded), percent.
    pub success_pct: f64,
    pub longest_gap_ms: u64,
    pub worst_gap_by_kind_ms: BTreeMap<String, u64>,
    pub overlaps: usize,
    pub longest_overlap_ms: f64,
    pub split_brain_windows: Vec<Overlap>,
    /// Every overlap, for people: seconds from the start, address, the two nodes, milliseconds.
    pub overlap_list: Vec<(f64, IpAddr, String, String, f64)>,
    pub address_changes: Vec<AddressChange>,
    pub announcer_changes: Vec<AnnouncerChange>,
    /// Deaths a speaker declared that no fault explains (false suspicions: seconds from the
    /// start, observer, node). A crash, a speaker kill or a link flap of that node, or a link
    /// flap of the observer (cut off, it sees every peer die), explains one until 3 s after it.
    #[serde(default)]
    pub false_deaths: Vec<(f64, String, String)>,
    /// Suspicions no fault explains, by the same rule (seconds from the start, observer, node,
    /// whether it came in a packet-loss window of either): a suspected member that refutes it
    /// stays alive, but it was a step towards a false death.
    #[serde(default)]
    pub false_suspicions: Vec<(f64, String, String, bool)>,
    pub probe_requests: u64,
    pub probe_replies: u64,
}

impl Outcome {
    /// The issue's goals: ≥ 99.9 % success, no split brain, no renumbering.
    pub fn goals_met(&self) -> bool {
        self.success_pct >= 99.9 && self.split_brain_windows.is_empty() && self.address_changes.is_empty()
    }
}

pub async fn ingress(client: &kube::Client, service: &str) -> Result<Vec<IpAddr>> {
    let ips = crate::drill::lb_ips(client, service).await?;
    if ips.is_empty() {
        bail!("{service} has no EXTERNAL-IP: is ferrolb running with the demo (make lab)?");
    }
    Ok(ips)
}

/// Every LoadBalancer Service's addresses, by `namespace/name`.
async fn all_addresses(client: &kube::Client) -> Result<BTreeMap<String, Vec<String>>> {
    let list = Api::<Service>::all(client.clone()).list(&ListParams::default()).await?;
    Ok(list
        .items
        .into_iter()
        .filter(|s| s.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("LoadBalancer"))
        .map(|s| {
            let key = format!("{}/{}", s.metadata.namespace.unwrap_or_default(), s.metadata.name.unwrap_or_default());
            let mut ips: Vec<String> = s
                .status
                .and_then(|s| s.load_balancer)
                .and_then(|l| l.ingress)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|i| i.ip)
                .collect();
            ips.sort();
            (key, ips)
        })
        .collect())
}

pub fn url(ip: IpAddr) -> String {
    if ip.is_ipv6() { format!("http://[{ip}]/") } else { format!("http://{ip}/") }
}

/// The processes of `node` (its namespace and its pods') whose command line holds `needle`.
fn node_pids_running(node: &str, needle: &str) -> Vec<i32> {
    let on_node = crate::drill::node_processes(node);
    procs::pids_mentioning(needle).into_iter().filter(|p| on_node.contains(p)).collect()
}

/// Every process whose command line holds `needle` and whose environment holds `env`.
fn pids_with_env(needle: &str, env: &str) -> Vec<i32> {
    procs::pids_mentioning(needle)
        .into_iter()
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/environ"))
                .is_ok_and(|e| e.split(|b| *b == 0).any(|kv| kv == env.as_bytes()))
        })
        .collect()
}

fn sigkill(pids: &[i32]) {
    for p in pids {
        let _ = kill(Pid::from_raw(*p), Signal::SIGKILL);
    }
}

const LOSS_TABLE: &str = "ferrolb-chaos";

fn loss(node: &str, on: bool) -> Result<()> {
    let text = if on {
        format!(
            "table netdev {LOSS_TABLE} {{\n\
             chain in {{ type filter hook ingress device \"eth0\" priority -500; numgen random mod 100 < 5 drop; }}\n\
             chain out {{ type filter hook egress device \"eth0\" priority -500; numgen random mod 100 < 5 drop; }}\n}}\n"
        )
    } else {
        format!("delete table netdev {LOSS_TABLE}\n")
    };
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", node, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running nft")?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        stdin.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("nft in {node}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Retries `f` every 500 ms for up to `within` (the API server may be restarting).
async fn retry<T, F, Fut>(what: &str, within: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let start = Instant::now();
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() < within => {
                tracing::debug!(error = %format!("{e:#}"), "{what}: retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.context(format!("{what}: gave up after {within:?}"))),
        }
    }
}

/// Waits until every pod bound to `node` is Ready (after a restore).
async fn wait_pods_ready(client: &kube::Client, node: &str, within: Duration) -> Result<()> {
    retry(&format!("pods of {node} Ready"), within, || async {
        let pods = Api::<Pod>::all(client.clone())
            .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
            .await?;
        let not_ready: Vec<String> = pods
            .items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter(|p| {
                !p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
            .map(|p| p.metadata.name.clone().unwrap_or_default())
            .collect();
        if not_ready.is_empty() { Ok(()) } else { bail!("not Ready: {not_ready:?}") }
    })
    .await
}

/// Waits until `pid` has let go of everything it held ([`procs::gone`]), reaping it if it is our
/// child (a component this process restarted earlier).
pub async fn wait_gone(pid: i32, within: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        let _ = nix::sys::wait::waitpid(Pid::from_raw(pid), Some(nix::sys::wait::WaitPidFlag::WNOHANG));
        if procs::gone(pid) {
            return Ok(());
        }
        if start.elapsed() > within {
            bail!("process {pid} did not exit within {within:?} of SIGKILL");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Shared by the lanes: a restore (which completes the control plane) and a control-plane
/// restart must not both start a component.
type ControlPlaneLock = Arc<Mutex<()>>;

async fn control_plane_restart(paths: &Paths, component: &str, lock: &ControlPlaneLock) -> Result<String> {
    let _held = lock.lock().await;
    let plan = lifecycle::current_plan(paths).context("the lab is not up")?;
    let pid = procs::running(paths, component).with_context(|| format!("{component} is not running"))?;
    let start = Instant::now();
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    wait_gone(pid, Duration::from_secs(10)).await?;
    control_plane::ensure(paths, &plan).await?;
    Ok(format!("SIGKILL, back (serving) after {} ms", start.elapsed().as_millis()))
}

/// Does one fault, holds it, undoes it; returns a note.
async fn perform(
    paths: &Paths,
    client: &kube::Client,
    c: &Chaos,
    p: &Planned,
    lock: &ControlPlaneLock,
) -> Result<String> {
    let node = p.node.clone().unwrap_or_default();
    let hold = Duration::from_secs_f64(p.hold_s);
    match p.kind {
        Kind::Cordon => {
            retry("cordon", Duration::from_secs(60), || set_unschedulable(client, &node, true)).await?;
            tokio::time::sleep(hold).await;
            retry("uncordon", Duration::from_secs(60), || set_unschedulable(client, &node, false)).await?;
            Ok(format!("cordoned for {:.1} s", p.hold_s))
        }
        Kind::SpeakerKill => {
            let pids = node_pids_running(&node, "ferrolb-speaker");
            sigkill(&pids);
            Ok(format!("SIGKILL of {} speaker process(es); the node agent restarts it", pids.len()))
        }
        Kind::Crash => {
            act(paths, client, Action::Crash, &node).await?;
            tokio::time::sleep(hold).await;
            let start = Instant::now();
            {
                let _held = lock.lock().await;
                act(paths, client, Action::Restore, &node).await?;
            }
            wait_pods_ready(client, &node, Duration::from_secs(90)).await?;
            Ok(format!("down {:.1} s; restored, pods Ready after {} ms", p.hold_s, start.elapsed().as_millis()))
        }
        Kind::LinkFlap => {
            crate::cmd::ip_in(&node, &["link", "set", "eth0", "down"])?;
            tokio::time::sleep(hold).await;
            crate::cmd::ip_in(&node, &["link", "set", "eth0", "up"])?;
            // A link that goes down loses its IPv6 address and its routes; they come back as the
            // host's network configuration (systemd-networkd, a CNI's routing agent) would
            // bring them back on link up.
            let plan = lifecycle::current_plan(paths).context("the lab is not up")?;
            let host = plan.host(&node).with_context(|| format!("no host {node}"))?;
            crate::netns::ensure_host(&plan, &host)?;
            crate::netns::ensure_routes(&plan)?;
            Ok(format!("eth0 down {:.1} s", p.hold_s))
        }
        Kind::PacketLoss => {
            loss(&node, true)?;
            tokio::time::sleep(hold).await;
            loss(&node, false)?;
            Ok(format!("5 % of eth0's frames dropped for {:.0} s", p.hold_s))
        }
        Kind::ControllerKill => {
            let ns = c.ferrolb_namespace.clone();
            let lease = retry("reading the controller's Lease", Duration::from_secs(30), || async {
                Ok(Api::<Lease>::namespaced(client.clone(), &ns).get("ferrolb-controller").await?)
            })
            .await?;
            let holder = lease.spec.and_then(|s| s.holder_identity).context("the controller's Lease has no holder")?;
            let pids = pids_with_env("ferrolb-controller", &format!("POD_NAME={holder}"));
            if pids.is_empty() {
                bail!("no process of the leader {holder} found");
            }
            sigkill(&pids);
            Ok(format!("SIGKILL of the leader {holder}"))
        }
        Kind::ApiserverRestart => control_plane_restart(paths, "kube-apiserver", lock).await,
        Kind::EtcdRestart => control_plane_restart(paths, "etcd", lock).await,
    }
}

/// Runs one lane's faults in order until the deadline.
async fn lane(
    paths: Paths,
    client: kube::Client,
    c: Chaos,
    plan: Vec<Planned>,
    deadline: Instant,
    lock: ControlPlaneLock,
) -> Vec<Done> {
    let mut done = Vec::new();
    for p in plan {
        tokio::time::sleep(Duration::from_secs_f64(p.pause_s)).await;
        if Instant::now() + Duration::from_secs_f64(p.hold_s + undo_estimate(p.kind)) > deadline {
            break;
        }
        let start_ms = now_ms();
        eprintln!("chaos: {} {}", p.kind.name(), p.node.as_deref().unwrap_or(""));
        let note = match perform(&paths, &client, &c, &p, &lock).await {
            Ok(n) => n,
            Err(e) => format!("error: {e:#}"),
        };
        eprintln!("chaos:   {note}");
        done.push(Done { kind: p.kind, node: p.node.clone(), start_ms, end_ms: now_ms(), note });
    }
    done
}

/// The MAC of every node's LAN link, to name who answers.
pub fn node_macs(paths: &Paths) -> BTreeMap<String, String> {
    let Some(plan) = lifecycle::current_plan(paths) else { return BTreeMap::new() };
    plan.nodes()
        .into_iter()
        .filter_map(|n| {
            let out = crate::cmd::stdout("ip", &["-n", &n.name, "-j", "link", "show", "eth0"]).ok()?;
            let v: serde_json::Value = serde_json::from_str(&out).ok()?;
            Some((v[0]["address"].as_str()?.to_string(), n.name))
        })
        .collect()
}

/// Runs the whole thing.
pub async fn run(paths: &Paths, c: &Chaos) -> Result<Outcome> {
    lifecycle::require_root()?;
    let client = crate::kube_client(paths).await?;
    let plan = lifecycle::current_plan(paths).context("the lab is not up: run 'make lab' first")?;
    let nodes: Vec<String> = plan.nodes().into_iter().map(|n| n.name).collect();
    let schedule = schedule(c.seed, c.duration, &nodes);
    let macs = node_macs(paths);

    // The streams: each service's addresses, IPv4 first.
    let mut targets = Vec::new();
    for (svc, policy) in [(&c.cluster_service, "Cluster"), (&c.local_service, "Local")] {
        for ip in ingress(&client, svc).await? {
            targets.push((svc.clone(), policy.to_string(), ip));
        }
    }
    let exe = std::env::current_exe().context("locating ferrolb-lab")?;
    let secs = c.duration.as_secs_f64().to_string();
    let loads: Vec<_> = targets
        .iter()
        .map(|(_, _, ip)| {
            tokio::process::Command::new("ip")
                .args(["netns", "exec", "client"])
                .arg(&exe)
                .args(["load", &url(*ip), "--rate", &c.rate.to_string(), "--seconds", &secs, "--timeline"])
                .args(["--timeout-ms", &c.timeout.as_millis().to_string()])
                .kill_on_drop(true)
                .output()
        })
        .collect();
    let mut probe_args: Vec<String> = vec!["split-brain".into(), "--seconds".into(), secs.clone()];
    for (_, _, ip) in &targets {
        probe_args.push("--ip".into());
        probe_args.push(ip.to_string());
    }
    let probe = tokio::process::Command::new("ip")
        .args(["netns", "exec", "client"])
        .arg(&exe)
        .args(&probe_args)
        .kill_on_drop(true)
        .output();

    // Addresses, every second, compared with the start.
    let start_ms = now_ms();
    let initial = all_addresses(&client).await.context("listing the LoadBalancer Services")?;
    let watch_client = client.clone();
    let watch_initial = initial.clone();
    let duration = c.duration;
    let addresses = tokio::spawn(async move {
        let mut changes = Vec::new();
        let mut last = watch_initial.clone();
        let start = Instant::now();
        while start.elapsed() < duration {
            tokio::time::sleep(Duration::from_secs(1)).await;
            // An API server away is no change.
            let Ok(now) = all_addresses(&watch_client).await else { continue };
            for (svc, before) in &watch_initial {
                let after = now.get(svc).cloned().unwrap_or_default();
                if last.get(svc) != Some(&after) {
                    changes.push(AddressChange {
                        service: svc.clone(),
                        at_s: (now_ms() - start_ms) as f64 / 1000.0,
                        before: before.clone(),
                        after: after.clone(),
                    });
                }
            }
            last = now;
        }
        changes
    });

    let deadline = Instant::now() + c.duration.saturating_sub(Duration::from_secs(10));
    let lock: ControlPlaneLock = Arc::default();
    let lanes: Vec<_> = ["node", "control"]
        .into_iter()
        .map(|l| {
            let plan: Vec<Planned> = schedule.iter().filter(|p| p.lane == l).cloned().collect();
            tokio::spawn(lane(paths.clone(), client.clone(), c.clone(), plan, deadline, lock.clone()))
        })
        .collect();

    let (loads, probe) = tokio::join!(futures::future::join_all(loads), probe);
    let mut done: Vec<Done> = Vec::new();
    for l in lanes {
        done.extend(l.await.unwrap_or_default());
    }
    done.sort_by_key(|d| d.start_ms);
    let address_changes = addresses.await.unwrap_or_default();

    let probe = probe.context("running the split-brain watch")?;
    if !probe.status.success() {
        bail!("the split-brain watch failed: {}", String::from_utf8_lossy(&probe.stderr));
    }
    let summary: Summary = serde_json::from_slice(&probe.stdout).context("reading the split-brain summary")?;
    let mut reports = Vec::new();
    for (out, (svc, policy, ip)) in loads.into_iter().zip(&targets) {
        let out = out.context("running the load")?;
        if !out.status.success() {
            bail!("the load on {ip} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let r: Report = serde_json::from_slice(&out.stdout).context("reading a load report")?;
        reports.push((svc.clone(), policy.clone(), *ip, r));
    }
    let nodes = node_names(&macs);
    let heard = Heard { deaths: deaths(paths, &nodes), suspicions: suspicions(paths, &nodes) };
    Ok(outcome(c, schedule, &done, &reports, &summary, address_changes, &macs, &heard, start_ms))
}

/// The nodes of a MAC → node map, sorted, each once.
fn node_names(macs: &BTreeMap<String, String>) -> Vec<String> {
    macs.values().cloned().collect::<BTreeSet<_>>().into_iter().collect()
}

/// A speaker's log line about another node's speaker: that it declared it dead
/// ([`DIED`]), or that it suspected it ([`SUSPECTED`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberEvent {
    pub at_ms: u64,
    pub observer: String,
    pub node: String,
}

/// What the speaker logs when the membership declares a member dead (suspected, then down).
pub const DIED: &str = "speaker died";
/// What the speaker logs when a member becomes suspect (it may refute it and stay alive).
pub const SUSPECTED: &str = "member suspected";

/// Deaths the speakers logged ([`DIED`]), from every speaker log of every node.
pub fn deaths(paths: &Paths, nodes: &[String]) -> Vec<MemberEvent> {
    member_events(paths, nodes, DIED)
}

/// Suspicions the speakers logged ([`SUSPECTED`]), from every speaker log of every node.
pub fn suspicions(paths: &Paths, nodes: &[String]) -> Vec<MemberEvent> {
    member_events(paths, nodes, SUSPECTED)
}

/// The lines holding `marker` (`... marker ... node=NAME`) of every speaker log of every node (a
/// restarted speaker appends to its pod's log), in time order.
pub fn member_events(paths: &Paths, nodes: &[String], marker: &str) -> Vec<MemberEvent> {
    let mut out = Vec::new();
    for observer in nodes {
        let Ok(pods) = std::fs::read_dir(paths.node_dir(observer).join("pods")) else { continue };
        for pod in pods.flatten() {
            let Ok(text) = std::fs::read_to_string(pod.path().join("speaker.log")) else { continue };
            out.extend(text.lines().filter_map(|l| event_line(observer, l, marker)));
        }
    }
    out.sort_by_key(|d| d.at_ms);
    out
}

/// One log line, colours and all, read as a [`MemberEvent`] when it holds `marker`.
fn event_line(observer: &str, line: &str, marker: &str) -> Option<MemberEvent> {
    let mut plain = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // An SGR sequence: ESC [ ... m
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    if !plain.contains(marker) {
        return None;
    }
    let stamp = plain.split_whitespace().next()?;
    let at = time::OffsetDateTime::parse(stamp, &time::format_description::well_known::Rfc3339).ok()?;
    let node = plain.split_whitespace().find_map(|w| w.strip_prefix("node="))?;
    Some(MemberEvent {
        at_ms: u64::try_from(at.unix_timestamp_nanos() / 1_000_000).ok()?,
        observer: observer.to_string(),
        node: node.to_string(),
    })
}

/// When every other speaker had declared `d`'s node dead (each one's first word within the
/// fault; `None` if one never did).
fn detected(d: &Done, deaths: &[MemberEvent], observers: &[String]) -> Option<u64> {
    let node = d.node.as_deref()?;
    observers
        .iter()
        .filter(|o| o.as_str() != node)
        .map(|o| {
            deaths
                .iter()
                .find(|x| &x.observer == o && x.node == node && x.at_ms >= d.start_ms && x.at_ms <= d.end_ms)
                .map(|x| x.at_ms)
        })
        .collect::<Option<Vec<u64>>>()?
        .into_iter()
        .max()
}

/// The windows in which a Cluster service's failures are excused: requests sent to the pods of
/// a crashed or cut-off node before its death was detected. From the fault (or, when the node
/// announced the address, from the address's move: until then every failure counts, it is the
/// gap) to the detection; after it, the data plane steers new connections away from the
/// node's pods, so every failure counts again.
fn excluded_windows(
    ip: IpAddr,
    done: &[Done],
    s: &Summary,
    macs: &BTreeMap<String, String>,
    deaths: &[MemberEvent],
    observers: &[String],
) -> Vec<(u64, u64)> {
    done.iter()
        .filter(|d| matches!(d.kind, Kind::Crash | Kind::LinkFlap))
        .filter_map(|d| {
            let node = d.node.clone().unwrap_or_default();
            let until = detected(d, deaths, observers).unwrap_or(d.end_ms);
            let moved = s
                .changes
                .iter()
                .filter(|ch| ch.ip == ip && macs.get(&ch.from) == Some(&node))
                .map(|ch| ch.at_us / 1000)
                .find(|at| *at >= d.start_ms && *at <= d.end_ms);
            // Did the node announce it when the fault came? Its last run before says.
            let announced = s.runs.iter().any(|r| {
                r.ip == ip
                    && macs.get(&r.mac) == Some(&node)
                    && r.first_us / 1000 <= d.start_ms
                    && r.last_us / 1000 + 50 >= d.start_ms
            });
            let from = match (moved, announced) {
                (_, false) => d.start_ms,
                (Some(at), true) => at,
                // Announced and never moved: every failure counts.
                (None, true) => return None,
            };
            (from < until).then_some((from, until))
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn outcome(
    c: &Chaos,
    schedule: Vec<Planned>,
    done: &[Done],
    reports: &[(String, String, IpAddr, Report)],
    s: &Summary,
    address_changes: Vec<AddressChange>,
    macs: &BTreeMap<String, String>,
    heard: &Heard,
    start_ms: u64,
) -> Outcome {
    let deaths = &heard.deaths;
    let rel = |ms: u64| ms.saturating_sub(start_ms) as f64 / 1000.0;
    let observers = node_names(macs);
    let mut streams = Vec::new();
    // Per stream: (answered unix ms, failed-and-counted sent unix ms).
    let mut answered: Vec<Vec<u64>> = Vec::new();
    let mut counted_failures: Vec<Vec<u64>> = Vec::new();
    for (svc, policy, ip, r) in reports {
        let windows =
            if policy == "Cluster" { excluded_windows(*ip, done, s, macs, deaths, &observers) } else { Vec::new() };
        let mut excluded = 0;
        let mut ok = Vec::new();
        let mut bad = Vec::new();
        for sample in &r.timeline {
            let sent = r.started_unix_ms + u64::from(sample.0);
            match sample.1 {
                Some(at) => ok.push(r.started_unix_ms + u64::from(at)),
                None if windows.iter().any(|(a, b)| sent >= *a && sent <= *b) => excluded += 1,
                None => bad.push(sent),
            }
        }
        streams.push(Stream {
            service: svc.clone(),
            policy: policy.clone(),
            ip: *ip,
            requests: r.requests,
            failed: r.failed,
            excluded,
            max_gap_ms: r.max_gap_ms,
            errors: r.errors.clone(),
        });
        ok.sort_unstable();
        answered.push(ok);
        counted_failures.push(bad);
    }
    let gap_in = |from: u64, to: u64| -> u64 {
        answered
            .iter()
            .map(|a| {
                let mut last = from;
                let mut gap = 0;
                for t in a.iter().filter(|t| **t >= from && **t <= to) {
                    gap = gap.max(t - last);
                    last = *t;
                }
                gap.max(to.saturating_sub(last))
            })
            .max()
            .unwrap_or(0)
    };
    let faults: Vec<FaultOutcome> = done
        .iter()
        .map(|d| {
            let to = d.end_ms + 5000;
            FaultOutcome {
                kind: d.kind,
                node: d.node.clone(),
                at_s: rel(d.start_ms),
                duration_s: (d.end_ms - d.start_ms) as f64 / 1000.0,
                worst_gap_ms: gap_in(d.start_ms, to),
                failed: counted_failures.iter().flatten().filter(|t| **t >= d.start_ms && **t <= to).count() as u64,
                detected_ms: matches!(d.kind, Kind::Crash | Kind::LinkFlap)
                    .then(|| detected(d, deaths, &observers))
                    .flatten()
                    .map(|t| t.saturating_sub(d.start_ms)),
                note: d.note.clone(),
            }
        })
        .collect();
    let mut worst_gap_by_kind_ms = BTreeMap::new();
    for f in &faults {
        let w = worst_gap_by_kind_ms.entry(f.kind.name().to_string()).or_insert(0);
        *w = (*w).max(f.worst_gap_ms);
    }
    let name = |mac: &str| macs.get(mac).cloned().unwrap_or_else(|| mac.to_string());
    let announcer_changes = s
        .changes
        .iter()
        .map(|ch| {
            let at = ch.at_us / 1000;
            let active: Vec<String> = done
                .iter()
                .filter(|d| d.start_ms <= at && at <= d.end_ms + 3000)
                .map(|d| format!("{} {}", d.kind.name(), d.node.as_deref().unwrap_or("")).trim().to_string())
                .collect();
            AnnouncerChange {
                ip: ch.ip,
                at_s: rel(at),
                from: name(&ch.from),
                to: name(&ch.to),
                silence_ms: ch.silence_us / 1000,
                reason: if active.is_empty() { "no fault active".into() } else { active.join(" + ") },
            }
        })
        .collect();
    let requests: u64 = streams.iter().map(|s| s.requests).sum();
    let failed: u64 = streams.iter().map(|s| s.failed).sum();
    let excluded: u64 = streams.iter().map(|s| s.excluded).sum();
    let counted = requests.saturating_sub(excluded);
    let success_pct = if counted == 0 { 0.0 } else { 100.0 * (counted - (failed - excluded)) as f64 / counted as f64 };
    Outcome {
        seed: c.seed,
        seconds: c.duration.as_secs_f64(),
        schedule,
        faults,
        longest_gap_ms: streams.iter().map(|s| s.max_gap_ms).max().unwrap_or(0),
        streams,
        requests,
        failed,
        excluded,
        success_pct,
        worst_gap_by_kind_ms,
        overlaps: s.overlaps.len(),
        longest_overlap_ms: s.overlaps.iter().map(|o| o.duration_us).max().unwrap_or(0) as f64 / 1000.0,
        split_brain_windows: s.split_brain_windows().into_iter().cloned().collect(),
        overlap_list: s
            .overlaps
            .iter()
            .map(|o| (rel(o.start_us / 1000), o.ip, name(&o.macs[0]), name(&o.macs[1]), o.duration_us as f64 / 1000.0))
            .collect(),
        address_changes,
        announcer_changes,
        probe_requests: s.requests,
        probe_replies: s.replies,
        false_deaths: unexplained(done, &heard.deaths)
            .into_iter()
            .filter(|d| d.at_ms >= start_ms)
            .map(|d| (rel(d.at_ms), d.observer, d.node))
            .collect(),
        false_suspicions: unexplained(done, &heard.suspicions)
            .into_iter()
            .filter(|d| d.at_ms >= start_ms)
            .map(|d| (rel(d.at_ms), d.observer.clone(), d.node.clone(), in_loss_window(done, &d)))
            .collect(),
    }
}

/// The membership's log lines of a run: deaths and suspicions.
pub struct Heard {
    pub deaths: Vec<MemberEvent>,
    pub suspicions: Vec<MemberEvent>,
}

/// The deaths (or suspicions) no fault explains (see [`Outcome::false_deaths`]).
fn unexplained(done: &[Done], events: &[MemberEvent]) -> Vec<MemberEvent> {
    events
        .iter()
        .filter(|x| {
            !done.iter().any(|d| {
                let node = d.node.as_deref();
                let of_node =
                    node == Some(x.node.as_str()) && matches!(d.kind, Kind::Crash | Kind::SpeakerKill | Kind::LinkFlap);
                let cut_off = node == Some(x.observer.as_str()) && d.kind == Kind::LinkFlap;
                (of_node || cut_off) && x.at_ms >= d.start_ms && x.at_ms <= d.end_ms + 3000
            })
        })
        .cloned()
        .collect()
}

/// Whether `x` came while its node's or its observer's LAN link lost packets.
fn in_loss_window(done: &[Done], x: &MemberEvent) -> bool {
    done.iter().any(|d| {
        d.kind == Kind::PacketLoss
            && matches!(d.node.as_deref(), Some(n) if n == x.node || n == x.observer)
            && x.at_ms >= d.start_ms
            && x.at_ms <= d.end_ms
    })
}

/// The outcome for people: the tables README shows.
pub fn describe(o: &Outcome) -> String {
    let mut s = format!(
        "chaos: {:.0} s, seed {}, {} faults\n\n| stream | requests | failed | excluded (a dead node's pods, before detection) | longest gap |\n|---|---:|---:|---:|---:|\n",
        o.seconds,
        o.seed,
        o.faults.len()
    );
    for st in &o.streams {
        s.push_str(&format!(
            "| {} ({}, {}) | {} | {} | {} | {} ms |\n",
            st.service, st.policy, st.ip, st.requests, st.failed, st.excluded, st.max_gap_ms
        ));
    }
    s.push_str(&format!(
        "| **all** | {} | {} | {} | {} ms |\n\nsuccess {:.3} % (excluding {} requests to a crashed or cut-off node's pods before its death was detected)\n",
        o.requests, o.failed, o.excluded, o.longest_gap_ms, o.success_pct, o.excluded
    ));
    s.push_str("\n| fault kind | times | worst gap | failed |\n|---|---:|---:|---:|\n");
    let mut kinds: BTreeMap<String, (usize, u64, u64)> = BTreeMap::new();
    for f in &o.faults {
        let e = kinds.entry(f.kind.name().to_string()).or_default();
        e.0 += 1;
        e.1 = e.1.max(f.worst_gap_ms);
        e.2 += f.failed;
    }
    for (k, (n, gap, failed)) in kinds {
        s.push_str(&format!("| {k} | {n} | {gap} ms | {failed} |\n"));
    }
    s.push_str(&format!(
        "\nsplit-brain windows (two MACs answering > {} ms): {}; overlaps of any length: {}, longest {:.1} ms ({} probes, {} answers)\n",
        SPLIT_BRAIN.as_millis(),
        o.split_brain_windows.len(),
        o.overlaps,
        o.longest_overlap_ms,
        o.probe_requests,
        o.probe_replies
    ));
    for (at, ip, a, b, ms) in &o.overlap_list {
        s.push_str(&format!("  {at:7.1} s {ip:<16} {a} and {b} both answering for {ms:.1} ms\n"));
    }
    s.push_str(&format!(
        "false deaths (declared with no crash, kill or flap to explain them): {}\n",
        o.false_deaths.len()
    ));
    for (at, observer, node) in &o.false_deaths {
        s.push_str(&format!("  {at:7.1} s {observer} declared {node} dead\n"));
    }
    s.push_str(&format!(
        "false suspicions (the same rule): {}, of them in a packet-loss window: {}\n",
        o.false_suspicions.len(),
        o.false_suspicions.iter().filter(|x| x.3).count()
    ));
    for (at, observer, node, loss) in &o.false_suspicions {
        let loss = if *loss { " (packet loss)" } else { "" };
        s.push_str(&format!("  {at:7.1} s {observer} suspected {node}{loss}\n"));
    }
    s.push_str(&format!("address changes: {}\n", o.address_changes.len()));
    for a in &o.address_changes {
        s.push_str(&format!("  {:.1} s {}: {:?} -> {:?}\n", a.at_s, a.service, a.before, a.after));
    }
    s.push_str(&format!("announcer changes: {}\n", o.announcer_changes.len()));
    for a in &o.announcer_changes {
        s.push_str(&format!(
            "  {:7.1} s {:<16} {} -> {} (silent {} ms): {}\n",
            a.at_s, a.ip, a.from, a.to, a.silence_ms, a.reason
        ));
    }
    s.push_str("faults:\n");
    for f in &o.faults {
        let detected = f.detected_ms.map(|ms| format!(", detected in {ms} ms")).unwrap_or_default();
        s.push_str(&format!(
            "  {:7.1} s {:<17} {:<7} {:5.1} s  worst gap {} ms, failed {}{detected}: {}\n",
            f.at_s,
            f.kind.name(),
            f.node.as_deref().unwrap_or(""),
            f.duration_s,
            f.worst_gap_ms,
            f.failed,
            f.note
        ));
    }
    s.push_str(&format!(
        "goals (≥ 99.9 %, 0 split-brain windows, 0 address changes): {}\n",
        if o.goals_met() { "met" } else { "NOT met" }
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes() -> Vec<String> {
        vec!["node-1".into(), "node-2".into(), "node-3".into()]
    }

    #[test]
    fn a_speakers_death_line_is_read_with_its_colours() {
        let line = "\u{1b}[2m2026-12-07T01:02:03.456789Z\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m \u{1b}[2mferrolb_speaker::membership\u{1b}[0m\u{1b}[2m:\u{1b}[0m speaker died (suspected, then declared down): new connections avoid its node's endpoints \u{1b}[3mnode\u{1b}[0m\u{1b}[2m=\u{1b}[0mnode-2";
        let d = event_line("node-1", line, DIED).unwrap();
        assert_eq!(d, MemberEvent { at_ms: 1_796_605_323_456, observer: "node-1".into(), node: "node-2".into() });
        assert!(event_line("node-1", line, SUSPECTED).is_none());
        assert!(event_line("node-1", "2026-12-07T01:02:03Z INFO membership changed", DIED).is_none());
        assert!(event_line("node-1", "garbage speaker died", DIED).is_none());
    }

    #[test]
    fn same_seed_same_schedule_and_another_seed_another() {
        let a = schedule(7, Duration::from_secs(600), &nodes());
        assert_eq!(a, schedule(7, Duration::from_secs(600), &nodes()));
        assert_ne!(a, schedule(8, Duration::from_secs(600), &nodes()));
    }

    #[test]
    fn every_kind_comes_in_ten_minutes_and_the_lanes_fit() {
        for seed in 0..50 {
            let s = schedule(seed, Duration::from_secs(600), &nodes());
            for k in NODE_KINDS.iter().chain(&CONTROL_KINDS) {
                assert!(s.iter().any(|p| p.kind == *k), "seed {seed}: no {k:?}");
            }
            for lane in ["node", "control"] {
                let t: f64 =
                    s.iter().filter(|p| p.lane == lane).map(|p| p.pause_s + p.hold_s + undo_estimate(p.kind)).sum();
                assert!(t <= 585.0, "seed {seed}: lane {lane} takes {t} s");
            }
            assert!(s.iter().filter(|p| p.lane == "node").all(|p| p.node.is_some()));
        }
    }

    #[test]
    fn two_minutes_still_hold_most_kinds() {
        let s = schedule(1, Duration::from_secs(120), &nodes());
        let kinds: std::collections::BTreeSet<Kind> = s.iter().map(|p| p.kind).collect();
        assert!(kinds.len() >= 4, "{kinds:?}");
    }
}

//! Pods bound to this node, run as local processes.
//!
//! The watch loop hands each pod to a worker task of its own (keyed by UID). A worker sets
//! up the pod's network (host network: the node's namespace; otherwise a namespace of its
//! own, `flbpod-<node>-<uid>`, on the node's pod bridge with the next address of the node's
//! pod CIDRs), starts one process per container, restarts them per `restartPolicy`, runs
//! readiness probes, posts the pod's status, and on deletion stops the processes
//! (TERM, grace period, KILL), removes the namespace and deletes the pod for good.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Container, Pod, ServiceAccount};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::WatchStreamExt;
use kube::runtime::events::{Event as KEvent, EventType, Recorder};
use kube::runtime::watcher::{self, Event};
use kube::{Client, Resource, ResourceExt};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::images::{self, Program};
use super::ipam::{Ipam, Lease};
use super::node::now;
use super::probe::{self, Check, Readiness, Timing};
use crate::cmd::{ip, ip_in};
use crate::paths::{Paths, write_private};
use crate::plan::{self, Host, POD_BRIDGE, POD_NETNS_PREFIX, Plan};

/// What every worker shares.
pub struct Ctx {
    pub client: Client,
    pub plan: Plan,
    pub host: Host,
    pub paths: Paths,
    pub ipam: Mutex<Ipam>,
    pub recorder: Recorder,
    /// Where the locally built ferrolb binaries are (ferrolb images run them).
    pub bin_dir: PathBuf,
    /// This binary, which serves the demo image.
    pub self_exe: PathBuf,
}

impl Ctx {
    fn node(&self) -> &str {
        &self.host.name
    }
}

enum Msg {
    Update(Box<Pod>),
    Gone,
}

/// Pods of this node left from an earlier agent of it: nothing tracks them any more, so
/// their processes are killed (host-network ones are every process of the node's namespace
/// but this agent) and their namespaces removed. The workers start them again.
pub fn remove_stale_pods(host: &Host) {
    let me = std::process::id() as i32;
    let host_network: Vec<i32> = crate::netns::pids_in(&host.name).into_iter().filter(|p| *p != me).collect();
    crate::procs::stop_all(&host_network, Duration::from_secs(2));
    let prefix = format!("{POD_NETNS_PREFIX}{}-", host.index.unwrap_or_default());
    for ns in crate::netns::lab_namespaces().into_iter().filter(|n| n.starts_with(&prefix)) {
        let pids = crate::netns::pids_in(&ns);
        crate::procs::stop_all(&pids, Duration::from_secs(2));
        let _ = crate::netns::delete_netns(&ns);
    }
}

/// Watches the pods bound to this node and keeps one worker per pod.
pub async fn run(ctx: Arc<Ctx>) -> Result<()> {
    let pods: Api<Pod> = Api::all(ctx.client.clone());
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={}", ctx.node()));
    let mut stream = watcher::watcher(pods, cfg).default_backoff().boxed();
    let mut workers: HashMap<String, mpsc::UnboundedSender<Msg>> = HashMap::new();
    let mut listed: HashSet<String> = HashSet::new();
    while let Some(ev) = stream.next().await {
        workers.retain(|_, tx| !tx.is_closed());
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                tracing::warn!(error = %e, "pod watch");
                continue;
            }
        };
        match ev {
            Event::Init => listed.clear(),
            Event::InitApply(p) | Event::Apply(p) => {
                let Some(uid) = p.uid() else { continue };
                listed.insert(uid.clone());
                if let Some(tx) = workers.get(&uid) {
                    let _ = tx.send(Msg::Update(Box::new(p)));
                } else if !is_terminal(&p) {
                    let (tx, rx) = mpsc::unbounded_channel();
                    let _ = tx.send(Msg::Update(Box::new(p)));
                    workers.insert(uid, tx);
                    tokio::spawn(Worker::run(ctx.clone(), rx));
                }
            }
            Event::Delete(p) => {
                if let Some(tx) = p.uid().and_then(|u| workers.remove(&u)) {
                    let _ = tx.send(Msg::Gone);
                }
            }
            Event::InitDone => {
                let gone: Vec<String> = workers.keys().filter(|u| !listed.contains(*u)).cloned().collect();
                for uid in gone {
                    if let Some(tx) = workers.remove(&uid) {
                        let _ = tx.send(Msg::Gone);
                    }
                }
            }
        }
    }
    bail!("the pod watch ended")
}

fn is_terminal(p: &Pod) -> bool {
    matches!(p.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
}

/// One container's process and what the kubelet would report about it.
struct Ctr {
    spec: Container,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    child: Option<tokio::process::Child>,
    pid: Option<i32>,
    restart_count: u32,
    started_at: Option<Value>,
    /// The last termination (`terminated` of `lastState`, or of `state` while not restarting).
    last_term: Option<Value>,
    exit_code: Option<i32>,
    restart_at: Option<Instant>,
    backoff: Duration,
    /// When the current process started, for resetting the back-off.
    running_since: Option<Instant>,
    probe: Option<(Check, Timing)>,
    readiness: Readiness,
    next_probe: Instant,
    probe_error: Option<String>,
}

struct Worker {
    ctx: Arc<Ctx>,
    pod: Pod,
    netns: Option<String>,
    lease: Option<Lease>,
    ips: Vec<IpAddr>,
    ctrs: Vec<Ctr>,
    dir: PathBuf,
    /// Set when the pod cannot run here: (reason, message), reported as Pending.
    blocked: Option<(String, String)>,
    start_time: Value,
    transitions: HashMap<&'static str, (bool, Value)>,
    last_status: Option<Value>,
    token_at: Option<Instant>,
}

const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const BACKOFF_RESET: Duration = Duration::from_secs(60);
const TICK: Duration = Duration::from_millis(200);
const TOKEN_REFRESH: Duration = Duration::from_secs(3600);

impl Worker {
    async fn run(ctx: Arc<Ctx>, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let Some(Msg::Update(pod)) = rx.recv().await else {
            return;
        };
        let uid = pod.uid().unwrap_or_default();
        let short: String = uid.chars().filter(|c| c.is_ascii_hexdigit()).take(8).collect();
        let dir = ctx.paths.node_dir(ctx.node()).join("pods").join(format!(
            "{}_{}_{short}",
            pod.namespace().unwrap_or_default(),
            pod.name_any()
        ));
        let mut w = Worker {
            ctx,
            pod: *pod,
            netns: None,
            lease: None,
            ips: Vec::new(),
            ctrs: Vec::new(),
            dir,
            blocked: None,
            start_time: now(),
            transitions: HashMap::new(),
            last_status: None,
            token_at: None,
        };
        if w.pod.metadata.deletion_timestamp.is_none()
            && let Err(e) = w.start(&short).await
        {
            let msg = format!("{e:#}");
            tracing::warn!(pod = %w.key(), error = %msg, "pod could not start");
            w.event(EventType::Warning, "FailedToStart", &msg).await;
            w.blocked.get_or_insert(("FailedToStart".into(), msg));
        }
        let mut tick = tokio::time::interval(TICK);
        loop {
            if w.pod.metadata.deletion_timestamp.is_some() {
                let grace = w
                    .pod
                    .metadata
                    .deletion_grace_period_seconds
                    .or(w.pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds))
                    .unwrap_or(30);
                w.stop(Duration::from_secs(u64::try_from(grace.max(0)).unwrap_or(0))).await;
                w.finish_delete().await;
                return;
            }
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(Msg::Update(p)) => w.pod = *p,
                    Some(Msg::Gone) | None => {
                        w.stop(Duration::from_secs(2)).await;
                        return;
                    }
                },
                _ = tick.tick() => w.step().await,
            }
        }
    }

    fn key(&self) -> String {
        format!("{}/{}", self.pod.namespace().unwrap_or_default(), self.pod.name_any())
    }

    fn api(&self) -> Api<Pod> {
        Api::namespaced(self.ctx.client.clone(), &self.pod.namespace().unwrap_or_default())
    }

    async fn event(&self, type_: EventType, reason: &str, note: &str) {
        let ev = KEvent {
            type_,
            reason: reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: reason.into(),
            secondary: None,
        };
        if let Err(e) = self.ctx.recorder.publish(&ev, &self.pod.object_ref(&())).await {
            tracing::warn!(error = %e, "publishing an event");
        }
    }

    /// Resolves programs, sets up the network and starts every container.
    async fn start(&mut self, short: &str) -> Result<()> {
        let spec = self.pod.spec.clone().unwrap_or_default();
        let mut programs = Vec::new();
        for c in &spec.containers {
            let image = c.image.clone().unwrap_or_default();
            match images::program_for(&image) {
                Some(p) => programs.push(p),
                None => {
                    let msg = images::unsupported_message(&image);
                    self.event(EventType::Warning, "ImageNotSupported", &msg).await;
                    self.blocked = Some(("ImageNotSupported".into(), msg));
                    return Ok(());
                }
            }
        }
        std::fs::create_dir_all(&self.dir)?;

        if spec.host_network == Some(true) {
            self.ips = self.ctx.host.addrs();
        } else {
            let ns = format!("{POD_NETNS_PREFIX}{}-{short}", self.ctx.host.index.unwrap_or_default());
            self.netns = Some(ns.clone());
            let lease = self
                .ctx
                .ipam
                .lock()
                .map_err(|_| anyhow::anyhow!("address allocator poisoned"))?
                .allocate()
                .context("the node's pod CIDR is full")?;
            self.ips = lease.addrs.clone();
            self.lease = Some(lease);
            setup_pod_network(&self.ctx, &ns, short, &self.ips).context("setting up the pod network")?;
        }

        let pod_ip = self.ips.first().copied().unwrap_or(IpAddr::V4(self.ctx.host.ipv4));
        let needs_token = programs.iter().any(|p| matches!(p, Program::Ferrolb(_)));
        if needs_token {
            self.refresh_token().await?;
        }
        for (c, prog) in spec.containers.iter().zip(programs) {
            let (program, args) = match prog {
                Program::Hostname => {
                    let mut args = vec!["hostname-server".to_string(), format!("--pod={}", self.pod.name_any())];
                    let ports: Vec<i32> = c
                        .ports
                        .iter()
                        .flatten()
                        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
                        .map(|p| p.container_port)
                        .collect();
                    let ports = if ports.is_empty() { vec![80] } else { ports };
                    args.extend(ports.iter().map(|p| format!("--port={p}")));
                    (self.ctx.self_exe.clone(), args)
                }
                Program::Ferrolb(bin) => {
                    let mut args: Vec<String> = c.command.iter().flatten().skip(1).cloned().collect();
                    args.extend(c.args.iter().flatten().cloned());
                    let path = self.ctx.bin_dir.join(&bin);
                    if !path.is_file() {
                        bail!("{bin} is not built ({} is missing): run 'cargo build --bins'", path.display());
                    }
                    (path, args)
                }
            };
            let mut env = container_env(c, &self.pod, &self.ips, &self.ctx.host);
            if needs_token {
                env.push(("KUBECONFIG".into(), self.dir.join("kubeconfig").display().to_string()));
            }
            let probe = c.readiness_probe.as_ref().map(|p| (probe::check(c, p, pod_ip), probe::timing(p)));
            let first_probe = Instant::now() + probe.as_ref().map(|(_, t)| t.initial_delay).unwrap_or_default();
            self.ctrs.push(Ctr {
                spec: c.clone(),
                program,
                args,
                env,
                child: None,
                pid: None,
                restart_count: 0,
                started_at: None,
                last_term: None,
                exit_code: None,
                restart_at: None,
                backoff: BACKOFF_START,
                running_since: None,
                probe,
                readiness: Readiness::default(),
                next_probe: first_probe,
                probe_error: None,
            });
        }
        for i in 0..self.ctrs.len() {
            self.spawn(i)?;
        }
        Ok(())
    }

    /// A token for the pod's ServiceAccount, bound to the pod, in a kubeconfig of its own.
    async fn refresh_token(&mut self) -> Result<()> {
        let ns = self.pod.namespace().unwrap_or_default();
        let sa =
            self.pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into());
        let req = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: None,
                expiration_seconds: Some(24 * 3600),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(self.pod.name_any()),
                    uid: self.pod.uid(),
                }),
            }),
            ..Default::default()
        };
        let api: Api<ServiceAccount> = Api::namespaced(self.ctx.client.clone(), &ns);
        let tr = api
            .create_token_request(&sa, &PostParams::default(), &req)
            .await
            .with_context(|| format!("requesting a token for ServiceAccount {ns}/{sa}"))?;
        let token = tr.status.and_then(|s| s.token).context("the TokenRequest returned no token")?;
        let token_file = self.dir.join("token");
        write_private(&token_file, token.as_bytes())?;
        let kc = crate::pki::token_kubeconfig(&self.ctx.paths.pki_file("ca.crt"), &token_file, &ns);
        write_private(&self.dir.join("kubeconfig"), kc.as_bytes())?;
        self.token_at = Some(Instant::now());
        Ok(())
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let netns = self.netns.clone();
        let dir = self.dir.clone();
        let c = &mut self.ctrs[i];
        let log = std::fs::File::options().create(true).append(true).open(dir.join(format!("{}.log", c.spec.name)))?;
        let mut cmd = match &netns {
            Some(ns) => {
                let mut cmd = tokio::process::Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(&c.program);
                cmd
            }
            None => tokio::process::Command::new(&c.program),
        };
        cmd.args(&c.args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into()))
            .envs(c.env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true);
        let child = cmd.spawn().with_context(|| format!("starting {}", c.program.display()))?;
        c.pid = child.id().and_then(|p| i32::try_from(p).ok());
        c.child = Some(child);
        c.started_at = Some(now());
        c.running_since = Some(Instant::now());
        c.exit_code = None;
        c.readiness = Readiness::default();
        c.next_probe = Instant::now() + c.probe.as_ref().map(|(_, t)| t.initial_delay).unwrap_or_default();
        Ok(())
    }

    /// One tick: reap exits, restart per policy, probe, post status.
    async fn step(&mut self) {
        if self.blocked.is_none() {
            self.reap_and_restart();
            self.probe().await;
            if self.token_at.is_some_and(|t| t.elapsed() > TOKEN_REFRESH)
                && let Err(e) = self.refresh_token().await
            {
                tracing::warn!(pod = %self.key(), error = %format!("{e:#}"), "token refresh");
            }
        }
        self.post_status().await;
    }

    fn reap_and_restart(&mut self) {
        let policy = self.pod.spec.as_ref().and_then(|s| s.restart_policy.clone()).unwrap_or_else(|| "Always".into());
        let mut to_spawn = Vec::new();
        for (i, c) in self.ctrs.iter_mut().enumerate() {
            if let Some(child) = c.child.as_mut()
                && let Ok(Some(st)) = child.try_wait()
            {
                let code =
                    st.code().unwrap_or_else(|| 128 + std::os::unix::process::ExitStatusExt::signal(&st).unwrap_or(0));
                c.child = None;
                c.pid = None;
                c.exit_code = Some(code);
                c.readiness = Readiness::default();
                c.last_term = Some(json!({
                    "exitCode": code,
                    "reason": if code == 0 { "Completed" } else { "Error" },
                    "startedAt": c.started_at.clone(),
                    "finishedAt": now(),
                }));
                let restart = match policy.as_str() {
                    "Never" => false,
                    "OnFailure" => code != 0,
                    _ => true,
                };
                if restart {
                    c.restart_at = Some(Instant::now() + c.backoff);
                    c.backoff = (c.backoff * 2).min(BACKOFF_MAX);
                }
                tracing::info!(container = %c.spec.name, code, restart, "container exited");
            }
            if c.child.is_none() && c.restart_at.is_some_and(|t| Instant::now() >= t) {
                c.restart_at = None;
                c.restart_count += 1;
                to_spawn.push(i);
            }
            // A container that has run a while starts its back-off afresh after its next crash.
            if c.child.is_some() && c.running_since.is_some_and(|t| t.elapsed() > BACKOFF_RESET) {
                c.backoff = BACKOFF_START;
            }
        }
        for i in to_spawn {
            if let Err(e) = self.spawn(i) {
                tracing::warn!(pod = %self.key(), error = %format!("{e:#}"), "restarting container");
            }
        }
    }

    async fn probe(&mut self) {
        let netns = self.netns.clone();
        for c in &mut self.ctrs {
            if c.child.is_none() {
                continue;
            }
            let Some((check, timing)) = &c.probe else {
                c.readiness.ready = true;
                continue;
            };
            if Instant::now() < c.next_probe {
                continue;
            }
            c.next_probe = Instant::now() + timing.period;
            let r = probe::run(check, timing.timeout, netns.as_deref()).await;
            let was = c.readiness.ready;
            c.readiness.record(r.is_ok(), timing);
            c.probe_error = r.err();
            if was != c.readiness.ready {
                tracing::info!(container = %c.spec.name, ready = c.readiness.ready, error = ?c.probe_error, "readiness changed");
            }
        }
    }

    fn transition(&mut self, kind: &'static str, value: bool) -> Value {
        let entry = self.transitions.entry(kind).or_insert_with(|| (value, now()));
        if entry.0 != value {
            *entry = (value, now());
        }
        entry.1.clone()
    }

    fn status(&mut self) -> Value {
        let spec_containers = self.pod.spec.as_ref().map(|s| s.containers.clone()).unwrap_or_default();
        if let Some((reason, message)) = self.blocked.clone() {
            let statuses: Vec<Value> = spec_containers
                .iter()
                .map(|c| {
                    json!({
                        "name": c.name, "image": c.image, "imageID": "", "ready": false, "started": false,
                        "restartCount": 0, "state": {"waiting": {"reason": reason, "message": message}},
                    })
                })
                .collect();
            let t = self.transition("Ready", false);
            return json!({
                "phase": "Pending",
                "hostIP": self.ctx.host.ipv4.to_string(),
                "hostIPs": self.ctx.host.addrs().iter().map(|a| json!({"ip": a.to_string()})).collect::<Vec<_>>(),
                "conditions": [
                    {"type": "PodScheduled", "status": "True", "lastTransitionTime": self.start_time},
                    {"type": "Ready", "status": "False", "reason": reason, "message": message, "lastTransitionTime": t},
                ],
                "containerStatuses": statuses,
                "message": message,
                "reason": reason,
            });
        }
        let all_ready = !self.ctrs.is_empty() && self.ctrs.iter().all(|c| c.child.is_some() && c.readiness.ready);
        let any_running = self.ctrs.iter().any(|c| c.child.is_some());
        let done = self.ctrs.iter().all(|c| c.child.is_none() && c.restart_at.is_none() && c.exit_code.is_some());
        let phase = if done {
            if self.ctrs.iter().all(|c| c.exit_code == Some(0)) { "Succeeded" } else { "Failed" }
        } else if any_running || self.ctrs.iter().any(|c| c.restart_at.is_some()) {
            "Running"
        } else {
            "Pending"
        };
        let statuses: Vec<Value> = self
            .ctrs
            .iter()
            .map(|c| {
                let state = if c.child.is_some() {
                    json!({"running": {"startedAt": c.started_at}})
                } else if c.restart_at.is_some() {
                    json!({"waiting": {"reason": "CrashLoopBackOff",
                        "message": format!("back-off {:?} restarting failed container {}", c.backoff, c.spec.name)}})
                } else {
                    json!({"terminated": c.last_term.clone().unwrap_or(json!({"exitCode": 0}))})
                };
                let mut s = json!({
                    "name": c.spec.name, "image": c.spec.image, "imageID": "",
                    "containerID": format!("ferrolb-lab://{}", c.pid.unwrap_or(0)),
                    "ready": c.child.is_some() && c.readiness.ready,
                    "started": c.child.is_some(),
                    "restartCount": c.restart_count,
                    "state": state,
                });
                if c.restart_count > 0
                    && c.child.is_some()
                    && let Some(t) = &c.last_term
                {
                    s["lastState"] = json!({"terminated": t});
                }
                s
            })
            .collect();
        let t_ready = self.transition("Ready", all_ready);
        let not_ready: Vec<String> = self
            .ctrs
            .iter()
            .filter(|c| !(c.child.is_some() && c.readiness.ready))
            .map(|c| c.spec.name.clone())
            .collect();
        let mut ready =
            json!({"type": "Ready", "status": if all_ready {"True"} else {"False"}, "lastTransitionTime": t_ready});
        let mut cready = json!({"type": "ContainersReady", "status": if all_ready {"True"} else {"False"}, "lastTransitionTime": t_ready});
        if !all_ready {
            for c in [&mut ready, &mut cready] {
                c["reason"] = json!("ContainersNotReady");
                c["message"] = json!(format!("containers with unready status: [{}]", not_ready.join(" ")));
            }
        }
        json!({
            "phase": phase,
            "hostIP": self.ctx.host.ipv4.to_string(),
            "hostIPs": self.ctx.host.addrs().iter().map(|a| json!({"ip": a.to_string()})).collect::<Vec<_>>(),
            "podIP": self.ips.first().map(|a| a.to_string()),
            "podIPs": self.ips.iter().map(|a| json!({"ip": a.to_string()})).collect::<Vec<_>>(),
            "startTime": self.start_time,
            "conditions": [
                {"type": "PodReadyToStartContainers", "status": "True", "lastTransitionTime": self.start_time},
                {"type": "Initialized", "status": "True", "lastTransitionTime": self.start_time},
                ready,
                cready,
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": self.start_time},
            ],
            "containerStatuses": statuses,
            "qosClass": "BestEffort",
        })
    }

    async fn post_status(&mut self) {
        let status = self.status();
        // Posted already, and the API server still says so. Someone else can change it: after
        // missed heartbeats (an API server outage) the node lifecycle controller marks every pod
        // of the node not Ready, and only the kubelet's next post makes them Ready again (the
        // kubelet's status manager compares with the API server's copy, as this does).
        if self.last_status.as_ref() == Some(&status) && ready_of(self.pod.status.as_ref()) == ready_in(&status) {
            return;
        }
        let patch = json!({ "status": status });
        match self.api().patch_status(&self.pod.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => self.last_status = Some(status),
            Err(kube::Error::Api(s)) if s.code == 404 => self.last_status = Some(status),
            Err(e) => tracing::warn!(pod = %self.key(), error = %e, "posting pod status"),
        }
    }

    /// Stops every process (TERM, up to `grace`, KILL) and removes the pod's network.
    async fn stop(&mut self, grace: Duration) {
        for c in &self.ctrs {
            if let Some(pid) = c.pid {
                let _ = kill(Pid::from_raw(-pid), Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + grace;
        for c in &mut self.ctrs {
            c.restart_at = None;
            if let Some(mut child) = c.child.take() {
                let left = deadline.saturating_duration_since(Instant::now());
                if tokio::time::timeout(left, child.wait()).await.is_err() {
                    if let Some(pid) = c.pid {
                        let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
                    }
                    let _ = child.kill().await;
                }
            }
            c.pid = None;
        }
        if let Some(ns) = self.netns.take() {
            let leftovers = crate::netns::pids_in(&ns);
            crate::procs::stop_all(&leftovers, Duration::from_millis(500));
            if let Err(e) = crate::netns::delete_netns(&ns) {
                tracing::warn!(netns = %ns, error = %format!("{e:#}"), "removing pod namespace");
            }
        }
        if let Some(lease) = self.lease.take()
            && let Ok(mut ipam) = self.ctx.ipam.lock()
        {
            ipam.release(lease.host);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// The kubelet's last word on a deleted pod: remove it with grace 0, for this UID only.
    async fn finish_delete(&self) {
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions { uid: self.pod.uid(), resource_version: None }),
            ..Default::default()
        };
        match self.api().delete(&self.pod.name_any(), &dp).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => tracing::warn!(pod = %self.key(), error = %e, "final pod delete"),
        }
    }
}

/// Creates the pod's namespace with `eth0` on the node's pod bridge and its addresses.
fn setup_pod_network(ctx: &Ctx, ns: &str, short: &str, ips: &[IpAddr]) -> Result<()> {
    let veth = format!("vp{}-{short}", ctx.host.index.unwrap_or_default());
    if crate::netns::netns_exists(ns) {
        let _ = crate::netns::delete_netns(ns);
    }
    let _ = ip(&["link", "del", &veth]);
    ip(&["netns", "add", ns])?;
    ip(&["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", ns])?;
    ip(&["link", "set", &veth, "master", POD_BRIDGE, "up"])?;
    // As kubelet's hairpin-veth mode: with bridge netfilter on, a pod's packet to its own
    // service is translated back to the pod at the bridge and must leave by the port it came in.
    ip(&["link", "set", &veth, "type", "bridge_slave", "hairpin", "on"])?;
    ip_in(ns, &["link", "set", "lo", "up"])?;
    let cidrs = ctx.host.pod_cidrs(ctx.plan.family);
    for (addr, cidr) in ips.iter().zip(&cidrs) {
        let a = format!("{addr}/{}", cidr.prefix());
        if addr.is_ipv6() {
            ip_in(ns, &["addr", "add", &a, "dev", "eth0", "nodad"])?;
        } else {
            ip_in(ns, &["addr", "add", &a, "dev", "eth0"])?;
        }
    }
    ip_in(ns, &["link", "set", "eth0", "up"])?;
    for cidr in &cidrs {
        let gw = plan::gateway(cidr).to_string();
        let fam = if cidr.is_ipv6() { "-6" } else { "-4" };
        ip_in(ns, &[fam, "route", "replace", "default", "via", &gw, "dev", "eth0"])?;
    }
    Ok(())
}

/// The container's environment: its `env` entries, literal or from the pod's fields.
fn container_env(c: &Container, pod: &Pod, ips: &[IpAddr], host: &Host) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for e in c.env.iter().flatten() {
        let value = if let Some(v) = &e.value {
            Some(v.clone())
        } else if let Some(f) = e.value_from.as_ref().and_then(|v| v.field_ref.as_ref()) {
            match f.field_path.as_str() {
                "metadata.name" => Some(pod.name_any()),
                "metadata.namespace" => pod.namespace(),
                "metadata.uid" => pod.uid(),
                "spec.nodeName" => Some(host.name.clone()),
                "spec.serviceAccountName" => pod.spec.as_ref().and_then(|s| s.service_account_name.clone()),
                "status.hostIP" => Some(host.ipv4.to_string()),
                "status.hostIPs" => Some(host.addrs().iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",")),
                "status.podIP" => ips.first().map(|a| a.to_string()),
                "status.podIPs" => Some(ips.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",")),
                _ => None,
            }
        } else {
            None
        };
        if let Some(v) = value {
            out.push((e.name.clone(), v));
        }
    }
    out
}

/// The `Ready` condition's status in a pod's status from the API server.
fn ready_of(status: Option<&k8s_openapi::api::core::v1::PodStatus>) -> Option<String> {
    status?.conditions.as_ref()?.iter().find(|c| c.type_ == "Ready").map(|c| c.status.clone())
}

/// The `Ready` condition's status in a status this agent posts.
fn ready_in(status: &Value) -> Option<String> {
    status["conditions"].as_array()?.iter().find(|c| c["type"] == "Ready")?["status"].as_str().map(String::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ready_condition_is_read_from_both_sides() {
        let ours =
            json!({"conditions": [{"type": "Initialized", "status": "True"}, {"type": "Ready", "status": "True"}]});
        assert_eq!(ready_in(&ours).as_deref(), Some("True"));
        let api: k8s_openapi::api::core::v1::PodStatus =
            serde_json::from_value(json!({"conditions": [{"type": "Ready", "status": "False"}]})).unwrap();
        // The node lifecycle controller marked it not Ready: the two differ, so it is posted again.
        assert_eq!(ready_of(Some(&api)).as_deref(), Some("False"));
        assert_ne!(ready_of(Some(&api)), ready_in(&ours));
        assert_eq!(ready_of(None), None);
    }
}

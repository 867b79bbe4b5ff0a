//! Data plane benchmark (`make bench-dataplane`): ferrolb's nftables data plane side by side with
//! kube-proxy's nftables mode of the lab's own Kubernetes release. Prints a table, asserts nothing.
//!
//! In the lab (release build): ferrolb's speaker (`--dataplane=full`) on node-1, `kube-proxy
//! --proxy-mode=nftables` on node-2, each programming its own node's namespace, both watching the
//! same Services and EndpointSlices. The load: selector-less Services (port 80; every tenth a
//! NodePort, up to 2,000 of them, the rest ClusterIP) with hand-written EndpointSlices of 10
//! endpoints each (addresses in the lab's pod CIDR 198.18.0.0/16), 10, then 1,000, then 10,000,
//! then 50,000 of them, created through the API from here with many requests in flight. Both
//! peers are stopped while a stage's objects are created. Then, per stage and per peer:
//!
//! 1. Cold start: tables deleted, process started; its own full-sync metric (both families) and
//!    the wall time from start until its `service-ips` map holds every service. The median of
//!    3 (of 1 from 10,000 services). Above 10,000 services kube-proxy gets `BENCH_KUBE_PROXY_BOUND`
//!    seconds (default 900); when it runs out, the note says so and the stage goes on without it.
//! 2. Restart over the existing table: the full-sync metric and the wall time until both
//!    families' full syncs are reported. The median of 3 (of 1 from 10,000 services).
//! 3. Updates, 7 of each kind: one endpoint address of one EndpointSlice replaced (a one-endpoint
//!    change), and the port of one Service edited, 80 and 81 in turn (a one-service update); the
//!    time from the API write until the peer's partial-sync histogram counts the sync that
//!    followed (polled every few ms; `nft monitor`, which would show the rule itself, takes too
//!    long to read 10,000 services into its cache), and that sync's own duration. The other
//!    peer is frozen (SIGSTOP) meanwhile, so the two do not share the CPU.
//! 4. Peak RSS (VmHWM) of the peer's processes in the stage.
//! 5. First-packet latency: TCP connects from the peer's node to the ClusterIP of a real Service
//!    (the demo's hostname pods), one new connection every 5 ms, p50 and p99.
//!
//! `BENCH_STAGES=10,1000` picks other stage sizes (`10,1000,10000` leaves out the 50,000 stage);
//! `BENCH_DUMP=DIR` saves each peer's IPv4 table after its cold start (`nft list`), to compare
//! what each one loads.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ferrolb_e2e::{Lab, k8s_bin_dir, lab_bin, output, run, vm_hwm_kib, wait_for};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, Patch, PatchParams, PostParams};

const ENDPOINTS: usize = 10;
const UPDATES: usize = 7;
const CONNECTS: usize = 200;
const IN_FLIGHT: usize = 48;
/// The admin kubeconfig whose server (192.0.2.1:6443) a node's namespace reaches.
const NODE_KUBECONFIG: &str = "/run/ferrolb-lab/pki/admin.kubeconfig";
/// The lab's pod CIDRs (`tests/lab/src/plan.rs`: `POD_CIDR_V4`, `POD_CIDR_V6`).
const CLUSTER_CIDRS: &str = "198.18.0.0/16,2001:db8:100::/56";

/// What an update writes: one endpoint address of the Service's slice, or the Service's port.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Update {
    Endpoint,
    Service,
}

impl Update {
    fn label(self) -> &'static str {
        match self {
            Update::Endpoint => "one-endpoint change",
            Update::Service => "one-service update (port edited)",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ferrolb,
    KubeProxy,
}

/// One data plane under test, run in its node's namespace.
struct Peer {
    kind: Kind,
    node: u8,
    child: Option<Child>,
    /// Peak RSS of the processes of the current stage, KiB.
    hwm_kib: u64,
}

fn log_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("ferrolb-bench-dataplane-{name}.log"))
}

impl Peer {
    fn new(kind: Kind) -> Self {
        let node = if kind == Kind::Ferrolb { 1 } else { 2 };
        Peer { kind, node, child: None, hwm_kib: 0 }
    }

    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Ferrolb => "ferrolb",
            Kind::KubeProxy => "kube-proxy",
        }
    }

    /// Its nftables table, in both families (the same name for both peers' own tables).
    fn table(&self) -> &'static str {
        self.name()
    }

    fn host(&self) -> String {
        format!("node-{}", self.node)
    }

    fn ip(&self) -> String {
        format!("192.0.2.{}", 10 + self.node)
    }

    fn metrics_url(&self) -> String {
        match self.kind {
            Kind::Ferrolb => format!("http://{}:7472/metrics", self.ip()),
            Kind::KubeProxy => format!("http://{}:10249/metrics", self.ip()),
        }
    }

    fn start(&mut self) -> Result<()> {
        self.stop();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.host())).arg("--");
        match self.kind {
            Kind::Ferrolb => {
                cmd.arg(lab_bin()?.with_file_name("ferrolb-speaker"))
                    .args(["run", &format!("--node={}", self.host()), &format!("--node-ip={}", self.ip())])
                    .arg("--dataplane=full")
                    .arg("--insecure-membership")
                    .env("KUBECONFIG", NODE_KUBECONFIG);
            }
            Kind::KubeProxy => {
                let config = std::env::temp_dir().join("ferrolb-bench-kube-proxy.yaml");
                std::fs::write(&config, kube_proxy_config(&self.host(), &self.ip()))?;
                cmd.arg(k8s_bin_dir()?.join("kube-proxy")).arg(format!("--config={}", config.display()));
            }
        }
        let log = std::fs::File::options().create(true).append(true).open(log_path(self.name()))?;
        self.child = Some(cmd.stdout(log.try_clone()?).stderr(log).spawn().context("starting a peer")?);
        Ok(())
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn signal(&self, sig: &str) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
        }
    }

    /// Records its peak RSS, then SIGTERM (SIGKILL after 10 s) and waits.
    fn stop(&mut self) {
        if let Some(kib) = self.pid().and_then(vm_hwm_kib) {
            self.hwm_kib = self.hwm_kib.max(kib);
        }
        if let Some(mut child) = self.child.take() {
            self.signal_child(&child, "-CONT");
            self.signal_child(&child, "-TERM");
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn signal_child(&self, child: &Child, sig: &str) {
        let _ = Command::new("kill").args([sig, &child.id().to_string()]).status();
    }

    fn delete_tables(&self) {
        for family in ["ip", "ip6"] {
            let _ = output("ip", &["netns", "exec", &self.host(), "nft", "delete", "table", family, self.table()]);
        }
    }

    fn metrics(&self) -> Result<String> {
        run("ip", &["netns", "exec", &self.host(), "curl", "-sS", "--max-time", "5", &self.metrics_url()])
    }

    /// (sum of seconds, count) of its full or partial sync histogram, over both families.
    fn syncs(&self, full: bool) -> Result<(f64, u64)> {
        let m = self.metrics()?;
        Ok(match (self.kind, full) {
            (Kind::Ferrolb, true) => histogram(&m, "ferrolb_dataplane_sync_duration_seconds", "kind=\"full\""),
            (Kind::Ferrolb, false) => histogram(&m, "ferrolb_dataplane_sync_duration_seconds", "kind=\"partial\""),
            (Kind::KubeProxy, true) => histogram(&m, "kubeproxy_sync_full_proxy_rules_duration_seconds", ""),
            (Kind::KubeProxy, false) => histogram(&m, "kubeproxy_sync_partial_proxy_rules_duration_seconds", ""),
        })
    }

    /// Elements of its `service-ips` map (IPv4) and the listing.
    fn service_ips(&self) -> Result<(usize, String)> {
        let out =
            output("ip", &["netns", "exec", &self.host(), "nft", "list", "map", "ip", self.table(), "service-ips"])?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        Ok((text.matches(" . tcp . ").count() + text.matches(" . udp . ").count(), text))
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// kube-proxy's configuration: nftables mode, node-2, the lab's admin kubeconfig and pod CIDRs,
/// NodePorts on the node's primary addresses, every change synced at once (minSyncPeriod 0), no
/// periodic resync during the benchmark, and no conntrack or OOM-score writes.
fn kube_proxy_config(node: &str, ip: &str) -> String {
    format!(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
hostnameOverride: {node}
clientConnection:
  kubeconfig: {NODE_KUBECONFIG}
clusterCIDR: {CLUSTER_CIDRS}
detectLocalMode: ClusterCIDR
metricsBindAddress: {ip}:10249
healthzBindAddress: {ip}:10256
nodePortAddresses: [primary]
oomScoreAdj: 0
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
nftables:
  minSyncPeriod: 0s
  syncPeriod: 1h
"
    )
}

/// (sum, count) of a Prometheus histogram `name`, over the series whose labels contain `label`.
fn histogram(metrics: &str, name: &str, label: &str) -> (f64, u64) {
    let (sum_name, count_name) = (format!("{name}_sum"), format!("{name}_count"));
    let (mut sum, mut count) = (0.0, 0u64);
    for l in metrics.lines().filter(|l| !l.starts_with('#')) {
        let Some((key, value)) = l.rsplit_once(' ') else { continue };
        let (metric, labels) = key.split_once('{').unwrap_or((key, ""));
        if !labels.contains(label) {
            continue;
        }
        let v: f64 = value.parse().unwrap_or(0.0);
        if metric == sum_name {
            sum += v;
        } else if metric == count_name {
            count += v as u64;
        }
    }
    (sum, count)
}

fn fake_name(i: usize) -> String {
    format!("bench-{i:05}")
}

/// Endpoint `e` of fake service `i`: 198.18.4.2 – 198.18.253.251, never a node's own /24.
fn fake_addr(i: usize, e: usize) -> String {
    let k = i * ENDPOINTS + e;
    format!("198.18.{}.{}", 4 + (k / 250) % 250, 2 + k % 250)
}

/// Every tenth of the first 20,000 fake services is a NodePort: 2,000 of the 2,768 ports of the
/// default range (30000-32767), so that a 50,000 stage does not run out of them.
fn is_node_port(i: usize) -> bool {
    i.is_multiple_of(10) && i < 20_000
}

fn fake_service(i: usize) -> Service {
    Service {
        metadata: ObjectMeta { name: Some(fake_name(i)), namespace: Some("default".into()), ..Default::default() },
        spec: Some(ServiceSpec {
            type_: Some(if is_node_port(i) { "NodePort" } else { "ClusterIP" }.into()),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: Some(IntOrString::Int(8080)),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

fn endpoints(addrs: &[String]) -> Vec<Endpoint> {
    addrs
        .iter()
        .enumerate()
        .map(|(e, a)| Endpoint {
            addresses: vec![a.clone()],
            conditions: Some(EndpointConditions { ready: Some(true), ..Default::default() }),
            node_name: Some(format!("node-{}", e % 3 + 1)),
            ..Default::default()
        })
        .collect()
}

fn fake_addrs(i: usize) -> Vec<String> {
    (0..ENDPOINTS).map(|e| fake_addr(i, e)).collect()
}

fn fake_slice(i: usize) -> EndpointSlice {
    let labels = [
        ("kubernetes.io/service-name".to_string(), fake_name(i)),
        ("endpointslice.kubernetes.io/managed-by".to_string(), "bench".to_string()),
    ];
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(fake_name(i)),
            namespace: Some("default".into()),
            labels: Some(labels.into_iter().collect()),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: Some(endpoints(&fake_addrs(i))),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
    }
}

/// Creates `obj`, retrying up to 5 times (an existing one counts as created); whether it is there.
async fn create<K>(api: &Api<K>, obj: &K) -> bool
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::Serialize + serde::de::DeserializeOwned,
{
    for attempt in 0..5 {
        match api.create(&PostParams::default(), obj).await {
            Ok(_) => return true,
            Err(kube::Error::Api(e)) if e.code == 409 => return true,
            Err(e) if attempt == 4 => eprintln!("create {:?}: {e}", obj.meta().name),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    false
}

/// Creates fake services `from..to` with their slices, `IN_FLIGHT` requests at a time; the errors.
async fn create_fakes(client: kube::Client, from: usize, to: usize) -> usize {
    let svcs: Api<Service> = Api::namespaced(client.clone(), "default");
    let slices: Api<EndpointSlice> = Api::namespaced(client, "default");
    let errors = AtomicUsize::new(0);
    futures::stream::iter(from..to)
        .for_each_concurrent(IN_FLIGHT, |i| {
            let (svcs, slices, errors) = (&svcs, &slices, &errors);
            async move {
                let ok = create(svcs, &fake_service(i)).await && create(slices, &fake_slice(i)).await;
                if !ok {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
        .await;
    errors.into_inner()
}

/// How long a peer may take to load `n` services: 10 minutes, and for kube-proxy above 10,000
/// services `BENCH_KUBE_PROXY_BOUND` seconds (default 900; it took 13 s at 10,000, and an
/// upstream report gives 16 min at 44,000).
fn bound(kind: Kind, n: usize) -> Duration {
    let secs = match kind {
        Kind::KubeProxy if n > 10_000 => {
            std::env::var("BENCH_KUBE_PROXY_BOUND").ok().and_then(|v| v.parse().ok()).unwrap_or(900)
        }
        _ => 600,
    };
    Duration::from_secs(secs)
}

/// Runs a measurement of two figures 3 times (once at 10,000 services, where kube-proxy takes
/// minutes per round) and gives the median of each.
fn medians(n: usize, mut once: impl FnMut() -> Result<(f64, f64)>) -> Result<(f64, f64)> {
    let (mut firsts, mut seconds) = (Vec::new(), Vec::new());
    for _ in 0..if n >= 10_000 { 1 } else { 3 } {
        let (a, b) = once()?;
        firsts.push(a);
        seconds.push(b);
    }
    Ok((pct(&firsts, 0.5), pct(&seconds, 0.5)))
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    s[((s.len() as f64 - 1.0) * p).round() as usize]
}

/// A measured quantity per peer, with its unit.
#[derive(Default)]
struct Row {
    what: String,
    n: usize,
    unit: &'static str,
    ferrolb: Option<f64>,
    kube_proxy: Option<f64>,
}

struct Bench {
    rt: tokio::runtime::Runtime,
    client: kube::Client,
    lab: Lab,
    rows: Vec<Row>,
    notes: Vec<String>,
    next_addr: usize,
    /// The port each fake service was last given by an update (80 until then).
    ports: BTreeMap<usize, i32>,
}

impl Bench {
    fn row(&mut self, what: &str, n: usize, unit: &'static str, kind: Kind, v: f64) {
        let i = match self.rows.iter().position(|r| r.what == what && r.n == n) {
            Some(i) => i,
            None => {
                self.rows.push(Row { what: what.into(), n, unit, ..Default::default() });
                self.rows.len() - 1
            }
        };
        match kind {
            Kind::Ferrolb => self.rows[i].ferrolb = Some(v),
            Kind::KubeProxy => self.rows[i].kube_proxy = Some(v),
        }
    }

    fn cluster_ip(&self, name: &str) -> Result<String> {
        let v = self.lab.kubectl_json(&["get", "service", name])?;
        v["spec"]["clusterIP"].as_str().map(str::to_string).context("no cluster IP")
    }

    /// Cold start: tables gone, process started; wall time until `service-ips` holds all `n`
    /// fake services (the last one's cluster IP among them) and the full-sync metric.
    fn cold_start(&mut self, peer: &mut Peer, n: usize, last_ip: &str) -> Result<()> {
        let bound = bound(peer.kind, n);
        let (wall, sum) = medians(n, || self.cold_start_once(peer, n, last_ip, bound))?;
        self.row("cold start -> all services in the table (wall)", n, "s", peer.kind, wall);
        self.row("full sync, cold start (own metric, both families)", n, "s", peer.kind, sum);
        Ok(())
    }

    /// One cold start: (wall time to the table, sum of the full-sync metric).
    fn cold_start_once(&self, peer: &mut Peer, n: usize, last_ip: &str, bound: Duration) -> Result<(f64, f64)> {
        peer.stop();
        peer.delete_tables();
        let t0 = Instant::now();
        peer.start()?;
        let want = format!("{last_ip} . tcp . 80 ");
        let what = format!("{}'s service-ips to hold {n} services", peer.name());
        ferrolb_e2e::wait_for_every(&what, bound, Duration::from_millis(50), || {
            let (count, text) = peer.service_ips()?;
            Ok((count > n && text.contains(&want)).then_some(()))
        })?;
        let wall = t0.elapsed().as_secs_f64();
        if let Ok(dir) = std::env::var("BENCH_DUMP") {
            // The peer's IPv4 table as `nft list` prints it, to study what each one loads.
            let out = output("ip", &["netns", "exec", &peer.host(), "nft", "list", "table", "ip", peer.table()])?;
            std::fs::write(format!("{dir}/{}-{n}.nft", peer.name()), &out.stdout)?;
        }
        let (sum, count) = wait_for("both families' full syncs", Duration::from_secs(120), || {
            let (s, c) = peer.syncs(true)?;
            Ok((c >= 2).then_some((s, c)))
        })?;
        eprintln!("{} cold start at {n}: {wall:.2} s to the table, full syncs {sum:.3} s over {count}", peer.name());
        Ok((wall, sum))
    }

    /// Restart over the existing table: the full-sync metric and start -> both reported.
    fn warm_restart(&mut self, peer: &mut Peer, n: usize) -> Result<()> {
        let bound = bound(peer.kind, n);
        let (wall, sum) = medians(n, || Self::warm_restart_once(peer, n, bound))?;
        self.row("restart over its table -> full syncs done (wall)", n, "s", peer.kind, wall);
        self.row("full sync over the existing table (own metric)", n, "s", peer.kind, sum);
        Ok(())
    }

    /// One restart: (wall time until both full syncs are reported, their sum).
    fn warm_restart_once(peer: &mut Peer, n: usize, bound: Duration) -> Result<(f64, f64)> {
        peer.stop();
        let t0 = Instant::now();
        peer.start()?;
        let (sum, count) =
            ferrolb_e2e::wait_for_every("both families' full syncs", bound, Duration::from_millis(50), || {
                let (s, c) = peer.syncs(true)?;
                Ok((c >= 2).then_some((s, c)))
            })?;
        let wall = t0.elapsed().as_secs_f64();
        eprintln!("{} restart at {n}: {wall:.2} s, full syncs {sum:.3} s over {count}", peer.name());
        Ok((wall, sum))
    }

    /// The two kinds of update, `UPDATES` times each, while `other` is frozen.
    fn updates(&mut self, peer: &Peer, other: &Peer, n: usize) -> Result<()> {
        other.signal("-STOP");
        let r =
            self.updates_inner(peer, n, Update::Endpoint).and_then(|()| self.updates_inner(peer, n, Update::Service));
        other.signal("-CONT");
        r
    }

    /// Waits until the peer's partial-sync count has not moved for 2 s (a thawed peer catches up).
    fn settle(peer: &Peer) -> Result<()> {
        let mut last = (peer.syncs(false)?.1, Instant::now());
        ferrolb_e2e::wait_for_every("the peer to settle", Duration::from_secs(300), Duration::from_millis(250), || {
            let c = peer.syncs(false)?.1;
            if c != last.0 {
                last = (c, Instant::now());
            }
            Ok((last.1.elapsed() >= Duration::from_secs(2)).then_some(()))
        })
    }

    /// One write of `kind` to fake service `i`, the `k`-th of its kind.
    fn write(&mut self, kind: Update, i: usize) -> Result<String> {
        match kind {
            Update::Endpoint => {
                let slices: Api<EndpointSlice> = Api::namespaced(self.client.clone(), "default");
                self.next_addr += 1;
                let ip = format!("198.18.254.{}", self.next_addr);
                let mut addrs = fake_addrs(i);
                addrs[0] = ip.clone();
                let patch = serde_json::json!({ "endpoints": endpoints(&addrs) });
                self.rt.block_on(slices.patch(&fake_name(i), &PatchParams::default(), &Patch::Merge(&patch)))?;
                Ok(ip)
            }
            Update::Service => {
                let svcs: Api<Service> = Api::namespaced(self.client.clone(), "default");
                // Port 80 and 81 in turn: the Service's map elements and chains change.
                let port = self.ports.entry(i).or_insert(80);
                *port = if *port == 80 { 81 } else { 80 };
                let port = *port;
                let patch = serde_json::json!({ "spec": { "ports": [{
                    "name": "http", "port": port, "targetPort": 8080, "protocol": "TCP"
                }]}});
                self.rt.block_on(svcs.patch(&fake_name(i), &PatchParams::default(), &Patch::Merge(&patch)))?;
                Ok(format!("port {port}"))
            }
        }
    }

    /// The time from the API write until the peer reports the partial sync that followed (its
    /// own histogram's count moves; the transaction is in the kernel by then), and that sync's
    /// duration from the same histogram.
    fn updates_inner(&mut self, peer: &Peer, n: usize, kind: Update) -> Result<()> {
        let i = n / 2;
        let (mut walls, mut metric, mut syncs) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..UPDATES {
            // ferrolb deletes emptied chains 2 s after its last sync: off the measured path.
            Self::settle(peer)?;
            let (s0, c0) = peer.syncs(false)?;
            let t0 = Instant::now();
            let what = self.write(kind, i)?;
            let (s1, c1) = ferrolb_e2e::wait_for_every(
                &format!("{} to sync {what}", peer.name()),
                Duration::from_secs(120),
                Duration::from_millis(5),
                || {
                    let (s, c) = peer.syncs(false)?;
                    Ok((c > c0).then_some((s, c)))
                },
            )?;
            walls.push(t0.elapsed().as_secs_f64());
            // Per sync: the count may move by more than one (another family, a sync that began
            // before the write).
            metric.push((s1 - s0) / (c1 - c0) as f64);
            syncs.push(c1 - c0);
        }
        let label = kind.label();
        eprintln!("{} {label} at {n}: wall {walls:?}, partial sync metric {metric:?}, syncs {syncs:?}", peer.name());
        self.row(&format!("{label}: API write -> partial sync done, p50"), n, "ms", peer.kind, pct(&walls, 0.5) * 1e3);
        self.row(&format!("{label}: API write -> partial sync done, max"), n, "ms", peer.kind, pct(&walls, 1.0) * 1e3);
        self.row(
            &format!("{label}: partial sync (own metric, per sync), p50"),
            n,
            "ms",
            peer.kind,
            pct(&metric, 0.5) * 1e3,
        );
        Ok(())
    }

    /// New TCP connections from the peer's node to the real service's ClusterIP.
    fn first_packet(&mut self, peer: &Peer, n: usize, ip: &str) -> Result<()> {
        let script = r#"
import socket, struct, sys, time
ip, n = sys.argv[1], int(sys.argv[2])
out = []
for _ in range(n):
    s = socket.socket()
    s.settimeout(3)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    t = time.perf_counter()
    s.connect((ip, 80))
    out.append(time.perf_counter() - t)
    s.close()
    time.sleep(0.005)
print(" ".join("%.7f" % x for x in out))
"#;
        let out = run("ip", &["netns", "exec", &peer.host(), "python3", "-c", script, ip, &CONNECTS.to_string()])?;
        let v: Vec<f64> = out.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        if v.len() != CONNECTS {
            bail!("{} connects from {}: {out}", CONNECTS, peer.host());
        }
        self.row("first packet: TCP connect to a ClusterIP, p50", n, "µs", peer.kind, pct(&v, 0.5) * 1e6);
        self.row("first packet: TCP connect to a ClusterIP, p99", n, "µs", peer.kind, pct(&v, 0.99) * 1e6);
        Ok(())
    }

    fn in_lab(&mut self, stages: &[usize]) -> Result<()> {
        let lab = &self.lab;
        lab.lab(&["up"])?;
        // The speaker's watches need ferrolb's CRDs; nothing here is of type LoadBalancer.
        ferrolb_e2e::ferrolb_system(lab, &["192.0.2.200-192.0.2.250"])?;
        lab.kubectl(&["apply", "-f", concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/demo/hostname.yaml")])?;
        lab.apply("apiVersion: v1\nkind: Service\nmetadata: {name: bench-real, namespace: default}\nspec:\n  selector: {app: webserver}\n  ports: [{port: 80, targetPort: 80}]\n")?;
        lab.kubectl(&["rollout", "status", "deployment/hostname", "--timeout=90s"])?;
        let real_ip = self.cluster_ip("bench-real")?;

        let mut peers = [Peer::new(Kind::Ferrolb), Peer::new(Kind::KubeProxy)];
        let mut created = 0;
        for &n in stages {
            for p in peers.iter_mut() {
                p.stop();
                p.hwm_kib = 0;
            }
            let t = Instant::now();
            let errors = self.rt.block_on(create_fakes(self.client.clone(), created, n));
            let secs = t.elapsed().as_secs_f64();
            let objects = 2 * (n - created);
            self.notes.push(format!(
                "{objects} objects ({} Services + their EndpointSlices) created in {secs:.1} s ({:.0}/s, {IN_FLIGHT} in flight, {errors} errors)",
                n - created,
                objects as f64 / secs.max(1e-9)
            ));
            eprintln!("{}", self.notes.last().map(String::as_str).unwrap_or_default());
            created = n;
            let last_ip = self.cluster_ip(&fake_name(n - 1))?;

            let [f, k] = &mut peers;
            self.cold_start(f, n, &last_ip)?;
            // Above 10,000 services kube-proxy may not finish: it gets a bound, and the stage goes
            // on without it when it runs out.
            let mut with_kube_proxy = true;
            if let Err(e) = self.cold_start(k, n, &last_ip) {
                if n <= 10_000 {
                    return Err(e);
                }
                k.stop();
                with_kube_proxy = false;
                self.notes.push(format!(
                    "kube-proxy at {n} services: no full table within {} s of its start ({e:#}); its other figures at {n} are left out",
                    bound(Kind::KubeProxy, n).as_secs()
                ));
                eprintln!("{}", self.notes.last().map(String::as_str).unwrap_or_default());
            }
            if n == stages[0] {
                let log = std::fs::read_to_string(log_path("kube-proxy")).unwrap_or_default();
                if !log.contains("Using nftables Proxier") {
                    bail!("kube-proxy does not say it runs in nftables mode; see {}", log_path("kube-proxy").display());
                }
            }
            for p in [&mut *f, &mut *k] {
                if p.kind == Kind::KubeProxy && !with_kube_proxy {
                    continue;
                }
                self.warm_restart(p, n)?;
            }
            for p in [&*f, &*k] {
                if p.kind == Kind::KubeProxy && !with_kube_proxy {
                    continue;
                }
                wait_for("the real service's ClusterIP to answer", Duration::from_secs(30), || {
                    let out = output(
                        "ip",
                        &["netns", "exec", &p.host(), "curl", "-sS", "--max-time", "2", &format!("http://{real_ip}/")],
                    )?;
                    Ok(out.status.success().then_some(()))
                })?;
                self.first_packet(p, n, &real_ip)?;
            }
            self.updates(f, k, n)?;
            if with_kube_proxy {
                self.updates(k, f, n)?;
            }
            for p in [&mut *f, &mut *k] {
                if let Some(kib) = p.pid().and_then(vm_hwm_kib) {
                    p.hwm_kib = p.hwm_kib.max(kib);
                }
                let mib = p.hwm_kib as f64 / 1024.0;
                self.row("peak RSS (VmHWM)", n, "MiB", p.kind, mib);
            }
        }
        Ok(())
    }

    fn print(&self) {
        println!(
            "\nferrolb data plane (node-1) vs kube-proxy --proxy-mode=nftables v1.36.3 (node-2), N services x {ENDPOINTS} endpoints ({})",
            if cfg!(debug_assertions) { "debug build" } else { "release build" }
        );
        println!("\n| measure | N services | ferrolb | kube-proxy | ferrolb / kube-proxy |\n|---|---:|---:|---:|---:|");
        let mut order: BTreeMap<(usize, usize), &Row> = BTreeMap::new();
        let firsts: Vec<&str> = {
            let mut v: Vec<&str> = Vec::new();
            for r in &self.rows {
                if !v.contains(&r.what.as_str()) {
                    v.push(&r.what);
                }
            }
            v
        };
        for r in &self.rows {
            let k = firsts.iter().position(|w| *w == r.what).unwrap_or(0);
            order.insert((k, r.n), r);
        }
        let fmt = |v: Option<f64>, unit: &str| match v {
            Some(x) if x.is_finite() => match unit {
                "s" => format!("{x:.2} s"),
                "ms" => format!("{x:.1} ms"),
                "µs" => format!("{x:.0} µs"),
                _ => format!("{x:.1} {unit}"),
            },
            _ => "—".into(),
        };
        for r in order.values() {
            let ratio = match (r.ferrolb, r.kube_proxy) {
                (Some(a), Some(b)) if b > 0.0 && a.is_finite() && b.is_finite() => format!("{:.2}", a / b),
                _ => "—".into(),
            };
            println!("| {} | {} | {} | {} | {ratio} |", r.what, r.n, fmt(r.ferrolb, r.unit), fmt(r.kube_proxy, r.unit));
        }
        println!();
        for n in &self.notes {
            println!("- {n}");
        }
    }
}

fn main() -> Result<()> {
    let stages: Vec<usize> = match std::env::var("BENCH_STAGES") {
        Ok(s) => s.split(',').map(|x| x.trim().parse()).collect::<Result<_, _>>()?,
        Err(_) => vec![10, 1_000, 10_000, 50_000],
    };
    if stages.is_empty() || stages.windows(2).any(|w| w[0] >= w[1]) || stages[0] == 0 {
        bail!("BENCH_STAGES must be increasing sizes, e.g. 10,1000,10000");
    }
    let lab = Lab::new()?;
    let _ = lab.lab(&["down"]);
    let rt = tokio::runtime::Runtime::new()?;
    let r = (|| -> Result<Bench> {
        lab.lab(&["up"])?;
        let client = rt.block_on(async {
            let kc = kube::config::Kubeconfig::read_from("/run/ferrolb-lab/kubeconfig")?;
            let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
            anyhow::Ok(kube::Client::try_from(config)?)
        })?;
        Ok(Bench {
            rt,
            client,
            lab: Lab::new()?,
            rows: Vec::new(),
            notes: Vec::new(),
            next_addr: 0,
            ports: BTreeMap::new(),
        })
    })();
    let mut bench = match r {
        Ok(b) => b,
        Err(e) => {
            let _ = lab.lab(&["down"]);
            return Err(e);
        }
    };
    let r = bench.in_lab(&stages);
    let _ = lab.lab(&["down"]);
    bench.print();
    r
}

//! `ferrolb-lab drill api-outage`: the API server goes away for a while under load. A lost API
//! is not a broken data plane: nothing may be withdrawn, flushed or reported unhealthy, and
//! everything must converge within seconds of its return.
//!
//! ```text
//!   client: load on every LB address; split-brain watch ─────────────────────────────────────>
//!   5 s: snapshot of ferrolb's nftables on every node
//!   stop kube-apiserver ─── every second: each speaker's /healthz; once: its API metric
//!        │  +5 s: a Service (and its EndpointSlice) written straight into etcd, as if created now
//!        │  [--crash NODE: that node crashes; only the membership can tell]
//!        │  end: the nftables again (must be unchanged)
//!   start kube-apiserver ── time until the new Service has an address, and until it answers
//! ```

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::DeleteParams;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::chaos::{ingress, now_ms, url, wait_gone};
use crate::drill::{Action, act};
use crate::load::Report;
use crate::paths::Paths;
use crate::splitbrain::Summary;
use crate::{control_plane, lifecycle, procs};

/// The drill's settings.
#[derive(Clone, Debug)]
pub struct Outage {
    pub seconds: f64,
    pub rate: u32,
    /// `namespace/name` of the LoadBalancer services loaded (every address of each).
    pub services: Vec<String>,
    /// Crash this node 10 s into the outage (restored after it).
    pub crash: Option<String>,
}

/// One load stream.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stream {
    pub service: String,
    pub ip: IpAddr,
    pub requests: u64,
    pub failed: u64,
    pub max_gap_ms: u64,
}

/// What a user wants to know afterwards.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OutageOutcome {
    pub seconds: f64,
    pub streams: Vec<Stream>,
    /// Announcer changes seen on the wire during the whole drill.
    pub announcer_changes: usize,
    /// Each: seconds from the API server's stop, address, from node, to node.
    pub changes: Vec<(f64, IpAddr, String, String)>,
    /// Overlaps of two answering MACs longer than 50 ms.
    pub split_brain_windows: usize,
    /// Nodes whose ferrolb nftables differ between the start and the end of the outage.
    pub tables_changed: Vec<String>,
    /// Health checks of the speakers during the outage, and those not answered 200.
    pub health_checks: u64,
    pub health_failures: Vec<String>,
    /// Speakers whose `ferrolb_speaker_api_reachable` read 0 during the outage.
    pub api_lost_reported: Vec<String>,
    /// The API server's start, after the outage (ms).
    pub apiserver_back_ms: u64,
    /// From the API server's return until the Service written during the outage had an
    /// address, and until it answered the client (ms).
    pub new_service_address_ms: Option<u64>,
    pub new_service_answer_ms: Option<u64>,
    /// With --crash: the crashed node, and what moved off it during the outage (address,
    /// milliseconds from the crash to the new announcer's first answer).
    pub crashed: Option<String>,
    pub moved_during_outage: Vec<(IpAddr, u64)>,
}

impl OutageOutcome {
    /// The issue's expectations.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let failed: u64 = self.streams.iter().map(|s| s.failed).sum();
        if failed > 0 && self.crashed.is_none() {
            p.push(format!("{failed} requests failed"));
        }
        // During the outage nothing may move; after it, Kubernetes' own catch-up (the node
        // controller marking Nodes and their pods not ready for the heartbeats it missed) may.
        let during = self.changes.iter().filter(|c| c.0 < self.seconds).count();
        if during > 0 && self.crashed.is_none() {
            p.push(format!("{during} announcer changes during the outage"));
        }
        if self.split_brain_windows > 0 {
            p.push(format!("{} split-brain windows", self.split_brain_windows));
        }
        if !self.tables_changed.is_empty() && self.crashed.is_none() {
            p.push(format!("tables changed during the outage on {:?}", self.tables_changed));
        }
        if !self.health_failures.is_empty() {
            p.push(format!("health checks failed: {:?}", self.health_failures));
        }
        match self.new_service_answer_ms {
            Some(ms) if ms <= 5000 => {}
            Some(ms) => p.push(format!("the Service written during the outage answered only {ms} ms after the return")),
            None => p.push("the Service written during the outage never answered".into()),
        }
        p
    }
}

/// ferrolb's nftables on `node`, as text (the tables whose name starts with ferrolb).
fn tables(node: &str) -> String {
    let list = crate::cmd::stdout("ip", &["netns", "exec", node, "nft", "list", "tables"]).unwrap_or_default();
    let mut out = String::new();
    for line in list.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        if let ["table", family, name] = parts[..]
            && name.starts_with("ferrolb")
            && let Ok(t) = crate::cmd::stdout("ip", &["netns", "exec", node, "nft", "list", "table", family, name])
        {
            out.push_str(&t);
        }
    }
    out
}

/// The words of a listing, sorted: nft may list a set's elements in another order after a
/// resync, which changes nothing; a flushed table or set loses words.
fn words(listing: &str) -> Vec<&str> {
    let mut w: Vec<&str> =
        listing.split(|c: char| c.is_whitespace() || ",{}".contains(c)).filter(|w| !w.is_empty()).collect();
    w.sort_unstable();
    w
}

/// `curl` from the client: the body, or the error.
fn client_get(url: &str, timeout_s: &str) -> std::result::Result<String, String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", "client", "curl", "-sS", "--max-time", timeout_s, url])
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Writes `object` straight into etcd at `key` (the lab's etcd, on the control plane's
/// loopback), as the API server would store it.
fn etcd_put(key: &str, object: &serde_json::Value) -> Result<()> {
    use base64::Engine as _;
    let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
    let body = serde_json::json!({"key": b64(key.as_bytes()), "value": b64(object.to_string().as_bytes())});
    let out = crate::cmd::stdout(
        "ip",
        &[
            "netns",
            "exec",
            crate::plan::CONTROL_PLANE_NS,
            "curl",
            "-sS",
            "--max-time",
            "5",
            "-X",
            "POST",
            "http://127.0.0.1:2379/v3/kv/put",
            "-d",
            &body.to_string(),
        ],
    )?;
    if !out.contains("header") {
        bail!("etcd put {key}: {out}");
    }
    Ok(())
}

const PROBE: &str = "ferrolb-outage-probe";

/// The Service and EndpointSlice "created" during the outage: a selector-less LoadBalancer
/// Service whose slice lists the pods of `template` (a ready slice of the demo), so that no
/// other controller is needed for it to answer: what converges is ferrolb alone.
async fn probe_objects(client: &kube::Client, cluster_ip: &str) -> Result<(serde_json::Value, serde_json::Value)> {
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), "default")
        .list(&kube::api::ListParams::default().labels("kubernetes.io/service-name=hostname-svc-lb"))
        .await
        .context("reading the demo's EndpointSlices")?;
    let template = slices
        .items
        .into_iter()
        .find(|s| s.address_type == "IPv4")
        .context("the demo service hostname-svc-lb has no IPv4 EndpointSlice")?;
    let uid = |n: u8| format!("0e1a9e5e-0000-4000-8000-0000000000{n:02}");
    // Any valid time will do; the demo's own is at hand.
    let created = serde_json::to_value(&template.metadata.creation_timestamp)?;
    let service = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": PROBE, "namespace": "default", "uid": uid(1), "creationTimestamp": created},
        "spec": {
            "type": "LoadBalancer",
            "allocateLoadBalancerNodePorts": false,
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "externalTrafficPolicy": "Cluster",
            "internalTrafficPolicy": "Cluster",
            "sessionAffinity": "None",
            "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 80}]
        },
        "status": {"loadBalancer": {}}
    });
    let mut slice = serde_json::to_value(&template)?;
    slice["apiVersion"] = "discovery.k8s.io/v1".into();
    slice["kind"] = "EndpointSlice".into();
    slice["metadata"] = serde_json::json!({
        "name": format!("{PROBE}-1"),
        "namespace": "default",
        "uid": uid(2),
        "creationTimestamp": created,
        "labels": {"kubernetes.io/service-name": PROBE, "endpointslice.kubernetes.io/managed-by": "ferrolb-lab"}
    });
    if let Some(ports) = slice["ports"].as_array_mut() {
        for p in ports {
            p["name"] = "http".into();
        }
    }
    Ok((service, slice))
}

/// A free ClusterIP for the probe, from the top of the service range.
async fn probe_cluster_ip(client: &kube::Client) -> Result<String> {
    let used: std::collections::BTreeSet<String> = Api::<Service>::all(client.clone())
        .list(&kube::api::ListParams::default())
        .await?
        .items
        .into_iter()
        .flat_map(|s| s.spec.and_then(|s| s.cluster_ips).unwrap_or_default())
        .collect();
    (200..254)
        .filter_map(|i| crate::plan::SERVICE_CIDR_V4.nth(i))
        .map(|ip| ip.to_string())
        .find(|ip| !used.contains(ip))
        .context("no free ClusterIP for the probe Service")
}

/// What the drill saw while it drove the outage.
struct During {
    health_checks: u64,
    health_failures: Vec<String>,
    api_lost_reported: Vec<String>,
    tables_changed: Vec<String>,
    apiserver_back_ms: u64,
    address_ms: Option<u64>,
    answer_ms: Option<u64>,
    crashed_at: Option<u64>,
    stopped_unix_ms: u64,
}

/// Runs the drill.
pub async fn run(paths: &Paths, o: &Outage) -> Result<OutageOutcome> {
    lifecycle::require_root()?;
    let client = crate::kube_client(paths).await?;
    let plan = lifecycle::current_plan(paths).context("the lab is not up: run 'make lab' first")?;
    let nodes: Vec<(String, String)> = plan.nodes().into_iter().map(|n| (n.name.clone(), n.ipv4.to_string())).collect();
    let mut targets = Vec::new();
    for svc in &o.services {
        for ip in ingress(&client, svc).await? {
            targets.push((svc.clone(), ip));
        }
    }
    let macs = crate::chaos::node_macs(paths);
    let (service_obj, slice_obj) = probe_objects(&client, &probe_cluster_ip(&client).await?).await?;

    let before = Duration::from_secs(5);
    let after = Duration::from_secs(15);
    let total = before + Duration::from_secs_f64(o.seconds) + after;
    let exe = std::env::current_exe().context("locating ferrolb-lab")?;
    let secs = total.as_secs_f64().to_string();
    let loads: Vec<_> = targets
        .iter()
        .map(|(_, ip)| {
            tokio::process::Command::new("ip")
                .args(["netns", "exec", "client"])
                .arg(&exe)
                .args(["load", &url(*ip), "--rate", &o.rate.to_string(), "--seconds", &secs, "--timeout-ms", "1000"])
                .kill_on_drop(true)
                .output()
        })
        .collect();
    let mut probe_args: Vec<String> = vec!["split-brain".into(), "--seconds".into(), secs.clone()];
    for (_, ip) in &targets {
        probe_args.extend(["--ip".to_string(), ip.to_string()]);
    }
    let watch = tokio::process::Command::new("ip")
        .args(["netns", "exec", "client"])
        .arg(&exe)
        .args(&probe_args)
        .kill_on_drop(true)
        .output();

    let drive = async {
        tokio::time::sleep(before).await;
        let snapshot: BTreeMap<String, String> = nodes.iter().map(|(n, _)| (n.clone(), tables(n))).collect();
        let pid = procs::running(paths, "kube-apiserver").context("kube-apiserver is not running")?;
        eprintln!("api-outage: stopping kube-apiserver for {:.0} s", o.seconds);
        let stopped = Instant::now();
        let stopped_unix_ms = now_ms();
        // SIGKILL: gone as after a crash of its host. (A graceful stop first takes the API server's
        // own address out of the `kubernetes` Service, which every data plane then follows, as
        // kube-proxy's does: a real change, not what this drill looks for.)
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        wait_gone(pid, Duration::from_secs(20)).await?;
        // Whatever goes wrong from here on, the API server comes back (below).
        let mut errors: Vec<String> = Vec::new();
        let mut health_checks = 0;
        let mut health_failures = Vec::new();
        let mut api_lost_reported = Vec::new();
        let mut written = false;
        let mut crashed_at = None;
        let outage = Duration::from_secs_f64(o.seconds);
        while stopped.elapsed() + Duration::from_secs(2) < outage {
            for (node, ip) in &nodes {
                if crashed_at.is_some() && o.crash.as_deref() == Some(node) {
                    continue;
                }
                health_checks += 1;
                if let Err(e) = client_get(&format!("http://{ip}:7472/healthz"), "1") {
                    health_failures.push(format!("{node} at {:.1} s: {e}", stopped.elapsed().as_secs_f64()));
                }
                if stopped.elapsed() > Duration::from_secs(3)
                    && !api_lost_reported.contains(node)
                    && client_get(&format!("http://{ip}:7472/metrics"), "1")
                        .is_ok_and(|m| m.lines().any(|l| l == "ferrolb_speaker_api_reachable 0"))
                {
                    api_lost_reported.push(node.clone());
                }
            }
            if !written && stopped.elapsed() > Duration::from_secs(5) {
                let put = etcd_put(&format!("/registry/services/specs/default/{PROBE}"), &service_obj)
                    .and_then(|()| etcd_put(&format!("/registry/endpointslices/default/{PROBE}-1"), &slice_obj));
                match put {
                    Ok(()) => eprintln!("api-outage: Service {PROBE} and its EndpointSlice written into etcd"),
                    Err(e) => errors.push(format!("writing the probe Service into etcd: {e:#}")),
                }
                written = true;
            }
            if let Some(node) = &o.crash
                && crashed_at.is_none()
                && stopped.elapsed() > Duration::from_secs(10)
            {
                eprintln!("api-outage: crashing {node}");
                if let Err(e) = act(paths, &client, Action::Crash, node).await {
                    errors.push(format!("crashing {node}: {e:#}"));
                }
                crashed_at = Some(now_ms());
            }
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
        tokio::time::sleep(outage.saturating_sub(stopped.elapsed() + Duration::from_millis(500))).await;
        let tables_changed: Vec<String> = nodes
            .iter()
            .filter(|_| crashed_at.is_none())
            .filter_map(|(n, _)| {
                let now = tables(n);
                let before = &snapshot[n];
                let first = now.lines().zip(before.lines()).find(|(a, b)| a != b);
                (words(&now) != words(before)).then(|| match first {
                    Some((a, b)) => format!("{n} (first difference: {:?} was {:?})", a.trim(), b.trim()),
                    None => format!("{n} ({} lines, were {})", now.lines().count(), before.lines().count()),
                })
            })
            .collect();
        tokio::time::sleep(outage.saturating_sub(stopped.elapsed())).await;
        eprintln!("api-outage: starting kube-apiserver");
        control_plane::ensure(paths, &plan).await?;
        let back = now_ms();
        let apiserver_back_ms = stopped.elapsed().as_millis() as u64;
        // The new Service: its address, then an answer.
        let mut address_ms = None;
        let mut answer_ms = None;
        let svc_api = Api::<Service>::namespaced(client.clone(), "default");
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) && answer_ms.is_none() {
            if address_ms.is_none()
                && let Ok(ips) = ingress(&client, &format!("default/{PROBE}")).await
            {
                address_ms = Some(now_ms() - back);
                eprintln!("api-outage: {PROBE} got {ips:?} {} ms after the return", now_ms() - back);
            }
            if address_ms.is_some()
                && let Ok(ips) = ingress(&client, &format!("default/{PROBE}")).await
                // A fresh neighbour lookup each time: a failed one would hold the client back
                // for seconds (the kernel's own retries), which is not ferrolb's time.
                && crate::cmd::ip_in("client", &["neigh", "flush", "to", &ips[0].to_string()]).is_ok()
                && client_get(&url(ips[0]), "1").is_ok()
            {
                answer_ms = Some(now_ms() - back);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = svc_api.delete(PROBE, &DeleteParams::default()).await;
        let slices: Api<k8s_openapi::api::discovery::v1::EndpointSlice> = Api::namespaced(client.clone(), "default");
        let _ = slices.delete(&format!("{PROBE}-1"), &DeleteParams::default()).await;
        if let Some(node) = &o.crash {
            act(paths, &client, Action::Restore, node).await?;
        }
        if !errors.is_empty() {
            bail!("{}", errors.join("; "));
        }
        anyhow::Ok(During {
            health_checks,
            health_failures,
            api_lost_reported,
            tables_changed,
            apiserver_back_ms,
            address_ms,
            answer_ms,
            crashed_at,
            stopped_unix_ms,
        })
    };
    let (loads, watch, driven) = tokio::join!(futures::future::join_all(loads), watch, drive);
    let d = driven?;
    let watch = watch.context("running the split-brain watch")?;
    if !watch.status.success() {
        bail!("the split-brain watch failed: {}", String::from_utf8_lossy(&watch.stderr));
    }
    let summary: Summary = serde_json::from_slice(&watch.stdout).context("reading the split-brain summary")?;
    let mut streams = Vec::new();
    for (out, (svc, ip)) in loads.into_iter().zip(&targets) {
        let out = out.context("running the load")?;
        let r: Report = serde_json::from_slice(&out.stdout).context("reading a load report")?;
        streams.push(Stream {
            service: svc.clone(),
            ip: *ip,
            requests: r.requests,
            failed: r.failed,
            max_gap_ms: r.max_gap_ms,
        });
    }
    let moved_during_outage = match d.crashed_at {
        Some(at) => summary
            .changes
            .iter()
            // Moves off the crashed node (not the moves back once it is restored).
            .filter(|c| c.at_us / 1000 >= at && macs.get(&c.from) == o.crash.as_ref())
            .map(|c| (c.ip, (c.at_us / 1000).saturating_sub(at)))
            .collect(),
        None => Vec::new(),
    };
    Ok(OutageOutcome {
        seconds: o.seconds,
        streams,
        announcer_changes: summary.changes.len(),
        changes: summary
            .changes
            .iter()
            .map(|c| {
                let name = |m: &str| macs.get(m).cloned().unwrap_or_else(|| m.to_string());
                let at = (c.at_us / 1000) as f64 / 1000.0 - d.stopped_unix_ms as f64 / 1000.0;
                (at, c.ip, name(&c.from), name(&c.to))
            })
            .collect(),
        split_brain_windows: summary.split_brain_windows().len(),
        tables_changed: d.tables_changed,
        health_checks: d.health_checks,
        health_failures: d.health_failures,
        api_lost_reported: d.api_lost_reported,
        apiserver_back_ms: d.apiserver_back_ms,
        new_service_address_ms: d.address_ms,
        new_service_answer_ms: d.answer_ms,
        crashed: o.crash.clone(),
        moved_during_outage,
    })
}

/// The outcome for people.
pub fn describe(o: &OutageOutcome) -> String {
    let mut s = format!(
        "drill api-outage: kube-apiserver stopped for {:.0} s (back after {} ms)\n",
        o.seconds, o.apiserver_back_ms
    );
    for st in &o.streams {
        s.push_str(&format!(
            "  load {} {}: requests {}, failed {}, longest gap {} ms\n",
            st.service, st.ip, st.requests, st.failed, st.max_gap_ms
        ));
    }
    s.push_str(&format!(
        "  announcer changes on the wire: {}; split-brain windows: {}\n  ferrolb's nftables changed during the outage on: {}\n  speaker health checks: {}, failed: {}\n  speakers reporting the API lost (ferrolb_speaker_api_reachable 0): {}\n",
        o.announcer_changes,
        o.split_brain_windows,
        if o.tables_changed.is_empty() { "none".to_string() } else { o.tables_changed.join(", ") },
        o.health_checks,
        o.health_failures.len(),
        o.api_lost_reported.join(", ")
    ));
    let ms = |v: Option<u64>| v.map(|v| format!("{v} ms")).unwrap_or_else(|| "never".into());
    s.push_str(&format!(
        "  Service written during the outage: address {} and first answer {} after the API server's return\n",
        ms(o.new_service_address_ms),
        ms(o.new_service_answer_ms)
    ));
    if let Some(n) = &o.crashed {
        s.push_str(&format!(
            "  {n} crashed during the outage; moved off it by the membership alone: {:?}\n",
            o.moved_during_outage
        ));
    }
    s.push_str("  a cordon during the outage is not seen: nobody can read it until the API server is back\n");
    for (at, ip, from, to) in &o.changes {
        s.push_str(&format!("  {at:6.1} s after the stop: {ip} moved {from} -> {to}\n"));
    }
    let p = o.problems();
    s.push_str(&format!("  expectations: {}\n", if p.is_empty() { "met".to_string() } else { p.join("; ") }));
    s
}

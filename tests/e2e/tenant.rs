//! No Service, however odd, can hurt another tenant's traffic, end to end in the lab:
//!
//! - a Service with the longest names the API server accepts is programmed like any other, and
//!   another Deployment's new pods get traffic at once (before, `nft` refused every sync);
//! - a Service whose rules `nft` refuses (a fault hook in the speakers) is left out with a
//!   `DataplaneRejected` Event and a metric, health stays green, everything else keeps syncing;
//! - `loadBalancerSourceRanges` stored by older API servers (leading zeros, host bits) are read
//!   as the API server reads them, and an entry nobody can read closes the address (before, such
//!   entries were skipped and the address was open to everyone);
//! - a Service patched every second keeps the speaker's kernel objects flat (before, stale
//!   chains were only deleted after 2 s without any change, so they piled up).
//!
//! Needs root (it brings up its own lab); fails loudly without it.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ferrolb_e2e::{Case, Controller, Lab, Speaker, answer, cluster_ip_of, events, lb_ip, run_suite, url, wait_for};

static SPEAKERS: Mutex<Vec<Speaker>> = Mutex::new(Vec::new());
static CONTROLLER: Mutex<Option<Controller>> = Mutex::new(None);

/// The Service the speakers' fault hook makes `nft` refuse.
const REFUSED: &str = "tenant-b/refused";

fn main() -> ExitCode {
    let cases: &[Case] = &[
        ("setup_lab_demo_controller_and_speakers", setup),
        ("the_longest_names_leave_every_other_service_working", longest_names),
        ("a_refused_service_is_left_out_and_the_rest_keeps_syncing", refused_service),
        ("source_ranges_stored_by_older_releases_fail_closed", legacy_source_ranges),
        ("a_service_patched_every_second_keeps_the_kernel_flat", churn),
    ];
    let code = run_suite("tenant", cases);
    SPEAKERS.lock().map(|mut s| s.clear()).ok();
    code
}

/// A namespace of 40 characters, and a Service and a port name of 63 each.
fn long_names() -> (String, String, String) {
    (format!("tenant-{}", "a".repeat(33)), format!("s{}", "v".repeat(62)), format!("p{}", "-x".repeat(31)))
}

fn setup(lab: &Lab) -> Result<()> {
    lab.lab(&["up"])?;
    ferrolb_e2e::ferrolb_system(lab, &["192.0.2.200-192.0.2.250"])?;
    ferrolb_e2e::apply_demo(lab)?;
    lab.kubectl(&["rollout", "status", "deployment/hostname", "--timeout=60s"])?;
    let (controller, speakers) = ferrolb_e2e::start_ferrolb(lab, 17477, &[("FERROLB_FAULT_REJECT_SERVICE", REFUSED)])?;
    *CONTROLLER.lock().unwrap_or_else(|e| e.into_inner()) = Some(controller);
    *SPEAKERS.lock().unwrap_or_else(|e| e.into_inner()) = speakers;
    Ok(())
}

/// A Deployment of one hostname pod in `namespace`, named and labelled `app`.
fn deployment(namespace: &str, app: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {app}, namespace: {namespace}}}\nspec:\n  replicas: 1\n  \
         selector: {{matchLabels: {{app: {app}}}}}\n  template:\n    metadata: {{labels: {{app: {app}}}}}\n    spec:\n      \
         containers:\n      - {{name: web, image: alicek106/rr-test:echo-hostname, ports: [{{containerPort: 80}}], \
         readinessProbe: {{httpGet: {{path: /, port: 80}}, periodSeconds: 1}}}}\n"
    )
}

/// The ready pods of `selector` in `namespace`: `(name, IP)`.
fn ready_pods(lab: &Lab, namespace: &str, selector: &str) -> Result<Vec<(String, String)>> {
    let v = lab.kubectl_json(&["get", "pods", "-n", namespace, "-l", selector])?;
    Ok(v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| ferrolb_e2e::pod_ready(p))
        .filter_map(|p| Some((ferrolb_e2e::name(p), p["status"]["podIP"].as_str()?.to_string())))
        .collect())
}

/// The addresses listed ready in the EndpointSlices of `namespace/service`.
fn slice_ready(lab: &Lab, namespace: &str, service: &str) -> Result<Vec<String>> {
    let v = lab.kubectl_json(&[
        "get",
        "endpointslices",
        "-n",
        namespace,
        "-l",
        &format!("kubernetes.io/service-name={service}"),
    ])?;
    let mut out = Vec::new();
    for s in v["items"].as_array().into_iter().flatten() {
        for e in s["endpoints"].as_array().into_iter().flatten() {
            if e["conditions"]["ready"].as_bool() == Some(true) {
                out.extend(
                    e["addresses"].as_array().into_iter().flatten().filter_map(|a| a.as_str()).map(str::to_string),
                );
            }
        }
    }
    Ok(out)
}

/// Scales `deployment/hostname` to `replicas` and measures, for each new pod, the time from the
/// moment its EndpointSlice lists it ready (the data plane's input) to its first answer through
/// the ClusterIP from node-1. Returns the slowest.
fn new_pods_reachable(lab: &Lab, replicas: u32) -> Result<Duration> {
    let before: Vec<String> = ready_pods(lab, "default", "app=webserver")?.into_iter().map(|(n, _)| n).collect();
    let new = (replicas as usize).saturating_sub(before.len());
    lab.kubectl(&["scale", "deployment/hostname", &format!("--replicas={replicas}")])?;
    let cip = cluster_ip_of(lab, "hostname-svc-clusterip", 0)?;
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut listed_at: BTreeMap<String, Instant> = BTreeMap::new();
    let mut answered: BTreeMap<String, Duration> = BTreeMap::new();
    while answered.len() < new {
        ensure!(Instant::now() < deadline, "new pods not all reached within 90 s: {answered:?}");
        let asked = Instant::now();
        let listed = slice_ready(lab, "default", "hostname-svc-clusterip")?;
        for (pod, ip) in ready_pods(lab, "default", "app=webserver")? {
            if !before.contains(&pod) && listed.contains(&ip) {
                listed_at.entry(pod).or_insert(asked);
            }
        }
        // Ask until every listed pod has answered (about one try in `replicas` reaches a given
        // pod), with no API call in between that would add to the time measured.
        let until = Instant::now() + Duration::from_secs(5);
        while listed_at.keys().any(|p| !answered.contains_key(p)) && Instant::now() < until {
            let Ok(body) = lab.curl("node-1", &url(&cip, 8080)) else { continue };
            let (pod, _) = answer(&body)?;
            if let Some(at) = listed_at.get(&pod)
                && !answered.contains_key(&pod)
            {
                let took = at.elapsed();
                println!("  {pod}: first answer {:.0} ms after its slice listed it ready", took.as_secs_f64() * 1e3);
                answered.insert(pod, took);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(answered.values().copied().max().unwrap_or_default())
}

/// Before, every sync on every node failed with `comment too long`, and new pods of any
/// Deployment never got a request.
fn longest_names(lab: &Lab) -> Result<()> {
    let (ns, name, port) = long_names();
    ensure!((ns.len(), name.len(), port.len()) == (40, 63, 63));
    lab.apply(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n---\n{}---\napiVersion: v1\nkind: Service\n\
         metadata: {{name: {name}, namespace: {ns}}}\nspec:\n  type: LoadBalancer\n  selector: {{app: longest}}\n  \
         ports: [{{name: {port}, port: 80, targetPort: 80}}]\n",
        deployment(&ns, "longest")
    ))?;
    lab.kubectl(&["rollout", "status", "-n", &ns, "deployment/longest", "--timeout=60s"])?;
    let ip = lb_ip(lab, &format!("{ns}/{name}"))?;
    wait_for("the longest-named Service to answer the client", Duration::from_secs(20), || {
        Ok(lab.curl("client", &url(&ip, 80)).ok().filter(|b| b.contains("hostname: longest")).map(drop))
    })?;
    let table = lab.exec("node-1", &["nft", "list", "table", "ip", "ferrolb"])?;
    ensure!(table.contains(&format!("{ns}/")), "node-1's table has no chain comment for {ns}");
    let slowest = new_pods_reachable(lab, 5)?;
    ensure!(slowest <= Duration::from_secs(1), "a new pod waited {slowest:?} for its first request");
    // It is not refused, so it gets no DataplaneRejected Event.
    let ev = events(lab, &format!("{ns}/{name}"), "DataplaneRejected")?;
    ensure!(ev.trim().is_empty(), "an Event on a Service nft took: {ev}");
    println!("  {ns}/{name} answers at {ip}; new pods reached within {:.0} ms", slowest.as_secs_f64() * 1e3);
    Ok(())
}

/// Before, there was no hook and no quarantine: one refused Service failed every sync, health
/// went red after 60 s and speakers restarted.
fn refused_service(lab: &Lab) -> Result<()> {
    let (ns, name) = REFUSED.split_once('/').context("REFUSED")?;
    lab.apply(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n---\n{}---\napiVersion: v1\nkind: Service\n\
         metadata: {{name: {name}, namespace: {ns}}}\nspec:\n  type: LoadBalancer\n  selector: {{app: refused}}\n  \
         ports: [{{port: 80, targetPort: 80}}]\n",
        deployment(ns, "refused")
    ))?;
    lab.kubectl(&["rollout", "status", "-n", ns, "deployment/refused", "--timeout=60s"])?;
    let ev = ferrolb_e2e::wait_event(lab, REFUSED, "DataplaneRejected", "nft refused")?;
    ensure!(ev.contains("fault-hook") || ev.contains("syntax"), "the Event does not say what nft said: {ev}");
    println!("  Event: {}", ev.lines().next().unwrap_or_default());
    for n in 1..=3u8 {
        let m = wait_for(&format!("node-{n}'s rejected-services metric"), Duration::from_secs(10), || {
            let (_, m) = ferrolb_e2e::speaker_get(n, "/metrics")?;
            Ok(m.contains("ferrolb_dataplane_rejected_services{family=\"ipv4\"} 1").then_some(m))
        })?;
        ensure!(!m.is_empty());
        for path in ["/healthz", "/readyz"] {
            let (code, _) = ferrolb_e2e::speaker_get(n, path)?;
            ensure!(code == "200", "node-{n} {path}: {code} while one Service is left out");
        }
    }
    // Everything else keeps syncing: another Deployment's new pods get traffic at once.
    let slowest = new_pods_reachable(lab, 6)?;
    ensure!(slowest <= Duration::from_secs(1), "a new pod waited {slowest:?} for its first request");
    let lb = lb_ip(lab, "hostname-svc-lb")?;
    ensure!(lab.curl("client", &url(&lb, 80))?.contains("hostname:"), "the demo LB IP stopped answering");
    // Health stays green over time, not just right after.
    std::thread::sleep(Duration::from_secs(3));
    for n in 1..=3u8 {
        ensure!(ferrolb_e2e::speaker_get(n, "/healthz")?.0 == "200", "node-{n} unhealthy");
    }
    // Gone: nothing is left out any more.
    lab.kubectl(&["delete", "service", "-n", ns, name])?;
    wait_for("the rejected-services metric back to 0", Duration::from_secs(10), || {
        Ok(ferrolb_e2e::speaker_get(1, "/metrics")?
            .1
            .contains("ferrolb_dataplane_rejected_services{family=\"ipv4\"} 0")
            .then_some(()))
    })?;
    println!("  left out on 3 nodes, health 200, new pods reached within {:.0} ms", slowest.as_secs_f64() * 1e3);
    Ok(())
}

/// Writes `object` (JSON, with apiVersion and kind) straight into etcd at `key`, as an older API
/// server would have stored it: the API server of today refuses these forms on create and
/// update, but reads what is stored.
fn store_in_etcd(lab: &Lab, key: &str, object: &serde_json::Value) -> Result<()> {
    use base64::Engine as _;
    let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
    let body = serde_json::json!({"key": b64(key.as_bytes()), "value": b64(object.to_string().as_bytes())});
    let out = lab.exec(
        "control-plane",
        &["curl", "-sS", "--max-time", "5", "-X", "POST", "http://127.0.0.1:2379/v3/kv/put", "-d", &body.to_string()],
    )?;
    ensure!(out.contains("header"), "etcd put {key}: {out}");
    Ok(())
}

/// Creates LoadBalancer Service `name` (demo pods) with valid ranges, then stores it again with
/// `ranges` as written before 1.36, and waits until the API server serves them.
fn legacy_service(lab: &Lab, name: &str, ranges: &[&str]) -> Result<String> {
    lab.apply(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  type: LoadBalancer\n  \
         selector: {{app: webserver}}\n  loadBalancerSourceRanges: [203.0.113.0/24]\n  ports: [{{port: 80, targetPort: 80}}]\n"
    ))?;
    let ip = lb_ip(lab, name)?;
    let mut object = ferrolb_e2e::svc(lab, name)?;
    object["apiVersion"] = "v1".into();
    object["kind"] = "Service".into();
    if let Some(meta) = object["metadata"].as_object_mut() {
        meta.remove("resourceVersion");
        meta.remove("managedFields");
    }
    object["spec"]["loadBalancerSourceRanges"] = serde_json::json!(ranges);
    store_in_etcd(lab, &format!("/registry/services/specs/default/{name}"), &object)?;
    wait_for(&format!("{name} served with its legacy ranges"), Duration::from_secs(10), || {
        let v = ferrolb_e2e::svc(lab, name)?;
        Ok((v["spec"]["loadBalancerSourceRanges"] == serde_json::json!(ranges)).then_some(()))
    })?;
    Ok(ip)
}

/// Whether the client gets an answer from `ip` (a few tries).
fn client_reaches(ip: &str) -> Result<bool> {
    for _ in 0..3 {
        let out =
            ferrolb_e2e::output("ip", &["netns", "exec", "client", "curl", "-sS", "--max-time", "1", &url(ip, 80)])?;
        if out.status.success() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Before, an entry ferrolb could not parse was skipped, and a Service whose every entry was
/// skipped was open to everyone.
fn legacy_source_ranges(lab: &Lab) -> Result<()> {
    // Leading zeros: Go's legacy parser read 198.051.100.0 as 198.51.100.0 (the client is not in it).
    let closed = legacy_service(lab, "legacy-closed", &["198.051.100.0/24"])?;
    // Leading zeros and host bits: 192.0.2.0/24, which holds the client.
    let open = legacy_service(lab, "legacy-open", &["192.000.002.007/24"])?;
    // One entry nobody can read: closed to all, even to the client the other entry holds.
    let unreadable = legacy_service(lab, "legacy-unreadable", &["192.0.2.0/24", "192.0.2.0/33"])?;
    // A new user cannot write these forms: the API server refuses them.
    let why = lab
        .apply(
            "apiVersion: v1\nkind: Service\nmetadata: {name: legacy-new}\nspec:\n  type: LoadBalancer\n  \
             selector: {app: webserver}\n  loadBalancerSourceRanges: [198.051.100.0/24]\n  ports: [{port: 80}]\n",
        )
        .err()
        .context("the API server took a leading zero from a new object")?;
    println!("  today's API server on a new object: {}", format!("{why:#}").lines().last().unwrap_or_default());
    wait_for("legacy-open to answer the client", Duration::from_secs(20), || Ok(client_reaches(&open)?.then_some(())))?;
    ferrolb_e2e::wait_event(lab, "legacy-unreadable", "InvalidSourceRange", "192.0.2.0/33")?;
    // Settled (the Event came after the sync): both stay closed.
    for (name, ip) in [("legacy-closed", &closed), ("legacy-unreadable", &unreadable)] {
        if client_reaches(ip)? {
            bail!("{name} ({ip}) answered the client 192.0.2.100, which its ranges do not admit");
        }
    }
    println!("  legacy-open {open} answers; legacy-closed {closed} and legacy-unreadable {unreadable} do not");
    lab.kubectl(&["delete", "service", "legacy-closed", "legacy-open", "legacy-unreadable"])?;
    Ok(())
}

/// Chains and sets in node-1's `ip ferrolb` table.
fn kernel_objects(lab: &Lab) -> Result<(usize, usize)> {
    let t = lab.exec("node-1", &["nft", "list", "table", "ip", "ferrolb"])?;
    let count = |kw: &str| t.lines().filter(|l| l.trim_start().starts_with(kw)).count();
    Ok((count("chain "), count("set ") + count("map ")))
}

/// Resident memory of a process, KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// `FERROLB_CHURN_SECS` (default 60; `make churn` runs 600) of one patch a second: the port is
/// renamed each time, so every patch retires the chains of the old name.
fn churn(lab: &Lab) -> Result<()> {
    let secs: u64 = std::env::var("FERROLB_CHURN_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(60);
    lab.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: churn}\nspec:\n  type: LoadBalancer\n  selector: {app: webserver}\n  \
         sessionAffinity: ClientIP\n  ports: [{name: p0, port: 80, targetPort: 80}]\n",
    )?;
    let ip = lb_ip(lab, "churn")?;
    wait_for("churn to answer", Duration::from_secs(20), || {
        Ok(lab.curl("client", &url(&ip, 80)).ok().filter(|b| b.contains("hostname:")).map(drop))
    })?;
    std::thread::sleep(Duration::from_secs(3));
    let pid = SPEAKERS.lock().unwrap_or_else(|e| e.into_inner())[0].pid().context("node-1's speaker is not running")?;
    let (chains0, sets0) = kernel_objects(lab)?;
    let rss0 = rss_kib(pid).unwrap_or(0);
    println!("  {:>6} {:>7} {:>5} {:>9}", "second", "chains", "sets", "RSS KiB");
    println!("  {:>6} {chains0:>7} {sets0:>5} {rss0:>9}", 0);
    let (mut max_chains, mut max_sets) = (chains0, sets0);
    let start = Instant::now();
    let mut i = 0u64;
    while start.elapsed() < Duration::from_secs(secs) {
        i += 1;
        let patch = format!("[{{\"op\":\"replace\",\"path\":\"/spec/ports/0/name\",\"value\":\"p{i}\"}}]");
        lab.kubectl(&["patch", "service", "churn", "--type=json", "-p", &patch])?;
        let (c, s) = kernel_objects(lab)?;
        max_chains = max_chains.max(c);
        max_sets = max_sets.max(s);
        if i.is_multiple_of(10) {
            println!("  {:>6} {c:>7} {s:>5} {:>9}", start.elapsed().as_secs(), rss_kib(pid).unwrap_or(0));
        }
        let next = Duration::from_secs(i);
        if let Some(wait) = next.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    std::thread::sleep(Duration::from_secs(4));
    let (chains1, sets1) = kernel_objects(lab)?;
    let rss1 = rss_kib(pid).unwrap_or(0);
    println!(
        "  {i} patches in {:.0} s: chains {chains0} -> max {max_chains} -> {chains1}, sets {sets0} -> max {max_sets} -> {sets1}, \
         RSS {rss0} -> {rss1} KiB",
        start.elapsed().as_secs_f64()
    );
    // Each patch retires about 3 chains and 6 sets (service, external and affinity objects of the
    // old port name); they may wait a few seconds (at most 5 s, so about 6 patches' worth), never
    // pile up. Before, they all stayed until the patches stopped.
    let (per_chains, per_sets) = (3, 6);
    ensure!(max_chains <= chains0 + 10 * per_chains, "chains grew from {chains0} to {max_chains} under {i} patches");
    ensure!(max_sets <= sets0 + 10 * per_sets, "sets grew from {sets0} to {max_sets} under {i} patches");
    ensure!(
        chains1 <= chains0 + 6 && sets1 <= sets0 + 6,
        "stale objects left after the patches: {chains1} chains, {sets1} sets"
    );
    ensure!(lab.curl("client", &url(&ip, 80))?.contains("hostname:"), "churn stopped answering");
    lab.kubectl(&["delete", "service", "churn"])?;
    Ok(())
}

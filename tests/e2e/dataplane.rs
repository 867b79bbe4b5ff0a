//! The speaker's nftables data plane end to end in the lab, with real `curl`: ClusterIP from
//! nodes and pods, NodePort, LoadBalancer and external IPs from the client, both traffic
//! policies, affinity, services without endpoints, readiness, source ranges, health check node
//! ports, hairpin, a speaker restart under load, and the `lb-only` and `off` modes.
//!
//! Needs root (it brings up its own lab); fails loudly without it.

use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ferrolb_e2e::{
    Case, Controller, Lab, Speaker, answer, cluster_ip_of, http_get, lb_ip, run_suite, speaker_get, svc, url, wait_for,
};
use serde_json::Value;

static SPEAKERS: Mutex<Vec<Speaker>> = Mutex::new(Vec::new());
static CONTROLLER: Mutex<Option<Controller>> = Mutex::new(None);

const CLIENT_IP: &str = "192.0.2.100";
const EXTERNAL_IP: &str = "192.0.2.150";
const NODE_IPS: [&str; 3] = ["192.0.2.11", "192.0.2.12", "192.0.2.13"];

fn main() -> ExitCode {
    let cases: &[Case] = &[
        ("setup_lab_demo_controller_and_speakers", setup),
        ("cluster_ip_answers_from_every_node_and_from_a_pod", cluster_ip),
        ("node_ports_answer_fixed_and_allocated", node_ports),
        ("loadbalancer_and_external_ips_answer_the_client", lb_and_external_ips),
        ("local_keeps_the_client_address_cluster_masquerades", traffic_policies),
        ("ipv6_cluster_ip_and_loadbalancer_answer", ipv6),
        ("client_ip_affinity_pins_and_no_affinity_spreads", affinity),
        ("a_service_without_endpoints_refuses_at_once", no_endpoints),
        ("an_unready_pod_leaves_the_rotation", unready_pod),
        ("loadbalancer_source_ranges_block_other_clients", source_ranges),
        ("health_check_node_ports_count_local_endpoints", health_check_node_port),
        ("a_pod_reaches_itself_through_its_service", hairpin),
        ("externalname_services_get_no_rules", external_name),
        ("a_speaker_restart_drops_no_request", restart_under_load),
        ("metrics_and_health_of_the_data_plane", metrics),
        ("lb_only_and_off_modes", modes),
        ("udp_flows_to_a_removed_endpoint_move_on", udp_conntrack),
    ];
    let code = run_suite("dataplane", cases);
    SPEAKERS.lock().map(|mut s| s.clear()).ok();
    code
}

const FIXTURES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: affinity}
spec:
  selector: {app: webserver}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
  ports: [{port: 8080, targetPort: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: empty}
spec:
  type: NodePort
  selector: {app: nothing-matches-this}
  ports: [{port: 8080, targetPort: 80, nodePort: 31001}]
---
apiVersion: v1
kind: Service
metadata: {name: ext}
spec:
  selector: {app: webserver}
  externalIPs: [192.0.2.150]
  ports: [{port: 80, targetPort: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: ranged}
spec:
  type: LoadBalancer
  selector: {app: webserver}
  loadBalancerSourceRanges: [198.18.99.0/24]
  ports: [{port: 80, targetPort: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: ranged-ok}
spec:
  type: LoadBalancer
  selector: {app: webserver}
  loadBalancerSourceRanges: [192.0.2.0/24]
  ports: [{port: 80, targetPort: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: dual}
spec:
  type: LoadBalancer
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  selector: {app: webserver}
  ports: [{port: 80, targetPort: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: udp}
spec:
  selector: {app: webserver}
  ports: [{port: 53, targetPort: 80, protocol: UDP}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: solo}
spec:
  replicas: 1
  selector: {matchLabels: {app: solo}}
  template:
    metadata: {labels: {app: solo}}
    spec:
      containers:
      - {name: web, image: alicek106/rr-test:echo-hostname, ports: [{containerPort: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: solo}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  selector: {app: solo}
  ports: [{port: 80, targetPort: 80}]
"#;

fn setup(lab: &Lab) -> Result<()> {
    lab.lab(&["up"])?;
    ferrolb_e2e::ferrolb_system(lab, &["192.0.2.200-192.0.2.250", "2001:db8:1::c8-2001:db8:1::fa"])?;
    ferrolb_e2e::apply_demo(lab)?;
    lab.apply(FIXTURES)?;
    lab.kubectl(&["rollout", "status", "deployment/hostname", "--timeout=60s"])?;
    lab.kubectl(&["rollout", "status", "deployment/solo", "--timeout=60s"])?;
    // externalIPs are not announced (as with kube-proxy): the client routes it to node-1.
    lab.exec("client", &["ip", "route", "replace", &format!("{EXTERNAL_IP}/32"), "via", NODE_IPS[0]])?;
    let (controller, speakers) = ferrolb_e2e::start_ferrolb(lab, 17475, &[])?;
    *CONTROLLER.lock().unwrap_or_else(|e| e.into_inner()) = Some(controller);
    *SPEAKERS.lock().unwrap_or_else(|e| e.into_inner()) = speakers;
    Ok(())
}

/// The address part of `ip:port` / `[ip]:port`.
fn addr_of(client: &str) -> String {
    let a = client.rsplit_once(':').map(|(a, _)| a).unwrap_or(client);
    a.trim_start_matches('[').trim_end_matches(']').to_string()
}

/// The namespace of a pod, found by its address.
fn pod_netns(lab: &Lab, pod_ip: &str) -> Result<String> {
    for ns in ferrolb_e2e::run("ip", &["netns", "list"])?.lines().filter_map(|l| l.split_whitespace().next()) {
        if ns.starts_with("flbpod-") && lab.exec(ns, &["ip", "-o", "addr"])?.contains(&format!(" {pod_ip}/")) {
            return Ok(ns.to_string());
        }
    }
    bail!("no pod namespace holds {pod_ip}")
}

/// `ferrolb-lab load` from `host`: its JSON report.
fn load(lab: &Lab, host: &str, url: &str, rate: u32, seconds: f64) -> Result<Value> {
    let out = lab.exec(
        host,
        &[
            lab.bin(),
            "load",
            url,
            "--rate",
            &rate.to_string(),
            "--seconds",
            &seconds.to_string(),
            "--timeout-ms",
            "2000",
        ],
    )?;
    serde_json::from_str(out.trim()).with_context(|| format!("load report {out:?}"))
}

fn cluster_ip(lab: &Lab) -> Result<()> {
    let ip = cluster_ip_of(lab, "hostname-svc-clusterip", 0)?;
    for n in 1..=3 {
        let (pod, client) = answer(&lab.curl(&format!("node-{n}"), &url(&ip, 8080))?)?;
        println!("  node-{n} -> {ip}:8080: {pod}, seen from {client}");
    }
    let pod = lab.pods("app=solo")?.into_iter().next().context("no solo pod")?;
    let ns = pod_netns(lab, pod["status"]["podIP"].as_str().unwrap_or_default())?;
    let (to, from) = answer(&lab.curl(&ns, &url(&ip, 8080))?)?;
    println!("  pod {ns} -> {ip}:8080: {to}, seen from {from}");
    Ok(())
}

fn node_ports(lab: &Lab) -> Result<()> {
    for node_ip in NODE_IPS {
        answer(&lab.curl("client", &url(node_ip, 31000))?)?;
    }
    let allocated = svc(lab, "hostname-svc-lb")?["spec"]["ports"][0]["nodePort"].as_u64().context("no nodePort")?;
    for node_ip in NODE_IPS {
        answer(&lab.curl("client", &url(node_ip, allocated as u16))?)?;
    }
    println!("  31000 and {allocated} answer on {NODE_IPS:?}");
    Ok(())
}

fn lb_and_external_ips(lab: &Lab) -> Result<()> {
    let ip = lb_ip(lab, "hostname-svc-lb")?;
    let (pod, _) = answer(&lab.curl("client", &url(&ip, 80))?)?;
    let (ext_pod, _) = answer(&lab.curl("client", &url(EXTERNAL_IP, 80))?)?;
    println!("  {ip} -> {pod}; externalIP {EXTERNAL_IP} -> {ext_pod}");
    Ok(())
}

fn traffic_policies(lab: &Lab) -> Result<()> {
    let local = lb_ip(lab, "hostname-svc-lb-local")?;
    let cluster = lb_ip(lab, "hostname-svc-lb")?;
    let node_addrs = ["192.0.2.11", "192.0.2.12", "192.0.2.13", "198.18.1.1", "198.18.2.1", "198.18.3.1"];
    for _ in 0..5 {
        let (_, seen) = answer(&lab.curl("client", &url(&local, 80))?)?;
        ensure!(addr_of(&seen) == CLIENT_IP, "Local: the pod saw {seen}, not the client {CLIENT_IP}");
        let (_, seen) = answer(&lab.curl("client", &url(&cluster, 80))?)?;
        ensure!(node_addrs.contains(&addr_of(&seen).as_str()), "Cluster: the pod saw {seen}, not a node address");
    }
    Ok(())
}

fn ipv6(lab: &Lab) -> Result<()> {
    let v = svc(lab, "dual")?;
    let ips: Vec<String> = v["status"]["loadBalancer"]["ingress"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["ip"].as_str().map(str::to_string))
        .collect();
    let v6 = ips.iter().find(|i| i.contains(':')).with_context(|| format!("no IPv6 address in {ips:?}"))?;
    let cip6 =
        v["spec"]["clusterIPs"].as_array().into_iter().flatten().filter_map(|i| i.as_str()).find(|i| i.contains(':'));
    let cip6 = cip6.context("no IPv6 cluster IP")?.to_string();
    let lb = wait_for("the IPv6 address to answer", Duration::from_secs(20), || {
        Ok(lab.curl("client", &url(v6, 80)).ok().and_then(|b| answer(&b).ok()))
    })?;
    let (pod, _) = answer(&lab.curl("node-2", &url(&cip6, 80))?)?;
    println!("  [{v6}]:80 -> {} (seen from {}); [{cip6}]:80 from node-2 -> {pod}", lb.0, lb.1);
    Ok(())
}

fn backends(report: &Value) -> Vec<String> {
    report["backends"].as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default()
}

fn affinity(lab: &Lab) -> Result<()> {
    let pinned = load(lab, "node-1", &url(&cluster_ip_of(lab, "affinity", 0)?, 8080), 50, 1.0)?;
    let spread = load(lab, "node-1", &url(&cluster_ip_of(lab, "hostname-svc-clusterip", 0)?, 8080), 50, 1.0)?;
    ensure!(pinned["failed"] == 0 && spread["failed"] == 0, "failures: {pinned} {spread}");
    ensure!(backends(&pinned).len() == 1, "ClientIP affinity spread over {:?}", pinned["backends"]);
    ensure!(backends(&spread).len() >= 2, "no affinity, yet one pod took all: {:?}", spread["backends"]);
    println!("  affinity: {}; none: {}", pinned["backends"], spread["backends"]);
    Ok(())
}

/// How a TCP connect from `host` to `ip:port` ends: `Ok(elapsed)` when refused; an error when
/// it connects or times out.
fn refused(host: &str, ip: &str, port: u16) -> Result<Duration> {
    let t = Instant::now();
    let out = ferrolb_e2e::output("ip", &["netns", "exec", host, "curl", "-sS", "--max-time", "3", &url(ip, port)])?;
    let took = t.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "{ip}:{port} answered: {}", String::from_utf8_lossy(&out.stdout));
    ensure!(err.contains("Couldn't connect") || err.contains("refused"), "not refused: {err}");
    Ok(took)
}

fn no_endpoints(lab: &Lab) -> Result<()> {
    let from_client = refused("client", NODE_IPS[1], 31001)?;
    let cip = cluster_ip_of(lab, "empty", 0)?;
    let from_node = refused("node-1", &cip, 8080)?;
    println!(
        "  NodePort 31001 refused in {:.1} ms; cluster IP in {:.1} ms (curl process included)",
        from_client.as_secs_f64() * 1e3,
        from_node.as_secs_f64() * 1e3
    );
    Ok(())
}

fn slice_ready(lab: &Lab, service: &str, ip: &str) -> Result<Option<bool>> {
    let v = lab.kubectl_json(&["get", "endpointslices", "-l", &format!("kubernetes.io/service-name={service}")])?;
    for s in v["items"].as_array().into_iter().flatten() {
        for e in s["endpoints"].as_array().into_iter().flatten() {
            if e["addresses"].as_array().is_some_and(|a| a.iter().any(|x| x == ip)) {
                return Ok(e["conditions"]["ready"].as_bool());
            }
        }
    }
    Ok(None)
}

fn unready_pod(lab: &Lab) -> Result<()> {
    let dir = std::env::temp_dir();
    let flag = |p: &str| dir.join(format!("ferrolb-e2e-dp-{p}-{}", std::process::id()));
    let mut yaml = String::new();
    for p in ["flaky-a", "flaky-b"] {
        std::fs::write(flag(p), "")?;
        yaml.push_str(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {p}, labels: {{app: flaky}}}}\nspec:\n  containers:\n  - name: web\n    image: alicek106/rr-test:echo-hostname\n    ports: [{{containerPort: 80}}]\n    readinessProbe:\n      exec: {{command: [test, -e, \"{}\"]}}\n      periodSeconds: 1\n      failureThreshold: 1\n---\n",
            flag(p).display()
        ));
    }
    yaml.push_str("apiVersion: v1\nkind: Service\nmetadata: {name: flaky}\nspec:\n  selector: {app: flaky}\n  ports: [{port: 8080, targetPort: 80}]\n");
    lab.apply(&yaml)?;
    let ip_of = |p: &str| -> Result<String> {
        wait_for(&format!("{p} Ready"), Duration::from_secs(30), || {
            let v = lab.kubectl_json(&["get", "pod", p])?;
            Ok(ferrolb_e2e::pod_ready(&v).then(|| v["status"]["podIP"].as_str().map(str::to_string)).flatten())
        })
    };
    let a = ip_of("flaky-a")?;
    ip_of("flaky-b")?;
    let cip = cluster_ip_of(lab, "flaky", 0)?;
    wait_for("both flaky pods answering", Duration::from_secs(20), || {
        Ok((backends(&load(lab, "node-2", &url(&cip, 8080), 50, 0.5)?).len() == 2).then_some(()))
    })?;
    std::fs::remove_file(flag("flaky-a"))?;
    wait_for("flaky-a not ready in its EndpointSlice", Duration::from_secs(30), || {
        Ok((slice_ready(lab, "flaky", &a)? == Some(false)).then_some(()))
    })?;
    // The data plane follows the slice within a sync; then only flaky-b answers.
    let t = Instant::now();
    let report = wait_for("flaky-a out of rotation", Duration::from_secs(10), || {
        let r = load(lab, "node-2", &url(&cip, 8080), 50, 0.6)?;
        Ok((backends(&r) == ["flaky-b"]).then_some(r))
    })?;
    ensure!(report["failed"] == 0, "failures while flaky-a left: {report}");
    println!("  flaky-a out of rotation {:.1} s after its slice said so", t.elapsed().as_secs_f64());
    let _ = std::fs::remove_file(flag("flaky-b"));
    lab.kubectl(&["delete", "pod/flaky-a", "pod/flaky-b", "service/flaky", "--wait=false"])?;
    Ok(())
}

fn source_ranges(lab: &Lab) -> Result<()> {
    let blocked = lb_ip(lab, "ranged")?;
    let allowed = lb_ip(lab, "ranged-ok")?;
    wait_for("ranged-ok to answer", Duration::from_secs(20), || {
        Ok(lab.curl("client", &url(&allowed, 80)).ok().filter(|b| b.contains("hostname:")).map(drop))
    })?;
    let out =
        ferrolb_e2e::output("ip", &["netns", "exec", "client", "curl", "-sS", "--max-time", "2", &url(&blocked, 80)])?;
    ensure!(!out.status.success(), "{blocked} answered a client outside 198.18.99.0/24");
    println!("  {allowed} (192.0.2.0/24) answers; {blocked} (198.18.99.0/24) does not");
    Ok(())
}

fn health_check_node_port(lab: &Lab) -> Result<()> {
    for (service, selector) in [("hostname-svc-lb-local", "app=webserver"), ("solo", "app=solo")] {
        let port = svc(lab, service)?["spec"]["healthCheckNodePort"].as_u64().context("no healthCheckNodePort")?;
        let pods = lab.pods(selector)?;
        for (i, node_ip) in NODE_IPS.iter().enumerate() {
            let node = format!("node-{}", i + 1);
            let local = pods.iter().filter(|p| p["spec"]["nodeName"] == node.as_str()).count();
            let (code, body) = http_get("client", &url(node_ip, port as u16))?;
            let want = if local > 0 { "200" } else { "503" };
            ensure!(code == want, "{service} on {node} ({local} local): HTTP {code}, want {want}: {body}");
            ensure!(body.contains(&format!("\"localEndpoints\":{local}")), "{service} on {node}: {body}");
        }
        println!("  {service}: health check node port {port} answers per node as its local endpoints say");
    }
    Ok(())
}

fn hairpin(lab: &Lab) -> Result<()> {
    let pod = lab.pods("app=solo")?.into_iter().next().context("no solo pod")?;
    let name = pod["metadata"]["name"].as_str().unwrap_or_default().to_string();
    let ns = pod_netns(lab, pod["status"]["podIP"].as_str().unwrap_or_default())?;
    let cip = cluster_ip_of(lab, "solo", 0)?;
    for _ in 0..3 {
        let (to, from) = answer(&lab.curl(&ns, &url(&cip, 80))?)?;
        ensure!(to == name, "answered by {to}, not {name}");
        println!("  {name} -> {cip}:80 -> itself, seen from {from}");
    }
    Ok(())
}

fn external_name(lab: &Lab) -> Result<()> {
    for n in 1..=3 {
        let table = lab.exec(&format!("node-{n}"), &["nft", "list", "table", "ip", "ferrolb"])?;
        ensure!(table.contains("default/hostname-svc-lb/"), "node-{n}'s table lacks the LoadBalancer service");
        ensure!(!table.contains("external-svc"), "node-{n} has rules for the ExternalName service");
    }
    Ok(())
}

fn restart_under_load(lab: &Lab) -> Result<()> {
    // node-1's NodePort and its ClusterIP path run through node-1's rules, which the restarted
    // speaker takes over with a full sync.
    let bin = lab.bin().to_string();
    let client = std::thread::spawn(move || {
        ferrolb_e2e::run("ip", &["netns", "exec", "client", &bin, "load", &url(NODE_IPS[0], 31000), "--seconds", "6"])
    });
    std::thread::sleep(Duration::from_secs(2));
    {
        let mut speakers = SPEAKERS.lock().unwrap_or_else(|e| e.into_inner());
        speakers[0].stop();
        speakers[0].restart()?;
    }
    let out = client.join().map_err(|_| anyhow::anyhow!("load thread panicked"))??;
    let report: Value = serde_json::from_str(out.trim())?;
    ensure!(report["failed"] == 0, "requests failed through the restart: {report}");
    println!(
        "  through a speaker restart: {} requests, 0 failed, longest gap {} ms",
        report["requests"], report["max_gap_ms"]
    );
    Ok(())
}

fn metrics(_lab: &Lab) -> Result<()> {
    let (code, m) = speaker_get(2, "/metrics")?;
    ensure!(code == "200", "/metrics: {code}");
    for want in [
        "ferrolb_dataplane_sync_duration_seconds_count{kind=\"full\"}",
        "ferrolb_dataplane_sync_duration_seconds_count{kind=\"partial\"}",
        "ferrolb_dataplane_network_programming_duration_seconds_count",
        "ferrolb_dataplane_services_no_local_endpoints{family=\"ipv4\"}",
    ] {
        ensure!(m.contains(want), "{want} missing from /metrics:\n{m}");
    }
    for path in ["/healthz", "/livez", "/readyz"] {
        let (code, body) = speaker_get(2, path)?;
        ensure!(code == "200", "{path}: {code} {body}");
    }
    Ok(())
}

fn modes(lab: &Lab) -> Result<()> {
    let cip = cluster_ip_of(lab, "hostname-svc-clusterip", 0)?;
    let lb = lb_ip(lab, "hostname-svc-lb")?;
    let mut speakers = SPEAKERS.lock().unwrap_or_else(|e| e.into_inner());
    speakers[2].restart_with(&["--dataplane=lb-only"])?;
    wait_for("node-3's table to keep only LoadBalancer addresses", Duration::from_secs(20), || {
        let t = lab.exec("node-3", &["nft", "list", "map", "ip", "ferrolb", "service-ips"])?;
        Ok((t.contains(&format!("{lb} . tcp . 80")) && !t.contains(&cip)).then_some(()))
    })?;
    speakers[2].restart_with(&["--dataplane=off"])?;
    wait_for("node-3's tables to go", Duration::from_secs(20), || {
        Ok((!lab.exec("node-3", &["nft", "list", "tables"])?.contains("ferrolb")).then_some(()))
    })?;
    speakers[2].restart()?;
    wait_for("node-3's full table back", Duration::from_secs(20), || {
        let t = lab.exec("node-3", &["nft", "list", "map", "ip", "ferrolb", "service-ips"]).unwrap_or_default();
        Ok(t.contains(&cip).then_some(()))
    })?;
    Ok(())
}

/// One datagram from node-1's fixed source port 40053 to `ip:53`: the pod that answered.
fn udp_ask(ip: &str) -> Result<Option<String>> {
    let script = format!(
        "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('0.0.0.0',40053))\ns.settimeout(1)\ns.sendto(b'x',('{ip}',53))\nprint(s.recvfrom(1500)[0].decode())"
    );
    let out = ferrolb_e2e::output("ip", &["netns", "exec", "node-1", "python3", "-c", &script])?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(out.status.success().then(|| answer(&text).ok().map(|(pod, _)| pod)).flatten())
}

fn udp_conntrack(lab: &Lab) -> Result<()> {
    let ip = cluster_ip_of(lab, "udp", 0)?;
    let first = wait_for("a UDP answer", Duration::from_secs(10), || udp_ask(&ip))?;
    // The same source port again: conntrack keeps the flow on the same pod.
    ensure!(udp_ask(&ip)?.as_deref() == Some(first.as_str()), "the UDP flow moved without cause");
    lab.kubectl(&["delete", "pod", &first, "--wait=false"])?;
    let t = Instant::now();
    // Its conntrack entry must go with it, or the flow would stay pinned to a dead pod.
    let next = wait_for("the UDP flow answered by another pod", Duration::from_secs(10), || {
        Ok(udp_ask(&ip)?.filter(|p| *p != first))
    })?;
    println!("  UDP flow from {first} to {next} {:.1} s after the delete", t.elapsed().as_secs_f64());
    lab.kubectl(&["rollout", "status", "deployment/hostname", "--timeout=60s"])?;
    Ok(())
}

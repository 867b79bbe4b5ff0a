//! The lab, end to end: a real control plane, real network namespaces, real pods.
//!
//! One lab serves every case, in order; the last case takes it down and checks that nothing
//! is left. Needs root; without it the run fails (it never passes by skipping).

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ferrolb_e2e::{Case, Lab, fails_with, k8s_bin_dir, name, pod_ready, run, run_suite, wait_for};

/// The demo of `make lab`.
const DEMO: &str = include_str!("../../deploy/demo/hostname.yaml");

/// A Service over it, so the controller-manager keeps an EndpointSlice of its pods.
const DEMO_SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: hostname-svc-clusterip
spec:
  selector: {app: webserver}
  ports:
  - port: 8080
    targetPort: 80
"#;

fn main() -> ExitCode {
    let cases: &[Case] = &[
        ("errors_name_the_fix", errors_name_the_fix),
        ("up_makes_every_node_ready", up_makes_every_node_ready),
        ("up_again_is_harmless_and_repairs_a_half_started_lab", up_again_repairs),
        ("down_returns_once_every_process_is_gone_and_up_right_after_works", down_waits),
        ("scheduler_spreads_the_deployment_and_pods_run_with_ips", deployment_spreads),
        ("endpointslices_list_the_ready_pods", endpointslices_list_pods),
        ("pods_are_reachable_across_nodes", pods_reachable_across_nodes),
        ("host_network_pods_answer_on_the_node_address", host_network_pod),
        ("a_cordoned_node_gets_no_new_pods", cordoned_node_gets_no_new_pods),
        ("a_failing_readiness_probe_leaves_the_endpointslice", readiness_probe),
        ("a_crashed_container_is_restarted", crashed_container_restarts),
        ("an_unsupported_image_stays_pending_with_an_event", unsupported_image),
        ("a_ferrolb_image_runs_the_local_binary_with_its_serviceaccount_token", ferrolb_image),
        ("a_deleted_pod_is_stopped_and_its_namespace_removed", deleted_pod_cleaned),
        ("a_drill_without_ferrolb_finds_the_announcer_on_the_wire", drill_without_ferrolb),
        ("an_ipv4_only_lab_has_no_ipv6", ipv4_only_lab),
        ("down_leaves_nothing_behind", down_leaves_nothing),
    ];
    run_suite("lab", cases)
}

fn errors_name_the_fix(lab: &Lab) -> Result<()> {
    // Not root: one line that says so.
    fails_with("setpriv", &["--reuid=65534", "--regid=65534", "--clear-groups", lab.bin(), "up"], "needs root")?;

    // No Go and no FERROLB_K8S_BIN_DIR: the binaries script names both ways out.
    let empty = std::env::temp_dir().join(format!("ferrolb-e2e-empty-{}", std::process::id()));
    std::fs::create_dir_all(&empty)?;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../hack/k8s-bins.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .env("PATH", "/usr/bin:/bin")
        .env("FERROLB_CACHE", &empty)
        .env_remove("FERROLB_K8S_BIN_DIR")
        .output()?;
    let _ = std::fs::remove_dir_all(&empty);
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("install Go") && err.contains("FERROLB_K8S_BIN_DIR"),
        "k8s-bins without Go: {err}"
    );

    // A bad node count.
    fails_with(lab.bin(), &["up", "--nodes", "12"], "--nodes must be between 1 and 9")?;
    Ok(())
}

fn up_makes_every_node_ready(lab: &Lab) -> Result<()> {
    let t = Instant::now();
    let kubeconfig = lab.lab(&["up"])?;
    let secs = t.elapsed().as_secs_f64();
    println!("  up: {secs:.1} s (cached binaries)");
    ensure!(kubeconfig.trim().ends_with("kubeconfig"), "up prints the kubeconfig path, got {kubeconfig:?}");
    // Plain kubectl with that kubeconfig works from the root namespace.
    let kubectl = k8s_bin_dir()?.join("kubectl");
    let kubectl = kubectl.to_str().unwrap_or("kubectl");
    let nodes = run(kubectl, &["--kubeconfig", kubeconfig.trim(), "get", "nodes", "-o", "json"])?;
    let nodes: serde_json::Value = serde_json::from_str(&nodes)?;
    let items = nodes["items"].as_array().cloned().unwrap_or_default();
    let names: BTreeSet<String> = items.iter().map(name).collect();
    ensure!(names == ["node-1", "node-2", "node-3"].iter().map(|s| s.to_string()).collect(), "nodes: {names:?}");
    for n in &items {
        ensure!(pod_ready(n), "node {} is not Ready", name(n));
        let cidrs = n["spec"]["podCIDRs"].as_array().map(|a| a.len()).unwrap_or(0);
        ensure!(cidrs == 2, "node {} has {cidrs} pod CIDRs, want 2 (dual stack)", name(n));
    }
    // So does helm.
    let helm = k8s_bin_dir()?.join("helm");
    run(helm.to_str().unwrap_or("helm"), &["--kubeconfig", kubeconfig.trim(), "list", "-A"])?;
    // Heartbeat Leases exist and are renewed by the agents.
    let leases = lab.kubectl_json(&["get", "leases", "-n", "kube-node-lease"])?;
    ensure!(leases["items"].as_array().map(|a| a.len()) == Some(3), "node leases: {leases}");
    Ok(())
}

fn up_again_repairs(lab: &Lab) -> Result<()> {
    let kc_before = std::fs::read(lab.lab(&["kubeconfig"])?.trim())?;
    // Half-start: kill the scheduler and one agent, as a crash would.
    for name in ["kube-scheduler", "agent-node-2"] {
        let pid = std::fs::read_to_string(format!("/run/ferrolb-lab/pids/{name}.pid"))?;
        run("kill", &["-9", pid.trim()])?;
    }
    let t = Instant::now();
    lab.lab(&["up"])?;
    println!("  up on a half-started lab: {:.1} s", t.elapsed().as_secs_f64());
    let status = lab.lab(&["status"])?;
    ensure!(!status.contains("NOT RUNNING"), "after repair:\n{status}");
    ensure!(std::fs::read(lab.lab(&["kubeconfig"])?.trim())? == kc_before, "up must keep the kubeconfig");
    // A different shape is refused with the fix.
    fails_with(lab.bin(), &["up", "--nodes", "2"], "run 'ferrolb-lab down' first")?;
    Ok(())
}

/// Every process of the lab: the recorded ones (control plane, agents) and all in its namespaces.
fn lab_pids() -> Result<Vec<(i32, String)>> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/run/ferrolb-lab/pids")? {
        let e = e?;
        if let Ok(pid) = std::fs::read_to_string(e.path())?.trim().parse() {
            pids.push((pid, e.file_name().to_string_lossy().trim_end_matches(".pid").to_string()));
        }
    }
    for ns in run("ip", &["netns", "list"])?.lines().filter_map(|l| l.split_whitespace().next()) {
        if ns == "client" || ns == "control-plane" || ns.starts_with("node-") || ns.starts_with("flbpod-") {
            let found = run("ip", &["netns", "pids", ns])?;
            pids.extend(found.split_whitespace().filter_map(|p| Some((p.parse().ok()?, format!("a process in {ns}")))));
        }
    }
    Ok(pids)
}

/// `None` when the process is gone for good; else what is left of it. A zombie counts as gone
/// only once all its threads have exited: until then it still holds its ports.
fn still_there(pid: i32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let state = stat.rsplit(')').next()?.split_whitespace().next()?.to_string();
    let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.count()).unwrap_or(0);
    (state != "Z" || threads > 1).then(|| format!("state {state}, {threads} threads"))
}

fn down_waits(lab: &Lab) -> Result<()> {
    lab.lab(&["up"])?;
    let pids = lab_pids()?;
    ensure!(pids.iter().any(|(_, n)| n == "etcd") && pids.iter().any(|(_, n)| n == "kube-apiserver"), "pids: {pids:?}");
    let t = Instant::now();
    lab.lab(&["down"])?;
    let took = t.elapsed().as_secs_f64();
    let left: Vec<String> =
        pids.iter().filter_map(|(pid, name)| Some(format!("{name} (pid {pid}): {}", still_there(*pid)?))).collect();
    println!("  down: {took:.1} s, {} processes stopped", pids.len());
    ensure!(left.is_empty(), "down returned while these still ran: {left:?}");
    // At once: nothing of the old lab is in the way.
    let t = Instant::now();
    lab.lab(&["up"])?;
    println!("  up right after down: {:.1} s", t.elapsed().as_secs_f64());
    let status = lab.lab(&["status"])?;
    ensure!(!status.contains("NOT RUNNING"), "after down and up:\n{status}");
    Ok(())
}

fn deployment_spreads(lab: &Lab) -> Result<()> {
    lab.apply(DEMO)?;
    lab.apply(DEMO_SERVICE)?;
    let pods = wait_for("3 demo pods Running and Ready", Duration::from_secs(60), || {
        let pods = lab.pods("app=webserver")?;
        let ok = pods.len() == 3 && pods.iter().all(|p| p["status"]["phase"] == "Running" && pod_ready(p));
        Ok(ok.then_some(pods))
    })?;
    let nodes: BTreeSet<String> =
        pods.iter().map(|p| p["spec"]["nodeName"].as_str().unwrap_or_default().to_string()).collect();
    ensure!(nodes.len() == 3, "the scheduler put the 3 pods on {nodes:?}");
    for p in &pods {
        let ips: Vec<&str> =
            p["status"]["podIPs"].as_array().into_iter().flatten().filter_map(|i| i["ip"].as_str()).collect();
        ensure!(
            ips.len() == 2 && ips[0].starts_with("198.18.") && ips[1].starts_with("2001:db8:100:"),
            "pod IPs {ips:?}"
        );
    }
    Ok(())
}

fn endpointslices_list_pods(lab: &Lab) -> Result<()> {
    let want: BTreeSet<String> =
        lab.pods("app=webserver")?.iter().filter_map(|p| p["status"]["podIP"].as_str().map(str::to_string)).collect();
    wait_for("the EndpointSlice to list the 3 ready pods", Duration::from_secs(30), || {
        let slices =
            lab.kubectl_json(&["get", "endpointslices", "-l", "kubernetes.io/service-name=hostname-svc-clusterip"])?;
        let ready: BTreeSet<String> = slices["items"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
            .filter(|e| e["conditions"]["ready"] == true)
            .flat_map(|e| e["addresses"].as_array().cloned().unwrap_or_default())
            .filter_map(|a| a.as_str().map(str::to_string))
            .collect();
        Ok((ready == want).then_some(()))
    })
}

fn pods_reachable_across_nodes(lab: &Lab) -> Result<()> {
    let pods = lab.pods("app=webserver")?;
    for p in &pods {
        let pod = name(p);
        let node = p["spec"]["nodeName"].as_str().unwrap_or_default();
        for ip in p["status"]["podIPs"].as_array().into_iter().flatten().filter_map(|i| i["ip"].as_str()) {
            let url = if ip.contains(':') { format!("http://[{ip}]/") } else { format!("http://{ip}/") };
            let body = lab.curl("client", &url)?;
            ensure!(body.contains(&format!("hostname: {pod}")), "client -> {url}: {body}");
            let client = if ip.contains(':') { "client: [2001:db8:1::100]:" } else { "client: 192.0.2.100:" };
            ensure!(body.contains(client), "the pod sees the client's own address: {body}");
            // And from every other node.
            for other in ["node-1", "node-2", "node-3"].into_iter().filter(|n| *n != node) {
                let body = lab.curl(other, &url)?;
                ensure!(body.contains(&format!("hostname: {pod}")), "{other} -> {url}: {body}");
            }
        }
    }
    // Pod to pod across nodes: from the first pod's namespace to the others.
    let netns: Vec<String> = run("ip", &["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("flbpod-"))
        .map(str::to_string)
        .collect();
    ensure!(netns.len() >= 3, "pod namespaces: {netns:?}");
    let from = netns.iter().find(|n| n.starts_with("flbpod-1-")).context("no pod namespace on node-1")?;
    for p in pods.iter().filter(|p| p["spec"]["nodeName"] != "node-1") {
        let ip = p["status"]["podIP"].as_str().unwrap_or_default();
        let body = lab.curl(from, &format!("http://{ip}/"))?;
        ensure!(body.contains(&name(p)), "pod on node-1 -> {ip}: {body}");
    }
    Ok(())
}

fn host_network_pod(lab: &Lab) -> Result<()> {
    lab.apply(
        r#"
apiVersion: v1
kind: Pod
metadata:
  name: hostnet
  labels: {app: hostnet}
spec:
  hostNetwork: true
  nodeName: node-2
  containers:
  - name: web
    image: alicek106/rr-test:echo-hostname
    ports:
    - containerPort: 8081
    readinessProbe:
      tcpSocket:
        port: 8081
      periodSeconds: 1
"#,
    )?;
    wait_for("the host-network pod Ready", Duration::from_secs(30), || {
        Ok(lab.pods("app=hostnet")?.first().filter(|p| pod_ready(p)).map(|_| ()))
    })?;
    let p = lab.pods("app=hostnet")?.remove(0);
    ensure!(p["status"]["podIP"] == "192.0.2.12", "host-network pod IP: {}", p["status"]["podIP"]);
    let body = lab.curl("client", "http://192.0.2.12:8081/")?;
    ensure!(body.contains("hostname: hostnet"), "{body}");
    lab.kubectl(&["delete", "pod", "hostnet", "--wait=true", "--timeout=30s"])?;
    Ok(())
}

fn cordoned_node_gets_no_new_pods(lab: &Lab) -> Result<()> {
    let before: BTreeSet<String> =
        lab.pods("app=webserver")?.iter().filter(|p| p["spec"]["nodeName"] == "node-1").map(name).collect();
    lab.kubectl(&["cordon", "node-1"])?;
    lab.kubectl(&["scale", "deployment/hostname", "--replicas=7"])?;
    let pods = wait_for("7 pods Ready", Duration::from_secs(60), || {
        let pods = lab.pods("app=webserver")?;
        Ok((pods.len() == 7 && pods.iter().all(pod_ready)).then_some(pods))
    })?;
    let on_node1: BTreeSet<String> = pods.iter().filter(|p| p["spec"]["nodeName"] == "node-1").map(name).collect();
    ensure!(on_node1 == before, "new pods landed on the cordoned node-1: {on_node1:?} (before {before:?})");
    lab.kubectl(&["uncordon", "node-1"])?;
    lab.kubectl(&["scale", "deployment/hostname", "--replicas=3"])?;
    wait_for("back to 3 pods", Duration::from_secs(60), || Ok((lab.pods("app=webserver")?.len() == 3).then_some(())))
}

fn slice_ready(lab: &Lab, service: &str, ip: &str) -> Result<Option<bool>> {
    let slices =
        lab.kubectl_json(&["get", "endpointslices", "-l", &format!("kubernetes.io/service-name={service}")])?;
    Ok(slices["items"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .find(|e| e["addresses"].as_array().is_some_and(|a| a.iter().any(|x| x == ip)))
        .map(|e| e["conditions"]["ready"] == true))
}

fn readiness_probe(lab: &Lab) -> Result<()> {
    let flag = std::env::temp_dir().join(format!("ferrolb-e2e-ready-{}", std::process::id()));
    std::fs::write(&flag, "")?;
    let flag_s = flag.display().to_string();
    lab.apply(&format!(
        r#"
apiVersion: v1
kind: Pod
metadata:
  name: probed
  labels: {{app: probed}}
spec:
  containers:
  - name: web
    image: alicek106/rr-test:echo-hostname
    ports:
    - containerPort: 80
    readinessProbe:
      exec:
        command: [test, -e, "{flag_s}"]
      periodSeconds: 1
      failureThreshold: 1
---
apiVersion: v1
kind: Service
metadata:
  name: probed
spec:
  selector: {{app: probed}}
  ports:
  - port: 80
"#
    ))?;
    let ip = wait_for("the probed pod Ready", Duration::from_secs(30), || {
        Ok(lab
            .pods("app=probed")?
            .first()
            .filter(|p| pod_ready(p))
            .and_then(|p| p["status"]["podIP"].as_str().map(str::to_string)))
    })?;
    wait_for("the pod ready in its EndpointSlice", Duration::from_secs(30), || {
        Ok((slice_ready(lab, "probed", &ip)? == Some(true)).then_some(()))
    })?;
    // The probe starts failing: the pod leaves the ready endpoints.
    std::fs::remove_file(&flag)?;
    let t = Instant::now();
    wait_for("the pod not ready in its EndpointSlice", Duration::from_secs(30), || {
        Ok((slice_ready(lab, "probed", &ip)? == Some(false)).then_some(()))
    })?;
    println!("  probe failing -> endpoint not ready: {:.1} s", t.elapsed().as_secs_f64());
    // And comes back when it passes again.
    std::fs::write(&flag, "")?;
    wait_for("the pod ready again", Duration::from_secs(30), || {
        Ok((slice_ready(lab, "probed", &ip)? == Some(true)).then_some(()))
    })?;
    let _ = std::fs::remove_file(&flag);
    lab.kubectl(&["delete", "pod/probed", "service/probed", "--wait=true", "--timeout=30s"])?;
    Ok(())
}

/// The namespace of a (non host-network) pod, found by its address.
fn pod_netns(lab: &Lab, pod_ip: &str) -> Result<String> {
    for ns in run("ip", &["netns", "list"])?.lines().filter_map(|l| l.split_whitespace().next()) {
        if ns.starts_with("flbpod-") && lab.exec(ns, &["ip", "-4", "-o", "addr"])?.contains(&format!(" {pod_ip}/")) {
            return Ok(ns.to_string());
        }
    }
    bail!("no pod namespace holds {pod_ip}")
}

fn crashed_container_restarts(lab: &Lab) -> Result<()> {
    let p = lab.pods("app=webserver")?.into_iter().next().context("no demo pod")?;
    let pod = name(&p);
    let ip = p["status"]["podIP"].as_str().unwrap_or_default().to_string();
    let ns = pod_netns(lab, &ip)?;
    let pids = run("ip", &["netns", "pids", &ns])?;
    for pid in pids.split_whitespace() {
        run("kill", &["-9", pid])?;
    }
    wait_for("the container restarted and Ready", Duration::from_secs(30), || {
        let v = lab.kubectl_json(&["get", "pod", &pod])?;
        let restarts = v["status"]["containerStatuses"][0]["restartCount"].as_u64().unwrap_or(0);
        Ok((restarts >= 1 && pod_ready(&v)).then_some(()))
    })?;
    let body = lab.curl("client", &format!("http://{ip}/"))?;
    ensure!(body.contains(&pod), "after restart: {body}");
    Ok(())
}

fn unsupported_image(lab: &Lab) -> Result<()> {
    lab.apply(
        r#"
apiVersion: v1
kind: Pod
metadata:
  name: nginx
  labels: {app: nginx}
spec:
  containers:
  - name: web
    image: nginx:1.27
"#,
    )?;
    let ev = wait_for("an ImageNotSupported event", Duration::from_secs(30), || {
        let evs = lab.kubectl(&[
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=nginx,reason=ImageNotSupported",
            "-o",
            "jsonpath={.items[*].message}",
        ])?;
        Ok((!evs.is_empty()).then_some(evs))
    })?;
    ensure!(ev.contains("nginx:1.27") && ev.contains("alicek106/rr-test:echo-hostname"), "event says: {ev}");
    std::thread::sleep(Duration::from_secs(1));
    let p = lab.kubectl_json(&["get", "pod", "nginx"])?;
    ensure!(p["status"]["phase"] == "Pending", "phase {}", p["status"]["phase"]);
    ensure!(
        p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == "ImageNotSupported",
        "container state: {}",
        p["status"]["containerStatuses"][0]["state"]
    );
    lab.kubectl(&["delete", "pod", "nginx", "--wait=true", "--timeout=30s"])?;
    Ok(())
}

fn ferrolb_image(lab: &Lab) -> Result<()> {
    lab.apply(
        r#"
apiVersion: v1
kind: ServiceAccount
metadata:
  name: lab-e2e
---
apiVersion: v1
kind: Pod
metadata:
  name: whoami
spec:
  serviceAccountName: lab-e2e
  restartPolicy: Never
  containers:
  - name: whoami
    image: ghcr.io/ferrolb/ferrolb-lab:dev
    args: [whoami]
"#,
    )?;
    let p = wait_for("the whoami pod to finish", Duration::from_secs(30), || {
        let p = lab.kubectl_json(&["get", "pod", "whoami"])?;
        Ok(matches!(p["status"]["phase"].as_str(), Some("Succeeded" | "Failed")).then_some(p))
    })?;
    let node = p["spec"]["nodeName"].as_str().unwrap_or_default();
    let pods_dir = format!("/run/ferrolb-lab/nodes/{node}/pods");
    let dir = std::fs::read_dir(&pods_dir)?
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().starts_with("default_whoami_"))
        .with_context(|| format!("no whoami pod directory in {pods_dir}"))?;
    let log = std::fs::read_to_string(dir.path().join("whoami.log"))?;
    ensure!(p["status"]["phase"] == "Succeeded", "whoami failed: {log}");
    ensure!(log.contains("user: system:serviceaccount:default:lab-e2e"), "whoami said: {log}");
    lab.kubectl(&["delete", "pod/whoami", "serviceaccount/lab-e2e", "--wait=true", "--timeout=30s"])?;
    Ok(())
}

/// A LoadBalancer Service given its addresses by someone else (here: by hand), answered for
/// by a plain `ferrolb-speaker respond` on node-2, with no ferrolb CRD installed.
fn drill_without_ferrolb(lab: &Lab) -> Result<()> {
    lab.lab(&["up"])?;
    ensure!(lab.kubectl(&["get", "crd", "servicel2statuses.ferrolb.io"]).is_err(), "this case needs no ferrolb CRDs");
    lab.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: other-lb}\nspec:\n  type: LoadBalancer\n  selector: {app: webserver}\n  ports: [{port: 80, targetPort: 80}]\n",
    )?;
    lab.kubectl(&[
        "patch",
        "service",
        "other-lb",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"loadBalancer":{"ingress":[{"ip":"192.0.2.240"},{"ip":"2001:db8:1::f0"}]}}}"#,
    ])?;
    let speaker = ferrolb_e2e::lab_bin()?.with_file_name("ferrolb-speaker");
    let mut responder = std::process::Command::new("nsenter")
        .args(["--net=/run/netns/node-2", "--"])
        .arg(&speaker)
        .args(["respond", "--ip", "192.0.2.240", "--ip", "2001:db8:1::f0", "--interface", "eth0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", speaker.display()))?;
    let r = (|| -> Result<()> {
        std::thread::sleep(Duration::from_millis(500));
        let drill = |args: &[&str]| -> Result<serde_json::Value> {
            let mut all = vec!["drill"];
            all.extend_from_slice(args);
            all.extend_from_slice(&["--rate", "10", "--seconds", "1", "--json"]);
            Ok(serde_json::from_str(&lab.lab(&all)?)?)
        };
        for family in [&[][..], &["--ipv6"][..]] {
            let mut args = vec!["cordon", "--announcer", "default/other-lb"];
            args.extend_from_slice(family);
            let o = drill(&args)?;
            ensure!(o["node"] == "node-2" && o["announcer_before"] == "node-2", "drill {args:?}: {o}");
            lab.lab(&["drill", "uncordon", "node-2"])?;
        }
        // A named node: the announcer is still told, from the wire.
        let o = drill(&["cordon", "node-1", "--service", "default/other-lb"])?;
        ensure!(o["node"] == "node-1" && o["announcer_before"] == "node-2", "drill cordon node-1: {o}");
        ensure!(o["requests"].as_u64().unwrap_or(0) > 0, "no load was sent: {o}");
        lab.lab(&["drill", "uncordon", "node-1"])?;
        Ok(())
    })();
    let _ = responder.kill();
    let _ = responder.wait();
    let _ = lab.lab(&["drill", "uncordon", "node-1"]);
    let _ = lab.lab(&["drill", "uncordon", "node-2"]);
    lab.kubectl(&["delete", "service", "other-lb", "--wait=true"])?;
    r
}

fn ipv4_only_lab(lab: &Lab) -> Result<()> {
    lab.lab(&["down"])?;
    let t = Instant::now();
    lab.lab(&["up", "--nodes", "2", "--ip-family", "ipv4"])?;
    println!("  up (2 nodes, ipv4): {:.1} s", t.elapsed().as_secs_f64());
    let nodes = lab.kubectl_json(&["get", "nodes"])?;
    let items = nodes["items"].as_array().cloned().unwrap_or_default();
    ensure!(items.len() == 2, "{} nodes", items.len());
    for n in &items {
        ensure!(n["spec"]["podCIDRs"].as_array().map(|a| a.len()) == Some(1), "pod CIDRs {}", n["spec"]["podCIDRs"]);
    }
    lab.apply(DEMO)?;
    let pods = wait_for("3 demo pods Ready", Duration::from_secs(60), || {
        let pods = lab.pods("app=webserver")?;
        Ok((pods.len() == 3 && pods.iter().all(pod_ready)).then_some(pods))
    })?;
    for p in &pods {
        ensure!(p["status"]["podIPs"].as_array().map(|a| a.len()) == Some(1), "pod IPs {}", p["status"]["podIPs"]);
        let ip = p["status"]["podIP"].as_str().unwrap_or_default();
        ensure!(lab.curl("client", &format!("http://{ip}/"))?.contains(&name(p)), "curl {ip}");
    }
    ensure!(
        !lab.exec("client", &["ip", "-6", "addr", "show", "scope", "global"])?.contains("2001:db8"),
        "client has IPv6"
    );
    Ok(())
}

fn deleted_pod_cleaned(lab: &Lab) -> Result<()> {
    let p = lab.pods("app=webserver")?.into_iter().next().context("no demo pod")?;
    let pod = name(&p);
    let ip = p["status"]["podIP"].as_str().unwrap_or_default().to_string();
    let ns = pod_netns(lab, &ip)?;
    let pids = run("ip", &["netns", "pids", &ns])?;
    let t = Instant::now();
    lab.kubectl(&["delete", "pod", &pod, "--wait=true", "--timeout=40s"])?;
    println!("  pod deleted in {:.1} s", t.elapsed().as_secs_f64());
    ensure!(!run("ip", &["netns", "list"])?.contains(&ns), "namespace {ns} is still there");
    for pid in pids.split_whitespace() {
        ensure!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "process {pid} of {pod} still runs");
    }
    // The Deployment replaces it.
    wait_for("3 demo pods Ready again", Duration::from_secs(60), || {
        let pods = lab.pods("app=webserver")?;
        Ok((pods.len() == 3 && pods.iter().all(pod_ready)).then_some(()))
    })
}

fn down_leaves_nothing(lab: &Lab) -> Result<()> {
    let t = Instant::now();
    lab.lab(&["down"])?;
    println!("  down: {:.1} s", t.elapsed().as_secs_f64());
    let ns = run("ip", &["netns", "list"])?;
    let lab_ns: Vec<&str> = ns
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| *n == "client" || *n == "control-plane" || n.starts_with("node-") || n.starts_with("flbpod-"))
        .collect();
    ensure!(lab_ns.is_empty(), "namespaces left: {lab_ns:?}");
    let links = run("ip", &["-o", "link"])?;
    ensure!(!links.contains("flb-"), "links left:\n{links}");
    let procs = run("ps", &["-eo", "args"])?;
    let stray: Vec<&str> = procs
        .lines()
        .filter(|l| l.contains("/run/ferrolb-lab") || l.contains("ferrolb-lab agent") || l.contains("hostname-server"))
        .collect();
    ensure!(stray.is_empty(), "processes left: {stray:?}");
    ensure!(!std::path::Path::new("/run/ferrolb-lab").exists(), "/run/ferrolb-lab is left");
    let tables = run("nft", &["list", "tables"])?;
    ensure!(!tables.contains("ferrolb"), "nft tables left: {tables}");
    let routes = run("ip", &["route"])?;
    ensure!(!routes.contains("198.18."), "routes left: {routes}");
    // Twice is harmless.
    lab.lab(&["down"])?;
    Ok(())
}

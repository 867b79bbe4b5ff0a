//! The speaker end to end in the lab: exactly one node answers ARP for each LoadBalancer
//! address, only nodes with endpoints under `Local`, and the address moves when its node is
//! cordoned or its speaker dies, but not when the API server goes away.
//!
//! Needs root (it brings up its own lab); fails loudly without it.

use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use ferrolb_e2e::{Case, Controller, Lab, Speaker, announcer, run_suite, settled_announcer, wait_announcer, wait_for};

static SPEAKERS: Mutex<Vec<Speaker>> = Mutex::new(Vec::new());
static CONTROLLER: Mutex<Option<Controller>> = Mutex::new(None);

fn main() -> ExitCode {
    let cases: &[Case] = &[
        ("setup_lab_controller_and_three_speakers", setup),
        ("a_loadbalancer_address_is_answered_by_exactly_one_node", exactly_one),
        ("local_policy_announces_only_from_nodes_with_endpoints", local_policy),
        ("the_announcer_writes_a_servicel2status_object", status_object),
        ("cordoning_the_announcer_moves_the_address", cordon),
        ("killing_the_announcers_speaker_moves_the_address", kill_speaker),
        ("metrics_count_requests_answers_and_takeovers", metrics),
        ("a_missing_membership_secret_is_a_clear_error", missing_secret),
        ("stopping_the_api_server_changes_nothing_on_the_wire", api_down),
    ];
    let code = run_suite("speaker", cases);
    SPEAKERS.lock().map(|mut s| s.clear()).ok();
    code
}

fn setup(lab: &Lab) -> Result<()> {
    lab.lab(&["up"])?;
    ferrolb_e2e::ferrolb_system(lab, &["192.0.2.200-192.0.2.250", "2001:db8:1::c8-2001:db8:1::fa"])?;
    lab.kubectl(&["apply", "-f", concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/demo/hostname.yaml")])?;
    lab.kubectl(&["rollout", "status", "deployment/hostname", "--timeout=60s"])?;
    *CONTROLLER.lock().unwrap_or_else(|e| e.into_inner()) = Some(Controller::start("ctl", 17475, &[])?);
    let mut speakers = SPEAKERS.lock().unwrap_or_else(|e| e.into_inner());
    for i in 1..=3 {
        speakers.push(Speaker::start(i)?);
    }
    Ok(())
}

fn lb(lab: &Lab, name: &str, local: bool, selector: &str) -> Result<String> {
    lab.apply(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  type: LoadBalancer\n  externalTrafficPolicy: {}\n  selector: {{{selector}}}\n  ports: [{{port: 80, targetPort: 80}}]\n",
        if local { "Local" } else { "Cluster" }
    ))?;
    wait_for(&format!("an address for {name}"), Duration::from_secs(20), || {
        let v = lab.kubectl_json(&["get", "service", name])?;
        Ok(v["status"]["loadBalancer"]["ingress"][0]["ip"].as_str().map(str::to_string))
    })
}

fn exactly_one(lab: &Lab) -> Result<()> {
    let ip = lb(lab, "web", false, "app: webserver")?;
    let node = wait_announcer(&ip, None)?;
    let again = announcer(&ip, 3)?.context("no answer")?;
    ensure!(again == node, "announcer changed from {node} to {again}");
    println!("  {ip} announced by {node}");
    Ok(())
}

fn local_policy(lab: &Lab) -> Result<()> {
    lab.apply(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: single}\nspec:\n  replicas: 1\n  selector: {matchLabels: {app: single}}\n  template:\n    metadata: {labels: {app: single}}\n    spec:\n      containers:\n      - {name: web, image: alicek106/rr-test:echo-hostname, ports: [{containerPort: 80}]}\n",
    )?;
    lab.kubectl(&["rollout", "status", "deployment/single", "--timeout=60s"])?;
    let pod = lab.pods("app=single")?.into_iter().next().context("no pod")?;
    let pod_node = pod["spec"]["nodeName"].as_str().unwrap_or_default().to_string();
    let ip = lb(lab, "single-local", true, "app: single")?;
    let node = wait_announcer(&ip, None)?;
    ensure!(node == pod_node, "Local service announced by {node}, but its only endpoint is on {pod_node}");
    Ok(())
}

/// `(node, interfaces)` of the ServiceL2Status of `service` (in `default`), if there is one.
fn l2_status(lab: &Lab, service: &str) -> Result<Option<(String, Vec<String>)>> {
    let v = lab.kubectl_json(&["get", "servicel2statuses", "-n", "ferrolb-system"])?;
    let items = v["items"].as_array().cloned().unwrap_or_default();
    Ok(items.iter().find(|o| o["metadata"]["name"] == format!("default.{service}")).map(|o| {
        let st = &o["status"];
        let ifaces = st["interfaces"].as_array().cloned().unwrap_or_default();
        (
            st["node"].as_str().unwrap_or_default().to_string(),
            ifaces.iter().filter_map(|i| i["name"].as_str().map(str::to_string)).collect(),
        )
    }))
}

/// Waits for the ServiceL2Status of `service` to name `node`.
fn wait_l2_status(lab: &Lab, service: &str, node: &str) -> Result<Vec<String>> {
    wait_for(&format!("ServiceL2Status default.{service} to name {node}"), Duration::from_secs(20), || {
        Ok(l2_status(lab, service)?.filter(|(n, _)| n == node).map(|(_, i)| i))
    })
}

/// The notes of the `nodeAssigned` Events on Service `service`.
fn node_assigned(lab: &Lab, service: &str) -> Result<Vec<String>> {
    let v = lab.kubectl_json(&[
        "get",
        "events",
        "--field-selector",
        &format!("involvedObject.name={service},reason=nodeAssigned"),
    ])?;
    Ok(v["items"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["message"].as_str().map(str::to_string)).collect())
        .unwrap_or_default())
}

fn status_object(lab: &Lab) -> Result<()> {
    let ip = web_ip(lab)?;
    let node = settled_announcer(&ip)?;
    let ifaces = wait_l2_status(lab, "web", &node)?;
    ensure!(ifaces == ["eth0"], "interfaces {ifaces:?}, expected [eth0]");
    let want = format!("announcing from node \"{node}\" with protocol \"layer2\"");
    wait_for("a nodeAssigned Event", Duration::from_secs(10), || {
        Ok(node_assigned(lab, "web")?.contains(&want).then_some(()))
    })?;
    // One object per announced service: the Local one too, and none for a service without one.
    let all = lab.kubectl_json(&["get", "servicel2statuses", "-n", "ferrolb-system"])?;
    let names: Vec<_> = all["items"].as_array().into_iter().flatten().map(ferrolb_e2e::name).collect();
    ensure!(names == ["default.single-local", "default.web"], "objects {names:?}");
    println!("  default.web: {node} on {ifaces:?}; Event: {want}");
    Ok(())
}

fn web_ip(lab: &Lab) -> Result<String> {
    let v = lab.kubectl_json(&["get", "service", "web"])?;
    v["status"]["loadBalancer"]["ingress"][0]["ip"].as_str().map(str::to_string).context("web has no address")
}

fn cordon(lab: &Lab) -> Result<()> {
    let ip = web_ip(lab)?;
    let before = settled_announcer(&ip)?;
    let t = Instant::now();
    lab.kubectl(&["cordon", &before])?;
    let after = wait_announcer(&ip, Some(&before))?;
    println!("  cordon {before}: {ip} moved to {after} ({:.2} s by arping)", t.elapsed().as_secs_f64());
    wait_l2_status(lab, "web", &after)?;
    let want = format!("announcing from node \"{after}\" with protocol \"layer2\"");
    wait_for("the takeover's nodeAssigned Event", Duration::from_secs(10), || {
        Ok(node_assigned(lab, "web")?.contains(&want).then_some(()))
    })?;
    // Uncordoned, the node ranks first again and takes the address back.
    lab.kubectl(&["uncordon", &before])?;
    let back = settled_announcer(&ip)?;
    ensure!(back == before, "after uncordon {ip} settled on {back}, not {before}");
    wait_l2_status(lab, "web", &before)?;
    Ok(())
}

fn kill_speaker(lab: &Lab) -> Result<()> {
    let ip = web_ip(lab)?;
    let before = settled_announcer(&ip)?;
    let i: usize = before.trim_start_matches("node-").parse()?;
    let t = Instant::now();
    SPEAKERS.lock().unwrap_or_else(|e| e.into_inner())[i - 1].kill();
    let after = wait_announcer(&ip, Some(&before))?;
    println!("  SIGKILL speaker on {before}: {ip} moved to {after} ({:.2} s by arping)", t.elapsed().as_secs_f64());
    // Restarted, it rejoins the membership and takes the address back.
    SPEAKERS.lock().unwrap_or_else(|e| e.into_inner())[i - 1].restart()?;
    let back = settled_announcer(&ip)?;
    ensure!(back == before, "after the restart {ip} settled on {back}, not {before}");
    let _ = lab;
    Ok(())
}

/// The `/metrics` text of node-`i`'s speaker.
fn speaker_metrics(i: u8) -> Result<String> {
    ferrolb_e2e::run(
        "ip",
        &[
            "netns",
            "exec",
            &format!("node-{i}"),
            "curl",
            "-sS",
            "--max-time",
            "3",
            &format!("http://192.0.2.{}:7472/metrics", 10 + i),
        ],
    )
}

/// The value of the first sample whose line starts with `prefix` (0 when absent).
fn sample(metrics: &str, prefix: &str) -> f64 {
    metrics.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(0.0)
}

fn metrics(lab: &Lab) -> Result<()> {
    let ip = web_ip(lab)?;
    let node = settled_announcer(&ip)?;
    announcer(&ip, 2)?;
    let i: u8 = node.trim_start_matches("node-").parse()?;
    let m = speaker_metrics(i)?;
    let announced = format!("ferrolb_speaker_announced{{service=\"default/web\",node=\"{node}\",ip=\"{ip}\"}}");
    ensure!(sample(&m, &announced) == 1.0, "{announced} missing:\n{m}");
    let ip_label = format!("{{ip=\"{ip}\"}}");
    ensure!(sample(&m, &format!("ferrolb_l2_requests_received_total{ip_label}")) >= 2.0, "requests:\n{m}");
    ensure!(sample(&m, &format!("ferrolb_l2_responses_sent_total{ip_label}")) >= 2.0, "responses:\n{m}");
    ensure!(sample(&m, &format!("ferrolb_l2_gratuitous_sent_total{ip_label}")) >= 1.0, "gratuitous:\n{m}");
    // The cordon and crash drills moved the address: the nodes that took it counted takeovers
    // (a restarted speaker starts its counts afresh, so look at all of them).
    let (mut count, mut sum) = (0.0, 0.0);
    for n in 1..=3 {
        let m = speaker_metrics(n)?;
        count += sample(&m, "ferrolb_speaker_takeover_seconds_count");
        sum += sample(&m, "ferrolb_speaker_takeover_seconds_sum");
    }
    ensure!(count >= 1.0, "no takeover was counted on any node");
    println!("  takeovers counted: {count}, mean change -> first gratuitous packet {:.1} ms", 1000.0 * sum / count);
    let _ = lab;
    Ok(())
}

fn missing_secret(lab: &Lab) -> Result<()> {
    let out = ferrolb_e2e::output(
        "env",
        &[
            "KUBECONFIG=/run/ferrolb-lab/pki/admin.kubeconfig",
            "nsenter",
            "--net=/run/netns/node-1",
            "--",
            ferrolb_e2e::lab_bin()?.with_file_name("ferrolb-speaker").to_str().context("path")?,
            "run",
            "--node=node-1",
            "--node-ip=192.0.2.11",
            "--membership-port=17946",
            "--metrics-addr=127.0.0.1:17472",
            "--membership-secret=no-such-secret",
        ],
    )?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "started without its Secret");
    ensure!(err.contains("membership Secret ferrolb-system/no-such-secret"), "unclear error: {err}");
    let _ = lab;
    Ok(())
}

fn api_down(lab: &Lab) -> Result<()> {
    let ip = web_ip(lab)?;
    let before = settled_announcer(&ip)?;
    let pid = std::fs::read_to_string("/run/ferrolb-lab/pids/kube-apiserver.pid")?;
    ferrolb_e2e::run("kill", &["-9", pid.trim()])?;
    for _ in 0..5 {
        std::thread::sleep(Duration::from_secs(1));
        let now = announcer(&ip, 1)?;
        ensure!(
            now.as_deref() == Some(before.as_str()),
            "with the API server down, {ip} is answered by {now:?}, was {before}"
        );
    }
    lab.lab(&["up"])?;
    Ok(())
}

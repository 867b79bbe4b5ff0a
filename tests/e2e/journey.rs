//! The user's journey end to end, as `make lab` runs it: `helm install` of the real chart with
//! the real helm, the demo, curl, the failure drills under both traffic policies and both
//! families, `helm upgrade`, and `helm uninstall`.
//!
//! Needs root (it brings up its own lab); fails loudly without it.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ferrolb_e2e::{Case, Lab, k8s_bin_dir, run_suite, wait_for};
use serde_json::Value;

fn main() -> ExitCode {
    let cases: &[Case] = &[
        ("make_lab_installs_the_chart_and_the_demo_answers", make_lab),
        ("ferrolb_runs_as_the_charts_pods", pods),
        ("cordon_drills_move_the_address_and_keep_traffic", cordon_drills),
        ("crash_drills_move_the_address", crash_drills),
        ("helm_upgrade_keeps_every_address_and_drops_no_request", upgrade),
        ("helm_uninstall_removes_every_object_table_and_announcement", uninstall),
    ];
    run_suite("journey", cases)
}

const NS: &str = "ferrolb-system";
const SERVICES: [(&str, &str); 2] = [("hostname-svc-lb", "Cluster"), ("hostname-svc-lb-local", "Local")];

fn helm(args: &[&str]) -> Result<String> {
    let helm = k8s_bin_dir()?.join("helm");
    let mut full = vec!["--kubeconfig", "/run/ferrolb-lab/kubeconfig"];
    full.extend_from_slice(args);
    ferrolb_e2e::run(helm.to_str().context("helm path")?, &full)
}

fn make_lab(lab: &Lab) -> Result<()> {
    let out = std::process::Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../hack/lab-demo.sh"))
        .env("FERROLB_LAB_BIN", lab.bin())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "make lab's demo failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr).lines().rev().take(20).collect::<Vec<_>>().join("\n")
    );
    // Both families of both LoadBalancer services, NodePort 31000 on three nodes, the ClusterIP.
    let answered = text.lines().filter(|l| l.contains("curl http") && l.contains("hostname:")).count();
    ensure!(answered == 8, "{answered} of 8 curls answered:\n{text}");
    println!(
        "{}",
        text.lines().filter(|l| l.contains("curl http") || l.starts_with("== ready")).collect::<Vec<_>>().join("\n")
    );
    Ok(())
}

fn ready_pods(lab: &Lab, selector: &str) -> Result<usize> {
    let v = lab.kubectl_json(&["get", "pods", "-n", NS, "-l", selector])?;
    Ok(v["items"].as_array().map(|a| a.iter().filter(|p| ferrolb_e2e::pod_ready(p)).count()).unwrap_or(0))
}

fn pods(lab: &Lab) -> Result<()> {
    ensure!(ready_pods(lab, "app.kubernetes.io/component=controller")? == 2, "not 2 controller pods Ready");
    ensure!(ready_pods(lab, "app.kubernetes.io/component=speaker")? == 3, "not 3 speaker pods Ready");
    let statuses = lab.kubectl_json(&["get", "servicel2statuses", "-n", NS])?;
    let n = statuses["items"].as_array().map(Vec::len).unwrap_or(0);
    ensure!(n == 2, "{n} ServiceL2Statuses, expected one per LoadBalancer service");
    Ok(())
}

fn announcer(lab: &Lab, service: &str) -> Result<Option<String>> {
    let v = lab.kubectl_json(&["get", "servicel2statuses", "-n", NS])?;
    Ok(v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|o| o["metadata"]["name"] == format!("default.{service}"))
        .and_then(|o| o["status"]["node"].as_str().map(str::to_string)))
}

fn drill(lab: &Lab, action: &str, service: &str, ipv6: bool) -> Result<Value> {
    let mut args = vec!["drill", action, "--announcer", service, "--json", "--seconds", "6"];
    if ipv6 {
        args.push("--ipv6");
    }
    let out = lab.lab(&args)?;
    serde_json::from_str(out.trim()).with_context(|| format!("drill output {out:?}"))
}

/// Waits until the lab is whole again: every pod of ferrolb and the demo Ready, and `service`
/// announced by `node`.
fn settle(lab: &Lab, service: &str, node: &str) -> Result<()> {
    wait_for("ferrolb and the demo Ready again", Duration::from_secs(120), || {
        let speakers = ready_pods(lab, "app.kubernetes.io/component=speaker")?;
        let demo = lab.pods("app=webserver")?.iter().filter(|p| ferrolb_e2e::pod_ready(p)).count();
        Ok((speakers == 3 && demo == 3).then_some(()))
    })?;
    wait_for(&format!("{service} announced by {node} again"), Duration::from_secs(60), || {
        Ok((announcer(lab, service)?.as_deref() == Some(node)).then_some(()))
    })
}

fn show(d: &Value, policy: &str, family: &str) -> String {
    format!(
        "{:<6} {policy:<7} {family}: {} -> {}, {} requests, {} failed, longest gap {} ms",
        d["drill"].as_str().unwrap_or_default(),
        d["announcer_before"].as_str().unwrap_or("-"),
        d["announcer_after"].as_str().unwrap_or("-"),
        d["requests"],
        d["failed"],
        d["max_gap_ms"]
    )
}

fn check_moved(d: &Value) -> Result<()> {
    ensure!(d["announcer_after"].is_string(), "nobody announces after the drill: {d}");
    ensure!(d["announcer_after"] != d["announcer_before"], "the announcer did not change: {d}");
    ensure!(d["requests"].as_u64().unwrap_or(0) >= 500, "too few requests: {d}");
    Ok(())
}

/// `action` against the announcer of each LoadBalancer service, for each family, each undone
/// by `undo` before the next.
fn drills(lab: &Lab, action: &str, undo: &str) -> Result<()> {
    for (service, policy) in SERVICES {
        for ipv6 in [false, true] {
            let d = drill(lab, action, service, ipv6)?;
            println!("  {}", show(&d, policy, if ipv6 { "IPv6" } else { "IPv4" }));
            let before = d["announcer_before"].as_str().unwrap_or_default().to_string();
            lab.lab(&["drill", undo, &before])?;
            check_moved(&d)?;
            settle(lab, service, &before)?;
        }
    }
    Ok(())
}

fn cordon_drills(lab: &Lab) -> Result<()> {
    drills(lab, "cordon", "uncordon")
}

fn crash_drills(lab: &Lab) -> Result<()> {
    drills(lab, "crash", "restore")
}

fn external_ips(lab: &Lab) -> Result<Vec<String>> {
    let mut ips = Vec::new();
    for (s, _) in SERVICES {
        let v = lab.kubectl_json(&["get", "service", s])?;
        for i in v["status"]["loadBalancer"]["ingress"].as_array().into_iter().flatten() {
            ips.push(i["ip"].as_str().unwrap_or_default().to_string());
        }
    }
    Ok(ips)
}

/// `helm upgrade --reuse-values --set <value>` under 100 req/s to the first EXTERNAL-IP for
/// `seconds`: the load's report.
fn upgrade_under_load(lab: &Lab, value: &str, seconds: u32) -> Result<Value> {
    let ip = external_ips(lab)?.first().context("no EXTERNAL-IP")?.clone();
    let bin = lab.bin().to_string();
    let load = std::thread::spawn(move || {
        let secs = seconds.to_string();
        ferrolb_e2e::run("ip", &["netns", "exec", "client", &bin, "load", &format!("http://{ip}/"), "--seconds", &secs])
    });
    std::thread::sleep(Duration::from_secs(2));
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/chart");
    let upgraded = helm(&["upgrade", "ferrolb", chart, "-n", NS, "--reuse-values", "--set", value, "--wait"]);
    let report = load.join().map_err(|_| anyhow::anyhow!("load panicked"))??;
    upgraded?;
    Ok(serde_json::from_str(report.trim())?)
}

fn upgrade(lab: &Lab) -> Result<()> {
    let before = external_ips(lab)?;
    // The controller's Deployment rolls.
    let report = upgrade_under_load(lab, "controller.logLevel=debug", 25)?;
    ensure!(external_ips(lab)? == before, "addresses changed in the controller's upgrade");
    ensure!(report["failed"] == 0, "requests failed through the controller's upgrade: {report}");
    println!(
        "  upgrade, controller rolled: {} requests, 0 failed, longest gap {} ms",
        report["requests"], report["max_gap_ms"]
    );
    // The speakers' DaemonSet rolls, one node at a time: each announcer hands its addresses
    // over and takes them back.
    let report = upgrade_under_load(lab, "speaker.logLevel=debug", 60)?;
    let after = external_ips(lab)?;
    ensure!(after == before, "addresses changed in the speakers' upgrade: {before:?} -> {after:?}");
    ensure!(report["failed"] == 0, "requests failed through the speakers' upgrade: {report}");
    println!(
        "  upgrade, speakers rolled: {} requests, 0 failed, longest gap {} ms, addresses kept {after:?}",
        report["requests"], report["max_gap_ms"]
    );
    let rev = helm(&["history", "ferrolb", "-n", NS, "-o", "json"])?;
    ensure!(rev.contains("\"revision\":3"), "no third revision: {rev}");
    Ok(())
}

fn uninstall(lab: &Lab) -> Result<()> {
    let ips = external_ips(lab)?;
    helm(&["uninstall", "ferrolb", "-n", NS, "--wait", "--timeout", "120s"])?;
    wait_for("ferrolb's pods gone", Duration::from_secs(60), || {
        let v = lab.kubectl_json(&["get", "pods", "-n", NS])?;
        Ok(v["items"].as_array().is_none_or(|a| a.is_empty()).then_some(()))
    })?;
    // The ServiceL2Statuses go with their owner, the DaemonSet, through the garbage collector.
    wait_for("no ferrolb objects left", Duration::from_secs(30), || {
        let left = lab.kubectl_json(&["get", "ipaddresspools,l2advertisements,servicel2statuses", "-A"])?;
        Ok(left["items"].as_array().is_none_or(|a| a.is_empty()).then_some(()))
    })?;
    for n in 1..=3 {
        let tables = lab.exec(&format!("node-{n}"), &["nft", "list", "tables"])?;
        ensure!(!tables.contains("ferrolb"), "node-{n} still has {tables}");
    }
    for ip in ips.iter().filter(|ip| !ip.contains(':')) {
        ensure!(ferrolb_e2e::arping(ip, 2)?.is_empty(), "{ip} is still answered after the uninstall");
    }
    let procs = ferrolb_e2e::output("pgrep", &["-f", "ferrolb-(speaker|controller)"])?;
    ensure!(procs.stdout.is_empty(), "ferrolb processes left: {}", String::from_utf8_lossy(&procs.stdout));
    println!("  no pods, objects, tables, answers or processes of ferrolb left");
    Ok(())
}

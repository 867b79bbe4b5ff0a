//! Speaker benchmark (`make bench-speaker`): prints a table, asserts nothing.
//!
//! In the lab, with a controller and three speakers (release build):
//! 1. Takeover on the wire, 20 drills each for cordon and for SIGKILL of the announcer's
//!    speaker. The client sends a broadcast ARP request for the address every 5 ms and records
//!    every ARP reply with its time (`ferrolb-lab arp-probe`; `arping` cannot go below 1 s). The
//!    takeover is the gap from the last reply with the old node's MAC to the first with the new
//!    one (a gratuitous reply counts: the client's cache takes it); negative when both answered
//!    for a moment. Also the time from the command (cordon, kill) to that first new reply.
//! 2. ARP reply latency at 1000 requests/s: `arp-probe` at a 1 ms interval, request sent to
//!    reply received, in the client.
//! 3. The speaker's memory with 1000 announced addresses: 1000 more LoadBalancer Services, the
//!    other two speakers stopped, so node-1 announces them all.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use ferrolb_e2e::{Controller, Lab, Speaker, node_macs, run, settled_announcer, vm_hwm_kib, wait_for};

const DRILLS: usize = 20;

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// The client watching who answers for an address: `ferrolb-lab arp-probe`, a broadcast
/// who-has every 5 ms, each reply printed with its time.
struct WireProbe {
    log: std::path::PathBuf,
    child: Child,
}

/// `(time, MAC, round trip µs (None for a gratuitous reply))` of each line of an arp-probe.
fn parse_probe(text: &str) -> Vec<(f64, String, Option<u64>)> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let t: f64 = f.next()?.parse().ok()?;
            let mac = f.next()?.to_uppercase();
            Some((t, mac, f.next()?.parse().ok()))
        })
        .collect()
}

fn arp_probe(ip: &str, args: &[&str]) -> Result<Command> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", "client"]).arg(ferrolb_e2e::lab_bin()?).args(["arp-probe", ip]).args(args);
    Ok(cmd)
}

impl WireProbe {
    fn start(ip: &str) -> Result<Self> {
        let log = std::env::temp_dir().join("ferrolb-bench-arp.txt");
        let child = arp_probe(ip, &["--interval-us", "5000"])?
            .stdout(std::fs::File::create(&log)?)
            .stderr(Stdio::inherit())
            .spawn()?;
        let probe = WireProbe { log, child };
        wait_for(
            "the probe's first reply",
            Duration::from_secs(5),
            || Ok((!probe.replies().is_empty()).then_some(())),
        )?;
        Ok(probe)
    }

    /// `(time, MAC)` of every reply so far, MACs upper case.
    fn replies(&self) -> Vec<(f64, String)> {
        parse_probe(&std::fs::read_to_string(&self.log).unwrap_or_default())
            .into_iter()
            .map(|(t, m, _)| (t, m))
            .collect()
    }

    fn stop(mut self) -> Vec<(f64, String)> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.replies()
    }
}

/// One drill: `act` moves the address away from `old_mac`. Returns (wire gap, command → first
/// new reply), seconds.
fn drill(ip: &str, old_mac: &str, act: impl FnOnce() -> Result<()>) -> Result<(f64, f64)> {
    let probe = WireProbe::start(ip)?;
    std::thread::sleep(Duration::from_millis(300));
    let t0 = now();
    act()?;
    let found = wait_for("a reply from another MAC", Duration::from_secs(15), || {
        Ok(probe.replies().iter().any(|(_, m)| m != old_mac).then_some(()))
    });
    std::thread::sleep(Duration::from_millis(200));
    let replies = probe.stop();
    found?;
    let first_new = replies.iter().find(|(_, m)| m != old_mac).map(|(t, _)| *t).context("no new MAC")?;
    let last_old = replies.iter().filter(|(_, m)| m == old_mac).map(|(t, _)| *t).fold(f64::NAN, f64::max);
    if last_old.is_nan() {
        bail!("no reply from the old announcer {old_mac} before the drill");
    }
    Ok((first_new - last_old, first_new - t0))
}

fn summary(v: &mut [f64]) -> String {
    v.sort_by(f64::total_cmp);
    format!(
        "p50 {:7.1} ms  p99 {:7.1} ms  (min {:.1}, max {:.1}, n={})",
        pct(v, 0.5) * 1e3,
        pct(v, 0.99) * 1e3,
        v.first().copied().unwrap_or(f64::NAN) * 1e3,
        v.last().copied().unwrap_or(f64::NAN) * 1e3,
        v.len()
    )
}

fn web_ip(lab: &Lab) -> Result<String> {
    wait_for("an address for web", Duration::from_secs(20), || {
        let v = lab.kubectl_json(&["get", "service", "web"])?;
        Ok(v["status"]["loadBalancer"]["ingress"][0]["ip"].as_str().map(str::to_string))
    })
}

fn speaker_pid(node: &str) -> Result<u32> {
    let out = run("pgrep", &["-f", &format!("ferrolb-speaker run --node={node} ")])?;
    out.split_whitespace().next().and_then(|p| p.parse().ok()).context("speaker pid")
}

fn vm_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}

fn announced_count(node_index: u8) -> Result<usize> {
    let m = run(
        "ip",
        &[
            "netns",
            "exec",
            &format!("node-{node_index}"),
            "curl",
            "-sS",
            "--max-time",
            "5",
            &format!("http://192.0.2.{}:7472/metrics", 10 + node_index),
        ],
    )?;
    Ok(m.lines().filter(|l| l.starts_with("ferrolb_speaker_announced{")).count())
}

fn in_lab(lab: &Lab, rows: &mut Vec<(String, String)>) -> Result<()> {
    lab.lab(&["up"])?;
    ferrolb_e2e::ferrolb_system(lab, &["192.0.2.200-192.0.2.250", "198.18.64.0/22"])?;
    lab.kubectl(&["apply", "-f", concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/demo/hostname.yaml")])?;
    lab.kubectl(&["rollout", "status", "deployment/hostname", "--timeout=60s"])?;
    let _ctl = Controller::start("bench", 17475, &[])?;
    // The probe asks 200 and 1000 times a second from one MAC, beyond the per-asker answer rate
    // a speaker allows by default (50/s): raised here so every request is answered and timed.
    let answer_rate = [("FERROLB_L2_ANSWER_RATE", "5000")];
    let mut speakers: Vec<Speaker> =
        (1..=3).map(|i| Speaker::start_with_env(i, &answer_rate)).collect::<Result<_>>()?;
    lab.apply("apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  type: LoadBalancer\n  selector: {app: webserver}\n  ports: [{port: 80, targetPort: 80}]\n")?;
    let ip = web_ip(lab)?;
    let macs = node_macs()?;
    let mac_of = |node: &str| macs.iter().find(|(_, n)| *n == node).map(|(m, _)| m.clone()).context("MAC");

    // 1. Cordon.
    let (mut gaps, mut to_new) = (Vec::new(), Vec::new());
    for k in 0..DRILLS {
        let before = settled_announcer(&ip)?;
        let (gap, t) = drill(&ip, &mac_of(&before)?, || lab.kubectl(&["cordon", &before]).map(drop))?;
        eprintln!("cordon drill {k}: {before}: gap {:.1} ms, cordon -> new MAC {:.1} ms", gap * 1e3, t * 1e3);
        gaps.push(gap);
        to_new.push(t);
        lab.kubectl(&["uncordon", &before])?;
    }
    rows.push(("cordon: wire gap, last old MAC -> first new MAC".into(), summary(&mut gaps)));
    rows.push(("cordon: kubectl cordon -> first new MAC".into(), summary(&mut to_new)));

    // 2. SIGKILL of the announcer's speaker.
    let (mut gaps, mut to_new) = (Vec::new(), Vec::new());
    for k in 0..DRILLS {
        let before = settled_announcer(&ip)?;
        let i: usize = before.trim_start_matches("node-").parse()?;
        let (gap, t) = drill(&ip, &mac_of(&before)?, || {
            speakers[i - 1].kill();
            Ok(())
        })?;
        eprintln!("kill drill {k}: {before}: gap {:.1} ms, kill -> new MAC {:.1} ms", gap * 1e3, t * 1e3);
        gaps.push(gap);
        to_new.push(t);
        speakers[i - 1].restart()?;
        // Back in the membership (it takes the address back) before the next drill.
        wait_for("the restarted speaker to take its address back", Duration::from_secs(30), || {
            Ok((settled_announcer(&ip)? == before).then_some(()))
        })?;
    }
    rows.push(("SIGKILL: wire gap, last old MAC -> first new MAC".into(), summary(&mut gaps)));
    rows.push(("SIGKILL: kill -> first new MAC".into(), summary(&mut to_new)));

    // 3. ARP reply latency at 1000 requests/s.
    let announcer = settled_announcer(&ip)?;
    let sent = 5000;
    let out = arp_probe(&ip, &["--interval-us", "1000", "--count", &sent.to_string()])?.output()?;
    let mut rtts: Vec<f64> = parse_probe(&String::from_utf8_lossy(&out.stdout))
        .into_iter()
        .filter_map(|(_, _, rtt)| Some(rtt? as f64 / 1e6))
        .collect();
    let answered = rtts.len();
    rows.push((
        format!("ARP reply latency at 1000 req/s ({announcer}, {answered}/{sent} answered)"),
        summary(&mut rtts),
    ));

    // 4. Memory with 1000 announced addresses.
    let pid = speaker_pid("node-1")?;
    let rss_before = vm_rss_kib(pid).unwrap_or(0);
    let mut yaml = String::new();
    for n in 0..1000 {
        yaml.push_str(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: many-{n}, namespace: default}}\nspec:\n  type: LoadBalancer\n  selector: {{app: webserver}}\n  ports: [{{port: 80, targetPort: 80}}]\n---\n"
        ));
    }
    lab.apply(&yaml)?;
    wait_for("1000 services with an address", Duration::from_secs(300), || {
        let v = lab.kubectl_json(&["get", "services"])?;
        let n = v["items"]
            .as_array()
            .map(|a| a.iter().filter(|s| s["status"]["loadBalancer"]["ingress"][0]["ip"].is_string()).count())
            .unwrap_or(0);
        Ok((n >= 1001).then_some(()))
    })?;
    let t = Instant::now();
    speakers[1].stop();
    speakers[2].stop();
    wait_for("node-1 to announce all 1001 addresses", Duration::from_secs(300), || {
        Ok((announced_count(1)? >= 1001).then_some(()))
    })?;
    let all_moved = t.elapsed();
    std::thread::sleep(Duration::from_secs(5));
    let (rss, hwm) = (vm_rss_kib(pid).unwrap_or(0), vm_hwm_kib(pid).unwrap_or(0));
    rows.push(("speaker RSS, 1 announced address".into(), format!("{:.1} MiB", rss_before as f64 / 1024.0)));
    rows.push((
        "speaker RSS, 1001 announced addresses".into(),
        format!("{:.1} MiB (peak {:.1} MiB)", rss as f64 / 1024.0, hwm as f64 / 1024.0),
    ));
    rows.push((
        "two speakers leave: node-1 announces all 1001 after".into(),
        format!("{:.2} s (metrics polled)", all_moved.as_secs_f64()),
    ));
    Ok(())
}

fn main() -> Result<()> {
    let mut rows = Vec::new();
    let lab = Lab::new()?;
    let _ = lab.lab(&["down"]);
    let r = in_lab(&lab, &mut rows);
    let _ = lab.lab(&["down"]);
    r?;
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    println!(
        "\nferrolb-speaker benchmark ({}, {DRILLS} drills each; targets: cordon <= 200 ms, SIGKILL <= 1.5 s)",
        if cfg!(debug_assertions) { "debug build" } else { "release build" }
    );
    println!("{:-<1$}", "", w + 70);
    for (k, v) in &rows {
        println!("{k:<w$}  {v}");
    }
    Ok(())
}

//! ARP answers under a flood of unrelated traffic: node-1's speaker answers for 192.0.2.240
//! (`ferrolb-speaker respond`, the same responder as in a cluster) while node-2 sends node-1 UDP
//! as fast as it can (`ferrolb-lab blast`, full-size frames, 2 threads), and the client asks
//! who-has at 40 requests/s (`ferrolb-lab arp-probe`, under the per-asker answer rate). The
//! responder's socket filter keeps the flood in the kernel, so answers stay within 10 ms at p99.
//! Prints the flood's rate (sent, and received by node-1's eth0) and the answer latencies with
//! and without it.
//!
//! Needs root (it brings up its own lab); fails loudly without it.

use std::process::{Child, Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ferrolb_e2e::{Case, Lab, arping, lab_bin, run, run_suite, wait_for};

const LB: &str = "192.0.2.240";
/// 40 requests a second: below the per-asker answer rate (1,000/s), so every request is answered.
const PROBE_INTERVAL_US: &str = "25000";
const PROBES: usize = 400;

fn main() -> ExitCode {
    let cases: &[Case] =
        &[("setup_lab_with_two_nodes", setup), ("arp_answers_stay_within_10ms_p99_under_a_udp_flood", flood)];
    run_suite("l2flood", cases)
}

fn setup(lab: &Lab) -> Result<()> {
    lab.lab(&["up", "--nodes", "2"]).map(drop)
}

/// A child process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted.get(((sorted.len().saturating_sub(1)) as f64 * p).round() as usize).copied().unwrap_or(f64::NAN)
}

/// Round trips in ms of `PROBES` who-has from the client, sorted.
fn probe() -> Result<Vec<f64>> {
    let count = PROBES.to_string();
    let out = run(
        "ip",
        &[
            "netns",
            "exec",
            "client",
            lab_bin()?.to_str().unwrap_or("ferrolb-lab"),
            "arp-probe",
            LB,
            "--interval-us",
            PROBE_INTERVAL_US,
            "--count",
            &count,
        ],
    )?;
    let mut ms: Vec<f64> =
        out.lines().filter_map(|l| l.split_whitespace().nth(2)?.parse::<f64>().ok()).map(|us| us / 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    Ok(ms)
}

/// `(rx packets, rx bytes)` of node-1's eth0.
fn node1_rx() -> Result<(u64, u64)> {
    let v: serde_json::Value =
        serde_json::from_str(&run("ip", &["-n", "node-1", "-s", "-j", "link", "show", "eth0"])?)?;
    let rx = &v[0]["stats64"]["rx"];
    Ok((rx["packets"].as_u64().context("rx packets")?, rx["bytes"].as_u64().context("rx bytes")?))
}

fn flood(_lab: &Lab) -> Result<()> {
    let speaker = lab_bin()?.with_file_name("ferrolb-speaker");
    let _speaker = Killed(
        Command::new("nsenter")
            .arg("--net=/run/netns/node-1")
            .arg("--")
            .arg(&speaker)
            .args(["respond", "--ip", LB, "--interface", "eth0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting ferrolb-speaker respond on node-1")?,
    );
    wait_for("node-1 to answer for the address", Duration::from_secs(10), || {
        Ok((!arping(LB, 1)?.is_empty()).then_some(()))
    })?;

    let quiet = probe()?;
    ensure!(quiet.len() >= PROBES * 99 / 100, "without a flood only {}/{PROBES} answered", quiet.len());

    let (packets0, bytes0) = node1_rx()?;
    let blaster = Command::new("ip")
        .args(["netns", "exec", "node-2"])
        .arg(lab_bin()?)
        .args(["blast", "192.0.2.11:9", "--threads", "2", "--seconds", "13"])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the blaster on node-2")?;
    let mut blaster = Killed(blaster);
    std::thread::sleep(Duration::from_secs(1));
    let flooded = probe()?;
    let report = report_of(&mut blaster.0)?;
    let (packets1, bytes1) = node1_rx()?;
    let sent: serde_json::Value = serde_json::from_str(report.trim()).context("the blaster's report")?;
    let secs = sent["seconds"].as_f64().unwrap_or(f64::NAN);
    let rx_mbit = (bytes1 - bytes0) as f64 * 8.0 / 1e6 / secs;
    let rx_fps = (packets1 - packets0) as f64 / secs;
    println!(
        "  flood from node-2: {:.0} Mbit/s, {:.0} frames/s sent; node-1 eth0 received {rx_mbit:.0} Mbit/s, {rx_fps:.0} frames/s",
        sent["mbit_s"].as_f64().unwrap_or(f64::NAN),
        sent["frames_s"].as_f64().unwrap_or(f64::NAN),
    );
    println!(
        "  ARP answer latency, no flood: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({}/{PROBES} answered)",
        pct(&quiet, 0.5),
        pct(&quiet, 0.99),
        pct(&quiet, 1.0),
        quiet.len()
    );
    println!(
        "  ARP answer latency, flood:    p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({}/{PROBES} answered)",
        pct(&flooded, 0.5),
        pct(&flooded, 0.99),
        pct(&flooded, 1.0),
        flooded.len()
    );
    ensure!(rx_fps > 10_000.0, "the flood reached node-1 at only {rx_fps:.0} frames/s: no flood to speak of");
    ensure!(flooded.len() >= PROBES * 99 / 100, "under the flood only {}/{PROBES} answered", flooded.len());
    ensure!(pct(&flooded, 0.99) <= 10.0, "p99 {:.2} ms under the flood (limit 10 ms)", pct(&flooded, 0.99));
    Ok(())
}

/// Waits for `child` to exit and returns its stdout.
fn report_of(child: &mut Child) -> Result<String> {
    use std::io::Read;
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        stdout.read_to_string(&mut out)?;
    }
    let status = child.wait()?;
    ensure!(status.success(), "the blaster failed ({status}): {out}");
    Ok(out)
}

//! Benchmark of the nftables data plane against a real kernel, in a throw-away network
//! namespace: full load, a re-apply of the full ruleset over itself (what a restart does), and
//! one-service partial syncs, at 1,000 and 10,000 services × 10 endpoints. Prints a table.
//!
//! `cargo test -p ferrolb-speaker --release --test dataplane_bench -- --ignored --nocapture`
//! (needs root; ignored by default because it takes a minute).
//!
//! `render_times` (no root, no kernel) times the Rust side alone at 10,000 and 50,000 services:
//! a cold full render, and the partial render of a one-Service update and of a one-endpoint
//! change, by a kept [`Ruleset`] told the changed key (what the speaker does) and from the whole
//! models (`render_partial`, what it did before): `cargo test -p ferrolb-speaker --release
//! --test dataplane_bench render_times -- --ignored --nocapture`.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

use ferrolb_speaker::dataplane::model::{Endpoint, Family, Mode, Model, PortModel, Protocol, ServiceKey, ServiceModel};
use ferrolb_speaker::dataplane::render::{
    Ruleset, render_cleanup, render_create, render_create_table, render_full, render_partial,
};
use ferrolb_speaker::dataplane::{conntrack, healthcheck, sync};

fn v4(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(n))
}

fn service(s: u32, endpoints: u32) -> ServiceModel {
    let base_svc = u32::from(Ipv4Addr::new(198, 19, 0, 0));
    let base_ep = u32::from(Ipv4Addr::new(198, 18, 0, 0));
    let eps = (0..endpoints)
        .map(|e| Endpoint::ready(v4(base_ep + s * endpoints + e), 8080, &format!("node-{}", e % 3 + 1)))
        .collect();
    // A node port for every tenth service, as in the lab benchmark.
    let node_port = if s.is_multiple_of(10) { u16::try_from(30000 + s / 10).ok() } else { None };
    let port = PortModel { name: "http".into(), proto: Protocol::Tcp, port: 80, node_port, endpoints: eps };
    ServiceModel { cluster_ips: vec![v4(base_svc + s + 1)], ports: vec![port], ..ServiceModel::default() }
}

fn synthetic(services: u32, endpoints: u32) -> Model {
    Model {
        node: "node-1".into(),
        family: Family::V4,
        mode: Mode::Full,
        node_ips: vec!["192.0.2.11".parse().unwrap()],
        pod_cidrs: vec!["198.18.1.0/24".parse().unwrap()],
        service_cidrs: vec![],
        services: (0..services)
            .map(|s| (ServiceKey::new("bench", format!("svc-{s}")), service(s, endpoints)))
            .collect(),
    }
}

fn file(dir: &std::path::Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    path.display().to_string()
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture, as root"]
fn sync_times() {
    let dir = tempfile::tempdir().unwrap();
    let keep = std::env::var("BENCH_KEEP").is_ok();
    let mut rows = BTreeMap::new();
    for n in [1000u32, 10000] {
        let m = synthetic(n, 10);
        let key = ServiceKey::new("bench", "svc-7");

        // An address no synthetic endpoint has (at 10,000 services they reach into 198.19.134.x),
        // so that moving back leaves something for the cleanup.
        let mut endpoint_moved = m.clone();
        endpoint_moved.services.get_mut(&key).unwrap().ports[0].endpoints[0].ip = "192.0.2.250".parse().unwrap();
        let mut added = m.clone();
        added.services.insert(ServiceKey::new("bench", "new"), service(n + 1, 10));
        let mut removed = m.clone();
        removed.services.remove(&key);

        // Rust rendering alone, timed.
        let mut timed = |row: &str, render: &dyn Fn() -> String| {
            let t = std::time::Instant::now();
            let text = render();
            rows.entry(row.to_owned()).or_insert_with(Vec::new).push(t.elapsed().as_millis().to_string());
            text
        };
        // What a speaker finding no table does (two `nft` runs there, one here).
        let rendered = timed("render_full (Rust, no nft)", &|| render_create_table(m.family) + &render_create(&m));
        let partial = timed("render_partial, one endpoint (Rust, no nft)", &|| render_partial(&m, &endpoint_moved).now);
        // The other family's table of the same (IPv4-only) services, as a dual-stack node has.
        let mut v6 = m.clone();
        v6.family = Family::V6;
        v6.node_ips = vec!["2001:db8:1::11".parse().unwrap()];
        v6.pod_cidrs = vec!["2001:db8:100::/64".parse().unwrap()];
        let rendered_v6 =
            timed("render_full, IPv6 table (Rust, no nft)", &|| render_create_table(v6.family) + &render_create(&v6));
        let steps = [
            ("full: create the IPv6 table", file(dir.path(), "full6", &rendered_v6)),
            ("full: create the table", file(dir.path(), "full", &rendered)),
            ("full: replace the table (restart)", file(dir.path(), "refull", &render_full(&m))),
            ("partial: one endpoint replaced", file(dir.path(), "p1", &partial)),
            ("partial: back", file(dir.path(), "p1b", &render_partial(&endpoint_moved, &m).now)),
            ("partial: service added", file(dir.path(), "p2", &render_partial(&m, &added).now)),
            ("partial: service removed", file(dir.path(), "p3", &render_partial(&added, &m).now)),
        ];
        let stale = render_partial(&endpoint_moved, &m);
        let chains: BTreeSet<String> = stale.stale_chains.into_iter().collect();
        let hairpin: BTreeSet<String> = stale.stale_hairpin.into_iter().collect();
        let cleanup = file(dir.path(), "c", &render_cleanup(&m, &chains, &BTreeSet::new(), &hairpin));
        let mut script = String::from(
            "t() { s=$(date +%s%N); nft -f \"$2\"; e=$(date +%s%N); echo \"$1|$(( (e-s)/1000000 ))\"; }\n",
        );
        for (name, path) in steps.iter().chain([("cleanup (deferred deletes)", cleanup)].iter()) {
            script.push_str(&format!("t '{name}' {path}\n"));
        }
        if keep {
            for (i, (_, path)) in steps.iter().enumerate() {
                std::fs::copy(path, format!("/tmp/flb/step{i}_{n}.nft")).unwrap();
            }
        }
        let out = Command::new("unshare").args(["--net", "--", "sh", "-ec", &script]).output().expect("unshare");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            let (name, ms) = l.split_once('|').unwrap();
            rows.entry(name.to_owned()).or_insert_with(Vec::new).push(ms.to_owned());
        }
    }
    println!("\n| step | 1,000 services × 10 | 10,000 services × 10 |\n|---|---|---|");
    for (name, ms) in rows {
        println!("| {name} | {} ms | {} ms |", ms[0], ms[1]);
    }
}

/// The median of `samples`, in milliseconds.
fn p50(mut samples: Vec<std::time::Duration>) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_secs_f64() * 1e3
}

/// The time this thread has run on a CPU, in milliseconds (the machine may be busy with others:
/// wall time alone would count their share).
fn cpu_ms() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    stat.split_whitespace().next().and_then(|ns| ns.parse::<f64>().ok()).unwrap_or(0.0) / 1e6
}

/// Cold full renders only, for a profiler: `perf record` on the test binary with
/// `cold_render_profile --ignored`.
#[test]
#[ignore = "for profiling: run with --release --ignored"]
fn cold_render_profile() {
    let m = synthetic(10_000, 10);
    for _ in 0..5 {
        let (t, cpu) = (std::time::Instant::now(), cpu_ms());
        let text = Ruleset::new(&m).render_full(false);
        println!("{:.0} ms, {:.0} ms on CPU, {} bytes", t.elapsed().as_secs_f64() * 1e3, cpu_ms() - cpu, text.len());
    }
}

/// The process's resident memory, in MiB.
fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

#[test]
#[ignore = "benchmark: run with --release --ignored --nocapture"]
fn render_times() {
    const UPDATES: u32 = 21;
    let mut rows: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let sizes = [10_000u32, 50_000];
    for n in sizes {
        let m = synthetic(n, 10);
        let (t, cpu) = (std::time::Instant::now(), cpu_ms());
        let mut ruleset = Ruleset::new(&m);
        let text = ruleset.render_full(false);
        let (cold, cold_cpu) = (t.elapsed(), cpu_ms() - cpu);
        rows.entry("cold full render (Ruleset::new + render_full)").or_default().push(format!(
            "{:.0} ms, {cold_cpu:.0} ms on CPU ({:.1} MB of text)",
            cold.as_secs_f64() * 1e3,
            text.len() as f64 / 1e6
        ));
        drop(text);
        rows.entry("process RSS with the Ruleset and its model").or_default().push(format!("{:.0} MiB", rss_mib()));

        // What every sync also walks (sync.rs): on these Services (TCP, Cluster policy, no
        // health check port), and on the same ones all UDP, Local, with a health check port.
        let mut worst = m.clone();
        for (i, svc) in worst.services.values_mut().enumerate() {
            svc.external_local = true;
            svc.health_check_node_port = u16::try_from(20000 + i % 40000).ok();
            svc.ports[0].proto = Protocol::Udp;
        }
        for (label, model) in [("", &m), (", all UDP + Local + health check", &worst)] {
            let t = std::time::Instant::now();
            let targets = conntrack::targets(model);
            let conntrack_ms = t.elapsed().as_secs_f64() * 1e3;
            let t = std::time::Instant::now();
            let checks = healthcheck::wanted(&[model]);
            let health_ms = t.elapsed().as_secs_f64() * 1e3;
            let t = std::time::Instant::now();
            let no_local = sync::no_local_endpoints(model);
            let no_local_ms = t.elapsed().as_secs_f64() * 1e3;
            assert!(label.is_empty() || (!targets.services.is_empty() && !checks.is_empty()));
            std::hint::black_box(no_local);
            rows.entry(if label.is_empty() {
                "per-sync scans: conntrack / health checks / no-local count"
            } else {
                "per-sync scans, all UDP + Local + health check port"
            })
            .or_default()
            .push(format!("{conntrack_ms:.1} / {health_ms:.1} / {no_local_ms:.1} ms"));
        }
        drop(worst);

        // One Service edited (a port changed), then put back: each a partial render.
        let (mut kept_svc, mut kept_ep, mut whole_svc, mut whole_ep) = (vec![], vec![], vec![], vec![]);
        let mut current = m.clone();
        for i in 0..UPDATES {
            let key = ServiceKey::new("bench", format!("svc-{}", (i * 7919) % n));
            let keys = BTreeSet::from([key.clone()]);
            for (edit, kept, whole) in [(0, &mut kept_svc, &mut whole_svc), (1, &mut kept_ep, &mut whole_ep)] {
                let mut next = current.clone();
                let svc = next.services.get_mut(&key).unwrap();
                if edit == 0 {
                    svc.ports[0].port = if svc.ports[0].port == 80 { 81 } else { 80 };
                } else {
                    let e = &mut svc.ports[0].endpoints[0];
                    e.ip = if e.ip == v4(0xC000_02FA) { v4(0xC000_02FB) } else { v4(0xC000_02FA) };
                }
                if i < 3 {
                    // The old way, from the whole models: slow, so a few samples.
                    let t = std::time::Instant::now();
                    let p = render_partial(&current, &next);
                    whole.push(t.elapsed());
                    assert!(!p.now.is_empty());
                }
                let t = std::time::Instant::now();
                let (p, _) = ruleset.update(&next, &keys);
                kept.push(t.elapsed());
                assert!(!p.full && !p.now.is_empty());
                current = next;
            }
        }
        rows.entry("one-Service update, kept Ruleset (p50)").or_default().push(format!("{:.2} ms", p50(kept_svc)));
        rows.entry("one-endpoint change, kept Ruleset (p50)").or_default().push(format!("{:.2} ms", p50(kept_ep)));
        rows.entry("one-Service update, render_partial of whole models (p50)")
            .or_default()
            .push(format!("{:.0} ms", p50(whole_svc)));
        rows.entry("one-endpoint change, render_partial of whole models (p50)")
            .or_default()
            .push(format!("{:.0} ms", p50(whole_ep)));
    }
    println!(
        "\n| Rust rendering, 1 port × 10 endpoints a service | 10,000 services | 50,000 services |\n|---|---|---|"
    );
    for (name, v) in rows {
        println!("| {name} | {} | {} |", v[0], v[1]);
    }
}

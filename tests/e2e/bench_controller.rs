//! Controller benchmark (`make bench-controller`): prints a table, asserts nothing.
//!
//! 1. In memory: allocate 10,000 services from one pool; reconcile 10,000 services from
//!    scratch, then the converged pass a new event triggers. Then 100,000: allocate, restore
//!    them into a fresh allocator (as a new leader does from Service status), a new leader's
//!    first reconcile pass over them, and the process's RSS.
//! 2. In the lab: create 1,000 LoadBalancer Services through the API and time each one
//!    from create to `status.loadBalancer.ingress` (p50/p99), and the controller's peak RSS.
//!    Where the time goes: the create request's own round trip, the controller's passes (how
//!    many, how long from cache to actions) and its status writes' round trips (/metrics).
//!    `BENCH_LAB=0` skips this part, `BENCH_MEMORY=0` the first; `BENCH_CONTROLLER_ARGS`
//!    adds flags to the controller (`--log-level=info,ferrolb_controller=debug` logs every
//!    pass to `/tmp/ferrolb-e2e-bench.log`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ferrolb_api::IPAddressPoolSpec;
use ferrolb_config::{PoolInput, build_pools};
use ferrolb_controller::allocator::{Allocator, Request};
use ferrolb_controller::reconcile::{Action, Reconciler};
use ferrolb_controller::service::ClassPolicy;
use ferrolb_e2e::{Controller, Lab, run, vm_hwm_kib};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use kube::runtime::watcher;

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn pools(n_addr: &str) -> ferrolb_config::Pools {
    build_pools(vec![PoolInput {
        name: "bench".into(),
        labels: BTreeMap::new(),
        created: None,
        spec: IPAddressPoolSpec { addresses: vec![n_addr.into()], ..Default::default() },
    }])
}

fn request(i: usize) -> Request {
    Request::ipv4_default("default", &format!("s{i}"))
}

fn service(name: &str) -> Service {
    Service {
        metadata: ObjectMeta { name: Some(name.into()), namespace: Some("default".into()), ..Default::default() },
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            ports: Some(vec![ServicePort { port: 80, ..Default::default() }]),
            ip_families: Some(vec!["IPv4".into()]),
            ..Default::default()
        }),
        status: None,
    }
}

fn in_memory(rows: &mut Vec<(String, String)>) {
    let p = pools("198.18.0.0/16");
    let mut a = Allocator::new(&p);
    let t = Instant::now();
    for i in 0..10_000 {
        let _ = a.allocate(&request(i));
    }
    let e = t.elapsed();
    rows.push((
        "allocate 10,000 services (in memory)".into(),
        format!("{} total, {:.1} µs each", ms(e), e.as_secs_f64() * 1e6 / 1e4),
    ));

    let mut services: Vec<Service> = (0..10_000).map(|i| service(&format!("s{i}"))).collect();
    let mut r = Reconciler::new(ClassPolicy::default());
    let t = Instant::now();
    let actions = r.reconcile(&p, &services, &BTreeMap::new());
    rows.push(("reconcile 10,000 new services (in memory)".into(), ms(t.elapsed())));
    let by_name: HashMap<String, usize> =
        services.iter().enumerate().map(|(i, s)| (s.metadata.name.clone().unwrap_or_default(), i)).collect();
    for act in &actions {
        if let Action::SetStatus { key, ips } = act
            && let Some(i) = by_name.get(&key.name)
        {
            ferrolb_controller::service::set_status_ips(&mut services[*i], ips);
        }
    }
    let t = Instant::now();
    let _ = r.reconcile(&p, &services, &BTreeMap::new());
    rows.push(("reconcile pass over 10,000 converged services".into(), ms(t.elapsed())));
    let (_, took, moved) = new_leader(&p, &services);
    rows.push(("new leader: restore 10,000 from status".into(), format!("{} ({moved} moves)", ms(took))));
    if let Some(kib) = vm_hwm_kib(std::process::id()) {
        rows.push(("bench process peak RSS after 10,000 in memory".into(), format!("{:.1} MiB", kib as f64 / 1024.0)));
    }
}

/// 100,000 services: allocation, a restore from scratch, and what they cost in memory.
fn in_memory_100k(rows: &mut Vec<(String, String)>) {
    const N: usize = 100_000;
    // 131,072 addresses: the whole benchmarking range.
    let p = pools("198.18.0.0/15");
    let requests: Vec<Request> = (0..N).map(request).collect();
    let mut a = Allocator::new(&p);
    let (t, cpu) = (Instant::now(), cpu_ms());
    let held: Vec<_> = requests.iter().filter_map(|r| a.allocate(r).ok().map(|x| x.ips.clone())).collect();
    let e = t.elapsed();
    rows.push((
        "allocate 100,000 services (in memory)".into(),
        format!(
            "{} total, {:.1} µs each ({} got one){}",
            ms(e),
            e.as_secs_f64() * 1e6 / N as f64,
            held.len(),
            cpu_used(cpu)
        ),
    ));

    let rss_before = vm_rss_kib();
    let mut b = Allocator::new(&p);
    let (t, cpu) = (Instant::now(), cpu_ms());
    let restored = requests.iter().zip(&held).filter(|(r, ips)| b.restore(r, ips).is_ok()).count();
    let e = t.elapsed();
    let cpu = cpu_used(cpu);
    let rss_restored = vm_rss_kib();
    rows.push((
        "restore 100,000 into a fresh allocator".into(),
        format!("{} total, {:.1} µs each ({restored} restored){cpu}", ms(e), e.as_secs_f64() * 1e6 / N as f64),
    ));
    let t = Instant::now();
    let _ = b.allocate(&request(N));
    rows.push(("then allocate one more (pool 76 % full)".into(), format!("{:.1} µs", t.elapsed().as_secs_f64() * 1e6)));
    drop(b);

    let mut services: Vec<Service> = (0..N).map(|i| service(&format!("s{i}"))).collect();
    for (s, ips) in services.iter_mut().zip(&held) {
        ferrolb_controller::service::set_status_ips(s, ips);
    }
    let (mut fresh, took, moved) = new_leader(&p, &services);
    rows.push(("new leader: first pass over 100,000 with status".into(), format!("{} ({moved} moves)", ms(took))));
    let t = Instant::now();
    let _ = fresh.reconcile(&p, &services, &BTreeMap::new());
    rows.push(("reconcile pass over 100,000 converged services".into(), ms(t.elapsed())));

    if let (Some(before), Some(after)) = (rss_before, rss_restored) {
        rows.push((
            "RSS growth of that restore (one allocator of 100,000)".into(),
            format!("{:.1} MiB", after.saturating_sub(before) as f64 / 1024.0),
        ));
    }
    if let Some(kib) = vm_rss_kib() {
        rows.push(("bench process RSS after 100,000 in memory".into(), format!("{:.1} MiB", kib as f64 / 1024.0)));
    }
    if let Some(kib) = vm_hwm_kib(std::process::id()) {
        rows.push(("bench process peak RSS after 100,000 in memory".into(), format!("{:.1} MiB", kib as f64 / 1024.0)));
    }
}

/// A new leader's first pass over `services`: the reconciler, its time, and how many services
/// it moved.
fn new_leader(p: &ferrolb_config::Pools, services: &[Service]) -> (Reconciler, Duration, usize) {
    let mut fresh = Reconciler::new(ClassPolicy::default());
    let t = Instant::now();
    let actions = fresh.reconcile(p, services, &BTreeMap::new());
    let took = t.elapsed();
    (fresh, took, actions.iter().filter(|a| matches!(a, Action::SetStatus { .. })).count())
}

/// CPU time this process has used, in ms (10 ms ticks): on a busy machine wall time says
/// more of the other processes than of this one.
fn cpu_ms() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
    let rest = s.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks * 10)
}

/// `, N ms of CPU` since `before`.
fn cpu_used(before: Option<u64>) -> String {
    match (before, cpu_ms()) {
        (Some(b), Some(a)) => format!(", {} ms of CPU", a.saturating_sub(b)),
        _ => String::new(),
    }
}

/// This process's resident set now.
fn vm_rss_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}

async fn in_lab(lab: &Lab, rows: &mut Vec<(String, String)>) -> Result<()> {
    lab.lab(&["up"])?;
    lab.kubectl(&["apply", "-f", concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crds")])?;
    lab.kubectl(&["wait", "--for=condition=Established", "crd/ipaddresspools.ferrolb.io", "--timeout=30s"])?;
    let _ = lab.kubectl(&["create", "namespace", "ferrolb-system"]);
    lab.apply(
        "apiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: bench, namespace: ferrolb-system}\nspec:\n  addresses: [198.18.96.0/22]\n",
    )?;
    let extra = std::env::var("BENCH_CONTROLLER_ARGS").unwrap_or_default();
    let ctl = Controller::start("bench", 17479, &extra.split_whitespace().collect::<Vec<_>>())?;
    let pid = ctl_pid()?;

    let client = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from("/run/ferrolb-lab/kubeconfig")?,
            &Default::default(),
        )
        .await?,
    )?;
    let api: Api<Service> = Api::namespaced(client, "default");
    let created: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let create_rtt: Arc<Mutex<HashMap<String, Duration>>> = Arc::default();
    let done: Arc<Mutex<HashMap<String, Duration>>> = Arc::default();
    let (c2, d2, api2) = (created.clone(), done.clone(), api.clone());
    let watch = tokio::spawn(async move {
        let mut s = std::pin::pin!(watcher::watcher(api2, watcher::Config::default()));
        while let Some(Ok(ev)) = s.next().await {
            if let watcher::Event::Apply(svc) | watcher::Event::InitApply(svc) = ev {
                let has = svc
                    .status
                    .as_ref()
                    .and_then(|s| s.load_balancer.as_ref())
                    .and_then(|l| l.ingress.as_ref())
                    .is_some_and(|i| !i.is_empty());
                let name = svc.metadata.name.clone().unwrap_or_default();
                if has && let Some(t0) = c2.lock().ok().and_then(|c| c.get(&name).copied()) {
                    d2.lock().map(|mut d| d.entry(name).or_insert(t0.elapsed()).to_owned()).ok();
                }
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    const N: usize = 1000;
    let t_all = Instant::now();
    futures::stream::iter(0..N)
        .for_each_concurrent(8, |i| {
            let (api, created, create_rtt) = (api.clone(), created.clone(), create_rtt.clone());
            async move {
                let name = format!("bench-{i:04}");
                let t0 = Instant::now();
                if let Ok(mut c) = created.lock() {
                    c.insert(name.clone(), t0);
                }
                if let Err(e) = api.create(&PostParams::default(), &service(&name)).await {
                    eprintln!("create {name}: {e}");
                    return;
                }
                if let Ok(mut r) = create_rtt.lock() {
                    r.insert(name, t0.elapsed());
                }
            }
        })
        .await;
    let create_secs = t_all.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(120);
    while done.lock().map(|d| d.len()).unwrap_or(0) < N && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all_secs = t_all.elapsed().as_secs_f64();
    watch.abort();
    let done = done.lock().map(|d| d.clone()).unwrap_or_default();
    let rtts = create_rtt.lock().map(|r| r.clone()).unwrap_or_default();
    let mut lat: Vec<Duration> = done.values().copied().collect();
    lat.sort();
    let mut rtt: Vec<Duration> = rtts.values().copied().collect();
    rtt.sort();
    // From the create's answer to the status: what the controller (and the watches) add.
    let mut after: Vec<Duration> =
        done.iter().filter_map(|(name, l)| rtts.get(name).map(|r| l.saturating_sub(*r))).collect();
    after.sort();
    rows.push((
        format!("lab: {N} Services created ({:.0}/s, 8 at a time)", N as f64 / create_secs),
        format!("{} got an address, all within {all_secs:.1} s", lat.len()),
    ));
    rows.push(("lab: create -> status.loadBalancer.ingress p50".into(), ms(pct(&lat, 0.50))));
    rows.push(("lab: create -> status.loadBalancer.ingress p99".into(), ms(pct(&lat, 0.99))));
    rows.push(("lab: create -> status.loadBalancer.ingress max".into(), ms(lat.last().copied().unwrap_or_default())));
    rows.push((
        "lab: of which the create request's round trip p50 / p99".into(),
        format!("{} / {}", ms(pct(&rtt, 0.50)), ms(pct(&rtt, 0.99))),
    ));
    rows.push((
        "lab: create answered -> ingress p50 / p99".into(),
        format!("{} / {}", ms(pct(&after, 0.50)), ms(pct(&after, 0.99))),
    ));
    let text = run("curl", &["-s", "http://127.0.0.1:17479/metrics"]).unwrap_or_default();
    let metric =
        |name: &str| text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok());
    let mean = |h: &str, what: &str| match (metric(&format!("{h}_sum")), metric(&format!("{h}_count"))) {
        (Some(sum), Some(n)) if n > 0.0 => format!("{n:.0} {what}, mean {:.2} ms", sum * 1000.0 / n),
        _ => "not reported".to_string(),
    };
    rows.push((
        "lab: controller reconcile passes (cache -> actions)".into(),
        mean("ferrolb_controller_pass_reconcile_seconds", "passes"),
    ));
    rows.push((
        "lab: controller status writes (send -> answer)".into(),
        mean("ferrolb_controller_status_write_seconds", "writes"),
    ));
    if let Some(kib) = vm_hwm_kib(pid) {
        rows.push((format!("lab: controller peak RSS ({N} services)"), format!("{:.1} MiB", kib as f64 / 1024.0)));
    }
    drop(ctl);
    Ok(())
}

fn ctl_pid() -> Result<u32> {
    let out = run("pgrep", &["-f", "ferrolb-controller --identity=bench"])?;
    out.split_whitespace().next().and_then(|p| p.parse().ok()).context("controller pid")
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut rows = Vec::new();
    if std::env::var("BENCH_MEMORY").as_deref() != Ok("0") {
        in_memory(&mut rows);
        in_memory_100k(&mut rows);
    }
    if std::env::var("BENCH_LAB").as_deref() != Ok("0") {
        let lab = Lab::new()?;
        let _ = lab.lab(&["down"]);
        let r = in_lab(&lab, &mut rows).await;
        let _ = lab.lab(&["down"]);
        r?;
    }
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    println!(
        "\nferrolb-controller benchmark ({})",
        if cfg!(debug_assertions) { "debug build" } else { "release build" }
    );
    println!("{:-<1$}", "", w + 30);
    for (k, v) in &rows {
        println!("{k:<w$}  {v}");
    }
    Ok(())
}

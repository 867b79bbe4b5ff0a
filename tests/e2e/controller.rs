//! The controller end to end, against the lab's real API server: Services get addresses,
//! keep them, and every refusal is an Event; replicas elect one writer through a Lease.
//!
//! Needs root (it brings up its own lab); fails loudly without it.

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use ferrolb_e2e::{Case, Controller, Lab, events, output, run, run_suite, wait_event, wait_for};

const POOL: &str = r#"
apiVersion: ferrolb.io/v1beta1
kind: IPAddressPool
metadata:
  name: lan
  namespace: ferrolb-system
spec:
  addresses:
  - 192.0.2.200-192.0.2.250
  - 2001:db8:1::c8-2001:db8:1::fa
"#;

fn lb_service(name: &str, annotations: &[(&str, &str)], spec_extra: &str) -> String {
    let ann: String = annotations.iter().map(|(k, v)| format!("    {k}: \"{v}\"\n")).collect();
    let ann = if ann.is_empty() { String::new() } else { format!("  annotations:\n{ann}") };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n{ann}spec:\n  type: LoadBalancer\n  selector: {{app: webserver}}\n  ports:\n  - name: http\n    port: 80\n    targetPort: 80\n{spec_extra}"
    )
}

fn ingress(lab: &Lab, name: &str) -> Result<Vec<String>> {
    let v = lab.kubectl_json(&["get", "service", name])?;
    Ok(v["status"]["loadBalancer"]["ingress"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["ip"].as_str().map(str::to_string))
        .collect())
}

fn wait_ingress(lab: &Lab, name: &str) -> Result<Vec<String>> {
    wait_for(&format!("an EXTERNAL-IP for {name}"), Duration::from_secs(20), || {
        let ips = ingress(lab, name)?;
        Ok((!ips.is_empty()).then_some(ips))
    })
}

fn main() -> ExitCode {
    let cases: &[Case] = &[
        ("setup_lab_crds_pool_controller", setup),
        ("a_loadbalancer_service_gets_an_address_at_once", gets_an_address),
        ("requested_addresses_in_every_spelling", requested_addresses),
        ("bad_requests_get_events_and_leave_others_alone", bad_requests),
        ("services_with_one_sharing_key_share_an_address", sharing),
        ("dual_stack_services_get_both_families", dual_stack),
        ("other_classes_are_ignored_and_release_happens", classes_and_release),
        ("invalid_pools_are_reported_and_good_pools_keep_working", invalid_pools),
        ("a_pool_edit_keeps_addresses_in_use_with_an_event", pool_edit),
        ("metrics_count_addresses", metrics),
        ("metallb_pools_are_read_with_compatibility_on", metallb_compat),
        ("two_replicas_exactly_one_writes_and_failover", two_replicas),
        ("a_leader_whose_reconcile_loop_dies_gives_the_lease_up_and_exits", leadership_dies),
        ("200_services_through_10_restarts_keep_their_addresses", restarts),
    ];
    run_suite("controller", cases)
}

/// The replica every case after setup talks to; kept alive across cases.
static MAIN: std::sync::Mutex<Option<Controller>> = std::sync::Mutex::new(None);

fn main_controller() -> std::sync::MutexGuard<'static, Option<Controller>> {
    MAIN.lock().unwrap_or_else(|e| e.into_inner())
}

fn crd_dir() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crds").to_string()
}

fn setup(lab: &Lab) -> Result<()> {
    lab.lab(&["up"])?;
    lab.kubectl(&["apply", "-f", &crd_dir()])?;
    lab.kubectl(&["wait", "--for=condition=Established", "crd/ipaddresspools.ferrolb.io", "--timeout=30s"])?;
    lab.kubectl(&["create", "namespace", "ferrolb-system"])?;
    lab.apply(POOL)?;
    *main_controller() = Some(Controller::start("ctl-a", 17472, &[])?);
    Ok(())
}

fn gets_an_address(lab: &Lab) -> Result<()> {
    let t = Instant::now();
    lab.apply(&lb_service("web", &[], ""))?;
    let ips = wait_ingress(lab, "web")?;
    println!("  create -> EXTERNAL-IP: {:.2} s", t.elapsed().as_secs_f64());
    ensure!(ips == ["192.0.2.200"], "web got {ips:?}");
    let v = lab.kubectl_json(&["get", "service", "web"])?;
    ensure!(v["status"]["loadBalancer"]["ingress"][0]["ipMode"] == "VIP", "ipMode: {}", v["status"]["loadBalancer"]);
    wait_for("the pool annotation", Duration::from_secs(10), || {
        let v = lab.kubectl_json(&["get", "service", "web"])?;
        Ok((v["metadata"]["annotations"]["ferrolb.io/ip-allocated-from-pool"] == "lan").then_some(()))
    })?;
    wait_event(lab, "web", "IPAllocated", "assigned 192.0.2.200 from pool lan")?;
    // kubectl get svc shows it.
    let table = lab.kubectl(&["get", "service", "web"])?;
    ensure!(table.contains("192.0.2.200"), "{table}");
    Ok(())
}

fn requested_addresses(lab: &Lab) -> Result<()> {
    lab.apply(&lb_service("ask-ferrolb", &[("ferrolb.io/loadBalancerIPs", "192.0.2.240")], ""))?;
    lab.apply(&lb_service("ask-metallb", &[("metallb.universe.tf/loadBalancerIPs", "192.0.2.241")], ""))?;
    lab.apply(&lb_service("ask-metallb-io", &[("metallb.io/loadBalancerIPs", "192.0.2.242")], ""))?;
    lab.apply(&lb_service("ask-spec", &[], "  loadBalancerIP: 192.0.2.243\n"))?;
    for (name, want) in [
        ("ask-ferrolb", "192.0.2.240"),
        ("ask-metallb", "192.0.2.241"),
        ("ask-metallb-io", "192.0.2.242"),
        ("ask-spec", "192.0.2.243"),
    ] {
        let ips = wait_ingress(lab, name)?;
        ensure!(ips == [want], "{name} got {ips:?}, asked {want}");
    }
    Ok(())
}

fn bad_requests(lab: &Lab) -> Result<()> {
    let before = ingress(lab, "web")?;
    let tiny = r#"
apiVersion: ferrolb.io/v1beta1
kind: IPAddressPool
metadata:
  name: tiny
  namespace: ferrolb-system
spec:
  addresses: [198.18.200.1/32]
  autoAssign: false
"#;
    lab.apply(tiny)?;
    // (service, annotations, extra spec, what its AllocationFailed event must say)
    type BadCase<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str, &'a str);
    let cases: &[BadCase<'_>] = &[
        ("taken", &[("ferrolb.io/loadBalancerIPs", "192.0.2.200")], "", "192.0.2.200 is in use by default/web"),
        ("outside", &[("ferrolb.io/loadBalancerIPs", "198.18.99.1")], "", "198.18.99.1 is not in any IPAddressPool"),
        (
            "wrongfamily",
            &[("ferrolb.io/loadBalancerIPs", "2001:db8:1::c9")],
            "",
            "is IPv6, but the service's ipFamilies are IPv4",
        ),
        ("nopool", &[("ferrolb.io/address-pool", "nope")], "", "pool \"nope\""),
        ("garbage", &[("ferrolb.io/loadBalancerIPs", "not-an-ip")], "", "\"not-an-ip\" is not an IP address"),
        ("tiny-1", &[("ferrolb.io/address-pool", "tiny")], "", ""),
        ("tiny-2", &[("ferrolb.io/address-pool", "tiny")], "", "pool \"tiny\" is exhausted"),
    ];
    for (name, ann, extra, _) in cases {
        lab.apply(&lb_service(name, ann, extra))?;
        if *name == "tiny-1" {
            wait_ingress(lab, name)?;
        }
    }
    for (name, _, _, needle) in cases.iter().filter(|c| !c.3.is_empty()) {
        wait_event(lab, name, "AllocationFailed", needle)?;
        ensure!(ingress(lab, name)?.is_empty(), "{name} got an address anyway");
    }
    // Sharing conflict on a port.
    lab.apply(&lb_service(
        "share-a",
        &[("ferrolb.io/allow-shared-ip", "k"), ("ferrolb.io/loadBalancerIPs", "192.0.2.230")],
        "",
    ))?;
    wait_ingress(lab, "share-a")?;
    lab.apply(&lb_service(
        "share-clash",
        &[("ferrolb.io/allow-shared-ip", "k"), ("ferrolb.io/loadBalancerIPs", "192.0.2.230")],
        "",
    ))?;
    wait_event(lab, "share-clash", "AllocationFailed", "both use TCP port 80")?;
    // Nobody else was disturbed.
    ensure!(ingress(lab, "web")? == before, "web changed");
    lab.kubectl(&[
        "delete",
        "service",
        "taken",
        "outside",
        "wrongfamily",
        "nopool",
        "garbage",
        "tiny-1",
        "tiny-2",
        "share-a",
        "share-clash",
    ])?;
    lab.kubectl(&["delete", "ipaddresspool", "-n", "ferrolb-system", "tiny"])?;
    Ok(())
}

fn sharing(lab: &Lab) -> Result<()> {
    lab.apply(&lb_service("dns-tcp", &[("ferrolb.io/allow-shared-ip", "dns")], ""))?;
    let a = wait_ingress(lab, "dns-tcp")?;
    let udp = lb_service("dns-udp", &[("ferrolb.io/allow-shared-ip", "dns")], "").replace(
        "  - name: http\n    port: 80\n    targetPort: 80\n",
        "  - name: dns\n    port: 53\n    protocol: UDP\n",
    );
    lab.apply(&udp)?;
    let b = wait_ingress(lab, "dns-udp")?;
    ensure!(a == b, "dns-tcp {a:?} and dns-udp {b:?} should share");
    lab.kubectl(&["delete", "service", "dns-tcp", "dns-udp"])?;
    Ok(())
}

fn dual_stack(lab: &Lab) -> Result<()> {
    lab.apply(&lb_service("dual", &[], "  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n"))?;
    let ips = wait_for("both families", Duration::from_secs(20), || {
        let ips = ingress(lab, "dual")?;
        Ok((ips.len() == 2).then_some(ips))
    })?;
    ensure!(ips[0].starts_with("192.0.2.") && ips[1].starts_with("2001:db8:1::"), "dual got {ips:?}");
    lab.apply(&lb_service("v6first", &[], "  ipFamilyPolicy: PreferDualStack\n  ipFamilies: [IPv6, IPv4]\n"))?;
    let ips = wait_for("both families", Duration::from_secs(20), || {
        let ips = ingress(lab, "v6first")?;
        Ok((ips.len() == 2).then_some(ips))
    })?;
    ensure!(ips[0].contains(':'), "IPv6 first: {ips:?}");
    lab.kubectl(&["delete", "service", "dual", "v6first"])?;
    Ok(())
}

fn classes_and_release(lab: &Lab) -> Result<()> {
    lab.apply(&lb_service("other-class", &[], "  loadBalancerClass: example.com/other\n"))?;
    std::thread::sleep(Duration::from_secs(2));
    ensure!(ingress(lab, "other-class")?.is_empty(), "a service of another class got an address");
    ensure!(events(lab, "other-class", "AllocationFailed")?.is_empty(), "another class's service got events");

    lab.apply(&lb_service("ours-class", &[], "  loadBalancerClass: ferrolb.io/lb\n"))?;
    wait_ingress(lab, "ours-class")?;

    // Type changed to ClusterIP: status and annotation cleared, address free again.
    lab.apply(&lb_service("to-clusterip", &[("ferrolb.io/loadBalancerIPs", "192.0.2.235")], ""))?;
    wait_ingress(lab, "to-clusterip")?;
    lab.kubectl(&[
        "patch",
        "service",
        "to-clusterip",
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/type","value":"ClusterIP"}]"#,
    ])?;
    wait_for("status cleared", Duration::from_secs(20), || Ok(ingress(lab, "to-clusterip")?.is_empty().then_some(())))?;
    wait_event(lab, "to-clusterip", "IPReleased", "no longer a ferrolb LoadBalancer")?;
    lab.apply(&lb_service("reuse", &[("ferrolb.io/loadBalancerIPs", "192.0.2.235")], ""))?;
    ensure!(wait_ingress(lab, "reuse")? == ["192.0.2.235"], "the released address is free");

    // Deleted: the address is free again.
    lab.kubectl(&["delete", "service", "reuse"])?;
    lab.apply(&lb_service("reuse2", &[("ferrolb.io/loadBalancerIPs", "192.0.2.235")], ""))?;
    ensure!(wait_ingress(lab, "reuse2")? == ["192.0.2.235"], "the deleted service's address is free");
    lab.kubectl(&["delete", "service", "other-class", "ours-class", "to-clusterip", "reuse2"])?;
    Ok(())
}

fn invalid_pools(lab: &Lab) -> Result<()> {
    // Admission rejects what can be checked there.
    let bad = POOL.replace("name: lan", "name: malformed").replace("192.0.2.200-192.0.2.250", "192.0.2.300/24");
    let path = std::env::temp_dir().join("ferrolb-e2e-malformed.yaml");
    std::fs::write(&path, &bad)?;
    let out = output(lab.bin(), &["kubectl", "--", "apply", "-f", path.to_str().unwrap_or_default()])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success() && err.contains("must be a CIDR"), "malformed pool admitted: {err}");

    // An overlap can only be seen by the controller: reported on the pool, lan unaffected.
    let overlap = r#"
apiVersion: ferrolb.io/v1beta1
kind: IPAddressPool
metadata:
  name: overlap
  namespace: ferrolb-system
spec:
  addresses: [192.0.2.248/29]
"#;
    lab.apply(overlap)?;
    let cond = wait_for("the overlap pool marked not Valid", Duration::from_secs(20), || {
        let v = lab.kubectl_json(&["get", "ipaddresspool", "-n", "ferrolb-system", "overlap"])?;
        let c = v["status"]["conditions"].as_array().and_then(|cs| cs.iter().find(|c| c["type"] == "Valid").cloned());
        Ok(c.filter(|c| c["status"] == "False"))
    })?;
    ensure!(cond["message"].as_str().unwrap_or_default().contains("overlaps pool \"lan\""), "condition: {cond}");
    wait_for("an InvalidPool event on the overlap pool", Duration::from_secs(20), || {
        let ev = lab.kubectl(&[
            "get",
            "events",
            "-n",
            "ferrolb-system",
            "--field-selector",
            "involvedObject.name=overlap,reason=InvalidPool",
            "-o",
            "jsonpath={.items[*].message}",
        ])?;
        Ok(ev.contains("overlaps").then_some(()))
    })?;
    lab.apply(&lb_service("after-overlap", &[], ""))?;
    let ips = wait_ingress(lab, "after-overlap")?;
    ensure!(ips[0].starts_with("192.0.2.2"), "lan still serves: {ips:?}");
    let lan = lab.kubectl_json(&["get", "ipaddresspool", "-n", "ferrolb-system", "lan"])?;
    ensure!(lan["status"]["assignedIPv4"].as_i64().unwrap_or(0) >= 1, "lan status: {}", lan["status"]);
    let cols = lab.kubectl(&["get", "ipaddresspools", "-n", "ferrolb-system"])?;
    println!("{}", cols.lines().map(|l| format!("  {l}")).collect::<Vec<_>>().join("\n"));
    lab.kubectl(&["delete", "service", "after-overlap"])?;
    lab.kubectl(&["delete", "ipaddresspool", "-n", "ferrolb-system", "overlap"])?;
    Ok(())
}

fn pool_edit(lab: &Lab) -> Result<()> {
    let before = ingress(lab, "web")?;
    let shrunk = POOL.replace("192.0.2.200-192.0.2.250", "192.0.2.220-192.0.2.250");
    lab.apply(&shrunk)?;
    wait_event(lab, "web", "IPOutsidePool", "no longer in any IPAddressPool")?;
    ensure!(ingress(lab, "web")? == before, "web lost its address on a pool edit");
    lab.apply(POOL)?;
    Ok(())
}

fn metrics(_lab: &Lab) -> Result<()> {
    let guard = main_controller();
    let c = guard.as_ref().context("no controller")?;
    // The case before edits the pool and puts it back: the gauge follows within a sync.
    let want = "ferrolb_allocator_addresses_total{pool=\"lan\"} 102";
    let m = wait_for("the pool's 102 addresses in the metrics", Duration::from_secs(10), || {
        let m = c.metrics()?;
        Ok(m.contains(want).then_some(m))
    })
    .with_context(|| format!("metrics:\n{}", c.metrics().unwrap_or_default()))?;
    ensure!(m.contains("ferrolb_allocator_addresses_in_use_total{pool=\"lan\"}"), "metrics:\n{m}");
    ensure!(m.contains("ferrolb_controller_is_leader 1"), "metrics:\n{m}");
    let ready = run(
        "curl",
        &["-sS", "-o", "/dev/null", "-w", "%{http_code}", &format!("http://127.0.0.1:{}/readyz", c.metrics_port)],
    )?;
    ensure!(ready == "200", "readyz {ready}");
    Ok(())
}

fn metallb_compat(lab: &Lab) -> Result<()> {
    let crds = run(Controller::bin()?.with_file_name("crdgen").to_str().unwrap_or("crdgen"), &["--metallb"])?;
    let path = std::env::temp_dir().join("ferrolb-e2e-metallb-crds.yaml");
    std::fs::write(&path, crds)?;
    lab.kubectl(&["apply", "-f", path.to_str().unwrap_or_default()])?;
    lab.kubectl(&["wait", "--for=condition=Established", "crd/ipaddresspools.metallb.io", "--timeout=30s"])?;
    lab.kubectl(&["create", "namespace", "metallb-system"])?;
    lab.apply(
        r#"
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata:
  name: from-metallb
  namespace: metallb-system
spec:
  addresses: [198.18.201.0/30]
  autoAssign: false
"#,
    )?;
    // Restart the main replica with compatibility on.
    {
        let mut g = main_controller();
        if let Some(c) = g.as_mut() {
            c.stop();
        }
        *g = Some(Controller::start("ctl-a", 17472, &["--metallb-compat"])?);
    }
    lab.apply(&lb_service("from-metallb", &[("metallb.universe.tf/address-pool", "from-metallb")], ""))?;
    let ips = wait_ingress(lab, "from-metallb")?;
    ensure!(ips == ["198.18.201.0"], "from-metallb got {ips:?}");
    lab.kubectl(&["delete", "service", "from-metallb"])?;
    Ok(())
}

fn lease_holder(lab: &Lab) -> Result<String> {
    let v = lab.kubectl_json(&["get", "lease", "-n", "ferrolb-system", "ferrolb-controller"])?;
    Ok(v["spec"]["holderIdentity"].as_str().unwrap_or_default().to_string())
}

fn two_replicas(lab: &Lab) -> Result<()> {
    let mut b = Controller::start("ctl-b", 17473, &["--metallb-compat"])?;
    std::thread::sleep(Duration::from_secs(2));
    ensure!(lease_holder(lab)? == "ctl-a", "holder {}", lease_holder(lab)?);
    lab.apply(&lb_service("while-two", &[], ""))?;
    wait_ingress(lab, "while-two")?;
    // Exactly one writes: every event comes from ctl-a, and only ctl-a reports leading.
    let reporters = lab.kubectl(&[
        "get",
        "events",
        "-n",
        "default",
        "-o",
        "jsonpath={range .items[?(@.reportingComponent==\"ferrolb-controller\")]}{.reportingInstance}{\"\\n\"}{end}",
    ])?;
    let set: BTreeSet<&str> = reporters.lines().filter(|l| !l.is_empty()).collect();
    ensure!(set == BTreeSet::from(["ctl-a"]), "event writers: {set:?}");
    ensure!(b.metrics()?.contains("ferrolb_controller_is_leader 0"), "ctl-b thinks it leads");

    // SIGTERM: ctl-a gives the lease up and ctl-b takes over at once.
    let t = Instant::now();
    main_controller().as_mut().context("no controller")?.stop();
    wait_for("ctl-b to lead", Duration::from_secs(10), || Ok((lease_holder(lab)? == "ctl-b").then_some(())))?;
    println!("  takeover after SIGTERM: {:.2} s", t.elapsed().as_secs_f64());
    lab.apply(&lb_service("after-term", &[], ""))?;
    wait_ingress(lab, "after-term")?;

    // SIGKILL: ctl-a (restarted) takes over within the lease duration (6 s here).
    main_controller().as_mut().context("no controller")?.restart()?;
    std::thread::sleep(Duration::from_secs(1));
    let t = Instant::now();
    b.kill();
    wait_for("ctl-a to lead", Duration::from_secs(15), || Ok((lease_holder(lab)? == "ctl-a").then_some(())))?;
    println!("  takeover after SIGKILL: {:.2} s (lease duration 6 s)", t.elapsed().as_secs_f64());
    lab.apply(&lb_service("after-kill", &[], ""))?;
    wait_ingress(lab, "after-kill")?;
    lab.kubectl(&["delete", "service", "while-two", "after-term", "after-kill"])?;
    Ok(())
}

/// The leader's reconcile loop panics (the `FERROLB_FAULT_END_TASK` hook) as soon as it leads:
/// the controller says which task ended, gives the lease up for a standby, and exits 1.
fn leadership_dies(lab: &Lab) -> Result<()> {
    const LEASE: &str = "fault-leadership";
    let log = std::env::temp_dir().join("ferrolb-e2e-ctl-fault.log");
    let mut child = std::process::Command::new(Controller::bin()?)
        .args(["--identity=ctl-fault", "--metrics-addr=127.0.0.1:17479", "--lease-duration=6"])
        .arg(format!("--lease-name={LEASE}"))
        .env("KUBECONFIG", "/run/ferrolb-lab/kubeconfig")
        .env("FERROLB_FAULT_END_TASK", "leadership")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let t = Instant::now();
    let status = wait_for("the faulty controller to exit", Duration::from_secs(30), || Ok(child.try_wait()?));
    if status.is_err() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let status = status?;
    let err = std::fs::read_to_string(&log)?;
    println!("  exited {:.1} s after start", t.elapsed().as_secs_f64());
    ensure!(status.code() == Some(1), "exit status {status}; log:\n{err}");
    ensure!(
        err.contains("the leadership task panicked") && err.contains("exiting"),
        "the log must name the task:\n{err}"
    );
    let lease = lab.kubectl_json(&["get", "lease", "-n", "ferrolb-system", LEASE])?;
    let holder = lease["spec"]["holderIdentity"].as_str().unwrap_or_default();
    ensure!(holder.is_empty(), "the lease must be given up, it is held by {holder:?}");
    lab.kubectl(&["delete", "lease", "-n", "ferrolb-system", LEASE])?;
    Ok(())
}

fn restarts(lab: &Lab) -> Result<()> {
    // 200 addresses: more than the demo range has.
    lab.apply(
        r#"
apiVersion: ferrolb.io/v1beta1
kind: IPAddressPool
metadata:
  name: bulk
  namespace: ferrolb-system
spec:
  addresses: [198.18.100.0/24]
  autoAssign: false
"#,
    )?;
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut changes = 0;
    let names: Vec<String> = (0..200).map(|i| format!("many-{i:03}")).collect();
    let observe = |seen: &mut BTreeMap<String, Vec<String>>| -> Result<usize> {
        let v = lab.kubectl_json(&["get", "services", "-n", "default", "-l", "bulk=yes"])?;
        let mut changed = 0;
        for s in v["items"].as_array().into_iter().flatten() {
            let name = s["metadata"]["name"].as_str().unwrap_or_default().to_string();
            let ips: Vec<String> = s["status"]["loadBalancer"]["ingress"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| i["ip"].as_str().map(str::to_string))
                .collect();
            if ips.is_empty() {
                continue;
            }
            match seen.get(&name) {
                Some(prev) if *prev != ips => changed += 1,
                _ => {}
            }
            seen.insert(name, ips);
        }
        Ok(changed)
    };
    for (batch, chunk) in names.chunks(20).enumerate() {
        let yaml: String = chunk
            .iter()
            .map(|n| {
                lb_service(n, &[("ferrolb.io/address-pool", "bulk")], "").replacen(
                    "  namespace: default\n",
                    "  namespace: default\n  labels: {bulk: \"yes\"}\n",
                    1,
                )
            })
            .collect::<Vec<_>>()
            .join("---\n");
        lab.apply(&yaml)?;
        // Restart the controller while services arrive: SIGKILL half the time, SIGTERM the rest.
        {
            let mut g = main_controller();
            let c = g.as_mut().context("no controller")?;
            if batch % 2 == 0 {
                c.kill()
            } else {
                c.stop()
            }
            c.restart()?;
        }
        changes += observe(&mut seen)?;
    }
    wait_for("all 200 services to have an address", Duration::from_secs(90), || {
        changes += observe(&mut seen)?;
        Ok((seen.len() == 200).then_some(()))
    })?;
    std::thread::sleep(Duration::from_secs(2));
    changes += observe(&mut seen)?;
    let mut by_ip: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (name, ips) in &seen {
        for ip in ips {
            by_ip.entry(ip.as_str()).or_default().push(name.as_str());
        }
    }
    let dups: Vec<_> = by_ip.iter().filter(|(_, v)| v.len() > 1).collect();
    println!("  200 services, 10 controller restarts: {changes} address changes, {} duplicates", dups.len());
    ensure!(changes == 0, "{changes} services changed address");
    ensure!(dups.is_empty(), "duplicates: {dups:?}");
    Ok(())
}

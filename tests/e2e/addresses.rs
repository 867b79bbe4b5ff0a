//! Addresses cannot be stolen, end to end in the lab: an externalIP naming another Service's
//! ClusterIP takes nothing from it, a sharing key does not cross namespaces unless both sides
//! opt in, `--external-ip-cidrs` restricts externalIPs, and two of kube-proxy's packet flows:
//! unallocated service-CIDR addresses are dropped on the node, and a source range holding the
//! node's address admits the node's own LB-IP-sourced traffic (allowFromNode).
//!
//! Needs root (it brings up its own lab); fails loudly without it.

use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ferrolb_e2e::{
    Case, Controller, Lab, Speaker, answer, cluster_ip_of, events, lb_ip, run_suite, svc, url, wait_event, wait_for,
};

static SPEAKERS: Mutex<Vec<Speaker>> = Mutex::new(Vec::new());
static CONTROLLER: Mutex<Option<Controller>> = Mutex::new(None);

/// An address of the lab's service CIDR (198.19.0.0/16) that the API server hands out last.
const UNALLOCATED: &str = "198.19.255.254";

fn main() -> ExitCode {
    let cases: &[Case] = &[
        ("setup_lab_demo_controller_and_speakers", setup),
        ("an_external_ip_never_takes_another_services_cluster_ip", external_ip_on_a_cluster_ip),
        ("a_sharing_key_crosses_namespaces_only_when_both_opt_in", sharing_across_namespaces),
        ("external_ip_cidrs_restrict_which_external_ips_are_honoured", external_ip_cidrs),
        ("an_unallocated_service_cidr_address_goes_nowhere", unallocated_service_cidr_address),
        ("a_source_range_holding_the_node_admits_its_own_lb_ip_source", allow_from_node),
    ];
    let code = run_suite("addresses", cases);
    SPEAKERS.lock().map(|mut s| s.clear()).ok();
    code
}

const FIXTURES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: a}
---
apiVersion: v1
kind: Namespace
metadata: {name: b}
---
apiVersion: v1
kind: Namespace
metadata: {name: c}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: thief, namespace: a}
spec:
  replicas: 1
  selector: {matchLabels: {app: thief}}
  template:
    metadata: {labels: {app: thief}}
    spec:
      containers:
      - {name: web, image: alicek106/rr-test:echo-hostname, ports: [{containerPort: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: from-node}
spec:
  type: LoadBalancer
  selector: {app: webserver}
  loadBalancerSourceRanges: [192.0.2.0/28]
  ports: [{port: 80, targetPort: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: not-from-node}
spec:
  type: LoadBalancer
  selector: {app: webserver}
  loadBalancerSourceRanges: [198.51.100.0/24]
  ports: [{port: 80, targetPort: 80}]
"#;

fn setup(lab: &Lab) -> Result<()> {
    lab.lab(&["up"])?;
    ferrolb_e2e::ferrolb_system(lab, &["192.0.2.200-192.0.2.250"])?;
    ferrolb_e2e::apply_demo(lab)?;
    lab.apply(FIXTURES)?;
    lab.kubectl(&["rollout", "status", "deployment/hostname", "--timeout=60s"])?;
    lab.kubectl(&["rollout", "status", "-n", "a", "deployment/thief", "--timeout=60s"])?;
    let (controller, speakers) = ferrolb_e2e::start_ferrolb(lab, 17476, &[])?;
    *CONTROLLER.lock().unwrap_or_else(|e| e.into_inner()) = Some(controller);
    *SPEAKERS.lock().unwrap_or_else(|e| e.into_inner()) = speakers;
    Ok(())
}

/// Before, the rules of the first Service by namespace/name took a contested address . port:
/// `a/thief` sorts before `default/hostname-svc-clusterip`, so the ClusterIP went to the thief's
/// pod on every node, and nobody was told.
fn external_ip_on_a_cluster_ip(lab: &Lab) -> Result<()> {
    let victim = cluster_ip_of(lab, "hostname-svc-clusterip", 0)?;
    lab.apply(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: thief, namespace: a}}\nspec:\n  selector: {{app: thief}}\n  \
         externalIPs: [{victim}]\n  ports: [{{port: 8080, targetPort: 80}}]\n"
    ))?;
    // Every speaker has read the thief once it has complained (one Event per node at most).
    let ev = wait_event(lab, "a/thief", "ExternalIPConflict", &victim)?;
    ensure!(
        ev.contains("ClusterIP of Service default/hostname-svc-clusterip") && ev.contains("spec.externalIPs"),
        "the Event does not say whose address it is and what to change: {ev}"
    );
    for node in ["node-1", "node-2", "node-3"] {
        for _ in 0..6 {
            let (pod, _) = answer(&lab.curl(node, &url(&victim, 8080))?)?;
            ensure!(
                pod.starts_with("hostname-"),
                "{node}: the ClusterIP {victim}:8080 reached {pod}, not a hostname pod"
            );
        }
    }
    Ok(())
}

/// The controller's `AllocationFailed` Events on `name`.
fn refusals(lab: &Lab, name: &str) -> Result<String> {
    events(lab, name, "AllocationFailed")
}

/// Before, a sharing key was enough: any namespace that learned it landed on the address.
fn sharing_across_namespaces(lab: &Lab) -> Result<()> {
    let service = |ns: &str, name: &str, port: u16, extra: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}\n  annotations:\n    \
             ferrolb.io/allow-shared-ip: team\n{extra}spec:\n  type: LoadBalancer\n  selector: {{app: webserver}}\n  \
             ports: [{{port: {port}, targetPort: 80}}]\n"
        )
    };
    lab.apply(&service("default", "share-a", 8090, ""))?;
    let a_ip = lb_ip(lab, "share-a")?;
    // Same key, another port, asking for A's address from namespace b: refused.
    let ask = format!("    ferrolb.io/loadBalancerIPs: {a_ip}\n");
    lab.apply(&service("b", "share-b", 8091, &ask))?;
    let ev = wait_event(lab, "b/share-b", "AllocationFailed", "ferrolb.io/allow-shared-ip-namespaces")?;
    ensure!(ev.contains(&a_ip) && ev.contains("default/share-a"), "the refusal: {ev}");
    let ingress = svc(lab, "b/share-b")?["status"]["loadBalancer"]["ingress"].clone();
    ensure!(ingress.as_array().is_none_or(Vec::is_empty), "b/share-b got an address anyway: {ingress}");
    // Asking for nothing: an address of its own.
    lab.apply(&service("b", "share-auto", 8092, ""))?;
    let auto = lb_ip(lab, "b/share-auto")?;
    ensure!(auto != a_ip, "b/share-auto landed on default/share-a's {a_ip}");

    // One side opting in is not enough.
    let opt_in = |ns: &str| format!("    ferrolb.io/allow-shared-ip-namespaces: {ns}\n");
    lab.apply(&service("b", "share-b", 8091, &format!("{ask}{}", opt_in("default"))))?;
    std::thread::sleep(Duration::from_secs(2));
    ensure!(svc(lab, "b/share-b")?["status"]["loadBalancer"]["ingress"].as_array().is_none_or(Vec::is_empty));
    // Both sides: shared.
    lab.apply(&service("default", "share-a", 8090, &opt_in("b, c")))?;
    let b_ip = lb_ip(lab, "b/share-b")?;
    ensure!(b_ip == a_ip, "with both opted in, b/share-b got {b_ip}, not {a_ip}");
    ensure!(lb_ip(lab, "share-a")? == a_ip, "default/share-a moved");
    ensure!(refusals(lab, "share-a")?.is_empty(), "default/share-a was refused something");
    Ok(())
}

/// Before, the speaker had no such flag (it refused to start with it) and honoured any address.
fn external_ip_cidrs(lab: &Lab) -> Result<()> {
    {
        let mut speakers = SPEAKERS.lock().unwrap_or_else(|e| e.into_inner());
        speakers[0].restart_with(&["--external-ip-cidrs=203.0.113.0/24"])?;
    }
    lab.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: outside, namespace: c}\nspec:\n  selector: {app: none}\n  \
         externalIPs: [198.51.100.77, 203.0.113.77]\n  ports: [{port: 80}]\n",
    )?;
    let ev = wait_event(lab, "c/outside", "ExternalIPNotAllowed", "198.51.100.77")?;
    ensure!(!ev.contains("203.0.113.77 left out") && ev.contains("203.0.113.0/24"), "the Event: {ev}");
    let elements = |node: &str| -> Result<String> {
        let mut all = String::new();
        for map in ["service-ips", "no-endpoint-services"] {
            all.push_str(&lab.exec(node, &["nft", "list", "map", "ip", "ferrolb", map])?);
        }
        Ok(all)
    };
    wait_for("node-1 to program the allowed externalIP", Duration::from_secs(20), || {
        Ok(elements("node-1")?.contains("203.0.113.77 . tcp . 80").then_some(()))
    })?;
    let one = elements("node-1")?;
    ensure!(!one.contains("198.51.100.77"), "node-1 programmed an externalIP outside its CIDRs:\n{one}");
    // A speaker without the flag honours any address, as kube-proxy.
    wait_for("node-2 to program both externalIPs", Duration::from_secs(20), || {
        let two = elements("node-2")?;
        Ok((two.contains("198.51.100.77 . tcp . 80") && two.contains("203.0.113.77 . tcp . 80")).then_some(()))
    })?;
    let mut speakers = SPEAKERS.lock().unwrap_or_else(|e| e.into_inner());
    speakers[0].restart()
}

/// Before, a connection from a node to an address of the service CIDR that no Service holds
/// left the node untranslated: the lab's on-link route for the CIDR (a real node's default
/// route) made node-1 ask the LAN who has it.
fn unallocated_service_cidr_address(lab: &Lab) -> Result<()> {
    let cidrs = lab.kubectl(&["get", "servicecidrs", "-o", "jsonpath={.items[*].spec.cidrs[*]}"])?;
    ensure!(cidrs.contains("198.19.0.0/16"), "the lab's ServiceCIDRs: {cidrs:?}");
    let all = lab.kubectl_json(&["get", "services", "-A"])?;
    let taken =
        all["items"].as_array().into_iter().flatten().any(|s| {
            s["spec"]["clusterIPs"].as_array().into_iter().flatten().any(|ip| ip.as_str() == Some(UNALLOCATED))
        });
    ensure!(!taken, "{UNALLOCATED} is some Service's ClusterIP: pick another");
    wait_for("node-1's table to drop the service CIDR", Duration::from_secs(20), || {
        let chain = lab.exec("node-1", &["nft", "list", "chain", "ip", "ferrolb", "cluster-ips-check"])?;
        Ok(chain.contains("198.19.0.0/16").then_some(()))
    })?;
    let _ = lab.exec("node-1", &["ip", "neigh", "flush", "to", UNALLOCATED]);
    let r = lab.exec("node-1", &["curl", "-sS", "--max-time", "2", &url(UNALLOCATED, 80)]);
    ensure!(r.is_err(), "a connection to the unallocated {UNALLOCATED} succeeded: {r:?}");
    let neigh = lab.exec("node-1", &["ip", "neigh", "show", "to", UNALLOCATED])?;
    ensure!(neigh.trim().is_empty(), "node-1 asked the LAN for {UNALLOCATED}: {neigh}");
    // Allocated addresses of the CIDR still work.
    let cip = cluster_ip_of(lab, "hostname-svc-clusterip", 0)?;
    answer(&lab.curl("node-1", &url(&cip, 8080))?).map(drop)
}

/// With the LB IP on the node's `lo` (as IPVS and other setups put it), the node's connections
/// to it leave from the LB IP itself. Before, a source range holding the node's address did not
/// admit them (kube-proxy's allowFromNode), so the node could not reach its own Service.
fn allow_from_node(lab: &Lab) -> Result<()> {
    for (service, open) in [("from-node", true), ("not-from-node", false)] {
        let ip = lb_ip(lab, service)?;
        lab.exec("node-1", &["ip", "addr", "add", &format!("{ip}/32"), "dev", "lo"])?;
        let route = lab.exec("node-1", &["ip", "route", "get", &ip]);
        let r = lab.curl("node-1", &url(&ip, 80));
        lab.exec("node-1", &["ip", "addr", "del", &format!("{ip}/32"), "dev", "lo"])?;
        let route = route?;
        ensure!(route.contains(&format!("src {ip}")), "node-1 would not send from {ip}: {route}");
        match (open, r) {
            (true, Ok(body)) => {
                answer(&body).with_context(|| format!("{service}: {body}"))?;
            }
            (true, Err(e)) => anyhow::bail!("{service} ({ip}) refused node-1's own connection: {e:#}"),
            (false, Ok(body)) => anyhow::bail!("{service} ({ip}) let node-1 in without a range for it: {body}"),
            (false, Err(_)) => {}
        }
    }
    Ok(())
}

//! `up`, `down` and `status`: putting the lab together and taking it apart.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::ListParams;

use crate::paths::Paths;
use crate::plan::Plan;
use crate::{bins, control_plane, netns, pki, procs};

/// Fails with one clear line unless we are root.
pub fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the lab creates network namespaces and starts the control plane, which needs root: run it as root (sudo)"
        );
    }
    Ok(())
}

fn agent_name(node: &str) -> String {
    format!("agent-{node}")
}

/// The plan of the lab that is up (or half up), if any.
pub fn current_plan(paths: &Paths) -> Option<Plan> {
    serde_json::from_slice(&std::fs::read(paths.plan()).ok()?).ok()
}

/// Brings the lab up, or completes a half-started one; harmless on a running lab.
pub async fn up(paths: &Paths, plan: Plan) -> Result<()> {
    let start = Instant::now();
    require_root()?;
    plan.validate().map_err(anyhow::Error::msg)?;
    bins::check_all()?;
    if let Some(existing) = current_plan(paths)
        && existing != plan
    {
        bail!(
            "a lab with {} nodes ({:?}) is already up: run 'ferrolb-lab down' first to make one with {} nodes ({:?})",
            existing.nodes,
            existing.family,
            plan.nodes,
            plan.family
        );
    }
    std::fs::create_dir_all(&paths.root)?;
    std::fs::write(paths.plan(), serde_json::to_vec_pretty(&plan)?)?;

    pki::ensure(paths, &plan).context("creating the lab's certificates")?;
    netns::ensure_control_plane(&plan).context("creating the control-plane namespace and the LAN")?;
    for host in plan.hosts() {
        netns::ensure_host(&plan, &host).with_context(|| format!("creating host {}", host.name))?;
    }
    netns::ensure_routes(&plan).context("routing the pod CIDRs")?;
    eprintln!("lab: network ready ({} hosts) after {:.1} s", plan.hosts().len(), start.elapsed().as_secs_f64());

    control_plane::ensure(paths, &plan).await?;
    eprintln!("lab: control plane ready after {:.1} s", start.elapsed().as_secs_f64());

    let exe = std::env::current_exe().context("locating the ferrolb-lab binary")?;
    for node in plan.nodes() {
        let name = agent_name(&node.name);
        if procs::running(paths, &name).is_some() {
            continue;
        }
        let index = node.index.unwrap_or_default();
        let args = vec![
            "agent".to_string(),
            format!("--node={}", node.name),
            format!("--index={index}"),
            format!("--lab-dir={}", paths.root.display()),
        ];
        procs::spawn(paths, &name, Some(&node.name), &exe, &args)?;
    }
    wait_nodes_ready(paths, &plan, Duration::from_secs(90)).await?;
    control_plane::wait_settled(paths).await?;
    eprintln!("lab: {} nodes Ready after {:.1} s", plan.nodes, start.elapsed().as_secs_f64());
    println!("{}", paths.kubeconfig().display());
    Ok(())
}

async fn wait_nodes_ready(paths: &Paths, plan: &Plan, timeout: Duration) -> Result<()> {
    let client = crate::kube_client(paths).await?;
    let nodes: Api<Node> = Api::all(client);
    let deadline = Instant::now() + timeout;
    loop {
        for node in plan.nodes() {
            let name = agent_name(&node.name);
            if procs::running(paths, &name).is_none() {
                return Err(procs::died(paths, &name));
            }
        }
        let ready = nodes
            .list(&ListParams::default())
            .await
            .map(|l| l.items.iter().filter(|n| node_ready(n)).count())
            .unwrap_or(0);
        if ready >= usize::from(plan.nodes) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "only {ready} of {} nodes became Ready within {} s; see the agent logs in {}",
                plan.nodes,
                timeout.as_secs(),
                paths.logs().display()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub fn node_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// What `down` found left over afterwards; empty when the machine is clean.
pub fn leftovers(paths: &Paths) -> Vec<String> {
    let mut v = Vec::new();
    v.extend(netns::lab_namespaces().into_iter().map(|n| format!("network namespace {n}")));
    v.extend(netns::lab_links().into_iter().map(|l| format!("link {l}")));
    let needle = paths.root.display().to_string();
    v.extend(procs::pids_mentioning(&needle).into_iter().map(|p| format!("process {p}")));
    if paths.root.exists() {
        v.push(format!("directory {}", paths.root.display()));
    }
    v
}

/// Stops every process and removes every namespace, link and file the lab made.
/// Works on a running, half-started or already removed lab.
pub fn down(paths: &Paths) -> Result<()> {
    require_root()?;
    let needle = paths.root.display().to_string();

    // Agents first, so that nothing restarts the pods while they are being stopped.
    let agents: Vec<i32> = std::fs::read_dir(paths.pids())
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with("agent-"))
                .filter_map(|e| std::fs::read_to_string(e.path()).ok()?.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let mut stuck = procs::stop_all(&agents, Duration::from_secs(5));

    // Everything still running in a lab namespace: pods, and whatever a test started there.
    let namespaces = netns::lab_namespaces();
    let in_ns: Vec<i32> = namespaces.iter().flat_map(|n| netns::pids_in(n)).collect();
    stuck.extend(procs::stop_all(&in_ns, Duration::from_secs(5)));

    // The control plane, newest first, then any stray process that names the lab directory.
    let mut cp: Vec<i32> = control_plane::COMPONENTS.iter().rev().filter_map(|c| procs::running(paths, c)).collect();
    cp.extend(procs::pids_mentioning(&needle));
    stuck.extend(procs::stop_all(&cp, Duration::from_secs(10)));
    // Only once every process is gone (its ports free), so an `up` right after meets none.
    if !stuck.is_empty() {
        let names: Vec<String> = stuck.iter().map(|&p| procs::describe(p)).collect();
        bail!(
            "these lab processes did not exit even after SIGKILL: {}; see 'cat /proc/PID/stack', then run 'ferrolb-lab down' again",
            names.join(", ")
        );
    }

    for ns in netns::lab_namespaces() {
        let _ = netns::delete_netns(&ns);
    }
    for link in netns::lab_links() {
        let _ = netns::delete_link(&link);
    }
    if paths.root.exists() {
        std::fs::remove_dir_all(&paths.root).with_context(|| format!("removing {}", paths.root.display()))?;
    }
    let left = leftovers(paths);
    if !left.is_empty() {
        bail!("the lab could not remove: {}; run 'ferrolb-lab down' again", left.join(", "));
    }
    Ok(())
}

/// A short report: the plan, each process, each node.
pub async fn status(paths: &Paths) -> Result<()> {
    let Some(plan) = current_plan(paths) else {
        println!("lab: down ({} does not exist)", paths.plan().display());
        return Ok(());
    };
    println!("lab: {} nodes, {:?}; kubeconfig {}", plan.nodes, plan.family, paths.kubeconfig().display());
    let mut names: Vec<String> = control_plane::COMPONENTS.iter().map(|s| s.to_string()).collect();
    names.extend(plan.nodes().iter().map(|n| agent_name(&n.name)));
    for n in &names {
        match procs::running(paths, n) {
            Some(pid) => println!("  {n:<26} running (pid {pid})"),
            None => println!("  {n:<26} NOT RUNNING (log: {})", paths.log(n).display()),
        }
    }
    for h in plan.hosts() {
        let ok = if netns::netns_exists(&h.name) { "present" } else { "MISSING" };
        let addrs: Vec<String> = h.addrs().iter().map(|a| a.to_string()).collect();
        println!("  host {:<21} {ok:<8} {}", h.name, addrs.join(" "));
    }
    match crate::kube_client(paths).await {
        Ok(client) => match Api::<Node>::all(client).list(&ListParams::default()).await {
            Ok(list) => {
                for n in list.items {
                    let name = n.metadata.name.clone().unwrap_or_default();
                    let ready = if node_ready(&n) { "Ready" } else { "NotReady" };
                    let cordoned = n.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false);
                    let cidrs = n.spec.as_ref().and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
                    println!(
                        "  node {name:<21} {ready}{} pods {}",
                        if cordoned { ",SchedulingDisabled" } else { "" },
                        cidrs.join(",")
                    );
                }
            }
            Err(e) => println!("  API server: not answering ({e})"),
        },
        Err(e) => println!("  API server: no client ({e})"),
    }
    Ok(())
}

/// The path of the kubectl binary, for `ferrolb-lab kubectl`.
pub fn kubectl() -> Result<PathBuf> {
    bins::path("kubectl")
}

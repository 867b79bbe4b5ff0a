//! The node agent: a minimal kubelet for one lab node, running in the node's network
//! namespace. `node` keeps the Node Ready (status and heartbeat Lease); `pods` runs the
//! pods bound to the node as local processes; `images` maps images to programs; `ipam`
//! hands out pod addresses; `probe` runs readiness probes.

pub mod images;
pub mod ipam;
pub mod node;
pub mod pods;
pub mod probe;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::runtime::events::{Recorder, Reporter};

use crate::lifecycle::current_plan;
use crate::paths::Paths;

/// Runs the agent of node `index` until it is killed.
pub async fn run(paths: Paths, index: u8, bin_dir: Option<PathBuf>) -> Result<()> {
    let plan = current_plan(&paths).context("no lab plan: is the lab up?")?;
    let host = plan.node(index);
    let client = crate::kube_client_in_lab(&paths).await?;
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let since = node::now();
    node::register(&nodes, &plan, &host, &since).await?;
    tokio::spawn(node::heartbeat(nodes, leases, host.clone(), since));

    pods::remove_stale_pods(&host);
    let self_exe = std::env::current_exe().context("locating ferrolb-lab")?;
    let bin_dir = bin_dir.or_else(|| self_exe.parent().map(PathBuf::from)).unwrap_or_default();
    let recorder = Recorder::new(
        client.clone(),
        Reporter { controller: "ferrolb-lab-agent".into(), instance: Some(host.name.clone()) },
    );
    let ctx = Arc::new(pods::Ctx {
        client,
        ipam: Mutex::new(ipam::Ipam::new(host.pod_cidrs(plan.family))),
        plan,
        host,
        paths,
        recorder,
        bin_dir,
        self_exe,
    });
    tracing::info!(node = %ctx.host.name, "node agent running");
    pods::run(ctx).await
}

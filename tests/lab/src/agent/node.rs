//! The node's side of the kubelet contract: register the Node (with its pod CIDRs from the
//! address plan, which the controller-manager's node IPAM then records as taken), post its
//! status, and renew its heartbeat Lease in `kube-node-lease`.

use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;

use crate::bins::K8S_VERSION;
use crate::plan::{Host, Plan};

/// Field manager of everything the agent writes.
pub const MANAGER: &str = "ferrolb-lab-agent";
/// How often status and Lease are renewed; the Lease lasts four times that.
pub const HEARTBEAT: Duration = Duration::from_secs(10);

pub fn now() -> serde_json::Value {
    serde_json::to_value(Time(Timestamp::now())).unwrap_or(serde_json::Value::Null)
}

/// The Node object the agent registers (pure).
pub fn node_object(plan: &Plan, host: &Host) -> Node {
    let cidrs: Vec<String> = host.pod_cidrs(plan.family).iter().map(|c| c.to_string()).collect();
    let v = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": host.name,
            "labels": {
                "kubernetes.io/hostname": host.name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
            },
        },
        "spec": { "podCIDR": cidrs.first(), "podCIDRs": cidrs },
    });
    serde_json::from_value(v).unwrap_or_default()
}

/// The Node status the agent posts (pure, but for the timestamps).
/// `since` is when the agent started: the conditions' last transition.
pub fn node_status(host: &Host, since: &serde_json::Value) -> serde_json::Value {
    let now = now();
    let mut addresses: Vec<serde_json::Value> =
        host.addrs().iter().map(|a| json!({"type": "InternalIP", "address": a.to_string()})).collect();
    addresses.push(json!({"type": "Hostname", "address": host.name}));
    let cond = |t: &str, status: &str, reason: &str, message: &str| {
        json!({"type": t, "status": status, "reason": reason, "message": message,
               "lastHeartbeatTime": now, "lastTransitionTime": since})
    };
    let resources = json!({"cpu": "4", "memory": "8Gi", "pods": "110", "ephemeral-storage": "20Gi"});
    json!({
        "status": {
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "the lab agent has sufficient memory"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "the lab agent has no disk pressure"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "the lab agent has sufficient PIDs"),
                cond("Ready", "True", "KubeletReady", "the ferrolb lab node agent is posting ready status"),
            ],
            "addresses": addresses,
            "capacity": resources,
            "allocatable": resources,
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {
                "machineID": host.name, "systemUUID": host.name, "bootID": host.name,
                "kernelVersion": kernel_version(), "osImage": "ferrolb-lab",
                "containerRuntimeVersion": "ferrolb-lab://0.1.0",
                "kubeletVersion": K8S_VERSION, "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
            },
        }
    })
}

fn kernel_version() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// Creates the Node if it does not exist, then posts its status once.
pub async fn register(nodes: &Api<Node>, plan: &Plan, host: &Host, since: &serde_json::Value) -> Result<()> {
    match nodes.create(&PostParams::default(), &node_object(plan, host)).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(e).context("registering the Node"),
    }
    post_status(nodes, host, since).await
}

pub async fn post_status(nodes: &Api<Node>, host: &Host, since: &serde_json::Value) -> Result<()> {
    nodes
        .patch_status(&host.name, &PatchParams::default(), &Patch::Merge(node_status(host, since)))
        .await
        .context("posting Node status")?;
    Ok(())
}

/// Renews (or creates) the node's heartbeat Lease.
pub async fn renew_lease(leases: &Api<Lease>, node: &Node) -> Result<()> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": name,
            "namespace": "kube-node-lease",
            "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": name,
                                  "uid": node.metadata.uid.clone().unwrap_or_default()}],
        },
        "spec": {
            "holderIdentity": name,
            "leaseDurationSeconds": HEARTBEAT.as_secs() * 4,
            "renewTime": serde_json::to_value(MicroTime(Timestamp::now()))?,
        }
    });
    leases
        .patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(lease))
        .await
        .context("renewing the node Lease")?;
    Ok(())
}

/// Posts status and renews the Lease every heartbeat, for ever; errors are logged and retried.
pub async fn heartbeat(nodes: Api<Node>, leases: Api<Lease>, host: Host, since: serde_json::Value) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    loop {
        tick.tick().await;
        if let Err(e) = post_status(&nodes, &host, &since).await {
            tracing::warn!(error = %format!("{e:#}"), "node status");
        }
        match nodes.get(&host.name).await {
            Ok(node) => {
                if let Err(e) = renew_lease(&leases, &node).await {
                    tracing::warn!(error = %format!("{e:#}"), "node lease");
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading own Node"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::IpFamily;

    #[test]
    fn node_carries_pod_cidrs_and_addresses_of_the_plan() {
        let plan = Plan { nodes: 2, family: IpFamily::Dual };
        let host = plan.node(2);
        let n = node_object(&plan, &host);
        let spec = n.spec.unwrap();
        assert_eq!(spec.pod_cidr.as_deref(), Some("198.18.2.0/24"));
        assert_eq!(spec.pod_cidrs.unwrap(), ["198.18.2.0/24", "2001:db8:100:2::/64"]);
        let st = node_status(&host, &now());
        let addrs: Vec<&str> =
            st["status"]["addresses"].as_array().unwrap().iter().map(|a| a["address"].as_str().unwrap()).collect();
        assert_eq!(addrs, ["192.0.2.12", "2001:db8:1::12", "node-2"]);
    }
}

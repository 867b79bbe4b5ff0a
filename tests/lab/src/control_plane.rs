//! The control plane: etcd, kube-apiserver, kube-controller-manager and kube-scheduler of
//! the pinned release, as processes in the control-plane namespace. The API server listens
//! on every address there: 192.0.2.1:6443 on the LAN for hosts and pods, 198.18.0.2:6443
//! for the root namespace. Being in a namespace of their own, their ports cannot collide with
//! anything on the machine.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::paths::Paths;
use crate::plan::{
    API_PORT, CONTROL_PLANE_NS, CONTROL_PLANE_V4, ETCD_CLIENT_PORT, ETCD_PEER_PORT, NODE_PORT_RANGE, Plan,
};
use crate::{bins, procs};

/// The control-plane processes, in start order.
pub const COMPONENTS: &[&str] = &["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"];

fn s<T: ToString>(v: T) -> String {
    v.to_string()
}

/// Command-line arguments of one component (pure, so it can be read and tested).
pub fn args(component: &str, paths: &Paths, plan: &Plan) -> Vec<String> {
    let pki = |f: &str| paths.pki_file(f).display().to_string();
    let etcd_url = format!("http://127.0.0.1:{ETCD_CLIENT_PORT}");
    match component {
        "etcd" => vec![
            s("--name=ferrolb-lab"),
            format!("--data-dir={}", paths.etcd_data().display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls=http://127.0.0.1:{ETCD_PEER_PORT}"),
            format!("--initial-advertise-peer-urls=http://127.0.0.1:{ETCD_PEER_PORT}"),
            format!("--initial-cluster=ferrolb-lab=http://127.0.0.1:{ETCD_PEER_PORT}"),
            // A throwaway lab: durability on power loss is not worth the fsync latency.
            s("--unsafe-no-fsync=true"),
            s("--log-level=warn"),
        ],
        "kube-apiserver" => vec![
            format!("--etcd-servers={etcd_url}"),
            s("--bind-address=0.0.0.0"),
            format!("--advertise-address={CONTROL_PLANE_V4}"),
            format!("--secure-port={API_PORT}"),
            format!("--service-cluster-ip-range={}", plan.service_cidrs()),
            format!("--service-node-port-range={NODE_PORT_RANGE}"),
            s("--authorization-mode=Node,RBAC"),
            s("--enable-admission-plugins=NodeRestriction"),
            s("--allow-privileged=true"),
            format!("--client-ca-file={}", pki("ca.crt")),
            format!("--tls-cert-file={}", pki("apiserver.crt")),
            format!("--tls-private-key-file={}", pki("apiserver.key")),
            s("--service-account-issuer=https://kubernetes.default.svc.cluster.local"),
            format!("--service-account-key-file={}", pki("sa.pub")),
            format!("--service-account-signing-key-file={}", pki("sa.key")),
            s("--api-audiences=https://kubernetes.default.svc.cluster.local"),
            s("--profiling=false"),
            s("--v=1"),
        ],
        "kube-controller-manager" => {
            let mut v = vec![
                format!("--kubeconfig={}", paths.component_kubeconfig("kube-controller-manager").display()),
                s("--controllers=*"),
                s("--allocate-node-cidrs=true"),
                format!("--cluster-cidr={}", plan.cluster_cidrs()),
                s("--node-cidr-mask-size-ipv4=24"),
                format!("--service-cluster-ip-range={}", plan.service_cidrs()),
                s("--use-service-account-credentials=true"),
                format!("--service-account-private-key-file={}", pki("sa.key")),
                format!("--root-ca-file={}", pki("ca.crt")),
                format!("--cluster-signing-cert-file={}", pki("ca.crt")),
                format!("--cluster-signing-key-file={}", pki("ca.key")),
                s("--leader-elect=false"),
                // No serving port: nothing scrapes it, and it cannot collide with anything.
                s("--secure-port=0"),
                s("--profiling=false"),
                s("--v=1"),
            ];
            // The controller-manager refuses an IPv6 mask size in a single-stack IPv4 cluster.
            if plan.dual() {
                v.push(s("--node-cidr-mask-size-ipv6=64"));
            }
            v
        }
        "kube-scheduler" => vec![
            format!("--kubeconfig={}", paths.component_kubeconfig("kube-scheduler").display()),
            s("--leader-elect=false"),
            s("--secure-port=0"),
            s("--profiling=false"),
            s("--v=1"),
        ],
        _ => Vec::new(),
    }
}

/// Starts whatever part of the control plane is not running, and waits for the API server.
pub async fn ensure(paths: &Paths, plan: &Plan) -> Result<()> {
    for &c in COMPONENTS {
        if procs::running(paths, c).is_some() {
            continue;
        }
        let pid = procs::spawn(paths, c, Some(CONTROL_PLANE_NS), &bins::path(c)?, &args(c, paths, plan))?;
        if c == "kube-apiserver" {
            // The API server retries etcd until it answers, so etcd needs no wait of its own.
            wait_apiserver(paths, pid).await?;
        } else {
            tokio::time::sleep(Duration::from_millis(300)).await;
            procs::check_alive(paths, c, pid)?;
        }
    }
    Ok(())
}

/// Waits until the controller-manager has done its first work (the `default` ServiceAccount,
/// without which no pod can be created), then checks that every component still runs: one
/// that crashed after start-up fails `up` with the tail of its log.
pub async fn wait_settled(paths: &Paths) -> Result<()> {
    use k8s_openapi::api::core::v1::ServiceAccount;
    let sas: kube::Api<ServiceAccount> = kube::Api::namespaced(crate::kube_client(paths).await?, "default");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for &c in COMPONENTS {
            if procs::running(paths, c).is_none() {
                return Err(procs::died(paths, c));
            }
        }
        if sas.get_opt("default").await.ok().flatten().is_some() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "kube-controller-manager created no default ServiceAccount within 60 s; see {}",
                paths.log("kube-controller-manager").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until `/readyz` of the API server answers ok.
pub async fn wait_apiserver(paths: &Paths, pid: i32) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let client = crate::kube_client(paths).await?;
    loop {
        procs::check_alive(paths, "kube-apiserver", pid)?;
        let req = http::Request::get("/readyz").body(Vec::new()).context("building /readyz request")?;
        match client.request_text(req).await {
            Ok(body) if body.trim() == "ok" => return Ok(()),
            _ if Instant::now() > deadline => {
                bail!("kube-apiserver was not ready within 60 s; see {}", paths.log("kube-apiserver").display())
            }
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::IpFamily;

    #[test]
    fn dual_stack_ranges_reach_apiserver_and_controller_manager() {
        let paths = Paths { root: "/run/x".into() };
        let plan = Plan { nodes: 3, family: IpFamily::Dual };
        let api = args("kube-apiserver", &paths, &plan);
        assert!(api.contains(&"--service-cluster-ip-range=198.19.0.0/16,2001:db8:ff::/112".to_string()));
        let kcm = args("kube-controller-manager", &paths, &plan);
        assert!(kcm.contains(&"--cluster-cidr=198.18.0.0/16,2001:db8:100::/56".to_string()));
        // Every process carries the state directory, so `down` finds strays without pid files.
        for c in COMPONENTS {
            assert!(args(c, &paths, &plan).iter().any(|a| a.contains("/run/x")), "{c}");
        }
    }
}

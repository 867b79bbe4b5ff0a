//! The ferrolb lab: a real Kubernetes control plane and a multi-host network on one Linux
//! machine, with no container runtime.
//!
//! ```text
//!  root namespace                         node-i namespaces (i = 1..N)          client namespace
//!  etcd, kube-apiserver (192.0.2.1),      node agent (a minimal kubelet)        curl, arping, ndisc6
//!  kube-controller-manager,               cbr0 -- pod namespaces (flbpod-*)
//!  kube-scheduler                         eth0 192.0.2.1i                       eth0 192.0.2.100
//!        |                                   |                                     |
//!        +------------------ bridge flb-br0 (the LAN, 192.0.2.0/24) ---------------+
//! ```
//!
//! `plan` is the address plan (pure); `pki`, `netns`, `control_plane` and `procs` build the
//! lab; `up`/`down` put it together; `agent` is the node agent; `hostname` the demo server.

#![forbid(unsafe_code)]

pub mod agent;
pub mod arp_probe;
pub mod bins;
pub mod blast;
pub mod chaos;
pub mod cmd;
pub mod control_plane;
pub mod drill;
pub mod hostname;
pub mod lifecycle;
pub mod load;
pub mod netns;
pub mod outage;
pub mod paths;
pub mod pki;
pub mod plan;
pub mod procs;
pub mod splitbrain;

use anyhow::{Context, Result};

use crate::paths::Paths;

/// A cluster-admin client from the root namespace.
pub async fn kube_client(paths: &Paths) -> Result<kube::Client> {
    kube_client_from(&paths.kubeconfig()).await
}

/// A cluster-admin client from inside the lab (a host's namespace), over the LAN.
pub async fn kube_client_in_lab(paths: &Paths) -> Result<kube::Client> {
    kube_client_from(&paths.component_kubeconfig("admin")).await
}

/// A client from a kubeconfig file.
pub async fn kube_client_from(path: &std::path::Path) -> Result<kube::Client> {
    let kc =
        kube::config::Kubeconfig::read_from(path).with_context(|| format!("reading kubeconfig {}", path.display()))?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .with_context(|| format!("loading kubeconfig {}", path.display()))?;
    kube::Client::try_from(cfg).context("building the Kubernetes client")
}

//! The lab's network: the control-plane namespace holding the LAN bridge and a link to the
//! root namespace, one network namespace per host with a veth leg on the bridge, a pod
//! bridge inside each node, and routes so that every pod CIDR is reachable from every host
//! and from the control plane. See `plan` for the picture.
//!
//! Every step checks before it creates, so `up` can run again on a running or half-built lab.

use std::path::Path;

use anyhow::{Context, Result};
use ipnetwork::IpNetwork;

use crate::cmd::{ip, ip_in, stdout, sysctl_in};
use crate::plan::{
    self, API_FROM_ROOT_V4, BRIDGE, CONTROL_PLANE_NS, CONTROL_PLANE_V4, CONTROL_PLANE_V6, Host, POD_BRIDGE, Plan,
    ROOT_LINK, ROOT_LINK_PEER, ROOT_LINK_PREFIX, ROOT_V4,
};

pub fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

pub fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn link_exists_in(ns: &str, name: &str) -> bool {
    ip_in(ns, &["link", "show", "dev", name]).is_ok()
}

/// Adds an address unless it is there; IPv6 without duplicate address detection, which
/// only delays a lab whose addresses are unique by construction.
fn addr_add(ns: Option<&str>, dev: &str, cidr: &str, v6: bool) -> Result<()> {
    let mut args = vec!["addr", "replace", cidr, "dev", dev];
    if v6 {
        args.push("nodad");
    }
    match ns {
        Some(ns) => ip_in(ns, &args)?,
        None => ip(&args)?,
    };
    Ok(())
}

/// The control-plane namespace: the LAN bridge with the control plane's addresses, and the
/// point-to-point link that lets the root namespace reach the API server.
pub fn ensure_control_plane(plan: &Plan) -> Result<()> {
    let ns = CONTROL_PLANE_NS;
    if !netns_exists(ns) {
        ip(&["netns", "add", ns]).context("creating the control-plane namespace")?;
    }
    ip_in(ns, &["link", "set", "lo", "up"])?;
    // Never a router between the root namespace and the LAN.
    sysctl_in(ns, &["net.ipv4.ip_forward=0", "net.ipv6.conf.all.forwarding=0"])?;
    if !link_exists_in(ns, BRIDGE) {
        ip_in(ns, &["link", "add", BRIDGE, "type", "bridge"])?;
    }
    // Bridged lab traffic must not pass through netfilter (br_netfilter).
    let _ = ip_in(
        ns,
        &[
            "link",
            "set",
            BRIDGE,
            "type",
            "bridge",
            "nf_call_iptables",
            "0",
            "nf_call_ip6tables",
            "0",
            "nf_call_arptables",
            "0",
        ],
    );
    addr_add(Some(ns), BRIDGE, &format!("{CONTROL_PLANE_V4}/24"), false)?;
    if plan.dual() {
        addr_add(Some(ns), BRIDGE, &format!("{CONTROL_PLANE_V6}/64"), true)?;
    }
    ip_in(ns, &["link", "set", BRIDGE, "up"])?;

    if !link_exists_in(ns, ROOT_LINK_PEER) {
        if link_exists(ROOT_LINK) {
            ip(&["link", "del", ROOT_LINK])?;
        }
        ip(&["link", "add", ROOT_LINK, "type", "veth", "peer", "name", ROOT_LINK_PEER, "netns", ns])?;
    }
    addr_add(None, ROOT_LINK, &format!("{ROOT_V4}/{ROOT_LINK_PREFIX}"), false)?;
    addr_add(Some(ns), ROOT_LINK_PEER, &format!("{API_FROM_ROOT_V4}/{ROOT_LINK_PREFIX}"), false)?;
    ip(&["link", "set", ROOT_LINK, "up"])?;
    ip_in(ns, &["link", "set", ROOT_LINK_PEER, "up"])?;
    Ok(())
}

/// One host: its namespace, its veth leg on the bridge, its addresses; for a node also
/// forwarding and the pod bridge holding the gateway address of each pod CIDR.
pub fn ensure_host(plan: &Plan, host: &Host) -> Result<()> {
    let ns = host.name.as_str();
    if !netns_exists(ns) {
        ip(&["netns", "add", ns]).with_context(|| format!("creating network namespace {ns}"))?;
    }
    ip_in(ns, &["link", "set", "lo", "up"])?;
    let cp = CONTROL_PLANE_NS;
    if !link_exists_in(ns, "eth0") {
        if link_exists_in(cp, &host.veth) {
            ip_in(cp, &["link", "del", &host.veth])?;
        }
        ip_in(cp, &["link", "add", &host.veth, "type", "veth", "peer", "name", "eth0", "netns", ns])?;
    }
    ip_in(cp, &["link", "set", &host.veth, "master", BRIDGE, "up"])?;
    addr_add(Some(ns), "eth0", &format!("{}/24", host.ipv4), false)?;
    if let Some(v6) = host.ipv6 {
        addr_add(Some(ns), "eth0", &format!("{v6}/{}", plan::LAN_V6_PREFIX), true)?;
    }
    ip_in(ns, &["link", "set", "eth0", "up"])?;

    if host.index.is_some() {
        sysctl_in(
            ns,
            &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1", "net.ipv6.conf.default.accept_dad=0"],
        )?;
        if !link_exists_in(ns, POD_BRIDGE) {
            ip_in(ns, &["link", "add", POD_BRIDGE, "type", "bridge"])?;
        }
        for cidr in host.pod_cidrs(plan.family) {
            let gw = plan::gateway(&cidr);
            addr_add(Some(ns), POD_BRIDGE, &format!("{gw}/{}", cidr.prefix()), cidr.is_ipv6())?;
        }
        ip_in(ns, &["link", "set", POD_BRIDGE, "up"])?;
    }
    Ok(())
}

/// Routes to every node's pod CIDRs via that node's LAN address, in every host and in the
/// control-plane namespace (a node needs none to its own pods). Nodes also get an on-link route
/// for the service CIDRs: a real node's default route does that job, and without one a node's
/// own connections to a cluster IP fail their first route lookup before the data plane's
/// output hook can translate them.
pub fn ensure_routes(plan: &Plan) -> Result<()> {
    for node in plan.nodes() {
        ip_in(&node.name, &["route", "replace", &plan::SERVICE_CIDR_V4.to_string(), "dev", "eth0"])?;
        if node.ipv6.is_some() {
            ip_in(&node.name, &["-6", "route", "replace", &plan::SERVICE_CIDR_V6.to_string(), "dev", "eth0"])?;
        }
    }
    let hosts = plan.hosts();
    let mut places: Vec<Option<&Host>> = hosts.iter().map(Some).collect();
    places.push(None); // the control plane
    for node in plan.nodes() {
        for cidr in node.pod_cidrs(plan.family) {
            let via = match cidr {
                IpNetwork::V4(_) => node.ipv4.to_string(),
                IpNetwork::V6(_) => match node.ipv6 {
                    Some(a) => a.to_string(),
                    None => continue,
                },
            };
            let dst = cidr.to_string();
            for place in &places {
                match place {
                    Some(h) if h.name == node.name => {}
                    Some(h) => {
                        ip_in(&h.name, &["route", "replace", &dst, "via", &via, "dev", "eth0"])?;
                    }
                    None => {
                        ip_in(CONTROL_PLANE_NS, &["route", "replace", &dst, "via", &via, "dev", BRIDGE])?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Every network namespace on the machine whose name the lab uses.
pub fn lab_namespaces() -> Vec<String> {
    let Ok(out) = stdout("ip", &["netns", "list"]) else {
        return Vec::new();
    };
    out.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| is_lab_namespace(n))
        .map(str::to_string)
        .collect()
}

/// The control-plane namespace, host namespaces (`node-<i>`, `client`) and pod namespaces
/// (`flbpod-…`).
pub fn is_lab_namespace(name: &str) -> bool {
    name == "client"
        || name == CONTROL_PLANE_NS
        || name.starts_with(plan::POD_NETNS_PREFIX)
        || name.strip_prefix("node-").is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
}

/// Root-namespace links the lab made: the link to the control plane (and any `flb-` link an
/// interrupted run left).
pub fn lab_links() -> Vec<String> {
    let Ok(out) = stdout("ip", &["-o", "link", "show"]) else {
        return Vec::new();
    };
    out.lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n.starts_with("flb-"))
        .collect()
}

/// Process IDs running inside a namespace.
pub fn pids_in(ns: &str) -> Vec<i32> {
    stdout("ip", &["netns", "pids", ns])
        .map(|o| o.split_whitespace().filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default()
}

/// Removes a namespace and (through it) the veth ends inside.
pub fn delete_netns(ns: &str) -> Result<()> {
    ip(&["netns", "del", ns]).map(|_| ()).map_err(Into::into)
}

pub fn delete_link(name: &str) -> Result<()> {
    ip(&["link", "del", name]).map(|_| ()).map_err(Into::into)
}

#[cfg(test)]
mod tests {
    use super::is_lab_namespace;

    #[test]
    fn only_lab_names_are_lab_namespaces() {
        for n in ["node-1", "node-9", "client", "control-plane", "flbpod-1234abcd"] {
            assert!(is_lab_namespace(n), "{n}");
        }
        for n in ["node-", "node-a", "clients", "cni-1234", "default"] {
            assert!(!is_lab_namespace(n), "{n}");
        }
    }
}

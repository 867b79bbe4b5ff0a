//! Clears stale UDP conntrack entries after endpoints go away.
//!
//! ```text
//!   prev model ─┐
//!               ├─ stale_udp (pure) ──> [(198.18.1.2, 53, udp), …] ──> conntrack -D -p udp
//!   next model ─┘                                                       --reply-src 198.18.1.2
//!                                                                        --reply-port-src 53
//! ```
//!
//! UDP has no connection end: a client that keeps sending to a service IP keeps matching the
//! conntrack entry that NATs it to the endpoint it first got, even when that endpoint is gone,
//! until the entry times out. kube-proxy deletes those entries; so do we, by the endpoint seen as
//! the reply source. The I/O uses the `conntrack` tool (Debian package `conntrack`): the netlink
//! crates that speak ctnetlink were not evaluated in this change.

use std::collections::BTreeSet;
use std::net::IpAddr;

use tokio::process::Command;

use super::model::{Model, Protocol};

/// A flow destination whose conntrack entries must go: entries whose reply comes from here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StaleEndpoint {
    /// The endpoint's address.
    pub ip: IpAddr,
    /// The endpoint's port.
    pub port: u16,
    /// Always UDP for now (TCP and SCTP end their connections themselves).
    pub proto: Protocol,
}

/// UDP endpoints usable in `prev` (in any service port) and no longer usable for that service
/// port in `next`.
pub fn stale_udp(prev: &Model, next: &Model) -> Vec<StaleEndpoint> {
    let mut out = BTreeSet::new();
    for (key, svc) in &prev.services {
        let after = next.services.get(key);
        for port in svc.ports.iter().filter(|p| p.proto == Protocol::Udp) {
            let still: BTreeSet<(IpAddr, u16)> = after
                .and_then(|s| s.ports.iter().find(|p| p.name == port.name && p.proto == Protocol::Udp))
                .map(|p| p.cluster_endpoints(next.family).iter().map(|e| (e.ip, e.port)).collect())
                .unwrap_or_default();
            for e in port.cluster_endpoints(prev.family) {
                if !still.contains(&(e.ip, e.port)) {
                    out.insert(StaleEndpoint { ip: e.ip, port: e.port, proto: Protocol::Udp });
                }
            }
        }
    }
    out.into_iter().collect()
}

/// Why clearing failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot run {program}: {source}")]
    Spawn { program: String, source: std::io::Error },
    #[error("conntrack failed ({status}): {stderr}")]
    Failed { status: String, stderr: String },
}

/// Deletes the conntrack entries whose reply source is `stale` (`program`: `conntrack`, or a
/// wrapper running it). Returns how many were deleted.
pub async fn clear(program: &[String], stale: &StaleEndpoint) -> Result<u64, Error> {
    let (cmd, prefix) = match program.split_first() {
        Some((cmd, prefix)) => (cmd.clone(), prefix.to_vec()),
        None => ("conntrack".to_owned(), Vec::new()),
    };
    let family = if stale.ip.is_ipv4() { "ipv4" } else { "ipv6" };
    let out = Command::new(&cmd)
        .args(prefix)
        .args(["-D", "-f", family, "-p", stale.proto.as_str()])
        .args(["--reply-src", &stale.ip.to_string(), "--reply-port-src", &stale.port.to_string()])
        .output()
        .await
        .map_err(|source| Error::Spawn { program: cmd.clone(), source })?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // "conntrack v1.4.7 (conntrack-tools): 2 flow entries have been deleted." (status 1 for 0).
    let deleted =
        stderr.split("): ").nth(1).and_then(|rest| rest.split_whitespace().next()).and_then(|n| n.parse::<u64>().ok());
    match deleted {
        Some(n) => Ok(n),
        None if out.status.success() => Ok(0),
        None => Err(Error::Failed { status: out.status.to_string(), stderr: stderr.trim().to_owned() }),
    }
}

#[cfg(test)]
mod tests {
    use super::super::model::{Endpoint, Family, Mode, PortModel, ServiceKey, ServiceModel};
    use super::*;

    fn model(ports: Vec<(Protocol, Vec<&str>)>) -> Model {
        let ports = ports
            .into_iter()
            .enumerate()
            .map(|(i, (proto, eps))| PortModel {
                name: format!("p{i}"),
                proto,
                port: 53,
                node_port: None,
                endpoints: eps.iter().map(|e| Endpoint::ready(e.parse().unwrap(), 5353, "node-1")).collect(),
            })
            .collect();
        let svc = ServiceModel { cluster_ips: vec!["198.19.0.10".parse().unwrap()], ports, ..Default::default() };
        Model {
            node: "node-1".into(),
            family: Family::V4,
            mode: Mode::Full,
            node_ips: vec![],
            pod_cidrs: vec![],
            services: [(ServiceKey::new("default", "dns"), svc)].into(),
        }
    }

    fn ips(v: &[StaleEndpoint]) -> Vec<String> {
        v.iter().map(|s| format!("{}:{}", s.ip, s.port)).collect()
    }

    #[test]
    fn removed_udp_endpoints_are_stale_tcp_ones_are_not() {
        let prev = model(vec![
            (Protocol::Udp, vec!["198.18.1.2", "198.18.1.3"]),
            (Protocol::Tcp, vec!["198.18.1.2", "198.18.1.3"]),
        ]);
        let next = model(vec![(Protocol::Udp, vec!["198.18.1.3"]), (Protocol::Tcp, vec!["198.18.1.3"])]);
        assert_eq!(ips(&stale_udp(&prev, &next)), ["198.18.1.2:5353"]);
        assert!(stale_udp(&next, &prev).is_empty(), "additions clear nothing");
        assert!(stale_udp(&prev, &prev).is_empty());
    }

    #[test]
    fn a_removed_service_makes_all_its_udp_endpoints_stale() {
        let prev = model(vec![(Protocol::Udp, vec!["198.18.1.2", "198.18.1.3"])]);
        let mut next = prev.clone();
        next.services.clear();
        assert_eq!(ips(&stale_udp(&prev, &next)), ["198.18.1.2:5353", "198.18.1.3:5353"]);
    }

    #[test]
    fn an_endpoint_that_stops_being_ready_is_stale() {
        let prev = model(vec![(Protocol::Udp, vec!["198.18.1.2", "198.18.1.3"])]);
        let mut next = prev.clone();
        let svc = next.services.values_mut().next().unwrap();
        svc.ports[0].endpoints[0].ready = false;
        svc.ports[0].endpoints[0].serving = false;
        assert_eq!(ips(&stale_udp(&prev, &next)), ["198.18.1.2:5353"]);
    }
}

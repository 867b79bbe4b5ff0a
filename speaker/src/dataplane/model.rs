//! What one node's data plane must do, for one address family: plain data, no I/O.
//!
//! ```text
//!   Model (node, family, mode, node_ips, pod_cidrs)
//!     └─ services: ServiceKey (ns/name) -> ServiceModel (cluster/external/LB IPs, policies)
//!          └─ ports: PortModel (proto, port, nodePort)
//!               └─ endpoints: Endpoint (ip:port, node, ready/serving/terminating)
//! ```
//!
//! The model is derived elsewhere from Services, EndpointSlices and Nodes; `render` turns it into
//! an nftables transaction. `ExternalName` services and `ipMode: Proxy` LoadBalancer addresses are
//! left out of the model by whoever builds it, so they get no rules.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

pub use ferrolb_config::Family;
use ipnetwork::IpNetwork;

/// Which services the data plane handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    /// ClusterIP, NodePort, externalIPs and LoadBalancer: kube-proxy is not needed.
    Full,
    /// Only LoadBalancer addresses, beside an existing kube-proxy that owns the rest.
    LbOnly,
}

/// One node's data plane for one address family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Model {
    /// This node's name: endpoints whose `node` equals it are local.
    pub node: String,
    /// The family this model (and its table, `ip ferrolb` or `ip6 ferrolb`) covers; addresses of
    /// the other family anywhere in the model are ignored.
    pub family: Family,
    /// Full data plane or LoadBalancer addresses only.
    pub mode: Mode,
    /// Addresses NodePorts listen on (none listed: no NodePort is reachable). Loopback addresses
    /// are never used, even if listed.
    pub node_ips: Vec<IpAddr>,
    /// This node's pod CIDRs: traffic from them is "ours" (not masqueraded to a cluster IP, and
    /// short-circuited to all endpoints under `externalTrafficPolicy: Local`).
    pub pod_cidrs: Vec<IpNetwork>,
    /// The cluster's service CIDRs (`ServiceCIDR` objects): packets to an address in them that
    /// is no Service's ClusterIP are dropped, as kube-proxy does, instead of leaving the node.
    pub service_cidrs: Vec<IpNetwork>,
    /// Every service that gets rules.
    pub services: BTreeMap<ServiceKey, ServiceModel>,
}

/// A service's identity: the one key type shared with the controller and the election.
pub use ferrolb_config::ServiceKey;

/// One service, as far as forwarding is concerned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceModel {
    /// `spec.clusterIPs` (empty for headless services, which then get no ClusterIP rules).
    pub cluster_ips: Vec<IpAddr>,
    /// `spec.externalIPs`.
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip` with `ipMode: VIP` (or no ipMode).
    pub lb_ips: Vec<IpAddr>,
    /// The service's ports.
    pub ports: Vec<PortModel>,
    /// `externalTrafficPolicy: Local`: external traffic goes to local endpoints only, unmasqueraded.
    pub external_local: bool,
    /// `internalTrafficPolicy: Local`: ClusterIP traffic goes to local endpoints only.
    pub internal_local: bool,
    /// `sessionAffinity: ClientIP` and its `timeoutSeconds`.
    pub affinity_timeout: Option<u32>,
    /// `spec.loadBalancerSourceRanges`: when non-empty, only these sources reach the LB IPs.
    pub source_ranges: Vec<IpNetwork>,
    /// An entry of `loadBalancerSourceRanges` could not be read: the LB IPs take traffic from no
    /// source at all (fail closed, never open), whatever `source_ranges` holds.
    pub source_ranges_unreadable: bool,
    /// `spec.healthCheckNodePort`, served by the health server (not by nftables).
    pub health_check_node_port: Option<u16>,
}

/// Something about one Service that its owner must hear of: it becomes a Warning Event on the
/// Service (see [`super::events`]) and a log line. Warnings are recomputed on every sync; an
/// Event is sent when a warning appears or its message changes, not again while it stays.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Warning {
    /// The Service the warning is about.
    pub service: ServiceKey,
    /// The Event reason, a CamelCase word (`DataplaneRejected`, …).
    pub reason: &'static str,
    /// What happened and what to change, in one or two sentences.
    pub message: String,
}

/// A transport protocol a service port can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The name nftables (and Kubernetes, lower-cased) uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One port of a service, with the endpoints behind it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortModel {
    /// The port's name (unique within the service; may be empty for a single port).
    pub name: String,
    /// Transport protocol.
    pub proto: Protocol,
    /// The service port (on cluster, external and LB IPs).
    pub port: u16,
    /// The node port, if the service has one.
    pub node_port: Option<u16>,
    /// Endpoints for this port, from the EndpointSlices (any order).
    pub endpoints: Vec<Endpoint>,
}

/// One endpoint of a service port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    /// Pod (or other backend) address.
    pub ip: IpAddr,
    /// Target port.
    pub port: u16,
    /// The node the endpoint lives on, if known.
    pub node: Option<String>,
    /// `conditions.ready`.
    pub ready: bool,
    /// `conditions.serving`.
    pub serving: bool,
    /// `conditions.terminating`.
    pub terminating: bool,
    /// Its node's speaker was declared dead by the membership (it did not leave): new
    /// connections go elsewhere while any other endpoint is ready ([`Model::steer_away_from`]).
    pub unreachable: bool,
}

impl Endpoint {
    /// A ready endpoint on `node`.
    pub fn ready(ip: IpAddr, port: u16, node: &str) -> Self {
        Self {
            ip,
            port,
            node: Some(node.to_owned()),
            ready: true,
            serving: true,
            terminating: false,
            unreachable: false,
        }
    }

    /// Whether the endpoint lives on `node`.
    pub fn is_on(&self, node: &str) -> bool {
        self.node.as_deref() == Some(node)
    }

    /// Still serving while terminating: used only when nothing is ready (KEP-1669).
    fn is_fallback(&self) -> bool {
        self.serving && self.terminating
    }
}

impl Model {
    /// Marks the endpoints on `dead` nodes (never our own) as unreachable: the membership saw
    /// their speakers die, so those nodes (and their pods) are most likely gone, long before
    /// their EndpointSlices say so. Only the choice for new connections changes (see
    /// [`PortModel::cluster_endpoints`]); connections already made keep their endpoint.
    pub fn steer_away_from(&mut self, dead: &std::collections::BTreeSet<String>) {
        if dead.is_empty() {
            return;
        }
        for svc in self.services.values_mut() {
            svc.steer_away_from(&self.node, dead);
        }
    }

    /// Node addresses of this family NodePorts listen on, sorted, without loopback.
    pub fn nodeport_ips(&self) -> Vec<IpAddr> {
        let mut ips: Vec<IpAddr> =
            self.node_ips.iter().copied().filter(|ip| Family::of(ip) == self.family && !ip.is_loopback()).collect();
        ips.sort();
        ips.dedup();
        ips
    }

    /// The service CIDRs of this family, sorted.
    pub fn service_cidrs_of_family(&self) -> Vec<IpNetwork> {
        let mut nets: Vec<IpNetwork> =
            self.service_cidrs.iter().copied().filter(|n| Family::of(&n.ip()) == self.family).collect();
        nets.sort();
        nets.dedup();
        nets
    }

    /// This node's pod CIDRs of this family, sorted.
    pub fn local_pod_cidrs(&self) -> Vec<IpNetwork> {
        let mut nets: Vec<IpNetwork> =
            self.pod_cidrs.iter().copied().filter(|n| Family::of(&n.ip()) == self.family).collect();
        nets.sort();
        nets.dedup();
        nets
    }
}

impl ServiceModel {
    /// [`Model::steer_away_from`] for one service of `node`'s model; returns whether anything
    /// changed.
    pub fn steer_away_from(&mut self, node: &str, dead: &std::collections::BTreeSet<String>) -> bool {
        let mut changed = false;
        for port in &mut self.ports {
            for e in &mut port.endpoints {
                let unreachable = e.node.as_ref().is_some_and(|n| n != node && dead.contains(n));
                changed |= e.unreachable != unreachable;
                e.unreachable = unreachable;
            }
        }
        changed
    }

    /// Cluster IPs of `family`, sorted.
    pub fn cluster_ips_of(&self, family: Family) -> Vec<IpAddr> {
        of_family(&self.cluster_ips, family)
    }

    /// externalIPs of `family`, sorted.
    pub fn external_ips_of(&self, family: Family) -> Vec<IpAddr> {
        of_family(&self.external_ips, family)
    }

    /// LoadBalancer IPs of `family`, sorted.
    pub fn lb_ips_of(&self, family: Family) -> Vec<IpAddr> {
        of_family(&self.lb_ips, family)
    }

    /// Whether the LB IPs are filtered by source (ranges given, or an unreadable one).
    pub fn firewalled(&self) -> bool {
        !self.source_ranges.is_empty() || self.source_ranges_unreadable
    }

    /// loadBalancerSourceRanges of `family`, sorted.
    pub fn source_ranges_of(&self, family: Family) -> Vec<IpNetwork> {
        let mut nets: Vec<IpNetwork> =
            self.source_ranges.iter().copied().filter(|n| Family::of(&n.ip()) == family).collect();
        nets.sort();
        nets.dedup();
        nets
    }
}

impl PortModel {
    /// Endpoints for traffic under the `Cluster` policy: ready ones of `family`, or — when none is
    /// ready — those still serving while terminating. Sorted, so the choice is deterministic.
    pub fn cluster_endpoints(&self, family: Family) -> Vec<&Endpoint> {
        usable(self.endpoints.iter().filter(|e| Family::of(&e.ip) == family))
    }

    /// Whether [`PortModel::local_endpoints`] would give any, without collecting them.
    pub fn has_local_endpoints(&self, family: Family, node: &str) -> bool {
        self.endpoints.iter().any(|e| Family::of(&e.ip) == family && e.is_on(node) && (e.ready || e.is_fallback()))
    }

    /// Endpoints for traffic under a `Local` policy on `node`: the same rule applied to the
    /// endpoints on `node` only (a ready remote endpoint does not hide a terminating local one).
    pub fn local_endpoints(&self, family: Family, node: &str) -> Vec<&Endpoint> {
        usable(self.endpoints.iter().filter(|e| Family::of(&e.ip) == family && e.is_on(node)))
    }
}

fn usable<'a>(candidates: impl Iterator<Item = &'a Endpoint> + Clone) -> Vec<&'a Endpoint> {
    let mut chosen: Vec<&Endpoint> = candidates.clone().filter(|e| e.ready && !e.unreachable).collect();
    if chosen.is_empty() {
        // Unreachable ones rather than none: the membership may be wrong about their node.
        chosen = candidates.clone().filter(|e| e.ready).collect();
    }
    if chosen.is_empty() {
        chosen = candidates.filter(|e| e.is_fallback()).collect();
    }
    chosen.sort_by_key(|e| (e.ip, e.port));
    chosen.dedup_by_key(|e| (e.ip, e.port));
    chosen
}

fn of_family(ips: &[IpAddr], family: Family) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = ips.iter().copied().filter(|ip| Family::of(ip) == family).collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn ep(ip: &str, node: &str, ready: bool, serving: bool, terminating: bool) -> Endpoint {
        Endpoint {
            ip: ip.parse().unwrap(),
            port: 8080,
            node: Some(node.into()),
            ready,
            serving,
            terminating,
            unreachable: false,
        }
    }

    fn port(endpoints: Vec<Endpoint>) -> PortModel {
        PortModel { name: "http".into(), proto: Protocol::Tcp, port: 80, node_port: None, endpoints }
    }

    fn ips(eps: &[&Endpoint]) -> Vec<String> {
        eps.iter().map(|e| e.ip.to_string()).collect()
    }

    #[test]
    fn ready_endpoints_win_over_terminating_ones() {
        let p =
            port(vec![ep("198.18.1.2", "node-1", false, true, true), ep("198.18.2.2", "node-2", true, true, false)]);
        assert_eq!(ips(&p.cluster_endpoints(Family::V4)), ["198.18.2.2"]);
    }

    #[test]
    fn serving_terminating_endpoints_are_the_fallback() {
        let p = port(vec![
            ep("198.18.1.3", "node-1", false, true, true),
            ep("198.18.1.2", "node-1", false, false, true),
            ep("198.18.1.4", "node-1", false, false, false),
        ]);
        assert_eq!(ips(&p.cluster_endpoints(Family::V4)), ["198.18.1.3"]);
    }

    #[test]
    fn local_fallback_is_decided_on_the_local_subset() {
        let p =
            port(vec![ep("198.18.1.3", "node-1", false, true, true), ep("198.18.2.2", "node-2", true, true, false)]);
        assert_eq!(ips(&p.local_endpoints(Family::V4, "node-1")), ["198.18.1.3"]);
        assert!(p.local_endpoints(Family::V4, "node-3").is_empty());
    }

    fn model(node: &str, endpoints: Vec<Endpoint>) -> Model {
        let svc = ServiceModel { ports: vec![port(endpoints)], ..Default::default() };
        Model {
            node: node.into(),
            family: Family::V4,
            mode: Mode::Full,
            node_ips: vec![],
            pod_cidrs: vec![],
            service_cidrs: vec![],
            services: BTreeMap::from([(ServiceKey::new("default", "web"), svc)]),
        }
    }

    fn chosen(m: &Model) -> Vec<String> {
        ips(&m.services.values().next().unwrap().ports[0].cluster_endpoints(Family::V4))
    }

    #[test]
    fn new_connections_avoid_the_endpoints_of_dead_nodes() {
        let mut m = model(
            "node-1",
            vec![
                ep("198.18.1.2", "node-1", true, true, false),
                ep("198.18.2.2", "node-2", true, true, false),
                ep("198.18.3.2", "node-3", true, true, false),
            ],
        );
        m.steer_away_from(&BTreeSet::from(["node-2".to_string()]));
        assert_eq!(chosen(&m), ["198.18.1.2", "198.18.3.2"]);
        // Alive again: back in.
        m.steer_away_from(&BTreeSet::new());
        assert_eq!(chosen(&m).len(), 2, "an empty set changes nothing");
        m.steer_away_from(&BTreeSet::from(["node-9".to_string()]));
        assert_eq!(chosen(&m), ["198.18.1.2", "198.18.2.2", "198.18.3.2"]);
    }

    #[test]
    fn dead_nodes_endpoints_stay_when_they_are_the_only_ready_ones() {
        let mut m = model(
            "node-1",
            vec![ep("198.18.2.2", "node-2", true, true, false), ep("198.18.1.3", "node-1", false, true, true)],
        );
        m.steer_away_from(&BTreeSet::from(["node-2".to_string()]));
        assert_eq!(chosen(&m), ["198.18.2.2"], "a ready endpoint the membership may be wrong about beats none");
    }

    #[test]
    fn our_own_node_is_never_steered_away_from() {
        let mut m = model(
            "node-1",
            vec![ep("198.18.1.2", "node-1", true, true, false), ep("198.18.2.2", "node-2", true, true, false)],
        );
        m.steer_away_from(&BTreeSet::from(["node-1".to_string(), "node-2".to_string()]));
        assert_eq!(chosen(&m), ["198.18.1.2"]);
    }

    #[test]
    fn endpoints_are_filtered_by_family_and_sorted() {
        let p = port(vec![
            ep("198.18.1.9", "node-1", true, true, false),
            ep("2001:db8:100::9", "node-1", true, true, false),
            ep("198.18.1.2", "node-1", true, true, false),
        ]);
        assert_eq!(ips(&p.cluster_endpoints(Family::V4)), ["198.18.1.2", "198.18.1.9"]);
        assert_eq!(ips(&p.cluster_endpoints(Family::V6)), ["2001:db8:100::9"]);
    }

    #[test]
    fn nodeport_addresses_never_include_loopback_or_the_other_family() {
        let m = Model {
            node: "node-1".into(),
            family: Family::V4,
            mode: Mode::Full,
            node_ips: vec![
                "192.0.2.11".parse().unwrap(),
                "127.0.0.1".parse().unwrap(),
                "2001:db8:1::11".parse().unwrap(),
            ],
            pod_cidrs: vec![],
            service_cidrs: vec![],
            services: BTreeMap::new(),
        };
        assert_eq!(m.nodeport_ips(), ["192.0.2.11".parse::<IpAddr>().unwrap()]);
    }
}

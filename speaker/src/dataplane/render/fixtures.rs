//! Representative models, one per behaviour: rendered and snapshotted by the unit tests, loaded
//! into a real kernel by `tests/render_netns.rs`, timed by `tests/dataplane_bench.rs`. Not used
//! by the speaker itself.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnetwork::IpNetwork;

use super::super::model::{Endpoint, Family, Mode, Model, PortModel, Protocol, ServiceKey, ServiceModel};
use super::PartialSync;

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub fn net(s: &str) -> IpNetwork {
    s.parse().unwrap()
}

pub fn ep(addr: &str, node: &str) -> Endpoint {
    Endpoint::ready(ip(addr), 8080, node)
}

pub fn port(name: &str, proto: Protocol, port: u16, endpoints: Vec<Endpoint>) -> PortModel {
    PortModel { name: name.into(), proto, port, node_port: None, endpoints }
}

pub fn http(endpoints: Vec<Endpoint>) -> PortModel {
    port("http", Protocol::Tcp, 80, endpoints)
}

pub fn two_endpoints() -> Vec<Endpoint> {
    vec![ep("198.18.1.2", "node-1"), ep("198.18.2.2", "node-2")]
}

pub fn cluster_ip(addr: &str, ports: Vec<PortModel>) -> ServiceModel {
    ServiceModel { cluster_ips: vec![ip(addr)], ports, ..ServiceModel::default() }
}

pub fn model(mode: Mode, services: Vec<(&str, ServiceModel)>) -> Model {
    Model {
        node: "node-1".into(),
        family: Family::V4,
        mode,
        node_ips: vec![ip("192.0.2.11"), ip("127.0.0.1")],
        pod_cidrs: vec![net("198.18.1.0/24")],
        service_cidrs: vec![],
        services: services.into_iter().map(|(name, svc)| (ServiceKey::new("default", name), svc)).collect(),
    }
}

pub fn lb(local: bool) -> ServiceModel {
    let mut p = http(two_endpoints());
    p.node_port = Some(31001);
    ServiceModel {
        cluster_ips: vec![ip("198.19.0.20")],
        external_ips: vec![ip("192.0.2.150")],
        lb_ips: vec![ip("192.0.2.200")],
        ports: vec![p],
        external_local: local,
        ..ServiceModel::default()
    }
}

/// Representative models, one per behaviour, each rendered, checked and snapshotted.
pub fn fixtures() -> Vec<(&'static str, Model)> {
    let clusterip = model(
        Mode::Full,
        vec![(
            "web",
            cluster_ip(
                "198.19.0.10",
                vec![
                    http(two_endpoints()),
                    port("dns", Protocol::Udp, 53, vec![ep("198.18.2.3", "node-2")]),
                    port("sig", Protocol::Sctp, 9000, vec![ep("198.18.1.4", "node-1")]),
                    // A named target port resolved differently per pod: the map holds ports.
                    port(
                        "alt",
                        Protocol::Tcp,
                        81,
                        vec![ep("198.18.1.2", "node-1"), {
                            let mut e = ep("198.18.2.2", "node-2");
                            e.port = 8081;
                            e
                        }],
                    ),
                ],
            ),
        )],
    );

    let mut np = http(two_endpoints());
    np.node_port = Some(31000);
    let nodeport = model(Mode::Full, vec![("np", cluster_ip("198.19.0.11", vec![np]))]);

    let lb_cluster = model(Mode::Full, vec![("lb", lb(false))]);

    let mut remote_only = lb(true);
    remote_only.lb_ips = vec![ip("192.0.2.201")];
    remote_only.external_ips.clear();
    remote_only.cluster_ips = vec![ip("198.19.0.21")];
    remote_only.ports[0].endpoints = vec![ep("198.18.2.9", "node-2")];
    remote_only.ports[0].node_port = Some(31002);
    let lb_local = model(Mode::Full, vec![("lb-local", lb(true)), ("lb-remote-only", remote_only)]);

    let mut sticky = cluster_ip("198.19.0.12", vec![http(two_endpoints())]);
    sticky.affinity_timeout = Some(10800);
    let mut sticky_lb = lb(true);
    sticky_lb.affinity_timeout = Some(60);
    let affinity = model(Mode::Full, vec![("sticky", sticky), ("sticky-lb", sticky_lb)]);

    let mut empty_lb = lb(false);
    empty_lb.ports[0].endpoints.clear();
    let mut itp_local = cluster_ip("198.19.0.14", vec![http(vec![ep("198.18.2.2", "node-2")])]);
    itp_local.internal_local = true;
    let mut itp_local_ok = cluster_ip("198.19.0.15", vec![http(two_endpoints())]);
    itp_local_ok.internal_local = true;
    let mut terminating = ep("198.18.1.7", "node-1");
    terminating.ready = false;
    terminating.terminating = true;
    let mut not_serving = terminating.clone();
    not_serving.serving = false;
    not_serving.ip = ip("198.18.1.8");
    let no_endpoints = model(
        Mode::Full,
        vec![
            ("empty", cluster_ip("198.19.0.13", vec![http(vec![])])),
            ("empty-lb", empty_lb),
            ("itp-local-none-here", itp_local),
            ("itp-local", itp_local_ok),
            ("terminating", cluster_ip("198.19.0.16", vec![http(vec![terminating, not_serving])])),
        ],
    );

    let mut ranged = lb(false);
    ranged.source_ranges = vec![net("203.0.113.0/24"), net("198.51.100.7/25")];
    let mut ranged_v6_only = lb(false);
    ranged_v6_only.lb_ips = vec![ip("192.0.2.202")];
    ranged_v6_only.cluster_ips = vec![ip("198.19.0.22")];
    ranged_v6_only.external_ips.clear();
    ranged_v6_only.ports[0].node_port = None;
    ranged_v6_only.source_ranges = vec![net("2001:db8:2::/48")];
    let source_ranges = model(Mode::Full, vec![("ranged", ranged), ("ranged-v6-only", ranged_v6_only)]);

    let mut v6_lb = ServiceModel {
        cluster_ips: vec![ip("2001:db8:ff::10"), ip("198.19.0.30")],
        lb_ips: vec![ip("2001:db8:1::c8"), ip("192.0.2.203")],
        ports: vec![http(vec![
            Endpoint::ready(ip("2001:db8:100::2"), 8080, "node-1"),
            Endpoint::ready(ip("2001:db8:100:1::2"), 8080, "node-2"),
            ep("198.18.1.2", "node-1"),
        ])],
        source_ranges: vec![net("2001:db8:1::/64")],
        affinity_timeout: Some(300),
        ..ServiceModel::default()
    };
    v6_lb.ports[0].node_port = Some(31003);
    let v6_plain = ServiceModel {
        cluster_ips: vec![ip("2001:db8:ff::11")],
        ports: vec![http(vec![
            Endpoint::ready(ip("2001:db8:100::3"), 8080, "node-1"),
            Endpoint::ready(ip("2001:db8:100:1::3"), 8080, "node-2"),
        ])],
        ..ServiceModel::default()
    };
    let mut ipv6 = model(Mode::Full, vec![("dual", v6_lb), ("v6-plain", v6_plain)]);
    ipv6.family = Family::V6;
    ipv6.node_ips = vec![ip("2001:db8:1::11"), ip("::1"), ip("192.0.2.11")];
    ipv6.pod_cidrs = vec![net("2001:db8:100::/64"), net("198.18.1.0/24")];

    let mut lb_only = model(Mode::Full, vec![("lb", lb(false)), ("lb-local", lb(true))]);
    lb_only.mode = Mode::LbOnly;
    lb_only.services.get_mut(&ServiceKey::new("default", "lb-local")).unwrap().lb_ips = vec![ip("192.0.2.204")];
    lb_only
        .services
        .insert(ServiceKey::new("default", "plain"), cluster_ip("198.19.0.17", vec![http(two_endpoints())]));

    vec![
        ("clusterip", clusterip),
        ("nodeport", nodeport),
        ("lb_cluster", lb_cluster),
        ("lb_local", lb_local),
        ("affinity", affinity),
        ("no_endpoints", no_endpoints),
        ("source_ranges", source_ranges),
        ("ipv6", ipv6),
        ("lb_only", lb_only),
    ]
}

/// Every fixture's services in one model (distinct names, so nothing collides).
pub fn combined() -> Model {
    let mut all = model(Mode::Full, vec![]);
    for (name, m) in fixtures() {
        if m.family != Family::V4 || m.mode != Mode::Full {
            continue;
        }
        for (key, svc) in m.services {
            all.services.insert(ServiceKey::new(name.replace('_', "-"), key.name), svc);
        }
    }
    all
}

pub fn next_of(prev: &Model) -> Model {
    let mut next = prev.clone();
    let key = |ns: &str, name: &str| ServiceKey::new(ns, name);
    // Removed, added, endpoints changed, affinity timeout changed, policy flipped.
    next.services.remove(&key("clusterip", "web"));
    next.services.insert(key("new", "svc"), cluster_ip("198.19.0.99", vec![http(two_endpoints())]));
    let np = next.services.get_mut(&key("nodeport", "np")).unwrap();
    np.ports[0].endpoints.push(ep("198.18.3.2", "node-3"));
    np.ports[0].endpoints.remove(0);
    let sticky = next.services.get_mut(&key("affinity", "sticky")).unwrap();
    sticky.affinity_timeout = Some(30);
    let lb = next.services.get_mut(&key("lb-cluster", "lb")).unwrap();
    lb.external_local = true;
    let empty = next.services.get_mut(&key("no-endpoints", "empty")).unwrap();
    empty.ports[0].endpoints.push(ep("198.18.1.50", "node-1"));
    let itp = next.services.get_mut(&key("no-endpoints", "itp-local")).unwrap();
    itp.internal_local = false;
    next.node_ips.push(ip("192.0.2.99"));
    next.pod_cidrs.push(net("198.18.101.0/24"));
    next
}

pub fn longest_names() -> Model {
    let ns = format!("n{}", "s".repeat(62));
    let name = format!("s{}", "v".repeat(62));
    let port_name = format!("p{}", "-x".repeat(31));
    let mut m = fixtures()[2].1.clone(); // LoadBalancer, Cluster policy: every chain kind.
    m.node = "n".repeat(253);
    let mut svc = m.services.pop_first().unwrap().1;
    svc.source_ranges = vec![net("203.0.113.0/24")];
    svc.ports[0].name = port_name.clone();
    for e in &mut svc.ports[0].endpoints {
        e.node = Some(m.node.clone());
    }
    let mut local = svc.clone();
    local.external_local = true;
    local.lb_ips = vec![ip("192.0.2.210")];
    local.cluster_ips = vec![ip("198.19.0.40")];
    local.ports[0].node_port = None;
    local.affinity_timeout = Some(86400);
    m.services.insert(ServiceKey::new(&ns, &name), svc);
    // Same start, another end: the cut comments must still differ.
    m.services.insert(ServiceKey::new(&ns, format!("{}w", &name[..62])), local);
    assert_eq!((ns.len(), name.len(), port_name.len(), m.node.len()), (63, 63, 63, 253));
    m
}

/// What a partial sync left for the cleanup: stale chains, sets and hairpin elements, as sets.
pub type Stale = (BTreeSet<String>, BTreeSet<String>, BTreeSet<String>);

/// [`Stale`] of `p`.
pub fn stale(p: &PartialSync) -> Stale {
    let set = |v: &[String]| v.iter().cloned().collect();
    (set(&p.stale_chains), set(&p.stale_sets), set(&p.stale_hairpin))
}

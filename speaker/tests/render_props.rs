//! Property test of the data plane against the real kernel (issue 11, item 3).
//!
//! A proptest generator of API-valid extremes at the object level (Services, EndpointSlices,
//! our Node), two states A and B of one cluster, fed through `source::build_model` (both
//! families, Full and LbOnly modes) and rendered. Per generated case and family:
//!
//! ```text
//!   full:     create_table + render_create(B)                       -> table ferrolb_fN
//!   partial:  render_full(A), render_partial(A, B), render_cleanup  -> table ferrolb_pN
//!   both loaded into real nftables in a network namespace, listed, normalized: fN == pN
//! ```
//!
//! Any `nft` refusal, a panic while building or rendering, or a partial sync that differs from
//! the full one fails the case; a failing case is shrunk (proptest's value tree) and printed.
//!
//! Throughput: cases are rendered into differently named tables and loaded in batches (one `nft
//! -f` per step for the whole batch, one `nft list ruleset`), by two workers with a network
//! namespace each; a batch that fails is replayed case by case to find the culprits.
//!
//! `cargo test` runs 200 cases. `make fuzz` sets `FERROLB_FUZZ_CASES` (100,000) and prints the
//! count and a table of the classes of failure found. Other knobs: `FERROLB_FUZZ_SEED`,
//! `FERROLB_FUZZ_BATCH` (cases per batch), `FERROLB_FUZZ_FROM` (first batch: replays a reported
//! batch with the same seed and batch size), `FERROLB_FUZZ_WORKERS`.
//!
//! Addresses: 198.18.0.0/16 pods, 198.19.0.0/16 services, 192.0.2.0/24 nodes, external and LB
//! IPs, 2001:db8::/32 for IPv6; they only ever go into rules in a private network namespace, no
//! packet is sent. Needs root: without it the test fails, it never skips.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferrolb_speaker::dataplane::model::{Family, Mode, Model};
use ferrolb_speaker::dataplane::render;
use ferrolb_speaker::dataplane::source::{SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL, SourceSettings, build_model};
use k8s_openapi::api::core::v1::{
    ClientIPConfig, LoadBalancerIngress, LoadBalancerStatus, Node, NodeAddress, NodeSpec, NodeStatus, Service,
    ServicePort, ServiceSpec, ServiceStatus, SessionAffinityConfig,
};
use k8s_openapi::api::discovery::v1::{
    Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice, ForNode, ForZone,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

// ---- the plan of a case: what the generator shrinks -------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalName,
    Headless,
}

/// `spec.ipFamilies`, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stack {
    V4,
    V6,
    V4V6,
    V6V4,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NodeRef {
    Ours,
    Other,
    Unset,
}

/// An external IP: from a small shared pool (so that Services collide), the cluster IP of the
/// case's `n`-th Service, or one of the LoadBalancer addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ext {
    Pool(u8, bool),
    ClusterOf(u8, bool),
    Lb(u8, bool),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    Number(i32),
    Name(String),
}

#[derive(Clone, Debug)]
struct PortPlan {
    name: Option<String>,
    proto: Option<&'static str>,
    port: i32,
    node_port: i32,
    target: Option<Target>,
}

#[derive(Clone, Debug)]
struct EpPlan {
    host: u16,
    node: NodeRef,
    /// `None`: no `conditions` at all; otherwise ready, serving, terminating.
    conditions: Option<[Option<bool>; 3]>,
    hints: bool,
}

#[derive(Clone, Debug)]
struct SlicePlan {
    v6: bool,
    /// (service port index, resolved target port, with another protocol than the service's).
    ports: Vec<(u8, i32, bool)>,
    endpoints: Vec<EpPlan>,
    /// Extra endpoints made up from their index (so that 1,000 of them shrink as one number).
    bulk: u16,
    bulk_host: u16,
}

#[derive(Clone, Debug)]
struct SvcPlan {
    namespace: String,
    name: String,
    kind: Kind,
    stack: Stack,
    host: u16,
    ports: Vec<PortPlan>,
    external_ips: Vec<Ext>,
    /// (LB address index, IPv6, ipMode).
    ingress: Vec<(u8, bool, Option<&'static str>)>,
    hostname_ingress: bool,
    external_local: bool,
    internal: Option<&'static str>,
    distribution: Option<&'static str>,
    /// `sessionAffinity: ClientIP` with this `timeoutSeconds`.
    affinity: Option<Option<i32>>,
    ranges: Vec<&'static str>,
    health_check: Option<i32>,
    allocate_lb_node_ports: Option<bool>,
    label: Option<&'static str>,
    slices: Vec<SlicePlan>,
}

/// A Service in states A and B (`None`: absent in that state).
#[derive(Clone, Debug)]
struct Pair {
    a: Option<SvcPlan>,
    b: Option<SvcPlan>,
}

#[derive(Clone, Debug)]
struct CasePlan {
    long_node_name: bool,
    /// Our Node's InternalIPs and pod CIDRs: both families, IPv4 only, IPv6 only, none.
    node_families: (bool, bool),
    modes: (Mode, Mode),
    services: Vec<Pair>,
}

// ---- strategies --------------------------------------------------------------------------------

/// A DNS label (RFC 1123; `letter_first`: RFC 1035, as Service names are): often short, often
/// the maximum 63 characters.
fn label(letter_first: bool) -> impl Strategy<Value = String> {
    let first = if letter_first { "[a-z]" } else { "[a-z0-9]" };
    prop_oneof![
        3 => prop::sample::select(vec!["a", "web", "dns", "http", "x-1", "metrics"]).prop_map(String::from),
        2 => regex(&format!("{first}[a-z0-9-]{{61}}[a-z0-9]")),
        1 => regex(&format!("{first}([a-z0-9-]{{0,61}}[a-z0-9])?")),
    ]
}

fn regex(pattern: &str) -> proptest::string::RegexGeneratorStrategy<String> {
    proptest::string::string_regex(pattern).expect("a valid pattern")
}

fn port_number() -> impl Strategy<Value = i32> {
    prop_oneof![3 => prop::sample::select(vec![1, 53, 80, 443, 8080, 65535]), 1 => 1..=65535i32]
}

fn node_port() -> impl Strategy<Value = i32> {
    prop_oneof![prop::sample::select(vec![30000, 30001, 32766, 32767]), 30000..=32767i32]
}

fn port_plan() -> impl Strategy<Value = PortPlan> {
    (
        prop::option::weighted(0.8, label(false)),
        prop::sample::select(vec![None, Some("TCP"), Some("UDP"), Some("SCTP")]),
        port_number(),
        node_port(),
        prop::option::of(prop_oneof![
            port_number().prop_map(Target::Number),
            "[a-z][a-z0-9]{0,14}".prop_map(Target::Name),
        ]),
    )
        .prop_map(|(name, proto, port, node_port, target)| PortPlan { name, proto, port, node_port, target })
}

fn ep_plan() -> impl Strategy<Value = EpPlan> {
    let condition = prop::option::of(any::<bool>());
    (
        0u16..1024,
        prop::sample::select(vec![NodeRef::Ours, NodeRef::Ours, NodeRef::Other, NodeRef::Unset]),
        prop::option::weighted(0.85, [condition.clone(), condition.clone(), condition]),
        prop::bool::weighted(0.1),
    )
        .prop_map(|(host, node, conditions, hints)| EpPlan { host, node, conditions, hints })
}

fn slice_plan() -> impl Strategy<Value = SlicePlan> {
    (
        any::<bool>(),
        prop::collection::vec((any::<u8>(), port_number(), prop::bool::weighted(0.05)), 0..4),
        prop::collection::vec(ep_plan(), 0..5),
        prop_oneof![20 => Just(0u16), 2 => 1..200u16, 1 => Just(1000u16)],
        any::<u16>(),
    )
        .prop_map(|(v6, ports, endpoints, bulk, bulk_host)| SlicePlan { v6, ports, endpoints, bulk, bulk_host })
}

const RANGES: &[&str] = &[
    "203.0.113.0/24",
    "192.0.2.0/24",
    "0.0.0.0/0",
    "010.000.0.0/8",
    "192.000.002.000/24",
    "198.051.100.007/24",
    "192.0.2.77/24",
    "203.0.113.5/32",
    " 198.51.100.0/24 ",
    "198.51.100.0/24 ",
    "192.0.2.0/024",
    "::/0",
    "2001:db8::/32",
    "2001:0db8:0000:0000::/64",
    "2001:db8::1/64",
    "2001:db8:0:0:0:0:0:1/128",
    " 2001:db8:1::/48",
    "::ffff:192.0.2.0/120",
    "2001:DB8::/32",
];

fn svc_plan() -> impl Strategy<Value = SvcPlan> {
    let kind = prop::sample::select(vec![
        Kind::ClusterIp,
        Kind::ClusterIp,
        Kind::NodePort,
        Kind::LoadBalancer,
        Kind::LoadBalancer,
        Kind::LoadBalancer,
        Kind::ExternalName,
        Kind::Headless,
    ]);
    let stack = prop::sample::select(vec![Stack::V4, Stack::V6, Stack::V4V6, Stack::V6V4]);
    let ports = prop_oneof![
        20 => prop::collection::vec(port_plan(), 1..4),
        1 => prop::collection::vec(port_plan(), 4..100),
    ];
    let ext = prop_oneof![
        3 => (0u8..3, any::<bool>()).prop_map(|(i, v6)| Ext::Pool(i, v6)),
        1 => (any::<u8>(), any::<bool>()).prop_map(|(i, v6)| Ext::ClusterOf(i, v6)),
        1 => (0u8..4, any::<bool>()).prop_map(|(i, v6)| Ext::Lb(i, v6)),
    ];
    let ingress = (0u8..4, any::<bool>(), prop::sample::select(vec![None, Some("VIP"), Some("Proxy")]));
    let names = (label(false), label(true), kind, stack, 1u16..u16::MAX, ports);
    let addresses = (
        prop::collection::vec(ext, 0..3),
        prop::collection::vec(ingress, 0..3),
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.4),
        prop::sample::select(vec![None, Some("Cluster"), Some("Local")]),
        prop::sample::select(vec![None, Some("PreferClose"), Some("PreferSameZone"), Some("PreferSameNode")]),
    );
    let rest = (
        prop::option::weighted(0.3, prop::option::of(prop_oneof![prop::sample::select(vec![1, 86400]), 1..=86400i32])),
        prop::collection::vec(prop::sample::select(RANGES), 0..4),
        prop::option::weighted(0.7, node_port()),
        prop::sample::select(vec![None, Some(true), Some(false)]),
        prop::option::weighted(0.05, prop::sample::select(vec![SERVICE_PROXY_NAME_LABEL, "app"])),
        prop::collection::vec(slice_plan(), 0..4),
    );
    (names, addresses, rest).prop_map(
        |(
            (namespace, name, kind, stack, host, ports),
            (external_ips, ingress, hostname_ingress, external_local, internal, distribution),
            (affinity, ranges, health_check, allocate_lb_node_ports, label, slices),
        )| SvcPlan {
            namespace,
            name,
            kind,
            stack,
            host,
            ports,
            external_ips,
            ingress,
            hostname_ingress,
            external_local,
            internal,
            distribution,
            affinity,
            ranges,
            health_check,
            allocate_lb_node_ports,
            label,
            slices,
        },
    )
}

/// A Service in A and B: unchanged, new endpoints, replaced, removed or added.
fn pair() -> impl Strategy<Value = Pair> {
    (svc_plan(), svc_plan(), prop::collection::vec(slice_plan(), 0..4), 0u8..10).prop_map(
        |(a, other, slices, change)| match change {
            0..=2 => Pair { a: Some(a.clone()), b: Some(a) },
            3..=5 => Pair { a: Some(a.clone()), b: Some(SvcPlan { slices, ..a }) },
            6 | 7 => {
                Pair { b: Some(SvcPlan { namespace: a.namespace.clone(), name: a.name.clone(), ..other }), a: Some(a) }
            }
            8 => Pair { a: Some(a), b: None },
            _ => Pair { a: None, b: Some(a) },
        },
    )
}

fn case_plan() -> impl Strategy<Value = CasePlan> {
    let modes = prop_oneof![
        6 => Just((Mode::Full, Mode::Full)),
        3 => Just((Mode::LbOnly, Mode::LbOnly)),
        1 => Just((Mode::Full, Mode::LbOnly)),
        1 => Just((Mode::LbOnly, Mode::Full)),
    ];
    let families = prop::sample::select(vec![(true, true), (true, true), (true, false), (false, true), (false, false)]);
    (prop::bool::weighted(0.3), families, modes, prop::collection::vec(pair(), 0..6)).prop_map(
        |(long_node_name, node_families, modes, services)| CasePlan { long_node_name, node_families, modes, services },
    )
}

// ---- plan -> Kubernetes objects ------------------------------------------------------------

/// The longest node name the API server accepts (a DNS subdomain of 253 characters).
fn long_name(first: char) -> String {
    let label = |n: usize| {
        let mut l: String =
            std::iter::once(first).chain("abcdefghijklmnopqrstuvwxyz0123456789-".chars().cycle()).take(n - 1).collect();
        l.push('z');
        l
    };
    format!("{}.{}.{}.{}", label(63), label(63), label(63), label(61))
}

fn node_names(plan: &CasePlan) -> (String, String) {
    if plan.long_node_name { (long_name('n'), long_name('m')) } else { ("node-1".into(), "node-2".into()) }
}

fn cluster_ip(host: u16, v6: bool) -> String {
    if v6 { format!("2001:db8:ff::{host:x}") } else { format!("198.19.{}.{}", host >> 8, host & 0xff) }
}

fn pod_ip(host: u16, v6: bool) -> String {
    if v6 {
        format!("2001:db8:100:{:x}::{:x}", host >> 8, host & 0xff)
    } else {
        format!("198.18.{}.{}", host >> 8, host & 0xff)
    }
}

fn lb_ip(i: u8, v6: bool) -> String {
    if v6 { format!("2001:db8:1::{:x}", 0xc8 + u32::from(i)) } else { format!("192.0.2.{}", 200 + u32::from(i)) }
}

fn pool_ip(i: u8, v6: bool) -> String {
    if v6 { format!("2001:db8:1::{:x}", 0x96 + u32::from(i)) } else { format!("192.0.2.{}", 150 + u32::from(i)) }
}

/// `base`, or `base` with its end replaced by `-N` when it is taken: unique, still a label of at
/// most 63 characters.
fn unique(base: &str, used: &mut BTreeSet<String>) -> String {
    let mut name = base.to_owned();
    let mut n = 0;
    while !used.insert(name.clone()) {
        n += 1;
        let suffix = format!("-{n}");
        name = format!("{}{suffix}", &base[..base.len().min(63 - suffix.len())]);
    }
    name
}

fn families(stack: Stack) -> Vec<bool> {
    match stack {
        Stack::V4 => vec![false],
        Stack::V6 => vec![true],
        Stack::V4V6 => vec![false, true],
        Stack::V6V4 => vec![true, false],
    }
}

struct Objects {
    services: Vec<Service>,
    slices: Vec<EndpointSlice>,
}

/// The Services and EndpointSlices of state A (`b == false`) or B.
fn objects(plan: &CasePlan, b: bool) -> Objects {
    let (ours, other) = node_names(plan);
    let mut keys = BTreeSet::new();
    let svcs: Vec<&SvcPlan> = plan
        .services
        .iter()
        .filter_map(|p| if b { p.b.as_ref() } else { p.a.as_ref() })
        .filter(|s| keys.insert(format!("{}/{}", s.namespace, s.name)))
        .collect();
    let cluster_of = |i: u8, v6: bool| {
        let s = svcs[usize::from(i) % svcs.len()];
        cluster_ip(s.host, v6)
    };
    let mut services = Vec::new();
    let mut slices = Vec::new();
    for s in &svcs {
        let external_ips: Vec<String> = s
            .external_ips
            .iter()
            .map(|e| match *e {
                Ext::Pool(i, v6) => pool_ip(i, v6),
                Ext::ClusterOf(i, v6) => cluster_of(i, v6),
                Ext::Lb(i, v6) => lb_ip(i, v6),
            })
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut spec = ServiceSpec {
            type_: Some(
                match s.kind {
                    Kind::ClusterIp | Kind::Headless => "ClusterIP",
                    Kind::NodePort => "NodePort",
                    Kind::LoadBalancer => "LoadBalancer",
                    Kind::ExternalName => "ExternalName",
                }
                .into(),
            ),
            ..Default::default()
        };
        let fams = families(s.stack);
        match s.kind {
            Kind::ExternalName => spec.external_name = Some("example.org".into()),
            Kind::Headless => {
                spec.cluster_ip = Some("None".into());
                spec.cluster_ips = Some(vec!["None".into()]);
            }
            _ => {
                let ips: Vec<String> = fams.iter().map(|v6| cluster_ip(s.host, *v6)).collect();
                spec.cluster_ip = ips.first().cloned();
                spec.cluster_ips = Some(ips);
            }
        }
        if s.kind != Kind::ExternalName {
            spec.ip_families = Some(fams.iter().map(|v6| if *v6 { "IPv6" } else { "IPv4" }.to_owned()).collect());
            spec.ip_family_policy = Some(if fams.len() == 2 { "RequireDualStack" } else { "SingleStack" }.into());
            spec.internal_traffic_policy = Some(s.internal.unwrap_or("Cluster").into());
            spec.traffic_distribution = s.distribution.map(String::from);
            spec.session_affinity = Some(if s.affinity.is_some() { "ClientIP" } else { "None" }.into());
            spec.session_affinity_config = s.affinity.map(|timeout_seconds| SessionAffinityConfig {
                client_ip: Some(ClientIPConfig { timeout_seconds: timeout_seconds.or(Some(10800)) }),
            });
            if !external_ips.is_empty() {
                spec.external_ips = Some(external_ips);
            }
        }
        let has_node_ports = match s.kind {
            Kind::NodePort => true,
            Kind::LoadBalancer => s.allocate_lb_node_ports != Some(false),
            _ => false,
        };
        if s.kind == Kind::LoadBalancer {
            spec.allocate_load_balancer_node_ports = s.allocate_lb_node_ports;
            spec.load_balancer_source_ranges =
                (!s.ranges.is_empty()).then(|| s.ranges.iter().map(|r| (*r).to_owned()).collect());
        }
        let external = matches!(s.kind, Kind::NodePort | Kind::LoadBalancer) || spec.external_ips.is_some();
        if external {
            spec.external_traffic_policy = Some(if s.external_local { "Local" } else { "Cluster" }.into());
        }
        if s.kind == Kind::LoadBalancer && s.external_local {
            spec.health_check_node_port = s.health_check.or(Some(32767));
        }

        // Ports: unique by (port, protocol) and by name; named when there are several.
        let mut names = BTreeSet::new();
        let mut seen = BTreeSet::new();
        let several = s.ports.len() > 1;
        let mut ports: Vec<ServicePort> = Vec::new();
        for (j, p) in s.ports.iter().enumerate() {
            let proto = p.proto.unwrap_or("TCP");
            if !seen.insert((p.port, proto)) {
                continue;
            }
            let name = match &p.name {
                Some(n) => Some(unique(n, &mut names)),
                None if several => Some(unique(&format!("p{j}"), &mut names)),
                None => None,
            };
            ports.push(ServicePort {
                name,
                protocol: p.proto.map(String::from),
                port: p.port,
                node_port: has_node_ports.then_some(p.node_port),
                target_port: p.target.as_ref().map(|t| match t {
                    Target::Number(n) => IntOrString::Int(*n),
                    Target::Name(n) => IntOrString::String(n.clone()),
                }),
                ..Default::default()
            });
        }
        spec.ports = Some(ports.clone());

        let labels = s.label.map(|l| BTreeMap::from([(l.to_owned(), "other".to_owned())]));
        let status = (s.kind == Kind::LoadBalancer).then(|| {
            let mut ingress: Vec<LoadBalancerIngress> = s
                .ingress
                .iter()
                .map(|(i, v6, mode)| LoadBalancerIngress {
                    ip: Some(lb_ip(*i, *v6)),
                    ip_mode: mode.map(String::from),
                    ..Default::default()
                })
                .collect();
            if s.hostname_ingress {
                ingress.push(LoadBalancerIngress { hostname: Some("lb.example.org".into()), ..Default::default() });
            }
            ServiceStatus { load_balancer: Some(LoadBalancerStatus { ingress: Some(ingress) }), ..Default::default() }
        });
        services.push(Service {
            metadata: ObjectMeta {
                namespace: Some(s.namespace.clone()),
                name: Some(s.name.clone()),
                labels,
                ..Default::default()
            },
            spec: Some(spec),
            status,
        });

        for (k, sl) in s.slices.iter().enumerate() {
            if ports.is_empty() {
                break;
            }
            let mut slice_ports = Vec::new();
            let mut slice_seen = BTreeSet::new();
            for (index, number, other_proto) in &sl.ports {
                let p = &ports[usize::from(*index) % ports.len()];
                let proto = p.protocol.clone().unwrap_or_else(|| "TCP".into());
                let proto = if *other_proto { if proto == "UDP" { "TCP".into() } else { "UDP".into() } } else { proto };
                if slice_seen.insert((p.name.clone(), proto.clone())) {
                    slice_ports.push(EndpointPort {
                        name: p.name.clone().or(Some(String::new())),
                        protocol: Some(proto),
                        port: Some(*number),
                        ..Default::default()
                    });
                }
            }
            let node_name = |n: NodeRef| match n {
                NodeRef::Ours => Some(ours.clone()),
                NodeRef::Other => Some(other.clone()),
                NodeRef::Unset => None,
            };
            let mut endpoints: Vec<Endpoint> = sl
                .endpoints
                .iter()
                .map(|e| Endpoint {
                    addresses: vec![pod_ip(e.host, sl.v6)],
                    node_name: node_name(e.node),
                    conditions: e.conditions.map(|[ready, serving, terminating]| EndpointConditions {
                        ready,
                        serving,
                        terminating,
                    }),
                    hints: e.hints.then(|| EndpointHints {
                        for_nodes: Some(vec![ForNode { name: ours.clone() }]),
                        for_zones: Some(vec![ForZone { name: "zone-a".into() }]),
                    }),
                    zone: e.hints.then(|| "zone-a".into()),
                    ..Default::default()
                })
                .collect();
            // Made-up endpoints: every condition pattern, on every kind of node.
            let patterns = [
                Some([Some(true), Some(true), Some(false)]),
                None,
                Some([Some(false), Some(true), Some(true)]),
                Some([Some(false), Some(false), Some(true)]),
                Some([None, None, None]),
                Some([Some(false), None, None]),
            ];
            let refs = [NodeRef::Ours, NodeRef::Other, NodeRef::Unset];
            for i in 0..sl.bulk {
                let host = sl.bulk_host.wrapping_add(i);
                endpoints.push(Endpoint {
                    addresses: vec![pod_ip(host, sl.v6)],
                    node_name: node_name(refs[usize::from(i) % refs.len()]),
                    conditions: patterns[usize::from(i) % patterns.len()]
                        .map(|[ready, serving, terminating]| EndpointConditions { ready, serving, terminating }),
                    ..Default::default()
                });
            }
            endpoints.truncate(1000);
            slices.push(EndpointSlice {
                metadata: ObjectMeta {
                    namespace: Some(s.namespace.clone()),
                    name: Some(format!("{}-{k}{}", s.name, if b { "b" } else { "a" })),
                    labels: Some(BTreeMap::from([(SERVICE_NAME_LABEL.to_owned(), s.name.clone())])),
                    ..Default::default()
                },
                address_type: if sl.v6 { "IPv6" } else { "IPv4" }.into(),
                ports: Some(slice_ports),
                endpoints: Some(endpoints),
            });
        }
    }
    Objects { services, slices }
}

fn our_node(plan: &CasePlan) -> Node {
    let (name, _) = node_names(plan);
    let (v4, v6) = plan.node_families;
    let mut addresses = Vec::new();
    let mut cidrs = Vec::new();
    if v4 {
        addresses.push(NodeAddress { type_: "InternalIP".into(), address: "192.0.2.11".into() });
        cidrs.push("198.18.1.0/24".to_owned());
    }
    if v6 {
        addresses.push(NodeAddress { type_: "InternalIP".into(), address: "2001:db8:1::11".into() });
        cidrs.push("2001:db8:100:1::/64".to_owned());
    }
    addresses.push(NodeAddress { type_: "Hostname".into(), address: name.clone() });
    Node {
        metadata: ObjectMeta { name: Some(name), ..Default::default() },
        spec: Some(NodeSpec { pod_cidr: cidrs.first().cloned(), pod_cidrs: Some(cidrs), ..Default::default() }),
        status: Some(NodeStatus { addresses: Some(addresses), ..Default::default() }),
    }
}

// ---- plan -> nft transactions ----------------------------------------------------------------

/// What one case loads, per family, with the table still called `ferrolb`.
struct Rendered {
    family: Family,
    /// render_create_table + render_create of B (into an empty table).
    full_b: String,
    /// render_full of A, then render_partial(A, B), then render_cleanup.
    full_a: String,
    partial: String,
    cleanup: String,
}

fn model(plan: &CasePlan, objects: &Objects, node: &Node, mode: Mode, family: Family) -> Model {
    let settings = SourceSettings {
        node: node_names(plan).0,
        mode,
        node_ips: vec![],
        pod_cidrs: vec![],
        external_ip_cidrs: vec![],
    };
    let mut m = build_model(&settings, family, &objects.services, &objects.slices, [node]);
    m.service_cidrs = vec!["198.19.0.0/16".parse().expect("v4 CIDR"), "2001:db8:ff::/112".parse().expect("v6 CIDR")];
    m
}

fn render_case(plan: &CasePlan) -> Vec<Rendered> {
    let (a, b, node) = (objects(plan, false), objects(plan, true), our_node(plan));
    [Family::V4, Family::V6]
        .into_iter()
        .map(|family| {
            let ma = model(plan, &a, &node, plan.modes.0, family);
            let mb = model(plan, &b, &node, plan.modes.1, family);
            let p = render::render_partial(&ma, &mb);
            let set = |v: &[String]| v.iter().cloned().collect::<BTreeSet<_>>();
            let cleanup =
                render::render_cleanup(&mb, &set(&p.stale_chains), &set(&p.stale_sets), &set(&p.stale_hairpin));
            Rendered {
                family,
                full_b: render::render_create_table(family) + &render::render_create(&mb),
                full_a: render::render_full(&ma),
                partial: p.now,
                cleanup,
            }
        })
        .collect()
}

fn family_word(family: Family) -> &'static str {
    match family {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

/// `text` with the table `ferrolb` of `family` renamed to `name`. The renderer writes the table
/// as `<family> ferrolb` followed by a space or the end of a line, and user strings (DNS labels)
/// hold no space, so the replacement cannot touch anything else; the assertion checks it.
fn renamed(text: &str, family: Family, name: &str) -> String {
    let fam = family_word(family);
    let out = text
        .replace(&format!("{fam} ferrolb "), &format!("{fam} {name} "))
        .replace(&format!("{fam} ferrolb\n"), &format!("{fam} {name}\n"));
    assert!(!out.contains(&format!("{fam} ferrolb ")), "table left unrenamed in:\n{out}");
    out
}

// ---- a network namespace per worker --------------------------------------------------------

/// A network namespace held open by a `sleep` of ours; commands run in it through `nsenter`.
struct Netns {
    holder: Child,
    dir: tempfile::TempDir,
}

impl Netns {
    fn new() -> Self {
        let holder = Command::new("unshare")
            .args(["--net", "--", "sleep", "infinity"])
            .stdin(Stdio::null())
            .spawn()
            .expect("cannot run unshare");
        let ns = Self { holder, dir: tempfile::tempdir().expect("temp dir") };
        // unshare execs sleep once the namespace exists: wait until the link shows.
        let mine = std::fs::read_link("/proc/self/ns/net").expect("our netns");
        for _ in 0..200 {
            match std::fs::read_link(ns.path()) {
                Ok(l) if l != mine => return ns,
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        panic!("the namespace holder did not start");
    }

    fn path(&self) -> String {
        format!("/proc/{}/ns/net", self.holder.id())
    }

    /// Runs `nft` with `args` in the namespace: stdout, or nft's message.
    fn nft(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", self.path()))
            .arg("--")
            .arg("nft")
            .args(args)
            .output()
            .expect("cannot run nsenter");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Loads `text` as one transaction (from a file, so that nft's messages point at lines).
    fn load(&self, name: &str, text: &str) -> Result<(), String> {
        if text.is_empty() {
            return Ok(());
        }
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("writing a transaction");
        self.nft(&["-f", &path.display().to_string()]).map(drop)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

fn require_root_and_tools() {
    let uid = Command::new("id").arg("-u").output().expect("cannot run `id -u`");
    let uid = String::from_utf8_lossy(&uid.stdout).trim().to_owned();
    assert_eq!(uid, "0", "this test loads nftables in a network namespace and needs root; uid is {uid}");
    for tool in ["nft", "unshare", "nsenter"] {
        let ok = Command::new(tool).arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
        assert!(ok, "this test needs `{tool}` on PATH");
    }
}

// ---- listings ------------------------------------------------------------------------------

/// `nft list ruleset` split into tables: name (`ip ferrolb_p3`) -> its listing.
fn tables(ruleset: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for l in ruleset.lines() {
        if let Some(rest) = l.strip_prefix("table ") {
            current = Some((rest.trim_end_matches(" {").to_owned(), String::new()));
        } else if l == "}" {
            if let Some((name, body)) = current.take() {
                out.insert(name, body);
            }
        } else if let Some((_, body)) = current.as_mut() {
            body.push_str(l);
            body.push('\n');
        }
    }
    out
}

/// A table's listing as blocks (`chain …`, `set …`, `map …`) -> their lines in order, with
/// `elements` sorted (their order is the kernel's, which depends on the order of insertion).
fn blocks(listing: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut block = String::new();
    let mut elements: Option<Vec<String>> = None;
    for l in listing.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(list) = elements.as_mut() {
            let done = l.ends_with('}');
            list.extend(l.trim_end_matches('}').split(',').map(str::trim).filter(|e| !e.is_empty()).map(String::from));
            if done {
                let mut list = elements.take().unwrap_or_default();
                list.sort();
                out.entry(block.clone()).or_default().extend(list.into_iter().map(|e| format!("element {e}")));
            }
            continue;
        }
        if ["chain ", "set ", "map "].iter().any(|p| l.starts_with(p)) {
            block = l.to_owned();
            out.entry(block.clone()).or_default();
        } else if let Some(rest) = l.strip_prefix("elements = {") {
            elements = Some(Vec::new());
            let list = elements.as_mut().unwrap_or_else(|| unreachable!());
            let done = rest.ends_with('}');
            list.extend(
                rest.trim_end_matches('}').split(',').map(str::trim).filter(|e| !e.is_empty()).map(String::from),
            );
            if done {
                let mut list = elements.take().unwrap_or_default();
                list.sort();
                out.entry(block.clone()).or_default().extend(list.into_iter().map(|e| format!("element {e}")));
            }
        } else if l != "}" {
            out.entry(block.clone()).or_default().push(l.to_owned());
        }
    }
    out
}

/// Where two tables differ, briefly; `None` when they are the same.
fn difference(full: &str, partial: &str) -> Option<String> {
    let (f, p) = (blocks(full), blocks(partial));
    if f == p {
        return None;
    }
    let mut out = String::new();
    for name in f.keys().chain(p.keys()).collect::<BTreeSet<_>>() {
        let (x, y) = (f.get(name), p.get(name));
        if x != y {
            let _ = writeln!(out, "  {name}:\n    full:    {x:?}\n    partial: {y:?}");
            if out.len() > 4000 {
                out.push_str("  …\n");
                break;
            }
        }
    }
    Some(out)
}

// ---- checking ------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Failure {
    /// Groups failures: the step and nft's message without its position.
    class: String,
    detail: String,
}

/// The `Error: …` lines of nft's output, without file positions.
fn nft_class(step: &str, message: &str) -> String {
    let errors: BTreeSet<&str> =
        message.lines().filter_map(|l| l.split_once("Error: ").map(|(_, m)| m.trim())).collect();
    let errors: Vec<&str> = errors.into_iter().collect();
    let text = if errors.is_empty() { message.lines().next().unwrap_or("").trim() } else { &errors.join(" / ") };
    format!("{step}: nft refused: {text}")
}

/// Renders the case, catching panics.
fn render_checked(plan: &CasePlan) -> Result<Vec<Rendered>, Failure> {
    catch_unwind(AssertUnwindSafe(|| render_case(plan))).map_err(|e| {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default();
        Failure { class: format!("render: panic: {msg}"), detail: msg }
    })
}

/// Loads a batch of rendered cases (`(index, rendered)`) into `ns`: `Ok` with per-case failures
/// found by comparing listings, `Err` when a transaction was refused (which case is unknown).
fn run_batch(ns: &Netns, batch: &[(usize, &[Rendered])]) -> Result<Vec<(usize, Failure)>, Failure> {
    let mut load = String::from("flush ruleset\n");
    let mut partial = String::new();
    let mut cleanup = String::new();
    for (i, rendered) in batch {
        for r in rendered.iter() {
            let (p, f) = (format!("ferrolb_p{i}"), format!("ferrolb_f{i}"));
            load.push_str(&renamed(&r.full_a, r.family, &p));
            load.push_str(&renamed(&r.full_b, r.family, &f));
            partial.push_str(&renamed(&r.partial, r.family, &p));
            cleanup.push_str(&renamed(&r.cleanup, r.family, &p));
        }
    }
    for (step, text) in [("load A and full B", &load), ("partial", &partial), ("cleanup", &cleanup)] {
        ns.load(step.split(' ').next().unwrap_or("step"), text)
            .map_err(|m| Failure { class: nft_class(step, &m), detail: m })?;
    }
    let listing = ns.nft(&["list", "ruleset"]).map_err(|m| Failure { class: nft_class("list", &m), detail: m })?;
    let tables = tables(&listing);
    let mut failures = Vec::new();
    for (i, rendered) in batch {
        for r in rendered.iter() {
            let fam = family_word(r.family);
            let get = |kind: &str| tables.get(&format!("{fam} ferrolb_{kind}{i}"));
            let (Some(full), Some(partial)) = (get("f"), get("p")) else {
                let class = "list: a table is missing after loading".to_owned();
                failures.push((*i, Failure { class, detail: format!("{fam}: tables {:?}", tables.keys()) }));
                continue;
            };
            if let Some(diff) = difference(full, partial) {
                let class = "compare: partial sync differs from full sync".to_owned();
                failures.push((*i, Failure { class, detail: format!("{fam}:\n{diff}") }));
            }
        }
    }
    Ok(failures)
}

/// One case alone, step by step: the failure, if any.
fn check_one(ns: &Netns, plan: &CasePlan) -> Option<Failure> {
    let rendered = match render_checked(plan) {
        Ok(r) => r,
        Err(f) => return Some(f),
    };
    for r in &rendered {
        let steps = [
            ("full B", "flush ruleset\n".to_owned() + &r.full_b),
            ("full A", "flush ruleset\n".to_owned() + &r.full_a),
            ("partial", r.partial.clone()),
            ("cleanup", r.cleanup.clone()),
        ];
        for (step, text) in &steps {
            if let Err(m) = ns.load("one", text) {
                let fam = family_word(r.family);
                return Some(Failure { class: nft_class(step, &m), detail: format!("{fam} {step}:\n{m}") });
            }
        }
    }
    match run_batch(ns, &[(0, &rendered)]) {
        Ok(mut f) => f.pop().map(|(_, f)| f),
        Err(f) => Some(f),
    }
}

/// Proptest's shrinking loop over `tree`, keeping failures of the same class: the smallest
/// failing plan and its failure.
fn shrink(
    ns: &Netns,
    tree: &mut dyn ValueTree<Value = CasePlan>,
    failure: Failure,
    budget: Duration,
) -> (CasePlan, Failure, usize) {
    let start = Instant::now();
    let mut best = (tree.current(), failure.clone());
    let mut steps = 0;
    let mut failing = true;
    while start.elapsed() < budget {
        let moved = if failing { tree.simplify() } else { tree.complicate() };
        if !moved {
            break;
        }
        steps += 1;
        let plan = tree.current();
        match check_one(ns, &plan) {
            Some(f) if f.class == failure.class => {
                best = (plan, f);
                failing = true;
            }
            _ => failing = false,
        }
    }
    (best.0, best.1, steps)
}

/// The case as the objects a user would write (JSON), for the report.
fn describe(plan: &CasePlan) -> String {
    let (a, b) = (objects(plan, false), objects(plan, true));
    let json = serde_json::json!({
        "modes": format!("{:?}", plan.modes),
        "node": our_node(plan),
        "A": { "services": a.services, "endpointSlices": a.slices },
        "B": { "services": b.services, "endpointSlices": b.slices },
    });
    serde_json::to_string_pretty(&json).unwrap_or_default()
}

// ---- the run -------------------------------------------------------------------------------

fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().unwrap_or_else(|_| panic!("{name}={v} is not a number")),
        Err(_) => default,
    }
}

fn batch_rng(seed: u64, batch: u64) -> TestRng {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes[8..16].copy_from_slice(&batch.to_le_bytes());
    TestRng::from_seed(RngAlgorithm::ChaCha, &bytes)
}

/// A class of failure: how often, and the smallest example found.
struct Class {
    count: usize,
    example: String,
    detail: String,
    reproduce: String,
}

#[derive(Default)]
struct Totals {
    cases: AtomicUsize,
    full: AtomicUsize,
    partial: AtomicUsize,
    failed: AtomicUsize,
    render_us: AtomicU64,
    nft_us: AtomicU64,
}

#[test]
fn partial_sync_equals_full_sync_in_the_kernel_for_generated_clusters() {
    require_root_and_tools();
    let cases = env_number("FERROLB_FUZZ_CASES", 200) as usize;
    let fuzz = std::env::var_os("FERROLB_FUZZ_CASES").is_some();
    let batch_size = env_number("FERROLB_FUZZ_BATCH", 5).max(1) as usize;
    let workers = env_number("FERROLB_FUZZ_WORKERS", 2).max(1) as usize;
    let first = env_number("FERROLB_FUZZ_FROM", 0) as usize;
    let seed = env_number(
        "FERROLB_FUZZ_SEED",
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1),
    );
    let batches = cases.div_ceil(batch_size);
    // One shrink per class in a long run; in `cargo test` every failure is a test failure anyway.
    let shrink_budget = Duration::from_secs(env_number("FERROLB_FUZZ_SHRINK_SECS", if fuzz { 60 } else { 120 }));
    eprintln!(
        "render_props: {cases} cases, seed {seed}, {batches} batches of {batch_size}, {workers} workers \
         (replay a batch: FERROLB_FUZZ_SEED={seed} FERROLB_FUZZ_BATCH={batch_size} FERROLB_FUZZ_FROM=<batch>)"
    );

    let next = AtomicUsize::new(first);
    let totals = Totals::default();
    let classes: Mutex<BTreeMap<String, Class>> = Mutex::new(BTreeMap::new());
    let started = Instant::now();
    let strategy = case_plan();

    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                let ns = Netns::new();
                loop {
                    let b = next.fetch_add(1, Ordering::SeqCst);
                    if b >= first + batches {
                        break;
                    }
                    let n = batch_size.min(cases - (b - first) * batch_size);
                    let mut runner = TestRunner::new_with_rng(
                        Config { failure_persistence: None, ..Config::default() },
                        batch_rng(seed, b as u64),
                    );
                    let mut trees: Vec<_> =
                        (0..n).map(|_| strategy.new_tree(&mut runner).expect("a generated case")).collect();
                    let t = Instant::now();
                    let mut rendered = Vec::new();
                    let mut failures: Vec<(usize, Failure)> = Vec::new();
                    for (i, tree) in trees.iter().enumerate() {
                        match render_checked(&tree.current()) {
                            Ok(r) => rendered.push((i, r)),
                            Err(f) => failures.push((i, f)),
                        }
                    }
                    totals.render_us.fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                    let t = Instant::now();
                    let batch: Vec<(usize, &[Rendered])> = rendered.iter().map(|(i, r)| (*i, r.as_slice())).collect();
                    match run_batch(&ns, &batch) {
                        Ok(found) => failures.extend(found),
                        // Someone in the batch was refused: find who, one by one.
                        Err(_) => {
                            for (i, _) in &batch {
                                if let Some(f) = check_one(&ns, &trees[*i].current()) {
                                    failures.push((*i, f));
                                }
                            }
                        }
                    }
                    totals.nft_us.fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                    totals.cases.fetch_add(n, Ordering::Relaxed);
                    for (_, r) in &rendered {
                        totals.full.fetch_add(r.len(), Ordering::Relaxed);
                        totals.partial.fetch_add(r.iter().filter(|r| !r.partial.is_empty()).count(), Ordering::Relaxed);
                    }
                    failures.sort_by_key(|(i, _)| *i);
                    failures.dedup_by_key(|(i, _)| *i);
                    totals.failed.fetch_add(failures.len(), Ordering::Relaxed);
                    for (i, failure) in failures {
                        let new = {
                            let mut c = classes.lock().unwrap_or_else(|e| e.into_inner());
                            let class = c.entry(failure.class.clone()).or_insert_with(|| Class {
                                count: 0,
                                example: String::new(),
                                detail: String::new(),
                                reproduce: String::new(),
                            });
                            class.count += 1;
                            class.count == 1
                        };
                        if !new {
                            continue;
                        }
                        eprintln!("render_props: batch {b} case {i}: {}; shrinking", failure.class);
                        let (plan, failure, steps) = shrink(&ns, &mut trees[i], failure, shrink_budget);
                        let mut c = classes.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(class) = c.get_mut(&failure.class) {
                            class.example = describe(&plan);
                            class.detail = failure.detail;
                            class.reproduce = format!(
                                "FERROLB_FUZZ_SEED={seed} FERROLB_FUZZ_BATCH={batch_size} FERROLB_FUZZ_FROM={b} \
                                 FERROLB_FUZZ_CASES={batch_size} (case {i}, shrunk in {steps} steps)"
                            );
                        }
                    }
                    let done = totals.cases.load(Ordering::Relaxed);
                    if fuzz && (b + 1).is_multiple_of(50) {
                        eprintln!(
                            "render_props: {done} cases in {:.0} s, {} failed",
                            started.elapsed().as_secs_f64(),
                            totals.failed.load(Ordering::Relaxed)
                        );
                    }
                }
            });
        }
    });

    let secs = started.elapsed().as_secs_f64();
    let classes = classes.into_inner().unwrap_or_else(|e| e.into_inner());
    let failed = totals.failed.load(Ordering::Relaxed);
    let mut report = String::new();
    for (name, c) in &classes {
        let _ = writeln!(report, "\n=== {} × {name}\nreproduce: {}\nnft said:\n{}", c.count, c.reproduce, c.detail);
        let example = if c.example.len() > 6000 {
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("render_props");
            let _ = std::fs::create_dir_all(&dir);
            let path = dir.join(format!("class-{:x}.json", c.example.len()));
            let _ = std::fs::write(&path, &c.example);
            format!("(large: {})", path.display())
        } else {
            c.example.clone()
        };
        let _ = writeln!(report, "minimal case:\n{example}");
    }
    println!(
        "fuzz: {} models ({} full + {} partial loads) in {secs:.0} s, {failed} refused or different \
         (render {:.1} s, nft {:.1} s over {workers} workers)",
        totals.cases.load(Ordering::Relaxed),
        totals.full.load(Ordering::Relaxed),
        totals.partial.load(Ordering::Relaxed),
        totals.render_us.load(Ordering::Relaxed) as f64 / 1e6,
        totals.nft_us.load(Ordering::Relaxed) as f64 / 1e6,
    );
    if !classes.is_empty() {
        println!("{:>8}  class", "cases");
        for (name, c) in &classes {
            println!("{:>8}  {name}", c.count);
        }
    }
    assert!(classes.is_empty(), "{failed} generated cases failed:{report}");
}

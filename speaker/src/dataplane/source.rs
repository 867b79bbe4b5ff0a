//! Builds the data plane [`Model`] of one family from Kubernetes objects. Pure.
//!
//! ```text
//!   Service ──(skip: ExternalName, headless, service-proxy-name label, no cluster IP of the family)
//!     │  clusterIPs / externalIPs / status.loadBalancer.ingress (ipMode VIP) of the family
//!     └─ ports ──(by port name and protocol)── EndpointSlice.ports
//!                                                 └─ endpoints (merged over the service's slices,
//!                                                    deduplicated by address and port)
//!   Node (ours) ──> node IPs and pod CIDRs, unless the settings name them
//! ```
//!
//! The semantics follow kube-proxy's change trackers (`pkg/proxy/servicechangetracker.go`,
//! `endpointslicecache.go`): a service is handled in a family only when it has a cluster IP of
//! that family (so `spec.ipFamilies` decides), a missing `ready` condition means ready, a missing
//! `serving` means the same as `ready`, and the first slice (by name) to list an address and port
//! wins.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::model::{Endpoint, Family, Mode, Model, PortModel, Protocol, ServiceKey, ServiceModel, Warning};

/// The label that ties an EndpointSlice to its service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Services carrying this label are served by another proxy (kube-proxy skips them too).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Set by the endpoints controller on headless services.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// `sessionAffinity: ClientIP` without `timeoutSeconds` (Kubernetes' default).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10800;

/// What the model needs besides the cluster's objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceSettings {
    /// This node's name.
    pub node: String,
    /// Full data plane, or LoadBalancer addresses only.
    pub mode: Mode,
    /// Addresses NodePorts listen on; empty: the InternalIPs of our Node.
    pub node_ips: Vec<IpAddr>,
    /// This node's pod CIDRs; empty: `spec.podCIDRs` of our Node.
    pub pod_cidrs: Vec<IpNetwork>,
    /// externalIPs are honoured only within these (`--external-ip-cidrs`); empty: any.
    pub external_ip_cidrs: Vec<IpNetwork>,
}

/// The model of `family` for these objects.
pub fn build_model<'a>(
    settings: &SourceSettings,
    family: Family,
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    nodes: impl IntoIterator<Item = &'a Node>,
) -> Model {
    build_model_with_warnings(settings, family, services, slices, nodes).0
}

/// [`build_model`], and what the owners of the Services must be told about how their objects
/// were read (parts left out or closed).
pub fn build_model_with_warnings<'a>(
    settings: &SourceSettings,
    family: Family,
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    nodes: impl IntoIterator<Item = &'a Node>,
) -> (Model, Vec<Warning>) {
    let mut warnings = Vec::new();
    let ours = nodes.into_iter().find(|n| n.metadata.name.as_deref() == Some(settings.node.as_str()));
    let node_ips = if settings.node_ips.is_empty() {
        ours.map(internal_ips).unwrap_or_default()
    } else {
        settings.node_ips.clone()
    };
    let pod_cidrs = if settings.pod_cidrs.is_empty() {
        ours.map(pod_cidrs).unwrap_or_default()
    } else {
        settings.pod_cidrs.clone()
    };

    let mut by_service: BTreeMap<ServiceKey, Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in slices {
        let name = slice.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL));
        if let (Some(ns), Some(name)) = (slice.metadata.namespace.as_deref(), name) {
            by_service.entry(ServiceKey::new(ns, name.as_str())).or_default().push(slice);
        }
    }
    for list in by_service.values_mut() {
        list.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    }

    let cluster: Vec<&Service> = services.into_iter().collect();
    let mut services: BTreeMap<ServiceKey, ServiceModel> = cluster
        .iter()
        .copied()
        .filter_map(|svc| {
            let key = ServiceKey::new(svc.metadata.namespace.as_deref()?, svc.metadata.name.as_deref()?);
            let slices = by_service.get(&key).map(Vec::as_slice).unwrap_or_default();
            let m = service_model(svc, family, slices)?;
            if m.source_ranges_unreadable {
                warnings.extend(source_range_warnings(&key, svc));
            }
            Some((key, m))
        })
        .collect();
    if settings.mode == Mode::Full {
        // Beside kube-proxy (LbOnly), externalIPs are kube-proxy's.
        warnings.extend(super::claims::settle_external_ips(&mut services, cluster, &settings.external_ip_cidrs));
    }
    (
        Model {
            node: settings.node.clone(),
            family,
            mode: settings.mode,
            node_ips,
            pod_cidrs,
            service_cidrs: Vec::new(),
            services,
        },
        warnings,
    )
}

/// One service in `family`, or `None` when it gets no rules there.
pub fn service_model(svc: &Service, family: Family, slices: &[&EndpointSlice]) -> Option<ServiceModel> {
    let labels = svc.metadata.labels.as_ref();
    if labels.is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL) || l.contains_key(HEADLESS_LABEL)) {
        return None;
    }
    let spec = svc.spec.as_ref()?;
    let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
    if kind == "ExternalName" {
        return None;
    }
    let mut cluster_ips: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
    if cluster_ips.is_empty() {
        cluster_ips.extend(spec.cluster_ip.clone());
    }
    // Headless ("None") or not yet allocated: kube-proxy skips the service altogether.
    let cluster_ips = of_family(cluster_ips.iter().map(String::as_str), family);
    if cluster_ips.is_empty() {
        return None;
    }
    let external_ips = of_family(spec.external_ips.iter().flatten().map(String::as_str), family);
    let lb_ips = if kind == "LoadBalancer" {
        let ingress = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|lb| lb.ingress.as_ref());
        let vip = ingress
            .into_iter()
            .flatten()
            .filter(|i| i.ip_mode.as_deref().unwrap_or("VIP") == "VIP")
            .filter_map(|i| i.ip.as_deref());
        of_family(vip, family)
    } else {
        Vec::new()
    };
    let has_node_ports = kind == "NodePort" || kind == "LoadBalancer";
    let external_local =
        spec.external_traffic_policy.as_deref() == Some("Local") && (has_node_ports || !external_ips.is_empty());
    let affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .filter(|t| *t > 0)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
    });
    let (mut source_ranges, unreadable) = read_source_ranges(spec.load_balancer_source_ranges.iter().flatten());
    // A zero-length prefix of this family means "allow any", as kube-proxy reads it.
    if unreadable.is_empty() && source_ranges.iter().any(|n| n.prefix() == 0 && Family::of(&n.ip()) == family) {
        source_ranges.clear();
    }
    let health_check_node_port = spec
        .health_check_node_port
        .filter(|_| kind == "LoadBalancer" && external_local)
        .and_then(|p| u16::try_from(p).ok());

    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            let proto = protocol(p.protocol.as_deref())?;
            let name = p.name.clone().unwrap_or_default();
            Some(PortModel {
                endpoints: endpoints(slices, &name, proto, family),
                name,
                proto,
                port: u16::try_from(p.port).ok()?,
                node_port: p.node_port.filter(|_| has_node_ports).and_then(|n| u16::try_from(n).ok()),
            })
        })
        .collect();
    Some(ServiceModel {
        cluster_ips,
        external_ips,
        lb_ips,
        ports,
        external_local,
        internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        affinity_timeout,
        source_ranges,
        source_ranges_unreadable: !unreadable.is_empty(),
        health_check_node_port,
    })
}

/// The Event reason for a `loadBalancerSourceRanges` entry that cannot be read.
pub const INVALID_SOURCE_RANGE: &str = "InvalidSourceRange";

/// `loadBalancerSourceRanges` read as kube-proxy reads them (whitespace trimmed, then
/// [`parse_cidr_sloppy`]), and the entries that could not be read at all.
fn read_source_ranges<'a>(entries: impl Iterator<Item = &'a String>) -> (Vec<IpNetwork>, Vec<&'a str>) {
    let mut nets = Vec::new();
    let mut unreadable = Vec::new();
    for entry in entries {
        match parse_cidr_sloppy(entry.trim()) {
            Some(net) => nets.push(net),
            None => unreadable.push(entry.as_str()),
        }
    }
    (nets, unreadable)
}

/// What the owner of `svc` must hear about its unreadable `loadBalancerSourceRanges` entries.
pub fn source_range_warnings(key: &ServiceKey, svc: &Service) -> Vec<Warning> {
    let entries = svc.spec.as_ref().and_then(|s| s.load_balancer_source_ranges.as_ref());
    let (_, unreadable) = read_source_ranges(entries.into_iter().flatten());
    if unreadable.is_empty() {
        return Vec::new();
    }
    let list: Vec<String> = unreadable.iter().map(|e| format!("{e:?}")).collect();
    let message = format!(
        "loadBalancerSourceRanges entry {} cannot be read as a CIDR: the Service's LoadBalancer IPs are \
         closed to every source until it is corrected (write each entry like 203.0.113.0/24)",
        list.join(", ")
    );
    vec![Warning { service: key.clone(), reason: INVALID_SOURCE_RANGE, message }]
}

/// Reads a CIDR the way the API server and kube-proxy always have, Go's legacy parser
/// (`netutils.ParseCIDRSloppy`), so that objects stored by older releases keep meaning what they
/// meant: IPv4 parts may have leading zeros and are decimal (`010.0.0.0/8` is 10.0.0.0/8, not
/// octal), so may the prefix length; host bits may be set and are cleared (`192.0.2.5/24` is
/// 192.0.2.0/24); IPv6 in any notation, with zero compression and a dotted IPv4 tail (itself
/// read sloppily). Whitespace is the caller's to trim. `None`: not a CIDR at all.
pub fn parse_cidr_sloppy(s: &str) -> Option<IpNetwork> {
    let (addr, prefix) = s.split_once('/')?;
    let prefix = legacy_decimal(prefix)?;
    let ip = if addr.contains(':') {
        let addr = match addr.rsplit_once(':') {
            Some((head, tail)) if tail.contains('.') => {
                let [a, b, c, d] = parse_ipv4_sloppy(tail)?.octets();
                format!("{head}:{:x}:{:x}", u16::from_be_bytes([a, b]), u16::from_be_bytes([c, d]))
            }
            _ => addr.to_owned(),
        };
        IpAddr::V6(addr.parse().ok()?)
    } else {
        IpAddr::V4(parse_ipv4_sloppy(addr)?)
    };
    let prefix = u8::try_from(prefix).ok()?;
    let net = IpNetwork::new(ip, prefix).ok()?;
    IpNetwork::new(net.network(), prefix).ok()
}

/// Go's legacy IPv4 parser: four decimal parts, each any number of digits (leading zeros
/// included) with a value up to 255.
fn parse_ipv4_sloppy(s: &str) -> Option<std::net::Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = s.split('.');
    for o in &mut octets {
        *o = u8::try_from(legacy_decimal(parts.next()?)?).ok()?;
    }
    parts.next().is_none().then_some(std::net::Ipv4Addr::from(octets))
}

/// Go's legacy `dtoi`: one or more ASCII digits, below 2^24.
fn legacy_decimal(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.bytes().try_fold(0u32, |n, b| Some(n * 10 + u32::from(b - b'0')).filter(|n| *n < 0xFF_FFFF))
}

/// The endpoints of the service port `name`/`proto`, merged over `slices` (sorted by name).
fn endpoints(slices: &[&EndpointSlice], name: &str, proto: Protocol, family: Family) -> Vec<Endpoint> {
    let mut seen: BTreeMap<(IpAddr, u16), Endpoint> = BTreeMap::new();
    for slice in slices {
        let wanted = match family {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        };
        if slice.address_type != wanted {
            continue;
        }
        let port =
            slice.ports.iter().flatten().find(|p| {
                p.name.as_deref().unwrap_or_default() == name && protocol(p.protocol.as_deref()) == Some(proto)
            });
        let Some(port) = port.and_then(|p| p.port).and_then(|p| u16::try_from(p).ok()) else { continue };
        for ep in slice.endpoints.iter().flatten() {
            let ferrolb_config::EndpointState { ready, serving, terminating } =
                ferrolb_config::EndpointState::of(ep.conditions.as_ref());
            // kube-proxy uses the first address of an endpoint.
            let Some(ip) = ep.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else { continue };
            if Family::of(&ip) != family {
                continue;
            }
            seen.entry((ip, port)).or_insert_with(|| Endpoint {
                ip,
                port,
                node: ep.node_name.clone(),
                ready,
                serving,
                terminating,
                unreachable: false,
            });
        }
    }
    seen.into_values().collect()
}

fn protocol(p: Option<&str>) -> Option<Protocol> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "SCTP" => Some(Protocol::Sctp),
        _ => None,
    }
}

fn of_family<'a>(ips: impl Iterator<Item = &'a str>, family: Family) -> Vec<IpAddr> {
    ips.filter_map(|s| s.trim().parse::<IpAddr>().ok()).filter(|ip| Family::of(ip) == family).collect()
}

/// A Node's InternalIP addresses.
pub fn internal_ips(node: &Node) -> Vec<IpAddr> {
    ferrolb_config::internal_ips(node)
}

/// A Node's `spec.podCIDRs` (or `spec.podCIDR`).
pub fn pod_cidrs(node: &Node) -> Vec<IpNetwork> {
    let Some(spec) = node.spec.as_ref() else { return Vec::new() };
    let mut cidrs: Vec<&String> = spec.pod_cidrs.iter().flatten().collect();
    if cidrs.is_empty() {
        cidrs.extend(spec.pod_cidr.as_ref());
    }
    cidrs.into_iter().filter_map(|c| c.parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap as Map;

    use k8s_openapi::api::core::v1::{
        ClientIPConfig, LoadBalancerIngress, LoadBalancerStatus, NodeAddress, NodeSpec, NodeStatus, ServicePort,
        ServiceSpec, ServiceStatus, SessionAffinityConfig,
    };
    use k8s_openapi::api::discovery::v1::{Endpoint as SliceEndpoint, EndpointConditions, EndpointPort};
    use kube::api::ObjectMeta;

    use super::*;

    fn svc(name: &str, kind: &str, cluster_ips: &[&str], ports: &[(&str, &str, i32, Option<i32>)]) -> Service {
        Service {
            metadata: ObjectMeta { namespace: Some("default".into()), name: Some(name.into()), ..Default::default() },
            spec: Some(ServiceSpec {
                type_: Some(kind.into()),
                cluster_ip: cluster_ips.first().map(|s| s.to_string()),
                cluster_ips: Some(cluster_ips.iter().map(|s| s.to_string()).collect()),
                ports: Some(
                    ports
                        .iter()
                        .map(|(name, proto, port, node_port)| ServicePort {
                            name: Some(name.to_string()),
                            protocol: Some(proto.to_string()),
                            port: *port,
                            node_port: *node_port,
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn with_ingress(mut s: Service, ingress: &[(&str, Option<&str>)]) -> Service {
        s.status = Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(
                    ingress
                        .iter()
                        .map(|(ip, mode)| LoadBalancerIngress {
                            ip: Some(ip.to_string()),
                            ip_mode: mode.map(String::from),
                            ..Default::default()
                        })
                        .collect(),
                ),
            }),
            ..Default::default()
        });
        s
    }

    /// (address, node, ready, serving, terminating).
    type SliceEp<'a> = (&'a str, &'a str, Option<bool>, Option<bool>, Option<bool>);

    fn slice(
        name: &str,
        service: &str,
        family: &str,
        ports: &[(&str, &str, i32)],
        eps: &[SliceEp<'_>],
    ) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                namespace: Some("default".into()),
                name: Some(name.into()),
                labels: Some(Map::from([(SERVICE_NAME_LABEL.to_owned(), service.to_owned())])),
                ..Default::default()
            },
            address_type: family.into(),
            ports: Some(
                ports
                    .iter()
                    .map(|(name, proto, port)| EndpointPort {
                        name: Some(name.to_string()),
                        protocol: Some(proto.to_string()),
                        port: Some(*port),
                        ..Default::default()
                    })
                    .collect(),
            ),
            endpoints: Some(
                eps.iter()
                    .map(|(ip, node, ready, serving, terminating)| SliceEndpoint {
                        addresses: vec![ip.to_string()],
                        node_name: Some(node.to_string()),
                        conditions: Some(EndpointConditions {
                            ready: *ready,
                            serving: *serving,
                            terminating: *terminating,
                        }),
                        ..Default::default()
                    })
                    .collect(),
            ),
        }
    }

    fn node(name: &str, ips: &[&str], cidrs: &[&str]) -> Node {
        Node {
            metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
            spec: Some(NodeSpec {
                pod_cidrs: Some(cidrs.iter().map(|s| s.to_string()).collect()),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                addresses: Some(
                    ips.iter().map(|a| NodeAddress { type_: "InternalIP".into(), address: a.to_string() }).collect(),
                ),
                ..Default::default()
            }),
        }
    }

    fn settings(mode: Mode) -> SourceSettings {
        SourceSettings { node: "node-1".into(), mode, node_ips: vec![], pod_cidrs: vec![], external_ip_cidrs: vec![] }
    }

    fn build(family: Family, services: &[Service], slices: &[EndpointSlice]) -> Model {
        let nodes = [node("node-1", &["192.0.2.11", "2001:db8:1::11"], &["198.18.1.0/24", "2001:db8:100::/64"])];
        build_model(&settings(Mode::Full), family, services, slices, &nodes)
    }

    fn key(name: &str) -> ServiceKey {
        ServiceKey::new("default", name)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn node_addresses_and_pod_cidrs_come_from_our_node_unless_given() {
        let m = build(Family::V4, &[], &[]);
        assert_eq!(m.node_ips, [ip("192.0.2.11"), ip("2001:db8:1::11")]);
        assert_eq!(m.pod_cidrs.len(), 2);
        let mut s = settings(Mode::LbOnly);
        s.node_ips = vec![ip("192.0.2.99")];
        let m = build_model(&s, Family::V4, [], [], [&node("node-1", &["192.0.2.11"], &[])]);
        assert_eq!((m.node_ips, m.mode), (vec![ip("192.0.2.99")], Mode::LbOnly));
    }

    #[test]
    fn skipped_services_get_no_model() {
        let mut proxied = svc("proxied", "ClusterIP", &["198.19.0.1"], &[("", "TCP", 80, None)]);
        proxied.metadata.labels = Some(Map::from([(SERVICE_PROXY_NAME_LABEL.to_owned(), "other".to_owned())]));
        let mut labelled_headless = svc("lh", "ClusterIP", &["198.19.0.2"], &[("", "TCP", 80, None)]);
        labelled_headless.metadata.labels = Some(Map::from([(HEADLESS_LABEL.to_owned(), String::new())]));
        let headless = svc("headless", "ClusterIP", &["None"], &[("", "TCP", 80, None)]);
        let mut external_name = svc("ext", "ExternalName", &[], &[]);
        external_name.spec.as_mut().unwrap().external_name = Some("example.org".into());
        let v6_only = svc("v6", "ClusterIP", &["2001:db8:ff::1"], &[("", "TCP", 80, None)]);
        let m = build(Family::V4, &[proxied, labelled_headless, headless, external_name, v6_only.clone()], &[]);
        assert!(m.services.is_empty(), "{:?}", m.services.keys());
        assert!(build(Family::V6, &[v6_only], &[]).services.contains_key(&key("v6")));
    }

    #[test]
    fn dual_stack_service_splits_by_family_and_proxy_ingress_is_left_out() {
        let mut s = svc("lb", "LoadBalancer", &["198.19.0.10", "2001:db8:ff::10"], &[("http", "TCP", 80, Some(31000))]);
        s.spec.as_mut().unwrap().external_ips = Some(vec!["192.0.2.150".into()]);
        let s =
            with_ingress(s, &[("192.0.2.200", None), ("2001:db8:1::c8", Some("VIP")), ("192.0.2.201", Some("Proxy"))]);
        let slices = [
            slice("lb-v4", "lb", "IPv4", &[("http", "TCP", 8080)], &[("198.18.1.2", "node-1", Some(true), None, None)]),
            slice("lb-v6", "lb", "IPv6", &[("http", "TCP", 8080)], &[("2001:db8:100::2", "node-1", None, None, None)]),
        ];
        let v4 = build(Family::V4, std::slice::from_ref(&s), &slices);
        let m = &v4.services[&key("lb")];
        assert_eq!(m.cluster_ips, [ip("198.19.0.10")]);
        assert_eq!(m.lb_ips, [ip("192.0.2.200")]);
        assert_eq!(m.external_ips, [ip("192.0.2.150")]);
        assert_eq!(m.ports[0].node_port, Some(31000));
        assert_eq!(m.ports[0].endpoints, [Endpoint::ready(ip("198.18.1.2"), 8080, "node-1")]);
        let v6 = build(Family::V6, &[s], &slices);
        let m = &v6.services[&key("lb")];
        assert_eq!(
            (m.cluster_ips.clone(), m.lb_ips.clone()),
            (vec![ip("2001:db8:ff::10")], vec![ip("2001:db8:1::c8")])
        );
        assert_eq!(m.ports[0].endpoints, [Endpoint::ready(ip("2001:db8:100::2"), 8080, "node-1")]);
    }

    #[test]
    fn slices_merge_dedupe_and_match_ports_by_name_and_protocol() {
        let s = svc("web", "ClusterIP", &["198.19.0.10"], &[("http", "TCP", 80, None), ("dns", "UDP", 53, None)]);
        let slices = [
            slice(
                "web-b",
                "web",
                "IPv4",
                &[("http", "TCP", 9090), ("dns", "UDP", 5353)],
                &[("198.18.1.2", "node-1", Some(false), None, None), ("198.18.2.2", "node-2", None, None, None)],
            ),
            slice(
                "web-a",
                "web",
                "IPv4",
                &[("http", "TCP", 9090), ("dns", "TCP", 53)],
                &[("198.18.1.2", "node-1", Some(true), None, None)],
            ),
            slice("other", "not-web", "IPv4", &[("http", "TCP", 1)], &[("198.18.9.9", "node-1", None, None, None)]),
        ];
        let m = build(Family::V4, &[s], &slices);
        let web = &m.services[&key("web")];
        let http = web.ports.iter().find(|p| p.name == "http").unwrap();
        // web-a comes first by name: its ready copy of 198.18.1.2 wins over web-b's unready one.
        assert_eq!(
            http.endpoints,
            [Endpoint::ready(ip("198.18.1.2"), 9090, "node-1"), Endpoint::ready(ip("198.18.2.2"), 9090, "node-2")]
        );
        let dns = web.ports.iter().find(|p| p.name == "dns").unwrap();
        assert_eq!(dns.endpoints.len(), 2, "only web-b has dns over UDP");
        assert!(dns.endpoints.iter().all(|e| e.port == 5353));
    }

    #[test]
    fn conditions_default_like_kube_proxy() {
        let s = svc("web", "ClusterIP", &["198.19.0.10"], &[("", "TCP", 80, None)]);
        let slices = [slice(
            "web-a",
            "web",
            "IPv4",
            &[("", "TCP", 8080)],
            &[
                ("198.18.1.2", "node-1", None, None, None),
                ("198.18.1.3", "node-1", Some(false), None, Some(true)),
                ("198.18.1.4", "node-1", Some(false), Some(true), Some(true)),
            ],
        )];
        let m = build(Family::V4, &[s], &slices);
        let eps = &m.services[&key("web")].ports[0].endpoints;
        let flags: Vec<(bool, bool, bool)> = eps.iter().map(|e| (e.ready, e.serving, e.terminating)).collect();
        assert_eq!(flags, [(true, true, false), (false, false, true), (false, true, true)]);
    }

    /// Every form the API server accepted before 1.36, read as Go's legacy parser reads it.
    #[test]
    fn source_ranges_read_legacy_forms() {
        let net = |s: &str| Some(s.parse::<IpNetwork>().unwrap());
        for (entry, want) in [
            ("010.0.0.0/8", net("10.0.0.0/8")),
            ("192.000.002.000/24", net("192.0.2.0/24")),
            ("192.0.2.5/24", net("192.0.2.0/24")),
            ("0.0.0.0/0", net("0.0.0.0/0")),
            ("203.0.113.7/032", net("203.0.113.7/32")),
            ("2001:db8::/32", net("2001:db8::/32")),
            ("2001:0db8:0000::1/48", net("2001:db8::/48")),
            ("2001:db8::5/64", net("2001:db8::/64")),
            ("::/0", net("::/0")),
            ("::ffff:192.000.002.000/120", net("::ffff:192.0.2.0/120")),
            ("0000000192.0.2.0/24", net("192.0.2.0/24")),
            ("", None),
            ("192.0.2.0", None),
            ("256.0.0.0/8", None),
            ("192.0.2.0/33", None),
            ("2001:db8::/129", None),
            ("192.0.2.0/-1", None),
            ("192.0.2/24", None),
            ("192.0.2.0.1/24", None),
            ("0x0a.0.0.0/8", None),
            ("192.0.2.0/24/1", None),
            ("2001:db8::g/64", None),
        ] {
            assert_eq!(parse_cidr_sloppy(entry), want, "{entry:?}");
        }
    }

    /// An entry that cannot be read closes the LoadBalancer IPs to all, with a warning; one
    /// padded with whitespace reads as kube-proxy reads it; `/0` of a family opens that family.
    #[test]
    fn unreadable_source_ranges_close_and_warn() {
        let lb = |ranges: &[&str]| {
            let mut s = svc("lb", "LoadBalancer", &["198.19.0.10", "2001:db8:ff::10"], &[("", "TCP", 80, Some(31000))]);
            s.spec.as_mut().unwrap().load_balancer_source_ranges = Some(ranges.iter().map(|r| r.to_string()).collect());
            with_ingress(s, &[("192.0.2.200", None), ("2001:db8:1::c8", None)])
        };
        let nodes = [node("node-1", &["192.0.2.11"], &[])];
        let read = |s: Service, family| {
            let (m, w) = build_model_with_warnings(&settings(Mode::Full), family, [&s], [], &nodes);
            (m.services[&key("lb")].clone(), w)
        };
        let (m, w) = read(lb(&[" 010.0.0.0/8 ", "192.0.2.5/24"]), Family::V4);
        assert!(!m.source_ranges_unreadable && w.is_empty());
        assert_eq!(m.source_ranges, ["10.0.0.0/8".parse::<IpNetwork>().unwrap(), "192.0.2.0/24".parse().unwrap()]);

        for bad in [&["203.0.113.0/24", "not a range"][..], &[""], &["192.0.2.0/24", "192.0.2.0/40"]] {
            let (m, w) = read(lb(bad), Family::V4);
            assert!(m.source_ranges_unreadable && m.firewalled(), "{bad:?}");
            assert_eq!(w.len(), 1, "{bad:?}");
            assert_eq!(w[0].reason, INVALID_SOURCE_RANGE);
            assert!(w[0].message.contains("closed to every source"), "{}", w[0].message);
        }
        let (m, w) = read(lb(&["0.0.0.0/0", "2001:db8::/32"]), Family::V4);
        assert!(!m.firewalled() && w.is_empty(), "/0 of the family allows any, as in kube-proxy");
        let (m, _) = read(lb(&["0.0.0.0/0", "2001:db8::/32"]), Family::V6);
        assert!(m.firewalled());
    }

    #[test]
    fn policies_affinity_ranges_and_health_check_port() {
        let mut s = svc("lb", "LoadBalancer", &["198.19.0.10"], &[("", "TCP", 80, Some(31000))]);
        let spec = s.spec.as_mut().unwrap();
        spec.external_traffic_policy = Some("Local".into());
        spec.internal_traffic_policy = Some("Local".into());
        spec.health_check_node_port = Some(32000);
        spec.session_affinity = Some("ClientIP".into());
        spec.load_balancer_source_ranges = Some(vec!["203.0.113.0/24".into(), "198.51.100.0/24".into()]);
        let m = build(Family::V4, std::slice::from_ref(&s), &[]);
        let lb = &m.services[&key("lb")];
        assert!(lb.external_local && lb.internal_local);
        assert_eq!(lb.health_check_node_port, Some(32000));
        assert_eq!(lb.affinity_timeout, Some(DEFAULT_AFFINITY_TIMEOUT));
        assert_eq!(
            lb.source_ranges,
            ["203.0.113.0/24".parse::<IpNetwork>().unwrap(), "198.51.100.0/24".parse().unwrap()]
        );

        s.spec.as_mut().unwrap().session_affinity_config =
            Some(SessionAffinityConfig { client_ip: Some(ClientIPConfig { timeout_seconds: Some(60) }) });
        s.spec.as_mut().unwrap().type_ = Some("ClusterIP".into());
        let m = build(Family::V4, &[s], &[]);
        let c = &m.services[&key("lb")];
        assert_eq!(c.affinity_timeout, Some(60));
        assert!(!c.external_local, "a ClusterIP service has no external traffic");
        assert_eq!((c.health_check_node_port, c.ports[0].node_port), (None, None));
    }
}

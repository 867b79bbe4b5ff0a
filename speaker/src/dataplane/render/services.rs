//! One Service's part of the table: its chains, affinity sets, the verdict-map and set elements
//! it claims, and its endpoint-map entries (which depend on where its slots are, see
//! [`super::slots`]).
//!
//! A Service is rendered in two steps: [`ServicePlan::new`] decides which endpoints each port
//! uses and what slot it needs; [`ServicePlan::render`] writes the objects once the slots are
//! placed. Nothing here reads another Service: what two Services share (an element both claim,
//! an endpoint map) is settled by the caller.

use std::collections::BTreeSet;
use std::fmt::{self, Write as _};
use std::net::IpAddr;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::super::model::{Endpoint, PortModel, Protocol, ServiceKey, ServiceModel};
use super::super::nft::{self, COMMENT_MAX, SetFlag, Table, Type, bounded_comment, nft_safe};
use super::base::{Context, GlobalSet, REJECT_CHAIN, canonical};
use super::slots::{Slot, SlotRequest};

/// Test hook, for the lab only: `FERROLB_FAULT_REJECT_SERVICE=namespace/name` in the speaker's
/// environment (read once, at the first render) gives that Service a chain holding
/// [`FAULT_RULE`], which `nft` refuses, so that tests can watch a refused Service being left out
/// while the rest is applied. Unset in any real deployment.
pub const FAULT_REJECT_SERVICE_ENV: &str = "FERROLB_FAULT_REJECT_SERVICE";

/// Not a rule: `nft` stops at it with a syntax error.
const FAULT_RULE: &str = "ferrolb-fault-hook-refuse-this";

static FAULT_REJECT_SERVICE: std::sync::LazyLock<Option<ServiceKey>> = std::sync::LazyLock::new(|| {
    let v = std::env::var(FAULT_REJECT_SERVICE_ENV).ok()?;
    let (namespace, name) = v.trim().split_once('/')?;
    Some(ServiceKey::new(namespace, name))
});

/// One port of one Service: what its chain names, comments and slot are derived from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortId {
    pub service: ServiceKey,
    /// The port's name.
    pub port: String,
    pub proto: Protocol,
}

impl fmt::Display for PortId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.service, self.port, self.proto)
    }
}

/// What a Service's chain is for; the prefix of its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChainKind {
    /// `ext-H`: external traffic (externalIPs, LB IPs, NodePorts); jumps to the others.
    Ext,
    /// `fault-H`: the lab's refused-Service hook.
    Fault,
    /// `fw-H`: loadBalancerSourceRanges.
    Fw,
    /// `local-H`: local endpoints.
    Local,
    /// `svc-H`: all endpoints.
    Svc,
}

impl ChainKind {
    fn prefix(self) -> &'static str {
        match self {
            ChainKind::Ext => "ext",
            ChainKind::Fault => "fault",
            ChainKind::Fw => "fw",
            ChainKind::Local => "local",
            ChainKind::Svc => "svc",
        }
    }

    /// The name of the chain of this kind for a port of hash `hash` ([`hash64`]).
    pub fn chain(self, hash: u64) -> ChainName {
        ChainName { kind: self, hash }
    }
}

/// A Service chain's name, `KIND-H` (`H`: 16 hex digits), as a value: written out when rendered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChainName {
    pub kind: ChainKind,
    pub hash: u64,
}

impl fmt::Display for ChainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{:016x}", self.kind.prefix(), self.hash)
    }
}

/// A chain a Service owns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceChain {
    pub kind: ChainKind,
    pub chain: nft::Chain,
}

/// Where a verdict-map element sends a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    /// `goto <chain>`
    Goto(ChainName),
    /// `goto reject-chain`: no endpoints at all.
    Reject,
    Drop,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Goto(chain) => write!(f, "goto {chain}"),
            Verdict::Reject => write!(f, "goto {REJECT_CHAIN}"),
            Verdict::Drop => f.write_str("drop"),
        }
    }
}

/// An element of a global set (no verdict) or verdict map that a Service wants. Two Services
/// may want the same key: the first by key wins (see the caller).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Claim {
    pub set: GlobalSet,
    /// The element's key in nft's syntax (`198.19.0.10 . tcp . 80`), shared with the index of
    /// claims.
    pub key: Arc<str>,
    pub verdict: Option<Verdict>,
}

/// One of the 256 (address-only) or 3 × 256 (address and port, per protocol) endpoint maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndpointMap {
    /// `None`: `endpoints-XX`, addresses only; `Some(proto)`: `endpoints-PROTO-XX`, of
    /// `address . port`.
    pub proto: Option<Protocol>,
    pub index: u8,
}

impl EndpointMap {
    pub fn name(self) -> String {
        match self.proto {
            Some(proto) => format!("endpoints-{proto}-{:02x}", self.index),
            None => format!("endpoints-{:02x}", self.index),
        }
    }

    /// The map's declaration: `key -> address` or `key -> address . port`, the key being what
    /// `numgen random mod N offset BASE` gives (see [`Slot`]). With ports, one map per protocol:
    /// a `th dport` here, or another protocol's port, conflicts with the rule's `meta l4proto`
    /// when `nft` reads the map back from the kernel.
    pub fn set(self, table: Table) -> nft::Set {
        let a = table.word();
        let key = Type::Typeof("numgen random mod 1".to_owned());
        match self.proto {
            Some(proto) => nft::Set::new(self.name(), key)
                .map(Type::Typeof(format!("{a} daddr . {proto} dport")))
                .comment("endpoints by key"),
            None => nft::Set::new(self.name(), key)
                .map(Type::Typeof(format!("{a} daddr")))
                .comment("endpoint addresses by key"),
        }
    }

    /// What orders maps as their names do.
    fn order(self) -> (Option<&'static str>, u8) {
        (self.proto.map(Protocol::as_str), self.index)
    }
}

impl Ord for EndpointMap {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.order().cmp(&other.order())
    }
}

impl PartialOrd for EndpointMap {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Everything one Service puts into the table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceRules {
    /// Sorted by name, one of each name (a later port's chain of the same name replaces an
    /// earlier one's).
    pub chains: Vec<ServiceChain>,
    /// Session-affinity sets, sorted by name, one of each name.
    pub affinity_sets: Vec<nft::Set>,
    /// In the order the Service claims them (its first claim of a key is its claim).
    pub claims: Vec<Claim>,
    /// Endpoint maps its chains read, sorted, each once.
    pub endpoint_maps: Vec<EndpointMap>,
    /// Its elements of endpoint maps (`key : address [. port]`), shared with the index of
    /// endpoint-map elements.
    pub entries: Vec<(EndpointMap, Arc<str>)>,
}

/// One port, decided: the endpoints it sends to, the chains it needs.
#[derive(Debug)]
struct PortPlan<'m> {
    id: PortId,
    /// [`hash64`] of the id: its chains' names.
    hash: u64,
    port: &'m PortModel,
    /// Endpoints under the `Cluster` policy.
    all: Vec<&'m Endpoint>,
    /// Endpoints under a `Local` policy.
    local: Vec<&'m Endpoint>,
    svc_used: bool,
    local_used: bool,
    has_outside: bool,
    /// The endpoints its chains send to.
    endpoints: BTreeSet<&'m Endpoint>,
    /// The slot its endpoints need (none under session affinity, or without endpoints).
    slot: Option<SlotRequest>,
}

/// A Service, decided but not yet rendered: it says which slots it needs.
#[derive(Debug)]
pub struct ServicePlan<'m> {
    key: &'m ServiceKey,
    svc: &'m ServiceModel,
    cluster_ips: Vec<IpAddr>,
    lb_ips: Vec<IpAddr>,
    /// externalIPs and LB IPs.
    outside_ips: Vec<IpAddr>,
    ports: Vec<PortPlan<'m>>,
}

impl<'m> ServicePlan<'m> {
    pub fn new(ctx: &Context, key: &'m ServiceKey, svc: &'m ServiceModel) -> Self {
        let family = ctx.family;
        let full = ctx.full();
        let cluster_ips = if full { svc.cluster_ips_of(family) } else { Vec::new() };
        let lb_ips = svc.lb_ips_of(family);
        let mut outside_ips = if full { svc.external_ips_of(family) } else { Vec::new() };
        outside_ips.extend(lb_ips.iter().copied());
        outside_ips.sort();
        outside_ips.dedup();

        let mut ports: Vec<&PortModel> = svc.ports.iter().collect();
        ports.sort_by(|x, y| (x.proto, x.port, &x.name).cmp(&(y.proto, y.port, &y.name)));
        let ports = ports
            .into_iter()
            .map(|port| {
                let id = PortId { service: key.clone(), port: port.name.clone(), proto: port.proto };
                let hash = hash64(&id.to_string());
                let all = port.cluster_endpoints(family);
                let local = port.local_endpoints(family, &ctx.node);
                let has_outside = !outside_ips.is_empty() || (full && port.node_port.is_some());
                // Chains, created under the same conditions the elements point at them.
                let svc_used = !all.is_empty() && (has_outside || (!cluster_ips.is_empty() && !svc.internal_local));
                let local_used = !local.is_empty()
                    && ((has_outside && svc.external_local) || (!cluster_ips.is_empty() && svc.internal_local));
                let mut endpoints: BTreeSet<&Endpoint> = BTreeSet::new();
                if svc_used {
                    endpoints.extend(all.iter().copied());
                }
                if local_used {
                    endpoints.extend(local.iter().copied());
                }
                let bucketed = svc.affinity_timeout.is_none() && !endpoints.is_empty();
                // One target port for all (the usual case): the map holds addresses only.
                let target_ports: BTreeSet<u16> = endpoints.iter().map(|e| e.port).collect();
                let one_port = if target_ports.len() == 1 { target_ports.first().copied() } else { None };
                let slot = bucketed.then(|| SlotRequest { proto: port.proto, one_port, size: all.len() + local.len() });
                PortPlan { id, hash, port, all, local, svc_used, local_used, has_outside, endpoints, slot }
            })
            .collect();
        Self { key, svc, cluster_ips, lb_ips, outside_ips, ports }
    }

    /// The slots the Service needs, in the order it asks for them.
    pub fn slot_requests(&self) -> impl Iterator<Item = (&PortId, &SlotRequest)> {
        self.ports.iter().filter_map(|p| Some((&p.id, p.slot.as_ref()?)))
    }

    /// The Service's objects, with each port's slot from `slot_of` (asked in port order, once
    /// for each port that needs one).
    pub fn render(&self, ctx: &Context, mut slot_of: impl FnMut(&PortId, &SlotRequest) -> Slot) -> ServiceRules {
        let table = ctx.table();
        let svc = self.svc;
        let mut out = ServiceRules::default();
        if FAULT_REJECT_SERVICE.as_ref() == Some(self.key) {
            let key = self.key.to_string();
            let chain = nft::Chain {
                name: ChainKind::Fault.chain(hash64(&key)).to_string(),
                base: None,
                comment: Some(service_comment(&key, FAULT_REJECT_SERVICE_ENV)),
                rules: vec![FAULT_RULE.to_owned()],
            };
            put_chain(&mut out.chains, ServiceChain { kind: ChainKind::Fault, chain });
        }
        let mut claim = |set: GlobalSet, key: Arc<str>, verdict: Option<Verdict>| {
            out.claims.push(Claim { set, key, verdict });
        };
        // Where keys are written before they are shared.
        let mut buf = String::new();
        for p in &self.ports {
            let (h, proto, port) = (p.hash, p.port.proto, p.port.port);
            let (svc_chain, local_chain, ext_chain) =
                (ChainKind::Svc.chain(h), ChainKind::Local.chain(h), ChainKind::Ext.chain(h));
            let (all, local) = (&p.all, &p.local);

            // Map elements.
            for ip in &self.cluster_ips {
                claim(GlobalSet::ClusterIps, shared(&mut buf, format_args!("{ip}")), None);
                let k = shared(&mut buf, format_args!("{ip} . {proto} . {port}"));
                let (internal, target) = if svc.internal_local { (local, &local_chain) } else { (all, &svc_chain) };
                if !internal.is_empty() {
                    claim(GlobalSet::ServiceIps, k, Some(Verdict::Goto(*target)));
                } else if !all.is_empty() {
                    claim(GlobalSet::NoEndpointServices, k, Some(Verdict::Drop));
                } else {
                    claim(GlobalSet::NoEndpointServices, k, Some(Verdict::Reject));
                }
            }
            let mut outside_keys: Vec<(GlobalSet, GlobalSet, Arc<str>)> = self
                .outside_ips
                .iter()
                .map(|ip| {
                    let k = shared(&mut buf, format_args!("{ip} . {proto} . {port}"));
                    (GlobalSet::ServiceIps, GlobalSet::NoEndpointServices, k)
                })
                .collect();
            if let Some(np) = p.port.node_port.filter(|_| ctx.full()) {
                outside_keys.push((
                    GlobalSet::ServiceNodeports,
                    GlobalSet::NoEndpointNodeports,
                    shared(&mut buf, format_args!("{proto} . {np}")),
                ));
            }
            for (dispatch, no_endpoints, k) in outside_keys {
                if all.is_empty() {
                    claim(no_endpoints, k, Some(Verdict::Reject));
                    continue;
                }
                claim(dispatch, k.clone(), Some(Verdict::Goto(ext_chain)));
                if svc.external_local && local.is_empty() {
                    // Whatever the ext chain did not short-circuit is dropped after DNAT would
                    // have happened: the node has nothing for it.
                    claim(no_endpoints, k, Some(Verdict::Drop));
                }
            }
            let fw_chain = ChainKind::Fw.chain(h);
            if svc.firewalled() {
                for ip in &self.lb_ips {
                    let k = shared(&mut buf, format_args!("{ip} . {proto} . {port}"));
                    claim(GlobalSet::FirewallIps, k, Some(Verdict::Goto(fw_chain)));
                }
            }
            // Only a pod on this node can reach itself through this node's rules.
            for e in p.endpoints.iter().filter(|e| e.node.is_none() || e.is_on(&ctx.node)) {
                claim(GlobalSet::Hairpin, shared(&mut buf, format_args!("{} . {}", e.ip, e.ip)), None);
            }

            let slot = p.slot.as_ref().map(|request| slot_of(&p.id, request));
            if let Some(slot) = &slot {
                // All endpoints from the base on, then the local ones after them.
                for (used, chosen, first) in [(p.svc_used, all, 0), (p.local_used, local, all.len())] {
                    for (i, e) in chosen.iter().enumerate().filter(|_| used) {
                        let key = slot.key(first + i);
                        out.entries.push((
                            slot.map,
                            match slot.port {
                                Some(_) => shared(&mut buf, format_args!("{key} : {}", e.ip)),
                                None => shared(&mut buf, format_args!("{key} : {} . {}", e.ip, e.port)),
                            },
                        ));
                    }
                }
                if let Err(i) = out.endpoint_maps.binary_search(&slot.map) {
                    out.endpoint_maps.insert(i, slot.map);
                }
            }

            let id = p.id.to_string();
            let a = table.word();
            if let Some(timeout) = svc.affinity_timeout {
                for e in &p.endpoints {
                    let set = nft::Set {
                        flags: vec![SetFlag::Dynamic, SetFlag::Timeout],
                        timeout: Some(timeout),
                        ..nft::Set::new(affinity_set(&id, e, timeout), Type::Of(vec![table.addr_type()]))
                    };
                    match out.affinity_sets.binary_search_by(|s| s.name.cmp(&set.name)) {
                        Ok(i) => out.affinity_sets[i] = set,
                        Err(i) => out.affinity_sets.insert(i, set),
                    }
                }
            }
            let mut add_chain = |name: ChainName, what: &str, rules: Vec<String>| {
                let comment = Some(service_comment(&id, what));
                let chain = nft::Chain { name: name.to_string(), base: None, comment, rules };
                put_chain(&mut out.chains, ServiceChain { kind: name.kind, chain });
            };
            if p.svc_used {
                let rules = dispatch(&id, p.port, all, 0, slot.as_ref(), svc.affinity_timeout, table);
                add_chain(svc_chain, "all endpoints", rules);
            }
            if p.local_used {
                let rules = dispatch(&id, p.port, local, all.len(), slot.as_ref(), svc.affinity_timeout, table);
                add_chain(local_chain, "local endpoints", rules);
            }
            if p.has_outside && !all.is_empty() {
                let pod_cidrs = GlobalSet::PodCidrs.name();
                let rules = if svc.external_local {
                    let mut rules = vec![
                        format!("{a} saddr @{pod_cidrs} goto {svc_chain} comment \"short-circuit pod traffic\""),
                        "fib saddr type local jump mark-for-masquerade \
                         comment \"masquerade node-local traffic\""
                            .to_owned(),
                        format!("fib saddr type local goto {svc_chain} comment \"short-circuit node-local traffic\""),
                    ];
                    if p.local_used {
                        rules.push(format!("goto {local_chain} comment \"externalTrafficPolicy Local\""));
                    }
                    rules
                } else {
                    vec![
                        "jump mark-for-masquerade comment \"externalTrafficPolicy Cluster\"".to_owned(),
                        format!("goto {svc_chain}"),
                    ]
                };
                add_chain(ext_chain, "external traffic", rules);
            }
            if svc.firewalled() && !self.lb_ips.is_empty() {
                let ranges = svc.source_ranges_of(ctx.family);
                let rule = if svc.source_ranges_unreadable {
                    "drop comment \"an unreadable loadBalancerSourceRanges entry: closed to all\"".to_owned()
                } else if ranges.is_empty() {
                    "drop comment \"no loadBalancerSourceRanges of this family\"".to_owned()
                } else {
                    // kube-proxy's allowFromNode: a range holding this node's address lets the
                    // node in, and a node with the LB IP on a local interface sends from the LB
                    // IP itself.
                    let from_node = ranges.iter().any(|n| ctx.node_ips.iter().any(|ip| n.contains(*ip)));
                    let mut set: Vec<String> = ranges.into_iter().map(|n| canonical(n).to_string()).collect();
                    if from_node {
                        set.extend(self.lb_ips.iter().map(ToString::to_string));
                    }
                    let set = set.join(", ");
                    format!("{a} saddr != {{ {set} }} drop comment \"loadBalancerSourceRanges\"")
                };
                add_chain(fw_chain, "source ranges", vec![rule]);
            }
        }
        out
    }
}

impl ServiceRules {
    /// Whether the Service's rules read this node's addresses (a loadBalancerSourceRanges chain
    /// does): they must be rendered again when those change.
    pub fn reads_node_ips(&self) -> bool {
        self.chains.iter().any(|c| c.kind == ChainKind::Fw)
    }
}

/// Puts `chain` into `chains` (sorted by name), replacing one of the same name.
fn put_chain(chains: &mut Vec<ServiceChain>, chain: ServiceChain) {
    match chains.binary_search_by(|c| c.chain.name.cmp(&chain.chain.name)) {
        Ok(i) => chains[i] = chain,
        Err(i) => chains.insert(i, chain),
    }
}

/// The first 8 bytes of `sha256(input)`, big-endian: [`hash16`] as a number.
pub fn hash64(input: &str) -> u64 {
    let digest = Sha256::digest(input.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// `args` written out as a shared string (`buf` is scratch space: one allocation, the string's).
fn shared(buf: &mut String, args: fmt::Arguments<'_>) -> Arc<str> {
    buf.clear();
    let _ = buf.write_fmt(args);
    Arc::from(buf.as_str())
}

/// The first 16 hex digits of `sha256(input)`.
pub fn hash16(input: &str) -> String {
    let digest = Sha256::digest(input.as_bytes());
    digest[..8].iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The comment of a chain of service port `id` (`namespace/name/port/protocol`): `"{id}: {what}"`
/// when that fits in [`COMMENT_MAX`] bytes; otherwise the start of `id`, `~` and 8 hex digits of
/// its hash, so that the comment stays distinct per port and still says whose chain it is.
pub fn service_comment(id: &str, what: &str) -> String {
    let full = nft_safe(&format!("{id}: {what}"));
    if full.len() <= COMMENT_MAX {
        return full;
    }
    let tail = format!("~{}: {what}", &hash16(id)[..8]);
    let mut head = nft_safe(id);
    head.truncate(COMMENT_MAX.saturating_sub(tail.len()));
    bounded_comment(&format!("{head}{tail}")).into_owned()
}

/// The timeout is part of the name: a set's timeout cannot be changed in place.
fn affinity_set(id: &str, e: &Endpoint, timeout: u32) -> String {
    format!("aff-{}", hash16(&format!("{id}/{}/{}/{timeout}", e.ip, e.port)))
}

/// An endpoint as a DNAT target: `ip:port`, or `[ip]:port` for IPv6.
fn dnat_target(e: &Endpoint) -> String {
    match e.ip {
        IpAddr::V4(ip) => format!("{ip}:{}", e.port),
        IpAddr::V6(ip) => format!("[{ip}]:{}", e.port),
    }
}

/// Rules choosing an endpoint and translating to it. There is no chain per endpoint: chains are
/// what makes the kernel slow (it validates every chain reachable from a base chain on each
/// commit that adds a `dnat` or `goto`, and `nft` dumps them all before deletions).
///
/// Without affinity: one rule, `dnat` to a random one of the `endpoints.len()` entries from
/// `offset` on in the port's endpoint map. It depends on the number of endpoints only, so most
/// endpoint changes rewrite map elements and no rule (no validation). Not an anonymous map per
/// service: every anonymous set costs the kernel time that grows with the number of sets in the
/// table (8,000 of them take 6 s to load); nor a named map each (the kernel finds sets by name
/// in a list: 10,000 maps add 3 s to a full load).
///
/// With affinity: remembered clients first, then a uniform random pick as a cascade (rule `i` of
/// `N` takes the packet with probability `1 / (N - i)`), each rule updating its endpoint's
/// affinity set and translating; only the first packet of a connection walks it.
fn dispatch(
    id: &str,
    port: &PortModel,
    endpoints: &[&Endpoint],
    offset: usize,
    slot: Option<&Slot>,
    affinity: Option<u32>,
    table: Table,
) -> Vec<String> {
    let proto = port.proto;
    match (affinity, slot) {
        (Some(timeout), _) => affinity_dispatch(id, proto, endpoints, timeout, table),
        (None, Some(slot)) => {
            let (n, key) = (endpoints.len(), slot.key(offset));
            let port = slot.port.map(|p| format!(" : {p}")).unwrap_or_default();
            vec![format!(
                "meta l4proto {proto} dnat to numgen random mod {n} offset {key} map @{}{port}",
                slot.map.name()
            )]
        }
        // Nothing to choose from (a chain is only made for endpoints, which have a slot).
        (None, None) => Vec::new(),
    }
}

/// [`dispatch`] under session affinity.
fn affinity_dispatch(id: &str, proto: Protocol, endpoints: &[&Endpoint], timeout: u32, table: Table) -> Vec<String> {
    let a = table.word();
    let translate = |e: &Endpoint| {
        let set = affinity_set(id, e, timeout);
        format!("meta l4proto {proto} update @{set} {{ {a} saddr }} dnat to {}", dnat_target(e))
    };
    let mut rules = Vec::new();
    for e in endpoints {
        let set = affinity_set(id, e, timeout);
        rules.push(format!("{a} saddr @{set} {} comment \"session affinity\"", translate(e)));
    }
    let n = endpoints.len();
    for (i, e) in endpoints.iter().enumerate() {
        let left = n - i;
        if left == 1 {
            rules.push(translate(e));
        } else {
            rules.push(format!("numgen random mod {left} == 0 {} comment \"1 in {left}\"", translate(e)));
        }
    }
    rules
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_maps_are_ordered_by_name() {
        let mut maps = Vec::new();
        for proto in [None, Some(Protocol::Tcp), Some(Protocol::Udp), Some(Protocol::Sctp)] {
            for index in [0u8, 9, 10, 0xab, 0xff] {
                maps.push(EndpointMap { proto, index });
            }
        }
        let mut by_ord = maps.clone();
        by_ord.sort();
        let mut by_name = maps;
        by_name.sort_by_key(|m| m.name());
        assert_eq!(by_ord, by_name);
    }

    #[test]
    fn chain_kinds_are_ordered_by_prefix() {
        let kinds = [ChainKind::Ext, ChainKind::Fault, ChainKind::Fw, ChainKind::Local, ChainKind::Svc];
        let mut by_prefix = kinds;
        by_prefix.sort_by_key(|k| k.prefix());
        assert_eq!(kinds, by_prefix);
    }
}

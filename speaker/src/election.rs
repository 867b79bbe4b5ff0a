//! Announcer election: which node answers ARP/NDP for each LoadBalancer address.
//!
//! ```text
//!  ServiceFacts ──> groups: services linked by a shared IP, and every IP of each (dual-stack)
//!                     │
//!                     v  per (service, IP): pool ──> advertisements for that pool
//!  NodeFacts ─────> candidates: alive, Ready, not excluded, selected by an advertisement,
//!                     │         (Local) holding a ready endpoint, else a serving-terminating one
//!                     v
//!                  ∩ over the group ──> uncordoned if any ──> min sha256(node "#" key) ──> Announcement per IP
//! ```
//!
//! Every speaker runs this over the same facts and must reach the same answer without talking to
//! the others, so the result depends on the facts alone: not on input order, not on which node
//! asks. The winner is chosen by ranking each candidate with a hash of (node, key) — rendezvous
//! hashing — so a node that leaves moves only the addresses it held, and one that joins takes
//! only its own share; nothing else is reshuffled during a failover.
//!
//! A group (the IPs of a dual-stack service, and every service sharing one of them) is elected
//! once, keyed by its smallest IP, so all its IPs land on one node: a client must reach both
//! families, and every service behind a shared IP, through the same announcer.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::IpAddr;

use ferrolb_config::{Advertisement, Pool, Pools, ServiceKey};
use sha2::{Digest, Sha256};

/// The well-known Node label that keeps a node out of external load balancing.
pub const EXCLUDE_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

/// What the election needs to know about one node. Names are unique.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeFacts {
    /// The Node's name; also what the hash ranks.
    pub name: String,
    /// The Node's labels, for `L2Advertisement.nodeSelectors` and the exclusion label.
    pub labels: BTreeMap<String, String>,
    /// The node's speaker is alive per the membership: a dead speaker cannot answer ARP.
    pub alive: bool,
    /// The Node is Ready: a NotReady node may not forward traffic.
    pub ready: bool,
    /// `spec.unschedulable`: the node is being drained, so it should hand its IPs over while it
    /// still can forward, but keep them when no one else could take them.
    pub cordoned: bool,
}

/// What the election needs to know about one LoadBalancer service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceFacts {
    /// Which Service, to report which services an announcement serves.
    pub key: ServiceKey,
    /// `status.loadBalancer.ingress` addresses, both families.
    pub ips: Vec<IpAddr>,
    /// The pool the controller allocated from (`ferrolb.io/ip-allocated-from-pool`), if known.
    pub pool: Option<String>,
    /// `externalTrafficPolicy: Local`: only nodes with a local endpoint may announce.
    pub local: bool,
    /// Nodes with at least one ready endpoint of the service.
    pub ready_nodes: BTreeSet<String>,
    /// Nodes with a serving but terminating endpoint: used only when no endpoint is ready, so
    /// connections drain during a rollout instead of being refused.
    pub serving_terminating_nodes: BTreeSet<String>,
}

impl ServiceFacts {
    /// Whether any endpoint anywhere can take traffic; if none can, announcing would only attract
    /// traffic to be rejected.
    fn has_endpoints(&self) -> bool {
        !self.ready_nodes.is_empty() || !self.serving_terminating_nodes.is_empty()
    }

    /// The nodes allowed to announce under `Local` (`None` under `Cluster`: any node).
    fn local_nodes(&self) -> Option<&BTreeSet<String>> {
        match (self.local, self.ready_nodes.is_empty()) {
            (false, _) => None,
            (true, false) => Some(&self.ready_nodes),
            (true, true) => Some(&self.serving_terminating_nodes),
        }
    }
}

/// One address and the node that announces it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announcement {
    /// The address announced.
    pub ip: IpAddr,
    /// The winning node.
    pub node: String,
    /// Interfaces to announce on, sorted: the union of the `interfaces` of the advertisements
    /// that apply to this IP's pool and to the node. Empty means automatic (the interfaces whose
    /// subnet holds the IP); it is also empty when any one of those advertisements lists no
    /// interfaces, since that advertisement asks for every interface.
    pub interfaces: Vec<String>,
    /// The services using this IP, sorted.
    pub services: Vec<ServiceKey>,
}

/// The candidate ranked first for `key`: smallest `sha256(node + "#" + key)`, compared as bytes.
pub fn winner<'a>(key: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    // The name breaks ties only for duplicates of one name, which hash alike.
    candidates.into_iter().min_by_key(|node| (rank(node, key), *node))
}

fn rank(node: &str, key: &str) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(node.as_bytes());
    hash.update(b"#");
    hash.update(key.as_bytes());
    hash.finalize().into()
}

/// Decides the announcer of every service IP; IPs nobody may announce are absent.
///
/// Services with no ready or serving-terminating endpoint anywhere are left out before anything
/// else: they need no announcement, and they must not stop an IP they share with a service that
/// has endpoints from being announced.
///
/// A group whose members have no candidate in common is not announced at all. Announcing part of
/// it, or all of it from a node that is a candidate for only some members, would send traffic to a
/// node that may not serve it (no local endpoint under `Local`, or a node the advertisement does
/// not select), and would split a dual-stack service or a shared IP across nodes. This happens only
/// with contradictory configuration, e.g. `Local` services sharing an IP with endpoints on
/// disjoint nodes, or the pools of a dual-stack service advertised from disjoint nodes.
pub fn elect(
    nodes: &[NodeFacts],
    services: &[ServiceFacts],
    pools: &Pools,
    ads: &[Advertisement],
) -> BTreeMap<IpAddr, Announcement> {
    let nodes: BTreeMap<&str, &NodeFacts> = nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let wanted: Vec<&ServiceFacts> = services.iter().filter(|s| s.has_endpoints()).collect();
    let mut out = BTreeMap::new();
    for group in groups(&wanted) {
        let Some(first_ip) = group.ips.first() else { continue };
        let key = first_ip.to_string();
        let mut common: Option<BTreeSet<&str>> = None;
        for service in &group.members {
            for ip in &service.ips {
                let these = candidates(service, *ip, &nodes, pools, ads);
                common = Some(match common {
                    None => these,
                    Some(before) => before.intersection(&these).copied().collect(),
                });
            }
        }
        let common = common.unwrap_or_default();
        let uncordoned: Vec<&str> = common.iter().copied().filter(|n| !nodes[n].cordoned).collect();
        let chosen = if uncordoned.is_empty() { winner(&key, common) } else { winner(&key, uncordoned) };
        let Some(node) = chosen else { continue };
        for ip in &group.ips {
            let users: Vec<&ServiceFacts> = group.members.iter().copied().filter(|s| s.ips.contains(ip)).collect();
            let mut services: Vec<ServiceKey> = users.iter().map(|s| s.key.clone()).collect();
            services.sort();
            services.dedup();
            let interfaces = interfaces(&users, *ip, nodes[node], pools, ads);
            out.insert(*ip, Announcement { ip: *ip, node: node.to_string(), interfaces, services });
        }
    }
    out
}

/// Services linked by shared IPs, and all their IPs.
struct Group<'a> {
    ips: BTreeSet<IpAddr>,
    members: Vec<&'a ServiceFacts>,
}

/// The connected components of "services sharing an IP". Each component's content does not
/// depend on input order; only the order of components and members may, and `elect` uses neither.
fn groups<'a>(services: &[&'a ServiceFacts]) -> Vec<Group<'a>> {
    let mut by_ip: BTreeMap<IpAddr, Vec<usize>> = BTreeMap::new();
    for (i, s) in services.iter().enumerate() {
        for ip in &s.ips {
            by_ip.entry(*ip).or_default().push(i);
        }
    }
    let mut seen = vec![false; services.len()];
    let mut out = Vec::new();
    for start in 0..services.len() {
        if seen[start] || services[start].ips.is_empty() {
            continue;
        }
        seen[start] = true;
        let mut group = Group { ips: BTreeSet::new(), members: Vec::new() };
        let mut queue = VecDeque::from([start]);
        while let Some(i) = queue.pop_front() {
            group.members.push(services[i]);
            for ip in &services[i].ips {
                if group.ips.insert(*ip) {
                    for &j in &by_ip[ip] {
                        if !seen[j] {
                            seen[j] = true;
                            queue.push_back(j);
                        }
                    }
                }
            }
        }
        out.push(group);
    }
    out
}

/// The pool an IP of a service belongs to: the one the controller recorded if it holds the IP,
/// else the one that holds it (addresses given by hand, or a record naming a pool that is gone).
///
/// The record is an annotation anyone who may edit the Service can write: naming a pool that
/// does not hold the address must not pick that pool's advertisements (its interfaces, its
/// nodes). Such a record is ignored, and logged once per service, address and name.
fn pool_of<'p>(service: &ServiceFacts, ip: IpAddr, pools: &'p Pools) -> Option<&'p Pool> {
    let holding = || pools.pools.values().find(|p| p.contains(ip));
    let Some(recorded) = service.pool.as_deref() else { return holding() };
    match pools.pools.get(recorded) {
        Some(p) if p.contains(ip) => Some(p),
        Some(_) => {
            let actual = holding();
            warn_once(&service.key, ip, recorded, actual.map(|p| p.name.as_str()));
            actual
        }
        None => holding(),
    }
}

/// Logs a recorded pool that does not hold the address, the first time it is seen.
fn warn_once(service: &ServiceKey, ip: IpAddr, recorded: &str, actual: Option<&str>) {
    static SEEN: std::sync::Mutex<BTreeSet<(ServiceKey, IpAddr, String)>> = std::sync::Mutex::new(BTreeSet::new());
    let Ok(mut seen) = SEEN.lock() else { return };
    // Anyone who may edit a Service writes the annotation: the memory of what was logged stays
    // bounded (starting over only repeats a warning).
    if seen.len() >= 10_000 {
        seen.clear();
    }
    if seen.insert((service.clone(), ip, recorded.to_owned())) {
        tracing::warn!(
            service = %service,
            %ip,
            recorded,
            used = actual.unwrap_or("none"),
            "the Service's ferrolb.io/ip-allocated-from-pool names a pool that does not hold the address: \
             using the advertisements of the pool that does"
        );
    }
}

/// The nodes that may announce `ip` for `service`, cordoned or not.
fn candidates<'n>(
    service: &ServiceFacts,
    ip: IpAddr,
    nodes: &BTreeMap<&'n str, &NodeFacts>,
    pools: &Pools,
    ads: &[Advertisement],
) -> BTreeSet<&'n str> {
    let Some(pool) = pool_of(service, ip, pools) else { return BTreeSet::new() };
    let ads: Vec<&Advertisement> = ads.iter().filter(|a| a.applies_to_pool(pool)).collect();
    let local = service.local_nodes();
    nodes
        .iter()
        .filter(|(_, n)| n.alive && n.ready && !n.labels.contains_key(EXCLUDE_LABEL))
        .filter(|(_, n)| ads.iter().any(|a| a.applies_to_node(&n.labels)))
        .filter(|(name, _)| local.is_none_or(|set| set.contains(**name)))
        .map(|(name, _)| *name)
        .collect()
}

fn interfaces(
    users: &[&ServiceFacts],
    ip: IpAddr,
    node: &NodeFacts,
    pools: &Pools,
    ads: &[Advertisement],
) -> Vec<String> {
    let mut named = BTreeSet::new();
    for service in users {
        let Some(pool) = pool_of(service, ip, pools) else { continue };
        for ad in ads.iter().filter(|a| a.applies_to_pool(pool) && a.applies_to_node(&node.labels)) {
            if ad.interfaces.is_empty() {
                return Vec::new();
            }
            named.extend(ad.interfaces.iter().cloned());
        }
    }
    named.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrolb_config::{AddressRange, Selector};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn node(name: &str) -> NodeFacts {
        NodeFacts { name: name.to_string(), labels: BTreeMap::new(), alive: true, ready: true, cordoned: false }
    }

    fn nodes(names: &[&str]) -> Vec<NodeFacts> {
        names.iter().map(|n| node(n)).collect()
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(ToString::to_string).collect()
    }

    /// `namespace/name` as a key.
    fn key(s: &str) -> ServiceKey {
        let (namespace, name) = s.split_once('/').unwrap_or(("", s));
        ServiceKey::new(namespace, name)
    }

    /// Keys as `namespace/name`, to compare with a list.
    fn shown(keys: &[ServiceKey]) -> Vec<String> {
        keys.iter().map(ToString::to_string).collect()
    }

    /// A Cluster service with a ready endpoint on node-1.
    fn svc(name: &str, ips: &[&str]) -> ServiceFacts {
        ServiceFacts {
            key: key(name),
            ips: ips.iter().map(|s| ip(s)).collect(),
            pool: None,
            local: false,
            ready_nodes: set(&["node-1"]),
            serving_terminating_nodes: BTreeSet::new(),
        }
    }

    fn pool(name: &str, ranges: &[&str], pool_labels: &[(&str, &str)]) -> Pool {
        Pool {
            name: name.to_string(),
            labels: labels(pool_labels),
            ranges: ranges.iter().map(|r| AddressRange::parse(r).unwrap()).collect(),
            auto_assign: true,
            avoid_buggy_ips: false,
            allocation: None,
        }
    }

    fn pools(list: Vec<Pool>) -> Pools {
        Pools { pools: list.into_iter().map(|p| (p.name.clone(), p)).collect(), rejected: BTreeMap::new() }
    }

    /// The demo pool, both families.
    fn demo() -> Pools {
        pools(vec![pool("demo", &["192.0.2.200-192.0.2.250", "2001:db8:1::c8-2001:db8:1::fa"], &[])])
    }

    fn everywhere() -> Vec<Advertisement> {
        vec![Advertisement { name: "all".to_string(), ..Advertisement::default() }]
    }

    fn selector(pairs: &[(&str, &str)]) -> Selector {
        Selector::from_k8s(&LabelSelector { match_labels: Some(labels(pairs)), match_expressions: None }).unwrap()
    }

    fn winners(result: &BTreeMap<IpAddr, Announcement>) -> BTreeMap<IpAddr, String> {
        result.iter().map(|(ip, a)| (*ip, a.node.clone())).collect()
    }

    fn node_of(result: &BTreeMap<IpAddr, Announcement>, s: &str) -> Option<String> {
        result.get(&ip(s)).map(|a| a.node.clone())
    }

    #[test]
    fn winner_is_the_smallest_hash() {
        let names = ["node-1", "node-2", "node-3"];
        let hash = |n: &str| -> Vec<u8> { Sha256::digest(format!("{n}#192.0.2.200")).to_vec() };
        let expected = names.iter().min_by_key(|n| hash(n)).copied();
        assert_eq!(winner("192.0.2.200", names), expected);
        let reversed: Vec<&str> = names.iter().rev().copied().collect();
        assert_eq!(winner("192.0.2.200", reversed), expected);
        assert_eq!(winner("192.0.2.200", []), None);
    }

    #[test]
    fn different_ips_spread_over_nodes() {
        let names = ["node-1", "node-2", "node-3"];
        let chosen: BTreeSet<&str> =
            (200..=250).filter_map(|i| winner(&format!("192.0.2.{i}"), names.iter().copied())).collect();
        assert_eq!(chosen.len(), 3, "51 IPs over 3 nodes use every node");
    }

    #[test]
    fn one_service_one_announcer() {
        let result =
            elect(&nodes(&["node-1", "node-2", "node-3"]), &[svc("web/a", &["192.0.2.200"])], &demo(), &everywhere());
        let a = &result[&ip("192.0.2.200")];
        assert_eq!(Some(a.node.as_str()), winner("192.0.2.200", ["node-1", "node-2", "node-3"]));
        assert_eq!(shown(&a.services), ["web/a"]);
        assert!(a.interfaces.is_empty());
        assert_eq!(result.len(), 1);
    }

    #[test]
    fn dead_not_ready_and_excluded_nodes_are_not_candidates() {
        let mut list = nodes(&["dead", "not-ready", "excluded", "ok"]);
        list[0].alive = false;
        list[1].ready = false;
        list[2].labels = labels(&[(EXCLUDE_LABEL, "")]);
        for i in 200..=250 {
            let result = elect(&list, &[svc("web/a", &[&format!("192.0.2.{i}")])], &demo(), &everywhere());
            assert_eq!(winners(&result).values().collect::<Vec<_>>(), ["ok"]);
        }
        list[3].alive = false;
        assert!(elect(&list, &[svc("web/a", &["192.0.2.200"])], &demo(), &everywhere()).is_empty());
    }

    #[test]
    fn no_pool_or_no_advertisement_means_nobody() {
        let list = nodes(&["node-1", "node-2"]);
        assert!(elect(&list, &[svc("web/a", &["198.51.100.1"])], &demo(), &everywhere()).is_empty(), "in no pool");
        assert!(elect(&list, &[svc("web/a", &["192.0.2.200"])], &demo(), &[]).is_empty(), "no advertisement");
        let other = Advertisement { name: "other".to_string(), pool_names: set(&["dmz"]), ..Advertisement::default() };
        assert!(elect(&list, &[svc("web/a", &["192.0.2.200"])], &demo(), &[other]).is_empty(), "not for this pool");
    }

    #[test]
    fn the_recorded_pool_counts_when_it_holds_the_address() {
        let both = pools(vec![pool("demo", &["192.0.2.200-192.0.2.250"], &[]), pool("dmz", &["198.51.100.0/24"], &[])]);
        let dmz_only = Advertisement { name: "dmz".to_string(), pool_names: set(&["dmz"]), ..Advertisement::default() };
        let mut service = svc("web/a", &["198.51.100.7"]);
        let list = nodes(&["node-1"]);
        service.pool = Some("dmz".to_string());
        assert_eq!(
            node_of(
                &elect(&list, std::slice::from_ref(&service), &both, std::slice::from_ref(&dmz_only)),
                "198.51.100.7"
            )
            .as_deref(),
            Some("node-1")
        );
        // A recorded pool that no longer exists falls back to the containing pool.
        service.pool = Some("gone".to_string());
        assert_eq!(elect(&list, std::slice::from_ref(&service), &both, std::slice::from_ref(&dmz_only)).len(), 1);
        let demo_only =
            Advertisement { name: "demo".to_string(), pool_names: set(&["demo"]), ..Advertisement::default() };
        assert!(elect(&list, &[service], &both, &[demo_only]).is_empty());
    }

    /// A tenant may write `ip-allocated-from-pool` on their Service: naming a pool that does not
    /// hold the address must not buy that pool's advertisements.
    #[test]
    fn a_recorded_pool_that_does_not_hold_the_address_is_ignored() {
        let both = pools(vec![pool("demo", &["192.0.2.200-192.0.2.250"], &[]), pool("dmz", &["198.51.100.0/24"], &[])]);
        let dmz_only = Advertisement { name: "dmz".to_string(), pool_names: set(&["dmz"]), ..Advertisement::default() };
        let demo_eth1 = Advertisement {
            name: "demo".to_string(),
            pool_names: set(&["demo"]),
            interfaces: vec!["eth1".to_string()],
            ..Advertisement::default()
        };
        let dmz_eth9 = Advertisement {
            name: "dmz-any".to_string(),
            pool_names: set(&["dmz"]),
            interfaces: vec!["eth9".to_string()],
            ..Advertisement::default()
        };
        let list = nodes(&["node-1"]);
        let mut service = svc("web/a", &["192.0.2.200"]);
        service.pool = Some("dmz".to_string());
        assert!(
            elect(&list, std::slice::from_ref(&service), &both, std::slice::from_ref(&dmz_only)).is_empty(),
            "dmz's advertisement does not apply to a demo address"
        );
        let ads = [demo_eth1, dmz_eth9];
        let result = elect(&list, std::slice::from_ref(&service), &both, &ads);
        assert_eq!(result[&ip("192.0.2.200")].interfaces, ["eth1"], "demo's interfaces, not dmz's");
        service.pool = None;
        assert_eq!(elect(&list, &[service], &both, &ads), result, "the same as with no record");
    }

    #[test]
    fn advertisements_select_pools_and_nodes() {
        let mut list = nodes(&["node-1", "node-2", "node-3"]);
        list[1].labels = labels(&[("edge", "true")]);
        let pools = pools(vec![pool("demo", &["192.0.2.200-192.0.2.250"], &[("announce", "l2")])]);
        let ad = Advertisement {
            name: "edge".to_string(),
            pool_selectors: vec![selector(&[("announce", "l2")])],
            node_selectors: vec![selector(&[("edge", "true")])],
            interfaces: vec!["eth1".to_string()],
            ..Advertisement::default()
        };
        for i in 200..=250 {
            let s = format!("192.0.2.{i}");
            let result = elect(&list, &[svc("web/a", &[&s])], &pools, std::slice::from_ref(&ad));
            assert_eq!(node_of(&result, &s).as_deref(), Some("node-2"));
            assert_eq!(result[&ip(&s)].interfaces, ["eth1"]);
        }
    }

    #[test]
    fn interfaces_are_the_union_and_empty_means_all() {
        let list = nodes(&["node-1"]);
        let ad = |name: &str, ifaces: &[&str]| Advertisement {
            name: name.to_string(),
            interfaces: ifaces.iter().map(ToString::to_string).collect(),
            ..Advertisement::default()
        };
        let service = [svc("web/a", &["192.0.2.200"])];
        let result = elect(&list, &service, &demo(), &[ad("a", &["eth1", "eth0"]), ad("b", &["eth2", "eth0"])]);
        assert_eq!(result[&ip("192.0.2.200")].interfaces, ["eth0", "eth1", "eth2"]);
        let result = elect(&list, &service, &demo(), &[ad("a", &["eth1"]), ad("b", &[])]);
        assert!(result[&ip("192.0.2.200")].interfaces.is_empty());
        // An advertisement that doesn't select the winner adds nothing.
        let mut other = ad("c", &["eth9"]);
        other.node_selectors = vec![selector(&[("role", "other")])];
        let result = elect(&list, &service, &demo(), &[ad("a", &["eth1"]), other]);
        assert_eq!(result[&ip("192.0.2.200")].interfaces, ["eth1"]);
    }

    #[test]
    fn local_policy_announces_only_from_nodes_with_ready_endpoints() {
        let list = nodes(&["node-1", "node-2", "node-3", "node-4"]);
        for i in 200..=250 {
            let s = format!("192.0.2.{i}");
            let mut service = svc("web/a", &[&s]);
            service.local = true;
            service.ready_nodes = set(&["node-2", "node-3"]);
            service.serving_terminating_nodes = set(&["node-4"]);
            let chosen = node_of(&elect(&list, &[service.clone()], &demo(), &everywhere()), &s).unwrap();
            assert!(chosen == "node-2" || chosen == "node-3", "{chosen}");
            assert_eq!(Some(chosen.as_str()), winner(&s, ["node-2", "node-3"]));
            // No ready endpoint: serving-terminating ones are the fallback.
            service.ready_nodes.clear();
            assert_eq!(node_of(&elect(&list, &[service], &demo(), &everywhere()), &s).as_deref(), Some("node-4"));
        }
    }

    #[test]
    fn local_endpoints_on_ineligible_nodes_mean_nobody() {
        let mut list = nodes(&["node-1", "node-2"]);
        list[1].ready = false;
        let mut service = svc("web/a", &["192.0.2.200"]);
        service.local = true;
        service.ready_nodes = set(&["node-2"]);
        assert!(elect(&list, &[service], &demo(), &everywhere()).is_empty());
    }

    #[test]
    fn cluster_policy_needs_an_endpoint_somewhere() {
        let list = nodes(&["node-1", "node-2"]);
        let mut service = svc("web/a", &["192.0.2.200"]);
        service.ready_nodes = set(&["elsewhere"]);
        assert!(node_of(&elect(&list, &[service.clone()], &demo(), &everywhere()), "192.0.2.200").is_some());
        service.ready_nodes.clear();
        assert!(elect(&list, &[service.clone()], &demo(), &everywhere()).is_empty());
        service.serving_terminating_nodes = set(&["node-2"]);
        assert!(node_of(&elect(&list, &[service], &demo(), &everywhere()), "192.0.2.200").is_some());
    }

    #[test]
    fn cordoned_nodes_only_as_a_last_resort() {
        let mut list = nodes(&["node-1", "node-2", "node-3"]);
        for i in 200..=250 {
            let s = format!("192.0.2.{i}");
            let service = [svc("web/a", &[&s])];
            let holder = node_of(&elect(&list, &service, &demo(), &everywhere()), &s).unwrap();
            let index = list.iter().position(|n| n.name == holder).unwrap();
            list[index].cordoned = true;
            let next = node_of(&elect(&list, &service, &demo(), &everywhere()), &s).unwrap();
            assert_ne!(next, holder);
            assert!(!list.iter().any(|n| n.name == next && n.cordoned));
            list[index].cordoned = false;
        }
        for n in &mut list {
            n.cordoned = true;
        }
        let result = elect(&list, &[svc("web/a", &["192.0.2.200"])], &demo(), &everywhere());
        assert_eq!(node_of(&result, "192.0.2.200").as_deref(), winner("192.0.2.200", ["node-1", "node-2", "node-3"]));
    }

    #[test]
    fn both_families_of_a_dual_stack_service_go_to_one_node() {
        let list = nodes(&["node-1", "node-2", "node-3", "node-4", "node-5"]);
        for i in 200..=250 {
            let v4 = format!("192.0.2.{i}");
            let v6 = format!("2001:db8:1::{i:x}");
            let result = elect(&list, &[svc("web/a", &[&v6, &v4])], &demo(), &everywhere());
            let names = ["node-1", "node-2", "node-3", "node-4", "node-5"];
            assert_eq!(node_of(&result, &v4).as_deref(), winner(&v4, names), "keyed by the smallest IP");
            assert_eq!(node_of(&result, &v6), node_of(&result, &v4));
        }
    }

    #[test]
    fn services_sharing_an_ip_are_one_group() {
        let list = nodes(&["node-1", "node-2", "node-3", "node-4", "node-5"]);
        for i in 200..=249 {
            let a = format!("192.0.2.{i}");
            let b = format!("192.0.2.{}", i + 1);
            let v6 = format!("2001:db8:1::{i:x}");
            // a: v4 a + v6; b: shares a, plus its own b. One chain, one node.
            let services = [svc("web/a", &[&a, &v6]), svc("web/b", &[&b, &a])];
            let result = elect(&list, &services, &demo(), &everywhere());
            let chosen = node_of(&result, &a);
            assert!(chosen.is_some());
            assert_eq!(node_of(&result, &b), chosen);
            assert_eq!(node_of(&result, &v6), chosen);
            assert_eq!(shown(&result[&ip(&a)].services), ["web/a", "web/b"]);
            assert_eq!(shown(&result[&ip(&b)].services), ["web/b"]);
            assert_eq!(shown(&result[&ip(&v6)].services), ["web/a"]);
        }
    }

    #[test]
    fn a_group_with_no_common_candidate_is_not_announced() {
        let list = nodes(&["node-1", "node-2", "node-3"]);
        let mut a = svc("web/a", &["192.0.2.200"]);
        a.local = true;
        a.ready_nodes = set(&["node-1"]);
        let mut b = svc("web/b", &["192.0.2.200", "192.0.2.201"]);
        b.local = true;
        b.ready_nodes = set(&["node-2"]);
        assert!(elect(&list, &[a.clone(), b.clone()], &demo(), &everywhere()).is_empty());
        b.ready_nodes = set(&["node-1", "node-2"]);
        let result = elect(&list, &[a, b], &demo(), &everywhere());
        assert_eq!(winners(&result).values().collect::<Vec<_>>(), ["node-1", "node-1"]);
    }

    #[test]
    fn a_service_without_endpoints_does_not_block_its_shared_ip() {
        let list = nodes(&["node-1", "node-2"]);
        let mut idle = svc("web/idle", &["192.0.2.200"]);
        idle.ready_nodes.clear();
        idle.local = true;
        let result = elect(&list, &[svc("web/a", &["192.0.2.200"]), idle], &demo(), &everywhere());
        assert_eq!(shown(&result[&ip("192.0.2.200")].services), ["web/a"]);
    }

    #[test]
    fn a_dual_stack_service_needs_a_node_advertised_for_both_pools() {
        let mut list = nodes(&["node-1", "node-2"]);
        list[0].labels = labels(&[("v4", "yes")]);
        list[1].labels = labels(&[("v6", "yes")]);
        let pools = pools(vec![
            pool("v4", &["192.0.2.200-192.0.2.250"], &[]),
            pool("v6", &["2001:db8:1::c8-2001:db8:1::fa"], &[]),
        ]);
        let ad = |name: &str, key: &str| Advertisement {
            name: name.to_string(),
            pool_names: set(&[name]),
            node_selectors: vec![selector(&[(key, "yes")])],
            ..Advertisement::default()
        };
        let service = [svc("web/a", &["192.0.2.200", "2001:db8:1::c8"])];
        assert!(elect(&list, &service, &pools, &[ad("v4", "v4"), ad("v6", "v6")]).is_empty());
        list[0].labels.insert("v6".to_string(), "yes".to_string());
        let result = elect(&list, &service, &pools, &[ad("v4", "v4"), ad("v6", "v6")]);
        assert_eq!(winners(&result).values().collect::<Vec<_>>(), ["node-1", "node-1"]);
    }

    // ---- properties ----

    const NODE_NAMES: [&str; 6] = ["node-1", "node-2", "node-3", "node-4", "node-5", "node-6"];

    fn arb_node(name: &'static str) -> impl Strategy<Value = NodeFacts> {
        (any::<bool>(), 0u8..10, 0u8..10, 0u8..10, 0u8..10).prop_map(move |(edge, alive, ready, cordoned, excl)| {
            let mut labels = BTreeMap::new();
            if edge {
                labels.insert("edge".to_string(), "true".to_string());
            }
            if excl == 0 {
                labels.insert(EXCLUDE_LABEL.to_string(), String::new());
            }
            NodeFacts { name: name.to_string(), labels, alive: alive > 0, ready: ready > 0, cordoned: cordoned < 3 }
        })
    }

    fn arb_nodes() -> impl Strategy<Value = Vec<NodeFacts>> {
        NODE_NAMES.iter().map(|n| arb_node(n)).collect::<Vec<_>>()
    }

    fn arb_node_set() -> impl Strategy<Value = BTreeSet<String>> {
        proptest::sample::subsequence(NODE_NAMES.to_vec(), 0..=NODE_NAMES.len())
            .prop_map(|names| names.into_iter().map(String::from).collect())
    }

    /// IPs from a small set (so services often share), in the demo pool, in a second pool, or in none.
    fn arb_ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            (200u8..212).prop_map(|i| IpAddr::from([192, 0, 2, i])),
            (0xc8u16..0xd0).prop_map(|i| IpAddr::from([0x2001, 0xdb8, 1, 0, 0, 0, 0, i])),
            (1u8..4).prop_map(|i| IpAddr::from([198, 51, 100, i])),
            Just(IpAddr::from([203, 0, 113, 1])),
        ]
    }

    fn arb_services() -> impl Strategy<Value = Vec<ServiceFacts>> {
        proptest::collection::vec(
            (
                proptest::collection::vec(arb_ip(), 1..3),
                any::<bool>(),
                arb_node_set(),
                arb_node_set(),
                proptest::option::of(prop_oneof![Just("demo"), Just("dmz"), Just("gone")]),
            ),
            0..8,
        )
        .prop_map(|list| {
            list.into_iter()
                .enumerate()
                .map(|(i, (ips, local, ready_nodes, serving_terminating_nodes, pool))| ServiceFacts {
                    key: ServiceKey::new("ns", format!("svc-{i}")),
                    ips,
                    pool: pool.map(String::from),
                    local,
                    ready_nodes,
                    serving_terminating_nodes,
                })
                .collect()
        })
    }

    fn prop_pools() -> Pools {
        pools(vec![
            pool("demo", &["192.0.2.200-192.0.2.250", "2001:db8:1::c8-2001:db8:1::fa"], &[]),
            pool("dmz", &["198.51.100.0/24"], &[("announce", "edge")]),
        ])
    }

    fn prop_ads() -> Vec<Advertisement> {
        vec![
            Advertisement { name: "all".to_string(), pool_names: set(&["demo"]), ..Advertisement::default() },
            Advertisement {
                name: "edge".to_string(),
                pool_selectors: vec![selector(&[("announce", "edge")])],
                node_selectors: vec![selector(&[("edge", "true")])],
                interfaces: vec!["eth1".to_string()],
                ..Advertisement::default()
            },
        ]
    }

    /// The candidates every member of `ip`'s group has in common, cordoned or not.
    fn group_candidates(ip: IpAddr, nodes: &[NodeFacts], services: &[ServiceFacts]) -> BTreeSet<String> {
        let (pools, ads) = (prop_pools(), prop_ads());
        let by_name: BTreeMap<&str, &NodeFacts> = nodes.iter().map(|n| (n.name.as_str(), n)).collect();
        let wanted: Vec<&ServiceFacts> = services.iter().filter(|s| s.has_endpoints()).collect();
        let group = groups(&wanted).into_iter().find(|g| g.ips.contains(&ip)).unwrap();
        let mut common: BTreeSet<&str> = by_name.keys().copied().collect();
        for s in &group.members {
            for member_ip in &s.ips {
                let these = candidates(s, *member_ip, &by_name, &pools, &ads);
                common.retain(|n| these.contains(n));
            }
        }
        common.into_iter().map(String::from).collect()
    }

    proptest! {
        #[test]
        fn input_order_does_not_matter(
            (nodes, services, shuffled_nodes, shuffled_services, reverse_ips) in (arb_nodes(), arb_services())
                .prop_flat_map(|(n, s)| (Just(n.clone()), Just(s.clone()), Just(n).prop_shuffle(), Just(s).prop_shuffle(), any::<bool>())),
        ) {
            let expected = elect(&nodes, &services, &prop_pools(), &prop_ads());
            let mut shuffled_services = shuffled_services;
            if reverse_ips {
                for s in &mut shuffled_services {
                    s.ips.reverse();
                }
            }
            prop_assert_eq!(elect(&shuffled_nodes, &shuffled_services, &prop_pools(), &prop_ads()), expected);
        }

        #[test]
        fn losing_a_node_moves_only_its_ips(nodes in arb_nodes(), services in arb_services(), gone in 0usize..6) {
            let before = winners(&elect(&nodes, &services, &prop_pools(), &prop_ads()));
            let mut after_nodes = nodes.clone();
            after_nodes[gone].alive = false;
            let after = winners(&elect(&after_nodes, &services, &prop_pools(), &prop_ads()));
            let name = NODE_NAMES[gone];
            for (ip, holder) in &before {
                if holder != name {
                    prop_assert_eq!(after.get(ip), Some(holder), "{} moved off {}", ip, holder);
                }
            }
            prop_assert!(after.values().all(|n| n != name));
            // Losing a node never makes a new IP announced.
            prop_assert!(after.keys().all(|ip| before.contains_key(ip)));
        }

        #[test]
        fn cordoning_moves_an_ip_only_to_an_uncordoned_candidate(
            nodes in arb_nodes(), services in arb_services(), target in 0usize..6,
        ) {
            let mut nodes = nodes;
            nodes[target].cordoned = false;
            let before = winners(&elect(&nodes, &services, &prop_pools(), &prop_ads()));
            let mut after_nodes = nodes.clone();
            after_nodes[target].cordoned = true;
            let after = winners(&elect(&after_nodes, &services, &prop_pools(), &prop_ads()));
            let name = NODE_NAMES[target];
            prop_assert_eq!(before.keys().collect::<Vec<_>>(), after.keys().collect::<Vec<_>>());
            for (ip, holder) in &before {
                let now = &after[ip];
                if holder != name {
                    prop_assert_eq!(now, holder, "{} moved though its holder was not cordoned", ip);
                } else if now != holder {
                    // Moved off the cordoned node: to an uncordoned node, or — when every
                    // candidate is cordoned — to the hash winner among them (see
                    // `all_cordoned_can_move_between_cordoned_nodes`).
                    let uncordoned_exists = after_nodes.iter().any(|n| &n.name == now && !n.cordoned);
                    let all_cordoned = group_candidates(*ip, &after_nodes, &services)
                        .iter()
                        .all(|c| after_nodes.iter().any(|n| &n.name == c && n.cordoned));
                    prop_assert!(uncordoned_exists || all_cordoned);
                }
            }
        }

        #[test]
        fn only_candidates_announce(nodes in arb_nodes(), services in arb_services()) {
            for (ip, a) in elect(&nodes, &services, &prop_pools(), &prop_ads()) {
                prop_assert_eq!(a.ip, ip);
                let users: Vec<&ServiceFacts> = services.iter().filter(|s| s.ips.contains(&ip) && s.has_endpoints()).collect();
                prop_assert!(!users.is_empty());
                prop_assert!(group_candidates(ip, &nodes, &services).contains(&a.node), "{} on {}", ip, a.node);
                // The node is a candidate for every service using the IP, not just one.
                let by_name: BTreeMap<&str, &NodeFacts> = nodes.iter().map(|n| (n.name.as_str(), n)).collect();
                for s in users {
                    prop_assert!(candidates(s, ip, &by_name, &prop_pools(), &prop_ads()).contains(a.node.as_str()));
                }
            }
        }
    }

    #[test]
    fn the_cordon_preference_is_among_the_common_candidates() {
        // 192.0.2.200 may go anywhere, 198.51.100.1 (pool "dmz") only to edge nodes: the group's
        // common candidates are the edge nodes, and node-5 is never one, cordons or not.
        let mut list = nodes(&["node-3", "node-5", "node-6"]);
        list[0].labels = labels(&[("edge", "true")]);
        list[2].labels = labels(&[("edge", "true")]);
        list[2].cordoned = true;
        let service = [svc("web/a", &["198.51.100.1", "192.0.2.200"])];
        let result = elect(&list, &service, &prop_pools(), &prop_ads());
        assert_eq!(winners(&result).values().collect::<Vec<_>>(), ["node-3", "node-3"]);
        assert_eq!(result[&ip("198.51.100.1")].interfaces, ["eth1"]);
        assert!(result[&ip("192.0.2.200")].interfaces.is_empty());
        list[0].cordoned = true;
        let result = elect(&list, &service, &prop_pools(), &prop_ads());
        let expected = winner("192.0.2.200", ["node-3", "node-6"]).unwrap();
        assert_eq!(winners(&result).values().collect::<Vec<_>>(), [expected, expected]);
    }

    /// The corner the cordon property allows: with every candidate cordoned, the stateless
    /// election can only rank them by hash, so cordoning the last uncordoned holder may hand the
    /// IP to another cordoned node.
    #[test]
    fn all_cordoned_can_move_between_cordoned_nodes() {
        let s = (200..=250)
            .map(|i| format!("192.0.2.{i}"))
            .find(|s| winner(s, ["node-1", "node-2"]) == Some("node-2"))
            .unwrap();
        let mut list = nodes(&["node-1", "node-2"]);
        list[1].cordoned = true;
        let service = [svc("web/a", &[&s])];
        assert_eq!(node_of(&elect(&list, &service, &demo(), &everywhere()), &s).as_deref(), Some("node-1"));
        list[0].cordoned = true;
        assert_eq!(node_of(&elect(&list, &service, &demo(), &everywhere()), &s).as_deref(), Some("node-2"));
    }
}

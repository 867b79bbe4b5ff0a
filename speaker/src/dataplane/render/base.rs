//! What every table has, whatever its Services: the global sets and maps, and the base and
//! shared chains (see the diagram in [`super`]).

use std::net::IpAddr;

use ipnetwork::IpNetwork;

use super::super::model::{Family, Mode, Model};
use super::super::nft::{self};
use super::super::nft::{BaseHook, Chain, ChainType, DataType, Hook, SetFlag, Table, Type};

/// The packet mark bit that asks `nat-postrouting` to masquerade: kube-proxy's bit, which CNIs
/// already keep clear of.
pub const MASQUERADE_MARK: u32 = 0x4000;

/// The chain verdict maps send packets to when a service has no endpoints.
pub const REJECT_CHAIN: &str = "reject-chain";

/// The global sets and maps, in the order of their names (the order they are rendered in).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum GlobalSet {
    ClusterIps,
    FirewallIps,
    Hairpin,
    NoEndpointNodeports,
    NoEndpointServices,
    NodeIps,
    PodCidrs,
    ServiceIps,
    ServiceNodeports,
}

impl GlobalSet {
    /// Every global set, in name order.
    pub const ALL: [GlobalSet; 9] = [
        GlobalSet::ClusterIps,
        GlobalSet::FirewallIps,
        GlobalSet::Hairpin,
        GlobalSet::NoEndpointNodeports,
        GlobalSet::NoEndpointServices,
        GlobalSet::NodeIps,
        GlobalSet::PodCidrs,
        GlobalSet::ServiceIps,
        GlobalSet::ServiceNodeports,
    ];

    pub fn name(self) -> &'static str {
        match self {
            GlobalSet::ClusterIps => "cluster-ips",
            GlobalSet::FirewallIps => "firewall-ips",
            GlobalSet::Hairpin => "hairpin",
            GlobalSet::NoEndpointNodeports => "no-endpoint-nodeports",
            GlobalSet::NoEndpointServices => "no-endpoint-services",
            GlobalSet::NodeIps => "node-ips",
            GlobalSet::PodCidrs => "pod-cidrs",
            GlobalSet::ServiceIps => "service-ips",
            GlobalSet::ServiceNodeports => "service-nodeports",
        }
    }

    /// Whether the table of `mode` has it: NodePorts and cluster IPs are kube-proxy's beside it.
    pub fn in_mode(self, mode: Mode) -> bool {
        mode == Mode::Full
            || !matches!(
                self,
                GlobalSet::ServiceNodeports
                    | GlobalSet::NoEndpointNodeports
                    | GlobalSet::ClusterIps
                    | GlobalSet::NodeIps
            )
    }

    /// Its declaration in `table`.
    pub fn set(self, table: Table) -> nft::Set {
        let a = table.addr_type();
        let by_addr = || Type::Of(vec![a, DataType::InetProto, DataType::InetService]);
        let by_port = || Type::Of(vec![DataType::InetProto, DataType::InetService]);
        let verdict = || Type::Of(vec![DataType::Verdict]);
        let name = self.name();
        match self {
            GlobalSet::ServiceIps => nft::Set::new(name, by_addr())
                .map(verdict())
                .comment("ClusterIP, externalIP and LoadBalancer IP dispatch"),
            GlobalSet::NoEndpointServices => nft::Set::new(name, by_addr())
                .map(verdict())
                .comment("services without usable endpoints: reject or drop"),
            GlobalSet::FirewallIps => {
                nft::Set::new(name, by_addr()).map(verdict()).comment("LoadBalancer IPs with loadBalancerSourceRanges")
            }
            GlobalSet::PodCidrs => nft::Set {
                flags: vec![SetFlag::Interval],
                auto_merge: true,
                ..nft::Set::new(name, Type::Of(vec![a])).comment("this node's pod CIDRs")
            },
            GlobalSet::Hairpin => nft::Set::new(name, Type::Of(vec![a, a]))
                .comment("endpoint . endpoint: a pod reaching itself through a service"),
            GlobalSet::ServiceNodeports => nft::Set::new(name, by_port()).map(verdict()).comment("NodePort dispatch"),
            GlobalSet::NoEndpointNodeports => {
                nft::Set::new(name, by_port()).map(verdict()).comment("NodePorts without usable endpoints")
            }
            GlobalSet::ClusterIps => nft::Set::new(name, Type::Of(vec![a])).comment("every cluster IP"),
            GlobalSet::NodeIps => nft::Set::new(name, Type::Of(vec![a])).comment("addresses NodePorts listen on"),
        }
    }
}

/// The inputs of a table that are no Service's: a change of `node`, `family`, `mode` or
/// `service_cidrs` rebuilds the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Context {
    pub node: String,
    pub family: Family,
    pub mode: Mode,
    /// [`Model::nodeport_ips`].
    pub node_ips: Vec<IpAddr>,
    /// [`Model::local_pod_cidrs`].
    pub pod_cidrs: Vec<IpNetwork>,
    /// [`Model::service_cidrs_of_family`].
    pub service_cidrs: Vec<IpNetwork>,
}

impl Context {
    pub fn of(model: &Model) -> Self {
        Self {
            node: model.node.clone(),
            family: model.family,
            mode: model.mode,
            node_ips: model.nodeport_ips(),
            pod_cidrs: model.local_pod_cidrs(),
            service_cidrs: model.service_cidrs_of_family(),
        }
    }

    pub fn table(&self) -> Table {
        Table { family: self.family }
    }

    pub fn full(&self) -> bool {
        self.mode == Mode::Full
    }

    /// Whether going from `self` to `next` needs the table rebuilt.
    pub fn needs_rebuild(&self, next: &Context) -> bool {
        self.node != next.node
            || self.family != next.family
            || self.mode != next.mode
            || self.service_cidrs != next.service_cidrs
    }

    /// The global sets of this table, in name order.
    pub fn global_sets(&self) -> impl Iterator<Item = GlobalSet> + '_ {
        GlobalSet::ALL.into_iter().filter(|s| s.in_mode(self.mode))
    }

    /// The node-ips set's elements.
    pub fn node_ip_elements(&self) -> Vec<nft::Element<'static>> {
        self.node_ips.iter().map(|ip| nft::Element::key(ip.to_string())).collect()
    }

    /// The pod-cidrs set's elements.
    pub fn pod_cidr_elements(&self) -> Vec<nft::Element<'static>> {
        self.pod_cidrs.iter().map(|n| nft::Element::key(canonical(*n).to_string())).collect()
    }

    /// Base and shared chains, in declaration order.
    pub fn base_chains(&self) -> Vec<Chain> {
        let full = self.full();
        let a = self.table().word();
        let hook = |kind, hook, priority| Some(BaseHook { kind, hook, priority });
        let (filter, nat) = (ChainType::Filter, ChainType::Nat);
        let mark = MASQUERADE_MARK;
        let new_jump = |chain: &str| format!("ct state new jump {chain}");
        let by_addr = format!("{a} daddr . meta l4proto . th dport");
        let node_ips = GlobalSet::NodeIps.name();
        let on_node = format!("fib daddr type local {a} daddr @{node_ips} meta l4proto . th dport");
        let (cluster_ips, pod_cidrs, hairpin) =
            (GlobalSet::ClusterIps.name(), GlobalSet::PodCidrs.name(), GlobalSet::Hairpin.name());
        let service_cidrs: Vec<String> = self.service_cidrs.iter().map(|n| canonical(*n).to_string()).collect();

        let chains: Vec<BaseChainDraft> = vec![
            // Before DNAT, so source ranges see the LoadBalancer IP.
            ("filter-prerouting", hook(filter, Hook::Prerouting, -110), vec![Some(new_jump("firewall-check"))]),
            ("filter-output", hook(filter, Hook::Output, -110), vec![Some(new_jump("firewall-check"))]),
            // After DNAT: what still carries a service address found no endpoint to go to.
            (
                "filter-input",
                hook(filter, Hook::Input, -110),
                vec![full.then(|| new_jump("nodeport-endpoints-check")), Some(new_jump("service-endpoints-check"))],
            ),
            (
                "filter-forward",
                hook(filter, Hook::Forward, -110),
                vec![Some(new_jump("service-endpoints-check")), full.then(|| new_jump("cluster-ips-check"))],
            ),
            (
                "filter-output-post-dnat",
                hook(filter, Hook::Output, -90),
                vec![Some(new_jump("service-endpoints-check")), full.then(|| new_jump("cluster-ips-check"))],
            ),
            ("nat-prerouting", hook(nat, Hook::Prerouting, -100), vec![Some("jump services".to_owned())]),
            ("nat-output", hook(nat, Hook::Output, -100), vec![Some("jump services".to_owned())]),
            ("nat-postrouting", hook(nat, Hook::Postrouting, 100), vec![Some("jump masquerading".to_owned())]),
            ("mark-for-masquerade", None, vec![Some(format!("meta mark set meta mark | {mark:#x}"))]),
            (
                "services",
                None,
                vec![
                    full.then(|| {
                        format!(
                            "{a} daddr @{cluster_ips} {a} saddr != @{pod_cidrs} jump mark-for-masquerade \
                             comment \"cluster IP from outside this node's pods\""
                        )
                    }),
                    Some(format!("{by_addr} vmap @{}", GlobalSet::ServiceIps.name())),
                    full.then(|| format!("{on_node} vmap @{}", GlobalSet::ServiceNodeports.name())),
                ],
            ),
            (
                "masquerading",
                None,
                vec![
                    Some(format!(
                        "ct status dnat {a} saddr . {a} daddr @{hairpin} meta mark set meta mark | {mark:#x} \
                         comment \"hairpin\""
                    )),
                    Some(format!("meta mark & {mark:#x} == 0 return")),
                    Some(format!("meta mark set meta mark ^ {mark:#x}")),
                    Some("masquerade fully-random".to_owned()),
                ],
            ),
            ("firewall-check", None, vec![Some(format!("{by_addr} vmap @{}", GlobalSet::FirewallIps.name()))]),
            (
                "service-endpoints-check",
                None,
                vec![Some(format!("{by_addr} vmap @{}", GlobalSet::NoEndpointServices.name()))],
            ),
            (
                "nodeport-endpoints-check",
                None,
                vec![full.then(|| format!("{on_node} vmap @{}", GlobalSet::NoEndpointNodeports.name()))],
            ),
            (
                "cluster-ips-check",
                None,
                vec![
                    full.then(|| {
                        format!("{a} daddr @{cluster_ips} reject comment \"no service on this cluster IP port\"")
                    }),
                    // As kube-proxy: an address of a service CIDR that is no ClusterIP goes nowhere
                    // (routed on, it would make the node ARP for it on the LAN).
                    (full && !service_cidrs.is_empty()).then(|| {
                        format!(
                            "{a} daddr {{ {} }} drop comment \"unallocated address of a service CIDR\"",
                            service_cidrs.join(", ")
                        )
                    }),
                ],
            ),
            (
                REJECT_CHAIN,
                None,
                vec![
                    Some("meta l4proto tcp reject with tcp reset comment \"service without endpoints\"".to_owned()),
                    Some("reject comment \"service without endpoints\"".to_owned()),
                ],
            ),
        ];
        chains
            .into_iter()
            .filter(|(name, _, _)| full || !matches!(*name, "nodeport-endpoints-check" | "cluster-ips-check"))
            .map(|(name, base, rules)| Chain {
                name: name.to_owned(),
                base,
                comment: None,
                rules: rules.into_iter().flatten().collect(),
            })
            .collect()
    }
}

/// A base or shared chain: name, hook, rules (those not in this table's mode are `None`).
type BaseChainDraft = (&'static str, Option<BaseHook>, Vec<Option<String>>);

/// A network with its host bits cleared, as nftables wants prefixes.
pub fn canonical(net: IpNetwork) -> IpNetwork {
    IpNetwork::new(net.network(), net.prefix()).unwrap_or(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_sets_are_ordered_by_name() {
        let names: Vec<&str> = GlobalSet::ALL.iter().map(|s| s.name()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        let mut by_ord = GlobalSet::ALL.to_vec();
        by_ord.sort();
        assert_eq!(by_ord, GlobalSet::ALL);
    }
}

//! The address plan of the lab (DESIGN.md), as plain data.
//!
//! ```text
//!   root namespace: flb-api 198.18.0.1/30 ----- root0 198.18.0.2/30 (API server, for kubectl/helm)
//!                                                  |
//!   control-plane namespace: bridge flb-br0  192.0.2.1/24  2001:db8:1::1/64  (the LAN)
//!        |-- node-1  eth0 192.0.2.11   2001:db8:1::11   pods 198.18.1.0/24  2001:db8:100:1::/64
//!        |-- node-2  eth0 192.0.2.12   2001:db8:1::12   pods 198.18.2.0/24  2001:db8:100:2::/64
//!        |-- ...
//!        `-- client  eth0 192.0.2.100  2001:db8:1::100
//! ```
//!
//! The LAN and the control plane live in a namespace of their own, never in the root
//! namespace: a machine may itself sit on 192.0.2.0/24 (CI machines do, with 192.0.2.1 as
//! their gateway), and the lab must not shadow it. The root namespace reaches the API server
//! over a point-to-point link in 198.18.0.0/30, which no node's pod CIDR uses (node-i has
//! 198.18.i.0/24, i >= 1). No lab namespace has a default route and the control-plane
//! namespace does not forward, so lab traffic never leaves the lab.
//!
//! Every address here is in a documentation or benchmarking range; nothing else is ever used.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use serde::{Deserialize, Serialize};

/// Which address families the lab runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum IpFamily {
    /// IPv4 only.
    Ipv4,
    /// IPv4 first, then IPv6.
    Dual,
}

/// Most nodes the address plan has room for (node-i is 192.0.2.1i).
pub const MAX_NODES: u8 = 9;

/// The namespace of the control plane, which also holds the LAN bridge.
pub const CONTROL_PLANE_NS: &str = "control-plane";
/// The bridge (in the control-plane namespace) that is the lab's LAN.
pub const BRIDGE: &str = "flb-br0";
/// The root-namespace end of the link to the control plane.
pub const ROOT_LINK: &str = "flb-api";
/// Its peer inside the control-plane namespace.
pub const ROOT_LINK_PEER: &str = "root0";
/// The root namespace's address on that link.
pub const ROOT_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The control plane's address on that link: where kubectl in the root namespace goes.
pub const API_FROM_ROOT_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const ROOT_LINK_PREFIX: u8 = 30;
/// Prefix of every pod network namespace, so `down` can find them all.
pub const POD_NETNS_PREFIX: &str = "flbpod-";
/// The bridge inside a node namespace that its pods hang off.
pub const POD_BRIDGE: &str = "cbr0";

pub const LAN_V4: Ipv4Network = ipv4_net([192, 0, 2, 0], 24);
pub const CONTROL_PLANE_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
pub const LAN_V6_PREFIX: u8 = 64;
pub const CONTROL_PLANE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x100);
pub const POD_CIDR_V4: Ipv4Network = ipv4_net([198, 18, 0, 0], 16);
pub const POD_CIDR_V6: Ipv6Network = ipv6_net(Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0), 56);
pub const SERVICE_CIDR_V4: Ipv4Network = ipv4_net([198, 19, 0, 0], 16);
pub const SERVICE_CIDR_V6: Ipv6Network = ipv6_net(Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0), 112);
pub const NODE_PORT_RANGE: &str = "30000-32767";
pub const API_PORT: u16 = 6443;
/// etcd listens on the control-plane namespace's loopback.
pub const ETCD_CLIENT_PORT: u16 = 2379;
pub const ETCD_PEER_PORT: u16 = 2380;

const fn ipv4_net(o: [u8; 4], prefix: u8) -> Ipv4Network {
    match Ipv4Network::new_checked(Ipv4Addr::new(o[0], o[1], o[2], o[3]), prefix) {
        Some(n) => n,
        None => panic!("bad constant network"),
    }
}

const fn ipv6_net(a: Ipv6Addr, prefix: u8) -> Ipv6Network {
    match Ipv6Network::new_checked(a, prefix) {
        Some(n) => n,
        None => panic!("bad constant network"),
    }
}

/// The shape of one lab: how many nodes, which families.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub nodes: u8,
    pub family: IpFamily,
}

/// One host of the lab: a network namespace with one leg on the LAN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    /// Namespace name, and the Node name for nodes.
    pub name: String,
    /// 1-based node index; `None` for the client.
    pub index: Option<u8>,
    /// Name of the root-namespace end of its veth (on the bridge).
    pub veth: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Option<Ipv6Addr>,
}

impl Host {
    /// The host's LAN addresses, IPv4 first.
    pub fn addrs(&self) -> Vec<IpAddr> {
        let mut v = vec![IpAddr::V4(self.ipv4)];
        v.extend(self.ipv6.map(IpAddr::V6));
        v
    }

    /// The pod CIDRs of a node (none for the client), IPv4 first.
    pub fn pod_cidrs(&self, family: IpFamily) -> Vec<IpNetwork> {
        self.index.map(|i| pod_cidrs(i, family)).unwrap_or_default()
    }
}

/// The pod CIDRs of node `index`: 198.18.<i>.0/24 and 2001:db8:100:<i>::/64.
pub fn pod_cidrs(index: u8, family: IpFamily) -> Vec<IpNetwork> {
    let mut v = vec![IpNetwork::V4(ipv4_net([198, 18, index, 0], 24))];
    if family == IpFamily::Dual {
        let a = Ipv6Addr::new(0x2001, 0xdb8, 0x100, u16::from(index), 0, 0, 0, 0);
        v.push(IpNetwork::V6(ipv6_net(a, 64)));
    }
    v
}

/// The address plan writes host numbers the same in both families: node-1 is .11 and ::11.
fn same_digits_v6(host: u16) -> u16 {
    u16::from_str_radix(&host.to_string(), 16).unwrap_or(host)
}

impl Plan {
    pub fn validate(&self) -> Result<(), String> {
        if self.nodes == 0 || self.nodes > MAX_NODES {
            return Err(format!(
                "--nodes must be between 1 and {MAX_NODES} (the address plan gives node-i the address 192.0.2.1i)"
            ));
        }
        Ok(())
    }

    pub fn dual(&self) -> bool {
        self.family == IpFamily::Dual
    }

    pub fn node(&self, index: u8) -> Host {
        let host = 10 + u16::from(index);
        Host {
            name: format!("node-{index}"),
            index: Some(index),
            veth: format!("flb-n{index}"),
            ipv4: Ipv4Addr::new(192, 0, 2, 10 + index),
            ipv6: self.dual().then(|| Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, same_digits_v6(host))),
        }
    }

    pub fn nodes(&self) -> Vec<Host> {
        (1..=self.nodes).map(|i| self.node(i)).collect()
    }

    pub fn client(&self) -> Host {
        Host {
            name: "client".into(),
            index: None,
            veth: "flb-client".into(),
            ipv4: CLIENT_V4,
            ipv6: self.dual().then_some(CLIENT_V6),
        }
    }

    /// Every host: the nodes, then the client. (The control plane is not a host: it holds
    /// the LAN rather than hanging off it.)
    pub fn hosts(&self) -> Vec<Host> {
        let mut v = self.nodes();
        v.push(self.client());
        v
    }

    pub fn host(&self, name: &str) -> Option<Host> {
        self.hosts().into_iter().find(|h| h.name == name)
    }

    pub fn service_cidrs(&self) -> String {
        match self.family {
            IpFamily::Ipv4 => SERVICE_CIDR_V4.to_string(),
            IpFamily::Dual => format!("{SERVICE_CIDR_V4},{SERVICE_CIDR_V6}"),
        }
    }

    pub fn cluster_cidrs(&self) -> String {
        match self.family {
            IpFamily::Ipv4 => POD_CIDR_V4.to_string(),
            IpFamily::Dual => format!("{POD_CIDR_V4},{POD_CIDR_V6}"),
        }
    }

    /// The first address of each service CIDR: the `kubernetes` Service, a SAN of the API cert.
    pub fn kubernetes_service_ips(&self) -> Vec<IpAddr> {
        let mut v = vec![IpAddr::V4(Ipv4Addr::new(198, 19, 0, 1))];
        if self.dual() {
            v.push(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1)));
        }
        v
    }
}

/// The gateway of a pod network: the first address, held by the node's pod bridge.
pub fn gateway(net: &IpNetwork) -> IpAddr {
    host_addr(net, 1).unwrap_or(net.network())
}

/// The `n`th address of a network, if the network has it.
pub fn host_addr(net: &IpNetwork, n: u32) -> Option<IpAddr> {
    match net {
        IpNetwork::V4(v4) => {
            let a = u32::from(v4.network()).checked_add(n)?;
            let a = Ipv4Addr::from(a);
            v4.contains(a).then_some(IpAddr::V4(a))
        }
        IpNetwork::V6(v6) => {
            let a = u128::from(v6.network()).checked_add(u128::from(n))?;
            let a = Ipv6Addr::from(a);
            v6.contains(a).then_some(IpAddr::V6(a))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_follow_the_address_plan() {
        let plan = Plan { nodes: 3, family: IpFamily::Dual };
        let n1 = plan.node(1);
        assert_eq!(n1.name, "node-1");
        assert_eq!(n1.ipv4.to_string(), "192.0.2.11");
        assert_eq!(n1.ipv6.map(|a| a.to_string()).as_deref(), Some("2001:db8:1::11"));
        assert_eq!(plan.node(3).ipv4.to_string(), "192.0.2.13");
        let cidrs: Vec<String> = n1.pod_cidrs(plan.family).iter().map(|c| c.to_string()).collect();
        assert_eq!(cidrs, ["198.18.1.0/24", "2001:db8:100:1::/64"]);
        assert_eq!(plan.client().ipv6.map(|a| a.to_string()).as_deref(), Some("2001:db8:1::100"));
        assert_eq!(plan.hosts().len(), 4);
    }

    #[test]
    fn ipv4_only_has_no_ipv6() {
        let plan = Plan { nodes: 2, family: IpFamily::Ipv4 };
        assert!(plan.hosts().iter().all(|h| h.ipv6.is_none()));
        assert_eq!(plan.node(2).pod_cidrs(plan.family).len(), 1);
        assert_eq!(plan.service_cidrs(), "198.19.0.0/16");
    }

    #[test]
    fn every_address_is_in_a_documentation_or_benchmark_range() {
        let plan = Plan { nodes: MAX_NODES, family: IpFamily::Dual };
        let bench: Ipv4Network = "198.18.0.0/15".parse().unwrap();
        let doc6: Ipv6Network = "2001:db8::/32".parse().unwrap();
        for h in plan.hosts() {
            assert!(LAN_V4.contains(h.ipv4));
            assert!(doc6.contains(h.ipv6.unwrap()));
            for c in h.pod_cidrs(plan.family) {
                match c {
                    IpNetwork::V4(n) => assert!(bench.contains(n.network())),
                    IpNetwork::V6(n) => assert!(doc6.contains(n.network())),
                }
            }
        }
        assert!(bench.contains(SERVICE_CIDR_V4.network()));
        assert!(bench.contains(ROOT_V4) && bench.contains(API_FROM_ROOT_V4));
        // The root link stays clear of every node's pod CIDR.
        for n in plan.nodes() {
            for c in n.pod_cidrs(plan.family) {
                assert!(!c.contains(std::net::IpAddr::V4(API_FROM_ROOT_V4)));
            }
        }
        assert!(doc6.contains(SERVICE_CIDR_V6.network()));
    }

    #[test]
    fn node_count_is_bounded() {
        assert!(Plan { nodes: 0, family: IpFamily::Dual }.validate().is_err());
        assert!(Plan { nodes: 10, family: IpFamily::Dual }.validate().is_err());
        assert!(Plan { nodes: 9, family: IpFamily::Ipv4 }.validate().is_ok());
    }

    #[test]
    fn host_addresses_stay_inside_the_network() {
        let net: IpNetwork = "198.18.1.0/24".parse().unwrap();
        assert_eq!(gateway(&net).to_string(), "198.18.1.1");
        assert_eq!(host_addr(&net, 254).unwrap().to_string(), "198.18.1.254");
        assert_eq!(host_addr(&net, 256), None);
    }
}

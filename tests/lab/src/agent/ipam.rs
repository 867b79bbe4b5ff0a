//! Pod addresses of one node: host number `n` of each of the node's pod CIDRs (the same `n`
//! in both families), from 2 up; 1 is the gateway on the pod bridge.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnetwork::IpNetwork;

use crate::plan::host_addr;

#[derive(Debug)]
pub struct Ipam {
    cidrs: Vec<IpNetwork>,
    used: BTreeSet<u32>,
}

/// The addresses of one pod, IPv4 first; `host` is what to give back on release.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub host: u32,
    pub addrs: Vec<IpAddr>,
}

impl Ipam {
    pub fn new(cidrs: Vec<IpNetwork>) -> Self {
        Ipam { cidrs, used: BTreeSet::new() }
    }

    /// The lowest free host number that every CIDR has, or `None` when the node is full.
    pub fn allocate(&mut self) -> Option<Lease> {
        let last = self
            .cidrs
            .iter()
            .map(|c| match c {
                IpNetwork::V4(n) => (1u64 << (32 - u32::from(n.prefix()))).saturating_sub(2),
                IpNetwork::V6(n) => 1u64.checked_shl(128 - u32::from(n.prefix())).unwrap_or(u64::MAX).saturating_sub(2),
            })
            .min()?
            .min(u64::from(u32::MAX)) as u32;
        let host = (2..=last).find(|h| !self.used.contains(h))?;
        let addrs = self.cidrs.iter().map(|c| host_addr(c, host)).collect::<Option<Vec<_>>>()?;
        self.used.insert(host);
        Some(Lease { host, addrs })
    }

    pub fn release(&mut self, host: u32) {
        self.used.remove(&host);
    }

    pub fn in_use(&self) -> usize {
        self.used.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets() -> Vec<IpNetwork> {
        vec!["198.18.1.0/24".parse().unwrap(), "2001:db8:100:1::/64".parse().unwrap()]
    }

    #[test]
    fn same_host_number_in_both_families() {
        let mut ipam = Ipam::new(nets());
        let a = ipam.allocate().unwrap();
        assert_eq!(a.host, 2);
        let s: Vec<String> = a.addrs.iter().map(|a| a.to_string()).collect();
        assert_eq!(s, ["198.18.1.2", "2001:db8:100:1::2"]);
    }

    #[test]
    fn released_numbers_are_reused_and_the_node_fills_up() {
        let mut ipam = Ipam::new(vec!["198.18.1.0/24".parse().unwrap()]);
        let leases: Vec<Lease> = (0..253).map(|_| ipam.allocate().unwrap()).collect();
        assert_eq!(leases.last().unwrap().addrs[0].to_string(), "198.18.1.254");
        assert_eq!(ipam.allocate(), None);
        ipam.release(7);
        assert_eq!(ipam.allocate().unwrap().host, 7);
        assert_eq!(ipam.in_use(), 253);
    }
}

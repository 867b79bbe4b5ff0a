//! What a Node says about its addresses, read once for the membership, the handovers and the
//! data plane.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Node;

/// The Node's `InternalIP` addresses, in the order the Node lists them; entries that are not an
/// address are skipped.
pub fn internal_ips(node: &Node) -> Vec<IpAddr> {
    let addresses = node.status.as_ref().and_then(|s| s.addresses.as_ref());
    addresses.into_iter().flatten().filter(|a| a.type_ == "InternalIP").filter_map(|a| a.address.parse().ok()).collect()
}

/// The Node's first `InternalIP` of the family of `like`.
pub fn internal_ip_like(node: &Node, like: IpAddr) -> Option<IpAddr> {
    internal_ips(node).into_iter().find(|ip| ip.is_ipv4() == like.is_ipv4())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeAddress, NodeStatus};

    fn node(addrs: &[(&str, &str)]) -> Node {
        Node {
            status: Some(NodeStatus {
                addresses: Some(
                    addrs.iter().map(|(t, a)| NodeAddress { type_: t.to_string(), address: a.to_string() }).collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn internal_ips_keep_order_and_skip_other_types_and_garbage() {
        let n = node(&[
            ("Hostname", "node-1"),
            ("InternalIP", "2001:db8:1::11"),
            ("ExternalIP", "203.0.113.9"),
            ("InternalIP", "not-an-ip"),
            ("InternalIP", "192.0.2.11"),
        ]);
        let v6: IpAddr = "2001:db8:1::11".parse().unwrap();
        let v4: IpAddr = "192.0.2.11".parse().unwrap();
        assert_eq!(internal_ips(&n), [v6, v4]);
        assert_eq!(internal_ip_like(&n, "192.0.2.1".parse().unwrap()), Some(v4));
        assert_eq!(internal_ip_like(&n, "2001:db8::1".parse().unwrap()), Some(v6));
        assert!(internal_ips(&Node::default()).is_empty());
        assert_eq!(internal_ip_like(&node(&[("InternalIP", "192.0.2.11")]), v6), None);
    }
}

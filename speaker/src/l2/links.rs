//! Which links may answer for an address no interface's subnet holds (and no advertisement names
//! an interface for): only links that face the LAN. Never a pod's veth, a CNI bridge or tunnel,
//! a bridge or bond port (its master answers), a NOARP link, or loopback: an answer there would
//! be heard by pods, or by no one, or twice.
//!
//! ```text
//!  link (name, flags, master?) ──> may_fall_back ──> answers for off-subnet addresses?
//! ```
//!
//! The facts come from a netlink link dump of the caller's network namespace (sysfs would show
//! the namespace it was mounted in, which for a process that only entered a network namespace
//! is another one).

use std::io;

use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_sys::protocols::NETLINK_ROUTE;
use netlink_sys::{Socket, SocketAddr};

/// What decides whether a link may answer for an off-subnet address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    /// IFF_NOARP: the link does not resolve addresses (tunnels, dummies such as kube-ipvs0).
    pub noarp: bool,
    pub loopback: bool,
    /// Enslaved to a bridge, bond or VRF: frames of the LAN are answered on the master.
    pub has_master: bool,
}

/// Name prefixes of the links container networking creates: pods' veths and the CNI bridges,
/// tunnels and dummies of Calico, Cilium, Flannel, Weave, kubenet, Docker, kube-proxy (IPVS),
/// Antrea, Kube-OVN and the like.
const POD_NETWORK_PREFIXES: &[&str] = &[
    "veth",
    "cali",
    "cilium",
    "lxc",
    "flannel",
    "cni",
    "cbr",
    "docker",
    "vxlan",
    "geneve",
    "genev_sys",
    "kube-ipvs",
    "kube-bridge",
    "kube-dummy",
    "nodelocaldns",
    "weave",
    "vethwe",
    "datapath",
    "tunl",
    "antrea",
    "ovn",
    "ovs-system",
    "nodelocal",
];

/// Whether `link` may answer for an address no interface's subnet holds.
pub fn may_fall_back(link: &Link) -> bool {
    !link.loopback && !link.noarp && !link.has_master && !POD_NETWORK_PREFIXES.iter().any(|p| link.name.starts_with(p))
}

/// The links of the caller's network namespace.
pub fn dump() -> io::Result<Vec<Link>> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut msg = NetlinkMessage::new(
        NetlinkHeader::default(),
        NetlinkPayload::from(RouteNetlinkMessage::GetLink(LinkMessage::default())),
    );
    msg.header.flags = NLM_F_DUMP | NLM_F_REQUEST;
    msg.header.sequence_number = 1;
    msg.finalize();
    let mut bytes = vec![0; msg.buffer_len()];
    msg.serialize(&mut bytes);
    socket.send(&bytes, 0)?;
    let mut links = Vec::new();
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    loop {
        buf.clear();
        let n = socket.recv(&mut buf, 0)?;
        let data = &buf[..n.min(buf.len())];
        for bytes in crate::netlink::messages(data) {
            let parsed = NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes);
            match parsed.map(|m| m.payload) {
                Ok(NetlinkPayload::Done(_)) => return Ok(links),
                Ok(NetlinkPayload::Error(e)) if e.code.is_some() => return Err(e.to_io()),
                Ok(NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m))) => links.extend(link(&m)),
                // A link whose attributes this version cannot read: left out, so never a fallback.
                _ => {}
            }
        }
    }
}

fn link(m: &LinkMessage) -> Option<Link> {
    let name = m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })?;
    Some(Link {
        name,
        noarp: m.header.flags.contains(LinkFlags::Noarp),
        loopback: m.header.flags.contains(LinkFlags::Loopback),
        has_master: m.attributes.iter().any(|a| matches!(a, LinkAttribute::Controller(_))),
    })
}

/// Of the interfaces `names`, those that may answer for off-subnet addresses. When the links
/// cannot be read, none: answering nowhere is safe, answering on a pod's link is not.
pub fn fall_back<'a>(names: impl Iterator<Item = &'a str>) -> Vec<String> {
    let links = match dump() {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "reading the links (netlink); no interface answers for off-subnet addresses");
            return Vec::new();
        }
    };
    names.filter(|n| links.iter().any(|l| l.name == *n && may_fall_back(l))).map(str::to_string).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(name: &str) -> Link {
        Link { name: name.to_string(), noarp: false, loopback: false, has_master: false }
    }

    #[test]
    fn lan_facing_links_fall_back() {
        for name in ["eth0", "ens3", "enp1s0f0", "bond0", "br0", "eno1.100", "wlan0"] {
            assert!(may_fall_back(&link(name)), "{name}");
        }
    }

    #[test]
    fn pod_and_cni_links_never_do() {
        for name in [
            "veth1a2b3c",
            "cali12345",
            "cilium_host",
            "lxc0a1b",
            "flannel.1",
            "cni0",
            "cbr0",
            "docker0",
            "vxlan.calico",
            "kube-ipvs0",
            "kube-bridge",
            "nodelocaldns",
            "weave",
            "tunl0",
            "antrea-gw0",
        ] {
            assert!(!may_fall_back(&link(name)), "{name}");
        }
    }

    #[test]
    fn ports_noarp_and_loopback_never_do() {
        assert!(!may_fall_back(&Link { has_master: true, ..link("eth1") }), "a bridge or bond port");
        // The lab's pod veths (`vp<node>-<pod>`) are ports of the node's pod bridge.
        assert!(!may_fall_back(&Link { has_master: true, ..link("vp1-0a1b2c3d") }));
        assert!(!may_fall_back(&Link { noarp: true, ..link("eth2") }), "NOARP");
        assert!(!may_fall_back(&Link { loopback: true, ..link("lo") }), "loopback");
    }

    /// Needs no root: every process may dump its namespace's links.
    #[test]
    fn the_dump_reads_this_namespace() {
        let links = dump().expect("a netlink link dump");
        let lo = links.iter().find(|l| l.name == "lo").expect("lo in the dump");
        assert!(lo.loopback && !may_fall_back(lo));
    }
}

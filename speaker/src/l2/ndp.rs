//! NDP (RFC 4861) for the IPv6 addresses this node announces: answering Neighbor Solicitations
//! with Neighbor Advertisements, and the unsolicited advertisement that moves the LAN's caches to
//! this node on takeover.
//!
//! ```text
//!  frame from the wire ──> parse_solicitation (RFC 4861 §7.1.1 checks) ──> announced(target)?
//!                              ──> reply: NA (Solicited unless DAD, Override, target link-layer = my_mac)
//!  took an IP ───────────> unsolicited: NA to ff02::1 (Override)
//!  announcing an IP ─────> solicited_node / multicast_mac: the group to join so solicitations reach us
//! ```
//!
//! Pure over bytes so the socket loop only reads, calls `reply` and writes; every check on what a
//! frame from the LAN may contain is here and proven never to panic.
//!
//! Written by hand rather than with pnet: walking the options of a received solicitation
//! ([`source_link_addr`]). pnet's `NdpOptionPacket` computes an option's size as `length * 8` in
//! `u8`, which overflows — a panic in debug builds — for a length of 32 or more, so it must not see
//! bytes from the wire. Options of the frames built here are written with pnet.

use std::net::Ipv6Addr;

use pnet_base::MacAddr;
use pnet_packet::Packet;
use pnet_packet::ethernet::{EtherTypes, EthernetPacket, MutableEthernetPacket};
use pnet_packet::icmpv6::ndp::{
    Icmpv6Codes, MutableNeighborAdvertPacket, MutableNeighborSolicitPacket, NdpOption, NdpOptionTypes,
    NeighborAdvertFlags, NeighborSolicitPacket,
};
use pnet_packet::icmpv6::{self, Icmpv6Packet, Icmpv6Types, MutableIcmpv6Packet};
use pnet_packet::ip::IpNextHeaderProtocols;
use pnet_packet::ipv6::{Ipv6Packet, MutableIpv6Packet};

const ETHERNET_HEADER: usize = 14;
const IPV6_HEADER: usize = 40;
/// Type, code, checksum, reserved/flags and target address: the fixed part of an NS or NA.
const ND_MESSAGE: usize = 24;
/// One link-layer address option for Ethernet: type, length (in units of 8 bytes), MAC.
const LINK_ADDR_OPTION: usize = 8;
/// Frames this module builds are this long: an NA with a target link-layer address option.
pub const FRAME_LEN: usize = ETHERNET_HEADER + IPV6_HEADER + ND_MESSAGE + LINK_ADDR_OPTION;
/// Neighbor Discovery messages must arrive with the hop limit they were sent with, 255: proof
/// that they were not forwarded by a router from off-link (RFC 4861 §7.1.1).
const HOP_LIMIT: u8 = 255;
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// The fields of a valid Neighbor Solicitation worth answering, counting or logging.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NeighborSolicitation {
    /// The Ethernet source: where the answer goes when there is no source link-layer option.
    pub eth_source: MacAddr,
    /// The IPv6 source; `::` for duplicate address detection (DAD).
    pub source: Ipv6Addr,
    /// The IPv6 destination: the target's solicited-node group, or the target itself.
    pub destination: Ipv6Addr,
    /// The address asked about.
    pub target: Ipv6Addr,
    /// The source link-layer address option, if present.
    pub source_link_addr: Option<MacAddr>,
}

impl NeighborSolicitation {
    /// Whether this is duplicate address detection: someone about to use `target` checks that
    /// nobody has it.
    pub fn is_dad(&self) -> bool {
        self.source.is_unspecified()
    }

    /// The MAC the answer is for: the source link-layer option, else the Ethernet source.
    pub fn asker(&self) -> MacAddr {
        self.source_link_addr.unwrap_or(self.eth_source)
    }

    /// Whether the asker is a single host: the Ethernet source and any source link-layer option
    /// are unicast and not zero.
    pub fn valid_sender(&self) -> bool {
        super::is_unicast(self.eth_source) && self.source_link_addr.is_none_or(super::is_unicast)
    }
}

/// The solicited-node multicast group of `ip` (`ff02::1:ffXX:XXXX`, RFC 4291 §2.7.1): where
/// solicitations for `ip` are sent, so the node announcing `ip` must join it.
pub fn solicited_node(ip: Ipv6Addr) -> Ipv6Addr {
    let o = ip.octets();
    Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00 | u16::from(o[13]), u16::from_be_bytes([o[14], o[15]]))
}

/// The Ethernet multicast address of an IPv6 multicast group (`33:33` + its last 32 bits,
/// RFC 2464 §7).
pub fn multicast_mac(group: Ipv6Addr) -> MacAddr {
    let o = group.octets();
    MacAddr(0x33, 0x33, o[12], o[13], o[14], o[15])
}

/// The solicitation an Ethernet frame carries, if it is a valid Neighbor Solicitation per
/// RFC 4861 §7.1.1: IPv6 with ICMPv6 as the next header (extension headers are not followed),
/// hop limit 255, type 135, code 0, a correct checksum, a unicast target, well-formed options, and
/// for DAD a solicited-node destination and no source link-layer option. Ethernet padding after
/// the IPv6 payload is ignored.
pub fn parse_solicitation(frame: &[u8]) -> Option<NeighborSolicitation> {
    let eth = EthernetPacket::new(frame)?;
    if eth.get_ethertype() != EtherTypes::Ipv6 {
        return None;
    }
    let ip = Ipv6Packet::new(eth.payload())?;
    if ip.get_version() != 6 || ip.get_next_header() != IpNextHeaderProtocols::Icmpv6 || ip.get_hop_limit() != HOP_LIMIT
    {
        return None;
    }
    let (source, destination) = (ip.get_source(), ip.get_destination());
    let message = eth.payload().get(IPV6_HEADER..IPV6_HEADER + usize::from(ip.get_payload_length()))?;
    if message.len() < ND_MESSAGE {
        return None;
    }
    let icmp = Icmpv6Packet::new(message)?;
    if icmpv6::checksum(&icmp, &source, &destination) != icmp.get_checksum() {
        return None;
    }
    let ns = NeighborSolicitPacket::new(message)?;
    if ns.get_icmpv6_type() != Icmpv6Types::NeighborSolicit || ns.get_icmpv6_code() != Icmpv6Codes::NoCode {
        return None;
    }
    let target = ns.get_target_addr();
    if target.is_multicast() {
        return None;
    }
    let source_link_addr = source_link_addr(&message[ND_MESSAGE..])?;
    if source.is_unspecified() && (destination != solicited_node(target) || source_link_addr.is_some()) {
        return None;
    }
    Some(NeighborSolicitation { eth_source: eth.get_source(), source, destination, target, source_link_addr })
}

/// The source link-layer address among NDP options (RFC 4861 §4.6), walked by hand (see the
/// module docs). `None` when an option is malformed — zero length, or running past the end — as
/// RFC 4861 §7.1.1 says to drop such a message; `Some(None)` when the option is absent or not an
/// Ethernet address.
fn source_link_addr(mut options: &[u8]) -> Option<Option<MacAddr>> {
    let mut found = None;
    while let [kind, units, ..] = *options {
        let len = usize::from(units) * 8;
        let option = options.get(..len).filter(|_| len > 0)?;
        if kind == NdpOptionTypes::SourceLLAddr.0
            && let [_, _, a, b, c, d, e, f] = *option
        {
            found = Some(MacAddr(a, b, c, d, e, f));
        }
        options = &options[len..];
    }
    // A single trailing byte cannot be an option.
    options.is_empty().then_some(found)
}

/// The Neighbor Advertisement to send for `frame`, if it is a valid solicitation from a valid
/// sender ([`NeighborSolicitation::valid_sender`]) for an address `announced` says this node
/// announces. A solicitation from `my_mac` itself (our own, looping back) gets no answer.
///
/// To DAD (source `::`) the answer goes to all nodes with Solicited clear (RFC 4861 §7.2.4), so
/// the node probing learns the address is taken; otherwise to the solicitor, at the MAC its source
/// link-layer option gives, else the frame's Ethernet source.
pub fn reply(frame: &[u8], my_mac: MacAddr, announced: impl Fn(Ipv6Addr) -> bool) -> Option<Vec<u8>> {
    let ns = parse_solicitation(frame)?;
    if ns.eth_source == my_mac || !ns.valid_sender() || !announced(ns.target) {
        return None;
    }
    Some(if ns.is_dad() {
        advertisement(multicast_mac(ALL_NODES), my_mac, ALL_NODES, ns.target, NeighborAdvertFlags::Override)
    } else {
        advertisement(
            ns.asker(),
            my_mac,
            ns.source,
            ns.target,
            NeighborAdvertFlags::Solicited | NeighborAdvertFlags::Override,
        )
    })
}

/// The unsolicited Neighbor Advertisement to send to all nodes on taking `ip`: Override set so
/// every neighbour replaces the old announcer's MAC, Solicited clear (RFC 4861 §7.2.6).
pub fn unsolicited(my_mac: MacAddr, ip: Ipv6Addr) -> Vec<u8> {
    advertisement(multicast_mac(ALL_NODES), my_mac, ALL_NODES, ip, NeighborAdvertFlags::Override)
}

/// A Neighbor Solicitation for `target` from `my_ip`, to the target's solicited-node group, with a
/// source link-layer address option holding `my_mac`, as a client sends it (for probes and tests).
pub fn solicitation(my_mac: MacAddr, my_ip: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let destination = solicited_node(target);
    let mut frame = vec![0u8; FRAME_LEN];
    let (eth_bytes, rest) = frame.split_at_mut(ETHERNET_HEADER);
    let (ip_bytes, message) = rest.split_at_mut(IPV6_HEADER);
    // Every buffer is sized for its header above, so pnet accepts them all.
    if let Some(mut ns) = MutableNeighborSolicitPacket::new(message) {
        ns.set_icmpv6_type(Icmpv6Types::NeighborSolicit);
        ns.set_icmpv6_code(Icmpv6Codes::NoCode);
        ns.set_target_addr(target);
        ns.set_options(&[NdpOption {
            option_type: NdpOptionTypes::SourceLLAddr,
            length: 1,
            data: my_mac.octets().to_vec(),
        }]);
    }
    finish(eth_bytes, ip_bytes, message, (my_mac, multicast_mac(destination)), (my_ip, destination));
    frame
}

/// Fills in the checksum of `message` (an ICMPv6 message of `ND_MESSAGE + LINK_ADDR_OPTION`
/// bytes) and the IPv6 and Ethernet headers around it.
fn finish(
    eth_bytes: &mut [u8],
    ip_bytes: &mut [u8],
    message: &mut [u8],
    (eth_src, eth_dst): (MacAddr, MacAddr),
    (source, destination): (Ipv6Addr, Ipv6Addr),
) {
    let checksum = Icmpv6Packet::new(message).map(|icmp| icmpv6::checksum(&icmp, &source, &destination));
    if let (Some(mut icmp), Some(checksum)) = (MutableIcmpv6Packet::new(message), checksum) {
        icmp.set_checksum(checksum);
    }
    if let Some(mut ip) = MutableIpv6Packet::new(ip_bytes) {
        ip.set_version(6);
        ip.set_payload_length((ND_MESSAGE + LINK_ADDR_OPTION) as u16);
        ip.set_next_header(IpNextHeaderProtocols::Icmpv6);
        ip.set_hop_limit(HOP_LIMIT);
        ip.set_source(source);
        ip.set_destination(destination);
    }
    if let Some(mut eth) = MutableEthernetPacket::new(eth_bytes) {
        eth.set_destination(eth_dst);
        eth.set_source(eth_src);
        eth.set_ethertype(EtherTypes::Ipv6);
    }
}

/// An Ethernet frame from `my_mac` carrying an NA from `target` to `destination`, with a target
/// link-layer address option holding `my_mac`.
fn advertisement(eth_dst: MacAddr, my_mac: MacAddr, destination: Ipv6Addr, target: Ipv6Addr, flags: u8) -> Vec<u8> {
    let mut frame = vec![0u8; FRAME_LEN];
    let (eth_bytes, rest) = frame.split_at_mut(ETHERNET_HEADER);
    let (ip_bytes, message) = rest.split_at_mut(IPV6_HEADER);
    // Every buffer is sized for its header above, so pnet accepts them all.
    if let Some(mut na) = MutableNeighborAdvertPacket::new(message) {
        na.set_icmpv6_type(Icmpv6Types::NeighborAdvert);
        na.set_icmpv6_code(Icmpv6Codes::NoCode);
        na.set_flags(flags);
        na.set_target_addr(target);
        na.set_options(&[NdpOption {
            option_type: NdpOptionTypes::TargetLLAddr,
            length: 1,
            data: my_mac.octets().to_vec(),
        }]);
    }
    finish(eth_bytes, ip_bytes, message, (my_mac, eth_dst), (target, destination));
    frame
}

#[cfg(test)]
mod tests {
    use super::*;
    use pnet_packet::icmpv6::Icmpv6Code;
    use pnet_packet::icmpv6::ndp::NeighborAdvertPacket;
    use proptest::prelude::*;

    const MINE: MacAddr = MacAddr(0x02, 0, 0, 0, 0, 0x11);
    const CLIENT: MacAddr = MacAddr(0x02, 0, 0, 0, 0, 0x64);
    /// A MAC the client's option names, different from its Ethernet source to tell them apart.
    const CLIENT_OPTION: MacAddr = MacAddr(0x02, 0, 0, 0, 0, 0x65);
    const CLIENT_IP: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x100);
    const LB_IP: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0xc8);

    fn only_lb(ip: Ipv6Addr) -> bool {
        ip == LB_IP
    }

    /// How a test solicitation is built.
    struct Ns {
        source: Ipv6Addr,
        destination: Ipv6Addr,
        target: Ipv6Addr,
        /// Raw option bytes after the fixed part.
        options: Vec<u8>,
        hop_limit: u8,
        /// Ethernet padding after the IPv6 packet.
        padding: usize,
    }

    impl Ns {
        fn new() -> Ns {
            let o = CLIENT_OPTION.octets();
            Ns {
                source: CLIENT_IP,
                destination: solicited_node(LB_IP),
                target: LB_IP,
                options: vec![1, 1, o[0], o[1], o[2], o[3], o[4], o[5]],
                hop_limit: 255,
                padding: 0,
            }
        }

        fn dad() -> Ns {
            Ns { source: Ipv6Addr::UNSPECIFIED, options: Vec::new(), ..Ns::new() }
        }

        /// The frame, with pnet doing the headers and the checksum.
        fn build(&self) -> Vec<u8> {
            let message_len = ND_MESSAGE + self.options.len();
            let mut frame = vec![0u8; ETHERNET_HEADER + IPV6_HEADER + message_len + self.padding];
            {
                let mut eth = MutableEthernetPacket::new(&mut frame).unwrap();
                eth.set_destination(multicast_mac(self.destination));
                eth.set_source(CLIENT);
                eth.set_ethertype(EtherTypes::Ipv6);
            }
            {
                let mut ip = MutableIpv6Packet::new(&mut frame[ETHERNET_HEADER..]).unwrap();
                ip.set_version(6);
                ip.set_payload_length(message_len as u16);
                ip.set_next_header(IpNextHeaderProtocols::Icmpv6);
                ip.set_hop_limit(self.hop_limit);
                ip.set_source(self.source);
                ip.set_destination(self.destination);
            }
            let start = ETHERNET_HEADER + IPV6_HEADER;
            let message = &mut frame[start..start + message_len];
            {
                let mut ns = MutableNeighborSolicitPacket::new(message).unwrap();
                ns.set_icmpv6_type(Icmpv6Types::NeighborSolicit);
                ns.set_icmpv6_code(Icmpv6Codes::NoCode);
                ns.set_target_addr(self.target);
            }
            message[ND_MESSAGE..].copy_from_slice(&self.options);
            let checksum = icmpv6::checksum(&Icmpv6Packet::new(message).unwrap(), &self.source, &self.destination);
            MutableIcmpv6Packet::new(message).unwrap().set_checksum(checksum);
            frame
        }
    }

    /// Edits the ICMPv6 message of a frame built by `Ns` and fixes the checksum afterwards.
    fn edit_message(frame: &mut [u8], edit: impl FnOnce(&mut MutableIcmpv6Packet<'_>)) {
        let (source, destination) = {
            let ip = Ipv6Packet::new(&frame[ETHERNET_HEADER..]).unwrap();
            (ip.get_source(), ip.get_destination())
        };
        let mut icmp = MutableIcmpv6Packet::new(&mut frame[ETHERNET_HEADER + IPV6_HEADER..]).unwrap();
        edit(&mut icmp);
        let checksum = icmpv6::checksum(&icmp.to_immutable(), &source, &destination);
        icmp.set_checksum(checksum);
    }

    /// Every field of an NA frame built here.
    struct Na {
        eth_dst: MacAddr,
        ip_dst: Ipv6Addr,
        target: Ipv6Addr,
        flags: u8,
    }

    fn check_na(frame: &[u8], expected: &Na) {
        assert_eq!(frame.len(), FRAME_LEN);
        let eth = EthernetPacket::new(frame).unwrap();
        assert_eq!(eth.get_destination(), expected.eth_dst);
        assert_eq!(eth.get_source(), MINE);
        assert_eq!(eth.get_ethertype(), EtherTypes::Ipv6);
        let ip = Ipv6Packet::new(eth.payload()).unwrap();
        assert_eq!(ip.get_version(), 6);
        assert_eq!((ip.get_traffic_class(), ip.get_flow_label()), (0, 0));
        assert_eq!(usize::from(ip.get_payload_length()), ND_MESSAGE + LINK_ADDR_OPTION);
        assert_eq!(ip.get_next_header(), IpNextHeaderProtocols::Icmpv6);
        assert_eq!(ip.get_hop_limit(), 255);
        assert_eq!(ip.get_source(), expected.target, "sent from the announced address");
        assert_eq!(ip.get_destination(), expected.ip_dst);
        let icmp = Icmpv6Packet::new(ip.payload()).unwrap();
        assert_eq!(icmp.get_checksum(), icmpv6::checksum(&icmp, &ip.get_source(), &ip.get_destination()));
        let na = NeighborAdvertPacket::new(ip.payload()).unwrap();
        assert_eq!(na.get_icmpv6_type(), Icmpv6Types::NeighborAdvert);
        assert_eq!(na.get_icmpv6_code(), Icmpv6Code(0));
        assert_eq!(na.get_flags(), expected.flags);
        assert_eq!(na.get_reserved(), 0);
        assert_eq!(na.get_target_addr(), expected.target);
        let options = na.get_options();
        assert_eq!(options.len(), 1);
        assert_eq!(options[0].option_type, NdpOptionTypes::TargetLLAddr);
        assert_eq!(options[0].length, 1);
        assert_eq!(options[0].data, MINE.octets());
    }

    #[test]
    fn solicited_node_groups_and_their_macs() {
        assert_eq!(solicited_node(LB_IP), "ff02::1:ff00:c8".parse::<Ipv6Addr>().unwrap());
        let ip: Ipv6Addr = "2001:db8::abcd:1234:5678".parse().unwrap();
        assert_eq!(solicited_node(ip), "ff02::1:ff34:5678".parse::<Ipv6Addr>().unwrap());
        assert_eq!(multicast_mac(solicited_node(ip)), MacAddr(0x33, 0x33, 0xff, 0x34, 0x56, 0x78));
        assert_eq!(multicast_mac(ALL_NODES), MacAddr(0x33, 0x33, 0, 0, 0, 1));
    }

    #[test]
    fn parses_a_solicitation() {
        assert_eq!(
            parse_solicitation(&Ns::new().build()),
            Some(NeighborSolicitation {
                eth_source: CLIENT,
                source: CLIENT_IP,
                destination: solicited_node(LB_IP),
                target: LB_IP,
                source_link_addr: Some(CLIENT_OPTION),
            })
        );
    }

    #[test]
    fn answers_to_the_source_link_layer_option() {
        let frame = reply(&Ns::new().build(), MINE, only_lb).unwrap();
        let flags = NeighborAdvertFlags::Solicited | NeighborAdvertFlags::Override;
        check_na(&frame, &Na { eth_dst: CLIENT_OPTION, ip_dst: CLIENT_IP, target: LB_IP, flags });
    }

    #[test]
    fn answers_to_the_ethernet_source_without_the_option() {
        // Also: unicast NUD probe straight to the address, and Ethernet padding after the packet.
        let ns = Ns { options: Vec::new(), destination: LB_IP, padding: 10, ..Ns::new() };
        let frame = reply(&ns.build(), MINE, only_lb).unwrap();
        let flags = NeighborAdvertFlags::Solicited | NeighborAdvertFlags::Override;
        check_na(&frame, &Na { eth_dst: CLIENT, ip_dst: CLIENT_IP, target: LB_IP, flags });
    }

    #[test]
    fn unknown_options_are_skipped() {
        let mut ns = Ns::new();
        ns.options.splice(0..0, [14, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(parse_solicitation(&ns.build()).unwrap().source_link_addr, Some(CLIENT_OPTION));
    }

    #[test]
    fn answers_dad_to_all_nodes_unsolicited() {
        let frame = reply(&Ns::dad().build(), MINE, only_lb).unwrap();
        let flags = NeighborAdvertFlags::Override;
        check_na(&frame, &Na { eth_dst: multicast_mac(ALL_NODES), ip_dst: ALL_NODES, target: LB_IP, flags });
    }

    #[test]
    fn an_unsolicited_advertisement() {
        let frame = unsolicited(MINE, LB_IP);
        let flags = NeighborAdvertFlags::Override;
        check_na(&frame, &Na { eth_dst: MacAddr(0x33, 0x33, 0, 0, 0, 1), ip_dst: ALL_NODES, target: LB_IP, flags });
    }

    #[test]
    fn no_answer_for_other_targets_or_our_own_solicitations() {
        let other = Ns { target: Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0xc9), ..Ns::new() };
        assert_eq!(reply(&other.build(), MINE, only_lb), None);
        assert_eq!(reply(&Ns::new().build(), MINE, |_| false), None);
        assert_eq!(reply(&Ns::new().build(), CLIENT, only_lb), None, "from my own MAC");
    }

    #[test]
    fn no_answer_for_invalid_solicitations() {
        let mut cases = vec![
            ("hop limit 64", Ns { hop_limit: 64, ..Ns::new() }.build()),
            ("multicast target", Ns { target: ALL_NODES, ..Ns::new() }.build()),
            ("zero-length option", Ns { options: vec![1, 0, 0, 0, 0, 0, 0, 0], ..Ns::new() }.build()),
            ("option past the end", Ns { options: vec![1, 2, 0, 0, 0, 0, 0, 0], ..Ns::new() }.build()),
            ("huge option length", Ns { options: vec![1, 255, 0, 0, 0, 0, 0, 0], ..Ns::new() }.build()),
            ("odd byte after options", Ns { options: vec![9], ..Ns::new() }.build()),
            ("DAD with a source option", Ns { source: Ipv6Addr::UNSPECIFIED, ..Ns::new() }.build()),
            ("DAD to a unicast address", Ns { destination: LB_IP, ..Ns::dad() }.build()),
        ];
        let mut advert = Ns::new().build();
        edit_message(&mut advert, |icmp| icmp.set_icmpv6_type(Icmpv6Types::NeighborAdvert));
        cases.push(("an advertisement", advert));
        let mut code = Ns::new().build();
        edit_message(&mut code, |icmp| icmp.set_icmpv6_code(Icmpv6Code(1)));
        cases.push(("code 1", code));
        let mut checksum = Ns::new().build();
        let at = ETHERNET_HEADER + IPV6_HEADER + 2;
        checksum[at] ^= 0x01;
        cases.push(("bad checksum", checksum));
        let mut next_header = Ns::new().build();
        MutableIpv6Packet::new(&mut next_header[ETHERNET_HEADER..])
            .unwrap()
            .set_next_header(IpNextHeaderProtocols::Udp);
        cases.push(("UDP", next_header));
        let mut version = Ns::new().build();
        MutableIpv6Packet::new(&mut version[ETHERNET_HEADER..]).unwrap().set_version(4);
        cases.push(("version 4", version));
        let mut long = Ns::new().build();
        MutableIpv6Packet::new(&mut long[ETHERNET_HEADER..]).unwrap().set_payload_length(100);
        cases.push(("payload length past the frame", long));
        let mut ethertype = Ns::new().build();
        MutableEthernetPacket::new(&mut ethertype).unwrap().set_ethertype(EtherTypes::Ipv4);
        cases.push(("not IPv6", ethertype));
        for (what, frame) in &cases {
            assert_eq!(parse_solicitation(frame), None, "{what}");
            assert_eq!(reply(frame, MINE, |_| true), None, "{what}");
        }
    }

    #[test]
    fn no_answer_to_group_or_zero_senders() {
        let group = MacAddr(0x33, 0x33, 0, 0, 0, 1);
        let option = |m: MacAddr| {
            let o = m.octets();
            vec![1, 1, o[0], o[1], o[2], o[3], o[4], o[5]]
        };
        let mut cases = vec![
            ("multicast option", Ns { options: option(group), ..Ns::new() }.build()),
            ("broadcast option", Ns { options: option(MacAddr::broadcast()), ..Ns::new() }.build()),
            ("zero option", Ns { options: option(MacAddr::zero()), ..Ns::new() }.build()),
        ];
        for (what, mac) in [("multicast Ethernet source", group), ("zero Ethernet source", MacAddr::zero())] {
            for ns in [Ns::new(), Ns::dad()] {
                let mut frame = ns.build();
                MutableEthernetPacket::new(&mut frame).unwrap().set_source(mac);
                cases.push((what, frame));
            }
        }
        for (what, frame) in &cases {
            assert!(!parse_solicitation(frame).unwrap().valid_sender(), "{what}");
            assert_eq!(reply(frame, MINE, only_lb), None, "{what}");
        }
        assert!(parse_solicitation(&Ns::new().build()).unwrap().valid_sender());
        assert!(parse_solicitation(&Ns::dad().build()).unwrap().valid_sender());
    }

    #[test]
    fn a_solicitation_as_a_client_sends_it() {
        let frame = solicitation(CLIENT, CLIENT_IP, LB_IP);
        assert_eq!(
            parse_solicitation(&frame),
            Some(NeighborSolicitation {
                eth_source: CLIENT,
                source: CLIENT_IP,
                destination: solicited_node(LB_IP),
                target: LB_IP,
                source_link_addr: Some(CLIENT),
            })
        );
        assert_eq!(EthernetPacket::new(&frame).unwrap().get_destination(), multicast_mac(solicited_node(LB_IP)));
        assert!(reply(&frame, MINE, only_lb).is_some());
    }

    #[test]
    fn no_answer_for_truncated_frames() {
        let frame = Ns::new().build();
        for len in 0..frame.len() {
            assert_eq!(reply(&frame[..len], MINE, only_lb), None, "{len} bytes");
        }
    }

    /// Why the option walk is hand-written: pnet's option parser overflows on a length of 32 or
    /// more. If this stops panicking, pnet may have been fixed and `source_link_addr` could go.
    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "overflow")]
    fn pnet_option_parsing_overflows_on_long_options() {
        let mut ns = Ns { options: vec![1, 32, 0, 0, 0, 0, 0, 0], ..Ns::new() }.build();
        let message = &mut ns[ETHERNET_HEADER + IPV6_HEADER..];
        let _ = MutableNeighborSolicitPacket::new(message).unwrap().get_options();
    }

    fn arb_frame() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![Just(Ns::new().build()), Just(Ns::dad().build())]
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..160)) {
            let _ = reply(&bytes, MINE, |_| true);
        }

        #[test]
        fn never_panics_on_arbitrary_messages(
            body in proptest::collection::vec(any::<u8>(), 0..96),
            options in proptest::collection::vec(any::<u8>(), 0..48),
        ) {
            // A valid IPv6 header and checksum around random ICMPv6 content gets past the early
            // checks, so the option walk sees the random bytes.
            let mut ns = Ns { options, ..Ns::new() }.build();
            let start = ETHERNET_HEADER + IPV6_HEADER;
            for (i, byte) in body.iter().enumerate().take(ns.len() - start) {
                if i != 0 && !(2..4).contains(&i) {
                    ns[start + i] = *byte;
                }
            }
            edit_message(&mut ns, |_| {});
            let _ = reply(&ns, MINE, |_| true);
        }

        #[test]
        fn never_panics_on_mutations_of_a_solicitation(
            frame in arb_frame(),
            edits in proptest::collection::vec((0usize..86, any::<u8>()), 1..6),
            cut in 0usize..=86,
        ) {
            let mut frame = frame;
            for (at, byte) in edits {
                if let Some(b) = frame.get_mut(at) {
                    *b = byte;
                }
            }
            frame.truncate(cut);
            if let Some(out) = reply(&frame, MINE, |_| true) {
                let na = NeighborAdvertPacket::new(&out[ETHERNET_HEADER + IPV6_HEADER..]).unwrap();
                prop_assert_eq!(na.get_icmpv6_type(), Icmpv6Types::NeighborAdvert);
            }
        }
    }
}

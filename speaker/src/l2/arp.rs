//! ARP (RFC 826) for the IPv4 addresses this node announces: answering who-has requests, and the
//! gratuitous packets that move the LAN's caches to this node on takeover.
//!
//! ```text
//!  frame from the wire ──> parse_request ──> announced(target)? ──> reply: "target is at my_mac"
//!  took an IP ───────────> gratuitous ──> [request, reply], broadcast, sender = target = the IP
//! ```
//!
//! Pure over bytes so the socket loop only reads, calls `reply` and writes; every check on what a
//! frame from the LAN may contain is here and proven never to panic.

use std::net::Ipv4Addr;

use pnet_base::MacAddr;
use pnet_packet::Packet;
use pnet_packet::arp::{ArpHardwareTypes, ArpOperation, ArpOperations, ArpPacket, MutableArpPacket};
use pnet_packet::ethernet::{EtherTypes, EthernetPacket, MutableEthernetPacket};

const ETHERNET_HEADER: usize = 14;
/// An Ethernet/IPv4 ARP packet: 8 bytes of header, two MACs and two IPv4 addresses.
const ARP_PACKET: usize = 28;
/// Frames this module builds are this long (before the minimum-frame padding the NIC adds).
pub const FRAME_LEN: usize = ETHERNET_HEADER + ARP_PACKET;

/// The fields of a who-has request worth counting or logging.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArpRequest {
    /// The frame's Ethernet source.
    pub eth_source: MacAddr,
    /// Who asks: the reply goes to this MAC.
    pub sender_mac: MacAddr,
    /// The asker's IPv4 address; `0.0.0.0` for an RFC 5227 probe.
    pub sender_ip: Ipv4Addr,
    /// The address asked about.
    pub target_ip: Ipv4Addr,
}

/// The request an Ethernet frame carries, if it is an Ethernet/IPv4 ARP request. Trailing bytes
/// (Ethernet padding) are ignored.
pub fn parse_request(frame: &[u8]) -> Option<ArpRequest> {
    let eth = EthernetPacket::new(frame)?;
    if eth.get_ethertype() != EtherTypes::Arp {
        return None;
    }
    let arp = ArpPacket::new(eth.payload())?;
    // pnet reads the addresses as Ethernet/IPv4 whatever the length fields say, so check them.
    let valid = arp.get_hardware_type() == ArpHardwareTypes::Ethernet
        && arp.get_protocol_type() == EtherTypes::Ipv4
        && arp.get_hw_addr_len() == 6
        && arp.get_proto_addr_len() == 4
        && arp.get_operation() == ArpOperations::Request;
    valid.then(|| ArpRequest {
        eth_source: eth.get_source(),
        sender_mac: arp.get_sender_hw_addr(),
        sender_ip: arp.get_sender_proto_addr(),
        target_ip: arp.get_target_proto_addr(),
    })
}

impl ArpRequest {
    /// Whether the asker is a single host: the Ethernet source and the sender hardware address
    /// are both unicast and not zero. An answer to anything else would go to a group, or nowhere.
    pub fn valid_sender(&self) -> bool {
        super::is_unicast(self.eth_source) && super::is_unicast(self.sender_mac)
    }
}

/// The ARP reply to send for `frame`, if it is a request from a valid sender
/// ([`ArpRequest::valid_sender`]) for an address `announced` says this node announces. A request
/// from `my_mac` itself (our own gratuitous request looping back) gets no answer.
pub fn reply(frame: &[u8], my_mac: MacAddr, announced: impl Fn(Ipv4Addr) -> bool) -> Option<Vec<u8>> {
    let request = parse_request(frame)?;
    if request.sender_mac == my_mac || !request.valid_sender() || !announced(request.target_ip) {
        return None;
    }
    Some(build(
        request.sender_mac,
        ArpOperations::Reply,
        (my_mac, request.target_ip),
        (request.sender_mac, request.sender_ip),
    ))
}

/// The two gratuitous ARP frames to broadcast on taking `ip`: a request and a reply, both with
/// sender and target IP `ip`, since some hosts update their caches from one and not the other.
/// The request's target MAC is zero (RFC 5227); the reply's is `my_mac` (RFC 5944 §4.6).
pub fn gratuitous(my_mac: MacAddr, ip: Ipv4Addr) -> [Vec<u8>; 2] {
    [
        build(MacAddr::broadcast(), ArpOperations::Request, (my_mac, ip), (MacAddr::zero(), ip)),
        build(MacAddr::broadcast(), ArpOperations::Reply, (my_mac, ip), (my_mac, ip)),
    ]
}

/// A broadcast who-has for `target`, as a client sends it (for probes and tests).
pub fn who_has(my_mac: MacAddr, my_ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    build(MacAddr::broadcast(), ArpOperations::Request, (my_mac, my_ip), (MacAddr::zero(), target))
}

/// An Ethernet frame from the sender's MAC to `eth_dst` carrying one Ethernet/IPv4 ARP packet.
fn build(
    eth_dst: MacAddr,
    operation: ArpOperation,
    (sender_mac, sender_ip): (MacAddr, Ipv4Addr),
    (target_mac, target_ip): (MacAddr, Ipv4Addr),
) -> Vec<u8> {
    let mut frame = vec![0u8; FRAME_LEN];
    let (eth_header, arp_bytes) = frame.split_at_mut(ETHERNET_HEADER);
    // The buffers are sized for the headers above, so pnet accepts them.
    if let Some(mut arp) = MutableArpPacket::new(arp_bytes) {
        arp.set_hardware_type(ArpHardwareTypes::Ethernet);
        arp.set_protocol_type(EtherTypes::Ipv4);
        arp.set_hw_addr_len(6);
        arp.set_proto_addr_len(4);
        arp.set_operation(operation);
        arp.set_sender_hw_addr(sender_mac);
        arp.set_sender_proto_addr(sender_ip);
        arp.set_target_hw_addr(target_mac);
        arp.set_target_proto_addr(target_ip);
    }
    if let Some(mut eth) = MutableEthernetPacket::new(eth_header) {
        eth.set_destination(eth_dst);
        eth.set_source(sender_mac);
        eth.set_ethertype(EtherTypes::Arp);
    }
    frame
}

#[cfg(test)]
mod tests {
    use super::*;
    use pnet_packet::arp::ArpHardwareType;
    use pnet_packet::ethernet::EtherType;
    use proptest::prelude::*;

    const MINE: MacAddr = MacAddr(0x02, 0, 0, 0, 0, 0x11);
    const CLIENT: MacAddr = MacAddr(0x02, 0, 0, 0, 0, 0x64);
    const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
    const LB_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 200);

    fn only_lb(ip: Ipv4Addr) -> bool {
        ip == LB_IP
    }

    /// A who-has request as a client would send it, built with pnet, with 18 bytes of Ethernet
    /// padding as frames on the wire have.
    fn request(target: Ipv4Addr) -> Vec<u8> {
        let mut frame = vec![0u8; 60];
        {
            let mut eth = MutableEthernetPacket::new(&mut frame).unwrap();
            eth.set_destination(MacAddr::broadcast());
            eth.set_source(CLIENT);
            eth.set_ethertype(EtherTypes::Arp);
        }
        let mut arp = MutableArpPacket::new(&mut frame[ETHERNET_HEADER..]).unwrap();
        arp.set_hardware_type(ArpHardwareTypes::Ethernet);
        arp.set_protocol_type(EtherTypes::Ipv4);
        arp.set_hw_addr_len(6);
        arp.set_proto_addr_len(4);
        arp.set_operation(ArpOperations::Request);
        arp.set_sender_hw_addr(CLIENT);
        arp.set_sender_proto_addr(CLIENT_IP);
        arp.set_target_hw_addr(MacAddr::zero());
        arp.set_target_proto_addr(target);
        frame
    }

    fn with_arp(edit: impl FnOnce(&mut MutableArpPacket<'_>)) -> Vec<u8> {
        let mut frame = request(LB_IP);
        edit(&mut MutableArpPacket::new(&mut frame[ETHERNET_HEADER..]).unwrap());
        frame
    }

    #[test]
    fn parses_a_request() {
        assert_eq!(
            parse_request(&request(LB_IP)),
            Some(ArpRequest { eth_source: CLIENT, sender_mac: CLIENT, sender_ip: CLIENT_IP, target_ip: LB_IP })
        );
    }

    #[test]
    fn replies_to_a_request_for_an_announced_ip() {
        let frame = reply(&request(LB_IP), MINE, only_lb).unwrap();
        assert_eq!(frame.len(), FRAME_LEN);
        let eth = EthernetPacket::new(&frame).unwrap();
        assert_eq!(eth.get_destination(), CLIENT);
        assert_eq!(eth.get_source(), MINE);
        assert_eq!(eth.get_ethertype(), EtherTypes::Arp);
        let arp = ArpPacket::new(eth.payload()).unwrap();
        assert_eq!(arp.get_hardware_type(), ArpHardwareTypes::Ethernet);
        assert_eq!(arp.get_protocol_type(), EtherTypes::Ipv4);
        assert_eq!((arp.get_hw_addr_len(), arp.get_proto_addr_len()), (6, 4));
        assert_eq!(arp.get_operation(), ArpOperations::Reply);
        assert_eq!(arp.get_sender_hw_addr(), MINE);
        assert_eq!(arp.get_sender_proto_addr(), LB_IP);
        assert_eq!(arp.get_target_hw_addr(), CLIENT);
        assert_eq!(arp.get_target_proto_addr(), CLIENT_IP);
    }

    #[test]
    fn answers_probes_too() {
        // RFC 5227 probe: sender IP 0.0.0.0. Answering it defends the address.
        let probe = with_arp(|arp| arp.set_sender_proto_addr(Ipv4Addr::UNSPECIFIED));
        let frame = reply(&probe, MINE, only_lb).unwrap();
        let arp = ArpPacket::new(&frame[ETHERNET_HEADER..]).unwrap();
        assert_eq!(arp.get_target_proto_addr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(arp.get_target_hw_addr(), CLIENT);
    }

    #[test]
    fn no_reply_for_other_ips_or_our_own_requests() {
        assert_eq!(reply(&request(Ipv4Addr::new(192, 0, 2, 201)), MINE, only_lb), None);
        assert_eq!(reply(&request(LB_IP), MINE, |_| false), None);
        assert_eq!(reply(&request(LB_IP), CLIENT, only_lb), None, "sender is my own MAC");
    }

    #[test]
    fn no_reply_for_anything_but_an_ethernet_ipv4_request() {
        let cases = [
            with_arp(|arp| arp.set_operation(ArpOperations::Reply)),
            with_arp(|arp| arp.set_operation(ArpOperation::new(3))),
            with_arp(|arp| arp.set_hardware_type(ArpHardwareType::new(6))),
            with_arp(|arp| arp.set_protocol_type(EtherTypes::Ipv6)),
            with_arp(|arp| arp.set_hw_addr_len(8)),
            with_arp(|arp| arp.set_proto_addr_len(16)),
        ];
        for (i, frame) in cases.iter().enumerate() {
            assert_eq!(parse_request(frame), None, "case {i}");
            assert_eq!(reply(frame, MINE, only_lb), None, "case {i}");
        }
        let mut not_arp = request(LB_IP);
        MutableEthernetPacket::new(&mut not_arp).unwrap().set_ethertype(EtherType::new(0x0800));
        assert_eq!(reply(&not_arp, MINE, only_lb), None);
    }

    #[test]
    fn no_reply_to_group_or_zero_senders() {
        let group = MacAddr(0x01, 0, 0x5e, 0, 0, 1);
        let cases = [
            ("broadcast sender", with_arp(|arp| arp.set_sender_hw_addr(MacAddr::broadcast()))),
            ("multicast sender", with_arp(|arp| arp.set_sender_hw_addr(group))),
            ("zero sender", with_arp(|arp| arp.set_sender_hw_addr(MacAddr::zero()))),
        ];
        let mut eth_group = request(LB_IP);
        MutableEthernetPacket::new(&mut eth_group).unwrap().set_source(group);
        let mut eth_zero = request(LB_IP);
        MutableEthernetPacket::new(&mut eth_zero).unwrap().set_source(MacAddr::zero());
        for (what, frame) in
            cases.iter().chain(&[("multicast Ethernet source", eth_group), ("zero Ethernet source", eth_zero)])
        {
            let parsed = parse_request(frame).unwrap();
            assert!(!parsed.valid_sender(), "{what}");
            assert_eq!(reply(frame, MINE, only_lb), None, "{what}");
        }
        assert!(parse_request(&request(LB_IP)).unwrap().valid_sender());
    }

    #[test]
    fn no_reply_for_truncated_frames() {
        let frame = request(LB_IP);
        for len in 0..FRAME_LEN {
            assert_eq!(reply(&frame[..len], MINE, only_lb), None, "{len} bytes");
        }
        assert!(reply(&frame[..FRAME_LEN], MINE, only_lb).is_some(), "unpadded is fine");
    }

    #[test]
    fn gratuitous_request_and_reply() {
        let [req, rep] = gratuitous(MINE, LB_IP);
        for (frame, op, target_mac) in
            [(&req, ArpOperations::Request, MacAddr::zero()), (&rep, ArpOperations::Reply, MINE)]
        {
            assert_eq!(frame.len(), FRAME_LEN);
            let eth = EthernetPacket::new(frame).unwrap();
            assert_eq!(eth.get_destination(), MacAddr::broadcast());
            assert_eq!(eth.get_source(), MINE);
            assert_eq!(eth.get_ethertype(), EtherTypes::Arp);
            let arp = ArpPacket::new(eth.payload()).unwrap();
            assert_eq!(arp.get_hardware_type(), ArpHardwareTypes::Ethernet);
            assert_eq!(arp.get_protocol_type(), EtherTypes::Ipv4);
            assert_eq!((arp.get_hw_addr_len(), arp.get_proto_addr_len()), (6, 4));
            assert_eq!(arp.get_operation(), op);
            assert_eq!(arp.get_sender_hw_addr(), MINE);
            assert_eq!(arp.get_sender_proto_addr(), LB_IP);
            assert_eq!(arp.get_target_hw_addr(), target_mac);
            assert_eq!(arp.get_target_proto_addr(), LB_IP);
        }
        // Our own gratuitous request, heard back, is not answered.
        assert_eq!(reply(&req, MINE, only_lb), None);
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = reply(&bytes, MINE, |_| true);
            let _ = parse_request(&bytes);
        }

        #[test]
        fn never_panics_on_mutations_of_a_request(
            edits in proptest::collection::vec((0usize..60, any::<u8>()), 1..6),
            len in 0usize..=60,
        ) {
            let mut frame = request(LB_IP);
            for (at, byte) in edits {
                frame[at] = byte;
            }
            frame.truncate(len);
            if let Some(out) = reply(&frame, MINE, |_| true) {
                // Whatever was asked, an answer is always a well-formed reply from us.
                let arp = ArpPacket::new(&out[ETHERNET_HEADER..]).unwrap();
                prop_assert_eq!(arp.get_operation(), ArpOperations::Reply);
                prop_assert_eq!(arp.get_sender_hw_addr(), MINE);
            }
        }
    }
}

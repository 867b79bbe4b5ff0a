//! The classic BPF program on each responder's raw socket: the kernel copies to user space only
//! the frames the responder could answer, so a flood of unrelated traffic on the link costs the
//! responder thread nothing.
//!
//! ```text
//!  frame ──> to this host, broadcast or multicast? ──no──> drop (sent by us, or to another MAC)
//!              │ yes
//!              ├─ ethertype ARP (0x0806), operation request (1) ──────────────────────> keep
//!              └─ ethertype IPv6 (0x86DD), next header ICMPv6 (58), hop limit 255,
//!                 ICMPv6 type 135 right after the 40-byte header (a Neighbor Solicitation) ─> keep
//!                 anything else ──> drop
//! ```
//!
//! Every frame `arp::parse_request` or `ndp::parse_solicitation` accepts passes the program (the
//! fuzz test checks it with [`accepts`], the program run in user space); the parsers make the
//! remaining checks. A solicitation behind extension headers is dropped here as the parser
//! drops it.
//!
//! Written by hand: the fifteen instructions, and [`accepts`], a user-space interpreter of just
//! the instructions used, so that the program is unit-tested without a socket. No maintained crate
//! assembles classic BPF for `SO_ATTACH_FILTER` (`socket2` only takes the instructions).

/// One classic BPF instruction (`struct sock_filter`), as plain data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

// Instruction classes and modes (linux/filter.h, linux/bpf_common.h).
/// `BPF_LD | BPF_W | BPF_ABS`: load the 32-bit word at `k`.
const LD_W_ABS: u16 = 0x20;
/// `BPF_LD | BPF_H | BPF_ABS`: load the 16-bit half word at `k`.
const LD_H_ABS: u16 = 0x28;
/// `BPF_LD | BPF_B | BPF_ABS`: load the byte at `k`.
const LD_B_ABS: u16 = 0x30;
/// `BPF_JMP | BPF_JEQ | BPF_K`: jump `jt` if the accumulator equals `k`, else `jf`.
const JEQ_K: u16 = 0x15;
/// `BPF_JMP | BPF_JGT | BPF_K`: jump `jt` if the accumulator is greater than `k`, else `jf`.
const JGT_K: u16 = 0x25;
/// `BPF_RET | BPF_K`: keep `k` bytes of the frame (0: drop it).
const RET_K: u16 = 0x06;

/// `SKF_AD_OFF + SKF_AD_PKTTYPE`: loads the frame's packet type (an ancillary field) instead of
/// frame bytes.
const PKTTYPE: u32 = (-0x1000_i32 + 4) as u32;
/// `PACKET_MULTICAST`: the last of the packet types kept (`PACKET_HOST` 0, `PACKET_BROADCAST` 1,
/// `PACKET_MULTICAST` 2). Above it: `PACKET_OTHERHOST` (to another MAC, as a non-promiscuous
/// socket should not see) and `PACKET_OUTGOING` (this host's own frames on their way out).
const PACKET_MULTICAST: u32 = 2;
/// `PACKET_OTHERHOST`: a frame to another host's MAC.
pub const PACKET_OTHERHOST: u32 = 3;
/// `PACKET_OUTGOING`: a frame this host sends, seen by an `ETH_P_ALL` socket on its way out.
pub const PACKET_OUTGOING: u32 = 4;
/// How much of a kept frame to copy: all of it (frames here are at most a jumbo MTU).
const KEEP: u32 = 0x4_0000;

const ETHERTYPE: u32 = 12;
const ARP_OPERATION: u32 = 14 + 6;
const IPV6_NEXT_HEADER: u32 = 14 + 6;
const IPV6_HOP_LIMIT: u32 = 14 + 7;
const ICMPV6_TYPE: u32 = 14 + 40;

const fn insn(code: u16, jt: u8, jf: u8, k: u32) -> Insn {
    Insn { code, jt, jf, k }
}

/// The program. Jump offsets count instructions after the next one: `KEEP_AT` and `DROP_AT` are
/// the indexes of the two returns.
pub const PROGRAM: [Insn; 15] = {
    const KEEP_AT: u8 = 13;
    const DROP_AT: u8 = 14;
    // The offset from instruction `i` to `to`.
    const fn to(i: u8, to: u8) -> u8 {
        to - i - 1
    }
    [
        /* 0 */ insn(LD_W_ABS, 0, 0, PKTTYPE),
        /* 1 */ insn(JGT_K, to(1, DROP_AT), 0, PACKET_MULTICAST),
        /* 2 */ insn(LD_H_ABS, 0, 0, ETHERTYPE),
        /* 3 */ insn(JEQ_K, 0, to(3, 6), 0x0806),
        /* 4 */ insn(LD_H_ABS, 0, 0, ARP_OPERATION),
        /* 5 */ insn(JEQ_K, to(5, KEEP_AT), to(5, DROP_AT), 1),
        /* 6 */ insn(JEQ_K, 0, to(6, DROP_AT), 0x86DD),
        /* 7 */ insn(LD_B_ABS, 0, 0, IPV6_NEXT_HEADER),
        /* 8 */ insn(JEQ_K, 0, to(8, DROP_AT), 58),
        /* 9 */ insn(LD_B_ABS, 0, 0, IPV6_HOP_LIMIT),
        /* 10 */ insn(JEQ_K, 0, to(10, DROP_AT), 255),
        /* 11 */ insn(LD_B_ABS, 0, 0, ICMPV6_TYPE),
        /* 12 */ insn(JEQ_K, to(12, KEEP_AT), to(12, DROP_AT), 135),
        /* 13 */ insn(RET_K, 0, 0, KEEP),
        /* 14 */ insn(RET_K, 0, 0, 0),
    ]
};

/// The program as `socket2` attaches it.
pub fn socket_filter() -> Vec<socket2::SockFilter> {
    PROGRAM.iter().map(|i| socket2::SockFilter::new(i.code, i.jt, i.jf, i.k)).collect()
}

/// Whether the kernel would copy `frame` (of packet type `pkttype`: 0 for a frame to this host,
/// 1 broadcast, 2 multicast, [`PACKET_OTHERHOST`], [`PACKET_OUTGOING`]) to the socket: [`PROGRAM`] interpreted as the kernel
/// does, for tests. A load past the end of the frame drops it, as in the kernel.
pub fn accepts(frame: &[u8], pkttype: u32) -> bool {
    let mut a: u32 = 0;
    let mut pc = 0usize;
    // Jumps only go forward, so this ends within PROGRAM.len() steps.
    while let Some(i) = PROGRAM.get(pc) {
        pc += 1;
        let load = |width: usize| -> Option<u32> {
            if i.k == PKTTYPE {
                return Some(pkttype);
            }
            let at = usize::try_from(i.k).ok()?;
            let bytes = frame.get(at..at.checked_add(width)?)?;
            Some(bytes.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)))
        };
        match i.code {
            LD_W_ABS | LD_H_ABS | LD_B_ABS => {
                let width = match i.code {
                    LD_W_ABS => 4,
                    LD_H_ABS => 2,
                    _ => 1,
                };
                match load(width) {
                    Some(v) => a = v,
                    None => return false,
                }
            }
            JEQ_K => pc += usize::from(if a == i.k { i.jt } else { i.jf }),
            JGT_K => pc += usize::from(if a > i.k { i.jt } else { i.jf }),
            RET_K => return i.k != 0,
            _ => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::l2::{arp, ndp};
    use pnet_base::MacAddr;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const CLIENT: MacAddr = MacAddr(0x02, 0, 0, 0, 0, 0x64);
    const LB: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 200);
    const LB6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0xc8);

    #[test]
    fn every_jump_lands_inside_the_program_and_it_ends_in_returns() {
        for (at, i) in PROGRAM.iter().enumerate() {
            if i.code == JEQ_K || i.code == JGT_K {
                assert!(at + 1 + usize::from(i.jt.max(i.jf)) < PROGRAM.len(), "instruction {at}");
            }
        }
        assert_eq!(PROGRAM[13], insn(RET_K, 0, 0, KEEP));
        assert_eq!(PROGRAM[14], insn(RET_K, 0, 0, 0));
        assert_eq!(socket_filter().len(), PROGRAM.len());
    }

    #[test]
    fn keeps_arp_requests_and_neighbor_solicitations() {
        let who_has = arp::who_has(CLIENT, Ipv4Addr::new(192, 0, 2, 100), LB);
        assert!(accepts(&who_has, 1));
        assert!(arp::parse_request(&who_has).is_some());
        let ns = ndp::solicitation(CLIENT, Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x100), LB6);
        assert!(accepts(&ns, 2));
        assert!(ndp::parse_solicitation(&ns).is_some());
    }

    #[test]
    fn drops_what_the_responder_never_answers() {
        let mine = MacAddr(0x02, 0, 0, 0, 0, 0x11);
        let [gratuitous_request, gratuitous_reply] = arp::gratuitous(mine, LB);
        assert!(!accepts(&gratuitous_reply, 1), "an ARP reply");
        assert!(accepts(&gratuitous_request, 1));
        assert!(!accepts(&gratuitous_request, PACKET_OUTGOING), "our own frames on their way out");
        assert!(!accepts(&gratuitous_request, PACKET_OTHERHOST), "frames to another MAC");
        assert!(!accepts(&ndp::unsolicited(mine, LB6), 2), "an advertisement");
        let mut udp = vec![0u8; 1514];
        udp[12..14].copy_from_slice(&[0x08, 0x00]);
        assert!(!accepts(&udp, 0), "IPv4");
        let mut udp6 = ndp::solicitation(CLIENT, Ipv6Addr::LOCALHOST, LB6);
        udp6[20] = 17;
        assert!(!accepts(&udp6, 0), "UDP over IPv6");
        let mut routed = ndp::solicitation(CLIENT, Ipv6Addr::LOCALHOST, LB6);
        routed[21] = 64;
        assert!(!accepts(&routed, 0), "hop limit below 255");
        for len in 0..14 {
            assert!(!accepts(&ndp::solicitation(CLIENT, Ipv6Addr::LOCALHOST, LB6)[..len], 0), "{len} bytes");
        }
        assert!(!accepts(&ndp::solicitation(CLIENT, Ipv6Addr::LOCALHOST, LB6)[..54], 0), "cut before the type");
    }
}

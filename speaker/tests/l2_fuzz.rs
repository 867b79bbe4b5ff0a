//! Fuzz of the layer-2 decoders: `arp::parse_request` / `arp::reply` and
//! `ndp::parse_solicitation` / `ndp::reply`, with the socket filter and the responder's verdict
//! around them, on generated frames: mutations of valid requests (byte edits, cuts, growth, the
//! ICMPv6 checksum fixed up after the edit half the time so the deeper checks see the damage),
//! solicitations with random option bytes behind a valid header, and random bytes, 0 to 1,600
//! bytes long.
//!
//! For every input: no panic; an answer is a frame of the codec's fixed length to a single host
//! (or to all nodes, for DAD); a frame a parser accepts also passes the kernel filter (so the
//! filter never hides a request the responder would answer); the calls allocate at most
//! `MAX_ALLOC` bytes (a counting allocator measures it); the rate table stays within its
//! capacity.
//!
//! `cargo test` runs 50,000 inputs per decoder; `make fuzz` sets `FERROLB_FUZZ_L2_INPUTS`
//! (10,000,000) and runs it in release. `FERROLB_FUZZ_L2_SEED` replays a run (the seed is
//! printed, with the inputs per second).

// The counting allocator is the only unsafe code: it forwards to the system allocator.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ferrolb_speaker::l2::limit::{CAPACITY, RateLimit};
use ferrolb_speaker::l2::responder::{Announced, Verdict, verdict};
use ferrolb_speaker::l2::{arp, filter, is_unicast, ndp};
use pnet_base::MacAddr;
use pnet_packet::Packet;
use pnet_packet::ethernet::EthernetPacket;
use pnet_packet::icmpv6::{self, Icmpv6Packet, MutableIcmpv6Packet};
use pnet_packet::ipv6::Ipv6Packet;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

struct Counting;

thread_local! {
    /// Bytes allocated by this thread so far.
    static ALLOCATED: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every call is passed unchanged to the system allocator; the count is a thread-local
// `Cell` with a const initializer, which needs no allocation.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATED.try_with(|a| a.set(a.get().wrapping_add(layout.size())));
        // SAFETY: as the caller promised for this layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocated() -> usize {
    ALLOCATED.with(Cell::get)
}

/// Bytes one input may cost the decoders and reply builders: an answer frame and pnet's option
/// buffer, with room to spare; nothing may grow with the input.
const MAX_ALLOC: usize = 1024;
const MAX_LEN: usize = 1600;

const MINE: MacAddr = MacAddr(0x02, 0, 0, 0, 0, 0x11);
const CLIENT: MacAddr = MacAddr(0x02, 0, 0, 0, 0, 0x64);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x100);
const LB: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 200);
const LB6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0xc8);

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.replace('_', "").parse().ok()).unwrap_or(default)
}

/// Sets the ICMPv6 checksum of an Ethernet/IPv6 frame to the right one for its bytes now (over
/// the payload length, clamped to the frame), if the frame is long enough to hold one.
fn fix_checksum(frame: &mut [u8]) {
    let Some(ip) = Ipv6Packet::new(frame.get(14..).unwrap_or_default()) else { return };
    let (source, destination) = (ip.get_source(), ip.get_destination());
    let end = (14 + 40 + usize::from(ip.get_payload_length())).min(frame.len());
    let Some(message) = frame.get_mut(54..end) else { return };
    let Some(icmp) = Icmpv6Packet::new(message) else { return };
    let checksum = icmpv6::checksum(&icmp, &source, &destination);
    if let Some(mut icmp) = MutableIcmpv6Packet::new(message) {
        icmp.set_checksum(checksum);
    }
}

/// Sets the IPv6 payload length to what follows the header.
fn fix_payload_length(frame: &mut [u8]) {
    if let Some(len) = frame.len().checked_sub(54).and_then(|l| u16::try_from(l).ok()) {
        frame[18..20].copy_from_slice(&len.to_be_bytes());
    }
}

/// Valid frames to start mutations from.
fn seeds(ndp: bool) -> Vec<Vec<u8>> {
    if !ndp {
        let [g_req, g_rep] = arp::gratuitous(CLIENT, LB);
        let mut padded = arp::who_has(CLIENT, CLIENT_IP, LB);
        padded.resize(60, 0);
        return vec![
            arp::who_has(CLIENT, CLIENT_IP, LB),
            padded,
            arp::who_has(CLIENT, Ipv4Addr::UNSPECIFIED, LB),
            g_req,
            g_rep,
        ];
    }
    let ns = ndp::solicitation(CLIENT, CLIENT_IP6, LB6);
    // DAD: from ::, no option.
    let mut dad = ns[..ns.len() - 8].to_vec();
    dad[22..38].copy_from_slice(&Ipv6Addr::UNSPECIFIED.octets());
    fix_payload_length(&mut dad);
    fix_checksum(&mut dad);
    // To the address itself (a reachability probe), with an unknown option before the source's.
    let mut unicast = ns.clone();
    unicast[38..54].copy_from_slice(&LB6.octets());
    unicast.splice(54 + 24..54 + 24, [14, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    fix_payload_length(&mut unicast);
    fix_checksum(&mut unicast);
    vec![ns, dad, unicast, ndp::unsolicited(CLIENT, LB6)]
}

/// One generated input, in `frame`.
fn generate(rng: &mut StdRng, seeds: &[Vec<u8>], ndp: bool, frame: &mut Vec<u8>) {
    frame.clear();
    match rng.random_range(0..10u8) {
        // Random bytes.
        0 => {
            frame.resize(rng.random_range(0..=MAX_LEN), 0);
            rng.fill(&mut frame[..]);
        }
        // A solicitation header around random message bytes: the option walk sees them.
        1 | 2 if ndp => {
            frame.extend_from_slice(&seeds[0][..54 + 24]);
            let options = rng.random_range(0..=MAX_LEN - frame.len());
            let at = frame.len();
            frame.resize(at + options, 0);
            rng.fill(&mut frame[at..]);
            if rng.random_bool(0.5) {
                // Well-formed option lengths more often than chance would give.
                let mut o = at;
                while o + 1 < frame.len() {
                    let units = rng.random_range(1..4u8);
                    frame[o + 1] = units;
                    o += usize::from(units) * 8;
                }
            }
            fix_payload_length(frame);
            fix_checksum(frame);
        }
        // A valid frame, mutated.
        _ => {
            frame.extend_from_slice(&seeds[rng.random_range(0..seeds.len())]);
            for _ in 0..rng.random_range(1..=8u8) {
                match rng.random_range(0..6u8) {
                    0 | 1 if !frame.is_empty() => {
                        let at = rng.random_range(0..frame.len());
                        frame[at] = rng.random();
                    }
                    2 if !frame.is_empty() => {
                        const INTERESTING: [u8; 8] = [0, 1, 0x7f, 0x80, 0xff, 32, 255, 58];
                        let at = rng.random_range(0..frame.len());
                        frame[at] = INTERESTING[rng.random_range(0..INTERESTING.len())];
                    }
                    3 => frame.truncate(rng.random_range(0..=frame.len())),
                    4 if frame.len() < MAX_LEN => {
                        let to = rng.random_range(frame.len()..=MAX_LEN);
                        let at = frame.len();
                        frame.resize(to, 0);
                        rng.fill(&mut frame[at..]);
                    }
                    _ if !frame.is_empty() => {
                        let at = rng.random_range(0..frame.len());
                        frame.remove(at);
                    }
                    _ => {}
                }
            }
            if ndp && rng.random_bool(0.5) {
                fix_checksum(frame);
            }
        }
    }
}

/// Every check on one input.
fn check(frame: &[u8], table: &Announced, limit: &mut RateLimit) {
    let before = allocated();
    let request = arp::parse_request(frame);
    let arp_reply = arp::reply(frame, MINE, |_| true);
    let solicitation = ndp::parse_solicitation(frame);
    let ndp_reply = ndp::reply(frame, MINE, |_| true);
    let cost = allocated().wrapping_sub(before);
    assert!(cost <= MAX_ALLOC, "{cost} bytes allocated for a {}-byte input: {frame:02x?}", frame.len());

    if let Some(r) = request {
        assert!(filter::accepts(frame, 1), "the filter drops a request the parser accepts: {frame:02x?}");
        assert!(frame.len() >= arp::FRAME_LEN);
        if let Some(out) = &arp_reply {
            assert_eq!(out.len(), arp::FRAME_LEN);
            let eth = EthernetPacket::new(out).expect("an Ethernet frame");
            assert_eq!(eth.get_destination(), r.sender_mac);
            assert!(is_unicast(eth.get_destination()), "an ARP answer to a group: {frame:02x?}");
            assert_eq!(eth.get_source(), MINE);
        }
    } else {
        assert!(arp_reply.is_none(), "an ARP answer to what is no request");
    }
    if let Some(s) = solicitation {
        assert!(filter::accepts(frame, 2), "the filter drops a solicitation the parser accepts: {frame:02x?}");
        if let Some(out) = &ndp_reply {
            assert_eq!(out.len(), ndp::FRAME_LEN);
            let eth = EthernetPacket::new(out).expect("an Ethernet frame");
            let to = eth.get_destination();
            assert!(
                is_unicast(to) || (s.is_dad() && to == MacAddr(0x33, 0x33, 0, 0, 0, 1)),
                "an NA to {to}: {frame:02x?}"
            );
            assert_eq!(Ipv6Packet::new(eth.payload()).map(|ip| ip.get_source()), Some(s.target));
        }
    } else {
        assert!(ndp_reply.is_none(), "an NA to what is no solicitation");
    }
    match verdict(frame, MINE, table, limit, Instant::now()) {
        Verdict::Answer { frame: out, .. } => assert!(out.len() == arp::FRAME_LEN || out.len() == ndp::FRAME_LEN),
        Verdict::Drop { .. } | Verdict::Ignore => {}
    }
    assert!(limit.len() <= CAPACITY);
}

fn fuzz(what: &str, ndp: bool) {
    let inputs = env_number("FERROLB_FUZZ_L2_INPUTS", 50_000);
    let seed = env_number(
        "FERROLB_FUZZ_L2_SEED",
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1),
    );
    let mut rng = StdRng::seed_from_u64(seed ^ u64::from(ndp));
    let seeds = seeds(ndp);
    for s in &seeds[..seeds.len() - 1] {
        assert!(
            arp::parse_request(s).is_some() || ndp::parse_solicitation(s).is_some(),
            "a seed frame is no valid request: {s:02x?}"
        );
    }
    let mut table = Announced::default();
    table.insert(IpAddr::V4(LB));
    table.insert(IpAddr::V6(LB6));
    let mut limit = RateLimit::default();
    let mut frame = Vec::with_capacity(MAX_LEN);
    let (mut answered, mut parsed) = (0u64, 0u64);
    let start = Instant::now();
    for _ in 0..inputs {
        generate(&mut rng, &seeds, ndp, &mut frame);
        check(&frame, &table, &mut limit);
        if ndp {
            parsed += u64::from(ndp::parse_solicitation(&frame).is_some());
            answered += u64::from(ndp::reply(&frame, MINE, |_| true).is_some());
        } else {
            parsed += u64::from(arp::parse_request(&frame).is_some());
            answered += u64::from(arp::reply(&frame, MINE, |_| true).is_some());
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{what}: {inputs} inputs (seed {seed}) in {secs:.1} s, {:.0} inputs/s; {parsed} parsed as requests, {answered} answered",
        inputs as f64 / secs.max(1e-9)
    );
    // The generator must reach the deep paths, or the run proves little.
    assert!(parsed * 20 >= inputs, "only {parsed} of {inputs} inputs were valid requests");
    assert!(answered > 0);
}

#[test]
fn arp_decoders_survive_fuzzing() {
    fuzz("arp", false);
}

#[test]
fn ndp_decoders_survive_fuzzing() {
    fuzz("ndp", true);
}

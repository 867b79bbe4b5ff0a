//! `ferrolb-lab split-brain`: the client's watch for two announcers at once. Every interval
//! (5 ms) it asks for every LoadBalancer address — a broadcast ARP who-has for IPv4, a Neighbor
//! Solicitation to the solicited-node group for IPv6 — and records who answers. A speaker
//! that answers for an address it lost, beside the new announcer, shows as an **overlap**: a
//! span in which two different MACs both keep answering for one address.
//!
//! ```text
//!   every 5 ms: who-has A, NS B, … ──> replies (time, address, MAC)
//!        per address and MAC: runs of replies no more than `keep` apart
//!        overlap = the intersection of two runs of different MACs; > 50 ms is a split brain
//! ```
//!
//! The summary (runs, overlaps, announcer changes as seen on the wire) is pure and unit-tested;
//! the probe itself only moves frames.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use ferrolb_speaker::l2::arp::who_has;
use ferrolb_speaker::l2::ndp::solicitation;
use pnet_datalink::{Channel, MacAddr};
use pnet_packet::Packet;
use pnet_packet::arp::{ArpOperations, ArpPacket};
use pnet_packet::ethernet::{EtherTypes, EthernetPacket};
use pnet_packet::icmpv6::Icmpv6Types;
use pnet_packet::icmpv6::ndp::{NdpOptionTypes, NeighborAdvertFlags, NeighborAdvertPacket};
use pnet_packet::ip::IpNextHeaderProtocols;
use pnet_packet::ipv6::Ipv6Packet;
use serde::{Deserialize, Serialize};

/// An overlap longer than this is a split-brain window (the issue's threshold).
pub const SPLIT_BRAIN: Duration = Duration::from_millis(50);

/// One answer seen by the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    /// Unix time, microseconds.
    pub at_us: u64,
    pub ip: IpAddr,
    pub mac: [u8; 6],
}

/// A span in which one MAC kept answering for one address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    pub ip: IpAddr,
    pub mac: String,
    /// Unix time of the first and the last answer, microseconds.
    pub first_us: u64,
    pub last_us: u64,
    pub replies: u64,
}

/// Two MACs answering for one address at the same time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overlap {
    pub ip: IpAddr,
    pub macs: [String; 2],
    pub start_us: u64,
    pub duration_us: u64,
}

/// The owner of an address changed on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub ip: IpAddr,
    pub at_us: u64,
    pub from: String,
    pub to: String,
    /// Time since the old owner's last answer (the client's blind spot, if any).
    pub silence_us: u64,
}

/// What the probe saw.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub requests: u64,
    pub replies: u64,
    pub runs: Vec<Run>,
    pub overlaps: Vec<Overlap>,
    pub changes: Vec<Change>,
}

impl Summary {
    /// Overlaps longer than [`SPLIT_BRAIN`].
    pub fn split_brain_windows(&self) -> Vec<&Overlap> {
        self.overlaps.iter().filter(|o| o.duration_us > SPLIT_BRAIN.as_micros() as u64).collect()
    }
}

fn mac_string(m: [u8; 6]) -> String {
    MacAddr::new(m[0], m[1], m[2], m[3], m[4], m[5]).to_string()
}

/// Folds replies (in time order) into runs: a MAC's run of one address goes on while its
/// answers come no more than `keep` apart.
#[derive(Default)]
pub struct Runs {
    keep_us: u64,
    open: BTreeMap<(IpAddr, [u8; 6]), Run>,
    closed: Vec<Run>,
    replies: u64,
}

impl Runs {
    pub fn new(keep: Duration) -> Self {
        Runs { keep_us: keep.as_micros() as u64, ..Default::default() }
    }

    pub fn add(&mut self, r: Reply) {
        self.replies += 1;
        let key = (r.ip, r.mac);
        if let Some(run) = self.open.get_mut(&key) {
            if r.at_us.saturating_sub(run.last_us) <= self.keep_us {
                run.last_us = run.last_us.max(r.at_us);
                run.replies += 1;
                return;
            }
            if let Some(done) = self.open.remove(&key) {
                self.closed.push(done);
            }
        }
        let run = Run { ip: r.ip, mac: mac_string(r.mac), first_us: r.at_us, last_us: r.at_us, replies: 1 };
        self.open.insert(key, run);
    }

    /// Every run, overlap and change.
    pub fn finish(mut self, requests: u64) -> Summary {
        let mut runs = std::mem::take(&mut self.closed);
        runs.extend(self.open.into_values());
        runs.sort_by(|a, b| (a.ip, a.first_us, &a.mac).cmp(&(b.ip, b.first_us, &b.mac)));
        let mut overlaps = Vec::new();
        let mut changes = Vec::new();
        let mut by_ip: BTreeMap<IpAddr, Vec<&Run>> = BTreeMap::new();
        for r in &runs {
            by_ip.entry(r.ip).or_default().push(r);
        }
        for (ip, rs) in by_ip {
            for (i, a) in rs.iter().enumerate() {
                for b in rs[i + 1..].iter().take_while(|b| b.first_us <= a.last_us) {
                    if a.mac == b.mac {
                        continue;
                    }
                    let (start, end) = (a.first_us.max(b.first_us), a.last_us.min(b.last_us));
                    if end > start {
                        overlaps.push(Overlap {
                            ip,
                            macs: [a.mac.clone(), b.mac.clone()],
                            start_us: start,
                            duration_us: end - start,
                        });
                    }
                }
            }
            // Changes: the owner is whoever answered last; a run of another MAC that goes on
            // past the current owner's last answer takes over.
            let mut owner: Option<&Run> = None;
            for r in &rs {
                match owner {
                    None => owner = Some(r),
                    Some(o) if o.mac == r.mac => {
                        if r.last_us > o.last_us {
                            owner = Some(r)
                        }
                    }
                    Some(o) if r.last_us > o.last_us => {
                        changes.push(Change {
                            ip,
                            at_us: r.first_us.max(o.first_us),
                            from: o.mac.clone(),
                            to: r.mac.clone(),
                            silence_us: r.first_us.saturating_sub(o.last_us),
                        });
                        owner = Some(r);
                    }
                    Some(_) => {}
                }
            }
        }
        changes.sort_by_key(|c| c.at_us);
        Summary { requests, replies: self.replies, runs, overlaps, changes }
    }
}

/// `(address, MAC)` if `frame` answers one of our requests (sent to `me`, not gratuitous).
pub fn answer(frame: &[u8], me: MacAddr) -> Option<(IpAddr, [u8; 6])> {
    let eth = EthernetPacket::new(frame)?;
    if eth.get_destination() != me {
        return None;
    }
    match eth.get_ethertype() {
        EtherTypes::Arp => {
            let arp = ArpPacket::new(eth.payload())?;
            (arp.get_operation() == ArpOperations::Reply)
                .then(|| (IpAddr::V4(arp.get_sender_proto_addr()), arp.get_sender_hw_addr().octets()))
        }
        EtherTypes::Ipv6 => {
            let ip = Ipv6Packet::new(eth.payload())?;
            if ip.get_next_header() != IpNextHeaderProtocols::Icmpv6 {
                return None;
            }
            let na = NeighborAdvertPacket::new(ip.payload())?;
            if na.get_icmpv6_type() != Icmpv6Types::NeighborAdvert
                || na.get_flags() & NeighborAdvertFlags::Solicited == 0
            {
                return None;
            }
            // The target link-layer option names the answering MAC; the Ethernet source
            // otherwise.
            let mac = na
                .get_options()
                .iter()
                .find(|o| o.option_type == NdpOptionTypes::TargetLLAddr && o.data.len() >= 6)
                .map(|o| [o.data[0], o.data[1], o.data[2], o.data[3], o.data[4], o.data[5]])
                .unwrap_or_else(|| eth.get_source().octets());
            Some((IpAddr::V6(na.get_target_addr()), mac))
        }
        _ => None,
    }
}

/// What to watch.
#[derive(Clone, Debug)]
pub struct Watch {
    pub ips: Vec<IpAddr>,
    pub interface: String,
    pub interval: Duration,
    pub duration: Duration,
    /// A run goes on while answers come no more than this apart.
    pub keep: Duration,
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// Probes until `duration` has passed (or `stop` is set) and sums up.
pub fn run(w: &Watch, stop: Arc<AtomicBool>) -> Result<Summary> {
    let iface = pnet_datalink::interfaces()
        .into_iter()
        .find(|i| i.name == w.interface)
        .with_context(|| format!("no interface {}", w.interface))?;
    let me = iface.mac.with_context(|| format!("{} has no MAC", w.interface))?;
    let v4 = iface.ips.iter().find_map(|n| match n.ip() {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => None,
    });
    let v6 = iface.ips.iter().find_map(|n| match n.ip() {
        IpAddr::V6(a) if !a.is_unicast_link_local() => Some(a),
        _ => None,
    });
    let mut frames = Vec::new();
    for ip in &w.ips {
        match ip {
            IpAddr::V4(a) => {
                let src: Ipv4Addr = v4.with_context(|| format!("{} has no IPv4 address", w.interface))?;
                frames.push(who_has(me, src, *a));
            }
            IpAddr::V6(a) => {
                let src = v6.with_context(|| format!("{} has no global IPv6 address", w.interface))?;
                frames.push(solicitation(me, src, *a));
            }
        }
    }
    if frames.is_empty() {
        bail!("no address to watch");
    }
    let config = pnet_datalink::Config { read_timeout: Some(Duration::from_millis(20)), ..Default::default() };
    let (mut tx, mut rx) = match pnet_datalink::channel(&iface, config).context("opening a raw socket (needs root)")? {
        Channel::Ethernet(tx, rx) => (tx, rx),
        _ => bail!("{} is not an Ethernet interface", w.interface),
    };
    let sent = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let (s, d, st) = (sent.clone(), done.clone(), stop.clone());
    let (interval, duration) = (w.interval, w.duration);
    let sender = std::thread::spawn(move || {
        let start = Instant::now();
        let mut next = start;
        while start.elapsed() < duration && !st.load(Ordering::Relaxed) {
            for f in &frames {
                // A full queue or a down link loses a request; the next one follows.
                let _ = tx.send_to(f, None);
            }
            s.fetch_add(1, Ordering::Relaxed);
            next += interval;
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        std::thread::sleep(Duration::from_millis(100));
        d.store(true, Ordering::Relaxed);
    });
    let watched: std::collections::BTreeSet<IpAddr> = w.ips.iter().copied().collect();
    let mut runs = Runs::new(w.keep);
    while !done.load(Ordering::Relaxed) {
        let frame = match rx.next() {
            Ok(f) => f,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock) => continue,
            Err(e) => return Err(e).context("receiving"),
        };
        if let Some((ip, mac)) = answer(frame, me).filter(|(ip, _)| watched.contains(ip)) {
            runs.add(Reply { at_us: now_us(), ip, mac });
        }
    }
    let _ = sender.join();
    Ok(runs.finish(sent.load(Ordering::Relaxed)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 6] = [2, 0, 0, 0, 0, 0x11];
    const B: [u8; 6] = [2, 0, 0, 0, 0, 0x12];

    fn ip() -> IpAddr {
        "192.0.2.200".parse().unwrap()
    }

    /// Replies of `mac` every 5 ms from `from` to `to` (ms).
    fn every5(mac: [u8; 6], from: u64, to: u64) -> Vec<Reply> {
        (from..=to).step_by(5).map(|t| Reply { at_us: t * 1000, ip: ip(), mac }).collect()
    }

    fn summarize(mut replies: Vec<Reply>) -> Summary {
        replies.sort_by_key(|r| r.at_us);
        let mut runs = Runs::new(Duration::from_millis(20));
        replies.into_iter().for_each(|r| runs.add(r));
        runs.finish(0)
    }

    #[test]
    fn a_clean_takeover_is_a_change_without_overlap() {
        let mut r = every5(A, 0, 1000);
        r.extend(every5(B, 1900, 3000));
        let s = summarize(r);
        assert!(s.overlaps.is_empty(), "{:?}", s.overlaps);
        assert_eq!(s.changes.len(), 1);
        assert_eq!(s.changes[0].silence_us, 900_000);
        assert_eq!(s.changes[0].from, mac_string(A));
    }

    #[test]
    fn two_answering_at_once_is_an_overlap_with_its_duration() {
        let mut r = every5(A, 0, 1000);
        r.extend(every5(B, 900, 2000));
        let s = summarize(r);
        assert_eq!(s.overlaps.len(), 1);
        assert_eq!(s.overlaps[0].duration_us, 100_000);
        assert_eq!(s.split_brain_windows().len(), 1);
        assert_eq!(s.changes.len(), 1);
    }

    #[test]
    fn a_short_overlap_is_no_split_brain_and_a_lone_reply_is_none() {
        let mut r = every5(A, 0, 1000);
        r.extend(every5(B, 990, 2000));
        // Another MAC answering once, inside A's run: no span, no overlap.
        r.push(Reply { at_us: 500_000 + 1, ip: ip(), mac: [2, 0, 0, 0, 0, 0x13] });
        let s = summarize(r);
        assert_eq!(s.overlaps.len(), 1);
        assert_eq!(s.overlaps[0].duration_us, 10_000);
        assert!(s.split_brain_windows().is_empty());
    }

    #[test]
    fn a_flap_back_is_two_changes() {
        let mut r = every5(A, 0, 1000);
        r.extend(every5(B, 1500, 3000));
        r.extend(every5(A, 3500, 4000));
        let s = summarize(r);
        assert_eq!(s.changes.len(), 2, "{:?}", s.changes);
        assert!(s.overlaps.is_empty());
    }

    #[test]
    fn answers_are_told_from_requests_and_gratuitous_packets() {
        let me = MacAddr::new(2, 0, 0, 0, 0, 0x64);
        let target: std::net::Ipv6Addr = "2001:db8:1::c8".parse().unwrap();
        let ns = solicitation(me, "2001:db8:1::100".parse().unwrap(), target);
        assert_eq!(answer(&ns, me), None);
        let parsed = ferrolb_speaker::l2::ndp::parse_solicitation(&ns).expect("the speaker parses our NS");
        assert_eq!(parsed.target, target);
        let speaker = MacAddr::new(2, 0, 0, 0, 0, 0x11);
        let na = ferrolb_speaker::l2::ndp::reply(&ns, speaker, |t| t == target).expect("a speaker answers it");
        assert_eq!(answer(&na, me), Some((IpAddr::V6(target), speaker.octets())));
        // An unsolicited NA (to all nodes) is no answer.
        assert_eq!(answer(&ferrolb_speaker::l2::ndp::unsolicited(speaker, target), me), None);
        let arp = who_has(me, Ipv4Addr::new(192, 0, 2, 100), Ipv4Addr::new(192, 0, 2, 200));
        let reply = ferrolb_speaker::l2::arp::reply(&arp, speaker, |_| true).expect("answered");
        assert_eq!(answer(&reply, me), Some(("192.0.2.200".parse().unwrap(), speaker.octets())));
        assert_eq!(answer(&arp, me), None);
    }
}

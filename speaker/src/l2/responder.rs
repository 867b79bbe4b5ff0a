//! The socket side of layer-2 announcement: one raw (AF_PACKET) channel per interface that
//! answers ARP requests and Neighbor Solicitations for the addresses this node announces, and
//! sends gratuitous ARP / unsolicited Neighbor Advertisements when it takes an address.
//!
//! ```text
//!  link ──> kernel: BPF filter (l2::filter) ──> only ARP requests and NS ──> thread per interface
//!            (not promiscuous)                                                  │
//!                 verdict (pure): ours? valid sender? within the asker's rate (l2::limit)?
//!                                                     │ answer           │ drop (counted)
//!                                                     └──> send          └──> L2Event::Dropped
//! ```
//!
//! The decision "answer this frame, and with what" is [`verdict`] over `arp::reply` /
//! `ndp::reply` (pure); this file otherwise only moves frames. Reading blocks, so each interface
//! has a thread of its own that wakes every 100 ms to see whether it should stop; it never
//! blocks the async runtime. The socket is not promiscuous, and its filter keeps every other
//! frame of the link (a flood of unrelated traffic) in the kernel.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::IntoRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pnet_datalink::MacAddr;
use pnet_datalink::{Channel, DataLinkReceiver, DataLinkSender, NetworkInterface};

use super::limit::RateLimit;
use super::{arp, filter, ndp};

/// What happened on the wire, for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L2Event {
    /// A who-has / Neighbor Solicitation for an address we announce.
    Request(IpAddr),
    /// We answered it.
    Response(IpAddr),
    /// We sent a gratuitous ARP / unsolicited NA.
    Gratuitous(IpAddr),
    /// A request for an address we announce that we did not answer, and why.
    Dropped(IpAddr, DropReason),
}

/// Why a request for an announced address got no answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The asker is not one host: a multicast, broadcast or zero Ethernet source, ARP sender or
    /// NDP source link-layer address.
    InvalidSender,
    /// The asker had more answers than its rate allows (`l2::limit`).
    RateLimited,
}

impl DropReason {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::InvalidSender => "invalid_sender",
            DropReason::RateLimited => "rate_limited",
        }
    }
}

/// What to do with one frame read from the socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not a request for an address announced here, or our own: nothing, and nothing counted.
    Ignore,
    /// Send `frame`, the answer to a request for `ip`.
    Answer { ip: IpAddr, frame: Vec<u8> },
    /// A request for `ip` left unanswered.
    Drop { ip: IpAddr, reason: DropReason },
}

/// The verdict on `frame` for a responder with `mac` answering for `table`, at `now`; an
/// answer is taken from its asker's allowance in `limit`.
pub fn verdict(frame: &[u8], mac: MacAddr, table: &Announced, limit: &mut RateLimit, now: Instant) -> Verdict {
    let (ip, own, valid, asker) = if let Some(r) = arp::parse_request(frame).filter(|r| table.v4.contains(&r.target_ip))
    {
        (IpAddr::V4(r.target_ip), r.sender_mac == mac, r.valid_sender(), r.sender_mac)
    } else if let Some(s) = ndp::parse_solicitation(frame).filter(|s| table.v6.contains(&s.target)) {
        (IpAddr::V6(s.target), s.eth_source == mac, s.valid_sender(), s.asker())
    } else {
        return Verdict::Ignore;
    };
    if own {
        return Verdict::Ignore;
    }
    if !valid {
        return Verdict::Drop { ip, reason: DropReason::InvalidSender };
    }
    if !limit.allow(asker, now) {
        return Verdict::Drop { ip, reason: DropReason::RateLimited };
    }
    let answer = match ip {
        IpAddr::V4(_) => arp::reply(frame, mac, |a| table.v4.contains(&a)),
        IpAddr::V6(_) => ndp::reply(frame, mac, |a| table.v6.contains(&a)),
    };
    match answer {
        Some(frame) => Verdict::Answer { ip, frame },
        None => Verdict::Ignore,
    }
}

/// Called for every [`L2Event`], from the responder threads.
pub type EventSink = Arc<dyn Fn(L2Event) + Send + Sync>;

/// The addresses this node answers for, on one interface.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Announced {
    pub v4: BTreeSet<Ipv4Addr>,
    pub v6: BTreeSet<Ipv6Addr>,
}

impl Announced {
    pub fn insert(&mut self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => self.v4.insert(a),
            IpAddr::V6(a) => self.v6.insert(a),
        }
    }
}

/// An interface that can answer: up, with a MAC, ARP-capable, not loopback.
pub fn usable_interfaces() -> Vec<NetworkInterface> {
    pnet_datalink::interfaces()
        .into_iter()
        .filter(|i| i.is_up() && !i.is_loopback() && i.mac.is_some_and(|m| m != MacAddr::zero()))
        .collect()
}

/// Answers on one interface until stopped.
pub struct Responder {
    pub interface: String,
    pub mac: MacAddr,
    index: u32,
    table: Arc<RwLock<Announced>>,
    tx: Arc<Mutex<Box<dyn DataLinkSender>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    events: EventSink,
    /// Sockets holding this interface in the solicited-node multicast group of each announced
    /// IPv6 address (the kernel filters multicast frames otherwise).
    groups: Mutex<BTreeMap<Ipv6Addr, socket2::Socket>>,
    /// Frames the kernel handed to the thread: what the filter let through.
    frames_read: Arc<AtomicU64>,
}

/// The raw channel on `iface`: not promiscuous, with the filter of `l2::filter`.
///
/// The socket is opened with protocol 0, so it receives nothing until pnet binds it to the
/// interface (with ETH_P_ALL); the filter is attached before that, so no frame ever reaches user
/// space unfiltered and there is nothing queued from before to drain.
fn open(iface: &NetworkInterface) -> io::Result<(Box<dyn DataLinkSender>, Box<dyn DataLinkReceiver>)> {
    let socket = socket2::Socket::new(socket2::Domain::PACKET, socket2::Type::RAW, None)?;
    socket.attach_filter(&filter::socket_filter())?;
    let cfg = pnet_datalink::Config {
        read_timeout: Some(Duration::from_millis(100)),
        promiscuous: false,
        // pnet owns (and closes) the socket from here, also when binding fails.
        socket_fd: Some(socket.into_raw_fd()),
        ..Default::default()
    };
    match pnet_datalink::channel(iface, cfg)? {
        Channel::Ethernet(tx, rx) => Ok((tx, rx)),
        _ => Err(io::Error::other(format!("{}: not an Ethernet channel", iface.name))),
    }
}

impl Responder {
    /// Opens the raw channel on `iface` and starts answering for what `set` will say.
    pub fn start(iface: &NetworkInterface, events: EventSink) -> io::Result<Self> {
        let mac = iface.mac.ok_or_else(|| io::Error::other(format!("{} has no MAC address", iface.name)))?;
        let (tx, mut rx) = open(iface)?;
        let table: Arc<RwLock<Announced>> = Arc::default();
        let tx = Arc::new(Mutex::new(tx));
        let stop = Arc::new(AtomicBool::new(false));
        let frames_read = Arc::new(AtomicU64::new(0));
        let (t_table, t_tx, t_stop, t_events, t_read) =
            (table.clone(), tx.clone(), stop.clone(), events.clone(), frames_read.clone());
        let thread = std::thread::Builder::new().name(format!("l2-{}", iface.name)).spawn(move || {
            let mut limit = RateLimit::from_env();
            while !t_stop.load(Ordering::Relaxed) {
                let frame = match rx.next() {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::TimedOut || e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "reading frames");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                t_read.fetch_add(1, Ordering::Relaxed);
                let verdict = {
                    let Ok(t) = t_table.read() else { continue };
                    verdict(frame, mac, &t, &mut limit, Instant::now())
                };
                match verdict {
                    Verdict::Ignore => {}
                    Verdict::Drop { ip, reason } => {
                        t_events(L2Event::Request(ip));
                        t_events(L2Event::Dropped(ip, reason));
                    }
                    Verdict::Answer { ip, frame } => {
                        t_events(L2Event::Request(ip));
                        if let Ok(mut tx) = t_tx.lock()
                            && let Some(Ok(())) = tx.send_to(&frame, None)
                        {
                            t_events(L2Event::Response(ip));
                        }
                    }
                }
            }
        })?;
        Ok(Responder {
            interface: iface.name.clone(),
            mac,
            index: iface.index,
            table,
            tx,
            stop,
            thread: Some(thread),
            events,
            groups: Mutex::new(BTreeMap::new()),
            frames_read,
        })
    }

    /// Answers for exactly `want` from now on; returns the addresses newly taken, for which
    /// the caller sends gratuitous announcements. Dropped addresses stop being answered at once.
    pub fn set(&self, want: &Announced) -> Vec<IpAddr> {
        let mut taken = Vec::new();
        if let Ok(mut t) = self.table.write() {
            taken.extend(want.v4.difference(&t.v4).map(|a| IpAddr::V4(*a)));
            taken.extend(want.v6.difference(&t.v6).map(|a| IpAddr::V6(*a)));
            *t = want.clone();
        }
        if let Ok(mut groups) = self.groups.lock() {
            groups.retain(|ip, _| want.v6.contains(ip));
            for ip in &want.v6 {
                if groups.contains_key(ip) {
                    continue;
                }
                match join_solicited_node(*ip, self.index) {
                    Ok(s) => {
                        groups.insert(*ip, s);
                    }
                    Err(e) => {
                        tracing::warn!(%ip, interface = %self.interface, error = %e, "joining the solicited-node group")
                    }
                }
            }
        }
        taken
    }

    /// Stops answering for every address not in `keep`; takes nothing new.
    pub fn keep_only(&self, keep: &Announced) {
        if let Ok(mut t) = self.table.write() {
            t.v4.retain(|a| keep.v4.contains(a));
            t.v6.retain(|a| keep.v6.contains(a));
        }
    }

    /// One round of gratuitous ARP (request and reply) or one unsolicited NA for `ip`.
    pub fn announce(&self, ip: IpAddr) {
        let frames: Vec<Vec<u8>> = match ip {
            IpAddr::V4(a) => arp::gratuitous(self.mac, a).into(),
            IpAddr::V6(a) => vec![ndp::unsolicited(self.mac, a)],
        };
        if let Ok(mut tx) = self.tx.lock() {
            for f in frames {
                if let Some(Ok(())) = tx.send_to(&f, None) {
                    (self.events)(L2Event::Gratuitous(ip));
                }
            }
        }
    }

    /// Frames read from the socket so far: only those the filter let through.
    pub fn frames_read(&self) -> u64 {
        self.frames_read.load(Ordering::Relaxed)
    }

    /// Whether `ip` is answered here now.
    pub fn answers(&self, ip: IpAddr) -> bool {
        self.table.read().is_ok_and(|t| match ip {
            IpAddr::V4(a) => t.v4.contains(&a),
            IpAddr::V6(a) => t.v6.contains(&a),
        })
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A socket that keeps interface `index` in the solicited-node multicast group of `ip`.
fn join_solicited_node(ip: Ipv6Addr, index: u32) -> io::Result<socket2::Socket> {
    let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    s.join_multicast_v6(&ndp::solicited_node(ip), index)?;
    Ok(s)
}

/// When to repeat the announcements after taking an address: at once, then for a few seconds,
/// so a client that missed one (or a switch that was busy) still learns the new owner.
pub const ANNOUNCE_SCHEDULE: &[Duration] = &[
    Duration::ZERO,
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
];

#[cfg(test)]
mod tests {
    use super::*;

    const MINE: MacAddr = MacAddr(0x02, 0, 0, 0, 0, 0x11);
    const CLIENT: MacAddr = MacAddr(0x02, 0, 0, 0, 0, 0x64);
    const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
    const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x100);
    const LB: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 200);
    const LB6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0xc8);

    fn table() -> Announced {
        let mut t = Announced::default();
        t.insert(IpAddr::V4(LB));
        t.insert(IpAddr::V6(LB6));
        t
    }

    #[test]
    fn answers_requests_for_announced_addresses_only() {
        let (mut limit, now) = (RateLimit::default(), Instant::now());
        let who_has = arp::who_has(CLIENT, CLIENT_IP, LB);
        assert_eq!(
            verdict(&who_has, MINE, &table(), &mut limit, now),
            Verdict::Answer { ip: IpAddr::V4(LB), frame: arp::reply(&who_has, MINE, |_| true).unwrap() }
        );
        let ns = ndp::solicitation(CLIENT, CLIENT_IP6, LB6);
        assert_eq!(
            verdict(&ns, MINE, &table(), &mut limit, now),
            Verdict::Answer { ip: IpAddr::V6(LB6), frame: ndp::reply(&ns, MINE, |_| true).unwrap() }
        );
        let other = arp::who_has(CLIENT, CLIENT_IP, Ipv4Addr::new(192, 0, 2, 201));
        assert_eq!(verdict(&other, MINE, &table(), &mut limit, now), Verdict::Ignore);
        assert_eq!(verdict(&who_has, MINE, &Announced::default(), &mut limit, now), Verdict::Ignore);
        assert_eq!(verdict(&who_has, CLIENT, &table(), &mut limit, now), Verdict::Ignore, "our own request");
        assert_eq!(verdict(&[0u8; 3], MINE, &table(), &mut limit, now), Verdict::Ignore);
    }

    #[test]
    fn group_senders_are_dropped_and_counted_as_such() {
        let (mut limit, now) = (RateLimit::default(), Instant::now());
        for sender in [MacAddr::broadcast(), MacAddr(0x01, 0, 0x5e, 0, 0, 1), MacAddr::zero()] {
            let ip = IpAddr::V4(LB);
            let frame = arp::who_has(sender, CLIENT_IP, LB);
            let want = Verdict::Drop { ip, reason: DropReason::InvalidSender };
            assert_eq!(verdict(&frame, MINE, &table(), &mut limit, now), want, "{sender}");
            let frame = ndp::solicitation(sender, CLIENT_IP6, LB6);
            let want = Verdict::Drop { ip: IpAddr::V6(LB6), reason: DropReason::InvalidSender };
            assert_eq!(verdict(&frame, MINE, &table(), &mut limit, now), want, "{sender}");
        }
        assert!(limit.is_empty(), "invalid senders take no place in the rate table");
    }

    #[test]
    fn a_flooding_asker_is_limited_and_others_are_not() {
        let (mut limit, now) = (RateLimit::default(), Instant::now());
        let flood = arp::who_has(CLIENT, CLIENT_IP, LB);
        let verdicts: Vec<Verdict> = (0..5000).map(|_| verdict(&flood, MINE, &table(), &mut limit, now)).collect();
        let answered = verdicts.iter().filter(|v| matches!(v, Verdict::Answer { .. })).count();
        assert_eq!(answered, super::super::limit::BURST as usize);
        assert!(
            verdicts[answered..]
                .iter()
                .all(|v| *v == Verdict::Drop { ip: IpAddr::V4(LB), reason: DropReason::RateLimited })
        );
        let other = arp::who_has(MacAddr(0x02, 0, 0, 0, 0, 0x65), CLIENT_IP, LB);
        assert!(matches!(verdict(&other, MINE, &table(), &mut limit, now), Verdict::Answer { .. }));
        let later = now + Duration::from_secs(1);
        assert!(matches!(verdict(&flood, MINE, &table(), &mut limit, later), Verdict::Answer { .. }));
    }
}

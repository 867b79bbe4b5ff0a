//! The socket side of layer-2 announcement: one raw (AF_PACKET) channel per interface that
//! answers ARP requests and Neighbor Solicitations for the addresses this node announces, and
//! sends gratuitous ARP / unsolicited Neighbor Advertisements when it takes an address.
//!
//! The decision "answer this frame, and with what" is `arp::reply` / `ndp::reply` (pure); this
//! file only moves frames. Reading blocks, so each interface has a thread of its own that
//! wakes every 100 ms to see whether it should stop; it never blocks the async runtime.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use pnet_datalink::MacAddr;
use pnet_datalink::{Channel, DataLinkSender, NetworkInterface};

use super::{arp, ndp};

/// What happened on the wire, for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L2Event {
    /// A who-has / Neighbor Solicitation for an address we announce.
    Request(IpAddr),
    /// We answered it.
    Response(IpAddr),
    /// We sent a gratuitous ARP / unsolicited NA.
    Gratuitous(IpAddr),
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
}

impl Responder {
    /// Opens the raw channel on `iface` and starts answering for what `set` will say.
    pub fn start(iface: &NetworkInterface, events: EventSink) -> io::Result<Self> {
        let mac = iface.mac.ok_or_else(|| io::Error::other(format!("{} has no MAC address", iface.name)))?;
        let cfg = pnet_datalink::Config { read_timeout: Some(Duration::from_millis(100)), ..Default::default() };
        let (tx, mut rx) = match pnet_datalink::channel(iface, cfg)? {
            Channel::Ethernet(tx, rx) => (tx, rx),
            _ => return Err(io::Error::other(format!("{}: not an Ethernet channel", iface.name))),
        };
        let table: Arc<RwLock<Announced>> = Arc::default();
        let tx = Arc::new(Mutex::new(tx));
        let stop = Arc::new(AtomicBool::new(false));
        let (t_table, t_tx, t_stop, t_events) = (table.clone(), tx.clone(), stop.clone(), events.clone());
        let thread = std::thread::Builder::new().name(format!("l2-{}", iface.name)).spawn(move || {
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
                let (answer, ip) = {
                    let Ok(t) = t_table.read() else { continue };
                    if let Some(req) = arp::parse_request(frame).filter(|r| t.v4.contains(&r.target_ip)) {
                        (arp::reply(frame, mac, |ip| t.v4.contains(&ip)), IpAddr::V4(req.target_ip))
                    } else if let Some(ns) = ndp::parse_solicitation(frame).filter(|s| t.v6.contains(&s.target)) {
                        (ndp::reply(frame, mac, |ip| t.v6.contains(&ip)), IpAddr::V6(ns.target))
                    } else {
                        continue;
                    }
                };
                t_events(L2Event::Request(ip));
                if let Some(a) = answer
                    && let Ok(mut tx) = t_tx.lock()
                    && let Some(Ok(())) = tx.send_to(&a, None)
                {
                    t_events(L2Event::Response(ip));
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

//! `ferrolb-lab arp-probe`: who answers ARP for an address, and how fast; the client's view of
//! a failover. It broadcasts a who-has for the address at a steady rate (as a client whose cache
//! entry went stale does, but without `arping`'s one-second floor) and prints a line per reply:
//!
//! ```text
//!   <unix time, s>  <sender MAC>  <µs since the latest request, or "gratuitous">
//!   ...
//!   sent <n>
//! ```
//!
//! Replies addressed to the broadcast MAC are a speaker's gratuitous announcements: printed, so
//! a takeover shows at the instant the client's cache would learn it, but with no round trip.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use ferrolb_speaker::l2::arp::who_has;
use pnet_datalink::{Channel, MacAddr};
use pnet_packet::Packet;
use pnet_packet::arp::{ArpOperations, ArpPacket};
use pnet_packet::ethernet::{EtherTypes, EthernetPacket};

/// What to probe, how often, for how long.
#[derive(Clone, Debug)]
pub struct Probe {
    pub ip: Ipv4Addr,
    pub interface: String,
    pub interval: Duration,
    /// Stop after this many requests (and a last 200 ms for late replies)…
    pub count: Option<u64>,
    /// …or after this long; with neither, at SIGINT/SIGTERM (the process is simply killed).
    pub duration: Option<Duration>,
}

/// `(sender MAC, gratuitous)` if `frame` is an ARP reply for `ip`.
fn reply_for(frame: &[u8], ip: Ipv4Addr) -> Option<(MacAddr, bool)> {
    let eth = EthernetPacket::new(frame)?;
    if eth.get_ethertype() != EtherTypes::Arp {
        return None;
    }
    let arp = ArpPacket::new(eth.payload())?;
    (arp.get_operation() == ArpOperations::Reply && arp.get_sender_proto_addr() == ip)
        .then(|| (arp.get_sender_hw_addr(), eth.get_destination() == MacAddr::broadcast()))
}

/// Runs the probe, printing to stdout as it goes.
pub fn run(p: Probe) -> Result<()> {
    let iface = pnet_datalink::interfaces()
        .into_iter()
        .find(|i| i.name == p.interface)
        .with_context(|| format!("no interface {}", p.interface))?;
    let my_mac = iface.mac.with_context(|| format!("{} has no MAC", p.interface))?;
    let my_ip = iface
        .ips
        .iter()
        .find_map(|n| match n.ip() {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        })
        .with_context(|| format!("{} has no IPv4 address", p.interface))?;
    let config = pnet_datalink::Config { read_timeout: Some(Duration::from_millis(20)), ..Default::default() };
    let (mut tx, mut rx) = match pnet_datalink::channel(&iface, config).context("opening a raw socket (needs root)")? {
        Channel::Ethernet(tx, rx) => (tx, rx),
        _ => bail!("{} is not an Ethernet interface", p.interface),
    };
    let frame = who_has(my_mac, my_ip, p.ip);
    let last_sent = Arc::new(Mutex::new(Instant::now()));
    let sent = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let (ls, s, d) = (last_sent.clone(), sent.clone(), done.clone());
    let sender = std::thread::spawn(move || {
        let start = Instant::now();
        let mut next = start;
        loop {
            if p.count.is_some_and(|c| s.load(Ordering::Relaxed) >= c)
                || p.duration.is_some_and(|t| start.elapsed() >= t)
            {
                break;
            }
            if let Ok(mut t) = ls.lock() {
                *t = Instant::now();
            }
            if let Some(Err(e)) = tx.send_to(&frame, None) {
                eprintln!("arp-probe: sending: {e}");
            }
            s.fetch_add(1, Ordering::Relaxed);
            // A fixed schedule, so the rate holds even when one sleep runs long.
            next += p.interval;
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        std::thread::sleep(Duration::from_millis(200));
        d.store(true, Ordering::Relaxed);
    });
    let mut out = std::io::LineWriter::new(std::io::stdout());
    while !done.load(Ordering::Relaxed) {
        let frame = match rx.next() {
            Ok(f) => f,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock) => continue,
            Err(e) => return Err(e).context("receiving"),
        };
        let Some((mac, gratuitous)) = reply_for(frame, p.ip) else { continue };
        let at = Instant::now();
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        let rtt = if gratuitous {
            "gratuitous".to_string()
        } else {
            let t = last_sent.lock().map(|t| *t).unwrap_or(at);
            at.saturating_duration_since(t).as_micros().to_string()
        };
        writeln!(out, "{wall:.6} {mac} {rtt}")?;
    }
    let _ = sender.join();
    writeln!(out, "sent {}", sent.load(Ordering::Relaxed))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pnet_packet::MutablePacket;
    use pnet_packet::arp::MutableArpPacket;
    use pnet_packet::ethernet::MutableEthernetPacket;

    #[test]
    fn a_request_is_a_broadcast_who_has() {
        let f = who_has(MacAddr::new(2, 0, 0, 0, 0, 1), Ipv4Addr::new(192, 0, 2, 100), Ipv4Addr::new(192, 0, 2, 200));
        let eth = EthernetPacket::new(&f).unwrap();
        assert_eq!(eth.get_destination(), MacAddr::broadcast());
        let arp = ArpPacket::new(eth.payload()).unwrap();
        assert_eq!(arp.get_operation(), ArpOperations::Request);
        assert_eq!(arp.get_target_proto_addr(), Ipv4Addr::new(192, 0, 2, 200));
        // Our own request is no reply.
        assert_eq!(reply_for(&f, Ipv4Addr::new(192, 0, 2, 200)), None);
    }

    #[test]
    fn replies_are_told_apart_from_gratuitous_ones() {
        let mac = MacAddr::new(2, 0, 0, 0, 0, 2);
        let ip = Ipv4Addr::new(192, 0, 2, 200);
        let mut f = who_has(mac, ip, ip);
        {
            let mut eth = MutableEthernetPacket::new(&mut f).unwrap();
            let mut arp = MutableArpPacket::new(eth.payload_mut()).unwrap();
            arp.set_operation(ArpOperations::Reply);
        }
        assert_eq!(reply_for(&f, ip), Some((mac, true)));
        MutableEthernetPacket::new(&mut f).unwrap().set_destination(MacAddr::new(2, 0, 0, 0, 0, 1));
        assert_eq!(reply_for(&f, ip), Some((mac, false)));
        assert_eq!(reply_for(&f, Ipv4Addr::new(192, 0, 2, 201)), None);
        assert_eq!(reply_for(&f[..20], ip), None);
    }
}

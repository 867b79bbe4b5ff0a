//! Whether this node's own link to the LAN is up: the interface that holds the node address
//! (where the membership talks) is administratively up and has a carrier.
//!
//! A speaker whose link is down is cut off, not the last one alive: the membership will soon
//! tell it that every peer died, and it would win every address. So while the link is down it
//! announces nothing, and when the link comes back it first rejoins (announcer.rs) before it
//! elects again; otherwise it would answer beside the nodes that took its addresses over (a
//! split brain, measured by `ferrolb-lab chaos`).
//!
//! Polled every 100 ms (one `getifaddrs`); issue 15 moves interfaces to rtnetlink events.

use std::net::IpAddr;
use std::time::Duration;

use pnet_datalink::NetworkInterface;
use tokio::sync::watch;

/// How often the link is looked at.
pub const POLL: Duration = Duration::from_millis(100);

/// What the interfaces say about the link holding `ip`: `Some(up)` when an interface holds it,
/// `None` when none does.
pub fn state(interfaces: &[NetworkInterface], ip: IpAddr) -> Option<bool> {
    interfaces.iter().find(|i| i.ips.iter().any(|n| n.ip() == ip)).map(|i| i.is_up() && i.is_running())
}

/// Folds the polls: an address never seen on any interface says nothing (the speaker may be
/// told another address to listen on; it keeps announcing), but once seen, losing it is a
/// down link (IPv6 addresses leave an interface that goes down).
#[derive(Debug, Default)]
pub struct Tracker {
    seen: bool,
}

impl Tracker {
    pub fn up(&mut self, state: Option<bool>) -> bool {
        match state {
            Some(up) => {
                self.seen = true;
                up
            }
            None => !self.seen,
        }
    }
}

/// Watches the link holding `ip` until the receiver is dropped; `true` is up.
pub fn watch(ip: IpAddr) -> watch::Receiver<bool> {
    let mut tracker = Tracker::default();
    let (tx, rx) = watch::channel(tracker.up(state(&pnet_datalink::interfaces(), ip)));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let up = tracker.up(state(&pnet_datalink::interfaces(), ip));
            if *tx.borrow() != up {
                tracing::warn!(%ip, up, "the link holding the node address changed");
                if tx.send(up).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(ip: &str, flags: u32) -> NetworkInterface {
        NetworkInterface {
            name: "eth0".into(),
            description: String::new(),
            index: 2,
            mac: None,
            ips: vec![format!("{ip}/24").parse().unwrap()],
            flags,
        }
    }

    /// IFF_UP and IFF_RUNNING of <net/if.h>.
    const UP: u32 = 0x1;
    const RUNNING: u32 = 0x40;

    #[test]
    fn up_needs_both_flags_on_the_interface_holding_the_address() {
        let ip: IpAddr = "192.0.2.11".parse().unwrap();
        assert_eq!(state(&[iface("192.0.2.11", UP | RUNNING)], ip), Some(true));
        assert_eq!(state(&[iface("192.0.2.11", UP)], ip), Some(false), "no carrier");
        assert_eq!(state(&[iface("192.0.2.11", RUNNING)], ip), Some(false), "set down");
        assert_eq!(state(&[iface("192.0.2.12", UP | RUNNING)], ip), None);
    }

    #[test]
    fn a_lost_address_is_down_only_once_it_was_seen() {
        let mut t = Tracker::default();
        assert!(t.up(None), "never seen: keep announcing");
        assert!(t.up(Some(true)));
        assert!(!t.up(None), "gone from its interface: down");
        assert!(!t.up(Some(false)));
        assert!(t.up(Some(true)));
    }
}

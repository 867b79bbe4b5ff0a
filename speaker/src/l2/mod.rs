//! Layer-2 announcement: the ARP (IPv4) and NDP (IPv6) packet logic, pure over bytes.

pub mod arp;
pub mod filter;
pub mod limit;
pub mod links;
pub mod ndp;
pub mod responder;

use pnet_base::MacAddr;

/// Whether `mac` names one host: not a group (multicast or broadcast) and not zero. Requests
/// from anything else are never answered.
pub fn is_unicast(mac: MacAddr) -> bool {
    mac.is_unicast() && !mac.is_zero()
}

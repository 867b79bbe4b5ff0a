//! Layer-2 announcement: the ARP (IPv4) and NDP (IPv6) packet logic, pure over bytes.

pub mod arp;
pub mod ndp;
pub mod responder;

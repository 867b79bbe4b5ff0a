//! The ferrolb speaker: one per node. It decides which node announces each LoadBalancer
//! address (`election`), answers ARP and NDP for the addresses this node announces (`l2`),
//! and programs nftables so that ClusterIP, NodePort and LoadBalancer traffic reaches the
//! endpoints (`dataplane`).
//!
//! ```text
//!   cluster facts ──> election (pure) ──> "this node announces 192.0.2.200"
//!                                               │
//!   frames on the wire ──> l2::arp / l2::ndp (pure decide/build) ──> replies, gratuitous
//!   Services + EndpointSlices ──> dataplane::model ──> dataplane::render (pure) ──> nft -f -
//! ```
//!
//! The pure parts are here; the I/O shells around them (sockets, membership, the nft runner,
//! the Kubernetes watches) are built on top.

#![forbid(unsafe_code)]

pub mod announcer;
pub mod dataplane;
pub mod election;
pub mod facts;
pub mod l2;
pub mod link;
pub mod membership;
pub mod metrics;
mod netlink;
pub mod status;
pub mod watch;

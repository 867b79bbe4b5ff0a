//! The nftables data plane: a model of what to forward, and its rendering as one `nft -f -`
//! transaction.

pub mod model;
pub mod render;
pub mod runner;
pub mod source;
pub mod metrics;
pub mod healthcheck;

//! The nftables data plane: a model of what to forward, its rendering as one `nft -f -`
//! transaction, and the loop that keeps the kernel in step with the cluster.
//!
//! ```text
//!   Services, EndpointSlices, Nodes ──> source (pure) ──> model ──> render (pure) ──> runner ──> nft -f -
//!                                                           ├──> healthcheck (healthCheckNodePort servers)
//!                                                           ├──> conntrack (stale UDP flows)
//!                                                           └──> events (Warning Events on Services)
//!   claims (pure): which Service may use which destination, applied by source
//!   sync: the loop around them; metrics: what it reports
//! ```

pub mod claims;
pub mod conntrack;
pub mod events;
pub mod handover;
pub mod healthcheck;
pub mod metrics;
pub mod model;
pub mod nft;
pub mod render;
pub mod runner;
pub mod source;
pub mod sync;
pub mod tracker;

pub use sync::{DataplaneSettings, run};

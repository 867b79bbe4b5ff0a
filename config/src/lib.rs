//! ferrolb's configuration: the `IPAddressPool` and `L2Advertisement` specs users write, checked and
//! normalized into values the controller and the speaker can use without re-checking anything.
//!
//! ```text
//!  IPAddressPool specs ---- build_pools ----> Pools
//!   (PoolInput: name,       oldest first       pools:    name -> Pool
//!    labels, created)       per pool: parse,     ranges (merged, sorted), autoAssign,
//!                           selectors, overlap   avoidBuggyIPs, ServiceAllocation (Selectors)
//!                                              rejected: name -> [ConfigError]  (each names the address)
//!                                                  ^
//!  L2Advertisement specs -- build_advertisements   | applies_to_pool(pool): by name or label
//!                                 |                |
//!                                 +------> Advertisement -- applies_to_node(node labels)
//! ```
//!
//! Also the few readings of Kubernetes objects every component must share: [`ServiceKey`], the
//! endpoint conditions' defaults ([`EndpointState`]) and a Node's [`internal_ips`].
//!
//! Pure: no I/O and no Kubernetes client, so every rule is tested with plain values. A bad pool is
//! rejected alone, with errors a user can act on; the others keep working. When two pools overlap,
//! the older keeps its addresses and the newer is rejected, so adding a pool can never take
//! addresses away from services that already have them.
#![forbid(unsafe_code)]

mod advertisement;
mod class;
mod endpoint;
mod error;
mod family;
mod node;
mod pool;
mod range;
mod selector;
mod service_key;

pub use advertisement::{Advertisement, build_advertisements};
pub use class::ClassPolicy;
pub use endpoint::EndpointState;
pub use error::ConfigError;
pub use family::Family;
pub use node::{internal_ip_like, internal_ips};
pub use pool::{Pool, PoolInput, Pools, ServiceAllocation, build_pools};
pub use range::AddressRange;
pub use selector::Selector;
pub use service_key::ServiceKey;

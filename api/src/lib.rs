//! ferrolb's API: the custom resources users write, the annotations they put on Services, and the
//! generated CRD manifests.
//!
//! ```text
//!   IPAddressPool ----------------------+   "which addresses may be handed out, to whom"
//!     spec.addresses, serviceAllocation |   (controller reads; reports counts and Valid in status)
//!          ^                            |
//!          | by name or label selector  v
//!   L2Advertisement              Service (type: LoadBalancer)
//!     "announce those pools        annotations: ferrolb.io/loadBalancerIPs, /address-pool,
//!      from these nodes and          /allow-shared-ip; controller writes
//!      interfaces"                   ferrolb.io/ip-allocated-from-pool
//!                                       |
//!                                       v
//!                                ServiceL2Status    "node-2 announces default/web on eth0"
//!                                  (written by the speaker)
//! ```
//!
//! Field names are MetalLB's `metallb.io/v1beta1` ones, so a MetalLB manifest ports by changing the
//! group; [`metallb`] holds the `metallb.io` kinds themselves, for `--metallb-compat`.
//!
//! Nothing here interprets the fields: turning a spec into address ranges and selectors, with
//! errors a user can act on, is `ferrolb-config`'s job. What *can* be checked at admission (an
//! address that is neither a CIDR, an IP nor a range of IPs) is in the schema, so a typo is refused
//! by `kubectl apply` rather than discovered later in a status condition.
#![forbid(unsafe_code)]

pub mod annotations;
pub mod backoff;
pub mod crds;
pub mod metallb;

mod advertisement;
mod pool;
mod service_status;

pub use advertisement::{L2Advertisement, L2AdvertisementSpec};
pub use pool::{
    ADDRESS_RULE, ADDRESS_RULE_MESSAGE, CONDITION_VALID, IPAddressPool, IPAddressPoolSpec, IPAddressPoolStatus,
    ServiceAllocation,
};
pub use service_status::{InterfaceInfo, ServiceL2Status, ServiceL2StatusSpec, ServiceL2StatusStatus};

/// The API group of ferrolb's own kinds.
pub const GROUP: &str = "ferrolb.io";
/// The one served (and stored) version of every kind.
pub const VERSION: &str = "v1beta1";

//! What can be wrong with a pool or an advertisement, worded for the person who wrote it.

/// A problem with one pool or advertisement. The controller puts the message in the object's
/// status and in an Event, so each says what is wrong with which entry and, where it isn't
/// obvious, what to do.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// An entry of `spec.addresses` that can't be read at all.
    #[error("address {address:?} is not a CIDR, an IP or a first-last range: {reason}")]
    Malformed { address: String, reason: String },

    /// A `first-last` range whose first address comes after its last.
    #[error("range {address} is reversed: its first address is after its last")]
    Reversed { address: String },

    /// A `first-last` range with an IPv4 end and an IPv6 end.
    #[error("range {address} mixes IPv4 and IPv6: its first and last address must be of one family")]
    MixedFamilies { address: String },

    /// `spec.addresses` is empty.
    #[error("the pool has no addresses: list at least one CIDR, IP or first-last range in spec.addresses")]
    NoAddresses,

    /// An entry of `spec.addresses` shares addresses with an older pool, which keeps them.
    #[error("{address} overlaps pool {other_pool:?} ({other_address})")]
    Overlap {
        /// The entry of this pool, as written.
        address: String,
        /// The older pool that keeps the shared addresses.
        other_pool: String,
        /// The entry of the other pool it overlaps, as written there.
        other_address: String,
    },

    /// A label selector that Kubernetes would not accept either.
    #[error("{field}: {reason}")]
    BadSelector {
        /// Where the selector is, such as `spec.serviceAllocation.namespaceSelectors[0]`.
        field: String,
        reason: String,
    },

    /// Two pools share a name (for example the same pool read from ferrolb.io and from metallb.io);
    /// the older one is used.
    #[error("another, older pool is also named {name:?}: pool names must be unique")]
    DuplicateName { name: String },
}

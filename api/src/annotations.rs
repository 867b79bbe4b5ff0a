//! Names users put on Services, and names ferrolb writes.
//!
//! Users coming from MetalLB keep their annotations: each user-set annotation is honoured in three
//! spellings, ferrolb's own first, then `metallb.io/` and the older `metallb.universe.tf/`.

use std::collections::BTreeMap;

/// A Service annotation a user sets, under ferrolb's name and the MetalLB names it also honours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceAnnotation {
    /// ferrolb's own spelling, the one to document and to put in messages.
    pub name: &'static str,
    /// MetalLB's spellings, newest first.
    pub metallb_names: [&'static str; 2],
}

impl ServiceAnnotation {
    /// Every spelling, in the order they are looked up.
    pub const fn spellings(&self) -> [&'static str; 3] {
        [self.name, self.metallb_names[0], self.metallb_names[1]]
    }

    /// The value of the first spelling present, with the spelling found (so a message about a bad
    /// value can name the annotation the user actually wrote).
    pub fn find<'a>(&self, annotations: &'a BTreeMap<String, String>) -> Option<(&'static str, &'a str)> {
        self.spellings().into_iter().find_map(|name| annotations.get(name).map(|value| (name, value.as_str())))
    }

    /// The value of the first spelling present: ferrolb.io, then metallb.io, then metallb.universe.tf.
    pub fn value<'a>(&self, annotations: &'a BTreeMap<String, String>) -> Option<&'a str> {
        self.find(annotations).map(|(_, value)| value)
    }
}

/// The addresses a service asks for, comma separated (one per family for dual-stack services).
pub const LOAD_BALANCER_IPS: ServiceAnnotation = ServiceAnnotation {
    name: "ferrolb.io/loadBalancerIPs",
    metallb_names: ["metallb.io/loadBalancerIPs", "metallb.universe.tf/loadBalancerIPs"],
};

/// The pool a service wants its addresses from.
pub const ADDRESS_POOL: ServiceAnnotation = ServiceAnnotation {
    name: "ferrolb.io/address-pool",
    metallb_names: ["metallb.io/address-pool", "metallb.universe.tf/address-pool"],
};

/// A sharing key: services with the same key (and compatible ports) may share an address.
pub const ALLOW_SHARED_IP: ServiceAnnotation = ServiceAnnotation {
    name: "ferrolb.io/allow-shared-ip",
    metallb_names: ["metallb.io/allow-shared-ip", "metallb.universe.tf/allow-shared-ip"],
};

/// The other namespaces a Service shares its `allow-shared-ip` address with, comma separated, or
/// `*` for any. Sharing crosses namespaces only when both Services name each other's namespace
/// (as Cilium LB-IPAM's `lbipam.cilium.io/sharing-cross-namespace`): a sharing key alone never
/// lets another tenant onto an address. ferrolb's own; MetalLB has no such annotation.
pub const ALLOW_SHARED_IP_NAMESPACES: &str = "ferrolb.io/allow-shared-ip-namespaces";

/// Written by the controller on a service: the pool its addresses came from.
pub const IP_ALLOCATED_FROM_POOL: &str = "ferrolb.io/ip-allocated-from-pool";

/// The `spec.loadBalancerClass` ferrolb serves by default (the controller's flag can change it).
pub const DEFAULT_LOAD_BALANCER_CLASS: &str = "ferrolb.io/lb";

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn ferrolb_spelling_wins_over_metallb_ones() {
        let a = annotations(&[
            ("metallb.universe.tf/address-pool", "old"),
            ("metallb.io/address-pool", "metallb"),
            ("ferrolb.io/address-pool", "ours"),
        ]);
        assert_eq!(ADDRESS_POOL.value(&a), Some("ours"));
        assert_eq!(ADDRESS_POOL.find(&a), Some(("ferrolb.io/address-pool", "ours")));
    }

    #[test]
    fn metallb_io_wins_over_universe_tf() {
        let a = annotations(&[("metallb.universe.tf/allow-shared-ip", "old"), ("metallb.io/allow-shared-ip", "new")]);
        assert_eq!(ALLOW_SHARED_IP.find(&a), Some(("metallb.io/allow-shared-ip", "new")));
    }

    #[test]
    fn oldest_spelling_still_honoured() {
        let a = annotations(&[("metallb.universe.tf/loadBalancerIPs", "192.0.2.200")]);
        assert_eq!(LOAD_BALANCER_IPS.value(&a), Some("192.0.2.200"));
    }

    #[test]
    fn absent_is_none_and_other_annotations_are_ignored() {
        let a = annotations(&[("ferrolb.io/address-pool", "lan")]);
        assert_eq!(LOAD_BALANCER_IPS.value(&a), None);
        assert_eq!(ALLOW_SHARED_IP.value(&a), None);
    }

    #[test]
    fn spellings_share_the_suffix() {
        for annotation in [LOAD_BALANCER_IPS, ADDRESS_POOL, ALLOW_SHARED_IP] {
            let [ours, metallb, universe] = annotation.spellings();
            let suffix = ours.strip_prefix("ferrolb.io/").expect("ferrolb.io spelling");
            assert_eq!(metallb, format!("metallb.io/{suffix}"));
            assert_eq!(universe, format!("metallb.universe.tf/{suffix}"));
        }
    }
}

//! L2 advertisements: which pools are announced, from which nodes and interfaces.

use std::collections::{BTreeMap, BTreeSet};

use ferrolb_api::L2AdvertisementSpec;

use crate::selector::selectors;
use crate::{ConfigError, Pool, Selector};

/// A checked `L2Advertisement`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Advertisement {
    pub name: String,
    /// Pools announced by name.
    pub pool_names: BTreeSet<String>,
    /// Pools announced by label, in addition to `pool_names`.
    pub pool_selectors: Vec<Selector>,
    /// Nodes that may announce; empty means every node.
    pub node_selectors: Vec<Selector>,
    /// Interfaces to announce on; empty means every interface.
    pub interfaces: Vec<String>,
}

impl Advertisement {
    /// Whether this advertisement announces `pool`: every pool when it names none and selects
    /// none, otherwise the pools it names or selects.
    pub fn applies_to_pool(&self, pool: &Pool) -> bool {
        (self.pool_names.is_empty() && self.pool_selectors.is_empty())
            || self.pool_names.contains(&pool.name)
            || self.pool_selectors.iter().any(|s| s.matches(&pool.labels))
    }

    /// Whether a node with these labels may announce for this advertisement: any node when there
    /// are no node selectors, otherwise a node matching at least one.
    pub fn applies_to_node(&self, node_labels: &BTreeMap<String, String>) -> bool {
        self.node_selectors.is_empty() || self.node_selectors.iter().any(|s| s.matches(node_labels))
    }
}

/// Checks every advertisement: the usable ones sorted by name, and the errors of the others by
/// name. Naming a pool that doesn't exist (yet) is not an error: it just announces nothing until
/// the pool appears.
pub fn build_advertisements(
    inputs: Vec<(String, L2AdvertisementSpec)>,
) -> (Vec<Advertisement>, BTreeMap<String, Vec<ConfigError>>) {
    let mut accepted = Vec::new();
    let mut rejected: BTreeMap<String, Vec<ConfigError>> = BTreeMap::new();
    for (name, spec) in inputs {
        let mut errors = Vec::new();
        let pool_selectors =
            selectors(spec.ip_address_pool_selectors.as_deref(), "spec.ipAddressPoolSelectors", &mut errors);
        let node_selectors = selectors(spec.node_selectors.as_deref(), "spec.nodeSelectors", &mut errors);
        if errors.is_empty() {
            accepted.push(Advertisement {
                name,
                pool_names: spec.ip_address_pools.into_iter().flatten().collect(),
                pool_selectors,
                node_selectors,
                interfaces: spec.interfaces.unwrap_or_default(),
            });
        } else {
            rejected.entry(name).or_default().extend(errors);
        }
    }
    accepted.sort_by(|a, b| a.name.cmp(&b.name));
    (accepted, rejected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PoolInput, build_pools};
    use ferrolb_api::IPAddressPoolSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn match_labels(pairs: &[(&str, &str)]) -> LabelSelector {
        LabelSelector { match_labels: Some(labels(pairs)), match_expressions: None }
    }

    fn pool(name: &str, pool_labels: &[(&str, &str)], addresses: &str) -> Pool {
        let built = build_pools(vec![PoolInput {
            name: name.to_string(),
            labels: labels(pool_labels),
            created: None,
            spec: IPAddressPoolSpec { addresses: vec![addresses.to_string()], ..IPAddressPoolSpec::default() },
        }]);
        built.pools.into_values().next().expect("a valid pool")
    }

    fn build_one(spec: L2AdvertisementSpec) -> Advertisement {
        let (mut accepted, rejected) = build_advertisements(vec![("adv".to_string(), spec)]);
        assert_eq!(rejected, BTreeMap::new());
        accepted.pop().expect("one advertisement")
    }

    #[test]
    fn an_empty_advertisement_announces_every_pool_from_every_node() {
        let adv = build_one(L2AdvertisementSpec::default());
        assert!(adv.applies_to_pool(&pool("lan", &[], "192.0.2.0/24")));
        assert!(adv.applies_to_node(&labels(&[])));
        assert!(adv.interfaces.is_empty());
    }

    #[test]
    fn pools_by_name_or_label() {
        let adv = build_one(L2AdvertisementSpec {
            ip_address_pools: Some(vec!["lan".to_string()]),
            ip_address_pool_selectors: Some(vec![match_labels(&[("announce", "l2")])]),
            ..L2AdvertisementSpec::default()
        });
        assert!(adv.applies_to_pool(&pool("lan", &[], "192.0.2.0/24")));
        assert!(adv.applies_to_pool(&pool("dmz", &[("announce", "l2")], "198.51.100.0/24")));
        assert!(!adv.applies_to_pool(&pool("bgp-only", &[("announce", "bgp")], "203.0.113.0/24")));
    }

    #[test]
    fn only_a_selector_means_only_selected_pools() {
        let adv = build_one(L2AdvertisementSpec {
            ip_address_pool_selectors: Some(vec![match_labels(&[("announce", "l2")])]),
            ..L2AdvertisementSpec::default()
        });
        assert!(!adv.applies_to_pool(&pool("lan", &[], "192.0.2.0/24")));
    }

    #[test]
    fn nodes_by_any_selector() {
        let adv = build_one(L2AdvertisementSpec {
            node_selectors: Some(vec![
                match_labels(&[("kubernetes.io/hostname", "node-1")]),
                match_labels(&[("edge", "true")]),
            ]),
            interfaces: Some(vec!["eth0".to_string()]),
            ..L2AdvertisementSpec::default()
        });
        assert!(adv.applies_to_node(&labels(&[("kubernetes.io/hostname", "node-1")])));
        assert!(adv.applies_to_node(&labels(&[("kubernetes.io/hostname", "node-3"), ("edge", "true")])));
        assert!(!adv.applies_to_node(&labels(&[("kubernetes.io/hostname", "node-2")])));
        assert_eq!(adv.interfaces, ["eth0"]);
    }

    #[test]
    fn a_bad_selector_rejects_only_its_advertisement() {
        let bad = L2AdvertisementSpec {
            node_selectors: Some(vec![LabelSelector {
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: "zone".to_string(),
                    operator: "In".to_string(),
                    values: None,
                }]),
                match_labels: None,
            }]),
            ..L2AdvertisementSpec::default()
        };
        let (accepted, rejected) = build_advertisements(vec![
            ("z-good".to_string(), L2AdvertisementSpec::default()),
            ("bad".to_string(), bad),
            ("a-good".to_string(), L2AdvertisementSpec::default()),
        ]);
        assert_eq!(accepted.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(), ["a-good", "z-good"]);
        let messages: Vec<String> = rejected["bad"].iter().map(ToString::to_string).collect();
        assert_eq!(messages, ["spec.nodeSelectors[0]: matchExpressions[0]: operator In needs at least one value"]);
    }
}

//! Address pools: `IPAddressPool` specs checked against themselves and against each other.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ferrolb_api::IPAddressPoolSpec;

use crate::range::to_u128;
use crate::selector::selectors;
use crate::{AddressRange, ConfigError, Family, Selector};

/// One `IPAddressPool` as the controller found it.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolInput {
    /// The pool's name; pools are known by it in annotations, advertisements and errors.
    pub name: String,
    /// The pool's labels, for `L2Advertisement` pool selectors.
    pub labels: BTreeMap<String, String>,
    /// `metadata.creationTimestamp` (RFC 3339, as the API server writes it): when two pools
    /// overlap, the older one wins. `None` counts as newest.
    pub created: Option<String>,
    /// The spec as written.
    pub spec: IPAddressPoolSpec,
}

impl PoolInput {
    /// A pool object as read from the API (`ferrolb.io` or, with compatibility on, `metallb.io`).
    pub fn from_object<K>(pool: &K) -> Self
    where
        K: kube::Resource + kube::core::object::HasSpec<Spec = IPAddressPoolSpec>,
    {
        let meta = pool.meta();
        PoolInput {
            name: meta.name.clone().unwrap_or_default(),
            labels: meta.labels.clone().unwrap_or_default(),
            created: meta.creation_timestamp.as_ref().map(|t| t.0.to_string()),
            spec: pool.spec().clone(),
        }
    }
}

/// Which services may take addresses from a pool, with selectors checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceAllocation {
    /// Lower is tried first; `None` is tried after every pool with a priority.
    pub priority: Option<i32>,
    /// Namespaces allowed by name.
    pub namespaces: BTreeSet<String>,
    /// Namespaces allowed by label, in addition to `namespaces`.
    pub namespace_selectors: Vec<Selector>,
    /// Services allowed by label; empty allows any service of an allowed namespace.
    pub service_selectors: Vec<Selector>,
}

/// A pool that passed every check, ready for the allocator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pool {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Sorted, IPv4 before IPv6, with overlapping and touching entries merged: every address of
    /// the pool is in exactly one range.
    pub ranges: Vec<AddressRange>,
    /// Whether services that name no pool and no address may be given addresses from this pool.
    pub auto_assign: bool,
    /// Whether IPv4 addresses ending in .0 and .255 are left unused.
    pub avoid_buggy_ips: bool,
    /// `None`: any service may use the pool.
    pub allocation: Option<ServiceAllocation>,
}

/// The outcome of [`build_pools`]: usable pools, and why the others were refused.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pools {
    /// Pools in use, by name.
    pub pools: BTreeMap<String, Pool>,
    /// Refused pools, by name, with every problem found. A name in both maps means two pools
    /// share it: the one in `pools` is the older.
    pub rejected: BTreeMap<String, Vec<ConfigError>>,
}

impl Pool {
    /// Whether `ip` is one of the pool's addresses, usable or not.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.ranges.iter().any(|r| r.contains(ip))
    }

    /// Whether `ip` may be assigned from this pool.
    pub fn is_usable(&self, ip: IpAddr) -> bool {
        self.contains(ip) && !(self.avoid_buggy_ips && is_buggy(ip))
    }

    /// How many addresses of family `f` may be assigned from this pool.
    pub fn usable_count(&self, f: Family) -> u128 {
        self.ranges
            .iter()
            .filter(|r| r.family() == f)
            .map(|r| {
                let buggy = if self.avoid_buggy_ips && f == Family::V4 { buggy_in(r) } else { 0 };
                r.len() - buggy
            })
            .fold(0, u128::saturating_add)
    }

    /// The families the pool has addresses of.
    pub fn families(&self) -> BTreeSet<Family> {
        self.ranges.iter().map(AddressRange::family).collect()
    }

    /// The usable addresses of family `f`, ascending. Lazy: a /64 is fine as long as the caller
    /// stops early.
    pub fn addresses(&self, f: Family) -> impl Iterator<Item = IpAddr> + '_ {
        let avoid_buggy = self.avoid_buggy_ips;
        self.ranges
            .iter()
            .filter(move |r| r.family() == f)
            .flat_map(AddressRange::iter)
            .filter(move |ip| !(avoid_buggy && is_buggy(*ip)))
    }

    /// Whether a service may take addresses from this pool per `serviceAllocation` (`None`: any
    /// service). The namespace must be listed or match a namespace selector (when either is set),
    /// and the service must match a service selector (when any is set).
    pub fn allows_service(
        &self,
        namespace: &str,
        namespace_labels: &BTreeMap<String, String>,
        service_labels: &BTreeMap<String, String>,
    ) -> bool {
        let Some(allocation) = &self.allocation else {
            return true;
        };
        let namespace_ok = (allocation.namespaces.is_empty() && allocation.namespace_selectors.is_empty())
            || allocation.namespaces.contains(namespace)
            || allocation.namespace_selectors.iter().any(|s| s.matches(namespace_labels));
        let service_ok = allocation.service_selectors.is_empty()
            || allocation.service_selectors.iter().any(|s| s.matches(service_labels));
        namespace_ok && service_ok
    }

    /// `serviceAllocation.priority`: lower is tried first; `None` after every pool with one.
    pub fn priority(&self) -> Option<i32> {
        self.allocation.as_ref().and_then(|a| a.priority)
    }
}

/// Checks every pool and returns those that can be used, and why the others can't.
///
/// Each pool is checked on its own (addresses, selectors), then against the pools accepted before
/// it, oldest first (by `created`, then by name): a pool sharing any address with an older one is
/// refused, so adding a pool never takes addresses from services that have them. A refused pool
/// reports every problem at once, and never affects the others.
pub fn build_pools(mut inputs: Vec<PoolInput>) -> Pools {
    // RFC 3339 timestamps from the API server (UTC, fixed width) sort as strings.
    inputs.sort_by(|a, b| (a.created.is_none(), &a.created, &a.name).cmp(&(b.created.is_none(), &b.created, &b.name)));
    let mut out = Pools::default();
    // Accepted entries as written, to name the other pool's entry in overlap errors.
    let mut taken: Vec<(&str, &str, AddressRange)> = Vec::new();
    for input in &inputs {
        if out.pools.contains_key(&input.name) || out.rejected.contains_key(&input.name) {
            out.rejected
                .entry(input.name.clone())
                .or_default()
                .push(ConfigError::DuplicateName { name: input.name.clone() });
            continue;
        }
        let mut errors = Vec::new();
        if input.spec.addresses.is_empty() {
            errors.push(ConfigError::NoAddresses);
        }
        let mut parsed = Vec::new();
        for address in &input.spec.addresses {
            match AddressRange::parse(address) {
                Ok(range) => parsed.push((address.trim(), range)),
                Err(err) => errors.push(err),
            }
        }
        // Even a pool refused for a typo gets its overlaps reported, so one round of fixes is enough.
        for (address, range) in &parsed {
            if let Some((other_pool, other_address, _)) = taken.iter().find(|(_, _, other)| other.overlaps(range)) {
                errors.push(ConfigError::Overlap {
                    address: address.to_string(),
                    other_pool: other_pool.to_string(),
                    other_address: other_address.to_string(),
                });
            }
        }
        let allocation = match &input.spec.service_allocation {
            None => None,
            Some(spec) => {
                let field = "spec.serviceAllocation";
                let namespace_selectors =
                    selectors(spec.namespace_selectors.as_deref(), &format!("{field}.namespaceSelectors"), &mut errors);
                let service_selectors =
                    selectors(spec.service_selectors.as_deref(), &format!("{field}.serviceSelectors"), &mut errors);
                Some(ServiceAllocation {
                    priority: spec.priority,
                    namespaces: spec.namespaces.iter().flatten().cloned().collect(),
                    namespace_selectors,
                    service_selectors,
                })
            }
        };
        if !errors.is_empty() {
            out.rejected.insert(input.name.clone(), errors);
            continue;
        }
        taken.extend(parsed.iter().map(|(address, range)| (input.name.as_str(), *address, *range)));
        let pool = Pool {
            name: input.name.clone(),
            labels: input.labels.clone(),
            ranges: AddressRange::normalize(parsed.into_iter().map(|(_, range)| range).collect()),
            auto_assign: input.spec.auto_assign.unwrap_or(true),
            avoid_buggy_ips: input.spec.avoid_buggy_ips.unwrap_or(false),
            allocation,
        };
        out.pools.insert(input.name.clone(), pool);
    }
    out
}

/// IPv4 addresses ending in .0 or .255, which some equipment takes for network or broadcast
/// addresses whatever the real prefix length.
fn is_buggy(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => matches!(v4.octets()[3], 0 | 255),
        IpAddr::V6(_) => false,
    }
}

/// How many addresses of an IPv4 range end in .0 or .255, counted without walking the range.
fn buggy_in(range: &AddressRange) -> u128 {
    // Numbers in 0..=n whose last octet is `octet`.
    let upto = |n: u128, octet: u128| if n < octet { 0 } else { (n - octet) / 256 + 1 };
    let (first, last) = (to_u128(range.first), to_u128(range.last));
    [0, 255].into_iter().map(|octet| upto(last, octet) - first.checked_sub(1).map_or(0, |f| upto(f, octet))).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrolb_api::ServiceAllocation as SpecAllocation;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test IP")
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn input(name: &str, created: &str, addresses: &[&str]) -> PoolInput {
        PoolInput {
            name: name.to_string(),
            labels: BTreeMap::new(),
            created: Some(created.to_string()),
            spec: IPAddressPoolSpec {
                addresses: addresses.iter().map(ToString::to_string).collect(),
                ..IPAddressPoolSpec::default()
            },
        }
    }

    fn one(input: PoolInput) -> Pool {
        let mut pools = build_pools(vec![input]);
        assert_eq!(pools.rejected, BTreeMap::new());
        pools.pools.pop_first().expect("one pool").1
    }

    fn messages(pools: &Pools, name: &str) -> Vec<String> {
        pools.rejected.get(name).map(|errors| errors.iter().map(ToString::to_string).collect()).unwrap_or_default()
    }

    const T1: &str = "2025-01-01T00:00:00Z";
    const T2: &str = "2025-01-02T00:00:00Z";
    const T3: &str = "2025-01-03T00:00:00Z";

    #[test]
    fn the_demo_pool() {
        let pool = one(input("demo", T1, &["192.0.2.200-192.0.2.250", "2001:db8:1::c8-2001:db8:1::fa"]));
        assert_eq!(pool.usable_count(Family::V4), 51);
        assert_eq!(pool.usable_count(Family::V6), 51);
        assert_eq!(pool.families(), BTreeSet::from([Family::V4, Family::V6]));
        assert!(pool.auto_assign, "autoAssign defaults to true");
        assert!(!pool.avoid_buggy_ips, "avoidBuggyIPs defaults to false");
        assert_eq!(pool.addresses(Family::V4).next(), Some(ip("192.0.2.200")));
        assert_eq!(pool.addresses(Family::V6).last(), Some(ip("2001:db8:1::fa")));
        assert_eq!(pool.addresses(Family::V4).count(), 51);
        assert!(pool.is_usable(ip("192.0.2.225")));
        assert!(!pool.contains(ip("192.0.2.199")));
        assert_eq!(pool.priority(), None);
        assert!(pool.allows_service("any", &labels(&[]), &labels(&[])));
    }

    #[test]
    fn single_family_pools() {
        let pool = one(input("v6", T1, &["2001:db8:1::/120"]));
        assert_eq!(pool.families(), BTreeSet::from([Family::V6]));
        assert_eq!(pool.usable_count(Family::V4), 0);
        assert_eq!(pool.addresses(Family::V4).count(), 0);
        assert_eq!(pool.usable_count(Family::V6), 256);
    }

    #[test]
    fn overlapping_entries_within_a_pool_are_counted_once() {
        let pool = one(input("lan", T1, &["192.0.2.0/28", "192.0.2.10-192.0.2.20", "192.0.2.20", "192.0.2.21"]));
        assert_eq!(pool.ranges, vec![AddressRange::parse("192.0.2.0-192.0.2.21").expect("range")]);
        assert_eq!(pool.usable_count(Family::V4), 22);
        assert_eq!(pool.addresses(Family::V4).count(), 22);
    }

    #[test]
    fn avoid_buggy_ips_skips_dot_zero_and_dot_255() {
        let mut spec = input("lan", T1, &["192.0.2.0/23", "2001:db8::/120"]);
        spec.spec.avoid_buggy_ips = Some(true);
        let pool = one(spec);
        assert!(!pool.is_usable(ip("192.0.2.0")));
        assert!(!pool.is_usable(ip("192.0.2.255")));
        assert!(!pool.is_usable(ip("192.0.3.0")));
        assert!(pool.is_usable(ip("192.0.2.1")));
        assert!(pool.contains(ip("192.0.2.255")), "still the pool's, just not handed out");
        assert_eq!(pool.usable_count(Family::V4), 512 - 4);
        let v4: Vec<IpAddr> = pool.addresses(Family::V4).collect();
        assert_eq!(v4.len(), 508);
        assert_eq!(v4.first(), Some(&ip("192.0.2.1")));
        assert!(v4.contains(&ip("192.0.2.254")) && v4.contains(&ip("192.0.3.1")));
        // IPv6 addresses ending in ::0 or ::ff are fine.
        assert!(pool.is_usable(ip("2001:db8::")));
        assert!(pool.is_usable(ip("2001:db8::ff")));
        assert_eq!(pool.usable_count(Family::V6), 256);
    }

    #[test]
    fn buggy_count_matches_a_walk() {
        for (first, last) in [(0u32, 0u32), (0, 255), (1, 254), (255, 256), (200, 1000), (u32::MAX - 300, u32::MAX)] {
            let r = AddressRange { first: IpAddr::V4(first.into()), last: IpAddr::V4(last.into()) };
            let walked = r.iter().filter(|ip| is_buggy(*ip)).count() as u128;
            assert_eq!(buggy_in(&r), walked, "{r}");
        }
    }

    #[test]
    fn auto_assign_false_is_kept() {
        let mut spec = input("reserved", T1, &["192.0.2.16/28"]);
        spec.spec.auto_assign = Some(false);
        assert!(!one(spec).auto_assign);
    }

    #[test]
    fn a_bad_pool_does_not_affect_the_good_ones() {
        let pools = build_pools(vec![
            input("good", T2, &["192.0.2.200-192.0.2.250"]),
            input("typo", T1, &["192.0.2.300/24", "198.51.100.0/24"]),
            input("empty", T1, &[]),
            input("reversed", T3, &["198.51.100.250-198.51.100.200"]),
            input("mixed", T3, &["203.0.113.1-2001:db8::1"]),
        ]);
        assert_eq!(pools.pools.keys().collect::<Vec<_>>(), ["good"]);
        assert_eq!(
            messages(&pools, "typo"),
            [
                r#"address "192.0.2.300/24" is not a CIDR, an IP or a first-last range: "192.0.2.300" is not an IP address"#
            ]
        );
        assert_eq!(
            messages(&pools, "empty"),
            ["the pool has no addresses: list at least one CIDR, IP or first-last range in spec.addresses"]
        );
        assert_eq!(
            messages(&pools, "reversed"),
            ["range 198.51.100.250-198.51.100.200 is reversed: its first address is after its last"]
        );
        assert_eq!(
            messages(&pools, "mixed"),
            ["range 203.0.113.1-2001:db8::1 mixes IPv4 and IPv6: its first and last address must be of one family"]
        );
        // The typo pool's good entry 198.51.100.0/24 was never taken: "reversed" isn't blamed for it.
        assert_eq!(pools.rejected.len(), 4);
    }

    #[test]
    fn the_older_pool_keeps_overlapping_addresses() {
        // Given newest first, to show that order of input doesn't matter, only age.
        let pools = build_pools(vec![
            input("guests", T2, &["192.0.2.200/29", "198.51.100.0/24"]),
            input("lan", T1, &["192.0.2.200-192.0.2.250"]),
        ]);
        assert_eq!(pools.pools.keys().collect::<Vec<_>>(), ["lan"]);
        assert_eq!(messages(&pools, "guests"), [r#"192.0.2.200/29 overlaps pool "lan" (192.0.2.200-192.0.2.250)"#]);
        assert_eq!(
            pools.rejected["guests"],
            [ConfigError::Overlap {
                address: "192.0.2.200/29".to_string(),
                other_pool: "lan".to_string(),
                other_address: "192.0.2.200-192.0.2.250".to_string(),
            }]
        );
    }

    #[test]
    fn same_age_is_settled_by_name_and_unknown_age_counts_as_newest() {
        let pools = build_pools(vec![input("b", T1, &["192.0.2.0/24"]), input("a", T1, &["192.0.2.7"])]);
        assert_eq!(pools.pools.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(messages(&pools, "b"), [r#"192.0.2.0/24 overlaps pool "a" (192.0.2.7)"#]);

        let mut ageless = input("a", T1, &["192.0.2.7"]);
        ageless.created = None;
        let pools = build_pools(vec![input("z", T3, &["192.0.2.0/24"]), ageless]);
        assert_eq!(pools.pools.keys().collect::<Vec<_>>(), ["z"]);
    }

    #[test]
    fn a_rejected_pool_takes_no_addresses() {
        // "broken" is oldest and overlaps "lan", but being refused, it must not push "lan" out.
        let pools = build_pools(vec![
            input("broken", T1, &["192.0.2.0/24", "not-an-address"]),
            input("lan", T2, &["192.0.2.200-192.0.2.250"]),
        ]);
        assert_eq!(pools.pools.keys().collect::<Vec<_>>(), ["lan"]);
        assert_eq!(messages(&pools, "broken").len(), 1);
    }

    #[test]
    fn every_problem_of_a_pool_is_reported() {
        let mut spec = input("messy", T2, &["192.0.2.300", "192.0.2.210", "2001:db8::/64"]);
        spec.spec.service_allocation = Some(SpecAllocation {
            service_selectors: Some(vec![LabelSelector {
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: "tier".to_string(),
                    operator: "Is".to_string(),
                    values: None,
                }]),
                match_labels: None,
            }]),
            ..SpecAllocation::default()
        });
        let pools = build_pools(vec![input("lan", T1, &["192.0.2.200-192.0.2.250"]), spec]);
        assert_eq!(
            messages(&pools, "messy"),
            [
                r#"address "192.0.2.300" is not a CIDR, an IP or a first-last range: "192.0.2.300" is not an IP address"#,
                r#"192.0.2.210 overlaps pool "lan" (192.0.2.200-192.0.2.250)"#,
                r#"spec.serviceAllocation.serviceSelectors[0]: matchExpressions[0]: operator "Is" is not one of In, NotIn, Exists, DoesNotExist"#,
            ]
        );
    }

    #[test]
    fn duplicate_names_keep_the_older() {
        let pools =
            build_pools(vec![input("lan", T2, &["198.51.100.0/24"]), input("lan", T1, &["192.0.2.200-192.0.2.250"])]);
        assert_eq!(pools.pools["lan"].ranges, vec![AddressRange::parse("192.0.2.200-192.0.2.250").expect("range")]);
        assert_eq!(messages(&pools, "lan"), [r#"another, older pool is also named "lan": pool names must be unique"#]);
    }

    fn allocation_pool(allocation: SpecAllocation) -> Pool {
        let mut spec = input("p", T1, &["192.0.2.0/24"]);
        spec.spec.service_allocation = Some(allocation);
        one(spec)
    }

    fn match_labels(pairs: &[(&str, &str)]) -> LabelSelector {
        LabelSelector { match_labels: Some(labels(pairs)), match_expressions: None }
    }

    #[test]
    fn service_allocation_by_namespace_name_or_label() {
        let pool = allocation_pool(SpecAllocation {
            priority: Some(5),
            namespaces: Some(vec!["web".to_string()]),
            namespace_selectors: Some(vec![match_labels(&[("team", "edge")])]),
            service_selectors: None,
        });
        assert_eq!(pool.priority(), Some(5));
        let none = labels(&[]);
        assert!(pool.allows_service("web", &none, &none), "listed namespace");
        assert!(pool.allows_service("proxy", &labels(&[("team", "edge")]), &none), "selected namespace");
        assert!(!pool.allows_service("db", &labels(&[("team", "data")]), &none));
    }

    #[test]
    fn service_allocation_by_service_label() {
        let pool = allocation_pool(SpecAllocation {
            service_selectors: Some(vec![match_labels(&[("tier", "front")]), match_labels(&[("expose", "true")])]),
            ..SpecAllocation::default()
        });
        let none = labels(&[]);
        assert!(pool.allows_service("any", &none, &labels(&[("tier", "front")])));
        assert!(pool.allows_service("any", &none, &labels(&[("expose", "true")])), "any selector will do");
        assert!(!pool.allows_service("any", &none, &labels(&[("tier", "back")])));
    }

    #[test]
    fn service_allocation_needs_namespace_and_service_to_match() {
        let pool = allocation_pool(SpecAllocation {
            namespaces: Some(vec!["web".to_string()]),
            service_selectors: Some(vec![match_labels(&[("tier", "front")])]),
            ..SpecAllocation::default()
        });
        let none = labels(&[]);
        let front = labels(&[("tier", "front")]);
        assert!(pool.allows_service("web", &none, &front));
        assert!(!pool.allows_service("web", &none, &none));
        assert!(!pool.allows_service("db", &none, &front));
    }

    #[test]
    fn priority_alone_restricts_nothing() {
        let pool = allocation_pool(SpecAllocation { priority: Some(-3), ..SpecAllocation::default() });
        assert_eq!(pool.priority(), Some(-3));
        assert!(pool.allows_service("any", &labels(&[]), &labels(&[])));
    }

    /// Small address entries in one /24 and one IPv6 /120, so random pools often overlap.
    fn any_entry() -> impl Strategy<Value = String> {
        prop_oneof![
            (0u8..=255, 0u8..=255).prop_map(|(a, b)| format!("192.0.2.{}-192.0.2.{}", a.min(b), a.max(b))),
            (0u8..=255, 24u8..=32).prop_map(|(a, p)| format!("192.0.2.{a}/{p}")),
            (0u8..=255).prop_map(|a| format!("2001:db8::{a:x}")),
            (0u8..=255, 0u8..=255).prop_map(|(a, b)| format!("2001:db8::{:x}-2001:db8::{:x}", a.max(b), a.min(b))),
            Just("garbage".to_string()),
        ]
    }

    proptest! {
        #[test]
        fn never_accepts_two_overlapping_pools(
            pools in proptest::collection::vec(
                (proptest::collection::vec(any_entry(), 0..4), 0u8..5, any::<bool>()),
                1..8,
            )
        ) {
            let inputs: Vec<PoolInput> = pools
                .iter()
                .enumerate()
                .map(|(i, (addresses, day, avoid_buggy))| {
                    let addresses: Vec<&str> = addresses.iter().map(String::as_str).collect();
                    let mut pool = input(&format!("pool-{i}"), &format!("2025-01-0{}T00:00:00Z", day + 1), &addresses);
                    pool.spec.avoid_buggy_ips = Some(*avoid_buggy);
                    pool
                })
                .collect();
            let built = build_pools(inputs.clone());
            prop_assert_eq!(built.pools.len() + built.rejected.len(), inputs.len());
            let accepted: Vec<&Pool> = built.pools.values().collect();
            for (i, a) in accepted.iter().enumerate() {
                for b in &accepted[i + 1..] {
                    for ra in &a.ranges {
                        for rb in &b.ranges {
                            prop_assert!(!ra.overlaps(rb), "{} ({}) overlaps {} ({})", a.name, ra, b.name, rb);
                        }
                    }
                }
            }
            // Counting agrees with walking, with and without avoidBuggyIPs.
            for pool in accepted {
                for f in [Family::V4, Family::V6] {
                    prop_assert_eq!(pool.usable_count(f), pool.addresses(f).count() as u128);
                }
            }
        }
    }
}

//! The free addresses of one pool range, as intervals: the lowest free address, taking one and
//! giving one back each cost O(log n) in the number of intervals (at most one more than the
//! addresses held), whatever the size of the range. IPv4 and IPv6 alike (`u128` numbers).
//!
//! ```text
//!   range 192.0.2.0-192.0.2.255, avoidBuggyIPs      ordinals (usable addresses only)
//!   .0 .1 .2 .3 … .254 .255                    ──>  0 1 2 … 253
//!   held: .2 .3                                      free: {0..=0, 3..=253}
//! ```
//!
//! Addresses a pool avoids (IPv4 `.0` and `.255` under `avoidBuggyIPs`) have no ordinal, so
//! the free intervals are never split by them: a full pool of /24s is still one interval per
//! run of free addresses, not one per /24.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ferrolb_config::{AddressRange, Family, Pool};

/// The ranges of every pool, indexed, and a table to find the ranges an address is in.
#[derive(Clone, Debug, Default)]
pub(crate) struct FreeIndex {
    /// Per pool, by name, its ranges in the pool's order.
    pools: Vec<(String, Vec<RangeIndex>)>,
    /// `(first, last, pool position, range position)`, by `first`.
    spans: Vec<(IpAddr, IpAddr, usize, usize)>,
    /// No two spans overlap (always so for pools from `build_pools`): an address is found by
    /// binary search, else every span starting at or below it is looked at.
    disjoint: bool,
}

impl FreeIndex {
    /// The index of `pools` with `held` (address -> anything) held.
    pub(crate) fn new<V>(pools: &BTreeMap<String, Pool>, held: &BTreeMap<IpAddr, V>) -> Self {
        let mut ix = FreeIndex::default();
        for (pi, pool) in pools.values().enumerate() {
            let mut ranges = Vec::with_capacity(pool.ranges.len());
            for (ri, range) in pool.ranges.iter().enumerate() {
                let mut r = RangeIndex::new(*range, pool.avoid_buggy_ips);
                if range.first <= range.last {
                    for ip in held.range(range.first..=range.last).map(|(ip, _)| *ip) {
                        r.take(ip);
                    }
                }
                ranges.push(r);
                ix.spans.push((range.first, range.last, pi, ri));
            }
            ix.pools.push((pool.name.clone(), ranges));
        }
        ix.spans.sort();
        ix.disjoint = ix.spans.windows(2).all(|w| w[0].1 < w[1].0);
        ix
    }

    /// The ranges of pool `name`, in the pool's order.
    pub(crate) fn ranges(&self, name: &str) -> &[RangeIndex] {
        match self.pools.binary_search_by(|(n, _)| n.as_str().cmp(name)) {
            Ok(i) => &self.pools[i].1,
            Err(_) => &[],
        }
    }

    /// `ip` became held (nobody held it).
    pub(crate) fn take(&mut self, ip: IpAddr) {
        self.each_range_of(ip, RangeIndex::take);
    }

    /// `ip` is no longer held by anybody.
    pub(crate) fn give(&mut self, ip: IpAddr) {
        self.each_range_of(ip, RangeIndex::give);
    }

    fn each_range_of(&mut self, ip: IpAddr, f: impl Fn(&mut RangeIndex, IpAddr)) {
        let end = self.spans.partition_point(|s| s.0 <= ip);
        let start = if self.disjoint { end.saturating_sub(1) } else { 0 };
        for &(_, last, pi, ri) in &self.spans[start..end] {
            if ip <= last {
                f(&mut self.pools[pi].1[ri], ip);
            }
        }
    }
}

/// One range of a pool: which of its usable addresses nobody holds, and how many of its
/// addresses (usable or not) are held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RangeIndex {
    range: AddressRange,
    /// IPv4 `.0` and `.255` are not counted as addresses of the range.
    skip_buggy: bool,
    /// Free intervals of ordinals, `start -> end` (inclusive), disjoint and not touching.
    free: BTreeMap<u128, u128>,
    /// Addresses of the range held by some service, avoided ones included (for usage).
    held: u128,
}

impl RangeIndex {
    /// The index of `range` with nothing held.
    pub(crate) fn new(range: AddressRange, avoid_buggy_ips: bool) -> Self {
        let skip_buggy = avoid_buggy_ips && range.family() == Family::V4;
        let mut ix = RangeIndex { range, skip_buggy, free: BTreeMap::new(), held: 0 };
        if let Some(last) = ix.last_ordinal() {
            ix.free.insert(0, last);
        }
        ix
    }

    pub(crate) fn range(&self) -> &AddressRange {
        &self.range
    }

    /// How many addresses of the range are held.
    pub(crate) fn held(&self) -> u128 {
        self.held
    }

    /// The lowest usable address nobody holds.
    pub(crate) fn lowest_free(&self) -> Option<IpAddr> {
        self.free.first_key_value().map(|(o, _)| self.address(*o))
    }

    /// Whether `ip` is a usable address of the range that nobody holds.
    #[cfg(test)]
    pub(crate) fn is_free(&self, ip: IpAddr) -> bool {
        self.ordinal(ip).is_some_and(|o| self.free.range(..=o).next_back().is_some_and(|(_, end)| o <= *end))
    }

    /// `ip` (of this range) became held.
    pub(crate) fn take(&mut self, ip: IpAddr) {
        if !self.range.contains(ip) {
            return;
        }
        self.held += 1;
        let Some(o) = self.ordinal(ip) else { return };
        let Some((&start, &end)) = self.free.range(..=o).next_back() else { return };
        if o > end {
            return;
        }
        self.free.remove(&start);
        if start < o {
            self.free.insert(start, o - 1);
        }
        if o < end {
            self.free.insert(o + 1, end);
        }
    }

    /// `ip` (of this range) is no longer held by anybody.
    pub(crate) fn give(&mut self, ip: IpAddr) {
        if !self.range.contains(ip) {
            return;
        }
        self.held = self.held.saturating_sub(1);
        let Some(o) = self.ordinal(ip) else { return };
        let (mut start, mut end) = (o, o);
        if let Some((&s, &e)) = self.free.range(..=o).next_back() {
            if o <= e {
                return; // already free
            }
            if e.checked_add(1) == Some(o) {
                start = s;
            }
        }
        if let Some(next) = o.checked_add(1)
            && let Some(e) = self.free.remove(&next)
        {
            end = e;
        }
        self.free.insert(start, end);
    }

    /// The number of intervals (memory use grows with it).
    #[cfg(test)]
    pub(crate) fn intervals(&self) -> usize {
        self.free.len()
    }

    fn first(&self) -> u128 {
        to_u128(self.range.first)
    }

    /// The ordinal of the last usable address; `None` when the range has none.
    fn last_ordinal(&self) -> Option<u128> {
        let (first, last) = (self.first(), to_u128(self.range.last));
        if !self.skip_buggy {
            return Some(last - first);
        }
        // IPv4: last + 1 fits in a u128.
        usable_below(last + 1).checked_sub(usable_below(first))?.checked_sub(1)
    }

    /// Where `ip` is counted in the range; `None` outside it or for an avoided address.
    fn ordinal(&self, ip: IpAddr) -> Option<u128> {
        if !self.range.contains(ip) {
            return None;
        }
        let n = to_u128(ip);
        if !self.skip_buggy {
            return Some(n - self.first());
        }
        if matches!(n & 0xff, 0 | 0xff) {
            return None;
        }
        Some(usable_below(n) - usable_below(self.first()))
    }

    /// The inverse of [`Self::ordinal`].
    fn address(&self, o: u128) -> IpAddr {
        let family = self.range.family();
        if !self.skip_buggy {
            return from_u128(family, self.first() + o);
        }
        let g = o + usable_below(self.first());
        from_u128(family, (g / 254) * 256 + g % 254 + 1)
    }
}

/// How many IPv4 numbers below `n` end in neither `.0` nor `.255`.
fn usable_below(n: u128) -> u128 {
    let low = n & 0xff;
    (n >> 8) * 254 + if low == 0 { 0 } else { (low - 1).min(254) }
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn from_u128(family: Family, n: u128) -> IpAddr {
    match family {
        // Numbers of IPv4 ranges come from IPv4 addresses: they fit.
        Family::V4 => IpAddr::V4(Ipv4Addr::from(u32::try_from(n).unwrap_or(u32::MAX))),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn range(s: &str) -> AddressRange {
        AddressRange::parse(s).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn buggy(ip: IpAddr) -> bool {
        matches!(ip, IpAddr::V4(a) if matches!(a.octets()[3], 0 | 255))
    }

    #[test]
    fn avoided_addresses_have_no_ordinal_and_do_not_split_intervals() {
        let mut ix = RangeIndex::new(range("192.0.2.250-192.0.3.5"), true);
        assert_eq!(ix.lowest_free(), Some(ip("192.0.2.250")));
        for a in ["192.0.2.250", "192.0.2.251", "192.0.2.252", "192.0.2.253", "192.0.2.254"] {
            ix.take(ip(a));
        }
        assert_eq!(ix.lowest_free(), Some(ip("192.0.3.1")), "skips .255 and .0");
        assert_eq!(ix.intervals(), 1);
        // A held avoided address counts as held, and changes nothing else.
        ix.take(ip("192.0.3.0"));
        assert_eq!((ix.held(), ix.intervals()), (6, 1));
        ix.give(ip("192.0.2.252"));
        assert_eq!(ix.lowest_free(), Some(ip("192.0.2.252")));
        assert_eq!(ix.intervals(), 2);
    }

    #[test]
    fn ranges_of_nothing_but_avoided_addresses_are_empty() {
        assert_eq!(RangeIndex::new(range("192.0.2.255-192.0.3.0"), true).lowest_free(), None);
        assert_eq!(RangeIndex::new(range("192.0.2.255/32"), true).lowest_free(), None);
        assert_eq!(RangeIndex::new(range("192.0.2.255/32"), false).lowest_free(), Some(ip("192.0.2.255")));
    }

    #[test]
    fn the_ends_of_the_address_spaces() {
        let mut ix = RangeIndex::new(range("::/0"), false);
        ix.take(ip("::"));
        assert_eq!(ix.lowest_free(), Some(ip("::1")));
        ix.take(ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"));
        ix.give(ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"));
        ix.give(ip("::"));
        assert_eq!((ix.intervals(), ix.lowest_free()), (1, Some(ip("::"))));
        let mut ix = RangeIndex::new(range("0.0.0.0/0"), true);
        assert_eq!(ix.lowest_free(), Some(ip("0.0.0.1")));
        ix.take(ip("255.255.255.254"));
        assert!(!ix.is_free(ip("255.255.255.254")) && ix.is_free(ip("255.255.255.253")));
    }

    proptest! {
        /// The index against a set of held addresses walked from the start.
        #[test]
        fn agrees_with_a_walk(
            v6 in any::<bool>(),
            avoid in any::<bool>(),
            start in 0u32..600,
            len in 1u32..600,
            ops in proptest::collection::vec((any::<bool>(), 0u32..600), 0..150),
        ) {
            let base: u128 = if v6 { 0x2001_0db8_0000_0000_0000_0000_0000_0000 } else { 0xc000_0200 };
            let fam = if v6 { Family::V6 } else { Family::V4 };
            let at = |n: u32| from_u128(fam, base + u128::from(start) + u128::from(n));
            let r = AddressRange { first: at(0), last: at(len - 1) };
            let mut ix = RangeIndex::new(r, avoid);
            let mut held = BTreeSet::new();
            let usable = |a: &IpAddr| !(avoid && buggy(*a));
            for (take, n) in ops {
                let a = at(n % len);
                if take {
                    if held.insert(a) { ix.take(a); }
                } else if held.remove(&a) {
                    ix.give(a);
                }
                let model = r.iter().find(|a| usable(a) && !held.contains(a));
                prop_assert_eq!(ix.lowest_free(), model);
                prop_assert_eq!(ix.held(), held.len() as u128);
                prop_assert!(ix.intervals() <= held.len() + 1);
            }
            for a in r.iter() {
                prop_assert_eq!(ix.is_free(a), usable(&a) && !held.contains(&a), "{}", a);
            }
        }
    }
}

//! Address ranges: the parsed form of one entry of `spec.addresses`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::IpNetwork;

use crate::{ConfigError, Family};

/// An inclusive range of addresses of one family, `first..=last`.
///
/// Every accepted way of writing addresses (a CIDR, a single IP, a `first-last` range) becomes one
/// of these, so the rest of ferrolb has a single shape to count, search and compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AddressRange {
    pub first: IpAddr,
    pub last: IpAddr,
}

impl AddressRange {
    /// Reads one entry of `spec.addresses`:
    /// - a CIDR, `192.0.2.0/24` or `2001:db8:1::/64`; host bits may be set (`192.0.2.7/24` means
    ///   the whole 192.0.2.0/24, as MetalLB reads it);
    /// - a single IP, `192.0.2.7` (the same as `192.0.2.7/32`);
    /// - a range, `192.0.2.200-192.0.2.250`, spaces around `-` allowed, both ends of one family.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let address = s.trim();
        let malformed = |reason: String| ConfigError::Malformed { address: address.to_string(), reason };
        if address.is_empty() {
            return Err(malformed("it is empty".to_string()));
        }
        if let Some((first, last)) = address.split_once('-') {
            if last.contains('-') {
                return Err(malformed("a range has exactly one '-', between its first and last address".to_string()));
            }
            let first = parse_ip(first.trim()).map_err(malformed)?;
            let last = parse_ip(last.trim()).map_err(malformed)?;
            if Family::of(&first) != Family::of(&last) {
                return Err(ConfigError::MixedFamilies { address: address.to_string() });
            }
            if first > last {
                return Err(ConfigError::Reversed { address: address.to_string() });
            }
            return Ok(AddressRange { first, last });
        }
        if let Some((ip, prefix)) = address.split_once('/') {
            let ip = parse_ip(ip.trim()).map_err(malformed)?;
            let max = match ip {
                IpAddr::V4(_) => 32,
                IpAddr::V6(_) => 128,
            };
            let prefix = prefix.trim().parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(|| {
                malformed(format!("prefix length {:?} is not a number from 0 to {max}", prefix.trim()))
            })?;
            let network = IpNetwork::new(ip, prefix).map_err(|e| malformed(e.to_string()))?;
            return Ok(AddressRange { first: network.network(), last: network.broadcast() });
        }
        let ip = parse_ip(address).map_err(malformed)?;
        Ok(AddressRange { first: ip, last: ip })
    }

    /// The family of both ends.
    pub fn family(&self) -> Family {
        Family::of(&self.first)
    }

    /// Whether `ip` is in the range (an address of the other family never is).
    pub fn contains(&self, ip: IpAddr) -> bool {
        Family::of(&ip) == self.family() && self.first <= ip && ip <= self.last
    }

    /// The number of addresses in the range. Saturates at `u128::MAX` for `::/0`, whose 2^128
    /// addresses don't fit. A hand-built range that is reversed or mixes families has none.
    pub fn len(&self) -> u128 {
        if Family::of(&self.last) != self.family() || self.first > self.last {
            return 0;
        }
        (to_u128(self.last) - to_u128(self.first)).saturating_add(1)
    }

    /// Whether the range has no addresses, which only a hand-built, reversed range can have.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the two ranges share at least one address.
    pub fn overlaps(&self, other: &AddressRange) -> bool {
        self.family() == other.family() && self.first <= other.last && other.first <= self.last
    }

    /// The `n`th address of the range, counting from 0, if the range has that many.
    pub fn nth(&self, n: u128) -> Option<IpAddr> {
        if self.is_empty() {
            return None;
        }
        let ip = to_u128(self.first).checked_add(n)?;
        (ip <= to_u128(self.last)).then(|| from_u128(self.family(), ip))
    }

    /// The addresses of the range, ascending.
    pub fn iter(&self) -> impl Iterator<Item = IpAddr> + use<> {
        let family = self.family();
        // A hand-built range mixing families yields nothing rather than addresses of one family
        // made from the other's numbers.
        let numbers = (!self.is_empty()).then(|| to_u128(self.first)..=to_u128(self.last));
        numbers.into_iter().flatten().map(move |ip| from_u128(family, ip))
    }

    /// Sorts ranges and merges those that overlap or touch, so each address is in exactly one
    /// range and counting them never counts an address twice.
    pub(crate) fn normalize(mut ranges: Vec<AddressRange>) -> Vec<AddressRange> {
        ranges.sort();
        let mut merged: Vec<AddressRange> = Vec::with_capacity(ranges.len());
        for range in ranges {
            match merged.last_mut() {
                Some(prev)
                    if prev.family() == range.family()
                        && to_u128(range.first) <= to_u128(prev.last).saturating_add(1) =>
                {
                    prev.last = prev.last.max(range.last);
                }
                _ => merged.push(range),
            }
        }
        merged
    }
}

/// `192.0.2.200-192.0.2.250`, or just `192.0.2.7` for a range of one address.
impl fmt::Display for AddressRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last { write!(f, "{}", self.first) } else { write!(f, "{}-{}", self.first, self.last) }
    }
}

fn parse_ip(s: &str) -> Result<IpAddr, String> {
    s.parse().map_err(|_| format!("{s:?} is not an IP address"))
}

/// Addresses as numbers, so ranges can be counted and stepped through. IPv4 addresses map to
/// 0..2^32, which is why a family travels with every conversion back.
pub(crate) fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// The inverse of [`to_u128`]; `n` must come from an address of `family`.
pub(crate) fn from_u128(family: Family, n: u128) -> IpAddr {
    match family {
        // Truncation can't happen: IPv4 numbers come from `to_u128` of IPv4 addresses.
        Family::V4 => IpAddr::V4(Ipv4Addr::from(n as u32)),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test IP")
    }

    fn range(s: &str) -> AddressRange {
        AddressRange::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn the_demo_pools_have_51_addresses() {
        let v4 = range("192.0.2.200-192.0.2.250");
        assert_eq!((v4.first, v4.last, v4.len()), (ip("192.0.2.200"), ip("192.0.2.250"), 51));
        let v6 = range("2001:db8:1::c8-2001:db8:1::fa");
        assert_eq!((v6.first, v6.last, v6.len()), (ip("2001:db8:1::c8"), ip("2001:db8:1::fa"), 51));
        assert_eq!(v4.family(), Family::V4);
        assert_eq!(v6.family(), Family::V6);
    }

    #[test]
    fn cidrs_cover_their_whole_network() {
        let r = range("192.0.2.0/24");
        assert_eq!((r.first, r.last, r.len()), (ip("192.0.2.0"), ip("192.0.2.255"), 256));
        // Host bits set: the network they are in, as MetalLB reads it.
        assert_eq!(range("192.0.2.77/24"), r);
        let r = range("2001:db8:1::/64");
        assert_eq!((r.first, r.last), (ip("2001:db8:1::"), ip("2001:db8:1::ffff:ffff:ffff:ffff")));
        assert_eq!(r.len(), 1 << 64);
        assert_eq!(range("0.0.0.0/0").len(), 1 << 32);
        assert_eq!(range("::/0").len(), u128::MAX, "saturates");
    }

    #[test]
    fn single_ips_are_ranges_of_one() {
        for s in ["192.0.2.7", "192.0.2.7/32", "192.0.2.7-192.0.2.7"] {
            let r = range(s);
            assert_eq!((r.first, r.last, r.len()), (ip("192.0.2.7"), ip("192.0.2.7"), 1), "{s}");
        }
        assert_eq!(range("2001:db8::7/128").len(), 1);
        assert_eq!(range("2001:db8::7").to_string(), "2001:db8::7");
    }

    #[test]
    fn spaces_are_allowed_around_the_dash_and_the_entry() {
        assert_eq!(range(" 192.0.2.200 - 192.0.2.250 "), range("192.0.2.200-192.0.2.250"));
        assert_eq!(range("2001:db8:1::c8 -2001:db8:1::fa"), range("2001:db8:1::c8-2001:db8:1::fa"));
    }

    #[test]
    fn bad_entries_say_what_is_wrong_and_name_the_entry() {
        let cases = [
            (
                "192.0.2.300/24",
                r#"address "192.0.2.300/24" is not a CIDR, an IP or a first-last range: "192.0.2.300" is not an IP address"#,
            ),
            (
                "192.0.2.0/33",
                r#"address "192.0.2.0/33" is not a CIDR, an IP or a first-last range: prefix length "33" is not a number from 0 to 32"#,
            ),
            (
                "2001:db8::/129",
                r#"address "2001:db8::/129" is not a CIDR, an IP or a first-last range: prefix length "129" is not a number from 0 to 128"#,
            ),
            (
                "192.0.2.0/",
                r#"address "192.0.2.0/" is not a CIDR, an IP or a first-last range: prefix length "" is not a number from 0 to 32"#,
            ),
            ("lan", r#"address "lan" is not a CIDR, an IP or a first-last range: "lan" is not an IP address"#),
            ("", r#"address "" is not a CIDR, an IP or a first-last range: it is empty"#),
            (
                "192.0.2.200-",
                r#"address "192.0.2.200-" is not a CIDR, an IP or a first-last range: "" is not an IP address"#,
            ),
            (
                "192.0.2.1-192.0.2.2-192.0.2.3",
                r#"address "192.0.2.1-192.0.2.2-192.0.2.3" is not a CIDR, an IP or a first-last range: a range has exactly one '-', between its first and last address"#,
            ),
            (
                "192.0.2.250-192.0.2.200",
                "range 192.0.2.250-192.0.2.200 is reversed: its first address is after its last",
            ),
            (
                "2001:db8::fa-2001:db8::c8",
                "range 2001:db8::fa-2001:db8::c8 is reversed: its first address is after its last",
            ),
            (
                "192.0.2.1-2001:db8::1",
                "range 192.0.2.1-2001:db8::1 mixes IPv4 and IPv6: its first and last address must be of one family",
            ),
            (
                "192.0.2.0/24-192.0.3.0/24",
                r#"address "192.0.2.0/24-192.0.3.0/24" is not a CIDR, an IP or a first-last range: "192.0.2.0/24" is not an IP address"#,
            ),
            (
                "192.0.2.01",
                r#"address "192.0.2.01" is not a CIDR, an IP or a first-last range: "192.0.2.01" is not an IP address"#,
            ),
        ];
        for (input, message) in cases {
            let err = AddressRange::parse(input).expect_err(input);
            assert_eq!(err.to_string(), message, "{input}");
        }
    }

    #[test]
    fn contains_respects_bounds_and_family() {
        let r = range("192.0.2.200-192.0.2.250");
        assert!(r.contains(ip("192.0.2.200")));
        assert!(r.contains(ip("192.0.2.250")));
        assert!(!r.contains(ip("192.0.2.199")));
        assert!(!r.contains(ip("192.0.2.251")));
        // ::ffff:192.0.2.220 is an IPv6 address, not in an IPv4 range.
        assert!(!r.contains(ip("::ffff:192.0.2.220")));
    }

    #[test]
    fn overlaps_needs_a_shared_address_of_one_family() {
        let lan = range("192.0.2.200-192.0.2.250");
        assert!(lan.overlaps(&range("192.0.2.200/29")));
        assert!(lan.overlaps(&range("192.0.2.250")));
        assert!(lan.overlaps(&range("192.0.2.0/24")));
        assert!(!lan.overlaps(&range("192.0.2.251-192.0.2.255")));
        assert!(!lan.overlaps(&range("192.0.2.199")));
        assert!(!range("0.0.0.0/0").overlaps(&range("::/0")));
    }

    #[test]
    fn nth_steps_through_the_range() {
        let r = range("192.0.2.254-192.0.3.1");
        let all: Vec<_> = (0..5).map(|n| r.nth(n)).collect();
        assert_eq!(
            all,
            [Some(ip("192.0.2.254")), Some(ip("192.0.2.255")), Some(ip("192.0.3.0")), Some(ip("192.0.3.1")), None]
        );
        assert_eq!(r.iter().collect::<Vec<_>>(), all.into_iter().flatten().collect::<Vec<_>>());
        assert_eq!(range("255.255.255.255").nth(1), None, "no wrapping into IPv6 numbers");
        assert_eq!(range("::/0").nth(u128::MAX), Some(ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")));
    }

    #[test]
    fn hand_built_nonsense_is_empty_not_a_panic() {
        let reversed = AddressRange { first: ip("192.0.2.9"), last: ip("192.0.2.1") };
        let mixed = AddressRange { first: ip("192.0.2.1"), last: ip("2001:db8::1") };
        for r in [reversed, mixed] {
            assert!(r.is_empty());
            assert_eq!(r.nth(0), None);
            assert_eq!(r.iter().count(), 0);
        }
    }

    #[test]
    fn normalize_merges_overlapping_and_touching_ranges_per_family() {
        let merged = AddressRange::normalize(vec![
            range("2001:db8::10-2001:db8::20"),
            range("192.0.2.10-192.0.2.20"),
            range("192.0.2.0/28"), // .0-.15, overlaps
            range("192.0.2.21"),   // touches
            range("192.0.2.30-192.0.2.40"),
            range("2001:db8::15-2001:db8::30"),
        ]);
        let shown: Vec<String> = merged.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["192.0.2.0-192.0.2.21", "192.0.2.30-192.0.2.40", "2001:db8::10-2001:db8::30"]);
        // 255.255.255.255 and :: are adjacent numbers but of different families.
        let merged = AddressRange::normalize(vec![range("255.255.255.255"), range("::")]);
        assert_eq!(merged.len(), 2);
    }

    /// Valid ranges of either family, with small and huge sizes.
    fn any_range() -> impl Strategy<Value = AddressRange> {
        prop_oneof![
            (any::<u32>(), any::<u32>()).prop_map(|(a, b)| AddressRange {
                first: IpAddr::V4(Ipv4Addr::from(a.min(b))),
                last: IpAddr::V4(Ipv4Addr::from(a.max(b))),
            }),
            (any::<u128>(), any::<u128>()).prop_map(|(a, b)| AddressRange {
                first: IpAddr::V6(Ipv6Addr::from(a.min(b))),
                last: IpAddr::V6(Ipv6Addr::from(a.max(b))),
            }),
            (any::<u128>(), 0u128..1000).prop_map(|(a, n)| {
                let a = a.min(u128::MAX - n);
                AddressRange { first: IpAddr::V6(Ipv6Addr::from(a)), last: IpAddr::V6(Ipv6Addr::from(a + n)) }
            }),
        ]
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in ".{0,64}") {
            let _ = AddressRange::parse(&s);
        }

        #[test]
        fn parse_never_panics_on_address_like_strings(s in "[0-9a-f:./ -]{0,48}") {
            if let Ok(r) = AddressRange::parse(&s) {
                prop_assert!(r.first <= r.last);
                prop_assert_eq!(r.family(), Family::of(&r.last));
            }
        }

        #[test]
        fn nth_contains_and_len_agree(r in any_range(), pick in any::<u128>()) {
            let len = r.len();
            prop_assert!(len >= 1);
            let i = pick % len;
            let ip = r.nth(i).expect("i < len");
            prop_assert!(r.contains(ip));
            prop_assert_eq!(r.nth(0), Some(r.first));
            prop_assert_eq!(r.nth(len - 1), Some(r.last));
            prop_assert_eq!(r.nth(len), None);
        }

        #[test]
        fn written_ranges_read_back(r in any_range()) {
            prop_assert_eq!(AddressRange::parse(&format!("{}-{}", r.first, r.last)), Ok(r));
            prop_assert_eq!(AddressRange::parse(&r.to_string()), Ok(r));
        }

        #[test]
        fn normalize_keeps_every_address_once(ranges in proptest::collection::vec(any_range(), 0..8), probe in any_range()) {
            let merged = AddressRange::normalize(ranges.clone());
            for pair in merged.windows(2) {
                prop_assert!(!pair[0].overlaps(&pair[1]), "{} and {}", pair[0], pair[1]);
            }
            for ip in [probe.first, probe.last] {
                let before = ranges.iter().any(|r| r.contains(ip));
                let after = merged.iter().filter(|r| r.contains(ip)).count();
                prop_assert_eq!(after, usize::from(before));
            }
        }
    }
}

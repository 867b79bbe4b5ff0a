//! Connections in flight when an address moves: sent on to the node that used to announce it.
//!
//! When node B takes an address over from node A while A still runs (A was cordoned, or its
//! speaker restarts), the client's neighbour cache moves to B at once, but its established
//! connections live in A's conntrack: without help, B would translate their next packets to a
//! random endpoint, which answers with a reset. So, for a while, B copies every TCP packet that
//! does not open a connection and that B has no flow for to A (`dup to A`, at layer 2, no route
//! lookup and no ICMP redirect) and drops its own copy. A's conntrack carries the connection to
//! its end; new connections go through B.
//!
//! ```text
//!   client ──(ACK, data of an old connection)──> B ── ct state new, no SYN ──> dup to A ──> pod
//!   client ──(SYN)──────────────────────────────> B ── DNAT as usual ──────────────────────> pod
//! ```
//!
//! Only while A is alive (a dead node's connections are lost anyway, and copying to it would
//! turn a fast reset into a timeout). The chain lives in the data plane's table, `handover`, with
//! a rule per moved address, replaced whole in one transaction.

use std::net::IpAddr;

use super::model::Family;

/// One moved address: packets of its old connections go to `previous` through `interface`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Handover {
    /// The LoadBalancer address this node took over.
    pub ip: IpAddr,
    /// The node address of the previous announcer (same family as `ip`).
    pub previous: IpAddr,
    /// The interface to reach it on.
    pub interface: String,
}

/// The chain's priority: after conntrack (-200), before DNAT (-100).
const PRIORITY: &str = "mangle";

fn family_words(family: Family) -> (&'static str, &'static str) {
    match family {
        Family::V4 => ("ip", "ip"),
        Family::V6 => ("ip6", "ip6"),
    }
}

/// The transaction that makes chain `handover` of `family`'s table hold exactly `handovers`
/// (those of the other family are left out). Cheap to apply at any size of the table: only
/// `add table`, `add chain … { rules }` and `flush chain`, which need no dump of the table.
pub fn render(family: Family, handovers: &[Handover]) -> String {
    let (table_family, addr) = family_words(family);
    let t = format!("{table_family} ferrolb");
    let base = format!("type filter hook prerouting priority {PRIORITY}; policy accept;");
    let mut out = format!("add table {t}\nadd chain {t} handover {{ {base} }}\nflush chain {t} handover\n");
    out.push_str(&format!("add chain {t} handover {{\n  {base}\n"));
    let mut hs: Vec<&Handover> = handovers
        .iter()
        .filter(|h| h.ip.is_ipv4() == (family == Family::V4) && h.previous.is_ipv4() == h.ip.is_ipv4())
        .collect();
    hs.sort();
    hs.dedup();
    for h in hs {
        out.push_str(&format!(
            "  {addr} daddr {} meta l4proto tcp tcp flags & syn == 0 ct state new,invalid dup to {} device \"{}\" drop comment \"in flight before the takeover\"\n",
            h.ip,
            h.previous,
            h.interface.replace('"', "")
        ));
    }
    out.push_str("}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(ip: &str, prev: &str) -> Handover {
        Handover { ip: ip.parse().unwrap(), previous: prev.parse().unwrap(), interface: "eth0".into() }
    }

    #[test]
    fn renders_a_rule_per_moved_address_of_the_family() {
        let hs = [h("192.0.2.200", "192.0.2.11"), h("2001:db8:1::c8", "2001:db8:1::11")];
        let v4 = render(Family::V4, &hs);
        assert!(v4.contains("flush chain ip ferrolb handover\n"));
        assert!(v4.contains(
            "ip daddr 192.0.2.200 meta l4proto tcp tcp flags & syn == 0 ct state new,invalid dup to 192.0.2.11 device \"eth0\" drop"
        ));
        assert!(!v4.contains("2001:db8"));
        let v6 = render(Family::V6, &hs);
        assert!(v6.contains("ip6 daddr 2001:db8:1::c8 "));
        assert!(v6.contains("dup to 2001:db8:1::11 device"));
        assert!(!v6.contains("192.0.2"));
    }

    #[test]
    fn no_handover_leaves_an_empty_chain() {
        let t = render(Family::V4, &[]);
        assert!(t.ends_with("policy accept;\n}\n"), "{t}");
    }

    #[test]
    fn mixed_families_are_skipped() {
        assert!(!render(Family::V4, &[h("192.0.2.200", "2001:db8:1::11")]).contains("dup to"));
    }
}

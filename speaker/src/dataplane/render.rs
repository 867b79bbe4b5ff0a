//! Renders a [`Model`] as one nftables transaction (text for `nft -f -`). Pure and deterministic.
//!
//! The ruleset follows kube-proxy's nftables mode. Per packet, the cost is a few map lookups, not
//! a walk over services:
//!
//! ```text
//!  nat-prerouting / nat-output ──> services
//!     daddr . l4proto . dport  vmap @service-ips ──> svc-H   (ClusterIP, Cluster policy)
//!                                                 ─> local-H (ClusterIP, internalTrafficPolicy Local)
//!                                                 ─> ext-H   (externalIPs, LB IPs)
//!     fib daddr local, daddr @node-ips, l4proto . dport vmap @service-nodeports ──> ext-H
//!  ext-H:   Cluster: mark for masquerade, goto svc-H
//!           Local:   pod / node-local sources goto svc-H; others goto local-H (or fall through)
//!  svc-H, local-H:  dnat to a random endpoint of the port's key in map endpoints-PROTO-XX:
//!                   K1 . K2 . numgen random mod N [offset O]  ->  address . port
//!                   session affinity instead: saddr @aff-E: update @aff-E, dnat to E; then a
//!                   numgen cascade, each rule: update @aff-E, dnat to E
//!  nat-postrouting ──> masquerading: packets carrying the mark, and hairpin ones
//!                   (ct status dnat, saddr . daddr @hairpin: a pod that reached itself)
//!  filter hooks (ct state new):  firewall-check      daddr . l4proto . dport vmap @firewall-ips
//!                                service-endpoints-check / nodeport-endpoints-check: reject or drop
//!                                cluster-ips-check   reject unknown ports of cluster IPs, drop
//!                                                    unallocated addresses of the service CIDRs
//! ```
//!
//! `H` is the first 16 hex digits of `sha256("ns/name/port-name/proto")` (affinity sets: the same
//! over the endpoint and timeout too): names stay stable across syncs, so a partial sync can
//! address them.
//!
//! Chains are few on purpose, one or two per service port and none per endpoint: on every commit
//! that adds a `dnat`, `goto` or `jump`, the kernel validates every chain reachable from each
//! base chain, and before any deletion `nft` dumps every chain (see [`render_partial`]). Endpoints
//! are map elements, so most endpoint changes rewrite no rule at all (see `dispatch`).
//!
//! A full sync deletes and recreates the table inside one transaction: atomic (packets see the
//! old or the new ruleset, never none), idempotent, and it removes anything stale (chains of
//! removed services, affinity sets with an old timeout) without needing to read the kernel's
//! state. The price: learned session-affinity entries are forgotten on a full sync (at start and
//! after a failure), not on partial syncs.

//!
//! The parts: [`base`] (global sets, base chains), [`services`] (one Service's objects),
//! [`slots`] (where ports' endpoints sit in the endpoint maps), all as values of
//! [`super::nft`], which renders them.

use std::collections::BTreeSet;

use super::model::{Family, Model};
use super::nft::{Element, Op, Transaction};

pub mod base;
#[cfg(test)]
mod equivalence;
#[doc(hidden)]
pub mod fixtures;
pub mod ruleset;
pub mod services;
pub mod slots;

pub use super::nft::{COMMENT_MAX, TABLE};
pub use base::MASQUERADE_MARK;
pub use ruleset::Ruleset;
pub use services::FAULT_REJECT_SERVICE_ENV;
use services::Verdict;

/// A transaction that rebuilds the whole table for `model`, atomically.
///
/// Every object comes with its content in one command (a set with its `elements`, a chain with
/// its rules), and there is no `add rule` or `add element`: `nft` then needs no cache of the
/// kernel's table, which it would otherwise dump in full when the table already exists, and it
/// parses a few thousand commands instead of one per rule and element. Objects come after what
/// they refer to: sets, then chains (those that others jump to first), then the verdict maps'
/// elements, which point at chains.
pub fn render_full(model: &Model) -> String {
    render_table(model, true)
}

/// [`render_full`] for a table that is empty (just created by [`render_create_table`]): no
/// deletion. A transaction that deletes a table waits for the kernel (~15 ms, even for an empty
/// one), a tenth of a cold full sync of 1,000 services.
pub fn render_create(model: &Model) -> String {
    render_table(model, false)
}

fn element<'a>(key: &'a str, verdict: Option<&Verdict>) -> Element<'a> {
    match verdict {
        Some(v) => Element::pair(key, v.to_string()),
        None => Element::key(key),
    }
}

fn render_table(model: &Model, replace: bool) -> String {
    Ruleset::new(model).render_full(replace)
}

/// What a partial sync does: a transaction to apply now, and the names of objects it left
/// behind (emptied, unreferenced) for [`render_cleanup`] to delete later.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PartialSync {
    /// The transaction (empty: nothing to do). When `full` is set, it is [`render_full`]'s.
    pub now: String,
    /// `prev` and `next` differ in node, family or mode: `now` rebuilds the table, and nothing
    /// stale is left in it.
    pub full: bool,
    /// Chains no longer used, already flushed by `now`.
    pub stale_chains: Vec<String>,
    /// Affinity sets no longer used (nothing refers to them after `now`).
    pub stale_sets: Vec<String>,
    /// Hairpin elements (`ip . ip`) of addresses that are no longer endpoints. Harmless while they
    /// stay: only a DNAT to that address can make a packet match one.
    pub stale_hairpin: Vec<String>,
}

/// A transaction that turns the table rendered for `prev` into the one for `next`, touching only
/// what differs: chains and affinity sets of changed services are added or rewritten (flush,
/// then re-add with their rules), map elements are deleted or added, endpoint maps and the
/// node-address and pod-CIDR sets are refilled (flush, then re-add) when they changed. Chains
/// and sets no longer used are emptied and reported, not deleted (see below).
///
/// It assumes the kernel holds what `prev` rendered (plus stale objects); after a failed
/// transaction the caller must use [`render_full`]. A change of node, family, mode or service
/// CIDRs is a full sync.
///
/// Why this shape: `nft` reads the kernel's state into a cache before it runs commands, and
/// what it reads depends on the commands. `add rule`, `add element` and every `delete` make it
/// dump every chain of every table, which the kernel does in time quadratic in the number of
/// chains. `add chain` with a rule block, `flush chain`, and `add set`/`add map` with an
/// `elements` block need the table list only; sets the rules refer to are declared again (an
/// idempotent `add`) so that `nft` knows their types without reading them. So only element
/// deletions (a service, a port or its last endpoint going away) pay for the dump; chain and set
/// deletions, and those of hairpin elements (harmless while they stay), are deferred.
///
/// This is [`Ruleset::update`] from a table rendered for `prev`; a speaker keeps its [`Ruleset`]
/// from one sync to the next instead, and renders only the Services that changed.
pub fn render_partial(prev: &Model, next: &Model) -> PartialSync {
    let mut ruleset = Ruleset::new(prev);
    let keys = ruleset.all_keys(next);
    ruleset.update(next, &keys).0
}

/// A transaction deleting the stale chains, sets and hairpin elements that `model` does not use
/// (again); empty when there is nothing to delete. Run it when the data plane is idle: deletions
/// make `nft` read every chain (see [`render_partial`]).
pub fn render_cleanup(
    model: &Model,
    stale_chains: &BTreeSet<String>,
    stale_sets: &BTreeSet<String>,
    stale_hairpin: &BTreeSet<String>,
) -> String {
    Ruleset::new(model).render_cleanup(stale_chains, stale_sets, stale_hairpin)
}

/// A transaction that creates an empty table for `family`, and fails if there is one: how a
/// starting speaker learns, without reading the kernel's ruleset (which `nft` does slowly once
/// the table is large), whether it must replace a table or can fill a new one.
pub fn render_create_table(family: Family) -> String {
    let mut tx = Transaction::new(family);
    tx.push(Op::CreateTable);
    tx.render()
}

/// A transaction that removes the table of `family` (on shutdown, or when the data plane is
/// switched off). Adding it first makes the deletion succeed whether or not it existed.
pub fn render_delete(family: Family) -> String {
    let mut tx = Transaction::new(family);
    tx.push(Op::AddTable);
    tx.push(Op::DeleteTable);
    tx.render()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::fixtures::*;
    use super::services::service_comment;
    use super::*;
    use crate::dataplane::model::Mode;
    use crate::dataplane::nft::bounded_comment;

    #[test]
    fn snapshots() {
        for (name, m) in fixtures() {
            insta::assert_snapshot!(name, render_full(&m));
        }
    }

    #[test]
    fn delete_snapshot() {
        insta::assert_snapshot!(
            render_delete(Family::V6),
            @r"
        add table ip6 ferrolb
        delete table ip6 ferrolb
        "
        );
    }

    /// The same facts in any order give the same text.
    #[test]
    fn rendering_is_deterministic() {
        for (name, m) in fixtures() {
            let mut shuffled = m.clone();
            shuffled.node_ips.reverse();
            shuffled.pod_cidrs.reverse();
            let services: Vec<_> = shuffled.services.into_iter().rev().collect();
            shuffled.services = BTreeMap::new();
            for (key, mut svc) in services {
                svc.cluster_ips.reverse();
                svc.lb_ips.reverse();
                svc.source_ranges.reverse();
                svc.ports.reverse();
                for p in &mut svc.ports {
                    p.endpoints.reverse();
                }
                shuffled.services.insert(key, svc);
            }
            assert_eq!(render_full(&m), render_full(&shuffled), "{name}");
        }
    }

    #[test]
    fn nodeports_never_listen_on_loopback() {
        let text = render_full(&fixtures()[1].1);
        assert!(
            text.contains(
                "node-ips { type ipv4_addr ; comment \"addresses NodePorts listen on\" ; elements = { 192.0.2.11 } ; }"
            ),
            "{text}"
        );
        assert!(!text.contains("127.0.0.1"));
    }

    #[test]
    fn lb_only_renders_only_lb_dispatch() {
        let (_, m) = fixtures().pop().unwrap();
        let text = render_full(&m);
        assert!(!text.contains("198.19."), "no cluster IPs:\n{text}");
        assert!(!text.contains("31001"), "no node ports:\n{text}");
        assert!(!text.contains("192.0.2.150"), "no externalIPs:\n{text}");
        assert!(text.contains("192.0.2.200 . tcp . 80 : goto ext-"));
    }

    /// kube-proxy's "Drop traffic to unallocated ClusterIPs", in the full data plane only; the
    /// rule is in a base chain, so a change of the service CIDRs is a full sync.
    #[test]
    fn unallocated_service_cidr_addresses_are_dropped() {
        let mut m = model(Mode::Full, vec![("lb", lb(false))]);
        assert!(!render_full(&m).contains("unallocated"), "no service CIDR known: no rule");
        m.service_cidrs = vec![net("198.19.0.0/16"), net("2001:db8:ff::/112")];
        let text = render_full(&m);
        assert!(
            text.contains(
                "add chain ip ferrolb cluster-ips-check { ip daddr @cluster-ips reject comment \"no service on \
                 this cluster IP port\" ; ip daddr { 198.19.0.0/16 } drop comment \"unallocated address of a \
                 service CIDR\" ; }"
            ),
            "{text}"
        );
        assert!(!text.contains("2001:db8:ff::"), "the other family's CIDR stays out:\n{text}");
        let mut lb_only = m.clone();
        lb_only.mode = Mode::LbOnly;
        assert!(!render_full(&lb_only).contains("198.19.0.0/16"), "beside kube-proxy, kube-proxy drops");
        let mut prev = m.clone();
        prev.service_cidrs.clear();
        let partial = render_partial(&prev, &m);
        assert!(partial.full && partial.now.contains("ip daddr { 198.19.0.0/16 } drop"));
        assert!(!render_partial(&m, &m.clone()).full);
    }

    /// kube-proxy's allowFromNode: a source range holding this node's address (never loopback)
    /// also admits the Service's LB IPs as sources, which is what a node with the LB IP on a
    /// local interface sends from.
    #[test]
    fn a_source_range_holding_the_node_admits_the_lb_ips() {
        let mut svc = lb(false);
        svc.source_ranges = vec![net("203.0.113.0/24"), net("127.0.0.0/8")];
        let text = render_full(&model(Mode::Full, vec![("lb", svc.clone())]));
        assert!(text.contains("ip saddr != { 127.0.0.0/8, 203.0.113.0/24 } drop"), "{text}");
        svc.source_ranges.push(net("192.0.2.0/28"));
        let text = render_full(&model(Mode::Full, vec![("lb", svc)]));
        assert!(text.contains("ip saddr != { 127.0.0.0/8, 192.0.2.0/28, 203.0.113.0/24, 192.0.2.200 } drop"), "{text}");
    }

    #[test]
    fn partial_touches_only_changes() {
        let prev = combined();
        assert_eq!(render_partial(&prev, &prev), PartialSync::default());
        let next = next_of(&prev);
        let partial = render_partial(&prev, &next);
        assert!(!partial.full && !partial.now.contains("add table"));
        // Commands that would make `nft` read every chain, except the element deletions.
        for l in partial.now.lines() {
            assert!(!l.starts_with("add rule") && !l.starts_with("add element"), "{l}");
            assert!(!l.starts_with("delete") || l.starts_with("delete element"), "{l}");
        }
        insta::assert_snapshot!("partial", partial.now);
        let (chains, sets, hairpin) = stale(&partial);
        insta::assert_snapshot!("cleanup", render_cleanup(&next, &chains, &sets, &hairpin));
    }

    #[test]
    fn partial_falls_back_to_full_on_mode_change() {
        let prev = combined();
        let mut next = prev.clone();
        next.mode = Mode::LbOnly;
        let partial = render_partial(&prev, &next);
        assert!(partial.full);
        assert_eq!(partial.now, render_full(&next));
    }

    /// A stale chain that a later sync brings back is not deleted by the cleanup.
    #[test]
    fn cleanup_spares_what_came_back() {
        let prev = combined();
        let next = next_of(&prev);
        let forth = render_partial(&prev, &next);
        let back = render_partial(&next, &prev);
        let (chains, sets, hairpin) = stale(&forth);
        assert!(!chains.is_empty());
        assert!(!back.now.is_empty());
        assert_eq!(render_cleanup(&prev, &chains, &sets, &hairpin), "");
    }

    /// The longest names the API server accepts: namespace 63, Service 63, port name 63, node
    /// name 253 characters.
    #[test]
    fn longest_names_stay_within_nft_limits() {
        let m = longest_names();
        let text = render_full(&m);
        let mut comments = BTreeSet::new();
        for (i, part) in text.split("comment \"").enumerate().skip(1) {
            let comment = part.split('"').next().unwrap();
            assert!(comment.len() <= COMMENT_MAX, "comment {i} has {} bytes: {comment}", comment.len());
            comments.insert(comment.to_owned());
        }
        let cut: Vec<&String> = comments.iter().filter(|c| c.contains('~')).collect();
        assert_eq!(cut.len(), 7, "svc, ext, fw of the first; svc, local, ext, fw of the second: {cut:#?}");
        for l in text.lines() {
            for word in l.split([' ', '@']).filter(|w| w.starts_with("svc-") || w.starts_with("aff-")) {
                assert!(word.len() < 256, "{word}");
            }
        }
        // Whatever a name holds, a comment stays one safe string.
        let odd = service_comment("a\"b\nc;é/\\", "all endpoints");
        assert_eq!(odd, "a_b_c__/_: all endpoints");
        assert_eq!(bounded_comment(&"é".repeat(200)).len(), COMMENT_MAX);
        let short = service_comment("ns/name/http/tcp", "all endpoints");
        assert_eq!(short, "ns/name/http/tcp: all endpoints");
    }
}

//! The renderer as it was before the typed layer (commit 5d3717b), kept as the oracle the
//! equivalence tests compare the new renderer with, byte for byte. Test-only.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use sha2::{Digest, Sha256};

use super::super::model::{Endpoint, Family, Mode, Model, PortModel, Protocol, ServiceKey, ServiceModel};

/// The table name, in both the `ip` and the `ip6` family.
pub const TABLE: &str = "ferrolb";

/// The packet mark bit that asks `nat-postrouting` to masquerade: kube-proxy's bit, which CNIs
/// already keep clear of.
pub const MASQUERADE_MARK: u32 = 0x4000;

const SERVICE_IPS: &str = "service-ips";
const SERVICE_NODEPORTS: &str = "service-nodeports";
const NO_ENDPOINT_SERVICES: &str = "no-endpoint-services";
const NO_ENDPOINT_NODEPORTS: &str = "no-endpoint-nodeports";
const FIREWALL_IPS: &str = "firewall-ips";
const CLUSTER_IPS: &str = "cluster-ips";
const NODE_IPS: &str = "node-ips";
const POD_CIDRS: &str = "pod-cidrs";
const HAIRPIN: &str = "hairpin";
/// Endpoint maps are named `endpoints-PROTO-XX`, `XX` from the service port's hash.
const ENDPOINTS: &str = "endpoints";

const REJECT: &str = "goto reject-chain";

/// Test hook, for the lab only: `FERROLB_FAULT_REJECT_SERVICE=namespace/name` in the speaker's
/// environment (read once, at the first render) gives that Service a chain holding
/// [`FAULT_RULE`], which `nft` refuses, so that tests can watch a refused Service being left out
/// while the rest is applied. Unset in any real deployment.
pub const FAULT_REJECT_SERVICE_ENV: &str = "FERROLB_FAULT_REJECT_SERVICE";

/// Not a rule: `nft` stops at it with a syntax error.
const FAULT_RULE: &str = "ferrolb-fault-hook-refuse-this";

static FAULT_REJECT_SERVICE: std::sync::LazyLock<Option<ServiceKey>> = std::sync::LazyLock::new(|| {
    let v = std::env::var(FAULT_REJECT_SERVICE_ENV).ok()?;
    let (namespace, name) = v.trim().split_once('/')?;
    Some(ServiceKey::new(namespace, name))
});
const DROP: &str = "drop";

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

fn render_table(model: &Model, replace: bool) -> String {
    let f = Fam::of(model.family);
    let mut services = Objects::default();
    let mut elements = Elements::new();
    let mut buckets = Buckets::new();
    let mut slots = Slots::default();
    for (key, svc) in &model.services {
        build_service(model, key, svc, Some(&mut services), &mut elements, &mut buckets, &mut slots);
    }
    let mut lists: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    if model.mode == Mode::Full {
        lists.entry(NODE_IPS).or_default().extend(model.nodeport_ips().iter().map(ToString::to_string));
    }
    lists.entry(POD_CIDRS).or_default().extend(model.local_pod_cidrs().into_iter().map(|n| canonical(n).to_string()));
    for ((map, key), value) in &elements {
        let element = if value.is_empty() { key.clone() } else { format!("{key} : {value}") };
        lists.entry(map).or_default().push(element);
    }

    let mut out = String::new();
    let t = f.table();
    if replace {
        line(&mut out, format_args!("add table {t}"));
        line(&mut out, format_args!("delete table {t}"));
        line(&mut out, format_args!("add table {t} {{ comment \"managed by ferrolb-speaker\" ; }}"));
    } else {
        line(&mut out, format_args!("add table {t} {{ comment \"managed by ferrolb-speaker\" ; }}"));
    }

    out.push_str("\n# sets and maps (verdict maps are filled at the end)\n");
    let sets = global_sets(model, &f);
    for (name, spec) in &sets {
        let kind = set_kind(spec);
        let list = if kind == "set" { lists.get(name).map_or(&[][..], Vec::as_slice) } else { &[] };
        declare(&mut out, &t, kind, name, spec, list);
    }
    for (name, spec) in &services.sets {
        declare(&mut out, &t, "set", name, spec, &[]);
    }
    for (name, list) in &buckets {
        let list: Vec<String> = list.iter().cloned().collect();
        declare(&mut out, &t, "map", name, &f.endpoint_map_spec(name), &list);
    }

    out.push_str("\n# chains\n");
    let base = base_chains(model, &f);
    for (name, _, rules) in base.iter().filter(|(_, spec, _)| spec.is_empty()) {
        chain_with_rules(&mut out, &t, name, "", rules);
    }
    // Service chains: the external ones jump to the others.
    for external in [false, true] {
        for (name, chain) in services.chains.iter().filter(|(n, _)| n.starts_with("ext-") == external) {
            chain_block(&mut out, &f, name, chain);
        }
    }
    for (name, spec, rules) in base.iter().filter(|(_, spec, _)| !spec.is_empty()) {
        chain_with_rules(&mut out, &t, name, spec, rules);
    }

    out.push_str("\n# verdict map elements\n");
    for (name, spec) in sets.iter().filter(|(_, spec)| set_kind(spec) == "map") {
        set_block(&mut out, &t, "map", name, spec, lists.get(name).map_or(&[][..], Vec::as_slice));
    }
    out
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
/// node-address and pod-CIDR sets are refilled (flush, then re-add) when they changed. Chains and sets no longer used are emptied and
/// reported, not deleted (see below).
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
pub fn render_partial(prev: &Model, next: &Model) -> PartialSync {
    // The service CIDRs are in a base chain's rule: a rare change, made by a full sync.
    if prev.node != next.node
        || prev.family != next.family
        || prev.mode != next.mode
        || prev.service_cidrs_of_family() != next.service_cidrs_of_family()
    {
        return PartialSync { now: render_full(next), full: true, ..PartialSync::default() };
    }
    let f = Fam::of(next.family);
    let t = f.table();

    // Elements are compared over all services: two services may claim the same address and port,
    // and which one wins must not depend on which of them changed. Slots are placed over all
    // services too.
    let (mut old_elements, mut new_elements) = (Elements::new(), Elements::new());
    let (mut old_buckets, mut new_buckets) = (Buckets::new(), Buckets::new());
    let (mut old_slots, mut new_slots) = (Slots::default(), Slots::default());
    for (model, elements, buckets, slots) in [
        (prev, &mut old_elements, &mut old_buckets, &mut old_slots),
        (next, &mut new_elements, &mut new_buckets, &mut new_slots),
    ] {
        for (key, svc) in &model.services {
            build_service(model, key, svc, None, elements, buckets, slots);
        }
    }
    // A service changed, or one whose endpoints moved to other keys (another one took its range):
    // ids are `namespace/name/port/protocol`.
    let moved: BTreeSet<&str> = old_slots
        .placed
        .iter()
        .filter(|(id, slot)| new_slots.placed.get(*id).is_some_and(|s| s != *slot))
        .filter_map(|(id, _)| id.rsplitn(3, '/').nth(2))
        .collect();
    let changed: BTreeSet<&ServiceKey> = prev
        .services
        .keys()
        .chain(next.services.keys())
        .filter(|k| {
            prev.services.get(*k) != next.services.get(*k)
                || (!moved.is_empty() && moved.contains(k.to_string().as_str()))
        })
        .collect();
    let (mut old, mut new) = (Objects::default(), Objects::default());
    for (model, objects, slots) in [(prev, &mut old, &mut old_slots), (next, &mut new, &mut new_slots)] {
        for key in &changed {
            if let Some(svc) = model.services.get(*key) {
                build_service(model, key, svc, Some(&mut *objects), &mut Elements::new(), &mut Buckets::new(), slots);
            }
        }
    }

    let mut body = String::new();
    // Chains first, empty, so that rules may jump to any of them.
    for (name, chain) in &new.chains {
        if !old.chains.contains_key(name) {
            add_chain(&mut body, &f, name, &chain.comment);
        }
    }
    for (name, chain) in &new.chains {
        match old.chains.get(name) {
            Some(before) if before.rules == chain.rules => continue,
            Some(_) => line(&mut body, format_args!("flush chain {t} {name}")),
            None => {}
        }
        chain_block(&mut body, &f, name, chain);
    }
    // Emptying doomed chains drops their references to other chains and to affinity sets.
    let stale_chains: Vec<String> = old.chains.keys().filter(|n| !new.chains.contains_key(*n)).cloned().collect();
    for name in &stale_chains {
        line(&mut body, format_args!("flush chain {t} {name}"));
    }

    let sets = global_sets(next, &f);
    let spec_of = |name: &str| sets.iter().find(|(n, _)| *n == name).map(|(_, spec)| spec.as_str());
    if prev.nodeport_ips() != next.nodeport_ips() && next.mode == Mode::Full {
        line(&mut body, format_args!("flush set {t} {NODE_IPS}"));
        let ips: Vec<String> = next.nodeport_ips().iter().map(ToString::to_string).collect();
        set_block(&mut body, &t, "set", NODE_IPS, spec_of(NODE_IPS).unwrap_or_default(), &ips);
    }
    if prev.local_pod_cidrs() != next.local_pod_cidrs() {
        line(&mut body, format_args!("flush set {t} {POD_CIDRS}"));
        let nets: Vec<String> = next.local_pod_cidrs().into_iter().map(|n| canonical(n).to_string()).collect();
        set_block(&mut body, &t, "set", POD_CIDRS, spec_of(POD_CIDRS).unwrap_or_default(), &nets);
    }

    let mut stale_hairpin = Vec::new();
    for ((map, key), value) in &old_elements {
        if new_elements.get(&(*map, key.clone())) != Some(value) {
            if *map == HAIRPIN {
                stale_hairpin.push(key.clone());
            } else {
                line(&mut body, format_args!("delete element {t} {map} {{ {key} }}"));
            }
        }
    }
    let mut added: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for ((map, key), value) in &new_elements {
        if old_elements.get(&(*map, key.clone())) != Some(value) {
            let element = if value.is_empty() { key.clone() } else { format!("{key} : {value}") };
            added.entry(map).or_default().push(element);
        }
    }
    for (map, elements) in added {
        let spec = spec_of(map).unwrap_or_default();
        set_block(&mut body, &t, set_kind(spec), map, spec, &elements);
    }

    // An endpoint map that changed is emptied and filled again (a flush needs no cache, element
    // deletions would); one emptied for good is left for the cleanup.
    let mut stale_sets: Vec<String> = old.sets.keys().filter(|n| !new.sets.contains_key(*n)).cloned().collect();
    let mut declare_maps = new.buckets.clone();
    let names: BTreeSet<&String> = old_buckets.keys().chain(new_buckets.keys()).collect();
    for name in names {
        let (before, after) = (old_buckets.get(name), new_buckets.get(name));
        if before == after {
            continue;
        }
        declare_maps.insert(name.clone());
        if before.is_some() {
            line(&mut body, format_args!("flush map {t} {name}"));
        }
        match after {
            Some(list) => {
                let list: Vec<String> = list.iter().cloned().collect();
                set_block(&mut body, &t, "map", name, &f.endpoint_map_spec(name), &list);
            }
            None => stale_sets.push(name.clone()),
        }
    }
    if body.is_empty() {
        return PartialSync { stale_chains, stale_sets, stale_hairpin, ..PartialSync::default() };
    }
    // Declarations first: `nft` resolves `@set` references against them instead of reading the
    // kernel's sets. Re-adding an existing set with the same specification changes nothing.
    let mut now = String::new();
    for (name, spec) in &sets {
        declare(&mut now, &t, set_kind(spec), name, spec, &[]);
    }
    for (name, spec) in &new.sets {
        declare(&mut now, &t, "set", name, spec, &[]);
    }
    for name in &declare_maps {
        declare(&mut now, &t, "map", name, &f.endpoint_map_spec(name), &[]);
    }
    now.push_str(&body);
    PartialSync { now, full: false, stale_chains, stale_sets, stale_hairpin }
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
    let t = Fam::of(model.family).table();
    let mut used = Objects::default();
    let mut elements = Elements::new();
    let mut buckets = Buckets::new();
    let mut slots = Slots::default();
    for (key, svc) in &model.services {
        build_service(model, key, svc, Some(&mut used), &mut elements, &mut buckets, &mut slots);
    }
    let mut out = String::new();
    for name in stale_chains.iter().filter(|n| !used.chains.contains_key(*n)) {
        line(&mut out, format_args!("delete chain {t} {name}"));
    }
    for name in stale_sets.iter().filter(|n| !used.sets.contains_key(*n) && !buckets.contains_key(*n)) {
        line(&mut out, format_args!("delete set {t} {name}"));
    }
    for key in stale_hairpin.iter().filter(|k| !elements.contains_key(&(HAIRPIN, (*k).clone()))) {
        line(&mut out, format_args!("delete element {t} {HAIRPIN} {{ {key} }}"));
    }
    out
}

/// A transaction that creates an empty table for `family`, and fails if there is one: how a
/// starting speaker learns, without reading the kernel's ruleset (which `nft` does slowly once
/// the table is large), whether it must replace a table or can fill a new one.
pub fn render_create_table(family: Family) -> String {
    let t = Fam::of(family).table();
    format!("create table {t} {{ comment \"managed by ferrolb-speaker\" ; }}\n")
}

/// A transaction that removes the table of `family` (on shutdown, or when the data plane is
/// switched off). Adding it first makes the deletion succeed whether or not it existed.
pub fn render_delete(family: Family) -> String {
    let t = Fam::of(family).table();
    format!("add table {t}\ndelete table {t}\n")
}

/// Names and syntax that differ between the `ip` and `ip6` families.
struct Fam {
    /// Table family, and the payload keyword for addresses (`ip daddr`, `ip6 daddr`).
    nft: &'static str,
    /// Set element type of one address.
    addr_type: &'static str,
}

impl Fam {
    fn of(family: Family) -> Self {
        match family {
            Family::V4 => Fam { nft: "ip", addr_type: "ipv4_addr" },
            Family::V6 => Fam { nft: "ip6", addr_type: "ipv6_addr" },
        }
    }

    fn table(&self) -> String {
        format!("{} {TABLE}", self.nft)
    }

    /// Endpoint map `name`: `key -> address` (`endpoints-XX`) or `key -> address . port`
    /// (`endpoints-PROTO-XX`), the key being what `numgen random mod N offset BASE` gives (see
    /// [`Slot`]). With ports, one map per protocol: a `th dport` here, or another protocol's
    /// port, conflicts with the rule's `meta l4proto` when `nft` reads the map back from the
    /// kernel.
    fn endpoint_map_spec(&self, name: &str) -> String {
        let a = self.nft;
        match name.split('-').collect::<Vec<_>>()[..] {
            [_, proto, _] => {
                format!("typeof numgen random mod 1 : {a} daddr . {proto} dport ; comment \"endpoints by key\" ;")
            }
            _ => format!("typeof numgen random mod 1 : {a} daddr ; comment \"endpoint addresses by key\" ;"),
        }
    }

    /// An endpoint as a DNAT target: `ip:port`, or `[ip]:port` for IPv6.
    fn dnat_target(&self, e: &Endpoint) -> String {
        match e.ip {
            IpAddr::V4(ip) => format!("{ip}:{}", e.port),
            IpAddr::V6(ip) => format!("[{ip}]:{}", e.port),
        }
    }
}

/// A chain a service owns.
#[derive(Debug, PartialEq, Eq)]
struct Chain {
    /// Says which service port (and endpoint) the hashed name stands for.
    comment: String,
    rules: Vec<String>,
}

/// The chains and affinity sets of some services.
#[derive(Default)]
struct Objects {
    chains: BTreeMap<String, Chain>,
    /// Affinity set name -> its specification.
    sets: BTreeMap<String, String>,
    /// Endpoint maps the chains refer to.
    buckets: BTreeSet<String>,
}

/// Endpoint map name -> its elements (`k1 . k2 . index : address . port`).
type Buckets = BTreeMap<String, BTreeSet<String>>;

/// `(map or set, key) -> verdict` (empty for plain sets). The first service to claim a key keeps
/// it, services being visited in key order.
type Elements = BTreeMap<(&'static str, String), String>;

fn line(out: &mut String, args: std::fmt::Arguments<'_>) {
    // Writing to a String cannot fail.
    let _ = out.write_fmt(args);
    out.push('\n');
}

fn add_chain(out: &mut String, f: &Fam, name: &str, comment: &str) {
    let t = f.table();
    let comment = bounded_comment(comment);
    line(out, format_args!("add chain {t} {name} {{ comment \"{comment}\" ; }}"));
}

/// A chain and its rules in one command: `nft` needs no cache to add it.
fn chain_block(out: &mut String, f: &Fam, name: &str, chain: &Chain) {
    let comment = bounded_comment(&chain.comment);
    chain_with_rules(out, &f.table(), name, &format!("comment \"{comment}\" ;"), &chain.rules);
}

/// nft's limit on a comment, in bytes (`NFTNL_UDATA_COMMENT_MAXLEN`): one byte more and it
/// refuses the whole transaction ("comment too long").
pub const COMMENT_MAX: usize = 128;

/// `text` as nft can always take it inside `"…"`: characters other than ASCII letters, digits
/// and ` ./:_-~` become `_` (a `"` would end the string, a newline the command), and it is cut to
/// [`COMMENT_MAX`] bytes. Object names are DNS labels, so this changes nothing in practice, but
/// the bound holds whatever the API server lets through.
fn bounded_comment(text: &str) -> String {
    let mut safe = nft_safe(text);
    safe.truncate(COMMENT_MAX); // ASCII only: every byte is a character boundary.
    safe
}

/// `text` with every character but ASCII letters, digits and ` ./:_-~` replaced by `_`.
fn nft_safe(text: &str) -> String {
    text.chars().map(|c| if c.is_ascii_alphanumeric() || " ./:_-~".contains(c) { c } else { '_' }).collect()
}

/// The comment of a chain of service port `id` (`namespace/name/port/protocol`): `"{id}: {what}"`
/// when that fits in [`COMMENT_MAX`] bytes; otherwise the start of `id`, `~` and 8 hex digits of
/// its hash, so that the comment stays distinct per port and still says whose chain it is.
fn service_comment(id: &str, what: &str) -> String {
    let full = nft_safe(&format!("{id}: {what}"));
    if full.len() <= COMMENT_MAX {
        return full;
    }
    let tail = format!("~{}: {what}", &hash16(id)[..8]);
    let mut head = nft_safe(id);
    head.truncate(COMMENT_MAX.saturating_sub(tail.len()));
    bounded_comment(&format!("{head}{tail}"))
}

/// A chain with its specification (`type … ;`, empty for a regular chain) and rules in one
/// command.
fn chain_with_rules(out: &mut String, t: &str, name: &str, spec: &str, rules: &[String]) {
    if spec.is_empty() && rules.is_empty() {
        line(out, format_args!("add chain {t} {name}"));
        return;
    }
    let _ = write!(out, "add chain {t} {name} {{");
    if !spec.is_empty() {
        let _ = write!(out, " {spec}");
    }
    for rule in rules {
        let _ = write!(out, " {rule} ;");
    }
    out.push_str(" }\n");
}

/// `map` for a verdict map's specification, `set` otherwise.
fn set_kind(spec: &str) -> &'static str {
    if spec.contains(": verdict") { "map" } else { "set" }
}

/// A set or map declared with its elements (if any).
fn declare(out: &mut String, t: &str, kind: &str, name: &str, spec: &str, elements: &[String]) {
    if elements.is_empty() {
        line(out, format_args!("add {kind} {t} {name} {{ {spec} }}"));
    } else {
        set_block(out, t, kind, name, spec, elements);
    }
}

/// Elements added through a (re-)declaration of their set or map: `nft` needs no cache for it.
fn set_block(out: &mut String, t: &str, kind: &str, name: &str, spec: &str, elements: &[String]) {
    if elements.is_empty() {
        return;
    }
    let list = elements.join(", ");
    line(out, format_args!("add {kind} {t} {name} {{ {spec} elements = {{ {list} }} ; }}"));
}

fn claim(elements: &mut Elements, map: &'static str, key: String, value: &str) {
    elements.entry((map, key)).or_insert_with(|| value.to_owned());
}

fn hash16(input: &str) -> String {
    let digest = Sha256::digest(input.as_bytes());
    digest[..8].iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A network with its host bits cleared, as nftables wants prefixes.
fn canonical(net: IpNetwork) -> IpNetwork {
    IpNetwork::new(net.network(), net.prefix()).unwrap_or(net)
}

/// Sets and maps every table has: `(name, specification)`.
fn global_sets(model: &Model, f: &Fam) -> Vec<(&'static str, String)> {
    let a = f.addr_type;
    let by_addr = format!("type {a} . inet_proto . inet_service : verdict");
    let by_port = "type inet_proto . inet_service : verdict".to_owned();
    let mut sets = vec![
        (SERVICE_IPS, format!("{by_addr} ; comment \"ClusterIP, externalIP and LoadBalancer IP dispatch\" ;")),
        (NO_ENDPOINT_SERVICES, format!("{by_addr} ; comment \"services without usable endpoints: reject or drop\" ;")),
        (FIREWALL_IPS, format!("{by_addr} ; comment \"LoadBalancer IPs with loadBalancerSourceRanges\" ;")),
        (POD_CIDRS, format!("type {a} ; flags interval ; auto-merge ; comment \"this node's pod CIDRs\" ;")),
        (
            HAIRPIN,
            format!("type {a} . {a} ; comment \"endpoint . endpoint: a pod reaching itself through a service\" ;"),
        ),
    ];
    if model.mode == Mode::Full {
        sets.extend([
            (SERVICE_NODEPORTS, format!("{by_port} ; comment \"NodePort dispatch\" ;")),
            (NO_ENDPOINT_NODEPORTS, format!("{by_port} ; comment \"NodePorts without usable endpoints\" ;")),
            (CLUSTER_IPS, format!("type {a} ; comment \"every cluster IP\" ;")),
            (NODE_IPS, format!("type {a} ; comment \"addresses NodePorts listen on\" ;")),
        ]);
    }
    sets.sort();
    sets
}

/// Base and shared chains: `(name, specification, rules)`, in declaration order.
fn base_chains(model: &Model, f: &Fam) -> Vec<(&'static str, String, Vec<String>)> {
    let full = model.mode == Mode::Full;
    let a = f.nft;
    let hook =
        |kind: &str, hook: &str, prio: &str| format!("type {kind} hook {hook} priority {prio} ; policy accept ;");
    let only = |cond: bool, rule: &str| cond.then(|| rule.to_owned());
    let mark = MASQUERADE_MARK;
    let new_jump = |chain: &str| format!("ct state new jump {chain}");
    let by_addr = format!("{a} daddr . meta l4proto . th dport");
    let on_node = format!("fib daddr type local {a} daddr @{NODE_IPS} meta l4proto . th dport");
    let service_cidrs: Vec<String> =
        model.service_cidrs_of_family().into_iter().map(|n| canonical(n).to_string()).collect();

    // Priorities are numeric (dstnat is -100, srcnat 100): nft only takes the names on some hooks.
    let chains: Vec<(&'static str, String, Vec<Option<String>>)> = vec![
        // Before DNAT, so source ranges see the LoadBalancer IP.
        ("filter-prerouting", hook("filter", "prerouting", "-110"), vec![Some(new_jump("firewall-check"))]),
        ("filter-output", hook("filter", "output", "-110"), vec![Some(new_jump("firewall-check"))]),
        // After DNAT: what still carries a service address found no endpoint to go to.
        (
            "filter-input",
            hook("filter", "input", "-110"),
            vec![full.then(|| new_jump("nodeport-endpoints-check")), Some(new_jump("service-endpoints-check"))],
        ),
        (
            "filter-forward",
            hook("filter", "forward", "-110"),
            vec![Some(new_jump("service-endpoints-check")), full.then(|| new_jump("cluster-ips-check"))],
        ),
        (
            "filter-output-post-dnat",
            hook("filter", "output", "-90"),
            vec![Some(new_jump("service-endpoints-check")), full.then(|| new_jump("cluster-ips-check"))],
        ),
        ("nat-prerouting", hook("nat", "prerouting", "-100"), vec![Some("jump services".to_owned())]),
        ("nat-output", hook("nat", "output", "-100"), vec![Some("jump services".to_owned())]),
        ("nat-postrouting", hook("nat", "postrouting", "100"), vec![Some("jump masquerading".to_owned())]),
        ("mark-for-masquerade", String::new(), vec![Some(format!("meta mark set meta mark | {mark:#x}"))]),
        (
            "services",
            String::new(),
            vec![
                full.then(|| {
                    format!(
                        "{a} daddr @{CLUSTER_IPS} {a} saddr != @{POD_CIDRS} jump mark-for-masquerade \
                         comment \"cluster IP from outside this node's pods\""
                    )
                }),
                Some(format!("{by_addr} vmap @{SERVICE_IPS}")),
                full.then(|| format!("{on_node} vmap @{SERVICE_NODEPORTS}")),
            ],
        ),
        (
            "masquerading",
            String::new(),
            vec![
                Some(format!(
                    "ct status dnat {a} saddr . {a} daddr @{HAIRPIN} meta mark set meta mark | {mark:#x} \
                     comment \"hairpin\""
                )),
                Some(format!("meta mark & {mark:#x} == 0 return")),
                Some(format!("meta mark set meta mark ^ {mark:#x}")),
                Some("masquerade fully-random".to_owned()),
            ],
        ),
        ("firewall-check", String::new(), vec![Some(format!("{by_addr} vmap @{FIREWALL_IPS}"))]),
        ("service-endpoints-check", String::new(), vec![Some(format!("{by_addr} vmap @{NO_ENDPOINT_SERVICES}"))]),
        (
            "nodeport-endpoints-check",
            String::new(),
            vec![only(full, &format!("{on_node} vmap @{NO_ENDPOINT_NODEPORTS}"))],
        ),
        (
            "cluster-ips-check",
            String::new(),
            vec![
                only(full, &format!("{a} daddr @{CLUSTER_IPS} reject comment \"no service on this cluster IP port\"")),
                // As kube-proxy: an address of a service CIDR that is no ClusterIP goes nowhere
                // (routed on, it would make the node ARP for it on the LAN).
                (full && !service_cidrs.is_empty()).then(|| {
                    format!(
                        "{a} daddr {{ {} }} drop comment \"unallocated address of a service CIDR\"",
                        service_cidrs.join(", ")
                    )
                }),
            ],
        ),
        (
            "reject-chain",
            String::new(),
            vec![
                Some("meta l4proto tcp reject with tcp reset comment \"service without endpoints\"".to_owned()),
                Some("reject comment \"service without endpoints\"".to_owned()),
            ],
        ),
    ];
    chains
        .into_iter()
        .filter(|(name, _, _)| full || !matches!(*name, "nodeport-endpoints-check" | "cluster-ips-check"))
        .map(|(name, spec, rules)| (name, spec, rules.into_iter().flatten().collect()))
        .collect()
}

/// Adds the map elements of one service to `elements` and, when `objects` is given, its chains
/// and affinity sets.
fn build_service(
    model: &Model,
    key: &ServiceKey,
    svc: &ServiceModel,
    mut objects: Option<&mut Objects>,
    elements: &mut Elements,
    buckets: &mut Buckets,
    slots: &mut Slots,
) {
    let family = model.family;
    let f = Fam::of(family);
    let full = model.mode == Mode::Full;
    if let Some(objects) = objects.as_deref_mut()
        && FAULT_REJECT_SERVICE.as_ref() == Some(key)
    {
        let name = format!("fault-{}", hash16(&key.to_string()));
        let comment = service_comment(&key.to_string(), FAULT_REJECT_SERVICE_ENV);
        objects.chains.insert(name, Chain { comment, rules: vec![FAULT_RULE.to_owned()] });
    }
    let cluster_ips = if full { svc.cluster_ips_of(family) } else { Vec::new() };
    let lb_ips = svc.lb_ips_of(family);
    let mut outside_ips = if full { svc.external_ips_of(family) } else { Vec::new() };
    outside_ips.extend(lb_ips.iter().copied());
    outside_ips.sort();
    outside_ips.dedup();

    let mut ports: Vec<&PortModel> = svc.ports.iter().collect();
    ports.sort_by(|x, y| (x.proto, x.port, &x.name).cmp(&(y.proto, y.port, &y.name)));
    for port in ports {
        let id = format!("{key}/{}/{}", port.name, port.proto);
        let h = hash16(&id);
        let (svc_chain, local_chain, ext_chain) = (format!("svc-{h}"), format!("local-{h}"), format!("ext-{h}"));
        let all = port.cluster_endpoints(family);
        let local = port.local_endpoints(family, &model.node);
        let node_port = port.node_port.filter(|_| full);
        let has_outside = !outside_ips.is_empty() || node_port.is_some();
        let proto = port.proto;

        // Map elements.
        for ip in &cluster_ips {
            claim(elements, CLUSTER_IPS, ip.to_string(), "");
            let k = format!("{ip} . {proto} . {}", port.port);
            let (internal, target) = if svc.internal_local { (&local, &local_chain) } else { (&all, &svc_chain) };
            if !internal.is_empty() {
                claim(elements, SERVICE_IPS, k, &format!("goto {target}"));
            } else if !all.is_empty() {
                claim(elements, NO_ENDPOINT_SERVICES, k, DROP);
            } else {
                claim(elements, NO_ENDPOINT_SERVICES, k, REJECT);
            }
        }
        let mut outside_keys: Vec<(&'static str, &'static str, String)> = outside_ips
            .iter()
            .map(|ip| {
                let k = format!("{ip} . {proto} . {}", port.port);
                (SERVICE_IPS, NO_ENDPOINT_SERVICES, k)
            })
            .collect();
        if let Some(np) = node_port {
            let k = format!("{proto} . {np}");
            outside_keys.push((SERVICE_NODEPORTS, NO_ENDPOINT_NODEPORTS, k));
        }
        for (dispatch, no_endpoints, k) in outside_keys {
            if all.is_empty() {
                claim(elements, no_endpoints, k, REJECT);
                continue;
            }
            claim(elements, dispatch, k.clone(), &format!("goto {ext_chain}"));
            if svc.external_local && local.is_empty() {
                // Whatever the ext chain did not short-circuit is dropped after DNAT would have
                // happened: the node has nothing for it.
                claim(elements, no_endpoints, k, DROP);
            }
        }
        let fw_chain = format!("fw-{h}");
        if svc.firewalled() {
            for ip in &lb_ips {
                let k = format!("{ip} . {proto} . {}", port.port);
                claim(elements, FIREWALL_IPS, k, &format!("goto {fw_chain}"));
            }
        }

        // Chains, created under the same conditions the elements above point at them.
        let svc_used = !all.is_empty() && (has_outside || (!cluster_ips.is_empty() && !svc.internal_local));
        let local_used = !local.is_empty()
            && ((has_outside && svc.external_local) || (!cluster_ips.is_empty() && svc.internal_local));
        let mut endpoints: BTreeSet<&Endpoint> = BTreeSet::new();
        if svc_used {
            endpoints.extend(all.iter().copied());
        }
        if local_used {
            endpoints.extend(local.iter().copied());
        }
        // Only a pod on this node can reach itself through this node's rules.
        for e in endpoints.iter().filter(|e| e.node.is_none() || e.is_on(&model.node)) {
            claim(elements, HAIRPIN, format!("{} . {}", e.ip, e.ip), "");
        }
        let bucketed = svc.affinity_timeout.is_none() && !endpoints.is_empty();
        // One target port for all (the usual case): the map holds addresses only.
        let target_ports: BTreeSet<u16> = endpoints.iter().map(|e| e.port).collect();
        let one_port = if target_ports.len() == 1 { target_ports.first().copied() } else { None };
        let slot = bucketed.then(|| slots.place(&id, proto, one_port, all.len() + local.len()));
        if let Some(slot) = &slot {
            // All endpoints from the base on, then the local ones after them.
            let list = buckets.entry(slot.map.clone()).or_default();
            for (used, chosen, first) in [(svc_used, &all, 0), (local_used, &local, all.len())] {
                for (i, e) in chosen.iter().enumerate().filter(|_| used) {
                    let key = slot.key(first + i);
                    list.insert(match slot.port {
                        Some(_) => format!("{key} : {}", e.ip),
                        None => format!("{key} : {} . {}", e.ip, e.port),
                    });
                }
            }
        }

        let Some(objects) = objects.as_deref_mut() else {
            continue;
        };
        let a = f.nft;
        if let Some(slot) = &slot {
            objects.buckets.insert(slot.map.clone());
        }
        if let Some(timeout) = svc.affinity_timeout {
            for e in &endpoints {
                let spec = format!("type {} ; flags dynamic,timeout ; timeout {timeout}s ;", f.addr_type);
                objects.sets.insert(affinity_set(&id, e, timeout), spec);
            }
        }
        if svc_used {
            let mut rules = Vec::new();
            rules.extend(dispatch(&id, port, &all, 0, slot.as_ref(), svc.affinity_timeout, &f));
            let comment = service_comment(&id, "all endpoints");
            objects.chains.insert(svc_chain.clone(), Chain { comment, rules });
        }
        if local_used {
            let rules = dispatch(&id, port, &local, all.len(), slot.as_ref(), svc.affinity_timeout, &f);
            let comment = service_comment(&id, "local endpoints");
            objects.chains.insert(local_chain.clone(), Chain { comment, rules });
        }
        if has_outside && !all.is_empty() {
            let rules = if svc.external_local {
                let mut rules = vec![
                    format!("{a} saddr @{POD_CIDRS} goto {svc_chain} comment \"short-circuit pod traffic\""),
                    "fib saddr type local jump mark-for-masquerade \
                     comment \"masquerade node-local traffic\""
                        .to_owned(),
                    format!("fib saddr type local goto {svc_chain} comment \"short-circuit node-local traffic\""),
                ];
                if local_used {
                    rules.push(format!("goto {local_chain} comment \"externalTrafficPolicy Local\""));
                }
                rules
            } else {
                vec![
                    "jump mark-for-masquerade comment \"externalTrafficPolicy Cluster\"".to_owned(),
                    format!("goto {svc_chain}"),
                ]
            };
            let comment = service_comment(&id, "external traffic");
            objects.chains.insert(ext_chain, Chain { comment, rules });
        }
        if svc.firewalled() && !lb_ips.is_empty() {
            let ranges = svc.source_ranges_of(family);
            let rule = if svc.source_ranges_unreadable {
                "drop comment \"an unreadable loadBalancerSourceRanges entry: closed to all\"".to_owned()
            } else if ranges.is_empty() {
                "drop comment \"no loadBalancerSourceRanges of this family\"".to_owned()
            } else {
                // kube-proxy's allowFromNode: a range holding this node's address lets the node in,
                // and a node with the LB IP on a local interface sends from the LB IP itself.
                let node_ips = model.nodeport_ips();
                let from_node = ranges.iter().any(|n| node_ips.iter().any(|ip| n.contains(*ip)));
                let mut set: Vec<String> = ranges.into_iter().map(|n| canonical(n).to_string()).collect();
                if from_node {
                    set.extend(lb_ips.iter().map(ToString::to_string));
                }
                let set = set.join(", ");
                format!("{a} saddr != {{ {set} }} drop comment \"loadBalancerSourceRanges\"")
            };
            let comment = service_comment(&id, "source ranges");
            objects.chains.insert(fw_chain, Chain { comment, rules: vec![rule] });
        }
    }
}

/// The timeout is part of the name: a set's timeout cannot be changed in place.
fn affinity_set(id: &str, e: &Endpoint, timeout: u32) -> String {
    format!("aff-{}", hash16(&format!("{id}/{}/{}/{timeout}", e.ip, e.port)))
}

/// Where a service port's endpoints are: in one of 256 endpoint maps (none grows large: binding a
/// map to a chain walks its elements, and a partial sync refills a changed map whole), at keys
/// `base..base + n`. One number as the key keeps each element cheap for `nft` to parse (the
/// endpoint elements are most of a full sync's work).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Slot {
    map: String,
    base: u32,
    /// The target port of every endpoint, when they share one: then the map (`endpoints-XX`)
    /// holds addresses only, and the rule adds the port. Otherwise the map is
    /// `endpoints-PROTO-XX`, of `address . port`.
    port: Option<u16>,
}

impl Slot {
    /// The key of the `i`-th entry (`i` is below the size the slot was placed with).
    fn key(&self, i: usize) -> u64 {
        u64::from(self.base) + i as u64
    }
}

/// Places service ports' key ranges. Every render visits all services in key order with a fresh
/// `Slots`, so a port's base depends on the model only: the port's hash, unless an earlier
/// port's range is in the way (then the next of the port's hash candidates that fits). A partial
/// sync treats a service whose bases moved as changed.
#[derive(Debug, Default)]
struct Slots {
    /// Endpoint map -> start of each taken range -> its end (exclusive).
    taken: BTreeMap<String, BTreeMap<u32, u64>>,
    /// Port id -> its slot, once placed.
    placed: BTreeMap<String, Slot>,
}

impl Slots {
    /// The slot of port `id`: where it was placed before, or a free range of `size` keys (in an
    /// address-only map when `port` is given).
    fn place(&mut self, id: &str, proto: Protocol, port: Option<u16>, size: usize) -> Slot {
        if let Some(slot) = self.placed.get(id) {
            return slot.clone();
        }
        let size = size.max(1) as u64;
        let d = Sha256::digest(format!("{id}/endpoints").as_bytes());
        let map = match port {
            Some(_) => format!("{ENDPOINTS}-{:02x}", d[0]),
            None => format!("{ENDPOINTS}-{proto}-{:02x}", d[0]),
        };
        let taken = self.taken.entry(map.clone()).or_default();
        let mut base = u32::from_be_bytes([d[1], d[2], d[3], d[4]]);
        for attempt in 1u32.. {
            if Self::fits(taken, base, size) {
                break;
            }
            let d = Sha256::digest(format!("{id}/endpoints/{attempt}").as_bytes());
            base = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
        }
        taken.insert(base, u64::from(base) + size);
        let slot = Slot { map, base, port };
        self.placed.insert(id.to_owned(), slot.clone());
        slot
    }

    /// Whether `base..base + size` stays below 2^32 and overlaps no taken range.
    fn fits(taken: &BTreeMap<u32, u64>, base: u32, size: u64) -> bool {
        let end = u64::from(base) + size;
        let before_ends = taken.range(..=base).next_back().map_or(0, |(_, e)| *e);
        let after_starts = taken.range(base..).next().map_or(1 << 32, |(s, _)| u64::from(*s));
        end <= 1 << 32 && before_ends <= u64::from(base) && after_starts >= end
    }
}

/// Rules choosing an endpoint and translating to it. There is no chain per endpoint: chains are
/// what makes the kernel slow (it validates every chain reachable from a base chain on each
/// commit that adds a `dnat` or `goto`, and `nft` dumps them all before deletions).
///
/// Without affinity: one rule, `dnat` to a random one of the `endpoints.len()` entries from
/// `offset` on in the port's endpoint map. It depends on the number of endpoints only, so most
/// endpoint changes rewrite map elements and no rule (no validation). Not an anonymous map per
/// service: every anonymous set costs the kernel time that grows with the number of sets in the
/// table (8,000 of them take 6 s to load); nor a named map each (the kernel finds sets by name
/// in a list: 10,000 maps add 3 s to a full load).
///
/// With affinity: remembered clients first, then a uniform random pick as a cascade (rule `i` of
/// `N` takes the packet with probability `1 / (N - i)`), each rule updating its endpoint's
/// affinity set and translating; only the first packet of a connection walks it.
fn dispatch(
    id: &str,
    port: &PortModel,
    endpoints: &[&Endpoint],
    offset: usize,
    slot: Option<&Slot>,
    affinity: Option<u32>,
    f: &Fam,
) -> Vec<String> {
    let proto = port.proto;
    match (affinity, slot) {
        (Some(timeout), _) => affinity_dispatch(id, proto, endpoints, timeout, f),
        (None, Some(slot)) => {
            let (n, key) = (endpoints.len(), slot.key(offset));
            let port = slot.port.map(|p| format!(" : {p}")).unwrap_or_default();
            vec![format!("meta l4proto {proto} dnat to numgen random mod {n} offset {key} map @{}{port}", slot.map)]
        }
        // Nothing to choose from (a chain is only made for endpoints, which have a slot).
        (None, None) => Vec::new(),
    }
}

/// [`dispatch`] under session affinity.
fn affinity_dispatch(id: &str, proto: Protocol, endpoints: &[&Endpoint], timeout: u32, f: &Fam) -> Vec<String> {
    let a = f.nft;
    let translate = |e: &Endpoint| {
        let set = affinity_set(id, e, timeout);
        format!("meta l4proto {proto} update @{set} {{ {a} saddr }} dnat to {}", f.dnat_target(e))
    };
    let mut rules = Vec::new();
    for e in endpoints {
        let set = affinity_set(id, e, timeout);
        rules.push(format!("{a} saddr @{set} {} comment \"session affinity\"", translate(e)));
    }
    let n = endpoints.len();
    for (i, e) in endpoints.iter().enumerate() {
        let left = n - i;
        if left == 1 {
            rules.push(translate(e));
        } else {
            rules.push(format!("numgen random mod {left} == 0 {} comment \"1 in {left}\"", translate(e)));
        }
    }
    rules
}

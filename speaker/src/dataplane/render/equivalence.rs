//! Random models, small enough that Services collide (shared addresses, ports, endpoints), and
//! the proof that a [`Ruleset`] kept over a series of updates, each told only which Services
//! changed, writes what rendering from the whole models before and after writes, byte for byte:
//! partial (with its stale lists), cleanup and full.
//!
//! Until commit "Data plane: an incremental renderer" these properties compared the renderer
//! with a frozen copy of the one before the typed layer (and passed); snapshots keep the text.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use proptest::prelude::*;

use super::*;
use crate::dataplane::model::{Endpoint, Mode, PortModel, Protocol, ServiceKey, ServiceModel};

/// Choices read one by one from a tape of numbers proptest generates (and shrinks: a shorter
/// tape, or smaller numbers, is a simpler model). Past its end every choice is 0.
pub struct Tape<'a> {
    words: &'a [u32],
    at: usize,
}

impl<'a> Tape<'a> {
    pub fn new(words: &'a [u32]) -> Self {
        Self { words, at: 0 }
    }

    /// A number below `n`.
    pub fn below(&mut self, n: usize) -> usize {
        let w = self.words.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        w as usize % n.max(1)
    }

    pub fn pick<T: Clone>(&mut self, from: &[T]) -> T {
        from[self.below(from.len())].clone()
    }

    /// True about one time in `n`.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn endpoint(t: &mut Tape<'_>) -> Endpoint {
    let ip = ip(t.pick(&[
        "198.18.1.2",
        "198.18.1.3",
        "198.18.1.4",
        "198.18.2.2",
        "198.18.2.3",
        "2001:db8:100::2",
        "2001:db8:100:1::2",
    ]));
    let node = t.pick(&[Some("node-1"), Some("node-2"), Some("node-1"), None]).map(str::to_owned);
    Endpoint {
        ip,
        port: t.pick(&[8080, 8080, 8081]),
        node,
        ready: !t.one_in(4),
        serving: !t.one_in(4),
        terminating: t.one_in(4),
        unreachable: t.one_in(6),
    }
}

/// A Service whose every field may matter.
pub fn service(t: &mut Tape<'_>) -> ServiceModel {
    let ips = |t: &mut Tape<'_>, pool: &[&str], max: usize| -> Vec<IpAddr> {
        (0..t.below(max + 1)).map(|_| ip(t.pick(pool))).collect()
    };
    let cluster_ips = ips(t, &["198.19.0.1", "198.19.0.2", "198.19.0.3", "2001:db8:ff::1", "2001:db8:ff::2"], 2);
    let external_ips = ips(t, &["192.0.2.150", "192.0.2.151", "2001:db8:1::96"], 2);
    let lb_ips = ips(t, &["192.0.2.200", "192.0.2.201", "2001:db8:1::c8"], 2);
    let ports = (0..t.below(4))
        .map(|_| PortModel {
            name: t.pick(&["", "http", "dns"]).to_owned(),
            proto: t.pick(&[Protocol::Tcp, Protocol::Udp, Protocol::Sctp, Protocol::Tcp]),
            port: t.pick(&[80, 53, 443]),
            node_port: t.pick(&[None, Some(30000), Some(30001)]),
            endpoints: (0..t.below(6)).map(|_| endpoint(t)).collect(),
        })
        .collect();
    let source_ranges: Vec<IpNetwork> = (0..t.below(3))
        .map(|_| t.pick(&["203.0.113.0/24", "192.0.2.0/24", "2001:db8:1::/64", "0.0.0.0/0"]).parse().unwrap())
        .collect();
    ServiceModel {
        cluster_ips,
        external_ips,
        lb_ips,
        ports,
        external_local: t.one_in(2),
        internal_local: t.one_in(3),
        affinity_timeout: t.pick(&[None, None, Some(10), Some(60)]),
        source_ranges,
        source_ranges_unreadable: t.one_in(8),
        health_check_node_port: None,
    }
}

const NAMES: [(&str, &str); 8] =
    [("a", "s0"), ("a", "s1"), ("a", "s2"), ("b", "s0"), ("b", "s1"), ("c", "web"), ("c", "api"), ("d", "x")];

/// A model of up to 8 Services.
pub fn model(t: &mut Tape<'_>) -> Model {
    let family = t.pick(&[Family::V4, Family::V4, Family::V6]);
    let mut m = Model {
        node: "node-1".into(),
        family,
        mode: t.pick(&[Mode::Full, Mode::Full, Mode::LbOnly]),
        node_ips: vec![ip("192.0.2.11"), ip("2001:db8:1::11")],
        pod_cidrs: vec!["198.18.1.0/24".parse().unwrap(), "2001:db8:100::/64".parse().unwrap()],
        service_cidrs: vec![],
        services: BTreeMap::new(),
    };
    for (ns, name) in NAMES {
        if t.one_in(2) {
            m.services.insert(ServiceKey::new(ns, name), service(t));
        }
    }
    m
}

/// `prev` with some Services removed, added, replaced or slightly changed, and maybe new node
/// addresses or pod CIDRs.
pub fn changed(t: &mut Tape<'_>, prev: &Model) -> Model {
    let mut next = prev.clone();
    for (ns, name) in NAMES {
        let key = ServiceKey::new(ns, name);
        match t.below(6) {
            0 => {
                next.services.remove(&key);
            }
            1 => {
                next.services.insert(key, service(t));
            }
            2 => {
                if let Some(svc) = next.services.get_mut(&key)
                    && let Some(p) = svc.ports.first_mut()
                {
                    if t.one_in(2) || p.endpoints.is_empty() {
                        p.endpoints.push(endpoint(t));
                    } else {
                        p.endpoints.remove(0);
                    }
                }
            }
            _ => {}
        }
    }
    if t.one_in(5) {
        next.node_ips.push(ip("192.0.2.12"));
    }
    if t.one_in(5) {
        next.pod_cidrs.push("198.18.101.0/24".parse().unwrap());
    }
    if t.one_in(10) {
        next.mode = Mode::LbOnly;
    }
    next
}

fn tape() -> impl Strategy<Value = Vec<u32>> {
    prop::collection::vec(any::<u32>(), 0..400)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// A speaker's life: one Ruleset, updated again and again with the keys that changed (and
    /// a few that did not), against the old renderer's partial from the whole models.
    #[test]
    fn incremental_updates_are_byte_identical(words in prop::collection::vec(any::<u32>(), 0..1500)) {
        let mut t = Tape::new(&words);
        let mut prev = model(&mut t);
        let mut ruleset = Ruleset::new(&prev);
        let mut stale: [BTreeSet<String>; 3] = Default::default();
        for step in 0..5 {
            let next = changed(&mut t, &prev);
            let mut keys: BTreeSet<ServiceKey> = prev
                .services
                .keys()
                .chain(next.services.keys())
                .filter(|k| prev.services.get(*k) != next.services.get(*k))
                .cloned()
                .collect();
            if t.one_in(2) {
                let (ns, name) = t.pick(&NAMES);
                keys.insert(ServiceKey::new(ns, name));
            }
            let (new, _) = ruleset.update(&next, &keys);
            let old = render_partial(&prev, &next);
            prop_assert_eq!(&new.now, &old.now, "step {}", step);
            prop_assert_eq!(new.full, old.full);
            prop_assert_eq!(&new.stale_chains, &old.stale_chains);
            prop_assert_eq!(&new.stale_sets, &old.stale_sets);
            prop_assert_eq!(&new.stale_hairpin, &old.stale_hairpin);
            if new.full {
                stale = Default::default();
            }
            stale[0].extend(new.stale_chains);
            stale[1].extend(new.stale_sets);
            stale[2].extend(new.stale_hairpin);
            prop_assert_eq!(
                ruleset.render_cleanup(&stale[0], &stale[1], &stale[2]),
                render_cleanup(&next, &stale[0], &stale[1], &stale[2])
            );
            prop_assert_eq!(ruleset.render_full(true), render_full(&next), "the indexes drifted");
            prop_assert_eq!(ruleset.model(), &next);
            prev = next;
        }
    }

    /// What a failed transaction leaves: the model before the update.
    #[test]
    fn undo_gives_the_model_before(words in tape()) {
        let mut t = Tape::new(&words);
        let prev = model(&mut t);
        let next = changed(&mut t, &prev);
        let mut ruleset = Ruleset::new(&prev);
        let keys = ruleset.all_keys(&next);
        let (_, undo) = ruleset.update(&next, &keys);
        prop_assert_eq!(ruleset.undone(undo), prev);
    }
}

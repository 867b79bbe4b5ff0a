//! The table of one family as a value kept between syncs: per Service its rendered objects, and
//! indexes of what Services share, updated for the Services that change only.
//!
//! ```text
//!   Ruleset
//!     ├─ model: the ServiceModels applied (and the node's addresses, mode, family)
//!     ├─ rules: ServiceKey -> ServiceRules (chains, affinity sets, claims, endpoint-map entries)
//!     ├─ claims: (set, key) -> claimants by ServiceKey   the first one's verdict is the element
//!     ├─ buckets: endpoint map -> element -> how many Services put it there
//!     └─ slots: SlotIndex                                 where each port's endpoints sit
//!   update(next, keys) ──> the Services of `keys` whose model differs, and those whose slots
//!                          moved because of them, rendered again; the transaction is the
//!                          difference of their objects and of the indexes' entries they touch
//! ```
//!
//! An update costs in proportion to the Services it renders (plus, for each endpoint map they
//! touch, its refill, which is part of the transaction anyway, and the placing again of its
//! later ports), not to the table.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::super::model::{Model, ServiceKey, ServiceModel};
use super::super::nft::{self, Element, Op, SetKind, Transaction};
use super::base::{Context, GlobalSet};
use super::services::{ChainKind, EndpointMap, ServiceChain, ServicePlan, ServiceRules, Verdict};
use super::slots::SlotIndex;
use super::{PartialSync, element};

/// One family's table, as last rendered.
#[derive(Debug)]
pub struct Ruleset {
    ctx: Context,
    model: Model,
    rules: HashMap<ServiceKey, ServiceRules>,
    /// `(set, key)` -> each Service claiming it (sorted by key; most often one), with its
    /// verdict. The first wins.
    claims: BTreeMap<(GlobalSet, String), Claimants>,
    /// Endpoint map -> element -> how many Services have it (two ports of one name share).
    buckets: BTreeMap<EndpointMap, BTreeMap<String, u32>>,
    slots: SlotIndex,
    /// Chain and affinity-set names in use -> by how many Services (for the cleanup).
    chain_users: HashMap<String, u32>,
    set_users: HashMap<String, u32>,
    /// Services whose rules read the node's addresses.
    node_ip_readers: BTreeSet<ServiceKey>,
}

/// The Services claiming one element, sorted by key, each with its verdict.
type Claimants = Vec<(ServiceKey, Option<Verdict>)>;

/// What [`Ruleset::update`] changed, to put the model back when the transaction fails.
#[derive(Debug, Default)]
pub struct Undo {
    /// The previous node-level part of the model, when it changed.
    globals: Option<Model>,
    /// Each changed Service as it was (`None`: absent).
    services: Vec<(ServiceKey, Option<ServiceModel>)>,
}

impl Ruleset {
    /// The table for `model`, rendered whole.
    pub fn new(model: &Model) -> Self {
        let mut r = Self {
            ctx: Context::of(model),
            model: Model { services: BTreeMap::new(), ..model.clone() },
            rules: HashMap::new(),
            claims: BTreeMap::new(),
            buckets: BTreeMap::new(),
            slots: SlotIndex::default(),
            chain_users: HashMap::new(),
            set_users: HashMap::new(),
            node_ip_readers: BTreeSet::new(),
        };
        let keys: BTreeSet<ServiceKey> = model.services.keys().cloned().collect();
        r.apply(model, &keys, false);
        r
    }

    /// The model last rendered.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Whether `next` differs from the table in something only a full sync changes (node,
    /// family, mode, service CIDRs).
    pub fn needs_rebuild(&self, next: &Model) -> bool {
        self.ctx.needs_rebuild(&Context::of(next))
    }

    /// Every key of the table's model or of `next`: what to pass to [`Ruleset::update`] when
    /// nobody knows what changed.
    pub fn all_keys(&self, next: &Model) -> BTreeSet<ServiceKey> {
        self.model.services.keys().chain(next.services.keys()).cloned().collect()
    }

    /// Renders the Services of `keys` as `next` has them (absent: removed), updates the
    /// indexes, and returns the changed Services with their rules before (`None`: had none).
    fn apply(&mut self, next: &Model, keys: &BTreeSet<ServiceKey>, track: bool) -> Changed {
        let ctx = self.ctx.clone();
        let differs: Vec<&ServiceKey> =
            keys.iter().filter(|k| self.model.services.get(*k) != next.services.get(*k)).collect();
        let requests = differs
            .iter()
            .map(|k| {
                let requests = match next.services.get(*k) {
                    Some(svc) => {
                        ServicePlan::new(&ctx, k, svc).slot_requests().map(|(id, r)| (id.clone(), r.clone())).collect()
                    }
                    None => Vec::new(),
                };
                ((*k).clone(), requests)
            })
            .collect();
        let moved = self.slots.update(requests);
        let mut changed = Changed { track, ..Changed::default() };
        let mut render: BTreeMap<ServiceKey, bool> = differs.iter().map(|k| ((*k).clone(), true)).collect();
        for k in moved {
            render.entry(k).or_insert(false);
        }
        if self.ctx.node_ips != Context::of(next).node_ips {
            for k in &self.node_ip_readers {
                render.entry(k.clone()).or_insert(false);
            }
        }
        self.ctx = Context::of(next);
        let ctx = self.ctx.clone();
        for (key, model_changed) in render {
            let svc = if model_changed { next.services.get(&key) } else { self.model.services.get(&key) };
            let new = svc.map(|svc| {
                ServicePlan::new(&ctx, &key, svc)
                    .render(&ctx, |id, _| self.slots.slot_of(&key, id).unwrap_or_else(|| unplaced(id)))
            });
            let old = self.rules.get(&key);
            if !model_changed && old == new.as_ref() {
                continue;
            }
            let old = self.rules.remove(&key);
            if let Some(old) = &old {
                self.forget(&key, old, &mut changed);
            }
            if let Some(new) = new {
                self.remember(&key, &new, &mut changed);
                self.rules.insert(key.clone(), new);
            }
            if model_changed {
                let before = match next.services.get(&key) {
                    Some(svc) => self.model.services.insert(key.clone(), svc.clone()),
                    None => self.model.services.remove(&key),
                };
                if changed.track {
                    changed.undo.push((key.clone(), before));
                }
            }
            if changed.track {
                changed.services.insert(key, old);
            }
        }
        changed
    }

    /// Takes a Service's old rules out of the indexes.
    fn forget(&mut self, key: &ServiceKey, rules: &ServiceRules, changed: &mut Changed) {
        for c in &rules.claims {
            let k = (c.set, c.key.clone());
            let Some(claimants) = self.claims.get_mut(&k) else { continue };
            if changed.track {
                changed.elements.entry(k.clone()).or_insert_with(|| claimants.first().map(|(_, v)| v.clone()));
            }
            if let Ok(i) = claimants.binary_search_by(|(s, _)| s.cmp(key)) {
                claimants.remove(i);
            }
            if claimants.is_empty() {
                self.claims.remove(&k);
            }
        }
        for (map, entry) in &rules.entries {
            let Some(elements) = self.buckets.get_mut(map) else { continue };
            if changed.track {
                changed.buckets.entry(*map).or_insert(true);
            }
            if let Some(n) = elements.get_mut(entry) {
                *n -= 1;
                if *n == 0 {
                    elements.remove(entry);
                    let k = (*map, entry.clone());
                    if changed.track && !changed.bucket_elements.remove(&k) {
                        changed.bucket_elements.insert(k);
                    }
                }
            }
            if elements.is_empty() {
                self.buckets.remove(map);
            }
        }
        for name in rules.chains.keys() {
            release(&mut self.chain_users, name);
        }
        for name in rules.affinity_sets.keys() {
            release(&mut self.set_users, name);
        }
        self.node_ip_readers.remove(key);
    }

    /// Puts a Service's new rules into the indexes.
    fn remember(&mut self, key: &ServiceKey, rules: &ServiceRules, changed: &mut Changed) {
        for c in &rules.claims {
            let claimants = self.claims.entry((c.set, c.key.clone())).or_default();
            if changed.track {
                changed
                    .elements
                    .entry((c.set, c.key.clone()))
                    .or_insert_with(|| claimants.first().map(|(_, v)| v.clone()));
            }
            // A Service's first claim of a key is its claim.
            if let Err(i) = claimants.binary_search_by(|(s, _)| s.cmp(key)) {
                claimants.insert(i, (key.clone(), c.verdict.clone()));
            }
        }
        for (map, entry) in &rules.entries {
            if changed.track {
                let existed = self.buckets.contains_key(map);
                changed.buckets.entry(*map).or_insert(existed);
            }
            let n = self.buckets.entry(*map).or_default().entry(entry.clone()).or_insert(0);
            if changed.track && *n == 0 && !changed.bucket_elements.remove(&(*map, entry.clone())) {
                changed.bucket_elements.insert((*map, entry.clone()));
            }
            *n += 1;
        }
        for name in rules.chains.keys() {
            *self.chain_users.entry(name.clone()).or_default() += 1;
        }
        for name in rules.affinity_sets.keys() {
            *self.set_users.entry(name.clone()).or_default() += 1;
        }
        if rules.reads_node_ips() {
            self.node_ip_readers.insert(key.clone());
        }
    }

    /// The winning verdict of `(set, key)`, if anybody claims it.
    fn winner(&self, k: &(GlobalSet, String)) -> Option<Option<Verdict>> {
        self.claims.get(k).and_then(|c| c.first().map(|(_, v)| v.clone()))
    }

    /// A transaction building this table whole: replacing an existing one (`replace`), or
    /// filling an empty one.
    pub fn render_full(&self, replace: bool) -> String {
        let ctx = &self.ctx;
        let t = ctx.table();
        let mut tx = Transaction::new(ctx.family);
        if replace {
            tx.push(Op::AddTable);
            tx.push(Op::DeleteTable);
        }
        tx.push(Op::AddTableWithComment);

        tx.push(Op::Heading("sets and maps (verdict maps are filled at the end)"));
        for g in ctx.global_sets() {
            let set = g.set(t);
            let elements = if set.kind() == SetKind::Set { self.set_elements(g) } else { Vec::new() };
            tx.add_set(set, elements);
        }
        // Services in key order: of two chains or sets of one name, the later one is rendered.
        let keys: BTreeSet<&ServiceKey> = self.rules.keys().collect();
        let mut affinity = BTreeMap::new();
        let mut chains = BTreeMap::new();
        for r in keys.iter().filter_map(|k| self.rules.get(*k)) {
            affinity.extend(r.affinity_sets.iter());
            chains.extend(r.chains.iter());
        }
        for set in affinity.into_values() {
            tx.add_set(set, Vec::new());
        }
        for (map, list) in &self.buckets {
            tx.add_set(map.set(t), list.keys().map(|e| Element::key(e.as_str())).collect());
        }

        tx.push(Op::Heading("chains"));
        let base = ctx.base_chains();
        for chain in base.iter().filter(|c| c.base.is_none()) {
            tx.push(Op::AddChain(chain.into()));
        }
        // Service chains: the external ones jump to the others.
        for external in [false, true] {
            for c in chains.values().filter(|c| (c.kind == ChainKind::Ext) == external) {
                tx.push(Op::AddChain((&c.chain).into()));
            }
        }
        for chain in base.iter().filter(|c| c.base.is_some()) {
            tx.push(Op::AddChain(chain.into()));
        }

        tx.push(Op::Heading("verdict map elements"));
        for g in ctx.global_sets() {
            let set = g.set(t);
            if set.kind() == SetKind::Map {
                tx.add_elements(set, self.set_elements(g));
            }
        }
        tx.render()
    }

    fn set_elements(&self, set: GlobalSet) -> Vec<Element<'_>> {
        match set {
            GlobalSet::NodeIps => self.ctx.node_ip_elements(),
            GlobalSet::PodCidrs => self.ctx.pod_cidr_elements(),
            _ => self
                .claims
                .range((set, String::new())..)
                .take_while(|((s, _), _)| *s == set)
                .filter_map(|((_, key), c)| Some(element(key, c.first()?.1.as_ref())))
                .collect(),
        }
    }

    /// Makes the table `next`, where only the Services of `keys` may differ from the table's
    /// model (the node-level part may differ too), and returns the transaction that does the
    /// same to the kernel's table (see [`super::render_partial`] for its shape), with what to
    /// undo if it fails. When `next` needs a full sync, the whole table is rendered again.
    pub fn update(&mut self, next: &Model, keys: &BTreeSet<ServiceKey>) -> (PartialSync, Undo) {
        if self.needs_rebuild(next) {
            let globals = Model { services: BTreeMap::new(), ..self.model.clone() };
            let services = self.model.services.iter().map(|(k, s)| (k.clone(), Some(s.clone()))).collect();
            let mut undo = Undo { globals: Some(globals), services };
            for k in next.services.keys().filter(|k| !self.model.services.contains_key(*k)) {
                undo.services.push((k.clone(), None));
            }
            *self = Ruleset::new(next);
            let now = self.render_full(true);
            return (PartialSync { now, full: true, ..PartialSync::default() }, undo);
        }
        let old_ctx = self.ctx.clone();
        let changed = self.apply(next, keys, true);
        let globals = (self.model.node_ips != next.node_ips || self.model.pod_cidrs != next.pod_cidrs)
            .then(|| Model { services: BTreeMap::new(), ..self.model.clone() });
        self.model.node_ips.clone_from(&next.node_ips);
        self.model.pod_cidrs.clone_from(&next.pod_cidrs);
        self.model.service_cidrs.clone_from(&next.service_cidrs);
        let partial = self.diff(&old_ctx, &changed);
        (partial, Undo { globals, services: changed.undo })
    }

    /// The transaction for what [`Ruleset::apply`] changed.
    fn diff(&self, old_ctx: &Context, changed: &Changed) -> PartialSync {
        let ctx = &self.ctx;
        let t = ctx.table();
        let mut old_chains: BTreeMap<&String, &ServiceChain> = BTreeMap::new();
        let mut old_sets: BTreeMap<&String, &nft::Set> = BTreeMap::new();
        let mut new_chains: BTreeMap<&String, &ServiceChain> = BTreeMap::new();
        let mut new_sets: BTreeMap<&String, &nft::Set> = BTreeMap::new();
        let mut declare_maps: BTreeSet<EndpointMap> = BTreeSet::new();
        for (key, old) in &changed.services {
            if let Some(old) = old {
                old_chains.extend(old.chains.iter());
                old_sets.extend(old.affinity_sets.iter());
            }
            if let Some(new) = self.rules.get(key) {
                new_chains.extend(new.chains.iter());
                new_sets.extend(new.affinity_sets.iter());
                declare_maps.extend(new.endpoint_maps.iter().copied());
            }
        }

        let mut body = Transaction::new(ctx.family);
        // Chains first, empty, so that rules may jump to any of them.
        for (name, c) in &new_chains {
            if !old_chains.contains_key(name) {
                body.push(Op::DeclareChain((&c.chain).into()));
            }
        }
        for (name, c) in &new_chains {
            match old_chains.get(name) {
                Some(was) if was.chain.rules == c.chain.rules => continue,
                Some(_) => body.push(Op::FlushChain(name.as_str().into())),
                None => {}
            }
            body.push(Op::AddChain((&c.chain).into()));
        }
        // Emptying doomed chains drops their references to other chains and to affinity sets.
        let stale_chains: Vec<String> =
            old_chains.keys().filter(|n| !new_chains.contains_key(*n)).map(|n| (*n).clone()).collect();
        for name in &stale_chains {
            body.push(Op::FlushChain(name.as_str().into()));
        }

        if old_ctx.node_ips != ctx.node_ips && ctx.full() {
            let set = GlobalSet::NodeIps.set(t);
            body.push(Op::FlushSet(set.clone().into()));
            body.add_elements(set, ctx.node_ip_elements());
        }
        if old_ctx.pod_cidrs != ctx.pod_cidrs {
            let set = GlobalSet::PodCidrs.set(t);
            body.push(Op::FlushSet(set.clone().into()));
            body.add_elements(set, ctx.pod_cidr_elements());
        }

        let mut stale_hairpin = Vec::new();
        let mut added: BTreeMap<GlobalSet, Vec<Element<'_>>> = BTreeMap::new();
        let mut deleted = Vec::new();
        for (k, before) in &changed.elements {
            let after = self.winner(k);
            if after == *before {
                continue;
            }
            if before.is_some() {
                if k.0 == GlobalSet::Hairpin {
                    stale_hairpin.push(k.1.clone());
                } else {
                    deleted.push(Op::DeleteElement { set: k.0.name().into(), key: k.1.as_str().into() });
                }
            }
            if let Some(verdict) = after {
                added.entry(k.0).or_default().push(element(&k.1, verdict.as_ref()));
            }
        }
        body.ops.extend(deleted);
        for (set, elements) in added {
            body.add_elements(set.set(t), elements);
        }

        // An endpoint map that changed is emptied and filled again (a flush needs no cache,
        // element deletions would); one emptied for good is left for the cleanup.
        let mut stale_sets: Vec<String> =
            old_sets.keys().filter(|n| !new_sets.contains_key(*n)).map(|n| (*n).clone()).collect();
        for (map, existed) in &changed.buckets {
            let differs = changed.bucket_elements.range((*map, String::new())..).next().is_some_and(|(m, _)| m == map);
            if !differs {
                continue;
            }
            declare_maps.insert(*map);
            if *existed {
                body.push(Op::FlushSet(map.set(t).into()));
            }
            match self.buckets.get(map) {
                Some(list) => body.add_elements(map.set(t), list.keys().map(|e| Element::key(e.as_str())).collect()),
                None => stale_sets.push(map.name()),
            }
        }
        if body.is_empty() {
            return PartialSync { stale_chains, stale_sets, stale_hairpin, ..PartialSync::default() };
        }
        // Declarations first: `nft` resolves `@set` references against them instead of reading
        // the kernel's sets. Re-adding an existing set with the same specification changes
        // nothing.
        let mut now = Transaction::new(ctx.family);
        for g in ctx.global_sets() {
            now.add_set(g.set(t), Vec::new());
        }
        for set in new_sets.into_values() {
            now.add_set(set, Vec::new());
        }
        for map in &declare_maps {
            now.add_set(map.set(t), Vec::new());
        }
        now.ops.extend(body.ops);
        PartialSync { now: now.render(), full: false, stale_chains, stale_sets, stale_hairpin }
    }

    /// A transaction deleting the stale chains, sets and hairpin elements that the table does
    /// not use (again); empty when there is nothing to delete.
    pub fn render_cleanup(
        &self,
        stale_chains: &BTreeSet<String>,
        stale_sets: &BTreeSet<String>,
        stale_hairpin: &BTreeSet<String>,
    ) -> String {
        let maps: BTreeSet<String> = self.buckets.keys().map(|m| m.name()).collect();
        let mut tx = Transaction::new(self.ctx.family);
        for name in stale_chains.iter().filter(|n| !self.chain_users.contains_key(*n)) {
            tx.push(Op::DeleteChain(name.as_str().into()));
        }
        for name in stale_sets.iter().filter(|n| !self.set_users.contains_key(*n) && !maps.contains(*n)) {
            tx.push(Op::DeleteSet(name.as_str().into()));
        }
        for key in stale_hairpin.iter().filter(|k| !self.claims.contains_key(&(GlobalSet::Hairpin, (*k).clone()))) {
            tx.push(Op::DeleteElement { set: GlobalSet::Hairpin.name().into(), key: key.as_str().into() });
        }
        tx.render()
    }

    /// The model the kernel held before the update that returned `undo`.
    pub fn undone(self, undo: Undo) -> Model {
        let mut model = self.model;
        if let Some(globals) = undo.globals {
            model = Model { services: model.services, ..globals };
        }
        for (key, svc) in undo.services.into_iter().rev() {
            match svc {
                Some(svc) => model.services.insert(key, svc),
                None => model.services.remove(&key),
            };
        }
        model
    }
}

/// What one [`Ruleset::apply`] touched.
#[derive(Debug, Default)]
struct Changed {
    /// Whether to record anything (not when the whole table is built).
    track: bool,
    /// Each Service rendered again and found different, with its rules before.
    services: BTreeMap<ServiceKey, Option<ServiceRules>>,
    /// Each element some of them claimed before or after, with its winner before.
    elements: BTreeMap<(GlobalSet, String), Option<Option<Verdict>>>,
    /// Each endpoint map some of them had entries in, and whether it had any before.
    buckets: BTreeMap<EndpointMap, bool>,
    /// Endpoint-map elements that appeared or vanished (an entry both is not here).
    bucket_elements: BTreeSet<(EndpointMap, String)>,
    /// The models replaced, in order.
    undo: Vec<(ServiceKey, Option<ServiceModel>)>,
}

fn release(users: &mut HashMap<String, u32>, name: &str) {
    if let Some(n) = users.get_mut(name) {
        *n -= 1;
        if *n == 0 {
            users.remove(name);
        }
    }
}

/// Never happens: every port asking for a slot was placed by the update before the render.
fn unplaced(id: &super::services::PortId) -> super::slots::Slot {
    tracing::error!(port = %id, "a port without a slot: rendered at key 0");
    super::slots::Slot { map: EndpointMap { proto: None, index: 0 }, base: 0, port: None }
}

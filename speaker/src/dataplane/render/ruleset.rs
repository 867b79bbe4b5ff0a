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
use std::sync::Arc;

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
    claims: BTreeMap<(GlobalSet, Arc<str>), Claimants>,
    /// Endpoint map -> element -> how many Services have it (two ports of one name share).
    buckets: BTreeMap<EndpointMap, BTreeMap<Arc<str>, u32>>,
    slots: SlotIndex,
    /// Chain and affinity-set names in use -> by how many Services (for the cleanup).
    chain_users: HashMap<String, u32>,
    set_users: HashMap<String, u32>,
    /// Services whose rules read the node's addresses.
    node_ip_readers: BTreeSet<ServiceKey>,
}

/// The Services claiming one element, sorted by key, each with its verdict. A Service's key is
/// one allocation shared by all its claims.
type Claimants = Vec<(Arc<ServiceKey>, Option<Verdict>)>;

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
            model: without_services(model),
            rules: HashMap::new(),
            claims: BTreeMap::new(),
            buckets: BTreeMap::new(),
            slots: SlotIndex::default(),
            chain_users: HashMap::new(),
            set_users: HashMap::new(),
            node_ip_readers: BTreeSet::new(),
        };
        r.apply(model, model.services.keys(), false);
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
    fn apply<'k>(&mut self, next: &'k Model, keys: impl IntoIterator<Item = &'k ServiceKey>, track: bool) -> Changed {
        // Family, mode and node never change here (that is a rebuild): a plan made with the new
        // context asks for the slots the render will read.
        let ctx = Context::of(next);
        let mut plans: HashMap<&ServiceKey, ServicePlan<'_>> = HashMap::new();
        let mut requests = Vec::new();
        let mut render: BTreeMap<&ServiceKey, bool> = BTreeMap::new();
        for k in keys {
            let svc = next.services.get(k);
            if self.model.services.get(k) == svc {
                continue;
            }
            let plan = svc.map(|svc| ServicePlan::new(&ctx, k, svc));
            let asks = plan.iter().flat_map(|p| p.slot_requests()).map(|(id, r)| (id.clone(), r.clone())).collect();
            requests.push((k.clone(), asks));
            if let Some(plan) = plan {
                plans.insert(k, plan);
            }
            render.insert(k, true);
        }
        let mut others = self.slots.update(requests);
        if self.ctx.node_ips != ctx.node_ips {
            others.extend(self.node_ip_readers.iter().cloned());
        }
        for k in &others {
            render.entry(k).or_insert(false);
        }
        self.ctx = ctx;
        let mut changed = Changed { track, ..Changed::default() };
        for (key, model_changed) in render {
            let new = if model_changed {
                plans.remove(key).map(|plan| plan.render(&self.ctx, |id, _| slot(&self.slots, key, id)))
            } else {
                self.model.services.get(key).map(|svc| {
                    ServicePlan::new(&self.ctx, key, svc).render(&self.ctx, |id, _| slot(&self.slots, key, id))
                })
            };
            let old = self.rules.get(key);
            if !model_changed && old == new.as_ref() {
                continue;
            }
            let old = self.rules.remove(key);
            if let Some(old) = &old {
                self.forget(key, old, &mut changed);
            }
            if let Some(new) = new {
                self.remember(key, &new, &mut changed);
                self.rules.insert(key.clone(), new);
            }
            if model_changed {
                let before = match next.services.get(key) {
                    Some(svc) => self.model.services.insert(key.clone(), svc.clone()),
                    None => self.model.services.remove(key),
                };
                if changed.track {
                    changed.undo.push((key.clone(), before));
                }
            }
            if changed.track {
                changed.services.insert(key.clone(), old);
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
                changed.elements.entry(k.clone()).or_insert_with(|| claimants.first().map(|(_, v)| *v));
            }
            if let Ok(i) = claimants.binary_search_by(|(s, _)| (**s).cmp(key)) {
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
        for c in &rules.chains {
            release(&mut self.chain_users, &c.chain.name);
        }
        for set in &rules.affinity_sets {
            release(&mut self.set_users, &set.name);
        }
        self.node_ip_readers.remove(key);
    }

    /// Puts a Service's new rules into the indexes.
    fn remember(&mut self, key: &ServiceKey, rules: &ServiceRules, changed: &mut Changed) {
        let mut shared: Option<Arc<ServiceKey>> = None;
        for c in &rules.claims {
            let claimants = self.claims.entry((c.set, c.key.clone())).or_default();
            if changed.track {
                changed.elements.entry((c.set, c.key.clone())).or_insert_with(|| claimants.first().map(|(_, v)| *v));
            }
            // A Service's first claim of a key is its claim.
            if let Err(i) = claimants.binary_search_by(|(s, _)| (**s).cmp(key)) {
                let shared = shared.get_or_insert_with(|| Arc::new(key.clone()));
                claimants.insert(i, (Arc::clone(shared), c.verdict));
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
        for c in &rules.chains {
            use_name(&mut self.chain_users, &c.chain.name);
        }
        for set in &rules.affinity_sets {
            use_name(&mut self.set_users, &set.name);
        }
        if rules.reads_node_ips() {
            self.node_ip_readers.insert(key.clone());
        }
    }

    /// The winning verdict of `(set, key)`, if anybody claims it.
    fn winner(&self, k: &(GlobalSet, Arc<str>)) -> Option<Option<Verdict>> {
        self.claims.get(k).and_then(|c| c.first().map(|(_, v)| *v))
    }

    /// A transaction building this table whole: replacing an existing one (`replace`), or
    /// filling an empty one.
    pub fn render_full(&self, replace: bool) -> String {
        let ctx = &self.ctx;
        let t = ctx.table();
        // About 7 bytes of text per byte of model key, from the benchmark's tables; a guess
        // only saves the copies of a growing buffer.
        let mut out = String::with_capacity(4096 + 700 * self.rules.len());
        let mut tx = Transaction::new(ctx.family);
        if replace {
            tx.push(Op::AddTable);
            tx.push(Op::DeleteTable);
        }
        tx.push(Op::AddTableWithComment);
        tx.push(Op::Heading("sets and maps (verdict maps are filled at the end)"));
        tx.render_into(&mut out);
        for g in ctx.global_sets() {
            let set = g.set(t);
            if set.kind() == SetKind::Set {
                self.write_set_elements(&mut out, g, &set);
            } else {
                nft::write_add_set(&mut out, t, &set, std::iter::empty::<&str>());
            }
        }
        // Services in key order: of two chains or sets of one name, the later one is rendered.
        let rules: Vec<&ServiceRules> = self.model.services.keys().filter_map(|k| self.rules.get(k)).collect();
        for set in last_of_each_name(rules.iter().flat_map(|r| &r.affinity_sets), |s| &s.name) {
            nft::write_add_set(&mut out, t, set, std::iter::empty::<&str>());
        }
        for (map, list) in &self.buckets {
            nft::write_add_set(&mut out, t, &map.set(t), list.keys());
        }

        let mut tx = Transaction::new(ctx.family);
        tx.push(Op::Heading("chains"));
        let base = ctx.base_chains();
        for chain in base.iter().filter(|c| c.base.is_none()) {
            tx.push(Op::AddChain(chain.into()));
        }
        // Service chains: the external ones jump to the others.
        let chains = last_of_each_name(rules.iter().flat_map(|r| &r.chains), |c| &c.chain.name);
        for external in [false, true] {
            for c in chains.iter().filter(|c| (c.kind == ChainKind::Ext) == external) {
                tx.push(Op::AddChain((&c.chain).into()));
            }
        }
        for chain in base.iter().filter(|c| c.base.is_some()) {
            tx.push(Op::AddChain(chain.into()));
        }
        tx.push(Op::Heading("verdict map elements"));
        tx.render_into(&mut out);
        for g in ctx.global_sets() {
            let set = g.set(t);
            if set.kind() == SetKind::Map {
                self.write_set_elements(&mut out, g, &set);
            }
        }
        out
    }

    /// `add set` of a global set with its elements; nothing for a map without any.
    fn write_set_elements(&self, out: &mut String, g: GlobalSet, set: &nft::Set) {
        let t = self.ctx.table();
        match g {
            GlobalSet::NodeIps => nft::write_add_set(out, t, set, self.ctx.node_ip_elements()),
            GlobalSet::PodCidrs => nft::write_add_set(out, t, set, self.ctx.pod_cidr_elements()),
            _ => {
                let mut elements = self
                    .claims
                    .range((g, Arc::from(""))..)
                    .take_while(|((s, _), _)| *s == g)
                    .filter_map(|((_, key), c)| Some(ClaimElement(key, c.first()?.1)))
                    .peekable();
                if set.kind() == SetKind::Set || elements.peek().is_some() {
                    nft::write_add_set(out, t, set, elements);
                }
            }
        }
    }

    /// Makes the table `next`, where only the Services of `keys` may differ from the table's
    /// model (the node-level part may differ too), and returns the transaction that does the
    /// same to the kernel's table (see [`super::render_partial`] for its shape), with what to
    /// undo if it fails. When `next` needs a full sync, the whole table is rendered again.
    pub fn update(&mut self, next: &Model, keys: &BTreeSet<ServiceKey>) -> (PartialSync, Undo) {
        if self.needs_rebuild(next) {
            let globals = without_services(&self.model);
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
        let changed = self.apply(next, keys.iter(), true);
        let globals = (self.model.node_ips != next.node_ips || self.model.pod_cidrs != next.pod_cidrs)
            .then(|| without_services(&self.model));
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
                old_chains.extend(old.chains.iter().map(|c| (&c.chain.name, c)));
                old_sets.extend(old.affinity_sets.iter().map(|s| (&s.name, s)));
            }
            if let Some(new) = self.rules.get(key) {
                new_chains.extend(new.chains.iter().map(|c| (&c.chain.name, c)));
                new_sets.extend(new.affinity_sets.iter().map(|s| (&s.name, s)));
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
                    stale_hairpin.push(k.1.to_string());
                } else {
                    deleted.push(Op::DeleteElement { set: k.0.name().into(), key: (&*k.1).into() });
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
            let differs = changed.bucket_elements.range((*map, Arc::from(""))..).next().is_some_and(|(m, _)| m == map);
            if !differs {
                continue;
            }
            declare_maps.insert(*map);
            if *existed {
                body.push(Op::FlushSet(map.set(t).into()));
            }
            match self.buckets.get(map) {
                Some(list) => body.add_elements(map.set(t), list.keys().map(|e| Element::key(&**e)).collect()),
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
        for key in
            stale_hairpin.iter().filter(|k| !self.claims.contains_key(&(GlobalSet::Hairpin, Arc::from(k.as_str()))))
        {
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

/// `model`'s node-level part, without copying its Services.
fn without_services(model: &Model) -> Model {
    Model {
        node: model.node.clone(),
        family: model.family,
        mode: model.mode,
        node_ips: model.node_ips.clone(),
        pod_cidrs: model.pod_cidrs.clone(),
        service_cidrs: model.service_cidrs.clone(),
        services: BTreeMap::new(),
    }
}

/// A claimed element as nft reads it: `key` or `key : verdict`.
struct ClaimElement<'a>(&'a str, Option<Verdict>);

impl std::fmt::Display for ClaimElement<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.1 {
            Some(v) => write!(f, "{} : {v}", self.0),
            None => f.write_str(self.0),
        }
    }
}

/// Of `items` (in Service key order), the last one of each name, sorted by name.
fn last_of_each_name<'a, T>(items: impl Iterator<Item = &'a T>, name: impl Fn(&T) -> &String) -> Vec<&'a T> {
    let mut all: Vec<&T> = items.collect();
    // Stable: of one name, the later Service's stays last.
    all.sort_by(|a, b| name(a).cmp(name(b)));
    let mut out: Vec<&T> = Vec::with_capacity(all.len());
    for item in all {
        match out.last_mut() {
            Some(last) if name(last) == name(item) => *last = item,
            _ => out.push(item),
        }
    }
    out
}

/// What one [`Ruleset::apply`] touched.
#[derive(Debug, Default)]
struct Changed {
    /// Whether to record anything (not when the whole table is built).
    track: bool,
    /// Each Service rendered again and found different, with its rules before.
    services: BTreeMap<ServiceKey, Option<ServiceRules>>,
    /// Each element some of them claimed before or after, with its winner before.
    elements: BTreeMap<(GlobalSet, Arc<str>), Option<Option<Verdict>>>,
    /// Each endpoint map some of them had entries in, and whether it had any before.
    buckets: BTreeMap<EndpointMap, bool>,
    /// Endpoint-map elements that appeared or vanished (an entry both is not here).
    bucket_elements: BTreeSet<(EndpointMap, Arc<str>)>,
    /// The models replaced, in order.
    undo: Vec<(ServiceKey, Option<ServiceModel>)>,
}

fn use_name(users: &mut HashMap<String, u32>, name: &str) {
    match users.get_mut(name) {
        Some(n) => *n += 1,
        None => {
            users.insert(name.to_owned(), 1);
        }
    }
}

/// The slot of port `id` of `key`, placed by the update before the render.
fn slot(slots: &SlotIndex, key: &ServiceKey, id: &super::services::PortId) -> super::slots::Slot {
    slots.slot_of(key, id).unwrap_or_else(|| unplaced(id))
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

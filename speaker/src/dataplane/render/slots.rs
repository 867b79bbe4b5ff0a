//! Where each service port's endpoints sit in the endpoint maps.
//!
//! A port's endpoints are in one of 256 endpoint maps (none grows large: binding a map to a chain
//! walks its elements, and a partial sync refills a changed map whole), at keys `base..base + n`.
//! One number as the key keeps each element cheap for `nft` to parse (the endpoint elements are
//! most of a full sync's work).
//!
//! Placement is a function of the model: ports are placed in order (Service key, then the
//! Service's port order), each at its hash's base unless an earlier port's range is in the way,
//! then at the next of its hash candidates that fits. So a port's base depends on the earlier
//! ports of its own map only.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::super::model::{Protocol, ServiceKey};
use super::services::{EndpointMap, PortId};

/// What a port needs: a range of `size` keys in a map of `proto`, or an address-only map when
/// every endpoint has `one_port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotRequest {
    pub proto: Protocol,
    pub one_port: Option<u16>,
    pub size: usize,
}

/// Where a port's endpoints are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    pub map: EndpointMap,
    pub base: u32,
    /// The target port of every endpoint, when they share one: then the map (`endpoints-XX`)
    /// holds addresses only, and the rule adds the port. Otherwise the map is
    /// `endpoints-PROTO-XX`, of `address . port`.
    pub port: Option<u16>,
}

impl Slot {
    /// The key of the `i`-th entry (`i` is below the size the slot was placed with).
    pub fn key(&self, i: usize) -> u64 {
        u64::from(self.base) + i as u64
    }
}

/// The map a port's endpoints go to, and its base candidates, in order.
#[derive(Clone, Debug)]
pub struct Candidates {
    pub map: EndpointMap,
    id: String,
    first: u32,
}

impl Candidates {
    pub fn of(id: &PortId, request: &SlotRequest) -> Self {
        let id = id.to_string();
        let d = Sha256::digest(format!("{id}/endpoints").as_bytes());
        let proto = match request.one_port {
            Some(_) => None,
            None => Some(request.proto),
        };
        let map = EndpointMap { proto, index: d[0] };
        Self { map, id, first: u32::from_be_bytes([d[1], d[2], d[3], d[4]]) }
    }

    /// The `attempt`-th base (0: the first choice).
    pub fn base(&self, attempt: u32) -> u32 {
        if attempt == 0 {
            return self.first;
        }
        let d = Sha256::digest(format!("{}/endpoints/{attempt}", self.id).as_bytes());
        u32::from_be_bytes([d[0], d[1], d[2], d[3]])
    }
}

/// Places service ports' key ranges in one pass over a model (see the module's doc).
#[derive(Debug, Default)]
pub struct Slots {
    /// Endpoint map -> start of each taken range -> its end (exclusive).
    pub taken: BTreeMap<EndpointMap, BTreeMap<u32, u64>>,
    /// Port -> its slot, once placed.
    pub placed: BTreeMap<PortId, Slot>,
}

impl Slots {
    /// The slot of port `id`: where it was placed before, or a free range of `size` keys.
    pub fn place(&mut self, id: &PortId, request: &SlotRequest) -> Slot {
        if let Some(slot) = self.placed.get(id) {
            return *slot;
        }
        let size = request.size.max(1) as u64;
        let candidates = Candidates::of(id, request);
        let taken = self.taken.entry(candidates.map).or_default();
        let base = (0u32..).map(|a| candidates.base(a)).find(|b| fits(taken, *b, size)).unwrap_or_default();
        taken.insert(base, u64::from(base) + size);
        let slot = Slot { map: candidates.map, base, port: request.one_port };
        self.placed.insert(id.clone(), slot);
        slot
    }
}

/// Whether `base..base + size` stays below 2^32 and overlaps no range of `taken`.
pub fn fits(taken: &BTreeMap<u32, u64>, base: u32, size: u64) -> bool {
    let end = u64::from(base) + size;
    let before_ends = taken.range(..=base).next_back().map_or(0, |(_, e)| *e);
    let after_starts = taken.range(base..).next().map_or(1 << 32, |(s, _)| u64::from(*s));
    end <= 1 << 32 && before_ends <= u64::from(base) && after_starts >= end
}

/// A port's place in the order of placement: its Service (one allocation shared by its ports),
/// then its rank among the Service's ports that need a slot.
type Order = (Arc<ServiceKey>, usize);

/// The placement of every port, kept from one sync to the next and updated for the Services
/// that change: the same slots [`Slots`] gives in one pass over the whole model.
///
/// A port's base depends on the earlier ports of its map only, so a change at order `o` in map
/// `M` can move the ports of `M` after `o`, and nothing else: those are placed again, in order.
/// A map holds about 1/256 of the ports, so that is a few dozen at 10,000 Services.
#[derive(Debug, Default)]
pub struct SlotIndex {
    maps: HashMap<EndpointMap, MapSlots>,
    /// Per Service: its ports with a slot, in order.
    services: HashMap<Arc<ServiceKey>, Vec<Placed>>,
}

#[derive(Debug)]
struct Placed {
    id: PortId,
    map: EndpointMap,
    one_port: Option<u16>,
    /// The base its map's [`PortSlot`] has (kept here too: reading a slot needs no key).
    base: Option<u32>,
}

#[derive(Debug, Default)]
struct MapSlots {
    ports: BTreeMap<Order, PortSlot>,
    /// Start of each taken range -> its end (exclusive).
    taken: BTreeMap<u32, u64>,
}

#[derive(Debug)]
struct PortSlot {
    candidates: Candidates,
    size: u64,
    /// `None` until placed.
    base: Option<u32>,
}

impl SlotIndex {
    /// Replaces the slot requests of each Service of `changes` (in its port order; an empty
    /// list for a Service without any, or gone) and places again what that can move. Returns
    /// the other Services whose slots moved: their rules must be rendered again.
    pub fn update(&mut self, changes: Vec<(ServiceKey, Vec<(PortId, SlotRequest)>)>) -> BTreeSet<ServiceKey> {
        let mut dirty: HashMap<EndpointMap, Order> = HashMap::new();
        let mut mark = |map: EndpointMap, order: &Order| {
            dirty.entry(map).and_modify(|o| *o = o.clone().min(order.clone())).or_insert_with(|| order.clone());
        };
        let changed: HashSet<ServiceKey> = changes.iter().map(|(k, _)| k.clone()).collect();
        for (key, requests) in changes {
            let (key, old) = match self.services.remove_entry(&key) {
                Some((shared, old)) => (shared, old),
                None => (Arc::new(key), Vec::new()),
            };
            for (i, old) in old.into_iter().enumerate() {
                let order = (Arc::clone(&key), i);
                if let Some(m) = self.maps.get_mut(&old.map)
                    && let Some(base) = m.ports.remove(&order).and_then(|p| p.base)
                {
                    m.taken.remove(&base);
                }
                mark(old.map, &order);
            }
            let mut placed: Vec<Placed> = Vec::new();
            for (id, request) in requests {
                // A second port of the same name and protocol shares the first one's slot.
                if placed.iter().any(|p| p.id == id) {
                    continue;
                }
                let candidates = Candidates::of(&id, &request);
                let map = candidates.map;
                let order = (Arc::clone(&key), placed.len());
                let size = request.size.max(1) as u64;
                self.maps
                    .entry(map)
                    .or_default()
                    .ports
                    .insert(order.clone(), PortSlot { candidates, size, base: None });
                mark(map, &order);
                placed.push(Placed { id, map, one_port: request.one_port, base: None });
            }
            if !placed.is_empty() {
                self.services.insert(key, placed);
            }
        }
        let mut moved = BTreeSet::new();
        for (map, from) in dirty {
            let Some(m) = self.maps.get_mut(&map) else { continue };
            let later: Vec<Order> = m.ports.range(from..).map(|(o, _)| o.clone()).collect();
            for o in &later {
                if let Some(base) = m.ports.get(o).and_then(|p| p.base) {
                    m.taken.remove(&base);
                }
            }
            for o in later {
                let Some(p) = m.ports.get_mut(&o) else { continue };
                let base = (0u32..).map(|a| p.candidates.base(a)).find(|b| fits(&m.taken, *b, p.size)).unwrap_or(0);
                m.taken.insert(base, u64::from(base) + p.size);
                if p.base.is_some_and(|b| b != base) && !changed.contains(&*o.0) {
                    moved.insert((*o.0).clone());
                }
                p.base = Some(base);
                if let Some(placed) = self.services.get_mut(&o.0).and_then(|ports| ports.get_mut(o.1)) {
                    placed.base = Some(base);
                }
            }
            if m.ports.is_empty() {
                self.maps.remove(&map);
            }
        }
        moved
    }

    /// The slot of port `id` of `service` (placed by the last [`SlotIndex::update`]).
    pub fn slot_of(&self, service: &ServiceKey, id: &PortId) -> Option<Slot> {
        let p = self.services.get(service)?.iter().find(|p| p.id == *id)?;
        Some(Slot { map: p.map, base: p.base?, port: p.one_port })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::model::ServiceKey;

    fn id(ns: &str, name: &str) -> PortId {
        PortId { service: ServiceKey::new(ns, name), port: "http".into(), proto: Protocol::Tcp }
    }

    fn request(one_port: Option<u16>, size: usize) -> SlotRequest {
        SlotRequest { proto: Protocol::Tcp, one_port, size }
    }

    /// A port whose hashed range is taken gets the next candidate that fits, the same one every
    /// time, and ranges never overlap or pass 2^32.
    #[test]
    fn slots_never_overlap() {
        let mut slots = Slots::default();
        let first = slots.place(&id("a", "b"), &request(None, 10));
        assert_eq!(slots.place(&id("a", "b"), &request(None, 99)), first, "placed once");

        // The same port in a model where its hashed range is already taken.
        let mut crowded = Slots::default();
        crowded.taken.entry(first.map).or_default().insert(first.base.saturating_sub(5), u64::from(first.base) + 1);
        let moved = crowded.place(&id("a", "b"), &request(None, 10));
        assert_eq!(moved.map, first.map);
        assert_ne!(moved.base, first.base);
        let mut again =
            Slots { taken: BTreeMap::from([(first.map, crowded.taken[&first.map].clone())]), ..Slots::default() };
        again.taken.get_mut(&first.map).unwrap().remove(&moved.base);
        assert_eq!(again.place(&id("a", "b"), &request(None, 10)), moved, "deterministic");

        assert!(fits(&BTreeMap::new(), u32::MAX - 9, 10));
        assert!(!fits(&BTreeMap::new(), u32::MAX - 8, 10));
        let taken = BTreeMap::from([(100, 110)]);
        assert!(fits(&taken, 90, 10) && fits(&taken, 110, 5));
        assert!(!fits(&taken, 91, 10) && !fits(&taken, 109, 5) && !fits(&taken, 100, 1));

        // Many ports: every range is where its elements are, and none overlaps another.
        let mut many = Slots::default();
        for i in 0..5000 {
            many.place(&id("ns", &format!("svc-{i}")), &request(Some(80), 1 + i % 40));
        }
        for ranges in many.taken.values() {
            let mut end = 0;
            for (start, stop) in ranges {
                assert!(u64::from(*start) >= end && *stop <= 1 << 32);
                end = *stop;
            }
        }
    }

    /// The index, updated Service by Service in random batches, places every port where one
    /// pass over the whole model does, and reports exactly the unchanged Services that moved.
    /// Huge ranges make collisions (and moves) common.
    #[test]
    fn the_index_places_as_one_pass_does() {
        use proptest::prelude::*;
        let services: Vec<ServiceKey> = (0..300).map(|i| ServiceKey::new("ns", format!("s{i}"))).collect();
        let requests = |sizes: &[u32], s: &ServiceKey| -> Vec<(PortId, SlotRequest)> {
            sizes
                .iter()
                .enumerate()
                .map(|(p, size)| {
                    let id = PortId { service: s.clone(), port: format!("p{}", p % 2), proto: Protocol::Tcp };
                    (id, SlotRequest { proto: Protocol::Tcp, one_port: Some(80), size: *size as usize })
                })
                .collect()
        };
        let size = prop_oneof![1u32..40, 1u32..(1 << 29)];
        let batch = prop::collection::vec((0..300usize, prop::collection::vec(size, 0..3)), 1..40);
        proptest!(ProptestConfig::with_cases(40), |(batches in prop::collection::vec(batch, 1..6))| {
            let mut index = SlotIndex::default();
            let mut model: BTreeMap<ServiceKey, Vec<u32>> = BTreeMap::new();
            let mut before: BTreeMap<PortId, Slot> = BTreeMap::new();
            for batch in batches {
                let mut changes = BTreeMap::new();
                for (s, sizes) in batch {
                    let key = services[s].clone();
                    model.insert(key.clone(), sizes.clone());
                    changes.insert(key.clone(), requests(&sizes, &key));
                }
                let changed: BTreeSet<ServiceKey> = changes.keys().cloned().collect();
                let moved = index.update(changes.into_iter().collect());
                let mut fresh = Slots::default();
                let mut expected_moved = BTreeSet::new();
                for (key, sizes) in &model {
                    for (id, request) in requests(sizes, key) {
                        let slot = fresh.place(&id, &request);
                        prop_assert_eq!(index.slot_of(key, &id), Some(slot), "{}", id);
                        if before.get(&id).is_some_and(|b| *b != slot) && !changed.contains(key) {
                            expected_moved.insert(key.clone());
                        }
                    }
                }
                prop_assert_eq!(&moved, &expected_moved);
                before = fresh.placed;
            }
        });
    }
}

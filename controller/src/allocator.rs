//! The IP allocator: which service holds which address of which pool. Pure: no I/O, no
//! clock, no Kubernetes client; the reconciler feeds it requests and restores.
//!
//! ```text
//!   Pools (validated config) ──┐
//!                              ├─> Allocator ──> Allocation { pool, ips } per service
//!   Request per service ───────┘      │
//!                                     └─> by_ip: address -> services holding it (sharing)
//! ```
//!
//! Invariants (proptest below): every address handed out comes from a pool the service may
//! use; an address is held by two services only when they may share it; releasing frees
//! exactly what was held.
//!
//! Cost: allocating, restoring or releasing one service is O(log n) in the services held, as
//! each pool range keeps its free addresses as intervals ([`crate::free_index`]), services are
//! found by sharing key, and pool edits are the only thing that walks every allocation.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ferrolb_config::{Family, Pool, Pools};
use thiserror::Error;

use crate::free_index::FreeIndex;

/// A Service, by namespace and name: the one key type shared with the speaker.
pub use ferrolb_config::ServiceKey;

/// A transport protocol and port a service exposes (for IP sharing).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortKey {
    pub protocol: String,
    pub port: i32,
}

/// Which address families a service wants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FamilyPolicy {
    /// In order of preference (`spec.ipFamilies`).
    pub families: Vec<Family>,
    /// `RequireDualStack` and `SingleStack`: every listed family is needed. `PreferDualStack`:
    /// the first is needed, the others are taken when a pool offers them.
    pub require_all: bool,
}

/// What one service asks of the allocator, derived from the Service object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub key: ServiceKey,
    pub families: FamilyPolicy,
    /// Specific addresses asked for (annotation or `spec.loadBalancerIP`), at most one per family.
    pub ips: Vec<IpAddr>,
    /// A pool asked for by annotation.
    pub pool: Option<String>,
    /// The `allow-shared-ip` key, if any.
    pub sharing_key: Option<String>,
    /// Other namespaces whose Services may share with this one (`allow-shared-ip-namespaces`;
    /// `*`: any). Empty: only Services of its own namespace.
    pub shared_namespaces: BTreeSet<String>,
    pub ports: BTreeSet<PortKey>,
    /// `externalTrafficPolicy: Local`: sharing then needs the same selector.
    pub local: bool,
    pub selector: BTreeMap<String, String>,
    pub namespace_labels: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
}

impl Request {
    /// A single-stack IPv4 request of `namespace/name` for TCP port 80 with nothing else asked:
    /// the plain case, for tests and benchmarks to start from.
    pub fn ipv4_default(namespace: &str, name: &str) -> Self {
        Request {
            key: ServiceKey { namespace: namespace.into(), name: name.into() },
            families: FamilyPolicy { families: vec![Family::V4], require_all: true },
            ips: vec![],
            pool: None,
            sharing_key: None,
            shared_namespaces: BTreeSet::new(),
            ports: [PortKey { protocol: "TCP".into(), port: 80 }].into(),
            local: false,
            selector: BTreeMap::new(),
            namespace_labels: BTreeMap::new(),
            labels: BTreeMap::new(),
        }
    }
}

/// What a service holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    /// The pool the addresses came from; `None` for addresses restored from a Service's status
    /// that no pool covers any more (kept until the service can be moved).
    pub pool: Option<String>,
    /// One per family, in the order of the request's families.
    pub ips: Vec<IpAddr>,
    sharing: Sharing,
}

/// What decides whether two services may share an address.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Sharing {
    key: Option<String>,
    /// The Service's own namespace, and the others it opts in to share with.
    namespace: String,
    namespaces: BTreeSet<String>,
    /// Sorted, no repeats (from the request's set): a set of one port would take a whole tree
    /// node for each of 100,000 services.
    ports: Vec<PortKey>,
    local: bool,
    selector: BTreeMap<String, String>,
}

impl Sharing {
    fn of(r: &Request) -> Self {
        Sharing {
            key: r.sharing_key.clone(),
            namespace: r.key.namespace.clone(),
            namespaces: r.shared_namespaces.clone(),
            ports: r.ports.iter().cloned().collect(),
            local: r.local,
            selector: r.selector.clone(),
        }
    }

    /// Whether this side lets Services of `namespace` share with it.
    fn admits(&self, namespace: &str) -> bool {
        self.namespace == namespace || self.namespaces.contains("*") || self.namespaces.contains(namespace)
    }

    /// `Ok` when `self` may share an address with `other`; else why not.
    fn compatible(&self, other: &Sharing) -> Result<(), SharingConflict> {
        match (&self.key, &other.key) {
            (Some(a), Some(b)) if a == b => {}
            (None, _) | (_, None) => return Err(SharingConflict::NoKey),
            _ => return Err(SharingConflict::KeyDiffers),
        }
        // A sharing key is no secret: across namespaces, both sides must opt in.
        if !self.admits(&other.namespace) || !other.admits(&self.namespace) {
            return Err(SharingConflict::Namespace { mine: self.namespace.clone(), other: other.namespace.clone() });
        }
        if let Some(p) = self.ports.iter().find(|p| other.ports.binary_search(p).is_ok()) {
            return Err(SharingConflict::Port(p.clone()));
        }
        if (self.local || other.local) && self.selector != other.selector {
            return Err(SharingConflict::Selector);
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SharingConflict {
    NoKey,
    KeyDiffers,
    Port(PortKey),
    Selector,
    /// Different namespaces, and not both opted in to share with the other's.
    Namespace {
        mine: String,
        other: String,
    },
}

impl std::fmt::Display for SharingConflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SharingConflict::NoKey => write!(f, "both services need the same ferrolb.io/allow-shared-ip key"),
            SharingConflict::KeyDiffers => write!(f, "their ferrolb.io/allow-shared-ip keys differ"),
            SharingConflict::Port(p) => write!(f, "both use {} port {}", p.protocol, p.port),
            SharingConflict::Selector => {
                write!(f, "with externalTrafficPolicy: Local both services need the same pod selector")
            }
            SharingConflict::Namespace { mine, other } => write!(
                f,
                "it is in namespace {other:?} and this one in {mine:?}: across namespaces both services must \
                 name the other's namespace (or \"*\") in {}",
                ferrolb_api::annotations::ALLOW_SHARED_IP_NAMESPACES
            ),
        }
    }
}

/// Why a service got no address. Each message says what to change.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum AllocError {
    #[error("no IPAddressPool is configured: create one (kind IPAddressPool, group ferrolb.io)")]
    NoPools,
    #[error("pool {pool:?} (ferrolb.io/address-pool) does not exist or is not valid")]
    UnknownPool { pool: String },
    #[error("pool {pool:?} does not allow this service (its serviceAllocation namespaces or selectors do not match)")]
    PoolNotAllowed { pool: String },
    #[error("pool {pool:?} has no {family} addresses")]
    PoolLacksFamily { pool: String, family: Family },
    #[error("pool {pool:?} is exhausted: all its {family} addresses are in use")]
    PoolExhausted { pool: String, family: Family },
    #[error(
        "no pool with {family} addresses may be used by this service (automatic assignment needs a pool with autoAssign: true whose serviceAllocation allows it)"
    )]
    NoPoolForFamily { family: Family },
    #[error("{ip} is not in any IPAddressPool")]
    OutsidePools { ip: IpAddr },
    #[error("{ip} is not in pool {pool:?}")]
    OutsidePool { ip: IpAddr, pool: String },
    #[error("{ip} is an IPv4 address ending in .0 or .255, which pool {pool:?} avoids (avoidBuggyIPs)")]
    BuggyIp { ip: IpAddr, pool: String },
    #[error("{ip} is {family}, but the service's ipFamilies are {wanted}")]
    WrongFamily { ip: IpAddr, family: Family, wanted: String },
    #[error("more than one {family} address was requested ({ips}): request at most one per family")]
    TwoOfAFamily { family: Family, ips: String },
    #[error("{ip} is in use by {by}")]
    InUse { ip: IpAddr, by: ServiceKey },
    #[error("{ip} is in use by {by} and cannot be shared: {why}")]
    SharingConflict { ip: IpAddr, by: ServiceKey, why: String },
}

/// Addresses held by each service, and the reverse index.
#[derive(Clone, Debug, Default)]
pub struct Allocator {
    pools: BTreeMap<String, Pool>,
    allocations: BTreeMap<ServiceKey, Allocation>,
    /// Holders of each address, sorted (most addresses have one: a `Vec` of one, not a tree).
    by_ip: BTreeMap<IpAddr, Vec<ServiceKey>>,
    /// The free addresses of each pool range, kept in step with `by_ip`: finding the lowest
    /// free address costs no walk of the held ones.
    free: FreeIndex,
    /// Services by sharing key, so a service finds one to share with without a walk of all.
    by_sharing_key: BTreeMap<String, BTreeSet<ServiceKey>>,
    /// Services holding addresses no pool covers (`Allocation::pool` is `None`).
    orphans: BTreeSet<ServiceKey>,
}

/// Per pool and family: addresses in use and available.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolUsage {
    pub in_use_v4: u64,
    pub in_use_v6: u64,
    pub available_v4: u64,
    pub available_v6: u64,
}

fn families_text(f: &FamilyPolicy) -> String {
    f.families.iter().map(|f| f.to_string()).collect::<Vec<_>>().join(",")
}

impl Allocator {
    pub fn new(pools: &Pools) -> Self {
        let free = FreeIndex::new(&pools.pools, &BTreeMap::<IpAddr, ()>::new());
        Allocator { pools: pools.pools.clone(), free, ..Default::default() }
    }

    pub fn pools(&self) -> &BTreeMap<String, Pool> {
        &self.pools
    }

    /// Replaces the pools. Allocations are kept; those whose addresses no pool covers any
    /// more are returned, so the caller can say so (their services keep working).
    pub fn set_pools(&mut self, pools: &Pools) -> Vec<ServiceKey> {
        if pools.pools == self.pools {
            // Every pass sets the pools; nothing moves unless they changed.
            return self.orphans.iter().cloned().collect();
        }
        self.pools = pools.pools.clone();
        self.free = FreeIndex::new(&self.pools, &self.by_ip);
        let mut orphaned = Vec::new();
        for (key, a) in self.allocations.iter_mut() {
            let still =
                a.pool.as_ref().and_then(|p| self.pools.get(p)).is_some_and(|p| a.ips.iter().all(|ip| p.contains(*ip)));
            if !still {
                // Maybe another pool covers them now.
                a.pool = self.pools.values().find(|p| a.ips.iter().all(|ip| p.contains(*ip))).map(|p| p.name.clone());
                if a.pool.is_none() {
                    orphaned.push(key.clone());
                }
            }
        }
        self.orphans = orphaned.iter().cloned().collect();
        orphaned
    }

    pub fn get(&self, key: &ServiceKey) -> Option<&Allocation> {
        self.allocations.get(key)
    }

    pub fn allocations(&self) -> impl Iterator<Item = (&ServiceKey, &Allocation)> {
        self.allocations.iter()
    }

    /// Who holds an address.
    pub fn holders(&self, ip: IpAddr) -> impl Iterator<Item = &ServiceKey> {
        self.by_ip.get(&ip).into_iter().flatten()
    }

    /// Frees what `key` holds.
    pub fn release(&mut self, key: &ServiceKey) -> Option<Allocation> {
        let a = self.allocations.remove(key)?;
        for ip in &a.ips {
            if let Some(set) = self.by_ip.get_mut(ip) {
                if let Ok(i) = set.binary_search(key) {
                    set.remove(i);
                }
                if set.is_empty() {
                    self.by_ip.remove(ip);
                    self.free.give(*ip);
                }
            }
        }
        self.unindex_sharing(key, a.sharing.key.as_deref());
        self.orphans.remove(key);
        Some(a)
    }

    fn insert(&mut self, key: ServiceKey, a: Allocation) {
        self.release(&key);
        for ip in &a.ips {
            match self.by_ip.entry(*ip) {
                Entry::Vacant(v) => {
                    v.insert(vec![key.clone()]);
                    self.free.take(*ip);
                }
                Entry::Occupied(mut o) => {
                    if let Err(i) = o.get().binary_search(&key) {
                        o.get_mut().insert(i, key.clone());
                    }
                }
            }
        }
        if let Some(k) = &a.sharing.key {
            self.by_sharing_key.entry(k.clone()).or_default().insert(key.clone());
        }
        if a.pool.is_none() {
            self.orphans.insert(key.clone());
        }
        self.allocations.insert(key, a);
    }

    fn unindex_sharing(&mut self, key: &ServiceKey, sharing_key: Option<&str>) {
        if let Some(k) = sharing_key
            && let Some(set) = self.by_sharing_key.get_mut(k)
        {
            set.remove(key);
            if set.is_empty() {
                self.by_sharing_key.remove(k);
            }
        }
    }

    /// Whether `ip` may be taken by a service with `sharing` (other than `me`).
    fn check_free(&self, ip: IpAddr, me: &ServiceKey, sharing: &Sharing) -> Result<(), AllocError> {
        for other in self.holders(ip).filter(|k| *k != me) {
            let Some(oa) = self.allocations.get(other) else { continue };
            if let Err(why) = sharing.compatible(&oa.sharing) {
                return Err(match why {
                    SharingConflict::NoKey | SharingConflict::KeyDiffers if sharing.key.is_none() => {
                        AllocError::InUse { ip, by: other.clone() }
                    }
                    why => AllocError::SharingConflict { ip, by: other.clone(), why: why.to_string() },
                });
            }
        }
        Ok(())
    }

    /// Takes back what a Service's status says it holds (at start and on leader change, before
    /// anything new is handed out). Addresses outside every pool are kept, with no pool.
    pub fn restore(&mut self, req: &Request, ips: &[IpAddr]) -> Result<&Allocation, AllocError> {
        let sharing = Sharing::of(req);
        for ip in ips {
            self.check_free(*ip, &req.key, &sharing)?;
        }
        let pool = self
            .pools
            .values()
            .filter(|p| ips.iter().all(|ip| p.contains(*ip)))
            .min_by_key(|p| (req.pool.as_deref() != Some(p.name.as_str()), p.name.clone()))
            .map(|p| p.name.clone());
        self.insert(req.key.clone(), Allocation { pool, ips: ips.to_vec(), sharing });
        Ok(&self.allocations[&req.key])
    }

    /// Whether what `key` holds still satisfies `req` (then nothing needs to move).
    ///
    /// When the sharing terms changed (ports, key, opted-in namespaces…) and still hold against
    /// the other holders, they are recorded: later services are checked against what the
    /// Service says now, not what it said when it got its address.
    pub fn satisfies(&mut self, req: &Request) -> bool {
        let Some(a) = self.allocations.get(&req.key) else { return false };
        let sharing = Sharing::of(req);
        if sharing != a.sharing {
            // Sharing terms changed: re-check against the other holders.
            if a.ips.iter().any(|ip| self.check_free(*ip, &req.key, &sharing).is_err()) {
                return false;
            }
            let old = self.allocations.get_mut(&req.key).map(|a| std::mem::replace(&mut a.sharing, sharing));
            if let Some(old) = old
                && old.key != req.sharing_key
            {
                self.unindex_sharing(&req.key, old.key.as_deref());
                if let Some(k) = &req.sharing_key {
                    self.by_sharing_key.entry(k.clone()).or_default().insert(req.key.clone());
                }
            }
        }
        let Some(a) = self.allocations.get(&req.key) else { return false };
        if !req.ips.is_empty() && req.ips.iter().any(|ip| !a.ips.contains(ip)) {
            return false;
        }
        if let Some(p) = &req.pool
            && a.pool.as_ref() != Some(p)
            && a.pool.is_some()
        {
            return false;
        }
        let held: BTreeSet<Family> = a.ips.iter().map(Family::of).collect();
        if a.ips.iter().any(|ip| !req.families.families.contains(&Family::of(ip))) {
            return false;
        }
        if req.families.require_all {
            req.families.families.iter().all(|f| held.contains(f))
        } else {
            req.families.families.first().is_some_and(|f| held.contains(f))
        }
    }

    /// Finds addresses for `req` and records them; what `req.key` held before is replaced only
    /// on success.
    pub fn allocate(&mut self, req: &Request) -> Result<&Allocation, AllocError> {
        let (pool, ips) = self.choose(req)?;
        self.insert(req.key.clone(), Allocation { pool: Some(pool), ips, sharing: Sharing::of(req) });
        Ok(&self.allocations[&req.key])
    }

    fn choose(&self, req: &Request) -> Result<(String, Vec<IpAddr>), AllocError> {
        if self.pools.is_empty() {
            return Err(AllocError::NoPools);
        }
        let sharing = Sharing::of(req);
        let wanted = &req.families.families;

        // Specific addresses: each must be of a wanted family, at most one per family, in a
        // usable pool (the one named, if any), and free or shareable.
        if !req.ips.is_empty() {
            let mut seen = BTreeSet::new();
            for ip in &req.ips {
                let f = Family::of(ip);
                if !wanted.contains(&f) {
                    return Err(AllocError::WrongFamily { ip: *ip, family: f, wanted: families_text(&req.families) });
                }
                if !seen.insert(f) {
                    let ips = req.ips.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
                    return Err(AllocError::TwoOfAFamily { family: f, ips });
                }
            }
            let pool = match &req.pool {
                Some(name) => {
                    let p = self.pools.get(name).ok_or_else(|| AllocError::UnknownPool { pool: name.clone() })?;
                    if let Some(ip) = req.ips.iter().find(|ip| !p.contains(**ip)) {
                        return Err(AllocError::OutsidePool { ip: *ip, pool: name.clone() });
                    }
                    p
                }
                None => {
                    let first = req.ips[0];
                    self.pools
                        .values()
                        .find(|p| req.ips.iter().all(|ip| p.contains(*ip)))
                        .ok_or(AllocError::OutsidePools { ip: first })?
                }
            };
            if !pool.allows_service(&req.key.namespace, &req.namespace_labels, &req.labels) {
                return Err(AllocError::PoolNotAllowed { pool: pool.name.clone() });
            }
            for ip in &req.ips {
                if !pool.is_usable(*ip) {
                    return Err(AllocError::BuggyIp { ip: *ip, pool: pool.name.clone() });
                }
                self.check_free(*ip, &req.key, &sharing)?;
            }
            if req.families.require_all
                && let Some(f) = wanted.iter().find(|f| !seen.contains(f))
            {
                // The rest of the families come from the same pool.
                let extra = self.pick(pool, *f, req, &sharing)?;
                let mut ips = req.ips.clone();
                ips.push(extra);
                return Ok((pool.name.clone(), order(ips, wanted)));
            }
            return Ok((pool.name.clone(), order(req.ips.clone(), wanted)));
        }

        // A named pool.
        if let Some(name) = &req.pool {
            let p = self.pools.get(name).ok_or_else(|| AllocError::UnknownPool { pool: name.clone() })?;
            if !p.allows_service(&req.key.namespace, &req.namespace_labels, &req.labels) {
                return Err(AllocError::PoolNotAllowed { pool: name.clone() });
            }
            return self.pick_families(p, req, &sharing).map(|ips| (name.clone(), ips));
        }

        // Automatic: pools whose serviceAllocation selects this service, by priority (lower
        // first, unset last), then the other auto-assign pools by name.
        let mut candidates: Vec<&Pool> = self
            .pools
            .values()
            .filter(|p| p.auto_assign && p.allows_service(&req.key.namespace, &req.namespace_labels, &req.labels))
            .collect();
        candidates.sort_by_key(|p| (p.allocation.is_none(), p.priority().is_none(), p.priority(), p.name.clone()));
        // Prefer a pool that has every wanted family (dual-stack from one pool).
        let mut last_err = None;
        for p in candidates.iter().filter(|p| wanted.iter().all(|f| p.families().contains(f))) {
            match self.pick_families(p, req, &sharing) {
                Ok(ips) => return Ok((p.name.clone(), ips)),
                Err(e) => last_err = Some(e),
            }
        }
        if !req.families.require_all
            && let Some(first) = wanted.first()
        {
            for p in candidates.iter().filter(|p| p.families().contains(first)) {
                match self.pick(p, *first, req, &sharing) {
                    Ok(ip) => return Ok((p.name.clone(), vec![ip])),
                    Err(e) => last_err = Some(e),
                }
            }
        }
        Err(last_err.unwrap_or_else(|| AllocError::NoPoolForFamily {
            family: wanted
                .iter()
                .find(|f| !candidates.iter().any(|p| p.families().contains(f)))
                .copied()
                .unwrap_or(Family::V4),
        }))
    }

    /// One address per wanted family from `pool` (only those it has, under PreferDualStack).
    fn pick_families(&self, pool: &Pool, req: &Request, sharing: &Sharing) -> Result<Vec<IpAddr>, AllocError> {
        let mut ips = Vec::new();
        for (i, f) in req.families.families.iter().enumerate() {
            let needed = req.families.require_all || i == 0;
            if !pool.families().contains(f) {
                if needed {
                    return Err(AllocError::PoolLacksFamily { pool: pool.name.clone(), family: *f });
                }
                continue;
            }
            match self.pick(pool, *f, req, sharing) {
                Ok(ip) => ips.push(ip),
                Err(e) if needed => return Err(e),
                Err(_) => {}
            }
        }
        Ok(ips)
    }

    /// One address of family `f` from `pool`: one this service can share if its sharing key
    /// has one there, else the lowest free one.
    fn pick(&self, pool: &Pool, f: Family, req: &Request, sharing: &Sharing) -> Result<IpAddr, AllocError> {
        if let Some(key) = &sharing.key {
            let shared = (self.by_sharing_key.get(key).into_iter().flatten())
                .filter(|k| *k != &req.key)
                .filter_map(|k| self.allocations.get(k))
                .filter(|a| a.pool.as_deref() == Some(pool.name.as_str()));
            for a in shared {
                for ip in a.ips.iter().filter(|ip| Family::of(ip) == f) {
                    if self.check_free(*ip, &req.key, sharing).is_ok() {
                        return Ok(*ip);
                    }
                }
            }
        }
        // Our own current address of that family, if the pool still has it: no needless move.
        if let Some(a) = self.allocations.get(&req.key)
            && let Some(ip) = a.ips.iter().find(|ip| Family::of(ip) == f && pool.is_usable(**ip))
            && self.check_free(*ip, &req.key, sharing).is_ok()
        {
            return Ok(*ip);
        }
        self.lowest_free(pool, f, &req.key)
            .ok_or_else(|| AllocError::PoolExhausted { pool: pool.name.clone(), family: f })
    }

    /// The lowest usable address of family `f` in `pool` that nobody but `me` holds, the
    /// pool's ranges taken in order. O(log n): each range's index knows its lowest free address.
    fn lowest_free(&self, pool: &Pool, f: Family, me: &ServiceKey) -> Option<IpAddr> {
        // What `me` alone holds is free for it (the index counts it as held).
        let mine: Vec<IpAddr> = (self.allocations.get(me).into_iter().flat_map(|a| a.ips.iter().copied()))
            .filter(|ip| pool.is_usable(*ip) && self.holders(*ip).all(|k| k == me))
            .collect();
        for range in self.free.ranges(&pool.name).iter().filter(|r| r.range().family() == f) {
            let own = mine.iter().copied().filter(|ip| range.range().contains(*ip));
            if let Some(ip) = own.chain(range.lowest_free()).min() {
                return Some(ip);
            }
        }
        None
    }

    /// Addresses in use and available in each pool.
    pub fn usage(&self) -> BTreeMap<String, PoolUsage> {
        self.pools
            .values()
            .map(|p| {
                // The ranges of a pool are disjoint (`build_pools` merges them).
                let in_use = |f: Family| {
                    let held = self.free.ranges(&p.name).iter().filter(|r| r.range().family() == f).map(|r| r.held());
                    u64::try_from(held.fold(0, u128::saturating_add)).unwrap_or(u64::MAX)
                };
                let (u4, u6) = (in_use(Family::V4), in_use(Family::V6));
                let cap = |f: Family| u64::try_from(p.usable_count(f)).unwrap_or(u64::MAX);
                let usage = PoolUsage {
                    in_use_v4: u4,
                    in_use_v6: u6,
                    available_v4: cap(Family::V4).saturating_sub(u4),
                    available_v6: cap(Family::V6).saturating_sub(u6),
                };
                (p.name.clone(), usage)
            })
            .collect()
    }
}

/// Orders addresses as the families are wanted.
fn order(mut ips: Vec<IpAddr>, wanted: &[Family]) -> Vec<IpAddr> {
    ips.sort_by_key(|ip| wanted.iter().position(|f| *f == Family::of(ip)).unwrap_or(usize::MAX));
    ips
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrolb_api::IPAddressPoolSpec;
    use ferrolb_api::annotations::ALLOW_SHARED_IP_NAMESPACES as ALLOW_NS;
    use ferrolb_config::{PoolInput, build_pools};
    use proptest::prelude::*;

    /// Pools of `(name, addresses, autoAssign)`, created in that order.
    fn pools(specs: &[(&str, &[&str], bool)]) -> Pools {
        pools_with(specs, |spec, auto| spec.auto_assign = Some(auto))
    }

    /// Pools of `(name, addresses, flag)`, created in that order; `set` says what the flag is.
    fn pools_with(specs: &[(&str, &[&str], bool)], set: fn(&mut IPAddressPoolSpec, bool)) -> Pools {
        build_pools(
            specs
                .iter()
                .enumerate()
                .map(|(i, (name, addrs, flag))| {
                    let mut spec = IPAddressPoolSpec {
                        addresses: addrs.iter().map(|a| a.to_string()).collect(),
                        ..Default::default()
                    };
                    set(&mut spec, *flag);
                    PoolInput {
                        name: name.to_string(),
                        labels: BTreeMap::new(),
                        created: Some(format!("2026-01-01T00:00:{i:02}Z")),
                        spec,
                    }
                })
                .collect(),
        )
    }

    fn req(name: &str) -> Request {
        Request::ipv4_default("default", name)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn lowest_free_address_of_the_auto_assign_pool() {
        let p = pools(&[("lan", &["192.0.2.200-192.0.2.250"], true), ("manual", &["192.0.2.100/30"], false)]);
        let mut a = Allocator::new(&p);
        assert_eq!(a.allocate(&req("a")).unwrap().ips, vec![ip("192.0.2.200")]);
        assert_eq!(a.allocate(&req("b")).unwrap().ips, vec![ip("192.0.2.201")]);
        a.release(&req("a").key);
        assert_eq!(a.allocate(&req("c")).unwrap().ips, vec![ip("192.0.2.200")]);
        // The manual pool only by name.
        let mut r = req("d");
        r.pool = Some("manual".into());
        assert_eq!(a.allocate(&r).unwrap().pool.as_deref(), Some("manual"));
    }

    #[test]
    fn refusals_say_why() {
        let p = pools(&[("lan", &["192.0.2.200/31"], true)]);
        let mut a = Allocator::new(&p);
        a.allocate(&req("a")).unwrap();
        a.allocate(&req("b")).unwrap();
        assert_eq!(
            a.allocate(&req("c")).unwrap_err(),
            AllocError::PoolExhausted { pool: "lan".into(), family: Family::V4 }
        );

        let mut r = req("d");
        r.ips = vec![ip("192.0.2.200")];
        let e = a.allocate(&r).unwrap_err();
        assert_eq!(e, AllocError::InUse { ip: ip("192.0.2.200"), by: req("a").key });
        assert!(e.to_string().contains("in use by default/a"), "{e}");

        r.ips = vec![ip("198.18.5.5")];
        assert_eq!(a.allocate(&r).unwrap_err(), AllocError::OutsidePools { ip: ip("198.18.5.5") });

        r.ips = vec![ip("2001:db8:1::c8")];
        assert!(matches!(a.allocate(&r).unwrap_err(), AllocError::WrongFamily { .. }));

        r.ips = vec![];
        r.pool = Some("nope".into());
        assert_eq!(a.allocate(&r).unwrap_err(), AllocError::UnknownPool { pool: "nope".into() });
    }

    #[test]
    fn sharing_stays_within_a_namespace_unless_both_opt_in() {
        let p = pools(&[("lan", &["192.0.2.200-192.0.2.250"], true)]);
        let mut a = Allocator::new(&p);
        let mut web = Request::ipv4_default("a", "web");
        web.sharing_key = Some("k".into());
        let first = a.allocate(&web).unwrap().ips.clone();
        let udp = |ns: &str, name: &str| {
            let mut r = Request::ipv4_default(ns, name);
            r.sharing_key = Some("k".into());
            r.ports = [PortKey { protocol: "UDP".into(), port: 53 }].into();
            r
        };

        // Another tenant who knows the key gets an address of its own, and is refused A's.
        let mut thief = udp("b", "dns");
        assert_ne!(a.allocate(&thief).unwrap().ips, first);
        thief.ips = first.clone();
        let e = a.allocate(&thief).unwrap_err();
        assert!(matches!(e, AllocError::SharingConflict { .. }), "{e:?}");
        assert!(e.to_string().contains("in namespace \"a\"") && e.to_string().contains(ALLOW_NS), "{e}");

        // Opting in on one side is not enough.
        thief.shared_namespaces = ["a".to_string()].into();
        assert!(a.allocate(&thief).is_err(), "A did not name b");
        // Both sides: shared. `*` counts as any namespace.
        web.shared_namespaces = ["c".to_string(), "b".to_string()].into();
        // As the reconciler does on a change: nothing moves, and the new terms count from now on.
        assert!(a.satisfies(&web));
        assert_eq!(a.allocate(&thief).unwrap().ips, first);
        let mut any = udp("c", "any");
        any.ports = [PortKey { protocol: "UDP".into(), port: 5353 }].into();
        any.shared_namespaces = ["*".to_string()].into();
        any.ips = first.clone();
        // b/dns did not name c: it holds the address too, so c is still refused.
        assert!(a.allocate(&any).is_err());
        thief.shared_namespaces = ["*".to_string()].into();
        a.allocate(&thief).unwrap();
        assert_eq!(a.allocate(&any).unwrap().ips, first);
        // Every holder must admit a newcomer: a/other (no opt-in) cannot join b's and c's address.
        let mut same = udp("a", "other");
        same.ports = [PortKey { protocol: "UDP".into(), port: 54 }].into();
        assert_ne!(a.allocate(&same).unwrap().ips, first);
    }

    #[test]
    fn sharing_needs_the_same_key_and_distinct_ports() {
        let p = pools(&[("lan", &["192.0.2.200-192.0.2.250"], true)]);
        let mut a = Allocator::new(&p);
        let mut web = req("web");
        web.sharing_key = Some("k".into());
        let first = a.allocate(&web).unwrap().ips.clone();

        let mut dns = req("dns");
        dns.sharing_key = Some("k".into());
        dns.ports = [PortKey { protocol: "UDP".into(), port: 53 }].into();
        assert_eq!(a.allocate(&dns).unwrap().ips, first, "same key, other ports: shares");

        let mut clash = req("clash");
        clash.sharing_key = Some("k".into());
        clash.ips = first.clone();
        let e = a.allocate(&clash).unwrap_err();
        assert!(e.to_string().contains("TCP port 80"), "{e}");

        let mut other = req("other");
        other.sharing_key = Some("k2".into());
        assert_ne!(a.allocate(&other).unwrap().ips, first, "another key gets its own address");
    }

    #[test]
    fn dual_stack_comes_from_one_pool() {
        let p = pools(&[("lan", &["192.0.2.200-192.0.2.250", "2001:db8:1::c8-2001:db8:1::fa"], true)]);
        let mut a = Allocator::new(&p);
        let mut r = req("dual");
        r.families = FamilyPolicy { families: vec![Family::V6, Family::V4], require_all: true };
        let got = a.allocate(&r).unwrap();
        assert_eq!(got.ips, vec![ip("2001:db8:1::c8"), ip("192.0.2.200")]);

        let p4 = pools(&[("v4", &["192.0.2.200/30"], true)]);
        let mut a = Allocator::new(&p4);
        r.families = FamilyPolicy { families: vec![Family::V4, Family::V6], require_all: true };
        assert!(a.allocate(&r).is_err(), "RequireDualStack needs both");
        r.families.require_all = false;
        assert_eq!(a.allocate(&r).unwrap().ips, vec![ip("192.0.2.200")], "PreferDualStack takes what exists");
    }

    #[test]
    fn restore_keeps_status_and_blocks_the_address() {
        let p = pools(&[("lan", &["192.0.2.200-192.0.2.250"], true)]);
        let mut a = Allocator::new(&p);
        a.restore(&req("old"), &[ip("192.0.2.210")]).unwrap();
        assert!(a.satisfies(&req("old")));
        let mut r = req("new");
        r.ips = vec![ip("192.0.2.210")];
        assert!(a.allocate(&r).is_err());
        // Outside every pool: kept, with no pool.
        let got = a.restore(&req("orphan"), &[ip("198.18.9.9")]).unwrap();
        assert_eq!(got.pool, None);
    }

    #[test]
    fn a_pool_edit_keeps_what_is_in_use() {
        let p = pools(&[("lan", &["192.0.2.200-192.0.2.250"], true)]);
        let mut a = Allocator::new(&p);
        a.allocate(&req("a")).unwrap();
        let orphaned = a.set_pools(&pools(&[("lan", &["192.0.2.220-192.0.2.250"], true)]));
        assert_eq!(orphaned, vec![req("a").key]);
        assert_eq!(a.get(&req("a").key).unwrap().ips, vec![ip("192.0.2.200")]);
        // Still in use: nobody else gets it even if a pool covers it again.
        a.set_pools(&p);
        let mut r = req("b");
        r.ips = vec![ip("192.0.2.200")];
        assert!(a.allocate(&r).is_err());
    }

    #[test]
    fn service_allocation_priority_and_namespaces_choose_the_pool() {
        use ferrolb_api::ServiceAllocation;
        let mk = |name: &str, addr: &str, prio: Option<i32>, ns: Option<Vec<&str>>| PoolInput {
            name: name.into(),
            labels: BTreeMap::new(),
            created: None,
            spec: IPAddressPoolSpec {
                addresses: vec![addr.into()],
                service_allocation: Some(ServiceAllocation {
                    priority: prio,
                    namespaces: ns.map(|v| v.into_iter().map(String::from).collect()),
                    ..Default::default()
                }),
                ..Default::default()
            },
        };
        let p = build_pools(vec![
            mk("low", "192.0.2.10/32", Some(20), None),
            mk("high", "192.0.2.20/32", Some(10), None),
            mk("team", "192.0.2.30/32", Some(1), Some(vec!["team"])),
            PoolInput {
                name: "plain".into(),
                labels: BTreeMap::new(),
                created: None,
                spec: IPAddressPoolSpec { addresses: vec!["192.0.2.40/32".into()], ..Default::default() },
            },
        ]);
        let mut a = Allocator::new(&p);
        // Priority 10 before 20; "team" only serves its namespace.
        assert_eq!(a.allocate(&req("x")).unwrap().pool.as_deref(), Some("high"));
        assert_eq!(a.allocate(&req("y")).unwrap().pool.as_deref(), Some("low"));
        assert_eq!(a.allocate(&req("z")).unwrap().pool.as_deref(), Some("plain"));
        let mut t = req("t");
        t.key.namespace = "team".into();
        assert_eq!(a.allocate(&t).unwrap().pool.as_deref(), Some("team"));
        let mut intruder = req("i");
        intruder.pool = Some("team".into());
        assert_eq!(a.allocate(&intruder).unwrap_err(), AllocError::PoolNotAllowed { pool: "team".into() });
    }

    #[test]
    fn local_services_share_only_with_the_same_selector() {
        let p = pools(&[("lan", &["192.0.2.200-192.0.2.250"], true)]);
        let mut a = Allocator::new(&p);
        let mut one = req("one");
        one.sharing_key = Some("k".into());
        one.local = true;
        one.selector = [("app".to_string(), "a".to_string())].into();
        let ip1 = a.allocate(&one).unwrap().ips.clone();
        let mut two = req("two");
        two.sharing_key = Some("k".into());
        two.ports = [PortKey { protocol: "TCP".into(), port: 443 }].into();
        two.selector = [("app".to_string(), "b".to_string())].into();
        two.ips = ip1.clone();
        let e = a.allocate(&two).unwrap_err();
        assert!(e.to_string().contains("same pod selector"), "{e}");
        two.selector = one.selector.clone();
        assert_eq!(a.allocate(&two).unwrap().ips, ip1);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Alloc { svc: u8, key: Option<u8>, port: u16, ip: Option<u8>, pool: Option<u8> },
        Release { svc: u8 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u8..12, proptest::option::of(0u8..2), 1u16..4, proptest::option::of(0u8..16), proptest::option::of(0u8..3))
                .prop_map(|(svc, key, port, ip, pool)| Op::Alloc { svc, key, port, ip, pool }),
            1 => (0u8..12).prop_map(|svc| Op::Release { svc }),
        ]
    }

    /// Services 0, 3, 6, 9 live in namespace `b`, the others in `default`; those of `b` with even
    /// numbers opt in to share with `default`, and `default/s4` with any namespace.
    fn key_of(svc: u8) -> ServiceKey {
        ServiceKey::new(if svc.is_multiple_of(3) { "b" } else { "default" }, format!("s{svc}"))
    }

    fn request_for(svc: u8, key: Option<u8>, port: u16, ip_: Option<u8>, pool: Option<u8>) -> Request {
        let mut r = req(&format!("s{svc}"));
        r.key = key_of(svc);
        r.shared_namespaces = match svc {
            0 | 6 => ["default".to_string()].into(),
            4 => ["*".to_string()].into(),
            _ => BTreeSet::new(),
        };
        r.sharing_key = key.map(|k| format!("k{k}"));
        r.ports = [PortKey { protocol: "TCP".into(), port: i32::from(port) }].into();
        r.ips = ip_.map(|i| ip(&format!("192.0.2.{}", 200 + i))).into_iter().collect();
        r.pool = pool.map(|p| ["a", "b", "c"][usize::from(p)].to_string());
        r
    }

    /// The lowest free address as it was found before the index: every address of the pool's
    /// ranges of family `f`, in order, the first usable one nobody but `me` holds.
    fn lowest_free_by_walk(a: &Allocator, pool: &Pool, f: Family, me: &ServiceKey) -> Option<IpAddr> {
        (pool.ranges.iter().filter(|r| r.family() == f).flat_map(|r| r.iter()))
            .find(|c| pool.is_usable(*c) && a.holders(*c).all(|k| k == me))
    }

    /// Addresses in use per pool, counted from the holders.
    fn usage_by_walk(a: &Allocator, pool: &Pool, f: Family) -> u64 {
        let held: BTreeSet<IpAddr> = a.allocations().flat_map(|(_, x)| x.ips.iter().copied()).collect();
        held.iter().filter(|ip| Family::of(ip) == f && pool.contains(**ip)).count() as u64
    }

    #[derive(Clone, Debug)]
    enum IndexOp {
        Alloc { svc: u8, v6: bool, pool: Option<u8> },
        Restore { svc: u8, ips: Vec<(bool, u16)> },
        Release { svc: u8 },
        Repool { which: u8 },
    }

    fn index_op() -> impl Strategy<Value = IndexOp> {
        prop_oneof![
            4 => (0u8..24, any::<bool>(), proptest::option::of(0u8..3))
                .prop_map(|(svc, v6, pool)| IndexOp::Alloc { svc, v6, pool }),
            2 => (0u8..24, proptest::collection::vec((any::<bool>(), 0u16..700), 1..3))
                .prop_map(|(svc, ips)| IndexOp::Restore { svc, ips }),
            2 => (0u8..24).prop_map(|svc| IndexOp::Release { svc }),
            1 => (0u8..3).prop_map(|which| IndexOp::Repool { which }),
        ]
    }

    /// Pools that cross .255/.0 boundaries with and without avoidBuggyIPs, in several ranges,
    /// in three versions a pool edit switches between.
    fn index_pools(which: u8) -> Pools {
        let build =
            |specs: &[(&str, &[&str], bool)]| pools_with(specs, |spec, avoid| spec.avoid_buggy_ips = Some(avoid));
        match which {
            0 => build(&[
                ("a", &["192.0.2.250-192.0.3.4", "2001:db8:1::fffe-2001:db8:1::1:3"], true),
                ("b", &["192.0.3.250-192.0.4.3", "192.0.4.100/31"], false),
                ("c", &["192.0.5.0/24", "2001:db8:2::/120"], true),
            ]),
            1 => build(&[
                ("a", &["192.0.2.252-192.0.3.2", "2001:db8:1::ffff-2001:db8:1::1:1"], false),
                ("c", &["192.0.5.0/25", "192.0.3.250-192.0.4.3"], true),
            ]),
            _ => build(&[]),
        }
    }

    /// An address for a restore: IPv4 from 192.0.2.200 on, IPv6 from 2001:db8:1::ff00 on.
    fn index_ip(v6: bool, n: u16) -> IpAddr {
        if v6 {
            let base: u128 = "2001:db8:1::ff00".parse::<std::net::Ipv6Addr>().unwrap().into();
            IpAddr::V6((base + u128::from(n)).into())
        } else {
            let base: u32 = "192.0.2.200".parse::<std::net::Ipv4Addr>().unwrap().into();
            IpAddr::V4((base + u32::from(n)).into())
        }
    }

    proptest! {
        /// The free-range index gives the address the walk over every address gave, and the
        /// same usage, under any sequence of allocations, restores, releases and pool edits.
        #[test]
        fn the_index_picks_what_a_walk_picks(ops in proptest::collection::vec(index_op(), 1..80)) {
            let mut a = Allocator::new(&index_pools(0));
            for op in ops {
                match op {
                    IndexOp::Alloc { svc, v6, pool } => {
                        let mut r = req(&format!("s{svc}"));
                        r.families.families = vec![if v6 { Family::V6 } else { Family::V4 }];
                        r.pool = pool.map(|p| ["a", "b", "c"][usize::from(p)].to_string());
                        let _ = a.allocate(&r);
                    }
                    IndexOp::Restore { svc, ips } => {
                        let ips: Vec<IpAddr> = ips.iter().map(|(v6, n)| index_ip(*v6, *n)).collect();
                        let _ = a.restore(&req(&format!("s{svc}")), &ips);
                    }
                    IndexOp::Release { svc } => {
                        a.release(&req(&format!("s{svc}")).key);
                    }
                    IndexOp::Repool { which } => {
                        a.set_pools(&index_pools(which));
                    }
                }
                let mut keys: Vec<ServiceKey> = a.allocations().map(|(k, _)| k.clone()).collect();
                keys.push(req("nobody").key);
                let usage = a.usage();
                for pool in a.pools().values() {
                    for f in [Family::V4, Family::V6] {
                        for me in &keys {
                            prop_assert_eq!(a.lowest_free(pool, f, me), lowest_free_by_walk(&a, pool, f, me), "{} {} {}", pool.name, f, me);
                        }
                        let u = usage[&pool.name];
                        let in_use = if f == Family::V4 { u.in_use_v4 } else { u.in_use_v6 };
                        prop_assert_eq!(in_use, usage_by_walk(&a, pool, f));
                    }
                }
                let orphans: Vec<ServiceKey> = a.allocations().filter(|(_, x)| x.pool.is_none()).map(|(k, _)| k.clone()).collect();
                let pools = Pools { pools: a.pools().clone(), rejected: BTreeMap::new() };
                prop_assert_eq!(a.set_pools(&pools), orphans);
            }
        }

        #[test]
        fn invariants_hold_under_any_sequence(ops in proptest::collection::vec(op(), 1..60)) {
            let p = pools(&[("a", &["192.0.2.200-192.0.2.203"], true), ("b", &["192.0.2.204-192.0.2.207"], false), ("c", &["192.0.2.208-192.0.2.215"], true)]);
            let mut a = Allocator::new(&p);
            let mut reqs: BTreeMap<ServiceKey, Request> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Alloc { svc, key, port, ip, pool } => {
                        let r = request_for(svc, key, port, ip, pool);
                        let before = a.get(&r.key).cloned();
                        match a.allocate(&r) {
                            Ok(got) => {
                                // From a pool the service may use, honouring what it asked.
                                let pool = p.pools.get(got.pool.as_deref().unwrap()).unwrap();
                                prop_assert!(got.ips.iter().all(|i| pool.is_usable(*i)));
                                prop_assert!(r.ips.iter().all(|i| got.ips.contains(i)));
                                if let Some(want) = &r.pool { prop_assert_eq!(&pool.name, want); }
                                if r.pool.is_none() && r.ips.is_empty() { prop_assert!(pool.auto_assign); }
                                reqs.insert(r.key.clone(), r);
                            }
                            // A failure leaves what was held untouched.
                            Err(_) => prop_assert_eq!(a.get(&r.key).cloned(), before),
                        }
                    }
                    Op::Release { svc } => {
                        let key = key_of(svc);
                        let held = a.get(&key).map(|x| x.ips.clone()).unwrap_or_default();
                        a.release(&key);
                        reqs.remove(&key);
                        // Releasing frees exactly what was held: nothing of ours stays indexed.
                        for i in held { prop_assert!(a.holders(i).all(|k| *k != key)); }
                    }
                }
                // No address is held by two services unless they may share it.
                for (key, x) in a.allocations() {
                    for i in &x.ips {
                        for other in a.holders(*i).filter(|o| *o != key) {
                            let (r1, r2) = (&reqs[key], &reqs[other]);
                            prop_assert!(Sharing::of(r1).compatible(&Sharing::of(r2)).is_ok(), "{} and {} share {}", key, other, i);
                        }
                    }
                }
                // Restoring everything into a fresh allocator, then re-checking, changes nothing.
                let mut b = Allocator::new(&p);
                for (key, x) in a.allocations() {
                    prop_assert!(b.restore(&reqs[key], &x.ips).is_ok());
                }
                for r in reqs.values() {
                    prop_assert!(b.satisfies(r), "{} would move after a restore", r.key);
                }
            }
        }
    }
}

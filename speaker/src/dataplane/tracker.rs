//! Each family's [`Model`], kept between syncs and recomputed for the Services whose inputs
//! changed only: the Service object itself, or an EndpointSlice naming it (label
//! `kubernetes.io/service-name`). Pure: the cluster's objects come through [`Objects`].
//!
//! ```text
//!   changed Services ─────────────┐
//!   changed EndpointSlices ──> their Services, before and after (a slice may change owner)
//!                                 └──> source::service_model per family ──> steering (dead nodes)
//!   every Service's ClusterIPs / LB IPs (claims::Owners, kept per Service)
//!                                 └──> externalIPs settled again for the Services that have any
//!   node-level inputs: node IPs, pod CIDRs, service CIDRs (fields of the Model), dead nodes
//!   (a change steers every Service again)
//! ```
//!
//! The result is the same [`Model`] that [`super::source::build_model_with_warnings`] builds from
//! all objects (plus service CIDRs and steering), and the keys of the Services that may differ
//! from the last one; a watch that listed everything again (`all`) makes every Service a change.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::claims::Owners;
use super::model::{Family, Mode, Model, ServiceKey, Warning};
use super::source::{self, SERVICE_NAME_LABEL, SourceSettings};
use crate::watch::Changes;

/// The cluster's objects, as the watches hold them.
pub trait Objects {
    fn service(&self, key: &ServiceKey) -> Option<Arc<Service>>;
    fn slice(&self, namespace: &str, name: &str) -> Option<Arc<EndpointSlice>>;
    fn all_services(&self) -> Vec<Arc<Service>>;
    fn all_slices(&self) -> Vec<Arc<EndpointSlice>>;
}

/// What one [`Tracker::update`] found.
#[derive(Debug, Default)]
pub struct Update {
    /// The Services that may differ from the last update (`None`: any of them).
    pub changed: Option<BTreeSet<ServiceKey>>,
    /// The EndpointSlices that changed, or appeared, since the last update (after a new list:
    /// those whose version differs from the one last seen; none at the first list).
    pub slices: Vec<Arc<EndpointSlice>>,
}

/// The models of every family, kept up to date.
#[derive(Debug)]
pub struct Tracker {
    settings: SourceSettings,
    models: BTreeMap<Family, Model>,
    /// Per family, the externalIPs of each Service that has any, before settling.
    raw_external: BTreeMap<Family, BTreeMap<ServiceKey, Vec<IpAddr>>>,
    owners: Owners,
    /// Service -> the names of its slices (in its namespace).
    slices_of: HashMap<ServiceKey, BTreeSet<String>>,
    /// Slice (namespace, name) -> the Service it names, and a hash of its resourceVersion (a
    /// new list tells what changed while the watch was away by it).
    owner_of: HashMap<(String, String), (ServiceKey, u64)>,
    /// Per Service, its unreadable-source-range warning.
    range_warnings: BTreeMap<ServiceKey, Vec<Warning>>,
    /// Per family, the externalIP warnings of the last settling.
    settle_warnings: BTreeMap<Family, Vec<Warning>>,
    dead: BTreeSet<String>,
    started: bool,
}

impl Tracker {
    pub fn new(settings: SourceSettings, families: &[Family]) -> Self {
        let models = families
            .iter()
            .map(|f| {
                let m = Model {
                    node: settings.node.clone(),
                    family: *f,
                    mode: settings.mode,
                    node_ips: Vec::new(),
                    pod_cidrs: Vec::new(),
                    service_cidrs: Vec::new(),
                    services: BTreeMap::new(),
                };
                (*f, m)
            })
            .collect();
        Self {
            settings,
            models,
            raw_external: BTreeMap::new(),
            owners: Owners::default(),
            slices_of: HashMap::new(),
            owner_of: HashMap::new(),
            range_warnings: BTreeMap::new(),
            settle_warnings: BTreeMap::new(),
            dead: BTreeSet::new(),
            started: false,
        }
    }

    /// The model of `family`.
    pub fn model(&self, family: Family) -> Option<&Model> {
        self.models.get(&family)
    }

    /// The models, one per family.
    pub fn models(&self) -> impl Iterator<Item = &Model> {
        self.models.values()
    }

    /// What the owners of Services must be told about how their objects were read.
    pub fn warnings(&self) -> Vec<Warning> {
        self.range_warnings.values().chain(self.settle_warnings.values()).flatten().cloned().collect()
    }

    /// Brings the models up to date: `services` and `slices` changed since the last update,
    /// `node` is our Node, `service_cidrs` the service CIDRs per family, `dead` the nodes whose
    /// speakers died.
    pub fn update(
        &mut self,
        objects: &impl Objects,
        services: Changes,
        slices: Changes,
        node: Option<&Node>,
        service_cidrs: &BTreeMap<Family, Vec<IpNetwork>>,
        dead: &BTreeSet<String>,
    ) -> Update {
        let full = !self.started || services.all || slices.all;
        let relist = self.started;
        self.started = true;
        let mut dirty: BTreeSet<ServiceKey> = BTreeSet::new();
        let mut changed_slices = Vec::new();
        if full {
            self.slices_of.clear();
            let before = std::mem::take(&mut self.owner_of);
            for slice in objects.all_slices() {
                let (ns, name) = slice_ref(&slice);
                if let Some(key) = owner(&slice) {
                    let r = (ns, name);
                    let version = version_of(&slice);
                    if relist && before.get(&r).is_none_or(|(_, v)| *v != version) {
                        changed_slices.push(Arc::clone(&slice));
                    }
                    self.slices_of.entry(key.clone()).or_default().insert(r.1.clone());
                    self.owner_of.insert(r, (key, version));
                }
            }
            dirty.extend(self.models.values().flat_map(|m| m.services.keys().cloned()));
            dirty.extend(self.range_warnings.keys().cloned());
            for svc in objects.all_services() {
                if let (Some(ns), Some(name)) = (svc.metadata.namespace.as_deref(), svc.metadata.name.as_deref()) {
                    dirty.insert(ServiceKey::new(ns, name));
                }
            }
        } else {
            dirty.extend(services.objects.iter().map(|(ns, name)| ServiceKey::new(ns, name)));
            for (ns, name) in slices.objects {
                let now = objects.slice(&ns, &name);
                let after = now.as_deref().and_then(owner);
                let r = (ns, name);
                let before = self.owner_of.remove(&r).map(|(key, _)| key);
                if let Some(before) = before {
                    if let Some(names) = self.slices_of.get_mut(&before) {
                        names.remove(&r.1);
                        if names.is_empty() {
                            self.slices_of.remove(&before);
                        }
                    }
                    dirty.insert(before);
                }
                if let Some(after) = after {
                    self.slices_of.entry(after.clone()).or_default().insert(r.1.clone());
                    let version = now.as_deref().map(version_of).unwrap_or_default();
                    self.owner_of.insert(r, (after.clone(), version));
                    dirty.insert(after);
                }
                changed_slices.extend(now);
            }
        }

        // Node-level inputs: fields of the models, which the renderer compares itself.
        let node_ips = if self.settings.node_ips.is_empty() { node.map(source::internal_ips) } else { None };
        let pod_cidrs = if self.settings.pod_cidrs.is_empty() { node.map(source::pod_cidrs) } else { None };
        for (family, m) in &mut self.models {
            m.node_ips = node_ips.clone().unwrap_or_else(|| self.settings.node_ips.clone());
            m.pod_cidrs = pod_cidrs.clone().unwrap_or_else(|| self.settings.pod_cidrs.clone());
            m.service_cidrs = service_cidrs.get(family).cloned().unwrap_or_default();
        }

        let mut changed = dirty.clone();
        for key in &dirty {
            let svc = objects.service(key);
            self.owners.set(key, svc.as_deref());
            let names = self.slices_of.get(key);
            let slices: Vec<Arc<EndpointSlice>> =
                names.into_iter().flatten().filter_map(|n| objects.slice(&key.namespace, n)).collect();
            let slices: Vec<&EndpointSlice> = slices.iter().map(AsRef::as_ref).collect();
            let mut unreadable = false;
            for (family, m) in &mut self.models {
                let built = svc.as_deref().and_then(|s| source::service_model(s, *family, &slices));
                let raw = self.raw_external.entry(*family).or_default();
                match built {
                    Some(mut built) => {
                        unreadable |= built.source_ranges_unreadable;
                        if self.settings.mode == Mode::Full && !built.external_ips.is_empty() {
                            raw.insert(key.clone(), built.external_ips.clone());
                        } else {
                            raw.remove(key);
                        }
                        built.steer_away_from(&self.settings.node, dead);
                        m.services.insert(key.clone(), built);
                    }
                    None => {
                        raw.remove(key);
                        m.services.remove(key);
                    }
                }
            }
            match svc.as_deref().filter(|_| unreadable) {
                Some(s) => self.range_warnings.insert(key.clone(), source::source_range_warnings(key, s)),
                None => self.range_warnings.remove(key),
            };
        }

        // externalIPs: a Service's depend on every other Service's addresses; only those that
        // have any are settled again.
        if self.settings.mode == Mode::Full && (full || !dirty.is_empty()) {
            for (family, m) in &mut self.models {
                let raw = self.raw_external.entry(*family).or_default();
                let mut subset: BTreeMap<ServiceKey, _> = raw
                    .iter()
                    .filter_map(|(k, ips)| {
                        let mut svc = m.services.get(k)?.clone();
                        svc.external_ips.clone_from(ips);
                        Some((k.clone(), svc))
                    })
                    .collect();
                let warnings = self.owners.settle(&mut subset, &self.settings.external_ip_cidrs);
                self.settle_warnings.insert(*family, warnings);
                for (k, settled) in subset {
                    if let Some(svc) = m.services.get_mut(&k)
                        && svc.external_ips != settled.external_ips
                    {
                        svc.external_ips = settled.external_ips;
                        changed.insert(k);
                    }
                }
            }
        }

        // Dead nodes: every Service is steered again.
        if *dead != self.dead {
            for m in self.models.values_mut() {
                for (k, svc) in &mut m.services {
                    if svc.steer_away_from(&self.settings.node, dead) {
                        changed.insert(k.clone());
                    }
                }
            }
            self.dead.clone_from(dead);
        }
        Update { changed: (!full).then_some(changed), slices: changed_slices }
    }
}

fn slice_ref(slice: &EndpointSlice) -> (String, String) {
    (slice.metadata.namespace.clone().unwrap_or_default(), slice.metadata.name.clone().unwrap_or_default())
}

/// A hash of an object's resourceVersion (an opaque string: only compared for equality).
fn version_of(slice: &EndpointSlice) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    slice.metadata.resource_version.hash(&mut h);
    h.finish()
}

/// The Service an EndpointSlice belongs to.
fn owner(slice: &EndpointSlice) -> Option<ServiceKey> {
    let name = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some(ServiceKey::new(slice.metadata.namespace.as_deref()?, name.as_str()))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    use super::*;

    /// The cluster as a map, changed by the test, with the change log the watches would write.
    #[derive(Default)]
    struct Cluster {
        services: BTreeMap<(String, String), Arc<Service>>,
        slices: BTreeMap<(String, String), Arc<EndpointSlice>>,
        service_changes: Changes,
        slice_changes: Changes,
        /// The last resourceVersion given to a slice.
        version: u64,
    }

    impl Objects for Cluster {
        fn service(&self, key: &ServiceKey) -> Option<Arc<Service>> {
            self.services.get(&(key.namespace.clone(), key.name.clone())).cloned()
        }
        fn slice(&self, namespace: &str, name: &str) -> Option<Arc<EndpointSlice>> {
            self.slices.get(&(namespace.to_owned(), name.to_owned())).cloned()
        }
        fn all_services(&self) -> Vec<Arc<Service>> {
            self.services.values().cloned().collect()
        }
        fn all_slices(&self) -> Vec<Arc<EndpointSlice>> {
            self.slices.values().cloned().collect()
        }
    }

    impl Cluster {
        fn put_service(&mut self, name: &str, cluster_ip: &str, external: &[&str], created: i64) {
            let svc = Service {
                metadata: ObjectMeta {
                    namespace: Some("default".into()),
                    name: Some(name.into()),
                    creation_timestamp: Some(Time(k8s_openapi::jiff::Timestamp::from_second(created).unwrap())),
                    ..Default::default()
                },
                spec: Some(ServiceSpec {
                    cluster_ips: Some(vec![cluster_ip.into()]),
                    external_ips: Some(external.iter().map(|s| s.to_string()).collect()),
                    ports: Some(vec![ServicePort { name: Some("http".into()), port: 80, ..Default::default() }]),
                    ..Default::default()
                }),
                status: None,
            };
            self.services.insert(("default".into(), name.into()), Arc::new(svc));
            self.service_changes.objects.insert(("default".into(), name.into()));
        }

        fn remove_service(&mut self, name: &str) {
            self.services.remove(&("default".into(), name.into()));
            self.service_changes.objects.insert(("default".into(), name.into()));
        }

        fn put_slice(&mut self, name: &str, service: &str, endpoints: &[(&str, &str)]) {
            self.version += 1;
            let slice = EndpointSlice {
                metadata: ObjectMeta {
                    namespace: Some("default".into()),
                    name: Some(name.into()),
                    resource_version: Some(self.version.to_string()),
                    labels: Some([(SERVICE_NAME_LABEL.to_owned(), service.to_owned())].into()),
                    ..Default::default()
                },
                address_type: "IPv4".into(),
                ports: Some(vec![EndpointPort { name: Some("http".into()), port: Some(8080), ..Default::default() }]),
                endpoints: Some(
                    endpoints
                        .iter()
                        .map(|(ip, node)| Endpoint {
                            addresses: vec![ip.to_string()],
                            node_name: Some(node.to_string()),
                            conditions: Some(EndpointConditions { ready: Some(true), ..Default::default() }),
                            ..Default::default()
                        })
                        .collect(),
                ),
            };
            self.slices.insert(("default".into(), name.into()), Arc::new(slice));
            self.slice_changes.objects.insert(("default".into(), name.into()));
        }

        fn settings() -> SourceSettings {
            SourceSettings {
                node: "node-1".into(),
                mode: Mode::Full,
                node_ips: vec!["192.0.2.11".parse().unwrap()],
                pod_cidrs: vec!["198.18.1.0/24".parse().unwrap()],
                external_ip_cidrs: vec![],
            }
        }

        /// What building from every object gives.
        fn expected(&self, dead: &BTreeSet<String>) -> Model {
            let services: Vec<Arc<Service>> = self.all_services();
            let slices: Vec<Arc<EndpointSlice>> = self.all_slices();
            let mut m = source::build_model(
                &Self::settings(),
                Family::V4,
                services.iter().map(AsRef::as_ref),
                slices.iter().map(AsRef::as_ref),
                [],
            );
            m.service_cidrs = vec!["198.19.0.0/16".parse().unwrap()];
            m.steer_away_from(dead);
            m
        }

        fn update(&mut self, tracker: &mut Tracker, dead: &BTreeSet<String>) -> Option<BTreeSet<ServiceKey>> {
            let (services, slices) =
                (std::mem::take(&mut self.service_changes), std::mem::take(&mut self.slice_changes));
            let cidrs = BTreeMap::from([(Family::V4, vec!["198.19.0.0/16".parse().unwrap()])]);
            let update = tracker.update(self, services, slices, None, &cidrs, dead);
            assert_eq!(tracker.model(Family::V4), Some(&self.expected(dead)));
            update.changed
        }
    }

    fn keys(names: &[&str]) -> BTreeSet<ServiceKey> {
        names.iter().map(|n| ServiceKey::new("default", *n)).collect()
    }

    #[test]
    fn the_models_are_those_built_from_every_object_after_each_change() {
        let mut c = Cluster::default();
        c.put_service("web", "198.19.0.10", &["192.0.2.150"], 1);
        c.put_service("api", "198.19.0.11", &["192.0.2.150"], 2);
        c.put_service("db", "198.19.0.12", &[], 3);
        c.put_slice("web-1", "web", &[("198.18.1.2", "node-1")]);
        c.put_slice("api-1", "api", &[("198.18.2.2", "node-2"), ("198.18.1.3", "node-1")]);
        let mut t = Tracker::new(Cluster::settings(), &[Family::V4]);
        let none = BTreeSet::new();
        assert_eq!(c.update(&mut t, &none), None, "the first update is a full one");
        assert_eq!(t.warnings().len(), 1, "api's externalIP is web's: {:?}", t.warnings());

        // web goes: api gets the externalIP, though only web changed.
        c.remove_service("web");
        let changed = c.update(&mut t, &none).unwrap();
        assert!(changed.is_superset(&keys(&["web", "api"])), "{changed:?}");
        assert!(!changed.contains(&ServiceKey::new("default", "db")));
        assert!(t.warnings().is_empty());

        // A slice moves from api to db: both change.
        c.put_slice("api-1", "db", &[("198.18.2.2", "node-2")]);
        assert_eq!(c.update(&mut t, &none).unwrap(), keys(&["api", "db"]));

        // A dead node steers every Service that has endpoints there.
        let dead = BTreeSet::from(["node-2".to_owned()]);
        c.put_slice("web-1", "web", &[("198.18.1.2", "node-1")]);
        let changed = c.update(&mut t, &dead).unwrap();
        assert!(changed.contains(&ServiceKey::new("default", "db")), "{changed:?}");

        // Nothing changed: nothing to do.
        assert_eq!(c.update(&mut t, &dead).unwrap(), BTreeSet::new());

        // A new list: everything.
        c.service_changes.all = true;
        assert_eq!(c.update(&mut t, &none), None);
    }

    fn names(slices: &[Arc<EndpointSlice>]) -> Vec<&str> {
        slices.iter().filter_map(|s| s.metadata.name.as_deref()).collect()
    }

    /// The slices reported as changed (whose trigger times make the programming latency): the
    /// changed ones, and after a new list those whose version moved while the watch was away;
    /// none at the first list, which is no change.
    #[test]
    fn a_new_list_reports_the_slices_that_changed_meanwhile() {
        let mut c = Cluster::default();
        c.put_service("web", "198.19.0.10", &[], 1);
        c.put_service("api", "198.19.0.11", &[], 2);
        c.put_slice("web-1", "web", &[("198.18.1.2", "node-1")]);
        c.put_slice("api-1", "api", &[("198.18.1.3", "node-1")]);
        let mut t = Tracker::new(Cluster::settings(), &[Family::V4]);
        let cidrs = BTreeMap::new();
        let none = BTreeSet::new();
        let mut update = |c: &mut Cluster| {
            let (services, slices) = (std::mem::take(&mut c.service_changes), std::mem::take(&mut c.slice_changes));
            t.update(c, services, slices, None, &cidrs, &none).slices
        };
        assert!(update(&mut c).is_empty(), "the first list");
        c.put_slice("web-1", "web", &[("198.18.1.4", "node-1")]);
        assert_eq!(names(&update(&mut c)), ["web-1"]);
        // Changed while the watch was away, then listed again.
        c.put_slice("api-1", "api", &[("198.18.1.5", "node-1")]);
        c.put_slice("api-2", "api", &[("198.18.1.6", "node-1")]);
        c.slice_changes = Changes { all: true, ..Changes::default() };
        assert_eq!(names(&update(&mut c)), ["api-1", "api-2"]);
        c.slice_changes.all = true;
        assert!(update(&mut c).is_empty(), "listed again, nothing changed");
    }
}

//! Reconcile: a snapshot of the cluster in, the writes that bring it in line out. Pure; the
//! allocator's state is carried between passes, nothing else.
//!
//! ```text
//!   pools + services + namespaces ──> Reconciler::reconcile ──> [Action]
//!                                         │ 1. restore every assignment from Service status
//!                                         │    (once, before anything new is handed out)
//!                                         │ 2. release what is no longer ours
//!                                         └ 3. keep, or allocate, for every service of ours
//! ```

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ferrolb_config::Pools;
use k8s_openapi::api::core::v1::Service;

use crate::allocator::{Allocator, ServiceKey};
use crate::service::{self, ClassPolicy};

/// A write the reconcile asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Set `status.loadBalancer.ingress` to these addresses (`ipMode: VIP`); empty clears it.
    SetStatus { key: ServiceKey, ips: Vec<IpAddr> },
    /// Set (or, with `None`, remove) the `ip-allocated-from-pool` annotation.
    SetPoolAnnotation { key: ServiceKey, pool: Option<String> },
    /// Tell the user, on the Service (`uid` lets `kubectl describe` find it).
    Event { key: ServiceKey, uid: Option<String>, warning: bool, reason: &'static str, message: String },
}

pub const REASON_ALLOCATED: &str = "IPAllocated";
pub const REASON_FAILED: &str = "AllocationFailed";
pub const REASON_OUTSIDE_POOL: &str = "IPOutsidePool";
pub const REASON_RELEASED: &str = "IPReleased";

/// The reconciler of one leader term.
#[derive(Debug, Default)]
pub struct Reconciler {
    pub class: ClassPolicy,
    alloc: Allocator,
    restored: bool,
    /// The last event told per service, so a standing problem is said once, not every pass.
    told: HashMap<ServiceKey, (&'static str, String)>,
    /// Services told that their addresses left every pool.
    orphans_told: BTreeSet<ServiceKey>,
}

impl Reconciler {
    pub fn new(class: ClassPolicy) -> Self {
        Reconciler { class, ..Default::default() }
    }

    pub fn allocator(&self) -> &Allocator {
        &self.alloc
    }

    /// How many entries the per-service memory holds, over every map (allocations, the
    /// allocator's holders of each address, what was told): bounded by the Services of ours.
    pub fn remembered(&self) -> usize {
        let ips: BTreeSet<IpAddr> = self.alloc.allocations().flat_map(|(_, a)| a.ips.iter().copied()).collect();
        let holders: usize = ips.iter().map(|ip| self.alloc.holders(*ip).count()).sum();
        self.alloc.allocations().count() + holders + self.told.len() + self.orphans_told.len()
    }

    fn tell(&mut self, out: &mut Vec<Action>, svc: &Service, warning: bool, reason: &'static str, message: String) {
        let key = service::key(svc);
        if self.told.get(&key).is_some_and(|(r, m)| *r == reason && *m == message) {
            return;
        }
        self.told.insert(key.clone(), (reason, message.clone()));
        out.push(Action::Event { key, uid: svc.metadata.uid.clone(), warning, reason, message });
    }

    /// One pass. `namespaces` maps a namespace to its labels. `services` may be the objects
    /// themselves or the watch cache's shared ones (`Arc<Service>`), which are not copied.
    pub fn reconcile<S: Borrow<Service>>(
        &mut self,
        pools: &Pools,
        services: &[S],
        namespaces: &BTreeMap<String, BTreeMap<String, String>>,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        let orphaned: BTreeSet<ServiceKey> = self.alloc.set_pools(pools).into_iter().collect();
        self.orphans_told.retain(|k| orphaned.contains(k));

        // Oldest first: on a conflict restored from status, the older service keeps the address.
        let mut ours: Vec<&Service> =
            services.iter().map(Borrow::borrow).filter(|s| service::is_ours(s, &self.class)).collect();
        ours.sort_by(|a, b| {
            fn m(s: &Service) -> (Option<k8s_openapi::jiff::Timestamp>, &str, &str) {
                let m = &s.metadata;
                (
                    m.creation_timestamp.as_ref().map(|t| t.0),
                    m.namespace.as_deref().unwrap_or_default(),
                    m.name.as_deref().unwrap_or_default(),
                )
            }
            m(a).cmp(&m(b))
        });
        let empty = BTreeMap::new();
        let labels_of =
            |s: &Service| namespaces.get(s.metadata.namespace.as_deref().unwrap_or_default()).unwrap_or(&empty);

        if !self.restored {
            for svc in &ours {
                let ips = service::status_ips(svc);
                if ips.is_empty() {
                    continue;
                }
                if let Ok(req) = service::request(svc, labels_of(svc)) {
                    // A conflict is left to the allocation below, which says why.
                    let _ = self.alloc.restore(&req, &ips);
                }
            }
            self.restored = true;
        }

        // Release what is no longer ours.
        let our_keys: BTreeSet<ServiceKey> = ours.iter().map(|s| service::key(s)).collect();
        // What was said to a Service that is gone or no longer ours is forgotten, whether or not
        // it ever got an address: under churn of Services that never get one, this memory would
        // otherwise grow without bound.
        self.told.retain(|k, _| our_keys.contains(k));
        self.orphans_told.retain(|k| our_keys.contains(k));
        let gone: Vec<ServiceKey> =
            self.alloc.allocations().map(|(k, _)| k.clone()).filter(|k| !our_keys.contains(k)).collect();
        // Services no longer ours that still exist, to clear what was written on them.
        let mut existing: HashMap<ServiceKey, &Service> = HashMap::new();
        if !gone.is_empty() {
            for s in services.iter().map(Borrow::borrow) {
                existing.entry(service::key(s)).or_insert(s);
            }
        }
        for key in gone {
            self.alloc.release(&key);
            let Some(svc) = existing.get(&key).copied() else { continue };
            // The Service still exists but stopped being a LoadBalancer of ours. Clear what we
            // wrote, unless another load balancer implementation now owns its status.
            let still_lb = svc.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("LoadBalancer");
            if !still_lb && !service::status_ips(svc).is_empty() {
                out.push(Action::SetStatus { key: key.clone(), ips: vec![] });
            }
            if pool_annotation(svc).is_some() {
                out.push(Action::SetPoolAnnotation { key: key.clone(), pool: None });
            }
            out.push(Action::Event {
                key,
                uid: svc.metadata.uid.clone(),
                warning: false,
                reason: REASON_RELEASED,
                message: "released its load balancer address: the service is no longer a ferrolb LoadBalancer".into(),
            });
        }

        // What every holder asks now comes first (its sharing terms are recorded as it checks):
        // a Service that just opted in to share must count for one earlier in this pass.
        let requests: Vec<_> = ours.iter().map(|svc| service::request(svc, labels_of(svc))).collect();
        let satisfied: Vec<bool> =
            requests.iter().map(|r| r.as_ref().is_ok_and(|req| self.alloc.satisfies(req))).collect();
        for ((svc, req), satisfied) in ours.into_iter().zip(requests).zip(satisfied) {
            let key = service::key(svc);
            let req = match req {
                Ok(r) => r,
                Err(msg) => {
                    self.tell(&mut out, svc, true, REASON_FAILED, msg);
                    self.sync_service(&mut out, svc, &key);
                    continue;
                }
            };
            if !satisfied {
                let before = self.alloc.get(&key).map(|a| a.ips.clone());
                match self.alloc.allocate(&req) {
                    Ok(a) => {
                        let (ips, pool) = (a.ips.clone(), a.pool.clone().unwrap_or_default());
                        if before.as_ref() != Some(&ips) {
                            let list = ips.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
                            self.tell(
                                &mut out,
                                svc,
                                false,
                                REASON_ALLOCATED,
                                format!("assigned {list} from pool {pool}"),
                            );
                        }
                    }
                    Err(e) => {
                        let keep = match &before {
                            Some(ips) => format!(
                                "; it keeps {}",
                                ips.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
                            ),
                            None => String::new(),
                        };
                        self.tell(&mut out, svc, true, REASON_FAILED, format!("cannot assign an address: {e}{keep}"));
                    }
                }
            }
            if orphaned.contains(&key) && self.orphans_told.insert(key.clone()) {
                let ips = self.alloc.get(&key).map(|a| a.ips.clone()).unwrap_or_default();
                let list = ips.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
                out.push(Action::Event {
                    key: key.clone(),
                    uid: svc.metadata.uid.clone(),
                    warning: true,
                    reason: REASON_OUTSIDE_POOL,
                    message: format!(
                        "{list} is no longer in any IPAddressPool; the service keeps it so its traffic is not cut, until it can be moved (re-create the service, or request an address of a pool)"
                    ),
                });
            }
            self.sync_service(&mut out, svc, &key);
        }
        out
    }

    /// The status and annotation writes that make `svc` show what it holds.
    fn sync_service(&self, out: &mut Vec<Action>, svc: &Service, key: &ServiceKey) {
        let Some(a) = self.alloc.get(key) else { return };
        if service::status_ips(svc) != a.ips || !all_vip(svc) {
            out.push(Action::SetStatus { key: key.clone(), ips: a.ips.clone() });
        }
        if pool_annotation(svc) != a.pool.as_deref() {
            out.push(Action::SetPoolAnnotation { key: key.clone(), pool: a.pool.clone() });
        }
    }
}

fn pool_annotation(svc: &Service) -> Option<&str> {
    svc.metadata.annotations.as_ref()?.get(ferrolb_api::annotations::IP_ALLOCATED_FROM_POOL).map(String::as_str)
}

fn all_vip(svc: &Service) -> bool {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .is_none_or(|ing| ing.iter().all(|i| i.ip_mode.as_deref() == Some("VIP")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrolb_api::IPAddressPoolSpec;
    use ferrolb_config::{PoolInput, build_pools};
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
    use proptest::prelude::*;

    fn pools(addrs: &[&str]) -> Pools {
        build_pools(vec![PoolInput {
            name: "lan".into(),
            labels: BTreeMap::new(),
            created: None,
            spec: IPAddressPoolSpec { addresses: addrs.iter().map(|a| a.to_string()).collect(), ..Default::default() },
        }])
    }

    fn svc(name: &str, age: i64) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                uid: Some(format!("uid-{name}")),
                creation_timestamp: Some(Time(k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + age).unwrap())),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                type_: Some("LoadBalancer".into()),
                ports: Some(vec![ServicePort { port: 80, ..Default::default() }]),
                ip_families: Some(vec!["IPv4".into()]),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn with_status(mut s: Service, ips: &[&str]) -> Service {
        let ips: Vec<IpAddr> = ips.iter().map(|i| i.parse().unwrap()).collect();
        service::set_status_ips(&mut s, &ips);
        s
    }

    /// Applies the status and annotation actions to the services, as the API server would.
    fn apply(services: &mut [Service], actions: &[Action]) {
        for a in actions {
            match a {
                Action::SetStatus { key, ips } => {
                    if let Some(s) = services.iter_mut().find(|s| service::key(s) == *key) {
                        service::set_status_ips(s, ips);
                    }
                }
                Action::SetPoolAnnotation { key, pool } => {
                    if let Some(s) = services.iter_mut().find(|s| service::key(s) == *key) {
                        let ann = s.metadata.annotations.get_or_insert_with(BTreeMap::new);
                        match pool {
                            Some(p) => ann.insert(ferrolb_api::annotations::IP_ALLOCATED_FROM_POOL.into(), p.clone()),
                            None => ann.remove(ferrolb_api::annotations::IP_ALLOCATED_FROM_POOL),
                        };
                    }
                }
                Action::Event { .. } => {}
            }
        }
    }

    fn ips_of(services: &[Service]) -> BTreeMap<String, Vec<IpAddr>> {
        services.iter().map(|s| (s.metadata.name.clone().unwrap_or_default(), service::status_ips(s))).collect()
    }

    /// Sharing across namespaces once both sides opt in, whichever side opts in last, and in one
    /// pass even when the Service asking comes before the holder in the pass.
    #[test]
    fn cross_namespace_sharing_follows_the_last_opt_in() {
        use ferrolb_api::annotations::{ALLOW_SHARED_IP, ALLOW_SHARED_IP_NAMESPACES};
        let p = pools(&["192.0.2.200-192.0.2.250"]);
        let mut r = Reconciler::new(ClassPolicy::default());
        let annotate = |s: &mut Service, k: &str, v: &str| {
            s.metadata.annotations.get_or_insert_with(BTreeMap::new).insert(k.into(), v.into());
        };
        let mut a = svc("share-a", 0);
        annotate(&mut a, ALLOW_SHARED_IP.name, "team");
        let mut services = vec![a];
        let actions = r.reconcile(&p, &services, &BTreeMap::new());
        apply(&mut services, &actions);
        let a_ip = service::status_ips(&services[0]);
        assert_eq!(a_ip.len(), 1);
        // Created in the same second as share-a: b/share-b comes first in a pass.
        let mut b = svc("share-b", 0);
        b.metadata.namespace = Some("b".into());
        b.spec.as_mut().unwrap().ports = Some(vec![ServicePort { port: 8091, ..Default::default() }]);
        annotate(&mut b, ALLOW_SHARED_IP.name, "team");
        annotate(&mut b, "ferrolb.io/loadBalancerIPs", &a_ip[0].to_string());
        annotate(&mut b, ALLOW_SHARED_IP_NAMESPACES, "default");
        services.push(b);
        let actions = r.reconcile(&p, &services, &BTreeMap::new());
        apply(&mut services, &actions);
        assert!(service::status_ips(&services[1]).is_empty(), "one side is not enough");
        annotate(&mut services[0], ALLOW_SHARED_IP_NAMESPACES, "b, c");
        let actions = r.reconcile(&p, &services, &BTreeMap::new());
        apply(&mut services, &actions);
        assert_eq!(service::status_ips(&services[1]), a_ip, "{actions:#?}");
    }

    #[test]
    fn a_new_service_gets_an_address_an_annotation_and_an_event() {
        let p = pools(&["192.0.2.200-192.0.2.250"]);
        let mut r = Reconciler::new(ClassPolicy::default());
        let mut services = vec![svc("web", 0)];
        let actions = r.reconcile(&p, &services, &BTreeMap::new());
        let ip: IpAddr = "192.0.2.200".parse().unwrap();
        let key = service::key(&services[0]);
        assert!(actions.contains(&Action::SetStatus { key: key.clone(), ips: vec![ip] }));
        assert!(actions.contains(&Action::SetPoolAnnotation { key: key.clone(), pool: Some("lan".into()) }));
        assert!(actions.iter().any(|a| matches!(a, Action::Event { reason: REASON_ALLOCATED, .. })));
        apply(&mut services, &actions);
        // Converged: a second pass writes nothing.
        assert_eq!(r.reconcile(&p, &services, &BTreeMap::new()), vec![]);
    }

    #[test]
    fn restore_comes_first_so_status_is_never_handed_to_another() {
        let p = pools(&["192.0.2.200-192.0.2.250"]);
        // The newer service is listed first; the older holds .200 in its status.
        let services = vec![svc("new", 10), with_status(svc("old", 0), &["192.0.2.200"])];
        let mut r = Reconciler::new(ClassPolicy::default());
        let actions = r.reconcile(&p, &services, &BTreeMap::new());
        let new_ips: Vec<&Action> =
            actions.iter().filter(|a| matches!(a, Action::SetStatus { key, .. } if key.name == "new")).collect();
        assert_eq!(
            new_ips,
            vec![&Action::SetStatus { key: service::key(&services[0]), ips: vec!["192.0.2.201".parse().unwrap()] }]
        );
        assert!(!actions.iter().any(|a| matches!(a, Action::SetStatus { key, .. } if key.name == "old")));
    }

    #[test]
    fn a_failure_is_told_once() {
        let p = pools(&["192.0.2.200/32"]);
        let services = vec![svc("a", 0), svc("b", 1)];
        let mut r = Reconciler::new(ClassPolicy::default());
        let first = r.reconcile(&p, &services, &BTreeMap::new());
        assert!(first.iter().any(|a| matches!(a, Action::Event { reason: REASON_FAILED, key, message, .. }
            if key.name == "b" && message.contains("exhausted"))));
        let second = r.reconcile(&p, &services, &BTreeMap::new());
        assert!(!second.iter().any(|a| matches!(a, Action::Event { reason: REASON_FAILED, .. })));
    }

    #[test]
    fn leaving_loadbalancer_releases_and_clears() {
        let p = pools(&["192.0.2.200-192.0.2.250"]);
        let mut r = Reconciler::new(ClassPolicy::default());
        let mut services = vec![svc("web", 0)];
        let a = r.reconcile(&p, &services, &BTreeMap::new());
        apply(&mut services, &a);
        if let Some(spec) = services[0].spec.as_mut() {
            spec.type_ = Some("ClusterIP".into());
        }
        let a = r.reconcile(&p, &services, &BTreeMap::new());
        let key = service::key(&services[0]);
        assert!(a.contains(&Action::SetStatus { key: key.clone(), ips: vec![] }));
        assert!(a.contains(&Action::SetPoolAnnotation { key, pool: None }));
        assert!(r.allocator().allocations().next().is_none());
    }

    #[test]
    fn the_memory_of_services_that_never_got_an_address_is_freed_when_they_go() {
        let p = pools(&["192.0.2.200/32"]);
        let mut r = Reconciler::new(ClassPolicy::default());
        // The one address is taken for good.
        let mut services = vec![svc("holder", 0)];
        let a = r.reconcile(&p, &services, &BTreeMap::new());
        apply(&mut services, &a);
        let held = r.remembered();
        assert!(held > 0);
        for i in 0..200 {
            let unknown_pool = {
                let mut s = svc(&format!("unknown-pool-{i}"), i);
                s.metadata.annotations =
                    Some([(ferrolb_api::annotations::ADDRESS_POOL.name.to_string(), "nope".into())].into());
                s
            };
            let bad_ip = {
                let mut s = svc(&format!("bad-ip-{i}"), i);
                if let Some(spec) = s.spec.as_mut() {
                    spec.load_balancer_ip = Some("not-an-ip".into());
                }
                s
            };
            let batch = [svc(&format!("exhausted-{i}"), i), unknown_pool, bad_ip, svc(&format!("leaves-{i}"), i)];
            let mut now = services.clone();
            now.extend(batch.iter().cloned());
            let a = r.reconcile(&p, &now, &BTreeMap::new());
            let failed = a.iter().filter(|a| matches!(a, Action::Event { reason: REASON_FAILED, .. })).count();
            assert_eq!(failed, batch.len(), "{a:?}");
            assert!(r.remembered() > held);
            // Three are deleted; one stays but stops being a LoadBalancer.
            let mut after = services.clone();
            let mut leaves = batch[3].clone();
            if let Some(spec) = leaves.spec.as_mut() {
                spec.type_ = Some("ClusterIP".into());
            }
            after.push(leaves);
            r.reconcile(&p, &after, &BTreeMap::new());
            assert_eq!(r.remembered(), held, "round {i}");
        }
        // And the holder's memory goes with it.
        r.reconcile::<Service>(&p, &[], &BTreeMap::new());
        assert_eq!(r.remembered(), 0);
    }

    #[test]
    fn other_classes_are_left_alone() {
        let p = pools(&["192.0.2.200-192.0.2.250"]);
        let mut s = svc("other", 0);
        if let Some(spec) = s.spec.as_mut() {
            spec.load_balancer_class = Some("example.com/other".into());
        }
        let mut r = Reconciler::new(ClassPolicy::default());
        assert_eq!(r.reconcile(&p, &[s.clone()], &BTreeMap::new()), vec![]);
        // With the class required, a class-less service is not ours either.
        let mut r = Reconciler::new(ClassPolicy { require: true, ..Default::default() });
        assert_eq!(r.reconcile(&p, &[svc("plain", 0)], &BTreeMap::new()), vec![]);
    }

    proptest! {
        /// Restoring then reconciling changes nothing: a converged cluster seen by a new
        /// leader gets no writes and no address moves.
        #[test]
        fn a_new_leader_changes_nothing(n in 1usize..40, order in proptest::collection::vec(any::<u16>(), 40)) {
            let p = pools(&["192.0.2.200-192.0.2.250"]);
            let mut services: Vec<Service> = (0..n).map(|i| svc(&format!("s{i}"), i as i64)).collect();
            let mut first = Reconciler::new(ClassPolicy::default());
            for _ in 0..2 {
                let a = first.reconcile(&p, &services, &BTreeMap::new());
                apply(&mut services, &a);
            }
            let before = ips_of(&services);
            // A new leader sees the services in any order.
            let mut shuffled = services.clone();
            shuffled.sort_by_key(|s| order[s.metadata.name.as_deref().unwrap_or("s0")[1..].parse::<usize>().unwrap_or(0) % order.len()]);
            let mut second = Reconciler::new(ClassPolicy::default());
            let a = second.reconcile(&p, &shuffled, &BTreeMap::new());
            prop_assert!(!a.iter().any(|x| matches!(x, Action::SetStatus { .. })), "{:?}", a);
            apply(&mut shuffled, &a);
            prop_assert_eq!(ips_of(&shuffled), before);
            // Every address distinct.
            let all: Vec<IpAddr> = ips_of(&shuffled).into_values().flatten().collect();
            let set: BTreeSet<IpAddr> = all.iter().copied().collect();
            prop_assert_eq!(all.len(), set.len());
        }
    }
}

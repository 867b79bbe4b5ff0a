//! The running controller: caches of Services, Namespaces and pools kept by watches; one
//! replica at a time leads through a Lease; the leader reconciles on every change.
//!
//! ```text
//!   watch Services ─┐
//!   watch Namespaces├─> stores ──(change)──> reconcile (pure) ──> apply (writes)
//!   watch pools ────┘                              ^
//!   Lease ─────────> leader? ─── start/stop ───────┘
//! ```

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result};
use ferrolb_api::{IPAddressPool, metallb};
use ferrolb_config::{PoolInput, Pools, build_pools};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, ObjectReference, Service};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, watcher};
use kube::{Client, Resource, ResourceExt};
use kube_lease_manager::LeaseManagerBuilder;
use serde_json::{Value, json};
use tokio::sync::Notify;

use ferrolb_telemetry::vital::{Ended, Vital};

use crate::apply::{Applier, MANAGER};
use crate::metrics::Metrics;
use crate::reconcile::Reconciler;
use crate::service::ClassPolicy;

/// How the controller runs (from flags).
#[derive(Clone, Debug)]
pub struct Settings {
    pub class: ClassPolicy,
    /// Where IPAddressPools and L2Advertisements live, and the Lease.
    pub namespace: String,
    /// Also read `metallb.io/v1beta1` pools from this namespace.
    pub metallb_namespace: Option<String>,
    pub lease_name: String,
    pub lease_duration: Duration,
    pub lease_grace: Duration,
    pub identity: String,
}

/// Caches kept by watches, and a signal raised on every change.
#[derive(Clone)]
struct Caches {
    services: Store<Service>,
    namespaces: Store<Namespace>,
    pools: Store<IPAddressPool>,
    metallb_pools: Option<Store<metallb::IPAddressPool>>,
    changed: Arc<Notify>,
}

fn watch<K>(api: Api<K>, changed: Arc<Notify>) -> (Store<K>, impl Future<Output = ()>)
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default()).backoff(ferrolb_api::backoff::watch_backoff()),
    );
    let fut = async move {
        let mut stream = pin!(stream);
        let kind = K::kind(&K::DynamicType::default()).to_string();
        while let Some(ev) = stream.next().await {
            match ev {
                Err(watcher::Error::InitialListFailed(kube::Error::Api(s))) if s.code == 404 => {
                    tracing::error!(%kind, "the {kind} CRD is not installed: kubectl apply -f deploy/crds (the chart installs it)");
                }
                Err(e) => tracing::warn!(%kind, error = %e, "watch"),
                Ok(_) => changed.notify_one(),
            }
        }
    };
    (reader, fut)
}

impl Caches {
    /// The caches, and their watches (spawned): vital, as a cache that stops following the API
    /// would have the controller reconcile a past state for ever.
    fn start(client: &Client, s: &Settings) -> (Self, Vital<'static>) {
        let mut watches = Vital::new();
        let changed = Arc::new(Notify::new());
        let (services, f1) = watch(Api::<Service>::all(client.clone()), changed.clone());
        let (namespaces, f2) = watch(Api::<Namespace>::all(client.clone()), changed.clone());
        let (pools, f3) = watch(Api::<IPAddressPool>::namespaced(client.clone(), &s.namespace), changed.clone());
        watches.spawn("Service watch", f1);
        watches.spawn("Namespace watch", f2);
        watches.spawn("IPAddressPool watch", f3);
        let metallb_pools = s.metallb_namespace.as_ref().map(|ns| {
            let (store, f) = watch(Api::<metallb::IPAddressPool>::namespaced(client.clone(), ns), changed.clone());
            watches.spawn("MetalLB IPAddressPool watch", f);
            store
        });
        (Caches { services, namespaces, pools, metallb_pools, changed }, watches)
    }

    async fn ready(&self) -> Result<()> {
        self.services.wait_until_ready().await?;
        self.namespaces.wait_until_ready().await?;
        self.pools.wait_until_ready().await?;
        if let Some(m) = &self.metallb_pools {
            m.wait_until_ready().await?;
        }
        Ok(())
    }

    /// The pools, ferrolb's and (with compatibility on) MetalLB's, validated.
    fn pools(&self) -> (Pools, Vec<Arc<IPAddressPool>>) {
        let ours = self.pools.state();
        let mut inputs: Vec<PoolInput> = ours.iter().map(|p| PoolInput::from_object(p.as_ref())).collect();
        if let Some(m) = &self.metallb_pools {
            inputs.extend(m.state().iter().map(|p| PoolInput::from_object(p.as_ref())));
        }
        (build_pools(inputs), ours)
    }

    fn namespace_labels(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        self.namespaces.state().iter().map(|n| (n.name_any(), n.labels().clone())).collect()
    }
}

/// Runs until `shutdown` resolves; then gives up the lease at once so a standby takes over.
///
/// Fails when a task it cannot do without ends (a watch, or the leader's reconcile loop, by a
/// panic say): the controller cannot do its job, and a process that holds the lease and does
/// nothing would keep every standby out. The lease is given up first.
pub async fn run(client: Client, s: Settings, metrics: Arc<Metrics>, shutdown: impl Future<Output = ()>) -> Result<()> {
    let (caches, mut watches) = Caches::start(&client, &s);
    tokio::select! {
        r = caches.ready() => if let Err(e) = r {
            // A store gives up when its watch has ended: name the watch.
            if let Ok(ended) = tokio::time::timeout(Duration::from_secs(1), watches.next_end()).await {
                return Err(ended.into());
            }
            return Err(e).context("syncing caches");
        },
        ended = watches.next_end() => return Err(ended.into()),
    }
    metrics.ready.store(true, Ordering::Relaxed);
    tracing::info!("caches synced; competing for the lease");

    let mut manager = lease_manager(&client, &s).await?;

    // A standby wakes up as soon as the leader gives the lease up, instead of sleeping until
    // the lease would have expired.
    let freed = Arc::new(Notify::new());
    watches.spawn(
        "Lease watch",
        watch_lease_freed(client.clone(), s.namespace.clone(), s.lease_name.clone(), freed.clone()),
    );

    let mut shutdown = pin!(shutdown);
    // The leader's reconcile loop, while leading; dropping it aborts it.
    let mut leading: Option<Vital<'static>> = None;
    loop {
        tokio::select! {
            r = manager.changed() => match r {
                Ok(true) => {
                    tracing::info!(identity = %s.identity, "leading: restoring assignments, then reconciling");
                    metrics.is_leader.set(1);
                    let mut task = Vital::new();
                    task.spawn("leadership", lead(client.clone(), s.clone(), caches.clone(), metrics.clone()));
                    leading = Some(task);
                }
                Ok(false) => {
                    // Lost the lease: stop writing at once.
                    if leading.take().is_some() {
                        tracing::warn!("lost the lease; stopped reconciling");
                    }
                    metrics.is_leader.set(0);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "lease");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            },
            _ = freed.notified(), if leading.is_none() => {
                // The manager trusts its cached view of the lease until that would expire; a
                // new one reads the lease afresh and takes it now.
                match lease_manager(&client, &s).await {
                    Ok(m) => manager = m,
                    Err(e) => tracing::warn!(error = %format!("{e:#}"), "lease"),
                }
            }
            ended = first_end(&mut leading, &mut watches) => {
                drop(leading.take()); // aborts the reconcile loop
                metrics.is_leader.set(0);
                release(&mut manager).await;
                return Err(ended.into());
            }
            _ = &mut shutdown => {
                drop(leading.take()); // aborts the reconcile loop
                metrics.is_leader.set(0);
                release(&mut manager).await;
                tracing::info!("stopped; lease released");
                return Ok(());
            }
        }
    }
}

/// The first vital task to end: the reconcile loop (while leading) or a watch.
async fn first_end(leading: &mut Option<Vital<'static>>, watches: &mut Vital<'static>) -> Ended {
    match leading {
        Some(leading) => tokio::select! { e = leading.next_end() => e, e = watches.next_end() => e },
        None => watches.next_end().await,
    }
}

/// Gives the lease up, so that a standby takes over at once rather than when it expires.
async fn release(manager: &mut kube_lease_manager::LeaseManager) {
    if let Err(e) = manager.release().await {
        tracing::warn!(error = %e, "releasing the lease");
    }
}

async fn lease_manager(client: &Client, s: &Settings) -> Result<kube_lease_manager::LeaseManager> {
    LeaseManagerBuilder::new(client.clone(), &s.lease_name)
        .with_namespace(&s.namespace)
        .with_identity(&s.identity)
        .with_duration(s.lease_duration.as_secs().max(2))
        .with_grace(s.lease_grace.as_secs().max(1))
        .with_field_manager(format!("{MANAGER}-{}", s.identity))
        .build()
        .await
        .context("creating the lease manager")
}

async fn watch_lease_freed(client: Client, namespace: String, name: String, freed: Arc<Notify>) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = pin!(watcher(api, cfg).backoff(ferrolb_api::backoff::watch_backoff()).applied_objects());
    while let Some(ev) = stream.next().await {
        if let Ok(lease) = ev
            && lease.spec.as_ref().and_then(|s| s.holder_identity.as_deref()).is_none_or(str::is_empty)
        {
            freed.notify_one();
        }
    }
}

/// The leader's loop: reconcile, apply, wait for a change (or retry a failed write).
async fn lead(client: Client, s: Settings, caches: Caches, metrics: Arc<Metrics>) {
    let reporter = Reporter { controller: MANAGER.into(), instance: Some(s.identity.clone()) };
    let recorder = Recorder::new(client.clone(), reporter);
    let applier = Arc::new(Applier::new(client.clone(), recorder.clone()));
    let mut rec = Reconciler::new(s.class.clone());
    let mut pool_status: HashMap<String, Value> = HashMap::new();
    let mut pool_told: HashMap<String, String> = HashMap::new();
    loop {
        let (pools, objects) = caches.pools();
        let services: Vec<Service> = caches.services.state().iter().map(|s| (**s).clone()).collect();
        let actions = rec.reconcile(&pools, &services, &caches.namespace_labels());

        let failed = apply_all(&applier, actions, &metrics).await;

        update_pools(&client, &recorder, &s, &rec, &pools, &objects, &metrics, &mut pool_status, &mut pool_told).await;

        if failed > 0 {
            // Something did not land; try again soon even if nothing changes.
            let _ = tokio::time::timeout(Duration::from_secs(1), caches.changed.notified()).await;
        } else {
            caches.changed.notified().await;
        }
    }
}

/// Applies actions, 32 at a time; the number that failed (a vanished Service is no failure).
async fn apply_all(applier: &Arc<Applier>, actions: Vec<crate::reconcile::Action>, metrics: &Metrics) -> usize {
    let results: Vec<_> = futures::stream::iter(actions)
        .map(|a| {
            let applier = Arc::clone(applier);
            async move { applier.apply(&a).await }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let mut failed = 0;
    for e in results.into_iter().filter_map(Result::err).filter(|e| !e.is_not_found()) {
        tracing::warn!(error = %e, "write failed");
        metrics.error(e.metric_label());
        failed += 1;
    }
    failed
}

/// Pool status (counts, validity), Events on rejected pools, and the allocator metrics.
#[allow(clippy::too_many_arguments)]
async fn update_pools(
    client: &Client,
    recorder: &Recorder,
    s: &Settings,
    rec: &Reconciler,
    pools: &Pools,
    objects: &[Arc<IPAddressPool>],
    metrics: &Metrics,
    last: &mut HashMap<String, Value>,
    told: &mut HashMap<String, String>,
) {
    let usage = rec.allocator().usage();
    metrics.services_allocated.set(rec.allocator().allocations().count() as i64);
    metrics.set_pool_usage(&usage);
    // What was last written or told of a pool that is gone is forgotten with it.
    last.retain(|name, _| objects.iter().any(|o| o.name_any() == *name));
    told.retain(|name, _| objects.iter().any(|o| o.name_any() == *name));
    let api: Api<IPAddressPool> = Api::namespaced(client.clone(), &s.namespace);
    for obj in objects {
        let name = obj.name_any();
        let rejected = pools.rejected.get(&name);
        let u = usage.get(&name).copied().unwrap_or_default();
        let (cond_status, reason, message) = match rejected {
            Some(errs) => ("False", "Invalid", errs.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ")),
            None => ("True", "Valid", "the pool is valid and in use".to_string()),
        };
        let generation = obj.meta().generation;
        let previous = obj
            .status
            .as_ref()
            .and_then(|st| st.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Valid"))
            .filter(|c| c.status == cond_status && c.message == message)
            .map(|c| serde_json::to_value(&c.last_transition_time).unwrap_or(Value::Null));
        let now = serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        ))
        .unwrap_or(Value::Null);
        let status = json!({
            "assignedIPv4": u.in_use_v4, "assignedIPv6": u.in_use_v6,
            "availableIPv4": u.available_v4, "availableIPv6": u.available_v6,
            "conditions": [{
                "type": "Valid", "status": cond_status, "reason": reason, "message": message,
                "observedGeneration": generation,
                "lastTransitionTime": previous.unwrap_or(now),
            }],
        });
        let mut key = status.clone();
        key["conditions"][0]["lastTransitionTime"] = Value::Null;
        if last.get(&name) != Some(&key) {
            let patch = json!({"status": status});
            match api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => {
                    last.insert(name.clone(), key);
                }
                Err(e) => {
                    tracing::warn!(pool = %name, error = %e, "pool status");
                    metrics.error("pool_status");
                }
            }
        }
        if let Some(errs) = rejected {
            let msg = errs.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ");
            if told.get(&name) != Some(&msg) {
                let ev = Event {
                    type_: EventType::Warning,
                    reason: "InvalidPool".into(),
                    note: Some(format!("the pool is not used: {msg}").chars().take(1000).collect()),
                    action: "Validate".into(),
                    secondary: None,
                };
                let reference = ObjectReference {
                    api_version: Some("ferrolb.io/v1beta1".into()),
                    kind: Some("IPAddressPool".into()),
                    namespace: Some(s.namespace.clone()),
                    name: Some(name.clone()),
                    uid: obj.meta().uid.clone(),
                    ..Default::default()
                };
                if recorder.publish(&ev, &reference).await.is_ok() {
                    told.insert(name.clone(), msg);
                }
            }
        } else {
            told.remove(&name);
        }
    }
}

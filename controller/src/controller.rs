//! The running controller: caches of Services, Namespaces and pools kept by watches; one
//! replica at a time leads through a Lease; the leader reconciles on every change.
//!
//! ```text
//!   watch Services ─┐
//!   watch Namespaces├─> stores ──(change)──> reconcile (pure) ──> apply status, annotation
//!   watch pools ────┘                              ^          └─> Events, pool status: beside
//!   Lease ─────────> leader? ─── start/stop ───────┘              the loop, never in its way
//! ```
//!
//! What a new Service waits for is one pass (the watch caches are shared, not copied) and its
//! status write. Writes are sent without the pass waiting for them (the same write is not sent
//! twice while the cache has not caught up); Events and the pools' status are written by tasks
//! of their own.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ferrolb_api::{IPAddressPool, metallb};
use ferrolb_config::{PoolInput, Pools, build_pools};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
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
use tokio::sync::{Notify, Semaphore, mpsc};

use ferrolb_telemetry::vital::{Ended, Vital};

use crate::allocator::{PoolUsage, ServiceKey};
use crate::apply::{Applier, MANAGER};
use crate::metrics::Metrics;
use crate::reconcile::{Action, Reconciler};
use crate::service::ClassPolicy;

/// Events waiting to be published, at most; past it the reconcile loop waits for the Event
/// task (a burst of thousands of new Services), so the backlog's memory stays bounded.
const EVENT_BACKLOG: usize = 4096;
/// Events published at once.
const EVENT_CONCURRENCY: usize = 8;
/// Status writes in flight at once.
const STATUS_CONCURRENCY: usize = 32;
/// Annotation writes in flight at once: apart from the statuses, so a status never queues
/// behind annotations.
const ANNOTATION_CONCURRENCY: usize = 8;

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

/// A watch feeding a store and raising `changed`. With `spec_only`, a change of an object's
/// status alone raises nothing (the pools: the controller's own status writes would wake it
/// for a pass with nothing to do).
fn watch<K>(api: Api<K>, changed: Arc<Notify>, spec_only: bool) -> (Store<K>, impl Future<Output = ()>)
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
        // Generation and labels last seen, by uid (with `spec_only`).
        let mut seen: HashMap<String, (Option<i64>, BTreeMap<String, String>)> = HashMap::new();
        while let Some(ev) = stream.next().await {
            match ev {
                Err(watcher::Error::InitialListFailed(kube::Error::Api(s))) if s.code == 404 => {
                    tracing::error!(%kind, "the {kind} CRD is not installed: kubectl apply -f deploy/crds (the chart installs it)");
                }
                Err(e) => tracing::warn!(%kind, error = %e, "watch"),
                Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) if spec_only => {
                    let id = o.meta().uid.clone().unwrap_or_else(|| o.name_any());
                    let now = (o.meta().generation, o.labels().clone());
                    if seen.get(&id) != Some(&now) {
                        seen.insert(id, now);
                        changed.notify_one();
                    }
                }
                Ok(watcher::Event::Delete(o)) if spec_only => {
                    seen.remove(&o.meta().uid.clone().unwrap_or_else(|| o.name_any()));
                    changed.notify_one();
                }
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
        let (services, f1) = watch(Api::<Service>::all(client.clone()), changed.clone(), false);
        let (namespaces, f2) = watch(Api::<Namespace>::all(client.clone()), changed.clone(), false);
        let (pools, f3) = watch(Api::<IPAddressPool>::namespaced(client.clone(), &s.namespace), changed.clone(), true);
        watches.spawn("Service watch", f1);
        watches.spawn("Namespace watch", f2);
        watches.spawn("IPAddressPool watch", f3);
        let metallb_pools = s.metallb_namespace.as_ref().map(|ns| {
            let (store, f) =
                watch(Api::<metallb::IPAddressPool>::namespaced(client.clone(), ns), changed.clone(), true);
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

/// What the pools' status says, as of the last pass.
struct PoolReport {
    pools: Pools,
    objects: Vec<Arc<IPAddressPool>>,
    usage: BTreeMap<String, PoolUsage>,
}

/// The leader's work: the reconcile loop, and beside it the Events it asks for and the pools'
/// status. One task: losing the lease drops all three.
async fn lead(client: Client, s: Settings, caches: Caches, metrics: Arc<Metrics>) {
    let reporter = Reporter { controller: MANAGER.into(), instance: Some(s.identity.clone()) };
    let recorder = Recorder::new(client.clone(), reporter);
    let applier = Arc::new(Applier::new(client.clone(), recorder.clone()));
    let (events, events_rx) = mpsc::channel(EVENT_BACKLOG);
    let (report, report_rx) = tokio::sync::watch::channel(None);
    tokio::join!(
        reconcile_loop(&s, &caches, &applier, &metrics, events, report),
        tell(&applier, &metrics, events_rx),
        report_pools(&client, &recorder, &s, &metrics, report_rx),
    );
}

/// A status or annotation write sent: what it writes, and the version of the Service it was
/// worked out from. While it is in flight, or the cache still shows that version (it landed and
/// the watch has not brought it yet), the same write is not sent again.
struct Sent {
    action: Action,
    version: Option<String>,
    in_flight: bool,
}

/// Which write: of a Service's status (`true`) or of its annotation.
type WriteKey = (ServiceKey, bool);

/// Reconcile on every change; send statuses and annotations without waiting for them, so a
/// pass never waits for the writes of the one before; hand Events and pool figures on.
async fn reconcile_loop(
    s: &Settings,
    caches: &Caches,
    applier: &Arc<Applier>,
    metrics: &Metrics,
    events: mpsc::Sender<Action>,
    report: tokio::sync::watch::Sender<Option<PoolReport>>,
) {
    let mut rec = Reconciler::new(s.class.clone());
    let status_permits = Arc::new(Semaphore::new(STATUS_CONCURRENCY));
    let annotation_permits = Arc::new(Semaphore::new(ANNOTATION_CONCURRENCY));
    let mut writing = FuturesUnordered::new();
    let mut sent: HashMap<WriteKey, Sent> = HashMap::new();
    let mut held_back: HashSet<ServiceKey> = HashSet::new();
    let mut retry: Option<tokio::time::Instant> = None;
    let mut due = true;
    loop {
        if due {
            due = false;
            let start = Instant::now();
            let (pools, objects) = caches.pools();
            let services = caches.services.state();
            let actions = rec.reconcile(&pools, &services, &caches.namespace_labels());
            let versions: HashMap<(&str, &str), Option<&str>> = services
                .iter()
                .map(|s| {
                    let m = &s.metadata;
                    let key = (m.namespace.as_deref().unwrap_or_default(), m.name.as_deref().unwrap_or_default());
                    (key, m.resource_version.as_deref())
                })
                .collect();
            let version = |k: &ServiceKey| versions.get(&(k.namespace.as_str(), k.name.as_str())).copied().flatten();
            // What landed and the cache has moved past is forgotten: a write needed again is
            // sent again.
            sent.retain(|(k, _), w| w.in_flight || version(k) == w.version.as_deref());

            // Statuses first: they are what a new Service waits for.
            let (told, mut writes): (Vec<_>, Vec<_>) =
                actions.into_iter().partition(|a| matches!(a, Action::Event { .. }));
            writes.sort_by_key(|a| !matches!(a, Action::SetStatus { .. }));
            let mut n_writes = 0;
            for action in writes {
                let wk = match &action {
                    Action::SetStatus { key, .. } => (key.clone(), true),
                    Action::SetPoolAnnotation { key, .. } => (key.clone(), false),
                    Action::Event { .. } => continue,
                };
                let version = version(&wk.0).map(str::to_string);
                if sent.get(&wk).is_some_and(|w| w.action == action && (w.in_flight || w.version == version)) {
                    continue;
                }
                // A Service's annotation after its status: sent together, the first to land
                // would move the cache past the version the other was worked out from.
                if !wk.1 && sent.get(&(wk.0.clone(), true)).is_some_and(|w| w.in_flight) {
                    held_back.insert(wk.0);
                    continue;
                }
                sent.insert(wk.clone(), Sent { action: action.clone(), version, in_flight: true });
                n_writes += 1;
                let permits = Arc::clone(if wk.1 { &status_permits } else { &annotation_permits });
                let applier = Arc::clone(applier);
                writing.push(async move {
                    let _permit = permits.acquire_owned().await;
                    let start = Instant::now();
                    let r = applier.apply(&action).await;
                    (wk, r, start.elapsed())
                });
            }
            drop(versions);
            let n_services = services.len();
            drop(services);
            let reconciled = start.elapsed();
            metrics.pass_reconcile.observe(reconciled.as_secs_f64());
            tracing::debug!(
                services = n_services,
                writes = n_writes,
                in_flight = writing.len(),
                events = told.len(),
                reconcile_ms = reconciled.as_secs_f64() * 1e3,
                "pass"
            );
            for ev in told {
                // The Event task only ends with this task.
                let _ = events.send(ev).await;
            }

            let usage = rec.allocator().usage();
            metrics.services_allocated.set(rec.allocator().allocations().count() as i64);
            metrics.set_pool_usage(&usage);
            report.send_replace(Some(PoolReport { pools, objects, usage }));
        }

        tokio::select! {
            () = caches.changed.notified() => due = true,
            Some((wk, r, took)) = writing.next(), if !writing.is_empty() => {
                if wk.1 {
                    metrics.status_write.observe(took.as_secs_f64());
                }
                if r.is_ok()
                    && let Some(w) = sent.get_mut(&wk)
                {
                    w.in_flight = false;
                }
                // An annotation held back for it: a pass sends it (the watch may have brought
                // this status before its answer came, with no other change to come).
                if wk.1 && held_back.remove(&wk.0) {
                    due = true;
                }
                if let Err(e) = r {
                    sent.remove(&wk);
                    if !e.is_not_found() {
                        tracing::warn!(error = %e, "write failed");
                        metrics.error(e.metric_label());
                        // Try again soon even if nothing changes.
                        retry.get_or_insert_with(|| tokio::time::Instant::now() + Duration::from_secs(1));
                    }
                }
            }
            () = sleep_until_some(retry), if retry.is_some() => {
                retry = None;
                due = true;
            }
        }
    }
}

/// Sleeps until `at`; `None` never comes (the caller does not poll it then).
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Publishes the Events the reconcile asks for, a few at a time, as they come.
async fn tell(applier: &Applier, metrics: &Metrics, mut events: mpsc::Receiver<Action>) {
    futures::stream::poll_fn(|cx| events.poll_recv(cx))
        .for_each_concurrent(EVENT_CONCURRENCY, |ev| async move {
            if let Err(e) = applier.apply(&ev).await
                && !e.is_not_found()
            {
                tracing::warn!(error = %e, "event");
                metrics.error(e.metric_label());
            }
        })
        .await;
}

/// Writes each pool's status from the latest figures of the reconcile loop.
async fn report_pools(
    client: &Client,
    recorder: &Recorder,
    s: &Settings,
    metrics: &Metrics,
    mut reports: tokio::sync::watch::Receiver<Option<PoolReport>>,
) {
    let mut last: HashMap<String, Value> = HashMap::new();
    let mut told: HashMap<String, String> = HashMap::new();
    while reports.changed().await.is_ok() {
        let Some((pools, objects, usage)) =
            reports.borrow_and_update().as_ref().map(|r| (r.pools.clone(), r.objects.clone(), r.usage.clone()))
        else {
            continue;
        };
        update_pools(client, recorder, s, &pools, &objects, &usage, metrics, &mut last, &mut told).await;
    }
}

/// Pool status (counts, validity) and Events on rejected pools.
#[allow(clippy::too_many_arguments)]
async fn update_pools(
    client: &Client,
    recorder: &Recorder,
    s: &Settings,
    pools: &Pools,
    objects: &[Arc<IPAddressPool>],
    usage: &BTreeMap<String, PoolUsage>,
    metrics: &Metrics,
    last: &mut HashMap<String, Value>,
    told: &mut HashMap<String, String>,
) {
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

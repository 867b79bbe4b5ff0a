//! The data plane loop: watches, models, nft, health check ports, conntrack.
//!
//! ```text
//!   watch Services, EndpointSlices, Nodes, ServiceCIDRs ──(change)──> debounce
//!        ──> Tracker::update: the changed Services' models only (the watches log which objects changed)
//!        ──> Runner::apply_changes with those keys (partial; full at start and after a failure,
//!            retried with backoff; a family whose sync failed is owed the keys until it succeeds)
//!        ──> conntrack: clear stale UDP endpoints ──> health check ports ──> metrics, health
//!   idle for a while with stale chains left, or too many / too old ones ──> Runner::cleanup
//!   source warnings + Services nft refused (left out by the runner) ──> one WarningEvents::publish
//! ```
//!
//! On shutdown the tables stay: a restarted speaker takes them over with a full sync, and
//! traffic flows in between (as with kube-proxy).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::IpAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{ObjectRef, Store};

use super::events::WarningEvents;
use super::handover::{self, Handover};
use super::healthcheck::{self, HealthServers};
use super::metrics::{DataplaneMetrics, FailureLabel, FamilyLabel, SyncLabel};
use super::model::{Family, Model, ServiceKey, Warning};
use super::runner::{NftCommand, Rejected, Runner, SyncKind};
use super::source::SourceSettings;
use super::tracker::{Objects, Tracker};
use super::{claims, conntrack};
use crate::watch::Cluster;

/// The annotation kube-proxy measures network programming latency from.
pub const LAST_CHANGE_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// How the data plane runs (from the speaker's flags).
#[derive(Clone, Debug)]
pub struct DataplaneSettings {
    /// Node name, mode, node addresses and pod CIDRs.
    pub source: SourceSettings,
    /// The families to program (`ip ferrolb`, `ip6 ferrolb`).
    pub families: Vec<Family>,
    /// How to run `nft`.
    pub nft: NftCommand,
    /// Where stale UDP conntrack entries are cleared, off the sync's path.
    pub conntrack: conntrack::Cleaner,
    /// Addresses health check node ports listen on (empty: all).
    pub health_check_addresses: Vec<IpAddr>,
    /// Changes arriving within this time are applied together.
    pub debounce: Duration,
    /// Idle time after which stale chains are deleted.
    pub cleanup_after: Duration,
    /// Stale objects older than this are deleted after the next sync even when changes never
    /// stop coming (otherwise they would pile up without bound).
    pub cleanup_max_age: Duration,
    /// So are they when more than this many wait.
    pub cleanup_max_stale: usize,
    /// Addresses this node took over from a live node (kept by the announcer, which also applies
    /// them before it announces): put back into the table after each full sync.
    pub handovers: Option<tokio::sync::watch::Receiver<Vec<Handover>>>,
    /// Where warnings about single Services go (Events and log lines).
    pub warnings: WarningEvents,
    /// Nodes whose speakers died (from the membership): new connections avoid their endpoints
    /// while others are ready ([`Model::steer_away_from`]).
    pub avoid: Option<tokio::sync::watch::Receiver<BTreeSet<String>>>,
}

impl DataplaneSettings {
    /// Settings with the usual timings.
    pub fn new(source: SourceSettings, families: Vec<Family>) -> Self {
        Self {
            source,
            families,
            nft: NftCommand::default(),
            conntrack: conntrack::Cleaner::default(),
            health_check_addresses: Vec::new(),
            debounce: Duration::from_millis(5),
            cleanup_after: Duration::from_secs(2),
            cleanup_max_age: Duration::from_secs(5),
            cleanup_max_stale: 1000,
            handovers: None,
            warnings: WarningEvents::logs_only(),
            avoid: None,
        }
    }
}

/// Runs the data plane until `shutdown` completes.
pub async fn run(
    cluster: &Cluster,
    settings: DataplaneSettings,
    metrics: Arc<DataplaneMetrics>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    // As kube-proxy, trigger times from before the start are not ours to measure (the first
    // list reports no change; a slice written just before the start would count the wait).
    let started = SystemTime::now();
    let (services, slices, nodes) = (&cluster.services, &cluster.slices, &cluster.nodes);
    let changed = cluster.dataplane.clone();
    let mut shutdown = pin!(shutdown);
    tokio::select! {
        _ = &mut shutdown => return Ok(()),
        r = cluster.ready() => r?,
    }

    let m = metrics.clone();
    let mut health =
        HealthServers::new(settings.health_check_addresses.clone(), Arc::new(move || m.healthy(Instant::now())));
    let mut runner = Runner::new(settings.nft.clone());
    let mut tracker = Tracker::new(settings.source.clone(), &settings.families);
    let objects = StoreObjects { services: services.clone(), slices: slices.clone() };
    // Per family, the Services changed since its last successful sync (`None`: any).
    let mut owed: BTreeMap<Family, Option<BTreeSet<ServiceKey>>> = BTreeMap::new();
    let mut backoff: Option<Duration> = None;
    let mut last_sync = Instant::now();
    let mut avoid = settings.avoid.clone();
    metrics.queued(Instant::now());
    let mut pending = true;
    loop {
        if pending {
            tokio::time::sleep(settings.debounce).await;
            let service_changes = cluster.service_changes.take();
            let slice_changes = cluster.slice_changes.take();
            let node = nodes.get(&ObjectRef::new(&settings.source.node));
            let cidrs = cluster.service_cidrs.state();
            let service_cidrs = settings
                .families
                .iter()
                .map(|f| (*f, claims::service_cidrs(cidrs.iter().map(|c| c.as_ref()), *f)))
                .collect();
            let dead: BTreeSet<String> = avoid.as_mut().map(|rx| rx.borrow_and_update().clone()).unwrap_or_default();
            metrics.avoided_nodes.set(i64::try_from(dead.len()).unwrap_or(i64::MAX));
            let update =
                tracker.update(&objects, service_changes, slice_changes, node.as_deref(), &service_cidrs, &dead);
            for family in &settings.families {
                let keys = owed.entry(*family).or_insert_with(|| Some(BTreeSet::new()));
                match (keys.as_mut(), update.changed.as_ref()) {
                    (Some(keys), Some(changed)) => keys.extend(changed.iter().cloned()),
                    _ => *keys = None,
                }
            }
            let mut warnings = tracker.warnings();
            let seen: Vec<SystemTime> =
                update.slices.iter().filter_map(|s| trigger_time(s)).filter(|at| *at > started).collect();
            let result = apply(&mut runner, &settings, &metrics, &tracker, &mut owed).await;
            warnings.extend(rejected_warnings(&runner, &settings.families, &metrics));
            settings.warnings.publish(warnings);
            match result {
                Ok(()) => {
                    metrics.applied();
                    backoff = None;
                    pending = false;
                    for at in seen {
                        metrics.programming_latency.observe(at.elapsed().unwrap_or_default().as_secs_f64());
                    }
                    let refs: Vec<&Model> = tracker.models().collect();
                    for (port, e) in health.sync(&healthcheck::wanted(&refs)).await {
                        tracing::warn!(port, error = %e, "cannot open health check node port");
                    }
                    // Under changes that never stop, the idle cleanup below never comes.
                    let (count, since) = runner.stale();
                    if count > settings.cleanup_max_stale
                        || since.is_some_and(|t| t.elapsed() >= settings.cleanup_max_age)
                    {
                        clean_up(&mut runner, &metrics).await;
                    }
                }
                Err(e) => {
                    metrics.sync_failures.get_or_create(&FailureLabel { reason: e.metric_label().into() }).inc();
                    let next = backoff.map_or(Duration::from_millis(100), |b| (b * 2).min(Duration::from_secs(30)));
                    tracing::warn!(error = %e, retry_in = ?next, "data plane sync failed; the next one is full");
                    backoff = Some(next);
                }
            }
            last_sync = Instant::now();
        }
        let retry = backoff.unwrap_or(Duration::MAX);
        let cleanup =
            if runner.has_stale() { settings.cleanup_after.saturating_sub(last_sync.elapsed()) } else { Duration::MAX };
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = changed.notified() => {
                metrics.queued(Instant::now());
                pending = true;
            }
            r = async {
                match avoid.as_mut() {
                    Some(rx) => rx.changed().await,
                    None => std::future::pending().await,
                }
            } => {
                if r.is_err() {
                    // The membership is gone (the speaker is stopping): keep the last word.
                    avoid = None;
                } else {
                    metrics.queued(Instant::now());
                    pending = true;
                }
            }
            _ = tokio::time::sleep(retry), if backoff.is_some() => pending = true,
            _ = tokio::time::sleep(cleanup), if runner.has_stale() && backoff.is_none() => {
                clean_up(&mut runner, &metrics).await;
                last_sync = Instant::now();
            }
        }
    }
}

/// Deletes stale chains and sets; a failure only makes the next sync a full one.
async fn clean_up(runner: &mut Runner, metrics: &DataplaneMetrics) {
    let (count, _) = runner.stale();
    match runner.cleanup().await {
        Ok(()) => tracing::debug!(count, "stale data plane objects deleted"),
        Err(e) => {
            tracing::warn!(error = %e, "data plane cleanup failed; the next sync is full");
            metrics.sync_failures.get_or_create(&FailureLabel { reason: e.metric_label().into() }).inc();
        }
    }
}

/// The Event reason for a Service whose rules `nft` refused.
pub const DATAPLANE_REJECTED: &str = "DataplaneRejected";

/// A warning for each Service the runner left out, and the metric of their number per family.
fn rejected_warnings(runner: &Runner, families: &[Family], metrics: &DataplaneMetrics) -> Vec<Warning> {
    let mut out = Vec::new();
    for family in families {
        let mut n = 0i64;
        for (key, r) in runner.rejected(*family) {
            n += 1;
            out.push(Warning {
                service: key.clone(),
                reason: DATAPLANE_REJECTED,
                message: rejected_message(*family, r),
            });
        }
        metrics.rejected_services.get_or_create(&family_label(*family)).set(n);
    }
    out
}

/// What the owner of a left-out Service reads: what nft said, what happened, what to do.
fn rejected_message(family: Family, r: &Rejected) -> String {
    let table = if family == Family::V4 { "ip ferrolb" } else { "ip6 ferrolb" };
    let kept = if r.kept_previous {
        "its rules from before its last change stay in place"
    } else {
        "it has no rules on this node"
    };
    let words: Vec<&str> = r.nft.lines().filter(|l| !l.trim().is_empty()).take(4).collect();
    format!(
        "nft refused this Service's rules for table {table}, so they were left out and every other \
         Service was programmed; {kept}. nft said: {} -- change the part of the Service it names \
         (it is tried again at its next change), or report it to the ferrolb maintainers with this \
         message.",
        words.join(" | ")
    )
}

fn family_label(family: Family) -> FamilyLabel {
    FamilyLabel { family: if family == Family::V4 { "ipv4" } else { "ipv6" }.into() }
}

/// Applies every family's model, telling the runner which Services changed since that family's
/// last successful sync (`owed`, forgotten on success); then hands what UDP flows may reach to
/// the conntrack cleaner.
async fn apply(
    runner: &mut Runner,
    settings: &DataplaneSettings,
    metrics: &DataplaneMetrics,
    tracker: &Tracker,
    owed: &mut BTreeMap<Family, Option<BTreeSet<ServiceKey>>>,
) -> Result<(), super::runner::Error> {
    for model in tracker.models() {
        let family = model.family;
        let no_local = no_local_endpoints(model);
        let changed = owed.get(&family).cloned().flatten();
        let synced = runner.apply_changes(model, changed.as_ref()).await?;
        owed.remove(&family);
        if synced.kind == SyncKind::Full
            && let Some(h) = &settings.handovers
        {
            // A full sync rebuilt the table without the handover chain.
            let hs = h.borrow().clone();
            settings.nft.run(&handover::render(family, &hs)).await?;
        }
        if synced.ran {
            let (kind, ms) = (synced.kind.as_str(), synced.took.as_secs_f64() * 1e3);
            let (prepared_ms, bytes) = (synced.prepared.as_secs_f64() * 1e3, synced.bytes);
            if synced.kind == SyncKind::Full {
                tracing::info!(?family, kind, ms, prepared_ms, bytes, "data plane synced");
            } else {
                tracing::debug!(?family, kind, ms, prepared_ms, bytes, "data plane synced");
            }
            let label = SyncLabel { kind: kind.into() };
            metrics.sync_duration.get_or_create(&label).observe(synced.took.as_secs_f64());
        }
        metrics
            .no_local_endpoints
            .get_or_create(&family_label(family))
            .set(i64::try_from(no_local).unwrap_or(i64::MAX));
        // What the kernel now has (without any service left out of the sync): flows it would
        // not send where they go are stale. The cleaner runs on its own; the sync goes on.
        if let Some(applied) = runner.last(family) {
            settings.conntrack.request(family, conntrack::targets(applied));
        }
    }
    Ok(())
}

/// How many `externalTrafficPolicy: Local` Services have no local endpoint on this node (a
/// walk over every Service: about 1 ms at 50,000 Services, see the data plane benchmark).
pub fn no_local_endpoints(model: &Model) -> usize {
    let family = model.family;
    model
        .services
        .values()
        .filter(|s| s.external_local && !s.ports.iter().any(|p| p.has_local_endpoints(family, &model.node)))
        .count()
}

/// When a changed EndpointSlice's change was triggered (its last-change-trigger-time).
fn trigger_time(slice: &EndpointSlice) -> Option<SystemTime> {
    let at = slice.metadata.annotations.as_ref()?.get(LAST_CHANGE_TRIGGER_TIME)?;
    at.parse::<k8s_openapi::jiff::Timestamp>().ok().map(SystemTime::from)
}

/// The watch stores, as the tracker reads them.
struct StoreObjects {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
}

impl Objects for StoreObjects {
    fn service(&self, key: &ServiceKey) -> Option<Arc<Service>> {
        self.services.get(&ObjectRef::new(&key.name).within(&key.namespace))
    }

    fn slice(&self, namespace: &str, name: &str) -> Option<Arc<EndpointSlice>> {
        self.slices.get(&ObjectRef::new(name).within(namespace))
    }

    fn all_services(&self) -> Vec<Arc<Service>> {
        self.services.state()
    }

    fn all_slices(&self) -> Vec<Arc<EndpointSlice>> {
        self.slices.state()
    }
}

#[cfg(test)]
mod tests {
    use kube::api::ObjectMeta;

    use super::*;

    fn slice(name: &str, rv: &str, trigger: Option<&str>) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                namespace: Some("default".into()),
                name: Some(name.into()),
                resource_version: Some(rv.into()),
                annotations: trigger.map(|t| [(LAST_CHANGE_TRIGGER_TIME.to_owned(), t.to_owned())].into()),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: None,
            ports: None,
        }
    }

    #[test]
    fn the_trigger_time_is_read_from_the_annotation() {
        let t = "2026-01-01T00:00:00Z";
        let at = trigger_time(&slice("a", "1", Some(t))).unwrap();
        assert_eq!(at.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(), 1_767_225_600);
        assert_eq!(trigger_time(&slice("a", "1", None)), None);
        assert_eq!(trigger_time(&slice("a", "1", Some("yesterday"))), None);
    }
}

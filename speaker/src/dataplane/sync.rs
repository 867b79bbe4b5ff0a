//! The data plane loop: watches, models, nft, health check ports, conntrack.
//!
//! ```text
//!   watch Services, EndpointSlices, Nodes ──(change)──> debounce ──> build_model per family
//!        ──> Runner::apply (partial; full at start and after a failure, retried with backoff)
//!        ──> conntrack: clear stale UDP endpoints ──> health check ports ──> metrics, health
//!   idle for a while with stale chains left ──> Runner::cleanup
//! ```
//!
//! On shutdown the tables stay: a restarted speaker takes them over with a full sync, and
//! traffic flows in between (as with kube-proxy).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::conntrack;
use super::handover::{self, Handover};
use super::healthcheck::{self, HealthServers};
use super::metrics::{DataplaneMetrics, FailureLabel, FamilyLabel, SyncLabel};
use super::model::{Family, Model};
use super::runner::{NftCommand, Runner, SyncKind};
use super::source::{SourceSettings, build_model};
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
    /// How to run `conntrack` (empty: `conntrack`).
    pub conntrack: Vec<String>,
    /// Addresses health check node ports listen on (empty: all).
    pub health_check_addresses: Vec<IpAddr>,
    /// Changes arriving within this time are applied together.
    pub debounce: Duration,
    /// Idle time after which stale chains are deleted.
    pub cleanup_after: Duration,
    /// Addresses this node took over from a live node (kept by the announcer, which also applies
    /// them before it announces): put back into the table after each full sync.
    pub handovers: Option<tokio::sync::watch::Receiver<Vec<Handover>>>,
}

impl DataplaneSettings {
    /// Settings with the usual timings.
    pub fn new(source: SourceSettings, families: Vec<Family>) -> Self {
        Self {
            source,
            families,
            nft: NftCommand::default(),
            conntrack: Vec::new(),
            health_check_addresses: Vec::new(),
            debounce: Duration::from_millis(5),
            cleanup_after: Duration::from_secs(2),
            handovers: None,
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
    let mut latency = SliceLatency::default();
    let mut backoff: Option<Duration> = None;
    let mut last_sync = Instant::now();
    metrics.queued(Instant::now());
    let mut pending = true;
    loop {
        if pending {
            tokio::time::sleep(settings.debounce).await;
            let svcs = services.state();
            let sls = slices.state();
            let nds = nodes.state();
            let models: Vec<Model> = settings
                .families
                .iter()
                .map(|f| {
                    build_model(
                        &settings.source,
                        *f,
                        svcs.iter().map(|s| s.as_ref()),
                        sls.iter().map(|s| s.as_ref()),
                        nds.iter().map(|n| n.as_ref()),
                    )
                })
                .collect();
            let seen = latency.changes(sls.iter().map(|s| s.as_ref()));
            match apply(&mut runner, &settings, &metrics, models.clone()).await {
                Ok(()) => {
                    metrics.applied();
                    backoff = None;
                    pending = false;
                    for at in seen {
                        metrics.programming_latency.observe(at.elapsed().unwrap_or_default().as_secs_f64());
                    }
                    let refs: Vec<&Model> = models.iter().collect();
                    for (port, e) in health.sync(&healthcheck::wanted(&refs)).await {
                        tracing::warn!(port, error = %e, "cannot open health check node port");
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
            _ = tokio::time::sleep(retry), if backoff.is_some() => pending = true,
            _ = tokio::time::sleep(cleanup), if runner.has_stale() && backoff.is_none() => {
                if let Err(e) = runner.cleanup().await {
                    tracing::warn!(error = %e, "data plane cleanup failed; the next sync is full");
                    metrics.sync_failures.get_or_create(&FailureLabel { reason: e.metric_label().into() }).inc();
                }
                last_sync = Instant::now();
            }
        }
    }
}

/// Applies every family's model; clears stale UDP flows after partial syncs.
async fn apply(
    runner: &mut Runner,
    settings: &DataplaneSettings,
    metrics: &DataplaneMetrics,
    models: Vec<Model>,
) -> Result<(), super::runner::Error> {
    for model in models {
        let family = model.family;
        let stale = runner.last(family).map(|prev| conntrack::stale_udp(prev, &model)).unwrap_or_default();
        let no_local = model
            .services
            .values()
            .filter(|s| s.external_local && s.ports.iter().all(|p| p.local_endpoints(family, &model.node).is_empty()))
            .count();
        let synced = runner.apply(model).await?;
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
        let family_label = FamilyLabel { family: if family == Family::V4 { "ipv4" } else { "ipv6" }.into() };
        metrics.no_local_endpoints.get_or_create(&family_label).set(i64::try_from(no_local).unwrap_or(i64::MAX));
        for s in stale {
            if let Err(e) = conntrack::clear(&settings.conntrack, &s).await {
                tracing::warn!(endpoint = %s.ip, port = s.port, error = %e, "cannot clear stale UDP conntrack entries");
            }
        }
    }
    Ok(())
}

/// Remembers each EndpointSlice's resourceVersion, to tell which ones changed since last time and
/// when (their last-change-trigger-time).
#[derive(Default)]
struct SliceLatency {
    /// namespace/name -> resourceVersion.
    versions: BTreeMap<String, String>,
}

impl SliceLatency {
    /// The trigger times of slices changed since the last call (the first call only records).
    fn changes<'a>(&mut self, slices: impl Iterator<Item = &'a EndpointSlice>) -> Vec<SystemTime> {
        let first = self.versions.is_empty();
        let mut out = Vec::new();
        let mut versions = BTreeMap::new();
        for s in slices {
            let key = format!(
                "{}/{}",
                s.metadata.namespace.as_deref().unwrap_or(""),
                s.metadata.name.as_deref().unwrap_or("")
            );
            let rv = s.metadata.resource_version.clone().unwrap_or_default();
            if !first && self.versions.get(&key) != Some(&rv) {
                let at = s
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(LAST_CHANGE_TRIGGER_TIME))
                    .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
                    .map(SystemTime::from);
                out.extend(at);
            }
            versions.insert(key, rv);
        }
        self.versions = versions;
        out
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
    fn latency_counts_changed_slices_with_a_trigger_time() {
        let mut l = SliceLatency::default();
        let t = "2026-01-01T00:00:00Z";
        assert!(l.changes([slice("a", "1", Some(t))].iter()).is_empty(), "the first look only records");
        assert!(l.changes([slice("a", "1", Some(t))].iter()).is_empty());
        let seen = l.changes([slice("a", "2", Some(t)), slice("b", "1", None)].iter());
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(), 1_767_225_600);
    }
}

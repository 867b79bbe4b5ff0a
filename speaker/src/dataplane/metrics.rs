//! The data plane's metrics and health, registered into the speaker's registry.
//!
//! Health follows kube-proxy's `/healthz`: the data plane is unhealthy when a change has been
//! waiting to be applied for longer than a timeout (the sync loop is stuck or keeps failing).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// `kind="full"` or `kind="partial"`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SyncLabel {
    pub kind: String,
}

/// `reason=` an [`super::runner::Error::metric_label`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabel {
    pub reason: String,
}

/// `family="ipv4"` or `family="ipv6"`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FamilyLabel {
    pub family: String,
}

/// Metrics of the nftables data plane.
#[derive(Debug)]
pub struct DataplaneMetrics {
    /// Seconds per sync that ran `nft`, by kind.
    pub sync_duration: Family<SyncLabel, Histogram>,
    /// Seconds from an EndpointSlice change (its `endpoints.kubernetes.io/last-change-trigger-time`,
    /// or when the speaker saw it) to the sync that applied it.
    pub programming_latency: Histogram,
    /// Failed syncs, by reason.
    pub sync_failures: Family<FailureLabel, Counter>,
    /// `externalTrafficPolicy: Local` services with no usable endpoint on this node.
    pub no_local_endpoints: Family<FamilyLabel, Gauge>,
    /// Services left out of the table because `nft` refused their rules, by family.
    pub rejected_services: Family<FamilyLabel, Gauge>,
    /// Nodes whose endpoints new connections avoid (their speakers died).
    pub avoided_nodes: Gauge,
    /// Health: since when a change waits (None: nothing waits), and the timeout.
    pending: Mutex<Option<Instant>>,
    /// How long a change may wait before the data plane is unhealthy.
    pub health_timeout: Duration,
}

impl Default for DataplaneMetrics {
    fn default() -> Self {
        Self::new(Duration::from_secs(60))
    }
}

fn sync_histogram() -> Histogram {
    Histogram::new([0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0])
}

impl DataplaneMetrics {
    /// Metrics with `health_timeout` as the longest a change may wait.
    pub fn new(health_timeout: Duration) -> Self {
        Self {
            sync_duration: Family::new_with_constructor(sync_histogram),
            programming_latency: Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]),
            sync_failures: Family::default(),
            no_local_endpoints: Family::default(),
            rejected_services: Family::default(),
            avoided_nodes: Gauge::default(),
            pending: Mutex::new(None),
            health_timeout,
        }
    }

    /// Adds the metrics to `registry` (names get the registry's prefix, e.g. `ferrolb_`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "dataplane_sync_duration_seconds",
            "Time of one nftables sync, full or partial",
            self.sync_duration.clone(),
        );
        registry.register(
            "dataplane_network_programming_duration_seconds",
            "From an EndpointSlice change to the sync that applied it",
            self.programming_latency.clone(),
        );
        registry.register("dataplane_sync_failures", "nftables syncs that failed", self.sync_failures.clone());
        registry.register(
            "dataplane_services_no_local_endpoints",
            "externalTrafficPolicy Local services with no usable endpoint on this node",
            self.no_local_endpoints.clone(),
        );
        registry.register(
            "dataplane_rejected_services",
            "Services left out of the nftables table because nft refused their rules",
            self.rejected_services.clone(),
        );
        registry.register(
            "dataplane_avoided_nodes",
            "Nodes whose speakers died (the membership's word): new connections avoid their endpoints",
            self.avoided_nodes.clone(),
        );
    }

    /// A change arrived that is not applied yet (keeps the earliest such moment).
    pub fn queued(&self, at: Instant) {
        if let Ok(mut p) = self.pending.lock() {
            p.get_or_insert(at);
        }
    }

    /// Everything queued up to now is applied.
    pub fn applied(&self) {
        if let Ok(mut p) = self.pending.lock() {
            *p = None;
        }
    }

    /// Healthy unless a change has waited longer than the timeout.
    pub fn healthy(&self, now: Instant) -> bool {
        match self.pending.lock() {
            Ok(p) => p.is_none_or(|since| now.saturating_duration_since(since) <= self.health_timeout),
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;

    use super::*;

    #[test]
    fn health_turns_bad_only_when_a_change_waits_too_long() {
        let m = DataplaneMetrics::new(Duration::from_secs(2));
        let t0 = Instant::now();
        assert!(m.healthy(t0));
        m.queued(t0);
        m.queued(t0 + Duration::from_secs(1));
        assert!(m.healthy(t0 + Duration::from_secs(2)));
        assert!(!m.healthy(t0 + Duration::from_secs(3)), "the first queued change counts");
        m.applied();
        assert!(m.healthy(t0 + Duration::from_secs(10)));
    }

    #[test]
    fn metrics_are_registered_under_the_prefix() {
        let m = DataplaneMetrics::default();
        let mut registry = Registry::with_prefix("ferrolb");
        m.register(&mut registry);
        m.sync_duration.get_or_create(&SyncLabel { kind: "full".into() }).observe(0.2);
        m.sync_failures.get_or_create(&FailureLabel { reason: "rejected".into() }).inc();
        m.rejected_services.get_or_create(&FamilyLabel { family: "ipv4".into() }).set(1);
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        for name in [
            "ferrolb_dataplane_sync_duration_seconds_bucket{le=\"0.25\",kind=\"full\"} 1",
            "ferrolb_dataplane_sync_failures_total{reason=\"rejected\"} 1",
            "ferrolb_dataplane_network_programming_duration_seconds_count 0",
            "ferrolb_dataplane_rejected_services{family=\"ipv4\"} 1",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}

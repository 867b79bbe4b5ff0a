//! The controller's metrics (`/metrics`, Prometheus text format) and health endpoints.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabel {
    pub pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

/// Every metric, and whether the controller is ready and leading.
pub struct Metrics {
    registry: Registry,
    pub addresses: Family<PoolLabel, Gauge>,
    pub addresses_in_use: Family<PoolLabel, Gauge>,
    pub services_allocated: Gauge,
    pub reconcile_errors: Family<KindLabel, Counter>,
    pub is_leader: Gauge,
    /// Seconds of each reconcile pass's pure part (snapshot -> actions).
    pub pass_reconcile: Histogram,
    /// Seconds of each status write, from sending to the answer.
    pub status_write: Histogram,
    /// The caches have synced: `/readyz` answers 200.
    pub ready: AtomicBool,
    /// The pools the per-pool gauges were last set for, so a deleted pool's are dropped.
    pools: Mutex<BTreeSet<String>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("ferrolb");
        let addresses = Family::<PoolLabel, Gauge>::default();
        let addresses_in_use = Family::<PoolLabel, Gauge>::default();
        let services_allocated = Gauge::default();
        let reconcile_errors = Family::<KindLabel, Counter>::default();
        let is_leader = Gauge::default();
        // 0.25 ms to ~8 s.
        let pass_reconcile = Histogram::new(exponential_buckets(0.00025, 2.0, 16));
        let status_write = Histogram::new(exponential_buckets(0.00025, 2.0, 16));
        // Gauges named *_total, as MetalLB's users' dashboards expect.
        registry.register("allocator_addresses_total", "Usable addresses in the pool", addresses.clone());
        registry.register("allocator_addresses_in_use_total", "Addresses of the pool in use", addresses_in_use.clone());
        registry.register(
            "allocator_services_allocated_total",
            "Services holding at least one address",
            services_allocated.clone(),
        );
        registry.register("controller_reconcile_errors", "Failed writes, by kind", reconcile_errors.clone());
        registry.register("controller_is_leader", "1 while this replica holds the lease", is_leader.clone());
        registry.register(
            "controller_pass_reconcile_seconds",
            "Time of each reconcile pass from the caches to the actions",
            pass_reconcile.clone(),
        );
        registry.register(
            "controller_status_write_seconds",
            "Time of each Service status write, from sending to the answer",
            status_write.clone(),
        );
        Metrics {
            registry,
            addresses,
            addresses_in_use,
            services_allocated,
            reconcile_errors,
            is_leader,
            pass_reconcile,
            status_write,
            ready: AtomicBool::new(false),
            pools: Mutex::default(),
        }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Sets the per-pool gauges to `usage`, and removes those of pools no longer in it.
    pub fn set_pool_usage(&self, usage: &BTreeMap<String, crate::allocator::PoolUsage>) {
        let mut reported = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        for gone in reported.iter().filter(|p| !usage.contains_key(*p)) {
            let label = PoolLabel { pool: gone.clone() };
            self.addresses.remove(&label);
            self.addresses_in_use.remove(&label);
        }
        for (name, u) in usage {
            let label = PoolLabel { pool: name.clone() };
            let total = u.in_use_v4 + u.in_use_v6 + u.available_v4 + u.available_v6;
            self.addresses.get_or_create(&label).set(i64::try_from(total).unwrap_or(i64::MAX));
            self.addresses_in_use.get_or_create(&label).set(i64::try_from(u.in_use_v4 + u.in_use_v6).unwrap_or(0));
        }
        *reported = usage.keys().cloned().collect();
    }

    pub fn error(&self, kind: &str) {
        self.reconcile_errors.get_or_create(&KindLabel { kind: kind.to_string() }).inc();
    }
}

impl ferrolb_telemetry::Telemetry for Metrics {
    fn encode(&self) -> String {
        Metrics::encode(self)
    }

    fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allocator::PoolUsage;

    #[test]
    fn a_deleted_pools_gauges_go_with_it() {
        let m = Metrics::default();
        let used = PoolUsage { in_use_v4: 1, available_v4: 9, ..Default::default() };
        m.set_pool_usage(&[("lan".to_string(), used), ("old".to_string(), used)].into());
        assert!(m.encode().contains("pool=\"old\""));
        m.set_pool_usage(&[("lan".to_string(), used)].into());
        let text = m.encode();
        assert!(text.contains("ferrolb_allocator_addresses_total{pool=\"lan\"} 10"), "{text}");
        assert!(!text.contains("pool=\"old\""), "{text}");
    }
}

//! The controller's metrics (`/metrics`, Prometheus text format) and health endpoints.

use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
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
    /// The caches have synced: `/readyz` answers 200.
    pub ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("ferrolb");
        let addresses = Family::<PoolLabel, Gauge>::default();
        let addresses_in_use = Family::<PoolLabel, Gauge>::default();
        let services_allocated = Gauge::default();
        let reconcile_errors = Family::<KindLabel, Counter>::default();
        let is_leader = Gauge::default();
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
        Metrics {
            registry,
            addresses,
            addresses_in_use,
            services_allocated,
            reconcile_errors,
            is_leader,
            ready: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
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

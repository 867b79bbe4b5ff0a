//! The speaker's metrics (`/metrics`) and health (`/healthz`, `/readyz`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::dataplane::metrics::DataplaneMetrics;
use crate::l2::responder::L2Event;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IpLabel {
    pub ip: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AnnouncedLabel {
    pub service: String,
    pub node: String,
    pub ip: String,
}

/// Why a membership packet (`membership::Reject::label`) or an ARP/NDP request was dropped.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

impl From<crate::membership::Reject> for ReasonLabel {
    fn from(r: crate::membership::Reject) -> Self {
        ReasonLabel { reason: r.label() }
    }
}

/// `ferrolb_membership_rejected_packets_total{reason}`.
pub type RejectedPackets = Family<ReasonLabel, Counter>;

/// `ferrolb_membership_suspicions_total`.
pub type Suspicions = Counter;

pub struct Metrics {
    registry: Registry,
    pub requests: Family<IpLabel, Counter>,
    pub responses: Family<IpLabel, Counter>,
    pub gratuitous: Family<IpLabel, Counter>,
    /// Requests for our addresses left unanswered, by reason (invalid sender, rate limited).
    pub dropped: Family<ReasonLabel, Counter>,
    pub announced: Family<AnnouncedLabel, Gauge>,
    /// Seconds from the change that made this node the announcer (a peer declared dead, a node
    /// cordoned, …, as this speaker saw it) to its first gratuitous packet.
    pub takeover: Histogram,
    /// Membership packets dropped: forged, stale, replayed, misdirected, or from an address that
    /// is not the named Node's.
    pub membership_rejected: RejectedPackets,
    /// Members this speaker saw enter suspicion (a dead one, or a false alarm when refuted).
    pub membership_suspicions: Suspicions,
    /// The caches have synced and the membership runs.
    pub ready: AtomicBool,
    /// The data plane's health, when it runs.
    dataplane: Option<Arc<DataplaneMetrics>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("ferrolb");
        let requests = Family::<IpLabel, Counter>::default();
        let responses = Family::<IpLabel, Counter>::default();
        let gratuitous = Family::<IpLabel, Counter>::default();
        let dropped = Family::<ReasonLabel, Counter>::default();
        let announced = Family::<AnnouncedLabel, Gauge>::default();
        let takeover = Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]);
        registry.register("l2_requests_received", "ARP/NDP requests for addresses we announce", requests.clone());
        registry.register("l2_responses_sent", "ARP/NDP answers sent", responses.clone());
        registry.register("l2_gratuitous_sent", "Gratuitous ARP / unsolicited NA sent", gratuitous.clone());
        registry.register(
            "l2_dropped_requests",
            "ARP/NDP requests for addresses we announce left unanswered, by reason",
            dropped.clone(),
        );
        registry.register("speaker_announced", "1 for each address this node announces", announced.clone());
        registry.register(
            "speaker_api_reachable",
            "1 while the speaker's watches reach the Kubernetes API server, 0 while it is away (nothing is withdrawn then)",
            crate::watch::API.gauge.clone(),
        );
        registry.register(
            "speaker_takeover_seconds",
            "From the change to the first gratuitous packet",
            takeover.clone(),
        );
        let membership_rejected = RejectedPackets::default();
        registry.register(
            "membership_rejected_packets",
            "Membership packets dropped, by reason",
            membership_rejected.clone(),
        );
        let membership_suspicions = Suspicions::default();
        registry.register(
            "membership_suspicions",
            "Members this speaker saw become suspect (dead, or a false alarm when the suspicion was refuted)",
            membership_suspicions.clone(),
        );
        Metrics {
            registry,
            membership_rejected,
            membership_suspicions,
            requests,
            responses,
            gratuitous,
            dropped,
            announced,
            takeover,
            ready: AtomicBool::new(false),
            dataplane: None,
        }
    }
}

impl Metrics {
    /// Adds the data plane's metrics, and its health to `/healthz` and `/livez`.
    pub fn add_dataplane(&mut self, dp: Arc<DataplaneMetrics>) {
        dp.register(&mut self.registry);
        self.dataplane = Some(dp);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Counts one wire event.
    pub fn l2(&self, e: L2Event) {
        let (family, ip) = match e {
            L2Event::Request(ip) => (&self.requests, ip),
            L2Event::Response(ip) => (&self.responses, ip),
            L2Event::Gratuitous(ip) => (&self.gratuitous, ip),
            L2Event::Dropped(_, reason) => {
                self.dropped.get_or_create(&ReasonLabel { reason: reason.label() }).inc();
                return;
            }
        };
        family.get_or_create(&IpLabel { ip: ip.to_string() }).inc();
    }
}

impl ferrolb_telemetry::Telemetry for Metrics {
    fn encode(&self) -> String {
        Metrics::encode(self)
    }

    fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    fn healthy(&self) -> bool {
        self.dataplane.as_ref().is_none_or(|d| d.healthy(Instant::now()))
    }
}

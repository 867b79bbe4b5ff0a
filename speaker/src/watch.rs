//! The speaker's view of the cluster: one reflector per kind, shared by the announcer and the
//! data plane, each woken through its own `Notify` when anything changes.
//!
//! ```text
//!   API ──watch──> Store<Node>, Store<Service>, Store<EndpointSlice> ──> announcer (wake)
//!                                                                   └──> data plane (wake)
//!   API ──watch──> Store<ServiceCIDR> ──> data plane (wake)
//! ```
//!
//! When the API server goes away the stores keep their last state and the watchers retry with
//! backoff: nothing downstream sees an empty cluster.

use std::pin::pin;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::store::WriterDropped;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, watcher};
use kube::{Api, Client, Resource};
use tokio::sync::Notify;

/// A store of `api`'s objects, kept by a task that wakes every one of `wake` on each change.
pub fn watch<K>(api: Api<K>, wake: Vec<Arc<Notify>>) -> Store<K>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    watch_with(api, watcher::Config::default(), wake)
}

/// `watch` with a watcher configuration (a field selector, say).
pub fn watch_with<K>(api: Api<K>, config: watcher::Config, wake: Vec<Arc<Notify>>) -> Store<K>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    watch_logged(api, config, wake, None)
}

/// Which objects of one kind changed since someone last took the list: what lets the data plane
/// work on the changed objects only. Noted after the store holds the change.
#[derive(Debug, Default)]
pub struct ChangeLog {
    pending: std::sync::Mutex<Changes>,
}

/// Objects changed (added, modified, deleted), by namespace and name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub objects: std::collections::BTreeSet<(String, String)>,
    /// The watch listed everything again (at start, or after it lost its place): anything may
    /// have changed, deletions included.
    pub all: bool,
}

impl ChangeLog {
    fn note(&self, namespace: Option<&str>, name: Option<&str>) {
        if let Ok(mut p) = self.pending.lock() {
            p.objects.insert((namespace.unwrap_or_default().to_owned(), name.unwrap_or_default().to_owned()));
        }
    }

    fn note_all(&self) {
        if let Ok(mut p) = self.pending.lock() {
            p.all = true;
        }
    }

    /// The changes since the last call, forgotten here.
    pub fn take(&self) -> Changes {
        self.pending.lock().map(|mut p| std::mem::take(&mut *p)).unwrap_or(Changes { all: true, ..Changes::default() })
    }
}

/// `watch_with`, noting each changed object in `log`.
pub fn watch_logged<K>(
    api: Api<K>,
    config: watcher::Config,
    wake: Vec<Arc<Notify>>,
    log: Option<Arc<ChangeLog>>,
) -> Store<K>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, config).backoff(ferrolb_api::backoff::watch_backoff()));
    tokio::spawn(async move {
        let kind = K::kind(&K::DynamicType::default()).to_string();
        let mut stream = pin!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(ev) => {
                    // `Init` only starts a list attempt; anything else came from the API server.
                    if !matches!(ev, watcher::Event::Init) {
                        API.reached();
                    }
                    if let Some(log) = &log {
                        match &ev {
                            watcher::Event::Apply(o) | watcher::Event::Delete(o) => {
                                log.note(o.meta().namespace.as_deref(), o.meta().name.as_deref())
                            }
                            // The store is replaced whole when the new list is done.
                            watcher::Event::InitDone => log.note_all(),
                            watcher::Event::Init | watcher::Event::InitApply(_) => {}
                        }
                    }
                    wake.iter().for_each(|n| n.notify_one())
                }
                Err(e) => {
                    API.lost(&kind, &e);
                    tracing::debug!(%kind, error = %e, "watch")
                }
            }
        }
    });
    reader
}

/// Whether the speaker's watches reach the API server: the process has one view of it. Losing
/// it is logged once (not at every retry) and read from `ferrolb_speaker_api_reachable`.
pub struct ApiReachable {
    /// 1 while the watches reach the API server, 0 from the first failure to the next event.
    pub gauge: prometheus_client::metrics::gauge::Gauge,
    lost_at: std::sync::Mutex<Option<std::time::Instant>>,
}

/// The process's [`ApiReachable`].
pub static API: std::sync::LazyLock<ApiReachable> = std::sync::LazyLock::new(|| {
    let gauge = prometheus_client::metrics::gauge::Gauge::default();
    gauge.set(1);
    ApiReachable { gauge, lost_at: std::sync::Mutex::new(None) }
});

impl ApiReachable {
    fn lost(&self, kind: &str, e: &dyn std::fmt::Display) {
        let Ok(mut lost) = self.lost_at.lock() else { return };
        if lost.is_none() {
            *lost = Some(std::time::Instant::now());
            self.gauge.set(0);
            tracing::warn!(
                %kind,
                error = %e,
                "lost the Kubernetes API server: announcements and the data plane stay as they are, the membership still moves addresses off dead speakers; changes (a cordon, a new Service) wait for its return"
            );
        }
    }

    fn is_lost(&self) -> bool {
        self.lost_at.lock().map(|l| l.is_some()).unwrap_or(false)
    }

    /// While lost, asks the API server for its version every second: a watch that resumes on
    /// an idle cluster brings no event that would say the API server is back.
    pub fn probe_while_lost(client: Client) {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                if API.is_lost() && client.apiserver_version().await.is_ok() {
                    API.reached();
                }
            }
        });
    }

    fn reached(&self) {
        let Ok(mut lost) = self.lost_at.lock() else { return };
        if let Some(at) = lost.take() {
            self.gauge.set(1);
            tracing::info!(after_s = at.elapsed().as_secs_f64(), "the Kubernetes API server is back");
        }
    }
}

/// Nodes, Services and EndpointSlices, watched once for the whole speaker.
#[derive(Clone)]
pub struct Cluster {
    pub nodes: Store<Node>,
    pub services: Store<Service>,
    pub slices: Store<EndpointSlice>,
    /// The cluster's service CIDRs (the data plane drops what goes to an unallocated address in
    /// them). Not waited for by [`Cluster::ready`]: without them (an API server that has no
    /// ServiceCIDR, say) everything else still works.
    pub service_cidrs: Store<ServiceCIDR>,
    /// Woken on every change, for the announcer.
    pub announcer: Arc<Notify>,
    /// Woken on every change, for the data plane.
    pub dataplane: Arc<Notify>,
    /// Which Services changed, for the data plane.
    pub service_changes: Arc<ChangeLog>,
    /// Which EndpointSlices changed, for the data plane.
    pub slice_changes: Arc<ChangeLog>,
}

impl Cluster {
    /// Starts the watches.
    pub fn start(client: &Client) -> Self {
        let (announcer, dataplane) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let wake = vec![announcer.clone(), dataplane.clone()];
        ApiReachable::probe_while_lost(client.clone());
        let (service_changes, slice_changes) = (Arc::new(ChangeLog::default()), Arc::new(ChangeLog::default()));
        let all = watcher::Config::default;
        Cluster {
            nodes: watch(Api::all(client.clone()), wake.clone()),
            services: watch_logged(Api::all(client.clone()), all(), wake.clone(), Some(service_changes.clone())),
            slices: watch_logged(Api::all(client.clone()), all(), wake, Some(slice_changes.clone())),
            service_cidrs: watch(Api::all(client.clone()), vec![dataplane.clone()]),
            announcer,
            dataplane,
            service_changes,
            slice_changes,
        }
    }

    /// Resolves when every store has its first full list.
    pub async fn ready(&self) -> Result<(), WriterDropped> {
        self.nodes.wait_until_ready().await?;
        self.services.wait_until_ready().await?;
        self.slices.wait_until_ready().await
    }
}

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
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, config).default_backoff());
    tokio::spawn(async move {
        let kind = K::kind(&K::DynamicType::default()).to_string();
        let mut stream = pin!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(_) => wake.iter().for_each(|n| n.notify_one()),
                Err(e) => tracing::warn!(%kind, error = %e, "watch"),
            }
        }
    });
    reader
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
}

impl Cluster {
    /// Starts the watches.
    pub fn start(client: &Client) -> Self {
        let (announcer, dataplane) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let wake = vec![announcer.clone(), dataplane.clone()];
        Cluster {
            nodes: watch(Api::all(client.clone()), wake.clone()),
            services: watch(Api::all(client.clone()), wake.clone()),
            slices: watch(Api::all(client.clone()), wake),
            service_cidrs: watch(Api::all(client.clone()), vec![dataplane.clone()]),
            announcer,
            dataplane,
        }
    }

    /// Resolves when every store has its first full list.
    pub async fn ready(&self) -> Result<(), WriterDropped> {
        self.nodes.wait_until_ready().await?;
        self.services.wait_until_ready().await?;
        self.slices.wait_until_ready().await
    }
}

//! Apply: the reconcile's actions as API writes. Thin: each action is one request.

use k8s_openapi::api::core::v1::{ObjectReference, Service};
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use serde_json::json;

use crate::allocator::ServiceKey;
use crate::reconcile::Action;

/// Field manager of every write.
pub const MANAGER: &str = "ferrolb-controller";

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("writing the status of {key}: {source}")]
    Status { key: ServiceKey, source: kube::Error },
    #[error("annotating {key}: {source}")]
    Annotation { key: ServiceKey, source: kube::Error },
    #[error("publishing an event on {key}: {source}")]
    Event { key: ServiceKey, source: kube::Error },
}

impl ApplyError {
    /// A short label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ApplyError::Status { .. } => "status",
            ApplyError::Annotation { .. } => "annotation",
            ApplyError::Event { .. } => "event",
        }
    }

    /// The Service is gone: nothing to write, not an error worth counting.
    pub fn is_not_found(&self) -> bool {
        let (ApplyError::Status { source, .. }
        | ApplyError::Annotation { source, .. }
        | ApplyError::Event { source, .. }) = self;
        matches!(source, kube::Error::Api(s) if s.code == 404)
    }
}

pub struct Applier {
    client: Client,
    recorder: Recorder,
}

impl Applier {
    pub fn new(client: Client, recorder: Recorder) -> Self {
        Applier { client, recorder }
    }

    fn api(&self, key: &ServiceKey) -> Api<Service> {
        Api::namespaced(self.client.clone(), &key.namespace)
    }

    pub async fn apply(&self, action: &Action) -> Result<(), ApplyError> {
        match action {
            Action::SetStatus { key, ips } => {
                let ingress: Vec<_> = ips.iter().map(|ip| json!({"ip": ip.to_string(), "ipMode": "VIP"})).collect();
                let lb = if ingress.is_empty() { json!({"ingress": null}) } else { json!({"ingress": ingress}) };
                let patch = json!({"status": {"loadBalancer": lb}});
                self.api(key)
                    .patch_status(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map_err(|source| ApplyError::Status { key: key.clone(), source })?;
            }
            Action::SetPoolAnnotation { key, pool } => {
                let patch = json!({"metadata": {"annotations": {
                    ferrolb_api::annotations::IP_ALLOCATED_FROM_POOL: pool,
                }}});
                self.api(key)
                    .patch(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map_err(|source| ApplyError::Annotation { key: key.clone(), source })?;
            }
            Action::Event { key, uid, warning, reason, message } => {
                let ev = Event {
                    type_: if *warning { EventType::Warning } else { EventType::Normal },
                    reason: (*reason).to_string(),
                    note: Some(message.chars().take(1000).collect()),
                    action: (*reason).to_string(),
                    secondary: None,
                };
                let reference = ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Service".into()),
                    namespace: Some(key.namespace.clone()),
                    name: Some(key.name.clone()),
                    uid: uid.clone(),
                    ..Default::default()
                };
                self.recorder
                    .publish(&ev, &reference)
                    .await
                    .map_err(|source| ApplyError::Event { key: key.clone(), source })?;
            }
        }
        Ok(())
    }
}

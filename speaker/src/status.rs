//! What a user sees of the announcements: one `ServiceL2Status` per announced service (which
//! node, which interfaces), and a `nodeAssigned` Event on the Service when its announcer changes.
//!
//! ```text
//!   election ──> View (mine, announced anywhere, alive) ─┐
//!   ServiceL2Status watch (namespace) ───────────────────┼─> plan (pure) ──> apply / delete / Event
//!   emitted: services we told about since we took them ──┘
//! ```
//!
//! Each object belongs to the node it names. The announcer writes it (server-side apply, so a
//! takeover simply overwrites the node); a node that stops announcing deletes its own object,
//! with its resourceVersion as precondition so it never deletes what a new announcer just wrote.
//! Objects left by a dead speaker for a service that nobody announces any more are deleted by
//! whoever sees them. Writes wait for nothing else: when the API server is away, they are retried
//! and the wire is not affected.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use ferrolb_api::{InterfaceInfo, ServiceL2Status, ServiceL2StatusStatus};
use ferrolb_config::ServiceKey;
use k8s_openapi::api::core::v1::{ObjectReference, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::sync::{Notify, watch};

/// The field manager of every write, the same on every node, so a takeover owns the fields.
pub const MANAGER: &str = "ferrolb-speaker";
/// The Event reason on a Service whose announcer changed (MetalLB's word).
pub const NODE_ASSIGNED: &str = "nodeAssigned";
/// Labels on each object, to select them by node or service. The node's is [`node_label`] of
/// its name, which fits a label however long the name is.
pub const NODE_LABEL: &str = "ferrolb.io/node";
pub const SERVICE_NAME_LABEL: &str = "ferrolb.io/service-name";
pub const SERVICE_NAMESPACE_LABEL: &str = "ferrolb.io/service-namespace";

/// What the election says, as far as the status objects go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct View {
    /// Services this node announces and the interfaces it answers on, sorted.
    pub mine: BTreeMap<ServiceKey, Vec<String>>,
    /// Services some node announces.
    pub announced: BTreeSet<ServiceKey>,
    /// Nodes whose speaker is alive.
    pub alive: BTreeSet<String>,
}

/// The object's name for a service: `<namespace>.<name>`. Neither part can hold a dot (both are
/// DNS labels), so the name is unique, and a user finds it without a lookup.
pub fn object_name(service: &ServiceKey) -> String {
    format!("{}.{}", service.namespace, service.name)
}

/// The longest label value the API server accepts.
const LABEL_MAX: usize = 63;
/// The longest `reportingInstance` of an Event the API server accepts.
const REPORTING_INSTANCE_MAX: usize = 128;

/// `name` if it is at most `max` bytes and a valid label value; else a prefix of it (cut at a
/// character boundary, ending in a letter or digit) and 16 hex digits of its sha256, which
/// together fit `max` (at least 17). Two names that differ only after the prefix get different
/// values (but for a hash collision); whoever selects by it checks the full name as well.
fn fit(name: &str, max: usize) -> String {
    let valid = |v: &str| {
        v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && v.bytes().next().is_none_or(|b| b.is_ascii_alphanumeric())
            && v.bytes().last().is_none_or(|b| b.is_ascii_alphanumeric())
    };
    if name.len() <= max && valid(name) {
        return name.to_string();
    }
    use sha2::{Digest, Sha256};
    let hash = Sha256::digest(name.as_bytes());
    let hex: String = hash.iter().take(8).map(|b| format!("{b:02x}")).collect();
    // Only characters a label allows, in the first `max - 17` bytes, trailing separators dropped.
    let room = max.saturating_sub(hex.len() + 1);
    let prefix: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
        .take(room)
        .collect::<String>()
        .trim_start_matches(|c: char| !c.is_ascii_alphanumeric())
        .trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string();
    if prefix.is_empty() { hex } else { format!("{prefix}-{hex}") }
}

/// The value of [`NODE_LABEL`] for `node`: the name itself when it fits a label (up to 63
/// characters, as every name in most clusters), else a hashed form. Node names may have 253.
pub fn node_label(node: &str) -> String {
    fit(node, LABEL_MAX)
}

/// The `reportingInstance` of this node's Events: the node's name, hashed when longer than the
/// API server's 128 characters (an Event with a longer one is refused).
pub fn reporting_instance(node: &str) -> String {
    fit(node, REPORTING_INSTANCE_MAX)
}

/// One write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Make the object say this node announces `service` on `interfaces`; with an Event when
    /// the announcer changed to us.
    Write { service: ServiceKey, status: ServiceL2StatusStatus, event: bool },
    /// Delete the object if it is still the version we saw.
    Delete { name: String, resource_version: Option<String> },
}

/// The writes that bring the objects in line with the view. `emitted` holds the services whose
/// `nodeAssigned` Event this node has sent since it took them; it is updated here.
pub fn plan(node: &str, view: &View, objects: &[Arc<ServiceL2Status>], emitted: &mut BTreeSet<ServiceKey>) -> Vec<Op> {
    let by_name: BTreeMap<String, &ServiceL2Status> = objects.iter().map(|o| (o.name_any(), o.as_ref())).collect();
    let mut ops = Vec::new();
    emitted.retain(|s| view.mine.contains_key(s));
    for (service, interfaces) in &view.mine {
        let want = ServiceL2StatusStatus {
            node: node.to_string(),
            service_name: service.name.clone(),
            service_namespace: service.namespace.clone(),
            interfaces: interfaces.iter().map(|i| InterfaceInfo { name: i.clone() }).collect(),
        };
        let have = by_name.get(&object_name(service)).and_then(|o| o.status.as_ref());
        // An Event only when the node changes: not when the interfaces do, nor when a
        // restarted speaker finds its own object.
        let event = !emitted.contains(service) && have.is_none_or(|h| h.node != node);
        emitted.insert(service.clone());
        if have != Some(&want) {
            ops.push(Op::Write { service: service.clone(), status: want, event });
        }
    }
    for (name, o) in &by_name {
        let Some(st) = o.status.as_ref() else { continue };
        let service = ServiceKey::new(st.service_namespace.as_str(), st.service_name.as_str());
        if view.mine.contains_key(&service) && *name == object_name(&service) {
            continue;
        }
        let ours = st.node == node;
        let orphan = !view.announced.contains(&service) && !view.alive.contains(&st.node);
        if ours || orphan {
            ops.push(Op::Delete { name: name.clone(), resource_version: o.resource_version() });
        }
    }
    ops
}

/// Keeps the objects of `namespace` in line with the views sent on `views`, until the sender is
/// dropped.
pub async fn run(
    client: Client,
    namespace: String,
    node: String,
    owner: Option<OwnerReference>,
    services: Store<Service>,
    views: watch::Receiver<View>,
) {
    let api: Api<ServiceL2Status> = Api::namespaced(client.clone(), &namespace);
    let changed = Arc::new(Notify::new());
    let store = crate::watch::watch(api.clone(), vec![changed.clone()]);
    let recorder =
        Recorder::new(client, Reporter { controller: MANAGER.into(), instance: Some(reporting_instance(&node)) });
    let mut views = views;
    let mut emitted = BTreeSet::new();
    if store.wait_until_ready().await.is_err() {
        return;
    }
    loop {
        let view = views.borrow_and_update().clone();
        let mut retry = false;
        for op in plan(&node, &view, &store.state(), &mut emitted) {
            if let Err(e) = apply(&api, &recorder, &services, &namespace, owner.as_ref(), op).await {
                tracing::warn!(error = %e, "writing ServiceL2Status; will retry");
                retry = true;
            }
        }
        if retry {
            // Retried from scratch: the Events of what failed are sent again if still due.
            emitted.clear();
        }
        tokio::select! {
            r = views.changed() => if r.is_err() { break },
            _ = changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(2)), if retry => {}
        }
    }
}

/// Deletes every object that names `node`: the speaker is being uninstalled, and nothing of
/// ferrolb may stay behind. An object another announcer rewrote meanwhile is left to it.
pub async fn delete_own(client: Client, namespace: &str, node: &str) -> Result<usize, kube::Error> {
    let api: Api<ServiceL2Status> = Api::namespaced(client, namespace);
    // Selected by the label, then by the full name: a hashed label may, in theory, be shared.
    let selector = format!("{NODE_LABEL}={}", node_label(node));
    let own = api.list(&kube::api::ListParams::default().labels(&selector)).await?;
    let mut deleted = 0;
    for o in own.items.iter().filter(|o| o.status.as_ref().is_some_and(|s| s.node == node)) {
        if delete_unchanged(&api, &o.name_any(), o.resource_version()).await? {
            deleted += 1;
        }
    }
    Ok(deleted)
}

/// Deletes the object if it is still at `resource_version`; `false` when it is gone already or
/// was rewritten (by a new announcer): then there is nothing of ours to delete.
async fn delete_unchanged(
    api: &Api<ServiceL2Status>,
    name: &str,
    resource_version: Option<String>,
) -> Result<bool, kube::Error> {
    let dp = DeleteParams { preconditions: Some(Preconditions { resource_version, uid: None }), ..Default::default() };
    match api.delete(name, &dp).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

async fn apply(
    api: &Api<ServiceL2Status>,
    recorder: &Recorder,
    services: &Store<Service>,
    namespace: &str,
    owner: Option<&OwnerReference>,
    op: Op,
) -> Result<(), kube::Error> {
    match op {
        Op::Write { service, status, event } => {
            let name = object_name(&service);
            let pp = PatchParams::apply(MANAGER).force();
            let mut object = json!({
                "apiVersion": "ferrolb.io/v1beta1",
                "kind": "ServiceL2Status",
                "metadata": {"name": name, "namespace": namespace, "labels": {
                    NODE_LABEL: node_label(&status.node),
                    SERVICE_NAME_LABEL: status.service_name,
                    SERVICE_NAMESPACE_LABEL: status.service_namespace,
                }},
                "spec": {},
            });
            // Owned by the speakers' DaemonSet: an uninstall takes the objects with it (the
            // garbage collector's work, which needs no permission of ours once we are gone).
            if let Some(o) = owner {
                object["metadata"]["ownerReferences"] = json!([o]);
            }
            api.patch(&name, &pp, &Patch::Apply(&object)).await?;
            let st = json!({"apiVersion": "ferrolb.io/v1beta1", "kind": "ServiceL2Status", "status": status});
            api.patch_status(&name, &pp, &Patch::Apply(&st)).await?;
            tracing::info!(service = %service, object = %name, "ServiceL2Status written");
            if event {
                let uid = services
                    .get(&ObjectRef::new(&status.service_name).within(&status.service_namespace))
                    .and_then(|s| s.metadata.uid.clone());
                let reference = ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Service".into()),
                    namespace: Some(status.service_namespace.clone()),
                    name: Some(status.service_name.clone()),
                    uid,
                    ..Default::default()
                };
                let ev = Event {
                    type_: EventType::Normal,
                    reason: NODE_ASSIGNED.into(),
                    note: Some(format!("announcing from node \"{}\" with protocol \"layer2\"", status.node)),
                    action: "Announce".into(),
                    secondary: None,
                };
                recorder.publish(&ev, &reference).await?;
            }
        }
        Op::Delete { name, resource_version } => {
            if delete_unchanged(api, &name, resource_version).await? {
                tracing::info!(object = %name, "ServiceL2Status deleted");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `namespace/name` as a key.
    fn key(s: &str) -> ServiceKey {
        let (namespace, name) = s.split_once('/').unwrap();
        ServiceKey::new(namespace, name)
    }

    fn obj(service: &str, node: &str, rv: &str) -> Arc<ServiceL2Status> {
        let (ns, name) = service.split_once('/').unwrap();
        let mut o = ServiceL2Status::new(&object_name(&key(service)), Default::default());
        o.metadata.resource_version = Some(rv.into());
        o.status = Some(ServiceL2StatusStatus {
            node: node.into(),
            service_name: name.into(),
            service_namespace: ns.into(),
            interfaces: vec![InterfaceInfo { name: "eth0".into() }],
        });
        Arc::new(o)
    }

    fn view(mine: &[&str], announced: &[&str], alive: &[&str]) -> View {
        View {
            mine: mine.iter().map(|s| (key(s), vec!["eth0".to_string()])).collect(),
            announced: announced.iter().map(|s| key(s)).collect(),
            alive: alive.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn writes(ops: &[Op]) -> Vec<(String, bool)> {
        ops.iter()
            .filter_map(|o| match o {
                Op::Write { service, event, .. } => Some((service.to_string(), *event)),
                Op::Delete { .. } => None,
            })
            .collect()
    }

    fn deletes(ops: &[Op]) -> Vec<String> {
        ops.iter()
            .filter_map(|o| match o {
                Op::Delete { name, .. } => Some(name.clone()),
                Op::Write { .. } => None,
            })
            .collect()
    }

    /// A valid label value: at most 63 characters, alphanumerics and `-_.`, alphanumeric at
    /// both ends (the API server's rule).
    fn is_label_value(v: &str) -> bool {
        v.len() <= 63
            && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && v.bytes().next().is_none_or(|b| b.is_ascii_alphanumeric())
            && v.bytes().last().is_none_or(|b| b.is_ascii_alphanumeric())
    }

    /// The longest node name the API server accepts: a DNS subdomain of 253 characters.
    fn longest_node(tail: char) -> String {
        let label = |c: char| std::iter::repeat_n(c, 63).collect::<String>();
        let name = format!("{}.{}.{}.{}", label('a'), label('b'), label('c'), label(tail));
        name[..253].to_string()
    }

    #[test]
    fn node_labels_fit_for_the_longest_node_names() {
        // Short names are kept as they are: existing objects and selectors keep working.
        assert_eq!(node_label("node-1"), "node-1");
        let n63 = "n".repeat(63);
        assert_eq!(node_label(&n63), n63);
        let long = longest_node('d');
        assert_eq!(long.len(), 253);
        let label = node_label(&long);
        assert!(is_label_value(&label), "{label}");
        assert!(label.starts_with("aaaa"), "{label}");
        // Stable, and different for a name that differs only at its end.
        assert_eq!(label, node_label(&long));
        assert_ne!(label, node_label(&longest_node('e')));
        // 64 characters, and a prefix cut just before a dot: still a valid value.
        let n64 = format!("{}.{}", "x".repeat(45), "y".repeat(18));
        assert!(is_label_value(&node_label(&n64)), "{}", node_label(&n64));
        // Events: the reporting instance fits 128.
        let instance = reporting_instance(&long);
        assert!(instance.len() <= 128 && instance.starts_with("aaaa"), "{instance}");
        assert_eq!(reporting_instance("node-1"), "node-1");
    }

    #[test]
    fn a_longest_node_name_is_written_whole_in_the_status() {
        let node = longest_node('d');
        let v = view(&["default/web"], &["default/web"], &[node.as_str()]);
        let ops = plan(&node, &v, &[], &mut BTreeSet::new());
        let Op::Write { status, .. } = &ops[0] else { panic!("{ops:?}") };
        assert_eq!(status.node, node);
        // And the object it wrote is recognised as its own when it stops announcing.
        let mut o = (*obj("default/web", &node, "4")).clone();
        o.metadata.labels = Some([(NODE_LABEL.to_string(), node_label(&node))].into());
        let v = view(&[], &["default/web"], &[node.as_str()]);
        assert_eq!(deletes(&plan(&node, &v, &[Arc::new(o)], &mut BTreeSet::new())), ["default.web"]);
    }

    #[test]
    fn object_names_are_namespace_dot_name() {
        assert_eq!(object_name(&key("default/web")), "default.web");
    }

    #[test]
    fn a_new_announcement_is_written_with_an_event_once() {
        let v = view(&["default/web"], &["default/web"], &["a", "b"]);
        let mut emitted = BTreeSet::new();
        let ops = plan("a", &v, &[], &mut emitted);
        assert_eq!(writes(&ops), [("default/web".to_string(), true)]);
        let Op::Write { status, .. } = &ops[0] else { panic!() };
        assert_eq!((status.node.as_str(), status.service_namespace.as_str()), ("a", "default"));
        // The store has not caught up yet: written again (a no-op apply), but no second Event.
        assert_eq!(writes(&plan("a", &v, &[], &mut emitted)), [("default/web".to_string(), false)]);
        // Caught up: nothing to do.
        assert!(plan("a", &v, &[obj("default/web", "a", "1")], &mut emitted).is_empty());
    }

    #[test]
    fn a_takeover_overwrites_the_old_node_with_an_event() {
        let v = view(&["default/web"], &["default/web"], &["b"]);
        let ops = plan("b", &v, &[obj("default/web", "a", "1")], &mut BTreeSet::new());
        assert_eq!(writes(&ops), [("default/web".to_string(), true)]);
        assert!(deletes(&ops).is_empty());
    }

    #[test]
    fn a_restarted_speaker_finding_its_own_object_sends_no_event() {
        let v = view(&["default/web"], &["default/web"], &["a"]);
        assert!(plan("a", &v, &[obj("default/web", "a", "1")], &mut BTreeSet::new()).is_empty());
    }

    #[test]
    fn losing_a_service_deletes_only_our_own_object() {
        let v = view(&[], &["default/web", "default/api"], &["a", "b"]);
        let objects = [obj("default/web", "a", "7"), obj("default/api", "b", "8")];
        let ops = plan("a", &v, &objects, &mut BTreeSet::new());
        assert_eq!(ops, [Op::Delete { name: "default.web".into(), resource_version: Some("7".into()) }]);
    }

    #[test]
    fn an_orphan_of_a_dead_speaker_is_deleted_by_anyone() {
        // b died while announcing api; nobody announces api now (no endpoints, say).
        let v = view(&[], &[], &["a"]);
        assert_eq!(deletes(&plan("a", &v, &[obj("default/api", "b", "3")], &mut BTreeSet::new())), ["default.api"]);
        // b is alive: its object is its own business.
        let v = view(&[], &[], &["a", "b"]);
        assert!(plan("a", &v, &[obj("default/api", "b", "3")], &mut BTreeSet::new()).is_empty());
        // Someone announces it: the new announcer overwrites it, nobody deletes it.
        let v = view(&[], &["default/api"], &["a"]);
        assert!(plan("a", &v, &[obj("default/api", "b", "3")], &mut BTreeSet::new()).is_empty());
    }

    #[test]
    fn changed_interfaces_are_rewritten_without_an_event() {
        let mut v = view(&["default/web"], &["default/web"], &["a"]);
        let mut emitted = BTreeSet::new();
        assert!(plan("a", &v, &[obj("default/web", "a", "1")], &mut emitted).is_empty());
        v.mine.insert(key("default/web"), vec!["eth0".into(), "eth1".into()]);
        assert_eq!(
            writes(&plan("a", &v, &[obj("default/web", "a", "1")], &mut emitted)),
            [("default/web".to_string(), false)]
        );
    }

    #[test]
    fn losing_and_retaking_sends_a_new_event() {
        let mut emitted = BTreeSet::new();
        let v = view(&["default/web"], &["default/web"], &["a", "b"]);
        plan("a", &v, &[], &mut emitted);
        plan("a", &view(&[], &["default/web"], &["a", "b"]), &[obj("default/web", "b", "2")], &mut emitted);
        let ops = plan("a", &v, &[obj("default/web", "b", "2")], &mut emitted);
        assert_eq!(writes(&ops), [("default/web".to_string(), true)]);
    }
}

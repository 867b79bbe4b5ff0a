//! From Kubernetes objects to the facts the election decides on. Pure: Nodes, Services and
//! EndpointSlices in, `NodeFacts` and `ServiceFacts` out.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ferrolb_api::annotations::IP_ALLOCATED_FROM_POOL;
use ferrolb_config::{ClassPolicy, EndpointState, ServiceKey};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::election::{NodeFacts, ServiceFacts};

/// The label EndpointSlices carry to name their Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What the election needs of a Node; `alive` is the membership's word on its speaker.
pub fn node_facts(node: &Node, alive: &BTreeSet<String>) -> NodeFacts {
    let name = node.metadata.name.clone().unwrap_or_default();
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status != "False"));
    NodeFacts {
        alive: alive.contains(&name),
        labels: node.metadata.labels.clone().unwrap_or_default(),
        ready,
        cordoned: node.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false),
        name,
    }
}

/// What the election needs of a Service of ours with addresses; `None` for any other.
/// `slices` may hold every EndpointSlice: only the Service's own are read.
pub fn service_facts<'a>(
    svc: &Service,
    class: &ClassPolicy,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
) -> Option<ServiceFacts> {
    if !class.serves(svc) {
        return None;
    }
    let ips: Vec<IpAddr> = svc
        .status
        .as_ref()?
        .load_balancer
        .as_ref()?
        .ingress
        .as_ref()?
        .iter()
        .filter_map(|i| i.ip.as_deref()?.parse().ok())
        .collect();
    if ips.is_empty() {
        return None;
    }
    let name = svc.metadata.name.as_deref().unwrap_or_default();
    let namespace = svc.metadata.namespace.as_deref().unwrap_or_default();
    let mut facts = ServiceFacts {
        key: ServiceKey::of(svc),
        ips,
        pool: svc.metadata.annotations.as_ref().and_then(|a| a.get(IP_ALLOCATED_FROM_POOL)).cloned(),
        local: svc.spec.as_ref().and_then(|s| s.external_traffic_policy.as_deref()) == Some("Local"),
        ..Default::default()
    };
    let own = slices.into_iter().filter(|s| {
        s.metadata.namespace.as_deref() == Some(namespace)
            && s.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)).map(String::as_str) == Some(name)
    });
    for slice in own {
        for ep in slice.endpoints.iter().flatten() {
            let Some(node) = ep.node_name.clone() else { continue };
            let state = EndpointState::of(ep.conditions.as_ref());
            if state.ready {
                facts.ready_nodes.insert(node);
            } else if state.serving_terminating() {
                facts.serving_terminating_nodes.insert(node);
            }
        }
    }
    Some(facts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, NodeSpec, ServiceSpec, ServiceStatus};
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn svc(name: &str, ip: &str, local: bool) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                annotations: Some([(IP_ALLOCATED_FROM_POOL.to_string(), "lan".to_string())].into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                type_: Some("LoadBalancer".into()),
                external_traffic_policy: Some(if local { "Local" } else { "Cluster" }.into()),
                ..Default::default()
            }),
            status: Some(ServiceStatus {
                load_balancer: Some(LoadBalancerStatus {
                    ingress: Some(vec![LoadBalancerIngress { ip: Some(ip.into()), ..Default::default() }]),
                }),
                ..Default::default()
            }),
        }
    }

    /// (node, ready, serving, terminating)
    type Ep<'a> = (&'a str, Option<bool>, Option<bool>, Option<bool>);

    fn slice(service: &str, eps: &[Ep<'_>]) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(format!("{service}-abc")),
                namespace: Some("default".into()),
                labels: Some([(SERVICE_NAME_LABEL.to_string(), service.to_string())].into()),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: Some(
                eps.iter()
                    .map(|(node, ready, serving, terminating)| Endpoint {
                        addresses: vec!["198.18.1.2".into()],
                        node_name: Some(node.to_string()),
                        conditions: Some(EndpointConditions {
                            ready: *ready,
                            serving: *serving,
                            terminating: *terminating,
                        }),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn endpoints_are_sorted_into_ready_and_serving_terminating_nodes() {
        let slices = [
            slice("web", &[("node-1", Some(true), None, None), ("node-2", Some(false), Some(true), Some(true))]),
            slice("web", &[("node-3", None, None, None), ("node-4", Some(false), Some(false), Some(true))]),
            slice("other", &[("node-9", Some(true), None, None)]),
        ];
        let f = service_facts(&svc("web", "192.0.2.200", true), &ClassPolicy::default(), &slices).unwrap();
        assert_eq!(f.key, ServiceKey::new("default", "web"));
        assert_eq!(f.ips, vec!["192.0.2.200".parse::<IpAddr>().unwrap()]);
        assert_eq!(f.pool.as_deref(), Some("lan"));
        assert!(f.local);
        assert_eq!(f.ready_nodes, BTreeSet::from(["node-1".to_string(), "node-3".to_string()]));
        assert_eq!(f.serving_terminating_nodes, BTreeSet::from(["node-2".to_string()]));
    }

    #[test]
    fn services_without_addresses_or_of_another_class_are_not_announced() {
        let mut no_ip = svc("web", "192.0.2.200", false);
        no_ip.status = None;
        assert!(service_facts(&no_ip, &ClassPolicy::default(), []).is_none());
        let mut other = svc("web", "192.0.2.200", false);
        if let Some(s) = other.spec.as_mut() {
            s.load_balancer_class = Some("example.com/other".into());
        }
        assert!(service_facts(&other, &ClassPolicy::default(), []).is_none());
    }

    #[test]
    fn node_facts_read_ready_cordon_and_liveness() {
        let node = Node {
            metadata: ObjectMeta { name: Some("node-1".into()), ..Default::default() },
            spec: Some(NodeSpec { unschedulable: Some(true), ..Default::default() }),
            status: None,
        };
        let f = node_facts(&node, &BTreeSet::from(["node-1".to_string()]));
        assert!(f.alive && f.cordoned && !f.ready);
    }
}

//! Reading a Service: is it ours, what does it ask for, what does its status say it holds.
//! Pure functions over `k8s_openapi` objects.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ferrolb_api::annotations;
use ferrolb_config::Family;
use k8s_openapi::api::core::v1::{Service, ServiceSpec};

use crate::allocator::{FamilyPolicy, PortKey, Request, ServiceKey};

pub use ferrolb_config::ClassPolicy;

pub fn key(svc: &Service) -> ServiceKey {
    ServiceKey::of(svc)
}

/// A `type: LoadBalancer` Service of our class (or of none, unless the class is required).
pub fn is_ours(svc: &Service, policy: &ClassPolicy) -> bool {
    policy.serves(svc)
}

/// The addresses the Service's status says it holds, in order.
pub fn status_ips(svc: &Service) -> Vec<IpAddr> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_deref()?.parse().ok())
        .collect()
}

/// Sets the Service's status to hold `ips` (`ipMode: VIP`), as the API server does with the
/// controller's status write: the inverse of [`status_ips`].
pub fn set_status_ips(svc: &mut Service, ips: &[IpAddr]) {
    use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus};
    let ingress: Vec<LoadBalancerIngress> = ips
        .iter()
        .map(|ip| LoadBalancerIngress { ip: Some(ip.to_string()), ip_mode: Some("VIP".into()), ..Default::default() })
        .collect();
    let status = svc.status.get_or_insert_with(Default::default);
    status.load_balancer = Some(LoadBalancerStatus { ingress: (!ingress.is_empty()).then_some(ingress) });
}

fn family_of_name(s: &str) -> Option<Family> {
    match s {
        "IPv4" => Some(Family::V4),
        "IPv6" => Some(Family::V6),
        _ => None,
    }
}

/// What the Service asks for; `Err` says what is wrong with it, for an Event.
pub fn request(svc: &Service, namespace_labels: &BTreeMap<String, String>) -> Result<Request, String> {
    // Borrowed, not copied: every pass asks this of every Service.
    let default_spec = ServiceSpec::default();
    let spec = svc.spec.as_ref().unwrap_or(&default_spec);
    let no_annotations = BTreeMap::new();
    let ann = svc.metadata.annotations.as_ref().unwrap_or(&no_annotations);

    let mut families: Vec<Family> = spec.ip_families.iter().flatten().filter_map(|f| family_of_name(f)).collect();
    if families.is_empty() {
        families.push(Family::V4);
    }
    let policy = spec.ip_family_policy.as_deref().unwrap_or("SingleStack");
    let families = FamilyPolicy { families, require_all: policy != "PreferDualStack" };

    let mut ips = Vec::new();
    if let Some((name, value)) = annotations::LOAD_BALANCER_IPS.find(ann) {
        for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let ip: IpAddr = part.parse().map_err(|_| {
                format!("annotation {name}: {part:?} is not an IP address (want a comma list, one per family)")
            })?;
            ips.push(ip);
        }
    } else if let Some(v) = spec.load_balancer_ip.as_deref().filter(|v| !v.is_empty()) {
        let ip: IpAddr = v.trim().parse().map_err(|_| format!("spec.loadBalancerIP: {v:?} is not an IP address"))?;
        ips.push(ip);
    }

    let ports: BTreeSet<PortKey> = spec
        .ports
        .iter()
        .flatten()
        .map(|p| PortKey { protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()), port: p.port })
        .collect();

    Ok(Request {
        key: key(svc),
        families,
        ips,
        pool: annotations::ADDRESS_POOL.value(ann).map(|v| v.trim().to_string()).filter(|v| !v.is_empty()),
        sharing_key: annotations::ALLOW_SHARED_IP.value(ann).map(|v| v.trim().to_string()).filter(|v| !v.is_empty()),
        shared_namespaces: ann
            .get(annotations::ALLOW_SHARED_IP_NAMESPACES)
            .map(|v| v.split(',').map(str::trim).filter(|n| !n.is_empty()).map(String::from).collect())
            .unwrap_or_default(),
        ports,
        local: spec.external_traffic_policy.as_deref() == Some("Local"),
        selector: spec.selector.clone().unwrap_or_default(),
        namespace_labels: namespace_labels.clone(),
        labels: svc.metadata.labels.clone().unwrap_or_default(),
    })
}

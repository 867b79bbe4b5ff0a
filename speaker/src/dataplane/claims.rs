//! Who may use which destination: a Service's `externalIPs` never take an address that belongs to
//! another Service. Pure.
//!
//! ```text
//!   every Service's ClusterIPs and LoadBalancer IPs ──> owned addresses (whole address, any port)
//!   externalIPs, Services oldest first (creationTimestamp, then namespace/name):
//!     outside --external-ip-cidrs ─────────────────────> left out, ExternalIPNotAllowed
//!     another Service's ClusterIP or LB IP ──────────────> left out, ExternalIPConflict
//!     address . protocol . port taken by an older one ───> left out, ExternalIPConflict
//!     otherwise ─────────────────────────────────────────> kept, its ports taken
//! ```
//!
//! Any tenant may write any address into `spec.externalIPs`, and every node then captures it: a
//! Service in one namespace listing kube-dns's ClusterIP would take DNS from the whole cluster.
//! Addresses the API server or the LoadBalancer controller gave out are not the tenant's to take,
//! so they always win; between two externalIPs, the first to exist keeps it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use k8s_openapi::jiff::Timestamp;

use super::model::{Family, Protocol, ServiceKey, ServiceModel, Warning};

/// The Event reason for an externalIP left out because another Service has it.
pub const EXTERNAL_IP_CONFLICT: &str = "ExternalIPConflict";
/// The Event reason for an externalIP outside the speaker's `--external-ip-cidrs`.
pub const EXTERNAL_IP_NOT_ALLOWED: &str = "ExternalIPNotAllowed";

/// What an owned address is to its owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    ClusterIp,
    LoadBalancerIp,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::ClusterIp => "ClusterIP",
            Role::LoadBalancerIp => "LoadBalancer IP",
        }
    }
}

/// Leaves out of `services` (the model being built) every externalIP it may not use, and says
/// why: `cluster` is every Service of the cluster (owners of ClusterIPs and LoadBalancer IPs, and
/// the creation times that order claims), `allowed` the CIDRs externalIPs must lie in (empty:
/// any, as kube-proxy).
pub fn settle_external_ips<'a>(
    services: &mut BTreeMap<ServiceKey, ServiceModel>,
    cluster: impl IntoIterator<Item = &'a Service>,
    allowed: &[IpNetwork],
) -> Vec<Warning> {
    let mut owners = Owners::default();
    for svc in cluster {
        if let (Some(namespace), Some(name)) = (svc.metadata.namespace.as_deref(), svc.metadata.name.as_deref()) {
            owners.set(&ServiceKey::new(namespace, name), Some(svc));
        }
    }
    owners.settle(services, allowed)
}

/// The addresses Services own (ClusterIPs, LoadBalancer IPs) and their ages: what settling
/// externalIPs reads of every Service, kept up to date one Service at a time.
#[derive(Debug, Default)]
pub struct Owners {
    owners: BTreeMap<IpAddr, BTreeMap<ServiceKey, Role>>,
    /// Each Service's creation time, and what it owns.
    services: BTreeMap<ServiceKey, (Option<Timestamp>, Owned)>,
}

impl Owners {
    /// Records `svc` as Service `key` now is (`None`: gone).
    pub fn set(&mut self, key: &ServiceKey, svc: Option<&Service>) {
        if let Some((_, owned)) = self.services.remove(key) {
            for (ip, _) in owned {
                if let Some(roles) = self.owners.get_mut(&ip) {
                    roles.remove(key);
                    if roles.is_empty() {
                        self.owners.remove(&ip);
                    }
                }
            }
        }
        let Some(svc) = svc else { return };
        let owned = owned(svc);
        for (ip, role) in &owned {
            let roles = self.owners.entry(*ip).or_default();
            let r = roles.entry(key.clone()).or_insert(*role);
            *r = (*r).min(*role);
        }
        self.services.insert(key.clone(), (svc.metadata.creation_timestamp.as_ref().map(|t| t.0), owned));
    }

    /// [`settle_external_ips`] with these owners.
    pub fn settle(&self, services: &mut BTreeMap<ServiceKey, ServiceModel>, allowed: &[IpNetwork]) -> Vec<Warning> {
        let owners = &self.owners;
        // Oldest first; a Service without a creation time (never from the API server) comes last.
        let mut order: Vec<ServiceKey> =
            services.iter().filter(|(_, s)| !s.external_ips.is_empty()).map(|(k, _)| k.clone()).collect();
        order.sort_by_cached_key(|k| {
            let t = self.services.get(k).and_then(|(t, _)| *t);
            (t.is_none(), t, k.clone())
        });

        let mut taken: BTreeMap<(IpAddr, Protocol, u16), ServiceKey> = BTreeMap::new();
        let mut warnings = Vec::new();
        for key in order {
            let Some(svc) = services.get_mut(&key) else { continue };
            let ports: BTreeSet<(Protocol, u16)> = svc.ports.iter().map(|p| (p.proto, p.port)).collect();
            let (mut not_allowed, mut conflicts) = (Vec::new(), Vec::new());
            let mut kept = Vec::new();
            for ip in std::mem::take(&mut svc.external_ips) {
                if !allowed.is_empty() && !allowed.iter().any(|n| n.contains(ip)) {
                    not_allowed.push(ip.to_string());
                    continue;
                }
                let mine = owners.get(&ip).is_some_and(|o| o.contains_key(&key));
                let other_owner = owners.get(&ip).and_then(|o| o.iter().find(|(k, _)| **k != key));
                if let (false, Some((owner, role))) = (mine, other_owner) {
                    conflicts.push(format!(
                        "{ip} is the {} of Service {owner} (remove it from spec.externalIPs)",
                        role.as_str()
                    ));
                    continue;
                }
                let clash = ports.iter().find_map(|(proto, port)| {
                    taken.get(&(ip, *proto, *port)).filter(|k| **k != key).map(|k| (k, proto, port))
                });
                if let Some((older, proto, port)) = clash {
                    conflicts.push(format!(
                        "{ip} {proto}/{port} is already an externalIP of Service {older}, which is older \
                     (use another address or port)"
                    ));
                    continue;
                }
                for (proto, port) in &ports {
                    taken.insert((ip, *proto, *port), key.clone());
                }
                kept.push(ip);
            }
            svc.external_ips = kept;
            if !conflicts.is_empty() {
                let message =
                    format!("externalIP left out, this Service does not receive its traffic: {}", conflicts.join("; "));
                warnings.push(Warning { service: key.clone(), reason: EXTERNAL_IP_CONFLICT, message });
            }
            if !not_allowed.is_empty() {
                let list: Vec<String> = allowed.iter().map(ToString::to_string).collect();
                let message = format!(
                    "externalIP {} left out: the cluster's ferrolb honours externalIPs only within {} \
                 (ask the cluster's administrators for an address there, or use a LoadBalancer Service)",
                    not_allowed.join(", "),
                    list.join(", ")
                );
                warnings.push(Warning { service: key, reason: EXTERNAL_IP_NOT_ALLOWED, message });
            }
        }
        warnings
    }
}

/// What a Service owns, by address.
type Owned = Vec<(IpAddr, Role)>;

/// The ClusterIPs and LoadBalancer IPs of `svc`, whatever their ipMode or the Service's type.
fn owned(svc: &Service) -> Vec<(IpAddr, Role)> {
    let mut out = Vec::new();
    if let Some(spec) = &svc.spec {
        let listed = spec.cluster_ips.iter().flatten().chain(spec.cluster_ip.iter());
        out.extend(listed.filter_map(|s| s.parse().ok()).map(|ip| (ip, Role::ClusterIp)));
    }
    let ingress = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|lb| lb.ingress.as_ref());
    out.extend(
        ingress
            .into_iter()
            .flatten()
            .filter_map(|i| i.ip.as_deref()?.parse().ok())
            .map(|ip| (ip, Role::LoadBalancerIp)),
    );
    out
}

/// The service CIDRs of `family` in the cluster's `ServiceCIDR` objects (every CIDR of every
/// object, as kube-proxy takes them; unreadable ones skipped), sorted.
pub fn service_cidrs<'a>(objects: impl IntoIterator<Item = &'a ServiceCIDR>, family: Family) -> Vec<IpNetwork> {
    let mut nets: Vec<IpNetwork> = objects
        .into_iter()
        .filter_map(|o| o.spec.as_ref()?.cidrs.as_ref())
        .flatten()
        .filter_map(|c| c.trim().parse::<IpNetwork>().ok())
        .filter(|n| Family::of(&n.ip()) == family)
        .map(|n| IpNetwork::new(n.network(), n.prefix()).unwrap_or(n))
        .collect();
    nets.sort();
    nets.dedup();
    nets
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, ServiceSpec, ServiceStatus};
    use k8s_openapi::api::networking::v1::ServiceCIDRSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    use super::super::model::PortModel;
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A Service created at second `created`, with a ClusterIP, externalIPs and LB IPs.
    fn service(key: &str, created: i64, cluster_ip: &str, external: &[&str], lb: &[&str]) -> Service {
        let (namespace, name) = key.split_once('/').unwrap();
        Service {
            metadata: ObjectMeta {
                namespace: Some(namespace.into()),
                name: Some(name.into()),
                creation_timestamp: Some(Time(k8s_openapi::jiff::Timestamp::from_second(created).unwrap())),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some(cluster_ip.into()),
                cluster_ips: Some(vec![cluster_ip.into()]),
                external_ips: Some(external.iter().map(ToString::to_string).collect()),
                ..Default::default()
            }),
            status: Some(ServiceStatus {
                load_balancer: Some(LoadBalancerStatus {
                    ingress: Some(
                        lb.iter()
                            .map(|i| LoadBalancerIngress { ip: Some(i.to_string()), ..Default::default() })
                            .collect(),
                    ),
                }),
                ..Default::default()
            }),
        }
    }

    /// The model of `svc` with TCP port `port` (what the source would build).
    fn model_of(svc: &Service, ports: &[u16]) -> (ServiceKey, ServiceModel) {
        let key = ServiceKey::new(svc.metadata.namespace.clone().unwrap(), svc.metadata.name.clone().unwrap());
        let spec = svc.spec.as_ref().unwrap();
        let m = ServiceModel {
            cluster_ips: spec.cluster_ips.iter().flatten().map(|s| ip(s)).collect(),
            external_ips: spec.external_ips.iter().flatten().map(|s| ip(s)).collect(),
            ports: ports
                .iter()
                .map(|p| PortModel {
                    name: String::new(),
                    proto: Protocol::Tcp,
                    port: *p,
                    node_port: None,
                    endpoints: vec![],
                })
                .collect(),
            ..Default::default()
        };
        (key, m)
    }

    fn settle(cluster: &[(Service, &[u16])], allowed: &[&str]) -> (BTreeMap<ServiceKey, ServiceModel>, Vec<Warning>) {
        let mut models: BTreeMap<ServiceKey, ServiceModel> = cluster.iter().map(|(s, p)| model_of(s, p)).collect();
        let allowed: Vec<IpNetwork> = allowed.iter().map(|n| n.parse().unwrap()).collect();
        let w = settle_external_ips(&mut models, cluster.iter().map(|(s, _)| s), &allowed);
        (models, w)
    }

    fn external(models: &BTreeMap<ServiceKey, ServiceModel>, key: &str) -> Vec<String> {
        let (ns, name) = key.split_once('/').unwrap();
        models[&ServiceKey::new(ns, name)].external_ips.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn an_external_ip_never_takes_another_services_cluster_ip() {
        // The victim is younger: a ClusterIP wins whatever the age.
        let dns = service("kube-system/kube-dns", 200, "198.19.0.10", &[], &[]);
        let thief = service("a/thief", 100, "198.19.0.50", &["198.19.0.10", "203.0.113.7"], &[]);
        let (models, w) = settle(&[(dns, &[53]), (thief, &[53])], &[]);
        assert_eq!(external(&models, "a/thief"), ["203.0.113.7"], "the other address is kept");
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].service, ServiceKey::new("a", "thief"));
        assert_eq!(w[0].reason, EXTERNAL_IP_CONFLICT);
        assert!(
            w[0].message.contains("198.19.0.10 is the ClusterIP of Service kube-system/kube-dns"),
            "{}",
            w[0].message
        );
        assert!(w[0].message.contains("spec.externalIPs"), "{}", w[0].message);
    }

    #[test]
    fn an_external_ip_never_takes_another_services_load_balancer_ip_on_any_port() {
        let web = service("b/web", 200, "198.19.0.20", &[], &["192.0.2.200"]);
        let thief = service("a/thief", 100, "198.19.0.50", &["192.0.2.200"], &[]);
        let (models, w) = settle(&[(web, &[80]), (thief, &[8080])], &[]);
        assert!(external(&models, "a/thief").is_empty());
        assert!(w[0].message.contains("LoadBalancer IP of Service b/web"), "{}", w[0].message);
    }

    #[test]
    fn a_services_own_addresses_are_not_a_conflict() {
        let own = service("a/web", 100, "198.19.0.20", &["192.0.2.200"], &["192.0.2.200"]);
        let (models, w) = settle(&[(own, &[80])], &[]);
        assert_eq!(external(&models, "a/web"), ["192.0.2.200"]);
        assert!(w.is_empty());
    }

    #[test]
    fn between_two_external_ips_on_one_port_the_older_service_wins() {
        // Names would order them the other way round: age decides, not names.
        let young = service("a/first", 300, "198.19.0.1", &["203.0.113.7"], &[]);
        let old = service("z/last", 100, "198.19.0.2", &["203.0.113.7"], &[]);
        let (models, w) = settle(&[(young, &[80, 443]), (old, &[80])], &[]);
        assert_eq!(external(&models, "z/last"), ["203.0.113.7"]);
        assert!(external(&models, "a/first").is_empty());
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].service, ServiceKey::new("a", "first"));
        assert!(
            w[0].message.contains("203.0.113.7 tcp/80 is already an externalIP of Service z/last"),
            "{}",
            w[0].message
        );
    }

    #[test]
    fn equal_ages_fall_back_to_namespace_and_name_and_other_ports_share() {
        let a = service("a/one", 100, "198.19.0.1", &["203.0.113.7"], &[]);
        let b = service("b/two", 100, "198.19.0.2", &["203.0.113.7"], &[]);
        let c = service("c/three", 100, "198.19.0.3", &["203.0.113.7"], &[]);
        let (models, w) = settle(&[(b, &[80]), (a, &[80]), (c, &[81])], &[]);
        assert_eq!(external(&models, "a/one"), ["203.0.113.7"]);
        assert!(external(&models, "b/two").is_empty());
        assert_eq!(external(&models, "c/three"), ["203.0.113.7"], "another port of the same address is free");
        assert_eq!(w.iter().map(|w| w.service.to_string()).collect::<Vec<_>>(), ["b/two"]);
    }

    #[test]
    fn external_ips_outside_the_allowed_cidrs_are_left_out() {
        let s = service("a/web", 100, "198.19.0.1", &["203.0.113.7", "198.51.100.9"], &[]);
        let (models, w) = settle(&[(s.clone(), &[80])], &["203.0.113.0/24"]);
        assert_eq!(external(&models, "a/web"), ["203.0.113.7"]);
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].reason, EXTERNAL_IP_NOT_ALLOWED);
        assert!(w[0].message.contains("198.51.100.9") && w[0].message.contains("203.0.113.0/24"), "{}", w[0].message);
        let (models, w) = settle(&[(s, &[80])], &[]);
        assert_eq!(external(&models, "a/web").len(), 2, "no list: every address, as kube-proxy");
        assert!(w.is_empty());
    }

    #[test]
    fn a_refused_claim_takes_nothing() {
        // The oldest claims a ClusterIP it may not have: the next one still gets the port.
        let dns = service("kube-system/kube-dns", 300, "198.19.0.10", &[], &[]);
        let s1 = service("a/one", 100, "198.19.0.1", &["198.19.0.10"], &[]);
        let s2 = service("b/two", 200, "198.19.0.2", &["203.0.113.7"], &[]);
        let s3 = service("c/three", 250, "198.19.0.3", &["203.0.113.7"], &[]);
        let (models, w) = settle(&[(dns, &[53]), (s1, &[53]), (s2, &[53]), (s3, &[53])], &[]);
        assert_eq!(external(&models, "b/two"), ["203.0.113.7"]);
        let warned: Vec<String> = w.iter().map(|w| w.service.to_string()).collect();
        assert_eq!(warned, ["a/one", "c/three"]);
    }

    #[test]
    fn service_cidrs_of_one_family_from_every_object() {
        let obj = |cidrs: &[&str]| ServiceCIDR {
            metadata: ObjectMeta::default(),
            spec: Some(ServiceCIDRSpec { cidrs: Some(cidrs.iter().map(ToString::to_string).collect()) }),
            status: None,
        };
        let objects = [obj(&["198.19.0.0/16", "2001:db8:ff::/112"]), obj(&["198.18.200.0/24", "garbage"]), obj(&[])];
        let v4: Vec<String> = service_cidrs(&objects, Family::V4).iter().map(ToString::to_string).collect();
        assert_eq!(v4, ["198.18.200.0/24", "198.19.0.0/16"]);
        let v6: Vec<String> = service_cidrs(&objects, Family::V6).iter().map(ToString::to_string).collect();
        assert_eq!(v6, ["2001:db8:ff::/112"]);
    }
}

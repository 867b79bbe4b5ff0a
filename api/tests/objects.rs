//! The types read objects as the API server returns them (shapes taken from a v1.36 API server
//! with the generated CRDs installed: defaults filled in, `spec: {}` added where it was left out).

use ferrolb_api::{
    CONDITION_VALID, IPAddressPool, InterfaceInfo, L2Advertisement, L2AdvertisementSpec, ServiceL2Status,
};
use serde_json::json;

#[test]
fn reads_a_pool_with_defaults_and_status() {
    let pool: IPAddressPool = serde_json::from_value(json!({
        "apiVersion": "ferrolb.io/v1beta1",
        "kind": "IPAddressPool",
        "metadata": {"name": "demo", "namespace": "ferrolb-system", "creationTimestamp": "2026-11-27T22:21:03Z"},
        "spec": {
            "addresses": ["192.0.2.200-192.0.2.250", "2001:db8:1::c8-2001:db8:1::fa"],
            "autoAssign": true,
            "avoidBuggyIPs": false
        },
        "status": {
            "assignedIPv4": 2, "assignedIPv6": 1, "availableIPv4": 49, "availableIPv6": 50,
            "conditions": [{
                "lastTransitionTime": "2026-01-01T00:00:00Z", "message": "", "reason": "Accepted",
                "status": "True", "type": "Valid"
            }]
        }
    }))
    .expect("pool parses");
    assert_eq!(pool.spec.addresses.len(), 2);
    assert_eq!((pool.spec.auto_assign, pool.spec.avoid_buggy_ips), (Some(true), Some(false)));
    let status = pool.status.expect("status");
    assert_eq!(
        (status.assigned_ipv4, status.assigned_ipv6, status.available_ipv4, status.available_ipv6),
        (2, 1, 49, 50)
    );
    assert_eq!(status.conditions.expect("conditions")[0].type_, CONDITION_VALID);
}

#[test]
fn writes_metallb_field_names() {
    let mut pool = IPAddressPool::new(
        "demo",
        ferrolb_api::IPAddressPoolSpec {
            addresses: vec!["192.0.2.0/24".to_string()],
            avoid_buggy_ips: Some(true),
            ..Default::default()
        },
    );
    pool.status = Some(ferrolb_api::IPAddressPoolStatus { assigned_ipv4: 3, ..Default::default() });
    let value = serde_json::to_value(&pool).expect("json");
    assert_eq!(value["apiVersion"], "ferrolb.io/v1beta1");
    assert_eq!(value["spec"], json!({"addresses": ["192.0.2.0/24"], "avoidBuggyIPs": true}));
    assert_eq!(
        value["status"],
        json!({"assignedIPv4": 3, "assignedIPv6": 0, "availableIPv4": 0, "availableIPv6": 0}),
        "counts are always written, so a server-side apply of status owns all four"
    );
}

#[test]
fn reads_advertisements_with_and_without_fields() {
    let all: L2Advertisement = serde_json::from_value(json!({
        "apiVersion": "ferrolb.io/v1beta1", "kind": "L2Advertisement",
        "metadata": {"name": "all", "namespace": "ferrolb-system"},
        "spec": {}
    }))
    .expect("empty advertisement parses");
    assert_eq!(all.spec, L2AdvertisementSpec::default());

    let some: L2Advertisement = serde_json::from_value(json!({
        "apiVersion": "ferrolb.io/v1beta1", "kind": "L2Advertisement",
        "metadata": {"name": "some", "namespace": "ferrolb-system"},
        "spec": {
            "ipAddressPools": ["demo"],
            "ipAddressPoolSelectors": [{"matchLabels": {"announce": "l2"}}],
            "nodeSelectors": [{"matchExpressions": [{"key": "edge", "operator": "Exists"}]}],
            "interfaces": ["eth0"]
        }
    }))
    .expect("advertisement parses");
    assert_eq!(some.spec.ip_address_pools, Some(vec!["demo".to_string()]));
    assert_eq!(some.spec.ip_address_pool_selectors.as_ref().map(Vec::len), Some(1));
    assert_eq!(some.spec.node_selectors.as_ref().map(Vec::len), Some(1));
    assert_eq!(some.spec.interfaces, Some(vec!["eth0".to_string()]));
    assert_eq!(serde_json::to_value(&some.spec).expect("json")["ipAddressPools"], json!(["demo"]));
}

#[test]
fn reads_and_writes_service_l2_status() {
    let object: ServiceL2Status = serde_json::from_value(json!({
        "apiVersion": "ferrolb.io/v1beta1", "kind": "ServiceL2Status",
        "metadata": {"name": "l2-web", "namespace": "ferrolb-system"},
        "spec": {},
        "status": {"interfaces": [{"name": "eth0"}], "node": "node-1", "serviceName": "web", "serviceNamespace": "default"}
    }))
    .expect("ServiceL2Status parses");
    let status = object.status.as_ref().expect("status");
    assert_eq!(
        (status.node.as_str(), status.service_name.as_str(), status.service_namespace.as_str()),
        ("node-1", "web", "default")
    );
    assert_eq!(status.interfaces, [InterfaceInfo { name: "eth0".to_string() }]);
    let value = serde_json::to_value(&object).expect("json");
    assert_eq!(value["spec"], json!({}));
    assert_eq!(value["status"]["serviceNamespace"], "default");
}

//! What the generated schemas let through at admission, checked without an API server: the CEL
//! rules are evaluated by `kube-cel`, a Rust implementation of the Kubernetes CEL libraries.

use ferrolb_api::{IPAddressPool, L2Advertisement, ServiceL2Status};
use kube::CustomResourceExt;
use serde_json::{Value, json};

fn schema<K: CustomResourceExt>() -> Value {
    let crd = K::crd();
    let schema = crd.spec.versions[0].schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref()).expect("a schema");
    serde_json::to_value(schema).expect("schema as JSON")
}

fn pool_with(addresses: &[&str]) -> Value {
    json!({
        "apiVersion": "ferrolb.io/v1beta1",
        "kind": "IPAddressPool",
        "metadata": {"name": "p", "namespace": "ferrolb-system"},
        "spec": {"addresses": addresses},
    })
}

/// The admission errors for a pool with `addresses`, as `field: message` lines.
fn pool_errors(addresses: &[&str]) -> Vec<String> {
    match kube_cel::Validator::new().validate(&schema::<IPAddressPool>(), &pool_with(addresses), None) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.iter().map(|e| format!("{}: {}", e.field_path, e.message)).collect(),
    }
}

#[test]
fn accepts_cidrs_ips_and_ranges_of_both_families() {
    for address in [
        "192.0.2.0/24",
        "192.0.2.7/24", // host bits are allowed: the whole network is meant
        "192.0.2.7/32",
        "192.0.2.7",
        "192.0.2.200-192.0.2.250",
        "192.0.2.200 - 192.0.2.250",
        "2001:db8:1::/64",
        "2001:db8:1::c8-2001:db8:1::fa",
        "2001:db8:1::c8",
    ] {
        assert_eq!(pool_errors(&[address]), Vec::<String>::new(), "{address} should be admitted");
    }
}

#[test]
fn refuses_what_is_no_address() {
    for address in [
        "192.0.2.300/24",
        "192.0.2.0/33",
        "192.0.2.0/",
        "lan",
        "",
        "192.0.2.200-",
        "192.0.2.200-192.0.2.250-192.0.2.251",
        "192.0.2.200-2001:db8::1", // one range, two families
        "192.0.2.200..192.0.2.250",
    ] {
        let errors = pool_errors(&[address]);
        assert_eq!(errors.len(), 1, "{address:?} should be refused once: {errors:?}");
        assert!(errors[0].contains("must be a CIDR"), "{address:?}: {errors:?}");
    }
}

#[test]
fn the_error_names_the_bad_entry() {
    let errors = pool_errors(&["192.0.2.0/24", "192.0.2.300", "2001:db8::/64"]);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].starts_with("spec.addresses[1]"), "{errors:?}");
}

#[test]
fn address_list_bounds_are_in_the_schema() {
    // minItems/maxItems are checked by the API server's OpenAPI validation, not by CEL.
    let addresses = &schema::<IPAddressPool>()["properties"]["spec"]["properties"]["addresses"];
    assert_eq!(addresses["minItems"], 1);
    assert!(addresses["maxItems"].as_u64().is_some(), "CEL cost estimation needs a bound: {addresses}");
    assert!(addresses["items"]["maxLength"].as_u64().is_some(), "CEL cost estimation needs a bound: {addresses}");
    assert_eq!(schema::<IPAddressPool>()["properties"]["spec"]["required"], json!(["addresses"]));
}

#[test]
fn defaults_match_metallb() {
    let spec = &schema::<IPAddressPool>()["properties"]["spec"]["properties"];
    assert_eq!(spec["autoAssign"]["default"], true);
    assert_eq!(spec["avoidBuggyIPs"]["default"], false);
    // MetalLB manifests may leave out the spec of these kinds.
    assert_eq!(schema::<L2Advertisement>()["properties"]["spec"]["default"], json!({}));
    assert_eq!(schema::<ServiceL2Status>()["properties"]["spec"]["default"], json!({}));
}

#[test]
fn conditions_merge_by_type() {
    let conditions = &schema::<IPAddressPool>()["properties"]["status"]["properties"]["conditions"];
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
    assert_eq!(conditions["x-kubernetes-list-map-keys"], json!(["type"]));
}

//! `IPAddressPool`: the addresses ferrolb may hand out, and to which services.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// The condition type the controller sets on every pool: `True` when the pool is in use, `False`
/// with a message naming the offending address when it was rejected (malformed, overlapping, ...).
pub const CONDITION_VALID: &str = "Valid";

/// The admission rule for one entry of `spec.addresses`: a CIDR (`192.0.2.0/24`), a single IP, or a
/// `first-last` range of two IPs of one family (spaces around `-` allowed).
///
/// It catches typos at `kubectl apply`; what needs the whole pool or other pools (a reversed range,
/// an overlap) is checked by `ferrolb-config` and reported in the `Valid` condition.
/// Uses the Kubernetes CEL IP/CIDR library (`isIP`, `isCIDR`, `ip`) and the strings extension
/// (`split`, `trim`), all available to CRD validation since Kubernetes 1.31.
pub const ADDRESS_RULE: &str = "isIP(self) || isCIDR(self) || (self.split('-').size() == 2 \
     && isIP(self.split('-')[0].trim()) && isIP(self.split('-')[1].trim()) \
     && ip(self.split('-')[0].trim()).family() == ip(self.split('-')[1].trim()).family())";

/// What `kubectl apply` prints when [`ADDRESS_RULE`] fails.
pub const ADDRESS_RULE_MESSAGE: &str = "must be a CIDR (192.0.2.0/24), an IP address, or a range of two \
     IP addresses of one family (192.0.2.200-192.0.2.250)";

/// Bounds on `spec.addresses`. Kubernetes refuses a CRD whose CEL rules have an unbounded estimated
/// cost, so the list and its strings need a maximum size; these are far above any real pool (the
/// longest valid entry, a range of two fully written-out IPv6 addresses, is under 100 characters).
const MAX_ADDRESSES: u32 = 1000;
const MAX_ADDRESS_LEN: u32 = 128;

/// The addresses of the pool and which services may use them.
// Clippy takes the repeated `type_ = "string"` of the printer columns for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "ferrolb.io",
    version = "v1beta1",
    kind = "IPAddressPool",
    namespaced,
    status = "IPAddressPoolStatus",
    derive = "PartialEq",
    category = "ferrolb",
    doc = "IPAddressPool is a set of IP addresses that ferrolb may assign to LoadBalancer services.",
    printcolumn(name = "Addresses", type_ = "string", json_path = ".spec.addresses"),
    printcolumn(name = "Auto Assign", type_ = "boolean", json_path = ".spec.autoAssign"),
    printcolumn(name = "Avoid Buggy IPs", type_ = "boolean", json_path = ".spec.avoidBuggyIPs"),
    printcolumn(name = "IPv4 In Use", type_ = "integer", json_path = ".status.assignedIPv4"),
    printcolumn(name = "IPv6 In Use", type_ = "integer", json_path = ".status.assignedIPv6"),
    printcolumn(name = "IPv4 Available", type_ = "integer", json_path = ".status.availableIPv4"),
    printcolumn(name = "IPv6 Available", type_ = "integer", json_path = ".status.availableIPv6"),
    printcolumn(name = "Valid", type_ = "string", json_path = r#".status.conditions[?(@.type=="Valid")].status"#),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct IPAddressPoolSpec {
    /// The addresses of the pool: CIDRs (192.0.2.0/24), single IPs, or first-last ranges
    /// (192.0.2.200-192.0.2.250), IPv4 and IPv6. Entries may overlap each other but not another pool.
    #[schemars(schema_with = "address_list")]
    pub addresses: Vec<String>,

    /// Whether services that ask for no particular pool or address may get addresses from this pool.
    /// Set it to false to keep a pool for services that name it. Defaults to true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = true))]
    pub auto_assign: Option<bool>,

    /// Skip IPv4 addresses ending in .0 or .255, which some old network equipment drops as
    /// network or broadcast addresses. Defaults to false.
    #[serde(rename = "avoidBuggyIPs", default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = false))]
    pub avoid_buggy_ips: Option<bool>,

    /// Limits which services may get addresses from this pool, and in which order pools are tried.
    /// Unset: any service may.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_allocation: Option<ServiceAllocation>,
}

/// Which services may take addresses from a pool, and how the pool ranks against others.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAllocation {
    /// Pools with a lower number are tried first; pools without a priority are tried after all
    /// pools with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,

    /// Namespaces whose services may use the pool (in addition to those matched by
    /// namespaceSelectors). Unset with no namespaceSelectors: any namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<Vec<String>>,

    /// Namespaces, by label, whose services may use the pool (in addition to those listed in
    /// namespaces).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selectors: Option<Vec<LabelSelector>>,

    /// Services, by label, that may use the pool; a service must match at least one. Unset: any
    /// service in an allowed namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_selectors: Option<Vec<LabelSelector>>,
}

/// What the controller observed about a pool.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IPAddressPoolStatus {
    /// IPv4 addresses of the pool assigned to services.
    #[serde(rename = "assignedIPv4", default)]
    pub assigned_ipv4: i64,

    /// IPv6 addresses of the pool assigned to services.
    #[serde(rename = "assignedIPv6", default)]
    pub assigned_ipv6: i64,

    /// IPv4 addresses of the pool still free to assign.
    #[serde(rename = "availableIPv4", default)]
    pub available_ipv4: i64,

    /// IPv6 addresses of the pool still free to assign (saturates at 2^63-1 for large prefixes).
    #[serde(rename = "availableIPv6", default)]
    pub available_ipv6: i64,

    /// Conditions of the pool; type Valid says whether the pool is in use and, if not, why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // A map keyed by type, so server-side apply merges one condition without replacing the others.
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Option<Vec<Condition>>,
}

/// Schema of `spec.addresses`: at least one entry, each checked by [`ADDRESS_RULE`] at admission.
///
/// The rule sits on the items rather than on the list so that the error names the entry
/// (`spec.addresses[2]: Invalid value: ...`).
fn address_list(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "minItems": 1,
        "maxItems": MAX_ADDRESSES,
        "items": {
            "type": "string",
            "maxLength": MAX_ADDRESS_LEN,
            "x-kubernetes-validations": [{
                "rule": ADDRESS_RULE,
                "message": ADDRESS_RULE_MESSAGE,
            }],
        },
    })
}

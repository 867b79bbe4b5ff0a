//! `L2Advertisement`: which pools are announced over layer 2, from which nodes and interfaces.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Which pools to announce, from which nodes and interfaces. Empty: every pool, from every node.
// Every field is optional and so is `spec` itself: MetalLB's simplest manifests carry no spec at
// all. The schema defaults `spec` to `{}` so the API server fills it in and readers always find one.
// Clippy takes the repeated `type_ = "string"` of the printer columns for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "ferrolb.io",
    version = "v1beta1",
    kind = "L2Advertisement",
    namespaced,
    derive = "PartialEq",
    category = "ferrolb",
    doc = "L2Advertisement announces the addresses of the selected IPAddressPools on the local network (ARP / NDP).",
    printcolumn(name = "IPAddressPools", type_ = "string", json_path = ".spec.ipAddressPools"),
    printcolumn(name = "IPAddressPool Selectors", type_ = "string", json_path = ".spec.ipAddressPoolSelectors"),
    printcolumn(name = "Interfaces", type_ = "string", json_path = ".spec.interfaces"),
    // As in MetalLB: selectors are long, so they show with `-o wide` only.
    printcolumn(name = "Node Selectors", type_ = "string", json_path = ".spec.nodeSelectors", priority = 10),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase", default)]
#[schemars(extend("default" = {}))]
pub struct L2AdvertisementSpec {
    /// Pools to announce, by name. With no names and no selectors, every pool is announced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip_address_pools: Option<Vec<String>>,

    /// Pools to announce, by label (in addition to those named in ipAddressPools).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip_address_pool_selectors: Option<Vec<LabelSelector>>,

    /// Nodes that may announce, by label; a node must match at least one. Unset: every node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_selectors: Option<Vec<LabelSelector>>,

    /// Network interfaces to announce on. Unset: every interface of the node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interfaces: Option<Vec<String>>,
}

//! `ServiceL2Status`: which node announces a service's addresses, written by the speaker.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Empty: the object exists to carry its status.
// Defaulted to `{}` in the schema (MetalLB's spec is optional), so objects written without one
// still read back with one.
// Clippy takes the repeated `type_ = "string"` of the printer columns for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "ferrolb.io",
    version = "v1beta1",
    kind = "ServiceL2Status",
    plural = "servicel2statuses",
    namespaced,
    status = "ServiceL2StatusStatus",
    derive = "PartialEq",
    category = "ferrolb",
    doc = "ServiceL2Status shows which node announces a LoadBalancer service's addresses on the local network.",
    printcolumn(name = "Allocated Node", type_ = "string", json_path = ".status.node"),
    printcolumn(name = "Service Name", type_ = "string", json_path = ".status.serviceName"),
    printcolumn(name = "Service Namespace", type_ = "string", json_path = ".status.serviceNamespace"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[schemars(extend("default" = {}))]
pub struct ServiceL2StatusSpec {}

/// Where a service's traffic arrives.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
// Empty values are left out (and so carry no schema default), as MetalLB's omitempty does.
#[serde(rename_all = "camelCase", default)]
pub struct ServiceL2StatusStatus {
    /// The node that answers ARP / NDP for the service's addresses, and so receives its traffic.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub node: String,

    /// The name of the service.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub service_name: String,

    /// The namespace of the service.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub service_namespace: String,

    /// The interfaces of the node that announce the addresses.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<InterfaceInfo>,
}

/// A network interface that announces a service.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(default)]
pub struct InterfaceInfo {
    /// The interface's name, such as eth0.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
}

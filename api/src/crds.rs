//! The CustomResourceDefinitions of ferrolb's kinds, as committed under `deploy/crds/`.
//!
//! Generated from the types so the YAML can't drift from the code; a test in `tests/crds.rs` fails
//! when the committed files differ from what [`rendered`] produces.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use crate::{IPAddressPool, L2Advertisement, ServiceL2Status};

/// The command that rewrites the committed CRD files, run from the repository root.
pub const REGENERATE: &str = "cargo run -p ferrolb-api --bin crdgen -- --write deploy/crds";

/// Where the committed files live, relative to the repository root.
pub const DIR: &str = "deploy/crds";

/// Every ferrolb.io CRD, in a stable order.
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![IPAddressPool::crd(), L2Advertisement::crd(), ServiceL2Status::crd()]
}

/// MetalLB's kinds as ferrolb reads them (`metallb.io/v1beta1`), for a lab or test that has no
/// MetalLB installed; a MetalLB user already has MetalLB's own CRDs.
/// They are ferrolb's own definitions moved to MetalLB's group: the fields are the same.
pub fn metallb() -> Vec<CustomResourceDefinition> {
    [IPAddressPool::crd(), L2Advertisement::crd()]
        .into_iter()
        .map(|mut crd| {
            crd.spec.group = crate::metallb::GROUP.to_string();
            crd.metadata.name = Some(format!("{}.{}", crd.spec.names.plural, crate::metallb::GROUP));
            crd
        })
        .collect()
}

/// The file a CRD is committed as: `<group>_<plural>.yaml`, as controller-gen names them.
pub fn file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}_{}.yaml", crd.spec.group, crd.spec.names.plural)
}

/// One CRD as a YAML document, with a header saying where it comes from.
pub fn to_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_yaml::Error> {
    Ok(format!(
        "# Generated from the ferrolb-api types by `{REGENERATE}`. Do not edit.\n{}",
        serde_yaml::to_string(crd)?
    ))
}

/// Every CRD as `(file name, YAML text)`.
pub fn rendered() -> Result<Vec<(String, String)>, serde_yaml::Error> {
    all().iter().map(|crd| Ok((file_name(crd), to_yaml(crd)?))).collect()
}

/// Every CRD as one multi-document YAML stream, for `kubectl apply -f -`.
pub fn stream() -> Result<String, serde_yaml::Error> {
    Ok(rendered()?.into_iter().map(|(_, yaml)| format!("---\n{yaml}")).collect())
}

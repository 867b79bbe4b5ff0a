//! MetalLB's own kinds, `metallb.io/v1beta1`, for clusters moving from MetalLB (`--metallb-compat`).
//!
//! They share the spec types of ferrolb's kinds, so everything downstream (config, controller)
//! handles both alike. ferrolb only reads them: MetalLB's CRDs are installed by MetalLB's manifests,
//! so there is no CRD to generate, and the types are written by hand rather than derived, which
//! also lets a spec-less MetalLB `L2Advertisement` (MetalLB's CRD does not default `spec`) read as
//! an empty spec.

use std::borrow::Cow;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::core::object::{HasSpec, HasStatus};
use serde::{Deserialize, Serialize};

use crate::{IPAddressPoolSpec, IPAddressPoolStatus, L2AdvertisementSpec};

/// MetalLB's API group.
pub const GROUP: &str = "metallb.io";
/// The MetalLB version whose field names ferrolb follows.
pub const VERSION: &str = "v1beta1";

/// A namespaced MetalLB kind with a shared spec type, and optionally a status.
macro_rules! metallb_kind {
    ($(#[$doc:meta])* $kind:ident, plural = $plural:literal, spec = $spec:ty $(, status = $status:ty)?) => {
        $(#[$doc])*
        #[derive(Deserialize, Clone, Debug, PartialEq)]
        pub struct $kind {
            /// Name, namespace, labels, creation time, ...
            pub metadata: ObjectMeta,
            /// The same fields as ferrolb's kind.
            #[serde(default)]
            pub spec: $spec,
            $(
                /// What was last reported about the object.
                #[serde(default)]
                pub status: Option<$status>,
            )?
        }

        impl $kind {
            /// An object named `name` with `spec`, as for the derived ferrolb kinds.
            pub fn new(name: &str, spec: $spec) -> Self {
                Self {
                    metadata: ObjectMeta { name: Some(name.to_string()), ..ObjectMeta::default() },
                    spec,
                    $(status: None::<$status>,)?
                }
            }
        }

        impl Resource for $kind {
            type DynamicType = ();
            type Scope = NamespaceResourceScope;

            fn kind(_: &()) -> Cow<'_, str> {
                Cow::Borrowed(stringify!($kind))
            }
            fn group(_: &()) -> Cow<'_, str> {
                Cow::Borrowed(GROUP)
            }
            fn version(_: &()) -> Cow<'_, str> {
                Cow::Borrowed(VERSION)
            }
            fn plural(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($plural)
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }

        impl HasSpec for $kind {
            type Spec = $spec;
            fn spec(&self) -> &$spec {
                &self.spec
            }
            fn spec_mut(&mut self) -> &mut $spec {
                &mut self.spec
            }
        }

        $(
            impl HasStatus for $kind {
                type Status = $status;
                fn status(&self) -> Option<&$status> {
                    self.status.as_ref()
                }
                fn status_mut(&mut self) -> &mut Option<$status> {
                    &mut self.status
                }
            }
        )?

        // Written out by hand because apiVersion and kind are not fields: like the derived kinds,
        // they come from the type.
        impl Serialize for $kind {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeStruct;
                let mut object = serializer.serialize_struct(stringify!($kind), 5)?;
                object.serialize_field("apiVersion", &<$kind as Resource>::api_version(&()))?;
                object.serialize_field("kind", &<$kind as Resource>::kind(&()))?;
                object.serialize_field("metadata", &self.metadata)?;
                object.serialize_field("spec", &self.spec)?;
                $(
                    match &self.status {
                        Some(status) => object.serialize_field::<$status>("status", status)?,
                        None => object.skip_field("status")?,
                    }
                )?
                object.end()
            }
        }
    };
}

metallb_kind!(
    /// MetalLB's `IPAddressPool`, read as ferrolb's [`crate::IPAddressPool`] is.
    IPAddressPool,
    plural = "ipaddresspools",
    spec = IPAddressPoolSpec,
    status = IPAddressPoolStatus
);

metallb_kind!(
    /// MetalLB's `L2Advertisement`, read as ferrolb's [`crate::L2Advertisement`] is.
    L2Advertisement,
    plural = "l2advertisements",
    spec = L2AdvertisementSpec
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_metallb_pool_manifest() {
        let pool: IPAddressPool = serde_yaml::from_str(
            r#"
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata:
  name: lan
  namespace: metallb-system
spec:
  addresses: ["192.0.2.200-192.0.2.250", "2001:db8:1::c8-2001:db8:1::fa"]
  autoAssign: false
  avoidBuggyIPs: true
  serviceAllocation:
    priority: 10
    namespaces: [web]
    serviceSelectors:
    - matchLabels: {tier: front}
status:
  assignedIPv4: 2
  assignedIPv6: 1
  availableIPv4: 49
  availableIPv6: 50
"#,
        )
        .expect("MetalLB pool parses");
        assert_eq!(pool.metadata.name.as_deref(), Some("lan"));
        assert_eq!(pool.spec.addresses.len(), 2);
        assert_eq!(pool.spec.auto_assign, Some(false));
        assert_eq!(pool.spec.avoid_buggy_ips, Some(true));
        let allocation = pool.spec.service_allocation.as_ref().expect("serviceAllocation");
        assert_eq!(allocation.priority, Some(10));
        assert_eq!(pool.status.as_ref().map(|s| s.available_ipv4), Some(49));
    }

    #[test]
    fn a_spec_less_metallb_advertisement_reads_as_empty() {
        let adv: L2Advertisement = serde_yaml::from_str(
            "apiVersion: metallb.io/v1beta1\nkind: L2Advertisement\nmetadata: {name: all, namespace: metallb-system}\n",
        )
        .expect("spec-less L2Advertisement parses");
        assert_eq!(adv.spec, L2AdvertisementSpec::default());
    }

    #[test]
    fn serializes_with_metallb_api_version() {
        let value = serde_json::to_value(L2Advertisement::new("all", L2AdvertisementSpec::default())).expect("json");
        assert_eq!(value["apiVersion"], "metallb.io/v1beta1");
        assert_eq!(value["kind"], "L2Advertisement");
        assert_eq!(IPAddressPool::url_path(&(), Some("ns")), "/apis/metallb.io/v1beta1/namespaces/ns/ipaddresspools");
        let pool = serde_json::to_value(IPAddressPool::new("p", IPAddressPoolSpec::default())).expect("json");
        assert!(pool.get("status").is_none(), "no status written when there is none: {pool}");
    }
}

//! The one name of a Service used everywhere: the controller's allocations, the election's
//! announcements and the data plane's model all key by it, so they agree on identity and order.

use std::fmt;

use k8s_openapi::api::core::v1::Service;

/// A Service, by namespace and name. Ordered by namespace, then name. Shown as `namespace/name`.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    /// Namespace.
    pub namespace: String,
    /// Name within the namespace.
    pub name: String,
}

impl ServiceKey {
    /// Builds a key from a namespace and a name.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }

    /// The key of a Service object; a missing namespace or name is empty (objects read from the
    /// API server always have both).
    pub fn of(svc: &Service) -> Self {
        Self::new(
            svc.metadata.namespace.as_deref().unwrap_or_default(),
            svc.metadata.name.as_deref().unwrap_or_default(),
        )
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    #[test]
    fn a_key_reads_a_service_and_shows_as_namespace_slash_name() {
        let svc = Service {
            metadata: ObjectMeta { name: Some("web".into()), namespace: Some("shop".into()), ..Default::default() },
            ..Default::default()
        };
        let key = ServiceKey::of(&svc);
        assert_eq!(key, ServiceKey::new("shop", "web"));
        assert_eq!(key.to_string(), "shop/web");
        assert_eq!(ServiceKey::of(&Service::default()), ServiceKey::new("", ""));
    }

    #[test]
    fn keys_order_by_namespace_then_name() {
        // Not by the text: "a-b/x" sorts before "a/x" as a string, but namespace "a" comes first.
        let mut keys = vec![ServiceKey::new("a-b", "x"), ServiceKey::new("a", "y"), ServiceKey::new("a", "x")];
        keys.sort();
        assert_eq!(keys, [ServiceKey::new("a", "x"), ServiceKey::new("a", "y"), ServiceKey::new("a-b", "x")]);
    }
}

//! Which LoadBalancer Services ferrolb serves, by `spec.loadBalancerClass`. Shared by the
//! controller (which assigns their addresses) and the speaker (which announces them), so both
//! always agree on what is ferrolb's.

use k8s_openapi::api::core::v1::Service;

/// The class policy, from the `--lb-class` and `--require-lb-class` flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassPolicy {
    /// Our class (`ferrolb.io/lb` unless configured).
    pub class: String,
    /// Serve only Services that name our class (else also those with no class).
    pub require: bool,
}

impl Default for ClassPolicy {
    fn default() -> Self {
        ClassPolicy { class: ferrolb_api::annotations::DEFAULT_LOAD_BALANCER_CLASS.to_string(), require: false }
    }
}

impl ClassPolicy {
    /// A `type: LoadBalancer` Service of our class (or of none, unless the class is required).
    pub fn serves(&self, svc: &Service) -> bool {
        let Some(spec) = &svc.spec else { return false };
        if spec.type_.as_deref() != Some("LoadBalancer") {
            return false;
        }
        match spec.load_balancer_class.as_deref() {
            None => !self.require,
            Some(c) => c == self.class,
        }
    }
}

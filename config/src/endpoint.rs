//! How an EndpointSlice endpoint's conditions read when some are missing, once for the election
//! and the data plane, as kube-proxy reads them.

use k8s_openapi::api::discovery::v1::EndpointConditions;

/// An endpoint's conditions with the API's defaults filled in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointState {
    /// May receive new connections. Missing: true (the API's "unknown" is read as ready).
    pub ready: bool,
    /// Can answer, ready or terminating. Missing: the same as `ready`.
    pub serving: bool,
    /// Is shutting down. Missing: false.
    pub terminating: bool,
}

impl EndpointState {
    /// Reads `conditions` (an endpoint without any reads as ready, serving, not terminating).
    pub fn of(conditions: Option<&EndpointConditions>) -> Self {
        let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
        let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
        let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
        EndpointState { ready, serving, terminating }
    }

    /// Not ready but still serving while it terminates: used only when no endpoint is ready, so
    /// connections drain during a rollout instead of being refused.
    pub fn serving_terminating(&self) -> bool {
        !self.ready && self.serving && self.terminating
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(ready: Option<bool>, serving: Option<bool>, terminating: Option<bool>) -> (bool, bool, bool) {
        let s = EndpointState::of(Some(&EndpointConditions { ready, serving, terminating }));
        (s.ready, s.serving, s.terminating)
    }

    #[test]
    fn missing_conditions_take_the_api_defaults() {
        let none = EndpointState::of(None);
        assert_eq!((none.ready, none.serving, none.terminating), (true, true, false));
        assert_eq!(of(None, None, None), (true, true, false));
        // serving follows ready when missing, either way.
        assert_eq!(of(Some(false), None, None), (false, false, false));
        assert_eq!(of(Some(true), None, None), (true, true, false));
        // Given values win.
        assert_eq!(of(Some(false), Some(true), Some(true)), (false, true, true));
        assert_eq!(of(None, Some(false), Some(true)), (true, false, true));
    }

    #[test]
    fn serving_terminating_is_not_ready_serving_and_terminating() {
        let st = |r, s, t| EndpointState::of(Some(&EndpointConditions { ready: r, serving: s, terminating: t }));
        assert!(st(Some(false), Some(true), Some(true)).serving_terminating());
        assert!(!st(Some(false), Some(false), Some(true)).serving_terminating());
        assert!(!st(Some(false), Some(true), None).serving_terminating());
        assert!(!st(None, None, Some(true)).serving_terminating());
    }
}

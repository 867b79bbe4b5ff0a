//! ferrolb API types: CRDs and annotation names. Built by the controller issue.

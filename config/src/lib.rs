//! Validated, normalized ferrolb configuration (pools, advertisements). Built by the controller issue.

//! The ferrolb controller: IP address management for `type: LoadBalancer` Services.
//!
//! ```text
//!   service.rs   Service -> Request (what it asks for), status -> addresses it holds
//!   allocator.rs Request -> addresses from pools (pure, with sharing and dual stack)
//!   free_index.rs the free addresses of each pool range as intervals: O(log n) allocation
//!   reconcile.rs snapshot -> actions (pure): restore first, release, keep or allocate
//!   apply.rs     actions -> API writes (status, annotation, events)
//!   controller.rs watches, leader election, the reconcile loop
//!   metrics.rs   /metrics, /healthz, /readyz
//! ```

#![forbid(unsafe_code)]

pub mod allocator;
pub mod apply;
pub mod controller;
mod free_index;
pub mod metrics;
pub mod reconcile;
pub mod service;

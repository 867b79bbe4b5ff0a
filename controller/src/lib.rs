//! The ferrolb controller: IP address management for LoadBalancer Services. Built by the controller issue.

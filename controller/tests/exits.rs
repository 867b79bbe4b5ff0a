//! A controller that cannot do its job says so and exits non-zero (so Kubernetes restarts it):
//! the real binary, with no cluster (the failures come before any API call is needed).

use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use ferrolb_telemetry::testing::{Run, run_bounded, unreachable_kubeconfig};

/// Runs the controller for at most 10 s.
fn controller(metrics_addr: &str, env: &[(&str, &str)]) -> Run {
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferrolb-controller"));
    cmd.args(["--identity=exits-test", "--metrics-addr", metrics_addr])
        .env("KUBECONFIG", unreachable_kubeconfig(dir.path()).expect("a kubeconfig"))
        .env_remove("FERROLB_FAULT_END_TASK")
        .envs(env.iter().copied());
    run_bounded(cmd, Duration::from_secs(10)).expect("running ferrolb-controller")
}

#[test]
fn a_metrics_address_in_use_is_a_startup_error_naming_it() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("binding a port");
    let addr = taken.local_addr().expect("its address").to_string();
    let r = controller(&addr, &[]);
    assert_eq!(r.code, Some(1), "the controller must exit with code 1 at once: {r:?}");
    assert!(r.stderr.contains(&addr) && r.stderr.contains("metrics"), "the error must name {addr}: {r:?}");
    assert!(r.stderr.to_lowercase().contains("address already in use"), "and say why: {r:?}");
}

#[test]
fn a_vital_task_that_ends_ends_the_process_with_its_name() {
    for (task, needle) in [
        ("metrics server", "the metrics server task panicked"),
        // A watch dies while the caches sync: the controller task fails, naming the watch.
        ("Service watch", "the Service watch task panicked"),
    ] {
        let r = controller("127.0.0.1:0", &[("FERROLB_FAULT_END_TASK", task)]);
        assert_eq!(r.code, Some(1), "{task}: the controller must exit with code 1: {r:?}");
        assert!(r.stderr.contains(needle), "{task}: the log must say {needle:?}: {r:?}");
        assert!(r.stderr.contains("exiting"), "{task}: and that the process exits: {r:?}");
    }
}

//! A speaker that cannot do its job says so and exits non-zero (so Kubernetes restarts it):
//! the real binary, with no cluster (the failures come before any API call is needed), with
//! the data plane off and the membership on loopback, so it touches nothing of this host.

use std::net::{TcpListener, UdpSocket};
use std::process::Command;
use std::time::Duration;

use ferrolb_telemetry::testing::{Run, run_bounded, unreachable_kubeconfig};

/// Runs `ferrolb-speaker run` for at most 10 s.
fn speaker(metrics_addr: &str, env: &[(&str, &str)]) -> Run {
    let dir = tempfile::tempdir().expect("a temp dir");
    let port = UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).expect("a free UDP port").port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferrolb-speaker"));
    cmd.args(["run", "--node=exits-test", "--node-ip=127.0.0.1", "--dataplane=off", "--insecure-membership"])
        .args(["--membership-port", &port.to_string(), "--metrics-addr", metrics_addr])
        .env("KUBECONFIG", unreachable_kubeconfig(dir.path()).expect("a kubeconfig"))
        .env_remove("FERROLB_FAULT_END_TASK")
        .envs(env.iter().copied());
    run_bounded(cmd, Duration::from_secs(10)).expect("running ferrolb-speaker")
}

#[test]
fn a_metrics_address_in_use_is_a_startup_error_naming_it() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("binding a port");
    let addr = taken.local_addr().expect("its address").to_string();
    let r = speaker(&addr, &[]);
    assert_eq!(r.code, Some(1), "the speaker must exit with code 1 at once: {r:?}");
    assert!(r.stderr.contains(&addr) && r.stderr.contains("metrics"), "the error must name {addr}: {r:?}");
    assert!(r.stderr.to_lowercase().contains("address already in use"), "and say why: {r:?}");
}

#[test]
fn a_vital_task_that_ends_ends_the_process_with_its_name() {
    // The data plane is off, so its task is the plain cleanup: faulted, it is never run.
    let r = speaker("127.0.0.1:0", &[("FERROLB_FAULT_END_TASK", "data plane")]);
    assert_eq!(r.code, Some(1), "the speaker must exit with code 1: {r:?}");
    assert!(r.stderr.contains("the data plane task panicked"), "the log must name the task: {r:?}");
    assert!(r.stderr.contains("exiting"), "and say that the process exits: {r:?}");
}

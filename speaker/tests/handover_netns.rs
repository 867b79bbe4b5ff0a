//! The handover chain in a real kernel: a TCP connection in flight through node A survives the
//! client's neighbour entry moving to node B when B carries `dataplane::handover::render`'s
//! chain, and is reset without it. The topology is `tests/scripts/handover.sh`.
//!
//! Needs root (network namespaces, nftables): without it the test fails, it never skips.

use std::io::Write;
use std::process::{Command, Stdio};

use ferrolb_speaker::dataplane::handover::{Handover, render};
use ferrolb_speaker::dataplane::model::Family;

fn run_topology(handover: &str) -> String {
    let uid = Command::new("id").arg("-u").output().expect("id");
    assert_eq!(String::from_utf8_lossy(&uid.stdout).trim(), "0", "this test needs root (network namespaces)");
    let mut child = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/scripts/handover.sh"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bash");
    child.stdin.take().expect("stdin").write_all(handover.as_bytes()).expect("writing the chain");
    let out = child.wait_with_output().expect("the topology script");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "script failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    text
}

#[test]
fn a_connection_in_flight_survives_the_move_with_the_handover_chain() {
    let chain = render(
        Family::V4,
        &[Handover {
            ip: "198.18.200.250".parse().unwrap(),
            previous: "198.18.200.11".parse().unwrap(),
            interface: "eth0".into(),
        }],
    );
    let with = run_topology(&chain);
    let exits: Vec<&str> = with.lines().filter(|l| l.starts_with("curl exit")).collect();
    assert_eq!(exits, ["curl exit 0", "curl exit 0"], "with the handover chain:\n{with}");

    let without = run_topology("-");
    let exits: Vec<&str> = without.lines().filter(|l| l.starts_with("curl exit")).collect();
    assert_eq!(exits.len(), 2, "{without}");
    assert_ne!(exits[0], "curl exit 0", "without the chain the connection should be cut:\n{without}");
    assert_eq!(exits[1], "curl exit 0", "a new connection goes through the new node:\n{without}");
}

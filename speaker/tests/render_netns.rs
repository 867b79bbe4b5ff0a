//! The rendered rulesets in a real kernel, each in a throw-away network namespace: `nft` takes
//! every fixture, a full sync applies twice and deletes cleanly, a created table equals a
//! replaced one, real connections are forwarded (ClusterIP, LB IP, NodePort, no endpoints,
//! source ranges, spreading, affinity, local-only, hairpin masquerade), and a partial sync leaves
//! the table a full sync would build.
//!
//! Needs root (network namespaces) and `nft`: without them the tests fail, they never skip.

#![allow(clippy::unwrap_used)]

use std::io::Write as _;
use std::process::Command;

use ferrolb_speaker::dataplane::model::{Family, Mode, Model};
use ferrolb_speaker::dataplane::render::fixtures::*;
use ferrolb_speaker::dataplane::render::{
    render_cleanup, render_create, render_create_table, render_delete, render_full, render_partial,
};

#[test]
fn nft_loads_the_longest_names() {
    let m = longest_names();
    let (full, partial) = (file(&render_full(&m)), file(&render_partial(&fixtures()[2].1, &m).now));
    let (full, partial) = (full.path().display(), partial.path().display());
    let base = file(&render_full(&fixtures()[2].1));
    let base = base.path().display();
    let listed = in_netns(&format!("nft -f {full}; nft list table ip ferrolb; nft -f {base}; nft -f {partial}"));
    assert!(listed.contains("~"), "{listed}");
}

// ---- real nftables, in a throw-away network namespace ----

/// Fails (never skips) when the test cannot run for real.
fn require_root_and_nft() {
    let uid = Command::new("id").arg("-u").output().expect("cannot run `id -u`");
    let uid = String::from_utf8_lossy(&uid.stdout).trim().to_owned();
    assert_eq!(uid, "0", "the nftables tests need root (to unshare a network namespace); uid is {uid}");
    let nft = Command::new("nft").arg("--version").output();
    assert!(nft.map(|o| o.status.success()).unwrap_or(false), "the nftables tests need the `nft` tool on PATH");
}

fn file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f.flush().unwrap();
    f
}

/// Runs `script` under `sh` in a fresh network namespace; returns stdout, fails with stderr.
fn in_netns(script: &str) -> String {
    require_root_and_nft();
    let out = Command::new("unshare").args(["--net", "--", "sh", "-ec", script]).output().expect("cannot run unshare");
    assert!(out.status.success(), "`{script}` failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn family_word(m: &Model) -> &'static str {
    match m.family {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

#[test]
fn nft_accepts_every_fixture() {
    for (name, m) in fixtures() {
        let f = file(&render_full(&m));
        let path = f.path().display();
        in_netns(&format!("nft -c -f {path} || {{ echo {name} >&2; exit 1; }}"));
    }
}

#[test]
fn nft_applies_full_twice_and_deletes() {
    for (name, m) in fixtures() {
        let full = file(&render_full(&m));
        let delete = file(&render_delete(m.family));
        let (full, delete) = (full.path().display(), delete.path().display());
        let fam = family_word(&m);
        let listed = in_netns(&format!(
            "echo {name} >&2; nft -f {full}; nft -f {full}; nft list table {fam} ferrolb; \
             nft -f {delete}; nft -f {delete}; ! nft list table {fam} ferrolb 2>/dev/null"
        ));
        assert!(listed.contains("chain services"), "{name}: {listed}");
    }
}

/// `render_create_table` makes an empty table and refuses to where there is one;
/// `render_create` then fills it as `render_full` would.
#[test]
fn nft_create_equals_full() {
    for (name, m) in fixtures() {
        let (full, table, create) =
            (file(&render_full(&m)), file(&render_create_table(m.family)), file(&render_create(&m)));
        let (full, table, create) = (full.path().display(), table.path().display(), create.path().display());
        let fam = family_word(&m);
        let created = in_netns(&format!(
            "echo {name} >&2; nft -f {table}; nft -f {create}; ! nft -f {table} 2>/dev/null; \
             nft list table {fam} ferrolb"
        ));
        let replaced = in_netns(&format!("nft -f {full}; nft list table {fam} ferrolb"));
        assert_eq!(normalized(&created), normalized(&replaced), "{name}");
    }
}

/// Real packets, from the node itself, through the applied ruleset: ClusterIP, LB IP and
/// NodePort reach the endpoint; no endpoints is refused at once; a source outside
/// loadBalancerSourceRanges is dropped; 40 connections spread over both endpoints, or stay
/// on one under session affinity; under internalTrafficPolicy Local, 20 reach only the local
/// one of two.
#[test]
fn nft_forwards_real_connections() {
    let one = || vec![ep("198.18.1.2", "node-1")];
    let mut np = http(one());
    np.node_port = Some(31000);
    let mut lb_svc = cluster_ip("198.19.0.11", vec![np]);
    lb_svc.lb_ips = vec![ip("192.0.2.200")];
    let mut ranged = cluster_ip("198.19.0.12", vec![http(one())]);
    ranged.lb_ips = vec![ip("192.0.2.201")];
    ranged.source_ranges = vec![net("203.0.113.0/24")];
    let two = || vec![ep("198.18.1.2", "node-1"), ep("198.18.1.3", "node-1")];
    let mut sticky = cluster_ip("198.19.0.15", vec![http(two())]);
    sticky.affinity_timeout = Some(60);
    let mut local_only =
        cluster_ip("198.19.0.16", vec![http(vec![ep("198.18.1.2", "node-2"), ep("198.18.1.3", "node-1")])]);
    local_only.internal_local = true;
    let m = model(
        Mode::Full,
        vec![
            ("spread", cluster_ip("198.19.0.14", vec![http(two())])),
            ("sticky", sticky),
            ("local-only", local_only),
            ("web", cluster_ip("198.19.0.10", vec![http(one())])),
            ("lb", lb_svc),
            ("empty", cluster_ip("198.19.0.13", vec![http(vec![])])),
            ("ranged", ranged),
        ],
    );
    let rules = file(&render_full(&m));
    let probe = file(
        r#"
import socket, threading, time
def serve(addr):
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, 8080))
    srv.listen(64)
    while True:
        c, _ = srv.accept()
        c.sendall(addr.encode())
        c.close()
for addr in ["198.18.1.2", "198.18.1.3"]:
    threading.Thread(target=serve, args=(addr,), daemon=True).start()
time.sleep(0.2)
def backends(addr, n):
    return sorted({socket.create_connection((addr, 80), timeout=1).recv(16) for _ in range(n)})
def probe(name, addr, port):
    start = time.monotonic()
    try:
        s = socket.create_connection((addr, port), timeout=1)
        print(name, "ok" if s.recv(16).startswith(b"198.18.1.") else "wrong-reply")
    except ConnectionRefusedError:
        print(name, "refused", "fast" if time.monotonic() - start < 0.1 else "slow")
    except OSError as e:
        print(name, "timeout" if isinstance(e, socket.timeout) else repr(e))
probe("clusterip", "198.19.0.10", 80)
probe("lb", "192.0.2.200", 80)
probe("nodeport", "192.0.2.11", 31000)
probe("empty", "198.19.0.13", 80)
probe("ranged", "192.0.2.201", 80)
print("spread", len(backends("198.19.0.14", 40)))
print("sticky", len(backends("198.19.0.15", 40)))
print("local", b",".join(backends("198.19.0.16", 20)).decode())
"#,
    );
    let out = in_netns(&format!(
        "ip link set lo up; ip link add d0 type veth peer name d1; ip link set d1 up; ip link set d0 up; \
         ip addr add 198.18.1.2/24 dev d0; ip addr add 198.18.1.3/24 dev d0; ip addr add 192.0.2.11/24 dev d0; \
         ip route add 198.19.0.0/16 dev d0; nft -f {}; python3 {}",
        rules.path().display(),
        probe.path().display()
    ));
    assert_eq!(
        out,
        "clusterip ok\nlb ok\nnodeport ok\nempty refused fast\nranged timeout\nspread 2\nsticky 1\nlocal 198.18.1.3\n"
    );
}

/// Two pods in namespaces of their own behind this node, routed over veths: a pod reaching
/// itself through its service is masqueraded (its server sees the node's address, and the
/// connection works), a pod reaching the other pod's service keeps its own address.
#[test]
fn nft_masquerades_hairpin_connections_only() {
    let m = model(
        Mode::Full,
        vec![
            ("a", cluster_ip("198.19.0.10", vec![http(vec![ep("198.18.1.2", "node-1")])])),
            ("b", cluster_ip("198.19.0.11", vec![http(vec![ep("198.18.1.3", "node-1")])])),
        ],
    );
    let rules = file(&render_full(&m));
    let server = file(
        r#"
import socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], 8080))
srv.listen(8)
while True:
    c, peer = srv.accept()
    c.sendall(peer[0].encode())
    c.close()
"#,
    );
    let client = file(
        r#"
import socket, sys
for name, addr in [("self", "198.19.0.10"), ("other", "198.19.0.11")]:
    try:
        print(name, socket.create_connection((addr, 80), timeout=2).recv(32).decode())
    except OSError as e:
        print(name, "failed", repr(e))
"#,
    );
    let (server, client) = (server.path().display(), client.path().display());
    let out = in_netns(&format!(
        "ip link set lo up; sysctl -qw net.ipv4.ip_forward=1; \
         for p in a:2 b:3; do n=${{p%:*}}; h=${{p#*:}}; \
           unshare --net -- sleep 20 >/dev/null 2>&1 & pid=$!; sleep 0.2; eval pid_$n=$pid; \
           ip link add v$n type veth peer name p$n; ip link set p$n netns $pid; \
           ip addr add 198.18.1.1/32 dev v$n; ip link set v$n up; ip route add 198.18.1.$h/32 dev v$n; \
           nsenter --net=/proc/$pid/ns/net sh -ec \"ip link set lo up; ip link set p$n up; \
             ip addr add 198.18.1.$h/32 dev p$n; ip route add 198.18.1.1/32 dev p$n; \
             ip route add default via 198.18.1.1 dev p$n\"; \
           nsenter --net=/proc/$pid/ns/net timeout 20 python3 {server} 198.18.1.$h >/dev/null 2>&1 & \
           eval srv_$n=$!; \
         done; \
         nft -f {}; sleep 0.3; nsenter --net=/proc/$pid_a/ns/net timeout 10 python3 {client}; \
         kill $srv_a $srv_b $pid_a $pid_b",
        rules.path().display(),
    ));
    assert_eq!(out, "self 198.18.1.1\nother 198.18.1.2\n");
}

/// `nft list` output as sorted tokens, each tagged with its chain, set or map, so that two
/// tables built along different paths compare equal when their content is.
fn normalized(listing: &str) -> Vec<String> {
    let mut header = String::new();
    let mut tokens = Vec::new();
    for raw in listing.lines() {
        let l = raw.trim();
        if l.starts_with("chain ") || l.starts_with("set ") || l.starts_with("map ") {
            header = l.to_owned();
            continue;
        }
        let l = l.strip_prefix("elements = { ").unwrap_or(l);
        for t in l.split(", ") {
            let t = t.trim_end_matches(',').trim_end_matches(" }").trim();
            if !t.is_empty() && t != "}" {
                tokens.push(format!("{header} | {t}"));
            }
        }
    }
    tokens.sort();
    tokens
}

#[test]
fn nft_partial_sync_equals_full_sync() {
    let prev = combined();
    let next = next_of(&prev);
    let forth = render_partial(&prev, &next);
    let (chains, sets, hairpin) = stale(&forth);
    let (full_prev, partial, cleanup, full_next) = (
        file(&render_full(&prev)),
        file(&forth.now),
        file(&render_cleanup(&next, &chains, &sets, &hairpin)),
        file(&render_full(&next)),
    );
    let (a, b, c, d) =
        (full_prev.path().display(), partial.path().display(), cleanup.path().display(), full_next.path().display());
    let incremental = in_netns(&format!("nft -f {a}; nft -f {b}; nft -f {c}; nft list table ip ferrolb"));
    let fresh = in_netns(&format!("nft -f {d}; nft list table ip ferrolb"));
    assert!(normalized(&fresh).len() > 100, "too little to compare:\n{fresh}");
    assert_eq!(normalized(&incremental), normalized(&fresh));

    // And back again, which deletes what was added.
    let back = render_partial(&next, &prev);
    let (chains, sets, hairpin) = stale(&back);
    let (back, back_cleanup) = (file(&back.now), file(&render_cleanup(&prev, &chains, &sets, &hairpin)));
    let (e, g) = (back.path().display(), back_cleanup.path().display());
    let round_trip =
        in_netns(&format!("nft -f {a}; nft -f {b}; nft -f {c}; nft -f {e}; nft -f {g}; nft list table ip ferrolb"));
    let original = in_netns(&format!("nft -f {a}; nft list table ip ferrolb"));
    assert_eq!(normalized(&round_trip), normalized(&original));
    assert_ne!(normalized(&original), normalized(&fresh));

    // Without the cleanup in between, coming back still gives the same rules.
    let no_cleanup = in_netns(&format!("nft -f {a}; nft -f {b}; nft -f {e}; nft -f {g}; nft list table ip ferrolb"));
    assert_eq!(normalized(&no_cleanup), normalized(&original));
}

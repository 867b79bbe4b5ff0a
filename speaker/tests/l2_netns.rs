//! Layer-2 answers on real veth links, checked with real clients (`arping`, `ndisc6`, the
//! kernel's neighbour cache). Each test builds its own namespaces and removes them.
//!
//! Needs root (network namespaces, raw sockets): without it the tests fail, they never skip.

use std::process::{Child, Command};
use std::time::Duration;

const SPEAKER: &str = env!("CARGO_BIN_EXE_ferrolb-speaker");

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Output whatever the exit status (arping exits 1 when nothing answers).
fn out(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn require_root() {
    let uid = sh(&["id", "-u"]);
    assert_eq!(uid.trim(), "0", "these tests need root (network namespaces, raw sockets): run them as root");
}

/// A speaker host and two client hosts: `cli` on the speaker's eth0, `cli2` on its eth1.
struct Net {
    prefix: String,
    speaker: Option<Child>,
}

impl Net {
    fn new(prefix: &str) -> Self {
        require_root();
        let net = Net { prefix: prefix.to_string(), speaker: None };
        let (s, c, c2) = (net.ns("spk"), net.ns("cli"), net.ns("cli2"));
        for n in [&s, &c, &c2] {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
            sh(&["ip", "netns", "add", n]);
            sh(&["ip", "-n", n, "link", "set", "lo", "up"]);
        }
        sh(&["ip", "-n", &s, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &c]);
        sh(&["ip", "-n", &s, "link", "add", "eth1", "type", "veth", "peer", "name", "eth0", "netns", &c2]);
        for (n, dev, addrs) in [
            (&s, "eth0", ["192.0.2.11/24", "2001:db8:1::11/64"]),
            (&s, "eth1", ["198.18.250.11/24", "2001:db8:2::11/64"]),
            (&c, "eth0", ["192.0.2.100/24", "2001:db8:1::100/64"]),
            (&c2, "eth0", ["198.18.250.100/24", "2001:db8:2::100/64"]),
        ] {
            for a in addrs {
                let mut args = vec!["ip", "-n", n.as_str(), "addr", "add", a, "dev", dev];
                if a.contains(':') {
                    args.push("nodad");
                }
                sh(&args);
            }
            sh(&["ip", "-n", n, "link", "set", dev, "up"]);
        }
        net
    }

    fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    fn mac(&self, dev: &str) -> String {
        let link = sh(&["ip", "-n", &self.ns("spk"), "-o", "link", "show", dev]);
        let mac = link.split("link/ether ").nth(1).and_then(|r| r.split_whitespace().next()).unwrap_or_default();
        mac.to_uppercase()
    }

    fn start_speaker(&mut self, args: &[&str]) {
        let mut full = vec!["netns", "exec", self.prefix.as_str()];
        let ns = self.ns("spk");
        full[2] = &ns;
        full.push(SPEAKER);
        full.push("respond");
        full.extend_from_slice(args);
        self.speaker = Some(Command::new("ip").args(&full).spawn().expect("starting the speaker"));
        // Its raw sockets are open and the first announcements sent well within this.
        std::thread::sleep(Duration::from_millis(1500));
    }

    fn arping(&self, host: &str, ip: &str, count: &str) -> String {
        out(&["ip", "netns", "exec", &self.ns(host), "arping", "-c", count, "-w", "3", "-I", "eth0", ip])
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if let Some(mut c) = self.speaker.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for h in ["spk", "cli", "cli2"] {
            let _ = Command::new("ip").args(["netns", "del", &self.ns(h)]).output();
        }
    }
}

fn replies(arping: &str) -> Vec<String> {
    arping
        .lines()
        .filter(|l| l.contains("reply from"))
        .filter_map(|l| l.split('[').nth(1)?.split(']').next().map(str::to_string))
        .collect()
}

#[test]
fn arp_gets_exactly_one_answer_per_request_from_the_right_mac() {
    let mut net = Net::new("flbt-arp");
    net.start_speaker(&["--ip", "192.0.2.200", "--ip", "2001:db8:1::c8"]);
    let mac = net.mac("eth0");
    let got = replies(&net.arping("cli", "192.0.2.200", "3"));
    assert_eq!(got, vec![mac.clone(); 3], "3 requests, 3 answers, all from the speaker's eth0");
    assert!(replies(&net.arping("cli", "192.0.2.201", "2")).is_empty(), "an address nobody announces gets no answer");
}

#[test]
fn ndp_answers_with_the_target_link_layer_address() {
    let mut net = Net::new("flbt-ndp");
    net.start_speaker(&["--ip", "2001:db8:1::c8"]);
    let mac = net.mac("eth0");
    let r = out(&["ip", "netns", "exec", &net.ns("cli"), "ndisc6", "-r", "3", "2001:db8:1::c8", "eth0"]);
    assert!(r.contains(&format!("Target link-layer address: {mac}")), "ndisc6 said: {r}");
    let r = out(&["ip", "netns", "exec", &net.ns("cli"), "ndisc6", "-r", "2", "-w", "300", "2001:db8:1::c9", "eth0"]);
    assert!(!r.contains("Target link-layer address"), "an unannounced address was answered: {r}");
}

#[test]
fn only_the_chosen_interface_answers() {
    let mut net = Net::new("flbt-if");
    net.start_speaker(&["--ip", "192.0.2.200", "--ip", "198.18.250.200", "--interface", "eth0"]);
    assert_eq!(replies(&net.arping("cli", "192.0.2.200", "1")).len(), 1);
    assert!(replies(&net.arping("cli2", "198.18.250.200", "2")).is_empty(), "eth1 was not chosen but answered");
}

#[test]
fn taking_an_address_updates_the_clients_neighbour_cache() {
    let mut net = Net::new("flbt-garp");
    // The client believes another MAC holds the address (the previous announcer).
    sh(&[
        "ip",
        "-n",
        &net.ns("cli"),
        "neigh",
        "replace",
        "192.0.2.200",
        "lladdr",
        "02:00:00:00:00:01",
        "dev",
        "eth0",
        "nud",
        "stale",
    ]);
    sh(&[
        "ip",
        "-n",
        &net.ns("cli"),
        "neigh",
        "replace",
        "2001:db8:1::c8",
        "lladdr",
        "02:00:00:00:00:01",
        "dev",
        "eth0",
        "nud",
        "stale",
    ]);
    net.start_speaker(&["--ip", "192.0.2.200", "--ip", "2001:db8:1::c8"]);
    let mac = net.mac("eth0").to_lowercase();
    for ip in ["192.0.2.200", "2001:db8:1::c8"] {
        let neigh = sh(&["ip", "-n", &net.ns("cli"), "neigh", "show", ip]);
        assert!(neigh.contains(&mac), "after the gratuitous announcement the client has: {neigh}");
    }
}

/// Runs `f` on a thread of its own inside namespace `ns` (threads it starts stay there too).
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("entering the namespace");
        f()
    })
    .join()
    .expect("the thread in the namespace")
}

/// UDP datagrams of 1,000 bytes from `ns` to each of `to`, `count` rounds.
fn udp_flood(ns: &str, to: &'static [&'static str], count: usize) -> usize {
    in_netns(ns, move || {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("a UDP socket");
        socket.set_broadcast(true).expect("SO_BROADCAST");
        let payload = [0x5au8; 1000];
        let mut sent = 0;
        for _ in 0..count {
            for dst in to {
                sent += usize::from(socket.send_to(&payload, dst).is_ok());
            }
        }
        sent
    })
}

#[test]
fn the_raw_socket_reads_only_requests_while_other_traffic_floods_the_link() {
    use ferrolb_speaker::l2::responder::{Announced, Responder};
    use std::net::IpAddr;
    use std::sync::Arc;

    let net = Net::new("flbt-bpf");
    let cli = net.ns("cli");
    // The client resolves the speaker's own address first, so the flood is unicast UDP.
    udp_flood(&cli, &["192.0.2.11:9"], 1);
    std::thread::sleep(Duration::from_millis(300));
    // A flood already running when the socket opens: nothing of it may slip in before the filter.
    let flood_cli = cli.clone();
    let early = std::thread::spawn(move || udp_flood(&flood_cli, &["192.0.2.11:9"], 5000));
    let responder = in_netns(&net.ns("spk"), || {
        let iface = ferrolb_speaker::l2::responder::usable_interfaces()
            .into_iter()
            .find(|i| i.name == "eth0")
            .expect("eth0 in the speaker's namespace");
        let r = Responder::start(&iface, Arc::new(|_| {})).expect("opening the raw socket");
        let mut want = Announced::default();
        want.insert(IpAddr::V4("192.0.2.200".parse().expect("an address")));
        r.set(&want);
        r
    });
    let sent = early.join().expect("the early flood")
        + udp_flood(&cli, &["192.0.2.11:9", "192.0.2.255:9", "192.0.2.12:9", "224.0.0.251:5353"], 5000);
    let mac = net.mac("eth0");
    let got = replies(&net.arping("cli", "192.0.2.200", "3"));
    assert_eq!(got, vec![mac; 3], "3 requests, 3 answers, through the flood");
    let read = responder.frames_read();
    println!("{sent} datagrams sent at the speaker's link; its raw socket read {read} frames");
    assert!(sent >= 20_000, "the flood sent only {sent} datagrams");
    // The three who-has, the client's own ARP and its IPv6 neighbour discovery: a handful.
    assert!((3..50).contains(&read), "the raw socket read {read} frames of {sent} sent");
}

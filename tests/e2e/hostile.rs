//! A rogue host on the LAN against the speakers' membership (issue 12, §3).
//!
//! ```text
//!   LAN bridge ── node-1 ── node-2 ── node-3 ── client ── rogue (192.0.2.66, a netns of its own)
//!                   │ tcpdump of the announcer's membership traffic (UDP 7946), then the
//!                   │ announcer crashes (speaker SIGKILLed, LAN link down: no goodbye)
//!   rogue, every 100 ms for 12 s, to every live node's 7946:
//!     garbage · the recorded packets replayed, from its own address and with the crashed
//!     node's address spoofed (raw socket) · forged foca packets naming the crashed node, sealed
//!     with a wrong secret and with the right one (read from the cluster), today's seal and the
//!     one of earlier releases
//! ```
//!
//! Expected: the address moves off the crashed node within the usual time, the rejected-packets
//! metric grows for each kind of attack, and the announcer does not change again while the rogue
//! keeps on. Before issue 12 a forgery with the secret kept the crashed node alive.
//!
//! Needs root (it brings up its own lab); fails loudly without it.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use base64::Engine;
use ferrolb_e2e::{Case, Controller, Lab, Speaker, announcer, run_suite, settled_announcer, wait_announcer};
use ferrolb_speaker::membership::Member;
use ferrolb_speaker::membership::wire::Sealer;
use foca::{Codec, Header, Message, PostcardCodec};
use hmac::{Hmac, Mac};
use sha2::Sha256;

static SPEAKERS: Mutex<Vec<Speaker>> = Mutex::new(Vec::new());
static CONTROLLER: Mutex<Option<Controller>> = Mutex::new(None);

const ROGUE: &str = "rogue";
const ROGUE_IP: &str = "192.0.2.66";
const PORT: u16 = 7946;
/// How long the address may take to move off a crashed node (the usual ~1.5 s, with room for a
/// busy machine).
const FAILOVER: Duration = Duration::from_secs(3);

fn main() -> ExitCode {
    let cases: &[Case] = &[
        ("setup_lab_controller_and_three_speakers", setup),
        ("a_rogue_host_cannot_keep_a_crashed_node_alive", rogue_host),
        ("a_speaker_without_a_secret_or_with_a_short_one_does_not_start", no_weak_secret),
    ];
    let code = run_suite("hostile", cases);
    SPEAKERS.lock().map(|mut s| s.clear()).ok();
    CONTROLLER.lock().map(|mut c| c.take()).ok();
    code
}

fn setup(lab: &Lab) -> Result<()> {
    lab.lab(&["up"])?;
    ferrolb_e2e::ferrolb_system(lab, &["192.0.2.200-192.0.2.250", "2001:db8:1::c8-2001:db8:1::fa"])?;
    ferrolb_e2e::apply_demo(lab)?;
    lab.kubectl(&["rollout", "status", "deployment/hostname", "--timeout=60s"])?;
    let (controller, speakers) = ferrolb_e2e::start_ferrolb(lab, 17476, &[])?;
    *CONTROLLER.lock().unwrap_or_else(|e| e.into_inner()) = Some(controller);
    *SPEAKERS.lock().unwrap_or_else(|e| e.into_inner()) = speakers;
    Ok(())
}

/// The rogue's network namespace on the LAN bridge; removed when dropped.
struct RogueHost;

impl RogueHost {
    fn create() -> Result<Self> {
        let _ = ferrolb_e2e::output("ip", &["netns", "del", ROGUE]);
        ferrolb_e2e::run("ip", &["netns", "add", ROGUE])?;
        let host = RogueHost;
        let cp = "control-plane";
        ferrolb_e2e::run(
            "ip",
            &["-n", cp, "link", "add", "flb-rogue", "type", "veth", "peer", "name", "eth0", "netns", ROGUE],
        )?;
        ferrolb_e2e::run("ip", &["-n", cp, "link", "set", "flb-rogue", "master", "flb-br0", "up"])?;
        ferrolb_e2e::run("ip", &["-n", ROGUE, "addr", "add", &format!("{ROGUE_IP}/24"), "dev", "eth0"])?;
        ferrolb_e2e::run("ip", &["-n", ROGUE, "link", "set", "eth0", "up"])?;
        ferrolb_e2e::run("ip", &["-n", ROGUE, "link", "set", "lo", "up"])?;
        Ok(host)
    }
}

impl Drop for RogueHost {
    fn drop(&mut self) {
        // The veth pair goes with the namespace.
        let _ = ferrolb_e2e::output("ip", &["netns", "del", ROGUE]);
    }
}

/// The rogue's sender: a small Python program in its namespace that sends each line it reads
/// (`SRC DST HEX`, SRC `-` for its own address and port 7946, else spoofed with a raw socket).
const SENDER: &str = r#"
import socket, struct, sys
own = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
own.bind((sys.argv[1], 7946))
own.setblocking(False)
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for line in sys.stdin:
    src, dst, data = line.split()
    p = bytes.fromhex(data)
    try:
        if src == "-":
            own.sendto(p, (dst, 7946))
        else:
            udp = struct.pack("!HHHH", 7946, 7946, 8 + len(p), 0) + p
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                             socket.inet_aton(src), socket.inet_aton(dst))
            raw.sendto(ip + udp, (dst, 0))
    except OSError:
        pass
"#;

/// One UDP payload of a recording: from, to, payload.
type Recorded = (Ipv4Addr, Ipv4Addr, Vec<u8>);

/// The UDP payloads to or from port 7946 in a pcap file of Ethernet frames (tcpdump -w).
fn read_pcap(bytes: &[u8]) -> Result<Vec<Recorded>> {
    ensure!(bytes.len() >= 24, "pcap too short");
    let magic = u32::from_le_bytes(bytes[0..4].try_into()?);
    let le = match magic {
        0xa1b2c3d4 | 0xa1b23c4d => true,
        0xd4c3b2a1 | 0x4d3cb2a1 => false,
        m => anyhow::bail!("not a pcap file (magic {m:#x})"),
    };
    let u32_at = |b: &[u8], i: usize| {
        let a: [u8; 4] = b[i..i + 4].try_into().unwrap_or_default();
        if le { u32::from_le_bytes(a) } else { u32::from_be_bytes(a) }
    };
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= bytes.len() {
        let caplen = u32_at(bytes, at + 8) as usize;
        let frame = bytes.get(at + 16..at + 16 + caplen).context("truncated pcap record")?;
        at += 16 + caplen;
        // Ethernet II, IPv4, UDP.
        if frame.len() < 14 + 20 + 8 || frame[12..14] != [0x08, 0x00] {
            continue;
        }
        let ip = &frame[14..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        if ip[9] != 17 || ip.len() < ihl + 8 {
            continue;
        }
        let (src, dst) = (Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]), Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]));
        let udp = &ip[ihl..];
        let len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
        if let Some(payload) = udp.get(8..len) {
            out.push((src, dst, payload.to_vec()));
        }
    }
    Ok(out)
}

fn node_ip(node: &str) -> Result<Ipv4Addr> {
    let i: u8 = node.trim_start_matches("node-").parse()?;
    Ok(Ipv4Addr::new(192, 0, 2, 10 + i))
}

/// A foca Announce from a member named `node` at `claimed`, sent to `to`.
fn forged_announce(node: &str, claimed: SocketAddr, to: SocketAddr, incarnation: u64) -> Result<Vec<u8>> {
    let header = Header {
        src: Member { node: node.into(), addr: claimed, incarnation },
        src_incarnation: 0,
        dst: Member { node: String::new(), addr: to, incarnation: 0 },
        message: Message::Announce,
    };
    let mut buf = Vec::new();
    PostcardCodec.encode_header(&header, &mut buf).map_err(|e| anyhow::anyhow!("encoding: {e}"))?;
    Ok(buf)
}

/// The seal of releases before issue 12: an HMAC-SHA256 tag of the payload, then the payload.
fn legacy_seal(secret: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key");
    mac.update(payload);
    let mut out = mac.finalize().into_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// `ferrolb_membership_rejected_packets_total` by reason, summed over `nodes`.
fn rejected(nodes: &[String]) -> Result<std::collections::BTreeMap<String, f64>> {
    let mut sums = std::collections::BTreeMap::new();
    for n in nodes {
        let i: u8 = n.trim_start_matches("node-").parse()?;
        let (_, text) = ferrolb_e2e::speaker_get(i, "/metrics")?;
        for line in text.lines().filter(|l| l.starts_with("ferrolb_membership_rejected_packets_total{")) {
            let reason = line.split('"').nth(1).unwrap_or_default().to_string();
            let v: f64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
            *sums.entry(reason).or_insert(0.0) += v;
        }
    }
    Ok(sums)
}

fn rogue_host(lab: &Lab) -> Result<()> {
    let ip = ferrolb_e2e::lb_ip(lab, "hostname-svc-lb")?;
    let victim = settled_announcer(&ip)?;
    let victim_ip = node_ip(&victim)?;
    let live: Vec<String> = (1..=3).map(|i| format!("node-{i}")).filter(|n| *n != victim).collect();
    let secret = lab.kubectl(&[
        "get",
        "secret",
        "-n",
        "ferrolb-system",
        "ferrolb-memberlist",
        "-o",
        "jsonpath={.data.secretkey}",
    ])?;
    let secret = base64::engine::general_purpose::STANDARD.decode(secret.trim()).context("the Secret's key")?;
    let _rogue = RogueHost::create()?;

    // Record the announcer's membership traffic for 2 s.
    let pcap = std::env::temp_dir().join("ferrolb-hostile.pcap");
    let mut tcpdump = Command::new("ip")
        .args(["netns", "exec", &victim, "tcpdump", "-i", "eth0", "-U", "-w"])
        .arg(&pcap)
        .args(["udp", "port", &PORT.to_string()])
        .stderr(Stdio::null())
        .spawn()
        .context("starting tcpdump")?;
    std::thread::sleep(Duration::from_secs(2));
    let _ = Command::new("kill").args(["-INT", &tcpdump.id().to_string()]).status();
    let _ = tcpdump.wait();
    let recorded: Vec<Recorded> =
        read_pcap(&std::fs::read(&pcap)?)?.into_iter().filter(|(src, _, _)| *src == victim_ip).collect();
    ensure!(recorded.len() >= 5, "only {} membership packets of {victim} recorded", recorded.len());
    println!("  recorded {} membership packets from {victim}", recorded.len());

    let before = rejected(&live)?;
    let mut sender = Command::new("ip")
        .args(["netns", "exec", ROGUE, "python3", "-c", SENDER, ROGUE_IP])
        .stdin(Stdio::piped())
        .spawn()
        .context("starting the rogue's sender")?;
    let mut to_sender = sender.stdin.take().context("the sender's stdin")?;

    // The crash: no goodbye.
    let vi: usize = victim.trim_start_matches("node-").parse()?;
    let crashed = Instant::now();
    SPEAKERS.lock().unwrap_or_else(|e| e.into_inner())[vi - 1].kill();
    ferrolb_e2e::run("ip", &["-n", &victim, "link", "set", "eth0", "down"])?;

    let stop = AtomicBool::new(false);
    let rogue_addr: SocketAddr = format!("{ROGUE_IP}:{PORT}").parse()?;
    let victim_addr = SocketAddr::new(victim_ip.into(), PORT);
    let targets: Vec<Ipv4Addr> = live.iter().map(|n| node_ip(n)).collect::<Result<_>>()?;
    let result = std::thread::scope(|s| -> Result<()> {
        let attack = s.spawn(|| -> Result<u64> {
            let mut sealers = [Sealer::new(&secret, now_ms()), Sealer::new(b"a wrong secret, long enough", 1)];
            let mut sent = 0u64;
            let mut round = 0u64;
            let start = Instant::now();
            while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(20) {
                round += 1;
                let mut lines = String::new();
                for t in &targets {
                    let to = SocketAddr::new((*t).into(), PORT);
                    // Garbage: random-ish bytes, some shaped like a sealed packet.
                    let junk: Vec<u8> = (0..(round % 200 + 1)).map(|i| (i * 31 + round * 7) as u8).collect();
                    let mut shaped = vec![1u8];
                    shaped.extend((0..120).map(|i| (i as u64 ^ round) as u8));
                    for g in [junk, shaped] {
                        lines.push_str(&format!("- {t} {}\n", hex(&g)));
                    }
                    // The recording, replayed from here and from the crashed node's address.
                    for (_, _, p) in recorded.iter().skip((round as usize * 3) % recorded.len()).take(3) {
                        lines.push_str(&format!("- {t} {}\n{victim_ip} {t} {}\n", hex(p), hex(p)));
                    }
                    // Forgeries naming the crashed node, at our address and at its own, newer
                    // than anything it said.
                    for claimed in [rogue_addr, victim_addr] {
                        let payload = forged_announce(&victim, claimed, to, now_ms() + round)?;
                        for s in sealers.iter_mut() {
                            lines.push_str(&format!("- {t} {}\n", hex(&s.seal(now_ms(), to, &payload))));
                        }
                        for key in [&secret[..], b"a wrong secret, long enough"] {
                            lines.push_str(&format!("- {t} {}\n", hex(&legacy_seal(key, &payload))));
                        }
                    }
                }
                sent += lines.lines().count() as u64;
                to_sender.write_all(lines.as_bytes()).context("feeding the sender")?;
                to_sender.flush()?;
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(sent)
        });
        let outcome = (|| -> Result<()> {
            let after = wait_announcer(&ip, Some(&victim))?;
            let took = crashed.elapsed();
            println!(
                "  {victim} crashed under attack: {ip} moved to {after} after {:.2} s (by arping)",
                took.as_secs_f64()
            );
            ensure!(took <= FAILOVER, "{ip} took {took:?} to move off the crashed {victim} (at most {FAILOVER:?})");
            // The rogue keeps on for 10 s: nothing moves.
            let watch = Instant::now();
            let mut checks = 0;
            while watch.elapsed() < Duration::from_secs(10) {
                let now = announcer(&ip, 1)?;
                ensure!(
                    now.as_deref() == Some(after.as_str()),
                    "{ip} is answered by {now:?} during the attack, not {after}"
                );
                checks += 1;
                std::thread::sleep(Duration::from_millis(300));
            }
            println!("  {ip} stayed on {after} for 10 s of attack ({checks} arpings)");
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        let sent = attack.join().map_err(|_| anyhow::anyhow!("the attack thread panicked"))??;
        println!("  the rogue sent {sent} packets");
        outcome
    });
    drop(to_sender);
    let _ = sender.kill();
    let _ = sender.wait();
    let after = rejected(&live);

    // Restore the node whatever happened: link up, speaker back, address back.
    ferrolb_e2e::run("ip", &["-n", &victim, "link", "set", "eth0", "up"])?;
    SPEAKERS.lock().unwrap_or_else(|e| e.into_inner())[vi - 1].restart()?;
    result?;
    let after = after?;
    let grew = |r: &str| after.get(r).copied().unwrap_or(0.0) - before.get(r).copied().unwrap_or(0.0);
    println!(
        "  rejected by the live nodes during the attack: {}",
        ["malformed", "bad_tag", "stale", "replayed", "misdirected", "identity"]
            .iter()
            .map(|r| format!("{r} {}", grew(r)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for r in ["malformed", "bad_tag", "identity"] {
        ensure!(grew(r) > 0.0, "no packet was rejected as {r}: {after:?}");
    }
    ensure!(grew("stale") + grew("replayed") + grew("misdirected") > 0.0, "the replays were not rejected: {after:?}");
    let back = settled_announcer(&ip)?;
    ensure!(back == victim, "after the restore {ip} settled on {back}, not {victim}");
    Ok(())
}

/// `ferrolb-speaker run` on node-1 (other ports than the running one) with `extra` flags: its
/// stderr, once it has stopped on its own.
fn speaker_refuses(extra: &[&str]) -> Result<String> {
    let bin = ferrolb_e2e::lab_bin()?.with_file_name("ferrolb-speaker");
    let mut args = vec![
        "KUBECONFIG=/run/ferrolb-lab/pki/admin.kubeconfig",
        "nsenter",
        "--net=/run/netns/node-1",
        "--",
        bin.to_str().context("path")?,
        "run",
        "--node=node-1",
        "--node-ip=192.0.2.11",
        "--membership-port=17946",
        "--metrics-addr=127.0.0.1:17473",
    ];
    args.extend_from_slice(extra);
    let out = ferrolb_e2e::output("env", &args)?;
    ensure!(!out.status.success(), "the speaker started with {extra:?}");
    Ok(String::from_utf8_lossy(&out.stderr).to_string())
}

fn no_weak_secret(lab: &Lab) -> Result<()> {
    let err = speaker_refuses(&[])?;
    for needle in [
        "no membership secret",
        "speaker.memberlist.enabled",
        "speaker.memberlist.existingSecret",
        "--insecure-membership",
    ] {
        ensure!(err.contains(needle), "the error does not say {needle:?}: {err}");
    }
    let short = std::env::temp_dir().join("ferrolb-hostile-short-secret");
    std::fs::write(&short, b"tooshort")?;
    let err = speaker_refuses(&[&format!("--secret-file={}", short.display())])?;
    ensure!(err.contains("8 bytes; at least 16"), "unclear error for a short secret: {err}");
    lab.apply("apiVersion: v1\nkind: Secret\nmetadata: {name: short, namespace: ferrolb-system}\nstringData: {secretkey: abc}\n")?;
    // This one reads the Secret through the API server. Once in a full `make test` the speaker
    // could not connect to it for 30 s (kube's connect deadline); that is no answer about the
    // secret, so it is said and tried again.
    let mut err = speaker_refuses(&["--membership-secret=short"])?;
    for _ in 0..2 {
        if !err.contains("client error (Connect)") {
            break;
        }
        println!("  the speaker could not reach the API server to read the Secret; again");
        err = speaker_refuses(&["--membership-secret=short"])?;
    }
    ensure!(err.contains("membership Secret ferrolb-system/short") && err.contains("3 bytes"), "unclear error: {err}");
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

//! Who is alive: a SWIM membership among the speakers themselves (`foca`), over UDP on the
//! node network. Liveness comes from here, not from the API server, so losing the API server
//! never withdraws an announcement.
//!
//! ```text
//!   UDP socket ──> [HMAC check] ──> Foca ──> runtime: packets to send ──> [HMAC tag] ──> UDP
//!                                     ^              timers to schedule ──> sleep ──┐
//!                                     └──────────────────────────────────────────────┘
//!                                                    notifications ──> members (watch)
//! ```
//!
//! Detection is tuned for a LAN of a few dozen nodes and a takeover in well under 1.5 s: a
//! probe every 250 ms, 100 ms for a direct answer, then indirect probes, and 500 ms of
//! suspicion before a silent member is declared down. A speaker that stops on SIGTERM leaves
//! the membership first, so its peers take over at once.
//!
//! With a shared secret, every packet carries an HMAC-SHA256 tag of its contents and packets
//! without a valid tag are dropped: only speakers that know the secret join.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::Arc;
use std::time::Duration;

use foca::{Config, Foca, OwnedNotification, PostcardCodec, Timer};
use hmac::{Hmac, Mac};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};

/// A speaker as the membership knows it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Member {
    /// The Node the speaker runs on.
    pub node: String,
    /// Where its membership socket listens.
    pub addr: SocketAddr,
    /// Grows on every start, so a restarted speaker wins over the memory of its old self.
    pub incarnation: u64,
}

impl foca::Identity for Member {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(Member { incarnation: self.incarnation.wrapping_add(1), ..self.clone() })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.incarnation > adversary.incarnation
    }
}

/// How the membership runs.
#[derive(Clone, Debug)]
pub struct Settings {
    pub identity: Member,
    /// Address to bind (usually the node address and the membership port, 7946).
    pub bind: SocketAddr,
    /// Shared secret; `None` accepts any speaker.
    pub secret: Option<Vec<u8>>,
    /// Expected number of speakers (tunes dissemination).
    pub cluster_size: u32,
}

/// SWIM timing for a fast takeover on a LAN (see the module docs).
pub fn fast_config(cluster_size: u32) -> Config {
    let mut c = Config::new_lan(NonZeroU32::new(cluster_size.max(1)).unwrap_or(NonZeroU32::MIN));
    c.probe_period = Duration::from_millis(250);
    c.probe_rtt = Duration::from_millis(100);
    c.suspect_to_down_after = Duration::from_millis(500);
    c.periodic_gossip = Some(foca::PeriodicParams {
        frequency: Duration::from_millis(100),
        num_members: NonZeroUsize::MIN.saturating_add(2),
    });
    c.periodic_announce =
        Some(foca::PeriodicParams { frequency: Duration::from_secs(5), num_members: NonZeroUsize::MIN });
    c
}

const TAG_LEN: usize = 32;

fn tag(secret: &[u8], payload: &[u8]) -> [u8; TAG_LEN] {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    mac.update(payload);
    mac.finalize().into_bytes().into()
}

/// The payload of a received packet, if its tag is valid (or no secret is set).
pub fn open<'a>(secret: Option<&[u8]>, packet: &'a [u8]) -> Option<&'a [u8]> {
    let Some(secret) = secret else { return Some(packet) };
    if packet.len() < TAG_LEN {
        return None;
    }
    let (t, payload) = packet.split_at(TAG_LEN);
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).ok()?;
    mac.update(payload);
    // Constant-time comparison.
    mac.verify_slice(t).ok().map(|_| payload)
}

/// A packet to send: the payload, tagged when a secret is set.
pub fn seal(secret: Option<&[u8]>, payload: &[u8]) -> Vec<u8> {
    match secret {
        None => payload.to_vec(),
        Some(s) => {
            let mut out = Vec::with_capacity(TAG_LEN + payload.len());
            out.extend_from_slice(&tag(s, payload));
            out.extend_from_slice(payload);
            out
        }
    }
}

enum Cmd {
    Announce(SocketAddr),
    Leave(oneshot::Sender<()>),
}

/// A running membership.
pub struct Handle {
    /// Names of the nodes whose speakers are alive, ours included.
    pub alive: watch::Receiver<BTreeSet<String>>,
    cmd: mpsc::Sender<Cmd>,
    /// The address the socket is bound to (useful with port 0).
    pub local_addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

/// Lets another task ask peers to let us in.
#[derive(Clone)]
pub struct Announcer(mpsc::Sender<Cmd>);

impl Announcer {
    /// Asks the speaker at `addr` to let us in (peers are found through the API).
    pub async fn announce(&self, addr: SocketAddr) {
        let _ = self.0.send(Cmd::Announce(addr)).await;
    }
}

impl Handle {
    /// Asks the speaker at `addr` to let us in (peers are found through the API).
    pub async fn announce(&self, addr: SocketAddr) {
        let _ = self.cmd.send(Cmd::Announce(addr)).await;
    }

    /// A handle for announcing from another task.
    pub fn announcer(&self) -> Announcer {
        Announcer(self.cmd.clone())
    }

    /// Leaves the membership, telling a few peers so the others learn at once, and stops.
    pub async fn leave(self) {
        let (tx, rx) = oneshot::channel();
        if self.cmd.send(Cmd::Leave(tx)).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), rx).await;
        }
        self.task.abort();
    }

    /// Stops at once without telling anyone: what a crash looks like to the peers.
    pub fn abort(self) {
        self.task.abort();
    }
}

enum Input {
    Data(Vec<u8>),
    Timer(Timer<Member>),
    Cmd(Cmd),
}

/// Binds the socket and starts the membership task.
pub async fn start(settings: Settings) -> std::io::Result<Handle> {
    let socket = Arc::new(UdpSocket::bind(settings.bind).await?);
    let local_addr = socket.local_addr()?;
    let mut identity = settings.identity.clone();
    if identity.addr.port() == 0 {
        identity.addr = local_addr;
    }
    let (alive_tx, alive) = watch::channel(BTreeSet::from([identity.node.clone()]));
    let (cmd_tx, mut cmd_rx) = mpsc::channel::<Cmd>(16);
    let (in_tx, mut in_rx) = mpsc::unbounded_channel::<Input>();
    let secret = settings.secret.clone();

    // Receiver: authenticated packets into the loop.
    let (recv_sock, recv_tx, recv_secret) = (socket.clone(), in_tx.clone(), secret.clone());
    let receiver = tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok((n, _from)) = recv_sock.recv_from(&mut buf).await else { continue };
            match open(recv_secret.as_deref(), &buf[..n]) {
                Some(p) => {
                    if recv_tx.send(Input::Data(p.to_vec())).is_err() {
                        return;
                    }
                }
                None => tracing::debug!("dropped a membership packet with a bad or missing tag"),
            }
        }
    });

    let seed =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
            ^ u64::from(std::process::id());
    let mut foca = Foca::new(identity, fast_config(settings.cluster_size), StdRng::seed_from_u64(seed), PostcardCodec);
    let timer_tx = in_tx.clone();
    let task = tokio::spawn(async move {
        let _receiver = AbortOnDrop(receiver);
        let mut runtime = foca::AccumulatingRuntime::new();
        let mut members: BTreeSet<Member> = BTreeSet::new();
        let mut left: Option<oneshot::Sender<()>> = None;
        loop {
            let input = tokio::select! {
                Some(i) = in_rx.recv() => i,
                Some(c) = cmd_rx.recv() => Input::Cmd(c),
                else => return,
            };
            let result = match input {
                Input::Data(d) => foca.handle_data(&d, &mut runtime),
                Input::Timer(t) => foca.handle_timer(t, &mut runtime),
                Input::Cmd(Cmd::Announce(addr)) => {
                    // The peer's identity is not known yet; any identity with its address will
                    // do for an announce.
                    let to = Member { node: String::new(), addr, incarnation: 0 };
                    foca.announce(to, &mut runtime)
                }
                Input::Cmd(Cmd::Leave(done)) => {
                    left = Some(done);
                    foca.leave_cluster(&mut runtime)
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "membership input");
            }
            while let Some((to, data)) = runtime.to_send() {
                let packet = seal(secret.as_deref(), &data);
                let _ = socket.send_to(&packet, to.addr).await;
            }
            while let Some((after, timer)) = runtime.to_schedule() {
                let tx = timer_tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    let _ = tx.send(Input::Timer(timer));
                });
            }
            let mut changed = false;
            while let Some(n) = runtime.to_notify() {
                match n {
                    OwnedNotification::MemberUp(m) => changed |= members.insert(m),
                    OwnedNotification::MemberDown(m) => changed |= members.remove(&m),
                    OwnedNotification::Rename(old, new) => {
                        members.remove(&old);
                        members.insert(new);
                        changed = true;
                    }
                    _ => {}
                }
            }
            if changed {
                let mut names: BTreeSet<String> = members.iter().map(|m| m.node.clone()).collect();
                names.insert(foca.identity().node.clone());
                tracing::info!(alive = ?names, "membership changed");
                alive_tx.send_replace(names);
            }
            if let Some(done) = left.take() {
                let _ = done.send(());
                return;
            }
        }
    });
    Ok(Handle { alive, cmd: cmd_tx, local_addr, task })
}

/// Aborts a task when dropped, so the receiver dies with the membership task.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    async fn node(name: &str, secret: Option<&[u8]>) -> Handle {
        start(Settings {
            identity: Member { node: name.into(), addr: "127.0.0.1:0".parse().unwrap(), incarnation: 1 },
            bind: "127.0.0.1:0".parse().unwrap(),
            secret: secret.map(<[u8]>::to_vec),
            cluster_size: 3,
        })
        .await
        .unwrap()
    }

    async fn wait_for(h: &Handle, want: &[&str], within: Duration) -> Duration {
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        let start = Instant::now();
        let mut rx = h.alive.clone();
        while *rx.borrow_and_update() != want {
            let left = within.checked_sub(start.elapsed()).expect("membership did not converge in time");
            if tokio::time::timeout(left, rx.changed()).await.is_err() {
                panic!("membership is {:?}, want {:?}", *rx.borrow(), want);
            }
        }
        start.elapsed()
    }

    #[test]
    fn tags_are_checked() {
        let p = seal(Some(b"s3cret"), b"hello");
        assert_eq!(open(Some(b"s3cret"), &p), Some(&b"hello"[..]));
        assert_eq!(open(Some(b"other"), &p), None);
        assert_eq!(open(Some(b"s3cret"), &p[..10]), None);
        let mut bad = p.clone();
        let i = 40 % bad.len();
        bad[i] ^= 1;
        assert_eq!(open(Some(b"s3cret"), &bad), None);
        assert_eq!(open(None, b"plain"), Some(&b"plain"[..]));
    }

    #[tokio::test]
    async fn members_join_crash_is_detected_and_leave_is_at_once() {
        let a = node("a", Some(b"k")).await;
        let b = node("b", Some(b"k")).await;
        let c = node("c", Some(b"k")).await;
        b.announce(a.local_addr).await;
        c.announce(a.local_addr).await;
        wait_for(&a, &["a", "b", "c"], Duration::from_secs(5)).await;
        wait_for(&c, &["a", "b", "c"], Duration::from_secs(5)).await;

        // A crash (no goodbye): the others declare it down. (How fast is the benchmark's
        // business; this only says it happens.)
        c.abort();
        let took = wait_for(&a, &["a", "b"], Duration::from_secs(5)).await;
        eprintln!("crash detected after {took:?}");

        // A clean leave: the others learn without waiting for a probe to fail.
        b.leave().await;
        let took = wait_for(&a, &["a"], Duration::from_secs(5)).await;
        eprintln!("leave seen after {took:?}");
    }

    #[tokio::test]
    async fn a_speaker_without_the_secret_cannot_join() {
        let a = node("a", Some(b"right")).await;
        let x = node("x", Some(b"wrong")).await;
        x.announce(a.local_addr).await;
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(*a.alive.borrow(), BTreeSet::from(["a".to_string()]));
        assert_eq!(*x.alive.borrow(), BTreeSet::from(["x".to_string()]));
    }
}

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
//! Detection is tuned for a LAN and a takeover well under a second (a client's lost SYN is
//! sent again after 1 s: a takeover within that loses no new connection): a probe every
//! 100 ms, 40 ms for a direct answer, then indirect probes, and 150 ms of suspicion before a
//! silent member is declared down; every packet goes out twice (see [`copies`]), so that loss
//! does not turn into false suspicion. Figures from the simulation at [`tuned_config`]. A speaker that stops on SIGTERM leaves
//! the membership first, so its peers take over at once.
//!
//! The timers above are for a few nodes; with more members alive, updates are sent more times
//! and suspicion lasts longer, as foca's `Config::new_lan` scales them (see [`tuned_config`]).
//!
//! foca says nothing when it suspects a member, so the loop looks after every input: a member
//! entering suspicion is counted in `ferrolb_membership_suspicions_total` and logged (`member
//! suspected`, then `suspicion refuted` if it answers in time). On a quiet network the count
//! should only grow with real deaths; anything more is a false alarm the timers came close to.
//!
//! Trust: with a shared secret, every packet is sealed (authenticated, timestamped, counted,
//! addressed; see [`wire`]) and a packet that is forged, old, replayed or meant for another
//! member is dropped and counted in `ferrolb_membership_rejected_packets_total{reason}`. And a
//! member is believed only from an InternalIP of the Node it names: a host on the LAN cannot
//! speak for a node, nor keep a dead one alive.

pub mod copies;
pub mod wire;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::num::{NonZeroU8, NonZeroU32, NonZeroUsize};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant as TokioInstant;

use foca::{Config, Foca, OwnedNotification, PostcardCodec, Timer};
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};

use crate::metrics::{ReasonLabel, RejectedPackets, Suspicions};
pub use wire::{NodeAddrs, Reject, WeakSecret, check_secret};

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
    /// Shared secret; `None` (`--insecure-membership`) accepts any speaker.
    pub secret: Option<Vec<u8>>,
    /// The Nodes and their InternalIPs, from the API; `None` until listed. A member is believed
    /// only from an address of its Node (see [`wire`]).
    pub nodes: watch::Receiver<Option<NodeAddrs>>,
    /// Where dropped packets are counted, by reason.
    pub rejected: RejectedPackets,
    /// Where members entering suspicion are counted (each one once per suspicion, as this
    /// speaker sees it): a suspicion that is refuted is a false alarm the timers came close to.
    pub suspicions: Suspicions,
    /// Where the dead nodes ([`Handle::dead`]) are published, if someone else (the data plane)
    /// reads them too; a channel of its own otherwise.
    pub dead: Option<Arc<watch::Sender<BTreeSet<String>>>>,
}

/// How often each member probes one other (round robin). A crashed member is probed within
/// about one period (two thirds of one with three members), and suspected a period after that.
/// Fixed: foca cannot change it on the fly. What a member sends for probing does not grow
/// with the cluster (a ping and an ack a period, each sent twice, see [`copies`]).
const PROBE_PERIOD: Duration = Duration::from_millis(100);
/// How long a direct answer is awaited before the indirect probes go out; a LAN answers in
/// well under a millisecond, so this is slack for a loaded host (a later answer still counts
/// until the period ends).
const PROBE_RTT: Duration = Duration::from_millis(40);
/// Suspicion before a silent member is declared down, at a few members: long enough for a
/// suspected member to hear of it and refute it (a gossip round or two on a LAN).
const SUSPECT_BASE: Duration = Duration::from_millis(150);
/// Times an update is sent, at least (foca's LAN rule gives fewer below 16 members).
const MIN_TRANSMISSIONS: u8 = 4;

/// SWIM timing for a fast takeover on a LAN with `members` alive (see the module docs): the
/// probe period and the round trip stay (foca cannot change them on the fly); dissemination
/// and suspicion grow with the count, by foca's `Config::new_lan` rule (log10 of the count).
///
/// Crash to declared down is: the wait until a member probes the dead one (random, up to a
/// period), the period itself (direct then indirect probes), then suspicion. The membership
/// simulation (`make bench-membership`, real foca with these timers, a LAN of 0.2–2 ms,
/// two copies of each packet) gives, for three members, p50 328 ms / p99 497 ms to each survivor
/// declaring the crash (250 / 100 / 300 ms before: 718 / 1,099, as the lab saw), and no false
/// suspicion in half an hour at 1 % loss nor at 5 % on one node's link (one copy of each
/// packet: 88 and 698 an hour: hence [`copies`]). The price is bytes: about 4.4 kB/s per node
/// sent at three members (1.9 before). Suspicion shorter than 150 ms saves little (120 ms:
/// p50 306 ms) and leaves a refutation less time on a loaded host.
pub fn tuned_config(members: usize) -> Config {
    let n = u32::try_from(members).unwrap_or(u32::MAX).max(1);
    let mut c = Config::new_lan(NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN));
    c.probe_period = PROBE_PERIOD;
    c.probe_rtt = PROBE_RTT;
    c.max_transmissions = c.max_transmissions.max(NonZeroU8::new(MIN_TRANSMISSIONS).unwrap_or(NonZeroU8::MIN));
    c.suspect_to_down_after = SUSPECT_BASE.mul_f64(f64::from(n).log10().max(1.0));
    c.max_packet_size = NonZeroUsize::new(wire::MAX_PAYLOAD).unwrap_or(NonZeroUsize::MIN);
    c.periodic_gossip = Some(foca::PeriodicParams {
        frequency: Duration::from_millis(100),
        num_members: NonZeroUsize::MIN.saturating_add(2),
    });
    c.periodic_announce =
        Some(foca::PeriodicParams { frequency: Duration::from_secs(5), num_members: NonZeroUsize::MIN });
    c
}

/// Milliseconds since the Unix epoch, by this host's clock.
fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

enum Cmd {
    Announce(SocketAddr),
    Leave(oneshot::Sender<()>),
}

/// A running membership.
pub struct Handle {
    /// Names of the nodes whose speakers are alive, ours included.
    pub alive: watch::Receiver<BTreeSet<String>>,
    /// Names of the nodes whose speakers died (see [`Deaths`]) and have not come back.
    pub dead: watch::Receiver<BTreeSet<String>>,
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

/// How long a node whose speaker came back after a death stays avoided: a crashed node's
/// pods start again after its speaker, and its EndpointSlices still say what they said before
/// the crash until its kubelet reports the restarted pods (not ready, then ready). A node whose
/// pods never stopped (its speaker was killed, its link flapped) only gets new connections
/// back this much later.
pub const RETURN_HOLD: Duration = Duration::from_secs(2);

/// What [`Deaths::suspects`] saw change.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SuspicionChange {
    /// Nodes that became suspect.
    pub suspected: Vec<String>,
    /// Nodes no longer suspect and still active: they answered in time.
    pub refuted: Vec<String>,
}

/// Which nodes' speakers died rather than left. A speaker that stops on SIGTERM leaves: it
/// says so and is declared down at once; its node (and its pods) may well be fine, in an
/// upgrade say. A speaker whose node crashed or was cut off falls silent: it is suspected
/// first, then declared down. Only the second kind is a death, and a death says the node is
/// most likely gone, long before its EndpointSlices do.
#[derive(Debug, Default)]
pub struct Deaths {
    /// Nodes suspected at the last look, by name.
    suspected: BTreeSet<String>,
    died: BTreeSet<String>,
    /// Nodes back from a death, and since when (see [`RETURN_HOLD`]).
    back: BTreeMap<String, TokioInstant>,
}

impl Deaths {
    /// Who is suspect now (from foca's view, after each input), with the nodes foca holds
    /// active (suspects included). foca says nothing when it suspects a member, so this is
    /// where suspicion is seen: the nodes that became suspect since the last look, and those no
    /// longer suspect yet still active (the suspicion was refuted; one declared down is not).
    pub fn suspects(&mut self, now: BTreeSet<String>, active: &BTreeSet<String>) -> SuspicionChange {
        let change = SuspicionChange {
            suspected: now.difference(&self.suspected).cloned().collect(),
            refuted: self.suspected.difference(&now).filter(|n| active.contains(*n)).cloned().collect(),
        };
        self.suspected = now;
        change
    }

    /// `node`'s member was declared down; `believed`: it counted as alive until now. True when
    /// that is a death; a member that left clears its node.
    pub fn down(&mut self, node: &str, believed: bool) -> bool {
        self.back.remove(node);
        if believed && self.suspected.contains(node) {
            self.died.insert(node.to_string())
        } else {
            self.died.remove(node);
            false
        }
    }

    /// `node` has a member up again, at `now`.
    pub fn up(&mut self, node: &str, now: TokioInstant) {
        if self.died.remove(node) {
            self.back.insert(node.to_string(), now);
        }
    }

    /// The nodes to avoid at `now`: those that died and have no live member (a restarted
    /// speaker's new self can join before its old self is declared down), and those back from
    /// a death for less than [`RETURN_HOLD`].
    pub fn dead(&mut self, alive: &BTreeSet<String>, now: TokioInstant) -> BTreeSet<String> {
        self.back.retain(|_, since| now < *since + RETURN_HOLD);
        self.died.difference(alive).cloned().chain(self.back.keys().cloned()).collect()
    }

    /// When the next hold ends, if one runs.
    pub fn next_change(&self) -> Option<TokioInstant> {
        self.back.values().min().map(|since| *since + RETURN_HOLD)
    }
}

/// The names of the members believed alive: ours, and those whose address is an InternalIP
/// of the Node they name (none while the Nodes are unknown).
fn alive_names(me: &Member, members: &BTreeSet<Member>, nodes: Option<&NodeAddrs>) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = match nodes {
        Some(nodes) => members.iter().filter(|m| wire::is_believable(m, nodes)).map(|m| m.node.clone()).collect(),
        None => BTreeSet::new(),
    };
    names.insert(me.node.clone());
    names
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
    let dead_tx = settings.dead.clone().unwrap_or_else(|| Arc::new(watch::channel(BTreeSet::new()).0));
    let dead = dead_tx.subscribe();
    let (cmd_tx, mut cmd_rx) = mpsc::channel::<Cmd>(16);
    let (in_tx, mut in_rx) = mpsc::unbounded_channel::<Input>();
    let mut rng: StdRng = rand::make_rng();
    let mut sealer = settings.secret.as_deref().map(|s| wire::Sealer::new(s, rand::Rng::next_u64(&mut rng)));
    for r in Reject::ALL {
        let _ = settings.rejected.get_or_create(&ReasonLabel::from(r));
    }

    // Receiver: what the gate admits into the loop; the rest counted.
    let mut gate = wire::Gate::new(settings.secret.as_deref(), identity.addr);
    let (recv_sock, recv_tx, rejected, recv_nodes) =
        (socket.clone(), in_tx.clone(), settings.rejected.clone(), settings.nodes.clone());
    let receiver = tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        let mut first_copy = copies::FirstCopy::default();
        let since = std::time::Instant::now();
        loop {
            let Ok((n, from)) = recv_sock.recv_from(&mut buf).await else { continue };
            let admitted = gate.admit(now_ms(), from, &buf[..n], recv_nodes.borrow().as_ref()).map(<[u8]>::to_vec);
            match admitted {
                // A later copy of a packet foca has had (see `copies`).
                Ok(p) if !first_copy.first(since.elapsed().as_millis() as u64, &p) => {}
                Ok(p) => {
                    if recv_tx.send(Input::Data(p)).is_err() {
                        return;
                    }
                }
                Err(r) => {
                    rejected.get_or_create(&ReasonLabel::from(r)).inc();
                    tracing::debug!(%from, reason = r.label(), "dropped a membership packet: {r}");
                }
            }
        }
    });

    let mut config = tuned_config(1);
    let mut foca = Foca::new(identity, config.clone(), rng, PostcardCodec);
    let timer_tx = in_tx.clone();
    let mut nodes = settings.nodes.clone();
    let suspicions = settings.suspicions.clone();
    let task = tokio::spawn(async move {
        let _receiver = AbortOnDrop(receiver);
        let mut runtime = foca::AccumulatingRuntime::new();
        let mut members: BTreeSet<Member> = BTreeSet::new();
        let mut deaths = Deaths::default();
        let mut left: Option<oneshot::Sender<()>> = None;
        let mut nodes_open = true;
        loop {
            let input = tokio::select! {
                Some(i) = in_rx.recv() => Some(i),
                Some(c) = cmd_rx.recv() => Some(Input::Cmd(c)),
                r = nodes.changed(), if nodes_open => {
                    nodes_open = r.is_ok();
                    None
                }
                // A node's hold after its return ends (see Deaths).
                _ = tokio::time::sleep_until(deaths.next_change().unwrap_or_else(TokioInstant::now)), if deaths.next_change().is_some() => None,
                else => return,
            };
            let result = match input {
                None => Ok(()),
                Some(Input::Data(d)) => foca.handle_data(&d, &mut runtime),
                Some(Input::Timer(t)) => foca.handle_timer(t, &mut runtime),
                Some(Input::Cmd(Cmd::Announce(addr))) => {
                    // The peer's identity is not known yet; any identity with its address will
                    // do for an announce.
                    let to = Member { node: String::new(), addr, incarnation: 0 };
                    foca.announce(to, &mut runtime)
                }
                Some(Input::Cmd(Cmd::Leave(done))) => {
                    left = Some(done);
                    foca.leave_cluster(&mut runtime)
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "membership input");
            }
            while let Some((to, data)) = runtime.to_send() {
                for _ in 0..copies::COPIES {
                    let packet = match &mut sealer {
                        Some(s) => s.seal(now_ms(), to.addr, &data),
                        None => data.to_vec(),
                    };
                    let _ = socket.send_to(&packet, to.addr).await;
                }
            }
            while let Some((after, timer)) = runtime.to_schedule() {
                let tx = timer_tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    let _ = tx.send(Input::Timer(timer));
                });
            }
            while let Some(n) = runtime.to_notify() {
                match n {
                    OwnedNotification::MemberUp(m) => {
                        deaths.up(&m.node, TokioInstant::now());
                        members.insert(m);
                    }
                    OwnedNotification::MemberDown(m) => {
                        if deaths.down(&m.node, alive_tx.borrow().contains(&m.node)) {
                            tracing::warn!(
                                node = %m.node,
                                "speaker died (suspected, then declared down): new connections avoid its node's endpoints"
                            );
                        }
                        members.remove(&m);
                    }
                    OwnedNotification::Rename(old, new) => {
                        members.remove(&old);
                        members.insert(new);
                    }
                    _ => {}
                }
            }
            let change = deaths.suspects(
                foca.iter_membership_state()
                    .filter(|m| m.state() == foca::State::Suspect)
                    .map(|m| m.id().node.clone())
                    .collect(),
                &members.iter().map(|m| m.node.clone()).collect(),
            );
            for node in &change.suspected {
                suspicions.inc();
                tracing::info!(%node, "member suspected");
            }
            for node in &change.refuted {
                tracing::info!(%node, "suspicion refuted");
            }
            let names = alive_names(foca.identity(), &members, nodes.borrow().as_ref());
            let gone = deaths.dead(&names, TokioInstant::now());
            if *alive_tx.borrow() != names {
                tracing::info!(alive = ?names, "membership changed");
                alive_tx.send_replace(names);
            }
            if *dead_tx.borrow() != gone {
                for back in dead_tx.borrow().difference(&gone) {
                    tracing::info!(node = %back, "speaker back: new connections reach its node's endpoints again");
                }
                dead_tx.send_replace(gone);
            }
            // Timers follow the number of members foca knows alive (believed or not: they all
            // take part in gossip).
            let want = tuned_config(members.len() + 1);
            if want.max_transmissions != config.max_transmissions
                || want.suspect_to_down_after != config.suspect_to_down_after
            {
                match foca.set_config(want.clone()) {
                    Ok(()) => {
                        tracing::info!(
                            members = members.len() + 1,
                            suspect_ms = want.suspect_to_down_after.as_millis() as u64,
                            transmissions = want.max_transmissions.get(),
                            "membership timers follow the member count"
                        );
                        config = want;
                    }
                    Err(e) => tracing::warn!(error = %e, "retuning the membership"),
                }
            }
            if let Some(done) = left.take() {
                let _ = done.send(());
                return;
            }
        }
    });
    Ok(Handle { alive, dead, cmd: cmd_tx, local_addr, task })
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
    use foca::{Codec, Header, Message};
    use std::collections::BTreeMap;
    use std::time::Instant;

    const SECRET: &[u8] = b"a secret of the membership tests";

    /// Nodes `names`, all at 127.0.0.1 (where the test members run).
    fn local_nodes(names: &[&str]) -> watch::Receiver<Option<NodeAddrs>> {
        let map: NodeAddrs = names.iter().map(|n| (n.to_string(), vec!["127.0.0.1".parse().unwrap()])).collect();
        watch::channel(Some(map)).1
    }

    async fn node_with(name: &str, secret: Option<&[u8]>, nodes: watch::Receiver<Option<NodeAddrs>>) -> Handle {
        node_counting(name, secret, nodes, RejectedPackets::default()).await
    }

    async fn node_counting(
        name: &str,
        secret: Option<&[u8]>,
        nodes: watch::Receiver<Option<NodeAddrs>>,
        rejected: RejectedPackets,
    ) -> Handle {
        node_observed(name, secret, nodes, rejected, Suspicions::default()).await
    }

    async fn node_observed(
        name: &str,
        secret: Option<&[u8]>,
        nodes: watch::Receiver<Option<NodeAddrs>>,
        rejected: RejectedPackets,
        suspicions: Suspicions,
    ) -> Handle {
        start(Settings {
            identity: Member { node: name.into(), addr: "127.0.0.1:0".parse().unwrap(), incarnation: 1 },
            bind: "127.0.0.1:0".parse().unwrap(),
            secret: secret.map(<[u8]>::to_vec),
            nodes,
            rejected,
            suspicions,
            dead: None,
        })
        .await
        .unwrap()
    }

    async fn node(name: &str, secret: Option<&[u8]>) -> Handle {
        node_with(name, secret, local_nodes(&["a", "b", "c", "x"])).await
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

    fn count(r: &RejectedPackets, reason: Reject) -> u64 {
        r.get_or_create(&ReasonLabel::from(reason)).get()
    }

    /// A foca Announce from `from` (claiming to be `node` at `claimed`) to `to`.
    fn announce_packet(node: &str, claimed: SocketAddr, to: SocketAddr) -> Vec<u8> {
        let header = Header {
            src: Member { node: node.into(), addr: claimed, incarnation: 7 },
            src_incarnation: 0,
            dst: Member { node: String::new(), addr: to, incarnation: 0 },
            message: Message::Announce,
        };
        let mut buf = Vec::new();
        PostcardCodec.encode_header(&header, &mut buf).unwrap();
        buf
    }

    #[tokio::test]
    async fn members_join_crash_is_detected_and_leave_is_at_once() {
        let suspicions = Suspicions::default();
        let a = node_observed(
            "a",
            Some(SECRET),
            local_nodes(&["a", "b", "c", "x"]),
            Default::default(),
            suspicions.clone(),
        )
        .await;
        let b = node("b", Some(SECRET)).await;
        let c = node("c", Some(SECRET)).await;
        b.announce(a.local_addr).await;
        c.announce(a.local_addr).await;
        wait_for(&a, &["a", "b", "c"], Duration::from_secs(5)).await;
        wait_for(&c, &["a", "b", "c"], Duration::from_secs(5)).await;

        // A crash (no goodbye): the others declare it down. (How fast is the benchmark's
        // business; this only says it happens.)
        c.abort();
        let took = wait_for(&a, &["a", "b"], Duration::from_secs(5)).await;
        eprintln!("crash detected after {took:?}");
        // ... and it is a death: its node's endpoints are avoided; a saw c suspected first.
        assert_eq!(*a.dead.borrow(), BTreeSet::from(["c".to_string()]));
        // (At least: on a loaded test machine b may be falsely suspected too.)
        assert!(suspicions.get() >= 1, "c's suspicion was not counted");

        // A clean leave: the others learn without waiting for a probe to fail, and it is no
        // death (the node's pods may well be serving).
        b.leave().await;
        let took = wait_for(&a, &["a"], Duration::from_secs(5)).await;
        eprintln!("leave seen after {took:?}");
        assert_eq!(*a.dead.borrow(), BTreeSet::from(["c".to_string()]));
    }

    #[test]
    fn only_a_suspected_member_going_down_is_a_death() {
        let alive = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<BTreeSet<String>>();
        let t0 = TokioInstant::now();
        let mut d = Deaths::default();
        // Left without suspicion: no death.
        assert!(!d.down("b", true));
        // Suspected, then down: a death; back, it stays avoided for RETURN_HOLD.
        d.suspects(alive(&["c"]), &BTreeSet::new());
        assert!(d.down("c", true));
        assert_eq!(d.dead(&alive(&["a"]), t0), alive(&["c"]));
        d.up("c", t0);
        assert_eq!(d.dead(&alive(&["a", "c"]), t0), alive(&["c"]));
        assert_eq!(d.next_change(), Some(t0 + RETURN_HOLD));
        assert!(d.dead(&alive(&["a", "c"]), t0 + RETURN_HOLD).is_empty());
        assert_eq!(d.next_change(), None);
        // A restarted speaker's new self joined before its old self was declared down: the
        // node is alive, so not dead; if that new self leaves cleanly later, still not dead.
        d.suspects(alive(&["d"]), &BTreeSet::new());
        d.up("d", t0);
        assert!(d.down("d", true));
        assert!(d.dead(&alive(&["a", "d"]), t0).is_empty());
        d.suspects(BTreeSet::new(), &BTreeSet::new());
        assert!(!d.down("d", true));
        assert!(d.dead(&alive(&["a"]), t0).is_empty());
        // Dead again while held: dead, not held.
        d.suspects(alive(&["c"]), &BTreeSet::new());
        assert!(d.down("c", true));
        d.up("c", t0);
        assert!(d.down("c", true));
        assert_eq!(d.dead(&alive(&["a"]), t0 + RETURN_HOLD), alive(&["c"]));
        // Never believed (a member at a wrong address): no death.
        d.suspects(alive(&["e"]), &BTreeSet::new());
        assert!(!d.down("e", false));
        assert!(!d.dead(&alive(&["a"]), t0).contains("e"));
    }

    #[test]
    fn suspicion_is_seen_once_and_refuted_only_while_active() {
        let names = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<BTreeSet<String>>();
        let list = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<String>>();
        let mut d = Deaths::default();
        let active = names(&["b", "c", "d"]);
        let change = d.suspects(names(&["b", "c"]), &active);
        assert_eq!(change, SuspicionChange { suspected: list(&["b", "c"]), refuted: vec![] });
        // Still suspect at the next look: not counted again.
        assert_eq!(d.suspects(names(&["b", "c"]), &active), SuspicionChange::default());
        // b answered (still active, no longer suspect); c was declared down (no longer active):
        // only b's suspicion was refuted.
        let change = d.suspects(names(&["d"]), &names(&["b", "d"]));
        assert_eq!(change, SuspicionChange { suspected: list(&["d"]), refuted: list(&["b"]) });
        // Suspected again later: a new suspicion.
        let change = d.suspects(names(&["b"]), &names(&["b"]));
        assert_eq!(change, SuspicionChange { suspected: list(&["b"]), refuted: vec![] });
    }

    #[tokio::test]
    async fn insecure_members_still_join() {
        let a = node("a", None).await;
        let b = node("b", None).await;
        b.announce(a.local_addr).await;
        wait_for(&a, &["a", "b"], Duration::from_secs(5)).await;
    }

    #[tokio::test]
    async fn a_speaker_without_the_secret_cannot_join() {
        let rejected = RejectedPackets::default();
        let a = node_counting("a", Some(SECRET), local_nodes(&["a", "x"]), rejected.clone()).await;
        let x = node("x", Some(b"another secret, as long as it")).await;
        x.announce(a.local_addr).await;
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(*a.alive.borrow(), BTreeSet::from(["a".to_string()]));
        assert_eq!(*x.alive.borrow(), BTreeSet::from(["x".to_string()]));
        assert!(count(&rejected, Reject::BadTag) >= 1, "bad tags not counted");
    }

    #[tokio::test]
    async fn replayed_stale_and_garbage_packets_are_dropped_and_counted() {
        let rejected = RejectedPackets::default();
        let a = node_counting("a", Some(SECRET), local_nodes(&["a", "x"]), rejected.clone()).await;
        let x = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let from = x.local_addr().unwrap();
        let mut sealer = wire::Sealer::new(SECRET, 42);
        let packet = sealer.seal(now_ms(), a.local_addr, &announce_packet("x", from, a.local_addr));
        x.send_to(&packet, a.local_addr).await.unwrap();
        wait_for(&a, &["a", "x"], Duration::from_secs(2)).await;
        // x says nothing more and is declared down; the recording replayed brings nothing back.
        wait_for(&a, &["a"], Duration::from_secs(5)).await;
        x.send_to(&packet, a.local_addr).await.unwrap();
        let stale = sealer.seal(now_ms() - 2 * wire::FRESH_MS, a.local_addr, &announce_packet("x", from, a.local_addr));
        x.send_to(&stale, a.local_addr).await.unwrap();
        x.send_to(b"\x01garbage", a.local_addr).await.unwrap();
        let elsewhere = sealer.seal(now_ms(), from, &announce_packet("x", from, a.local_addr));
        x.send_to(&elsewhere, a.local_addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(*a.alive.borrow(), BTreeSet::from(["a".to_string()]));
        assert_eq!(count(&rejected, Reject::Replayed), 1);
        assert_eq!(count(&rejected, Reject::Stale), 1);
        assert_eq!(count(&rejected, Reject::Malformed), 1);
        assert_eq!(count(&rejected, Reject::Misdirected), 1);
    }

    #[tokio::test]
    async fn a_member_is_believed_only_from_its_nodes_address() {
        let rejected = RejectedPackets::default();
        // x is a Node at another address than the one it speaks from; y is no Node at all.
        let map: NodeAddrs = BTreeMap::from([
            ("a".to_string(), vec!["127.0.0.1".parse().unwrap()]),
            ("x".to_string(), vec!["192.0.2.99".parse().unwrap()]),
        ]);
        let a = node_counting("a", Some(SECRET), watch::channel(Some(map)).1, rejected.clone()).await;
        let rogue = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let from = rogue.local_addr().unwrap();
        let mut sealer = wire::Sealer::new(SECRET, 43);
        for (name, claimed) in [("x", from), ("x", "192.0.2.99:7946".parse().unwrap()), ("y", from)] {
            let p = sealer.seal(now_ms(), a.local_addr, &announce_packet(name, claimed, a.local_addr));
            rogue.send_to(&p, a.local_addr).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(*a.alive.borrow(), BTreeSet::from(["a".to_string()]));
        assert_eq!(count(&rejected, Reject::Identity), 3);
    }

    #[tokio::test]
    async fn nothing_is_believed_before_the_nodes_are_known() {
        let (tx, rx) = watch::channel(None);
        let a = node_with("a", Some(SECRET), rx).await;
        let b = node("b", Some(SECRET)).await;
        b.announce(a.local_addr).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(*a.alive.borrow(), BTreeSet::from(["a".to_string()]));
        // Listed: b's next announce is believed.
        tx.send_replace(Some(local_nodes(&["a", "b"]).borrow().clone().unwrap()));
        b.announce(a.local_addr).await;
        wait_for(&a, &["a", "b"], Duration::from_secs(3)).await;
    }

    #[test]
    fn members_rumored_at_another_address_are_not_alive() {
        let me = Member { node: "a".into(), addr: "192.0.2.11:7946".parse().unwrap(), incarnation: 1 };
        let m = |node: &str, addr: &str| Member { node: node.into(), addr: addr.parse().unwrap(), incarnation: 1 };
        let members = BTreeSet::from([m("b", "192.0.2.12:7946"), m("c", "192.0.2.66:7946"), m("z", "192.0.2.14:7946")]);
        let nodes: NodeAddrs = BTreeMap::from([
            ("a".to_string(), vec!["192.0.2.11".parse().unwrap()]),
            ("b".to_string(), vec!["2001:db8:1::12".parse().unwrap(), "192.0.2.12".parse().unwrap()]),
            ("c".to_string(), vec!["192.0.2.13".parse().unwrap()]),
        ]);
        let names = |n: Option<&NodeAddrs>| alive_names(&me, &members, n).into_iter().collect::<Vec<_>>();
        assert_eq!(names(Some(&nodes)), ["a", "b"]);
        assert_eq!(names(None), ["a"]);
    }

    #[test]
    fn timers_follow_the_member_count() {
        let small = tuned_config(3);
        assert_eq!(small.probe_period, Duration::from_millis(100));
        assert_eq!(small.probe_rtt, Duration::from_millis(40));
        assert_eq!(small.suspect_to_down_after, Duration::from_millis(150));
        assert_eq!(small.max_transmissions.get(), MIN_TRANSMISSIONS);
        assert_eq!(tuned_config(10).suspect_to_down_after, Duration::from_millis(150));
        let big = tuned_config(1000);
        assert_eq!(big.suspect_to_down_after, Duration::from_millis(450));
        // The probe timers cannot change on the fly, so they do not follow the count.
        assert_eq!((big.probe_period, big.probe_rtt), (small.probe_period, small.probe_rtt));
        assert!(big.max_transmissions.get() > MIN_TRANSMISSIONS);
        assert!(tuned_config(100).suspect_to_down_after < big.suspect_to_down_after);
        // foca takes the change on the fly, both ways.
        let me = Member { node: "a".into(), addr: "192.0.2.11:7946".parse().unwrap(), incarnation: 1 };
        let mut foca = Foca::new(me, tuned_config(1), rand::make_rng::<StdRng>(), PostcardCodec);
        foca.set_config(big).unwrap();
        foca.set_config(small).unwrap();
        assert_eq!(tuned_config(0).suspect_to_down_after, Duration::from_millis(150));
        assert_eq!(tuned_config(usize::MAX).probe_period, Duration::from_millis(100));
    }
}

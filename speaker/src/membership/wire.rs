//! The membership's packets on the wire: sealed (authenticated, fresh, seen once, for us) and
//! believed (sent from an address of the Node they name). Pure: no socket, no clock.
//!
//! ```text
//!   sealed:  version | sent at (unix ms) | sender | counter | to (addr, port) | foca payload | tag
//!            1         8                   8        8         16 + 2                           32
//!            └────────────────── HMAC-SHA256 with the shared secret ──────────────┘
//! ```
//!
//! `sender` is random per process and `counter` grows with every packet it sends, so a
//! receiver keeps, per sender, a sliding window of the counters it has seen (IPsec's
//! anti-replay bitmap) and drops what it saw before. `sent at` bounds how long a recorded
//! packet is worth anything: older (or newer) than [`FRESH_MS`] by the receiver's clock, it is
//! dropped, which also lets a receiver forget a sender that went quiet. `to` stops a packet
//! sent to one member from being replayed to another. A receiver tracks a sender only once a
//! tag verifies, so only holders of the secret take its memory, and never more than
//! [`MAX_SENDERS`] of them.
//!
//! Without a secret (`--insecure-membership`) the payload goes bare: anyone on the network can
//! speak for any member; only the identity check below still holds.
//!
//! Identity: a packet is believed only if the member it comes from (the header's `src`, read
//! with foca's own codec) names a Node that has the packet's source address among its
//! InternalIPs, and its own address is the source address. Until the Nodes are known (the API
//! not yet listed) nothing is believed: the speaker does not elect before then anyway.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use foca::{Codec, Header, PostcardCodec};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::Member;

/// Nodes by name, with their InternalIPs (from the API).
pub type NodeAddrs = BTreeMap<String, Vec<IpAddr>>;

/// The shortest shared secret accepted, in bytes.
pub const MIN_SECRET_LEN: usize = 16;
/// How far a packet's `sent at` may be from the receiver's clock (clocks of a cluster are close).
pub const FRESH_MS: u64 = 5_000;
/// Senders tracked at most (a restart makes a new sender; quiet ones are forgotten).
pub const MAX_SENDERS: usize = 4096;
/// A sender heard from no longer than this ago is forgotten: all its packets are stale by now.
const FORGET_AFTER_MS: u64 = 2 * FRESH_MS;
/// Counters behind the highest seen that are still told apart (older ones are dropped).
const WINDOW: u64 = 128;
/// The largest foca payload sent or accepted (foca's `max_packet_size`).
pub const MAX_PAYLOAD: usize = 1400;

const VERSION: u8 = 1;
const HEADER_LEN: usize = 1 + 8 + 8 + 8 + 16 + 2;
const TAG_LEN: usize = 32;
/// Bytes a seal adds to a foca payload (what the membership simulation counts on top of foca's).
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;

/// Why a packet was dropped; also the `reason` label of
/// `ferrolb_membership_rejected_packets_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Reject {
    #[error("malformed: too short, too long, an unknown version or an undecodable header")]
    Malformed,
    #[error("its tag does not verify (no secret, or another one)")]
    BadTag,
    #[error("sent more than 5 s ago or ahead")]
    Stale,
    #[error("already seen")]
    Replayed,
    #[error("sealed for another member")]
    Misdirected,
    #[error("its sender is not an address of the Node it names")]
    Identity,
}

impl Reject {
    pub const ALL: [Reject; 6] =
        [Reject::Malformed, Reject::BadTag, Reject::Stale, Reject::Replayed, Reject::Misdirected, Reject::Identity];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Reject::Malformed => "malformed",
            Reject::BadTag => "bad_tag",
            Reject::Stale => "stale",
            Reject::Replayed => "replayed",
            Reject::Misdirected => "misdirected",
            Reject::Identity => "identity",
        }
    }
}

/// A secret too weak to use.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("the membership secret has {0} bytes; at least {MIN_SECRET_LEN} are needed")]
pub struct WeakSecret(pub usize);

/// Refuses an empty or short secret.
pub fn check_secret(secret: &[u8]) -> Result<(), WeakSecret> {
    if secret.len() < MIN_SECRET_LEN { Err(WeakSecret(secret.len())) } else { Ok(()) }
}

fn keyed(secret: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length, so this cannot fail.
    <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable!())
}

fn addr_bytes(a: SocketAddr) -> [u8; 18] {
    let ip = match a.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let mut out = [0u8; 18];
    out[..16].copy_from_slice(&ip.octets());
    out[16..].copy_from_slice(&a.port().to_be_bytes());
    out
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// Seals what this process sends.
#[derive(Clone)]
pub struct Sealer {
    key: Hmac<Sha256>,
    /// Random per process: a restart is a new sender, whose counter starts afresh.
    sender: u64,
    counter: u64,
}

impl Sealer {
    pub fn new(secret: &[u8], sender: u64) -> Self {
        Sealer { key: keyed(secret), sender, counter: 0 }
    }

    /// `payload` for `to`, sent at `now_ms` (unix ms).
    pub fn seal(&mut self, now_ms: u64, to: SocketAddr, payload: &[u8]) -> Vec<u8> {
        self.counter = self.counter.wrapping_add(1);
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + TAG_LEN);
        out.push(VERSION);
        out.extend_from_slice(&now_ms.to_be_bytes());
        out.extend_from_slice(&self.sender.to_be_bytes());
        out.extend_from_slice(&self.counter.to_be_bytes());
        out.extend_from_slice(&addr_bytes(to));
        out.extend_from_slice(payload);
        let mut mac = self.key.clone();
        mac.update(&out);
        out.extend_from_slice(&mac.finalize().into_bytes());
        out
    }
}

/// What a receiver remembers of one sender.
#[derive(Clone, Copy, Debug)]
struct Window {
    /// The highest counter accepted.
    top: u64,
    /// Bit `i`: counter `top - i` was accepted.
    seen: u128,
    /// When (receiver's unix ms) a packet of it was last accepted.
    last: u64,
}

/// Counters seen per sender, bounded.
#[derive(Debug, Default)]
pub struct ReplayGuard {
    senders: HashMap<u64, Window>,
}

impl ReplayGuard {
    /// Records `counter` of `sender`, or says it was seen (or is too old to tell).
    fn accept(&mut self, sender: u64, counter: u64, now_ms: u64) -> Result<(), Reject> {
        if !self.senders.contains_key(&sender) && self.senders.len() >= MAX_SENDERS {
            self.make_room(now_ms);
        }
        let w = self.senders.entry(sender).or_insert(Window { top: counter, seen: 0, last: now_ms });
        if counter > w.top {
            let shift = counter - w.top;
            w.seen = if shift >= WINDOW { 0 } else { w.seen << shift };
            w.top = counter;
        }
        let behind = w.top - counter;
        if behind >= WINDOW {
            return Err(Reject::Replayed);
        }
        let bit = 1u128 << behind;
        if w.seen & bit != 0 {
            return Err(Reject::Replayed);
        }
        w.seen |= bit;
        w.last = now_ms;
        Ok(())
    }

    /// Forgets quiet senders; if all are recent (only holders of the secret get here), the
    /// quietest one.
    fn make_room(&mut self, now_ms: u64) {
        self.senders.retain(|_, w| now_ms.saturating_sub(w.last) <= FORGET_AFTER_MS);
        if self.senders.len() >= MAX_SENDERS
            && let Some(oldest) = self.senders.iter().min_by_key(|(_, w)| w.last).map(|(s, _)| *s)
        {
            self.senders.remove(&oldest);
        }
    }

    /// Senders tracked.
    pub fn len(&self) -> usize {
        self.senders.len()
    }

    pub fn is_empty(&self) -> bool {
        self.senders.is_empty()
    }
}

/// Opens what this member receives.
pub struct Opener {
    key: Hmac<Sha256>,
    /// Our own membership address: packets sealed for another are dropped.
    local: SocketAddr,
    guard: ReplayGuard,
}

impl Opener {
    pub fn new(secret: &[u8], local: SocketAddr) -> Self {
        Opener { key: keyed(secret), local: canonical(local), guard: ReplayGuard::default() }
    }

    /// The foca payload of `packet`, received at `now_ms`, if it is sealed with our secret, for
    /// us, fresh and not seen before.
    pub fn open<'a>(&mut self, now_ms: u64, packet: &'a [u8]) -> Result<&'a [u8], Reject> {
        if packet.len() < HEADER_LEN + TAG_LEN || packet.len() > HEADER_LEN + MAX_PAYLOAD + TAG_LEN {
            return Err(Reject::Malformed);
        }
        let (body, tag) = packet.split_at(packet.len() - TAG_LEN);
        if body[0] != VERSION {
            return Err(Reject::Malformed);
        }
        let mut mac = self.key.clone();
        mac.update(body);
        // Constant-time comparison.
        mac.verify_slice(tag).map_err(|_| Reject::BadTag)?;
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&body[i..i + 8]);
            u64::from_be_bytes(b)
        };
        let (sent, sender, counter) = (u64_at(1), u64_at(9), u64_at(17));
        let mut ip = [0u8; 16];
        ip.copy_from_slice(&body[25..41]);
        let to = SocketAddr::new(Ipv6Addr::from(ip).to_canonical(), u16::from_be_bytes([body[41], body[42]]));
        if to != self.local {
            return Err(Reject::Misdirected);
        }
        if now_ms.abs_diff(sent) > FRESH_MS {
            return Err(Reject::Stale);
        }
        self.guard.accept(sender, counter, now_ms)?;
        Ok(&body[HEADER_LEN..])
    }

    /// Senders tracked.
    pub fn senders(&self) -> usize {
        self.guard.len()
    }
}

/// The member a foca payload says it comes from.
pub fn sender_of(payload: &[u8]) -> Result<Member, Reject> {
    let header: Header<Member> = PostcardCodec.decode_header(payload).map_err(|_| Reject::Malformed)?;
    Ok(header.src)
}

/// `member`'s address is an InternalIP of the Node it names.
pub fn is_believable(member: &Member, nodes: &NodeAddrs) -> bool {
    let ip = member.addr.ip().to_canonical();
    nodes.get(&member.node).is_some_and(|ips| ips.iter().any(|i| i.to_canonical() == ip))
}

/// The receive path, whole: what foca gets of a datagram from `from`, or why it gets nothing.
pub struct Gate {
    /// `None`: insecure (bare payloads).
    opener: Option<Opener>,
}

impl Gate {
    pub fn new(secret: Option<&[u8]>, local: SocketAddr) -> Self {
        Gate { opener: secret.map(|s| Opener::new(s, local)) }
    }

    /// The foca payload of `packet` if it is to be believed, given the Nodes (`None`: not
    /// known yet, so nothing is).
    pub fn admit<'a>(
        &mut self,
        now_ms: u64,
        from: SocketAddr,
        packet: &'a [u8],
        nodes: Option<&NodeAddrs>,
    ) -> Result<&'a [u8], Reject> {
        let payload = match &mut self.opener {
            Some(o) => o.open(now_ms, packet)?,
            None if packet.len() > MAX_PAYLOAD => return Err(Reject::Malformed),
            None => packet,
        };
        let sender = sender_of(payload)?;
        let nodes = nodes.ok_or(Reject::Identity)?;
        if canonical(sender.addr) != canonical(from) || !is_believable(&sender, nodes) {
            return Err(Reject::Identity);
        }
        Ok(payload)
    }

    /// Senders tracked by the replay guard.
    pub fn senders(&self) -> usize {
        self.opener.as_ref().map_or(0, Opener::senders)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef-lab";
    const NOW: u64 = 1_800_000_000_000;

    #[test]
    fn a_seal_adds_the_overhead() {
        let mut sealer = Sealer::new(SECRET, 1);
        assert_eq!(sealer.seal(NOW, "192.0.2.11:7946".parse().unwrap(), b"payload").len(), 7 + OVERHEAD);
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_sealed_packet_opens_once() {
        let to = addr("192.0.2.11:7946");
        let mut s = Sealer::new(SECRET, 7);
        let mut o = Opener::new(SECRET, to);
        let p = s.seal(NOW, to, b"payload");
        assert_eq!(o.open(NOW + 3, &p), Ok(&b"payload"[..]));
        assert_eq!(o.open(NOW + 4, &p), Err(Reject::Replayed));
        // The next ones still open, out of order too.
        let (p2, p3) = (s.seal(NOW, to, b"2"), s.seal(NOW, to, b"3"));
        assert_eq!(o.open(NOW, &p3), Ok(&b"3"[..]));
        assert_eq!(o.open(NOW, &p2), Ok(&b"2"[..]));
        assert_eq!(o.open(NOW, &p2), Err(Reject::Replayed));
    }

    #[test]
    fn bad_tags_stale_and_misdirected_packets_are_dropped() {
        let to = addr("192.0.2.11:7946");
        let mut s = Sealer::new(SECRET, 7);
        let mut o = Opener::new(SECRET, to);
        let p = s.seal(NOW, to, b"payload");
        assert_eq!(Opener::new(b"another secret of 16+", to).open(NOW, &p), Err(Reject::BadTag));
        for i in 0..p.len() {
            let mut bad = p.clone();
            bad[i] ^= 0x10;
            let want = if i == 0 { Reject::Malformed } else { Reject::BadTag };
            assert_eq!(o.open(NOW, &bad), Err(want), "byte {i} flipped");
        }
        assert_eq!(o.open(NOW, &p[..p.len() - 1]), Err(Reject::BadTag));
        assert_eq!(o.open(NOW, &p[..20]), Err(Reject::Malformed));
        assert_eq!(o.open(NOW, &[]), Err(Reject::Malformed));
        assert_eq!(o.open(NOW + FRESH_MS + 1, &p), Err(Reject::Stale));
        assert_eq!(o.open(NOW - FRESH_MS - 1, &p), Err(Reject::Stale));
        let elsewhere = s.seal(NOW, addr("192.0.2.12:7946"), b"x");
        assert_eq!(o.open(NOW, &elsewhere), Err(Reject::Misdirected));
        // None of that took the packet's place: it still opens.
        assert_eq!(o.open(NOW + FRESH_MS, &p), Ok(&b"payload"[..]));
    }

    #[test]
    fn the_window_slides_and_old_counters_are_refused() {
        let mut g = ReplayGuard::default();
        assert_eq!(g.accept(1, 1000, NOW), Ok(()));
        assert_eq!(g.accept(1, 1000 - WINDOW + 1, NOW), Ok(()));
        assert_eq!(g.accept(1, 1000 - WINDOW, NOW), Err(Reject::Replayed));
        assert_eq!(g.accept(1, 5000, NOW), Ok(()));
        assert_eq!(g.accept(1, 1000, NOW), Err(Reject::Replayed));
        assert_eq!(g.accept(1, 4999, NOW), Ok(()));
        assert_eq!(g.accept(1, 4999, NOW), Err(Reject::Replayed));
        assert_eq!(g.accept(1, u64::MAX, NOW), Ok(()));
        assert_eq!(g.accept(1, u64::MAX, NOW), Err(Reject::Replayed));
    }

    #[test]
    fn senders_are_bounded() {
        let mut g = ReplayGuard::default();
        for s in 0..(MAX_SENDERS as u64 * 3) {
            assert_eq!(g.accept(s, 1, NOW + s), Ok(()));
            assert!(g.len() <= MAX_SENDERS);
        }
        // Quiet ones go first, all at once.
        let later = NOW + MAX_SENDERS as u64 * 3 + FORGET_AFTER_MS + 1;
        assert_eq!(g.accept(u64::MAX, 1, later), Ok(()));
        assert_eq!(g.len(), 1);
    }

    #[test]
    fn short_secrets_are_refused() {
        assert_eq!(check_secret(b""), Err(WeakSecret(0)));
        assert_eq!(check_secret(b"fifteen bytes!!"), Err(WeakSecret(15)));
        assert_eq!(check_secret(b"sixteen bytes!!!"), Ok(()));
        assert!(WeakSecret(3).to_string().contains("at least 16"));
    }
}

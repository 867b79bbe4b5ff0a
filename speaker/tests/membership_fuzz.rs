//! Fuzz of the membership's receive path (issue 12, §4): what arrives on UDP 7946 goes through
//! `wire::Gate::admit` (size, seal, freshness, replay, foca header, identity), then, as in the
//! speaker, `copies::FirstCopy` (every packet is sent twice; only the first copy reaches foca)
//! and, when admitted and first, into a real `Foca::handle_data`. Inputs, from one seeded
//! generator:
//!
//! ```text
//!   random bytes ─────────────────────────────> secure gate
//!   real foca packets, mutated ──> sealed ────> secure gate ──> first copy? ──> foca
//!                               └─ bare ──────> insecure gate ──> first copy? ──> foca, and foca directly
//!   sealed real packets, mutated after sealing > secure gate
//!   the last admitted payload sealed again (its second copy) > secure gate ──> dropped as a copy
//! ```
//!
//! No input may panic, and none may make the path allocate much: the most memory held at once
//! while one input is handled, above what was held before it, is measured (a counting global
//! allocator) and must stay under [`MAX_PER_INPUT`]. Foca's member list grows with the fake
//! members it is fed, so the foca instances start afresh every [`FRESH_EVERY`] inputs.
//!
//! `cargo test` runs 20,000 inputs; `make fuzz` runs `FERROLB_MEMBERSHIP_FUZZ_CASES` (10,000,000)
//! in release and prints the count, the outcomes and the allocation peak. `FERROLB_FUZZ_SEED`
//! picks the seed; a panic prints the case number and the input.

// The counting allocator below is the only unsafe code: a `GlobalAlloc` wrapper cannot be
// written without it.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ferrolb_speaker::membership::wire::{Gate, NodeAddrs, Sealer};
use ferrolb_speaker::membership::{Member, copies::FirstCopy, tuned_config};
use foca::{AccumulatingRuntime, Codec, Foca, Header, Message, PostcardCodec};
use rand::rngs::StdRng;
use rand::{Rng, RngExt, SeedableRng};

/// Bytes held now and the most held since the last reset (a counting allocator; a library such
/// as `stats_alloc` would do, this is the 20 lines needed).
struct Counting;

static HELD: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = HELD.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        HELD.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The most an input may make the path hold at once.
const MAX_PER_INPUT: usize = 256 * 1024;
/// Inputs between fresh foca instances.
const FRESH_EVERY: u64 = 20_000;

const SECRET: &[u8] = b"the fuzz's membership secret";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn member(node: &str, a: &str) -> Member {
    Member { node: node.into(), addr: addr(a), incarnation: 1_800_000_000_000 }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Real foca packets: a few members meeting (announce, feed, gossip, probes), and every kind
/// of message encoded once.
fn corpus(rng: &mut StdRng) -> Vec<Vec<u8>> {
    let names = [("node-1", "192.0.2.11:7946"), ("node-2", "192.0.2.12:7946"), ("node-3", "192.0.2.13:7946")];
    let mut fs: Vec<Foca<Member, PostcardCodec, StdRng, foca::NoCustomBroadcast>> = names
        .iter()
        .map(|(n, a)| Foca::new(member(n, a), tuned_config(3), StdRng::seed_from_u64(rng.next_u64()), PostcardCodec))
        .collect();
    let mut out = Vec::new();
    let mut rt = AccumulatingRuntime::new();
    let _ = fs[1].announce(member("", names[0].1), &mut rt);
    let _ = fs[2].announce(member("", names[0].1), &mut rt);
    let mut timers = Vec::new();
    for _ in 0..6 {
        let mut sends = Vec::new();
        while let Some((to, data)) = rt.to_send() {
            sends.push((to, data.to_vec()));
        }
        while let Some((_, t)) = rt.to_schedule() {
            timers.push(t);
        }
        while rt.to_notify().is_some() {}
        for (to, data) in sends {
            if let Some(f) = fs.iter_mut().find(|f| f.identity().addr == to.addr) {
                let _ = f.handle_data(&data, &mut rt);
            }
            out.push(data);
        }
        for (i, t) in std::mem::take(&mut timers).into_iter().enumerate() {
            let n = fs.len();
            let _ = fs[i % n].handle_timer(t, &mut rt);
        }
    }
    let (a, b) = (member("node-1", names[0].1), member("node-2", names[1].1));
    for message in [
        Message::Ping(1),
        Message::Ack(1),
        Message::PingReq { target: b.clone(), probe_number: 2 },
        Message::IndirectPing { origin: a.clone(), probe_number: 3 },
        Message::IndirectAck { target: b.clone(), probe_number: 4 },
        Message::ForwardedAck { origin: a.clone(), probe_number: 5 },
        Message::Announce,
        Message::Feed,
        Message::Gossip,
        Message::Broadcast,
        Message::TurnUndead,
    ] {
        let mut buf = Vec::new();
        let h = Header { src: b.clone(), src_incarnation: 3, dst: a.clone(), message };
        if PostcardCodec.encode_header(&h, &mut buf).is_ok() {
            out.push(buf);
        }
    }
    out
}

/// A random change of `p`: bits flipped, cut, bytes inserted or overwritten (large varints
/// included), or spliced with `other`.
fn mutate(rng: &mut StdRng, p: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = p.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let at = if v.is_empty() { 0 } else { rng.random_range(0..v.len()) };
        match rng.random_range(0..6) {
            0 if !v.is_empty() => v[at] ^= 1 << rng.random_range(0..8),
            1 => v.truncate(at),
            2 => {
                let n = rng.random_range(1..16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                v.splice(at..at, bytes);
            }
            3 => {
                let run = rng.random_range(1..10).min(v.len() - at.min(v.len()));
                v[at..at + run].fill(0xff);
            }
            4 => {
                let cut = if other.is_empty() { 0 } else { rng.random_range(0..other.len()) };
                v.truncate(at);
                v.extend_from_slice(&other[cut..]);
            }
            _ if !v.is_empty() => v[at] = rng.random(),
            _ => v.push(rng.random()),
        }
    }
    v
}

#[derive(Default, Debug)]
struct Tally {
    admitted: u64,
    /// Admitted, but a later copy of a payload foca already had.
    copies: u64,
    rejected: BTreeMap<&'static str, u64>,
    foca_ok: u64,
    foca_err: u64,
    peak: usize,
}

#[test]
fn the_membership_decoder_survives_anything() {
    let cases: u64 = std::env::var("FERROLB_MEMBERSHIP_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let seed: u64 = std::env::var("FERROLB_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(now_ms);
    let mut rng = StdRng::seed_from_u64(seed);
    let corpus = corpus(&mut rng);
    assert!(corpus.len() >= 15, "the corpus is too small: {}", corpus.len());

    let local = addr("192.0.2.11:7946");
    let nodes: NodeAddrs =
        (1..=3).map(|i| (format!("node-{i}"), vec![format!("192.0.2.1{i}").parse().unwrap()])).collect();
    let senders = [addr("192.0.2.12:7946"), addr("192.0.2.13:7946"), addr("192.0.2.66:7946")];
    let fresh_foca = |rng: &mut StdRng| {
        Foca::new(
            member("node-1", "192.0.2.11:7946"),
            tuned_config(3),
            StdRng::seed_from_u64(rng.next_u64()),
            PostcardCodec,
        )
    };
    let mut foca = fresh_foca(&mut rng);
    let mut first_copy = FirstCopy::default();
    // The last payload admitted and who sent it: its second copy is a later input.
    let mut last: Option<(SocketAddr, Vec<u8>)> = None;
    let mut secure = Gate::new(Some(SECRET), local);
    let mut insecure = Gate::new(None, local);
    let mut sealer = Sealer::new(SECRET, rng.next_u64());
    let mut rt = AccumulatingRuntime::new();
    let mut tally = Tally::default();
    let started = Instant::now();
    let mut now = now_ms();

    for case in 0..cases {
        if case % FRESH_EVERY == 0 && case > 0 {
            foca = fresh_foca(&mut rng);
            first_copy = FirstCopy::default();
            last = None;
            secure = Gate::new(Some(SECRET), local);
            now = now_ms();
        }
        let kind = rng.random_range(0..5u8);
        let mut from = senders[rng.random_range(0..senders.len())];
        // The receiver's monotonic clock, in milliseconds: 50 inputs a millisecond, so payloads
        // are forgotten as they are in the speaker.
        let clock_ms = case / 50;
        let base = &corpus[rng.random_range(0..corpus.len())];
        let other = &corpus[rng.random_range(0..corpus.len())];
        let input: Vec<u8> = match kind {
            0 => {
                let n = rng.random_range(0..1600);
                (0..n).map(|_| rng.random()).collect()
            }
            1 | 2 => mutate(&mut rng, base, other),
            3 => {
                let sealed = sealer.seal(now, local, base);
                mutate(&mut rng, &sealed, other)
            }
            _ => match &last {
                Some((sender, payload)) => {
                    from = *sender;
                    sealer.seal(now, local, payload)
                }
                None => (0..rng.random_range(0..1600)).map(|_| rng.random()).collect(),
            },
        };
        let sealed_input;
        let packet: &[u8] = if kind == 1 {
            sealed_input = sealer.seal(now + rng.random_range(0..100), local, &input);
            &sealed_input
        } else {
            &input
        };

        let before = HELD.load(Ordering::Relaxed);
        PEAK.store(before, Ordering::Relaxed);
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let gate = if kind == 2 { &mut insecure } else { &mut secure };
            let admitted = gate.admit(now, from, packet, Some(&nodes)).map(<[u8]>::to_vec);
            let direct = if kind == 2 { Some(foca.handle_data(packet, &mut rt).is_ok()) } else { None };
            let first = admitted.as_ref().ok().filter(|p| first_copy.first(clock_ms, p));
            let fed = first.map(|p| foca.handle_data(p, &mut rt).is_ok());
            while rt.to_send().is_some() {}
            while rt.to_schedule().is_some() {}
            while rt.to_notify().is_some() {}
            (admitted, direct, fed)
        }));
        let peak = PEAK.load(Ordering::Relaxed).saturating_sub(before);
        let (admitted, direct, fed) = match outcome {
            Ok(o) => o,
            Err(e) => {
                eprintln!("case {case} (seed {seed}, kind {kind}) panicked on {packet:02x?}");
                resume_unwind(e);
            }
        };
        assert!(
            peak <= MAX_PER_INPUT,
            "case {case} (seed {seed}, kind {kind}) held {peak} bytes more at once, input {packet:02x?}"
        );
        tally.peak = tally.peak.max(peak);
        match admitted {
            Ok(payload) => {
                tally.admitted += 1;
                // A second copy of a payload admitted a moment ago never reaches foca.
                assert!(
                    kind != 4 || fed.is_none(),
                    "case {case} (seed {seed}): a second copy reached foca, input {packet:02x?}"
                );
                if fed.is_none() {
                    tally.copies += 1;
                } else if kind != 2 {
                    last = Some((from, payload));
                }
            }
            Err(r) => *tally.rejected.entry(r.label()).or_default() += 1,
        }
        for ok in [direct, fed].into_iter().flatten() {
            if ok { tally.foca_ok += 1 } else { tally.foca_err += 1 }
        }
    }
    let took = started.elapsed();
    println!(
        "membership fuzz: {cases} inputs (seed {seed}) in {:.1} s ({:.0}/s); admitted {} ({} of them later copies, kept from foca), rejected {:?}; foca accepted {}, refused {}; most held at once by one input: {} bytes",
        took.as_secs_f64(),
        cases as f64 / took.as_secs_f64().max(1e-9),
        tally.admitted,
        tally.copies,
        tally.rejected,
        tally.foca_ok,
        tally.foca_err,
        tally.peak
    );
    // The generator reaches every part of the path.
    assert!(tally.admitted > 0, "nothing was admitted: the generator misses foca");
    assert!(tally.copies > 0, "no second copy was admitted: the generator misses FirstCopy");
    for reason in ["malformed", "bad_tag", "identity"] {
        assert!(tally.rejected.get(reason).copied().unwrap_or(0) > 0, "no input was {reason}: {:?}", tally.rejected);
    }
    assert!(tally.foca_ok > 0 && tally.foca_err > 0, "foca saw too little variety: {tally:?}");
}

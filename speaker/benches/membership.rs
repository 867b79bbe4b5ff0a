//! `make bench-membership`: the membership simulated, to plan past the lab's three nodes.
//!
//! ```text
//!   N × Foca (the speaker's tuned_config(N), Member, PostcardCodec)
//!        │ packets                         ▲ packets (lost with probability p, late by a delay)
//!        └──> event queue, virtual time ───┘ timers (foca's own, at virtual times)
//!   a victim at a time: killed (silent) ──> who declares it down, when ──> revived later
//! ```
//!
//! Deterministic (one seed) and in virtual time, so an hour of a cluster runs in seconds or
//! minutes. Every member is a real `foca::Foca` with the speaker's timers, identity type and
//! codec; what is simulated is the network (loss per packet, a delay of 0.2–2 ms with a 20 ms
//! spike on 1 % of packets) and the seal: bytes are foca's payload plus [`wire::OVERHEAD`] (the
//! HMAC seal), not counting IP and UDP headers (28 more bytes a packet over IPv4). Members
//! start knowing each other (as a settled cluster does); the speaker's retuning on membership
//! changes is left out (timers are those of `tuned_config(N)` throughout).
//!
//! Measured, per cluster size and loss:
//! - detection: a random member is killed (no goodbye); from the kill to the first member
//!   declaring it down, to each member doing so, and to all that knew it doing so; then it
//!   comes back (a restart: a new incarnation) and the next victim is killed a few seconds
//!   later;
//! - false alarms: suspicions of, and deaths declared for, members that were alive, counted
//!   once each (a suspicion seen by many members is one), per simulated hour (extrapolated
//!   from the simulated time where that is shorter);
//! - bytes and packets sent per second per node, mean and max.
//!
//! Cost, and why 5,000 is opt-in: foca 2 keeps its members in a `Vec` and finds one by a linear
//! search on its address (`Members::apply`, on every update and on the sender of every packet).
//! So a member of `n` costs `O(n)` per packet, the cluster `O(n²)` per simulated second, and
//! settling (`n` members each learning `n - 1` others, one search each) `O(n³)`. A profile
//! (`perf`, 5,000 members) puts 92 % of the time in `Members::apply` while settling; at 1,000
//! members, mostly in steady state, 57 %. Measured on the loaded 2-core machine (load 7–11): 2,000
//! members settle in ~55 s and then run ~0.4 simulated s per wall s; 5,000 members settle at
//! ~0.65 s per member (a thread per scenario: about an hour before the first simulated second;
//! the dearer per member because a member's list, 360 kB, no longer stays in cache) and would
//! then run at least (5,000 / 2,000)² = 6 times slower than 2,000. Joining from a few seeds instead (gossip
//! filling each member in) does the same `n²` insertions per member, plus feeds. A real speaker
//! pays the same search once per packet: tens of microseconds at 5,000, which is fine; it is
//! simulating 5,000 of them on one machine that is not.
//!
//! Environment: `FERROLB_SIM_SIZES` (default `3,1000`; `3,1000,5000` for 5,000, see above),
//! `FERROLB_SIM_SCALE` (simulated time × this; default 1: an hour for 3, 2 minutes for 1,000,
//! which take about 2 minutes of a loaded 2-core machine; 30 s for more; 5 gives 1,000 members
//! 10 minutes), `FERROLB_SIM_SEED`, `FERROLB_SIM_THREADS` (default 2), `FERROLB_SIM_PROGRESS`
//! (set: print settling and every 5 simulated seconds, with the wall time); for exploring
//! timers, `FERROLB_SIM_PROBE_MS`, `FERROLB_SIM_RTT_MS`, `FERROLB_SIM_SUSPECT_MS` override
//! `tuned_config`'s.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferrolb_speaker::membership::{Member, copies, tuned_config, wire};
use foca::{AccumulatingRuntime, Config, Foca, Identity, OwnedNotification, PostcardCodec, State, Timer};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

type Node = Foca<Member, PostcardCodec, StdRng, foca::NoCustomBroadcast>;
/// Timers a member asked for, and after how long.
type Timers = Vec<(Duration, Timer<Member>)>;

const SEC: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;
/// A victim not declared down by everyone that knew it within this long is counted as missed.
const GIVE_UP: u64 = 30 * SEC;

/// One run: a cluster size and a network.
#[derive(Clone)]
struct Scenario {
    members: usize,
    /// Loss of every packet.
    loss: f64,
    /// Extra loss of every packet to or from member 0 (the lab's lossy link).
    lossy_link: f64,
    secs: u64,
    seed: u64,
}

impl Scenario {
    fn loss_label(&self) -> String {
        if self.lossy_link > 0.0 {
            format!("{} % on one node's link", self.lossy_link * 100.0)
        } else {
            format!("{} %", self.loss * 100.0)
        }
    }
}

#[derive(Default)]
struct Report {
    kills: usize,
    missed: usize,
    first: Vec<u64>,
    each: Vec<u64>,
    all: Vec<u64>,
    false_suspicions: usize,
    false_downs: usize,
    secs: u64,
    bytes_mean: f64,
    bytes_max: f64,
    packets_mean: f64,
    wall: Duration,
}

enum Kind {
    Deliver { to: u32, epoch: u32, data: Vec<u8> },
    Timer { node: u32, epoch: u32, timer: Timer<Member> },
    Kill,
    Revive(u32),
    GiveUp(usize),
}

struct Event {
    at: u64,
    seq: u64,
    kind: Kind,
}

impl PartialEq for Event {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Event {}
impl PartialOrd for Event {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Event {
    // The earliest first out of a max-heap.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

struct Slot {
    foca: Node,
    id: Member,
    alive: bool,
    /// Bumped on every restart, so the old instance's timers and packets in flight die with it.
    epoch: u32,
    revived_at: u64,
    bytes: u64,
    packets: u64,
}

struct Victim {
    serial: usize,
    slot: u32,
    id: Member,
    killed_at: u64,
    knowers: HashSet<u32>,
    declared: HashSet<u32>,
}

struct Sim {
    sc: Scenario,
    config: Config,
    /// Copies of each packet sent (the receiver keeps the first).
    copies: usize,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Event>,
    slots: Vec<Slot>,
    by_addr: HashMap<SocketAddr, u32>,
    rng: StdRng,
    rt: AccumulatingRuntime<Member>,
    victim: Option<Victim>,
    serial: usize,
    suspicions: HashSet<(u32, u64, u16)>,
    downs: HashSet<(u32, u64)>,
    report: Report,
}

fn identity(i: usize, incarnation: u64) -> Member {
    // 198.18.0.0/15: the benchmarking range (nothing is sent anywhere).
    let ip = Ipv4Addr::new(198, 18 + (i / 65_000) as u8, ((i % 65_000) / 250) as u8, (i % 250 + 1) as u8);
    Member { node: format!("node-{}", i + 1), addr: SocketAddr::new(IpAddr::V4(ip), 7946), incarnation }
}

fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// The speaker's timers for `n` members, with the exploring overrides.
fn config(n: usize) -> Config {
    let mut c = tuned_config(n);
    if let Some(ms) = env::<u64>("FERROLB_SIM_PROBE_MS") {
        c.probe_period = Duration::from_millis(ms);
    }
    if let Some(ms) = env::<u64>("FERROLB_SIM_RTT_MS") {
        c.probe_rtt = Duration::from_millis(ms);
    }
    if let Some(ms) = env::<u64>("FERROLB_SIM_SUSPECT_MS") {
        c.suspect_to_down_after = Duration::from_millis(ms);
    }
    c
}

fn ns(d: Duration) -> u64 {
    d.as_nanos() as u64
}

/// A settled cluster: every member knows every other, alive (built on `threads` threads: foca
/// finds a member by a linear search, so this is quadratic per member).
fn settled(sc: &Scenario, config: &Config, threads: usize) -> Vec<(Node, Timers)> {
    let ids: Vec<Member> = (0..sc.members).map(|i| identity(i, 1)).collect();
    let chunk = sc.members.div_ceil(threads.max(1));
    let started = Instant::now();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..sc.members)
            .step_by(chunk.max(1))
            .map(|from| {
                let ids = &ids;
                let started = &started;
                s.spawn(move || {
                    (from..(from + chunk).min(ids.len()))
                        .map(|i| {
                            if std::env::var_os("FERROLB_SIM_PROGRESS").is_some() && i % 250 == 0 {
                                eprintln!("    settling member {i} at {:.1?}", started.elapsed());
                            }
                            let rng = StdRng::seed_from_u64(sc.seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                            let mut foca = Foca::new(ids[i].clone(), config.clone(), rng, PostcardCodec);
                            let mut rt = AccumulatingRuntime::new();
                            let others = ids.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, m)| m.clone());
                            foca.apply_many(others.map(foca::Member::alive), false, &mut rt).expect("apply_many");
                            while rt.to_notify().is_some() {}
                            let mut timers = Vec::new();
                            while let Some(t) = rt.to_schedule() {
                                timers.push(t);
                            }
                            (foca, timers)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("a settling thread panicked")).collect()
    })
}

impl Sim {
    fn new(sc: Scenario, threads: usize) -> Sim {
        let config = config(sc.members);
        let mut rng = StdRng::seed_from_u64(sc.seed);
        let period = ns(config.probe_period);
        let mut sim = Sim {
            config: config.clone(),
            copies: env("FERROLB_SIM_COPIES").unwrap_or(copies::COPIES),
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            slots: Vec::with_capacity(sc.members),
            by_addr: HashMap::new(),
            rng: StdRng::seed_from_u64(sc.seed.wrapping_add(1)),
            rt: AccumulatingRuntime::new(),
            victim: None,
            serial: 0,
            suspicions: HashSet::new(),
            downs: HashSet::new(),
            report: Report { secs: sc.secs, ..Report::default() },
            sc: sc.clone(),
        };
        for (i, (foca, timers)) in settled(&sc, &config, threads).into_iter().enumerate() {
            // Members did not all start at once: each probes at a phase of its own.
            let phase = rng.random_range(0..period.max(1));
            for (after, timer) in timers {
                sim.push(phase + ns(after), Kind::Timer { node: i as u32, epoch: 0, timer });
            }
            sim.by_addr.insert(foca.identity().addr, i as u32);
            let id = foca.identity().clone();
            sim.slots.push(Slot { foca, id, alive: true, epoch: 0, revived_at: 0, bytes: 0, packets: 0 });
        }
        // The first half is quiet (false alarms are counted there), kills in the second.
        sim.push(sim.sc.secs * SEC / 2, Kind::Kill);
        sim
    }

    fn push(&mut self, at: u64, kind: Kind) {
        self.seq += 1;
        self.queue.push(Event { at, seq: self.seq, kind });
    }

    fn delay(&mut self) -> u64 {
        let base = self.rng.random_range(200_000..2_000_000);
        if self.rng.random_bool(0.01) { base + self.rng.random_range(0..20 * MS) } else { base }
    }

    /// When a packet from `from` reaches `to`, if it does: the first of its copies to arrive.
    fn arrival(&mut self, from: u32, to: u32) -> Option<u64> {
        let link = if from == 0 || to == 0 { self.sc.lossy_link } else { 0.0 };
        let p = 1.0 - (1.0 - self.sc.loss) * (1.0 - link);
        let mut first = None;
        for _ in 0..self.copies {
            if p == 0.0 || !self.rng.random_bool(p) {
                let at = self.delay();
                first = Some(first.map_or(at, |f: u64| f.min(at)));
            }
        }
        first
    }

    fn run(mut self) -> Report {
        let started = Instant::now();
        let end = self.sc.secs * SEC;
        let progress = std::env::var_os("FERROLB_SIM_PROGRESS").is_some();
        let mut next_report = 0;
        while let Some(ev) = self.queue.pop() {
            if ev.at > end {
                break;
            }
            self.now = ev.at;
            if progress && self.now >= next_report {
                eprintln!(
                    "    {} members, {}: {} s simulated after {:.1?}, {} kills",
                    self.sc.members,
                    self.sc.loss_label(),
                    self.now / SEC,
                    started.elapsed(),
                    self.report.kills
                );
                next_report += 5 * SEC;
            }
            match ev.kind {
                Kind::Deliver { to, epoch, data } => {
                    let slot = &mut self.slots[to as usize];
                    if slot.alive && slot.epoch == epoch {
                        let _ = slot.foca.handle_data(&data, &mut self.rt);
                        self.after(to);
                    }
                }
                Kind::Timer { node, epoch, timer } => {
                    let slot = &mut self.slots[node as usize];
                    if slot.alive && slot.epoch == epoch {
                        let _ = slot.foca.handle_timer(timer, &mut self.rt);
                        self.after(node);
                    }
                }
                Kind::Kill => self.kill(),
                Kind::Revive(slot) => self.revive(slot),
                Kind::GiveUp(serial) => {
                    if self.victim.as_ref().is_some_and(|v| v.serial == serial) {
                        self.report.missed += 1;
                        self.finish();
                    }
                }
            }
        }
        let secs = self.sc.secs as f64;
        let n = self.slots.len() as f64;
        self.report.bytes_mean = self.slots.iter().map(|s| s.bytes as f64).sum::<f64>() / n / secs;
        self.report.bytes_max = self.slots.iter().map(|s| s.bytes as f64).fold(0.0, f64::max) / secs;
        self.report.packets_mean = self.slots.iter().map(|s| s.packets as f64).sum::<f64>() / n / secs;
        self.report.false_suspicions = self.suspicions.len();
        self.report.false_downs = self.downs.len();
        self.report.wall = started.elapsed();
        self.report
    }

    /// Sends, schedules and reads what member `i` just produced.
    fn after(&mut self, i: u32) {
        let epoch = self.slots[i as usize].epoch;
        while let Some((to, data)) = self.rt.to_send() {
            let slot = &mut self.slots[i as usize];
            slot.bytes += (self.copies * (data.len() + wire::OVERHEAD)) as u64;
            slot.packets += self.copies as u64;
            let Some(&j) = self.by_addr.get(&to.addr) else { continue };
            let Some(delay) = self.arrival(i, j) else { continue };
            let at = self.now + delay;
            let epoch = self.slots[j as usize].epoch;
            self.push(at, Kind::Deliver { to: j, epoch, data: data.to_vec() });
        }
        while let Some((after, timer)) = self.rt.to_schedule() {
            if let Timer::ChangeSuspectToDown { member_id, incarnation, .. } = &timer
                && self.quiet()
                && let Some(j) = self.current(member_id)
            {
                self.suspicions.insert((j, member_id.incarnation, *incarnation));
            }
            self.push(self.now + ns(after), Kind::Timer { node: i, epoch, timer });
        }
        while let Some(n) = self.rt.to_notify() {
            match n {
                OwnedNotification::MemberDown(m) => self.down(i, &m),
                OwnedNotification::Rejoin(m) => self.slots[i as usize].id = m,
                _ => {}
            }
        }
    }

    /// In the quiet first half, where false alarms are counted.
    fn quiet(&self) -> bool {
        self.now < self.sc.secs * SEC / 2
    }

    /// The slot of `m` if `m` is that slot's live self.
    fn current(&self, m: &Member) -> Option<u32> {
        let j = *self.by_addr.get(&m.addr)?;
        let slot = &self.slots[j as usize];
        (slot.alive && slot.id == *m).then_some(j)
    }

    fn down(&mut self, observer: u32, m: &Member) {
        if let Some(j) = self.current(m) {
            if self.quiet() {
                self.downs.insert((j, m.incarnation));
            }
            return;
        }
        let Some(v) = self.victim.as_mut() else { return };
        if v.id != *m || !v.knowers.contains(&observer) || !v.declared.insert(observer) {
            return;
        }
        let took = self.now - v.killed_at;
        if v.declared.len() == 1 {
            self.report.first.push(took);
        }
        self.report.each.push(took);
        if v.declared.len() == v.knowers.len() {
            self.report.all.push(took);
            self.finish();
        }
    }

    fn kill(&mut self) {
        let now = self.now;
        let candidates: Vec<u32> = (0..self.slots.len() as u32)
            .filter(|&i| {
                let s = &self.slots[i as usize];
                s.alive && (s.revived_at == 0 || now - s.revived_at > 5 * SEC)
            })
            .collect();
        if candidates.is_empty() {
            self.push(now + SEC, Kind::Kill);
            return;
        }
        let slot = candidates[self.rng.random_range(0..candidates.len())];
        let id = self.slots[slot as usize].id.clone();
        let knowers = (0..self.slots.len() as u32)
            .filter(|&i| {
                let s = &self.slots[i as usize];
                i != slot && s.alive && s.foca.iter_members().any(|m| *m.id() == id)
            })
            .collect();
        self.slots[slot as usize].alive = false;
        self.serial += 1;
        self.report.kills += 1;
        self.victim = Some(Victim { serial: self.serial, slot, id, killed_at: now, knowers, declared: HashSet::new() });
        self.push(now + GIVE_UP, Kind::GiveUp(self.serial));
    }

    /// The victim is settled (or given up on): it restarts a second later, and the next one
    /// dies a few seconds after that.
    fn finish(&mut self) {
        let Some(v) = self.victim.take() else { return };
        self.push(self.now + SEC, Kind::Revive(v.slot));
        let gap = self.rng.random_range(2 * SEC..5 * SEC);
        self.push(self.now + gap, Kind::Kill);
    }

    /// A restart: a new incarnation that learns the members from a live one (the speaker
    /// announces to every Node) and announces itself to it.
    fn revive(&mut self, slot: u32) {
        let live: Vec<u32> = (0..self.slots.len() as u32).filter(|&i| self.slots[i as usize].alive).collect();
        let Some(&via) = live.get(self.rng.random_range(0..live.len().max(1))) else { return };
        let id = self.slots[slot as usize].id.renew().expect("Member renews");
        let rng = StdRng::seed_from_u64(self.rng.random());
        let mut foca = Foca::new(id.clone(), self.config.clone(), rng, PostcardCodec);
        let source = &self.slots[via as usize].foca;
        let known: Vec<foca::Member<Member>> = source
            .iter_membership_state()
            .filter(|m| m.state() != State::Down && m.id().addr != id.addr)
            .cloned()
            .chain(std::iter::once(foca::Member::alive(source.identity().clone())))
            .collect();
        let _ = foca.apply_many(known.into_iter(), false, &mut self.rt);
        let _ = foca.announce(source.identity().clone(), &mut self.rt);
        let s = &mut self.slots[slot as usize];
        s.foca = foca;
        s.id = id;
        s.alive = true;
        s.epoch += 1;
        s.revived_at = self.now;
        while self.rt.to_notify().is_some() {}
        self.after(slot);
    }
}

fn pct(v: &mut [u64], q: f64) -> String {
    if v.is_empty() {
        return "–".into();
    }
    v.sort_unstable();
    let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    format!("{}", v[i] / MS)
}

fn per_hour(count: usize, secs: u64) -> String {
    let h = count as f64 * 3600.0 / secs as f64;
    if count == 0 { "0".into() } else { format!("{h:.1} ({count})") }
}

fn main() {
    let sizes: Vec<usize> = std::env::var("FERROLB_SIM_SIZES")
        .unwrap_or_else(|_| "3,1000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let scale: f64 = env("FERROLB_SIM_SCALE").unwrap_or(1.0);
    let seed: u64 = env("FERROLB_SIM_SEED").unwrap_or(1);
    let threads: usize = env("FERROLB_SIM_THREADS").unwrap_or(2);
    let mut scenarios = Vec::new();
    for &members in &sizes {
        let base = match members {
            0..=100 => 3600,
            101..=1000 => 120,
            _ => 30,
        };
        let secs = ((base as f64 * scale) as u64).max(30);
        for loss in [0.0, 0.01] {
            scenarios.push(Scenario { members, loss, lossy_link: 0.0, secs, seed });
        }
        if members <= 10 {
            scenarios.push(Scenario { members, loss: 0.0, lossy_link: 0.05, secs, seed });
        }
    }
    let c3 = config(3);
    eprintln!(
        "membership simulation: {} scenarios on {threads} threads (3 members: probe {:?}, rtt {:?}, suspicion {:?})",
        scenarios.len(),
        c3.probe_period,
        c3.probe_rtt,
        c3.suspect_to_down_after
    );
    // Large clusters first, so the two threads finish together.
    let mut order: Vec<usize> = (0..scenarios.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(scenarios[i].members));
    let work = Mutex::new(order.into_iter());
    let results: Mutex<Vec<Option<Report>>> = Mutex::new((0..scenarios.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                loop {
                    let next = work.lock().expect("work").next();
                    let Some(i) = next else { return };
                    let sc = scenarios[i].clone();
                    let started = Instant::now();
                    let sim = Sim::new(sc.clone(), 1);
                    let settle = started.elapsed();
                    let report = sim.run();
                    eprintln!(
                        "  {} members, {} loss: {} s simulated in {:.0?} (+{:.0?} settling)",
                        sc.members,
                        sc.loss_label(),
                        sc.secs,
                        report.wall,
                        settle
                    );
                    results.lock().expect("results")[i] = Some(report);
                }
            });
        }
    });
    println!();
    println!(
        "| members | loss | simulated | kills | first down p50 / p99 ms | each member p50 / p99 ms | all down p50 / p99 ms | false suspicions /h | false downs /h | bytes/s per node mean / max | packets/s per node |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (sc, r) in scenarios.iter().zip(results.into_inner().expect("results")) {
        let Some(mut r) = r else { continue };
        let missed = if r.missed > 0 { format!(" ({} missed)", r.missed) } else { String::new() };
        println!(
            "| {} | {} | {} s | {}{} | {} / {} | {} / {} | {} / {} | {} | {} | {:.0} / {:.0} | {:.1} |",
            sc.members,
            sc.loss_label(),
            r.secs,
            r.kills,
            missed,
            pct(&mut r.first, 0.5),
            pct(&mut r.first, 0.99),
            pct(&mut r.each, 0.5),
            pct(&mut r.each, 0.99),
            pct(&mut r.all, 0.5),
            pct(&mut r.all, 0.99),
            per_hour(r.false_suspicions, r.secs / 2),
            per_hour(r.false_downs, r.secs / 2),
            r.bytes_mean,
            r.bytes_max,
            r.packets_mean,
        );
    }
    println!();
    println!(
        "Timers: tuned_config(N). Network: delay 0.2–2 ms (+0–20 ms on 1 % of packets), independent loss per packet. Bytes: foca payload + {} B seal (no IP/UDP headers). False alarms per hour extrapolated from the simulated time (count in brackets).",
        wire::OVERHEAD
    );
}

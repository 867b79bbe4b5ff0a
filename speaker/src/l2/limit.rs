//! How often one asker gets an answer: a token bucket per source MAC, so a host (or a loop)
//! that floods requests for an announced address cannot make this node flood the LAN back.
//!
//! ```text
//!  request from MAC m ──> bucket of m (refilled at RATE/s up to BURST) ──> a token? answer : drop
//! ```
//!
//! The table of buckets is bounded: a flood of forged source MACs cannot grow memory. It is kept
//! as two generations; a new source goes into the current one, and when that is half the
//! capacity full the previous generation is dropped and the current one becomes the previous.
//! A source seen in the previous generation moves back with its bucket, so an active asker
//! keeps its state; only sources idle for a whole generation are forgotten (and start again with a
//! full bucket, which is what they would have by then anyway, unless a flood of forged sources
//! is rotating the generations fast). Every step is O(1); nothing is scanned.
//!
//! Written by hand (a dozen lines of token bucket over `HashMap`): the keyed limiters of crates
//! such as `governor` keep a key forever unless swept, which is the growth this avoids.

use std::collections::HashMap;
use std::time::Instant;

use pnet_base::MacAddr;

/// Answers per second to one source, after its burst. A router refreshing its entries for
/// thousands of LoadBalancer addresses asks a few hundred times a second, and `ferrolb-lab
/// chaos` watches 4 addresses every 5 ms (800/s) from one client: both stay well inside, while
/// one asker can make a speaker send no more than ~60 KB/s of answers.
pub const RATE: f64 = 1000.0;
/// Answers one source may get at once.
pub const BURST: f64 = 2000.0;
/// Sources remembered at most.
pub const CAPACITY: usize = 4096;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Token buckets per source MAC, at most `capacity` of them.
#[derive(Debug)]
pub struct RateLimit {
    rate: f64,
    burst: f64,
    /// Entries per generation before it rolls over.
    half: usize,
    /// Sources seen since the last roll-over.
    current: HashMap<MacAddr, Bucket>,
    /// Sources seen in the generation before.
    previous: HashMap<MacAddr, Bucket>,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit::new(RATE, BURST, CAPACITY)
    }
}

/// The environment variable that sets [`RATE`] (the burst is twice it), for benchmarks that
/// ask faster than any real client.
pub const RATE_ENV: &str = "FERROLB_L2_ANSWER_RATE";

impl RateLimit {
    /// The default limits, with the rate from [`RATE_ENV`] if it holds a positive number.
    pub fn from_env() -> Self {
        match std::env::var(RATE_ENV).ok().and_then(|v| v.parse::<f64>().ok()).filter(|r| r.is_finite() && *r > 0.0) {
            Some(rate) => RateLimit::new(rate, 2.0 * rate, CAPACITY),
            None => RateLimit::default(),
        }
    }

    /// `rate` tokens a second up to `burst`, for at most `capacity` sources (at least 2).
    pub fn new(rate: f64, burst: f64, capacity: usize) -> Self {
        let half = (capacity / 2).max(1);
        RateLimit { rate, burst, half, current: HashMap::new(), previous: HashMap::new() }
    }

    /// Whether `source` may have an answer at `now` (and if so, that answer is counted).
    pub fn allow(&mut self, source: MacAddr, now: Instant) -> bool {
        if !self.current.contains_key(&source) {
            let bucket = self.previous.remove(&source).unwrap_or(Bucket { tokens: self.burst, last: now });
            if self.current.len() >= self.half {
                self.previous = std::mem::take(&mut self.current);
            }
            self.current.insert(source, bucket);
        }
        let Some(b) = self.current.get_mut(&source) else { return false };
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Sources remembered now.
    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn mac(n: u32) -> MacAddr {
        let b = n.to_be_bytes();
        MacAddr(0x02, 0, b[0], b[1], b[2], b[3])
    }

    #[test]
    fn a_burst_then_the_rate() {
        let mut l = RateLimit::default();
        let t0 = Instant::now();
        let allowed = (0..10_000).filter(|_| l.allow(mac(1), t0)).count();
        assert_eq!(allowed, BURST as usize, "the burst");
        // One second later: RATE more.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!((0..10_000).filter(|_| l.allow(mac(1), t1)).count(), RATE as usize);
        // Another source is not affected.
        assert!(l.allow(mac(2), t1));
        // A long pause refills to the burst, not beyond.
        let t2 = t1 + Duration::from_secs(3600);
        assert_eq!((0..10_000).filter(|_| l.allow(mac(1), t2)).count(), BURST as usize);
    }

    #[test]
    fn a_steady_asker_within_the_rate_is_always_answered() {
        let mut l = RateLimit::default();
        let t0 = Instant::now();
        for i in 0..10_000u32 {
            assert!(l.allow(mac(7), t0 + Duration::from_millis(u64::from(i) * 20)), "request {i}");
        }
    }

    #[test]
    fn forged_sources_do_not_grow_the_table_nor_reset_an_active_asker() {
        let mut l = RateLimit::new(RATE, BURST, 64);
        let t0 = Instant::now();
        // The abuser spends its burst…
        while l.allow(mac(0), t0) {}
        // …while forged sources pour in; it keeps asking, so it stays remembered, empty.
        for n in 1..100_000u32 {
            assert!(l.allow(mac(n), t0), "a new source gets its first answer");
            if n % 8 == 0 {
                assert!(!l.allow(mac(0), t0), "after {n} forged sources");
            }
            assert!(l.len() <= 64, "{} entries", l.len());
        }
    }

    #[test]
    fn time_going_backwards_does_not_panic_or_refill() {
        let mut l = RateLimit::new(1.0, 1.0, 8);
        let t0 = Instant::now() + Duration::from_secs(10);
        assert!(l.allow(mac(1), t0));
        assert!(!l.allow(mac(1), t0 - Duration::from_secs(5)));
    }
}

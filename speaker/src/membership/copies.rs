//! Every membership packet goes out [`COPIES`] times; the receiver keeps the first copy.
//!
//! SWIM suspects a member when one probe fails: the ping or its answer lost, and the indirect
//! round through other members lost too. With three members there is one helper only, so a
//! probe fails about as often as two packets out of six are lost: at 1 % loss, a few hundred
//! false suspicions an hour; at 5 % on one node's link, over a thousand (the membership
//! simulation, `make bench-membership`). No timer fixes that: the probe itself has to be
//! surer. Two copies make a packet lost only when both are, 1 % into 0.01 %, for twice the
//! bytes (a few kB/s per node). Copies are sealed apart (each has its own counter), so the
//! replay guard takes both; this is what keeps the second from reaching foca.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};

/// Copies of each packet sent.
pub const COPIES: usize = 2;
/// How long a payload is remembered: copies sent back to back arrive well within this.
pub const REMEMBER_MS: u64 = 1_000;
/// Payloads remembered at most; past that the oldest are forgotten first.
pub const MAX_REMEMBERED: usize = 16_384;

/// Tells the first copy of a payload from the later ones.
#[derive(Debug, Default)]
pub struct FirstCopy {
    /// Keyed at random per process, so no sender can aim at a collision.
    hasher: RandomState,
    /// Hashes of the payloads seen, and when.
    seen: HashMap<u64, u64>,
    /// The same, oldest first, to forget them in order.
    order: VecDeque<(u64, u64)>,
}

impl FirstCopy {
    /// True if `payload` was not seen in the last [`REMEMBER_MS`] (by a monotonic clock, in
    /// milliseconds).
    pub fn first(&mut self, now_ms: u64, payload: &[u8]) -> bool {
        while let Some(&(at, hash)) = self.order.front() {
            if now_ms.saturating_sub(at) < REMEMBER_MS && self.order.len() < MAX_REMEMBERED {
                break;
            }
            self.order.pop_front();
            if self.seen.get(&hash) == Some(&at) {
                self.seen.remove(&hash);
            }
        }
        let hash = self.hasher.hash_one(payload);
        if self.seen.contains_key(&hash) {
            return false;
        }
        self.seen.insert(hash, now_ms);
        self.order.push_back((now_ms, hash));
        true
    }

    /// Payloads remembered now.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_first_copy_passes_until_it_is_forgotten() {
        let mut f = FirstCopy::default();
        assert!(f.first(10, b"ping 1"));
        assert!(!f.first(11, b"ping 1"));
        assert!(f.first(11, b"ping 2"));
        assert!(!f.first(10 + REMEMBER_MS - 1, b"ping 1"));
        // Remembered no longer: the same bytes later are a new packet.
        assert!(f.first(10 + REMEMBER_MS, b"ping 1"));
    }

    #[test]
    fn memory_is_bounded() {
        let mut f = FirstCopy::default();
        for i in 0..(2 * MAX_REMEMBERED as u64) {
            assert!(f.first(0, &i.to_be_bytes()));
        }
        assert!(f.len() <= MAX_REMEMBERED);
        assert!(!f.is_empty());
    }
}

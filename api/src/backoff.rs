//! How ferrolb's watches retry when the API server is away.
//!
//! kube's default (client-go's: 800 ms doubling to 30 s) is kind to a struggling API server, but
//! after a one-minute outage it can leave a watch asleep for 30 s after the API server is back,
//! and ferrolb promises to converge within 5 s of its return. A refused connection costs the API
//! server nothing, and ferrolb runs six watches per node: retrying every second at most (with
//! jitter, so the nodes do not march in step) is the trade-off.

use std::time::Duration;

use kube::runtime::watcher::ExponentialBackoff;

/// The first retry's delay.
pub const MIN: Duration = Duration::from_millis(100);
/// The longest delay between two retries, before jitter (which adds up to as much again).
pub const MAX: Duration = Duration::from_secs(1);

/// The backoff of every ferrolb watch: `watcher(api, cfg).backoff(watch_backoff())`.
pub fn watch_backoff() -> ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(MIN)
        .with_max_delay(MAX)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_never_wait_more_than_twice_the_cap() {
        let delays: Vec<Duration> = watch_backoff().take(50).collect();
        assert_eq!(delays.len(), 50, "it never gives up");
        assert!(delays.iter().all(|d| *d <= MAX * 2), "{delays:?}");
        assert!(delays[0] < Duration::from_millis(250), "{delays:?}");
    }
}

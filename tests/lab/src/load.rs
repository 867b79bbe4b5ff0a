//! `ferrolb-lab load`: HTTP GETs at a steady rate, each on a new connection, and a report of
//! what a user rehearsing a failover counts: requests, failures, the longest gap between two
//! answered requests, and which pods answered (the demo server names itself in its body).
//!
//! ```text
//!   tick every 1/rate ──> spawn: connect, GET, read body (timeout) ──> ok(at, pod) | failed(why)
//!   at the end ──> {"requests", "failed", "max_gap_ms", "backends", "errors"}
//! ```
//!
//! New connections each time, as a fleet of clients would open them, so a request shows what
//! the data plane and the announcement do *now*, not what an old connection was pinned to.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};

/// What to send.
#[derive(Clone, Debug)]
pub struct Load {
    /// `ip:port` to connect to (an IPv6 address in brackets).
    pub target: SocketAddr,
    pub path: String,
    pub rate: u32,
    pub duration: Duration,
    /// A request not answered within this counts as failed.
    pub timeout: Duration,
    /// Keep every request in the report (`timeline`), for who lines it up with other events.
    pub timeline: bool,
}

/// One request: when it was sent and when it was answered (`None`: it failed), in
/// milliseconds since `started_unix_ms`.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct Sample(pub u32, pub Option<u32>);

/// What happened.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub requests: u64,
    pub failed: u64,
    /// The longest time between two answered requests (also from the start to the first, and
    /// from the last to the end), in milliseconds.
    pub max_gap_ms: u64,
    /// Answers per pod (`hostname:` line of the body; the whole first line otherwise).
    pub backends: BTreeMap<String, u64>,
    /// Failures by reason.
    pub errors: BTreeMap<String, u64>,
    /// Unix time of the start, milliseconds.
    #[serde(default)]
    pub started_unix_ms: u64,
    /// Every request, in the order sent (with `timeline`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<Sample>,
}

/// The longest gap in `answered` (times since the start, any order) within `[0, total]`.
pub fn max_gap(answered: &mut [Duration], total: Duration) -> Duration {
    answered.sort();
    let mut last = Duration::ZERO;
    let mut gap = Duration::ZERO;
    for t in answered.iter().chain(std::iter::once(&total)) {
        gap = gap.max(t.saturating_sub(last));
        last = last.max(*t);
    }
    gap
}

async fn get(target: SocketAddr, path: &str) -> Result<String, String> {
    let stream = tokio::net::TcpStream::connect(target).await.map_err(|e| e.kind().to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, target.to_string())
        .header(hyper::header::USER_AGENT, "ferrolb-lab-load")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("HTTP {}", resp.status().as_u16()));
    }
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    let text = String::from_utf8_lossy(&body);
    let first = text.lines().next().unwrap_or_default();
    Ok(first.strip_prefix("hostname: ").unwrap_or(first).to_string())
}

/// Sends the load and waits for the last answer.
pub async fn run(l: &Load) -> Report {
    let start = Instant::now();
    let started_unix_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(l.rate.max(1))));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = tokio::task::JoinSet::new();
    let mut requests = 0;
    while start.elapsed() < l.duration {
        tick.tick().await;
        requests += 1;
        let (target, path, timeout) = (l.target, l.path.clone(), l.timeout);
        let sent = start.elapsed();
        tasks.spawn(async move {
            let r = match tokio::time::timeout(timeout, get(target, &path)).await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
            };
            (sent, start.elapsed(), r)
        });
    }
    let mut report = Report { requests, started_unix_ms, ..Default::default() };
    let mut answered = Vec::new();
    let ms = |d: Duration| d.as_millis().min(u128::from(u32::MAX)) as u32;
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok((sent, at, Ok(pod))) => {
                answered.push(at);
                *report.backends.entry(pod).or_default() += 1;
                if l.timeline {
                    report.timeline.push(Sample(ms(sent), Some(ms(at))));
                }
            }
            Ok((sent, _, Err(why))) => {
                if l.timeline {
                    report.timeline.push(Sample(ms(sent), None));
                }
                report.failed += 1;
                *report.errors.entry(why).or_default() += 1;
            }
            Err(e) => {
                report.failed += 1;
                *report.errors.entry(e.to_string()).or_default() += 1;
            }
        }
    }
    report.timeline.sort_by_key(|s| s.0);
    let total = start.elapsed().max(l.duration);
    report.max_gap_ms = max_gap(&mut answered, total).as_millis() as u64;
    report
}

/// Parses `http://host:port/path` with an IP literal host (the lab has no DNS).
pub fn target(url: &str) -> Result<(SocketAddr, String)> {
    let rest = url.strip_prefix("http://").context("only http:// URLs")?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_string()),
        None => (rest, "/".to_string()),
    };
    let addr = match hostport.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => {
            let ip: std::net::IpAddr = hostport
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse()
                .with_context(|| format!("{hostport:?} is not an IP address (with an optional port)"))?;
            SocketAddr::new(ip, 80)
        }
    };
    Ok((addr, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn the_longest_gap_includes_start_and_end() {
        assert_eq!(max_gap(&mut [ms(10), ms(20), ms(500), ms(510)], ms(600)), ms(480));
        assert_eq!(max_gap(&mut [ms(300)], ms(400)), ms(300));
        assert_eq!(max_gap(&mut [], ms(1000)), ms(1000));
        assert_eq!(max_gap(&mut [ms(40), ms(10)], ms(50)), ms(30));
    }

    #[test]
    fn targets_are_ip_literals() {
        assert_eq!(target("http://192.0.2.200/").unwrap(), ("192.0.2.200:80".parse().unwrap(), "/".into()));
        assert_eq!(target("http://192.0.2.11:31000").unwrap(), ("192.0.2.11:31000".parse().unwrap(), "/".into()));
        assert_eq!(target("http://[2001:db8:1::c8]/x").unwrap(), ("[2001:db8:1::c8]:80".parse().unwrap(), "/x".into()));
        assert_eq!(target("http://[2001:db8:1::c8]:8080/").unwrap().0, "[2001:db8:1::c8]:8080".parse().unwrap());
        assert!(target("https://192.0.2.200/").is_err());
        assert!(target("http://example.com/").is_err());
    }
}

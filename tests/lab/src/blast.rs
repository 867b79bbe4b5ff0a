//! `ferrolb-lab blast`: a flood of unrelated traffic (UDP datagrams to one address and port,
//! full-size frames, from several threads in a tight loop, optionally paced to a rate), for
//! showing that it does not slow a speaker's ARP answers. Prints one JSON object:
//! `{"datagrams", "bytes", "seconds", "mbit_s", "frames_s"}`, counting what the kernel took.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// What to send, how fast, for how long.
#[derive(Clone, Debug)]
pub struct Blast {
    pub to: SocketAddr,
    /// UDP payload bytes (1472 fills a 1500-byte MTU).
    pub size: usize,
    pub threads: usize,
    pub duration: Duration,
    /// Megabits per second of UDP payload to aim at, all threads together; none: as fast as
    /// the threads go.
    pub mbit: Option<f64>,
}

#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub datagrams: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub mbit_s: f64,
    pub frames_s: f64,
}

pub fn run(b: &Blast) -> Result<Report> {
    let (datagrams, bytes) = (AtomicU64::new(0), AtomicU64::new(0));
    let threads = b.threads.max(1);
    // Datagrams per second per thread, when paced.
    let per_thread = b.mbit.map(|m| m * 1e6 / 8.0 / b.size.max(1) as f64 / threads as f64);
    let start = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let mut handles = Vec::new();
        for _ in 0..threads {
            let socket = UdpSocket::bind(if b.to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).context("binding")?;
            socket.connect(b.to).with_context(|| format!("connecting to {}", b.to))?;
            let (datagrams, bytes) = (&datagrams, &bytes);
            handles.push(s.spawn(move || {
                let payload = vec![0x5a; b.size];
                let (mut n, mut sent_bytes) = (0u64, 0u64);
                while start.elapsed() < b.duration {
                    // A burst of 32, then the pace check: cheap enough for line rate.
                    for _ in 0..32 {
                        if let Ok(len) = socket.send(&payload) {
                            n += 1;
                            sent_bytes += len as u64;
                        }
                    }
                    if let Some(rate) = per_thread {
                        let due = Duration::from_secs_f64(n as f64 / rate);
                        std::thread::sleep(due.saturating_sub(start.elapsed()));
                    }
                }
                datagrams.fetch_add(n, Ordering::Relaxed);
                bytes.fetch_add(sent_bytes, Ordering::Relaxed);
            }));
        }
        for h in handles {
            let _ = h.join();
        }
        Ok(())
    })?;
    let seconds = start.elapsed().as_secs_f64();
    let (datagrams, bytes) = (datagrams.into_inner(), bytes.into_inner());
    Ok(Report {
        datagrams,
        bytes,
        seconds,
        mbit_s: bytes as f64 * 8.0 / 1e6 / seconds,
        frames_s: datagrams as f64 / seconds,
    })
}

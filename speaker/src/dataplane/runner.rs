//! Applies models to the kernel: one `nft -f -` transaction per sync, per family.
//!
//! ```text
//!   apply(model) ──> nothing applied yet, or the last apply failed ──> render_full    ─┐
//!                └─> otherwise                                      ──> render_partial ─┼─> nft -f - (stdin)
//!   cleanup()    ──> stale chains and sets left by partial syncs    ──> render_cleanup ─┘
//! ```
//!
//! The runner keeps the last model it applied for each family: a partial sync is the difference
//! from it. Any failure forgets it, so the next sync rebuilds the table. A new process starts
//! with nothing applied: its first sync is a full one, which replaces an existing table in one
//! transaction (`delete table` and the new content, committed together), so packets never meet
//! a missing table and connections already NATed keep their conntrack entries; where there is
//! no table yet, it creates an empty one first (`create table`, which fails if there is one) and
//! fills it.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::model::{Family, Model};
use super::render::{render_cleanup, render_create, render_create_table, render_delete, render_full, render_partial};

/// Why a sync failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `nft` could not be started or fed.
    #[error("cannot run {program}: {source}")]
    Spawn { program: String, source: std::io::Error },
    /// `nft` rejected the transaction; nothing of it was applied.
    #[error("nft failed ({status}): {stderr}")]
    Rejected { status: String, stderr: String },
}

impl Error {
    /// A short label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Spawn { .. } => "spawn",
            Error::Rejected { .. } => "rejected",
        }
    }
}

/// The command that runs `nft` (a prefix such as `nsenter --net=…` lets tests aim elsewhere).
#[derive(Clone, Debug)]
pub struct NftCommand {
    /// The program: `nft`, or a wrapper that runs it.
    pub program: String,
    /// Arguments before `-f -`.
    pub args: Vec<String>,
}

impl Default for NftCommand {
    fn default() -> Self {
        Self { program: "nft".into(), args: Vec::new() }
    }
}

impl NftCommand {
    /// Runs `script` as one transaction (`nft -f -`).
    pub async fn run(&self, script: &str) -> Result<(), Error> {
        let spawn_err = |source| Error::Spawn { program: self.program.clone(), source };
        let mut child = Command::new(&self.program)
            .args(&self.args)
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_err)?;
        if let Some(mut stdin) = child.stdin.take() {
            // A write error (nft exited early) shows up as nft's own status and stderr below.
            let _ = stdin.write_all(script.as_bytes()).await;
            let _ = stdin.shutdown().await;
        }
        let out = child.wait_with_output().await.map_err(spawn_err)?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        // nft repeats each failing command with a caret line under it: the first lines say it all.
        let stderr: Vec<&str> = stderr.lines().take(12).collect();
        Err(Error::Rejected { status: out.status.to_string(), stderr: stderr.join("\n") })
    }
}

/// What kind of transaction a sync ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SyncKind {
    /// The whole table rebuilt.
    Full,
    /// Only what changed.
    Partial,
}

impl SyncKind {
    /// A label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            SyncKind::Full => "full",
            SyncKind::Partial => "partial",
        }
    }
}

/// The outcome of one successful sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Synced {
    /// Full or partial.
    pub kind: SyncKind,
    /// Time spent rendering and in `nft`; zero when there was nothing to do.
    pub took: Duration,
    /// The part of `took` spent before `nft` ran (reading the table list, rendering).
    pub prepared: Duration,
    /// The transaction's size.
    pub bytes: usize,
    /// Whether `nft` ran at all (a partial sync with no difference does not).
    pub ran: bool,
}

/// What the kernel holds for one family, as far as the runner knows.
#[derive(Debug)]
struct Applied {
    /// The model last applied with success.
    model: Model,
    /// Emptied chains left for [`Runner::cleanup`].
    stale_chains: BTreeSet<String>,
    /// Unused affinity sets left for [`Runner::cleanup`].
    stale_sets: BTreeSet<String>,
    /// Hairpin elements of former endpoints left for [`Runner::cleanup`].
    stale_hairpin: BTreeSet<String>,
}

/// Applies models, keeping what it applied last per family.
#[derive(Debug, Default)]
pub struct Runner {
    /// How to run `nft`.
    nft: NftCommand,
    /// Per family: what was applied (absent: nothing yet, or the last sync failed).
    applied: BTreeMap<Family, Applied>,
}

impl Runner {
    /// A runner that starts with nothing applied (its first sync per family is a full one).
    pub fn new(nft: NftCommand) -> Self {
        Self { nft, applied: BTreeMap::new() }
    }

    /// Makes the kernel's table for `model.family` match `model`: partially when the last sync of
    /// that family succeeded, fully otherwise. On error the next sync is a full one.
    pub async fn apply(&mut self, model: Model) -> Result<Synced, Error> {
        let start = Instant::now();
        let family = model.family;
        let (kind, script, stale) = match self.applied.remove(&family) {
            Some(prev) => {
                let partial = render_partial(&prev.model, &model);
                if partial.full {
                    (SyncKind::Full, partial.now, None)
                } else {
                    let mut chains = prev.stale_chains;
                    let mut sets = prev.stale_sets;
                    let mut hairpin = prev.stale_hairpin;
                    chains.extend(partial.stale_chains);
                    sets.extend(partial.stale_sets);
                    hairpin.extend(partial.stale_hairpin);
                    (SyncKind::Partial, partial.now, Some((chains, sets, hairpin)))
                }
            }
            // A table left by an earlier run is replaced; where there is none, filling a new
            // one spares the kernel's wait on a table deletion. `create table` tells which.
            None => match self.nft.run(&render_create_table(family)).await {
                Ok(()) => (SyncKind::Full, render_create(&model), None),
                Err(Error::Rejected { .. }) => (SyncKind::Full, render_full(&model), None),
                Err(e) => return Err(e),
            },
        };
        let prepared = start.elapsed();
        let ran = !script.is_empty();
        if ran {
            self.nft.run(&script).await?;
        }
        let (stale_chains, stale_sets, stale_hairpin) = stale.unwrap_or_default();
        self.applied.insert(family, Applied { model, stale_chains, stale_sets, stale_hairpin });
        let took = if ran { start.elapsed() } else { Duration::ZERO };
        Ok(Synced { kind, took, prepared, bytes: script.len(), ran })
    }

    /// Whether partial syncs left chains or sets for [`Runner::cleanup`].
    pub fn has_stale(&self) -> bool {
        self.applied
            .values()
            .any(|a| !a.stale_chains.is_empty() || !a.stale_sets.is_empty() || !a.stale_hairpin.is_empty())
    }

    /// Deletes what partial syncs left behind. Slower than a partial sync (deletions make `nft`
    /// read every chain), so run it when nothing else waits. A failure only means the next sync
    /// of that family is a full one.
    pub async fn cleanup(&mut self) -> Result<(), Error> {
        let families: Vec<Family> = self.applied.keys().copied().collect();
        for family in families {
            let Some(applied) = self.applied.get_mut(&family) else { continue };
            let script =
                render_cleanup(&applied.model, &applied.stale_chains, &applied.stale_sets, &applied.stale_hairpin);
            if !script.is_empty()
                && let Err(e) = self.nft.run(&script).await
            {
                self.applied.remove(&family);
                return Err(e);
            }
            applied.stale_chains.clear();
            applied.stale_sets.clear();
            applied.stale_hairpin.clear();
        }
        Ok(())
    }

    /// Removes the table of `family` (data plane switched off, or the family is gone).
    pub async fn delete(&mut self, family: Family) -> Result<(), Error> {
        self.applied.remove(&family);
        self.nft.run(&render_delete(family)).await
    }

    /// The model last applied for `family`, if the last sync succeeded.
    pub fn last(&self, family: Family) -> Option<&Model> {
        self.applied.get(&family).map(|a| &a.model)
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::process::Command as StdCommand;

    use super::super::model::{Endpoint, Mode, PortModel, Protocol, ServiceKey, ServiceModel};
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn model(services: &[(&str, &str, &[&str])]) -> Model {
        Model {
            node: "node-1".into(),
            family: Family::V4,
            mode: Mode::Full,
            node_ips: vec![ip("192.0.2.11")],
            pod_cidrs: vec!["198.18.1.0/24".parse().unwrap()],
            services: services
                .iter()
                .map(|(name, cluster_ip, eps)| {
                    let endpoints = eps.iter().map(|e| Endpoint::ready(ip(e), 8080, "node-1")).collect();
                    let port =
                        PortModel { name: "http".into(), proto: Protocol::Tcp, port: 80, node_port: None, endpoints };
                    let svc =
                        ServiceModel { cluster_ips: vec![ip(cluster_ip)], ports: vec![port], ..Default::default() };
                    (ServiceKey::new("default", *name), svc)
                })
                .collect(),
        }
    }

    /// A network namespace kept alive by a sleeping process, entered with `nsenter`.
    struct Netns {
        holder: std::process::Child,
    }

    impl Netns {
        fn new() -> Self {
            let uid = StdCommand::new("id").arg("-u").output().expect("cannot run `id -u`");
            let uid = String::from_utf8_lossy(&uid.stdout).trim().to_owned();
            assert_eq!(uid, "0", "the runner tests need root (to unshare a network namespace); uid is {uid}");
            let holder =
                StdCommand::new("unshare").args(["--net", "--", "sleep", "600"]).spawn().expect("cannot run unshare");
            // Wait until the sleeper is in its own namespace.
            for _ in 0..100 {
                let ours = std::fs::read_link("/proc/self/ns/net").ok();
                let theirs = std::fs::read_link(format!("/proc/{}/ns/net", holder.id())).ok();
                if theirs.is_some() && theirs != ours {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let ns = Netns { holder };
            ns.sh("ip link set lo up; ip link add d0 type veth peer name d1; ip link set d1 up; ip link set d0 up; \
                   ip addr add 198.18.1.2/24 dev d0; ip addr add 198.18.1.3/24 dev d0; ip route add 198.19.0.0/16 dev d0");
            ns
        }

        fn enter(&self) -> Vec<String> {
            vec![format!("--net=/proc/{}/ns/net", self.holder.id())]
        }

        fn nft(&self) -> NftCommand {
            let mut args = self.enter();
            args.push("nft".into());
            NftCommand { program: "nsenter".into(), args }
        }

        fn sh(&self, script: &str) -> String {
            let out = StdCommand::new("nsenter")
                .args(self.enter())
                .args(["sh", "-ec", script])
                .output()
                .expect("cannot run nsenter");
            assert!(out.status.success(), "`{script}` failed:\n{}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8_lossy(&out.stdout).into_owned()
        }

        fn spawn(&self, program: &[&str]) -> std::process::Child {
            StdCommand::new("nsenter")
                .args(self.enter())
                .args(program)
                .stdout(Stdio::piped())
                .spawn()
                .expect("cannot run nsenter")
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = self.holder.kill();
            let _ = self.holder.wait();
        }
    }

    #[tokio::test]
    async fn full_then_partial_then_full_after_failure() {
        let ns = Netns::new();
        let mut runner = Runner::new(ns.nft());
        let one = model(&[("web", "198.19.0.10", &["198.18.1.2"])]);
        let synced = runner.apply(one.clone()).await.unwrap();
        assert_eq!((synced.kind, synced.ran), (SyncKind::Full, true));
        let synced = runner.apply(one.clone()).await.unwrap();
        assert_eq!((synced.kind, synced.ran), (SyncKind::Partial, false));

        let two = model(&[("web", "198.19.0.10", &["198.18.1.3"]), ("api", "198.19.0.11", &["198.18.1.2"])]);
        assert_eq!(runner.apply(two.clone()).await.unwrap().kind, SyncKind::Partial);
        let listing = ns.sh("nft list table ip ferrolb");
        assert!(listing.contains(": 198.18.1.3") && listing.contains("198.19.0.11 . tcp . 80"), "{listing}");
        // `api` goes: its chain, and the hairpin element of its endpoint (no longer anybody's),
        // are left for the cleanup.
        let three = model(&[("web", "198.19.0.10", &["198.18.1.3"])]);
        assert_eq!(runner.apply(three).await.unwrap().kind, SyncKind::Partial);
        assert!(runner.has_stale());
        assert!(ns.sh("nft list table ip ferrolb").contains("198.18.1.2 . 198.18.1.2"));
        runner.cleanup().await.unwrap();
        assert!(!runner.has_stale());
        let listing = ns.sh("nft list table ip ferrolb");
        assert!(!listing.contains("default/api/http/tcp"), "stale chain left:\n{listing}");
        assert!(!listing.contains("198.18.1.2 . 198.18.1.2"), "stale hairpin element left:\n{listing}");

        // Somebody else breaks the table under us: the partial sync fails with nft's words, and
        // the next sync is a full one that repairs it.
        ns.sh("nft delete table ip ferrolb");
        let err = runner.apply(one.clone()).await.unwrap_err();
        assert_eq!(err.metric_label(), "rejected");
        assert!(err.to_string().contains("No such file or directory"), "{err}");
        assert!(runner.last(Family::V4).is_none());
        assert_eq!(runner.apply(one).await.unwrap().kind, SyncKind::Full);
        assert!(ns.sh("nft list table ip ferrolb").contains("198.19.0.10 . tcp . 80"));

        runner.delete(Family::V4).await.unwrap();
        assert!(!ns.sh("nft list tables").contains("ferrolb"));
    }

    #[tokio::test]
    async fn a_missing_nft_is_a_clear_error() {
        let mut runner = Runner::new(NftCommand { program: "/nonexistent/nft".into(), args: vec![] });
        let err = runner.apply(model(&[])).await.unwrap_err();
        assert_eq!(err.metric_label(), "spawn");
        assert!(err.to_string().contains("/nonexistent/nft"), "{err}");
    }

    /// What a speaker restart does: a new runner (nothing applied) re-applies the full ruleset
    /// over the existing table, again and again, while a client keeps an established
    /// connection open and opens new ones every few milliseconds. Nothing may fail.
    #[tokio::test]
    async fn full_resync_over_a_live_table_has_no_gap() {
        let ns = Netns::new();
        let m = model(&[("web", "198.19.0.10", &["198.18.1.2", "198.18.1.3"])]);
        Runner::new(ns.nft()).apply(m.clone()).await.unwrap();
        let client = r#"
import socket, threading, time, sys
def serve(addr):
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, 8080))
    srv.listen(256)
    while True:
        c, _ = srv.accept()
        threading.Thread(target=echo, args=(c,), daemon=True).start()
def echo(c):
    while True:
        d = c.recv(64)
        if not d:
            return
        c.sendall(d)
for a in ["198.18.1.2", "198.18.1.3"]:
    threading.Thread(target=serve, args=(a,), daemon=True).start()
time.sleep(0.2)
held = socket.create_connection(("198.19.0.10", 80), timeout=1)
print("ready", flush=True)
ok = failed = 0
end = time.monotonic() + 4
while time.monotonic() < end:
    try:
        s = socket.create_connection(("198.19.0.10", 80), timeout=1)
        s.sendall(b"x")
        ok += s.recv(8) == b"x"
        s.close()
        held.sendall(b"y")
        ok += held.recv(8) == b"y"
    except OSError:
        failed += 1
    time.sleep(0.005)
print("ok", ok > 100, "failed", failed, flush=True)
"#;
        let mut py = ns.spawn(&["python3", "-c", client]);
        let mut stdout = std::io::BufReader::new(py.stdout.take().unwrap());
        let mut first = String::new();
        std::io::BufRead::read_line(&mut stdout, &mut first).unwrap();
        assert_eq!(first, "ready\n");
        for _ in 0..5 {
            let mut restarted = Runner::new(ns.nft());
            assert_eq!(restarted.apply(m.clone()).await.unwrap().kind, SyncKind::Full);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
        assert!(py.wait().unwrap().success());
        assert_eq!(rest, "ok True failed 0\n");
    }
}

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
//!
//! One bad Service never stops the rest: when `nft` refuses a transaction, the runner finds the
//! Services responsible ([`find_rejected`]: `nft -c` over halves of the services, rendered alone
//! into a scratch check that touches nothing), leaves them out (each keeps the rules it had last
//! time it was accepted, if any) and applies everything else. A left-out Service is tried again
//! when it changes. A refusal no single Service explains stays a failure.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::model::{Family, Model, ServiceKey, ServiceModel};
use super::render::{Ruleset, render_create_table, render_delete, render_full};

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
        self.run_with(&[], script).await
    }

    /// Checks `script` without applying it (`nft -c -f -`): the kernel validates the transaction
    /// and discards it.
    pub async fn check(&self, script: &str) -> Result<(), Error> {
        self.run_with(&["-c"], script).await
    }

    async fn run_with(&self, extra: &[&str], script: &str) -> Result<(), Error> {
        let spawn_err = |source| Error::Spawn { program: self.program.clone(), source };
        let mut child = Command::new(&self.program)
            .args(&self.args)
            .args(extra)
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
    /// The table last applied with success, kept for the next partial sync.
    ruleset: Ruleset,
    /// Emptied chains left for [`Runner::cleanup`].
    stale_chains: BTreeSet<String>,
    /// Unused affinity sets left for [`Runner::cleanup`].
    stale_sets: BTreeSet<String>,
    /// Hairpin elements of former endpoints left for [`Runner::cleanup`].
    stale_hairpin: BTreeSet<String>,
    /// Since when stale objects wait for a cleanup (`None`: there are none).
    stale_since: Option<Instant>,
}

/// A Service left out of a family's table because `nft` refused its rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// The Service's model as it was refused: while it stays the same, it is not tried again.
    pub refused: ServiceModel,
    /// What `nft` said about the Service's rules rendered alone (first lines).
    pub nft: String,
    /// Whether its rules from before (the last version accepted) stay in the table.
    pub kept_previous: bool,
}

/// Applies models, keeping what it applied last per family.
#[derive(Debug, Default)]
pub struct Runner {
    /// How to run `nft`.
    nft: NftCommand,
    /// Per family: what was applied (absent: nothing yet, or the last sync failed).
    applied: BTreeMap<Family, Applied>,
    /// Per family, after a failed sync: the model the kernel held before it (what a left-out
    /// Service keeps).
    before_failure: BTreeMap<Family, Model>,
    /// Per family: the Services left out, by key.
    rejected: BTreeMap<Family, BTreeMap<ServiceKey, Rejected>>,
}

impl Runner {
    /// A runner that starts with nothing applied (its first sync per family is a full one).
    pub fn new(nft: NftCommand) -> Self {
        Self { nft, ..Self::default() }
    }

    /// Makes the kernel's table for `model.family` match `model`, when anything in it may have
    /// changed: [`Runner::apply_changes`] without a list of changed Services.
    pub async fn apply(&mut self, model: Model) -> Result<Synced, Error> {
        self.apply_changes(&model, None).await
    }

    /// Makes the kernel's table for `model.family` match `model`: partially when the last sync of
    /// that family succeeded, fully otherwise. On error the next sync is a full one. `changed`
    /// lists the Services that may differ from the last sync (`None`: any of them); a partial
    /// sync renders those only.
    ///
    /// Services whose rules `nft` refuses are left out (see [`Runner::rejected`]) and the rest is
    /// applied: that is a success. A refusal that no single Service explains is an error.
    pub async fn apply_changes(
        &mut self,
        model: &Model,
        changed: Option<&BTreeSet<ServiceKey>>,
    ) -> Result<Synced, Error> {
        let family = model.family;
        // A left-out Service is tried again once it changes (or goes away).
        let rejected = self.rejected.entry(family).or_default();
        rejected.retain(|key, r| model.services.get(key) == Some(&r.refused));
        let err = match self.apply_as_is(model, changed).await {
            Ok(synced) => return Ok(synced),
            Err(e @ Error::Rejected { .. }) => e,
            Err(e) => return Err(e),
        };
        // The model asked for holds each left-out Service as it was refused (it has not changed
        // since, or it would be retried).
        let nft = self.nft.clone();
        let culprits = find_rejected(model.services.keys().cloned().collect(), async |keys: &[ServiceKey]| {
            let mut alone = Model { services: BTreeMap::new(), ..model.clone() };
            for key in keys {
                if let Some(svc) = model.services.get(key) {
                    alone.services.insert(key.clone(), svc.clone());
                }
            }
            match nft.check(&render_full(&alone)).await {
                Ok(()) => Ok(None),
                Err(Error::Rejected { stderr, .. }) => Ok(Some(stderr)),
                Err(e) => Err(e),
            }
        })
        .await?;
        if culprits.is_empty() {
            return Err(err);
        }
        let before = self.before_failure.get(&family);
        let rejected = self.rejected.entry(family).or_default();
        for (key, words) in culprits {
            let kept_previous = before.is_some_and(|b| b.services.contains_key(&key));
            tracing::warn!(service = %key, ?family, kept_previous, nft = %words, "nft refused a service's rules: left out");
            let refused = model.services.get(&key).cloned().unwrap_or_default();
            rejected.insert(key, Rejected { refused, nft: words, kept_previous });
        }
        // The failure forgot the table: this is a full sync.
        self.apply_as_is(model, None).await
    }

    /// `model` with each left-out Service as `before` has it (the last version accepted), or
    /// without it.
    fn without_rejected(&self, model: &Model, before: Option<&Model>) -> Model {
        let mut model = model.clone();
        let family = model.family;
        let Some(rejected) = self.rejected.get(&family).filter(|r| !r.is_empty()) else { return model };
        for key in rejected.keys() {
            match before.and_then(|b| b.services.get(key)) {
                Some(svc) => model.services.insert(key.clone(), svc.clone()),
                None => model.services.remove(key),
            };
        }
        model
    }

    /// The Services left out of `family`'s table, with why.
    pub fn rejected(&self, family: Family) -> impl Iterator<Item = (&ServiceKey, &Rejected)> {
        self.rejected.get(&family).into_iter().flatten()
    }

    /// [`Runner::apply_changes`] without finding Services to leave out (those already left out
    /// stay out).
    async fn apply_as_is(&mut self, model: &Model, changed: Option<&BTreeSet<ServiceKey>>) -> Result<Synced, Error> {
        let start = Instant::now();
        let family = model.family;
        let prev = self.applied.remove(&family);
        // A full sync after a partial one (node, mode or service CIDRs changed) starts from what
        // the table held.
        let before_rebuild =
            prev.as_ref().filter(|p| p.ruleset.needs_rebuild(model)).map(|p| p.ruleset.model().clone());
        let (kind, script, ruleset, undo, stale) = match prev.filter(|p| !p.ruleset.needs_rebuild(model)) {
            Some(mut prev) => {
                let mut keys = match changed {
                    Some(keys) => keys.clone(),
                    None => prev.ruleset.all_keys(model),
                };
                // A left-out Service keeps what the table has for it.
                if let Some(rejected) = self.rejected.get(&family) {
                    keys.retain(|k| !rejected.contains_key(k));
                }
                let (partial, undo) = prev.ruleset.update(model, &keys);
                prev.stale_chains.extend(partial.stale_chains);
                prev.stale_sets.extend(partial.stale_sets);
                prev.stale_hairpin.extend(partial.stale_hairpin);
                let stale = (prev.stale_chains, prev.stale_sets, prev.stale_hairpin, prev.stale_since);
                (SyncKind::Partial, partial.now, prev.ruleset, Some(undo), stale)
            }
            None => {
                let before = before_rebuild.as_ref().or_else(|| self.before_failure.get(&family));
                let ruleset = Ruleset::new(&self.without_rejected(model, before));
                let script = if before_rebuild.is_some() {
                    ruleset.render_full(true)
                } else {
                    // A table left by an earlier run is replaced; where there is none, filling a
                    // new one spares the kernel's wait on a table deletion. `create table` tells
                    // which.
                    match self.nft.run(&render_create_table(family)).await {
                        Ok(()) => ruleset.render_full(false),
                        Err(Error::Rejected { .. }) => ruleset.render_full(true),
                        Err(e) => return Err(e),
                    }
                };
                if let Some(b) = before_rebuild {
                    self.before_failure.insert(family, b);
                }
                (SyncKind::Full, script, ruleset, None, Default::default())
            }
        };
        let prepared = start.elapsed();
        let ran = !script.is_empty();
        if ran && let Err(e) = self.nft.run(&script).await {
            // The transaction changed nothing: the kernel still holds what it held before.
            if let Some(undo) = undo {
                self.before_failure.insert(family, ruleset.undone(undo));
            }
            return Err(e);
        }
        self.before_failure.remove(&family);
        let (stale_chains, stale_sets, stale_hairpin, prev_stale_since) = stale;
        let has_stale = !stale_chains.is_empty() || !stale_sets.is_empty() || !stale_hairpin.is_empty();
        let stale_since = has_stale.then(|| prev_stale_since.unwrap_or(start));
        self.applied.insert(family, Applied { ruleset, stale_chains, stale_sets, stale_hairpin, stale_since });
        let took = if ran { start.elapsed() } else { Duration::ZERO };
        Ok(Synced { kind, took, prepared, bytes: script.len(), ran })
    }

    /// Whether partial syncs left chains or sets for [`Runner::cleanup`].
    pub fn has_stale(&self) -> bool {
        self.applied
            .values()
            .any(|a| !a.stale_chains.is_empty() || !a.stale_sets.is_empty() || !a.stale_hairpin.is_empty())
    }

    /// How many stale chains, sets and hairpin elements wait for [`Runner::cleanup`], and since
    /// when the oldest of them waits.
    pub fn stale(&self) -> (usize, Option<Instant>) {
        let count =
            self.applied.values().map(|a| a.stale_chains.len() + a.stale_sets.len() + a.stale_hairpin.len()).sum();
        (count, self.applied.values().filter_map(|a| a.stale_since).min())
    }

    /// Deletes what partial syncs left behind. Slower than a partial sync (deletions make `nft`
    /// read every chain), so run it when nothing else waits. A failure only means the next sync
    /// of that family is a full one.
    pub async fn cleanup(&mut self) -> Result<(), Error> {
        let families: Vec<Family> = self.applied.keys().copied().collect();
        for family in families {
            let Some(applied) = self.applied.get_mut(&family) else { continue };
            let script =
                applied.ruleset.render_cleanup(&applied.stale_chains, &applied.stale_sets, &applied.stale_hairpin);
            if !script.is_empty()
                && let Err(e) = self.nft.run(&script).await
            {
                if let Some(a) = self.applied.remove(&family) {
                    self.before_failure.insert(family, a.ruleset.model().clone());
                }
                return Err(e);
            }
            applied.stale_chains.clear();
            applied.stale_sets.clear();
            applied.stale_hairpin.clear();
            applied.stale_since = None;
        }
        Ok(())
    }

    /// Removes the table of `family` (data plane switched off, or the family is gone).
    pub async fn delete(&mut self, family: Family) -> Result<(), Error> {
        self.applied.remove(&family);
        self.before_failure.remove(&family);
        self.rejected.remove(&family);
        self.nft.run(&render_delete(family)).await
    }

    /// The model last applied for `family`, if the last sync succeeded.
    pub fn last(&self, family: Family) -> Option<&Model> {
        self.applied.get(&family).map(|a| a.ruleset.model())
    }
}

/// The keys whose part of a transaction `check` refuses, with what it said about each alone.
///
/// `check(keys)` checks the transaction made of `keys` only: `Ok(None)` accepted, `Ok(Some(why))`
/// refused, `Err` cannot tell (then so cannot this). Bisection: a refused group is split in
/// halves and each half checked, down to single keys, so one bad key among `n` costs about
/// `2 log2 n` checks. Empty when nothing is to blame on single keys: the transaction of no key at
/// all is refused (nft or the table is broken), all of them together are accepted (the refusal
/// came from elsewhere), or only a combination of keys is refused.
pub async fn find_rejected<K: Clone, E>(
    keys: Vec<K>,
    mut check: impl AsyncFnMut(&[K]) -> Result<Option<String>, E>,
) -> Result<Vec<(K, String)>, E> {
    if check(&[]).await?.is_some() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    let mut groups = vec![keys];
    while let Some(group) = groups.pop() {
        let Some(why) = check(&group).await? else { continue };
        if let [key] = group.as_slice() {
            found.push((key.clone(), why));
        } else if group.len() > 1 {
            let mut first = group;
            let second = first.split_off(first.len() / 2);
            groups.push(second);
            groups.push(first);
        }
    }
    Ok(found)
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
            service_cidrs: vec![],
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

    /// The bisection finds every single bad key, and only them, in few checks.
    #[tokio::test]
    async fn find_rejected_bisects_to_single_keys() {
        let keys: Vec<u32> = (0..1000).collect();
        let bad = [17, 600];
        let mut checks = 0;
        let found = find_rejected(keys.clone(), async |group: &[u32]| {
            checks += 1;
            Ok::<_, ()>(group.iter().find(|k| bad.contains(k)).map(|k| format!("refused {k}")))
        })
        .await
        .unwrap();
        assert_eq!(found, [(17, "refused 17".to_owned()), (600, "refused 600".to_owned())]);
        assert!(checks <= 2 + 2 * 2 * 10, "{checks} checks");

        // Nothing to blame on a key: everything refused, nothing refused, or only a pair.
        let all = find_rejected(keys.clone(), async |_: &[u32]| Ok::<_, ()>(Some("broken".into()))).await;
        assert_eq!(all, Ok(vec![]));
        let none = find_rejected(keys.clone(), async |_: &[u32]| Ok::<_, ()>(None)).await;
        assert_eq!(none, Ok(vec![]));
        let pair = find_rejected(keys.clone(), async |g: &[u32]| {
            Ok::<_, ()>((g.contains(&1) && g.contains(&999)).then(|| "pair".to_owned()))
        })
        .await;
        assert_eq!(pair, Ok(vec![]));
        let err =
            find_rejected(keys, async |g: &[u32]| if g.len() < 10 { Err("no nft") } else { Ok(Some(String::new())) });
        assert_eq!(err.await, Err("no nft"));
    }

    /// `nft` in the namespace behind a wrapper that refuses any transaction naming 198.19.0.66,
    /// as it would refuse a Service it cannot take.
    fn refusing_nft(ns: &Netns) -> NftCommand {
        let inner = ns.nft();
        let script = "input=$(cat); case \"$input\" in *198.19.0.66*) \
                      echo 'Error: the test refuses 198.19.0.66' >&2; exit 1;; esac; \
                      printf '%s\\n' \"$input\" | \"$@\"";
        let mut args = vec!["-c".to_owned(), script.to_owned(), "sh".to_owned(), inner.program];
        args.extend(inner.args);
        NftCommand { program: "sh".into(), args }
    }

    #[tokio::test]
    async fn a_refused_service_is_left_out_and_the_rest_applied() {
        let ns = Netns::new();
        let mut runner = Runner::new(refusing_nft(&ns));
        let start = model(&[("web", "198.19.0.10", &["198.18.1.2"]), ("api", "198.19.0.11", &["198.18.1.2"])]);
        runner.apply(start).await.unwrap();

        // A bad Service arrives while another one changes: the change is applied, the bad one
        // left out (it had no rules), and the sync is a success.
        let with_bad = model(&[
            ("web", "198.19.0.10", &["198.18.1.3"]),
            ("api", "198.19.0.11", &["198.18.1.2"]),
            ("bad", "198.19.0.66", &["198.18.1.2"]),
        ]);
        runner.apply(with_bad.clone()).await.unwrap();
        let rejected: Vec<(&ServiceKey, &Rejected)> = runner.rejected(Family::V4).collect();
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].0, &ServiceKey::new("default", "bad"));
        assert!(rejected[0].1.nft.contains("the test refuses") && !rejected[0].1.kept_previous, "{:?}", rejected[0]);
        let listing = ns.sh("nft list table ip ferrolb");
        assert!(listing.contains(": 198.18.1.3") && listing.contains("198.19.0.11 . tcp . 80"), "{listing}");
        assert!(!listing.contains("198.19.0.66"), "{listing}");

        // While it stays the same it is not tried again: later changes are partial syncs.
        let mut next = with_bad.clone();
        next.services.get_mut(&ServiceKey::new("default", "web")).unwrap().ports[0].endpoints[0].port = 8081;
        assert_eq!(runner.apply(next.clone()).await.unwrap().kind, SyncKind::Partial);
        assert_eq!(runner.rejected(Family::V4).count(), 1);

        // A Service that had rules and turns bad keeps the ones it had.
        let mut api_bad = next.clone();
        api_bad.services.get_mut(&ServiceKey::new("default", "api")).unwrap().cluster_ips = vec![ip("198.19.0.66")];
        runner.apply(api_bad).await.unwrap();
        let api = runner.rejected(Family::V4).find(|(k, _)| k.name == "api").map(|(_, r)| r.clone()).unwrap();
        assert!(api.kept_previous);
        let listing = ns.sh("nft list table ip ferrolb");
        assert!(listing.contains("198.19.0.11 . tcp . 80") && listing.contains(":8081"), "{listing}");

        // Fixed (or gone): tried again, and nothing is left out.
        let fixed = model(&[("web", "198.19.0.10", &["198.18.1.3"]), ("api", "198.19.0.12", &["198.18.1.2"])]);
        runner.apply(fixed).await.unwrap();
        assert_eq!(runner.rejected(Family::V4).count(), 0);
        assert!(ns.sh("nft list table ip ferrolb").contains("198.19.0.12 . tcp . 80"));

        // A refusal of everything is no Service's fault: a plain failure, nothing left out.
        let mut broken = Runner::new(NftCommand { program: "false".into(), args: vec![] });
        let err = broken.apply(model(&[("web", "198.19.0.10", &["198.18.1.2"])])).await.unwrap_err();
        assert_eq!(err.metric_label(), "rejected");
        assert_eq!(broken.rejected(Family::V4).count(), 0);
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

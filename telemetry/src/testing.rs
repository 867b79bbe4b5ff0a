//! For the binaries' own tests (feature `testing`): run the real binary with no cluster, for a
//! bounded time, and see how it ended.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use wait_timeout::ChildExt;

/// How a bounded run ended.
#[derive(Debug)]
pub struct Run {
    /// The exit code; `None` when it was still running at the limit (and was killed).
    pub code: Option<i32>,
    pub stderr: String,
    pub took: Duration,
}

/// Writes, in `dir`, a kubeconfig whose API server is a closed port: a binary builds its client,
/// but no call ever succeeds.
pub fn unreachable_kubeconfig(dir: &Path) -> std::io::Result<PathBuf> {
    let path = dir.join("kubeconfig");
    let yaml = "apiVersion: v1\nkind: Config\nclusters:\n- name: none\n  cluster: {server: 'http://127.0.0.1:1'}\ncontexts:\n- name: none\n  context: {cluster: none, user: none}\nusers:\n- name: none\n  user: {}\ncurrent-context: none\n";
    std::fs::write(&path, yaml)?;
    Ok(path)
}

/// Runs `cmd` for at most `limit`, with stderr captured and no test hook inherited beyond the
/// ones `cmd` sets.
pub fn run_bounded(mut cmd: Command, limit: Duration) -> std::io::Result<Run> {
    let start = Instant::now();
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
    let status = child.wait_timeout(limit)?;
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let took = start.elapsed();
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
    }
    Ok(Run { code: status.map(|s| s.code().unwrap_or(-1)), stderr, took })
}

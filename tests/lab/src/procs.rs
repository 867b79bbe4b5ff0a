//! The lab's long-running processes: started detached (own process group, output to a log
//! file, pid recorded), found again by pid file, and stopped TERM-then-KILL.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::paths::Paths;

/// Whether a process with this pid exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    if kill(Pid::from_raw(pid), None).is_err() {
        return false;
    }
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !matches!(s.rsplit(')').next().map(str::trim_start), Some(r) if r.starts_with('Z')))
        .unwrap_or(false)
}

/// The pid recorded for a lab process, if it is still running.
pub fn running(paths: &Paths, name: &str) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(paths.pid(name)).ok()?.trim().parse().ok()?;
    alive(pid).then_some(pid)
}

/// Starts `program args` detached, in the network namespace `netns` if given, with output
/// appended to the lab's log for `name`. Returns at once with the pid.
pub fn spawn(paths: &Paths, name: &str, netns: Option<&str>, program: &Path, args: &[String]) -> Result<i32> {
    std::fs::create_dir_all(paths.logs())?;
    std::fs::create_dir_all(paths.pids())?;
    let log = File::options().create(true).append(true).open(paths.log(name))?;
    let mut cmd = match netns {
        // nsenter enters only the network namespace (unlike `ip netns exec`, which also
        // unshares the mount namespace, so namespaces the process adds would stay invisible
        // to the rest of the machine) and execs the program, so the pid is the program's own.
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{ns}")).arg("--").arg(program);
            c
        }
        None => Command::new(program),
    };
    use std::os::unix::process::CommandExt;
    cmd.args(args).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).process_group(0);
    let child = cmd.spawn().with_context(|| format!("starting {}", program.display()))?;
    let pid = i32::try_from(child.id()).context("pid out of range")?;
    std::fs::write(paths.pid(name), pid.to_string())?;
    // The child outlives us; reaping is init's job once we exit.
    drop(child);
    Ok(pid)
}

/// Fails with the tail of the log if the process has died (a crash at start-up says why
/// there, not here).
pub fn check_alive(paths: &Paths, name: &str, pid: i32) -> Result<()> {
    if alive(pid) {
        return Ok(());
    }
    Err(died(paths, name))
}

/// The error for a lab process that is gone: its name and the tail of its log.
pub fn died(paths: &Paths, name: &str) -> anyhow::Error {
    let log = std::fs::read_to_string(paths.log(name)).unwrap_or_default();
    if let Some(line) = log.lines().find(|l| l.contains("address already in use")) {
        return anyhow::anyhow!(
            "{name} could not start because its port is taken ({}): a process from an earlier lab is still running; run 'ferrolb-lab down', then 'ferrolb-lab up'",
            line.trim()
        );
    }
    let tail: Vec<&str> = log.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
    anyhow::anyhow!("{name} exited; last lines of {}:\n{}", paths.log(name).display(), tail.join("\n"))
}

/// Whether a process is gone for good: no such pid, or a zombie all of whose threads have
/// exited. A thread-group leader turns zombie before its other threads are done exiting, and
/// until they are, the process still holds its files and ports (a Go program such as etcd or
/// kube-apiserver spends a while there): [`alive`] calls that dead, this does not.
pub fn gone(pid: i32) -> bool {
    if kill(Pid::from_raw(pid), None).is_err() {
        return true;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    let zombie = stat.rsplit(')').next().map(str::trim_start).is_some_and(|r| r.starts_with('Z'));
    zombie && std::fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.count() <= 1).unwrap_or(true)
}

/// Sends TERM to each pid (and its process group), waits up to `grace`, then KILLs what is left
/// and waits for that to be gone too (see [`gone`]). Returns the pids still there after all
/// that (a process stuck in the kernel), for the caller to report.
pub fn stop_all(pids: &[i32], grace: Duration) -> Vec<i32> {
    for &pid in pids {
        let _ = kill(Pid::from_raw(-pid), Signal::SIGTERM);
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    wait_gone(pids, grace);
    for &pid in pids {
        if !gone(pid) {
            let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    wait_gone(pids, KILL_WAIT);
    pids.iter().copied().filter(|&p| !gone(p)).collect()
}

/// How long a KILLed process may take to be gone (freeing a large heap takes a moment).
const KILL_WAIT: Duration = Duration::from_secs(20);

fn wait_gone(pids: &[i32], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline && pids.iter().any(|&p| !gone(p)) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `pid (command)`, for a message about a process.
pub fn describe(pid: i32) -> String {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    format!("{pid} ({})", comm.trim())
}

/// Every process whose command line mentions `needle` (the lab's state directory, which
/// every lab process carries in its arguments): found even without pid files.
pub fn pids_mentioning(needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| c.split(|&b| b == 0).any(|arg| String::from_utf8_lossy(arg).contains(needle)))
                .unwrap_or(false)
        })
        .collect()
}

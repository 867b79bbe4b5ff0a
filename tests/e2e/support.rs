//! Helpers for the end-to-end tests: drive the real lab through `ferrolb-lab`, the pinned
//! `kubectl`, and commands run on the lab's hosts.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// The `ferrolb-lab` binary built beside the test: `$FERROLB_LAB_BIN`, else
/// `target/<profile>/ferrolb-lab` (the test binary lives in `target/<profile>/deps`).
pub fn lab_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("FERROLB_LAB_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let p =
        exe.parent().and_then(|d| d.parent()).map(|d| d.join("ferrolb-lab")).context("locating target directory")?;
    if !p.is_file() {
        bail!("{} is not built: run 'cargo build --workspace --bins' first ('make test' does)", p.display());
    }
    Ok(p)
}

/// Runs a command; its output whatever the exit status.
pub fn output(program: &str, args: &[&str]) -> Result<Output> {
    Command::new(program).args(args).output().with_context(|| format!("running {program}"))
}

/// Runs a command that must succeed; its stdout.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = output(program, args)?;
    if !out.status.success() {
        bail!(
            "{program} {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command that must fail with `needle` in its stderr; the stderr.
pub fn fails_with(program: &str, args: &[&str], needle: &str) -> Result<String> {
    let out = output(program, args)?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() || !err.contains(needle) {
        bail!("{program} {} should fail saying {needle:?}; it said ({}): {err}", args.join(" "), out.status);
    }
    Ok(err)
}

/// The lab under test.
pub struct Lab {
    pub bin: PathBuf,
}

impl Lab {
    pub fn new() -> Result<Self> {
        Ok(Lab { bin: lab_bin()? })
    }

    pub fn bin(&self) -> &str {
        self.bin.to_str().unwrap_or("ferrolb-lab")
    }

    /// `ferrolb-lab ARGS…`, which must succeed.
    pub fn lab(&self, args: &[&str]) -> Result<String> {
        run(self.bin(), args)
    }

    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["kubectl", "--"];
        full.extend_from_slice(args);
        self.lab(&full)
    }

    pub fn kubectl_json(&self, args: &[&str]) -> Result<Value> {
        let mut full = args.to_vec();
        full.extend_from_slice(&["-o", "json"]);
        Ok(serde_json::from_str(&self.kubectl(&full)?)?)
    }

    /// Applies a manifest given as text.
    pub fn apply(&self, yaml: &str) -> Result<()> {
        let path = std::env::temp_dir().join(format!("ferrolb-e2e-{}.yaml", std::process::id()));
        std::fs::write(&path, yaml)?;
        let r = self.kubectl(&["apply", "-f", path.to_str().unwrap_or_default()]);
        let _ = std::fs::remove_file(&path);
        r.map(|_| ())
    }

    /// Runs a command on a lab host (client, node-i) or in any lab namespace.
    pub fn exec(&self, host: &str, cmd: &[&str]) -> Result<String> {
        let mut full = vec!["netns", "exec", host];
        full.extend_from_slice(cmd);
        run("ip", &full)
    }

    /// `curl` from a host, with a short timeout; the body.
    pub fn curl(&self, host: &str, url: &str) -> Result<String> {
        self.exec(host, &["curl", "-sS", "--max-time", "3", url])
    }

    /// The pods with a label selector, as JSON items.
    pub fn pods(&self, selector: &str) -> Result<Vec<Value>> {
        let v = self.kubectl_json(&["get", "pods", "-l", selector])?;
        Ok(v["items"].as_array().cloned().unwrap_or_default())
    }
}

/// The directory of the pinned Kubernetes binaries, as `make k8s-bins` reports it.
pub fn k8s_bin_dir() -> Result<PathBuf> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../hack/k8s-bins.sh");
    Ok(PathBuf::from(run("bash", &[script])?.trim()))
}

/// Polls `f` until it returns `Ok(Some(v))`, or fails after `timeout` with the last word.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => "condition not met".to_string(),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}: {last}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Whether a pod's Ready condition is True.
pub fn pod_ready(p: &Value) -> bool {
    p["status"]["conditions"]
        .as_array()
        .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
}

pub fn name(v: &Value) -> String {
    v["metadata"]["name"].as_str().unwrap_or_default().to_string()
}

/// A test case: a name and a body.
pub type Case = (&'static str, fn(&Lab) -> Result<()>);

/// Runs cases in order, printing libtest-style lines and summary; `true` when all passed.
pub fn run_cases(lab: &Lab, cases: &[Case]) -> (usize, usize) {
    let (mut passed, mut failed) = (0, 0);
    for (name, f) in cases {
        let start = Instant::now();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(lab)));
        let secs = start.elapsed().as_secs_f64();
        match r {
            Ok(Ok(())) => {
                passed += 1;
                println!("test {name} ... ok ({secs:.1} s)");
            }
            Ok(Err(e)) => {
                failed += 1;
                println!("test {name} ... FAILED ({secs:.1} s)\n  {e:#}");
            }
            Err(_) => {
                failed += 1;
                println!("test {name} ... FAILED ({secs:.1} s): panicked");
            }
        }
    }
    (passed, failed)
}

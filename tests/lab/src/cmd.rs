//! Running the system tools the lab drives (`ip`, `sysctl`), with errors that say what failed.

use std::process::{Command, Output};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum CmdError {
    #[error("'{cmd}' could not start: {source} (is it installed? run 'make deps')")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("'{cmd}' failed ({status}): {stderr}")]
    Failed { cmd: String, status: String, stderr: String },
}

fn describe(program: &str, args: &[&str]) -> String {
    std::iter::once(program).chain(args.iter().copied()).collect::<Vec<_>>().join(" ")
}

/// Runs a command to completion; a non-zero exit is an error carrying its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<Output, CmdError> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| CmdError::Spawn { cmd: describe(program, args), source })?;
    if !out.status.success() {
        return Err(CmdError::Failed {
            cmd: describe(program, args),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

/// Runs a command and returns its stdout as text.
pub fn stdout(program: &str, args: &[&str]) -> Result<String, CmdError> {
    run(program, args).map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
}

/// `ip ARGS…` in the root namespace.
pub fn ip(args: &[&str]) -> Result<Output, CmdError> {
    run("ip", args)
}

/// `ip ARGS…` inside network namespace `ns`.
pub fn ip_in(ns: &str, args: &[&str]) -> Result<Output, CmdError> {
    let mut full = vec!["-n", ns];
    full.extend_from_slice(args);
    run("ip", &full)
}

/// Sets sysctls inside a network namespace (`net.*` keys are per namespace).
pub fn sysctl_in(ns: &str, settings: &[&str]) -> Result<Output, CmdError> {
    let mut full = vec!["netns", "exec", ns, "sysctl", "-q", "-w"];
    full.extend_from_slice(settings);
    run("ip", &full)
}

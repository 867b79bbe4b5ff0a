//! Finding the pinned Kubernetes binaries that `make k8s-bins` (hack/k8s-bins.sh) provides.

use std::path::PathBuf;

use anyhow::{Result, bail};

/// The Kubernetes release the lab runs. hack/k8s-bins.sh pins the same one (a test checks).
pub const K8S_VERSION: &str = "v1.36.3";

/// Every binary the lab needs.
pub const REQUIRED: &[&str] =
    &["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kube-proxy", "kubectl", "helm"];

/// The directory holding the binaries: `$FERROLB_K8S_BIN_DIR`, else the build cache.
pub fn dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FERROLB_K8S_BIN_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let cache = std::env::var_os("FERROLB_CACHE").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
        home.join(".cache/ferrolb")
    });
    cache.join("k8s").join(K8S_VERSION).join("bin")
}

/// The path of one binary, or a clear error naming both ways to get it.
pub fn path(name: &str) -> Result<PathBuf> {
    let p = dir().join(name);
    if !p.is_file() {
        bail!(
            "{name} {K8S_VERSION} is not in {}: run 'make k8s-bins' (builds the pinned binaries with Go), or set FERROLB_K8S_BIN_DIR to a directory of official release binaries",
            dir().display()
        );
    }
    Ok(p)
}

/// Checks that every binary is there before anything starts.
pub fn check_all() -> Result<()> {
    for b in REQUIRED {
        path(b)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::K8S_VERSION;

    #[test]
    fn the_build_script_pins_the_same_release() {
        let script = include_str!("../../../hack/k8s-bins.sh");
        assert!(
            script.contains(&format!("K8S_VERSION=${{K8S_VERSION:-{K8S_VERSION}}}")),
            "hack/k8s-bins.sh must default to {K8S_VERSION}"
        );
    }
}

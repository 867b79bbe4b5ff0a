//! Where the lab keeps its files. Everything lives under one directory, so `down` removes
//! it in one go.

use std::path::{Path, PathBuf};

/// Layout of the lab's state directory.
#[derive(Clone, Debug)]
pub struct Paths {
    pub root: PathBuf,
}

impl Paths {
    /// `$FERROLB_LAB_DIR`, else `/run/ferrolb-lab` (tmpfs: gone after a reboot, like the lab).
    pub fn from_env() -> Self {
        let root =
            std::env::var_os("FERROLB_LAB_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/run/ferrolb-lab"));
        Paths { root }
    }

    pub fn plan(&self) -> PathBuf {
        self.root.join("plan.json")
    }
    pub fn pki(&self) -> PathBuf {
        self.root.join("pki")
    }
    pub fn pki_file(&self, name: &str) -> PathBuf {
        self.pki().join(name)
    }
    /// The cluster-admin kubeconfig users and tests point `kubectl` at, from the root namespace.
    pub fn kubeconfig(&self) -> PathBuf {
        self.root.join("kubeconfig")
    }
    pub fn component_kubeconfig(&self, component: &str) -> PathBuf {
        self.pki().join(format!("{component}.kubeconfig"))
    }
    pub fn etcd_data(&self) -> PathBuf {
        self.root.join("etcd")
    }
    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }
    pub fn log(&self, name: &str) -> PathBuf {
        self.logs().join(format!("{name}.log"))
    }
    pub fn pids(&self) -> PathBuf {
        self.root.join("pids")
    }
    pub fn pid(&self, name: &str) -> PathBuf {
        self.pids().join(format!("{name}.pid"))
    }
    /// Per-node working directory of the node agent (pod logs, tokens, kubeconfigs).
    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.root.join("nodes").join(node)
    }
}

/// Writes a file readable by root only (keys, tokens).
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

//! Prints ferrolb's CustomResourceDefinitions as multi-document YAML, or writes one file per CRD.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// Print ferrolb's CustomResourceDefinitions (multi-document YAML on stdout).
#[derive(Parser)]
#[command(name = "crdgen")]
struct Args {
    /// Write one `<group>_<plural>.yaml` file per CRD into DIR instead of printing.
    #[arg(long, value_name = "DIR")]
    write: Option<PathBuf>,
    /// Print the metallb.io kinds ferrolb reads with --metallb-compat instead (for tests).
    #[arg(long, conflicts_with = "write")]
    metallb: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.metallb {
        for crd in ferrolb_api::crds::metallb() {
            print!("---\n{}", serde_yaml::to_string(&crd)?);
        }
        return Ok(());
    }
    match args.write {
        None => print!("{}", ferrolb_api::crds::stream()?),
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for (name, yaml) in ferrolb_api::crds::rendered()? {
                let path = dir.join(name);
                std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
                eprintln!("wrote {}", path.display());
            }
        }
    }
    Ok(())
}

//! Which local program runs a container image. The lab has no container runtime: it runs
//! the demo image's server built into ferrolb-lab, and ferrolb's own images as the locally
//! built binaries. Any other image is refused (the pod stays Pending with an Event).

/// What a supported image runs as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Program {
    /// `alicek106/rr-test:echo-hostname`: the built-in hostname server.
    Hostname,
    /// A ferrolb image: the binary of that name (`ferrolb-controller`, `ferrolb-speaker`).
    Ferrolb(String),
}

/// Splits `registry/path/name:tag@digest` into (repository path without a docker.io
/// prefix, tag).
fn split(image: &str) -> (&str, &str) {
    let image = image.split('@').next().unwrap_or(image);
    // A ':' after the last '/' is the tag; one before it belongs to a registry port.
    let (repo, tag) = match image.rfind(':') {
        Some(i) if !image[i..].contains('/') => (&image[..i], &image[i + 1..]),
        _ => (image, "latest"),
    };
    let repo = repo.strip_prefix("docker.io/").unwrap_or(repo);
    let repo = repo.strip_prefix("index.docker.io/").unwrap_or(repo);
    (repo, tag)
}

/// The program for an image, or `None` when the lab cannot run it.
pub fn program_for(image: &str) -> Option<Program> {
    let (repo, tag) = split(image.trim());
    if repo == "alicek106/rr-test" && tag == "echo-hostname" {
        return Some(Program::Hostname);
    }
    let name = repo.rsplit('/').next().unwrap_or(repo);
    let is_ferrolb = name
        .strip_prefix("ferrolb-")
        .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'));
    is_ferrolb.then(|| Program::Ferrolb(name.to_string()))
}

/// The Event message for an image the lab cannot run.
pub fn unsupported_message(image: &str) -> String {
    format!(
        "the ferrolb lab has no container runtime and cannot run image {image:?}: it runs only alicek106/rr-test:echo-hostname (the built-in hostname server) and ferrolb's own images (ferrolb-controller, ferrolb-speaker)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_demo_image_runs_the_hostname_server() {
        for i in ["alicek106/rr-test:echo-hostname", "docker.io/alicek106/rr-test:echo-hostname"] {
            assert_eq!(program_for(i), Some(Program::Hostname), "{i}");
        }
        assert_eq!(program_for("alicek106/rr-test:other"), None);
        assert_eq!(program_for("alicek106/rr-test"), None);
    }

    #[test]
    fn ferrolb_images_run_local_binaries() {
        assert_eq!(
            program_for("ghcr.io/ferrolb/ferrolb-speaker:0.1.0"),
            Some(Program::Ferrolb("ferrolb-speaker".into()))
        );
        assert_eq!(
            program_for("localhost:5000/ferrolb-controller@sha256:abc"),
            Some(Program::Ferrolb("ferrolb-controller".into()))
        );
        assert_eq!(program_for("ferrolb-"), None);
    }

    #[test]
    fn other_images_are_refused() {
        for i in ["nginx", "nginx:1.27", "registry:5000/nginx", "", "busybox@sha256:00"] {
            assert_eq!(program_for(i), None, "{i}");
        }
    }

    proptest! {
        #[test]
        fn never_panics(s in ".*") {
            let _ = program_for(&s);
        }
    }
}

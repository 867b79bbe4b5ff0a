//! The committed CRDs under `deploy/crds/` must be exactly what the types generate.

use std::path::PathBuf;

use ferrolb_api::crds;

fn committed_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(crds::DIR)
}

#[test]
fn committed_crds_match_the_types() {
    let dir = committed_dir();
    let mut problems = Vec::new();
    let rendered = crds::rendered().expect("CRDs render as YAML");
    for (name, generated) in &rendered {
        match std::fs::read_to_string(dir.join(name)) {
            Ok(committed) if committed == *generated => {}
            Ok(_) => problems.push(format!("{}/{name} differs from the generated CRD", crds::DIR)),
            Err(err) => problems.push(format!("{}/{name} can't be read: {err}", crds::DIR)),
        }
    }
    // A kind that was renamed or removed must not leave its old CRD behind.
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|err| panic!("reading {}: {err}", dir.display()));
    for entry in entries {
        let name = entry.expect("directory entry").file_name().to_string_lossy().into_owned();
        if name.starts_with("ferrolb.io_") && !rendered.iter().any(|(generated, _)| *generated == name) {
            problems.push(format!("{}/{name} is not generated from any type", crds::DIR));
        }
    }
    assert!(problems.is_empty(), "{}\nrun `{}` and commit the result", problems.join("\n"), crds::REGENERATE);
}

#[test]
fn one_crd_per_file_named_for_group_and_plural() {
    let names: Vec<String> = crds::all().iter().map(crds::file_name).collect();
    assert_eq!(
        names,
        ["ferrolb.io_ipaddresspools.yaml", "ferrolb.io_l2advertisements.yaml", "ferrolb.io_servicel2statuses.yaml",]
    );
}

#[test]
fn the_stream_is_every_crd_as_a_yaml_document() {
    let stream = crds::stream().expect("CRDs render as YAML");
    let documents: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&stream)
        .map(|document| serde::Deserialize::deserialize(document).expect("a YAML document"))
        .collect();
    let names: Vec<&str> = documents.iter().filter_map(|d| d["metadata"]["name"].as_str()).collect();
    assert_eq!(names, ["ipaddresspools.ferrolb.io", "l2advertisements.ferrolb.io", "servicel2statuses.ferrolb.io"]);
}

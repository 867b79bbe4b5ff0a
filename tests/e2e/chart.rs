//! The Helm chart, without a cluster: it lints clean, its CRDs and the committed manifests
//! are what the sources generate, its schema refuses typos, its RBAC names every verb, and
//! every setting it passes is one the binaries read.
//!
//! Runs the pinned `helm` (`hack/k8s-bins.sh`); needs no lab and no root.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use ferrolb_e2e::{k8s_bin_dir, output, run};
use serde::Deserialize;
use serde_yaml::Value;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/chart");
const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// The values of the one-line install: a pool alone.
const ONE_POOL: &[&str] = &["--set", "pools[0].name=lan", "--set", "pools[0].addresses[0]=192.0.2.200-192.0.2.250"];

fn helm() -> Result<String> {
    let p = k8s_bin_dir()?.join("helm");
    ensure!(p.is_file(), "{} is missing: run 'make k8s-bins'", p.display());
    Ok(p.to_string_lossy().into_owned())
}

/// `helm template ferrolb deploy/chart -n ferrolb-system ARGS…`, as parsed documents.
fn template(args: &[&str]) -> Result<Vec<Value>> {
    let mut full = vec!["template", "ferrolb", CHART, "--namespace", "ferrolb-system"];
    full.extend_from_slice(args);
    parse(&run(&helm()?, &full)?)
}

fn parse(yaml: &str) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    for d in serde_yaml::Deserializer::from_str(yaml) {
        let v = Value::deserialize(d).context("parsing the rendered chart")?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

fn kind(v: &Value) -> &str {
    v["kind"].as_str().unwrap_or_default()
}

fn name(v: &Value) -> &str {
    v["metadata"]["name"].as_str().unwrap_or_default()
}

fn find<'a>(docs: &'a [Value], k: &str, n: &str) -> Result<&'a Value> {
    docs.iter().find(|d| kind(d) == k && name(d) == n).with_context(|| format!("no {k} {n} in the chart"))
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_sequence().map(|s| s.iter().filter_map(Value::as_str).collect()).unwrap_or_default()
}

/// The env variables of the first container of a workload: name → literal value (or "").
fn env(workload: &Value) -> Vec<(String, String)> {
    let c = &workload["spec"]["template"]["spec"]["containers"][0];
    c["env"]
        .as_sequence()
        .map(|es| {
            es.iter()
                .map(|e| {
                    (
                        e["name"].as_str().unwrap_or_default().to_string(),
                        e["value"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn env_value(workload: &Value, var: &str) -> Option<String> {
    env(workload).into_iter().find(|(n, _)| n == var).map(|(_, v)| v)
}

#[test]
fn helm_lint_is_clean_also_strict_and_with_a_pool() -> Result<()> {
    let helm = helm()?;
    let mut strict_pool = vec!["lint", "--strict", CHART];
    strict_pool.extend_from_slice(ONE_POOL);
    for args in [vec!["lint", CHART], vec!["lint", "--strict", CHART], strict_pool] {
        let out = run(&helm, &args)?;
        ensure!(
            !out.contains("[WARNING]") && !out.contains("[ERROR]") && out.contains("0 chart(s) failed"),
            "helm {}:\n{out}",
            args.join(" ")
        );
    }
    Ok(())
}

#[test]
fn the_committed_manifests_are_the_rendered_chart() -> Result<()> {
    let script = format!("{ROOT}/hack/render-manifests.sh");
    let rendered = run("bash", &[&script, "--stdout"])?;
    let committed = std::fs::read_to_string(format!("{ROOT}/deploy/manifests/ferrolb.yaml"))?;
    if rendered != committed {
        let line = rendered.lines().zip(committed.lines()).position(|(a, b)| a != b).map_or_else(
            || format!("lengths differ ({} and {} lines)", rendered.lines().count(), committed.lines().count()),
            |i| format!("first difference at line {}", i + 1),
        );
        bail!("deploy/manifests/ferrolb.yaml is stale ({line}): run 'make manifests' and commit it");
    }
    // What kubectl users get: the namespace, the CRDs, both components, and no secret value.
    let docs = parse(&committed)?;
    find(&docs, "Namespace", "ferrolb-system")?;
    for crd in ["ipaddresspools.ferrolb.io", "l2advertisements.ferrolb.io", "servicel2statuses.ferrolb.io"] {
        find(&docs, "CustomResourceDefinition", crd)?;
    }
    find(&docs, "Deployment", "ferrolb-controller")?;
    let speaker = find(&docs, "DaemonSet", "ferrolb-speaker")?;
    ensure!(!docs.iter().any(|d| kind(d) == "Secret"), "the committed manifests hold a Secret");
    ensure!(
        env_value(speaker, "FERROLB_MEMBERSHIP_SECRET").as_deref() == Some("ferrolb-memberlist"),
        "the speaker of the committed manifests does not name the membership Secret"
    );
    Ok(())
}

#[test]
fn the_charts_crds_are_the_generated_ones() -> Result<()> {
    let names = |dir: &Path| -> Result<BTreeSet<String>> {
        let mut out = BTreeSet::new();
        for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            out.insert(e?.file_name().to_string_lossy().into_owned());
        }
        Ok(out)
    };
    let generated = PathBuf::from(ROOT).join("deploy/crds");
    let chart = PathBuf::from(CHART).join("crds");
    let (want, got) = (names(&generated)?, names(&chart)?);
    ensure!(
        want == got,
        "deploy/chart/crds has {got:?}, deploy/crds has {want:?}: cp deploy/crds/*.yaml deploy/chart/crds/"
    );
    for f in &want {
        ensure!(
            std::fs::read(generated.join(f))? == std::fs::read(chart.join(f))?,
            "deploy/chart/crds/{f} differs from deploy/crds/{f}: cp deploy/crds/*.yaml deploy/chart/crds/"
        );
    }
    Ok(())
}

#[test]
fn the_schema_refuses_bad_values() -> Result<()> {
    let helm = helm()?;
    for (set, says) in [
        ("speaker.dataplane=bogus", "value must be one of 'full', 'lb-only', 'off'"),
        ("log.format=xml", "value must be one of 'text', 'json'"),
        ("speaker.dataplan=full", "additional properties 'dataplan' not allowed"),
        ("controller.replicas=0", "minimum"),
        ("pools[0].name=lan", "missing property 'addresses'"),
        ("speaker.externalIPCIDRs[0]=203.0.113.7", "does not match pattern"),
    ] {
        let out = output(&helm, &["template", "ferrolb", CHART, "--set", set])?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success() && err.contains(says), "--set {set} should fail saying {says:?}; it said: {err}");
    }
    Ok(())
}

#[test]
fn rbac_names_every_group_resource_and_verb() -> Result<()> {
    // Everything optional switched on, so that every Role is rendered.
    let mut args = vec!["--set", "metallbCompat.enabled=true", "--set", "prometheus.serviceMonitor.enabled=true"];
    args.extend_from_slice(ONE_POOL);
    let docs = template(&args)?;
    let roles: Vec<&Value> = docs.iter().filter(|d| matches!(kind(d), "Role" | "ClusterRole")).collect();
    ensure!(roles.len() == 5, "expected 5 Roles and ClusterRoles, found {}", roles.len());
    for role in roles {
        let rules = role["rules"].as_sequence().context("rules")?;
        ensure!(!rules.is_empty(), "{} {} has no rules", kind(role), name(role));
        for rule in rules {
            for field in ["apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"] {
                ensure!(
                    !strings(&rule[field]).iter().any(|s| s.contains('*')),
                    "{} {} has a wildcard in {field}: {rule:?}",
                    kind(role),
                    name(role)
                );
            }
            ensure!(
                strings(&rule["verbs"])
                    .iter()
                    .all(|v| !matches!(*v, "escalate" | "bind" | "impersonate" | "deletecollection")),
                "{} {} grants {:?}",
                kind(role),
                name(role),
                strings(&rule["verbs"])
            );
        }
    }
    // Names in the Roles are the names the workloads use.
    let controller = find(&docs, "Deployment", "ferrolb-controller")?;
    let lease = env_value(controller, "FERROLB_LEASE_NAME").context("FERROLB_LEASE_NAME")?;
    let role = find(&docs, "Role", "ferrolb-controller")?;
    ensure!(
        role["rules"].as_sequence().into_iter().flatten().any(|r| strings(&r["resourceNames"]) == [lease.as_str()]),
        "the controller's Role does not name its Lease {lease}"
    );
    let speaker = find(&docs, "DaemonSet", "ferrolb-speaker")?;
    let secret = env_value(speaker, "FERROLB_MEMBERSHIP_SECRET").context("FERROLB_MEMBERSHIP_SECRET")?;
    find(&docs, "Secret", &secret)?;
    let role = find(&docs, "Role", "ferrolb-speaker")?;
    let secret_rules: Vec<_> = role["rules"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter(|r| strings(&r["resources"]).contains(&"secrets"))
        .collect();
    ensure!(
        secret_rules.len() == 1
            && strings(&secret_rules[0]["resourceNames"]) == [secret.as_str()]
            && strings(&secret_rules[0]["verbs"]) == ["get"],
        "the speaker may do more with Secrets than get {secret}: {secret_rules:?}"
    );
    Ok(())
}

#[test]
fn a_pool_alone_is_announced_and_listed_advertisements_replace_the_default() -> Result<()> {
    let docs = template(ONE_POOL)?;
    let pool = find(&docs, "IPAddressPool", "lan")?;
    ensure!(strings(&pool["spec"]["addresses"]) == ["192.0.2.200-192.0.2.250"], "pool: {pool:?}");
    let ad = find(&docs, "L2Advertisement", "default")?;
    ensure!(ad["spec"].as_mapping().is_some_and(|m| m.is_empty()), "the default L2Advertisement: {ad:?}");

    let mut args = ONE_POOL.to_vec();
    args.extend_from_slice(&[
        "--set",
        "l2Advertisements[0].name=lan",
        "--set",
        "l2Advertisements[0].interfaces[0]=eth0",
    ]);
    let docs = template(&args)?;
    let ads: Vec<_> = docs.iter().filter(|d| kind(d) == "L2Advertisement").collect();
    ensure!(ads.len() == 1 && name(ads[0]) == "lan", "advertisements: {ads:?}");
    ensure!(strings(&ads[0]["spec"]["interfaces"]) == ["eth0"], "advertisement: {:?}", ads[0]);

    // No pools: nothing to announce, no advertisement.
    let docs = template(&[])?;
    ensure!(!docs.iter().any(|d| matches!(kind(d), "IPAddressPool" | "L2Advertisement")), "objects without pools");
    Ok(())
}

#[test]
fn external_ip_cidrs_reach_the_speaker_as_one_list() -> Result<()> {
    let speaker = |docs: &[Value]| -> Result<Option<String>> {
        Ok(env_value(find(docs, "DaemonSet", "ferrolb-speaker")?, "FERROLB_EXTERNAL_IP_CIDRS"))
    };
    ensure!(speaker(&template(&[])?)?.is_none(), "no list: the variable is not set (any address)");
    let docs = template(&["--set", "speaker.externalIPCIDRs={203.0.113.0/24,2001:db8:7::/64}"])?;
    let value = speaker(&docs)?;
    ensure!(value.as_deref() == Some("203.0.113.0/24,2001:db8:7::/64"), "FERROLB_EXTERNAL_IP_CIDRS: {value:?}");
    Ok(())
}

/// The env variables a binary reads: every `env = "…"` of its flags.
fn env_names_of(main_rs: &str) -> Result<BTreeSet<String>> {
    let src = std::fs::read_to_string(format!("{ROOT}/{main_rs}"))?;
    Ok(src.split("env = \"").skip(1).filter_map(|rest| rest.split('"').next()).map(str::to_string).collect())
}

#[test]
fn every_setting_the_chart_passes_is_read_by_the_binary() -> Result<()> {
    // The lab's node agent does not expand $(VAR) in args: settings travel as env variables,
    // so an env variable the binary does not know would be dropped without a word.
    let mut args = vec!["--set", "metallbCompat.enabled=true"];
    args.extend_from_slice(ONE_POOL);
    let docs = template(&args)?;
    for (workload, main_rs) in [("Deployment", "controller/src/main.rs"), ("DaemonSet", "speaker/src/main.rs")] {
        let known = env_names_of(main_rs)?;
        let w = docs.iter().find(|d| kind(d) == workload).with_context(|| format!("no {workload}"))?;
        let mut unknown = Vec::new();
        for (var, _) in env(w) {
            if !known.contains(&var) {
                unknown.push(var);
            }
        }
        ensure!(
            unknown.is_empty(),
            "the {workload} sets {unknown:?}, which {main_rs} does not read (it reads {known:?})"
        );
    }
    Ok(())
}

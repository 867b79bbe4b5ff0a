//! Bounded against the lab's real API server: a node whose name has the most characters the API
//! server accepts (253) gets its ServiceL2Status written, with the `nodeAssigned` Event, and
//! deleted again on uninstall, through the speaker's own status code.
//!
//! Needs root (it brings up its own lab); fails loudly without it.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ferrolb_config::ServiceKey;
use ferrolb_e2e::{Case, Lab, run_suite, wait_for};
use ferrolb_speaker::status::{self, NODE_LABEL, View, node_label};
use k8s_openapi::api::core::v1::Service;

const NAMESPACE: &str = "ferrolb-system";

fn main() -> ExitCode {
    let cases: &[Case] = &[
        ("setup_lab_and_crds", setup),
        ("a_253_character_node_name_writes_and_deletes_its_servicel2status", long_node_name),
    ];
    run_suite("bounded", cases)
}

fn setup(lab: &Lab) -> Result<()> {
    lab.lab(&["up"])?;
    ferrolb_e2e::ferrolb_system(lab, &["192.0.2.200-192.0.2.250"])?;
    Ok(())
}

/// The longest node name the API server accepts: a DNS subdomain of 253 characters.
fn longest_node_name() -> String {
    let label = |c: char| std::iter::repeat_n(c, 63).collect::<String>();
    let name = format!("{}.{}.{}.{}", label('a'), label('b'), label('c'), label('d'));
    name[..253].to_string()
}

async fn client() -> Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from("/run/ferrolb-lab/kubeconfig")?;
    Ok(kube::Client::try_from(kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?)?)
}

/// Before, the node's name went into the object's `ferrolb.io/node` label (at most 63
/// characters: the API server refused the write, so the object never appeared) and into the
/// Events' `reportingInstance` (at most 128: refused too).
fn long_node_name(lab: &Lab) -> Result<()> {
    lab.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: longnode, namespace: default}\nspec:\n  type: ClusterIP\n  ports: [{port: 80}]\n",
    )?;
    let node = longest_node_name();
    ensure!(node.len() == 253);
    let rt = tokio::runtime::Runtime::new()?;
    let key = ServiceKey::new("default", "longnode");
    let (tx, rx) = tokio::sync::watch::channel(View::default());
    let writer = {
        let node = node.clone();
        rt.spawn(async move {
            let client = client().await?;
            let (services, _writer) = kube::runtime::reflector::store::<Service>();
            status::run(client, NAMESPACE.into(), node, None, services, rx).await;
            anyhow::Ok(())
        })
    };
    tx.send_replace(View {
        mine: [(key.clone(), vec!["eth0".to_string()])].into(),
        announced: [key.clone()].into(),
        alive: [node.clone()].into(),
    });
    let object = wait_for("the ServiceL2Status of the 253-character node", Duration::from_secs(20), || {
        let v = lab.kubectl_json(&["get", "servicel2statuses", "-n", NAMESPACE])?;
        let items = v["items"].as_array().cloned().unwrap_or_default();
        Ok(items
            .into_iter()
            .find(|o| o["metadata"]["name"] == "default.longnode" && o["status"]["node"] == node.as_str()))
    })?;
    let label = object["metadata"]["labels"][NODE_LABEL].as_str().unwrap_or_default().to_string();
    ensure!(label == node_label(&node) && label.len() <= 63, "label {label:?}");
    println!("  written; {NODE_LABEL}={label}");
    // The Event on the Service names the node (its reportingInstance is hashed to fit).
    ferrolb_e2e::wait_event(lab, "longnode", "nodeAssigned", &node)?;
    // The speaker stops; uninstalling deletes what names the node, found through the label.
    drop(tx);
    rt.block_on(writer).context("status writer")??;
    let deleted = rt.block_on(async { anyhow::Ok(status::delete_own(client().await?, NAMESPACE, &node).await?) })?;
    ensure!(deleted == 1, "delete_own deleted {deleted} objects, expected 1");
    let v = lab.kubectl_json(&["get", "servicel2statuses", "-n", NAMESPACE])?;
    let left = v["items"].as_array().map_or(0, |a| a.len());
    ensure!(left == 0, "{left} ServiceL2Status objects left after delete_own");
    // What the code did before is refused by this API server: the name itself as the label,
    // and as the Events' reportingInstance.
    let raw_label = lab.apply(&format!(
        "apiVersion: ferrolb.io/v1beta1\nkind: ServiceL2Status\nmetadata:\n  name: default.longnode\n  namespace: {NAMESPACE}\n  labels: {{{NODE_LABEL}: {node}}}\nspec: {{}}\n"
    ));
    let why = format!("{:#}", raw_label.err().context("the API server took a 253-character label value")?);
    ensure!(why.contains("must be no more than 63"), "refused for another reason: {why}");
    let raw_instance = lab.apply(&format!(
        "apiVersion: events.k8s.io/v1\nkind: Event\nmetadata: {{name: longnode.raw, namespace: default}}\neventTime: \"2026-01-01T00:00:00.000000Z\"\nreportingController: ferrolb-speaker\nreportingInstance: {node}\naction: Announce\nreason: nodeAssigned\ntype: Normal\nregarding: {{apiVersion: v1, kind: Service, namespace: default, name: longnode}}\n"
    ));
    let why = format!("{:#}", raw_instance.err().context("the API server took a 253-character reportingInstance")?);
    ensure!(why.contains("reportingInstance"), "refused for another reason: {why}");
    println!("  refused: {}", why.lines().last().unwrap_or_default());
    Ok(())
}

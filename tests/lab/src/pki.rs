//! The lab's PKI: one CA, the API server's serving certificate, client certificates for
//! the admin and the control-plane components, and the ServiceAccount signing key.
//! Generated once per lab with `rcgen`; kubeconfigs embed the certificates.

use std::net::IpAddr;
use std::path::Path;

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use time::{Duration, OffsetDateTime};

use crate::paths::{Paths, write_private};
use crate::plan::{API_FROM_ROOT_V4, API_PORT, CONTROL_PLANE_V4, Plan};

/// A client identity: the certificate's CN is the user, O the groups.
pub struct ClientIdentity {
    pub file: &'static str,
    pub user: &'static str,
    pub group: Option<&'static str>,
}

/// The identities the lab hands out, each to one kubeconfig.
pub const CLIENTS: &[ClientIdentity] = &[
    ClientIdentity { file: "admin", user: "ferrolb-lab-admin", group: Some("system:masters") },
    ClientIdentity { file: "kube-controller-manager", user: "system:kube-controller-manager", group: None },
    ClientIdentity { file: "kube-scheduler", user: "system:kube-scheduler", group: None },
];

fn validity(params: &mut CertificateParams) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(365);
}

/// Creates every key and certificate that is missing. Existing ones are kept, so a second
/// `up` does not invalidate the kubeconfigs users already have.
pub fn ensure(paths: &Paths, plan: &Plan) -> Result<()> {
    let dir = paths.pki();
    std::fs::create_dir_all(&dir)?;
    if dir.join("ca.crt").exists() && paths.kubeconfig().exists() {
        return Ok(());
    }

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name.push(DnType::CommonName, "ferrolb-lab-ca");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages =
        vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca_params);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    write_private(&dir.join("ca.key"), ca_key.serialize_pem().as_bytes())?;
    std::fs::write(dir.join("ca.crt"), ca_cert.pem())?;
    let ca = Issuer::new(ca_params, ca_key);

    // API server serving certificate.
    let mut sans: Vec<SanType> = [
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
        "localhost",
    ]
    .iter()
    .map(|n| Ok(SanType::DnsName((*n).try_into()?)))
    .collect::<Result<_>>()?;
    let mut ips: Vec<IpAddr> = vec![IpAddr::V4(CONTROL_PLANE_V4), IpAddr::V4(API_FROM_ROOT_V4), "127.0.0.1".parse()?];
    if plan.dual() {
        ips.push(IpAddr::V6(crate::plan::CONTROL_PLANE_V6));
    }
    ips.extend(plan.kubernetes_service_ips());
    sans.extend(ips.into_iter().map(SanType::IpAddress));
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.subject_alt_names = sans;
    params.distinguished_name.push(DnType::CommonName, "kube-apiserver");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca)?;
    write_private(&dir.join("apiserver.key"), key.serialize_pem().as_bytes())?;
    std::fs::write(dir.join("apiserver.crt"), cert.pem())?;

    // ServiceAccount token signing key.
    let sa = KeyPair::generate()?;
    write_private(&dir.join("sa.key"), sa.serialize_pem().as_bytes())?;
    std::fs::write(dir.join("sa.pub"), sa.public_key_pem())?;

    let ca_pem = ca_cert.pem();
    for id in CLIENTS {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, id.user);
        if let Some(g) = id.group {
            params.distinguished_name.push(DnType::OrganizationName, g);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca)?;
        let (cert, key) = (cert.pem(), key.serialize_pem());
        let mut files = vec![(paths.component_kubeconfig(id.file), server_url())];
        if id.file == "admin" {
            // The one users and tests use, from the root namespace.
            files.push((paths.kubeconfig(), root_server_url()));
        }
        for (path, server) in files {
            let kc = kubeconfig(&server, &ca_pem, &cert, &key, id.user);
            write_private(&path, kc.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(())
}

/// The API server's URL on the LAN, as every host, pod and control-plane component reaches it.
pub fn server_url() -> String {
    format!("https://{CONTROL_PLANE_V4}:{API_PORT}")
}

/// The API server's URL from the root namespace (see `plan`).
pub fn root_server_url() -> String {
    format!("https://{API_FROM_ROOT_V4}:{API_PORT}")
}

fn b64(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// A kubeconfig with embedded client certificate.
pub fn kubeconfig(server: &str, ca_pem: &str, cert_pem: &str, key_pem: &str, user: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: ferrolb-lab\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: {user}\n  user:\n    client-certificate-data: {cert}\n    client-key-data: {key}\ncontexts:\n- name: ferrolb-lab\n  context:\n    cluster: ferrolb-lab\n    user: {user}\ncurrent-context: ferrolb-lab\n",
        ca = b64(ca_pem),
        cert = b64(cert_pem),
        key = b64(key_pem),
    )
}

/// A kubeconfig that authenticates with a bearer token read from a file (refreshed by the
/// node agent), as a pod's ServiceAccount would.
pub fn token_kubeconfig(ca_file: &Path, token_file: &Path, namespace: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: ferrolb-lab\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\nusers:\n- name: serviceaccount\n  user:\n    tokenFile: {token}\ncontexts:\n- name: ferrolb-lab\n  context:\n    cluster: ferrolb-lab\n    user: serviceaccount\n    namespace: {namespace}\ncurrent-context: ferrolb-lab\n",
        server = server_url(),
        ca = ca_file.display(),
        token = token_file.display(),
    )
}

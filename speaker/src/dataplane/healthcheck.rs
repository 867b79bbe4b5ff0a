//! The `healthCheckNodePort` server, as kube-proxy's (`pkg/proxy/healthcheck/service_health.go`).
//!
//! ```text
//!   LoadBalancer, externalTrafficPolicy Local, spec.healthCheckNodePort P
//!     └─ GET http://<node IP>:P/ ──> 200 when this node has a ready local endpoint, else 503
//!                                    {"service":{"namespace":..,"name":..},"localEndpoints":N,
//!                                     "serviceProxyHealthy":true}
//! ```
//!
//! External load balancers (and ferrolb's own election, through the endpoints) use it to send
//! traffic only to nodes that can serve it locally. [`wanted`] decides what to serve (pure);
//! [`HealthServers`] opens and closes the listeners.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use tokio::task::JoinHandle;

use super::model::{Model, ServiceKey};

/// One health check port to serve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    /// The service.
    pub service: ServiceKey,
    /// `spec.healthCheckNodePort`.
    pub port: u16,
    /// Usable endpoints of the service on this node (distinct addresses, over ports and families).
    pub local_endpoints: usize,
}

/// The health checks `models` (one per family) call for, by port. Two services on one port: the
/// first by name keeps it (the API server does not allow it anyway).
pub fn wanted(models: &[&Model]) -> BTreeMap<u16, HealthCheck> {
    let mut out: BTreeMap<u16, HealthCheck> = BTreeMap::new();
    // Per service, the local ready addresses of each family: a dual-stack pod has one of each,
    // so the count is the larger family's, not the sum (a model is one family).
    let mut ips: Vec<IpAddr> = Vec::new();
    for m in models {
        for (key, svc) in &m.services {
            let Some(port) = svc.health_check_node_port else { continue };
            ips.clear();
            for p in &svc.ports {
                ips.extend(p.local_endpoints(m.family, &m.node).iter().filter(|e| e.ready).map(|e| e.ip));
            }
            ips.sort_unstable();
            ips.dedup();
            match out.get_mut(&port) {
                Some(h) if h.service != *key => {}
                Some(h) => h.local_endpoints = h.local_endpoints.max(ips.len()),
                None => {
                    out.insert(port, HealthCheck { service: key.clone(), port, local_endpoints: ips.len() });
                }
            }
        }
    }
    out
}

/// What the HTTP handler answers from.
struct Served {
    service: ServiceKey,
    local_endpoints: AtomicUsize,
    proxy_healthy: Arc<dyn Fn() -> bool + Send + Sync>,
}

/// One open health check port.
struct Listener {
    state: Arc<Served>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The open health check ports.
pub struct HealthServers {
    /// Addresses to listen on (empty: every address).
    addresses: Vec<IpAddr>,
    /// `serviceProxyHealthy` in the answers.
    proxy_healthy: Arc<dyn Fn() -> bool + Send + Sync>,
    /// By port.
    open: BTreeMap<u16, Listener>,
}

impl HealthServers {
    /// Servers listening on `addresses` (empty: all), reporting `proxy_healthy()` as
    /// `serviceProxyHealthy`.
    pub fn new(addresses: Vec<IpAddr>, proxy_healthy: Arc<dyn Fn() -> bool + Send + Sync>) -> Self {
        Self { addresses, proxy_healthy, open: BTreeMap::new() }
    }

    /// The ports open now.
    pub fn ports(&self) -> Vec<u16> {
        self.open.keys().copied().collect()
    }

    /// Opens, updates and closes listeners to serve `wanted`. A port that cannot be opened is
    /// reported and retried on the next call; the others are served regardless.
    pub async fn sync(&mut self, wanted: &BTreeMap<u16, HealthCheck>) -> Vec<(u16, std::io::Error)> {
        self.open.retain(|port, l| wanted.get(port).is_some_and(|h| h.service == l.state.service));
        let mut errors = Vec::new();
        for (port, check) in wanted {
            if let Some(l) = self.open.get(port) {
                l.state.local_endpoints.store(check.local_endpoints, Ordering::Relaxed);
                continue;
            }
            let state = Arc::new(Served {
                service: check.service.clone(),
                local_endpoints: AtomicUsize::new(check.local_endpoints),
                proxy_healthy: self.proxy_healthy.clone(),
            });
            match self.listen(*port, state.clone()).await {
                Ok(tasks) => {
                    self.open.insert(*port, Listener { state, tasks });
                }
                Err(e) => errors.push((*port, e)),
            }
        }
        errors
    }

    async fn listen(&self, port: u16, state: Arc<Served>) -> std::io::Result<Vec<JoinHandle<()>>> {
        let addresses =
            if self.addresses.is_empty() { vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)] } else { self.addresses.clone() };
        let mut listeners = Vec::new();
        for ip in addresses {
            listeners.push(tokio::net::TcpListener::bind(SocketAddr::new(ip, port)).await?);
        }
        let app = Router::new().fallback(answer).with_state(state);
        Ok(listeners
            .into_iter()
            .map(|l| {
                let app = app.clone();
                tokio::spawn(async move {
                    if let Err(e) = axum::serve(l, app).await {
                        tracing::warn!(port, error = %e, "health check server stopped");
                    }
                })
            })
            .collect())
    }
}

async fn answer(State(s): State<Arc<Served>>) -> impl IntoResponse {
    let count = s.local_endpoints.load(Ordering::Relaxed);
    let healthy = (s.proxy_healthy)();
    let status = if count > 0 && healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    // Namespace and name are DNS labels: nothing in them needs escaping in JSON.
    let body = format!(
        "{{\"service\":{{\"namespace\":\"{}\",\"name\":\"{}\"}},\"localEndpoints\":{count},\"serviceProxyHealthy\":{healthy}}}",
        s.service.namespace, s.service.name
    );
    (status, [(header::CONTENT_TYPE, "application/json"), (header::X_CONTENT_TYPE_OPTIONS, "nosniff")], body)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::atomic::AtomicBool;

    use super::super::model::{Endpoint, Family, Mode, PortModel, Protocol, ServiceModel};
    use super::*;

    fn model(local_ready: usize, port: Option<u16>) -> Model {
        let mut endpoints: Vec<Endpoint> = (0..local_ready)
            .map(|i| Endpoint::ready(format!("198.18.1.{}", i + 2).parse().unwrap(), 8080, "node-1"))
            .collect();
        endpoints.push(Endpoint::ready("198.18.2.2".parse().unwrap(), 8080, "node-2"));
        let svc = ServiceModel {
            ports: vec![PortModel { name: "http".into(), proto: Protocol::Tcp, port: 80, node_port: None, endpoints }],
            external_local: true,
            health_check_node_port: port,
            ..Default::default()
        };
        Model {
            node: "node-1".into(),
            family: Family::V4,
            mode: Mode::Full,
            node_ips: vec![],
            pod_cidrs: vec![],
            service_cidrs: vec![],
            services: [(ServiceKey::new("default", "lb"), svc)].into(),
        }
    }

    fn get(port: u16) -> String {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    #[test]
    fn wanted_counts_ready_local_endpoints() {
        let w = wanted(&[&model(2, Some(32000)), &model(0, None)]);
        assert_eq!(w.len(), 1);
        assert_eq!(w[&32000].local_endpoints, 2);
        assert_eq!(wanted(&[&model(0, Some(32000))])[&32000].local_endpoints, 0);
    }

    #[test]
    fn a_dual_stack_pod_counts_once() {
        let v4 = model(2, Some(32000));
        let mut v6 = model(0, Some(32000));
        v6.family = Family::V6;
        for (i, ip) in ["2001:db8:100:1::2", "2001:db8:100:1::3"].iter().enumerate() {
            let e = Endpoint::ready(ip.parse().unwrap(), 8080, "node-1");
            v6.services.values_mut().for_each(|s| s.ports[0].endpoints.insert(i, e.clone()));
        }
        assert_eq!(wanted(&[&v4, &v6])[&32000].local_endpoints, 2);
    }

    #[tokio::test]
    async fn answers_200_or_503_and_closes_when_the_service_goes() {
        let port = free_port();
        let healthy = Arc::new(AtomicBool::new(true));
        let h = healthy.clone();
        let mut servers =
            HealthServers::new(vec!["127.0.0.1".parse().unwrap()], Arc::new(move || h.load(Ordering::Relaxed)));
        assert!(servers.sync(&wanted(&[&model(2, Some(port))])).await.is_empty());
        let reply = tokio::task::spawn_blocking(move || get(port)).await.unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.contains("content-type: application/json"), "{reply}");
        assert!(reply.contains("x-content-type-options: nosniff"), "{reply}");
        assert!(
            reply.ends_with(
                r#"{"service":{"namespace":"default","name":"lb"},"localEndpoints":2,"serviceProxyHealthy":true}"#
            ),
            "{reply}"
        );

        assert!(servers.sync(&wanted(&[&model(0, Some(port))])).await.is_empty());
        let reply = tokio::task::spawn_blocking(move || get(port)).await.unwrap();
        assert!(reply.starts_with("HTTP/1.1 503") && reply.contains("\"localEndpoints\":0"), "{reply}");

        assert!(servers.sync(&wanted(&[&model(1, Some(port))])).await.is_empty());
        healthy.store(false, Ordering::Relaxed);
        let reply = tokio::task::spawn_blocking(move || get(port)).await.unwrap();
        assert!(reply.starts_with("HTTP/1.1 503") && reply.contains("\"serviceProxyHealthy\":false"), "{reply}");

        assert!(servers.sync(&BTreeMap::new()).await.is_empty());
        assert!(servers.ports().is_empty());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "port still open");
    }
}

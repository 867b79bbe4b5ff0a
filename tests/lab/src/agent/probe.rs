//! Readiness probes, run from the node's network namespace against the pod's address, as
//! the kubelet does: `httpGet` (200–399 is success), `tcpSocket` (a connect), and `exec`
//! (run in the pod's network namespace; exit 0 is success).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// How to check one container, resolved from its spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    Http {
        addr: SocketAddr,
        path: String,
        host_header: String,
    },
    Tcp {
        addr: SocketAddr,
    },
    Exec {
        command: Vec<String>,
    },
    /// A probe kind the lab does not run; always fails, with this reason.
    Unsupported(String),
}

/// Timing of a probe, with the kubelet's defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

fn secs(v: Option<i32>, default: i32) -> Duration {
    Duration::from_secs(u64::try_from(v.unwrap_or(default).max(0)).unwrap_or(0))
}

fn threshold(v: Option<i32>, default: u32) -> u32 {
    v.and_then(|v| u32::try_from(v).ok()).filter(|v| *v > 0).unwrap_or(default)
}

pub fn timing(p: &Probe) -> Timing {
    Timing {
        initial_delay: secs(p.initial_delay_seconds, 0),
        period: secs(p.period_seconds, 10).max(Duration::from_millis(100)),
        timeout: secs(p.timeout_seconds, 1).max(Duration::from_millis(100)),
        success_threshold: threshold(p.success_threshold, 1),
        failure_threshold: threshold(p.failure_threshold, 3),
    }
}

fn port(c: &Container, p: &IntOrString) -> Option<u16> {
    match p {
        IntOrString::Int(i) => u16::try_from(*i).ok(),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|cp| cp.name.as_deref() == Some(name.as_str()))
            .and_then(|cp| u16::try_from(cp.container_port).ok())
            .or_else(|| name.parse().ok()),
    }
}

/// Resolves a probe of container `c` in a pod with address `pod_ip`.
pub fn check(c: &Container, p: &Probe, pod_ip: IpAddr) -> Check {
    if let Some(h) = &p.http_get {
        if h.scheme.as_deref().is_some_and(|s| !s.eq_ignore_ascii_case("http")) {
            return Check::Unsupported("the lab runs httpGet probes over HTTP only".into());
        }
        let Some(port) = port(c, &h.port) else {
            return Check::Unsupported(format!("probe port {:?} is not a port of the container", h.port));
        };
        let ip = h.host.as_deref().and_then(|s| s.parse().ok()).unwrap_or(pod_ip);
        let addr = SocketAddr::new(ip, port);
        return Check::Http {
            addr,
            path: h.path.clone().filter(|p| p.starts_with('/')).unwrap_or_else(|| "/".into()),
            host_header: addr.to_string(),
        };
    }
    if let Some(t) = &p.tcp_socket {
        let Some(port) = port(c, &t.port) else {
            return Check::Unsupported(format!("probe port {:?} is not a port of the container", t.port));
        };
        let ip = t.host.as_deref().and_then(|s| s.parse().ok()).unwrap_or(pod_ip);
        return Check::Tcp { addr: SocketAddr::new(ip, port) };
    }
    if let Some(e) = &p.exec {
        return Check::Exec { command: e.command.clone().unwrap_or_default() };
    }
    Check::Unsupported("the lab runs httpGet, tcpSocket and exec probes only".into())
}

/// Runs one check; `Err` says why it failed. `netns` is the pod's namespace, for `exec`.
pub async fn run(check: &Check, timeout: Duration, netns: Option<&str>) -> Result<(), String> {
    let fut = async {
        match check {
            Check::Tcp { addr } => tokio::net::TcpStream::connect(addr).await.map(|_| ()).map_err(|e| e.to_string()),
            Check::Http { addr, path, host_header } => http_get(*addr, path, host_header).await,
            Check::Exec { command } => exec(command, netns).await,
            Check::Unsupported(why) => Err(why.clone()),
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("timed out after {timeout:?}")),
    }
}

async fn http_get(addr: SocketAddr, path: &str, host: &str) -> Result<(), String> {
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, host)
        .header(hyper::header::USER_AGENT, "ferrolb-lab-probe")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let code = resp.status().as_u16();
    if (200..400).contains(&code) { Ok(()) } else { Err(format!("HTTP probe failed with status {code}")) }
}

async fn exec(command: &[String], netns: Option<&str>) -> Result<(), String> {
    let Some((prog, args)) = command.split_first() else {
        return Err("exec probe has no command".into());
    };
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = tokio::process::Command::new("ip");
            c.args(["netns", "exec", ns, prog]);
            c
        }
        None => tokio::process::Command::new(prog),
    };
    let st = cmd.args(args).kill_on_drop(true).status().await.map_err(|e| e.to_string())?;
    if st.success() { Ok(()) } else { Err(format!("exec probe exited with {st}")) }
}

/// Consecutive results folded into readiness, with the probe's thresholds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    successes: u32,
    failures: u32,
}

impl Readiness {
    pub fn record(&mut self, ok: bool, t: &Timing) {
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if self.successes >= t.success_threshold {
                self.ready = true;
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.failures >= t.failure_threshold {
                self.ready = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerPort, HTTPGetAction};

    fn container() -> Container {
        Container {
            name: "c".into(),
            ports: Some(vec![ContainerPort { container_port: 80, name: Some("http".into()), ..Default::default() }]),
            ..Default::default()
        }
    }

    #[test]
    fn named_port_resolves_against_the_container() {
        let p = Probe {
            http_get: Some(HTTPGetAction {
                port: IntOrString::String("http".into()),
                path: Some("/ready".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let ip: IpAddr = "198.18.1.2".parse().unwrap();
        assert_eq!(
            check(&container(), &p, ip),
            Check::Http {
                addr: "198.18.1.2:80".parse().unwrap(),
                path: "/ready".into(),
                host_header: "198.18.1.2:80".into()
            }
        );
    }

    #[test]
    fn defaults_follow_the_kubelet() {
        let t = timing(&Probe::default());
        assert_eq!(t.period, Duration::from_secs(10));
        assert_eq!(t.timeout, Duration::from_secs(1));
        assert_eq!((t.success_threshold, t.failure_threshold), (1, 3));
    }

    #[test]
    fn readiness_needs_failure_threshold_failures_to_drop() {
        let t = Timing { failure_threshold: 2, ..timing(&Probe::default()) };
        let mut r = Readiness::default();
        r.record(true, &t);
        assert!(r.ready);
        r.record(false, &t);
        assert!(r.ready);
        r.record(false, &t);
        assert!(!r.ready);
        r.record(true, &t);
        assert!(r.ready);
    }
}

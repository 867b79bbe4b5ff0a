//! The demo server behind the image `alicek106/rr-test:echo-hostname`: HTTP on each of the
//! container's ports, answering with the pod's name and the client's source address and port,
//! so a test can see which pod answered and whether the client address was kept. Each port
//! answers UDP datagrams with the same body too, for tests of UDP services.

use std::net::{Ipv6Addr, SocketAddr};

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::routing::get;

/// The response body: one `key: value` line each.
pub fn body(pod: &str, client: SocketAddr) -> String {
    let ip = client.ip().to_canonical();
    let client = SocketAddr::new(ip, client.port());
    format!("hostname: {pod}\nclient: {client}\n")
}

async fn answer(State(pod): State<String>, ConnectInfo(peer): ConnectInfo<SocketAddr>) -> String {
    body(&pod, peer)
}

/// Serves until SIGTERM or SIGINT, on `[::]:port` for each port (IPv4 clients too).
pub async fn serve(pod: String, ports: Vec<u16>) -> Result<()> {
    let app = Router::new().fallback(get(answer)).with_state(pod.clone());
    let mut servers = tokio::task::JoinSet::new();
    for port in ports {
        let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
        let app = app.clone().into_make_service_with_connect_info::<SocketAddr>();
        servers.spawn(async move { axum::serve(listener, app).with_graceful_shutdown(shutdown()).await });
        let udp = tokio::net::UdpSocket::bind(addr).await.with_context(|| format!("binding {addr}/udp"))?;
        let pod = pod.clone();
        servers.spawn(async move {
            tokio::select! {
                _ = shutdown() => Ok(()),
                r = udp_answer(udp, pod) => r,
            }
        });
    }
    while let Some(r) = servers.join_next().await {
        r.context("server task")?.context("serving HTTP and UDP")?;
    }
    Ok(())
}

/// Answers each datagram with the body, to its sender.
async fn udp_answer(udp: tokio::net::UdpSocket, pod: String) -> std::io::Result<()> {
    let mut buf = [0u8; 1500];
    loop {
        let (_, peer) = udp.recv_from(&mut buf).await?;
        udp.send_to(body(&pod, peer).as_bytes(), peer).await?;
    }
}

async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_names_pod_and_client_with_ipv4_unmapped() {
        let peer: SocketAddr = "[::ffff:192.0.2.100]:40000".parse().unwrap();
        assert_eq!(body("hostname-abc", peer), "hostname: hostname-abc\nclient: 192.0.2.100:40000\n");
        let peer: SocketAddr = "[2001:db8:1::100]:41000".parse().unwrap();
        assert_eq!(body("p", peer), "hostname: p\nclient: [2001:db8:1::100]:41000\n");
    }
}

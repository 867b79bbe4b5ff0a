//! Clears stale UDP conntrack entries when a service's endpoints change, as kube-proxy does.
//!
//! ```text
//!   model, after each sync ── targets (pure) ──> Cleaner::request   (returns at once)
//!     UDP service IP:port -> serving endpoints            │ Queue: latest per family, plus
//!     UDP node port       -> serving endpoints            │ what went away since the last run
//!                                                         v
//!                               spawned task, one run at a time: one ctnetlink dump of the
//!                               table, is_stale (pure) per UDP entry, a delete for each stale one
//! ```
//!
//! UDP has no connection end: a client that keeps sending to a service IP keeps matching the
//! conntrack entry that NATs it to the endpoint it first got, even when that endpoint is gone,
//! until the entry times out. kube-proxy (`pkg/proxy/conntrack/cleanup.go`) deletes every UDP
//! entry whose original destination is a UDP service address (ClusterIP, external IP, LB IP) and
//! whose reply source is not a serving endpoint, and likewise for node ports by original
//! destination port. So do we, with three refinements: endpoints are matched by address and port
//! (a changed targetPort leaves flows to the old one stale); node ports only on this node's node
//! port addresses (kube-proxy matches any destination with that port number, unrelated flows
//! included); and an address or node port that went away since the last run has all its entries
//! cleared (kube-proxy forgets those).
//!
//! The I/O speaks ctnetlink directly (`netlink-packet-netfilter`): one dump and the deletes on
//! one socket per run, with no `conntrack` process. It runs off the sync's path: a sync hands its
//! targets over and goes on; a run that is under way when more syncs come is followed by one run
//! for all of them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use netlink_packet_core::{
    DefaultNla, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload, Nla,
};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol as CtProtocol, Tuple,
};
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily};
use netlink_sys::protocols::NETLINK_NETFILTER;
use netlink_sys::{Socket, SocketAddr};
use tokio::sync::Notify;

use super::model::{Family, Model, Protocol};

/// IANA protocol number of UDP.
const IPPROTO_UDP: u8 = 17;
/// ctnetlink attributes passed back on delete, so that exactly the dumped entry goes: its id
/// (a new entry reusing the tuple is left alone) and its zone (entries of a zone are only found
/// within it).
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;

/// An endpoint: address and port, as seen as the reply source of a NATed flow.
pub type Backend = (IpAddr, u16);

/// What the UDP flows of one family may reach: for each service address and port, and for each
/// node port, the endpoints that serve it. A flow to one of them that is answered by anything
/// else is stale.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Targets {
    /// Cluster, external and LB IPs with a UDP service port.
    pub services: BTreeMap<(IpAddr, u16), BTreeSet<Backend>>,
    /// UDP node ports.
    pub node_ports: BTreeMap<u16, BTreeSet<Backend>>,
    /// The addresses node ports are reached on.
    pub node_ips: BTreeSet<IpAddr>,
}

/// The targets of a model: every UDP service port's addresses and node port, with its serving
/// endpoints (ready or serving, terminating or not: as kube-proxy, a flow is not cut while its
/// endpoint still answers, whatever the policies say about new flows).
pub fn targets(model: &Model) -> Targets {
    let mut t = Targets { node_ips: model.nodeport_ips().into_iter().collect(), ..Default::default() };
    // Most Services have no UDP port: they cost a look at their ports, nothing more.
    for svc in model.services.values().filter(|s| s.ports.iter().any(|p| p.proto == Protocol::Udp)) {
        let addresses: Vec<IpAddr> = svc
            .cluster_ips
            .iter()
            .chain(&svc.external_ips)
            .chain(&svc.lb_ips)
            .copied()
            .filter(|ip| Family::of(ip) == model.family)
            .collect();
        for port in svc.ports.iter().filter(|p| p.proto == Protocol::Udp) {
            let serving: BTreeSet<Backend> = port
                .endpoints
                .iter()
                .filter(|e| Family::of(&e.ip) == model.family && (e.ready || e.serving))
                .map(|e| (e.ip, e.port))
                .collect();
            // Two services on one address and port (a conflict the model reports elsewhere):
            // keep the flows of both.
            for ip in &addresses {
                t.services.entry((*ip, port.port)).or_default().extend(&serving);
            }
            if let Some(np) = port.node_port {
                t.node_ports.entry(np).or_default().extend(&serving);
            }
        }
    }
    t
}

impl Targets {
    /// `self`, plus every address and node port of `before` that `self` lacks, with no endpoint:
    /// all flows to something that went away are stale.
    pub fn with_gone(mut self, before: &Targets) -> Targets {
        for key in before.services.keys() {
            self.services.entry(*key).or_default();
        }
        for port in before.node_ports.keys() {
            self.node_ports.entry(*port).or_default();
        }
        self.node_ips.extend(&before.node_ips);
        self
    }

    /// Whether `flow` must go: UDP, to a target, answered by something that does not serve it.
    pub fn is_stale(&self, flow: &Flow) -> bool {
        if flow.proto != IPPROTO_UDP {
            return false;
        }
        let reply = (flow.reply_src, flow.reply_sport);
        let by_service = self.services.get(&(flow.orig_dst, flow.orig_dport)).is_some_and(|eps| !eps.contains(&reply));
        let by_node_port = self.node_ips.contains(&flow.orig_dst)
            && self.node_ports.get(&flow.orig_dport).is_some_and(|eps| !eps.contains(&reply));
        by_service || by_node_port
    }
}

/// One conntrack entry, as far as cleaning goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    /// IANA protocol number.
    pub proto: u8,
    /// Original direction: the client and the address it sent to.
    pub orig_src: IpAddr,
    pub orig_dst: IpAddr,
    pub orig_sport: u16,
    pub orig_dport: u16,
    /// Reply direction: who answers (the endpoint, for a NATed flow).
    pub reply_src: IpAddr,
    pub reply_sport: u16,
}

/// What to clear next. Pure, so the coalescing is tested without a kernel.
#[derive(Debug, Default)]
pub struct Queue {
    /// The targets of the last request, per family.
    last: BTreeMap<Family, Targets>,
    /// What the next run clears, per family: the latest targets and everything that went away
    /// since the last run started.
    next: BTreeMap<Family, Targets>,
}

impl Queue {
    /// Records the targets after a sync; `true` when the next run has something new to do. The
    /// first request of a family always has (it clears what an earlier speaker left).
    pub fn push(&mut self, family: Family, targets: Targets) -> bool {
        let last = self.last.get(&family);
        if last == Some(&targets) {
            return false;
        }
        let mut job = targets.clone();
        if let Some(before) = last {
            job = job.with_gone(before);
        }
        if let Some(queued) = self.next.remove(&family) {
            job = job.with_gone(&queued);
        }
        self.last.insert(family, targets);
        self.next.insert(family, job);
        true
    }

    /// The next run's work; the queue is empty after.
    pub fn take(&mut self) -> BTreeMap<Family, Targets> {
        std::mem::take(&mut self.next)
    }

    /// Puts back the work of a run that failed, under anything requested since.
    pub fn retry(&mut self, failed: BTreeMap<Family, Targets>) {
        for (family, job) in failed {
            let merged = match self.next.remove(&family) {
                Some(newer) => newer.with_gone(&job),
                None => job,
            };
            self.next.insert(family, merged);
        }
    }
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening a ctnetlink socket: {0}")]
    Socket(std::io::Error),
    #[error("talking to ctnetlink: {0}")]
    Io(std::io::Error),
    #[error("ctnetlink refused the request: {0}")]
    Kernel(std::io::Error),
}

/// What a run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cleared {
    /// UDP entries looked at.
    pub udp_entries: usize,
    /// Entries deleted.
    pub deleted: usize,
    /// Dumped messages that could not be read (skipped).
    pub unreadable: usize,
}

/// A ctnetlink socket of the caller's network namespace. Blocking.
pub struct Conntrack {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
    unreadable: usize,
}

/// The largest datagram the kernel sends on a dump (it caps them at 32 KiB).
const RECV_BUFFER: usize = 64 * 1024;

impl Conntrack {
    /// Opens a socket in the calling thread's network namespace (needs CAP_NET_ADMIN).
    pub fn open() -> Result<Self, Error> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(Error::Socket)?;
        socket.bind_auto().map_err(Error::Socket)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(Error::Socket)?;
        Ok(Conntrack { socket, seq: 0, buf: Vec::with_capacity(RECV_BUFFER), unreadable: 0 })
    }

    fn send(&mut self, flags: u16, family: NetfilterProtoFamily, message: ConntrackMessage) -> Result<u32, Error> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.seq;
        let inner = NetfilterMessage::new(NetfilterHeader::new(family, 0, 0), message);
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::from(inner));
        msg.finalize();
        let mut bytes = vec![0; msg.buffer_len()];
        msg.serialize(&mut bytes);
        self.socket.send(&bytes, 0).map_err(Error::Io)?;
        Ok(self.seq)
    }

    /// Reads the answer to request `seq` to its end (the ack, or the end of a dump), giving each
    /// conntrack message to `each`. Messages of other requests are dropped; messages that cannot
    /// be read are counted and skipped.
    fn receive(&mut self, seq: u32, mut each: impl FnMut(ConntrackMessage)) -> Result<(), Error> {
        loop {
            self.buf.clear();
            let n = self.socket.recv(&mut self.buf, 0).map_err(Error::Io)?;
            let data = &self.buf[..n.min(self.buf.len())];
            for bytes in crate::netlink::messages(data) {
                let parsed = NetlinkMessage::<NetfilterMessage>::deserialize(bytes);
                let msg = match parsed {
                    Ok(m) => m,
                    Err(_) => {
                        self.unreadable += 1;
                        continue;
                    }
                };
                if msg.header.sequence_number != seq {
                    continue;
                }
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::Error(e) if e.code.is_none() => return Ok(()),
                    NetlinkPayload::Error(e) => return Err(Error::Kernel(e.to_io())),
                    NetlinkPayload::InnerMessage(NetfilterMessage {
                        inner: NetfilterMessageInner::Conntrack(ct),
                        ..
                    }) => each(ct),
                    _ => {}
                }
            }
        }
    }

    /// Every UDP entry of the table, both families.
    pub fn dump_udp(&mut self) -> Result<Vec<Entry>, Error> {
        let seq = self.send(NLM_F_REQUEST | NLM_F_DUMP, NetfilterProtoFamily::Unspec, ConntrackMessage::Get(vec![]))?;
        let mut out = Vec::new();
        self.receive(seq, |m| out.extend(Entry::read(m).filter(|e| e.flow.proto == IPPROTO_UDP)))?;
        Ok(out)
    }

    /// Deletes `entry`; `false` when it was gone already.
    pub fn delete(&mut self, entry: &Entry) -> Result<bool, Error> {
        let f = &entry.flow;
        let family = if f.orig_src.is_ipv4() { NetfilterProtoFamily::IPv4 } else { NetfilterProtoFamily::IPv6 };
        let mut attributes = vec![ConntrackAttribute::CtaTupleOrig(vec![
            Tuple::Ip(vec![IPTuple::SourceAddress(f.orig_src), IPTuple::DestinationAddress(f.orig_dst)]),
            Tuple::Proto(vec![
                ProtoTuple::Protocol(CtProtocol::from(f.proto)),
                ProtoTuple::SourcePort(f.orig_sport),
                ProtoTuple::DestinationPort(f.orig_dport),
            ]),
        ])];
        attributes.extend(entry.identity.iter().cloned().map(ConntrackAttribute::Other));
        let seq = self.send(NLM_F_REQUEST | NLM_F_ACK, family, ConntrackMessage::Delete(attributes))?;
        match self.receive(seq, |_| {}) {
            Ok(()) => Ok(true),
            Err(Error::Kernel(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// A dumped entry: its flow, and what identifies it exactly for a delete.
#[derive(Clone, Debug)]
pub struct Entry {
    pub flow: Flow,
    identity: Vec<DefaultNla>,
}

impl Entry {
    fn read(message: ConntrackMessage) -> Option<Entry> {
        let ConntrackMessage::New(attributes) = message else { return None };
        let (mut orig, mut reply, mut identity) = (None, None, Vec::new());
        for a in attributes {
            match a {
                ConntrackAttribute::CtaTupleOrig(t) => orig = tuple(&t),
                ConntrackAttribute::CtaTupleReply(t) => reply = tuple(&t),
                ConntrackAttribute::Other(nla) if matches!(nla.kind(), CTA_ID | CTA_ZONE) => identity.push(nla),
                _ => {}
            }
        }
        let (proto, orig_src, orig_dst, orig_sport, orig_dport) = orig?;
        let (_, reply_src, _, reply_sport, _) = reply?;
        Some(Entry {
            flow: Flow { proto, orig_src, orig_dst, orig_sport, orig_dport, reply_src, reply_sport },
            identity,
        })
    }
}

/// (protocol, source, destination, source port, destination port) of a tuple; ports are 0 for
/// protocols without them.
fn tuple(t: &[Tuple]) -> Option<(u8, IpAddr, IpAddr, u16, u16)> {
    let (mut src, mut dst, mut proto, mut sport, mut dport) = (None, None, None, 0, 0);
    for part in t {
        match part {
            Tuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => src = Some(*a),
                        IPTuple::DestinationAddress(a) => dst = Some(*a),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(ps) => {
                for p in ps {
                    match p {
                        ProtoTuple::Protocol(n) => proto = Some(u8::from(*n)),
                        ProtoTuple::SourcePort(n) => sport = *n,
                        ProtoTuple::DestinationPort(n) => dport = *n,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some((proto?, src?, dst?, sport, dport))
}

/// One run: a dump, and a delete of every entry stale for its family's targets. Blocking.
pub fn clear(jobs: &BTreeMap<Family, Targets>) -> Result<Cleared, Error> {
    let mut ct = Conntrack::open()?;
    let entries = ct.dump_udp()?;
    let mut cleared = Cleared { udp_entries: entries.len(), ..Default::default() };
    for e in &entries {
        if jobs.get(&Family::of(&e.flow.orig_dst)).is_some_and(|t| t.is_stale(&e.flow)) && ct.delete(e)? {
            cleared.deleted += 1;
        }
    }
    cleared.unreadable = ct.unreadable;
    Ok(cleared)
}

/// The handle a sync hands its targets to. Cheap to clone; the task behind it starts with the
/// first request (inside the runtime) and runs one clear at a time.
#[derive(Clone, Default)]
pub struct Cleaner {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    wake: Notify,
    started: OnceLock<()>,
}

impl fmt::Debug for Cleaner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Cleaner")
    }
}

impl Cleaner {
    /// Hands over the targets of `family` after a sync; never waits.
    pub fn request(&self, family: Family, targets: Targets) {
        let new = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner()).push(family, targets);
        if new {
            let shared = self.shared.clone();
            self.shared.started.get_or_init(|| {
                tokio::spawn(run(shared));
            });
            self.shared.wake.notify_one();
        }
    }
}

/// The cleaner's task: waits for work, runs it off the runtime's threads, puts it back after a
/// failure (retried with a backoff, so a missing capability is not a busy loop).
async fn run(shared: Arc<Shared>) {
    let mut backoff: Option<Duration> = None;
    loop {
        shared.wake.notified().await;
        let jobs = shared.queue.lock().unwrap_or_else(|e| e.into_inner()).take();
        if jobs.is_empty() {
            continue;
        }
        let start = Instant::now();
        let work = jobs.clone();
        let result = tokio::task::spawn_blocking(move || clear(&work)).await;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        match result {
            Ok(Ok(c)) => {
                backoff = None;
                if c.deleted > 0 || c.unreadable > 0 {
                    tracing::info!(
                        deleted = c.deleted,
                        udp_entries = c.udp_entries,
                        unreadable = c.unreadable,
                        ms,
                        "stale UDP conntrack entries cleared"
                    );
                } else {
                    tracing::debug!(udp_entries = c.udp_entries, ms, "no stale UDP conntrack entries");
                }
            }
            failed => {
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => e.to_string(),
                    Ok(Ok(_)) => String::new(),
                };
                let wait = backoff.map_or(Duration::from_secs(1), |b| (b * 2).min(Duration::from_secs(60)));
                backoff = Some(wait);
                tracing::warn!(%error, retry_in = ?wait, "cannot clear stale UDP conntrack entries");
                shared.queue.lock().unwrap_or_else(|e| e.into_inner()).retry(jobs);
                tokio::time::sleep(wait).await;
                shared.wake.notify_one();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::model::{Endpoint, Mode, PortModel, ServiceKey, ServiceModel};
    use super::*;

    fn model(ports: Vec<(Protocol, Vec<&str>)>) -> Model {
        let ports = ports
            .into_iter()
            .enumerate()
            .map(|(i, (proto, eps))| PortModel {
                name: format!("p{i}"),
                proto,
                port: 53 + i as u16,
                node_port: Some(30053 + i as u16),
                endpoints: eps.iter().map(|e| Endpoint::ready(e.parse().unwrap(), 5353, "node-1")).collect(),
            })
            .collect();
        let svc = ServiceModel {
            cluster_ips: vec!["198.19.0.10".parse().unwrap()],
            lb_ips: vec!["192.0.2.200".parse().unwrap(), "2001:db8:1::c8".parse().unwrap()],
            ports,
            ..Default::default()
        };
        Model {
            node: "node-1".into(),
            family: Family::V4,
            mode: Mode::Full,
            node_ips: vec!["192.0.2.11".parse().unwrap()],
            pod_cidrs: vec![],
            service_cidrs: vec![],
            services: [(ServiceKey::new("default", "dns"), svc)].into(),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A UDP flow from a client to `dst`, answered by `reply`.
    fn flow(dst: &str, dport: u16, reply: &str, rport: u16) -> Flow {
        Flow {
            proto: IPPROTO_UDP,
            orig_src: ip("192.0.2.100"),
            orig_dst: ip(dst),
            orig_sport: 40000,
            orig_dport: dport,
            reply_src: ip(reply),
            reply_sport: rport,
        }
    }

    #[test]
    fn targets_hold_every_udp_address_and_node_port_of_the_family_with_serving_endpoints() {
        let mut m = model(vec![(Protocol::Udp, vec!["198.18.1.2", "198.18.1.3"]), (Protocol::Tcp, vec!["198.18.1.2"])]);
        // Not ready but serving (terminating): its flows are kept, as kube-proxy keeps them.
        let svc = m.services.values_mut().next().unwrap();
        svc.ports[0].endpoints[1].ready = false;
        let t = targets(&m);
        let eps: BTreeSet<Backend> = [(ip("198.18.1.2"), 5353), (ip("198.18.1.3"), 5353)].into();
        assert_eq!(t.services.keys().copied().collect::<Vec<_>>(), [(ip("192.0.2.200"), 53), (ip("198.19.0.10"), 53)]);
        assert!(t.services.values().all(|e| *e == eps));
        assert_eq!(t.node_ports, [(30053, eps)].into());
        assert_eq!(t.node_ips, [ip("192.0.2.11")].into());
    }

    #[test]
    fn a_flow_is_stale_when_answered_by_no_serving_endpoint_of_its_target() {
        let t = targets(&model(vec![(Protocol::Udp, vec!["198.18.1.3"]), (Protocol::Tcp, vec!["198.18.1.3"])]));
        // To the ClusterIP or LB IP, answered by a removed pod: stale; by a serving one: kept.
        assert!(t.is_stale(&flow("198.19.0.10", 53, "198.18.1.2", 5353)));
        assert!(t.is_stale(&flow("192.0.2.200", 53, "198.18.1.2", 5353)));
        assert!(!t.is_stale(&flow("198.19.0.10", 53, "198.18.1.3", 5353)));
        // The same pod on another port (a changed targetPort): stale.
        assert!(t.is_stale(&flow("198.19.0.10", 53, "198.18.1.3", 5354)));
        // Node port on the node's address: by port; the same port to another address is not ours.
        assert!(t.is_stale(&flow("192.0.2.11", 30053, "198.18.1.2", 5353)));
        assert!(!t.is_stale(&flow("192.0.2.11", 30053, "198.18.1.3", 5353)));
        assert!(!t.is_stale(&flow("203.0.113.7", 30053, "198.18.1.2", 5353)));
        // Another port of the service address (the TCP one), or another protocol: not ours.
        assert!(!t.is_stale(&flow("198.19.0.10", 54, "198.18.1.2", 5353)));
        assert!(!t.is_stale(&Flow { proto: 6, ..flow("198.19.0.10", 53, "198.18.1.2", 5353) }));
        // Unrelated traffic: kept.
        assert!(!t.is_stale(&flow("198.51.100.1", 53, "198.51.100.1", 53)));
    }

    #[test]
    fn what_went_away_has_all_its_flows_cleared() {
        let before = targets(&model(vec![(Protocol::Udp, vec!["198.18.1.2"])]));
        let mut m = model(vec![]);
        m.services.clear();
        let after = targets(&m).with_gone(&before);
        assert!(after.is_stale(&flow("198.19.0.10", 53, "198.18.1.2", 5353)));
        assert!(after.is_stale(&flow("192.0.2.11", 30053, "198.18.1.2", 5353)));
        assert!(!after.is_stale(&flow("198.19.0.11", 53, "198.18.1.2", 5353)));
    }

    #[test]
    fn the_queue_runs_once_for_many_syncs_and_forgets_nothing_that_went_away() {
        let mut q = Queue::default();
        let one = targets(&model(vec![(Protocol::Udp, vec!["198.18.1.2"])]));
        // The first request always runs (leftovers of an earlier speaker).
        assert!(q.push(Family::V4, one.clone()));
        assert_eq!(q.take()[&Family::V4], one);
        // The same targets again: nothing to do.
        assert!(!q.push(Family::V4, one.clone()));
        assert!(q.take().is_empty());
        // Two syncs before the next run: a service comes and goes, then the first goes too.
        let mut two = model(vec![(Protocol::Udp, vec!["198.18.1.2"])]);
        let extra = two.services.values().next().unwrap().clone();
        let mut extra = extra;
        extra.cluster_ips = vec![ip("198.19.0.20")];
        extra.lb_ips = vec![];
        two.services.insert(ServiceKey::new("default", "extra"), extra);
        assert!(q.push(Family::V4, targets(&two)));
        let mut none = model(vec![]);
        none.services.clear();
        assert!(q.push(Family::V4, targets(&none)));
        let jobs = q.take();
        assert_eq!(jobs.len(), 1, "one run for both syncs");
        let job = &jobs[&Family::V4];
        assert!(job.is_stale(&flow("198.19.0.20", 53, "198.18.1.2", 5353)), "the short-lived service");
        assert!(job.is_stale(&flow("198.19.0.10", 53, "198.18.1.2", 5353)), "the first service");
        // A failed run is put back under newer work, which wins where both speak.
        q.retry(jobs);
        assert!(q.push(Family::V4, one.clone()));
        let job = &q.take()[&Family::V4];
        assert!(!job.is_stale(&flow("198.19.0.10", 53, "198.18.1.2", 5353)), "back, and served again");
        assert!(job.is_stale(&flow("198.19.0.20", 53, "198.18.1.2", 5353)), "still gone");
    }

    /// A test's own network namespace: this thread is moved into a new one (commands it starts
    /// inherit it; it goes away with the thread).
    fn own_netns() {
        let uid = std::process::Command::new("id").arg("-u").output().expect("cannot run `id -u`");
        let uid = String::from_utf8_lossy(&uid.stdout).trim().to_owned();
        assert_eq!(uid, "0", "the conntrack kernel test needs root (to unshare a network namespace); uid is {uid}");
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
    }

    fn sh(script: &str) {
        let out = std::process::Command::new("sh").args(["-ec", script]).output().expect("cannot run sh");
        assert!(out.status.success(), "`{script}` failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }

    /// Real kernel: UDP flows DNATed to two "pods"; one pod is removed from the model; one run
    /// deletes exactly its flow, the other service's flow and an unrelated one stay.
    #[test]
    fn a_run_deletes_the_stale_dnat_entry_and_nothing_else_in_the_kernel() {
        let result = std::thread::spawn(|| {
            own_netns();
            sh("ip link set lo up; ip link add d0 type veth peer name d1; ip link set d1 up; ip link set d0 up; \
                ip addr add 198.18.1.2/24 dev d0; ip addr add 198.18.1.3/24 dev d0; ip addr add 198.18.1.4/24 dev d0; \
                ip route add 198.19.0.0/16 dev d0; \
                ip addr add 2001:db8:1::2/64 dev d0 nodad; ip route add 2001:db8:ff::/112 dev d0");
            sh("nft -f - <<'EOF'
table ip t {
  chain out { type nat hook output priority -100; policy accept;
    ip daddr 198.19.0.10 udp dport 53 dnat to 198.18.1.2:5353
    ip daddr 198.19.0.11 udp dport 53 dnat to 198.18.1.3:5353
  }
}
table ip6 t {
  chain out { type nat hook output priority -100; policy accept;
    ip6 daddr 2001:db8:ff::10 udp dport 53 dnat to [2001:db8:1::2]:5353
  }
}
EOF");
            // Two UDP flows through the DNAT, and many straight to an address of the namespace.
            let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("udp socket");
            for dst in ["198.19.0.10:53", "198.19.0.11:53"] {
                socket.send_to(b"x", dst).expect("send");
            }
            // And one of IPv6, whose service is gone altogether.
            let socket6 = std::net::UdpSocket::bind("[::]:0").expect("udp socket");
            socket6.send_to(b"x", "[2001:db8:ff::10]:53").expect("send");
            const UNRELATED: u16 = 5000;
            for port in 0..UNRELATED {
                socket.send_to(b"x", (ip("198.18.1.4"), 10_000 + port)).expect("send");
            }
            let mut ct = Conntrack::open().expect("ctnetlink socket");
            let before = ct.dump_udp().expect("dump");
            let flows: Vec<Flow> = before.iter().map(|e| e.flow).collect();
            let dnat =
                |f: &&Flow| f.orig_dst == ip("198.19.0.10") && f.reply_src == ip("198.18.1.2") && f.reply_sport == 5353;
            assert!(flows.iter().any(|f| dnat(&f)), "no DNAT entry to clear");
            assert!(flows.iter().any(|f| f.orig_dst == ip("2001:db8:ff::10") && f.reply_src == ip("2001:db8:1::2")));
            assert_eq!(flows.len(), 3 + usize::from(UNRELATED));
            // The model now: service .10 lost its pod (198.18.1.2 went to .5), .11 keeps its.
            let mut m = model(vec![(Protocol::Udp, vec!["198.18.1.5"])]);
            let mut other = m.services.values().next().unwrap().clone();
            other.cluster_ips = vec![ip("198.19.0.11")];
            other.lb_ips = vec![];
            other.ports[0].endpoints = vec![Endpoint::ready(ip("198.18.1.3"), 5353, "node-1")];
            m.services.insert(ServiceKey::new("default", "other"), other);
            let start = Instant::now();
            let gone6 =
                Targets { services: [((ip("2001:db8:ff::10"), 53), BTreeSet::new())].into(), ..Default::default() };
            let cleared = clear(&[(Family::V4, targets(&m)), (Family::V6, gone6)].into()).expect("clear");
            // A figure, not a bound: what one run costs with this many entries.
            println!(
                "one run: {} UDP entries dumped, {} deleted, in {:?}",
                cleared.udp_entries,
                cleared.deleted,
                start.elapsed()
            );
            assert_eq!((cleared.udp_entries, cleared.deleted), (flows.len(), 2), "{cleared:?}");
            let after: Vec<Flow> = ct.dump_udp().expect("dump").into_iter().map(|e| e.flow).collect();
            assert_eq!(after.len(), flows.len() - 2);
            assert!(!after.iter().any(|f| f.orig_dst == ip("2001:db8:ff::10")), "the IPv6 entry is still there");
            assert!(!after.iter().any(|f| f.orig_dst == ip("198.19.0.10")), "the stale entry is still there");
            assert!(after.iter().any(|f| f.orig_dst == ip("198.19.0.11")), "the served flow went");
            let unrelated = after.iter().filter(|f| f.orig_dst == ip("198.18.1.4")).count();
            assert_eq!(unrelated, usize::from(UNRELATED), "unrelated flows went");
            // Deleting it again: already gone, no error.
            let gone = before.iter().find(|e| e.flow.orig_dst == ip("198.19.0.10")).unwrap();
            assert!(!ct.delete(gone).expect("delete"));
        })
        .join();
        if let Err(e) = result {
            std::panic::resume_unwind(e);
        }
    }
}

//! The speaker in a cluster: watches Nodes, Services, EndpointSlices, pools and
//! advertisements; learns who is alive from the membership; elects; answers for what this
//! node won; announces what it takes.
//!
//! ```text
//!   watches ──┐
//!             ├─(change)─> facts ─> election ─> this node's addresses per interface
//!   membership┘                                      │
//!                                                    └─> responders (set; gratuitous on take)
//! ```
//!
//! Losing the API server changes nothing: the caches keep the last word, the membership keeps
//! running, and so every announcement stays.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use ferrolb_api::{IPAddressPool, L2Advertisement};
use ferrolb_config::{ClassPolicy, PoolInput, build_advertisements, build_pools, internal_ip_like, internal_ips};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::Store;
use kube::{Api, Client, ResourceExt};
use tokio::sync::Notify;

use crate::dataplane::handover::{self, Handover};
use crate::dataplane::model::Family;
use crate::dataplane::runner::NftCommand;
use crate::election::{self, Announcement};
use crate::facts;
use crate::l2::responder::{ANNOUNCE_SCHEDULE, Announced, EventSink, Responder, usable_interfaces};
use crate::membership;
use crate::metrics::{AnnouncedLabel, Metrics};
use crate::status;
use crate::watch::{Cluster, watch};

/// How the speaker runs (from flags).
#[derive(Clone, Debug)]
pub struct Settings {
    /// This node's name (the Node object, and the speaker's name in the membership).
    pub node: String,
    pub class: ClassPolicy,
    /// Where the IPAddressPools and L2Advertisements live.
    pub namespace: String,
    /// Membership port on every node.
    pub membership_port: u16,
    /// Address of this node the membership binds to.
    pub node_ip: IpAddr,
    pub secret: Option<Vec<u8>>,
    /// With a data plane: where this node's handovers go (see `dataplane::handover`); they
    /// are applied here, before the gratuitous packets that move the clients.
    pub handovers: Option<Arc<tokio::sync::watch::Sender<Vec<Handover>>>>,
    /// With a data plane: where the nodes whose speakers died go (the membership's word), so
    /// new connections avoid their endpoints.
    pub avoid: Option<Arc<tokio::sync::watch::Sender<BTreeSet<String>>>>,
    /// The owner of the ServiceL2Statuses written (the speakers' DaemonSet), if known.
    pub status_owner: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>,
}

#[derive(Clone)]
struct Caches {
    nodes: Store<Node>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    pools: Store<IPAddressPool>,
    ads: Store<L2Advertisement>,
    changed: Arc<Notify>,
}

impl Caches {
    fn start(client: &Client, s: &Settings, cluster: &Cluster) -> Self {
        let changed = cluster.announcer.clone();
        Caches {
            nodes: cluster.nodes.clone(),
            services: cluster.services.clone(),
            slices: cluster.slices.clone(),
            pools: watch(Api::<IPAddressPool>::namespaced(client.clone(), &s.namespace), vec![changed.clone()]),
            ads: watch(Api::<L2Advertisement>::namespaced(client.clone(), &s.namespace), vec![changed.clone()]),
            changed,
        }
    }

    async fn ready(&self) -> Result<(), kube::runtime::reflector::store::WriterDropped> {
        self.nodes.wait_until_ready().await?;
        self.services.wait_until_ready().await?;
        self.slices.wait_until_ready().await?;
        self.pools.wait_until_ready().await?;
        self.ads.wait_until_ready().await
    }

    /// The election over what the caches say now, with `alive` from the membership.
    fn elect(&self, s: &Settings, alive: &BTreeSet<String>) -> BTreeMap<IpAddr, Announcement> {
        let nodes: Vec<_> = self.nodes.state().iter().map(|n| facts::node_facts(n, alive)).collect();
        let slices = self.slices.state();
        let services: Vec<_> = self
            .services
            .state()
            .iter()
            .filter_map(|svc| facts::service_facts(svc, &s.class, slices.iter().map(|a| a.as_ref())))
            .collect();
        let pools = build_pools(self.pools.state().iter().map(|p| PoolInput::from_object(p.as_ref())).collect());
        let (ads, _) = build_advertisements(self.ads.state().iter().map(|a| (a.name_any(), a.spec.clone())).collect());
        election::elect(&nodes, &services, &pools, &ads)
    }

    /// The other Nodes that are Ready: the speakers a joining speaker expects to meet.
    fn ready_peers(&self, s: &Settings) -> BTreeSet<String> {
        self.nodes
            .state()
            .iter()
            .filter(|n| n.metadata.name.as_deref() != Some(s.node.as_str()))
            .filter(|n| {
                n.status
                    .as_ref()
                    .and_then(|st| st.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
            .filter_map(|n| n.metadata.name.clone())
            .collect()
    }

    /// Membership addresses of every Node but ours (their first InternalIP of our family).
    fn peers(&self, s: &Settings) -> Vec<SocketAddr> {
        self.nodes
            .state()
            .iter()
            .filter(|n| n.metadata.name.as_deref() != Some(s.node.as_str()))
            .filter_map(|n| internal_ip_like(n, s.node_ip))
            .map(|ip| SocketAddr::new(ip, s.membership_port))
            .collect()
    }
}

impl Caches {
    /// Every Node's InternalIPs: whom the membership believes.
    fn node_addrs(&self) -> membership::NodeAddrs {
        self.nodes.state().iter().filter_map(|n| Some((n.metadata.name.clone()?, internal_ips(n)))).collect()
    }

    /// The first InternalIP of `node` in the family of `like`.
    fn node_ip(&self, node: &str, like: IpAddr) -> Option<IpAddr> {
        let n = self.nodes.state().into_iter().find(|n| n.metadata.name.as_deref() == Some(node))?;
        internal_ip_like(&n, like)
    }
}

/// How long a joining speaker waits for every Ready peer before it elects without them.
const JOIN_WAIT: Duration = Duration::from_secs(3);

/// How long a handover outlives its previous announcer's speaker: the node may still forward
/// (its speaker restarts, in an upgrade, say) and its connections in flight finish within this;
/// if the node died with it, those connections were lost anyway.
const HANDOVER_GRACE: Duration = Duration::from_secs(30);

/// How long this node waits before it takes an address from an announcer that is alive and
/// still eligible (a node coming back, or uncordoned, ranks first again): time for that
/// announcer to see the change too and let go, so that two nodes never answer together. Traffic
/// goes on through the announcer meanwhile. A move off a dead, cordoned or no longer eligible
/// announcer never waits.
const MOVE_GRACE: Duration = Duration::from_millis(400);

/// A handover and why it is kept.
struct Kept {
    previous_node: String,
    since: std::time::Instant,
    handover: Handover,
}

/// The handovers after this pass. An address newly ours (not in `before`) gets one to the node
/// that announced it in the last pass (`last_all`) or, on our first pass, to the node that would
/// announce it without us; if that node's speaker is alive or was a pass ago (it just left).
/// A handover stays while the address is ours and that speaker lives, or for `HANDOVER_GRACE`.
#[allow(clippy::too_many_arguments)]
fn handovers(
    caches: &Caches,
    s: &Settings,
    alive: &BTreeSet<String>,
    last_alive: &BTreeSet<String>,
    last_all: &BTreeMap<IpAddr, String>,
    now_mine: &BTreeMap<IpAddr, Vec<String>>,
    before: &BTreeMap<IpAddr, Vec<String>>,
    kept: &mut BTreeMap<IpAddr, Kept>,
) {
    kept.retain(|ip, k| {
        now_mine.contains_key(ip) && (alive.contains(&k.previous_node) || k.since.elapsed() < HANDOVER_GRACE)
    });
    let newly: Vec<(&IpAddr, &Vec<String>)> = now_mine.iter().filter(|(ip, _)| !before.contains_key(*ip)).collect();
    if newly.is_empty() {
        return;
    }
    let recent: BTreeSet<String> = alive.union(last_alive).filter(|n| **n != s.node).cloned().collect();
    let without_me = if last_all.is_empty() { caches.elect(s, &recent) } else { BTreeMap::new() };
    for (ip, ifaces) in newly {
        let prev = match last_all.get(ip) {
            Some(n) => Some(n.clone()),
            None => without_me.get(ip).map(|a| a.node.clone()),
        };
        let Some(prev) = prev.filter(|p| *p != s.node && recent.contains(p)) else { continue };
        if let (Some(previous), Some(interface)) = (caches.node_ip(&prev, *ip), ifaces.first()) {
            tracing::info!(ip = %ip, from = %prev, "connections in flight go on to the previous announcer");
            let handover = Handover { ip: *ip, previous, interface: interface.clone() };
            kept.insert(*ip, Kept { previous_node: prev, since: std::time::Instant::now(), handover });
        }
    }
}

/// The addresses this node wins but waits for (see [`MOVE_GRACE`]): won by rank from an
/// announcer (`last_all`, else the winner without us) that is alive (in `others`) and would
/// still win without us. `deferred` keeps when each wait ends and from whom; what no longer
/// waits leaves it.
#[allow(clippy::too_many_arguments)]
fn planned_moves(
    caches: &Caches,
    s: &Settings,
    all: &BTreeMap<IpAddr, Announcement>,
    mine: &BTreeMap<IpAddr, Vec<String>>,
    last_all: &BTreeMap<IpAddr, String>,
    others: &BTreeSet<String>,
    holding: bool,
    deferred: &mut BTreeMap<IpAddr, (tokio::time::Instant, String)>,
) -> BTreeSet<IpAddr> {
    let mut waiting = BTreeSet::new();
    if holding {
        deferred.clear();
        return waiting;
    }
    let now = tokio::time::Instant::now();
    deferred.retain(|ip, _| all.get(ip).is_some_and(|a| a.node == s.node) && !mine.contains_key(ip));
    let mut without_me: Option<BTreeMap<IpAddr, Announcement>> = None;
    for (ip, a) in all {
        if a.node != s.node || mine.contains_key(ip) {
            continue;
        }
        let without_me = without_me.get_or_insert_with(|| caches.elect(s, others));
        // Who announces it now: as the last pass saw it, or, when that pass knew nothing of it
        // (a restarted speaker's first passes saw no peer yet), who would without us.
        let prev = deferred.get(ip).map(|(_, p)| p).or_else(|| last_all.get(ip)).cloned();
        let Some(prev) = prev.or_else(|| without_me.get(ip).map(|w| w.node.clone())) else { continue };
        if prev == s.node || !others.contains(&prev) || without_me.get(ip).is_none_or(|w| w.node != prev) {
            deferred.remove(ip);
            continue;
        }
        let (until, _) = deferred.entry(*ip).or_insert_with(|| {
            tracing::info!(%ip, from = %prev, "planned move: waiting {MOVE_GRACE:?} for the announcer to let go");
            (now + MOVE_GRACE, prev.clone())
        });
        if *until > now {
            waiting.insert(*ip);
        } else {
            deferred.remove(ip);
        }
    }
    waiting
}

/// Which of this node's interfaces answer for `a`: those the advertisements name, else those
/// whose subnet holds the address, else the usable ones that face the LAN (`l2::links`).
fn interfaces_for(a: &Announcement, usable: &[pnet_datalink::NetworkInterface]) -> Vec<String> {
    if !a.interfaces.is_empty() {
        return usable.iter().filter(|i| a.interfaces.contains(&i.name)).map(|i| i.name.clone()).collect();
    }
    let on_subnet: Vec<String> =
        usable.iter().filter(|i| i.ips.iter().any(|n| n.contains(a.ip))).map(|i| i.name.clone()).collect();
    if on_subnet.is_empty() { crate::l2::links::fall_back(usable.iter().map(|i| i.name.as_str())) } else { on_subnet }
}

/// Runs until `shutdown`; then leaves the membership first, so peers take over at once.
pub async fn run(
    client: Client,
    cluster: &Cluster,
    s: Settings,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let sink_metrics = metrics.clone();
    let events: EventSink = Arc::new(move |e| sink_metrics.l2(e));
    let caches = Caches::start(&client, &s, cluster);
    // Until the Nodes are listed the membership believes no one (and nothing is elected).
    let (nodes_tx, nodes_rx) = tokio::sync::watch::channel(None);
    let members = membership::start(membership::Settings {
        identity: membership::Member {
            node: s.node.clone(),
            addr: SocketAddr::new(s.node_ip, s.membership_port),
            incarnation: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        },
        bind: SocketAddr::new(s.node_ip, s.membership_port),
        secret: s.secret.clone(),
        nodes: nodes_rx,
        rejected: metrics.membership_rejected.clone(),
        suspicions: metrics.membership_suspicions.clone(),
        // Straight to the data plane, not through the loop below.
        dead: s.avoid.clone(),
    })
    .await?;
    caches.ready().await?;
    let publish_nodes = |addrs: membership::NodeAddrs| {
        nodes_tx.send_if_modified(|n| {
            let changed = n.as_ref() != Some(&addrs);
            *n = Some(addrs);
            changed
        })
    };
    publish_nodes(caches.node_addrs());
    metrics.ready.store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(node = %s.node, "caches synced; announcing");

    // Join: ask every peer we know of, now and then, to let us in.
    let (join_caches, join_settings, join_cmd) = (caches.clone(), s.clone(), members.announcer());
    tokio::spawn(async move {
        loop {
            for peer in join_caches.peers(&join_settings) {
                join_cmd.announce(peer).await;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });

    // Win nothing until we are in: with a partial view this speaker would win addresses and
    // answer for them beside their announcers until the membership caught up (a restart in an
    // upgrade would move every address twice; a node back from a link flap, which saw every
    // peer die, would answer for every address). "In" is: every Ready peer is alive in our
    // view, or JOIN_WAIT has passed (a peer without a speaker, say).
    let mut link_rx = crate::link::watch(s.node_ip);
    let mut joining_since: Option<std::time::Instant> = Some(std::time::Instant::now());

    let (view_tx, view_rx) = tokio::sync::watch::channel(status::View::default());
    let status_task = tokio::spawn(status::run(
        client.clone(),
        s.namespace.clone(),
        s.node.clone(),
        s.status_owner.clone(),
        caches.services.clone(),
        view_rx,
    ));

    let mut responders: BTreeMap<String, Arc<Responder>> = BTreeMap::new();
    let mut alive_rx = members.alive.clone();
    let mut shutdown = pin!(shutdown);
    let mut mine: BTreeMap<IpAddr, Vec<String>> = BTreeMap::new();
    let mut handed: BTreeMap<IpAddr, Kept> = BTreeMap::new();
    // The last pass's view, for handovers: who announced each address, and who was alive.
    let mut last_all: BTreeMap<IpAddr, String> = BTreeMap::new();
    let mut last_alive: BTreeSet<String> = BTreeSet::new();
    // Planned moves to us that wait (see MOVE_GRACE): until when, and from whom.
    let mut deferred: BTreeMap<IpAddr, (tokio::time::Instant, String)> = BTreeMap::new();
    let nft = NftCommand::default();
    // When the change that this pass reacts to was seen; `None` on the first pass, whose
    // addresses are not a takeover.
    let mut woke: Option<std::time::Instant> = None;
    loop {
        publish_nodes(caches.node_addrs());
        let alive = alive_rx.borrow_and_update().clone();
        let link_up = *link_rx.borrow_and_update();
        if !link_up {
            // Cut off: hold everything, and rejoin once the link is back.
            joining_since = Some(std::time::Instant::now());
        }
        let expected = caches.ready_peers(&s);
        if let Some(since) = joining_since
            && link_up
            && (expected.is_subset(&alive) || since.elapsed() >= JOIN_WAIT)
        {
            if !expected.is_subset(&alive) {
                let missing: Vec<&String> = expected.difference(&alive).collect();
                tracing::warn!(
                    ?missing,
                    "these Ready nodes' speakers did not answer within {JOIN_WAIT:?}; electing without them"
                );
            }
            tracing::info!(alive = ?alive, "in the membership; electing");
            joining_since = None;
        }
        let holding = joining_since.is_some();
        let all = caches.elect(&s, &alive);
        let others: BTreeSet<String> = alive.iter().filter(|n| **n != s.node).cloned().collect();
        let waiting = planned_moves(&caches, &s, &all, &mine, &last_all, &others, holding, &mut deferred);
        // Who announces what after this pass: while we hold or wait, not us.
        let all_winners: BTreeMap<IpAddr, String> = if holding {
            caches.elect(&s, &others).into_iter().map(|(ip, a)| (ip, a.node)).collect()
        } else {
            all.iter()
                .map(|(ip, a)| (*ip, deferred.get(ip).map_or_else(|| a.node.clone(), |(_, prev)| prev.clone())))
                .collect()
        };
        let mut view = status::View { alive: alive.clone(), ..Default::default() };
        let usable = usable_interfaces();
        let mut won: BTreeMap<IpAddr, Announcement> = BTreeMap::new();
        let mut per_iface: BTreeMap<String, Announced> = BTreeMap::new();
        let mut now_mine: BTreeMap<IpAddr, Vec<String>> = BTreeMap::new();
        for (ip, a) in all {
            view.announced.extend(a.services.iter().cloned());
            if a.node != s.node || holding || waiting.contains(&ip) {
                continue;
            }
            for i in interfaces_for(&a, &usable) {
                per_iface.entry(i.clone()).or_default().insert(a.ip);
                now_mine.entry(a.ip).or_default().push(i.clone());
                for svc in &a.services {
                    view.mine.entry(svc.clone()).or_default().push(i.clone());
                }
            }
            won.insert(ip, a);
        }
        for ifaces in view.mine.values_mut() {
            ifaces.sort();
            ifaces.dedup();
        }
        view_tx.send_if_modified(|v| {
            let changed = *v != view;
            *v = view;
            changed
        });
        if now_mine != mine {
            tracing::info!(announcing = ?now_mine, "announcements changed");
            metrics.announced.clear();
            for a in won.values() {
                for svc in &a.services {
                    let label = AnnouncedLabel { service: svc.to_string(), node: s.node.clone(), ip: a.ip.to_string() };
                    metrics.announced.get_or_create(&label).set(1);
                }
            }
        }
        // Let go first: what another node now wins is no longer answered here before anything
        // slow (nft below) runs, so that two nodes never answer together for long. Clients keep
        // this node's MAC until the winner's gratuitous packets, and this node still forwards.
        let nothing = Announced::default();
        for (name, r) in &responders {
            r.keep_only(per_iface.get(name).unwrap_or(&nothing));
        }
        // Connections in flight through the node we take over from go on to it; in place
        // before the gratuitous packets move the clients.
        if let Some(tx) = &s.handovers {
            handovers(&caches, &s, &alive, &last_alive, &last_all, &now_mine, &mine, &mut handed);
            let list: Vec<Handover> = handed.values().map(|k| k.handover.clone()).collect();
            if *tx.borrow() != list {
                for f in [Family::V4, Family::V6] {
                    if let Err(e) = nft.run(&handover::render(f, &list)).await {
                        tracing::warn!(error = %e, "applying the handover chain");
                    }
                }
                tx.send_replace(list);
            }
        }
        // Open what is needed, close what is not, and tell each responder its addresses. A
        // closing responder stops answering now, even while an announcement task still holds it.
        responders.retain(|name, r| {
            let keep = per_iface.contains_key(name);
            if !keep {
                r.set(&Announced::default());
            }
            keep
        });
        for (name, want) in &per_iface {
            if !responders.contains_key(name) {
                let Some(iface) = usable.iter().find(|i| &i.name == name) else { continue };
                match Responder::start(iface, events.clone()) {
                    Ok(r) => {
                        responders.insert(name.clone(), Arc::new(r));
                    }
                    Err(e) => {
                        tracing::warn!(interface = %name, error = %e, "opening a raw socket");
                        continue;
                    }
                }
            }
            let Some(r) = responders.get(name) else { continue };
            let taken = r.set(want);
            if !taken.is_empty() {
                let r = r.clone();
                let (metrics, woke) = (metrics.clone(), woke);
                tokio::spawn(async move {
                    let mut last = Duration::ZERO;
                    for at in ANNOUNCE_SCHEDULE {
                        tokio::time::sleep(at.saturating_sub(last)).await;
                        last = *at;
                        for ip in taken.iter().filter(|ip| r.answers(**ip)) {
                            r.announce(*ip);
                        }
                        if let Some(t) = woke.filter(|_| last.is_zero()) {
                            metrics.takeover.observe(t.elapsed().as_secs_f64());
                        }
                    }
                });
            }
        }
        mine = now_mine;
        last_all = all_winners;
        last_alive = alive;

        let join_deadline = joining_since.map(|t| tokio::time::Instant::from_std(t + JOIN_WAIT));
        tokio::select! {
            _ = caches.changed.notified() => woke = Some(std::time::Instant::now()),
            r = link_rx.changed() => {
                if r.is_err() { anyhow::bail!("the link watch stopped"); }
                if *link_rx.borrow() {
                    // Back: rejoin from now (the wait counts from the return), and ask every
                    // peer to let us in again now, not at the next join round.
                    joining_since = Some(std::time::Instant::now());
                    for peer in caches.peers(&s) {
                        members.announce(peer).await;
                    }
                }
                woke = Some(std::time::Instant::now());
            }
            _ = tokio::time::sleep_until(join_deadline.unwrap_or_else(tokio::time::Instant::now)), if join_deadline.is_some() && link_up => {
                woke = None;
            }
            r = alive_rx.changed() => {
                if r.is_err() { anyhow::bail!("the membership stopped"); }
                woke = Some(std::time::Instant::now());
            }
            // A planned move's wait ends.
            _ = tokio::time::sleep_until(deferred.values().map(|(t, _)| *t).min().unwrap_or_else(tokio::time::Instant::now)), if !deferred.is_empty() => {
                woke = None;
            }
            // Handovers of a gone speaker expire without any other change.
            _ = tokio::time::sleep(Duration::from_secs(5)), if !handed.is_empty() => woke = None,
            _ = &mut shutdown => {
                tracing::info!("leaving the membership");
                members.leave().await;
                drop(responders);
                status_task.abort();
                return Ok(());
            }
        }
    }
}

//! The fleet's envelopes on one core: where agents are, which links are up, and what a core
//! does with an envelope bound for another relay (`docs/FLEET.md`, forwarding).
//!
//! ```text
//! agent's envelope, destination attached to relay R -> offer_to_fleet: the path (cached)
//!        -> onward: this relay's hop checked (fleet::transit) -> the next relay's link queue
//! ENVELOPE from a link -> onward: Deliver (the destination's home core) | Forward | Keep
//! link queue -> in flight until the next relay's LINK_ACK -> the upstream's answer
//! link down / retryable LINK_NACK / no compliant path now -> waiting -> onward again
//! ```
//!
//! **Custody moves along the path.** An agent is answered once its relay has the envelope (as
//! on a single relay). A relay in transit answers the relay before it only once the next relay
//! took the envelope, or, at the destination's relay, once its agent's queue or store did: the
//! answer for the upstream link rides with the envelope ([`Envelope`]'s `upstream`) through the
//! link queue, in flight, and the waiting list. So every envelope a relay on the path holds is
//! also held by the relay before it, back to the source's relay, and a relay that dies loses
//! nothing: the relay before it sees the link go down and sends what it held on another path
//! (the destination's relay drops what it already had: duplicate suppression by source and id).
//!
//! Bounds: each link's queue (`send_queue_envelopes`, `send_queue_bytes`) and the peer's window
//! for what is in flight; the waiting list (each core's share of `absent_bytes`); the agents
//! located (`limits.located_agents`, or an eighth of the memory budget, at most
//! [`MAX_LOCATIONS`] per core; a full table gives up the oldest entry of the relay with the
//! most, `super::presence`); the route cache.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use super::link::LinkView;
use super::msg::{ConnId, CoreMsg, Src};
use super::presence::Locations;
use super::{Now, Shard};
use crate::fleet::cache::RouteCache;
use crate::fleet::path::{AllUp, Constraints, Graph, LinkState};
use crate::fleet::snapshot::Snapshot;
use crate::fleet::transit::{self, Next, Place};
use crate::wire::{AgentId, DeliveryClass, Envelope, Frame, PresenceEntry, Reason, RelayId};

/// Memory of one agent noted to follow (its id, a control byte, the set's slack).
const FOLLOW_ENTRY_BYTES: usize = 40;
/// Agents one core knows the relay of, at most.
pub const MAX_LOCATIONS: usize = 1 << 20;
/// Envelopes waiting for a path tried again per call of `retry_waiting`.
const RETRY_BATCH: usize = 4096;
/// How far in the future a presence stamp may be (clock skew between relays); later ones are
/// ignored.
const PRESENCE_SKEW_MS: u64 = 60_000;
/// Route answers one core keeps (`fleet::cache`).
const ROUTE_CACHE: usize = 4096;

/// What a core knows of the fleet: the snapshot, the links up, where agents are, what waits.
pub(crate) struct Mesh {
    pub(crate) snap: Option<Arc<Snapshot>>,
    adj: Option<crate::fleet::path::Adjacency>,
    /// This relay's index in the snapshot.
    pub(crate) me: Option<usize>,
    pub(crate) links: HashMap<RelayId, LinkView, crate::shard::hasher::MapHasher>,
    /// Bumped whenever a link goes up or down or its latency moves (routes are cached per epoch).
    epoch: u64,
    routes: RouteCache,
    /// Agent → (its relay, stamp of that attachment), bounded.
    locations: Locations,
    /// When this core last announced its attached agents again (monotonic, microseconds).
    refreshed_us: u64,
    /// Envelopes waiting for a compliant path (already ACKed upstream), and their frame bytes.
    waiting: VecDeque<Envelope>,
    waiting_bytes: usize,
    /// Envelopes taken off `waiting` by a retry and not yet placed again: counted in the gauge
    /// meanwhile, so a scrape during a retry never sees them missing.
    retrying: usize,
    /// Agents something was kept for on this core after presence had placed them on another
    /// relay (the source's core looked before the presence came, or their session here ended
    /// after they attached elsewhere), or kept for there when a link came up: what is kept
    /// follows them on the next tick. Each was kept for since the last tick, so the bounds of
    /// what is kept bound it; emptied every tick, charged ([`FOLLOW_ENTRY_BYTES`]).
    follow: HashSet<AgentId, crate::shard::hasher::MapHasher>,
}

impl Default for Mesh {
    fn default() -> Self {
        Mesh {
            snap: None,
            adj: None,
            me: None,
            links: HashMap::default(),
            epoch: 0,
            routes: RouteCache::new(ROUTE_CACHE),
            locations: Locations::default(),
            refreshed_us: 0,
            waiting: VecDeque::new(),
            retrying: 0,
            waiting_bytes: 0,
            follow: HashSet::default(),
        }
    }
}

impl Mesh {
    /// Envelopes waiting for a path.
    pub(crate) fn waiting_len(&self) -> usize {
        self.waiting.len()
    }

    /// What the presence table takes, bytes (an entry and its share of the map's slack), and
    /// the agents noted to follow.
    pub(crate) fn locations_bytes(&self) -> usize {
        self.locations.bytes() + self.follow.capacity() * FOLLOW_ENTRY_BYTES
    }

    /// Frame bytes of the envelopes waiting for a path.
    pub(crate) fn waiting_bytes(&self) -> usize {
        self.waiting_bytes
    }

    /// The relay `agent` is attached to, if it is another relay of the fleet.
    fn remote_relay(&self, agent: &AgentId, me: RelayId) -> Option<RelayId> {
        self.locations.get(agent).filter(|r| *r != me)
    }
}

/// The links' state as the path computation sees it from this relay: its own links up (at
/// their measured latency) or down; the others' at the snapshot's figures.
struct Links<'a> {
    snap: &'a Snapshot,
    me: usize,
    up: &'a HashMap<RelayId, LinkView, crate::shard::hasher::MapHasher>,
}

impl LinkState for Links<'_> {
    fn latency_us(&self, link: usize) -> Option<u32> {
        let l = &self.snap.links[link];
        let peer = match (l.a == self.me, l.b == self.me) {
            (true, _) => l.b,
            (_, true) => l.a,
            _ => return Some(l.latency_us),
        };
        let v = self.up.get(&self.snap.relays[peer].id)?;
        Some(if v.latency_us == 0 {
            l.latency_us
        } else {
            v.latency_us
        })
    }
}

impl Shard {
    /// A link to `peer` is up (here or on another core): routes may use it, and what waited
    /// for a path tries again.
    pub(super) fn on_link_up(&mut self, peer: RelayId, view: LinkView, now: Now) {
        self.mesh.links.insert(peer, view);
        self.mesh.epoch += 1;
        self.retry_waiting(now);
        // What is kept here for agents on other relays may have a path there now.
        let me = self.cfg.relay_id;
        let away: Vec<AgentId> = self
            .held
            .agents()
            .filter(|a| self.mesh.remote_relay(a, me).is_some())
            .collect();
        self.mesh.follow.extend(away);
    }

    /// The link to `peer` went down.
    pub(super) fn on_link_down(&mut self, peer: RelayId, conn: (u16, ConnId)) {
        if self
            .mesh
            .links
            .get(&peer)
            .is_some_and(|v| (v.core, v.conn) == conn)
        {
            self.mesh.links.remove(&peer);
            self.mesh.epoch += 1;
        }
    }

    /// A link's measured latency moved.
    pub(super) fn on_link_latency(&mut self, peer: RelayId, latency_us: u32) {
        if let Some(v) = self.mesh.links.get_mut(&peer) {
            v.latency_us = latency_us;
            self.mesh.epoch += 1;
        }
    }

    /// Presence entries learned (from a link, or this relay's own attachments): recorded when
    /// newer, and the new ones flooded to this core's links other than the one they came from.
    pub(super) fn on_presence(
        &mut self,
        entries: &[PresenceEntry],
        from: Option<RelayId>,
        now: Now,
    ) -> Vec<PresenceEntry> {
        // A stamp from the future (beyond clock skew) would pin an agent to a relay for good.
        let latest = now.unix_ms + PRESENCE_SKEW_MS;
        let max = self.located_cap();
        // Only relays of the fleet: an entry naming another could never route, only take room.
        let snap = self.mesh.snap.clone();
        let fresh: Vec<PresenceEntry> = entries
            .iter()
            .filter(|e| {
                e.stamp_ms <= latest
                    && snap.as_ref().is_some_and(|s| s.index(&e.relay).is_some())
                    && self.mesh.locations.record(e, max)
            })
            .copied()
            .collect();
        if fresh.is_empty() {
            return fresh;
        }
        self.m.fleet_agents.set(self.mesh.locations.len() as f64);
        let evicted = self.mesh.locations.take_evicted();
        if evicted > 0 {
            self.m.fleet_agents_evicted.increment(evicted);
        }
        // What this core kept for an agent now attached to another relay follows it there,
        // stored envelopes too: their records are released once the next relay took them (a
        // durable one: once the destination's relay stored it), so a crash before that sends
        // them again (the destination's relay drops the duplicate). Envelopes no compliant path
        // over the links up now can carry there (within their hop limit) stay: they were ACKed,
        // and wait here for the agent, a link coming up, or their expiry.
        let me = self.cfg.relay_id;
        for e in fresh.iter().filter(|e| e.relay != me) {
            self.follow_agent(e.agent, e.relay, now);
        }
        let targets: Vec<ConnId> = self
            .mesh
            .links
            .iter()
            .filter(|(p, v)| v.core == self.id && Some(**p) != from)
            .map(|(_, v)| v.conn)
            .collect();
        for conn in targets {
            if let Some(l) = self.conns.get_mut(&conn).and_then(|c| c.link.as_mut()) {
                l.queue_presence(&fresh, max);
                self.wake_writer(conn);
            }
        }
        fresh
    }

    /// What this core kept for `agent`, now attached to `relay`, follows it there (see
    /// [`Shard::on_presence`]).
    fn follow_agent(&mut self, agent: AgentId, relay: RelayId, now: Now) {
        let Some(kept) = self.held.take(&agent) else {
            return;
        };
        // One route search per kind of envelope (most of an agent's share constraints).
        let mut known: Vec<(Constraints, u8, bool)> = Vec::new();
        let (stay, go): (Vec<Envelope>, Vec<Envelope>) = kept.into_iter().partition(|env| {
            let c = Constraints::of(env);
            let hops = env.routing.hop_limit;
            if let Some((_, _, can)) = known.iter().find(|(k, h, _)| *h == hops && *k == c) {
                return !*can;
            }
            let can = self.fleet_can_carry(&c, hops, &relay);
            if known.len() < 8 {
                known.push((c, hops, can));
            }
            !can
        });
        if !stay.is_empty() {
            self.held.keep_first(agent, stay);
        }
        for mut env in go {
            self.released.note_moved(&env);
            // It may come back (its agent moves again): not a duplicate then.
            self.dedup.forget(&env.source(), env.message_id());
            // Routed afresh from here, as if its source had sent it here (an envelope that
            // came over the fleet ended its path on this relay).
            env.routing = crate::wire::RoutingPart::origin(env.routing.hop_limit);
            self.again(env, now);
        }
    }

    /// Something was just kept on this core for `agent`: if presence places it on another
    /// relay, what is kept follows it on the next tick ([`Shard::follow_kept`]).
    pub(super) fn kept_for(&mut self, agent: &AgentId) {
        if self.mesh.remote_relay(agent, self.cfg.relay_id).is_some() {
            self.mesh.follow.insert(*agent);
        }
    }

    /// Run every tick: what was kept since the last one for agents that presence places on
    /// another relay follows them there (unless they attached here since).
    pub(super) fn follow_kept(&mut self, now: Now) {
        if self.mesh.follow.is_empty() {
            return;
        }
        let agents: Vec<AgentId> = self.mesh.follow.drain().collect();
        self.mesh.follow.shrink_to(64);
        for agent in agents {
            if self.by_agent.contains_key(&agent) {
                continue;
            }
            if let Some(relay) = self.mesh.remote_relay(&agent, self.cfg.relay_id) {
                self.follow_agent(agent, relay, now);
            }
        }
    }

    /// Agents this core's presence table holds at most (every core keeps its own copy):
    /// `limits.located_agents`, or what the cores' copies fit in an eighth of the memory
    /// budget; at most [`MAX_LOCATIONS`].
    pub(super) fn located_cap(&self) -> usize {
        let l = &self.settings.limits;
        let cores = usize::from(self.ncores.max(1));
        l.located_agents
            .unwrap_or(l.memory_budget / 8 / super::presence::ENTRY_BYTES / cores)
            .min(MAX_LOCATIONS)
    }

    /// Agents attached to this relay (on their home core, this one): every core records them
    /// and tells its links.
    pub(super) fn announce_presence(&mut self, agents: &[AgentId], now: Now) {
        if self.mesh.snap.is_none() || agents.is_empty() {
            return;
        }
        let entries: Arc<[PresenceEntry]> = agents
            .iter()
            .map(|a| PresenceEntry {
                agent: *a,
                relay: self.cfg.relay_id,
                stamp_ms: now.unix_ms,
            })
            .collect();
        self.on_presence(&entries, None, now);
        for k in (0..self.ncores).filter(|k| *k != self.id) {
            self.outbox.push(
                k,
                CoreMsg::Presence {
                    entries: entries.clone(),
                    from: None,
                },
            );
        }
    }

    /// Every [`super::presence::REFRESH_US`], the agents attached on this core are announced
    /// again (newest in every table: an entry a full table gave up comes back).
    pub(super) fn refresh_presence(&mut self, now: Now) {
        if self.mesh.snap.is_none()
            || now.mono_us.saturating_sub(self.mesh.refreshed_us) < super::presence::REFRESH_US
        {
            return;
        }
        self.mesh.refreshed_us = now.mono_us;
        let agents: Vec<AgentId> = self.by_agent.keys().copied().collect();
        self.announce_presence(&agents, now);
    }

    /// The route snapshot changed: links that no longer belong (revoked, link removed) close;
    /// what waits tries again.
    pub(super) fn mesh_applied(&mut self, snap: Arc<Snapshot>, now: Now) {
        let g = Graph::new(&snap);
        let me = snap.index(&self.cfg.relay_id);
        self.mesh.adj = Some(g.adjacency());
        self.mesh.me = me;
        self.mesh.snap = Some(snap.clone());
        self.mesh.epoch += 1;
        let stale: Vec<ConnId> = self
            .conns
            .values()
            .filter_map(|c| {
                let peer = c.link.as_ref()?.peer?;
                let revoked = |id: &RelayId| snap.revoked.contains(id);
                let keep = me.zip(snap.index(&peer)).is_some_and(|(m, p)| {
                    !revoked(&peer)
                        && !revoked(&self.cfg.relay_id)
                        && g.link_between(m, p).is_some()
                });
                (!keep).then_some(c.id)
            })
            .collect();
        for id in stale {
            tracing::info!(conn = id, "link closed: revoked or no longer in the fleet");
            self.close(id, Reason::NotAdmitted, now);
        }
        self.retry_waiting(now);
    }

    /// Offers an agent's envelope (from `src`, or already in this relay's custody) to the
    /// fleet: routed towards the relay its destination is attached to, if that is another one.
    pub(super) fn offer_to_fleet(&mut self, src: Option<Src>, env: Envelope, now: Now) -> ToFleet {
        let (Some(snap), Some(me)) = (self.mesh.snap.clone(), self.mesh.me) else {
            return ToFleet::Here(env);
        };
        // An agent attached to this relay is here, whatever presence says (a clock ahead
        // elsewhere cannot route its envelopes away).
        let remote = super::dest_agent(&env)
            .filter(|dst| self.directory.locate(dst).is_none())
            .and_then(|dst| self.mesh.remote_relay(&dst, self.cfg.relay_id))
            .and_then(|r| snap.index(&r));
        let Some(egress) = remote else {
            // Delivered or kept here: this relay must qualify for it like any relay of a path.
            let g = Graph::with(&snap, self.mesh.adjacency(&snap));
            if !g.allowed(me, &Constraints::of(&env)) {
                self.m.fleet_routed(crate::metrics::FleetOutcome::NoPath);
                return ToFleet::Done(Err(Reason::NoCompliantPath));
            }
            return ToFleet::Here(env);
        };
        let parts = {
            let g = Graph::with(&snap, self.mesh.adjacency(&snap));
            let links = Links {
                snap: &snap,
                me,
                up: &self.mesh.links,
            };
            let c = Constraints::of(&env);
            let cache = &mut self.mesh.routes;
            let route = cache.route(&g, &links, self.mesh.epoch, me, egress, &c);
            if let Ok(route) = route.as_ref() {
                transit::parts(&g, route, &env)
            } else if g.route(&AllUp(&snap), me, egress, &c).is_ok() {
                // No compliant path with the links as they are, but there is one when they are
                // all up: it waits here (this relay qualifies, or there would be no route).
                Ok(Vec::new())
            } else {
                Err(Reason::NoCompliantPath)
            }
        };
        let parts = match parts {
            Ok(p) => p,
            Err(r) => {
                self.m.fleet_routed(crate::metrics::FleetOutcome::NoPath);
                return ToFleet::Done(Err(r));
            }
        };
        if parts.is_empty() {
            return match self.wait_for_path(env, src) {
                Some(r) => ToFleet::Done(r),
                None => ToFleet::Later,
            };
        }
        let mut first = None;
        for (i, part) in parts.into_iter().enumerate() {
            let mut copy = env.clone();
            copy.routing = part;
            // The copies after the first are this relay's custody from the start.
            let r = self.onward(copy, if i == 0 { src } else { None }, now);
            if i == 0 {
                first = r;
            } else if let Some(Err(r)) = r {
                self.m.dropped(r, 1);
            }
        }
        match first {
            Some(r) => ToFleet::Done(r),
            None => ToFleet::Later,
        }
    }

    /// Sends a receipt for agent `to` towards the relay it is attached to, if that is another
    /// relay of the fleet: on the first link of the cheapest path there (no constraints; a
    /// receipt carries nothing of the envelope). Whether it went.
    pub(super) fn receipt_to_fleet(
        &mut self,
        to: AgentId,
        receipt: crate::wire::Receipt,
        hops_left: u8,
    ) -> bool {
        let (Some(snap), Some(me)) = (self.mesh.snap.clone(), self.mesh.me) else {
            return false;
        };
        let Some(egress) = self
            .mesh
            .remote_relay(&to, self.cfg.relay_id)
            .and_then(|r| snap.index(&r))
        else {
            return false;
        };
        if hops_left == 0 {
            return false;
        }
        let next = {
            let g = Graph::with(&snap, self.mesh.adjacency(&snap));
            let links = Links {
                snap: &snap,
                me,
                up: &self.mesh.links,
            };
            let cache = &mut self.mesh.routes;
            let route = cache.route(
                &g,
                &links,
                self.mesh.epoch,
                me,
                egress,
                &Constraints::default(),
            );
            route
                .as_ref()
                .as_ref()
                .ok()
                .and_then(|r| r.paths.first()?.get(1).copied())
        };
        let Some(peer) = next.map(|i| snap.relays[i].id) else {
            return false;
        };
        let Some(v) = self.mesh.links.get(&peer).copied() else {
            return false;
        };
        let receipt = crate::wire::LinkReceipt {
            to,
            receipt,
            hops_left: hops_left - 1,
        };
        if v.core == self.id {
            self.receipt_on_link(peer, receipt);
        } else {
            self.outbox
                .push(v.core, CoreMsg::LinkReceipt { peer, receipt });
        }
        true
    }

    /// Writes a receipt on this core's link to `peer` (dropped, counted, when the link is
    /// gone or owes too much output already).
    pub(super) fn receipt_on_link(&mut self, peer: RelayId, r: crate::wire::LinkReceipt) {
        let conn = self
            .mesh
            .links
            .get(&peer)
            .filter(|v| v.core == self.id)
            .map(|v| v.conn);
        let c = conn
            .and_then(|c| self.conns.get_mut(&c))
            .filter(|c| !c.closing && c.a.ctrl.len() < super::conn::CONTROL_OUTPUT_MAX);
        let Some(c) = c else {
            self.m.receipts_dropped.increment(1);
            return;
        };
        Frame::LinkReceipt(r).encode(&mut c.a.ctrl);
        let id = c.id;
        self.wake_writer(id);
    }

    /// Whether a compliant path over the links up now, within `hop_limit` hops, leads from here
    /// to `relay` for envelopes asking `c`.
    fn fleet_can_carry(&mut self, c: &Constraints, hop_limit: u8, relay: &RelayId) -> bool {
        let (Some(snap), Some(me)) = (self.mesh.snap.clone(), self.mesh.me) else {
            return false;
        };
        let Some(egress) = snap.index(relay) else {
            return false;
        };
        let g = Graph::with(&snap, self.mesh.adjacency(&snap));
        let links = Links {
            snap: &snap,
            me,
            up: &self.mesh.links,
        };
        g.route(&links, me, egress, c).is_ok_and(|r| {
            r.paths
                .iter()
                .any(|p| p.len() - 1 <= usize::from(hop_limit))
        })
    }

    /// The transit decision for an envelope whose routing part names this relay at its hop.
    fn transit_here(&mut self, env: &Envelope, now: Now) -> Result<Next, Reason> {
        let (Some(snap), Some(me)) = (self.mesh.snap.clone(), self.mesh.me) else {
            return Err(Reason::InvalidRouting);
        };
        let g = Graph::with(&snap, self.mesh.adjacency(&snap));
        let links = Links {
            snap: &snap,
            me,
            up: &self.mesh.links,
        };
        transit::transit(
            &Place {
                graph: &g,
                links: &links,
                me,
            },
            env,
            now.unix_ms,
        )
    }

    /// Takes an envelope at this relay's hop onwards: delivered here, sent to the next relay,
    /// re-routed, or kept. `None`: `src` is answered later (by another core, or when the next
    /// relay took it); `Some`: the caller answers `src` with it now (or, without a source,
    /// counts a refusal).
    pub(super) fn onward(
        &mut self,
        mut env: Envelope,
        src: Option<Src>,
        now: Now,
    ) -> Option<Result<bool, Reason>> {
        match self.transit_here(&env, now) {
            Err(r) => Some(Err(r)),
            Ok(Next::Deliver) => {
                self.m.fleet_routed(crate::metrics::FleetOutcome::Delivered);
                let home = super::dest_agent(&env)
                    .map_or(self.id, |a| crate::routing::home_core(&a, self.ncores));
                if home == self.id {
                    let answered = src.is_some();
                    self.on_deliver(env, src, now);
                    (!answered).then_some(Ok(false))
                } else {
                    self.outbox.push(home, CoreMsg::Deliver { env, src });
                    self.handed_off += 1;
                    src.is_none().then_some(Ok(false))
                }
            }
            Ok(Next::Forward { routing, .. }) => {
                env.routing = routing;
                self.forward_on(env, src)
            }
            Ok(Next::Keep) => self.wait_for_path(env, src),
        }
    }

    /// Sends an envelope whose routing part names the next relay to that relay's link: queued
    /// on this core, or handed to the link's core.
    fn forward_on(&mut self, mut env: Envelope, src: Option<Src>) -> Option<Result<bool, Reason>> {
        let next = env.routing.relays().nth(usize::from(env.routing.hop_index));
        let Some(peer) = next else {
            return Some(Err(Reason::InvalidRouting));
        };
        match self.mesh.links.get(&peer).copied() {
            Some(v) if v.core == self.id => self.enqueue_link(v.conn, env, src),
            Some(v) => {
                self.outbox
                    .push(v.core, CoreMsg::Forward { env, peer, src });
                self.handed_off += 1;
                src.is_none().then_some(Ok(false))
            }
            None => {
                // Went down since the decision: it waits for the next one.
                back_here(&mut env);
                self.wait_for_path(env, src)
            }
        }
    }

    /// Puts an envelope on a link's queue (on the link's core), within the link's bounds. A
    /// relay source's answer rides with it until the next relay's LINK_ACK, and so does an
    /// agent's for a durable envelope (answered once the destination's relay stored it); an
    /// agent is otherwise answered now, told to pause past half the bounds (`Ok(true)`: its
    /// reader waits until the queue is below a quarter, as for a congested agent), and refused
    /// `queue_full` at them. Relays in transit are held back by their link windows instead and
    /// may fill the queue to four times the bounds; custody that has nowhere to go waits.
    fn enqueue_link(
        &mut self,
        conn: ConnId,
        mut env: Envelope,
        src: Option<Src>,
    ) -> Option<Result<bool, Reason>> {
        let l = &self.settings.limits;
        let (mut max_n, mut max_b) = (l.send_queue_envelopes, l.send_queue_bytes());
        let deferred = deferred(src, &env);
        let agent_src = src.filter(|s| !s.relay);
        if agent_src.is_none() {
            (max_n, max_b) = (max_n * 4, max_b * 4);
        }
        env.upstream = deferred.map(Box::new);
        let (source, len) = (env.source(), env.frame_len());
        let too_large = self
            .conns
            .get(&conn)
            .and_then(|c| c.link.as_ref())
            .is_some_and(|l| len > l.peer_max_frame);
        if too_large {
            // The next relay would refuse the frame and end the link: never sent.
            return Some(Err(Reason::TooLargeForDestination));
        }
        let pushed = match self.conns.get_mut(&conn).filter(|c| !c.closing) {
            Some(c) => c.a.outq.push(env, max_n, max_b).inspect(|congested| {
                if let Some(m) = c.link.as_ref().and_then(|l| l.m.as_ref()) {
                    m.sent.increment(1);
                }
                // Remembered so that the agent resumes when this queue drains.
                let paced = &mut c.a.paced_sources;
                if let (true, Some(a)) = (*congested, agent_src) {
                    let who = (a.core, a.conn);
                    if paced.len() < super::conn::PACED_SOURCES_MAX && !paced.contains(&who) {
                        paced.push(who);
                    }
                }
            }),
            None => Err((Reason::QueueFull, env)),
        };
        match pushed {
            Ok(congested) => {
                self.sources.hold(source, len);
                self.charge(len as u64);
                self.m.fleet_routed(crate::metrics::FleetOutcome::Forwarded);
                self.wake_writer(conn);
                deferred
                    .is_none()
                    .then_some(Ok(congested && agent_src.is_some()))
            }
            Err((r, _)) if agent_src.is_some() => Some(Err(r)),
            Err((_, mut env)) => {
                env.upstream = None;
                back_here(&mut env);
                self.wait_for_path(env, src)
            }
        }
    }

    /// An envelope another core handed over for the link to `peer` on this one.
    pub(super) fn on_forward(&mut self, env: Envelope, peer: RelayId, src: Option<Src>, now: Now) {
        let class = env.class();
        let r = match self.mesh.links.get(&peer).copied() {
            Some(v) if v.core == self.id => self.enqueue_link(v.conn, env, src),
            // The link went down or moved since: taken onwards again from here.
            _ => {
                let mut env = env;
                back_here(&mut env);
                self.onward(env, src, now)
            }
        };
        self.answer(src, class, r, now);
    }

    /// Answers `src` with `r` when there is one to answer now; without a source, a refusal is
    /// counted.
    fn answer(
        &mut self,
        src: Option<Src>,
        class: DeliveryClass,
        r: Option<Result<bool, Reason>>,
        now: Now,
    ) {
        match (r, src) {
            (Some(r), Some(src)) => self.verdict_to(src, class, r, now),
            (Some(Err(r)), None) => self.m.dropped(r, 1),
            _ => {}
        }
    }

    /// Keeps an envelope (in this relay's form: its routing part at this relay's hop, or not
    /// routed yet) until a compliant path exists. A relay source waits for its answer with it;
    /// an agent is answered now. Full: `queue_full`.
    fn wait_for_path(
        &mut self,
        mut env: Envelope,
        src: Option<Src>,
    ) -> Option<Result<bool, Reason>> {
        let cap = self.settings.limits.absent_bytes() / self.ncores.max(1) as usize;
        let len = env.frame_len() + super::custody::HELD_ENVELOPE_OVERHEAD;
        // New work is refused at the cap; custody this relay already answered for (from a link
        // that went down, a refusal to retry) may take twice the cap, beyond which it is dropped
        // and counted (`queue_full`): memory stays bounded when the next relay keeps refusing.
        let cap = if src.is_some() { cap } else { 2 * cap };
        if self.mesh.waiting_bytes + len > cap {
            return Some(Err(Reason::QueueFull));
        }
        let deferred = deferred(src, &env);
        if deferred.is_some() {
            env.upstream = deferred.map(Box::new);
        }
        self.mesh.waiting_bytes += len;
        self.mesh.waiting.push_back(env);
        self.m.fleet_routed(crate::metrics::FleetOutcome::Kept);
        self.m
            .fleet_waiting
            .set((self.mesh.waiting.len() + self.mesh.retrying) as f64);
        deferred.is_none().then_some(Ok(false))
    }

    /// What waits for a path tries again (a link came up, the snapshot changed, a tick).
    pub(super) fn retry_waiting(&mut self, now: Now) {
        if self.mesh.waiting.is_empty() {
            return;
        }
        // At most a batch per call, oldest first: a long list costs a bounded time per tick.
        let n = self.mesh.waiting.len().min(RETRY_BATCH);
        let batch: Vec<Envelope> = self.mesh.waiting.drain(..n).collect();
        for env in &batch {
            self.mesh.waiting_bytes = self
                .mesh
                .waiting_bytes
                .saturating_sub(env.frame_len() + super::custody::HELD_ENVELOPE_OVERHEAD);
        }
        self.mesh.retrying = batch.len();
        for env in batch {
            self.mesh.retrying -= 1;
            self.again(env, now);
        }
        self.m.fleet_waiting.set(self.mesh.waiting.len() as f64);
    }

    /// Takes an envelope in this relay's custody onwards again from here (its upstream, if it
    /// has one, still waits for the answer).
    pub(super) fn again(&mut self, mut env: Envelope, now: Now) {
        let src = env.upstream.take().map(|s| *s);
        let class = env.class();
        let stored = env.store_seq();
        if env.expires_ms() <= now.unix_ms {
            self.released
                .receipt(&env, crate::wire::ReceiptStatus::Expired);
            let r = Some(Err(Reason::Expired));
            self.dropped_own(stored, src, &r);
            return self.answer(src, class, r, now);
        }
        let r = if env.routing.path.is_empty() {
            match self.offer_to_fleet(src, env, now) {
                ToFleet::Here(env) => {
                    // Its destination is here now, or nowhere known: its home core keeps it.
                    let home = super::dest_agent(&env)
                        .map_or(self.id, |a| crate::routing::home_core(&a, self.ncores));
                    self.outbox.push(home, CoreMsg::Deliver { env, src });
                    None
                }
                ToFleet::Done(r) => Some(r),
                ToFleet::Later => None,
            }
        } else {
            self.onward(env, src, now)
        };
        self.dropped_own(stored, src, &r);
        self.answer(src, class, r, now);
    }

    /// An envelope of this relay's own custody (no upstream waits on it) that was just dropped
    /// (`r` an error): if it was stored (it moved here from a store after its agent turned up
    /// on another relay), its record is released, on the core whose log holds it.
    fn dropped_own(&mut self, stored: u64, src: Option<Src>, r: &Option<Result<bool, Reason>>) {
        if stored != 0 && src.is_none() && matches!(r, Some(Err(_))) {
            self.released.1.push(stored);
        }
    }

    /// The next relay answered an envelope this relay sent it: taken (`None`) or refused. The
    /// upstream it rode with hears the same, except that a retryable refusal waits here and
    /// goes again.
    pub(super) fn link_answered(&mut self, mut env: Envelope, refused: Option<Reason>, now: Now) {
        let src = env.upstream.take().map(|s| *s);
        let class = env.class();
        let stored = env.store_seq();
        match refused {
            None => self.answer(src, class, Some(Ok(false)), now),
            Some(r) if r.retryable() && env.expires_ms() > now.unix_ms => {
                back_here(&mut env);
                let w = self.wait_for_path(env, src);
                self.dropped_own(stored, src, &w);
                self.answer(src, class, w, now);
            }
            Some(r) => {
                tracing::debug!(msg = %env.message_id(), reason = r.label(), "envelope refused by the next relay");
                let r = Some(Err(r));
                self.dropped_own(stored, src, &r);
                self.answer(src, class, r, now);
            }
        }
    }

    /// An ENVELOPE that arrived on link `conn` as its `seq`-th: answered by that number once
    /// this relay took custody and, in transit, the next relay did (or refused it).
    pub(super) fn arrived_on_link(&mut self, conn: ConnId, seq: u64, env: Envelope, now: Now) {
        let src = Src {
            core: self.id,
            conn,
            tag: crate::wire::MessageId::from_u128(u128::from(seq)),
            relay: true,
            len: env.frame_len() as u32,
            hold: false,
        };
        let class = env.class();
        if let Some(c) = self.conns.get_mut(&conn) {
            // Every answer comes back through `verdict_to`, which counts it off.
            c.a.awaiting += 1;
            c.a.awaiting_bytes += src.len as usize;
            if let Some(m) = c.link.as_ref().and_then(|l| l.m.as_ref()) {
                m.received.increment(1);
            }
        }
        // A draining relay takes nothing more from the fleet (what it took for its agents
        // would be lost when it exits): the relay before keeps it and tries again.
        let r = if self.draining {
            Some(Err(Reason::ShuttingDown))
        } else {
            self.onward(env, Some(src), now)
        };
        if let Some(r) = r {
            self.verdict_to(src, class, r, now);
        }
    }

    /// What a link that went down held (queued, in flight; in send order): taken onwards again
    /// from here, each with the upstream it waits to answer.
    pub(super) fn link_lost(&mut self, custody: Vec<Envelope>, now: Now) {
        for mut env in custody {
            back_here(&mut env);
            self.again(env, now);
        }
    }
}

impl Mesh {
    /// One line for test failure reports.
    pub(super) fn describe(&self) -> String {
        format!(
            "waiting {}, links up {}, agents located {}",
            self.waiting.len(),
            self.links.len(),
            self.locations.len()
        )
    }

    /// Where every agent this core knows of is, for a link that just came up.
    pub(super) fn known(&self) -> Vec<PresenceEntry> {
        self.locations.entries().collect()
    }

    /// The snapshot's adjacency, built once per snapshot.
    pub(super) fn adjacency(&mut self, snap: &Snapshot) -> crate::fleet::path::Adjacency {
        match &self.adj {
            Some(a) => a.clone(),
            None => {
                let a = Graph::new(snap).adjacency();
                self.adj = Some(a.clone());
                a
            }
        }
    }
}

/// What became of an agent's envelope offered to the fleet.
pub(super) enum ToFleet {
    /// Its destination is not attached to another relay: it is routed on this one.
    Here(Envelope),
    /// Answered now.
    Done(Result<bool, Reason>),
    /// Answered later (another core, or once the next relay took it).
    Later,
}

/// The source whose answer waits until the next relay took the envelope: a relay's (custody
/// moves along the path), or an agent's durable envelope (ACKed once the destination's relay
/// has it on disk, every relay before holding it until then).
fn deferred(src: Option<Src>, env: &Envelope) -> Option<Src> {
    src.filter(|s| s.relay || env.class() == DeliveryClass::Durable)
}

/// Turns an envelope sent (or about to be sent) to the next relay back to this relay's hop.
pub(super) fn back_here(env: &mut Envelope) {
    if env.routing.hop_index > 0 {
        env.routing.hop_index -= 1;
        env.routing.hop_limit = env.routing.hop_limit.saturating_add(1);
    }
}

//! The relay-link role: a TLS connection to another relay of the fleet (`docs/PROTOCOL.md` §5,
//! `docs/FLEET.md`), and what the fleet's envelopes do on this core.
//!
//! A link is opened by the relay with the lower id (the dialler, [`Shard::open_dialled`]) and
//! accepted on the other's link port ([`Shard::open_link`]); after TLS (fleet CA, relay role
//! marker; the peer's relay id is its certificate's key) both ends send LINK_HELLO at once. A
//! link lives on one core of each relay ([`link_core`]); one accepted elsewhere moves there like
//! an agent's session. Every core learns which links are up (`LinkUp`, `LinkDown`) and where
//! agents are (PRESENCE, flooded over the links): that is all it needs to choose paths.
//!
//! ```text
//! agent's envelope, destination on relay R   -> path (fleet::transit::ingress, cached) -> link
//! ENVELOPE on a link (numbered from 0)       -> fleet::transit::transit:
//!        Deliver -> as an agent's envelope on this relay; its verdict is LINK_ACK or LINK_NACK
//!        Forward -> the next relay's link (its core's queue); LINK_ACK once queued
//!        Keep    -> waiting here until a compliant path exists; LINK_ACK
//! link queue -> writer -> in flight until the next relay's LINK_ACK (by link sequence number);
//!        a retryable LINK_NACK waits and goes again, another is dropped, counted
//! link down  -> what it held (queued, in flight) is routed again from here, or waits
//! ```
//!
//! Custody is hop by hop: a relay forgets an envelope when the next relay ACKed it (it ACKs
//! once it queued or kept it, or, for the destination's relay, once its agent's queue or store
//! took it). Bounds: each link's queue (`send_queue_envelopes`, `send_queue_bytes`), the peer's
//! window for what is in flight, the waiting list (the core's share of `absent_bytes`), the
//! agents located (`MAX_LOCATIONS` per core).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::budget::CONNECTION_OVERHEAD;
use super::conn::AgentSession;
use super::msg::{ConnId, CoreMsg, Src};
use super::transport::{Transport, TransportError};
use super::{Action, Conn, Now, ReadGate, Shard};
use crate::fleet::cache::RouteCache;
use crate::fleet::path::{AllUp, Constraints, Graph, LinkState};
use crate::fleet::snapshot::Snapshot;
use crate::fleet::transit::{self, Next, Place};
use crate::pki::ed25519_key_of;
use crate::session::Session;
use crate::wire::{
    AgentId, DeliveryClass, Envelope, Frame, LinkAck, LinkHello, LinkNack, MessageId, Ping, Pong,
    Presence, PresenceEntry, Reason, RelayId, Role, MAX_LINK_ACK_BATCH, MAX_PRESENCE_BATCH,
    PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN,
};

/// How often a relay PINGs each link.
pub const LINK_HEARTBEAT_MS: u32 = 250;
/// A link that heard nothing for this long is closed as dead (four heartbeats).
pub const LINK_DEAD_US: u64 = 1_000_000;
/// Envelopes a relay accepts on one link before it answered them.
pub const LINK_WINDOW: u32 = 8192;
/// Frame bytes of such envelopes.
pub const LINK_WINDOW_BYTES: u32 = 64 << 20;
/// Agents one core knows the relay of; beyond it new ones are not recorded (counted).
pub const MAX_LOCATIONS: usize = 1 << 20;
/// Route answers one core keeps (`fleet::cache`).
const ROUTE_CACHE: usize = 4096;
/// A measured RTT moves the link's latency in the path computation when it changes by more
/// than this share (a new link epoch empties the route cache).
const RTT_EPOCH_SHARE: u64 = 4;

/// The core of a relay that owns its link to `peer`: a fixed function of the peer's id, so both
/// the dialler and the listener agree without asking.
pub fn link_core(peer: &RelayId, cores: u16) -> u16 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&peer.0[24..32]);
    (u64::from_be_bytes(b) % u64::from(cores.max(1))) as u16
}

/// TLS for relay links: the listener's and the dialler's configurations (fleet CA, relay role).
#[derive(Clone)]
pub struct LinkTls {
    pub server: Arc<rustls::ServerConfig>,
    pub client: Arc<rustls::ClientConfig>,
}

/// The link's state beside the transport (the agent role's queue and in-flight custody are
/// reused for what goes out on it).
pub(crate) struct LinkSession {
    /// The other relay: the relay dialled, or the key of the certificate it presented.
    pub(crate) peer: Option<RelayId>,
    /// This relay dialled the link.
    pub(crate) dialled: bool,
    /// Both LINK_HELLOs went: envelopes flow.
    pub(crate) up: bool,
    pub(crate) hello_sent: bool,
    pub(crate) opened_us: u64,
    /// The peer's window (envelopes, bytes) for what this relay has in flight to it.
    pub(crate) window: (usize, usize),
    /// Sequence number of the next ENVELOPE the peer sends.
    pub(crate) rx_seq: u64,
    /// Link sequence numbers to ACK.
    pub(crate) acks: Vec<u64>,
    pub(crate) last_rx_us: u64,
    pub(crate) last_ping_us: u64,
    /// Smoothed RTT, microseconds.
    pub(crate) rtt_us: Option<u64>,
    /// RTT last announced to the cores.
    pub(crate) rtt_announced_us: u64,
    pub(crate) pings: u64,
    pub(crate) pongs: u64,
    pub(crate) m: Option<crate::metrics::LinkMetrics>,
}

/// A link that is up, as every core knows it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LinkView {
    pub(crate) core: u16,
    pub(crate) conn: ConnId,
    /// One-way latency from the measured RTT, microseconds (0: not measured yet).
    pub(crate) latency_us: u32,
}

/// What a core knows of the fleet: the snapshot, the links up, where agents are, what waits.
#[derive(Default)]
pub(crate) struct Mesh {
    pub(crate) snap: Option<Arc<Snapshot>>,
    adj: Option<crate::fleet::path::Adjacency>,
    /// This relay's index in the snapshot.
    pub(crate) me: Option<usize>,
    pub(crate) links: HashMap<RelayId, LinkView>,
    /// Bumped whenever a link goes up or down or its latency moves (routes are cached per epoch).
    epoch: u64,
    routes: Option<RouteCache>,
    /// Agent → (its relay, stamp of that attachment).
    locations: HashMap<AgentId, (RelayId, u64), crate::shard::hasher::MapHasher>,
    /// Envelopes waiting for a compliant path (already ACKed upstream), and their frame bytes.
    waiting: VecDeque<Envelope>,
    waiting_bytes: usize,
}

impl Mesh {
    /// Frame bytes of the envelopes waiting for a path.
    pub(crate) fn waiting_bytes(&self) -> usize {
        self.waiting_bytes
    }

    /// The relay `agent` is attached to, if it is another relay of the fleet.
    fn remote_relay(&self, agent: &AgentId, me: RelayId) -> Option<RelayId> {
        self.locations
            .get(agent)
            .map(|(r, _)| *r)
            .filter(|r| *r != me)
    }

    /// Records a presence entry if it is newer than what is known; returns whether it was.
    fn locate(&mut self, e: &PresenceEntry) -> bool {
        match self.locations.get(&e.agent) {
            Some((r, s)) if (*s, r.0) >= (e.stamp_ms, e.relay.0) => false,
            None if self.locations.len() >= MAX_LOCATIONS => false,
            _ => {
                self.locations.insert(e.agent, (e.relay, e.stamp_ms));
                true
            }
        }
    }
}

/// The links' state as the path computation sees it from this relay: its own links up (at
/// their measured latency) or down; the others' at the snapshot's figures.
struct Links<'a> {
    snap: &'a Snapshot,
    me: usize,
    up: &'a HashMap<RelayId, LinkView>,
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

impl LinkSession {
    fn new(peer: Option<RelayId>, dialled: bool, now: Now) -> Self {
        LinkSession {
            peer,
            dialled,
            up: false,
            hello_sent: false,
            opened_us: now.mono_us,
            window: (0, 0),
            rx_seq: 0,
            acks: Vec::new(),
            last_rx_us: now.mono_us,
            last_ping_us: now.mono_us,
            rtt_us: None,
            rtt_announced_us: 0,
            pings: 0,
            pongs: 0,
            m: None,
        }
    }
}

fn link_conn(id: ConnId, transport: Transport, link: LinkSession, now: Now) -> Conn {
    Conn {
        id,
        transport,
        session: Session::new(now.mono_us, crate::session::SessionTimeouts::default()),
        role: Role::RelayLink,
        a: AgentSession::new(now),
        link: Some(Box::new(link)),
        closing: false,
        closing_since_us: 0,
        close_notify_sent: false,
        write_since_us: 0,
        writing: false,
        reader_parked: false,
        key_update_due: false,
        writer_awake: false,
        moving_to: None,
    }
}

impl Shard {
    /// A connection was accepted on the link port. `None`: refused (no fleet, no link TLS, or
    /// draining); the engine closes the socket.
    pub fn open_link(&mut self, now: Now) -> Option<ConnId> {
        let tls = self.cfg.link.as_ref()?.server.clone();
        if self.draining || self.mesh.me.is_none() {
            return None;
        }
        let transport = Transport::new(
            tls,
            self.settings.contract.max_frame as usize,
            self.settings.limits.read_buffer,
        )
        .ok()?;
        Some(self.insert_link(transport, LinkSession::new(None, false, now), now))
    }

    /// The engine connected a socket to `peer`'s link port (off the cores, with a timeout):
    /// the TLS client handshake starts here. `None`: refused (no link TLS, draining).
    pub fn open_dialled(&mut self, peer: RelayId, now: Now) -> Option<ConnId> {
        let tls = self.cfg.link.as_ref()?.client.clone();
        if self.draining {
            return None;
        }
        let name = rustls::pki_types::ServerName::try_from(crate::pki::relay_link_name(&peer))
            .ok()?
            .to_owned();
        let transport = match Transport::client(
            tls,
            name,
            self.settings.contract.max_frame as usize,
            self.settings.limits.read_buffer,
        ) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "cannot start a link handshake");
                return None;
            }
        };
        let id = self.insert_link(transport, LinkSession::new(Some(peer), true, now), now);
        // The ClientHello is ready.
        self.actions.push_back(Action::WakeWriter(id));
        Some(id)
    }

    fn insert_link(&mut self, transport: Transport, link: LinkSession, now: Now) -> ConnId {
        self.charge(CONNECTION_OVERHEAD);
        let id = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(id, link_conn(id, transport, link, now));
        id
    }

    /// Runs the handshake and the frames of a link on what it read.
    pub(super) fn process_link_input(&mut self, conn: ConnId, now: Now) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if !c.transport.is_open() {
            match c.transport.advance_handshake() {
                Err(e) => {
                    tracing::info!(conn, error = %e, "link TLS failure");
                    self.m.handshake_failed(Reason::NotAdmitted);
                    c.closing = true;
                    c.closing_since_us = now.mono_us;
                    self.actions.push_back(Action::Shutdown(conn));
                    return;
                }
                Ok(open) => {
                    if c.transport.has_handshake_output() {
                        self.actions.push_back(Action::WakeWriter(conn));
                    }
                    if !open {
                        return;
                    }
                    if let Err(r) = self.link_opened(conn) {
                        self.close(conn, r, now);
                        return;
                    }
                }
            }
        }
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.moving_to.is_some() {
            return;
        }
        let mut accepted: Vec<(u64, Envelope)> = Vec::new();
        let mut close: Option<Reason> = None;
        let mut hello: Option<LinkHello> = None;
        let mut presence: Option<Presence> = None;
        let mut nacked: Vec<(Envelope, Reason)> = Vec::new();
        let mut wake = false;
        let Some(l) = c.link.as_mut() else {
            return;
        };
        loop {
            let frame = match c.transport.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(TransportError::Wire(e)) => {
                    tracing::info!(conn, error = %e, "undecodable frame on a link");
                    close = Some(Reason::from(&e));
                    break;
                }
                Err(TransportError::Tls(e)) => {
                    tracing::info!(conn, error = %e, "link TLS failure");
                    close = Some(Reason::ProtocolError);
                    break;
                }
            };
            l.last_rx_us = now.mono_us;
            match frame {
                Frame::LinkHello(h) if !l.up => {
                    hello = Some(h);
                    break;
                }
                Frame::Envelope(env) if l.up => {
                    let seq = l.rx_seq;
                    l.rx_seq += 1;
                    accepted.push((seq, env));
                }
                Frame::LinkAck(a) if l.up => {
                    let was_full = !c.a.inflight.has_room(l.window.0, l.window.1, 0);
                    let mut n = 0;
                    for seq in a.seqs() {
                        if c.a.inflight.settle_seq(seq, None, &mut self.released) {
                            n += 1;
                        }
                    }
                    if let Some(m) = &l.m {
                        m.acked.increment(n);
                    }
                    c.a.last_ack_us = now.mono_us;
                    wake |= was_full && !c.a.outq.is_empty();
                }
                Frame::LinkNack(n) if l.up => {
                    let mut taken = None;
                    c.a.inflight
                        .settle_seq(n.seq, Some(&mut taken), &mut self.released);
                    if let Some(env) = taken {
                        if let Some(m) = &l.m {
                            m.refused.increment(1);
                        }
                        nacked.push((env, n.reason().unwrap_or(Reason::ProtocolError)));
                    }
                    wake |= !c.a.outq.is_empty();
                }
                Frame::Presence(p) if l.up => {
                    presence = Some(p);
                    break;
                }
                Frame::Ping(p) => {
                    Frame::Pong(Pong {
                        echo_us: p.timestamp_us,
                        responder_us: now.mono_us,
                    })
                    .encode(&mut c.a.ctrl);
                    wake = true;
                }
                Frame::Pong(p) => {
                    if let Some(rtt) = now.mono_us.checked_sub(p.echo_us) {
                        l.pongs += 1;
                        l.rtt_us = Some(match l.rtt_us {
                            None => rtt,
                            Some(s) => (s * 7 + rtt) / 8,
                        });
                        if let Some(m) = &l.m {
                            m.rtt.set(rtt as f64 / 1e6);
                        }
                    }
                }
                Frame::Close(_) => {
                    close = Some(Reason::Normal);
                    break;
                }
                _ => {
                    close = Some(Reason::UnexpectedFrame);
                    break;
                }
            }
        }
        if c.transport.peer_closed && close.is_none() && !c.closing {
            close = Some(Reason::Normal);
        }
        if wake {
            self.wake_writer(conn);
        }
        for (env, r) in nacked {
            self.link_refused(env, r, now);
        }
        for (seq, env) in accepted {
            self.arrived_on_link(conn, seq, env, now);
        }
        if let Some(r) = close {
            self.close(conn, r, now);
            return;
        }
        let more = hello.is_some() || presence.is_some();
        if let Some(h) = hello {
            if let Err(r) = self.link_hello(conn, h, now) {
                self.close(conn, r, now);
                return;
            }
        }
        if let Some(p) = presence {
            let from = self
                .conns
                .get(&conn)
                .and_then(|c| c.link.as_ref())
                .and_then(|l| l.peer);
            self.on_presence(&p.entries, from, now);
            for k in (0..self.ncores).filter(|k| *k != self.id) {
                self.outbox.push(
                    k,
                    CoreMsg::Presence {
                        entries: Arc::from(p.entries.as_slice()),
                        from,
                    },
                );
            }
        }
        // Frames behind a HELLO or a PRESENCE that ended the loop.
        if more && self.conns.get(&conn).is_some_and(|c| !c.closing) {
            self.process_link_input(conn, now);
        }
    }

    /// TLS is up: the peer is the relay of its certificate, which must be a relay of the fleet
    /// with a link to this one (and the relay dialled, for a dialled link). Sends LINK_HELLO, or
    /// moves the link to its core first.
    fn link_opened(&mut self, conn: ConnId) -> Result<(), Reason> {
        let (Some(snap), Some(me)) = (self.mesh.snap.clone(), self.mesh.me) else {
            return Err(Reason::NotAdmitted);
        };
        let Some(c) = self.conns.get_mut(&conn) else {
            return Err(Reason::Normal);
        };
        let key = match c.transport.peer_certificates.first().map(ed25519_key_of) {
            Some(Ok(k)) => RelayId(k),
            _ => return Err(Reason::NotAdmitted),
        };
        let Some(l) = c.link.as_mut() else {
            return Err(Reason::ProtocolError);
        };
        if l.dialled && l.peer != Some(key) {
            return Err(Reason::NotAdmitted);
        }
        let Some(peer) = snap.index(&key) else {
            tracing::info!(peer = %key.to_hex(), "link refused: not a relay of the fleet");
            return Err(Reason::NotAdmitted);
        };
        if snap.revoked.contains(&key)
            || Graph::with(&snap, self.mesh.adjacency(&snap))
                .link_between(me, peer)
                .is_none()
        {
            tracing::info!(peer = %snap.relays[peer].name, "link refused: revoked, or no such link in the fleet");
            return Err(Reason::NotAdmitted);
        }
        l.peer = Some(key);
        let home = link_core(&key, self.ncores);
        if home != self.id {
            c.moving_to = Some(home);
            return Ok(());
        }
        self.send_link_hello(conn);
        Ok(())
    }

    pub(super) fn send_link_hello(&mut self, conn: ConnId) {
        let generation = self.fleet_generation();
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let Some(l) = c.link.as_mut() else {
            return;
        };
        if l.hello_sent {
            return;
        }
        l.hello_sent = true;
        Frame::LinkHello(LinkHello {
            min_version: PROTOCOL_VERSION_MIN,
            max_version: PROTOCOL_VERSION_MAX,
            relay_id: self.cfg.relay_id,
            generation,
            heartbeat_ms: LINK_HEARTBEAT_MS,
            max_frame: self.settings.contract.max_frame,
            window: LINK_WINDOW,
            window_bytes: LINK_WINDOW_BYTES,
        })
        .encode(&mut c.a.ctrl);
        self.wake_writer(conn);
    }

    /// The peer's LINK_HELLO: the link is up.
    fn link_hello(&mut self, conn: ConnId, h: LinkHello, now: Now) -> Result<(), Reason> {
        self.send_link_hello(conn);
        let names = self.mesh.snap.clone();
        let Some(c) = self.conns.get_mut(&conn) else {
            return Err(Reason::Normal);
        };
        let Some(l) = c.link.as_mut() else {
            return Err(Reason::ProtocolError);
        };
        if Some(h.relay_id) != l.peer {
            return Err(Reason::NotAdmitted);
        }
        if h.max_version < PROTOCOL_VERSION_MIN || h.min_version > PROTOCOL_VERSION_MAX {
            return Err(Reason::NoCommonVersion);
        }
        l.up = true;
        l.window = (h.window as usize, h.window_bytes as usize);
        c.transport
            .set_max_frame(self.settings.contract.max_frame as usize);
        let name = names
            .as_ref()
            .and_then(|s| s.index(&h.relay_id).map(|i| s.relays[i].name.clone()))
            .unwrap_or_else(|| h.relay_id.to_hex()[..16].to_string());
        let m = crate::metrics::LinkMetrics::new(&name);
        m.up.set(1.0);
        l.m = Some(m);
        tracing::info!(peer = %name, generation = h.generation, dialled = l.dialled, "link up");
        let view = LinkView {
            core: self.id,
            conn,
            latency_us: 0,
        };
        let peer = h.relay_id;
        self.actions.push_back(Action::LinkState(peer, true));
        self.on_link_up(peer, view, now);
        for k in (0..self.ncores).filter(|k| *k != self.id) {
            self.outbox.push(
                k,
                CoreMsg::LinkUp {
                    peer,
                    core: self.id,
                    conn,
                    latency_us: 0,
                },
            );
        }
        // Everything this core knows of where agents are, so the peer can route to them.
        let known: Vec<PresenceEntry> = self
            .mesh
            .locations
            .iter()
            .map(|(a, (r, s))| PresenceEntry {
                agent: *a,
                relay: *r,
                stamp_ms: *s,
            })
            .collect();
        if let Some(c) = self.conns.get_mut(&conn) {
            for chunk in known.chunks(MAX_PRESENCE_BATCH) {
                Frame::Presence(Presence {
                    entries: chunk.to_vec(),
                })
                .encode(&mut c.a.ctrl);
            }
        }
        self.wake_writer(conn);
        Ok(())
    }

    /// A link to `peer` is up (here or on another core): routes may use it, and what waited
    /// for a path tries again.
    pub(super) fn on_link_up(&mut self, peer: RelayId, view: LinkView, now: Now) {
        self.mesh.links.insert(peer, view);
        self.mesh.epoch += 1;
        self.retry_waiting(now);
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
    ) {
        let fresh: Vec<PresenceEntry> = entries
            .iter()
            .filter(|e| self.mesh.locate(e))
            .copied()
            .collect();
        if fresh.is_empty() {
            return;
        }
        self.m.fleet_agents.set(self.mesh.locations.len() as f64);
        // What this core kept for an agent now attached to another relay follows it there
        // (stored envelopes stay: stored custody does not cross relays yet).
        let me = self.cfg.relay_id;
        for e in fresh.iter().filter(|e| e.relay != me) {
            let Some(kept) = self.held.take(&e.agent) else {
                continue;
            };
            let (stored, memory): (Vec<Envelope>, Vec<Envelope>) =
                kept.into_iter().partition(|env| env.store_seq() != 0);
            if !stored.is_empty() {
                self.held.keep_first(e.agent, stored);
            }
            for env in memory {
                self.released.note_moved(&env);
                self.again(env, now);
            }
        }
        let targets: Vec<ConnId> = self
            .mesh
            .links
            .iter()
            .filter(|(p, v)| v.core == self.id && Some(**p) != from)
            .map(|(_, v)| v.conn)
            .collect();
        for conn in targets {
            if let Some(c) = self.conns.get_mut(&conn) {
                for chunk in fresh.chunks(MAX_PRESENCE_BATCH) {
                    Frame::Presence(Presence {
                        entries: chunk.to_vec(),
                    })
                    .encode(&mut c.a.ctrl);
                }
                self.wake_writer(conn);
            }
        }
    }

    /// An agent attached to this relay (on its home core): every core records it and tells
    /// its links.
    pub(super) fn announce_presence(&mut self, agent: AgentId, now: Now) {
        if self.mesh.snap.is_none() {
            return;
        }
        let entries: Arc<[PresenceEntry]> = Arc::from(
            [PresenceEntry {
                agent,
                relay: self.cfg.relay_id,
                stamp_ms: now.unix_ms,
            }]
            .as_slice(),
        );
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

    /// Whether a link may read now (its window of unanswered envelopes, its owed output).
    pub(super) fn link_read_gate(&mut self, conn: ConnId) -> ReadGate {
        let Some(c) = self.conns.get_mut(&conn) else {
            return ReadGate::Stop;
        };
        if c.a.awaiting >= LINK_WINDOW
            || c.a.awaiting_bytes >= LINK_WINDOW_BYTES as usize
            || c.a.ctrl.len() > super::conn::CONTROL_OUTPUT_MAX
        {
            c.reader_parked = true;
            return ReadGate::Park;
        }
        ReadGate::Go
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
        if self.mesh.routes.is_none() {
            self.mesh.routes = Some(RouteCache::new(ROUTE_CACHE));
        }
        let stale: Vec<ConnId> = self
            .conns
            .values()
            .filter_map(|c| {
                let peer = c.link.as_ref()?.peer?;
                let keep = me.zip(snap.index(&peer)).is_some_and(|(m, p)| {
                    !snap.revoked.contains(&peer) && g.link_between(m, p).is_some()
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
        let remote = super::dest_agent(&env)
            .and_then(|dst| self.mesh.remote_relay(&dst, self.cfg.relay_id))
            .and_then(|r| snap.index(&r));
        let Some(egress) = remote else {
            return ToFleet::Here(env);
        };
        if env.class() == DeliveryClass::Durable {
            // Stored custody does not cross relays yet.
            return ToFleet::Done(Err(Reason::ClassNotAllowed));
        }
        let parts = {
            let g = Graph::with(&snap, self.mesh.adjacency(&snap));
            let links = Links {
                snap: &snap,
                me,
                up: &self.mesh.links,
            };
            let c = Constraints::of(&env);
            let cache = self
                .mesh
                .routes
                .get_or_insert_with(|| RouteCache::new(ROUTE_CACHE));
            let found = cache
                .route(&g, &links, self.mesh.epoch, me, egress, &c)
                .is_ok();
            if found {
                transit::ingress(
                    &Place {
                        graph: &g,
                        links: &links,
                        me,
                    },
                    egress,
                    &env,
                )
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
            return ToFleet::Done(self.wait_for_path(env).map(|_| false));
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
    /// re-routed, or kept. `None`: the verdict for `src` is sent elsewhere (another core);
    /// `Some`: the caller answers `src` with it (or, without a source, counts a refusal).
    fn onward(
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
                self.forward_on(env, src, now)
            }
            Ok(Next::Keep) => Some(self.wait_for_path(env).map(|_| false)),
        }
    }

    /// Sends an envelope whose routing part names the next relay to that relay's link: queued
    /// on this core, or handed to the link's core (`None`: that core answers `src`).
    fn forward_on(
        &mut self,
        mut env: Envelope,
        src: Option<Src>,
        _now: Now,
    ) -> Option<Result<bool, Reason>> {
        let next = env.routing.relays().nth(usize::from(env.routing.hop_index));
        let Some(peer) = next else {
            return Some(Err(Reason::InvalidRouting));
        };
        match self.mesh.links.get(&peer).copied() {
            Some(v) if v.core == self.id => match self.enqueue_link(v.conn, env) {
                Ok(c) => Some(Ok(c)),
                Err((r, _)) if src.is_some() => Some(Err(r)),
                Err((_, mut env)) => {
                    back_here(&mut env);
                    Some(self.wait_for_path(env).map(|_| false))
                }
            },
            Some(v) => {
                self.outbox
                    .push(v.core, CoreMsg::Forward { env, peer, src });
                self.handed_off += 1;
                src.is_none().then_some(Ok(false))
            }
            None => {
                // Went down since the decision: it waits for the next one.
                back_here(&mut env);
                Some(self.wait_for_path(env).map(|_| false))
            }
        }
    }

    /// Puts an envelope on a link's queue (on the link's core), within the link's bounds.
    #[allow(clippy::result_large_err)]
    fn enqueue_link(&mut self, conn: ConnId, env: Envelope) -> Result<bool, (Reason, Envelope)> {
        let l = &self.settings.limits;
        let (max_n, max_b) = (l.send_queue_envelopes, l.send_queue_bytes());
        let Some(c) = self.conns.get_mut(&conn).filter(|c| !c.closing) else {
            return Err((Reason::QueueFull, env));
        };
        let (source, len) = (env.source(), env.frame_len());
        c.a.outq.push(env, max_n, max_b)?;
        if let Some(m) = c.link.as_ref().and_then(|l| l.m.as_ref()) {
            m.sent.increment(1);
        }
        self.sources.hold(source, len);
        self.charge(len as u64);
        self.m.fleet_routed(crate::metrics::FleetOutcome::Forwarded);
        self.wake_writer(conn);
        Ok(false)
    }

    /// An envelope another core handed over for the link to `peer` on this one.
    pub(super) fn on_forward(&mut self, env: Envelope, peer: RelayId, src: Option<Src>, now: Now) {
        let (len, class) = (env.frame_len() as u32, env.class());
        let r = match self.mesh.links.get(&peer).copied() {
            Some(v) if v.core == self.id => match self.enqueue_link(v.conn, env) {
                Ok(c) => Some(Ok(c)),
                Err((r, _)) if src.is_some() => Some(Err(r)),
                Err((_, mut env)) => {
                    back_here(&mut env);
                    Some(self.wait_for_path(env).map(|_| false))
                }
            },
            // The link went down or moved since: taken onwards again from here.
            _ => {
                let mut env = env;
                back_here(&mut env);
                self.onward(env, src, now)
            }
        };
        match (r, src) {
            (Some(r), Some(src)) => self.verdict_to(src, len, class, r, now),
            (Some(Err(r)), None) => self.m.dropped(r, 1),
            _ => {}
        }
    }

    /// Keeps an envelope (in this relay's form: its routing part at this relay's hop, or not
    /// routed yet) until a compliant path exists.
    fn wait_for_path(&mut self, env: Envelope) -> Result<(), Reason> {
        let cap = self.settings.limits.absent_bytes() / self.ncores.max(1) as usize;
        let len = env.frame_len() + super::custody::HELD_ENVELOPE_OVERHEAD;
        if self.mesh.waiting_bytes + len > cap {
            return Err(Reason::QueueFull);
        }
        self.mesh.waiting_bytes += len;
        self.mesh.waiting.push_back(env);
        self.m.fleet_routed(crate::metrics::FleetOutcome::Kept);
        self.m.fleet_waiting.set(self.mesh.waiting.len() as f64);
        Ok(())
    }

    /// What waits for a path tries again (a link came up, the snapshot changed, a tick).
    pub(super) fn retry_waiting(&mut self, now: Now) {
        if self.mesh.waiting.is_empty() {
            return;
        }
        let waiting = std::mem::take(&mut self.mesh.waiting);
        self.mesh.waiting_bytes = 0;
        for env in waiting {
            if env.expires_ms() <= now.unix_ms {
                self.m.dropped(Reason::Expired, 1);
                self.released
                    .receipt(&env, crate::wire::ReceiptStatus::Expired);
                continue;
            }
            self.again(env, now);
        }
        self.m.fleet_waiting.set(self.mesh.waiting.len() as f64);
    }

    /// Routes an envelope in this relay's custody again from here (no source to answer).
    fn again(&mut self, env: Envelope, now: Now) {
        let r = if env.routing.path.is_empty() {
            match self.offer_to_fleet(None, env, now) {
                ToFleet::Here(env) => {
                    // Its destination is here now, or nowhere known: its home core keeps it.
                    let home = super::dest_agent(&env)
                        .map_or(self.id, |a| crate::routing::home_core(&a, self.ncores));
                    self.outbox.push(home, CoreMsg::Deliver { env, src: None });
                    None
                }
                ToFleet::Done(r) => Some(r),
                ToFleet::Later => None,
            }
        } else {
            self.onward(env, None, now)
        };
        if let Some(Err(r)) = r {
            self.m.dropped(r, 1);
        }
    }

    /// An ENVELOPE that arrived on link `conn` as its `seq`-th: answered by that number once
    /// this relay took custody (or refused it).
    fn arrived_on_link(&mut self, conn: ConnId, seq: u64, env: Envelope, now: Now) {
        let src = Src {
            core: self.id,
            conn,
            tag: MessageId::from_u128(u128::from(seq)),
        };
        let (len, class) = (env.frame_len() as u32, env.class());
        if let Some(c) = self.conns.get_mut(&conn) {
            // Every verdict comes back through `verdict_to`, which counts it off.
            c.a.awaiting += 1;
            c.a.awaiting_bytes += len as usize;
            if let Some(m) = c.link.as_ref().and_then(|l| l.m.as_ref()) {
                m.received.increment(1);
            }
        }
        if let Some(r) = self.onward(env, Some(src), now) {
            self.verdict_to(src, len, class, r, now);
        }
    }

    /// The verdict on an envelope that came over a link: LINK_ACK (batched) or LINK_NACK.
    pub(super) fn settle_link(
        &mut self,
        conn: ConnId,
        tag: MessageId,
        result: Result<bool, Reason>,
    ) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let Some(l) = c.link.as_mut() else {
            return;
        };
        let seq = tag.as_u128() as u64;
        match result {
            Ok(_) => l.acks.push(seq),
            Err(r) => {
                self.m.refused(r);
                Frame::LinkNack(LinkNack::new(seq, r)).encode(&mut c.a.ctrl);
            }
        }
        self.wake_writer(conn);
    }

    /// The next relay refused an envelope: a retryable refusal waits and goes again, another
    /// is dropped, counted.
    fn link_refused(&mut self, mut env: Envelope, r: Reason, now: Now) {
        if r.retryable() && env.expires_ms() > now.unix_ms {
            back_here(&mut env);
            if self.wait_for_path(env).is_err() {
                self.m.dropped(Reason::QueueFull, 1);
            }
        } else {
            tracing::debug!(msg = %env.message_id(), reason = r.label(), "envelope refused by the next relay");
            self.m.dropped(r, 1);
        }
    }

    /// Heartbeats, the dead-link check and the handshake deadline, on every tick.
    pub(super) fn link_tick(&mut self, conn: ConnId, now: Now) {
        let hs_us = self.settings.timeouts.handshake_us;
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let Some(l) = c.link.as_mut() else {
            return;
        };
        if !l.up {
            if now.mono_us.saturating_sub(l.opened_us) > hs_us {
                self.close(conn, Reason::HandshakeTimeout, now);
            }
            return;
        }
        if now.mono_us.saturating_sub(l.last_rx_us) > LINK_DEAD_US {
            tracing::warn!(conn, "link silent: closed");
            self.close(conn, Reason::IdleTimeout, now);
            return;
        }
        let mut announce = None;
        if now.mono_us.saturating_sub(l.last_ping_us) >= u64::from(LINK_HEARTBEAT_MS) * 1000 {
            l.last_ping_us = now.mono_us;
            l.pings += 1;
            Frame::Ping(Ping {
                timestamp_us: now.mono_us,
            })
            .encode(&mut c.a.ctrl);
            if let (Some(rtt), Some(peer)) = (l.rtt_us, l.peer) {
                let moved = rtt.abs_diff(l.rtt_announced_us) > l.rtt_announced_us / RTT_EPOCH_SHARE;
                if moved {
                    l.rtt_announced_us = rtt;
                    announce = Some((peer, (rtt / 2).max(1) as u32));
                }
            }
            if let Some(m) = &l.m {
                let lost = l.pings.saturating_sub(l.pongs + 1);
                m.lost.set(lost as f64 / l.pings as f64);
            }
            self.wake_writer(conn);
        }
        if let Some((peer, lat)) = announce {
            self.on_link_latency(peer, lat);
            for k in (0..self.ncores).filter(|k| *k != self.id) {
                self.outbox.push(
                    k,
                    CoreMsg::LinkLatency {
                        peer,
                        latency_us: lat,
                    },
                );
            }
        }
    }

    /// A link's reader ended: every core forgets the link, and what it held goes again.
    pub(super) fn link_teardown(&mut self, mut c: Conn, now: Now) {
        let Some(l) = c.link.take() else {
            return;
        };
        let custody = c.take_custody(&self.m, &mut self.released);
        if let (Some(peer), true) = (l.peer, l.up) {
            if let Some(m) = &l.m {
                m.up.set(0.0);
            }
            tracing::info!(peer = %peer.to_hex()[..16], held = custody.len(), "link down");
            self.actions.push_back(Action::LinkState(peer, false));
            self.on_link_down(peer, (self.id, c.id));
            for k in (0..self.ncores).filter(|k| *k != self.id) {
                self.outbox.push(
                    k,
                    CoreMsg::LinkDown {
                        peer,
                        core: self.id,
                        conn: c.id,
                    },
                );
            }
        }
        for mut env in custody {
            back_here(&mut env);
            self.again(env, now);
        }
    }

    /// Moves the link's ACKs into its control output.
    pub(super) fn encode_link_acks(c: &mut Conn) {
        let Some(l) = c.link.as_mut() else {
            return;
        };
        while !l.acks.is_empty() {
            let n = l.acks.len().min(MAX_LINK_ACK_BATCH);
            Frame::LinkAck(LinkAck::new(l.acks.drain(..n))).encode(&mut c.a.ctrl);
        }
    }
}

impl Mesh {
    fn adjacency(&mut self, snap: &Snapshot) -> crate::fleet::path::Adjacency {
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
    /// Handed to another core, which sends the verdict.
    Later,
}

/// Turns an envelope sent (or about to be sent) to the next relay back to this relay's hop.
fn back_here(env: &mut Envelope) {
    if env.routing.hop_index > 0 {
        env.routing.hop_index -= 1;
        env.routing.hop_limit = env.routing.hop_limit.saturating_add(1);
    }
}

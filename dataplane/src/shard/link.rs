//! The relay-link role: a TLS connection to another relay of the fleet (`docs/PROTOCOL.md` §5,
//! `docs/FLEET.md`). What the fleet's envelopes do on a core is `mesh`'s.
//!
//! A link is opened by the relay with the smaller id (the engine's dialler connects; the core
//! runs [`Shard::open_dialled`]) and accepted on the other's link port ([`Shard::open_link`]).
//! After TLS (fleet CA, relay role marker; the peer's relay id is its certificate's key, and it
//! must be a relay of the snapshot with a link to this one) both ends send LINK_HELLO at once. A
//! link lives on one core of each relay ([`link_core`]); one accepted on another core moves there
//! like an agent's session. Every core learns which links are up (`LinkUp`, `LinkDown`,
//! `LinkLatency`) and where agents are (PRESENCE).
//!
//! On the link: ENVELOPE frames numbered from 0 in each direction; LINK_ACK and LINK_NACK answer
//! them by number. What goes out uses the agent role's queue and in-flight custody (every class
//! is answered, so everything written is in flight until answered), within the peer's window.
//! PING every [`LINK_HEARTBEAT_MS`] (RTT, loss); a link silent for [`LINK_DEAD_US`] is closed.

use std::collections::VecDeque;
use std::sync::Arc;

use super::budget::CONNECTION_OVERHEAD;
use super::conn::AgentSession;
use super::msg::{ConnId, CoreMsg};
use super::{Action, Conn, Now, ReadGate, Shard};
use crate::fleet::path::Graph;
use crate::pki::ed25519_key_of;
use crate::session::Session;
use crate::tls::transport::Transport;
use crate::wire::{
    Envelope, Frame, LinkAck, LinkHello, LinkNack, MessageId, Ping, Pong, Presence, PresenceEntry,
    Reason, RelayId, Role, MAX_LINK_ACK_BATCH, MAX_PRESENCE_BATCH, PROTOCOL_VERSION_MAX,
    PROTOCOL_VERSION_MIN,
};

/// How often a relay PINGs each link.
pub const LINK_HEARTBEAT_MS: u32 = 250;
/// A link that heard nothing for this long is closed as dead (four heartbeats).
pub const LINK_DEAD_US: u64 = 1_000_000;
/// Envelopes a relay accepts on one link before it answered them.
pub const LINK_WINDOW: u32 = 8192;
/// Frame bytes of such envelopes.
pub const LINK_WINDOW_BYTES: u32 = 64 << 20;
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

/// Control output below which queued presence entries join it (each pass of the writer sends
/// at most this much presence before envelopes).
const PRESENCE_ROOM: usize = 64 << 10;

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
    /// When this side last rotated its sending keys (TLS KeyUpdate).
    pub(crate) last_key_update_us: u64,
    /// Smoothed RTT, microseconds.
    pub(crate) rtt_us: Option<u64>,
    /// RTT last announced to the cores.
    pub(crate) rtt_announced_us: u64,
    /// Largest frame the peer accepts (its LINK_HELLO).
    pub(crate) peer_max_frame: usize,
    pub(crate) pings: u64,
    pub(crate) pongs: u64,
    pub(crate) m: Option<crate::metrics::LinkMetrics>,
    /// Presence entries waiting for room in the control output (at most the presence table's
    /// size: beyond it the oldest go, sent again by their relay's next refresh).
    pub(crate) presence: VecDeque<PresenceEntry>,
}

/// A link that is up, as every core knows it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LinkView {
    pub(crate) core: u16,
    pub(crate) conn: ConnId,
    /// One-way latency from the measured RTT, microseconds (0: not measured yet).
    pub(crate) latency_us: u32,
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
            last_key_update_us: now.mono_us,
            rtt_us: None,
            rtt_announced_us: 0,
            peer_max_frame: 0,
            pings: 0,
            pongs: 0,
            m: None,
            presence: VecDeque::new(),
        }
    }

    /// Moves queued presence into `ctrl` while it holds less than [`PRESENCE_ROOM`].
    fn presence_into(&mut self, ctrl: &mut bytes::BytesMut) {
        while !self.presence.is_empty() && ctrl.len() < PRESENCE_ROOM {
            let n = self.presence.len().min(MAX_PRESENCE_BATCH);
            Frame::Presence(Presence {
                entries: self.presence.drain(..n).collect(),
            })
            .encode(ctrl);
        }
    }

    /// Queues presence entries for the peer, keeping at most `cap`.
    pub(crate) fn queue_presence(&mut self, entries: &[PresenceEntry], cap: usize) {
        self.presence.extend(entries.iter().copied());
        let over = self
            .presence
            .len()
            .saturating_sub(cap.max(MAX_PRESENCE_BATCH));
        self.presence.drain(..over);
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
        write_len: 0,
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
        if self.draining
            || self.mesh.me.is_none()
            || self.conns.len() >= self.settings.limits.max_connections_per_core
            || self.budget.state == super::budget::Overload::Refuse
        {
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
        let id = self.conns.next_id();
        self.conns.insert(id, link_conn(id, transport, link, now));
        id
    }

    /// Runs the handshake and the frames of a link on what it read.
    pub(super) fn process_link_input(&mut self, conn: ConnId, now: Now) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if !c.transport.is_open() {
            match self.advance_tls(conn, now) {
                None | Some(false) => return,
                Some(true) => {
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
        let mut presence: Vec<PresenceEntry> = Vec::new();
        let mut receipts: Vec<crate::wire::LinkReceipt> = Vec::new();
        // Envelopes the peer answered that someone waits on (an upstream, or a retry).
        let mut answered: Vec<(Envelope, Option<Reason>)> = Vec::new();
        let mut wake = false;
        let Some(l) = c.link.as_mut() else {
            return;
        };
        loop {
            let frame = match c.transport.frame_or_close(conn) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(r) => {
                    close = Some(r);
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
                    let next = c.a.outq.front().map_or(0, Envelope::frame_len);
                    let was_full =
                        !c.a.inflight
                            .has_room_unanswered(l.window.0, l.window.1, next);
                    let mut n = 0;
                    for seq in a.seqs() {
                        match c.a.inflight.settle_seq(seq, false, &mut self.released) {
                            Some(Some(env)) => {
                                answered.push((env, None));
                                n += 1;
                            }
                            Some(None) => n += 1,
                            None => self.m.unknown_acks.increment(1),
                        }
                    }
                    if let Some(m) = &l.m {
                        m.acked.increment(n);
                    }
                    c.a.last_ack_us = now.mono_us;
                    wake |= was_full && !c.a.outq.is_empty();
                }
                Frame::LinkNack(n) if l.up => {
                    match c.a.inflight.settle_seq(n.seq, true, &mut self.released) {
                        Some(Some(env)) => {
                            if let Some(m) = &l.m {
                                m.refused.increment(1);
                            }
                            let r = n.reason().unwrap_or(Reason::ProtocolError);
                            answered.push((env, Some(r)));
                        }
                        Some(None) => {}
                        None => self.m.unknown_nacks.increment(1),
                    }
                    wake |= !c.a.outq.is_empty();
                }
                Frame::Presence(p) if l.up => presence.extend(p.entries),
                Frame::LinkReceipt(mut r) if l.up => {
                    // A peer cannot make a receipt travel further than this relay would.
                    r.hops_left = r.hops_left.min(crate::wire::MAX_PATH_LEN as u8);
                    receipts.push(r);
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
        if c.transport.peer_closed() && close.is_none() && !c.closing {
            close = Some(Reason::Normal);
        }
        if wake {
            self.wake_writer(conn);
        }
        for (env, r) in answered {
            self.link_answered(env, r, now);
        }
        for (seq, env) in accepted {
            self.arrived_on_link(conn, seq, env, now);
        }
        if let Some(r) = close {
            self.close(conn, r, now);
            return;
        }
        let more = hello.is_some();
        if let Some(h) = hello {
            if let Err(r) = self.link_hello(conn, h, now) {
                self.close(conn, r, now);
                return;
            }
        }
        // Receipts for agents: to their home cores (which deliver or pass them on).
        for r in receipts {
            let home = crate::routing::home_core(&r.to, self.ncores);
            if home == self.id {
                self.deliver_receipt(r.to, r.receipt, r.hops_left);
            } else {
                self.outbox.push(
                    home,
                    CoreMsg::Receipt {
                        to: r.to,
                        receipt: r.receipt,
                        hops_left: r.hops_left,
                    },
                );
            }
        }
        if !presence.is_empty() {
            let from = self
                .conns
                .get(&conn)
                .and_then(|c| c.link.as_ref())
                .and_then(|l| l.peer);
            // The other cores hear only what was new here (each keeps the same table).
            let fresh = self.on_presence(&presence, from, now);
            if !fresh.is_empty() {
                let fresh: Arc<[PresenceEntry]> = Arc::from(fresh);
                for k in (0..self.ncores).filter(|k| *k != self.id) {
                    self.outbox.push(
                        k,
                        CoreMsg::Presence {
                            entries: fresh.clone(),
                            from,
                        },
                    );
                }
            }
        }
        // Frames behind the HELLO that ended the loop.
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
        // Of two relays the one with the smaller id dials: a link the other way is refused.
        if !l.dialled && key.0 >= self.cfg.relay_id.0 {
            tracing::info!(peer = %key.to_hex(), "link refused: the relay with the smaller id dials");
            return Err(Reason::NotAdmitted);
        }
        let Some(peer) = snap.index(&key) else {
            tracing::info!(peer = %key.to_hex(), "link refused: not a relay of the fleet");
            return Err(Reason::NotAdmitted);
        };
        let linked = Graph::with(&snap, self.mesh.adjacency(&snap))
            .link_between(me, peer)
            .is_some();
        if snap.revoked.contains(&key) || snap.revoked.contains(&self.cfg.relay_id) || !linked {
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
        // A link that could carry nothing (no window, frames below the protocol's least) is
        // refused rather than chosen by paths it then stalls.
        if h.window == 0
            || (h.max_frame as usize) < crate::signaling::MIN_FRAME as usize
            || h.window_bytes < h.max_frame
        {
            return Err(Reason::ProtocolError);
        }
        l.up = true;
        // The peer's window, within this relay's own (a peer cannot make it hold more).
        l.window = (
            h.window.min(LINK_WINDOW) as usize,
            h.window_bytes.min(LINK_WINDOW_BYTES) as usize,
        );
        l.peer_max_frame = h.max_frame as usize;
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
        // A newer link to the same relay replaces an older one (it redialled: the old one is
        // dead to it), as a newer agent session replaces an older one.
        if let Some(old) = self
            .mesh
            .links
            .get(&peer)
            .filter(|v| v.conn != conn)
            .copied()
        {
            if old.core == self.id {
                self.close(old.conn, Reason::SessionReplaced, now);
            }
        }
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
        let known = self.mesh.known();
        let cap = self.located_cap();
        if let Some(l) = self.conns.get_mut(&conn).and_then(|c| c.link.as_mut()) {
            l.queue_presence(&known, cap);
        }
        self.wake_writer(conn);
        Ok(())
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

    /// Heartbeats, the dead-link check and the handshake deadline, on every tick.
    pub(super) fn link_tick(&mut self, conn: ConnId, now: Now) {
        let hs_us = self.settings.timeouts.handshake_us;
        let rotate_us = u64::from(self.settings.contract.key_rotation_s) * 1_000_000;
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let parked = c.reader_parked;
        let Some(l) = c.link.as_mut() else {
            return;
        };
        if !l.up {
            if now.mono_us.saturating_sub(l.opened_us) > hs_us {
                self.close(conn, Reason::HandshakeTimeout, now);
            }
            return;
        }
        if parked {
            // This relay stopped reading (its window of unanswered envelopes, owed output):
            // what the peer sent waits in the socket; silence is ours, not the peer's.
            l.last_rx_us = now.mono_us;
        } else if now.mono_us.saturating_sub(l.last_rx_us) > LINK_DEAD_US {
            tracing::warn!(conn, "link silent: closed");
            self.close(conn, Reason::IdleTimeout, now);
            return;
        }
        // Sending keys rotate on the contract's interval, as on agent sessions.
        // (The writer is woken by the PING below at the latest.)
        if rotate_us > 0 && now.mono_us.saturating_sub(l.last_key_update_us) >= rotate_us {
            l.last_key_update_us = now.mono_us;
            c.key_update_due = true;
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
        // Everything the link held, in send order, best-effort included (someone may wait on
        // its answer).
        let mut custody = c.a.inflight.take(&mut self.released);
        custody.extend(c.a.outq.drain());
        // Its senders paused on its queue go on.
        let paced = std::mem::take(&mut c.a.paced_sources);
        self.resume_all(&paced);
        // Unless a newer link to the same relay replaced it, the link is down.
        let current = l.peer.is_some_and(|p| {
            self.mesh
                .links
                .get(&p)
                .is_some_and(|v| (v.core, v.conn) == (self.id, c.id))
        });
        if let (Some(peer), true) = (l.peer, l.up && current) {
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
        // Released from this core's quota with the link; taken again where it goes next.
        for env in &custody {
            self.released.note_moved(env);
        }
        self.link_lost(custody, now);
    }

    /// The answer to an envelope that came over a link: LINK_ACK (batched) or LINK_NACK.
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

    /// Moves the link's ACKs into its control output, and queued presence while the output
    /// is below [`PRESENCE_ROOM`] (a whole table never sits in the output, nor stops the
    /// reading of a link that owes too much output).
    pub(super) fn encode_link_acks(c: &mut Conn) {
        let Some(l) = c.link.as_mut() else {
            return;
        };
        while !l.acks.is_empty() {
            let n = l.acks.len().min(MAX_LINK_ACK_BATCH);
            Frame::LinkAck(LinkAck::new(l.acks.drain(..n))).encode(&mut c.a.ctrl);
        }
        l.presence_into(&mut c.a.ctrl);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::AgentId;

    #[test]
    fn presence_for_a_link_is_bounded_and_joins_the_output_a_little_at_a_time() {
        let now = Now {
            mono_us: 0,
            unix_ms: 0,
        };
        let mut l = LinkSession::new(None, false, now);
        let entries: Vec<PresenceEntry> = (0..100_000u32)
            .map(|i| {
                let mut a = [0u8; 32];
                a[..4].copy_from_slice(&i.to_be_bytes());
                PresenceEntry {
                    agent: AgentId(a),
                    relay: RelayId([1; 32]),
                    stamp_ms: u64::from(i),
                }
            })
            .collect();
        // A table of 50,000: the oldest half goes.
        l.queue_presence(&entries, 50_000);
        assert_eq!(l.presence.len(), 50_000);
        assert_eq!(l.presence.front().unwrap().stamp_ms, 50_000);
        // Each pass adds about PRESENCE_ROOM, in whole frames, and only below it.
        let mut ctrl = bytes::BytesMut::new();
        l.presence_into(&mut ctrl);
        assert!(ctrl.len() >= PRESENCE_ROOM && ctrl.len() < PRESENCE_ROOM + 80 * 1024);
        let after_one = l.presence.len();
        l.presence_into(&mut ctrl);
        assert_eq!(l.presence.len(), after_one, "added above the room");
        let mut sent = 0;
        let mut passes = 0;
        loop {
            let d = crate::wire::FrameDecoder::new(1 << 20);
            ctrl = bytes::BytesMut::new();
            l.presence_into(&mut ctrl);
            if ctrl.is_empty() {
                break;
            }
            passes += 1;
            while let Some(f) = d.decode(&mut ctrl).unwrap() {
                match f {
                    Frame::Presence(p) => sent += p.entries.len(),
                    other => panic!("{other:?}"),
                }
            }
        }
        assert_eq!(sent + (50_000 - after_one), 50_000);
        assert!(passes > 30, "{passes} passes");
    }
}

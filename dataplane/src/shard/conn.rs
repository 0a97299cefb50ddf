//! A connection on its shard: the transport, the session, and the agent role's state; and the
//! events that open it, gate and feed its reader, and wake its tasks.

use bytes::BytesMut;

use super::budget::{self, Overload};
use super::custody::{Inflight, SendQueue};
use super::msg::ConnId;
use super::{Action, Now, ReadGate, Shard, OUTBOX_HIGH, PRE_HELLO_MAX_FRAME};
use crate::policy::TokenBucket;
use crate::session::Session;
use crate::tls::transport::Transport;
use crate::wire::{AgentId, MessageId, Role, Welcome};

/// Control output (ACK, NACK, PONG bytes) a connection may owe before its reader stops.
pub(crate) const CONTROL_OUTPUT_MAX: usize = 1 << 20;

/// Sources one send queue remembers to resume when it drains (16 bytes each).
pub(crate) const PACED_SOURCES_MAX: usize = 64;

/// Longest pause of a source whose destination is congested, when no `Resume` comes first.
pub(crate) const PACE_MAX_US: u64 = 100_000;

/// An agent's session on this core: what the agent role keeps beside the transport.
pub(crate) struct AgentSession {
    pub(crate) agent: Option<AgentId>,
    /// Attach sequence of this session (0 before HELLO).
    pub(crate) seq: u64,
    /// The session became its agent's session on this core (counted in `sessions_active`).
    pub(crate) attached: bool,
    pub(crate) contract: Option<Welcome>,
    pub(crate) attach_acks_pending: usize,
    /// WELCOME went out: envelopes may be written.
    pub(crate) welcomed: bool,
    pub(crate) acks_to_send: Vec<MessageId>,
    /// Encoded control frames waiting for the writer.
    pub(crate) ctrl: BytesMut,
    pub(crate) outq: SendQueue,
    pub(crate) inflight: Inflight,
    /// Envelopes sent to other cores that wait for a verdict, and their bytes.
    pub(crate) awaiting: u32,
    pub(crate) awaiting_bytes: usize,
    pub(crate) bucket_frames: Option<TokenBucket>,
    pub(crate) bucket_bytes: Option<TokenBucket>,
    /// The reader pauses until then, or until a `Resume`: a destination this session sent to
    /// is congested (0: not paused).
    pub(crate) paced_until_us: u64,
    /// Sources (core, connection) paused on this session's send queue, resumed when it drains
    /// below a quarter of its bounds (at most [`PACED_SOURCES_MAX`]; others wait out their pause).
    pub(crate) paced_sources: Vec<(u16, ConnId)>,
    /// Envelopes were handed to a newer session; nothing is left to keep in custody.
    pub(crate) handed_over: bool,
    /// When the agent last ACKed something in flight (or the session began).
    pub(crate) last_ack_us: u64,
    /// Directory requests (PUBLISH, LOOKUP) in the current second, and when it began.
    pub(crate) dir_requests: u32,
    pub(crate) dir_window_us: u64,
    /// When the agent last published its bundle (0: never).
    pub(crate) last_publish_us: u64,
    /// ACKs to send are held until then (the agent offered `features::ACK_DELAY`).
    pub(crate) acks_due_us: Option<u64>,
}

impl AgentSession {
    /// The agent offered `features::ACK_DELAY` and was granted it: its ACKs, and the verdicts
    /// they come from, may wait for company.
    pub(crate) fn answers_may_wait(&self) -> bool {
        self.contract
            .as_ref()
            .is_some_and(|w| w.features & crate::wire::features::ACK_DELAY != 0)
    }

    pub(crate) fn new(now: Now) -> Self {
        AgentSession {
            agent: None,
            seq: 0,
            attached: false,
            contract: None,
            attach_acks_pending: 0,
            welcomed: false,
            acks_to_send: Vec::new(),
            ctrl: BytesMut::new(),
            outq: SendQueue::default(),
            inflight: Inflight::default(),
            awaiting: 0,
            awaiting_bytes: 0,
            bucket_frames: None,
            bucket_bytes: None,
            paced_until_us: 0,
            paced_sources: Vec::new(),
            handed_over: false,
            last_ack_us: now.mono_us,
            dir_requests: 0,
            dir_window_us: now.mono_us,
            last_publish_us: 0,
            acks_due_us: None,
        }
    }
}

/// One connection: transport, session, and the role's state.
pub(crate) struct Conn {
    pub(crate) id: ConnId,
    pub(crate) transport: Transport,
    pub(crate) session: Session,
    /// What the peer is; only agents are served on this listener.
    pub(crate) role: Role,
    pub(crate) a: AgentSession,
    /// A relay link's own state (its queue and in-flight custody are `a`'s).
    pub(crate) link: Option<Box<super::link::LinkSession>>,
    /// CLOSE queued (or TLS failed); the writer sends close_notify and shuts down once flushed.
    pub(crate) closing: bool,
    pub(crate) closing_since_us: u64,
    /// The close_notify went into a write buffer.
    pub(crate) close_notify_sent: bool,
    /// When the socket write in progress started (0: not writing).
    pub(crate) write_since_us: u64,
    /// A write buffer is with the engine.
    pub(crate) writing: bool,
    /// Its length (what it retains).
    pub(crate) write_len: usize,
    /// The reader waits for a wake-up.
    pub(crate) reader_parked: bool,
    /// Due a KeyUpdate (the session's rotation interval).
    pub(crate) key_update_due: bool,
    /// A WakeWriter went out and the writer has not found the connection idle since.
    pub(crate) writer_awake: bool,
    /// The session completed HELLO on a core that is not its agent's home: it moves there.
    pub(crate) moving_to: Option<u16>,
}

/// A connection on its way to another core (its agent's home), with everything the relay knows
/// of it: TLS state, unread input, the negotiated session. Opaque outside the shard.
pub struct MovingConn(pub(crate) Box<Conn>, u16);

impl std::fmt::Debug for MovingConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MovingConn({}:{}, {:?})",
            self.1, self.0.id, self.0.a.agent
        )
    }
}

impl MovingConn {
    /// The core it leaves and its id there.
    pub fn origin(&self) -> (u16, ConnId) {
        (self.1, self.0.id)
    }
}

impl Shard {
    /// A connection was accepted. `None`: refused (connection limit or draining); the engine
    /// closes the socket.
    pub fn open(&mut self, now: Now) -> Option<ConnId> {
        self.m.connections_accepted.increment(1);
        if self.draining {
            return None;
        }
        if self.conns.len() >= self.settings.limits.max_connections_per_core {
            self.m
                .handshake_failed(crate::wire::Reason::TooManyConnections);
            tracing::info!(core = self.id, "connection refused: too many connections");
            return None;
        }
        if self.budget.state == Overload::Refuse {
            self.m.handshake_failed(crate::wire::Reason::Overloaded);
            return None;
        }
        self.charge(budget::CONNECTION_OVERHEAD);
        let transport = match Transport::new(
            self.cfg.tls.clone(),
            PRE_HELLO_MAX_FRAME.min(self.settings.contract.max_frame as usize),
            self.settings.limits.read_buffer,
        ) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "cannot create TLS session");
                return None;
            }
        };
        let id = self.conns.next_id();
        self.conns.insert(
            id,
            Conn {
                id,
                transport,
                session: Session::new(now.mono_us, self.settings.timeouts),
                role: Role::Agent,
                a: AgentSession::new(now),
                link: None,
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
            },
        );
        Some(id)
    }

    /// Whether the connection's reader may read now.
    pub fn read_gate(&mut self, conn: ConnId, now: Now) -> ReadGate {
        let outbox_full = self.outbox.max_pending() > OUTBOX_HIGH;
        let Some(c) = self.conns.get_mut(&conn) else {
            return ReadGate::Stop;
        };
        if let Some(home) = c.moving_to {
            if c.writing {
                // Its socket is not handed over with a write in progress.
                c.reader_parked = true;
                return ReadGate::Park;
            }
            return ReadGate::Move(home);
        }
        if c.closing || c.transport.peer_closed() {
            // Keep reading until the peer hangs up (so its close_notify and FIN are seen), but
            // what it sends is ignored.
            return ReadGate::Go;
        }
        if c.link.is_some() {
            if outbox_full {
                c.reader_parked = true;
                self.parked_on_outbox.push(conn);
                return ReadGate::Park;
            }
            return self.link_read_gate(conn);
        }
        if outbox_full {
            c.reader_parked = true;
            self.parked_on_outbox.push(conn);
            return ReadGate::Park;
        }
        // Output owed to a peer that does not read (NACKs, ACKs, PONGs) stops its reading.
        if c.a.ctrl.len() + 16 * c.a.acks_to_send.len() > CONTROL_OUTPUT_MAX {
            c.reader_parked = true;
            return ReadGate::Park;
        }
        if c.a
            .contract
            .as_ref()
            .is_some_and(|w| c.a.awaiting >= w.send_window)
            || c.a.awaiting_bytes >= self.settings.limits.send_queue_bytes()
        {
            self.m.throttled_send_window.increment(1);
            c.reader_parked = true;
            return ReadGate::Park;
        }
        let t = now.mono_us;
        let f = c.a.bucket_frames.as_mut().map_or(0, |b| b.wait_us(t));
        let b = c.a.bucket_bytes.as_mut().map_or(0, |b| b.wait_us(t));
        let p = c.a.paced_until_us.saturating_sub(t);
        if f > 0 {
            self.m.throttled_frames.increment(1);
        }
        if b > 0 {
            self.m.throttled_bytes.increment(1);
        }
        if p > 0 {
            // A `Resume` cuts the wait short.
            self.m.throttled_destination.increment(1);
            c.reader_parked = true;
        }
        match f.max(b).max(p) {
            0 => ReadGate::Go,
            w => ReadGate::Wait(w),
        }
    }

    /// The read buffer for the connection's next socket read (bytes are appended to it).
    pub fn take_read_buf(&mut self, conn: ConnId) -> Option<BytesMut> {
        self.conns
            .get_mut(&conn)
            .map(|c| c.transport.take_read_buf())
    }

    /// The read into `buf` (from [`Shard::take_read_buf`]) completed with new bytes.
    pub fn on_read(&mut self, conn: ConnId, buf: BytesMut, now: Now) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.transport.put_read_buf(buf);
        self.process_input(conn, now);
    }

    /// Takes a connection that [`Shard::read_gate`] said moves ([`ReadGate::Move`]) out of this
    /// shard, for [`Shard::adopt`] on its home core. Its reader and writer end without
    /// [`Shard::on_read_end`].
    pub fn take_moving(&mut self, conn: ConnId) -> Option<MovingConn> {
        self.conns.get(&conn)?.moving_to?;
        let c = self.conns.remove(&conn)?;
        self.m.sessions_moved.increment(1);
        Some(MovingConn(Box::new(c), self.id))
    }

    /// Takes in a connection moved from another core: it gets an id here, attaches, and reads
    /// what it had already received. The engine gives it its socket and tasks.
    pub fn adopt(&mut self, moving: MovingConn, now: Now) -> ConnId {
        let mut c = moving.0;
        let id = self.conns.next_id();
        c.id = id;
        c.moving_to = None;
        c.reader_parked = false;
        c.writer_awake = false;
        // ACKs held on the old core have no timer here: they go with the first write.
        c.a.acks_due_us = None;
        let owed = !c.a.acks_to_send.is_empty();
        if c.link.is_some() {
            // A link that arrived on another core's listener: it says LINK_HELLO from here.
            self.conns.insert(id, *c);
            self.send_link_hello(id);
            self.process_input(id, now);
            return id;
        }
        let full = self.conns.len() >= self.settings.limits.max_connections_per_core;
        let admitted = c.a.agent.map(|a| self.settings.admission.admit(&a));
        self.conns.insert(id, *c);
        // Identities choose their home core: the limit holds for moved sessions too. Admission
        // is checked again (the lists may have been reloaded while it moved), and a draining
        // core takes no new session.
        let refused = if full {
            Some(crate::wire::Reason::TooManyConnections)
        } else if let Some(Err(r)) = admitted {
            Some(r)
        } else if self.draining {
            Some(crate::wire::Reason::ShuttingDown)
        } else {
            None
        };
        if let Some(r) = refused {
            tracing::info!(core = self.id, reason = r.label(), "moved session refused");
            self.close(id, r, now);
            return id;
        }
        self.attach_here(id, now);
        if self.conns.get(&id).is_some_and(|c| !c.closing) {
            self.process_input(id, now);
        }
        if owed {
            self.wake_writer(id);
        }
        id
    }

    /// The connection's reader ended (EOF, error, or shut down): the connection is forgotten.
    pub fn on_read_end(&mut self, conn: ConnId, now: Now) {
        self.teardown(conn, now);
    }

    /// Wakes a connection's writer unless it is already awake (it polls again after every
    /// write, and goes idle only when [`Shard::poll_write`] found nothing).
    pub(super) fn wake_writer(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            if !c.writer_awake {
                c.writer_awake = true;
                self.actions.push_back(Action::WakeWriter(conn));
            }
        }
    }

    pub(super) fn wake_reader(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            if c.reader_parked {
                c.reader_parked = false;
                self.actions.push_back(Action::WakeReader(conn));
            }
        }
    }
}

impl Conn {
    /// Whether this connection's session takes envelopes (open, and not closing).
    pub(super) fn takes_envelopes(&self) -> bool {
        self.session.is_open() && !self.closing
    }
}

/// The connections of a shard, by id: a slab. An id is a slot's index in its low 32 bits and
/// the shard's count of connections opened so far in its high ones, so that a lookup is an
/// index and a compare, and an id is not given twice (an answer for a connection that closed
/// finds nothing, not its slot's next tenant). The slots never exceed the most connections
/// open at once (`max_connections_per_core`), each a `Conn` wide, as a map's would.
#[derive(Default)]
pub(crate) struct Conns {
    slots: Vec<Option<Conn>>,
    free: Vec<u32>,
    len: usize,
    opened: u64,
}

impl Conns {
    /// The id the next [`insert`](Self::insert) takes.
    pub(crate) fn next_id(&self) -> ConnId {
        let index = self.free.last().copied().unwrap_or(self.slots.len() as u32);
        ((self.opened + 1) << 32) | index as u64
    }

    /// Puts `c` in, under `id`: the id [`next_id`](Self::next_id) just gave.
    pub(crate) fn insert(&mut self, id: ConnId, c: Conn) {
        assert_eq!(id, self.next_id(), "a connection goes in under the next id");
        self.opened += 1;
        let index = id as u32 as usize;
        if index == self.slots.len() {
            self.slots.push(Some(c));
        } else {
            self.free.pop();
            self.slots[index] = Some(c);
        }
        self.len += 1;
    }

    pub(crate) fn get(&self, id: &ConnId) -> Option<&Conn> {
        self.slots
            .get(*id as u32 as usize)?
            .as_ref()
            .filter(|c| c.id == *id)
    }

    pub(crate) fn get_mut(&mut self, id: &ConnId) -> Option<&mut Conn> {
        self.slots
            .get_mut(*id as u32 as usize)?
            .as_mut()
            .filter(|c| c.id == *id)
    }

    pub(crate) fn remove(&mut self, id: &ConnId) -> Option<Conn> {
        let slot = self.slots.get_mut(*id as u32 as usize)?;
        if slot.as_ref()?.id != *id {
            return None;
        }
        let c = slot.take();
        self.free.push(*id as u32);
        self.len -= 1;
        c
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn keys(&self) -> impl Iterator<Item = &ConnId> + '_ {
        self.values().map(|c| &c.id)
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &Conn> + '_ {
        self.slots.iter().flatten()
    }

    pub(crate) fn values_mut(&mut self) -> impl Iterator<Item = &mut Conn> + '_ {
        self.slots.iter_mut().flatten()
    }
}

#[cfg(test)]
mod tests {
    use crate::shard::{Limits, Now};
    use crate::testing::{open_settings, InMemoryRelay};

    const NOW: Now = Now {
        mono_us: 1_000_000,
        unix_ms: 1_800_000_000_000,
    };

    #[test]
    fn a_closed_connections_slot_is_used_again_under_a_new_id() {
        let relay = InMemoryRelay::new();
        let mut shard = relay.shard(open_settings(Limits::default()));
        let a = shard.open(NOW).expect("open");
        let b = shard.open(NOW).expect("open");
        shard.on_read_end(a, NOW);
        assert_eq!(shard.connections(), 1);
        let c = shard.open(NOW).expect("open");
        assert_eq!(c as u32, a as u32, "the freed slot");
        assert!(c != a && c != b, "ids are not given twice");
        assert!(
            shard.take_read_buf(a).is_none(),
            "the closed one's id finds nothing"
        );
        assert!(shard.take_read_buf(b).is_some() && shard.take_read_buf(c).is_some());
        shard.on_read_end(a, NOW);
        assert_eq!(shard.connections(), 2, "nor closes its slot's new tenant");
    }
}

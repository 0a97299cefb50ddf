//! The agent role: what the frames an agent sends do, and how its connection ends.
//!
//! Input flows transport → frames → session rules (`crate::session`) → this room: HELLO is
//! negotiated and attached (`attach`), ENVELOPEs pass the ingress checks (`crate::policy`) and go
//! to `forward` once the connection's borrow ends (an agent may send to itself), ACK and NACK
//! settle in-flight custody, PING is answered, CLOSE ends the session. Every frame and every byte
//! is charged to the session's rate buckets.

use super::{Action, ConnId, Now, Shard};
use crate::pki::ed25519_key_of;
use crate::policy::check_ingress;
use crate::session::{Admit, SessionState};
use crate::wire::{AgentId, Close, Envelope, Frame, Nack, Pong, Reason};
use std::ops::ControlFlow;

use super::custody::Settled;

impl Shard {
    /// Runs the handshake and the frames on what a connection read.
    pub(super) fn process_input(&mut self, conn: ConnId, now: Now) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.moving_to.is_some() {
            // Read on its home core, after the move.
            return;
        }
        if c.closing {
            c.transport.discard_input();
            return;
        }
        if c.link.is_some() {
            self.process_link_input(conn, now);
            return;
        }
        if !c.transport.is_open() {
            match self.advance_tls(conn, now) {
                None | Some(false) => return,
                Some(true) => {
                    let Some(c) = self.conns.get_mut(&conn) else {
                        return;
                    };
                    let key = c.transport.peer_certificates.first().map(ed25519_key_of);
                    match key {
                        Some(Ok(k)) => c.a.agent = Some(AgentId(k)),
                        _ => {
                            self.close(conn, Reason::NotAdmitted, now);
                            return;
                        }
                    }
                }
            }
        }
        // A scratch vector kept by the shard: no allocation per read once it has grown.
        let mut accepted: Vec<Envelope> = std::mem::take(&mut self.accepted);
        let (mut n_env, mut n_bytes) = ([0u64; 3], [0u64; 3]);
        let mut frames = 0u64;
        let mut close: Option<Reason> = None;
        let mut wake = false;
        let mut hello = None;
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        loop {
            // Envelopes are handled here as they are decoded; other frames come back below.
            let frame = match c.transport.frame_or_close_with(conn, &mut |env| {
                frames += 1;
                match c.session.on_envelope(now.mono_us) {
                    Admit::Close(r) => {
                        close = Some(r);
                        return ControlFlow::Break(None);
                    }
                    Admit::Nack(r) => {
                        nack(&mut c.a.ctrl, &self.m, c.a.agent, &env, r);
                        wake = true;
                    }
                    Admit::Accept => {
                        let Some(contract) = c.a.contract.as_ref() else {
                            return ControlFlow::Continue(());
                        };
                        if let Err(r) = check_ingress(&env, contract, now.unix_ms) {
                            nack(&mut c.a.ctrl, &self.m, c.a.agent, &env, r);
                            wake = true;
                            return ControlFlow::Continue(());
                        }
                        #[cfg(feature = "fault-injection")]
                        let env = {
                            let mut env = env;
                            super::fault::at_ingress(&mut env);
                            env
                        };
                        let k = env.class() as usize;
                        n_env[k] += 1;
                        n_bytes[k] += env.immutable.len() as u64;
                        accepted.push(env);
                    }
                }
                ControlFlow::Continue(())
            }) {
                Ok(Some(f)) => f,
                // No frame left, or an envelope's session rule closes the session.
                Ok(None) => break,
                Err(r) => {
                    close = Some(r);
                    break;
                }
            };
            frames += 1;
            match c.session.on_frame(&frame, now.mono_us) {
                Admit::Close(r) => {
                    close = Some(r);
                    break;
                }
                // Only envelopes are NACKed by the session rules: they were handled as they
                // were decoded.
                Admit::Nack(_) => continue,
                Admit::Accept => {}
            }
            match frame {
                Frame::Hello(h) => {
                    // Negotiated below, once the borrow of this connection ends.
                    hello = Some(h);
                    break;
                }
                // Handled above as they were decoded.
                Frame::Envelope(_) => {}
                Frame::Ack(a) => {
                    let was_full = c.window_full();
                    let (mut known, mut unknown) = (0u64, 0u64);
                    for id in a.ids() {
                        match c.a.inflight.settle(id, true, &mut self.released) {
                            Settled::Known => known += 1,
                            Settled::Unknown => unknown += 1,
                        }
                    }
                    self.m.acks_in.increment(known);
                    if known > 0 {
                        c.a.last_ack_us = now.mono_us;
                    }
                    if unknown > 0 {
                        self.m.unknown_acks.increment(unknown);
                    }
                    if was_full && !c.a.outq.is_empty() {
                        wake = true;
                    }
                }
                Frame::Nack(n) => {
                    let was_full = c.window_full();
                    match c.a.inflight.settle(n.message_id, false, &mut self.released) {
                        // The agent refused a delivered envelope: it leaves custody, counted.
                        Settled::Known => {
                            self.m
                                .dropped(n.reason().unwrap_or(Reason::PolicyViolation), 1);
                            if was_full && !c.a.outq.is_empty() {
                                wake = true;
                            }
                        }
                        Settled::Unknown => self.m.unknown_nacks.increment(1),
                    }
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
                    if let Some(rtt) = c.session.on_pong(&p, now.mono_us) {
                        self.m.rtt.record(rtt as f64 / 1e6);
                    }
                }
                Frame::Close(_) => {
                    close = Some(Reason::Normal);
                    break;
                }
                Frame::Publish(_) | Frame::Lookup(_) => {
                    if let Err(r) =
                        directory_request(&self.cfg.agents, &self.m, &mut c.a, frame, now)
                    {
                        close = Some(r);
                        break;
                    }
                    wake = true;
                }
                // Refused by the session rules before this point.
                Frame::Welcome(_)
                | Frame::GoingAway(_)
                | Frame::Receipt(_)
                | Frame::LinkHello(_)
                | Frame::LinkAck(_)
                | Frame::LinkNack(_)
                | Frame::Presence(_)
                | Frame::LinkReceipt(_)
                | Frame::Directory(_) => {}
            }
        }
        for k in 0..3 {
            if n_env[k] > 0 {
                self.m.envelopes_in[k].increment(n_env[k]);
                self.m.bytes_in[k].increment(n_bytes[k]);
            }
        }
        let frame_bytes = c.transport.take_frame_bytes();
        // Records that carried no frame (KeyUpdates, empty records) cost like frames.
        frames += c.transport.take_control_records();
        // After the peer's close_notify nothing more is read: the session ends.
        if c.transport.peer_closed() && close.is_none() && !c.closing {
            close = Some(if c.transport.has_partial_frame() {
                Reason::TruncatedFrame
            } else {
                Reason::Normal
            });
        }
        if frames > 0 {
            if let Some(b) = c.a.bucket_frames.as_mut() {
                b.spend(frames, now.mono_us);
            }
            if let Some(b) = c.a.bucket_bytes.as_mut() {
                b.spend(frame_bytes, now.mono_us);
            }
        }
        if wake {
            self.wake_writer(conn);
        }
        // Envelopes read before a CLOSE or a bad frame are routed, and their ACKs queued, before
        // the session's CLOSE (nothing is written after it).
        for env in accepted.drain(..) {
            self.route_from(conn, env.message_id(), env, now);
        }
        if let Some(r) = close {
            self.close(conn, r, now);
        }
        if let Some(h) = hello {
            self.on_hello(conn, &h, now);
            // Frames pipelined behind HELLO are read once the session is up.
            if self.conns.get(&conn).is_some_and(|c| !c.closing) {
                self.process_input(conn, now);
            }
        }
        if accepted.capacity() > self.accepted.capacity() {
            self.accepted = accepted;
        }
    }

    /// Ends the session with `reason`: CLOSE is queued (when TLS is up; ACKs owed go first and
    /// nothing follows it but close_notify) and the writer shuts the socket down once flushed.
    /// Counts the close and logs one line.
    pub(super) fn close(&mut self, conn: ConnId, reason: Reason, now: Now) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.closing {
            return;
        }
        let was = c.session.state();
        c.session.close(reason);
        c.closing = true;
        // A closing session ends where it is.
        c.moving_to = None;
        c.closing_since_us = now.mono_us;
        // A relay link never leaves the session's handshake state: it is up or not.
        let handshake = match c.link.as_ref() {
            Some(l) => !l.up,
            None => was == SessionState::Handshake,
        };
        if handshake {
            self.m.handshake_failed(reason);
        } else {
            self.m.closed(reason);
        }
        if reason == Reason::Normal {
            tracing::debug!(conn, agent = ?c.a.agent, "session closed");
        } else {
            tracing::info!(conn, agent = ?c.a.agent, reason = reason.label(), "session closed");
        }
        if !c.transport.is_open() || reason == Reason::WriteTimeout {
            // Nothing can be said to this peer: no TLS yet, or it does not read.
            self.actions.push_back(Action::Shutdown(conn));
            return;
        }
        c.encode_acks(&self.m);
        Shard::encode_link_acks(c);
        Frame::Close(Close::new(reason, reason.label())).encode(&mut c.a.ctrl);
        self.wake_writer(conn);
    }

    /// Runs a connection's TLS handshake on what it read: `Some(true)` once it is open,
    /// `Some(false)` while it goes on, `None` when it failed (the connection is shut down).
    pub(super) fn advance_tls(&mut self, conn: ConnId, now: Now) -> Option<bool> {
        let c = self.conns.get_mut(&conn)?;
        match c.transport.advance_handshake() {
            Err(e) => {
                tracing::info!(conn, error = %e, "TLS failure");
                c.closing = true;
                c.closing_since_us = now.mono_us;
                c.session.close(Reason::ProtocolError);
                let r = if c.link.is_some() {
                    Reason::NotAdmitted
                } else {
                    Reason::ProtocolError
                };
                self.m.handshake_failed(r);
                self.actions.push_back(Action::Shutdown(conn));
                None
            }
            Ok(open) => {
                if c.transport.has_handshake_output() {
                    self.actions.push_back(Action::WakeWriter(conn));
                }
                Some(open)
            }
        }
    }

    /// Forgets a connection whose reader ended; what it held custody of is kept for the agent's
    /// next session.
    pub(super) fn teardown(&mut self, conn: ConnId, now: Now) {
        let Some(mut c) = self.conns.remove(&conn) else {
            return;
        };
        self.actions.push_back(Action::Shutdown(conn));
        if c.link.is_some() {
            self.link_teardown(c, now);
            return;
        }
        let paced = std::mem::take(&mut c.a.paced_sources);
        self.resume_all(&paced);
        if !c.closing {
            let r = if c.transport.has_partial_frame() {
                Reason::TruncatedFrame
            } else {
                Reason::Normal
            };
            if c.session.state() == SessionState::Handshake {
                self.m.handshake_failed(r);
            } else {
                self.m.closed(r);
            }
            c.session.close(r);
        }
        let Some(agent) = c.a.agent else { return };
        if !c.a.attached {
            return;
        }
        self.m.sessions_active.decrement(1.0);
        if self.by_agent.get(&agent) == Some(&conn) {
            self.by_agent.remove(&agent);
        }
        if self.directory.detach(&agent, c.a.seq) {
            for k in (0..self.ncores).filter(|k| *k != self.id) {
                self.outbox.push(
                    k,
                    super::msg::CoreMsg::Detach {
                        agent,
                        seq: c.a.seq,
                    },
                );
            }
        }
        if !c.a.handed_over {
            // Ahead of anything kept for the agent while this session was closing: order per
            // source holds.
            let custody = c.take_custody(&self.m, &mut self.released);
            let left_out = self.held.keep_first(agent, custody);
            if left_out > 0 {
                self.m.dropped(Reason::DestinationUnavailable, left_out);
            }
            // Attached to another relay already: what it left here follows it.
            self.kept_for(&agent);
        }
    }
}

/// Queues a NACK for `env` and counts the refusal.
pub(super) fn nack(
    ctrl: &mut bytes::BytesMut,
    m: &crate::metrics::CoreMetrics,
    agent: Option<AgentId>,
    env: &Envelope,
    reason: Reason,
) {
    m.refused(reason);
    tracing::debug!(agent = ?agent, msg = %env.message_id(), reason = reason.label(), "envelope refused");
    Frame::Nack(Nack::new(env.message_id(), reason)).encode(ctrl);
}

/// Directory requests one session may make per second; beyond it they are answered
/// `rate_limited`, and beyond four times as many the session is closed `rate_limited`.
const DIR_REQUESTS_PER_S: u32 = 32;
/// A session may publish its bundle once per this many microseconds; sooner is refused.
const PUBLISH_INTERVAL_US: u64 = 1_000_000;
/// Largest DIRECTORY answer (bundles beyond it wait for the next page).
const MAX_DIRECTORY_ANSWER: usize = 64 * 1024;
/// The session's pending control frames above which a directory request ends it: a peer that
/// asks without reading the answers.
const MAX_CTRL_FOR_DIRECTORY: usize = 256 * 1024;

/// Answers a PUBLISH or LOOKUP (`rate_limited` beyond [`DIR_REQUESTS_PER_S`] a second). Fails
/// (the session ends with that reason) when the agent asks four times faster than that, or
/// without reading its answers.
fn directory_request(
    dir: &crate::directory::AgentDirectory,
    m: &crate::metrics::CoreMetrics,
    a: &mut super::conn::AgentSession,
    frame: Frame,
    now: Now,
) -> Result<(), Reason> {
    use crate::wire::{DirectoryAnswer, LookupKey};
    if now.mono_us.saturating_sub(a.dir_window_us) >= 1_000_000 {
        a.dir_window_us = now.mono_us;
        a.dir_requests = 0;
    }
    a.dir_requests += 1;
    if a.dir_requests > 4 * DIR_REQUESTS_PER_S || a.ctrl.len() > MAX_CTRL_FOR_DIRECTORY {
        return Err(Reason::RateLimited);
    }
    if a.dir_requests > DIR_REQUESTS_PER_S {
        let request_id = match &frame {
            Frame::Publish(p) => p.request_id,
            Frame::Lookup(l) => l.request_id,
            _ => return Ok(()),
        };
        m.directory("rate_limited");
        Frame::Directory(DirectoryAnswer {
            request_id,
            code: Reason::RateLimited as u16,
            more: false,
            bundles: Vec::new(),
        })
        .encode(&mut a.ctrl);
        return Ok(());
    }
    let Some(agent) = a.agent else {
        return Err(Reason::UnexpectedFrame);
    };
    let max_frame = a
        .contract
        .as_ref()
        .map_or(4096, |w| w.max_frame as usize)
        .min(MAX_DIRECTORY_ANSWER);
    let answer = match frame {
        Frame::Publish(p) => {
            let result = if a.last_publish_us != 0
                && now.mono_us.saturating_sub(a.last_publish_us) < PUBLISH_INTERVAL_US
            {
                Err(Reason::RateLimited)
            } else {
                a.last_publish_us = now.mono_us;
                dir.publish(agent, p.bundle, now.unix_ms)
            };
            m.directory(if result.is_ok() { "publish" } else { "refused" });
            DirectoryAnswer {
                request_id: p.request_id,
                code: result.err().map_or(0, |r| r as u16),
                more: false,
                bundles: Vec::new(),
            }
        }
        Frame::Lookup(l) => {
            m.directory("lookup");
            let (bundles, more) = match &l.key {
                LookupKey::Agent(id) => {
                    (dir.by_agent(id, now.unix_ms).into_iter().collect(), false)
                }
                LookupKey::Schema { schema, after } => dir.by_schema(
                    schema,
                    after,
                    l.limit as usize,
                    max_frame.saturating_sub(64),
                    now.unix_ms,
                ),
            };
            DirectoryAnswer {
                request_id: l.request_id,
                code: 0,
                more,
                bundles,
            }
        }
        _ => return Ok(()),
    };
    Frame::Directory(answer).encode(&mut a.ctrl);
    Ok(())
}

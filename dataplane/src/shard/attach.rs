//! Attach and ownership: which core owns which agent's session.
//!
//! When a session completes HELLO its core takes a relay-wide attach sequence number, records
//! itself in its directory and sends `Attach` to every other core; WELCOME goes out only after
//! every core answered (`AttachAck`), so no sender can be told `destination_unavailable` by a
//! core that has not heard of the agent yet. For one agent id the highest sequence wins: a core
//! that learns of a newer attachment closes its older session (`session_replaced`) and sends
//! that session's custody to the new owner. Envelopes held for an absent agent follow it the
//! same way.
//!
//! A session lives on its agent's home core ([`crate::routing::home_core`]): one that completes
//! HELLO elsewhere moves there first (`ReadGate::Move`, `CoreMsg::Adopt`), so an agent's queue,
//! custody and order have one owner wherever its connection landed.

use super::msg::CoreMsg;
use super::{dest_agent, Conn, ConnId, Now, Shard};
use crate::policy::TokenBucket;
use crate::routing::{Attach, Location};
use crate::signaling::negotiate;
use crate::wire::{AgentId, Envelope, Frame, Hello, Reason};

impl Shard {
    /// HELLO from an agent whose TLS identity is known: negotiate the contract and attach.
    pub(super) fn on_hello(&mut self, conn: ConnId, hello: &Hello, now: Now) {
        let Some(agent) = self.conns.get(&conn).and_then(|c| c.a.agent) else {
            return;
        };
        if let Err(r) = self.settings.admission.admit(&agent) {
            self.close(conn, r, now);
            return;
        }
        if self.budget.state >= super::budget::Overload::Shed {
            self.close(conn, Reason::Overloaded, now);
            return;
        }
        let sid = self.seq.next_session();
        let welcome = match negotiate(
            hello,
            &self.settings.contract,
            sid,
            self.cfg.relay_id,
            agent,
        ) {
            Ok(w) => w,
            Err(r) => {
                self.close(conn, r, now);
                return;
            }
        };
        let seq = self.seq.next_attach();
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.session.established(&welcome, now.mono_us);
        c.transport.set_max_frame(welcome.max_frame as usize);
        let t = now.mono_us;
        let burst_frames = (welcome.rate_frames as u64 / 10).max(64);
        let burst_bytes = (welcome.rate_bytes / 10).max(welcome.max_frame as u64 * 4);
        c.a.bucket_frames = Some(TokenBucket::new(
            welcome.rate_frames as u64,
            burst_frames,
            t,
        ));
        c.a.bucket_bytes = Some(TokenBucket::new(welcome.rate_bytes, burst_bytes, t));
        c.a.contract = Some(welcome);
        c.a.seq = seq;
        let home = crate::routing::home_core(&agent, self.ncores);
        if home != self.id {
            // The session lives on its agent's home core: the reader's gate hands it over, and
            // that core attaches it and sends WELCOME.
            c.moving_to = Some(home);
            return;
        }
        self.attach_here(conn, now);
    }

    /// Attaches an established session on this core (its agent's home): it becomes the
    /// agent's session, inherits what was kept for the agent, and gets WELCOME once every core
    /// knows.
    pub(super) fn attach_here(&mut self, conn: ConnId, now: Now) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let (Some(agent), seq) = (c.a.agent, c.a.seq) else {
            return;
        };
        let sid = c.a.contract.as_ref().map_or(0, |w| w.session_id);
        let loc = Location { core: self.id, seq };
        match self.directory.attach(agent, loc) {
            Attach::Replaced(old) if old.core == self.id => {
                for env in self.retire_local(&agent, old.seq, now) {
                    self.enqueue_or_keep(conn, agent, env);
                }
            }
            Attach::Stale => {
                // A newer session of the agent attached while this one moved here.
                self.close(conn, Reason::SessionReplaced, now);
                return;
            }
            _ => {}
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.a.attached = true;
        }
        self.by_agent.insert(agent, conn);
        self.announce_presence(&[agent], now);
        if let Some(kept) = self.held.take(&agent) {
            self.m.redelivered.increment(kept.len() as u64);
            for env in kept {
                self.enqueue_or_keep(conn, agent, env);
            }
        }
        for k in (0..self.ncores).filter(|k| *k != self.id) {
            self.outbox.push(k, CoreMsg::Attach { agent, loc, conn });
        }
        self.m.sessions_opened.increment(1);
        self.m.sessions_active.increment(1.0);
        let role = self.conns.get(&conn).map(|c| c.role);
        tracing::debug!(conn, agent = %agent, ?role, session = sid, "session established");
        let pending = self.ncores as usize - 1;
        if let Some(c) = self.conns.get_mut(&conn) {
            c.a.attach_acks_pending = pending;
        }
        if pending == 0 {
            self.send_welcome(conn);
        }
    }

    fn send_welcome(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if let Some(w) = c.a.contract.clone() {
            Frame::Welcome(w).encode(&mut c.a.ctrl);
            c.a.welcomed = true;
            self.wake_writer(conn);
        }
    }

    pub(super) fn on_attach(&mut self, agent: AgentId, loc: Location, conn: ConnId, now: Now) {
        // Custody for the agent follows it to its new core (and leaves this core's quota).
        if let Attach::Replaced(old) = self.directory.attach(agent, loc) {
            if old.core == self.id {
                for env in self.retire_local(&agent, old.seq, now) {
                    self.released.note_moved(&env);
                    self.outbox
                        .push(loc.core, CoreMsg::Deliver { env, src: None });
                }
            }
        }
        if let Some(kept) = self.held.take(&agent) {
            self.m.redelivered.increment(kept.len() as u64);
            for env in kept {
                self.released.note_moved(&env);
                self.outbox
                    .push(loc.core, CoreMsg::Deliver { env, src: None });
            }
        }
        self.outbox.push(loc.core, CoreMsg::AttachAck { conn });
    }

    pub(super) fn on_attach_ack(&mut self, conn: ConnId, _now: Now) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.a.attach_acks_pending = c.a.attach_acks_pending.saturating_sub(1);
        if c.a.attach_acks_pending == 0 && !c.a.welcomed && !c.closing {
            self.send_welcome(conn);
        }
    }

    /// Closes the local session of `agent` with attach sequence `seq` (a newer one replaced it)
    /// and returns the envelopes it held custody of.
    fn retire_local(&mut self, agent: &AgentId, seq: u64, now: Now) -> Vec<Envelope> {
        let Some(&cid) = self.by_agent.get(agent) else {
            return Vec::new();
        };
        if self.conns.get(&cid).is_none_or(|c| c.a.seq != seq) {
            return Vec::new();
        }
        self.by_agent.remove(agent);
        self.close(cid, Reason::SessionReplaced, now);
        let Some(c) = self.conns.get_mut(&cid) else {
            return Vec::new();
        };
        c.a.handed_over = true;
        let envs = c.take_custody(&self.m, &mut self.released);
        self.resume_paced_sources(cid, true);
        self.m.redelivered.increment(envs.len() as u64);
        envs
    }

    /// Queues a custody envelope on `conn`, or keeps it for the agent when the queue refuses.
    pub(super) fn enqueue_or_keep(&mut self, conn: ConnId, agent: AgentId, env: Envelope) {
        let bytes = self.settings.limits.send_queue_bytes().saturating_mul(4);
        let refused = match self.conns.get_mut(&conn) {
            Some(c) => c
                .enqueue(env, usize::MAX, bytes, true)
                .err()
                .map(|(_, e)| e),
            None => Some(env),
        };
        if let Some(env) = refused {
            self.keep(agent, env);
        }
    }

    /// Holds an envelope for a disconnected agent (best-effort ones are dropped, counted).
    pub(super) fn keep(&mut self, agent: AgentId, env: Envelope) {
        if self.held.keep(agent, env) {
            self.kept_for(&agent);
        } else {
            self.m.dropped(Reason::DestinationUnavailable, 1);
        }
    }

    /// Keeps custody for its absent destination agent, or drops it counted (no agent).
    pub(super) fn keep_for_destination(&mut self, env: Envelope) {
        match dest_agent(&env) {
            Some(a) => self.keep(a, env),
            None => self.m.dropped(Reason::DestinationUnavailable, 1),
        }
    }

    /// Custody held for agents that are attached here after all (it arrived while their
    /// session was closing, or between two of their sessions) goes to their queues. Run from
    /// the custody sweep.
    pub(super) fn requeue_held(&mut self) {
        let here: Vec<(AgentId, ConnId)> = self
            .held
            .agents()
            .filter_map(|a| self.serving(&a).map(|c| (a, c.id)))
            .collect();
        for (agent, cid) in here {
            if let Some(kept) = self.held.take(&agent) {
                for env in kept {
                    self.enqueue_or_keep(cid, agent, env);
                }
            }
        }
    }
}

impl Conn {
    /// Puts an envelope on this agent's send queue, within the queue's bounds (and the source's
    /// quota, as the caller found it). `Ok(true)`: the queue is past half its bounds, and senders
    /// should slow down. Reasons in the order of `docs/PROTOCOL.md` §4.
    // The refused envelope travels back by value: no allocation on the refusal path.
    #[allow(clippy::result_large_err)]
    #[inline]
    pub(super) fn enqueue(
        &mut self,
        env: Envelope,
        max_envelopes: usize,
        max_bytes: usize,
        within_quota: bool,
    ) -> Result<bool, (Reason, Envelope)> {
        if !self.takes_envelopes() {
            return Err((Reason::DestinationUnavailable, env));
        }
        if self
            .a
            .contract
            .as_ref()
            .is_some_and(|c| env.frame_len() > c.max_frame as usize)
        {
            return Err((Reason::TooLargeForDestination, env));
        }
        if !within_quota {
            return Err((Reason::QuotaExceeded, env));
        }
        self.a.outq.push(env, max_envelopes, max_bytes)
    }
}

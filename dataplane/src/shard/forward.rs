//! Forwarding and verdicts: where an accepted envelope goes, and what its source hears back.
//!
//! ```text
//! accepted envelope --route--> Local:   destination's send queue on this core  --verdict now
//!                          \-> Core(k): Deliver to core k --> send queue there  --Verdict back
//!                          \-> Refuse:  verdict now (NACK, or a counted drop for best-effort)
//! ```
//!
//! A verdict ACKs an at-least-once envelope (custody taken; ACKs are batched), or refuses it:
//! a NACK, except that a best-effort envelope that cannot be delivered is dropped and counted
//! (`docs/PROTOCOL.md` §2, NACK). A congested destination (send queue past half its bounds) pauses
//! its senders' readers until it drains below a quarter (`Resume`), so TCP pushes back on them;
//! the pause runs out after [`PACE_MAX_US`] if no `Resume` comes.

use super::budget::Overload;
use super::conn::{PACED_SOURCES_MAX, PACE_MAX_US};
use super::dedup::Marking;
use super::msg::{CoreMsg, Src, Verdict};
use super::{dest_agent, Action, ConnId, Now, Shard};
use crate::routing::Route;
use crate::wire::{features, DeliveryClass, Envelope, MessageId, Reason};

/// Reasons that are about the envelope itself; best-effort envelopes are NACKed only for these.
fn about_the_envelope(r: Reason) -> bool {
    matches!(r, Reason::TooLargeForDestination)
}

impl Shard {
    /// Routes an envelope accepted from connection `src`, whose verdict is answered by `tag`
    /// (see [`Src`]).
    pub(super) fn route_from(&mut self, src: ConnId, tag: MessageId, env: Envelope, now: Now) {
        let id = tag;
        // An agent's envelope (not a link's), and whether its answers may wait.
        let (from_agent, hold) = self.conns.get(&src).map_or((false, false), |c| {
            (c.link.is_none(), c.a.answers_may_wait())
        });
        let me = Src {
            core: self.id,
            conn: src,
            tag,
            relay: false,
            len: env.frame_len() as u32,
            hold,
        };
        let class = env.class();
        let len_of_later = env.frame_len();
        // Over the memory budget: shed best-effort first, then refuse new at-least-once.
        let state = self.budget.state;
        if state >= Overload::Shed && class == DeliveryClass::BestEffort
            || state == Overload::Refuse
        {
            self.settle(src, id, class, Err(Reason::Overloaded), None, now);
            return;
        }
        // An agent's envelope for an agent attached to another relay of the fleet.
        let env = if from_agent && self.mesh.snap.is_some() {
            match self.offer_to_fleet(Some(me), env, now) {
                super::mesh::ToFleet::Here(env) => env,
                super::mesh::ToFleet::Done(r) => {
                    self.settle(src, id, class, r, None, now);
                    return;
                }
                super::mesh::ToFleet::Later => {
                    if let Some(c) = self.conns.get_mut(&src) {
                        c.a.awaiting += 1;
                        c.a.awaiting_bytes += len_of_later;
                    }
                    return;
                }
            }
        } else {
            env
        };
        let route = self.directory.route(&env, self.id, self.ncores);
        if class == DeliveryClass::Durable && !matches!(route, Route::Refuse(_)) {
            // Answered once the home core's store synced it: counted like an envelope handed
            // to another core, so the source's reader stops at its send window.
            if let Some(c) = self.conns.get_mut(&src) {
                c.a.awaiting += 1;
                c.a.awaiting_bytes += env.frame_len();
            }
        }
        match route {
            Route::Local if class == DeliveryClass::Durable => {
                let len = env.frame_len();
                if let Err(r) = self.store_durable(env, me, now) {
                    self.settle(src, id, class, Err(r), Some(len), now);
                }
            }
            Route::Local => {
                let result = self.accept_local(env, me, None);
                self.settle(src, id, class, result, None, now);
            }
            Route::Core(k) => {
                if class != DeliveryClass::Durable {
                    if let Some(c) = self.conns.get_mut(&src) {
                        c.a.awaiting += 1;
                        c.a.awaiting_bytes += env.frame_len();
                    }
                }
                self.outbox.deliver(k, env, Some(me));
                self.handed_off += 1;
            }
            Route::Refuse(r) => self.settle(src, id, class, Err(r), None, now),
        }
    }

    /// New work from the source connection `src` (core, connection) for a destination on this
    /// core: a known duplicate is answered as one (`docs/PROTOCOL.md` §3: ACKed again and not
    /// queued twice; a best-effort one is dropped, counted `duplicate`); anything else goes on
    /// the destination's send queue within the source's quota, or is refused with `refuse`
    /// when given (a core over its memory budget).
    fn accept_local(
        &mut self,
        env: Envelope,
        src: Src,
        refuse: Option<Reason>,
    ) -> Result<bool, Reason> {
        let (source, id, len, class) =
            (env.source(), env.message_id(), env.frame_len(), env.class());
        let marking = self.dedup.check_mark(&source, id);
        if marking == Marking::Duplicate {
            self.m.duplicates.increment(1);
            return match class {
                DeliveryClass::BestEffort => Err(Reason::Duplicate),
                _ => Ok(false),
            };
        }
        let result = match refuse {
            Some(r) => Err(r),
            None => {
                let within_quota = self.sources.hold_within(source, len, self.source_quota());
                self.enqueue_local(env, within_quota, src)
                    .map_err(|(r, _)| {
                        self.sources.unhold(&source, len);
                        r
                    })
            }
        };
        match result {
            Ok(_) => {
                if marking == Marking::Unmarked {
                    self.dedup.mark(source, id);
                }
                self.charge((len + crate::shard::custody::HELD_ENVELOPE_OVERHEAD) as u64);
            }
            Err(_) if marking == Marking::Marked => self.dedup.forget(&source, id),
            Err(_) => {}
        }
        result
    }

    // The refused envelope travels back by value: no allocation on the refusal path.
    #[allow(clippy::result_large_err)]
    #[inline]
    fn enqueue_local(
        &mut self,
        env: Envelope,
        within_quota: bool,
        src: Src,
    ) -> Result<bool, (Reason, Envelope)> {
        let Some(dst) = dest_agent(&env) else {
            return Err((Reason::DestinationUnavailable, env));
        };
        let l = &self.settings.limits;
        let (mut max_n, mut max_b) = (l.send_queue_envelopes, l.send_queue_bytes());
        if src.relay {
            // A relay link cannot be paused for one destination: relays are held back by their
            // link windows, and may fill a destination's queue to four times its bounds.
            (max_n, max_b) = (max_n * 4, max_b * 4);
        }
        let cid = self.by_agent.get(&dst).copied();
        let present = cid.and_then(|cid| self.conns.get_mut(&cid).filter(|c| c.takes_envelopes()));
        let Some(c) = present else {
            return self.hold_for_absent(dst, env, within_quota, (max_n, max_b));
        };
        let cid = c.id;
        let r = c.enqueue(env, max_n, max_b, within_quota);
        if let Ok(true) = r {
            // Remembered so that the source resumes when this queue drains.
            let paced = &mut c.a.paced_sources;
            let src = (src.core, src.conn);
            if paced.len() < PACED_SOURCES_MAX && !paced.contains(&src) {
                paced.push(src);
            }
        }
        // The writer woken here, not by `wake_writer`: the connection is at hand.
        if r.is_ok() && !c.writer_awake {
            c.writer_awake = true;
            self.actions.push_back(Action::WakeWriter(cid));
        }
        r
    }

    /// Whether `agent` has an open session on this core (one that takes envelopes).
    fn serves(&self, agent: &crate::wire::AgentId) -> bool {
        self.serving(agent).is_some()
    }

    /// `agent`'s connection on this core, if its session takes envelopes.
    pub(super) fn serving(&self, agent: &crate::wire::AgentId) -> Option<&super::conn::Conn> {
        self.by_agent
            .get(agent)
            .and_then(|cid| self.conns.get(cid))
            .filter(|c| c.takes_envelopes())
    }

    /// Keeps new work for a destination agent that is not connected here (its home core), within
    /// the same bounds as its send queue and the source's quota; best-effort envelopes are not
    /// kept (dropped, counted `destination_unavailable`).
    // The refused envelope travels back by value: no allocation on the refusal path.
    #[allow(clippy::result_large_err)]
    fn hold_for_absent(
        &mut self,
        dst: crate::wire::AgentId,
        env: Envelope,
        within_quota: bool,
        (max_n, max_b): (usize, usize),
    ) -> Result<bool, (Reason, Envelope)> {
        if env.class() == DeliveryClass::BestEffort {
            return Err((Reason::DestinationUnavailable, env));
        }
        if !within_quota {
            return Err((Reason::QuotaExceeded, env));
        }
        let cap = self.settings.limits.absent_bytes() / self.ncores.max(1) as usize;
        let cost = env.frame_len() + crate::shard::custody::HELD_ENVELOPE_OVERHEAD;
        if !self.held.admits(&dst, env.frame_len(), max_n, max_b)
            || self.held.retained() + cost > cap
        {
            return Err((Reason::QueueFull, env));
        }
        self.held.keep(dst, env);
        self.kept_for(&dst);
        self.m.held_for_absent.increment(1);
        Ok(false)
    }

    /// Resumes the sources paused on `conn`'s send queue once it is below a quarter of its
    /// bounds (or at once with `now_anyway`: the session ended or handed its queue over).
    pub(super) fn resume_paced_sources(&mut self, conn: ConnId, now_anyway: bool) {
        let l = &self.settings.limits;
        let (max_n, max_b) = (l.send_queue_envelopes, l.send_queue_bytes());
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.a.paced_sources.is_empty()
            || !now_anyway && (c.a.outq.len() > max_n / 4 || c.a.outq.bytes() > max_b / 4)
        {
            return;
        }
        let paced = std::mem::take(&mut c.a.paced_sources);
        self.resume_all(&paced);
    }

    /// Resumes each paused source (core, connection).
    pub(super) fn resume_all(&mut self, sources: &[(u16, ConnId)]) {
        for &(core, conn) in sources {
            if core == self.id {
                self.on_resume(conn);
            } else {
                self.outbox.push(core, CoreMsg::Resume { conn });
            }
        }
    }

    /// A destination this connection's source was paused on drained.
    pub(super) fn on_resume(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            if c.a.paced_until_us != 0 {
                c.a.paced_until_us = 0;
                self.wake_reader(conn);
            }
        }
    }

    /// An envelope from another core (a source's, or custody following its agent).
    pub(super) fn on_deliver(&mut self, env: Envelope, src: Option<Src>, now: Now) {
        let class = env.class();
        // An agent with an open session here is attached here (sessions attach only on their
        // home core, and a newer one retires the older first): only an absent one is looked
        // up.
        let moved = dest_agent(&env)
            .filter(|a| !self.serves(a))
            .and_then(|a| self.directory.locate(&a))
            .filter(|l| l.core != self.id);
        if let Some(loc) = moved {
            // The agent moved to another core since the sender looked: follow it.
            self.outbox.deliver(loc.core, env, src);
            return;
        }
        let Some(src) = src else {
            // Custody handed over from another core: already ACKed, so never refused for room.
            // It joins this core's quota, and the agent's queue if the agent is here (else it is
            // held for it).
            self.sources.hold(env.source(), env.frame_len());
            match dest_agent(&env).and_then(|a| self.by_agent.get(&a).map(|c| (a, *c))) {
                Some((agent, cid)) => self.enqueue_or_keep(cid, agent, env),
                None => self.keep_for_destination(env),
            }
            return;
        };
        if class == DeliveryClass::Durable {
            if let Err(r) = self.store_durable(env, src, now) {
                self.verdict_to(src, class, Err(r), now);
            }
            return;
        }
        // New work from another core meets this core's budget too.
        let refuse = (self.budget.state == Overload::Refuse).then_some(Reason::Overloaded);
        let result = self.accept_local(env, src, refuse);
        self.verdict_to(src, class, result, now);
    }

    /// Sends the verdict on an envelope to its source (with the length it had when it arrived,
    /// which is what the source counted while it waited).
    pub(super) fn verdict_to(
        &mut self,
        src: Src,
        class: DeliveryClass,
        result: Result<bool, Reason>,
        now: Now,
    ) {
        let v = Verdict {
            conn: src.conn,
            id: src.tag,
            len: src.len,
            class_acked: class != DeliveryClass::BestEffort,
            result,
        };
        if src.core == self.id {
            self.on_verdict(v, now);
        } else if src.hold && v.result == Ok(false) {
            // Only a plain "taken": a congestion verdict must not arrive after the `Resume`
            // that lifts it, nor a refusal wait.
            self.hold_verdict(src.core, v, now);
        } else {
            self.outbox.verdict(src.core, v);
        }
    }

    /// A verdict (from another core, or this one) for one of this core's sources.
    pub(super) fn on_verdict(&mut self, v: Verdict, now: Now) {
        let class = if v.class_acked {
            DeliveryClass::AtLeastOnce
        } else {
            DeliveryClass::BestEffort
        };
        self.settle(v.conn, v.id, class, v.result, Some(v.len as usize), now);
    }

    /// Applies a verdict to its source connection: ACK (batched), NACK or counted drop, and
    /// congestion. `remote`: the envelope's length, when it went to another core.
    fn settle(
        &mut self,
        conn: ConnId,
        id: MessageId,
        class: DeliveryClass,
        result: Result<bool, Reason>,
        remote: Option<usize>,
        now: Now,
    ) {
        let awaiting_cap = self.settings.limits.send_queue_bytes();
        let Some(c) = self.conns.get_mut(&conn) else {
            if let Err(r) = result {
                if class == DeliveryClass::BestEffort {
                    self.m.dropped(r, 1);
                }
            }
            return;
        };
        let mut wake_reader = false;
        if let Some(len) = remote {
            if c.a
                .contract
                .as_ref()
                .is_some_and(|w| c.a.awaiting >= w.send_window)
                || c.a.awaiting_bytes >= awaiting_cap
            {
                wake_reader = true;
            }
            c.a.awaiting = c.a.awaiting.saturating_sub(1);
            c.a.awaiting_bytes = c.a.awaiting_bytes.saturating_sub(len);
        }
        if c.link.is_some() {
            self.settle_link(conn, id, result);
            if wake_reader {
                self.wake_reader(conn);
            }
            return;
        }
        let mut wake = false;
        match result {
            Ok(congested) => {
                if congested {
                    c.a.paced_until_us = now.mono_us + PACE_MAX_US;
                }
                if class != DeliveryClass::BestEffort {
                    c.a.acks_to_send.push(id);
                    // An agent with a deep window gets its ACKs in groups: held up to
                    // ACK_HOLD_MS unless enough wait or the writer runs anyway.
                    let hold = !c.writer_awake
                        && c.a.acks_to_send.len() < features::ACK_HOLD_MAX
                        && c.a.answers_may_wait();
                    if !hold {
                        wake = true;
                    } else if c.a.acks_due_us.is_none() {
                        let due = super::held_until(now);
                        c.a.acks_due_us = Some(due);
                        if self.acks_held.is_empty() {
                            self.actions.push_back(Action::Held);
                        }
                        self.acks_held.push_back((due, conn));
                    }
                }
            }
            Err(r) if class == DeliveryClass::BestEffort && !about_the_envelope(r) => {
                self.m.dropped(r, 1);
            }
            Err(r) => {
                if !c.closing {
                    self.m.refused(r);
                    tracing::debug!(agent = ?c.a.agent, msg = %id, reason = r.label(), "envelope refused");
                    crate::wire::Frame::Nack(crate::wire::Nack::new(id, r)).encode(&mut c.a.ctrl);
                    wake = true;
                }
            }
        }
        if wake {
            self.wake_writer(conn);
        }
        if wake_reader {
            self.wake_reader(conn);
        }
    }
}

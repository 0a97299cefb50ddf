//! The timer sweep (every `relay.tick_ms`) and the graceful drain.
//!
//! Per connection: a closing connection that did not finish flushing within the linger is shut
//! down; a write that has not completed within the write timeout, or a full deliver window with
//! more queued and no ACK for that long, closes the session (`write_timeout`); the session's own deadlines (`crate::session`: handshake, heartbeat PINGs,
//! dead peer, idle, key rotation, drain deadline) are applied; a draining session that has
//! settled and been quiet long enough is closed. Per shard: custody held for absent agents is
//! swept for expired envelopes once a second; what was kept since the last tick for agents that
//! presence places on another relay follows them; the gauges are set.

use super::{Action, ConnId, Now, Shard};
use crate::session::{Due, SessionState};
use crate::wire::{Frame, GoingAway, Ping, Reason};

/// How long a closing connection may take to flush before its socket is shut down.
const CLOSE_LINGER_US: u64 = 2_000_000;
/// How long a settled draining session must have been quiet before it is closed.
const DRAIN_QUIET_US: u64 = 250_000;
/// How often custody for absent agents is swept for expired envelopes.
const CUSTODY_SWEEP_US: u64 = 1_000_000;

impl Shard {
    /// The periodic sweep.
    pub fn on_tick(&mut self, now: Now) {
        self.held.set_now(now.unix_ms);
        self.sweep_store(now);
        if now.mono_us.saturating_sub(self.custody_swept_us) >= CUSTODY_SWEEP_US {
            self.custody_swept_us = now.mono_us;
            let max_age_ms = self.settings.limits.absent_max_age_s.saturating_mul(1000);
            let (expired, aged) = self
                .held
                .expire(now.unix_ms, max_age_ms, &mut self.released);
            if expired > 0 {
                self.m.dropped(Reason::Expired, expired);
            }
            if aged > 0 {
                self.m.held_age_limit.increment(aged);
                tracing::info!(
                    core = self.id,
                    envelopes = aged,
                    "kept past the age limit for absent agents: dropped"
                );
            }
            self.requeue_held();
            if self.id == 0 {
                // The directory is the relay's, shared: one core sweeps it and reports it.
                self.cfg.agents.sweep(now.unix_ms);
                let (entries, bytes) = self.cfg.agents.usage();
                metrics::gauge!(crate::metrics::DIRECTORY_ENTRIES).set(entries as f64);
                metrics::gauge!(crate::metrics::DIRECTORY_BYTES).set(bytes as f64);
            }
        }
        // What waits for a path (or for the next relay's room) tries again every tick.
        self.retry_waiting(now);
        self.refresh_presence(now);
        self.follow_kept(now);
        let write_us = self.settings.timeouts.write_us;
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            let mut closes = Vec::new();
            let mut wake = false;
            let Some(c) = self.conns.get_mut(&id) else {
                continue;
            };
            if c.closing {
                if now.mono_us.saturating_sub(c.closing_since_us) > CLOSE_LINGER_US {
                    self.actions.push_back(Action::Shutdown(id));
                }
                continue;
            }
            // Not reading: a socket write pending for the write timeout; or a deliver window that
            // stayed full, with more queued, and no ACK for that long (the peer's kernel buffers
            // can hold a whole window, so its writes need not block).
            let write_stuck =
                c.write_since_us > 0 && now.mono_us.saturating_sub(c.write_since_us) >= write_us;
            let window_stuck = !c.a.outq.is_empty()
                && c.window_full()
                && now.mono_us.saturating_sub(c.a.last_ack_us) >= write_us;
            if write_stuck || window_stuck {
                self.close(id, Reason::WriteTimeout, now);
                continue;
            }
            if c.link.is_some() {
                self.link_tick(id, now);
                continue;
            }
            while let Some(due) = c.session.poll(now.mono_us) {
                match due {
                    Due::Ping => {
                        Frame::Ping(Ping {
                            timestamp_us: now.mono_us,
                        })
                        .encode(&mut c.a.ctrl);
                        wake = true;
                    }
                    Due::KeyUpdate => {
                        if c.transport.is_open() {
                            c.key_update_due = true;
                            wake = true;
                        }
                    }
                    Due::Close(r) => {
                        closes.push(r);
                        break;
                    }
                }
            }
            // A draining session closes once nothing is outstanding and the agent has been
            // quiet long enough for what it sent before GOING_AWAY to have arrived.
            if closes.is_empty()
                && c.session.state() == SessionState::Draining
                && c.settled()
                && c.session.quiet_us(now.mono_us) >= DRAIN_QUIET_US
            {
                closes.push(Reason::ShuttingDown);
            }
            if wake {
                self.wake_writer(id);
            }
            if let Some(r) = closes.first() {
                self.close(id, *r, now);
            }
        }
        // Envelopes held a whole tick stop pinning the buffers they were read from.
        let mut unshared = 0;
        for c in self.conns.values_mut() {
            unshared += c.a.outq.unshare() + c.a.inflight.unshare();
        }
        if unshared > 0 {
            self.m.unshared.increment(unshared as u64);
        }
        let (queued, inflight) = self.custody_counts();
        self.m.queue_depth.set(queued as f64);
        self.m.inflight.set(inflight as f64);
        self.m.held.set(self.held.len() as f64);
        let used = self.usage();
        self.m.memory_used.set(used as f64);
        if let Some(state) = self.budget.tick(used) {
            self.overload_changed(state);
        }
    }

    /// Whether this shard finished draining (no connection left).
    pub fn drained(&self) -> bool {
        // Relay links stay until what they carry for this relay's agents is answered (the
        // engine's drain deadline ends a peer that never answers).
        self.draining
            && self.fleet_waiting() == 0
            && self
                .conns
                .values()
                .all(|c| c.link.is_some() && c.a.outq.is_empty() && c.a.inflight.is_empty())
    }

    /// Starts a graceful drain: GOING_AWAY to every established session, handshakes closed.
    pub(super) fn start_drain(&mut self, now: Now) {
        if std::mem::replace(&mut self.draining, true) {
            return;
        }
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        tracing::info!(core = self.id, sessions = ids.len(), "draining");
        for id in ids {
            let Some(c) = self.conns.get_mut(&id) else {
                continue;
            };
            if c.link.is_some() {
                continue;
            }
            if c.session.start_drain(now.mono_us) {
                let ms = c.session.drain_left_ms(now.mono_us);
                Frame::GoingAway(GoingAway {
                    code: Reason::ShuttingDown as u16,
                    drain_ms: ms,
                    redirect: String::new(),
                })
                .encode(&mut c.a.ctrl);
                self.wake_writer(id);
            } else {
                self.close(id, Reason::ShuttingDown, now);
            }
        }
    }
}

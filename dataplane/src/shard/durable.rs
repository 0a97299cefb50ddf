//! The durable class: envelopes written to this core's store log and synced before the relay
//! ACKs them.
//!
//! ```text
//! durable envelope at its home core --checks--> Log::append (pending, charged)
//!     --LogAction Create/Write/Sync on the core's ring--> on_store_done
//!     --durable--> destination's send queue, or kept for it --> ACK to the source (Verdict)
//!     --failed---> NACK store_unavailable to the source
//! destination ACKs it / it expires --Released--> Log::release (a released record)
//! ```
//!
//! The home core writes: the envelope's queue, bounds and order live there, so the verdict
//! needs no second hop. A durable envelope enters its destination's queue only once it is on
//! disk (nothing is delivered that a crash could take back), so an at-least-once envelope sent
//! after a durable one may overtake it.
//!
//! Faults: an operation that fails (a full disk, an I/O error) fails every envelope not yet
//! synced and the store refuses durable envelopes (`store_unavailable`) until a retry creates a
//! new segment; an operation that runs longer than `store.stall_ms` (seen by the sweep: file
//! operations are never raced against a timer) refuses new durable envelopes until it completes.
//! At-least-once and best-effort envelopes never wait for the store.

use std::collections::HashMap;

use super::budget::Overload;
use super::msg::{CoreMsg, Src};
use super::{dest_agent, Action, Now, Shard};
use crate::store::log::{Log, LogAction};
use crate::wire::{AgentId, DeliveryClass, Envelope, MessageId, Reason};

/// How often a failed store tries a new segment.
const RETRY_US: u64 = 1_000_000;

/// Memory one stored envelope's entry in the id index costs.
pub(crate) const STORED_ID_BYTES: usize = 96;

/// What one core's store starts with: its log (with the segments recovery gave it), the
/// envelopes recovered for agents homed on it, and its sequence numbers.
pub struct ShardStore {
    pub log: Log,
    /// The first sequence number this core gives out; then every `seq_step`-th.
    pub first_seq: u64,
    pub seq_step: u64,
    /// Live envelopes recovered for agents whose home is this core, in store order.
    pub recovered: Vec<Envelope>,
    /// Duplicate windows recovered (the same for every core).
    pub windows: std::sync::Arc<[crate::store::record::WindowRecord]>,
    /// An operation running longer than this (microseconds) makes the store refuse durable
    /// envelopes until it completes.
    pub stall_us: u64,
}

/// Whether the store takes durable envelopes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreState {
    Ok = 0,
    /// An operation runs past `stall_us`.
    Stalled = 1,
    /// An operation failed; a retry is due.
    Failed = 2,
}

struct Pending {
    env: Envelope,
    src: Src,
}

pub(crate) struct Durable {
    log: Log,
    next_seq: u64,
    step: u64,
    stall_us: u64,
    pending: HashMap<u64, Pending, crate::shard::hasher::MapHasher>,
    /// Per destination: envelopes and frame bytes waiting for their sync.
    pending_dest: HashMap<AgentId, (usize, usize), crate::shard::hasher::MapHasher>,
    pending_bytes: usize,
    /// Every envelope in the store or on its way, by (source, message id): its sequence number
    /// and whether it is synced. Catches resends of what is still stored, also after a restart.
    ids: HashMap<(AgentId, MessageId), (u64, bool), crate::shard::hasher::MapHasher>,
    /// Scratch for the sequence numbers of a released record.
    seqs: Vec<u64>,
    state: StoreState,
    /// Log counters already added to the metrics (copied, removed).
    counted: (u64, u64),
    failed_at_us: u64,
    /// Unix milliseconds of the last event (segment headers and retries).
    now_ms: u64,
    m: crate::metrics::StoreMetrics,
}

impl Durable {
    /// Ids of released envelopes are not removed one by one (a lookup checks that the log
    /// still holds the envelope): every so often in one pass, so the map stays within twice
    /// what is stored.
    fn prune_ids(&mut self) {
        if self.ids.len() > 2 * self.log.live() + 1024 {
            let log = &self.log;
            self.ids.retain(|_, (seq, _)| log.holds(*seq));
        }
    }

    pub(crate) fn new(s: ShardStore, core: u16) -> (Self, Vec<Envelope>) {
        let (next_seq, step) = (s.first_seq.max(1), s.seq_step.max(1));
        let mut log = s.log;
        log.set_seqs(next_seq, step);
        let d = Durable {
            log,
            next_seq,
            step,
            stall_us: s.stall_us.max(1),
            pending: HashMap::default(),
            pending_dest: HashMap::default(),
            pending_bytes: 0,
            ids: HashMap::default(),
            seqs: Vec::new(),
            state: StoreState::Ok,
            counted: (0, 0),
            failed_at_us: 0,
            now_ms: 0,
            m: crate::metrics::StoreMetrics::new(core),
        };
        (d, s.recovered)
    }

    /// Bytes of envelopes waiting for their sync (frames and decoded forms) and of the id index
    /// (charged to the memory budget).
    pub(crate) fn pending_bytes(&self) -> usize {
        self.pending_bytes
            + self.pending.len() * crate::shard::custody::HELD_ENVELOPE_OVERHEAD
            + self.log.pending_bytes()
            + self.ids.len() * STORED_ID_BYTES
    }

    /// Back to taking durable envelopes once the fault is gone: a stall when no operation runs
    /// past `stall_us` any more, a failure when the segment appends go to exists again.
    fn recover_state(&mut self, core: u16, now_us: u64) {
        let busy = self
            .log
            .busy_for(now_us)
            .max(self.log.side_busy_for(now_us));
        match self.state {
            StoreState::Stalled
                if busy.is_none_or(|b| b < self.stall_us) && !self.log.is_failed() =>
            {
                tracing::warn!(
                    core,
                    "store operation completed: durable envelopes accepted again"
                );
                self.state = StoreState::Ok;
            }
            StoreState::Failed if self.log.healthy() => {
                tracing::warn!(core, "store writes again: durable envelopes accepted");
                self.state = StoreState::Ok;
            }
            _ => {}
        }
    }

    fn pending_for(&self, a: &AgentId) -> (usize, usize) {
        self.pending_dest.get(a).copied().unwrap_or((0, 0))
    }
}

impl Shard {
    /// Takes a durable envelope from `src` (core, connection) for its destination homed here:
    /// checks it like any other, appends it to the log, and answers the source once it is
    /// synced (or failed). `Err`: refused now.
    pub(super) fn store_durable(
        &mut self,
        env: Envelope,
        src: Src,
        now: Now,
    ) -> Result<(), Reason> {
        if self.budget.state == Overload::Refuse {
            return Err(Reason::Overloaded);
        }
        let Some(d) = self.durable.as_ref() else {
            return Err(Reason::ClassNotAllowed);
        };
        // A resend of an envelope still stored (ACKed again once it is synced, never stored
        // twice), or of one the window remembers: ACKed again.
        let key = (env.source(), env.message_id());
        let stored = d
            .ids
            .get(&key)
            .filter(|(seq, _)| d.log.holds(*seq))
            .map(|&(_, synced)| synced);
        if stored.is_some() || self.dedup.seen(&key.0, key.1) == super::dedup::Seen::Duplicate {
            self.m.duplicates.increment(1);
            if stored == Some(false) {
                return Err(Reason::StoreUnavailable);
            }
            self.verdict_to(src, DeliveryClass::Durable, Ok(false), now);
            return Ok(());
        }
        let Some(dst) = dest_agent(&env) else {
            return Err(Reason::DestinationUnavailable);
        };
        let l = &self.settings.limits;
        let (max_n, max_b) = (l.send_queue_envelopes, l.send_queue_bytes());
        let len = env.frame_len();
        let (pn, pb) = d.pending_for(&dst);
        let present = self.serving(&dst);
        match present {
            Some(c) => {
                if c.a
                    .contract
                    .as_ref()
                    .is_some_and(|w| len > w.max_frame as usize)
                {
                    return Err(Reason::TooLargeForDestination);
                }
                if !self.sources.allows(&env.source(), len, self.source_quota()) {
                    return Err(Reason::QuotaExceeded);
                }
                if c.a.outq.len() + pn >= max_n || c.a.outq.bytes() + pb + len > max_b {
                    return Err(Reason::QueueFull);
                }
            }
            None => {
                if !self.sources.allows(&env.source(), len, self.source_quota()) {
                    return Err(Reason::QuotaExceeded);
                }
                let cap = l.absent_bytes() / self.ncores.max(1) as usize;
                let cost = len + crate::shard::custody::HELD_ENVELOPE_OVERHEAD;
                let (hn, hb) = self.held.queued(&dst);
                if hn + pn >= max_n
                    || hb + pb + len > max_b
                    || self.held.retained() + d.pending_bytes + cost > cap
                {
                    return Err(Reason::QueueFull);
                }
            }
        }
        let d = self.durable.as_mut().expect("checked above");
        if d.state != StoreState::Ok {
            return Err(Reason::StoreUnavailable);
        }
        let seq = d.next_seq;
        if d.log.append(seq, &env, seq, now.unix_ms).is_err() {
            return Err(Reason::StoreUnavailable);
        }
        d.next_seq += d.step;
        d.now_ms = now.unix_ms;
        d.pending_bytes += len;
        let p = d.pending_dest.entry(dst).or_default();
        p.0 += 1;
        p.1 += len;
        self.sources.hold(env.source(), len);
        d.ids.insert((env.source(), env.message_id()), (seq, false));
        d.pending.insert(seq, Pending { env, src });
        self.charge((len + crate::shard::custody::HELD_ENVELOPE_OVERHEAD) as u64);
        self.actions.push_back(Action::WakeStore);
        Ok(())
    }

    /// The store's next file operation, if one is due (the engine's store task asks).
    pub fn poll_store(&mut self, now: Now) -> Option<LogAction> {
        let d = self.durable.as_mut()?;
        d.now_ms = now.unix_ms;
        d.log.poll_action(now.mono_us)
    }

    /// The store's next side operation (a segment created ahead, or removed), if one is due
    /// (the engine's second store task asks).
    pub fn poll_store_side(&mut self, now: Now) -> Option<LogAction> {
        let d = self.durable.as_mut()?;
        d.log.poll_side(now.mono_us, now.unix_ms)
    }

    /// The side operation last handed out completed or failed.
    /// With the bytes a `Read` read, if it was one.
    pub fn on_store_side_done(
        &mut self,
        op: &LogAction,
        result: Result<Option<bytes::Bytes>, &std::io::Error>,
        now: Now,
    ) {
        let Some(d) = self.durable.as_mut() else {
            return;
        };
        let error = result.as_ref().err().copied();
        match result {
            Ok(Some(data)) => d.log.on_side_read(data, now.unix_ms),
            _ => d.log.on_side_done(error.is_none(), now.mono_us),
        }
        if error.is_none() {
            d.recover_state(self.id, now.mono_us);
        }
        if let Some(e) = error {
            d.m.failures.increment(1);
            tracing::warn!(core = self.id, operation = op_label(op), error = %e, "store segment not created ahead, not removed or not compacted (tried again)");
        }
        self.actions.push_back(Action::WakeStore);
    }

    /// Whether the store has nothing in flight or due (a clean exit waits for this).
    pub fn store_idle(&self) -> bool {
        self.durable.as_ref().is_none_or(|d| d.log.is_idle())
    }

    /// The store operation last handed out completed (`ok`) or failed (`error` says how).
    pub fn on_store_done(&mut self, op: &LogAction, error: Option<&std::io::Error>, now: Now) {
        let Some(d) = self.durable.as_mut() else {
            return;
        };
        let took_us = d.log.busy_for(now.mono_us).unwrap_or(0);
        if let LogAction::Sync { .. } = op {
            d.m.sync_seconds.record(took_us as f64 / 1e6);
        }
        let groups = d.log.stats.groups;
        d.log.on_done(error.is_none());
        if let Some(e) = error {
            d.m.failures.increment(1);
            tracing::error!(
                core = self.id,
                operation = op_label(op),
                error = %e,
                "store operation failed: durable envelopes refused (store_unavailable) until a new segment can be written"
            );
            d.state = StoreState::Failed;
            d.failed_at_us = now.mono_us;
        } else {
            d.recover_state(self.id, now.mono_us);
        }
        let durable = d.log.take_durable();
        if d.log.stats.groups > groups {
            d.m.group_envelopes.record(durable.len() as f64);
        }
        for seq in durable {
            self.on_durable(seq, now);
        }
        let failed = self.durable.as_mut().map(|d| d.log.take_failed());
        for seq in failed.unwrap_or_default() {
            self.on_store_failed(seq, now);
        }
        self.actions.push_back(Action::WakeStore);
    }

    fn take_pending(&mut self, seq: u64) -> Option<Pending> {
        let d = self.durable.as_mut()?;
        let p = d.pending.remove(&seq)?;
        let len = p.env.frame_len();
        d.pending_bytes -= len;
        if let Some(a) = dest_agent(&p.env) {
            if let Some(e) = d.pending_dest.get_mut(&a) {
                e.0 -= 1;
                e.1 -= len;
                if e.0 == 0 {
                    d.pending_dest.remove(&a);
                }
            }
        }
        Some(p)
    }

    /// Envelope `seq` is on disk: it joins its destination's queue and its source hears ACK.
    fn on_durable(&mut self, seq: u64, now: Now) {
        let Some(Pending { mut env, src }) = self.take_pending(seq) else {
            return;
        };
        env.set_store_seq(seq);
        let id = env.message_id();
        if let Some(d) = self.durable.as_mut() {
            d.m.envelopes.increment(1);
            if let Some(e) = d.ids.get_mut(&(env.source(), id)) {
                e.1 = true;
            }
        }
        self.dedup.mark(env.source(), id);
        let Some(agent) = dest_agent(&env) else {
            return;
        };
        let cid = self.by_agent.get(&agent).copied();
        match cid {
            Some(cid) => {
                self.enqueue_or_keep(cid, agent, env);
                self.wake_writer(cid);
            }
            None => {
                if self.held.keep(agent, env) {
                    self.kept_for(&agent);
                    self.m.held_for_absent.increment(1);
                }
            }
        }
        self.verdict_to(src, DeliveryClass::Durable, Ok(false), now);
    }

    /// Envelope `seq` could not be written: its source hears NACK `store_unavailable`.
    fn on_store_failed(&mut self, seq: u64, now: Now) {
        let Some(Pending { env, src }) = self.take_pending(seq) else {
            return;
        };
        let id = env.message_id();
        if let Some(d) = self.durable.as_mut() {
            d.ids.remove(&(env.source(), id));
        }
        // Not stored: it leaves the source's quota only.
        self.released.note(&env);
        self.verdict_to(
            src,
            DeliveryClass::Durable,
            Err(Reason::StoreUnavailable),
            now,
        );
    }

    /// Stored envelopes settled on another core: released here if this core's log holds them.
    pub(super) fn release_moved(&mut self, seqs: Vec<u64>) {
        let Some(d) = self.durable.as_mut() else {
            return;
        };
        let mine: Vec<u64> = seqs.into_iter().filter(|s| d.log.holds(*s)).collect();
        if !mine.is_empty() {
            d.log.release(&mine, d.now_ms);
            d.prune_ids();
            self.actions.push_back(Action::WakeStore);
        }
    }

    /// Writes released records for stored envelopes that left custody.
    pub(super) fn release_stored(&mut self) {
        if self.released.1.is_empty() {
            return;
        }
        let Some(d) = self.durable.as_mut() else {
            self.released.1.clear();
            return;
        };
        std::mem::swap(&mut d.seqs, &mut self.released.1);
        self.released.1.clear();
        // A stored envelope that moved to a relay link (its agent turned up on another relay)
        // is settled on the link's core: its own core's log holds it (sequence numbers are
        // unique across cores).
        // Nearly always every one is this core's: one pass, and no allocation.
        if self.ncores > 1 && d.seqs.iter().any(|s| !d.log.holds(*s)) {
            let log = &d.log;
            let (mine, elsewhere): (Vec<u64>, Vec<u64>) =
                d.seqs.drain(..).partition(|s| log.holds(*s));
            d.seqs = mine;
            for k in (0..self.ncores).filter(|k| *k != self.id) {
                self.outbox.push(
                    k,
                    CoreMsg::ReleaseStored {
                        seqs: elsewhere.clone(),
                    },
                );
            }
        }
        d.log.release(&d.seqs, d.now_ms);
        d.prune_ids();
        self.actions.push_back(Action::WakeStore);
    }

    /// The store's part of the sweep: the watchdog, retries after a failure, the gauges.
    pub(super) fn sweep_store(&mut self, now: Now) {
        let Some(d) = self.durable.as_mut() else {
            return;
        };
        d.now_ms = now.unix_ms;
        let busy = d
            .log
            .busy_for(now.mono_us)
            .max(d.log.side_busy_for(now.mono_us));
        if d.state == StoreState::Ok && busy.is_some_and(|b| b >= d.stall_us) {
            d.state = StoreState::Stalled;
            d.m.stalls.increment(1);
            tracing::error!(
                core = self.id,
                running_ms = busy.unwrap_or(0) / 1000,
                "store operation stalled: durable envelopes refused (store_unavailable) until it completes"
            );
        }
        d.recover_state(self.id, now.mono_us);
        if d.state == StoreState::Failed
            && d.log.is_failed()
            && now.mono_us.saturating_sub(d.failed_at_us) >= RETRY_US
        {
            d.failed_at_us = now.mono_us;
            d.log.retry(now.unix_ms);
            self.actions.push_back(Action::WakeStore);
        }
        d.m.state.set(d.state as u8 as f64);
        let segs = d.log.segments();
        d.m.segments.set(segs.len() as f64);
        d.m.disk_bytes
            .set(segs.values().map(|s| s.size.max(s.end)).sum::<u64>() as f64);
        d.m.live.set(d.log.live() as f64);
        let (copied, removed) = (d.log.stats.copied, d.log.stats.segments_removed);
        d.m.copied.increment(copied - d.counted.0);
        d.m.removed.increment(removed - d.counted.1);
        d.counted = (copied, removed);
    }

    /// Envelopes recovered from the store at start: kept for their agents (all are absent).
    pub(super) fn keep_recovered(&mut self, recovered: Vec<Envelope>) {
        for env in recovered {
            if let Some(d) = self.durable.as_mut() {
                d.ids
                    .insert((env.source(), env.message_id()), (env.store_seq(), true));
            }
            self.dedup.mark(env.source(), env.message_id());
            if let Some(a) = dest_agent(&env) {
                self.sources.hold(env.source(), env.frame_len());
                self.held.keep(a, env);
            }
        }
    }
}

fn op_label(op: &LogAction) -> &'static str {
    match op {
        LogAction::Create { .. } => "create",
        LogAction::Write { .. } => "write",
        LogAction::Sync { .. } => "sync",
        LogAction::Remove { .. } => "remove",
        LogAction::Read { .. } => "read",
    }
}

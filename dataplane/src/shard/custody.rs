//! Custody: what a shard holds for destination agents until they ACK.
//!
//! - [`Inflight`]: envelopes written to an agent, waiting for its ACK;
//! - [`SendQueue`]: envelopes queued towards a connected agent, not yet written;
//! - [`Held`]: envelopes kept for agents whose session ended, for their next session.
//!
//! ## In flight
//!
//! Kept in send order, with the set of ids still unacknowledged beside it. Agents ACK in the order
//! they received, so the common case pops the front; an ACK for an id further back only removes
//! it from the set, and its envelope leaves when it reaches the front. An id that is not in the
//! set (never written, or already ACKed) changes nothing and is reported as unknown.
//!
//! The deliver window counts from the oldest unacknowledged envelope: the writer stops when the
//! queue holds `deliver_window` envelopes or `deliver_window_bytes` bytes, so a receiver that
//! never ACKs holds at most one window.

use std::collections::{HashMap, VecDeque};

use crate::wire::{AgentId, DeliveryClass, Envelope, MessageId, Reason, ReceiptStatus};

#[derive(Default)]
pub(crate) struct Inflight {
    order: VecDeque<Slot>,
    /// Sequence number of `order[0]` (every pushed envelope gets the next one).
    front_seq: u64,
    /// Frame bytes of the envelopes in `order`.
    bytes: usize,
    /// Envelopes in `order` not ACKed yet, and their frame bytes.
    unacked: usize,
    unacked_bytes: usize,
    /// Id → sequence numbers of the envelopes not ACKed yet, oldest first (ids are unique per
    /// source only, so two sources may share one). Built on the first ACK that is not for the
    /// oldest envelope (an agent that ACKs in order never pays for it) and kept until nothing is
    /// in flight.
    index: Option<HashMap<MessageId, VecDeque<u64>, crate::shard::hasher::MapHasher>>,
    /// Envelopes at the front of `order` already moved off their read buffers.
    unshared: usize,
    /// Envelopes at the front of `order` that were there at the last tick.
    aged: usize,
}

struct Slot {
    env: Envelope,
    acked: bool,
    /// ACKed by the agent (not refused with a NACK): a delivery receipt is due if asked for.
    delivered: bool,
}

/// What an ACK or NACK from the agent did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Settled {
    /// The id was in flight; it left custody.
    Known,
    /// No envelope with this id is in flight.
    Unknown,
}

impl Inflight {
    /// Records an envelope just written to the agent.
    #[inline]
    pub(crate) fn push(&mut self, env: Envelope) {
        self.bytes += env.frame_len();
        self.unacked += 1;
        self.unacked_bytes += env.frame_len();
        if let Some(ix) = &mut self.index {
            let seq = self.front_seq + self.order.len() as u64;
            ix.entry(env.message_id()).or_default().push_back(seq);
        }
        self.order.push_back(Slot {
            env,
            acked: false,
            delivered: false,
        });
    }

    /// Whether the deliver window has room for one more envelope of `frame_len` bytes.
    pub(crate) fn has_room(&self, window: usize, window_bytes: usize, frame_len: usize) -> bool {
        self.order.len() < window && self.bytes + frame_len <= window_bytes
    }

    /// Whether a window of `window` envelopes and `window_bytes` bytes counted over the
    /// unanswered ones only has room for one more of `frame_len` bytes (relay links, whose peer
    /// answers out of order). What was answered behind an older unanswered envelope is still
    /// kept until that one is: it may take up to four windows, then the link waits (and is
    /// closed after the write timeout if the old one stays unanswered).
    pub(crate) fn has_room_unanswered(
        &self,
        window: usize,
        window_bytes: usize,
        frame_len: usize,
    ) -> bool {
        self.unacked < window
            && self.unacked_bytes + frame_len <= window_bytes
            && self.order.len() < 4 * window
            && self.bytes + frame_len <= 4 * window_bytes
    }

    /// Applies an ACK (`delivered`) or the agent's NACK for `id`.
    /// Envelopes that leave custody are noted in `released`.
    pub(crate) fn settle(
        &mut self,
        id: MessageId,
        delivered: bool,
        released: &mut Released,
    ) -> Settled {
        let front_matches = self
            .order
            .front()
            .is_some_and(|f| !f.acked && f.env.message_id() == id);
        let front_seq = self.front_seq;
        if front_matches {
            self.order[0].acked = true;
            self.order[0].delivered = delivered;
            self.unacked_bytes -= self.order[0].env.frame_len();
            if let Some(ix) = &mut self.index {
                // The front is the oldest unACKed envelope with this id.
                if let Some(seqs) = ix.get_mut(&id) {
                    seqs.retain(|s| *s != front_seq);
                    if seqs.is_empty() {
                        ix.remove(&id);
                    }
                }
            }
        } else {
            let order = &self.order;
            let ix = self.index.get_or_insert_with(|| {
                let mut ix: HashMap<MessageId, VecDeque<u64>, crate::shard::hasher::MapHasher> =
                    HashMap::default();
                for (i, s) in order.iter().enumerate().filter(|(_, s)| !s.acked) {
                    ix.entry(s.env.message_id())
                        .or_default()
                        .push_back(front_seq + i as u64);
                }
                ix
            });
            let Some(seqs) = ix.get_mut(&id) else {
                return Settled::Unknown;
            };
            let Some(seq) = seqs.pop_front() else {
                return Settled::Unknown;
            };
            if seqs.is_empty() {
                ix.remove(&id);
            }
            let slot = &mut self.order[(seq - front_seq) as usize];
            slot.acked = true;
            slot.delivered = delivered;
            self.unacked_bytes -= slot.env.frame_len();
        }
        self.unacked -= 1;
        self.pop_acked(released);
        Settled::Known
    }

    /// Applies a relay link's answer for the envelope it received as its `seq`-th (LINK_ACK,
    /// or LINK_NACK with `refused`). A hop's answer is not a delivery: no receipt. `None`: `seq`
    /// was not in flight; `Some(Some(env))`: someone waits on the answer (the envelope's
    /// upstream, or, refused, a retry) and gets this copy (the upstream moved to it).
    pub(crate) fn settle_seq(
        &mut self,
        seq: u64,
        refused: bool,
        released: &mut Released,
    ) -> Option<Option<Envelope>> {
        let i = seq.checked_sub(self.front_seq)?;
        let slot = self.order.get_mut(i as usize).filter(|s| !s.acked)?;
        slot.acked = true;
        self.unacked_bytes -= slot.env.frame_len();
        let upstream = slot.env.upstream.take();
        let answer = (upstream.is_some() || refused).then(|| {
            let mut env = slot.env.clone();
            env.upstream = upstream;
            env
        });
        if refused {
            // The copy answered goes on (waits, or is dropped and released there): the slot
            // leaving here must not release a stored record the copy still stands for.
            slot.env.set_store_seq(0);
        }
        if let Some(ix) = &mut self.index {
            let id = slot.env.message_id();
            if let Some(seqs) = ix.get_mut(&id) {
                seqs.retain(|s| *s != seq);
                if seqs.is_empty() {
                    ix.remove(&id);
                }
            }
        }
        self.unacked -= 1;
        self.pop_acked(released);
        Some(answer)
    }

    fn pop_acked(&mut self, released: &mut Released) {
        while self.order.front().is_some_and(|f| f.acked) {
            if let Some(slot) = self.order.pop_front() {
                self.bytes -= slot.env.frame_len();
                released.note(&slot.env);
                if slot.delivered {
                    released.receipt(&slot.env, ReceiptStatus::Delivered);
                }
                self.front_seq += 1;
                self.unshared = self.unshared.saturating_sub(1);
                self.aged = self.aged.saturating_sub(1);
            }
        }
        if self.order.is_empty() {
            self.index = None;
        }
    }

    /// Moves the envelopes that were here at the last tick, and are not yet moved off their
    /// read buffers, into allocations of their own (see [`Envelope::unshare`]); returns how
    /// many. Run once per tick: only envelopes held a whole tick pay the copy, and none pins a
    /// read buffer for more than two.
    pub(crate) fn unshare(&mut self) -> usize {
        let n = unshare_aged(
            self.order.iter_mut().map(|s| &mut s.env),
            &mut self.unshared,
            self.aged,
        );
        self.aged = self.order.len();
        n
    }

    /// Envelopes still unacknowledged.
    pub(crate) fn len(&self) -> usize {
        self.unacked
    }

    /// Envelopes kept, acknowledged ones behind an older one included (each a decoded
    /// envelope in a slot).
    pub(crate) fn slots(&self) -> usize {
        self.order.len()
    }

    /// Envelopes still unacknowledged and not in the store (lost if the process ends).
    pub(crate) fn unstored(&self) -> usize {
        self.order
            .iter()
            .filter(|s| !s.acked && s.env.store_seq() == 0)
            .count()
    }

    /// Bytes (frame lengths) of the envelopes kept, acknowledged ones behind an older one
    /// included.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.unacked == 0
    }

    /// Takes every envelope still unacknowledged, in send order.
    /// Envelopes already ACKed behind an unacknowledged one leave custody here (noted in
    /// `released`).
    pub(crate) fn take(&mut self, released: &mut Released) -> Vec<Envelope> {
        self.bytes = 0;
        self.unshared = 0;
        self.aged = 0;
        self.unacked = 0;
        self.unacked_bytes = 0;
        self.index = None;
        self.front_seq += self.order.len() as u64;
        let mut out = Vec::with_capacity(self.order.len());
        for s in self.order.drain(..) {
            if s.acked {
                released.note(&s.env);
                if s.delivered {
                    released.receipt(&s.env, ReceiptStatus::Delivered);
                }
            } else {
                out.push(s.env);
            }
        }
        out
    }
}

/// Envelopes queued towards one connected agent, bounded in count and bytes.
#[derive(Default)]
pub(crate) struct SendQueue {
    q: VecDeque<Envelope>,
    bytes: usize,
    /// Envelopes at the front already moved off their read buffers.
    unshared: usize,
    /// Envelopes at the front that were there at the last tick.
    aged: usize,
}

impl SendQueue {
    /// Queues `env` within the bounds. `Ok(true)`: past half of either bound (senders slow down).
    // The refused envelope travels back by value: no allocation on the refusal path.
    #[allow(clippy::result_large_err)]
    #[inline]
    pub(crate) fn push(
        &mut self,
        env: Envelope,
        max_envelopes: usize,
        max_bytes: usize,
    ) -> Result<bool, (Reason, Envelope)> {
        let len = env.frame_len();
        if self.q.len() >= max_envelopes || self.bytes + len > max_bytes {
            return Err((Reason::QueueFull, env));
        }
        self.bytes += len;
        self.q.push_back(env);
        Ok(self.q.len() > max_envelopes / 2 || self.bytes > max_bytes / 2)
    }

    #[inline]
    pub(crate) fn pop(&mut self) -> Option<Envelope> {
        let e = self.q.pop_front()?;
        self.bytes -= e.frame_len();
        self.unshared = self.unshared.saturating_sub(1);
        self.aged = self.aged.saturating_sub(1);
        Some(e)
    }

    /// Bytes queued (frame lengths).
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// The queued envelopes, in order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Envelope> + '_ {
        self.q.iter()
    }

    /// As [`Inflight::unshare`].
    pub(crate) fn unshare(&mut self) -> usize {
        let n = unshare_aged(self.q.iter_mut(), &mut self.unshared, self.aged);
        self.aged = self.q.len();
        n
    }

    pub(crate) fn front(&self) -> Option<&Envelope> {
        self.q.front()
    }

    pub(crate) fn len(&self) -> usize {
        self.q.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    /// Takes every queued envelope, in order.
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = Envelope> + '_ {
        self.bytes = 0;
        self.unshared = 0;
        self.aged = 0;
        self.q.drain(..)
    }
}

/// Unshares the envelopes in `unshared..aged` of a queue's front (those there at the last tick,
/// not yet moved off their read buffers); returns how many.
fn unshare_aged<'a>(
    queue: impl Iterator<Item = &'a mut Envelope>,
    unshared: &mut usize,
    aged: usize,
) -> usize {
    let n = aged.saturating_sub(*unshared);
    for e in queue.skip(*unshared).take(n) {
        e.unshare();
    }
    *unshared += n;
    n
}

/// Memory one kept envelope costs besides its frame bytes (the decoded envelope, its
/// timestamp, its queue slot): counted for every envelope in custody, queued, in flight or
/// held.
pub(crate) const HELD_ENVELOPE_OVERHEAD: usize = 160;
/// Memory one agent with something kept costs (map entry, queue header).
pub(crate) const HELD_AGENT_OVERHEAD: usize = 128;

/// Envelopes kept for agents that are not connected (custody of a session that ended, and new
/// work accepted for an absent agent), until their next session, expiry or the age limit.
/// Nothing acknowledged is dropped otherwise: what is kept is bounded when it is accepted (the
/// destination's queue bounds, the source's quota, `limits.absent_bytes`).
#[derive(Default)]
pub(crate) struct Held {
    by_agent: HashMap<AgentId, Kept, crate::shard::hasher::MapHasher>,
    bytes: usize,
    count: usize,
    /// Unix milliseconds at the shard's last tick: when what is kept now was kept.
    now_ms: u64,
}

/// What is kept for one agent, in order, each with when it was kept, and its frame bytes.
#[derive(Default)]
struct Kept {
    q: VecDeque<(Envelope, u64)>,
    bytes: usize,
}

impl Held {
    /// Keeps `env` for `agent`, moved off the buffer it was read from. Best-effort envelopes are
    /// not kept: `false`.
    pub(crate) fn keep(&mut self, agent: AgentId, mut env: Envelope) -> bool {
        if env.class() == DeliveryClass::BestEffort {
            return false;
        }
        env.unshare();
        let len = env.frame_len();
        self.bytes += len;
        self.count += 1;
        let k = self.by_agent.entry(agent).or_default();
        k.bytes += len;
        k.q.push_back((env, self.now_ms));
        true
    }

    /// The time of the shard's last tick (Unix milliseconds).
    pub(crate) fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// The time (Unix milliseconds) that envelopes kept from now on are kept at.
    pub(crate) fn set_now(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
    }

    /// Keeps a session's custody for `agent` ahead of what is already kept for it (kept while
    /// the session was closing), so that order per source holds. Returns how many best-effort
    /// envelopes were left out.
    pub(crate) fn keep_first(&mut self, agent: AgentId, custody: Vec<Envelope>) -> u64 {
        let now_ms = self.now_ms;
        let (mut added, mut bytes, mut left_out) = (0usize, 0usize, 0u64);
        let k = self.by_agent.entry(agent).or_default();
        let mut q = VecDeque::with_capacity(custody.len() + k.q.len());
        for mut env in custody {
            if env.class() == DeliveryClass::BestEffort {
                left_out += 1;
                continue;
            }
            env.unshare();
            bytes += env.frame_len();
            added += 1;
            q.push_back((env, now_ms));
        }
        q.append(&mut k.q);
        k.q = q;
        k.bytes += bytes;
        if k.q.is_empty() {
            self.by_agent.remove(&agent);
        }
        self.bytes += bytes;
        self.count += added;
        left_out
    }

    /// Whether one more envelope of `len` bytes fits what may be kept for `agent`.
    pub(crate) fn admits(&self, agent: &AgentId, len: usize, max_n: usize, max_b: usize) -> bool {
        self.by_agent
            .get(agent)
            .is_none_or(|k| k.q.len() < max_n && k.bytes + len <= max_b)
    }

    /// Envelopes and frame bytes kept for `agent`.
    pub(crate) fn queued(&self, agent: &AgentId) -> (usize, usize) {
        self.by_agent
            .get(agent)
            .map_or((0, 0), |k| (k.q.len(), k.bytes))
    }

    /// Agents something is kept for.
    pub(crate) fn agents(&self) -> impl Iterator<Item = AgentId> + '_ {
        self.by_agent.keys().copied()
    }

    /// Takes what is kept for `agent`.
    pub(crate) fn take(&mut self, agent: &AgentId) -> Option<VecDeque<Envelope>> {
        let k = self.by_agent.remove(agent)?;
        self.bytes -= k.bytes;
        self.count -= k.q.len();
        Some(k.q.into_iter().map(|(e, _)| e).collect())
    }

    /// Drops envelopes that expired, and those kept longer than `max_age_ms` (noted in
    /// `released`); returns how many of each.
    pub(crate) fn expire(
        &mut self,
        now_ms: u64,
        max_age_ms: u64,
        released: &mut Released,
    ) -> (u64, u64) {
        let (mut expired, mut aged, mut freed) = (0u64, 0u64, 0usize);
        self.by_agent.retain(|_, k| {
            k.q.retain_mut(|(e, kept_ms)| {
                if *kept_ms == 0 {
                    // Kept before the shard's first tick: its age counts from now.
                    *kept_ms = now_ms;
                }
                let too_old = kept_ms.saturating_add(max_age_ms) <= now_ms;
                let live = e.expires_ms() > now_ms && !too_old;
                if !live {
                    if e.expires_ms() > now_ms {
                        aged += 1;
                    } else {
                        expired += 1;
                    }
                    freed += e.frame_len();
                    k.bytes -= e.frame_len();
                    released.note(e);
                    released.receipt(e, ReceiptStatus::Expired);
                }
                live
            });
            !k.q.is_empty()
        });
        self.bytes -= freed;
        self.count -= (expired + aged) as usize;
        (expired, aged)
    }

    /// Bytes (frame lengths) kept.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// What keeping costs in memory: frame bytes, plus each envelope's own record and queue
    /// slot and each agent's map entry.
    pub(crate) fn retained(&self) -> usize {
        self.bytes + self.count * HELD_ENVELOPE_OVERHEAD + self.by_agent.len() * HELD_AGENT_OVERHEAD
    }

    /// Envelopes kept.
    pub(crate) fn len(&self) -> usize {
        self.count
    }

    /// Envelopes kept and not in the store (lost if the process ends).
    pub(crate) fn unstored(&self) -> usize {
        self.by_agent
            .values()
            .flat_map(|k| k.q.iter())
            .filter(|(e, _)| e.store_seq() == 0)
            .count()
    }
}

/// Envelopes that left a shard's custody since the list was last settled: their sources and
/// sizes, for the per-source quota, and the store sequence numbers of stored ones, for the
/// store's released records.
#[derive(Default)]
#[allow(clippy::type_complexity)]
pub(crate) struct Released(
    pub(crate) Vec<(AgentId, u32)>,
    pub(crate) Vec<u64>,
    /// Receipts due to sources that asked: (source, message id, status).
    pub(crate) Vec<(AgentId, MessageId, ReceiptStatus)>,
    /// Relays waiting on the answer for an envelope that expired in a link's queue: (upstream,
    /// class).
    pub(crate) Vec<(crate::shard::msg::Src, crate::wire::DeliveryClass)>,
);

impl Released {
    /// `env` left custody for good (ACKed by its destination, expired, dropped).
    pub(crate) fn note(&mut self, env: &Envelope) {
        self.note_bytes(env);
        if env.store_seq() != 0 {
            self.1.push(env.store_seq());
        }
    }

    /// A receipt for `env`'s source, if its flags ask for one with this status.
    pub(crate) fn receipt(&mut self, env: &Envelope, status: ReceiptStatus) {
        let wanted = match status {
            ReceiptStatus::Delivered => env.wants_delivery_receipt(),
            ReceiptStatus::Expired => env.wants_expiry_notice(),
        };
        if wanted {
            self.2.push((env.source(), env.message_id(), status));
        }
    }

    /// `env` left this core's quota but stays in custody (handed to another core).
    pub(crate) fn note_moved(&mut self, env: &Envelope) {
        self.note_bytes(env);
    }

    /// `env`'s bytes leave its source's quota: added to the last entry when that is the same
    /// source's (envelopes leave custody in runs from one source, and each entry is one map
    /// lookup in [`SourceQuota::release`]).
    fn note_bytes(&mut self, env: &Envelope) {
        let (source, len) = (env.source(), env.frame_len() as u32);
        match self.0.last_mut() {
            Some((last, n)) if *last == source && n.checked_add(len).is_some() => *n += len,
            _ => self.0.push((source, len)),
        }
    }
}

/// What each source has in this shard's custody (queued, in flight, held), in frame bytes.
#[derive(Default)]
pub(crate) struct SourceQuota {
    by_source: HashMap<AgentId, u64, crate::shard::hasher::MapHasher>,
}

impl SourceQuota {
    /// Whether `source` may have `len` more bytes held, within `quota`.
    pub(crate) fn allows(&self, source: &AgentId, len: usize, quota: u64) -> bool {
        self.by_source.get(source).copied().unwrap_or(0) + len as u64 <= quota
    }

    pub(crate) fn hold(&mut self, source: AgentId, len: usize) {
        *self.by_source.entry(source).or_default() += len as u64;
    }

    /// Holds `len` more bytes for `source` and says whether it stays within `quota` (what
    /// [`allows`](Self::allows) then [`hold`](Self::hold) say, in one lookup). Taken back with
    /// [`unhold`](Self::unhold) if the envelope is not kept after all.
    pub(crate) fn hold_within(&mut self, source: AgentId, len: usize, quota: u64) -> bool {
        let held = self.by_source.entry(source).or_default();
        *held += len as u64;
        *held <= quota
    }

    /// Takes back a [`hold_within`](Self::hold_within) whose envelope was not kept.
    pub(crate) fn unhold(&mut self, source: &AgentId, len: usize) {
        if let Some(b) = self.by_source.get_mut(source) {
            *b = b.saturating_sub(len as u64);
            if *b == 0 {
                self.by_source.remove(source);
            }
        }
    }

    /// Takes the released list into account (and empties it).
    pub(crate) fn release(&mut self, released: &mut Released) {
        for (src, len) in released.0.drain(..) {
            self.unhold(&src, len as usize);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{AgentId, Destination, EnvelopeBuilder};

    fn env(i: u128) -> Envelope {
        env_from(i, AgentId([1; 32]))
    }

    fn env_from(i: u128, source: AgentId) -> Envelope {
        EnvelopeBuilder::new(
            MessageId::from_u128(i),
            source,
            Destination::Agent(AgentId([2; 32])),
            0,
            10,
        )
        .build(b"")
        .unwrap()
    }

    #[test]
    fn only_envelopes_held_a_whole_tick_are_moved_off_their_read_buffer() {
        // Five envelopes cut from one read block, as the shard cuts them.
        let mut block = bytes::BytesMut::new();
        for i in 1..=5u8 {
            let e = EnvelopeBuilder::new(
                MessageId::from_u128(i.into()),
                AgentId([1; 32]),
                Destination::Agent(AgentId([2; 32])),
                0,
                10,
            )
            .build(&[i; 100])
            .unwrap();
            crate::wire::Frame::Envelope(e).encode(&mut block);
        }
        let range = block.as_ptr() as usize..block.as_ptr() as usize + block.len();
        let pinned = |e: &Envelope| range.contains(&(e.payload_ref().as_ptr() as usize));
        let dec = crate::wire::FrameDecoder::new(1 << 20);
        let mut q = SendQueue::default();
        while let Some(crate::wire::Frame::Envelope(e)) = dec.decode(&mut block).unwrap() {
            assert!(pinned(&e));
            q.push(e, 100, 1 << 20).unwrap();
            if q.len() == 3 {
                assert_eq!(q.unshare(), 0, "just queued: no copy at the first tick");
            }
        }
        assert_eq!(q.len(), 5);
        assert_eq!(q.unshare(), 3, "the three held since the last tick");
        let moved: Vec<bool> = q.iter().map(|e| !pinned(e)).collect();
        assert_eq!(moved, [true, true, true, false, false]);
        q.pop();
        assert_eq!(q.unshare(), 2, "the two queued after it, now a tick old");
        assert!(q.iter().all(|e| !pinned(e)));
        assert_eq!(q.unshare(), 0, "nothing moves twice");

        let mut f = Inflight::default();
        f.push(env(10));
        assert_eq!(f.unshare(), 0);
        f.push(env(11));
        assert_eq!(f.unshare(), 1);
        assert_eq!(f.unshare(), 1);
        assert_eq!(f.unshare(), 0);
    }

    #[test]
    fn a_refused_stored_envelope_keeps_its_record_until_its_copy_is_settled() {
        let mut f = Inflight::default();
        let mut stored = env(1);
        stored.set_store_seq(7);
        f.push(stored.clone());
        f.push(stored);
        let mut released = Released::default();
        // LINK_NACK of the first: the copy that goes on stands for the record.
        let copy = f.settle_seq(0, true, &mut released).unwrap().unwrap();
        assert_eq!(copy.store_seq(), 7);
        assert!(released.1.is_empty(), "released while the copy waits");
        assert_eq!(released.0.len(), 1);
        // LINK_ACK of the second: the next relay took it, the record goes.
        assert!(f.settle_seq(1, false, &mut released).unwrap().is_none());
        assert_eq!(released.1, vec![7]);
    }

    #[test]
    fn in_order_out_of_order_and_bogus_acks() {
        let mut f = Inflight::default();
        for i in 0..5 {
            f.push(env(i));
        }
        let one = env(0).frame_len();
        let mut r = Released::default();
        assert_eq!(
            f.settle(MessageId::from_u128(0), true, &mut r),
            Settled::Known
        );
        assert_eq!(
            f.settle(MessageId::from_u128(2), true, &mut r),
            Settled::Known
        );
        assert_eq!(
            f.settle(MessageId::from_u128(3), true, &mut r),
            Settled::Known
        );
        let left = |r: &Released| r.0.iter().map(|(_, n)| *n as usize).sum::<usize>();
        assert_eq!(left(&r), one, "0 left; 2 and 3 wait behind 1");
        assert_eq!(f.len(), 2);
        assert_eq!(f.bytes, 4 * one, "2 and 3 stay behind the unACKed 1");
        assert!(
            !f.has_room(4, usize::MAX, 0),
            "the window counts from the oldest"
        );
        assert!(f.has_room(5, 5 * one, one));
        assert!(
            !f.has_room(5, 5 * one - 1, one),
            "a window in bytes is a hard bound"
        );
        assert_eq!(
            f.settle(MessageId::from_u128(1), true, &mut r),
            Settled::Known
        );
        assert_eq!((f.len(), f.bytes), (1, one));
        assert_eq!(left(&r), 4 * one);
        assert_eq!(r.0.len(), 1, "one source's runs are one entry");
        for bogus in 100..110 {
            assert_eq!(
                f.settle(MessageId::from_u128(bogus), true, &mut r),
                Settled::Unknown
            );
        }
        assert_eq!(
            f.settle(MessageId::from_u128(2), true, &mut r),
            Settled::Unknown,
            "twice"
        );
        assert_eq!(f.len(), 1, "bogus ids change nothing");
        assert_eq!(left(&r), 4 * one);
        f.push(env(5));
        f.settle(MessageId::from_u128(5), true, &mut r);
        // Two envelopes with one id (two sources may pick the same): each ACK settles the oldest.
        let mut g = Inflight::default();
        for i in [7u128, 8, 7, 9] {
            g.push(env(i));
        }
        assert_eq!(
            g.settle(MessageId::from_u128(8), true, &mut r),
            Settled::Known
        );
        assert_eq!(
            g.settle(MessageId::from_u128(7), true, &mut r),
            Settled::Known
        );
        assert_eq!(
            g.settle(MessageId::from_u128(7), true, &mut r),
            Settled::Known
        );
        assert_eq!(
            g.settle(MessageId::from_u128(7), true, &mut r),
            Settled::Unknown
        );
        assert_eq!(g.len(), 1);
        assert_eq!(
            g.settle(MessageId::from_u128(9), true, &mut r),
            Settled::Known
        );
        assert!(g.is_empty());
        let left: Vec<_> = f
            .take(&mut r)
            .iter()
            .map(|e| e.message_id().as_u128())
            .collect();
        assert_eq!(left, vec![4]);
        assert!(f.is_empty());
    }

    #[test]
    fn a_sources_released_runs_are_one_entry_and_quota_holds_are_taken_back() {
        let other = |i: u128| env_from(i, AgentId([3; 32]));
        let mut r = Released::default();
        for e in [env(1), env(2), other(3), env(4), env(5)] {
            r.note(&e);
        }
        let one = env(1).frame_len() as u32;
        assert_eq!(
            r.0,
            vec![
                (AgentId([1; 32]), 2 * one),
                (AgentId([3; 32]), one),
                (AgentId([1; 32]), 2 * one)
            ]
        );
        let mut q = SourceQuota::default();
        let a = AgentId([1; 32]);
        assert!(q.hold_within(a, 60, 100));
        assert!(!q.hold_within(a, 60, 100), "120 held: over the quota");
        assert!(!q.allows(&a, 1, 100));
        q.unhold(&a, 60);
        assert!(q.allows(&a, 40, 100) && !q.allows(&a, 41, 100));
        q.unhold(&a, 60);
        assert!(q.by_source.is_empty(), "nothing held: forgotten");
    }
}

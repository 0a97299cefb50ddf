//! The agent: windows, outcomes per envelope, retries, reconnection and a clean close, over
//! one session at a time.
//!
//! One driver task per agent owns the current connection's write half and a reader task per
//! connection; the application's calls reach it through a bounded queue. What the agent tracks
//! lives in one [`State`] behind a mutex, taken once per batch sent and once per frame of
//! answers read:
//!
//! - every envelope the relay will answer stays in `pending` (its encoded frame, a slice of the
//!   batch buffer it was sent in) until the answer: ACK resolves it, a retryable NACK schedules
//!   it again (backoff from 50 ms doubling to 2 s, while its TTL allows), anything else resolves
//!   it. `pending` is bounded by the window: sending waits for room;
//! - on a new connection every pending envelope is written again, in the order first sent, and
//!   what was queued for the old connection is dropped (it is pending, so it was just written).
//!   The queue carries the connection generation it was enqueued under, read under the same
//!   lock that records the envelopes, so nothing slips between the two.
//! - ACKs (the reader's for [`ClientConfig::auto_ack`], the application's) are held in
//!   `HeldAcks` and written by the driver when the first has waited [`ACK_DELAY`], when a
//!   quarter of the relay's deliver window waits, or with anything else it writes; they
//!   survive a reconnection (bounded by [`MAX_HELD_ACKS`]).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use openmesh_dataplane::directory::{Capability, KeyBundle};
use openmesh_dataplane::wire::{
    AckBatch, AgentId, Close, DeliveryClass, Destination, DirectoryAnswer, Envelope,
    EnvelopeBuilder, Frame, Lookup, LookupKey, MessageId, Nack, Publish, Reason, Receipt,
    ReceiptStatus, Welcome,
};

use crate::e2e::{E2e, E2eError, E2eStats, Opened as OpenedEnvelope};
use crate::link::{LinkReader, LinkWriter, WriteReady};
use crate::session::{flush_acks, open, pong, Heard, Heartbeat, Opened};
use crate::template::{Batch, Item, MessageIdRange, MessageIds, NO_DEST};
use crate::{unix_ms, ClientConfig, ClientError};

use crate::pending::SeqTable;
use crate::Map;

/// Wait before asking the directory again after `rate_limited`.
const DIRECTORY_RETRY: Duration = Duration::from_millis(250);

/// TTL of envelopes made by [`Agent::envelope_to`] (capped by the relay's `max_ttl_ms`).
pub const DEFAULT_TTL: Duration = Duration::from_secs(60);
/// Most envelopes received and not yet taken by the application (or the relay's
/// `deliver_window`, when larger). Beyond it best-effort envelopes are dropped
/// ([`Stats::dropped_best_effort`]), and so are envelopes a relay sends past its own deliver
/// window ([`Stats::dropped_unacked`]: unACKed, so the relay still holds them).
pub const MAX_QUEUED: u64 = 65_536;
/// Most bytes (frame lengths) of envelopes received and not yet taken (or the relay's
/// `deliver_window_bytes`, when larger), with the same consequences as [`MAX_QUEUED`].
pub const MAX_QUEUED_BYTES: u64 = 64 << 20;
/// Most envelopes whose receipt a [`SendHandle`] waits for at once; beyond it
/// [`SendHandle::delivery`] answers `None` at once.
pub const MAX_AWAITED_RECEIPTS: usize = 65_536;
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// How long past an envelope's expiry its receipt is still waited for, milliseconds.
const RECEIPT_GRACE_MS: u64 = 60_000;
/// Most ACKs held (waiting for company, or kept while disconnected to write on the next
/// connection); beyond it an envelope stays unACKed and the relay delivers it again.
const MAX_HELD_ACKS: usize = 65_536;
const WRITE_COALESCE: usize = 256 << 10;
/// Longest an ACK waits for company: at a low rate one ACK frame (one TLS record, one write,
/// one wake-up of the writer here and of the reader at the relay) answers every envelope
/// received in this span instead of each one. ACKs also leave with anything else written.
const ACK_DELAY: Duration = Duration::from_millis(1);
/// Share of the relay's deliver window (in envelopes and in bytes) from which held ACKs go out
/// at once: the window never waits for them, whatever the rate.
const ACK_EARLY_SHARE: u64 = 4;

/// ACKs waiting to be written: the reader and [`Agent::ack`] put them here, the connection's
/// writer takes them when they are due. Bounded by [`MAX_HELD_ACKS`].
#[derive(Default)]
struct HeldAcks {
    ids: Vec<MessageId>,
    /// Frame bytes of the envelopes they answer (those the reader ACKs).
    bytes: u64,
    /// When the first of them was held.
    since: Option<Instant>,
    /// Enough are held: they go at once.
    urgent: bool,
    /// Count and bytes from which they are urgent, from the session's WELCOME.
    count: usize,
    max_bytes: u64,
}

/// What became of one envelope (the relay's answer to it).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// The relay took custody (for durable envelopes: after its store synced them).
    Accepted,
    /// A best-effort envelope was handed to the connection; the relay does not answer those.
    Sent,
    /// The relay refused it for a reason retrying does not fix.
    Refused {
        /// The reason, when this build knows the code.
        reason: Option<Reason>,
        /// The raw reason code.
        code: u16,
        /// The relay's text.
        text: String,
    },
    /// Its TTL ran out before the relay accepted it: retryable refusals (`queue_full`, ...)
    /// or reconnection lasted until then.
    Expired,
    /// The agent closed before the relay answered.
    Unanswered,
}

/// What became of an envelope at its destination, for envelopes that asked for a receipt
/// ([`openmesh_dataplane::wire::flags`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// The destination agent ACKed it.
    Delivered {
        /// When, Unix milliseconds (the relay's clock).
        at_ms: u64,
    },
    /// It expired undelivered.
    Expired {
        /// When, Unix milliseconds (the relay's clock).
        at_ms: u64,
    },
}

/// The answers to a [`Batch`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Envelopes the relay accepted.
    pub accepted: u32,
    /// Best-effort envelopes handed to the connection (not answered by the relay).
    pub sent: u32,
    /// Envelopes refused, with their reason code and text.
    pub refused: Vec<(MessageId, u16, String)>,
    /// Envelopes whose TTL ran out before the relay accepted them.
    pub expired: Vec<MessageId>,
    /// Envelopes still unanswered when the agent closed.
    pub unanswered: Vec<MessageId>,
}

/// Counters of an agent since it connected ([`Agent::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Envelopes handed to [`Agent::send`] or [`Agent::send_batch`].
    pub sent: u64,
    /// Envelopes the relay accepted.
    pub accepted: u64,
    /// NACKs received, retried ones included.
    pub nacked: u64,
    /// Envelopes sent again after a retryable NACK.
    pub retried: u64,
    /// Envelopes refused for good.
    pub refused: u64,
    /// Envelopes whose TTL ran out unaccepted.
    pub expired: u64,
    /// Envelopes written again on a new connection.
    pub resent: u64,
    /// Connections after the first.
    pub reconnects: u64,
    /// Envelopes received.
    pub received: u64,
    /// Best-effort envelopes dropped because the application did not take them
    /// ([`crate::MAX_QUEUED`]).
    pub dropped_best_effort: u64,
    /// Envelopes to ACK dropped unACKed because the relay sent them beyond its deliver window
    /// and the application did not take them ([`crate::MAX_QUEUED`]); the relay still holds
    /// them and delivers them again on the next session.
    pub dropped_unacked: u64,
    /// Envelopes sent and not yet answered.
    pub in_flight: u64,
    /// Bytes waiting to be written to the relay: frames and records its socket has not taken
    /// yet (a relay that stops reading keeps this at what the window and the held ACKs allow).
    pub unwritten_bytes: u64,
}

/// What [`Agent::close`] saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CloseReport {
    /// Envelopes the relay had not answered when the agent closed, in the order sent.
    pub unanswered: Vec<MessageId>,
    /// The relay's CLOSE in answer to ours (`None`: it did not answer within the timeout, or
    /// there was no connection).
    pub relay_close: Option<Close>,
    /// The agent's counters at the end.
    pub stats: Stats,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    accepted: AtomicU64,
    nacked: AtomicU64,
    retried: AtomicU64,
    refused: AtomicU64,
    expired: AtomicU64,
    resent: AtomicU64,
    reconnects: AtomicU64,
    received: AtomicU64,
    dropped_best_effort: AtomicU64,
    dropped_unacked: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// An envelope sent and not yet answered: 48 bytes, its frame a range of its batch's buffer.
struct Pending {
    batch: u64,
    /// Its frame: `start..end` of the batch's `frames`.
    start: u32,
    end: u32,
    /// Index into `State::dests` ([`NO_DEST`]: a group or broadcast).
    dest: u32,
    expires_ms: u64,
    /// Order of first sending (resending keeps it).
    seq: u64,
    attempts: u32,
    /// Off the wire, waiting for its retry.
    waiting: bool,
}

struct BatchState {
    /// The batch's frames, held while any of them waits for its answer.
    frames: Bytes,
    left: u32,
    out: BatchOutcome,
    tx: Option<oneshot::Sender<BatchOutcome>>,
}

/// How an envelope resolves other than accepted ([`State::accept`]).
enum Settle {
    Refused(u16, String),
    Expired,
    Unanswered,
}

#[derive(Default)]
struct State {
    pending: SeqTable<MessageId, Pending>,
    seq: u64,
    /// Destinations with envelopes in flight: their slot in `dests`.
    dest_slot: Map<AgentId, u32>,
    /// (destination, envelopes in flight) by slot; slots of a count gone to 0 are reused.
    dests: Vec<(AgentId, u32)>,
    free_dests: Vec<u32>,
    /// Batches with envelopes pending, by number.
    batches: SeqTable<u64, BatchState>,
    next_batch: u64,
    /// Retries due, earliest first (entries whose envelope was answered or resent meanwhile
    /// are skipped when they come up).
    retries: BinaryHeap<Reverse<(Instant, u64, MessageId)>>,
    receipts: Map<MessageId, (u64, oneshot::Sender<Delivery>)>,
    /// Directory requests waiting for their answer, by request id.
    dir: Map<u32, oneshot::Sender<DirectoryAnswer>>,
    /// When to publish the bundle again (the relay refused the last one, retryably).
    republish_at: Option<Instant>,
    next_request: u32,
    /// Connection generation: 0 before the first, then one more per connection.
    gen: u64,
    window: u32,
    dest_window: u32,
    /// The fewest envelopes a sender waiting for window room needs room for (`None`: nobody
    /// waits), so that answers wake it only once it may fit.
    need: Option<u32>,
    /// Buffers and item lists of answered batches, for [`Agent::batch`] (at most
    /// [`SPARE_BATCHES`] of each, each at most [`SPARE_BYTES`] or [`SPARE_ITEMS`]).
    spare_bufs: Vec<BytesMut>,
    spare_items: Vec<Vec<Item>>,
    closed: bool,
}

/// Answered batches' buffers kept for the next ones (warm in cache, no page faults).
const SPARE_BATCHES: usize = 4;
const SPARE_BYTES: usize = 512 << 10;
const SPARE_ITEMS: usize = 16 << 10;

impl State {
    fn fits(&self, n: u32, dests: &[(AgentId, u32)]) -> bool {
        let used = self.pending.len() as u32;
        (used == 0 || used + n <= self.window)
            && dests.iter().all(|(d, k)| {
                let cur = self
                    .dest_slot
                    .get(d)
                    .map_or(0, |&i| self.dests[i as usize].1);
                cur == 0 || cur + k <= self.dest_window
            })
    }

    /// Records a batch of `answered` envelopes the relay will answer and `sent` best-effort
    /// ones, whose frames are slices of `frames`.
    fn record(
        &mut self,
        (items, dests): (&[Item], &[(AgentId, u32)]),
        frames: &Bytes,
        (answered, sent): (u32, u32),
        tx: oneshot::Sender<BatchOutcome>,
        c: &Counters,
    ) {
        let out = BatchOutcome {
            sent,
            ..BatchOutcome::default()
        };
        if answered == 0 {
            let _ = tx.send(out);
            return;
        }
        let batch = self.next_batch;
        self.next_batch += 1;
        self.batches.insert(
            batch,
            BatchState {
                frames: frames.clone(),
                left: answered,
                out,
                tx: Some(tx),
            },
        );
        // One slot per destination of the batch, its count raised by the batch's envelopes
        // to it before any is recorded (so resolving an earlier copy below cannot free it).
        let slots: Vec<u32> = dests
            .iter()
            .map(|&(d, k)| {
                if k == 0 {
                    return NO_DEST;
                }
                let slot = self.dest_slot(d);
                self.dests[slot as usize].1 += k;
                slot
            })
            .collect();
        for it in items.iter().filter(|i| i.answered) {
            self.seq += 1;
            let earlier = self.pending.insert(
                it.id,
                Pending {
                    batch,
                    start: it.start,
                    end: it.end,
                    dest: slots.get(it.dest as usize).copied().unwrap_or(NO_DEST),
                    expires_ms: it.expires_ms,
                    seq: self.seq,
                    attempts: 0,
                    waiting: false,
                },
            );
            // An id sent again while still in flight: the relay's answer names only the id, so
            // it goes to the later one and the earlier resolves unanswered.
            if let Some(p) = earlier {
                self.resolve(it.id, p, Settle::Unanswered, c);
            }
        }
    }

    /// The slot counting `d`'s envelopes in flight, taken if it has none.
    fn dest_slot(&mut self, d: AgentId) -> u32 {
        if let Some(&i) = self.dest_slot.get(&d) {
            return i;
        }
        let i = match self.free_dests.pop() {
            Some(i) => {
                self.dests[i as usize] = (d, 0);
                i
            }
            None => {
                self.dests.push((d, 0));
                self.dests.len() as u32 - 1
            }
        };
        self.dest_slot.insert(d, i);
        i
    }

    /// A pending envelope's frame.
    fn frame(&self, p: &Pending) -> Bytes {
        self.batches.get(&p.batch).map_or_else(Bytes::new, |b| {
            b.frames.slice(p.start as usize..p.end as usize)
        })
    }

    /// Forgets the receipts nobody waits for any more, and those a minute past their
    /// envelope's expiry (the relay sends the expiry notice at the expiry).
    fn sweep_receipts(&mut self, now_ms: u64) {
        self.receipts
            .retain(|_, (exp, tx)| !tx.is_closed() && *exp + RECEIPT_GRACE_MS > now_ms);
    }

    /// Resolves a pending envelope. Returns whether it was pending.
    fn settle(&mut self, id: MessageId, how: Settle, c: &Counters) -> bool {
        let Some(p) = self.pending.remove(&id) else {
            return false;
        };
        self.resolve(id, p, how, c);
        true
    }

    /// Counts `p`, taken out of `pending`, off its destination and its batch.
    fn resolve(&mut self, id: MessageId, p: Pending, how: Settle, c: &Counters) {
        self.leave_dest(p.dest, 1);
        let Some(b) = self.batches.get_mut(&p.batch) else {
            return;
        };
        match how {
            Settle::Refused(code, text) => {
                b.out.refused.push((id, code, text));
                bump(&c.refused, 1);
            }
            Settle::Expired => {
                b.out.expired.push(id);
                bump(&c.expired, 1);
            }
            Settle::Unanswered => b.out.unanswered.push(id),
        }
        b.left -= 1;
        if b.left == 0 {
            self.finish_batch(p.batch);
        }
    }

    /// Resolves the pending envelopes among `ids` as accepted (an ACK frame); returns how
    /// many were pending. The envelopes of one batch to one destination, the usual run, are
    /// counted off their batch and destination together.
    fn accept(&mut self, ids: impl Iterator<Item = MessageId>, c: &Counters) -> u64 {
        let mut total = 0;
        // (batch, destination slot, envelopes)
        let mut run: Option<(u64, u32, u32)> = None;
        for id in ids {
            let Some(p) = self.pending.remove(&id) else {
                continue;
            };
            total += 1;
            match &mut run {
                Some((b, d, k)) if *b == p.batch && *d == p.dest => *k += 1,
                _ => {
                    if let Some(r) = run.replace((p.batch, p.dest, 1)) {
                        self.accept_run(r, c);
                    }
                }
            }
        }
        if let Some(r) = run {
            self.accept_run(r, c);
        }
        total
    }

    fn accept_run(&mut self, (batch, dest, k): (u64, u32, u32), c: &Counters) {
        // Counted before the batch's handle can see its outcome.
        bump(&c.accepted, k as u64);
        self.leave_dest(dest, k);
        let Some(b) = self.batches.get_mut(&batch) else {
            return;
        };
        b.out.accepted += k;
        b.left -= k;
        if b.left == 0 {
            self.finish_batch(batch);
        }
    }

    /// `k` envelopes to destination slot `dest` are no longer in flight.
    fn leave_dest(&mut self, dest: u32, k: u32) {
        if let Some((d, n)) = self.dests.get_mut(dest as usize) {
            *n -= k;
            if *n == 0 {
                self.dest_slot.remove(d);
                self.free_dests.push(dest);
            }
        }
    }

    /// Every envelope of `batch` is resolved: its handle gets the outcome, its buffer may
    /// serve the next batch.
    fn finish_batch(&mut self, batch: u64) {
        let Some(mut b) = self.batches.remove(&batch) else {
            return;
        };
        if let Some(tx) = b.tx.take() {
            let _ = tx.send(b.out);
        }
        if self.spare_bufs.len() < SPARE_BATCHES {
            // Unique unless a resend of one of its frames is still being written.
            if let Ok(buf) = b.frames.try_into_mut() {
                if buf.capacity() <= SPARE_BYTES {
                    self.spare_bufs.push(buf);
                }
            }
        }
    }
}

struct Shared {
    st: Mutex<State>,
    /// Window room freed, or the agent closed.
    room: Notify,
    /// A retry was scheduled, or ACKs were held: the writer looks again.
    wake: Notify,
    acks: Mutex<HeldAcks>,
    counters: Counters,
    welcome: Mutex<Welcome>,
    /// Envelopes received and not yet taken by the application, and their frame bytes.
    queued: AtomicU64,
    queued_bytes: AtomicU64,
    /// Emptied vectors of received envelopes, back from the application for the reader to
    /// fill again (at most [`SPARE_VECS`], each of at most [`SPARE_VEC_LEN`]).
    spare_vecs: Mutex<Vec<Vec<Envelope>>>,
    /// End-to-end keys and contexts, when the agent seals and opens.
    e2e: Option<Mutex<E2e>>,
    /// The current connection's writer. Taken after `st` when both are held.
    link: Mutex<LinkSlot>,
    /// Batches for the writer, in the order sent, with the connection generation each was
    /// recorded under. Bounded by the window (each is a pending batch).
    outbox: Mutex<VecDeque<(u64, Bytes)>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn link(&self) -> MutexGuard<'_, LinkSlot> {
        self.link.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn outbox(&self) -> MutexGuard<'_, VecDeque<(u64, Bytes)>> {
        self.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the writer out: nothing more is written on this connection.
    fn unlink(&self) -> Option<LinkWriter> {
        self.link().writer.take()
    }

    /// Gives the connection up without waiting on its socket ([`LinkWriter::abandon`]).
    fn abandon_link(&self) {
        if let Some(mut w) = self.unlink() {
            w.abandon();
        }
    }

    /// Bytes the connection's socket has taken so far (0 without one).
    fn link_written(&self) -> u64 {
        self.link().writer.as_ref().map_or(0, LinkWriter::written)
    }

    /// Nothing waits to be written on the connection (or there is none).
    fn link_idle(&self) -> bool {
        self.link().writer.as_ref().is_none_or(LinkWriter::is_idle) && self.outbox().is_empty()
    }

    /// Queues `frames` on the connection's writer after the batches waiting in the outbox,
    /// and writes what the socket takes now; `true` when nothing waits any more.
    fn write_link(&self, frames: Bytes) -> Result<bool, ClientError> {
        let mut l = self.link();
        self.take_outbox(&mut l);
        let w = l.writer.as_mut().ok_or(ClientError::Gone)?;
        w.push(frames);
        if w.is_idle() {
            return Ok(true);
        }
        w.try_flush()
    }

    /// Moves the batches waiting in the outbox to the connection's writer, in order; drops
    /// those of an older connection (the current one wrote them again when it started) and,
    /// while disconnected, all (pending: the next connection writes them).
    fn take_outbox(&self, l: &mut LinkSlot) {
        for (gen, frames) in self.outbox().drain(..) {
            if let Some(w) = l.writer.as_mut().filter(|_| gen == l.gen) {
                w.push(frames);
            }
        }
    }

    /// Writes `frames` after everything waiting on the connection, waiting for its socket as
    /// long as needed.
    async fn flush_link(&self, mut frames: Bytes, ready: &WriteReady) -> Result<(), ClientError> {
        while !self.write_link(std::mem::take(&mut frames))? {
            ready.wait().await?;
        }
        Ok(())
    }

    /// Writes `frames`, a batch recorded while connection `gen` was current, after the batches
    /// before it. With `direct`, and when the writer is free, in the caller's task at once
    /// (held ACKs go with it when nothing waited before it): an agent sending at a low rate
    /// costs no hand-off. Otherwise the batch waits in the outbox and the driver writes it (as
    /// it writes the rest of one that found the socket full), with whatever else waits by then.
    fn write_batch(&self, frames: Bytes, gen: u64, direct: bool) {
        if direct {
            if let Ok(mut l) = self.link.try_lock() {
                self.take_outbox(&mut l);
                if l.gen != gen {
                    // A newer connection wrote it already (it was pending when it started).
                    return;
                }
                let Some(w) = l.writer.as_mut() else {
                    // Pending: the next connection writes it.
                    return;
                };
                if w.is_idle() {
                    let mut acks = Vec::new();
                    self.due_acks(true, &mut acks);
                    if !acks.is_empty() {
                        let mut b = BytesMut::new();
                        flush_acks(&mut acks, &mut b);
                        w.push(b.freeze());
                    }
                }
                w.push(frames);
                // One buffer's worth at most here (others may wait on the lock); the driver
                // writes the rest.
                if w.try_flush_passes(1).unwrap_or(false) {
                    return;
                }
                drop(l);
                self.wake.notify_one();
                return;
            }
        }
        self.outbox().push_back((gen, frames));
        self.wake.notify_one();
    }

    fn held_acks(&self) -> MutexGuard<'_, HeldAcks> {
        self.acks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds ACKs for `ids` (answering `bytes` frame bytes) until the writer sends them; wakes
    /// the writer for the first of them (it then waits [`ACK_DELAY`]) and when they become
    /// urgent.
    fn hold_acks(&self, ids: impl IntoIterator<Item = MessageId>, bytes: u64) {
        let mut h = self.held_acks();
        let before = h.ids.len();
        let room = MAX_HELD_ACKS.saturating_sub(before);
        h.ids.extend(ids.into_iter().take(room));
        if h.ids.len() == before {
            return;
        }
        h.bytes = h.bytes.saturating_add(bytes);
        let first = h.since.is_none();
        if first {
            h.since = Some(Instant::now());
        }
        let urgent = h.ids.len() >= h.count || h.bytes >= h.max_bytes;
        let wake = first || (urgent && !h.urgent);
        h.urgent |= urgent;
        drop(h);
        if wake {
            self.wake.notify_one();
        }
    }

    /// Moves the held ACKs to `out` when they are due (or with `all`); otherwise when they
    /// will be.
    fn due_acks(&self, all: bool, out: &mut Vec<MessageId>) -> Option<Instant> {
        let mut h = self.held_acks();
        let due = h.since? + ACK_DELAY;
        if all || h.urgent || due <= Instant::now() {
            out.append(&mut h.ids);
            h.bytes = 0;
            h.since = None;
            h.urgent = false;
            return None;
        }
        Some(due)
    }

    /// The thresholds for a new session: a share of its deliver window.
    fn ack_limits(&self, w: &Welcome) {
        let mut h = self.held_acks();
        h.count = (w.deliver_window as u64 / ACK_EARLY_SHARE).max(1) as usize;
        h.max_bytes = (w.deliver_window_bytes as u64 / ACK_EARLY_SHARE).max(1);
    }

    fn on_acks(&self, acks: &AckBatch) {
        let mut st = self.lock();
        if st.accept(acks.ids(), &self.counters) > 0 {
            self.freed(st);
        }
    }

    /// Window room was freed: wakes the waiting senders when one of them may fit now, and
    /// [`Agent::flush`] once nothing is pending.
    fn freed(&self, mut st: MutexGuard<'_, State>) {
        let used = st.pending.len() as u32;
        let wake = used == 0 || st.need.is_some_and(|n| used.saturating_add(n) <= st.window);
        if wake {
            st.need = None;
        }
        drop(st);
        if wake {
            self.room.notify_waiters();
        }
    }

    fn on_nack(&self, n: Nack) {
        bump(&self.counters.nacked, 1);
        let retry = n.reason().is_some_and(Reason::retryable);
        let mut st = self.lock();
        // Not pending, or waiting for its retry (off the wire): a NACK the relay owed nobody.
        let Some(p) = st.pending.get_mut(&n.message_id).filter(|p| !p.waiting) else {
            return;
        };
        let delay = RETRY_FIRST
            .saturating_mul(1 << p.attempts.min(16))
            .min(RETRY_MAX);
        if retry && unix_ms() + (delay.as_millis() as u64) < p.expires_ms {
            p.attempts += 1;
            p.waiting = true;
            let seq = p.seq;
            st.retries
                .push(Reverse((Instant::now() + delay, seq, n.message_id)));
            drop(st);
            self.wake.notify_one();
            return;
        }
        let how = if retry {
            Settle::Expired
        } else {
            Settle::Refused(n.code, n.text)
        };
        st.settle(n.message_id, how, &self.counters);
        self.freed(st);
    }

    /// Keeps an emptied vector of received envelopes for the reader (memory still in cache).
    fn give_back(&self, v: Vec<Envelope>) {
        if v.capacity() == 0 || v.capacity() > SPARE_VEC_LEN {
            return;
        }
        let mut spare = self.spare_vecs.lock().unwrap_or_else(|p| p.into_inner());
        if spare.len() < SPARE_VECS {
            spare.push(v);
        }
    }

    /// A vector for the next read's envelopes, with room for at least `n`.
    fn fresh_vec(&self, n: usize) -> Vec<Envelope> {
        let v = self
            .spare_vecs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop();
        let mut v = v.unwrap_or_default();
        v.clear();
        v.reserve(n);
        v
    }

    fn e2e(&self) -> Result<MutexGuard<'_, E2e>, ClientError> {
        self.e2e
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
            .ok_or(ClientError::E2e(E2eError::NoUsableKey))
    }

    fn on_directory(&self, d: DirectoryAnswer) {
        if d.request_id == 0 {
            // The automatic PUBLISH of each connection and rotation: a retryable refusal
            // (one publish a second, directory full) is tried again a second later.
            if let Some(r) = d.refusal() {
                tracing::warn!(reason = %r, "the relay's directory refused this agent's bundle");
                if r.retryable() {
                    self.lock().republish_at = Some(Instant::now() + Duration::from_millis(1100));
                    self.wake.notify_one();
                }
            }
            return;
        }
        if let Some(tx) = self.lock().dir.remove(&d.request_id) {
            let _ = tx.send(d);
        }
    }

    /// The PUBLISH of this agent's current bundle (automatic: request id 0).
    fn publish_frame(&self, request_id: u32) -> Option<Bytes> {
        let e = self.e2e.as_ref()?;
        let bundle = e
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .bundle()
            .bytes()
            .clone();
        Some(Frame::Publish(Publish { request_id, bundle }).to_bytes())
    }

    /// The automatic PUBLISH again, when a retryable refusal asked for it and its time came.
    fn republish_if_due(&self) -> Option<Bytes> {
        let mut st = self.lock();
        let at = st.republish_at?;
        if at > Instant::now() {
            return None;
        }
        st.republish_at = None;
        drop(st);
        self.publish_frame(0)
    }

    /// When this agent's end-to-end key rotates next (Unix ms).
    fn rotation_due_ms(&self) -> Option<u64> {
        let e = self.e2e.as_ref()?;
        Some(
            e.lock()
                .unwrap_or_else(|p| p.into_inner())
                .rotation_due_ms(),
        )
    }

    /// Rotates the end-to-end key when due; the new bundle's PUBLISH.
    fn rotate_if_due(&self, now_ms: u64) -> Option<Bytes> {
        let e = self.e2e.as_ref()?;
        let mut e = e.lock().unwrap_or_else(|p| p.into_inner());
        if e.rotation_due_ms() > now_ms {
            return None;
        }
        if let Err(err) = e.rotate(now_ms) {
            tracing::warn!(error = %err, "end-to-end key rotation failed");
            return None;
        }
        let bundle = e.bundle().bytes().clone();
        Some(
            Frame::Publish(Publish {
                request_id: 0,
                bundle,
            })
            .to_bytes(),
        )
    }

    fn on_receipt(&self, r: Receipt) {
        if r.status == ReceiptStatus::Delivered {
            if let Some(e) = &self.e2e {
                e.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .on_delivered(&r.message_id);
            }
        }
        let Some((_, tx)) = self.lock().receipts.remove(&r.message_id) else {
            return;
        };
        let _ = tx.send(match r.status {
            ReceiptStatus::Delivered => Delivery::Delivered { at_ms: r.at_ms },
            ReceiptStatus::Expired => Delivery::Expired { at_ms: r.at_ms },
        });
    }

    /// Ends the agent: every pending envelope resolves as unanswered (their ids returned in
    /// the order sent), senders waiting for room get [`ClientError::Gone`].
    fn shut(&self) -> Vec<MessageId> {
        let mut st = self.lock();
        st.closed = true;
        let mut left: Vec<(u64, MessageId)> =
            st.pending.iter().map(|(id, p)| (p.seq, id)).collect();
        left.sort_unstable();
        for (_, id) in &left {
            st.settle(*id, Settle::Unanswered, &self.counters);
        }
        st.receipts.clear();
        drop(st);
        self.room.notify_waiters();
        left.into_iter().map(|(_, id)| id).collect()
    }

    fn stats(&self) -> Stats {
        let c = &self.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            sent: g(&c.sent),
            accepted: g(&c.accepted),
            nacked: g(&c.nacked),
            retried: g(&c.retried),
            refused: g(&c.refused),
            expired: g(&c.expired),
            resent: g(&c.resent),
            reconnects: g(&c.reconnects),
            received: g(&c.received),
            dropped_best_effort: g(&c.dropped_best_effort),
            dropped_unacked: g(&c.dropped_unacked),
            in_flight: self.lock().pending.len() as u64,
            unwritten_bytes: self.unwritten() as u64,
        }
    }

    /// Bytes waiting for the connection's socket, in the writer and in the outbox.
    fn unwritten(&self) -> usize {
        let writer = self.link().writer.as_ref().map_or(0, LinkWriter::unwritten);
        let outbox: usize = self.outbox().iter().map(|(_, f)| f.len()).sum();
        writer + outbox
    }
}

enum Out {
    /// A control frame for the current connection only (directory requests).
    Control(Bytes),
    /// A PING or PONG: dropped while the relay takes none of the agent's bytes.
    Heartbeat(Bytes),
    /// Write what is queued, CLOSE, wait for the relay's CLOSE until the deadline.
    Close {
        deadline: Instant,
        done: Option<oneshot::Sender<Option<Close>>>,
    },
}

/// A connected agent. See the [crate documentation](crate) for the tour.
///
/// Dropping an agent closes it in the background (within [`ClientConfig::close_timeout`],
/// writing its queued envelopes and ACKs first) when a tokio runtime is running;
/// [`Agent::close`] does the same and reports what stayed unanswered.
pub struct Agent {
    id: AgentId,
    sh: Arc<Shared>,
    out: mpsc::Sender<Out>,
    inbox: mpsc::UnboundedReceiver<Vec<Envelope>>,
    ready: VecDeque<Envelope>,
    ids: MessageIds,
    close_timeout: Duration,
    /// How long a directory request waits for its answer.
    request_timeout: Duration,
    /// Ends with the envelopes left unanswered, in the order sent.
    driver: Option<JoinHandle<Vec<MessageId>>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("id", &self.id)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Resolves to the relay's answer to one envelope ([`Agent::send`]), and to its receipt when
/// the envelope asked for one.
#[derive(Debug)]
pub struct SendHandle {
    id: MessageId,
    batch: BatchHandle,
    outcome: Option<Outcome>,
    receipt: Option<oneshot::Receiver<Delivery>>,
}

impl SendHandle {
    /// The envelope's message id.
    pub fn message_id(&self) -> MessageId {
        self.id
    }

    /// Waits for the relay's answer (retries and reconnections happen meanwhile).
    ///
    /// ```no_run
    /// # async fn demo(agent: &openmesh_agent::Agent, env: openmesh_dataplane::wire::Envelope) -> Result<(), openmesh_agent::ClientError> {
    /// use openmesh_agent::Outcome;
    /// match agent.send(&env).await?.outcome().await {
    ///     Outcome::Accepted => {}
    ///     Outcome::Refused { text, .. } => eprintln!("refused: {text}"),
    ///     other => eprintln!("{other:?}"),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn outcome(&mut self) -> Outcome {
        if let Some(o) = &self.outcome {
            return o.clone();
        }
        let b = self.batch.outcome_ref().await;
        let o = if b.accepted > 0 {
            Outcome::Accepted
        } else if b.sent > 0 {
            Outcome::Sent
        } else if let Some((_, code, text)) = b.refused.into_iter().next() {
            Outcome::Refused {
                reason: Reason::from_u16(code),
                code,
                text,
            }
        } else if !b.expired.is_empty() {
            Outcome::Expired
        } else {
            Outcome::Unanswered
        };
        self.outcome = Some(o.clone());
        o
    }

    /// Waits for the receipt of an envelope sent with a receipt flag: delivered, or expired
    /// undelivered. `None` when the envelope asked for none, was refused, or the agent closed
    /// first.
    ///
    /// ```no_run
    /// # async fn demo(agent: &openmesh_agent::Agent, bob: openmesh_dataplane::wire::AgentId) -> Result<(), openmesh_agent::ClientError> {
    /// use openmesh_dataplane::wire::flags;
    /// let mut b = agent.envelope_to(bob);
    /// b.flags = flags::RECEIPT_DELIVERED | flags::RECEIPT_EXPIRED;
    /// let mut h = agent.send(&b.build(b"ping").expect("small")).await?;
    /// println!("{:?}", h.delivery().await);
    /// # Ok(()) }
    /// ```
    pub async fn delivery(&mut self) -> Option<Delivery> {
        match self.outcome().await {
            Outcome::Accepted => self.receipt.as_mut()?.await.ok(),
            _ => None,
        }
    }
}

/// Resolves to the answers to a [`Batch`] ([`Agent::send_batch`]) once every envelope in it
/// has one. Dropping it discards them (the envelopes are still sent and retried).
#[derive(Debug)]
pub struct BatchHandle {
    rx: Option<oneshot::Receiver<BatchOutcome>>,
    ready: Option<BatchOutcome>,
}

impl BatchHandle {
    /// Waits until every envelope of the batch has its answer.
    pub async fn outcome(mut self) -> BatchOutcome {
        self.outcome_ref().await
    }

    async fn outcome_ref(&mut self) -> BatchOutcome {
        if let Some(o) = self.ready.take() {
            return o;
        }
        match self.rx.take() {
            Some(rx) => rx.await.unwrap_or_default(),
            None => BatchOutcome::default(),
        }
    }
}

impl Agent {
    /// Connects to the first relay of [`ClientConfig::relays`] that answers (each attempt
    /// within `cfg.connect_timeout`), and starts the agent. Fails with the last attempt's error
    /// when none does.
    ///
    /// ```no_run
    /// # async fn demo(cfg: openmesh_agent::ClientConfig) -> Result<(), openmesh_agent::ClientError> {
    /// let agent = openmesh_agent::Agent::connect(cfg).await?;
    /// println!("connected as {} to relay {}", agent.id(), agent.welcome().relay_id);
    /// # Ok(()) }
    /// ```
    pub async fn connect(cfg: ClientConfig) -> Result<Agent, ClientError> {
        let mut last = ClientError::Gone;
        let mut first = None;
        for (i, relay) in cfg.relays().enumerate() {
            match open(&cfg, relay, cfg.deep_window()).await {
                Ok(o) => {
                    first = Some((i, o));
                    break;
                }
                Err(e) => last = e,
            }
        }
        let (idx, opened) = first.ok_or(last)?;
        let ids = MessageIds::new()?;
        let sh = Arc::new(Shared {
            st: Mutex::new(State {
                pending: SeqTable::new(ids.prefix()),
                window: cfg.window.max(1),
                dest_window: cfg.destination_window.max(1),
                ..State::default()
            }),
            room: Notify::new(),
            wake: Notify::new(),
            acks: Mutex::new(HeldAcks {
                count: 1,
                max_bytes: 1,
                ..HeldAcks::default()
            }),
            counters: Counters::default(),
            welcome: Mutex::new(opened.welcome.clone()),
            queued: AtomicU64::new(0),
            queued_bytes: AtomicU64::new(0),
            spare_vecs: Mutex::new(Vec::new()),
            link: Mutex::new(LinkSlot::default()),
            outbox: Mutex::new(VecDeque::new()),
            e2e: match &cfg.e2e {
                None => None,
                Some(e) => {
                    let signer = cfg
                        .identity
                        .signing_key()
                        .map_err(|_| ClientError::E2e(E2eError::Crypto))?;
                    let capability = Capability {
                        transports: cfg.hello.transports,
                        classes: opened.welcome.classes,
                        schemas: cfg.hello.schemas.clone(),
                    };
                    Some(Mutex::new(E2e::new(
                        e.clone(),
                        signer,
                        capability,
                        opened.welcome.key_rotation_s,
                        opened.welcome.max_ttl_ms,
                        unix_ms(),
                    )?))
                }
            },
        });
        let (out_tx, out_rx) = mpsc::channel(16_384);
        let (in_tx, in_rx) = mpsc::unbounded_channel();
        let driver = tokio::spawn(drive(
            sh.clone(),
            cfg.clone(),
            out_rx,
            out_tx.downgrade(),
            in_tx,
            (idx, opened),
        ));
        Ok(Agent {
            id: cfg.identity.agent_id(),
            sh,
            out: out_tx,
            inbox: in_rx,
            ready: VecDeque::new(),
            ids,
            close_timeout: cfg.close_timeout,
            request_timeout: cfg.connect_timeout,
            driver: Some(driver),
        })
    }

    /// This agent's id (its Ed25519 public key).
    pub fn id(&self) -> AgentId {
        self.id
    }

    /// The current session's contract (it changes when the agent reconnects).
    pub fn welcome(&self) -> Welcome {
        self.sh
            .welcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The agent's counters.
    ///
    /// ```no_run
    /// # fn demo(agent: &openmesh_agent::Agent) {
    /// let s = agent.stats();
    /// println!("{} accepted, {} in flight, {} reconnects", s.accepted, s.in_flight, s.reconnects);
    /// # }
    /// ```
    pub fn stats(&self) -> Stats {
        self.sh.stats()
    }

    /// A fresh message id (random per agent, then counting).
    pub fn next_message_id(&self) -> MessageId {
        self.ids.next()
    }

    /// An empty batch with room for `bytes` of encoded envelopes, on the buffer of an answered
    /// batch when one is free: a sender of many batches writes into memory still in cache.
    ///
    /// ```no_run
    /// # async fn demo(agent: &openmesh_agent::Agent, bob: openmesh_dataplane::wire::AgentId) -> Result<(), openmesh_agent::ClientError> {
    /// let mut batch = agent.batch(64 << 10);
    /// for i in 0u32..100 {
    ///     batch.push(&agent.envelope_to(bob).build(&i.to_be_bytes()).expect("small"));
    /// }
    /// agent.send_batch(batch).await?;
    /// # Ok(()) }
    /// ```
    pub fn batch(&self, bytes: usize) -> Batch {
        let (buf, items) = {
            let mut st = self.sh.lock();
            (st.spare_bufs.pop(), st.spare_items.pop())
        };
        Batch::reuse(buf.unwrap_or_default(), items.unwrap_or_default(), bytes)
    }

    /// `n` fresh message ids at once, in order: cheaper than `n` calls of
    /// [`Agent::next_message_id`] when filling a batch.
    ///
    /// ```no_run
    /// # async fn demo(agent: &openmesh_agent::Agent, bob: openmesh_dataplane::wire::AgentId) -> Result<(), openmesh_agent::ClientError> {
    /// use openmesh_agent::{unix_ms, Batch, EnvelopeTemplate};
    /// let t = EnvelopeTemplate::new(&agent.envelope_to(bob), 64)?;
    /// let mut batch = Batch::with_capacity(t.frame_len() * 32);
    /// for (seq, id) in agent.message_ids(32).enumerate() {
    ///     batch.push_template(&t, id, unix_ms(), |p| p[..8].copy_from_slice(&seq.to_be_bytes()));
    /// }
    /// agent.send_batch(batch).await?;
    /// # Ok(()) }
    /// ```
    pub fn message_ids(&self, n: u64) -> MessageIdRange {
        self.ids.take(n)
    }

    /// A builder for an at-least-once envelope from this agent to `to`, with a fresh message id,
    /// created now and expiring after [`crate::DEFAULT_TTL`] (or the relay's `max_ttl_ms` when lower).
    /// Set its fields (class, schema, constraints, flags, `expires_ms`) before building.
    ///
    /// ```no_run
    /// # fn demo(agent: &openmesh_agent::Agent, bob: openmesh_dataplane::wire::AgentId) {
    /// use openmesh_dataplane::wire::DeliveryClass;
    /// let mut b = agent.envelope_to(bob);
    /// b.class = DeliveryClass::Durable;
    /// b.schema = "market/proposal@2.1".into();
    /// let env = b.build(b"{\"price\": 12}").expect("small envelope");
    /// # }
    /// ```
    pub fn envelope_to(&self, to: AgentId) -> EnvelopeBuilder {
        let max = self.welcome().max_ttl_ms;
        let ttl = (DEFAULT_TTL.as_millis() as u64).min(if max == 0 { u64::MAX } else { max });
        EnvelopeBuilder::new(
            self.next_message_id(),
            self.id,
            Destination::Agent(to),
            unix_ms(),
            ttl,
        )
    }

    /// Sends one envelope; waits while the window is full. The handle resolves to the relay's
    /// answer ([`SendHandle::outcome`]) and to the receipt when one was asked for.
    ///
    /// ```no_run
    /// # async fn demo(agent: &openmesh_agent::Agent, bob: openmesh_dataplane::wire::AgentId) -> Result<(), openmesh_agent::ClientError> {
    /// let env = agent.envelope_to(bob).build(b"hello").expect("small envelope");
    /// let mut h = agent.send(&env).await?;
    /// println!("{:?}", h.outcome().await);
    /// # Ok(()) }
    /// ```
    pub async fn send(&self, env: &Envelope) -> Result<SendHandle, ClientError> {
        let mut b = Batch::with_capacity(env.frame_len());
        b.push(env);
        let receipt = if b.items[0].wants_receipt && b.items[0].answered {
            let (tx, rx) = oneshot::channel();
            let mut st = self.sh.lock();
            if st.receipts.len() < MAX_AWAITED_RECEIPTS {
                st.receipts.insert(env.message_id(), (env.expires_ms(), tx));
                Some(rx)
            } else {
                None
            }
        } else {
            None
        };
        Ok(SendHandle {
            id: env.message_id(),
            batch: self.send_batch(b).await?,
            outcome: None,
            receipt,
        })
    }

    /// Sends a batch of envelopes; waits until the window has room for all of them (a batch
    /// larger than the window goes when nothing else is in flight). One hand-off to the writer
    /// for the whole batch.
    ///
    /// ```no_run
    /// # async fn demo(agent: &openmesh_agent::Agent, bob: openmesh_dataplane::wire::AgentId) -> Result<(), openmesh_agent::ClientError> {
    /// let mut batch = openmesh_agent::Batch::new();
    /// for i in 0u32..10 {
    ///     batch.push(&agent.envelope_to(bob).build(&i.to_be_bytes()).expect("small"));
    /// }
    /// let out = agent.send_batch(batch).await?.outcome().await;
    /// println!("{} accepted, {} refused", out.accepted, out.refused.len());
    /// # Ok(()) }
    /// ```
    pub async fn send_batch(&self, batch: Batch) -> Result<BatchHandle, ClientError> {
        let Batch {
            buf,
            mut items,
            dests,
            answered,
            ..
        } = batch;
        if items.is_empty() {
            return Ok(BatchHandle {
                rx: None,
                ready: Some(BatchOutcome::default()),
            });
        }
        if buf.len() > u32::MAX as usize {
            // Pending envelopes keep their frame as a 32-bit range of the batch.
            return Err(ClientError::Envelope(
                openmesh_dataplane::wire::WireError::FrameTooLarge {
                    len: buf.len(),
                    max: u32::MAX as usize,
                },
            ));
        }
        let frames = buf.freeze();
        let total = items.len() as u64;
        let sent = total as u32 - answered;
        let (tx, rx) = oneshot::channel();
        let (gen, direct) = loop {
            let room = self.sh.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let mut st = self.sh.lock();
                if st.closed {
                    return Err(ClientError::Gone);
                }
                if st.fits(answered, &dests) {
                    st.record(
                        (&items, &dests),
                        &frames,
                        (answered, sent),
                        tx,
                        &self.sh.counters,
                    );
                    if st.spare_items.len() < SPARE_BATCHES && items.capacity() <= SPARE_ITEMS {
                        st.spare_items.push(std::mem::take(&mut items));
                    }
                    // Half the window free: the link is quiet, and the batch goes at once
                    // from here; a sender ahead by more leaves its batches to the driver,
                    // which writes what piles up meanwhile together.
                    break (st.gen, st.pending.len() as u32 <= st.window / 2);
                }
                st.need = Some(st.need.map_or(answered, |n| n.min(answered)));
            }
            room.await;
        };
        bump(&self.sh.counters.sent, total);
        self.sh.write_batch(frames, gen, direct);
        Ok(BatchHandle {
            rx: Some(rx),
            ready: None,
        })
    }

    /// Waits until every envelope sent so far has its answer (accepted, refused or expired).
    pub async fn flush(&self) {
        loop {
            let room = self.sh.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let st = self.sh.lock();
                if st.pending.is_empty() || st.closed {
                    return;
                }
            }
            room.await;
        }
    }

    /// The application took `n` envelopes of `bytes` frame bytes off the queue.
    fn took(&self, n: u64, bytes: u64) {
        self.sh.queued.fetch_sub(n, Ordering::Relaxed);
        self.sh.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// The next envelope for this agent; `None` once the agent is closed. ACK it with
    /// [`Agent::ack`] once processed (unless [`ClientConfig::auto_ack`] is on).
    ///
    /// ```no_run
    /// # async fn demo(mut agent: openmesh_agent::Agent) -> Result<(), openmesh_agent::ClientError> {
    /// while let Some(env) = agent.recv().await {
    ///     println!("{} from {}", env.message_id(), env.source());
    ///     agent.ack(&env).await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn recv(&mut self) -> Option<Envelope> {
        loop {
            if let Some(e) = self.ready.pop_front() {
                self.took(1, e.frame_len() as u64);
                return Some(e);
            }
            let batch = self.inbox.recv().await?;
            self.ready.extend(batch);
        }
    }

    /// The next envelope if one is ready, without waiting.
    pub fn try_recv(&mut self) -> Option<Envelope> {
        if self.ready.is_empty() {
            while let Ok(b) = self.inbox.try_recv() {
                self.ready.extend(b);
            }
        }
        let e = self.ready.pop_front()?;
        self.took(1, e.frame_len() as u64);
        Some(e)
    }

    /// Waits for envelopes and moves every one that is ready into `out` (at least one).
    /// Returns false once the agent is closed and everything was taken. Cheaper than
    /// [`Agent::recv`] for receivers of many envelopes.
    pub async fn recv_many(&mut self, out: &mut Vec<Envelope>) -> bool {
        let start = out.len();
        out.extend(self.ready.drain(..));
        if out.len() == start {
            match self.inbox.recv().await {
                Some(b) => self.sh.give_back(append(out, b)),
                None => return false,
            }
        }
        while let Ok(b) = self.inbox.try_recv() {
            self.sh.give_back(append(out, b));
        }
        let bytes = out[start..].iter().map(|e| e.frame_len() as u64).sum();
        self.took((out.len() - start) as u64, bytes);
        true
    }

    /// ACKs a received envelope: the relay forgets it (and sends its source a receipt when one
    /// was asked for). Best-effort envelopes need none. ACKs are batched into ACK frames: one
    /// waits up to 1 ms for company before it is written (see [`ClientConfig::auto_ack`]).
    pub async fn ack(&self, env: &Envelope) -> Result<(), ClientError> {
        if env.class() == DeliveryClass::BestEffort {
            return Ok(());
        }
        self.ack_id(env.message_id()).await
    }

    /// ACKs a received envelope by message id.
    pub async fn ack_id(&self, id: MessageId) -> Result<(), ClientError> {
        if self.out.is_closed() {
            return Err(ClientError::Gone);
        }
        self.sh.hold_acks([id], 0);
        Ok(())
    }

    /// Hands every received envelope to `handler` and ACKs it once the handler returns, until
    /// the agent is closed.
    ///
    /// ```no_run
    /// # async fn demo(mut agent: openmesh_agent::Agent) -> Result<(), openmesh_agent::ClientError> {
    /// agent
    ///     .serve(|env| async move { println!("{} bytes", env.payload().len()) })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn serve<F, Fut>(&mut self, mut handler: F) -> Result<(), ClientError>
    where
        F: FnMut(Envelope) -> Fut,
        Fut: Future<Output = ()>,
    {
        while let Some(env) = self.recv().await {
            let (id, class) = (env.message_id(), env.class());
            handler(env).await;
            if class != DeliveryClass::BestEffort {
                self.ack_id(id).await?;
            }
        }
        Ok(())
    }

    /// This agent's signed key bundle (its end-to-end public keys and capability descriptor),
    /// as published at the relay on every connection and key rotation. `None` without
    /// [`ClientConfig::e2e`].
    pub fn bundle(&self) -> Option<KeyBundle> {
        self.sh.e2e().ok().map(|e| e.bundle().clone())
    }

    /// Counters of sealing and opening (rejections by kind). `None` without
    /// [`ClientConfig::e2e`].
    pub fn e2e_stats(&self) -> Option<E2eStats> {
        self.sh.e2e().ok().map(|e| e.stats())
    }

    /// One directory request and its answer. A lookup refused `rate_limited` (more than the
    /// relay's 32 requests a second) is asked again a little later, within the request timeout.
    async fn directory(
        &self,
        frame: impl Fn(u32) -> Frame,
        retry_rate_limited: bool,
    ) -> Result<DirectoryAnswer, ClientError> {
        let deadline = Instant::now() + self.request_timeout;
        loop {
            let (tx, rx) = oneshot::channel();
            let id = {
                let mut st = self.sh.lock();
                if st.closed {
                    return Err(ClientError::Gone);
                }
                st.next_request = st.next_request.wrapping_add(1).max(1);
                let id = st.next_request;
                st.dir.insert(id, tx);
                id
            };
            if self
                .out
                .send(Out::Control(frame(id).to_bytes()))
                .await
                .is_err()
            {
                return Err(ClientError::Gone);
            }
            match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(a)) => match a.refusal() {
                    None => return Ok(a),
                    Some(Reason::RateLimited)
                        if retry_rate_limited && Instant::now() + DIRECTORY_RETRY < deadline =>
                    {
                        tokio::time::sleep(DIRECTORY_RETRY).await;
                    }
                    Some(r) => return Err(ClientError::Directory(r)),
                },
                Ok(Err(_)) => return Err(ClientError::Gone),
                Err(_) => {
                    // Lost with its connection, or the relay did not answer in time.
                    self.sh.lock().dir.remove(&id);
                    return Err(ClientError::Timeout);
                }
            }
        }
    }

    /// Publishes this agent's bundle at the relay now (it is published automatically on every
    /// connection and key rotation; this waits for the relay's answer).
    ///
    /// ```no_run
    /// # async fn demo(agent: &openmesh_agent::Agent) -> Result<(), openmesh_agent::ClientError> {
    /// agent.publish().await?;
    /// # Ok(()) }
    /// ```
    pub async fn publish(&self) -> Result<(), ClientError> {
        let bundle = self.sh.e2e()?.bundle().bytes().clone();
        self.directory(
            |request_id| {
                Frame::Publish(Publish {
                    request_id,
                    bundle: bundle.clone(),
                })
            },
            false,
        )
        .await
        .map(|_| ())
    }

    /// Looks `agent`'s bundle up in the relay's directory, verifies it (signed by `agent`'s
    /// identity, so a relay cannot substitute keys) and caches it
    /// ([`E2eConfig::bundle_cache`](crate::E2eConfig::bundle_cache)). `None`: not published.
    ///
    /// ```no_run
    /// # async fn demo(agent: &openmesh_agent::Agent, bob: openmesh_dataplane::wire::AgentId) -> Result<(), openmesh_agent::ClientError> {
    /// if let Some(b) = agent.lookup(bob).await? {
    ///     println!("bob speaks {:?}", b.capability.schemas);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn lookup(&self, agent: AgentId) -> Result<Option<KeyBundle>, ClientError> {
        let a = self
            .directory(
                |request_id| {
                    Frame::Lookup(Lookup {
                        request_id,
                        key: LookupKey::Agent(agent),
                        limit: 1,
                    })
                },
                true,
            )
            .await?;
        let Some(bytes) = a.bundles.into_iter().next() else {
            return Ok(None);
        };
        let b = KeyBundle::decode(bytes).map_err(|_| ClientError::E2e(E2eError::BadSignature))?;
        if b.agent != agent {
            return Err(ClientError::E2e(E2eError::BadSignature));
        }
        if b.expires_ms <= unix_ms() {
            return Ok(None);
        }
        if let Ok(mut e) = self.sh.e2e() {
            e.remember(b.clone(), unix_ms());
        }
        Ok(Some(b))
    }

    /// Every agent whose published descriptor lists `schema` (for example
    /// `market/proposal@2.1`), with its verified bundle, in agent id order (at most `max`).
    /// Bundles that do not verify are left out.
    ///
    /// ```no_run
    /// # async fn demo(agent: &openmesh_agent::Agent) -> Result<(), openmesh_agent::ClientError> {
    /// for seller in agent.lookup_schema("market/proposal@2.1", 100).await? {
    ///     println!("{} speaks it", seller.agent);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn lookup_schema(
        &self,
        schema: &str,
        max: usize,
    ) -> Result<Vec<KeyBundle>, ClientError> {
        let mut out: Vec<KeyBundle> = Vec::new();
        let mut after = AgentId([0; 32]);
        while out.len() < max {
            let want = (max - out.len()).min(u16::MAX as usize) as u16;
            let a = self
                .directory(
                    |request_id| {
                        Frame::Lookup(Lookup {
                            request_id,
                            key: LookupKey::Schema {
                                schema: schema.to_string(),
                                after,
                            },
                            limit: want,
                        })
                    },
                    true,
                )
                .await?;
            let now = unix_ms();
            let mut last = None;
            for bytes in a.bundles {
                let Ok(b) = KeyBundle::decode(bytes) else {
                    continue;
                };
                // A relay answers in id order after `after`; anything else is not used.
                if b.agent <= after || last.is_some_and(|l| b.agent <= l) {
                    continue;
                }
                last = Some(b.agent);
                if !b.speaks(schema) || b.expires_ms <= now || out.len() >= max {
                    continue;
                }
                if let Ok(mut e) = self.sh.e2e() {
                    e.remember(b.clone(), now);
                }
                out.push(b);
            }
            match last {
                Some(l) if a.more => after = l,
                _ => break,
            }
        }
        Ok(out)
    }

    /// Seals `plaintext` end to end to the builder's destination agent and builds the envelope
    /// (the flag that marks it sealed is set). The destination's bundle comes from the cache or
    /// a [`lookup`](Self::lookup).
    ///
    /// ```no_run
    /// # async fn demo(agent: &openmesh_agent::Agent, bob: openmesh_dataplane::wire::AgentId) -> Result<(), openmesh_agent::ClientError> {
    /// let env = agent.seal(&agent.envelope_to(bob), b"for bob only").await?;
    /// agent.send(&env).await?;
    /// # Ok(()) }
    /// ```
    pub async fn seal(
        &self,
        b: &EnvelopeBuilder,
        plaintext: &[u8],
    ) -> Result<Envelope, ClientError> {
        let Destination::Agent(to) = b.destination else {
            return Err(ClientError::E2e(E2eError::WrongRecipient));
        };
        let now = unix_ms();
        let cached = self.sh.e2e()?.cached(&to, now).cloned();
        let bundle = match cached {
            Some(b) => b,
            None => self
                .lookup(to)
                .await?
                .ok_or(ClientError::E2e(E2eError::NoBundle))?,
        };
        self.seal_with(b, &bundle, plaintext)
    }

    /// [`seal`](Self::seal) to a bundle the caller holds (no lookup).
    pub fn seal_with(
        &self,
        b: &EnvelopeBuilder,
        to: &KeyBundle,
        plaintext: &[u8],
    ) -> Result<Envelope, ClientError> {
        Ok(self.sh.e2e()?.seal(b, to, plaintext, unix_ms())?)
    }

    /// Opens an envelope sealed to this agent: checks the sender's signature, the key, the
    /// AEAD over payload and header, expiry and replay, and returns the plaintext. Each
    /// rejection is counted by kind in [`e2e_stats`](Self::e2e_stats). ACK the envelope either
    /// way (a rejected one is not worth delivering again).
    ///
    /// ```no_run
    /// # async fn demo(mut agent: openmesh_agent::Agent) -> Result<(), openmesh_agent::ClientError> {
    /// while let Some(env) = agent.recv().await {
    ///     match agent.open(&env) {
    ///         Ok(o) => println!("{}: {} bytes", o.source, o.plaintext.len()),
    ///         Err(e) => eprintln!("rejected: {e}"),
    ///     }
    ///     agent.ack(&env).await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn open(&self, env: &Envelope) -> Result<OpenedEnvelope, E2eError> {
        match self.sh.e2e() {
            Ok(mut e) => e.open(env, unix_ms()),
            Err(_) => Err(E2eError::NoUsableKey),
        }
    }

    /// Closes the agent: waits for the relay's answers to what is in flight, writes every
    /// queued envelope and ACK, sends CLOSE and waits for the relay's CLOSE, all within
    /// [`ClientConfig::close_timeout`]. Reports what stayed unanswered.
    ///
    /// ```no_run
    /// # async fn demo(agent: openmesh_agent::Agent) -> Result<(), openmesh_agent::ClientError> {
    /// let report = agent.close().await?;
    /// assert!(report.unanswered.is_empty(), "{} unanswered", report.unanswered.len());
    /// # Ok(()) }
    /// ```
    pub async fn close(mut self) -> Result<CloseReport, ClientError> {
        let deadline = Instant::now() + self.close_timeout;
        let _ = tokio::time::timeout_at(deadline, self.flush()).await;
        let (done, answer) = oneshot::channel();
        let sent = self
            .out
            .send(Out::Close {
                deadline,
                done: Some(done),
            })
            .await
            .is_ok();
        let relay_close = if sent {
            // The driver answers by the deadline; a little grace for it to get there.
            tokio::time::timeout_at(deadline + Duration::from_secs(1), answer)
                .await
                .ok()
                .and_then(|a| a.ok())
                .flatten()
        } else {
            None
        };
        let unanswered = match self.driver.take() {
            Some(d) => d.await.unwrap_or_else(|_| self.sh.shut()),
            None => self.sh.shut(),
        };
        Ok(CloseReport {
            unanswered,
            relay_close,
            stats: self.sh.stats(),
        })
    }
}

impl Drop for Agent {
    /// Closes in the background: the driver writes what is queued (ACKs included), sends
    /// CLOSE and waits for the relay's, within the close timeout. Without a tokio runtime the
    /// driver stops at once.
    fn drop(&mut self) {
        let Some(driver) = self.driver.take() else {
            return;
        };
        let close = Out::Close {
            deadline: Instant::now() + self.close_timeout,
            done: None,
        };
        match self.out.try_send(close) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(close)) => {
                match tokio::runtime::Handle::try_current() {
                    Ok(rt) => {
                        let out = self.out.clone();
                        rt.spawn(async move { out.send(close).await });
                    }
                    Err(_) => driver.abort(),
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

/// How a connection ended.
enum Ended {
    /// The agent closed (the relay's CLOSE, if it answered).
    Closed,
    /// The connection is gone; reconnect (to `redirect` first, if the relay named one).
    Lost { redirect: Option<SocketAddr> },
}

/// What the reader saw when its connection ended.
#[derive(Default)]
struct ReadEnd {
    close: Option<Close>,
    redirect: Option<SocketAddr>,
}

/// The agent's driver: runs connections one after another until the agent closes; returns
/// the envelopes left unanswered, in the order sent.
async fn drive(
    sh: Arc<Shared>,
    cfg: ClientConfig,
    mut out: mpsc::Receiver<Out>,
    out_tx: mpsc::WeakSender<Out>,
    inbox: mpsc::UnboundedSender<Vec<Envelope>>,
    first: (usize, Opened),
) -> Vec<MessageId> {
    let relays: Vec<SocketAddr> = cfg.relays().collect();
    let (mut idx, opened) = first;
    let mut next = Some(opened);
    let mut redirect = None;
    loop {
        let opened = match next.take() {
            Some(o) => o,
            None => {
                match reconnect(&sh, &cfg, &relays, &mut idx, redirect.take(), &mut out).await {
                    Some(o) => {
                        bump(&sh.counters.reconnects, 1);
                        o
                    }
                    None => break,
                }
            }
        };
        let Some(out_tx) = out_tx.upgrade() else {
            break;
        };
        let conn = Conn {
            sh: &sh,
            cfg: &cfg,
            out: &mut out,
            out_tx,
            inbox: &inbox,
        };
        match conn.run(opened).await {
            Ended::Closed => break,
            Ended::Lost { redirect: r } => {
                tracing::debug!(relay = %relays[idx], "connection lost; reconnecting");
                redirect = r;
            }
        }
    }
    sh.shut()
}

/// Reconnects through the relays with backoff. Meanwhile envelopes queued for the old
/// connection are dropped (they are pending: the new connection writes them), held ACKs wait
/// for it, retries and TTLs run out. `None`: the agent closed first.
async fn reconnect(
    sh: &Shared,
    cfg: &ClientConfig,
    relays: &[SocketAddr],
    idx: &mut usize,
    redirect: Option<SocketAddr>,
    out: &mut mpsc::Receiver<Out>,
) -> Option<Opened> {
    let mut wait = cfg.reconnect_initial;
    let mut target = redirect;
    loop {
        let relay = match target.take() {
            Some(r) => r,
            None => {
                let sleep = tokio::time::sleep(wait);
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        _ = &mut sleep => break,
                        o = out.recv() => match o {
                            None | Some(Out::Close { .. }) => return None,
                            Some(Out::Control(_) | Out::Heartbeat(_)) => {}
                        },
                    }
                }
                expire_pending(sh);
                wait = (wait * 2).min(cfg.reconnect_max);
                *idx = (*idx + 1) % relays.len();
                relays[*idx]
            }
        };
        match open(cfg, relay, cfg.deep_window()).await {
            Ok(o) => return Some(o),
            Err(e) => tracing::debug!(%relay, error = %e, "reconnect failed"),
        }
    }
}

/// While disconnected: resolves pending envelopes whose TTL ran out.
fn expire_pending(sh: &Shared) {
    let now = unix_ms();
    let mut st = sh.lock();
    let gone: Vec<MessageId> = st
        .pending
        .iter()
        .filter(|(_, p)| p.expires_ms <= now)
        .map(|(id, _)| id)
        .collect();
    for id in &gone {
        st.settle(*id, Settle::Expired, &sh.counters);
    }
    st.sweep_receipts(now);
    if !gone.is_empty() {
        sh.freed(st);
    }
}

struct Conn<'a> {
    sh: &'a Arc<Shared>,
    cfg: &'a ClientConfig,
    out: &'a mut mpsc::Receiver<Out>,
    out_tx: mpsc::Sender<Out>,
    inbox: &'a mpsc::UnboundedSender<Vec<Envelope>>,
}

impl Conn<'_> {
    async fn run(self, opened: Opened) -> Ended {
        let Conn {
            sh,
            cfg,
            out,
            out_tx,
            inbox,
        } = self;
        let Opened {
            reader: rd,
            writer: mut wr,
            welcome,
        } = opened;
        let heartbeat = Duration::from_millis(welcome.heartbeat_ms.max(1) as u64);
        *sh.welcome.lock().unwrap_or_else(|p| p.into_inner()) = welcome.clone();
        let (end_tx, mut end_rx) = oneshot::channel();
        let reader = tokio::spawn({
            let sh = sh.clone();
            let inbox = inbox.clone();
            let opts = ReadOpts {
                answer_pings: cfg.answer_pings,
                auto_ack: cfg.auto_ack,
                heartbeat,
                max_queued: MAX_QUEUED.max(welcome.deliver_window as u64),
                max_queued_bytes: MAX_QUEUED_BYTES.max(welcome.deliver_window_bytes as u64),
            };
            async move {
                let end = read(rd, &sh, out_tx, inbox, opts).await;
                let _ = end_tx.send(end);
            }
        });
        let stop = |e: Option<ReadEnd>| Ended::Lost {
            redirect: e.and_then(|e| e.redirect),
        };

        // First a rotation missed while disconnected, then the bundle: every relay this agent
        // reaches serves it, before the envelopes sealed with it, so a receiver can look it up.
        let mut buf = BytesMut::new();
        let _ = sh.rotate_if_due(unix_ms());
        if let Some(p) = sh.publish_frame(0) {
            buf.extend_from_slice(&p);
        }
        let ready = wr.ready();
        // A new generation: everything pending goes out again, in the order first sent; from
        // here on senders write their batches on this connection.
        {
            let mut st = sh.lock();
            st.gen += 1;
            if welcome.send_window > 0 {
                st.window = cfg.window.clamp(1, welcome.send_window);
                // The window may have grown: waiting senders check again.
                st.need = None;
                sh.room.notify_waiters();
            }
            let mut again: Vec<(u64, Bytes)> =
                st.pending.values().map(|p| (p.seq, st.frame(p))).collect();
            for p in st.pending.values_mut() {
                p.waiting = false;
            }
            again.sort_unstable_by_key(|(s, _)| *s);
            if st.gen > 1 {
                bump(&sh.counters.resent, again.len() as u64);
            }
            for (_, f) in again {
                buf.extend_from_slice(&f);
            }
            wr.push(buf.split().freeze());
            *sh.link() = LinkSlot {
                gen: st.gen,
                writer: Some(wr),
            };
        }
        let _unlink = Unlink(sh);
        sh.ack_limits(&welcome);
        let mut acks = Vec::new();
        sh.due_acks(true, &mut acks);
        flush_acks(&mut acks, &mut buf);
        let mut blocked = match sh.write_link(buf.split().freeze()) {
            Ok(idle) => !idle,
            Err(_) => {
                reader.abort();
                return stop(None);
            }
        };

        let mut swept = Instant::now();
        let mut expired_at = Instant::now();
        // Every heartbeat interval, a writer that sealed nothing since the last look lets go
        // of its buffers.
        let (mut looked, mut passes) = (Instant::now(), 0u64);
        let mut rotate_at = sh.rotation_due_ms();
        let mut acks_due = None;
        // Bytes written when the socket last took any, or when nothing waited: a connection
        // that takes nothing for `write_timeout` with something waiting is given up.
        let mut progress = (sh.link_written(), Instant::now());
        loop {
            let due = if blocked {
                // Retries wait for the socket (they may be due already): the driver wakes
                // for the socket, or once a second to resolve what expired meanwhile.
                Instant::now() + heartbeat.min(Duration::from_secs(1))
            } else {
                let mut due = sh
                    .lock()
                    .retries
                    .peek()
                    .map(|Reverse((at, _, _))| *at)
                    .unwrap_or_else(|| Instant::now() + heartbeat);
                if let Some(r) = rotate_at {
                    let r = Duration::from_millis(r.saturating_sub(unix_ms()));
                    due = due.min(Instant::now() + r);
                }
                if let Some(r) = sh.lock().republish_at {
                    due = due.min(r);
                }
                if let Some(a) = acks_due {
                    due = due.min(a);
                }
                due
            };
            let mut closing = None;
            tokio::select! {
                biased;
                e = &mut end_rx => {
                    // The relay is gone or leaving: no waiting on its socket.
                    sh.abandon_link();
                    return stop(e.ok());
                }
                o = out.recv() => {
                    if o.is_none() {
                        closing = Some((Instant::now() + cfg.close_timeout, None));
                    }
                    let mut next = o;
                    let mut n = 0;
                    while let Some(o) = next.take() {
                        match o {
                            // A relay that does not read gets no answers to its PINGs: what
                            // waits to be written stays bounded.
                            Out::Heartbeat(_) if blocked => {}
                            Out::Control(f) | Out::Heartbeat(f) => buf.extend_from_slice(&f),
                            Out::Close { deadline, done } => {
                                closing = Some((deadline, done));
                                break;
                            }
                        }
                        n += 1;
                        if buf.len() >= WRITE_COALESCE || n >= 4096 {
                            break;
                        }
                        next = out.try_recv().ok();
                    }
                }
                r = ready.wait(), if blocked => {
                    if r.is_err() {
                        reader.abort();
                        return stop(None);
                    }
                }
                _ = sh.wake.notified() => {}
                _ = tokio::time::sleep_until(due) => {}
            }
            // What waits goes first; while the socket takes none of it, nothing new is made
            // to wait behind it (retries stay in their heap, ACKs held, PONGs unsent), so a
            // relay that stops reading holds the agent to the window and the held ACKs.
            blocked = match sh.write_link(Bytes::new()) {
                Ok(idle) => !idle,
                Err(_) => {
                    reader.abort();
                    return match closing {
                        Some(c) => closed_broken(c),
                        None => stop(None),
                    };
                }
            };
            let written = sh.link_written();
            if !blocked || written != progress.0 || closing.is_some() {
                // (A close has its own deadline.)
                progress = (written, Instant::now());
            } else if progress.1.elapsed() >= cfg.write_timeout {
                // The relay still talks (its heartbeat keeps the session) but reads nothing.
                tracing::warn!(
                    waited = ?progress.1.elapsed(),
                    "the relay took nothing written: connection given up"
                );
                sh.abandon_link();
                reader.abort();
                return stop(None);
            }
            if !blocked {
                retry_due(sh, &mut buf);
            } else if expired_at.elapsed() >= Duration::from_secs(1) {
                // Envelopes whose TTL ran out while the relay read nothing are resolved.
                expired_at = Instant::now();
                expire_pending(sh);
            }
            if rotate_at.is_some_and(|r| r <= unix_ms()) {
                // One rotation from now, however long the wait was.
                if let Some(p) = sh.rotate_if_due(unix_ms()) {
                    buf.extend_from_slice(&p);
                }
                rotate_at = sh.rotation_due_ms();
            }
            if let Some(p) = sh.republish_if_due() {
                buf.extend_from_slice(&p);
            }
            if swept.elapsed() >= Duration::from_secs(1) {
                swept = Instant::now();
                sh.lock().sweep_receipts(unix_ms());
            }
            if looked.elapsed() >= heartbeat {
                looked = Instant::now();
                if let Some(w) = sh.link().writer.as_mut() {
                    w.release_idle(&mut passes);
                }
            }
            // Held ACKs go when due, or with anything else written.
            acks_due = if blocked && closing.is_none() {
                None
            } else {
                sh.due_acks(
                    !buf.is_empty() || !sh.link_idle() || closing.is_some(),
                    &mut acks,
                )
            };
            flush_acks(&mut acks, &mut buf);
            if let Some((deadline, done)) = closing {
                Frame::Close(Close::new(Reason::Normal, "bye")).encode(&mut buf);
                let written =
                    tokio::time::timeout_at(deadline, sh.flush_link(buf.split().freeze(), &ready))
                        .await
                        .is_ok_and(|r| r.is_ok());
                let answer = if written {
                    tokio::time::timeout_at(deadline, &mut end_rx)
                        .await
                        .ok()
                        .and_then(|r| r.ok())
                        .and_then(|e| e.close)
                } else {
                    None
                };
                drop(ready);
                if let Some(mut w) = sh.unlink() {
                    let _ = tokio::time::timeout_at(deadline, w.shutdown()).await;
                }
                reader.abort();
                if let Some(d) = done {
                    let _ = d.send(answer);
                }
                return Ended::Closed;
            }
            match sh.write_link(buf.split().freeze()) {
                Ok(idle) => blocked = !idle,
                Err(_) => {
                    reader.abort();
                    return stop(None);
                }
            }
            // The buffer's memory comes back once no written part holds it.
            buf.reserve(4096);
        }
    }
}

/// The current connection's writer, shared by its driver and the senders: a sender that
/// finds nothing waiting seals and writes its batch itself, in its own task, with no hand-off.
#[derive(Default)]
struct LinkSlot {
    /// The connection generation the writer belongs to.
    gen: u64,
    /// None while disconnected (and once the connection ended).
    writer: Option<LinkWriter>,
}

/// Takes the connection's writer out of the slot when the connection ends, however it ends.
struct Unlink<'a>(&'a Shared);

impl Drop for Unlink<'_> {
    fn drop(&mut self) {
        self.0.unlink();
    }
}

/// Writes the envelopes whose retry is due into `buf`; resolves those whose TTL ran out.
fn retry_due(sh: &Shared, buf: &mut BytesMut) {
    let now = Instant::now();
    let now_ms = unix_ms();
    let mut st = sh.lock();
    let mut expired = false;
    while let Some(Reverse((at, _, id))) = st.retries.peek().copied() {
        if at > now {
            break;
        }
        st.retries.pop();
        let Some(p) = st.pending.get_mut(&id) else {
            continue;
        };
        if !p.waiting {
            continue;
        }
        if p.expires_ms <= now_ms {
            st.settle(id, Settle::Expired, &sh.counters);
            expired = true;
            continue;
        }
        p.waiting = false;
        let (batch, range) = (p.batch, p.start as usize..p.end as usize);
        if let Some(b) = st.batches.get(&batch) {
            buf.extend_from_slice(&b.frames[range]);
        }
        bump(&sh.counters.retried, 1);
    }
    if expired {
        sh.freed(st);
    }
}

/// The connection broke while the application closed the agent: the close is answered (no
/// CLOSE from the relay) and the agent ends, instead of reconnecting with nobody left to close
/// it.
fn closed_broken(closing: (Instant, Option<oneshot::Sender<Option<Close>>>)) -> Ended {
    if let Some(done) = closing.1 {
        let _ = done.send(None);
    }
    Ended::Closed
}

/// Moves `b`'s items to the end of `out`; returns the emptied vector (for the reader). An
/// empty `out` too small for them takes `b` whole; otherwise `out` keeps its room, so a caller
/// that drains and reuses its vector stops allocating once it is large enough (handing it over
/// instead left the caller a small vector to grow again, in fresh memory, at every call).
fn append(out: &mut Vec<Envelope>, mut b: Vec<Envelope>) -> Vec<Envelope> {
    if out.is_empty() && out.capacity() < b.len() {
        std::mem::replace(out, b)
    } else {
        out.append(&mut b);
        b
    }
}

const SPARE_VECS: usize = 4;
const SPARE_VEC_LEN: usize = 1024;

/// Takes a read's envelopes, leaving a vector with room for as many (one the application
/// gave back when there is one).
fn handed(sh: &Shared, batch: &mut Vec<Envelope>) -> Vec<Envelope> {
    let next = sh.fresh_vec(batch.len());
    std::mem::replace(batch, next)
}

struct ReadOpts {
    answer_pings: bool,
    auto_ack: bool,
    heartbeat: Duration,
    /// Bounds of what waits for the application (envelopes, frame bytes).
    max_queued: u64,
    max_queued_bytes: u64,
}

/// Reads one connection: envelopes to the application, answers to the pending envelopes,
/// PINGs answered, the relay's silence watched.
async fn read(
    mut rd: LinkReader,
    sh: &Shared,
    out: mpsc::Sender<Out>,
    inbox: mpsc::UnboundedSender<Vec<Envelope>>,
    opts: ReadOpts,
) -> ReadEnd {
    let mut end = ReadEnd::default();
    let mut beat = Heartbeat::new(opts.heartbeat, opts.answer_pings);
    let mut acks = Vec::new();
    let mut batch = Vec::new();
    // Envelopes read, counted once per pass (and at the end for the last one).
    let mut received = 0u64;
    'outer: loop {
        // What waits for the application, read once per pass; this pass's envelopes are
        // counted here and added when they are handed over (before the application can
        // take them).
        let (queued, queued_bytes) = (
            sh.queued.load(Ordering::Relaxed),
            sh.queued_bytes.load(Ordering::Relaxed),
        );
        let (mut added, mut added_bytes, mut acked_bytes) = (0u64, 0u64, 0u64);
        loop {
            // Envelopes are taken here as they are decoded; other frames come back below.
            let f = match rd.next_frame_with(&mut |e| {
                received += 1;
                let len = e.frame_len() as u64;
                let acked = e.class() != DeliveryClass::BestEffort;
                if queued + added >= opts.max_queued
                    || queued_bytes + added_bytes + len > opts.max_queued_bytes
                {
                    // Unanswered, an envelope to ACK stays the relay's to deliver again.
                    let dropped = if acked {
                        &sh.counters.dropped_unacked
                    } else {
                        &sh.counters.dropped_best_effort
                    };
                    bump(dropped, 1);
                    return ControlFlow::Continue(());
                }
                added += 1;
                added_bytes += len;
                if acked && opts.auto_ack {
                    acks.push(e.message_id());
                    acked_bytes += len;
                }
                batch.push(e);
                ControlFlow::Continue(())
            }) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(_) => break 'outer,
            };
            match f {
                // Taken above as they were decoded.
                Frame::Envelope(_) => {}
                Frame::Ack(a) => sh.on_acks(&a),
                Frame::Nack(n) => sh.on_nack(n),
                Frame::Receipt(r) => sh.on_receipt(r),
                Frame::Directory(d) => sh.on_directory(d),
                // The relay drains: it closes once what it owes is written; reconnect then,
                // to where it points if it does.
                Frame::GoingAway(g) => end.redirect = g.redirect.parse().ok(),
                Frame::Close(c) => {
                    end.close = Some(c);
                    break 'outer;
                }
                Frame::Ping(p) => {
                    if opts.answer_pings {
                        let _ = out.send(Out::Heartbeat(pong(&p))).await;
                    }
                }
                // Relay-link and handshake frames never come on an agent's session.
                Frame::Pong(_)
                | Frame::Hello(_)
                | Frame::Welcome(_)
                | Frame::LinkHello(_)
                | Frame::LinkAck(_)
                | Frame::LinkNack(_)
                | Frame::Presence(_)
                | Frame::LinkReceipt(_)
                | Frame::Publish(_)
                | Frame::Lookup(_) => {}
            }
        }
        bump(&sh.counters.received, std::mem::take(&mut received));
        if added > 0 {
            sh.queued.fetch_add(added, Ordering::Relaxed);
            sh.queued_bytes.fetch_add(added_bytes, Ordering::Relaxed);
        }
        // ACKed only once handed over (every ACKed envelope is in `batch`): an envelope the
        // application never got, because it is gone, stays the relay's to deliver again.
        if !batch.is_empty() && inbox.send(handed(sh, &mut batch)).is_err() {
            batch.clear();
            acks.clear();
        }
        sh.hold_acks(acks.drain(..), acked_bytes);
        match beat.read(&mut rd).await {
            Heard::Bytes => {}
            Heard::Nothing => {
                // Once per heartbeat interval: the read buffer a burst grew goes (a busy link
                // grows a new one within a few reads).
                rd.release_idle();
            }
            Heard::Ping(f) => {
                let _ = out.send(Out::Heartbeat(f)).await;
            }
            Heard::Dead | Heard::Gone => break,
        }
    }
    bump(&sh.counters.received, received);
    end
}

#[cfg(test)]
mod tests {
    use super::*;
    use openmesh_dataplane::wire::{AgentId, Destination, EnvelopeBuilder, MessageId};

    fn envs(n: u128) -> Vec<Envelope> {
        (0..n)
            .map(|i| {
                EnvelopeBuilder::new(
                    MessageId::from_u128(i),
                    AgentId([1; 32]),
                    Destination::Agent(AgentId([2; 32])),
                    0,
                    10,
                )
                .build(b"x")
                .unwrap()
            })
            .collect()
    }

    #[test]
    fn a_receivers_vector_keeps_its_room_and_the_readers_go_back() {
        // A first call hands the caller the reader's vector whole.
        let mut out = Vec::new();
        let back = append(&mut out, envs(3));
        assert_eq!((out.len(), back.capacity()), (3, 0));
        // The caller drains it and keeps it: it is filled in place from now on.
        let mut out = Vec::with_capacity(64);
        let at = out.as_ptr();
        for _ in 0..3 {
            let batch = envs(40);
            let batch_at = batch.as_ptr();
            let back = append(&mut out, batch);
            assert_eq!(out.len(), 40);
            assert_eq!(out.as_ptr(), at, "the caller's vector was replaced");
            assert!(back.is_empty() && back.as_ptr() == batch_at);
            out.clear();
        }
        // Several batches in one call go one after another, in order.
        append(&mut out, envs(2));
        append(&mut out, envs(3));
        let ids: Vec<u128> = out.iter().map(|e| e.message_id().as_u128()).collect();
        assert_eq!(ids, vec![0, 1, 0, 1, 2]);
    }
}

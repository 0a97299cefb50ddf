//! One core's append log, as a state machine: records in, file operations out, durability
//! back. Pure: the engine carries out each [`LogAction`] on the core's ring and reports the
//! result; nothing here opens a file or reads a clock.
//!
//! Group commit: records appended while a write and its fdatasync are in flight wait in the
//! next batch, which is written and synced as one when the previous sync completes. A ticket
//! given with a record comes back from [`Log::take_durable`] once the record is on disk.
//!
//! ```text
//! append --> pending batch --Write--> on_written --Sync--> on_synced --> tickets durable
//!                           ^ Create first when the batch's segment does not exist yet
//! release --> live count 0 on the oldest, full segment --Remove (side)--> on_side_done
//! tail half full --Create of the next segment ahead (side)--> taken when the tail is full
//! ```
//!
//! Two operations may run at once: the main one (create a segment on demand, write, sync) and a
//! side one ([`Log::poll_side`]: create the next segment before it is needed, remove segments),
//! so that neither preallocating a segment nor removing one holds up a group commit.
//!
//! Segments go oldest first: a released record may name envelopes in any older segment, so a
//! segment is removed only when every older one is gone (else those envelopes would come back at
//! recovery).
//!
//! One operation is in flight at a time. A failed operation fails the log: the tickets of
//! every batch not yet durable come back from [`Log::take_failed`], appends are refused, and
//! [`Log::retry`] starts over in a new segment (the failed one keeps what was synced; recovery
//! cuts it where its good records end).

use std::collections::{BTreeMap, VecDeque};

use bytes::{Bytes, BytesMut};

use super::record::{self, SegmentHeader, SEGMENT_HEADER_LEN};
use crate::wire::Envelope;

/// Sequence numbers in one released record written on retry (a record stays far below the
/// format's size limit).
const MAX_RELEASED_PER_RECORD: usize = 65_536;

/// Identifies what the caller waits for (for example the source connection's ACK).
pub type Ticket = u64;

/// A file operation for the engine.
#[derive(Debug, PartialEq, Eq)]
pub enum LogAction {
    /// Create segment `number` (it must not exist), preallocate `size` bytes of zeros, write
    /// `header` at offset 0, sync the file and then the directory. Answer: [`Log::on_done`].
    Create {
        number: u64,
        header: [u8; SEGMENT_HEADER_LEN],
        size: u64,
    },
    /// Write all of `buf` at `offset` of segment `number`. Answer: [`Log::on_done`].
    Write {
        number: u64,
        offset: u64,
        buf: Bytes,
    },
    /// fdatasync segment `number`. Answer: [`Log::on_done`].
    Sync { number: u64 },
    /// Remove segment `number`, then sync the directory. Answer: [`Log::on_side_done`].
    Remove { number: u64 },
    /// Read `len` bytes at `offset` of segment `number` (a live record to copy forward).
    /// Answer: [`Log::on_side_read`], or [`Log::on_side_done`] with `false`.
    Read { number: u64, offset: u64, len: u32 },
}

/// Why an append was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    #[error("the store failed and has not recovered")]
    Failed,
    #[error("only envelopes for one agent are stored")]
    NoAgent,
}

struct Batch {
    number: u64,
    offset: u64,
    buf: BytesMut,
    tickets: Vec<Ticket>,
    /// Sequence numbers of the envelope records in it.
    seqs: Vec<u64>,
    /// Records copied forward into it: (sequence number, where it was, where it goes). They
    /// move once the batch is synced.
    copies: Vec<(u64, Loc, Loc)>,
    /// Sequence numbers its released records name (written again after a failure).
    released: Vec<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Create,
    Write,
    Sync,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Spare,
    Remove(u64),
    /// Reading record `seq` to copy it forward.
    Read(u64),
}

/// Where a live record is: segment, offset, length (header included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Loc {
    segment: u64,
    offset: u64,
    len: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Spare {
    number: u64,
    size: u64,
    created_ms: u64,
    ready: bool,
    /// Already the tail (while still being created).
    adopted: bool,
}

impl Spare {
    fn segment(&self, created: bool) -> Segment {
        Segment {
            live: 0,
            live_bytes: 0,
            end: SEGMENT_HEADER_LEN as u64,
            size: self.size,
            created,
            full: false,
            created_ms: self.created_ms,
            keep_until_ms: 0,
        }
    }
}

/// One of this log's segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Envelope records in it not yet released.
    pub live: usize,
    /// Their bytes.
    pub live_bytes: u64,
    /// Where the next record goes (records appended, durable or not).
    pub end: u64,
    /// Preallocated size.
    pub size: u64,
    /// Exists on disk.
    pub created: bool,
    /// Takes no more records.
    pub full: bool,
    /// When it was started (Unix milliseconds; goes into its header).
    pub created_ms: u64,
    /// A segment of duplicate windows written at start (no envelopes in it): kept until then
    /// (Unix milliseconds), out of the way of the other segments' removal and compaction. 0
    /// for every other segment.
    pub keep_until_ms: u64,
}

/// A segment a start wrote for this core (`crate::store::recovery::plan`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Existing {
    pub number: u64,
    /// Its length: appends never go there.
    pub end: u64,
    /// Sequence number, offset and length of each live envelope record in it.
    pub records: Vec<(u64, u64, u32)>,
    /// See [`Segment::keep_until_ms`].
    pub keep_until_ms: u64,
}

/// Counters for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LogStats {
    /// Syncs completed (each one a group).
    pub groups: u64,
    /// Tickets made durable.
    pub durable: u64,
    /// Bytes written.
    pub bytes: u64,
    pub segments_created: u64,
    pub segments_removed: u64,
    pub failures: u64,
    /// Live records copied forward by compaction.
    pub copied: u64,
}

/// One core's append log.
pub struct Log {
    core: u16,
    segment_bytes: u64,
    next_number: u64,
    segments: BTreeMap<u64, Segment>,
    /// Live envelopes: sequence number -> where its record is.
    index: super::index::SeqIndex<Loc>,
    /// The segment being compacted: its live records still to copy forward.
    compacting: Option<(u64, Vec<u64>)>,
    /// A segment with a damaged live record: never compacted.
    no_compaction: Option<u64>,
    /// Released while the log was failed, or in a batch that failed: to write on retry.
    unwritten_releases: Vec<u64>,
    /// The segment appends go to.
    tail: Option<u64>,
    pending: VecDeque<Batch>,
    in_flight: Option<Batch>,
    step: Option<Step>,
    /// When the operation in flight began (the caller's clock, microseconds).
    since_us: u64,
    /// Set when an action is due that `poll_action` has not handed out yet.
    due: Option<LogAction>,
    /// The side operation in flight, and when it began.
    side: Option<Side>,
    side_since_us: u64,
    /// The next segment, created ahead.
    spare: Option<Spare>,
    /// A removal failed at this time (microseconds): the next is tried a second later.
    remove_failed_us: Option<u64>,
    durable: Vec<Ticket>,
    failed_tickets: Vec<Ticket>,
    failed: bool,
    /// Stats since the log began.
    pub stats: LogStats,
}

impl Log {
    /// A log for `core` whose new segments are numbered from `next_number` and preallocated to
    /// `segment_bytes`. `existing`: this core's segments written at start; they take no more
    /// records.
    pub fn new(
        core: u16,
        segment_bytes: u64,
        next_number: u64,
        existing: impl IntoIterator<Item = Existing>,
    ) -> Self {
        // Recovered numbers go to the index's map; the ring starts with this run's numbers
        // (`Log::set_seqs`).
        let mut index = super::index::SeqIndex::new(u64::MAX, 1);
        let mut segments = BTreeMap::new();
        for Existing {
            number: n,
            end,
            records: recs,
            keep_until_ms,
        } in existing
        {
            let mut live_bytes = 0;
            for &(seq, offset, len) in &recs {
                index.insert(
                    seq,
                    Loc {
                        segment: n,
                        offset,
                        len,
                    },
                );
                live_bytes += u64::from(len);
            }
            let s = Segment {
                live: recs.len(),
                live_bytes,
                end,
                size: end,
                created: true,
                full: true,
                created_ms: 0,
                keep_until_ms,
            };
            segments.insert(n, s);
        }
        Log {
            core,
            segment_bytes: segment_bytes.max(SEGMENT_HEADER_LEN as u64 + 4096),
            next_number,
            segments,
            index,
            compacting: None,
            no_compaction: None,
            unwritten_releases: Vec::new(),
            tail: None,
            pending: VecDeque::new(),
            in_flight: None,
            step: None,
            since_us: 0,
            due: None,
            side: None,
            side_since_us: 0,
            spare: None,
            remove_failed_us: None,
            durable: Vec::new(),
            failed_tickets: Vec::new(),
            failed: false,
            stats: LogStats::default(),
        }
    }

    /// Appends the record of `env` under store sequence number `seq`; `ticket` comes back from
    /// [`Log::take_durable`] once it is synced (or from [`Log::take_failed`]). Returns the
    /// segment that holds it (for [`Log::release`]).
    pub fn append(
        &mut self,
        seq: u64,
        env: &Envelope,
        ticket: Ticket,
        now_ms: u64,
    ) -> Result<u64, AppendError> {
        if self.failed {
            return Err(AppendError::Failed);
        }
        if !matches!(env.destination(), crate::wire::Destination::Agent(_)) {
            return Err(AppendError::NoAgent);
        }
        let len = record::envelope_record_len(env);
        let b = self.batch_for(len as u64, now_ms);
        let loc = Loc {
            segment: b.number,
            offset: b.offset + b.buf.len() as u64,
            len: len as u32,
        };
        record::encode_envelope_of(seq, env, &mut b.buf);
        b.tickets.push(ticket);
        b.seqs.push(seq);
        if let Some(s) = self.segments.get_mut(&loc.segment) {
            s.live += 1;
            s.live_bytes += len as u64;
        }
        self.index.insert(seq, loc);
        Ok(loc.segment)
    }

    /// Envelopes left the store (delivered and ACKed, or expired): `seqs`. A released record is
    /// appended (it needs no ticket: losing it redelivers those envelopes after a crash). A
    /// sequence number this log does not hold is named in the record all the same.
    pub fn release(&mut self, seqs: &[u64], now_ms: u64) {
        for seq in seqs {
            if let Some(loc) = self.index.remove(seq) {
                if let Some(s) = self.segments.get_mut(&loc.segment) {
                    s.live = s.live.saturating_sub(1);
                    s.live_bytes = s.live_bytes.saturating_sub(u64::from(loc.len));
                }
            }
        }
        if self.failed {
            // Written once the log writes again (`retry`): else these envelopes would come
            // back after a crash from segments that still hold something live.
            self.unwritten_releases.extend_from_slice(seqs);
        } else if !seqs.is_empty() {
            self.write_released(seqs, now_ms);
        }
    }

    fn write_released(&mut self, seqs: &[u64], now_ms: u64) {
        let b = self.batch_for((record::RECORD_HEADER_LEN + 8 * seqs.len()) as u64, now_ms);
        record::encode_released(seqs, &mut b.buf);
        b.released.extend_from_slice(seqs);
    }

    /// The pending batch that takes a record of `len` bytes (in the tail segment, or a new one).
    fn batch_for(&mut self, len: u64, now_ms: u64) -> &mut Batch {
        let room = self
            .tail
            .and_then(|n| self.segments.get(&n))
            .is_some_and(|s| s.end + len <= s.size);
        if !room {
            self.new_segment(len, now_ms);
        }
        let n = self.tail.expect("a tail segment");
        let s = self.segments.get_mut(&n).expect("the tail exists");
        let offset = s.end;
        s.end += len;
        if self.pending.back().is_none_or(|b| b.number != n) {
            self.pending.push_back(Batch {
                number: n,
                offset,
                buf: BytesMut::new(),
                tickets: Vec::new(),
                seqs: Vec::new(),
                copies: Vec::new(),
                released: Vec::new(),
            });
        }
        self.pending.back_mut().expect("a pending batch")
    }

    /// Starts a new tail segment, big enough for a record of `len`; the old tail is full.
    fn new_segment(&mut self, len: u64, now_ms: u64) {
        if let Some(s) = self.tail.and_then(|n| self.segments.get_mut(&n)) {
            s.full = true;
        }
        let header = SEGMENT_HEADER_LEN as u64;
        if let Some(sp) = self
            .spare
            .as_mut()
            .filter(|sp| !sp.adopted && sp.size >= header + len)
        {
            // Created ahead (or being created: the batch waits for it, see `start_next`).
            sp.adopted = true;
            let sp = *sp;
            if sp.ready {
                self.spare = None;
            }
            self.segments.insert(sp.number, sp.segment(sp.ready));
            self.tail = Some(sp.number);
            return;
        }
        let n = self.next_number;
        self.next_number += 1;
        self.segments.insert(
            n,
            Segment {
                live: 0,
                live_bytes: 0,
                end: header,
                size: self.segment_bytes.max(header + len),
                created: false,
                full: false,
                created_ms: now_ms,
                keep_until_ms: 0,
            },
        );
        self.tail = Some(n);
    }

    /// The next file operation to carry out, if one is due; `now_us` starts its clock for
    /// [`Log::busy_for`].
    pub fn poll_action(&mut self, now_us: u64) -> Option<LogAction> {
        if self.step.is_none() {
            self.start_next();
        }
        let a = self.due.take()?;
        self.since_us = now_us;
        Some(a)
    }

    /// Picks the next step: the next batch's segment creation or write, else a removal.
    fn start_next(&mut self) {
        // A failed log writes nothing, but still removes segments nothing is live in: that is
        // how a full disk gets its space back.
        if !self.failed && self.in_flight.is_none() {
            self.in_flight = self.pending.pop_front();
        }
        if let Some(b) = self.in_flight.as_ref().filter(|_| !self.failed) {
            let s = self.segments[&b.number];
            if !s.created && self.spare.is_some_and(|sp| sp.number == b.number) {
                // The side task is creating it: wait for `on_side_done`.
                return;
            }
            if !s.created {
                let header = SegmentHeader {
                    core: self.core,
                    number: b.number,
                    created_ms: s.created_ms,
                };
                self.step = Some(Step::Create);
                self.due = Some(LogAction::Create {
                    number: b.number,
                    header: header.encode(),
                    size: s.size,
                });
            } else {
                self.write_in_flight();
            }
        }
    }

    /// The next side operation (create the next segment ahead, remove one), if one is due;
    /// answer with [`Log::on_side_done`]. At most one runs at a time, beside the main one.
    pub fn poll_side(&mut self, now_us: u64, now_ms: u64) -> Option<LogAction> {
        if self.side.is_some() {
            return None;
        }
        // Remove the oldest segment if it is full, nothing in it is live and nothing is still
        // to be written to it.
        let retry_ok = self
            .remove_failed_us
            .is_none_or(|t| now_us.saturating_sub(t) >= 1_000_000);
        let writing = |n: u64| {
            self.in_flight.as_ref().is_some_and(|b| b.number == n)
                || self.pending.iter().any(|b| b.number == n)
        };
        let empty = self
            .oldest(now_ms)
            .filter(|(n, s)| {
                s.full && s.live == 0 && s.created && Some(**n) != self.tail && !writing(**n)
            })
            .map(|(n, _)| *n);
        if let (Some(n), true) = (empty, retry_ok) {
            self.side = Some(Side::Remove(n));
            self.side_since_us = now_us;
            return Some(LogAction::Remove { number: n });
        }
        // Copy the live records of the oldest segment forward once little of it is live and
        // newer segments exist, so that one long-lived envelope does not keep the segment, and
        // every one after it, on disk.
        if let Some(a) = self.next_copy(now_us, now_ms) {
            return Some(a);
        }
        // Create the next segment once the tail is half full.
        // (Not before the first append: a store that never takes a durable envelope takes no
        // disk.)
        let tail_half = self
            .tail
            .and_then(|n| self.segments.get(&n))
            .is_some_and(|s| s.created && (s.end - SEGMENT_HEADER_LEN as u64) * 2 >= s.size);
        if self.spare.is_none() && !self.failed && tail_half {
            let number = self.next_number;
            self.next_number += 1;
            let sp = Spare {
                number,
                size: self.segment_bytes,
                created_ms: now_ms,
                ready: false,
                adopted: false,
            };
            self.spare = Some(sp);
            self.side = Some(Side::Spare);
            self.side_since_us = now_us;
            let header = SegmentHeader {
                core: self.core,
                number,
                created_ms: now_ms,
            };
            return Some(LogAction::Create {
                number,
                header: header.encode(),
                size: sp.size,
            });
        }
        None
    }

    /// The next record to read for compaction, starting a compaction when one is due.
    /// The oldest segment, passing over segments of duplicate windows still kept (they hold no
    /// envelopes: no released record names anything in them).
    fn oldest(&self, now_ms: u64) -> Option<(&u64, &Segment)> {
        self.segments
            .iter()
            .find(|(_, s)| s.keep_until_ms <= now_ms)
    }

    fn next_copy(&mut self, now_us: u64, now_ms: u64) -> Option<LogAction> {
        if self.failed || self.tail.is_none() {
            return None;
        }
        if self.compacting.is_none() {
            let (&n, s) = self.oldest(now_ms)?;
            let newer = self.segments.len() > 2;
            let sparse = s.live_bytes * 4 < s.end.max(s.size);
            if !(s.full && s.created && s.live > 0 && newer && sparse && Some(n) != self.tail)
                || self.no_compaction == Some(n)
            {
                return None;
            }
            let seqs: Vec<u64> = self
                .index
                .iter()
                .filter(|(_, l)| l.segment == n)
                .map(|(seq, _)| seq)
                .collect();
            self.compacting = Some((n, seqs));
        }
        let (n, seqs) = self.compacting.as_mut()?;
        let n = *n;
        while let Some(seq) = seqs.pop() {
            let Some(loc) = self.index.get(&seq).filter(|l| l.segment == n) else {
                continue;
            };
            self.side = Some(Side::Read(seq));
            self.side_since_us = now_us;
            return Some(LogAction::Read {
                number: n,
                offset: loc.offset,
                len: loc.len,
            });
        }
        self.compacting = None;
        None
    }

    /// A record read for compaction: appended as it is (same sequence number) to the batch
    /// being gathered; it moves when that batch is synced.
    pub fn on_side_read(&mut self, data: Bytes, now_ms: u64) {
        let Some(Side::Read(seq)) = self.side.take() else {
            return;
        };
        let Some(from) = self.index.get(&seq).copied() else {
            return; // Released while it was read.
        };
        if self.failed {
            return;
        }
        if !record::is_envelope_record(&data, seq) {
            // The record on disk is damaged: copying it would cut the segment it lands in at
            // recovery. The segment is left as it is (not compacted again).
            self.stats.failures += 1;
            self.no_compaction = Some(from.segment);
            self.compacting = None;
            return;
        }
        let b = self.batch_for(u64::from(from.len), now_ms);
        let to = Loc {
            segment: b.number,
            offset: b.offset + b.buf.len() as u64,
            len: from.len,
        };
        b.buf.extend_from_slice(&data);
        b.copies.push((seq, from, to));
        self.stats.copied += 1;
    }

    /// The side operation last handed out completed (`ok`) or failed. A failed one fails
    /// nothing else: a segment that could not be created ahead is created when needed (and
    /// that failure is the log's); a removal is tried again a second later.
    pub fn on_side_done(&mut self, ok: bool, now_us: u64) {
        match self.side.take() {
            Some(Side::Spare) => {
                let Some(sp) = self.spare.as_mut() else {
                    return;
                };
                let taken = self.segments.get_mut(&sp.number);
                match (ok, taken) {
                    // Already the tail: a batch waits for it.
                    (true, Some(seg)) => {
                        seg.created = true;
                        self.spare = None;
                    }
                    (true, None) => sp.ready = true,
                    // The main path creates it when it needs it (and fails there if it must).
                    (false, _) => {
                        self.stats.failures += 1;
                        self.spare = None;
                    }
                }
            }
            Some(Side::Read(_)) => {
                // A read that failed: compaction stops; it starts over later.
                self.stats.failures += u64::from(!ok);
                self.compacting = None;
            }
            Some(Side::Remove(n)) => {
                if ok {
                    self.segments.remove(&n);
                    self.stats.segments_removed += 1;
                    self.remove_failed_us = None;
                } else {
                    self.stats.failures += 1;
                    self.remove_failed_us = Some(now_us);
                }
            }
            None => {}
        }
    }

    /// How long the side operation in flight has run, if one is.
    pub fn side_busy_for(&self, now_us: u64) -> Option<u64> {
        self.side.map(|_| now_us.saturating_sub(self.side_since_us))
    }

    fn write_in_flight(&mut self) {
        let b = self.in_flight.as_mut().expect("a batch in flight");
        if b.buf.is_empty() {
            // A segment created with nothing to write yet (after a failure): done.
            self.in_flight = None;
            return;
        }
        let buf = std::mem::take(&mut b.buf).freeze();
        self.stats.bytes += buf.len() as u64;
        self.step = Some(Step::Write);
        self.due = Some(LogAction::Write {
            number: b.number,
            offset: b.offset,
            buf,
        });
    }

    /// The action last handed out completed (`ok`) or failed.
    pub fn on_done(&mut self, ok: bool) {
        let Some(step) = self.step.take() else {
            return;
        };
        if !ok {
            self.fail();
            return;
        }
        match step {
            Step::Create => {
                let n = self.in_flight.as_ref().expect("a batch in flight").number;
                if let Some(s) = self.segments.get_mut(&n) {
                    s.created = true;
                }
                self.stats.segments_created += 1;
                self.write_in_flight();
            }
            Step::Write => {
                let n = self.in_flight.as_ref().expect("a batch in flight").number;
                self.step = Some(Step::Sync);
                self.due = Some(LogAction::Sync { number: n });
            }
            Step::Sync => {
                let b = self.in_flight.take().expect("a batch in flight");
                // Copies are on disk: the records live in their new place from now on (unless
                // they were released meanwhile).
                for (seq, from, to) in &b.copies {
                    if self.index.get(seq) == Some(from) {
                        self.index.insert(*seq, *to);
                        for (n, add) in [(from.segment, false), (to.segment, true)] {
                            if let Some(s) = self.segments.get_mut(&n) {
                                if add {
                                    s.live += 1;
                                    s.live_bytes += u64::from(to.len);
                                } else {
                                    s.live = s.live.saturating_sub(1);
                                    s.live_bytes = s.live_bytes.saturating_sub(u64::from(to.len));
                                }
                            }
                        }
                    }
                }
                self.stats.groups += 1;
                self.stats.durable += b.tickets.len() as u64;
                self.durable.extend(b.tickets);
            }
        }
    }

    /// An operation failed: every ticket not yet durable fails, the segment takes no more.
    fn fail(&mut self) {
        self.stats.failures += 1;
        self.failed = true;
        for b in self
            .in_flight
            .take()
            .into_iter()
            .chain(self.pending.drain(..))
        {
            self.unwritten_releases.extend_from_slice(&b.released);
            // Their writes may have reached the disk although the batch failed: released
            // records (after the retry) keep them from coming back at the next start, also
            // once the source sent them again and they were stored and delivered anew.
            self.unwritten_releases.extend_from_slice(&b.seqs);
            for seq in &b.seqs {
                if let Some(loc) = self.index.remove(seq) {
                    if let Some(s) = self.segments.get_mut(&loc.segment) {
                        s.live = s.live.saturating_sub(1);
                        s.live_bytes = s.live_bytes.saturating_sub(u64::from(loc.len));
                    }
                }
            }
            self.failed_tickets.extend(b.tickets);
        }
        if let Some(s) = self.tail.and_then(|n| self.segments.get_mut(&n)) {
            s.full = true;
        }
        self.tail = None;
    }

    /// Starts over after a failure: a new segment is created at once (its creation is the
    /// probe: [`Log::on_done`] tells whether the disk takes writes again). Segments that were
    /// never created are forgotten.
    pub fn retry(&mut self, now_ms: u64) {
        self.segments.retain(|_, s| s.created);
        self.failed = false;
        // A segment created ahead would hide whether the disk takes a new one; one already
        // taken as the tail was forgotten with the segments that were never created.
        if self.side != Some(Side::Spare) || self.spare.is_some_and(|sp| sp.adopted) {
            self.spare = None;
        }
        // The failure left no tail: this starts a new segment, with an empty batch in it (or
        // the released records that could not be written).
        self.tail = None;
        self.batch_for(0, now_ms);
        let unwritten = std::mem::take(&mut self.unwritten_releases);
        for chunk in unwritten.chunks(MAX_RELEASED_PER_RECORD) {
            self.write_released(chunk, now_ms);
        }
    }

    /// Whether nothing is written, due or in flight (a clean exit waits for this).
    pub fn is_idle(&self) -> bool {
        self.step.is_none()
            && self.in_flight.is_none()
            && self.pending.is_empty()
            && self.side.is_none()
    }

    /// The sequence numbers this log's appends will use: `first`, `first + step`, … (set before
    /// the first append; the index keeps them in a ring).
    pub fn set_seqs(&mut self, first: u64, step: u64) {
        let mut index = super::index::SeqIndex::new(first, step);
        for (seq, loc) in self.index.iter() {
            index.insert(seq, *loc);
        }
        self.index = index;
    }

    /// Whether envelope `seq` is in the log (appended, not released or failed).
    pub fn holds(&self, seq: u64) -> bool {
        self.index.contains_key(&seq)
    }

    /// Live envelopes this log holds.
    pub fn live(&self) -> usize {
        self.index.len()
    }

    /// Whether appends are written again: not failed, and the segment they go to exists.
    pub fn healthy(&self) -> bool {
        !self.failed
            && self
                .tail
                .and_then(|n| self.segments.get(&n))
                .is_some_and(|s| s.created)
    }

    /// Whether the log failed and waits for [`Log::retry`].
    pub fn is_failed(&self) -> bool {
        self.failed
    }

    /// How long the operation in flight has run, if one is.
    pub fn busy_for(&self, now_us: u64) -> Option<u64> {
        self.step.map(|_| now_us.saturating_sub(self.since_us))
    }

    /// Tickets whose records are on disk, since the last call.
    pub fn take_durable(&mut self) -> Vec<Ticket> {
        std::mem::take(&mut self.durable)
    }

    /// Tickets whose records failed, since the last call.
    pub fn take_failed(&mut self) -> Vec<Ticket> {
        std::mem::take(&mut self.failed_tickets)
    }

    /// This log's segments.
    pub fn segments(&self) -> &BTreeMap<u64, Segment> {
        &self.segments
    }

    /// Bytes appended but not yet durable.
    pub fn pending_bytes(&self) -> usize {
        self.pending.iter().map(|b| b.buf.len()).sum::<usize>()
            + self.in_flight.as_ref().map_or(0, |b| b.buf.len())
    }
}

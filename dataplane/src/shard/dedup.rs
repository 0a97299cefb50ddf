//! Duplicate suppression at the destination's home core, by (source, message id).
//!
//! Sources build ids as a random 64-bit epoch (drawn per session) and a 64-bit counter
//! (`docs/PROTOCOL.md` §2). Per (source, epoch) the shard keeps the highest counter accepted
//! and a window of [`WINDOW`] bits below it, one per counter: an id whose bit is set is a
//! duplicate. Counters are counted per source across all its destinations, so the window spans
//! the source's last [`WINDOW`] ids wherever they went (the default send window is 4,096: a
//! reconnecting source resends at most that many).
//!
//! Bounded: at most `cap` epochs are remembered, in two generations (the current one fills to
//! half the cap, then becomes the previous one and the one before is forgotten; a hit in the
//! previous generation moves the epoch forward). Each costs [`EPOCH_BYTES`]. Identities minted
//! to flood it push out old epochs and nothing else.
//!
//! What a receiver can still see twice (`docs/PROTOCOL.md` §3 says it normatively): an id older
//! than the window of its epoch ([`Seen::Older`], unless it is a durable envelope still in the
//! store, which the store's own index catches); an id whose epoch was pushed out; after the
//! relay restarted, any id but those of durable envelopes whose records were still on disk
//! (stored, or delivered and not yet compacted away) or in the windows the previous start
//! carried forward: recovery rebuilds those windows and [`Dedup::seed`] takes them.

use std::collections::HashMap;

use crate::store::record::{WindowRecord, WINDOW_WORDS};
use crate::wire::{AgentId, MessageId};

/// Counters remembered below the highest one, per (source, epoch).
pub(crate) const WINDOW: u64 = 4096;
/// Memory one remembered epoch costs (window, key, map slot).
pub(crate) const EPOCH_BYTES: usize = (WINDOW / 8) as usize + 96;

/// What the window knows of an id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Seen {
    /// Not accepted before (as far as the window reaches).
    New,
    /// Accepted before.
    Duplicate,
    /// Older than the window: unknown, treated as new.
    Older,
}

/// The window of one (source, epoch).
#[derive(Clone)]
pub(crate) struct Window {
    max: u64,
    bits: Box<[u64; WINDOW_WORDS]>,
}

const _: () = assert!(WINDOW_WORDS as u64 * 64 == WINDOW);

impl Window {
    pub(crate) fn new() -> Self {
        Window {
            max: 0,
            bits: Box::new([0; WINDOW_WORDS]),
        }
    }

    /// The window a record carries.
    pub(crate) fn of_record(r: &WindowRecord) -> Self {
        Window {
            max: r.max,
            bits: r.bits.clone(),
        }
    }

    /// The record of this window for `source`'s `epoch`, last used at sequence number `rank`.
    pub(crate) fn record(&self, source: AgentId, epoch: u64, rank: u64) -> WindowRecord {
        WindowRecord {
            source,
            epoch,
            rank,
            max: self.max,
            bits: self.bits.clone(),
        }
    }

    /// Marks every counter `other` holds (as far as this window reaches).
    pub(crate) fn merge(&mut self, other: &Window) {
        for d in 0..WINDOW {
            let Some(c) = other.max.checked_sub(d) else {
                break;
            };
            if other.seen(c) == Seen::Duplicate {
                self.mark(c);
            }
        }
    }

    fn bit(c: u64) -> (usize, u64) {
        let i = c % WINDOW;
        ((i / 64) as usize, 1 << (i % 64))
    }

    pub(crate) fn seen(&self, c: u64) -> Seen {
        if c > self.max {
            return Seen::New;
        }
        if self.max - c >= WINDOW {
            return Seen::Older;
        }
        let (w, b) = Self::bit(c);
        if self.bits[w] & b != 0 {
            Seen::Duplicate
        } else {
            Seen::New
        }
    }

    pub(crate) fn mark(&mut self, c: u64) {
        if c > self.max {
            if c - self.max >= WINDOW {
                self.bits.fill(0);
            } else {
                for k in self.max + 1..c {
                    let (w, b) = Self::bit(k);
                    self.bits[w] &= !b;
                }
            }
            self.max = c;
        } else if self.max - c >= WINDOW {
            return;
        }
        let (w, b) = Self::bit(c);
        self.bits[w] |= b;
    }

    fn forget(&mut self, c: u64) {
        if c <= self.max && self.max - c < WINDOW {
            let (w, b) = Self::bit(c);
            self.bits[w] &= !b;
        }
    }
}

type Key = (AgentId, u64);

/// What [`Dedup::check_mark`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Marking {
    /// Accepted before: not marked again.
    Duplicate,
    /// Not a known duplicate, and now marked.
    Marked,
    /// Not a known duplicate, not marked (its epoch is not in the current generation).
    Unmarked,
}

/// The windows of one shard.
pub(crate) struct Dedup {
    current: HashMap<Key, Window, crate::shard::hasher::MapHasher>,
    previous: HashMap<Key, Window, crate::shard::hasher::MapHasher>,
    cap: usize,
}

/// Epoch and counter of a message id.
pub(crate) fn split(id: MessageId) -> (u64, u64) {
    let v = id.as_u128();
    ((v >> 64) as u64, v as u64)
}

impl Dedup {
    pub(crate) fn new(cap: usize) -> Self {
        Dedup {
            current: HashMap::default(),
            previous: HashMap::default(),
            cap: cap.max(2),
        }
    }

    /// Whether `id` from `source` was accepted before.
    pub(crate) fn seen(&self, source: &AgentId, id: MessageId) -> Seen {
        let (epoch, c) = split(id);
        let key = (*source, epoch);
        match self.current.get(&key).or_else(|| self.previous.get(&key)) {
            Some(w) => w.seen(c),
            None => Seen::New,
        }
    }

    /// [`seen`](Self::seen), then [`mark`](Self::mark) unless it is a duplicate, in one
    /// lookup when `source`'s epoch is in the current generation (a source sending steadily);
    /// otherwise `id` is left unmarked ([`Marking::Unmarked`]) and the caller marks it once
    /// accepted. A [`Marking::Marked`] envelope that is refused after all is
    /// [`forget`](Self::forget)ten: only its own counter is cleared (the window may have moved
    /// up to it, which the source's own counter did anyway).
    pub(crate) fn check_mark(&mut self, source: &AgentId, id: MessageId) -> Marking {
        let (epoch, c) = split(id);
        let key = (*source, epoch);
        if let Some(w) = self.current.get_mut(&key) {
            if w.seen(c) == Seen::Duplicate {
                return Marking::Duplicate;
            }
            w.mark(c);
            return Marking::Marked;
        }
        match self.previous.get(&key) {
            Some(w) if w.seen(c) == Seen::Duplicate => Marking::Duplicate,
            _ => Marking::Unmarked,
        }
    }

    /// Notes `id` from `source` as accepted.
    pub(crate) fn mark(&mut self, source: AgentId, id: MessageId) {
        let (epoch, c) = split(id);
        let key = (source, epoch);
        match self.current.get_mut(&key) {
            Some(w) => w.mark(c),
            None => self.bring_forward(key).mark(c),
        }
    }

    /// Forgets that `id` from `source` was accepted: it left this relay's custody for another
    /// relay, and may come back (then it is not a duplicate here).
    pub(crate) fn forget(&mut self, source: &AgentId, id: MessageId) {
        let (epoch, c) = split(id);
        let key = (*source, epoch);
        for windows in [&mut self.current, &mut self.previous] {
            if let Some(w) = windows.get_mut(&key) {
                w.forget(c);
            }
        }
    }

    /// Takes a window recovered from the store (merged with what is already known).
    pub(crate) fn seed(&mut self, r: &WindowRecord) {
        let w = Window::of_record(r);
        let key = (r.source, r.epoch);
        match self.current.get_mut(&key) {
            Some(have) => have.merge(&w),
            None => self.bring_forward(key).merge(&w),
        }
    }

    /// Puts the window of `key` (not in the current generation) there: moved from the previous
    /// one, or new; a full current generation becomes the previous one first.
    fn bring_forward(&mut self, key: Key) -> &mut Window {
        let w = self.previous.remove(&key).unwrap_or_else(Window::new);
        if self.current.len() >= self.cap / 2 {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.entry(key).or_insert(w)
    }

    /// Memory the windows take.
    pub(crate) fn retained(&self) -> usize {
        (self.current.len() + self.previous.len()) * EPOCH_BYTES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(epoch: u64, c: u64) -> MessageId {
        MessageId::from_u128((epoch as u128) << 64 | c as u128)
    }

    #[test]
    fn an_envelope_that_left_for_another_relay_is_new_when_it_comes_back() {
        let s = AgentId([4; 32]);
        let mut d = Dedup::new(100);
        for c in 1..=5 {
            d.mark(s, id(2, c));
        }
        d.forget(&s, id(2, 3));
        assert_eq!(d.seen(&s, id(2, 3)), Seen::New);
        assert_eq!(d.seen(&s, id(2, 2)), Seen::Duplicate, "only that one");
        assert_eq!(d.seen(&s, id(2, 4)), Seen::Duplicate);
        // Forgetting what the window never held changes nothing.
        d.forget(&s, id(2, 99));
        d.forget(&AgentId([5; 32]), id(2, 3));
        assert_eq!(d.seen(&s, id(2, 5)), Seen::Duplicate);
    }

    #[test]
    fn the_window_catches_resends_and_forgets_only_what_is_older() {
        let s = AgentId([3; 32]);
        let mut d = Dedup::new(100);
        for c in 1..=10_000 {
            // Every third id goes elsewhere (another core): gaps are fine.
            if c % 3 != 0 {
                assert_eq!(d.seen(&s, id(9, c)), Seen::New);
                d.mark(s, id(9, c));
            }
        }
        assert_eq!(d.seen(&s, id(9, 10_000)), Seen::Duplicate);
        assert_eq!(d.seen(&s, id(9, 9_999)), Seen::New, "never accepted");
        assert_eq!(d.seen(&s, id(9, 10_000 - WINDOW + 1)), Seen::Duplicate);
        assert_eq!(d.seen(&s, id(9, 10_000 - WINDOW)), Seen::Older);
        assert_eq!(d.seen(&s, id(8, 10_000)), Seen::New, "another epoch");
        assert_eq!(d.seen(&AgentId([4; 32]), id(9, 10_000)), Seen::New);
        // Out of order within the window.
        d.mark(s, id(9, 9_999));
        assert_eq!(d.seen(&s, id(9, 9_999)), Seen::Duplicate);
        // A jump past the window clears it.
        d.mark(s, id(9, 50_000));
        assert_eq!(d.seen(&s, id(9, 10_000)), Seen::Older);
        assert_eq!(d.seen(&s, id(9, 49_999)), Seen::New);
    }

    #[test]
    fn a_window_survives_its_record_and_merges_into_another() {
        let mut a = Window::new();
        for c in (5_000..12_000).filter(|c| c % 7 != 0) {
            a.mark(c);
        }
        let r = a.record(AgentId([3; 32]), 9, 1);
        let mut buf = bytes::BytesMut::new();
        crate::store::record::encode_window(&r, &mut buf);
        assert_eq!(
            buf.len(),
            crate::store::record::RECORD_HEADER_LEN + crate::store::record::WINDOW_BODY_LEN
        );
        let back = Window::of_record(&r);
        // Into an empty window: the same answers everywhere.
        let mut b = Window::new();
        b.merge(&back);
        for c in 0..13_000 {
            assert_eq!(b.seen(c), a.seen(c), "counter {c}");
        }
        // Into a window further on: what it already knows stays, the older part slides out.
        let mut c = Window::new();
        c.mark(14_000);
        c.merge(&back);
        assert_eq!(c.seen(14_000), Seen::Duplicate);
        assert_eq!(c.seen(11_999), Seen::Duplicate);
        assert_eq!(c.seen(11_998), Seen::New, "never marked (a multiple of 7)");
        assert_eq!(c.seen(14_000 - WINDOW), Seen::Older);
        // Through the shard's windows.
        let mut d = Dedup::new(100);
        d.mark(AgentId([3; 32]), id(9, 3));
        d.seed(&r);
        assert_eq!(d.seen(&AgentId([3; 32]), id(9, 11_999)), Seen::Duplicate);
        assert_eq!(d.seen(&AgentId([3; 32]), id(9, 11_991)), Seen::New);
        assert_eq!(d.seen(&AgentId([3; 32]), id(9, 3)), Seen::Older);
    }

    #[test]
    fn a_window_at_the_last_counter_merges() {
        let mut a = Window::new();
        a.mark(u64::MAX);
        a.mark(u64::MAX - 5);
        let mut b = Window::new();
        b.merge(&a);
        assert_eq!(b.seen(u64::MAX), Seen::Duplicate);
        assert_eq!(b.seen(u64::MAX - 5), Seen::Duplicate);
        assert_eq!(b.seen(u64::MAX - 4), Seen::New);
    }

    #[test]
    fn epochs_are_bounded_and_recent_ones_survive_a_flood() {
        let s = AgentId([3; 32]);
        let mut d = Dedup::new(1000);
        d.mark(s, id(1, 5));
        for e in 0..10_000u64 {
            let minted = AgentId([(e % 251) as u8; 32]);
            d.mark(minted, id(e + 100, 1));
            if e % 100 == 0 {
                // The well-behaved source keeps sending: its epoch stays.
                d.mark(s, id(1, 6 + e));
            }
            assert!(d.current.len() + d.previous.len() <= 1000);
        }
        assert_eq!(d.seen(&s, id(1, 6 + 9_900)), Seen::Duplicate);
        assert!(d.retained() <= 1000 * EPOCH_BYTES);
    }

    #[test]
    fn one_lookup_checks_and_marks_and_a_refused_envelope_is_forgotten() {
        let s = AgentId([6; 32]);
        let mut d = Dedup::new(4);
        // A new epoch is not in the current generation: left to the caller to mark.
        assert_eq!(d.check_mark(&s, id(1, 1)), Marking::Unmarked);
        assert_eq!(d.seen(&s, id(1, 1)), Seen::New);
        d.mark(s, id(1, 1));
        assert_eq!(d.check_mark(&s, id(1, 1)), Marking::Duplicate);
        assert_eq!(d.check_mark(&s, id(1, 2)), Marking::Marked);
        assert_eq!(d.seen(&s, id(1, 2)), Seen::Duplicate);
        // Refused after all: only its own counter is cleared.
        d.forget(&s, id(1, 2));
        assert_eq!(d.seen(&s, id(1, 2)), Seen::New);
        assert_eq!(d.seen(&s, id(1, 1)), Seen::Duplicate);
        // Two more epochs push the first into the previous generation: still a duplicate
        // there, a new id left unmarked (marking brings it forward).
        for e in 2..=3 {
            d.mark(AgentId([7; 32]), id(e, 1));
        }
        assert!(!d.current.contains_key(&(s, 1)));
        assert_eq!(d.check_mark(&s, id(1, 1)), Marking::Duplicate);
        assert_eq!(d.check_mark(&s, id(1, 3)), Marking::Unmarked);
        assert_eq!(d.seen(&s, id(1, 3)), Seen::New);
    }
}

//! Where each live record of one core's log is, by sequence number. Pure.
//!
//! A core gives out sequence numbers in one progression (`first`, `first + step`, …) and
//! releases them mostly in the order it took them, so the numbers of this run sit in a ring
//! indexed by position in the progression: an insert is a push at the back, a release clears
//! a slot and drops the cleared ones at the front, and both touch memory the previous one
//! touched (a hash map of a few million entries misses the cache on every release). Numbers
//! outside the progression (recovered at start) go to a hash map. A few long-lived envelopes
//! at the front do not pin the ring: once it is more than twice as long as what it holds (and
//! past a floor), the front entries move to the map.

use std::collections::{HashMap, VecDeque};

/// Slots the ring may hold beyond twice its entries before the front moves to the map.
const SLACK: usize = 4096;
/// An insert further ahead of the ring's end than this goes to the map (never in practice).
const MAX_GAP: u64 = 1 << 16;

/// The index: sequence number to `V`, for the numbers of one progression and any others.
#[derive(Debug)]
pub(crate) struct SeqIndex<V> {
    /// Sequence number of `ring[0]`.
    base: u64,
    step: u64,
    ring: VecDeque<Option<V>>,
    /// Entries in `ring`.
    in_ring: usize,
    other: HashMap<u64, V, foldhash::fast::RandomState>,
}

impl<V: Copy> SeqIndex<V> {
    /// An index whose ring takes `first`, `first + step`, … (`step` at least 1).
    pub(crate) fn new(first: u64, step: u64) -> Self {
        SeqIndex {
            base: first,
            step: step.max(1),
            ring: VecDeque::new(),
            in_ring: 0,
            other: HashMap::default(),
        }
    }

    /// Ring position of `seq`, if it is in the progression at or after the ring's start.
    fn pos(&self, seq: u64) -> Option<usize> {
        let d = seq.checked_sub(self.base)?;
        (d % self.step == 0).then_some((d / self.step) as usize)
    }

    pub(crate) fn insert(&mut self, seq: u64, v: V) {
        if let Some(p) = self.pos(seq) {
            if p < self.ring.len() {
                let slot = &mut self.ring[p];
                if slot.is_none() {
                    self.in_ring += 1;
                    self.other.remove(&seq);
                }
                *slot = Some(v);
                return;
            }
            if ((p - self.ring.len()) as u64) < MAX_GAP {
                if self.ring.is_empty() {
                    // Start the ring here.
                    self.base = seq;
                } else {
                    self.ring.resize(p, None);
                }
                self.ring.push_back(Some(v));
                self.in_ring += 1;
                self.other.remove(&seq);
                return;
            }
        }
        self.other.insert(seq, v);
    }

    pub(crate) fn get(&self, seq: &u64) -> Option<&V> {
        // An entry that went to the map (far ahead of the ring then) may lie under a ring
        // position now: an empty slot also looks in the map.
        match self.pos(*seq).and_then(|p| self.ring.get(p)) {
            Some(Some(v)) => Some(v),
            _ => self.other.get(seq),
        }
    }

    pub(crate) fn contains_key(&self, seq: &u64) -> bool {
        self.get(seq).is_some()
    }

    pub(crate) fn remove(&mut self, seq: &u64) -> Option<V> {
        let Some(p) = self.pos(*seq).filter(|p| *p < self.ring.len()) else {
            return self.other.remove(seq);
        };
        let Some(v) = self.ring[p].take() else {
            return self.other.remove(seq);
        };
        self.in_ring -= 1;
        while self.ring.front().is_some_and(Option::is_none) {
            self.ring.pop_front();
            self.base += self.step;
        }
        while self.ring.len() > 2 * self.in_ring + SLACK {
            // Long-lived entries at the front: out of the ring's way.
            if let Some(Some(front)) = self.ring.pop_front() {
                self.other.insert(self.base, front);
                self.in_ring -= 1;
            }
            self.base += self.step;
        }
        Some(v)
    }

    pub(crate) fn len(&self) -> usize {
        self.in_ring + self.other.len()
    }

    /// Every entry (in no particular order).
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, &V)> + '_ {
        let (base, step) = (self.base, self.step);
        self.ring
            .iter()
            .enumerate()
            .filter_map(move |(i, v)| Some((base + i as u64 * step, v.as_ref()?)))
            .chain(self.other.iter().map(|(s, v)| (*s, v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    proptest! {
        /// Any mix of inserts (in the progression, off it, recovered ones below it) and
        /// removals answers as a map does, and the ring stays within its bound.
        #[test]
        fn answers_as_a_map_does(
            ops in proptest::collection::vec((0u8..4, 0u64..3000), 1..2000),
            step in 1u64..4,
        ) {
            let first = 1000;
            let mut ix: SeqIndex<u64> = SeqIndex::new(first, step);
            let mut model: BTreeMap<u64, u64> = BTreeMap::new();
            let mut next = first;
            for (i, (op, x)) in ops.into_iter().enumerate() {
                match op {
                    // The next number of the progression (the common case).
                    0 | 1 => {
                        ix.insert(next, i as u64);
                        model.insert(next, i as u64);
                        next += step;
                    }
                    // Any number (recovered ones, or off the progression).
                    2 => {
                        ix.insert(x, i as u64);
                        model.insert(x, i as u64);
                    }
                    // A removal, mostly of the oldest.
                    _ => {
                        let seq = if x % 3 == 0 { x + first } else {
                            model.keys().next().copied().unwrap_or(x)
                        };
                        prop_assert_eq!(ix.remove(&seq), model.remove(&seq));
                    }
                }
                prop_assert_eq!(ix.len(), model.len());
                prop_assert!(ix.ring.len() <= 2 * ix.in_ring + SLACK + 1);
            }
            for (s, v) in &model {
                prop_assert_eq!(ix.get(s), Some(v));
            }
            let mut all: Vec<(u64, u64)> = ix.iter().map(|(s, v)| (s, *v)).collect();
            all.sort();
            prop_assert_eq!(all, model.into_iter().collect::<Vec<_>>());
        }
    }

    #[test]
    fn an_entry_far_ahead_is_found_once_the_ring_reaches_it() {
        let mut ix: SeqIndex<u32> = SeqIndex::new(0, 1);
        ix.insert(0, 1);
        let far = MAX_GAP + 10;
        ix.insert(far, 2);
        for s in 1..far + 20 {
            if s != far {
                ix.insert(s, 3);
            }
        }
        assert_eq!(ix.get(&far), Some(&2));
        assert_eq!(ix.remove(&far), Some(2));
        assert_eq!(ix.get(&far), None);
        assert_eq!(ix.len(), (far + 19) as usize);
    }

    #[test]
    fn one_long_lived_entry_does_not_pin_the_ring() {
        let mut ix: SeqIndex<u32> = SeqIndex::new(1, 2);
        ix.insert(1, 7);
        for k in 1..1_000_000u64 {
            ix.insert(1 + 2 * k, 0);
            ix.remove(&(1 + 2 * k));
        }
        assert!(ix.ring.len() <= SLACK + 2, "{}", ix.ring.len());
        assert_eq!(ix.get(&1), Some(&7));
        assert_eq!(ix.len(), 1);
    }
}

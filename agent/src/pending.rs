//! What an agent waits on: envelopes by message id, batches by number. The agent's own ids are
//! a random prefix and a counter ([`crate::Agent::next_message_id`]) and batches are numbered
//! in order, so those in flight sit in a ring indexed by their counter: found, added and
//! removed without hashing. Other ids (an application that numbers its own envelopes), and keys
//! that fall outside the ring, go to a hash map.
//!
//! Bound: the ring spans from its oldest entry to its newest, holes included (ids never sent,
//! best-effort envelopes, those already answered). Its slots take at most [`RING_BYTES`]
//! ([`SeqTable::SPAN`] slots: 21,845 pending envelopes of 48 bytes); a key beyond that pushes the
//! oldest entries into the map, so what the table keeps stays one entry per envelope (or batch)
//! in flight, bounded by the window, plus at most `RING_BYTES` of ring.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

use openmesh_dataplane::wire::MessageId;

use crate::SeqIds;

/// A key made of a prefix and a counter.
pub(crate) trait SeqKey: Copy + Eq + Hash {
    fn split(&self) -> (u64, u64);
    fn join(prefix: u64, counter: u64) -> Self;
}

impl SeqKey for MessageId {
    fn split(&self) -> (u64, u64) {
        let v = self.as_u128();
        ((v >> 64) as u64, v as u64)
    }

    fn join(prefix: u64, counter: u64) -> Self {
        MessageId::from_u128((prefix as u128) << 64 | counter as u128)
    }
}

/// Batch numbers: no prefix.
impl SeqKey for u64 {
    fn split(&self) -> (u64, u64) {
        (0, *self)
    }

    fn join(_: u64, counter: u64) -> Self {
        counter
    }
}

/// Most bytes a ring's slots take, holes included.
pub(crate) const RING_BYTES: usize = 1 << 20;

pub(crate) struct SeqTable<K, V> {
    /// The prefix of the keys the ring holds.
    prefix: u64,
    /// The counter of `ring[0]`.
    base: u64,
    ring: VecDeque<Option<V>>,
    /// Entries (`Some`) in the ring.
    in_ring: usize,
    map: HashMap<K, V, SeqIds>,
}

impl<K: SeqKey, V> Default for SeqTable<K, V> {
    fn default() -> Self {
        SeqTable::new(0)
    }
}

impl<K: SeqKey, V> SeqTable<K, V> {
    /// Most slots the ring spans: [`RING_BYTES`] of them.
    pub(crate) const SPAN: u64 = (RING_BYTES / std::mem::size_of::<Option<V>>()) as u64;

    /// A table whose ring holds keys with `prefix`.
    pub(crate) fn new(prefix: u64) -> Self {
        SeqTable {
            prefix,
            base: 0,
            ring: VecDeque::new(),
            in_ring: 0,
            map: HashMap::default(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.in_ring + self.map.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `id`'s index in the ring, when the ring covers it.
    fn slot(&self, id: &K) -> Option<usize> {
        let (prefix, c) = id.split();
        let i = c.wrapping_sub(self.base);
        (prefix == self.prefix && i < self.ring.len() as u64).then_some(i as usize)
    }

    fn id_at(&self, i: usize) -> K {
        K::join(self.prefix, self.base.wrapping_add(i as u64))
    }

    #[cfg(test)]
    fn contains_key(&self, id: &K) -> bool {
        match self.slot(id) {
            Some(i) => self.ring[i].is_some(),
            None => self.map.contains_key(id),
        }
    }

    pub(crate) fn get(&self, id: &K) -> Option<&V> {
        match self.slot(id) {
            Some(i) => self.ring[i].as_ref(),
            None => self.map.get(id),
        }
    }

    pub(crate) fn get_mut(&mut self, id: &K) -> Option<&mut V> {
        match self.slot(id) {
            Some(i) => self.ring[i].as_mut(),
            None => self.map.get_mut(id),
        }
    }

    /// Adds `v` under `id`; returns what `id` held before.
    pub(crate) fn insert(&mut self, id: K, v: V) -> Option<V> {
        let (prefix, c) = id.split();
        if prefix != self.prefix {
            return self.map.insert(id, v);
        }
        // An id is in the ring or in the map, never both.
        let old = if self.map.is_empty() {
            None
        } else {
            self.map.remove(&id)
        };
        // The base only moves forward, so the map never holds an own id the ring covers.
        if self.in_ring == 0 && c >= self.base {
            self.ring.clear();
            self.base = c;
        }
        if c.wrapping_sub(self.base) >= Self::SPAN && c.wrapping_sub(self.base) < u64::MAX / 2 {
            // Ahead of the ring's reach: the oldest entries move to the map.
            while !self.ring.is_empty() && c - self.base >= Self::SPAN {
                let id0 = self.id_at(0);
                if let Some(v0) = self.ring.pop_front().flatten() {
                    self.in_ring -= 1;
                    self.map.insert(id0, v0);
                }
                self.base = self.base.wrapping_add(1);
                self.trim_front();
            }
            if self.ring.is_empty() {
                self.base = c;
            }
        }
        let i = c.wrapping_sub(self.base);
        if i >= Self::SPAN {
            // Behind the ring (an old id sent again).
            return self.map.insert(id, v).or(old);
        }
        let i = i as usize;
        if i == self.ring.len() {
            // The usual case: the next counter.
            self.ring.push_back(Some(v));
            self.in_ring += 1;
            return old;
        }
        if self.ring.len() < i {
            self.ring.resize_with(i + 1, || None);
        }
        let prev = self.ring[i].replace(v);
        if prev.is_none() {
            self.in_ring += 1;
        }
        prev.or(old)
    }

    /// Takes `id`'s entry out.
    pub(crate) fn remove(&mut self, id: &K) -> Option<V> {
        let Some(i) = self.slot(id) else {
            return self.map.remove(id);
        };
        let v = self.ring[i].take()?;
        self.in_ring -= 1;
        self.trim_front();
        Some(v)
    }

    /// Drops the holes at the ring's front.
    fn trim_front(&mut self) {
        while let Some(None) = self.ring.front() {
            self.ring.pop_front();
            self.base = self.base.wrapping_add(1);
        }
    }

    /// Every entry with its id: the ring's in id order, then the map's.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (K, &V)> {
        self.ring
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.as_ref().map(|v| (self.id_at(i), v)))
            .chain(self.map.iter().map(|(id, v)| (*id, v)))
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        self.ring.iter().flatten().chain(self.map.values())
    }

    pub(crate) fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.ring.iter_mut().flatten().chain(self.map.values_mut())
    }

    /// Slots the ring holds (entries and holes), for the bound's test.
    #[cfg(test)]
    fn span(&self) -> usize {
        self.ring.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    const PREFIX: u64 = 0x0123_4567_89ab_cdef;
    const RING_SPAN: u64 = SeqTable::<MessageId, u32>::SPAN;

    fn own(c: u64) -> MessageId {
        MessageId::from_u128((PREFIX as u128) << 64 | c as u128)
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// Insert the next own id (the counter skips `skip` ids first).
        Next { skip: u64 },
        /// Insert an id of another prefix.
        Foreign(u16),
        /// Insert an own id sent before (re-sent), `back` ids behind the counter.
        Again { back: u64 },
        /// Remove the `k`-th entry in the model, by id.
        Remove(usize),
        /// Remove an id that was never inserted.
        RemoveAbsent(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u64..3).prop_map(|skip| Op::Next { skip }),
            1 => (0u64..RING_SPAN * 2).prop_map(|skip| Op::Next { skip }),
            1 => any::<u16>().prop_map(Op::Foreign),
            1 => (0u64..RING_SPAN * 2).prop_map(|back| Op::Again { back }),
            6 => any::<usize>().prop_map(Op::Remove),
            1 => any::<u64>().prop_map(Op::RemoveAbsent),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Any schedule of sends and answers: the table answers as a hash map does, and the
        /// ring never spans more than its bound.
        #[test]
        fn behaves_as_a_map_within_its_bound(ops in proptest::collection::vec(op(), 1..250)) {
            let mut t = SeqTable::new(PREFIX);
            let mut model: HashMap<MessageId, u32> = HashMap::new();
            let mut next = 1u64 << 40;
            for (n, o) in ops.into_iter().enumerate() {
                let n = n as u32;
                match o {
                    Op::Next { skip } => {
                        next += skip;
                        let id = own(next);
                        next += 1;
                        prop_assert_eq!(t.insert(id, n), model.insert(id, n));
                    }
                    Op::Foreign(k) => {
                        let id = MessageId::from_u128(k as u128);
                        prop_assert_eq!(t.insert(id, n), model.insert(id, n));
                    }
                    Op::Again { back } => {
                        let id = own(next.saturating_sub(back + 1));
                        prop_assert_eq!(t.insert(id, n), model.insert(id, n));
                    }
                    Op::Remove(k) => {
                        if model.is_empty() {
                            continue;
                        }
                        let mut ids: Vec<MessageId> = model.keys().copied().collect();
                        ids.sort();
                        let id = ids[k % ids.len()];
                        prop_assert_eq!(t.remove(&id), model.remove(&id));
                    }
                    Op::RemoveAbsent(c) => {
                        let id = own(c | 1 << 63);
                        prop_assert_eq!(t.remove(&id), model.remove(&id));
                    }
                }
                prop_assert_eq!(t.len(), model.len());
                prop_assert!(t.span() as u64 <= RING_SPAN);
                for (id, v) in &model {
                    prop_assert!(t.contains_key(id));
                    prop_assert_eq!(t.get_mut(id).map(|v| *v), Some(*v));
                }
                let mut seen: Vec<(MessageId, u32)> = t.iter().map(|(id, v)| (id, *v)).collect();
                seen.sort();
                let mut want: Vec<(MessageId, u32)> = model.iter().map(|(id, v)| (*id, *v)).collect();
                want.sort();
                prop_assert_eq!(seen, want);
            }
        }
    }

    #[test]
    fn a_stuck_envelope_moves_to_the_map_instead_of_stretching_the_ring() {
        let mut t = SeqTable::new(PREFIX);
        t.insert(own(0), 0u32);
        for c in 1..RING_SPAN * 3 {
            t.insert(own(c), 1);
            t.remove(&own(c));
        }
        assert_eq!(t.len(), 1);
        assert!(t.span() <= 1, "the ring spans {} slots", t.span());
        assert_eq!(t.remove(&own(0)), Some(0));
        assert!(t.is_empty());
    }
}

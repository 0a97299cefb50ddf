//! The replay window: every (source, message id) opened, until its envelope expires.
//!
//! Bounded in entries over all sources. At the bound the source holding the most entries gives
//! up its oldest one and its own floor rises to that entry's expiry: an envelope from that
//! source expiring at or before its floor is refused (it may have been seen). So a sender that
//! floods the window locks out only itself, never the others.
//!
//! Each source keeps its entries in the order they opened, so expiring and evicting take the
//! front (constant time, no heap). A sender's envelopes mostly share one TTL, so the oldest is
//! also the earliest to expire; one with a longer TTL ahead of shorter ones only holds them
//! until it expires or is evicted (they count against the bound meanwhile).

use std::collections::{HashSet, VecDeque};

use openmesh_dataplane::wire::{AgentId, MessageId};

use crate::Map;

#[derive(Default)]
struct Source {
    ids: HashSet<MessageId, foldhash::fast::RandomState>,
    /// (expiry, id) in the order opened.
    order: VecDeque<(u64, MessageId)>,
    /// This source's envelopes expiring at or before this are refused.
    floor_ms: u64,
}

impl Source {
    /// Drops the entries from the front that expired at `now_ms`.
    fn expire(&mut self, now_ms: u64) -> usize {
        let mut n = 0;
        while let Some(&(exp, id)) = self.order.front() {
            if exp > now_ms {
                break;
            }
            self.order.pop_front();
            self.ids.remove(&id);
            n += 1;
        }
        if n > 0 {
            self.trim();
        }
        n
    }

    /// Gives up the oldest entry; the floor rises to its expiry.
    fn evict_one(&mut self) -> bool {
        match self.order.pop_front() {
            Some((exp, id)) => {
                self.ids.remove(&id);
                self.floor_ms = self.floor_ms.max(exp);
                self.trim();
                true
            }
            None => false,
        }
    }

    /// Gives memory back once a source holds far fewer entries than it once did, so the
    /// window's bound holds in bytes and not only in entries (sources that were each the
    /// heaviest in turn would otherwise keep their largest tables). Amortised: after a shrink
    /// to twice the entries, half of them must go before the next.
    fn trim(&mut self) {
        let len = self.order.len();
        if self.order.capacity() > TRIM_MIN && len * 4 < self.order.capacity() {
            self.order.shrink_to(len * 2);
            self.ids.shrink_to(len * 2);
        }
    }
}

/// Tables this small are never shrunk.
const TRIM_MIN: usize = 64;

pub(super) struct Window {
    sources: Map<AgentId, Source>,
    entries: usize,
    cap: usize,
    /// The source holding the most entries, as far as inserts tell (eviction goes there).
    heaviest: Option<AgentId>,
    inserts: u64,
}

impl Window {
    pub(super) fn new(cap: usize) -> Self {
        Window {
            sources: Map::default(),
            entries: 0,
            cap: cap.max(1),
            heaviest: None,
            inserts: 0,
        }
    }

    /// Whether it must be refused as a replay.
    pub(super) fn seen(&self, source: &AgentId, id: &MessageId, expires_ms: u64) -> bool {
        self.sources
            .get(source)
            .is_some_and(|s| expires_ms <= s.floor_ms || s.ids.contains(id))
    }

    /// Records an opened envelope.
    pub(super) fn insert(&mut self, source: AgentId, id: MessageId, expires_ms: u64, now_ms: u64) {
        self.inserts += 1;
        if self.inserts % 4096 == 0 {
            self.sweep(now_ms);
        }
        let s = self.sources.entry(source).or_default();
        self.entries -= s.expire(now_ms);
        if s.ids.insert(id) {
            s.order.push_back((expires_ms, id));
            self.entries += 1;
        }
        let n = s.ids.len();
        let heaviest_n = self
            .heaviest
            .and_then(|h| self.sources.get(&h))
            .map_or(0, |h| h.ids.len());
        if n >= heaviest_n {
            self.heaviest = Some(source);
        }
        while self.entries > self.cap {
            let Some(h) = self.heaviest else { break };
            if self.sources.get_mut(&h).is_some_and(Source::evict_one) {
                self.entries -= 1;
                continue;
            }
            // The heaviest emptied: find the next (rare: it takes a source holding the whole
            // window to empty it).
            self.heaviest = self
                .sources
                .iter()
                .filter(|(_, s)| !s.ids.is_empty())
                .max_by_key(|(_, s)| s.ids.len())
                .map(|(a, _)| *a);
            if self.heaviest.is_none() {
                break;
            }
        }
    }

    /// Drops expired entries everywhere, and sources left with nothing to remember.
    fn sweep(&mut self, now_ms: u64) {
        let mut gone = 0;
        self.sources.retain(|_, s| {
            gone += s.expire(now_ms);
            !s.ids.is_empty() || s.floor_ms > now_ms
        });
        self.entries -= gone;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_source_that_shrank_gives_its_memory_back() {
        let mut s = Source::default();
        for i in 0..10_000u128 {
            s.ids.insert(MessageId::from_u128(i));
            s.order.push_back((1_000, MessageId::from_u128(i)));
        }
        while s.order.len() > 10 {
            s.evict_one();
        }
        assert!(s.order.capacity() < 1_000, "queue {}", s.order.capacity());
        assert!(s.ids.capacity() < 1_000, "set {}", s.ids.capacity());
        assert_eq!(s.ids.len(), 10);
        assert_eq!(s.floor_ms, 1_000);
    }

    proptest! {
        /// Random opens (ids repeating, TTLs mixed, two sources, the clock moving): an id is
        /// never accepted twice before it expires, the window never holds more than its bound,
        /// and a source that holds at most a third of the window is never refused an id it
        /// has not sent (the other, heavier source pays for the bound).
        #[test]
        fn never_accepts_a_replay_and_stays_within_its_bound(
            ops in proptest::collection::vec((0u8..4, 0u128..64, 1u64..5_000, 0u64..40), 1..600),
        ) {
            const CAP: usize = 15;
            let mut w = Window::new(CAP);
            let (mut now, mut light_sent) = (1_000u64, 0usize);
            let mut accepted: Map<(u8, u128), u64> = Map::default();
            // A replay repeats the envelope: its id with the expiry it was sealed with.
            let mut expiry: Map<(u8, u128), u64> = Map::default();
            for (src, id, ttl, step) in ops {
                now += step;
                // Source 1 sends few distinct ids, source 0 (three times as often) many.
                let src = src.min(1) ^ 1;
                let id = if src == 1 { id % 5 } else { id };
                let exp = *expiry.entry((src, id)).or_insert(now + ttl);
                if exp <= now {
                    continue; // refused as expired before the window is asked
                }
                let (a, m) = (AgentId([src; 32]), MessageId::from_u128(id));
                let seen = w.seen(&a, &m, exp);
                if let Some(&until) = accepted.get(&(src, id)) {
                    if until > now {
                        prop_assert!(seen, "replay of {}/{} accepted at {}", src, id, now);
                    }
                }
                let fresh_light = src == 1 && !accepted.contains_key(&(1, id));
                if fresh_light && light_sent < CAP / 3 {
                    prop_assert!(!seen, "light source refused fresh id {}", id);
                }
                if !seen {
                    light_sent += usize::from(fresh_light);
                    w.insert(a, m, exp, now);
                    accepted.insert((src, id), exp);
                }
                prop_assert!(w.entries <= CAP);
                let held: usize = w.sources.values().map(|s| s.ids.len()).sum();
                prop_assert_eq!(held, w.entries);
            }
        }
    }
}

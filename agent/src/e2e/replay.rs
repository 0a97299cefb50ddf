//! The replay window: every (source, message id) opened, until its envelope expires.
//!
//! Bounded in entries over all sources. At the bound the source holding the most entries gives
//! up its earliest-expiring one and its own floor rises past that expiry: an envelope from that
//! source expiring at or before its floor is refused (it may have been seen). So a sender that
//! floods the window locks out only itself, never the others.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use openmesh_dataplane::wire::{AgentId, MessageId};

use crate::Map;

#[derive(Default)]
struct Source {
    ids: Map<MessageId, u64>,
    by_expiry: BinaryHeap<Reverse<(u64, MessageId)>>,
    /// This source's envelopes expiring at or before this are refused.
    floor_ms: u64,
}

impl Source {
    /// Drops the entries expired at `now_ms`.
    fn expire(&mut self, now_ms: u64) -> usize {
        let mut n = 0;
        while let Some(Reverse((exp, id))) = self.by_expiry.peek().copied() {
            if exp > now_ms {
                break;
            }
            self.by_expiry.pop();
            self.ids.remove(&id);
            n += 1;
        }
        n
    }

    /// Gives up the earliest-expiring entry; the floor rises past it.
    fn evict_one(&mut self) -> bool {
        match self.by_expiry.pop() {
            Some(Reverse((exp, id))) => {
                self.ids.remove(&id);
                self.floor_ms = self.floor_ms.max(exp);
                true
            }
            None => false,
        }
    }
}

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
            .is_some_and(|s| expires_ms <= s.floor_ms || s.ids.contains_key(id))
    }

    /// Records an opened envelope.
    pub(super) fn insert(&mut self, source: AgentId, id: MessageId, expires_ms: u64, now_ms: u64) {
        self.inserts += 1;
        if self.inserts % 4096 == 0 {
            self.sweep(now_ms);
        }
        let s = self.sources.entry(source).or_default();
        self.entries -= s.expire(now_ms);
        if s.ids.insert(id, expires_ms).is_none() {
            s.by_expiry.push(Reverse((expires_ms, id)));
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

//! The replay window: every (source, message id) opened, until its envelope expires; bounded
//! in entries, and beyond the bound the oldest go and the window's floor rises past their
//! expiry, so an envelope expiring at or before the floor is refused (it may have been seen).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use openmesh_dataplane::wire::{AgentId, MessageId};

use crate::Map;

pub(super) struct Window {
    seen: Map<(AgentId, MessageId), u64>,
    by_expiry: BinaryHeap<Reverse<(u64, AgentId, MessageId)>>,
    cap: usize,
    /// Envelopes expiring at or before this are refused.
    floor_ms: u64,
}

impl Window {
    pub(super) fn new(cap: usize) -> Self {
        Window {
            seen: Map::default(),
            by_expiry: BinaryHeap::new(),
            cap: cap.max(1),
            floor_ms: 0,
        }
    }

    /// Whether it must be refused as a replay.
    pub(super) fn seen(&self, source: &AgentId, id: &MessageId, expires_ms: u64) -> bool {
        expires_ms <= self.floor_ms || self.seen.contains_key(&(*source, *id))
    }

    /// Records an opened envelope; forgets the expired ones, and the oldest beyond the bound.
    pub(super) fn insert(&mut self, source: AgentId, id: MessageId, expires_ms: u64, now_ms: u64) {
        while let Some(Reverse((exp, s, i))) = self.by_expiry.peek().copied() {
            if exp > now_ms && self.seen.len() < self.cap {
                break;
            }
            self.by_expiry.pop();
            if self.seen.get(&(s, i)) == Some(&exp) {
                self.seen.remove(&(s, i));
            }
            if exp > now_ms {
                self.floor_ms = self.floor_ms.max(exp);
            }
        }
        if self.seen.insert((source, id), expires_ms).is_none() {
            self.by_expiry.push(Reverse((expires_ms, source, id)));
        }
    }
}

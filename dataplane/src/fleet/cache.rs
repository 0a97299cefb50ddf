//! Routes remembered per destination relay and constraints, so that forwarding looks a route up
//! instead of computing it for every envelope (146 µs for one constrained route in a fleet of
//! 1,000 relays; `benches/RESULTS.md`). Pure.
//!
//! A cached answer holds for one state of the fleet: the snapshot's generation and the epoch of
//! the link states (bumped whenever a link goes down or up, or its measured latency moves enough
//! to matter); either changing empties the cache. Bounded: agents choose their constraints, so
//! anyone can mint new keys; at most `cap` answers are kept, in two generations (the current
//! one fills to half the cap, then becomes the previous one and the one before is dropped; a hit
//! in the previous generation moves the answer forward), each at most a few kilobytes (the key's
//! lists are bounded by the wire, the paths by 4 × 8 relays).

use std::collections::HashMap;
use std::sync::Arc;

use super::path::{Constraints, Graph, LinkState, NoPath, Route};

/// What the cache is keyed by: where from, where to, what the envelope asks.
type Key = (usize, usize, Constraints);

/// Remembered routes.
pub struct RouteCache {
    cap: usize,
    /// (snapshot generation, link epoch) the answers hold for.
    state: (u64, u64),
    // Keys come from agents (their constraints): a seeded hash, and a fast one (SipHash was a
    // tenth of an ingress relay's time).
    current: HashMap<Key, Arc<Result<Route, NoPath>>, crate::shard::hasher::MapHasher>,
    previous: HashMap<Key, Arc<Result<Route, NoPath>>, crate::shard::hasher::MapHasher>,
    /// Lookups answered from the cache, and routes computed.
    pub hits: u64,
    pub misses: u64,
}

impl RouteCache {
    /// A cache of at most `cap` answers.
    pub fn new(cap: usize) -> Self {
        RouteCache {
            cap: cap.max(2),
            state: (0, 0),
            current: HashMap::default(),
            previous: HashMap::default(),
            hits: 0,
            misses: 0,
        }
    }

    /// The route from `from` to `to` for constraints `c`, with the links in state `links` at
    /// `link_epoch`: remembered, or computed and remembered.
    pub fn route(
        &mut self,
        g: &Graph<'_>,
        links: &dyn LinkState,
        link_epoch: u64,
        from: usize,
        to: usize,
        c: &Constraints,
    ) -> Arc<Result<Route, NoPath>> {
        let state = (g.snap.generation, link_epoch);
        if state != self.state {
            self.state = state;
            self.current.clear();
            self.previous.clear();
        }
        let key = (from, to, c.clone());
        if let Some(r) = self.current.get(&key) {
            self.hits += 1;
            return r.clone();
        }
        let r = match self.previous.remove(&key) {
            Some(r) => {
                self.hits += 1;
                r
            }
            None => {
                self.misses += 1;
                Arc::new(g.route(links, from, to, c))
            }
        };
        if self.current.len() >= self.cap / 2 {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(key, r.clone());
        r
    }

    /// Answers kept.
    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

//! Where the fleet's agents are, as one core knows it: agent → (relay, stamp of that
//! attachment), learned from presence over relay links and this relay's own attachments
//! (`docs/FLEET.md`, where agents are).
//!
//! The table is bounded, and a full table makes room rather than refusing: the newest entry is
//! what routes an agent that just attached. The entry given up is the oldest of the relay the
//! most entries name, so a relay whose agents mint identities (each a TLS handshake and
//! a HELLO, cheap to an attacker) pushes out only its own agents' entries once it holds more
//! than any other relay; the fleet's other relays keep theirs. Relays announce the agents
//! attached to them again every [`REFRESH_US`], so an attached agent pushed out is found again.
//!
//! Each relay's entries are kept in announcement order in a queue; an entry replaced by a newer
//! one leaves its old queue item behind, skipped when it comes up and dropped in one pass when a
//! queue holds more than twice its live entries (amortised constant time per entry).

use std::collections::{BTreeSet, HashMap, VecDeque};

use super::hasher::MapHasher;
use crate::wire::{AgentId, PresenceEntry, RelayId};

/// How often a relay announces the agents attached to it again, microseconds.
pub const REFRESH_US: u64 = 30_000_000;
/// Memory of one map entry (agent id, relay id, stamp and number: 80 bytes and a control
/// byte) with hashbrown's slack (it may be 7/16 full).
const MAP_ENTRY_BYTES: usize = 192;
/// Memory of one queue item (40 bytes) with the queue's slack (up to twice its length).
const ITEM_BYTES: usize = 2 * 40;
/// Memory one entry takes at most: its map entry and up to two queue items.
pub const ENTRY_BYTES: usize = MAP_ENTRY_BYTES + 2 * ITEM_BYTES;

/// One relay's entries in the order they were recorded: (agent, the entry's recording
/// number), so an item left behind never matches an entry recorded again later.
#[derive(Default)]
struct Share {
    order: VecDeque<(AgentId, u64)>,
    live: usize,
}

/// The presence table of one core.
#[derive(Default)]
pub(crate) struct Locations {
    /// Agent → (relay, stamp, recording number).
    map: HashMap<AgentId, (RelayId, u64, u64), MapHasher>,
    shares: HashMap<RelayId, Share, MapHasher>,
    /// (live entries, relay): the relay with the most entries is the last.
    by_size: BTreeSet<(usize, RelayId)>,
    /// Queue items, all relays together (live ones and those left behind).
    items: usize,
    /// The next recording number.
    next: u64,
    /// Entries given up since the last [`Locations::take_evicted`].
    evicted: u64,
}

impl Locations {
    /// Agents located.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// What the table takes in memory, bytes.
    pub(crate) fn bytes(&self) -> usize {
        self.map.len() * MAP_ENTRY_BYTES + self.items * ITEM_BYTES
    }

    /// Entries given up since the last call.
    pub(crate) fn take_evicted(&mut self) -> u64 {
        std::mem::take(&mut self.evicted)
    }

    /// The relay `agent` was last announced on.
    pub(crate) fn get(&self, agent: &AgentId) -> Option<RelayId> {
        self.map.get(agent).map(|(r, _, _)| *r)
    }

    /// Every entry, for a link that just came up.
    pub(crate) fn entries(&self) -> impl Iterator<Item = PresenceEntry> + '_ {
        self.map.iter().map(|(a, (r, s, _))| PresenceEntry {
            agent: *a,
            relay: *r,
            stamp_ms: *s,
        })
    }

    /// Records `e` if it is newer than what is known of its agent (by stamp, then relay id),
    /// within `cap` entries: a new agent in a full table takes the place of the oldest entry of
    /// the relay with the most. Returns whether it was recorded.
    pub(crate) fn record(&mut self, e: &PresenceEntry, cap: usize) -> bool {
        match self.map.get(&e.agent) {
            Some((r, s, _)) if (*s, r.0) >= (e.stamp_ms, e.relay.0) => return false,
            Some((r, _, _)) => {
                let old = *r;
                self.resize(old, -1);
            }
            None => {
                if cap == 0 {
                    return false;
                }
                while self.map.len() >= cap {
                    self.evict();
                }
            }
        }
        let n = self.next;
        self.next += 1;
        self.map.insert(e.agent, (e.relay, e.stamp_ms, n));
        self.shares
            .entry(e.relay)
            .or_default()
            .order
            .push_back((e.agent, n));
        self.items += 1;
        self.resize(e.relay, 1);
        true
    }

    /// Moves `relay`'s live count by `by`, keeping `by_size` in step; a relay left with no live
    /// entry is forgotten, and a queue mostly of items left behind is compacted.
    fn resize(&mut self, relay: RelayId, by: isize) {
        let Some(share) = self.shares.get_mut(&relay) else {
            return;
        };
        self.by_size.remove(&(share.live, relay));
        share.live = share.live.saturating_add_signed(by);
        if share.live == 0 {
            self.items -= share.order.len();
            self.shares.remove(&relay);
            return;
        }
        self.by_size.insert((share.live, relay));
        if share.order.len() > 2 * share.live + 16 {
            let before = share.order.len();
            let map = &self.map;
            share.order.retain(|(a, n)| live(map, a, relay, *n));
            share.order.shrink_to(2 * share.order.len());
            self.items -= before - share.order.len();
        }
    }

    /// Gives up the oldest entry of the relay with the most.
    fn evict(&mut self) {
        let Some(&(_, relay)) = self.by_size.last() else {
            return;
        };
        let share = self
            .shares
            .get_mut(&relay)
            .expect("a sized relay has a share");
        if share.order.capacity() > 4 * share.order.len() + 64 {
            // Evicted far below what it once held: its queue gives the memory back.
            share.order.shrink_to(2 * share.order.len());
        }
        while let Some((agent, n)) = share.order.pop_front() {
            self.items -= 1;
            if live(&self.map, &agent, relay, n) {
                self.map.remove(&agent);
                self.evicted += 1;
                self.resize(relay, -1);
                return;
            }
        }
        unreachable!("a relay with live entries has them in its queue");
    }
}

/// Whether the queue item (`agent`, recording number `n`) of `relay` is the entry the map holds
/// (not one left behind).
fn live(
    map: &HashMap<AgentId, (RelayId, u64, u64), MapHasher>,
    agent: &AgentId,
    relay: RelayId,
    n: u64,
) -> bool {
    map.get(agent)
        .is_some_and(|(r, _, m)| (*r, *m) == (relay, n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(agent: u16, relay: u8, stamp: u64) -> PresenceEntry {
        let mut a = [0u8; 32];
        a[..2].copy_from_slice(&agent.to_be_bytes());
        PresenceEntry {
            agent: AgentId(a),
            relay: RelayId([relay; 32]),
            stamp_ms: stamp,
        }
    }

    #[test]
    fn a_relay_minting_agents_pushes_out_only_its_own() {
        let mut t = Locations::default();
        // Relay 1 announces 10 agents, relay 2 20; then relay 3 announces 1,000 new ones in a
        // table of 100.
        for i in 0..10 {
            assert!(t.record(&entry(i, 1, 1), 100));
        }
        for i in 10..30 {
            assert!(t.record(&entry(i, 2, 1), 100));
        }
        for i in 1000..2000 {
            assert!(t.record(&entry(i, 3, 2), 100), "the newest is recorded");
        }
        assert_eq!(t.len(), 100);
        assert_eq!(t.take_evicted(), 930);
        for i in 0..10 {
            assert_eq!(t.get(&entry(i, 1, 1).agent), Some(RelayId([1; 32])));
        }
        for i in 10..30 {
            assert_eq!(t.get(&entry(i, 2, 1).agent), Some(RelayId([2; 32])));
        }
        // Relay 3 keeps its 70 newest.
        assert_eq!(t.get(&entry(1929, 3, 2).agent), None);
        assert!(t.get(&entry(1930, 3, 2).agent).is_some());
        // Its queue was compacted as it went: items stay within twice the live entries.
        assert!(t.items <= 2 * 100 + 3 * 16, "{} items", t.items);
    }

    #[test]
    fn a_refreshed_agent_is_newest_again() {
        let mut t = Locations::default();
        for i in 0..4 {
            t.record(&entry(i, 1, 1), 4);
        }
        // Agent 0 announced again: agent 1 is now the relay's oldest.
        assert!(t.record(&entry(0, 1, 5), 4));
        assert!(
            !t.record(&entry(0, 1, 5), 4),
            "the same stamp again is not new"
        );
        assert!(t.record(&entry(9, 1, 6), 4));
        assert!(t.get(&entry(0, 1, 1).agent).is_some());
        assert!(t.get(&entry(1, 1, 1).agent).is_none());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Random announcements from four relays into a small table, against a model: the
        /// table stays within its bound, holds each agent's newest recorded entry, and every
        /// entry it gives up is the oldest of a relay holding the most.
        #[test]
        fn stays_bounded_and_evicts_the_oldest_of_the_largest(
            cap in 1usize..24,
            ops in proptest::collection::vec((0u16..40, 0u8..4, 0u64..30), 1..400),
        ) {
            let mut t = Locations::default();
            // Model: agent -> (relay, stamp, order of recording).
            let mut model: HashMap<AgentId, (RelayId, u64, usize)> = HashMap::new();
            for (n, (agent, relay, stamp)) in ops.into_iter().enumerate() {
                let e = entry(agent, relay, stamp);
                let newer = model
                    .get(&e.agent)
                    .is_none_or(|(r, s, _)| (*s, r.0) < (e.stamp_ms, e.relay.0));
                let before = model.clone();
                prop_assert_eq!(t.record(&e, cap), newer);
                if newer {
                    model.insert(e.agent, (e.relay, e.stamp_ms, n));
                }
                // What the table gave up.
                let gone: Vec<AgentId> = model
                    .keys()
                    .filter(|a| t.get(a).is_none())
                    .copied()
                    .collect();
                prop_assert!(gone.len() <= 1);
                for a in gone {
                    let (r, _, order) = model.remove(&a).unwrap();
                    let mut counts: HashMap<RelayId, usize> = HashMap::new();
                    for (r, _, _) in before.values() {
                        *counts.entry(*r).or_default() += 1;
                    }
                    let most = counts.values().copied().max().unwrap();
                    prop_assert_eq!(counts[&r], most, "evicted from a relay holding fewer");
                    let oldest = before
                        .values()
                        .filter(|(q, _, _)| *q == r)
                        .map(|(_, _, o)| *o)
                        .min()
                        .unwrap();
                    prop_assert_eq!(order, oldest, "not the relay's oldest");
                }
                prop_assert!(t.len() <= cap);
                prop_assert_eq!(t.len(), model.len());
                for (a, (r, _, _)) in &model {
                    prop_assert_eq!(t.get(a), Some(*r));
                }
                let live: usize = t.shares.values().map(|s| s.live).sum();
                prop_assert_eq!(live, t.len());
                prop_assert_eq!(t.by_size.len(), t.shares.len());
                let items: usize = t.shares.values().map(|s| s.order.len()).sum();
                prop_assert_eq!(items, t.items);
            }
        }
    }
}

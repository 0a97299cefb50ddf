//! The relay's memory budget: what each shard holds, the relay-wide sum, and the overload states.
//!
//! Every shard counts what it retains on peers' behalf (`Usage`): custody (envelopes queued, in
//! flight and held for absent agents: their frame bytes and 160 bytes each for the decoded
//! envelope and its slot), read buffers (their capacity: what they really
//! retain), write buffers, control output, and a fixed share per connection for its TLS and
//! session state. The count is exact at each tick and only grows in between (everything accepted
//! since the tick is added, nothing released is subtracted), so the budget is never
//! underestimated. Each shard publishes its figure in a relay-wide slot; the sum decides the
//! state:
//!
//! | state | from | what the relay does |
//! |---|---|---|
//! | `normal` | below 70 % | everything |
//! | `shed` | 70 % | best-effort envelopes dropped at ingress (counted `overloaded`), new sessions refused (CLOSE `overloaded`) |
//! | `refuse` | 90 % | also: new at-least-once envelopes NACKed `overloaded` (retryable), new connections closed at accept |
//!
//! Nothing already ACKed is ever dropped to get back under the budget: the states only refuse
//! new work, and custody leaves by delivery or expiry.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Bytes charged per connection for what it holds besides its buffers (TLS state, session,
/// tasks).
pub const CONNECTION_OVERHEAD: u64 = 16 << 10;

/// Fraction of the budget (in percent) at which best-effort is shed and sessions refused.
const SHED_AT: u64 = 70;
/// Fraction of the budget (in percent) at which new at-least-once envelopes are refused.
const REFUSE_AT: u64 = 90;

/// Overload states, in increasing order of severity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Overload {
    Normal = 0,
    /// Best-effort shed, new sessions refused.
    Shed = 1,
    /// Also new at-least-once envelopes and connections refused.
    Refuse = 2,
}

impl Overload {
    /// The label in logs.
    pub fn label(self) -> &'static str {
        match self {
            Overload::Normal => "normal",
            Overload::Shed => "shed",
            Overload::Refuse => "refuse",
        }
    }
}

/// The relay-wide budget: one usage slot per shard.
#[derive(Debug)]
pub struct RelayBudget {
    /// Bytes the relay may hold on peers' behalf (changes on reload).
    limit: AtomicU64,
    slots: Vec<AtomicU64>,
}

impl RelayBudget {
    /// A budget of `limit` bytes shared by `shards` shards.
    pub fn new(limit: u64, shards: usize) -> Arc<Self> {
        Arc::new(RelayBudget {
            limit: AtomicU64::new(limit),
            slots: (0..shards).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    /// The limit in bytes.
    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Changes the limit (configuration reload).
    pub fn set_limit(&self, limit: u64) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// Records shard `shard`'s usage.
    pub fn publish(&self, shard: u16, bytes: u64) {
        self.slots[shard as usize].store(bytes, Ordering::Relaxed);
    }

    /// The relay's usage: the sum of every shard's last figure.
    pub fn used(&self) -> u64 {
        self.slots.iter().map(|s| s.load(Ordering::Relaxed)).sum()
    }

    /// The state for a usage of `used` bytes.
    pub fn state_for(&self, used: u64) -> Overload {
        let pct = used.saturating_mul(100) / self.limit().max(1);
        if pct >= REFUSE_AT {
            Overload::Refuse
        } else if pct >= SHED_AT {
            Overload::Shed
        } else {
            Overload::Normal
        }
    }
}

/// One shard's view: its exact usage at the last tick, what it accepted since, and the state.
#[derive(Debug)]
pub(crate) struct ShardBudget {
    relay: Arc<RelayBudget>,
    shard: u16,
    /// Exact at the last tick.
    at_tick: u64,
    /// Added since the last tick (never subtracted until the next one).
    since: u64,
    published_since: u64,
    pub(crate) state: Overload,
}

impl ShardBudget {
    pub(crate) fn new(relay: Arc<RelayBudget>, shard: u16) -> Self {
        ShardBudget {
            relay,
            shard,
            at_tick: 0,
            since: 0,
            published_since: 0,
            state: Overload::Normal,
        }
    }

    /// The shard's exact usage, counted at a tick. Returns the new state if it changed.
    pub(crate) fn tick(&mut self, exact: u64) -> Option<Overload> {
        self.at_tick = exact;
        self.since = 0;
        self.published_since = 0;
        self.refresh()
    }

    /// Charges `bytes` accepted since the last tick. Returns the new state if it changed.
    pub(crate) fn charge(&mut self, bytes: u64) -> Option<Overload> {
        self.since += bytes;
        // Re-publish (and re-read the relay's state) every 1/64 of the budget of growth; the
        // limit may change on reload.
        let step = (self.relay.limit() / 64).max(1);
        if self.since - self.published_since >= step {
            self.published_since = self.since;
            return self.refresh();
        }
        None
    }

    /// This shard's current figure.
    pub(crate) fn used(&self) -> u64 {
        self.at_tick + self.since
    }

    /// The relay's limit.
    pub(crate) fn limit(&self) -> u64 {
        self.relay.limit()
    }

    fn refresh(&mut self) -> Option<Overload> {
        self.relay.publish(self.shard, self.used());
        let state = self.relay.state_for(self.relay.used());
        (state != std::mem::replace(&mut self.state, state)).then_some(state)
    }
}

impl super::Shard {
    /// What this shard retains on peers' behalf, counted exactly (see `budget`).
    pub(super) fn usage(&self) -> u64 {
        let buffers =
            self.spare_buffer_bytes() + self.mesh.waiting_bytes() + self.mesh.locations_bytes();
        let conns: usize = self
            .conns
            .values()
            .map(|c| {
                CONNECTION_OVERHEAD as usize
                    + c.transport.retained()
                    + c.a.ctrl.capacity()
                    + c.a.outq.bytes()
                    + c.a.inflight.bytes()
                    + (c.a.outq.len() + c.a.inflight.slots())
                        * super::custody::HELD_ENVELOPE_OVERHEAD
                    + c.a.awaiting_bytes
                    + c.link.as_ref().map_or(0, |l| {
                        l.presence.capacity() * std::mem::size_of::<crate::wire::PresenceEntry>()
                    })
                    + if c.writing { c.write_len } else { 0 }
            })
            .sum();
        let stored = self.durable.as_ref().map_or(0, |d| d.pending_bytes());
        (self.held.retained() + buffers + conns + stored + self.dedup.retained()) as u64
    }

    /// Charges bytes accepted since the last tick against the budget.
    pub(super) fn charge(&mut self, bytes: u64) {
        if let Some(state) = self.budget.charge(bytes) {
            self.overload_changed(state);
        }
    }

    pub(super) fn overload_changed(&mut self, state: Overload) {
        self.m.overload_state.set(state as u8 as f64);
        let used = self.budget.used();
        let limit = self.budget.limit();
        if state == Overload::Normal {
            tracing::info!(core = self.id, used, limit, "memory budget: back to normal");
        } else {
            tracing::warn!(
                core = self.id,
                used,
                limit,
                state = state.label(),
                "memory budget: overload"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_follow_the_relay_wide_sum_and_growth_is_seen_between_ticks() {
        let relay = RelayBudget::new(1000, 2);
        let mut a = ShardBudget::new(relay.clone(), 0);
        let mut b = ShardBudget::new(relay.clone(), 1);
        assert_eq!(a.tick(300), None);
        assert_eq!(b.tick(300), None, "600 of 1000: normal");
        assert_eq!(b.charge(100), Some(Overload::Shed), "700: shed");
        // Shard a learns at its next publication.
        assert_eq!(a.charge(150), Some(Overload::Shed), "450 + 400");
        assert_eq!(relay.used(), 850);
        assert_eq!(a.charge(50), Some(Overload::Refuse), "500 + 400");
        assert_eq!(a.charge(5), None, "below the re-publication step");
        // Releases count only at the next tick.
        assert_eq!(a.tick(100), Some(Overload::Normal), "100 + 400");
        assert_eq!(relay.state_for(899), Overload::Shed);
        assert_eq!(relay.state_for(900), Overload::Refuse);
    }
}

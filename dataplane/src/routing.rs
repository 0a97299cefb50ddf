//! Routing: where an envelope goes next.
//!
//! Every core keeps its own [`Directory`] of which core owns which connected agent. Cores keep
//! their copies in step by messages (attach and detach), never by sharing a map, so the
//! per-envelope decision ([`Directory::route`]) is a local hash lookup with no lock.
//!
//! Ownership is decided by an attach sequence number taken from one relay-wide counter when a
//! session is established: for the same agent id the higher sequence (the newest session) wins,
//! whichever core it landed on.

use std::collections::HashMap;

use crate::wire::{AgentId, Destination, Envelope, Reason};

/// The home core of `agent` among `cores`: where its sessions live, its queue, its custody and
/// (with the store) its durable records. A fixed function of the id (its first eight bytes,
/// big-endian, modulo the number of cores), so it needs no directory.
pub fn home_core(agent: &AgentId, cores: u16) -> u16 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&agent.0[..8]);
    (u64::from_be_bytes(b) % cores.max(1) as u64) as u16
}

/// The core owning an attached agent, and the sequence number of that attachment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub core: u16,
    pub seq: u64,
}

/// What to do with an envelope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// The destination agent is attached to this core.
    Local,
    /// The destination agent is attached to another core.
    Core(u16),
    /// No path: refuse with this reason.
    Refuse(Reason),
}

/// Outcome of recording an attachment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    /// Recorded; the agent was not attached before.
    New,
    /// Recorded; it replaces an older attachment at this location.
    Replaced(Location),
    /// Ignored: a newer attachment is already known.
    Stale,
}

/// One core's view of where agents are attached.
#[derive(Clone, Debug, Default)]
pub struct Directory {
    // foldhash with a per-process random seed: fast, and agent ids cannot be chosen to collide.
    agents: HashMap<AgentId, Location, crate::shard::hasher::MapHasher>,
}

impl Directory {
    /// An empty directory.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `agent` attached at `loc`; the newest attachment (highest `seq`) wins.
    pub fn attach(&mut self, agent: AgentId, loc: Location) -> Attach {
        match self.agents.get(&agent).copied() {
            Some(old) if old.seq > loc.seq => Attach::Stale,
            Some(old) if old == loc => Attach::New,
            Some(old) => {
                self.agents.insert(agent, loc);
                Attach::Replaced(old)
            }
            None => {
                self.agents.insert(agent, loc);
                Attach::New
            }
        }
    }

    /// Forgets `agent` if it is still attached with sequence `seq`. Returns whether it was.
    pub fn detach(&mut self, agent: &AgentId, seq: u64) -> bool {
        match self.agents.get(agent) {
            Some(loc) if loc.seq == seq => {
                self.agents.remove(agent);
                true
            }
            _ => false,
        }
    }

    /// Where `agent` is attached.
    pub fn locate(&self, agent: &AgentId) -> Option<Location> {
        self.agents.get(agent).copied()
    }

    /// Number of attached agents known.
    pub fn len(&self) -> usize {
        self.agents.len()
    }

    /// Whether no agent is attached.
    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }

    /// The forwarding decision for an envelope at `my_core` of `cores`: the destination
    /// agent's home core, which queues it whether the agent is connected or not.
    pub fn route(&self, env: &Envelope, my_core: u16, cores: u16) -> Route {
        match env.destination() {
            Destination::Agent(a) => match home_core(&a, cores) {
                home if home == my_core => Route::Local,
                home => Route::Core(home),
            },
            Destination::Group(_) => Route::Refuse(Reason::DestinationUnavailable),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{EnvelopeBuilder, MessageId};

    fn env_to(a: AgentId) -> Envelope {
        EnvelopeBuilder::new(MessageId::from_u128(1), a, Destination::Agent(a), 0, 1)
            .build(b"")
            .unwrap()
    }

    #[test]
    fn newest_attachment_wins_and_stale_detach_is_ignored() {
        let a = AgentId([1; 32]);
        let mut d = Directory::new();
        assert_eq!(d.attach(a, Location { core: 0, seq: 5 }), Attach::New);
        assert_eq!(
            d.attach(a, Location { core: 1, seq: 7 }),
            Attach::Replaced(Location { core: 0, seq: 5 })
        );
        assert_eq!(d.attach(a, Location { core: 0, seq: 6 }), Attach::Stale);
        assert!(!d.detach(&a, 5));
        assert!(d.detach(&a, 7));
        assert_eq!(d.locate(&a), None);
    }

    #[test]
    fn envelopes_go_to_the_destinations_home_core_attached_or_not() {
        let mut id = [0u8; 32];
        id[7] = 5;
        let a = AgentId(id);
        assert_eq!(home_core(&a, 1), 0);
        assert_eq!(home_core(&a, 2), 1);
        assert_eq!(home_core(&a, 3), 2);
        let d = Directory::new();
        assert_eq!(d.route(&env_to(a), 1, 2), Route::Local);
        assert_eq!(d.route(&env_to(a), 0, 2), Route::Core(1));
        assert_eq!(d.route(&env_to(a), 0, 1), Route::Local);
    }
}

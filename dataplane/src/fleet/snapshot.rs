//! The route snapshot: what every relay (and later the control process) knows of the fleet.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;

use crate::wire::{DeliveryClass, Jurisdiction, RelayId};

/// One relay of the fleet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relay {
    pub id: RelayId,
    /// A name for people and for the fleet file's references.
    pub name: String,
    /// Where agents connect.
    pub agent_addr: SocketAddr,
    /// Where other relays connect (the link listener).
    pub link_addr: SocketAddr,
    /// Where it runs (ISO 3166 alpha-2).
    pub jurisdiction: Jurisdiction,
    /// 0 to 100.
    pub trust: u8,
    /// Operator or risk group: relays that may fail or misbehave together.
    pub group: String,
}

/// A link between two relays (both directions), by index into [`Snapshot::relays`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Link {
    pub a: usize,
    pub b: usize,
    /// One-way latency, microseconds (the measured RTT replaces it while the link runs).
    pub latency_us: u32,
    /// Megabits per second.
    pub throughput_mbps: u32,
    /// Operator's cost units per envelope.
    pub cost: u32,
}

/// Least trust a relay needs to carry an envelope of each class.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Thresholds {
    pub best_effort: u8,
    pub at_least_once: u8,
    pub durable: u8,
}

impl Thresholds {
    pub fn of(&self, class: DeliveryClass) -> u8 {
        match class {
            DeliveryClass::BestEffort => self.best_effort,
            DeliveryClass::AtLeastOnce => self.at_least_once,
            DeliveryClass::Durable => self.durable,
        }
    }
}

/// A named set of constraints the fleet offers (an agent may ask for one by name).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Jurisdictions or blocs allowed (empty: anywhere).
    pub jurisdictions: Vec<Jurisdiction>,
    pub min_trust: u8,
    pub avoid: Vec<RelayId>,
}

/// Why a snapshot is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    #[error("relay {0}: listed twice (by id or by name)")]
    DuplicateRelay(String),
    #[error("relay {0}: trust {1} is above 100")]
    Trust(String, u8),
    #[error("bloc {0}: not two uppercase letters, or it names itself")]
    Bloc(String),
    #[error("link {0}-{1}: a relay links to itself, or the link is listed twice")]
    Link(String, String),
    #[error("link {0}-{1}: latency, throughput and cost must be above zero")]
    LinkMetric(String, String),
    #[error("policy {0}: {1}")]
    Policy(String, String),
    #[error("the fleet has no relays")]
    Empty,
    #[error("threshold {0} is above 100")]
    Threshold(u8),
}

/// The fleet at one generation. Relays are sorted by id (their index is stable for a given
/// set of relays); links name relays by index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Increases with every change; a relay applies a snapshot only if it is newer.
    pub generation: u64,
    pub relays: Vec<Relay>,
    pub links: Vec<Link>,
    /// Bloc name (two letters, like `EU`) to the jurisdictions in it.
    pub blocs: BTreeMap<Jurisdiction, BTreeSet<Jurisdiction>>,
    pub thresholds: Thresholds,
    pub revoked: BTreeSet<RelayId>,
    pub policies: BTreeMap<String, Policy>,
    by_id: HashMap<RelayId, usize, crate::shard::hasher::MapHasher>,
}

impl Snapshot {
    /// Builds and validates a snapshot (relays in any order; links by relay id).
    pub fn new(
        generation: u64,
        mut relays: Vec<Relay>,
        links: Vec<(RelayId, RelayId, u32, u32, u32)>,
        blocs: BTreeMap<Jurisdiction, BTreeSet<Jurisdiction>>,
        thresholds: Thresholds,
        revoked: BTreeSet<RelayId>,
        policies: BTreeMap<String, Policy>,
    ) -> Result<Self, SnapshotError> {
        if relays.is_empty() {
            return Err(SnapshotError::Empty);
        }
        for t in [
            thresholds.best_effort,
            thresholds.at_least_once,
            thresholds.durable,
        ] {
            if t > 100 {
                return Err(SnapshotError::Threshold(t));
            }
        }
        relays.sort_by_key(|r| r.id);
        let mut by_id: HashMap<RelayId, usize, crate::shard::hasher::MapHasher> =
            HashMap::default();
        let mut names = BTreeSet::new();
        for (i, r) in relays.iter().enumerate() {
            if by_id.insert(r.id, i).is_some() || !names.insert(r.name.clone()) {
                return Err(SnapshotError::DuplicateRelay(r.name.clone()));
            }
            if r.trust > 100 {
                return Err(SnapshotError::Trust(r.name.clone(), r.trust));
            }
        }
        for (bloc, members) in &blocs {
            if members.contains(bloc) {
                return Err(SnapshotError::Bloc(bloc.as_str().into()));
            }
        }
        let mut seen = BTreeSet::new();
        let mut out = Vec::with_capacity(links.len());
        for (a, b, latency_us, throughput_mbps, cost) in links {
            let name = |id: &RelayId| {
                by_id
                    .get(id)
                    .map_or_else(|| format!("{id:?}"), |i| relays[*i].name.clone())
            };
            let (Some(&ia), Some(&ib)) = (by_id.get(&a), by_id.get(&b)) else {
                return Err(SnapshotError::Link(name(&a), name(&b)));
            };
            let key = (ia.min(ib), ia.max(ib));
            if ia == ib || !seen.insert(key) {
                return Err(SnapshotError::Link(name(&a), name(&b)));
            }
            if latency_us == 0 || throughput_mbps == 0 || cost == 0 {
                return Err(SnapshotError::LinkMetric(name(&a), name(&b)));
            }
            out.push(Link {
                a: key.0,
                b: key.1,
                latency_us,
                throughput_mbps,
                cost,
            });
        }
        for (name, p) in &policies {
            if p.min_trust > 100 {
                return Err(SnapshotError::Policy(
                    name.clone(),
                    "min_trust above 100".into(),
                ));
            }
            if p.jurisdictions.len() > crate::wire::MAX_CONSTRAINT_LIST
                || p.avoid.len() > crate::wire::MAX_CONSTRAINT_LIST
            {
                return Err(SnapshotError::Policy(
                    name.clone(),
                    format!(
                        "at most {} jurisdictions and {} relays to avoid",
                        crate::wire::MAX_CONSTRAINT_LIST,
                        crate::wire::MAX_CONSTRAINT_LIST
                    ),
                ));
            }
        }
        Ok(Snapshot {
            generation,
            relays,
            links: out,
            blocs,
            thresholds,
            revoked,
            policies,
            by_id,
        })
    }

    /// Index of relay `id`.
    pub fn index(&self, id: &RelayId) -> Option<usize> {
        self.by_id.get(id).copied()
    }

    /// Whether jurisdiction `j` is allowed by `allowed` (codes and blocs; empty allows all).
    pub fn allows(&self, allowed: &[Jurisdiction], j: Jurisdiction) -> bool {
        allowed.is_empty()
            || allowed
                .iter()
                .any(|a| *a == j || self.blocs.get(a).is_some_and(|m| m.contains(&j)))
    }
}

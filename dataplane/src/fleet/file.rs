//! The fleet file: TOML, field by field in `docs/FLEET.md`. Read into a [`Snapshot`], or
//! refused with the first reason.
//!
//! ```toml
//! generation = 7
//! full_mesh = false                   # true: a link between every two relays
//!
//! [thresholds]                        # least trust a relay needs, per delivery class
//! at_least_once = 30
//! durable = 50
//!
//! [blocs]
//! EU = ["DE", "FR", "NL"]
//!
//! [[relay]]
//! name = "fra-1"
//! id = "<64 hex characters: the relay identity's public key>"
//! agent = "127.0.0.1:7400"
//! link = "127.0.0.1:7500"
//! jurisdiction = "DE"
//! trust = 90
//! group = "operator-a"
//!
//! [[link]]
//! between = ["fra-1", "ams-1"]        # names or ids
//! latency_ms = 8.5
//! throughput_mbps = 10000
//! cost = 1
//!
//! revoked = ["old-1"]
//!
//! [policy.eu-only]
//! jurisdictions = ["EU"]
//! min_trust = 60
//! avoid = []
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use serde::Deserialize;

use super::snapshot::{Policy, Relay, Snapshot, SnapshotError, Thresholds};
use crate::wire::{Jurisdiction, RelayId};

/// Why a fleet file is refused.
#[derive(Debug, thiserror::Error)]
pub enum FleetFileError {
    #[error(transparent)]
    Toml(#[from] toml::de::Error),
    #[error("relay {0}: {1}")]
    Relay(String, String),
    #[error("link {0}: {1}")]
    Link(usize, String),
    #[error("bloc {0}: {1}")]
    Bloc(String, String),
    #[error("policy {0}: {1}")]
    Policy(String, String),
    #[error("revoked: {0} is not a relay of the fleet")]
    Revoked(String),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    generation: u64,
    #[serde(default)]
    full_mesh: bool,
    #[serde(default)]
    thresholds: ThresholdsFile,
    #[serde(default)]
    blocs: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    relay: Vec<RelayFile>,
    #[serde(default)]
    link: Vec<LinkFile>,
    #[serde(default)]
    revoked: Vec<String>,
    #[serde(default)]
    policy: BTreeMap<String, PolicyFile>,
    /// Link figures used by `full_mesh` (and by links that leave them out).
    #[serde(default)]
    default_link: LinkDefaults,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ThresholdsFile {
    #[serde(default)]
    best_effort: u8,
    #[serde(default)]
    at_least_once: u8,
    #[serde(default)]
    durable: u8,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RelayFile {
    name: String,
    id: String,
    agent: SocketAddr,
    link: SocketAddr,
    jurisdiction: String,
    trust: u8,
    #[serde(default)]
    group: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkFile {
    between: [String; 2],
    latency_ms: Option<f64>,
    throughput_mbps: Option<u32>,
    cost: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkDefaults {
    #[serde(default = "one_ms")]
    latency_ms: f64,
    #[serde(default = "ten_gbit")]
    throughput_mbps: u32,
    #[serde(default = "one")]
    cost: u32,
}

impl Default for LinkDefaults {
    fn default() -> Self {
        LinkDefaults {
            latency_ms: one_ms(),
            throughput_mbps: ten_gbit(),
            cost: one(),
        }
    }
}

fn one_ms() -> f64 {
    1.0
}
fn ten_gbit() -> u32 {
    10_000
}
fn one() -> u32 {
    1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    jurisdictions: Vec<String>,
    #[serde(default)]
    min_trust: u8,
    #[serde(default)]
    avoid: Vec<String>,
}

fn jurisdiction(s: &str) -> Option<Jurisdiction> {
    Jurisdiction::parse(s)
}

/// Reads a fleet file's text into a validated snapshot.
pub fn parse(text: &str) -> Result<Snapshot, FleetFileError> {
    let f: File = toml::from_str(text)?;
    let mut relays = Vec::with_capacity(f.relay.len());
    for r in &f.relay {
        let id = RelayId::from_hex(&r.id)
            .ok_or_else(|| FleetFileError::Relay(r.name.clone(), "id: not 64 hex digits".into()))?;
        let j = jurisdiction(&r.jurisdiction).ok_or_else(|| {
            FleetFileError::Relay(
                r.name.clone(),
                format!(
                    "jurisdiction {:?}: not two uppercase letters",
                    r.jurisdiction
                ),
            )
        })?;
        relays.push(Relay {
            id,
            name: r.name.clone(),
            agent_addr: r.agent,
            link_addr: r.link,
            jurisdiction: j,
            trust: r.trust,
            group: r.group.clone(),
        });
    }
    // Names and ids both name a relay.
    let find = |s: &str| -> Option<RelayId> {
        relays
            .iter()
            .find(|r| r.name == s || RelayId::from_hex(s) == Some(r.id))
            .map(|r| r.id)
    };
    let mut blocs = BTreeMap::new();
    for (name, members) in &f.blocs {
        let b = jurisdiction(name).ok_or_else(|| {
            FleetFileError::Bloc(name.clone(), "not two uppercase letters".into())
        })?;
        let mut set = BTreeSet::new();
        for m in members {
            set.insert(jurisdiction(m).ok_or_else(|| {
                FleetFileError::Bloc(
                    name.clone(),
                    format!("member {m:?}: not two uppercase letters"),
                )
            })?);
        }
        blocs.insert(b, set);
    }
    for b in blocs.keys() {
        // A bloc named like a country the fleet runs in would widen that country's
        // constraint to the bloc's members.
        if let Some(r) = relays.iter().find(|r| r.jurisdiction == *b) {
            return Err(FleetFileError::Bloc(
                b.as_str().into(),
                format!("relay {} runs in a jurisdiction of that name", r.name),
            ));
        }
    }
    let d = &f.default_link;
    if !(d.latency_ms.is_finite() && d.latency_ms > 0.0) {
        return Err(FleetFileError::Link(
            0,
            "default latency_ms must be above zero".into(),
        ));
    }
    let us = |ms: f64| ((ms * 1000.0).round().clamp(0.0, f64::from(u32::MAX)) as u32).max(1);
    let mut links = Vec::new();
    // Pair to index in `links`, so a listed link replaces its mesh entry in place.
    let mut mesh: std::collections::HashMap<(RelayId, RelayId), usize> =
        std::collections::HashMap::new();
    if f.full_mesh {
        for (i, a) in relays.iter().enumerate() {
            for b in &relays[i + 1..] {
                mesh.insert((a.id.min(b.id), a.id.max(b.id)), links.len());
                links.push((a.id, b.id, us(d.latency_ms), d.throughput_mbps, d.cost));
            }
        }
    }
    let mut listed = std::collections::HashSet::new();
    for (i, l) in f.link.iter().enumerate() {
        let ends: Vec<RelayId> = l
            .between
            .iter()
            .map(|s| {
                find(s).ok_or_else(|| FleetFileError::Link(i + 1, format!("{s}: not a relay")))
            })
            .collect::<Result<_, _>>()?;
        let latency = l.latency_ms.unwrap_or(d.latency_ms);
        if !(latency.is_finite() && latency > 0.0) {
            return Err(FleetFileError::Link(
                i + 1,
                "latency_ms must be above zero".into(),
            ));
        }
        let entry = (
            ends[0],
            ends[1],
            us(latency),
            l.throughput_mbps.unwrap_or(d.throughput_mbps),
            l.cost.unwrap_or(d.cost),
        );
        let pair = (ends[0].min(ends[1]), ends[0].max(ends[1]));
        if !listed.insert(pair) {
            return Err(FleetFileError::Link(i + 1, "listed twice".into()));
        }
        match mesh.get(&pair) {
            // Figures for one pair of the mesh.
            Some(&at) => links[at] = entry,
            None => links.push(entry),
        }
    }
    let mut revoked = BTreeSet::new();
    for s in &f.revoked {
        revoked.insert(find(s).ok_or_else(|| FleetFileError::Revoked(s.clone()))?);
    }
    let mut policies = BTreeMap::new();
    for (name, p) in &f.policy {
        let mut jurisdictions = Vec::new();
        for j in &p.jurisdictions {
            jurisdictions.push(jurisdiction(j).ok_or_else(|| {
                FleetFileError::Policy(name.clone(), format!("jurisdiction {j:?}"))
            })?);
        }
        let mut avoid = Vec::new();
        for a in &p.avoid {
            avoid.push(find(a).ok_or_else(|| {
                FleetFileError::Policy(name.clone(), format!("avoid {a}: not a relay"))
            })?);
        }
        policies.insert(
            name.clone(),
            Policy {
                jurisdictions,
                min_trust: p.min_trust,
                avoid,
            },
        );
    }
    let thresholds = Thresholds {
        best_effort: f.thresholds.best_effort,
        at_least_once: f.thresholds.at_least_once,
        durable: f.thresholds.durable,
    };
    Ok(Snapshot::new(
        f.generation,
        relays,
        links,
        blocs,
        thresholds,
        revoked,
        policies,
    )?)
}

//! The fleet's forwarding decisions under random schedules: random fleets (jurisdictions, trust,
//! revocations, links), envelopes with random constraints, multipath and hop limits, links that
//! go down and come back, and a virtual clock. Every step one envelope copy moves by the
//! decision of the relay holding it (`fleet::transit`); a copy whose next link is down waits.
//!
//! After every step: no copy is on a relay its envelope's constraints or the fleet exclude, no
//! copy is delivered after it expired or anywhere but the destination's relay, no hop limit goes
//! below zero, and the destination relay hands each envelope to its agent at most once
//! (duplicate copies are dropped by message id, as the home core's check does). At the end,
//! with every link up, every envelope that has a compliant path and time left is delivered:
//! nothing is lost.
//!
//! `FLEET_SCHEDULES=N` runs N schedules (default 2,000); `FLEET_SEED=S` replays one. A failure
//! prints the seed that replays it.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use openmesh_dataplane::fleet::path::{Constraints, Graph};
use openmesh_dataplane::fleet::snapshot::{Relay, Snapshot, Thresholds};
use openmesh_dataplane::fleet::transit::{ingress, transit, Next, Place};
use openmesh_dataplane::testing::Rng;
use openmesh_dataplane::wire::{
    AgentId, Destination, Envelope, EnvelopeBuilder, Jurisdiction, MessageId, RelayId,
};

const CODES: [&str; 4] = ["DE", "FR", "US", "JP"];

fn fleet(rng: &mut Rng) -> Snapshot {
    let n = 4 + rng.below(8) as usize;
    let relays: Vec<Relay> = (0..n)
        .map(|i| Relay {
            id: RelayId([i as u8 + 1; 32]),
            name: format!("r{i}"),
            agent_addr: "127.0.0.1:7400".parse().unwrap(),
            link_addr: "127.0.0.1:7500".parse().unwrap(),
            jurisdiction: Jurisdiction::parse(CODES[rng.below(4) as usize]).unwrap(),
            trust: rng.below(101) as u8,
            group: String::new(),
        })
        .collect();
    let mut seen = BTreeSet::new();
    let mut links = Vec::new();
    for _ in 0..n * 2 {
        let (a, b) = (rng.below(n as u64) as u8, rng.below(n as u64) as u8);
        if a != b && seen.insert((a.min(b), a.max(b))) {
            links.push((
                RelayId([a + 1; 32]),
                RelayId([b + 1; 32]),
                1 + rng.below(20_000) as u32,
                100 * (1 + rng.below(100) as u32),
                1 + rng.below(9) as u32,
            ));
        }
    }
    let mut blocs = BTreeMap::new();
    blocs.insert(
        Jurisdiction::parse("EU").unwrap(),
        ["DE", "FR"]
            .iter()
            .map(|c| Jurisdiction::parse(c).unwrap())
            .collect(),
    );
    let mut revoked = BTreeSet::new();
    if rng.chance(30) {
        revoked.insert(RelayId([rng.below(n as u64) as u8 + 1; 32]));
    }
    let thresholds = Thresholds {
        best_effort: 0,
        at_least_once: rng.below(30) as u8,
        durable: rng.below(60) as u8,
    };
    Snapshot::new(
        1,
        relays,
        links,
        blocs,
        thresholds,
        revoked,
        BTreeMap::new(),
    )
    .unwrap()
}

fn constraints(rng: &mut Rng, n: usize) -> openmesh_dataplane::wire::Constraints {
    let jurisdictions = match rng.below(4) {
        0 => vec![],
        1 => vec![Jurisdiction::parse("EU").unwrap()],
        2 => vec![
            Jurisdiction::parse("US").unwrap(),
            Jurisdiction::parse("DE").unwrap(),
        ],
        _ => vec![Jurisdiction::parse(CODES[rng.below(4) as usize]).unwrap()],
    };
    let avoid = (0..rng.below(2))
        .map(|_| RelayId([rng.below(n as u64) as u8 + 1; 32]))
        .collect();
    openmesh_dataplane::wire::Constraints {
        jurisdictions,
        min_trust: rng.below(60) as u8,
        avoid,
        multipath_k: 1 + rng.below(3) as u8,
        ..Default::default()
    }
}

/// One copy of an envelope: where it is, and whether it is done (delivered, expired or out of
/// hops).
struct Copy {
    env: Envelope,
    at: usize,
    done: bool,
}

fn meets(snap: &Snapshot, env: &Envelope, i: usize) -> bool {
    let r = &snap.relays[i];
    let allowed: Vec<Jurisdiction> = env.jurisdictions().collect();
    let threshold = snap.thresholds.of(env.class());
    !snap.revoked.contains(&r.id)
        && r.trust >= env.min_trust().max(threshold)
        && snap.allows(&allowed, r.jurisdiction)
        && !env.avoid().any(|a| a == r.id)
}

fn schedule(seed: u64) -> Result<(), String> {
    let mut rng = Rng::new(seed);
    let snap = fleet(&mut rng);
    let g = Graph::new(&snap);
    let n = snap.relays.len();
    let mut down: HashSet<usize> = HashSet::new();
    let mut copies: Vec<Copy> = Vec::new();
    // Per envelope: its id, destination relay and expiry.
    let mut sent: Vec<(MessageId, usize, u64)> = Vec::new();
    let mut delivered: BTreeMap<MessageId, usize> = BTreeMap::new();
    let mut now: u64 = 1_000;
    // Some links start down.
    for l in 0..snap.links.len() {
        if rng.chance(30) {
            down.insert(l);
        }
    }
    let steps = 400 + rng.below(400);
    for step in 0..steps + 200 {
        let settling = step >= steps;
        // Links fail and come back; in the last 200 steps all are up.
        if settling {
            down.clear();
        } else if rng.chance(30) && !snap.links.is_empty() {
            let l = rng.below(snap.links.len() as u64) as usize;
            if !down.remove(&l) {
                down.insert(l);
            }
        }
        now += rng.below(300);
        if !settling && sent.len() < 30 && rng.chance(15) {
            let id = MessageId::from_u128(step as u128 + 1);
            let from = rng.below(n as u64) as usize;
            let to = rng.below(n as u64) as usize;
            if from != to {
                let mut b = EnvelopeBuilder::new(
                    id,
                    AgentId([0xa; 32]),
                    Destination::Agent(AgentId([0xb; 32])),
                    now,
                    5_000 + rng.below(200_000),
                );
                b.constraints = constraints(&mut rng, n);
                b.hop_limit = 2 + rng.below(7) as u8;
                let env = b.build(b"x").unwrap();
                let links = |l: usize| (!down.contains(&l)).then(|| snap.links[l].latency_us);
                let place = Place {
                    graph: &g,
                    links: &links,
                    me: from,
                };
                // Refused at the source (no compliant path now, or too few hops): the source
                // hears a NACK; nothing to deliver (`fleet::path`'s property test checks such
                // refusals against every path).
                if let Ok(parts) = ingress(&place, to, &env) {
                    let k = usize::from(env.multipath_k().max(1));
                    if parts.len() > k {
                        return Err(format!("{} copies for k = {k}", parts.len()));
                    }
                    sent.push((id, to, env.expires_ms()));
                    for r in parts {
                        let mut c = env.clone();
                        c.routing = r;
                        copies.push(Copy {
                            env: c,
                            at: from,
                            done: false,
                        });
                    }
                }
            }
        }
        let live: Vec<usize> = (0..copies.len()).filter(|i| !copies[*i].done).collect();
        if live.is_empty() {
            continue;
        }
        let i = live[rng.below(live.len() as u64) as usize];
        let links = |l: usize| (!down.contains(&l)).then(|| snap.links[l].latency_us);
        let place = Place {
            graph: &g,
            links: &links,
            me: copies[i].at,
        };
        let c = &mut copies[i];
        if !meets(&snap, &c.env, c.at) {
            return Err(format!(
                "copy of {:?} on relay {} its constraints exclude",
                c.env.message_id(),
                c.at
            ));
        }
        match transit(&place, &c.env, now) {
            Ok(Next::Deliver) => {
                let want = sent
                    .iter()
                    .find(|(id, ..)| *id == c.env.message_id())
                    .expect("sent");
                if c.at != want.1 {
                    return Err(format!("delivered on relay {} not {}", c.at, want.1));
                }
                if now >= c.env.expires_ms() {
                    return Err("delivered after expiry".into());
                }
                *delivered.entry(c.env.message_id()).or_default() += 1;
                c.done = true;
            }
            Ok(Next::Forward { to, routing }) => {
                let link = g.link_between(c.at, to);
                if link.is_none_or(|l| down.contains(&l)) {
                    return Err(format!(
                        "forwarded from {} to {to} over no link or a link down",
                        c.at
                    ));
                }
                if routing.hop_limit >= c.env.routing.hop_limit {
                    return Err("a hop did not use the hop limit".into());
                }
                c.env.routing = routing;
                c.at = to;
            }
            Ok(Next::Keep) => {}
            Err(openmesh_dataplane::wire::Reason::Expired) => c.done = true,
            Err(openmesh_dataplane::wire::Reason::HopLimitExceeded) => c.done = true,
            Err(r) => return Err(format!("refused in transit: {r}")),
        }
    }
    // At most one copy per path reached the destination (the home core there drops all but
    // the first by id), and every envelope with time left and a compliant path arrived.
    for (id, to, expires) in &sent {
        let got = delivered.get(id).copied().unwrap_or(0);
        let k = copies.iter().filter(|c| c.env.message_id() == *id).count();
        if got > k {
            return Err(format!("{id:?} arrived {got} times from {k} copies"));
        }
        let waiting = copies.iter().any(|c| c.env.message_id() == *id && !c.done);
        if got == 0 && waiting && *expires > now {
            let c = copies.iter().find(|c| c.env.message_id() == *id).unwrap();
            let all = |l: usize| Some(snap.links[l].latency_us);
            let path = g.route(
                &all,
                c.at,
                *to,
                &Constraints {
                    multipath: 1,
                    ..Constraints::of(&c.env)
                },
            );
            if let Ok(r) = path {
                if r.paths[0].len() - 1 <= usize::from(c.env.routing.hop_limit) {
                    return Err(format!(
                        "{id:?} still waiting on relay {} though a path exists: {:?}",
                        c.at, r.paths[0]
                    ));
                }
            }
        }
    }
    Ok(())
}

#[test]
fn random_fleets_forward_within_their_constraints_and_lose_nothing() {
    let seeds: Vec<u64> = match std::env::var("FLEET_SEED") {
        Ok(s) => vec![s.parse().unwrap()],
        Err(_) => {
            let n: u64 = std::env::var("FLEET_SCHEDULES")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(2_000);
            let base = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64;
            (0..n).map(|i| base.wrapping_add(i)).collect()
        }
    };
    for seed in seeds {
        if let Err(e) = schedule(seed) {
            panic!("seed {seed}: {e} (replay with FLEET_SEED={seed})");
        }
    }
}

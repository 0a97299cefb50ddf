//! Path computation on a generated fleet of 1,000 relays and 10,000 links: every relay's
//! routing table (the target: all of them in under a second), one constrained route (computed,
//! and looked up in the route cache), and two disjoint paths.

use std::collections::{BTreeMap, BTreeSet};

use criterion::{criterion_group, criterion_main, Criterion};
use openmesh_dataplane::fleet::cache::RouteCache;
use openmesh_dataplane::fleet::path::{AllUp, Constraints, Graph};
use openmesh_dataplane::fleet::snapshot::{Relay, Snapshot, Thresholds};
use openmesh_dataplane::wire::{Jurisdiction, PathClass, RelayId};

const RELAYS: usize = 1_000;
const LINKS: usize = 10_000;

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Relays placed on a 100 x 100 grid of "places", in 20 jurisdictions by region, trust 10 to
/// 100; each links to random others, latency from the distance between their places.
pub fn fleet() -> Snapshot {
    let mut seed = 7u64;
    let codes = [
        "DE", "FR", "NL", "BE", "IT", "ES", "PL", "SE", "AT", "IE", "US", "CA", "BR", "JP", "KR",
        "SG", "IN", "AU", "ZA", "GB",
    ];
    let mut place = Vec::with_capacity(RELAYS);
    let relays: Vec<Relay> = (0..RELAYS)
        .map(|i| {
            let (x, y) = (splitmix(&mut seed) % 100, splitmix(&mut seed) % 100);
            place.push((x, y));
            let mut id = [0u8; 32];
            id[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
            Relay {
                id: RelayId(id),
                name: format!("r{i}"),
                agent_addr: "127.0.0.1:7400".parse().unwrap(),
                link_addr: "127.0.0.1:7500".parse().unwrap(),
                jurisdiction: Jurisdiction::parse(codes[(x / 5) as usize % codes.len()]).unwrap(),
                trust: 10 + (splitmix(&mut seed) % 91) as u8,
                group: String::new(),
            }
        })
        .collect();
    let ids: Vec<RelayId> = relays.iter().map(|r| r.id).collect();
    let mut seen = BTreeSet::new();
    let mut links = Vec::with_capacity(LINKS);
    // A ring first (the fleet is connected), then random links.
    for i in 0..RELAYS {
        seen.insert((i.min((i + 1) % RELAYS), i.max((i + 1) % RELAYS)));
    }
    while seen.len() < LINKS {
        let a = (splitmix(&mut seed) % RELAYS as u64) as usize;
        let b = (splitmix(&mut seed) % RELAYS as u64) as usize;
        if a != b {
            seen.insert((a.min(b), a.max(b)));
        }
    }
    for (a, b) in seen {
        let (pa, pb) = (place[a], place[b]);
        let d = pa.0.abs_diff(pb.0) + pa.1.abs_diff(pb.1);
        let latency_us = 200 + d as u32 * 500;
        let throughput = [1_000, 10_000, 40_000][(splitmix(&mut seed) % 3) as usize];
        let cost = 1 + (splitmix(&mut seed) % 10) as u32;
        links.push((ids[a], ids[b], latency_us, throughput, cost));
    }
    let mut blocs = BTreeMap::new();
    blocs.insert(
        Jurisdiction::parse("EU").unwrap(),
        codes[..10]
            .iter()
            .map(|c| Jurisdiction::parse(c).unwrap())
            .collect(),
    );
    Snapshot::new(
        1,
        relays,
        links,
        blocs,
        Thresholds::default(),
        BTreeSet::new(),
        BTreeMap::new(),
    )
    .unwrap()
}

fn paths(c: &mut Criterion) {
    let snap = fleet();
    let g = Graph::new(&snap);
    let all = AllUp(&snap);
    let none = Constraints::default();
    let mut grp = c.benchmark_group("paths_1000_relays_10000_links");
    grp.sample_size(10);
    grp.bench_function("every_relays_table", |b| {
        b.iter(|| {
            for from in 0..RELAYS {
                std::hint::black_box(g.table(&all, from, &none, PathClass::LowLatency));
            }
        })
    });
    let eu = Constraints {
        jurisdictions: vec![Jurisdiction::parse("EU").unwrap()],
        min_trust: 50,
        ..Constraints::default()
    };
    // Two EU relays of trust 50 or more, far apart.
    let eligible: Vec<usize> = (0..RELAYS).filter(|i| g.allowed(*i, &eu)).collect();
    let (from, to) = (eligible[0], eligible[eligible.len() - 1]);
    grp.bench_function("one_route_eu_min_trust_50", |b| {
        b.iter(|| std::hint::black_box(g.route(&all, from, to, &eu)))
    });
    let mut cache = RouteCache::new(4096);
    grp.bench_function("one_route_eu_min_trust_50_cached", |b| {
        b.iter(|| std::hint::black_box(cache.route(&g, &all, 1, from, to, &eu)))
    });
    let two = Constraints {
        multipath: 2,
        ..Constraints::default()
    };
    grp.bench_function("two_disjoint_paths", |b| {
        b.iter(|| std::hint::black_box(g.route(&all, 0, RELAYS / 2, &two)))
    });
    grp.finish();
}

criterion_group!(benches, paths);
criterion_main!(benches);

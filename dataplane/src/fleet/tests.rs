//! The fleet file, the snapshot's checks, and paths: the seed's policy-aware example, avoid
//! lists, refusals, multipath; property tests against brute force on small random fleets.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use proptest::prelude::*;

use super::file::{parse, FleetFileError};
use super::path::{AllUp, Constraints, Graph, NoPath};
use super::snapshot::{Relay, Snapshot, Thresholds};
use super::transit::{ingress, transit, Next, Place};
use crate::wire::{
    AgentId, DeliveryClass, Destination, Envelope, EnvelopeBuilder, Jurisdiction, MessageId,
    PathClass, Reason, RelayId, MAX_PATH_LEN,
};

fn id(n: u8) -> RelayId {
    RelayId([n; 32])
}

fn hex(n: u8) -> String {
    format!("{n:02x}").repeat(32)
}

/// The seed's example: agent A on `ing` (DE), agent B on `egr` (FR). The fastest way is
/// through `cheap` (DE, trust 20); two high-trust EU relays make a slower way.
const SEED_FLEET: &str = include_str!("../../../deploy/fleet-example.toml");

fn names(s: &Snapshot, path: &[usize]) -> Vec<String> {
    path.iter().map(|i| s.relays[*i].name.clone()).collect()
}

fn at(s: &Snapshot, name: &str) -> usize {
    s.relays.iter().position(|r| r.name == name).unwrap()
}

#[test]
fn the_seed_example_goes_through_the_trusted_eu_relays() {
    let s = parse(SEED_FLEET).unwrap();
    assert_eq!(s.generation, 3);
    let g = Graph::new(&s);
    let (ing, egr) = (at(&s, "ing"), at(&s, "egr"));
    // No constraints: the fastest way, over the Atlantic and back.
    let r = g
        .route(&AllUp(&s), ing, egr, &Constraints::default())
        .unwrap();
    assert_eq!(names(&s, &r.paths[0]), ["ing", "nyc", "egr"]);
    assert_eq!(r.weight, 1000);
    // EU only: the low-trust relay is next fastest.
    let eu = Jurisdiction::parse("EU").unwrap();
    let mut c = Constraints {
        jurisdictions: vec![eu],
        ..Constraints::default()
    };
    let r = g.route(&AllUp(&s), ing, egr, &c).unwrap();
    assert_eq!(names(&s, &r.paths[0]), ["ing", "cheap", "egr"]);
    // EU only and avoid low trust (the fleet's named policy): the two trusted EU relays.
    let p = &s.policies["eu-only"];
    c.min_trust = p.min_trust;
    let r = g.route(&AllUp(&s), ing, egr, &c).unwrap();
    assert_eq!(names(&s, &r.paths[0]), ["ing", "ams", "bru", "egr"]);
    assert_eq!(r.weight, 15_000);
    assert_eq!(r.class, PathClass::LowLatency);
}

#[test]
fn avoided_relays_thresholds_revocations_and_dead_links_are_never_crossed() {
    let s = parse(SEED_FLEET).unwrap();
    let g = Graph::new(&s);
    let (ing, egr) = (at(&s, "ing"), at(&s, "egr"));
    let c = Constraints {
        avoid: vec![id(6)],
        ..Constraints::default()
    };
    let r = g.route(&AllUp(&s), ing, egr, &c).unwrap();
    assert_eq!(names(&s, &r.paths[0]), ["ing", "cheap", "egr"]);
    // The fleet's threshold for durable keeps `cheap` (trust 20) out.
    let mut strict = s.clone();
    strict.thresholds = Thresholds {
        durable: 50,
        ..s.thresholds
    };
    let g2 = Graph::new(&strict);
    let c = Constraints {
        avoid: vec![id(6)],
        delivery: DeliveryClass::Durable,
        ..Constraints::default()
    };
    let r = g2.route(&AllUp(&strict), ing, egr, &c).unwrap();
    assert_eq!(names(&strict, &r.paths[0]), ["ing", "ams", "bru", "egr"]);
    // The link ams-bru down: no way left without nyc and cheap.
    let down = s
        .links
        .iter()
        .position(|l| {
            (l.a, l.b)
                == (
                    at(&s, "ams").min(at(&s, "bru")),
                    at(&s, "ams").max(at(&s, "bru")),
                )
        })
        .unwrap();
    let links = |i: usize| (i != down).then(|| s.links[i].latency_us);
    assert_eq!(g2.route(&links, ing, egr, &c), Err(NoPath::NoCompliantPath));
    // Revoked: as if it were not there.
    let mut rev = s.clone();
    rev.revoked.insert(id(6));
    rev.revoked.insert(id(2));
    let r = Graph::new(&rev)
        .route(&AllUp(&rev), ing, egr, &Constraints::default())
        .unwrap();
    assert_eq!(names(&rev, &r.paths[0]), ["ing", "ams", "bru", "egr"]);
    // Ends that do not qualify.
    let us_only = Constraints {
        jurisdictions: vec![Jurisdiction::parse("US").unwrap()],
        ..Constraints::default()
    };
    assert_eq!(
        g.route(&AllUp(&s), ing, egr, &us_only),
        Err(NoPath::Ingress)
    );
    let de_only = Constraints {
        jurisdictions: vec![Jurisdiction::parse("DE").unwrap()],
        ..Constraints::default()
    };
    assert_eq!(g.route(&AllUp(&s), ing, egr, &de_only), Err(NoPath::Egress));
}

#[test]
fn two_disjoint_paths_where_the_shortest_path_would_block_the_second() {
    // The classic trap: the shortest path s-a-b-t uses the middle of both disjoint ones
    // (s-a-c-t and s-d-b-t); taking it first and removing its relays leaves no second path.
    let relays = ["s", "a", "b", "c", "d", "t"];
    let mut text = String::from("generation = 1\n");
    for (i, n) in relays.iter().enumerate() {
        text += &format!(
            "[[relay]]\nname = \"{n}\"\nid = \"{}\"\nagent = \"127.0.0.1:{}\"\nlink = \"127.0.0.1:{}\"\njurisdiction = \"DE\"\ntrust = 50\n",
            hex(i as u8 + 1),
            7400 + i,
            7500 + i
        );
    }
    for (a, b, ms) in [
        ("s", "a", 1),
        ("a", "b", 1),
        ("b", "t", 1),
        ("a", "c", 3),
        ("c", "t", 3),
        ("s", "d", 3),
        ("d", "b", 3),
    ] {
        text += &format!("[[link]]\nbetween = [\"{a}\", \"{b}\"]\nlatency_ms = {ms}\n");
    }
    let s = parse(&text).unwrap();
    let g = Graph::new(&s);
    let c = Constraints {
        multipath: 2,
        ..Constraints::default()
    };
    let r = g.route(&AllUp(&s), at(&s, "s"), at(&s, "t"), &c).unwrap();
    let mut got: Vec<Vec<String>> = r.paths.iter().map(|p| names(&s, p)).collect();
    got.sort();
    assert_eq!(got, [["s", "a", "c", "t"], ["s", "d", "b", "t"]]);
    assert_eq!(r.weight, 14_000);
    // Three are asked for, two exist: two.
    let c3 = Constraints {
        multipath: 3,
        ..Constraints::default()
    };
    assert_eq!(
        g.route(&AllUp(&s), at(&s, "s"), at(&s, "t"), &c3)
            .unwrap()
            .paths
            .len(),
        2
    );
}

#[test]
fn a_cheaper_path_longer_than_the_routing_part_holds_does_not_hide_a_short_one() {
    // A chain of ten relays at 1 ms a link, and one relay beside at 50 ms a link.
    let mut text = String::from("generation = 1\n");
    for i in 0..11u8 {
        text += &format!(
            "[[relay]]\nname = \"r{i}\"\nid = \"{}\"\nagent = \"127.0.0.1:{}\"\nlink = \"127.0.0.1:{}\"\njurisdiction = \"DE\"\ntrust = 50\n",
            hex(i + 1),
            7400 + u16::from(i),
            7500 + u16::from(i)
        );
    }
    for i in 0..9 {
        text += &format!(
            "[[link]]\nbetween = [\"r{i}\", \"r{}\"]\nlatency_ms = 1\n",
            i + 1
        );
    }
    text += "[[link]]\nbetween = [\"r0\", \"r10\"]\nlatency_ms = 50\n[[link]]\nbetween = [\"r10\", \"r9\"]\nlatency_ms = 50\n";
    let s = parse(&text).unwrap();
    let g = Graph::new(&s);
    let r = g
        .route(
            &AllUp(&s),
            at(&s, "r0"),
            at(&s, "r9"),
            &Constraints::default(),
        )
        .unwrap();
    assert_eq!(names(&s, &r.paths[0]), ["r0", "r10", "r9"]);
    // Two disjoint paths exist, but the chain is too long: the one path within the bound.
    let two = Constraints {
        multipath: 2,
        ..Constraints::default()
    };
    let r = g
        .route(&AllUp(&s), at(&s, "r0"), at(&s, "r9"), &two)
        .unwrap();
    assert_eq!(r.paths.len(), 1);
    assert_eq!(names(&s, &r.paths[0]), ["r0", "r10", "r9"]);
    assert_eq!(r.weight, 100_000);
    // Up to r7 the chain fits (8 relays).
    let r = g
        .route(
            &AllUp(&s),
            at(&s, "r0"),
            at(&s, "r7"),
            &Constraints::default(),
        )
        .unwrap();
    assert_eq!(r.paths[0].len(), MAX_PATH_LEN);
}

#[test]
fn a_bad_fleet_file_is_refused_with_its_reason() {
    let bad = [
        (SEED_FLEET.replace("trust = 20", "trust = 120"), "trust 120"),
        (
            SEED_FLEET.replace("\"cheap\", \"egr\"", "\"cheap\", \"nowhere\""),
            "nowhere: not a relay",
        ),
        (
            SEED_FLEET.replace("jurisdiction = \"US\"", "jurisdiction = \"usa\""),
            "jurisdiction \"usa\"",
        ),
        (SEED_FLEET.replace(&hex(6), &hex(3)), "listed twice"),
        (
            format!("{SEED_FLEET}\n[[link]]\nbetween = [\"egr\", \"cheap\"]\n"),
            "listed twice",
        ),
        (
            SEED_FLEET.replace("generation = 3", "generation = 3\nspeed = 9"),
            "unknown field",
        ),
        (
            SEED_FLEET.replace("generation = 3", "generation = 3\nrevoked = [\"ghost\"]"),
            "ghost is not a relay",
        ),
    ];
    let mut bad = bad.to_vec();
    bad.push((
        SEED_FLEET.replace("EU = [", "DE = [\"AT\"]\nEU = ["),
        "runs in a jurisdiction of that name",
    ));
    bad.push((
        format!(
            "{}\n[[link]]\nbetween = [\"cheap\", \"ing\"]\n",
            SEED_FLEET.replace("generation = 3", "generation = 3\nfull_mesh = true")
        ),
        "listed twice",
    ));
    for (text, want) in bad {
        let e = parse(&text).expect_err(want);
        assert!(e.to_string().contains(want), "{e} (wanted {want})");
    }
    assert!(matches!(
        parse("generation = 1"),
        Err(FleetFileError::Snapshot(_))
    ));
}

#[test]
fn a_full_mesh_links_every_two_relays_and_listed_links_set_their_figures() {
    let text = SEED_FLEET.replace("generation = 3", "generation = 3\nfull_mesh = true");
    let s = parse(&text).unwrap();
    assert_eq!(s.links.len(), 6 * 5 / 2);
    let (ing, cheap) = (at(&s, "ing"), at(&s, "cheap"));
    let l = s
        .links
        .iter()
        .find(|l| (l.a, l.b) == (ing.min(cheap), ing.max(cheap)))
        .unwrap();
    assert_eq!(l.latency_us, 1000);
}

/// An envelope from A to B with constraints, created at 1,000 ms, expiring at 101,000 ms.
fn envelope(c: crate::wire::Constraints, hop_limit: u8) -> Envelope {
    let mut b = EnvelopeBuilder::new(
        MessageId::from_u128(1),
        AgentId([0xa; 32]),
        Destination::Agent(AgentId([0xb; 32])),
        1_000,
        100_000,
    );
    b.constraints = c;
    b.hop_limit = hop_limit;
    b.build(b"proposal").unwrap()
}

fn eu(min_trust: u8) -> crate::wire::Constraints {
    crate::wire::Constraints {
        jurisdictions: vec![Jurisdiction::parse("EU").unwrap()],
        min_trust,
        ..Default::default()
    }
}

#[test]
fn each_hop_checks_forwards_reroutes_or_keeps() {
    let s = parse(SEED_FLEET).unwrap();
    let g = Graph::new(&s);
    let all = AllUp(&s);
    let place = |me: &str| Place {
        graph: &g,
        links: &all,
        me: at(&s, me),
    };
    let mut env = envelope(eu(60), 8);
    // Ingress: the path through the trusted EU relays, written into the routing part.
    let parts = ingress(&place("ing"), at(&s, "egr"), &env).unwrap();
    assert_eq!(parts.len(), 1);
    let ids: Vec<u8> = parts[0].path.chunks(32).map(|c| c[0]).collect();
    assert_eq!(ids, [1, 3, 4, 5], "ing, ams, bru, egr");
    assert_eq!((parts[0].hop_index, parts[0].route_generation), (0, 3));
    // Each hop hands it on, one hop used each time.
    env.routing = parts[0].clone();
    for (me, next) in [("ing", "ams"), ("ams", "bru"), ("bru", "egr")] {
        match transit(&place(me), &env, 5_000).unwrap() {
            Next::Forward { to, routing } => {
                assert_eq!(s.relays[to].name, next);
                assert_eq!(routing.hop_limit, env.routing.hop_limit - 1);
                env.routing = routing;
            }
            other => panic!("{me}: {other:?}"),
        }
    }
    assert_eq!(transit(&place("egr"), &env, 5_000), Ok(Next::Deliver));
    // Not the hop it names; expired; a relay the constraints exclude.
    assert_eq!(
        transit(&place("bru"), &env, 5_000),
        Err(Reason::InvalidRouting)
    );
    assert_eq!(transit(&place("egr"), &env, 101_000), Err(Reason::Expired));
    let mut at_cheap = env.clone();
    at_cheap.routing.path = Bytes::from([[2u8; 32], [5u8; 32]].concat());
    at_cheap.routing.hop_index = 0;
    assert_eq!(
        transit(&place("cheap"), &at_cheap, 5_000),
        Err(Reason::PolicyViolation)
    );

    // The link ams-bru down at ams: with trust 60 no other way, so ams keeps it; with "EU
    // only" alone it goes back through ing and cheap.
    let down = g.link_between(at(&s, "ams"), at(&s, "bru")).unwrap();
    let links = |l: usize| (l != down).then(|| s.links[l].latency_us);
    let at_ams = Place {
        graph: &g,
        links: &links,
        me: at(&s, "ams"),
    };
    let mut strict = envelope(eu(60), 8);
    strict.routing = parts[0].clone();
    strict.routing.hop_index = 1;
    assert_eq!(transit(&at_ams, &strict, 5_000), Ok(Next::Keep));
    let mut loose = envelope(eu(0), 8);
    loose.routing = strict.routing.clone();
    match transit(&at_ams, &loose, 5_000).unwrap() {
        Next::Forward { to, routing } => {
            assert_eq!(s.relays[to].name, "ing");
            let ids: Vec<u8> = routing.path.chunks(32).map(|c| c[0]).collect();
            assert_eq!(ids, [3, 1, 2, 5], "ams, ing, cheap, egr");
            assert_eq!(routing.hop_index, 1);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn ingress_writes_one_routing_part_per_disjoint_copy_and_refuses_what_cannot_go() {
    let s = parse(SEED_FLEET).unwrap();
    let g = Graph::new(&s);
    let all = AllUp(&s);
    let place = Place {
        graph: &g,
        links: &all,
        me: at(&s, "ing"),
    };
    let two = crate::wire::Constraints {
        multipath_k: 2,
        ..Default::default()
    };
    let parts = ingress(&place, at(&s, "egr"), &envelope(two, 8)).unwrap();
    assert_eq!(parts.len(), 2);
    assert_eq!((parts[0].copy_index, parts[1].copy_index), (0, 1));
    let inner = |r: &crate::wire::RoutingPart| -> Vec<u8> {
        let ids: Vec<u8> = r.path.chunks(32).map(|c| c[0]).collect();
        ids[1..ids.len() - 1].to_vec()
    };
    assert!(inner(&parts[0])
        .iter()
        .all(|x| !inner(&parts[1]).contains(x)));
    // Constraints no relay meets; too few hops left.
    let nowhere = crate::wire::Constraints {
        jurisdictions: vec![Jurisdiction::parse("JP").unwrap()],
        ..Default::default()
    };
    assert_eq!(
        ingress(&place, at(&s, "egr"), &envelope(nowhere, 8)),
        Err(Reason::NoCompliantPath)
    );
    assert_eq!(
        ingress(&place, at(&s, "egr"), &envelope(eu(60), 2)),
        Err(Reason::HopLimitExceeded)
    );
}

#[test]
fn the_route_cache_answers_until_the_fleet_changes_and_stays_bounded() {
    use super::cache::RouteCache;
    let s = parse(SEED_FLEET).unwrap();
    let g = Graph::new(&s);
    let all = AllUp(&s);
    let (ing, egr) = (at(&s, "ing"), at(&s, "egr"));
    let mut cache = RouteCache::new(64);
    let c = Constraints {
        jurisdictions: vec![Jurisdiction::parse("EU").unwrap()],
        min_trust: 60,
        ..Constraints::default()
    };
    let first = cache.route(&g, &all, 1, ing, egr, &c);
    let again = cache.route(&g, &all, 1, ing, egr, &c);
    assert!(std::sync::Arc::ptr_eq(&first, &again));
    assert_eq!((cache.hits, cache.misses), (1, 1));
    assert_eq!(*first, g.route(&all, ing, egr, &c));
    // A link state change (another epoch): computed again, with the link down.
    let down = g.link_between(at(&s, "ams"), at(&s, "bru")).unwrap();
    let links = |l: usize| (l != down).then(|| s.links[l].latency_us);
    let r = cache.route(&g, &links, 2, ing, egr, &c);
    assert_eq!(*r, Err(NoPath::NoCompliantPath));
    assert_eq!(cache.misses, 2);
    // A new snapshot generation: computed again too.
    let mut newer = s.clone();
    newer.generation += 1;
    let g2 = Graph::new(&newer);
    cache.route(&g2, &links, 2, ing, egr, &c);
    assert_eq!(cache.misses, 3);
    // Minted constraints cannot grow it past its cap.
    for i in 0..10_000u32 {
        let minted = Constraints {
            min_trust: (i % 100) as u8,
            avoid: vec![RelayId([
                (i >> 8) as u8,
                i as u8,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
            ])],
            ..Constraints::default()
        };
        cache.route(&g2, &links, 2, ing, egr, &minted);
        assert!(cache.len() <= 64);
    }
}

/// A random small fleet: relays with random trust and one of three jurisdictions, random
/// links with random figures.
fn fleet() -> impl Strategy<Value = Snapshot> {
    (3usize..8)
        .prop_flat_map(|n| {
            (
                Just(n),
                proptest::collection::vec((0u8..101, 0usize..3), n),
                proptest::collection::vec(
                    (0usize..n, 0usize..n, 1u32..50, 1u32..5, 1u32..9),
                    0..(n * 3),
                ),
            )
        })
        .prop_map(|(n, relays, links)| {
            let js = ["DE", "FR", "US"];
            let relays: Vec<Relay> = (0..n)
                .map(|i| Relay {
                    id: id(i as u8 + 1),
                    name: format!("r{i}"),
                    agent_addr: format!("127.0.0.1:{}", 7400 + i).parse().unwrap(),
                    link_addr: format!("127.0.0.1:{}", 7500 + i).parse().unwrap(),
                    jurisdiction: Jurisdiction::parse(js[relays[i].1]).unwrap(),
                    trust: relays[i].0,
                    group: String::new(),
                })
                .collect();
            let mut seen = BTreeSet::new();
            let links = links
                .into_iter()
                .filter(|(a, b, ..)| a != b && seen.insert((*a.min(b), *a.max(b))))
                .map(|(a, b, lat, thr, cost)| {
                    (id(a as u8 + 1), id(b as u8 + 1), lat, thr * 100, cost)
                })
                .collect();
            let mut blocs = BTreeMap::new();
            blocs.insert(
                Jurisdiction::parse("EU").unwrap(),
                ["DE", "FR"]
                    .iter()
                    .map(|j| Jurisdiction::parse(j).unwrap())
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
        })
}

fn constraints() -> impl Strategy<Value = Constraints> {
    (
        0u8..80,
        0usize..4,
        proptest::collection::vec(1u8..8, 0..2),
        0u8..3,
        1u8..3,
    )
        .prop_map(|(min_trust, jur, avoid, class, k)| Constraints {
            jurisdictions: match jur {
                0 => vec![],
                1 => vec![Jurisdiction::parse("EU").unwrap()],
                2 => vec![Jurisdiction::parse("DE").unwrap()],
                _ => vec![
                    Jurisdiction::parse("US").unwrap(),
                    Jurisdiction::parse("FR").unwrap(),
                ],
            },
            min_trust,
            avoid: avoid.into_iter().map(id).collect(),
            class: PathClass::from_u8(class).unwrap(),
            multipath: k,
            ..Constraints::default()
        })
}

/// Whether relay `v` meets `c`, written out again (the fleets here have no thresholds and
/// no revocations; `EU` is DE and FR).
fn meets(snap: &Snapshot, c: &Constraints, v: usize) -> bool {
    let r = &snap.relays[v];
    let j = r.jurisdiction.as_str();
    let jur_ok = c.jurisdictions.is_empty()
        || c.jurisdictions
            .iter()
            .any(|a| a.as_str() == j || (a.as_str() == "EU" && (j == "DE" || j == "FR")));
    r.trust >= c.min_trust && jur_ok && !c.avoid.contains(&r.id)
}

/// Every simple path from `s` to `t` through relays that meet `c`, with its weight.
fn all_paths(g: &Graph<'_>, c: &Constraints, s: usize, t: usize) -> Vec<(Vec<usize>, u64)> {
    let snap = g.snap;
    let mut out = Vec::new();
    let mut stack = vec![(vec![s], 0u64)];
    while let Some((p, w)) = stack.pop() {
        let u = *p.last().unwrap();
        if u == t {
            out.push((p, w));
            continue;
        }
        for (li, l) in snap.links.iter().enumerate() {
            let v = if l.a == u {
                l.b
            } else if l.b == u {
                l.a
            } else {
                continue;
            };
            if p.contains(&v) || !meets(snap, c, v) {
                continue;
            }
            let lw = match c.class {
                PathClass::LowLatency => u64::from(snap.links[li].latency_us),
                PathClass::HighThroughput => 10_000_000u64.div_ceil(u64::from(l.throughput_mbps)),
                PathClass::LowCost => u64::from(l.cost),
            };
            let mut q = p.clone();
            q.push(v);
            stack.push((q, w + lw));
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Paths only cross relays the constraints allow, are the cheapest (checked against every
    /// simple path), and multipath copies share no relay and cost the least of any such set.
    #[test]
    fn paths_are_compliant_cheapest_and_disjoint(s in fleet(), c in constraints(), from in 0usize..8, to in 0usize..8) {
        let n = s.relays.len();
        let (from, to) = (from % n, to % n);
        prop_assume!(from != to);
        let g = Graph::new(&s);
        let got = g.route(&AllUp(&s), from, to, &c);
        let ends_ok = meets(&s, &c, from) && meets(&s, &c, to);
        let all = if ends_ok { all_paths(&g, &c, from, to) } else { Vec::new() };
        match got {
            Err(e) => {
                prop_assert!(all.is_empty(), "{e} but {} paths exist", all.len());
            }
            Ok(r) => {
                prop_assert!(!all.is_empty());
                for p in &r.paths {
                    prop_assert_eq!(p[0], from);
                    prop_assert_eq!(*p.last().unwrap(), to);
                    for v in p {
                        prop_assert!(meets(&s, &c, *v), "relay {} not allowed", v);
                    }
                }
                let best = all.iter().map(|(_, w)| *w).min().unwrap();
                if c.multipath <= 1 {
                    prop_assert_eq!(r.weight, best);
                } else {
                    // Pairs of internally disjoint paths.
                    let mut best_pair = None;
                    for (i, (p, w)) in all.iter().enumerate() {
                        for (q, v) in &all[i + 1..] {
                            let inner = |x: &Vec<usize>| x[1..x.len() - 1].to_vec();
                            if inner(p).iter().all(|x| !inner(q).contains(x)) && !(p.len() == 2 && q.len() == 2) {
                                best_pair = Some(best_pair.map_or(w + v, |b: u64| b.min(w + v)));
                            }
                        }
                    }
                    match best_pair {
                        Some(b) => {
                            prop_assert_eq!(r.paths.len(), 2);
                            let inner: Vec<&[usize]> = r.paths.iter().map(|p| &p[1..p.len() - 1]).collect();
                            prop_assert!(inner[0].iter().all(|x| !inner[1].contains(x)));
                            prop_assert_eq!(r.weight, b);
                        }
                        None => {
                            prop_assert_eq!(r.paths.len(), 1);
                            prop_assert_eq!(r.weight, best);
                        }
                    }
                }
            }
        }
    }
}

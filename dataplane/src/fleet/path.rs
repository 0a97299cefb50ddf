//! Paths through the fleet for one envelope.
//!
//! A relay may carry an envelope when it is not revoked, its trust is at least the envelope's
//! `min_trust` and the fleet's threshold for the envelope's delivery class, its jurisdiction is
//! one the envelope allows (blocs expanded), and the envelope does not ask to avoid it. Every
//! relay of a path must qualify, the two ends included (an envelope is kept only where its
//! jurisdiction allows). A link carries it when it is up.
//!
//! Among the qualifying relays, the path is the cheapest for the envelope's path class: the sum
//! of link latencies (low latency), of `10^7 / throughput_mbps` (high throughput: the inverse
//! bandwidth, as link-state routing weighs links), or of link costs (low cost). A link into a
//! relay the envelope prefers counts half. When the class has no path, its fallback classes are
//! tried in order. A path longer than [`MAX_PATH_LEN`] relays is not used.
//!
//! `k` node-disjoint paths (multipath) are the `k` paths of least total weight that share no
//! relay but the ends: a minimum-cost flow of `k` units through the graph with every relay
//! split into an entry and an exit joined by one unit of capacity (Suurballe's construction),
//! found by successive shortest paths with Dijkstra on reduced costs. When fewer than `k`
//! disjoint paths exist, the route has as many as exist; those longer than [`MAX_PATH_LEN`]
//! relays are left out, and when fewer than two remain the route is the one cheapest path
//! within the bound.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::snapshot::Snapshot;
use crate::wire::{DeliveryClass, Envelope, Jurisdiction, PathClass, RelayId, MAX_PATH_LEN};

/// What an envelope asks of its path.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Constraints {
    /// Jurisdictions and blocs allowed (empty: anywhere).
    pub jurisdictions: Vec<Jurisdiction>,
    pub min_trust: u8,
    pub avoid: Vec<RelayId>,
    pub prefer: Vec<RelayId>,
    pub class: PathClass,
    /// Classes to try, in order, when `class` has no path.
    pub fallback: Vec<PathClass>,
    /// Disjoint paths wanted (0 and 1: one).
    pub multipath: u8,
    pub delivery: DeliveryClass,
}

impl Default for Constraints {
    fn default() -> Self {
        Constraints {
            jurisdictions: Vec::new(),
            min_trust: 0,
            avoid: Vec::new(),
            prefer: Vec::new(),
            class: PathClass::LowLatency,
            fallback: Vec::new(),
            multipath: 1,
            delivery: DeliveryClass::AtLeastOnce,
        }
    }
}

impl Constraints {
    /// The constraints an envelope carries.
    pub fn of(env: &Envelope) -> Self {
        Constraints {
            jurisdictions: env.jurisdictions().collect(),
            min_trust: env.min_trust(),
            avoid: env.avoid().collect(),
            prefer: env.prefer().collect(),
            class: env.path_class(),
            fallback: env.fallback().collect(),
            multipath: env.multipath_k(),
            delivery: env.class(),
        }
    }
}

/// Why there is no path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoPath {
    #[error("the ingress relay does not meet the envelope's constraints")]
    Ingress,
    #[error("the destination's relay does not meet the envelope's constraints")]
    Egress,
    #[error("no path of relays that meet the envelope's constraints")]
    NoCompliantPath,
}

/// The paths chosen: relay indices from the ingress relay to the destination's, both included.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The class whose weights chose them (the envelope's, or a fallback).
    pub class: PathClass,
    pub paths: Vec<Vec<usize>>,
    /// Total weight of the paths in that class.
    pub weight: u64,
}

/// What is known of the links now: `None` when link `i` is down, else its one-way latency in
/// microseconds (measured, or the snapshot's).
pub trait LinkState {
    fn latency_us(&self, link: usize) -> Option<u32>;
}

/// Every link up, at the snapshot's latencies.
pub struct AllUp<'a>(pub &'a Snapshot);

impl LinkState for AllUp<'_> {
    fn latency_us(&self, link: usize) -> Option<u32> {
        Some(self.0.links[link].latency_us)
    }
}

impl<F: Fn(usize) -> Option<u32>> LinkState for F {
    fn latency_us(&self, link: usize) -> Option<u32> {
        self(link)
    }
}

/// Per relay of a snapshot: (neighbour, link index). Shared, so that a relay builds it once per
/// snapshot and a [`Graph`] costs nothing to make per envelope.
pub type Adjacency = std::sync::Arc<Vec<Vec<(usize, usize)>>>;

/// A snapshot's adjacency, built once per snapshot.
pub struct Graph<'a> {
    pub snap: &'a Snapshot,
    adj: Adjacency,
}

impl<'a> Graph<'a> {
    pub fn new(snap: &'a Snapshot) -> Self {
        let mut adj = vec![Vec::new(); snap.relays.len()];
        for (i, l) in snap.links.iter().enumerate() {
            adj[l.a].push((l.b, i));
            adj[l.b].push((l.a, i));
        }
        Graph {
            snap,
            adj: std::sync::Arc::new(adj),
        }
    }

    /// A graph of `snap` with the adjacency an earlier [`Graph::new`] of the same snapshot built.
    pub fn with(snap: &'a Snapshot, adj: Adjacency) -> Self {
        Graph { snap, adj }
    }

    /// The adjacency, to make the graph again with [`Graph::with`].
    pub fn adjacency(&self) -> Adjacency {
        self.adj.clone()
    }

    /// The link between relays `a` and `b`, if there is one.
    pub fn link_between(&self, a: usize, b: usize) -> Option<usize> {
        self.adj[a].iter().find(|(v, _)| *v == b).map(|(_, l)| *l)
    }

    /// Whether relay `i` may carry an envelope with constraints `c`.
    pub fn allowed(&self, i: usize, c: &Constraints) -> bool {
        let r = &self.snap.relays[i];
        !self.snap.revoked.contains(&r.id)
            && r.trust >= c.min_trust.max(self.snap.thresholds.of(c.delivery))
            && self.snap.allows(&c.jurisdictions, r.jurisdiction)
            && !c.avoid.contains(&r.id)
    }

    /// [`Graph::allowed`] for every relay, by index.
    fn allowed_all(&self, c: &Constraints) -> Vec<bool> {
        (0..self.snap.relays.len())
            .map(|i| self.allowed(i, c))
            .collect()
    }

    /// Weight of link `link` into relay `to` for `class`; `None` when the link is down.
    fn weight(
        &self,
        links: &dyn LinkState,
        link: usize,
        to: usize,
        class: PathClass,
        prefer: &[RelayId],
    ) -> Option<u64> {
        let latency = links.latency_us(link)?;
        let l = &self.snap.links[link];
        let w = match class {
            PathClass::LowLatency => u64::from(latency),
            PathClass::HighThroughput => {
                10_000_000u64.div_ceil(u64::from(l.throughput_mbps.max(1)))
            }
            PathClass::LowCost => u64::from(l.cost),
        }
        .max(1);
        Some(if prefer.contains(&self.snap.relays[to].id) {
            w.div_ceil(2)
        } else {
            w
        })
    }

    /// The route for an envelope with constraints `c` from relay `from` to relay `to`.
    pub fn route(
        &self,
        links: &dyn LinkState,
        from: usize,
        to: usize,
        c: &Constraints,
    ) -> Result<Route, NoPath> {
        if !self.allowed(from, c) {
            return Err(NoPath::Ingress);
        }
        if !self.allowed(to, c) {
            return Err(NoPath::Egress);
        }
        let k = usize::from(c.multipath.max(1));
        let mut tried = Vec::with_capacity(4);
        for class in std::iter::once(c.class).chain(c.fallback.iter().copied()) {
            if tried.contains(&class) {
                continue;
            }
            tried.push(class);
            if from == to {
                return Ok(Route {
                    class,
                    paths: vec![vec![from]],
                    weight: 0,
                });
            }
            let mut found = Vec::new();
            if k > 1 {
                // Disjoint paths longer than the routing part holds are left out.
                let (paths, _) = self.disjoint(links, from, to, c, class, k);
                found = paths
                    .into_iter()
                    .filter(|p| p.len() <= MAX_PATH_LEN)
                    .filter_map(|p| {
                        let w = self.path_weight(links, &p, class, &c.prefer)?;
                        Some((p, w))
                    })
                    .collect();
            }
            if found.len() < 2 {
                // One path: the cheapest within the bound (never worse than a lone disjoint one).
                found = self
                    .shortest(links, from, to, c, class)
                    .into_iter()
                    .collect();
            }
            if !found.is_empty() {
                return Ok(Route {
                    class,
                    weight: found.iter().map(|(_, w)| w).sum(),
                    paths: found.into_iter().map(|(p, _)| p).collect(),
                });
            }
        }
        Err(NoPath::NoCompliantPath)
    }

    /// The weight of `path` (relay indices) for `class`; `None` if a link of it is down.
    fn path_weight(
        &self,
        links: &dyn LinkState,
        path: &[usize],
        class: PathClass,
        prefer: &[RelayId],
    ) -> Option<u64> {
        let mut total = 0;
        for pair in path.windows(2) {
            let link = self.link_between(pair[0], pair[1])?;
            total += self.weight(links, link, pair[1], class, prefer)?;
        }
        Some(total)
    }

    /// The cheapest path of at most [`MAX_PATH_LEN`] relays (exact: one relaxation round per
    /// hop, so a cheaper path with more relays does not hide it).
    fn shortest(
        &self,
        links: &dyn LinkState,
        from: usize,
        to: usize,
        c: &Constraints,
        class: PathClass,
    ) -> Option<(Vec<usize>, u64)> {
        let n = self.snap.relays.len();
        let allowed = self.allowed_all(c);
        // best[h][v]: least weight reaching v in exactly h hops (via its predecessor).
        let mut best: Vec<Vec<Option<(u64, usize)>>> = vec![vec![None; n]; MAX_PATH_LEN];
        best[0][from] = Some((0, from));
        let mut end: Option<(u64, usize)> = None;
        for h in 1..MAX_PATH_LEN {
            let (done, rest) = best.split_at_mut(h);
            let (prev, cur) = (&done[h - 1], &mut rest[0]);
            for (u, p) in prev.iter().enumerate() {
                let Some((d, _)) = *p else { continue };
                if u == to {
                    continue;
                }
                for &(v, link) in &self.adj[u] {
                    if !allowed[v] || v == from {
                        continue;
                    }
                    let Some(w) = self.weight(links, link, v, class, &c.prefer) else {
                        continue;
                    };
                    if cur[v].is_none_or(|(bd, _)| d + w < bd) {
                        cur[v] = Some((d + w, u));
                    }
                }
            }
            if let Some((d, _)) = cur[to] {
                if end.is_none_or(|(bd, _)| d < bd) {
                    end = Some((d, h));
                }
            }
        }
        let (weight, hops) = end?;
        let mut path = vec![to];
        let mut v = to;
        for h in (1..=hops).rev() {
            v = best[h][v].expect("on the path").1;
            path.push(v);
        }
        path.reverse();
        // A walk that repeats a relay is never cheaper than the path without the loop
        // (weights are positive), so the cheapest walk is a simple path.
        Some((path, weight))
    }

    /// Up to `k` node-disjoint paths of least total weight (see the module's text).
    fn disjoint(
        &self,
        links: &dyn LinkState,
        from: usize,
        to: usize,
        c: &Constraints,
        class: PathClass,
        k: usize,
    ) -> (Vec<Vec<usize>>, u64) {
        let n = self.snap.relays.len();
        let allowed = self.allowed_all(c);
        // Relay v: entry 2v, exit 2v+1. The ends carry k units, every other relay one.
        let mut f = Flow::new(2 * n);
        for (v, ok) in allowed.iter().enumerate() {
            if *ok {
                let cap = if v == from || v == to { k as u8 } else { 1 };
                f.edge(2 * v, 2 * v + 1, cap, 0);
            }
        }
        for (u, adj) in self.adj.iter().enumerate() {
            if !allowed[u] || u == to {
                continue;
            }
            for &(v, link) in adj {
                if !allowed[v] || v == from {
                    continue;
                }
                if let Some(w) = self.weight(links, link, v, class, &c.prefer) {
                    f.edge(2 * u + 1, 2 * v, 1, w as i64);
                }
            }
        }
        let weight = f.run(2 * from + 1, 2 * to, k);
        let paths = f.paths(2 * from + 1, 2 * to).into_iter().map(|p| {
            // Node ids back to relays: every entry node (even) is a relay on the path.
            std::iter::once(from)
                .chain(p.into_iter().filter(|x| x % 2 == 0).map(|x| x / 2))
                .collect()
        });
        (paths.collect(), weight)
    }

    /// Shortest distances from `from` to every relay for `class`, under constraints `c`, with
    /// no bound on the number of relays (a relay's table, for overviews and the control
    /// process): `(weight, previous relay on the path)` per reachable relay.
    pub fn table(
        &self,
        links: &dyn LinkState,
        from: usize,
        c: &Constraints,
        class: PathClass,
    ) -> Vec<Option<(u64, usize)>> {
        let n = self.snap.relays.len();
        let mut best: Vec<Option<(u64, usize)>> = vec![None; n];
        if !self.allowed(from, c) {
            return best;
        }
        let allowed = self.allowed_all(c);
        let mut heap = BinaryHeap::new();
        best[from] = Some((0, from));
        heap.push(Reverse((0u64, from)));
        while let Some(Reverse((d, u))) = heap.pop() {
            if best[u].is_some_and(|(bd, _)| bd < d) {
                continue;
            }
            for &(v, link) in &self.adj[u] {
                if !allowed[v] {
                    continue;
                }
                let Some(w) = self.weight(links, link, v, class, &c.prefer) else {
                    continue;
                };
                let nd = d + w;
                if best[v].is_none_or(|(bd, _)| nd < bd) {
                    best[v] = Some((nd, u));
                    heap.push(Reverse((nd, v)));
                }
            }
        }
        best
    }
}

/// A unit-capacity minimum-cost flow (capacities are tiny: at most `MAX_MULTIPATH`).
struct Flow {
    adj: Vec<Vec<usize>>,
    edges: Vec<FlowEdge>,
}

struct FlowEdge {
    to: usize,
    cap: u8,
    cost: i64,
    /// Capacity given at creation (0 for residual twins).
    orig: u8,
}

impl Flow {
    fn new(n: usize) -> Self {
        Flow {
            adj: vec![Vec::new(); n],
            edges: Vec::new(),
        }
    }

    fn edge(&mut self, u: usize, v: usize, cap: u8, cost: i64) {
        self.adj[u].push(self.edges.len());
        self.edges.push(FlowEdge {
            to: v,
            cap,
            cost,
            orig: cap,
        });
        self.adj[v].push(self.edges.len());
        self.edges.push(FlowEdge {
            to: u,
            cap: 0,
            cost: -cost,
            orig: 0,
        });
    }

    /// Pushes up to `k` units from `s` to `t` along successive shortest paths; returns the
    /// total cost.
    fn run(&mut self, s: usize, t: usize, k: usize) -> u64 {
        let n = self.adj.len();
        let mut pot = vec![0i64; n];
        let mut total = 0i64;
        for _ in 0..k {
            let mut dist = vec![i64::MAX; n];
            let mut via = vec![usize::MAX; n];
            dist[s] = 0;
            let mut heap = BinaryHeap::new();
            heap.push(Reverse((0i64, s)));
            while let Some(Reverse((d, u))) = heap.pop() {
                if d > dist[u] {
                    continue;
                }
                for &e in &self.adj[u] {
                    let edge = &self.edges[e];
                    if edge.cap == 0 || pot[edge.to] == i64::MAX {
                        continue;
                    }
                    // Reduced costs are non-negative: Dijkstra holds on the residual graph.
                    let nd = d + edge.cost + pot[u] - pot[edge.to];
                    if nd < dist[edge.to] {
                        dist[edge.to] = nd;
                        via[edge.to] = e;
                        heap.push(Reverse((nd, edge.to)));
                    }
                }
            }
            if dist[t] == i64::MAX {
                break;
            }
            for v in 0..n {
                pot[v] = if dist[v] == i64::MAX || pot[v] == i64::MAX {
                    i64::MAX
                } else {
                    pot[v] + dist[v]
                };
            }
            let mut v = t;
            while v != s {
                let e = via[v];
                self.edges[e].cap -= 1;
                self.edges[e ^ 1].cap += 1;
                total += self.edges[e].cost;
                v = self.edges[e ^ 1].to;
            }
        }
        total.max(0) as u64
    }

    /// The paths the flow takes from `s` to `t` (node ids after `s`, `t` included).
    fn paths(&mut self, s: usize, t: usize) -> Vec<Vec<usize>> {
        let mut out = Vec::new();
        loop {
            let mut path = Vec::new();
            let mut u = s;
            while u != t {
                let next = self.adj[u].iter().copied().find(|&e| {
                    let edge = &self.edges[e];
                    edge.orig > 0 && edge.cap < edge.orig
                });
                let Some(e) = next else {
                    return out;
                };
                // Take this unit off so the next walk follows another one.
                self.edges[e].cap += 1;
                u = self.edges[e].to;
                path.push(u);
            }
            out.push(path);
        }
    }
}

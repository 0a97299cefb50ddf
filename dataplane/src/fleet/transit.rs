//! What a relay of the fleet does with an envelope (`docs/FLEET.md`, forwarding). Pure.
//!
//! At **ingress** the relay chooses the paths (one per copy for multipath) and writes each into
//! a routing part: the relay ids from itself to the destination's relay, `hop_index` 0, the
//! copy's index and the snapshot's generation. In **transit** a relay checks that it is the hop
//! the routing part names, that the envelope has not expired, that it may carry it (its own
//! jurisdiction, trust and revocation against the envelope's constraints and the fleet's
//! thresholds) and that a hop is left; then it delivers (it is the last relay), forwards to the
//! next relay named, or, when that relay no longer qualifies or its link is down, re-routes from
//! itself within the same constraints (a new path, the rest of the old one dropped), or keeps the
//! envelope until a compliant path exists (it qualified itself, so the envelope may wait here).

use bytes::{BufMut, Bytes, BytesMut};

use super::path::{Constraints, Graph, LinkState, NoPath};
use crate::wire::{Envelope, Reason, RelayId, RoutingPart};

/// A relay's place in the fleet: the snapshot's graph, the links as they are now, and itself.
pub struct Place<'a> {
    pub graph: &'a Graph<'a>,
    pub links: &'a dyn LinkState,
    /// This relay's index in the snapshot.
    pub me: usize,
}

/// What to do with an envelope in transit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// This relay is the last of the path: deliver to the destination agent here.
    Deliver,
    /// Send to relay `to` with this routing part.
    Forward { to: usize, routing: RoutingPart },
    /// No compliant path now: keep it here until one exists.
    Keep,
}

fn path_bytes(graph: &Graph<'_>, path: &[usize]) -> Bytes {
    let mut b = BytesMut::with_capacity(32 * path.len());
    for i in path {
        b.put_slice(&graph.snap.relays[*i].id.0);
    }
    b.freeze()
}

/// Relay `i` of the routing part's path.
fn hop(routing: &RoutingPart, i: usize) -> Option<RelayId> {
    let c = routing.path.get(32 * i..32 * (i + 1))?;
    let mut id = [0u8; 32];
    id.copy_from_slice(c);
    Some(RelayId(id))
}

/// The routing parts for an envelope entering the fleet here, bound for the relay `egress`:
/// one per copy. `no_compliant_path` when no path meets its constraints,
/// `hop_limit_exceeded` when every path needs more hops than it has left.
pub fn ingress(p: &Place<'_>, egress: usize, env: &Envelope) -> Result<Vec<RoutingPart>, Reason> {
    let c = Constraints::of(env);
    let route = p
        .graph
        .route(p.links, p.me, egress, &c)
        .map_err(|_: NoPath| Reason::NoCompliantPath)?;
    parts(p.graph, &route, env)
}

/// The routing parts for an envelope entering the fleet on `route` (from [`Graph::route`] for
/// its constraints, or a cache of those): one per path within its hop limit.
pub fn parts(
    graph: &Graph<'_>,
    route: &super::path::Route,
    env: &Envelope,
) -> Result<Vec<RoutingPart>, Reason> {
    let hops = usize::from(env.routing.hop_limit);
    let parts: Vec<RoutingPart> = route
        .paths
        .iter()
        .filter(|path| path.len() - 1 <= hops)
        .enumerate()
        .map(|(copy, path)| RoutingPart {
            hop_limit: env.routing.hop_limit,
            hop_index: 0,
            copy_index: copy as u8,
            route_generation: graph.snap.generation as u32,
            path: path_bytes(graph, path),
        })
        .collect();
    if parts.is_empty() {
        return Err(Reason::HopLimitExceeded);
    }
    Ok(parts)
}

/// What this relay does with an envelope another relay sent it, at `now_ms`.
pub fn transit(p: &Place<'_>, env: &Envelope, now_ms: u64) -> Result<Next, Reason> {
    let snap = p.graph.snap;
    let hops = env.routing.path.len() / 32;
    let at = usize::from(env.routing.hop_index);
    if hop(&env.routing, at) != Some(snap.relays[p.me].id) {
        return Err(Reason::InvalidRouting);
    }
    if env.expires_ms() <= now_ms {
        return Err(Reason::Expired);
    }
    let c = Constraints::of(env);
    if !p.graph.allowed(p.me, &c) {
        return Err(Reason::PolicyViolation);
    }
    if at + 1 == hops {
        return Ok(Next::Deliver);
    }
    if env.routing.hop_limit == 0 {
        return Err(Reason::HopLimitExceeded);
    }
    let next = hop(&env.routing, at + 1).and_then(|id| snap.index(&id));
    if let Some(n) = next {
        let up = p
            .graph
            .link_between(p.me, n)
            .is_some_and(|l| p.links.latency_us(l).is_some());
        if up && p.graph.allowed(n, &c) {
            return Ok(Next::Forward {
                to: n,
                routing: RoutingPart {
                    hop_limit: env.routing.hop_limit - 1,
                    hop_index: env.routing.hop_index + 1,
                    ..env.routing.clone()
                },
            });
        }
    }
    // The next relay is gone, down or no longer qualifies: a new path from here to the last
    // relay named (one path: a re-routed copy keeps to the constraints, not to disjointness).
    let Some(egress) = hop(&env.routing, hops - 1).and_then(|id| snap.index(&id)) else {
        return Ok(Next::Keep);
    };
    let single = Constraints { multipath: 1, ..c };
    match p.graph.route(p.links, p.me, egress, &single) {
        Ok(r) if r.paths[0].len() - 1 <= usize::from(env.routing.hop_limit) => {
            let path = &r.paths[0];
            Ok(Next::Forward {
                to: path[1],
                routing: RoutingPart {
                    hop_limit: env.routing.hop_limit - 1,
                    hop_index: 1,
                    copy_index: env.routing.copy_index,
                    route_generation: snap.generation as u32,
                    path: path_bytes(p.graph, path),
                },
            })
        }
        _ => Ok(Next::Keep),
    }
}

//! The relay fleet as data, and the paths through it. Pure: no I/O, no clock.
//!
//! - [`snapshot`]: the route snapshot, a plain versioned value (relays with their jurisdiction,
//!   trust and operator group; links with latency, throughput and cost; blocs; trust thresholds
//!   per delivery class; revocations), validated when it is built. A relay loads it from a fleet
//!   file; the control process will compute and push the same value.
//! - [`file`](mod@file): the fleet file (TOML, `docs/FLEET.md`) to a snapshot, refusing a bad file with
//!   the first reason.
//! - [`path`]: which relays an envelope may cross (its own constraints, the fleet's thresholds
//!   and revocations, links that are down) and the cheapest path for its path class, with its
//!   fallback classes in order; `k` node-disjoint paths for multipath envelopes.
//! - [`cache`]: routes remembered per destination relay and constraints, for one state of the
//!   fleet, bounded.
//! - [`transit`]: what a relay does with an envelope: the routing parts at ingress; in transit
//!   the checks, then deliver, forward, re-route or keep.

pub mod cache;
pub mod file;
pub mod path;
pub mod snapshot;
pub mod transit;

#[cfg(test)]
mod tests;

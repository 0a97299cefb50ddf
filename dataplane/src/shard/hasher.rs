//! The hasher of the shard's maps. Their keys come from peers (agent ids, message ids), so each
//! map is seeded at random; a process that replays schedules (the simulated relay) asks for
//! fixed seeds with [`use_fixed_seeds`], so that a seed replays the same iteration orders.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, Ordering};

use foldhash::fast::{FoldHasher, SeedableRandomState};

static FIXED: AtomicBool = AtomicBool::new(false);

/// Makes every map created from now on in this process use a fixed seed. For tests that
/// replay schedules; a relay never calls it (fixed seeds let peers choose colliding keys).
pub fn use_fixed_seeds() {
    FIXED.store(true, Ordering::Relaxed);
}

/// A map's hasher state: random per map unless [`use_fixed_seeds`] was called.
#[derive(Clone, Debug)]
pub struct MapHasher(SeedableRandomState);

impl Default for MapHasher {
    fn default() -> Self {
        MapHasher(if FIXED.load(Ordering::Relaxed) {
            SeedableRandomState::fixed()
        } else {
            SeedableRandomState::random()
        })
    }
}

impl BuildHasher for MapHasher {
    type Hasher = FoldHasher<'static>;

    fn build_hasher(&self) -> FoldHasher<'static> {
        self.0.build_hasher()
    }
}

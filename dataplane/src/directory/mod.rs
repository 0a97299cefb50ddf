//! The key and capability directory (PROTOCOL.md §6).
//!
//! - [`bundle`]: the signed key bundle an agent publishes: its end-to-end public keys and its
//!   capability descriptor, verified against the agent id it names;
//! - [`AgentDirectory`]: the relay's in-memory directory, shared by its cores: one bundle per
//!   agent, an index by schema, bounded in bytes and in age.

pub mod bundle;

use std::collections::{BTreeSet, HashMap};
use std::sync::RwLock;

use bytes::Bytes;

pub use bundle::{
    aeads, key_id, BundleError, BundleKey, BundleParts, Capability, KeyBundle, MAX_BUNDLE,
};

use crate::wire::{AgentId, Reason};

/// Bytes an entry is charged beyond its bundle (maps, index entries).
const ENTRY_OVERHEAD: usize = 256;

/// Most bundles one lookup by capability returns.
pub const MAX_LOOKUP: usize = 64;

struct Entry {
    bundle: Bytes,
    schemas: Vec<String>,
    expires_ms: u64,
    charged: usize,
}

#[derive(Default)]
struct Inner {
    by_agent: HashMap<AgentId, Entry>,
    by_schema: HashMap<String, BTreeSet<AgentId>>,
    /// Entries by expiry, so a sweep touches only what expired.
    by_expiry: BTreeSet<(u64, AgentId)>,
    bytes: usize,
}

impl Inner {
    fn remove(&mut self, agent: &AgentId) {
        if let Some(e) = self.by_agent.remove(agent) {
            self.by_expiry.remove(&(e.expires_ms, *agent));
            self.bytes -= e.charged;
            for s in &e.schemas {
                if let Some(set) = self.by_schema.get_mut(s) {
                    set.remove(agent);
                    if set.is_empty() {
                        self.by_schema.remove(s);
                    }
                }
            }
        }
    }
}

/// The relay's directory. Written by PUBLISH (rare, rate-limited per session), read by LOOKUP;
/// one lock for all cores, never taken on the envelope path.
pub struct AgentDirectory {
    inner: RwLock<Inner>,
    max_bytes: usize,
    max_age_ms: u64,
}

impl std::fmt::Debug for AgentDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentDirectory")
            .field("max_bytes", &self.max_bytes)
            .finish_non_exhaustive()
    }
}

impl AgentDirectory {
    /// A directory that holds at most `max_bytes` (bundles plus a fixed overhead each) and keeps
    /// an entry at most `max_age_s` after it was published, even if its bundle says longer.
    pub fn new(max_bytes: usize, max_age_s: u64) -> Self {
        AgentDirectory {
            inner: RwLock::new(Inner::default()),
            max_bytes,
            max_age_ms: max_age_s.saturating_mul(1000),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes `bytes` for the session's authenticated agent `publisher`: the bundle must
    /// decode, verify, name `publisher` and not have expired. It replaces the agent's previous
    /// entry. At the byte bound, expired entries are dropped first; if that is not enough the
    /// bundle is refused (`directory_full`) and every entry stays (the agent's previous one
    /// too). The bundle is copied out of the frame it came in, so it pins no read buffer.
    pub fn publish(&self, publisher: AgentId, bytes: Bytes, now_ms: u64) -> Result<(), Reason> {
        let bundle = KeyBundle::decode(bytes).map_err(|e| match e {
            BundleError::BadSignature => Reason::BadSignature,
            _ => Reason::InvalidBundle,
        })?;
        if bundle.agent != publisher {
            return Err(Reason::InvalidBundle);
        }
        if bundle.expires_ms <= now_ms {
            return Err(Reason::Expired);
        }
        let charged = bundle.bytes().len()
            + ENTRY_OVERHEAD
            + bundle
                .capability
                .schemas
                .iter()
                .map(|s| 2 * s.len() + 64)
                .sum::<usize>();
        let mut inner = self.write();
        let fits = |inner: &Inner| {
            let replaced = inner.by_agent.get(&publisher).map_or(0, |e| e.charged);
            inner.bytes - replaced + charged <= self.max_bytes
        };
        if !fits(&inner) {
            sweep(&mut inner, now_ms);
        }
        if !fits(&inner) {
            return Err(Reason::DirectoryFull);
        }
        inner.remove(&publisher);
        let expires_ms = bundle
            .expires_ms
            .min(now_ms.saturating_add(self.max_age_ms));
        for s in &bundle.capability.schemas {
            inner
                .by_schema
                .entry(s.clone())
                .or_default()
                .insert(publisher);
        }
        inner.bytes += charged;
        inner.by_expiry.insert((expires_ms, publisher));
        inner.by_agent.insert(
            publisher,
            Entry {
                bundle: bundle.bytes().clone(),
                schemas: bundle.capability.schemas,
                expires_ms,
                charged,
            },
        );
        Ok(())
    }

    /// The bundle `agent` published, if it has not expired.
    pub fn by_agent(&self, agent: &AgentId, now_ms: u64) -> Option<Bytes> {
        let inner = self.read();
        inner
            .by_agent
            .get(agent)
            .filter(|e| e.expires_ms > now_ms)
            .map(|e| e.bundle.clone())
    }

    /// Bundles of the agents whose descriptor lists `schema`, in agent id order after `after`:
    /// at most `limit` (and [`MAX_LOOKUP`]) of them, and no more than `max_bytes` together.
    /// The flag says whether more match.
    pub fn by_schema(
        &self,
        schema: &str,
        after: &AgentId,
        limit: usize,
        max_bytes: usize,
        now_ms: u64,
    ) -> (Vec<Bytes>, bool) {
        let inner = self.read();
        let Some(set) = inner.by_schema.get(schema) else {
            return (Vec::new(), false);
        };
        let limit = limit.clamp(1, MAX_LOOKUP);
        let (mut out, mut bytes) = (Vec::new(), 0usize);
        let start = (
            std::ops::Bound::Excluded(*after),
            std::ops::Bound::Unbounded,
        );
        for id in set.range(start) {
            let Some(e) = inner.by_agent.get(id).filter(|e| e.expires_ms > now_ms) else {
                continue;
            };
            if out.len() == limit || bytes + e.bundle.len() + 2 > max_bytes {
                return (out, true);
            }
            bytes += e.bundle.len() + 2;
            out.push(e.bundle.clone());
        }
        (out, false)
    }

    /// Drops expired entries.
    pub fn sweep(&self, now_ms: u64) {
        sweep(&mut self.write(), now_ms);
    }

    /// Entries held and the bytes they are charged.
    pub fn usage(&self) -> (usize, usize) {
        let inner = self.read();
        (inner.by_agent.len(), inner.bytes)
    }
}

fn sweep(inner: &mut Inner, now_ms: u64) {
    while let Some(&(exp, a)) = inner.by_expiry.first() {
        if exp > now_ms {
            break;
        }
        inner.remove(&a);
    }
}

#[cfg(test)]
mod tests;

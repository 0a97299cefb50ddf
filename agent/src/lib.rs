#![warn(missing_docs)]
//! `openmesh-agent`: the library agents use to talk through OpenMesh relays.
//!
//! An [`Agent`] connects to a relay over mutual TLS 1.3 with its Ed25519 identity, agrees on a
//! session contract (HELLO / WELCOME), and then:
//!
//! - **sends** envelopes and returns a [`SendHandle`] per envelope (or a [`BatchHandle`] per
//!   [`Batch`]) that resolves to the relay's answer: accepted, refused with a reason, or expired;
//!   a receipt when one was asked for. Sending waits while the session's window (or the
//!   destination's) is full; retryable refusals (`queue_full`, `rate_limited`, ...) are sent
//!   again with backoff until the envelope's TTL runs out;
//! - **receives** envelopes as a stream ([`Agent::recv`]) and ACKs them explicitly
//!   ([`Agent::ack`]), after a handler returns ([`Agent::serve`]), or as soon as they are read
//!   ([`ClientConfig::auto_ack`]). A send-only agent never needs to read anything: answers go to
//!   the handles, and the relay's PINGs are answered by the library;
//! - **reconnects** when the relay goes away (its own failure, a drain, a dead link), through
//!   [`ClientConfig::fallback`] with backoff, and sends again whatever was not yet answered;
//! - **closes** cleanly: [`Agent::close`] waits for outstanding answers, writes every queued
//!   ACK, sends CLOSE, waits for the relay's, and reports what stayed unanswered;
//! - **encrypts end to end** ([`e2e`], on by default): it publishes its signed key bundle and
//!   capability descriptor in the relay's directory, [`Agent::seal`]s payloads to a recipient
//!   (X-Wing hybrid KEM, HPKE key schedule, AES-256-GCM or ChaCha20-Poly1305 over payload and
//!   header) and [`Agent::open`]s what it receives (signature, AEAD, replay, key checks, each
//!   rejection typed and counted); [`Agent::lookup`] and [`Agent::lookup_schema`] find other
//!   agents' bundles by id or by the schemas they speak.
//!
//! It runs on tokio and rustls with the protocol code of `openmesh-dataplane`, without the
//! relay engine (no io_uring): it builds wherever tokio and rustls do. rustls runs the TLS 1.3
//! handshake; the records after it are sealed and opened by the relay's own record layer, in
//! the library's buffers. The rustls crypto
//! provider (aws-lc-rs) is passed explicitly, so the process default is never read or set and
//! an application that also uses rustls with another provider is not disturbed.
//!
//! ```no_run
//! # async fn demo(cfg: openmesh_agent::ClientConfig, bob: openmesh_dataplane::wire::AgentId) -> Result<(), openmesh_agent::ClientError> {
//! use openmesh_agent::{Agent, Outcome};
//!
//! let mut agent = Agent::connect(cfg).await?;
//! let env = agent.envelope_to(bob).build(b"hello").expect("small envelope");
//! let mut handle = agent.send(&env).await?;
//! assert_eq!(handle.outcome().await, Outcome::Accepted);
//! while let Some(env) = agent.recv().await {
//!     println!("{} bytes from {}", env.payload().len(), env.source());
//!     agent.ack(&env).await?;
//! }
//! # Ok(()) }
//! ```
//!
//! [`session::Session`] is the layer below: one connection, raw frames and every answer as an
//! event, for protocol tests and tools.

mod agent;
mod config;
pub mod e2e;
mod link;
mod pending;
pub mod session;
mod template;

pub use agent::{
    Agent, BatchHandle, BatchOutcome, CloseReport, Delivery, Outcome, SendHandle, Stats,
    DEFAULT_TTL, MAX_AWAITED_RECEIPTS, MAX_QUEUED, MAX_QUEUED_BYTES,
};
pub use config::{ClientConfig, ClientError};
pub use e2e::{E2e, E2eConfig, E2eError, E2eStats, Opened};
pub use template::{Batch, EnvelopeTemplate, MessageIdRange};

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

pub(crate) type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// The hasher of the maps behind [`pending::SeqTable`]'s ring: consecutive ids (a random prefix
/// and a counter) land in neighbouring buckets, so entries sent together sit together in memory
/// instead of one cache line each at random. Only keys the agent sent are inserted; ids named
/// by the relay are only looked up. Ids chosen to collide (an application re-sending envelopes
/// someone else numbered) cost longer probes, within the window's bound.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SeqIds;

impl std::hash::BuildHasher for SeqIds {
    type Hasher = SeqIdHasher;
    fn build_hasher(&self) -> SeqIdHasher {
        SeqIdHasher(0)
    }
}

/// Bucket bits from the id's low 64 bits (its counter) plus its prefix; the top 7 bits, which
/// the table compares before any key, mixed from the whole id.
#[derive(Debug)]
pub(crate) struct SeqIdHasher(u64);

const TAG_BITS: u64 = 0x7f << 57;
const MIX: u64 = 0x9e37_79b9_7f4a_7c15;

impl std::hash::Hasher for SeqIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(MIX);
        }
    }

    fn write_u64(&mut self, v: u64) {
        let tag = v.wrapping_mul(MIX) & TAG_BITS;
        self.0 = (v & !TAG_BITS) | tag;
    }

    fn write_u128(&mut self, v: u128) {
        // `MessageId` hashes its bytes (big-endian on the wire) as one native u128.
        let v = u128::from_be(v);
        let (lo, hi) = (v as u64, (v >> 64) as u64);
        let tag = (lo ^ hi.rotate_left(32)).wrapping_mul(MIX) & TAG_BITS;
        self.0 = (lo.wrapping_add(hi) & !TAG_BITS) | tag;
    }
}

use openmesh_dataplane::tls::TlsConfigError;

pub(crate) fn random_u64() -> Result<u64, ClientError> {
    let mut b = [0u8; 8];
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut b)
        .map_err(|_| {
            ClientError::Tls(TlsConfigError::Rustls(
                rustls::Error::FailedToGetRandomBytes,
            ))
        })?;
    Ok(u64::from_be_bytes(b))
}

/// Wall-clock milliseconds since the Unix epoch (the clock of envelope timestamps and TTLs).
///
/// ```
/// assert!(openmesh_agent::unix_ms() > 1_700_000_000_000);
/// ```
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher;

    use openmesh_dataplane::wire::MessageId;

    use super::*;

    #[test]
    fn consecutive_ids_take_neighbouring_buckets_with_mixed_tags() {
        let prefix = 0x1234_5678_9abc_def0u128 << 64;
        let h = |n: u128| SeqIds.hash_one(MessageId::from_u128(prefix | n));
        let mut tags = std::collections::HashSet::new();
        for n in 1..1025u128 {
            assert_eq!(
                (h(n + 1) & !TAG_BITS).wrapping_sub(h(n) & !TAG_BITS),
                1,
                "id {n}"
            );
            tags.insert(h(n) >> 57);
        }
        // 128 tags possible; consecutive ids spread over nearly all of them.
        assert!(tags.len() >= 100, "{} distinct tags", tags.len());
        // Another agent's ids (another prefix) start elsewhere.
        let other = SeqIds.hash_one(MessageId::from_u128((7u128 << 64) | 1));
        assert_ne!(other & !TAG_BITS, h(1) & !TAG_BITS);
        let mut m: HashMap<MessageId, u32, SeqIds> = HashMap::default();
        for n in 0..10_000u32 {
            m.insert(MessageId::from_u128(prefix | n as u128), n);
        }
        assert!(
            (0..10_000u32).all(|n| m.get(&MessageId::from_u128(prefix | n as u128)) == Some(&n))
        );
    }
}

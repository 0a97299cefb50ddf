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
//! relay engine (no io_uring): it builds wherever tokio and rustls do. The rustls crypto
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
pub mod session;
mod template;

pub use agent::{
    Agent, BatchHandle, BatchOutcome, CloseReport, Delivery, Outcome, SendHandle, Stats,
    DEFAULT_TTL, MAX_AWAITED_RECEIPTS, MAX_QUEUED, MAX_QUEUED_BYTES,
};
pub use config::{ClientConfig, ClientError};
pub use e2e::{E2e, E2eConfig, E2eError, E2eStats, Opened};
pub use template::{Batch, EnvelopeTemplate};

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

pub(crate) type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

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

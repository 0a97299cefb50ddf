//! OpenMesh relay dataplane.
//!
//! The pure layers take bytes and a `now` and return decisions; they open no socket, spawn no
//! task and read no clock:
//!
//! - [`wire`]: link frames and envelopes, byte for byte as `docs/PROTOCOL.md` says;
//! - [`signaling`]: HELLO meets the relay's policy and yields the session contract (WELCOME);
//! - [`session`]: the session state machine (handshake, heartbeats, drain, close);
//! - [`policy`]: agent admission, per-envelope ingress checks, token buckets;
//! - [`directory`]: agents' signed key bundles and capability descriptors, and the relay's
//!   directory of them;
//! - [`routing`]: which core (and later which relay) an envelope goes to;
//! - [`shard`]: one core's relay as a state machine (connections, sessions, custody,
//!   forwarding), driven by events and `now`, answering with actions;
//! - [`store`]: the durable store's record format, per-core append log and recovery;
//! - [`tls`]: TLS configurations, and the record layer the shard runs after the handshake.
//!
//! The I/O shell:
//!
//! - `engine` (feature `engine`, on by default): the thread-per-core io_uring engine (threads,
//!   ring, sockets, tasks, clock). Agents (`openmesh-agent`) build without it.
//! - [`pki`]: identities, the development CA, certificates;
//! - [`metrics`]: every metric name and description;
//! - [`testing`]: a relay in memory for tests and benchmarks that drive shards directly.

pub mod directory;
#[cfg(feature = "engine")]
pub mod engine;
pub mod fleet;
pub mod metrics;
pub mod pki;
pub mod policy;
pub mod routing;
pub mod session;
pub mod shard;
pub mod signaling;
pub mod store;
pub mod testing;
pub mod tls;
pub mod wire;

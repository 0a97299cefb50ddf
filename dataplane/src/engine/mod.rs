//! The relay engine: one pinned thread per core, each running its own io_uring runtime, its own
//! SO_REUSEPORT listener, its own connections, queues and directory copy.
//!
//! How an envelope flows (see `docs/ARCHITECTURE.md`):
//!
//! ```text
//! socket --read--> TLS (rustls) --plaintext--> FrameDecoder --Envelope--> policy::check_ingress
//!   --> routing::Directory::route --Local--> destination connection's send queue --writer--> socket
//!                                 --Core(k)--> outbox --mailbox k--> core k --> send queue ...
//!                                 <-- Verdict (ACK or NACK for the source) --
//! ```
//!
//! Every agent's session has exactly one owning core (the one that accepted it). Cores exchange
//! only messages ([`mailbox::CoreMsg`]); nothing on the per-envelope path takes a lock.

mod conn;
mod core;
mod inflight;
pub mod mailbox;
pub mod uring;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::policy::Admission;
use crate::session::SessionTimeouts;
use crate::signaling::ContractPolicy;
use crate::wire::RelayId;
use mailbox::{CoreMsg, Mailbox};

/// Errors starting the engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The agent listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    /// A core thread could not be started.
    #[error("cannot start core thread: {0}")]
    Thread(io::Error),
}

/// Bounds on what one core holds. Also the relay's `[limits]` configuration section.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Connections one core serves at once; more are closed right after accept.
    pub max_connections_per_core: usize,
    /// Envelopes queued towards one agent before at-least-once envelopes are refused.
    pub send_queue_envelopes: usize,
    /// Bytes queued towards one agent before at-least-once envelopes are refused.
    pub send_queue_bytes: usize,
    /// Messages one core's mailbox holds.
    pub mailbox_capacity: usize,
    /// Unacknowledged envelopes held for one disconnected agent, for redelivery on reconnect.
    pub custody_per_agent: usize,
    /// Largest read buffer of one connection: it starts at 4 KiB and doubles whenever a read
    /// fills it, so idle agents stay cheap.
    pub read_buffer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections_per_core: 100_000,
            send_queue_envelopes: 8192,
            send_queue_bytes: 16 << 20,
            mailbox_capacity: 65_536,
            custody_per_agent: 65_536,
            read_buffer: 64 << 10,
        }
    }
}

/// What can change while the relay runs ([`Engine::reconfigure`], on SIGHUP): the contract offered
/// to new sessions, timeouts, admission lists (applied to established sessions too) and limits
/// (`mailbox_capacity` only takes effect on restart).
#[derive(Clone, Debug)]
pub struct Settings {
    pub contract: ContractPolicy,
    pub timeouts: SessionTimeouts,
    pub admission: Admission,
    pub limits: Limits,
}

/// Everything the engine needs to run.
#[derive(Clone)]
pub struct EngineConfig {
    pub listen: SocketAddr,
    pub cores: usize,
    /// Pin core `i` to CPU `i mod n`.
    pub pin: bool,
    pub tls: Arc<rustls::ServerConfig>,
    pub relay_id: RelayId,
    /// Period of each core's timer sweep (heartbeats, deadlines, drain), milliseconds.
    pub tick_ms: u64,
    pub settings: Settings,
}

/// State shared by all cores: their mailboxes and a few relay-wide counters.
pub(crate) struct Shared {
    pub(crate) mailboxes: Vec<Mailbox>,
    pub(crate) attach_seq: AtomicU64,
    pub(crate) session_seq: AtomicU64,
    pub(crate) drained: AtomicUsize,
    pub(crate) draining: AtomicBool,
}

/// A running engine.
pub struct Engine {
    threads: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
    local_addr: SocketAddr,
}

impl Engine {
    /// Binds one listener per core and starts the core threads.
    pub fn start(cfg: EngineConfig) -> Result<Engine, EngineError> {
        let cores = cfg.cores.max(1);
        let first =
            uring::bind_reuseport(cfg.listen, 4096).map_err(|source| EngineError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let local_addr = first.local_addr().map_err(EngineError::Thread)?;
        let mut listeners = vec![first];
        for _ in 1..cores {
            listeners.push(uring::bind_reuseport(local_addr, 4096).map_err(|source| {
                EngineError::Bind {
                    addr: local_addr,
                    source,
                }
            })?);
        }
        let shared = Arc::new(Shared {
            mailboxes: (0..cores)
                .map(|_| Mailbox::new(cfg.settings.limits.mailbox_capacity))
                .collect(),
            attach_seq: AtomicU64::new(1),
            session_seq: AtomicU64::new(1),
            drained: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
        });
        let cpus = core_affinity::get_core_ids().unwrap_or_default();
        let cfg = Arc::new(cfg);
        let mut threads = Vec::with_capacity(cores);
        for (i, listener) in listeners.into_iter().enumerate() {
            let cfg = cfg.clone();
            let shared = shared.clone();
            let cpu = (cfg.pin && !cpus.is_empty()).then(|| cpus[i % cpus.len()]);
            let t = std::thread::Builder::new()
                .name(format!("om-core-{i}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        core_affinity::set_for_current(cpu);
                    }
                    core::run(i as u16, cores as u16, cfg, shared, listener);
                })
                .map_err(EngineError::Thread)?;
            threads.push(t);
        }
        metrics::gauge!(crate::metrics::CORES).set(cores as f64);
        Ok(Engine {
            threads,
            shared,
            local_addr,
        })
    }

    /// The address agents connect to (with the real port when 0 was configured).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Begins a graceful drain on every core: GOING_AWAY to every agent, no new connections.
    pub fn drain(&self) {
        if !self.shared.draining.swap(true, Ordering::SeqCst) {
            for mb in &self.shared.mailboxes {
                mb.push_blocking(CoreMsg::Drain);
            }
        }
    }

    /// Replaces the live settings on every core. Sessions already established keep their
    /// contract; the new admission lists also close established sessions they no longer admit.
    pub fn reconfigure(&self, settings: Settings) {
        let s = Arc::new(settings);
        for mb in &self.shared.mailboxes {
            mb.push_blocking(CoreMsg::Reconfigure(s.clone()));
        }
    }

    /// Whether every core finished draining.
    pub fn drained(&self) -> bool {
        self.shared.drained.load(Ordering::SeqCst) >= self.threads.len()
    }

    /// Stops every core and waits for the threads.
    pub fn shutdown(self) {
        for mb in &self.shared.mailboxes {
            mb.push_blocking(CoreMsg::Exit);
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Monotonic microseconds since the first call in this process.
pub fn now_us() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// Wall-clock milliseconds since the Unix epoch (envelope expiry is absolute).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

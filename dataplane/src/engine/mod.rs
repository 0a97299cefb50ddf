//! The relay engine: one pinned thread per core, each running its own io_uring runtime, its own
//! SO_REUSEPORT listener, its sockets and tasks, around that core's [`crate::shard::Shard`].
//!
//! The engine owns only threads, the ring, sockets, tasks, mailboxes and the clock; every
//! decision is the shard's (see `docs/ARCHITECTURE.md`):
//!
//! ```text
//! socket --read--> Shard::on_read --> (actions: wake writer / reader, shut down; outbox)
//! mailbox ------> Shard::on_message     timer --> Shard::on_tick
//! Shard::poll_write --> write(2) --> Shard::on_write_done
//! ```
//!
//! Every agent's session has exactly one owning core (the one that accepted it). Cores exchange
//! only messages ([`mailbox::CoreMsg`]); nothing on the per-envelope path takes a lock.

mod core;
mod dialler;
pub mod mailbox;
pub mod store;
pub mod uring;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::shard::budget::RelayBudget;
use crate::shard::SeqSource;
use crate::wire::RelayId;
use mailbox::{CoreMsg, Mailbox};

/// Errors starting the engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The store could not be opened or recovered.
    #[error("cannot open the store in {dir}")]
    Store { dir: String, source: io::Error },
    /// The agent listener could not be bound.
    #[error("cannot listen on {addr}")]
    Bind { addr: SocketAddr, source: io::Error },
    /// A core thread could not be started.
    #[error("cannot start core thread: {0}")]
    Thread(io::Error),
}

pub use crate::shard::{Limits, Settings};

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
    /// Where durable envelopes are stored; `None`: the relay does not offer the durable class.
    pub store: Option<crate::engine::store::StoreConfig>,
    /// Relay links: where the link listener binds and its TLS (fleet CA, relay role). `None`:
    /// no links (a relay outside a fleet).
    pub link: Option<crate::shard::LinkTls>,
    pub link_listen: Option<SocketAddr>,
}

/// State shared by all cores: their mailboxes and a few relay-wide counters.
pub(crate) struct Shared {
    pub(crate) mailboxes: Vec<Mailbox>,
    pub(crate) seq: Arc<SeqSource>,
    pub(crate) budget: Arc<RelayBudget>,
    pub(crate) drained: AtomicUsize,
    pub(crate) draining: AtomicBool,
    /// Links up, and the snapshot, for the dialler.
    pub(crate) links: dialler::LinkBoard,
    /// The key and capability directory.
    pub(crate) agents: Arc<crate::directory::AgentDirectory>,
}

/// A running engine.
pub struct Engine {
    threads: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    link_addr: Option<SocketAddr>,
    recovered: usize,
}

impl Engine {
    /// Binds one listener per core and starts the core threads.
    pub fn start(cfg: EngineConfig) -> Result<Engine, EngineError> {
        let cores = cfg.cores.max(1);
        let mut stores: Vec<Option<crate::shard::ShardStore>> = match &cfg.store {
            None => (0..cores).map(|_| None).collect(),
            Some(sc) => {
                // A shard's current generation of duplicate windows holds half the cap.
                let windows = cfg.settings.limits.dedup_epochs / 2;
                let opened = crate::engine::store::open(sc, cores as u16, unix_ms(), windows)
                    .map_err(|source| EngineError::Store {
                        dir: sc.dir.display().to_string(),
                        source,
                    })?;
                let st = &opened.stats;
                tracing::info!(
                    dir = %sc.dir.display(),
                    segments = st.segments,
                    records = st.records,
                    live = opened.recovered,
                    released = st.released,
                    expired = st.expired,
                    cuts = st.cuts.len(),
                    undecodable = opened.undecodable,
                    duplicate_windows = st.windows,
                    duplicates = st.duplicates,
                    "store recovered"
                );
                metrics::gauge!(crate::metrics::STORE_RECOVERED).set(opened.recovered as f64);
                metrics::counter!(crate::metrics::STORE_CUTS).increment(st.cuts.len() as u64);
                opened.cores.into_iter().map(Some).collect()
            }
        };
        let recovered = stores.iter().flatten().map(|s| s.recovered.len()).sum();
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
        let mut link_listeners: Vec<Option<std::net::TcpListener>> =
            (0..cores).map(|_| None).collect();
        let mut link_addr = None;
        if let (Some(addr), Some(_)) = (cfg.link_listen, &cfg.link) {
            let bind = |a| {
                uring::bind_reuseport(a, 1024)
                    .map_err(|source| EngineError::Bind { addr: a, source })
            };
            let first = bind(addr)?;
            let bound = first.local_addr().map_err(EngineError::Thread)?;
            link_listeners[0] = Some(first);
            for l in link_listeners.iter_mut().skip(1) {
                *l = Some(bind(bound)?);
            }
            link_addr = Some(bound);
        }
        let shared = Arc::new(Shared {
            mailboxes: (0..cores)
                .map(|_| Mailbox::new(cfg.settings.limits.mailbox_capacity))
                .collect(),
            seq: Arc::new(SeqSource::default()),
            budget: RelayBudget::new(cfg.settings.limits.memory_budget as u64, cores),
            drained: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            links: dialler::LinkBoard::default(),
            agents: Arc::new(crate::directory::AgentDirectory::new(
                cfg.settings.limits.directory_bytes,
                cfg.settings.limits.directory_max_age_s,
            )),
        });
        let cpus = core_affinity::get_core_ids().unwrap_or_default();
        // The shards run the record layer themselves once rustls finished the handshake.
        let mut tls = (*cfg.tls).clone();
        tls.enable_secret_extraction = true;
        let cfg = Arc::new(EngineConfig {
            tls: Arc::new(tls),
            ..cfg
        });
        let mut threads = Vec::with_capacity(cores);
        for (i, listener) in listeners.into_iter().enumerate() {
            let cfg = cfg.clone();
            let shared = shared.clone();
            let store = stores[i].take();
            let link_listener = link_listeners[i].take();
            let cpu = (cfg.pin && !cpus.is_empty()).then(|| cpus[i % cpus.len()]);
            let t = std::thread::Builder::new()
                .name(format!("om-core-{i}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        core_affinity::set_for_current(cpu);
                    }
                    core::run(
                        i as u16,
                        cores as u16,
                        cfg,
                        shared,
                        (listener, link_listener),
                        store,
                    );
                })
                .map_err(EngineError::Thread)?;
            threads.push(t);
        }
        if cfg.link.is_some() {
            let (me, shared) = (cfg.relay_id, shared.clone());
            let t = std::thread::Builder::new()
                .name("om-dialler".into())
                .spawn(move || dialler::run(me, cores as u16, shared))
                .map_err(EngineError::Thread)?;
            threads.push(t);
        }
        metrics::gauge!(crate::metrics::CORES).set(cores as f64);
        metrics::gauge!(crate::metrics::MEMORY_BUDGET)
            .set(cfg.settings.limits.memory_budget as f64);
        Ok(Engine {
            threads,
            shared,
            local_addr,
            link_addr,
            recovered,
        })
    }

    /// Live envelopes recovered from the store at start.
    pub fn recovered(&self) -> usize {
        self.recovered
    }

    /// The address agents connect to (with the real port when 0 was configured).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address of the relay link listener, if the relay runs one.
    pub fn link_addr(&self) -> Option<SocketAddr> {
        self.link_addr
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
        let budget = settings.limits.memory_budget as u64;
        self.shared.budget.set_limit(budget);
        metrics::gauge!(crate::metrics::MEMORY_BUDGET).set(budget as f64);
        let s = Arc::new(settings);
        for mb in &self.shared.mailboxes {
            mb.push_blocking(CoreMsg::Reconfigure(s.clone()));
        }
    }

    /// Hands every core a route snapshot of the fleet; each applies it if it is newer than the
    /// one it has (the `openmesh_fleet_generation` gauge says which one each runs).
    pub fn apply_fleet(&self, snapshot: Arc<crate::fleet::snapshot::Snapshot>) {
        if let Ok(mut s) = self.shared.links.snapshot.lock() {
            if s.as_ref()
                .is_none_or(|have| have.generation < snapshot.generation)
            {
                *s = Some(snapshot.clone());
            }
        }
        for mb in &self.shared.mailboxes {
            mb.push_blocking(CoreMsg::Fleet(snapshot.clone()));
        }
    }

    /// Whether every core finished draining.
    pub fn drained(&self) -> bool {
        self.shared.drained.load(Ordering::SeqCst) >= self.shared.mailboxes.len()
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

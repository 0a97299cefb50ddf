//! One core's relay, as a state machine: the shard.
//!
//! A shard owns the connections that core accepted, their sessions, the custody it holds for
//! destination agents, its copy of the directory and its outbox to other cores. It does no I/O,
//! reads no clock and spawns nothing: the engine (`crate::engine`) feeds it events, each with the
//! time ([`Now`]), and carries out what it asks for ([`Action`]s, and the [`msg::Outbox`]).
//!
//! How the engine drives it, per core:
//!
//! ```text
//! accept          -> Shard::open(now) -> ConnId; the engine starts a reader and a writer task
//! reader          -> Shard::read_gate(conn, now): Go | Wait(us) | Park
//!                    Shard::take_read_buf(conn) -> read(2) into it -> Shard::on_read(conn, buf, now)
//!                    end of stream or error -> Shard::on_read_end(conn, now)
//! writer          -> on a WakeWriter action: Shard::poll_write(conn, now) -> (buffer, len)
//!                    write(2) -> Shard::on_write_done(conn, buffer, ok, now); repeat until None
//! mailbox         -> Shard::on_message(msg, now)
//! timer           -> Shard::on_tick(now)
//! after each call -> Shard::poll_action() until None; flush Shard::outbox() to the mailboxes
//! ```
//!
//! The rooms: `conn` (a connection's state; opening it, its reader's gate and input),
//! `transport` (TLS records, framing, write buffer), `agent` (what an agent's frames do: HELLO,
//! ENVELOPE, ACK, NACK, PING, CLOSE), `attach` (which core owns which agent),
//! `forward` (routing an accepted envelope and the verdict back to its source), `custody` (send
//! queues, in-flight, held for absent agents, per-source quota), [`budget`] (the memory budget
//! and overload states), `write` (one writer pass), `timers` (heartbeats, deadlines, drain),
//! [`msg`] (messages between cores).

mod agent;
mod attach;
pub mod budget;
mod conn;
pub use conn::MovingConn;
mod custody;
pub(crate) mod dedup;
mod durable;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub use durable::{ShardStore, StoreState};
mod forward;
pub mod hasher;
mod link;
mod mesh;
pub use link::{link_core, LinkTls};
pub mod msg;
mod presence;
mod timers;
mod write;

pub(crate) use conn::Conn;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::metrics::CoreMetrics;
use crate::policy::Admission;
use crate::routing::Directory;
use crate::session::SessionTimeouts;
use crate::signaling::ContractPolicy;
use crate::wire::{AgentId, Envelope, RelayId};
use budget::{RelayBudget, ShardBudget};
use custody::{Held, Released, SourceQuota};
use msg::{ConnId, CoreMsg, Outbox};

/// Bounds on what one core holds. Also the relay's `[limits]` configuration section.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Connections one core serves at once; more are closed right after accept.
    pub max_connections_per_core: usize,
    /// Envelopes queued towards one agent before at-least-once envelopes are refused.
    pub send_queue_envelopes: usize,
    /// Bytes queued towards one agent before at-least-once envelopes are refused; unset:
    /// `memory_budget / 64`.
    pub send_queue_bytes: Option<usize>,
    /// Messages one core's mailbox holds.
    pub mailbox_capacity: usize,
    /// Bytes the relay may hold on peers' behalf, all cores together (custody, buffers, a fixed
    /// share per connection); the overload states start at 70 % of it (`shard::budget`).
    pub memory_budget: usize,
    /// Bytes one source agent may have held undelivered on this relay, across all destinations;
    /// beyond it its envelopes are NACKed `quota_exceeded`. Unset: `memory_budget / 16`.
    pub source_quota: Option<usize>,
    /// Largest read buffer of one connection: it starts at 4 KiB and doubles when a read fills
    /// it (a frame being reassembled may need up to `max_frame` plus one record more).
    pub read_buffer: usize,
    /// Longest an envelope is kept for an agent that is not connected, in seconds, even if its
    /// TTL is longer; past it the envelope is dropped and counted.
    pub absent_max_age_s: u64,
    /// Bytes (frames plus a per-envelope overhead) the relay keeps for agents that are not
    /// connected, all of them together (each core its share); beyond it new envelopes for absent
    /// agents are NACKed `queue_full`. Unset: `memory_budget / 2`, below the overload states,
    /// so offline queues cannot push the relay into refusing sessions.
    pub absent_bytes: Option<usize>,
    /// Source epochs (a source's session id prefix) each core remembers the recent message ids
    /// of, to suppress duplicates; each takes about 600 bytes.
    pub dedup_epochs: usize,
    /// Bytes the key and capability directory may hold (bundles of at most 4,000 bytes plus a
    /// fixed overhead each); beyond it new bundles are refused `directory_full`.
    pub directory_bytes: usize,
    /// Longest a published bundle stays in the directory, in seconds, even if it says longer.
    pub directory_max_age_s: u64,
    /// Agents of the fleet the relay can locate (presence; at most 2^20). Every core keeps its
    /// own table, so they take this times the cores times 352 bytes; a full table gives up the
    /// oldest entry of the relay the most entries name. Unset: what fits in an eighth of
    /// `memory_budget`.
    pub located_agents: Option<usize>,
}

impl Limits {
    /// The per-destination queue bound in bytes (its own setting, or `memory_budget / 64`).
    pub fn send_queue_bytes(&self) -> usize {
        self.send_queue_bytes.unwrap_or(self.memory_budget / 64)
    }

    /// The per-source quota in bytes (its own setting, or `memory_budget / 16`).
    pub fn source_quota(&self) -> usize {
        self.source_quota.unwrap_or(self.memory_budget / 16)
    }

    /// What may be kept for absent agents, in bytes (its own setting, or `memory_budget / 2`).
    pub fn absent_bytes(&self) -> usize {
        self.absent_bytes.unwrap_or(self.memory_budget / 2)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections_per_core: 100_000,
            send_queue_envelopes: 8192,
            send_queue_bytes: None,
            mailbox_capacity: 65_536,
            memory_budget: 1 << 30,
            source_quota: None,
            read_buffer: 256 << 10,
            absent_max_age_s: 24 * 3600,
            absent_bytes: None,
            dedup_epochs: 16_384,
            directory_bytes: 32 << 20,
            directory_max_age_s: 24 * 3600,
            located_agents: None,
        }
    }
}

/// What can change while the relay runs (on SIGHUP): the contract offered to new sessions,
/// timeouts, admission lists (applied to established sessions too) and limits
/// (`mailbox_capacity` only takes effect on restart).
#[derive(Clone, Debug)]
pub struct Settings {
    pub contract: ContractPolicy,
    pub timeouts: SessionTimeouts,
    pub admission: Admission,
    pub limits: Limits,
}

/// What a shard needs that does not change while it runs.
#[derive(Clone)]
pub struct ShardConfig {
    /// Server TLS configuration (secret extraction enabled).
    pub tls: Arc<rustls::ServerConfig>,
    pub relay_id: RelayId,
    /// TLS of relay links, when the relay runs in a fleet.
    pub link: Option<LinkTls>,
    /// The relay's key and capability directory, shared by every core.
    pub agents: Arc<crate::directory::AgentDirectory>,
}

/// The time, as the engine read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Now {
    /// Monotonic microseconds (deadlines, rates).
    pub mono_us: u64,
    /// Unix milliseconds (envelope expiry is absolute).
    pub unix_ms: u64,
}

/// Something the engine must do for the shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// The connection has something to write: run its writer.
    WakeWriter(ConnId),
    /// The connection's reader was parked ([`ReadGate::Park`]) and may read again.
    WakeReader(ConnId),
    /// Shut the socket down: pending operations complete, both tasks end.
    Shutdown(ConnId),
    /// The store has a file operation due: run the store task ([`Shard::poll_store`]).
    WakeStore,
    /// The relay link to this relay went up (`true`) or down: the dialler's view.
    LinkState(RelayId, bool),
    /// ACKs to an agent or verdicts to another core are held where none were: call
    /// [`Shard::flush_held`] at [`Shard::held_due`].
    Held,
}

/// Whether a reader may read now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadGate {
    Go,
    /// Wait this many microseconds, or until a [`Action::WakeReader`], then ask again (rate
    /// limits; a congested destination, whose `Resume` wakes the reader early).
    Wait(u64),
    /// Wait for a [`Action::WakeReader`] (send window or outbox full).
    Park,
    /// The connection is finished: stop reading.
    Stop,
    /// The session belongs on core `k` (its agent's home core): take it with
    /// [`Shard::take_moving`] and hand it and its socket to core `k` (`CoreMsg::Adopt`).
    Move(u16),
}

/// When an answer held now is due (`features::ACK_HOLD_MS` from `now`).
fn held_until(now: Now) -> u64 {
    now.mono_us + crate::wire::features::ACK_HOLD_MS * 1000
}

/// Relays a receipt may cross on its way back to its source.
const RECEIPT_HOPS: u8 = crate::wire::MAX_PATH_LEN as u8;

/// Outbox backlog towards one core above which readers park.
const OUTBOX_HIGH: usize = 16_384;
/// Largest frame accepted before HELLO: a HELLO is at most about 8 KiB.
const PRE_HELLO_MAX_FRAME: usize = 16 << 10;

/// Write buffer for an agent session with little to write (a few envelopes, ACKs): most writes
/// of a relay with many sessions, which would otherwise each take (and, with many writing at
/// once, allocate and zero) a full-size buffer.
pub(crate) const SMALL_WRITE_BUFFER: usize = 32 << 10;
/// Full-size write buffers kept for reuse per shard.
const SPARE_BUFFERS: usize = 16;
/// Small write buffers kept for reuse per shard.
const SPARE_SMALL_BUFFERS: usize = 64;

/// One core's relay state machine. See the module docs for how to drive it.
pub struct Shard {
    id: u16,
    ncores: u16,
    cfg: ShardConfig,
    settings: Arc<Settings>,
    /// What this core knows of the fleet: the route snapshot it applied, links, agents'
    /// relays, envelopes waiting for a path.
    mesh: mesh::Mesh,
    m: CoreMetrics,
    conns: conn::Conns,
    by_agent: HashMap<AgentId, ConnId, crate::shard::hasher::MapHasher>,
    directory: Directory,
    held: Held,
    outbox: Outbox,
    actions: VecDeque<Action>,
    /// Attach sequence numbers and session ids come from relay-wide counters the engine owns.
    seq: Arc<SeqSource>,
    draining: bool,
    custody_swept_us: u64,
    /// Write buffers not in use, reused across connections: full-size ones (at most
    /// [`SPARE_BUFFERS`]) and small ones for small writes (at most [`SPARE_SMALL_BUFFERS`]).
    spare_buffers: Vec<Vec<u8>>,
    spare_small: Vec<Vec<u8>>,
    /// Envelopes handed to other cores since the metric was last counted.
    handed_off: u64,
    /// Readers parked on the outbox high-water mark.
    parked_on_outbox: Vec<ConnId>,
    /// Sessions whose ACKs are held, with when they are due, in that order (a constant delay;
    /// a time read earlier in the same batch of messages can put one a little behind a later
    /// one, which then waits that little longer).
    /// One entry per session holding; an entry whose ACKs left earlier (with another write)
    /// stays until its time, so at most the sessions plus the writes of one hold time.
    acks_held: VecDeque<(u64, ConnId)>,
    /// Verdicts held for each core (for sources that let their answers wait, `Src::hold`),
    /// and when the first of them is due (0: none held). At most [`MAX_COALESCED`] per core:
    /// then they go at once.
    verdicts_held: Vec<(Vec<msg::Verdict>, u64)>,
    budget: ShardBudget,
    /// What each source has in this shard's custody.
    sources: SourceQuota,
    /// Envelopes that left custody since `sources` was last updated.
    released: Released,
    /// Scratch for the envelopes one read accepted.
    accepted: Vec<Envelope>,
    /// Scratch for the copied part of the record being sealed, lent to each writer pass.
    tail: Vec<u8>,
    /// The store, when the relay keeps durable envelopes.
    durable: Option<durable::Durable>,
    /// Recent message ids per source epoch, for duplicate suppression.
    dedup: dedup::Dedup,
}

/// Relay-wide counters shared by every shard (attach sequence, session ids).
#[derive(Debug, Default)]
pub struct SeqSource {
    attach: std::sync::atomic::AtomicU64,
    session: std::sync::atomic::AtomicU64,
}

impl SeqSource {
    fn next_attach(&self) -> u64 {
        self.attach
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1
    }
    fn next_session(&self) -> u64 {
        self.session
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1
    }
}

impl Shard {
    /// Shard `id` of `ncores`.
    pub fn new(
        id: u16,
        ncores: u16,
        cfg: ShardConfig,
        settings: Settings,
        seq: Arc<SeqSource>,
        budget: Arc<RelayBudget>,
    ) -> Self {
        let settings_dedup = settings.limits.dedup_epochs;
        Shard {
            budget: ShardBudget::new(budget, id),
            sources: SourceQuota::default(),
            released: Released::default(),
            accepted: Vec::new(),
            tail: Vec::new(),
            id,
            ncores,
            cfg,
            settings: Arc::new(settings),
            mesh: mesh::Mesh::default(),
            m: CoreMetrics::new(id),
            conns: conn::Conns::default(),
            by_agent: HashMap::default(),
            directory: Directory::new(),
            held: Held::default(),
            outbox: Outbox::new(ncores as usize),
            actions: VecDeque::new(),
            seq,
            draining: false,
            custody_swept_us: 0,
            spare_buffers: Vec::new(),
            spare_small: Vec::new(),
            handed_off: 0,
            parked_on_outbox: Vec::new(),
            acks_held: VecDeque::new(),
            verdicts_held: (0..ncores).map(|_| (Vec::new(), 0)).collect(),
            durable: None,
            dedup: dedup::Dedup::new(settings_dedup),
        }
    }

    /// Gives the shard its store (before it serves anything): durable envelopes are written to
    /// its log, and what recovery found for agents homed here is kept for them.
    pub fn attach_store(&mut self, store: ShardStore) {
        for w in store.windows.iter() {
            self.dedup.seed(w);
        }
        let (d, recovered) = durable::Durable::new(store, self.id);
        self.durable = Some(d);
        self.keep_recovered(recovered);
    }

    /// When the first held ACKs or verdicts are due: call [`Shard::flush_held`] then.
    pub fn held_due(&self) -> Option<u64> {
        let verdicts = self
            .verdicts_held
            .iter()
            .filter(|(v, _)| !v.is_empty())
            .map(|(_, due)| *due);
        self.acks_held
            .front()
            .map(|(due, _)| *due)
            .into_iter()
            .chain(verdicts)
            .min()
    }

    /// Holds verdict `v` for `core` (its source let it wait): it goes when due, when enough
    /// wait, or with the next message to that core.
    pub(super) fn hold_verdict(&mut self, core: u16, v: msg::Verdict, now: Now) {
        let (held, due) = &mut self.verdicts_held[core as usize];
        if held.is_empty() {
            *due = held_until(now);
            self.actions.push_back(Action::Held);
        }
        held.push(v);
        if held.len() >= msg::MAX_COALESCED {
            self.release_verdicts(core as usize);
        }
    }

    /// Moves the verdicts held for `core` to the outbox.
    fn release_verdicts(&mut self, core: usize) {
        let (held, _) = &mut self.verdicts_held[core];
        for v in held.drain(..) {
            self.outbox.verdict(core as u16, v);
        }
    }

    /// Wakes the writers of the sessions whose held ACKs are due, and sends the verdicts due.
    pub fn flush_held(&mut self, now: Now) {
        for core in 0..self.verdicts_held.len() {
            let (held, due) = &self.verdicts_held[core];
            if !held.is_empty() && *due <= now.mono_us {
                self.release_verdicts(core);
            }
        }
        while let Some(&(due, conn)) = self.acks_held.front() {
            if due > now.mono_us {
                break;
            }
            self.acks_held.pop_front();
            let Some(c) = self.conns.get_mut(&conn) else {
                continue;
            };
            // A later due time has its own entry.
            if c.a.acks_due_us.is_some_and(|d| d <= now.mono_us) {
                c.a.acks_due_us = None;
                self.wake_writer(conn);
            }
        }
    }

    /// The next thing the engine must do.
    pub fn poll_action(&mut self) -> Option<Action> {
        if !self.released.1.is_empty() {
            self.release_stored();
        }
        if !self.released.2.is_empty() {
            self.send_receipts();
        }
        if !self.released.0.is_empty() {
            self.sources.release(&mut self.released);
        }
        self.actions.pop_front()
    }

    /// This shard's share of the per-source quota.
    fn source_quota(&self) -> u64 {
        (self.settings.limits.source_quota() / self.ncores.max(1) as usize) as u64
    }

    /// Messages for other cores; the engine moves them into the mailboxes.
    pub fn outbox(&mut self) -> &mut Outbox {
        // Held verdicts go with any other message to their core.
        for core in 0..self.verdicts_held.len() {
            if !self.verdicts_held[core].0.is_empty() && !self.outbox.per_core[core].is_empty() {
                self.release_verdicts(core);
            }
        }
        let handed = std::mem::take(&mut self.handed_off);
        if handed > 0 {
            self.m.mailbox_sent.increment(handed);
        }
        &mut self.outbox
    }

    /// The engine found a mailbox full this many times while flushing.
    pub fn mailbox_full(&mut self, times: u64) {
        self.m.mailbox_full.increment(times);
    }

    /// The outbox drained below its high-water mark: parked readers may go on.
    pub fn outbox_flushed(&mut self) {
        if self.outbox.max_pending() <= OUTBOX_HIGH {
            for c in std::mem::take(&mut self.parked_on_outbox) {
                self.wake_reader(c);
            }
        }
    }

    /// One line about a connection's state, for test failure reports.
    pub fn describe(&self, conn: ConnId) -> String {
        match self.conns.get(&conn) {
            None => "gone".into(),
            Some(c) => format!(
                "queued {} in flight {} (window full {}) awaiting {} writing {} writer awake {} closing {} welcomed {}",
                c.a.outq.len(),
                c.a.inflight.len(),
                c.window_full(),
                c.a.awaiting,
                c.writing,
                c.writer_awake,
                c.closing,
                c.a.welcomed
            ),
        }
    }

    /// One line about what this shard holds for absent agents, for test failure reports.
    pub fn describe_held(&self) -> String {
        format!(
            "held {} envelopes, {} bytes; directory {:?}",
            self.held.len(),
            self.held.bytes(),
            self.directory
        )
    }

    /// Envelopes this shard keeps until a compliant path exists.
    pub fn fleet_waiting(&self) -> usize {
        self.mesh.waiting_len()
    }

    /// One line about what this shard knows of the fleet, for test failure reports.
    pub fn describe_mesh(&self) -> String {
        let links: Vec<String> = self
            .conns
            .values()
            .filter_map(|c| {
                let l = c.link.as_ref()?;
                Some(format!(
                    "{}:{} tls {} hello {} closing {} up {} queued {} in flight {} awaiting {}",
                    c.id,
                    l.peer.map_or("?".into(), |p| p.to_hex()[..6].to_string()),
                    c.transport.is_open(),
                    l.hello_sent,
                    c.closing,
                    l.up,
                    c.a.outq.len(),
                    c.a.inflight.len(),
                    c.a.awaiting
                ))
            })
            .collect();
        format!("{}; links [{}]", self.mesh.describe(), links.join(", "))
    }

    /// What this shard holds on peers' behalf, counted now (see [`budget`]).
    pub fn memory_used(&self) -> u64 {
        self.usage()
    }

    /// Whether the shard is draining.
    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// Connections open on this shard.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Handles a message from another core.
    pub fn on_message(&mut self, msg: CoreMsg, now: Now) {
        match msg {
            CoreMsg::Attach { agent, loc, conn } => self.on_attach(agent, loc, conn, now),
            CoreMsg::AttachAck { conn } => self.on_attach_ack(conn, now),
            CoreMsg::Detach { agent, seq } => {
                self.directory.detach(&agent, seq);
            }
            CoreMsg::Deliver { env, src } => self.on_deliver(env, src, now),
            CoreMsg::Delivers(v) => {
                for (env, src) in v {
                    self.on_deliver(env, src, now);
                }
            }
            CoreMsg::Verdicts(vs) => {
                for v in vs {
                    self.on_verdict(v, now);
                }
            }
            CoreMsg::Verdict(v) => self.on_verdict(v, now),
            CoreMsg::Resume { conn } => self.on_resume(conn),
            CoreMsg::Receipt {
                to,
                receipt,
                hops_left,
            } => self.deliver_receipt(to, receipt, hops_left),
            CoreMsg::LinkReceipt { peer, receipt } => self.receipt_on_link(peer, receipt),
            CoreMsg::Adopt { conn, .. } => {
                // The engine adopts moving sessions itself, with their sockets: a session
                // without one has no reader or writer here and is dropped.
                tracing::warn!(core = self.id, conn = ?conn, "moved session without its socket dropped");
            }
            CoreMsg::Reconfigure(s) => self.reconfigure(s, now),
            CoreMsg::Fleet(f) => self.apply_fleet(f, now),
            CoreMsg::Forward { env, peer, src } => self.on_forward(env, peer, src, now),
            CoreMsg::LinkUp {
                peer,
                core,
                conn,
                latency_us,
            } => self.on_link_up(
                peer,
                link::LinkView {
                    core,
                    conn,
                    latency_us,
                },
                now,
            ),
            CoreMsg::LinkDown { peer, core, conn } => self.on_link_down(peer, (core, conn)),
            CoreMsg::LinkLatency { peer, latency_us } => self.on_link_latency(peer, latency_us),
            CoreMsg::ReleaseStored { seqs } => self.release_moved(seqs),
            CoreMsg::Presence { entries, from } => {
                self.on_presence(&entries, from, now);
            }
            CoreMsg::Dial { peer, .. } => {
                tracing::warn!(core = self.id, peer = %peer.to_hex(), "link dialled without its socket dropped");
            }
            CoreMsg::Drain => self.start_drain(now),
            CoreMsg::Exit => self.exit(),
        }
    }

    /// Stops: every socket is shut down so that pending operations complete. Custody held in
    /// memory only (at-least-once) is lost with the process: counted and logged. Stored
    /// envelopes stay on disk for the next start (the engine lets the store finish first).
    fn exit(&mut self) {
        let held = self.held.unstored() as u64;
        let connected: u64 = self
            .conns
            .values()
            .map(|c| {
                (c.a.inflight.unstored()
                    + c.a
                        .outq
                        .iter()
                        .filter(|e| {
                            e.class() != crate::wire::DeliveryClass::BestEffort
                                && e.store_seq() == 0
                        })
                        .count()) as u64
            })
            .sum();
        if held + connected > 0 {
            self.m
                .dropped(crate::wire::Reason::ShuttingDown, held + connected);
            tracing::warn!(
                core = self.id,
                envelopes = held + connected,
                "custody lost at exit (memory only)"
            );
        }
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            self.actions.push_back(Action::Shutdown(id));
        }
    }

    /// Sends the receipts due to sources (to their home cores, where their sessions are).
    fn send_receipts(&mut self) {
        let at_ms = self.held.now_ms();
        let due = std::mem::take(&mut self.released.2);
        for (to, message_id, status) in due {
            let receipt = crate::wire::Receipt {
                message_id,
                status,
                at_ms,
            };
            let home = crate::routing::home_core(&to, self.ncores);
            if home == self.id {
                self.deliver_receipt(to, receipt, RECEIPT_HOPS);
            } else {
                self.outbox.push(
                    home,
                    CoreMsg::Receipt {
                        to,
                        receipt,
                        hops_left: RECEIPT_HOPS,
                    },
                );
            }
        }
    }

    /// Writes a receipt to its source's session, if it is connected here and agreed to
    /// receipts; sends it on towards the relay the source is attached to, if that is another
    /// relay of the fleet (`hops_left` more relays at most); else it is dropped, counted
    /// (receipts are best effort).
    pub(super) fn deliver_receipt(
        &mut self,
        to: AgentId,
        receipt: crate::wire::Receipt,
        hops_left: u8,
    ) {
        let conn = self.by_agent.get(&to).copied();
        let c = conn.and_then(|c| self.conns.get_mut(&c)).filter(|c| {
            !c.closing
                && c.a.ctrl.len() < conn::CONTROL_OUTPUT_MAX
                && c.a
                    .contract
                    .as_ref()
                    .is_some_and(|w| w.features & crate::wire::features::RECEIPTS != 0)
        });
        let Some(c) = c else {
            if conn.is_none() && self.receipt_to_fleet(to, receipt, hops_left) {
                return;
            }
            self.m.receipts_dropped.increment(1);
            return;
        };
        crate::wire::Frame::Receipt(receipt).encode(&mut c.a.ctrl);
        let id = c.id;
        self.m.receipts(receipt.status);
        self.wake_writer(id);
    }

    /// Takes new live settings and closes established sessions the new admission lists refuse.
    fn reconfigure(&mut self, s: Arc<Settings>, now: Now) {
        self.settings = s.clone();
        let refused: Vec<ConnId> = self
            .conns
            .values()
            .filter(|c| c.a.agent.is_some_and(|a| s.admission.admit(&a).is_err()))
            .map(|c| c.id)
            .collect();
        for id in &refused {
            self.close(*id, crate::wire::Reason::NotAdmitted, now);
        }
        tracing::info!(core = self.id, closed = refused.len(), "settings reloaded");
    }

    /// Takes a route snapshot if it is newer than the one applied.
    fn apply_fleet(&mut self, f: Arc<crate::fleet::snapshot::Snapshot>, now: Now) {
        if self
            .mesh
            .snap
            .as_ref()
            .is_some_and(|have| have.generation >= f.generation)
        {
            return;
        }
        self.m.fleet_generation.set(f.generation as f64);
        self.mesh_applied(f, now);
    }

    /// The generation of the route snapshot applied (0: none).
    pub fn fleet_generation(&self) -> u64 {
        self.mesh.snap.as_ref().map_or(0, |f| f.generation)
    }

    /// A write buffer from the pool: a small one when `small`.
    fn buffer(&mut self, small: bool) -> Vec<u8> {
        let (pool, len) = if small {
            (&mut self.spare_small, SMALL_WRITE_BUFFER)
        } else {
            (&mut self.spare_buffers, crate::tls::transport::WRITE_BUFFER)
        };
        pool.pop().unwrap_or_else(|| vec![0u8; len])
    }

    /// Returns a write buffer to its pool (at most a few of each size are kept).
    fn recycle(&mut self, buf: Vec<u8>) {
        match buf.len() {
            crate::tls::transport::WRITE_BUFFER if self.spare_buffers.len() < SPARE_BUFFERS => {
                self.spare_buffers.push(buf)
            }
            SMALL_WRITE_BUFFER if self.spare_small.len() < SPARE_SMALL_BUFFERS => {
                self.spare_small.push(buf)
            }
            _ => {}
        }
    }

    /// Bytes the pooled write buffers retain.
    fn spare_buffer_bytes(&self) -> usize {
        self.spare_buffers.len() * crate::tls::transport::WRITE_BUFFER
            + self.spare_small.len() * SMALL_WRITE_BUFFER
    }

    /// Envelopes agents connected here hold custody of, for the gauges.
    fn custody_counts(&self) -> (usize, usize) {
        self.conns.values().fold((0, 0), |(q, f), c| {
            (q + c.a.outq.len(), f + c.a.inflight.len())
        })
    }
}

/// Helper for the rooms: an envelope's destination agent, if it is one.
pub(crate) fn dest_agent(env: &Envelope) -> Option<AgentId> {
    match env.destination() {
        crate::wire::Destination::Agent(a) => Some(a),
        crate::wire::Destination::Group(_) => None,
    }
}

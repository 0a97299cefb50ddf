//! A relay of several shards wired together in memory, with a virtual clock and scripted agents
//! speaking real TLS (rustls clients) and real frames, driven by random schedules.
//!
//! Every schedule is drawn from a seed. After every step the invariants are checked:
//! - no agent session receives the same envelope twice;
//! - within one session of the destination, envelopes one session of a source sent after that
//!   destination session began arrive in the order they were sent (custody redelivered from the
//!   destination's earlier sessions, or sent by the source's earlier sessions, may come between);
//! - an agent that does not ACK never holds more than its deliver window;
//! - every shard's memory use stays within the relay's budget.
//!
//! Half the envelopes are durable: each shard has a store whose file operations complete (or
//! fail, now and then) on a virtual disk at random moments, and now and then the whole relay is
//! killed: what was synced (and a torn part of a write in flight) is all that survives, the store
//! is recovered and planned as at a real start (`store::recovery::plan`) and new shards serve it.
//!
//! At the end every agent comes back, reads and ACKs until the relay is quiet, and then: every
//! envelope the relay ACKed to its sender was delivered to its destination (nothing ACKed is
//! lost; the envelopes' TTL is far longer than a schedule), except at-least-once envelopes held
//! in memory when the relay was killed.
//!
//! `SIM_SCHEDULES=N` runs N schedules (default 1,000); `SIM_SEED=S` replays one. A failure
//! prints the seed that replays it. The shard's maps and the harness's use fixed hash seeds, so
//! a seed replays the same schedule and the same iteration orders.

use std::collections::VecDeque;
use std::hash::BuildHasherDefault;

/// Maps and sets with a fixed hasher: a seed replays the same iteration orders.
type HashMap<K, V> = std::collections::HashMap<K, V, BuildHasherDefault<std::hash::DefaultHasher>>;
type HashSet<K> = std::collections::HashSet<K, BuildHasherDefault<std::hash::DefaultHasher>>;
use std::io::{Read, Write};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use openmesh_dataplane::pki::Identity;
use openmesh_dataplane::session::SessionTimeouts;
use openmesh_dataplane::shard::budget::RelayBudget;
use openmesh_dataplane::shard::msg::{ConnId, CoreMsg};
use openmesh_dataplane::shard::ShardConfig;
use openmesh_dataplane::shard::{Action, Limits, Now, ReadGate, SeqSource, Settings, Shard};
use openmesh_dataplane::signaling::ContractPolicy;
use openmesh_dataplane::store::log::LogAction;
use openmesh_dataplane::store::record;
use openmesh_dataplane::store::recovery::{self, SegmentId};
use openmesh_dataplane::testing::{open_settings, InMemoryRelay, Rng};
use openmesh_dataplane::wire::{
    AckBatch, AgentId, DeliveryClass, Destination, EnvelopeBuilder, Frame, FrameDecoder, Hello,
    MessageId, Reason, Role, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN,
};
use rustls::pki_types::ServerName;
use rustls::ClientConnection;

/// How a scripted agent behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Behavior {
    /// Sends, reads and ACKs.
    Honest,
    /// Reads, ACKs only now and then.
    Slow,
    /// Reads and never ACKs.
    NeverAcks,
    /// Sends bursts.
    Flooder,
    /// Leaves and comes back.
    Vanishing,
}

/// One agent identity across its sessions.
struct Agent {
    identity: Identity,
    id: AgentId,
    behavior: Behavior,
    /// Next message id counter.
    next: u64,
    /// Envelopes the relay ACKed to this agent as their sender.
    acked_by_relay: HashSet<MessageId>,
    /// Envelopes sent and not answered yet.
    outstanding: HashSet<MessageId>,
    /// Every envelope this agent received, over all its sessions.
    received: HashSet<MessageId>,
    /// Where each envelope it sent went.
    sent_to: HashMap<MessageId, usize>,
    /// The durable ones among them.
    durable: HashSet<MessageId>,
    /// The session it has now, if any.
    link: Option<usize>,
}

/// One TLS connection between an agent and a shard.
struct Link {
    agent: usize,
    core: usize,
    conn: ConnId,
    tls: ClientConnection,
    /// Ciphertext the agent wrote that the relay has not read yet.
    to_relay: Vec<u8>,
    /// A relay write in progress (the agent takes it when it reads).
    writing: Option<(Vec<u8>, usize)>,
    writer_woken: bool,
    plain: BytesMut,
    dec: FrameDecoder,
    welcomed: bool,
    hello_sent: bool,
    deliver_window: usize,
    /// Received in this session, not yet ACKed by the agent.
    unacked: Vec<MessageId>,
    seen: HashSet<MessageId>,
    /// Last message id received per source session (link) and class, for order (a durable
    /// envelope joins its destination's queue when it is on disk, so classes may overtake).
    last_from: HashMap<(usize, u8), u128>,
    /// The step at which WELCOME arrived.
    welcomed_at: u64,
    open: bool,
    /// The agent stopped reading (writes stay pending).
    reading: bool,
}

struct Sim {
    rng: Rng,
    seed: u64,
    now: Now,
    shards: Vec<Shard>,
    mail: Vec<VecDeque<CoreMsg>>,
    agents: Vec<Agent>,
    links: Vec<Link>,
    client_tls: HashMap<usize, Arc<rustls::ClientConfig>>,
    ca_cert: rustls::pki_types::CertificateDer<'static>,
    budget: u64,
    /// Steps taken.
    steps: u64,
    /// For every envelope sent: the sending link and the step.
    sent_by: HashMap<MessageId, (usize, u64)>,
    shard_config: ShardConfig,
    disk: VDisk,
    crashes: usize,
}

/// Segment size of the simulated stores: small, so segments roll over and go.
const SEGMENT: u64 = 16 << 10;

fn plan_config(cores: usize, now_ms: u64) -> recovery::PlanConfig {
    recovery::PlanConfig {
        cores: cores as u16,
        now_ms,
        segment_bytes: SEGMENT,
        stall_us: 1 << 40,
        windows: 1024,
    }
}

/// The simulated disk: segment files as written, as synced, and each core's store operations
/// in flight (main: create on demand, write, sync; side: create ahead, remove).
#[derive(Default)]
struct VDisk {
    files: std::collections::BTreeMap<(usize, u64), Vec<u8>>,
    synced: std::collections::BTreeMap<(usize, u64), Vec<u8>>,
    main: Vec<Option<LogAction>>,
    side: Vec<Option<LogAction>>,
}

impl VDisk {
    fn apply(&mut self, core: usize, a: &LogAction) {
        match a {
            LogAction::Create {
                number,
                header,
                size,
            } => {
                assert!(
                    !self.synced.contains_key(&(core, *number)),
                    "segment {core}/{number} created over a file that exists"
                );
                let mut f = vec![0u8; *size as usize];
                f[..header.len()].copy_from_slice(header);
                self.files.insert((core, *number), f.clone());
                self.synced.insert((core, *number), f);
            }
            LogAction::Write {
                number,
                offset,
                buf,
            } => {
                let f = self
                    .files
                    .get_mut(&(core, *number))
                    .expect("written file exists");
                let end = *offset as usize + buf.len();
                assert!(
                    end <= f.len(),
                    "write of {} at {offset} into segment {core}/{number} of {} bytes",
                    buf.len(),
                    f.len()
                );
                f[*offset as usize..end].copy_from_slice(buf);
            }
            LogAction::Sync { number } => {
                let f = self.files[&(core, *number)].clone();
                self.synced.insert((core, *number), f);
            }
            LogAction::Remove { number } => {
                self.files.remove(&(core, *number));
                self.synced.remove(&(core, *number));
            }
            LogAction::Read { .. } => {}
        }
    }

    /// What a `Read` reads (the file as written: the page cache).
    fn read(&self, core: usize, a: &LogAction) -> Option<Bytes> {
        let LogAction::Read {
            number,
            offset,
            len,
        } = a
        else {
            return None;
        };
        let f = self.files.get(&(core, *number))?;
        Some(Bytes::copy_from_slice(
            &f[*offset as usize..*offset as usize + *len as usize],
        ))
    }
}

const TTL_MS: u64 = 3_600_000;

fn settings(budget: u64) -> Settings {
    Settings {
        contract: ContractPolicy {
            deliver_window: 16,
            deliver_window_bytes: 1 << 20,
            send_window: 64,
            heartbeat_ms: 10_000,
            classes: DeliveryClass::AtLeastOnce.bit() | DeliveryClass::Durable.bit(),
            ..ContractPolicy::default()
        },
        timeouts: SessionTimeouts {
            // Agents here may stop reading for a while: keep them.
            write_us: 3_600_000_000,
            ..SessionTimeouts::default()
        },
        ..open_settings(Limits {
            send_queue_envelopes: 64,
            memory_budget: budget as usize,
            ..Limits::default()
        })
    }
}

impl Sim {
    fn new(seed: u64, world: &World) -> Sim {
        let mut rng = Rng::new(seed);
        let cores = 1 + rng.below(3) as usize;
        let budget = 64 << 20;
        let shard_config = world.relay.shard_config();
        let now = Now {
            mono_us: 1_000_000,
            unix_ms: 1_800_000_000_000,
        };
        let plan = recovery::plan(Vec::new(), Vec::new(), plan_config(cores, now.unix_ms));
        let shards = new_shards(&shard_config, cores, budget, plan);
        let behaviors = [
            Behavior::Honest,
            Behavior::Slow,
            Behavior::NeverAcks,
            Behavior::Flooder,
            Behavior::Vanishing,
        ];
        let n = 2 + rng.below(3) as usize;
        let agents = (0..n)
            .map(|i| {
                let identity = world.agents[i].clone();
                Agent {
                    id: identity.agent_id(),
                    identity,
                    behavior: if i == 0 {
                        Behavior::Honest
                    } else {
                        behaviors[rng.below(behaviors.len() as u64) as usize]
                    },
                    next: 1,
                    acked_by_relay: HashSet::default(),
                    outstanding: HashSet::default(),
                    received: HashSet::default(),
                    sent_to: HashMap::default(),
                    durable: HashSet::default(),
                    link: None,
                }
            })
            .collect();
        Sim {
            rng,
            seed,
            now,
            shards,
            mail: (0..cores).map(|_| VecDeque::new()).collect(),
            agents,
            links: Vec::new(),
            client_tls: HashMap::default(),
            ca_cert: world.relay.ca.cert.clone(),
            budget,
            steps: 0,
            sent_by: HashMap::default(),
            shard_config,
            disk: VDisk {
                main: (0..cores).map(|_| None).collect(),
                side: (0..cores).map(|_| None).collect(),
                ..VDisk::default()
            },
            crashes: 0,
        }
    }

    /// Moves the stores along: on a random core, the main or the side operation in flight
    /// completes (or fails, unless `reliable`), or the next one is taken.
    fn store_progress(&mut self, reliable: bool) {
        let core = self.rng.below(self.shards.len() as u64) as usize;
        let side = self.rng.chance(30);
        let slot = if side {
            &mut self.disk.side[core]
        } else {
            &mut self.disk.main[core]
        };
        let Some(op) = slot.take() else {
            let next = if side {
                self.shards[core].poll_store_side(self.now)
            } else {
                self.shards[core].poll_store(self.now)
            };
            let slot = if side {
                &mut self.disk.side[core]
            } else {
                &mut self.disk.main[core]
            };
            *slot = next;
            return;
        };
        let ok = reliable || !self.rng.chance(3);
        let err = (!ok).then(|| std::io::Error::other("simulated disk failure"));
        if ok {
            self.disk.apply(core, &op);
        }
        if side {
            let result = match &err {
                Some(e) => Err(e),
                None => Ok(self.disk.read(core, &op)),
            };
            self.shards[core].on_store_side_done(&op, result, self.now);
        } else {
            self.shards[core].on_store_done(&op, err.as_ref(), self.now);
        }
    }

    /// Runs every store operation until none is due (nothing fails).
    fn store_settle(&mut self) {
        for _ in 0..10_000 {
            let busy = (0..self.shards.len()).any(|c| {
                self.disk.main[c].is_some()
                    || self.disk.side[c].is_some()
                    || !self.shards[c].store_idle()
            });
            if !busy {
                return;
            }
            self.store_progress(true);
            self.drive();
        }
    }

    /// `kill -9`: only what was synced survives (and, maybe, part of a write in flight); the
    /// store is recovered as at a real start and new shards serve it; every agent loses its
    /// session.
    fn crash(&mut self) {
        self.crashes += 1;
        for core in 0..self.shards.len() {
            if let Some(LogAction::Write {
                number,
                offset,
                buf,
            }) = &self.disk.main[core]
            {
                // A torn write: a prefix of it reached the disk.
                let n = self.rng.below(buf.len() as u64 + 1) as usize;
                if let Some(f) = self.disk.synced.get_mut(&(core, *number)) {
                    f[*offset as usize..*offset as usize + n].copy_from_slice(&buf[..n]);
                }
            }
        }
        for core in 0..self.shards.len() {
            for op in [&self.disk.main[core], &self.disk.side[core]] {
                if let Some(LogAction::Create { number, size, .. }) = op {
                    // A creation cut short: the file is there, filled part way, without its
                    // header (written last).
                    if self.rng.below(2) == 0 {
                        let filled = self.rng.below(*size + 1) as usize;
                        self.disk.synced.insert((core, *number), vec![0u8; filled]);
                    }
                }
            }
        }
        let mut scans = Vec::new();
        let mut unfinished = Vec::new();
        for ((c, n), bytes) in &self.disk.synced {
            let id = SegmentId {
                core: *c as u16,
                number: *n,
            };
            match record::scan(Bytes::from(bytes.clone())) {
                Some(scan) => scans.push((id, scan)),
                None => unfinished.push(recovery::Unfinished {
                    id,
                    non_zero: bytes.iter().any(|b| *b != 0),
                }),
            }
        }
        let cores = self.shards.len();
        let plan = recovery::plan(scans, unfinished, plan_config(cores, self.now.unix_ms));
        for id in &plan.write {
            assert!(
                !self
                    .disk
                    .synced
                    .contains_key(&(id.0.core as usize, id.0.number)),
                "seed {}: the start would write segment {}/{} over a file that exists",
                self.seed,
                id.0.core,
                id.0.number
            );
        }
        self.disk.files.clear();
        self.disk.synced.clear();
        for (id, bytes) in &plan.write {
            self.disk
                .files
                .insert((id.core as usize, id.number), bytes.clone());
            self.disk
                .synced
                .insert((id.core as usize, id.number), bytes.clone());
        }
        self.disk.main.iter_mut().for_each(|m| *m = None);
        self.disk.side.iter_mut().for_each(|m| *m = None);
        self.shards = new_shards(&self.shard_config, cores, self.budget, plan);
        self.mail.iter_mut().for_each(VecDeque::clear);
        for l in 0..self.links.len() {
            self.links[l].open = false;
        }
        for a in 0..self.agents.len() {
            self.agents[a].link = None;
            self.agents[a].outstanding.clear();
        }
        // At-least-once envelopes the relay held in memory are gone; durable ones are not.
        let received: Vec<HashSet<MessageId>> =
            self.agents.iter().map(|a| a.received.clone()).collect();
        for a in &mut self.agents {
            let (sent_to, durable) = (&a.sent_to, &a.durable);
            a.acked_by_relay
                .retain(|id| durable.contains(id) || received[sent_to[id]].contains(id));
        }
    }

    fn fail(&self, what: String) -> ! {
        if std::env::var("SIM_DEBUG").is_ok() {
            for (i, l) in self.links.iter().enumerate() {
                eprintln!(
                    "link {i}: agent {} core {} conn {} open {} welcomed {} reading {} to_relay {} writing {} unacked {}",
                    l.agent, l.core, l.conn, l.open, l.welcomed, l.reading, l.to_relay.len(),
                    l.writing.is_some(), l.unacked.len()
                );
                eprintln!("   relay side: {}", self.shards[l.core].describe(l.conn));
            }
            for (i, a) in self.agents.iter().enumerate() {
                eprintln!("agent {i}: {:?} link {:?}", a.behavior, a.link);
            }
            for (i, s) in self.shards.iter().enumerate() {
                eprintln!(
                    "shard {i}: {} connections, {} bytes held, {}",
                    s.connections(),
                    s.memory_used(),
                    s.describe_held()
                );
            }
        }
        panic!(
            "seed {}: {what} (replay with SIM_SEED={})",
            self.seed, self.seed
        );
    }

    fn connect(&mut self, agent: usize) {
        let core = self.rng.below(self.shards.len() as u64) as usize;
        let Some(conn) = self.shards[core].open(self.now) else {
            return;
        };
        let cfg = self
            .client_tls
            .entry(agent)
            .or_insert_with(|| {
                openmesh_dataplane::tls::client_config(
                    &self.agents[agent].identity,
                    std::slice::from_ref(&self.ca_cert),
                )
                .unwrap()
            })
            .clone();
        let tls = ClientConnection::new(cfg, ServerName::try_from("localhost").unwrap()).unwrap();
        self.links.push(Link {
            agent,
            core,
            conn,
            tls,
            to_relay: Vec::new(),
            writing: None,
            writer_woken: false,
            plain: BytesMut::new(),
            dec: FrameDecoder::new(1 << 20),
            welcomed: false,
            hello_sent: false,
            deliver_window: usize::MAX,
            unacked: Vec::new(),
            seen: HashSet::default(),
            last_from: HashMap::default(),
            welcomed_at: u64::MAX,
            open: true,
            reading: true,
        });
        self.agents[agent].link = Some(self.links.len() - 1);
    }

    /// Carries out the shards' actions and moves their outboxes into the mail queues.
    fn drive(&mut self) {
        for core in 0..self.shards.len() {
            self.shards[core].flush_held(self.now);
            while let Some(a) = self.shards[core].poll_action() {
                match a {
                    Action::WakeWriter(c) => {
                        if let Some(l) = self.link_of(core, c) {
                            self.links[l].writer_woken = true;
                        }
                    }
                    // Store operations are taken by `store_progress` at random moments.
                    Action::WakeReader(_)
                    | Action::WakeStore
                    | Action::LinkState(..)
                    | Action::Held => {}
                    Action::Shutdown(c) => {
                        if let Some(l) = self.link_of(core, c) {
                            self.end_link(l);
                        }
                    }
                }
            }
            for (to, q) in self.shards[core].outbox().queues_mut() {
                self.mail[to].extend(q.drain(..));
            }
            self.shards[core].outbox_flushed();
        }
    }

    fn link_of(&self, core: usize, conn: ConnId) -> Option<usize> {
        self.links
            .iter()
            .position(|l| l.open && l.core == core && l.conn == conn)
    }

    /// The connection ends: the relay's reader sees the end, the agent loses its session.
    fn end_link(&mut self, l: usize) {
        if !self.links[l].open {
            return;
        }
        self.links[l].open = false;
        let (core, conn, agent) = (self.links[l].core, self.links[l].conn, self.links[l].agent);
        if self.agents[agent].link == Some(l) {
            self.agents[agent].link = None;
        }
        // Answers the agent never got: it will count them as neither ACKed nor refused.
        self.agents[agent].outstanding.clear();
        self.shards[core].on_read_end(conn, self.now);
    }

    /// The relay reads what the agent wrote (a random part of it).
    fn relay_reads(&mut self, l: usize) {
        let link = &self.links[l];
        if !link.open {
            return;
        }
        let (core, conn) = (link.core, link.conn);
        match self.shards[core].read_gate(conn, self.now) {
            ReadGate::Move(home) => {
                self.move_link(core, conn, home);
                return;
            }
            ReadGate::Go if !self.links[l].to_relay.is_empty() => {}
            _ => return,
        }
        let link = &self.links[l];
        let n = 1 + self.rng.below(link.to_relay.len() as u64) as usize;
        let Some(mut buf) = self.shards[core].take_read_buf(conn) else {
            return;
        };
        let n = n.min(buf.capacity() - buf.len()).max(1);
        let bytes: Vec<u8> = self.links[l].to_relay.drain(..n).collect();
        buf.extend_from_slice(&bytes);
        self.shards[core].on_read(conn, buf, self.now);
    }

    /// The shard hands a session to its agent's home core: it travels as mail.
    fn move_link(&mut self, core: usize, conn: ConnId, home: u16) {
        if let Some(m) = self.shards[core].take_moving(conn) {
            self.mail[home as usize].push_back(CoreMsg::Adopt {
                conn: m,
                socket: None,
            });
        }
    }

    /// The relay's writer runs, and the agent reads what it wrote (if it reads).
    fn relay_writes(&mut self, l: usize) {
        let (core, conn) = (self.links[l].core, self.links[l].conn);
        if !self.links[l].open {
            return;
        }
        if self.links[l].writing.is_none() && self.links[l].writer_woken {
            match self.shards[core].poll_write(conn, self.now) {
                Some(w) => self.links[l].writing = Some(w),
                None => self.links[l].writer_woken = false,
            }
        }
        if !self.links[l].reading {
            return;
        }
        if let Some((buf, n)) = self.links[l].writing.take() {
            let mut data = &buf[..n];
            while !data.is_empty() {
                let link = &mut self.links[l];
                let r = link
                    .tls
                    .read_tls(&mut data)
                    .map_err(|e| e.to_string())
                    .and_then(|_| link.tls.process_new_packets().map_err(|e| e.to_string()));
                if let Err(e) = r {
                    self.fail(format!("agent TLS failed on link {l}: {e}"));
                }
                // Take the plaintext as it comes (the client's buffer is bounded).
                self.agent_reads(l);
            }
            self.shards[core].on_write_done(conn, buf, true, self.now);
        }
    }

    /// The agent handles what it read: WELCOME, envelopes (checked), ACKs and NACKs.
    fn agent_reads(&mut self, l: usize) {
        let mut plain = Vec::new();
        let _ = self.links[l].tls.reader().read_to_end(&mut plain);
        self.links[l].plain.extend_from_slice(&plain);
        let agent = self.links[l].agent;
        loop {
            let link = &mut self.links[l];
            let f = match link.dec.decode(&mut link.plain) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => self.fail(format!("agent got bad frame: {e}")),
            };
            match f {
                Frame::Welcome(w) => {
                    link.welcomed = true;
                    link.welcomed_at = self.steps;
                    link.deliver_window = w.deliver_window as usize;
                }
                Frame::Envelope(e) => {
                    let id = e.message_id();
                    if !link.seen.insert(id) {
                        self.fail(format!("link {l} got {id} twice in one session"));
                    }
                    self.agents[agent].received.insert(id);
                    if let Some(&(src_link, at)) = self.sent_by.get(&id) {
                        let link = &mut self.links[l];
                        if at > link.welcomed_at {
                            let last = link
                                .last_from
                                .entry((src_link, e.class() as u8))
                                .or_insert(0);
                            if id.as_u128() <= *last {
                                self.fail(format!(
                                    "link {l}: {id} from link {src_link} after a later one"
                                ));
                            }
                            *last = id.as_u128();
                        }
                    }
                    let link = &mut self.links[l];
                    link.unacked.push(id);
                    let (held, window) = (link.unacked.len(), link.deliver_window);
                    if held > window {
                        self.fail(format!("link {l} holds {held} unACKed, window {window}"));
                    }
                }
                Frame::Ack(a) => {
                    for id in a.ids() {
                        let ag = &mut self.agents[agent];
                        ag.outstanding.remove(&id);
                        ag.acked_by_relay.insert(id);
                    }
                }
                Frame::Nack(n) => {
                    self.agents[agent].outstanding.remove(&n.message_id);
                    if !n.reason().is_some_and(Reason::retryable) {
                        self.fail(format!("an envelope was refused: {:?}", n.reason()));
                    }
                }
                Frame::Close(_) => {}
                Frame::Ping(p) => {
                    let pong = Frame::Pong(openmesh_dataplane::wire::Pong {
                        echo_us: p.timestamp_us,
                        responder_us: 0,
                    });
                    self.agent_writes(l, &pong.to_bytes());
                }
                _ => {}
            }
        }
    }

    fn agent_writes(&mut self, l: usize, bytes: &[u8]) {
        let link = &mut self.links[l];
        if link.tls.writer().write_all(bytes).is_err() {
            self.fail("agent TLS write failed".into());
        }
        while link.tls.wants_write() {
            let _ = link.tls.write_tls(&mut link.to_relay);
        }
    }

    /// The agent acts: handshake bytes, HELLO, sending, ACKing, by its behavior.
    fn agent_acts(&mut self, l: usize, ending: bool) {
        if !self.links[l].open {
            return;
        }
        let agent = self.links[l].agent;
        {
            let link = &mut self.links[l];
            while link.tls.wants_write() {
                let _ = link.tls.write_tls(&mut link.to_relay);
            }
            if link.tls.is_handshaking() {
                return;
            }
        }
        if !self.links[l].hello_sent {
            self.links[l].hello_sent = true;
            let hello = Frame::Hello(Hello {
                min_version: PROTOCOL_VERSION_MIN,
                max_version: PROTOCOL_VERSION_MAX,
                role: Role::Agent,
                // Half the agents let the relay hold its ACKs to them.
                features: if agent % 2 == 1 {
                    openmesh_dataplane::wire::features::ACK_DELAY
                } else {
                    0
                },
                transports: 1,
                classes: DeliveryClass::AtLeastOnce.bit() | DeliveryClass::Durable.bit(),
                max_frame: 1 << 20,
                heartbeat_ms: 0,
                schemas: vec![],
            });
            self.agent_writes(l, &hello.to_bytes());
            return;
        }
        if !self.links[l].welcomed {
            return;
        }
        let behavior = if ending {
            Behavior::Honest
        } else {
            self.agents[agent].behavior
        };
        // ACK what was received.
        let ack_now = match behavior {
            Behavior::NeverAcks => false,
            Behavior::Slow => self.rng.chance(10),
            _ => true,
        };
        if ack_now && !self.links[l].unacked.is_empty() {
            let ids: Vec<MessageId> = self.links[l].unacked.drain(..).collect();
            for chunk in ids.chunks(100) {
                let ack = Frame::Ack(AckBatch::new(chunk.iter().copied()));
                self.agent_writes(l, &ack.to_bytes());
            }
        }
        if ending {
            return;
        }
        // Send to someone else.
        let burst = match behavior {
            Behavior::Flooder => 1 + self.rng.below(40),
            _ => self.rng.below(3),
        };
        for _ in 0..burst {
            if self.agents[agent].outstanding.len() >= 48 {
                break;
            }
            let to = self.rng.below(self.agents.len() as u64) as usize;
            if to == agent {
                continue;
            }
            let ag = &mut self.agents[agent];
            // Unique over every source: the agent's index above a counter.
            let id = MessageId::from_u128((agent as u128) << 64 | ag.next as u128);
            ag.next += 1;
            ag.sent_to.insert(id, to);
            let mut b = EnvelopeBuilder::new(
                id,
                ag.id,
                Destination::Agent(self.agents[to].id),
                self.now.unix_ms,
                TTL_MS,
            );
            if self.rng.chance(50) {
                b.class = DeliveryClass::Durable;
                self.agents[agent].durable.insert(id);
            }
            let env = b
                .build(&vec![id.as_u128() as u8; 1 + self.rng.below(3000) as usize])
                .unwrap();
            self.agents[agent].outstanding.insert(id);
            self.sent_by.insert(id, (l, self.steps));
            self.agent_writes(l, &Frame::Envelope(env).to_bytes());
        }
    }

    fn deliver_mail(&mut self) {
        let core = self.rng.below(self.mail.len() as u64) as usize;
        let n = 1 + self.rng.below(64);
        for _ in 0..n {
            let Some(m) = self.mail[core].pop_front() else {
                break;
            };
            self.deliver(core, m);
        }
    }

    /// One message to a shard; a moving session is adopted and its link follows it.
    fn deliver(&mut self, core: usize, m: CoreMsg) {
        let CoreMsg::Adopt { conn: moving, .. } = m else {
            self.shards[core].on_message(m, self.now);
            return;
        };
        let (from, old) = moving.origin();
        let id = self.shards[core].adopt(moving, self.now);
        let link = self
            .links
            .iter()
            .position(|l| l.open && l.core == from as usize && l.conn == old);
        match link {
            Some(l) => {
                self.links[l].core = core;
                self.links[l].conn = id;
            }
            // The agent's connection ended while the session moved.
            None => self.shards[core].on_read_end(id, self.now),
        }
    }

    fn check_budget(&self) {
        for (i, s) in self.shards.iter().enumerate() {
            if s.memory_used() > self.budget {
                self.fail(format!(
                    "shard {i} holds {} over budget {}",
                    s.memory_used(),
                    self.budget
                ));
            }
        }
    }

    fn step(&mut self, ending: bool) {
        self.steps += 1;
        if self.rng.chance(20) {
            self.store_progress(ending);
        }
        if !ending && self.crashes < 1 && self.rng.below(1200) == 0 {
            self.crash();
            for a in 0..self.agents.len() {
                self.connect(a);
            }
        }
        // Every schedule connects its agents first, so there is always a link to pick.
        let l = self.rng.below(self.links.len() as u64) as usize;
        match self.rng.below(100) {
            0..=29 => self.relay_reads(l),
            30..=54 => self.relay_writes(l),
            55..=74 => self.agent_acts(l, ending),
            75..=86 => self.deliver_mail(),
            87..=92 => {
                self.now.mono_us += 1 + self.rng.below(200_000);
                self.now.unix_ms = 1_800_000_000_000 + self.now.mono_us / 1000;
                for s in &mut self.shards {
                    s.on_tick(self.now);
                }
            }
            93..=96 if !ending => {
                // A vanishing agent leaves; anyone absent comes back.
                let a = self.rng.below(self.agents.len() as u64) as usize;
                let leaves = self.agents[a].behavior == Behavior::Vanishing || self.rng.chance(8);
                match self.agents[a].link {
                    Some(l) if leaves => self.end_link(l),
                    None => self.connect(a),
                    _ => {}
                }
            }
            _ if !ending => {
                // An agent stops or resumes reading.
                self.links[l].reading = !self.links[l].reading || self.rng.chance(50);
            }
            _ => {}
        }
        self.drive();
        self.check_budget();
    }

    /// Everyone back, reading and ACKing, until the relay is quiet.
    fn settle(&mut self) {
        for a in 0..self.agents.len() {
            if self.agents[a].link.is_none() {
                self.connect(a);
            }
        }
        for l in 0..self.links.len() {
            self.links[l].reading = true;
        }
        for _ in 0..200 {
            for _ in 0..200 {
                self.step(true);
            }
            // Deterministic sweep: everything moves once.
            for l in 0..self.links.len() {
                self.agent_acts(l, true);
                for _ in 0..4 {
                    self.relay_reads_all(l);
                    self.drive();
                }
                self.links[l].writer_woken = true;
                for _ in 0..8 {
                    self.relay_writes(l);
                    self.drive();
                }
            }
            while self.mail.iter().any(|m| !m.is_empty()) {
                for core in 0..self.mail.len() {
                    while let Some(m) = self.mail[core].pop_front() {
                        self.deliver(core, m);
                    }
                }
                self.drive();
            }
            self.store_settle();
            if self.quiet() {
                return;
            }
        }
    }

    fn relay_reads_all(&mut self, l: usize) {
        // Once even with nothing to read: the gate may move the session to its home core.
        self.relay_reads(l);
        while self.links[l].open && !self.links[l].to_relay.is_empty() {
            let before = self.links[l].to_relay.len();
            self.relay_reads(l);
            if self.links[l].to_relay.len() == before {
                break;
            }
        }
    }

    fn quiet(&self) -> bool {
        self.links.iter().filter(|l| l.open).all(|l| {
            l.to_relay.is_empty()
                && l.writing.is_none()
                && !l.writer_woken
                && l.unacked.is_empty()
                && l.welcomed
        }) && self.mail.iter().all(VecDeque::is_empty)
            && self.shards.iter().all(Shard::store_idle)
            && self
                .disk
                .main
                .iter()
                .chain(&self.disk.side)
                .all(Option::is_none)
    }

    fn check_nothing_acked_was_lost(&self) {
        for (i, a) in self.agents.iter().enumerate() {
            for id in &a.acked_by_relay {
                let to = a.sent_to[id];
                if !self.agents[to].received.contains(id) {
                    self.fail(format!(
                        "agent {i}'s {id} to agent {to} was ACKed by the relay and never delivered"
                    ));
                }
            }
        }
    }
}

/// The shards of a relay starting on `cores` cores with what the store plan gives each.
fn new_shards(cfg: &ShardConfig, cores: usize, budget: u64, plan: recovery::Plan) -> Vec<Shard> {
    let relay_budget = RelayBudget::new(budget, cores);
    let seq = Arc::new(SeqSource::default());
    plan.cores
        .into_iter()
        .enumerate()
        .map(|(i, store)| {
            let mut s = Shard::new(
                i as u16,
                cores as u16,
                cfg.clone(),
                settings(budget),
                seq.clone(),
                relay_budget.clone(),
            );
            s.attach_store(store);
            s
        })
        .collect()
}

/// Identities and TLS configurations shared by every schedule (generating them is slow).
struct World {
    relay: InMemoryRelay,
    agents: Vec<Identity>,
}

fn world() -> World {
    World {
        relay: InMemoryRelay::new(),
        // Fixed keys: a seed replays the same agent ids, so the same home cores and map orders.
        agents: (0..4u8)
            .map(|i| Identity::self_signed_from_seed(&format!("agent-{i}"), [i + 1; 32]).unwrap())
            .collect(),
    }
}

/// What one schedule did, so the run can show it exercised something.
#[derive(Default, Debug)]
struct Tally {
    acked: usize,
    delivered: usize,
    reconnects: usize,
    cores_above_one: usize,
    crashes: usize,
    durable_acked: usize,
}

fn run(seed: u64, world: &World) -> Tally {
    openmesh_dataplane::shard::hasher::use_fixed_seeds();
    let mut sim = Sim::new(seed, world);
    for a in 0..sim.agents.len() {
        sim.connect(a);
    }
    let steps = 300 + sim.rng.below(500);
    for _ in 0..steps {
        sim.step(false);
    }
    sim.settle();
    if !sim.quiet() {
        sim.fail("the relay did not settle".into());
    }
    sim.check_nothing_acked_was_lost();
    Tally {
        acked: sim.agents.iter().map(|a| a.acked_by_relay.len()).sum(),
        delivered: sim.agents.iter().map(|a| a.received.len()).sum(),
        reconnects: sim.links.len() - sim.agents.len(),
        cores_above_one: usize::from(sim.shards.len() > 1),
        crashes: sim.crashes,
        durable_acked: sim
            .agents
            .iter()
            .map(|a| a.acked_by_relay.intersection(&a.durable).count())
            .sum(),
    }
}

#[test]
fn random_schedules_keep_every_invariant() {
    let world = world();
    if let Ok(seed) = std::env::var("SIM_SEED") {
        let t = run(seed.parse().expect("SIM_SEED is a number"), &world);
        eprintln!("seed {seed}: {t:?}");
        return;
    }
    let n: u64 = std::env::var("SIM_SCHEDULES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let mut total = Tally::default();
    for seed in 1..=n {
        let t = run(seed, &world);
        total.acked += t.acked;
        total.delivered += t.delivered;
        total.reconnects += t.reconnects;
        total.cores_above_one += t.cores_above_one;
        total.crashes += t.crashes;
        total.durable_acked += t.durable_acked;
    }
    eprintln!("{n} schedules: {total:?}");
    // The schedules did something: envelopes flowed, agents came back, cores talked.
    let n = n as usize;
    assert!(total.acked >= 5 * n, "{total:?}");
    assert!(total.delivered >= 5 * n, "{total:?}");
    assert!(total.reconnects >= n / 4, "{total:?}");
    assert!(total.cores_above_one >= n / 3, "{total:?}");
    assert!(total.crashes >= n / 5, "{total:?}");
    assert!(total.durable_acked >= n, "{total:?}");
}

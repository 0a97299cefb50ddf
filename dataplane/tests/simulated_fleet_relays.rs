//! A fleet of relays (one shard each) wired together in memory: real relay links (TLS between
//! shards, LINK_HELLO, link sequence numbers, PRESENCE), agents speaking real TLS and frames, a
//! virtual clock, and random schedules that pass bytes in random pieces, drop links and dial
//! them again, kill relays (they start again with nothing in memory), and let time pass.
//!
//! After every step:
//! - no agent receives an envelope twice (multipath copies included);
//! - no envelope is delivered after its expiry;
//! - every relay named in a delivered envelope's routing part qualifies for it (its
//!   jurisdiction, trust and the avoid list, under the fleet's snapshot), and the last is the
//!   destination's relay;
//! - a `no_compliant_path` refusal is right: with every link up there is no path.
//!
//! At the end every link comes back and the fleet runs until it is quiet: every envelope a
//! relay ACKed to its source, with time left and a compliant path, was delivered (links that
//! drop lose nothing, nor do relays killed on the path), except what a killed relay held in
//! memory for its own agent or from it.
//!
//! `FLEET_SIM_SCHEDULES=N` runs N schedules (default 100); `FLEET_SIM_SEED=S` replays one. A
//! failure prints the seed that replays it.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::sync::Arc;

use bytes::BytesMut;
use openmesh_dataplane::fleet::file;
use openmesh_dataplane::fleet::path::{AllUp, Constraints, Graph};
use openmesh_dataplane::fleet::snapshot::Snapshot;
use openmesh_dataplane::pki::{CertAuthority, Identity};
use openmesh_dataplane::policy::AdmissionMode;
use openmesh_dataplane::shard::budget::RelayBudget;
use openmesh_dataplane::shard::msg::{ConnId, CoreMsg};
use openmesh_dataplane::shard::{
    Action, Limits, LinkTls, Now, ReadGate, SeqSource, Shard, ShardConfig,
};
use openmesh_dataplane::testing::{hello, open_settings, Rng};
use openmesh_dataplane::wire::{
    AckBatch, AgentId, Destination, Envelope, EnvelopeBuilder, Frame, FrameDecoder, Jurisdiction,
    MessageId, Reason, RelayId,
};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::ClientConnection;

const MAX_RELAYS: usize = 6;
const COUNTRIES: [&str; 3] = ["DE", "FR", "US"];
const TRUSTS: [u8; 3] = [20, 60, 95];

/// What every schedule shares: the fleet CA and one identity per relay and agent.
struct World {
    ca: CertDer,
    relays: Vec<Identity>,
    agents: Vec<Identity>,
    link_tls: Vec<LinkTls>,
    agent_tls: Vec<Arc<rustls::ServerConfig>>,
}

type CertDer = CertificateDer<'static>;

fn world() -> World {
    let ca = CertAuthority::from_seed("simulated fleet CA", [99; 32]).unwrap();
    let relays: Vec<Identity> = (0..MAX_RELAYS)
        .map(|i| {
            // Fixed keys: a seed replays the same relay ids (who dials, map orders).
            ca.issue_fleet_relay_from_seed(
                &format!("r{i}"),
                &["localhost".into()],
                [i as u8 + 101; 32],
            )
            .unwrap()
        })
        .collect();
    let ca_cert = ca.cert.clone();
    let link_tls = relays
        .iter()
        .map(|id| LinkTls {
            server: openmesh_dataplane::tls::link_server_config(id, std::slice::from_ref(&ca_cert))
                .unwrap(),
            client: openmesh_dataplane::tls::link_client_config(id, std::slice::from_ref(&ca_cert))
                .unwrap(),
        })
        .collect();
    let agent_tls = relays
        .iter()
        .map(|id| {
            let mut c = (*openmesh_dataplane::tls::server_config(id, AdmissionMode::Open, &[])
                .unwrap())
            .clone();
            c.enable_secret_extraction = true;
            Arc::new(c)
        })
        .collect();
    World {
        ca: ca_cert,
        relays,
        agents: (0..MAX_RELAYS as u8)
            .map(|i| Identity::self_signed_from_seed(&format!("agent-{i}"), [i + 1; 32]).unwrap())
            .collect(),
        link_tls,
        agent_tls,
    }
}

/// A relay link in memory: the dialling relay's connection and the listening relay's.
struct Wire {
    relays: (usize, usize),
    conns: (ConnId, ConnId),
    /// Bytes written by each side that the other has not read yet.
    to: (Vec<u8>, Vec<u8>),
    woken: (bool, bool),
    open: bool,
}

/// An agent's session with its relay.
struct Session {
    relay: usize,
    conn: ConnId,
    tls: ClientConnection,
    to_relay: Vec<u8>,
    woken: bool,
    plain: BytesMut,
    dec: FrameDecoder,
    welcomed: bool,
    hello_sent: bool,
    unacked: Vec<MessageId>,
}

struct Sent {
    to: usize,
    env: Envelope,
}

struct Sim {
    seed: u64,
    rng: Rng,
    now: Now,
    snap: Arc<Snapshot>,
    shards: Vec<Shard>,
    ids: Vec<RelayId>,
    wires: Vec<Wire>,
    sessions: Vec<Session>,
    agent_ids: Vec<AgentId>,
    /// Per agent: what it sent, by id; what its relay ACKed; what it received.
    sent: Vec<HashMap<MessageId, Sent>>,
    acked: Vec<HashSet<MessageId>>,
    received: Vec<HashSet<MessageId>>,
    next_id: u64,
    /// Per snapshot link (by relay pair): when it may be dialled again.
    redial_at: HashMap<(usize, usize), u64>,
    steps: u64,
    drops: u64,
    /// What a relay is made of, to start it again after a crash.
    shard_cfgs: Vec<ShardConfig>,
    client_cfgs: Vec<Arc<rustls::ClientConfig>>,
    limits: Limits,
    /// Envelopes a crash may have lost: sent by, or to, an agent of a relay that crashed
    /// before they were delivered (at-least-once custody in the memory of the source's or
    /// the destination's relay). Envelopes crossing a crashed relay are not among them.
    exempt: HashSet<MessageId>,
    /// Per agent: envelopes it received before its relay crashed, which may come again.
    may_repeat: Vec<HashSet<MessageId>>,
    crashes: u64,
}

impl Sim {
    fn new(seed: u64, w: &World) -> Sim {
        let mut rng = Rng::new(seed);
        let n = 3 + rng.below((MAX_RELAYS - 2) as u64) as usize;
        let mut text = String::from(
            "generation = 1\n[thresholds]\nat_least_once = 10\n[blocs]\nEU = [\"DE\", \"FR\"]\n",
        );
        for i in 0..n {
            text += &format!(
                "[[relay]]\nname = \"r{i}\"\nid = \"{}\"\nagent = \"127.0.0.1:{}\"\nlink = \"127.0.0.1:{}\"\njurisdiction = \"{}\"\ntrust = {}\n",
                w.relays[i].relay_id().to_hex(),
                7400 + i,
                7500 + i,
                COUNTRIES[rng.below(3) as usize],
                TRUSTS[rng.below(3) as usize]
            );
        }
        // A random tree, then a few more links.
        let mut pairs = HashSet::new();
        for i in 1..n {
            let j = rng.below(i as u64) as usize;
            pairs.insert((j, i));
        }
        for _ in 0..rng.below(n as u64 + 1) {
            let (a, b) = (rng.below(n as u64) as usize, rng.below(n as u64) as usize);
            if a != b {
                pairs.insert((a.min(b), a.max(b)));
            }
        }
        let mut pairs: Vec<_> = pairs.into_iter().collect();
        pairs.sort();
        for (a, b) in &pairs {
            text += &format!(
                "[[link]]\nbetween = [\"r{a}\", \"r{b}\"]\nlatency_ms = {}\n",
                1 + rng.below(9)
            );
        }
        let snap = Arc::new(file::parse(&text).unwrap());
        let now = Now {
            mono_us: 1_000_000,
            unix_ms: 1_700_000_000_000,
        };
        let limits = Limits {
            memory_budget: 256 << 20,
            ..Limits::default()
        };
        let shard_cfgs: Vec<ShardConfig> = (0..n)
            .map(|i| ShardConfig {
                tls: w.agent_tls[i].clone(),
                relay_id: w.relays[i].relay_id(),
                link: Some(w.link_tls[i].clone()),
                agents: std::sync::Arc::new(openmesh_dataplane::directory::AgentDirectory::new(
                    1 << 20,
                    3600,
                )),
            })
            .collect();
        let shards = (0..n)
            .map(|i| new_shard(&shard_cfgs[i], &limits, &snap, now))
            .collect();
        let client_cfgs = (0..n)
            .map(|i| {
                openmesh_dataplane::tls::client_config(&w.agents[i], std::slice::from_ref(&w.ca))
                    .unwrap()
            })
            .collect();
        let mut sim = Sim {
            seed,
            rng,
            now,
            snap,
            shards,
            ids: w.relays[..n].iter().map(Identity::relay_id).collect(),
            wires: Vec::new(),
            sessions: Vec::new(),
            agent_ids: w.agents[..n].iter().map(Identity::agent_id).collect(),
            sent: (0..n).map(|_| HashMap::new()).collect(),
            acked: (0..n).map(|_| HashSet::new()).collect(),
            received: (0..n).map(|_| HashSet::new()).collect(),
            next_id: 1,
            redial_at: HashMap::new(),
            steps: 0,
            drops: 0,
            shard_cfgs,
            client_cfgs,
            limits,
            exempt: HashSet::new(),
            may_repeat: (0..n).map(|_| HashSet::new()).collect(),
            crashes: 0,
        };
        for i in 0..n {
            let s = sim.session(i);
            sim.sessions.push(s);
        }
        sim
    }

    /// A new session of agent `i` with its relay.
    fn session(&mut self, i: usize) -> Session {
        let conn = self.shards[i].open(self.now).unwrap();
        Session {
            relay: i,
            conn,
            tls: ClientConnection::new(
                self.client_cfgs[i].clone(),
                ServerName::try_from("localhost").unwrap(),
            )
            .unwrap(),
            to_relay: Vec::new(),
            woken: false,
            plain: BytesMut::new(),
            dec: FrameDecoder::new(1 << 20),
            welcomed: false,
            hello_sent: false,
            unacked: Vec::new(),
        }
    }

    /// Relay `r` dies (kill -9) and starts again with nothing in memory: its links drop (the
    /// relays at their other ends see them end), its agent connects again.
    fn crash(&mut self, r: usize) {
        self.crashes += 1;
        for i in 0..self.wires.len() {
            let w = &self.wires[i];
            if !w.open || (w.relays.0 != r && w.relays.1 != r) {
                continue;
            }
            self.wires[i].open = false;
            let w = &self.wires[i];
            let (other, conn) = if w.relays.0 == r {
                (w.relays.1, w.conns.1)
            } else {
                (w.relays.0, w.conns.0)
            };
            let pair = w.relays;
            self.shards[other].on_read_end(conn, self.now);
            self.redial_at.insert(pair, self.now.mono_us + 50_000);
        }
        self.wires.retain(|w| w.open);
        // What its memory held for its own agent, or from it, may be gone.
        for (id, s) in &self.sent[r] {
            if !self.received[s.to].contains(id) {
                self.exempt.insert(*id);
            }
        }
        for a in 0..self.sent.len() {
            for (id, s) in &self.sent[a] {
                if s.to == r && !self.received[r].contains(id) {
                    self.exempt.insert(*id);
                }
            }
        }
        self.may_repeat[r].extend(self.received[r].iter().copied());
        self.shards[r] = new_shard(&self.shard_cfgs[r], &self.limits, &self.snap, self.now);
        let s = self.session(r);
        self.sessions[r] = s;
    }

    fn fail(&self, what: String) -> ! {
        for (i, s) in self.shards.iter().enumerate() {
            eprintln!("r{i}: {}; {}", s.describe_held(), s.describe_mesh());
        }
        for w in &self.wires {
            eprintln!(
                "wire {:?} {:?} pending {} / {} woken {:?}",
                w.relays,
                w.conns,
                w.to.0.len(),
                w.to.1.len(),
                w.woken
            );
        }
        panic!(
            "seed {} step {}: {what}\n(replay: FLEET_SIM_SEED={} cargo test -p openmesh-dataplane --test simulated_fleet_relays)",
            self.seed, self.steps, self.seed
        );
    }

    /// The shard of the snapshot's relay `i` (the file parser orders relays its own way).
    fn shard_of(&self, i: usize) -> usize {
        let id = self.snap.relays[i].id;
        self.ids.iter().position(|x| *x == id).unwrap()
    }

    /// The snapshot's index of shard `s`.
    fn snap_of(&self, s: usize) -> usize {
        self.snap.index(&self.ids[s]).unwrap()
    }

    /// Dials every snapshot link that is down and due.
    fn dial(&mut self) {
        let pairs: Vec<(usize, usize)> = self
            .snap
            .links
            .iter()
            .map(|l| {
                // Snapshot indices to shard (and agent) indices.
                let (a, b) = (self.shard_of(l.a), self.shard_of(l.b));
                // The relay with the smaller id dials.
                if self.ids[a].0 < self.ids[b].0 {
                    (a, b)
                } else {
                    (b, a)
                }
            })
            .collect();
        for (a, b) in pairs {
            let up = self
                .wires
                .iter()
                .any(|w| w.open && (w.relays == (a, b) || w.relays == (b, a)));
            if up
                || self
                    .redial_at
                    .get(&(a, b))
                    .is_some_and(|t| *t > self.now.mono_us)
            {
                continue;
            }
            let Some(ca) = self.shards[a].open_dialled(self.ids[b], self.now) else {
                continue;
            };
            let Some(cb) = self.shards[b].open_link(self.now) else {
                self.shards[a].on_read_end(ca, self.now);
                continue;
            };
            self.wires.push(Wire {
                relays: (a, b),
                conns: (ca, cb),
                to: (Vec::new(), Vec::new()),
                woken: (false, false),
                open: true,
            });
        }
    }

    /// Carries out every shard's actions (one core each: nothing goes between cores).
    fn drive(&mut self) {
        for r in 0..self.shards.len() {
            self.shards[r].flush_held(self.now);
            while let Some(a) = self.shards[r].poll_action() {
                match a {
                    Action::WakeWriter(c) => self.wake(r, c),
                    Action::Shutdown(c) => self.shut(r, c),
                    Action::WakeReader(_)
                    | Action::WakeStore
                    | Action::LinkState(..)
                    | Action::Held => {}
                }
            }
            let mail: Vec<CoreMsg> = self.shards[r]
                .outbox()
                .queues_mut()
                .flat_map(|(_, q)| q.drain(..).collect::<Vec<_>>())
                .collect();
            self.shards[r].outbox_flushed();
            for m in mail {
                self.shards[r].on_message(m, self.now);
            }
        }
    }

    fn wake(&mut self, r: usize, c: ConnId) {
        for w in self.wires.iter_mut().filter(|w| w.open) {
            if (w.relays.0, w.conns.0) == (r, c) {
                w.woken.0 = true;
            } else if (w.relays.1, w.conns.1) == (r, c) {
                w.woken.1 = true;
            }
        }
        for s in &mut self.sessions {
            if (s.relay, s.conn) == (r, c) {
                s.woken = true;
            }
        }
    }

    /// A connection is shut down: both ends see the end of the stream.
    fn shut(&mut self, r: usize, c: ConnId) {
        let hit = self.wires.iter().position(|w| {
            w.open && ((w.relays.0, w.conns.0) == (r, c) || (w.relays.1, w.conns.1) == (r, c))
        });
        if let Some(i) = hit {
            self.drop_wire(i);
        }
        if self.sessions.iter().any(|s| (s.relay, s.conn) == (r, c)) {
            self.fail(format!("relay {r} shut an agent's session down"));
        }
    }

    fn drop_wire(&mut self, i: usize) {
        if !self.wires[i].open {
            return;
        }
        self.wires[i].open = false;
        let w = &self.wires[i];
        let ((a, b), (ca, cb)) = (w.relays, w.conns);
        let now = self.now;
        self.shards[a].on_read_end(ca, now);
        self.shards[b].on_read_end(cb, now);
        let back = now.mono_us + 1000 * (1 + self.rng.below(500));
        self.redial_at.insert((a, b), back);
        self.drops += 1;
    }

    /// One side of a wire writes (if woken) and the other reads a random part of what is there.
    fn pump_wire(&mut self, i: usize, forward: bool, all: bool) {
        let w = &self.wires[i];
        if !w.open {
            return;
        }
        let ((from, to), (cf, ct), woken) = if forward {
            (w.relays, w.conns, w.woken.0)
        } else {
            ((w.relays.1, w.relays.0), (w.conns.1, w.conns.0), w.woken.1)
        };
        if woken {
            match self.shards[from].poll_write(cf, self.now) {
                Some((buf, n)) => {
                    let w = &mut self.wires[i];
                    let q = if forward { &mut w.to.0 } else { &mut w.to.1 };
                    q.extend_from_slice(&buf[..n]);
                    self.shards[from].on_write_done(cf, buf, true, self.now);
                }
                None => {
                    let w = &mut self.wires[i];
                    if forward {
                        w.woken.0 = false;
                    } else {
                        w.woken.1 = false;
                    }
                }
            }
        }
        let pending = if forward {
            self.wires[i].to.0.len()
        } else {
            self.wires[i].to.1.len()
        };
        if pending == 0 || self.shards[to].read_gate(ct, self.now) != ReadGate::Go {
            return;
        }
        let Some(mut buf) = self.shards[to].take_read_buf(ct) else {
            return;
        };
        let n = if all {
            pending
        } else {
            1 + self.rng.below(pending as u64) as usize
        };
        let n = n.min(buf.capacity() - buf.len()).max(1);
        if std::env::var("FLEET_SIM_TRACE").is_ok() {
            eprintln!(
                "T {} wire {:?} fwd {forward} pending {pending} n {n}",
                self.steps, self.wires[i].relays
            );
        }
        let w = &mut self.wires[i];
        let q = if forward { &mut w.to.0 } else { &mut w.to.1 };
        let bytes: Vec<u8> = q.drain(..n.min(q.len())).collect();
        buf.extend_from_slice(&bytes);
        self.shards[to].on_read(ct, buf, self.now);
    }

    /// The agent on relay `a` acts: handshake, HELLO, sends, ACKs; the relay reads and writes.
    fn agent_step(&mut self, a: usize, send: bool) {
        // Relay reads what the agent wrote.
        let (r, c) = (self.sessions[a].relay, self.sessions[a].conn);
        if !self.sessions[a].to_relay.is_empty()
            && self.shards[r].read_gate(c, self.now) == ReadGate::Go
        {
            if let Some(mut buf) = self.shards[r].take_read_buf(c) {
                let s = &mut self.sessions[a];
                let n = s.to_relay.len().min(buf.capacity() - buf.len()).max(1);
                let bytes: Vec<u8> = s.to_relay.drain(..n.min(s.to_relay.len())).collect();
                buf.extend_from_slice(&bytes);
                self.shards[r].on_read(c, buf, self.now);
                self.drive();
            }
        }
        // Relay writes; the agent reads it at once.
        while self.sessions[a].woken {
            match self.shards[r].poll_write(c, self.now) {
                Some((buf, n)) => {
                    let mut data = &buf[..n];
                    while !data.is_empty() {
                        let s = &mut self.sessions[a];
                        if s.tls.read_tls(&mut data).is_err()
                            || s.tls.process_new_packets().is_err()
                        {
                            self.fail(format!("agent {a}: TLS failed"));
                        }
                        self.agent_reads(a);
                    }
                    self.shards[r].on_write_done(c, buf, true, self.now);
                    self.drive();
                }
                None => self.sessions[a].woken = false,
            }
        }
        let s = &mut self.sessions[a];
        if !s.tls.is_handshaking() && !s.hello_sent {
            s.hello_sent = true;
            self.agent_writes(a, &hello().to_bytes());
        }
        let s = &mut self.sessions[a];
        if !s.unacked.is_empty() {
            let ids = std::mem::take(&mut s.unacked);
            self.agent_writes(a, &Frame::Ack(AckBatch::new(ids)).to_bytes());
        }
        if send && self.sessions[a].welcomed {
            for _ in 0..1 + self.rng.below(4) {
                self.send_one(a);
            }
        }
        let s = &mut self.sessions[a];
        while s.tls.wants_write() {
            let _ = s.tls.write_tls(&mut s.to_relay);
        }
    }

    fn agent_writes(&mut self, a: usize, bytes: &[u8]) {
        let s = &mut self.sessions[a];
        if s.tls.writer().write_all(bytes).is_err() {
            self.fail(format!("agent {a}: TLS write failed"));
        }
        while s.tls.wants_write() {
            let _ = s.tls.write_tls(&mut s.to_relay);
        }
    }

    /// An envelope to another agent, with random constraints and lifetime.
    fn send_one(&mut self, a: usize) {
        let n = self.agent_ids.len();
        let to = (a + 1 + self.rng.below(n as u64 - 1) as usize) % n;
        let id = MessageId::from_u128(((a as u128 + 1) << 64) | u128::from(self.next_id));
        self.next_id += 1;
        let ttl = if self.rng.chance(10) {
            50 + self.rng.below(2000)
        } else {
            3_600_000
        };
        let mut b = EnvelopeBuilder::new(
            id,
            self.agent_ids[a],
            Destination::Agent(self.agent_ids[to]),
            self.now.unix_ms,
            ttl,
        );
        let c = &mut b.constraints;
        if self.rng.chance(30) {
            c.jurisdictions = vec![Jurisdiction::parse("EU").unwrap()];
        }
        if self.rng.chance(30) {
            c.min_trust = 50;
        }
        if self.rng.chance(20) {
            c.avoid = vec![self.ids[self.rng.below(self.ids.len() as u64) as usize]];
        }
        if self.rng.chance(20) {
            c.multipath_k = 2;
        }
        let env = b.build(&id.0).unwrap();
        self.agent_writes(a, &Frame::Envelope(env.clone()).to_bytes());
        self.sent[a].insert(id, Sent { to, env });
    }

    /// The agent handles what it read.
    fn agent_reads(&mut self, a: usize) {
        let mut plain = Vec::new();
        let _ = self.sessions[a].tls.reader().read_to_end(&mut plain);
        self.sessions[a].plain.extend_from_slice(&plain);
        loop {
            let s = &mut self.sessions[a];
            let f = match s.dec.decode(&mut s.plain) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => self.fail(format!("agent {a} got a bad frame: {e}")),
            };
            match f {
                Frame::Welcome(_) => s.welcomed = true,
                Frame::Envelope(e) => self.delivered(a, e),
                Frame::Ack(ids) => {
                    for id in ids.ids() {
                        self.acked[a].insert(id);
                    }
                }
                Frame::Nack(nk) => self.refused(a, nk.message_id, nk.reason()),
                Frame::Ping(p) => {
                    let pong = Frame::Pong(openmesh_dataplane::wire::Pong {
                        echo_us: p.timestamp_us,
                        responder_us: 0,
                    });
                    self.agent_writes(a, &pong.to_bytes());
                }
                Frame::Close(c) => self.fail(format!("agent {a}'s session closed: {c:?}")),
                _ => {}
            }
        }
    }

    /// The invariants on a delivered envelope.
    fn delivered(&mut self, a: usize, e: Envelope) {
        let id = e.message_id();
        if !self.received[a].insert(id) && !self.may_repeat[a].contains(&id) {
            self.fail(format!("agent {a} got {id} twice"));
        }
        if e.expires_ms() <= self.now.unix_ms {
            self.fail(format!(
                "{id} delivered {} ms after its expiry",
                self.now.unix_ms - e.expires_ms()
            ));
        }
        let c = Constraints::of(&e);
        let g = Graph::new(&self.snap);
        let path: Vec<RelayId> = e.routing.relays().collect();
        for r in &path {
            let i = self.snap.index(r).unwrap();
            if !g.allowed(i, &c) {
                self.fail(format!(
                    "{id} crossed r{i}, which its constraints exclude ({c:?})"
                ));
            }
        }
        if !path.is_empty() && path.last() != Some(&self.ids[a]) {
            self.fail(format!(
                "{id}'s path does not end at its destination's relay"
            ));
        }
        self.sessions[a].unacked.push(id);
    }

    /// The invariants on a refusal.
    fn refused(&mut self, a: usize, id: MessageId, r: Option<Reason>) {
        let Some(sent) = self.sent[a].get(&id) else {
            self.fail(format!("a NACK for {id}, never sent"));
        };
        match r {
            Some(Reason::NoCompliantPath) => {
                let c = Constraints::of(&sent.env);
                let g = Graph::new(&self.snap);
                let (from, to) = (self.snap_of(a), self.snap_of(sent.to));
                if g.route(&AllUp(&self.snap), from, to, &c).is_ok() {
                    self.fail(format!("{id} refused no_compliant_path, but a path exists"));
                }
            }
            Some(Reason::Expired) if sent.env.expires_ms() <= self.now.unix_ms => {}
            Some(r) if r.retryable() => {}
            other => self.fail(format!("{id} refused: {other:?}")),
        }
        self.sent[a].remove(&id);
    }

    fn tick(&mut self, ms: u64) {
        self.now.mono_us += ms * 1000;
        self.now.unix_ms += ms;
        for s in &mut self.shards {
            s.on_tick(self.now);
        }
        self.drive();
    }

    fn step(&mut self, healing: bool) {
        self.steps += 1;
        self.dial();
        self.drive();
        match self.rng.below(100) {
            0..=39 => {
                if !self.wires.is_empty() {
                    let i = self.rng.below(self.wires.len() as u64) as usize;
                    let fwd = self.rng.chance(50);
                    self.pump_wire(i, fwd, false);
                }
            }
            40..=64 => {
                let a = self.rng.below(self.sessions.len() as u64) as usize;
                let send = !healing && self.rng.chance(40);
                self.agent_step(a, send);
            }
            68 if !healing && self.rng.chance(8) => {
                let r = self.rng.below(self.shards.len() as u64) as usize;
                self.crash(r);
            }
            65..=67 if !healing => {
                let open: Vec<usize> = (0..self.wires.len())
                    .filter(|i| self.wires[*i].open)
                    .collect();
                if !open.is_empty() {
                    let i = open[self.rng.below(open.len() as u64) as usize];
                    self.drop_wire(i);
                }
            }
            _ => {
                let ms = 1 + self.rng.below(if healing { 20 } else { 60 });
                self.tick(ms);
            }
        }
        self.drive();
        self.wires.retain(|w| w.open);
    }

    /// Every link comes back and every byte flows at once, 10 ms a round, until nothing moves
    /// (or 30 virtual seconds passed).
    fn heal(&mut self) {
        self.redial_at.clear();
        for _ in 0..3000 {
            self.steps += 1;
            self.dial();
            self.drive();
            for i in 0..self.wires.len() {
                for _ in 0..50 {
                    let before = (
                        self.wires[i].to.0.len(),
                        self.wires[i].to.1.len(),
                        self.wires[i].woken,
                    );
                    self.pump_wire(i, true, true);
                    self.drive();
                    self.pump_wire(i, false, true);
                    self.drive();
                    let after = (
                        self.wires[i].to.0.len(),
                        self.wires[i].to.1.len(),
                        self.wires[i].woken,
                    );
                    if before == after || !self.wires[i].open {
                        break;
                    }
                }
            }
            for a in 0..self.sessions.len() {
                self.agent_step(a, false);
            }
            self.wires.retain(|w| w.open);
            if self.quiet() {
                return;
            }
            self.tick(10);
        }
    }

    fn quiet(&self) -> bool {
        self.wires
            .iter()
            .all(|w| w.to.0.is_empty() && w.to.1.is_empty() && !w.woken.0 && !w.woken.1)
            && self
                .sessions
                .iter()
                .all(|s| s.to_relay.is_empty() && !s.woken && s.unacked.is_empty())
            && self.shards.iter().all(|s| s.fleet_waiting() == 0)
            && self.wires.len() == self.snap.links.len()
    }

    /// Every envelope ACKed with time left was delivered.
    fn check_nothing_acked_was_lost(&self) {
        for a in 0..self.sent.len() {
            let mut acked: Vec<&MessageId> = self.acked[a].iter().collect();
            acked.sort();
            for id in acked {
                let Some(s) = self.sent[a].get(id) else {
                    continue;
                };
                if s.env.expires_ms() > self.now.unix_ms
                    && !self.received[s.to].contains(id)
                    && !self.exempt.contains(id)
                {
                    let c = Constraints::of(&s.env);
                    let path = Graph::new(&self.snap).route(
                        &AllUp(&self.snap),
                        self.snap_of(a),
                        self.snap_of(s.to),
                        &c,
                    );
                    // ACKed before its relay knew where the destination is, and no compliant
                    // path leads there: it stays kept on its source's relay (for the agent, or
                    // its expiry).
                    if path.is_err() {
                        continue;
                    }
                    self.fail(format!(
                        "{id} from agent {a} to agent {} was ACKed and never delivered ({c:?}; with every link up: {path:?})",
                        s.to
                    ));
                }
            }
        }
    }
}

fn new_shard(cfg: &ShardConfig, limits: &Limits, snap: &Arc<Snapshot>, now: Now) -> Shard {
    let mut settings = open_settings(limits.clone());
    // Keys rotate every few virtual seconds: links and sessions carry KeyUpdates mid-stream.
    settings.contract.key_rotation_s = 3;
    let mut s = Shard::new(
        0,
        1,
        cfg.clone(),
        settings,
        Arc::new(SeqSource::default()),
        RelayBudget::new(256 << 20, 1),
    );
    s.on_message(CoreMsg::Fleet(snap.clone()), now);
    s
}

#[derive(Default, Debug)]
struct Tally {
    acked: usize,
    delivered: usize,
    drops: u64,
    relays: usize,
    crashes: u64,
}

fn run(seed: u64, w: &World) -> Tally {
    openmesh_dataplane::shard::hasher::use_fixed_seeds();
    let mut sim = Sim::new(seed, w);
    let steps = 1500 + sim.rng.below(1500);
    for _ in 0..steps {
        sim.step(false);
    }
    // Heal: links come back, nothing new is sent, time passes until the fleet is quiet.
    sim.heal();
    sim.check_nothing_acked_was_lost();
    Tally {
        acked: sim.acked.iter().map(HashSet::len).sum(),
        delivered: sim.received.iter().map(HashSet::len).sum(),
        drops: sim.drops,
        relays: sim.shards.len(),
        crashes: sim.crashes,
    }
}

#[test]
fn random_fleet_schedules_keep_every_invariant() {
    let w = world();
    if std::env::var("FLEET_SIM_TRACE").is_ok() {
        let _ = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .try_init();
    }
    if let Ok(seed) = std::env::var("FLEET_SIM_SEED") {
        let t = run(seed.parse().expect("FLEET_SIM_SEED is a number"), &w);
        eprintln!("seed {seed}: {t:?}");
        return;
    }
    let n: u64 = std::env::var("FLEET_SIM_SCHEDULES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let mut total = Tally::default();
    for seed in 1..=n {
        let t = run(seed, &w);
        total.acked += t.acked;
        total.delivered += t.delivered;
        total.drops += t.drops;
        total.relays += t.relays;
        total.crashes += t.crashes;
    }
    eprintln!("{n} schedules: {total:?}");
    // The schedules did something: envelopes crossed relays, links dropped.
    let n = n as usize;
    assert!(total.acked >= 20 * n, "{total:?}");
    assert!(total.delivered >= 20 * n, "{total:?}");
    assert!(total.drops >= n as u64, "{total:?}");
    assert!(total.crashes >= n as u64 / 4, "{total:?}");
}

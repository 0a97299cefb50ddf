//! One dataplane core: its runtime, listener, connections, directory copy, custody store and
//! mailbox. Everything here runs on the core's own thread; `Rc` and `RefCell` are enough because
//! nothing is shared with other threads except through the mailboxes.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::conn::{Conn, ConnState, CLOSE_LINGER_US};
use super::inflight::Settled;
use super::mailbox::{ConnId, CoreMsg, Outbox};
use super::uring::{self, Listener, Stream};
use super::{now_us, unix_ms, EngineConfig, Shared};
use crate::metrics::CoreMetrics;
use crate::pki::ed25519_key_of;
use crate::policy::{check_ingress, TokenBucket};
use crate::routing::{Attach, Directory, Location, Route};
use crate::session::{Admit, Due, Session, SessionState};
use crate::signaling::negotiate;
use crate::wire::{
    AgentId, DeliveryClass, Destination, Envelope, Frame, GoingAway, MessageId, Pong, Reason,
};

/// How long a settled draining session must have been quiet before it is closed.
const DRAIN_QUIET_US: u64 = 250_000;
/// How often custody for disconnected agents is swept for expired envelopes.
const CUSTODY_SWEEP_US: u64 = 1_000_000;
/// First size of a connection's read buffer.
const INITIAL_READ_BUFFER: usize = 4096;
/// Outbox backlog towards one core above which readers stop reading.
const OUTBOX_HIGH: usize = 16_384;

pub(crate) struct Core {
    id: u16,
    ncores: u16,
    cfg: Arc<EngineConfig>,
    shared: Arc<Shared>,
    m: CoreMetrics,
    conns: RefCell<HashMap<ConnId, Rc<Conn>, foldhash::fast::RandomState>>,
    by_agent: RefCell<HashMap<AgentId, ConnId, foldhash::fast::RandomState>>,
    directory: RefCell<Directory>,
    /// Unacknowledged at-least-once envelopes of agents that disconnected, for redelivery.
    custody: RefCell<HashMap<AgentId, VecDeque<Envelope>>>,
    outbox: RefCell<Outbox>,
    draining: Cell<bool>,
    drain_reported: Cell<bool>,
    /// When custody was last swept for expired envelopes.
    custody_swept_us: Cell<u64>,
    /// Envelopes handed to other cores since the last outbox flush (counted per flush).
    handed_off: Cell<u64>,
    next_conn: Cell<ConnId>,
    listener: Listener,
    /// Live settings, replaced on `Reconfigure`.
    settings: RefCell<Arc<super::Settings>>,
}

/// Runs core `id` until it receives `Exit`.
pub(crate) fn run(
    id: u16,
    ncores: u16,
    cfg: Arc<EngineConfig>,
    shared: Arc<Shared>,
    listener: std::net::TcpListener,
) {
    uring::run(4096, async move {
        let core = Rc::new(Core {
            id,
            ncores,
            m: CoreMetrics::new(id),
            conns: RefCell::new(HashMap::default()),
            by_agent: RefCell::new(HashMap::default()),
            directory: RefCell::new(Directory::new()),
            custody: RefCell::new(HashMap::new()),
            outbox: RefCell::new(Outbox::new(ncores as usize)),
            draining: Cell::new(false),
            drain_reported: Cell::new(false),
            handed_off: Cell::new(0),
            custody_swept_us: Cell::new(0),
            next_conn: Cell::new(1),
            listener: Listener::from_std(listener),
            settings: RefCell::new(Arc::new(cfg.settings.clone())),
            cfg,
            shared,
        });
        uring::spawn(accept_loop(core.clone()));
        uring::spawn(tick_loop(core.clone()));
        tracing::debug!(core = id, "core running");
        core.mailbox_loop().await;
    });
}

async fn accept_loop(core: Rc<Core>) {
    loop {
        let accepted = core.listener.accept().await;
        if core.draining.get() {
            return;
        }
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(core = core.id, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        core.m.connections_accepted.increment(1);
        if core.conns.borrow().len() >= core.settings().limits.max_connections_per_core {
            core.m.handshake_failed(Reason::TooManyConnections);
            tracing::info!(core = core.id, %peer, "connection refused: too many connections");
            stream.shutdown();
            continue;
        }
        core.clone().open(stream);
    }
}

async fn tick_loop(core: Rc<Core>) {
    let tick = Duration::from_millis(core.cfg.tick_ms.max(1));
    loop {
        tokio::time::sleep(tick).await;
        core.sweep();
    }
}

async fn reader(core: Rc<Core>, conn: Rc<Conn>) {
    // Idle agents cost little: the read buffer starts small and doubles (up to
    // `limits.read_buffer`) whenever a read fills it.
    let max = core.settings().limits.read_buffer;
    let mut buf = Vec::with_capacity(INITIAL_READ_BUFFER.min(max));
    loop {
        let wait = conn.st.borrow_mut().throttle_wait(now_us(), &core.m);
        if wait > 0 {
            tokio::time::sleep(Duration::from_micros(wait)).await;
        }
        while core.outbox.borrow().max_pending() > OUTBOX_HIGH && !conn.st.borrow().finished {
            core.flush_outbox();
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        // The send window: stop reading while too many envelopes await another core's verdict.
        while conn.st.borrow().send_window_full() {
            core.m.throttled_send_window.increment(1);
            core.flush_outbox();
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let (res, b) = conn.stream.read(buf).await;
        buf = b;
        let n = match res {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if conn.st.borrow().finished {
            break;
        }
        core.on_bytes(&conn, &buf[..n]);
        core.flush_outbox();
        if n == buf.capacity() && n < max {
            buf.reserve_exact((n * 2).min(max) - buf.len());
        }
    }
    core.teardown(&conn);
}

async fn writer(core: Rc<Core>, conn: Rc<Conn>) {
    let mut out = Vec::new();
    loop {
        conn.wake.notified().await;
        loop {
            {
                let mut st = conn.st.borrow_mut();
                if st.finished {
                    return;
                }
                st.fill(&mut out, &core.m);
                if out.is_empty() {
                    st.writer_idle = true;
                }
            }
            if out.is_empty() {
                break;
            }
            conn.st.borrow_mut().write_since_us = now_us();
            let (res, b) = conn.stream.write_all(out).await;
            conn.st.borrow_mut().write_since_us = 0;
            out = b;
            out.clear();
            if res.is_err() {
                conn.stream.shutdown();
                return;
            }
        }
        let st = conn.st.borrow();
        if st.closing && st.ctrl.is_empty() && !st.tls.wants_write() {
            conn.stream.shutdown();
            return;
        }
    }
}

impl Core {
    fn open(self: Rc<Self>, stream: Stream) {
        let tls = match rustls::ServerConnection::new(self.cfg.tls.clone()) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "cannot create TLS session");
                stream.shutdown();
                return;
            }
        };
        let mut tls = tls;
        tls.set_buffer_limit(None);
        let st = ConnState::new(
            tls,
            Session::new(now_us(), self.settings().timeouts),
            self.settings().contract.max_frame as usize,
        );
        let id = self.next_conn.get();
        self.next_conn.set(id + 1);
        let conn = Conn::new(id, stream, st);
        self.conns.borrow_mut().insert(id, conn.clone());
        uring::spawn(writer(self.clone(), conn.clone()));
        uring::spawn(reader(self, conn));
    }

    /// Handles bytes read from a connection's socket.
    fn on_bytes(&self, conn: &Rc<Conn>, data: &[u8]) {
        let mut st = conn.st.borrow_mut();
        if st.closing {
            return;
        }
        let was_handshaking = st.tls.is_handshaking();
        if let Err(e) = st.read_tls(data) {
            tracing::info!(conn = conn.id, error = %e, "TLS failure");
            st.closing = true;
            st.closing_since_us = now_us();
            st.session.close(Reason::ProtocolError);
            self.m.handshake_failed(Reason::ProtocolError);
            conn.wake.notify_one();
            return;
        }
        if was_handshaking && !st.tls.is_handshaking() {
            let key = st
                .tls
                .peer_certificates()
                .and_then(|c| c.first())
                .map(ed25519_key_of);
            match key {
                Some(Ok(k)) => st.agent = Some(AgentId(k)),
                _ => {
                    conn.close(&mut st, Reason::NotAdmitted, &self.m);
                    return;
                }
            }
        }
        if st.tls.wants_write() {
            conn.wake.notify_one();
        }
        let now = now_us();
        let now_ms = unix_ms();
        // Counted per read, not per envelope: one atomic add per class and batch.
        let (mut n_env, mut n_bytes) = ([0u64; 3], [0u64; 3]);
        // Every frame, and every byte of it, is charged to the rate buckets.
        let (mut frames, mut frame_bytes) = (0u64, 0u64);
        loop {
            let decoder = st.decoder;
            let before = st.rx.len();
            let frame = match decoder.decode(&mut st.rx) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    tracing::info!(conn = conn.id, error = %e, "undecodable frame");
                    conn.close(&mut st, Reason::from(&e), &self.m);
                    break;
                }
            };
            frames += 1;
            frame_bytes += (before - st.rx.len()) as u64;
            match st.session.on_frame(&frame, now) {
                Admit::Close(r) => {
                    conn.close(&mut st, r, &self.m);
                    break;
                }
                Admit::Nack(r) => {
                    if let Frame::Envelope(e) = &frame {
                        st.nack(e.message_id(), r, &self.m);
                    }
                    continue;
                }
                Admit::Accept => {}
            }
            match frame {
                Frame::Hello(h) => self.on_hello(conn, &mut st, &h, now),
                Frame::Envelope(env) => {
                    let Some(contract) = st.contract.as_ref() else {
                        continue;
                    };
                    if let Err(r) = check_ingress(&env, contract, now_ms) {
                        st.nack(env.message_id(), r, &self.m);
                        continue;
                    }
                    let c = env.class() as usize;
                    n_env[c] += 1;
                    n_bytes[c] += env.immutable.len() as u64;
                    st.batch.push(env);
                }
                Frame::Ack(a) => {
                    let was_full = st.window_full();
                    let (mut known, mut unknown) = (0u64, 0u64);
                    for id in a.ids() {
                        match st.inflight.settle(id) {
                            Settled::Known => known += 1,
                            Settled::Unknown => unknown += 1,
                        }
                    }
                    self.m.acks_in.increment(known);
                    if unknown > 0 {
                        self.m.unknown_acks.increment(unknown);
                    }
                    if was_full && !st.outq.is_empty() {
                        conn.wake(&mut st);
                    }
                }
                Frame::Nack(n) => {
                    // The agent refused a delivered envelope: it leaves custody, counted as dropped.
                    match st.inflight.settle(n.message_id) {
                        Settled::Known => self
                            .m
                            .dropped(n.reason().unwrap_or(Reason::PolicyViolation), 1),
                        Settled::Unknown => self.m.unknown_nacks.increment(1),
                    }
                }
                Frame::Ping(p) => {
                    st.send_frame(&Frame::Pong(Pong {
                        echo_us: p.timestamp_us,
                        responder_us: now,
                    }));
                    conn.wake.notify_one();
                }
                Frame::Pong(p) => {
                    if let Some(rtt) = st.session.on_pong(&p, now) {
                        self.m.rtt.record(rtt as f64 / 1e6);
                    }
                }
                Frame::Close(_) => {
                    conn.close(&mut st, Reason::Normal, &self.m);
                    break;
                }
                Frame::Welcome(_) | Frame::GoingAway(_) | Frame::Receipt(_) => {}
            }
        }
        for c in 0..3 {
            if n_env[c] > 0 {
                self.m.envelopes_in[c].increment(n_env[c]);
                self.m.bytes_in[c].increment(n_bytes[c]);
            }
        }
        if frames > 0 {
            if let Some(b) = st.bucket_frames.as_mut() {
                b.spend(frames, now);
            }
            if let Some(b) = st.bucket_bytes.as_mut() {
                b.spend(frame_bytes, now);
            }
        }
        if !st.ctrl.is_empty() {
            conn.wake.notify_one();
        }
        let mut batch = std::mem::take(&mut st.batch);
        drop(st);
        for env in batch.drain(..) {
            self.route_from(conn, env);
        }
        conn.st.borrow_mut().batch = batch;
    }

    fn on_hello(&self, conn: &Rc<Conn>, st: &mut ConnState, hello: &crate::wire::Hello, now: u64) {
        let Some(agent) = st.agent else { return };
        if let Err(r) = self.settings().admission.admit(&agent) {
            conn.close(st, r, &self.m);
            return;
        }
        let sid = self.shared.session_seq.fetch_add(1, Ordering::Relaxed);
        let welcome = match negotiate(
            hello,
            &self.settings().contract,
            sid,
            self.cfg.relay_id,
            agent,
        ) {
            Ok(w) => w,
            Err(r) => {
                conn.close(st, r, &self.m);
                return;
            }
        };
        st.session.established(&welcome, now);
        st.decoder.set_max_frame(welcome.max_frame as usize);
        let burst_frames = (welcome.rate_frames as u64 / 10).max(64);
        let burst_bytes = (welcome.rate_bytes / 10).max(welcome.max_frame as u64 * 4);
        st.bucket_frames = Some(TokenBucket::new(
            welcome.rate_frames as u64,
            burst_frames,
            now,
        ));
        st.bucket_bytes = Some(TokenBucket::new(welcome.rate_bytes, burst_bytes, now));
        st.contract = Some(welcome);
        let seq = self.shared.attach_seq.fetch_add(1, Ordering::SeqCst);
        st.seq = seq;
        let loc = Location { core: self.id, seq };
        let replaced = self.directory.borrow_mut().attach(agent, loc);
        if let Attach::Replaced(old) = replaced {
            if old.core == self.id {
                for env in self.retire_local(&agent, old.seq) {
                    self.enqueue_or_keep(st, agent, env);
                }
            }
        }
        self.by_agent.borrow_mut().insert(agent, conn.id);
        let kept = self.custody.borrow_mut().remove(&agent);
        for env in kept.into_iter().flatten() {
            self.m.redelivered.increment(1);
            self.enqueue_or_keep(st, agent, env);
        }
        let mut out = self.outbox.borrow_mut();
        for c in (0..self.ncores).filter(|c| *c != self.id) {
            out.push(
                c,
                CoreMsg::Attach {
                    agent,
                    loc,
                    conn: conn.id,
                },
            );
        }
        st.attach_acks_pending = self.ncores as usize - 1;
        self.m.sessions_opened.increment(1);
        self.m.sessions_active.increment(1.0);
        tracing::debug!(conn = conn.id, agent = %agent, session = sid, "session established");
        if st.attach_acks_pending == 0 {
            self.send_welcome(conn, st);
        }
    }

    fn send_welcome(&self, conn: &Conn, st: &mut ConnState) {
        if let Some(w) = st.contract.clone() {
            st.send_frame(&Frame::Welcome(w));
            st.welcomed = true;
            conn.wake.notify_one();
        }
    }

    /// Closes the local session of `agent` with attach sequence `seq` (a newer one replaced it)
    /// and returns the envelopes it held custody of.
    fn retire_local(&self, agent: &AgentId, seq: u64) -> Vec<Envelope> {
        let cid = self.by_agent.borrow().get(agent).copied();
        let Some(cid) = cid else { return Vec::new() };
        let Some(old) = self.conns.borrow().get(&cid).cloned() else {
            return Vec::new();
        };
        let mut st = old.st.borrow_mut();
        if st.seq != seq {
            return Vec::new();
        }
        self.by_agent.borrow_mut().remove(agent);
        old.close(&mut st, Reason::SessionReplaced, &self.m);
        st.handed_over = true;
        let envs = st.take_custody(&self.m);
        self.m.redelivered.increment(envs.len() as u64);
        envs
    }

    /// Queues a custody envelope on `st`, or keeps it in custody when the queue refuses.
    fn enqueue_or_keep(&self, st: &mut ConnState, agent: AgentId, env: Envelope) {
        let bytes = self.settings().limits.send_queue_bytes.saturating_mul(4);
        if let Err((_, env)) = st.enqueue(env, usize::MAX, bytes) {
            self.keep(agent, env);
        }
    }

    /// Holds an envelope for a disconnected agent, within the per-agent bound.
    fn keep(&self, agent: AgentId, env: Envelope) {
        if env.class() == DeliveryClass::BestEffort {
            self.m.dropped(Reason::DestinationUnavailable, 1);
            return;
        }
        let mut c = self.custody.borrow_mut();
        let q = c.entry(agent).or_default();
        if q.len() >= self.settings().limits.custody_per_agent {
            self.m.dropped(Reason::QueueFull, 1);
            return;
        }
        q.push_back(env);
    }

    /// Routes an envelope accepted from `src`.
    fn route_from(&self, src: &Rc<Conn>, env: Envelope) {
        let id = env.message_id();
        let acked = env.class() != DeliveryClass::BestEffort;
        let route = self.directory.borrow().route(&env, self.id);
        match route {
            Route::Local => {
                let result = self.deliver_local(env).map_err(|(r, _)| r);
                self.settle(src, id, acked, result, false);
            }
            Route::Core(k) => {
                src.st.borrow_mut().awaiting += 1;
                self.outbox.borrow_mut().push(
                    k,
                    CoreMsg::Deliver {
                        env,
                        src: Some((self.id, src.id)),
                    },
                );
                self.handed_off.set(self.handed_off.get() + 1);
            }
            Route::Refuse(r) => self.settle(src, id, acked, Err(r), false),
        }
    }

    /// Puts an envelope on the send queue of its destination, attached to this core.
    // The refused envelope travels back by value: no allocation on the refusal path.
    #[allow(clippy::result_large_err)]
    fn deliver_local(&self, env: Envelope) -> Result<bool, (Reason, Envelope)> {
        let Destination::Agent(dst) = env.destination() else {
            return Err((Reason::DestinationUnavailable, env));
        };
        let cid = self.by_agent.borrow().get(&dst).copied();
        let conn = cid.and_then(|c| self.conns.borrow().get(&c).cloned());
        let Some(conn) = conn else {
            return Err((Reason::DestinationUnavailable, env));
        };
        let settings = self.settings();
        let l = &settings.limits;
        let mut st = conn.st.borrow_mut();
        let r = st.enqueue(env, l.send_queue_envelopes, l.send_queue_bytes);
        if r.is_ok() {
            conn.wake(&mut st);
        }
        r
    }

    fn on_verdict(
        &self,
        conn: ConnId,
        id: MessageId,
        acked: bool,
        result: Result<bool, Reason>,
        remote: bool,
    ) {
        let Some(c) = self.conns.borrow().get(&conn).cloned() else {
            return;
        };
        self.settle(&c, id, acked, result, remote);
    }

    /// Applies a verdict to its source connection: ACK (batched), or NACK, and congestion.
    fn settle(
        &self,
        c: &Conn,
        id: MessageId,
        acked: bool,
        result: Result<bool, Reason>,
        remote: bool,
    ) {
        let mut st = c.st.borrow_mut();
        if remote {
            st.awaiting = st.awaiting.saturating_sub(1);
        }
        match result {
            Ok(congested) => {
                if congested || st.backoff_us > 0 {
                    st.congestion(congested, now_us());
                }
                if acked {
                    st.acks_to_send.push(id);
                }
            }
            Err(r) => st.nack(id, r, &self.m),
        }
        c.wake(&mut st);
    }

    async fn mailbox_loop(&self) {
        let mb = &self.shared.mailboxes[self.id as usize];
        loop {
            mb.wait().await;
            while let Some(msg) = mb.pop() {
                if self.on_msg(msg) {
                    return;
                }
            }
            self.flush_outbox();
        }
    }

    /// Handles one mailbox message; returns true on `Exit`.
    fn on_msg(&self, msg: CoreMsg) -> bool {
        match msg {
            CoreMsg::Attach { agent, loc, conn } => {
                if let Attach::Replaced(old) = self.directory.borrow_mut().attach(agent, loc) {
                    if old.core == self.id {
                        for env in self.retire_local(&agent, old.seq) {
                            self.outbox
                                .borrow_mut()
                                .push(loc.core, CoreMsg::Deliver { env, src: None });
                        }
                    }
                }
                let kept = self.custody.borrow_mut().remove(&agent);
                for env in kept.into_iter().flatten() {
                    self.m.redelivered.increment(1);
                    self.outbox
                        .borrow_mut()
                        .push(loc.core, CoreMsg::Deliver { env, src: None });
                }
                self.outbox
                    .borrow_mut()
                    .push(loc.core, CoreMsg::AttachAck { conn });
            }
            CoreMsg::AttachAck { conn } => {
                if let Some(c) = self.conns.borrow().get(&conn).cloned() {
                    let mut st = c.st.borrow_mut();
                    st.attach_acks_pending = st.attach_acks_pending.saturating_sub(1);
                    if st.attach_acks_pending == 0 && !st.welcomed && !st.closing {
                        self.send_welcome(&c, &mut st);
                    }
                }
            }
            CoreMsg::Detach { agent, seq } => {
                self.directory.borrow_mut().detach(&agent, seq);
            }
            CoreMsg::Deliver { env, src } => {
                let id = env.message_id();
                let acked = env.class() != DeliveryClass::BestEffort;
                let dst = match env.destination() {
                    Destination::Agent(a) => Some(a),
                    Destination::Group(_) => None,
                };
                let moved = dst
                    .and_then(|a| self.directory.borrow().locate(&a))
                    .filter(|l| l.core != self.id);
                let result = match moved {
                    Some(loc) => {
                        // The agent moved to another core since the sender looked: follow it.
                        self.outbox
                            .borrow_mut()
                            .push(loc.core, CoreMsg::Deliver { env, src });
                        return false;
                    }
                    None => self.deliver_local(env),
                };
                match (result, src) {
                    (Ok(c), Some((core, conn))) => self.verdict_to(core, conn, id, acked, Ok(c)),
                    (Err((r, _)), Some((core, conn))) => {
                        self.verdict_to(core, conn, id, acked, Err(r))
                    }
                    (Err((_, env)), None) => match dst {
                        Some(a) => self.keep(a, env),
                        None => self.m.dropped(Reason::DestinationUnavailable, 1),
                    },
                    (Ok(_), None) => {}
                }
            }
            CoreMsg::Verdict {
                conn,
                id,
                class_acked,
                result,
            } => self.on_verdict(conn, id, class_acked, result, true),
            CoreMsg::Reconfigure(s) => self.reconfigure(s),
            CoreMsg::Drain => self.start_drain(),
            CoreMsg::Exit => {
                // Complete every pending operation so the runtime can stop.
                self.listener.stop();
                for c in self.conns.borrow().values() {
                    c.stream.shutdown();
                }
                return true;
            }
        }
        false
    }

    fn verdict_to(
        &self,
        core: u16,
        conn: ConnId,
        id: MessageId,
        acked: bool,
        result: Result<bool, Reason>,
    ) {
        if core == self.id {
            self.on_verdict(conn, id, acked, result, true);
        } else {
            self.outbox.borrow_mut().push(
                core,
                CoreMsg::Verdict {
                    conn,
                    id,
                    class_acked: acked,
                    result,
                },
            );
        }
    }

    fn flush_outbox(&self) {
        let handed = self.handed_off.replace(0);
        if handed > 0 {
            self.m.mailbox_sent.increment(handed);
        }
        let f = self.outbox.borrow_mut().flush(&self.shared.mailboxes);
        if f.full > 0 {
            self.m.mailbox_full.increment(f.full);
        }
    }

    fn settings(&self) -> std::cell::Ref<'_, Arc<super::Settings>> {
        self.settings.borrow()
    }

    /// Takes new live settings and closes established sessions the new admission lists refuse.
    fn reconfigure(&self, s: Arc<super::Settings>) {
        *self.settings.borrow_mut() = s.clone();
        let conns: Vec<Rc<Conn>> = self.conns.borrow().values().cloned().collect();
        let mut closed = 0;
        for c in conns {
            let mut st = c.st.borrow_mut();
            if let Some(agent) = st.agent {
                if let Err(r) = s.admission.admit(&agent) {
                    c.close(&mut st, r, &self.m);
                    closed += 1;
                }
            }
        }
        tracing::info!(core = self.id, closed, "settings reloaded");
    }

    fn start_drain(&self) {
        if self.draining.replace(true) {
            return;
        }
        self.listener.stop();
        let now = now_us();
        let conns: Vec<Rc<Conn>> = self.conns.borrow().values().cloned().collect();
        tracing::info!(core = self.id, sessions = conns.len(), "draining");
        for c in conns {
            let mut st = c.st.borrow_mut();
            if st.session.start_drain(now) {
                let ms = st.session.drain_left_ms(now);
                st.send_frame(&Frame::GoingAway(GoingAway {
                    code: Reason::ShuttingDown as u16,
                    drain_ms: ms,
                    redirect: String::new(),
                }));
                c.wake.notify_one();
            } else {
                c.close(&mut st, Reason::ShuttingDown, &self.m);
            }
        }
    }

    /// The timer sweep: heartbeats, deadlines, key updates, drain progress, gauges.
    fn sweep(&self) {
        let now = now_us();
        if now.saturating_sub(self.custody_swept_us.get()) >= CUSTODY_SWEEP_US {
            self.custody_swept_us.set(now);
            self.expire_custody(unix_ms());
        }
        let conns: Vec<Rc<Conn>> = self.conns.borrow().values().cloned().collect();
        let (mut queued, mut inflight) = (0usize, 0usize);
        for c in &conns {
            let mut st = c.st.borrow_mut();
            queued += st.outq.len();
            inflight += st.inflight.len();
            if st.closing {
                if now.saturating_sub(st.closing_since_us) > CLOSE_LINGER_US {
                    c.stream.shutdown();
                }
                continue;
            }
            if st.write_since_us > 0
                && now.saturating_sub(st.write_since_us) >= self.settings().timeouts.write_us
            {
                c.close(&mut st, Reason::WriteTimeout, &self.m);
                continue;
            }
            while let Some(due) = st.session.poll(now) {
                match due {
                    Due::Ping => {
                        st.send_frame(&Frame::Ping(crate::wire::Ping { timestamp_us: now }));
                        c.wake.notify_one();
                    }
                    Due::KeyUpdate => {
                        if st.tls.refresh_traffic_keys().is_ok() {
                            self.m.key_updates.increment(1);
                            c.wake.notify_one();
                        }
                    }
                    Due::Close(r) => {
                        c.close(&mut st, r, &self.m);
                        break;
                    }
                }
            }
            // A draining session closes once nothing is outstanding and the agent has been
            // quiet long enough for what it sent before GOING_AWAY to have arrived.
            if st.session.state() == SessionState::Draining
                && st.settled()
                && st.session.quiet_us(now) >= DRAIN_QUIET_US
            {
                c.close(&mut st, Reason::ShuttingDown, &self.m);
            }
        }
        self.m.queue_depth.set(queued as f64);
        self.m.inflight.set(inflight as f64);
        self.flush_outbox();
        if self.draining.get() && conns.is_empty() && !self.drain_reported.replace(true) {
            self.shared.drained.fetch_add(1, Ordering::SeqCst);
            tracing::info!(core = self.id, "drained");
        }
    }

    /// Drops expired envelopes held for disconnected agents, and agents left with none.
    fn expire_custody(&self, now_ms: u64) {
        let mut expired = 0u64;
        self.custody.borrow_mut().retain(|_, q| {
            let before = q.len();
            q.retain(|e| e.expires_ms() > now_ms);
            expired += (before - q.len()) as u64;
            !q.is_empty()
        });
        if expired > 0 {
            self.m.dropped(Reason::Expired, expired);
        }
    }

    /// Forgets a connection whose reader ended.
    fn teardown(&self, conn: &Rc<Conn>) {
        let mut st = conn.st.borrow_mut();
        if !st.closing {
            let r = if st.rx.is_empty() {
                Reason::Normal
            } else {
                Reason::TruncatedFrame
            };
            if st.session.state() == SessionState::Handshake {
                self.m.handshake_failed(r);
            } else {
                self.m.closed(r);
            }
            st.session.close(r);
        }
        st.finished = true;
        conn.wake.notify_one();
        conn.stream.shutdown();
        self.conns.borrow_mut().remove(&conn.id);
        let Some(agent) = st.agent else { return };
        if st.seq == 0 {
            return;
        }
        self.m.sessions_active.decrement(1.0);
        let mine = self.by_agent.borrow().get(&agent) == Some(&conn.id);
        if mine {
            self.by_agent.borrow_mut().remove(&agent);
        }
        if self.directory.borrow_mut().detach(&agent, st.seq) {
            let mut out = self.outbox.borrow_mut();
            for c in (0..self.ncores).filter(|c| *c != self.id) {
                out.push(c, CoreMsg::Detach { agent, seq: st.seq });
            }
        }
        if !st.handed_over {
            for env in st.take_custody(&self.m) {
                self.keep(agent, env);
            }
        }
        drop(st);
        self.flush_outbox();
    }
}

//! One agent connection on its owning core: TLS state, session state machine, send queue,
//! in-flight custody, and the reader and writer tasks.
//!
//! The reader task reads ciphertext, feeds rustls, splits plaintext into frames and handles them;
//! envelopes it accepts are routed after its borrow of the connection state ends (an agent may
//! send to itself). The writer task wakes on [`Conn::wake`], moves control frames, ACK batches and
//! queued envelopes into rustls in one vectored write per pass, and writes the resulting records
//! with one socket write. Neither task ever races an operation against a timer: the core's
//! timer sweep enforces deadlines by shutting the socket down.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{BufRead, IoSlice, Write};
use std::rc::Rc;

use bytes::BytesMut;
use rustls::ServerConnection;
use tokio::sync::Notify;

use super::inflight::Inflight;
use super::mailbox::ConnId;
use super::uring::Stream;
use super::{now_us, unix_ms};
use crate::metrics::CoreMetrics;
use crate::policy::TokenBucket;
use crate::session::{Session, SessionState};
use crate::wire::{
    AckBatch, AgentId, Close, DeliveryClass, Envelope, Frame, FrameDecoder, MessageId, Nack,
    Reason, Welcome, MAX_ACK_BATCH,
};

/// Most envelopes moved into TLS in one writer pass.
const WRITE_BATCH: usize = 256;
/// Most plaintext bytes moved into TLS in one writer pass.
const WRITE_BATCH_BYTES: usize = 256 << 10;
/// How long a closing connection may take to flush before its socket is shut down, microseconds.
pub(crate) const CLOSE_LINGER_US: u64 = 2_000_000;

/// A connection: its socket, its state, and the writer's wake-up.
pub(crate) struct Conn {
    pub(crate) id: ConnId,
    pub(crate) stream: Stream,
    pub(crate) st: RefCell<ConnState>,
    pub(crate) wake: Notify,
}

/// Everything about a connection that changes.
pub(crate) struct ConnState {
    pub(crate) tls: ServerConnection,
    pub(crate) session: Session,
    pub(crate) agent: Option<AgentId>,
    /// Attach sequence of this session (0 before HELLO).
    pub(crate) seq: u64,
    pub(crate) contract: Option<Welcome>,
    pub(crate) attach_acks_pending: usize,
    /// WELCOME went out: envelopes may be written.
    pub(crate) welcomed: bool,
    /// Encoded control frames waiting for the writer.
    pub(crate) ctrl: BytesMut,
    pub(crate) acks_to_send: Vec<MessageId>,
    pub(crate) outq: VecDeque<Envelope>,
    pub(crate) outq_bytes: usize,
    /// Envelopes written to the agent that wait for its ACK.
    pub(crate) inflight: Inflight,
    /// Envelopes sent to other cores that wait for a verdict.
    pub(crate) awaiting: u32,
    /// Envelopes accepted by the reader in the current pass, routed after it.
    pub(crate) batch: Vec<Envelope>,
    pub(crate) rx: BytesMut,
    pub(crate) decoder: FrameDecoder,
    pub(crate) bucket_frames: Option<TokenBucket>,
    pub(crate) bucket_bytes: Option<TokenBucket>,
    /// The reader pauses until then: a destination this session sends to is congested.
    pub(crate) paused_until_us: u64,
    pub(crate) backoff_us: u64,
    /// CLOSE queued (or TLS failed); the writer shuts the socket down once flushed.
    pub(crate) closing: bool,
    pub(crate) closing_since_us: u64,
    /// When the writer's socket write in progress started (0: not writing).
    pub(crate) write_since_us: u64,
    /// The writer task waits for a wake-up (anything queued must notify it).
    pub(crate) writer_idle: bool,
    /// The connection was torn down; both tasks stop.
    pub(crate) finished: bool,
    /// Envelopes were handed to a newer session; nothing is left to keep in custody.
    pub(crate) handed_over: bool,
    heads: BytesMut,
    sending: Vec<Envelope>,
}

impl ConnState {
    pub(crate) fn new(tls: ServerConnection, session: Session, max_frame: usize) -> Self {
        ConnState {
            tls,
            session,
            agent: None,
            seq: 0,
            contract: None,
            attach_acks_pending: 0,
            welcomed: false,
            ctrl: BytesMut::new(),
            acks_to_send: Vec::new(),
            outq: VecDeque::new(),
            outq_bytes: 0,
            inflight: Inflight::default(),
            awaiting: 0,
            batch: Vec::new(),
            rx: BytesMut::new(),
            decoder: FrameDecoder::new(max_frame),
            bucket_frames: None,
            bucket_bytes: None,
            paused_until_us: 0,
            backoff_us: 0,
            closing: false,
            closing_since_us: 0,
            finished: false,
            writer_idle: true,
            write_since_us: 0,
            handed_over: false,
            heads: BytesMut::new(),
            sending: Vec::new(),
        }
    }

    /// Queues a control frame for the writer. Nothing is queued once CLOSE was.
    pub(crate) fn send_frame(&mut self, f: &Frame) {
        if !self.closing {
            f.encode(&mut self.ctrl);
        }
    }

    /// Queues a NACK and counts the refusal.
    pub(crate) fn nack(&mut self, id: MessageId, reason: Reason, m: &CoreMetrics) {
        if self.closing {
            return;
        }
        m.refused(reason);
        tracing::debug!(agent = ?self.agent, msg = %id, reason = reason.label(), "envelope refused");
        self.send_frame(&Frame::Nack(Nack::new(id, reason)));
    }

    /// Whether a draining session has nothing left to settle.
    pub(crate) fn settled(&self) -> bool {
        self.outq.is_empty()
            && self.inflight.is_empty()
            && self.awaiting == 0
            && self.acks_to_send.is_empty()
            && self.batch.is_empty()
    }

    /// Whether the agent has as many envelopes awaiting an answer as its contract's send window.
    pub(crate) fn send_window_full(&self) -> bool {
        !self.finished
            && self
                .contract
                .as_ref()
                .is_some_and(|c| self.awaiting >= c.send_window)
    }

    /// Microseconds the reader should wait before reading again (rate limits).
    pub(crate) fn throttle_wait(&mut self, now: u64, m: &CoreMetrics) -> u64 {
        let e = self.bucket_frames.as_mut().map_or(0, |b| b.wait_us(now));
        let b = self.bucket_bytes.as_mut().map_or(0, |b| b.wait_us(now));
        if e > 0 {
            m.throttled_frames.increment(1);
        }
        if b > 0 {
            m.throttled_bytes.increment(1);
        }
        let p = self.paused_until_us.saturating_sub(now);
        if p > 0 {
            m.throttled_destination.increment(1);
        }
        e.max(b).max(p)
    }

    /// Records whether a destination this session sent to reported congestion: the reader
    /// backs off (doubling up to 20 ms) while it does, so TCP pushes back on the sender.
    pub(crate) fn congestion(&mut self, congested: bool, now: u64) {
        if congested {
            self.backoff_us = (self.backoff_us * 2).clamp(200, 20_000);
            self.paused_until_us = now + self.backoff_us;
        } else {
            self.backoff_us = 0;
        }
    }

    /// Puts an envelope on this agent's send queue, within the queue's bounds. `Ok(true)`: the
    /// queue is past half its bounds, and senders should slow down.
    // The refused envelope travels back by value: no allocation on the refusal path.
    #[allow(clippy::result_large_err)]
    pub(crate) fn enqueue(
        &mut self,
        env: Envelope,
        max_envelopes: usize,
        max_bytes: usize,
    ) -> Result<bool, (Reason, Envelope)> {
        if !self.session.is_open() || self.closing || self.finished {
            return Err((Reason::DestinationUnavailable, env));
        }
        let len = env.frame_len();
        if self
            .contract
            .as_ref()
            .is_some_and(|c| len > c.max_frame as usize)
        {
            return Err((Reason::TooLargeForDestination, env));
        }
        if self.outq.len() >= max_envelopes || self.outq_bytes + len > max_bytes {
            return Err((Reason::QueueFull, env));
        }
        self.outq_bytes += len;
        self.outq.push_back(env);
        Ok(self.outq.len() > max_envelopes / 2 || self.outq_bytes > max_bytes / 2)
    }

    /// Takes every envelope this session holds custody of (queued and unacknowledged), in order
    /// where order is known. Best-effort envelopes are left out and counted as dropped.
    pub(crate) fn take_custody(&mut self, m: &CoreMetrics) -> Vec<Envelope> {
        let mut out = self.inflight.take();
        for e in self.outq.drain(..) {
            if e.class() == DeliveryClass::BestEffort {
                m.dropped(Reason::DestinationUnavailable, 1);
            } else {
                out.push(e);
            }
        }
        self.outq_bytes = 0;
        out
    }

    /// Moves pending output into rustls and the resulting TLS records into `out`.
    pub(crate) fn fill(&mut self, out: &mut Vec<u8>, m: &CoreMetrics) {
        if !self.tls.is_handshaking() {
            if !self.closing {
                self.encode_acks(m);
            }
            if !self.ctrl.is_empty() {
                let _ = self.tls.writer().write_all(&self.ctrl);
                self.ctrl.clear();
            }
            if self.closing {
                // After CLOSE, nothing but the TLS close_notify.
                self.tls.send_close_notify();
            } else if self.welcomed {
                self.write_envelopes(m);
            }
        }
        while self.tls.wants_write() {
            if self.tls.write_tls(out).is_err() {
                break;
            }
        }
    }

    /// Moves the ACKs waiting to be sent into the control buffer.
    pub(crate) fn encode_acks(&mut self, m: &CoreMetrics) {
        while !self.acks_to_send.is_empty() {
            let n = self.acks_to_send.len().min(MAX_ACK_BATCH);
            let batch = AckBatch::new(self.acks_to_send.drain(..n));
            m.acks_out.increment(batch.len() as u64);
            Frame::Ack(batch).encode(&mut self.ctrl);
        }
    }

    /// Whether the next queued envelope waits for the agent's ACKs (deliver window full).
    pub(crate) fn window_full(&self) -> bool {
        let (n, b) = self.window();
        let next = self.outq.front().map_or(0, Envelope::frame_len);
        !self.inflight.has_room(n, b, next)
    }

    fn window(&self) -> (usize, usize) {
        self.contract
            .as_ref()
            .map_or((usize::MAX, usize::MAX), |c| {
                (c.deliver_window as usize, c.deliver_window_bytes as usize)
            })
    }

    fn write_envelopes(&mut self, m: &CoreMetrics) {
        let now_ms = unix_ms();
        let mut bytes = 0;
        self.heads.clear();
        // The deliver window: what this pass may add to in-flight custody.
        let (window, window_bytes) = self.window();
        let (mut room, mut room_bytes) = (0usize, 0usize);
        while self.sending.len() < WRITE_BATCH && bytes < WRITE_BATCH_BYTES {
            let Some(env) = self.outq.pop_front() else {
                break;
            };
            if env.expires_ms() <= now_ms {
                self.outq_bytes = self.outq_bytes.saturating_sub(env.frame_len());
                m.dropped(Reason::Expired, 1);
                continue;
            }
            if env.class() != DeliveryClass::BestEffort {
                if !self.inflight.has_room(
                    window.saturating_sub(room),
                    window_bytes.saturating_sub(room_bytes),
                    env.frame_len(),
                ) {
                    self.outq.push_front(env);
                    break;
                }
                room += 1;
                room_bytes += env.frame_len();
            }
            self.outq_bytes = self.outq_bytes.saturating_sub(env.frame_len());
            bytes += env.frame_len();
            env.encode_head(&mut self.heads);
            self.sending.push(env);
        }
        if self.sending.is_empty() {
            return;
        }
        let mut slices = Vec::with_capacity(self.sending.len() * 2);
        let mut off = 0;
        for env in &self.sending {
            let h = 5 + env.routing.encoded_len();
            slices.push(IoSlice::new(&self.heads[off..off + h]));
            slices.push(IoSlice::new(&env.immutable));
            off += h;
        }
        let total = off
            + self
                .sending
                .iter()
                .map(|e| e.immutable.len())
                .sum::<usize>();
        let written = self.tls.writer().write_vectored(&slices).unwrap_or(0);
        if written < total {
            // Only reachable if a buffer limit is set: finish slice by slice.
            let mut skipped = written;
            for s in &slices {
                if skipped >= s.len() {
                    skipped -= s.len();
                    continue;
                }
                let _ = self.tls.writer().write_all(&s[skipped..]);
                skipped = 0;
            }
        }
        drop(slices);
        let (mut n, mut b) = ([0u64; 3], [0u64; 3]);
        for env in self.sending.drain(..) {
            let c = env.class() as usize;
            n[c] += 1;
            b[c] += env.immutable.len() as u64;
            if env.class() != DeliveryClass::BestEffort {
                self.inflight.push(env);
            }
        }
        for c in 0..3 {
            if n[c] > 0 {
                m.envelopes_out[c].increment(n[c]);
                m.bytes_out[c].increment(b[c]);
            }
        }
    }

    /// Feeds ciphertext to rustls and moves the plaintext into `rx`.
    pub(crate) fn read_tls(&mut self, mut data: &[u8]) -> Result<(), rustls::Error> {
        while !data.is_empty() {
            match self.tls.read_tls(&mut data) {
                Ok(0) => break,
                Ok(_) => {}
                Err(_) => return Err(rustls::Error::General("tls buffer full".into())),
            }
            let state = self.tls.process_new_packets()?;
            let mut left = state.plaintext_bytes_to_read();
            if left > 0 {
                // Copy the decrypted records straight out of rustls' buffers (no zero-fill).
                self.rx.reserve(left);
                let mut reader = self.tls.reader();
                while left > 0 {
                    let chunk = match reader.fill_buf() {
                        Ok(c) if !c.is_empty() => c,
                        _ => break,
                    };
                    let n = chunk.len().min(left);
                    self.rx.extend_from_slice(&chunk[..n]);
                    reader.consume(n);
                    left -= n;
                }
            }
        }
        Ok(())
    }
}

impl Conn {
    pub(crate) fn new(id: ConnId, stream: Stream, st: ConnState) -> Rc<Self> {
        Rc::new(Conn {
            id,
            stream,
            st: RefCell::new(st),
            wake: Notify::new(),
        })
    }

    /// Wakes the writer if it is waiting; a busy writer picks new output up on its next pass.
    pub(crate) fn wake(&self, st: &mut ConnState) {
        if st.writer_idle {
            st.writer_idle = false;
            self.wake.notify_one();
        }
    }

    /// Ends the session with `reason`: CLOSE is queued (when TLS is up) and the writer shuts the
    /// socket down once flushed. Counts the close and logs one line.
    pub(crate) fn close(&self, st: &mut ConnState, reason: Reason, m: &CoreMetrics) {
        if st.closing || st.finished {
            return;
        }
        let was = st.session.state();
        st.session.close(reason);
        st.closing = true;
        st.closing_since_us = now_us();
        if was == SessionState::Handshake {
            m.handshake_failed(reason);
        } else {
            m.closed(reason);
        }
        if reason == Reason::Normal {
            tracing::debug!(conn = self.id, agent = ?st.agent, "session closed");
        } else {
            tracing::info!(conn = self.id, agent = ?st.agent, reason = reason.label(), "session closed");
        }
        if st.tls.is_handshaking() || reason == Reason::WriteTimeout {
            // Nothing can be said to this peer: no TLS yet, or it does not read.
            self.stream.shutdown();
        } else {
            // ACKs already owed go out before CLOSE; nothing at all goes out after it
            // (`send_frame` and `nack` ignore a closing connection).
            st.encode_acks(m);
            Frame::Close(Close::new(reason, reason.label())).encode(&mut st.ctrl);
        }
        self.wake.notify_one();
    }
}

//! The low-level session: one TLS connection to one relay, frames in and out as they are.
//!
//! A [`Session`] is what the relay's protocol tests and tools that speak raw frames use: it sends
//! any bytes ([`Session::send_raw`]), reports every ACK, NACK and RECEIPT as an [`Event`], and
//! neither retries nor reconnects. Applications use [`crate::Agent`], which is built on the same
//! handshake and adds windows, retries, reconnection and outcomes per envelope.
//!
//! ```no_run
//! # async fn demo(cfg: openmesh_agent::ClientConfig, to: openmesh_dataplane::wire::AgentId) -> Result<(), openmesh_agent::ClientError> {
//! use openmesh_agent::session::{Event, Session};
//! let mut s = Session::connect(cfg).await?;
//! let env = s.envelope_to(to, 60_000).build(b"hello").expect("small envelope");
//! s.send(&env).await?;
//! while let Some(ev) = s.next_event().await {
//!     if let Event::Acked(_) = ev { break; }
//! }
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use openmesh_dataplane::tls::client_config;
use openmesh_dataplane::wire::{
    features, AckBatch, AgentId, Close, DeliveryClass, Destination, Envelope, EnvelopeBuilder,
    Frame, GoingAway, MessageId, Nack, Ping, Pong, Reason, Receipt, Welcome,
};

use crate::link::{self, LinkReader, LinkWriter};
use crate::template::MessageIds;
use crate::{now_us, unix_ms, ClientConfig, ClientError};

/// Something that happened on the session.
#[derive(Debug)]
pub enum Event {
    /// An envelope for this agent. ACK it with [`Session::ack`] once processed.
    Envelope(Envelope),
    /// The relay took custody of these envelopes.
    Acked(AckBatch),
    /// The relay refused an envelope.
    Nacked(Nack),
    /// What became of an envelope sent with a receipt flag.
    Receipt(Receipt),
    /// The relay drains: finish and reconnect elsewhere.
    GoingAway(GoingAway),
    /// The relay's directory answered a PUBLISH or a LOOKUP.
    Directory(openmesh_dataplane::wire::DirectoryAnswer),
    /// The session ended (with the relay's CLOSE, if it sent one).
    Closed(Option<Close>),
}

enum Out {
    Frame(Bytes),
    Ack(MessageId),
    Acks(Vec<MessageId>),
    /// Write everything before it, shut the link down, then answer.
    Finish(tokio::sync::oneshot::Sender<()>),
}

/// A connected low-level session.
pub struct Session {
    id: AgentId,
    welcome: Welcome,
    out: mpsc::Sender<Out>,
    /// Events arrive in batches, one per socket read.
    events: mpsc::Receiver<Vec<Event>>,
    pending: std::collections::VecDeque<Event>,
    ids: MessageIds,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Session {
    /// The reader stops at once; the writer first writes what is queued (ACKs included) and
    /// shuts the link down, within 10 seconds (then it is stopped too). Without a tokio runtime
    /// to finish on, both stop at once. [`Session::close`] also waits for the relay's side.
    fn drop(&mut self) {
        let mut tasks = std::mem::take(&mut self.tasks).into_iter();
        let (writer, reader) = (tasks.next(), tasks.next());
        if let Some(r) = reader {
            r.abort();
        }
        let Some(writer) = writer else {
            return;
        };
        let (done, _) = tokio::sync::oneshot::channel();
        let finishing = self.out.try_send(Out::Finish(done)).is_ok();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) if finishing => {
                let stop = writer.abort_handle();
                rt.spawn(async move {
                    if tokio::time::timeout(Duration::from_secs(10), writer)
                        .await
                        .is_err()
                    {
                        stop.abort();
                    }
                });
            }
            _ => writer.abort(),
        }
    }
}

/// Opens a mutual-TLS link to `cfg.relay` (no HELLO yet), through rustls end to end. For tests
/// that speak raw frames.
pub async fn connect_tls(cfg: &ClientConfig) -> Result<TlsStream<TcpStream>, ClientError> {
    let tls = client_config(&cfg.identity, &cfg.ca)?;
    let name = link::server_name(cfg, cfg.relay)?;
    let tcp = link::tcp(cfg, cfg.relay).await?;
    Ok(TlsConnector::from(tls).connect(name, tcp).await?)
}

/// A session past WELCOME: the link's two halves (frames read after the WELCOME wait in the
/// reader) and the contract.
pub(crate) struct Opened {
    pub reader: LinkReader,
    pub writer: LinkWriter,
    pub welcome: Welcome,
}

/// Connects to `relay`, sends HELLO and waits for WELCOME, all within `cfg.connect_timeout`.
/// `ack_delay`: the caller keeps a window deep enough for the relay to hold its ACKs
/// (`features::ACK_DELAY`, offered only then and when `cfg.hello` offers it).
pub(crate) async fn open(
    cfg: &ClientConfig,
    relay: SocketAddr,
    ack_delay: bool,
) -> Result<Opened, ClientError> {
    let deadline = tokio::time::Instant::now() + cfg.connect_timeout;
    let max_frame = cfg
        .hello
        .max_frame
        .max(openmesh_dataplane::signaling::MIN_FRAME) as usize;
    let (mut reader, mut writer) =
        tokio::time::timeout_at(deadline, link::connect(cfg, relay, max_frame))
            .await
            .map_err(|_| ClientError::Timeout)??;
    let mut hello = cfg.hello.clone();
    if !ack_delay {
        hello.features &= !features::ACK_DELAY;
    }
    let welcome = tokio::time::timeout_at(deadline, async {
        writer.write_bytes(Frame::Hello(hello).to_bytes()).await?;
        loop {
            if let Some(f) = reader.next_frame()? {
                return match f {
                    Frame::Welcome(w) => Ok(w),
                    Frame::Close(c) => Err(ClientError::Closed(c)),
                    _ => Err(ClientError::Unexpected),
                };
            }
            if reader.peer_closed() || reader.read().await? == 0 {
                return Err(ClientError::Gone);
            }
        }
    })
    .await
    .map_err(|_| ClientError::Timeout)??;
    reader.set_max_frame(welcome.max_frame as usize);
    Ok(Opened {
        reader,
        writer,
        welcome,
    })
}

impl Session {
    /// Connects, sends HELLO and waits for WELCOME, all within `cfg.connect_timeout`.
    pub async fn connect(cfg: ClientConfig) -> Result<Session, ClientError> {
        let Opened {
            reader,
            writer,
            welcome,
        } = open(&cfg, cfg.relay, false).await?;
        let (out_tx, out_rx) = mpsc::channel(16_384);
        let (ev_tx, ev_rx) = mpsc::channel(1024);
        let writer = tokio::spawn(write_loop(writer, out_rx));
        let reader = tokio::spawn(read_loop(
            reader,
            ev_tx,
            out_tx.clone(),
            ReadOptions {
                answer_pings: cfg.answer_pings,
                auto_ack: cfg.auto_ack,
                heartbeat: Duration::from_millis(welcome.heartbeat_ms.max(1) as u64),
            },
        ));
        Ok(Session {
            id: cfg.identity.agent_id(),
            welcome,
            out: out_tx,
            events: ev_rx,
            pending: std::collections::VecDeque::new(),
            ids: MessageIds::new()?,
            tasks: vec![writer, reader],
        })
    }

    /// This agent's id.
    pub fn id(&self) -> AgentId {
        self.id
    }

    /// The session contract.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// A fresh message id: 64 random bits drawn when the session opened, then a 64-bit counter,
    /// so ids stay unique across sessions and relay restarts.
    pub fn next_message_id(&self) -> MessageId {
        self.ids.next()
    }

    /// An at-least-once envelope builder from this agent to `to`, expiring in `ttl_ms`.
    pub fn envelope_to(&self, to: AgentId, ttl_ms: u64) -> EnvelopeBuilder {
        EnvelopeBuilder::new(
            self.next_message_id(),
            self.id,
            Destination::Agent(to),
            unix_ms(),
            ttl_ms,
        )
    }

    /// Queues an envelope for sending.
    pub async fn send(&self, env: &Envelope) -> Result<(), ClientError> {
        let mut b = BytesMut::with_capacity(env.frame_len());
        env.encode(&mut b);
        self.send_raw(b.freeze()).await
    }

    /// Queues already-encoded frame bytes (any bytes: tests use this to send garbage).
    pub async fn send_raw(&self, frame: Bytes) -> Result<(), ClientError> {
        self.out
            .send(Out::Frame(frame))
            .await
            .map_err(|_| ClientError::Gone)
    }

    /// Acknowledges a received envelope (ACKs are batched).
    pub async fn ack(&self, id: MessageId) -> Result<(), ClientError> {
        self.out
            .send(Out::Ack(id))
            .await
            .map_err(|_| ClientError::Gone)
    }

    /// The next event if one is ready, without waiting.
    pub fn try_event(&mut self) -> Option<Event> {
        if self.pending.is_empty() {
            self.pending.extend(self.events.try_recv().ok()?);
        }
        self.pending.pop_front()
    }

    /// The next event; `None` once the session is over and every event was taken.
    pub async fn next_event(&mut self) -> Option<Event> {
        while self.pending.is_empty() {
            self.pending.extend(self.events.recv().await?);
        }
        self.pending.pop_front()
    }

    /// Waits for events and moves every one that is ready into `out` (at least one). Returns
    /// false once the session is over and every event was taken. Cheaper than
    /// [`Session::next_event`] for receivers that handle many envelopes.
    pub async fn next_events(&mut self, out: &mut Vec<Event>) -> bool {
        if self.pending.is_empty() {
            match self.events.recv().await {
                Some(batch) => self.pending.extend(batch),
                None => return false,
            }
        }
        out.extend(self.pending.drain(..));
        while let Ok(batch) = self.events.try_recv() {
            out.extend(batch);
        }
        true
    }

    /// Sends what is queued (ACKs included), then CLOSE, and ends the session once they are
    /// written (waiting at most 10 seconds). Dropping an agent instead ends it at once: ACKs
    /// not yet written are lost, and the relay delivers those envelopes again.
    pub async fn close(self) -> Result<(), ClientError> {
        self.send_raw(Frame::Close(Close::new(Reason::Normal, "bye")).to_bytes())
            .await?;
        let (done, written) = tokio::sync::oneshot::channel();
        self.out
            .send(Out::Finish(done))
            .await
            .map_err(|_| ClientError::Gone)?;
        tokio::time::timeout(Duration::from_secs(10), written)
            .await
            .map_err(|_| ClientError::Timeout)?
            .map_err(|_| ClientError::Gone)
    }
}

async fn write_loop(mut wr: LinkWriter, mut rx: mpsc::Receiver<Out>) {
    let mut buf = BytesMut::with_capacity(256 << 10);
    let mut acks: Vec<MessageId> = Vec::new();
    let mut finished = None;
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        let mut n = 0;
        while let Some(o) = next {
            match o {
                Out::Frame(f) => {
                    flush_acks(&mut acks, &mut buf);
                    buf.extend_from_slice(&f);
                }
                Out::Ack(id) => acks.push(id),
                Out::Acks(ids) => acks.extend(ids),
                Out::Finish(done) => {
                    finished = Some(done);
                    break;
                }
            }
            n += 1;
            if buf.len() > (256 << 10) || n > 4096 {
                break;
            }
            next = rx.try_recv().ok();
        }
        flush_acks(&mut acks, &mut buf);
        if wr.write_bytes(buf.split().freeze()).await.is_err() {
            return;
        }
        buf.reserve(256 << 10);
        if finished.is_some() {
            break;
        }
    }
    let _ = wr.shutdown().await;
    if let Some(done) = finished {
        let _ = done.send(());
    }
}

/// Encodes `acks` as ACK frames into `buf` and empties it.
pub(crate) fn flush_acks(acks: &mut Vec<MessageId>, buf: &mut BytesMut) {
    for chunk in acks.chunks(openmesh_dataplane::wire::MAX_ACK_BATCH) {
        Frame::Ack(AckBatch::new(chunk.iter().copied())).encode(buf);
    }
    acks.clear();
}

/// The PONG answering `ping`.
pub(crate) fn pong(ping: &Ping) -> Bytes {
    Frame::Pong(Pong {
        echo_us: ping.timestamp_us,
        responder_us: now_us(),
    })
    .to_bytes()
}

/// What one read of the relay's connection brought.
pub(crate) enum Heard {
    /// Bytes (appended to the read buffer).
    Bytes,
    /// The heartbeat timer went off (at most once per interval), after silence or not:
    /// nothing to do but read on; a moment to let go of buffers a burst grew.
    Nothing,
    /// Two silent intervals: send this PING.
    Ping(Bytes),
    /// Three silent intervals: the relay is gone.
    Dead,
    /// End of stream, or a read error.
    Gone,
}

/// Reads the relay's connection one heartbeat interval at a time and watches its silence: a
/// live relay PINGs after one silent interval, so it is PINGed only after two (its own PINGs
/// and RTT measurements are not pre-empted), and given up after three. (A tokio read is
/// cancel-safe, unlike an io_uring one.)
///
/// One timer serves many reads: it is set for an interval after the last bytes heard only when
/// it fires (a read does not arm and drop a timer of its own).
pub(crate) struct Heartbeat {
    interval: Duration,
    answer_pings: bool,
    silent: u64,
    /// When the relay was last heard from.
    heard: tokio::time::Instant,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl Heartbeat {
    pub(crate) fn new(interval: Duration, answer_pings: bool) -> Self {
        let now = tokio::time::Instant::now();
        Heartbeat {
            interval,
            answer_pings,
            silent: 0,
            heard: now,
            timer: Box::pin(tokio::time::sleep_until(now + interval)),
        }
    }

    pub(crate) async fn read(&mut self, link: &mut LinkReader) -> Heard {
        if link.peer_closed() {
            // close_notify: the relay sends nothing more.
            return Heard::Gone;
        }
        tokio::select! {
            biased;
            r = link.read() => {
                return match r {
                    Ok(0) | Err(_) => Heard::Gone,
                    Ok(_) => {
                        self.silent = 0;
                        self.heard = tokio::time::Instant::now();
                        Heard::Bytes
                    }
                };
            }
            () = self.timer.as_mut() => {}
        }
        let now = tokio::time::Instant::now();
        let quiet_until = self.heard + self.interval * (self.silent as u32 + 1);
        if quiet_until > now {
            // Bytes came since the timer was set: an interval from then. The caller still
            // hears of it (once per interval, however busy the link: its moment to let go of
            // buffers a burst grew).
            self.timer.as_mut().reset(quiet_until);
            return Heard::Nothing;
        }
        self.silent += 1;
        self.timer.as_mut().reset(now + self.interval);
        if self.silent >= openmesh_dataplane::session::DEAD_AFTER_INTERVALS {
            Heard::Dead
        } else if self.answer_pings && self.silent >= 2 {
            Heard::Ping(
                Frame::Ping(Ping {
                    timestamp_us: now_us(),
                })
                .to_bytes(),
            )
        } else {
            Heard::Nothing
        }
    }
}

struct ReadOptions {
    answer_pings: bool,
    auto_ack: bool,
    heartbeat: Duration,
}

async fn read_loop(
    mut link: LinkReader,
    events: mpsc::Sender<Vec<Event>>,
    out: mpsc::Sender<Out>,
    opts: ReadOptions,
) {
    let ReadOptions {
        answer_pings,
        auto_ack,
        heartbeat,
    } = opts;
    let mut close = None;
    let mut beat = Heartbeat::new(heartbeat, answer_pings);
    let mut acks = Vec::new();
    let mut batch = Vec::new();
    'outer: loop {
        loop {
            let f = match link.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(_) => break 'outer,
            };
            let ev = match f {
                Frame::Envelope(e) => {
                    if auto_ack && e.class() != DeliveryClass::BestEffort {
                        acks.push(e.message_id());
                    }
                    Event::Envelope(e)
                }
                Frame::Ack(a) => Event::Acked(a),
                Frame::Nack(n) => Event::Nacked(n),
                Frame::Receipt(r) => Event::Receipt(r),
                Frame::GoingAway(g) => Event::GoingAway(g),
                Frame::Directory(d) => Event::Directory(d),
                Frame::Close(c) => {
                    close = Some(c);
                    break 'outer;
                }
                Frame::Ping(p) => {
                    if answer_pings {
                        let _ = out.send(Out::Frame(pong(&p))).await;
                    }
                    continue;
                }
                // Relay-link frames never come on an agent's session.
                Frame::Pong(_)
                | Frame::Hello(_)
                | Frame::Welcome(_)
                | Frame::LinkHello(_)
                | Frame::LinkAck(_)
                | Frame::LinkNack(_)
                | Frame::Presence(_)
                | Frame::LinkReceipt(_)
                | Frame::Publish(_)
                | Frame::Lookup(_) => continue,
            };
            batch.push(ev);
        }
        if !batch.is_empty() && events.send(std::mem::take(&mut batch)).await.is_err() {
            return;
        }
        if !acks.is_empty()
            && out
                .send(Out::Acks(std::mem::take(&mut acks)))
                .await
                .is_err()
        {
            break;
        }
        match beat.read(&mut link).await {
            Heard::Bytes => {}
            Heard::Nothing => {
                link.release_idle();
            }
            Heard::Ping(f) => {
                let _ = out.send(Out::Frame(f)).await;
            }
            Heard::Dead => {
                close = Some(Close::new(Reason::HeartbeatTimeout, "relay silent"));
                break;
            }
            Heard::Gone => break,
        }
    }
    batch.push(Event::Closed(close));
    let _ = events.send(batch).await;
}

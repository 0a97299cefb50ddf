//! Scenarios: how many sender/receiver pairs, closed or open loop, and for how long. Each
//! target (OpenMesh relays, or a NATS server or an iroh-relay as the baselines) provides the
//! pair itself; the baselines share the send and receive loops here.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, Stream, StreamExt};
use hdrhistogram::Histogram;
use openmesh_dataplane::wire::DeliveryClass;

use crate::payload;
use crate::report::{latency_histogram, Live, Seen};

/// The scenarios `run --scenario` takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// One sender to one receiver, 256-byte payloads, as fast as the window allows.
    Small,
    /// The same with 16 KiB payloads.
    Bulk,
    /// Open loop at a fixed rate; one-way latency from the scheduled send time.
    Latency,
    /// N sender/receiver pairs at once.
    Fan,
    /// Ramp to M idle agents, hold, then churn.
    Connections,
    /// Senders fill the queues of receivers that are offline (for the duration, or until the
    /// relay refuses: the queue is full), then the receivers connect and take their backlog;
    /// the rate reported is the drain rate.
    Backlog,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Small => "small",
            Scenario::Bulk => "bulk",
            Scenario::Latency => "latency",
            Scenario::Fan => "fan",
            Scenario::Connections => "connections",
            Scenario::Backlog => "backlog",
        }
    }
    pub fn default_size(self) -> usize {
        match self {
            Scenario::Bulk => 16 << 10,
            _ => 256,
        }
    }
    pub fn default_agents(self) -> usize {
        match self {
            Scenario::Fan => 32,
            Scenario::Connections => 10_000,
            _ => 1,
        }
    }
    pub fn default_window(self) -> u64 {
        match self {
            Scenario::Small | Scenario::Backlog => 2048,
            Scenario::Latency => 4096,
            _ => 256,
        }
    }
}

/// What one pair does.
#[derive(Clone, Debug)]
pub struct PairParams {
    pub class: DeliveryClass,
    pub size: usize,
    /// Envelopes per second for this pair (open loop); `None` is closed loop.
    pub rate: Option<f64>,
    /// Unacknowledged envelopes per sender (at-least-once and durable).
    pub window: u64,
    pub duration: Duration,
    /// How long to wait for stragglers after sending stops.
    pub drain: Duration,
    /// The receiver connects only after the sender finished ([`Scenario::Backlog`]); the
    /// sender stops at its first refusal.
    pub backlog: bool,
    /// Seal every envelope end to end with these settings; the receiver opens each.
    pub e2e: Option<openmesh_agent::E2eConfig>,
    /// Where the sender lives on the relay relative to its receiver.
    pub placement: Placement,
    /// The relay's cores (for `placement`).
    pub relay_cores: u16,
}

/// Where a pair's two agents live among the relay's cores (their home cores follow their ids).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Placement {
    /// As the identities fall.
    Any,
    /// Both on one core: every envelope stays on its core.
    One,
    /// On different cores: every envelope crosses between cores.
    Across,
}

impl Placement {
    /// Whether a sender whose home core is `sender` fits a receiver on `receiver`.
    pub fn fits(self, sender: u16, receiver: u16) -> bool {
        match self {
            Placement::Any => true,
            Placement::One => sender == receiver,
            Placement::Across => sender != receiver,
        }
    }
}

/// Shared between a pair's sender and receiver: how many deliveries the receiver should wait for
/// (`u64::MAX` while the sender is still sending), and, for the baselines' windows, how many
/// it got so far.
pub struct Expect {
    want: AtomicU64,
    got: AtomicU64,
    progress: tokio::sync::Notify,
}

impl Expect {
    pub fn new() -> Arc<Self> {
        Arc::new(Expect {
            want: AtomicU64::new(u64::MAX),
            got: AtomicU64::new(0),
            progress: tokio::sync::Notify::new(),
        })
    }
    pub fn set(&self, n: u64) {
        self.want.store(n, Ordering::SeqCst);
    }
    pub fn get(&self) -> u64 {
        self.want.load(Ordering::SeqCst)
    }

    /// The receiver got `n` so far.
    fn received(&self, n: u64) {
        self.got.store(n, Ordering::Release);
        self.progress.notify_one();
    }

    /// Whether a receiver that has `unique` deliveries can stop: the sender finished and either
    /// everything it expects arrived, or `drain` passed since the receiver first saw it finished
    /// (`done_at` remembers when).
    pub fn receiver_done(
        &self,
        unique: u64,
        done_at: &mut Option<Instant>,
        drain: Duration,
    ) -> bool {
        let want = self.get();
        if want == u64::MAX {
            return false;
        }
        let since = *done_at.get_or_insert_with(Instant::now);
        unique >= want || since.elapsed() > drain
    }
}

/// The receiving half's bookkeeping: unique deliveries, duplicates, latency. Shared counters are
/// updated once per batch ([`Recorder::flush`]), the clock read once per batch by the caller.
pub struct Recorder {
    seen: Seen,
    pub hist: Histogram<u64>,
    pub unique: u64,
    live: Arc<Live>,
    batch: (u64, u64, u64, u64),
}

impl Recorder {
    pub fn new(live: Arc<Live>) -> Self {
        Recorder {
            seen: Seen::default(),
            hist: latency_histogram(),
            unique: 0,
            live,
            batch: (0, 0, 0, 0),
        }
    }

    /// Records one received payload, at `now_ns` on the run clock.
    pub fn on_payload(&mut self, p: &[u8], now_ns: u64) {
        let Some((seq, sched)) = payload::parse(p) else {
            self.batch.3 += 1;
            return;
        };
        if self.seen.insert(seq) {
            self.unique += 1;
            self.batch.0 += 1;
            self.batch.1 += p.len() as u64;
            let _ = self.hist.record(now_ns.saturating_sub(sched).max(1));
        } else {
            self.batch.2 += 1;
        }
    }

    /// Adds this batch to the shared counters and the timeline.
    pub fn flush(&mut self, now_ns: u64) {
        let (n, bytes, dups, errors) = std::mem::take(&mut self.batch);
        if n > 0 {
            self.live.delivered.fetch_add(n, Ordering::Relaxed);
            self.live.bytes.fetch_add(bytes, Ordering::Relaxed);
            self.live.slot_add(n, now_ns);
        }
        if dups > 0 {
            self.live.duplicates.fetch_add(dups, Ordering::Relaxed);
        }
        if errors > 0 {
            self.live.errors.fetch_add(errors, Ordering::Relaxed);
        }
    }
}

/// Sets the calling thread's timer slack to 1 ns so that open-loop senders wake on time.
pub fn precise_timers() {
    #[allow(unsafe_code)]
    // SAFETY: PR_SET_TIMERSLACK takes an integer and affects only the calling thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
}

/// Sleeps the calling (dedicated) thread until the run clock reaches `at_ns`.
pub fn sleep_until(live: &Live, at_ns: u64) {
    let now = live.now_ns();
    if at_ns > now {
        std::thread::sleep(Duration::from_nanos(at_ns - now));
    }
}

/// The sending half of a pair on a peer server (NATS, iroh-relay): publishes without
/// acknowledgements, so [`publish`] drives every one of them the same way.
pub trait Publisher: Send + 'static {
    /// Queues one payload; it may wait in the client until [`Publisher::push`].
    fn send(&mut self, payload: Bytes) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Writes out what the client buffered, without waiting for the server.
    fn push(&mut self) -> impl Future<Output = anyhow::Result<()>> + Send {
        async { Ok(()) }
    }
    /// Writes out what the client buffered, and waits until the server has it.
    fn flush(&mut self) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// How long a closed-loop sender waits for its receiver to get anything more before it counts
/// what it is ahead by as lost (the peers drop what a receiver cannot take) and goes on.
const STALL: Duration = Duration::from_millis(100);

/// Sends for `p.duration`: closed loop or open loop at `p.rate`. Returns how many were sent.
///
/// Closed loop, a sender stays at most `p.window` payloads ahead of what its receiver got: the
/// flow control an OpenMesh sender has from its relay's ACKs, which these peers lack (without it
/// a sender outruns the server, which drops or queues without bound, and the rate measured is
/// the collapse). Open loop, payloads are scheduled from a dedicated thread with precise timers
/// (each carries its scheduled time, so latency counts any lateness of the sender too).
pub async fn publish<P: Publisher>(
    mut out: P,
    p: &PairParams,
    live: &Arc<Live>,
    expect: &Expect,
) -> anyhow::Result<u64> {
    let Some(rate) = p.rate else {
        let end = Instant::now() + p.duration;
        let window = p.window.max(64);
        let (mut seq, mut written_off) = (0u64, 0u64);
        let mut buf = BytesMut::new();
        // Written-off payloads that arrive late count as received: never ahead by less than 0.
        let ahead = |seq: u64, written_off: u64| {
            seq.saturating_sub(expect.got.load(Ordering::Acquire) + written_off)
        };
        while Instant::now() < end {
            let ahead_now = ahead(seq, written_off);
            if ahead_now >= window {
                out.push().await?;
                let waiting = expect.progress.notified();
                if ahead(seq, written_off) >= window
                    && tokio::time::timeout(STALL, waiting).await.is_err()
                {
                    written_off = ahead(seq, 0);
                }
                continue;
            }
            let ns = live.now_ns();
            let n = (window - ahead_now).min(256);
            for _ in 0..n {
                payload::fill(&mut buf, p.size, seq, ns);
                out.send(buf.split().freeze()).await?;
                seq += 1;
            }
            live.sent.fetch_add(n, Ordering::Relaxed);
        }
        out.flush().await?;
        return Ok(seq);
    };
    let lv = live.clone();
    let rt = tokio::runtime::Handle::current();
    let (size, dur) = (p.size, p.duration);
    tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
        precise_timers();
        let interval = (1e9 / rate.max(1.0)) as u64;
        let start = lv.now_ns();
        let end = start + dur.as_nanos() as u64;
        let (mut seq, mut next) = (0u64, start);
        let mut buf = BytesMut::new();
        while next < end {
            sleep_until(&lv, next);
            let now = lv.now_ns();
            rt.block_on(async {
                while next <= now && next < end {
                    payload::fill(&mut buf, size, seq, next);
                    out.send(buf.split().freeze()).await?;
                    seq += 1;
                    next += interval;
                    lv.sent.fetch_add(1, Ordering::Relaxed);
                }
                out.flush().await
            })?;
        }
        Ok(seq)
    })
    .await?
}

/// Receives payloads from a peer server until everything `expect` names arrived, or `drain`
/// passed after the sender finished, or the stream ended. Takes what is already buffered with
/// each wake-up: one clock read and one counter update per batch, as OpenMesh receivers do.
pub async fn receive<S>(
    mut inbox: S,
    expect: Arc<Expect>,
    live: Arc<Live>,
    drain: Duration,
) -> Histogram<u64>
where
    S: Stream<Item = Bytes> + Unpin,
{
    let mut rec = Recorder::new(live.clone());
    let mut done_at: Option<Instant> = None;
    loop {
        match tokio::time::timeout(Duration::from_millis(100), inbox.next()).await {
            Ok(Some(m)) => {
                let now = live.now_ns();
                rec.on_payload(&m, now);
                for _ in 0..1024 {
                    match inbox.next().now_or_never() {
                        Some(Some(m)) => rec.on_payload(&m, now),
                        _ => break,
                    }
                }
                rec.flush(now);
                expect.received(rec.unique);
            }
            Ok(None) => break,
            Err(_) => {}
        }
        if expect.receiver_done(rec.unique, &mut done_at, drain) {
            break;
        }
    }
    rec.hist
}

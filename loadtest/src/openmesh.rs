//! Virtual agents on OpenMesh relays, built on the agent library (`openmesh-agent`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use openmesh_agent::{unix_ms, Agent, Batch, ClientConfig, EnvelopeTemplate, Stats};
use openmesh_dataplane::directory::KeyBundle;
use openmesh_dataplane::pki::Identity;
use openmesh_dataplane::wire::{DeliveryClass, EnvelopeBuilder};
use rustls::pki_types::CertificateDer;
use tokio::sync::Semaphore;

use crate::payload::MIN_PAYLOAD;
use crate::report::{ConnectionsReport, Live};
use crate::scenario::{precise_timers, sleep_until, Expect, PairParams, Recorder};

/// Where the relays are and whom to trust.
pub struct Relays {
    pub addrs: Vec<SocketAddr>,
    /// Where receivers connect, when not to `addrs` (a relay fleet: multi-hop).
    pub receive: Vec<SocketAddr>,
    pub ca: Vec<CertificateDer<'static>>,
}

/// How long senders wait after their receivers connected on another relay, for the fleet to
/// learn where the receivers are (presence crosses each link in well under this).
const PRESENCE_SETTLE: std::time::Duration = std::time::Duration::from_millis(500);

impl Relays {
    fn config(&self, idx: usize, name: &str, bind: Option<IpAddr>) -> anyhow::Result<ClientConfig> {
        let id = Identity::generate_self_signed(name)?;
        let mut c = ClientConfig::new(self.addrs[idx % self.addrs.len()], self.ca.clone(), id);
        c.bind = bind;
        // Without `--e2e` the agents measure the relay: no end-to-end keys, nothing published.
        c.e2e = None;
        Ok(c)
    }

    /// A receiver's configuration: on a receive relay when there are any.
    fn receiver(&self, idx: usize, name: &str) -> anyhow::Result<ClientConfig> {
        let mut c = self.config(idx, name, None)?;
        if !self.receive.is_empty() {
            c.relay = self.receive[idx % self.receive.len()];
        }
        Ok(c)
    }
}

/// Source address for the `i`-th connection: 127.0.1.x, a new address every 20,000 connections,
/// so that more than the ~28,000 ephemeral ports of one address can reach one relay.
fn source_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        1 + (i / 20_000 / 250) as u8,
        1 + ((i / 20_000) % 250) as u8,
    ))
}

/// Runs one sender/receiver pair through the relays; returns the receiver's latency histogram.
pub async fn pair(
    relays: Arc<Relays>,
    idx: usize,
    p: PairParams,
    live: Arc<Live>,
) -> anyhow::Result<Histogram<u64>> {
    let mut rcfg = relays.receiver(idx, &format!("loadtest-recv-{idx}"))?;
    rcfg.auto_ack = true;
    rcfg.e2e.clone_from(&p.e2e);
    let recv_id = rcfg.identity.agent_id();
    let mut recv = if p.backlog {
        None
    } else {
        Some(
            Agent::connect(rcfg.clone())
                .await
                .context("receiver connects")?,
        )
    };
    if !relays.receive.is_empty() {
        tokio::time::sleep(PRESENCE_SETTLE).await;
    }
    let mut scfg = relays.config(idx, &format!("loadtest-send-{idx}"), None)?;
    let home =
        |id: &Identity| openmesh_dataplane::routing::home_core(&id.agent_id(), p.relay_cores);
    let mut tries = 0;
    while !p.placement.fits(home(&scfg.identity), home(&rcfg.identity)) {
        // 1 in `relay_cores` draws fits `one`; most fit `across`.
        tries += 1;
        anyhow::ensure!(tries < 10_000, "no identity fits --placement");
        scfg.identity = Identity::generate_self_signed(&format!("loadtest-send-{idx}"))?;
    }
    // The agent's window is the pair's: sending waits while that many are unanswered.
    scfg.window = p.window.clamp(1, u32::MAX as u64) as u32;
    scfg.destination_window = scfg.window;
    if p.backlog {
        // The last batches wait for a receiver that connects only once the sender is done:
        // closing does not wait for their answers.
        scfg.close_timeout = Duration::from_secs(1);
    }
    scfg.e2e.clone_from(&p.e2e);
    let sender = Agent::connect(scfg).await.context("sender connects")?;
    let mut b = sender.envelope_to(recv_id);
    b.expires_ms = b.created_ms + 600_000;
    b.class = p.class;
    let tmpl = if p.e2e.is_some() {
        // The receiver published its bundle when it connected (on its relay).
        let t0 = Instant::now();
        let bundle = loop {
            if let Some(bundle) = sender.lookup(recv_id).await? {
                break bundle;
            }
            anyhow::ensure!(
                t0.elapsed() < Duration::from_secs(5),
                "the receiver's key bundle is not in the directory of the sender's relay (--e2e needs both agents on one relay)"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Source::Sealed {
            builder: b,
            bundle,
            size: p.size.max(MIN_PAYLOAD),
        }
    } else {
        Source::Template(EnvelopeTemplate::new(&b, p.size.max(MIN_PAYLOAD))?)
    };
    let expect = Expect::new();
    let filled = Arc::new(tokio::sync::Notify::new());

    let (exp, lv, drain, fill) = (expect.clone(), live.clone(), p.drain, filled.clone());
    let e2e = p.e2e.is_some();
    let receiver = tokio::spawn(async move {
        let mut recv = match recv.take() {
            Some(r) => r,
            None => {
                // Backlog: connect once the sender has filled the queue.
                fill.notified().await;
                lv.drain_from_ns.fetch_min(lv.now_ns(), Ordering::Relaxed);
                Agent::connect(rcfg).await.context("receiver connects")?
            }
        };
        let mut rec = Recorder::new(lv.clone());
        let mut done_at: Option<Instant> = None;
        let mut evs = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_millis(100), recv.recv_many(&mut evs)).await {
                Ok(true) => {
                    let now = lv.now_ns();
                    for e in evs.drain(..) {
                        if e2e {
                            // A rejection counts as an error (an unparsable payload).
                            let opened = recv.open(&e).map(|o| o.plaintext).unwrap_or_default();
                            rec.on_payload(&opened, now);
                        } else {
                            rec.on_payload(e.payload_ref(), now);
                        }
                    }
                    rec.flush(now);
                }
                Ok(false) => break,
                Err(_) => {}
            }
            if exp.receiver_done(rec.unique, &mut done_at, drain) {
                break;
            }
        }
        lv.drain_to_ns.fetch_max(lv.now_ns(), Ordering::Relaxed);
        anyhow::Ok(rec.hist)
    });

    let sent = match p.rate {
        None => closed_loop(sender, &tmpl, &p, &live).await?,
        Some(rate) => {
            let lv = live.clone();
            let p2 = p.clone();
            let handle = tokio::runtime::Handle::current();
            tokio::task::spawn_blocking(move || open_loop(sender, &tmpl, &p2, rate, &lv, &handle))
                .await??
        }
    };
    expect.set(sent);
    filled.notify_one();
    receiver.await?
}

/// Where a sender's envelopes come from (one per sender: its size does not matter).
#[allow(clippy::large_enum_variant)]
enum Source {
    /// One template, patched per envelope.
    Template(EnvelopeTemplate),
    /// Each envelope sealed to the receiver's bundle (`--e2e`).
    Sealed {
        builder: EnvelopeBuilder,
        bundle: KeyBundle,
        size: usize,
    },
}

/// Appends `n` envelopes, the `i`-th scheduled at `scheduled(i)`.
fn fill_batch(
    s: &Agent,
    src: &Source,
    seq: &mut u64,
    n: u64,
    mut scheduled: impl FnMut(u64) -> u64,
) -> anyhow::Result<Batch> {
    let now_ms = unix_ms();
    match src {
        Source::Template(t) => {
            let mut batch = s.batch(t.frame_len() * n as usize);
            for (i, id) in (0..n).zip(s.message_ids(n)) {
                let (q, ns) = (*seq, scheduled(i));
                batch.push_template(t, id, now_ms, |p| {
                    p[..8].copy_from_slice(&q.to_be_bytes());
                    p[8..16].copy_from_slice(&ns.to_be_bytes());
                });
                *seq += 1;
            }
            Ok(batch)
        }
        Source::Sealed {
            builder,
            bundle,
            size,
        } => {
            let mut batch = s.batch(0);
            let mut b = builder.clone();
            let mut plain = vec![0x5au8; *size];
            b.created_ms = now_ms;
            b.expires_ms = now_ms + 600_000;
            for (i, id) in (0..n).zip(s.message_ids(n)) {
                let (q, ns) = (*seq, scheduled(i));
                plain[..8].copy_from_slice(&q.to_be_bytes());
                plain[8..16].copy_from_slice(&ns.to_be_bytes());
                b.message_id = id;
                batch.push(&s.seal_with(&b, bundle, &plain)?);
                *seq += 1;
            }
            Ok(batch)
        }
    }
}

/// Copies the agent's answer counters into the live view; fails on a refusal retrying cannot
/// fix.
fn settle(s: &Agent, last: &mut Stats, live: &Live) -> anyhow::Result<Stats> {
    let now = s.stats();
    live.acked
        .fetch_add(now.accepted - last.accepted, Ordering::Relaxed);
    live.nacked
        .fetch_add(now.nacked - last.nacked, Ordering::Relaxed);
    *last = now;
    if now.refused > 0 {
        anyhow::bail!("the relay refused {} envelopes", now.refused);
    }
    Ok(now)
}

/// Sends as fast as the agent's window allows for the duration; returns how many deliveries to
/// expect.
async fn closed_loop(s: Agent, t: &Source, p: &PairParams, live: &Live) -> anyhow::Result<u64> {
    let end = Instant::now() + p.duration;
    let mut seq = 0u64;
    let mut last = Stats::default();
    // A quarter of the window a batch (at most 256), so that the next batches can go while
    // earlier ones wait for their answers.
    let n = (p.window / 4).clamp(1, 256);
    loop {
        let st = settle(&s, &mut last, live)?;
        // Backlog: fill the relay's queue until it says it is full.
        if Instant::now() >= end || p.backlog && st.nacked > 0 {
            break;
        }
        let ns = live.now_ns();
        let batch = fill_batch(&s, t, &mut seq, n, |_| ns)?;
        s.send_batch(batch).await?;
        live.sent.fetch_add(n, Ordering::Relaxed);
    }
    finish(s, p, seq, last, live).await
}

/// Sends at `rate` per second from a dedicated thread, each envelope stamped with the time it was
/// scheduled for (so a stall shows up as latency, not as a gap: no coordinated omission).
fn open_loop(
    s: Agent,
    t: &Source,
    p: &PairParams,
    rate: f64,
    live: &Live,
    rt: &tokio::runtime::Handle,
) -> anyhow::Result<u64> {
    precise_timers();
    let interval = (1e9 / rate.max(1.0)) as u64;
    let start = live.now_ns();
    let end = start + p.duration.as_nanos() as u64;
    let mut seq = 0u64;
    let mut last = Stats::default();
    let mut next = start;
    while next < end {
        sleep_until(live, next);
        let now = live.now_ns();
        let mut n = 0;
        while next + n * interval <= now && next + n * interval < end && n < 1024 {
            n += 1;
        }
        let first = next;
        let batch = fill_batch(&s, t, &mut seq, n, |i| first + i * interval)?;
        next += n * interval;
        rt.block_on(s.send_batch(batch))?;
        live.sent.fetch_add(n, Ordering::Relaxed);
        settle(&s, &mut last, live)?;
    }
    rt.block_on(finish(s, p, seq, last, live))
}

/// Waits for the outstanding answers (at most the drain time), closes the sender; returns how
/// many deliveries the receiver should see.
async fn finish(
    s: Agent,
    p: &PairParams,
    sent: u64,
    mut last: Stats,
    live: &Live,
) -> anyhow::Result<u64> {
    if p.class == DeliveryClass::BestEffort {
        return Ok(sent);
    }
    if !p.backlog {
        let _ = tokio::time::timeout(p.drain, s.flush()).await;
    }
    settle(&s, &mut last, live)?;
    let report = s.close().await?;
    live.acked
        .fetch_add(report.stats.accepted - last.accepted, Ordering::Relaxed);
    Ok(report.stats.accepted)
}

/// Ramps to `agents` idle sessions, holds, then churns at `churn_rate` per second.
pub async fn connections(
    relays: Arc<Relays>,
    agents: usize,
    duration: Duration,
    churn_rate: f64,
    relay_pid: Option<u32>,
    live: Arc<Live>,
) -> anyhow::Result<ConnectionsReport> {
    let rss_before = relay_pid.and_then(crate::report::process_rss);
    // Identities are generated up front so the ramp measures the relay, not key generation.
    let ids: Vec<ClientConfig> = (0..agents)
        .map(|i| relays.config(i, &format!("idle-{i}"), Some(source_ip(i))))
        .collect::<anyhow::Result<_>>()?;
    let sem = Arc::new(Semaphore::new(256));
    let t0 = Instant::now();
    let ramp_deadline = t0 + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for cfg in ids {
        let permit = sem.clone().acquire_owned().await?;
        if Instant::now() > ramp_deadline {
            break;
        }
        let lv = live.clone();
        tasks.spawn(async move {
            let r = Agent::connect(cfg).await;
            drop(permit);
            match r {
                Ok(a) => {
                    lv.delivered.fetch_add(1, Ordering::Relaxed);
                    lv.slot_add(1, lv.now_ns());
                    Some(a)
                }
                Err(_) => {
                    lv.errors.fetch_add(1, Ordering::Relaxed);
                    None
                }
            }
        });
    }
    let mut held = Vec::with_capacity(agents);
    while let Some(r) = tasks.join_next().await {
        if let Some(a) = r? {
            held.push(a);
        }
    }
    let ramp_s = t0.elapsed().as_secs_f64();
    let failures = live.errors.load(Ordering::Relaxed);
    // Hold: let the relay settle, then read its memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = relay_pid.and_then(crate::report::process_rss);
    let connected = held.len() as u64;

    // Churn: replace one agent every 1/churn_rate seconds for half the duration.
    let churn_for = duration / 2;
    let interval = Duration::from_secs_f64(1.0 / churn_rate.max(1.0));
    let c0 = Instant::now();
    let (mut churned, mut churn_failures) = (0u64, 0u64);
    let mut i = agents;
    let mut tick = tokio::time::interval(interval);
    let mut pending = tokio::task::JoinSet::new();
    while c0.elapsed() < churn_for {
        tick.tick().await;
        if !held.is_empty() {
            held.swap_remove(i % held.len());
        }
        let cfg = relays.config(i, &format!("churn-{i}"), Some(source_ip(i)))?;
        i += 1;
        pending.spawn(Agent::connect(cfg));
        while let Some(r) = pending.try_join_next() {
            match r? {
                Ok(a) => {
                    churned += 1;
                    held.push(a);
                }
                Err(_) => churn_failures += 1,
            }
        }
    }
    while let Some(r) = pending.join_next().await {
        match r? {
            Ok(_) => churned += 1,
            Err(_) => churn_failures += 1,
        }
    }
    let churn_s = c0.elapsed().as_secs_f64();
    drop(held);
    Ok(ConnectionsReport {
        agents: connected,
        ramp_s,
        handshakes_per_s: connected as f64 / ramp_s.max(1e-9),
        failures,
        relay_rss_before: rss_before,
        relay_rss_after: rss_after,
        relay_rss_per_agent: match (rss_before, rss_after) {
            (Some(b), Some(a)) if connected > 0 => {
                Some(a.saturating_sub(b) as f64 / connected as f64)
            }
            _ => None,
        },
        churn_handshakes_per_s: churned as f64 / churn_s.max(1e-9),
        churn_failures,
    })
}

//! The baseline target: the same pairs against a NATS server through async-nats, so that the
//! comparison uses one generator design. Core NATS has no acknowledgements: best-effort and
//! at-least-once run as plain publishes there, and the report counts what did not arrive as
//! lost. `--class durable` runs on JetStream: each pair's subject is bound to a stream with file
//! storage, every publish waits for JetStream's acknowledgement (at most `window` in flight), and
//! the receiver subscribes to the subject.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::BytesMut;
use futures_util::{FutureExt, StreamExt};
use hdrhistogram::Histogram;

use openmesh_dataplane::wire::DeliveryClass;

use crate::payload;
use crate::report::Live;
use crate::scenario::{precise_timers, sleep_until, Expect, PairParams, Recorder};

/// Runs one publisher/subscriber pair on subject `openmesh.loadtest.IDX`.
pub async fn pair(
    url: Arc<String>,
    idx: usize,
    p: PairParams,
    live: Arc<Live>,
) -> anyhow::Result<Histogram<u64>> {
    let subject = format!("openmesh.loadtest.{idx}");
    let sub_client = async_nats::connect(url.as_str())
        .await
        .context("NATS subscriber connects")?;
    let mut sub = sub_client.subscribe(subject.clone()).await?;
    sub_client.flush().await?;
    let pub_client = async_nats::connect(url.as_str())
        .await
        .context("NATS publisher connects")?;
    let expect = Expect::new();
    let js = if p.class == DeliveryClass::Durable {
        let js = async_nats::jetstream::new(pub_client.clone());
        let name = format!("OMLT{idx}");
        let _ = js.delete_stream(&name).await;
        js.create_stream(async_nats::jetstream::stream::Config {
            name,
            subjects: vec![subject.clone()],
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .context("creating the JetStream stream")?;
        Some(js)
    } else {
        None
    };

    let (exp, lv, drain) = (expect.clone(), live.clone(), p.drain);
    let receiver = tokio::spawn(async move {
        let mut rec = Recorder::new(lv.clone());
        let mut done_at: Option<Instant> = None;
        loop {
            match tokio::time::timeout(Duration::from_millis(100), sub.next()).await {
                Ok(Some(m)) => {
                    // Take everything already buffered too: one clock read and one counter
                    // update per batch, as for OpenMesh receivers.
                    let now = lv.now_ns();
                    rec.on_payload(&m.payload, now);
                    for _ in 0..1024 {
                        match sub.next().now_or_never() {
                            Some(Some(m)) => rec.on_payload(&m.payload, now),
                            _ => break,
                        }
                    }
                    rec.flush(now);
                }
                Ok(None) => break,
                Err(_) => {}
            }
            if exp.receiver_done(rec.unique, &mut done_at, drain) {
                break;
            }
        }
        drop(sub_client);
        rec.hist
    });

    let sent = match (p.rate, js) {
        (None, Some(js)) => jetstream_closed_loop(&js, &subject, &p, &live).await?,
        (Some(_), Some(_)) => anyhow::bail!("JetStream runs closed loop only"),
        (None, None) => {
            let end = Instant::now() + p.duration;
            let mut seq = 0u64;
            let mut buf = BytesMut::new();
            while Instant::now() < end {
                let ns = live.now_ns();
                for _ in 0..256 {
                    payload::fill(&mut buf, p.size, seq, ns);
                    pub_client
                        .publish(subject.clone(), buf.split().freeze())
                        .await?;
                    seq += 1;
                }
                live.sent.fetch_add(256, Ordering::Relaxed);
            }
            pub_client.flush().await?;
            seq
        }
        (Some(rate), None) => {
            let lv = live.clone();
            let rt = tokio::runtime::Handle::current();
            let (client, subj, size, dur) =
                (pub_client.clone(), subject.clone(), p.size, p.duration);
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
                            client.publish(subj.clone(), buf.split().freeze()).await?;
                            seq += 1;
                            next += interval;
                            lv.sent.fetch_add(1, Ordering::Relaxed);
                        }
                        client.flush().await?;
                        anyhow::Ok(())
                    })?;
                }
                Ok(seq)
            })
            .await??
        }
    };
    if p.class != DeliveryClass::Durable {
        live.acked.fetch_add(sent, Ordering::Relaxed);
    }
    expect.set(sent);
    Ok(receiver.await?)
}

/// Publishes to JetStream as fast as `window` unacknowledged publishes allow; returns how many
/// were acknowledged.
async fn jetstream_closed_loop(
    js: &async_nats::jetstream::Context,
    subject: &str,
    p: &PairParams,
    live: &Live,
) -> anyhow::Result<u64> {
    let end = Instant::now() + p.duration;
    let mut inflight = std::collections::VecDeque::new();
    let (mut seq, mut acked) = (0u64, 0u64);
    let mut buf = BytesMut::new();
    while Instant::now() < end {
        while (inflight.len() as u64) < p.window.max(1) {
            payload::fill(&mut buf, p.size, seq, live.now_ns());
            inflight.push_back(
                js.publish(subject.to_string(), buf.split().freeze())
                    .await?,
            );
            seq += 1;
            live.sent.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(f) = inflight.pop_front() {
            f.await.context("JetStream publish")?;
            acked += 1;
            live.acked.fetch_add(1, Ordering::Relaxed);
        }
    }
    while let Some(f) = inflight.pop_front() {
        f.await.context("JetStream publish")?;
        acked += 1;
        live.acked.fetch_add(1, Ordering::Relaxed);
    }
    Ok(acked)
}

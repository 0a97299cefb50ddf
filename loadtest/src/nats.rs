//! The baseline target: the same pairs against a NATS server through async-nats, so that the
//! comparison uses one generator design. Core NATS has no acknowledgements: best-effort and
//! at-least-once run as plain publishes there, and the report counts what did not arrive as
//! lost. `--class durable` runs on JetStream: each pair's subject is bound to a stream with file
//! storage, every publish waits for JetStream's acknowledgement (at most `window` in flight), and
//! the receiver subscribes to the subject.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use hdrhistogram::Histogram;

use openmesh_dataplane::wire::DeliveryClass;

use crate::payload;
use crate::report::Live;
use crate::scenario::{Expect, PairParams, Publisher};

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
    let sub = sub_client.subscribe(subject.clone()).await?;
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
        let hist = crate::scenario::receive(sub.map(|m| m.payload), exp, lv, drain).await;
        drop(sub_client);
        hist
    });

    let sent = match (p.rate, js) {
        (None, Some(js)) => jetstream_closed_loop(&js, &subject, &p, &live).await?,
        (Some(_), Some(_)) => anyhow::bail!("JetStream runs closed loop only"),
        (_, None) => {
            let out = Publish {
                client: pub_client.clone(),
                subject: subject.clone().into(),
            };
            crate::scenario::publish(out, &p, &live, &expect).await?
        }
    };
    if p.class != DeliveryClass::Durable {
        live.acked.fetch_add(sent, Ordering::Relaxed);
    }
    expect.set(sent);
    Ok(receiver.await?)
}

/// Core NATS publishing on one subject.
struct Publish {
    client: async_nats::Client,
    subject: async_nats::Subject,
}

impl Publisher for Publish {
    async fn send(&mut self, payload: Bytes) -> anyhow::Result<()> {
        Ok(self.client.publish(self.subject.clone(), payload).await?)
    }
    async fn flush(&mut self) -> anyhow::Result<()> {
        Ok(self.client.flush().await?)
    }
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

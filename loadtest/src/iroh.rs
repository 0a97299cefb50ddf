//! The second baseline: the same pairs through an iroh-relay (`iroh-relay --dev`, plain HTTP),
//! with iroh's own client. Each agent is an endpoint with a fresh key; a sender relays each
//! payload as one datagram to its receiver's endpoint id. iroh-relay has no acknowledgements
//! and drops what a receiver's queue cannot take: every class runs as best-effort there, and
//! the report counts what did not arrive as lost.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::Context as _;
use bytes::Bytes;
use futures_util::{Sink, SinkExt, Stream};
use hdrhistogram::Histogram;
use iroh_base::{EndpointId, RelayUrl, SecretKey};
use iroh_relay::client::{Client, ClientBuilder};
use iroh_relay::protos::relay::{ClientToRelayMsg, Datagrams, RelayToClientMsg};

use crate::report::Live;
use crate::scenario::{Expect, PairParams, Publisher};

/// An iroh-relay to connect to, from `--target iroh://HOST:PORT`.
pub struct Server {
    url: RelayUrl,
    tls: rustls::ClientConfig,
    dns: iroh_dns::dns::DnsResolver,
}

impl Server {
    /// `addr` is `HOST:PORT` of a relay serving plain HTTP.
    pub fn new(addr: &str) -> anyhow::Result<Self> {
        let url: RelayUrl = format!("http://{addr}")
            .parse()
            .with_context(|| format!("iroh-relay address {addr}"))?;
        // Required by the client even over plain HTTP (then unused).
        let tls = iroh_relay::tls::CaTlsConfig::default()
            .client_config(iroh_relay::tls::default_provider())?;
        Ok(Server {
            url,
            tls,
            dns: iroh_dns::dns::DnsResolver::new(),
        })
    }

    async fn connect(&self, key: SecretKey) -> anyhow::Result<Client> {
        ClientBuilder::new(self.url.clone(), key, self.dns.clone())
            .tls_client_config(self.tls.clone())
            .connect()
            .await
            .context("connecting to the iroh-relay")
    }
}

/// Runs one sender/receiver pair.
pub async fn pair(
    server: Arc<Server>,
    p: PairParams,
    live: Arc<Live>,
) -> anyhow::Result<Histogram<u64>> {
    let key = SecretKey::generate();
    let to = key.public();
    let inbox = Inbox {
        client: server.connect(key).await?,
        pong: None,
    };
    let client = server.connect(SecretKey::generate()).await?;
    let expect = Expect::new();
    let receiver = tokio::spawn(crate::scenario::receive(
        inbox,
        expect.clone(),
        live.clone(),
        p.drain,
    ));
    let sent = crate::scenario::publish(
        Relay {
            client,
            to,
            unflushed: 0,
        },
        &p,
        &live,
        &expect,
    )
    .await?;
    live.acked.fetch_add(sent, Ordering::Relaxed);
    expect.set(sent);
    Ok(receiver.await?)
}

/// A sender: each payload one datagram to `to`.
struct Relay {
    client: Client,
    to: EndpointId,
    /// Datagrams fed to the client since it last wrote out.
    unflushed: usize,
}

/// Datagrams the client buffers before it writes out: its sink buffers whatever it is fed until
/// it is flushed, so a closed loop flushes this often (and waits for the socket then).
const FLUSH_EVERY: usize = 64;

impl Publisher for Relay {
    async fn send(&mut self, payload: Bytes) -> anyhow::Result<()> {
        let msg = ClientToRelayMsg::Datagrams {
            dst_endpoint_id: self.to,
            datagrams: Datagrams {
                ecn: None,
                segment_size: None,
                contents: payload,
            },
        };
        self.client.feed(msg).await?;
        self.unflushed += 1;
        if self.unflushed >= FLUSH_EVERY {
            self.push().await?;
        }
        Ok(())
    }
    async fn push(&mut self) -> anyhow::Result<()> {
        self.unflushed = 0;
        Ok(SinkExt::<ClientToRelayMsg>::flush(&mut self.client).await?)
    }
    async fn flush(&mut self) -> anyhow::Result<()> {
        self.push().await
    }
}

/// A receiver: the datagrams' payloads. The relay pings a client that has not written for a
/// while and drops it without an answer, so pings are answered here.
struct Inbox {
    client: Client,
    pong: Option<[u8; 8]>,
}

impl Stream for Inbox {
    type Item = Bytes;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        let this = &mut *self;
        loop {
            if let Some(data) = this.pong {
                let mut sink = Pin::new(&mut this.client);
                if let Poll::Ready(r) = Sink::<ClientToRelayMsg>::poll_ready(sink.as_mut(), cx) {
                    if r.is_err()
                        || sink
                            .as_mut()
                            .start_send(ClientToRelayMsg::Pong(data))
                            .is_err()
                    {
                        return Poll::Ready(None);
                    }
                    this.pong = None;
                }
            }
            let _ = Sink::<ClientToRelayMsg>::poll_flush(Pin::new(&mut this.client), cx);
            match Pin::new(&mut this.client).poll_next(cx) {
                Poll::Ready(Some(Ok(RelayToClientMsg::Datagrams { datagrams, .. }))) => {
                    return Poll::Ready(Some(datagrams.contents))
                }
                Poll::Ready(Some(Ok(RelayToClientMsg::Ping(data)))) => this.pong = Some(data),
                Poll::Ready(Some(Ok(_))) => {}
                Poll::Ready(Some(Err(_)) | None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

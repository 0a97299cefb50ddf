//! A relay that keeps sending but stops reading: what the agent holds to write stays bounded
//! (ACKs wait in their bounded holding place, PINGs go unanswered, nothing piles up behind a
//! socket that takes nothing), while the application still gets every envelope.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use openmesh_agent::{Agent, ClientConfig};
use openmesh_dataplane::pki::Identity;
use openmesh_dataplane::signaling::{negotiate, ContractPolicy};
use openmesh_dataplane::testing::InMemoryRelay;
use openmesh_dataplane::wire::{
    AgentId, DeliveryClass, Destination, EnvelopeBuilder, Frame, FrameDecoder, MessageId, Ping,
};

/// Envelopes the relay writes; their ACKs alone (16 bytes each) are 12 MiB, far more than the
/// socket buffers hold.
const FLOOD: u64 = 800_000;
/// Envelopes per pre-encoded block.
const BLOCK: u64 = 4_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_stops_reading_cannot_grow_what_the_agent_holds_to_write() {
    let relay = InMemoryRelay::new();
    let id = Identity::generate_self_signed("victim").unwrap();
    let agent_id = id.agent_id();
    // A small receive buffer (inherited by the accepted socket): the agent's socket fills soon.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(16 << 10).unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = sock.listen(4).unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(relay.server_tls.clone());
    let relay_id = relay.relay.relay_id();

    let hostile = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        // The HELLO, then never a byte more is read.
        let (dec, mut rx) = (FrameDecoder::new(1 << 20), BytesMut::new());
        let hello = loop {
            if let Some(Frame::Hello(h)) = dec.decode(&mut rx).unwrap() {
                break h;
            }
            assert!(tls.read_buf(&mut rx).await.unwrap() > 0, "HELLO");
        };
        let policy = ContractPolicy {
            deliver_window: 1 << 20,
            ..ContractPolicy::default()
        };
        let welcome = negotiate(&hello, &policy, 1, relay_id, agent_id).unwrap();
        tls.write_all(&Frame::Welcome(welcome).to_bytes())
            .await
            .unwrap();
        let now = openmesh_agent::unix_ms();
        let mut block = BytesMut::new();
        for i in 0..BLOCK {
            let mut b = EnvelopeBuilder::new(
                MessageId([i as u8; 16]),
                AgentId([7; 32]),
                Destination::Agent(agent_id),
                now,
                600_000,
            );
            b.class = DeliveryClass::AtLeastOnce;
            Frame::Envelope(b.build(b"payload").unwrap()).encode(&mut block);
            if i % 500 == 0 {
                Frame::Ping(Ping { timestamp_us: i }).encode(&mut block);
            }
        }
        let block = block.freeze();
        for _ in 0..FLOOD / BLOCK {
            tls.write_all(&block).await.unwrap();
        }
        tls.flush().await.unwrap();
        // Holds the connection (still not reading) until the test ends.
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(tls);
    });

    let mut cfg = ClientConfig::new(addr, vec![relay.ca.cert.clone()], id);
    cfg.server_name = Some("localhost".into());
    cfg.auto_ack = true;
    let mut agent = Agent::connect(cfg).await.unwrap();

    let (mut got, mut most_unwritten) = (0u64, 0u64);
    let mut evs = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while got < FLOOD {
        assert!(Instant::now() < deadline, "received {got} of {FLOOD}");
        if let Ok(true) =
            tokio::time::timeout(Duration::from_secs(5), agent.recv_many(&mut evs)).await
        {
            got += evs.len() as u64;
            evs.clear();
        }
        most_unwritten = most_unwritten.max(agent.stats().unwritten_bytes);
    }
    // Let the driver try to write whatever it still holds.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let st = agent.stats();
    most_unwritten = most_unwritten.max(st.unwritten_bytes);
    eprintln!(
        "most held to write: {most_unwritten} bytes; at the end {}",
        st.unwritten_bytes
    );
    assert_eq!(st.received, FLOOD, "every envelope reached the application");
    assert!(
        st.unwritten_bytes > 0,
        "the relay reads nothing: the agent's writes must be stuck, or this tests nothing"
    );
    // One group of held ACKs (at most 65,536 ids of 16 bytes, in frames) and the records
    // sealed from it: about 1 MiB each. Without the bound the ACKs for every envelope read
    // pile up (12 MiB).
    assert!(
        most_unwritten <= 3 << 20,
        "the agent held {most_unwritten} bytes to write"
    );
    hostile.abort();
}

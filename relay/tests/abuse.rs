//! Bad input through the real binary: every refusal has its documented reason, is counted, and a
//! well-behaved pair connected at the same time loses nothing.

mod common;

use std::time::Duration;

use bytes::BytesMut;
use common::{welcomed, well_behaved_pair, RawLink, Relay};
use openmesh_agent::session::Event;
use openmesh_agent::unix_ms;
use openmesh_dataplane::wire::{Frame, MessageId, Reason};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_gets_its_reason_and_others_lose_nothing() {
    let relay = Relay::start(&["--cores", "2"], None);
    let good = well_behaved_pair(&relay, 3_000);

    // Garbage: a frame of an unknown type.
    let mut l = RawLink::open(&relay, "garbage").await;
    l.send(&[0, 0, 0, 4, 0xee, 1, 2, 3]).await;
    assert_eq!(l.expect_close().await, Reason::ProtocolError as u16);

    // A length prefix above the maximum frame, after a valid HELLO.
    let mut l = welcomed(&relay, "big").await;
    l.send(&(64u32 << 20).to_be_bytes()).await;
    assert_eq!(l.expect_close().await, Reason::FrameTooLarge as u16);

    // An envelope before HELLO.
    let mut l = RawLink::open(&relay, "eager").await;
    let env = openmesh_dataplane::wire::EnvelopeBuilder::new(
        MessageId::from_u128(1),
        Default::default(),
        openmesh_dataplane::wire::Destination::Agent(Default::default()),
        unix_ms(),
        1000,
    )
    .build(b"too early")
    .unwrap();
    let mut b = BytesMut::new();
    env.encode(&mut b);
    l.send(&b).await;
    assert_eq!(l.expect_close().await, Reason::UnexpectedFrame as u16);

    // A truncated frame: half an envelope, then the sender hangs up.
    let mut l = welcomed(&relay, "truncated").await;
    l.send(&b[..b.len() / 2]).await;
    tokio::io::AsyncWriteExt::shutdown(&mut l.io).await.unwrap();
    assert!(l.next().await.is_none() || l.next().await.is_none());

    // Hop limit 0 and an expired envelope: refused with NACKs, the session goes on.
    let mut a = relay.agent("nacked").await;
    let peer = relay.agent("peer").await;
    let mut hop0 = a.envelope_to(peer.id(), 10_000);
    hop0.hop_limit = 0;
    let hop0 = hop0.build(b"no hops").unwrap();
    let mut old = a.envelope_to(peer.id(), 10_000);
    old.created_ms = unix_ms() - 5_000;
    old.expires_ms = unix_ms() - 1_000;
    let old = old.build(b"stale").unwrap();
    let mut ttl = a.envelope_to(peer.id(), 10_000);
    ttl.expires_ms = unix_ms() + 365 * 24 * 3600 * 1000;
    let ttl = ttl.build(b"forever").unwrap();
    for e in [&hop0, &old, &ttl] {
        a.send(e).await.unwrap();
    }
    let mut reasons = Vec::new();
    while reasons.len() < 3 {
        match tokio::time::timeout(Duration::from_secs(10), a.next_event()).await {
            Ok(Some(Event::Nacked(n))) => reasons.push((n.message_id, n.reason())),
            other => panic!("expected NACK, got {other:?}"),
        }
    }
    assert!(reasons.contains(&(hop0.message_id(), Some(Reason::HopLimitExceeded))));
    assert!(reasons.contains(&(old.message_id(), Some(Reason::Expired))));
    assert!(reasons.contains(&(ttl.message_id(), Some(Reason::TtlTooLong))));

    assert_eq!(
        good.await.unwrap(),
        3_000,
        "the well-behaved pair lost nothing"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = relay.scrape();
    let hs = |r: &str| {
        common::metric_in(
            &text,
            "openmesh_handshake_failures_total",
            &[&format!("reason=\"{r}\"")],
        )
    };
    let closed = |r: &str| {
        common::metric_in(
            &text,
            "openmesh_sessions_closed_total",
            &[&format!("reason=\"{r}\"")],
        )
    };
    let refused = |r: &str| {
        common::metric_in(
            &text,
            "openmesh_envelopes_refused_total",
            &[&format!("reason=\"{r}\"")],
        )
    };
    assert_eq!(hs("protocol_error"), 1.0);
    assert_eq!(hs("unexpected_frame"), 1.0);
    assert_eq!(closed("frame_too_large"), 1.0);
    assert_eq!(closed("truncated_frame"), 1.0);
    assert_eq!(refused("hop_limit_exceeded"), 1.0);
    assert_eq!(refused("expired"), 1.0);
    assert_eq!(refused("ttl_too_long"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_above_the_rate_limit_is_paced_not_dropped_and_memory_stays_bounded() {
    const FLOOD: u64 = 6_000;
    let relay = Relay::start(&["--cores", "2"], Some("[session]\nrate_frames = 3000\n"));
    let rss_before = relay.rss();
    let good = well_behaved_pair(&relay, 2_000);
    let mut flooder = relay.agent("flooder").await;
    let mut sink = relay.agent("sink").await;
    let to = sink.id();
    let sink_task = tokio::spawn(async move {
        let mut n = 0;
        while n < FLOOD {
            match tokio::time::timeout(Duration::from_secs(20), sink.next_event()).await {
                Ok(Some(Event::Envelope(e))) => {
                    sink.ack(e.message_id()).await.unwrap();
                    n += 1;
                }
                other => panic!("sink got {other:?}"),
            }
        }
        n
    });
    let payload = [7u8; 256];
    let t0 = std::time::Instant::now();
    // The client queues everything at once; the relay reads it at its pace.
    for _ in 0..FLOOD {
        flooder
            .send(&flooder.envelope_to(to, 60_000).build(&payload).unwrap())
            .await
            .unwrap();
    }
    let mut acked = 0;
    while acked < FLOOD {
        match tokio::time::timeout(Duration::from_secs(20), flooder.next_event()).await {
            Ok(Some(Event::Acked(ids))) => acked += ids.len() as u64,
            other => panic!("flooder got {other:?}"),
        }
    }
    let took = t0.elapsed();
    assert_eq!(sink_task.await.unwrap(), FLOOD, "paced, not dropped");
    assert_eq!(good.await.unwrap(), 2_000);
    // 6000 envelopes at 3000/s with a 300-envelope burst cannot take less than ~1.9 s.
    assert!(
        took >= Duration::from_millis(1_500),
        "flood was not paced: {took:?}"
    );
    let text = relay.scrape();
    assert!(
        common::metric_in(
            &text,
            "openmesh_reads_throttled_total",
            &["limit=\"frames\""]
        ) > 0.0
    );
    assert_eq!(
        common::metric_in(&text, "openmesh_envelopes_dropped_total", &[]),
        0.0
    );
    let rss_after = relay.rss();
    assert!(
        rss_after < rss_before + (64 << 20),
        "relay RSS grew from {rss_before} to {rss_after}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_is_cut_off_after_the_write_timeout() {
    let relay = Relay::start(
        &["--cores", "1"],
        Some("[session]\nwrite_timeout_ms = 500\n"),
    );
    // The stuck agent completes HELLO, then only sends ACKs (for ids it never got: counted and
    // ignored) and never reads again.
    let mut stuck = welcomed(&relay, "stuck").await;
    let stuck_id = stuck.id;
    let pinger = tokio::spawn(async move {
        for i in 0..40u64 {
            let ping = Frame::Ack(openmesh_dataplane::wire::AckBatch::new([
                MessageId::from_u128(i as u128),
            ]))
            .to_bytes();
            if tokio::io::AsyncWriteExt::write_all(&mut stuck.io, &ping)
                .await
                .is_err()
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    });
    // A sender fills the stuck agent's socket and send queue with 16 KiB envelopes.
    let mut sender = relay.agent("sender").await;
    let payload = vec![1u8; 16 << 10];
    let t0 = std::time::Instant::now();
    let mut closed = 0.0;
    while t0.elapsed() < Duration::from_secs(8) {
        for _ in 0..64 {
            sender
                .send(
                    &sender
                        .envelope_to(stuck_id, 30_000)
                        .build(&payload)
                        .unwrap(),
                )
                .await
                .unwrap();
        }
        while let Some(ev) = sender.try_event() {
            if let Event::Closed(c) = ev {
                panic!("the sender was cut off: {c:?}");
            }
        }
        closed = relay.metric(
            "openmesh_sessions_closed_total",
            &["reason=\"write_timeout\""],
        );
        if closed > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(closed, 1.0, "the stuck agent was closed for not reading");
    assert!(
        pinger.await.unwrap(),
        "the stuck agent's link was shut down"
    );
    // Everyone else is still served.
    let mut other = relay.agent("other").await;
    sender
        .send(
            &sender
                .envelope_to(other.id(), 10_000)
                .build(b"still served")
                .unwrap(),
        )
        .await
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(10), other.next_event()).await {
        Ok(Some(Event::Envelope(e))) => assert_eq!(&e.payload()[..], b"still served"),
        other => panic!("{other:?}"),
    }
}

//! Hostile peers against the real binary on its defaults: each attack is paced, refused or closed
//! with its documented reason, the relay's memory stays bounded, and a well-behaved pair on the
//! same relay loses nothing.

mod common;

use std::time::Duration;

use common::{welcomed, well_behaved_pair, RawLink, Relay};
use openmesh_agent::session::{Event, Session};
use openmesh_dataplane::wire::{AckBatch, Frame, MessageId, Nack, Ping, Reason};

/// A receiver that reads everything but never ACKs holds at most its deliver window in flight;
/// beyond the window and the destination queue the sender is refused `queue_full`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_never_acks_holds_one_window_not_everything_sent() {
    const N: u64 = 8192; // 128 MiB of 16 KiB envelopes
    let relay = Relay::start(&["--cores", "2"], None);
    let good = well_behaved_pair(&relay, 2_000);
    let rss_before = relay.rss();
    let mut sink = relay.agent("never-acks").await;
    let sink_id = sink.id();
    let reader = tokio::spawn(async move {
        let mut got = 0u64;
        // Reads (so TCP never pushes back) and never ACKs.
        while let Ok(Some(ev)) =
            tokio::time::timeout(Duration::from_secs(3), sink.next_event()).await
        {
            if let Event::Envelope(_) = ev {
                got += 1;
            }
        }
        (got, sink)
    });
    let mut sender = relay.agent("sender").await;
    let payload = vec![3u8; 16 << 10];
    let frame_len = sender
        .envelope_to(sink_id, 60_000)
        .build(&payload)
        .unwrap()
        .frame_len() as u64;
    let (mut acked, mut full, mut sent) = (0u64, 0u64, 0u64);
    while acked + full < N {
        while sent < N && sent - acked - full < 512 {
            let env = sender.envelope_to(sink_id, 60_000).build(&payload).unwrap();
            sender.send(&env).await.unwrap();
            sent += 1;
        }
        match tokio::time::timeout(Duration::from_secs(20), sender.next_event()).await {
            Ok(Some(Event::Acked(ids))) => acked += ids.len() as u64,
            Ok(Some(Event::Nacked(n))) => {
                assert_eq!(n.reason(), Some(Reason::QueueFull));
                full += 1;
            }
            other => panic!("sender got {other:?}"),
        }
    }
    let rss_after = relay.rss();
    let (got, _sink) = reader.await.unwrap();
    // The deliver window (4 MiB by default) over 16 KiB frames.
    let window = (4u64 << 20) / frame_len;
    assert!(
        got <= window,
        "{got} envelopes written to a receiver that never ACKed (window {window})"
    );
    assert!(full > N / 2, "most of the flood was refused: {full} of {N}");
    assert_eq!(
        good.await.unwrap(),
        2_000,
        "the well-behaved pair lost nothing"
    );
    // The gauge sums every session: the sink's window, plus at most the good pair's own 256.
    let inflight = relay.metric("openmesh_inflight_envelopes", &[]);
    assert!(inflight <= (window + 256) as f64, "in flight {inflight}");
    // Held: one deliver window (4 MiB) in flight plus the destination's queue (16 MiB), with the
    // read blocks they pin; everything sent (128 MiB) would be far above this.
    assert!(
        rss_after < rss_before + (96 << 20),
        "RSS grew from {rss_before} to {rss_after} for 128 MiB sent"
    );
}

/// A peer that floods PINGs (and never reads the PONGs) is closed with `ping_flood`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_flood_is_closed_with_its_reason() {
    let relay = Relay::start(&["--cores", "2"], None);
    let good = well_behaved_pair(&relay, 1_000);
    let mut l = welcomed(&relay, "pinger").await;
    let mut burst = Vec::new();
    for i in 0..64u64 {
        burst.extend_from_slice(&Frame::Ping(Ping { timestamp_us: i }).to_bytes());
    }
    l.send(&burst).await;
    assert_eq!(l.expect_close().await, Reason::PingFlood as u16);
    assert_eq!(
        relay.settled_metric(
            "openmesh_sessions_closed_total",
            &["reason=\"ping_flood\""],
            1.0
        ),
        1.0
    );
    assert_eq!(good.await.unwrap(), 1_000);
}

/// An envelope longer than the destination's negotiated `max_frame` is refused at ingress and
/// never reaches the destination, which stays connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_above_the_destinations_max_frame_is_refused_not_forwarded() {
    let relay = Relay::start(&["--cores", "2"], None);
    let mut small = relay.config("small-frames");
    small.hello.max_frame = 4096;
    let mut small = Session::connect(small).await.unwrap();
    assert_eq!(small.welcome().max_frame, 4096);
    let mut sender = relay.agent("big-sender").await;
    let big = sender
        .envelope_to(small.id(), 10_000)
        .build(&[1u8; 8192])
        .unwrap();
    let fits = sender
        .envelope_to(small.id(), 10_000)
        .build(&[2u8; 1000])
        .unwrap();
    sender.send(&big).await.unwrap();
    sender.send(&fits).await.unwrap();
    let mut outcome = Vec::new();
    while outcome.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(10), sender.next_event()).await {
            Ok(Some(Event::Nacked(n))) => outcome.push((n.message_id, n.reason())),
            Ok(Some(Event::Acked(ids))) => outcome.extend(ids.ids().map(|i| (i, None))),
            other => panic!("sender got {other:?}"),
        }
    }
    assert!(outcome.contains(&(big.message_id(), Some(Reason::TooLargeForDestination))));
    assert!(outcome.contains(&(fits.message_id(), None)));
    match tokio::time::timeout(Duration::from_secs(10), small.next_event()).await {
        Ok(Some(Event::Envelope(e))) => assert_eq!(e.message_id(), fits.message_id()),
        other => panic!("receiver got {other:?}"),
    }
    small.ack(fits.message_id()).await.unwrap();
    assert!(small.try_event().is_none(), "nothing else arrived");
}

/// ACKs and NACKs for ids the relay never wrote are counted and change nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ack_and_nack_ids_are_counted_and_change_nothing() {
    let relay = Relay::start(&["--cores", "1"], None);
    let mut liar = welcomed(&relay, "liar").await;
    // Something really in flight to the liar, which it never ACKs.
    let sender = relay.agent("sender").await;
    let real = sender.envelope_to(liar.id, 60_000).build(b"real").unwrap();
    sender.send(&real).await.unwrap();
    loop {
        match liar.next().await {
            Some(Frame::Envelope(e)) => {
                assert_eq!(e.message_id(), real.message_id());
                break;
            }
            Some(_) => continue,
            None => panic!("liar's link ended"),
        }
    }
    let mut bogus = Vec::new();
    for i in 0..1000u128 {
        bogus.extend_from_slice(
            &Frame::Nack(Nack::new(MessageId::from_u128(i), Reason::QueueFull)).to_bytes(),
        );
    }
    bogus.extend_from_slice(
        &Frame::Ack(AckBatch::new((5000..6000u128).map(MessageId::from_u128))).to_bytes(),
    );
    liar.send(&bogus).await;
    assert_eq!(
        relay.settled_metric("openmesh_unknown_ids_total", &["frame=\"nack\""], 1000.0),
        1000.0
    );
    assert_eq!(
        relay.settled_metric("openmesh_unknown_ids_total", &["frame=\"ack\""], 1000.0),
        1000.0
    );
    assert_eq!(relay.metric("openmesh_envelopes_dropped_total", &[]), 0.0);
    assert_eq!(
        relay.settled_metric("openmesh_inflight_envelopes", &[], 1.0),
        1.0,
        "the real envelope is still in flight"
    );
    // The real ACK still settles it.
    liar.send(&Frame::Ack(AckBatch::new([real.message_id()])).to_bytes())
        .await;
    assert_eq!(
        relay.settled_metric("openmesh_inflight_envelopes", &[], 0.0),
        0.0
    );
    assert_eq!(relay.metric("openmesh_acks_received_total", &[]), 1.0);
}

/// Identities are free: one source sends to 1,000 fresh identities that connect, are sent
/// envelopes without ACKing them, and leave. What the relay holds for them is bounded by the
/// source's quota (`limits.memory_budget / 16` across the cores); beyond it the source is refused
/// `quota_exceeded`, the relay's memory stays within its budget, and a well-behaved pair keeps
/// flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_fresh_identities_cannot_grow_custody_past_the_source_quota() {
    const VICTIMS: usize = 1000;
    const PER_VICTIM: usize = 4;
    const BUDGET: u64 = 64 << 20;
    let relay = Relay::start(
        &["--cores", "2"],
        Some(&format!("[limits]\nmemory_budget = {BUDGET}\n")),
    );
    let good = well_behaved_pair(&relay, 2_000);
    let rss_before = relay.rss();
    let mut attacker = relay.agent("attacker").await;
    let payload = vec![9u8; 16 << 10];
    let (mut acked, mut over_quota) = (0usize, 0usize);
    let mut frame_len = 0;
    for wave in 0..VICTIMS / 10 {
        // Ten fresh identities at a time: connect, receive, leave without ACKing.
        let mut victims = Vec::new();
        for i in 0..10 {
            let mut cfg = relay.config(&format!("victim-{wave}-{i}"));
            cfg.answer_pings = true;
            victims.push(Session::connect(cfg));
        }
        let victims: Vec<Session> = futures_join(victims).await;
        for v in &victims {
            for _ in 0..PER_VICTIM {
                let env = attacker
                    .envelope_to(v.id(), 60_000)
                    .build(&payload)
                    .unwrap();
                frame_len = env.frame_len();
                attacker.send(&env).await.unwrap();
            }
        }
        let mut answered = 0;
        while answered < 10 * PER_VICTIM {
            match tokio::time::timeout(Duration::from_secs(20), attacker.next_event()).await {
                Ok(Some(Event::Acked(ids))) => {
                    acked += ids.len();
                    answered += ids.len();
                }
                Ok(Some(Event::Nacked(n))) => {
                    assert_eq!(n.reason(), Some(Reason::QuotaExceeded), "{n:?}");
                    over_quota += 1;
                    answered += 1;
                }
                other => panic!("attacker got {other:?}"),
            }
        }
        drop(victims);
    }
    let quota = (BUDGET / 16) as usize;
    assert!(
        acked * frame_len <= quota,
        "{acked} envelopes of {frame_len} bytes held past the quota of {quota}"
    );
    assert!(
        acked > 0 && over_quota > VICTIMS * PER_VICTIM / 2,
        "acked {acked}, refused {over_quota}"
    );
    assert_eq!(
        good.await.unwrap(),
        2_000,
        "the well-behaved pair lost nothing"
    );
    assert!(
        relay.metric(
            "openmesh_envelopes_refused_total",
            &["reason=\"quota_exceeded\""]
        ) > 0.0
    );
    let rss_after = relay.rss();
    assert!(
        rss_after < rss_before + BUDGET,
        "RSS grew from {rss_before} to {rss_after}, budget {BUDGET}"
    );
}

async fn futures_join(
    v: Vec<impl std::future::Future<Output = Result<Session, openmesh_agent::ClientError>>>,
) -> Vec<Session> {
    let mut out = Vec::new();
    for f in v {
        out.push(f.await.expect("victim connects"));
    }
    out
}

/// A frame announced before HELLO may be at most 16 KiB: a peer that announces a large one is
/// closed at once instead of holding a megabyte per connection until the handshake timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_partial_frame_before_hello_is_refused_at_once() {
    let relay = Relay::start(&["--cores", "2"], None);
    let rss_before = relay.rss();
    let mut links = Vec::new();
    for i in 0..100 {
        let mut l = RawLink::open(&relay, &format!("slow-{i}")).await;
        let mut partial = (1u32 << 20).to_be_bytes().to_vec();
        partial.extend_from_slice(&[1u8; 8000]);
        l.send(&partial).await;
        links.push(l);
    }
    for l in &mut links {
        assert_eq!(l.expect_close().await, Reason::FrameTooLarge as u16);
    }
    assert_eq!(
        relay.settled_metric(
            "openmesh_handshake_failures_total",
            &["reason=\"frame_too_large\""],
            100.0
        ),
        100.0
    );
    assert!(relay.rss() < rss_before + (32 << 20));
}

/// Envelopes held for a receiver that does not ACK stop pinning the read buffers they came in:
/// after a tick they are moved to allocations of their own, so 3,000 small held envelopes cost
/// about their own size, not a read buffer each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_envelopes_do_not_pin_their_read_buffers() {
    const HELD: usize = 3_000;
    let relay = Relay::start(&["--cores", "1"], None);
    let mut stuck = relay.agent("stuck").await;
    let stuck_id = stuck.id();
    let holder = tokio::spawn(async move {
        let mut got = 0;
        while got < HELD {
            match tokio::time::timeout(Duration::from_secs(20), stuck.next_event()).await {
                Ok(Some(Event::Envelope(_))) => got += 1,
                Ok(Some(_)) => {}
                other => panic!("stuck receiver got {other:?}"),
            }
        }
        stuck
    });
    let mut fast = relay.config("fast");
    fast.auto_ack = true;
    let mut fast = Session::connect(fast).await.unwrap();
    let fast_id = fast.id();
    let drain = tokio::spawn(async move {
        let mut got = 0usize;
        while got < HELD * 60 {
            match tokio::time::timeout(Duration::from_secs(20), fast.next_event()).await {
                Ok(Some(Event::Envelope(_))) => got += 1,
                Ok(Some(_)) => {}
                other => panic!("fast receiver got {other:?} after {got}"),
            }
        }
    });
    let rss_before = relay.rss();
    let mut sender = relay.agent("sender").await;
    let mut outstanding = 0usize;
    // Each batch: one envelope for the receiver that holds on, then 60 for the one that ACKs, so
    // most read buffers carry one envelope that stays.
    for _ in 0..HELD {
        let env = sender
            .envelope_to(stuck_id, 60_000)
            .build(&[1u8; 200])
            .unwrap();
        sender.send(&env).await.unwrap();
        for _ in 0..60 {
            let env = sender
                .envelope_to(fast_id, 60_000)
                .build(&[2u8; 1000])
                .unwrap();
            sender.send(&env).await.unwrap();
        }
        outstanding += 61;
        while outstanding > 4000 {
            match tokio::time::timeout(Duration::from_secs(20), sender.next_event()).await {
                Ok(Some(Event::Acked(ids))) => outstanding -= ids.len(),
                other => panic!("sender got {other:?}"),
            }
        }
    }
    let _stuck = holder.await.unwrap();
    drain.await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = relay.rss();
    // Moved off their buffers, the held envelopes cost about their own size; what remains is
    // transient (read blocks of up to 256 KiB and the write buffer pool while 180,000 others
    // flow). Pinning a read block each, they grew it by over 100 MB.
    assert!(
        rss_after < rss_before + (64 << 20),
        "RSS grew from {rss_before} to {rss_after} for {HELD} held envelopes of 200 bytes"
    );
    assert!(
        relay.metric("openmesh_envelopes_unshared_total", &[]) >= HELD as f64,
        "held envelopes were moved off their buffers"
    );
}

/// Every frame costs: envelopes the relay refuses are charged to the rate buckets like accepted
/// ones, so a peer cannot make the relay answer refusals as fast as it sends them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_envelopes_are_charged_to_the_rate_limit() {
    const N: usize = 3000;
    let relay = Relay::start(&["--cores", "1"], Some("[session]\nrate_frames = 1000\n"));
    let mut a = relay.agent("refused").await;
    let peer = relay.agent("peer").await;
    // Hop limit 0: each one is refused at ingress.
    let t0 = std::time::Instant::now();
    for _ in 0..N {
        let mut b = a.envelope_to(peer.id(), 10_000);
        b.hop_limit = 0;
        a.send(&b.build(b"x").unwrap()).await.unwrap();
    }
    let mut nacked = 0;
    while nacked < N {
        match tokio::time::timeout(Duration::from_secs(20), a.next_event()).await {
            Ok(Some(Event::Nacked(n))) => {
                assert_eq!(n.reason(), Some(Reason::HopLimitExceeded));
                nacked += 1;
            }
            other => panic!("got {other:?}"),
        }
    }
    // 3,000 frames at 1,000/s with a burst of 100 need nearly three seconds, less one read's
    // worth (the bucket is charged per read and may go into debt: a read block of up to 256 KiB
    // holds about 1,700 of these frames), so at least about 1.2 s; unpaced, the refusals come
    // back within tens of milliseconds.
    assert!(
        t0.elapsed() >= Duration::from_millis(800),
        "3,000 refusals answered in {:?}",
        t0.elapsed()
    );
    assert!(relay.metric("openmesh_reads_throttled_total", &["limit=\"frames\""]) > 0.0);
}

/// Attack 7: ACK then drop. A receiver takes 10,000 envelopes without ACKing any and leaves; its
/// next session gets every envelope that was ACKed to the sender, once. What the relay still
/// holds for an absent agent when it exits is counted in its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custody_acked_to_its_sender_is_never_dropped_and_exit_counts_what_it_loses() {
    const N: u64 = 10_000;
    const LEFT_AT_EXIT: u64 = 300;
    let mut relay = Relay::start(&["--cores", "2"], None);
    let pair = well_behaved_pair(&relay, 2_000);
    let cfg = relay.config("absent-receiver");
    let b_id = cfg.identity.agent_id();
    let b = Session::connect(cfg.clone()).await.unwrap();
    let mut a = relay.agent("custody-sender").await;
    let acked: std::collections::HashSet<MessageId> = common::send_all(&mut a, b_id, (0, N), 1024)
        .await
        .0
        .into_iter()
        .collect();
    drop(b);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut b = Session::connect(cfg.clone()).await.unwrap();
    let mut got = std::collections::HashSet::new();
    while got.len() < acked.len() {
        match tokio::time::timeout(Duration::from_secs(20), b.next_event()).await {
            Ok(Some(Event::Envelope(e))) => {
                assert!(got.insert(e.message_id()), "delivered twice in one session");
                b.ack(e.message_id()).await.unwrap();
            }
            other => panic!("receiver got {other:?} after {}", got.len()),
        }
    }
    assert_eq!(got, acked, "every envelope ACKed to the sender, none other");
    // Now some the receiver never ACKs, and it leaves: the relay holds them when it exits.
    let left = common::send_all(&mut a, b_id, (N, LEFT_AT_EXIT), 1024)
        .await
        .0;
    let mut seen = 0;
    while seen < left.len() {
        match tokio::time::timeout(Duration::from_secs(20), b.next_event()).await {
            Ok(Some(Event::Envelope(_))) => seen += 1,
            other => panic!("receiver got {other:?}"),
        }
    }
    drop(b);
    assert_eq!(
        pair.await.unwrap(),
        2_000,
        "the well-behaved pair lost nothing"
    );
    // Held now: exactly the receiver's unACKed envelopes (a dropped agent still writes the ACKs
    // it queued).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = relay.settled_metric("openmesh_custody_held_envelopes", &[], LEFT_AT_EXIT as f64);
    assert_eq!(held, LEFT_AT_EXIT as f64, "held {held}");
    assert!(relay.terminate().success());
    let lost: u64 = relay
        .log()
        .lines()
        .filter(|l| l.contains("custody lost at exit"))
        .filter_map(|l| l.split("envelopes=").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(
        lost as f64,
        held,
        "exit counts what it loses:\n{}",
        relay.log()
    );
}

/// Identities are free to mint: fresh agents publishing bundles fill the directory up to its
/// byte bound and no further (then `directory_full`), what was published before stays served,
/// a session flooding lookups is closed `rate_limited`, and a pair beside loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_fresh_identities_fills_the_directory_to_its_bound_and_no_further() {
    use bytes::Bytes;
    use openmesh_dataplane::directory::{aeads, BundleKey, BundleParts, Capability, KeyBundle};
    use openmesh_dataplane::wire::{Lookup, LookupKey, Publish};

    const BOUND: usize = 64 << 10;
    let relay = Relay::start(
        &["--cores", "2"],
        Some(&format!("[limits]\ndirectory_bytes = {BOUND}\n")),
    );
    let good = well_behaved_pair(&relay, 1_000);
    let honest = openmesh_agent::Agent::connect(relay.config("honest"))
        .await
        .unwrap();
    let t0 = std::time::Instant::now();
    while honest.lookup(honest.id()).await.unwrap().is_none() {
        assert!(t0.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (mut accepted, mut full) = (0, 0);
    for i in 0..80 {
        let cfg = relay.config(&format!("minted-{i}"));
        let signer = cfg.identity.signing_key().unwrap();
        let mut s = Session::connect(cfg).await.unwrap();
        let bundle = KeyBundle::sign(
            BundleParts {
                issued_ms: 0,
                expires_ms: u64::MAX,
                aeads: aeads::KNOWN,
                keys: vec![BundleKey::new(
                    [1; 32],
                    Bytes::from(vec![2u8; 1184]),
                    u64::MAX,
                )],
                capability: Capability {
                    transports: 1,
                    classes: 7,
                    schemas: vec!["spam@1".into()],
                },
            },
            &signer,
        )
        .unwrap();
        s.send_raw(
            Frame::Publish(Publish {
                request_id: 1,
                bundle: bundle.bytes().clone(),
            })
            .to_bytes(),
        )
        .await
        .unwrap();
        match tokio::time::timeout(Duration::from_secs(5), s.next_event()).await {
            Ok(Some(Event::Directory(d))) => match d.refusal() {
                None => accepted += 1,
                Some(Reason::DirectoryFull) => full += 1,
                Some(r) => panic!("refused {r}"),
            },
            other => panic!("expected DIRECTORY, got {other:?}"),
        }
        s.close().await.unwrap();
    }
    assert!(
        full > 0 && accepted > 10,
        "accepted {accepted}, full {full}"
    );
    assert!(accepted * 1_400 <= BOUND, "accepted {accepted}");
    // The gauge is updated every second.
    let t0 = std::time::Instant::now();
    let mut bytes = 0.0;
    while bytes == 0.0 && t0.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        bytes = relay.metric("openmesh_directory_bytes", &[]);
    }
    assert!(
        bytes > 0.0 && bytes <= BOUND as f64,
        "directory bytes {bytes}"
    );
    // What was there before the flood is still served.
    assert!(honest.lookup(honest.id()).await.unwrap().is_some());
    // A lookup flood is answered rate_limited beyond 32 a second, and four times as many end
    // the session.
    let mut flooder = Session::connect(relay.config("lookup-flood"))
        .await
        .unwrap();
    let burst = |n: u32, schema: &str| {
        let mut b = bytes::BytesMut::new();
        for i in 0..n {
            Frame::Lookup(Lookup {
                request_id: i,
                key: LookupKey::Schema {
                    schema: schema.into(),
                    after: openmesh_dataplane::wire::AgentId([0; 32]),
                },
                limit: 64,
            })
            .encode(&mut b);
        }
        b.freeze()
    };
    // Small answers (no agent speaks it), so only the rate counts.
    flooder.send_raw(burst(40, "nobody@1")).await.unwrap();
    let (mut served, mut limited) = (0, 0);
    while served + limited < 40 {
        match tokio::time::timeout(Duration::from_secs(5), flooder.next_event()).await {
            Ok(Some(Event::Directory(d))) if d.code == Reason::RateLimited as u16 => limited += 1,
            Ok(Some(Event::Directory(_))) => served += 1,
            other => panic!("expected DIRECTORY, got {other:?}"),
        }
    }
    // Within one second, or across two.
    assert!(
        (8..=32).contains(&limited),
        "{limited} of 40 answered rate_limited"
    );
    flooder.send_raw(burst(200, "nobody@1")).await.unwrap();
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(5), flooder.next_event()).await {
            Ok(Some(Event::Directory(_))) => continue,
            Ok(Some(Event::Closed(c))) => break c.and_then(|c| c.reason()),
            other => panic!("expected CLOSE, got {other:?}"),
        }
    };
    assert_eq!(closed, Some(Reason::RateLimited));
    assert_eq!(good.await.unwrap(), 1_000);
    honest.close().await.unwrap();
}

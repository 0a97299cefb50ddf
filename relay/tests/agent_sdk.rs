//! The agent library (`openmesh_agent::Agent`) against the real relay: clean close, retries of
//! retryable refusals, refusals that surface, reconnection after the relay dies, and agents
//! that only send or only receive at full speed for a minute.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{free_port, fresh_dir, Relay};
use openmesh_agent::{Agent, Batch, EnvelopeTemplate, Outcome};
use openmesh_dataplane::wire::{features, DeliveryClass, Reason, EXTENSION_CRITICAL};

/// `n` envelopes from `a` to `to`, payload = sequence number (8 bytes, then zeros to `size`),
/// sent in batches of `per_batch`; returns the batch handles.
async fn send_seq(
    a: &Agent,
    to: openmesh_dataplane::wire::AgentId,
    class: DeliveryClass,
    range: std::ops::Range<u64>,
    per_batch: u64,
) -> Vec<openmesh_agent::BatchHandle> {
    let mut b = a.envelope_to(to);
    b.class = class;
    let t = EnvelopeTemplate::new(&b, 64).unwrap();
    let mut handles = Vec::new();
    let mut seq = range.start;
    while seq < range.end {
        let mut batch = Batch::with_capacity(t.frame_len() * per_batch as usize);
        for _ in 0..per_batch.min(range.end - seq) {
            batch.push_template(&t, a.next_message_id(), openmesh_agent::unix_ms(), |p| {
                p[..8].copy_from_slice(&seq.to_be_bytes())
            });
            seq += 1;
        }
        handles.push(a.send_batch(batch).await.unwrap());
    }
    handles
}

fn seq_of(e: &openmesh_dataplane::wire::Envelope) -> u64 {
    u64::from_be_bytes(e.payload()[..8].try_into().unwrap())
}

/// Receives until `want` distinct sequence numbers arrived (ACKing each), or 30 s of silence.
async fn receive_distinct(b: &mut Agent, want: usize) -> HashSet<u64> {
    let mut got = HashSet::new();
    while got.len() < want {
        match tokio::time::timeout(Duration::from_secs(30), b.recv()).await {
            Ok(Some(e)) => {
                got.insert(seq_of(&e));
                b.ack(&e).await.unwrap();
            }
            other => panic!(
                "receiver stopped after {} of {want}: {:?}",
                got.len(),
                other.map(|o| o.map(|e| e.message_id()))
            ),
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_writes_every_ack_and_a_close_and_reports_nothing_unanswered() {
    const N: u64 = 20_000;
    let relay = Relay::start(&["--cores", "2"], None);
    let mut b = Agent::connect(relay.config("close-b")).await.unwrap();
    let a = Agent::connect(relay.config("close-a")).await.unwrap();
    let b_id = b.id();
    let receiver = tokio::spawn(async move {
        let got = receive_distinct(&mut b, N as usize).await;
        (b, got)
    });
    let handles = send_seq(&a, b_id, DeliveryClass::AtLeastOnce, 0..N, 256).await;
    let (b, got) = receiver.await.unwrap();
    assert_eq!(got.len() as u64, N);

    let mut accepted = 0;
    for h in handles {
        let o = h.outcome().await;
        assert!(o.refused.is_empty() && o.expired.is_empty() && o.unanswered.is_empty());
        accepted += o.accepted as u64;
    }
    assert_eq!(accepted, N);
    // The receiver closes right after its last ACK: every ACK reaches the relay, then CLOSE.
    let rb = b.close().await.unwrap();
    assert_eq!(
        rb.relay_close.as_ref().and_then(|c| c.reason()),
        Some(Reason::Normal),
        "{rb:?}"
    );
    assert_eq!(
        relay.settled_metric("openmesh_acks_received_total", &[], N as f64),
        N as f64,
        "every ACK written before CLOSE"
    );
    let ra = a.close().await.unwrap();
    assert!(ra.unanswered.is_empty());
    assert_eq!(ra.stats.accepted, N);
    assert_eq!(ra.stats.sent, N);
    assert_eq!(
        relay.settled_metric(
            "openmesh_sessions_closed_total",
            &["reason=\"normal\""],
            2.0
        ),
        2.0,
        "both sessions ended with the agent's CLOSE"
    );
    assert_eq!(
        relay.metric("openmesh_envelopes_redelivered_total", &[]),
        0.0
    );
}

/// ACKs that wait for company still come when nothing else is written. A sender with the
/// default window (4,096) offers ACK_DELAY, so the relay may hold its ACKs, and the verdicts
/// another core sends back for it, up to 1 ms; one with a window of 64 does not. Envelopes sent
/// one at a time, each outcome awaited before the next, are all accepted either way (four
/// deep senders: some live on the receiver's core, some on the other), and the receiver's own
/// held ACKs all reach the relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_acks_answer_envelopes_sent_one_at_a_time() {
    const EACH: u64 = 50;
    let relay = Relay::start(&["--cores", "2"], None);
    let mut b = Agent::connect(relay.config("held-b")).await.unwrap();
    let to = b.id();
    let mut senders = Vec::new();
    for k in 0..4 {
        let a = Agent::connect(relay.config(&format!("held-deep-{k}")))
            .await
            .unwrap();
        assert_ne!(
            a.welcome().features & features::ACK_DELAY,
            0,
            "offered, granted"
        );
        senders.push(a);
    }
    let mut cfg = relay.config("held-shallow");
    cfg.window = 64;
    let shallow = Agent::connect(cfg).await.unwrap();
    assert_eq!(
        shallow.welcome().features & features::ACK_DELAY,
        0,
        "not offered"
    );
    senders.push(shallow);
    for (k, a) in senders.iter().enumerate() {
        for i in 0..EACH {
            let seq = k as u64 * EACH + i;
            let env = a.envelope_to(to).build(&seq.to_be_bytes()).unwrap();
            let mut h = a.send(&env).await.unwrap();
            let o = tokio::time::timeout(Duration::from_secs(5), h.outcome())
                .await
                .expect("an ACK held for more than 5 s");
            assert_eq!(o, Outcome::Accepted);
        }
    }
    let n = senders.len() as u64 * EACH;
    let got = receive_distinct(&mut b, n as usize).await;
    assert_eq!(got.len() as u64, n);
    assert_eq!(
        relay.settled_metric("openmesh_acks_received_total", &[], n as f64),
        n as f64,
        "the receiver's last held ACKs went out with nothing else to carry them"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_reports_what_the_relay_left_unanswered() {
    let relay = Relay::start(&["--cores", "1"], None);
    let mut cfg = relay.config("unanswered-a");
    cfg.close_timeout = Duration::from_millis(500);
    let a = Agent::connect(cfg).await.unwrap();
    let to = relay.config("unanswered-b").identity.agent_id();
    let first = a.envelope_to(to).build(b"first").unwrap();
    assert_eq!(
        a.send(&first).await.unwrap().outcome().await,
        Outcome::Accepted
    );
    // The relay stops answering: what is sent now stays unanswered.
    relay.pause();
    let mut handles = Vec::new();
    for i in 0u32..10 {
        let env = a.envelope_to(to).build(&i.to_be_bytes()).unwrap();
        handles.push(a.send(&env).await.unwrap());
    }
    let report = a.close().await.unwrap();
    relay.resume();
    let ids: Vec<_> = handles.iter().map(|h| h.message_id()).collect();
    assert_eq!(report.unanswered, ids, "in the order sent");
    assert_eq!(report.relay_close, None);
    assert_eq!(report.stats.accepted, 1);
    for mut h in handles {
        assert_eq!(h.outcome().await, Outcome::Unanswered);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_an_agent_still_writes_its_acks_and_close() {
    const N: u64 = 5_000;
    let relay = Relay::start(&["--cores", "1"], None);
    let mut b = Agent::connect(relay.config("drop-b")).await.unwrap();
    let a = Agent::connect(relay.config("drop-a")).await.unwrap();
    let b_id = b.id();
    let receiver = tokio::spawn(async move {
        receive_distinct(&mut b, N as usize).await;
        b
    });
    send_seq(&a, b_id, DeliveryClass::AtLeastOnce, 0..N, 500).await;
    let b = receiver.await.unwrap();
    drop(b);
    assert_eq!(
        relay.settled_metric("openmesh_acks_received_total", &[], N as f64),
        N as f64
    );
    assert_eq!(
        relay.settled_metric(
            "openmesh_sessions_closed_total",
            &["reason=\"normal\""],
            1.0
        ),
        1.0
    );
    a.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_refusals_are_sent_again_until_the_relay_takes_them() {
    const N: u64 = 500;
    // At most 64 envelopes wait for an absent agent: the rest are refused `queue_full`.
    let relay = Relay::start(
        &["--cores", "1"],
        Some("[limits]\nsend_queue_envelopes = 64\n"),
    );
    let cfg_b = relay.config("retry-b");
    let b_id = cfg_b.identity.agent_id();
    let a = Agent::connect(relay.config("retry-a")).await.unwrap();
    let mut handles = Vec::new();
    for seq in 0..N {
        let env = a.envelope_to(b_id).build(&seq.to_be_bytes()).unwrap();
        handles.push(a.send(&env).await.unwrap());
    }
    // The relay holds 64 and refuses the rest, which the agent keeps retrying.
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.stats().retried < N - 64 {
        assert!(Instant::now() < deadline, "{:?}", a.stats());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        relay.metric(
            "openmesh_envelopes_refused_total",
            &["reason=\"queue_full\""]
        ) > 0.0
    );
    let mut b = Agent::connect(cfg_b).await.unwrap();
    let got = receive_distinct(&mut b, N as usize).await;
    assert_eq!(got, (0..N).collect::<HashSet<_>>());
    for mut h in handles {
        assert_eq!(h.outcome().await, Outcome::Accepted);
    }
    let s = a.stats();
    assert_eq!((s.accepted, s.refused, s.expired), (N, 0, 0));
    b.close().await.unwrap();
    a.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_retrying_cannot_fix_surface_with_their_reason() {
    let relay = Relay::start(&["--cores", "1"], None);
    let b = Agent::connect(relay.config("refuse-b")).await.unwrap();
    let a = Agent::connect(relay.config("refuse-a")).await.unwrap();
    let mut bad = a.envelope_to(b.id());
    bad.extensions
        .push((EXTENSION_CRITICAL | 0x0777, vec![1, 2, 3]));
    let mut h_bad = a.send(&bad.build(b"x").unwrap()).await.unwrap();
    let mut h_ok = a
        .send(&a.envelope_to(b.id()).build(b"y").unwrap())
        .await
        .unwrap();
    match h_bad.outcome().await {
        Outcome::Refused { reason, .. } => {
            assert_eq!(reason, Some(Reason::UnknownCriticalExtension))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h_ok.outcome().await, Outcome::Accepted);
    let s = a.stats();
    assert_eq!((s.refused, s.retried, s.accepted), (1, 0, 1));
    a.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_reconnect_after_the_relay_dies_and_send_again_what_was_unanswered() {
    const N: u64 = 6_000;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let args = ["--cores", "1", "--listen", listen.as_str()];
    let relay = Relay::start_in(fresh_dir(), &args, None);
    let mut cfg_a = relay.config("reconnect-a");
    let mut cfg_b = relay.config("reconnect-b");
    for c in [&mut cfg_a, &mut cfg_b] {
        c.reconnect_initial = Duration::from_millis(50);
        c.reconnect_max = Duration::from_millis(200);
    }
    let mut b = Agent::connect(cfg_b).await.unwrap();
    let a = Agent::connect(cfg_a).await.unwrap();
    let b_id = b.id();
    // Durable: what the relay accepted survives it.
    let sender = tokio::spawn(async move {
        let handles = send_seq(&a, b_id, DeliveryClass::Durable, 0..N, 50).await;
        let mut accepted = 0;
        for h in handles {
            let o = h.outcome().await;
            assert!(o.refused.is_empty() && o.expired.is_empty(), "{o:?}");
            accepted += o.accepted as u64;
        }
        (a, accepted)
    });
    let mut got = HashSet::new();
    while got.len() < (N / 3) as usize {
        let e = tokio::time::timeout(Duration::from_secs(20), b.recv())
            .await
            .unwrap()
            .unwrap();
        got.insert(seq_of(&e));
        b.ack(&e).await.unwrap();
    }
    // The relay dies mid-stream and comes back on the same address and store.
    let dir = relay.kill9();
    let relay = Relay::start_in(dir, &args, None);
    while got.len() < N as usize {
        let e = tokio::time::timeout(Duration::from_secs(20), b.recv())
            .await
            .unwrap()
            .unwrap();
        got.insert(seq_of(&e));
        b.ack(&e).await.unwrap();
    }
    assert_eq!(got, (0..N).collect::<HashSet<_>>());
    let (a, accepted) = sender.await.unwrap();
    assert_eq!(
        accepted, N,
        "every envelope accepted, by one relay or the other"
    );
    let (sa, sb) = (a.stats(), b.stats());
    assert!(sa.reconnects >= 1 && sb.reconnects >= 1, "{sa:?} {sb:?}");
    assert!(a.close().await.unwrap().unanswered.is_empty());
    b.close().await.unwrap();
    drop(relay);
}

/// Seconds each agent runs in the soak test (`OPENMESH_SDK_SOAK_S`, default 60).
fn soak() -> Duration {
    Duration::from_secs(
        std::env::var("OPENMESH_SDK_SOAK_S")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_only_and_a_receive_only_agent_run_a_minute_at_full_speed() {
    let relay = Relay::start(&["--cores", "2"], None);
    let mut cfg_b = relay.config("soak-b");
    cfg_b.auto_ack = true;
    let mut b = Agent::connect(cfg_b).await.unwrap();
    // The sender never reads anything: no event stream to drain.
    let a = Agent::connect(relay.config("soak-a")).await.unwrap();
    let b_id = b.id();
    let run = soak();
    let sender = tokio::spawn(async move {
        let t = EnvelopeTemplate::new(&a.envelope_to(b_id), 256).unwrap();
        let end = Instant::now() + run;
        while Instant::now() < end {
            let mut batch = Batch::with_capacity(t.frame_len() * 256);
            for _ in 0..256 {
                batch.push_template(&t, a.next_message_id(), openmesh_agent::unix_ms(), |_| {});
            }
            a.send_batch(batch).await.unwrap();
        }
        a.flush().await;
        a
    });
    let mut received = 0u64;
    let mut evs = Vec::new();
    while !sender.is_finished() {
        if let Ok(true) =
            tokio::time::timeout(Duration::from_millis(200), b.recv_many(&mut evs)).await
        {
            received += evs.len() as u64;
            evs.clear();
        }
    }
    let a = sender.await.unwrap();
    let sa = a.stats();
    // Take what is still on its way (the sender's last envelopes).
    while received < sa.accepted {
        match tokio::time::timeout(Duration::from_secs(10), b.recv_many(&mut evs)).await {
            Ok(true) => {
                received += evs.len() as u64;
                evs.clear();
            }
            other => panic!(
                "receiver stalled at {received} of {}: {other:?}",
                sa.accepted
            ),
        }
    }
    assert!(sa.accepted > 100_000, "{sa:?}");
    assert_eq!((sa.refused, sa.expired, sa.reconnects), (0, 0, 0), "{sa:?}");
    assert_eq!(received, sa.accepted);
    assert_eq!(b.stats().reconnects, 0);
    assert_eq!(
        relay.metric("openmesh_sessions_closed_total", &[]),
        0.0,
        "no session ended during the run"
    );
    let ra = a.close().await.unwrap();
    assert!(ra.unanswered.is_empty());
    b.close().await.unwrap();
}

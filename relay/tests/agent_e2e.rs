//! End-to-end encryption and the key and capability directory, against the real relay: the
//! relay carries sealed envelopes it cannot read, and (built with `fault-injection`) damages
//! the ones that ask for it, as a hostile relay on the path would.

mod common;

use std::time::Duration;

use common::Relay;
use openmesh_agent::{Agent, Batch, ClientError, E2eConfig, E2eError};
use openmesh_dataplane::shard::fault::{FAULT_EXTENSION, FLIP, REPLAY};
use openmesh_dataplane::wire::{AgentId, Envelope, EnvelopeBuilder, Reason};

/// Receives `n` envelopes (or fewer if the stream stalls for 10 s), opens and ACKs each, and
/// returns the results in arrival order.
async fn receive_open(b: &mut Agent, n: usize) -> Vec<Result<Vec<u8>, E2eError>> {
    let mut out = Vec::with_capacity(n);
    let mut got = Vec::new();
    while out.len() < n {
        got.clear();
        match tokio::time::timeout(Duration::from_secs(10), b.recv_many(&mut got)).await {
            Ok(true) => {}
            _ => break,
        }
        for env in &got {
            out.push(b.open(env).map(|o| o.plaintext));
            b.ack(env).await.unwrap();
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_hundred_thousand_sealed_envelopes_open_at_the_other_end() {
    const N: u64 = 100_000;
    let relay = Relay::start(&["--cores", "1"], None);
    let mut b = Agent::connect(relay.config("e2e-b")).await.unwrap();
    let a = Agent::connect(relay.config("e2e-a")).await.unwrap();
    let to = b.id();
    // B's bundle as the relay's directory serves it, verified against B's id.
    let bundle = a.lookup(to).await.unwrap().expect("B published its bundle");
    assert_eq!(bundle.keys[0], b.bundle().unwrap().keys[0]);
    let receiver = tokio::spawn(async move {
        let r = receive_open(&mut b, N as usize).await;
        (b, r)
    });
    let mut i = 0u64;
    while i < N {
        let mut batch = Batch::new();
        for _ in 0..256.min(N - i) {
            let env = a
                .seal_with(&a.envelope_to(to), &bundle, &i.to_be_bytes())
                .unwrap();
            batch.push(&env);
            i += 1;
        }
        a.send_batch(batch).await.unwrap();
    }
    let (b, got) = receiver.await.unwrap();
    assert_eq!(got.len(), N as usize, "every envelope arrived");
    let mut seen = vec![false; N as usize];
    for r in got {
        let p = r.expect("opened");
        let k = u64::from_be_bytes(p.try_into().unwrap()) as usize;
        assert!(!seen[k], "{k} twice");
        seen[k] = true;
    }
    let (sa, sb) = (a.e2e_stats().unwrap(), b.e2e_stats().unwrap());
    assert_eq!(sa.sealed, N);
    assert_eq!(sb.opened, N);
    assert_eq!(sb.rejected.iter().sum::<u64>(), 0);
    assert_eq!(
        (sa.contexts_sent, sb.contexts_received),
        (1, 1),
        "one context"
    );
    let report = a.close().await.unwrap();
    assert!(report.unanswered.is_empty());
    b.close().await.unwrap();
}

/// An envelope to `to` asking the relay for a fault (`op`, `offset`), sealed.
fn with_fault(
    a: &Agent,
    b: &EnvelopeBuilder,
    to: &openmesh_dataplane::directory::KeyBundle,
    fault: Option<(u8, u32)>,
    body: &[u8],
) -> Envelope {
    let mut b = b.clone();
    b.message_id = a.next_message_id();
    let (op, offset) = fault.unwrap_or((0, 0));
    let mut v = vec![op];
    v.extend_from_slice(&offset.to_be_bytes());
    b.extensions = vec![(FAULT_EXTENSION, v)];
    a.seal_with(&b, to, body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_alters_or_replays_an_envelope_is_caught_and_nothing_else_is_lost() {
    let relay = Relay::start(&["--cores", "1"], None);
    let mut b = Agent::connect(relay.config("fault-b")).await.unwrap();
    let a = Agent::connect(relay.config("fault-a")).await.unwrap();
    let to = a.lookup(b.id()).await.unwrap().unwrap();
    let template = a.envelope_to(b.id());
    // Where things sit in such an envelope (every one has the same layout).
    let probe = with_fault(&a, &template, &to, None, b"0123456789");
    let payload_at = (probe.immutable.len() - probe.payload().len()) as u32;
    let header_byte = 1 + 1 + 16 + 32 + 1 + 32 + 3; // inside created_ms
    let ctx_signature = payload_at + 36 + 1120 + 10;
    let ciphertext = probe.immutable.len() as u32 - 20;
    type Fault = Option<(u8, u32)>;
    let plan: Vec<(Fault, Option<E2eError>)> = vec![
        (None, None),
        (Some((FLIP, ciphertext)), Some(E2eError::Tampered)),
        (None, None),
        (Some((FLIP, header_byte)), Some(E2eError::Tampered)),
        (None, None),
        (Some((FLIP, ctx_signature)), Some(E2eError::BadSignature)),
        (None, None),
        (Some((REPLAY, 0)), None),
        (None, None),
    ];
    for (fault, _) in &plan {
        let env = with_fault(&a, &template, &to, *fault, b"0123456789");
        a.send(&env).await.unwrap();
    }
    // The replayed one comes twice.
    let got = receive_open(&mut b, plan.len() + 1).await;
    let mut want: Vec<Result<Vec<u8>, E2eError>> = Vec::new();
    for (fault, err) in &plan {
        want.push(match err {
            Some(e) => Err(e.clone()),
            None => Ok(b"0123456789".to_vec()),
        });
        if matches!(fault, Some((REPLAY, _))) {
            want.push(Err(E2eError::Replay));
        }
    }
    assert_eq!(got, want);
    let s = b.e2e_stats().unwrap();
    assert_eq!(s.opened, 6);
    assert_eq!(s.rejected(E2eError::Tampered), 2);
    assert_eq!(s.rejected(E2eError::BadSignature), 1);
    assert_eq!(s.rejected(E2eError::Replay), 1);
    a.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotated_mid_stream_loses_nothing() {
    let relay = Relay::start(&["--cores", "1"], None);
    let fast = E2eConfig {
        rotation: Some(Duration::from_millis(1200)),
        bundle_cache: Duration::from_millis(300),
        ..E2eConfig::default()
    };
    let mut cb = relay.config("rot-b");
    cb.e2e = Some(fast.clone());
    let mut ca = relay.config("rot-a");
    ca.e2e = Some(fast);
    let mut b = Agent::connect(cb).await.unwrap();
    let a = Agent::connect(ca).await.unwrap();
    let to = b.id();
    let first_key = b.bundle().unwrap().keys[0].id;
    const N: u64 = 400;
    let receiver = tokio::spawn(async move {
        let r = receive_open(&mut b, N as usize).await;
        (b, r)
    });
    // 400 envelopes over about 4 s: B rotates three times meanwhile; A looks its bundle up
    // again every 300 ms and opens new contexts.
    for i in 0..N {
        let env = a.seal(&a.envelope_to(to), &i.to_be_bytes()).await.unwrap();
        a.send(&env).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (b, got) = receiver.await.unwrap();
    assert_eq!(got.len(), N as usize);
    assert!(
        got.iter().all(|r| r.is_ok()),
        "{:?}",
        got.iter().find(|r| r.is_err())
    );
    let (sa, sb) = (a.e2e_stats().unwrap(), b.e2e_stats().unwrap());
    assert!(sb.rotations >= 2, "{sb:?}");
    assert_ne!(b.bundle().unwrap().keys[0].id, first_key);
    assert!(sa.contexts_sent >= 3, "new contexts for new keys: {sa:?}");
    a.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_directory_finds_exactly_the_agents_that_speak_a_schema() {
    let relay = Relay::start(&["--cores", "2"], None);
    let mut agents = Vec::new();
    let mut sellers: Vec<AgentId> = Vec::new();
    for i in 0..12 {
        let mut cfg = relay.config(&format!("dir-{i}"));
        cfg.hello.schemas = if i % 3 == 0 {
            vec!["market/proposal@2.1".into(), "chat@1".into()]
        } else {
            vec!["chat@1".into()]
        };
        let a = Agent::connect(cfg).await.unwrap();
        if i % 3 == 0 {
            sellers.push(a.id());
        }
        agents.push(a);
    }
    sellers.sort();
    let buyer = &agents[1];
    // Each agent's bundle went out first on its connection (automatic PUBLISH).
    for a in &agents {
        let t0 = std::time::Instant::now();
        while buyer.lookup(a.id()).await.unwrap().is_none() {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "bundle never published"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let found: Vec<AgentId> = buyer
        .lookup_schema("market/proposal@2.1", 100)
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.agent)
        .collect();
    assert_eq!(found, sellers);
    assert_eq!(buyer.lookup_schema("chat@1", 100).await.unwrap().len(), 12);
    assert!(buyer
        .lookup_schema("nobody@1", 100)
        .await
        .unwrap()
        .is_empty());
    // Paged: the same answer a few at a time is what `lookup_schema` does; a small max stops.
    assert_eq!(buyer.lookup_schema("chat@1", 5).await.unwrap().len(), 5);
    // A second publish within a second of an accepted one is refused; the session goes on.
    let t0 = std::time::Instant::now();
    while agents[0].publish().await.is_err() {
        assert!(t0.elapsed() < Duration::from_secs(3));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let err = agents[0].publish().await.unwrap_err();
    assert!(
        matches!(err, ClientError::Directory(Reason::RateLimited)),
        "{err}"
    );
    assert!(buyer.lookup(agents[0].id()).await.unwrap().is_some());
    assert!(
        relay.metric(
            "openmesh_directory_requests_total",
            &["outcome=\"refused\""]
        ) >= 1.0
    );
    for a in agents {
        a.close().await.unwrap();
    }
}

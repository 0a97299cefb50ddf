//! Queues for absent agents, end to end: at-least-once envelopes for an agent that is not
//! connected are kept on its home core (within its queue bounds) and delivered, in order per
//! source, when it connects; best-effort ones are dropped and counted.

mod common;

use std::time::Duration;

use common::Relay;
use openmesh_agent::session::{Event, Session};
use openmesh_dataplane::wire::{AgentId, DeliveryClass, Reason};

/// Sends `n` envelopes of `class` from `a` to `to`, numbered from `first` in their payload, with
/// at most 1,024 unanswered; returns how many were ACKed and the reasons of the NACKs.
async fn send(
    a: &mut Session,
    to: AgentId,
    (first, n): (u64, u64),
    class: DeliveryClass,
) -> (u64, Vec<Reason>) {
    let (mut acked, mut nacks, mut sent) = (0u64, Vec::new(), 0u64);
    while sent < n || acked + (nacks.len() as u64) < n {
        while sent < n && sent - acked - (nacks.len() as u64) < 1024 {
            let mut b = a.envelope_to(to, 60_000);
            b.class = class;
            let seq = first + sent;
            a.send(&b.build(&seq.to_be_bytes()).unwrap()).await.unwrap();
            sent += 1;
        }
        match tokio::time::timeout(Duration::from_secs(20), a.next_event()).await {
            Ok(Some(Event::Acked(ids))) => acked += ids.len() as u64,
            Ok(Some(Event::Nacked(nk))) => nacks.push(nk.reason().expect("a known reason")),
            other => panic!("sender got {other:?} after {acked} acked"),
        }
    }
    (acked, nacks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absent_agent_gets_what_was_kept_for_it_in_order_when_it_connects() {
    const N: u64 = 5_000;
    let relay = Relay::start(&["--cores", "2"], None);
    let cfg = relay.config("offline-b");
    let b_id = cfg.identity.agent_id();
    let mut a = relay.agent("sender-a").await;
    let (acked, nacks) = send(&mut a, b_id, (0, N), DeliveryClass::AtLeastOnce).await;
    assert_eq!(
        (acked, nacks.len()),
        (N, 0),
        "all kept and ACKed: {nacks:?}"
    );
    // Best-effort envelopes for an absent agent are not kept: dropped and counted.
    for i in 0..10u64 {
        let mut b = a.envelope_to(b_id, 60_000);
        b.class = DeliveryClass::BestEffort;
        a.send(&b.build(&(N + i).to_be_bytes()).unwrap())
            .await
            .unwrap();
    }
    let dropped = relay.settled_metric(
        "openmesh_envelopes_dropped_total",
        &["reason=\"destination_unavailable\""],
        10.0,
    );
    assert_eq!(dropped, 10.0);
    assert_eq!(
        relay.metric("openmesh_envelopes_held_for_absent_total", &[]),
        N as f64
    );
    let mut b = Session::connect(cfg).await.unwrap();
    let mut got = Vec::new();
    while (got.len() as u64) < N {
        match tokio::time::timeout(Duration::from_secs(20), b.next_event()).await {
            Ok(Some(Event::Envelope(e))) => {
                got.push(u64::from_be_bytes(e.payload()[..8].try_into().unwrap()));
                b.ack(e.message_id()).await.unwrap();
            }
            other => panic!("receiver got {other:?} after {}", got.len()),
        }
    }
    assert_eq!(got, (0..N).collect::<Vec<_>>(), "all, once, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_for_an_absent_agent_refuses_with_a_retryable_reason() {
    let relay = Relay::start(&["--cores", "2"], None);
    let absent = relay.config("never-here").identity.agent_id();
    let mut a = relay.agent("sender-full").await;
    // The default queue bound is 8,192 envelopes per destination.
    let (acked, nacks) = send(&mut a, absent, (0, 8_192 + 300), DeliveryClass::AtLeastOnce).await;
    assert_eq!(acked, 8_192);
    assert_eq!(nacks.len(), 300);
    assert!(nacks
        .iter()
        .all(|r| *r == Reason::QueueFull && r.retryable()));
    // A well-behaved pair beside it is not affected.
    let pair = common::well_behaved_pair(&relay, 1_000);
    assert_eq!(pair.await.unwrap(), 1_000);
}

/// Order per source across a reconnect: the agent's next session gets what it had not ACKed
/// first, then what was kept while it was away, all in the order sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_per_source_holds_across_a_reconnect() {
    let relay = Relay::start(&["--cores", "2"], None);
    let cfg = relay.config("comes-and-goes");
    let b_id = cfg.identity.agent_id();
    let mut b = Session::connect(cfg.clone()).await.unwrap();
    let mut a = relay.agent("orderly-sender").await;
    let first = send(&mut a, b_id, (0, 2_000), DeliveryClass::AtLeastOnce).await;
    assert_eq!(first.0, 2_000);
    for i in 0..2_000u64 {
        match tokio::time::timeout(Duration::from_secs(20), b.next_event()).await {
            Ok(Some(Event::Envelope(e))) if i < 1_000 => b.ack(e.message_id()).await.unwrap(),
            Ok(Some(Event::Envelope(_))) => {}
            other => panic!("receiver got {other:?}"),
        }
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(b);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = send(&mut a, b_id, (2_000, 2_000), DeliveryClass::AtLeastOnce).await;
    assert_eq!(second.0, 2_000);
    let mut b = Session::connect(cfg).await.unwrap();
    let mut got: Vec<u64> = Vec::new();
    while got.last() != Some(&3_999) {
        match tokio::time::timeout(Duration::from_secs(20), b.next_event()).await {
            Ok(Some(Event::Envelope(e))) => {
                got.push(u64::from_be_bytes(e.payload()[..8].try_into().unwrap()));
                b.ack(e.message_id()).await.unwrap();
            }
            other => panic!("receiver got {other:?} after {}", got.len()),
        }
    }
    assert!(
        got.windows(2).all(|w| w[0] < w[1]),
        "in order: {:?}",
        &got[..20]
    );
    assert!(got[0] <= 1_000, "unACKed first: starts at {}", got[0]);
    assert_eq!(*got.last().unwrap(), 3_999);
    assert!(
        (1_000..4_000).all(|s| got.binary_search(&s).is_ok()),
        "nothing missing"
    );
}

/// The age limit for absent agents bites before a long TTL: what was kept longer is dropped and
/// counted, and the agent does not get it when it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelopes_kept_past_the_age_limit_are_dropped_and_counted() {
    let relay = Relay::start(&["--cores", "1"], Some("[limits]\nabsent_max_age_s = 1\n"));
    let cfg = relay.config("away-too-long");
    let b_id = cfg.identity.agent_id();
    let mut a = relay.agent("patient-sender").await;
    assert_eq!(
        send(&mut a, b_id, (0, 10), DeliveryClass::AtLeastOnce)
            .await
            .0,
        10
    );
    let aged = relay.settled_metric("openmesh_held_age_limit_total", &[], 10.0);
    assert_eq!(aged, 10.0);
    // A newer one is still kept and delivered; the aged ones are not.
    assert_eq!(
        send(&mut a, b_id, (10, 1), DeliveryClass::AtLeastOnce)
            .await
            .0,
        1
    );
    let mut b = Session::connect(cfg).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(5), b.next_event()).await {
        Ok(Some(Event::Envelope(e))) => assert_eq!(e.payload()[..8], 10u64.to_be_bytes()),
        other => panic!("receiver got {other:?}"),
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(500), b.next_event())
            .await
            .is_err(),
        "nothing else"
    );
}

/// What is kept for absent agents has its own bound below the overload states: identities
/// minted for free cannot fill the relay with offline queues; past the bound new envelopes for
/// absent agents are refused (retryable) and live traffic keeps flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_queues_have_their_own_bound_and_live_traffic_keeps_flowing() {
    let relay = Relay::start(&["--cores", "1"], Some("[limits]\nabsent_bytes = 200000\n"));
    let mut a = relay.agent("many-absent-sender").await;
    let (mut acked, mut full) = (0u64, 0usize);
    for i in 0..50u8 {
        let nobody = relay.config(&format!("nobody-{i}")).identity.agent_id();
        let (k, nacks) = send(&mut a, nobody, (0, 20), DeliveryClass::AtLeastOnce).await;
        acked += k;
        full += nacks.iter().filter(|r| **r == Reason::QueueFull).count();
    }
    assert!(acked > 100 && full > 100, "kept {acked}, refused {full}");
    assert_eq!(acked + full as u64, 1_000);
    let pair = common::well_behaved_pair(&relay, 1_000);
    assert_eq!(pair.await.unwrap(), 1_000);
    assert_eq!(relay.metric("openmesh_overload_state", &[]), 0.0);
}

//! Session behaviour through the real binary: version alignment, heartbeat death, TLS key
//! updates, duplicate agent ids, graceful drain on SIGTERM.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::Relay;
use openmesh_agent::session::{Event, Session};
use openmesh_agent::ClientError;
use openmesh_dataplane::pki::Identity;
use openmesh_dataplane::wire::{MessageId, Reason};

async fn event(a: &mut Session) -> Event {
    tokio::time::timeout(Duration::from_secs(15), a.next_event())
        .await
        .expect("event in time")
        .expect("session open")
}

async fn wait_acked(a: &mut Session, n: usize) {
    let mut got = 0;
    while got < n {
        match event(a).await {
            Event::Acked(ids) => got += ids.len(),
            other => panic!("expected ACK, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn version_alignment_picks_highest_common_or_closes() {
    let relay = Relay::start(&["--cores", "1"], None);
    let mut cfg = relay.config("wide");
    cfg.hello.min_version = 1;
    cfg.hello.max_version = 7;
    let a = Session::connect(cfg).await.unwrap();
    assert_eq!(a.welcome().version, 2, "highest version both speak");

    // A version-1 agent, and one from the future: no common version.
    for (name, min, max) in [("v1", 1, 1), ("future", 5, 9)] {
        let mut cfg = relay.config(name);
        cfg.hello.min_version = min;
        cfg.hello.max_version = max;
        match Session::connect(cfg).await {
            Err(ClientError::Closed(c)) => {
                assert_eq!(c.reason(), Some(Reason::NoCommonVersion), "{name}")
            }
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("a session without a common version was established"),
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m = relay.metric(
        "openmesh_handshake_failures_total",
        &["reason=\"no_common_version\""],
    );
    assert_eq!(m, 2.0);
    assert_eq!(
        relay.settled_metric("openmesh_sessions_active", &[], 1.0),
        1.0
    );
}

const FAST_HEARTBEAT: &str =
    "[session]\nheartbeat_ms = 200\nheartbeat_min_ms = 100\nkey_rotation_s = 1\n";

#[tokio::test]
async fn silent_peer_is_declared_dead_while_live_peers_stay_and_keys_rotate() {
    let relay = Relay::start(&["--cores", "1"], Some(FAST_HEARTBEAT));
    let mut cfg = relay.config("silent");
    cfg.answer_pings = false;
    let mut silent = Session::connect(cfg).await.unwrap();
    assert_eq!(silent.welcome().heartbeat_ms, 200);
    let mut live = relay.agent("live").await;
    let mut peer = relay.agent("peer").await;
    let t0 = std::time::Instant::now();
    loop {
        match event(&mut silent).await {
            Event::Closed(Some(c)) => {
                assert_eq!(c.reason(), Some(Reason::HeartbeatTimeout));
                break;
            }
            Event::Closed(None) => panic!("closed without a reason"),
            _ => {}
        }
    }
    // Three missed 200 ms intervals, checked on a 100 ms sweep.
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "dead peer detected in {:?}",
        t0.elapsed()
    );
    // The live agents answered PINGs for the same time and still exchange (after key updates).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let env = live
        .envelope_to(peer.id(), 10_000)
        .build(b"still here")
        .unwrap();
    live.send(&env).await.unwrap();
    match event(&mut peer).await {
        Event::Envelope(e) => assert_eq!(&e.payload()[..], b"still here"),
        other => panic!("{other:?}"),
    }
    wait_acked(&mut live, 1).await;
    let text = relay.scrape();
    assert_eq!(
        common::metric_in(
            &text,
            "openmesh_sessions_closed_total",
            &["reason=\"heartbeat_timeout\""]
        ),
        1.0
    );
    assert!(common::metric_in(&text, "openmesh_tls_key_updates_total", &[]) >= 2.0);
    assert!(common::metric_in(&text, "openmesh_session_rtt_seconds_count", &[]) > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newest_session_of_an_agent_wins_and_inherits_unacked_envelopes() {
    for cores in ["1", "2"] {
        let relay = Relay::start(&["--cores", cores], None);
        let id = Identity::generate_self_signed("dup").unwrap();
        let mut cfg = relay.config("dup");
        cfg.identity = id.clone();
        let mut first = Session::connect(cfg.clone()).await.unwrap();
        let mut sender = relay.agent("sender").await;
        let mut sent = Vec::new();
        for i in 0..10u32 {
            let env = sender
                .envelope_to(id.agent_id(), 30_000)
                .build(&i.to_be_bytes())
                .unwrap();
            sent.push(env.message_id());
            sender.send(&env).await.unwrap();
        }
        wait_acked(&mut sender, 10).await;
        let mut unacked = HashSet::new();
        for i in 0..10 {
            match event(&mut first).await {
                Event::Envelope(e) if i < 5 => first.ack(e.message_id()).await.unwrap(),
                Event::Envelope(e) => {
                    unacked.insert(e.message_id());
                }
                other => panic!("{other:?}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut second = Session::connect(cfg).await.unwrap();
        loop {
            match event(&mut first).await {
                Event::Closed(Some(c)) => {
                    assert_eq!(c.reason(), Some(Reason::SessionReplaced), "cores={cores}");
                    break;
                }
                Event::Closed(None) => panic!("replaced session closed without reason"),
                _ => {}
            }
        }
        let mut redelivered = HashSet::new();
        while redelivered.len() < 5 {
            match event(&mut second).await {
                Event::Envelope(e) => {
                    assert!(redelivered.insert(e.message_id()));
                    second.ack(e.message_id()).await.unwrap();
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            redelivered, unacked,
            "cores={cores}: unacked envelopes move to the new session"
        );
        let env = sender
            .envelope_to(id.agent_id(), 30_000)
            .build(b"after")
            .unwrap();
        sender.send(&env).await.unwrap();
        match event(&mut second).await {
            Event::Envelope(e) => assert_eq!(&e.payload()[..], b"after"),
            other => panic!("{other:?}"),
        }
        let text = relay.scrape();
        assert_eq!(
            common::metric_in(
                &text,
                "openmesh_sessions_closed_total",
                &["reason=\"session_replaced\""]
            ),
            1.0
        );
        // The replaced session's teardown follows its CLOSE asynchronously.
        assert_eq!(
            relay.settled_metric("openmesh_sessions_active", &[], 2.0),
            2.0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_gracefully_and_loses_no_acked_envelope() {
    let mut relay = Relay::start(&["--cores", "2"], None);
    let mut a = relay.agent("a").await;
    let mut b = relay.agent("b").await;
    let to = b.id();
    let receiver = tokio::spawn(async move {
        let mut got = HashSet::new();
        let mut going_away = false;
        loop {
            match event(&mut b).await {
                Event::Envelope(e) => {
                    got.insert(e.message_id());
                    b.ack(e.message_id()).await.unwrap();
                }
                Event::GoingAway(_) => going_away = true,
                Event::Closed(c) => {
                    assert_eq!(c.and_then(|c| c.reason()), Some(Reason::ShuttingDown));
                    return (got, going_away);
                }
                other => panic!("receiver got {other:?}"),
            }
        }
    });
    let mut acked: HashSet<MessageId> = HashSet::new();
    let mut refused = 0;
    let mut inflight = 0;
    let mut stop_sending = false;
    let mut sent = 0u64;
    let mut signalled = false;
    let mut going_away = false;
    loop {
        while !stop_sending && inflight < 256 {
            let env = a
                .envelope_to(to, 30_000)
                .build(&sent.to_be_bytes())
                .unwrap();
            a.send(&env).await.unwrap();
            sent += 1;
            inflight += 1;
        }
        if !signalled && acked.len() >= 5_000 {
            relay.sigterm();
            signalled = true;
        }
        match event(&mut a).await {
            Event::Acked(ids) => {
                inflight -= ids.len();
                acked.extend(ids.ids());
            }
            Event::Nacked(n) => {
                assert_eq!(n.reason(), Some(Reason::ShuttingDown));
                inflight -= 1;
                refused += 1;
            }
            Event::GoingAway(_) => {
                going_away = true;
                stop_sending = true;
            }
            Event::Closed(c) => {
                assert_eq!(c.and_then(|c| c.reason()), Some(Reason::ShuttingDown));
                break;
            }
            other @ (Event::Envelope(_) | Event::Receipt(_) | Event::Directory(_)) => {
                panic!("sender got {other:?}")
            }
        }
    }
    assert!(going_away, "sender saw GOING_AWAY");
    assert_eq!(
        inflight, 0,
        "every envelope was ACKed or NACKed before CLOSE"
    );
    let (got, b_going_away) = receiver.await.unwrap();
    assert!(b_going_away, "receiver saw GOING_AWAY");
    let lost: Vec<_> = acked.difference(&got).collect();
    assert!(
        lost.is_empty(),
        "{} ACKed envelopes never reached the receiver",
        lost.len()
    );
    let status = relay.terminate();
    assert!(status.success(), "relay exit status {status:?}");
    assert!(
        acked.len() >= 5_000,
        "acked {} refused {refused}",
        acked.len()
    );
}

#[tokio::test]
async fn an_agent_detects_a_relay_that_stopped_answering() {
    let relay = Relay::start(&["--cores", "1"], Some(FAST_HEARTBEAT));
    let mut a = relay.agent("watcher").await;
    relay.pause();
    let t0 = std::time::Instant::now();
    let ev = tokio::time::timeout(Duration::from_secs(5), a.next_event()).await;
    relay.resume();
    match ev {
        Ok(Some(Event::Closed(Some(c)))) => assert_eq!(c.reason(), Some(Reason::HeartbeatTimeout)),
        other => panic!("expected a heartbeat timeout, got {other:?}"),
    }
    assert!(
        t0.elapsed() >= Duration::from_millis(500),
        "not before three intervals"
    );
}

#[tokio::test]
async fn idle_timeout_closes_sessions_without_traffic_when_configured() {
    let relay = Relay::start(
        &["--cores", "1"],
        Some("[session]\nheartbeat_ms = 200\nheartbeat_min_ms = 100\nidle_timeout_ms = 1000\n"),
    );
    let mut idle = relay.agent("idle").await;
    let mut busy = relay.agent("busy").await;
    let to = busy.id();
    let t0 = std::time::Instant::now();
    // `busy` receives (and ACKs) an envelope every 200 ms: traffic. `idle` only answers PINGs.
    let mut idle_closed = None;
    while t0.elapsed() < Duration::from_millis(1800) {
        idle.send(&idle.envelope_to(to, 10_000).build(b"tick").unwrap())
            .await
            .ok();
        if let Ok(Some(Event::Envelope(e))) =
            tokio::time::timeout(Duration::from_secs(2), busy.next_event()).await
        {
            busy.ack(e.message_id()).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        while let Some(ev) = idle.try_event() {
            if let Event::Closed(c) = ev {
                idle_closed = c;
            }
        }
        if idle_closed.is_some() {
            break;
        }
    }
    assert!(idle_closed.is_none(), "a sending agent is not idle");
    // Now `busy` stops; it only receives nothing and answers PINGs: closed after ~1 s.
    drop(idle);
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match busy.next_event().await {
                Some(Event::Closed(c)) => return c,
                Some(_) => {}
                None => return None,
            }
        }
    })
    .await
    .expect("idle session closed in time");
    assert_eq!(closed.and_then(|c| c.reason()), Some(Reason::IdleTimeout));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custody_for_a_departed_agent_expires_and_is_counted() {
    let relay = Relay::start(&["--cores", "1"], None);
    let id = Identity::generate_self_signed("leaver").unwrap();
    let mut cfg = relay.config("leaver");
    cfg.identity = id.clone();
    let mut leaver = Session::connect(cfg.clone()).await.unwrap();
    let mut sender = relay.agent("sender").await;
    for i in 0..20u32 {
        let env = sender
            .envelope_to(id.agent_id(), 1_000)
            .build(&i.to_be_bytes())
            .unwrap();
        sender.send(&env).await.unwrap();
    }
    wait_acked(&mut sender, 20).await;
    for _ in 0..20 {
        assert!(matches!(event(&mut leaver).await, Event::Envelope(_)));
    }
    drop(leaver); // leaves without ACKing: the relay keeps custody of 20 envelopes
    tokio::time::sleep(Duration::from_millis(100)).await;
    let dropped = |r: &Relay| r.metric("openmesh_envelopes_dropped_total", &["reason=\"expired\""]);
    assert_eq!(dropped(&relay), 0.0);
    // TTL 1 s, custody swept every second.
    assert_eq!(
        relay.settled_metric(
            "openmesh_envelopes_dropped_total",
            &["reason=\"expired\""],
            20.0
        ),
        20.0
    );
    let mut back = Session::connect(cfg).await.unwrap();
    let got = tokio::time::timeout(Duration::from_millis(500), back.next_event()).await;
    assert!(got.is_err(), "expired envelopes were redelivered: {got:?}");
}

//! End to end through the real binary: envelopes between client-library agents over mutual TLS.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::Relay;
use openmesh_agent::session::{Event, Session};
use openmesh_dataplane::wire::AgentId;

/// Receives `n` envelopes, ACKing each; returns the payload sequence numbers per source in
/// arrival order.
async fn receive(b: &mut Session, n: u64) -> HashMap<AgentId, Vec<u64>> {
    let mut got: HashMap<AgentId, Vec<u64>> = HashMap::new();
    let mut count = 0;
    while count < n {
        match tokio::time::timeout(Duration::from_secs(20), b.next_event()).await {
            Ok(Some(Event::Envelope(e))) => {
                let p = e.payload();
                let seq = u64::from_be_bytes(p[..8].try_into().unwrap());
                got.entry(e.source()).or_default().push(seq);
                b.ack(e.message_id()).await.unwrap();
                count += 1;
            }
            Ok(other) => panic!("receiver got {other:?}"),
            Err(_) => panic!("receiver stalled after {count} envelopes"),
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_at_least_once_envelopes_arrive_once_in_order_and_are_acked() {
    const N: u64 = 100_000;
    let relay = Relay::start(&["--cores", "1"], None);
    let mut a = relay.agent("a").await;
    let mut b = relay.agent("b").await;
    let (a_id, b_id) = (a.id(), b.id());
    let recv = tokio::spawn(async move {
        let got = receive(&mut b, N).await;
        (got, b)
    });
    let (acked, resent, resent_total) = common::send_all(&mut a, b_id, (0, N), 2048).await;
    let (got, b) = recv.await.unwrap();
    assert_eq!(acked.len() as u64, N);
    let seqs = &got[&a_id];
    assert_eq!(seqs.len() as u64, N, "every envelope exactly once");
    // In order, except what the sender itself resent after a retryable refusal (queue_full:
    // the relay's backpressure when the receiver falls behind), which comes later by design.
    let first_sends: Vec<u64> = seqs
        .iter()
        .copied()
        .filter(|s| !resent.contains(s))
        .collect();
    assert!(
        first_sends.windows(2).all(|w| w[0] < w[1]),
        "in order per source ({} resent)",
        resent.len()
    );
    assert_eq!(seqs.iter().copied().collect::<HashSet<_>>().len() as u64, N);
    // Let B's ACKs reach the relay, then the counters must agree with what the agents saw.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = relay.scrape();
    let m = |name, labels: &[&str]| common::metric_in(&text, name, labels);
    // Received at ingress: every send, resends included; the first tries of those were refused.
    assert_eq!(
        m(
            "openmesh_envelopes_received_total",
            &["class=\"at_least_once\""]
        ),
        (N + resent_total) as f64
    );
    assert_eq!(
        m(
            "openmesh_envelopes_refused_total",
            &["reason=\"queue_full\""]
        ),
        resent_total as f64
    );
    assert_eq!(
        m(
            "openmesh_envelopes_delivered_total",
            &["class=\"at_least_once\""]
        ),
        N as f64
    );
    assert_eq!(m("openmesh_acks_sent_total", &[]), N as f64);
    // B's last ACKs and the gauges (set by each core's timer sweep) settle asynchronously.
    let acks = relay.settled_metric("openmesh_acks_received_total", &[], N as f64);
    assert_eq!(acks, N as f64);
    assert_eq!(m("openmesh_sessions_active", &[]), 2.0);
    assert_eq!(
        relay.settled_metric("openmesh_inflight_envelopes", &[], 0.0),
        0.0
    );
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_agents_on_two_cores_exchange_across_cores_without_loss() {
    const AGENTS: usize = 16;
    const PER: u64 = 3_000;
    let relay = Relay::start(&["--cores", "2"], None);
    let mut agents = Vec::new();
    for i in 0..AGENTS {
        agents.push(relay.agent(&format!("agent-{i}")).await);
    }
    let ids: Vec<AgentId> = agents.iter().map(Session::id).collect();
    // Agent i sends to agent i+1 (a ring), and receives from agent i-1.
    let mut tasks = Vec::new();
    for (i, mut ag) in agents.into_iter().enumerate() {
        let to = ids[(i + 1) % AGENTS];
        let from = ids[(i + AGENTS - 1) % AGENTS];
        tasks.push(tokio::spawn(async move {
            // One task per agent: interleave sending and receiving on the same session.
            let mut sent = 0u64;
            let mut acked = 0u64;
            let mut received = Vec::new();
            let mut inflight = 0u64;
            while acked < PER || (received.len() as u64) < PER {
                while sent < PER && inflight < 512 {
                    let env = ag
                        .envelope_to(to, 60_000)
                        .build(&sent.to_be_bytes())
                        .unwrap();
                    ag.send(&env).await.unwrap();
                    sent += 1;
                    inflight += 1;
                }
                match tokio::time::timeout(Duration::from_secs(20), ag.next_event()).await {
                    Ok(Some(Event::Acked(a))) => {
                        acked += a.len() as u64;
                        inflight -= a.len() as u64;
                    }
                    Ok(Some(Event::Envelope(e))) => {
                        assert_eq!(e.source(), from);
                        received.push(u64::from_be_bytes(e.payload()[..8].try_into().unwrap()));
                        ag.ack(e.message_id()).await.unwrap();
                    }
                    Ok(other) => panic!("agent {i} got {other:?}"),
                    Err(_) => panic!(
                        "agent {i} stalled: acked {acked}, received {}",
                        received.len()
                    ),
                }
            }
            assert_eq!(
                received,
                (0..PER).collect::<Vec<_>>(),
                "agent {i}: all, once, in order"
            );
            ag
        }));
    }
    let mut keep = Vec::new();
    for t in tasks {
        keep.push(t.await.unwrap());
    }
    let text = relay.scrape();
    let total = (AGENTS as u64 * PER) as f64;
    assert_eq!(
        common::metric_in(&text, "openmesh_envelopes_delivered_total", &[]),
        total
    );
    let c0 = common::metric_in(
        &text,
        "openmesh_mailbox_messages_total",
        &["from_core=\"0\""],
    );
    let c1 = common::metric_in(
        &text,
        "openmesh_mailbox_messages_total",
        &["from_core=\"1\""],
    );
    assert!(
        c0 > 0.0 && c1 > 0.0,
        "envelopes crossed cores both ways: 0->1 {c0}, 1->0 {c1}"
    );
    let s0 = common::metric_in(&text, "openmesh_sessions_active", &[]);
    assert_eq!(s0, AGENTS as f64);
    // Connections land on either core; each session moved to its agent's home core when the
    // two differed (about half of them).
    let moved = common::metric_in(&text, "openmesh_sessions_moved_total", &[]);
    assert!(moved > 0.0 && moved < AGENTS as f64, "moved {moved}");
}

/// Envelopes up to the negotiated max_frame (1 MiB by default) are forwarded whole, also those
/// larger than one write buffer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelopes_near_the_maximum_frame_are_forwarded() {
    let relay = Relay::start(&["--cores", "2"], None);
    let a = relay.agent("big-a").await;
    let mut b = relay.agent("big-b").await;
    let sizes = [300_000usize, (1 << 20) - 4096, 17, 70_000];
    for (i, size) in sizes.iter().enumerate() {
        let payload: Vec<u8> = (0..*size).map(|j| (i + j) as u8).collect();
        a.send(&a.envelope_to(b.id(), 30_000).build(&payload).unwrap())
            .await
            .unwrap();
    }
    for (i, size) in sizes.iter().enumerate() {
        match tokio::time::timeout(Duration::from_secs(20), b.next_event()).await {
            Ok(Some(Event::Envelope(e))) => {
                let p = e.payload();
                assert_eq!(p.len(), *size, "envelope {i}");
                assert!(p.iter().enumerate().all(|(j, v)| *v == (i + j) as u8));
                b.ack(e.message_id()).await.unwrap();
            }
            other => panic!("receiver got {other:?}"),
        }
    }
}

/// A receiver slower than its sender paces the sender (its reader pauses until the queue
/// drains) instead of getting its envelopes refused `queue_full`: nothing is resent, and
/// everything arrives once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_receiver_paces_its_sender_instead_of_refusing_it() {
    const N: u64 = 30_000;
    let relay = Relay::start(&["--cores", "2"], None);
    let mut a = relay.agent("fast-sender").await;
    let mut b = relay.agent("slow-receiver").await;
    let (a_id, b_id) = (a.id(), b.id());
    let recv = tokio::spawn(async move {
        let mut got = Vec::with_capacity(N as usize);
        while (got.len() as u64) < N {
            match tokio::time::timeout(Duration::from_secs(20), b.next_event()).await {
                Ok(Some(Event::Envelope(e))) => {
                    assert_eq!(e.source(), a_id);
                    got.push(u64::from_be_bytes(e.payload()[..8].try_into().unwrap()));
                    b.ack(e.message_id()).await.unwrap();
                    // At most about 10,000 envelopes a second: well below the sender even
                    // on a loaded machine, so the queue fills and the sender is paused.
                    if got.len() % 10 == 0 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                Ok(other) => panic!("receiver got {other:?}"),
                Err(_) => panic!("receiver stalled after {}", got.len()),
            }
        }
        (got, b)
    });
    // The relay ACKs an envelope once it is queued, so this window does not slow the sender;
    // it bounds what the sender adds in one pause (256) below the queue's free half (4,096).
    let (acked, _, resent_total) = common::send_all(&mut a, b_id, (0, N), 256).await;
    let (got, _b) = recv.await.unwrap();
    assert_eq!(acked.len() as u64, N);
    assert_eq!(got, (0..N).collect::<Vec<_>>(), "all, once, in order");
    let text = relay.scrape();
    let paused = common::metric_in(
        &text,
        "openmesh_reads_throttled_total",
        &["limit=\"destination_queue\""],
    );
    assert!(paused > 0.0, "the sender was paused");
    assert_eq!(
        resent_total, 0,
        "no envelope refused queue_full ({paused} pauses)"
    );
}

/// An agent dropped right after ACKing (no `close()`) still writes its last ACKs: its next
/// session gets nothing again. (Dropping used to abort the writer with the last ACK batch.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_agent_writes_its_last_acks() {
    const N: u64 = 5_000;
    let relay = Relay::start(&["--cores", "1"], None);
    let mut a = relay.agent("drop-a").await;
    let cfg_b = relay.config("drop-b");
    let mut b = Session::connect(cfg_b.clone()).await.unwrap();
    let b_id = b.id();
    for round in 0..3 {
        let (acked, _, _) = common::send_all(&mut a, b_id, (round * N, N), 2048).await;
        assert_eq!(acked.len() as u64, N);
        receive(&mut b, N).await;
        drop(b);
        // The dropped session writes its last ACKs in the background; a new session that
        // reached the relay first would replace it before they were read.
        let want = ((round + 1) * N) as f64;
        assert_eq!(
            relay.settled_metric("openmesh_acks_received_total", &[], want),
            want,
            "round {round}: every ACK written"
        );
        b = Session::connect(cfg_b.clone()).await.unwrap();
        match tokio::time::timeout(Duration::from_millis(700), b.next_event()).await {
            Err(_) => {}
            Ok(ev) => panic!("round {round}: the next session got {ev:?}"),
        }
    }
}

/// The process's transparent-huge-pages flag, as `/proc/PID/status` reports it.
fn thp_enabled(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .map(|v| v.trim().to_string())
        .expect("THP_enabled in /proc/PID/status")
}

#[test]
fn the_relay_runs_without_transparent_huge_pages_unless_configured() {
    let relay = Relay::start(&[], None);
    assert_eq!(thp_enabled(relay.pid()), "0", "off by default");
    drop(relay);
    // Only a kernel that would give huge pages at all can show the setting taking effect.
    let system =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if system.contains("[never]") || system.is_empty() {
        return;
    }
    let relay = Relay::start(&[], Some("[relay]\nhuge_pages = true\n"));
    assert_eq!(thp_enabled(relay.pid()), "1", "kept with relay.huge_pages");
}

//! The durable class end to end: envelopes ACKed only once they are on disk, kept across
//! `kill -9` and restarts (also with another number of cores), served again to their agent.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::Relay;
use openmesh_dataplane::client::{Agent, Event};
use openmesh_dataplane::wire::{AgentId, DeliveryClass, MessageId, Reason};

/// The message id of envelope number `n` (also its payload).
fn id_of(n: u64) -> MessageId {
    MessageId::from_u128(n as u128 | (7u128 << 100))
}

/// Sends durable envelopes numbered `numbers` from `a` to `to`, at most `window` unanswered;
/// returns the numbers ACKed. Stops early (returning what was ACKed) when the session ends.
async fn send_durable(
    a: &mut Agent,
    to: AgentId,
    numbers: &[u64],
    window: usize,
) -> (Vec<u64>, Vec<(u64, Reason)>) {
    let (mut acked, mut nacked) = (Vec::new(), Vec::new());
    let mut pending: HashMap<MessageId, u64> = HashMap::new();
    let mut next = 0;
    while next < numbers.len() || !pending.is_empty() {
        while next < numbers.len() && pending.len() < window {
            let n = numbers[next];
            next += 1;
            let mut b = a.envelope_to(to, 600_000);
            b.class = DeliveryClass::Durable;
            b.message_id = id_of(n);
            pending.insert(id_of(n), n);
            if a.send(&b.build(&n.to_be_bytes()).unwrap()).await.is_err() {
                return (acked, nacked);
            }
        }
        match tokio::time::timeout(Duration::from_secs(20), a.next_event()).await {
            Ok(Some(Event::Acked(ids))) => {
                for id in ids.ids() {
                    if let Some(n) = pending.remove(&id) {
                        acked.push(n);
                    }
                }
            }
            Ok(Some(Event::Nacked(nk))) => {
                if let Some(n) = pending.remove(&nk.message_id) {
                    nacked.push((n, nk.reason().unwrap_or(Reason::Normal)));
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => return (acked, nacked),
            Err(_) => panic!(
                "sender stalled: {} acked, {} pending",
                acked.len(),
                pending.len()
            ),
        }
    }
    (acked, nacked)
}

/// Receives until `want` distinct numbers arrived (ACKing each), or nothing came for `quiet`;
/// returns every number received, in order, duplicates included.
async fn receive(b: &mut Agent, want: usize, quiet: Duration) -> Vec<u64> {
    let mut got = Vec::new();
    let mut distinct = HashSet::new();
    while distinct.len() < want {
        match tokio::time::timeout(quiet, b.next_event()).await {
            Ok(Some(Event::Envelope(e))) => {
                let n = u64::from_be_bytes(e.payload()[..8].try_into().unwrap());
                got.push(n);
                distinct.insert(n);
                b.ack(e.message_id()).await.unwrap();
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_envelopes_acked_before_kill_9_are_served_after_restart_in_order() {
    const N: u64 = 3_000;
    let relay = Relay::start(&["--cores", "2"], None);
    let cfg_b = relay.config("durable-b");
    let b_id = cfg_b.identity.agent_id();
    let mut a = relay.agent("durable-a").await;
    assert_ne!(
        a.welcome().classes & DeliveryClass::Durable.bit(),
        0,
        "the durable class is offered"
    );
    let numbers: Vec<u64> = (0..N).collect();
    let (acked, nacked) = send_durable(&mut a, b_id, &numbers, 512).await;
    assert_eq!((acked.len() as u64, nacked.len()), (N, 0), "{nacked:?}");
    assert!(relay.metric("openmesh_store_envelopes_written_total", &[]) >= N as f64);
    let groups = relay.metric("openmesh_store_group_envelopes_count", &[]);
    assert!(
        groups > 0.0 && groups < N as f64,
        "group commit: {groups} syncs for {N} envelopes"
    );
    drop(a);
    let dir = relay.kill9();

    let relay = Relay::start_in(dir.clone(), &["--cores", "2"], None);
    assert_eq!(
        relay.metric("openmesh_store_recovered_envelopes", &[]),
        N as f64
    );
    let mut cfg_b = cfg_b;
    cfg_b.relay = relay.addr;
    let mut b = Agent::connect(cfg_b.clone()).await.unwrap();
    let got = receive(&mut b, N as usize, Duration::from_secs(10)).await;
    assert_eq!(got, numbers, "every ACKed envelope, once, in order");
    // What the agent ACKed leaves the store: after a clean stop and a restart, nothing is left.
    assert_eq!(
        relay.settled_metric("openmesh_store_live_envelopes", &[], 0.0),
        0.0,
        "the store empties as the agent ACKs"
    );
    drop(b);
    let mut relay = relay;
    assert!(relay.terminate().success());
    relay.keep_dir = true;
    drop(relay);
    let relay = Relay::start_in(dir, &["--cores", "1"], None);
    assert_eq!(relay.metric("openmesh_store_recovered_envelopes", &[]), 0.0);
}

//! The store's faults against the real binary: a full disk (a small tmpfs mounted under the data
//! directory) and a stalled sync (the relay's fault injection). Durable envelopes are refused
//! `store_unavailable` while at-least-once traffic flows beside them and loses nothing; the store
//! takes durable envelopes again once the fault clears.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{fresh_dir, well_behaved_pair, Relay};
use openmesh_agent::session::{Event, Session};
use openmesh_dataplane::wire::{AgentId, DeliveryClass, Reason};

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .expect("mount(8)");
        assert!(
            st.success(),
            "mounting a tmpfs needs root (CAP_SYS_ADMIN): this test makes a small file system to fill"
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Sends one envelope of `class` numbered `n` with a payload of `size` bytes.
async fn send_one(a: &Session, to: AgentId, n: u64, class: DeliveryClass, size: usize) {
    let mut b = a.envelope_to(to, 600_000);
    b.class = class;
    let mut payload = vec![0u8; size.max(8)];
    payload[..8].copy_from_slice(&n.to_be_bytes());
    a.send(&b.build(&payload).unwrap()).await.unwrap();
}

/// The next ACK or NACK: `Ok(count)` or `Err(reason)`.
async fn answer(a: &mut Session) -> Result<usize, Reason> {
    loop {
        match tokio::time::timeout(Duration::from_secs(20), a.next_event()).await {
            Ok(Some(Event::Acked(ids))) => return Ok(ids.len()),
            Ok(Some(Event::Nacked(nk))) => return Err(nk.reason().unwrap_or(Reason::Normal)),
            Ok(Some(_)) => {}
            other => panic!("sender got {other:?}"),
        }
    }
}

fn wait_for(relay: &Relay, what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; log:\n{}",
            relay.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_durable_only_and_the_store_recovers_when_space_returns() {
    let dir = fresh_dir();
    let _fs = Tmpfs::mount(&dir.join("store"), "3m");
    let relay = Relay::start_in(
        dir,
        &["--cores", "1"],
        Some("[store]\nsegment_bytes = 262144\n"),
    );
    let good = well_behaved_pair(&relay, 10_000);
    let cfg_b = relay.config("full-b");
    let b_id = cfg_b.identity.agent_id();
    let mut a = relay.agent("full-a").await;
    // Fill the disk: 4 KiB durable envelopes, one at a time, until the store refuses.
    let mut stored = 0u64;
    let refused = loop {
        assert!(stored < 2_000, "3 MiB took {stored} envelopes of 4 KiB");
        send_one(&a, b_id, stored, DeliveryClass::Durable, 4096).await;
        match answer(&mut a).await {
            Ok(_) => stored += 1,
            Err(r) => break r,
        }
    };
    assert_eq!(refused, Reason::StoreUnavailable);
    assert!(
        stored > 200,
        "only {stored} stored before the disk was full"
    );
    wait_for(&relay, "the store state to say failed", || {
        relay.metric("openmesh_store_state", &["core=\"0\""]) == 2.0
    });
    assert!(relay.metric("openmesh_store_failures_total", &[]) >= 1.0);
    assert!(relay.log().contains("store operation failed"));
    // Durable stays refused; at-least-once to the same absent agent is still taken.
    send_one(&a, b_id, 1_000_000, DeliveryClass::Durable, 64).await;
    assert_eq!(answer(&mut a).await, Err(Reason::StoreUnavailable));
    send_one(&a, b_id, stored, DeliveryClass::AtLeastOnce, 64).await;
    assert_eq!(answer(&mut a).await, Ok(1));

    // The agent takes its backlog: segments empty and go, space returns, the store recovers.
    let mut b = Session::connect(cfg_b).await.unwrap();
    let mut got = Vec::new();
    while (got.len() as u64) < stored + 1 {
        match tokio::time::timeout(Duration::from_secs(20), b.next_event()).await {
            Ok(Some(Event::Envelope(e))) => {
                got.push(u64::from_be_bytes(e.payload()[..8].try_into().unwrap()));
                b.ack(e.message_id()).await.unwrap();
            }
            other => panic!("receiver got {other:?} after {}", got.len()),
        }
    }
    got.sort_unstable();
    assert_eq!(
        got,
        (0..=stored).collect::<Vec<_>>(),
        "everything ACKed, once"
    );
    wait_for(&relay, "the store to recover", || {
        relay.metric("openmesh_store_state", &["core=\"0\""]) == 0.0
    });
    assert!(relay.log().contains("store writes again"));
    send_one(&a, b_id, 2_000_000, DeliveryClass::Durable, 64).await;
    assert_eq!(answer(&mut a).await, Ok(1), "durable accepted again");
    assert_eq!(good.await.unwrap(), 10_000, "the pair beside lost nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_sync_refuses_new_durable_envelopes_until_it_completes() {
    let dir = fresh_dir();
    let relay = Relay::start_with_env(
        dir.clone(),
        &["--cores", "1"],
        Some("[store]\nstall_ms = 300\n"),
        &[("OPENMESH_STORE_FAULTS", "1")],
    );
    let good = well_behaved_pair(&relay, 10_000);
    let cfg_b = relay.config("stall-b");
    let b_id = cfg_b.identity.agent_id();
    let mut a = relay.agent("stall-a").await;
    send_one(&a, b_id, 0, DeliveryClass::Durable, 64).await;
    assert_eq!(answer(&mut a).await, Ok(1));
    // The next sync hangs (as a failing device would): the envelope waits, unACKed.
    let stall = dir.join("store").join("fault-stall-sync");
    std::fs::write(&stall, b"").unwrap();
    send_one(&a, b_id, 1, DeliveryClass::Durable, 64).await;
    wait_for(&relay, "the watchdog", || {
        relay.metric("openmesh_store_state", &["core=\"0\""]) == 1.0
    });
    assert!(relay.log().contains("store operation stalled"));
    assert_eq!(relay.metric("openmesh_store_stalls_total", &[]), 1.0);
    // New durable envelopes are refused, retryably; at-least-once ones are taken.
    send_one(&a, b_id, 2, DeliveryClass::Durable, 64).await;
    assert_eq!(answer(&mut a).await, Err(Reason::StoreUnavailable));
    send_one(&a, b_id, 3, DeliveryClass::AtLeastOnce, 64).await;
    assert_eq!(answer(&mut a).await, Ok(1));
    // The device comes back: the waiting envelope is ACKed, the store takes new ones.
    std::fs::remove_file(&stall).unwrap();
    assert_eq!(answer(&mut a).await, Ok(1), "the stalled envelope");
    wait_for(&relay, "the store to recover", || {
        relay.metric("openmesh_store_state", &["core=\"0\""]) == 0.0
    });
    send_one(&a, b_id, 4, DeliveryClass::Durable, 64).await;
    assert_eq!(answer(&mut a).await, Ok(1));
    let mut b = Session::connect(cfg_b).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 4 {
        match tokio::time::timeout(Duration::from_secs(20), b.next_event()).await {
            Ok(Some(Event::Envelope(e))) => {
                got.push(u64::from_be_bytes(e.payload()[..8].try_into().unwrap()));
                b.ack(e.message_id()).await.unwrap();
            }
            other => panic!("receiver got {other:?} after {got:?}"),
        }
    }
    got.sort_unstable();
    assert_eq!(got, vec![0, 1, 3, 4]);
    assert_eq!(good.await.unwrap(), 10_000, "the pair beside lost nothing");
}

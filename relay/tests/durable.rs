//! The durable class end to end: envelopes ACKed only once they are on disk, kept across
//! `kill -9` and restarts (also with another number of cores), served again to their agent.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::Relay;
use openmesh_agent::session::{Event, Session};
use openmesh_dataplane::wire::{AgentId, DeliveryClass, MessageId, Reason};

/// The message id of envelope number `n` (also its payload).
fn id_of(n: u64) -> MessageId {
    MessageId::from_u128(n as u128 | (7u128 << 100))
}

/// Sends durable envelopes numbered `numbers` from `a` to `to`, at most `window` unanswered;
/// returns the numbers ACKed. Stops early (returning what was ACKed) when the session ends.
async fn send_durable(
    a: &mut Session,
    to: AgentId,
    numbers: &[u64],
    window: usize,
) -> (Vec<u64>, Vec<(u64, Reason)>) {
    send_durable_killing(a, to, numbers, window, None).await
}

/// [`send_durable`], and once `kill.0` envelopes are ACKed (with up to `window` more in
/// flight), SIGKILL to process `kill.1`.
async fn send_durable_killing(
    a: &mut Session,
    to: AgentId,
    numbers: &[u64],
    window: usize,
    mut kill: Option<(usize, i32)>,
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
                if let Some((at, pid)) = kill {
                    if acked.len() >= at {
                        kill_9(pid);
                        kill = None;
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

/// Receives `n` envelopes (failing otherwise), ACKing each; returns their numbers in order.
async fn receive_all(b: &mut Session, n: u64) -> Vec<u64> {
    let got = receive(b, &mut HashSet::new(), n as usize, Duration::from_secs(10)).await;
    assert_eq!(got.len() as u64, n, "received");
    got
}

/// Receives until `want` distinct numbers arrived in all (`distinct` holds those received
/// before), ACKing each, or nothing came for `quiet`; returns every number received now, in
/// order, duplicates included.
async fn receive(
    b: &mut Session,
    distinct: &mut HashSet<u64>,
    want: usize,
    quiet: Duration,
) -> Vec<u64> {
    let mut got = Vec::new();
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
async fn durable_envelopes_written_on_two_cores_are_served_by_one_after_kill_9_in_order() {
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

    // Restarted with another number of cores: the destination has another home core.
    let relay = Relay::start_in(dir.clone(), &["--cores", "1"], None);
    assert_eq!(
        relay.metric("openmesh_store_recovered_envelopes", &[]),
        N as f64
    );
    let mut cfg_b = cfg_b;
    cfg_b.relay = relay.addr;
    let mut b = Session::connect(cfg_b.clone()).await.unwrap();
    let got = receive(
        &mut b,
        &mut HashSet::new(),
        N as usize,
        Duration::from_secs(10),
    )
    .await;
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
    let relay = Relay::start_in(dir.clone(), &["--cores", "2"], None);
    assert_eq!(relay.metric("openmesh_store_recovered_envelopes", &[]), 0.0);
    let segments = std::fs::read_dir(dir.join("store")).unwrap().count();
    assert!(segments <= 1, "{segments} segments left for an empty store");
}

/// A small deterministic generator for the kill moments (the seed is printed; `KILL_SEED`
/// replays it).
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Kills process `pid` with SIGKILL.
fn kill_9(pid: i32) {
    let status = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -KILL {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_thousand_durable_envelopes_survive_repeated_kill_9_exactly_once() {
    const N: u64 = 50_000;
    const KILLS_WHILE_SENDING: usize = 4;
    let mut seed = std::env::var("KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("KILL_SEED={seed}");
    // The whole backlog fits the destination's bounds.
    const LIMITS: &str = "[limits]\nsend_queue_envelopes = 65536\n";
    let mut relay = Relay::start(&["--cores", "2"], Some(LIMITS));
    let cfg_a = relay.config("kill-a");
    let cfg_b = relay.config("kill-b");
    let b_id = cfg_b.identity.agent_id();
    let all: Vec<u64> = (0..N).collect();
    let mut acked: HashSet<u64> = HashSet::new();
    let mut kills = 0;
    // Send, killing the relay at a random point each round (after a random share of what is
    // left was ACKed, with a full window in flight); resend what was not ACKed.
    for round in 0.. {
        if acked.len() as u64 == N {
            break;
        }
        assert!(
            round < 20,
            "{} of {N} ACKed after {round} rounds",
            acked.len()
        );
        let mut cfg = cfg_a.clone();
        cfg.relay = relay.addr;
        let mut a = Session::connect(cfg).await.unwrap();
        let left: Vec<u64> = all.iter().copied().filter(|n| !acked.contains(n)).collect();
        let kill = (kills < KILLS_WHILE_SENDING).then(|| {
            let at = 1 + (splitmix(&mut seed) % (left.len() as u64 / 2).max(1)) as usize;
            (at, relay.pid())
        });
        let (got, nacked) = send_durable_killing(&mut a, b_id, &left, 512, kill).await;
        assert!(
            nacked.iter().all(|(_, r)| r.retryable()),
            "only retryable refusals: {nacked:?}"
        );
        acked.extend(got);
        drop(a);
        if kill.is_some() {
            kills += 1;
            eprintln!("kill {kills}: {} of {N} ACKed", acked.len());
            relay = Relay::start_in(relay.kill9(), &["--cores", "2"], Some(LIMITS));
        }
    }
    assert_eq!(kills, KILLS_WHILE_SENDING);
    // The receiver connects and takes part of its backlog; the relay is killed again.
    let mut cfg = cfg_b.clone();
    cfg.relay = relay.addr;
    let mut b = Session::connect(cfg).await.unwrap();
    let mut distinct = HashSet::new();
    let before = receive(
        &mut b,
        &mut distinct,
        (N / 3) as usize,
        Duration::from_secs(10),
    )
    .await;
    assert!(before.len() as u64 >= N / 3, "{} received", before.len());
    let pid = relay.pid();
    kill_9(pid);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while b.next_event().await.is_some() {}
    })
    .await;
    drop(b);
    kills += 1;
    let relay = Relay::start_in(relay.kill9(), &["--cores", "2"], Some(LIMITS));
    let mut cfg = cfg_b.clone();
    cfg.relay = relay.addr;
    let mut b = Session::connect(cfg).await.unwrap();
    let seen_before: HashSet<u64> = before.iter().copied().collect();
    let after = receive(&mut b, &mut distinct, N as usize, Duration::from_secs(10)).await;
    let mut count: HashMap<u64, u32> = HashMap::new();
    for n in before.iter().chain(&after) {
        *count.entry(*n).or_default() += 1;
    }
    let missing: Vec<u64> = all
        .iter()
        .copied()
        .filter(|n| !count.contains_key(n))
        .collect();
    assert!(
        missing.is_empty(),
        "{} ACKed envelopes missing, first {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert_eq!(count.len() as u64, N, "nothing that was not sent");
    // The one documented duplicate: an envelope the receiver took before the kill whose
    // release (its ACK) was not yet on disk comes again after the restart. Nothing else twice.
    let twice: Vec<u64> = count
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(n, _)| *n)
        .collect();
    for n in &twice {
        assert!(
            seen_before.contains(n) && count[n] == 2,
            "envelope {n} delivered {} times (seen before the kill: {})",
            count[n],
            seen_before.contains(n)
        );
    }
    assert!(
        before.len() == seen_before.len(),
        "no duplicate within one relay run"
    );
    eprintln!(
        "{kills} kills; {} redelivered after the last one (taken before it, ACK not yet on disk)",
        twice.len()
    );
}

/// The one segment file of core 0 under `dir` (the relay ran with one core) and its records'
/// offsets (envelope records only).
fn segment_and_records(dir: &std::path::Path) -> (std::path::PathBuf, Vec<(usize, usize)>) {
    use openmesh_dataplane::store::record::{self, Record};
    let store = dir.join("store");
    let mut segs: Vec<_> = std::fs::read_dir(&store)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    segs.sort();
    let path = segs.pop().expect("a segment");
    let data = bytes::Bytes::from(std::fs::read(&path).unwrap());
    let scan = record::scan(data).expect("a segment");
    let recs = scan
        .records
        .iter()
        .filter(|(_, r)| matches!(r, Record::Envelope(_)))
        .map(|(at, r)| (*at, r.encoded_len()))
        .collect();
    (path, recs)
}

/// Runs `openmesh-relay store inspect` on `dir`.
fn inspect(dir: &std::path::Path) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_openmesh-relay"))
        .args(["store", "inspect", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_last_record_and_a_corrupt_one_are_cut_and_everything_before_them_served() {
    const N: u64 = 1_000;
    let relay = Relay::start(&["--cores", "1"], None);
    let cfg_b = relay.config("torn-b");
    let b_id = cfg_b.identity.agent_id();
    let mut a = relay.agent("torn-a").await;
    let first: Vec<u64> = (0..N).collect();
    let (acked, _) = send_durable(&mut a, b_id, &first, 256).await;
    assert_eq!(acked.len() as u64, N);
    drop(a);
    let dir = relay.kill9();

    // A torn write: the second half of the last record never reached the disk.
    let (seg, recs) = segment_and_records(&dir);
    assert_eq!(recs.len() as u64, N);
    let (at, len) = *recs.last().unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[at + len / 2..at + len].fill(0);
    std::fs::write(&seg, &bytes).unwrap();
    let report = inspect(&dir);
    assert!(report.contains(&format!("{}  ", b_id.to_hex())), "{report}");
    assert!(report.contains("999 envelopes live"), "{report}");
    assert!(
        report.contains("cut: seg-000-") && report.contains("(checksum)"),
        "{report}"
    );

    let relay = Relay::start_in(dir, &["--cores", "1"], None);
    assert_eq!(
        relay.metric("openmesh_store_recovered_envelopes", &[]),
        (N - 1) as f64
    );
    assert_eq!(relay.metric("openmesh_store_recovery_cuts_total", &[]), 1.0);
    assert!(relay.log().contains("store segment cut at a bad record"));
    // Then more, and a record in the middle of the new segment rots.
    let mut a = relay.agent("torn-a2").await;
    let second: Vec<u64> = (N..2 * N).collect();
    let (acked, _) = send_durable(&mut a, b_id, &second, 256).await;
    assert_eq!(acked.len() as u64, N);
    drop(a);
    let dir = relay.kill9();
    let (seg, recs) = segment_and_records(&dir);
    // The backlog was rewritten into its own segment at start; the new ones are in the next.
    assert_eq!(recs.len() as u64, N, "the newest segment");
    let k = recs.len() / 2;
    let (at, len) = recs[k];
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[at + len - 3] ^= 0x5a;
    std::fs::write(&seg, &bytes).unwrap();

    let relay = Relay::start_in(dir.clone(), &["--cores", "1"], None);
    assert_eq!(
        relay.metric("openmesh_store_recovered_envelopes", &[]),
        (N - 1) as f64 + k as f64,
        "the other segment whole, and every record before the corrupt one"
    );
    assert!(
        dir.join("store/damaged").read_dir().unwrap().count() == 2,
        "both cut segments are kept aside"
    );
    let mut cfg_b = cfg_b;
    cfg_b.relay = relay.addr;
    let mut b = Session::connect(cfg_b).await.unwrap();
    let total = (N - 1) as usize + k;
    let got = receive(&mut b, &mut HashSet::new(), total, Duration::from_secs(10)).await;
    let want: Vec<u64> = (0..N - 1).chain(N..N + k as u64).collect();
    assert_eq!(got, want, "in store order, nothing after the cut");
}

/// A sender whose ACKs were lost resends after the relay restarted: envelopes already
/// delivered (their released records on disk, their records not yet compacted away) are ACKed
/// again but not delivered again, also after a second restart with another number of cores
/// (the start carries the duplicate windows forward in a segment of their own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resends_of_delivered_durable_envelopes_after_a_restart_are_not_delivered_again() {
    const N: u64 = 2_000;
    let relay = Relay::start(&["--cores", "2"], None);
    let cfg_a = relay.config("resend-a");
    let cfg_b = relay.config("resend-b");
    let b_id = cfg_b.identity.agent_id();
    let mut b = Session::connect(cfg_b.clone()).await.unwrap();
    let mut a = Session::connect(cfg_a.clone()).await.unwrap();
    let ids: Vec<u64> = (0..N).collect();
    let (acked, _) = send_durable(&mut a, b_id, &ids, 256).await;
    assert_eq!(acked.len() as u64, N);
    receive_all(&mut b, N).await;
    drop(a);
    b.close().await.unwrap();
    let dir = relay.dir.clone();
    // The receiver's ACKs become released records on disk.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !inspect(&dir).contains(&format!("0 envelopes live, {N} released")) {
        assert!(std::time::Instant::now() < deadline, "{}", inspect(&dir));
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut dir = relay.kill9();
    for (round, cores) in ["2", "1"].into_iter().enumerate() {
        let relay = Relay::start_in(dir, &["--cores", cores], None);
        let new = N + round as u64;
        assert!(
            inspect(&relay.dir).contains("duplicate windows: 1 "),
            "{}",
            inspect(&relay.dir)
        );
        let mut cfg = cfg_a.clone();
        cfg.relay = relay.addr;
        let mut a = Session::connect(cfg).await.unwrap();
        // Round 1 also resends the new envelope of round 0.
        let resent: Vec<u64> = (0..new).collect();
        let (acked, nacked) = send_durable(&mut a, b_id, &resent, 256).await;
        assert_eq!(acked.len(), resent.len(), "every resend ACKed: {nacked:?}");
        // A new envelope of the same epoch still goes through.
        let (acked, _) = send_durable(&mut a, b_id, &[new], 1).await;
        assert_eq!(acked, vec![new]);
        drop(a);
        let resent = resent.len();
        assert_eq!(
            relay.metric("openmesh_duplicates_suppressed_total", &[]),
            resent as f64
        );
        let mut cfg = cfg_b.clone();
        cfg.relay = relay.addr;
        let mut b = Session::connect(cfg).await.unwrap();
        let got = receive(&mut b, &mut HashSet::new(), 2, Duration::from_millis(1_500)).await;
        assert_eq!(got, vec![new], "only the new one ({cores} cores)");
        b.close().await.unwrap();
        std::thread::sleep(Duration::from_millis(300));
        dir = relay.kill9();
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A crash while a segment was being created (filled first, header last) leaves a file with
/// a segment's name and no header. The next start removes it (keeps it aside if it holds
/// anything but zeros), does not reuse its number, and serves everything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_whose_creation_was_cut_short_does_not_stop_the_next_start() {
    use openmesh_dataplane::engine::store::{parse_segment_name, segment_name};
    const N: u64 = 300;
    let relay = Relay::start(&["--cores", "1"], None);
    let cfg_b = relay.config("unfinished-b");
    let b_id = cfg_b.identity.agent_id();
    let mut a = relay.agent("unfinished-a").await;
    let ids: Vec<u64> = (0..N).collect();
    let (acked, _) = send_durable(&mut a, b_id, &ids, 128).await;
    assert_eq!(acked.len() as u64, N);
    drop(a);
    let dir = relay.kill9();
    let (seg, _) = segment_and_records(&dir);
    let name = seg.file_name().unwrap().to_str().unwrap();
    let (core, number) = parse_segment_name(name).unwrap();
    let zeros = dir.join("store").join(segment_name(core, number + 1));
    let junk = dir.join("store").join(segment_name(core, number + 2));
    std::fs::write(&zeros, vec![0u8; 64 << 10]).unwrap();
    std::fs::write(&junk, vec![0xabu8; 4 << 10]).unwrap();
    let report = inspect(&dir);
    assert!(
        report.contains(&format!(
            "no header (creation did not finish, removed at start): {}",
            segment_name(core, number + 1)
        )) && report.contains(&format!("kept aside): {}", segment_name(core, number + 2))),
        "{report}"
    );

    for round in 0..2 {
        let relay = Relay::start_in(dir.clone(), &["--cores", "1"], None);
        assert_eq!(
            relay.metric("openmesh_store_recovered_envelopes", &[]),
            (N + 10 * round) as f64,
            "round {round}: the backlog and what the round before sent to an absent agent"
        );
        assert!(!zeros.exists() && !junk.exists());
        assert!(dir
            .join("store/damaged")
            .join(segment_name(core, number + 2))
            .exists());
        // The relay then creates segments of its own with the freed-up numbers taken.
        let mut a = relay.agent("unfinished-a2").await;
        let more: Vec<u64> = (N..N + 10).collect();
        let (acked, _) = send_durable(
            &mut a,
            relay.config("unfinished-c").identity.agent_id(),
            &more,
            128,
        )
        .await;
        assert_eq!(acked.len(), 10);
        drop(a);
        if round == 1 {
            let mut cfg_b = cfg_b.clone();
            cfg_b.relay = relay.addr;
            let mut b = Session::connect(cfg_b).await.unwrap();
            let got = receive(
                &mut b,
                &mut HashSet::new(),
                N as usize,
                Duration::from_secs(10),
            )
            .await;
            assert_eq!(got, ids);
        }
        let dir = relay.kill9();
        if round == 1 {
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}

/// Identities are free: ten sources fill the store for 1,000 fresh destination ids that never
/// connect. What is kept for absent agents, in memory and on disk, stays within
/// `limits.absent_bytes` (beyond it: `queue_full`, retryable; each source also meets its quota),
/// and a well-behaved pair beside loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_fresh_destinations_cannot_grow_the_store_past_its_bounds() {
    const BUDGET: u64 = 64 << 20;
    const SEGMENT: u64 = 1 << 20;
    let relay = Relay::start(
        &["--cores", "2"],
        Some(&format!(
            "[limits]\nmemory_budget = {BUDGET}\n[store]\nsegment_bytes = {SEGMENT}\n"
        )),
    );
    let absent_bytes = BUDGET / 2;
    let good = common::well_behaved_pair(&relay, 2_000);
    let rss_before = relay.rss();
    let destinations: Vec<AgentId> = (0..1_000u32)
        .map(|i| {
            // Spread over both home cores.
            let mut id = [7u8; 32];
            id[..8].copy_from_slice(&u64::from(i).to_be_bytes());
            AgentId(id)
        })
        .collect();
    let payload = vec![5u8; 16 << 10];
    let (mut acked, mut refused, mut full) = (0u64, 0u64, 0u64);
    let mut frame_len = 0;
    for s in 0..10 {
        let mut a = relay.agent(&format!("filler-{s}")).await;
        let mut answered = 0;
        for d in destinations.iter().skip(s * 100).take(100) {
            for _ in 0..30 {
                let mut b = a.envelope_to(*d, 600_000);
                b.class = DeliveryClass::Durable;
                let env = b.build(&payload).unwrap();
                frame_len = env.frame_len() as u64;
                a.send(&env).await.unwrap();
            }
        }
        while answered < 3_000 {
            match tokio::time::timeout(Duration::from_secs(20), a.next_event()).await {
                Ok(Some(Event::Acked(ids))) => {
                    acked += ids.len() as u64;
                    answered += ids.len();
                }
                Ok(Some(Event::Nacked(n))) => {
                    let r = n.reason();
                    assert!(
                        matches!(r, Some(Reason::QueueFull | Reason::QuotaExceeded)),
                        "{n:?}"
                    );
                    refused += 1;
                    if r == Some(Reason::QueueFull) {
                        full += 1;
                    }
                    answered += 1;
                }
                other => panic!("filler got {other:?}"),
            }
        }
    }
    assert!(refused > 0, "the bound was reached ({acked} stored)");
    assert!(
        acked * frame_len <= absent_bytes,
        "{acked} envelopes of {frame_len} bytes kept past absent_bytes {absent_bytes}"
    );
    // Disk: the live records plus at most the segment being written and the one created ahead,
    // per core.
    std::thread::sleep(Duration::from_millis(300));
    let disk = relay.metric("openmesh_store_disk_bytes", &[]);
    assert!(
        disk as u64 <= absent_bytes + 2 * 2 * SEGMENT + acked * 128,
        "{disk} bytes of segments for {acked} envelopes"
    );
    let grown = relay.rss().saturating_sub(rss_before);
    eprintln!(
        "{acked} stored ({} bytes), {refused} refused ({full} queue_full), {disk} bytes of segments, RSS +{grown}",
        acked * frame_len
    );
    // What the relay counts as held stays within the budget. The process grows by more than
    // what is held at the end: during the flood usage runs up to the budget (read blocks, write
    // batches, envelopes waiting for their sync, refused frames), and the allocator keeps the
    // pages of that peak for reuse (measured: 66 to 83 MB more for 35 MB held at the end).
    let used = relay.metric("openmesh_memory_used_bytes", &[]);
    assert!(used <= BUDGET as f64, "{used} bytes held, budget {BUDGET}");
    assert!(
        grown <= BUDGET + BUDGET / 2,
        "RSS grew {grown} bytes, budget {BUDGET}"
    );
    assert_eq!(good.await.unwrap(), 2_000, "the pair beside lost nothing");
}

/// SIGTERM right after the receiver took its backlog: the drain settles the receiver's ACKs and
/// the store writes their released records before the process exits, so the next start serves
/// nothing again. (That the exit also waits for the store's last sync is not visible here: a
/// process exit keeps the page cache.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_right_after_delivery_serves_nothing_twice() {
    const N: u64 = 5_000;
    let mut relay = Relay::start(&["--cores", "2"], None);
    let cfg_b = relay.config("term-b");
    let b_id = cfg_b.identity.agent_id();
    let mut a = relay.agent("term-a").await;
    let numbers: Vec<u64> = (0..N).collect();
    let (acked, _) = send_durable(&mut a, b_id, &numbers, 512).await;
    assert_eq!(acked.len() as u64, N);
    drop(a);
    let mut b = Session::connect(cfg_b).await.unwrap();
    receive_all(&mut b, N).await;
    // At once: the ACKs just sent are settled during the drain and their released records
    // appended.
    relay.sigterm();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while b.next_event().await.is_some() {}
    })
    .await;
    drop(b);
    assert!(relay.terminate().success());
    relay.keep_dir = true;
    let dir = relay.dir.clone();
    drop(relay);
    let relay = Relay::start_in(dir, &["--cores", "2"], None);
    assert_eq!(
        relay.metric("openmesh_store_recovered_envelopes", &[]),
        0.0,
        "everything ACKed before the exit stays released"
    );
}

/// Disk use follows the backlog: one envelope kept for an agent that stays away, then thousands
/// delivered at once through small segments. The long-lived one is copied forward, old segments
/// go, and it is still delivered when its agent comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_lived_envelope_does_not_keep_the_history_on_disk() {
    const SEGMENT: u64 = 1 << 16;
    let relay = Relay::start(
        &["--cores", "1"],
        Some(&format!("[store]\nsegment_bytes = {SEGMENT}\n")),
    );
    let cfg_away = relay.config("away");
    let away = cfg_away.identity.agent_id();
    let mut a = relay.agent("history-a").await;
    let (acked, _) = send_durable(&mut a, away, &[1_000_000], 1).await;
    assert_eq!(acked.len(), 1);
    let mut b = relay.agent("history-b").await;
    let b_id = b.id();
    let numbers: Vec<u64> = (0..20_000).collect();
    let sender = tokio::spawn(async move {
        let r = send_durable(&mut a, b_id, &numbers, 256).await;
        (a, r)
    });
    let got = receive(&mut b, &mut HashSet::new(), 20_000, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 20_000);
    let (_a, (acked, _)) = sender.await.unwrap();
    assert_eq!(acked.len(), 20_000);
    // 20,000 records of about 170 bytes went through 64 KiB segments: about 50 of them.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let segments = relay.metric("openmesh_store_segments", &[]);
        if segments <= 4.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{segments} segments left for one live envelope"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(relay.metric("openmesh_store_compacted_records_total", &[]) >= 1.0);
    assert!(relay.metric("openmesh_store_segments_removed_total", &[]) >= 20.0);
    let mut cfg_away = cfg_away;
    cfg_away.relay = relay.addr;
    let mut x = Session::connect(cfg_away).await.unwrap();
    let got = receive(&mut x, &mut HashSet::new(), 1, Duration::from_secs(10)).await;
    assert_eq!(got, vec![1_000_000]);
}

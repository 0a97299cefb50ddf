//! Receipts end to end: a source that asks gets exactly one `delivered` receipt per envelope its
//! destination ACKed, and an `expired` one for an envelope that expired while queued (which is
//! then never delivered).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::Relay;
use openmesh_agent::session::{Event, Session};
use openmesh_dataplane::wire::{flags, DeliveryClass, MessageId, ReceiptStatus};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_gets_one_receipt_per_delivered_envelope_and_an_expiry_notice() {
    const N: u64 = 2_000;
    let relay = Relay::start(&["--cores", "2"], None);
    let mut a = relay.agent("receipt-a").await;
    assert_ne!(
        a.welcome().features & openmesh_dataplane::wire::features::RECEIPTS,
        0,
        "receipts are agreed"
    );
    let cfg_b = relay.config("receipt-b");
    let b_id = cfg_b.identity.agent_id();
    let cfg_c = relay.config("receipt-c");
    let c_id = cfg_c.identity.agent_id();
    // To B, absent for now: half at-least-once, half durable, every one asking for a receipt.
    let mut ids = Vec::new();
    for n in 0..N {
        let mut e = a.envelope_to(b_id, 60_000);
        e.flags = flags::RECEIPT_DELIVERED | flags::RECEIPT_EXPIRED;
        if n % 2 == 1 {
            e.class = DeliveryClass::Durable;
        }
        let env = e.build(&n.to_be_bytes()).unwrap();
        ids.push(env.message_id());
        a.send(&env).await.unwrap();
    }
    // To C, which never comes back in time: it expires while kept.
    let mut e = a.envelope_to(c_id, 300);
    e.flags = flags::RECEIPT_EXPIRED;
    let short = e.build(b"short-lived").unwrap();
    a.send(&short).await.unwrap();
    // And one that does not ask: no receipt.
    let quiet = a.envelope_to(b_id, 60_000).build(b"quiet").unwrap();
    a.send(&quiet).await.unwrap();

    let mut b = Session::connect(cfg_b).await.unwrap();
    let mut delivered = 0;
    while delivered < N + 1 {
        match tokio::time::timeout(Duration::from_secs(20), b.next_event()).await {
            Ok(Some(Event::Envelope(e))) => {
                delivered += 1;
                b.ack(e.message_id()).await.unwrap();
            }
            other => panic!("receiver got {other:?}"),
        }
    }
    let mut receipts: HashMap<MessageId, Vec<ReceiptStatus>> = HashMap::new();
    let (mut acked, mut got) = (0u64, 0u64);
    while got < N + 1 || acked < N + 2 {
        match tokio::time::timeout(Duration::from_secs(20), a.next_event()).await {
            Ok(Some(Event::Acked(x))) => acked += x.len() as u64,
            Ok(Some(Event::Receipt(r))) => {
                got += 1;
                receipts.entry(r.message_id).or_default().push(r.status);
            }
            other => panic!("sender got {other:?}: {got} receipts, {acked} ACKs"),
        }
    }
    for id in &ids {
        assert_eq!(
            receipts.get(id).map(Vec::as_slice),
            Some(&[ReceiptStatus::Delivered][..]),
            "one delivered receipt for {id}"
        );
    }
    assert_eq!(
        receipts.get(&short.message_id()).map(Vec::as_slice),
        Some(&[ReceiptStatus::Expired][..]),
        "the expiry notice"
    );
    assert!(!receipts.contains_key(&quiet.message_id()));
    // Nothing more comes: no second receipt for anything.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), a.next_event())
            .await
            .is_err(),
        "no receipt twice"
    );
    // C comes back: the expired envelope is not delivered.
    let mut c = Session::connect(cfg_c).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), c.next_event())
            .await
            .is_err(),
        "an expired envelope is never delivered"
    );
    assert_eq!(
        relay.metric("openmesh_receipts_sent_total", &["status=\"delivered\""]),
        N as f64
    );
}

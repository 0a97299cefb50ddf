//! A relay that owes an agent more control output than one write buffer's share (NACKs piled up
//! while the agent did not read) writes it whole before any envelope: the agent's stream stays
//! frame by frame decodable.

mod common;

use std::time::Duration;

use common::{hello_bytes, RawLink, Relay};
use openmesh_dataplane::wire::{AgentId, Destination, EnvelopeBuilder, Frame, MessageId, Reason};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn piled_up_nacks_and_envelopes_arrive_as_whole_frames() {
    let relay = Relay::start(&[], None);
    let mut r = RawLink::open(&relay, "slow-reader").await;
    r.send(&hello_bytes(&relay)).await;
    assert!(matches!(r.next().await, Some(Frame::Welcome(_))));
    // 100,000 envelopes claiming another source: a NACK each (about 4 MB owed, more than the
    // socket buffers hold), not read yet.
    let now = openmesh_agent::unix_ms();
    let mut burst = bytes::BytesMut::new();
    for i in 0..100_000u128 {
        EnvelopeBuilder::new(
            MessageId::from_u128(i + 1),
            AgentId([7; 32]),
            Destination::Agent(r.id),
            now,
            60_000,
        )
        .build(b"not mine")
        .unwrap()
        .encode(&mut burst);
    }
    r.send(&burst).await;
    // Meanwhile envelopes queue for it.
    let s = relay.agent("sender").await;
    for i in 0..200u64 {
        s.send(&s.envelope_to(r.id, 60_000).build(&i.to_be_bytes()).unwrap())
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (mut nacks, mut envelopes) = (0, 0);
    while nacks < 100_000 || envelopes < 200 {
        // `next` fails the test on a frame that does not decode.
        match r.next().await {
            Some(Frame::Nack(n)) => {
                assert_eq!(n.reason(), Some(Reason::SourceMismatch));
                nacks += 1;
            }
            Some(Frame::Envelope(_)) => envelopes += 1,
            Some(_) => {}
            None => panic!("stream ended with {nacks} NACKs, {envelopes} envelopes"),
        }
    }
}

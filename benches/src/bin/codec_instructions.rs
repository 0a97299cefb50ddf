//! A fixed workload for instruction counting under callgrind (stable on a noisy machine):
//! decode N 256-byte ENVELOPE frames from one buffer and encode each one's forwarding head.
//!
//! ```text
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null target/release/codec-instructions 100000
//! ```
//! Run it with N and 2N; the difference divided by N is the per-envelope instruction count.

use bytes::BytesMut;
use openmesh_dataplane::wire::{
    AgentId, Destination, EnvelopeBuilder, Frame, FrameDecoder, MessageId,
};

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let frame = Frame::Envelope(
        EnvelopeBuilder::new(
            MessageId::from_u128(1),
            AgentId([1; 32]),
            Destination::Agent(AgentId([2; 32])),
            0,
            60_000,
        )
        .build(&[0x5a; 256])
        .unwrap(),
    )
    .to_bytes();
    let mut rx = BytesMut::with_capacity(frame.len() * n);
    for _ in 0..n {
        rx.extend_from_slice(&frame);
    }
    let dec = FrameDecoder::new(1 << 20);
    let mut head = BytesMut::with_capacity(512);
    let mut sum = 0usize;
    while let Ok(Some(Frame::Envelope(mut e))) = dec.decode(&mut rx) {
        e.routing.hop_limit -= 1;
        head.clear();
        e.encode_head(&mut head);
        sum += head.len() + e.payload().len();
    }
    println!("{sum}");
}

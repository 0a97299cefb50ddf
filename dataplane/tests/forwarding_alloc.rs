//! The per-envelope forwarding path allocates nothing in steady state.
//!
//! Replays, per envelope, what a core does between the plaintext read buffer and the destination's
//! send queue and back: split the frame off the receive buffer, decode it, check it against the
//! contract, route it, queue it, encode its new head for the writer, move it to in-flight custody,
//! and forget it on the ACK. A counting allocator (per thread) must see zero allocations across
//! 10,000 envelopes after warm-up.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::VecDeque;

use bytes::BytesMut;
use openmesh_dataplane::policy::check_ingress;
use openmesh_dataplane::routing::{Directory, Location, Route};
use openmesh_dataplane::wire::{
    AgentId, Destination, Envelope, EnvelopeBuilder, Frame, FrameDecoder, MessageId, Welcome,
};

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

#[allow(unsafe_code)]
// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.with(Cell::get)
}

#[test]
fn forwarding_an_envelope_allocates_nothing_in_steady_state() {
    let src = AgentId([1; 32]);
    let dst = AgentId([2; 32]);
    let contract = Welcome {
        agent_id: src,
        heartbeat_ms: 10_000,
        max_frame: 1 << 20,
        max_ttl_ms: 60_000,
        classes: 0b11,
        ..Welcome::default()
    };
    let mut dir = Directory::new();
    for i in 0..1000u32 {
        let mut id = [0u8; 32];
        id[..4].copy_from_slice(&i.to_be_bytes());
        dir.attach(
            AgentId(id),
            Location {
                core: (i % 2) as u16,
                seq: i as u64 + 10,
            },
        );
    }
    dir.attach(dst, Location { core: 0, seq: 5000 });

    // One big receive buffer holding many frames, as after a large TLS read.
    const N: usize = 12_000;
    let mut wire = BytesMut::new();
    for i in 0..N {
        EnvelopeBuilder::new(
            MessageId::from_u128(i as u128),
            src,
            Destination::Agent(dst),
            1_000,
            50_000,
        )
        .build(&[0xab; 256])
        .unwrap()
        .encode(&mut wire);
    }
    let mut rx = BytesMut::with_capacity(wire.len());
    rx.extend_from_slice(&wire);
    let dec = FrameDecoder::new(1 << 20);
    let mut queue: VecDeque<Envelope> = VecDeque::with_capacity(4096);
    // In-flight custody, kept in send order like the engine's (ACKs pop the front).
    let mut inflight: VecDeque<Envelope> = VecDeque::with_capacity(4096);
    let mut heads = BytesMut::with_capacity(1 << 16);

    let mut step = |rx: &mut BytesMut| {
        let Some(Frame::Envelope(env)) = dec.decode(rx).unwrap() else {
            panic!("envelope")
        };
        check_ingress(&env, &contract, 2_000).unwrap();
        assert_eq!(dir.route(&env, 0), Route::Local);
        queue.push_back(env);
        let mut env = queue.pop_front().unwrap();
        env.routing.hop_limit -= 1;
        heads.clear();
        env.encode_head(&mut heads);
        let id = env.message_id();
        inflight.push_back(env);
        assert_eq!(inflight.pop_front().unwrap().message_id(), id);
    };

    for _ in 0..2_000 {
        step(&mut rx);
    }
    let before = allocs();
    for _ in 0..10_000 {
        step(&mut rx);
    }
    let per = allocs() - before;
    assert_eq!(
        per, 0,
        "{per} allocations while forwarding 10,000 envelopes"
    );
}

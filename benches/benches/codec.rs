//! Micro-benchmarks of the per-envelope work: frame decode and encode, and the forwarding
//! decision (ingress checks plus the directory lookup).

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use openmesh_dataplane::policy::check_ingress;
use openmesh_dataplane::routing::{Directory, Location};
use openmesh_dataplane::wire::{
    AgentId, Destination, Envelope, EnvelopeBuilder, Frame, FrameDecoder, MessageId, Welcome,
};

fn envelope(size: usize) -> Envelope {
    EnvelopeBuilder::new(
        MessageId::from_u128(7),
        AgentId([1; 32]),
        Destination::Agent(AgentId([2; 32])),
        1_000,
        60_000,
    )
    .build(&vec![0x5a; size])
    .unwrap()
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    for size in [256usize, 16 << 10] {
        let env = envelope(size);
        let frame = Frame::Envelope(env.clone()).to_bytes();
        g.throughput(Throughput::Elements(1));
        let dec = FrameDecoder::new(1 << 20);
        // Steady state, as in a relay: many frames in one receive buffer (its one-time
        // promotion to a shared buffer is amortised), split off and decoded one by one.
        g.bench_function(format!("decode_envelope_{size}"), |b| {
            b.iter_custom(|iters| {
                let mut buf = BytesMut::with_capacity(frame.len() * iters as usize);
                for _ in 0..iters {
                    buf.extend_from_slice(&frame);
                }
                let t0 = std::time::Instant::now();
                for _ in 0..iters {
                    std::hint::black_box(dec.decode(&mut buf).unwrap().unwrap());
                }
                t0.elapsed()
            })
        });
        let mut head = BytesMut::with_capacity(512);
        g.bench_function(format!("encode_head_{size}"), |b| {
            b.iter(|| {
                head.clear();
                env.encode_head(&mut head);
                head.len()
            })
        });
    }
    g.finish();
}

fn forwarding(c: &mut Criterion) {
    let src = AgentId([1; 32]);
    let contract = Welcome {
        agent_id: src,
        max_frame: 1 << 20,
        max_ttl_ms: 600_000,
        classes: 0b11,
        ..Welcome::default()
    };
    let mut dir = Directory::new();
    for i in 0..100_000u32 {
        let mut id = [0u8; 32];
        id[..4].copy_from_slice(&i.to_be_bytes());
        dir.attach(
            AgentId(id),
            Location {
                core: (i % 2) as u16,
                seq: i as u64 + 1,
            },
        );
    }
    dir.attach(
        AgentId([2; 32]),
        Location {
            core: 1,
            seq: 1_000_000,
        },
    );
    let env = envelope(256);
    c.bench_function("forwarding_decision_100k_agents", |b| {
        b.iter(|| {
            check_ingress(&env, &contract, 2_000).unwrap();
            dir.route(&env, 0, 2)
        })
    });
}

criterion_group!(benches, codec, forwarding);
criterion_main!(benches);

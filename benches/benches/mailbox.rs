//! Cross-core handoff: envelopes pushed through an outbox into another thread's mailbox and
//! popped there, the way two cores exchange `Deliver` messages.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use openmesh_dataplane::engine::mailbox::{flush, CoreMsg, Mailbox, Outbox};
use openmesh_dataplane::shard::msg::Src;
use openmesh_dataplane::wire::{AgentId, Destination, EnvelopeBuilder, MessageId};

fn handoff(c: &mut Criterion) {
    let env = EnvelopeBuilder::new(
        MessageId::from_u128(1),
        AgentId([1; 32]),
        Destination::Agent(AgentId([2; 32])),
        0,
        60_000,
    )
    .build(&[0u8; 256])
    .unwrap();
    let mut g = c.benchmark_group("mailbox");
    const BATCH: u64 = 256;
    g.throughput(Throughput::Elements(BATCH));
    g.bench_function("cross_thread_handoff_batch_256", |b| {
        b.iter_custom(|iters| {
            let boxes = Arc::new(vec![Mailbox::new(65_536), Mailbox::new(16)]);
            let total = iters * BATCH;
            let rx = boxes.clone();
            let consumer = std::thread::spawn(move || {
                let mut got = 0;
                while got < total {
                    match rx[0].pop() {
                        Some(CoreMsg::Deliver { env, .. }) => {
                            std::hint::black_box(env);
                            got += 1;
                        }
                        Some(CoreMsg::Delivers(v)) => {
                            got += v.len() as u64;
                            std::hint::black_box(v);
                        }
                        Some(_) => {}
                        None => std::hint::spin_loop(),
                    }
                }
            });
            let mut out = Outbox::new(2);
            let t0 = Instant::now();
            for _ in 0..iters {
                for _ in 0..BATCH {
                    out.push(
                        0,
                        CoreMsg::Deliver {
                            env: env.clone(),
                            src: Some(Src {
                                core: 1,
                                conn: 7,
                                tag: env.message_id(),
                                relay: false,
                                len: env.frame_len() as u32,
                                hold: false,
                            }),
                        },
                    );
                }
                while out.max_pending() > 0 {
                    flush(&mut out, &boxes);
                }
            }
            consumer.join().unwrap();
            t0.elapsed().max(Duration::from_nanos(1))
        })
    });
    g.finish();
}

criterion_group!(benches, handoff);
criterion_main!(benches);

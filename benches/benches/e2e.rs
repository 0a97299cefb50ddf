//! End-to-end sealing as an agent pays for it (`openmesh_agent::e2e`): per envelope once a
//! context exists (one AEAD, the header as associated data, the replay window), and per
//! context (X-Wing encapsulation and a signature to open one; a signature check and a
//! decapsulation to accept one).

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use openmesh_agent::e2e::{E2e, E2eConfig};
use openmesh_dataplane::directory::Capability;
use openmesh_dataplane::pki::Identity;
use openmesh_dataplane::wire::{Destination, EnvelopeBuilder, MessageId};

const NOW: u64 = 1_800_000_000_000;

fn party(name: &str, cfg: E2eConfig) -> (Identity, E2e) {
    let id = Identity::generate_self_signed(name).unwrap();
    let e = E2e::new(
        cfg,
        id.signing_key().unwrap(),
        Capability::default(),
        3600,
        3_600_000,
        NOW,
    )
    .unwrap();
    (id, e)
}

fn builder(from: &Identity, to: &Identity, n: u64) -> EnvelopeBuilder {
    let mut b = EnvelopeBuilder::new(
        MessageId::from_u128(n as u128),
        from.agent_id(),
        Destination::Agent(to.agent_id()),
        NOW,
        60_000,
    );
    // Distinct expiries keep the replay window's floor below every envelope.
    b.expires_ms = NOW + 600_000 + n;
    b.schema = "market/proposal@2.1".into();
    b
}

fn per_envelope(c: &mut Criterion) {
    let mut g = c.benchmark_group("e2e");
    for (label, cfg) in [
        ("", E2eConfig::default()),
        (
            "_after_receipt",
            E2eConfig {
                context_until_receipt: true,
                ..E2eConfig::default()
            },
        ),
    ] {
        for size in [256usize, 16 << 10] {
            let (ai, mut a) = party("a", cfg.clone());
            let (bi, mut b) = party("b", E2eConfig::default());
            let bundle = b.bundle().clone();
            let body = vec![0x42u8; size];
            let mut n = 0u64;
            // The context exists (and, for `_after_receipt`, is confirmed) before measuring.
            let first = a.seal(&builder(&ai, &bi, n), &bundle, &body, NOW).unwrap();
            a.on_delivered(&first.message_id());
            b.open(&first, NOW).unwrap();
            g.throughput(Throughput::Bytes(size as u64));
            g.bench_function(format!("seal{label}_{size}"), |bench| {
                bench.iter(|| {
                    n += 1;
                    a.seal(&builder(&ai, &bi, n), &bundle, &body, NOW).unwrap()
                })
            });
            g.bench_function(format!("open{label}_{size}"), |bench| {
                bench.iter_batched(
                    || {
                        n += 1;
                        a.seal(&builder(&ai, &bi, n), &bundle, &body, NOW).unwrap()
                    },
                    |env| b.open(&env, NOW).unwrap().plaintext.len(),
                    BatchSize::SmallInput,
                )
            });
        }
    }
    g.finish();
}

fn per_context(c: &mut Criterion) {
    let mut g = c.benchmark_group("e2e_context");
    g.sample_size(20);
    let (ai, mut a) = party("a", E2eConfig::default());
    // A new recipient each time: the seal opens a context (encapsulation and signature).
    g.bench_function("seal_new_context", |bench| {
        bench.iter_batched(
            || party("b", E2eConfig::default()),
            |(bi, b)| {
                a.seal(&builder(&ai, &bi, 1), b.bundle(), b"x", NOW)
                    .unwrap()
            },
            BatchSize::SmallInput,
        )
    });
    // A new sender each time: the open accepts a context (signature check, decapsulation).
    let (bi, mut b) = party("b", E2eConfig::default());
    let bundle = b.bundle().clone();
    g.bench_function("open_new_context", |bench| {
        bench.iter_batched(
            || {
                let (si, mut s) = party("s", E2eConfig::default());
                s.seal(&builder(&si, &bi, 1), &bundle, b"x", NOW).unwrap()
            },
            |env| b.open(&env, NOW).unwrap().plaintext.len(),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, per_envelope, per_context);
criterion_main!(benches);

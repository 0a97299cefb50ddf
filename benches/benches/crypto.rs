//! AEAD seal and open with aws-lc-rs at the sizes envelopes travel at: what the TLS layer costs per
//! record, and what agents pay end to end.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, CHACHA20_POLY1305};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn aead(c: &mut Criterion) {
    let mut g = c.benchmark_group("aead");
    for (name, alg) in [
        ("aes256gcm", &AES_256_GCM),
        ("chacha20poly1305", &CHACHA20_POLY1305),
    ] {
        let key = LessSafeKey::new(UnboundKey::new(alg, &[7u8; 32]).unwrap());
        for size in [256usize, 1024, 16 << 10] {
            g.throughput(Throughput::Bytes(size as u64));
            let mut buf = vec![0x42u8; size];
            g.bench_function(format!("{name}_seal_{size}"), |b| {
                b.iter(|| {
                    let nonce = Nonce::assume_unique_for_key([1u8; 12]);
                    key.seal_in_place_separate_tag(nonce, Aad::from(b"header"), &mut buf)
                        .unwrap()
                })
            });
            let mut sealed = vec![0x42u8; size];
            let tag = key
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key([1u8; 12]),
                    Aad::from(b"header"),
                    &mut sealed,
                )
                .unwrap();
            sealed.extend_from_slice(tag.as_ref());
            g.bench_function(format!("{name}_open_{size}"), |b| {
                b.iter_batched_ref(
                    || sealed.clone(),
                    |s| {
                        let nonce = Nonce::assume_unique_for_key([1u8; 12]);
                        key.open_in_place(nonce, Aad::from(b"header"), s)
                            .unwrap()
                            .len()
                    },
                    criterion::BatchSize::SmallInput,
                )
            });
        }
    }
    g.finish();
}

criterion_group!(benches, aead);
criterion_main!(benches);

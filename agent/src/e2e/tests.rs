use super::*;
use openmesh_dataplane::wire::{DeliveryClass, EnvelopeBuilder};

fn identity(seed: u8) -> Ed25519KeyPair {
    Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).unwrap()
}

fn agent(seed: u8, cfg: E2eConfig) -> E2e {
    E2e::new(
        cfg,
        identity(seed),
        Capability::default(),
        3600,
        60_000,
        NOW,
    )
    .unwrap()
}

const NOW: u64 = 1_800_000_000_000;

fn builder(from: &E2e, to: &E2e, n: u128) -> EnvelopeBuilder {
    let mut b = EnvelopeBuilder::new(
        MessageId::from_u128(n),
        from.me,
        Destination::Agent(to.me),
        NOW,
        60_000,
    );
    b.class = DeliveryClass::AtLeastOnce;
    b.schema = "test@1".into();
    b
}

#[test]
fn sealed_envelopes_open_and_the_context_rides_until_confirmed() {
    let cfg = E2eConfig {
        context_until_receipt: true,
        ..E2eConfig::default()
    };
    let (mut a, mut b) = (agent(1, cfg), agent(2, E2eConfig::default()));
    let bundle = b.bundle().clone();
    let first = a.seal(&builder(&a, &b, 1), &bundle, b"one", NOW).unwrap();
    assert_ne!(
        first.flags() & flags::RECEIPT_DELIVERED,
        0,
        "asks for the receipt"
    );
    assert!(first.payload().len() > CONTEXT_LEN);
    let o = b.open(&first, NOW).unwrap();
    assert_eq!(o.plaintext, b"one");
    assert_eq!(o.source, a.me);
    // Confirmed by the receipt: later envelopes are small.
    a.on_delivered(&first.message_id());
    let second = a.seal(&builder(&a, &b, 2), &bundle, b"two", NOW).unwrap();
    assert_eq!(second.payload().len(), SEALED_HEADER_LEN + 3 + TAG_LEN);
    assert_eq!(second.flags() & flags::RECEIPT_DELIVERED, 0);
    assert_eq!(b.open(&second, NOW).unwrap().plaintext, b"two");
    assert_eq!(a.stats.contexts_sent, 1);
    assert_eq!(b.stats.contexts_received, 1);
    // A recipient that lost the context cannot open the small one; another agent's keys
    // never could.
    b.recv.clear();
    b.replay = replay::Window::new(16);
    assert_eq!(b.open(&second, NOW), Err(E2eError::UnknownContext));
    let mut other = agent(2, E2eConfig::default());
    assert_eq!(other.open(&first, NOW), Err(E2eError::StaleKey));
}

#[test]
fn every_flipped_bit_is_refused_with_its_kind() {
    flips(false);
    flips(true);
}

fn flips(sign_each: bool) {
    let cfg = E2eConfig {
        sign_each,
        ..E2eConfig::default()
    };
    let (mut a, mut b) = (agent(3, cfg.clone()), agent(4, E2eConfig::default()));
    let bundle = b.bundle().clone();
    let env = a
        .seal(&builder(&a, &b, 7), &bundle, &[5u8; 300], NOW)
        .unwrap();
    let imm = env.immutable.clone();
    let payload_at = imm.len() - env.payload().len();
    let ctx_sig_at = payload_at + SEALED_HEADER_LEN + ENC_LEN;
    let mut kinds = std::collections::BTreeMap::new();
    for i in 0..imm.len() {
        let mut bytes = imm.to_vec();
        bytes[i] ^= 0x01;
        let Ok(bad) = redecode(bytes) else {
            *kinds.entry("does not decode").or_insert(0) += 1;
            continue;
        };
        // As if this were the first envelope of the context B sees.
        b.recv.clear();
        let r = b.open(&bad, NOW);
        assert!(r.is_err(), "byte {i} flipped, still opened");
        // The context's signature, and with signed envelopes the envelope's signature (the
        // rest is refused by the AEAD before the signature is checked).
        if (ctx_sig_at..ctx_sig_at + 64).contains(&i) || (sign_each && i >= imm.len() - 64) {
            assert_eq!(r, Err(E2eError::BadSignature), "byte {i}");
        }
        *kinds
            .entry(match r.unwrap_err() {
                E2eError::Tampered => "tampered",
                E2eError::BadSignature => "bad signature",
                E2eError::Malformed(_) => "malformed",
                _ => "other",
            })
            .or_insert(0) += 1;
    }
    // The encapsulation is bound by the context id, the header and the ciphertext by the AEAD.
    assert!(kinds["tampered"] >= 1120 + 300, "{kinds:?}");
    let signatures = if sign_each { 2 * 64 } else { 64 };
    assert!(kinds["bad signature"] >= signatures, "{kinds:?}");
    b.recv.clear();
    assert_eq!(b.open(&env, NOW).unwrap().plaintext, vec![5u8; 300]);
}

/// An envelope's body with the origin's routing part in front of `immutable`.
fn redecode(immutable: Vec<u8>) -> Result<Envelope, WireError> {
    let mut body = vec![8, 0, 0, 0, 0, 0, 0, 0];
    body.extend_from_slice(&immutable);
    Envelope::decode(Bytes::from(body))
}

#[test]
fn a_replay_is_refused_and_so_is_an_envelope_older_than_the_window() {
    let (mut a, mut b) = (
        agent(5, E2eConfig::default()),
        agent(
            6,
            E2eConfig {
                replay_window: 4,
                ..E2eConfig::default()
            },
        ),
    );
    let bundle = b.bundle().clone();
    let envs: Vec<_> = (0..8u128)
        .map(|i| {
            let mut bl = builder(&a, &b, i);
            bl.expires_ms = NOW + 10_000 + i as u64;
            a.seal(&bl, &bundle, b"x", NOW).unwrap()
        })
        .collect();
    b.open(&envs[0], NOW).unwrap();
    assert_eq!(b.open(&envs[0], NOW), Err(E2eError::Replay));
    for e in &envs[1..6] {
        b.open(e, NOW).unwrap();
    }
    // The window holds 4: the oldest left and the floor rose past it; envelopes 0 and 1 are
    // refused whether seen or not.
    assert_eq!(b.open(&envs[1], NOW), Err(E2eError::Replay));
    assert_eq!(b.open(&envs[5], NOW), Err(E2eError::Replay));
    b.open(&envs[6], NOW).unwrap();
    assert_eq!(b.stats.rejected(E2eError::Replay), 3);
}

#[test]
fn a_rotated_key_still_opens_through_its_overlap_then_is_stale() {
    let (mut a, mut b) = (
        agent(7, E2eConfig::default()),
        agent(8, E2eConfig::default()),
    );
    let old = b.bundle().clone();
    let before = a.seal(&builder(&a, &b, 1), &old, b"old key", NOW).unwrap();
    b.rotate(NOW + 1000).unwrap();
    let new = b.bundle().clone();
    assert_eq!(
        new.keys.len(),
        2,
        "the new key first, the old one still listed"
    );
    assert_ne!(new.keys[0].id, old.keys[0].id);
    let after = a
        .seal(&builder(&a, &b, 2), &new, b"new key", NOW + 1000)
        .unwrap();
    assert_eq!(b.open(&before, NOW + 1000).unwrap().plaintext, b"old key");
    assert_eq!(b.open(&after, NOW + 1000).unwrap().plaintext, b"new key");
    // Past the old key's retirement.
    let late = b.own[1].retire_ms;
    let mut bl = builder(&a, &b, 3);
    bl.expires_ms = late + 10_000;
    let stale = a.seal(&bl, &old, b"x", NOW).unwrap();
    b.rotate(late).unwrap();
    assert_eq!(b.open(&stale, late), Err(E2eError::StaleKey));
}

#[test]
fn another_recipient_cannot_open_and_a_redirected_envelope_is_refused() {
    let (mut a, mut b, mut c) = (
        agent(9, E2eConfig::default()),
        agent(10, E2eConfig::default()),
        agent(11, E2eConfig::default()),
    );
    let env = a
        .seal(&builder(&a, &b, 1), &b.bundle().clone(), b"for b", NOW)
        .unwrap();
    assert_eq!(c.open(&env, NOW), Err(E2eError::WrongRecipient));
    assert_eq!(b.open(&env, NOW).unwrap().plaintext, b"for b");
}

#[test]
fn by_default_every_envelope_carries_its_context() {
    let (mut a, mut b) = (
        agent(12, E2eConfig::default()),
        agent(13, E2eConfig::default()),
    );
    let bundle = b.bundle().clone();
    let first = a.seal(&builder(&a, &b, 1), &bundle, b"1", NOW).unwrap();
    a.on_delivered(&first.message_id());
    let second = a.seal(&builder(&a, &b, 2), &bundle, b"2", NOW).unwrap();
    assert_eq!(second.flags() & flags::RECEIPT_DELIVERED, 0);
    // The first was lost: the second opens on its own.
    assert_eq!(b.open(&second, NOW).unwrap().plaintext, b"2");
    assert_eq!(b.open(&first, NOW).unwrap().plaintext, b"1");
}

fn unhex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The key schedule is RFC 9180's: its test vector A.1.1 (DHKEM(X25519, HKDF-SHA256),
/// HKDF-SHA256, AES-128-GCM, base mode) comes out of the same code.
#[test]
fn the_key_schedule_meets_rfc_9180_appendix_a_1_1() {
    let ss = unhex("fe0e18c9f024ce43799ae393c7e8fe8fce9d218875e8227b0187c04e7d2ea1fc");
    let info = unhex("4f6465206f6e2061204772656369616e2055726e");
    let mut key = [0u8; 16];
    let nonce = suite::hpke_base_schedule(0x0020, 0x0001, &ss, &info, &mut key).unwrap();
    assert_eq!(hex(&key), "4531685d41d65f03dc48f6b8302c05b0");
    assert_eq!(hex(&nonce), "56d890e5accaaf011cff4b7d");
}

/// The vectors of PROTOCOL.md §6.5.
#[test]
fn protocol_test_vectors() {
    let seq = |start: u8, n: usize| {
        (0..n)
            .map(|i| start.wrapping_add(i as u8))
            .collect::<Vec<u8>>()
    };
    // X-Wing combiner.
    let ss = suite::combine(
        &seq(0x00, 32),
        &seq(0x20, 32),
        &seq(0x40, 32),
        &seq(0x60, 32),
    );
    assert_eq!(
        hex(&ss),
        "0acca09f2fb739bc89668dbcd01ae5aebf9b72c6fe013297e3baa96854468491"
    );
    // Key schedule for AES-256-GCM.
    let info = info(&AgentId([0x11; 32]), &AgentId([0x22; 32]), &[0x33; 8]);
    let (key, nonce) = suite::key_schedule(Aead::Aes256Gcm, &ss, &info).unwrap();
    assert_eq!(
        hex(&key),
        "a1277d7f8be9551ee7fcbd0d9404b25b84262fc28bc97b784516289d70c1415c"
    );
    assert_eq!(hex(&nonce), "60f6e6daff77d9f359d8f592");
    let (ckey, cnonce) = suite::key_schedule(Aead::ChaCha20Poly1305, &ss, &info).unwrap();
    assert_eq!(
        hex(&ckey),
        "5c756523fa71ebc0d71922118ef19a271e6292f13bb69e96118e8bae15ee8a74"
    );
    assert_eq!(hex(&cnonce), "a587e4aad028364466a195d0");
    // Seal of "hello" at seq 1 with associated data "ad".
    let k = SealKey::new(Aead::Aes256Gcm, &key, nonce).unwrap();
    let mut body = b"hello".to_vec();
    let mut tag = [0u8; 16];
    k.seal(1, b"ad", &mut body, &mut tag).unwrap();
    body.extend_from_slice(&tag);
    assert_eq!(hex(&body), "ab5ae70862aaf207ff1f820ac5468e171b859f35c5");
    // Key id and context id.
    assert_eq!(
        hex(&openmesh_dataplane::directory::key_id(
            &[0x55; 32],
            &[0x66; 1184]
        )),
        "58fabc16d361d76a"
    );
    assert_eq!(
        hex(&context_id(&[0x44; 1120])),
        "e63141eab2338888d31060e9e420fed4"
    );
}

#[test]
fn a_sender_flooding_the_replay_window_locks_out_only_itself() {
    let (mut a, mut f, mut b) = (
        agent(20, E2eConfig::default()),
        agent(21, E2eConfig::default()),
        agent(
            22,
            E2eConfig {
                replay_window: 8,
                ..E2eConfig::default()
            },
        ),
    );
    let bundle = b.bundle().clone();
    let honest: Vec<_> = (0..3u128)
        .map(|i| a.seal(&builder(&a, &b, i), &bundle, b"a", NOW).unwrap())
        .collect();
    b.open(&honest[0], NOW).unwrap();
    b.open(&honest[1], NOW).unwrap();
    for i in 0..50u128 {
        let mut bl = builder(&f, &b, 1000 + i);
        bl.expires_ms = NOW + 10_000 + i as u64;
        let env = f.seal(&bl, &bundle, b"f", NOW).unwrap();
        b.open(&env, NOW).unwrap();
    }
    // The flooder's own floor rose; the honest sender's ids are all still remembered.
    assert_eq!(b.open(&honest[0], NOW), Err(E2eError::Replay));
    assert_eq!(b.open(&honest[1], NOW), Err(E2eError::Replay));
    assert_eq!(b.open(&honest[2], NOW).unwrap().plaintext, b"a");
    let mut bl = builder(&f, &b, 1000);
    bl.expires_ms = NOW + 10_000;
    let early = f.seal(&bl, &bundle, b"f", NOW).unwrap();
    assert_eq!(b.open(&early, NOW), Err(E2eError::Replay));
}

#[test]
fn contexts_are_kept_only_once_an_envelope_opens_and_a_few_per_sender() {
    let (mut a, mut b) = (
        agent(23, E2eConfig::default()),
        agent(24, E2eConfig::default()),
    );
    let bundle = b.bundle().clone();
    // Correctly signed contexts whose envelopes do not open leave nothing behind.
    for i in 0..10u128 {
        a.send.clear();
        let env = a.seal(&builder(&a, &b, i), &bundle, b"x", NOW).unwrap();
        let mut bytes = env.immutable.to_vec();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x80;
        let bad = redecode(bytes).unwrap();
        assert_eq!(b.open(&bad, NOW), Err(E2eError::Tampered));
    }
    assert!(b.recv.is_empty());
    // Fresh contexts that open: at most CONTEXTS_PER_SOURCE stay, the newest.
    let mut last = None;
    for i in 100..110u128 {
        a.send.clear();
        let env = a.seal(&builder(&a, &b, i), &bundle, b"y", NOW).unwrap();
        b.open(&env, NOW).unwrap();
        last = Some(a.send.values().next().unwrap().ctx_id);
    }
    assert_eq!(b.recv.len(), CONTEXTS_PER_SOURCE);
    assert!(b.recv.contains_key(&(a.me, last.unwrap())));
}

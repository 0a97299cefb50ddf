use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use bytes::Bytes;

use super::*;

fn identity() -> Ed25519KeyPair {
    let mut seed = [0u8; 32];
    SystemRandom::new().fill(&mut seed).unwrap();
    Ed25519KeyPair::from_seed_unchecked(&seed).unwrap()
}

fn id_of(k: &Ed25519KeyPair) -> AgentId {
    AgentId(k.public_key().as_ref().try_into().unwrap())
}

fn bundle(k: &Ed25519KeyPair, schemas: &[&str], expires_ms: u64) -> KeyBundle {
    let key = BundleKey::new([7; 32], Bytes::from(vec![9u8; 1184]), expires_ms);
    KeyBundle::sign(
        BundleParts {
            issued_ms: 1,
            expires_ms,
            aeads: aeads::KNOWN,
            keys: vec![key],
            capability: Capability {
                transports: 1,
                classes: 7,
                schemas: schemas.iter().map(|s| s.to_string()).collect(),
            },
        },
        k,
    )
    .unwrap()
}

#[test]
fn a_bundle_round_trips_and_a_flipped_bit_anywhere_fails() {
    let k = identity();
    let b = bundle(&k, &["market/proposal@2.1"], 10_000);
    let again = KeyBundle::decode(b.bytes().clone()).unwrap();
    assert_eq!(again, b);
    assert_eq!(again.agent, id_of(&k));
    assert!(again.speaks("market/proposal@2.1"));
    for i in 0..b.bytes().len() {
        let mut bytes = b.bytes().to_vec();
        bytes[i] ^= 0x10;
        assert!(
            KeyBundle::decode(Bytes::from(bytes)).is_err(),
            "flipped byte {i} accepted"
        );
    }
}

#[test]
fn a_bundle_signed_by_another_key_than_its_agent_id_is_refused() {
    let (k, other) = (identity(), identity());
    let b = bundle(&k, &[], 10_000);
    // Same content, the agent id swapped for another identity's: the signature is k's.
    let mut bytes = b.bytes().to_vec();
    bytes[1..33].copy_from_slice(other.public_key().as_ref());
    assert_eq!(
        KeyBundle::decode(Bytes::from(bytes.clone())),
        Err(BundleError::BadSignature)
    );
    let dir = AgentDirectory::new(1 << 20, 3600);
    assert_eq!(
        dir.publish(id_of(&other), Bytes::from(bytes), 0),
        Err(Reason::BadSignature)
    );
    // A valid bundle published by a session of another agent.
    assert_eq!(
        dir.publish(id_of(&other), b.bytes().clone(), 0),
        Err(Reason::InvalidBundle)
    );
    assert_eq!(dir.usage().0, 0);
}

#[test]
fn a_lookup_by_capability_returns_exactly_the_agents_that_published_it() {
    let dir = AgentDirectory::new(1 << 20, 3600);
    let mut speakers = Vec::new();
    for i in 0..20 {
        let k = identity();
        let schemas: &[&str] = if i % 3 == 0 {
            &["market/proposal@2.1", "chat@1"]
        } else {
            &["chat@1"]
        };
        dir.publish(id_of(&k), bundle(&k, schemas, 10_000).bytes().clone(), 0)
            .unwrap();
        if i % 3 == 0 {
            speakers.push(id_of(&k));
        }
    }
    speakers.sort();
    // Pages of 3: every speaker once, in id order, nobody else.
    let mut found = Vec::new();
    let mut after = AgentId([0; 32]);
    loop {
        let (page, more) = dir.by_schema("market/proposal@2.1", &after, 3, 1 << 20, 5);
        for b in &page {
            found.push(KeyBundle::decode(b.clone()).unwrap().agent);
        }
        if !more {
            break;
        }
        after = *found.last().unwrap();
    }
    assert_eq!(found, speakers);
    assert_eq!(
        dir.by_schema("nobody@1", &AgentId([0; 32]), 10, 1 << 20, 5)
            .0
            .len(),
        0
    );
    // Republishing without the schema takes the agent out of its index.
    let k = identity();
    dir.publish(id_of(&k), bundle(&k, &["x@1"], 10_000).bytes().clone(), 0)
        .unwrap();
    dir.publish(id_of(&k), bundle(&k, &["y@1"], 10_000).bytes().clone(), 0)
        .unwrap();
    assert!(dir
        .by_schema("x@1", &AgentId([0; 32]), 10, 1 << 20, 5)
        .0
        .is_empty());
    assert_eq!(
        dir.by_schema("y@1", &AgentId([0; 32]), 10, 1 << 20, 5)
            .0
            .len(),
        1
    );
}

#[test]
fn the_directory_keeps_to_its_byte_bound_and_forgets_expired_entries() {
    let one = bundle(&identity(), &["s@1"], 10_000).bytes().len();
    // Room for three entries.
    let dir = AgentDirectory::new(3 * (one + 512), 3600);
    let keys: Vec<_> = (0..4).map(|_| identity()).collect();
    for k in &keys[..3] {
        dir.publish(id_of(k), bundle(k, &["s@1"], 1_000).bytes().clone(), 0)
            .unwrap();
    }
    let fourth = bundle(&keys[3], &["s@1"], 10_000);
    assert_eq!(
        dir.publish(id_of(&keys[3]), fourth.bytes().clone(), 500),
        Err(Reason::DirectoryFull)
    );
    assert_eq!(dir.usage().0, 3);
    // Once the first three expired, their room is taken back.
    dir.publish(id_of(&keys[3]), fourth.bytes().clone(), 1_000)
        .unwrap();
    assert_eq!(dir.usage().0, 1);
    assert!(dir.by_agent(&id_of(&keys[0]), 1_000).is_none());
    assert!(dir.by_agent(&id_of(&keys[3]), 1_000).is_some());
    // Age cap: an entry lives at most max_age past its publication.
    let short = AgentDirectory::new(1 << 20, 2);
    short
        .publish(
            id_of(&keys[0]),
            bundle(&keys[0], &[], 100_000).bytes().clone(),
            0,
        )
        .unwrap();
    assert!(short.by_agent(&id_of(&keys[0]), 1_999).is_some());
    assert!(short.by_agent(&id_of(&keys[0]), 2_000).is_none());
}

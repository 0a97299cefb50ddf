//! The key bundle: an agent's end-to-end public keys and capability descriptor, signed by its
//! identity (PROTOCOL.md §6.1).

use aws_lc_rs::digest;
use aws_lc_rs::signature::{Ed25519KeyPair, UnparsedPublicKey, ED25519};
use bytes::{BufMut, Bytes, BytesMut};

use crate::wire::reader::Reader;
use crate::wire::{AgentId, WireError};

/// The bundle format this code writes and reads.
pub const BUNDLE_VERSION: u8 = 1;
/// Largest encoded bundle (it fits a PUBLISH frame at the smallest `max_frame`, 4096).
pub const MAX_BUNDLE: usize = 4000;
/// Most key-agreement keys one bundle lists (the current one and the one it replaced).
pub const MAX_BUNDLE_KEYS: usize = 2;
/// Most schema ids a capability descriptor lists.
pub const MAX_BUNDLE_SCHEMAS: usize = 32;
/// X25519 public key bytes.
pub const X25519_LEN: usize = 32;
/// ML-KEM-768 encapsulation key bytes.
pub const MLKEM768_EK_LEN: usize = 1184;
/// What the identity signs before the bundle's bytes.
pub const BUNDLE_SIGNING_LABEL: &[u8] = b"openmesh/bundle/1";
/// What a key id hashes before the two public keys.
pub const KEY_ID_LABEL: &[u8] = b"openmesh/e2e-key/1";

/// End-to-end AEADs a bundle can list (a bit each).
pub mod aeads {
    /// AES-256-GCM.
    pub const AES_256_GCM: u8 = 1 << 0;
    /// ChaCha20-Poly1305.
    pub const CHACHA20_POLY1305: u8 = 1 << 1;
    /// Every AEAD this version defines.
    pub const KNOWN: u8 = AES_256_GCM | CHACHA20_POLY1305;
}

/// Why a bundle was refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum BundleError {
    #[error("bundle malformed: {0}")]
    Malformed(#[from] WireError),
    #[error("bundle larger than {MAX_BUNDLE} bytes")]
    TooLarge,
    #[error("bundle signature does not verify against its agent id")]
    BadSignature,
}

/// One key-agreement key: X25519 and ML-KEM-768 public keys, used together (X-Wing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BundleKey {
    /// `SHA-256(KEY_ID_LABEL || x25519 || mlkem)[..8]`: how a sealed payload names it.
    pub id: [u8; 8],
    /// Senders stop sealing to it after this Unix millisecond (the owner rotates before).
    pub not_after_ms: u64,
    pub x25519: [u8; X25519_LEN],
    pub mlkem: Bytes,
}

impl BundleKey {
    /// A key entry, its id computed from the two public keys.
    pub fn new(x25519: [u8; X25519_LEN], mlkem: Bytes, not_after_ms: u64) -> Self {
        BundleKey {
            id: key_id(&x25519, &mlkem),
            not_after_ms,
            x25519,
            mlkem,
        }
    }
}

/// The id of a key pair's public halves.
pub fn key_id(x25519: &[u8], mlkem: &[u8]) -> [u8; 8] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(KEY_ID_LABEL);
    ctx.update(x25519);
    ctx.update(mlkem);
    let d = ctx.finish();
    let mut id = [0u8; 8];
    id.copy_from_slice(&d.as_ref()[..8]);
    id
}

/// What an agent says it can do: schemas it speaks, transports, delivery classes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capability {
    /// Bits as in HELLO: bit 0 TCP+TLS, bit 1 QUIC.
    pub transports: u8,
    /// Bits as in HELLO: best-effort, at-least-once, durable.
    pub classes: u8,
    /// Schema ids such as `market/proposal@2.1`.
    pub schemas: Vec<String>,
}

/// The signed, decoded bundle. Its bytes are kept as signed, so the relay stores and serves
/// exactly what the agent published.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyBundle {
    bytes: Bytes,
    pub agent: AgentId,
    pub issued_ms: u64,
    /// Nobody should use the bundle after this (lookups stop returning it, caches drop it).
    pub expires_ms: u64,
    /// Bits of [`aeads`].
    pub aeads: u8,
    /// Newest first: senders seal to the first key whose `not_after_ms` has not passed.
    pub keys: Vec<BundleKey>,
    pub capability: Capability,
}

/// The parts an owner signs into a bundle.
#[derive(Clone, Debug)]
pub struct BundleParts {
    pub issued_ms: u64,
    pub expires_ms: u64,
    pub aeads: u8,
    pub keys: Vec<BundleKey>,
    pub capability: Capability,
}

impl KeyBundle {
    /// Encodes and signs a bundle with the owner's Ed25519 identity key.
    pub fn sign(parts: BundleParts, identity: &Ed25519KeyPair) -> Result<Self, BundleError> {
        use aws_lc_rs::signature::KeyPair;
        let mut agent = [0u8; 32];
        agent.copy_from_slice(identity.public_key().as_ref());
        if parts.keys.is_empty() || parts.keys.len() > MAX_BUNDLE_KEYS {
            return Err(WireError::Invalid("bundle key count").into());
        }
        if parts.capability.schemas.len() > MAX_BUNDLE_SCHEMAS
            || parts.capability.schemas.iter().any(|s| s.len() > 255)
        {
            return Err(WireError::Invalid("bundle schemas").into());
        }
        let mut b = BytesMut::with_capacity(MAX_BUNDLE);
        b.put_u8(BUNDLE_VERSION);
        b.put_slice(&agent);
        b.put_u64(parts.issued_ms);
        b.put_u64(parts.expires_ms);
        b.put_u8(parts.aeads & aeads::KNOWN);
        b.put_u8(parts.keys.len() as u8);
        for k in &parts.keys {
            if k.mlkem.len() != MLKEM768_EK_LEN {
                return Err(WireError::Invalid("ML-KEM-768 key length").into());
            }
            b.put_slice(&k.id);
            b.put_u64(k.not_after_ms);
            b.put_slice(&k.x25519);
            b.put_slice(&k.mlkem);
        }
        b.put_u8(parts.capability.transports);
        b.put_u8(parts.capability.classes);
        b.put_u8(parts.capability.schemas.len() as u8);
        for s in &parts.capability.schemas {
            b.put_u8(s.len() as u8);
            b.put_slice(s.as_bytes());
        }
        if b.len() + 64 > MAX_BUNDLE {
            return Err(BundleError::TooLarge);
        }
        let sig = identity.sign(&signed_message(&b));
        b.put_slice(sig.as_ref());
        Self::decode(b.freeze())
    }

    /// Decodes a bundle and verifies it: every field in range (issued before it expires, keys
    /// newest first and none valid past the bundle), every key id matching its keys, and the
    /// signature made by the agent id it names. The bundle keeps a copy of its bytes, never
    /// the larger buffer they may have been read into.
    pub fn decode(bytes: Bytes) -> Result<Self, BundleError> {
        if bytes.len() > MAX_BUNDLE {
            return Err(BundleError::TooLarge);
        }
        let bytes = Bytes::copy_from_slice(&bytes);
        if bytes.len() < 64 {
            return Err(WireError::Truncated("bundle").into());
        }
        let (body, sig) = bytes.split_at(bytes.len() - 64);
        let mut r = Reader::new(body);
        if r.u8("bundle version")? != BUNDLE_VERSION {
            return Err(WireError::Invalid("bundle version").into());
        }
        let agent = AgentId(r.array("agent id")?);
        let issued_ms = r.u64("issued")?;
        let expires_ms = r.u64("expires")?;
        let aeads = r.u8("aeads")?;
        if aeads & aeads::KNOWN == 0 {
            return Err(WireError::Invalid("no known AEAD").into());
        }
        let n = r.u8("key count")? as usize;
        if n == 0 || n > MAX_BUNDLE_KEYS {
            return Err(WireError::Invalid("bundle key count").into());
        }
        let mut keys = Vec::with_capacity(n);
        for _ in 0..n {
            let id: [u8; 8] = r.array("key id")?;
            let not_after_ms = r.u64("key not after")?;
            let x25519: [u8; X25519_LEN] = r.array("X25519 key")?;
            let start = r.pos();
            r.take(MLKEM768_EK_LEN, "ML-KEM-768 key")?;
            let mlkem = bytes.slice(start..start + MLKEM768_EK_LEN);
            if key_id(&x25519, &mlkem) != id {
                return Err(WireError::Invalid("key id").into());
            }
            keys.push(BundleKey {
                id,
                not_after_ms,
                x25519,
                mlkem,
            });
        }
        if issued_ms > expires_ms
            || keys.iter().any(|k| k.not_after_ms > expires_ms)
            || keys
                .windows(2)
                .any(|w| w[0].not_after_ms < w[1].not_after_ms)
        {
            return Err(WireError::Invalid("bundle validity").into());
        }
        let transports = r.u8("transports")?;
        let classes = r.u8("classes")?;
        let ns = r.u8("schema count")? as usize;
        if ns > MAX_BUNDLE_SCHEMAS {
            return Err(WireError::Invalid("schema count").into());
        }
        let mut schemas = Vec::with_capacity(ns);
        for _ in 0..ns {
            schemas.push(r.short_str("schema")?.to_string());
        }
        r.finish()?;
        UnparsedPublicKey::new(&ED25519, &agent.0)
            .verify(&signed_message(body), sig)
            .map_err(|_| BundleError::BadSignature)?;
        Ok(KeyBundle {
            agent,
            issued_ms,
            expires_ms,
            aeads,
            keys,
            capability: Capability {
                transports,
                classes,
                schemas,
            },
            bytes,
        })
    }

    /// The bundle as signed.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// The key a sender seals to at `now_ms`: the newest not past its `not_after_ms`.
    pub fn current_key(&self, now_ms: u64) -> Option<&BundleKey> {
        self.keys.iter().find(|k| now_ms < k.not_after_ms)
    }

    /// Whether the descriptor lists `schema`.
    pub fn speaks(&self, schema: &str) -> bool {
        self.capability.schemas.iter().any(|s| s == schema)
    }
}

fn signed_message(body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(BUNDLE_SIGNING_LABEL.len() + body.len());
    m.extend_from_slice(BUNDLE_SIGNING_LABEL);
    m.extend_from_slice(body);
    m
}

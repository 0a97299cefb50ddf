//! The construction's primitives (PROTOCOL.md §6.2): the X-Wing hybrid KEM (ML-KEM-768 and
//! X25519 with X-Wing's SHA3-256 combiner), the RFC 9180 (HPKE) key schedule in base mode with
//! HKDF-SHA256, and the AEAD.

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::agreement::{self, UnparsedPublicKey, X25519};
use aws_lc_rs::digest;
use aws_lc_rs::hkdf::{self, KeyType, HKDF_SHA256};
use aws_lc_rs::hmac;
use aws_lc_rs::kem::{self, DecapsulationKey, EncapsulationKey, ML_KEM_768};

use super::E2eError;

/// ML-KEM-768 ciphertext bytes.
pub const MLKEM_CT_LEN: usize = 1088;
/// X25519 public key (and ciphertext) bytes.
pub const X25519_LEN: usize = 32;
/// The encapsulation: ML-KEM ciphertext then the ephemeral X25519 public key (X-Wing's order).
pub const ENC_LEN: usize = MLKEM_CT_LEN + X25519_LEN;
/// X-Wing's combiner label, `\.//^\`.
pub const XWING_LABEL: &[u8] = b"\\.//^\\";
/// HPKE KEM id assigned to X-Wing.
pub const KEM_ID: u16 = 0x647a;
/// HPKE KDF id of HKDF-SHA256.
pub const KDF_ID: u16 = 0x0001;
/// AEAD key bytes (both AEADs).
pub const KEY_LEN: usize = 32;
/// AEAD nonce bytes.
pub const NONCE_LEN: usize = 12;
/// AEAD tag bytes.
pub const TAG_LEN: usize = 16;

/// The AEADs, with their HPKE ids (also their code in a sealed payload).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Aead {
    /// AES-256-GCM (HPKE id 0x0002).
    Aes256Gcm = 0x0002,
    /// ChaCha20-Poly1305 (HPKE id 0x0003).
    ChaCha20Poly1305 = 0x0003,
}

impl Aead {
    /// The AEAD of an HPKE id.
    pub fn from_u16(v: u16) -> Option<Self> {
        match v {
            0x0002 => Some(Aead::Aes256Gcm),
            0x0003 => Some(Aead::ChaCha20Poly1305),
            _ => None,
        }
    }

    /// Its bit in a bundle's `aeads`.
    pub fn bit(self) -> u8 {
        use openmesh_dataplane::directory::aeads;
        match self {
            Aead::Aes256Gcm => aeads::AES_256_GCM,
            Aead::ChaCha20Poly1305 => aeads::CHACHA20_POLY1305,
        }
    }

    /// The first of ours (in preference order: AES-256-GCM, then ChaCha20-Poly1305) that the
    /// peer lists too.
    pub fn choose(ours: u8, theirs: u8) -> Option<Self> {
        [Aead::Aes256Gcm, Aead::ChaCha20Poly1305]
            .into_iter()
            .find(|a| ours & theirs & a.bit() != 0)
    }

    fn algorithm(self) -> &'static aead::Algorithm {
        match self {
            Aead::Aes256Gcm => &aead::AES_256_GCM,
            Aead::ChaCha20Poly1305 => &aead::CHACHA20_POLY1305,
        }
    }
}

/// A recipient's private key-agreement key: X25519 and ML-KEM-768.
pub struct PrivateKeys {
    pub x25519: agreement::PrivateKey,
    pub x25519_public: [u8; X25519_LEN],
    pub mlkem: DecapsulationKey<kem::AlgorithmId>,
    pub mlkem_public: Vec<u8>,
}

impl PrivateKeys {
    /// Fresh keys.
    pub fn generate() -> Result<Self, E2eError> {
        let x25519 = agreement::PrivateKey::generate(&X25519).map_err(|_| E2eError::Crypto)?;
        let mlkem = DecapsulationKey::generate(&ML_KEM_768).map_err(|_| E2eError::Crypto)?;
        Self::from_parts(x25519, mlkem, None)
    }

    fn from_parts(
        x25519: agreement::PrivateKey,
        mlkem: DecapsulationKey<kem::AlgorithmId>,
        mlkem_public: Option<Vec<u8>>,
    ) -> Result<Self, E2eError> {
        let xp = x25519.compute_public_key().map_err(|_| E2eError::Crypto)?;
        let mut x25519_public = [0u8; X25519_LEN];
        x25519_public.copy_from_slice(xp.as_ref());
        let mlkem_public = match mlkem_public {
            Some(p) => p,
            None => mlkem
                .encapsulation_key()
                .and_then(|k| k.key_bytes())
                .map_err(|_| E2eError::Crypto)?
                .as_ref()
                .to_vec(),
        };
        Ok(PrivateKeys {
            x25519,
            x25519_public,
            mlkem,
            mlkem_public,
        })
    }

    /// X-Wing decapsulation.
    pub fn decapsulate(&self, enc: &[u8]) -> Result<[u8; 32], E2eError> {
        if enc.len() != ENC_LEN {
            return Err(E2eError::Malformed("encapsulation"));
        }
        let (ct_m, ct_x) = enc.split_at(MLKEM_CT_LEN);
        let ss_m = self
            .mlkem
            .decapsulate(kem::Ciphertext::from(ct_m))
            .map_err(|_| E2eError::Tampered)?;
        let ss_x = agreement::agree(
            &self.x25519,
            UnparsedPublicKey::new(&X25519, ct_x),
            E2eError::Tampered,
            |k| {
                let mut out = [0u8; 32];
                out.copy_from_slice(k);
                Ok(out)
            },
        )?;
        Ok(combine(ss_m.as_ref(), &ss_x, ct_x, &self.x25519_public))
    }
}

/// X-Wing encapsulation to `(x25519, mlkem)`: the shared secret and `enc`.
pub fn encapsulate(x25519: &[u8], mlkem: &[u8]) -> Result<([u8; 32], Vec<u8>), E2eError> {
    let ek = EncapsulationKey::new(&ML_KEM_768, mlkem).map_err(|_| E2eError::Malformed("key"))?;
    let (ct_m, ss_m) = ek.encapsulate().map_err(|_| E2eError::Crypto)?;
    let eph = agreement::PrivateKey::generate(&X25519).map_err(|_| E2eError::Crypto)?;
    let ct_x = eph.compute_public_key().map_err(|_| E2eError::Crypto)?;
    let ss_x = agreement::agree(
        &eph,
        UnparsedPublicKey::new(&X25519, x25519),
        E2eError::Malformed("X25519 key"),
        |k| {
            let mut out = [0u8; 32];
            out.copy_from_slice(k);
            Ok(out)
        },
    )?;
    let mut enc = Vec::with_capacity(ENC_LEN);
    enc.extend_from_slice(ct_m.as_ref());
    enc.extend_from_slice(ct_x.as_ref());
    Ok((combine(ss_m.as_ref(), &ss_x, ct_x.as_ref(), x25519), enc))
}

/// X-Wing's combiner: `SHA3-256(ss_M || ss_X || ct_X || pk_X || XWingLabel)`.
pub fn combine(ss_m: &[u8], ss_x: &[u8], ct_x: &[u8], pk_x: &[u8]) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA3_256);
    for part in [ss_m, ss_x, ct_x, pk_x, XWING_LABEL] {
        ctx.update(part);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

struct Len(usize);

impl KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// RFC 9180 §5.1 in base mode: the AEAD key and base nonce from the KEM's shared secret and
/// `info`, for X-Wing, HKDF-SHA256 and `aead`.
pub fn key_schedule(
    aead: Aead,
    shared_secret: &[u8],
    info: &[u8],
) -> Result<([u8; KEY_LEN], [u8; NONCE_LEN]), E2eError> {
    let mut key = [0u8; KEY_LEN];
    let nonce = hpke_base_schedule(KEM_ID, aead as u16, shared_secret, info, &mut key)?;
    Ok((key, nonce))
}

/// RFC 9180's KeySchedule in mode_base with HKDF-SHA256 for the suite `(kem_id, KDF_ID,
/// aead_id)`: fills `key` (`Nk` = its length) and returns the base nonce.
pub fn hpke_base_schedule(
    kem_id: u16,
    aead_id: u16,
    shared_secret: &[u8],
    info: &[u8],
    key: &mut [u8],
) -> Result<[u8; NONCE_LEN], E2eError> {
    let mut suite = [0u8; 10];
    suite[..4].copy_from_slice(b"HPKE");
    suite[4..6].copy_from_slice(&kem_id.to_be_bytes());
    suite[6..8].copy_from_slice(&KDF_ID.to_be_bytes());
    suite[8..10].copy_from_slice(&aead_id.to_be_bytes());
    // LabeledExtract: HKDF-Extract is HMAC-SHA256 keyed by the salt (an empty salt and 32 zero
    // bytes are the same HMAC key, RFC 5869 §2.2).
    let labeled_extract = |salt: &[u8], label: &[u8], ikm: &[u8]| -> [u8; 32] {
        let k = hmac::Key::new(hmac::HMAC_SHA256, salt);
        let mut ctx = hmac::Context::with_key(&k);
        for part in [&b"HPKE-v1"[..], &suite, label, ikm] {
            ctx.update(part);
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.sign().as_ref());
        out
    };
    let psk_id_hash = labeled_extract(b"", b"psk_id_hash", b"");
    let info_hash = labeled_extract(b"", b"info_hash", info);
    let mut context = Vec::with_capacity(1 + 64);
    context.push(0u8); // mode_base
    context.extend_from_slice(&psk_id_hash);
    context.extend_from_slice(&info_hash);
    let secret = labeled_extract(shared_secret, b"secret", b"");
    let prk = hkdf::Prk::new_less_safe(HKDF_SHA256, &secret);
    let expand = |label: &[u8], out: &mut [u8]| -> Result<(), E2eError> {
        let l = (out.len() as u16).to_be_bytes();
        let info: [&[u8]; 5] = [&l, b"HPKE-v1", &suite, label, &context];
        prk.expand(&info, Len(out.len()))
            .and_then(|okm| okm.fill(out))
            .map_err(|_| E2eError::Crypto)
    };
    let mut nonce = [0u8; NONCE_LEN];
    expand(b"key", key)?;
    expand(b"base_nonce", &mut nonce)?;
    Ok(nonce)
}

/// An AEAD key with its HPKE base nonce.
pub struct SealKey {
    key: LessSafeKey,
    base_nonce: [u8; NONCE_LEN],
}

impl SealKey {
    pub fn new(
        aead: Aead,
        key: &[u8; KEY_LEN],
        base_nonce: [u8; NONCE_LEN],
    ) -> Result<Self, E2eError> {
        let k = UnboundKey::new(aead.algorithm(), key).map_err(|_| E2eError::Crypto)?;
        Ok(SealKey {
            key: LessSafeKey::new(k),
            base_nonce,
        })
    }

    /// RFC 9180's ComputeNonce: the base nonce XOR the sequence number.
    fn nonce(&self, seq: u64) -> Nonce {
        let mut n = self.base_nonce;
        for (b, s) in n[NONCE_LEN - 8..].iter_mut().zip(seq.to_be_bytes()) {
            *b ^= s;
        }
        Nonce::assume_unique_for_key(n)
    }

    /// Seals `in_out` in place; writes the tag into `tag`.
    pub fn seal(
        &self,
        seq: u64,
        aad: &[u8],
        in_out: &mut [u8],
        tag: &mut [u8],
    ) -> Result<(), E2eError> {
        let t = self
            .key
            .seal_in_place_separate_tag(self.nonce(seq), Aad::from(aad), in_out)
            .map_err(|_| E2eError::Crypto)?;
        tag.copy_from_slice(t.as_ref());
        Ok(())
    }

    /// Opens ciphertext-and-tag in place; returns the plaintext's length.
    pub fn open(&self, seq: u64, aad: &[u8], in_out: &mut [u8]) -> Result<usize, E2eError> {
        self.key
            .open_in_place(self.nonce(seq), Aad::from(aad), in_out)
            .map(|p| p.len())
            .map_err(|_| E2eError::Tampered)
    }
}

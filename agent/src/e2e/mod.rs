//! End-to-end encryption and authentication of payloads (PROTOCOL.md §6).
//!
//! Each agent holds, besides its Ed25519 identity, a key-agreement key pair (X25519 and
//! ML-KEM-768) that it rotates, and publishes the public halves in a [`KeyBundle`] signed by its
//! identity. A sender opens one *context* per (recipient key, rotation interval): an X-Wing
//! encapsulation to the recipient's key, signed by the sender's identity, and the HPKE key
//! schedule over its shared secret. Every envelope is then one AEAD seal under the context's
//! key, with the envelope's immutable header as associated data. The context rides in the
//! envelopes until a delivery receipt shows the recipient holds it.
//!
//! [`Agent::seal`](crate::Agent::seal) and [`Agent::open`](crate::Agent::open) are the entry
//! points; this module holds the state behind them.

mod replay;
pub(crate) mod suite;

use std::collections::VecDeque;
use std::time::Duration;

use aws_lc_rs::digest;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use bytes::Bytes;
use openmesh_dataplane::directory::{BundleKey, BundleParts, Capability, KeyBundle};
use openmesh_dataplane::wire::{
    flags, AgentId, Destination, Envelope, EnvelopeBuilder, MessageId, WireError,
};

use crate::Map;
pub use suite::Aead;
use suite::{PrivateKeys, SealKey, ENC_LEN, TAG_LEN};

/// The sealed payload format this code writes and reads.
pub const SEALED_VERSION: u8 = 1;
/// Bytes of a sealed payload's fixed header.
pub const SEALED_HEADER_LEN: usize = 1 + 2 + 1 + 8 + 16 + 8;
/// Bytes the context adds when it rides in an envelope (encapsulation and signature).
pub const CONTEXT_LEN: usize = ENC_LEN + 64;
/// What the sender's identity signs before a context.
pub const CONTEXT_LABEL: &[u8] = b"openmesh/e2e-context/1";
/// What the sender's identity signs before an envelope (when it signs each one).
pub const ENVELOPE_LABEL: &[u8] = b"openmesh/e2e-envelope/1";
/// What the key schedule's `info` starts with.
pub const INFO_LABEL: &[u8] = b"openmesh/e2e/1";
/// Sealed payload flag: the context (encapsulation and its signature) follows the header.
pub const CARRIES_CONTEXT: u8 = 1 << 0;
/// Sealed payload flag: an Ed25519 signature of the whole envelope ends the payload.
pub const SIGNED: u8 = 1 << 1;

/// Why an envelope could not be sealed or opened. Every rejection is counted in
/// [`E2eStats`].
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum E2eError {
    /// The envelope's flags do not say its payload is sealed.
    #[error("payload is not sealed end to end")]
    NotSealed,
    /// The sealed payload does not parse.
    #[error("sealed payload malformed: {0}")]
    Malformed(&'static str),
    /// The envelope is not for this agent.
    #[error("envelope addressed to another agent")]
    WrongRecipient,
    /// The envelope's expiry has passed.
    #[error("envelope expired")]
    Expired,
    /// Sealed to a key this agent no longer holds (rotated out past its overlap) or never had.
    #[error("sealed to a stale or unknown key")]
    StaleKey,
    /// It names a context this agent does not hold and does not carry it.
    #[error("unknown context")]
    UnknownContext,
    /// The sender's signature (of the context or of the envelope) does not verify.
    #[error("bad signature")]
    BadSignature,
    /// The AEAD refused it: payload, header or context altered.
    #[error("payload or header altered")]
    Tampered,
    /// This (source, message id) was opened before, or is older than the replay window.
    #[error("replayed envelope")]
    Replay,
    /// The recipient's bundle lists no AEAD this agent offers, or no key valid now.
    #[error("recipient's bundle has no usable key or AEAD")]
    NoUsableKey,
    /// No bundle for the recipient (not published, or the lookup failed).
    #[error("no key bundle for the recipient")]
    NoBundle,
    /// The envelope does not fit the wire's limits.
    #[error("envelope: {0}")]
    Envelope(#[from] WireError),
    /// The cryptographic library failed (not the peer's doing).
    #[error("cryptographic failure")]
    Crypto,
}

impl E2eError {
    fn index(&self) -> usize {
        use E2eError::*;
        match self {
            NotSealed => 0,
            Malformed(_) => 1,
            WrongRecipient => 2,
            Expired => 3,
            StaleKey => 4,
            UnknownContext => 5,
            BadSignature => 6,
            Tampered => 7,
            Replay => 8,
            NoUsableKey | NoBundle | Envelope(_) | Crypto => 9,
        }
    }
}

/// End-to-end settings of an agent ([`ClientConfig::e2e`](crate::ClientConfig::e2e)).
#[derive(Clone, Debug)]
pub struct E2eConfig {
    /// How often the key-agreement key and the sending contexts rotate. `None`: the session
    /// contract's `key_rotation_s` (an hour when the relay says 0).
    pub rotation: Option<Duration>,
    /// AEADs offered (bits of `openmesh_dataplane::directory::aeads`); the sender picks the
    /// first of AES-256-GCM, ChaCha20-Poly1305 that both bundles list.
    pub aeads: u8,
    /// Sign every envelope with the identity key as well (non-repudiation: the recipient can
    /// show a third party who sent it). Without it the context's signature and the AEAD
    /// authenticate the sender to the recipient only. Costs a signature per envelope.
    pub sign_each: bool,
    /// Most sending and receiving contexts kept (each about 1.4 KB).
    pub max_contexts: usize,
    /// Most (source, message id) pairs remembered against replays (each about 60 bytes);
    /// beyond it the oldest go and envelopes expiring before them are refused as replays.
    pub replay_window: usize,
    /// How long a looked-up bundle is used before it is looked up again (never past its
    /// own expiry).
    pub bundle_cache: Duration,
    /// Stop carrying a context in envelopes once a delivery receipt came back for one that
    /// carried it (saves 1,184 bytes per envelope). Off by default: a receipt says the
    /// recipient received an envelope, not that it kept the context (a recipient that lost
    /// it, or refused the first envelope, cannot open the rest until the context renews).
    pub context_until_receipt: bool,
}

impl Default for E2eConfig {
    fn default() -> Self {
        E2eConfig {
            rotation: None,
            aeads: openmesh_dataplane::directory::aeads::KNOWN,
            sign_each: false,
            max_contexts: 4096,
            replay_window: 1 << 18,
            bundle_cache: Duration::from_secs(300),
            context_until_receipt: false,
        }
    }
}

/// An opened envelope's payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opened {
    /// The sender, authenticated (its signature on the context verified).
    pub source: AgentId,
    /// The envelope's message id.
    pub message_id: MessageId,
    /// The envelope's schema id.
    pub schema: String,
    /// The opened payload.
    pub plaintext: Vec<u8>,
    /// The sender signed this envelope itself ([`E2eConfig::sign_each`]).
    pub signed: bool,
}

/// Counters of the end-to-end layer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct E2eStats {
    /// Envelopes sealed.
    pub sealed: u64,
    /// Envelopes opened.
    pub opened: u64,
    /// Contexts opened towards recipients (one X-Wing encapsulation and signature each).
    pub contexts_sent: u64,
    /// Contexts accepted from senders (one signature check and decapsulation each).
    pub contexts_received: u64,
    /// Rejections by [`E2eError`] kind: not sealed, malformed, wrong recipient, expired, stale
    /// key, unknown context, bad signature, tampered, replay, other.
    pub rejected: [u64; 10],
    /// Key rotations of this agent's own key-agreement key.
    pub rotations: u64,
}

impl E2eStats {
    /// Rejections of one kind.
    pub fn rejected(&self, e: E2eError) -> u64 {
        self.rejected[e.index()]
    }
}

/// One of this agent's key-agreement keys.
struct OwnKey {
    id: [u8; 8],
    keys: PrivateKeys,
    /// Senders stop using it after this.
    not_after_ms: u64,
    /// Dropped after this (its overlap: envelopes sealed just before `not_after_ms` may live
    /// up to the relay's longest TTL).
    retire_ms: u64,
}

/// A context towards one recipient key.
struct SendCtx {
    ctx_id: [u8; 16],
    /// Encapsulation then the context signature.
    carried: Box<[u8]>,
    aead: Aead,
    key: SealKey,
    seq: u64,
    renew_ms: u64,
    /// A delivery receipt showed the recipient holds it: envelopes stop carrying it.
    confirmed: bool,
}

/// A context received from a sender.
struct RecvCtx {
    carried: Box<[u8]>,
    key_id: [u8; 8],
    aead: Aead,
    key: SealKey,
    /// When the key it was sealed to retires.
    retire_ms: u64,
    /// Order kept, for the per-sender bound.
    kept: u64,
}

/// Contexts kept per sender: its current one and the ones before it still in flight.
pub const CONTEXTS_PER_SOURCE: usize = 4;

/// An agent's end-to-end state: its key-agreement keys and bundle, sending and receiving
/// contexts, the replay window. [`Agent`](crate::Agent) holds one (from
/// [`ClientConfig::e2e`](crate::ClientConfig::e2e)); applications that carry envelopes some
/// other way can use it directly.
///
/// ```
/// use openmesh_agent::e2e::{E2e, E2eConfig};
/// use openmesh_dataplane::directory::Capability;
/// use openmesh_dataplane::pki::Identity;
/// use openmesh_dataplane::wire::{Destination, EnvelopeBuilder, MessageId};
///
/// let now = 1_800_000_000_000;
/// let alice_id = Identity::generate_self_signed("alice").unwrap();
/// let bob_id = Identity::generate_self_signed("bob").unwrap();
/// let mut alice = E2e::new(E2eConfig::default(), alice_id.signing_key().unwrap(), Capability::default(), 3600, 60_000, now).unwrap();
/// let mut bob = E2e::new(E2eConfig::default(), bob_id.signing_key().unwrap(), Capability::default(), 3600, 60_000, now).unwrap();
/// let b = EnvelopeBuilder::new(MessageId::from_u128(1), alice_id.agent_id(), Destination::Agent(bob_id.agent_id()), now, 60_000);
/// let env = alice.seal(&b, bob.bundle(), b"hi", now).unwrap();
/// assert_eq!(bob.open(&env, now).unwrap().plaintext, b"hi");
/// ```
pub struct E2e {
    cfg: E2eConfig,
    me: AgentId,
    signer: Ed25519KeyPair,
    capability: Capability,
    /// Newest first.
    own: VecDeque<OwnKey>,
    rotation_ms: u64,
    overlap_ms: u64,
    bundle: KeyBundle,
    send: Map<(AgentId, [u8; 8]), SendCtx>,
    recv: Map<(AgentId, [u8; 16]), RecvCtx>,
    recv_clock: u64,
    /// Message ids sent carrying a context, waiting for their delivery receipt.
    confirming: Map<MessageId, (AgentId, [u8; 8], [u8; 16], u64)>,
    peers: Map<AgentId, (KeyBundle, u64)>,
    replay: replay::Window,
    stats: E2eStats,
    scratch: Vec<u8>,
}

/// Most key-agreement keys an agent keeps (newest first; about 3.3 KB each).
pub const MAX_OWN_KEYS: usize = 1024;
/// Most envelopes waiting for the receipt that confirms their context.
const MAX_CONFIRMING: usize = 4096;
/// Most peers' bundles cached.
const MAX_PEERS: usize = 4096;

impl E2e {
    /// State for the identity `signer`, describing itself with `capability`, with a first
    /// key-agreement key. `rotation_s` and `max_ttl_ms` are the session contract's (the
    /// rotation interval when `cfg.rotation` is unset; how long an envelope may live, which
    /// sets how long a rotated key is kept).
    pub fn new(
        cfg: E2eConfig,
        signer: Ed25519KeyPair,
        capability: Capability,
        rotation_s: u32,
        max_ttl_ms: u64,
        now_ms: u64,
    ) -> Result<Self, E2eError> {
        let rotation_ms = cfg
            .rotation
            .map(|d| d.as_millis() as u64)
            .unwrap_or(if rotation_s == 0 {
                3_600_000
            } else {
                rotation_s as u64 * 1000
            })
            .max(1);
        let me = AgentId(
            signer
                .public_key()
                .as_ref()
                .try_into()
                .map_err(|_| E2eError::Crypto)?,
        );
        let mut own = VecDeque::new();
        own.push_front(new_key(now_ms, rotation_ms, 0)?);
        let bundle = sign_bundle(&own, &cfg, &capability, &signer, now_ms)?;
        let mut e = E2e {
            replay: replay::Window::new(cfg.replay_window),
            cfg,
            me,
            signer,
            capability,
            own,
            rotation_ms,
            // In flight for at most the longest TTL after the last seal, plus the senders'
            // bundle cache (they may seal to the key until they look again).
            overlap_ms: max_ttl_ms.max(60_000),
            bundle,
            send: Map::default(),
            recv: Map::default(),
            recv_clock: 0,
            confirming: Map::default(),
            peers: Map::default(),
            stats: E2eStats::default(),
            scratch: Vec::new(),
        };
        let retire = e.overlap_ms + e.cfg.bundle_cache.as_millis() as u64;
        if let Some(k) = e.own.front_mut() {
            k.retire_ms = k.not_after_ms + retire;
        }
        Ok(e)
    }

    /// The counters.
    pub fn stats(&self) -> E2eStats {
        self.stats
    }

    /// This agent's signed bundle.
    pub fn bundle(&self) -> &KeyBundle {
        &self.bundle
    }

    /// When the next rotation is due (Unix ms).
    pub fn rotation_due_ms(&self) -> u64 {
        self.own
            .front()
            .map_or(0, |k| k.not_after_ms - self.rotation_ms / 4)
    }

    /// A new key-agreement key: it goes first in a newly signed bundle, the previous one stays
    /// listed (and held) through its overlap.
    pub fn rotate(&mut self, now_ms: u64) -> Result<(), E2eError> {
        let retire = self.overlap_ms + self.cfg.bundle_cache.as_millis() as u64;
        self.own
            .push_front(new_key(now_ms, self.rotation_ms, retire)?);
        // Kept through their overlap (a rotation every 5 minutes and a day's TTL keep about
        // 300 keys, 3.3 KB each); never more than MAX_OWN_KEYS.
        self.own.retain(|k| k.retire_ms > now_ms);
        self.own.truncate(MAX_OWN_KEYS);
        self.bundle = sign_bundle(&self.own, &self.cfg, &self.capability, &self.signer, now_ms)?;
        self.stats.rotations += 1;
        Ok(())
    }

    /// Caches a verified peer bundle until `until_ms` (and never past its expiry).
    pub(crate) fn remember(&mut self, b: KeyBundle, now_ms: u64) {
        if self.peers.len() >= MAX_PEERS {
            self.peers.retain(|_, (_, until)| *until > now_ms);
            if self.peers.len() >= MAX_PEERS {
                self.peers.clear();
            }
        }
        let until = b
            .expires_ms
            .min(now_ms + self.cfg.bundle_cache.as_millis() as u64);
        self.peers.insert(b.agent, (b, until));
    }

    /// The cached bundle of `peer`, if still fresh.
    pub(crate) fn cached(&self, peer: &AgentId, now_ms: u64) -> Option<&KeyBundle> {
        self.peers
            .get(peer)
            .filter(|(_, until)| *until > now_ms)
            .map(|(b, _)| b)
    }

    /// Seals `plaintext` to `to` (its bundle) into an envelope built by `b`: sets the sealed
    /// flag (and, with [`E2eConfig::context_until_receipt`], the delivery-receipt flag while
    /// the context is unconfirmed).
    pub fn seal(
        &mut self,
        b: &EnvelopeBuilder,
        to: &KeyBundle,
        plaintext: &[u8],
        now_ms: u64,
    ) -> Result<Envelope, E2eError> {
        if b.destination != Destination::Agent(to.agent) {
            return Err(E2eError::WrongRecipient);
        }
        let key = to.current_key(now_ms).ok_or(E2eError::NoUsableKey)?;
        let aead = Aead::choose(self.cfg.aeads, to.aeads).ok_or(E2eError::NoUsableKey)?;
        let slot = (to.agent, key.id);
        let fresh = match self.send.get(&slot) {
            Some(c) => c.renew_ms <= now_ms || c.aead != aead || c.seq == u64::MAX,
            None => true,
        };
        if fresh {
            let ctx = self.open_context(to.agent, key, aead, now_ms)?;
            if self.send.len() >= self.cfg.max_contexts {
                self.send.retain(|_, c| c.renew_ms > now_ms);
                if self.send.len() >= self.cfg.max_contexts {
                    self.send.clear();
                }
            }
            self.send.insert(slot, ctx);
            self.stats.contexts_sent += 1;
        }
        let sign_each = self.cfg.sign_each;
        let ctx = self.send.get_mut(&slot).ok_or(E2eError::Crypto)?;
        let seq = ctx.seq;
        ctx.seq += 1;
        let carry = !ctx.confirmed;
        let until_receipt = self.cfg.context_until_receipt;
        let mut flags_ = 0u8;
        if carry {
            flags_ |= CARRIES_CONTEXT;
        }
        if sign_each {
            flags_ |= SIGNED;
        }
        let mut builder = b.clone();
        builder.flags |= flags::SEALED;
        if carry && until_receipt && self.confirming.len() >= MAX_CONFIRMING {
            // Receipts that will not come (lost, or the envelope expired undelivered).
            self.confirming.retain(|_, c| c.3 > now_ms);
        }
        if carry && until_receipt && self.confirming.len() < MAX_CONFIRMING {
            builder.flags |= flags::RECEIPT_DELIVERED;
            self.confirming
                .insert(b.message_id, (to.agent, key.id, ctx.ctx_id, b.expires_ms));
        }
        let len = SEALED_HEADER_LEN
            + if carry { CONTEXT_LEN } else { 0 }
            + plaintext.len()
            + TAG_LEN
            + if sign_each { 64 } else { 0 };
        let scratch = &mut self.scratch;
        let signer = &self.signer;
        let env = builder.build_with(len, |ad: &[u8], out: &mut [u8]| {
            let (head, rest) = out.split_at_mut(SEALED_HEADER_LEN);
            head[0] = SEALED_VERSION;
            head[1..3].copy_from_slice(&(ctx.aead as u16).to_be_bytes());
            head[3] = flags_;
            head[4..12].copy_from_slice(&key.id);
            head[12..28].copy_from_slice(&ctx.ctx_id);
            head[28..36].copy_from_slice(&seq.to_be_bytes());
            let rest = if carry {
                let (c, r) = rest.split_at_mut(CONTEXT_LEN);
                c.copy_from_slice(&ctx.carried);
                r
            } else {
                rest
            };
            let body_len = plaintext.len();
            let (body, tail) = rest.split_at_mut(body_len);
            body.copy_from_slice(plaintext);
            aad(scratch, ad, head);
            ctx.key.seal(seq, scratch, body, &mut tail[..TAG_LEN])?;
            if sign_each {
                let sig = signer.sign(&envelope_message(ad, &out[..len - 64], plaintext));
                out[len - 64..].copy_from_slice(sig.as_ref());
            }
            Ok::<(), E2eError>(())
        })?;
        self.stats.sealed += 1;
        Ok(env)
    }

    fn open_context(
        &self,
        to: AgentId,
        key: &BundleKey,
        aead: Aead,
        now_ms: u64,
    ) -> Result<SendCtx, E2eError> {
        let (ss, enc) = suite::encapsulate(&key.x25519, &key.mlkem)?;
        let (k, nonce) = suite::key_schedule(aead, &ss, &info(&self.me, &to, &key.id))?;
        let sig = self
            .signer
            .sign(&context_message(aead, &self.me, &to, &key.id, &enc));
        let mut carried = Vec::with_capacity(CONTEXT_LEN);
        carried.extend_from_slice(&enc);
        carried.extend_from_slice(sig.as_ref());
        Ok(SendCtx {
            ctx_id: context_id(&enc),
            carried: carried.into_boxed_slice(),
            aead,
            key: SealKey::new(aead, &k, nonce)?,
            seq: 0,
            renew_ms: now_ms + self.rotation_ms,
            confirmed: false,
        })
    }

    /// A delivery receipt arrived: if the envelope carried a context, the recipient holds it.
    pub fn on_delivered(&mut self, id: &MessageId) {
        if let Some((to, key, ctx_id, _)) = self.confirming.remove(id) {
            if let Some(c) = self.send.get_mut(&(to, key)).filter(|c| c.ctx_id == ctx_id) {
                c.confirmed = true;
            }
        }
    }

    /// Opens an envelope sealed to this agent, counting the outcome (`docs/PROTOCOL.md` §6.4).
    pub fn open(&mut self, env: &Envelope, now_ms: u64) -> Result<Opened, E2eError> {
        let r = self.open_inner(env, now_ms);
        match &r {
            Ok(_) => self.stats.opened += 1,
            Err(e) => self.stats.rejected[e.index()] += 1,
        }
        r
    }

    /// Keeps a context that opened an envelope: at most [`CONTEXTS_PER_SOURCE`] per sender (its
    /// oldest goes) and `max_contexts` in all (an arbitrary one goes).
    fn keep_context(&mut self, slot: (AgentId, [u8; 16]), c: RecvCtx) {
        self.recv_clock += 1;
        let mut c = c;
        c.kept = self.recv_clock;
        let mine: Vec<((AgentId, [u8; 16]), u64)> = self
            .recv
            .iter()
            .filter(|(k, _)| k.0 == slot.0)
            .map(|(k, v)| (*k, v.kept))
            .collect();
        if mine.len() >= CONTEXTS_PER_SOURCE {
            if let Some((oldest, _)) = mine.iter().min_by_key(|(_, kept)| *kept) {
                self.recv.remove(oldest);
            }
        }
        if self.recv.len() >= self.cfg.max_contexts {
            if let Some(any) = self.recv.keys().next().copied() {
                self.recv.remove(&any);
            }
        }
        self.recv.insert(slot, c);
    }

    fn open_inner(&mut self, env: &Envelope, now_ms: u64) -> Result<Opened, E2eError> {
        if env.flags() & flags::SEALED == 0 {
            return Err(E2eError::NotSealed);
        }
        if env.destination() != Destination::Agent(self.me) {
            return Err(E2eError::WrongRecipient);
        }
        if env.expires_ms() <= now_ms {
            return Err(E2eError::Expired);
        }
        let source = env.source();
        if self
            .replay
            .seen(&source, &env.message_id(), env.expires_ms())
        {
            return Err(E2eError::Replay);
        }
        let payload = env.payload_ref();
        if payload.len() < SEALED_HEADER_LEN + TAG_LEN {
            return Err(E2eError::Malformed("sealed payload length"));
        }
        let head = &payload[..SEALED_HEADER_LEN];
        if head[0] != SEALED_VERSION {
            return Err(E2eError::Malformed("sealed version"));
        }
        let aead = Aead::from_u16(u16::from_be_bytes([head[1], head[2]]))
            .ok_or(E2eError::Malformed("AEAD"))?;
        let f = head[3];
        if f & !(CARRIES_CONTEXT | SIGNED) != 0 {
            return Err(E2eError::Malformed("sealed flags"));
        }
        let key_id: [u8; 8] = head[4..12].try_into().map_err(|_| E2eError::Crypto)?;
        let ctx_id: [u8; 16] = head[12..28].try_into().map_err(|_| E2eError::Crypto)?;
        let seq = u64::from_be_bytes(head[28..36].try_into().map_err(|_| E2eError::Crypto)?);
        let signed = f & SIGNED != 0;
        let ctx_len = if f & CARRIES_CONTEXT != 0 {
            CONTEXT_LEN
        } else {
            0
        };
        let sig_len = if signed { 64 } else { 0 };
        if payload.len() < SEALED_HEADER_LEN + ctx_len + TAG_LEN + sig_len {
            return Err(E2eError::Malformed("sealed payload length"));
        }
        let slot = (source, ctx_id);
        let carried = &payload[SEALED_HEADER_LEN..SEALED_HEADER_LEN + ctx_len];
        let known = self.recv.get(&slot).is_some_and(|c| {
            c.key_id == key_id && c.aead == aead && (ctx_len == 0 || *c.carried == *carried)
        });
        // A context seen for the first time is kept only once an envelope opened under it.
        let mut fresh = None;
        if known {
            if self.recv.get(&slot).is_some_and(|c| c.retire_ms <= now_ms) {
                self.recv.remove(&slot);
                return Err(E2eError::StaleKey);
            }
        } else {
            let own = self
                .own
                .iter()
                .find(|k| k.id == key_id && k.retire_ms > now_ms)
                .ok_or(E2eError::StaleKey)?;
            if ctx_len == 0 {
                return Err(E2eError::UnknownContext);
            }
            let (enc, sig) = carried.split_at(ENC_LEN);
            if context_id(enc) != ctx_id {
                // The carried encapsulation is not the one the header names: altered.
                return Err(E2eError::Tampered);
            }
            UnparsedPublicKey::new(&ED25519, &source.0)
                .verify(&context_message(aead, &source, &self.me, &key_id, enc), sig)
                .map_err(|_| E2eError::BadSignature)?;
            let ss = own.keys.decapsulate(enc)?;
            let (k, nonce) = suite::key_schedule(aead, &ss, &info(&source, &self.me, &key_id))?;
            fresh = Some(RecvCtx {
                carried: carried.into(),
                key_id,
                aead,
                key: SealKey::new(aead, &k, nonce)?,
                retire_ms: own.retire_ms,
                kept: 0,
            });
        }
        let ctx = match &fresh {
            Some(c) => c,
            None => self.recv.get(&slot).ok_or(E2eError::Crypto)?,
        };
        let mut body = payload[SEALED_HEADER_LEN + ctx_len..payload.len() - sig_len].to_vec();
        aad(&mut self.scratch, env.associated_data(), head);
        let n = ctx.key.open(seq, &self.scratch, &mut body)?;
        body.truncate(n);
        if signed {
            let (before, sig) = payload.split_at(payload.len() - 64);
            UnparsedPublicKey::new(&ED25519, &source.0)
                .verify(&envelope_message(env.associated_data(), before, &body), sig)
                .map_err(|_| E2eError::BadSignature)?;
        }
        if let Some(c) = fresh {
            self.keep_context(slot, c);
            self.stats.contexts_received += 1;
        }
        self.replay
            .insert(source, env.message_id(), env.expires_ms(), now_ms);
        Ok(Opened {
            source,
            message_id: env.message_id(),
            schema: env.schema().to_string(),
            plaintext: body,
            signed,
        })
    }
}

/// A fresh key-agreement key, valid for senders a quarter interval past the next rotation
/// (they switch when they look the bundle up again), held `retire_after_ms` longer.
fn new_key(now_ms: u64, rotation_ms: u64, retire_after_ms: u64) -> Result<OwnKey, E2eError> {
    let keys = PrivateKeys::generate()?;
    let not_after_ms = now_ms + rotation_ms + rotation_ms / 4;
    Ok(OwnKey {
        id: openmesh_dataplane::directory::key_id(&keys.x25519_public, &keys.mlkem_public),
        keys,
        not_after_ms,
        retire_ms: not_after_ms + retire_after_ms,
    })
}

/// Signs the bundle listing the keys senders may still use, newest first.
fn sign_bundle(
    own: &VecDeque<OwnKey>,
    cfg: &E2eConfig,
    capability: &Capability,
    signer: &Ed25519KeyPair,
    now_ms: u64,
) -> Result<KeyBundle, E2eError> {
    let keys = own
        .iter()
        .filter(|k| k.not_after_ms > now_ms)
        .take(openmesh_dataplane::directory::bundle::MAX_BUNDLE_KEYS)
        .map(|k| {
            BundleKey::new(
                k.keys.x25519_public,
                Bytes::copy_from_slice(&k.keys.mlkem_public),
                k.not_after_ms,
            )
        })
        .collect();
    KeyBundle::sign(
        BundleParts {
            issued_ms: now_ms,
            expires_ms: own.front().map_or(now_ms, |k| k.not_after_ms),
            aeads: cfg.aeads,
            keys,
            capability: capability.clone(),
        },
        signer,
    )
    .map_err(|_| E2eError::Crypto)
}

/// The AEAD's associated data: the envelope's immutable header, then the sealed payload's.
fn aad(scratch: &mut Vec<u8>, envelope_ad: &[u8], sealed_head: &[u8]) {
    scratch.clear();
    scratch.extend_from_slice(envelope_ad);
    scratch.extend_from_slice(sealed_head);
}

/// `info` of the key schedule: the label, sender, recipient and recipient key id.
pub(crate) fn info(sender: &AgentId, recipient: &AgentId, key_id: &[u8; 8]) -> Vec<u8> {
    let mut i = Vec::with_capacity(INFO_LABEL.len() + 72);
    i.extend_from_slice(INFO_LABEL);
    i.extend_from_slice(&sender.0);
    i.extend_from_slice(&recipient.0);
    i.extend_from_slice(key_id);
    i
}

/// What the sender signs for a context.
pub(crate) fn context_message(
    aead: Aead,
    sender: &AgentId,
    recipient: &AgentId,
    key_id: &[u8; 8],
    enc: &[u8],
) -> Vec<u8> {
    let mut m = Vec::with_capacity(CONTEXT_LABEL.len() + 2 + 72 + enc.len());
    m.extend_from_slice(CONTEXT_LABEL);
    m.extend_from_slice(&(aead as u16).to_be_bytes());
    m.extend_from_slice(&sender.0);
    m.extend_from_slice(&recipient.0);
    m.extend_from_slice(key_id);
    m.extend_from_slice(enc);
    m
}

/// A context's id: `SHA-256(CONTEXT_LABEL || enc)[..16]`.
pub(crate) fn context_id(enc: &[u8]) -> [u8; 16] {
    let mut c = digest::Context::new(&digest::SHA256);
    c.update(CONTEXT_LABEL);
    c.update(enc);
    let mut id = [0u8; 16];
    id.copy_from_slice(&c.finish().as_ref()[..16]);
    id
}

/// What an envelope signature covers: the label, the envelope's associated data, the sealed
/// payload before the signature, and `SHA-256(plaintext)` (so the signature binds what was
/// said, not only the ciphertext).
fn envelope_message(ad: &[u8], sealed_before_signature: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let mut m =
        Vec::with_capacity(ENVELOPE_LABEL.len() + ad.len() + sealed_before_signature.len() + 32);
    m.extend_from_slice(ENVELOPE_LABEL);
    m.extend_from_slice(ad);
    m.extend_from_slice(sealed_before_signature);
    m.extend_from_slice(digest::digest(&digest::SHA256, plaintext).as_ref());
    m
}

#[cfg(test)]
mod tests;

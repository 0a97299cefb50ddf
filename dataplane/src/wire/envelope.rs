//! The envelope: a small mutable routing part written by relays, followed by the immutable part
//! written (and covered by the end-to-end AEAD) by the source agent.
//!
//! A relay decodes an envelope once: the fields are validated and the offsets of the variable
//! sections recorded; header fields are then read in place. The immutable part is never copied or
//! re-encoded. Forwarding encodes a new routing part with
//! [`Envelope::encode_head`] and sends the same immutable `Bytes` behind it.

use bytes::{BufMut, Bytes, BytesMut};

use super::reader::Reader;
use super::{
    AgentId, DeliveryClass, FrameType, MessageId, PathClass, RelayId, WireError, ENVELOPE_VERSION,
    FRAME_HEADER_LEN,
};

/// Most relays a routing part may name.
pub const MAX_PATH_LEN: usize = 8;
/// Most entries in each constraint list (jurisdictions, avoid, prefer).
pub const MAX_CONSTRAINT_LIST: usize = 16;
/// Most node-disjoint paths an envelope may ask for (`multipath_k`).
pub const MAX_MULTIPATH: u8 = 4;
/// Most bytes the extension area of an envelope may hold.
pub const MAX_EXTENSIONS_LEN: usize = 1024;
const ROUTING_FIXED_LEN: usize = 8;

/// Bits of the envelope's `flags` byte (`docs/PROTOCOL.md` §2, ENVELOPE).
pub mod flags {
    /// The source wants a RECEIPT `delivered` once the destination agent ACKed the envelope.
    pub const RECEIPT_DELIVERED: u8 = 1 << 0;
    /// The source wants a RECEIPT `expired` if the envelope expires undelivered.
    pub const RECEIPT_EXPIRED: u8 = 1 << 1;
    /// The payload is sealed end to end (PROTOCOL.md §6); relays ignore it like every payload
    /// byte, the destination agent opens it.
    pub const SEALED: u8 = 1 << 2;
    /// Every bit this version defines; the others are sent as 0 and ignored.
    pub const KNOWN: u8 = RECEIPT_DELIVERED | RECEIPT_EXPIRED | SEALED;
}

/// Set in an extension's type when a relay that does not know the type must refuse the envelope.
pub const EXTENSION_CRITICAL: u16 = 0x8000;

/// One entry of an envelope's extension area: a type, whose high bit marks it critical, and an
/// opaque value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extension<'a> {
    /// The type without the critical bit.
    pub kind: u16,
    /// Whether a relay that does not know `kind` must refuse the envelope.
    pub critical: bool,
    pub value: &'a [u8],
}

/// Where an envelope goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Destination {
    /// One agent.
    Agent(AgentId),
    /// A group of agents (fan-out is resolved by relays).
    Group([u8; 32]),
}

/// A two-letter jurisdiction code (ISO 3166 alpha-2, or a bloc such as `EU`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Jurisdiction(pub [u8; 2]);

impl Jurisdiction {
    /// Parses `"EU"`, `"DE"`, ... (two ASCII uppercase letters).
    pub fn parse(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        (b.len() == 2 && b.iter().all(u8::is_ascii_uppercase)).then(|| Jurisdiction([b[0], b[1]]))
    }
    /// The code as text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("??")
    }
}

/// The mutable routing part, rewritten by every relay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutingPart {
    /// Hops the envelope may still take; a relay refuses an envelope that arrives with 0.
    pub hop_limit: u8,
    /// Index of the current hop in `path` (0 when `path` is empty; below its length otherwise).
    pub hop_index: u8,
    /// Which of the `multipath_k` copies this is (0 for a single path).
    pub copy_index: u8,
    /// Route table generation the ingress relay used.
    pub route_generation: u32,
    /// Relay ids chosen by the ingress relay, `32 * n` bytes, `n <= MAX_PATH_LEN`.
    pub path: Bytes,
}

impl RoutingPart {
    /// A routing part for an envelope leaving its source agent.
    pub fn origin(hop_limit: u8) -> Self {
        RoutingPart {
            hop_limit,
            hop_index: 0,
            copy_index: 0,
            route_generation: 0,
            path: Bytes::new(),
        }
    }

    /// Whether this is the routing part an agent must send: nothing chosen by a relay yet.
    pub fn is_origin(&self) -> bool {
        self.hop_index == 0
            && self.copy_index == 0
            && self.route_generation == 0
            && self.path.is_empty()
    }

    /// Encoded length in bytes.
    pub fn encoded_len(&self) -> usize {
        ROUTING_FIXED_LEN + self.path.len()
    }

    /// Relay ids on the path.
    pub fn relays(&self) -> impl Iterator<Item = RelayId> + '_ {
        self.path.chunks_exact(32).map(|c| {
            let mut id = [0u8; 32];
            id.copy_from_slice(c);
            RelayId(id)
        })
    }

    // Inlined into `Envelope::decode_at`: returned through memory, its narrow fields were read
    // back at once as a wider word (a store-forwarding stall per envelope).
    #[inline(always)]
    fn decode(r: &mut Reader<'_>, frame: &Bytes) -> Result<Self, WireError> {
        let hop_limit = r.u8("hop limit")?;
        let hop_index = r.u8("hop index")?;
        let copy_index = r.u8("copy index")?;
        let route_generation = r.u32("route generation")?;
        let n = r.u8("path length")? as usize;
        if n > MAX_PATH_LEN {
            return Err(WireError::Invalid("path length"));
        }
        if hop_index as usize >= n.max(1) {
            return Err(WireError::Invalid("hop index"));
        }
        let start = r.pos();
        r.take(n * 32, "path")?;
        Ok(RoutingPart {
            hop_limit,
            hop_index,
            copy_index,
            route_generation,
            path: frame.slice(start..start + n * 32),
        })
    }

    pub(crate) fn encode(&self, dst: &mut BytesMut) {
        dst.put_u8(self.hop_limit);
        dst.put_u8(self.hop_index);
        dst.put_u8(self.copy_index);
        dst.put_u32(self.route_generation);
        dst.put_u8((self.path.len() / 32) as u8);
        dst.put_slice(&self.path);
    }
}

// Offsets of the fixed fields inside the immutable part (docs/PROTOCOL.md §2, ENVELOPE).
const OFF_FLAGS: usize = 1;
const OFF_ID: usize = 2;
const OFF_SOURCE: usize = 18;
const OFF_DEST_KIND: usize = 50;
const OFF_DEST: usize = 51;
const OFF_CREATED: usize = 83;
const OFF_EXPIRES: usize = 91;
const OFF_CLASS: usize = 99;
const OFF_PRIORITY: usize = 100;
const OFF_PATH_CLASS: usize = 101;
const OFF_MULTIPATH: usize = 102;
const OFF_TRUST: usize = 103;
const FIXED_LEN: usize = 104;

/// Where the variable sections of a decoded immutable part are: `(offset, count)` pairs.
///
/// Small and `Copy`: a decoded envelope is about 100 bytes however large its payload, so queues
/// and custody maps move little when envelopes move through them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sections {
    jur: (u16, u8),
    avoid: (u16, u8),
    prefer: (u16, u8),
    fallback: (u16, u8),
    schema: (u16, u8),
    /// Offset and length of the extension TLVs (after their `u16` length).
    ext: (u16, u16),
    payload: u16,
}

/// A decoded envelope: routing part, and the shared immutable bytes with the offsets of their
/// sections. Header fields are read in place from the immutable bytes, which were validated once
/// by [`Envelope::decode`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    pub routing: RoutingPart,
    /// The immutable part exactly as the source wrote it (AEAD associated data plus payload).
    pub immutable: Bytes,
    sections: Sections,
    /// The relay's store sequence number once the envelope is on disk (0: not stored). Not
    /// on the wire.
    store_seq: u64,
    /// Who this relay answers once the next relay took the envelope (a relay link's envelope
    /// in transit). Not on the wire.
    pub(crate) upstream: Option<Box<crate::shard::msg::Src>>,
}

impl Envelope {
    /// The store sequence number of a stored envelope (0: not stored; never on the wire).
    pub fn store_seq(&self) -> u64 {
        self.store_seq
    }

    /// Marks the envelope as stored under `seq`.
    pub fn set_store_seq(&mut self, seq: u64) {
        self.store_seq = seq;
    }

    /// Decodes an ENVELOPE frame body. `body` is a slice of the received frame; the result shares it.
    pub fn decode(body: Bytes) -> Result<Self, WireError> {
        Envelope::decode_at(body, 0)
    }

    /// Decodes the ENVELOPE frame body that starts at `at` in `frame` (past its length prefix
    /// and type). The frame is moved past what comes before the immutable part in one step,
    /// once the routing part is read: a `Bytes` changed in memory and then handed on whole
    /// stalls the copy that reads it back. Inlined into the frame reader, so that the envelope
    /// is built where it is returned instead of in a result copied field by field.
    #[inline(always)]
    pub(crate) fn decode_at(mut frame: Bytes, at: usize) -> Result<Self, WireError> {
        let mut r = Reader::at(&frame, at);
        let routing = RoutingPart::decode(&mut r, &frame)?;
        // The immutable part is the rest of the body: moved past the routing part, not sliced
        // (a slice and the body's drop would be two more steps on a shared reference count).
        let pos = r.pos();
        bytes::Buf::advance(&mut frame, pos);
        let immutable = frame;
        let sections = validate(&immutable)?;
        if routing.copy_index >= immutable[OFF_MULTIPATH].max(1) {
            return Err(WireError::Invalid("copy index"));
        }
        Ok(Envelope {
            routing,
            immutable,
            sections,
            store_seq: 0,
            upstream: None,
        })
    }

    fn id32(&self, off: usize) -> [u8; 32] {
        let mut id = [0u8; 32];
        id.copy_from_slice(&self.immutable[off..off + 32]);
        id
    }

    fn u64_at(&self, off: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.immutable[off..off + 8]);
        u64::from_be_bytes(b)
    }

    /// Envelope format version.
    pub fn version(&self) -> u8 {
        self.immutable[0]
    }

    /// The flags byte ([`flags`]).
    pub fn flags(&self) -> u8 {
        self.immutable[OFF_FLAGS]
    }

    /// Whether the source asked for a RECEIPT when the destination ACKs.
    pub fn wants_delivery_receipt(&self) -> bool {
        self.flags() & flags::RECEIPT_DELIVERED != 0
    }

    /// Whether the source asked for a RECEIPT if the envelope expires undelivered.
    pub fn wants_expiry_notice(&self) -> bool {
        self.flags() & flags::RECEIPT_EXPIRED != 0
    }

    /// The source's message id.
    pub fn message_id(&self) -> MessageId {
        let mut id = [0u8; 16];
        id.copy_from_slice(&self.immutable[OFF_ID..OFF_ID + 16]);
        MessageId(id)
    }

    /// The source agent.
    pub fn source(&self) -> AgentId {
        AgentId(self.id32(OFF_SOURCE))
    }

    /// Where the envelope goes.
    pub fn destination(&self) -> Destination {
        match self.immutable[OFF_DEST_KIND] {
            0 => Destination::Agent(AgentId(self.id32(OFF_DEST))),
            _ => Destination::Group(self.id32(OFF_DEST)),
        }
    }

    /// Creation time, milliseconds since the Unix epoch.
    pub fn created_ms(&self) -> u64 {
        self.u64_at(OFF_CREATED)
    }

    /// Absolute expiry, milliseconds since the Unix epoch.
    pub fn expires_ms(&self) -> u64 {
        self.u64_at(OFF_EXPIRES)
    }

    /// Delivery class.
    pub fn class(&self) -> DeliveryClass {
        DeliveryClass::from_u8(self.immutable[OFF_CLASS]).unwrap_or(DeliveryClass::BestEffort)
    }

    /// Priority, 0 lowest.
    pub fn priority(&self) -> u8 {
        self.immutable[OFF_PRIORITY]
    }

    /// Path class asked for.
    pub fn path_class(&self) -> PathClass {
        PathClass::from_u8(self.immutable[OFF_PATH_CLASS]).unwrap_or(PathClass::LowLatency)
    }

    /// Number of node-disjoint paths wanted (0 or 1: single path; at most [`MAX_MULTIPATH`]).
    pub fn multipath_k(&self) -> u8 {
        self.immutable[OFF_MULTIPATH]
    }

    /// Minimum relay trust score (0 to 100) allowed on the path.
    pub fn min_trust(&self) -> u8 {
        self.immutable[OFF_TRUST]
    }

    /// Encoded length of the whole frame, header included.
    pub fn frame_len(&self) -> usize {
        FRAME_HEADER_LEN + self.routing.encoded_len() + self.immutable.len()
    }

    /// Writes the frame header and the routing part; the caller sends `immutable` right after.
    pub fn encode_head(&self, dst: &mut BytesMut) {
        let len = 1 + self.routing.encoded_len() + self.immutable.len();
        dst.put_u32(len as u32);
        dst.put_u8(FrameType::Envelope as u8);
        self.routing.encode(dst);
    }

    /// Writes the whole frame (copies the immutable part; for agents and tests, not for relays).
    pub fn encode(&self, dst: &mut BytesMut) {
        self.encode_head(dst);
        dst.extend_from_slice(&self.immutable);
    }

    /// Moves the envelope's bytes (immutable part and path) into allocations of their own, so
    /// that it stops pinning the larger buffer it was read from. For envelopes that are held a
    /// while; forwarding never needs it.
    pub fn unshare(&mut self) {
        self.immutable = Bytes::copy_from_slice(&self.immutable);
        if !self.routing.path.is_empty() {
            self.routing.path = Bytes::copy_from_slice(&self.routing.path);
        }
    }

    /// The opaque (end-to-end encrypted) payload, shared with the envelope.
    pub fn payload(&self) -> Bytes {
        self.immutable.slice(self.sections.payload as usize + 4..)
    }

    /// The payload, borrowed: no reference count taken, for reading it in place.
    pub fn payload_ref(&self) -> &[u8] {
        &self.immutable[self.sections.payload as usize + 4..]
    }

    /// The immutable part without the payload: what the end-to-end AEAD covers as associated data.
    pub fn associated_data(&self) -> &[u8] {
        &self.immutable[..self.sections.payload as usize + 4]
    }

    /// Schema id such as `market/proposal@2.1`.
    pub fn schema(&self) -> &str {
        let (off, len) = self.sections.schema;
        std::str::from_utf8(&self.immutable[off as usize..off as usize + len as usize])
            .unwrap_or("")
    }

    /// Jurisdictions the envelope may be routed and stored in (empty: anywhere).
    pub fn jurisdictions(&self) -> impl Iterator<Item = Jurisdiction> + '_ {
        self.section(self.sections.jur, 2)
            .map(|c| Jurisdiction([c[0], c[1]]))
    }

    /// Relays the envelope must not cross.
    pub fn avoid(&self) -> impl Iterator<Item = RelayId> + '_ {
        self.section(self.sections.avoid, 32).map(relay_id)
    }

    /// Relays the envelope prefers to cross.
    pub fn prefer(&self) -> impl Iterator<Item = RelayId> + '_ {
        self.section(self.sections.prefer, 32).map(relay_id)
    }

    /// Path classes to fall back to, in order, when the preferred class has no path.
    pub fn fallback(&self) -> impl Iterator<Item = PathClass> + '_ {
        self.section(self.sections.fallback, 1)
            .filter_map(|c| PathClass::from_u8(c[0]).ok())
    }

    /// The extension TLVs, in order.
    pub fn extensions(&self) -> impl Iterator<Item = Extension<'_>> + '_ {
        let (off, len) = self.sections.ext;
        ExtensionIter {
            rest: &self.immutable[off as usize..off as usize + len as usize],
        }
    }

    /// The first critical extension whose kind is not in `known`, if any: a relay refuses such
    /// an envelope (`unknown_critical_extension`).
    pub fn unknown_critical_extension(&self, known: &[u16]) -> Option<u16> {
        self.extensions()
            .find(|e| e.critical && !known.contains(&e.kind))
            .map(|e| e.kind)
    }

    fn section(&self, (off, n): (u16, u8), width: usize) -> std::slice::ChunksExact<'_, u8> {
        let off = off as usize;
        self.immutable[off..off + n as usize * width].chunks_exact(width)
    }
}

/// Walks a validated extension area.
struct ExtensionIter<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for ExtensionIter<'a> {
    type Item = Extension<'a>;

    fn next(&mut self) -> Option<Extension<'a>> {
        if self.rest.len() < 4 {
            return None;
        }
        let ty = u16::from_be_bytes([self.rest[0], self.rest[1]]);
        let len = u16::from_be_bytes([self.rest[2], self.rest[3]]) as usize;
        let value = self.rest.get(4..4 + len)?;
        self.rest = &self.rest[4 + len..];
        Some(Extension {
            kind: ty & !EXTENSION_CRITICAL,
            critical: ty & EXTENSION_CRITICAL != 0,
            value,
        })
    }
}

fn relay_id(c: &[u8]) -> RelayId {
    let mut id = [0u8; 32];
    id.copy_from_slice(c);
    RelayId(id)
}

/// Checks every field of an immutable part and returns where its sections are.
// Inlined into `Envelope::decode_at`: returned through memory, the sections were written field by
// field and read back at once as wider words, which stalls the load on every envelope.
#[inline(always)]
fn validate(imm: &[u8]) -> Result<Sections, WireError> {
    // The fixed part: one length check, then the few bytes that have a domain.
    if imm.len() < FIXED_LEN {
        return Err(WireError::Truncated("envelope header"));
    }
    if imm[0] != ENVELOPE_VERSION {
        return Err(WireError::Invalid("envelope version"));
    }
    if imm[OFF_DEST_KIND] > 1 {
        return Err(WireError::Invalid("destination kind"));
    }
    DeliveryClass::from_u8(imm[OFF_CLASS])?;
    PathClass::from_u8(imm[OFF_PATH_CLASS])?;
    if imm[OFF_TRUST] > 100 {
        return Err(WireError::Invalid("minimum trust"));
    }
    if imm[OFF_MULTIPATH] > MAX_MULTIPATH {
        return Err(WireError::Invalid("multipath k"));
    }
    let (mut r, jur, avoid, prefer, fallback);
    if imm.get(FIXED_LEN..FIXED_LEN + 4) == Some(&[0u8; 4][..]) {
        // No route constraints (most envelopes): four empty lists, each starting right after
        // its count, as `list` would find them.
        let at = FIXED_LEN as u16;
        (jur, avoid, prefer, fallback) = ((at + 1, 0), (at + 2, 0), (at + 3, 0), (at + 4, 0));
        r = Reader::at(imm, FIXED_LEN + 4);
    } else {
        r = Reader::at(imm, FIXED_LEN);
        jur = list(&mut r, 2, MAX_CONSTRAINT_LIST, "jurisdictions")?;
        let jur_bytes = &imm[jur.0 as usize..jur.0 as usize + 2 * jur.1 as usize];
        if !jur_bytes.iter().all(u8::is_ascii_uppercase) {
            return Err(WireError::Invalid("jurisdiction"));
        }
        avoid = list(&mut r, 32, MAX_CONSTRAINT_LIST, "avoid list")?;
        prefer = list(&mut r, 32, MAX_CONSTRAINT_LIST, "prefer list")?;
        fallback = list(&mut r, 1, 3, "fallback order")?;
        for &c in &imm[fallback.0 as usize..fallback.0 as usize + fallback.1 as usize] {
            PathClass::from_u8(c)?;
        }
    }
    let schema_start = r.pos() + 1;
    let schema = r.short_str("schema id")?;
    let schema = (schema_start as u16, schema.len() as u8);
    let ext_len = r.u16("extension length")? as usize;
    if ext_len > MAX_EXTENSIONS_LEN {
        return Err(WireError::Invalid("extension length"));
    }
    let ext_start = r.pos();
    let mut ext = Reader::at(r.take(ext_len, "extensions")?, 0);
    while ext.remaining() > 0 {
        ext.u16("extension type")?;
        let n = ext.u16("extension length")? as usize;
        ext.take(n, "extension value")?;
    }
    let ext = (ext_start as u16, ext_len as u16);
    let payload = r.pos() as u16;
    let payload_len = r.u32("payload length")? as usize;
    if payload_len != r.remaining() {
        return Err(if payload_len > r.remaining() {
            WireError::Truncated("payload")
        } else {
            WireError::TrailingBytes(r.remaining() - payload_len)
        });
    }
    Ok(Sections {
        jur,
        avoid,
        prefer,
        fallback,
        schema,
        ext,
        payload,
    })
}

fn list(
    r: &mut Reader<'_>,
    width: usize,
    max: usize,
    field: &'static str,
) -> Result<(u16, u8), WireError> {
    let n = r.u8(field)?;
    if n as usize > max {
        return Err(WireError::Invalid(field));
    }
    let off = r.pos() as u16;
    r.take(n as usize * width, field)?;
    Ok((off, n))
}

/// Constraints a source puts on the route of its envelope.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Constraints {
    pub jurisdictions: Vec<Jurisdiction>,
    pub min_trust: u8,
    pub avoid: Vec<RelayId>,
    pub prefer: Vec<RelayId>,
    pub fallback: Vec<PathClass>,
    pub multipath_k: u8,
}

/// Builds envelopes on the agent side.
#[derive(Clone, Debug)]
pub struct EnvelopeBuilder {
    pub message_id: MessageId,
    pub source: AgentId,
    pub destination: Destination,
    pub created_ms: u64,
    pub expires_ms: u64,
    pub class: DeliveryClass,
    pub priority: u8,
    pub path_class: PathClass,
    pub constraints: Constraints,
    pub schema: String,
    /// Bits of [`flags`] (receipts wanted).
    pub flags: u8,
    /// Extension TLVs: `(type, value)`, the type's high bit ([`EXTENSION_CRITICAL`]) marking a
    /// critical one.
    pub extensions: Vec<(u16, Vec<u8>)>,
    pub hop_limit: u8,
}

impl EnvelopeBuilder {
    /// An at-least-once, low-latency envelope with no constraints and a hop limit of 8.
    pub fn new(
        message_id: MessageId,
        source: AgentId,
        destination: Destination,
        created_ms: u64,
        ttl_ms: u64,
    ) -> Self {
        EnvelopeBuilder {
            message_id,
            source,
            destination,
            created_ms,
            expires_ms: created_ms.saturating_add(ttl_ms),
            class: DeliveryClass::AtLeastOnce,
            priority: 0,
            path_class: PathClass::LowLatency,
            constraints: Constraints::default(),
            schema: String::new(),
            flags: 0,
            extensions: Vec::new(),
            hop_limit: 8,
        }
    }

    fn extensions_len(&self) -> usize {
        self.extensions.iter().map(|(_, v)| 4 + v.len()).sum()
    }

    /// Length of the immutable part for a payload of `payload_len` bytes.
    pub fn immutable_len(&self, payload_len: usize) -> usize {
        let c = &self.constraints;
        1 + 1
            + 16
            + 32
            + 1
            + 32
            + 8
            + 8
            + 5
            + 1
            + 2 * c.jurisdictions.len()
            + 1
            + 32 * c.avoid.len()
            + 1
            + 32 * c.prefer.len()
            + 1
            + c.fallback.len()
            + 1
            + self.schema.len()
            + 2
            + self.extensions_len()
            + 4
            + payload_len
    }

    /// Encodes the immutable part and returns the envelope. Fails if a list or the schema id is
    /// longer than the wire allows.
    pub fn build(&self, payload: &[u8]) -> Result<Envelope, WireError> {
        let mut b = self.head(payload.len())?;
        b.put_slice(payload);
        self.finish(b)
    }

    /// Builds the envelope whose payload of `payload_len` bytes `fill` writes, given the
    /// associated data (every immutable byte before the payload, its length included). The end
    /// to end seal writes its ciphertext this way, straight into the envelope.
    pub fn build_with<E: From<WireError>>(
        &self,
        payload_len: usize,
        fill: impl FnOnce(&[u8], &mut [u8]) -> Result<(), E>,
    ) -> Result<Envelope, E> {
        let mut b = self.head(payload_len)?;
        let ad_len = b.len();
        b.resize(ad_len + payload_len, 0);
        let (ad, payload) = b.split_at_mut(ad_len);
        fill(ad, payload)?;
        Ok(self.finish(b)?)
    }

    /// The immutable part up to and including `payload_len`.
    fn head(&self, payload_len: usize) -> Result<BytesMut, WireError> {
        let c = &self.constraints;
        if c.jurisdictions.len() > MAX_CONSTRAINT_LIST
            || c.avoid.len() > MAX_CONSTRAINT_LIST
            || c.prefer.len() > MAX_CONSTRAINT_LIST
        {
            return Err(WireError::Invalid("constraint list length"));
        }
        if c.fallback.len() > 3 {
            return Err(WireError::Invalid("fallback order"));
        }
        if self.schema.len() > 255 {
            return Err(WireError::Invalid("schema id"));
        }
        if c.multipath_k > MAX_MULTIPATH {
            return Err(WireError::Invalid("multipath k"));
        }
        if self.extensions_len() > MAX_EXTENSIONS_LEN {
            return Err(WireError::Invalid("extension length"));
        }
        if u32::try_from(payload_len).is_err() {
            return Err(WireError::Invalid("payload length"));
        }
        let mut b = BytesMut::with_capacity(self.immutable_len(payload_len));
        b.put_u8(ENVELOPE_VERSION);
        b.put_u8(self.flags & flags::KNOWN);
        b.put_slice(&self.message_id.0);
        b.put_slice(&self.source.0);
        match self.destination {
            Destination::Agent(a) => {
                b.put_u8(0);
                b.put_slice(&a.0);
            }
            Destination::Group(g) => {
                b.put_u8(1);
                b.put_slice(&g);
            }
        }
        b.put_u64(self.created_ms);
        b.put_u64(self.expires_ms);
        b.put_u8(self.class as u8);
        b.put_u8(self.priority);
        b.put_u8(self.path_class as u8);
        b.put_u8(c.multipath_k);
        b.put_u8(c.min_trust);
        b.put_u8(c.jurisdictions.len() as u8);
        for j in &c.jurisdictions {
            b.put_slice(&j.0);
        }
        b.put_u8(c.avoid.len() as u8);
        for r in &c.avoid {
            b.put_slice(&r.0);
        }
        b.put_u8(c.prefer.len() as u8);
        for r in &c.prefer {
            b.put_slice(&r.0);
        }
        b.put_u8(c.fallback.len() as u8);
        for p in &c.fallback {
            b.put_u8(*p as u8);
        }
        b.put_u8(self.schema.len() as u8);
        b.put_slice(self.schema.as_bytes());
        b.put_u16(self.extensions_len() as u16);
        for (ty, v) in &self.extensions {
            b.put_u16(*ty);
            b.put_u16(v.len() as u16);
            b.put_slice(v);
        }
        b.put_u32(payload_len as u32);
        Ok(b)
    }

    fn finish(&self, b: BytesMut) -> Result<Envelope, WireError> {
        let immutable = b.freeze();
        let sections = validate(&immutable)?;
        Ok(Envelope {
            routing: RoutingPart::origin(self.hop_limit),
            sections,
            immutable,
            store_seq: 0,
            upstream: None,
        })
    }
}

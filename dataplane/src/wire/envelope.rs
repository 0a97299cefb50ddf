//! The envelope: a small mutable routing part written by relays, followed by the immutable part
//! written (and covered by the end-to-end AEAD) by the source agent.
//!
//! A relay decodes an envelope once, into an [`EnvelopeHeader`] of fixed fields and offsets; the
//! immutable part is never copied or re-encoded. Forwarding encodes a new routing part with
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
const ROUTING_FIXED_LEN: usize = 7;

/// Where an envelope goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Destination {
    /// One agent.
    Agent(AgentId),
    /// A group of agents (fan-out is resolved by relays).
    Group([u8; 32]),
}

/// A two-letter jurisdiction code (ISO 3166 alpha-2, or a bloc such as `EU`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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
    /// Index of the current hop in `path`.
    pub hop_index: u8,
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
            route_generation: 0,
            path: Bytes::new(),
        }
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

    fn decode(r: &mut Reader<'_>, frame: &Bytes) -> Result<Self, WireError> {
        let hop_limit = r.u8("hop limit")?;
        let hop_index = r.u8("hop index")?;
        let route_generation = r.u32("route generation")?;
        let n = r.u8("path length")? as usize;
        if n > MAX_PATH_LEN {
            return Err(WireError::Invalid("path length"));
        }
        let start = r.pos();
        r.take(n * 32, "path")?;
        Ok(RoutingPart {
            hop_limit,
            hop_index,
            route_generation,
            path: frame.slice(start..start + n * 32),
        })
    }

    fn encode(&self, dst: &mut BytesMut) {
        dst.put_u8(self.hop_limit);
        dst.put_u8(self.hop_index);
        dst.put_u32(self.route_generation);
        dst.put_u8((self.path.len() / 32) as u8);
        dst.put_slice(&self.path);
    }
}

/// Fixed fields of the immutable part plus the offsets of its variable sections.
///
/// `Copy` and allocation-free: this is what the forwarding decision reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnvelopeHeader {
    pub version: u8,
    pub message_id: MessageId,
    pub source: AgentId,
    pub destination: Destination,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// Absolute expiry, milliseconds since the Unix epoch.
    pub expires_ms: u64,
    pub class: DeliveryClass,
    pub priority: u8,
    pub path_class: PathClass,
    /// Number of node-disjoint paths wanted (0 or 1: single path).
    pub multipath_k: u8,
    /// Minimum relay trust score (0 to 100) allowed on the path.
    pub min_trust: u8,
    sections: Sections,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sections {
    jur: (u32, u8),
    avoid: (u32, u8),
    prefer: (u32, u8),
    fallback: (u32, u8),
    schema: (u32, u8),
    payload: (u32, u32),
}

/// A decoded envelope: routing part, header view, and the shared immutable bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    pub routing: RoutingPart,
    pub header: EnvelopeHeader,
    /// The immutable part exactly as the source wrote it (AEAD associated data plus payload).
    pub immutable: Bytes,
}

impl Envelope {
    /// Decodes an ENVELOPE frame body. `body` is a slice of the received frame; the result shares it.
    pub fn decode(body: Bytes) -> Result<Self, WireError> {
        let mut r = Reader::new(&body);
        let routing = RoutingPart::decode(&mut r, &body)?;
        let immutable = body.slice(r.pos()..);
        let header = EnvelopeHeader::decode(&immutable)?;
        Ok(Envelope {
            routing,
            header,
            immutable,
        })
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

    /// The opaque (end-to-end encrypted) payload, shared with the envelope.
    pub fn payload(&self) -> Bytes {
        let (off, len) = self.header.sections.payload;
        self.immutable.slice(off as usize..(off + len) as usize)
    }

    /// The immutable part without the payload: what the end-to-end AEAD covers as associated data.
    pub fn associated_data(&self) -> &[u8] {
        &self.immutable[..self.header.sections.payload.0 as usize]
    }

    /// Schema id such as `market/proposal@2.1`.
    pub fn schema(&self) -> &str {
        let (off, len) = self.header.sections.schema;
        std::str::from_utf8(&self.immutable[off as usize..off as usize + len as usize])
            .unwrap_or("")
    }

    /// Jurisdictions the envelope may be routed and stored in (empty: anywhere).
    pub fn jurisdictions(&self) -> impl Iterator<Item = Jurisdiction> + '_ {
        self.section(self.header.sections.jur, 2)
            .map(|c| Jurisdiction([c[0], c[1]]))
    }

    /// Relays the envelope must not cross.
    pub fn avoid(&self) -> impl Iterator<Item = RelayId> + '_ {
        self.section(self.header.sections.avoid, 32).map(relay_id)
    }

    /// Relays the envelope prefers to cross.
    pub fn prefer(&self) -> impl Iterator<Item = RelayId> + '_ {
        self.section(self.header.sections.prefer, 32).map(relay_id)
    }

    /// Path classes to fall back to, in order, when the preferred class has no path.
    pub fn fallback(&self) -> impl Iterator<Item = PathClass> + '_ {
        self.section(self.header.sections.fallback, 1)
            .filter_map(|c| PathClass::from_u8(c[0]).ok())
    }

    fn section(&self, (off, n): (u32, u8), width: usize) -> std::slice::ChunksExact<'_, u8> {
        let off = off as usize;
        self.immutable[off..off + n as usize * width].chunks_exact(width)
    }
}

fn relay_id(c: &[u8]) -> RelayId {
    let mut id = [0u8; 32];
    id.copy_from_slice(c);
    RelayId(id)
}

impl EnvelopeHeader {
    fn decode(imm: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(imm);
        let version = r.u8("envelope version")?;
        if version != ENVELOPE_VERSION {
            return Err(WireError::Invalid("envelope version"));
        }
        let message_id = MessageId(r.array("message id")?);
        let source = AgentId(r.array("source")?);
        let destination = match r.u8("destination kind")? {
            0 => Destination::Agent(AgentId(r.array("destination")?)),
            1 => Destination::Group(r.array("destination")?),
            _ => return Err(WireError::Invalid("destination kind")),
        };
        let created_ms = r.u64("created")?;
        let expires_ms = r.u64("expiry")?;
        let class = DeliveryClass::from_u8(r.u8("delivery class")?)?;
        let priority = r.u8("priority")?;
        let path_class = PathClass::from_u8(r.u8("path class")?)?;
        let multipath_k = r.u8("multipath k")?;
        let min_trust = r.u8("minimum trust")?;
        if min_trust > 100 {
            return Err(WireError::Invalid("minimum trust"));
        }
        let jur = list(&mut r, 2, MAX_CONSTRAINT_LIST, "jurisdictions")?;
        for c in imm[jur.0 as usize..jur.0 as usize + 2 * jur.1 as usize].chunks_exact(2) {
            if !c.iter().all(u8::is_ascii_uppercase) {
                return Err(WireError::Invalid("jurisdiction"));
            }
        }
        let avoid = list(&mut r, 32, MAX_CONSTRAINT_LIST, "avoid list")?;
        let prefer = list(&mut r, 32, MAX_CONSTRAINT_LIST, "prefer list")?;
        let fallback = list(&mut r, 1, 3, "fallback order")?;
        for &c in &imm[fallback.0 as usize..fallback.0 as usize + fallback.1 as usize] {
            PathClass::from_u8(c)?;
        }
        let schema_start = r.pos() + 1;
        let schema = r.short_str("schema id")?;
        let schema = (schema_start as u32, schema.len() as u8);
        let payload_len = r.u32("payload length")?;
        if payload_len as usize != r.remaining() {
            return Err(if (payload_len as usize) > r.remaining() {
                WireError::Truncated("payload")
            } else {
                WireError::TrailingBytes(r.remaining() - payload_len as usize)
            });
        }
        let payload = (r.pos() as u32, payload_len);
        Ok(EnvelopeHeader {
            version,
            message_id,
            source,
            destination,
            created_ms,
            expires_ms,
            class,
            priority,
            path_class,
            multipath_k,
            min_trust,
            sections: Sections {
                jur,
                avoid,
                prefer,
                fallback,
                schema,
                payload,
            },
        })
    }
}

fn list(
    r: &mut Reader<'_>,
    width: usize,
    max: usize,
    field: &'static str,
) -> Result<(u32, u8), WireError> {
    let n = r.u8(field)?;
    if n as usize > max {
        return Err(WireError::Invalid(field));
    }
    let off = r.pos() as u32;
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
            hop_limit: 8,
        }
    }

    /// Length of the immutable part for a payload of `payload_len` bytes.
    pub fn immutable_len(&self, payload_len: usize) -> usize {
        let c = &self.constraints;
        1 + 16
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
            + 4
            + payload_len
    }

    /// Encodes the immutable part and returns the envelope. Fails if a list or the schema id is
    /// longer than the wire allows.
    pub fn build(&self, payload: &[u8]) -> Result<Envelope, WireError> {
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
        if u32::try_from(payload.len()).is_err() {
            return Err(WireError::Invalid("payload length"));
        }
        let mut b = BytesMut::with_capacity(self.immutable_len(payload.len()));
        b.put_u8(ENVELOPE_VERSION);
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
        b.put_u32(payload.len() as u32);
        b.put_slice(payload);
        let immutable = b.freeze();
        let header = EnvelopeHeader::decode(&immutable)?;
        Ok(Envelope {
            routing: RoutingPart::origin(self.hop_limit),
            header,
            immutable,
        })
    }
}

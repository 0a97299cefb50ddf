//! Link frames: `length: u32 | type: u8 | body`, where `length` counts the type byte and the body.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::reader::Reader;
use super::{AgentId, Envelope, MessageId, Reason, RelayId, Role, WireError, PROTOCOL_VERSION_MIN};

/// Bytes before a frame's body: the `u32` length and the type byte.
pub const FRAME_HEADER_LEN: usize = 5;
/// Most schema ids a HELLO may list.
pub const MAX_HELLO_SCHEMAS: usize = 32;
/// Most message ids one ACK frame may carry.
pub const MAX_ACK_BATCH: usize = 4096;

/// The frame kinds, with their wire codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    Hello = 0x01,
    Welcome = 0x02,
    Envelope = 0x03,
    Ack = 0x04,
    Nack = 0x05,
    Ping = 0x06,
    Pong = 0x07,
    GoingAway = 0x08,
    Close = 0x09,
    Receipt = 0x0a,
    LinkHello = 0x0b,
    LinkAck = 0x0c,
    LinkNack = 0x0d,
    Presence = 0x0e,
    LinkReceipt = 0x0f,
    Publish = 0x10,
    Lookup = 0x11,
    Directory = 0x12,
}

impl FrameType {
    fn from_u8(v: u8) -> Result<Self, WireError> {
        Ok(match v {
            0x01 => Self::Hello,
            0x02 => Self::Welcome,
            0x03 => Self::Envelope,
            0x04 => Self::Ack,
            0x05 => Self::Nack,
            0x06 => Self::Ping,
            0x07 => Self::Pong,
            0x08 => Self::GoingAway,
            0x09 => Self::Close,
            0x0a => Self::Receipt,
            0x0b => Self::LinkHello,
            0x0c => Self::LinkAck,
            0x0d => Self::LinkNack,
            0x0e => Self::Presence,
            0x0f => Self::LinkReceipt,
            0x10 => Self::Publish,
            0x11 => Self::Lookup,
            0x12 => Self::Directory,
            other => return Err(WireError::UnknownFrameType(other)),
        })
    }
}

/// HELLO: the agent's capability descriptor.
///
/// Every protocol version starts HELLO with `min_version` and `max_version`. A HELLO whose range
/// ends below [`PROTOCOL_VERSION_MIN`] is decoded only that far (the rest is another version's
/// layout): the other fields hold their defaults, and the relay answers `no_common_version`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hello {
    pub min_version: u16,
    pub max_version: u16,
    /// What the peer is: an agent, or a relay opening a link.
    pub role: Role,
    /// Feature bits the peer supports ([`crate::wire::features`]).
    pub features: u32,
    /// Bit set of transports the agent can use: bit 0 TCP+TLS, bit 1 QUIC.
    pub transports: u8,
    /// Bit set of delivery classes the agent wants ([`crate::wire::DeliveryClass::bit`]).
    pub classes: u8,
    /// Largest frame the agent accepts.
    pub max_frame: u32,
    /// Heartbeat interval the agent wants, milliseconds.
    pub heartbeat_ms: u32,
    /// Schema ids the agent speaks, such as `market/proposal@2.1`.
    pub schemas: Vec<String>,
}

/// WELCOME: the session contract chosen by the relay.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Welcome {
    pub version: u16,
    /// The role the relay accepted (the HELLO's).
    pub role: Role,
    /// Features both sides support: the HELLO's bits that the relay supports too.
    pub features: u32,
    pub session_id: u64,
    pub relay_id: RelayId,
    /// The agent id the relay authenticated (the public key of the agent's certificate).
    pub agent_id: AgentId,
    pub heartbeat_ms: u32,
    pub max_frame: u32,
    /// Envelopes per second the relay reads from this session before it stops reading.
    pub rate_frames: u32,
    /// Bytes per second the relay reads from this session before it stops reading.
    pub rate_bytes: u64,
    pub max_ttl_ms: u64,
    /// Bit set of delivery classes allowed in this session.
    pub classes: u8,
    /// Seconds between TLS key updates (and end-to-end key rotations).
    pub key_rotation_s: u32,
    /// Most envelopes the relay writes to the agent that the agent has not ACKed yet.
    pub deliver_window: u32,
    /// Most bytes of such envelopes (frame lengths).
    pub deliver_window_bytes: u32,
    /// Most envelopes the agent may have sent that the relay has not answered yet (ACK or
    /// NACK); above it the relay stops reading the session until answers catch up.
    pub send_window: u32,
}

/// ACK: one or more message ids whose custody the receiver took.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AckBatch {
    ids: Bytes,
}

impl AckBatch {
    /// Builds a batch; at most [`MAX_ACK_BATCH`] ids are taken.
    pub fn new(ids: impl IntoIterator<Item = MessageId>) -> Self {
        let ids = ids.into_iter().take(MAX_ACK_BATCH);
        // One allocation of the right size when the iterator knows its length.
        let mut b = BytesMut::with_capacity(ids.size_hint().0 * 16);
        for id in ids {
            b.put_slice(&id.0);
        }
        AckBatch { ids: b.freeze() }
    }
    /// Number of ids.
    pub fn len(&self) -> usize {
        self.ids.len() / 16
    }
    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
    /// The ids.
    pub fn ids(&self) -> impl Iterator<Item = MessageId> + '_ {
        self.ids.chunks_exact(16).map(|c| {
            let mut id = [0u8; 16];
            id.copy_from_slice(c);
            MessageId(id)
        })
    }
}

/// NACK: a refusal of one envelope, with a reason code and text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nack {
    pub message_id: MessageId,
    /// Raw reason code; see [`Reason`].
    pub code: u16,
    pub text: String,
}

impl Nack {
    /// A NACK with a known reason and its label as text.
    pub fn new(message_id: MessageId, reason: Reason) -> Self {
        Nack {
            message_id,
            code: reason as u16,
            text: reason.label().to_string(),
        }
    }
    /// The reason, if this build knows the code.
    pub fn reason(&self) -> Option<Reason> {
        Reason::from_u16(self.code)
    }
}

/// PING: the sender's monotonic timestamp, echoed by PONG.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ping {
    pub timestamp_us: u64,
}

/// PONG: the PING's timestamp echoed, and the responder's own clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pong {
    pub echo_us: u64,
    pub responder_us: u64,
}

/// GOING_AWAY: the relay drains; finish, then reconnect elsewhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoingAway {
    pub code: u16,
    /// Milliseconds until the relay closes the link.
    pub drain_ms: u32,
    /// Where to reconnect (empty: anywhere).
    pub redirect: String,
}

/// CLOSE: the session ends, with a reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Close {
    pub code: u16,
    pub text: String,
}

impl Close {
    /// A CLOSE with a known reason and free text (truncated to 255 bytes on the wire).
    pub fn new(reason: Reason, text: impl Into<String>) -> Self {
        Close {
            code: reason as u16,
            text: text.into(),
        }
    }
    /// The reason, if this build knows the code.
    pub fn reason(&self) -> Option<Reason> {
        Reason::from_u16(self.code)
    }
}

/// What a RECEIPT reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ReceiptStatus {
    /// The destination agent ACKed the envelope.
    Delivered = 0,
    /// The envelope expired before it was delivered.
    Expired = 1,
}

impl ReceiptStatus {
    fn from_u8(v: u8) -> Result<Self, WireError> {
        match v {
            0 => Ok(Self::Delivered),
            1 => Ok(Self::Expired),
            _ => Err(WireError::Invalid("receipt status")),
        }
    }
    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::Expired => "expired",
        }
    }
}

/// RECEIPT: what became of an envelope whose source asked to know (relay → source agent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Receipt {
    pub message_id: MessageId,
    pub status: ReceiptStatus,
    /// When it happened, Unix milliseconds.
    pub at_ms: u64,
}

/// LINK_HELLO: what each relay of a relay link sends first (both ends, without waiting).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkHello {
    pub min_version: u16,
    pub max_version: u16,
    /// The sender's relay id: the Ed25519 key of the certificate it presented.
    pub relay_id: RelayId,
    /// Generation of the route snapshot the sender runs (0: none).
    pub generation: u64,
    /// How often the sender PINGs on this link, milliseconds.
    pub heartbeat_ms: u32,
    /// Largest frame the sender accepts.
    pub max_frame: u32,
    /// Envelopes the sender accepts on this link before it answered them.
    pub window: u32,
    /// Frame bytes of such envelopes.
    pub window_bytes: u32,
}

/// Most link sequence numbers one LINK_ACK may carry.
pub const MAX_LINK_ACK_BATCH: usize = 4096;
/// Most entries one PRESENCE frame may carry.
pub const MAX_PRESENCE_BATCH: usize = 1024;

/// LINK_ACK: the receiver took custody of the envelopes with these link sequence numbers (the
/// ENVELOPE frames it received on this link, counted from 0 in order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkAck {
    seqs: Bytes,
}

impl LinkAck {
    /// Builds a batch; at most [`MAX_LINK_ACK_BATCH`] sequence numbers are taken.
    pub fn new(seqs: impl IntoIterator<Item = u64>) -> Self {
        let seqs = seqs.into_iter().take(MAX_LINK_ACK_BATCH);
        let mut b = BytesMut::with_capacity(seqs.size_hint().0 * 8);
        for s in seqs {
            b.put_u64(s);
        }
        LinkAck { seqs: b.freeze() }
    }
    /// Number of sequence numbers.
    pub fn len(&self) -> usize {
        self.seqs.len() / 8
    }
    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }
    /// The sequence numbers.
    pub fn seqs(&self) -> impl Iterator<Item = u64> + '_ {
        self.seqs.chunks_exact(8).map(|c| {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            u64::from_be_bytes(b)
        })
    }
}

/// LINK_NACK: the receiver refused the envelope with this link sequence number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkNack {
    pub seq: u64,
    /// Raw reason code; see [`Reason`].
    pub code: u16,
    pub text: String,
}

impl LinkNack {
    /// A LINK_NACK with a known reason and its label as text.
    pub fn new(seq: u64, reason: Reason) -> Self {
        LinkNack {
            seq,
            code: reason as u16,
            text: reason.label().to_string(),
        }
    }
    /// The reason, if this build knows the code.
    pub fn reason(&self) -> Option<Reason> {
        Reason::from_u16(self.code)
    }
}

/// One PRESENCE entry: `agent` attached to relay `relay` at `stamp_ms` (Unix milliseconds; the
/// newest stamp wins, equal stamps go to the greater relay id).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PresenceEntry {
    pub agent: AgentId,
    pub relay: RelayId,
    pub stamp_ms: u64,
}

/// PRESENCE: where agents are attached, flooded over relay links.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Presence {
    pub entries: Vec<PresenceEntry>,
}

/// LINK_RECEIPT: a receipt on its way to source agent `to` on another relay, passed hop by hop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkReceipt {
    pub to: AgentId,
    pub receipt: Receipt,
    /// Relays it may still be passed to (it is dropped at 0).
    pub hops_left: u8,
}

/// Most key bundles one DIRECTORY frame may carry.
pub const MAX_DIRECTORY_BATCH: usize = 256;

/// PUBLISH: an agent puts its signed key bundle and capability descriptor in the relay's
/// directory (the bundle's bytes, `crate::directory::KeyBundle`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publish {
    /// Echoed in the DIRECTORY answer.
    pub request_id: u32,
    pub bundle: Bytes,
}

/// What a LOOKUP asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LookupKey {
    /// The bundle of one agent.
    Agent(AgentId),
    /// Every agent whose descriptor lists `schema`, in agent id order, starting after `after`
    /// (all zeros: from the start).
    Schema { schema: String, after: AgentId },
}

/// LOOKUP: an agent asks the relay's directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lookup {
    pub request_id: u32,
    pub key: LookupKey,
    /// Most bundles wanted (the relay may send fewer: its own cap, or what fits a frame).
    pub limit: u16,
}

/// DIRECTORY: the relay's answer to PUBLISH or LOOKUP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectoryAnswer {
    pub request_id: u32,
    /// 0 when the request succeeded, else a [`Reason`] code.
    pub code: u16,
    /// More bundles match than this frame carries: ask again after the last one's agent id.
    pub more: bool,
    /// Signed key bundles, each exactly as its agent published it.
    pub bundles: Vec<Bytes>,
}

impl DirectoryAnswer {
    /// The refusal, if the request was refused.
    pub fn refusal(&self) -> Option<Reason> {
        match self.code {
            0 => None,
            c => Some(Reason::from_u16(c).unwrap_or(Reason::ProtocolError)),
        }
    }
}

/// One decoded link frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    Welcome(Welcome),
    Envelope(Envelope),
    Ack(AckBatch),
    Nack(Nack),
    Ping(Ping),
    Pong(Pong),
    GoingAway(GoingAway),
    Close(Close),
    Receipt(Receipt),
    LinkHello(LinkHello),
    LinkAck(LinkAck),
    LinkNack(LinkNack),
    Presence(Presence),
    LinkReceipt(LinkReceipt),
    Publish(Publish),
    Lookup(Lookup),
    Directory(DirectoryAnswer),
}

/// Splits frames off a receive buffer.
#[derive(Clone, Copy, Debug)]
pub struct FrameDecoder {
    max_frame: usize,
}

impl FrameDecoder {
    /// A decoder refusing frames whose length prefix exceeds `max_frame`.
    pub fn new(max_frame: usize) -> Self {
        FrameDecoder { max_frame }
    }

    /// Changes the maximum (after the session contract is agreed).
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = max_frame;
    }

    /// The maximum frame length accepted.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Takes one complete frame off the front of `buf`. `Ok(None)`: more bytes are needed.
    /// The length prefix is checked against the maximum before anything else, so a hostile
    /// length never makes the caller buffer or allocate more than `max_frame + 5` bytes.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        let Some(total) = self.frame_len(buf)? else {
            return Ok(None);
        };
        if buf.len() < total {
            return Ok(None);
        }
        let frame = buf.split_to(total).freeze();
        Frame::decode_prefixed(frame).map(Some)
    }

    /// The length, prefix included, of the frame starting `buf`, once its 4-byte prefix is
    /// there (`Ok(None)` before). The prefix is checked against the maximum and zero.
    pub fn frame_len(&self, buf: &[u8]) -> Result<Option<usize>, WireError> {
        let Some(prefix) = buf.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        if len > self.max_frame {
            return Err(WireError::FrameTooLarge {
                len,
                max: self.max_frame,
            });
        }
        if len == 0 {
            return Err(WireError::EmptyFrame);
        }
        Ok(Some(len + 4))
    }
}

impl Frame {
    /// Decodes `length | type | body`, a whole frame whose length prefix the caller checked.
    /// An envelope is cut from it in one step (see [`Envelope::decode_at`]).
    pub fn decode_prefixed(mut frame: Bytes) -> Result<Self, WireError> {
        if Frame::is_envelope(&frame) {
            return Envelope::decode_at(frame, 5).map(Frame::Envelope);
        }
        frame.advance(4.min(frame.len()));
        Frame::decode(frame)
    }

    /// Whether `length | type | body` is an ENVELOPE frame's.
    pub(crate) fn is_envelope(prefixed: &[u8]) -> bool {
        prefixed.get(4) == Some(&(FrameType::Envelope as u8))
    }

    /// Decodes `type | body` (the bytes after the length prefix).
    pub fn decode(mut frame: Bytes) -> Result<Self, WireError> {
        if frame.is_empty() {
            return Err(WireError::EmptyFrame);
        }
        let ty = FrameType::from_u8(frame[0])?;
        frame.advance(1);
        if ty == FrameType::Envelope {
            return Envelope::decode(frame).map(Frame::Envelope);
        }
        let mut r = Reader::new(&frame);
        let out = match ty {
            FrameType::Hello => {
                let min_version = r.u16("min version")?;
                let max_version = r.u16("max version")?;
                if min_version > max_version {
                    return Err(WireError::Invalid("version range"));
                }
                if max_version < PROTOCOL_VERSION_MIN {
                    // An older version's HELLO: only the range is ours to read.
                    return Ok(Frame::Hello(Hello {
                        min_version,
                        max_version,
                        ..Hello::default()
                    }));
                }
                let role = Role::from_u8(r.u8("role")?)?;
                let features = r.u32("features")?;
                let transports = r.u8("transports")?;
                let classes = r.u8("classes")?;
                let max_frame = r.u32("max frame")?;
                let heartbeat_ms = r.u32("heartbeat")?;
                let n = r.u8("schema count")? as usize;
                if n > MAX_HELLO_SCHEMAS {
                    return Err(WireError::Invalid("schema count"));
                }
                let mut schemas = Vec::with_capacity(n);
                for _ in 0..n {
                    schemas.push(r.short_str("schema id")?.to_string());
                }
                Frame::Hello(Hello {
                    min_version,
                    max_version,
                    role,
                    features,
                    transports,
                    classes,
                    max_frame,
                    heartbeat_ms,
                    schemas,
                })
            }
            FrameType::Welcome => Frame::Welcome(Welcome {
                version: r.u16("version")?,
                role: Role::from_u8(r.u8("role")?)?,
                features: r.u32("features")?,
                session_id: r.u64("session id")?,
                relay_id: RelayId(r.array("relay id")?),
                agent_id: AgentId(r.array("agent id")?),
                heartbeat_ms: r.u32("heartbeat")?,
                max_frame: r.u32("max frame")?,
                rate_frames: r.u32("frame rate")?,
                rate_bytes: r.u64("byte rate")?,
                max_ttl_ms: r.u64("max ttl")?,
                classes: r.u8("classes")?,
                key_rotation_s: r.u32("key rotation")?,
                deliver_window: r.u32("deliver window")?,
                deliver_window_bytes: r.u32("deliver window bytes")?,
                send_window: r.u32("send window")?,
            }),
            FrameType::Ack => {
                let n = r.u16("ack count")? as usize;
                if n == 0 || n > MAX_ACK_BATCH {
                    return Err(WireError::Invalid("ack count"));
                }
                let start = r.pos();
                r.take(n * 16, "ack ids")?;
                Frame::Ack(AckBatch {
                    ids: frame.slice(start..start + n * 16),
                })
            }
            FrameType::Nack => Frame::Nack(Nack {
                message_id: MessageId(r.array("message id")?),
                code: r.u16("reason")?,
                text: r.short_str("reason text")?.to_string(),
            }),
            FrameType::Ping => Frame::Ping(Ping {
                timestamp_us: r.u64("timestamp")?,
            }),
            FrameType::Pong => Frame::Pong(Pong {
                echo_us: r.u64("echo timestamp")?,
                responder_us: r.u64("responder timestamp")?,
            }),
            FrameType::GoingAway => Frame::GoingAway(GoingAway {
                code: r.u16("reason")?,
                drain_ms: r.u32("drain time")?,
                redirect: r.short_str("redirect")?.to_string(),
            }),
            FrameType::Close => Frame::Close(Close {
                code: r.u16("reason")?,
                text: r.short_str("reason text")?.to_string(),
            }),
            FrameType::Receipt => Frame::Receipt(Receipt {
                message_id: MessageId(r.array("message id")?),
                status: ReceiptStatus::from_u8(r.u8("receipt status")?)?,
                at_ms: r.u64("receipt time")?,
            }),
            FrameType::LinkHello => Frame::LinkHello(LinkHello {
                min_version: r.u16("min version")?,
                max_version: r.u16("max version")?,
                relay_id: RelayId(r.array("relay id")?),
                generation: r.u64("generation")?,
                heartbeat_ms: r.u32("heartbeat")?,
                max_frame: r.u32("max frame")?,
                window: r.u32("window")?,
                window_bytes: r.u32("window bytes")?,
            }),
            FrameType::LinkAck => {
                let n = r.u16("link ack count")? as usize;
                if n == 0 || n > MAX_LINK_ACK_BATCH {
                    return Err(WireError::Invalid("link ack count"));
                }
                let start = r.pos();
                r.take(n * 8, "link sequence numbers")?;
                Frame::LinkAck(LinkAck {
                    seqs: frame.slice(start..start + n * 8),
                })
            }
            FrameType::LinkNack => Frame::LinkNack(LinkNack {
                seq: r.u64("link sequence number")?,
                code: r.u16("reason")?,
                text: r.short_str("reason text")?.to_string(),
            }),
            FrameType::Presence => {
                let n = r.u16("presence count")? as usize;
                if n == 0 || n > MAX_PRESENCE_BATCH {
                    return Err(WireError::Invalid("presence count"));
                }
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    entries.push(PresenceEntry {
                        agent: AgentId(r.array("agent id")?),
                        relay: RelayId(r.array("relay id")?),
                        stamp_ms: r.u64("presence stamp")?,
                    });
                }
                Frame::Presence(Presence { entries })
            }
            FrameType::LinkReceipt => Frame::LinkReceipt(LinkReceipt {
                to: AgentId(r.array("agent id")?),
                receipt: Receipt {
                    message_id: MessageId(r.array("message id")?),
                    status: ReceiptStatus::from_u8(r.u8("receipt status")?)?,
                    at_ms: r.u64("receipt time")?,
                },
                hops_left: r.u8("hops left")?,
            }),
            FrameType::Publish => {
                let request_id = r.u32("request id")?;
                let start = r.pos();
                let n = r.remaining();
                r.take(n, "bundle")?;
                Frame::Publish(Publish {
                    request_id,
                    bundle: frame.slice(start..start + n),
                })
            }
            FrameType::Lookup => {
                let request_id = r.u32("request id")?;
                let key = match r.u8("lookup kind")? {
                    0 => LookupKey::Agent(AgentId(r.array("agent id")?)),
                    1 => LookupKey::Schema {
                        schema: r.short_str("schema")?.to_string(),
                        after: AgentId(r.array("after")?),
                    },
                    _ => return Err(WireError::Invalid("lookup kind")),
                };
                Frame::Lookup(Lookup {
                    request_id,
                    key,
                    limit: r.u16("limit")?,
                })
            }
            FrameType::Directory => {
                let request_id = r.u32("request id")?;
                let code = r.u16("reason")?;
                let more = match r.u8("more")? {
                    0 => false,
                    1 => true,
                    _ => return Err(WireError::Invalid("more")),
                };
                let n = r.u16("bundle count")? as usize;
                if n > MAX_DIRECTORY_BATCH {
                    return Err(WireError::Invalid("bundle count"));
                }
                let mut bundles = Vec::with_capacity(n);
                for _ in 0..n {
                    let len = r.u16("bundle length")? as usize;
                    let start = r.pos();
                    r.take(len, "bundle")?;
                    bundles.push(frame.slice(start..start + len));
                }
                Frame::Directory(DirectoryAnswer {
                    request_id,
                    code,
                    more,
                    bundles,
                })
            }
            FrameType::Envelope => unreachable!("handled above"),
        };
        r.finish()?;
        Ok(out)
    }

    /// Appends the encoded frame, length prefix included, to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        if let Frame::Envelope(e) = self {
            e.encode(dst);
            return;
        }
        let start = dst.len();
        dst.put_u32(0);
        match self {
            Frame::Hello(h) => {
                dst.put_u8(FrameType::Hello as u8);
                dst.put_u16(h.min_version);
                dst.put_u16(h.max_version);
                if h.max_version < PROTOCOL_VERSION_MIN {
                    // An older version's HELLO is not ours to write beyond the range.
                    let len = (dst.len() - start - 4) as u32;
                    dst[start..start + 4].copy_from_slice(&len.to_be_bytes());
                    return;
                }
                dst.put_u8(h.role as u8);
                dst.put_u32(h.features);
                dst.put_u8(h.transports);
                dst.put_u8(h.classes);
                dst.put_u32(h.max_frame);
                dst.put_u32(h.heartbeat_ms);
                let n = h.schemas.len().min(MAX_HELLO_SCHEMAS);
                dst.put_u8(n as u8);
                for s in &h.schemas[..n] {
                    put_short_str(dst, s);
                }
            }
            Frame::Welcome(w) => {
                dst.put_u8(FrameType::Welcome as u8);
                dst.put_u16(w.version);
                dst.put_u8(w.role as u8);
                dst.put_u32(w.features);
                dst.put_u64(w.session_id);
                dst.put_slice(&w.relay_id.0);
                dst.put_slice(&w.agent_id.0);
                dst.put_u32(w.heartbeat_ms);
                dst.put_u32(w.max_frame);
                dst.put_u32(w.rate_frames);
                dst.put_u64(w.rate_bytes);
                dst.put_u64(w.max_ttl_ms);
                dst.put_u8(w.classes);
                dst.put_u32(w.key_rotation_s);
                dst.put_u32(w.deliver_window);
                dst.put_u32(w.deliver_window_bytes);
                dst.put_u32(w.send_window);
            }
            Frame::Ack(a) => {
                dst.put_u8(FrameType::Ack as u8);
                dst.put_u16(a.len() as u16);
                dst.put_slice(&a.ids);
            }
            Frame::Nack(n) => {
                dst.put_u8(FrameType::Nack as u8);
                dst.put_slice(&n.message_id.0);
                dst.put_u16(n.code);
                put_short_str(dst, &n.text);
            }
            Frame::Ping(p) => {
                dst.put_u8(FrameType::Ping as u8);
                dst.put_u64(p.timestamp_us);
            }
            Frame::Pong(p) => {
                dst.put_u8(FrameType::Pong as u8);
                dst.put_u64(p.echo_us);
                dst.put_u64(p.responder_us);
            }
            Frame::GoingAway(g) => {
                dst.put_u8(FrameType::GoingAway as u8);
                dst.put_u16(g.code);
                dst.put_u32(g.drain_ms);
                put_short_str(dst, &g.redirect);
            }
            Frame::Close(c) => {
                dst.put_u8(FrameType::Close as u8);
                dst.put_u16(c.code);
                put_short_str(dst, &c.text);
            }
            Frame::Receipt(r) => {
                dst.put_u8(FrameType::Receipt as u8);
                dst.put_slice(&r.message_id.0);
                dst.put_u8(r.status as u8);
                dst.put_u64(r.at_ms);
            }
            Frame::LinkHello(h) => {
                dst.put_u8(FrameType::LinkHello as u8);
                dst.put_u16(h.min_version);
                dst.put_u16(h.max_version);
                dst.put_slice(&h.relay_id.0);
                dst.put_u64(h.generation);
                dst.put_u32(h.heartbeat_ms);
                dst.put_u32(h.max_frame);
                dst.put_u32(h.window);
                dst.put_u32(h.window_bytes);
            }
            Frame::LinkAck(a) => {
                dst.put_u8(FrameType::LinkAck as u8);
                dst.put_u16(a.len() as u16);
                dst.put_slice(&a.seqs);
            }
            Frame::LinkNack(n) => {
                dst.put_u8(FrameType::LinkNack as u8);
                dst.put_u64(n.seq);
                dst.put_u16(n.code);
                put_short_str(dst, &n.text);
            }
            Frame::Presence(p) => {
                dst.put_u8(FrameType::Presence as u8);
                let n = p.entries.len().min(MAX_PRESENCE_BATCH);
                dst.put_u16(n as u16);
                for e in &p.entries[..n] {
                    dst.put_slice(&e.agent.0);
                    dst.put_slice(&e.relay.0);
                    dst.put_u64(e.stamp_ms);
                }
            }
            Frame::LinkReceipt(l) => {
                dst.put_u8(FrameType::LinkReceipt as u8);
                dst.put_slice(&l.to.0);
                dst.put_slice(&l.receipt.message_id.0);
                dst.put_u8(l.receipt.status as u8);
                dst.put_u64(l.receipt.at_ms);
                dst.put_u8(l.hops_left);
            }
            Frame::Publish(p) => {
                dst.put_u8(FrameType::Publish as u8);
                dst.put_u32(p.request_id);
                dst.put_slice(&p.bundle);
            }
            Frame::Lookup(l) => {
                dst.put_u8(FrameType::Lookup as u8);
                dst.put_u32(l.request_id);
                match &l.key {
                    LookupKey::Agent(a) => {
                        dst.put_u8(0);
                        dst.put_slice(&a.0);
                    }
                    LookupKey::Schema { schema, after } => {
                        dst.put_u8(1);
                        put_short_str(dst, schema);
                        dst.put_slice(&after.0);
                    }
                }
                dst.put_u16(l.limit);
            }
            Frame::Directory(d) => {
                dst.put_u8(FrameType::Directory as u8);
                dst.put_u32(d.request_id);
                dst.put_u16(d.code);
                dst.put_u8(d.more as u8);
                let bundles: Vec<_> = d
                    .bundles
                    .iter()
                    .filter(|b| b.len() <= u16::MAX as usize)
                    .take(MAX_DIRECTORY_BATCH)
                    .collect();
                dst.put_u16(bundles.len() as u16);
                for b in bundles {
                    dst.put_u16(b.len() as u16);
                    dst.put_slice(b);
                }
            }
            Frame::Envelope(_) => unreachable!("handled above"),
        }
        let len = (dst.len() - start - 4) as u32;
        dst[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// The encoded frame as one buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::new();
        self.encode(&mut b);
        b.freeze()
    }
}

/// Writes a `u8`-length string, cut at 255 bytes on a character boundary.
fn put_short_str(dst: &mut BytesMut, s: &str) {
    let mut end = s.len().min(255);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    dst.put_u8(end as u8);
    dst.put_slice(&s.as_bytes()[..end]);
}

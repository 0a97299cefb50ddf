//! Wire codec: link frames and the envelope, byte for byte as `docs/PROTOCOL.md` specifies.
//!
//! Pure: no I/O, no clock. Bytes come in from a link as a `BytesMut`; [`FrameDecoder::decode`]
//! splits complete frames off it as shared `Bytes` and parses them into typed [`Frame`]s or a typed
//! [`WireError`]. The envelope's immutable part stays one `Bytes` slice of the read buffer from
//! then on: relays read its fields in place ([`Envelope::message_id`] and friends: no copies, no
//! allocation) and
//! write it out again behind a freshly encoded routing part ([`Envelope::encode_head`]).
//!
//! Decoding is total: every byte string yields a value or an error, never a panic, and no length
//! read from the peer is used to allocate before it was checked against the configured maximum.

mod envelope;
mod frame;
pub(crate) mod reader;

pub use envelope::{
    flags, Constraints, Destination, Envelope, EnvelopeBuilder, Extension, Jurisdiction,
    RoutingPart, EXTENSION_CRITICAL, MAX_CONSTRAINT_LIST, MAX_EXTENSIONS_LEN, MAX_MULTIPATH,
    MAX_PATH_LEN,
};
pub use frame::{
    AckBatch, Close, DirectoryAnswer, Frame, FrameDecoder, FrameType, GoingAway, Hello, LinkAck,
    LinkHello, LinkNack, LinkReceipt, Lookup, LookupKey, Nack, Ping, Pong, Presence, PresenceEntry,
    Publish, Receipt, ReceiptStatus, Welcome, FRAME_HEADER_LEN, MAX_ACK_BATCH, MAX_DIRECTORY_BATCH,
    MAX_HELLO_SCHEMAS, MAX_LINK_ACK_BATCH, MAX_PRESENCE_BATCH,
};

use std::fmt;

/// Lowest protocol version this build speaks.
pub const PROTOCOL_VERSION_MIN: u16 = 2;
/// Highest protocol version this build speaks.
pub const PROTOCOL_VERSION_MAX: u16 = 2;
/// Envelope format version written in the immutable part.
pub const ENVELOPE_VERSION: u8 = 2;

/// Feature bits of HELLO and WELCOME (`docs/PROTOCOL.md` §2, HELLO).
pub mod features {
    /// The peer understands RECEIPT frames.
    pub const RECEIPTS: u32 = 1 << 0;
    /// The agent's windows (the session's and each destination's) are deep enough (1,024
    /// envelopes or more) that the relay may let its answers to it wait for company:
    /// [`ACK_HOLD_MS`] at each of the relay's cores the answer crosses (about 2 ms at most,
    /// plus timer rounding), or until [`ACK_HOLD_MAX`] wait. Granted only by a relay whose
    /// send window is that deep too.
    pub const ACK_DELAY: u32 = 1 << 1;
    /// Every bit this version defines; the others are sent as 0 and ignored.
    pub const KNOWN: u32 = RECEIPTS | ACK_DELAY;

    /// Longest the relay holds an ACK to an agent that offered [`ACK_DELAY`], milliseconds.
    pub const ACK_HOLD_MS: u64 = 1;
    /// Most ACKs the relay holds for such an agent before it writes them at once.
    pub const ACK_HOLD_MAX: usize = 256;
    /// Smallest window an agent offering [`ACK_DELAY`] keeps: four times [`ACK_HOLD_MAX`].
    pub const ACK_DELAY_MIN_WINDOW: u32 = 1024;
}

/// What the peer on a link is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Role {
    /// An agent (the agent port).
    #[default]
    Agent = 0,
    /// Another relay opening a relay-to-relay link (the link port).
    RelayLink = 1,
}

impl Role {
    /// Decodes the wire byte.
    pub fn from_u8(v: u8) -> Result<Self, WireError> {
        match v {
            0 => Ok(Self::Agent),
            1 => Ok(Self::RelayLink),
            _ => Err(WireError::Invalid("role")),
        }
    }
}

/// Errors from decoding bytes received from a peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The length prefix announces a frame above the negotiated maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    FrameTooLarge { len: usize, max: usize },
    /// A length prefix of zero: every frame has at least a type byte.
    #[error("empty frame")]
    EmptyFrame,
    /// The type byte names no known frame kind.
    #[error("unknown frame type {0:#04x}")]
    UnknownFrameType(u8),
    /// The body ended before a field it announced.
    #[error("truncated {0}")]
    Truncated(&'static str),
    /// Bytes remained after the last field of a body.
    #[error("{0} trailing bytes")]
    TrailingBytes(usize),
    /// A field holds a value outside its domain.
    #[error("invalid {0}")]
    Invalid(&'static str),
}

/// A 32-byte Ed25519 public key naming an agent.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct AgentId(pub [u8; 32]);

impl std::hash::Hash for AgentId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // Two 128-bit writes instead of a length-prefixed byte slice (the per-core maps are
        // keyed by agent id on the per-envelope path).
        let (a, b) = self.0.split_at(16);
        state.write_u128(u128::from_ne_bytes(a.try_into().unwrap_or_default()));
        state.write_u128(u128::from_ne_bytes(b.try_into().unwrap_or_default()));
    }
}

/// A 32-byte Ed25519 public key naming a relay.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct RelayId(pub [u8; 32]);

/// A 128-bit message id chosen by the source agent.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct MessageId(pub [u8; 16]);

impl std::hash::Hash for MessageId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // One 128-bit write instead of a length-prefixed byte slice.
        state.write_u128(u128::from_ne_bytes(self.0));
    }
}

macro_rules! hex_id {
    ($t:ty, $short:expr) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                for b in &self.0[..$short] {
                    write!(f, "{b:02x}")?;
                }
                Ok(())
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                for b in &self.0 {
                    write!(f, "{b:02x}")?;
                }
                Ok(())
            }
        }
    };
}
hex_id!(AgentId, 8);
hex_id!(RelayId, 8);
hex_id!(MessageId, 16);

impl RelayId {
    /// Full lowercase hex form, as in fleet files.
    pub fn to_hex(&self) -> String {
        AgentId(self.0).to_hex()
    }

    /// Parses the 64-character hex form.
    pub fn from_hex(s: &str) -> Option<Self> {
        AgentId::from_hex(s).map(|a| RelayId(a.0))
    }
}

impl AgentId {
    /// Full lowercase hex form, as used in configuration allow and deny lists.
    pub fn to_hex(&self) -> String {
        format!("{self:?}")
    }

    /// Parses the 64-character hex form.
    pub fn from_hex(s: &str) -> Option<Self> {
        let s = s.trim();
        if s.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
            let hi = (chunk[0] as char).to_digit(16)?;
            let lo = (chunk[1] as char).to_digit(16)?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Some(AgentId(out))
    }
}

impl MessageId {
    /// Builds an id from a 128-bit integer (big-endian), handy for sequence-numbered senders.
    pub fn from_u128(v: u128) -> Self {
        MessageId(v.to_be_bytes())
    }
    /// The id as a 128-bit integer.
    pub fn as_u128(&self) -> u128 {
        u128::from_be_bytes(self.0)
    }
}

/// Delivery guarantee an envelope asks for (DESIGN §6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DeliveryClass {
    /// May be dropped under pressure; drops are counted.
    BestEffort = 0,
    /// Held in memory until the next hop ACKs; redelivered on reconnect.
    AtLeastOnce = 1,
    /// Written to the store and fsync'ed before the hop ACK.
    Durable = 2,
}

impl DeliveryClass {
    /// All classes, in wire order.
    pub const ALL: [DeliveryClass; 3] = [Self::BestEffort, Self::AtLeastOnce, Self::Durable];

    /// Decodes the wire byte.
    pub fn from_u8(v: u8) -> Result<Self, WireError> {
        match v {
            0 => Ok(Self::BestEffort),
            1 => Ok(Self::AtLeastOnce),
            2 => Ok(Self::Durable),
            _ => Err(WireError::Invalid("delivery class")),
        }
    }
    /// The metrics label for this class.
    pub fn label(self) -> &'static str {
        match self {
            Self::BestEffort => "best_effort",
            Self::AtLeastOnce => "at_least_once",
            Self::Durable => "durable",
        }
    }
    /// The bit this class occupies in a class set.
    pub fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// Path preference an envelope asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PathClass {
    LowLatency = 0,
    HighThroughput = 1,
    LowCost = 2,
}

impl PathClass {
    /// Decodes the wire byte.
    pub fn from_u8(v: u8) -> Result<Self, WireError> {
        match v {
            0 => Ok(Self::LowLatency),
            1 => Ok(Self::HighThroughput),
            2 => Ok(Self::LowCost),
            _ => Err(WireError::Invalid("path class")),
        }
    }
}

/// Why a relay refuses an envelope (NACK) or ends a session (CLOSE). Codes are stable on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
#[non_exhaustive]
pub enum Reason {
    /// Normal end of a session.
    Normal = 0,
    /// Bytes that do not decode as a frame.
    ProtocolError = 1,
    /// A frame length above the negotiated maximum.
    FrameTooLarge = 2,
    /// The peer stopped or hung up in the middle of a frame.
    TruncatedFrame = 3,
    /// A frame not allowed in the session's state (for example ENVELOPE before HELLO).
    UnexpectedFrame = 4,
    /// HELLO's version range shares no version with the relay.
    NoCommonVersion = 5,
    /// The envelope's hop limit is exhausted.
    HopLimitExceeded = 6,
    /// The envelope's absolute expiry has passed.
    Expired = 7,
    /// The envelope's lifetime exceeds the contract's maximum TTL.
    TtlTooLong = 8,
    /// The delivery class is not allowed by the session contract.
    ClassNotAllowed = 9,
    /// The destination agent is not connected (and the relay does not store).
    DestinationUnavailable = 10,
    /// The destination's queue is full; retry later.
    QueueFull = 11,
    /// The envelope's source is not the session's authenticated agent.
    SourceMismatch = 12,
    /// A newer session for the same agent id took over.
    SessionReplaced = 13,
    /// No frame (not even PONG) within the heartbeat deadline.
    HeartbeatTimeout = 14,
    /// HELLO did not arrive within the handshake timeout.
    HandshakeTimeout = 15,
    /// The relay is shutting down.
    ShuttingDown = 16,
    /// The agent is not admitted (deny list, or not on the allow list).
    NotAdmitted = 17,
    /// The core's connection limit is reached.
    TooManyConnections = 18,
    /// The envelope breaks the relay's policy.
    PolicyViolation = 19,
    /// The peer kept sending above its rate limit.
    RateLimited = 20,
    /// The same message id was seen recently.
    Duplicate = 21,
    /// No envelope or ACK from the agent within the configured idle timeout.
    IdleTimeout = 22,
    /// The agent stopped reading: one socket write did not complete within the write timeout.
    WriteTimeout = 23,
    /// The envelope is larger than the destination agent's negotiated `max_frame`.
    TooLargeForDestination = 24,
    /// The relay is over its memory budget; retry later or elsewhere.
    Overloaded = 25,
    /// The source already has as much held undelivered on this relay as it may; retry later.
    QuotaExceeded = 26,
    /// More PINGs than a few per heartbeat interval.
    PingFlood = 27,
    /// The envelope carries a critical extension the relay does not know.
    UnknownCriticalExtension = 28,
    /// The routing part breaks its rules (an agent filled in what only relays write).
    InvalidRouting = 29,
    /// The relay cannot store durable envelopes now (disk full, I/O error or a stalled disk);
    /// retry later or elsewhere. Other classes are not affected.
    StoreUnavailable = 30,
    /// No path of relays meets the envelope's constraints (jurisdictions, trust, relays to
    /// avoid) and the fleet's thresholds.
    NoCompliantPath = 31,
    /// A signed object (a directory key bundle) whose signature does not verify against the
    /// agent id it names.
    BadSignature = 32,
    /// The relay's directory holds as many entries as it may; retry later.
    DirectoryFull = 33,
    /// A directory key bundle that does not decode, or names another agent than the session's.
    InvalidBundle = 34,
}

impl Reason {
    /// Decodes the wire code; unknown codes from newer peers map to `None`.
    pub fn from_u16(v: u16) -> Option<Self> {
        use Reason::*;
        Some(match v {
            0 => Normal,
            1 => ProtocolError,
            2 => FrameTooLarge,
            3 => TruncatedFrame,
            4 => UnexpectedFrame,
            5 => NoCommonVersion,
            6 => HopLimitExceeded,
            7 => Expired,
            8 => TtlTooLong,
            9 => ClassNotAllowed,
            10 => DestinationUnavailable,
            11 => QueueFull,
            12 => SourceMismatch,
            13 => SessionReplaced,
            14 => HeartbeatTimeout,
            15 => HandshakeTimeout,
            16 => ShuttingDown,
            17 => NotAdmitted,
            18 => TooManyConnections,
            19 => PolicyViolation,
            20 => RateLimited,
            21 => Duplicate,
            22 => IdleTimeout,
            23 => WriteTimeout,
            24 => TooLargeForDestination,
            25 => Overloaded,
            26 => QuotaExceeded,
            27 => PingFlood,
            28 => UnknownCriticalExtension,
            29 => InvalidRouting,
            30 => StoreUnavailable,
            31 => NoCompliantPath,
            32 => BadSignature,
            33 => DirectoryFull,
            34 => InvalidBundle,
            _ => return None,
        })
    }

    /// Stable snake_case label, used in metrics and logs.
    pub fn label(self) -> &'static str {
        use Reason::*;
        match self {
            Normal => "normal",
            ProtocolError => "protocol_error",
            FrameTooLarge => "frame_too_large",
            TruncatedFrame => "truncated_frame",
            UnexpectedFrame => "unexpected_frame",
            NoCommonVersion => "no_common_version",
            HopLimitExceeded => "hop_limit_exceeded",
            Expired => "expired",
            TtlTooLong => "ttl_too_long",
            ClassNotAllowed => "class_not_allowed",
            DestinationUnavailable => "destination_unavailable",
            QueueFull => "queue_full",
            SourceMismatch => "source_mismatch",
            SessionReplaced => "session_replaced",
            HeartbeatTimeout => "heartbeat_timeout",
            HandshakeTimeout => "handshake_timeout",
            ShuttingDown => "shutting_down",
            NotAdmitted => "not_admitted",
            TooManyConnections => "too_many_connections",
            PolicyViolation => "policy_violation",
            RateLimited => "rate_limited",
            Duplicate => "duplicate",
            IdleTimeout => "idle_timeout",
            WriteTimeout => "write_timeout",
            TooLargeForDestination => "too_large_for_destination",
            Overloaded => "overloaded",
            QuotaExceeded => "quota_exceeded",
            PingFlood => "ping_flood",
            UnknownCriticalExtension => "unknown_critical_extension",
            InvalidRouting => "invalid_routing",
            StoreUnavailable => "store_unavailable",
            NoCompliantPath => "no_compliant_path",
            BadSignature => "bad_signature",
            DirectoryFull => "directory_full",
            InvalidBundle => "invalid_bundle",
        }
    }

    /// Whether a sender may retry the same envelope later (on this or another relay).
    pub fn retryable(self) -> bool {
        matches!(
            self,
            Reason::DestinationUnavailable
                | Reason::QueueFull
                | Reason::ShuttingDown
                | Reason::RateLimited
                | Reason::Overloaded
                | Reason::QuotaExceeded
                | Reason::StoreUnavailable
                | Reason::DirectoryFull
        )
    }

    /// Every reason, for documentation and metric pre-registration.
    pub const ALL: [Reason; 35] = [
        Reason::Normal,
        Reason::ProtocolError,
        Reason::FrameTooLarge,
        Reason::TruncatedFrame,
        Reason::UnexpectedFrame,
        Reason::NoCommonVersion,
        Reason::HopLimitExceeded,
        Reason::Expired,
        Reason::TtlTooLong,
        Reason::ClassNotAllowed,
        Reason::DestinationUnavailable,
        Reason::QueueFull,
        Reason::SourceMismatch,
        Reason::SessionReplaced,
        Reason::HeartbeatTimeout,
        Reason::HandshakeTimeout,
        Reason::ShuttingDown,
        Reason::NotAdmitted,
        Reason::TooManyConnections,
        Reason::PolicyViolation,
        Reason::RateLimited,
        Reason::Duplicate,
        Reason::IdleTimeout,
        Reason::WriteTimeout,
        Reason::TooLargeForDestination,
        Reason::Overloaded,
        Reason::QuotaExceeded,
        Reason::PingFlood,
        Reason::UnknownCriticalExtension,
        Reason::InvalidRouting,
        Reason::StoreUnavailable,
        Reason::NoCompliantPath,
        Reason::BadSignature,
        Reason::DirectoryFull,
        Reason::InvalidBundle,
    ];
}

impl From<&WireError> for Reason {
    fn from(e: &WireError) -> Self {
        match e {
            WireError::FrameTooLarge { .. } => Reason::FrameTooLarge,
            _ => Reason::ProtocolError,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

#[cfg(test)]
mod tests;

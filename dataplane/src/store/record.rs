//! The store's on-disk format: segment headers and records, byte for byte as
//! `docs/STORE.md` says. Pure: bytes in, records out.
//!
//! ```text
//! segment  := header(32) record* zero-fill
//! header   := magic "OMSTORE1"(8) format u32 core u16 reserved u16 number u64 created_ms u64
//! record   := len u32 | crc32c u32 | kind u8 | body[len]      crc over kind and body
//! kind 1   := seq u64 | expires_ms u64 | destination [32] | source [32] | message_id [16]
//!             | envelope (the ENVELOPE frame body: routing part and immutable part)
//! kind 2   := seq u64 *                                       envelopes released
//! kind 3   := source [32] | epoch u64 | rank u64 | max u64 | bits u64[64]  a duplicate window
//! ```
//!
//! Integers are big-endian. Segments are preallocated with zeros, so a record header of nine
//! zero bytes is the clean end of the written part.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::wire::{AgentId, Envelope, MessageId};

/// First bytes of every segment file.
pub const MAGIC: [u8; 8] = *b"OMSTORE1";
/// Version of the record layout.
pub const FORMAT: u32 = 1;
/// Length of a segment header.
pub const SEGMENT_HEADER_LEN: usize = 32;
/// Length of a record header (length, checksum, kind).
pub const RECORD_HEADER_LEN: usize = 9;
/// Fixed part of an envelope record's body, before the envelope.
pub const ENVELOPE_FIXED_LEN: usize = 8 + 8 + 32 + 32 + 16;
/// Longest record body: the fixed part and a frame body of up to 16 MiB (the relay's frames
/// are at most 1 MiB; the rest is room, not a promise).
pub const MAX_BODY: usize = ENVELOPE_FIXED_LEN + (16 << 20);

const KIND_ENVELOPE: u8 = 1;
const KIND_RELEASED: u8 = 2;
const KIND_WINDOW: u8 = 3;

/// Words of a duplicate window's bitmap (one bit per counter, 4,096 counters).
pub const WINDOW_WORDS: usize = 64;
/// Body length of a window record.
pub const WINDOW_BODY_LEN: usize = 32 + 8 + 8 + 8 + 8 * WINDOW_WORDS;

/// A segment's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The core that wrote the segment.
    pub core: u16,
    /// The segment's number, increasing per core.
    pub number: u64,
    /// When the segment was created (Unix milliseconds).
    pub created_ms: u64,
}

impl SegmentHeader {
    /// The header's bytes.
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut b = [0u8; SEGMENT_HEADER_LEN];
        b[..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&FORMAT.to_be_bytes());
        b[12..14].copy_from_slice(&self.core.to_be_bytes());
        b[16..24].copy_from_slice(&self.number.to_be_bytes());
        b[24..32].copy_from_slice(&self.created_ms.to_be_bytes());
        b
    }

    /// Reads a header; `None` if the bytes are not a segment of this format.
    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() < SEGMENT_HEADER_LEN || b[..8] != MAGIC {
            return None;
        }
        let mut r = &b[8..SEGMENT_HEADER_LEN];
        if r.get_u32() != FORMAT {
            return None;
        }
        let core = r.get_u16();
        r.advance(2);
        Some(SegmentHeader {
            core,
            number: r.get_u64(),
            created_ms: r.get_u64(),
        })
    }
}

/// An envelope as the store keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredEnvelope {
    /// The store's sequence number of the record, unique in the store.
    pub seq: u64,
    pub expires_ms: u64,
    pub destination: AgentId,
    pub source: AgentId,
    pub message_id: MessageId,
    /// The ENVELOPE frame body (routing part and immutable part), as forwarded.
    pub body: Bytes,
}

impl StoredEnvelope {
    /// The stored form of `env` under `seq` (a copy of its bytes, as recovery reads it back);
    /// `None` if it has no single destination agent. The log appends envelopes without it
    /// ([`encode_envelope_of`]).
    pub fn of(seq: u64, env: &Envelope) -> Option<Self> {
        let mut rec = BytesMut::with_capacity(envelope_record_len(env));
        if !encode_envelope_of(seq, env, &mut rec) {
            return None;
        }
        let Some(Record::Envelope(e)) = read_record(&rec.freeze(), 0).ok().flatten().map(|r| r.0)
        else {
            return None;
        };
        Some(e)
    }

    /// The envelope again (validated as on the wire).
    pub fn envelope(&self) -> Result<Envelope, crate::wire::WireError> {
        Envelope::decode(self.body.clone())
    }

    /// Bytes of the encoded record, header included.
    pub fn record_len(&self) -> usize {
        RECORD_HEADER_LEN + ENVELOPE_FIXED_LEN + self.body.len()
    }
}

/// The duplicate window of one (source, epoch) (`docs/PROTOCOL.md`, duplicates): the highest
/// counter accepted and, for the 4,096 counters up to it, whether each was accepted (bit
/// `counter % 4096`). A start writes the windows it recovered so that the next one knows them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowRecord {
    pub source: AgentId,
    pub epoch: u64,
    /// The highest store sequence number of an envelope that marked it: how recently it was
    /// used (sequence numbers only grow, across restarts too).
    pub rank: u64,
    pub max: u64,
    pub bits: Box<[u64; WINDOW_WORDS]>,
}

/// One record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// An envelope taken into the store.
    Envelope(StoredEnvelope),
    /// Envelopes that left the store (delivered and ACKed, or expired), by sequence number.
    Released(Vec<u64>),
    /// A duplicate window carried over a restart.
    Window(WindowRecord),
}

impl Record {
    /// Bytes of the encoded record, header included.
    pub fn encoded_len(&self) -> usize {
        match self {
            Record::Envelope(e) => e.record_len(),
            Record::Released(seqs) => RECORD_HEADER_LEN + 8 * seqs.len(),
            Record::Window(_) => RECORD_HEADER_LEN + WINDOW_BODY_LEN,
        }
    }

    /// Appends the encoded record to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        match self {
            Record::Envelope(e) => encode_envelope(e, dst),
            Record::Released(seqs) => encode_released(seqs, dst),
            Record::Window(w) => encode_window(w, dst),
        }
    }
}

/// Appends a window record to `dst`.
pub fn encode_window(w: &WindowRecord, dst: &mut BytesMut) {
    dst.reserve(RECORD_HEADER_LEN + WINDOW_BODY_LEN);
    let at = dst.len();
    dst.put_u32(WINDOW_BODY_LEN as u32);
    dst.put_u32(0);
    dst.put_u8(KIND_WINDOW);
    dst.extend_from_slice(&w.source.0);
    dst.put_u64(w.epoch);
    dst.put_u64(w.rank);
    dst.put_u64(w.max);
    for word in w.bits.iter() {
        dst.put_u64(*word);
    }
    let crc = crc32c::crc32c(&dst[at + 8..]);
    dst[at + 4..at + 8].copy_from_slice(&crc.to_be_bytes());
}

/// Appends an envelope record to `dst`.
pub fn encode_envelope(e: &StoredEnvelope, dst: &mut BytesMut) {
    let fixed = (e.seq, e.expires_ms, e.destination, e.source, e.message_id);
    put_envelope(dst, fixed, e.body.len(), |d| d.extend_from_slice(&e.body));
}

/// Appends the record of `env` under `seq` to `dst`, writing its routing and immutable parts
/// straight into `dst` (the one copy of the payload on the way to disk). `false`, and nothing
/// written, if it has no single destination agent.
pub fn encode_envelope_of(seq: u64, env: &Envelope, dst: &mut BytesMut) -> bool {
    let crate::wire::Destination::Agent(destination) = env.destination() else {
        return false;
    };
    let fixed = (
        seq,
        env.expires_ms(),
        destination,
        env.source(),
        env.message_id(),
    );
    let body = env.routing.encoded_len() + env.immutable.len();
    put_envelope(dst, fixed, body, |d| {
        env.routing.encode(d);
        d.extend_from_slice(&env.immutable);
    });
    true
}

/// Bytes of the record of `env`, header included.
pub fn envelope_record_len(env: &Envelope) -> usize {
    RECORD_HEADER_LEN + ENVELOPE_FIXED_LEN + env.routing.encoded_len() + env.immutable.len()
}

/// Writes an envelope record: header, fixed fields, then `body_len` bytes from `body`; the
/// checksum is computed over what was written.
fn put_envelope(
    dst: &mut BytesMut,
    (seq, expires_ms, destination, source, message_id): (u64, u64, AgentId, AgentId, MessageId),
    body_len: usize,
    body: impl FnOnce(&mut BytesMut),
) {
    let len = ENVELOPE_FIXED_LEN + body_len;
    dst.reserve(RECORD_HEADER_LEN + len);
    let at = dst.len();
    dst.put_u32(len as u32);
    dst.put_u32(0);
    dst.put_u8(KIND_ENVELOPE);
    dst.put_u64(seq);
    dst.put_u64(expires_ms);
    dst.extend_from_slice(&destination.0);
    dst.extend_from_slice(&source.0);
    dst.extend_from_slice(&message_id.0);
    body(dst);
    debug_assert_eq!(dst.len() - at, RECORD_HEADER_LEN + len);
    let crc = crc32c::crc32c(&dst[at + 8..]);
    dst[at + 4..at + 8].copy_from_slice(&crc.to_be_bytes());
}

/// Appends a released record to `dst`.
pub fn encode_released(seqs: &[u64], dst: &mut BytesMut) {
    let len = seqs.len() * 8;
    dst.reserve(RECORD_HEADER_LEN + len);
    let at = dst.len();
    dst.put_u32(len as u32);
    dst.put_u32(0);
    dst.put_u8(KIND_RELEASED);
    for s in seqs {
        dst.put_u64(*s);
    }
    let crc = crc32c::crc32c(&dst[at + 8..]);
    dst[at + 4..at + 8].copy_from_slice(&crc.to_be_bytes());
}

/// Why a scan stopped before the end of a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutReason {
    /// The record runs past the end of the file (a torn write).
    Truncated,
    /// The checksum does not match (a torn or corrupted write).
    Checksum,
    /// A length or kind no writer produces.
    Malformed,
}

impl CutReason {
    /// Label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            CutReason::Truncated => "truncated",
            CutReason::Checksum => "checksum",
            CutReason::Malformed => "malformed",
        }
    }
}

/// Where and why a scan stopped early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cut {
    /// Offset of the first record not kept.
    pub offset: usize,
    pub reason: CutReason,
    /// Bytes after the cut that are not zero (what was lost, at most).
    pub bytes_lost: usize,
}

/// What a segment holds.
#[derive(Debug)]
pub struct Scan {
    pub header: SegmentHeader,
    /// Records in file order, each with its offset.
    pub records: Vec<(usize, Record)>,
    /// Offset just past the last good record: where appending would go on.
    pub end: usize,
    /// Set when the scan stopped at a bad record instead of the zero fill or the file's end.
    pub cut: Option<Cut>,
}

/// Reads every record of a segment file's bytes, stopping at the first bad one. `None`: not a
/// segment (bad magic or format).
/// Reads every record of a segment file's bytes, stopping at the first bad one. `None`: not a
/// segment (bad magic or format).
pub fn scan(data: Bytes) -> Option<Scan> {
    let header = SegmentHeader::decode(&data)?;
    let mut at = SEGMENT_HEADER_LEN;
    let mut records = Vec::new();
    let mut cut = None;
    while at < data.len() {
        match read_record(&data, at) {
            Ok(Some((rec, next))) => {
                records.push((at, rec));
                at = next;
            }
            Ok(None) => break,
            Err(reason) => {
                let bytes_lost = data[at..].iter().filter(|b| **b != 0).count();
                cut = Some(Cut {
                    offset: at,
                    reason,
                    bytes_lost,
                });
                break;
            }
        }
    }
    Some(Scan {
        header,
        records,
        end: at,
        cut,
    })
}

/// The record at `at`: `Ok(None)` at the zero fill (or the end), else the record and the
/// offset after it.
/// Whether `data` is exactly one good envelope record with sequence number `seq` (a record
/// read back for compaction is checked before it is copied).
pub fn is_envelope_record(data: &Bytes, seq: u64) -> bool {
    matches!(
        read_record(data, 0),
        Ok(Some((Record::Envelope(e), end))) if end == data.len() && e.seq == seq
    )
}

/// The record at `at`: `Ok(None)` at the zero fill (or the end), else the record and the
/// offset after it.
fn read_record(data: &Bytes, at: usize) -> Result<Option<(Record, usize)>, CutReason> {
    let rest = &data[at..];
    if rest.len() < RECORD_HEADER_LEN {
        return if rest.iter().all(|b| *b == 0) {
            Ok(None)
        } else {
            Err(CutReason::Truncated)
        };
    }
    if rest[..RECORD_HEADER_LEN].iter().all(|b| *b == 0) {
        return Ok(None);
    }
    let len = u32::from_be_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_be_bytes(rest[4..8].try_into().expect("4 bytes"));
    let kind = rest[8];
    let min = match kind {
        KIND_ENVELOPE => ENVELOPE_FIXED_LEN,
        KIND_RELEASED => 0,
        KIND_WINDOW => WINDOW_BODY_LEN,
        _ => return Err(CutReason::Malformed),
    };
    if len > MAX_BODY
        || len < min
        || (kind == KIND_RELEASED && len % 8 != 0)
        || (kind == KIND_WINDOW && len != WINDOW_BODY_LEN)
    {
        return Err(CutReason::Malformed);
    }
    if rest.len() < RECORD_HEADER_LEN + len {
        return Err(CutReason::Truncated);
    }
    if crc32c::crc32c(&rest[8..RECORD_HEADER_LEN + len]) != crc {
        return Err(CutReason::Checksum);
    }
    let body_at = at + RECORD_HEADER_LEN;
    let mut b = &data[body_at..body_at + len];
    let rec = match kind {
        KIND_ENVELOPE => {
            let seq = b.get_u64();
            let expires_ms = b.get_u64();
            let mut id32 = || {
                let mut v = [0u8; 32];
                b.copy_to_slice(&mut v);
                v
            };
            let destination = AgentId(id32());
            let source = AgentId(id32());
            let mut id = [0u8; 16];
            b.copy_to_slice(&mut id);
            Record::Envelope(StoredEnvelope {
                seq,
                expires_ms,
                destination,
                source,
                message_id: MessageId(id),
                body: data.slice(body_at + ENVELOPE_FIXED_LEN..body_at + len),
            })
        }
        KIND_WINDOW => {
            let mut source = [0u8; 32];
            b.copy_to_slice(&mut source);
            let epoch = b.get_u64();
            let rank = b.get_u64();
            let max = b.get_u64();
            let mut bits = Box::new([0u64; WINDOW_WORDS]);
            for word in bits.iter_mut() {
                *word = b.get_u64();
            }
            Record::Window(WindowRecord {
                source: AgentId(source),
                epoch,
                rank,
                max,
                bits,
            })
        }
        _ => Record::Released((0..len / 8).map(|_| b.get_u64()).collect()),
    };
    Ok(Some((rec, body_at + len)))
}

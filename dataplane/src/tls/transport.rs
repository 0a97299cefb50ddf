//! A TLS connection without its socket: the handshake (rustls, sans-IO), then the project's own
//! record layer, the read buffer and the frames cut from it, and the write buffer records are
//! sealed into. The relay's shard drives one [`Transport`] per connection; the agent library
//! drives the same code over a tokio socket, split into a [`FrameReader`] and a
//! [`RecordSealer`] for its reading and writing tasks ([`Transport::into_split`]).
//!
//! Read side. The caller reads ciphertext straight into [`FrameReader::take_read_buf`]'s buffer.
//! Records are decrypted in place there; a frame that lies inside one record's plaintext is split
//! off as a `Bytes` slice of that buffer (no copy). A frame that straddles two records is joined
//! by moving the smaller side over the 5 to 21+ bytes (tag, padding, next header) between them:
//! that move is the only copy a payload byte can see besides the AEAD open. The buffer holds
//!
//! ```text
//! [ carried plaintext: 0..carried ][ skip: consumed bytes ][ ciphertext not yet opened ... ]
//! ```
//!
//! where the carried plaintext is the start of a frame not yet complete.
//!
//! Write side. [`RecordWriter`] seals records into the write buffer: an envelope's immutable
//! bytes (or a large frame) are encrypted from where they lie (no copy); frame heads, control
//! frames and small envelopes are copied into a small tail that follows them in the same record.
//! Counting the passes: see `docs/ARCHITECTURE.md`.

use std::ops::ControlFlow;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};

use super::handshake::Handshake;
use super::record::{
    Opened, RecordError, RecordLayer, RecordOpener, RecordSealer, MAX_PLAINTEXT, OVERHEAD,
};
use crate::wire::{Envelope, Frame, FrameDecoder, WireError};

/// First size of a connection's read buffer; it doubles (up to the configured maximum) whenever
/// a read fills it, so idle connections stay cheap.
pub const INITIAL_READ_BUFFER: usize = 4096;
/// Bytes from which an envelope's immutable part (or a frame) is sealed where it lies instead of
/// copied into the record's tail.
pub const SEAL_IN_PLACE_FROM: usize = 1024;
/// Room in a write buffer: records for one writer pass.
pub const WRITE_BUFFER: usize = 256 << 10;

/// Why a transport failed. Every one ends the connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// TLS: the handshake or a record failed.
    #[error("tls: {0}")]
    Tls(#[from] RecordError),
    /// A frame that does not decode.
    #[error("wire: {0}")]
    Wire(#[from] WireError),
}

enum Tls {
    Handshaking(Box<Handshake>),
    Open(Box<RecordSealer>),
    Failed,
}

/// TLS, read buffer, framing and write buffer of one connection.
pub struct Transport {
    tls: Tls,
    reader: FrameReader,
    /// Handshake records to send.
    hs_out: Vec<u8>,
    /// The peer's certificate chain (set once the handshake completes).
    pub peer_certificates: Vec<rustls::pki_types::CertificateDer<'static>>,
}

/// The read side of a connection: its read buffer, the records opened in it and the frames cut
/// from them.
pub struct FrameReader {
    /// `None` until the handshake completes.
    opener: Option<Box<RecordOpener>>,
    rx: BytesMut,
    /// Plaintext at the front of `rx` that starts a frame not yet complete.
    carried: usize,
    /// Consumed bytes after the carried plaintext, before the next record.
    skip: usize,
    /// Largest read buffer allowed.
    max_read: usize,
    /// Room each new read buffer gets: starts small, doubles when a read fills it.
    block: usize,
    /// Frame length checks (the largest frame accepted).
    framing: FrameDecoder,
    /// Plaintext bytes of frames read since the counter was last taken.
    frame_bytes: u64,
    /// Records opened that held no frame bytes, since the counter was last taken.
    control_records: u64,
    peer_closed: bool,
}

impl Transport {
    /// The server's side of a connection the relay accepted. `tls` must have
    /// `enable_secret_extraction` set.
    pub fn new(
        tls: Arc<rustls::ServerConfig>,
        max_frame: usize,
        max_read: usize,
    ) -> Result<Self, TransportError> {
        Ok(Self::with(Handshake::server(tls)?, max_frame, max_read))
    }

    /// The client's side of a connection to `name` (a relay dialling a link, an agent dialling
    /// its relay): the ClientHello is ready to write at once. `tls` must have
    /// `enable_secret_extraction` set.
    pub fn client(
        tls: Arc<rustls::ClientConfig>,
        name: rustls::pki_types::ServerName<'static>,
        max_frame: usize,
        max_read: usize,
    ) -> Result<Self, TransportError> {
        let mut t = Self::with(Handshake::client(tls, name)?, max_frame, max_read);
        t.advance_handshake()?;
        Ok(t)
    }

    fn with(hs: Handshake, max_frame: usize, max_read: usize) -> Self {
        Transport {
            tls: Tls::Handshaking(Box::new(hs)),
            reader: FrameReader {
                opener: None,
                rx: BytesMut::new(),
                carried: 0,
                skip: 0,
                max_read: max_read.max(INITIAL_READ_BUFFER),
                block: INITIAL_READ_BUFFER,
                framing: FrameDecoder::new(max_frame),
                frame_bytes: 0,
                control_records: 0,
                peer_closed: false,
            },
            hs_out: Vec::new(),
            peer_certificates: Vec::new(),
        }
    }

    /// Whether the TLS handshake is over.
    pub fn is_open(&self) -> bool {
        matches!(self.tls, Tls::Open(_))
    }

    /// Changes the largest frame accepted (after the session contract).
    pub fn set_max_frame(&mut self, max: usize) {
        self.reader.set_max_frame(max);
    }

    /// See [`FrameReader::take_read_buf`].
    pub fn take_read_buf(&mut self) -> BytesMut {
        self.reader.take_read_buf()
    }

    /// See [`FrameReader::put_read_buf`].
    pub fn put_read_buf(&mut self, rx: BytesMut) {
        self.reader.put_read_buf(rx);
    }

    /// Runs the handshake on what was read. Returns true once it completed (this call or before).
    pub fn advance_handshake(&mut self) -> Result<bool, TransportError> {
        let Tls::Handshaking(hs) = &mut self.tls else {
            return Ok(self.is_open());
        };
        let r = &mut self.reader;
        let n = hs.advance(&mut r.rx, &mut self.hs_out)?;
        r.rx.advance(n);
        if !hs.is_done() {
            return Ok(false);
        }
        let Tls::Handshaking(hs) = std::mem::replace(&mut self.tls, Tls::Failed) else {
            return Ok(false);
        };
        let est = hs.finish()?;
        self.peer_certificates = est.peer_certificates;
        let (opener, sealer) = est.records.split();
        r.opener = Some(Box::new(opener));
        self.tls = Tls::Open(Box::new(sealer));
        if !est.early_plaintext.is_empty() {
            // A client's first frames right behind its Finished: put them in front (one copy,
            // once per connection).
            let mut rx = BytesMut::with_capacity(est.early_plaintext.len() + r.rx.len());
            rx.extend_from_slice(&est.early_plaintext);
            rx.extend_from_slice(&r.rx);
            r.carried = est.early_plaintext.len();
            r.rx = rx;
        }
        Ok(true)
    }

    /// The read side and the sealing half of an open connection, for a caller that reads and
    /// writes from different tasks. `None` while the handshake runs or its records wait to be
    /// written.
    pub fn into_split(self) -> Option<(FrameReader, RecordSealer)> {
        match self.tls {
            Tls::Open(sealer) if self.hs_out.is_empty() => Some((self.reader, *sealer)),
            _ => None,
        }
    }

    /// Bytes this connection's buffers retain (capacities).
    pub fn retained(&self) -> usize {
        self.reader.rx.capacity() + self.hs_out.capacity()
    }

    /// See [`FrameReader::discard_input`].
    pub fn discard_input(&mut self) {
        self.reader.discard_input();
    }

    /// See [`FrameReader::has_partial_frame`].
    pub fn has_partial_frame(&self) -> bool {
        self.reader.has_partial_frame()
    }

    /// Whether the peer sent close_notify.
    pub fn peer_closed(&self) -> bool {
        self.reader.peer_closed
    }

    /// Handshake records waiting to be written, if any.
    pub fn take_handshake_output(&mut self) -> Option<Vec<u8>> {
        (!self.hs_out.is_empty()).then(|| std::mem::take(&mut self.hs_out))
    }

    /// Whether handshake records wait to be written.
    pub fn has_handshake_output(&self) -> bool {
        !self.hs_out.is_empty()
    }

    /// A writer sealing records into `out` (a full-length buffer), with `tail` as scratch for
    /// the copied part of a record (the shard lends one to every writer pass, so idle
    /// connections keep none), or `None` before the handshake completed.
    pub fn writer<'a>(
        &'a mut self,
        out: &'a mut [u8],
        tail: &'a mut Vec<u8>,
    ) -> Option<RecordWriter<'a>> {
        let Tls::Open(sealer) = &mut self.tls else {
            return None;
        };
        Some(RecordWriter::new(sealer, out, tail))
    }

    /// See [`FrameReader::take_frame_bytes`].
    pub fn take_frame_bytes(&mut self) -> u64 {
        self.reader.take_frame_bytes()
    }

    /// See [`FrameReader::take_control_records`].
    pub fn take_control_records(&mut self) -> u64 {
        self.reader.take_control_records()
    }

    /// The next complete frame, or the reason to close the connection: a frame that does not
    /// decode, or a TLS failure (logged for connection `conn`).
    pub fn frame_or_close(&mut self, conn: u64) -> Result<Option<Frame>, crate::wire::Reason> {
        self.frame_or_close_with(conn, &mut |env| ControlFlow::Break(Some(env)))
    }

    /// [`Transport::frame_or_close`], each ENVELOPE given to `envelope` as
    /// [`FrameReader::next_frame_with`] does.
    pub fn frame_or_close_with(
        &mut self,
        conn: u64,
        envelope: &mut impl FnMut(Envelope) -> ControlFlow<Option<Envelope>>,
    ) -> Result<Option<Frame>, crate::wire::Reason> {
        match self.reader.next_frame_with(envelope) {
            Ok(f) => Ok(f),
            Err(TransportError::Wire(e)) => {
                tracing::info!(conn, error = %e, "undecodable frame");
                Err(crate::wire::Reason::from(&e))
            }
            Err(TransportError::Tls(e)) => {
                tracing::info!(conn, error = %e, "TLS failure");
                Err(crate::wire::Reason::ProtocolError)
            }
        }
    }

    /// See [`FrameReader::next_frame`].
    pub fn next_frame(&mut self) -> Result<Option<Frame>, TransportError> {
        self.reader.next_frame()
    }
}

impl FrameReader {
    /// Changes the largest frame accepted (after the session contract).
    pub fn set_max_frame(&mut self, max: usize) {
        self.framing.set_max_frame(max);
    }

    /// The read buffer for the next socket read, with spare room. Give it back with
    /// [`FrameReader::put_read_buf`].
    pub fn take_read_buf(&mut self) -> BytesMut {
        let mut rx = std::mem::take(&mut self.rx);
        let used = rx.len();
        // A record whose header is buffered must fit whole.
        let start = self.carried + self.skip;
        let pending = match rx.get(start..start + 5) {
            Some(h) if self.opener.is_some() => 5 + u16::from_be_bytes([h[3], h[4]]) as usize,
            _ => 0,
        };
        let need = (start + pending).saturating_sub(used);
        let spare = rx.capacity() - used;
        if spare < INITIAL_READ_BUFFER / 2 || spare < need {
            // A read filled the buffer: the next block is twice as large, within the configured
            // maximum. Moving to a new block copies only what is not yet handled (a partial
            // record and the start of a frame), so large blocks make that copy rare; idle
            // connections stay at the first, small block.
            if spare < INITIAL_READ_BUFFER / 2 && rx.capacity() > 0 {
                self.block = (self.block * 2).min(self.max_read);
            }
            rx.reserve(self.block.max(need));
        }
        rx
    }

    /// Takes back the read buffer after a read appended bytes to it.
    pub fn put_read_buf(&mut self, rx: BytesMut) {
        self.rx = rx;
    }

    /// Bytes the read buffer retains (its capacity).
    pub fn retained(&self) -> usize {
        self.rx.capacity()
    }

    /// Lets go of the read buffer between bursts: when nothing read waits to be handled, the
    /// buffer is dropped (frames cut from it keep their part alive on their own) and the next
    /// read starts again at the first, small block. Returns whether it did.
    pub fn release_idle(&mut self) -> bool {
        if self.has_partial_frame() || self.rx.capacity() <= INITIAL_READ_BUFFER {
            return false;
        }
        self.rx = BytesMut::new();
        self.carried = 0;
        self.skip = 0;
        self.block = INITIAL_READ_BUFFER;
        true
    }

    /// Drops what was read and not yet handled (a closing connection ignores its peer).
    pub fn discard_input(&mut self) {
        self.rx.clear();
        self.carried = 0;
        self.skip = 0;
    }

    /// Whether the peer stopped in the middle of a frame (or a record).
    pub fn has_partial_frame(&self) -> bool {
        self.carried > 0 || self.rx.len() > self.carried + self.skip
    }

    /// Whether the peer sent close_notify: nothing more comes.
    pub fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// Takes the count of frame bytes read since the last call.
    pub fn take_frame_bytes(&mut self) -> u64 {
        std::mem::take(&mut self.frame_bytes)
    }

    /// The next complete frame read, if any: records are opened as needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, TransportError> {
        self.next_frame_with(&mut |env| ControlFlow::Break(Some(env)))
    }

    /// [`FrameReader::next_frame`], except that each ENVELOPE is given to `envelope` as soon as
    /// it is decoded, and reading goes on while that answers `Continue`; `Break(Some(env))`
    /// returns the envelope as the frame, `Break(None)` returns `Ok(None)`. An envelope handed
    /// on where it is built is not copied out through the result of every layer (each such copy
    /// reads back, as wider words, what was just written field by field: a stall per envelope).
    pub fn next_frame_with(
        &mut self,
        envelope: &mut impl FnMut(Envelope) -> ControlFlow<Option<Envelope>>,
    ) -> Result<Option<Frame>, TransportError> {
        loop {
            let frame = match self.carried_frame_len()? {
                Some(len) if self.carried >= len => {
                    self.carried -= len;
                    self.rx.split_to(len).freeze()
                }
                _ => match self.open_next_record()? {
                    Step::Nothing => return Ok(None),
                    Step::Progress => continue,
                    Step::Joined(f) => f.freeze(),
                },
            };
            self.frame_bytes += frame.len() as u64;
            if !Frame::is_envelope(&frame) {
                return Ok(Some(Frame::decode_prefixed(frame)?));
            }
            if let ControlFlow::Break(env) = envelope(Envelope::decode_at(frame, 5)?) {
                return Ok(env.map(Frame::Envelope));
            }
        }
    }

    /// Length (prefix included) of the frame starting the carried plaintext, once known.
    fn carried_frame_len(&self) -> Result<Option<usize>, WireError> {
        self.framing.frame_len(&self.rx[..self.carried])
    }

    /// Opens the next complete record and joins its plaintext to the carried plaintext.
    fn open_next_record(&mut self) -> Result<Step, TransportError> {
        let Some(records) = self.opener.as_deref_mut() else {
            return Ok(Step::Nothing);
        };
        if self.peer_closed {
            return Ok(Step::Nothing);
        }
        let start = self.carried + self.skip;
        let Some(n) = RecordLayer::record_len(&self.rx[start..])? else {
            return Ok(Step::Nothing);
        };
        let range = match records.open(&mut self.rx[start..start + n])? {
            Opened::Data(r) if !r.is_empty() => r,
            Opened::Data(_) | Opened::Control => {
                // Nothing for the frames (an empty record, a KeyUpdate): drop it from the buffer
                // without moving what is carried, unless the skipped bytes pile up.
                self.control_records += 1;
                self.skip += n;
                self.compact_skip();
                return Ok(Step::Progress);
            }
            Opened::PeerClosed => {
                self.peer_closed = true;
                self.skip += n;
                self.compact_skip();
                return Ok(Step::Nothing);
            }
        };
        let c = self.carried;
        let p0 = start + range.start;
        let plen = range.len();
        let trailer = n - range.end;
        let gap = p0 - c;
        if c == 0 {
            self.rx.advance(p0);
            self.carried = plen;
            self.skip = trailer;
            return Ok(Step::Progress);
        }
        // A frame started in an earlier record: join by moving the smaller side.
        let need = self.carried_frame_len()?.map(|l| l - c);
        match need {
            Some(need) if need <= plen && need < c => {
                // The frame ends in this record: move its end left, behind the carried start.
                self.rx.copy_within(p0..p0 + need, c);
                let frame = self.rx.split_to(c + need);
                // The rest of this record's plaintext starts `gap` bytes further on.
                self.rx.advance(gap);
                self.carried = plen - need;
                self.skip = trailer;
                Ok(Step::Joined(frame))
            }
            _ if c <= plen => {
                // Move the carried start right, in front of this record's plaintext.
                self.rx.copy_within(0..c, gap);
                self.rx.advance(gap);
                self.carried = c + plen;
                self.skip = trailer;
                Ok(Step::Progress)
            }
            _ => {
                // Move this record's plaintext left, behind the carried start.
                self.rx.copy_within(p0..p0 + plen, c);
                self.carried = c + plen;
                self.skip = gap + trailer;
                Ok(Step::Progress)
            }
        }
    }
}

impl FrameReader {
    /// Drops skipped bytes from the buffer: at once when nothing is carried, else once they
    /// outweigh what a move of the carried bytes costs.
    fn compact_skip(&mut self) {
        let c = self.carried;
        if c == 0 {
            self.rx.advance(self.skip);
            self.skip = 0;
        } else if self.skip > c.max(crate::tls::record::MAX_CIPHERTEXT) {
            self.rx.copy_within(0..c, self.skip);
            self.rx.advance(self.skip);
            self.skip = 0;
        }
    }

    /// Records that carried no frame bytes (KeyUpdates, empty records) since the last call:
    /// charged like frames.
    pub fn take_control_records(&mut self) -> u64 {
        std::mem::take(&mut self.control_records)
    }
}

/// What opening a record achieved.
enum Step {
    /// No complete record is buffered.
    Nothing,
    /// A record was opened.
    Progress,
    /// A record completed the carried frame, which was cut off here.
    Joined(BytesMut),
}

/// Bytes a write buffer needs to seal one frame of `len` bytes on its own, with a flushed tail
/// before it, and a KeyUpdate in front of every record (a peer may ask for one before each, when
/// the record layer is split and its opening half runs on another thread).
pub fn sealed_size(len: usize) -> usize {
    len + (len / MAX_PLAINTEXT + 4) * (2 * OVERHEAD + 5) + 64
}

/// Seals frames into a write buffer, record by record (see the module docs).
pub struct RecordWriter<'a> {
    records: &'a mut RecordSealer,
    out: &'a mut [u8],
    used: usize,
    tail: &'a mut Vec<u8>,
    /// Sealed where it lies, ahead of the tail, in the next record.
    big: Bytes,
}

impl<'a> RecordWriter<'a> {
    /// A writer sealing records into `out` (a full-length buffer), with `tail` as scratch for
    /// the copied part of a record.
    pub fn new(records: &'a mut RecordSealer, out: &'a mut [u8], tail: &'a mut Vec<u8>) -> Self {
        tail.clear();
        if tail.capacity() < MAX_PLAINTEXT + 1 {
            tail.reserve_exact(MAX_PLAINTEXT + 1);
        }
        RecordWriter {
            records,
            out,
            used: 0,
            tail,
            big: Bytes::new(),
        }
    }

    /// Whether a frame of `len` bytes still fits, with the records it may need.
    pub fn fits(&self, len: usize) -> bool {
        self.used + self.big.len() + self.tail.len() + sealed_size(len) <= self.out.len()
    }

    /// Copies `bytes` into the records (control frames, heads, small envelopes).
    pub fn copy(&mut self, mut bytes: &[u8]) -> Result<(), RecordError> {
        while !bytes.is_empty() {
            let space = MAX_PLAINTEXT - self.big.len() - self.tail.len();
            if space == 0 {
                self.flush()?;
                continue;
            }
            let take = space.min(bytes.len());
            self.tail.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
        }
        Ok(())
    }

    /// An envelope: its head copied, its immutable part sealed where it lies when large.
    pub fn envelope(&mut self, head: &[u8], immutable: &Bytes) -> Result<(), RecordError> {
        self.copy(head)?;
        self.shared(immutable)
    }

    /// Bytes sealed where they lie when large (from the start of a record, in full records,
    /// the last piece sharing its record with what follows), copied when small.
    pub fn shared(&mut self, bytes: &Bytes) -> Result<(), RecordError> {
        if bytes.len() < SEAL_IN_PLACE_FROM {
            return self.copy(bytes);
        }
        self.flush()?;
        let mut rest = bytes.clone();
        while rest.len() > MAX_PLAINTEXT {
            let chunk = rest.split_to(MAX_PLAINTEXT);
            self.seal(&chunk)?;
        }
        // The last piece waits: what follows rides in the same record.
        self.big = rest;
        Ok(())
    }

    /// Seals the whole frames at the front of `frames` (encoded back to back: a batch of
    /// them) that fit, and returns their bytes: each large one sealed where it lies from the
    /// start of a record (the reader then cuts it out with at most a small join), small ones
    /// copied. What follows the last one taken (a frame that does not fit, or bytes that are not
    /// a whole frame) is left to the caller.
    pub fn frames(&mut self, frames: &Bytes) -> Result<usize, RecordError> {
        let mut at = 0;
        while let Some(p) = frames.get(at..at + 4) {
            let len = 4 + u32::from_be_bytes([p[0], p[1], p[2], p[3]]) as usize;
            let Some(frame) = frames.get(at..at + len) else {
                break;
            };
            if !self.fits(len) {
                break;
            }
            if len >= SEAL_IN_PLACE_FROM {
                self.shared(&frames.slice(at..at + len))?;
            } else {
                self.copy(frame)?;
            }
            at += len;
        }
        Ok(at)
    }

    fn seal(&mut self, big: &[u8]) -> Result<(), RecordError> {
        let n = self
            .records
            .seal(&mut self.out[self.used..], big, self.tail)?;
        self.used += n;
        self.tail.clear();
        Ok(())
    }

    /// Seals what is pending.
    pub fn flush(&mut self) -> Result<(), RecordError> {
        if self.big.is_empty() && self.tail.is_empty() {
            return Ok(());
        }
        let big = std::mem::take(&mut self.big);
        self.seal(&big)
    }

    /// Seals what is pending, then a close_notify.
    pub fn close_notify(&mut self) -> Result<(), RecordError> {
        self.flush()?;
        let n = self.records.close_notify(&mut self.out[self.used..])?;
        self.used += n;
        Ok(())
    }

    /// Sends a KeyUpdate (sending keys rotate).
    pub fn key_update(&mut self) -> Result<(), RecordError> {
        self.flush()?;
        let n = self.records.key_update(&mut self.out[self.used..])?;
        self.used += n;
        Ok(())
    }

    /// Seals what is pending and returns the bytes to write.
    pub fn finish(mut self) -> Result<usize, RecordError> {
        self.flush()?;
        Ok(self.used)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use rustls::pki_types::ServerName;
    use rustls::ClientConnection;

    use super::*;
    use crate::pki::{CertAuthority, Identity};
    use crate::policy::AdmissionMode;
    use crate::wire::{AgentId, Destination, EnvelopeBuilder, MessageId};

    fn pair() -> (ClientConnection, Transport) {
        let ca = CertAuthority::generate("test ca").unwrap();
        let relay = ca.issue_relay("relay", &["localhost".into()]).unwrap();
        let mut scfg =
            (*crate::tls::server_config(&relay, AdmissionMode::Open, &[]).unwrap()).clone();
        scfg.enable_secret_extraction = true;
        let agent = Identity::generate_self_signed("agent").unwrap();
        let ccfg = crate::tls::client_config(&agent, std::slice::from_ref(&ca.cert)).unwrap();
        let client =
            ClientConnection::new(ccfg, ServerName::try_from("localhost").unwrap()).unwrap();
        (
            client,
            Transport::new(Arc::new(scfg), 1 << 20, 64 << 10).unwrap(),
        )
    }

    fn out_of(c: &mut ClientConnection) -> Vec<u8> {
        let mut v = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut v).unwrap();
        }
        v
    }

    /// Feeds `bytes` to the transport in reads of at most `chunk` bytes; returns the frames.
    fn feed(t: &mut Transport, bytes: &[u8], chunk: usize) -> Vec<Frame> {
        let mut frames = Vec::new();
        for piece in bytes.chunks(chunk) {
            let mut rx = t.take_read_buf();
            rx.extend_from_slice(piece);
            t.put_read_buf(rx);
            if !t.is_open() && !t.advance_handshake().unwrap() {
                continue;
            }
            while let Some(f) = t.next_frame().unwrap() {
                frames.push(f);
            }
        }
        frames
    }

    fn envelopes(n: usize, size: usize) -> Vec<Frame> {
        (0..n)
            .map(|i| {
                Frame::Envelope(
                    EnvelopeBuilder::new(
                        MessageId::from_u128(i as u128),
                        AgentId([1; 32]),
                        Destination::Agent(AgentId([2; 32])),
                        0,
                        10,
                    )
                    .build(&vec![i as u8; size + i % 7])
                    .unwrap(),
                )
            })
            .collect()
    }

    /// Records carrying `frames`, sealed by `sealer`.
    fn sealed(sealer: &mut RecordSealer, frames: &[Frame]) -> Vec<u8> {
        let batch: Bytes = frames
            .iter()
            .map(Frame::to_bytes)
            .collect::<Vec<_>>()
            .concat()
            .into();
        let (mut out, mut tail) = (vec![0u8; 2 << 20], Vec::new());
        let mut w = RecordWriter::new(sealer, &mut out, &mut tail);
        assert_eq!(w.frames(&batch).unwrap(), batch.len(), "all fit");
        let n = w.finish().unwrap();
        out.truncate(n);
        out
    }

    /// Reads `bytes` in pieces of at most `chunk`; returns the frames.
    fn read_into(r: &mut FrameReader, bytes: &[u8], chunk: usize) -> Vec<Frame> {
        let mut frames = Vec::new();
        for piece in bytes.chunks(chunk) {
            let mut rx = r.take_read_buf();
            rx.extend_from_slice(piece);
            r.put_read_buf(rx);
            while let Some(f) = r.next_frame().unwrap() {
                frames.push(f);
            }
        }
        frames
    }

    #[test]
    fn an_idle_reader_lets_go_of_its_buffer_but_never_of_a_partial_frame() {
        let relay = crate::testing::InMemoryRelay::new();
        let (client, mut server) = relay.records(&Identity::generate_self_signed("agent").unwrap());
        let (mut reader, _) = client.into_split().expect("open");
        // A burst grows the read buffer block by block.
        let burst = envelopes(40, 16 << 10);
        let got = read_into(&mut reader, &sealed(server.sealer(), &burst), 64 << 10);
        assert!(got == burst, "the burst arrives whole");
        assert!(
            reader.retained() > INITIAL_READ_BUFFER,
            "{}",
            reader.retained()
        );
        // Everything handled: the buffer goes (the frames read keep their own part).
        assert!(reader.release_idle());
        assert_eq!(reader.retained(), 0);
        assert!(!reader.release_idle(), "nothing left to let go of");
        assert!(got == burst, "frames already read are untouched");

        // Half a burst waits: nothing is let go of, and the rest completes it.
        let more = envelopes(5, 20_000);
        let wire = sealed(server.sealer(), &more);
        let half = wire.len() / 2;
        let mut again = read_into(&mut reader, &wire[..half], 7_000);
        assert!(reader.has_partial_frame());
        let kept = reader.retained();
        assert!(!reader.release_idle(), "a partial frame keeps its buffer");
        assert_eq!(reader.retained(), kept);
        again.extend(read_into(&mut reader, &wire[half..], 7_000));
        assert!(again == more, "frames across the kept buffer arrive whole");
        assert!(!reader.has_partial_frame());
        // And a buffer let go of starts small again.
        assert!(reader.release_idle());
        let small = envelopes(3, 100);
        assert!(read_into(&mut reader, &sealed(server.sealer(), &small), 1 << 20) == small);
        assert!(
            reader.retained() <= 2 * INITIAL_READ_BUFFER,
            "{}",
            reader.retained()
        );
    }

    #[test]
    fn frames_come_out_whole_whatever_the_records_and_reads() {
        for (size, chunk) in [
            (200, 1 << 20),
            (200, 1000),
            (16 << 10, 7000),
            (40_000, 3),
            (5000, 17),
        ] {
            let (mut client, mut t) = pair();
            let mut to_server = out_of(&mut client);
            let (mut sent, mut got) = (Vec::new(), Vec::new());
            // Handshake, with the client's first frames pipelined behind its Finished.
            for _ in 0..10 {
                got.extend(feed(&mut t, &to_server, chunk));
                to_server.clear();
                if let Some(hs) = t.take_handshake_output() {
                    let mut s = &hs[..];
                    while !s.is_empty() {
                        client.read_tls(&mut s).unwrap();
                        client.process_new_packets().unwrap();
                    }
                }
                if !client.is_handshaking() && sent.is_empty() {
                    sent = envelopes(3, 100);
                    for f in &sent {
                        client.writer().write_all(&f.to_bytes()).unwrap();
                    }
                }
                to_server.extend(out_of(&mut client));
                if t.is_open() {
                    break;
                }
            }
            got.extend(feed(&mut t, &to_server, chunk));
            let more = envelopes(20, size);
            let mut wire = Vec::new();
            for f in &more {
                for piece in f.to_bytes().chunks(8000) {
                    client.writer().write_all(piece).unwrap();
                    wire.extend(out_of(&mut client));
                }
            }
            got.extend(feed(&mut t, &wire, chunk));
            sent.extend(more);
            assert_eq!(got.len(), sent.len(), "size {size}, reads of {chunk}");
            assert!(got == sent, "size {size}, reads of {chunk}: frames differ");
            assert!(!t.has_partial_frame());
        }
    }

    #[test]
    fn batched_frames_start_large_ones_on_a_record_and_arrive_whole() {
        let relay = crate::testing::InMemoryRelay::new();
        let (client, mut server) = relay.records(&Identity::generate_self_signed("agent").unwrap());
        let (_, mut sealer) = client.into_split().expect("open");
        // Frames back to back, small and large, as a batch holds them.
        let sizes = [100, 20_000, 300, 40, 5_000, 16_000, 1_500, 70];
        let frames: Vec<Bytes> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| envelopes(i + 1, n).pop().unwrap().to_bytes())
            .collect();
        let batch: Bytes = frames.concat().into();
        let (mut out, mut tail) = (vec![0u8; 256 << 10], Vec::new());
        let mut w = RecordWriter::new(&mut sealer, &mut out, &mut tail);
        assert_eq!(w.frames(&batch).unwrap(), batch.len(), "all fit");
        let n = w.finish().unwrap();
        // Open every record; note where each one's plaintext starts in the stream.
        let (mut plain, mut starts, mut at) = (Vec::new(), Vec::new(), 0);
        while at < n {
            let len = RecordLayer::record_len(&out[at..n]).unwrap().unwrap();
            let Opened::Data(r) = server.open(&mut out[at..at + len]).unwrap() else {
                panic!("a data record");
            };
            starts.push(plain.len());
            plain.extend_from_slice(&out[at + r.start..at + r.end]);
            at += len;
        }
        assert_eq!(plain, batch, "the records carry the batch, in order");
        let mut offset = 0;
        for f in &frames {
            if f.len() >= SEAL_IN_PLACE_FROM {
                assert!(
                    starts.contains(&offset),
                    "a large frame at {offset} starts a record"
                );
            }
            offset += f.len();
        }
        // Small frames share records: fewer records than frames plus full-record pieces.
        assert!(starts.len() < frames.len() + 3, "{} records", starts.len());
    }

    #[test]
    fn frames_that_each_start_a_record_stop_where_the_buffer_ends() {
        let relay = crate::testing::InMemoryRelay::new();
        let (client, mut server) = relay.records(&Identity::generate_self_signed("agent").unwrap());
        let (_, mut sealer) = client.into_split().expect("open");
        // 200 frames just above the size sealed where it lies: a record each, 200 records of
        // overhead in a buffer sized for the bytes.
        let frames: Vec<Bytes> = (0..200)
            .map(|i| {
                envelopes(i + 1, SEAL_IN_PLACE_FROM)
                    .pop()
                    .unwrap()
                    .to_bytes()
            })
            .collect();
        let batch: Bytes = frames.concat().into();
        let (mut out, mut tail) = (vec![0u8; sealed_size(batch.len())], Vec::new());
        let mut w = RecordWriter::new(&mut sealer, &mut out, &mut tail);
        let took = w.frames(&batch).unwrap();
        let n = w.finish().unwrap();
        assert!(took < batch.len(), "not all fit");
        let whole: usize = frames
            .iter()
            .map(Bytes::len)
            .scan(0, |a, l| {
                *a += l;
                Some(*a)
            })
            .take_while(|&a| a <= took)
            .last()
            .unwrap();
        assert_eq!(took, whole, "whole frames only");
        let mut plain = Vec::new();
        let mut at = 0;
        while at < n {
            let len = RecordLayer::record_len(&out[at..n]).unwrap().unwrap();
            let Opened::Data(r) = server.open(&mut out[at..at + len]).unwrap() else {
                panic!("a data record");
            };
            plain.extend_from_slice(&out[at + r.start..at + r.end]);
            at += len;
        }
        assert_eq!(plain, batch[..took]);
    }
}

//! The TLS 1.3 record layer after the handshake (RFC 8446 §5), run by the relay itself so that a
//! payload byte is touched in user space only by the AEAD open and the AEAD seal.
//!
//! rustls does the handshake ([`super::handshake`]) and then hands over the traffic secrets and a
//! [`KernelConnection`] that derives the next secrets on a KeyUpdate, as it would for kernel TLS.
//! From then on:
//!
//! - **open**: a complete record in the caller's read buffer is decrypted in place
//!   ([`RecordLayer::open`]); the plaintext is a range of that same buffer, so frames can be split
//!   off it without a copy;
//! - **seal**: one record is written straight into the caller's write buffer
//!   ([`RecordSealer::seal`]): a `big` slice is encrypted from where it lies (an envelope's shared
//!   immutable bytes: no copy), followed by a small `tail` the caller assembled (frame heads, small
//!   frames) and the content-type byte.
//!
//! Alerts and KeyUpdate messages are handled here: a peer's close_notify is reported, any other
//! alert is an error; a KeyUpdate switches the receiving keys, and one that requests an update
//! makes this side answer with its own KeyUpdate and switch its sending keys. Sending keys are also
//! rotated on request ([`RecordSealer::key_update`]) and before the cipher suite's confidentiality
//! limit. Pure: no I/O, no clock.
//!
//! The relay's shard reads and writes a connection from one place and keeps both directions in
//! one [`RecordLayer`]; the agent library reads and writes from two tasks and splits it
//! ([`RecordLayer::split`]) into a [`RecordOpener`] and a [`RecordSealer`], which share only the
//! key schedule.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use rustls::client::ClientConnectionData;
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets, SupportedCipherSuite};

/// Bytes of a record header: content type, legacy version, length.
pub const HEADER_LEN: usize = 5;
/// Largest plaintext of one record (2^14), content-type byte not included.
pub const MAX_PLAINTEXT: usize = 1 << 14;
/// Largest record body a peer may send: 2^14 + 256 (RFC 8446 §5.2).
pub const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// AEAD tag length of every TLS 1.3 cipher suite this relay offers.
pub const TAG_LEN: usize = 16;
/// Bytes a record adds around its content: header, content-type byte, tag.
pub const OVERHEAD: usize = HEADER_LEN + 1 + TAG_LEN;

const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const KEY_UPDATE: u8 = 24;
const CLOSE_NOTIFY: u8 = 0;

/// Errors of the record layer. Every one ends the connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// A record header that is not an encrypted TLS 1.3 record, or too long.
    #[error("bad record header")]
    BadHeader,
    /// The record did not authenticate (tampered, or wrong keys).
    #[error("record failed to decrypt")]
    Decrypt,
    /// A decrypted record whose content is not allowed after the handshake.
    #[error("unexpected record content: {0}")]
    Unexpected(&'static str),
    /// The peer sent a fatal alert.
    #[error("peer sent alert {0}")]
    Alert(u8),
    /// The caller's output buffer cannot hold the record.
    #[error("output buffer too small: {needed} bytes needed")]
    OutputTooSmall { needed: usize },
    /// Key derivation or the cipher failed.
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
}

/// What an opened record held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Opened {
    /// Application data: this range of the record buffer (possibly empty).
    Data(Range<usize>),
    /// A KeyUpdate or other control message, handled; it may have written an answer (see
    /// [`RecordLayer::open`]).
    Control,
    /// The peer sent close_notify: it sends nothing more.
    PeerClosed,
}

/// One direction's keys and sequence number.
struct Direction {
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
}

impl Direction {
    fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> Result<Self, RecordError> {
        use aws_lc_rs::aead::{AES_128_GCM, AES_256_GCM, CHACHA20_POLY1305};
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (&CHACHA20_POLY1305, key, iv),
            _ => return Err(RecordError::Unexpected("cipher suite")),
        };
        let key = UnboundKey::new(alg, key.as_ref()).map_err(|_| RecordError::Decrypt)?;
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(iv.as_ref());
        Ok(Direction {
            key: LessSafeKey::new(key),
            iv: nonce,
            seq,
        })
    }

    /// The per-record nonce: the IV XOR the sequence number (RFC 8446 §5.3).
    fn nonce(&mut self) -> Nonce {
        let mut n = self.iv;
        for (b, s) in n[NONCE_LEN - 8..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        self.seq += 1;
        Nonce::assume_unique_for_key(n)
    }
}

/// Which side of the handshake a connection was: rustls keeps a kernel connection per side,
/// used here only to derive the next secrets on a KeyUpdate.
pub enum Kernel {
    /// The relay accepted the connection (agents, and links it was dialled on).
    Server(KernelConnection<ServerConnectionData>),
    /// The relay dialled it (links to other relays).
    Client(KernelConnection<ClientConnectionData>),
}

impl Kernel {
    fn negotiated_cipher_suite(&self) -> SupportedCipherSuite {
        match self {
            Kernel::Server(k) => k.negotiated_cipher_suite(),
            Kernel::Client(k) => k.negotiated_cipher_suite(),
        }
    }
    fn update_rx_secret(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Server(k) => k.update_rx_secret(),
            Kernel::Client(k) => k.update_rx_secret(),
        }
    }
    fn update_tx_secret(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Server(k) => k.update_tx_secret(),
            Kernel::Client(k) => k.update_tx_secret(),
        }
    }
}

/// What the two directions share: rustls' kernel connection, which derives the next secrets on
/// a KeyUpdate, and whether the peer asked for a KeyUpdate the sending side has not sent yet
/// (the opener reads the request, the sealer answers it).
struct Schedule {
    kernel: Mutex<Kernel>,
    owe_key_update: AtomicBool,
}

impl Schedule {
    fn kernel(&self) -> MutexGuard<'_, Kernel> {
        self.kernel.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The receiving half of a record layer: opens the peer's records.
pub struct RecordOpener {
    rx: Direction,
    schedule: Arc<Schedule>,
}

/// The sending half of a record layer: seals this side's records.
pub struct RecordSealer {
    tx: Direction,
    /// Records to send with one key before rotating it (below the suite's confidentiality limit).
    rotate_after: u64,
    schedule: Arc<Schedule>,
}

/// The record layer of one established TLS 1.3 connection, either side: both halves, for a
/// caller that reads and writes from one place. [`RecordLayer::split`] parts them for a caller
/// that reads and writes from two tasks.
pub struct RecordLayer {
    opener: RecordOpener,
    sealer: RecordSealer,
}

impl std::fmt::Debug for RecordLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordLayer")
            .field("rx_seq", &self.opener.rx.seq)
            .field("tx_seq", &self.sealer.tx.seq)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for RecordOpener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordOpener")
            .field("seq", &self.rx.seq)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for RecordSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordSealer")
            .field("seq", &self.tx.seq)
            .finish_non_exhaustive()
    }
}

impl RecordLayer {
    /// Takes over from rustls after the handshake.
    pub fn new(secrets: ExtractedSecrets, kernel: Kernel) -> Result<Self, RecordError> {
        let limit = match kernel.negotiated_cipher_suite() {
            SupportedCipherSuite::Tls13(s) => s.common.confidentiality_limit,
            #[allow(unreachable_patterns)]
            _ => return Err(RecordError::Unexpected("TLS 1.2")),
        };
        let schedule = Arc::new(Schedule {
            kernel: Mutex::new(kernel),
            owe_key_update: AtomicBool::new(false),
        });
        Ok(RecordLayer {
            opener: RecordOpener {
                rx: Direction::new(secrets.rx.0, secrets.rx.1)?,
                schedule: schedule.clone(),
            },
            sealer: RecordSealer {
                tx: Direction::new(secrets.tx.0, secrets.tx.1)?,
                rotate_after: limit.saturating_sub(1 << 16).max(1),
                schedule,
            },
        })
    }

    /// The two halves, to open and seal from different tasks. A KeyUpdate the opener reads
    /// that asks for one back is answered by the sealer's next record.
    pub fn split(self) -> (RecordOpener, RecordSealer) {
        (self.opener, self.sealer)
    }

    /// The length of the complete record at the front of `buf` (header included), `None` if more
    /// bytes are needed. Checks the header before anything is buffered for the body.
    pub fn record_len(buf: &[u8]) -> Result<Option<usize>, RecordError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        if buf[0] != APPLICATION_DATA || buf[1] != 3 || buf[2] != 3 {
            return Err(RecordError::BadHeader);
        }
        let len = u16::from_be_bytes([buf[3], buf[4]]) as usize;
        if !(TAG_LEN + 1..=MAX_CIPHERTEXT).contains(&len) {
            return Err(RecordError::BadHeader);
        }
        Ok((buf.len() >= HEADER_LEN + len).then_some(HEADER_LEN + len))
    }

    /// See [`RecordOpener::open`].
    pub fn open(&mut self, rec: &mut [u8]) -> Result<Opened, RecordError> {
        self.opener.open(rec)
    }

    /// The sending half, for sealing.
    pub fn sealer(&mut self) -> &mut RecordSealer {
        &mut self.sealer
    }
}

impl RecordOpener {
    /// Decrypts the complete record `rec` (header included, as measured by
    /// [`RecordLayer::record_len`]) in place. Application data comes back as a range of `rec`.
    /// A KeyUpdate that asks for an answer makes the sending side owe one:
    /// [`RecordSealer::owes_key_update`] turns true and its next seal sends it first.
    pub fn open(&mut self, rec: &mut [u8]) -> Result<Opened, RecordError> {
        if rec.len() < HEADER_LEN + TAG_LEN + 1 {
            return Err(RecordError::BadHeader);
        }
        let (header, body) = rec.split_at_mut(HEADER_LEN);
        let nonce = self.rx.nonce();
        let plain = self
            .rx
            .key
            .open_in_place(nonce, Aad::from(&*header), body)
            .map_err(|_| RecordError::Decrypt)?;
        // Inner plaintext: content, content type, zero padding.
        let Some(end) = plain.iter().rposition(|b| *b != 0) else {
            return Err(RecordError::Unexpected("record without content type"));
        };
        if end > MAX_PLAINTEXT {
            return Err(RecordError::Unexpected("record too long"));
        }
        match plain[end] {
            APPLICATION_DATA => Ok(Opened::Data(HEADER_LEN..HEADER_LEN + end)),
            ALERT => match &plain[..end] {
                [_, CLOSE_NOTIFY] => Ok(Opened::PeerClosed),
                [_, d] => Err(RecordError::Alert(*d)),
                _ => Err(RecordError::Unexpected("malformed alert")),
            },
            HANDSHAKE => {
                // Only KeyUpdate may follow the handshake towards this side; it ends its record.
                match &plain[..end] {
                    [KEY_UPDATE, 0, 0, 1, req @ (0 | 1)] => {
                        let (seq, secrets) = self.schedule.kernel().update_rx_secret()?;
                        self.rx = Direction::new(seq, secrets)?;
                        if *req == 1 {
                            self.schedule.owe_key_update.store(true, Ordering::Relaxed);
                        }
                        Ok(Opened::Control)
                    }
                    _ => Err(RecordError::Unexpected(
                        "handshake message after the handshake",
                    )),
                }
            }
            _ => Err(RecordError::Unexpected("content type")),
        }
    }
}

impl RecordSealer {
    /// Whether a KeyUpdate must go out before more data (the peer asked, or the key is near its
    /// confidentiality limit). [`RecordSealer::seal`] sends it on its own.
    pub fn owes_key_update(&self) -> bool {
        self.tx.seq >= self.rotate_after || self.schedule.owe_key_update.load(Ordering::Relaxed)
    }

    /// Writes one application-data record into `out`: `big`, encrypted from where it lies,
    /// followed by `tail`. `tail` must have one spare byte of capacity for the content type (it is
    /// pushed and popped again). At most [`MAX_PLAINTEXT`] bytes in all. A KeyUpdate this side
    /// owes is written first. Returns the bytes written.
    pub fn seal(
        &mut self,
        out: &mut [u8],
        big: &[u8],
        tail: &mut Vec<u8>,
    ) -> Result<usize, RecordError> {
        if big.len() + tail.len() > MAX_PLAINTEXT {
            return Err(RecordError::Unexpected("record content above 2^14 bytes"));
        }
        // Read once: the opening half may set it meanwhile (the next record answers that).
        let ku = self.owes_key_update();
        let needed = OVERHEAD + big.len() + tail.len() + if ku { OVERHEAD + 5 } else { 0 };
        if out.len() < needed {
            return Err(RecordError::OutputTooSmall { needed });
        }
        let mut at = 0;
        if ku {
            at += self.send_key_update(out)?;
        }
        tail.push(APPLICATION_DATA);
        let r = self.seal_record(&mut out[at..], big, tail);
        tail.pop();
        Ok(at + r?)
    }

    /// Sends a KeyUpdate (not requesting one back) and switches to the next sending keys.
    /// Returns the bytes written into `out`.
    pub fn key_update(&mut self, out: &mut [u8]) -> Result<usize, RecordError> {
        if out.len() < OVERHEAD + 5 {
            return Err(RecordError::OutputTooSmall {
                needed: OVERHEAD + 5,
            });
        }
        self.send_key_update(out)
    }

    fn send_key_update(&mut self, out: &mut [u8]) -> Result<usize, RecordError> {
        let msg = [KEY_UPDATE, 0, 0, 1, 0, HANDSHAKE];
        // Cleared before this KeyUpdate goes: a request read after this point is answered by
        // another one, not lost.
        self.schedule.owe_key_update.store(false, Ordering::Relaxed);
        let n = self.seal_record(out, &[], &msg)?;
        let (seq, secrets) = self.schedule.kernel().update_tx_secret()?;
        self.tx = Direction::new(seq, secrets)?;
        Ok(n)
    }

    /// Writes a close_notify alert. Returns the bytes written.
    pub fn close_notify(&mut self, out: &mut [u8]) -> Result<usize, RecordError> {
        let msg = [1, CLOSE_NOTIFY, ALERT];
        if out.len() < OVERHEAD + 2 {
            return Err(RecordError::OutputTooSmall {
                needed: OVERHEAD + 2,
            });
        }
        self.seal_record(out, &[], &msg)
    }

    /// Seals `big ‖ tail` (tail already ends with the content type) as one record.
    fn seal_record(
        &mut self,
        out: &mut [u8],
        big: &[u8],
        tail: &[u8],
    ) -> Result<usize, RecordError> {
        let body = big.len() + tail.len() + TAG_LEN;
        let total = HEADER_LEN + body;
        let (header, rest) = out[..total].split_at_mut(HEADER_LEN);
        header.copy_from_slice(&[APPLICATION_DATA, 3, 3, (body >> 8) as u8, body as u8]);
        let (big_out, tail_out) = rest.split_at_mut(big.len());
        let nonce = self.tx.nonce();
        self.tx
            .key
            .seal_out_of_place_scatter(nonce, Aad::from(&*header), big, big_out, tail, tail_out)
            .map_err(|_| RecordError::Unexpected("seal"))?;
        Ok(total)
    }
}

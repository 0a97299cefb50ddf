//! The relay side of a TLS 1.3 handshake, driven sans-IO over rustls' unbuffered API, ending in
//! a [`RecordLayer`] the relay runs itself.
//!
//! The caller reads ciphertext into its own buffer and calls [`ServerHandshake::advance`]: rustls
//! consumes what it can from the front (the count is returned; the caller drops those bytes) and
//! appends handshake records to the caller's output. Once the handshake is complete,
//! [`ServerHandshake::finish`] converts the connection: the traffic secrets go to a
//! [`RecordLayer`], the peer's certificates and ALPN are kept, and any application data rustls
//! already decrypted (a client may send its first frames right behind its Finished) is returned
//! so the caller can put it in front of what it decrypts from then on.

use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};

use super::record::{RecordError, RecordLayer};

/// A handshake in progress on the relay's side of a connection.
pub struct ServerHandshake {
    conn: UnbufferedServerConnection,
    /// Application data decrypted by rustls before the connection was converted.
    early: Vec<u8>,
    done: bool,
}

impl std::fmt::Debug for ServerHandshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandshake")
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

/// A completed handshake, converted.
pub struct Established {
    pub records: RecordLayer<ServerConnectionData>,
    /// The client's certificate chain, leaf first.
    pub peer_certificates: Vec<CertificateDer<'static>>,
    pub alpn: Option<Vec<u8>>,
    /// Application data the client sent before the conversion, already decrypted.
    pub early_plaintext: Vec<u8>,
}

impl std::fmt::Debug for Established {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Established")
            .field("early_plaintext", &self.early_plaintext.len())
            .finish_non_exhaustive()
    }
}

impl ServerHandshake {
    /// Starts a handshake. `config` must have `enable_secret_extraction` set.
    pub fn new(config: Arc<rustls::ServerConfig>) -> Result<Self, RecordError> {
        Ok(ServerHandshake {
            conn: UnbufferedServerConnection::new(config)?,
            early: Vec::new(),
            done: false,
        })
    }

    /// Whether the handshake is complete ([`ServerHandshake::finish`] may be called).
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Processes the ciphertext at the front of `incoming`; handshake records to send are
    /// appended to `out`. Returns how many bytes of `incoming` were consumed. Bytes after those
    /// are left for the next call (a partial record) or, once [`ServerHandshake::is_done`], for
    /// the record layer.
    pub fn advance(
        &mut self,
        incoming: &mut [u8],
        out: &mut Vec<u8>,
    ) -> Result<usize, RecordError> {
        let mut consumed = 0;
        while !self.done {
            let UnbufferedStatus { discard, state } =
                self.conn.process_tls_records(&mut incoming[consumed..]);
            let mut blocked = false;
            match state? {
                ConnectionState::EncodeTlsData(mut e) => {
                    let start = out.len();
                    let mut room = 4096;
                    loop {
                        out.resize(start + room, 0);
                        match e.encode(&mut out[start..]) {
                            Ok(n) => {
                                out.truncate(start + n);
                                break;
                            }
                            Err(EncodeError::InsufficientSize(s)) => room = s.required_size,
                            Err(_) => {
                                out.truncate(start);
                                return Err(RecordError::Unexpected("handshake encoding"));
                            }
                        }
                    }
                }
                // `out` belongs to the caller, who writes it in order: as good as sent.
                ConnectionState::TransmitTlsData(t) => t.done(),
                ConnectionState::ReadTraffic(mut r) => {
                    while let Some(rec) = r.next_record() {
                        self.early.extend_from_slice(rec?.payload);
                    }
                }
                ConnectionState::BlockedHandshake => blocked = true,
                ConnectionState::WriteTraffic(_) => {
                    if self.conn.is_handshaking() {
                        blocked = true;
                    } else {
                        self.done = true;
                    }
                }
                ConnectionState::PeerClosed | ConnectionState::Closed => {
                    return Err(RecordError::Unexpected("closed during the handshake"))
                }
                _ => return Err(RecordError::Unexpected("handshake state")),
            }
            consumed += discard;
            if blocked {
                break;
            }
        }
        Ok(consumed)
    }

    /// Converts a completed handshake. Fails if [`ServerHandshake::is_done`] is false.
    pub fn finish(self) -> Result<Established, RecordError> {
        let peer_certificates = self
            .conn
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default();
        let alpn = self.conn.alpn_protocol().map(<[u8]>::to_vec);
        let (secrets, kernel) = self.conn.dangerous_into_kernel_connection()?;
        Ok(Established {
            records: RecordLayer::new(secrets, kernel)?,
            peer_certificates,
            alpn,
            early_plaintext: self.early,
        })
    }
}

//! The relay's side of a TLS 1.3 handshake, driven sans-IO over rustls' unbuffered API, ending in
//! a [`RecordLayer`] the relay runs itself. The relay is the server on connections it accepted
//! (agents, links it is dialled on) and the client on the links it dials.
//!
//! The caller reads ciphertext into its own buffer and calls [`Handshake::advance`]: rustls
//! consumes what it can from the front (the count is returned; the caller drops those bytes) and
//! appends handshake records to the caller's output. Once the handshake is complete,
//! [`Handshake::finish`] converts the connection: the traffic secrets go to a
//! [`RecordLayer`], the peer's certificates and ALPN are kept, and any application data rustls
//! already decrypted (a peer may send its first frames right behind its Finished) is returned
//! so the caller can put it in front of what it decrypts from then on.

use std::sync::Arc;

use rustls::client::UnbufferedClientConnection;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::ServerName;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};

use super::record::{Kernel, RecordError, RecordLayer};

enum Side {
    Server(UnbufferedServerConnection),
    Client(UnbufferedClientConnection),
}

/// A handshake in progress on the relay's side of a connection.
pub struct Handshake {
    conn: Side,
    /// Application data decrypted by rustls before the connection was converted.
    early: Vec<u8>,
    done: bool,
}

impl std::fmt::Debug for Handshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshake")
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

/// A completed handshake, converted.
pub struct Established {
    pub records: RecordLayer,
    /// The peer's certificate chain, leaf first.
    pub peer_certificates: Vec<CertificateDer<'static>>,
    pub alpn: Option<Vec<u8>>,
    /// Application data the peer sent before the conversion, already decrypted.
    pub early_plaintext: Vec<u8>,
}

impl std::fmt::Debug for Established {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Established")
            .field("early_plaintext", &self.early_plaintext.len())
            .finish_non_exhaustive()
    }
}

/// One round of rustls' unbuffered state machine on either side (the states have the same
/// shape for both; only their type differs).
macro_rules! advance_side {
    ($conn:expr, $incoming:expr, $out:expr, $early:expr, $done:expr) => {{
        let mut consumed = 0;
        while !*$done {
            let UnbufferedStatus { discard, state } =
                $conn.process_tls_records(&mut $incoming[consumed..]);
            let mut blocked = false;
            match state? {
                ConnectionState::EncodeTlsData(mut e) => {
                    let start = $out.len();
                    let mut room = 4096;
                    loop {
                        $out.resize(start + room, 0);
                        match e.encode(&mut $out[start..]) {
                            Ok(n) => {
                                $out.truncate(start + n);
                                break;
                            }
                            Err(EncodeError::InsufficientSize(s)) => room = s.required_size,
                            Err(_) => {
                                $out.truncate(start);
                                return Err(RecordError::Unexpected("handshake encoding"));
                            }
                        }
                    }
                }
                // `out` belongs to the caller, who writes it in order: as good as sent.
                ConnectionState::TransmitTlsData(t) => t.done(),
                ConnectionState::ReadTraffic(mut r) => {
                    while let Some(rec) = r.next_record() {
                        $early.extend_from_slice(rec?.payload);
                    }
                }
                ConnectionState::BlockedHandshake => blocked = true,
                ConnectionState::WriteTraffic(_) => {
                    if $conn.is_handshaking() {
                        blocked = true;
                    } else {
                        *$done = true;
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
    }};
}

impl Handshake {
    /// Starts the server's side. `config` must have `enable_secret_extraction` set.
    pub fn server(config: Arc<rustls::ServerConfig>) -> Result<Self, RecordError> {
        Ok(Handshake {
            conn: Side::Server(UnbufferedServerConnection::new(config)?),
            early: Vec::new(),
            done: false,
        })
    }

    /// Starts the client's side towards `name`. `config` must have `enable_secret_extraction`
    /// set. The first [`Handshake::advance`] (with no input) writes the ClientHello.
    pub fn client(
        config: Arc<rustls::ClientConfig>,
        name: ServerName<'static>,
    ) -> Result<Self, RecordError> {
        Ok(Handshake {
            conn: Side::Client(UnbufferedClientConnection::new(config, name)?),
            early: Vec::new(),
            done: false,
        })
    }

    /// Whether the handshake is complete ([`Handshake::finish`] may be called).
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Processes the ciphertext at the front of `incoming`; handshake records to send are
    /// appended to `out`. Returns how many bytes of `incoming` were consumed. Bytes after those
    /// are left for the next call (a partial record) or, once [`Handshake::is_done`], for
    /// the record layer.
    pub fn advance(
        &mut self,
        incoming: &mut [u8],
        out: &mut Vec<u8>,
    ) -> Result<usize, RecordError> {
        let (early, done) = (&mut self.early, &mut self.done);
        match &mut self.conn {
            Side::Server(c) => advance_side!(c, incoming, out, early, done),
            Side::Client(c) => advance_side!(c, incoming, out, early, done),
        }
    }

    /// Converts a completed handshake. Fails if [`Handshake::is_done`] is false.
    pub fn finish(self) -> Result<Established, RecordError> {
        fn owned(c: Option<&[CertificateDer<'_>]>) -> Vec<CertificateDer<'static>> {
            c.map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                .unwrap_or_default()
        }
        let (peer_certificates, alpn, secrets, kernel) = match self.conn {
            Side::Server(c) => {
                let certs = owned(c.peer_certificates());
                let alpn = c.alpn_protocol().map(<[u8]>::to_vec);
                let (secrets, kernel) = c.dangerous_into_kernel_connection()?;
                (certs, alpn, secrets, Kernel::Server(kernel))
            }
            Side::Client(c) => {
                let certs = owned(c.peer_certificates());
                let alpn = c.alpn_protocol().map(<[u8]>::to_vec);
                let (secrets, kernel) = c.dangerous_into_kernel_connection()?;
                (certs, alpn, secrets, Kernel::Client(kernel))
            }
        };
        Ok(Established {
            records: RecordLayer::new(secrets, kernel)?,
            peer_certificates,
            alpn,
            early_plaintext: self.early,
        })
    }
}

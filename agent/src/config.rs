//! How to reach relays, who to be, and the agent's limits; the library's errors.

use std::net::SocketAddr;
use std::time::Duration;

use rustls::pki_types::CertificateDer;

use openmesh_dataplane::pki::Identity;
use openmesh_dataplane::tls::TlsConfigError;
use openmesh_dataplane::wire::{
    Close, Hello, Role, WireError, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN,
};

/// Errors of the agent library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// A socket operation failed (connect, read, write).
    #[error("connect: {0}")]
    Io(#[from] std::io::Error),
    /// The identity or the CA certificates could not make a TLS configuration.
    #[error("tls config: {0}")]
    Tls(#[from] TlsConfigError),
    /// [`ClientConfig::server_name`] is not a valid DNS name or IP address.
    #[error("invalid server name {0}")]
    ServerName(String),
    /// The relay sent bytes that are not a valid frame.
    #[error("wire: {0}")]
    Wire(#[from] WireError),
    /// The TLS handshake failed, or a record from the relay did not open (tampered, or not
    /// TLS 1.3), or the relay's bytes are not frames.
    #[error("link: {0}")]
    Link(#[from] openmesh_dataplane::tls::transport::TransportError),
    /// The relay ended the session with CLOSE.
    #[error("relay closed the session: {} ({})", .0.text, .0.code)]
    Closed(Close),
    /// The relay answered the HELLO with something other than WELCOME or CLOSE.
    #[error("unexpected frame during handshake")]
    Unexpected,
    /// TCP connect, TLS handshake and WELCOME took longer than [`ClientConfig::connect_timeout`].
    #[error("timed out connecting (TCP, TLS handshake or WELCOME)")]
    Timeout,
    /// The session or the agent is closed.
    #[error("session is gone")]
    Gone,
    /// An envelope could not be encoded (a list or the schema id longer than the wire allows).
    #[error("envelope: {0}")]
    Envelope(WireError),
    /// End-to-end sealing failed, or the agent runs without [`ClientConfig::e2e`].
    #[error("end to end: {0}")]
    E2e(#[from] crate::E2eError),
    /// The relay's directory refused the request (`bad_signature`, `directory_full`,
    /// `rate_limited`, ...).
    #[error("directory refused: {0}")]
    Directory(openmesh_dataplane::wire::Reason),
}

/// How to reach relays, who to be, and the agent's limits.
///
/// ```
/// # fn demo(ca: Vec<rustls::pki_types::CertificateDer<'static>>) -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use openmesh_agent::ClientConfig;
/// use openmesh_dataplane::pki::Identity;
///
/// let mut cfg = ClientConfig::new("127.0.0.1:7400".parse()?, ca, Identity::generate_self_signed("alice")?);
/// cfg.fallback = vec!["127.0.0.1:7401".parse()?]; // tried when the first relay is gone
/// cfg.window = 1024;                                 // envelopes in flight per session
/// cfg.connect_timeout = Duration::from_secs(3);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// The relay to connect to first.
    pub relay: SocketAddr,
    /// Relays to try, in this order, when `relay` cannot be reached. When a connection is
    /// lost an [`crate::Agent`] tries the next relay of the list (wrapping around to `relay`),
    /// one attempt per backoff step; a relay's GOING_AWAY redirect is tried first.
    pub fallback: Vec<SocketAddr>,
    /// Name to verify in the relay's certificate (default: the relay's IP address).
    pub server_name: Option<String>,
    /// CA certificates to trust for the relay.
    pub ca: Vec<CertificateDer<'static>>,
    /// The agent's Ed25519 identity: its key is the agent id.
    pub identity: Identity,
    /// What the HELLO offers: versions, features, delivery classes wanted, largest frame,
    /// heartbeat interval wanted, schemas spoken.
    pub hello: Hello,
    /// Answer the relay's PINGs and PING a silent relay (turn off only to test dead-peer
    /// detection). A relay silent for three heartbeat intervals ends the session either way.
    pub answer_pings: bool,
    /// ACK every received envelope as soon as the library hands it to the application, instead
    /// of waiting for an explicit ACK. For sinks and load generators. ACKs, explicit or not,
    /// wait up to 1 ms for company (or until a quarter of the relay's deliver window waits) and
    /// leave with anything else written: one ACK frame answers many envelopes at any rate.
    pub auto_ack: bool,
    /// Local address to connect from (spreads many agents over 127.0.0.0/8).
    pub bind: Option<std::net::IpAddr>,
    /// How long one connection attempt may take in all: TCP connect, TLS handshake and
    /// WELCOME (a relay that accepts and never answers ends in [`ClientError::Timeout`]).
    pub connect_timeout: Duration,
    /// Most envelopes an [`crate::Agent`] has sent and not yet had answered, over all
    /// destinations (also never more than the relay's `send_window`). Sending waits when full.
    pub window: u32,
    /// Most unanswered envelopes to one destination, so one slow destination cannot take the
    /// whole window.
    pub destination_window: u32,
    /// First wait before reconnecting; it doubles after each failed attempt.
    pub reconnect_initial: Duration,
    /// Longest wait between reconnection attempts.
    pub reconnect_max: Duration,
    /// How long [`crate::Agent::close`] waits for outstanding answers and the relay's CLOSE.
    pub close_timeout: Duration,
    /// How long the connection may take no byte of what waits to be written before the agent
    /// gives it up (a relay that stops reading while it still talks: its heartbeat alone would
    /// keep the connection). The agent then reconnects as after any lost connection and sends
    /// what was unanswered again. A relay also stops reading on purpose, to hold a sender
    /// back: while what it keeps for the agent unanswered is at its bound (in a fleet, durable
    /// envelopes waiting for a path to a relay that is down). The default, two minutes, outlasts
    /// such pauses of ordinary length; past it the agent reconnects and sends again, and the
    /// destination's relay drops the copies it already has. (The relay gives an agent that
    /// reads nothing `session.write_timeout_ms`, 30 s by default.)
    pub write_timeout: Duration,
    /// End-to-end encryption: with `Some`, the agent holds a key-agreement key, publishes its
    /// bundle (keys and the HELLO's schemas as its capability descriptor) in the relay's
    /// directory on every connection and rotation, and can [`seal`](crate::Agent::seal) and
    /// [`open`](crate::Agent::open) envelopes. On by default.
    pub e2e: Option<crate::E2eConfig>,
}

impl ClientConfig {
    /// A config with the default HELLO (this build's versions, TCP+TLS, whatever classes the
    /// relay serves, 1 MiB frames, the relay's heartbeat), a window of 4,096 envelopes (1,024 per
    /// destination), reconnection from 100 ms doubling to 5 s, 10 s timeouts (two minutes for a
    /// connection that takes nothing written).
    pub fn new(relay: SocketAddr, ca: Vec<CertificateDer<'static>>, identity: Identity) -> Self {
        ClientConfig {
            relay,
            fallback: Vec::new(),
            server_name: None,
            ca,
            identity,
            hello: Hello {
                min_version: PROTOCOL_VERSION_MIN,
                max_version: PROTOCOL_VERSION_MAX,
                role: Role::Agent,
                features: openmesh_dataplane::wire::features::KNOWN,
                transports: 1,
                // Whatever the relay serves.
                classes: 0,
                max_frame: 1 << 20,
                heartbeat_ms: 0,
                schemas: Vec::new(),
            },
            answer_pings: true,
            auto_ack: false,
            bind: None,
            connect_timeout: Duration::from_secs(10),
            window: 4096,
            destination_window: 1024,
            reconnect_initial: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            close_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(120),
            e2e: Some(crate::E2eConfig::default()),
        }
    }

    /// The relays in the order they are tried: `relay`, then `fallback`.
    pub fn relays(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        std::iter::once(self.relay).chain(self.fallback.iter().copied())
    }

    /// Whether the window is deep enough for the relay to hold its ACKs to this agent for a
    /// moment (the HELLO then offers `features::ACK_DELAY`).
    pub(crate) fn deep_window(&self) -> bool {
        let min = openmesh_dataplane::wire::features::ACK_DELAY_MIN_WINDOW;
        self.window >= min && self.destination_window >= min
    }
}

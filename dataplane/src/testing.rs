//! A relay in memory, for tests and benchmarks that drive shards without sockets: a development
//! CA, a relay identity and its server TLS configuration (with the secret extraction the
//! shard's record layer needs after the handshake), TLS clients for agents (rustls, or the
//! agent library's transport handshaken with the relay's record layer), open-admission
//! settings, and a single-core shard. Nothing here is used by the relay itself.

use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::ClientConnection;

use crate::pki::{CertAuthority, Identity};
use crate::policy::{Admission, AdmissionMode};
use crate::session::SessionTimeouts;
use crate::shard::budget::RelayBudget;
use crate::shard::{Limits, SeqSource, Settings, Shard, ShardConfig};
use crate::signaling::ContractPolicy;
use crate::tls::handshake::Handshake;
use crate::tls::record::RecordLayer;
use crate::tls::transport::Transport;
use crate::wire::{Frame, Hello};

/// The relay's side of TLS in memory, and clients that trust it.
pub struct InMemoryRelay {
    pub ca: CertAuthority,
    pub relay: Identity,
    pub server_tls: Arc<rustls::ServerConfig>,
}

impl InMemoryRelay {
    /// A new CA and relay certificate for `localhost`.
    pub fn new() -> Self {
        let ca = CertAuthority::generate("in-memory ca").expect("CA");
        let relay = ca
            .issue_relay("relay", &["localhost".into()])
            .expect("relay certificate");
        let mut tls = (*crate::tls::server_config(&relay, AdmissionMode::Open, &[])
            .expect("server TLS configuration"))
        .clone();
        tls.enable_secret_extraction = true;
        InMemoryRelay {
            ca,
            relay,
            server_tls: Arc::new(tls),
        }
    }

    /// The shard configuration of this relay.
    pub fn shard_config(&self) -> ShardConfig {
        ShardConfig {
            tls: self.server_tls.clone(),
            link: None,
            relay_id: self.relay.relay_id(),
            agents: Arc::new(crate::directory::AgentDirectory::new(1 << 20, 3600)),
        }
    }

    /// One shard (core 0 of 1) with `settings` and a 1 GiB budget.
    pub fn shard(&self, settings: Settings) -> Shard {
        Shard::new(
            0,
            1,
            self.shard_config(),
            settings,
            Arc::new(SeqSource::default()),
            RelayBudget::new(1 << 30, 1),
        )
    }

    /// Shards `0..cores` of one relay with `settings`, sharing a 1 GiB budget.
    pub fn shards(&self, settings: Settings, cores: u16) -> Vec<Shard> {
        let seqs = Arc::new(SeqSource::default());
        let budget = RelayBudget::new(1 << 30, cores as usize);
        let config = self.shard_config();
        (0..cores)
            .map(|k| {
                Shard::new(
                    k,
                    cores,
                    config.clone(),
                    settings.clone(),
                    seqs.clone(),
                    budget.clone(),
                )
            })
            .collect()
    }

    /// A TLS client for agent `id` that trusts this relay.
    pub fn client(&self, id: &Identity) -> ClientConnection {
        let cfg = crate::tls::client_config(id, std::slice::from_ref(&self.ca.cert))
            .expect("client TLS configuration");
        ClientConnection::new(cfg, ServerName::try_from("localhost").expect("name"))
            .expect("client")
    }

    /// An agent's transport to this relay and the relay's record layer for it, handshaken in
    /// memory: what the agent seals, the record layer opens.
    pub fn records(&self, id: &Identity) -> (Transport, RecordLayer) {
        let cfg = crate::tls::client_config(id, std::slice::from_ref(&self.ca.cert))
            .expect("client TLS configuration");
        let name = ServerName::try_from("localhost").expect("name");
        let mut client = Transport::client(cfg, name, 1 << 24, 64 << 10).expect("client");
        let mut server = Handshake::server(self.server_tls.clone()).expect("server");
        let (mut to_server, mut to_client) = (Vec::new(), Vec::new());
        for _ in 0..10 {
            if let Some(hs) = client.take_handshake_output() {
                to_server.extend(hs);
            }
            let n = server
                .advance(&mut to_server, &mut to_client)
                .expect("server handshake");
            to_server.drain(..n);
            let mut rx = client.take_read_buf();
            rx.extend_from_slice(&to_client);
            to_client.clear();
            client.put_read_buf(rx);
            client.advance_handshake().expect("client handshake");
            if client.is_open() && server.is_done() && !client.has_handshake_output() {
                break;
            }
        }
        assert!(client.is_open() && server.is_done(), "handshake in memory");
        (client, server.finish().expect("established").records)
    }
}

impl Default for InMemoryRelay {
    fn default() -> Self {
        Self::new()
    }
}

/// Open admission, default contract and timeouts, and `limits`.
pub fn open_settings(limits: Limits) -> Settings {
    Settings {
        contract: ContractPolicy::default(),
        timeouts: SessionTimeouts::default(),
        admission: Admission {
            mode: AdmissionMode::Open,
            allow: Default::default(),
            deny: Default::default(),
        },
        limits,
    }
}

/// The HELLO an in-memory agent sends: protocol version 2, frames up to 1 MiB.
pub fn hello() -> Frame {
    Frame::Hello(Hello {
        min_version: 2,
        max_version: 2,
        transports: 1,
        max_frame: 1 << 20,
        ..Hello::default()
    })
}

/// A small seeded generator (xorshift*) for simulations: a seed replays the same schedule.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

//! The relay's configuration file: typed, defaulted in one place, every field documented in
//! `docs/OPERATIONS.md`, checked at start with a message naming the bad field.

use std::net::SocketAddr;
use std::path::PathBuf;

use std::collections::HashSet;

use openmesh_dataplane::engine::{Limits, Settings};
use openmesh_dataplane::policy::{Admission, AdmissionMode};
use openmesh_dataplane::session::SessionTimeouts;
use openmesh_dataplane::signaling::ContractPolicy;
use openmesh_dataplane::wire::{AgentId, DeliveryClass};
use serde::Deserialize;

/// The whole file. Every section and field is optional.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub relay: RelaySection,
    pub tls: TlsSection,
    pub session: SessionSection,
    /// The `[limits]` section is the engine's [`Limits`] itself (same names, same defaults).
    pub limits: Limits,
    pub store: StoreSection,
    pub link: LinkSection,
}

/// Relay links to the other relays of a fleet (with `--fleet`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LinkSection {
    /// Where the link listener binds. Unset: this relay's `link` address in the fleet file.
    pub listen: Option<SocketAddr>,
    /// The fleet CA's certificates (PEM): links admit only relay certificates it issued, and
    /// `tls.cert` must be one (`openmesh-relay fleet issue`). Unset: no links.
    pub ca: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSection {
    /// Keep durable envelopes on disk under `<relay.data_dir>/store` and offer the durable class.
    pub enabled: bool,
    /// Size each segment file is preallocated to, bytes.
    pub segment_bytes: u64,
    /// A write or sync running longer than this refuses durable envelopes until it completes,
    /// milliseconds.
    pub stall_ms: u64,
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection {
            enabled: true,
            segment_bytes: 16 << 20,
            stall_ms: 2000,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelaySection {
    /// Address agents connect to.
    pub listen: SocketAddr,
    /// Address of the Prometheus `/metrics` endpoint.
    pub metrics: SocketAddr,
    /// Directory for the development PKI (and, later, the store).
    pub data_dir: PathBuf,
    /// Dataplane cores; 0 means one per CPU.
    pub cores: usize,
    /// Pin each core thread to its CPU.
    pub pin_cores: bool,
    /// Period of each core's timer sweep, milliseconds.
    pub tick_ms: u64,
    /// Let the kernel back the relay's memory with transparent huge pages. Off by default:
    /// the first touch of each 2 MiB page stalls the core that makes it (see
    /// docs/OPERATIONS.md).
    pub huge_pages: bool,
    /// `plain` or `json`.
    pub log_format: String,
    /// A tracing filter such as `info` or `openmesh_dataplane=debug`.
    pub log_level: String,
}

impl Default for RelaySection {
    fn default() -> Self {
        RelaySection {
            listen: "127.0.0.1:7400".parse().expect("literal address"),
            metrics: "127.0.0.1:9400".parse().expect("literal address"),
            data_dir: PathBuf::from("./openmesh-data"),
            cores: 0,
            pin_cores: true,
            tick_ms: 100,
            huge_pages: false,
            log_format: "plain".into(),
            log_level: "info".into(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSection {
    /// Relay certificate chain (PEM). Empty: the development certificate under `data_dir/tls/`.
    pub cert: Option<PathBuf>,
    /// Relay private key (PEM, PKCS#8). Overridden by `OPENMESH_TLS_KEY`.
    pub key: Option<PathBuf>,
    /// CA certificates (PEM) trusted for agents in `ca-only` admission. Empty: the development CA.
    pub ca: Option<PathBuf>,
    /// `open` (any agent key, self-signed certificates accepted) or `ca-only`.
    pub admission: String,
    /// Agent ids (64 hex characters) admitted; empty admits all.
    pub allow: Vec<String>,
    /// Agent ids never admitted.
    pub deny: Vec<String>,
}

impl Default for TlsSection {
    fn default() -> Self {
        TlsSection {
            cert: None,
            key: None,
            ca: None,
            admission: "open".into(),
            allow: Vec::new(),
            deny: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionSection {
    pub heartbeat_ms: u32,
    pub heartbeat_min_ms: u32,
    pub heartbeat_max_ms: u32,
    pub handshake_timeout_ms: u64,
    pub drain_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub write_timeout_ms: u64,
    pub max_frame: u32,
    pub rate_frames: u32,
    pub rate_bytes: u64,
    pub max_ttl_ms: u64,
    pub key_rotation_s: u32,
    pub deliver_window: u32,
    pub deliver_window_bytes: u32,
    pub send_window: u32,
}

impl Default for SessionSection {
    fn default() -> Self {
        let p = openmesh_dataplane::signaling::ContractPolicy::default();
        let t = openmesh_dataplane::session::SessionTimeouts::default();
        SessionSection {
            heartbeat_ms: p.heartbeat_ms,
            heartbeat_min_ms: p.heartbeat_min_ms,
            heartbeat_max_ms: p.heartbeat_max_ms,
            handshake_timeout_ms: t.handshake_us / 1000,
            drain_timeout_ms: t.drain_us / 1000,
            idle_timeout_ms: t.idle_us / 1000,
            write_timeout_ms: t.write_us / 1000,
            max_frame: p.max_frame,
            rate_frames: p.rate_frames,
            rate_bytes: p.rate_bytes,
            max_ttl_ms: p.max_ttl_ms,
            key_rotation_s: p.key_rotation_s,
            deliver_window: p.deliver_window,
            deliver_window_bytes: p.deliver_window_bytes,
            send_window: p.send_window,
        }
    }
}

impl Config {
    /// The engine settings this file describes (the part that can change on SIGHUP).
    pub fn settings(&self, mode: AdmissionMode) -> Settings {
        let s = &self.session;
        let ids = |v: &[String]| -> HashSet<AgentId> {
            v.iter().filter_map(|s| AgentId::from_hex(s)).collect()
        };
        Settings {
            contract: ContractPolicy {
                heartbeat_ms: s.heartbeat_ms,
                heartbeat_min_ms: s.heartbeat_min_ms,
                heartbeat_max_ms: s.heartbeat_max_ms,
                max_frame: s.max_frame,
                rate_frames: s.rate_frames,
                rate_bytes: s.rate_bytes,
                max_ttl_ms: s.max_ttl_ms,
                classes: DeliveryClass::BestEffort.bit()
                    | DeliveryClass::AtLeastOnce.bit()
                    | if self.store.enabled {
                        DeliveryClass::Durable.bit()
                    } else {
                        0
                    },
                key_rotation_s: s.key_rotation_s,
                deliver_window: s.deliver_window,
                deliver_window_bytes: s.deliver_window_bytes,
                send_window: s.send_window,
                ..ContractPolicy::default()
            },
            timeouts: SessionTimeouts {
                handshake_us: s.handshake_timeout_ms * 1000,
                drain_us: s.drain_timeout_ms * 1000,
                idle_us: s.idle_timeout_ms * 1000,
                write_us: s.write_timeout_ms * 1000,
            },
            admission: Admission {
                mode,
                allow: ids(&self.tls.allow),
                deny: ids(&self.tls.deny),
            },
            limits: self.limits.clone(),
        }
    }

    /// Where and how durable envelopes are stored, if they are.
    pub fn store(&self) -> Option<openmesh_dataplane::engine::store::StoreConfig> {
        self.store
            .enabled
            .then(|| openmesh_dataplane::engine::store::StoreConfig {
                dir: self.relay.data_dir.join("store"),
                segment_bytes: self.store.segment_bytes,
                stall_ms: self.store.stall_ms,
            })
    }

    /// Checks value ranges; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        let s = &self.session;
        let l = &self.limits;
        let checks: [(bool, &str); 15] = [
            (self.store.segment_bytes >= 1 << 16 && self.store.segment_bytes <= 1 << 34 && self.store.stall_ms > 0, "store.segment_bytes must be 64 KiB..=16 GiB and store.stall_ms > 0"),
            (matches!(self.relay.log_format.as_str(), "plain" | "json"), "relay.log_format must be \"plain\" or \"json\""),
            (self.relay.tick_ms >= 1 && self.relay.tick_ms <= 10_000, "relay.tick_ms must be 1..=10000"),
            (matches!(self.tls.admission.as_str(), "open" | "ca-only"), "tls.admission must be \"open\" or \"ca-only\""),
            (s.heartbeat_min_ms >= 100 && s.heartbeat_min_ms <= s.heartbeat_max_ms, "session.heartbeat_min_ms must be >= 100 and <= heartbeat_max_ms"),
            (s.heartbeat_ms >= s.heartbeat_min_ms && s.heartbeat_ms <= s.heartbeat_max_ms, "session.heartbeat_ms must lie within heartbeat_min_ms..=heartbeat_max_ms"),
            (s.max_frame >= openmesh_dataplane::signaling::MIN_FRAME && s.max_frame <= 16 << 20, "session.max_frame must be 4096..=16777216"),
            (s.rate_frames > 0, "session.rate_frames must be > 0"),
            (s.rate_bytes >= s.max_frame as u64, "session.rate_bytes must be >= session.max_frame"),
            (s.max_ttl_ms > 0, "session.max_ttl_ms must be > 0"),
            (l.memory_budget >= 16 << 20, "limits.memory_budget must be at least 16 MiB"),
            (s.deliver_window > 0 && s.send_window > 0 && s.deliver_window_bytes >= s.max_frame, "session.deliver_window and send_window must be > 0, deliver_window_bytes >= session.max_frame"),
            (s.handshake_timeout_ms > 0 && s.drain_timeout_ms > 0 && s.write_timeout_ms > 0, "session.handshake_timeout_ms, drain_timeout_ms and write_timeout_ms must be > 0"),
            (l.max_connections_per_core > 0 && l.send_queue_envelopes > 0 && l.mailbox_capacity >= 16, "limits.max_connections_per_core and send_queue_envelopes must be > 0, mailbox_capacity >= 16"),
            (l.send_queue_bytes() >= s.max_frame as usize && l.read_buffer >= 4096, "limits.send_queue_bytes (default memory_budget / 64) must be >= session.max_frame and read_buffer >= 4096"),
        ];
        for (ok, msg) in checks {
            if !ok {
                return Err(msg.to_string());
            }
        }
        for (name, list) in [("tls.allow", &self.tls.allow), ("tls.deny", &self.tls.deny)] {
            for id in list {
                if openmesh_dataplane::wire::AgentId::from_hex(id).is_none() {
                    return Err(format!("{name}: {id:?} is not a 64-character hex agent id"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_file_parses_and_matches_the_defaults() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/openmesh-relay.example.toml"
        ))
        .unwrap();
        let c: Config = toml::from_str(&text).unwrap();
        c.validate().unwrap();
        let d = Config::default();
        assert_eq!(c.relay.listen, d.relay.listen);
        assert_eq!(c.session.max_frame, d.session.max_frame);
        assert_eq!(c.limits.send_queue_envelopes, d.limits.send_queue_envelopes);
        assert_eq!(c.session.heartbeat_ms, d.session.heartbeat_ms);
    }

    #[test]
    fn bad_values_name_their_field() {
        let c: Config = toml::from_str("[session]\nmax_frame = 10\n").unwrap();
        assert!(c.validate().unwrap_err().contains("session.max_frame"));
        let c: Config = toml::from_str("[tls]\nallow = [\"zz\"]\n").unwrap();
        assert!(c.validate().unwrap_err().contains("tls.allow"));
        assert!(toml::from_str::<Config>("[relay]\nlisten_addr = \"x\"\n").is_err());
    }
}

//! What the examples share: where the relay is, its CA, and identities kept by name.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use openmesh_agent::ClientConfig;
use openmesh_dataplane::pki::{ed25519_key_of, load_certs, Identity};
use openmesh_dataplane::wire::AgentId;

/// Options every example takes.
#[derive(clap::Args)]
pub struct Relay {
    /// Relay address (the README's default relay).
    #[arg(long, default_value = "127.0.0.1:7400", global = true)]
    pub relay: SocketAddr,
    /// CA certificate of the relay (the default relay writes its development CA here).
    #[arg(long, default_value = "openmesh-data/tls/dev-ca.pem", global = true)]
    pub ca: PathBuf,
    /// Where identities are kept, one per name.
    #[arg(long, default_value = "openmesh-data/agents", global = true)]
    pub dir: PathBuf,
}

impl Relay {
    /// A config for the agent called `name` (its identity made on first use).
    pub fn config(&self, name: &str) -> anyhow::Result<ClientConfig> {
        let ca = load_certs(&self.ca).with_context(|| {
            format!(
                "reading the relay CA {} (is the relay running?)",
                self.ca.display()
            )
        })?;
        let id = Identity::load_or_generate(
            &self.dir.join(format!("{name}.pem")),
            &self.dir.join(format!("{name}-key.pem")),
            name,
        )?;
        Ok(ClientConfig::new(self.relay, ca, id))
    }

    /// The agent id of a name known under `--dir`, or a 64-character hex id.
    #[allow(dead_code)] // not every example names agents
    pub fn resolve(&self, to: &str) -> anyhow::Result<AgentId> {
        if let Some(id) = AgentId::from_hex(to) {
            return Ok(id);
        }
        let cert = self.dir.join(format!("{to}.pem"));
        if !Path::new(&cert).exists() {
            bail!(
                "no agent named {to:?} under {} and not a hex id",
                self.dir.display()
            );
        }
        Ok(AgentId(ed25519_key_of(&load_certs(&cert)?[0])?))
    }
}

//! A small agent to try a relay by hand.
//!
//! ```text
//! cargo run --example agent -- recv --name bob          # prints bob's agent id, waits
//! cargo run --example agent -- send --name alice --to bob --text "hello"
//! ```
//!
//! Identities are kept under `./openmesh-data/agents/NAME.pem`; `--to` takes a name known there
//! or a 64-character hex agent id. The relay's development CA is read from
//! `./openmesh-data/tls/dev-ca.pem` unless `--ca` says otherwise.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use openmesh_agent::{Agent, ClientConfig, Outcome};
use openmesh_dataplane::pki::{load_certs, Identity};
use openmesh_dataplane::wire::{flags, AgentId, DeliveryClass, Jurisdiction, RelayId};

#[derive(Parser)]
struct Cli {
    /// Relay address.
    #[arg(long, default_value = "127.0.0.1:7400", global = true)]
    relay: SocketAddr,
    /// CA certificate of the relay.
    #[arg(long, default_value = "openmesh-data/tls/dev-ca.pem", global = true)]
    ca: PathBuf,
    /// Where identities are kept.
    #[arg(long, default_value = "openmesh-data/agents", global = true)]
    dir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Wait for envelopes and print them.
    Recv {
        #[arg(long, default_value = "bob")]
        name: String,
        /// Exit after this many envelopes (0: never).
        #[arg(long, default_value_t = 0)]
        count: u64,
    },
    /// Send envelopes to another agent and wait for the relay's ACKs.
    Send {
        #[arg(long, default_value = "alice")]
        name: String,
        /// Destination: a name under --dir or a hex agent id.
        #[arg(long)]
        to: String,
        #[arg(long, default_value = "hello from OpenMesh")]
        text: String,
        #[arg(long, default_value_t = 1)]
        count: u64,
        /// Time to live, milliseconds.
        #[arg(long, default_value_t = 600_000)]
        ttl_ms: u64,
        /// Schema id carried in the envelope.
        #[arg(long, default_value = "market/proposal@2.1")]
        schema: String,
        /// Delivery class: best-effort, at-least-once, or durable (written to the relay's
        /// store and synced before the relay ACKs it).
        #[arg(long, default_value = "at-least-once", value_parser = class)]
        class: DeliveryClass,
        #[command(flatten)]
        route: Route,
    },
}

/// Constraints on the relays the envelope may cross (in a relay fleet, docs/FLEET.md).
#[derive(clap::Args)]
struct Route {
    /// Jurisdictions allowed (ISO codes or blocs such as EU), comma-separated.
    #[arg(long, value_delimiter = ',')]
    jurisdictions: Vec<String>,
    /// Least trust (0-100) a relay needs to carry the envelope.
    #[arg(long, default_value_t = 0)]
    min_trust: u8,
    /// Relays never to cross: names in --fleet's file, or hex relay ids; comma-separated.
    #[arg(long, value_delimiter = ',')]
    avoid: Vec<String>,
    /// Send the envelope over this many relay-disjoint paths (1-4); delivered once.
    #[arg(long, default_value_t = 1)]
    multipath: u8,
    /// The fleet file, to name relays in --avoid.
    #[arg(long)]
    fleet: Option<PathBuf>,
}

impl Route {
    fn apply(&self, b: &mut openmesh_dataplane::wire::EnvelopeBuilder) -> anyhow::Result<()> {
        let c = &mut b.constraints;
        for j in &self.jurisdictions {
            c.jurisdictions
                .push(Jurisdiction::parse(j).with_context(|| format!("{j:?} is not a code"))?);
        }
        c.min_trust = self.min_trust;
        c.multipath_k = self.multipath;
        let snap = match &self.fleet {
            Some(f) => Some(openmesh_dataplane::fleet::file::parse(
                &std::fs::read_to_string(f)?,
            )?),
            None => None,
        };
        for a in &self.avoid {
            let by_name = snap
                .as_ref()
                .and_then(|s| s.relays.iter().find(|r| r.name == *a).map(|r| r.id));
            let id = by_name
                .or_else(|| RelayId::from_hex(a))
                .with_context(|| format!("{a:?}: not a relay of --fleet, nor a hex relay id"))?;
            c.avoid.push(id);
        }
        Ok(())
    }
}

fn class(s: &str) -> Result<DeliveryClass, String> {
    match s {
        "best-effort" => Ok(DeliveryClass::BestEffort),
        "at-least-once" => Ok(DeliveryClass::AtLeastOnce),
        "durable" => Ok(DeliveryClass::Durable),
        _ => Err("one of best-effort, at-least-once, durable".into()),
    }
}

fn identity(dir: &std::path::Path, name: &str) -> anyhow::Result<Identity> {
    Ok(Identity::load_or_generate(
        &dir.join(format!("{name}.pem")),
        &dir.join(format!("{name}-key.pem")),
        name,
    )?)
}

fn resolve(dir: &std::path::Path, to: &str) -> anyhow::Result<AgentId> {
    if let Some(id) = AgentId::from_hex(to) {
        return Ok(id);
    }
    let cert = dir.join(format!("{to}.pem"));
    if !cert.exists() {
        bail!(
            "no agent named {to:?} under {} (run `recv --name {to}` first) and not a hex id",
            dir.display()
        );
    }
    Ok(AgentId(openmesh_dataplane::pki::ed25519_key_of(
        &load_certs(&cert)?[0],
    )?))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let ca = load_certs(&cli.ca)
        .with_context(|| format!("reading the relay CA {}", cli.ca.display()))?;
    match cli.cmd {
        Cmd::Recv { name, count } => {
            let id = identity(&cli.dir, &name)?;
            let mut agent = Agent::connect(ClientConfig::new(cli.relay, ca, id)).await?;
            println!(
                "{name} connected as {} (protocol v{})",
                agent.id().to_hex(),
                agent.welcome().version
            );
            let mut got = 0;
            while let Some(e) = agent.recv().await {
                got += 1;
                // Sealed end to end (`agent/examples/encrypted.rs`): opened here.
                let text = if e.flags() & flags::SEALED != 0 {
                    match agent.open(&e) {
                        Ok(o) => String::from_utf8_lossy(&o.plaintext).into_owned(),
                        Err(err) => format!("(sealed, rejected: {err})"),
                    }
                } else {
                    String::from_utf8_lossy(&e.payload()).into_owned()
                };
                println!(
                    "from {} [{}] {}: {text}",
                    e.source(),
                    e.schema(),
                    e.message_id()
                );
                agent.ack(&e).await?;
                if count > 0 && got >= count {
                    break;
                }
            }
            // Writes the last ACKs and CLOSE before the session ends.
            agent.close().await?;
        }
        Cmd::Send {
            name,
            to,
            text,
            count,
            ttl_ms,
            schema,
            class,
            route,
        } => {
            let to = resolve(&cli.dir, &to)?;
            let agent =
                Agent::connect(ClientConfig::new(cli.relay, ca, identity(&cli.dir, &name)?))
                    .await?;
            let mut handles = Vec::new();
            for _ in 0..count {
                let mut b = agent.envelope_to(to);
                b.expires_ms = b.created_ms + ttl_ms;
                b.schema = schema.clone();
                b.class = class;
                route.apply(&mut b)?;
                handles.push(agent.send(&b.build(text.as_bytes())?).await?);
            }
            let (mut accepted, mut refused) = (0, 0);
            for mut h in handles {
                match h.outcome().await {
                    Outcome::Accepted | Outcome::Sent => accepted += 1,
                    other => {
                        refused += 1;
                        println!("{}: {other:?}", h.message_id());
                    }
                }
            }
            println!("{accepted} acknowledged, {refused} refused");
            agent.close().await?;
            if refused > 0 {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}

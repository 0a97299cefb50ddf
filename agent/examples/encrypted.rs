//! Two agents exchanging end-to-end encrypted envelopes through the README's default relay.
//!
//! ```text
//! # terminal 1: bob waits (his key bundle is published at the relay when he connects)
//! cargo run -p openmesh-agent --example encrypted -- recv --name bob
//! # terminal 2: alice looks bob's bundle up, seals to it and sends
//! cargo run -p openmesh-agent --example encrypted -- send --name alice --to bob --text "for bob only"
//! ```
//!
//! The relay forwards ciphertext: it can neither read the text nor alter the envelope unseen.

#[path = "common/mod.rs"]
mod common;

use clap::{Parser, Subcommand};
use openmesh_agent::{Agent, Outcome};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    relay: common::Relay,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Wait for sealed envelopes, open and print them.
    Recv {
        #[arg(long, default_value = "bob")]
        name: String,
        /// Exit after this many envelopes (0: never).
        #[arg(long, default_value_t = 0)]
        count: u64,
    },
    /// Seal a text to another agent and send it.
    Send {
        #[arg(long, default_value = "alice")]
        name: String,
        /// A name under --dir (an agent that ran `recv` here) or a hex agent id.
        #[arg(long)]
        to: String,
        #[arg(long, default_value = "hello, end to end")]
        text: String,
        #[arg(long, default_value_t = 1)]
        count: u64,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Recv { name, count } => {
            let mut agent = Agent::connect(cli.relay.config(&name)?).await?;
            let key = agent.bundle().expect("end to end is on by default").keys[0].id;
            println!(
                "{name} is {} (key-agreement key {}); waiting",
                agent.id().to_hex(),
                key.iter().map(|b| format!("{b:02x}")).collect::<String>()
            );
            let mut got = 0;
            while let Some(env) = agent.recv().await {
                match agent.open(&env) {
                    Ok(o) => println!(
                        "from {} [{}]: {}",
                        o.source,
                        o.schema,
                        String::from_utf8_lossy(&o.plaintext)
                    ),
                    Err(e) => println!("from {}: rejected ({e})", env.source()),
                }
                // ACKed either way: a rejected envelope is not worth delivering again.
                agent.ack(&env).await?;
                got += 1;
                if count > 0 && got >= count {
                    break;
                }
            }
            agent.close().await?;
        }
        Cmd::Send {
            name,
            to,
            text,
            count,
        } => {
            let to = cli.relay.resolve(&to)?;
            let agent = Agent::connect(cli.relay.config(&name)?).await?;
            let mut handles = Vec::new();
            for _ in 0..count {
                let mut b = agent.envelope_to(to);
                b.schema = "chat/text@1".into();
                // Looks the recipient's bundle up at the relay once, then uses the cache.
                let env = agent.seal(&b, text.as_bytes()).await?;
                handles.push(agent.send(&env).await?);
            }
            let mut refused = 0;
            for mut h in handles {
                match h.outcome().await {
                    Outcome::Accepted | Outcome::Sent => {}
                    other => {
                        refused += 1;
                        println!("{}: {other:?}", h.message_id());
                    }
                }
            }
            let s = agent.e2e_stats().unwrap_or_default();
            println!(
                "{} sealed ({} context), {refused} refused",
                s.sealed, s.contexts_sent
            );
            agent.close().await?;
            if refused > 0 {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}

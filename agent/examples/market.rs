//! The seed's market coordination: a buyer finds the agents that speak the proposal schema in
//! the relay's directory, sends each a sealed proposal, and collects their sealed bids.
//!
//! ```text
//! # terminals 1 and 2: sellers publish that they speak market/proposal@2.1, then wait
//! cargo run -p openmesh-agent --example market -- seller --name s1 --price 12
//! cargo run -p openmesh-agent --example market -- seller --name s2 --price 9
//! # terminal 3: the buyer
//! cargo run -p openmesh-agent --example market -- buyer --name buyer --item "gpu-hours:40"
//! ```

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use clap::{Parser, Subcommand};
use openmesh_agent::Agent;

const PROPOSAL: &str = "market/proposal@2.1";
const BID: &str = "market/bid@2.1";

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    relay: common::Relay,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Speak the proposal schema; answer every proposal with a bid.
    Seller {
        #[arg(long, default_value = "seller")]
        name: String,
        /// The price this seller bids.
        #[arg(long, default_value_t = 10)]
        price: u32,
        /// Exit after this many proposals (0: never).
        #[arg(long, default_value_t = 0)]
        count: u64,
    },
    /// Broadcast a proposal to every seller and pick the lowest bid.
    Buyer {
        #[arg(long, default_value = "buyer")]
        name: String,
        #[arg(long, default_value = "gpu-hours:40")]
        item: String,
        /// How long to wait for bids, milliseconds.
        #[arg(long, default_value_t = 3000)]
        wait_ms: u64,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Seller { name, price, count } => {
            let mut cfg = cli.relay.config(&name)?;
            // The schemas in HELLO are the capability descriptor the directory indexes.
            cfg.hello.schemas = vec![PROPOSAL.into()];
            let mut agent = Agent::connect(cfg).await?;
            println!("{name} ({}) speaks {PROPOSAL}; waiting", agent.id());
            let mut seen = 0;
            while let Some(env) = agent.recv().await {
                let opened = agent.open(&env);
                agent.ack(&env).await?;
                let Ok(p) = opened else {
                    println!("rejected an envelope from {}", env.source());
                    continue;
                };
                if p.schema != PROPOSAL {
                    continue;
                }
                println!(
                    "proposal from {}: {}; bidding {price}",
                    p.source,
                    String::from_utf8_lossy(&p.plaintext)
                );
                let mut b = agent.envelope_to(p.source);
                b.schema = BID.into();
                let bid = format!("{}:{price}", String::from_utf8_lossy(&p.plaintext));
                let env = agent.seal(&b, bid.as_bytes()).await?;
                agent.send(&env).await?;
                seen += 1;
                if count > 0 && seen >= count {
                    break;
                }
            }
            agent.close().await?;
        }
        Cmd::Buyer {
            name,
            item,
            wait_ms,
        } => {
            let mut agent = Agent::connect(cli.relay.config(&name)?).await?;
            let sellers = agent.lookup_schema(PROPOSAL, 1000).await?;
            if sellers.is_empty() {
                anyhow::bail!("no agent speaks {PROPOSAL} at this relay (start a seller first)");
            }
            for s in &sellers {
                let mut b = agent.envelope_to(s.agent);
                b.schema = PROPOSAL.into();
                // The bundle came with the lookup (verified): no second round trip.
                let env = agent.seal_with(&b, s, item.as_bytes())?;
                agent.send(&env).await?;
            }
            println!("proposal {item:?} sent to {} sellers", sellers.len());
            let mut best: Option<(u32, String)> = None;
            let mut bids = 0;
            let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
            while bids < sellers.len() {
                let Ok(Some(env)) = tokio::time::timeout_at(deadline, agent.recv()).await else {
                    break;
                };
                let opened = agent.open(&env);
                agent.ack(&env).await?;
                let Ok(o) = opened.map_err(|e| println!("rejected: {e}")) else {
                    continue;
                };
                let text = String::from_utf8_lossy(&o.plaintext).to_string();
                let price = text.rsplit(':').next().and_then(|p| p.parse::<u32>().ok());
                println!("bid from {}: {text}", o.source);
                bids += 1;
                if let Some(p) = price {
                    if best.as_ref().is_none_or(|(b, _)| p < *b) {
                        best = Some((p, o.source.to_string()));
                    }
                }
            }
            match best {
                Some((p, who)) => println!("{bids} bids; best {p} from {who}"),
                None => println!("no bids within {wait_ms} ms"),
            }
            agent.close().await?;
        }
    }
    Ok(())
}

//! `openmesh-relay fleet check FILE`: a fleet file validated the way a relay loads it, with
//! what it describes.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use openmesh_dataplane::fleet::{file, path};

pub fn check(p: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    let snap = file::parse(&text).with_context(|| format!("fleet file {} refused", p.display()))?;
    // Written with errors returned, not panics (a closed pipe ends the listing).
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "fleet file ok: generation {}, {} relays, {} links, {} blocs, {} policies, {} revoked",
        snap.generation,
        snap.relays.len(),
        snap.links.len(),
        snap.blocs.len(),
        snap.policies.len(),
        snap.revoked.len()
    )?;
    for r in &snap.relays {
        writeln!(
            out,
            "relay {:<12} {} trust {:>3}  agents {}  links {}{}",
            r.name,
            r.jurisdiction.as_str(),
            r.trust,
            r.agent_addr,
            r.link_addr,
            if snap.revoked.contains(&r.id) {
                "  REVOKED"
            } else {
                ""
            }
        )?;
    }
    let g = path::Graph::new(&snap);
    let all = path::AllUp(&snap);
    let c = path::Constraints::default();
    writeln!(out, "low-latency paths (no envelope constraints):")?;
    for (a, ra) in snap.relays.iter().enumerate() {
        for (b, rb) in snap.relays.iter().enumerate() {
            if a == b {
                continue;
            }
            match g.route(&all, a, b, &c) {
                Ok(r) => writeln!(
                    out,
                    "  {} -> {}: {} ({} us)",
                    ra.name,
                    rb.name,
                    r.paths[0]
                        .iter()
                        .map(|i| snap.relays[*i].name.as_str())
                        .collect::<Vec<_>>()
                        .join(" > "),
                    r.weight
                )?,
                Err(e) => writeln!(out, "  {} -> {}: {e}", ra.name, rb.name)?,
            }
        }
    }
    Ok(())
}

//! `openmesh-relay store inspect`: what the store holds, read from the segment files without
//! starting the relay or changing anything.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use openmesh_dataplane::engine::store::{read_segments, segment_name};
use openmesh_dataplane::store::recovery;
use openmesh_dataplane::wire::AgentId;

#[derive(Default)]
struct Queue {
    envelopes: u64,
    bytes: u64,
    oldest_ms: u64,
}

pub fn run(dir: &Path) -> anyhow::Result<()> {
    let now_ms = openmesh_dataplane::engine::unix_ms();
    let found = read_segments(dir).with_context(|| format!("reading {}", dir.display()))?;
    let disk: u64 = found
        .scans
        .iter()
        .map(|(id, _)| {
            std::fs::metadata(dir.join(segment_name(id.core, id.number)))
                .map(|m| m.len())
                .unwrap_or(0)
        })
        .sum();
    // As many duplicate windows as a start with the default limits carries over.
    let windows = openmesh_dataplane::engine::Limits::default().dedup_epochs / 2;
    let rec = recovery::recover(found.scans, now_ms, windows);
    let st = &rec.stats;
    println!("store {}", dir.display());
    println!(
        "segments {}, {} bytes on disk, {} records: {} envelopes live, {} released, {} expired",
        st.segments,
        disk,
        st.records,
        rec.live.len(),
        st.released,
        st.expired
    );
    println!(
        "duplicate windows: {} (sources and epochs whose ids a start remembers)",
        st.windows
    );
    if st.duplicates > 0 {
        println!(
            "{} live records repeat an envelope stored before them: not served again",
            st.duplicates
        );
    }
    for (id, cut) in &st.cuts {
        println!(
            "cut: {} at offset {} ({}), {} non-zero bytes after it",
            segment_name(id.core, id.number),
            cut.offset,
            cut.reason.label(),
            cut.bytes_lost
        );
    }
    for u in &found.unfinished {
        println!(
            "no header (creation did not finish, removed at start{}): {}",
            if u.non_zero { ", kept aside" } else { "" },
            segment_name(u.id.core, u.id.number)
        );
    }
    for p in &found.strangers {
        println!("not a segment: {}", p.display());
    }
    let mut queues: BTreeMap<AgentId, Queue> = BTreeMap::new();
    for (_, e) in &rec.live {
        let created = e.envelope().map(|env| env.created_ms()).unwrap_or(now_ms);
        let q = queues.entry(e.destination).or_default();
        q.envelopes += 1;
        q.bytes += e.body.len() as u64;
        q.oldest_ms = q.oldest_ms.max(now_ms.saturating_sub(created));
    }
    if !queues.is_empty() {
        println!(
            "{:<64}  {:>10}  {:>12}  {:>10}",
            "destination", "envelopes", "bytes", "oldest_s"
        );
    }
    for (dst, q) in &queues {
        println!(
            "{:<64}  {:>10}  {:>12}  {:>10.1}",
            dst.to_hex(),
            q.envelopes,
            q.bytes,
            q.oldest_ms as f64 / 1000.0
        );
    }
    Ok(())
}

//! The store's files at start: find and read every segment, recover what is live, and hand
//! each core its part. Blocking file I/O, run once before the cores start (and by
//! `openmesh-relay store inspect`); while the relay runs, each core's log is written through
//! its own ring (`crate::engine`).
//!
//! Opening rewrites the store: the live envelopes are copied into one new segment per core
//! that is now their destination's home, synced, and only then are the old segments removed
//! (the directory synced after each step). A crash in between leaves both copies, which
//! recovery reads as one (same sequence numbers). This is what lets a restart with another
//! number of cores lose nothing, and it drops whatever a long-lived envelope pinned.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::shard::ShardStore;
use crate::store::record::{self, Record, Scan};
use crate::store::recovery::{self, RecoveryStats, SegmentId, Unfinished};

/// How the relay stores durable envelopes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    /// The directory of the segment files (`<data_dir>/store`).
    pub dir: PathBuf,
    /// Size each new segment is preallocated to.
    pub segment_bytes: u64,
    /// A file operation running longer than this makes the core refuse durable envelopes
    /// until it completes, milliseconds.
    pub stall_ms: u64,
}

/// Where segments cut with data after the cut are moved at start (under the store directory).
pub const DAMAGED: &str = "damaged";

/// The file name of segment `number` of `core`.
pub fn segment_name(core: u16, number: u64) -> String {
    format!("seg-{core:03}-{number:016x}.log")
}

/// The path of segment `number` of `core` under `dir`.
pub fn segment_path(dir: &Path, core: u16, number: u64) -> PathBuf {
    dir.join(segment_name(core, number))
}

/// Core and number of a segment file name; `None` for any other file.
pub fn parse_segment_name(name: &str) -> Option<(u16, u64)> {
    let rest = name.strip_prefix("seg-")?.strip_suffix(".log")?;
    let (core, number) = rest.split_once('-')?;
    if core.len() != 3 || number.len() != 16 {
        return None;
    }
    Some((core.parse().ok()?, u64::from_str_radix(number, 16).ok()?))
}

/// Fsyncs a directory (after a file in it was created or removed).
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// The files found in a store directory.
#[derive(Default)]
pub struct Found {
    /// Every segment with a header, scanned, in (core, number) order.
    pub scans: Vec<(SegmentId, Scan)>,
    /// Segment files without a header.
    pub unfinished: Vec<Unfinished>,
    /// Files that are not segments (left alone).
    pub strangers: Vec<PathBuf>,
}

/// Reads and scans every segment file under `dir` (none if it does not exist). Envelope bodies
/// are copied out of the file buffers, so memory follows the records written, not the
/// preallocated size.
pub fn read_segments(dir: &Path) -> io::Result<Found> {
    let mut found = Found::default();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(e),
    };
    let mut names: Vec<(u16, u64, PathBuf)> = Vec::new();
    for e in entries {
        let e = e?;
        if e.file_type()?.is_dir() {
            continue;
        }
        let name = e.file_name();
        match name.to_str().and_then(parse_segment_name) {
            Some((core, number)) => names.push((core, number, e.path())),
            None => found.strangers.push(e.path()),
        }
    }
    names.sort();
    for (core, number, path) in names {
        let id = SegmentId { core, number };
        let data = Bytes::from(fs::read(&path)?);
        let non_zero = data.iter().any(|b| *b != 0);
        let Some(mut scan) = record::scan(data) else {
            found.unfinished.push(Unfinished { id, non_zero });
            continue;
        };
        for (_, r) in &mut scan.records {
            if let Record::Envelope(e) = r {
                e.body = Bytes::copy_from_slice(&e.body);
            }
        }
        found.scans.push((id, scan));
    }
    Ok(found)
}

/// What opening the store did.
pub struct Opened {
    /// One per core, in core order.
    pub cores: Vec<ShardStore>,
    pub stats: RecoveryStats,
    /// Live envelopes served again.
    pub recovered: usize,
    /// Envelopes whose record did not decode as an envelope any more (counted, dropped).
    pub undecodable: usize,
}

/// Opens the store under `cfg.dir` for `cores` cores at `now_ms`: recovers, rewrites the live
/// envelopes per home core and at most `windows` duplicate windows
/// ([`crate::store::recovery::plan`]), removes the old segments.
pub fn open(cfg: &StoreConfig, cores: u16, now_ms: u64, windows: usize) -> io::Result<Opened> {
    fs::create_dir_all(&cfg.dir)?;
    let found = read_segments(&cfg.dir)?;
    for p in &found.strangers {
        tracing::warn!(path = %p.display(), "not a store segment: left alone");
    }
    for u in &found.unfinished {
        tracing::warn!(
            segment = %segment_name(u.id.core, u.id.number),
            kept_aside = u.non_zero,
            "store segment without a header (its creation did not finish): removed"
        );
    }
    let plan = recovery::plan(
        found.scans,
        found.unfinished,
        recovery::PlanConfig {
            cores,
            now_ms,
            segment_bytes: cfg.segment_bytes,
            stall_us: cfg.stall_ms * 1000,
            windows,
        },
    );
    for (id, cut) in &plan.stats.cuts {
        tracing::warn!(
            segment = %segment_name(id.core, id.number),
            offset = cut.offset,
            reason = cut.reason.label(),
            bytes_after = cut.bytes_lost,
            "store segment cut at a bad record: every record before it kept"
        );
    }
    for (id, bytes) in &plan.write {
        let path = segment_path(&cfg.dir, id.core, id.number);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    sync_dir(&cfg.dir)?;
    if !plan.damaged.is_empty() {
        fs::create_dir_all(cfg.dir.join(DAMAGED))?;
    }
    for id in &plan.remove {
        let path = segment_path(&cfg.dir, id.core, id.number);
        if plan.damaged.contains(id) {
            // Kept for inspection: what follows its cut is not served.
            fs::rename(
                &path,
                cfg.dir.join(DAMAGED).join(segment_name(id.core, id.number)),
            )?;
        } else {
            fs::remove_file(path)?;
        }
    }
    if !plan.damaged.is_empty() {
        // The renamed segments' new names, durable before the old ones' removal is.
        sync_dir(&cfg.dir.join(DAMAGED))?;
    }
    if !plan.remove.is_empty() {
        sync_dir(&cfg.dir)?;
    }
    let recovered = plan.cores.iter().map(|c| c.recovered.len()).sum();
    Ok(Opened {
        cores: plan.cores,
        stats: plan.stats,
        recovered,
        undecodable: plan.undecodable,
    })
}

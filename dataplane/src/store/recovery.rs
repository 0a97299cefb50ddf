//! Recovery: from the records of every segment back to what the store holds. Pure.
//!
//! An envelope record is live unless a released record names its sequence number or it has
//! expired. Records may appear twice (compaction copies live records forward before it removes
//! their old segment); the sequence number makes the second copy the same envelope. Released
//! records may sit in another core's segment than their envelopes, so every segment is read
//! before anything is decided.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use bytes::BytesMut;

use super::log::{Existing, Log};
use super::record::{self, Cut, Record, Scan, SegmentHeader, StoredEnvelope, WindowRecord};
use crate::shard::dedup::{split, Window};
use crate::shard::ShardStore;
use crate::wire::{AgentId, Destination, Envelope};

/// Names a segment file: the core that wrote it and its number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentId {
    pub core: u16,
    pub number: u64,
}

/// A segment file without a header: its creation (fill first, header last) did not finish, so
/// nothing was ever appended to it. Its number is taken; the file goes at start, kept aside in
/// the damaged directory if it holds anything but zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unfinished {
    pub id: SegmentId,
    pub non_zero: bool,
}

/// What recovery found, for logs, metrics and `store inspect`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryStats {
    pub segments: usize,
    pub records: usize,
    /// Envelope records read (copies included).
    pub envelope_records: usize,
    /// Envelopes released (delivered or expired) by a released record.
    pub released: usize,
    /// Envelopes that expired while the relay was down (or before their release was written).
    pub expired: usize,
    /// Segments whose scan stopped at a bad record.
    pub cuts: Vec<(SegmentId, Cut)>,
    /// Segment files without a header (their creation did not finish).
    pub unfinished: Vec<Unfinished>,
    /// Duplicate windows rebuilt (one per source and epoch).
    pub windows: usize,
    /// Live records of an envelope (source, message id) already live in an earlier record:
    /// not served again (a write that reached the disk although its batch failed and was
    /// refused, then the same envelope sent again and stored).
    pub duplicates: usize,
}

/// The store after recovery.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Live envelopes in sequence order (the order they were taken in), each with the segment
    /// that holds it.
    pub live: Vec<(SegmentId, StoredEnvelope)>,
    /// Highest sequence number seen in any record; new records continue above it.
    pub max_seq: u64,
    /// Per segment: live envelopes and their record bytes (a segment at zero can go).
    pub segments: BTreeMap<SegmentId, SegmentLive>,
    /// The duplicate windows of the envelopes on disk (stored or released) and of the window
    /// records found, per source and epoch; the most recently used first.
    pub windows: Vec<WindowRecord>,
    pub stats: RecoveryStats,
}

/// Live records of one segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegmentLive {
    pub envelopes: usize,
    pub bytes: u64,
    /// Offset where the good records end.
    pub end: usize,
}

/// Rebuilds the store from every segment's scan, at `now_ms` (Unix milliseconds), with at most
/// `max_windows` duplicate windows (the most recently used).
pub fn recover(
    scans: impl IntoIterator<Item = (SegmentId, Scan)>,
    now_ms: u64,
    max_windows: usize,
) -> Recovered {
    let mut out = Recovered::default();
    let mut released: HashSet<u64> = HashSet::new();
    let mut envelopes: BTreeMap<u64, (SegmentId, StoredEnvelope)> = BTreeMap::new();
    // Per (source, epoch): the window and the highest sequence number that marked it.
    let mut windows: HashMap<(AgentId, u64), (Window, u64)> = HashMap::new();
    for (id, scan) in scans {
        out.stats.segments += 1;
        out.stats.records += scan.records.len();
        if let Some(cut) = scan.cut {
            out.stats.cuts.push((id, cut));
        }
        out.segments.insert(
            id,
            SegmentLive {
                end: scan.end,
                ..SegmentLive::default()
            },
        );
        for (_, rec) in scan.records {
            match rec {
                Record::Envelope(e) => {
                    out.stats.envelope_records += 1;
                    out.max_seq = out.max_seq.max(e.seq);
                    let (epoch, counter) = split(e.message_id);
                    let (w, rank) = windows
                        .entry((e.source, epoch))
                        .or_insert_with(|| (Window::new(), 0));
                    w.mark(counter);
                    *rank = (*rank).max(e.seq);
                    if windows.len() > 2 * max_windows.max(1) {
                        // One window per record at worst (a source per envelope): keep the
                        // memory to twice the windows wanted.
                        prune(&mut windows, max_windows);
                    }
                    // A copy made by compaction: keep the one in the newer segment.
                    match envelopes.get(&e.seq) {
                        Some((have, _)) if *have > id => {}
                        _ => {
                            envelopes.insert(e.seq, (id, e));
                        }
                    }
                }
                Record::Released(seqs) => {
                    for s in seqs {
                        out.max_seq = out.max_seq.max(s);
                        released.insert(s);
                    }
                }
                Record::Window(r) => {
                    let (w, rank) = windows
                        .entry((r.source, r.epoch))
                        .or_insert_with(|| (Window::new(), 0));
                    w.merge(&Window::of_record(&r));
                    *rank = (*rank).max(r.rank);
                    if windows.len() > 2 * max_windows.max(1) {
                        prune(&mut windows, max_windows);
                    }
                }
            }
        }
    }
    let mut live_ids: HashSet<(AgentId, crate::wire::MessageId)> = HashSet::new();
    for (seq, (id, e)) in envelopes {
        if released.contains(&seq) {
            out.stats.released += 1;
            continue;
        }
        if e.expires_ms <= now_ms {
            out.stats.expired += 1;
            continue;
        }
        if !live_ids.insert((e.source, e.message_id)) {
            out.stats.duplicates += 1;
            continue;
        }
        let s = out.segments.entry(id).or_default();
        s.envelopes += 1;
        s.bytes += e.record_len() as u64;
        out.live.push((id, e));
    }
    prune(&mut windows, max_windows);
    let mut windows: Vec<_> = windows.into_iter().collect();
    windows.sort_by(|a, b| b.1 .1.cmp(&a.1 .1).then(a.0.cmp(&b.0)));
    windows.truncate(max_windows);
    out.stats.windows = windows.len();
    out.windows = windows
        .into_iter()
        .map(|((source, epoch), (w, rank))| w.record(source, epoch, rank))
        .collect();
    out
}

/// Keeps exactly the `keep` most recently used windows (highest sequence number; ties by key).
fn prune(windows: &mut HashMap<(AgentId, u64), (Window, u64)>, keep: usize) {
    if windows.len() <= keep {
        return;
    }
    if keep == 0 {
        windows.clear();
        return;
    }
    let mut all: Vec<_> = windows.drain().collect();
    all.select_nth_unstable_by(keep - 1, |a, b| b.1 .1.cmp(&a.1 .1).then(a.0.cmp(&b.0)));
    all.truncate(keep);
    windows.extend(all);
}

/// What a relay starting on `cores` cores does with the store it found (`docs/STORE.md`,
/// "Sequence numbers and start"): the segments to write (synced before anything else), the
/// old segments to remove after that, and what each core starts with.
pub struct Plan {
    /// New segments and their bytes (header and records), one per core with live envelopes.
    pub write: Vec<(SegmentId, Vec<u8>)>,
    /// Every segment found; removed once `write` is on disk.
    pub remove: Vec<SegmentId>,
    /// Of `remove`: cut with non-zero bytes after the cut, or without a header but not all
    /// zeros (kept aside, not deleted).
    pub damaged: Vec<SegmentId>,
    /// One per core, in core order.
    pub cores: Vec<ShardStore>,
    pub stats: RecoveryStats,
    /// Live records that no longer decode as an envelope for one agent (dropped, counted).
    pub undecodable: usize,
}

/// How long the segment of duplicate windows a start writes is kept (Unix milliseconds): a
/// sender that reconnects and resends within this time after a start meets the windows even
/// if the relay restarts again in between.
pub const WINDOWS_KEPT_MS: u64 = 10 * 60 * 1000;

/// How a start plans, besides what it found.
#[derive(Clone, Copy, Debug)]
pub struct PlanConfig {
    pub cores: u16,
    /// Unix milliseconds (what has expired).
    pub now_ms: u64,
    pub segment_bytes: u64,
    pub stall_us: u64,
    /// Most duplicate windows carried over (the most recently used ones).
    pub windows: usize,
}

/// Plans a start from every segment's scan (and the segment files without a header): live
/// envelopes go to their destination's home core, each core's log continues above the numbers
/// found, new sequence numbers start above every one seen, and the duplicate windows rebuilt
/// go to every core (and into a segment of their own on core 0, for the start after this one,
/// kept [`WINDOWS_KEPT_MS`]).
pub fn plan(scans: Vec<(SegmentId, Scan)>, unfinished: Vec<Unfinished>, cfg: PlanConfig) -> Plan {
    let PlanConfig {
        cores,
        now_ms,
        segment_bytes,
        stall_us,
        windows: windows_cap,
    } = cfg;
    let cores = cores.max(1);
    let remove: Vec<SegmentId> = scans
        .iter()
        .map(|(id, _)| *id)
        .chain(unfinished.iter().map(|u| u.id))
        .collect();
    let mut next_number = vec![1u64; cores as usize];
    for id in &remove {
        if let Some(n) = next_number.get_mut(id.core as usize) {
            *n = (*n).max(id.number + 1);
        }
    }
    let mut rec = recover(scans, now_ms, windows_cap);
    rec.stats.unfinished = unfinished;
    let windows: Arc<[WindowRecord]> = std::mem::take(&mut rec.windows).into();
    let mut per_core: Vec<Vec<(Envelope, StoredEnvelope)>> =
        (0..cores).map(|_| Vec::new()).collect();
    let mut undecodable = 0;
    for (_, stored) in rec.live {
        let Ok(mut env) = stored.envelope() else {
            undecodable += 1;
            continue;
        };
        let Destination::Agent(dst) = env.destination() else {
            undecodable += 1;
            continue;
        };
        env.set_store_seq(stored.seq);
        let home = crate::routing::home_core(&dst, cores) as usize;
        per_core[home].push((env, stored));
    }
    let mut write = Vec::new();
    #[allow(clippy::type_complexity)]
    let mut existing: Vec<Vec<Existing>> = vec![Vec::new(); cores as usize];
    if !windows.is_empty() {
        // The windows in a segment of their own on core 0, kept for a while whatever happens
        // to the envelopes.
        let number = next_number[0];
        next_number[0] += 1;
        let mut buf = BytesMut::new();
        buf.extend_from_slice(
            &SegmentHeader {
                core: 0,
                number,
                created_ms: now_ms,
            }
            .encode(),
        );
        for w in windows.iter() {
            record::encode_window(w, &mut buf);
        }
        existing[0].push(Existing {
            number,
            end: buf.len() as u64,
            records: Vec::new(),
            keep_until_ms: now_ms + WINDOWS_KEPT_MS,
        });
        write.push((SegmentId { core: 0, number }, buf.to_vec()));
    }
    for (core, live) in per_core.iter().enumerate() {
        if live.is_empty() {
            continue;
        }
        let number = next_number[core];
        next_number[core] += 1;
        let header = SegmentHeader {
            core: core as u16,
            number,
            created_ms: now_ms,
        };
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&header.encode());
        let mut locs = Vec::with_capacity(live.len());
        for (_, stored) in live {
            locs.push((stored.seq, buf.len() as u64, stored.record_len() as u32));
            record::encode_envelope(stored, &mut buf);
        }
        let id = SegmentId {
            core: core as u16,
            number,
        };
        existing[core].push(Existing {
            number,
            end: buf.len() as u64,
            records: locs,
            keep_until_ms: 0,
        });
        write.push((id, buf.to_vec()));
    }
    let damaged = rec
        .stats
        .cuts
        .iter()
        .filter(|(_, c)| c.bytes_lost > 0)
        .map(|(id, _)| *id)
        .chain(
            rec.stats
                .unfinished
                .iter()
                .filter(|u| u.non_zero)
                .map(|u| u.id),
        )
        .collect();
    let first_seq = rec.max_seq + 1;
    let cores_out = per_core
        .into_iter()
        .enumerate()
        .map(|(core, live)| ShardStore {
            log: Log::new(
                core as u16,
                segment_bytes,
                next_number[core],
                std::mem::take(&mut existing[core]),
            ),
            first_seq: first_seq + core as u64,
            seq_step: cores as u64,
            recovered: live.into_iter().map(|(e, _)| e).collect(),
            windows: windows.clone(),
            stall_us,
        })
        .collect();
    Plan {
        write,
        remove,
        damaged,
        cores: cores_out,
        stats: rec.stats,
        undecodable,
    }
}

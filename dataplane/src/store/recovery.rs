//! Recovery: from the records of every segment back to what the store holds. Pure.
//!
//! An envelope record is live unless a released record names its sequence number or it has
//! expired. Records may appear twice (compaction copies live records forward before it removes
//! their old segment); the sequence number makes the second copy the same envelope. Released
//! records may sit in another core's segment than their envelopes, so every segment is read
//! before anything is decided.

use std::collections::{BTreeMap, HashSet};

use super::record::{Cut, Record, Scan, StoredEnvelope};

/// Names a segment file: the core that wrote it and its number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentId {
    pub core: u16,
    pub number: u64,
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

/// Rebuilds the store from every segment's scan, at `now_ms` (Unix milliseconds).
pub fn recover(scans: impl IntoIterator<Item = (SegmentId, Scan)>, now_ms: u64) -> Recovered {
    let mut out = Recovered::default();
    let mut released: HashSet<u64> = HashSet::new();
    let mut envelopes: BTreeMap<u64, (SegmentId, StoredEnvelope)> = BTreeMap::new();
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
            }
        }
    }
    for (seq, (id, e)) in envelopes {
        if released.contains(&seq) {
            out.stats.released += 1;
            continue;
        }
        if e.expires_ms <= now_ms {
            out.stats.expired += 1;
            continue;
        }
        let s = out.segments.entry(id).or_default();
        s.envelopes += 1;
        s.bytes += e.record_len() as u64;
        out.live.push((id, e));
    }
    out
}

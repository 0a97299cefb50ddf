//! The store's pure parts: records round-trip, scans cut at the first bad record, recovery
//! rebuilds what is live, and the log groups appends into one sync per batch.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use super::log::{Log, LogAction};
use super::record::{self, CutReason, Record, SegmentHeader, StoredEnvelope, SEGMENT_HEADER_LEN};
use super::recovery::{plan, recover, PlanConfig, SegmentId};
use crate::wire::{AgentId, Destination, Envelope, EnvelopeBuilder, MessageId};

fn stored(seq: u64, dest: u8, payload_len: usize, expires_ms: u64) -> StoredEnvelope {
    StoredEnvelope::of(seq, &envelope(seq, dest, payload_len, expires_ms)).unwrap()
}

fn envelope(seq: u64, dest: u8, payload_len: usize, expires_ms: u64) -> Envelope {
    EnvelopeBuilder::new(
        MessageId::from_u128(seq as u128),
        AgentId([1; 32]),
        Destination::Agent(AgentId([dest; 32])),
        1_000,
        expires_ms - 1_000,
    )
    .build(&vec![seq as u8; payload_len])
    .unwrap()
}

fn segment(core: u16, number: u64, records: &[Record], fill: usize) -> BytesMut {
    let mut b = BytesMut::new();
    b.extend_from_slice(
        &SegmentHeader {
            core,
            number,
            created_ms: 5,
        }
        .encode(),
    );
    for r in records {
        r.encode(&mut b);
    }
    b.resize(b.len() + fill, 0);
    b
}

#[test]
fn records_round_trip_and_the_envelope_decodes_again() {
    let e = stored(7, 2, 300, 60_000);
    let recs = vec![Record::Envelope(e.clone()), Record::Released(vec![1, 2, 3])];
    let data = segment(3, 9, &recs, 4096).freeze();
    let scan = record::scan(data).unwrap();
    assert_eq!(
        scan.header,
        SegmentHeader {
            core: 3,
            number: 9,
            created_ms: 5
        }
    );
    assert_eq!(scan.cut, None);
    let got: Vec<Record> = scan.records.into_iter().map(|(_, r)| r).collect();
    assert_eq!(got, recs);
    let env = e.envelope().unwrap();
    assert_eq!(env.message_id(), MessageId::from_u128(7));
    assert_eq!(env.payload().len(), 300);
    assert_eq!(
        scan.end,
        SEGMENT_HEADER_LEN + e.record_len() + record::RECORD_HEADER_LEN + 24
    );
}

#[test]
fn not_a_segment_is_refused() {
    assert!(record::scan(Bytes::from_static(b"OMSTORE2 and more bytes than a header")).is_none());
    assert!(record::scan(Bytes::new()).is_none());
}

#[test]
fn a_torn_final_record_is_cut_and_everything_before_it_kept() {
    let recs: Vec<Record> = (1..=5)
        .map(|i| Record::Envelope(stored(i, 2, 100, 60_000)))
        .collect();
    let full = segment(0, 1, &recs, 0);
    // Cut the last record in the middle, then the preallocated zeros follow.
    let mut torn = BytesMut::from(&full[..full.len() - 40]);
    torn.resize(torn.len() + 1000, 0);
    let scan = record::scan(torn.freeze()).unwrap();
    assert_eq!(scan.records.len(), 4);
    let cut = scan.cut.unwrap();
    assert_eq!(cut.reason, CutReason::Checksum);
    assert_eq!(cut.offset, scan.end);
    // The file's own end in the middle of a record.
    let scan = record::scan(full.freeze().slice(..SEGMENT_HEADER_LEN + 500)).unwrap();
    assert_eq!(scan.cut.unwrap().reason, CutReason::Truncated);
}

#[test]
fn a_corrupt_record_in_the_middle_keeps_what_precedes_it() {
    let recs: Vec<Record> = (1..=5)
        .map(|i| Record::Envelope(stored(i, 2, 100, 60_000)))
        .collect();
    let mut data = segment(0, 1, &recs, 64);
    let second = SEGMENT_HEADER_LEN + recs[0].clone().encoded_len();
    data[second + 60] ^= 0x40;
    let scan = record::scan(data.freeze()).unwrap();
    assert_eq!(scan.records.len(), 1);
    let cut = scan.cut.unwrap();
    assert_eq!((cut.offset, cut.reason), (second, CutReason::Checksum));
    assert!(cut.bytes_lost > 3 * 100);
}

#[test]
fn recovery_keeps_live_envelopes_in_order_across_segments_and_cores() {
    let a = segment(
        0,
        1,
        &[
            Record::Envelope(stored(1, 2, 10, 60_000)),
            Record::Envelope(stored(3, 2, 10, 60_000)),
            Record::Envelope(stored(4, 2, 10, 2_000)),
        ],
        0,
    );
    let b = segment(
        1,
        1,
        &[
            Record::Envelope(stored(2, 3, 10, 60_000)),
            Record::Released(vec![3]),
            // A copy of seq 1 made by compaction into a newer segment.
        ],
        0,
    );
    let c = segment(1, 2, &[Record::Envelope(stored(1, 2, 10, 60_000))], 0);
    let scans = [((0, 1), a), ((1, 1), b), ((1, 2), c)].map(|((core, number), d)| {
        (
            SegmentId { core, number },
            record::scan(d.freeze()).unwrap(),
        )
    });
    let r = recover(scans, 10_000, 16);
    let live: Vec<(u64, u16, u64)> = r
        .live
        .iter()
        .map(|(id, e)| (e.seq, id.core, id.number))
        .collect();
    assert_eq!(live, vec![(1, 1, 2), (2, 1, 1)]);
    assert_eq!(r.max_seq, 4);
    assert_eq!(r.stats.released, 1);
    assert_eq!(r.stats.expired, 1);
    assert_eq!(r.segments[&SegmentId { core: 0, number: 1 }].envelopes, 0);
}

/// Carries out the log's actions on in-memory files.
#[derive(Default)]
struct Disk {
    files: std::collections::BTreeMap<u64, Vec<u8>>,
    synced: std::collections::BTreeMap<u64, Vec<u8>>,
    ops: Vec<&'static str>,
}

impl Disk {
    /// Runs the next main action; `false` if there was none.
    fn step(&mut self, log: &mut Log, ok: bool) -> bool {
        let Some(a) = log.poll_action(0) else {
            return false;
        };
        self.apply(a, ok);
        log.on_done(ok);
        true
    }

    /// Runs the next side action (a segment created ahead, removed, or a record read for
    /// compaction); `false` if none.
    fn side(&mut self, log: &mut Log) -> bool {
        let Some(a) = log.poll_side(0, 0) else {
            return false;
        };
        if let LogAction::Read {
            number,
            offset,
            len,
        } = a
        {
            self.ops.push("read");
            let f = &self.files[&number];
            let data = Bytes::copy_from_slice(&f[offset as usize..offset as usize + len as usize]);
            log.on_side_read(data, 0);
            return true;
        }
        self.apply(a, true);
        log.on_side_done(true, 0);
        true
    }

    /// Runs main and side actions until neither has any.
    fn settle(&mut self, log: &mut Log, ok: bool) {
        while self.step(log, ok) || self.side(log) {}
    }

    fn apply(&mut self, a: LogAction, ok: bool) {
        match a {
            LogAction::Create {
                number,
                header,
                size,
            } => {
                self.ops.push("create");
                let mut f = vec![0u8; size as usize];
                f[..header.len()].copy_from_slice(&header);
                self.files.insert(number, f.clone());
                self.synced.insert(number, f);
            }
            LogAction::Write {
                number,
                offset,
                buf,
            } => {
                self.ops.push("write");
                let f = self.files.get_mut(&number).unwrap();
                f[offset as usize..offset as usize + buf.len()].copy_from_slice(&buf);
            }
            LogAction::Sync { number } => {
                self.ops.push("sync");
                if ok {
                    self.synced.insert(number, self.files[&number].clone());
                }
            }
            LogAction::Remove { number } => {
                self.ops.push("remove");
                self.files.remove(&number);
                self.synced.remove(&number);
            }
            LogAction::Read { .. } => unreachable!("reads are answered in `side`"),
        }
    }

    fn recover(&self) -> super::recovery::Recovered {
        Self::recover_from(&self.synced)
    }

    /// Recovery from every byte written, synced or not (writes that reached the disk although
    /// their sync failed).
    fn recover_written(&self) -> super::recovery::Recovered {
        Self::recover_from(&self.files)
    }

    fn recover_from(
        files: &std::collections::BTreeMap<u64, Vec<u8>>,
    ) -> super::recovery::Recovered {
        recover(
            files.iter().map(|(n, f)| {
                (
                    SegmentId {
                        core: 0,
                        number: *n,
                    },
                    record::scan(Bytes::from(f.clone())).unwrap(),
                )
            }),
            0,
            16,
        )
    }
}

#[test]
fn appends_during_a_sync_are_committed_together_by_the_next_one() {
    let mut log = Log::new(0, 1 << 20, 1, []);
    let mut disk = Disk::default();
    log.append(1, &envelope(1, 2, 100, 60_000), 1, 0).unwrap();
    // Create, then the first write goes out with one record.
    assert!(disk.step(&mut log, true));
    assert!(disk.step(&mut log, true));
    // While its sync is due, ten more arrive.
    for i in 2..=11 {
        log.append(i, &envelope(i, 2, 100, 60_000), i, 0).unwrap();
    }
    assert!(disk.step(&mut log, true));
    assert_eq!(log.take_durable(), vec![1]);
    while disk.step(&mut log, true) {}
    assert_eq!(log.take_durable(), (2..=11).collect::<Vec<_>>());
    assert_eq!(log.stats.groups, 2);
    assert_eq!(
        disk.ops,
        ["create", "write", "sync", "write", "sync"],
        "one write and one sync per group"
    );
    let r = disk.recover();
    assert_eq!(r.live.len(), 11);
}

#[test]
fn full_segments_roll_over_and_are_removed_when_nothing_in_them_is_live() {
    let mut log = Log::new(0, 8192, 1, []);
    let mut disk = Disk::default();
    let mut placed = Vec::new();
    for i in 1..=40 {
        placed.push(log.append(i, &envelope(i, 2, 1000, 60_000), i, 0).unwrap());
        disk.settle(&mut log, true);
    }
    assert_eq!(log.take_durable().len(), 40);
    let first = placed[0];
    assert!(placed.iter().any(|n| *n != first), "rolled over");
    assert!(disk.synced.len() > 3);
    // Release everything in the first segment: it goes.
    let in_first: Vec<u64> = (1..=40)
        .filter(|i| placed[*i as usize - 1] == first)
        .collect();
    log.release(&in_first, 0);
    disk.settle(&mut log, true);
    assert!(!disk.synced.contains_key(&first));
    assert!(disk.ops.contains(&"remove"));
    let r = disk.recover();
    assert_eq!(r.live.len(), 40 - in_first.len());
    assert!(r.stats.cuts.is_empty());
}

#[test]
fn a_segment_of_windows_is_kept_its_time_without_holding_up_the_others() {
    let windows = super::log::Existing {
        number: 1,
        end: 32 + 569,
        records: Vec::new(),
        keep_until_ms: 1_000,
    };
    let mut log = Log::new(0, 8192, 2, [windows]);
    let mut disk = Disk::default();
    let mut placed = Vec::new();
    for i in 1..=40 {
        placed.push(log.append(i, &envelope(i, 2, 1000, 60_000), i, 0).unwrap());
        disk.settle(&mut log, true);
    }
    assert_eq!(log.take_durable().len(), 40);
    let first = placed[0];
    assert_eq!(first, 2);
    let in_first: Vec<u64> = (1..=40)
        .filter(|i| placed[*i as usize - 1] == first)
        .collect();
    log.release(&in_first, 0);
    disk.settle(&mut log, true);
    assert!(
        !disk.synced.contains_key(&first),
        "the windows' segment, older, does not hold it up"
    );
    assert!(log.segments().contains_key(&1), "kept until its time");
    assert_eq!(log.poll_side(0, 999), None);
    assert_eq!(
        log.poll_side(0, 1_000),
        Some(LogAction::Remove { number: 1 })
    );
}

#[test]
fn segments_go_oldest_first_so_a_released_record_never_outlives_what_it_names() {
    let mut log = Log::new(0, 8192, 1, []);
    let mut disk = Disk::default();
    let mut placed = Vec::new();
    for i in 1..=40 {
        placed.push(log.append(i, &envelope(i, 2, 1000, 60_000), i, 0).unwrap());
        disk.settle(&mut log, true);
    }
    let first = placed[0];
    let second = *placed.iter().find(|n| **n != first).unwrap();
    // Everything but envelope 1 goes, the release records land in later segments. Segments
    // are removed (and envelope 1 copied forward) while this settles; a crash at any moment
    // recovers exactly envelope 1.
    let rest: Vec<u64> = (2..=40).collect();
    log.release(&rest, 0);
    let mut released_on_disk = false;
    loop {
        let moved = disk.step(&mut log, true) || disk.side(&mut log);
        let live: Vec<u64> = disk.recover().live.iter().map(|(_, e)| e.seq).collect();
        assert_eq!(live.first(), Some(&1), "envelope 1 is never lost");
        if live == [1] {
            released_on_disk = true;
        }
        assert!(
            !released_on_disk || live == [1],
            "released envelopes came back: {live:?}"
        );
        if !moved {
            break;
        }
    }
    assert!(released_on_disk);
    assert!(disk.ops.contains(&"remove"));
    log.release(&[1], 0);
    disk.settle(&mut log, true);
    assert!(!disk.synced.contains_key(&first) && !disk.synced.contains_key(&second));
    assert!(disk.recover().live.is_empty());
    assert_eq!(log.live(), 0);
}

#[test]
fn a_failed_log_still_removes_what_was_released_so_a_full_disk_gets_space_back() {
    let mut log = Log::new(0, 8192, 1, []);
    let mut disk = Disk::default();
    for i in 1..=20 {
        log.append(i, &envelope(i, 2, 1000, 60_000), i, 0).unwrap();
        disk.settle(&mut log, true);
    }
    let segments = disk.synced.len();
    assert!(segments >= 3);
    log.append(21, &envelope(21, 2, 1000, 60_000), 21, 0)
        .unwrap();
    while disk.step(&mut log, false) {}
    assert!(log.is_failed());
    log.release(&(1..=20).collect::<Vec<_>>(), 0);
    disk.settle(&mut log, true);
    let removed = disk.ops.iter().filter(|o| **o == "remove").count();
    assert!(removed + 1 >= segments, "{removed} of {segments} removed");
    // What is left is at most the segment created ahead, which holds nothing.
    assert!(disk.synced.len() <= 1, "{} left", disk.synced.len());
    assert!(disk.recover().live.is_empty());
}

/// A log of 8 KiB segments whose first segment is past half full (envelopes 1 to 4, durable),
/// with the side task's creation of the next segment handed out and not yet done; returns that
/// segment's number.
fn half_full_with_the_next_segment_being_created() -> (Log, Disk, u64) {
    let mut log = Log::new(0, 8192, 1, []);
    let mut disk = Disk::default();
    for i in 1..=4 {
        log.append(i, &envelope(i, 2, 1000, 60_000), i, 0).unwrap();
        while disk.step(&mut log, true) {}
    }
    let Some(LogAction::Create { number, .. }) = log.poll_side(0, 0) else {
        panic!("the next segment created ahead");
    };
    (log, disk, number)
}

#[test]
fn the_next_segment_is_created_ahead_and_a_batch_waits_for_it_rather_than_creating_another() {
    assert_eq!(
        Log::new(0, 8192, 1, []).poll_side(0, 0),
        None,
        "no disk before the first append"
    );
    // The first segment is created on the write path; past half of it the next is created
    // ahead. A batch that needs it while it is being created waits for it.
    let (mut log, mut disk, number) = half_full_with_the_next_segment_being_created();
    disk.files.insert(number, vec![0; 8192]);
    for i in 5..=8 {
        log.append(i, &envelope(i, 2, 1000, 60_000), i, 0).unwrap();
    }
    while disk.step(&mut log, true) {
        assert_ne!(disk.ops.last(), Some(&"create"), "no second create");
    }
    let first = log.take_durable().len();
    assert!(first < 8, "the batch in the next segment waits");
    log.on_side_done(true, 0);
    while disk.step(&mut log, true) {}
    assert_eq!(first + log.take_durable().len(), 8);
    // Past half of it, the next one is created ahead; rolling over needs no Create on the way.
    for i in 9..=20 {
        log.append(i, &envelope(i, 2, 1000, 60_000), i, 0).unwrap();
        while disk.step(&mut log, true) {
            assert_ne!(
                disk.ops.last(),
                Some(&"create"),
                "no create on the write path"
            );
        }
        while disk.side(&mut log) {}
    }
    assert_eq!(log.take_durable().len(), 12);
}

#[test]
fn a_segment_being_created_ahead_is_taken_as_the_tail_only_once() {
    let (mut log, _, number) = half_full_with_the_next_segment_being_created();
    // While it is being created, enough arrives to fill it and more: the records past it go
    // to a third segment, never past the end of the second.
    let mut placed = Vec::new();
    for i in 5..=20 {
        placed.push(log.append(i, &envelope(i, 2, 1000, 60_000), i, 0).unwrap());
    }
    assert!(placed.contains(&number), "{placed:?}");
    assert!(
        placed.iter().any(|n| *n > number),
        "a third segment after the second filled: {placed:?}"
    );
    let seg = log.segments()[&number];
    assert!(seg.end <= seg.size, "{seg:?}");
}

#[test]
fn a_long_lived_envelope_is_copied_forward_so_its_old_segments_go() {
    let mut log = Log::new(0, 8192, 1, []);
    let mut disk = Disk::default();
    let mut one_durable = false;
    for i in 1..=60 {
        log.append(i, &envelope(i, 2, 1000, 60_000), i, 0).unwrap();
        // Everything but envelope 1 is delivered soon after it is stored.
        if i > 2 {
            log.release(&[i - 1], 0);
        }
        // Side operations first (removals race the copy's sync as hard as they can); after
        // every operation a crash would still recover envelope 1.
        while disk.side(&mut log) || disk.step(&mut log, true) {
            one_durable |= log.take_durable().contains(&1);
            let live: Vec<u64> = disk.recover().live.iter().map(|(_, e)| e.seq).collect();
            if one_durable {
                assert_eq!(
                    live.first(),
                    Some(&1),
                    "envelope 1 lost after {:?}",
                    disk.ops.last()
                );
            }
        }
    }
    log.release(&[60], 0);
    disk.settle(&mut log, true);
    assert!(disk.ops.contains(&"read"), "envelope 1 was read back");
    assert!(log.stats.copied >= 1);
    // Disk follows the backlog: a few segments, not the history of sixty envelopes.
    assert!(
        disk.synced.len() <= 4,
        "{} segments for one live envelope",
        disk.synced.len()
    );
    let live: Vec<u64> = disk.recover().live.iter().map(|(_, e)| e.seq).collect();
    assert_eq!(live, vec![1], "the copy is the same envelope");
    log.release(&[1], 0);
    disk.settle(&mut log, true);
    assert!(disk.recover().live.is_empty());
}

#[test]
fn after_a_failure_a_segment_created_ahead_makes_the_log_healthy_again() {
    let (mut log, mut disk, number) = half_full_with_the_next_segment_being_created();
    // While it is being created, a write fails; the retry takes the segment being created.
    log.append(5, &envelope(5, 2, 1000, 60_000), 5, 0).unwrap();
    while disk.step(&mut log, false) {}
    assert!(log.is_failed() && !log.healthy());
    log.retry(0);
    assert!(!log.healthy(), "not before the new segment exists");
    disk.files.insert(number, vec![0; 8192]);
    log.on_side_done(true, 0);
    while disk.step(&mut log, true) {}
    assert!(log.healthy(), "the segment created ahead is the probe");
    log.append(6, &envelope(6, 2, 1000, 60_000), 6, 0).unwrap();
    while disk.step(&mut log, true) {}
    assert_eq!(log.take_durable(), vec![1, 2, 3, 4, 6]);
}

fn plan_cfg(cores: u16, windows: usize) -> PlanConfig {
    PlanConfig {
        cores,
        now_ms: 10_000,
        segment_bytes: 1 << 20,
        stall_us: 1 << 30,
        windows,
    }
}

/// Whether `windows` mark message id `id` from source `[1; 32]` (the test envelopes' source).
fn marked(windows: &[record::WindowRecord], id: u64) -> bool {
    let mut d = crate::shard::dedup::Dedup::new(1 << 20);
    for w in windows {
        d.seed(w);
    }
    d.seen(&AgentId([1; 32]), MessageId::from_u128(id as u128))
        == crate::shard::dedup::Seen::Duplicate
}

#[test]
fn an_envelope_stored_twice_is_served_once() {
    // Seq 1's batch failed after its write reached the disk; the source sent it again: seq 2.
    let first = stored(1, 2, 50, 60_000);
    let mut again = first.clone();
    again.seq = 2;
    let seg = segment(
        0,
        1,
        &[
            Record::Envelope(first),
            Record::Envelope(again),
            Record::Envelope(stored(3, 2, 50, 60_000)),
        ],
        0,
    );
    let r = recover(
        [(
            SegmentId { core: 0, number: 1 },
            record::scan(seg.freeze()).unwrap(),
        )],
        10_000,
        16,
    );
    let seqs: Vec<u64> = r.live.iter().map(|(_, e)| e.seq).collect();
    assert_eq!(seqs, vec![1, 3]);
    assert_eq!(r.stats.duplicates, 1);
}

#[test]
fn duplicate_windows_outlive_the_records_they_came_from() {
    // Envelopes 1..=6 on two cores' segments; 1, 2 and 5 delivered (released).
    let seg0 = segment(
        0,
        1,
        &[
            Record::Envelope(stored(1, 2, 50, 60_000)),
            Record::Envelope(stored(2, 3, 50, 60_000)),
            Record::Envelope(stored(3, 2, 50, 60_000)),
            Record::Released(vec![1, 2]),
        ],
        0,
    );
    let seg1 = segment(
        1,
        1,
        &[
            Record::Envelope(stored(5, 2, 50, 60_000)),
            Record::Envelope(stored(6, 3, 50, 60_000)),
            Record::Released(vec![5]),
        ],
        0,
    );
    let scans = |segs: Vec<(SegmentId, BytesMut)>| -> Vec<_> {
        segs.into_iter()
            .map(|(id, b)| (id, record::scan(b.freeze()).unwrap()))
            .collect()
    };
    let first = plan(
        scans(vec![
            (SegmentId { core: 0, number: 1 }, seg0),
            (SegmentId { core: 1, number: 1 }, seg1),
        ]),
        Vec::new(),
        plan_cfg(2, 16),
    );
    assert_eq!(first.stats.windows, 1, "one source, one epoch");
    for core in &first.cores {
        for id in [1, 2, 3, 5, 6] {
            assert!(marked(&core.windows, id), "core seeded with id {id}");
        }
        assert!(!marked(&core.windows, 4), "never stored");
        assert!(!marked(&core.windows, 7));
    }
    // The released envelopes are not rewritten, but their ids are: a start right after this
    // one (its old segments gone) still knows them.
    let written: Vec<_> = first
        .write
        .iter()
        .map(|(id, b)| (*id, BytesMut::from(&b[..])))
        .collect();
    assert!(written.iter().any(|(id, _)| id.core == 0));
    let second = plan(scans(written), Vec::new(), plan_cfg(1, 16));
    assert_eq!(second.cores[0].recovered.len(), 2, "3 and 6 still live");
    for id in [1, 2, 3, 5, 6] {
        assert!(
            marked(&second.cores[0].windows, id),
            "id {id} after two starts"
        );
    }
    assert!(!marked(&second.cores[0].windows, 4));
    // The core's log goes on after the windows and the envelopes, not over them.
    let seg = second.cores[0]
        .log
        .segments()
        .values()
        .next()
        .copied()
        .unwrap();
    let (_, bytes) = &second.write[0];
    assert_eq!(seg.end, bytes.len() as u64);
}

#[test]
fn windows_carried_over_are_bounded_and_the_most_recent_kept() {
    // Ten sources, one envelope each, in sequence order: a cap of four keeps the last four.
    let recs: Vec<Record> = (1..=10u8)
        .map(|i| {
            let env = EnvelopeBuilder::new(
                MessageId::from_u128(1),
                AgentId([i; 32]),
                Destination::Agent(AgentId([2; 32])),
                1_000,
                59_000,
            )
            .build(b"x")
            .unwrap();
            Record::Envelope(StoredEnvelope::of(u64::from(i), &env).unwrap())
        })
        .collect();
    let seg = segment(0, 1, &recs, 0).freeze();
    let p = plan(
        vec![(SegmentId { core: 0, number: 1 }, record::scan(seg).unwrap())],
        Vec::new(),
        plan_cfg(1, 4),
    );
    let sources: Vec<u8> = p.cores[0].windows.iter().map(|w| w.source.0[0]).collect();
    assert_eq!(sources, vec![10, 9, 8, 7]);
}

#[test]
fn a_segment_rewritten_at_start_can_be_compacted() {
    // What a start hands a core: one segment with five live records of 400 bytes.
    let recs: Vec<(u64, u64, u32)> = (0..5).map(|i| (i + 1, 32 + i * 400, 400)).collect();
    let mut log = Log::new(
        0,
        8192,
        5,
        [super::log::Existing {
            number: 4,
            end: 2032,
            records: recs,
            keep_until_ms: 0,
        }],
    );
    let s = log.segments()[&4];
    assert_eq!((s.end, s.size, s.live_bytes), (2032, 2032, 2000));
    log.release(&[1, 2, 3, 4], 0);
    let s = log.segments()[&4];
    assert!(
        s.live_bytes * 4 < s.end,
        "less than a quarter live: compaction may take it ({s:?})"
    );
}

#[test]
fn releases_that_could_not_be_written_are_written_after_the_retry() {
    let mut log = Log::new(0, 1 << 20, 1, []);
    let mut disk = Disk::default();
    for i in 1..=3 {
        log.append(i, &envelope(i, 2, 100, 60_000), i, 0).unwrap();
    }
    while disk.step(&mut log, true) {}
    // Envelope 1 is delivered; the batch with its released record fails.
    log.release(&[1], 0);
    while disk.step(&mut log, false) {}
    assert!(log.is_failed());
    // Envelope 2 is delivered while the log is failed.
    log.release(&[2], 0);
    log.retry(0);
    disk.settle(&mut log, true);
    let live: Vec<u64> = disk.recover().live.iter().map(|(_, e)| e.seq).collect();
    assert_eq!(
        live,
        vec![3],
        "neither delivered envelope comes back after a crash"
    );
}

#[test]
fn a_failed_sync_fails_its_tickets_refuses_appends_and_recovers_in_a_new_segment() {
    let mut log = Log::new(0, 1 << 20, 1, []);
    let mut disk = Disk::default();
    log.append(1, &envelope(1, 2, 100, 60_000), 1, 0).unwrap();
    while disk.step(&mut log, true) {}
    log.append(2, &envelope(2, 2, 100, 60_000), 2, 0).unwrap();
    assert!(disk.step(&mut log, true)); // write
    log.append(3, &envelope(3, 2, 100, 60_000), 3, 0).unwrap();
    assert!(disk.step(&mut log, false)); // the sync fails
    assert_eq!(log.take_durable(), vec![1]);
    assert_eq!(log.take_failed(), vec![2, 3]);
    assert!(log.is_failed());
    assert!(log.append(4, &envelope(4, 2, 100, 60_000), 4, 0).is_err());
    assert!(!disk.step(&mut log, true), "a failed log writes nothing");
    log.retry(0);
    assert!(
        disk.step(&mut log, true),
        "the retry creates a new segment at once"
    );
    assert_eq!(disk.ops.last(), Some(&"create"));
    let n = log.append(5, &envelope(5, 2, 100, 60_000), 5, 0).unwrap();
    assert_eq!(n, 2, "in the new segment");
    while disk.step(&mut log, true) {}
    assert!(log.is_idle());
    assert_eq!(log.take_durable(), vec![5]);
    let live: Vec<u64> = disk.recover().live.iter().map(|(_, e)| e.seq).collect();
    assert_eq!(live, vec![1, 5], "what failed is not claimed");
    // Even where the failed batch's write reached the disk: released after the retry, so the
    // source's resend (stored and delivered anew) is not followed by the old copy.
    let live: Vec<u64> = disk
        .recover_written()
        .live
        .iter()
        .map(|(_, e)| e.seq)
        .collect();
    assert_eq!(live, vec![1, 5], "what failed stays released");
}

proptest! {
    /// Any prefix of a segment's bytes (a crash at any point of a write) scans to the records
    /// wholly inside it, in order, and cuts nothing that was complete.
    #[test]
    fn any_prefix_keeps_exactly_the_complete_records(
        sizes in proptest::collection::vec(0usize..600, 1..12),
        cut_at in 0usize..10_000,
    ) {
        let recs: Vec<Record> = sizes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                if i % 4 == 3 {
                    Record::Released((0..*n as u64 % 9).collect())
                } else {
                    Record::Envelope(stored(i as u64 + 1, 2, *n, 60_000))
                }
            })
            .collect();
        let full = segment(0, 1, &recs, 0);
        let at = SEGMENT_HEADER_LEN + cut_at % (full.len() - SEGMENT_HEADER_LEN + 1);
        let mut data = BytesMut::from(&full[..at]);
        data.resize(full.len() + 64, 0);
        let data = data.freeze();
        let scan = record::scan(data.clone()).unwrap();
        let mut end = SEGMENT_HEADER_LEN;
        let mut complete = 0;
        for r in &recs {
            // Complete: written whole, or cut where its own last bytes were zeros anyway (the
            // zero fill completes it: the same bytes as written).
            let len = r.encoded_len();
            if end + len > at && data[end..end + len] != full[end..end + len] {
                break;
            }
            end += r.encoded_len();
            complete += 1;
        }
        prop_assert_eq!(scan.records.len(), complete);
        prop_assert_eq!(scan.end, end);
        for (got, want) in scan.records.iter().zip(&recs) {
            prop_assert_eq!(&got.1, want);
        }
    }
}

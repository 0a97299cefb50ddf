//! Every metric the relay exports: names, descriptions, and the per-core handles the engine
//! increments. `docs/OPERATIONS.md` lists the same names; keep both in step.
//!
//! The engine resolves every labelled handle once per core ([`CoreMetrics::new`]), so the
//! per-envelope path does an atomic add on a handle, never a registry lookup.

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics::{Counter, Gauge, Histogram, Unit};

use crate::wire::{DeliveryClass, Reason};

pub const ENVELOPES_IN: &str = "openmesh_envelopes_received_total";
pub const BYTES_IN: &str = "openmesh_envelope_bytes_received_total";
pub const ENVELOPES_OUT: &str = "openmesh_envelopes_delivered_total";
pub const BYTES_OUT: &str = "openmesh_envelope_bytes_delivered_total";
pub const ACKS_IN: &str = "openmesh_acks_received_total";
pub const ACKS_OUT: &str = "openmesh_acks_sent_total";
pub const UNKNOWN_IDS: &str = "openmesh_unknown_ids_total";
pub const REFUSED: &str = "openmesh_envelopes_refused_total";
pub const DROPPED: &str = "openmesh_envelopes_dropped_total";
pub const REDELIVERED: &str = "openmesh_envelopes_redelivered_total";
pub const SESSIONS_ACTIVE: &str = "openmesh_sessions_active";
pub const SESSIONS_OPENED: &str = "openmesh_sessions_opened_total";
pub const SESSIONS_CLOSED: &str = "openmesh_sessions_closed_total";
pub const CONNECTIONS_ACCEPTED: &str = "openmesh_connections_accepted_total";
pub const HANDSHAKE_FAILURES: &str = "openmesh_handshake_failures_total";
pub const QUEUE_DEPTH: &str = "openmesh_queue_depth";
pub const INFLIGHT: &str = "openmesh_inflight_envelopes";
pub const HELD: &str = "openmesh_custody_held_envelopes";
pub const SESSIONS_MOVED: &str = "openmesh_sessions_moved_total";
pub const HELD_FOR_ABSENT: &str = "openmesh_envelopes_held_for_absent_total";
pub const HELD_AGE_LIMIT: &str = "openmesh_held_age_limit_total";
pub const MAILBOX_SENT: &str = "openmesh_mailbox_messages_total";
pub const MAILBOX_FULL: &str = "openmesh_mailbox_full_total";
pub const THROTTLED: &str = "openmesh_reads_throttled_total";
pub const RTT: &str = "openmesh_session_rtt_seconds";
pub const KEY_UPDATES: &str = "openmesh_tls_key_updates_total";
pub const CORES: &str = "openmesh_engine_cores";
pub const MEMORY_USED: &str = "openmesh_memory_used_bytes";
pub const MEMORY_BUDGET: &str = "openmesh_memory_budget_bytes";
pub const OVERLOAD_STATE: &str = "openmesh_overload_state";
pub const FLEET_GENERATION: &str = "openmesh_fleet_generation";
pub const FLEET_ROUTED: &str = "openmesh_fleet_envelopes_total";
pub const FLEET_WAITING: &str = "openmesh_fleet_waiting_envelopes";
pub const FLEET_AGENTS: &str = "openmesh_fleet_located_agents";
pub const FLEET_AGENTS_EVICTED: &str = "openmesh_fleet_located_evicted_total";
pub const LINK_UP: &str = "openmesh_link_up";
pub const LINK_RTT: &str = "openmesh_link_rtt_seconds";
pub const LINK_LOSS: &str = "openmesh_link_ping_loss_ratio";
pub const LINK_ENVELOPES: &str = "openmesh_link_envelopes_total";
pub const LINK_ANSWERS: &str = "openmesh_link_answers_received_total";
pub const UNSHARED: &str = "openmesh_envelopes_unshared_total";
pub const RECEIPTS: &str = "openmesh_receipts_sent_total";
pub const RECEIPTS_DROPPED: &str = "openmesh_receipts_dropped_total";
pub const DIRECTORY_REQUESTS: &str = "openmesh_directory_requests_total";
pub const DIRECTORY_ENTRIES: &str = "openmesh_directory_entries";
pub const DIRECTORY_BYTES: &str = "openmesh_directory_bytes";
pub const DUPLICATES: &str = "openmesh_duplicates_suppressed_total";
pub const STORE_STATE: &str = "openmesh_store_state";
pub const STORE_SYNC: &str = "openmesh_store_sync_seconds";
pub const STORE_GROUP: &str = "openmesh_store_group_envelopes";
pub const STORE_ENVELOPES: &str = "openmesh_store_envelopes_written_total";
pub const STORE_FAILURES: &str = "openmesh_store_failures_total";
pub const STORE_STALLS: &str = "openmesh_store_stalls_total";
pub const STORE_SEGMENTS: &str = "openmesh_store_segments";
pub const STORE_DISK_BYTES: &str = "openmesh_store_disk_bytes";
pub const STORE_LIVE: &str = "openmesh_store_live_envelopes";
pub const STORE_COPIED: &str = "openmesh_store_compacted_records_total";
pub const STORE_REMOVED: &str = "openmesh_store_segments_removed_total";
pub const STORE_RECOVERED: &str = "openmesh_store_recovered_envelopes";
pub const STORE_CUTS: &str = "openmesh_store_recovery_cuts_total";

/// Registers the descriptions of every metric with the installed recorder.
pub fn describe() {
    describe_counter!(
        ENVELOPES_IN,
        Unit::Count,
        "Envelopes accepted from agents, by delivery class."
    );
    describe_counter!(
        BYTES_IN,
        Unit::Bytes,
        "Bytes of envelopes accepted from agents, by class."
    );
    describe_counter!(
        ENVELOPES_OUT,
        Unit::Count,
        "Envelopes written to destination agents, by class."
    );
    describe_counter!(
        BYTES_OUT,
        Unit::Bytes,
        "Bytes of envelopes written to destination agents, by class."
    );
    describe_counter!(
        ACKS_IN,
        Unit::Count,
        "Message ids acknowledged by destination agents."
    );
    describe_counter!(
        ACKS_OUT,
        Unit::Count,
        "Message ids acknowledged to source agents."
    );
    describe_counter!(
        UNKNOWN_IDS,
        Unit::Count,
        "Message ids in agents' ACK or NACK frames that matched no envelope in flight, by frame."
    );
    describe_counter!(
        REFUSED,
        Unit::Count,
        "Envelopes refused with a NACK, by reason."
    );
    describe_counter!(
        DROPPED,
        Unit::Count,
        "Envelopes dropped without a NACK (best-effort or undeliverable custody), by reason."
    );
    describe_counter!(
        REDELIVERED,
        Unit::Count,
        "Unacknowledged envelopes handed to a newer session of the same agent."
    );
    describe_gauge!(SESSIONS_ACTIVE, Unit::Count, "Established agent sessions.");
    describe_counter!(SESSIONS_OPENED, Unit::Count, "Agent sessions established.");
    describe_counter!(
        SESSIONS_CLOSED,
        Unit::Count,
        "Agent sessions closed, by reason."
    );
    describe_counter!(
        CONNECTIONS_ACCEPTED,
        Unit::Count,
        "TCP connections accepted on the agent port."
    );
    describe_counter!(
        HANDSHAKE_FAILURES,
        Unit::Count,
        "TLS or HELLO handshakes that failed, by reason."
    );
    describe_gauge!(
        QUEUE_DEPTH,
        Unit::Count,
        "Envelopes queued towards agents and not yet written."
    );
    describe_gauge!(
        INFLIGHT,
        Unit::Count,
        "At-least-once envelopes written to agents and not yet acknowledged."
    );
    describe_counter!(
        SESSIONS_MOVED,
        Unit::Count,
        "Sessions handed to their agent's home core after HELLO."
    );
    describe_counter!(
        HELD_FOR_ABSENT,
        Unit::Count,
        "Envelopes accepted for an agent that was not connected, kept until it connects or they expire."
    );
    describe_counter!(
        HELD_AGE_LIMIT,
        Unit::Count,
        "Envelopes kept for an absent agent longer than limits.absent_max_age_s, dropped."
    );
    describe_gauge!(
        HELD,
        Unit::Count,
        "Envelopes kept for agents that are not connected (memory only; lost at exit, counted)."
    );
    describe_counter!(
        MAILBOX_SENT,
        Unit::Count,
        "Envelopes sent from this core to another core's mailbox, by sending core."
    );
    describe_counter!(
        MAILBOX_FULL,
        Unit::Count,
        "Times a cross-core mailbox was full and the sender waited."
    );
    describe_counter!(THROTTLED, Unit::Count, "Times a session's reading paused: on its rate limits (envelopes, bytes) or on a congested destination queue.");
    describe_histogram!(
        RTT,
        Unit::Seconds,
        "Round-trip time measured by PING/PONG on agent sessions."
    );
    describe_counter!(
        KEY_UPDATES,
        Unit::Count,
        "TLS 1.3 KeyUpdates sent on the session's rotation interval."
    );
    describe_gauge!(CORES, Unit::Count, "Dataplane cores running.");
    describe_gauge!(
        MEMORY_USED,
        Unit::Bytes,
        "Bytes a core holds on peers' behalf (custody, buffers, a share per connection), at its last tick."
    );
    describe_gauge!(
        MEMORY_BUDGET,
        Unit::Bytes,
        "The relay's memory budget (limits.memory_budget)."
    );
    describe_gauge!(
        OVERLOAD_STATE,
        Unit::Count,
        "Overload state seen by a core: 0 normal, 1 shedding best-effort and new sessions, 2 refusing new work."
    );
    describe_gauge!(
        FLEET_GENERATION,
        Unit::Count,
        "Generation of the fleet's route snapshot a core applied (0: none)."
    );
    describe_counter!(
        FLEET_ROUTED,
        Unit::Count,
        "Envelopes of the fleet by what a core did with them: forwarded (queued on a relay link), delivered (this relay is the last of the path), kept (waiting for a compliant path), no_path (refused at ingress)."
    );
    describe_gauge!(
        FLEET_WAITING,
        Unit::Count,
        "Envelopes a core keeps until a compliant path exists."
    );
    describe_gauge!(
        FLEET_AGENTS,
        Unit::Count,
        "Agents a core knows the relay of (presence over relay links, and its own)."
    );
    describe_counter!(
        FLEET_AGENTS_EVICTED,
        Unit::Count,
        "Presence entries a full table gave up (the oldest of the relay that announced the most)."
    );
    describe_gauge!(
        LINK_UP,
        Unit::Count,
        "1 while the relay link to a peer is up, 0 once it went down."
    );
    describe_gauge!(
        LINK_RTT,
        Unit::Seconds,
        "Round-trip time of the last PING answered on a relay link."
    );
    describe_gauge!(
        LINK_LOSS,
        Unit::Count,
        "Share of a relay link's PINGs not answered (since the link came up)."
    );
    describe_counter!(
        LINK_ENVELOPES,
        Unit::Count,
        "Envelopes queued on a relay link (direction out) or received from it (in)."
    );
    describe_counter!(
        LINK_ANSWERS,
        Unit::Count,
        "Answers from a relay link's peer to envelopes sent on it: acked (custody taken) or refused."
    );
    describe_counter!(
        UNSHARED,
        Unit::Count,
        "Envelopes held a whole tick and moved off the read buffers they pinned."
    );
    describe_counter!(
        RECEIPTS,
        Unit::Count,
        "RECEIPT frames sent to source agents, by status (delivered, expired)."
    );
    describe_counter!(
        RECEIPTS_DROPPED,
        Unit::Count,
        "Receipts due to a source that was not connected (or did not agree to receipts), dropped."
    );
    describe_counter!(
        DIRECTORY_REQUESTS,
        Unit::Count,
        "Directory requests, by outcome (publish: a bundle accepted; refused: a publish refused; lookup; rate_limited: beyond 32 a second)."
    );
    describe_gauge!(
        DIRECTORY_ENTRIES,
        Unit::Count,
        "Key bundles held in the relay's directory."
    );
    describe_gauge!(
        DIRECTORY_BYTES,
        Unit::Bytes,
        "Bytes the directory's entries are charged (bundles plus a fixed overhead each)."
    );
    describe_counter!(
        DUPLICATES,
        Unit::Count,
        "Envelopes whose (source, message id) was accepted before: ACKed again (best-effort: dropped), not delivered twice."
    );
    describe_gauge!(
        STORE_STATE,
        Unit::Count,
        "A core's store: 0 takes durable envelopes, 1 an operation stalled, 2 an operation failed (durable envelopes refused store_unavailable)."
    );
    describe_histogram!(
        STORE_SYNC,
        Unit::Seconds,
        "fdatasync latency of the store's group commits."
    );
    describe_histogram!(
        STORE_GROUP,
        Unit::Count,
        "Durable envelopes made durable by one fdatasync (group commit size)."
    );
    describe_counter!(
        STORE_ENVELOPES,
        Unit::Count,
        "Durable envelopes written and synced to the store."
    );
    describe_counter!(
        STORE_FAILURES,
        Unit::Count,
        "Store file operations that failed (disk full, I/O error)."
    );
    describe_counter!(
        STORE_STALLS,
        Unit::Count,
        "Store file operations that ran longer than store.stall_ms."
    );
    describe_gauge!(
        STORE_SEGMENTS,
        Unit::Count,
        "Segment files a core's store holds."
    );
    describe_gauge!(
        STORE_DISK_BYTES,
        Unit::Bytes,
        "Disk space a core's segment files take (preallocated)."
    );
    describe_gauge!(
        STORE_LIVE,
        Unit::Count,
        "Envelopes in a core's store not yet delivered or expired."
    );
    describe_counter!(
        STORE_COPIED,
        Unit::Count,
        "Live records copied forward out of a mostly delivered segment so that it can go (compaction)."
    );
    describe_counter!(
        STORE_REMOVED,
        Unit::Count,
        "Segments removed once nothing in them was live."
    );
    describe_gauge!(
        STORE_RECOVERED,
        Unit::Count,
        "Live envelopes recovered from the store at start."
    );
    describe_counter!(
        STORE_CUTS,
        Unit::Count,
        "Segments whose recovery stopped at a bad record (torn write or corruption)."
    );
}

/// Handles of one core's store.
#[derive(Clone)]
pub struct StoreMetrics {
    pub state: Gauge,
    pub sync_seconds: Histogram,
    pub group_envelopes: Histogram,
    pub envelopes: Counter,
    pub failures: Counter,
    pub stalls: Counter,
    pub segments: Gauge,
    pub disk_bytes: Gauge,
    pub live: Gauge,
    pub copied: Counter,
    pub removed: Counter,
}

impl StoreMetrics {
    /// Resolves every handle for core `core`.
    pub fn new(core: u16) -> Self {
        let core = core.to_string();
        StoreMetrics {
            state: gauge!(STORE_STATE, "core" => core.clone()),
            sync_seconds: histogram!(STORE_SYNC),
            group_envelopes: histogram!(STORE_GROUP),
            envelopes: counter!(STORE_ENVELOPES, "core" => core.clone()),
            failures: counter!(STORE_FAILURES, "core" => core.clone()),
            stalls: counter!(STORE_STALLS, "core" => core.clone()),
            segments: gauge!(STORE_SEGMENTS, "core" => core.clone()),
            disk_bytes: gauge!(STORE_DISK_BYTES, "core" => core.clone()),
            live: gauge!(STORE_LIVE, "core" => core.clone()),
            copied: counter!(STORE_COPIED, "core" => core.clone()),
            removed: counter!(STORE_REMOVED, "core" => core),
        }
    }
}

/// Handles one core increments.
#[derive(Clone)]
pub struct CoreMetrics {
    pub envelopes_in: [Counter; 3],
    pub bytes_in: [Counter; 3],
    pub envelopes_out: [Counter; 3],
    pub bytes_out: [Counter; 3],
    pub acks_in: Counter,
    pub acks_out: Counter,
    pub unknown_acks: Counter,
    pub unknown_nacks: Counter,
    refused: Vec<Counter>,
    dropped: Vec<Counter>,
    closed: Vec<Counter>,
    handshake_failures: Vec<Counter>,
    pub redelivered: Counter,
    pub sessions_active: Gauge,
    pub sessions_opened: Counter,
    pub connections_accepted: Counter,
    pub queue_depth: Gauge,
    pub inflight: Gauge,
    pub held: Gauge,
    pub sessions_moved: Counter,
    pub held_for_absent: Counter,
    pub held_age_limit: Counter,
    pub mailbox_sent: Counter,
    pub mailbox_full: Counter,
    pub throttled_frames: Counter,
    pub throttled_bytes: Counter,
    pub throttled_destination: Counter,
    pub throttled_send_window: Counter,
    pub rtt: Histogram,
    pub key_updates: Counter,
    pub memory_used: Gauge,
    pub overload_state: Gauge,
    pub fleet_generation: Gauge,
    fleet_routed: [Counter; 4],
    pub fleet_waiting: Gauge,
    pub fleet_agents: Gauge,
    pub fleet_agents_evicted: Counter,
    pub unshared: Counter,
    pub duplicates: Counter,
    receipts_sent: [Counter; 2],
    pub receipts_dropped: Counter,
    directory: [Counter; 4],
}

impl CoreMetrics {
    /// Resolves every handle for core `core`.
    pub fn new(core: u16) -> Self {
        let core = core.to_string();
        let by_class =
            |name: &'static str| DeliveryClass::ALL.map(|c| counter!(name, "class" => c.label()));
        let by_reason = |name: &'static str| {
            Reason::ALL
                .iter()
                .map(|r| counter!(name, "reason" => r.label()))
                .collect()
        };
        CoreMetrics {
            envelopes_in: by_class(ENVELOPES_IN),
            bytes_in: by_class(BYTES_IN),
            envelopes_out: by_class(ENVELOPES_OUT),
            bytes_out: by_class(BYTES_OUT),
            acks_in: counter!(ACKS_IN),
            acks_out: counter!(ACKS_OUT),
            unknown_acks: counter!(UNKNOWN_IDS, "frame" => "ack"),
            unknown_nacks: counter!(UNKNOWN_IDS, "frame" => "nack"),
            refused: by_reason(REFUSED),
            dropped: by_reason(DROPPED),
            closed: by_reason(SESSIONS_CLOSED),
            handshake_failures: by_reason(HANDSHAKE_FAILURES),
            redelivered: counter!(REDELIVERED),
            sessions_active: gauge!(SESSIONS_ACTIVE),
            sessions_opened: counter!(SESSIONS_OPENED),
            connections_accepted: counter!(CONNECTIONS_ACCEPTED),
            queue_depth: gauge!(QUEUE_DEPTH, "core" => core.clone()),
            inflight: gauge!(INFLIGHT, "core" => core.clone()),
            held: gauge!(HELD, "core" => core.clone()),
            sessions_moved: counter!(SESSIONS_MOVED, "core" => core.clone()),
            held_for_absent: counter!(HELD_FOR_ABSENT, "core" => core.clone()),
            held_age_limit: counter!(HELD_AGE_LIMIT, "core" => core.clone()),
            mailbox_sent: counter!(MAILBOX_SENT, "from_core" => core.clone()),
            mailbox_full: counter!(MAILBOX_FULL, "from_core" => core.clone()),
            throttled_frames: counter!(THROTTLED, "limit" => "frames"),
            throttled_bytes: counter!(THROTTLED, "limit" => "bytes"),
            throttled_destination: counter!(THROTTLED, "limit" => "destination_queue"),
            throttled_send_window: counter!(THROTTLED, "limit" => "send_window"),
            rtt: histogram!(RTT),
            key_updates: counter!(KEY_UPDATES),
            memory_used: gauge!(MEMORY_USED, "core" => core.clone()),
            overload_state: gauge!(OVERLOAD_STATE, "core" => core.clone()),
            fleet_generation: gauge!(FLEET_GENERATION, "core" => core.clone()),
            fleet_routed: [
                FleetOutcome::Forwarded,
                FleetOutcome::Delivered,
                FleetOutcome::Kept,
                FleetOutcome::NoPath,
            ]
            .map(|o| counter!(FLEET_ROUTED, "outcome" => o.label())),
            fleet_waiting: gauge!(FLEET_WAITING, "core" => core.clone()),
            fleet_agents: gauge!(FLEET_AGENTS, "core" => core.clone()),
            fleet_agents_evicted: counter!(FLEET_AGENTS_EVICTED, "core" => core.clone()),
            unshared: counter!(UNSHARED, "core" => core.clone()),
            duplicates: counter!(DUPLICATES, "core" => core.clone()),
            receipts_sent: [
                counter!(RECEIPTS, "status" => "delivered"),
                counter!(RECEIPTS, "status" => "expired"),
            ],
            receipts_dropped: counter!(RECEIPTS_DROPPED),
            directory: ["publish", "refused", "lookup", "rate_limited"]
                .map(|o| counter!(DIRECTORY_REQUESTS, "outcome" => o)),
        }
    }

    fn idx(r: Reason) -> usize {
        Reason::ALL.iter().position(|x| *x == r).unwrap_or(0)
    }

    /// Counts what a core did with an envelope of the fleet.
    pub fn fleet_routed(&self, o: FleetOutcome) {
        self.fleet_routed[o as usize].increment(1);
    }

    /// Counts one envelope refused with a NACK.
    pub fn refused(&self, r: Reason) {
        self.refused[Self::idx(r)].increment(1);
    }
    /// Counts envelopes dropped without a NACK.
    pub fn dropped(&self, r: Reason, n: u64) {
        self.dropped[Self::idx(r)].increment(n);
    }
    /// Counts one directory request: `publish` (accepted), `refused` (a publish refused),
    /// `lookup`, or `rate_limited` (beyond the session's requests per second).
    pub fn directory(&self, outcome: &str) {
        let i = match outcome {
            "publish" => 0,
            "refused" => 1,
            "lookup" => 2,
            _ => 3,
        };
        self.directory[i].increment(1);
    }

    /// Counts one receipt sent.
    pub fn receipts(&self, status: crate::wire::ReceiptStatus) {
        self.receipts_sent[status as usize].increment(1);
    }
    /// Counts one closed session.
    pub fn closed(&self, r: Reason) {
        self.closed[Self::idx(r)].increment(1);
    }
    /// Counts one failed handshake.
    pub fn handshake_failed(&self, r: Reason) {
        self.handshake_failures[Self::idx(r)].increment(1);
    }
}

/// What a core did with an envelope of the fleet ([`FLEET_ROUTED`]'s `outcome`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FleetOutcome {
    Forwarded = 0,
    Delivered = 1,
    Kept = 2,
    NoPath = 3,
}

impl FleetOutcome {
    pub fn label(self) -> &'static str {
        match self {
            Self::Forwarded => "forwarded",
            Self::Delivered => "delivered",
            Self::Kept => "kept",
            Self::NoPath => "no_path",
        }
    }
}

/// One relay link's handles, labelled with the peer's name in the fleet file.
pub struct LinkMetrics {
    pub up: Gauge,
    pub rtt: Gauge,
    pub lost: Gauge,
    pub sent: Counter,
    pub received: Counter,
    pub acked: Counter,
    pub refused: Counter,
}

impl LinkMetrics {
    pub fn new(peer: &str) -> Self {
        let p = peer.to_string();
        LinkMetrics {
            up: gauge!(LINK_UP, "peer" => p.clone()),
            rtt: gauge!(LINK_RTT, "peer" => p.clone()),
            lost: gauge!(LINK_LOSS, "peer" => p.clone()),
            sent: counter!(LINK_ENVELOPES, "peer" => p.clone(), "direction" => "out"),
            received: counter!(LINK_ENVELOPES, "peer" => p.clone(), "direction" => "in"),
            acked: counter!(LINK_ANSWERS, "peer" => p.clone(), "answer" => "acked"),
            refused: counter!(LINK_ANSWERS, "peer" => p, "answer" => "refused"),
        }
    }
}

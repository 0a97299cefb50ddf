//! Messages between shards (one per core), and the outbox a shard collects them in.
//!
//! A shard never touches another core's state: everything that crosses cores is one of these
//! messages. The shard queues them per destination core in its [`Outbox`]; the engine moves them
//! into the bounded mailboxes in batches (one wake-up per flush, not per message) and keeps what
//! did not fit for the next flush.

use std::collections::VecDeque;
use std::sync::Arc;

use super::Settings;
use crate::routing::Location;
use crate::wire::{AgentId, Envelope, MessageId, PresenceEntry, Reason, RelayId};

/// Identifies a connection on its core.
pub type ConnId = u64;

/// Where a verdict goes back to: the source connection (its core, its id there) and the tag it
/// is answered by (the envelope's message id for an agent; for a relay link, its link sequence
/// number as a message id).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Src {
    pub core: u16,
    pub conn: ConnId,
    pub tag: MessageId,
    /// The source is a relay link: in transit the answer waits until the next relay took the
    /// envelope (custody moves along the path; an agent is answered once this relay has it).
    pub relay: bool,
    /// The envelope's frame length when it arrived (its routing part may change on the way:
    /// the source counts this while it waits, and counts this off).
    pub len: u32,
}

/// A message between cores.
#[derive(Debug)]
pub enum CoreMsg {
    /// `agent` attached at `loc`; every other core answers with `AttachAck`.
    Attach {
        agent: AgentId,
        loc: Location,
        conn: ConnId,
    },
    /// Answer to `Attach`, for the connection that is waiting to send WELCOME.
    AttachAck { conn: ConnId },
    /// `agent`'s attachment with sequence `seq` ended.
    Detach { agent: AgentId, seq: u64 },
    /// Deliver an envelope to an agent attached on the receiving core. `src` (core, connection)
    /// wants a `Verdict`; `None` is a custody hand-over that needs none.
    Deliver { env: Envelope, src: Option<Src> },
    /// Outcome of a `Deliver` for the source connection; `Ok(true)`: the destination's queue is
    /// congested and the source's reader pauses until `Resume` (or its pause runs out).
    Verdict {
        conn: ConnId,
        id: MessageId,
        /// The envelope's frame length (what the source's core stops counting as sent).
        len: u32,
        class_acked: bool,
        result: Result<bool, Reason>,
    },
    /// A destination the connection's source sent to while congested has drained: its reader
    /// may go on.
    Resume { conn: ConnId },
    /// A receipt for source agent `to` (sent to its home core, where its session is).
    Receipt {
        to: AgentId,
        receipt: crate::wire::Receipt,
        /// Relays it may still cross to reach `to` elsewhere in the fleet.
        hops_left: u8,
    },
    /// A session moving to its agent's home core, with its socket (none in the simulated
    /// relay). The engine adopts it ([`super::Shard::adopt`]) before the shard sees messages
    /// after it.
    Adopt {
        conn: super::conn::MovingConn,
        socket: Option<std::os::fd::OwnedFd>,
    },
    /// An envelope for the relay link to `peer`, which this core owns. `src` wants a
    /// `Verdict`; `None`: custody already taken.
    Forward {
        env: Envelope,
        peer: RelayId,
        src: Option<Src>,
    },
    /// The link to `peer` is up, on connection `conn` of core `core`.
    LinkUp {
        peer: RelayId,
        core: u16,
        conn: ConnId,
        latency_us: u32,
    },
    /// That link went down.
    LinkDown {
        peer: RelayId,
        core: u16,
        conn: ConnId,
    },
    /// Stored envelopes another core's custody settled (they had moved to a relay link): the
    /// core whose log holds them writes their released records; the others ignore them.
    ReleaseStored { seqs: Vec<u64> },
    /// The link to `peer`'s one-way latency, measured.
    LinkLatency { peer: RelayId, latency_us: u32 },
    /// Where agents are attached (from a link to `from`, or this relay's own attachments).
    Presence {
        entries: Arc<[PresenceEntry]>,
        from: Option<RelayId>,
    },
    /// A receipt for agent `to` on another relay, to go out on the link to `peer` (this core's).
    LinkReceipt {
        peer: RelayId,
        receipt: crate::wire::LinkReceipt,
    },
    /// A socket connected to `peer`'s link port by the dialler: the core that owns the link
    /// starts the TLS handshake on it (the engine takes it; without a socket it is dropped).
    Dial {
        peer: RelayId,
        socket: Option<std::os::fd::OwnedFd>,
    },
    /// New live settings.
    Reconfigure(Arc<Settings>),
    /// A newer route snapshot of the fleet.
    Fleet(Arc<crate::fleet::snapshot::Snapshot>),
    /// Begin a graceful drain.
    Drain,
    /// Stop the core.
    Exit,
}

/// One shard's pending messages to every core.
#[derive(Debug)]
pub struct Outbox {
    pub(crate) per_core: Vec<VecDeque<CoreMsg>>,
}

impl Outbox {
    /// An outbox for `cores` cores.
    pub fn new(cores: usize) -> Self {
        Outbox {
            per_core: (0..cores).map(|_| VecDeque::new()).collect(),
        }
    }

    /// Queues `msg` for `core`.
    pub fn push(&mut self, core: u16, msg: CoreMsg) {
        self.per_core[core as usize].push_back(msg);
    }

    /// Largest backlog towards any core.
    pub fn max_pending(&self) -> usize {
        self.per_core.iter().map(VecDeque::len).max().unwrap_or(0)
    }

    /// The queues, per destination core (the engine drains them into the mailboxes).
    pub fn queues_mut(&mut self) -> impl Iterator<Item = (usize, &mut VecDeque<CoreMsg>)> {
        self.per_core.iter_mut().enumerate()
    }
}

//! Messages between shards (one per core), and the outbox a shard collects them in.
//!
//! A shard never touches another core's state: everything that crosses cores is one of these
//! messages. The shard queues them per destination core in its [`Outbox`]; the engine moves them
//! into the bounded mailboxes in batches (one wake-up per flush, not per message) and keeps what
//! did not fit for the next flush. Envelopes and verdicts queued for the same core before a
//! flush travel together in one message ([`CoreMsg::Delivers`], [`CoreMsg::Verdicts`]): one
//! mailbox slot and one move of a pointer instead of a slot and several copies of the whole
//! message each.

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
    /// The source lets its answer wait (an agent that offered `features::ACK_DELAY`): another
    /// core may hold the verdict up to `features::ACK_HOLD_MS` to send it with others.
    pub hold: bool,
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
    /// `Deliver`s queued one after another for the same core, in order.
    Delivers(Vec<(Envelope, Option<Src>)>),
    /// Outcome of a `Deliver` for the source connection.
    Verdict(Verdict),
    /// `Verdict`s queued one after another for the same core, in order.
    Verdicts(Vec<Verdict>),
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

/// The outcome of a `Deliver` for its source connection; `Ok(true)`: the destination's queue
/// is congested and the source's reader pauses until `Resume` (or its pause runs out).
#[derive(Debug)]
pub struct Verdict {
    pub conn: ConnId,
    pub id: MessageId,
    /// The envelope's frame length (what the source's core stops counting as sent).
    pub len: u32,
    pub class_acked: bool,
    pub result: Result<bool, Reason>,
}

/// Most envelopes or verdicts one message carries.
pub const MAX_COALESCED: usize = 256;

/// One shard's pending messages to every core.
#[derive(Debug)]
pub struct Outbox {
    pub(crate) per_core: Vec<VecDeque<CoreMsg>>,
    /// Per core, how long a run of `Delivers` and of `Verdicts` to it recently grew: a new run
    /// starts with room for about that many, so a run does not copy itself as it grows (the
    /// hint halves at each new run and follows the runs down: what short runs after a long one
    /// reserve beyond their length adds up to at most `2 * MAX_COALESCED` entries per core and
    /// kind).
    runs: Vec<(usize, usize)>,
}

/// The room a run starts with at least.
const RUN_MIN: usize = 16;

/// A new run's vector, with room for about what the last runs held; halves `hint`.
fn run_vec<T>(hint: &mut usize) -> Vec<T> {
    let v = Vec::with_capacity((*hint).clamp(RUN_MIN, MAX_COALESCED));
    *hint /= 2;
    v
}

impl Outbox {
    /// An outbox for `cores` cores.
    pub fn new(cores: usize) -> Self {
        Outbox {
            per_core: (0..cores).map(|_| VecDeque::new()).collect(),
            runs: vec![(0, 0); cores],
        }
    }

    /// Queues `msg` for `core`. A `Deliver` or `Verdict` queued right behind another of its
    /// kind joins it in one message (order kept: only the last message is joined).
    pub fn push(&mut self, core: u16, msg: CoreMsg) {
        match msg {
            CoreMsg::Deliver { env, src } => self.deliver(core, env, src),
            CoreMsg::Verdict(v) => self.verdict(core, v),
            msg => self.per_core[core as usize].push_back(msg),
        }
    }

    /// Queues a `Deliver` for `core`, joining the `Deliver`s queued right before it.
    pub fn deliver(&mut self, core: u16, env: Envelope, src: Option<Src>) {
        let q = &mut self.per_core[core as usize];
        let hint = &mut self.runs[core as usize].0;
        match q.back_mut() {
            Some(CoreMsg::Delivers(v)) if v.len() < MAX_COALESCED => {
                v.push((env, src));
                *hint = (*hint).max(v.len());
            }
            Some(back @ CoreMsg::Deliver { .. }) => {
                let mut v = run_vec(hint);
                if let CoreMsg::Deliver { env, src } = std::mem::replace(back, CoreMsg::Drain) {
                    v.push((env, src));
                }
                v.push((env, src));
                *back = CoreMsg::Delivers(v);
            }
            _ => q.push_back(CoreMsg::Deliver { env, src }),
        }
    }

    /// Queues a `Verdict` for `core`, joining the `Verdict`s queued right before it.
    pub fn verdict(&mut self, core: u16, v: Verdict) {
        let q = &mut self.per_core[core as usize];
        let hint = &mut self.runs[core as usize].1;
        match q.back_mut() {
            Some(CoreMsg::Verdicts(vs)) if vs.len() < MAX_COALESCED => {
                vs.push(v);
                *hint = (*hint).max(vs.len());
            }
            Some(back @ CoreMsg::Verdict(_)) => {
                let mut vs = run_vec(hint);
                if let CoreMsg::Verdict(first) = std::mem::replace(back, CoreMsg::Drain) {
                    vs.push(first);
                }
                vs.push(v);
                *back = CoreMsg::Verdicts(vs);
            }
            _ => q.push_back(CoreMsg::Verdict(v)),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Destination, EnvelopeBuilder};

    fn deliver(i: u128) -> CoreMsg {
        let env = EnvelopeBuilder::new(
            MessageId::from_u128(i),
            AgentId([1; 32]),
            Destination::Agent(AgentId([2; 32])),
            0,
            10,
        )
        .build(b"")
        .unwrap();
        CoreMsg::Deliver { env, src: None }
    }

    fn verdict(i: u128) -> CoreMsg {
        CoreMsg::Verdict(Verdict {
            conn: 1,
            id: MessageId::from_u128(i),
            len: 10,
            class_acked: true,
            result: Ok(false),
        })
    }

    /// What `core` would receive, one envelope or verdict id at a time, in order.
    fn received(out: &mut Outbox, core: usize) -> Vec<(char, u128)> {
        let mut ids = Vec::new();
        for m in out.per_core[core].drain(..) {
            match m {
                CoreMsg::Deliver { env, .. } => ids.push(('d', env.message_id().as_u128())),
                CoreMsg::Delivers(v) => {
                    ids.extend(v.iter().map(|(e, _)| ('d', e.message_id().as_u128())))
                }
                CoreMsg::Verdict(v) => ids.push(('v', v.id.as_u128())),
                CoreMsg::Verdicts(v) => ids.extend(v.iter().map(|v| ('v', v.id.as_u128()))),
                CoreMsg::Resume { conn } => ids.push(('r', u128::from(conn))),
                other => panic!("{other:?}"),
            }
        }
        ids
    }

    #[test]
    fn envelopes_and_verdicts_queued_together_travel_together_in_order() {
        let mut out = Outbox::new(2);
        let mut want = Vec::new();
        for i in 0..600u128 {
            let m = match i % 7 {
                0..=3 => deliver(i),
                4 | 5 => verdict(i),
                _ => CoreMsg::Resume { conn: i as u64 },
            };
            want.push((['d', 'd', 'd', 'd', 'v', 'v', 'r'][(i % 7) as usize], i));
            out.push(0, m);
        }
        for i in 0..1000u128 {
            out.push(1, deliver(i));
        }
        // Runs of four deliveries and of two verdicts become one message each.
        assert_eq!(out.per_core[0].len(), 600 / 7 * 3 + 2);
        assert_eq!(received(&mut out, 0), want);
        // A long run is cut at MAX_COALESCED.
        assert_eq!(out.per_core[1].len(), 1000_usize.div_ceil(MAX_COALESCED));
        let got = received(&mut out, 1);
        assert_eq!(got, (0..1000).map(|i| ('d', i)).collect::<Vec<_>>());
    }

    /// The room a run of deliveries reserved: its vector's capacity.
    fn reserved(out: &mut Outbox, core: usize) -> usize {
        let room = out.per_core[core]
            .iter()
            .map(|m| match m {
                CoreMsg::Delivers(v) => v.capacity(),
                _ => 0,
            })
            .sum();
        out.per_core[core].clear();
        room
    }

    #[test]
    fn a_run_starts_with_the_room_recent_runs_took_and_short_runs_give_it_back() {
        let mut out = Outbox::new(1);
        for i in 0..200u128 {
            out.push(0, deliver(i));
        }
        // Grown one envelope at a time from the smallest run's room.
        assert!(reserved(&mut out, 0) >= 200);
        // The next run starts with that room (no copy as it grows)...
        for i in 0..150u128 {
            out.push(0, deliver(i));
        }
        assert_eq!(reserved(&mut out, 0), 200);
        // ...and short runs after it reserve less and less: a bounded sum, then the least.
        let mut sum = 0;
        let mut last = 0;
        for _ in 0..12 {
            out.push(0, deliver(1));
            out.push(0, deliver(2));
            last = reserved(&mut out, 0);
            sum += last;
        }
        assert!(sum <= 2 * MAX_COALESCED + 12 * RUN_MIN, "{sum}");
        assert_eq!(last, RUN_MIN);
    }
}

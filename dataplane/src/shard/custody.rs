//! Custody: what a shard holds for destination agents until they ACK.
//!
//! - [`Inflight`]: envelopes written to an agent, waiting for its ACK;
//! - [`SendQueue`]: envelopes queued towards a connected agent, not yet written;
//! - [`Held`]: envelopes kept for agents whose session ended, for their next session.
//!
//! ## In flight
//!
//! Kept in send order, with the set of ids still unacknowledged beside it. Agents ACK in the order
//! they received, so the common case pops the front; an ACK for an id further back only removes
//! it from the set, and its envelope leaves when it reaches the front. An id that is not in the
//! set (never written, or already ACKed) changes nothing and is reported as unknown.
//!
//! The deliver window counts from the oldest unacknowledged envelope: the writer stops when the
//! queue holds `deliver_window` envelopes or `deliver_window_bytes` bytes, so a receiver that
//! never ACKs holds at most one window.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::wire::{AgentId, DeliveryClass, Envelope, MessageId, Reason};

#[derive(Default)]
pub(crate) struct Inflight {
    order: VecDeque<Envelope>,
    /// Frame bytes of the envelopes in `order`.
    bytes: usize,
    unacked: HashSet<MessageId, foldhash::fast::RandomState>,
}

/// What an ACK or NACK from the agent did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Settled {
    /// The id was in flight; it left custody.
    Known,
    /// No envelope with this id is in flight.
    Unknown,
}

impl Inflight {
    /// Records an envelope just written to the agent.
    pub(crate) fn push(&mut self, env: Envelope) {
        self.bytes += env.frame_len();
        self.unacked.insert(env.message_id());
        self.order.push_back(env);
    }

    /// Whether the deliver window has room for one more envelope of `frame_len` bytes.
    pub(crate) fn has_room(&self, window: usize, window_bytes: usize, frame_len: usize) -> bool {
        self.order.len() < window && self.bytes + frame_len <= window_bytes
    }

    /// Applies an ACK (or the agent's NACK) for `id`.
    pub(crate) fn settle(&mut self, id: MessageId) -> Settled {
        if !self.unacked.remove(&id) {
            return Settled::Unknown;
        }
        while let Some(front) = self.order.front() {
            if self.unacked.contains(&front.message_id()) {
                break;
            }
            self.bytes -= front.frame_len();
            self.order.pop_front();
        }
        Settled::Known
    }

    /// Envelopes still unacknowledged.
    pub(crate) fn len(&self) -> usize {
        self.unacked.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.unacked.is_empty()
    }

    /// Takes every envelope still unacknowledged, in send order.
    pub(crate) fn take(&mut self) -> Vec<Envelope> {
        let unacked = std::mem::take(&mut self.unacked);
        self.bytes = 0;
        self.order
            .drain(..)
            .filter(|e| unacked.contains(&e.message_id()))
            .collect()
    }
}

/// Envelopes queued towards one connected agent, bounded in count and bytes.
#[derive(Default)]
pub(crate) struct SendQueue {
    q: VecDeque<Envelope>,
    bytes: usize,
}

impl SendQueue {
    /// Queues `env` within the bounds. `Ok(true)`: past half of either bound (senders slow down).
    // The refused envelope travels back by value: no allocation on the refusal path.
    #[allow(clippy::result_large_err)]
    pub(crate) fn push(
        &mut self,
        env: Envelope,
        max_envelopes: usize,
        max_bytes: usize,
    ) -> Result<bool, (Reason, Envelope)> {
        let len = env.frame_len();
        if self.q.len() >= max_envelopes || self.bytes + len > max_bytes {
            return Err((Reason::QueueFull, env));
        }
        self.bytes += len;
        self.q.push_back(env);
        Ok(self.q.len() > max_envelopes / 2 || self.bytes > max_bytes / 2)
    }

    pub(crate) fn pop(&mut self) -> Option<Envelope> {
        let e = self.q.pop_front()?;
        self.bytes -= e.frame_len();
        Some(e)
    }

    pub(crate) fn front(&self) -> Option<&Envelope> {
        self.q.front()
    }

    pub(crate) fn len(&self) -> usize {
        self.q.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    /// Takes every queued envelope, in order.
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = Envelope> + '_ {
        self.bytes = 0;
        self.q.drain(..)
    }
}

/// Envelopes kept for agents whose session ended, until their next session or expiry.
#[derive(Default)]
pub(crate) struct Held {
    by_agent: HashMap<AgentId, VecDeque<Envelope>, foldhash::fast::RandomState>,
}

/// What [`Held::keep`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kept {
    Kept,
    /// Not kept: best-effort (nothing is kept for it) or over the bound; counted with this reason.
    Dropped(Reason),
}

impl Held {
    /// Keeps `env` for `agent`, at most `max_per_agent` envelopes.
    pub(crate) fn keep(&mut self, agent: AgentId, env: Envelope, max_per_agent: usize) -> Kept {
        if env.class() == DeliveryClass::BestEffort {
            return Kept::Dropped(Reason::DestinationUnavailable);
        }
        let q = self.by_agent.entry(agent).or_default();
        if q.len() >= max_per_agent {
            return Kept::Dropped(Reason::QueueFull);
        }
        q.push_back(env);
        Kept::Kept
    }

    /// Takes what is kept for `agent`.
    pub(crate) fn take(&mut self, agent: &AgentId) -> Option<VecDeque<Envelope>> {
        self.by_agent.remove(agent)
    }

    /// Drops expired envelopes; returns how many.
    pub(crate) fn expire(&mut self, now_ms: u64) -> u64 {
        let mut expired = 0u64;
        self.by_agent.retain(|_, q| {
            let before = q.len();
            q.retain(|e| e.expires_ms() > now_ms);
            expired += (before - q.len()) as u64;
            !q.is_empty()
        });
        expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{AgentId, Destination, EnvelopeBuilder};

    fn env(i: u128) -> Envelope {
        EnvelopeBuilder::new(
            MessageId::from_u128(i),
            AgentId([1; 32]),
            Destination::Agent(AgentId([2; 32])),
            0,
            10,
        )
        .build(b"")
        .unwrap()
    }

    #[test]
    fn in_order_out_of_order_and_bogus_acks() {
        let mut f = Inflight::default();
        for i in 0..5 {
            f.push(env(i));
        }
        let one = env(0).frame_len();
        assert_eq!(f.settle(MessageId::from_u128(0)), Settled::Known);
        assert_eq!(f.settle(MessageId::from_u128(2)), Settled::Known);
        assert_eq!(f.settle(MessageId::from_u128(3)), Settled::Known);
        assert_eq!(f.len(), 2);
        assert_eq!(f.bytes, 4 * one, "2 and 3 stay behind the unACKed 1");
        assert!(
            !f.has_room(4, usize::MAX, 0),
            "the window counts from the oldest"
        );
        assert!(f.has_room(5, 5 * one, one));
        assert!(
            !f.has_room(5, 5 * one - 1, one),
            "a window in bytes is a hard bound"
        );
        assert_eq!(f.settle(MessageId::from_u128(1)), Settled::Known);
        assert_eq!((f.len(), f.bytes), (1, one));
        for bogus in 100..110 {
            assert_eq!(f.settle(MessageId::from_u128(bogus)), Settled::Unknown);
        }
        assert_eq!(f.settle(MessageId::from_u128(2)), Settled::Unknown, "twice");
        assert_eq!(f.len(), 1, "bogus ids change nothing");
        f.push(env(5));
        f.settle(MessageId::from_u128(5));
        let left: Vec<_> = f.take().iter().map(|e| e.message_id().as_u128()).collect();
        assert_eq!(left, vec![4]);
        assert!(f.is_empty());
    }
}

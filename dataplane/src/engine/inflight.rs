//! Envelopes written to an agent and waiting for its ACK (custody not yet transferred).
//!
//! Agents ACK in the order they received, so the common case is the front of a queue kept in send
//! order: pop it, no hashing. An ACK for an id further back is remembered in a set and applied
//! when that id reaches the front. Ids that match nothing (a confused or hostile agent) are purged
//! whenever the set outgrows the queue, so memory stays bounded by what is in flight.

use std::collections::{HashSet, VecDeque};

use crate::wire::{Envelope, MessageId};

#[derive(Default)]
pub(crate) struct Inflight {
    order: VecDeque<Envelope>,
    acked_early: HashSet<MessageId, foldhash::fast::RandomState>,
}

impl Inflight {
    /// Records an envelope just written to the agent.
    pub(crate) fn push(&mut self, env: Envelope) {
        self.order.push_back(env);
    }

    /// Applies an ACK; returns how many envelopes left custody.
    pub(crate) fn ack(&mut self, id: MessageId) -> u64 {
        match self.order.front() {
            Some(front) if front.message_id() == id => {
                self.order.pop_front();
                1 + self.pop_acked_front()
            }
            Some(_) => {
                self.acked_early.insert(id);
                if self.acked_early.len() > self.order.len() {
                    self.purge();
                }
                0
            }
            None => 0,
        }
    }

    fn pop_acked_front(&mut self) -> u64 {
        let mut n = 0;
        while let Some(front) = self.order.front() {
            if !self.acked_early.remove(&front.message_id()) {
                break;
            }
            self.order.pop_front();
            n += 1;
        }
        n
    }

    /// Forgets remembered ACKs that match no envelope in flight.
    fn purge(&mut self) {
        let live: HashSet<MessageId> = self.order.iter().map(Envelope::message_id).collect();
        self.acked_early.retain(|id| live.contains(id));
    }

    /// Envelopes still in custody.
    pub(crate) fn len(&self) -> usize {
        self.order.len().saturating_sub(self.acked_early.len())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes every envelope still in custody, in send order.
    pub(crate) fn take(&mut self) -> Vec<Envelope> {
        let early = std::mem::take(&mut self.acked_early);
        self.order
            .drain(..)
            .filter(|e| !early.contains(&e.message_id()))
            .collect()
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
        assert_eq!(f.ack(MessageId::from_u128(0)), 1);
        assert_eq!(f.ack(MessageId::from_u128(2)), 0);
        assert_eq!(f.ack(MessageId::from_u128(3)), 0);
        assert_eq!(f.len(), 2);
        assert_eq!(
            f.ack(MessageId::from_u128(1)),
            3,
            "1 then the early 2 and 3"
        );
        assert_eq!(f.len(), 1);
        for bogus in 100..110 {
            f.ack(MessageId::from_u128(bogus));
        }
        assert!(f.acked_early.len() <= f.order.len(), "bogus ids are purged");
        f.push(env(5));
        f.ack(MessageId::from_u128(5));
        let left: Vec<_> = f.take().iter().map(|e| e.message_id().as_u128()).collect();
        assert_eq!(left, vec![4]);
        assert!(f.is_empty());
    }
}

//! Cross-core mailboxes: one bounded lock-free queue per receiving core plus a wake-up.
//!
//! Senders never block: a core first collects what it sends in a local outbox per destination
//! ([`Outbox`]) and pushes it in batches, keeping what did not fit for the next flush; one
//! wake-up is sent per flush, not per message. A core whose outbox to some core grows past the
//! high-water mark stops reading from its agents until it drains.

use std::collections::VecDeque;

use crossbeam::queue::ArrayQueue;
use tokio::sync::Notify;

use crate::routing::Location;
use crate::wire::{AgentId, Envelope, MessageId, Reason};

/// Identifies a connection on its core.
pub type ConnId = u64;

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
    Deliver {
        env: Envelope,
        src: Option<(u16, ConnId)>,
    },
    /// Outcome of a `Deliver` for the source connection; `Ok(true)`: the destination's queue is
    /// congested and the source should slow down.
    Verdict {
        conn: ConnId,
        id: MessageId,
        class_acked: bool,
        result: Result<bool, Reason>,
    },
    /// New live settings.
    Reconfigure(std::sync::Arc<super::Settings>),
    /// Begin a graceful drain.
    Drain,
    /// Stop the core.
    Exit,
}

/// The receiving end of one core's mailbox.
pub struct Mailbox {
    queue: ArrayQueue<CoreMsg>,
    wake: Notify,
}

impl Mailbox {
    /// A mailbox holding at most `capacity` messages.
    pub fn new(capacity: usize) -> Self {
        Mailbox {
            queue: ArrayQueue::new(capacity.max(16)),
            wake: Notify::new(),
        }
    }

    /// Waits until something was pushed (a wake-up sent before the wait is not lost).
    pub async fn wait(&self) {
        self.wake.notified().await
    }

    /// Takes one message.
    pub fn pop(&self) -> Option<CoreMsg> {
        self.queue.pop()
    }

    /// Pushes a message from outside the cores (signals, the service thread); retries while
    /// the mailbox is full.
    pub fn push_blocking(&self, mut msg: CoreMsg) {
        loop {
            match self.queue.push(msg) {
                Ok(()) => break,
                Err(back) => {
                    msg = back;
                    self.wake.notify_one();
                    std::thread::yield_now();
                }
            }
        }
        self.wake.notify_one();
    }
}

/// One core's pending messages to every core.
pub struct Outbox {
    per_core: Vec<VecDeque<CoreMsg>>,
}

/// Result of a flush.
#[derive(Debug, Default, Clone, Copy)]
pub struct Flushed {
    pub sent: u64,
    pub full: u64,
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

    /// Messages still waiting for `core`.
    pub fn pending(&self, core: u16) -> usize {
        self.per_core[core as usize].len()
    }

    /// Largest backlog towards any core.
    pub fn max_pending(&self) -> usize {
        self.per_core.iter().map(VecDeque::len).max().unwrap_or(0)
    }

    /// Moves as much as fits into the mailboxes and wakes each receiver once.
    pub fn flush(&mut self, boxes: &[Mailbox]) -> Flushed {
        let mut out = Flushed::default();
        for (core, q) in self.per_core.iter_mut().enumerate() {
            if q.is_empty() {
                continue;
            }
            let mb = &boxes[core];
            while let Some(msg) = q.pop_front() {
                match mb.queue.push(msg) {
                    Ok(()) => out.sent += 1,
                    Err(back) => {
                        q.push_front(back);
                        out.full += 1;
                        break;
                    }
                }
            }
            mb.wake.notify_one();
        }
        out
    }
}

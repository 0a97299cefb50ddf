//! Cross-core mailboxes: one bounded lock-free queue per receiving core plus a wake-up.
//!
//! Senders never block: a shard collects what it sends in its outbox (`crate::shard::msg`), and
//! the engine moves it into the mailboxes in batches, keeping what did not fit for the next
//! flush; one wake-up is sent per flush, not per message.

use crossbeam::queue::ArrayQueue;
use tokio::sync::Notify;

pub use crate::shard::msg::{ConnId, CoreMsg, Outbox};

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

/// Result of a flush.
#[derive(Debug, Default, Clone, Copy)]
pub struct Flushed {
    pub sent: u64,
    pub full: u64,
}

/// Moves as much of `outbox` as fits into the mailboxes and wakes each receiver once.
pub fn flush(outbox: &mut Outbox, boxes: &[Mailbox]) -> Flushed {
    let mut out = Flushed::default();
    for (core, q) in outbox.queues_mut() {
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

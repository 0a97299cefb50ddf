//! Batches of envelopes encoded once into one buffer, and envelope templates patched per send.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::BytesMut;

use openmesh_dataplane::wire::{
    AgentId, DeliveryClass, Destination, Envelope, EnvelopeBuilder, MessageId, WireError,
};

use crate::{ClientError, Map};

/// Fresh message ids: 64 random bits drawn when the agent starts, then a 64-bit counter, so ids
/// stay unique across sessions, reconnections and relay restarts.
#[derive(Debug)]
pub(crate) struct MessageIds {
    prefix: u128,
    next: AtomicU64,
}

impl MessageIds {
    pub(crate) fn new() -> Result<Self, ClientError> {
        Ok(MessageIds {
            prefix: (crate::random_u64()? as u128) << 64,
            next: AtomicU64::new(1),
        })
    }

    pub(crate) fn next(&self) -> MessageId {
        MessageId::from_u128(self.prefix | self.next.fetch_add(1, Ordering::Relaxed) as u128)
    }

    /// The high 64 bits of every id.
    pub(crate) fn prefix(&self) -> u64 {
        (self.prefix >> 64) as u64
    }

    /// `n` consecutive ids, reserved with one atomic step.
    pub(crate) fn take(&self, n: u64) -> MessageIdRange {
        let first = self.next.fetch_add(n, Ordering::Relaxed);
        MessageIdRange {
            prefix: self.prefix,
            next: first,
            end: first + n,
        }
    }
}

/// Fresh message ids reserved together by [`crate::Agent::message_ids`]: an iterator over
/// them, in order.
#[derive(Clone, Debug)]
pub struct MessageIdRange {
    prefix: u128,
    next: u64,
    end: u64,
}

impl Iterator for MessageIdRange {
    type Item = MessageId;

    fn next(&mut self) -> Option<MessageId> {
        if self.next == self.end {
            return None;
        }
        let id = MessageId::from_u128(self.prefix | self.next as u128);
        self.next += 1;
        Some(id)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = (self.end - self.next) as usize;
        (n, Some(n))
    }
}

impl ExactSizeIterator for MessageIdRange {}

/// What the agent tracks of one envelope in a batch: 40 bytes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Item {
    pub id: MessageId,
    pub expires_ms: u64,
    /// Its frame: `start..end` of the batch's buffer (a batch over 4 GiB is refused when
    /// sent).
    pub start: u32,
    pub end: u32,
    /// Index into the batch's `dests` ([`NO_DEST`]: a group or a broadcast).
    pub dest: u32,
    /// Answered by the relay (at-least-once and durable); best-effort envelopes are not.
    pub answered: bool,
    pub wants_receipt: bool,
}

/// [`Item::dest`] of an envelope to a group or a broadcast.
pub(crate) const NO_DEST: u32 = u32::MAX;

/// Destinations a batch holds before it looks them up in a map rather than a list.
const DESTS_LISTED: usize = 8;

/// Envelopes encoded back to back into one buffer, sent with [`crate::Agent::send_batch`]: one
/// hand-off to the writer and one window reservation for all of them, one [`crate::BatchHandle`]
/// for their answers. The cheapest way to send many envelopes.
///
/// ```no_run
/// # async fn demo(agent: &openmesh_agent::Agent, bob: openmesh_dataplane::wire::AgentId) -> Result<(), openmesh_agent::ClientError> {
/// let mut batch = openmesh_agent::Batch::new();
/// for i in 0u32..100 {
///     batch.push(&agent.envelope_to(bob).build(&i.to_be_bytes()).expect("small"));
/// }
/// let outcome = agent.send_batch(batch).await?.outcome().await;
/// assert_eq!(outcome.accepted, 100);
/// # Ok(()) }
/// ```
#[derive(Debug, Default)]
pub struct Batch {
    pub(crate) buf: BytesMut,
    pub(crate) items: Vec<Item>,
    /// The agents the batch goes to, with how many answered envelopes go to each.
    pub(crate) dests: Vec<(AgentId, u32)>,
    /// Index into `dests` once it holds more than a few.
    dest_index: Map<AgentId, u32>,
    /// Envelopes the relay answers (at-least-once and durable).
    pub(crate) answered: u32,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Batch::default()
    }

    /// An empty batch on `buf` (cleared) and `items` (cleared), with room for `bytes`.
    pub(crate) fn reuse(mut buf: BytesMut, mut items: Vec<Item>, bytes: usize) -> Self {
        buf.clear();
        buf.reserve(bytes);
        items.clear();
        Batch {
            buf,
            items,
            ..Batch::default()
        }
    }

    /// An empty batch with room for `bytes` of encoded envelopes.
    pub fn with_capacity(bytes: usize) -> Self {
        Batch {
            buf: BytesMut::with_capacity(bytes),
            ..Batch::default()
        }
    }

    /// Appends an envelope (its frame is encoded into the batch's buffer).
    pub fn push(&mut self, env: &Envelope) {
        let start = self.buf.len();
        env.encode(&mut self.buf);
        let answered = env.class() != DeliveryClass::BestEffort;
        let dest = match env.destination() {
            Destination::Agent(a) => self.dest(a, answered),
            Destination::Group(_) => NO_DEST,
        };
        self.answered += u32::from(answered);
        self.items.push(Item {
            id: env.message_id(),
            expires_ms: env.expires_ms(),
            start: start as u32,
            end: self.buf.len() as u32,
            dest,
            answered,
            wants_receipt: env.wants_delivery_receipt() || env.wants_expiry_notice(),
        });
    }

    /// `d`'s index in `dests`, counting one more answered envelope to it when `answered`.
    fn dest(&mut self, d: AgentId, answered: bool) -> u32 {
        // Batches mostly go to one agent: the last one first.
        let found = match self.dests.last() {
            Some((a, _)) if *a == d => Some(self.dests.len() - 1),
            _ if self.dests.len() <= DESTS_LISTED => self.dests.iter().position(|(a, _)| *a == d),
            _ => self.dest_index.get(&d).map(|&i| i as usize),
        };
        let i = found.unwrap_or_else(|| {
            self.dests.push((d, 0));
            if self.dests.len() > DESTS_LISTED {
                if self.dest_index.is_empty() {
                    for (i, (a, _)) in self.dests.iter().enumerate() {
                        self.dest_index.insert(*a, i as u32);
                    }
                } else {
                    self.dest_index.insert(d, self.dests.len() as u32 - 1);
                }
            }
            self.dests.len() - 1
        });
        self.dests[i].1 += u32::from(answered);
        i as u32
    }

    /// Appends an envelope made from `template` with message id `id`, created at `now_ms`
    /// (Unix milliseconds; it expires the template's TTL later), whose payload `fill` writes in
    /// place. No allocation beyond the batch's buffer.
    pub fn push_template(
        &mut self,
        template: &EnvelopeTemplate,
        id: MessageId,
        now_ms: u64,
        fill: impl FnOnce(&mut [u8]),
    ) {
        let t = template;
        let start = self.buf.len();
        if self.items.len() == self.items.capacity() {
            // Room for as many items as the buffer has room for frames: one allocation for
            // a batch made with `with_capacity`.
            let room = self.buf.capacity() - start;
            self.items.reserve(room / t.frame.len().max(1) + 1);
        }
        self.buf.extend_from_slice(&t.frame);
        let f = &mut self.buf[start..];
        let expires_ms = now_ms.saturating_add(t.ttl_ms);
        f[t.id_off..t.id_off + 16].copy_from_slice(&id.0);
        f[t.created_off..t.created_off + 8].copy_from_slice(&now_ms.to_be_bytes());
        f[t.created_off + 8..t.created_off + 16].copy_from_slice(&expires_ms.to_be_bytes());
        fill(&mut f[t.payload_off..]);
        let dest = match t.dest {
            Some(a) => self.dest(a, t.answered),
            None => NO_DEST,
        };
        self.answered += u32::from(t.answered);
        self.items.push(Item {
            id,
            expires_ms,
            start: start as u32,
            end: self.buf.len() as u32,
            dest,
            answered: t.answered,
            wants_receipt: t.wants_receipt,
        });
    }

    /// Envelopes in the batch.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the batch holds no envelope.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Encoded bytes in the batch.
    pub fn bytes(&self) -> usize {
        self.buf.len()
    }
}

/// One envelope encoded once, whose message id, timestamps and payload are written per send
/// ([`Batch::push_template`]): for senders of many envelopes of one shape (same destination,
/// class, constraints, schema and payload length), such as load generators.
///
/// ```no_run
/// # async fn demo(agent: &openmesh_agent::Agent, bob: openmesh_dataplane::wire::AgentId) -> Result<(), openmesh_agent::ClientError> {
/// use openmesh_agent::{unix_ms, Batch, EnvelopeTemplate};
/// let t = EnvelopeTemplate::new(&agent.envelope_to(bob), 256)?;
/// let mut batch = Batch::with_capacity(t.frame_len() * 64);
/// for seq in 0u64..64 {
///     batch.push_template(&t, agent.next_message_id(), unix_ms(), |p| {
///         p[..8].copy_from_slice(&seq.to_be_bytes())
///     });
/// }
/// agent.send_batch(batch).await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct EnvelopeTemplate {
    frame: Vec<u8>,
    id_off: usize,
    created_off: usize,
    payload_off: usize,
    ttl_ms: u64,
    dest: Option<AgentId>,
    answered: bool,
    wants_receipt: bool,
}

impl EnvelopeTemplate {
    /// A template for envelopes built by `builder` (its message id and timestamps are
    /// replaced per send, its TTL kept) with payloads of `payload_len` bytes.
    pub fn new(builder: &EnvelopeBuilder, payload_len: usize) -> Result<Self, ClientError> {
        let mut b = builder.clone();
        b.message_id = MessageId::from_u128(0);
        let env: Envelope = b
            .build(&vec![0u8; payload_len])
            .map_err(ClientError::Envelope)?;
        let mut frame = BytesMut::with_capacity(env.frame_len());
        env.encode(&mut frame);
        let frame = frame.to_vec();
        // The immutable part follows the frame header and the routing part; the message id
        // follows its version and flags bytes; the timestamps follow the source and the
        // destination (docs/PROTOCOL.md §2, ENVELOPE).
        let imm = openmesh_dataplane::wire::FRAME_HEADER_LEN + env.routing.encoded_len();
        let created_off = imm + 2 + 16 + 32 + 1 + 32;
        if frame.get(created_off..created_off + 8) != Some(&env.created_ms().to_be_bytes()[..]) {
            return Err(ClientError::Envelope(WireError::Invalid("template layout")));
        }
        Ok(EnvelopeTemplate {
            id_off: imm + 2,
            created_off,
            payload_off: frame.len() - payload_len,
            ttl_ms: builder.expires_ms.saturating_sub(builder.created_ms),
            dest: match env.destination() {
                Destination::Agent(a) => Some(a),
                Destination::Group(_) => None,
            },
            answered: env.class() != DeliveryClass::BestEffort,
            wants_receipt: env.wants_delivery_receipt() || env.wants_expiry_notice(),
            frame,
        })
    }

    /// Length of one encoded envelope frame.
    pub fn frame_len(&self) -> usize {
        self.frame.len()
    }

    /// Length of the payload `fill` writes.
    pub fn payload_len(&self) -> usize {
        self.frame.len() - self.payload_off
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openmesh_dataplane::wire::{Frame, FrameDecoder};

    #[test]
    fn a_patched_template_decodes_with_its_new_fields() {
        let mut b = EnvelopeBuilder::new(
            MessageId::from_u128(0),
            AgentId([1; 32]),
            Destination::Agent(AgentId([2; 32])),
            1000,
            60_000,
        );
        b.schema = "market/proposal@2.1".into();
        let t = EnvelopeTemplate::new(&b, 256).unwrap();
        let mut batch = Batch::new();
        for (seq, ms) in [(42u64, 5_000u64), (43, 5_001)] {
            batch.push_template(&t, MessageId::from_u128(seq as u128), ms, |p| {
                p[..8].copy_from_slice(&seq.to_be_bytes())
            });
        }
        assert_eq!(batch.len(), 2);
        let d = FrameDecoder::new(1 << 20);
        let mut buf = batch.buf.clone();
        for (i, (seq, ms)) in [(42u64, 5_000u64), (43, 5_001)].into_iter().enumerate() {
            let Some(Frame::Envelope(e)) = d.decode(&mut buf).unwrap() else {
                panic!("not an envelope")
            };
            assert_eq!(e.message_id(), MessageId::from_u128(seq as u128));
            assert_eq!(e.created_ms(), ms);
            assert_eq!(e.expires_ms(), ms + 60_000);
            assert_eq!(e.schema(), "market/proposal@2.1");
            assert_eq!(e.payload().len(), 256);
            assert_eq!(&e.payload()[..8], &seq.to_be_bytes());
            assert_eq!(batch.items[i].expires_ms, ms + 60_000);
            assert_eq!(
                batch.dests[batch.items[i].dest as usize].0,
                AgentId([2; 32])
            );
        }
    }
}

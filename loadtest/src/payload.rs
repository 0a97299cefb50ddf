//! What virtual agents put in their payloads, and the pre-encoded envelope template senders patch
//! instead of building every envelope from scratch (the generator must not be the bottleneck).
//!
//! Payload layout (both targets): `seq: u64 | scheduled_ns: u64 | padding`, where `scheduled_ns` is
//! the time the send was scheduled, on the run's clock ([`crate::report::Live::now_ns`]).

use bytes::{BufMut, BytesMut};
use openmesh_dataplane::wire::{DeliveryClass, Envelope, EnvelopeBuilder, Frame, MessageId};

/// Smallest payload: room for the sequence number and the timestamp.
pub const MIN_PAYLOAD: usize = 16;

/// Reads `(seq, scheduled_ns)` from a payload.
pub fn parse(p: &[u8]) -> Option<(u64, u64)> {
    let seq = u64::from_be_bytes(p.get(..8)?.try_into().ok()?);
    let ns = u64::from_be_bytes(p.get(8..16)?.try_into().ok()?);
    Some((seq, ns))
}

/// Writes a payload of `size` bytes.
pub fn fill(dst: &mut BytesMut, size: usize, seq: u64, scheduled_ns: u64) {
    dst.put_u64(seq);
    dst.put_u64(scheduled_ns);
    dst.put_bytes(0x5a, size.saturating_sub(MIN_PAYLOAD));
}

/// One encoded ENVELOPE frame whose id, timestamps and payload header are patched per send.
pub struct Template {
    frame: Vec<u8>,
    id_off: usize,
    created_off: usize,
    payload_off: usize,
    ttl_ms: u64,
    id_high: u128,
}

impl Template {
    /// A template for envelopes built by `builder` with a payload of `size` bytes. Message ids are
    /// `id_high << 64 | seq`.
    pub fn new(builder: &EnvelopeBuilder, size: usize, id_high: u64) -> anyhow::Result<Self> {
        let mut b = builder.clone();
        b.message_id = MessageId::from_u128(0);
        let env: Envelope = b.build(&vec![0u8; size.max(MIN_PAYLOAD)])?;
        let frame = Frame::Envelope(env.clone()).to_bytes().to_vec();
        // Immutable part: after the 5-byte frame header and the routing part; the message id
        // follows the version and flags bytes (docs/PROTOCOL.md §2, ENVELOPE).
        let imm = 5 + env.routing.encoded_len();
        Ok(Template {
            id_off: imm + 2,
            created_off: imm + 2 + 16 + 32 + 1 + 32,
            payload_off: frame.len() - size.max(MIN_PAYLOAD),
            ttl_ms: builder.expires_ms.saturating_sub(builder.created_ms),
            id_high: (id_high as u128) << 64,
            frame,
        })
    }

    /// Appends one envelope with sequence number `seq`, scheduled at `scheduled_ns`, created at
    /// `now_ms` (Unix milliseconds).
    pub fn write(&self, dst: &mut BytesMut, seq: u64, scheduled_ns: u64, now_ms: u64) {
        let start = dst.len();
        dst.extend_from_slice(&self.frame);
        let f = &mut dst[start..];
        f[self.id_off..self.id_off + 16]
            .copy_from_slice(&(self.id_high | seq as u128).to_be_bytes());
        f[self.created_off..self.created_off + 8].copy_from_slice(&now_ms.to_be_bytes());
        f[self.created_off + 8..self.created_off + 16]
            .copy_from_slice(&(now_ms + self.ttl_ms).to_be_bytes());
        f[self.payload_off..self.payload_off + 8].copy_from_slice(&seq.to_be_bytes());
        f[self.payload_off + 8..self.payload_off + 16].copy_from_slice(&scheduled_ns.to_be_bytes());
    }

    /// Encoded frame length.
    pub fn len(&self) -> usize {
        self.frame.len()
    }
}

/// Parses a class name as the CLI takes it.
pub fn class_from_str(s: &str) -> Result<DeliveryClass, String> {
    match s {
        "best-effort" => Ok(DeliveryClass::BestEffort),
        "at-least-once" => Ok(DeliveryClass::AtLeastOnce),
        "durable" => Ok(DeliveryClass::Durable),
        _ => Err(format!(
            "unknown class {s:?} (best-effort, at-least-once, durable)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openmesh_dataplane::wire::{AgentId, Destination, FrameDecoder};

    #[test]
    fn patched_template_decodes_with_its_new_fields() {
        let b = EnvelopeBuilder::new(
            MessageId::from_u128(0),
            AgentId([1; 32]),
            Destination::Agent(AgentId([2; 32])),
            1000,
            60_000,
        );
        let t = Template::new(&b, 256, 7).unwrap();
        let mut buf = BytesMut::new();
        t.write(&mut buf, 42, 99, 5_000);
        t.write(&mut buf, 43, 100, 5_001);
        let d = FrameDecoder::new(1 << 20);
        for (seq, ns, ms) in [(42, 99, 5_000), (43, 100, 5_001)] {
            let Some(Frame::Envelope(e)) = d.decode(&mut buf).unwrap() else {
                panic!()
            };
            assert_eq!(
                e.message_id(),
                MessageId::from_u128((7u128 << 64) | seq as u128)
            );
            assert_eq!(e.created_ms(), ms);
            assert_eq!(e.expires_ms(), ms + 60_000);
            assert_eq!(e.payload().len(), 256);
            assert_eq!(parse(&e.payload()), Some((seq, ns)));
        }
    }
}

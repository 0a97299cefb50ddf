//! What virtual agents put in their payloads. Senders write them into envelope templates of
//! the agent library (`openmesh_agent::EnvelopeTemplate`) instead of building every envelope.
//!
//! Payload layout (both targets): `seq: u64 | scheduled_ns: u64 | padding`, where `scheduled_ns` is
//! the time the send was scheduled, on the run's clock ([`crate::report::Live::now_ns`]).

use bytes::{BufMut, BytesMut};
use openmesh_dataplane::wire::DeliveryClass;

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

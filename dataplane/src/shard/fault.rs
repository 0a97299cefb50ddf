//! Faults a test relay injects on request (feature `fault-injection`, which only the relay's
//! own tests turn on; a relay built without it has none of this), and only when its
//! environment says `OPENMESH_FAULT_INJECTION=1` (so a test build run by hand does not). An
//! envelope whose immutable part carries extension [`FAULT_EXTENSION`] asks the relay to
//! misbehave with it, as a hostile relay on the path would: flip one bit, or deliver it twice.
//!
//! The extension's value: `op: u8` (1 flip, 2 deliver twice), `offset: u32` (for a flip: the
//! byte of the immutable part whose low bit is flipped).

use bytes::Bytes;

use crate::wire::Envelope;

/// The (non-critical, application range) extension type that asks for a fault.
pub const FAULT_EXTENSION: u16 = 0x7ff0;
/// Flip one bit of the immutable part.
pub const FLIP: u8 = 1;
/// Write the envelope twice to its destination.
pub const REPLAY: u8 = 2;

fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("OPENMESH_FAULT_INJECTION").as_deref() == Ok("1"))
}

fn request(env: &Envelope) -> Option<(u8, usize)> {
    if !enabled() {
        return None;
    }
    let e = env.extensions().find(|e| e.kind == FAULT_EXTENSION)?;
    let v = e.value;
    if v.len() != 5 {
        return None;
    }
    Some((v[0], u32::from_be_bytes([v[1], v[2], v[3], v[4]]) as usize))
}

/// At ingress: flips the requested bit (the envelope's sections keep their offsets).
pub(crate) fn at_ingress(env: &mut Envelope) {
    if let Some((FLIP, offset)) = request(env) {
        if offset < env.immutable.len() {
            let mut b = env.immutable.to_vec();
            b[offset] ^= 0x01;
            env.immutable = Bytes::from(b);
        }
    }
}

/// At delivery: whether to write the envelope a second time.
pub(crate) fn replays(env: &Envelope) -> bool {
    matches!(request(env), Some((REPLAY, _)))
}

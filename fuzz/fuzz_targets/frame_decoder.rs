//! Feeds arbitrary bytes to the frame decoder, in arbitrary chunks, with a small maximum frame.
//! Every frame that decodes must re-encode to bytes that decode to the same frame.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use openmesh_dataplane::wire::{Frame, FrameDecoder};

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let dec = FrameDecoder::new(4096);
    let mut buf = BytesMut::new();
    let step = (split as usize % 64) + 1;
    for chunk in rest.chunks(step) {
        buf.extend_from_slice(chunk);
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    if let Frame::Envelope(e) = &frame {
                        let _ = (e.payload(), e.schema(), e.associated_data());
                        let _ = (e.jurisdictions().count(), e.avoid().count(), e.prefer().count());
                        let _ = e.fallback().count();
                        let _ = (e.extensions().count(), e.unknown_critical_extension(&[]), e.flags());
                    }
                    let again = frame.to_bytes();
                    let mut b = BytesMut::from(&again[..]);
                    let back = FrameDecoder::new(1 << 24).decode(&mut b);
                    assert_eq!(back, Ok(Some(frame)), "re-encoded frame decodes to itself");
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});

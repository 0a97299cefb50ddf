//! One writer pass: what goes into the next write buffer, in order.
//!
//! Handshake records while TLS is coming up. Then, per pass: a KeyUpdate when due, ACK batches,
//! control frames (WELCOME, NACK, PONG, PING, GOING_AWAY, CLOSE), and, once WELCOME is out and
//! unless the session is closing, queued envelopes within the deliver window and the pass's
//! budget. After CLOSE only close_notify follows. At-least-once envelopes move to in-flight
//! custody as they are written; best-effort ones are forgotten.

use bytes::BytesMut;

use super::custody::Released;
use super::{Action, Conn, ConnId, Now, Shard, SMALL_WRITE_BUFFER};
use crate::metrics::CoreMetrics;
use crate::tls::transport::sealed_size;
use crate::wire::{AckBatch, DeliveryClass, Envelope, Frame, Reason, MAX_ACK_BATCH};

/// Most envelopes moved into one write buffer.
const WRITE_BATCH: usize = 256;

impl Shard {
    /// The next buffer to write for `conn` and how many of its bytes, or `None` when there is
    /// nothing to write (or the connection is gone). Give the buffer back with
    /// [`Shard::on_write_done`].
    pub fn poll_write(&mut self, conn: ConnId, now: Now) -> Option<(Vec<u8>, usize)> {
        let next = self.next_write(conn, now);
        if next.is_none() {
            if let Some(c) = self.conns.get_mut(&conn) {
                c.writer_awake = false;
            }
        }
        next
    }

    fn next_write(&mut self, conn: ConnId, now: Now) -> Option<(Vec<u8>, usize)> {
        let c = self.conns.get_mut(&conn)?;
        if c.writing {
            return None;
        }
        if let Some(hs) = c.transport.take_handshake_output() {
            let n = hs.len();
            c.writing = true;
            c.write_len = hs.capacity();
            c.write_since_us = now.mono_us;
            return Some((hs, n));
        }
        if !c.transport.is_open() || c.close_notify_sent {
            return None;
        }
        // The pooled buffer, or one large enough for an envelope above its size (frames may be
        // up to max_frame; such a buffer is not kept).
        let need =
            c.a.outq
                .front()
                .map_or(0, |e| crate::tls::transport::sealed_size(e.frame_len()));
        // An agent session with little to write (at most half the small buffer, its ACKs to
        // come included) takes a small buffer; whatever does not fit goes next pass.
        let little = c.link.is_none()
            && sealed_size(c.a.outq.bytes() + c.a.ctrl.len() + 20 * c.a.acks_to_send.len())
                <= SMALL_WRITE_BUFFER / 2;
        let mut buf = if need > crate::tls::transport::WRITE_BUFFER {
            vec![0u8; need]
        } else {
            self.buffer(little)
        };
        let c = self.conns.get_mut(&conn)?;
        let used = c
            .fill(&mut buf, &mut self.tail, &self.m, &mut self.released, now)
            .unwrap_or_else(|e| {
                tracing::info!(conn, error = %e, "TLS failure while writing");
                c.closing = true;
                0
            });
        if used == 0 {
            let done = c.closing && (c.close_notify_sent || !c.transport.is_open());
            self.recycle(buf);
            if done {
                self.actions.push_back(Action::Shutdown(conn));
            }
            self.answer_expired(now);
            return None;
        }
        c.writing = true;
        c.write_len = buf.len();
        c.write_since_us = now.mono_us;
        self.resume_paced_sources(conn, false);
        self.answer_expired(now);
        Some((buf, used))
    }

    /// Relays waiting on envelopes that expired in a link's queue hear it.
    fn answer_expired(&mut self, now: Now) {
        for (src, class) in std::mem::take(&mut self.released.3) {
            self.verdict_to(src, class, Err(Reason::Expired), now);
        }
    }

    /// The write of a buffer from [`Shard::poll_write`] finished (`ok`: every byte written).
    pub fn on_write_done(&mut self, conn: ConnId, buf: Vec<u8>, ok: bool, _now: Now) {
        self.recycle(buf);
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.writing = false;
        c.write_since_us = 0;
        // A reader parked on owed control output may go on.
        if c.reader_parked {
            self.wake_reader(conn);
        }
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if !ok {
            self.actions.push_back(Action::Shutdown(conn));
        } else if c.closing && c.close_notify_sent {
            // Everything up to close_notify is out.
            self.actions.push_back(Action::Shutdown(conn));
        }
    }
}

impl Conn {
    /// Whether the next queued envelope waits for the agent's ACKs (deliver window full).
    pub(super) fn window_full(&self) -> bool {
        let (n, b) = self.window();
        let next = self.a.outq.front().map_or(0, Envelope::frame_len);
        if self.link.is_some() {
            return !self.a.inflight.has_room_unanswered(n, b, next);
        }
        !self.a.inflight.has_room(n, b, next)
    }

    fn window(&self) -> (usize, usize) {
        if let Some(l) = &self.link {
            return l.window;
        }
        self.a
            .contract
            .as_ref()
            .map_or((usize::MAX, usize::MAX), |c| {
                (c.deliver_window as usize, c.deliver_window_bytes as usize)
            })
    }

    /// Moves the ACKs waiting to be sent into the control buffer.
    pub(super) fn encode_acks(&mut self, m: &CoreMetrics) {
        self.a.acks_due_us = None;
        while !self.a.acks_to_send.is_empty() {
            let n = self.a.acks_to_send.len().min(MAX_ACK_BATCH);
            let batch = AckBatch::new(self.a.acks_to_send.drain(..n));
            m.acks_out.increment(batch.len() as u64);
            Frame::Ack(batch).encode(&mut self.a.ctrl);
        }
    }

    /// Takes every envelope this session holds custody of (unacknowledged, then queued), in
    /// order where order is known. Best-effort envelopes are left out and counted as dropped.
    pub(super) fn take_custody(
        &mut self,
        m: &CoreMetrics,
        released: &mut Released,
    ) -> Vec<Envelope> {
        let mut out = self.a.inflight.take(released);
        for e in self.a.outq.drain() {
            if e.class() == DeliveryClass::BestEffort {
                m.dropped(Reason::DestinationUnavailable, 1);
                released.note(&e);
            } else {
                out.push(e);
            }
        }
        out
    }

    /// Whether a draining session has nothing left to settle.
    pub(super) fn settled(&self) -> bool {
        self.a.outq.is_empty()
            && self.a.inflight.is_empty()
            && self.a.awaiting == 0
            && self.a.acks_to_send.is_empty()
    }

    /// Seals this pass's output into `buf`; returns the bytes to write.
    fn fill(
        &mut self,
        buf: &mut [u8],
        tail: &mut Vec<u8>,
        m: &CoreMetrics,
        released: &mut Released,
        now: Now,
    ) -> Result<usize, crate::tls::record::RecordError> {
        if !self.closing {
            self.encode_acks(m);
            Shard::encode_link_acks(self);
        }
        let key_update = std::mem::take(&mut self.key_update_due);
        let closing = self.closing;
        // A link answers every envelope (LINK_ACK or LINK_NACK), whatever its class.
        let link = self.link.as_ref().map(|l| l.up);
        let welcomed = link.unwrap_or(self.a.welcomed);
        let (window, window_bytes) = self.window();
        let ctrl_room = buf.len() / 2;
        let Some(mut w) = self.transport.writer(buf, tail) else {
            return Ok(0);
        };
        if key_update {
            w.key_update()?;
            m.key_updates.increment(1);
        }
        // Control frames: as much as fits; the rest waits for the next pass.
        if !self.a.ctrl.is_empty() {
            let room = self.a.ctrl.len().min(ctrl_room);
            let part: BytesMut = self.a.ctrl.split_to(room);
            w.copy(&part)?;
        }
        if closing {
            if self.a.ctrl.is_empty() {
                w.close_notify()?;
                self.close_notify_sent = true;
            }
            return w.finish();
        }
        // The control bytes were cut where the buffer's share ended, maybe inside a frame:
        // nothing else goes on the stream before the rest of them.
        if !welcomed || !self.a.ctrl.is_empty() {
            return w.finish();
        }
        let (mut n, mut b) = ([0u64; 3], [0u64; 3]);
        let mut heads = [0u8; 5 + 8 + 32 * crate::wire::MAX_PATH_LEN];
        let mut written = 0;
        while written < WRITE_BATCH {
            let Some(env) = self.a.outq.front() else {
                break;
            };
            if env.expires_ms() <= now.unix_ms {
                released.note(env);
                released.receipt(env, crate::wire::ReceiptStatus::Expired);
                if let Some(mut e) = self.a.outq.pop() {
                    if let Some(up) = e.upstream.take() {
                        released.3.push((*up, e.class()));
                    }
                }
                m.dropped(Reason::Expired, 1);
                continue;
            }
            let len = env.frame_len();
            let acked = link.is_some() || env.class() != DeliveryClass::BestEffort;
            // A link's peer answers out of order (each answer waits for its own next hop): its
            // window counts what is unanswered, not what sits behind an older unanswered one.
            let room = if link.is_some() {
                self.a
                    .inflight
                    .has_room_unanswered(window, window_bytes, len)
            } else {
                self.a.inflight.has_room(window, window_bytes, len)
            };
            if acked && !room {
                break;
            }
            if !w.fits(len) {
                break;
            }
            // Sealed from the front of the queue, popped only once sealed: an error leaves it
            // in custody.
            let h = head(env, &mut heads);
            w.envelope(&heads[..h], &env.immutable)?;
            #[cfg(feature = "fault-injection")]
            if link.is_none() && super::fault::replays(env) && w.fits(len) {
                w.envelope(&heads[..h], &env.immutable)?;
            }
            let Some(env) = self.a.outq.pop() else {
                break;
            };
            let k = env.class() as usize;
            n[k] += 1;
            b[k] += env.immutable.len() as u64;
            written += 1;
            if acked {
                self.a.inflight.push(env);
            } else {
                released.note(&env);
            }
        }
        for k in 0..3 {
            if n[k] > 0 {
                m.envelopes_out[k].increment(n[k]);
                m.bytes_out[k].increment(b[k]);
            }
        }
        w.finish()
    }
}

/// Writes the frame header and routing part of `env` into `out`; returns its length.
fn head(env: &Envelope, out: &mut [u8]) -> usize {
    let r = &env.routing;
    let len = 1 + r.encoded_len() + env.immutable.len();
    out[..4].copy_from_slice(&(len as u32).to_be_bytes());
    out[4] = crate::wire::FrameType::Envelope as u8;
    out[5] = r.hop_limit;
    out[6] = r.hop_index;
    out[7] = r.copy_index;
    out[8..12].copy_from_slice(&r.route_generation.to_be_bytes());
    out[12] = (r.path.len() / 32) as u8;
    out[13..13 + r.path.len()].copy_from_slice(&r.path);
    13 + r.path.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{AgentId, Destination, EnvelopeBuilder, MessageId};

    #[test]
    fn the_head_written_in_place_is_the_codecs() {
        let mut env = EnvelopeBuilder::new(
            MessageId::from_u128(3),
            AgentId([1; 32]),
            Destination::Agent(AgentId([2; 32])),
            0,
            10,
        )
        .build(b"payload")
        .unwrap();
        env.routing.route_generation = 0x01020304;
        env.routing.path = bytes::Bytes::from(vec![9u8; 64]);
        let mut want = BytesMut::new();
        env.encode_head(&mut want);
        let mut got = [0u8; 5 + 8 + 32 * 8];
        let n = head(&env, &mut got);
        assert_eq!(&got[..n], &want[..]);
    }
}

//! The agent session state machine: handshake, established, draining, closed.
//!
//! Pure: the engine feeds it what arrived and the current monotonic time (`now_us`, microseconds)
//! and asks [`Session::poll`] what is due. It decides which frames are allowed in which state,
//! measures RTT from PING/PONG, detects a dead peer after the contract's deadline, times out a
//! missing HELLO, schedules TLS key updates, and ends a drain at its deadline.
//!
//! ```text
//!  Handshake --HELLO ok--> Established --drain--> Draining --all settled / deadline--> Closed
//!      |                        |                                                    ^
//!      +--timeout/bad HELLO-----+---------- forced close (reason) -------------------+
//! ```

use crate::wire::{Frame, Pong, Reason, Welcome};

/// Missed heartbeat intervals after which a silent peer is declared dead.
pub const DEAD_AFTER_INTERVALS: u64 = 3;
/// PINGs a peer may send per heartbeat interval; one more is `ping_flood`. A well-behaved agent
/// PINGs at most once per two silent intervals.
pub const PINGS_PER_INTERVAL: u32 = 4;

/// Where a session is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionState {
    /// TLS is up (or coming up); waiting for HELLO.
    Handshake,
    /// Contract agreed; envelopes flow.
    Established,
    /// GOING_AWAY sent: no new envelopes, outstanding ones settle.
    Draining,
    /// Finished; the connection is being torn down.
    Closed,
}

/// What the frame does to the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Process the frame.
    Accept,
    /// Refuse this envelope with a NACK of this reason; the session goes on.
    Nack(Reason),
    /// End the session with this reason.
    Close(Reason),
}

/// Something [`Session::poll`] found due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Due {
    /// Send a PING stamped with `now_us`.
    Ping,
    /// Rotate the link's traffic keys (TLS KeyUpdate).
    KeyUpdate,
    /// Close the session with this reason.
    Close(Reason),
}

/// Timeouts that are relay configuration rather than contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionTimeouts {
    /// From accept to HELLO, microseconds (covers the TLS handshake).
    pub handshake_us: u64,
    /// Deadline for a drain once GOING_AWAY was sent, microseconds.
    pub drain_us: u64,
    /// Close an established session after this long without an envelope or ACK from the agent
    /// (heartbeats do not count), microseconds; 0 keeps idle sessions open.
    pub idle_us: u64,
    /// Close a connection whose peer does not take one socket write within this long
    /// (it stopped reading), microseconds.
    pub write_us: u64,
}

impl Default for SessionTimeouts {
    fn default() -> Self {
        SessionTimeouts {
            handshake_us: 10_000_000,
            drain_us: 5_000_000,
            idle_us: 0,
            write_us: 30_000_000,
        }
    }
}

/// One agent session.
#[derive(Clone, Debug)]
pub struct Session {
    state: SessionState,
    timeouts: SessionTimeouts,
    opened_us: u64,
    last_rx_us: u64,
    last_traffic_us: u64,
    last_ping_us: u64,
    last_key_update_us: u64,
    heartbeat_us: u64,
    key_rotation_us: u64,
    drain_deadline_us: u64,
    rtt_us: Option<u64>,
    close_reason: Option<Reason>,
    /// Start of the current PING-counting window and the PINGs seen in it.
    ping_window_us: u64,
    pings: u32,
}

impl Session {
    /// A session for a connection accepted at `now_us`.
    pub fn new(now_us: u64, timeouts: SessionTimeouts) -> Self {
        Session {
            state: SessionState::Handshake,
            timeouts,
            opened_us: now_us,
            last_rx_us: now_us,
            last_traffic_us: now_us,
            last_ping_us: now_us,
            last_key_update_us: now_us,
            heartbeat_us: 0,
            key_rotation_us: 0,
            drain_deadline_us: u64::MAX,
            rtt_us: None,
            close_reason: None,
            ping_window_us: now_us,
            pings: 0,
        }
    }

    /// Current state.
    pub fn state(&self) -> SessionState {
        self.state
    }

    /// Last RTT measured from a PONG, microseconds.
    pub fn rtt_us(&self) -> Option<u64> {
        self.rtt_us
    }

    /// Why the session closed, once closed.
    pub fn close_reason(&self) -> Option<Reason> {
        self.close_reason
    }

    /// Whether envelopes may flow in and out.
    pub fn is_open(&self) -> bool {
        matches!(
            self.state,
            SessionState::Established | SessionState::Draining
        )
    }

    /// Decides what to do with a frame that arrived at `now_us`. Any frame proves the peer alive.
    pub fn on_frame(&mut self, frame: &Frame, now_us: u64) -> Admit {
        if let Frame::Envelope(_) = frame {
            return self.on_envelope(now_us);
        }
        self.last_rx_us = now_us;
        if matches!(frame, Frame::Ack(_)) {
            self.last_traffic_us = now_us;
        }
        match (self.state, frame) {
            (SessionState::Closed, _) => Admit::Close(Reason::Normal),
            (SessionState::Handshake, Frame::Hello(_)) => Admit::Accept,
            (SessionState::Handshake, _) => Admit::Close(Reason::UnexpectedFrame),
            (
                _,
                Frame::Hello(_)
                | Frame::Welcome(_)
                | Frame::GoingAway(_)
                | Frame::Receipt(_)
                | Frame::LinkHello(_)
                | Frame::LinkAck(_)
                | Frame::LinkNack(_)
                | Frame::Presence(_)
                | Frame::LinkReceipt(_)
                | Frame::Directory(_),
            ) => Admit::Close(Reason::UnexpectedFrame),
            (_, Frame::Ping(_)) => {
                // Each PING makes the relay write a PONG: more than a few per heartbeat
                // interval is a flood.
                if now_us.saturating_sub(self.ping_window_us) >= self.heartbeat_us.max(1) {
                    self.ping_window_us = now_us;
                    self.pings = 0;
                }
                self.pings += 1;
                if self.pings > PINGS_PER_INTERVAL {
                    Admit::Close(Reason::PingFlood)
                } else {
                    Admit::Accept
                }
            }
            (_, Frame::Close(_)) => {
                self.close(Reason::Normal);
                Admit::Accept
            }
            _ => Admit::Accept,
        }
    }

    /// [`Session::on_frame`] for an ENVELOPE (what it decides needs no more than that).
    pub fn on_envelope(&mut self, now_us: u64) -> Admit {
        self.last_rx_us = now_us;
        self.last_traffic_us = now_us;
        match self.state {
            SessionState::Closed => Admit::Close(Reason::Normal),
            SessionState::Handshake => Admit::Close(Reason::UnexpectedFrame),
            SessionState::Draining => Admit::Nack(Reason::ShuttingDown),
            _ => Admit::Accept,
        }
    }

    /// The contract was agreed and WELCOME sent at `now_us`.
    pub fn established(&mut self, welcome: &Welcome, now_us: u64) {
        self.state = SessionState::Established;
        self.heartbeat_us = welcome.heartbeat_ms as u64 * 1000;
        self.key_rotation_us = welcome.key_rotation_s as u64 * 1_000_000;
        self.last_ping_us = now_us;
        self.last_traffic_us = now_us;
        self.last_key_update_us = now_us;
    }

    /// A PONG arrived at `now_us`; records the RTT it measures and returns it.
    pub fn on_pong(&mut self, pong: &Pong, now_us: u64) -> Option<u64> {
        let rtt = now_us.checked_sub(pong.echo_us)?;
        self.rtt_us = Some(rtt);
        Some(rtt)
    }

    /// Starts a graceful drain at `now_us`. Returns false if the session was not established.
    pub fn start_drain(&mut self, now_us: u64) -> bool {
        match self.state {
            SessionState::Established => {
                self.state = SessionState::Draining;
                self.drain_deadline_us = now_us.saturating_add(self.timeouts.drain_us);
                true
            }
            _ => false,
        }
    }

    /// Microseconds since the last frame arrived.
    pub fn quiet_us(&self, now_us: u64) -> u64 {
        now_us.saturating_sub(self.last_rx_us)
    }

    /// Milliseconds left until the drain deadline.
    pub fn drain_left_ms(&self, now_us: u64) -> u32 {
        (self.drain_deadline_us.saturating_sub(now_us) / 1000).min(u32::MAX as u64) as u32
    }

    /// Ends the session with `reason` (the first reason given wins).
    pub fn close(&mut self, reason: Reason) {
        if self.state != SessionState::Closed {
            self.state = SessionState::Closed;
            self.close_reason = Some(reason);
        }
    }

    /// What is due at `now_us`, if anything. Call again until it returns `None`.
    pub fn poll(&mut self, now_us: u64) -> Option<Due> {
        match self.state {
            SessionState::Closed => None,
            SessionState::Handshake => (now_us.saturating_sub(self.opened_us)
                >= self.timeouts.handshake_us)
                .then_some(Due::Close(Reason::HandshakeTimeout)),
            SessionState::Established | SessionState::Draining => {
                if self.state == SessionState::Draining && now_us >= self.drain_deadline_us {
                    return Some(Due::Close(Reason::ShuttingDown));
                }
                if self.timeouts.idle_us > 0
                    && now_us.saturating_sub(self.last_traffic_us) >= self.timeouts.idle_us
                {
                    return Some(Due::Close(Reason::IdleTimeout));
                }
                let silent = now_us.saturating_sub(self.last_rx_us);
                if silent >= self.heartbeat_us * DEAD_AFTER_INTERVALS {
                    return Some(Due::Close(Reason::HeartbeatTimeout));
                }
                if silent >= self.heartbeat_us
                    && now_us.saturating_sub(self.last_ping_us) >= self.heartbeat_us
                {
                    self.last_ping_us = now_us;
                    return Some(Due::Ping);
                }
                if self.key_rotation_us > 0
                    && now_us.saturating_sub(self.last_key_update_us) >= self.key_rotation_us
                {
                    self.last_key_update_us = now_us;
                    return Some(Due::KeyUpdate);
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{AgentId, Hello, Ping};

    fn welcome(hb_ms: u32, rot_s: u32) -> Welcome {
        Welcome {
            heartbeat_ms: hb_ms,
            key_rotation_s: rot_s,
            ..Welcome::default()
        }
    }

    fn hello() -> Frame {
        Frame::Hello(Hello {
            min_version: 2,
            max_version: 2,
            transports: 1,
            ..Hello::default()
        })
    }

    #[test]
    fn frames_before_hello_close_the_session() {
        let mut s = Session::new(0, SessionTimeouts::default());
        let ping = Frame::Ping(Ping { timestamp_us: 1 });
        assert_eq!(s.on_frame(&ping, 1), Admit::Close(Reason::UnexpectedFrame));
        assert_eq!(s.on_frame(&hello(), 2), Admit::Accept);
        s.established(&welcome(1000, 0), 2);
        assert_eq!(
            s.on_frame(&hello(), 3),
            Admit::Close(Reason::UnexpectedFrame)
        );
    }

    #[test]
    fn an_envelope_is_admitted_only_while_the_session_is_established() {
        let mut s = Session::new(0, SessionTimeouts::default());
        assert_eq!(s.on_envelope(1), Admit::Close(Reason::UnexpectedFrame));
        s.on_frame(&hello(), 2);
        s.established(&welcome(1000, 0), 2);
        assert_eq!(s.on_envelope(3), Admit::Accept);
        assert_eq!(s.quiet_us(3), 0, "an envelope counts as heard from");
        assert!(s.start_drain(4));
        assert_eq!(s.on_envelope(5), Admit::Nack(Reason::ShuttingDown));
        s.close(Reason::Normal);
        assert_eq!(s.on_envelope(6), Admit::Close(Reason::Normal));
    }

    #[test]
    fn more_than_a_few_pings_per_interval_is_a_flood() {
        let mut s = Session::new(0, SessionTimeouts::default());
        s.on_frame(&hello(), 0);
        s.established(&welcome(1_000, 0), 0);
        let ping = Frame::Ping(Ping { timestamp_us: 1 });
        // Four per interval, interval after interval, are fine.
        for i in 0..40u64 {
            let t = i * 250_000 + 1;
            assert_eq!(s.on_frame(&ping, t), Admit::Accept, "ping {i}");
        }
        for _ in 0..PINGS_PER_INTERVAL - 1 {
            assert_eq!(s.on_frame(&ping, 10_000_001), Admit::Accept);
        }
        assert_eq!(s.on_frame(&ping, 10_000_002), Admit::Accept);
        assert_eq!(
            s.on_frame(&ping, 10_000_003),
            Admit::Close(Reason::PingFlood)
        );
    }

    #[test]
    fn idle_sessions_close_only_when_configured() {
        let t = SessionTimeouts {
            idle_us: 5_000,
            ..Default::default()
        };
        let mut s = Session::new(0, t);
        s.established(&welcome(1, 0), 0);
        let pong = Frame::Pong(Pong {
            echo_us: 0,
            responder_us: 0,
        });
        for now in (0..5_000).step_by(500) {
            s.on_frame(&pong, now);
            assert_ne!(
                s.poll(now),
                Some(Due::Close(Reason::IdleTimeout)),
                "heartbeats are not traffic"
            );
        }
        assert_eq!(s.poll(5_000), Some(Due::Close(Reason::IdleTimeout)));
        let mut keep = Session::new(0, SessionTimeouts::default());
        keep.established(&welcome(1_000_000, 0), 0);
        assert_eq!(
            keep.poll(3_000_000_000),
            Some(Due::Close(Reason::HeartbeatTimeout))
        );
    }

    #[test]
    fn missing_hello_times_out() {
        let t = SessionTimeouts {
            handshake_us: 100,
            drain_us: 100,
            idle_us: 0,
            write_us: 1_000,
        };
        let mut s = Session::new(0, t);
        assert_eq!(s.poll(99), None);
        assert_eq!(s.poll(100), Some(Due::Close(Reason::HandshakeTimeout)));
    }

    #[test]
    fn silent_peer_is_pinged_then_declared_dead() {
        let mut s = Session::new(0, SessionTimeouts::default());
        s.established(&welcome(1, 0), 0);
        assert_eq!(s.poll(999), None);
        assert_eq!(s.poll(1000), Some(Due::Ping));
        assert_eq!(s.poll(1500), None);
        assert_eq!(s.poll(2000), Some(Due::Ping));
        assert_eq!(s.poll(3000), Some(Due::Close(Reason::HeartbeatTimeout)));
    }

    #[test]
    fn traffic_keeps_the_session_alive_and_pong_measures_rtt() {
        let mut s = Session::new(0, SessionTimeouts::default());
        s.established(&welcome(1, 0), 0);
        for t in (0..10_000).step_by(900) {
            s.on_frame(
                &Frame::Pong(Pong {
                    echo_us: t,
                    responder_us: 0,
                }),
                t,
            );
            assert_ne!(s.poll(t), Some(Due::Close(Reason::HeartbeatTimeout)));
        }
        assert_eq!(
            s.on_pong(
                &Pong {
                    echo_us: 100,
                    responder_us: 0
                },
                350
            ),
            Some(250)
        );
        assert_eq!(s.rtt_us(), Some(250));
    }

    #[test]
    fn key_update_is_due_on_the_rotation_interval() {
        let mut s = Session::new(0, SessionTimeouts::default());
        s.established(&welcome(60_000, 2), 0);
        assert_eq!(s.poll(1_999_999), None);
        assert_eq!(s.poll(2_000_000), Some(Due::KeyUpdate));
        assert_eq!(s.poll(2_000_001), None);
    }

    #[test]
    fn draining_refuses_envelopes_and_ends_at_deadline() {
        let t = SessionTimeouts {
            handshake_us: 100,
            drain_us: 500,
            idle_us: 0,
            write_us: 1_000,
        };
        let mut s = Session::new(0, t);
        assert!(!s.start_drain(0));
        s.on_frame(&hello(), 0);
        s.established(&welcome(60_000, 0), 0);
        assert!(s.start_drain(10));
        let env = crate::wire::EnvelopeBuilder::new(
            Default::default(),
            AgentId::default(),
            crate::wire::Destination::Agent(AgentId::default()),
            0,
            10,
        )
        .build(b"x")
        .unwrap();
        assert_eq!(
            s.on_frame(&Frame::Envelope(env), 11),
            Admit::Nack(Reason::ShuttingDown)
        );
        assert_eq!(s.drain_left_ms(10), 0);
        assert_eq!(s.poll(509), None);
        assert_eq!(s.poll(510), Some(Due::Close(Reason::ShuttingDown)));
        s.close(Reason::ShuttingDown);
        s.close(Reason::Normal);
        assert_eq!(s.close_reason(), Some(Reason::ShuttingDown));
    }
}

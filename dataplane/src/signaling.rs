//! Signaling: the agent's HELLO (capability descriptor) meets the relay's [`ContractPolicy`] and
//! yields the session contract sent back in WELCOME.
//!
//! Pure: [`negotiate`] takes the HELLO, the relay's policy and the ids, and returns the WELCOME or
//! the reason to CLOSE. The chosen protocol version is the highest one both sides speak.

use crate::wire::{
    AgentId, DeliveryClass, Hello, Reason, RelayId, Role, Welcome, PROTOCOL_VERSION_MAX,
    PROTOCOL_VERSION_MIN,
};

/// Smallest max-frame an agent may ask for; below this, the relay's minimum applies.
pub const MIN_FRAME: u32 = 4096;

/// What the relay is willing to agree to. Built from the relay configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContractPolicy {
    pub min_version: u16,
    pub max_version: u16,
    /// The role this listener serves; a HELLO with another role is refused (`not_admitted`).
    pub role: Role,
    /// Feature bits the relay supports.
    pub features: u32,
    /// Heartbeat interval when the agent asks for none, milliseconds.
    pub heartbeat_ms: u32,
    /// Bounds on the heartbeat interval an agent may ask for.
    pub heartbeat_min_ms: u32,
    pub heartbeat_max_ms: u32,
    /// Largest frame the relay accepts.
    pub max_frame: u32,
    pub rate_frames: u32,
    pub rate_bytes: u64,
    pub max_ttl_ms: u64,
    /// Delivery classes the relay serves (bit set).
    pub classes: u8,
    pub key_rotation_s: u32,
    /// Unacknowledged envelopes the relay writes to one agent before it waits for ACKs.
    pub deliver_window: u32,
    /// Unacknowledged bytes (frame lengths) likewise.
    pub deliver_window_bytes: u32,
    /// Envelopes an agent may have awaiting the relay's answer before the relay stops reading.
    pub send_window: u32,
}

impl Default for ContractPolicy {
    fn default() -> Self {
        ContractPolicy {
            min_version: PROTOCOL_VERSION_MIN,
            max_version: PROTOCOL_VERSION_MAX,
            role: Role::Agent,
            features: crate::wire::features::RECEIPTS | crate::wire::features::ACK_DELAY,
            heartbeat_ms: 10_000,
            heartbeat_min_ms: 1_000,
            heartbeat_max_ms: 60_000,
            max_frame: 1 << 20,
            // Above what one core forwards: the defaults never bind; operators lower them to
            // keep one session from taking a core's share.
            rate_frames: 10_000_000,
            rate_bytes: 10 << 30,
            max_ttl_ms: 24 * 3600 * 1000,
            classes: DeliveryClass::BestEffort.bit() | DeliveryClass::AtLeastOnce.bit(),
            key_rotation_s: 300,
            deliver_window: 4096,
            deliver_window_bytes: 4 << 20,
            send_window: 4096,
        }
    }
}

/// Agrees the session contract for one HELLO.
///
/// - version: the highest version in both ranges, else `NoCommonVersion` (checked first: an
///   older version's HELLO carries nothing else this build can read);
/// - role: must be the listener's, else `NotAdmitted`;
/// - features: those both support (ACK_DELAY only with a send window of at least
///   [`crate::wire::features::ACK_DELAY_MIN_WINDOW`]: the agent's window is clamped to it);
/// - heartbeat: the agent's wish clamped to the relay's bounds (0: the relay's default);
/// - max frame: the smaller of the two, never below [`MIN_FRAME`];
/// - classes: those both want; an agent that names none gets all the relay serves, an agent whose
///   wishes share none with the relay is refused with `ClassNotAllowed`.
pub fn negotiate(
    hello: &Hello,
    policy: &ContractPolicy,
    session_id: u64,
    relay_id: RelayId,
    agent_id: AgentId,
) -> Result<Welcome, Reason> {
    let version = hello.max_version.min(policy.max_version);
    if version < hello.min_version.max(policy.min_version) {
        return Err(Reason::NoCommonVersion);
    }
    if hello.role != policy.role {
        return Err(Reason::NotAdmitted);
    }
    let heartbeat_ms = match hello.heartbeat_ms {
        0 => policy.heartbeat_ms,
        h => h.clamp(policy.heartbeat_min_ms, policy.heartbeat_max_ms),
    };
    let max_frame = hello.max_frame.max(MIN_FRAME).min(policy.max_frame);
    let shallow = if policy.send_window < crate::wire::features::ACK_DELAY_MIN_WINDOW {
        crate::wire::features::ACK_DELAY
    } else {
        0
    };
    let classes = match hello.classes {
        0 => policy.classes,
        c if c & policy.classes == 0 => return Err(Reason::ClassNotAllowed),
        c => c & policy.classes,
    };
    Ok(Welcome {
        version,
        role: hello.role,
        features: hello.features & policy.features & !shallow,
        session_id,
        relay_id,
        agent_id,
        heartbeat_ms,
        max_frame,
        rate_frames: policy.rate_frames,
        rate_bytes: policy.rate_bytes,
        max_ttl_ms: policy.max_ttl_ms,
        classes,
        key_rotation_s: policy.key_rotation_s,
        deliver_window: policy.deliver_window,
        deliver_window_bytes: policy.deliver_window_bytes.max(max_frame),
        send_window: policy.send_window,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::features;

    fn hello(min: u16, max: u16) -> Hello {
        Hello {
            min_version: min,
            max_version: max,
            role: Role::Agent,
            features: features::RECEIPTS | 1 << 30,
            transports: 1,
            classes: 0,
            max_frame: 1 << 16,
            heartbeat_ms: 500,
            schemas: vec!["market/proposal@2.1".into()],
        }
    }

    fn policy(min: u16, max: u16) -> ContractPolicy {
        ContractPolicy {
            min_version: min,
            max_version: max,
            features: features::KNOWN,
            ..Default::default()
        }
    }

    #[test]
    fn picks_highest_common_version() {
        let w = negotiate(
            &hello(1, 5),
            &policy(2, 3),
            7,
            RelayId::default(),
            AgentId::default(),
        );
        assert_eq!(w.unwrap().version, 3);
        let w = negotiate(
            &hello(3, 3),
            &policy(1, 9),
            7,
            RelayId::default(),
            AgentId::default(),
        );
        assert_eq!(w.unwrap().version, 3);
    }

    #[test]
    fn disjoint_version_ranges_are_refused() {
        let r = negotiate(
            &hello(4, 6),
            &policy(1, 3),
            7,
            RelayId::default(),
            AgentId::default(),
        );
        assert_eq!(r, Err(Reason::NoCommonVersion));
        let r = negotiate(
            &hello(1, 1),
            &policy(2, 3),
            7,
            RelayId::default(),
            AgentId::default(),
        );
        assert_eq!(r, Err(Reason::NoCommonVersion));
    }

    #[test]
    fn features_intersect_and_the_role_must_match() {
        let w = negotiate(
            &hello(1, 9),
            &policy(1, 9),
            7,
            RelayId::default(),
            AgentId::default(),
        );
        assert_eq!(
            w.unwrap().features,
            features::RECEIPTS,
            "unknown bits dropped"
        );
        let mut h = hello(1, 9);
        h.role = Role::RelayLink;
        let r = negotiate(&h, &policy(1, 9), 7, RelayId::default(), AgentId::default());
        assert_eq!(r, Err(Reason::NotAdmitted));
    }

    #[test]
    fn ack_delay_is_granted_only_with_a_deep_send_window() {
        let mut h = hello(1, 9);
        h.features |= features::ACK_DELAY;
        let mut p = policy(1, 9);
        let grant = |p: &ContractPolicy| {
            negotiate(&h, p, 7, RelayId::default(), AgentId::default())
                .unwrap()
                .features
                & features::ACK_DELAY
        };
        p.send_window = features::ACK_DELAY_MIN_WINDOW;
        assert_eq!(grant(&p), features::ACK_DELAY);
        p.send_window = features::ACK_DELAY_MIN_WINDOW - 1;
        assert_eq!(
            grant(&p),
            0,
            "the agent's window would be clamped below the minimum"
        );
    }

    #[test]
    fn clamps_heartbeat_and_frame_and_intersects_classes() {
        let mut h = hello(1, 1);
        h.max_frame = 10;
        h.classes = DeliveryClass::AtLeastOnce.bit() | DeliveryClass::Durable.bit();
        let w = negotiate(&h, &policy(1, 1), 1, RelayId::default(), AgentId::default()).unwrap();
        assert_eq!(w.heartbeat_ms, 1_000);
        assert_eq!(w.max_frame, MIN_FRAME);
        assert_eq!(w.classes, DeliveryClass::AtLeastOnce.bit());
        h.classes = DeliveryClass::Durable.bit();
        let r = negotiate(&h, &policy(1, 1), 1, RelayId::default(), AgentId::default());
        assert_eq!(r, Err(Reason::ClassNotAllowed));
    }
}

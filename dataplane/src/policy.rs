//! Policy: what a relay admits. Agent admission (open or CA-only, allow and deny lists), the
//! per-envelope checks at ingress (source, hop limit, expiry, TTL, class), and the token buckets
//! that pace a session's reading.
//!
//! Pure: callers pass the wall-clock (`now_ms`, for envelope expiry) or monotonic (`now_us`, for
//! buckets) time.

use std::collections::HashSet;

use crate::wire::{AgentId, Envelope, Reason, Welcome};

/// How agents are admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdmissionMode {
    /// Any agent with a certificate for its own Ed25519 key (self-signed is fine).
    Open,
    /// Only agents whose certificate the fleet CA issued.
    CaOnly,
}

/// Agent admission: mode plus allow and deny lists of agent ids.
#[derive(Clone, Debug)]
pub struct Admission {
    pub mode: AdmissionMode,
    /// When non-empty, only these agents are admitted.
    pub allow: HashSet<AgentId>,
    /// These agents are never admitted.
    pub deny: HashSet<AgentId>,
}

impl Default for Admission {
    fn default() -> Self {
        Admission {
            mode: AdmissionMode::Open,
            allow: HashSet::new(),
            deny: HashSet::new(),
        }
    }
}

impl Admission {
    /// Whether an authenticated agent may open a session. The deny list wins over the allow list.
    pub fn admit(&self, agent: &AgentId) -> Result<(), Reason> {
        if self.deny.contains(agent) || (!self.allow.is_empty() && !self.allow.contains(agent)) {
            return Err(Reason::NotAdmitted);
        }
        Ok(())
    }
}

/// Extension kinds this relay knows. A critical extension of any other kind makes the relay
/// refuse the envelope (`unknown_critical_extension`); none is defined yet.
pub const KNOWN_EXTENSIONS: &[u16] = &[];

/// Checks an envelope arriving from its source agent against the session contract.
///
/// The first rule broken gives the reason, in the order `docs/PROTOCOL.md` §4 fixes: the source
/// is the authenticated agent; the routing part is the one an agent sends (no path, hop or copy
/// index, route generation); no unknown critical extension; the class is allowed; the hop limit is
/// not exhausted; the envelope has not expired (`expires_ms <= now` has); its lifetime is within
/// the contract's maximum TTL.
pub fn check_ingress(env: &Envelope, contract: &Welcome, now_ms: u64) -> Result<(), Reason> {
    if env.source() != contract.agent_id {
        return Err(Reason::SourceMismatch);
    }
    if !env.routing.is_origin() {
        return Err(Reason::InvalidRouting);
    }
    if env.unknown_critical_extension(KNOWN_EXTENSIONS).is_some() {
        return Err(Reason::UnknownCriticalExtension);
    }
    if contract.classes & env.class().bit() == 0 {
        return Err(Reason::ClassNotAllowed);
    }
    if env.routing.hop_limit == 0 {
        return Err(Reason::HopLimitExceeded);
    }
    let expires = env.expires_ms();
    if expires <= now_ms {
        return Err(Reason::Expired);
    }
    if expires - now_ms > contract.max_ttl_ms {
        return Err(Reason::TtlTooLong);
    }
    Ok(())
}

/// A token bucket that may go into debt: a session's reads are never refused, but the reader
/// waits [`TokenBucket::wait_us`] before reading again, so TCP pushes back on the sender.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate_per_s: f64,
    burst: f64,
    tokens: f64,
    last_us: u64,
}

impl TokenBucket {
    /// A full bucket refilling at `rate_per_s`, holding at most `burst` tokens.
    pub fn new(rate_per_s: u64, burst: u64, now_us: u64) -> Self {
        let burst = burst.max(1) as f64;
        TokenBucket {
            rate_per_s: rate_per_s.max(1) as f64,
            burst,
            tokens: burst,
            last_us: now_us,
        }
    }

    fn refill(&mut self, now_us: u64) {
        let dt = now_us.saturating_sub(self.last_us) as f64 / 1e6;
        self.tokens = (self.tokens + dt * self.rate_per_s).min(self.burst);
        self.last_us = now_us.max(self.last_us);
    }

    /// Spends `n` tokens (the balance may go negative).
    pub fn spend(&mut self, n: u64, now_us: u64) {
        self.refill(now_us);
        self.tokens -= n as f64;
    }

    /// Microseconds until the balance is back to zero (0 when not in debt).
    pub fn wait_us(&mut self, now_us: u64) -> u64 {
        self.refill(now_us);
        if self.tokens >= 0.0 {
            0
        } else {
            (-self.tokens / self.rate_per_s * 1e6).ceil() as u64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{DeliveryClass, Destination, EnvelopeBuilder, MessageId};

    fn contract(agent: AgentId) -> Welcome {
        Welcome {
            agent_id: agent,
            heartbeat_ms: 1000,
            max_frame: 65536,
            max_ttl_ms: 60_000,
            classes: DeliveryClass::AtLeastOnce.bit(),
            ..Welcome::default()
        }
    }

    #[test]
    fn ingress_checks_each_rule() {
        let me = AgentId([1; 32]);
        let c = contract(me);
        let b = EnvelopeBuilder::new(
            MessageId::from_u128(1),
            me,
            Destination::Agent(me),
            1000,
            500,
        );
        let e = b.build(b"p").unwrap();
        assert_eq!(check_ingress(&e, &c, 1000), Ok(()));
        assert_eq!(check_ingress(&e, &c, 1500), Err(Reason::Expired));
        let mut hop0 = e.clone();
        hop0.routing.hop_limit = 0;
        assert_eq!(
            check_ingress(&hop0, &c, 1000),
            Err(Reason::HopLimitExceeded)
        );
        let other = contract(AgentId([2; 32]));
        assert_eq!(check_ingress(&e, &other, 1000), Err(Reason::SourceMismatch));
        let mut long = b.clone();
        long.expires_ms = 1000 + 60_001;
        let e = long.build(b"p").unwrap();
        assert_eq!(check_ingress(&e, &c, 1000), Err(Reason::TtlTooLong));
        let mut be = b.clone();
        be.class = DeliveryClass::BestEffort;
        let e = be.build(b"p").unwrap();
        assert_eq!(check_ingress(&e, &c, 1000), Err(Reason::ClassNotAllowed));
        assert_eq!(
            check_ingress(&e, &c, 1500),
            Err(Reason::ClassNotAllowed),
            "class is checked before expiry"
        );
        let mut routed = b.build(b"p").unwrap();
        routed.routing.route_generation = 3;
        assert_eq!(
            check_ingress(&routed, &c, 1000),
            Err(Reason::InvalidRouting)
        );
        let mut crit = b.clone();
        crit.extensions = vec![(0x8123, vec![1, 2]), (0x0042, vec![])];
        let e = crit.build(b"p").unwrap();
        assert_eq!(
            check_ingress(&e, &c, 1000),
            Err(Reason::UnknownCriticalExtension)
        );
        let mut plain = b;
        plain.extensions = vec![(0x0123, vec![9])];
        let e = plain.build(b"p").unwrap();
        assert_eq!(check_ingress(&e, &c, 1000), Ok(()), "non-critical passes");
        assert_eq!(check_ingress(&e, &c, e.expires_ms()), Err(Reason::Expired));
    }

    #[test]
    fn deny_wins_over_allow() {
        let a = AgentId([1; 32]);
        let b = AgentId([2; 32]);
        let mut adm = Admission::default();
        assert!(adm.admit(&a).is_ok());
        adm.allow.insert(a);
        assert!(adm.admit(&a).is_ok());
        assert_eq!(adm.admit(&b), Err(Reason::NotAdmitted));
        adm.deny.insert(a);
        assert_eq!(adm.admit(&a), Err(Reason::NotAdmitted));
    }

    #[test]
    fn bucket_goes_into_debt_and_reports_the_wait() {
        let mut t = TokenBucket::new(1000, 10, 0);
        t.spend(10, 0);
        assert_eq!(t.wait_us(0), 0);
        t.spend(20, 0);
        assert_eq!(t.wait_us(0), 20_000);
        assert_eq!(t.wait_us(10_000), 10_000);
        assert_eq!(t.wait_us(20_000), 0);
        assert_eq!(t.wait_us(10_000_000), 0);
    }
}

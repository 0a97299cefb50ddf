//! A race between cores: the source's core looks up where the destination agent is before the
//! presence that places it on another relay arrives, and hands the envelope to the agent's home
//! core, which heard the presence first and keeps the envelope for an agent that is not here.
//! What was kept follows the agent to its relay on the next tick (once a link leads there)
//! instead of waiting here until the agent's next presence (half a minute later) or its expiry.

use std::sync::Arc;

use openmesh_dataplane::fleet::file;
use openmesh_dataplane::shard::budget::RelayBudget;
use openmesh_dataplane::shard::msg::{CoreMsg, Src};
use openmesh_dataplane::shard::{Limits, Now, SeqSource, Shard};
use openmesh_dataplane::testing::{open_settings, InMemoryRelay};
use openmesh_dataplane::wire::{
    AgentId, Destination, EnvelopeBuilder, MessageId, PresenceEntry, RelayId,
};

#[test]
fn an_envelope_kept_after_presence_placed_its_agent_elsewhere_follows_it_on_the_next_tick() {
    let relay = InMemoryRelay::new();
    let here = relay.relay.relay_id();
    let there = RelayId([7; 32]);
    let text = format!(
        "generation = 1\n\
         [[relay]]\nname = \"here\"\nid = \"{}\"\nagent = \"127.0.0.1:7400\"\nlink = \"127.0.0.1:7500\"\njurisdiction = \"DE\"\ntrust = 90\n\
         [[relay]]\nname = \"there\"\nid = \"{}\"\nagent = \"127.0.0.1:7401\"\nlink = \"127.0.0.1:7501\"\njurisdiction = \"FR\"\ntrust = 90\n\
         [[link]]\nbetween = [\"here\", \"there\"]\nlatency_ms = 1\n",
        here.to_hex(),
        there.to_hex()
    );
    let snap = Arc::new(file::parse(&text).unwrap());
    // Core 0 of 2: the envelope comes from an agent on core 1.
    let mut shard = Shard::new(
        0,
        2,
        relay.shard_config(),
        open_settings(Limits::default()),
        Arc::new(SeqSource::default()),
        RelayBudget::new(1 << 30, 2),
    );
    let mut now = Now {
        mono_us: 1_000_000,
        unix_ms: 1_700_000_000_000,
    };
    shard.on_message(CoreMsg::Fleet(snap), now);
    let (agent, source) = (AgentId([1; 32]), AgentId([2; 32]));
    // The presence reaches this core first...
    shard.on_message(
        CoreMsg::Presence {
            entries: Arc::from(vec![PresenceEntry {
                agent,
                relay: there,
                stamp_ms: now.unix_ms,
            }]),
            from: Some(there),
        },
        now,
    );
    // ...then the envelope core 1 routed before it heard it.
    let env = EnvelopeBuilder::new(
        MessageId::from_u128(1),
        source,
        Destination::Agent(agent),
        now.unix_ms,
        60_000,
    )
    .build(b"for the agent on the other relay")
    .unwrap();
    let src = Src {
        core: 1,
        conn: 5,
        tag: MessageId::from_u128(1),
        relay: false,
        len: env.frame_len() as u32,
        hold: false,
    };
    shard.on_message(
        CoreMsg::Deliver {
            env,
            src: Some(src),
        },
        now,
    );
    assert_held(&shard, 1, "kept for the absent agent");
    assert_eq!(shard.fleet_waiting(), 0);
    // The link to the agent's relay is down: no path there now, so the envelope stays kept here
    // (it was ACKed) rather than waiting in a list that may refuse it.
    tick(&mut shard, &mut now);
    assert_held(&shard, 1, "no path: kept");
    // The link comes up (on core 1): on the next tick the envelope follows its agent there.
    shard.on_message(
        CoreMsg::LinkUp {
            peer: there,
            core: 1,
            conn: 9,
            latency_us: 1_000,
        },
        now,
    );
    tick(&mut shard, &mut now);
    assert_held(&shard, 0, "still kept here");
    assert_eq!(shard.fleet_waiting(), 0, "{}", shard.describe_mesh());
    let forwarded: Vec<RelayId> = shard
        .outbox()
        .queues_mut()
        .flat_map(|(_, q)| q.drain(..))
        .filter_map(|m| match m {
            CoreMsg::Forward { env, peer, .. } if env.message_id() == MessageId::from_u128(1) => {
                Some(peer)
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        forwarded,
        vec![there],
        "handed to the link's core for the agent's relay"
    );
}

/// One tick (100 ms) later.
fn tick(shard: &mut Shard, now: &mut Now) {
    now.mono_us += 100_000;
    now.unix_ms += 100;
    shard.on_tick(*now);
}

fn assert_held(shard: &Shard, n: usize, why: &str) {
    let held = shard.describe_held();
    assert!(
        held.starts_with(&format!("held {n} envelopes")),
        "{why}: {held}"
    );
}

//! A fixed workload for instruction counting under callgrind: the relay's whole per-envelope
//! path, in memory, on one shard (or two, `CORES=2`). A sender's TLS records carrying N 256-byte envelopes (in rounds
//! of 100) are read by the shard (records opened in place, frames decoded, checked, routed and
//! queued), the destination's writer seals them, the destination's ACK records are read, custody
//! is settled and the sender's ACKs are sealed. Every client record is prepared before the
//! measured part, so only the relay's work is counted:
//!
//! ```text
//! valgrind --tool=callgrind --toggle-collect='*relay_instructions::measured*' \
//!     --callgrind-out-file=/tmp/cg.N target/release/relay-instructions N
//! ```
//! Run it with N and 2N; the difference divided by N is the relay's instructions per envelope.
//! `SIZE=16384` changes the payload size. `CORES=2` runs two shards, the sender's home core and
//! the receiver's apart, so every envelope crosses between cores (handed over as a `Delivers`
//! message, its verdict coming back as `Verdicts`), as on a relay with several cores.

use std::io::Write;

use bytes::BytesMut;
use openmesh_dataplane::pki::Identity;
use openmesh_dataplane::routing::home_core;
use openmesh_dataplane::shard::msg::ConnId;
use openmesh_dataplane::shard::{Limits, Now, Shard};
use openmesh_dataplane::testing::{open_settings, InMemoryRelay};
use openmesh_dataplane::wire::{AckBatch, Destination, EnvelopeBuilder, Frame, MessageId};
use rustls::ClientConnection;

const NOW: Now = Now {
    mono_us: 1_000_000,
    unix_ms: 1_800_000_000_000,
};
const ROUND: usize = 100;

fn feed(shard: &mut Shard, conn: ConnId, mut wire: &[u8]) {
    while !wire.is_empty() {
        let mut buf = shard.take_read_buf(conn).expect("connection open");
        let n = (buf.capacity() - buf.len()).min(wire.len());
        buf.extend_from_slice(&wire[..n]);
        wire = &wire[n..];
        shard.on_read(conn, buf, NOW);
    }
}

/// Moves every shard's messages to their cores until none is left (the engine's mailboxes).
fn pump(shards: &mut [Shard]) {
    loop {
        let mut mail = Vec::new();
        for (from, shard) in shards.iter_mut().enumerate() {
            for (to, q) in shard.outbox().queues_mut() {
                mail.extend(q.drain(..).map(|m| (from, to, m)));
            }
            shard.outbox_flushed();
        }
        if mail.is_empty() {
            return;
        }
        for (_, to, m) in mail {
            shards[to].on_message(m, NOW);
        }
    }
}

/// Delivers the shards' messages, then runs `conn`'s writer on core `core`; returns the bytes
/// it wrote.
fn drain(shards: &mut [Shard], core: usize, conn: ConnId) -> Vec<u8> {
    pump(shards);
    let shard = &mut shards[core];
    let mut out = Vec::new();
    while let Some((buf, n)) = shard.poll_write(conn, NOW) {
        out.extend_from_slice(&buf[..n]);
        shard.on_write_done(conn, buf, true, NOW);
    }
    for shard in shards.iter_mut() {
        while shard.poll_action().is_some() {}
    }
    out
}

fn records(c: &mut ClientConnection) -> Vec<u8> {
    let mut v = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut v).expect("client records");
    }
    v
}

/// An agent's connection: its core and its id there.
type At = (usize, ConnId);

#[inline(never)]
fn measured(shards: &mut [Shard], rounds: &[(Vec<u8>, Vec<u8>)], s: At, r: At) -> usize {
    let mut bytes = 0;
    for (envelopes, acks) in rounds {
        feed(&mut shards[s.0], s.1, envelopes);
        bytes += drain(shards, r.0, r.1).len();
        feed(&mut shards[r.0], r.1, acks);
        bytes += drain(shards, s.0, s.1).len();
    }
    bytes
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let size: usize = std::env::var("SIZE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let cores: u16 = std::env::var("CORES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
        .max(1);
    let relay = InMemoryRelay::new();
    let mut shards = relay.shards(open_settings(Limits::default()), cores);
    // Two agents, each on its home core (the sender on core 0, the receiver on the last):
    // handshake, HELLO, WELCOME.
    let mut agents = Vec::new();
    for i in 0..2u16 {
        let want = i * (cores - 1);
        let id = loop {
            let id = Identity::generate_self_signed(&format!("agent-{i}")).expect("identity");
            if home_core(&id.agent_id(), cores) == want {
                break id;
            }
        };
        let core = want as usize;
        let mut c = relay.client(&id);
        let conn = shards[core].open(NOW).expect("accepted");
        let hello = openmesh_dataplane::testing::hello();
        let mut sent_hello = false;
        for _ in 0..6 {
            if !c.is_handshaking() && !sent_hello {
                sent_hello = true;
                c.writer().write_all(&hello.to_bytes()).expect("hello");
            }
            let out = records(&mut c);
            feed(&mut shards[core], conn, &out);
            let back = drain(&mut shards, core, conn);
            let mut b = &back[..];
            while !b.is_empty() {
                c.read_tls(&mut b).expect("read");
                c.process_new_packets().expect("process");
            }
        }
        agents.push((c, (core, conn), id.agent_id()));
    }
    let (src, dst) = (agents[0].2, agents[1].2);
    // Every client record, prepared in advance.
    let mut rounds = Vec::new();
    let mut next = 1u128;
    for _ in 0..n.div_ceil(ROUND) {
        let mut out = BytesMut::with_capacity(ROUND * (size + 200));
        let mut ids = Vec::with_capacity(ROUND);
        for _ in 0..ROUND {
            let e = EnvelopeBuilder::new(
                MessageId::from_u128(next),
                src,
                Destination::Agent(dst),
                NOW.unix_ms,
                60_000,
            )
            .build(&vec![0x5a; size])
            .expect("envelope");
            ids.push(e.message_id());
            e.encode(&mut out);
            next += 1;
        }
        let mut envelopes = Vec::new();
        for chunk in out.chunks(32 << 10) {
            agents[0].0.writer().write_all(chunk).expect("write");
            envelopes.extend(records(&mut agents[0].0));
        }
        agents[1]
            .0
            .writer()
            .write_all(&Frame::Ack(AckBatch::new(ids)).to_bytes())
            .expect("ack");
        let acks = records(&mut agents[1].0);
        rounds.push((envelopes, acks));
    }
    let bytes = measured(&mut shards, &rounds, agents[0].1, agents[1].1);
    println!(
        "{n} envelopes of {size} bytes forwarded across {cores} core(s), {bytes} bytes written by the relay"
    );
}

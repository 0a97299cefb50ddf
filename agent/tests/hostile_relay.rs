//! A relay that keeps sending but stops reading: what the agent holds to write stays bounded
//! (ACKs wait in their bounded holding place, PINGs go unanswered, nothing piles up behind a
//! socket that takes nothing), while the application still gets every envelope.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use openmesh_agent::{Agent, ClientConfig};
use openmesh_dataplane::pki::Identity;
use openmesh_dataplane::signaling::{negotiate, ContractPolicy};
use openmesh_dataplane::testing::InMemoryRelay;
use openmesh_dataplane::wire::{
    AgentId, DeliveryClass, Destination, EnvelopeBuilder, Frame, FrameDecoder, MessageId, Nack,
    Ping, Reason, RelayId,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;

/// Envelopes the relay writes; their ACKs alone (16 bytes each) are 12 MiB, far more than the
/// socket buffers hold.
const FLOOD: u64 = 800_000;
/// Envelopes per pre-encoded block.
const BLOCK: u64 = 4_000;

/// The tests here measure the process (its CPU time): one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One agent's relay, as hostile as each test makes it: TLS with an in-memory relay's
/// certificate, on a listener whose accepted sockets have a small receive buffer (they fill
/// soon).
struct Hostile {
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    relay_id: RelayId,
    agent_id: AgentId,
}

/// A hostile relay for the agent `name`, and that agent's configuration.
fn hostile(name: &str) -> (Hostile, ClientConfig) {
    let relay = InMemoryRelay::new();
    let id = Identity::generate_self_signed(name).unwrap();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(16 << 10).unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = sock.listen(4).unwrap();
    let h = Hostile {
        acceptor: tokio_rustls::TlsAcceptor::from(relay.server_tls.clone()),
        relay_id: relay.relay.relay_id(),
        agent_id: id.agent_id(),
        listener,
    };
    let mut cfg = ClientConfig::new(
        h.listener.local_addr().unwrap(),
        vec![relay.ca.cert.clone()],
        id,
    );
    cfg.server_name = Some("localhost".into());
    (h, cfg)
}

impl Hostile {
    /// Accepts the agent, reads its HELLO and answers it under `policy`. Returns the stream,
    /// what was read past the HELLO, and the listener (later connections wait in its backlog,
    /// never answered, while it is held).
    async fn welcome(
        self,
        policy: ContractPolicy,
    ) -> (TlsStream<TcpStream>, BytesMut, TcpListener) {
        let (tcp, _) = self.listener.accept().await.unwrap();
        let mut tls = self.acceptor.accept(tcp).await.unwrap();
        let (dec, mut rx) = (FrameDecoder::new(1 << 20), BytesMut::new());
        let hello = loop {
            if let Some(Frame::Hello(h)) = dec.decode(&mut rx).unwrap() {
                break h;
            }
            assert!(tls.read_buf(&mut rx).await.unwrap() > 0, "HELLO");
        };
        let welcome = negotiate(&hello, &policy, 1, self.relay_id, self.agent_id).unwrap();
        tls.write_all(&Frame::Welcome(welcome).to_bytes())
            .await
            .unwrap();
        (tls, rx, self.listener)
    }
}

/// Sends 256 envelopes of 64 KiB: 16 MiB, far more than the socket buffers between the agent
/// and a relay that does not read.
async fn send_16_mib(agent: &Agent) {
    let body = vec![0x5a_u8; 64 << 10];
    let mut batch = openmesh_agent::Batch::new();
    for _ in 0..256 {
        batch.push(&agent.envelope_to(AgentId([9; 32])).build(&body).unwrap());
    }
    let _handle = agent.send_batch(batch).await.unwrap();
}

/// This process's CPU time (user and system), from /proc.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // The fields after the command name (which is in parentheses).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|x| x.parse().unwrap())
        .collect();
    // Clock ticks of 1/100 s (USER_HZ on Linux).
    Duration::from_millis((f[0] + f[1]) * 10)
}

/// Short timeouts, a 100 ms heartbeat and a window of 256, for an agent whose relay will stop
/// taking what it writes.
fn impatient(cfg: &mut ClientConfig) {
    cfg.hello.heartbeat_ms = 100;
    cfg.window = 256;
    cfg.destination_window = 256;
    cfg.connect_timeout = Duration::from_millis(300);
    cfg.close_timeout = Duration::from_millis(500);
}

/// Waits until the agent has given its connection up (it reconnects, or nothing waits to be
/// written any more), failing after `within`; returns how long it took from `t0`.
async fn until_given_up(agent: &Agent, t0: Instant, within: Duration, what: &str) -> Duration {
    while agent.stats().reconnects == 0 && agent.stats().unwritten_bytes > 0 {
        assert!(t0.elapsed() < within, "{what}: {:?}", agent.stats());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t0.elapsed()
}

/// Closes an agent whose 256 envelopes were never answered; returns how long the close took.
async fn close_unanswered(agent: Agent) -> Duration {
    let t1 = Instant::now();
    let report = tokio::time::timeout(Duration::from_secs(5), agent.close())
        .await
        .expect("close ends within its timeout")
        .unwrap();
    assert_eq!(report.unanswered.len(), 256, "nothing was answered");
    t1.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_stops_reading_cannot_grow_what_the_agent_holds_to_write() {
    let _one = SERIAL.lock().await;
    let (relay, mut cfg) = hostile("victim");
    let agent_id = cfg.identity.agent_id();
    let hostile = tokio::spawn(async move {
        // The HELLO, then never a byte more is read.
        let policy = ContractPolicy {
            deliver_window: 1 << 20,
            ..ContractPolicy::default()
        };
        let (mut tls, _, _) = relay.welcome(policy).await;
        let now = openmesh_agent::unix_ms();
        let mut block = BytesMut::new();
        for i in 0..BLOCK {
            let mut b = EnvelopeBuilder::new(
                MessageId([i as u8; 16]),
                AgentId([7; 32]),
                Destination::Agent(agent_id),
                now,
                600_000,
            );
            b.class = DeliveryClass::AtLeastOnce;
            Frame::Envelope(b.build(b"payload").unwrap()).encode(&mut block);
            if i % 500 == 0 {
                Frame::Ping(Ping { timestamp_us: i }).encode(&mut block);
            }
        }
        let block = block.freeze();
        for _ in 0..FLOOD / BLOCK {
            tls.write_all(&block).await.unwrap();
        }
        tls.flush().await.unwrap();
        // Holds the connection (still not reading) until the test ends.
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(tls);
    });

    cfg.auto_ack = true;
    let mut agent = Agent::connect(cfg).await.unwrap();

    let (mut got, mut most_unwritten) = (0u64, 0u64);
    let mut evs = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while got < FLOOD {
        assert!(Instant::now() < deadline, "received {got} of {FLOOD}");
        if let Ok(true) =
            tokio::time::timeout(Duration::from_secs(5), agent.recv_many(&mut evs)).await
        {
            got += evs.len() as u64;
            evs.clear();
        }
        most_unwritten = most_unwritten.max(agent.stats().unwritten_bytes);
    }
    // Let the driver try to write whatever it still holds.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let st = agent.stats();
    most_unwritten = most_unwritten.max(st.unwritten_bytes);
    eprintln!(
        "most held to write: {most_unwritten} bytes; at the end {}",
        st.unwritten_bytes
    );
    assert_eq!(st.received, FLOOD, "every envelope reached the application");
    assert!(
        st.unwritten_bytes > 0,
        "the relay reads nothing: the agent's writes must be stuck, or this tests nothing"
    );
    // One group of held ACKs (at most 65,536 ids of 16 bytes, in frames) and the records
    // sealed from it: about 1 MiB each. Without the bound the ACKs for every envelope read
    // pile up (12 MiB).
    assert!(
        most_unwritten <= 3 << 20,
        "the agent held {most_unwritten} bytes to write"
    );
    hostile.abort();
}

/// A relay that reads a few envelopes, NACKs them as retryable and then stops reading, while
/// the agent has far more to write than the socket takes: the retries come due while nothing
/// can be written, and the agent waits for the socket instead of spinning on them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_due_while_the_relay_reads_nothing_do_not_spin_the_agent() {
    let _one = SERIAL.lock().await;
    let (relay, mut cfg) = hostile("victim");
    let (nacked_tx, nacked_rx) = tokio::sync::oneshot::channel();

    let hostile = tokio::spawn(async move {
        let (mut tls, mut rx, _) = relay.welcome(ContractPolicy::default()).await;
        let (dec, mut nacks) = (FrameDecoder::new(1 << 20), BytesMut::new());
        let mut n = 0;
        while n < 4 {
            match dec.decode(&mut rx).unwrap() {
                Some(Frame::Envelope(e)) => {
                    Frame::Nack(Nack::new(e.message_id(), Reason::Overloaded)).encode(&mut nacks);
                    n += 1;
                }
                Some(_) => {}
                None => assert!(tls.read_buf(&mut rx).await.unwrap() > 0, "agent's frames"),
            }
        }
        // Retry those, later; and never read another byte.
        tls.write_all(&nacks).await.unwrap();
        tls.flush().await.unwrap();
        let _ = nacked_tx.send(());
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(tls);
    });

    cfg.window = 256;
    cfg.destination_window = 256;
    let agent = Agent::connect(cfg).await.unwrap();
    send_16_mib(&agent).await;
    tokio::time::timeout(Duration::from_secs(10), nacked_rx)
        .await
        .expect("the relay read four envelopes")
        .unwrap();
    // The NACKs' retries come due (50 ms) while the socket takes nothing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let st = agent.stats();
    assert_eq!(st.nacked, 4, "{st:?}");
    assert!(
        st.unwritten_bytes > 0,
        "the agent's writes must be stuck: {st:?}"
    );
    let (t0, c0) = (Instant::now(), cpu_time());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (spent, took) = (cpu_time() - c0, t0.elapsed());
    eprintln!("{spent:?} of CPU in {took:?} while blocked with retries due");
    assert!(
        spent < took / 4,
        "the agent spun while it could not write: {spent:?} of CPU in {took:?}"
    );
    hostile.abort();
    drop(agent);
}

/// A contract whose heartbeat may be as short as 100 ms (what the agent asks for here).
fn heartbeat_100_ms() -> ContractPolicy {
    ContractPolicy {
        heartbeat_min_ms: 100,
        ..ContractPolicy::default()
    }
}

/// A relay that answers HELLO and then neither reads nor writes (a frozen process), while the
/// agent has far more to write than the socket takes: the agent gives the connection up after
/// three silent heartbeat intervals without waiting on its socket, and closes within its close
/// timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_relay_does_not_hold_the_agent_on_its_socket() {
    let _one = SERIAL.lock().await;
    let (relay, mut cfg) = hostile("victim");
    let frozen = tokio::spawn(async move {
        let (tls, _, listener) = relay.welcome(heartbeat_100_ms()).await;
        // Frozen: the connection stays open, and nothing more happens on it (later
        // connections wait in the backlog, never answered).
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop((tls, listener));
    });

    impatient(&mut cfg);
    let agent = Agent::connect(cfg).await.unwrap();
    assert_eq!(agent.welcome().heartbeat_ms, 100);
    send_16_mib(&agent).await;
    // Three silent intervals and more: the agent has given the connection up.
    let within = Duration::from_secs(5);
    until_given_up(
        &agent,
        Instant::now(),
        within,
        "still on the frozen connection",
    )
    .await;
    let closing = close_unanswered(agent).await;
    assert!(closing < Duration::from_secs(3), "{closing:?}");
    frozen.abort();
}

/// A relay that answers HELLO, keeps its heartbeat going (a PING every 50 ms, so the agent
/// hears it) and never reads again, while the agent has far more to write than the socket
/// takes: the agent gives the connection up once nothing was taken for its `write_timeout`,
/// and not before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_talks_but_never_reads_is_given_up_after_the_write_timeout() {
    let _one = SERIAL.lock().await;
    let (relay, mut cfg) = hostile("victim");
    let talker = tokio::spawn(async move {
        let (mut tls, _, listener) = relay.welcome(heartbeat_100_ms()).await;
        // Later connections wait in the backlog, never answered.
        let _listener = listener;
        for i in 0.. {
            let ping = Frame::Ping(Ping { timestamp_us: i }).to_bytes();
            if tls.write_all(&ping).await.is_err() || tls.flush().await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });

    impatient(&mut cfg);
    cfg.write_timeout = Duration::from_millis(1500);
    let agent = Agent::connect(cfg).await.unwrap();
    send_16_mib(&agent).await;
    let t0 = Instant::now();
    // The relay's PINGs keep the session: three heartbeat intervals pass and more.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        agent.stats().reconnects,
        0,
        "given up before the write timeout"
    );
    assert!(agent.stats().unwritten_bytes > 0, "{:?}", agent.stats());
    let within = Duration::from_secs(6);
    let what = "still on a connection that takes nothing";
    let waited = until_given_up(&agent, t0, within, what).await;
    assert!(waited >= Duration::from_millis(1400), "{waited:?}");
    close_unanswered(agent).await;
    talker.abort();
}

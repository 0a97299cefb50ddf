//! Relay fleets of real processes on loopback: relay links (fleet CA, LINK_HELLO), envelopes
//! forwarded over several relays along the path an envelope's constraints allow, NACKs at the
//! source when no path qualifies, and links refused to a certificate that is not a fleet
//! relay's.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{free_port, fresh_dir, Relay};
use openmesh_agent::session::{Event, Session};
use openmesh_agent::ClientConfig;
use openmesh_dataplane::pki::{load_certs, CertAuthority, Identity};
use openmesh_dataplane::wire::{Jurisdiction, Reason, RelayId};

/// One relay of a test fleet: its name, jurisdiction and trust.
struct Member {
    name: &'static str,
    jurisdiction: &'static str,
    trust: u8,
}

fn member(name: &'static str, jurisdiction: &'static str, trust: u8) -> Member {
    Member {
        name,
        jurisdiction,
        trust,
    }
}

/// A fleet of relay processes: a fleet CA, one certificate per relay, a fleet file, and the
/// relays started on it.
struct Fleet {
    dir: PathBuf,
    names: Vec<&'static str>,
    ids: Vec<RelayId>,
    relays: Vec<Relay>,
    ca: PathBuf,
    configs: Vec<String>,
    fleet_file: String,
}

impl Fleet {
    /// Starts `members` with links `links` (pairs of names, one-way latency in ms).
    fn start(members: &[Member], links: &[(&str, &str, f64)]) -> Fleet {
        Fleet::start_with(members, links, "")
    }

    /// [`Fleet::start`], with `extra` appended to every relay's configuration.
    fn start_with(members: &[Member], links: &[(&str, &str, f64)], extra: &str) -> Fleet {
        let dir = fresh_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let ca = CertAuthority::generate("test fleet CA").unwrap();
        let ca_path = dir.join("fleet-ca.pem");
        ca.save(&ca_path, &dir.join("fleet-ca.key")).unwrap();
        let mut file =
            String::from("generation = 1\n[blocs]\nEU = [\"DE\", \"FR\", \"NL\", \"BE\"]\n");
        let mut ids = Vec::new();
        let mut configs = Vec::new();
        for m in members {
            let id = ca
                .issue_fleet_relay(m.name, &["localhost".into(), "127.0.0.1".into()])
                .unwrap();
            let rdir = dir.join(m.name);
            std::fs::create_dir_all(&rdir).unwrap();
            id.save(&rdir.join("cert.pem"), &rdir.join("key.pem"))
                .unwrap();
            let link = free_port();
            file += &format!(
                "[[relay]]\nname = \"{}\"\nid = \"{}\"\nagent = \"127.0.0.1:{}\"\nlink = \"127.0.0.1:{link}\"\njurisdiction = \"{}\"\ntrust = {}\n",
                m.name,
                id.relay_id().to_hex(),
                free_port(),
                m.jurisdiction,
                m.trust
            );
            ids.push(id.relay_id());
            configs.push(format!(
                "[tls]\ncert = {:?}\nkey = {:?}\n[link]\nca = {:?}\n[relay]\ncores = 2\n{extra}",
                rdir.join("cert.pem"),
                rdir.join("key.pem"),
                ca_path
            ));
        }
        for (a, b, ms) in links {
            file += &format!("[[link]]\nbetween = [\"{a}\", \"{b}\"]\nlatency_ms = {ms}\n");
        }
        let fleet_file = dir.join("fleet.toml");
        std::fs::write(&fleet_file, &file).unwrap();
        let fleet_arg = fleet_file.to_str().unwrap().to_string();
        let ca_certs = load_certs(&ca_path).unwrap();
        let relays = members
            .iter()
            .zip(&configs)
            .map(|(m, cfg)| start_member(&dir, m.name, &fleet_arg, cfg, &ca_certs))
            .collect();
        Fleet {
            dir,
            names: members.iter().map(|m| m.name).collect(),
            ids,
            relays,
            ca: ca_path,
            configs,
            fleet_file: fleet_arg,
        }
    }

    /// Kills relay `name` with SIGKILL.
    fn kill(&mut self, name: &str) {
        let i = self.index(name);
        if let Some(mut c) = self.relays[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts relay `name` again (after [`Fleet::kill`]), in its data directory.
    fn restart(&mut self, name: &str) {
        let i = self.index(name);
        let ca = self.relays[i].ca.clone();
        self.relays[i].keep_dir = true;
        let r = start_member(&self.dir, name, &self.fleet_file, &self.configs[i], &ca);
        self.relays[i] = r;
    }

    fn relay(&self, name: &str) -> &Relay {
        &self.relays[self.index(name)]
    }

    fn index(&self, name: &str) -> usize {
        self.names.iter().position(|n| *n == name).unwrap()
    }

    fn id(&self, name: &str) -> RelayId {
        self.ids[self.index(name)]
    }

    /// Waits until every relay reports `n` links up in total (each link counts at both ends).
    fn wait_links_up(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let up: f64 = self
                .relays
                .iter()
                .map(|r| r.metric("openmesh_link_up", &[]))
                .sum();
            if up as usize == 2 * n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {} link ends up; logs:\n{}",
                up,
                2 * n,
                self.relays
                    .iter()
                    .map(|r| r.log())
                    .collect::<Vec<_>>()
                    .join("\n----\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Rewrites the fleet file with `change` (which must raise the generation) and sends SIGHUP
    /// to every running relay; returns once `name` applied generation `generation` (and how
    /// long that took).
    fn reload(&self, change: impl Fn(&str) -> String, name: &str, generation: u64) -> Duration {
        let text = std::fs::read_to_string(&self.fleet_file).unwrap();
        std::fs::write(&self.fleet_file, change(&text)).unwrap();
        let t0 = Instant::now();
        for r in self.relays.iter().filter(|r| r.child.is_some()) {
            std::process::Command::new("kill")
                .args(["-HUP", &r.pid().to_string()])
                .status()
                .unwrap();
        }
        let r = self.relay(name);
        while r.metric("openmesh_fleet_generation", &[]) != 2.0 * generation as f64 {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "{name} did not apply the new fleet file:\n{}",
                r.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        t0.elapsed()
    }

    /// Envelopes relay `name` received over its links.
    fn link_in(&self, name: &str) -> f64 {
        self.relay(name)
            .metric("openmesh_link_envelopes_total", &["direction=\"in\""])
    }
}

fn start_member(
    dir: &std::path::Path,
    name: &str,
    fleet_file: &str,
    config: &str,
    ca: &[rustls::pki_types::CertificateDer<'static>],
) -> Relay {
    let mut r = Relay::start_in(
        dir.join(name).join("data"),
        &["--fleet", fleet_file],
        Some(config),
    );
    r.ca = ca.to_vec();
    r
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for r in &mut self.relays {
            if r.child.is_some() {
                r.terminate();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The seed's policy-aware example without the ocean: `ing` (A's relay) and `egr` (B's) are
/// linked through a fast low-trust relay (`cheap`, 1 ms a hop) and through two trusted EU
/// relays (`ams`, `bru`, 5 ms a hop).
fn seed_fleet() -> Fleet {
    Fleet::start(
        &[
            member("ing", "DE", 95),
            member("cheap", "DE", 20),
            member("ams", "NL", 90),
            member("bru", "BE", 85),
            member("egr", "FR", 90),
        ],
        &[
            ("ing", "cheap", 1.0),
            ("cheap", "egr", 1.0),
            ("ing", "ams", 5.0),
            ("ams", "bru", 5.0),
            ("bru", "egr", 5.0),
        ],
    )
}

fn agent_config(relay: &Relay, name: &str) -> ClientConfig {
    let mut c = ClientConfig::new(
        relay.addr,
        relay.ca.clone(),
        Identity::generate_self_signed(name).unwrap(),
    );
    c.server_name = Some("localhost".into());
    c
}

/// Sends `n` envelopes built by `build` from `a` to `to` and returns the answers: ACKed ids
/// count, and the NACK reasons.
async fn send_n(
    a: &mut Session,
    n: u64,
    build: impl Fn(&Session, u64) -> openmesh_dataplane::wire::Envelope,
) -> (u64, Vec<Reason>) {
    for i in 0..n {
        let env = build(a, i);
        a.send(&env).await.unwrap();
    }
    let (mut acked, mut nacks) = (0u64, Vec::new());
    while acked + (nacks.len() as u64) < n {
        match tokio::time::timeout(Duration::from_secs(20), a.next_event()).await {
            Ok(Some(Event::Acked(ids))) => acked += ids.len() as u64,
            Ok(Some(Event::Nacked(nk))) => nacks.push(nk.reason().unwrap()),
            other => panic!("sender got {other:?} after {acked} ACKs"),
        }
    }
    (acked, nacks)
}

/// Receives `n` envelopes in order (payload = sequence number), ACKing each.
async fn receive_n(b: &mut Session, first: u64, n: u64) {
    for want in first..first + n {
        match tokio::time::timeout(Duration::from_secs(20), b.next_event()).await {
            Ok(Some(Event::Envelope(e))) => {
                let got = u64::from_be_bytes(e.payload()[..8].try_into().unwrap());
                assert_eq!(got, want, "out of order or lost");
                b.ack(e.message_id()).await.unwrap();
            }
            other => panic!("receiver got {other:?} waiting for {want}"),
        }
    }
}

/// Agent A on `ing` and agent B on `egr`, once `ing` knows where both are.
async fn agents_on_ing_and_egr(fleet: &Fleet) -> (Session, Session) {
    let b = Session::connect(agent_config(fleet.relay("egr"), "agent-b"))
        .await
        .unwrap();
    let a = Session::connect(agent_config(fleet.relay("ing"), "agent-a"))
        .await
        .unwrap();
    wait_located(fleet.relay("ing"), 2);
    (a, b)
}

/// Waits until relay `r` knows where `n` agents are on every core.
fn wait_located(r: &Relay, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while r.metric("openmesh_fleet_located_agents", &[]) < (2 * n) as f64 {
        assert!(Instant::now() < deadline, "presence did not arrive");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_example_goes_through_trusted_eu_relays_and_not_the_fast_low_trust_one() {
    let fleet = seed_fleet();
    fleet.wait_links_up(5);
    let (mut a, mut b) = agents_on_ing_and_egr(&fleet).await;
    let to = b.id();
    let eu = Jurisdiction::parse("EU").unwrap();

    // "EU only" and "avoid low trust" (at least 50): through ams and bru, though slower.
    let n = 200;
    let recv = tokio::spawn(async move {
        receive_n(&mut b, 0, n).await;
        b
    });
    let (acked, nacks) = send_n(&mut a, n, |a, i| {
        let mut e = a.envelope_to(to, 600_000);
        e.schema = "market/proposal@2.1".into();
        e.constraints.jurisdictions = vec![eu];
        e.constraints.min_trust = 50;
        e.build(&i.to_be_bytes()).unwrap()
    })
    .await;
    assert_eq!((acked, nacks.len()), (n, 0), "{nacks:?}");
    let mut b = recv.await.unwrap();
    assert_eq!(
        fleet.link_in("cheap"),
        0.0,
        "the low-trust relay carried nothing"
    );
    assert_eq!(fleet.link_in("ams"), n as f64);
    assert_eq!(fleet.link_in("bru"), n as f64);
    assert_eq!(fleet.link_in("egr"), n as f64);

    // Without constraints the fastest path is taken: through `cheap`.
    let recv = tokio::spawn(async move {
        receive_n(&mut b, n, 50).await;
        b
    });
    let (acked, _) = send_n(&mut a, 50, |a, i| {
        a.envelope_to(to, 600_000)
            .build(&(n + i).to_be_bytes())
            .unwrap()
    })
    .await;
    assert_eq!(acked, 50);
    let mut b = recv.await.unwrap();
    assert_eq!(fleet.link_in("cheap"), 50.0);

    // "Avoid ams" with "EU only, trust 50": no path qualifies: NACKed at the source.
    let ams = fleet.id("ams");
    let (acked, nacks) = send_n(&mut a, 10, |a, i| {
        let mut e = a.envelope_to(to, 600_000);
        e.constraints.jurisdictions = vec![eu];
        e.constraints.min_trust = 50;
        e.constraints.avoid = vec![ams];
        e.build(&(1000 + i).to_be_bytes()).unwrap()
    })
    .await;
    assert_eq!(acked, 0);
    assert!(
        nacks.iter().all(|r| *r == Reason::NoCompliantPath),
        "{nacks:?}"
    );
    // "Avoid cheap": never crosses it.
    let cheap = fleet.id("cheap");
    let before = fleet.link_in("cheap");
    let recv = tokio::spawn(async move {
        receive_n(&mut b, n + 50, 20).await;
    });
    let (acked, _) = send_n(&mut a, 20, |a, i| {
        let mut e = a.envelope_to(to, 600_000);
        e.constraints.avoid = vec![cheap];
        e.build(&(n + 50 + i).to_be_bytes()).unwrap()
    })
    .await;
    assert_eq!(acked, 20);
    recv.await.unwrap();
    assert_eq!(fleet.link_in("cheap"), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_peer_with_an_agent_or_foreign_certificate_is_refused() {
    let fleet = Fleet::start(
        &[member("one", "DE", 90), member("two", "FR", 90)],
        &[("one", "two", 1.0)],
    );
    fleet.wait_links_up(1);
    let one = fleet.relay("one");
    let link_addr = link_addr_of(one);
    let fleet_ca = load_certs(&fleet.ca).unwrap();
    // An agent certificate of the fleet CA itself, and a relay certificate of another CA.
    let ca = CertAuthority::load(&fleet.ca, &fleet.ca.with_file_name("fleet-ca.key")).unwrap();
    let agent = ca.issue_agent("not-a-relay").unwrap();
    let other = CertAuthority::generate("other CA").unwrap();
    let foreign = other
        .issue_fleet_relay("foreign", &["localhost".into()])
        .unwrap();
    for (what, id) in [("agent certificate", agent), ("foreign CA", foreign)] {
        let refused = try_link(link_addr, &id, &fleet_ca, fleet.id("one")).await;
        assert!(refused, "{what}: link admitted");
    }
    // The real link stays up.
    assert_eq!(one.metric("openmesh_link_up", &[]), 1.0);
    // And the same check admits a fleet relay certificate (relay `two`'s own).
    let two = fleet.dir.join("two");
    let two_id = Identity::load(&two.join("cert.pem"), &two.join("key.pem")).unwrap();
    assert!(
        !try_link(link_addr, &two_id, &fleet_ca, fleet.id("one")).await,
        "a fleet relay's certificate was refused"
    );
}

/// The link address `relay` printed in its ready line (from its log: the ready line is read by
/// the harness), or from the fleet file.
fn link_addr_of(relay: &Relay) -> std::net::SocketAddr {
    let text = std::fs::read_to_string(
        relay
            .dir
            .parent()
            .unwrap()
            .parent()
            .unwrap()
            .join("fleet.toml"),
    )
    .unwrap();
    let name = relay
        .dir
        .parent()
        .unwrap()
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let block = text
        .split("[[relay]]")
        .find(|b| b.contains(&format!("name = \"{name}\"")))
        .unwrap();
    let line = block.lines().find(|l| l.starts_with("link = ")).unwrap();
    line.trim_start_matches("link = ")
        .trim_matches('"')
        .parse()
        .unwrap()
}

/// Opens a TLS link with `id` to `addr` (dialling relay `expected`): true if the relay refused
/// it (the handshake failed or the connection ended without a LINK_HELLO).
async fn try_link(
    addr: std::net::SocketAddr,
    id: &Identity,
    ca: &[rustls::pki_types::CertificateDer<'static>],
    expected: RelayId,
) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut cfg = (*openmesh_dataplane::tls::link_client_config(id, ca).unwrap()).clone();
    cfg.enable_secret_extraction = false;
    let name = rustls::pki_types::ServerName::try_from(openmesh_dataplane::pki::relay_link_name(
        &expected,
    ))
    .unwrap()
    .to_owned();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
    let Ok(mut tls) = connector.connect(name, tcp).await else {
        return true;
    };
    let mut buf = vec![0u8; 4096];
    // TLS 1.3: the server checks the client certificate after the client finished, so a refusal
    // shows as an alert or a closed connection on the first read.
    let _ = tls.write_all(b"").await;
    match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => false,
        Err(_) => panic!("the relay neither answered nor closed"),
    }
}

/// Receives envelopes numbered by their payload until every number below `n` arrived; returns
/// the longest time between two arrivals and how many arrived twice.
async fn receive_all(b: &mut Session, n: u64) -> (Duration, u64) {
    let mut seen = std::collections::HashSet::new();
    let (mut gap, mut dup) = (Duration::ZERO, 0u64);
    let mut last = Instant::now();
    while (seen.len() as u64) < n {
        match tokio::time::timeout(Duration::from_secs(20), b.next_event()).await {
            Ok(Some(Event::Envelope(e))) => {
                gap = gap.max(last.elapsed());
                last = Instant::now();
                let k = u64::from_be_bytes(e.payload()[..8].try_into().unwrap());
                if !seen.insert(k) {
                    dup += 1;
                }
                b.ack(e.message_id()).await.unwrap();
            }
            other => panic!("receiver got {other:?} with {} of {n}", seen.len()),
        }
    }
    (gap, dup)
}

/// `ing` (DE), `mid` (DE) and `egr` (FR) in a line.
fn line_fleet() -> Fleet {
    Fleet::start(
        &[
            member("ing", "DE", 90),
            member("mid", "DE", 90),
            member("egr", "FR", 90),
        ],
        &[("ing", "mid", 1.0), ("mid", "egr", 1.0)],
    )
}

/// `ing` reaches `egr` through `fast` (1 ms a hop) or `slow` (5 ms).
fn two_path_fleet() -> Fleet {
    Fleet::start(
        &[
            member("ing", "DE", 90),
            member("fast", "DE", 90),
            member("slow", "NL", 90),
            member("egr", "FR", 90),
        ],
        &[
            ("ing", "fast", 1.0),
            ("fast", "egr", 1.0),
            ("ing", "slow", 5.0),
            ("slow", "egr", 5.0),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_on_the_path_loses_nothing_acked_and_traffic_moves_within_2_s() {
    let mut fleet = two_path_fleet();
    fleet.wait_links_up(4);
    let (mut a, mut b) = agents_on_ing_and_egr(&fleet).await;
    let to = b.id();
    let n = 20_000u64;
    let recv = tokio::spawn(async move { receive_all(&mut b, n).await });
    // The first half goes while `fast` runs; it is killed with a full window in flight.
    let (first, _, _) = common::send_all(&mut a, to, (0, n / 4), 256).await;
    assert_eq!(first.len() as u64, n / 4);
    let via_fast = fleet.link_in("fast");
    assert!(via_fast > 0.0, "the fast path was not used");
    let sending = tokio::spawn(async move {
        let r = common::send_all(&mut a, to, (n / 4, n - n / 4), 256).await;
        (a, r)
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    fleet.kill("fast");
    let (_a, (rest, _, _)) = sending.await.unwrap();
    assert_eq!(rest.len() as u64, n - n / 4, "every envelope ACKed");
    let (gap, dup) = recv.await.unwrap();
    assert!(
        gap < Duration::from_secs(2),
        "deliveries stopped for {gap:?} when the relay died"
    );
    assert!(fleet.link_in("slow") > 0.0, "nothing went the other way");
    eprintln!("longest gap {gap:?}, {dup} delivered twice, {via_fast} via fast before the kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_compliant_path_envelopes_wait_on_an_allowed_relay_until_it_returns() {
    let mut fleet = line_fleet();
    fleet.wait_links_up(2);
    let (mut a, mut b) = agents_on_ing_and_egr(&fleet).await;
    let to = b.id();
    fleet.kill("mid");
    // Wait until `ing` saw the link go.
    let deadline = Instant::now() + Duration::from_secs(5);
    while fleet.relay("ing").metric("openmesh_link_up", &[]) != 0.0 {
        assert!(Instant::now() < deadline, "ing did not see the link go");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (acked, nacks) = send_n(&mut a, 100, |a, i| {
        a.envelope_to(to, 600_000).build(&i.to_be_bytes()).unwrap()
    })
    .await;
    assert_eq!((acked, nacks.len()), (100, 0), "{nacks:?}");
    assert_eq!(
        fleet
            .relay("ing")
            .metric("openmesh_fleet_waiting_envelopes", &[]),
        100.0
    );
    // Nothing arrives while the path is gone...
    assert!(
        tokio::time::timeout(Duration::from_millis(500), b.next_event())
            .await
            .is_err(),
        "delivered without a path"
    );
    // ...and everything once it is back.
    fleet.restart("mid");
    receive_n(&mut b, 0, 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_disjoint_paths_deliver_once_and_a_trust_drop_or_revocation_takes_a_relay_out() {
    let fleet = seed_fleet();
    fleet.wait_links_up(5);
    let (mut a, mut b) = agents_on_ing_and_egr(&fleet).await;
    let to = b.id();

    // Two node-disjoint paths: one copy through `cheap`, one through `ams` and `bru`; B gets
    // each envelope once, `egr` suppresses the second copy.
    let n = 100;
    let recv = tokio::spawn(async move {
        receive_n(&mut b, 0, n).await;
        let more = tokio::time::timeout(Duration::from_millis(300), b.next_event()).await;
        assert!(more.is_err(), "a copy was delivered twice: {more:?}");
        b
    });
    let (acked, nacks) = send_n(&mut a, n, |a, i| {
        let mut e = a.envelope_to(to, 600_000);
        e.constraints.multipath_k = 2;
        e.build(&i.to_be_bytes()).unwrap()
    })
    .await;
    assert_eq!((acked, nacks.len()), (n, 0), "{nacks:?}");
    let mut b = recv.await.unwrap();
    assert_eq!(fleet.link_in("cheap"), n as f64);
    assert_eq!(fleet.link_in("ams"), n as f64);
    assert_eq!(fleet.link_in("bru"), n as f64);
    assert_eq!(fleet.link_in("egr"), 2.0 * n as f64);
    assert_eq!(
        fleet
            .relay("egr")
            .metric("openmesh_duplicates_suppressed_total", &[]),
        n as f64
    );

    // `cheap`'s trust falls below the at-least-once threshold: new envelopes avoid it at once.
    let took = fleet.reload(
        |t| {
            t.replace(
                "generation = 1",
                "generation = 2\n[thresholds]\nat_least_once = 10",
            )
            .replace("trust = 20", "trust = 5")
        },
        "ing",
        2,
    );
    assert!(took < Duration::from_secs(1), "applied after {took:?}");
    let before = fleet.link_in("cheap");
    let recv = tokio::spawn(async move {
        receive_n(&mut b, n, 50).await;
        b
    });
    let (acked, _) = send_n(&mut a, 50, |a, i| {
        a.envelope_to(to, 600_000)
            .build(&(n + i).to_be_bytes())
            .unwrap()
    })
    .await;
    assert_eq!(acked, 50);
    let _b = recv.await.unwrap();
    assert_eq!(
        fleet.link_in("cheap"),
        before,
        "crossed the distrusted relay"
    );

    // Revoked: its links close.
    fleet.reload(
        |t| t.replace("generation = 2", "generation = 3\nrevoked = [\"cheap\"]"),
        "ing",
        3,
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while fleet.relay("cheap").metric("openmesh_link_up", &[]) != 0.0 {
        assert!(
            Instant::now() < deadline,
            "the revoked relay's links stayed up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        fleet
            .relay("ing")
            .metric("openmesh_link_up", &["peer=\"cheap\""]),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_envelopes_across_relays_are_acked_once_stored_at_the_destinations_relay() {
    let mut fleet = line_fleet();
    fleet.wait_links_up(2);
    let n = 100;
    let b_id = durable_for_b_while_away(&fleet, n).await;
    // Every ACK came after `egr` synced the envelope: kill -9 it and start it again.
    assert_eq!(
        fleet
            .relay("egr")
            .metric("openmesh_store_envelopes_written_total", &[]),
        n as f64
    );
    fleet.kill("egr");
    fleet.restart("egr");
    let mut b = Session::connect(b_on(&fleet, "egr", &b_id)).await.unwrap();
    receive_n(&mut b, 0, n).await;
}

/// Agent B's configuration on relay `relay`, with identity `id`.
fn b_on(fleet: &Fleet, relay: &str, id: &Identity) -> ClientConfig {
    let mut c = agent_config(fleet.relay(relay), "agent-b");
    c.identity = id.clone();
    c
}

/// B attaches to `egr` once (the fleet learns where it is) and leaves; A on `ing` then sends it
/// `n` durable envelopes, every one ACKed. Returns B's identity.
async fn durable_for_b_while_away(fleet: &Fleet, n: u64) -> Identity {
    let b_id = Identity::generate_self_signed("agent-b").unwrap();
    let b = Session::connect(b_on(fleet, "egr", &b_id)).await.unwrap();
    let to = b.id();
    b.close().await.unwrap();
    let mut a = Session::connect(agent_config(fleet.relay("ing"), "agent-a"))
        .await
        .unwrap();
    wait_located(fleet.relay("ing"), 2);
    let (acked, nacks) = send_n(&mut a, n, |a, i| {
        let mut e = a.envelope_to(to, 600_000);
        e.class = openmesh_dataplane::wire::DeliveryClass::Durable;
        e.build(&i.to_be_bytes()).unwrap()
    })
    .await;
    assert_eq!((acked, nacks.len()), (n, 0), "{nacks:?}");
    b_id
}

/// Stored custody follows its agent: durable envelopes stored on `egr` for an agent that is
/// away go to `mid` when the agent turns up there, and `egr` releases their records once `mid`
/// stored them (a restart of `egr` after kill -9 brings none of them back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_envelopes_follow_their_agent_to_another_relay_and_are_released_where_stored() {
    let mut fleet = line_fleet();
    fleet.wait_links_up(2);
    let n = 100;
    let b_id = durable_for_b_while_away(&fleet, n).await;
    let egr = fleet.relay("egr");
    assert_eq!(
        egr.settled_metric("openmesh_store_live_envelopes", &[], n as f64),
        n as f64
    );
    // B turns up on `mid`: what `egr` stored for it follows, and is released there.
    let mut b = Session::connect(b_on(&fleet, "mid", &b_id)).await.unwrap();
    receive_n(&mut b, 0, n).await;
    assert_eq!(
        egr.settled_metric("openmesh_store_live_envelopes", &[], 0.0),
        0.0,
        "egr still holds what it sent on"
    );
    fleet.kill("egr");
    fleet.restart("egr");
    assert_eq!(
        fleet
            .relay("egr")
            .settled_metric("openmesh_store_live_envelopes", &[], 0.0),
        0.0
    );
    // Nothing comes to B a second time.
    let again = tokio::time::timeout(Duration::from_millis(1500), b.next_event()).await;
    assert!(
        !matches!(again, Ok(Some(Event::Envelope(_)))),
        "delivered twice: {again:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_receipts_travel_back_across_relays() {
    let fleet = line_fleet();
    fleet.wait_links_up(2);
    let (mut a, mut b) = agents_on_ing_and_egr(&fleet).await;
    wait_located(fleet.relay("egr"), 2);
    let to = b.id();
    let n = 20u64;
    let mut ids = std::collections::HashSet::new();
    for i in 0..n {
        let mut e = a.envelope_to(to, 600_000);
        e.flags = openmesh_dataplane::wire::flags::RECEIPT_DELIVERED;
        let env = e.build(&i.to_be_bytes()).unwrap();
        ids.insert(env.message_id());
        a.send(&env).await.unwrap();
    }
    receive_n(&mut b, 0, n).await;
    let mut receipts = 0;
    while receipts < n {
        match tokio::time::timeout(Duration::from_secs(10), a.next_event()).await {
            Ok(Some(Event::Receipt(r))) => {
                assert_eq!(r.status, openmesh_dataplane::wire::ReceiptStatus::Delivered);
                assert!(ids.remove(&r.message_id), "a receipt for {}", r.message_id);
                receipts += 1;
            }
            Ok(Some(Event::Acked(_))) => {}
            other => panic!("sender got {other:?} after {receipts} receipts"),
        }
    }
}

/// The load generator, built beside the relay.
fn loadtest_binary() -> PathBuf {
    let relay = std::path::Path::new(env!("CARGO_BIN_EXE_openmesh-relay"));
    let lt = relay.with_file_name("openmesh-loadtest");
    if !lt.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let ok = std::process::Command::new(cargo)
            .args(["build", "-p", "openmesh-loadtest"])
            .status()
            .unwrap()
            .success();
        assert!(ok, "building openmesh-loadtest");
    }
    lt
}

/// `openmesh-loadtest` runs agents on `ing` sending to agents on `egr` while `fast`, the relay
/// on their path, is killed: it counts nothing lost (at-least-once, then durable).
#[test]
fn the_load_generator_counts_nothing_lost_when_the_relay_on_the_path_is_killed() {
    for class in ["at-least-once", "durable"] {
        let mut fleet = two_path_fleet();
        fleet.wait_links_up(4);
        let json = fleet.dir.join(format!("lt-{class}.json"));
        let lt = std::process::Command::new(loadtest_binary())
            .args([
                "run",
                "--scenario",
                "small",
                "--class",
                class,
                "--duration",
                "3s",
            ])
            .args(["--window", "256", "--quiet"])
            .arg("--relay")
            .arg(fleet.relay("ing").addr.to_string())
            .arg("--receive-relay")
            .arg(fleet.relay("egr").addr.to_string())
            .arg("--ca")
            .arg(&fleet.ca)
            .arg("--json")
            .arg(&json)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Receivers connect, presence spreads (0.5 s), then a second of traffic through `fast`.
        std::thread::sleep(Duration::from_millis(1500));
        let via_fast = fleet.link_in("fast");
        fleet.kill("fast");
        let out = lt.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{class}: {text}");
        let report = std::fs::read_to_string(&json).unwrap();
        let field = |name: &str| -> f64 {
            let at = report
                .find(&format!("\"{name}\":"))
                .unwrap_or_else(|| panic!("{name} in {report}"));
            report[at + name.len() + 3..]
                .split([',', '}'])
                .next()
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        assert_eq!(field("lost"), 0.0, "{class}: {text}");
        assert!(field("delivered") > 0.0, "{class}: {text}");
        assert!(
            via_fast > 0.0,
            "{class}: nothing went through the killed relay"
        );
        assert!(
            fleet.link_in("slow") > 0.0,
            "{class}: nothing went the other way"
        );
    }
}

/// New fleet files applied while envelopes flow (the path flips between two relays and back)
/// lose nothing and refuse nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_files_applied_under_traffic_lose_nothing() {
    let fleet = two_path_fleet();
    fleet.wait_links_up(4);
    let (mut a, mut b) = agents_on_ing_and_egr(&fleet).await;
    let to = b.id();
    let n = 20_000u64;
    let recv = tokio::spawn(async move { receive_all(&mut b, n).await });
    let send = tokio::spawn(async move { common::send_all(&mut a, to, (0, n), 256).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // `fast` becomes the slow way, then the fast one again.
    let t = |g: &str, from: &str, to: &str| {
        let (g, from, to) = (g.to_string(), from.to_string(), to.to_string());
        move |text: &str| {
            text.replace(
                &format!("generation = {}", g.parse::<u64>().unwrap() - 1),
                &format!("generation = {g}"),
            )
            .replace(&from, &to)
        }
    };
    fleet.reload(
        t(
            "2",
            "between = [\"ing\", \"fast\"]\nlatency_ms = 1",
            "between = [\"ing\", \"fast\"]\nlatency_ms = 50",
        ),
        "ing",
        2,
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    fleet.reload(
        t(
            "3",
            "between = [\"ing\", \"fast\"]\nlatency_ms = 50",
            "between = [\"ing\", \"fast\"]\nlatency_ms = 1",
        ),
        "ing",
        3,
    );
    let (acked, _, resent) = send.await.unwrap();
    assert_eq!(acked.len() as u64, n);
    assert_eq!(
        resent, 0,
        "envelopes were refused while the snapshot changed"
    );
    let (_, dup) = recv.await.unwrap();
    eprintln!("{dup} delivered twice");
}

/// Presence under attack: identities minted on one relay (each a TLS handshake and a HELLO,
/// then gone) fill every relay's bounded presence table; a full table gives up the oldest
/// entries of the relay that announced the most, so the other relay's agents stay located, a
/// well-behaved pair across the two relays loses nothing, and an agent that attaches after the
/// flood is still found (a table that refused new entries once full would keep its envelopes on
/// the sender's relay for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_minted_on_one_relay_push_out_only_that_relays_presence() {
    const LOCATED: usize = 40;
    const MINTED: usize = 300;
    let fleet = Fleet::start_with(
        &[member("a", "DE", 90), member("b", "FR", 90)],
        &[("a", "b", 1.0)],
        &format!("[limits]\nlocated_agents = {LOCATED}\n"),
    );
    fleet.wait_links_up(1);
    let mut listener = Session::connect(agent_config(fleet.relay("a"), "listener"))
        .await
        .unwrap();
    let mut sender = Session::connect(agent_config(fleet.relay("b"), "sender"))
        .await
        .unwrap();
    wait_located(fleet.relay("b"), 2);
    let to = listener.id();
    // The well-behaved pair, across the two relays, all through the attack.
    let n = 3_000u64;
    let recv = tokio::spawn(async move {
        let r = receive_all(&mut listener, n).await;
        (listener, r)
    });
    let send = tokio::spawn(async move {
        for round in 0..30 {
            let (acked, _, _) = common::send_all(&mut sender, to, (round * 100, 100), 100).await;
            assert_eq!(acked.len(), 100);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        sender
    });
    let b = fleet.relay("b");
    for i in 0..MINTED {
        let c = Session::connect(agent_config(b, &format!("minted-{i}")))
            .await
            .unwrap();
        drop(c);
    }
    let mut sender = send.await.unwrap();
    let (_listener, (_, dup)) = recv.await.unwrap();
    assert_eq!(dup, 0);
    // Every core of both relays is at its bound, and made room.
    for name in ["a", "b"] {
        let r = fleet.relay(name);
        let located = r.metric("openmesh_fleet_located_agents", &[]);
        assert!(located <= (2 * LOCATED) as f64, "{name}: {located} located");
        let evicted = r.metric("openmesh_fleet_located_evicted_total", &[]);
        assert!(evicted > 0.0, "{name} gave nothing up");
    }
    // An agent attaching to `a` after the flood is located on `b` and gets its envelopes.
    let mut late = Session::connect(agent_config(fleet.relay("a"), "late"))
        .await
        .unwrap();
    let late_id = late.id();
    let (acked, _, _) = common::send_all(&mut sender, late_id, (10_000, 20), 20).await;
    assert_eq!(acked.len(), 20);
    let (_, dup) = tokio::time::timeout(Duration::from_secs(10), receive_all(&mut late, 20))
        .await
        .expect("the agent that attached after the flood got nothing: not located");
    assert_eq!(dup, 0);
}

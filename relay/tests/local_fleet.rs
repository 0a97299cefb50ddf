//! `deploy/local-fleet` as a newcomer runs it: five relays on loopback from one command, an
//! agent on `ing` reaching one on `egr` through the trusted EU relays, and `stop` ending them.

use std::process::Command;
use std::time::{Duration, Instant};

use openmesh_agent::session::{Event, Session};
use openmesh_agent::ClientConfig;
use openmesh_dataplane::pki::{load_certs, Identity};
use openmesh_dataplane::wire::Jurisdiction;

fn script(args: &[&str]) -> std::process::Output {
    Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/local-fleet"
    ))
    .args(args)
    .env("OPENMESH_RELAY", env!("CARGO_BIN_EXE_openmesh-relay"))
    .output()
    .unwrap()
}

fn metric(port: u16, name: &str, label: &str) -> f64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_fleet_starts_five_linked_relays_and_stops_them() {
    let dir = std::env::temp_dir().join(format!("om-local-fleet-{}", std::process::id()));
    // Ports outside the ephemeral range the other tests draw from.
    let base = 20_000 + (std::process::id() % 4000) as u16 * 2;
    let d = dir.to_str().unwrap();
    let out = script(&["start", "--dir", d, "--base", &base.to_string()]);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("fleet of 5 relays"), "{text}");
    let stop = Stop(d.to_string());

    let deadline = Instant::now() + Duration::from_secs(20);
    while (0..5u16)
        .map(|i| metric(base + 2000 + i, "openmesh_link_up", "} "))
        .sum::<f64>()
        < 10.0
    {
        assert!(Instant::now() < deadline, "links did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ca = load_certs(&dir.join("fleet-ca/ca.pem")).unwrap();
    let cfg = |port: u16, name: &str| {
        ClientConfig::new(
            format!("127.0.0.1:{port}").parse().unwrap(),
            ca.clone(),
            Identity::generate_self_signed(name).unwrap(),
        )
    };
    let mut bob = Session::connect(cfg(base + 4, "bob")).await.unwrap();
    let mut alice = Session::connect(cfg(base, "alice")).await.unwrap();
    let mut e = alice.envelope_to(bob.id(), 600_000);
    e.constraints.jurisdictions = vec![Jurisdiction::parse("EU").unwrap()];
    e.constraints.min_trust = 50;
    let env = e.build(b"proposal v2.1").unwrap();
    // Until bob's presence reached `ing` the envelope is kept there, then follows him.
    alice.send(&env).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(10), alice.next_event()).await {
        Ok(Some(Event::Acked(_))) => {}
        other => panic!("alice got {other:?}"),
    }
    match tokio::time::timeout(Duration::from_secs(10), bob.next_event()).await {
        Ok(Some(Event::Envelope(got))) => assert_eq!(&got.payload()[..], b"proposal v2.1"),
        other => panic!("bob got {other:?}"),
    }
    assert_eq!(
        metric(
            base + 2001,
            "openmesh_link_envelopes_total",
            "direction=\"in\""
        ),
        0.0
    );
    assert_eq!(
        metric(
            base + 2002,
            "openmesh_link_envelopes_total",
            "direction=\"in\""
        ),
        1.0
    );
    drop(stop);
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", base)).is_err(),
        "a relay still runs after stop"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Stops the fleet when dropped (also when the test fails).
struct Stop(String);

impl Drop for Stop {
    fn drop(&mut self) {
        let _ = script(&["stop", "--dir", &self.0]);
    }
}

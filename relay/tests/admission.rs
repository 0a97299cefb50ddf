//! TLS and admission through the real binary: TLS 1.3 only, the post-quantum hybrid group, CA-only
//! admission, allow and deny lists, handshake timeout, the connection limit, `--check-config`.

mod common;

use std::process::Command;
use std::time::Duration;

use common::Relay;
use openmesh_agent::session::{connect_tls, Session};
use openmesh_agent::ClientError;
use openmesh_dataplane::pki::{CertAuthority, DevPkiPaths};
use openmesh_dataplane::wire::Reason;

#[tokio::test]
async fn links_are_tls13_with_the_hybrid_group_and_tls12_is_refused() {
    let relay = Relay::start(&["--cores", "1"], None);
    let link = connect_tls(&relay.config("pq")).await.unwrap();
    let (_, conn) = link.get_ref();
    assert_eq!(
        conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(
        conn.negotiated_key_exchange_group().map(|g| g.name()),
        Some(rustls::NamedGroup::X25519MLKEM768)
    );
    let d = relay.dir.clone();
    let ok = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "ed25519", "-nodes", "-days", "1", "-subj", "/CN=o",
        ])
        .arg("-keyout")
        .arg(d.join("k.pem"))
        .arg("-out")
        .arg(d.join("c.pem"))
        .output()
        .expect("openssl")
        .status
        .success();
    assert!(ok);
    let s_client = |version: &str| {
        let out = Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &relay.addr.to_string(),
                version,
                "-cert",
            ])
            .arg(d.join("c.pem"))
            .arg("-key")
            .arg(d.join("k.pem"))
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
    };
    let t13 = s_client("-tls1_3");
    assert!(t13.contains("TLSv1.3"), "{t13}");
    assert!(
        t13.contains("CN = openmesh-relay") || t13.contains("CN=openmesh-relay"),
        "{t13}"
    );
    let t12 = s_client("-tls1_2");
    assert!(
        t12.contains("Cipher is (NONE)") || t12.contains("alert"),
        "TLS 1.2 accepted: {t12}"
    );
}

#[tokio::test]
async fn ca_only_admission_with_allow_and_deny_lists() {
    // First start creates the development CA; issue agents from it.
    let relay = Relay::start(&["--cores", "1"], None);
    let paths = DevPkiPaths::under(&relay.dir);
    let ca = CertAuthority::load(&paths.ca_cert, &paths.ca_key).unwrap();
    let issued = ca.issue_agent("issued").unwrap();
    let denied = ca.issue_agent("denied").unwrap();
    let config = format!(
        "[tls]\nadmission = \"ca-only\"\ndeny = [\"{}\"]\n",
        denied.agent_id().to_hex()
    );
    // A second relay in CA-only mode trusting that CA.
    std::fs::create_dir_all(relay.dir.join("second/tls")).unwrap();
    let second_paths = DevPkiPaths::under(&relay.dir.join("second"));
    for (a, b) in [
        (&paths.ca_cert, &second_paths.ca_cert),
        (&paths.ca_key, &second_paths.ca_key),
    ] {
        std::fs::copy(a, b).unwrap();
    }
    let strict = Relay::start_in(relay.dir.join("second"), &["--cores", "1"], Some(&config));

    let mut cfg = strict.config("x");
    cfg.identity = issued;
    let a = Session::connect(cfg)
        .await
        .expect("CA-issued agent admitted");
    assert_eq!(a.welcome().agent_id, a.id());

    let self_signed = Session::connect(strict.config("self-signed")).await;
    assert!(
        self_signed.is_err(),
        "self-signed agent refused in ca-only admission"
    );

    let mut cfg = strict.config("x");
    cfg.identity = denied;
    match Session::connect(cfg).await {
        Err(ClientError::Closed(c)) => assert_eq!(c.reason(), Some(Reason::NotAdmitted)),
        other => panic!("denied agent: {:?}", other.map(|a| a.id())),
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let text = strict.scrape();
    assert_eq!(
        common::metric_in(
            &text,
            "openmesh_handshake_failures_total",
            &["reason=\"not_admitted\""]
        ),
        1.0
    );
    assert_eq!(
        common::metric_in(
            &text,
            "openmesh_handshake_failures_total",
            &["reason=\"protocol_error\""]
        ),
        1.0
    );
    assert_eq!(
        common::metric_in(&text, "openmesh_sessions_active", &[]),
        1.0
    );
}

#[tokio::test]
async fn silent_connections_time_out_and_the_connection_limit_holds() {
    let relay = Relay::start(
        &["--cores", "1"],
        Some("[session]\nhandshake_timeout_ms = 300\n[limits]\nmax_connections_per_core = 3\n"),
    );
    // A TCP connection that never starts TLS is shut down after the handshake timeout.
    let mut idle = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let t0 = std::time::Instant::now();
    let n = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut idle, &mut buf),
    )
    .await
    .expect("closed in time")
    .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(t0.elapsed() >= Duration::from_millis(250));
    // Three agents fit; the fourth connection is closed right after accept.
    let mut keep = Vec::new();
    for i in 0..3 {
        keep.push(relay.agent(&format!("a{i}")).await);
    }
    assert!(Session::connect(relay.config("fourth")).await.is_err());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let text = relay.scrape();
    assert_eq!(
        common::metric_in(
            &text,
            "openmesh_handshake_failures_total",
            &["reason=\"handshake_timeout\""]
        ),
        1.0
    );
    assert_eq!(
        common::metric_in(
            &text,
            "openmesh_handshake_failures_total",
            &["reason=\"too_many_connections\""]
        ),
        1.0
    );
    assert_eq!(
        common::metric_in(&text, "openmesh_sessions_active", &[]),
        3.0
    );
}

#[test]
fn check_config_names_the_bad_field() {
    let dir = std::env::temp_dir().join(format!("om-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[session]\nmax_frame = 12\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_openmesh-relay"))
        .arg("--config")
        .arg(&bad)
        .arg("--check-config")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("session.max_frame"));
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/openmesh-relay.example.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_openmesh-relay"))
        .args(["--config", example, "--check-config"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_deny_list_live_and_keeps_a_bad_file_out() {
    let relay = Relay::start(&["--cores", "2"], Some("[tls]\ndeny = []\n"));
    let a_cfg = relay.config("a");
    let mut a = Session::connect(a_cfg.clone()).await.unwrap();
    let mut b = relay.agent("b").await;
    let hup = || {
        let ok = Command::new("kill")
            .arg("-HUP")
            .arg(relay.pid().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    };
    std::fs::write(
        relay.dir.join("relay.toml"),
        format!("[tls]\ndeny = [\"{}\"]\n", a.id().to_hex()),
    )
    .unwrap();
    hup();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match a.next_event().await {
                Some(openmesh_agent::session::Event::Closed(c)) => return c,
                Some(_) => {}
                None => return None,
            }
        }
    })
    .await
    .expect("denied session closed");
    assert_eq!(closed.and_then(|c| c.reason()), Some(Reason::NotAdmitted));
    match Session::connect(a_cfg).await {
        Err(ClientError::Closed(c)) => assert_eq!(c.reason(), Some(Reason::NotAdmitted)),
        other => panic!("denied agent reconnected: {:?}", other.map(|a| a.id())),
    }
    // A file that does not validate is refused; the relay keeps its settings and serves on.
    std::fs::write(relay.dir.join("relay.toml"), "[session]\nmax_frame = 1\n").unwrap();
    hup();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        relay.log().contains("configuration not reloaded"),
        "{}",
        relay.log()
    );
    let c = relay.agent("c").await;
    c.send(
        &c.envelope_to(b.id(), 10_000)
            .build(b"after reload")
            .unwrap(),
    )
    .await
    .unwrap();
    match tokio::time::timeout(Duration::from_secs(5), b.next_event()).await {
        Ok(Some(openmesh_agent::session::Event::Envelope(e))) => {
            assert_eq!(&e.payload()[..], b"after reload")
        }
        other => panic!("{other:?}"),
    }
}

/// Agents choose their identities, so they choose their home core: sessions moved to a home
/// core that is at its connection limit are closed `too_many_connections`, whichever core
/// accepted them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_limit_holds_for_sessions_moved_to_their_home_core() {
    let relay = Relay::start(
        &["--cores", "2"],
        Some("[limits]\nmax_connections_per_core = 2\n"),
    );
    // Identities whose home is core 0 of 2 (the id's first eight bytes are even).
    let homed: Vec<_> = (1..=255u8)
        .filter_map(|i| {
            let id =
                openmesh_dataplane::pki::Identity::self_signed_from_seed("homed", [i; 32]).unwrap();
            (id.agent_id().0[7] % 2 == 0).then_some(id)
        })
        .take(6)
        .collect();
    let mut admitted = Vec::new();
    let mut refused = 0;
    for id in homed {
        let mut cfg = relay.config("homed");
        cfg.identity = id;
        match Session::connect(cfg).await {
            Ok(a) => admitted.push(a),
            Err(_) => refused += 1,
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let active = relay.metric("openmesh_sessions_active", &[]);
    assert!(active <= 2.0, "sessions on core 0: {active}");
    assert!(refused >= 4, "refused {refused}");
    drop(admitted);
}

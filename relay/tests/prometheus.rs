//! A real Prometheus server (the Debian `prometheus` binary) scrapes a running relay, and its
//! query API returns the envelope counter.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, Relay};
use openmesh_agent::session::Event;

struct Prometheus {
    child: Child,
    dir: std::path::PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

#[tokio::test]
async fn prometheus_scrapes_the_relay_and_sees_envelopes() {
    let relay = Relay::start(&["--cores", "1"], None);
    let a = relay.agent("a").await;
    let mut b = relay.agent("b").await;
    for i in 0..25u32 {
        a.send(
            &a.envelope_to(b.id(), 10_000)
                .build(&i.to_be_bytes())
                .unwrap(),
        )
        .await
        .unwrap();
    }
    for _ in 0..25 {
        match tokio::time::timeout(Duration::from_secs(10), b.next_event()).await {
            Ok(Some(Event::Envelope(e))) => b.ack(e.message_id()).await.unwrap(),
            other => panic!("{other:?}"),
        }
    }

    let dir = relay.dir.join("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: openmesh-relay\n    static_configs:\n      - targets: ['{}']\n",
        relay.metrics
    );
    std::fs::write(dir.join("prometheus.yml"), cfg).unwrap();
    let port = free_port();
    let child = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(dir.join("prometheus.log")).unwrap(),
        ))
        .spawn()
        .expect("the prometheus binary (apt-get install prometheus; .ci/test installs it)");
    let _prom = Prometheus {
        child,
        dir: dir.clone(),
    };

    let query = "/api/v1/query?query=sum%28openmesh_envelopes_received_total%7Bjob%3D%22openmesh-relay%22%7D%29";
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(body) = http_get(port, query) {
            // {"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1.7e9,"25"]}]}}
            if let Some(v) = body.rsplit(",\"").next().and_then(|t| t.split('"').next()) {
                if let Ok(n) = v.parse::<f64>() {
                    if n > 0.0 {
                        assert_eq!(n, 25.0, "Prometheus sees the relay's envelope counter");
                        return;
                    }
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never returned the counter; log:\n{}",
            std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[test]
fn the_shipped_scrape_config_is_valid() {
    let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/prometheus.yml");
    let out = Command::new("promtool")
        .args(["check", "config", cfg])
        .output()
        .expect("promtool (Debian package prometheus; .ci/test installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let dash = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana-dashboard.json"
    ))
    .unwrap();
    for name in [
        "openmesh_envelopes_received_total",
        "openmesh_sessions_active",
        "openmesh_handshake_failures_total",
    ] {
        assert!(dash.contains(name), "the dashboard charts {name}");
    }
}

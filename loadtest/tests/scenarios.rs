//! Every scenario of the real `openmesh-loadtest` binary against a real `openmesh-relay`, briefly:
//! each exits 0 and writes a JSON report with its figures and an SVG plot.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

struct Relay {
    child: Child,
    addr: String,
    metrics: String,
    dir: PathBuf,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn relay_binary() -> PathBuf {
    let loadtest = Path::new(env!("CARGO_BIN_EXE_openmesh-loadtest"));
    let relay = loadtest.with_file_name("openmesh-relay");
    if !relay.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let ok = Command::new(cargo)
            .args(["build", "-p", "openmesh-relay"])
            .status()
            .unwrap()
            .success();
        assert!(ok, "building openmesh-relay");
    }
    relay
}

fn start_relay(name: &str) -> Relay {
    let dir = std::env::temp_dir().join(format!("om-lt-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut child = Command::new(relay_binary())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--cores",
            "2",
            "--metrics",
            &metrics.to_string(),
            "--data-dir",
        ])
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    let mut addr = String::new();
    for line in out.lines().map_while(Result::ok) {
        if let Some(rest) = line.split("agents on ").nth(1) {
            addr = rest.split_whitespace().next().unwrap().to_string();
            break;
        }
    }
    assert!(!addr.is_empty(), "relay printed its ready line");
    Relay {
        child,
        addr,
        metrics: metrics.to_string(),
        dir,
    }
}

fn run(relay: &Relay, name: &str, extra: &[&str]) -> serde_json::Value {
    let json = relay.dir.join(format!("{name}.json"));
    let svg = relay.dir.join(format!("{name}.svg"));
    let out = Command::new(env!("CARGO_BIN_EXE_openmesh-loadtest"))
        .args(["run", "--relay", &relay.addr, "--quiet", "--ca"])
        .arg(relay.dir.join("tls/dev-ca.pem"))
        .arg("--json")
        .arg(&json)
        .arg("--plot")
        .arg(&svg)
        .args(extra)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{name}: {table}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(table.contains("result                 ok"), "{table}");
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(
        plot.contains("<svg") && plot.contains("<polyline"),
        "{name}: plot has a line"
    );
    serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap()
}

#[test]
fn every_scenario_runs_and_reports() {
    let relay = start_relay("all");
    let n = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k} in {v}"));

    let small = run(
        &relay,
        "small",
        &["--scenario", "small", "--duration", "1s"],
    );
    assert!(n(&small, "delivered") > 1000.0);
    assert_eq!(n(&small, "delivered"), n(&small, "acked"));
    assert_eq!(n(&small, "lost"), 0.0);
    assert!(n(&small, "envelopes_per_s") > 0.0);

    let be = run(
        &relay,
        "best-effort",
        &[
            "--scenario",
            "small",
            "--duration",
            "1s",
            "--class",
            "best-effort",
        ],
    );
    assert!(n(&be, "delivered") > 1000.0);
    assert_eq!(n(&be, "duplicates"), 0.0);

    let bulk = run(&relay, "bulk", &["--scenario", "bulk", "--duration", "1s"]);
    assert_eq!(n(&bulk, "size"), 16384.0);
    assert!(n(&bulk, "gbit_per_s") > 0.0);

    let lat = run(
        &relay,
        "latency",
        &[
            "--scenario",
            "latency",
            "--duration",
            "1s",
            "--rate",
            "2000",
        ],
    );
    let p = &lat["latency"];
    assert!(p["p50_us"].as_f64().unwrap() > 0.0);
    assert!(p["p50_us"].as_f64() <= p["p99_us"].as_f64());
    assert!(p["p99_us"].as_f64() <= p["max_us"].as_f64());
    // Open loop at 2000/s for 1 s: about 2000 sends.
    assert!(
        (1800.0..=2200.0).contains(&n(&lat, "sent")),
        "sent {}",
        n(&lat, "sent")
    );
    assert!(!lat["latency_histogram"].as_array().unwrap().is_empty());

    let fan = run(
        &relay,
        "fan",
        &["--scenario", "fan", "--duration", "1s", "--agents", "4"],
    );
    assert_eq!(n(&fan, "agents"), 4.0);
    assert_eq!(n(&fan, "lost"), 0.0);

    let conns = run(
        &relay,
        "connections",
        &[
            "--scenario",
            "connections",
            "--agents",
            "300",
            "--duration",
            "2s",
            "--churn-rate",
            "100",
        ],
    );
    let c = &conns["connections"];
    assert_eq!(c["agents"].as_f64(), Some(300.0));
    assert_eq!(c["failures"].as_f64(), Some(0.0));
    assert!(
        c["relay_rss_per_agent"].as_f64().is_some(),
        "relay found by its port: {c}"
    );
    assert!(c["churn_handshakes_per_s"].as_f64().unwrap() > 10.0);
}

/// The sum of a counter's series on the relay's Prometheus endpoint.
fn counter(relay: &Relay, name: &str) -> f64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(&relay.metrics).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        relay.metrics
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(body.contains("openmesh_"), "metrics: {body}");
    body.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn placement_keeps_a_pair_on_one_relay_core_or_across() {
    let relay = start_relay("placement");
    let crossed = || counter(&relay, "openmesh_mailbox_messages_total");
    let args = |p| {
        [
            "--scenario",
            "small",
            "--duration",
            "1s",
            "--placement",
            p,
            "--relay-cores",
            "2",
        ]
    };
    let one = run(&relay, "one", &args("one"));
    assert!(one["delivered"].as_f64().unwrap() > 1000.0);
    assert_eq!(crossed(), 0.0, "one core: nothing crosses between cores");
    let across = run(&relay, "across", &args("across"));
    let delivered = across["delivered"].as_f64().unwrap();
    assert!(delivered > 1000.0);
    assert!(
        crossed() >= delivered,
        "across: every envelope crosses ({} of {delivered})",
        crossed()
    );
}

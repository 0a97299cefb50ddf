//! Test harness: runs the real `openmesh-relay` binary on free loopback ports with a temporary
//! data directory, waits for its ready line, connects client-library agents, scrapes /metrics,
//! and kills the process when dropped (also when the test fails).

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use openmesh_agent::session::{Event, Session};
use openmesh_agent::ClientConfig;
use openmesh_dataplane::pki::{load_certs, DevPkiPaths, Identity};
use openmesh_dataplane::wire::{AgentId, MessageId, Reason};
use rustls::pki_types::CertificateDer;

/// A loopback port that is free now and that no socket will take by itself: chosen below the
/// kernel's ephemeral range (32768 and up by default), where port-0 binds and outgoing
/// connections draw from, so it stays free until the process it is given to binds it. Ports are
/// handed out in turn from a random start, so one test process never gets the same port twice.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        ^ std::process::id();
    let _ = NEXT.compare_exchange(u32::MAX, start % SPAN, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..SPAN {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in 20000..32000");
}

/// A new temporary data directory's path (not created).
pub fn fresh_dir() -> PathBuf {
    std::env::temp_dir().join(format!(
        "om-test-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ))
}

pub struct Relay {
    pub child: Option<Child>,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
    pub dir: PathBuf,
    pub ca: Vec<CertificateDer<'static>>,
    pub stdout: mpsc::Receiver<String>,
    /// Leave the data directory when dropped (a later relay starts in it).
    pub keep_dir: bool,
}

impl Relay {
    /// Starts a relay with `extra` CLI flags (a `--listen` among them replaces the default
    /// `127.0.0.1:0`) and an optional TOML config body.
    pub fn start(extra: &[&str], config: Option<&str>) -> Relay {
        Self::start_in(fresh_dir(), extra, config)
    }

    /// Starts a relay whose data directory is `dir`.
    pub fn start_in(dir: PathBuf, extra: &[&str], config: Option<&str>) -> Relay {
        Self::start_with_env(dir, extra, config, &[])
    }

    /// Starts a relay whose data directory is `dir`, with environment variables `env` set.
    pub fn start_with_env(
        dir: PathBuf,
        extra: &[&str],
        config: Option<&str>,
        env: &[(&str, &str)],
    ) -> Relay {
        std::fs::create_dir_all(&dir).unwrap();
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_openmesh-relay"));
        // The test build's relay damages envelopes that ask for it (dataplane `shard::fault`).
        cmd.env("OPENMESH_FAULT_INJECTION", "1");
        if !extra.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        cmd.args(["--metrics", &metrics.to_string(), "--data-dir"])
            .arg(&dir)
            .args(extra)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join("relay.log")).unwrap(),
            ));
        if let Some(body) = config {
            let p = dir.join("relay.toml");
            std::fs::write(&p, body).unwrap();
            cmd.arg("--config").arg(p);
        }
        let mut child = cmd.spawn().expect("spawn openmesh-relay");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut relay = Relay {
            child: Some(child),
            addr: "0.0.0.0:0".parse().unwrap(),
            metrics,
            dir,
            ca: Vec::new(),
            stdout: rx,
            keep_dir: false,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let line = relay
                .stdout
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("relay not ready; log:\n{}", relay.log()));
            if let Some(rest) = line.split("agents on ").nth(1) {
                relay.addr = rest.split_whitespace().next().unwrap().parse().unwrap();
                break;
            }
        }
        // A relay on its own certificate (a fleet's) has no development CA.
        relay.ca = load_certs(&DevPkiPaths::under(&relay.dir).ca_cert).unwrap_or_default();
        relay
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Sends `sig` (as `kill` spells it, `-STOP`) to the relay.
    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }

    /// Stops the relay (SIGSTOP) and returns once every thread of it has
    /// stopped: `kill` returns when the signal is sent, and a thread on the
    /// other core runs on until it takes it.
    pub fn pause(&self) {
        self.signal("-STOP");
        let deadline = Instant::now() + Duration::from_secs(5);
        let tasks = format!("/proc/{}/task", self.pid());
        loop {
            let running = std::fs::read_dir(&tasks)
                .map(|dir| {
                    dir.flatten()
                        .filter(|t| {
                            // io_uring's kernel workers do not take stop signals.
                            let comm =
                                std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
                            let stat =
                                std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
                            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
                            !comm.starts_with("iou-") && !state.starts_with(['T', 't'])
                        })
                        .count()
                })
                .unwrap_or(0);
            if running == 0 {
                return;
            }
            assert!(Instant::now() < deadline, "relay did not stop");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Lets a paused relay run again.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("relay.log")).unwrap_or_default()
    }

    pub fn config(&self, name: &str) -> ClientConfig {
        ClientConfig::new(
            self.addr,
            self.ca.clone(),
            Identity::generate_self_signed(name).unwrap(),
        )
    }

    pub async fn agent(&self, name: &str) -> Session {
        Session::connect(self.config(name))
            .await
            .expect("agent connects")
    }

    /// The /metrics text.
    pub fn scrape(&self) -> String {
        let mut s = TcpStream::connect(self.metrics).unwrap();
        write!(s, "GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    }

    /// Sum of every sample of `name` whose labels contain all of `labels` (`k="v"` strings).
    pub fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        metric_in(&self.scrape(), name, labels)
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("relay did not exit after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident set size of the relay, bytes.
    pub fn rss(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kb: u64 = s
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap();
        kb * 1024
    }
}

pub fn metric_in(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{') | Some(b' '))
        })
        .filter(|l| labels.iter().all(|lab| l.contains(lab)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if !std::thread::panicking() {
            if !self.keep_dir {
                let _ = std::fs::remove_dir_all(&self.dir);
            }
        } else {
            eprintln!("relay log kept in {}", self.dir.display());
        }
    }
}

impl Relay {
    /// Kills the relay with SIGKILL (no chance to flush anything) and waits for it; returns its
    /// data directory, which is kept for the next relay.
    pub fn kill9(mut self) -> PathBuf {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.keep_dir = true;
        self.dir.clone()
    }

    /// Sends SIGTERM without waiting.
    pub fn sigterm(&self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status();
    }
}

/// A raw mutual-TLS link for tests that speak frames (or garbage) directly.
pub struct RawLink {
    pub io: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    /// The agent id this link authenticated as.
    pub id: openmesh_dataplane::wire::AgentId,
    rx: bytes::BytesMut,
    dec: openmesh_dataplane::wire::FrameDecoder,
}

impl RawLink {
    pub async fn open(relay: &Relay, name: &str) -> RawLink {
        let cfg = relay.config(name);
        let io = openmesh_agent::session::connect_tls(&cfg).await.unwrap();
        RawLink {
            io,
            id: cfg.identity.agent_id(),
            rx: bytes::BytesMut::new(),
            dec: openmesh_dataplane::wire::FrameDecoder::new(1 << 24),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.io.write_all(bytes).await.unwrap();
        self.io.flush().await.unwrap();
    }

    /// The next frame, or `None` at end of stream (or after 10 s).
    pub async fn next(&mut self) -> Option<openmesh_dataplane::wire::Frame> {
        use tokio::io::AsyncReadExt;
        let fut = async {
            loop {
                if let Some(f) = self
                    .dec
                    .decode(&mut self.rx)
                    .expect("relay sends valid frames")
                {
                    return Some(f);
                }
                match self.io.read_buf(&mut self.rx).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), fut)
            .await
            .ok()
            .flatten()
    }

    /// Reads frames until CLOSE and returns its reason code.
    pub async fn expect_close(&mut self) -> u16 {
        loop {
            match self.next().await {
                Some(openmesh_dataplane::wire::Frame::Close(c)) => return c.code,
                Some(_) => continue,
                None => panic!("link ended without CLOSE"),
            }
        }
    }
}

/// The default HELLO as frame bytes.
pub fn hello_bytes(relay: &Relay) -> Vec<u8> {
    openmesh_dataplane::wire::Frame::Hello(relay.config("x").hello)
        .to_bytes()
        .to_vec()
}

impl Relay {
    /// Polls a metric until it equals `want` (the relay settles asynchronously), for up to 5 s.
    /// Returns the last value read.
    pub fn settled_metric(&self, name: &str, labels: &[&str], want: f64) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let v = self.metric(name, labels);
            if v == want || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A pair exchanging `n` envelopes, sent while the test misbehaves elsewhere.
pub fn well_behaved_pair(relay: &Relay, n: u64) -> tokio::task::JoinHandle<u64> {
    let cfg_a = relay.config("good-a");
    let cfg_b = relay.config("good-b");
    tokio::spawn(async move {
        let mut a = Session::connect(cfg_a).await.unwrap();
        let mut b = Session::connect(cfg_b).await.unwrap();
        let to = b.id();
        let recv = tokio::spawn(async move {
            let mut next = 0u64;
            while next < n {
                match tokio::time::timeout(Duration::from_secs(20), b.next_event()).await {
                    Ok(Some(Event::Envelope(e))) => {
                        assert_eq!(
                            u64::from_be_bytes(e.payload()[..8].try_into().unwrap()),
                            next
                        );
                        next += 1;
                        b.ack(e.message_id()).await.unwrap();
                    }
                    other => panic!("good receiver got {other:?}"),
                }
            }
            next
        });
        let mut acked = 0u64;
        let mut sent = 0u64;
        while acked < n {
            while sent < n && sent - acked < 256 {
                a.send(
                    &a.envelope_to(to, 30_000)
                        .build(&sent.to_be_bytes())
                        .unwrap(),
                )
                .await
                .unwrap();
                sent += 1;
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            match tokio::time::timeout(Duration::from_secs(20), a.next_event()).await {
                Ok(Some(Event::Acked(ids))) => acked += ids.len() as u64,
                other => panic!("good sender got {other:?}"),
            }
        }
        recv.await.unwrap()
    })
}

/// A raw link that completed HELLO/WELCOME.
pub async fn welcomed(relay: &Relay, name: &str) -> RawLink {
    let mut l = RawLink::open(relay, name).await;
    l.send(&hello_bytes(relay)).await;
    match l.next().await {
        Some(openmesh_dataplane::wire::Frame::Welcome(_)) => l,
        other => panic!("expected WELCOME, got {other:?}"),
    }
}

/// Sends `n` at-least-once envelopes from `a` to `to`, numbered `first..first + n` (in the
/// payload and the message id), with at most `window` unanswered, resending those refused with
/// a retryable reason until each is ACKed; returns the ACKed ids, the numbers that were resent,
/// and how many resends there were.
pub async fn send_all(
    a: &mut Session,
    to: AgentId,
    (first, n): (u64, u64),
    window: u64,
) -> (Vec<MessageId>, HashSet<u64>, u64) {
    let mut resent = HashSet::new();
    let mut resent_total = 0u64;
    let mut acked = Vec::with_capacity(n as usize);
    let mut pending: HashMap<MessageId, u64> = HashMap::new();
    let mut next = first;
    let mut retry: Vec<u64> = Vec::new();
    while (acked.len() as u64) < n {
        while (pending.len() as u64) < window && (next < first + n || !retry.is_empty()) {
            let seq = retry.pop().unwrap_or_else(|| {
                next += 1;
                next - 1
            });
            let mut b = a.envelope_to(to, 60_000);
            b.message_id = MessageId::from_u128(seq as u128 | (1u128 << 100));
            let env = b.build(&seq.to_be_bytes()).unwrap();
            pending.insert(env.message_id(), seq);
            a.send(&env).await.unwrap();
        }
        match tokio::time::timeout(Duration::from_secs(20), a.next_event()).await {
            Ok(Some(Event::Acked(ids))) => {
                for id in ids.ids() {
                    if pending.remove(&id).is_some() {
                        acked.push(id);
                    }
                }
            }
            Ok(Some(Event::Nacked(nk))) => {
                let seq = pending
                    .remove(&nk.message_id)
                    .expect("nack for a pending id");
                assert!(
                    nk.reason().is_some_and(Reason::retryable),
                    "unexpected refusal {nk:?}"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
                resent.insert(seq);
                resent_total += 1;
                retry.push(seq);
            }
            Ok(other) => panic!("sender got {other:?}"),
            Err(_) => panic!(
                "sender stalled with {} acked, {} pending",
                acked.len(),
                pending.len()
            ),
        }
    }
    (acked, resent, resent_total)
}

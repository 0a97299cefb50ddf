//! `openmesh-loadtest`: virtual agents that load OpenMesh relays (or a NATS server or an
//! iroh-relay, as baselines) with bounded scenarios, then print a table and write JSON and SVG
//! reports.
//!
//! ```text
//! openmesh-loadtest run --scenario small --relay 127.0.0.1:7400
//! openmesh-loadtest run --scenario latency --rate 20000 --duration 10s --json lat.json --plot lat.svg
//! openmesh-loadtest run --scenario fan --target nats://127.0.0.1:4222
//! openmesh-loadtest run --scenario small --target iroh://127.0.0.1:3340
//! ```

mod iroh;
mod nats;
mod openmesh;
mod payload;
mod report;
mod scenario;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use openmesh_dataplane::pki::load_certs;
use openmesh_dataplane::wire::DeliveryClass;

use report::{Live, Report, SLOT_MS};
use scenario::{PairParams, Scenario};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// OpenMesh load generator.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one scenario and report.
    Run(RunArgs),
}

#[derive(Args, Clone)]
struct RunArgs {
    #[arg(long, value_enum)]
    scenario: Scenario,
    /// Relay agent address; repeat to spread pairs over several relays.
    #[arg(long = "relay", default_value = "127.0.0.1:7400")]
    relays: Vec<SocketAddr>,
    /// Receivers connect here instead (another relay of a fleet: envelopes cross the relay
    /// links between); repeat to spread them.
    #[arg(long = "receive-relay")]
    receive_relays: Vec<SocketAddr>,
    /// Run against a baseline instead: a NATS server (`nats://HOST:PORT`) or an iroh-relay
    /// serving plain HTTP (`iroh://HOST:PORT`, as `iroh-relay --dev` does).
    #[arg(long)]
    target: Option<String>,
    /// CA certificate of the relays.
    #[arg(long, default_value = "openmesh-data/tls/dev-ca.pem")]
    ca: PathBuf,
    /// Delivery class: best-effort, at-least-once, durable.
    #[arg(long, default_value = "at-least-once", value_parser = payload::class_from_str)]
    class: DeliveryClass,
    /// Payload bytes (default: 256, bulk 16384).
    #[arg(long)]
    size: Option<usize>,
    /// Envelopes per second in total (latency default 20000; others: as fast as possible).
    #[arg(long)]
    rate: Option<f64>,
    /// Pairs (fan default 32) or idle agents (connections default 10000).
    #[arg(long)]
    agents: Option<usize>,
    /// How long to send (or ramp), e.g. 10s.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Unacknowledged envelopes per sender.
    #[arg(long)]
    window: Option<u64>,
    /// Connections replaced per second in the churn phase of `connections`.
    #[arg(long, default_value_t = 500.0)]
    churn_rate: f64,
    /// PID of the relay, for its CPU and memory (default: found from the listening port).
    #[arg(long)]
    relay_pid: Option<u32>,
    /// Write every figure and the histogram as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write throughput over time and the latency curve as SVG.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// No live progress line.
    #[arg(long)]
    quiet: bool,
    /// Seal every envelope end to end (OpenMesh relays): receivers publish their key bundles,
    /// senders look them up and seal, receivers open and check each envelope (a rejection
    /// counts as an error). Agents generate keys only with it.
    #[arg(long)]
    e2e: bool,
    /// With `--e2e`: a sender stops carrying its sealing context (1,184 bytes) in each
    /// envelope once a delivery receipt shows the receiver holds it
    /// (`E2eConfig::context_until_receipt`).
    #[arg(long, requires = "e2e")]
    e2e_until_receipt: bool,
    /// Where each pair's sender and receiver live on the relay: `any` (as their fresh
    /// identities fall), `one` (both on one relay core) or `across` (on different cores, every
    /// envelope crossing between them). Identities are drawn until their home cores fit.
    #[arg(long, value_enum, default_value = "any")]
    placement: scenario::Placement,
    /// The relay's cores, for `--placement` (default: this machine's, the relay's own default).
    #[arg(long)]
    relay_cores: Option<u16>,
}

fn main() -> ExitCode {
    let Cmd::Run(args) = Cli::parse().cmd;
    // The generator's own first touches of 2 MiB pages would hold its envelopes for
    // milliseconds and be counted as the relay's latency.
    if let Err(e) = openmesh_dataplane::engine::uring::disable_huge_pages() {
        eprintln!("openmesh-loadtest: cannot turn transparent huge pages off: {e}");
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("openmesh-loadtest: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(args)) {
        Ok(r) => {
            println!("{}", r.table());
            if r.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("openmesh-loadtest: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(a: RunArgs) -> anyhow::Result<Report> {
    openmesh_dataplane::engine::uring::raise_fd_limit();
    let size = a.size.unwrap_or(a.scenario.default_size());
    if size < payload::MIN_PAYLOAD {
        bail!("--size must be at least {} bytes", payload::MIN_PAYLOAD);
    }
    let agents = a.agents.unwrap_or(a.scenario.default_agents()).max(1);
    let rate = match a.scenario {
        Scenario::Latency => Some(a.rate.unwrap_or(20_000.0)),
        _ => a.rate,
    };
    let drain = Duration::from_secs(10);
    let slots = ((a.duration + drain * 2).as_millis() as u64 / SLOT_MS + 64) as usize;
    let live = Arc::new(Live::new(slots));
    let relay_pid = match (&a.target, a.relay_pid) {
        (_, Some(p)) => Some(p),
        (None, None) => report::listener_pid(a.relays[0].port()),
        (Some(url), None) => url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .and_then(report::listener_pid),
    };
    let relay_cpu0 = relay_pid.and_then(report::process_cpu_s);
    let cpu0 = report::own_cpu_s();
    let started_unix_ms = openmesh_agent::unix_ms();
    let progress = progress(&live, a.quiet, a.scenario);

    let relays = match &a.target {
        Some(_) => None,
        None => {
            let ca =
                load_certs(&a.ca).with_context(|| format!("reading --ca {}", a.ca.display()))?;
            Some(Arc::new(openmesh::Relays {
                addrs: a.relays.clone(),
                receive: a.receive_relays.clone(),
                ca,
            }))
        }
    };
    let iroh = match a.target.as_deref().map(|t| t.strip_prefix("iroh://")) {
        Some(Some(addr)) => {
            if a.class == DeliveryClass::Durable {
                bail!("an iroh-relay keeps nothing: --class durable needs OpenMesh relays or NATS");
            }
            Some(Arc::new(iroh::Server::new(addr)?))
        }
        _ => None,
    };
    let (target, endpoints) = match &a.target {
        Some(url) if iroh.is_some() => ("iroh-relay".to_string(), vec![url.clone()]),
        Some(url) => ("nats".to_string(), vec![url.clone()]),
        None => (
            "openmesh".to_string(),
            a.relays.iter().map(|r| r.to_string()).collect(),
        ),
    };

    let mut hist = report::latency_histogram();
    let mut conns = None;
    if a.scenario == Scenario::Connections {
        let Some(relays) = relays.clone() else {
            bail!("the connections scenario runs against OpenMesh relays only")
        };
        conns = Some(
            openmesh::connections(
                relays,
                agents,
                a.duration,
                a.churn_rate,
                relay_pid,
                live.clone(),
            )
            .await?,
        );
    } else {
        let params = PairParams {
            class: a.class,
            size,
            rate: rate.map(|r| r / agents as f64),
            window: a.window.unwrap_or(a.scenario.default_window()),
            duration: a.duration,
            drain,
            backlog: a.scenario == Scenario::Backlog,
            e2e: a.e2e.then(|| openmesh_agent::E2eConfig {
                context_until_receipt: a.e2e_until_receipt,
                ..Default::default()
            }),
            placement: a.placement,
            relay_cores: a.relay_cores.unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map_or(1, |n| n.get().min(u16::MAX as usize) as u16)
            }),
        };
        if a.placement == scenario::Placement::Across && params.relay_cores < 2 {
            bail!("--placement across needs a relay with at least 2 cores (--relay-cores)");
        }
        if params.e2e.is_some() && (params.backlog || a.target.is_some()) {
            bail!(
                "--e2e needs OpenMesh relays and a receiver connected while sending (not backlog)"
            );
        }
        let mut tasks = tokio::task::JoinSet::new();
        for idx in 0..agents {
            let (p, lv) = (params.clone(), live.clone());
            match (&relays, &iroh, &a.target) {
                (Some(r), ..) => tasks.spawn(openmesh::pair(r.clone(), idx, p, lv)),
                (None, _, Some(_)) if p.backlog => {
                    bail!(
                        "the backlog scenario needs a target that keeps messages: OpenMesh relays"
                    )
                }
                (None, Some(server), _) => tasks.spawn(iroh::pair(server.clone(), p, lv)),
                (None, None, Some(url)) => {
                    tasks.spawn(nats::pair(Arc::new(url.clone()), idx, p, lv))
                }
                (None, None, None) => unreachable!("either relays or a target"),
            };
        }
        while let Some(r) = tasks.join_next().await {
            hist.add(r??).ok();
        }
    }
    progress.abort();
    let elapsed = live.start.elapsed().as_secs_f64();
    let send_s = a.duration.as_secs_f64().min(elapsed);

    let g = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let (sent, acked, nacked, delivered, dups, bytes, errors) = (
        g(&live.sent),
        g(&live.acked),
        g(&live.nacked),
        g(&live.delivered),
        g(&live.duplicates),
        g(&live.bytes),
        g(&live.errors),
    );
    let lost = if a.scenario == Scenario::Connections {
        0
    } else if a.class == DeliveryClass::BestEffort || a.target.is_some() {
        sent.saturating_sub(delivered)
    } else {
        acked.saturating_sub(delivered)
    };
    let lat = Report::latency_from(&hist);
    let mut cumulative = 0.0;
    let timeline: Vec<(f64, f64)> = live
        .timeline
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let v = g(s) as f64;
            let t = (i as u64 * SLOT_MS) as f64 / 1000.0;
            if a.scenario == Scenario::Connections {
                cumulative += v;
                (t, cumulative)
            } else {
                (t, v * 1000.0 / SLOT_MS as f64)
            }
        })
        .take_while(|(t, _)| *t <= elapsed + 0.5)
        .collect();
    let class_allows_loss = a.class == DeliveryClass::BestEffort;
    let mut problems = Vec::new();
    if lost > 0 && !class_allows_loss && a.scenario != Scenario::Connections && a.target.is_none() {
        problems.push(format!("{lost} acknowledged envelopes lost"));
    }
    // At-least-once may deliver twice what a sender's agent sent twice, nothing else.
    let sent_again = g(&live.sent_again);
    if dups > sent_again {
        problems.push(format!(
            "{dups} duplicates (only {sent_again} envelopes were sent again)"
        ));
    }
    if errors > 0 {
        problems.push(format!("{errors} errors"));
    }
    if let Some(c) = &conns {
        if c.churn_failures > 0 {
            problems.push(format!("{} churn failures", c.churn_failures));
        }
    }
    let ok = problems.is_empty();
    let report = Report {
        scenario: a.scenario.name().to_string(),
        target,
        endpoints,
        class: match (a.target.is_some(), a.class) {
            _ if iroh.is_some() => "best-effort (iroh-relay datagrams)".into(),
            (true, DeliveryClass::Durable) => "JetStream (file storage, publish acked)".into(),
            (true, _) => "best-effort (core NATS)".into(),
            (false, DeliveryClass::BestEffort) => "best-effort".into(),
            (false, DeliveryClass::AtLeastOnce) => "at-least-once".into(),
            (false, DeliveryClass::Durable) => "durable".into(),
        },
        size,
        rate,
        agents,
        duration_s: send_s,
        started_unix_ms,
        sent,
        acked,
        nacked,
        delivered,
        duplicates: dups,
        sent_again,
        lost,
        envelopes_per_s: match (a.scenario, live.drain_s()) {
            (Scenario::Backlog, Some(d)) => delivered as f64 / d.max(1e-9),
            _ => delivered as f64 / send_s.max(1e-9),
        },
        mb_per_s: bytes as f64 / 1e6 / send_s.max(1e-9),
        gbit_per_s: bytes as f64 * 8.0 / 1e9 / send_s.max(1e-9),
        latency: lat.percentiles,
        latency_curve: lat.curve,
        latency_histogram: lat.histogram,
        timeline,
        connections: conns,
        generator_cpu_s: report::own_cpu_s() - cpu0,
        relay_cpu_s: match (relay_pid.and_then(report::process_cpu_s), relay_cpu0) {
            (Some(b), Some(a0)) => Some(b - a0),
            _ => None,
        },
        ok,
        verdict: if ok {
            "ok".into()
        } else {
            format!("FAILED: {}", problems.join(", "))
        },
    };
    if let Some(p) = &a.json {
        report
            .write_json(p)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &a.plot {
        report
            .plot(p)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(report)
}

/// The live progress line: current rate and errors, redrawn four times a second.
fn progress(live: &Arc<Live>, quiet: bool, scenario: Scenario) -> tokio::task::JoinHandle<()> {
    let live = live.clone();
    tokio::spawn(async move {
        if quiet {
            return;
        }
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        let mut last = 0u64;
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            let d = live.delivered.load(Ordering::Relaxed);
            let e = live.errors.load(Ordering::Relaxed) + live.nacked.load(Ordering::Relaxed);
            let what = if scenario == Scenario::Connections {
                "connected"
            } else {
                "delivered"
            };
            bar.set_message(format!(
                "{what} {d} ({:.0}/s), errors {e}",
                (d - last) as f64 * 4.0
            ));
            bar.tick();
            last = d;
        }
    })
}

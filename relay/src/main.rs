//! `openmesh-relay`: reads the configuration, prepares TLS, installs the Prometheus exporter,
//! starts the dataplane cores, and drains them on SIGTERM.

mod config;
mod fleet;
mod inspect;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use openmesh_dataplane::engine::{Engine, EngineConfig};
use openmesh_dataplane::pki::{self, DevPkiPaths, Identity};
use openmesh_dataplane::policy::AdmissionMode;
use openmesh_dataplane::wire::AgentId;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use config::Config;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// OpenMesh relay: forwards end-to-end encrypted envelopes between agents.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// TOML configuration file (every field optional; see docs/OPERATIONS.md).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
    /// Dataplane cores (overrides relay.cores).
    #[arg(long)]
    cores: Option<usize>,
    /// Agent listen address (overrides relay.listen).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Prometheus listen address (overrides relay.metrics).
    #[arg(long)]
    metrics: Option<std::net::SocketAddr>,
    /// Data directory (overrides relay.data_dir).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Fleet file (docs/FLEET.md): the relay fleet's route snapshot; SIGHUP reads it again.
    #[arg(long)]
    fleet: Option<PathBuf>,
    /// Log format, plain or json (overrides relay.log_format).
    #[arg(long)]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// The durable store, read without starting the relay.
    Store {
        #[command(subcommand)]
        what: StoreCommand,
    },
    /// The relay fleet, read from a fleet file.
    Fleet {
        #[command(subcommand)]
        what: FleetCommand,
    },
}

#[derive(clap::Subcommand, Debug)]
enum FleetCommand {
    /// Creates a fleet CA (ca.pem, ca.key) in a directory.
    Ca {
        /// Directory to write to (created).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issues a relay's certificate (cert.pem, key.pem) from the fleet CA, and prints the
    /// relay id for the fleet file.
    Issue {
        /// Directory of the fleet CA (`fleet ca`).
        #[arg(long)]
        ca: PathBuf,
        /// The relay's name (certificate common name).
        #[arg(long)]
        name: String,
        /// Directory to write the certificate and key to (created).
        #[arg(long)]
        out: PathBuf,
        /// DNS names or IP addresses agents reach the relay by.
        #[arg(long, default_values = ["localhost", "127.0.0.1"])]
        host: Vec<String>,
    },
    /// Validates a fleet file (the first reason it is refused, or a summary and the
    /// low-latency path between every two relays) without starting the relay.
    Check {
        /// The fleet file (docs/FLEET.md).
        file: PathBuf,
    },
}

#[derive(clap::Subcommand, Debug)]
enum StoreCommand {
    /// Prints what is stored for whom (envelopes, bytes, oldest age), the segments and any cut.
    Inspect,
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("openmesh-relay: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(cli: &Cli) -> anyhow::Result<Config> {
    let mut cfg: Config = match &cli.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))?
        }
        None => Config::default(),
    };
    if let Some(c) = cli.cores {
        cfg.relay.cores = c;
    }
    if let Some(a) = cli.listen {
        cfg.relay.listen = a;
    }
    if let Some(a) = cli.metrics {
        cfg.relay.metrics = a;
    }
    if let Some(d) = &cli.data_dir {
        cfg.relay.data_dir = d.clone();
    }
    if let Some(f) = &cli.log_format {
        cfg.relay.log_format = f.clone();
    }
    if let Ok(k) = std::env::var("OPENMESH_TLS_KEY") {
        cfg.tls.key = Some(PathBuf::from(k));
    }
    if let Err(msg) = cfg.validate() {
        bail!("invalid configuration: {msg}");
    }
    Ok(cfg)
}

fn init_logging(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.relay.log_level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    if cfg.relay.log_format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::Fleet {
            what: FleetCommand::Check { file },
        }) => return fleet::check(file),
        Some(Command::Fleet {
            what: FleetCommand::Ca { dir },
        }) => return fleet::make_ca(dir),
        Some(Command::Fleet {
            what:
                FleetCommand::Issue {
                    ca,
                    name,
                    out,
                    host,
                },
        }) => return fleet::issue(ca, name, out, host),
        _ => {}
    }
    let cfg = load(&cli)?;
    if let Some(Command::Store {
        what: StoreCommand::Inspect,
    }) = &cli.command
    {
        return inspect::run(&cfg.relay.data_dir.join("store"));
    }
    if cli.check_config {
        println!("configuration ok");
        return Ok(());
    }
    init_logging(&cfg);
    // Every agent is a file descriptor: take the hard limit.
    let nofile = openmesh_dataplane::engine::uring::raise_fd_limit();
    tracing::info!(nofile, "open file limit (one per agent connection)");
    if !cfg.relay.huge_pages {
        if let Err(e) = openmesh_dataplane::engine::uring::disable_huge_pages() {
            tracing::warn!(error = %e, "cannot turn transparent huge pages off");
        }
    }

    let dev = DevPkiPaths::under(&cfg.relay.data_dir);
    let identity = match (&cfg.tls.cert, &cfg.tls.key) {
        (Some(c), Some(k)) => Identity::load(c, k).context("loading tls.cert / tls.key")?,
        (None, None) => {
            let (id, created) = pki::dev_pki(&dev).context("preparing the development PKI")?;
            let verb = if created { "created" } else { "using" };
            println!("{verb} development CA: {}", dev.ca_cert.display());
            println!("{verb} relay certificate: {}", dev.relay_cert.display());
            id
        }
        _ => bail!("tls.cert and tls.key must be given together"),
    };
    let ca_path = cfg.tls.ca.clone().unwrap_or_else(|| dev.ca_cert.clone());
    let mode = match cfg.tls.admission.as_str() {
        "ca-only" => AdmissionMode::CaOnly,
        _ => AdmissionMode::Open,
    };
    let ca = match mode {
        AdmissionMode::CaOnly => pki::load_certs(&ca_path).context("loading tls.ca")?,
        AdmissionMode::Open => Vec::new(),
    };
    let tls = openmesh_dataplane::tls::server_config(&identity, mode, &ca)?;
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(cfg.relay.metrics)
        .set_buckets(&[
            1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5, 1.0,
        ])?
        .install()
        .with_context(|| format!("starting the metrics exporter on {}", cfg.relay.metrics))?;
    openmesh_dataplane::metrics::describe();

    let cores = match cfg.relay.cores {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        n => n,
    };
    let (mut fleet, first_snapshot) = match &cli.fleet {
        Some(p) => {
            let (f, snap) = fleet::FleetFile::open(p, &cfg.relay.data_dir)?;
            (Some(f), Some(snap))
        }
        None => (None, None),
    };
    let link = match (&first_snapshot, &cfg.link.ca) {
        (Some(snap), Some(ca)) => {
            let link = fleet::link_tls(&identity, ca)?;
            let listen = match cfg.link.listen {
                Some(a) => Some(a),
                None => snap
                    .index(&identity.relay_id())
                    .map(|i| snap.relays[i].link_addr),
            };
            if listen.is_none() {
                tracing::warn!(
                    relay_id = %identity.relay_id().to_hex(),
                    "this relay is not in the fleet file and link.listen is unset: no link listener"
                );
            }
            Some((link, listen))
        }
        (Some(_), None) => {
            tracing::warn!("--fleet without link.ca: the snapshot applies, no relay links");
            None
        }
        _ => None,
    };
    let (link, link_listen) = match link {
        Some((l, a)) => (Some(l), a),
        None => (None, None),
    };
    let engine = Engine::start(EngineConfig {
        listen: cfg.relay.listen,
        cores,
        pin: cfg.relay.pin_cores,
        tls,
        relay_id: identity.relay_id(),
        settings: cfg.settings(mode),
        tick_ms: cfg.relay.tick_ms,
        store: cfg.store(),
        link,
        link_listen,
    })?;
    let store = match cfg.store() {
        Some(s) => format!(
            "store {} ({} envelopes recovered)",
            s.dir.display(),
            engine.recovered()
        ),
        None => "no store (durable class off)".into(),
    };
    let links = match engine.link_addr() {
        Some(a) => format!(", relay links on {a}"),
        None => String::new(),
    };
    println!(
        "openmesh-relay ready: agents on {} (TLS 1.3), metrics on http://{}/metrics, {} cores, {}, relay id {}{}",
        engine.local_addr(),
        cfg.relay.metrics,
        cores,
        store,
        AgentId(identity.public_key()).to_hex(),
        links
    );

    if let Some(snap) = first_snapshot {
        tracing::info!(
            generation = snap.generation,
            relays = snap.relays.len(),
            "fleet snapshot applied"
        );
        engine.apply_fleet(snap);
    }
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    for sig in signals.forever() {
        if sig != SIGHUP {
            tracing::info!(signal = sig, "draining");
            break;
        }
        // SIGHUP: re-read the file; limits, timeouts, the contract for new sessions and the
        // allow/deny lists change live. Addresses, cores, certificates and the admission mode
        // need a restart.
        match load(&cli) {
            Ok(new) => {
                engine.reconfigure(new.settings(mode));
                tracing::info!("configuration reloaded");
            }
            Err(e) => tracing::error!(error = %format!("{e:#}"), "configuration not reloaded"),
        }
        if let Some(f) = &mut fleet {
            match f.reload() {
                Ok(snap) => {
                    engine.apply_fleet(snap);
                    tracing::info!(generation = f.generation, "fleet snapshot applied");
                }
                Err(e) => tracing::error!(
                    error = %format!("{e:#}"),
                    generation = f.generation,
                    "fleet file not reloaded: the snapshot applied stays"
                ),
            }
        }
    }
    engine.drain();
    let deadline = Instant::now() + Duration::from_millis(cfg.session.drain_timeout_ms + 3000);
    while !engine.drained() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let clean = engine.drained();
    engine.shutdown();
    println!(
        "openmesh-relay stopped{}",
        if clean {
            ""
        } else {
            " (drain deadline passed)"
        }
    );
    Ok(())
}

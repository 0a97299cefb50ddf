//! What a run measured: shared live counters, the per-pair delivery tracker, the final report
//! (table, JSON) and its SVG plot.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Width of one timeline slot.
pub const SLOT_MS: u64 = 100;

/// Counters every virtual agent updates while the run goes on.
pub struct Live {
    pub start: Instant,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub nacked: AtomicU64,
    pub delivered: AtomicU64,
    pub duplicates: AtomicU64,
    /// Envelopes the senders' agents sent again (retries of retryable refusals, resends on a
    /// new connection): each may arrive twice.
    pub sent_again: AtomicU64,
    pub bytes: AtomicU64,
    pub errors: AtomicU64,
    /// Delivered envelopes per [`SLOT_MS`] slot since `start` (connected agents, for `connections`).
    pub timeline: Vec<AtomicU64>,
    /// Backlog: when the first receiver connected and when the last one had everything
    /// (run-clock nanoseconds; `u64::MAX` / 0 until then).
    pub drain_from_ns: AtomicU64,
    pub drain_to_ns: AtomicU64,
}

impl Live {
    pub fn new(slots: usize) -> Self {
        Live {
            start: Instant::now(),
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            nacked: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            sent_again: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            timeline: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            drain_from_ns: AtomicU64::new(u64::MAX),
            drain_to_ns: AtomicU64::new(0),
        }
    }

    /// Seconds the backlog took to drain, if a backlog was drained.
    pub fn drain_s(&self) -> Option<f64> {
        let (from, to) = (
            self.drain_from_ns
                .load(std::sync::atomic::Ordering::Relaxed),
            self.drain_to_ns.load(std::sync::atomic::Ordering::Relaxed),
        );
        (from != u64::MAX && to > from).then(|| (to - from) as f64 / 1e9)
    }

    /// Nanoseconds since the run started (the clock every payload timestamp uses).
    pub fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Adds `n` to the timeline slot of `now_ns` (run clock).
    pub fn slot_add(&self, n: u64, now_ns: u64) {
        let i = (now_ns / 1_000_000 / SLOT_MS) as usize;
        if let Some(s) = self.timeline.get(i) {
            s.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// Tracks which sequence numbers of one sender arrived: unique deliveries and duplicates.
#[derive(Default)]
pub struct Seen {
    bits: Vec<u64>,
}

impl Seen {
    /// Records `seq`; returns false if it was seen before.
    pub fn insert(&mut self, seq: u64) -> bool {
        let (w, b) = ((seq / 64) as usize, seq % 64);
        if w >= self.bits.len() {
            self.bits.resize((w + 1).next_power_of_two(), 0);
        }
        let fresh = self.bits[w] & (1 << b) == 0;
        self.bits[w] |= 1 << b;
        fresh
    }
}

/// One-way latency histogram in nanoseconds (1 ns to 60 s, 3 significant digits).
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

#[derive(Serialize, Debug, Clone)]
pub struct Percentiles {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

/// Percentiles, the percentile curve and the raw buckets of a latency histogram.
#[derive(Debug, Default)]
pub struct LatencySummary {
    pub percentiles: Option<Percentiles>,
    pub curve: Vec<(f64, f64)>,
    pub histogram: Vec<(u64, u64)>,
}

#[derive(Serialize, Debug, Clone)]
pub struct ConnectionsReport {
    pub agents: u64,
    pub ramp_s: f64,
    pub handshakes_per_s: f64,
    pub failures: u64,
    pub relay_rss_before: Option<u64>,
    pub relay_rss_after: Option<u64>,
    pub relay_rss_per_agent: Option<f64>,
    pub churn_handshakes_per_s: f64,
    pub churn_failures: u64,
}

#[derive(Serialize, Debug, Clone)]
pub struct Report {
    pub scenario: String,
    pub target: String,
    pub endpoints: Vec<String>,
    pub class: String,
    pub size: usize,
    pub rate: Option<f64>,
    pub agents: usize,
    pub duration_s: f64,
    pub started_unix_ms: u64,
    pub sent: u64,
    pub acked: u64,
    pub nacked: u64,
    pub delivered: u64,
    pub duplicates: u64,
    /// Envelopes sent again by the senders' agents (retries and resends after reconnecting).
    pub sent_again: u64,
    pub lost: u64,
    pub envelopes_per_s: f64,
    pub mb_per_s: f64,
    pub gbit_per_s: f64,
    pub latency: Option<Percentiles>,
    /// (percentile, microseconds) points of the latency distribution.
    pub latency_curve: Vec<(f64, f64)>,
    /// Complete latency histogram: (value_ns, count) for every recorded bucket.
    pub latency_histogram: Vec<(u64, u64)>,
    /// Delivered per second (or connected agents for `connections`), one point per 100 ms slot.
    pub timeline: Vec<(f64, f64)>,
    pub connections: Option<ConnectionsReport>,
    pub generator_cpu_s: f64,
    pub relay_cpu_s: Option<f64>,
    pub ok: bool,
    pub verdict: String,
}

impl Report {
    pub fn latency_from(h: &Histogram<u64>) -> LatencySummary {
        if h.is_empty() {
            return LatencySummary::default();
        }
        let us = |v: u64| v as f64 / 1000.0;
        let p = Percentiles {
            count: h.len(),
            mean_us: h.mean() / 1000.0,
            p50_us: us(h.value_at_quantile(0.5)),
            p90_us: us(h.value_at_quantile(0.9)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        };
        let curve = h
            .iter_quantiles(2)
            .map(|v| (v.quantile_iterated_to() * 100.0, us(v.value_iterated_to())))
            .collect();
        let histogram = h
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect();
        LatencySummary {
            percentiles: Some(p),
            curve,
            histogram,
        }
    }

    /// The final table printed at the end of a run.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let mut row = |k: &str, v: String| t.push_str(&format!("  {k:<22} {v}\n"));
        row(
            "scenario",
            format!(
                "{} against {} ({})",
                self.scenario,
                self.target,
                self.endpoints.join(", ")
            ),
        );
        row("class / size", format!("{} / {} B", self.class, self.size));
        row("agents", self.agents.to_string());
        row("duration", format!("{:.1} s", self.duration_s));
        if let Some(c) = &self.connections {
            row("connected agents", c.agents.to_string());
            row("handshakes/s (ramp)", format!("{:.0}", c.handshakes_per_s));
            row("handshake failures", c.failures.to_string());
            if let Some(r) = c.relay_rss_per_agent {
                row("relay RSS per agent", format!("{:.0} B", r));
            }
            if let Some(r) = c.relay_rss_after {
                row(
                    "relay RSS",
                    format!("{:.1} MiB", r as f64 / (1 << 20) as f64),
                );
            }
            row(
                "churn handshakes/s",
                format!("{:.0}", c.churn_handshakes_per_s),
            );
            row("churn failures", c.churn_failures.to_string());
        } else {
            row(
                "sent / acked / nacked",
                format!("{} / {} / {}", self.sent, self.acked, self.nacked),
            );
            row("delivered", self.delivered.to_string());
            row(
                "lost / duplicated",
                format!("{} / {}", self.lost, self.duplicates),
            );
            row("sent again", self.sent_again.to_string());
            row("envelopes/s", format!("{:.0}", self.envelopes_per_s));
            row(
                "throughput",
                format!("{:.1} MB/s ({:.2} Gbit/s)", self.mb_per_s, self.gbit_per_s),
            );
        }
        if let Some(l) = &self.latency {
            row(
                "latency (us)",
                format!(
                    "p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
                    l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us
                ),
            );
        }
        row("generator CPU", format!("{:.2} s", self.generator_cpu_s));
        if let Some(c) = self.relay_cpu_s {
            row("relay CPU", format!("{c:.2} s"));
        }
        row("result", self.verdict.clone());
        t
    }

    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(path, serde_json::to_vec_pretty(self)?)?;
        Ok(())
    }

    /// Throughput (or connected agents) over time, and the latency percentile curve.
    pub fn plot(&self, path: &Path) -> anyhow::Result<()> {
        use plotters::prelude::*;
        let root = SVGBackend::new(path, (1000, 800)).into_drawing_area();
        root.fill(&WHITE)?;
        let (top, bottom) = root.split_vertically(400);
        let ylabel = if self.connections.is_some() {
            "connected agents"
        } else {
            "delivered envelopes/s"
        };
        let tmax = self.timeline.last().map_or(1.0, |p| p.0).max(1.0);
        let ymax = self.timeline.iter().map(|p| p.1).fold(1.0, f64::max) * 1.1;
        let mut c = ChartBuilder::on(&top)
            .caption(
                format!("{} / {}: {}", self.scenario, self.target, ylabel),
                ("sans-serif", 22),
            )
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(80)
            .build_cartesian_2d(0.0..tmax, 0.0..ymax)?;
        c.configure_mesh()
            .x_desc("seconds")
            .y_desc(ylabel)
            .y_label_formatter(&|v| format!("{v:.0}"))
            .draw()?;
        c.draw_series(LineSeries::new(self.timeline.iter().copied(), &BLUE))?;
        if self.latency_curve.is_empty() {
            bottom.titled("no latency recorded in this scenario", ("sans-serif", 18))?;
        } else {
            // x: "nines" (0 = p0, 1 = p90, 2 = p99, 3 = p99.9 ...), y: microseconds (log).
            let nines = |p: f64| -((1.0 - p / 100.0).max(1e-6)).log10();
            let pts: Vec<(f64, f64)> = self
                .latency_curve
                .iter()
                .map(|(p, us)| (nines(*p), us.max(0.1)))
                .collect();
            let xmax = pts.iter().map(|p| p.0).fold(1.0, f64::max);
            let ymax = pts.iter().map(|p| p.1).fold(1.0, f64::max) * 2.0;
            let ymin = pts.iter().map(|p| p.1).fold(f64::MAX, f64::min) / 2.0;
            let mut c = ChartBuilder::on(&bottom)
                .caption(
                    if self.rate.is_some() {
                        "one-way latency by percentile (open loop, from the scheduled send time)"
                    } else {
                        "one-way latency by percentile (closed loop: includes queueing behind the window)"
                    },
                    ("sans-serif", 20),
                )
                .margin(15)
                .x_label_area_size(40)
                .y_label_area_size(80)
                .build_cartesian_2d(0.0..xmax, (ymin..ymax).log_scale())?;
            c.configure_mesh()
                .x_desc("percentile")
                .y_desc("microseconds")
                .x_label_formatter(&|x| {
                    let v = format!("{:.4}", 100.0 - 100.0 * 10f64.powf(-x));
                    format!("p{}", v.trim_end_matches('0').trim_end_matches('.'))
                })
                .y_label_formatter(&|v| format!("{v:.0}"))
                .draw()?;
            c.draw_series(LineSeries::new(pts, &RED))?;
        }
        root.present()?;
        Ok(())
    }
}

/// CPU seconds (user + system) this process used so far.
pub fn own_cpu_s() -> f64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    #[allow(unsafe_code)]
    // SAFETY: getrusage writes a complete rusage into the pointer it is given.
    let ru = unsafe {
        if libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) != 0 {
            return 0.0;
        }
        ru.assume_init()
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU seconds (user + system) of another process, from /proc.
pub fn process_cpu_s(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    #[allow(unsafe_code)]
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz.max(1.0))
}

/// Resident set size of a process, bytes.
pub fn process_rss(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// The process listening on a local TCP port (Linux: /proc/net/tcp{,6} inode, then /proc/*/fd).
pub fn listener_pid(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(t) = std::fs::read_to_string(f) else {
            continue;
        };
        for l in t.lines().skip(1) {
            let c: Vec<&str> = l.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) = (c.get(1), c.get(3), c.get(9)) else {
                continue;
            };
            let p = local
                .rsplit(':')
                .next()
                .and_then(|h| u16::from_str_radix(h, 16).ok());
            if p == Some(port) && *state == "0A" {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(e.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                if inodes.iter().any(|i| target.to_str() == Some(i.as_str())) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

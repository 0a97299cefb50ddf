//! The fleet file: `--fleet FILE` at start and on SIGHUP (the last good snapshot kept under the
//! data directory for a start whose file is bad), and `openmesh-relay fleet check FILE`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use openmesh_dataplane::fleet::snapshot::Snapshot;
use openmesh_dataplane::fleet::{file, path};

/// A relay's fleet file and the copy of the last one it applied.
pub struct FleetFile {
    path: PathBuf,
    last_good: PathBuf,
    /// Generation applied.
    pub generation: u64,
}

fn read(p: &Path) -> anyhow::Result<(String, Snapshot)> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    let snap = file::parse(&text).with_context(|| format!("fleet file {} refused", p.display()))?;
    Ok((text, snap))
}

impl FleetFile {
    /// Loads `path` at start. A file that is refused falls back to the last good snapshot under
    /// `data_dir` (logged); with none, the start fails with the file's reason.
    pub fn open(path: &Path, data_dir: &Path) -> anyhow::Result<(FleetFile, Arc<Snapshot>)> {
        let mut f = FleetFile {
            path: path.to_path_buf(),
            last_good: data_dir.join("fleet").join("last-good.toml"),
            generation: 0,
        };
        let good = f
            .last_good
            .exists()
            .then(|| read(&f.last_good).map(|(_, s)| s));
        let snap = match (read(path), good) {
            (Ok((_, snap)), Some(Ok(good))) if good.generation > snap.generation => {
                // As on SIGHUP, an older snapshot does not replace a newer one.
                tracing::error!(
                    file_generation = snap.generation,
                    generation = good.generation,
                    last_good = %f.last_good.display(),
                    "fleet file older than the last good snapshot: running on the last good one"
                );
                good
            }
            (Ok((text, snap)), _) => {
                f.keep(&text)?;
                snap
            }
            (Err(e), Some(good)) => {
                let good = good?;
                tracing::error!(
                    error = %format!("{e:#}"),
                    generation = good.generation,
                    last_good = %f.last_good.display(),
                    "fleet file refused: running on the last good snapshot"
                );
                good
            }
            (Err(e), None) => return Err(e),
        };
        f.generation = snap.generation;
        Ok((f, Arc::new(snap)))
    }

    /// Reads the file again (SIGHUP): the new snapshot if it is valid and newer.
    pub fn reload(&mut self) -> anyhow::Result<Arc<Snapshot>> {
        let (text, snap) = read(&self.path)?;
        anyhow::ensure!(
            snap.generation > self.generation,
            "fleet file {}: generation {} is not newer than the {} applied",
            self.path.display(),
            snap.generation,
            self.generation
        );
        self.keep(&text)?;
        self.generation = snap.generation;
        Ok(Arc::new(snap))
    }

    /// Writes `text` as the last good snapshot (a whole file or the previous one).
    fn keep(&self, text: &str) -> anyhow::Result<()> {
        let dir = self.last_good.parent().expect("under the data directory");
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join("last-good.toml.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.last_good)?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    }
}

/// Largest fleet whose paths `fleet check` lists (one route per ordered pair).
const LIST_PATHS_UP_TO: usize = 40;

pub fn check(p: &Path) -> anyhow::Result<()> {
    let (_, snap) = read(p)?;
    // Written with errors returned, not panics (a closed pipe ends the listing).
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "fleet file ok: generation {}, {} relays, {} links, {} blocs, {} policies, {} revoked",
        snap.generation,
        snap.relays.len(),
        snap.links.len(),
        snap.blocs.len(),
        snap.policies.len(),
        snap.revoked.len()
    )?;
    for r in &snap.relays {
        writeln!(
            out,
            "relay {:<12} {} trust {:>3}  agents {}  links {}{}",
            r.name,
            r.jurisdiction.as_str(),
            r.trust,
            r.agent_addr,
            r.link_addr,
            if snap.revoked.contains(&r.id) {
                "  REVOKED"
            } else {
                ""
            }
        )?;
    }
    if snap.relays.len() > LIST_PATHS_UP_TO {
        writeln!(
            out,
            "(paths between every two relays are listed for fleets of up to {LIST_PATHS_UP_TO} relays)"
        )?;
        return Ok(());
    }
    let g = path::Graph::new(&snap);
    let all = path::AllUp(&snap);
    let c = path::Constraints::default();
    writeln!(out, "low-latency paths (no envelope constraints):")?;
    for (a, ra) in snap.relays.iter().enumerate() {
        for (b, rb) in snap.relays.iter().enumerate() {
            if a == b {
                continue;
            }
            match g.route(&all, a, b, &c) {
                Ok(r) => writeln!(
                    out,
                    "  {} -> {}: {} ({} us)",
                    ra.name,
                    rb.name,
                    r.paths[0]
                        .iter()
                        .map(|i| snap.relays[*i].name.as_str())
                        .collect::<Vec<_>>()
                        .join(" > "),
                    r.weight
                )?,
                Err(e) => writeln!(out, "  {} -> {}: {e}", ra.name, rb.name)?,
            }
        }
    }
    Ok(())
}

/// `fleet ca`: a new fleet CA in `dir`.
pub fn make_ca(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
    anyhow::ensure!(
        !cert.exists() && !key.exists(),
        "{} already holds a fleet CA",
        dir.display()
    );
    let ca = openmesh_dataplane::pki::CertAuthority::generate("OpenMesh fleet CA")?;
    ca.save(&cert, &key)?;
    println!("fleet CA: {} (key {})", cert.display(), key.display());
    Ok(())
}

/// `fleet issue`: a relay certificate from the fleet CA in `ca`, written to `out`.
pub fn issue(ca: &Path, name: &str, out: &Path, hosts: &[String]) -> anyhow::Result<()> {
    let ca = openmesh_dataplane::pki::CertAuthority::load(&ca.join("ca.pem"), &ca.join("ca.key"))
        .context("loading the fleet CA (ca.pem, ca.key)")?;
    let id = ca.issue_fleet_relay(name, hosts)?;
    std::fs::create_dir_all(out)?;
    id.save(&out.join("cert.pem"), &out.join("key.pem"))?;
    println!(
        "relay {name}: {} (key {}), relay id {}",
        out.join("cert.pem").display(),
        out.join("key.pem").display(),
        id.relay_id().to_hex()
    );
    Ok(())
}

/// TLS of relay links: this relay's identity (which must be a fleet relay certificate) and the
/// fleet CA.
pub fn link_tls(
    identity: &openmesh_dataplane::pki::Identity,
    ca: &Path,
) -> anyhow::Result<openmesh_dataplane::shard::LinkTls> {
    let leaf = identity
        .chain
        .first()
        .context("tls.cert holds no certificate")?;
    anyhow::ensure!(
        openmesh_dataplane::pki::has_relay_role(leaf),
        "tls.cert is not a fleet relay certificate (no relay role marker; see `openmesh-relay fleet issue`)"
    );
    let ca = openmesh_dataplane::pki::load_certs(ca).context("loading link.ca")?;
    Ok(openmesh_dataplane::shard::LinkTls {
        server: openmesh_dataplane::tls::link_server_config(identity, &ca)?,
        client: openmesh_dataplane::tls::link_client_config(identity, &ca)?,
    })
}

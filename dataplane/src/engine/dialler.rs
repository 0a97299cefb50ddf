//! The link dialler: one thread, off the forwarding cores, that keeps this relay's outbound
//! relay links connected.
//!
//! Of two linked relays the one with the smaller id dials (both know which without asking).
//! For every such link of the applied snapshot that is not up, the dialler connects with a
//! timeout (each connect on a short-lived thread of its own, so a peer that does not answer
//! delays no other link) and hands the socket to the core that owns the link ([`crate::shard::link_core`]),
//! which runs the TLS handshake and LINK_HELLO. A link that does not come up, or goes down, is
//! dialled again after a backoff that doubles from 100 ms to 5 s (reset once it is up). The
//! cores report links up and down through [`LinkBoard`].

use std::collections::HashMap;
use std::net::TcpStream;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::mailbox::CoreMsg;
use super::Shared;
use crate::fleet::snapshot::Snapshot;
use crate::wire::RelayId;

/// How long one connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A dialled link that is not up after this long is dialled again (longer than the link
/// handshake timeout, so a slow handshake is not doubled by a second link).
const UP_TIMEOUT: Duration = Duration::from_secs(12);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often the dialler looks at the links.
const PERIOD: Duration = Duration::from_millis(50);

/// Which links are up (written by the cores), and the snapshot to dial by.
#[derive(Default)]
pub(crate) struct LinkBoard {
    pub(crate) up: Mutex<HashMap<RelayId, bool>>,
    pub(crate) snapshot: Mutex<Option<Arc<Snapshot>>>,
}

struct Peer {
    next_try: Instant,
    backoff: Duration,
    /// Dialled at, while the link is not up yet.
    dialled: Option<Instant>,
    /// A connect is in progress (on a thread of its own).
    connecting: bool,
    was_up: bool,
}

/// Runs until the engine drains.
pub(crate) fn run(me: RelayId, cores: u16, shared: Arc<Shared>) {
    let mut peers: HashMap<RelayId, Peer> = HashMap::new();
    // Connects run on threads of their own (one per link being dialled, each at most
    // CONNECT_TIMEOUT), so that a peer that does not answer delays no other link.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<(RelayId, std::io::Result<OwnedFd>)>();
    while !shared.draining.load(Ordering::SeqCst) {
        std::thread::sleep(PERIOD);
        while let Ok((peer, res)) = done_rx.try_recv() {
            let Some(p) = peers.get_mut(&peer) else {
                continue;
            };
            p.connecting = false;
            let now = Instant::now();
            match res {
                Ok(fd) => {
                    p.dialled = Some(now);
                    p.next_try = now + p.backoff;
                    p.backoff = (p.backoff * 2).min(BACKOFF_MAX);
                    let core = crate::shard::link_core(&peer, cores);
                    shared.mailboxes[core as usize].push_blocking(CoreMsg::Dial {
                        peer,
                        socket: Some(fd),
                    });
                }
                Err(e) => {
                    tracing::debug!(peer = %peer.to_hex(), error = %e, "link dial failed");
                    p.next_try = now + p.backoff;
                    p.backoff = (p.backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
        let snap = shared
            .links
            .snapshot
            .lock()
            .map(|s| s.clone())
            .ok()
            .flatten();
        let Some(snap) = snap else { continue };
        let Some(mi) = snap.index(&me) else { continue };
        if snap.revoked.contains(&me) {
            // A revoked relay has no links.
            peers.clear();
            continue;
        }
        let up = shared
            .links
            .up
            .lock()
            .map(|u| u.clone())
            .unwrap_or_default();
        let now = Instant::now();
        let mine: Vec<(RelayId, std::net::SocketAddr)> = snap
            .links
            .iter()
            .filter_map(|l| match (l.a == mi, l.b == mi) {
                (true, _) => Some(l.b),
                (_, true) => Some(l.a),
                _ => None,
            })
            .map(|p| &snap.relays[p])
            .filter(|r| me.0 < r.id.0 && !snap.revoked.contains(&r.id))
            .map(|r| (r.id, r.link_addr))
            .collect();
        peers.retain(|id, _| mine.iter().any(|(p, _)| p == id));
        for (peer, addr) in mine {
            let p = peers.entry(peer).or_insert(Peer {
                next_try: now,
                backoff: BACKOFF_MIN,
                dialled: None,
                connecting: false,
                was_up: false,
            });
            if up.get(&peer).copied().unwrap_or(false) {
                p.was_up = true;
                p.dialled = None;
                p.backoff = BACKOFF_MIN;
                continue;
            }
            if std::mem::take(&mut p.was_up) {
                // It went down: dial again at once.
                p.next_try = now;
                p.dialled = None;
            }
            if p.connecting
                || p.dialled
                    .is_some_and(|t| now.duration_since(t) < UP_TIMEOUT)
                || now < p.next_try
            {
                continue;
            }
            p.dialled = None;
            p.connecting = true;
            let done = done_tx.clone();
            let spawned = std::thread::Builder::new()
                .name("om-dial".into())
                .spawn(move || {
                    let _ = done.send((peer, connect(addr)));
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start a link dial");
                p.connecting = false;
                p.next_try = now + p.backoff;
            }
        }
    }
}

fn connect(addr: std::net::SocketAddr) -> std::io::Result<OwnedFd> {
    let s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_nonblocking(true)?;
    Ok(OwnedFd::from(s))
}

//! One core's I/O: its io_uring runtime, listener, sockets, tasks and clock, around its shard.
//!
//! This is the only place (with `uring.rs`) that awaits. Every task does the same: an operation
//! completes, the task calls the shard with the time ([`now`]), then [`Core::drive`] carries out
//! what the shard asked for (wake a writer or a parked reader, shut a socket down) and moves its
//! outbox into the mailboxes. Nothing here decides anything about envelopes or sessions.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use super::mailbox::{self, CoreMsg};
use super::uring::{self, Listener, Stream};
use super::{now_us, unix_ms, EngineConfig, Shared};
use crate::shard::msg::ConnId;
use crate::shard::{Action, Now, ReadGate, Shard, ShardConfig};

/// The socket and wake-ups of one connection.
struct ConnIo {
    stream: Stream,
    wake_writer: Notify,
    wake_reader: Notify,
}

/// Longest an exiting core waits for its store to finish.
const STORE_EXIT_US: u64 = 5_000_000;

struct Core {
    id: u16,
    shard: RefCell<Shard>,
    io: RefCell<HashMap<ConnId, Rc<ConnIo>, foldhash::fast::RandomState>>,
    listener: Listener,
    link_listener: Option<Listener>,
    shared: Arc<Shared>,
    cfg: Arc<EngineConfig>,
    drain_reported: Cell<bool>,
    /// Wake the store tasks (main: writes and syncs; side: segments created ahead, removed).
    store_wake: Notify,
    store_side_wake: Notify,
    /// ACKs or verdicts are held where none were ([`Action::Held`]).
    held_wake: Notify,
}

thread_local! {
    /// Unix milliseconds minus monotonic milliseconds, re-read from the wall clock every tick,
    /// so that [`now`] reads one clock (the monotonic one) per event.
    static UNIX_OFFSET_MS: Cell<u64> = const { Cell::new(0) };
}

/// Re-reads the wall clock's offset from the monotonic clock.
fn sync_unix_offset() {
    let offset = unix_ms().saturating_sub(now_us() / 1000);
    UNIX_OFFSET_MS.with(|o| o.set(offset));
}

/// The time now, for the shard.
fn now() -> Now {
    let mono_us = now_us();
    Now {
        mono_us,
        unix_ms: mono_us / 1000 + UNIX_OFFSET_MS.with(Cell::get),
    }
}

/// Runs core `id` until it receives `Exit`.
pub(crate) fn run(
    id: u16,
    ncores: u16,
    cfg: Arc<EngineConfig>,
    shared: Arc<Shared>,
    (listener, link_listener): (std::net::TcpListener, Option<std::net::TcpListener>),
    store: Option<crate::shard::ShardStore>,
) {
    uring::run(4096, async move {
        sync_unix_offset();
        let mut shard = Shard::new(
            id,
            ncores,
            ShardConfig {
                tls: cfg.tls.clone(),
                relay_id: cfg.relay_id,
                link: cfg.link.clone(),
                agents: shared.agents.clone(),
            },
            cfg.settings.clone(),
            shared.seq.clone(),
            shared.budget.clone(),
        );
        let has_store = store.is_some();
        if let Some(s) = store {
            shard.attach_store(s);
        }
        let core = Rc::new(Core {
            id,
            shard: RefCell::new(shard),
            io: RefCell::new(HashMap::default()),
            listener: Listener::from_std(listener),
            link_listener: link_listener.map(Listener::from_std),
            shared,
            cfg,
            drain_reported: Cell::new(false),
            store_wake: Notify::new(),
            store_side_wake: Notify::new(),
            held_wake: Notify::new(),
        });
        if let (true, Some(sc)) = (has_store, core.cfg.store.as_ref()) {
            let files = Rc::new(uring::StoreFiles::new(sc.dir.clone(), id));
            uring::spawn(store_loop(core.clone(), files.clone(), false));
            uring::spawn(store_loop(core.clone(), files, true));
        }
        uring::spawn(accept_loop(core.clone(), false));
        if core.link_listener.is_some() {
            uring::spawn(accept_loop(core.clone(), true));
        }
        uring::spawn(tick_loop(core.clone()));
        uring::spawn(held_loop(core.clone()));
        tracing::debug!(core = id, "core running");
        core.clone().mailbox_loop().await;
    });
}

/// Accepts agents, or with `links` other relays on the link port.
async fn accept_loop(core: Rc<Core>, links: bool) {
    let listener = match (links, &core.link_listener) {
        (false, _) => &core.listener,
        (true, Some(l)) => l,
        (true, None) => return,
    };
    loop {
        let accepted = listener.accept().await;
        if core.shard.borrow().is_draining() {
            return;
        }
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(core = core.id, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let opened = if links {
            core.shard.borrow_mut().open_link(now())
        } else {
            core.shard.borrow_mut().open(now())
        };
        let Some(id) = opened else {
            stream.shutdown();
            continue;
        };
        core.serve(id, stream);
    }
}

async fn tick_loop(core: Rc<Core>) {
    let tick = Duration::from_millis(core.cfg.tick_ms.max(1));
    loop {
        tokio::time::sleep(tick).await;
        sync_unix_offset();
        core.shard.borrow_mut().on_tick(now());
        core.drive();
        if core.shard.borrow().drained() && !core.drain_reported.replace(true) {
            core.shared.drained.fetch_add(1, Ordering::SeqCst);
            tracing::info!(core = core.id, "drained");
        }
    }
}

/// Wakes the writers of held ACKs and sends held verdicts when they are due (a timer only
/// while something is held).
async fn held_loop(core: Rc<Core>) {
    loop {
        let due = core.shard.borrow().held_due();
        let Some(due) = due else {
            core.held_wake.notified().await;
            continue;
        };
        let wait = due.saturating_sub(now_us());
        if wait > 0 {
            tokio::time::sleep(Duration::from_micros(wait)).await;
        }
        core.shard.borrow_mut().flush_held(now());
        core.drive();
    }
}

/// Carries out the store's operations, one at a time, as the shard hands them out: the main
/// ones (create on demand, write, sync) or, with `side`, the side ones (segments created
/// ahead, removed, records read back for compaction).
async fn store_loop(core: Rc<Core>, files: Rc<uring::StoreFiles>, side: bool) {
    loop {
        let next = if side {
            core.shard.borrow_mut().poll_store_side(now())
        } else {
            core.shard.borrow_mut().poll_store(now())
        };
        let Some(op) = next else {
            let wake = if side {
                &core.store_side_wake
            } else {
                &core.store_wake
            };
            wake.notified().await;
            continue;
        };
        let res = files.run(&op).await;
        let mut shard = core.shard.borrow_mut();
        if side {
            shard.on_store_side_done(&op, res.as_ref().map(Option::clone), now());
        } else {
            shard.on_store_done(&op, res.as_ref().err(), now());
        }
        drop(shard);
        core.drive();
    }
}

async fn reader(core: Rc<Core>, id: ConnId, io: Rc<ConnIo>) {
    loop {
        let gate = core.shard.borrow_mut().read_gate(id, now());
        match gate {
            ReadGate::Go => {}
            ReadGate::Wait(us) => {
                // A timer and a wake-up, no ring operation: nothing to cancel.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_micros(us)) => {}
                    _ = io.wake_reader.notified() => {}
                }
                continue;
            }
            ReadGate::Park => {
                core.drive();
                io.wake_reader.notified().await;
                continue;
            }
            ReadGate::Stop => break,
            ReadGate::Move(home) => {
                core.hand_over(id, &io, home);
                return;
            }
        }
        let Some(buf) = core.shard.borrow_mut().take_read_buf(id) else {
            break;
        };
        let (res, buf) = io.stream.read(buf).await;
        match res {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                core.shard.borrow_mut().on_read(id, buf, now());
                core.drive();
            }
        }
    }
    core.shard.borrow_mut().on_read_end(id, now());
    core.drive();
    core.io.borrow_mut().remove(&id);
    io.wake_writer.notify_one();
}

async fn writer(core: Rc<Core>, id: ConnId, io: Rc<ConnIo>) {
    loop {
        io.wake_writer.notified().await;
        loop {
            let next = core.shard.borrow_mut().poll_write(id, now());
            core.drive();
            let Some((buf, n)) = next else {
                break;
            };
            let (res, buf) = io.stream.write_all(buf, n).await;
            core.shard
                .borrow_mut()
                .on_write_done(id, buf, res.is_ok(), now());
            core.drive();
        }
        if !core.io.borrow().contains_key(&id) {
            return;
        }
    }
}

impl Core {
    /// Hands connection `id` and its socket to core `home` (its agent's home core). Its reader
    /// (the caller) and writer end here without ending the session.
    fn hand_over(&self, id: ConnId, io: &ConnIo, home: u16) {
        self.io.borrow_mut().remove(&id);
        io.wake_writer.notify_one();
        let moving = self.shard.borrow_mut().take_moving(id);
        let Some(moving) = moving else {
            return;
        };
        match io.stream.duplicate() {
            Ok(fd) => {
                self.shard.borrow_mut().outbox().push(
                    home,
                    CoreMsg::Adopt {
                        conn: moving,
                        socket: Some(fd),
                    },
                );
            }
            Err(e) => tracing::warn!(core = self.id, error = %e, "cannot hand a session over"),
        }
        // This core's descriptor closes when the tasks drop their handles; the socket lives on
        // in the duplicate (no shutdown: that would end the connection itself).
        self.drive();
    }

    /// Gives connection `id` its socket and its reader and writer tasks.
    fn serve(self: &Rc<Self>, id: ConnId, stream: Stream) {
        let io = Rc::new(ConnIo {
            stream,
            wake_writer: Notify::new(),
            wake_reader: Notify::new(),
        });
        self.io.borrow_mut().insert(id, io.clone());
        uring::spawn(writer(self.clone(), id, io.clone()));
        uring::spawn(reader(self.clone(), id, io));
    }

    /// Takes in a session handed over by another core: its socket gets tasks here.
    fn adopt(self: &Rc<Self>, moving: crate::shard::MovingConn, fd: OwnedFd, t: Now) {
        let id = self.shard.borrow_mut().adopt(moving, t);
        self.serve(id, Stream::from_socket(fd));
    }

    /// Takes in a socket the dialler connected to another relay's link port.
    fn dialled(self: &Rc<Self>, peer: crate::wire::RelayId, fd: OwnedFd, t: Now) {
        let id = self.shard.borrow_mut().open_dialled(peer, t);
        match id {
            Some(id) => self.serve(id, Stream::from_socket(fd)),
            None => drop(fd),
        }
    }

    /// Carries out the shard's actions and flushes its outbox.
    fn drive(&self) {
        loop {
            let action = self.shard.borrow_mut().poll_action();
            let Some(action) = action else {
                break;
            };
            let c = match action {
                Action::WakeWriter(c) | Action::WakeReader(c) | Action::Shutdown(c) => c,
                Action::WakeStore => {
                    self.store_wake.notify_one();
                    self.store_side_wake.notify_one();
                    continue;
                }
                Action::LinkState(peer, up) => {
                    if let Ok(mut m) = self.shared.links.up.lock() {
                        m.insert(peer, up);
                    }
                    continue;
                }
                Action::Held => {
                    self.held_wake.notify_one();
                    continue;
                }
            };
            let Some(io) = self.io.borrow().get(&c).cloned() else {
                continue;
            };
            match action {
                Action::WakeWriter(_) => io.wake_writer.notify_one(),
                Action::WakeReader(_) => io.wake_reader.notify_one(),
                Action::Shutdown(_) => {
                    io.stream.shutdown();
                    io.wake_reader.notify_one();
                    io.wake_writer.notify_one();
                }
                Action::WakeStore | Action::LinkState(..) | Action::Held => {}
            }
        }
        let mut shard = self.shard.borrow_mut();
        let f = mailbox::flush(shard.outbox(), &self.shared.mailboxes);
        if f.full > 0 {
            shard.mailbox_full(f.full);
        }
        shard.outbox_flushed();
        let more = shard.poll_action();
        drop(shard);
        if let Some(Action::WakeReader(c)) = more {
            if let Some(io) = self.io.borrow().get(&c) {
                io.wake_reader.notify_one();
            }
            self.drive();
        }
    }

    /// At exit: lets the store write and sync what is pending (released records, envelopes
    /// not yet ACKed), for at most a few seconds.
    async fn finish_store(&self) {
        let deadline = now_us() + STORE_EXIT_US;
        while !self.shard.borrow().store_idle() && now_us() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if !self.shard.borrow().store_idle() {
            tracing::warn!(core = self.id, "store still busy at exit");
        }
    }

    async fn mailbox_loop(self: Rc<Self>) {
        let mb = &self.shared.mailboxes[self.id as usize];
        loop {
            mb.wait().await;
            // A batch of messages, then one drive: one wake-up per core per batch, not per
            // message.
            let t = now();
            let mut exit = false;
            while let Some(msg) = mb.pop() {
                exit |= matches!(msg, CoreMsg::Exit);
                if matches!(msg, CoreMsg::Drain | CoreMsg::Exit) {
                    // Complete the pending accept; the kernel stops queueing connections here.
                    self.listener.stop();
                    if let Some(l) = &self.link_listener {
                        l.stop();
                    }
                }
                match msg {
                    CoreMsg::Adopt {
                        conn,
                        socket: Some(fd),
                    } => self.adopt(conn, fd, t),
                    CoreMsg::Dial {
                        peer,
                        socket: Some(fd),
                    } => self.dialled(peer, fd, t),
                    msg => self.shard.borrow_mut().on_message(msg, t),
                }
                if exit {
                    break;
                }
            }
            self.drive();
            if exit {
                self.finish_store().await;
                return;
            }
        }
    }
}

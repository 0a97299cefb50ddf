//! The one home of the io_uring runtime (tokio-uring 0.5) and of raw socket set-up.
//!
//! Everything the engine does with a socket goes through this module, so the engine could move to
//! another io_uring runtime without touching the pure layers. Rules this module exists to keep
//! (tokio-uring 0.5 does not cancel a dropped operation):
//! - never race an operation against a timer: deadlines are enforced by [`Stream::shutdown`] from
//!   a timer task, which completes the pending read or write with an error or EOF;
//! - one reader task and one writer task per socket;
//! - listeners are built with socket2 (SO_REUSEPORT, backlog) and handed over with `from_std`,
//!   because `TcpListener::bind` forces its own options.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::rc::Rc;

use bytes::BytesMut;
use socket2::{Domain, Protocol, Socket, Type};
use tokio_uring::buf::BoundedBuf;

/// Runs `fut` to completion on a new io_uring runtime on the current thread.
///
/// The ring completes work cooperatively where the kernel can (`IORING_SETUP_COOP_TASKRUN`,
/// Linux 5.19): a completion for a core that is busy waits for its next system call instead of
/// interrupting it. A core asleep is still woken at once.
pub fn run<F: Future>(ring_entries: u32, fut: F) -> F::Output {
    let mut ring = tokio_uring::uring_builder();
    ring.setup_coop_taskrun();
    if ring.build(2).is_err() {
        ring = tokio_uring::uring_builder();
    }
    tokio_uring::builder()
        .entries(ring_entries)
        .uring_builder(&ring)
        .start(fut)
}

/// Spawns a task on the current core's runtime.
pub fn spawn<F: Future + 'static>(fut: F) {
    drop(tokio_uring::spawn(fut));
}

/// Binds a non-blocking listener with SO_REUSEPORT so that every core can bind its own.
pub fn bind_reuseport(addr: SocketAddr, backlog: i32) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

/// A listener owned by one core.
pub struct Listener {
    inner: tokio_uring::net::TcpListener,
    fd: i32,
}

impl Listener {
    /// Adopts a listener bound by [`bind_reuseport`]. Must run inside the core's runtime.
    pub fn from_std(l: std::net::TcpListener) -> Self {
        let fd = l.as_raw_fd();
        Listener {
            inner: tokio_uring::net::TcpListener::from_std(l),
            fd,
        }
    }

    /// Accepts the next connection.
    pub async fn accept(&self) -> io::Result<(Stream, SocketAddr)> {
        let (s, addr) = self.inner.accept().await?;
        s.set_nodelay(true)?;
        Ok((Stream { inner: s }, addr))
    }

    /// Stops accepting: a pending accept completes with an error, and the kernel stops routing
    /// new connections to this socket's queue.
    pub fn stop(&self) {
        #[allow(unsafe_code)]
        // SAFETY: `fd` belongs to `self.inner`, which is alive; shutdown(2) does not close it.
        unsafe {
            libc::shutdown(self.fd, libc::SHUT_RDWR);
        }
    }
}

/// A connected TCP stream owned by one core.
pub struct Stream {
    inner: tokio_uring::net::TcpStream,
}

impl Stream {
    /// Reads into the spare capacity of `buf`: the bytes read are appended to it. (A plain
    /// tokio-uring read fills the buffer from its start; reading into the slice past the
    /// initialised bytes appends.)
    pub async fn read(&self, buf: BytesMut) -> (io::Result<usize>, BytesMut) {
        let (len, cap) = (buf.len(), buf.capacity());
        let (res, slice) = self.inner.read(buf.slice(len..cap)).await;
        (res, slice.into_inner())
    }

    /// Writes the first `n` bytes of `buf`, all of them.
    pub async fn write_all(&self, buf: Vec<u8>, n: usize) -> (io::Result<()>, Vec<u8>) {
        let (res, slice) = self.inner.write_all(buf.slice(..n)).await;
        (res, slice.into_inner())
    }

    /// Shuts the socket down; pending operations on it complete.
    pub fn shutdown(&self) {
        let _ = self.inner.shutdown(Shutdown::Both);
    }

    /// A second descriptor for the socket, to hand it to another core's ring; this stream
    /// closes its own when dropped. Only with no operation in flight on it.
    pub fn duplicate(&self) -> io::Result<OwnedFd> {
        #[allow(unsafe_code)]
        // SAFETY: the descriptor belongs to `self.inner`, which is alive for this call.
        let fd = unsafe { BorrowedFd::borrow_raw(self.inner.as_raw_fd()) };
        fd.try_clone_to_owned()
    }

    /// Adopts a socket handed over from another core. Must run inside the core's runtime.
    pub fn from_socket(fd: OwnedFd) -> Self {
        Stream {
            inner: tokio_uring::net::TcpStream::from_std(std::net::TcpStream::from(fd)),
        }
    }
}

/// Raises this process's open-file limit as far as it may go: to `fs.nr_open` when the process
/// is allowed to raise its hard limit, else the soft limit to the hard one. Every agent
/// connection is a file descriptor. Returns the soft limit now in force.
pub fn raise_fd_limit() -> u64 {
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    if let Some(n) = nr_open {
        if rlimit::setrlimit(rlimit::Resource::NOFILE, n, n).is_ok() {
            return n;
        }
    }
    rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0)
}

/// Turns transparent huge pages off for this process (`PR_SET_THP_DISABLE`): memory first
/// touched afterwards comes in 4 KiB pages. With them on, the allocator's arenas are backed by
/// 2 MiB pages, and the thread that first touches one (or touches it again after the allocator
/// gave it back to the system) zeroes all 2 MiB in the middle of its work: a fresh relay held
/// its first envelopes for up to 44 ms that way, and the throughput measured the same without.
pub fn disable_huge_pages() -> std::io::Result<()> {
    #[allow(unsafe_code)]
    // SAFETY: prctl with PR_SET_THP_DISABLE reads only its integer arguments.
    let r = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// One core's store files, written through its ring: carries out the log's
/// [`LogAction`](crate::store::log::LogAction)s. One operation at a time (the log hands out
/// one), never raced against a timer: a stalled one is seen by the shard's sweep.
pub struct StoreFiles {
    dir: PathBuf,
    core: u16,
    open: RefCell<HashMap<u64, Rc<tokio_uring::fs::File>>>,
    /// Fault injection for tests and drills (`OPENMESH_STORE_FAULTS=1` at start): while a file
    /// named [`STALL_SYNC_FILE`] exists in the store directory, every sync waits before it runs.
    stall_sync: Option<PathBuf>,
}

/// Bytes of zeros written per operation when a segment is created.
const ZERO_CHUNK: usize = 1 << 20;

/// See [`StoreFiles`]: the file that stalls syncs when fault injection is on.
pub const STALL_SYNC_FILE: &str = "fault-stall-sync";

impl StoreFiles {
    pub fn new(dir: PathBuf, core: u16) -> Self {
        let stall_sync = std::env::var_os("OPENMESH_STORE_FAULTS")
            .is_some_and(|v| v == "1")
            .then(|| dir.join(STALL_SYNC_FILE));
        StoreFiles {
            dir,
            core,
            open: RefCell::new(HashMap::new()),
            stall_sync,
        }
    }

    async fn file(&self, number: u64) -> io::Result<Rc<tokio_uring::fs::File>> {
        if let Some(f) = self.open.borrow().get(&number) {
            return Ok(f.clone());
        }
        let path = crate::engine::store::segment_path(&self.dir, self.core, number);
        let f = Rc::new(
            tokio_uring::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .await?,
        );
        self.open.borrow_mut().insert(number, f.clone());
        Ok(f)
    }

    async fn sync_dir(&self) -> io::Result<()> {
        let d = tokio_uring::fs::File::open(&self.dir).await?;
        let r = d.sync_all().await;
        let _ = d.close().await;
        r
    }

    /// Carries out one operation; a `Read` returns what it read.
    pub async fn run(
        &self,
        action: &crate::store::log::LogAction,
    ) -> io::Result<Option<bytes::Bytes>> {
        use crate::store::log::LogAction;
        if let LogAction::Read {
            number,
            offset,
            len,
        } = action
        {
            let f = self.file(*number).await?;
            let (r, buf) = f.read_exact_at(vec![0u8; *len as usize], *offset).await;
            r?;
            return Ok(Some(bytes::Bytes::from(buf)));
        }
        self.run_write(action).await.map(|()| None)
    }

    async fn run_write(&self, action: &crate::store::log::LogAction) -> io::Result<()> {
        use crate::store::log::LogAction;
        match action {
            LogAction::Read { .. } => unreachable!("reads return data: `run`"),
            LogAction::Create {
                number,
                header,
                size,
            } => {
                let path = crate::engine::store::segment_path(&self.dir, self.core, *number);
                let f = tokio_uring::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .await?;
                let done = async {
                    // Reserve the space, then write it: appends overwrite blocks that already
                    // exist, so their fdatasync flushes data only (on ext4 and XFS a write into a
                    // fallocated but unwritten extent also converts the extent, a journal
                    // commit on every sync).
                    f.fallocate(0, *size, 0).await?;
                    let mut zeros = vec![0u8; ZERO_CHUNK];
                    let mut at = 0u64;
                    while at < *size {
                        let n = (*size - at).min(ZERO_CHUNK as u64) as usize;
                        let (r, z) = f.write_all_at(zeros.slice(..n), at).await;
                        zeros = z.into_inner();
                        r?;
                        // A chunk at a time to disk: a sync of the segment being appended to
                        // commits the file system's journal, which would first write out every
                        // dirty page of this one.
                        f.sync_data().await?;
                        at += n as u64;
                    }
                    let (r, _) = f.write_all_at(header.to_vec(), 0).await;
                    r?;
                    f.sync_all().await
                }
                .await;
                if let Err(e) = done {
                    // Nothing in it was promised: it goes, so that a retry starts clean.
                    let _ = f.close().await;
                    let _ = tokio_uring::fs::remove_file(&path).await;
                    return Err(e);
                }
                self.open.borrow_mut().insert(*number, Rc::new(f));
                self.sync_dir().await
            }
            LogAction::Write {
                number,
                offset,
                buf,
            } => {
                let f = self.file(*number).await?;
                let (r, _) = f.write_all_at(buf.clone(), *offset).await;
                r
            }
            LogAction::Sync { number } => {
                if let Some(p) = &self.stall_sync {
                    while p.exists() {
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                }
                self.file(*number).await?.sync_data().await
            }
            LogAction::Remove { number } => {
                let f = self.open.borrow_mut().remove(number);
                if let Some(f) = f {
                    if let Ok(f) = Rc::try_unwrap(f) {
                        let _ = f.close().await;
                    }
                }
                let path = crate::engine::store::segment_path(&self.dir, self.core, *number);
                match tokio_uring::fs::remove_file(&path).await {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                self.sync_dir().await
            }
        }
    }
}

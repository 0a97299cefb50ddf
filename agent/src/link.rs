//! The agent's TLS link to a relay: the relay's own sans-IO transport
//! ([`openmesh_dataplane::tls::transport`]: rustls for the handshake, then the project's record
//! layer) over a tokio socket, split for the connection's reading task and its writing task.
//!
//! A payload byte is touched in user space by the AEAD only: records are opened in the read
//! buffer and frames are cut from it as slices; frames to send are sealed from where they lie
//! into the write buffer, large ones from the start of a record so that the relay finds each
//! whole with at most a small join.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::ops::{ControlFlow, Range};
use std::sync::Arc;

use bytes::Bytes;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use openmesh_dataplane::tls::client_config;
use openmesh_dataplane::tls::record::RecordSealer;
use openmesh_dataplane::tls::transport::{
    sealed_size, FrameReader, RecordWriter, Transport, TransportError, WRITE_BUFFER,
};
use openmesh_dataplane::wire::{Envelope, Frame};

use crate::{ClientConfig, ClientError};

/// Largest read buffer block: reads of a busy link fill up to this much at once. Envelopes are
/// slices of their block, so one the application keeps holds its block: blocks stay small.
const READ_BLOCK_MAX: usize = 64 << 10;

/// The reading half: the socket's read side and the frames read from it.
pub(crate) struct LinkReader {
    rd: OwnedReadHalf,
    frames: FrameReader,
}

/// The writing half: the socket's write side, the sealing keys, and what waits to be written.
///
/// Writing never waits inside: [`LinkWriter::try_flush`] writes what the socket takes now and
/// keeps the rest (records sealed and not yet written, frames not yet sealed) for the next
/// call. A writer shared under a lock is pushed to and flushed by whichever task holds it, and
/// a task that stops waiting loses nothing: the bytes wait here.
pub(crate) struct LinkWriter {
    wr: Arc<OwnedWriteHalf>,
    sealer: RecordSealer,
    /// Records sealed for one write (grown on demand, at most WRITE_BUFFER).
    out: Vec<u8>,
    /// Scratch for the copied part of a record.
    tail: Vec<u8>,
    /// The bytes of `out` sealed and not yet written.
    sealed: Range<usize>,
    /// Frames not yet sealed, in order, and their bytes.
    queue: VecDeque<Bytes>,
    queued: usize,
    /// A write failed: the link is broken and writes nothing more.
    broken: bool,
    /// Seal passes so far (to tell an idle writer from a busy one).
    passes: u64,
    /// Bytes the socket took so far (to tell a relay that reads slowly from one that stopped).
    written: u64,
}

/// Waits until a [`LinkWriter`]'s socket takes bytes again, without holding the writer.
#[derive(Clone)]
pub(crate) struct WriteReady(Arc<OwnedWriteHalf>);

impl WriteReady {
    /// Resolves when the socket is writable (or broken). Cancel-safe.
    pub(crate) async fn wait(&self) -> io::Result<()> {
        self.0.writable().await
    }
}

/// The server name `cfg` expects of `relay`'s certificate.
pub(crate) fn server_name(
    cfg: &ClientConfig,
    relay: SocketAddr,
) -> Result<ServerName<'static>, ClientError> {
    match &cfg.server_name {
        Some(n) => ServerName::try_from(n.clone()).map_err(|_| ClientError::ServerName(n.clone())),
        None => Ok(ServerName::IpAddress(relay.ip().into())),
    }
}

/// A TCP connection to `relay` (from `cfg.bind` when set), without Nagle's delay.
pub(crate) async fn tcp(cfg: &ClientConfig, relay: SocketAddr) -> Result<TcpStream, ClientError> {
    let tcp = match cfg.bind {
        None => TcpStream::connect(relay).await?,
        Some(ip) => {
            let sock = if relay.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            sock.bind(SocketAddr::new(ip, 0))?;
            sock.connect(relay).await?
        }
    };
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// Connects to `relay` and runs the TLS handshake (mutual: `cfg`'s identity, `cfg`'s CAs).
/// Frames longer than `max_frame` are refused until [`LinkReader::set_max_frame`].
pub(crate) async fn connect(
    cfg: &ClientConfig,
    relay: SocketAddr,
    max_frame: usize,
) -> Result<(LinkReader, LinkWriter), ClientError> {
    let tls = client_config(&cfg.identity, &cfg.ca)?;
    let mut tcp = tcp(cfg, relay).await?;
    let mut t = Transport::client(tls, server_name(cfg, relay)?, max_frame, READ_BLOCK_MAX)?;
    loop {
        if let Some(hs) = t.take_handshake_output() {
            tcp.write_all(&hs).await?;
        }
        if t.is_open() {
            break;
        }
        let mut rx = t.take_read_buf();
        let n = tcp.read_buf(&mut rx).await;
        t.put_read_buf(rx);
        if n? == 0 {
            return Err(ClientError::Gone);
        }
        t.advance_handshake()?;
    }
    let (frames, sealer) = t.into_split().ok_or(ClientError::Unexpected)?;
    let (rd, wr) = tcp.into_split();
    Ok((LinkReader { rd, frames }, LinkWriter::new(wr, sealer)))
}

impl LinkReader {
    /// The next complete frame already read, if any.
    pub(crate) fn next_frame(&mut self) -> Result<Option<Frame>, TransportError> {
        self.frames.next_frame()
    }

    /// The next complete frame already read that is not an ENVELOPE, each envelope before it
    /// handed to `envelope` as it is decoded (see `FrameReader::next_frame_with`).
    pub(crate) fn next_frame_with(
        &mut self,
        envelope: &mut impl FnMut(Envelope) -> ControlFlow<Option<Envelope>>,
    ) -> Result<Option<Frame>, TransportError> {
        self.frames.next_frame_with(envelope)
    }

    /// Changes the largest frame accepted (to the session contract's).
    pub(crate) fn set_max_frame(&mut self, max: usize) {
        self.frames.set_max_frame(max);
    }

    /// Whether the relay sent close_notify: nothing more comes.
    pub(crate) fn peer_closed(&self) -> bool {
        self.frames.peer_closed()
    }

    /// Lets go of the read buffer when nothing read waits ([`FrameReader::release_idle`]).
    pub(crate) fn release_idle(&mut self) -> bool {
        self.frames.release_idle()
    }

    /// Reads what the socket has (waiting for it); returns the bytes read, 0 at the end of the
    /// stream. Cancel-safe: nothing is read until the socket is ready, and then without waiting.
    pub(crate) async fn read(&mut self) -> io::Result<usize> {
        loop {
            self.rd.readable().await?;
            let mut rx = self.frames.take_read_buf();
            let r = self.rd.try_read_buf(&mut rx);
            self.frames.put_read_buf(rx);
            match r {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        }
    }
}

impl LinkWriter {
    fn new(wr: OwnedWriteHalf, sealer: RecordSealer) -> LinkWriter {
        LinkWriter {
            wr: Arc::new(wr),
            sealer,
            out: Vec::new(),
            tail: Vec::new(),
            sealed: 0..0,
            queue: VecDeque::new(),
            queued: 0,
            broken: false,
            passes: 0,
            written: 0,
        }
    }

    /// Queues `frames` (whole frames back to back) after what waits already.
    pub(crate) fn push(&mut self, frames: Bytes) {
        if !frames.is_empty() {
            self.queued += frames.len();
            self.queue.push_back(frames);
        }
    }

    /// Nothing waits to be written.
    pub(crate) fn is_idle(&self) -> bool {
        self.sealed.is_empty() && self.queue.is_empty()
    }

    /// Bytes waiting: records sealed and not yet written, and frames not yet sealed.
    pub(crate) fn unwritten(&self) -> usize {
        self.sealed.len() + self.queued
    }

    /// Bytes the socket has taken since the connection opened.
    pub(crate) fn written(&self) -> u64 {
        self.written
    }

    /// Lets go of the write buffers when nothing was sealed since the last call (`seen` keeps
    /// the count of seal passes between calls): an agent idle after a burst keeps none of
    /// the buffer the burst grew. Returns whether it did.
    pub(crate) fn release_idle(&mut self, seen: &mut u64) -> bool {
        let quiet = *seen == self.passes;
        *seen = self.passes;
        if !quiet || !self.is_idle() || self.out.capacity() + self.tail.capacity() == 0 {
            return false;
        }
        self.out = Vec::new();
        self.tail = Vec::new();
        true
    }

    /// A handle to wait on the socket with, while others may use the writer.
    pub(crate) fn ready(&self) -> WriteReady {
        WriteReady(self.wr.clone())
    }

    /// Seals and writes what waits, as far as the socket takes it without waiting; `true`
    /// when everything is written. After an error the link writes nothing more.
    pub(crate) fn try_flush(&mut self) -> Result<bool, ClientError> {
        self.try_flush_passes(usize::MAX)
    }

    /// [`LinkWriter::try_flush`], sealing at most `passes` buffers' worth (what a caller that
    /// holds others up should take on).
    pub(crate) fn try_flush_passes(&mut self, passes: usize) -> Result<bool, ClientError> {
        if self.broken {
            return Err(ClientError::Gone);
        }
        let r = self.flush_now(passes);
        if r.is_err() {
            self.broken = true;
        }
        r
    }

    /// Writes what the socket takes of what was sealed and, while it all went, and while
    /// passes are left, seals the next buffer's worth.
    fn flush_now(&mut self, mut passes: usize) -> Result<bool, ClientError> {
        loop {
            while !self.sealed.is_empty() {
                match self.wr.try_write(&self.out[self.sealed.clone()]) {
                    Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                    Ok(n) => {
                        self.sealed.start += n;
                        self.written += n as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if self.queue.is_empty() {
                return Ok(true);
            }
            if passes == 0 {
                return Ok(false);
            }
            passes -= 1;
            // The buffer grows to what the writes need, up to WRITE_BUFFER: an idle agent
            // keeps a few KiB.
            let want = sealed_size(self.queued).clamp(4096, WRITE_BUFFER);
            if self.out.len() < want {
                self.out.resize(want, 0);
            }
            let n = seal_pass(
                &mut self.sealer,
                &mut self.out,
                &mut self.tail,
                &mut self.queue,
            )?;
            self.passes += 1;
            self.queued = self.queue.iter().map(Bytes::len).sum();
            self.sealed = 0..n;
        }
    }

    /// Seals and writes what waits, waiting for the socket as long as it takes.
    pub(crate) async fn flush(&mut self) -> Result<(), ClientError> {
        while !self.try_flush()? {
            self.wr.writable().await?;
        }
        Ok(())
    }

    /// Seals and writes `frames` (whole frames back to back) after what waits.
    pub(crate) async fn write_bytes(&mut self, frames: Bytes) -> Result<(), ClientError> {
        self.push(frames);
        self.flush().await
    }

    /// A connection that is gone: writes what the socket takes now and, when that was all,
    /// close_notify; never waits (what stays unwritten is pending, and the next connection
    /// writes it).
    pub(crate) fn abandon(&mut self) {
        if matches!(self.try_flush(), Ok(true)) && self.seal_close_notify().is_ok() {
            let _ = self.try_flush();
        }
    }

    /// Seals close_notify as the next bytes to write (nothing else may wait).
    fn seal_close_notify(&mut self) -> Result<(), TransportError> {
        debug_assert!(self.is_idle());
        if self.out.len() < 4096 {
            self.out.resize(4096, 0);
        }
        let mut w = RecordWriter::new(&mut self.sealer, &mut self.out, &mut self.tail);
        w.close_notify()?;
        self.sealed = 0..w.finish()?;
        Ok(())
    }

    /// Writes what waits, then close_notify, and shuts the socket's sending side down (when
    /// no [`WriteReady`] is left; otherwise when the last one goes).
    pub(crate) async fn shutdown(&mut self) -> Result<(), ClientError> {
        self.flush().await?;
        self.seal_close_notify()?;
        self.flush().await?;
        if let Some(wr) = Arc::get_mut(&mut self.wr) {
            wr.shutdown().await?;
        }
        Ok(())
    }
}

/// Seals as much of `parts` as `out` holds, whole frames where it can; returns the bytes of
/// `out` to write. What was sealed leaves `parts`.
fn seal_pass(
    sealer: &mut RecordSealer,
    out: &mut [u8],
    tail: &mut Vec<u8>,
    parts: &mut VecDeque<Bytes>,
) -> Result<usize, TransportError> {
    let half = out.len() / 2;
    let mut w = RecordWriter::new(sealer, out, tail);
    let mut empty = true;
    while let Some(front) = parts.front_mut() {
        let mut took = w.frames(front)?;
        if took == 0 && empty && !front.is_empty() {
            // A frame larger than the buffer (or bytes that are not frames: a raw session
            // sends any) goes in pieces; the reader joins them.
            took = front.len().min(half);
            w.shared(&front.slice(..took))?;
        }
        bytes::Buf::advance(front, took);
        if !front.is_empty() {
            // The rest does not fit: the next pass.
            break;
        }
        parts.pop_front();
        empty &= took == 0;
    }
    Ok(w.finish()?)
}
#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use openmesh_dataplane::pki::Identity;
    use openmesh_dataplane::testing::InMemoryRelay;
    use openmesh_dataplane::tls::record::{Opened, RecordLayer};

    use super::*;

    /// A part of `n` frames of the given body lengths (prefix included), or `garbage` bytes
    /// that are not frames at all (a raw session sends such).
    fn part(bodies: &[usize], garbage: Option<usize>, tag: u8) -> Bytes {
        if let Some(g) = garbage {
            return (0..g).map(|i| (i as u8).wrapping_mul(31) ^ tag).collect();
        }
        let mut b = Vec::new();
        for (i, &n) in bodies.iter().enumerate() {
            b.extend_from_slice(&(n as u32 + 1).to_be_bytes());
            b.extend(std::iter::repeat_n(tag ^ i as u8, n + 1));
        }
        b.into()
    }

    /// Opens the records in `wire` (a whole stream) and returns their plaintext.
    fn open_all(server: &mut RecordLayer, mut wire: Vec<u8>) -> Vec<u8> {
        let (mut plain, mut at) = (Vec::new(), 0);
        while at < wire.len() {
            let len = RecordLayer::record_len(&wire[at..])
                .unwrap()
                .expect("whole records");
            match server.open(&mut wire[at..at + len]).unwrap() {
                Opened::Data(r) => plain.extend_from_slice(&wire[at + r.start..at + r.end]),
                other => panic!("unexpected {other:?}"),
            }
            at += len;
        }
        plain
    }

    /// A writer whose socket is full keeps what the socket did not take, sealed or not; a
    /// flush dropped while it waits loses nothing; everything arrives once, in order.
    #[tokio::test]
    async fn a_full_socket_keeps_the_rest_in_order_across_dropped_flushes() {
        let relay = InMemoryRelay::new();
        let (client, mut server) = relay.records(&Identity::generate_self_signed("a").unwrap());
        let (_, sealer) = client.into_split().expect("open");
        // A small receive buffer (inherited by the accepted socket) fills soon.
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(64 << 10).unwrap();
        sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = sock.listen(8).unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut peer, _) = listener.accept().await.unwrap();
        let (_rd, wr) = tcp.into_split();
        let mut w = LinkWriter::new(wr, sealer);

        // 14 MiB of frames, far more than the socket buffers hold unread.
        let parts: Vec<Bytes> = (0..64u8)
            .map(|i| part(&[100, 16 << 10, 7, 200_000, 3_000], None, i))
            .collect();
        let want: Vec<u8> = parts.iter().flat_map(|b| b.iter().copied()).collect();
        for p in &parts {
            w.push(p.clone());
        }
        assert!(!w.try_flush().unwrap(), "nothing reads: the socket fills");
        assert!(!w.is_idle());
        // A flush that gives up waiting keeps its place.
        let cut = tokio::time::timeout(Duration::from_millis(20), w.flush()).await;
        assert!(cut.is_err(), "still full");

        let total = want.len();
        let reading = tokio::spawn(async move {
            let mut wire = Vec::new();
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = peer.read(&mut buf).await.unwrap();
                if n == 0 {
                    return wire;
                }
                wire.extend_from_slice(&buf[..n]);
            }
        });
        w.flush().await.unwrap();
        assert!(w.is_idle());
        // Idle since the last look: the buffers the burst grew go, and writing goes on.
        let mut seen = 0;
        assert!(!w.release_idle(&mut seen), "it sealed since the last look");
        assert!(w.out.capacity() > 0);
        assert!(w.release_idle(&mut seen));
        assert_eq!(w.out.capacity() + w.tail.capacity(), 0);
        let last = part(&[10, 20_000], None, 99);
        w.write_bytes(last.clone()).await.unwrap();
        assert!(
            w.out.capacity() < 64 << 10,
            "grown only to what the write needs"
        );
        drop(w);
        let plain = open_all(&mut server, reading.await.unwrap());
        assert_eq!(plain.len(), total + last.len());
        assert!(plain[..total] == want[..], "every byte once, in order");
        assert!(plain[total..] == last[..]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Whatever the parts (whole frames of any size, even larger than the write buffer, or
        /// bytes that are not frames) and the buffer, the passes seal every byte once, in
        /// order, each within the buffer, and end.
        #[test]
        fn passes_seal_every_part_in_order(
            parts in proptest::collection::vec(
                (
                    proptest::collection::vec(
                        prop_oneof![8 => 0usize..3_000, 1 => 3_000usize..70_000],
                        1..120,
                    ),
                    proptest::option::weighted(0.15, 1usize..5_000),
                ),
                1..5,
            ),
            out_len in 4_096usize..(128 << 10),
        ) {
            let relay = InMemoryRelay::new();
            let (client, mut server) = relay.records(&Identity::generate_self_signed("a").unwrap());
            let (_, mut sealer) = client.into_split().expect("open");
            let mut queue: VecDeque<Bytes> = parts
                .iter()
                .enumerate()
                .map(|(i, (bodies, garbage))| part(bodies, *garbage, i as u8))
                .collect();
            let want: Vec<u8> = queue.iter().flat_map(|b| b.iter().copied()).collect();
            let (mut out, mut tail) = (vec![0u8; out_len], Vec::new());
            let mut plain = Vec::new();
            let mut passes = 0;
            while !queue.is_empty() {
                passes += 1;
                prop_assert!(passes <= want.len() / (out_len / 4) + 8, "passes end");
                let n = seal_pass(&mut sealer, &mut out, &mut tail, &mut queue).unwrap();
                prop_assert!(n > 0 && n <= out_len);
                plain.extend(open_all(&mut server, out[..n].to_vec()));
            }
            prop_assert!(plain == want, "{} bytes sealed, {} queued", plain.len(), want.len());
        }
    }
}

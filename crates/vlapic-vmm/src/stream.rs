//! The live-migration stream between two `vlapic run` processes (docs/migration-stream.md):
//! addresses (`unix:PATH`, `tcp:HOST:PORT`), the preamble (magic and version), framed
//! messages each with its own CRC-32, and the strict decoders of every message body.
//!
//! Nothing read from the stream can make this process panic or allocate more than the
//! bound the reader passes: a frame's length is checked against it before any byte of
//! the body is read, and the body is read incrementally (a peer announcing more than it
//! sends costs only what it sent).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::wire::{crc32, Reader, Writer};

/// First eight bytes a source sends.
pub const MAGIC: [u8; 8] = *b"VLAPICMG";
/// The stream version this build speaks (sends and accepts).
pub const VERSION: u32 = 1;
/// Guest page size.
pub const PAGE: usize = 4096;
/// Most pages in one `PAGS` message.
pub const MAX_BATCH: usize = 256;
/// Largest body of a control message (everything except `PAGS` and `FINL`).
pub const MAX_CONTROL: usize = 64 * 1024;
/// Largest `PAGS` body.
pub const MAX_PAGES_BODY: usize = 8 + MAX_BATCH * (5 + PAGE);

/// Message tags.
pub mod tag {
    /// Source → destination: the VM's shape.
    pub const HELLO: [u8; 4] = *b"HELO";
    /// Destination → source: the shape is accepted.
    pub const OKAY: [u8; 4] = *b"OKAY";
    /// Either way: refusal or failure, a one-line reason; the sender then closes.
    pub const ERROR: [u8; 4] = *b"ERRO";
    /// Source → destination: a batch of pages.
    pub const PAGES: [u8; 4] = *b"PAGS";
    /// Source → destination: the end of one pre-copy round.
    pub const ROUND: [u8; 4] = *b"ROND";
    /// Source → destination: the paused VM's state (a save file without memory).
    pub const FINAL: [u8; 4] = *b"FINL";
    /// Destination → source: the new VM is built, waiting for the commit.
    pub const READY: [u8; 4] = *b"READ";
    /// Source → destination: take over.
    pub const COMMIT: [u8; 4] = *b"COMT";
    /// Destination → source: the destination runs the VM now.
    pub const RUNNING: [u8; 4] = *b"RUNN";
}

/// Where a migration goes: `unix:PATH` or `tcp:HOST:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Addr {
    /// A Unix stream socket at this path.
    Unix(PathBuf),
    /// A TCP address (`HOST:PORT`).
    Tcp(String),
}

impl Addr {
    /// Parses `unix:PATH` or `tcp:HOST:PORT`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(format!("{s:?}: empty socket path"));
            }
            Ok(Addr::Unix(PathBuf::from(p)))
        } else if let Some(hp) = s.strip_prefix("tcp:") {
            let ok = hp
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !ok {
                return Err(format!("{s:?}: expected tcp:HOST:PORT"));
            }
            Ok(Addr::Tcp(hp.to_string()))
        } else {
            Err(format!("{s:?}: expected unix:PATH or tcp:HOST:PORT"))
        }
    }
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
            Addr::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

trait Duplex: Read + Write + Send {
    fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()>;
}
impl Duplex for UnixStream {
    fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}
impl Duplex for TcpStream {
    fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}

/// A listening socket (`--incoming`). A Unix socket's file is removed on drop.
pub enum Listener {
    /// `unix:PATH`.
    Unix(UnixListener, PathBuf),
    /// `tcp:HOST:PORT`.
    Tcp(TcpListener),
}

impl Listener {
    /// Binds `addr`. A stale Unix socket file (nobody listening) is replaced.
    pub fn bind(addr: &Addr) -> Result<Self, String> {
        match addr {
            Addr::Unix(p) => {
                use std::os::unix::fs::FileTypeExt as _;
                let socket = std::fs::symlink_metadata(p)
                    .map(|m| m.file_type().is_socket())
                    .unwrap_or(false);
                if socket && UnixStream::connect(p).is_err() {
                    let _ = std::fs::remove_file(p);
                }
                UnixListener::bind(p)
                    .map(|l| Listener::Unix(l, p.clone()))
                    .map_err(|e| format!("--incoming {addr}: {e}"))
            }
            Addr::Tcp(a) => TcpListener::bind(a.as_str())
                .map(Listener::Tcp)
                .map_err(|e| format!("--incoming {addr}: {e}")),
        }
    }

    /// Waits for one connection.
    pub fn accept(&self) -> Result<Conn, String> {
        let c: Box<dyn Duplex> = match self {
            Listener::Unix(l, _) => Box::new(l.accept().map_err(|e| format!("accept: {e}"))?.0),
            Listener::Tcp(l) => {
                let s = l.accept().map_err(|e| format!("accept: {e}"))?.0;
                let _ = s.set_nodelay(true);
                Box::new(s)
            }
        };
        Ok(Conn::new(c))
    }

    /// Waits for one connection, at most `limit` (`None`: for ever); `Ok(None)` when
    /// nobody connected in time. Polls a non-blocking listener every few ms.
    pub fn accept_within(&self, limit: Option<Duration>) -> Result<Option<Conn>, String> {
        let Some(limit) = limit else {
            return self.accept().map(Some);
        };
        let nonblocking = |on: bool| match self {
            Listener::Unix(l, _) => l.set_nonblocking(on),
            Listener::Tcp(l) => l.set_nonblocking(on),
        };
        nonblocking(true).map_err(|e| format!("accept: {e}"))?;
        let t0 = std::time::Instant::now();
        let got = loop {
            let r: std::io::Result<Box<dyn Duplex>> = match self {
                Listener::Unix(l, _) => l.accept().and_then(|(s, _)| {
                    s.set_nonblocking(false)?;
                    Ok(Box::new(s) as Box<dyn Duplex>)
                }),
                Listener::Tcp(l) => l.accept().and_then(|(s, _)| {
                    s.set_nonblocking(false)?;
                    let _ = s.set_nodelay(true);
                    Ok(Box::new(s) as Box<dyn Duplex>)
                }),
            };
            match r {
                Ok(c) => break Ok(Some(Conn::new(c))),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if t0.elapsed() >= limit {
                        break Ok(None);
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Err(format!("accept: {e}")),
            }
        };
        let _ = nonblocking(false);
        got
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Connects to `addr`, retrying while nobody listens yet, for at most `patience`.
pub fn connect(addr: &Addr, patience: Duration) -> Result<Conn, String> {
    let t0 = Instant::now();
    loop {
        let r: Result<Box<dyn Duplex>, std::io::Error> = match addr {
            Addr::Unix(p) => UnixStream::connect(p).map(|s| Box::new(s) as Box<dyn Duplex>),
            Addr::Tcp(a) => {
                let mut last = Err(std::io::Error::other("no address"));
                for sa in a.to_socket_addrs().map_err(|e| format!("{addr}: {e}"))? {
                    last = TcpStream::connect_timeout(&sa, Duration::from_secs(2));
                    if last.is_ok() {
                        break;
                    }
                }
                last.map(|s| {
                    let _ = s.set_nodelay(true);
                    Box::new(s) as Box<dyn Duplex>
                })
            }
        };
        match r {
            Ok(c) => return Ok(Conn::new(c)),
            Err(e) if t0.elapsed() < patience => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(format!("cannot connect to {addr}: {e}")),
        }
    }
}

/// One end of a migration connection: framed, checksummed messages; bytes counted.
pub struct Conn {
    io: Box<dyn Duplex>,
    /// Bytes written so far.
    pub sent: u64,
    /// Bytes read so far.
    pub received: u64,
}

/// Why a receive failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecvError {
    /// The peer closed the connection (or it was reset) at a message boundary.
    Closed,
    /// The peer sent `ERRO` with this reason.
    Peer(String),
    /// Anything else: a timeout, a malformed or corrupt frame.
    Bad(String),
}

impl std::fmt::Display for RecvError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecvError::Closed => write!(f, "the peer closed the connection"),
            RecvError::Peer(m) => write!(f, "the peer refused: {m}"),
            RecvError::Bad(m) => write!(f, "{m}"),
        }
    }
}

fn tag_name(t: [u8; 4]) -> String {
    String::from_utf8_lossy(&t).escape_debug().to_string()
}

impl Conn {
    fn new(io: Box<dyn Duplex>) -> Self {
        Self {
            io,
            sent: 0,
            received: 0,
        }
    }

    /// Read and write timeout (`None`: wait forever).
    pub fn set_timeout(&self, t: Option<Duration>) {
        let _ = self.io.set_timeout(t);
    }

    fn write_all(&mut self, b: &[u8]) -> Result<(), String> {
        self.io.write_all(b).map_err(|e| format!("send: {e}"))?;
        self.sent += b.len() as u64;
        Ok(())
    }

    /// Source side: the stream's first bytes (magic, version, reserved).
    pub fn send_preamble(&mut self) -> Result<(), String> {
        let mut w = Writer::default();
        w.raw(&MAGIC);
        w.u32(VERSION);
        w.u32(0);
        self.write_all(&w.buf)
    }

    /// Destination side: checks the preamble; a foreign or newer stream is refused
    /// with one line.
    pub fn recv_preamble(&mut self) -> Result<(), String> {
        let mut b = [0u8; 16];
        self.io
            .read_exact(&mut b)
            .map_err(|e| format!("the stream ended before its preamble: {e}"))?;
        self.received += 16;
        let mut r = Reader::new(&b, "preamble");
        if r.take(8)? != MAGIC {
            return Err("not a vlapic migration stream (bad magic)".into());
        }
        let v = r.u32()?;
        if v != VERSION {
            return Err(format!(
                "migration stream version {v} is not supported (this build speaks version {VERSION})"
            ));
        }
        if r.u32()? != 0 {
            return Err("preamble: reserved field not 0".into());
        }
        Ok(())
    }

    /// Sends one message: tag, u32 body length, body, CRC-32 of all three.
    pub fn send(&mut self, t: [u8; 4], body: &[u8]) -> Result<(), String> {
        let len = u32::try_from(body.len()).map_err(|_| "message too large")?;
        let mut head = Vec::with_capacity(8);
        head.extend_from_slice(&t);
        head.extend_from_slice(&len.to_le_bytes());
        let mut crc_in = head.clone();
        crc_in.extend_from_slice(body);
        let crc = crc32(&crc_in);
        crc_in.extend_from_slice(&crc.to_le_bytes());
        self.write_all(&crc_in)?;
        self.io.flush().map_err(|e| format!("send: {e}"))
    }

    /// Sends `ERRO` with a one-line reason (best effort).
    pub fn send_error(&mut self, why: &str) {
        let mut w = Writer::default();
        w.str(why.lines().next().unwrap_or(""));
        let _ = self.send(tag::ERROR, &w.buf);
    }

    /// Receives one message whose body may be at most `max` bytes; `ERRO` becomes
    /// [`RecvError::Peer`]. The checksum is verified before the body is returned.
    pub fn recv(&mut self, max: usize) -> Result<([u8; 4], Vec<u8>), RecvError> {
        let mut head = [0u8; 8];
        let mut got = 0;
        while got < head.len() {
            match self.io.read(head.get_mut(got..).unwrap_or(&mut [])) {
                Ok(0) if got == 0 => return Err(RecvError::Closed),
                Ok(0) => return Err(RecvError::Bad("the stream ended inside a message".into())),
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e)
                    if got == 0
                        && matches!(
                            e.kind(),
                            std::io::ErrorKind::ConnectionReset
                                | std::io::ErrorKind::ConnectionAborted
                                | std::io::ErrorKind::BrokenPipe
                        ) =>
                {
                    return Err(RecvError::Closed)
                }
                Err(e) => return Err(RecvError::Bad(format!("receive: {e}"))),
            }
        }
        self.received += 8;
        let mut t = [0u8; 4];
        t.copy_from_slice(head.get(..4).unwrap_or(&[0; 4]));
        let mut l = [0u8; 4];
        l.copy_from_slice(head.get(4..8).unwrap_or(&[0; 4]));
        let len = u32::from_le_bytes(l) as usize;
        let bound = if t == tag::ERROR { MAX_CONTROL } else { max };
        if len > bound {
            return Err(RecvError::Bad(format!(
                "message {:?} of {len} bytes (at most {bound} expected here)",
                tag_name(t)
            )));
        }
        let mut body = Vec::new();
        (&mut self.io)
            .take(len as u64 + 4)
            .read_to_end(&mut body)
            .map_err(|e| RecvError::Bad(format!("receive: {e}")))?;
        self.received += body.len() as u64;
        if body.len() != len + 4 {
            return Err(RecvError::Bad(format!(
                "the stream ended inside message {:?} ({} of {} bytes)",
                tag_name(t),
                body.len(),
                len + 4
            )));
        }
        let crc_at = body.len() - 4;
        let mut c = [0u8; 4];
        c.copy_from_slice(body.get(crc_at..).unwrap_or(&[0; 4]));
        body.truncate(crc_at);
        let mut check = head.to_vec();
        check.extend_from_slice(&body);
        let computed = crc32(&check);
        let stored = u32::from_le_bytes(c);
        if computed != stored {
            return Err(RecvError::Bad(format!(
                "message {:?}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the stream is corrupt",
                tag_name(t)
            )));
        }
        if t == tag::ERROR {
            let mut r = Reader::new(&body, "ERRO");
            let m = r.str().unwrap_or_else(|_| "(unreadable reason)".into());
            return Err(RecvError::Peer(m.replace('\n', " ")));
        }
        Ok((t, body))
    }

    /// Receives a message that must be `want` (with a body of at most `max` bytes).
    pub fn expect(&mut self, want: [u8; 4], max: usize) -> Result<Vec<u8>, RecvError> {
        let (t, b) = self.recv(max)?;
        if t != want {
            return Err(RecvError::Bad(format!(
                "message {:?} where {:?} was expected",
                tag_name(t),
                tag_name(want)
            )));
        }
        Ok(b)
    }
}

/// `HELO`: the shape of the VM the source sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// vCPUs.
    pub vcpus: u32,
    /// RAM in MiB.
    pub memory_mib: u64,
    /// Save-file header flags (x2APIC, verifier).
    pub flags: u32,
    /// Guest TSC frequency (Hz).
    pub tsc_hz: u64,
}

impl Hello {
    /// The body.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u32(self.vcpus);
        w.u64(self.memory_mib);
        w.u32(self.flags);
        w.u64(self.tsc_hz);
        w.buf
    }
    /// Strict decoding (ranges are the receiver's to check).
    pub fn decode(b: &[u8]) -> Result<Self, String> {
        let mut r = Reader::new(b, "HELO");
        let h = Self {
            vcpus: r.u32()?,
            memory_mib: r.u64()?,
            flags: r.u32()?,
            tsc_hz: r.u64()?,
        };
        r.finish()?;
        Ok(h)
    }
}

/// Encodes a `PAGS` body: the round, then each page as index, kind (0: all zero,
/// 1: 4096 bytes follow) and data.
pub fn encode_pages(round: u32, pages: &[(u32, Option<&[u8]>)]) -> Vec<u8> {
    let mut w = Writer::default();
    w.u32(round);
    w.u32(pages.len() as u32);
    for (i, d) in pages {
        w.u32(*i);
        match d {
            Some(d) => {
                w.u8(1);
                w.raw(d);
            }
            None => w.u8(0),
        }
    }
    w.buf
}

/// Decodes a `PAGS` body for RAM of `total` pages, calling `put(page, data)` (`None`:
/// zero the page) for each; returns (round, pages). Every index, kind and length is
/// checked before `put` sees the page.
pub fn decode_pages(
    b: &[u8],
    total: u64,
    mut put: impl FnMut(u32, Option<&[u8]>) -> Result<(), String>,
) -> Result<(u32, u64), String> {
    let mut r = Reader::new(b, "PAGS");
    let round = r.u32()?;
    let n = r.count(MAX_BATCH, "pages")?;
    for _ in 0..n {
        let i = r.u32()?;
        if u64::from(i) >= total {
            return Err(r.err(format!("page {i} is outside RAM ({total} pages)")));
        }
        match r.u8()? {
            0 => put(i, None)?,
            1 => put(i, Some(r.take(PAGE)?))?,
            k => return Err(r.err(format!("page {i}: unknown kind {k}"))),
        }
    }
    r.finish()?;
    Ok((round, n as u64))
}

/// `ROND`: (round, pages sent in it, bytes sent in it).
pub fn encode_round(round: u32, pages: u64, bytes: u64) -> Vec<u8> {
    let mut w = Writer::default();
    w.u32(round);
    w.u64(pages);
    w.u64(bytes);
    w.buf
}

/// Decodes `ROND`.
pub fn decode_round(b: &[u8]) -> Result<(u32, u64, u64), String> {
    let mut r = Reader::new(b, "ROND");
    let v = (r.u32()?, r.u64()?, r.u64()?);
    r.finish()?;
    Ok(v)
}

/// The head of `FINL`: when the source paused (Unix time, ns) and the pre-copy
/// rounds it made; the rest of the body is a save file without memory pages.
pub fn encode_final(paused_unix_ns: u64, rounds: u32, savefile: &[u8]) -> Vec<u8> {
    let mut w = Writer::default();
    w.u64(paused_unix_ns);
    w.u32(rounds);
    w.raw(savefile);
    w.buf
}

/// Decodes the head of `FINL`; returns (paused at, rounds, save-file bytes).
pub fn decode_final(b: &[u8]) -> Result<(u64, u32, &[u8]), String> {
    let mut r = Reader::new(b, "FINL");
    let at = r.u64()?;
    let rounds = r.u32()?;
    Ok((at, rounds, r.rest()))
}

/// Wall-clock time now, ns since the Unix epoch (downtime across processes on one host).
pub fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// What one side of a live migration reports (summary and `--json`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LiveStats {
    /// `"source"` or `"destination"`.
    pub role: &'static str,
    /// The address.
    pub peer: String,
    /// `"completed"`, or what went wrong (the source then kept running the VM).
    pub result: String,
    /// Whether the VM moved.
    pub completed: bool,
    /// Pre-copy rounds (the last, with the vCPUs paused, not included).
    pub rounds: u32,
    /// Pages sent per round, the last entry being the paused round.
    pub round_pages: Vec<u64>,
    /// Bytes sent per round, the last entry being the paused round (pages and state).
    pub round_bytes: Vec<u64>,
    /// Bytes on the wire in this direction (source: sent, destination: received).
    pub bytes: u64,
    /// From the first byte to the handover (ms).
    pub total_ms: f64,
    /// Pause to resume (µs): source, from its pause to the destination's `RUNN`;
    /// destination, from the source's pause (its clock) to its own resume.
    pub downtime_us: Option<u64>,
}

#[cfg(test)]
#[path = "stream_tests.rs"]
mod tests;

//! Little-endian byte encoding shared by every saved piece of VMM state (save files,
//! device and vCPU state): a writer, a strict bounds-checked reader, CRC-32.
use crate::stats::{ExitCounts, EXIT_REASONS};

/// Longest string stored (console lines, scenario names and details).
pub const MAX_STR: usize = 64 * 1024;

/// CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320), as zlib and PNG use.
pub fn crc32(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let t = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    let mut c = !0u32;
    for &b in data {
        c = t[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8);
    }
    !c
}

/// Appends little-endian fields.
#[derive(Default)]
pub struct Writer {
    /// The bytes so far.
    pub buf: Vec<u8>,
}

impl Writer {
    /// One byte.
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    /// A u16.
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// A u32.
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// A u64.
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// Raw bytes, no length.
    pub fn raw(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }
    /// u32 length, then the bytes.
    pub fn bytes(&mut self, b: &[u8]) {
        self.u32(u32::try_from(b.len()).unwrap_or(u32::MAX));
        self.raw(b.get(..b.len().min(u32::MAX as usize)).unwrap_or(&[]));
    }
    /// A string (u32 length, UTF-8), cut at `MAX_STR` bytes on a char boundary.
    pub fn str(&mut self, s: &str) {
        let mut end = s.len().min(MAX_STR);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.bytes(s.get(..end).unwrap_or("").as_bytes());
    }
    /// Exit counts: u32 count, then that many u64.
    pub fn exits(&mut self, c: &ExitCounts) {
        self.u32(EXIT_REASONS as u32);
        for v in c {
            self.u64(*v);
        }
    }
    /// A section: tag, u64 length, body.
    pub(crate) fn section(&mut self, tag: [u8; 4], body: &[u8]) {
        self.raw(&tag);
        self.u64(body.len() as u64);
        self.raw(body);
    }
}

/// Reads little-endian fields with every offset checked.
pub struct Reader<'a> {
    buf: &'a [u8],
    pub(crate) pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// A reader over `buf`; errors name `what` (the section).
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, pos: 0, what }
    }
    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or_else(|| {
                format!(
                    "{}: ends early (offset {} of {}, {n} more bytes needed)",
                    self.what,
                    self.pos,
                    self.buf.len()
                )
            })?;
        let s = self.buf.get(self.pos..end).ok_or("offset")?;
        self.pos = end;
        Ok(s)
    }
    pub(crate) fn arr<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    /// One byte.
    pub fn u8(&mut self) -> Result<u8, String> {
        Ok(self.arr::<1>()?[0])
    }
    /// A u16.
    pub fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.arr()?))
    }
    /// A u32.
    pub fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    /// A u64.
    pub fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    /// A count of at most `max` items.
    pub fn count(&mut self, max: usize, of: &str) -> Result<usize, String> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(format!("{}: {n} {of} (at most {max})", self.what));
        }
        Ok(n)
    }
    /// u32 length (at most `max`), then the bytes.
    pub fn bytes(&mut self, max: usize) -> Result<&'a [u8], String> {
        let n = self.count(max, "bytes")?;
        self.take(n)
    }
    /// A string written by [`Writer::str`].
    pub fn str(&mut self) -> Result<String, String> {
        let b = self.bytes(MAX_STR)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("{}: a string is not UTF-8", self.what))
    }
    /// Exit counts written by [`Writer::exits`].
    pub fn exits(&mut self) -> Result<ExitCounts, String> {
        let n = self.u32()? as usize;
        if n != EXIT_REASONS {
            return Err(format!(
                "{}: {n} exit reasons (this build counts {EXIT_REASONS})",
                self.what
            ));
        }
        let mut c = [0u64; EXIT_REASONS];
        for v in c.iter_mut() {
            *v = self.u64()?;
        }
        Ok(c)
    }
    /// Error unless every byte was read.
    pub fn finish(&self) -> Result<(), String> {
        if self.pos != self.buf.len() {
            return Err(format!(
                "{}: {} unexpected bytes after its end",
                self.what,
                self.buf.len() - self.pos
            ));
        }
        Ok(())
    }
    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }
    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        let s = self.buf.get(self.pos..).unwrap_or(&[]);
        self.pos = self.buf.len();
        s
    }
    /// An error naming this section.
    pub fn err(&self, msg: impl std::fmt::Display) -> String {
        format!("{}: {msg}", self.what)
    }
}

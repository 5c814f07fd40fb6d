//! The native state file: magic, format version, kind, length, a postcard body
//! (postcard 1.x wire format, a documented stable spec) and a CRC-32.
//!
//! Layout (all header integers little-endian):
//!
//! | Offset | Size | Item |
//! |---|---|---|
//! | 0 | 8 | magic `VLAPICST` |
//! | 8 | 2 | format version, 1 |
//! | 10 | 2 | kind: 1 local APIC, 2 IOAPIC, 3 fabric |
//! | 12 | 4 | body length n |
//! | 16 | n | body: the postcard encoding of [`LapicState`], [`IoApicState`] or [`FabricState`] |
//! | 16 + n | 4 | CRC-32 (IEEE) of bytes 0 .. 16 + n |
//!
//! The body is exactly what `postcard::to_allocvec` produces for the serde derives
//! of those types (fields in declaration order, integers as varints, fixed arrays
//! without a length, `Vec` with a varint length). The decoder here is hand-written
//! so it needs no dependency, reports byte offsets, and is stricter than postcard:
//! non-canonical varints and trailing bytes are rejected, so each state has exactly
//! one encoding.

use alloc::vec::Vec;

use crate::state::error::{DecodeError, Field};
use crate::state::fabric::{FabricState, IoApicState, MAX_PINS};
use crate::state::lapic::LapicState;
use crate::state::wire::{crc32, le_u16, le_u32, put_varint, Reader};

/// File magic.
pub const MAGIC: [u8; 8] = *b"VLAPICST";
/// The format version this crate writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// Header length (magic, version, kind, body length).
pub const HEADER_LEN: usize = 16;
/// Trailer length (CRC-32).
pub const TRAILER_LEN: usize = 4;
/// Most local APICs a fabric file may hold.
pub const MAX_APICS: usize = 4096;
/// Largest body accepted (a full fabric of [`MAX_APICS`] APICs fits easily).
pub const MAX_BODY: usize = 1 << 20;

/// Most bytes a canonical varint of a `bits`-bit integer takes (7 bits a byte).
const fn varint_max(bits: u32) -> usize {
    bits.div_ceil(7) as usize
}

/// Bytes the canonical varint of `n` takes.
const fn varint_len(mut n: u64) -> usize {
    let mut len: usize = 1;
    while n >= 0x80 {
        n >>= 7;
        len = len.saturating_add(1);
    }
    len
}

/// Largest LAPIC body: four u64 fields (APIC base, ICR, timer expiry, TSC deadline)
/// and 42 u32 fields (7 registers, ISR/TMR/IRR as 24 words, ESR and its latch, 7
/// LVTs, initial count and divide), each at its longest varint.
pub const MAX_LAPIC_BODY: usize = 4 * varint_max(64) + 42 * varint_max(32);
/// Largest IOAPIC body: ID and IOREGSEL bytes, [`MAX_PINS`] redirection entries
/// (u64) and pin levels (bool), each sequence with its length.
pub const MAX_IOAPIC_BODY: usize = 2
    + varint_len(MAX_PINS as u64)
    + MAX_PINS * varint_max(64)
    + varint_len(MAX_PINS as u64)
    + MAX_PINS;
/// Largest fabric body: [`MAX_APICS`] LAPIC bodies with their count, and an IOAPIC.
pub const MAX_FABRIC_BODY: usize =
    varint_len(MAX_APICS as u64) + MAX_APICS * MAX_LAPIC_BODY + MAX_IOAPIC_BODY;
/// Largest native LAPIC file (270 bytes): a reader need never take more.
pub const MAX_LAPIC_FILE: usize = HEADER_LEN + MAX_LAPIC_BODY + TRAILER_LEN;
/// Largest native IOAPIC file.
pub const MAX_IOAPIC_FILE: usize = HEADER_LEN + MAX_IOAPIC_BODY + TRAILER_LEN;
/// Largest native fabric file ([`MAX_APICS`] APICs and a 120-pin IOAPIC).
pub const MAX_FABRIC_FILE: usize = HEADER_LEN + MAX_FABRIC_BODY + TRAILER_LEN;

const _: () = assert!(MAX_FABRIC_BODY <= MAX_BODY);

/// What a native file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Kind {
    /// One [`LapicState`].
    Lapic = 1,
    /// One [`IoApicState`].
    IoApic = 2,
    /// One [`FabricState`].
    Fabric = 3,
}

impl Kind {
    /// The largest native file holding this kind of state.
    pub const fn max_file_len(self) -> usize {
        match self {
            Kind::Lapic => MAX_LAPIC_FILE,
            Kind::IoApic => MAX_IOAPIC_FILE,
            Kind::Fabric => MAX_FABRIC_FILE,
        }
    }

    fn from_u16(v: u16) -> Option<Self> {
        match v {
            1 => Some(Kind::Lapic),
            2 => Some(Kind::IoApic),
            3 => Some(Kind::Fabric),
            _ => None,
        }
    }
}

// ----- bodies ---------------------------------------------------------------

/// Writes a LAPIC body; `offsets` receives the body-relative start of each field
/// in [`Field::ALL`] order.
fn write_lapic(out: &mut Vec<u8>, s: &LapicState, mut offsets: Option<&mut [usize; 25]>) {
    let start = out.len();
    let mut n = 0usize;
    let mut mark = |out: &Vec<u8>| {
        if let Some(o) = offsets.as_deref_mut() {
            if let Some(slot) = o.get_mut(n) {
                *slot = out.len().saturating_sub(start);
            }
        }
        n = n.saturating_add(1);
    };
    mark(out);
    put_varint(out, s.apic_base);
    for v in [s.id, s.version, s.tpr, s.apr, s.ldr, s.dfr, s.svr] {
        mark(out);
        put_varint(out, u64::from(v));
    }
    for words in [&s.isr, &s.tmr, &s.irr] {
        mark(out);
        for &w in words {
            put_varint(out, u64::from(w));
        }
    }
    for v in [s.esr, s.esr_pending] {
        mark(out);
        put_varint(out, u64::from(v));
    }
    mark(out);
    put_varint(out, s.icr);
    for &v in &s.lvt {
        mark(out);
        put_varint(out, u64::from(v));
    }
    for v in [s.timer_initial, s.timer_divide] {
        mark(out);
        put_varint(out, u64::from(v));
    }
    for v in [s.timer_deadline, s.tsc_deadline] {
        mark(out);
        put_varint(out, v);
    }
}

fn read_lapic(r: &mut Reader<'_>) -> Result<LapicState, DecodeError> {
    let mut s = LapicState {
        apic_base: r.u64("apic_base")?,
        id: r.u32("id")?,
        version: r.u32("version")?,
        tpr: r.u32("tpr")?,
        apr: r.u32("apr")?,
        ldr: r.u32("ldr")?,
        dfr: r.u32("dfr")?,
        svr: r.u32("svr")?,
        ..LapicState::default()
    };
    for (words, name) in [
        (&mut s.isr, "isr"),
        (&mut s.tmr, "tmr"),
        (&mut s.irr, "irr"),
    ] {
        for w in words.iter_mut() {
            *w = r.u32(name)?;
        }
    }
    s.esr = r.u32("esr")?;
    s.esr_pending = r.u32("esr_pending")?;
    s.icr = r.u64("icr")?;
    for (slot, field) in s.lvt.iter_mut().zip(Field::ALL.iter().skip(14)) {
        *slot = r.u32(field.name())?;
    }
    s.timer_initial = r.u32("timer_initial")?;
    s.timer_divide = r.u32("timer_divide")?;
    s.timer_deadline = r.u64("timer_deadline")?;
    s.tsc_deadline = r.u64("tsc_deadline")?;
    Ok(s)
}

fn write_ioapic(out: &mut Vec<u8>, s: &IoApicState) {
    out.push(s.id);
    out.push(s.select);
    put_varint(out, s.redirection.len() as u64);
    for &e in &s.redirection {
        put_varint(out, e);
    }
    put_varint(out, s.pin_levels.len() as u64);
    for &l in &s.pin_levels {
        out.push(u8::from(l));
    }
}

/// A sequence length, bounded so hostile input cannot make us allocate.
fn read_len(r: &mut Reader<'_>, max: usize, field: &'static str) -> Result<usize, DecodeError> {
    let at = r.offset();
    let n = r.u64(field)?;
    usize::try_from(n)
        .ok()
        .filter(|&n| n <= max && n <= r.remaining())
        .ok_or(DecodeError::new(at, field, "sequence length out of range"))
}

fn read_ioapic(r: &mut Reader<'_>) -> Result<IoApicState, DecodeError> {
    let id = r.u8("ioapic.id")?;
    let select = r.u8("ioapic.select")?;
    let n = read_len(r, MAX_PINS, "ioapic.redirection")?;
    let mut redirection = Vec::with_capacity(n);
    for _ in 0..n {
        redirection.push(r.u64("ioapic.redirection")?);
    }
    let n = read_len(r, MAX_PINS, "ioapic.pin_levels")?;
    let mut pin_levels = Vec::with_capacity(n);
    for _ in 0..n {
        pin_levels.push(r.bool("ioapic.pin_levels")?);
    }
    Ok(IoApicState {
        id,
        select,
        redirection,
        pin_levels,
    })
}

fn write_fabric(out: &mut Vec<u8>, s: &FabricState) {
    put_varint(out, s.apics.len() as u64);
    for a in &s.apics {
        write_lapic(out, a, None);
    }
    write_ioapic(out, &s.ioapic);
}

fn read_fabric(r: &mut Reader<'_>) -> Result<FabricState, DecodeError> {
    let n = read_len(r, MAX_APICS, "apics")?;
    let mut apics = Vec::with_capacity(n);
    for _ in 0..n {
        apics.push(read_lapic(r)?);
    }
    let ioapic = read_ioapic(r)?;
    Ok(FabricState { apics, ioapic })
}

/// The postcard body of a LAPIC state (without header or checksum).
pub fn lapic_body(state: &LapicState) -> Vec<u8> {
    let mut out = Vec::new();
    write_lapic(&mut out, state, None);
    out
}

// ----- framing ---------------------------------------------------------------

fn frame(kind: Kind, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len().saturating_add(HEADER_LEN + TRAILER_LEN));
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(kind as u16).to_le_bytes());
    out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(body);
    let crc = crc32(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Checks the header and checksum; returns the kind and the body.
pub fn unframe(bytes: &[u8]) -> Result<(Kind, &[u8]), DecodeError> {
    let magic = bytes.get(..8).ok_or(DecodeError::new(
        bytes.len(),
        "magic",
        "file shorter than the header",
    ))?;
    if magic != MAGIC {
        return Err(DecodeError::new(
            0,
            "magic",
            "not a vlapic native state file",
        ));
    }
    let version = le_u16(bytes, 8, "format_version")?;
    if version != FORMAT_VERSION {
        return Err(DecodeError::version(
            8,
            "format_version",
            version,
            FORMAT_VERSION,
        ));
    }
    let kind = Kind::from_u16(le_u16(bytes, 10, "kind")?).ok_or(DecodeError::new(
        10,
        "kind",
        "unknown kind",
    ))?;
    let len = le_u32(bytes, 12, "body_length")? as usize;
    if len > MAX_BODY {
        return Err(DecodeError::new(12, "body_length", "body too large"));
    }
    let end = HEADER_LEN.saturating_add(len);
    let total = end.saturating_add(TRAILER_LEN);
    if bytes.len() < total {
        return Err(DecodeError::new(
            bytes.len(),
            "body",
            "file shorter than its body length",
        ));
    }
    if bytes.len() > total {
        return Err(DecodeError::new(
            total,
            "crc32",
            "trailing bytes after the checksum",
        ));
    }
    let stored = le_u32(bytes, end, "crc32")?;
    let covered = bytes
        .get(..end)
        .ok_or(DecodeError::new(end, "crc32", "truncated"))?;
    if crc32(covered) != stored {
        return Err(DecodeError::new(end, "crc32", "checksum mismatch"));
    }
    let body =
        bytes
            .get(HEADER_LEN..end)
            .ok_or(DecodeError::new(HEADER_LEN, "body", "truncated"))?;
    Ok((kind, body))
}

fn decode_body<T>(
    bytes: &[u8],
    want: Kind,
    read: impl FnOnce(&mut Reader<'_>) -> Result<T, DecodeError>,
) -> Result<T, DecodeError> {
    let (kind, body) = unframe(bytes)?;
    if kind != want {
        return Err(DecodeError::new(
            10,
            "kind",
            "file holds a different kind of state",
        ));
    }
    let mut r = Reader::new(body, HEADER_LEN);
    let v = read(&mut r)?;
    if r.remaining() != 0 {
        return Err(DecodeError::new(
            r.offset(),
            "body",
            "trailing bytes in the body",
        ));
    }
    Ok(v)
}

/// Encodes a LAPIC state as a native file.
pub fn encode_lapic(state: &LapicState) -> Vec<u8> {
    frame(Kind::Lapic, &lapic_body(state))
}

/// Decodes a native LAPIC file (no validation: see [`LapicState::validate`]).
pub fn decode_lapic(bytes: &[u8]) -> Result<LapicState, DecodeError> {
    decode_body(bytes, Kind::Lapic, read_lapic)
}

/// Encodes an IOAPIC state as a native file.
pub fn encode_ioapic(state: &IoApicState) -> Vec<u8> {
    let mut body = Vec::new();
    write_ioapic(&mut body, state);
    frame(Kind::IoApic, &body)
}

/// Decodes a native IOAPIC file.
pub fn decode_ioapic(bytes: &[u8]) -> Result<IoApicState, DecodeError> {
    decode_body(bytes, Kind::IoApic, read_ioapic)
}

/// Encodes a fabric state as a native file.
pub fn encode_fabric(state: &FabricState) -> Vec<u8> {
    let mut body = Vec::new();
    write_fabric(&mut body, state);
    frame(Kind::Fabric, &body)
}

/// Decodes a native fabric file.
pub fn decode_fabric(bytes: &[u8]) -> Result<FabricState, DecodeError> {
    decode_body(bytes, Kind::Fabric, read_fabric)
}

/// Byte offset of `field` in the native LAPIC file encoding `state` (encodings are
/// canonical, so this is also its offset in any file that decodes to `state`).
pub fn field_offset(state: &LapicState, field: Field) -> usize {
    let mut offsets = [0usize; 25];
    let mut out = Vec::new();
    write_lapic(&mut out, state, Some(&mut offsets));
    let i = Field::ALL.iter().position(|&f| f == field).unwrap_or(0);
    HEADER_LEN.saturating_add(offsets.get(i).copied().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn widest_lapic() -> LapicState {
        LapicState {
            apic_base: u64::MAX,
            id: u32::MAX,
            version: u32::MAX,
            tpr: u32::MAX,
            apr: u32::MAX,
            ldr: u32::MAX,
            dfr: u32::MAX,
            svr: u32::MAX,
            isr: [u32::MAX; 8],
            tmr: [u32::MAX; 8],
            irr: [u32::MAX; 8],
            esr: u32::MAX,
            esr_pending: u32::MAX,
            icr: u64::MAX,
            lvt: [u32::MAX; 7],
            timer_initial: u32::MAX,
            timer_divide: u32::MAX,
            timer_deadline: u64::MAX,
            tsc_deadline: u64::MAX,
        }
    }

    // The size bounds readers use (issue 10, finding 3) are the encodings of the
    // widest values, and every such file decodes.
    #[test]
    fn size_bounds_are_the_widest_encodings() {
        let lapic = encode_lapic(&widest_lapic());
        assert_eq!(lapic.len(), MAX_LAPIC_FILE);
        assert_eq!(MAX_LAPIC_FILE, 270);
        assert!(decode_lapic(&lapic).is_ok());
        let io = IoApicState {
            id: u8::MAX,
            select: u8::MAX,
            redirection: alloc::vec![u64::MAX; MAX_PINS],
            pin_levels: alloc::vec![true; MAX_PINS],
        };
        assert_eq!(encode_ioapic(&io).len(), MAX_IOAPIC_FILE);
        let fabric = FabricState {
            apics: alloc::vec![widest_lapic(); MAX_APICS],
            ioapic: io,
        };
        let f = encode_fabric(&fabric);
        assert_eq!(f.len(), MAX_FABRIC_FILE);
        assert_eq!(Kind::Fabric.max_file_len(), MAX_FABRIC_FILE);
        assert!(decode_fabric(&f).is_ok());
    }
}

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

/// What a native file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// One [`LapicState`].
    Lapic = 1,
    /// One [`IoApicState`].
    IoApic = 2,
    /// One [`FabricState`].
    Fabric = 3,
}

impl Kind {
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

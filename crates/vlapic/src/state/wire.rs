//! Byte-level helpers shared by the formats: bounds-checked little-endian reads,
//! postcard-compatible varints, and CRC-32. Nothing here can panic on any input.

use alloc::vec::Vec;

use crate::state::error::DecodeError;

/// A little-endian u16 at `off`, or a decode error naming `field`.
pub(crate) fn le_u16(buf: &[u8], off: usize, field: &'static str) -> Result<u16, DecodeError> {
    off.checked_add(2)
        .and_then(|end| buf.get(off..end))
        .and_then(|b| <[u8; 2]>::try_from(b).ok())
        .map(u16::from_le_bytes)
        .ok_or(DecodeError::new(off, field, "truncated"))
}

/// A little-endian u32 at `off`, or a decode error naming `field`.
pub(crate) fn le_u32(buf: &[u8], off: usize, field: &'static str) -> Result<u32, DecodeError> {
    off.checked_add(4)
        .and_then(|end| buf.get(off..end))
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_le_bytes)
        .ok_or(DecodeError::new(off, field, "truncated"))
}

/// A little-endian u64 at `off`, or a decode error naming `field`.
pub(crate) fn le_u64(buf: &[u8], off: usize, field: &'static str) -> Result<u64, DecodeError> {
    off.checked_add(8)
        .and_then(|end| buf.get(off..end))
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes)
        .ok_or(DecodeError::new(off, field, "truncated"))
}

/// Writes `bytes` at `off` if they fit (encoders only write to fixed-size pages
/// at constant offsets, so they always fit).
pub(crate) fn put(buf: &mut [u8], off: usize, bytes: &[u8]) {
    if let Some(dst) = off
        .checked_add(bytes.len())
        .and_then(|end| buf.get_mut(off..end))
    {
        dst.copy_from_slice(bytes);
    }
}

/// Appends `v` as a postcard varint (unsigned LEB128, least significant group first).
pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7F) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// A cursor over a postcard body that reports absolute byte offsets.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Offset of `buf[0]` in the whole input.
    base: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], base: usize) -> Self {
        Self { buf, pos: 0, base }
    }

    /// Absolute offset of the next byte.
    pub(crate) fn offset(&self) -> usize {
        self.base.saturating_add(self.pos)
    }

    /// Bytes left.
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// A varint of at most `bits` bits. Overlong (non-canonical) encodings and
    /// values that do not fit are rejected, so every value has one encoding.
    pub(crate) fn varint(&mut self, bits: u32, field: &'static str) -> Result<u64, DecodeError> {
        let start = self.offset();
        let max_bytes = bits.div_ceil(7);
        let mut value: u64 = 0;
        let mut i: u32 = 0;
        loop {
            let Some(&byte) = self.buf.get(self.pos) else {
                return Err(DecodeError::new(self.offset(), field, "truncated varint"));
            };
            if i >= max_bytes {
                return Err(DecodeError::new(start, field, "varint too long"));
            }
            self.pos = self.pos.saturating_add(1);
            let group = u64::from(byte & 0x7F);
            let shift = i.saturating_mul(7);
            let shifted = group.checked_shl(shift).unwrap_or(0);
            if shifted.checked_shr(shift) != Some(group) || (bits < 64 && shifted >> bits != 0) {
                return Err(DecodeError::new(start, field, "varint value out of range"));
            }
            value |= shifted;
            i = i.saturating_add(1);
            if byte & 0x80 == 0 {
                if byte == 0 && i > 1 {
                    return Err(DecodeError::new(start, field, "non-canonical varint"));
                }
                return Ok(value);
            }
        }
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        let start = self.offset();
        let v = self.varint(32, field)?;
        u32::try_from(v).map_err(|_| DecodeError::new(start, field, "varint value out of range"))
    }

    pub(crate) fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        self.varint(64, field)
    }

    /// A postcard `u8` (one raw byte).
    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        let Some(&b) = self.buf.get(self.pos) else {
            return Err(DecodeError::new(self.offset(), field, "truncated"));
        };
        self.pos = self.pos.saturating_add(1);
        Ok(b)
    }

    /// A postcard `bool` (one byte, 0 or 1).
    pub(crate) fn bool(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        let at = self.offset();
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::new(at, field, "bool not 0 or 1")),
        }
    }
}

/// CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320, init and final XOR all
/// ones), bitwise — the files are small.
pub(crate) fn crc32(data: &[u8]) -> u32 {
    let mut crc = u32::MAX;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    // The standard CRC-32 check value (ITU-T V.42 / IEEE 802.3).
    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    // postcard wire spec: varints are unsigned LEB128; u32 takes at most 5 bytes.
    #[test]
    fn varints_round_trip_and_reject_overlong() {
        for v in [0u64, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            let bits = if v > u64::from(u32::MAX) { 64 } else { 32 };
            assert_eq!(Reader::new(&out, 0).varint(bits, "x"), Ok(v));
        }
        let overlong = [0x80u8, 0x00];
        assert!(Reader::new(&overlong, 0).u32("x").is_err());
        let too_big = [0xFFu8, 0xFF, 0xFF, 0xFF, 0x1F];
        assert!(Reader::new(&too_big, 0).u32("x").is_err());
        let max = [0xFFu8, 0xFF, 0xFF, 0xFF, 0x0F];
        assert_eq!(Reader::new(&max, 0).u32("x"), Ok(u32::MAX));
        let six = [0x80u8, 0x80, 0x80, 0x80, 0x80, 0x01];
        assert!(Reader::new(&six, 0).u32("x").is_err());
        let u64_max = [0xFFu8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01];
        assert_eq!(Reader::new(&u64_max, 0).u64("x"), Ok(u64::MAX));
        let u64_over = [0xFFu8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x02];
        assert!(Reader::new(&u64_over, 0).u64("x").is_err());
    }
}

//! x86 descriptor formats a software-interrupt delivery reads: segment registers,
//! code-segment descriptors, 8- and 16-byte IDT gates, canonical addresses.
//!
//! Layouts from Intel SDM Vol. 3A §3.4.5 (segment descriptors), Figure 6-2
//! (protected-mode IDT gates) and Figure 6-8 (64-bit IDT gates).

/// A segment register with its hidden part (the fields of KVM's `kvm_segment`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    /// Base address.
    pub base: u64,
    /// Limit in bytes (already scaled by the granularity).
    pub limit: u32,
    /// Selector.
    pub selector: u16,
    /// Type field (4 bits).
    pub type_: u8,
    /// Present.
    pub present: bool,
    /// Descriptor privilege level.
    pub dpl: u8,
    /// Default operation size (D/B).
    pub db: bool,
    /// Code or data segment (S = 1) rather than a system segment.
    pub s: bool,
    /// 64-bit code segment (L).
    pub l: bool,
    /// Granularity.
    pub g: bool,
    /// Available bit.
    pub avl: bool,
    /// Not usable (a null selector was loaded).
    pub unusable: bool,
}

/// A descriptor-table register (GDTR, IDTR).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableReg {
    /// Linear base address.
    pub base: u64,
    /// Limit (last valid byte offset).
    pub limit: u16,
}

/// Whether `addr` is canonical for 48-bit (or 57-bit with CR4.LA57) linear addresses.
pub fn canonical(addr: u64, la57: bool) -> bool {
    let bits = if la57 { 57 } else { 48 };
    let top = (addr as i64) >> (bits - 1);
    top == 0 || top == -1
}

/// Decodes an 8-byte code/data segment descriptor into a [`Segment`] for `selector`.
pub fn segment_from_descriptor(desc: u64, selector: u16) -> Segment {
    let raw_limit = (desc & 0xFFFF) | ((desc >> 32) & 0xF_0000);
    let g = desc & (1 << 55) != 0;
    let limit = if g {
        (raw_limit << 12) | 0xFFF
    } else {
        raw_limit
    };
    Segment {
        base: ((desc >> 16) & 0xFF_FFFF) | ((desc >> 32) & 0xFF00_0000),
        limit: u32::try_from(limit).unwrap_or(u32::MAX),
        selector,
        type_: ((desc >> 40) & 0xF) as u8,
        present: desc & (1 << 47) != 0,
        dpl: ((desc >> 45) & 3) as u8,
        db: desc & (1 << 54) != 0,
        s: desc & (1 << 44) != 0,
        l: desc & (1 << 53) != 0,
        g,
        avl: desc & (1 << 52) != 0,
        unusable: false,
    }
}

/// An IDT gate (either format), decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gate {
    /// Handler offset.
    pub offset: u64,
    /// Code-segment selector.
    pub selector: u16,
    /// IST index (IA-32e mode; 0 = none).
    pub ist: u8,
    /// Type (4 bits).
    pub type_: u8,
    /// DPL.
    pub dpl: u8,
    /// Present.
    pub present: bool,
}

/// Decodes a 16-byte IA-32e mode gate (SDM Vol. 3A Figure 6-8).
pub fn gate64(b: &[u8; 16]) -> Gate {
    let lo = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    let hi = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
    Gate {
        offset: (lo & 0xFFFF) | ((lo >> 32) & 0xFFFF_0000) | (u64::from(hi) << 32),
        selector: ((lo >> 16) & 0xFFFF) as u16,
        ist: (b[4] & 7),
        type_: b[5] & 0xF,
        dpl: (b[5] >> 5) & 3,
        present: b[5] & 0x80 != 0,
    }
}

/// Decodes an 8-byte protected-mode gate (SDM Vol. 3A Figure 6-2).
pub fn gate32(b: &[u8; 8]) -> Gate {
    let lo = u64::from_le_bytes(*b);
    Gate {
        offset: (lo & 0xFFFF) | ((lo >> 32) & 0xFFFF_0000),
        selector: ((lo >> 16) & 0xFFFF) as u16,
        ist: 0,
        type_: b[5] & 0xF,
        dpl: (b[5] >> 5) & 3,
        present: b[5] & 0x80 != 0,
    }
}

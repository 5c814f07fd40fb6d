//! ACPI tables for Linux guests (ACPI 6.x): RSDP, XSDT, a hardware-reduced FADT with
//! sleep control/status registers, a DSDT holding `\_S5`, and a MADT per vCPU.

/// Guest-physical address of the RSDP, in the BIOS area Linux scans
/// (0xE0000–0xFFFFF, ACPI 6.4 §5.2.5.1); the tables follow it.
pub const ACPI_BASE: u64 = 0xE_0000;
/// Bytes available for the tables (up to 0xFFFFF).
pub const ACPI_SPACE: u64 = 0x2_0000;
/// I/O port of the FADT's SLEEP_CONTROL_REG (8 bits, ACPI 6.4 §4.8.3.7).
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
/// I/O port of the FADT's SLEEP_STATUS_REG (8 bits, ACPI 6.4 §4.8.3.8).
pub const SLEEP_STATUS_PORT: u16 = 0x601;
/// The `\_S5` sleep type value the DSDT gives (SLP_TYPx written for soft-off).
pub const S5_SLEEP_TYPE: u8 = 5;
/// SLEEP_CONTROL_REG: SLP_EN (bit 5) and the SLP_TYPx field (bits 4:2).
pub const SLP_EN: u8 = 1 << 5;

/// True when a write of `value` to [`SLEEP_CONTROL_PORT`] enters S5 (soft off):
/// SLP_EN set and SLP_TYPx equal to the DSDT's `\_S5` value (ACPI 6.4 §4.8.3.7).
pub fn is_soft_off(value: u8) -> bool {
    value & SLP_EN != 0 && (value >> 2) & 7 == S5_SLEEP_TYPE
}

/// What the tables describe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiConfig {
    /// APIC IDs of the vCPUs, BSP first.
    pub apic_ids: Vec<u32>,
    /// IOAPIC ID.
    pub ioapic_id: u8,
    /// IOAPIC MMIO base.
    pub ioapic_addr: u32,
    /// Local APIC MMIO base.
    pub lapic_addr: u32,
}

/// The tables as one blob to copy to [`ACPI_BASE`], RSDP first.
#[derive(Clone, Debug)]
pub struct AcpiTables {
    /// Guest-physical address of the RSDP (the first byte of `bytes`).
    pub rsdp: u64,
    /// Everything, laid out from `rsdp`.
    pub bytes: Vec<u8>,
}

const OEM_ID: &[u8; 6] = b"VLAPIC";
const OEM_TABLE_ID: &[u8; 8] = b"VLAPICVM";

/// The byte that makes `b` sum to zero (ACPI 6.4 §5.2.5.3, §5.2.6).
pub fn checksum(b: &[u8]) -> u8 {
    0u8.wrapping_sub(b.iter().fold(0u8, |a, x| a.wrapping_add(*x)))
}

/// A system description table: the 36-byte header (ACPI 6.4 §5.2.6), then `body`.
fn sdt(sig: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(36 + body.len()).unwrap_or(u32::MAX);
    let mut t = Vec::with_capacity(36 + body.len());
    t.extend_from_slice(sig);
    t.extend_from_slice(&len.to_le_bytes());
    t.push(revision);
    t.push(0); // checksum, below
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(b"VLAP"); // creator ID
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    t.extend_from_slice(body);
    let c = checksum(&t);
    if let Some(b) = t.get_mut(9) {
        *b = c;
    }
    t
}

/// A Generic Address Structure for an 8-bit I/O port (ACPI 6.4 §5.2.3.2).
fn gas_io8(port: u16) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // system I/O
    g[1] = 8; // bit width
    g[3] = 1; // byte access
    g[4..6].copy_from_slice(&port.to_le_bytes());
    g
}

/// The DSDT's AML: `Name (_S5, Package (4) { 5, 5, 0, 0 })` (ACPI 6.4 §7.4.2,
/// §20.2.5.1 NameOp, §20.2.5.4 PackageOp).
fn dsdt_aml() -> Vec<u8> {
    vec![
        0x08,
        b'_',
        b'S',
        b'5',
        b'_', // NameOp "_S5_"
        0x12,
        0x08,
        0x04, // PackageOp, PkgLength 8, NumElements 4
        0x0A,
        S5_SLEEP_TYPE, // BytePrefix SLP_TYPa
        0x0A,
        S5_SLEEP_TYPE, // BytePrefix SLP_TYPb
        0x00,
        0x00, // reserved
    ]
}

/// A revision 6 FADT for a hardware-reduced platform (ACPI 6.4 §5.2.9, flag
/// HW_REDUCED_ACPI bit 20): no PM1 blocks, sleep through SLEEP_CONTROL/STATUS.
fn fadt(dsdt: u64) -> Vec<u8> {
    let mut b = vec![0u8; 276 - 36];
    let mut put = |off: usize, v: &[u8]| {
        if let Some(s) = b.get_mut(off - 36..off - 36 + v.len()) {
            s.copy_from_slice(v);
        }
    };
    put(40, &u32::try_from(dsdt).unwrap_or(0).to_le_bytes());
    // IAPC_BOOT_ARCH (offset 109): VGA not present (bit 2).
    put(109, &(1u16 << 2).to_le_bytes());
    // Flags (offset 112): WBINVD (0), PWR_BUTTON (4), SLP_BUTTON (5), HW_REDUCED_ACPI (20).
    put(112, &(1u32 | 1 << 4 | 1 << 5 | 1 << 20).to_le_bytes());
    put(131, &[5]); // FADT minor version: ACPI 6.5
    put(140, &dsdt.to_le_bytes()); // X_DSDT
    put(244, &gas_io8(SLEEP_CONTROL_PORT));
    put(256, &gas_io8(SLEEP_STATUS_PORT));
    put(268, b"VLAPICVM"); // hypervisor vendor identity
    sdt(b"FACP", 6, &b)
}

/// The MADT (ACPI 6.4 §5.2.12): a Processor Local APIC per vCPU (a Local x2APIC
/// entry for IDs from 255), the IOAPIC, ISA IRQ 0 → GSI 2 (the platform's wiring,
/// as QEMU's and most PCs' tables give it) and LINT1 as NMI on every CPU.
fn madt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&cfg.lapic_addr.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // flags: no dual 8259s
    for (uid, id) in cfg.apic_ids.iter().enumerate() {
        let uid = uid as u32;
        match u8::try_from(*id) {
            Ok(id8) if id8 != 0xFF && uid < 0xFF => {
                b.extend_from_slice(&[0, 8, uid as u8, id8]);
                b.extend_from_slice(&1u32.to_le_bytes()); // enabled
            }
            _ => {
                b.extend_from_slice(&[9, 16, 0, 0]);
                b.extend_from_slice(&id.to_le_bytes());
                b.extend_from_slice(&1u32.to_le_bytes());
                b.extend_from_slice(&uid.to_le_bytes());
            }
        }
    }
    b.extend_from_slice(&[1, 12, cfg.ioapic_id, 0]);
    b.extend_from_slice(&cfg.ioapic_addr.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    b.extend_from_slice(&[2, 10, 0, 0]); // ISO: bus ISA, source IRQ 0
    b.extend_from_slice(&2u32.to_le_bytes()); // -> GSI 2
    b.extend_from_slice(&0u16.to_le_bytes()); // bus-conforming polarity/trigger
    b.extend_from_slice(&[4, 6, 0xFF, 0, 0, 1]); // Local APIC NMI: all CPUs, LINT1
    sdt(b"APIC", 5, &b)
}

/// Builds the RSDP (revision 2, ACPI 6.4 §5.2.5.3), XSDT, FADT, DSDT and MADT for
/// `cfg`, laid out from [`ACPI_BASE`] with every table 16-byte aligned. `Err` when
/// they do not fit [`ACPI_SPACE`] (too many vCPUs for one MADT).
pub fn build(cfg: &AcpiConfig) -> Result<AcpiTables, String> {
    let mut out = vec![0u8; 48]; // the RSDP, written last
    let place = |out: &mut Vec<u8>, t: &[u8]| -> u64 {
        out.resize(out.len().div_ceil(16) * 16, 0);
        let at = ACPI_BASE + out.len() as u64;
        out.extend_from_slice(t);
        at
    };
    let dsdt = place(&mut out, &sdt(b"DSDT", 2, &dsdt_aml()));
    let fadt_at = place(&mut out, &fadt(dsdt));
    let madt_at = place(&mut out, &madt(cfg));
    let mut entries = Vec::new();
    for a in [fadt_at, madt_at] {
        entries.extend_from_slice(&a.to_le_bytes());
    }
    let xsdt = place(&mut out, &sdt(b"XSDT", 1, &entries));
    if out.len() as u64 > ACPI_SPACE {
        return Err(format!(
            "ACPI tables for {} vCPUs take {} bytes, more than the {ACPI_SPACE} available",
            cfg.apic_ids.len(),
            out.len()
        ));
    }
    let mut rsdp = [0u8; 36];
    rsdp[0..8].copy_from_slice(b"RSD PTR ");
    rsdp[9..15].copy_from_slice(OEM_ID);
    rsdp[15] = 2; // revision: ACPI 2.0+
    rsdp[20..24].copy_from_slice(&36u32.to_le_bytes());
    rsdp[24..32].copy_from_slice(&xsdt.to_le_bytes());
    rsdp[8] = checksum(&rsdp[..20]);
    rsdp[32] = checksum(&rsdp);
    if let Some(s) = out.get_mut(..36) {
        s.copy_from_slice(&rsdp);
    }
    Ok(AcpiTables {
        rsdp: ACPI_BASE,
        bytes: out,
    })
}

#[cfg(test)]
#[path = "acpi_tests.rs"]
mod tests;

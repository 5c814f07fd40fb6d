//! Linux boot through rust-vmm's `linux-loader`: a bzImage by the 32-bit boot
//! protocol (boot_params), or a vmlinux ELF by its PVH entry (hvm_start_info).

use std::io::Cursor;

use kvm_bindings::kvm_regs;
use kvm_ioctls::VcpuFd;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{ByteValued, GuestAddress};

use crate::acpi::{self, AcpiConfig};
use crate::loader::LoadError;
use crate::memory::{GuestRam, HIGH_RAM_START, LOW_RAM_END};

/// Guest-physical address of the boot GDT (null, null, `__BOOT_CS` 0x10, `__BOOT_DS` 0x18).
pub const GDT_ADDR: u64 = 0x500;
/// Guest-physical address of the PVH `hvm_start_info` (module list and memory map follow).
pub const START_INFO_ADDR: u64 = 0x6000;
/// Guest-physical address of the bzImage zero page (`struct boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Guest-physical address of the command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Longest command line accepted (the kernel may accept less: `cmdline_size`).
pub const CMDLINE_MAX: usize = 0xFFFF;
/// Where the bzImage's protected-mode code is loaded (its `code32_start`).
pub const BZIMAGE_LOAD: u64 = 0x10_0000;
const BOOT_CS: u16 = 0x10;
const BOOT_DS: u16 = 0x18;
const HVM_START_MAGIC: u32 = 0x336E_C578;
const HDRS: &[u8; 4] = b"HdrS";
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// Which Linux boot path an image takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A bzImage ("HdrS" at 0x202): the 32-bit boot protocol.
    BzImage,
    /// An ELF64 image without a multiboot header: its PVH entry note is required.
    Pvh,
}

/// Recognises a Linux image: a bzImage by its "HdrS" setup-header magic (boot
/// protocol 2.00+), or an ELF64 file with no multiboot header magic in its first
/// 8 KiB (a vmlinux). `None`: treat it as a multiboot image.
pub fn detect(image: &[u8]) -> Option<Kind> {
    if image.get(0x202..0x206) == Some(HDRS) {
        return Some(Kind::BzImage);
    }
    let multiboot = image
        .get(..image.len().min(8192))
        .unwrap_or(&[])
        .chunks_exact(4)
        .any(|w| w == crate::loader::HEADER_MAGIC.to_le_bytes());
    (image.get(..5) == Some(b"\x7FELF\x02") && !multiboot).then_some(Kind::Pvh)
}

/// Where the kernel was put and how to enter it (32-bit protected mode, paging off,
/// flat `__BOOT_CS`/`__BOOT_DS` from the boot GDT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinuxBoot {
    /// The boot path taken.
    pub kind: Kind,
    /// Entry EIP.
    pub entry: u32,
    /// ESI at entry: the zero page (bzImage), else 0.
    pub esi: u32,
    /// EBX at entry: the `hvm_start_info` (PVH), else 0.
    pub ebx: u32,
    /// Where the initrd was put (address, length), if any.
    pub initrd: Option<(u64, u64)>,
}

fn err<T>(m: impl Into<String>) -> Result<T, LoadError> {
    Err(LoadError(m.into()))
}

fn write(ram: &GuestRam, addr: u64, b: &[u8]) -> Result<(), LoadError> {
    ram.write(addr, b).map_err(LoadError)
}

/// The memory map both paths pass: low RAM, the BIOS hole (ACPI tables live
/// there), RAM from 1 MiB, the IOAPIC and LAPIC pages.
pub fn e820(ram_size: u64) -> [(u64, u64, u32); 5] {
    [
        (0, LOW_RAM_END, E820_RAM),
        (LOW_RAM_END, HIGH_RAM_START - LOW_RAM_END, E820_RESERVED),
        (
            HIGH_RAM_START,
            ram_size.saturating_sub(HIGH_RAM_START),
            E820_RAM,
        ),
        (0xFEC0_0000, 0x1000, E820_RESERVED),
        (0xFEE0_0000, 0x1000, E820_RESERVED),
    ]
}

/// Puts `initrd` at the highest page-aligned address below `limit` (and RAM's end)
/// that stays above `floor` (the end of what the kernel occupies while it boots).
fn place_initrd(
    ram: &GuestRam,
    initrd: &[u8],
    floor: u64,
    limit: u64,
) -> Result<Option<(u64, u64)>, LoadError> {
    if initrd.is_empty() {
        return Ok(None);
    }
    let len = initrd.len() as u64;
    let top = ram.size().min(limit);
    let at = top.checked_sub(len).map(|a| a & !0xFFF);
    match at {
        Some(a) if a >= floor => {
            write(ram, a, initrd)?;
            Ok(Some((a, len)))
        }
        _ => err(format!(
            "initrd of {len} bytes does not fit between {floor:#x} and {top:#x} (raise --memory)"
        )),
    }
}

fn write_cmdline(ram: &GuestRam, cmdline: &str, max: usize) -> Result<(), LoadError> {
    if cmdline.len() > max {
        return err(format!(
            "command line of {} bytes is longer than the kernel's limit of {max}",
            cmdline.len()
        ));
    }
    let mut b = cmdline.as_bytes().to_vec();
    b.push(0);
    write(ram, CMDLINE_ADDR, &b)
}

/// Loads the Linux image `image` of kind `kind` with `cmdline` and `initrd`, and
/// writes the boot GDT, the ACPI tables for `acpi` and the boot structures.
pub fn load(
    ram: &GuestRam,
    kind: Kind,
    image: &[u8],
    cmdline: &str,
    initrd: &[u8],
    acpi: &AcpiConfig,
) -> Result<LinuxBoot, LoadError> {
    let tables = acpi::build(acpi).map_err(LoadError)?;
    write(ram, tables.rsdp, &tables.bytes)?;
    let gdt: [u64; 4] = [0, 0, 0x00CF_9A00_0000_FFFF, 0x00CF_9200_0000_FFFF];
    let gdt: Vec<u8> = gdt.iter().flat_map(|d| d.to_le_bytes()).collect();
    write(ram, GDT_ADDR, &gdt)?;
    match kind {
        Kind::BzImage => load_bzimage(ram, image, cmdline, initrd, tables.rsdp),
        Kind::Pvh => load_pvh(ram, image, cmdline, initrd, tables.rsdp),
    }
}

fn load_bzimage(
    ram: &GuestRam,
    image: &[u8],
    cmdline: &str,
    initrd: &[u8],
    rsdp: u64,
) -> Result<LinuxBoot, LoadError> {
    let r = BzImage::load(
        ram.memory(),
        Some(GuestAddress(BZIMAGE_LOAD)),
        &mut Cursor::new(image),
        Some(GuestAddress(HIGH_RAM_START)),
    )
    .map_err(|e| LoadError(format!("bzImage: {e}")))?;
    let Some(mut hdr) = r.setup_header else {
        return err("bzImage: no setup header");
    };
    let version = hdr.version;
    if version < 0x0206 {
        return err(format!(
            "bzImage: boot protocol {}.{:02} is older than 2.06",
            version >> 8,
            version & 0xFF
        ));
    }
    // The kernel decompresses itself to pref_address (or the load address) and needs
    // init_size bytes there (boot protocol §"Details of header fields").
    let base = if hdr.relocatable_kernel != 0 {
        hdr.pref_address.max(BZIMAGE_LOAD)
    } else {
        BZIMAGE_LOAD
    };
    let need = base.saturating_add(u64::from(hdr.init_size));
    if need > ram.size() {
        return err(format!(
            "bzImage needs RAM up to {need:#x} to decompress ({} MiB; raise --memory)",
            need.div_ceil(1 << 20)
        ));
    }
    write_cmdline(ram, cmdline, (hdr.cmdline_size as usize).min(CMDLINE_MAX))?;
    let floor = need.max(r.kernel_end);
    let limit = u64::from(hdr.initrd_addr_max).saturating_add(1);
    let rd = place_initrd(ram, initrd, floor, limit)?;
    hdr.type_of_loader = 0xFF;
    hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    hdr.code32_start = BZIMAGE_LOAD as u32;
    if let Some((a, l)) = rd {
        hdr.ramdisk_image = a as u32;
        hdr.ramdisk_size = l as u32;
    }
    let mut bp = boot_params {
        hdr,
        acpi_rsdp_addr: rsdp,
        ..Default::default()
    };
    let map = e820(ram.size());
    for (slot, (addr, size, ty)) in bp.e820_table.iter_mut().zip(map) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: ty,
        };
    }
    bp.e820_entries = map.len() as u8;
    write(ram, ZERO_PAGE_ADDR, bp.as_slice())?;
    Ok(LinuxBoot {
        kind: Kind::BzImage,
        entry: BZIMAGE_LOAD as u32,
        esi: ZERO_PAGE_ADDR as u32,
        ebx: 0,
        initrd: rd,
    })
}

fn load_pvh(
    ram: &GuestRam,
    image: &[u8],
    cmdline: &str,
    initrd: &[u8],
    rsdp: u64,
) -> Result<LinuxBoot, LoadError> {
    let r = Elf::load(
        ram.memory(),
        None,
        &mut Cursor::new(image),
        Some(GuestAddress(HIGH_RAM_START)),
    )
    .map_err(|e| LoadError(format!("vmlinux: {e}")))?;
    let entry = match r.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(a) => a.0,
        _ => {
            return err(
                "ELF image has neither a multiboot header nor a PVH entry note \
                 (XEN_ELFNOTE_PHYS32_ENTRY; Linux needs CONFIG_PVH=y)",
            )
        }
    };
    let entry = u32::try_from(entry)
        .ok()
        .filter(|e| u64::from(*e) < ram.size())
        .ok_or_else(|| LoadError(format!("PVH entry {entry:#x} is outside RAM")))?;
    write_cmdline(ram, cmdline, CMDLINE_MAX)?;
    let rd = place_initrd(ram, initrd, r.kernel_end, u64::MAX)?;
    // hvm_start_info (56 bytes), then one module entry, then the memory map
    // (Xen's include/public/arch-x86/hvm/start_info.h, version 1).
    let modlist = START_INFO_ADDR + 0x40;
    let memmap = START_INFO_ADDR + 0x100;
    let map = e820(ram.size());
    let mut si = Vec::with_capacity(56);
    si.extend_from_slice(&HVM_START_MAGIC.to_le_bytes());
    si.extend_from_slice(&1u32.to_le_bytes()); // version
    si.extend_from_slice(&0u32.to_le_bytes()); // flags
    si.extend_from_slice(&u32::from(rd.is_some()).to_le_bytes());
    si.extend_from_slice(&modlist.to_le_bytes());
    si.extend_from_slice(&CMDLINE_ADDR.to_le_bytes());
    si.extend_from_slice(&rsdp.to_le_bytes());
    si.extend_from_slice(&memmap.to_le_bytes());
    si.extend_from_slice(&(map.len() as u32).to_le_bytes());
    si.extend_from_slice(&0u32.to_le_bytes());
    write(ram, START_INFO_ADDR, &si)?;
    if let Some((a, l)) = rd {
        let mut m = [0u8; 32];
        m[0..8].copy_from_slice(&a.to_le_bytes());
        m[8..16].copy_from_slice(&l.to_le_bytes());
        write(ram, modlist, &m)?;
    }
    for (i, (addr, size, ty)) in map.iter().enumerate() {
        let mut e = [0u8; 24];
        e[0..8].copy_from_slice(&addr.to_le_bytes());
        e[8..16].copy_from_slice(&size.to_le_bytes());
        e[16..20].copy_from_slice(&ty.to_le_bytes());
        write(ram, memmap + 24 * i as u64, &e)?;
    }
    Ok(LinuxBoot {
        kind: Kind::Pvh,
        entry,
        esi: 0,
        ebx: START_INFO_ADDR as u32,
        initrd: rd,
    })
}

/// Enters `boot` on the BSP: 32-bit protected mode, paging off, interrupts off, the
/// boot GDT loaded, CS `__BOOT_CS` and the data segments `__BOOT_DS` (what both the
/// 32-bit boot protocol and the PVH ABI ask for), ESI/EBX as `boot` says.
pub fn enter(fd: &VcpuFd, boot: &LinuxBoot) -> Result<(), String> {
    let mut s = fd.get_sregs().map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    s.cs = vlapic_kvm::setup::flat_segment(BOOT_CS, true);
    for d in [&mut s.ds, &mut s.es, &mut s.fs, &mut s.gs, &mut s.ss] {
        *d = vlapic_kvm::setup::flat_segment(BOOT_DS, false);
    }
    s.gdt.base = GDT_ADDR;
    s.gdt.limit = 31;
    s.cr0 = 0x11;
    s.cr4 = 0;
    s.efer = 0;
    fd.set_sregs(&s)
        .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
    let regs = kvm_regs {
        rip: u64::from(boot.entry),
        rsi: u64::from(boot.esi),
        rbx: u64::from(boot.ebx),
        rflags: 2,
        ..Default::default()
    };
    fd.set_regs(&regs).map_err(|e| format!("KVM_SET_REGS: {e}"))
}

#[cfg(test)]
#[path = "linux_tests.rs"]
mod tests;

//! Tests of the Linux loader on synthetic images: detection, bzImage setup header
//! and boot_params, PVH start info, e820 against the RAM size, size bounds, errors.

use super::*;

fn acpi(n: u32) -> AcpiConfig {
    AcpiConfig {
        apic_ids: (0..n).collect(),
        ioapic_id: n as u8,
        ioapic_addr: 0xFEC0_0000,
        lapic_addr: 0xFEE0_0000,
    }
}

fn rd<const N: usize>(ram: &GuestRam, addr: u64) -> [u8; N] {
    let mut b = [0u8; N];
    ram.read(addr, &mut b).unwrap();
    b
}

fn u16_in(ram: &GuestRam, addr: u64) -> u16 {
    u16::from_le_bytes(rd(ram, addr))
}

fn u32_in(ram: &GuestRam, addr: u64) -> u32 {
    u32::from_le_bytes(rd(ram, addr))
}

fn u64_in(ram: &GuestRam, addr: u64) -> u64 {
    u64::from_le_bytes(rd(ram, addr))
}

/// A bzImage as the boot protocol lays it out (Documentation/x86/boot.rst): 4 setup
/// sectors plus the boot sector, "HdrS" protocol 2.15, then `payload` as the
/// protected-mode code. `init_size` is what the kernel needs from `pref_address`.
fn bzimage(payload: &[u8], init_size: u32) -> Vec<u8> {
    let setup_sects = 4u8;
    let mut img = vec![0u8; (usize::from(setup_sects) + 1) * 512];
    img[0x1F1] = setup_sects;
    img[0x1FE..0x200].copy_from_slice(&0xAA55u16.to_le_bytes());
    img[0x201] = 0x6A; // jump: header ends at 0x26C
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020Fu16.to_le_bytes());
    img[0x211] = 1; // loadflags: LOADED_HIGH
    img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    img[0x22C..0x230].copy_from_slice(&0x37FF_FFFFu32.to_le_bytes()); // initrd_addr_max
    img[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes()); // kernel_alignment
    img[0x234] = 1; // relocatable
    img[0x238..0x23C].copy_from_slice(&2048u32.to_le_bytes()); // cmdline_size
    img[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes()); // pref_address
    img[0x260..0x264].copy_from_slice(&init_size.to_le_bytes());
    img.extend_from_slice(payload);
    img
}

/// An ELF64 vmlinux: one PT_LOAD of `code` at physical 16 MiB and a PT_NOTE with
/// XEN_ELFNOTE_PHYS32_ENTRY (18) = `pvh_entry` when given.
fn vmlinux(code: &[u8], pvh_entry: Option<u32>) -> Vec<u8> {
    let phnum = if pvh_entry.is_some() { 2u16 } else { 1 };
    let data_off = 64 + 56 * u64::from(phnum);
    let note: Vec<u8> = match pvh_entry {
        Some(e) => {
            let mut n = Vec::new();
            n.extend_from_slice(&4u32.to_le_bytes()); // namesz "Xen\0"
            n.extend_from_slice(&4u32.to_le_bytes()); // descsz
            n.extend_from_slice(&18u32.to_le_bytes()); // type
            n.extend_from_slice(b"Xen\0");
            n.extend_from_slice(&e.to_le_bytes());
            n
        }
        None => Vec::new(),
    };
    let mut e = vec![0u8; 64];
    e[0..4].copy_from_slice(b"\x7FELF");
    e[4] = 2;
    e[5] = 1;
    e[6] = 1;
    e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    e[20..24].copy_from_slice(&1u32.to_le_bytes());
    e[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes());
    e[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
    e[52..54].copy_from_slice(&64u16.to_le_bytes());
    e[54..56].copy_from_slice(&56u16.to_le_bytes());
    e[56..58].copy_from_slice(&phnum.to_le_bytes());
    let ph = |ty: u32, off: u64, paddr: u64, len: u64, align: u64| {
        let mut p = vec![0u8; 56];
        p[0..4].copy_from_slice(&ty.to_le_bytes());
        p[4..8].copy_from_slice(&7u32.to_le_bytes());
        p[8..16].copy_from_slice(&off.to_le_bytes());
        p[16..24].copy_from_slice(&paddr.to_le_bytes());
        p[24..32].copy_from_slice(&paddr.to_le_bytes());
        p[32..40].copy_from_slice(&len.to_le_bytes());
        p[40..48].copy_from_slice(&len.to_le_bytes());
        p[48..56].copy_from_slice(&align.to_le_bytes());
        p
    };
    let code_off = data_off + note.len() as u64;
    e.extend(ph(1, code_off, 0x100_0000, code.len() as u64, 0x1000));
    if pvh_entry.is_some() {
        e.extend(ph(4, data_off, 0, note.len() as u64, 4));
    }
    e.extend_from_slice(&note);
    e.extend_from_slice(code);
    e
}

#[test]
fn detects_bzimage_vmlinux_and_leaves_multiboot_alone() {
    assert_eq!(detect(&bzimage(&[0x90], 0x1000)), Some(Kind::BzImage));
    assert_eq!(detect(&vmlinux(&[0x90], Some(0x100_0000))), Some(Kind::Pvh));
    // An ELF64 carrying the multiboot magic stays a multiboot image.
    let mut mb = vmlinux(&[0x90; 16], None);
    mb.extend_from_slice(&crate::loader::HEADER_MAGIC.to_le_bytes());
    assert_eq!(detect(&mb), None);
    assert_eq!(detect(b""), None);
    assert_eq!(detect(b"\x7FELF\x01"), None); // ELF32: multiboot's
}

/// The 32-bit boot protocol (Documentation/x86/boot.rst, "Running the kernel" and
/// "32-bit boot protocol"): code at code32_start, the setup header copied into the
/// zero page with type_of_loader 0xFF, cmd_line_ptr, ramdisk_image/size, an e820 map
/// matching --memory, acpi_rsdp_addr (protocol 2.14); ESI = the zero page.
#[test]
fn bzimage_boot_params() {
    let ram = GuestRam::new(64).unwrap();
    let img = bzimage(&[0xF4, 0xEB, 0xFD], 0x100_0000);
    let initrd = vec![0x5A; 5000];
    let b = load(
        &ram,
        Kind::BzImage,
        &img,
        "console=ttyS0",
        &initrd,
        &acpi(2),
    )
    .unwrap();
    assert_eq!(
        (b.entry, b.esi, b.ebx),
        (0x10_0000, ZERO_PAGE_ADDR as u32, 0)
    );
    assert_eq!(rd::<3>(&ram, 0x10_0000), [0xF4, 0xEB, 0xFD]);
    let zp = ZERO_PAGE_ADDR;
    assert_eq!(&rd::<4>(&ram, zp + 0x202), b"HdrS");
    assert_eq!(rd::<1>(&ram, zp + 0x210), [0xFF]); // type_of_loader
    assert_eq!(u32_in(&ram, zp + 0x214), 0x10_0000); // code32_start
    assert_eq!(u32_in(&ram, zp + 0x228), CMDLINE_ADDR as u32);
    assert_eq!(&rd::<14>(&ram, CMDLINE_ADDR), b"console=ttyS0\0");
    let (ra, rl) = (u32_in(&ram, zp + 0x218), u32_in(&ram, zp + 0x21C));
    assert_eq!(b.initrd, Some((u64::from(ra), 5000)));
    assert_eq!(rl, 5000);
    assert_eq!(ra % 4096, 0);
    assert!(
        u64::from(ra) >= 0x200_0000,
        "above pref_address + init_size"
    );
    assert!(u64::from(ra) + 5000 <= 64 << 20);
    assert_eq!(rd::<1>(&ram, u64::from(ra)), [0x5A]);
    assert_eq!(u64_in(&ram, zp + 0x70), 0xE_0000); // acpi_rsdp_addr
    assert_eq!(&rd::<8>(&ram, 0xE_0000), b"RSD PTR ");
    // e820: 5 entries; RAM from 1 MiB to the end of --memory.
    assert_eq!(rd::<1>(&ram, zp + 0x1E8), [5]);
    let e = |i: u64| {
        let a = zp + 0x2D0 + 20 * i;
        (u64_in(&ram, a), u64_in(&ram, a + 8), u32_in(&ram, a + 16))
    };
    assert_eq!(e(0), (0, LOW_RAM_END, 1));
    assert_eq!(e(2), (HIGH_RAM_START, (64 << 20) - HIGH_RAM_START, 1));
    assert_eq!(e(3).0, 0xFEC0_0000);
    // The boot GDT: __BOOT_CS (0x10) code, __BOOT_DS (0x18) data, flat.
    assert_eq!(u64_in(&ram, GDT_ADDR + 0x10), 0x00CF_9A00_0000_FFFF);
    assert_eq!(u64_in(&ram, GDT_ADDR + 0x18), 0x00CF_9200_0000_FFFF);
}

/// Xen's PVH ABI (start_info.h, version 1): magic, the command line, one module
/// (the initrd), the memory map and the RSDP; EBX = the start info, EIP = the
/// XEN_ELFNOTE_PHYS32_ENTRY note.
#[test]
fn pvh_start_info() {
    let ram = GuestRam::new(64).unwrap();
    let img = vmlinux(&[0xF4; 32], Some(0x100_0010));
    let b = load(&ram, Kind::Pvh, &img, "quiet", b"RAMDISK", &acpi(1)).unwrap();
    assert_eq!(
        (b.entry, b.esi, b.ebx),
        (0x100_0010, 0, START_INFO_ADDR as u32)
    );
    let si = START_INFO_ADDR;
    assert_eq!(u32_in(&ram, si), 0x336E_C578);
    assert_eq!(u32_in(&ram, si + 4), 1);
    assert_eq!(u32_in(&ram, si + 12), 1); // nr_modules
    assert_eq!(u64_in(&ram, si + 24), CMDLINE_ADDR);
    assert_eq!(&rd::<6>(&ram, CMDLINE_ADDR), b"quiet\0");
    assert_eq!(u64_in(&ram, si + 32), 0xE_0000); // rsdp_paddr
    let modlist = u64_in(&ram, si + 16);
    let (pa, len) = (u64_in(&ram, modlist), u64_in(&ram, modlist + 8));
    assert_eq!(len, 7);
    assert_eq!(&rd::<7>(&ram, pa), b"RAMDISK");
    let memmap = u64_in(&ram, si + 40);
    assert_eq!(u32_in(&ram, si + 48), 5);
    assert_eq!(
        u64_in(&ram, memmap + 24 * 2 + 8),
        (64 << 20) - HIGH_RAM_START
    );
    assert_eq!(u16_in(&ram, 0x100_0000), 0xF4F4);
}

/// Bad or oversized images and arguments: one-line errors, no panic.
#[test]
fn bad_linux_images_are_one_line_errors() {
    let ram = GuestRam::new(32).unwrap();
    let a = acpi(1);
    let long = "x".repeat(3000);
    // (kind, image, command line, initrd, expected error text)
    type Case<'a> = (Kind, Vec<u8>, &'a str, Vec<u8>, &'a str);
    let cases: Vec<Case> = vec![
        // Needs 16 MiB + 64 MiB to decompress; RAM is 32 MiB.
        (
            Kind::BzImage,
            bzimage(&[0x90], 0x400_0000),
            "",
            vec![],
            "raise --memory",
        ),
        (
            Kind::BzImage,
            bzimage(&[0x90], 0x1000),
            &long,
            vec![],
            "longer than",
        ),
        (
            Kind::BzImage,
            bzimage(&[0x90], 0x1000),
            "",
            vec![0; 31 << 20],
            "initrd of",
        ),
        (Kind::BzImage, b"HdrS".to_vec(), "", vec![], "bzImage"),
        (
            Kind::Pvh,
            vmlinux(&[0x90], None),
            "",
            vec![],
            "PVH entry note",
        ),
        (
            Kind::Pvh,
            vmlinux(&[0x90], Some(0x7FFF_0000)),
            "",
            vec![],
            "outside RAM",
        ),
        (
            Kind::Pvh,
            b"\x7FELF\x02\x01".to_vec(),
            "",
            vec![],
            "vmlinux",
        ),
    ];
    for (kind, img, cmd, initrd, want) in cases {
        match load(&ram, kind, &img, cmd, &initrd, &a) {
            Err(LoadError(m)) => {
                assert!(m.contains(want), "{want:?} not in {m:?}");
                assert!(!m.contains('\n'), "{m:?}");
            }
            Ok(b) => panic!("{want}: loaded {b:?}"),
        }
    }
    // An old protocol version is refused.
    let mut old = bzimage(&[0x90], 0x1000);
    old[0x206..0x208].copy_from_slice(&0x0205u16.to_le_bytes());
    let e = load(&ram, Kind::BzImage, &old, "", &[], &a).unwrap_err();
    assert!(e.0.contains("older than 2.06"), "{e}");
}

#[test]
fn fuzzed_linux_headers_never_panic() {
    let ram = GuestRam::new(32).unwrap();
    let a = acpi(2);
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    for base in [
        bzimage(&[0x90; 64], 0x1000),
        vmlinux(&[0x90; 64], Some(0x100_0000)),
    ] {
        for _ in 0..1000 {
            let mut img = base.clone();
            for _ in 0..4 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                // bzImage: the setup header and after; vmlinux: anywhere.
                let from = if base[0] == 0x7F { 0 } else { 0x1F0 };
                let i = from + (seed as usize) % (img.len() - from);
                img[i] = (seed >> 32) as u8;
            }
            if let Some(kind) = detect(&img) {
                let _ = load(&ram, kind, &img, "", b"rd", &a);
            }
        }
    }
}

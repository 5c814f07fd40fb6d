//! Multiboot v1 loader (ELF32, ELF64 with 32-bit addresses, a.out kludge): checked
//! offsets, header flags honoured, command line, modules and memory map passed.

use std::fmt;

use crate::memory::{GuestRam, HIGH_RAM_START, LOW_RAM_END};

/// Multiboot v1 header magic.
pub const HEADER_MAGIC: u32 = 0x1BAD_B002;
/// Value of EAX at entry.
pub const BOOT_MAGIC: u32 = 0x2BAD_B002;
/// Guest-physical address of the multiboot information structure.
pub const INFO_ADDR: u64 = 0x2_0000;
/// End of the area used for the info structure, memory map, strings and module list.
const INFO_END: u64 = 0x7_0000;

const FLAG_PAGE_ALIGN: u32 = 1 << 0;
const FLAG_MEMINFO: u32 = 1 << 1;
const FLAG_VIDEO: u32 = 1 << 2;
const FLAG_AOUT_KLUDGE: u32 = 1 << 16;
/// Required-feature bits (0–15) this loader understands.
const KNOWN_REQUIRED: u32 = FLAG_PAGE_ALIGN | FLAG_MEMINFO | FLAG_VIDEO;

/// Why an image could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError(pub String);

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LoadError {}

fn err<T>(msg: impl Into<String>) -> Result<T, LoadError> {
    Err(LoadError(msg.into()))
}

/// One boot module: its contents and its command line.
#[derive(Debug, Clone)]
pub struct Module {
    /// Module contents.
    pub data: Vec<u8>,
    /// Module string (usually its name and arguments).
    pub cmdline: String,
}

/// Where the image was put and how to enter it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootInfo {
    /// Entry point (EIP, 32-bit protected mode, paging off).
    pub entry: u32,
    /// Address of the multiboot info structure (EBX).
    pub info: u32,
    /// First byte past the loaded image (including BSS).
    pub image_end: u64,
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes(s.try_into().ok()?))
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    let s = b.get(off..off.checked_add(2)?)?;
    Some(u16::from_le_bytes(s.try_into().ok()?))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    let s = b.get(off..off.checked_add(8)?)?;
    Some(u64::from_le_bytes(s.try_into().ok()?))
}

/// The multiboot header found in an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// File offset of the header.
    pub offset: usize,
    /// Header flags.
    pub flags: u32,
    /// a.out kludge fields: header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr.
    pub aout: Option<[u32; 5]>,
}

/// Finds and checks the multiboot header (within the first 8 KiB, 4-byte aligned).
pub fn find_header(image: &[u8]) -> Result<Header, LoadError> {
    let limit = image.len().min(8192);
    let mut off = 0;
    while off + 12 <= limit {
        if u32_at(image, off) == Some(HEADER_MAGIC) {
            let flags = u32_at(image, off + 4).unwrap_or(0);
            let sum = u32_at(image, off + 8).unwrap_or(0);
            if HEADER_MAGIC.wrapping_add(flags).wrapping_add(sum) != 0 {
                return err(format!(
                    "multiboot header at offset {off:#x}: bad checksum {sum:#010x}"
                ));
            }
            let unknown = flags & 0xFFFF & !KNOWN_REQUIRED;
            if unknown != 0 {
                return err(format!(
                    "multiboot header requires unsupported features (flags {unknown:#x})"
                ));
            }
            let aout = if flags & FLAG_AOUT_KLUDGE != 0 {
                let mut f = [0u32; 5];
                for (i, v) in f.iter_mut().enumerate() {
                    *v = u32_at(image, off + 12 + 4 * i).ok_or_else(|| {
                        LoadError("multiboot header: a.out kludge fields truncated".into())
                    })?;
                }
                Some(f)
            } else {
                None
            };
            return Ok(Header {
                offset: off,
                flags,
                aout,
            });
        }
        off += 4;
    }
    err("not a multiboot v1 image: no header magic 0x1BADB002 in the first 8 KiB")
}

/// A loadable segment: file bytes to copy, then zeros up to `memsz`.
struct Segment {
    paddr: u64,
    file_off: usize,
    filesz: usize,
    memsz: u64,
}

fn elf_segments(image: &[u8]) -> Result<(u32, Vec<Segment>), LoadError> {
    if image.get(..4) != Some(b"\x7FELF") {
        return err("multiboot image is not ELF and has no a.out kludge (header flag 16)");
    }
    let class = image.get(4).copied();
    if image.get(5).copied() != Some(1) {
        return err("ELF image is not little-endian");
    }
    let bad = || LoadError("ELF header truncated".into());
    let (entry, phoff, phentsize, phnum) = match class {
        Some(1) => (
            u64::from(u32_at(image, 24).ok_or_else(bad)?),
            u64::from(u32_at(image, 28).ok_or_else(bad)?),
            u16_at(image, 42).ok_or_else(bad)?,
            u16_at(image, 44).ok_or_else(bad)?,
        ),
        Some(2) => (
            u64_at(image, 24).ok_or_else(bad)?,
            u64_at(image, 32).ok_or_else(bad)?,
            u16_at(image, 54).ok_or_else(bad)?,
            u16_at(image, 56).ok_or_else(bad)?,
        ),
        _ => return err("ELF image has an unknown class"),
    };
    let entry = u32::try_from(entry)
        .map_err(|_| LoadError(format!("ELF entry {entry:#x} is above 4 GiB")))?;
    let want = if class == Some(1) { 32 } else { 56 };
    if usize::from(phentsize) < want {
        return err(format!("ELF program header size {phentsize} is too small"));
    }
    let mut segs = Vec::new();
    for i in 0..usize::from(phnum) {
        let ph = usize::try_from(phoff)
            .ok()
            .and_then(|o| o.checked_add(i.checked_mul(usize::from(phentsize))?))
            .ok_or_else(|| LoadError("ELF program header offset overflows".into()))?;
        let trunc = || LoadError(format!("ELF program header {i} is outside the file"));
        let (ptype, off, paddr, filesz, memsz) = if class == Some(1) {
            (
                u32_at(image, ph).ok_or_else(trunc)?,
                u64::from(u32_at(image, ph + 4).ok_or_else(trunc)?),
                u64::from(u32_at(image, ph + 12).ok_or_else(trunc)?),
                u64::from(u32_at(image, ph + 16).ok_or_else(trunc)?),
                u64::from(u32_at(image, ph + 20).ok_or_else(trunc)?),
            )
        } else {
            (
                u32_at(image, ph).ok_or_else(trunc)?,
                u64_at(image, ph + 8).ok_or_else(trunc)?,
                u64_at(image, ph + 24).ok_or_else(trunc)?,
                u64_at(image, ph + 32).ok_or_else(trunc)?,
                u64_at(image, ph + 40).ok_or_else(trunc)?,
            )
        };
        if ptype != 1 {
            continue;
        }
        if filesz > memsz {
            return err(format!(
                "ELF segment {i}: file size {filesz:#x} exceeds memory size {memsz:#x}"
            ));
        }
        let file_end = off.checked_add(filesz).filter(|e| *e <= image.len() as u64);
        if file_end.is_none() {
            return err(format!(
                "ELF segment {i}: file range {off:#x}+{filesz:#x} is outside the file"
            ));
        }
        segs.push(Segment {
            paddr,
            file_off: off as usize,
            filesz: filesz as usize,
            memsz,
        });
    }
    if segs.is_empty() {
        return err("ELF image has no loadable segment");
    }
    Ok((entry, segs))
}

fn aout_segments(image: &[u8], h: &Header, f: [u32; 5]) -> Result<(u32, Vec<Segment>), LoadError> {
    let [header_addr, load_addr, load_end, bss_end, entry] = f;
    let hdr_off = h.offset as u64;
    if u64::from(header_addr) < u64::from(load_addr)
        || u64::from(header_addr) - u64::from(load_addr) > hdr_off
    {
        return err(
            "a.out kludge: header_addr/load_addr inconsistent with the header's file offset",
        );
    }
    let file_off = hdr_off - (u64::from(header_addr) - u64::from(load_addr));
    let filesz = if load_end == 0 {
        image.len() as u64 - file_off
    } else if load_end < load_addr {
        return err("a.out kludge: load_end_addr below load_addr");
    } else {
        u64::from(load_end - load_addr)
    };
    if file_off + filesz > image.len() as u64 {
        return err("a.out kludge: load range extends past the end of the file");
    }
    let end = u64::from(load_addr) + filesz;
    let memsz = if bss_end == 0 {
        filesz
    } else if u64::from(bss_end) < end {
        return err("a.out kludge: bss_end_addr below load_end_addr");
    } else {
        u64::from(bss_end) - u64::from(load_addr)
    };
    Ok((
        entry,
        vec![Segment {
            paddr: u64::from(load_addr),
            file_off: file_off as usize,
            filesz: filesz as usize,
            memsz,
        }],
    ))
}

/// Little helper that lays out the info area.
struct InfoWriter {
    next: u64,
}

impl InfoWriter {
    fn alloc(&mut self, len: u64, align: u64) -> Result<u64, LoadError> {
        let a = self.next.div_ceil(align) * align;
        let end = a + len;
        if end > INFO_END {
            return err("command line, module strings and memory map do not fit the info area");
        }
        self.next = end;
        Ok(a)
    }
}

/// The multiboot command line a loader builds for `kernel_name` with `append`:
/// the kernel's file name as given, one space, then the appended text.
///
/// QEMU's multiboot loader (`-kernel FILE -append TEXT`) passes exactly
/// `"FILE TEXT"`, FILE as typed on its command line (relative paths stay
/// relative) and the space kept even when TEXT is empty; observed with QEMU 7.2
/// booting `tests/multiboot/mbinfo.c`, which prints the string. GRUB's `multiboot
/// FILE ARGS...` likewise starts the string with the file name. Kernels that build
/// `argv` from the whole line (kvm-unit-tests) rely on it: `argv[0]` is the file
/// name and the first appended word is `argv[1]`.
pub fn multiboot_cmdline(kernel_name: &str, append: &str) -> String {
    format!("{kernel_name} {append}")
}

/// Loads a multiboot v1 image and its modules into RAM and writes the info
/// structure (memory info, command line, modules, memory map).
pub fn load(
    ram: &GuestRam,
    image: &[u8],
    cmdline: &str,
    modules: &[Module],
) -> Result<BootInfo, LoadError> {
    let h = find_header(image)?;
    let (entry, segs) = match h.aout {
        Some(f) => aout_segments(image, &h, f)?,
        None => elf_segments(image)?,
    };
    let mut image_end = 0u64;
    for s in &segs {
        let end = s
            .paddr
            .checked_add(s.memsz)
            .ok_or_else(|| LoadError("segment end overflows".into()))?;
        if s.paddr < HIGH_RAM_START && end > INFO_ADDR {
            return err(format!(
                "segment at {:#x}..{end:#x} overlaps the loader's low-memory area",
                s.paddr
            ));
        }
        if end > ram.size() {
            return err(format!(
                "segment at {:#x}..{end:#x} does not fit in {} MiB of RAM",
                s.paddr,
                ram.size() >> 20
            ));
        }
        let bytes = image
            .get(s.file_off..s.file_off + s.filesz)
            .ok_or_else(|| LoadError("segment outside the file".into()))?;
        ram.write(s.paddr, bytes).map_err(LoadError)?;
        ram.zero(s.paddr + s.filesz as u64, s.memsz - s.filesz as u64)
            .map_err(LoadError)?;
        image_end = image_end.max(end);
    }
    if u64::from(entry) >= ram.size() {
        return err(format!("entry point {entry:#x} is outside RAM"));
    }

    let mut w = InfoWriter {
        next: INFO_ADDR + 128,
    };
    let put_str = |w: &mut InfoWriter, s: &str| -> Result<u64, LoadError> {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        let a = w.alloc(b.len() as u64, 1)?;
        ram.write(a, &b).map_err(LoadError)?;
        Ok(a)
    };
    let cmdline_addr = put_str(&mut w, cmdline)?;
    let loader_name = put_str(&mut w, "vlapic-vmm")?;

    // Modules go after the image, page aligned (flag 0 asks for it; we always do).
    let mut mod_next = image_end.div_ceil(4096) * 4096;
    let mods_addr = w.alloc(16 * modules.len() as u64, 4)?;
    for (i, m) in modules.iter().enumerate() {
        let start = mod_next;
        let end = start + m.data.len() as u64;
        if end > ram.size() {
            return err(format!("module {i} does not fit in RAM"));
        }
        ram.write(start, &m.data).map_err(LoadError)?;
        let s = put_str(&mut w, &m.cmdline)?;
        let mut e = [0u8; 16];
        e[0..4].copy_from_slice(&(start as u32).to_le_bytes());
        e[4..8].copy_from_slice(&(end as u32).to_le_bytes());
        e[8..12].copy_from_slice(&(s as u32).to_le_bytes());
        ram.write(mods_addr + 16 * i as u64, &e)
            .map_err(LoadError)?;
        mod_next = end.div_ceil(4096) * 4096;
    }

    // Memory map: size(4) base(8) len(8) type(4) per entry.
    let map = [
        (0u64, LOW_RAM_END, 1u32),
        (LOW_RAM_END, HIGH_RAM_START - LOW_RAM_END, 2),
        (HIGH_RAM_START, ram.size() - HIGH_RAM_START, 1),
        (0xFEC0_0000, 0x1000, 2),
        (0xFEE0_0000, 0x1000, 2),
    ];
    let mmap_addr = w.alloc(24 * map.len() as u64, 4)?;
    for (i, (base, len, ty)) in map.iter().enumerate() {
        let mut e = [0u8; 24];
        e[0..4].copy_from_slice(&20u32.to_le_bytes());
        e[4..12].copy_from_slice(&base.to_le_bytes());
        e[12..20].copy_from_slice(&len.to_le_bytes());
        e[20..24].copy_from_slice(&ty.to_le_bytes());
        ram.write(mmap_addr + 24 * i as u64, &e)
            .map_err(LoadError)?;
    }

    // The info structure (flags: mem 0, cmdline 2, mods 3, mmap 6, loader name 9).
    let mut info = [0u8; 128];
    let mut put = |off: usize, v: u32| {
        if let Some(s) = info.get_mut(off..off + 4) {
            s.copy_from_slice(&v.to_le_bytes());
        }
    };
    let flags = 1 | 1 << 2 | 1 << 3 | 1 << 6 | 1 << 9;
    put(0, flags);
    put(4, (LOW_RAM_END / 1024) as u32);
    put(8, ((ram.size() - HIGH_RAM_START) / 1024) as u32);
    put(16, cmdline_addr as u32);
    put(20, modules.len() as u32);
    put(24, mods_addr as u32);
    put(44, 24 * map.len() as u32);
    put(48, mmap_addr as u32);
    put(64, loader_name as u32);
    ram.write(INFO_ADDR, &info).map_err(LoadError)?;

    Ok(BootInfo {
        entry,
        info: INFO_ADDR as u32,
        image_end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(flags: u32) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&HEADER_MAGIC.to_le_bytes());
        h.extend_from_slice(&flags.to_le_bytes());
        h.extend_from_slice(&(0u32.wrapping_sub(HEADER_MAGIC.wrapping_add(flags))).to_le_bytes());
        h
    }

    /// An a.out-kludge image: header at file offset 0 loaded at 1 MiB, `code` after it.
    fn aout(code: &[u8], bss: u32) -> Vec<u8> {
        let mut img = header(FLAG_AOUT_KLUDGE | FLAG_MEMINFO);
        let load = 0x10_0000u32;
        let end = load + 32 + code.len() as u32;
        for v in [load, load, end, end + bss, load + 32] {
            img.extend_from_slice(&v.to_le_bytes());
        }
        img.extend_from_slice(code);
        img
    }

    fn u32_in(ram: &GuestRam, addr: u64) -> u32 {
        let mut b = [0u8; 4];
        ram.read(addr, &mut b).unwrap();
        u32::from_le_bytes(b)
    }

    #[test]
    fn cmdline_is_kernel_name_space_append_as_qemu_builds_it() {
        // QEMU 7.2: `-kernel x86/vmexit.flat -append cpuid` gives "x86/vmexit.flat cpuid".
        assert_eq!(
            multiboot_cmdline("x86/vmexit.flat", "cpuid"),
            "x86/vmexit.flat cpuid"
        );
        // No -append: the name and the trailing space QEMU leaves.
        assert_eq!(multiboot_cmdline("./k.elf", ""), "./k.elf ");
        // The appended text is passed through unchanged, inner spaces included.
        assert_eq!(multiboot_cmdline("/a/k", " x  y "), "/a/k  x  y ");
    }

    #[test]
    fn aout_kludge_loads_zeroes_bss_and_fills_info() {
        let ram = GuestRam::new(8).unwrap();
        ram.write(0x10_0000 + 36, &[0xAA; 64]).unwrap(); // dirt where the BSS goes
        let img = aout(&[0xF4, 0xEB, 0xFE, 0x90], 64);
        let m = Module {
            data: b"NR_CPUS=4".to_vec(),
            cmdline: "env".into(),
        };
        let b = load(&ram, &img, "hello world", &[m]).unwrap();
        assert_eq!(b.entry, 0x10_0020);
        assert_eq!(b.info, INFO_ADDR as u32);
        let mut code = [0u8; 4];
        ram.read(0x10_0020, &mut code).unwrap();
        assert_eq!(code, [0xF4, 0xEB, 0xFE, 0x90]);
        let mut bss = [0xFFu8; 64];
        ram.read(0x10_0024, &mut bss).unwrap();
        assert!(bss.iter().all(|b| *b == 0));
        let flags = u32_in(&ram, INFO_ADDR);
        assert_eq!(flags & 0b1001001101, 0b1001001101); // mem, cmdline, mods, mmap, name
        assert_eq!(u32_in(&ram, INFO_ADDR + 4), 639);
        assert_eq!(u32_in(&ram, INFO_ADDR + 8), 7 * 1024);
        let cmd = u32_in(&ram, INFO_ADDR + 16);
        let mut s = [0u8; 12];
        ram.read(u64::from(cmd), &mut s).unwrap();
        assert_eq!(&s, b"hello world\0");
        assert_eq!(u32_in(&ram, INFO_ADDR + 20), 1);
        let mods = u64::from(u32_in(&ram, INFO_ADDR + 24));
        let (start, end) = (u32_in(&ram, mods), u32_in(&ram, mods + 4));
        assert_eq!(start % 4096, 0);
        assert!(u64::from(start) >= b.image_end);
        assert_eq!(end - start, 9);
        let mut env = [0u8; 9];
        ram.read(u64::from(start), &mut env).unwrap();
        assert_eq!(&env, b"NR_CPUS=4");
        // Memory map: the first entry is low RAM, type 1.
        let mmap = u64::from(u32_in(&ram, INFO_ADDR + 48));
        assert_eq!(u32_in(&ram, mmap), 20);
        assert_eq!(u32_in(&ram, mmap + 20), 1);
    }

    #[test]
    fn malformed_images_give_errors_not_panics() {
        let ram = GuestRam::new(4).unwrap();
        let mut cases: Vec<(Vec<u8>, &str)> = vec![
            (Vec::new(), "no header magic"),
            (vec![0u8; 3], "no header magic"),
            (
                {
                    let mut h = header(0);
                    h[8] ^= 1;
                    h
                },
                "bad checksum",
            ),
            (header(1 << 5), "unsupported features"),
            (header(0), "not ELF"),
            (header(FLAG_AOUT_KLUDGE), "truncated"),
        ];
        // a.out image larger than RAM.
        let mut bad_bss = aout(&[0x90], 0);
        bad_bss[24..28].copy_from_slice(&0x10_0001u32.to_le_bytes());
        cases.push((bad_bss, "bss_end_addr below"));
        let mut bad_entry = aout(&[0x90], 0);
        bad_entry[28..32].copy_from_slice(&0x7FFF_0000u32.to_le_bytes());
        cases.push((bad_entry, "entry point"));
        let huge = aout(&[0x90], 0x100_0000);
        cases.push((huge, "does not fit"));
        // ELF64 with a program header table beyond the file.
        let mut elf = header(0);
        let mut e = vec![0u8; 64];
        e[0..4].copy_from_slice(b"\x7FELF");
        e[4] = 2;
        e[5] = 1;
        e[32..40].copy_from_slice(&0xFFFF_FFFFu64.to_le_bytes()); // phoff
        e[54..56].copy_from_slice(&56u16.to_le_bytes());
        e[56..58].copy_from_slice(&1u16.to_le_bytes());
        e.extend_from_slice(&elf);
        elf = e;
        cases.push((elf, "outside the file"));
        for (img, want) in cases {
            match load(&ram, &img, "", &[]) {
                Err(LoadError(m)) => assert!(m.contains(want), "{want:?} not in {m:?}"),
                Ok(b) => panic!("{want}: loaded {b:?}"),
            }
        }
    }

    #[test]
    fn fuzzed_headers_never_panic() {
        let ram = GuestRam::new(4).unwrap();
        let mut seed = 0x1234_5678_9ABC_DEF0u64;
        let base = aout(&[0x90; 16], 16);
        for _ in 0..2000 {
            let mut img = base.clone();
            for _ in 0..4 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let i = (seed as usize) % img.len();
                img[i] = (seed >> 32) as u8;
            }
            let _ = load(&ram, &img, "", &[]);
        }
    }
}

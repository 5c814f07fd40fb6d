//! The save file of `vlapic run --save` / `--restore`: one self-contained,
//! versioned, checksummed file holding everything needed to rebuild a paused VM
//! in another process (layout in docs/vmm.md, "Save files").
//!
//! All integers are little-endian. Decoding is strict: every length and offset is
//! checked, every section must appear once in its place, nothing may follow the
//! last one, and any problem is one message naming what is wrong (never a panic).

use std::path::Path;

use vlapic::Events;

use vlapic_kvm::RunState;

pub use crate::clocks::ClockDevices;
use crate::console::ConsoleLog;
pub use crate::devices::DevicesState;
use crate::hpet::Hpet;
use crate::pic::PicPair;
use crate::rtc::Rtc;
use crate::shared::MAX_VCPUS;
use crate::snapshot::VcpuState;
use crate::stats::ExitCounts;
pub use crate::wire::{crc32, Reader, Writer};

/// First eight bytes of every save file.
pub const MAGIC: [u8; 8] = *b"VLAPICSV";
/// The format version this build writes. Version 2 added the `HPET` and `RTC0`
/// sections; version 1 files (without them) are still read, and the restored VM
/// gets both devices at power-on.
pub const VERSION: u32 = 2;
/// The oldest format version this build reads.
pub const OLDEST_VERSION: u32 = 1;
/// Guest page size for the memory section.
pub const PAGE: usize = 4096;
/// Header flag: every APIC started in x2APIC mode (`--x2apic`).
pub const FLAG_X2APIC: u32 = 1;
/// Header flag: the APIC nesting verifier runs (`--verify true`).
pub const FLAG_VERIFY: u32 = 2;
/// Header flag: the APICs are KVM's model (version 0x50014: no CMCI, no directed
/// EOI), as a VM started with `--irqchip kernel` has; set by a source on KVM's
/// in-kernel irqchip, and required by a destination on it.
pub const FLAG_KVM_APIC: u32 = 4;
/// Header flag: a Linux guest whose CPUID hides what the host's emulator cannot run
/// (`vlapic_kvm::cpuid::hide_unemulated`); the destination must hide the same, as Linux
/// reads CPUID again after early boot.
pub const FLAG_LINUX_CPUID: u32 = 8;
const KNOWN_FLAGS: u32 = FLAG_X2APIC | FLAG_VERIFY | FLAG_KVM_APIC | FLAG_LINUX_CPUID;
/// Bytes before the first section: magic, version, reserved, file length.
const PREFIX: usize = 24;

/// The optional section after the last mandatory one (`DEVS` in version 1, `RTC0`
/// in version 2): the 8259 pair, 32 bytes (two `kvm_pic_state`).
const PIC_SECTION: [u8; 4] = *b"PIC8";

/// Section tags, in file order (`VCPU` once per vCPU; `HPET` and `RTC0` from
/// version 2 on).
const SECTIONS: [[u8; 4]; 9] = [
    *b"HEAD", *b"FABR", *b"VCPU", *b"MEM0", *b"CONS", *b"STAT", *b"DEVS", *b"HPET", *b"RTC0",
];

/// The fixed-size header.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// vCPU count.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// [`FLAG_X2APIC`], [`FLAG_VERIFY`].
    pub flags: u32,
    /// Guest TSC frequency (Hz).
    pub tsc_hz: u64,
    /// VM time (ns) at the save.
    pub vm_ns: u64,
    /// Guest TSC at the save.
    pub guest_tsc: u64,
    /// The saved run's `--migrate-every` in µs (0: none); the default for the restored run.
    pub migrate_every_us: u64,
    /// Wall time the run had taken up to the save (ns).
    pub elapsed_ns: u64,
}

/// One vCPU: KVM's state, the VMM's run state, pending non-APIC events, counters.
#[derive(Clone)]
pub struct SavedVcpu {
    /// Running, halted (IF at the HLT) or waiting for SIPI.
    pub run: RunState,
    /// NMI/SMI/INIT/SIPI/ExtINT taken from the APIC but not yet delivered.
    pub events: Events,
    /// KVM_INTERRUPTs so far.
    pub interrupts: u64,
    /// NMIs injected so far.
    pub nmis: u64,
    /// SIPIs taken so far.
    pub sipis: u64,
    /// Exits by reason so far.
    pub exits: ExitCounts,
    /// Registers, XSAVE, MSRs, events, debug registers.
    pub kvm: VcpuState,
}

/// Run-wide figures carried so the final summary covers the whole run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Deepest nesting any verifier saw.
    pub max_nesting: u8,
    /// Verifier violations.
    pub violations: u64,
    /// Migrations done.
    pub migrations: u64,
    /// Longest migration pause (µs).
    pub max_downtime_us: u64,
    /// Migrations with >= 3 vectors in service.
    pub nested_migrations: u64,
    /// Most vectors in service in a migrated state.
    pub max_in_service: u64,
    /// (count, first) for unknown ports, wild MMIO, #GP MSRs.
    pub odd: [(u64, u64); 3],
}

/// Guest RAM without its all-zero pages.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    /// Page numbers (guest-physical address / 4096), ascending.
    pub index: Vec<u32>,
    /// The pages, 4096 bytes each, in `index` order.
    pub data: Vec<u8>,
}

/// A whole save file.
#[derive(Clone)]
pub struct SaveFile {
    /// The header.
    pub header: Header,
    /// `vlapic::state::native::encode_fabric` bytes, unchanged.
    pub fabric: Vec<u8>,
    /// One per vCPU, in index order.
    pub vcpus: Vec<SavedVcpu>,
    /// Non-zero pages of guest RAM.
    pub memory: Memory,
    /// The console transcript as parsed so far (scenarios, DONE, BENCH, tail).
    pub console: ConsoleLog,
    /// Run-wide figures.
    pub stats: Stats,
    /// Port devices.
    pub devices: DevicesState,
    /// The HPET and the CMOS RTC (`None`: a version-1 file, which had neither).
    pub clocks: Option<ClockDevices>,
    /// The 8259 pair: the optional section `PIC8` after `DEVS` (absent in files of
    /// builds without it; the pair then starts at power-on).
    pub pic: Option<PicPair>,
}

impl std::fmt::Debug for SaveFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaveFile")
            .field("header", &self.header)
            .field("fabric_bytes", &self.fabric.len())
            .field("vcpus", &self.vcpus.len())
            .field("pages", &self.memory.index.len())
            .field("scenarios", &self.console.scenarios.len())
            .field("stats", &self.stats)
            .field("devices", &self.devices)
            .finish()
    }
}

fn run_code(r: RunState) -> u8 {
    match r {
        RunState::Running => 0,
        RunState::Halted(false) => 1,
        RunState::Halted(true) => 2,
        RunState::WaitForSipi => 3,
    }
}

fn encode_vcpu(w: &mut Writer, index: u32, v: &SavedVcpu) {
    w.u32(index);
    w.u8(run_code(v.run));
    let e = &v.events;
    w.u8(u8::from(e.nmi >= 1)
        | u8::from(e.nmi >= 2) << 5
        | u8::from(e.smi) << 1
        | u8::from(e.init) << 2
        | u8::from(e.extint) << 3
        | u8::from(e.sipi.is_some()) << 4);
    w.u8(e.sipi.unwrap_or(0));
    w.u8(0);
    w.u64(v.interrupts);
    w.u64(v.nmis);
    w.u64(v.sipis);
    w.exits(&v.exits);
    v.kvm.encode(w);
}

fn decode_vcpu(r: &mut Reader<'_>, want: u32) -> Result<SavedVcpu, String> {
    let index = r.u32()?;
    if index != want {
        return Err(r.err(format!("vCPU index {index} where {want} was expected")));
    }
    let run = match r.u8()? {
        0 => RunState::Running,
        1 => RunState::Halted(false),
        2 => RunState::Halted(true),
        3 => RunState::WaitForSipi,
        x => return Err(r.err(format!("vCPU {index}: unknown run state {x}"))),
    };
    let bits = r.u8()?;
    if bits & !0x3F != 0 || bits & 0x21 == 0x20 {
        return Err(r.err(format!("vCPU {index}: unknown event bits {bits:#x}")));
    }
    let vector = r.u8()?;
    if r.u8()? != 0 {
        return Err(r.err(format!("vCPU {index}: reserved byte not 0")));
    }
    let events = Events::default()
        .with_nmi((bits & 1) + ((bits >> 5) & 1))
        .with_smi(bits & 2 != 0)
        .with_init(bits & 4 != 0)
        .with_extint(bits & 8 != 0)
        .with_sipi((bits & 16 != 0).then_some(vector));
    Ok(SavedVcpu {
        run,
        events,
        interrupts: r.u64()?,
        nmis: r.u64()?,
        sipis: r.u64()?,
        exits: r.exits()?,
        kvm: VcpuState::decode(r)?,
    })
}

fn encode_stats(w: &mut Writer, s: &Stats) {
    w.u8(s.max_nesting);
    for v in [
        s.violations,
        s.migrations,
        s.max_downtime_us,
        s.nested_migrations,
        s.max_in_service,
    ] {
        w.u64(v);
    }
    for (n, first) in s.odd {
        w.u64(n);
        w.u64(first);
    }
}

fn decode_stats(r: &mut Reader<'_>) -> Result<Stats, String> {
    let mut s = Stats {
        max_nesting: r.u8()?,
        violations: r.u64()?,
        migrations: r.u64()?,
        max_downtime_us: r.u64()?,
        nested_migrations: r.u64()?,
        max_in_service: r.u64()?,
        odd: [(0, 0); 3],
    };
    for o in s.odd.iter_mut() {
        *o = (r.u64()?, r.u64()?);
    }
    Ok(s)
}

impl SaveFile {
    /// The whole file.
    pub fn encode(&self) -> Vec<u8> {
        let h = &self.header;
        let mut head = Writer::default();
        head.u32(h.vcpus);
        head.u64(h.memory_mib);
        head.u32(h.flags);
        head.u64(h.tsc_hz);
        head.u64(h.vm_ns);
        head.u64(h.guest_tsc);
        head.u64(h.migrate_every_us);
        head.u64(h.elapsed_ns);

        let mut w = Writer::default();
        w.raw(&MAGIC);
        // A file read from version 1 re-encodes as version 1 (nothing to add).
        w.u32(if self.clocks.is_some() { VERSION } else { 1 });
        w.u32(0);
        w.u64(0); // file length, patched below
        w.section(SECTIONS[0], &head.buf);
        w.section(SECTIONS[1], &self.fabric);
        for (i, v) in self.vcpus.iter().enumerate() {
            let mut b = Writer::default();
            encode_vcpu(&mut b, i as u32, v);
            w.section(SECTIONS[2], &b.buf);
        }
        let mut m = Writer::default();
        m.u64(h.memory_mib << 20 >> 12);
        m.u32(self.memory.index.len() as u32);
        for (i, page) in self.memory.index.iter().zip(self.memory.data.chunks(PAGE)) {
            m.u32(*i);
            m.raw(page);
        }
        w.section(SECTIONS[3], &m.buf);
        let mut c = Writer::default();
        self.console.encode(&mut c);
        w.section(SECTIONS[4], &c.buf);
        let mut s = Writer::default();
        encode_stats(&mut s, &self.stats);
        w.section(SECTIONS[5], &s.buf);
        let mut d = Writer::default();
        // Every field is named (no `..`): a new one does not compile unencoded.
        let DevicesState {
            serial_regs,
            serial_in,
            fw_key,
            fw_pos,
        } = &self.devices;
        w.section(SECTIONS[6], &{
            d.raw(serial_regs);
            d.bytes(serial_in);
            d.u16(*fw_key);
            d.u64(*fw_pos);
            d.buf
        });
        if let Some(c) = &self.clocks {
            let mut h = Writer::default();
            c.hpet.encode(&mut h);
            w.section(SECTIONS[7], &h.buf);
            let mut r = Writer::default();
            c.rtc.encode(&mut r);
            w.section(SECTIONS[8], &r.buf);
        }
        if let Some(p) = &self.pic {
            w.section(PIC_SECTION, &p.to_bytes());
        }
        let total = (w.buf.len() + 4) as u64;
        if let Some(len) = w.buf.get_mut(16..24) {
            len.copy_from_slice(&total.to_le_bytes());
        }
        let crc = crc32(&w.buf);
        w.u32(crc);
        w.buf
    }

    /// Parses and checks a whole file; `Err` is one line saying what is wrong.
    pub fn decode(file: &[u8]) -> Result<Self, String> {
        if file.len() < MAGIC.len() || file.get(..MAGIC.len()) != Some(&MAGIC[..]) {
            return Err("not a vlapic save file (bad magic)".into());
        }
        let mut p = Reader::new(file, "file header");
        p.take(MAGIC.len())?;
        let version = p.u32()?;
        if !(OLDEST_VERSION..=VERSION).contains(&version) {
            return Err(format!(
                "format version {version} is not supported (this build reads versions \
                 {OLDEST_VERSION} to {VERSION})"
            ));
        }
        if p.u32()? != 0 {
            return Err("file header: reserved field not 0".into());
        }
        let total = p.u64()?;
        if total != file.len() as u64 {
            return Err(if total > file.len() as u64 {
                format!("truncated: {} bytes, the header says {total}", file.len())
            } else {
                format!(
                    "{} bytes, the header says {total} (trailing data)",
                    file.len()
                )
            });
        }
        if file.len() < PREFIX + 4 {
            return Err(format!("too short ({} bytes)", file.len()));
        }
        let (body, tail) = file.split_at(file.len() - 4);
        let mut stored = [0u8; 4];
        stored.copy_from_slice(tail);
        let stored = u32::from_le_bytes(stored);
        let computed = crc32(body);
        if stored != computed {
            return Err(format!(
                "checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the file is corrupt"
            ));
        }
        let body = body.get(PREFIX..).unwrap_or(&[]);
        let mut secs = Reader::new(body, "section list");
        let mut next = |want: [u8; 4], name: &'static str| -> Result<Reader<'_>, String> {
            let at = secs.pos + PREFIX;
            let tag = secs
                .take(4)
                .map_err(|_| format!("section {name} missing (file ends at offset {at})"))?;
            if tag != want {
                return Err(format!(
                    "section {:?} at offset {at} where {name} was expected",
                    String::from_utf8_lossy(tag)
                ));
            }
            let len = secs.u64()?;
            let len = usize::try_from(len)
                .map_err(|_| format!("section {name}: length {len} too large"))?;
            let b = secs.take(len).map_err(|_| {
                format!("section {name} at offset {at}: length {len} runs past the end")
            })?;
            Ok(Reader::new(b, name))
        };

        let mut r = next(SECTIONS[0], "HEAD")?;
        let header = Header {
            vcpus: r.u32()?,
            memory_mib: r.u64()?,
            flags: r.u32()?,
            tsc_hz: r.u64()?,
            vm_ns: r.u64()?,
            guest_tsc: r.u64()?,
            migrate_every_us: r.u64()?,
            elapsed_ns: r.u64()?,
        };
        r.finish()?;
        if header.vcpus == 0 || header.vcpus as usize > MAX_VCPUS {
            return Err(r.err(format!(
                "{} vCPUs (must be 1 to {})",
                header.vcpus, MAX_VCPUS
            )));
        }
        if !(crate::memory::MIN_MEMORY_MIB..=crate::memory::MAX_MEMORY_MIB)
            .contains(&header.memory_mib)
        {
            return Err(r.err(format!("memory {} MiB out of range", header.memory_mib)));
        }
        if header.flags & !KNOWN_FLAGS != 0 {
            return Err(r.err(format!("unknown flags {:#x}", header.flags)));
        }
        if header.tsc_hz == 0 {
            return Err(r.err("TSC frequency 0"));
        }

        let mut r = next(SECTIONS[1], "FABR")?;
        let fabric = r.rest().to_vec();
        vlapic::state::native::decode_fabric(&fabric)
            .map_err(|e| format!("FABR: the APIC/IOAPIC state does not decode: {e:?}"))?;

        let mut vcpus = Vec::with_capacity(header.vcpus as usize);
        for i in 0..header.vcpus {
            let mut r = next(SECTIONS[2], "VCPU")?;
            vcpus.push(decode_vcpu(&mut r, i)?);
            r.finish()?;
        }

        let mut r = next(SECTIONS[3], "MEM0")?;
        let pages = r.u64()?;
        let want = header.memory_mib << 20 >> 12;
        if pages != want {
            return Err(r.err(format!(
                "{pages} pages of RAM, the header's {} MiB has {want}",
                header.memory_mib
            )));
        }
        let n = r.count(want as usize, "stored pages")?;
        let room = r.remaining() / (PAGE + 4);
        if n > room {
            return Err(r.err(format!("{n} pages announced, room for {room}")));
        }
        let mut memory = Memory {
            index: Vec::with_capacity(n),
            data: Vec::with_capacity(n.saturating_mul(PAGE)),
        };
        for _ in 0..n {
            let i = r.u32()?;
            if u64::from(i) >= want {
                return Err(r.err(format!("page {i} is outside RAM ({want} pages)")));
            }
            if memory.index.last().is_some_and(|l| *l >= i) {
                return Err(r.err(format!("page {i} out of order")));
            }
            memory.index.push(i);
            memory.data.extend_from_slice(r.take(PAGE)?);
        }
        r.finish()?;

        let mut r = next(SECTIONS[4], "CONS")?;
        let console = ConsoleLog::decode(&mut r)?;
        r.finish()?;

        let mut r = next(SECTIONS[5], "STAT")?;
        let stats = decode_stats(&mut r)?;
        r.finish()?;

        let mut r = next(SECTIONS[6], "DEVS")?;
        let mut serial_regs = [0u8; 9];
        serial_regs.copy_from_slice(r.take(9)?);
        let devices = DevicesState {
            serial_regs,
            serial_in: r.bytes(64)?.to_vec(),
            fw_key: r.u16()?,
            fw_pos: r.u64()?,
        };
        r.finish()?;
        let clocks = if version >= 2 {
            let mut r = next(SECTIONS[7], "HPET")?;
            let hpet = Hpet::decode(&mut r)?;
            r.finish()?;
            let mut r = next(SECTIONS[8], "RTC0")?;
            let rtc = Rtc::decode(&mut r)?;
            r.finish()?;
            Some(ClockDevices { hpet, rtc })
        } else {
            None
        };
        let pic = if secs.remaining() > 0 {
            let at = secs.pos + PREFIX;
            let tag = secs.take(4)?;
            if tag != PIC_SECTION {
                return Err(format!(
                    "section {:?} at offset {at} where PIC8 or the end was expected",
                    String::from_utf8_lossy(tag)
                ));
            }
            let len = secs.u64()?;
            let b = usize::try_from(len)
                .ok()
                .and_then(|l| secs.take(l).ok())
                .ok_or_else(|| {
                    format!("section PIC8 at offset {at}: length {len} runs past the end")
                })?;
            Some(PicPair::from_bytes(b).map_err(|e| format!("section PIC8: {e}"))?)
        } else {
            None
        };
        secs.finish()
            .map_err(|_| "data after the last section".to_string())?;
        Ok(Self {
            header,
            fabric,
            vcpus,
            memory,
            console,
            stats,
            devices,
            clocks,
            pic,
        })
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a
/// rename, so a failed save never leaves a partial file under `path`.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), String> {
    crate::files::write_atomic(path, bytes)
}

/// The most bytes a save file for `vcpus` vCPUs and `memory_mib` MiB of RAM can take:
/// every page non-zero, plus per vCPU at most 1 MiB of KVM state (XSAVE, up to 4096
/// MSRs, registers), plus 64 MiB for the fabric, the console transcript and devices.
pub fn max_size(vcpus: u32, memory_mib: u64) -> u64 {
    let pages = memory_mib.saturating_mul(1 << 20);
    let index = (pages / PAGE as u64).saturating_mul(4);
    pages
        .saturating_add(index)
        .saturating_add(u64::from(vcpus).saturating_mul(1 << 20))
        .saturating_add(64 << 20)
}

/// Reads a save file, bounded by what its own header allows: the fixed prefix and the
/// HEAD section are read first (magic, version, total length, vCPUs, memory), the
/// announced length is checked against [`max_size`], and only then is the rest read
/// (at most that length). `/dev/zero` or a huge file is refused after a few bytes.
pub fn read_file(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(path).map_err(|e| format!("cannot read: {e}"))?;
    // PREFIX, then the HEAD tag (4) and length (8), then vcpus (u32) and memory (u64).
    let mut head = vec![0u8; PREFIX + 12 + 12];
    let mut got = 0;
    while got < head.len() {
        let n = f
            .read(head.get_mut(got..).unwrap_or(&mut []))
            .map_err(|e| format!("cannot read: {e}"))?;
        if n == 0 {
            break;
        }
        got += n;
    }
    head.truncate(got);
    if head.get(..MAGIC.len()) != Some(&MAGIC[..]) {
        return Err("not a vlapic save file (bad magic)".into());
    }
    if got < PREFIX + 24 {
        // Let the decoder name what is missing.
        return Ok(head);
    }
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(head.get(o..o + 8).unwrap_or(&[0; 8]));
        u64::from_le_bytes(b)
    };
    let total = u64_at(16);
    let vcpus = u32::try_from(u64_at(PREFIX + 12) & 0xFFFF_FFFF).unwrap_or(u32::MAX);
    let memory_mib = u64_at(PREFIX + 16);
    if vcpus == 0 || vcpus as usize > MAX_VCPUS {
        return Err(format!("HEAD: {vcpus} vCPUs (must be 1 to {MAX_VCPUS})"));
    }
    if !(crate::memory::MIN_MEMORY_MIB..=crate::memory::MAX_MEMORY_MIB).contains(&memory_mib) {
        return Err(format!("HEAD: memory {memory_mib} MiB out of range"));
    }
    let bound = max_size(vcpus, memory_mib);
    if total > bound {
        return Err(format!(
            "the header announces {total} bytes, more than a save file of {vcpus} vCPUs and \
             {memory_mib} MiB can take ({bound})"
        ));
    }
    let rest = total.saturating_sub(head.len() as u64);
    let mut bytes = head;
    f.take(rest.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    Ok(bytes)
}

#[cfg(test)]
#[path = "savefile_tests.rs"]
mod tests;

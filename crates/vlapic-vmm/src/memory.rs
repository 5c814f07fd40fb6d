//! Guest RAM: one anonymous mapping from guest-physical 0, below the 3 GiB MMIO
//! hole (the IOAPIC at 0xFEC00000 and the LAPIC at 0xFEE00000 sit above it).

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Highest RAM size accepted (keeps RAM below the MMIO hole).
pub const MAX_MEMORY_MIB: u64 = 3 * 1024;
/// Smallest RAM size accepted (the loader needs low memory and 1 MiB+).
pub const MIN_MEMORY_MIB: u64 = 4;
/// Start of the legacy VGA/BIOS hole that the memory map reports reserved.
pub const LOW_RAM_END: u64 = 0x9_FC00;
/// Start of extended memory.
pub const HIGH_RAM_START: u64 = 0x10_0000;

/// Guest RAM.
pub struct GuestRam {
    mem: GuestMemoryMmap,
    size: u64,
}

impl GuestRam {
    /// Maps `mib` MiB of zeroed RAM.
    pub fn new(mib: u64) -> Result<Self, String> {
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&mib) {
            return Err(format!(
                "--memory {mib}: must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB} MiB"
            ));
        }
        let size = mib << 20;
        let len =
            usize::try_from(size).map_err(|_| "memory size does not fit the host".to_string())?;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), len)])
            .map_err(|e| format!("cannot map {mib} MiB of guest memory: {e}"))?;
        Ok(Self { mem, size })
    }

    /// RAM size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Host address of guest-physical 0 (the single region's start).
    pub fn host_base(&self) -> Result<*mut u8, String> {
        self.mem
            .get_host_address(GuestAddress(0))
            .map_err(|e| format!("guest memory has no host mapping: {e}"))
    }

    /// Copies `data` to guest-physical `addr`; fails (never panics) when out of range.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), String> {
        let end = addr
            .checked_add(data.len() as u64)
            .ok_or("address overflow")?;
        if end > self.size {
            return Err(format!(
                "range {addr:#x}..{end:#x} is outside guest RAM (0..{:#x})",
                self.size
            ));
        }
        self.mem
            .write_slice(data, GuestAddress(addr))
            .map_err(|e| format!("guest memory write at {addr:#x}: {e}"))
    }

    /// Zeroes `len` bytes at guest-physical `addr`.
    pub fn zero(&self, addr: u64, len: u64) -> Result<(), String> {
        const CHUNK: usize = 64 * 1024;
        let zeros = [0u8; CHUNK];
        let mut off = 0u64;
        while off < len {
            let n = (len - off).min(CHUNK as u64);
            let a = addr.checked_add(off).ok_or("address overflow")?;
            self.write(a, zeros.get(..n as usize).unwrap_or(&[]))?;
            off += n;
        }
        Ok(())
    }

    /// Reads bytes from guest-physical `addr`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), String> {
        self.mem
            .read_slice(buf, GuestAddress(addr))
            .map_err(|e| format!("guest memory read at {addr:#x}: {e}"))
    }
}

//! Guest RAM: one anonymous mapping from guest-physical 0, below the 3 GiB MMIO
//! hole (the IOAPIC at 0xFEC00000 and the LAPIC at 0xFEE00000 sit above it).

/// Highest RAM size accepted (keeps RAM below the MMIO hole).
pub const MAX_MEMORY_MIB: u64 = 3 * 1024;
/// Smallest RAM size accepted (the loader needs low memory and 1 MiB+).
pub const MIN_MEMORY_MIB: u64 = 4;
/// Start of the legacy VGA/BIOS hole that the memory map reports reserved.
pub const LOW_RAM_END: u64 = 0x9_FC00;
/// Start of extended memory.
pub const HIGH_RAM_START: u64 = 0x10_0000;

/// Guest RAM (vlapic-kvm's mapping, with MiB sizing and the VMM's `String` errors).
pub struct GuestRam {
    ram: vlapic_kvm::GuestRam,
}

impl GuestRam {
    /// Maps `mib` MiB of zeroed RAM.
    pub fn new(mib: u64) -> Result<Self, String> {
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&mib) {
            return Err(format!(
                "--memory {mib}: must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB} MiB"
            ));
        }
        let ram = vlapic_kvm::GuestRam::new(mib << 20)
            .map_err(|e| format!("cannot map {mib} MiB of guest memory: {e}"))?;
        Ok(Self { ram })
    }

    /// RAM size in bytes.
    pub fn size(&self) -> u64 {
        self.ram.size()
    }

    /// Host address of guest-physical 0 (the mapping lives as long as `self`).
    pub fn host_base(&self) -> Result<*mut u8, String> {
        self.ram.host_base().map_err(|e| e.to_string())
    }

    /// The vm-memory mapping (for the software-interrupt workaround and rust-vmm's
    /// `linux-loader`).
    pub fn memory(&self) -> &vm_memory::GuestMemoryMmap {
        self.ram.memory()
    }

    /// Makes this RAM guest-physical 0.. of `vm` (slot 0).
    pub fn register(&self, vm: &kvm_ioctls::VmFd) -> Result<(), String> {
        self.ram.register(vm, 0).map_err(|e| e.to_string())
    }

    /// As [`GuestRam::register`], with KVM dirty-page logging on slot 0 when
    /// `dirty_log` (live migration's pre-copy).
    pub fn register_logged(&self, vm: &kvm_ioctls::VmFd, dirty_log: bool) -> Result<(), String> {
        self.ram
            .register_with_dirty_log(vm, 0, dirty_log)
            .map_err(|e| e.to_string())
    }

    /// The pages written by the guest since the last call (slot 0 registered with
    /// dirty logging): KVM's bitmap, one bit per 4 KiB page (read and cleared).
    pub fn take_dirty(&self, vm: &kvm_ioctls::VmFd) -> Result<Vec<u64>, String> {
        let size = usize::try_from(self.size()).map_err(|_| "RAM too large")?;
        vm.get_dirty_log(0, size)
            .map_err(|e| format!("KVM_GET_DIRTY_LOG: {e}"))
    }

    /// Copies `data` to guest-physical `addr`; fails (never panics) when out of range.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), String> {
        self.ram.write(addr, data).map_err(|e| e.to_string())
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
        self.ram.read(addr, buf).map_err(|e| e.to_string())
    }
}

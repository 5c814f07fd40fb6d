//! Guest RAM: one anonymous mapping from guest-physical 0 (vm-memory), registered
//! with KVM as a memory slot without the embedder writing `unsafe`.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::Error;

/// Start of the x86 MMIO hole (IOAPIC at 0xFEC00000, LAPIC at 0xFEE00000): RAM from
/// guest-physical 0 must end below it.
pub const MMIO_HOLE: u64 = 0xC000_0000;

/// Guest RAM from guest-physical 0, below the MMIO hole.
pub struct GuestRam {
    mem: GuestMemoryMmap,
    size: u64,
}

impl GuestRam {
    /// Maps `size` bytes of zeroed RAM (a multiple of 4 KiB, at most [`MMIO_HOLE`]).
    pub fn new(size: u64) -> Result<Self, Error> {
        if size == 0 || size % 4096 != 0 || size > MMIO_HOLE {
            return Err(Error::Memory(format!(
                "{size:#x} bytes: RAM must be a non-zero multiple of 4 KiB below {MMIO_HOLE:#x}"
            )));
        }
        let len = usize::try_from(size)
            .map_err(|_| Error::Memory("the size does not fit the host".into()))?;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), len)])
            .map_err(|e| Error::Memory(format!("cannot map {size:#x} bytes: {e}")))?;
        Ok(Self { mem, size })
    }

    /// RAM size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The host address of guest-physical 0 (the mapping lives as long as `self`).
    pub fn host_base(&self) -> Result<*mut u8, Error> {
        self.mem
            .get_host_address(GuestAddress(0))
            .map_err(|e| Error::Memory(format!("no host mapping: {e}")))
    }

    /// The vm-memory mapping (a cheap clone keeps it alive), e.g. for
    /// [`crate::ApicVcpu::enable_soft_interrupts`].
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Makes this RAM guest-physical 0.. of `vm` in memory slot `slot`. The RAM must
    /// outlive every use of `vm` (drop the `VmFd` first, or keep both to the end).
    pub fn register(&self, vm: &VmFd, slot: u32) -> Result<(), Error> {
        self.register_with_dirty_log(vm, slot, false)
    }

    /// As [`GuestRam::register`], with KVM dirty-page logging on the slot when
    /// `dirty_log` (`KVM_MEM_LOG_DIRTY_PAGES`; read and cleared with
    /// `VmFd::get_dirty_log(slot, size)`), as live migration's pre-copy needs.
    pub fn register_with_dirty_log(
        &self,
        vm: &VmFd,
        slot: u32,
        dirty_log: bool,
    ) -> Result<(), Error> {
        let host = self
            .mem
            .get_host_address(GuestAddress(0))
            .map_err(|e| Error::Memory(format!("no host mapping: {e}")))?;
        let region = kvm_userspace_memory_region {
            slot,
            flags: if dirty_log {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: 0,
            memory_size: self.size,
            userspace_addr: host as u64,
        };
        // SAFETY: the region covers exactly this mapping (`size` bytes at `host`), which
        // stays mapped as long as `self`; the documented contract makes the caller keep
        // `self` alive while the VM can touch it. KVM validates the rest.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|e| Error::kvm("KVM_SET_USER_MEMORY_REGION", e))
    }

    /// Copies `data` to guest-physical `addr`; fails (never panics) when out of range.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), Error> {
        self.check(addr, data.len())?;
        self.mem
            .write_slice(data, GuestAddress(addr))
            .map_err(|e| Error::Memory(format!("write at {addr:#x}: {e}")))
    }

    /// Reads bytes from guest-physical `addr`; fails (never panics) when out of range.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.check(addr, buf.len())?;
        self.mem
            .read_slice(buf, GuestAddress(addr))
            .map_err(|e| Error::Memory(format!("read at {addr:#x}: {e}")))
    }

    fn check(&self, addr: u64, len: usize) -> Result<(), Error> {
        let end = u64::try_from(len)
            .ok()
            .and_then(|l| addr.checked_add(l))
            .ok_or_else(|| Error::Memory("address overflow".into()))?;
        if end > self.size {
            return Err(Error::Memory(format!(
                "{addr:#x}..{end:#x} is outside guest RAM (0..{:#x})",
                self.size
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_bounds() {
        assert!(GuestRam::new(0).is_err());
        assert!(GuestRam::new(4097).is_err());
        assert!(GuestRam::new(MMIO_HOLE + 4096).is_err());
        let r = GuestRam::new(1 << 20).expect("1 MiB");
        r.write(0x1000, &[1, 2, 3]).expect("in range");
        let mut b = [0u8; 3];
        r.read(0x1000, &mut b).expect("in range");
        assert_eq!(b, [1, 2, 3]);
        assert!(r.write((1 << 20) - 1, &[0, 0]).is_err());
        assert!(r.read(u64::MAX, &mut b).is_err());
    }
}

//! Which boot path an image takes (multiboot v1 or Linux) and how the BSP enters it:
//! image detection, loading, and the entry registers.

use kvm_bindings::kvm_regs;
use kvm_ioctls::VcpuFd;
use vlapic_kvm::setup;

use crate::acpi::AcpiConfig;
use crate::linux::{self, LinuxBoot};
use crate::loader::{self, Module, BOOT_MAGIC};
use crate::memory::GuestRam;
use crate::VmmError;

/// How the loaded image is entered.
pub enum Boot {
    /// A multiboot v1 image.
    Multiboot(loader::BootInfo),
    /// A Linux image.
    Linux(LinuxBoot),
}

/// Loads `kernel` (Linux or multiboot, [`linux::detect`]) into `ram` for `n` vCPUs
/// with its command line and `modules` (multiboot) or `initrd` (Linux).
pub fn load_image(
    ram: &GuestRam,
    kernel: &[u8],
    cmdline: &str,
    modules: &[Module],
    initrd: &[u8],
    n: usize,
) -> Result<Boot, VmmError> {
    match linux::detect(kernel) {
        Some(kind) => {
            if !modules.is_empty() {
                return Err(VmmError::Load(
                    "a Linux image takes --initrd, not --module".into(),
                ));
            }
            let acpi = AcpiConfig {
                apic_ids: (0..n as u32).collect(),
                ioapic_id: n as u8,
                ioapic_addr: setup::IOAPIC_BASE as u32,
                lapic_addr: 0xFEE0_0000,
            };
            linux::load(ram, kind, kernel, cmdline, initrd, &acpi)
                .map(Boot::Linux)
                .map_err(|e| VmmError::Load(e.0))
        }
        None if !initrd.is_empty() => Err(VmmError::Load(
            "--initrd needs a Linux image (bzImage or vmlinux); multiboot images take --module"
                .into(),
        )),
        None => loader::load(ram, kernel, cmdline, modules)
            .map(Boot::Multiboot)
            .map_err(|e| VmmError::Load(e.0)),
    }
}

/// BSP: 32-bit protected mode, paging off, multiboot or Linux registers.
pub fn boot_bsp(bsp: &VcpuFd, boot: &Boot) -> Result<(), VmmError> {
    let boot = match boot {
        Boot::Multiboot(b) => b,
        Boot::Linux(l) => return linux::enter(bsp, l).map_err(VmmError::Setup),
    };
    let regs = kvm_regs {
        rip: u64::from(boot.entry),
        rax: u64::from(BOOT_MAGIC),
        rbx: u64::from(boot.info),
        ..Default::default()
    };
    setup::enter_protected_mode(bsp, &regs).map_err(|e| VmmError::Setup(e.to_string()))
}

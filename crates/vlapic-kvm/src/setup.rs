//! VM and vCPU setup for a userspace APIC: capability checks, MSR exits with the
//! right reasons and filter, CPUID from the `LapicConfig`, FPU and boot registers.

use kvm_bindings::{
    kvm_enable_cap, kvm_regs, kvm_segment, CpuId, KVM_CAP_X86_USER_SPACE_MSR,
    KVM_MAX_CPUID_ENTRIES, KVM_MSR_EXIT_REASON_FILTER, KVM_MSR_EXIT_REASON_INVAL,
    KVM_MSR_EXIT_REASON_UNKNOWN,
};
use kvm_ioctls::{
    Cap, Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VcpuFd, VmFd,
};
use vlapic::fabric::FabricConfig;
use vlapic::regs::MSR_APIC_BASE;

use crate::Error;

/// IA32_TSC_DEADLINE.
pub const MSR_TSC_DEADLINE: u32 = 0x6E0;
/// Default guest-physical page of the IOAPIC.
pub const IOAPIC_BASE: u64 = 0xFEC0_0000;

/// Checks that KVM offers what a userspace APIC needs: user-space MSR exits, MSR
/// filters and `immediate_exit`.
pub fn check_kvm(kvm: &Kvm) -> Result<(), Error> {
    for (cap, name) in [
        (Cap::X86UserSpaceMsr, "KVM_CAP_X86_USER_SPACE_MSR"),
        (Cap::X86MsrFilter, "KVM_CAP_X86_MSR_FILTER"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(Error::MissingCapability(name));
        }
    }
    Ok(())
}

/// Opens `/dev/kvm` and checks it ([`check_kvm`]); `Err` says why it cannot run a
/// userspace APIC. Tests use it to print one `SKIPPED:` line.
pub fn kvm_usable() -> Result<Kvm, Error> {
    let kvm = Kvm::new().map_err(|e| Error::kvm("open /dev/kvm", e))?;
    check_kvm(&kvm)?;
    Ok(kvm)
}

/// Prepares a VM created without `KVM_CREATE_IRQCHIP` for a userspace APIC:
/// TSS and identity-map addresses (Intel hosts need them for real mode), user-space
/// MSR exits for the *invalid*, *unknown* and *filter* reasons (x2APIC MSRs arrive with
/// the first: KVM ignores filters on 0x800–0x8FF), and a filter sending
/// IA32_APIC_BASE and IA32_TSC_DEADLINE to userspace. Other MSRs stay KVM's.
pub fn configure_vm(vm: &VmFd) -> Result<(), Error> {
    vm.set_tss_address(0xFFFB_D000)
        .map_err(|e| Error::kvm("KVM_SET_TSS_ADDR", e))?;
    // Only needed (and only accepted) on Intel hosts.
    let _ = vm.set_identity_map_address(0xFFFB_C000);
    let cap = kvm_enable_cap {
        cap: KVM_CAP_X86_USER_SPACE_MSR,
        args: [
            u64::from(
                KVM_MSR_EXIT_REASON_INVAL
                    | KVM_MSR_EXIT_REASON_UNKNOWN
                    | KVM_MSR_EXIT_REASON_FILTER,
            ),
            0,
            0,
            0,
        ],
        ..Default::default()
    };
    vm.enable_cap(&cap)
        .map_err(|e| Error::kvm("KVM_ENABLE_CAP(X86_USER_SPACE_MSR)", e))?;
    let deny = [0u8; 1];
    let ranges = [
        MsrFilterRange {
            flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
            base: MSR_APIC_BASE,
            msr_count: 1,
            bitmap: &deny,
        },
        MsrFilterRange {
            flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
            base: MSR_TSC_DEADLINE,
            msr_count: 1,
            bitmap: &deny,
        },
    ];
    vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &ranges)
        .map_err(|e| Error::kvm("KVM_X86_SET_MSR_FILTER", e))
}

/// Creates vCPU `index` of a VM whose interrupt hardware is `fabric`: CPUID derived
/// from that vCPU's `LapicConfig` ([`crate::cpuid::configure`]) and the x87/SSE
/// power-up state ([`init_fpu`]).
pub fn create_vcpu(
    kvm: &Kvm,
    vm: &VmFd,
    fabric: &FabricConfig,
    index: usize,
) -> Result<VcpuFd, Error> {
    create_vcpu_with(vm, &supported_cpuid(kvm)?, fabric, index)
}

/// KVM's supported CPUID (`KVM_GET_SUPPORTED_CPUID`), the base [`create_vcpu_with`]
/// adjusts; read it once for many vCPUs.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, Error> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| Error::kvm("KVM_GET_SUPPORTED_CPUID", e))
}

/// [`create_vcpu`] from an already read supported CPUID.
pub fn create_vcpu_with(
    vm: &VmFd,
    base: &CpuId,
    fabric: &FabricConfig,
    index: usize,
) -> Result<VcpuFd, Error> {
    let apic = fabric.apics.get(index).ok_or(Error::NoSuchVcpu(index))?;
    let n = u32::try_from(fabric.apics.len()).unwrap_or(u32::MAX);
    let fd = vm
        .create_vcpu(index as u64)
        .map_err(|e| Error::kvm("KVM_CREATE_VCPU", e))?;
    fd.set_cpuid2(&crate::cpuid::configure(base, apic, n))
        .map_err(|e| Error::kvm("KVM_SET_CPUID2", e))?;
    init_fpu(&fd)?;
    Ok(fd)
}

/// x87/SSE power-up state as a real CPU (and QEMU) sets it: FCW 0x37F, MXCSR 0x1F80,
/// XCR0 = x87 | SSE (SDM Vol. 3A §9.1.1, Table 9-1).
pub fn init_fpu(fd: &VcpuFd) -> Result<(), Error> {
    let fpu = kvm_bindings::kvm_fpu {
        fcw: 0x37F,
        mxcsr: 0x1F80,
        ..Default::default()
    };
    fd.set_fpu(&fpu).map_err(|e| Error::kvm("KVM_SET_FPU", e))?;
    let mut xcrs = kvm_bindings::kvm_xcrs {
        nr_xcrs: 1,
        ..Default::default()
    };
    if let Some(x) = xcrs.xcrs.first_mut() {
        x.xcr = 0;
        x.value = 3;
    }
    fd.set_xcrs(&xcrs)
        .map_err(|e| Error::kvm("KVM_SET_XCRS", e))
}

/// A flat 4 GiB ring-0 32-bit segment with `selector`: code (execute/read, accessed)
/// or data (read/write, accessed), as protected-mode boot entries expect.
pub fn flat_segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xFFFF_FFFF,
        selector,
        type_: if code { 0xB } else { 0x3 },
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Puts a vCPU in 32-bit protected mode with flat 4 GiB segments (CS 0x08, data 0x10)
/// and paging off, at `regs.rip` with `regs` (the multiboot v1 entry state: EAX holds
/// the magic, EBX the info address). The guest loads its own GDT before it reloads a
/// segment register.
pub fn enter_protected_mode(fd: &VcpuFd, regs: &kvm_regs) -> Result<(), Error> {
    let mut sregs = fd.get_sregs().map_err(|e| Error::kvm("KVM_GET_SREGS", e))?;
    sregs.cs = flat_segment(0x08, true);
    for s in [
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
        *s = flat_segment(0x10, false);
    }
    sregs.cr0 = 0x11;
    sregs.cr4 = 0;
    sregs.efer = 0;
    fd.set_sregs(&sregs)
        .map_err(|e| Error::kvm("KVM_SET_SREGS", e))?;
    let regs = kvm_regs {
        rflags: regs.rflags | 2,
        ..*regs
    };
    fd.set_regs(&regs)
        .map_err(|e| Error::kvm("KVM_SET_REGS", e))
}

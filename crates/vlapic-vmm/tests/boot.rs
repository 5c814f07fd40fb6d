//! Boots the mini guest (self-IPIs, APIC timer, INIT/SIPI start-up, IPIs to every
//! AP) in the VMM with 1, 2, 4 and 16 vCPUs, in xAPIC and x2APIC mode.

mod common;

use common::{boot, kvm_ok, mini_guest};
use vlapic_vmm::Outcome;

fn check(vcpus: usize, x2apic: bool) {
    if !kvm_ok() {
        return;
    }
    let rep = boot(mini_guest(), vcpus, x2apic, 60);
    let text = rep.text();
    assert_eq!(rep.outcome, Outcome::DebugExit(0), "{text}");
    let want = if vcpus > 1 { 11 } else { 9 };
    assert_eq!(rep.passed(), want, "{text}");
    assert_eq!(rep.failed(), 0, "{text}");
    assert_eq!(rep.violations, 0, "{text}");
    assert_eq!(rep.max_nesting, 3, "{text}");
    assert_eq!(rep.exit_code(), 0, "{text}");
    // Every AP was started by exactly one SIPI and took its IPI.
    for v in rep.vcpus.iter().skip(1) {
        assert_eq!(v.sipis, 1, "{text}");
        assert!(v.interrupts >= 1, "{text}");
    }
    assert!(rep.vcpus[0].interrupts >= 1201, "{text}");
    println!("{text}");
}

#[test]
fn boot_1_vcpu_xapic() {
    check(1, false);
}

#[test]
fn boot_1_vcpu_x2apic() {
    check(1, true);
}

#[test]
fn boot_2_vcpus_xapic() {
    check(2, false);
}

#[test]
fn boot_2_vcpus_x2apic() {
    check(2, true);
}

#[test]
fn boot_4_vcpus_xapic() {
    check(4, false);
}

#[test]
fn boot_4_vcpus_x2apic() {
    check(4, true);
}

#[test]
fn boot_16_vcpus_xapic() {
    check(16, false);
}

#[test]
fn boot_16_vcpus_x2apic() {
    check(16, true);
}

/// The same guest on KVM's in-kernel irqchip (the comparison baseline of
/// `vlapic bench`): every scenario passes there too.
#[test]
fn boot_4_vcpus_kernel_irqchip() {
    if !kvm_ok() {
        return;
    }
    let cfg = vlapic_vmm::VmConfig {
        kernel: mini_guest(),
        vcpus: 4,
        memory_mib: 64,
        kernel_irqchip: true,
        timeout: Some(std::time::Duration::from_secs(60)),
        console: vlapic_vmm::ConsoleSink::Quiet,
        ..vlapic_vmm::VmConfig::default()
    };
    let rep = vlapic_vmm::run_vm(&cfg).expect("run");
    let text = rep.text();
    assert_eq!(rep.outcome, Outcome::DebugExit(0), "{text}");
    assert_eq!(rep.passed(), 11, "{text}");
    assert_eq!(rep.failed(), 0, "{text}");
}

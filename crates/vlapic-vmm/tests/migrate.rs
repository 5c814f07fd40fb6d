//! Live migration: the mini guest keeps passing every scenario while the whole VM
//! is moved into a brand-new KVM VM every 2 ms (vCPU KVM state, run state, APICs
//! and IOAPIC re-created from their saved state).

mod common;

use std::time::Duration;

use common::{kvm_ok, mini_guest};
use vlapic_vmm::{run_vm, ConsoleSink, Outcome, VmConfig};

fn check(vcpus: usize, x2apic: bool) {
    if !kvm_ok() {
        return;
    }
    let cfg = VmConfig {
        kernel: mini_guest(),
        vcpus,
        x2apic,
        memory_mib: 64,
        timeout: Some(Duration::from_secs(60)),
        console: ConsoleSink::Quiet,
        migrate_every: Some(Duration::from_millis(2)),
        ..VmConfig::default()
    };
    let rep = run_vm(&cfg).expect("run");
    let text = rep.text();
    assert_eq!(rep.outcome, Outcome::DebugExit(0), "{text}");
    assert_eq!(rep.failed(), 0, "{text}");
    assert_eq!(rep.passed(), if vcpus > 1 { 11 } else { 9 }, "{text}");
    assert!(rep.migrations >= 1, "{text}");
    assert_eq!(rep.violations, 0, "{text}");
    assert_eq!(rep.max_nesting, 3, "{text}");
    println!("{text}");
}

#[test]
fn migrate_1_vcpu_xapic() {
    check(1, false);
}

#[test]
fn migrate_4_vcpus_x2apic() {
    check(4, true);
}

#[test]
fn migrate_16_vcpus_xapic() {
    check(16, false);
}

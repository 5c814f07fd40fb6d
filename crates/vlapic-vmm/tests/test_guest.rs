//! Boots the project's test guest (guest/, embedded by build.rs; or the image named
//! by `VLAPIC_TEST_GUEST`) with 1, 2, 4 and 16 vCPUs in xAPIC and x2APIC mode, with
//! the LAPICs and IOAPIC in vlapic (and twice while live-migrating every 5 ms),
//! and requires every scenario to pass.

// SKIPPED lines go straight to stderr: the test harness captures print!/eprint!.
use std::io::Write as _;

mod common;

use std::time::Duration;

use common::kvm_ok;
use vlapic_vmm::{run_vm, ConsoleSink, Outcome, VmConfig};

fn guest() -> Option<Vec<u8>> {
    if let Some(p) = std::env::var_os("VLAPIC_TEST_GUEST") {
        return Some(std::fs::read(&p).expect("VLAPIC_TEST_GUEST image"));
    }
    let g = vlapic_vmm::guest::test_guest().map(<[u8]>::to_vec);
    if g.is_none() {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: test guest image not built (scripts/build-guest.sh missing or failed)"
        );
    }
    g
}

fn check(vcpus: usize, x2apic: bool) {
    check_with(vcpus, x2apic, None);
}

fn check_with(vcpus: usize, x2apic: bool, migrate_every: Option<Duration>) {
    if !kvm_ok() {
        return;
    }
    let Some(kernel) = guest() else {
        return;
    };
    let cfg = VmConfig {
        kernel,
        vcpus,
        x2apic,
        memory_mib: 128,
        timeout: Some(Duration::from_secs(240)),
        console: ConsoleSink::Quiet,
        migrate_every,
        ..VmConfig::default()
    };
    let rep = run_vm(&cfg).expect("run");
    let text = rep.text();
    println!("{text}");
    assert!(matches!(rep.outcome, Outcome::DebugExit(_)), "{text}");
    assert!(rep.console.done.is_some(), "no DONE line:\n{text}");
    assert!(rep.passed() > 0, "{text}");
    if let Some(s) = rep.console.scenarios.iter().find(|s| s.status == "FAIL") {
        panic!("scenario {} failed: {}\n{text}", s.name, s.detail);
    }
    assert_eq!(rep.violations, 0, "{text}");
    if migrate_every.is_some() {
        assert!(rep.migrations >= 1, "{text}");
        // The nested-priorities scenario holds 4 vectors in service for 20 ms, longer
        // than the migration interval: at least one migration lands mid-handler.
        assert!(
            rep.nested_migrations >= 1,
            "no migration with 3+ in service:\n{text}"
        );
        assert!(rep.max_in_service_migrated >= 3, "{text}");
    }
    // Every AP was started (by exactly one SIPI per INIT-SIPI-SIPI sequence at least once).
    for v in rep.vcpus.iter().skip(1) {
        assert!(v.sipis >= 1, "vcpu{} never started:\n{text}", v.index);
    }
}

#[test]
fn test_guest_1_vcpu_xapic() {
    check(1, false);
}

#[test]
fn test_guest_1_vcpu_x2apic() {
    check(1, true);
}

#[test]
fn test_guest_2_vcpus_xapic() {
    check(2, false);
}

#[test]
fn test_guest_2_vcpus_x2apic() {
    check(2, true);
}

#[test]
fn test_guest_4_vcpus_xapic() {
    check(4, false);
}

#[test]
fn test_guest_4_vcpus_x2apic() {
    check(4, true);
}

#[test]
fn test_guest_16_vcpus_xapic() {
    check(16, false);
}

#[test]
fn test_guest_16_vcpus_x2apic() {
    check(16, true);
}

/// The test guest keeps passing while the VM is moved into a new KVM VM every 5 ms.
#[test]
fn test_guest_2_vcpus_xapic_migrating() {
    check_with(2, false, Some(Duration::from_millis(5)));
}

/// The same in x2APIC mode with 4 vCPUs.
#[test]
fn test_guest_4_vcpus_x2apic_migrating() {
    check_with(4, true, Some(Duration::from_millis(5)));
}

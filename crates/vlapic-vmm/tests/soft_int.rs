//! The test guest's `soft-int` scenario (`int3` and `int n` at CPL0 through an
//! interrupt gate, a trap gate, an IST gate and a not-present gate; SDM Vol. 3A
//! §6.12, §6.14) on both irqchips, with and without the VMM's delivery of software
//! interrupts KVM's instruction emulator cannot execute (`vlapic_kvm::softint`).

// SKIPPED lines go straight to stderr: the test harness captures print!/eprint!.
use std::io::Write as _;

mod common;

use std::time::Duration;

use common::kvm_ok;
use vlapic_vmm::{run_vm, ConsoleSink, Outcome, RunReport, VmConfig};

/// The five instructions the scenario executes (int3, int $0x61, int $0x62, int3,
/// int $0x63 whose delivery raises #NP).
const SOFT_INTS: u64 = 5;

fn run(kernel_irqchip: bool, soft_interrupts: bool) -> Option<RunReport> {
    if !kvm_ok() {
        return None;
    }
    let Some(kernel) = vlapic_vmm::guest::test_guest().map(<[u8]>::to_vec) else {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: test guest image not built (scripts/build-guest.sh missing or failed)"
        );
        return None;
    };
    let cfg = VmConfig {
        kernel,
        cmdline: "only=soft-int".into(),
        vcpus: 1,
        timeout: Some(Duration::from_secs(120)),
        console: ConsoleSink::Quiet,
        kernel_irqchip,
        soft_interrupts,
        ..VmConfig::default()
    };
    Some(run_vm(&cfg).expect("run"))
}

/// With the workaround the scenario passes; on a host whose emulator fails on these
/// instructions (this one) the VMM delivered each of the five exactly once, and on a
/// host that executes them natively it delivered none.
fn passes(kernel_irqchip: bool) {
    let Some(rep) = run(kernel_irqchip, true) else {
        return;
    };
    let text = rep.text();
    println!("{text}");
    let sc = rep
        .console
        .scenarios
        .iter()
        .find(|s| s.name == "soft-int")
        .unwrap_or_else(|| panic!("soft-int did not run:\n{text}"));
    assert_eq!(sc.status, "PASS", "{}: {}\n{text}", sc.name, sc.detail);
    assert!(matches!(rep.outcome, Outcome::DebugExit(_)), "{text}");
    assert!(
        rep.soft_interrupts == SOFT_INTS || rep.soft_interrupts == 0,
        "{} software interrupts delivered by the VMM, want {SOFT_INTS} (or 0 natively)\n{text}",
        rep.soft_interrupts
    );
    let json = rep.json();
    assert_eq!(json["soft_interrupts"], rep.soft_interrupts, "{json}");
    if rep.soft_interrupts > 0 {
        assert!(text.contains("soft ints:    5 software interrupts delivered by the VMM"));
    }
}

#[test]
fn soft_int_scenario_on_vlapic() {
    passes(false);
}

#[test]
fn soft_int_scenario_on_kvm_irqchip() {
    passes(true);
}

/// `--no-soft-int`: nothing is delivered by the VMM; where KVM's emulator cannot
/// execute `int3` (this host) the run ends with KVM's internal error and the
/// instruction bytes, as before the workaround existed.
#[test]
fn switched_off_keeps_the_crash_report() {
    let Some(rep) = run(false, false) else {
        return;
    };
    let text = rep.text();
    println!("{text}");
    assert_eq!(rep.soft_interrupts, 0, "{text}");
    match &rep.outcome {
        Outcome::GuestCrash(m) => {
            assert!(m.contains("KVM internal error (suberror 1"), "{text}");
        }
        _ => assert_eq!(rep.failed(), 0, "{text}"),
    }
}

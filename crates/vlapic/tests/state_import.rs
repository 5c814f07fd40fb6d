//! Import semantics: validate-then-apply, everything derived rebuilt (illumos gaps
//! O1–O4, bugs 15251 and 16183), and one test per validation rule.

use vlapic::lvt::Lvt;
use vlapic::regs::*;
use vlapic::state::{Field, ImportError, LapicState};
use vlapic::{ApicMode, Delivery, LapicConfig, LocalApic};

fn cfg() -> LapicConfig {
    LapicConfig::default().with_verify(true)
}

fn enabled(cfg: LapicConfig) -> LocalApic {
    let mut apic = LocalApic::new(cfg);
    let _ = apic.write_register(0xF0, 0x1FF, 0);
    apic
}

/// Three nested in-service interrupts (0x41 level-triggered, 0x61, 0x81), one
/// pending (0x35), TPR 0x20, a periodic timer armed at time 1000.
fn mid_handler() -> LocalApic {
    let mut apic = enabled(cfg());
    let _ = apic.write_register(0x80, 0x20, 0);
    let _ = apic.write_register(0x3E0, 0xB, 0); // divide by 1
    let _ = apic.write_register(0x320, 0x2_00EC, 0); // periodic, vector 0xEC
    let _ = apic.write_register(0x380, 5000, 1000);
    apic.deliver(Delivery::fixed_level(0x41), 1000);
    assert_eq!(apic.acknowledge(), Some(0x41));
    apic.deliver(Delivery::fixed(0x61), 1000);
    assert_eq!(apic.acknowledge(), Some(0x61));
    apic.deliver(Delivery::fixed(0x81), 1000);
    assert_eq!(apic.acknowledge(), Some(0x81));
    apic.deliver(Delivery::fixed(0x35), 1000);
    apic
}

fn eoi(apic: &mut LocalApic, now: u64) -> Option<u8> {
    apic.write_register(0xB0, 0, now).eoi
}

// Issue 4 acceptance test; SDM §11.8.5 (EOI retires the highest ISR bit) and
// illumos 12936 (restore sets ISR without pushes: the verifier must be rebuilt).
#[test]
fn nested_handlers_survive_export_import_in_order() {
    let src = mid_handler();
    let state = src.export();
    let mut dst = LocalApic::new(cfg());
    dst.import(&state, 2000).unwrap();
    assert_eq!(dst.export(), state, "import then export is the identity");
    assert_eq!(dst.ppr(), 0x80, "PPR recomputed from ISR (illumos O1)");
    assert_eq!(dst.pending_vector(), None, "0x35 is below PPR");
    assert_eq!(eoi(&mut dst, 2000), None);
    assert_eq!(dst.isr().iter().collect::<Vec<_>>(), vec![0x41, 0x61]);
    assert_eq!(eoi(&mut dst, 2000), None);
    assert_eq!(dst.ppr(), 0x40);
    // The level-triggered vector still reaches the IOAPIC after import.
    assert_eq!(eoi(&mut dst, 2000), Some(0x41));
    assert!(dst.isr().is_empty());
    assert_eq!(dst.acknowledge(), Some(0x35));
    assert_eq!(eoi(&mut dst, 2000), None);
    assert_eq!(dst.verifier().violations(), 0);
    assert_eq!(
        dst.verifier().max_depth(),
        3,
        "the rebuilt shadow held all three"
    );
}

// Lead's design note: a failed import leaves the APIC exactly as it was.
#[test]
fn failed_import_changes_nothing() {
    let mut dst = mid_handler();
    let before = dst.export();
    let mut bad = LocalApic::new(cfg()).export();
    bad.tpr = 0x100;
    bad.isr = [0, 0, 0x0202, 0, 0, 0, 0, 0]; // 0x41 and 0x49: one class
    assert_eq!(
        dst.import(&bad, 5000),
        Err(ImportError::Tpr { value: 0x100 })
    );
    assert_eq!(dst.export(), before);
    assert_eq!(dst.now(), 1000, "not even the clock moved");
    assert_eq!(dst.verifier().violations(), 0);
}

// illumos O2: software-enable state comes from the imported SVR, so a later
// software disable is seen as a change and masks the LVTs (SDM §11.4.7.2).
#[test]
fn software_enable_state_follows_imported_svr() {
    let state = mid_handler().export();
    let mut dst = LocalApic::new(cfg()); // reset: software-disabled
    dst.import(&state, 1000).unwrap();
    assert!(dst.is_enabled());
    let _ = dst.write_register(0xF0, 0xFF, 1000);
    assert_ne!(dst.lvt(Lvt::Timer) & vlapic::lvt::LVT_MASKED, 0);
    assert!(
        !dst.deliver(Delivery::fixed(0x90), 1000),
        "refused while disabled"
    );
}

// illumos 15251 / KVM SET_LAPIC: an expiry further out than the initial count
// allows is clamped, so the current count never exceeds the initial count.
#[test]
fn timer_rearmed_and_clamped() {
    let mut state = mid_handler().export();
    assert_eq!(state.timer_deadline, 6000);
    let mut dst = LocalApic::new(cfg());
    dst.import(&state, 5000).unwrap();
    assert_eq!(dst.read_register(0x390, 5000), 1000);
    assert_eq!(dst.next_timer_deadline(), Some(6000));
    state.timer_deadline = 1_000_000;
    let mut dst = LocalApic::new(cfg());
    dst.import(&state, 5000).unwrap();
    assert_eq!(
        dst.read_register(0x390, 5000),
        5000,
        "clamped to the initial count"
    );
    assert_eq!(dst.next_timer_deadline(), Some(10_000));
    // The periodic timer keeps running from the imported registers.
    assert!(dst.advance(10_000));
    assert!(dst.irr().contains(0xEC));
    assert_eq!(
        dst.next_timer_deadline(),
        None,
        "0xEC pending: nothing to wake"
    );
    // A 5 µs period under the default 200 µs minimum (KVM): the next expiry is 200 µs
    // on, while the count still reloads every 5 µs.
    assert_eq!(dst.timer().deadline(), Some(210_000));
    assert_eq!(dst.read_register(0x390, 12_000), 3000);
}

// A deadline already passed at import fires at the import itself, as advance(now)
// right after it would: the APIC never leaves an expiry due at the latest time it has
// seen (issue 14), so the advance that follows has nothing left to do.
#[test]
fn overdue_timer_fires_at_import() {
    let state = mid_handler().export();
    let mut dst = LocalApic::new(cfg());
    dst.import(&state, 7000).unwrap();
    assert!(dst.irr().contains(0xEC));
    assert_eq!(dst.stats().timer_expired, 1);
    assert!(dst.timer_settled());
    assert!(!dst.advance(7000));
    assert_eq!(dst.stats().timer_expired, 1);
}

// SDM §11.12.5.1 / §11.12.10.2: x2APIC ID is the initial ID, LDR derived.
#[test]
fn x2apic_state_round_trips_and_id_is_checked() {
    let c = cfg().with_apic_id(0x125).with_bsp(false);
    let mut src = enabled(c);
    let _ = src
        .write_apic_base(0xFEE0_0000 | APIC_BASE_EN | APIC_BASE_EXTD, 0)
        .unwrap();
    let _ = src.write_msr(0x808, 0x30, 0).unwrap();
    let st = src.export();
    assert_eq!(st.id, 0x125);
    assert_eq!(st.ldr, 0x0012_0020);
    let mut dst = LocalApic::new(c);
    dst.import(&st, 0).unwrap();
    assert_eq!(dst.mode(), ApicMode::X2Apic);
    assert_eq!(dst.read_msr(0x802, 0), Ok(0x125));
    assert_eq!(dst.read_msr(0x80D, 0), Ok(0x0012_0020));
    let mut other = LocalApic::new(c.with_apic_id(0x126));
    assert_eq!(
        other.import(&st, 0),
        Err(ImportError::Id {
            found: 0x125,
            expected: 0x126
        })
    );
}

fn base_state() -> LapicState {
    mid_handler().export()
}

/// (mutation, expected rule, expected field): each must be the only rule broken.
#[rustfmt::skip]
#[allow(clippy::type_complexity)]
fn rule_cases() -> Vec<(&'static str, Box<dyn Fn(&mut LapicState)>, &'static str, Field)> {
    vec![
        ("reserved apic base bit 9", Box::new(|s| s.apic_base |= 1 << 9), "VVE_BAD_MSR_BASE", Field::ApicBase),
        ("apic base above MAXPHYADDR", Box::new(|s| s.apic_base |= 1 << 50), "VVE_BAD_MSR_BASE", Field::ApicBase),
        ("EN=0 EXTD=1", Box::new(|s| {
            *s = LocalApic::new(cfg()).export();
            s.apic_base = (s.apic_base & !APIC_BASE_EN) | APIC_BASE_EXTD;
        }), "APIC_BASE_MODE", Field::ApicBase),
        ("BSP flag", Box::new(|s| s.apic_base &= !APIC_BASE_BSP), "APIC_BASE_BSP", Field::ApicBase),
        ("xAPIC ID above 8 bits", Box::new(|s| s.id = 0x100), "VVE_BAD_ID", Field::Id),
        ("version", Box::new(|s| s.version = 0x50014), "VVE_BAD_VERSION", Field::Version),
        ("TPR > 0xFF", Box::new(|s| s.tpr = 0x1_0000), "VVE_BAD_TPR", Field::Tpr),
        ("APR > 0xFF", Box::new(|s| s.apr = 0x100), "APR_RANGE", Field::Apr),
        ("LDR bits 23:0", Box::new(|s| s.ldr = 0x0100_0001), "LDR_RESERVED", Field::Ldr),
        ("DFR bits 27:0", Box::new(|s| s.dfr = 0xF000_0000), "DFR_RESERVED", Field::Dfr),
        ("SVR bit 10", Box::new(|s| s.svr |= 1 << 10), "SVR_RESERVED", Field::Svr),
        ("vector 5 in IRR", Box::new(|s| s.irr[0] |= 1 << 5), "VVE_LOW_VECTOR", Field::Irr),
        ("vector 15 in TMR", Box::new(|s| s.tmr[0] |= 1 << 15), "VVE_LOW_VECTOR", Field::Tmr),
        ("vector 0 in ISR", Box::new(|s| s.isr[0] |= 1), "VVE_LOW_VECTOR", Field::Isr),
        // illumos O4: 0x41 and 0x49 share class 4 but not a byte; illumos passes it.
        ("0x41 and 0x49 in service", Box::new(|s| s.isr[2] |= 1 << 9), "VVE_ISR_PRIORITY", Field::Isr),
        ("0x60 and 0x6F in service", Box::new(|s| s.isr[3] |= 1 << 15), "VVE_ISR_PRIORITY", Field::Isr),
        ("ESR bit 4", Box::new(|s| s.esr = 0x10), "VVE_BAD_ESR", Field::Esr),
        ("pending ESR bit 8", Box::new(|s| s.esr_pending = 0x100), "VVE_BAD_ESR", Field::EsrPending),
        ("ICR bit 13", Box::new(|s| s.icr |= 1 << 13), "ICR_RESERVED", Field::Icr),
        ("xAPIC ICR bit 32", Box::new(|s| s.icr |= 1 << 32), "ICR_RESERVED", Field::Icr),
        ("LVT error bit 17", Box::new(|s| s.lvt[6] |= 1 << 17), "LVT_RESERVED", Field::Lvt(Lvt::Error)),
        ("LVT thermal delivery status", Box::new(|s| s.lvt[2] |= 1 << 12), "LVT_RESERVED", Field::Lvt(Lvt::Thermal)),
        ("LVT timer mode 11", Box::new(|s| s.lvt[1] |= 3 << 17), "LVT_TIMER_MODE", Field::Lvt(Lvt::Timer)),
        ("DCR bit 2", Box::new(|s| s.timer_divide |= 4), "DCR_RESERVED", Field::TimerDivide),
        ("armed with initial count 0", Box::new(|s| s.timer_initial = 0), "VVE_TIMER_MISMATCH", Field::TimerDeadline),
        ("deadline beyond i64", Box::new(|s| s.timer_deadline = u64::MAX), "TIMER_DEADLINE_RANGE", Field::TimerDeadline),
        ("TSC deadline outside its mode", Box::new(|s| s.tsc_deadline = 5), "TSC_DEADLINE_MODE", Field::TscDeadline),
        ("TSC-deadline armed without expiry", Box::new(|s| {
            s.lvt[1] = (s.lvt[1] & !(3 << 17)) | (2 << 17);
            s.timer_deadline = 0;
            s.tsc_deadline = 7;
        }), "TSC_DEADLINE_MISMATCH", Field::TscDeadline),
        ("unmasked LVT while software-disabled", Box::new(|s| s.svr &= !SVR_ENABLE), "LVT_UNMASKED_DISABLED", Field::Lvt(Lvt::Timer)),
        ("LINT1 remote IRR", Box::new(|s| s.lvt[5] |= 1 << 14), "LVT_RESERVED", Field::Lvt(Lvt::Lint1)),
        ("disabled APIC with a register set", Box::new(|s| {
            *s = LocalApic::new(cfg()).export();
            s.apic_base &= !APIC_BASE_EN;
            s.irr[3] = 1;
        }), "DISABLED_NOT_RESET", Field::Irr),
    ]
}

// Every rule of state-formats.md §2 (illumos vlapic_data_validate) and ours, each
// broken alone: import refuses with that rule and field and changes nothing.
#[test]
fn each_rule_rejects_alone_and_names_its_field() {
    for (what, mutate, rule, field) in rule_cases() {
        let mut s = base_state();
        mutate(&mut s);
        let all = s.validate(&cfg());
        assert_eq!(all.len(), 1, "{what}: {all:?}");
        assert_eq!(all[0].rule(), rule, "{what}");
        assert_eq!(all[0].field(), field, "{what}");
        let mut dst = mid_handler();
        let before = dst.export();
        let err = dst.import(&s, 9000).unwrap_err();
        assert_eq!(err, all[0], "{what}");
        assert_eq!(dst.export(), before, "{what}: state untouched");
        assert!(err.to_string().starts_with(field.name()), "{what}: {err}");
    }
}

#[test]
fn x2apic_ldr_must_be_derived_and_cmci_absent() {
    let c = cfg().with_cmci(false);
    let mut src = enabled(c);
    let _ = src
        .write_apic_base(
            0xFEE0_0000 | APIC_BASE_EN | APIC_BASE_EXTD | APIC_BASE_BSP,
            0,
        )
        .unwrap();
    let mut st = src.export();
    assert!(st.validate(&c).is_empty());
    st.ldr = 0x2;
    st.lvt[0] = 0x30;
    st.icr = 0xFFFF_FFFF_0000_0000; // 32-bit destination is fine in x2APIC mode
    let rules: Vec<_> = st.validate(&c).iter().map(|e| e.rule()).collect();
    assert_eq!(rules, vec!["LDR_X2APIC_DERIVED", "LVT_ABSENT"]);
}

// `validate` lists every broken rule; import reports the first of them.
#[test]
fn validate_lists_everything() {
    let mut s = base_state();
    s.tpr = 0x100;
    s.esr = 0x10;
    s.isr[2] |= 1 << 9;
    let all = s.validate(&cfg());
    let rules: Vec<_> = all.iter().map(|e| e.rule()).collect();
    assert_eq!(
        rules,
        vec!["VVE_BAD_TPR", "VVE_ISR_PRIORITY", "VVE_BAD_ESR"]
    );
    assert_eq!(s.check(&cfg()), Err(all[0]));
    assert_eq!(
        all[1].to_string(),
        "isr: vectors 0x41 and 0x49 both in service in priority class 4"
    );
}

// SDM §11.5.4.1: TSC-deadline state re-derives the expiry from the MSR.
#[test]
fn tsc_deadline_state_round_trips() {
    let mut src = enabled(cfg());
    let _ = src.write_register(0x320, 0x4_00E0, 0);
    let _ = src.write_msr(0x6E0, 123_456, 0).unwrap();
    let st = src.export();
    assert_eq!(st.tsc_deadline, 123_456);
    assert_eq!(st.timer_deadline, 123_456, "1 GHz TSC: ns = ticks");
    let mut dst = LocalApic::new(cfg());
    dst.import(&st, 100).unwrap();
    assert_eq!(dst.read_msr(0x6E0, 100), Ok(123_456));
    assert!(dst.advance(123_456));
    assert!(dst.irr().contains(0xE0));
}

#[test]
fn power_on_state_is_valid_for_its_config() {
    for c in [
        cfg(),
        LapicConfig::with_id(7),
        LapicConfig::default()
            .with_mode(ApicMode::X2Apic)
            .with_apic_id(0x1_0000),
        LapicConfig::default()
            .with_mode(ApicMode::Disabled)
            .with_apic_id(3)
            .with_cmci(false)
            .with_eoi_broadcast_suppression(false),
    ] {
        let s = LapicState::power_on(&c);
        assert_eq!(s.validate(&c), vec![], "{c:?}");
        // The same APIC after its guest disabled it (SDM §11.4.3: reset state).
        let mut apic = LocalApic::new(c);
        let _ = apic.write_register(0xF0, 0x1FF, 0);
        let _ = apic.write_register(0x80, 0x30, 0);
        let _ = apic.write_apic_base(c.reset_apic_base() & !APIC_BASE_EN & !APIC_BASE_EXTD, 0);
        assert_eq!(apic.mode(), ApicMode::Disabled);
        assert_eq!(apic.export().validate(&c), vec![], "{c:?} disabled");
        assert_eq!(s.implied_config().version(), s.version);
    }
}

// kvm-unit-tests test_apic_disable: CR8 keeps working while the APIC is hardware-
// disabled, so TPR is the one register a disabled APIC may hold away from its reset
// value; such a state must export and import (the disabled-means-reset rule spares TPR).
#[test]
fn disabled_apic_with_cr8_written_migrates() {
    let mut src = enabled(cfg());
    let _ = src
        .write_apic_base(DEFAULT_APIC_BASE | APIC_BASE_BSP, 0)
        .unwrap();
    src.set_cr8(0x9).unwrap();
    let state = src.export();
    assert_eq!(state.tpr, 0x90);
    assert!(
        state.validate(&cfg()).is_empty(),
        "{:?}",
        state.validate(&cfg())
    );
    let mut dst = LocalApic::new(cfg());
    dst.import(&state, 0).unwrap();
    assert_eq!(dst.mode(), ApicMode::Disabled);
    assert_eq!(dst.cr8(), 0x9);
    // Re-enabling keeps TPR = CR8 << 4, as the test expects.
    let _ = dst
        .write_apic_base(DEFAULT_APIC_BASE | APIC_BASE_BSP | APIC_BASE_EN, 0)
        .unwrap();
    assert_eq!(dst.read_register(0x80, 0), 0x90);
}

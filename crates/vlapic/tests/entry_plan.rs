//! Issue 9, point 2: the entry plan (`LocalApic::plan_entry`) and `held_back_by_tpr`,
//! after the VMM entry sequence of KVM's `vcpu_enter_guest`/`kvm_check_and_inject_events`.

mod common;
use common::*;
use vlapic::fabric::{Fabric, FabricConfig, SharedFabric};
use vlapic::{Delivery, DeliveryMode, EntryPlan, Events};

// KVM inject_pending_event: with interrupts blocked, nothing is acknowledged and an
// interrupt-window exit is requested; the vector stays in IRR.
#[test]
fn blocked_entry_requests_the_window() {
    let mut a = xapic();
    a.deliver(Delivery::fixed(0x41), 0);
    let p = a.plan_entry(0, false);
    assert_eq!(p.inject, None);
    assert!(p.request_window);
    assert!(!p.held_by_tpr);
    assert!(a.irr().contains(0x41));
    assert!(a.isr().is_empty());
}

// SDM §11.8.3.1 / KVM kvm_cpu_get_interrupt: the open window takes the highest
// deliverable vector IRR → ISR; the lower one waits below the new PPR, no window.
#[test]
fn open_entry_acknowledges_the_highest() {
    let mut a = xapic();
    a.deliver(Delivery::fixed(0x41), 0);
    a.deliver(Delivery::fixed(0x62), 0);
    let p = a.plan_entry(0, true);
    assert_eq!(p.inject, Some(0x62));
    assert!(!p.request_window, "0x41 is below PPR 0x60: no window");
    assert!(!p.held_by_tpr, "held by ISR, not TPR");
    assert_eq!(a.ppr(), 0x60);
    assert!(a.isr().contains(0x62) && a.irr().contains(0x41));
    // Nothing pending at all: no window, nothing injected, nothing held.
    let mut b = xapic();
    let p = b.plan_entry(0, true);
    let idle = (p.events, p.inject, p.request_window, p.held_by_tpr);
    assert_eq!(idle, (Events::default(), None, false, false));
}

// SDM §11.4.7.3: INIT sends the vCPU to wait-for-SIPI; the plan hands the INIT over
// and acknowledges nothing, even with a vector pending and the window open.
#[test]
fn init_suppresses_injection() {
    let f = SharedFabric::new(FabricConfig::with_vcpus(2));
    for v in 0..2 {
        f.lapic_mmio_write(v, SVR, &0x1FFu32.to_le_bytes(), 0);
    }
    // vCPU 0 sends INIT to vCPU 1, vCPU 1 is re-enabled and receives a fixed IPI.
    f.lapic_mmio_write(0, ICR_HI, &(1u32 << 24).to_le_bytes(), 0);
    f.lapic_mmio_write(0, ICR_LO, &0x4500u32.to_le_bytes(), 0);
    f.lapic_mmio_write(1, SVR, &0x1FFu32.to_le_bytes(), 0);
    f.lapic_mmio_write(0, ICR_LO, &0x4051u32.to_le_bytes(), 0);
    let p = f.plan_entry(1, 0, true).unwrap();
    assert!(p.events.init);
    assert_eq!(p.inject, None);
    assert!(f.read_apic(1, |a| a.irr().contains(0x51)).unwrap());
    // The events were taken: the next plan has none, and injects.
    let p = f.plan_entry(1, 0, true).unwrap();
    assert!(!p.events.any());
    assert_eq!(p.inject, Some(0x51));
}

// Events ride along with the plan; an NMI among them holds the vector back (SDM §6.9).
#[test]
fn events_are_taken_with_the_plan() {
    let mut a = xapic();
    a.deliver(Delivery::event(DeliveryMode::Nmi, 0), 0);
    a.deliver(Delivery::fixed(0x30), 0);
    let p = a.plan_entry(0, true);
    assert_eq!(p.events.nmi, 1);
    // SDM Vol. 3A §6.9: the NMI is taken before the maskable interrupt, which waits
    // (KVM would inject a queued vector ahead of a pending NMI).
    assert_eq!(p.inject, None);
    assert!(p.request_window);
    assert!(!a.events().any());
    assert_eq!(a.plan_entry(0, true).inject, Some(0x30));
}

// SDM §11.8.3.1: PPR = TPR when TPR[7:4] ≥ ISRV[7:4]; a vector whose class is at or
// below TPR's but above the in-service class is held by TPR alone.
#[test]
fn held_by_tpr_when_tpr_is_above_the_vector() {
    let mut a = xapic();
    let _ = a.write_register(TPR, 0x50, 0);
    a.deliver(Delivery::fixed(0x41), 0);
    a.deliver(Delivery::fixed(0x52), 0); // equal class: also held
    let p = a.plan_entry(0, true);
    assert_eq!(p.inject, None);
    assert!(
        !p.request_window,
        "nothing pending: a window would not help"
    );
    assert!(p.held_by_tpr);
    assert_eq!(p.cr8, 5);
    // Lowering CR8 releases 0x52.
    a.set_cr8(4).unwrap();
    assert!(!a.held_back_by_tpr());
    assert_eq!(a.pending_vector(), Some(0x52));
    assert_eq!(a.plan_entry(0, true).inject, Some(0x52));
}

// SDM §11.8.3.1: when ISRV's class is at or above the vector's, ISR holds it, not TPR
// (lowering CR8 would not release it; no polling needed).
#[test]
fn not_held_by_tpr_when_isr_is_above_the_vector() {
    let mut a = xapic();
    a.deliver(Delivery::fixed(0x60), 0);
    assert_eq!(a.acknowledge(), Some(0x60));
    let _ = a.write_register(TPR, 0x70, 0); // TPR above too, but ISR already holds 0x55
    a.deliver(Delivery::fixed(0x55), 0);
    assert!(!a.held_back_by_tpr());
    let _ = a.write_register(TPR, 0x00, 0);
    assert!(!a.held_back_by_tpr(), "ISR 0x60 alone holds 0x55");
    assert_eq!(a.pending_vector(), None);
    // Above ISR's class but at TPR's: held by TPR.
    a.deliver(Delivery::fixed(0x75), 0);
    let _ = a.write_register(TPR, 0x70, 0);
    assert!(a.held_back_by_tpr());
    // Nothing in IRR: never held.
    let b = xapic();
    assert!(!b.held_back_by_tpr());
}

// SDM §11.8.6.1: CR8 reads TPR[7:4].
#[test]
fn cr8_is_tpr_high_nibble() {
    let mut a = xapic();
    let _ = a.write_register(TPR, 0xB7, 0);
    assert_eq!(a.plan_entry(0, false).cr8, 0xB);
    let mut f = Fabric::new(FabricConfig::with_vcpus(1));
    assert_eq!(f.set_cr8(0, 0x9), Some(Ok(())));
    assert_eq!(f.read_apic(0, |a| a.tpr()), Some(0x90));
    assert_eq!(f.plan_entry(0, 0, false).map(|p| p.cr8), Some(0x9));
    assert_eq!(f.set_cr8(0, 0x10), Some(Err(vlapic::GpFault)));
    assert_eq!(f.set_cr8(1, 0), None);
}

// SDM §11.5.4: the plan advances time first, so an expired periodic timer is in the
// plan (injected) and the deadline is the next period, not the one just passed.
#[test]
fn timer_deadline_is_read_after_advance() {
    let mut a = xapic();
    let _ = a.write_register(TDCR, 0xB, 0); // divide by 1: 1 ns per tick
    let _ = a.write_register(LVT_TIMER, 0x2_0041, 0); // periodic, vector 0x41
                                                      // 1 ms period (above the default 200 µs minimum period).
    let _ = a.write_register(TMICT, 1_000_000, 0);
    let p = a.plan_entry(500_000, true);
    assert_eq!((p.inject, p.timer_deadline), (None, Some(1_000_000)));
    let p = a.plan_entry(1_000_000, true);
    assert_eq!(p.inject, Some(0x41));
    assert_eq!(p.timer_deadline, Some(2_000_000));
    // One-shot: after expiry no deadline remains.
    let mut b = xapic();
    let _ = b.write_register(TDCR, 0xB, 0);
    let _ = b.write_register(LVT_TIMER, 0x42, 0);
    let _ = b.write_register(TMICT, 10, 0);
    let p = b.plan_entry(10, false);
    assert_eq!((p.request_window, p.timer_deadline), (true, None));
}

// The plan reports where the xAPIC page is, and that there is none in x2APIC mode.
#[test]
fn plan_reports_the_mmio_base() {
    let mut a = xapic();
    assert_eq!(a.plan_entry(0, false).mmio_base, Some(0xFEE0_0000));
    let mut x = x2apic(3);
    assert_eq!(x.plan_entry(0, false).mmio_base, None);
    // The plan is a plain value: copied, compared, defaulted.
    let p: EntryPlan = x.plan_entry(0, false);
    let q = p;
    assert_eq!(p, q);
    assert_eq!(EntryPlan::default().timer_deadline, None);
}

// The fabric front ends: None for a vCPU that does not exist.
#[test]
fn fabric_plan_for_a_nonexistent_vcpu() {
    let s = SharedFabric::new(FabricConfig::with_vcpus(1));
    assert_eq!(s.plan_entry(1, 0, true), None);
    assert_eq!(s.read_apic(1, |a| a.id()), None);
    assert_eq!(s.set_cr8(1, 0), None);
    let mut f = Fabric::new(FabricConfig::with_vcpus(1));
    assert_eq!(f.plan_entry(7, 0, true), None);
    assert_eq!(f.read_apic(7, |a| a.id()), None);
}

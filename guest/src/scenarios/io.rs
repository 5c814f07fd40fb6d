//! IOAPIC scenarios, driven through pc-testdev interrupt lines
//! (`outb(level, 0x2000 + line)`; line N = IOAPIC pin N). Line 14 is used
//! for edge-triggered tests, line 15 for level-triggered ones; RTEs target
//! the BSP (physical destination).
//!
//! Level-triggered semantics checked: the IOAPIC sets Remote IRR when it
//! sends the interrupt and clears it on the EOI for that vector (broadcast
//! by the LAPIC, or the IOAPIC EOI register with directed EOI); the LAPIC
//! sets the TMR bit of level-triggered vectors; a line still asserted after
//! the EOI is delivered again; a masked pin holds a level but drops edges.

use core::sync::atomic::{AtomicU32, Ordering::*};

use super::{counts, deliver, only, EDGE_LINE, LEVEL_LINE};
use crate::idt::{self, Frame};
use crate::ioapic::{self, RTE_LEVEL, RTE_MASKED, RTE_REMOTE_IRR};
use crate::percpu;
use crate::report::Res;
use crate::{apic, time};

fn ok() -> Res {
    Ok(())
}

fn check_ioapic() -> Res {
    let ver = ioapic::version();
    let max = ioapic::max_entry();
    ensure!(
        ver != 0xFF && ver >= 0x11,
        "IOAPIC version register reads {:#x}",
        ioapic::read(ioapic::REG_VERSION)
    );
    ensure!(max >= LEVEL_LINE, "IOAPIC has only {} pins", max + 1);
    Ok(())
}

fn pulse(line: u32) -> Res {
    ioapic::set_line(line, true);
    ioapic::set_line(line, false);
    Ok(())
}

fn remote_irr(pin: u32) -> bool {
    ioapic::read_rte(pin) & RTE_REMOTE_IRR != 0
}

// --- handlers ------------------------------------------------------------------

fn edge_handler(f: &mut Frame) {
    let v = f.vector();
    if apic::bit(&apic::tmr(), v) {
        note!("TMR bit set for edge-triggered vector {:#x}", v);
    }
    apic::eoi();
}

/// Pin the level handler works on, and the entry number at which it lowers
/// the line (1 = first entry).
static L_PIN: AtomicU32 = AtomicU32::new(LEVEL_LINE);
static L_LOWER_AT: AtomicU32 = AtomicU32::new(1);
static L_ENTRIES: AtomicU32 = AtomicU32::new(0);

fn level_handler(f: &mut Frame) {
    let v = f.vector();
    let n = L_ENTRIES.fetch_add(1, SeqCst) + 1;
    let pin = L_PIN.load(SeqCst);
    if !apic::bit(&apic::tmr(), v) {
        note!("entry {} of level vector {:#x}: TMR bit not set", n, v);
    }
    if !remote_irr(pin) {
        note!(
            "entry {} of level vector {:#x}: remote IRR clear while in service",
            n,
            v
        );
    }
    if n >= L_LOWER_AT.load(SeqCst) {
        ioapic::set_line(pin, false);
    }
    apic::eoi();
}

fn setup_level(pin: u32, lower_at: u32) {
    L_PIN.store(pin, SeqCst);
    L_LOWER_AT.store(lower_at, SeqCst);
    L_ENTRIES.store(0, SeqCst);
}

// --- scenarios -------------------------------------------------------------------

pub fn edge() -> Res {
    check_ioapic()?;
    const V: u8 = 0x68;
    let bsp = percpu::bsp();
    idt::set_handler(V, edge_handler);
    let rte = ioapic::rte(V, false, false, apic::id());
    ioapic::write_rte(EDGE_LINE, rte);
    let back = ioapic::read_rte(EDGE_LINE);
    ensure!(
        back & 0xFF00_0000_0001_AFFF == rte,
        "RTE reads {:#x} after writing {:#x}",
        back,
        rte
    );
    deliver(V, only(bsp), "edge pulse", || pulse(EDGE_LINE))?;
    deliver(V, only(bsp), "second edge pulse", || pulse(EDGE_LINE))?;
    deliver(V, only(bsp), "line raised and held", || {
        ioapic::set_line(EDGE_LINE, true);
        ok()
    })?;
    deliver(
        V,
        |_| Some(0),
        "line lowered",
        || {
            ioapic::set_line(EDGE_LINE, false);
            ok()
        },
    )?;
    Ok(())
}

pub fn level() -> Res {
    check_ioapic()?;
    const V: u8 = 0x69;
    let bsp = percpu::bsp();
    setup_level(LEVEL_LINE, 1);
    idt::set_handler(V, level_handler);
    ioapic::write_rte(LEVEL_LINE, ioapic::rte(V, true, false, apic::id()));
    ensure!(
        ioapic::read_rte(LEVEL_LINE) & RTE_LEVEL != 0,
        "trigger-mode bit does not stick"
    );
    deliver(V, only(bsp), "level interrupt", || {
        ioapic::set_line(LEVEL_LINE, true);
        ok()
    })?;
    ensure!(
        time::wait_until(time::timeout(), || !remote_irr(LEVEL_LINE)),
        "remote IRR still set after the EOI: RTE {:#x}",
        ioapic::read_rte(LEVEL_LINE)
    );
    ensure!(!apic::isr_bit(V), "vector {:#x} still in service", V);
    Ok(())
}

pub fn level_retrigger() -> Res {
    check_ioapic()?;
    const V: u8 = 0x6A;
    let bsp = percpu::bsp();
    // First entry EOIs with the line still high; the second lowers it.
    setup_level(LEVEL_LINE, 2);
    idt::set_handler(V, level_handler);
    ioapic::write_rte(LEVEL_LINE, ioapic::rte(V, true, false, apic::id()));
    deliver(
        V,
        |c| Some(if c == bsp { 2 } else { 0 }),
        "level line still high at EOI",
        || {
            ioapic::set_line(LEVEL_LINE, true);
            ok()
        },
    )?;
    ensure!(
        time::wait_until(time::timeout(), || !remote_irr(LEVEL_LINE)),
        "remote IRR still set at the end: RTE {:#x}",
        ioapic::read_rte(LEVEL_LINE)
    );
    Ok(())
}

pub fn mask() -> Res {
    check_ioapic()?;
    const VL: u8 = 0x6B;
    const VE: u8 = 0x6C;
    let bsp = percpu::bsp();

    // Level: raised while masked -> held, delivered on unmask.
    setup_level(LEVEL_LINE, 1);
    idt::set_handler(VL, level_handler);
    ioapic::write_rte(LEVEL_LINE, ioapic::rte(VL, true, true, apic::id()));
    let before = counts(VL);
    ioapic::set_line(LEVEL_LINE, true);
    time::settle(time::settle_time());
    ensure!(counts(VL)[bsp] == before[bsp], "masked level pin delivered");
    ensure!(!remote_irr(LEVEL_LINE), "remote IRR set on a masked pin");
    deliver(
        VL,
        only(bsp),
        "level line raised while masked, then unmasked",
        || {
            ioapic::set_masked(LEVEL_LINE, false);
            ok()
        },
    )?;

    // Edge: pulsed while masked -> dropped.
    idt::set_handler(VE, edge_handler);
    ioapic::write_rte(EDGE_LINE, ioapic::rte(VE, false, true, apic::id()));
    deliver(
        VE,
        |_| Some(0),
        "edge pulsed while masked, then unmasked",
        || {
            pulse(EDGE_LINE)?;
            time::settle(time::ms(2));
            ioapic::set_masked(EDGE_LINE, false);
            ok()
        },
    )?;
    deliver(VE, only(bsp), "edge pulsed after unmasking", || {
        pulse(EDGE_LINE)
    })?;
    ensure!(
        ioapic::read_rte(EDGE_LINE) & RTE_MASKED == 0,
        "mask bit set again"
    );
    Ok(())
}

pub fn eoi_register() -> Res {
    check_ioapic()?;
    let ver = ioapic::version();
    if ver < 0x20 {
        skip!("IOAPIC version {:#x} has no EOI register", ver);
    }
    let lver = apic::read(apic::VERSION);
    if lver & apic::VERSION_DIRECTED_EOI == 0 {
        skip!(
            "LAPIC version {:#x} does not offer suppress-EOI-broadcast (bit 24)",
            lver
        );
    }
    const V: u8 = 0x6D;
    let bsp = percpu::bsp();
    apic::write(
        apic::SVR,
        apic::read(apic::SVR) | apic::SVR_SUPPRESS_EOI_BROADCAST,
    );
    ensure!(
        apic::read(apic::SVR) & apic::SVR_SUPPRESS_EOI_BROADCAST != 0,
        "SVR bit 12 does not stick"
    );

    // Handler lowers the line and does a LAPIC EOI (not broadcast).
    setup_level(LEVEL_LINE, 1);
    idt::set_handler(V, level_handler);
    ioapic::write_rte(LEVEL_LINE, ioapic::rte(V, true, false, apic::id()));
    deliver(
        V,
        only(bsp),
        "level interrupt with EOI broadcast suppressed",
        || {
            ioapic::set_line(LEVEL_LINE, true);
            ok()
        },
    )?;
    ensure!(
        remote_irr(LEVEL_LINE),
        "remote IRR cleared by a LAPIC EOI although broadcast is suppressed"
    );

    // Remote IRR blocks a new assertion ...
    let before = counts(V);
    ioapic::set_line(LEVEL_LINE, true);
    time::settle(time::settle_time());
    ensure!(
        counts(V)[bsp] == before[bsp],
        "delivered again while remote IRR was set"
    );

    // ... until the IOAPIC EOI register clears it: the still-high line fires.
    deliver(V, only(bsp), "IOAPIC EOI with the line still high", || {
        ioapic::eoi(V);
        ok()
    })?;
    ensure!(
        remote_irr(LEVEL_LINE),
        "remote IRR not set by the re-delivery"
    );
    ioapic::eoi(V);
    ensure!(
        time::wait_until(time::timeout(), || !remote_irr(LEVEL_LINE)),
        "IOAPIC EOI register did not clear remote IRR: RTE {:#x}",
        ioapic::read_rte(LEVEL_LINE)
    );
    Ok(())
}

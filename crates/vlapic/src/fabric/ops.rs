//! Every fabric operation, written once over [`Backend`]: [`Fabric`](super::Fabric)
//! and [`SharedFabric`](super::SharedFabric) differ only in how they reach an APIC.

use super::core::{check_fabric_import, one_pin, Origin};
use super::seam::{apic_page, in_page, PAGE_OFFSET};
use super::{IoApic, MsiError, Wake};
use crate::ioapic::PinSet;
use crate::lapic::{Effects, Events, GpFault, LapicConfig, LocalApic};
use crate::msi::Msi;
use crate::routing::Message;
use crate::state::{FabricError, FabricState};
use alloc::vec::Vec;

/// How a front end reaches its APICs and IOAPIC. Implementations keep the routing
/// map in step with every mutable APIC access.
pub(super) trait Backend {
    /// Number of vCPUs.
    fn len(&self) -> usize;
    /// Guest-physical base of the IOAPIC page.
    fn ioapic_base(&self) -> u64;
    /// Runs `f` on one APIC (under its lock, if any), then follows a routing change.
    fn apic<R>(&mut self, vcpu: usize, f: impl FnOnce(&mut LocalApic) -> R) -> Option<R>;
    /// Runs `f` on one APIC, read-only.
    fn read<R>(&self, vcpu: usize, f: impl FnOnce(&LocalApic) -> R) -> Option<R>;
    /// Routes one message; returns how many targets accepted it.
    fn route(&mut self, msg: &Message, from: Origin, now: u64, wake: &mut Wake) -> usize;
    /// Runs `f` on the IOAPIC, then routes the pins it returns with the IOAPIC still
    /// held (so remote IRR is set before any EOI for the interrupt is processed).
    fn ioapic<R>(
        &mut self,
        now: u64,
        wake: &mut Wake,
        f: impl FnOnce(&mut IoApic) -> (R, PinSet),
    ) -> R;
    /// Runs `f` on the IOAPIC, read-only.
    fn read_ioapic<R>(&self, f: impl FnOnce(&IoApic) -> R) -> R;
}

/// Routes the [`Effects`] of an access by `vcpu`: the IPI, the EOI broadcast.
fn effects<B: Backend>(b: &mut B, vcpu: usize, fx: Effects, now: u64) -> Wake {
    let mut wake = Wake {
        timer_changed: fx.timer_changed,
        ..Wake::default()
    };
    if let Some(ipi) = fx.ipi {
        b.route(&Message::from(ipi), Origin::vcpu(vcpu), now, &mut wake);
    }
    if let Some(v) = fx.eoi {
        b.ioapic(now, &mut wake, |io| ((), io.eoi(v)));
    }
    wake.normalize();
    wake
}

/// Runs `f` on `vcpu`'s APIC, then routes the effects it returns.
pub(super) fn with_apic<B: Backend, R>(
    b: &mut B,
    vcpu: usize,
    now: u64,
    f: impl FnOnce(&mut LocalApic) -> (R, Effects),
) -> Option<(R, Wake)> {
    let (r, fx) = b.apic(vcpu, f)?;
    Some((r, effects(b, vcpu, fx, now)))
}

/// Routes a message no APIC sent.
pub(super) fn send<B: Backend>(b: &mut B, msg: &Message, now: u64) -> Wake {
    let mut wake = Wake::default();
    b.route(msg, Origin::host(), now, &mut wake);
    wake.normalize();
    wake
}

/// A read of `vcpu`'s xAPIC page; all ones if the vCPU does not exist.
pub(super) fn lapic_mmio_read<B: Backend>(
    b: &mut B,
    vcpu: usize,
    offset: u64,
    data: &mut [u8],
    now: u64,
) {
    if b.apic(vcpu, |a| a.mmio_read(offset, data, now)).is_none() {
        data.fill(0xFF);
    }
}

/// A write to `vcpu`'s xAPIC page.
pub(super) fn lapic_mmio_write<B: Backend>(
    b: &mut B,
    vcpu: usize,
    offset: u64,
    data: &[u8],
    now: u64,
) -> Wake {
    with_apic(b, vcpu, now, |a| ((), a.mmio_write(offset, data, now)))
        .map(|(_, w)| w)
        .unwrap_or_default()
}

/// RDMSR on `vcpu`; #GP if the vCPU does not exist.
pub(super) fn lapic_msr_read<B: Backend>(
    b: &mut B,
    vcpu: usize,
    msr: u32,
    now: u64,
) -> Result<u64, GpFault> {
    b.apic(vcpu, |a| a.read_msr(msr, now))
        .unwrap_or(Err(GpFault))
}

/// WRMSR on `vcpu`; #GP if the vCPU does not exist.
pub(super) fn lapic_msr_write<B: Backend>(
    b: &mut B,
    vcpu: usize,
    msr: u32,
    value: u64,
    now: u64,
) -> Result<Wake, GpFault> {
    let (res, wake) = with_apic(b, vcpu, now, |a| match a.write_msr(msr, value, now) {
        Ok(fx) => (Ok(()), fx),
        Err(e) => (Err(e), Effects::default()),
    })
    .ok_or(GpFault)?;
    res.map(|()| wake)
}

/// Drives LINT0/LINT1 of `vcpu`.
pub(super) fn set_lint<B: Backend>(b: &mut B, vcpu: usize, pin: u8, level: bool, now: u64) -> Wake {
    let mut wake = Wake::default();
    if b.apic(vcpu, |a| a.set_lint(pin, level, now) && a.needs_kick()) == Some(true) {
        wake.push(vcpu);
    }
    wake
}

/// Runs `f` on the IOAPIC and routes the pins it returns.
fn ioapic_op<B: Backend>(b: &mut B, now: u64, f: impl FnOnce(&mut IoApic) -> PinSet) -> Wake {
    let mut wake = Wake::default();
    b.ioapic(now, &mut wake, |io| ((), f(io)));
    wake.normalize();
    wake
}

/// A read of the IOAPIC page.
pub(super) fn ioapic_mmio_read<B: Backend>(b: &mut B, offset: u64, data: &mut [u8], now: u64) {
    let mut wake = Wake::default();
    b.ioapic(now, &mut wake, |io| {
        (io.mmio_read(offset, data), PinSet::EMPTY)
    });
}

/// A write to the IOAPIC page.
pub(super) fn ioapic_mmio_write<B: Backend>(b: &mut B, offset: u64, data: &[u8], now: u64) -> Wake {
    ioapic_op(b, now, |io| io.mmio_write(offset, data))
}

/// Drives IOAPIC pin `pin` to `level`.
pub(super) fn set_irq_line<B: Backend>(b: &mut B, pin: u32, level: bool, now: u64) -> Wake {
    ioapic_op(b, now, |io| one_pin(io.set_line(pin, level)))
}

/// Fires every asserted, unmasked level pin not in service.
pub(super) fn ioapic_service<B: Backend>(b: &mut B, now: u64) -> Wake {
    ioapic_op(b, now, |io| io.pending())
}

/// An MSI write.
pub(super) fn msi<B: Backend>(
    b: &mut B,
    address: u64,
    data: u32,
    now: u64,
) -> Result<Wake, MsiError> {
    let msi = Msi::decode(address, data)?;
    let mut wake = Wake::default();
    if let Some(m) = msi.message() {
        b.route(&m, Origin::msi(), now, &mut wake);
    }
    wake.normalize();
    Ok(wake)
}

/// Takes `vcpu`'s pending non-vectored events.
pub(super) fn take_events<B: Backend>(b: &mut B, vcpu: usize) -> Option<Events> {
    b.apic(vcpu, |a| a.take_events())
}

/// The architectural state of every APIC, then the IOAPIC.
pub(super) fn export<B: Backend>(b: &B) -> FabricState {
    let apics = (0..b.len())
        .filter_map(|i| b.read(i, LocalApic::export))
        .collect();
    FabricState {
        apics,
        ioapic: b.read_ioapic(IoApic::export),
    }
}

/// Validates `state`, then installs it; on error nothing changes.
pub(super) fn import<B: Backend>(
    b: &mut B,
    state: &FabricState,
    now: u64,
) -> Result<Wake, FabricError> {
    let cfgs: Vec<LapicConfig> = (0..b.len())
        .filter_map(|i| b.read(i, |a| *a.config()))
        .collect();
    b.read_ioapic(|io| check_fabric_import(state, &cfgs, io))?;
    // Every field is named (no `..`): a new one does not compile until installed.
    let FabricState { apics, ioapic } = state;
    for (i, s) in apics.iter().enumerate() {
        if let Some(Err(error)) = b.apic(i, |a| a.import(s, now)) {
            return Err(FabricError::Apic { index: i, error });
        }
    }
    // Installed as it was, with no delivery: an asserted, unmasked level pin whose
    // remote IRR is clear is one whose last delivery no APIC accepted (every other way
    // into that condition fires the pin at once). The source would fire it again only
    // at its next trigger (an EOI for its vector, a write to its entry, a line change),
    // so the destination waits for the same trigger: export → import → export is the
    // identity, and the VM behaves the same on either side of a migration.
    let mut wake = Wake::default();
    b.ioapic(now, &mut wake, |io| (io.import(ioapic), PinSet::EMPTY))
        .map_err(FabricError::IoApic)?;
    for i in 0..b.len() {
        if b.apic(i, |a| a.needs_kick()) == Some(true) {
            wake.push(i);
        }
    }
    wake.normalize();
    Ok(wake)
}

/// A read at guest-physical `gpa` by `vcpu`: its APIC page, else the IOAPIC page.
pub(super) fn mmio_read<B: Backend>(
    b: &mut B,
    vcpu: usize,
    gpa: u64,
    data: &mut [u8],
    now: u64,
) -> bool {
    let offset = gpa & PAGE_OFFSET;
    let apic = b.apic(vcpu, |a| {
        let ours = in_page(gpa, apic_page(a));
        if ours {
            a.mmio_read(offset, data, now);
        }
        ours
    });
    if apic == Some(true) {
        return true;
    }
    if in_page(gpa, b.ioapic_base()) {
        ioapic_mmio_read(b, offset, data, now);
        return true;
    }
    false
}

/// A write at guest-physical `gpa` by `vcpu`, dispatched as [`mmio_read`] does.
pub(super) fn mmio_write<B: Backend>(
    b: &mut B,
    vcpu: usize,
    gpa: u64,
    data: &[u8],
    now: u64,
) -> Option<Wake> {
    let offset = gpa & PAGE_OFFSET;
    let apic = with_apic(b, vcpu, now, |a| {
        if in_page(gpa, apic_page(a)) {
            (true, a.mmio_write(offset, data, now))
        } else {
            (false, Effects::default())
        }
    });
    if let Some((true, wake)) = apic {
        return Some(wake);
    }
    in_page(gpa, b.ioapic_base()).then(|| ioapic_mmio_write(b, offset, data, now))
}

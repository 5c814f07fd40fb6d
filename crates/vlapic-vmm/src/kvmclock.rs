//! kvmclock (KVM's paravirtual clock, Linux's clocksource) across migrations: the VM's
//! clock carried with KVM_GET/SET_CLOCK, or recovered from the guest's own pvclock page.

use kvm_ioctls::VmFd;

use crate::memory::GuestRam;

/// MSR_KVM_SYSTEM_TIME_NEW: guest-physical address of the vCPU's pvclock page, bit 0 on.
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;

/// Carries the VM clock from `from` to `to` (both paused), so guest time neither jumps
/// back nor stops.
pub fn carry(from: &VmFd, to: &VmFd) -> Result<(), String> {
    let c = from
        .get_clock()
        .map_err(|e| format!("KVM_GET_CLOCK: {e}"))?;
    set(to, c.clock)
}

/// Sets a VM's kvmclock to `ns` (`KVM_SET_CLOCK`).
pub fn set(vm: &VmFd, ns: u64) -> Result<(), String> {
    let d = kvm_bindings::kvm_clock_data {
        clock: ns,
        ..Default::default()
    };
    vm.set_clock(&d).map_err(|e| format!("KVM_SET_CLOCK: {e}"))
}

/// The kvmclock reading a guest would have made at guest TSC `tsc`, from its pvclock
/// page (`struct pvclock_vcpu_time_info`: version, tsc_timestamp at 8, system_time at
/// 16, tsc_to_system_mul at 24, tsc_shift at 28) at `system_time_msr & !1`. `None`
/// when kvmclock is off (bit 0 clear) or the page is not in RAM.
pub fn guest_reading(ram: &GuestRam, system_time_msr: u64, tsc: u64) -> Option<u64> {
    if system_time_msr & 1 == 0 {
        return None;
    }
    let mut p = [0u8; 32];
    ram.read(system_time_msr & !1, &mut p).ok()?;
    let u64_at =
        |o: usize| -> Option<u64> { Some(u64::from_le_bytes(p.get(o..o + 8)?.try_into().ok()?)) };
    let tsc_timestamp = u64_at(8)?;
    let system_time = u64_at(16)?;
    let mul = u32::from_le_bytes(p.get(24..28)?.try_into().ok()?);
    let shift = *p.get(28)? as i8;
    let mut delta = tsc.saturating_sub(tsc_timestamp);
    if shift < 0 {
        delta = delta
            .checked_shr(u32::from(shift.unsigned_abs()))
            .unwrap_or(0);
    } else {
        delta = delta.checked_shl(shift as u32).unwrap_or(0);
    }
    let ns = (u128::from(delta) * u128::from(mul)) >> 32;
    Some(system_time.saturating_add(u64::try_from(ns).unwrap_or(u64::MAX)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Linux's `pvclock_scale_delta` (arch/x86/include/asm/pvclock.h): shift, then
    /// multiply by the 32.32 fixed-point factor. A 2.1 GHz TSC: mul 0x79E7_9E79 with
    /// shift 0 gives 1/2.1 ns per tick.
    #[test]
    fn reading_follows_the_pvclock_formula() {
        let ram = GuestRam::new(4).unwrap();
        let mut page = [0u8; 32];
        page[8..16].copy_from_slice(&1_000_000u64.to_le_bytes()); // tsc_timestamp
        page[16..24].copy_from_slice(&5_000_000_000u64.to_le_bytes()); // system_time
        page[24..28].copy_from_slice(&0x79E7_9E79u32.to_le_bytes());
        ram.write(0x3000, &page).unwrap();
        // 2.1e9 ticks later: one second on.
        let t = guest_reading(&ram, 0x3001, 1_000_000 + 2_100_000_000).unwrap();
        assert!((5_999_999_000..=6_000_001_000).contains(&t), "{t}");
        assert_eq!(guest_reading(&ram, 0x3000, 5), None); // kvmclock off
        assert_eq!(guest_reading(&ram, 0xFFFF_FFF1, 5), None); // outside RAM
                                                               // A negative shift and a TSC before the timestamp (no underflow).
        page[28] = 0xFF;
        ram.write(0x3000, &page).unwrap();
        assert_eq!(guest_reading(&ram, 0x3001, 0), Some(5_000_000_000));
    }
}

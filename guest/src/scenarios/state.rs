//! APIC state scenarios: SMP bring-up, xAPIC -> x2APIC switch (and the
//! illegal transitions that must #GP), software disable via SVR, and the
//! error status register.

use core::sync::atomic::{AtomicU32, Ordering::*};

use super::{cpus_expected, deliver, on_cpu, only, remote_ipi};
use crate::apic::{self, APIC_BASE_EN, APIC_BASE_EXTD, LVT_MASKED};
use crate::idt::{self, Frame};
use crate::percpu::{self, CPUS};
use crate::report::Res;
use crate::{cpu, smp, time};

fn ok() -> Res {
    Ok(())
}

/// All CPUs reported by fw_cfg came online and have the expected APIC IDs.
pub fn smp_boot() -> Res {
    let want = cpus_expected();
    if want <= 1 {
        skip!("1 CPU");
    }
    let n = percpu::online_count();
    if n != want {
        let missing = (0..want)
            .find(|&i| !CPUS[i].online.load(SeqCst))
            .unwrap_or(0);
        fail!(
            "{} of {} CPUs online (first missing: APIC ID {})",
            n,
            want,
            missing
        );
    }
    for ap in percpu::aps() {
        let raw = on_cpu(ap, smp::ap_read_reg, apic::ID as u64)? as u32;
        let x2 = on_cpu(ap, smp::ap_is_x2apic, 0)? != 0;
        let id = if x2 { raw } else { raw >> 24 };
        ensure!(
            id == ap as u32,
            "cpu {}: APIC ID register reads {:#x}",
            ap,
            raw
        );
    }
    Ok(())
}

/// x2APIC ID -> x2APIC logical ID (SDM: cluster = ID[19:4], bit = ID[3:0]).
fn x2apic_ldr(id: u32) -> u32 {
    ((id >> 4) << 16) | (1 << (id & 0xF))
}

pub fn x2apic_switch() -> Res {
    if !cpu::has_x2apic() {
        skip!("CPU lacks x2APIC (CPUID.1:ECX[21]=0)");
    }
    let me = percpu::bsp();
    let gp_before = percpu::this().count(13);

    if !apic::is_x2apic() {
        let xid = apic::read(apic::ID) >> 24;
        let ver = apic::read(apic::VERSION);
        apic::enable_x2apic();
        let base = apic::base_msr();
        ensure!(
            base & (APIC_BASE_EN | APIC_BASE_EXTD) == APIC_BASE_EN | APIC_BASE_EXTD,
            "IA32_APIC_BASE {:#x} after setting EXTD",
            base
        );
        let id = apic::read(apic::ID);
        ensure!(
            id == xid,
            "x2APIC ID {:#x} differs from the xAPIC ID {:#x}",
            id,
            xid
        );
        let v2 = apic::read(apic::VERSION);
        ensure!(
            v2 == ver,
            "version register {:#x} in x2APIC mode, {:#x} in xAPIC mode",
            v2,
            ver
        );
    }
    let id = apic::read(apic::ID);
    if cpu::cpuid(0, 0).0 >= 0xB {
        let cpuid_id = cpu::cpuid(0xB, 0).3;
        ensure!(
            id == cpuid_id,
            "x2APIC ID {:#x} != CPUID.0BH:EDX {:#x}",
            id,
            cpuid_id
        );
    }
    let ldr = apic::read(apic::LDR);
    ensure!(
        ldr == x2apic_ldr(id),
        "LDR {:#x}, expected {:#x} for x2APIC ID {:#x}",
        ldr,
        x2apic_ldr(id),
        id
    );

    // Registers that do not exist / are read-only in x2APIC mode.
    ensure!(
        cpu::rdmsr_safe(0x80E).is_none(),
        "reading DFR (MSR 0x80E) in x2APIC mode did not #GP"
    );
    ensure!(
        !cpu::wrmsr_safe(0x80D, ldr as u64),
        "writing LDR (MSR 0x80D) in x2APIC mode did not #GP"
    );

    // Illegal transitions: x2APIC -> xAPIC, and EN=0/EXTD=1.
    let base = apic::base_msr();
    ensure!(
        !cpu::wrmsr_safe(cpu::MSR_APIC_BASE, base & !APIC_BASE_EXTD),
        "x2APIC -> xAPIC transition (EN=1, EXTD=0) did not #GP"
    );
    ensure!(
        apic::base_msr() == base,
        "IA32_APIC_BASE changed to {:#x} by a rejected write",
        apic::base_msr()
    );
    ensure!(
        !cpu::wrmsr_safe(cpu::MSR_APIC_BASE, (base & !APIC_BASE_EN) | APIC_BASE_EXTD),
        "invalid state EN=0, EXTD=1 accepted"
    );
    ensure!(
        apic::base_msr() == base,
        "IA32_APIC_BASE changed to {:#x} by a rejected write",
        apic::base_msr()
    );
    let gps = percpu::this().count(13) - gp_before;
    ensure!(gps == 4, "{} #GP exceptions taken, expected 4", gps);

    // Still works: a self IPI through the ICR MSR.
    idt::set_handler(0xC1, |_f: &mut Frame| apic::eoi());
    deliver(0xC1, only(me), "self IPI after the switch", || {
        apic::self_ipi(0xC1);
        ok()
    })?;

    // The APs switch too (later x2APIC scenarios rely on it).
    for ap in percpu::aps() {
        let id = match smp::run_on(ap, smp::ap_enable_x2apic, 0) {
            Some(id) => id as u32,
            None => fail!("cpu {} did not answer", ap),
        };
        ensure!(id == ap as u32, "cpu {}: x2APIC ID {:#x}", ap, id);
        let ldr = on_cpu(ap, smp::ap_read_reg, apic::LDR as u64)? as u32;
        ensure!(
            ldr == x2apic_ldr(id),
            "cpu {}: LDR {:#x}, expected {:#x}",
            ap,
            ldr,
            x2apic_ldr(id)
        );
    }
    Ok(())
}

/// SVR bit 8 clear: LVT masks forced on and sticky (SDM 10.4.7.2), a fixed
/// IPI is neither delivered nor latched in IRR (discarded, as KVM does; the
/// platform contract requires this), NMIs still arrive; re-enabling works
/// and the LVTs stay masked until reprogrammed.
pub fn sw_disable() -> Res {
    const V: u8 = 0xC2;
    const TIMER_LVT: u32 = 0x3B; // one-shot, unmasked; initial count stays 0
    let me = percpu::bsp();
    let enabled = apic::SVR_ENABLE | apic::SPURIOUS_VECTOR as u32;
    idt::set_handler(V, |_f: &mut Frame| apic::eoi());

    apic::write(apic::TIMER_ICR, 0);
    apic::write(apic::LVT_TIMER, TIMER_LVT);
    ensure!(
        apic::read(apic::LVT_TIMER) & LVT_MASKED == 0,
        "cannot unmask the LVT timer while enabled"
    );
    ensure!(
        apic::read(apic::LVT_ERROR) & LVT_MASKED == 0,
        "LVT error masked while enabled"
    );

    apic::write(apic::SVR, apic::SPURIOUS_VECTOR as u32);
    let svr = apic::read(apic::SVR);
    let res = (|| -> Res {
        ensure!(
            svr & apic::SVR_ENABLE == 0,
            "SVR reads {:#x} after clearing bit 8",
            svr
        );
        let t = apic::read(apic::LVT_TIMER);
        ensure!(
            t & LVT_MASKED != 0,
            "LVT timer {:#x} not masked after software disable",
            t
        );
        let e = apic::read(apic::LVT_ERROR);
        ensure!(
            e & LVT_MASKED != 0,
            "LVT error {:#x} not masked after software disable",
            e
        );
        apic::write(apic::LVT_TIMER, TIMER_LVT);
        let t = apic::read(apic::LVT_TIMER);
        ensure!(
            t & LVT_MASKED != 0,
            "LVT timer mask cleared ({:#x}) while software-disabled",
            t
        );

        let before = CPUS[me].count(V);
        apic::self_ipi(V);
        time::settle(time::settle_time());
        ensure!(
            CPUS[me].count(V) == before,
            "fixed IPI delivered while software-disabled"
        );
        ensure!(
            !apic::irr_bit(V),
            "fixed IPI accepted into IRR while software-disabled"
        );

        // NMIs are still accepted (sent by an AP, if there is one).
        if let Some(ap) = percpu::aps().next() {
            let nmis = CPUS[me].count(2);
            remote_ipi(ap, apic::id(), apic::DM_NMI)?;
            ensure!(
                time::wait_until(time::timeout(), || CPUS[me].count(2) != nmis),
                "NMI IPI not delivered while software-disabled"
            );
        }
        Ok(())
    })();
    let before = CPUS[me].count(V);
    apic::write(apic::SVR, enabled);
    res?;

    ensure!(
        apic::read(apic::SVR) == enabled,
        "SVR reads {:#x} after re-enabling",
        apic::read(apic::SVR)
    );
    time::settle(time::settle_time());
    ensure!(
        CPUS[me].count(V) == before,
        "IPI sent while disabled was delivered after re-enabling"
    );
    let t = apic::read(apic::LVT_TIMER);
    ensure!(
        t & LVT_MASKED != 0,
        "re-enabling unmasked the LVT timer ({:#x})",
        t
    );
    apic::write(apic::LVT_TIMER, TIMER_LVT);
    let t = apic::read(apic::LVT_TIMER);
    ensure!(
        t & LVT_MASKED == 0,
        "cannot unmask the LVT timer after re-enabling ({:#x})",
        t
    );
    deliver(V, only(me), "self IPI after re-enabling", || {
        apic::self_ipi(V);
        ok()
    })?;
    Ok(())
}

static ILLEGAL_DELIVERED: AtomicU32 = AtomicU32::new(0);

fn illegal_vector_handler(_f: &mut Frame) {
    ILLEGAL_DELIVERED.fetch_add(1, SeqCst);
    apic::eoi();
}

/// Illegal vector (3) in a fixed self IPI: ESR send-illegal-vector (bit 5)
/// after an ESR write (bit 6, receive-illegal-vector, may accompany it),
/// exactly one error interrupt; the next ESR write clears the ESR; with the
/// LVT error masked the ESR still records the error but no interrupt is
/// raised. Whether the illegal vector itself reaches the CPU is model
/// specific (SDM: "if the local APIC does not support ... it does not
/// deliver them"), so it is only reported as an info line.
pub fn esr() -> Res {
    const ILLEGAL: u8 = 3;
    let me = percpu::this();
    ILLEGAL_DELIVERED.store(0, SeqCst);
    idt::set_handler(ILLEGAL, illegal_vector_handler);

    let e0 = apic::read_esr();
    let e0b = apic::read_esr();
    ensure!(
        e0b == 0,
        "ESR not clear at the start ({:#x}, then {:#x})",
        e0,
        e0b
    );

    let err_before = me.count(apic::ERROR_VECTOR);
    apic::send_ipi(0, apic::SH_SELF | apic::DM_FIXED | ILLEGAL as u32);
    time::settle(time::settle_time());
    let esr = apic::read_esr();
    ensure!(
        esr & apic::ESR_SEND_ILLEGAL_VECTOR != 0,
        "ESR {:#x}: send-illegal-vector (bit 5) not set",
        esr
    );
    ensure!(
        esr & !(apic::ESR_SEND_ILLEGAL_VECTOR | apic::ESR_RECV_ILLEGAL_VECTOR) == 0,
        "ESR {:#x}: unexpected error bits",
        esr
    );
    let errs = me.count(apic::ERROR_VECTOR) - err_before;
    ensure!(errs == 1, "error LVT fired {} times, expected once", errs);
    let again = apic::read_esr();
    ensure!(
        again == 0,
        "ESR {:#x} after the next write (expected 0)",
        again
    );

    // Masked LVT error: no interrupt, but the ESR still records.
    apic::write(apic::LVT_ERROR, LVT_MASKED | apic::ERROR_VECTOR as u32);
    let err_before = me.count(apic::ERROR_VECTOR);
    apic::send_ipi(0, apic::SH_SELF | apic::DM_FIXED | ILLEGAL as u32);
    time::settle(time::settle_time());
    let esr = apic::read_esr();
    ensure!(
        esr & apic::ESR_SEND_ILLEGAL_VECTOR != 0,
        "masked LVT error: ESR {:#x}, bit 5 not set",
        esr
    );
    ensure!(
        me.count(apic::ERROR_VECTOR) == err_before,
        "masked LVT error still raised an interrupt"
    );
    let n = ILLEGAL_DELIVERED.load(SeqCst);
    if n != 0 {
        println!(
            "# esr: the illegal vector {} was delivered to the CPU {} times (model specific)",
            ILLEGAL, n
        );
    }
    Ok(())
}

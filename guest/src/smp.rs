//! Application processors: INIT/SIPI start-up and the AP command loop.
//!
//! Start-up (SDM "MP initialization"): for every APIC ID `0..n` other than
//! the BSP's, send INIT (level assert), wait ~10 ms, SIPI, wait ~200 us,
//! second SIPI; the trampoline lives at `boot::TRAMPOLINE_ADDR`. The guest
//! assumes APIC IDs `0..n-1` (n from fw_cfg), like QEMU assigns them.
//!
//! Command loop: each AP sleeps in `cli; check mailbox; sti; hlt` (race
//! free: STI's interrupt shadow covers the HLT). The BSP posts
//! `(fn, arg)` into the AP's mailbox and sends a fixed IPI with
//! [`apic::WAKE_VECTOR`]; the AP runs the function with IF=0 and
//! acknowledges with the result. Test IPIs sent to an idle AP are handled
//! inside the `hlt` (IF=1) and counted per CPU. No CPU ever spins forever
//! with IF=0, so more vCPUs than host cores is fine.

use core::sync::atomic::Ordering::*;

use crate::cpu::{self};
use crate::percpu::{self, CPUS, MAX_CPUS};
use crate::{apic, boot, time};

/// Function run on an AP by [`run_on`].
pub type ApFn = fn(u64) -> u64;

/// Start the APs with IDs `0..n` (except the BSP) and wait for them.
/// Returns the number of APs that came online.
pub fn boot_aps(n: usize) -> usize {
    let n = n.min(MAX_CPUS);
    let bsp = percpu::bsp();
    if n <= 1 {
        return 0;
    }
    boot::install_trampoline();
    let targets = || (0..n).filter(move |&i| i != bsp);
    for id in targets() {
        apic::send_ipi(id as u32, apic::DM_INIT | apic::LEVEL_ASSERT);
    }
    time::delay(time::ms(10));
    for _ in 0..2 {
        for id in targets() {
            apic::send_ipi(id as u32, apic::DM_STARTUP | boot::SIPI_VECTOR);
        }
        time::delay(time::us(200));
    }
    time::wait_until(time::ms(5000), || {
        targets().all(|i| CPUS[i].online.load(Acquire))
    });
    targets().filter(|&i| CPUS[i].online.load(Acquire)).count()
}

/// 64-bit entry of every AP (called from `boot` on its own stack).
#[no_mangle]
pub extern "C" fn ap_main(apic_id: u32) -> ! {
    let i = apic_id as usize;
    percpu::init_this_cpu(i);
    apic::init_local();
    CPUS[i].online.store(true, Release);
    command_loop(i)
}

fn command_loop(i: usize) -> ! {
    let me = &CPUS[i];
    let mut done = 0u32;
    loop {
        cpu::cli();
        let seq = me.cmd_seq.load(Acquire);
        if seq != done {
            let f = me.cmd_fn.load(Acquire);
            let arg = me.cmd_arg.load(Acquire);
            let f: ApFn = unsafe { core::mem::transmute::<usize, ApFn>(f) };
            let r = f(arg);
            me.cmd_result.store(r, Release);
            me.ack_seq.store(seq, Release);
            done = seq;
            continue;
        }
        cpu::sti_hlt();
    }
}

/// Run `f(arg)` on AP `cpu` and wait for its result (`None` on timeout or
/// if the AP is offline/dead). Must be called from the BSP.
pub fn run_on(cpu: usize, f: ApFn, arg: u64) -> Option<u64> {
    let seq = post(cpu, f, arg)?;
    wait_ack(cpu, seq)
}

/// Start `f(arg)` on AP `cpu` without waiting; the sequence number for
/// [`wait_ack`] (`None` if the AP is offline/dead). Must be called from the BSP.
pub fn post(cpu: usize, f: ApFn, arg: u64) -> Option<u32> {
    let c = &CPUS[cpu];
    if !c.online.load(Acquire) || c.dead.load(Acquire) {
        return None;
    }
    c.cmd_fn.store(f as usize, Release);
    c.cmd_arg.store(arg, Release);
    let seq = c.cmd_seq.load(Acquire).wrapping_add(1);
    c.cmd_seq.store(seq, Release);
    apic::send_ipi(cpu as u32, apic::DM_FIXED | apic::WAKE_VECTOR as u32);
    Some(seq)
}

/// Wait for the command `seq` posted to `cpu` to finish; its result (`None` on
/// timeout: the AP is then marked dead).
pub fn wait_ack(cpu: usize, seq: u32) -> Option<u64> {
    let c = &CPUS[cpu];
    let ok = time::wait_until(time::timeout(), || c.ack_seq.load(Acquire) == seq);
    if ok {
        Some(c.cmd_result.load(Acquire))
    } else {
        c.dead.store(true, Release);
        None
    }
}

// --- small AP-side helpers shared by several scenarios ---------------------

/// AP: send an IPI. arg = dest << 32 | icr_lo.
pub fn ap_send_ipi(arg: u64) -> u64 {
    apic::send_ipi((arg >> 32) as u32, arg as u32);
    0
}

/// AP: write an APIC register. arg = reg << 32 | value.
pub fn ap_write_reg(arg: u64) -> u64 {
    apic::write((arg >> 32) as u32, arg as u32);
    0
}

/// AP: read an APIC register.
pub fn ap_read_reg(arg: u64) -> u64 {
    apic::read(arg as u32) as u64
}

/// AP: any vector in service? Returns the lowest in-service vector + 1, or 0.
pub fn ap_isr_first(_: u64) -> u64 {
    let isr = apic::isr();
    for v in 0..=255u8 {
        if apic::bit(&isr, v) {
            return v as u64 + 1;
        }
    }
    0
}

/// AP: reset the local APIC state (mode unchanged).
pub fn ap_reset(_: u64) -> u64 {
    apic::reset_local();
    0
}

/// AP: switch to x2APIC mode, return the new x2APIC ID.
pub fn ap_enable_x2apic(_: u64) -> u64 {
    apic::enable_x2apic();
    apic::id() as u64
}

/// AP: mode flag (1 = x2APIC).
pub fn ap_is_x2apic(_: u64) -> u64 {
    apic::is_x2apic() as u64
}

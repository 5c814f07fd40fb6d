//! Benchmark mode (`bench` on the command line): median TSC cycles per
//! operation, printed as `BENCH <name> cycles=<median> iters=<n>`.
//!
//! * `self-ipi-xapic`   — ICR self IPI (MMIO) until the handler ran, incl. EOI;
//! * `ipi-roundtrip`    — BSP -> AP fixed IPI, the AP's handler IPIs back;
//! * `tsc-deadline`     — arm IA32_TSC_DEADLINE = now + 1000 until handler entry;
//! * `tpr-write`        — one TPR write (MMIO or MSR), averaged over 16 writes;
//! * `int3-roundtrip`   — `int3` to its handler and `iretq` back (on hosts that
//!   cannot execute it at CPL0, the VMM delivers it);
//! * `self-ipi-x2apic`  — SELF IPI MSR until the handler ran, incl. EOI
//!   (switches the BSP to x2APIC mode, so it runs last).

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering::*};

use crate::idt::{self, Frame};
use crate::report;
use crate::{apic, cpu, percpu, time, BootInfo};

const ITERS: usize = 1000;

static FLAG: AtomicU32 = AtomicU32::new(0);
static ENTRY_TSC: AtomicU64 = AtomicU64::new(0);
static BSP_ID: AtomicU32 = AtomicU32::new(0);

const V_SELF: u8 = 0xD0;
const V_PING: u8 = 0xD1;
const V_PONG: u8 = 0xD2;
const V_DEADLINE: u8 = 0xD3;

fn flag_handler(_f: &mut Frame) {
    ENTRY_TSC.store(cpu::rdtsc(), Relaxed);
    apic::eoi();
    FLAG.fetch_add(1, SeqCst);
}

/// AP side of the ping-pong: answer the BSP, then EOI.
fn ping_handler(_f: &mut Frame) {
    apic::send_ipi(BSP_ID.load(Relaxed), apic::DM_FIXED | V_PONG as u32);
    apic::eoi();
}

fn median(s: &mut [u64]) -> u64 {
    s.sort_unstable();
    s[s.len() / 2]
}

/// Runs `op` ITERS times; each must make FLAG advance (interrupts enabled
/// only while waiting). Returns the samples' median or an error text.
fn measure_irq(name: &str, mut op: impl FnMut() -> u64) {
    let mut s = [0u64; ITERS];
    for (i, slot) in s.iter_mut().enumerate() {
        let target = FLAG.load(SeqCst) + 1;
        let t0 = op();
        let ok = time::wait_irq(time::timeout(), || FLAG.load(SeqCst) >= target);
        let t1 = cpu::rdtsc();
        if !ok {
            report::fail(name, format_args!("no interrupt in iteration {}", i));
            return;
        }
        *slot = t1 - t0;
    }
    report::bench(name, median(&mut s), ITERS);
}

pub fn run(_info: &BootInfo) -> ! {
    cpu::cli();
    idt::set_handler(V_SELF, flag_handler);
    idt::set_handler(V_PONG, flag_handler);
    idt::set_handler(V_DEADLINE, flag_handler);
    idt::set_handler(V_PING, ping_handler);
    BSP_ID.store(apic::id(), Relaxed);

    // self-ipi-xapic
    if apic::is_x2apic() {
        report::skip("self-ipi-xapic", format_args!("APIC is in x2APIC mode"));
    } else {
        measure_irq("self-ipi-xapic", || {
            let t = cpu::rdtsc();
            apic::self_ipi(V_SELF);
            t
        });
    }

    // ipi-roundtrip
    match percpu::aps().next() {
        None => report::skip("ipi-roundtrip", format_args!("needs 2 CPUs")),
        Some(ap) => measure_irq("ipi-roundtrip", || {
            let t = cpu::rdtsc();
            apic::send_ipi(ap as u32, apic::DM_FIXED | V_PING as u32);
            t
        }),
    }

    // tsc-deadline: arm -> handler entry
    if !cpu::has_tsc_deadline() {
        report::skip("tsc-deadline", format_args!("CPU lacks TSC-deadline mode"));
    } else {
        apic::write(
            apic::LVT_TIMER,
            apic::LVT_TIMER_TSC_DEADLINE | V_DEADLINE as u32,
        );
        cpu::mfence();
        let mut s = [0u64; ITERS];
        let mut failed = false;
        for (i, slot) in s.iter_mut().enumerate() {
            let target = FLAG.load(SeqCst) + 1;
            let t0 = cpu::rdtsc();
            unsafe { cpu::wrmsr(cpu::MSR_TSC_DEADLINE, t0 + 1000) };
            if !time::wait_irq(time::timeout(), || FLAG.load(SeqCst) >= target) {
                report::fail(
                    "tsc-deadline",
                    format_args!("no interrupt in iteration {}", i),
                );
                failed = true;
                break;
            }
            *slot = ENTRY_TSC.load(Relaxed) - t0;
        }
        apic::write(apic::LVT_TIMER, apic::LVT_MASKED | 0x30);
        if !failed {
            report::bench("tsc-deadline", median(&mut s), ITERS);
        }
    }

    // tpr-write
    {
        let mut s = [0u64; ITERS];
        for slot in s.iter_mut() {
            let t0 = cpu::rdtsc();
            for k in 0..16u32 {
                apic::write(apic::TPR, (k & 1) << 4);
            }
            *slot = (cpu::rdtsc() - t0) / 16;
        }
        apic::write(apic::TPR, 0);
        report::bench("tpr-write", median(&mut s), ITERS);
    }

    // int3-roundtrip
    {
        let mut s = [0u64; ITERS];
        let m = crate::scenarios::int3_round_trip(&mut s);
        report::bench("int3-roundtrip", m, ITERS);
    }

    // self-ipi-x2apic (last: leaves the BSP in x2APIC mode)
    if !cpu::has_x2apic() {
        report::skip("self-ipi-x2apic", format_args!("CPU lacks x2APIC"));
    } else {
        if !apic::is_x2apic() {
            apic::enable_x2apic();
        }
        measure_irq("self-ipi-x2apic", || {
            let t = cpu::rdtsc();
            apic::write(apic::SELF_IPI, V_SELF as u32);
            t
        });
    }
    report::finish()
}

//! # vlapic test guest
//!
//! A small bare-metal x86-64 kernel that exercises local APIC and IOAPIC
//! behaviour and reports one `PASS`/`FAIL`/`SKIP` line per scenario on COM1,
//! then `DONE passed=.. failed=.. skipped=..` and exits through
//! isa-debug-exit (0 = everything passed). It boots as a multiboot v1 kernel
//! (QEMU `-kernel`, or the vlapic VMM); the platform contract is in
//! `docs/guest-platform.md`.
//!
//! Module map (one concept each):
//! * [`boot`] — multiboot header, 32-bit entry, page tables, long mode, AP
//!   trampoline (assembly);
//! * [`cpu`] — port I/O, MSRs (incl. #GP-safe variants), CPUID, TSC, IF;
//! * [`percpu`] — per-CPU records (GS base), TSS/IST stacks;
//! * [`idt`] — IDT, entry stubs, dispatcher, handler registry;
//! * [`apic`] — xAPIC/x2APIC access layer; [`ioapic`] — IOAPIC + test lines;
//! * [`smp`] — AP start-up and the AP command mailbox;
//! * [`time`] — TSC waits and APIC timer calibration;
//! * [`serial`], [`report`], [`platform`] — console, result lines, fw_cfg /
//!   exit / command line;
//! * [`scenarios`] — the test scenarios; [`bench`] — the benchmark mode.
//!
//! ## Rules for interrupts, the red zone and SSE
//!
//! * **No SSE in the image.** The crate is built with
//!   `-C target-feature=-sse,-sse2` and fat LTO, so `core` is re-codegened
//!   without SSE as well; `scripts/build-guest.sh` rejects an image that
//!   contains any XMM/YMM instruction. Reason: on hosts whose `/dev/kvm` is
//!   PVM (no hardware virtualisation, e.g. the project's CI machines) KVM runs
//!   a non-PVM guest entirely in its instruction emulator, which cannot
//!   execute SSE arithmetic (`xorps` ends the VM with a KVM internal error).
//!   rustc warns that `-sse2` is being phased out on this target; expected.
//! * SSE is nevertheless enabled in the boot code (CR0.EM=0, CR0.MP=1,
//!   CR4.OSFXSR|OSXMMEXCPT) and every interrupt entry saves/restores the
//!   x87/SSE state with `fxsave64`/`fxrstor64` (never `xsave`/`xrstor`), so
//!   a build with SSE (e.g. a plain `cargo build`) stays correct on QEMU.
//! * **Red zone.** Every vector is delivered on an IST stack and the entry
//!   stub moves the frame below the interrupted code's red zone before
//!   running anything (see [`idt`]). An interrupt therefore never clobbers a
//!   red zone and any code — including precompiled `core` functions — may
//!   run with IF=1. The guest's own code is also built with
//!   `-C no-redzone=yes` as a second line of defence.
//! * Printing takes a spinlock with IF=0; interrupt handlers never print
//!   (they record failures with `note!`), except on the fatal path.
//! * Main-line code on the BSP runs with IF=0 and enables interrupts only
//!   inside bounded wait loops (`time::wait_irq`, `time::settle`); delivery
//!   is never assumed to happen right at STI. APs idle in `sti; hlt`.
//!
//! Instructions that are never used (they end the VM on the emulating KVM
//! hosts): `int3`, `lock cmpxchg16b`, `xsave`/`xrstor`, `vmmcall`, and any
//! SSE arithmetic.

#![no_std]
#![no_main]
// Scenario results carry a small inline message buffer (no allocator).
#![allow(clippy::result_large_err)]

#[macro_use]
mod serial;
#[macro_use]
mod report;
mod apic;
mod bench;
mod boot;
mod cpu;
mod idt;
mod ioapic;
mod mem;
mod percpu;
mod platform;
mod scenarios;
mod smp;
mod time;

use core::sync::atomic::Ordering::*;

/// Boot information shared with the scenarios.
pub struct BootInfo {
    /// CPUs reported by fw_cfg (1 without fw_cfg).
    pub cpus_expected: usize,
    /// APs that came online.
    pub aps_online: usize,
}

/// 64-bit entry of the BSP (called from `boot` on the BSP stack).
#[no_mangle]
pub extern "C" fn bsp_main(magic: u32, info: u32) -> ! {
    let me = cpu::initial_apic_id() as usize;
    percpu::BSP_INDEX.store(me as u32, SeqCst);
    idt::init();
    percpu::init_this_cpu(me);
    serial::init();
    platform::capture_cmdline(magic, info);
    platform::mask_pic();

    // Start on a fresh line (firmware may have left a partial one).
    println!("");
    println!("# vlapic-test-guest {}", env!("CARGO_PKG_VERSION"));
    if magic != platform::MULTIBOOT_MAGIC {
        println!(
            "# warning: multiboot magic {:#x} (expected {:#x})",
            magic,
            platform::MULTIBOOT_MAGIC
        );
    }
    println!("# cmdline: \"{}\"", platform::cmdline());

    apic::init_local();
    let tsc_src = time::init_tsc_estimate();
    let ticks = time::calibrate_apic_timer();
    ioapic::mask_all();

    let (_, _, ecx1, _) = cpu::cpuid(1, 0);
    println!(
        "# bsp apic id {} mode {} version {:#x} x2apic-cpuid={} tsc-deadline-cpuid={} hypervisor={}",
        me,
        if apic::is_x2apic() { "x2apic" } else { "xapic" },
        apic::read(apic::VERSION),
        (ecx1 >> 21) & 1,
        (ecx1 >> 24) & 1,
        (ecx1 >> 31) & 1
    );
    println!(
        "# tsc ~{} MHz ({}), apic timer: {} ticks in 30 ms, {}.{:03} tsc cycles/tick",
        time::tsc_khz() / 1000,
        tsc_src,
        ticks,
        time::tsc_per_tick_q16() >> 16,
        ((time::tsc_per_tick_q16() & 0xFFFF) * 1000) >> 16
    );
    println!(
        "# ioapic version {:#x}, {} pins",
        ioapic::version(),
        ioapic::max_entry() + 1
    );

    let cpus = match platform::fw_cfg_cpu_count() {
        Some(n) => n as usize,
        None => {
            println!("# no fw_cfg: assuming 1 CPU");
            1
        }
    };
    if cpus > percpu::MAX_CPUS {
        println!(
            "# {} CPUs reported, only {} supported",
            cpus,
            percpu::MAX_CPUS
        );
    }
    percpu::CPUS[me].online.store(true, Release);
    let aps = smp::boot_aps(cpus);
    println!("# cpus: {} expected, {} APs online", cpus, aps);

    let info = BootInfo {
        cpus_expected: cpus.min(percpu::MAX_CPUS),
        aps_online: aps,
    };
    match platform::selection() {
        platform::Selection::Bench => bench::run(&info),
        sel => scenarios::run(&info, sel),
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    match info.location() {
        Some(l) => report::fatal(format_args!(
            "panic at {}:{}: {}",
            l.file(),
            l.line(),
            info.message()
        )),
        None => report::fatal(format_args!("panic: {}", info.message())),
    }
}

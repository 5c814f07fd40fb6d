//! IPI scenarios: self IPIs (xAPIC ICR, x2APIC SELF IPI MSR), fixed IPIs
//! between CPUs, shorthands, physical broadcast, logical flat/cluster
//! destinations (xAPIC and x2APIC), lowest priority and NMI.
//!
//! Delivery is checked by per-CPU, per-vector counters: every online CPU
//! must see *exactly* the expected number of deliveries after a settle time.

use super::{counts, deliver, expect_delivery, on_cpu, only, remote_ipi};
use crate::apic::{self, DEST_LOGICAL, DM_FIXED, DM_LOWEST, DM_NMI, SH_ALL, SH_OTHERS, SH_SELF};
use crate::idt::{self, Frame};
use crate::percpu::{self, MAX_CPUS};
use crate::report::Res;
use crate::{cpu, smp, time};

/// Checks the vector is in service, then EOIs.
fn in_service_handler(f: &mut Frame) {
    let v = f.vector();
    if !apic::isr_bit(v) {
        note!(
            "vector {:#x} dispatched but not in ISR on cpu {}",
            v,
            percpu::index()
        );
    }
    apic::eoi();
}

fn ok() -> Res {
    Ok(())
}

// ---------------------------------------------------------------------------

pub fn self_ipi_xapic() -> Res {
    let me = percpu::bsp();
    idt::set_handler(0x54, in_service_handler);
    idt::set_handler(0x55, in_service_handler);
    ensure!(
        apic::id() == cpu::initial_apic_id(),
        "APIC ID {:#x} != CPUID initial APIC ID {:#x}",
        apic::id(),
        cpu::initial_apic_id()
    );
    deliver(0x54, only(me), "ICR self shorthand", || {
        apic::self_ipi(0x54);
        ok()
    })?;
    let icr = apic::read(apic::ICR_LO);
    ensure!(
        icr & apic::DELIVERY_PENDING == 0,
        "ICR delivery status still pending: {:#x}",
        icr
    );
    ensure!(
        icr & 0x000C_CFFF == SH_SELF | 0x54,
        "ICR low reads {:#x}, expected {:#x} (vector/mode/shorthand)",
        icr,
        SH_SELF | 0x54
    );
    deliver(0x55, only(me), "physical destination = own ID", || {
        apic::send_ipi(apic::id(), DM_FIXED | 0x55);
        ok()
    })?;
    ensure!(
        apic::read(apic::ICR_HI) >> 24 == apic::id(),
        "ICR high reads {:#x}",
        apic::read(apic::ICR_HI)
    );
    Ok(())
}

pub fn self_ipi_x2apic() -> Res {
    let me = percpu::bsp();
    for v in [0x56, 0x57, 0x58] {
        idt::set_handler(v, in_service_handler);
    }
    deliver(0x56, only(me), "SELF IPI MSR 0x83F", || {
        apic::write(apic::SELF_IPI, 0x56);
        ok()
    })?;
    deliver(0x57, only(me), "ICR self shorthand", || {
        apic::self_ipi(0x57);
        ok()
    })?;
    deliver(
        0x58,
        only(me),
        "ICR physical destination = own x2APIC ID",
        || {
            apic::send_ipi(apic::id(), DM_FIXED | 0x58);
            ok()
        },
    )?;
    ensure!(
        cpu::rdmsr_safe(0x83F).is_none(),
        "reading the write-only SELF IPI MSR 0x83F did not #GP"
    );
    Ok(())
}

pub fn ipi_fixed() -> Res {
    let bsp = percpu::bsp();
    let bsp_id = apic::id();
    for ap in percpu::aps() {
        deliver(0x5A, only(ap), "BSP -> AP fixed IPI", || {
            apic::send_ipi(ap as u32, DM_FIXED | 0x5A);
            ok()
        })?;
        deliver(0x5B, only(bsp), "AP -> BSP fixed IPI", || {
            remote_ipi(ap, bsp_id, DM_FIXED | 0x5B)
        })?;
    }
    // A physical destination nobody has: no delivery.
    deliver(
        0x5C,
        |_| Some(0),
        "IPI to absent APIC ID 0x70",
        || {
            apic::send_ipi(0x70, DM_FIXED | 0x5C);
            ok()
        },
    )?;
    Ok(())
}

pub fn ipi_broadcast() -> Res {
    let all = |_| Some(1);
    let bcast = apic::broadcast_dest();
    deliver(
        0x5D,
        all,
        "all-including-self shorthand from the BSP",
        || {
            apic::send_ipi(0, SH_ALL | DM_FIXED | 0x5D);
            ok()
        },
    )?;
    deliver(
        0x5E,
        all,
        "physical broadcast destination from the BSP",
        || {
            apic::send_ipi(bcast, DM_FIXED | 0x5E);
            ok()
        },
    )?;
    if let Some(ap) = percpu::aps().last() {
        deliver(0x5D, all, "all-including-self shorthand from an AP", || {
            remote_ipi(ap, 0, SH_ALL | 0x5D)
        })?;
        deliver(
            0x5E,
            all,
            "physical broadcast destination from an AP",
            || remote_ipi(ap, bcast, 0x5E),
        )?;
    }
    Ok(())
}

pub fn ipi_all_but_self() -> Res {
    let bsp = percpu::bsp();
    deliver(
        0x5F,
        |c| Some((c != bsp) as u32),
        "all-excluding-self from the BSP",
        || {
            apic::send_ipi(0, SH_OTHERS | DM_FIXED | 0x5F);
            ok()
        },
    )?;
    if let Some(ap) = percpu::aps().next() {
        deliver(
            0x5F,
            |c| Some((c != ap) as u32),
            "all-excluding-self from an AP",
            || remote_ipi(ap, 0, SH_OTHERS | 0x5F),
        )?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Logical destinations
// ---------------------------------------------------------------------------

/// Online CPUs in index order and their count.
fn cpu_list() -> ([usize; MAX_CPUS], usize) {
    let mut l = [0usize; MAX_CPUS];
    let mut n = 0;
    for c in percpu::online() {
        l[n] = c;
        n += 1;
    }
    (l, n)
}

/// Position of `cpu` in the online list.
fn pos(cpu: usize) -> usize {
    percpu::online().position(|c| c == cpu).unwrap_or(MAX_CPUS)
}

/// Program DFR and LDR (xAPIC) on every online CPU; `ldr(k)` for the k-th.
fn program_logical(dfr: u32, ldr: impl Fn(usize) -> u32) -> Res {
    let (l, n) = cpu_list();
    for (k, &c) in l[..n].iter().enumerate() {
        on_cpu(
            c,
            smp::ap_write_reg,
            ((apic::DFR as u64) << 32) | dfr as u64,
        )?;
        on_cpu(
            c,
            smp::ap_write_reg,
            ((apic::LDR as u64) << 32) | ldr(k) as u64,
        )?;
        let d = on_cpu(c, smp::ap_read_reg, apic::DFR as u64)? as u32;
        let r = on_cpu(c, smp::ap_read_reg, apic::LDR as u64)? as u32;
        ensure!(
            d == dfr,
            "cpu {}: DFR reads {:#x} after writing {:#x}",
            c,
            d,
            dfr
        );
        ensure!(
            r == ldr(k),
            "cpu {}: LDR reads {:#x} after writing {:#x}",
            c,
            r,
            ldr(k)
        );
    }
    Ok(())
}

fn flat_ldr(k: usize) -> u32 {
    if k < 8 {
        1 << (24 + k)
    } else {
        0
    }
}

pub fn logical_flat() -> Res {
    program_logical(apic::DFR_FLAT, flat_ldr)?;
    let (l, n) = cpu_list();
    for v in 0xB0..=0xB2 {
        idt::set_handler(v, in_service_handler);
    }
    for (k, &target) in l[..n.min(8)].iter().enumerate() {
        deliver(
            0xB0,
            only(target),
            "logical flat, single-bit destination",
            || {
                apic::send_ipi(1 << k, DEST_LOGICAL | DM_FIXED | 0xB0);
                ok()
            },
        )?;
    }
    let mask = 0x55u32;
    deliver(
        0xB1,
        |c| Some((pos(c) < 8 && mask & (1 << pos(c)) != 0) as u32),
        "logical flat, mask 0x55",
        || {
            apic::send_ipi(mask, DEST_LOGICAL | DM_FIXED | 0xB1);
            ok()
        },
    )?;
    // 0xFF: every CPU with an LDR bit (CPUs beyond the 8th have LDR 0: whether
    // they get a logical broadcast is not pinned down, so they are not checked).
    deliver(
        0xB2,
        |c| if pos(c) < 8 { Some(1) } else { None },
        "logical flat broadcast 0xFF",
        || {
            apic::send_ipi(0xFF, DEST_LOGICAL | DM_FIXED | 0xB2);
            ok()
        },
    )?;
    Ok(())
}

/// Cluster model: CPU k is member (k % 4) of cluster k / 4 (15 clusters).
fn cluster_addr(k: usize) -> u32 {
    if k < 60 {
        (((k / 4) << 4) | (1 << (k % 4))) as u32
    } else {
        0
    }
}

pub fn logical_cluster() -> Res {
    program_logical(apic::DFR_CLUSTER, |k| cluster_addr(k) << 24)?;
    let (l, n) = cpu_list();
    for v in 0xB3..=0xB5 {
        idt::set_handler(v, in_service_handler);
    }
    for (k, &target) in l[..n.min(60)].iter().enumerate() {
        let dest = cluster_addr(k);
        deliver(0xB3, only(target), "logical cluster, single member", || {
            apic::send_ipi(dest, DEST_LOGICAL | DM_FIXED | 0xB3);
            ok()
        })?;
    }
    deliver(
        0xB4,
        |c| Some((pos(c) < 4) as u32),
        "logical cluster 0, all members (0x0F)",
        || {
            apic::send_ipi(0x0F, DEST_LOGICAL | DM_FIXED | 0xB4);
            ok()
        },
    )?;
    deliver(
        0xB4,
        |c| Some((pos(c) < 4 && pos(c).is_multiple_of(2)) as u32),
        "logical cluster 0, members 0b0101",
        || {
            apic::send_ipi(0x05, DEST_LOGICAL | DM_FIXED | 0xB4);
            ok()
        },
    )?;
    if n > 4 {
        deliver(
            0xB5,
            |c| Some((4..8).contains(&pos(c)) as u32),
            "logical cluster 1, all members (0x1F)",
            || {
                apic::send_ipi(0x1F, DEST_LOGICAL | DM_FIXED | 0xB5);
                ok()
            },
        )?;
    }
    Ok(())
}

pub fn logical_cluster_broadcast() -> Res {
    program_logical(apic::DFR_CLUSTER, |k| cluster_addr(k) << 24)?;
    idt::set_handler(0xB6, in_service_handler);
    deliver(
        0xB6,
        |c| if pos(c) < 60 { Some(1) } else { None },
        "logical cluster broadcast 0xFF",
        || {
            apic::send_ipi(0xFF, DEST_LOGICAL | DM_FIXED | 0xB6);
            ok()
        },
    )
}

/// x2APIC logical (cluster) mode: LDR is derived from the x2APIC ID and
/// read-only; destinations are cluster << 16 | member bitmap.
pub fn logical_cluster_x2apic() -> Res {
    let x2ldr = |id: u32| ((id >> 4) << 16) | (1 << (id & 0xF));
    for c in percpu::online() {
        let id = on_cpu(c, smp::ap_read_reg, apic::ID as u64)? as u32;
        let ldr = on_cpu(c, smp::ap_read_reg, apic::LDR as u64)? as u32;
        ensure!(
            ldr == x2ldr(id),
            "cpu {}: x2APIC LDR {:#x}, expected {:#x} for ID {:#x}",
            c,
            ldr,
            x2ldr(id),
            id
        );
    }
    ensure!(
        !cpu::wrmsr_safe(0x80D, 0),
        "writing the x2APIC LDR (MSR 0x80D) did not #GP"
    );
    for v in 0xB7..=0xB9 {
        idt::set_handler(v, in_service_handler);
    }
    for c in percpu::online() {
        let dest = x2ldr(c as u32);
        deliver(0xB7, only(c), "x2APIC logical, single member", || {
            apic::send_ipi(dest, DEST_LOGICAL | DM_FIXED | 0xB7);
            ok()
        })?;
    }
    deliver(
        0xB8,
        |c| Some((c < 16) as u32),
        "x2APIC logical cluster 0, all members",
        || {
            apic::send_ipi(0xFFFF, DEST_LOGICAL | DM_FIXED | 0xB8);
            ok()
        },
    )?;
    deliver(
        0xB9,
        |_| Some(1),
        "x2APIC logical broadcast 0xFFFFFFFF",
        || {
            apic::send_ipi(0xFFFF_FFFF, DEST_LOGICAL | DM_FIXED | 0xB9);
            ok()
        },
    )?;
    Ok(())
}

/// Lowest priority to a logical set: exactly one CPU of the set gets each
/// IPI. (Which one is model specific; the SDM does not pin it down.)
pub fn lowest_priority() -> Res {
    program_logical(apic::DFR_FLAT, flat_ldr)?;
    let (l, n) = cpu_list();
    // At most 7 CPUs: with all 8 flat bits the destination would be 0xFF, which the
    // flat model defines as broadcast to every APIC (SDM §11.6.2.2), LDR or not.
    let m = n.min(7);
    const TPRS: [u32; 8] = [0x30, 0x20, 0x10, 0x00, 0x20, 0x10, 0x30, 0x00];
    for k in 0..m {
        on_cpu(
            l[k],
            smp::ap_write_reg,
            ((apic::TPR as u64) << 32) | TPRS[k] as u64,
        )?;
    }
    const V: u8 = 0xE3;
    idt::set_handler(V, in_service_handler);
    let dest = (1u32 << m) - 1;
    for round in 0..4 {
        let before = counts(V);
        apic::send_ipi(dest, DEST_LOGICAL | DM_LOWEST | V as u32);
        let total = || {
            percpu::online()
                .map(|c| crate::percpu::CPUS[c].count(V).wrapping_sub(before[c]))
                .sum::<u32>()
        };
        time::wait_irq(time::timeout(), || total() >= 1);
        time::settle(time::settle_time());
        let t = total();
        ensure!(
            t == 1,
            "round {}: {} CPUs received the lowest-priority IPI (dest {:#x}), expected exactly 1",
            round,
            t,
            dest
        );
        // Nobody outside the destination set.
        for c in percpu::online() {
            if pos(c) >= m {
                ensure!(
                    crate::percpu::CPUS[c].count(V) == before[c],
                    "cpu {} outside the destination got it",
                    c
                );
            }
        }
    }
    Ok(())
}

pub fn ipi_nmi() -> Res {
    for ap in percpu::aps() {
        let before = counts(2);
        apic::send_ipi(ap as u32, DM_NMI);
        expect_delivery(2, &before, only(ap), "NMI IPI")?;
        let first = on_cpu(ap, smp::ap_isr_first, 0)?;
        ensure!(
            first == 0,
            "cpu {}: vector {:#x} in service after an NMI",
            ap,
            first - 1
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// nmi-race (issue 11 point 6; kvm-unit-tests apic "multiple nmi")
// ---------------------------------------------------------------------------

const RACE_VECTOR: u8 = 0x59;
/// The BSP's NMI count when the fixed IPI that followed the NMIs was handled.
static NMIS_AT_FIXED: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(u32::MAX);

fn race_handler(_f: &mut Frame) {
    NMIS_AT_FIXED.store(
        percpu::CPUS[percpu::index()].count(2),
        core::sync::atomic::Ordering::SeqCst,
    );
    apic::eoi();
}

/// AP: two NMIs, then a fixed IPI, to APIC `arg`, back to back.
fn ap_nmi_burst(arg: u64) -> u64 {
    let dest = arg as u32;
    apic::send_ipi(dest, DM_NMI);
    apic::send_ipi(dest, DM_NMI);
    apic::send_ipi(dest, apic::DM_FIXED | u32::from(RACE_VECTOR));
    0
}

/// An AP sends the BSP two NMIs and then a fixed IPI. Neither NMI may be lost (no NMI
/// is in service when they arrive: one is taken, the other latched, SDM Vol. 3A §6.7.1)
/// and the fixed interrupt, sent after them and of lower priority (§6.9), must find
/// both handled.
pub fn nmi_race() -> Res {
    use core::sync::atomic::Ordering::SeqCst;
    const ROUNDS: u32 = 100;
    let bsp = percpu::bsp();
    let Some(ap) = percpu::aps().next() else {
        skip!("needs 2 CPUs");
    };
    idt::set_handler(RACE_VECTOR, race_handler);
    let (mut lost, mut overtaken, mut no_fixed) = (0u32, 0u32, 0u32);
    for _ in 0..ROUNDS {
        let before = percpu::CPUS[bsp].count(2);
        NMIS_AT_FIXED.store(u32::MAX, SeqCst);
        on_cpu(ap, ap_nmi_burst, bsp as u64)?;
        if !time::wait_irq(time::timeout(), || NMIS_AT_FIXED.load(SeqCst) != u32::MAX) {
            no_fixed += 1;
            continue;
        }
        time::wait_irq(time::ms(10), || {
            percpu::CPUS[bsp].count(2).wrapping_sub(before) >= 2
        });
        if percpu::CPUS[bsp].count(2).wrapping_sub(before) != 2 {
            lost += 1;
        }
        if NMIS_AT_FIXED.load(SeqCst).wrapping_sub(before) < 2 {
            overtaken += 1;
        }
    }
    ensure!(
        lost == 0 && overtaken == 0 && no_fixed == 0,
        "of {} rounds: {} lost an NMI, {} took the fixed IPI before both NMIs, {} never took it",
        ROUNDS,
        lost,
        overtaken,
        no_fixed
    );
    Ok(())
}

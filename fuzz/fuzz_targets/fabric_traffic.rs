//! Arbitrary bytes as the traffic of a whole VM: a `vlapic::fabric::Fabric` of four
//! APICs (vCPUs 0–3, one of them possibly in x2APIC mode at power-up) and the IOAPIC,
//! driven the way a VMM drives it on its vCPU exits — MMIO by guest-physical address
//! (`Fabric::mmio_read`/`mmio_write`: any vCPU, any address in or around the APIC and
//! IOAPIC pages, any size), RDMSR/WRMSR of the x2APIC range, IA32_APIC_BASE and
//! IA32_TSC_DEADLINE, ICR writes of every delivery mode and shorthand, IRQ lines, MSIs,
//! LINT pins, CR8, the entry plan (acknowledge + inject), EOIs, time steps, and an
//! export → native encode → decode → import round trip into a fresh fabric.
//!
//! After every operation, on every APIC: nothing panicked; no vector below 16 in
//! IRR/ISR; at most one in-service vector per priority class; a clean verifier; an
//! armed timer deadline is in the future; the PPR is the one SDM §11.8.3.1 derives
//! from TPR and ISR (PPR = TPR if TPR[7:4] ≥ ISRV[7:4], else ISRV[7:4] << 4), and the
//! guest reads that same PPR through the register (offset 0xA0 or MSR 0x80A) in the
//! APIC's current mode. The exported state validates, and re-imports into a fresh
//! fabric so that the fresh fabric exports the same state.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vlapic::fabric::{Fabric, FabricConfig};
use vlapic::state::native;
use vlapic::{ApicMode, LocalApic};

const VCPUS: usize = 4;
const APIC_GPA: u64 = 0xFEE0_0000;
const IOAPIC_GPA: u64 = 0xFEC0_0000;

fn take<const N: usize>(d: &mut &[u8]) -> Option<[u8; N]> {
    let (head, rest) = d.split_first_chunk::<N>()?;
    *d = rest;
    Some(*head)
}

/// The SDM's PPR rule, computed independently of the library.
fn expected_ppr(a: &LocalApic) -> u8 {
    let tpr = a.tpr();
    let isrv = a.isr().highest().unwrap_or(0);
    if tpr >> 4 >= isrv >> 4 {
        tpr
    } else {
        isrv & 0xF0
    }
}

fn check_apic(f: &mut Fabric, vcpu: usize, now: u64) {
    let a = f.apic(vcpu).expect("vCPU exists");
    assert!(!a.isr().has_illegal_vectors() && !a.irr().has_illegal_vectors());
    assert!((0..16u8).all(|c| a.isr().count_in_class(c) <= 1));
    assert_eq!(a.verifier().violations(), 0);
    if let Some(d) = a.next_timer_deadline() {
        assert!(d > a.now(), "deadline {d} not after now {}", a.now());
    }
    let want = expected_ppr(a);
    assert_eq!(
        a.ppr(),
        want,
        "PPR not derived from TPR {:#x} and ISR",
        a.tpr()
    );
    let mode = a.mode();
    let base = a.mmio_base();
    // The guest's view of PPR in the APIC's current mode.
    match mode {
        ApicMode::XApic => {
            let base = base.expect("xAPIC mode has a page");
            let mut b = [0u8; 4];
            assert!(f.mmio_read(vcpu, base + 0xA0, &mut b, now));
            assert_eq!(u32::from_le_bytes(b), u32::from(want));
        }
        ApicMode::X2Apic => {
            assert_eq!(f.lapic_msr_read(vcpu, 0x80A, now), Ok(u64::from(want)));
        }
        ApicMode::Disabled => {}
    }
}

fn check_all(f: &mut Fabric, cfg: &FabricConfig, now: u64) {
    for v in 0..VCPUS {
        check_apic(f, v, now);
    }
    let state = f.export();
    assert!(
        state.validate(&cfg.apics).is_empty(),
        "{:?}",
        state.validate(&cfg.apics)
    );
}

/// Where `vcpu`'s xAPIC page is (its IA32_APIC_BASE), or the default page.
fn page(f: &Fabric, vcpu: usize) -> u64 {
    f.apic(vcpu % VCPUS)
        .and_then(LocalApic::mmio_base)
        .unwrap_or(APIC_GPA)
}

fn round_trip(f: &Fabric, cfg: &FabricConfig, now: u64) {
    let state = f.export();
    let bytes = native::encode_fabric(&state);
    let decoded = native::decode_fabric(&bytes).expect("our own encoding decodes");
    assert_eq!(decoded, state, "native encoding is lossless");
    let mut fresh = Fabric::new(cfg.clone());
    fresh
        .import(&decoded, now)
        .unwrap_or_else(|e| panic!("exported state re-imports: {e:?}"));
    let again = fresh.export();
    assert_eq!(again, state, "re-import exports the same state");
}

fuzz_target!(|data: &[u8]| {
    let mut d = data;
    let Some([setup]) = take::<1>(&mut d) else {
        return;
    };
    let mut cfg = FabricConfig::with_vcpus(VCPUS);
    for (i, c) in cfg.apics.iter_mut().enumerate() {
        c.verify = true;
        if setup & (1 << i) != 0 {
            c.mode = ApicMode::X2Apic;
        }
    }
    let mut f = Fabric::new(cfg.clone());
    let mut now = 0u64;
    while let Some([op]) = take::<1>(&mut d) {
        let Some([c]) = take::<1>(&mut d) else { break };
        // vCPU 4 does not exist: every path must cope with it.
        let vcpu = usize::from(c % 5);
        match op % 20 {
            0 | 1 => {
                // MMIO read by GPA: the APIC page, the IOAPIC page, or their edges.
                let Some([sel, o0, o1, len]) = take::<4>(&mut d) else {
                    break;
                };
                let off = u64::from(u16::from_le_bytes([o0, o1]) & 0x1FFF);
                let gpa = match sel % 4 {
                    0 => APIC_GPA + (off & 0xFFF),
                    1 => IOAPIC_GPA + (off & 0xFF),
                    2 => page(&f, vcpu) + (off & 0xFFF),
                    _ => APIC_GPA - 0x1000 + off,
                };
                let mut buf = vec![0u8; usize::from(len % 9)];
                let _ = f.mmio_read(vcpu, gpa, &mut buf, now);
            }
            2..=4 => {
                let Some([sel, o0, o1, len]) = take::<4>(&mut d) else {
                    break;
                };
                let off = u64::from(u16::from_le_bytes([o0, o1]) & 0x1FFF);
                let gpa = match sel % 4 {
                    0 => APIC_GPA + (off & 0xFF0),
                    1 => IOAPIC_GPA + (off & 0xFF),
                    2 => page(&f, vcpu) + (off & 0xFFF),
                    _ => APIC_GPA - 0x1000 + off,
                };
                let n = usize::from(len % 9).min(d.len());
                let (bytes, rest) = d.split_at(n);
                d = rest;
                let _ = f.mmio_write(vcpu, gpa, bytes, now);
            }
            5 => {
                let Some(m) = take::<2>(&mut d) else { break };
                let _ =
                    f.lapic_msr_read(vcpu, 0x800 | u32::from(u16::from_le_bytes(m) & 0x1FF), now);
            }
            6 | 7 => {
                let Some([m]) = take::<1>(&mut d) else { break };
                let Some(v) = take::<8>(&mut d) else { break };
                let _ = f.lapic_msr_write(vcpu, 0x800 | u32::from(m), u64::from_le_bytes(v), now);
            }
            8 => {
                // IA32_APIC_BASE: flips of EN and EXTD, relocation, reserved bits.
                let Some([flags, page, hi]) = take::<3>(&mut d) else {
                    break;
                };
                let cur = f
                    .apic(vcpu % VCPUS)
                    .map_or(0xFEE0_0900, LocalApic::apic_base);
                let v = match flags % 4 {
                    0 => cur ^ (u64::from(flags & 0x0C) << 8), // toggle EXTD/EN
                    1 => (cur & 0xFFF) | 0xFEE0_0000 | (u64::from(page) << 12),
                    2 => cur | (u64::from(hi) << 40),
                    _ => 0xFEE0_0000 | u64::from(flags & 0x0C) << 8 | (cur & 0x100),
                };
                let _ = f.lapic_msr_write(vcpu, 0x1B, v, now);
            }
            9 => {
                let Some(v) = take::<8>(&mut d) else { break };
                let _ = f.lapic_msr_write(vcpu, 0x6E0, u64::from_le_bytes(v), now);
            }
            10 | 11 => {
                // An ICR write in the current mode: every delivery mode and shorthand.
                let Some([lo0, lo1, lo2, dest]) = take::<4>(&mut d) else {
                    break;
                };
                let lo = u32::from_le_bytes([lo0, lo1, lo2 & 0x0F, 0]);
                let x2 = f.apic(vcpu % VCPUS).map(LocalApic::mode) == Some(ApicMode::X2Apic);
                if x2 {
                    let _ =
                        f.lapic_msr_write(vcpu, 0x830, u64::from(dest) << 32 | u64::from(lo), now);
                } else {
                    let _ = f.mmio_write(
                        vcpu,
                        page(&f, vcpu) + 0x310,
                        &(u32::from(dest) << 24).to_le_bytes(),
                        now,
                    );
                    let _ = f.mmio_write(vcpu, page(&f, vcpu) + 0x300, &lo.to_le_bytes(), now);
                }
            }
            12 => {
                let Some([p, l]) = take::<2>(&mut d) else {
                    break;
                };
                let _ = f.set_irq_line(u32::from(p % 26), l & 1 != 0, now);
            }
            13 => {
                let Some(ad) = take::<4>(&mut d) else { break };
                let Some(da) = take::<4>(&mut d) else { break };
                let addr = 0xFEE0_0000 | u64::from(u32::from_le_bytes(ad) & 0x000F_FFFF);
                let _ = f.msi(addr, u32::from_le_bytes(da), now);
            }
            14 => {
                let Some([p, l]) = take::<2>(&mut d) else {
                    break;
                };
                let _ = f.set_lint(vcpu, p % 3, l & 1 != 0, now);
            }
            15 => {
                let Some([c8]) = take::<1>(&mut d) else { break };
                let _ = f.set_cr8(vcpu, u64::from(c8 % 20));
            }
            16 => {
                // Before entering the guest: advance, take events, acknowledge.
                let Some([inj]) = take::<1>(&mut d) else {
                    break;
                };
                if let Some(plan) = f.plan_entry(vcpu, now, inj & 1 != 0) {
                    assert_eq!(plan.cr8, f.apic(vcpu).map_or(0, LocalApic::cr8));
                    if let Some(t) = plan.timer_deadline {
                        assert!(t > now);
                    }
                    if let Some(v) = plan.inject {
                        assert!(v >= 16);
                        assert_eq!(f.apic(vcpu).and_then(|a| a.isr().highest()), Some(v));
                    }
                }
            }
            17 => {
                // EOI in the current mode.
                let x2 = f.apic(vcpu % VCPUS).map(LocalApic::mode) == Some(ApicMode::X2Apic);
                if x2 {
                    let _ = f.lapic_msr_write(vcpu, 0x80B, 0, now);
                } else {
                    let _ = f.mmio_write(vcpu, page(&f, vcpu) + 0xB0, &[0; 4], now);
                }
            }
            18 => {
                let Some(v) = take::<3>(&mut d) else { break };
                now = now.saturating_add(
                    u64::from(u32::from_le_bytes([v[0], v[1], v[2], 0])) << (c & 15),
                );
                for i in 0..VCPUS {
                    let _ = f.with_apic(i, now, |a| (a.advance(now), Default::default()));
                }
            }
            _ => round_trip(&f, &cfg, now),
        }
        check_all(&mut f, &cfg, now);
    }
    round_trip(&f, &cfg, now);
});

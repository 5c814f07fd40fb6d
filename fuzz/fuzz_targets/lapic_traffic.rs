//! Arbitrary bytes as a sequence of guest accesses to one local APIC (xAPIC page reads
//! and writes of any offset and size, RDMSR/WRMSR, IA32_APIC_BASE, CR8, deliveries,
//! LINT pins, time steps, acknowledges) and to a small fabric (IOAPIC MMIO, MSI, IRQ
//! lines). Nothing may panic, and the architectural invariants must hold throughout:
//! no vector below 16 in IRR/ISR, at most one in-service vector per priority class,
//! a clean verifier, and an armed timer deadline always in the future.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vlapic::fabric::{Fabric, FabricConfig};
use vlapic::{ApicMode, Delivery, DeliveryMode, LapicConfig, LocalApic};

fn take<const N: usize>(d: &mut &[u8]) -> Option<[u8; N]> {
    let (head, rest) = d.split_first_chunk::<N>()?;
    *d = rest;
    Some(*head)
}

fn check(a: &LocalApic) {
    assert!(!a.isr().has_illegal_vectors() && !a.irr().has_illegal_vectors());
    assert!((0..16u8).all(|c| a.isr().count_in_class(c) <= 1));
    assert_eq!(a.verifier().violations(), 0);
    if let Some(d) = a.next_timer_deadline() {
        assert!(d > a.now());
    }
}

fuzz_target!(|data: &[u8]| {
    let mut d = data;
    let Some([mode]) = take::<1>(&mut d) else { return };
    let x2 = mode & 1 != 0;
    let mut a = LocalApic::new(LapicConfig::default().with_mode(if x2 { ApicMode::X2Apic } else { ApicMode::XApic }).with_verify(true));
    let mut cfg = FabricConfig::with_vcpus(3);
    for c in cfg.apics.iter_mut() {
        c.verify = true;
    }
    let mut f = Fabric::new(cfg);
    let mut now = 0u64;
    while let Some([op]) = take::<1>(&mut d) {
        match op % 16 {
            0 => {
                let Some([o0, o1, len]) = take::<3>(&mut d) else { break };
                let mut buf = vec![0u8; usize::from(len % 9)];
                a.mmio_read(u64::from(u16::from_le_bytes([o0, o1]) & 0xFFF), &mut buf, now);
            }
            1 => {
                let Some([o0, o1, len]) = take::<3>(&mut d) else { break };
                let n = usize::from(len % 9).min(d.len());
                let (bytes, rest) = d.split_at(n);
                d = rest;
                let _ = a.mmio_write(u64::from(u16::from_le_bytes([o0, o1]) & 0xFFF), bytes, now);
            }
            2 => {
                // Aligned 32-bit register write: the common, meaningful case.
                let Some([r, v0, v1, v2, v3]) = take::<5>(&mut d) else { break };
                let _ = a.write_register(u64::from(r & 0x3F) << 4, u32::from_le_bytes([v0, v1, v2, v3]), now);
            }
            3 => {
                let Some(m) = take::<2>(&mut d) else { break };
                let _ = a.read_msr(0x800 | u32::from(u16::from_le_bytes(m) & 0x1FF), now);
            }
            4 => {
                let Some(m) = take::<2>(&mut d) else { break };
                let Some(v) = take::<8>(&mut d) else { break };
                let _ = a.write_msr(0x800 | u32::from(u16::from_le_bytes(m) & 0xFF), u64::from_le_bytes(v), now);
            }
            5 => {
                let Some(v) = take::<8>(&mut d) else { break };
                let _ = a.write_apic_base(u64::from_le_bytes(v), now);
            }
            6 => {
                let Some(v) = take::<8>(&mut d) else { break };
                let _ = a.write_msr(0x6E0, u64::from_le_bytes(v), now);
            }
            7 => {
                let Some([m, v, l]) = take::<3>(&mut d) else { break };
                if let Some(mode) = DeliveryMode::from_bits(u32::from(m)) {
                    a.deliver(Delivery { mode, vector: v, level_triggered: l & 1 != 0 }, now);
                }
            }
            8 => {
                a.acknowledge();
            }
            9 => {
                let Some([p, l]) = take::<2>(&mut d) else { break };
                a.set_lint(p % 3, l & 1 != 0, now);
            }
            10 => {
                let Some(v) = take::<4>(&mut d) else { break };
                now = now.saturating_add(u64::from(u32::from_le_bytes(v)));
                a.advance(now);
            }
            11 => {
                let Some([c]) = take::<1>(&mut d) else { break };
                let _ = a.set_cr8(u64::from(c));
            }
            12 => {
                let Some([o, v0, v1, v2, v3]) = take::<5>(&mut d) else { break };
                let _ = f.ioapic_mmio_write(u64::from(o & 0x7F), &[v0, v1, v2, v3], now);
            }
            13 => {
                let Some(ad) = take::<8>(&mut d) else { break };
                let Some(da) = take::<4>(&mut d) else { break };
                let _ = f.msi(u64::from_le_bytes(ad), u32::from_le_bytes(da), now);
            }
            14 => {
                let Some([p, l]) = take::<2>(&mut d) else { break };
                let _ = f.set_irq_line(u32::from(p), l & 1 != 0, now);
            }
            _ => {
                let Some([c, r, v0, v1, v2, v3]) = take::<6>(&mut d) else { break };
                let vcpu = usize::from(c % 4);
                let _ = f.lapic_mmio_write(vcpu, u64::from(r & 0x3F) << 4, &[v0, v1, v2, v3], now);
                let _ = f.with_apic(vcpu, now, |x| {
                    x.acknowledge();
                    ((), x.write_register(0xB0, 0, now))
                });
            }
        }
        check(&a);
    }
    for i in 0..3 {
        if let Some(x) = f.apic(i) {
            check(x);
        }
    }
});

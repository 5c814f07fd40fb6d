//! Lowest-priority delivery racing software disable (issue 10, finding 4).
//!
//! SDM Vol. 3A §11.6.2.4: a lowest-priority message goes to one of the processors of its
//! destination set that can accept it; §11.4.7.2: a software-disabled APIC refuses fixed
//! and lowest-priority interrupts. Arbitration reads the candidates one lock at a time
//! and delivers under another, so the winner can be disabled in between: the message
//! must then go to another candidate that accepts it, never be dropped while one exists
//! (KVM's `kvm_irq_delivery_to_apic` likewise only picks among APICs that are enabled
//! when it delivers, under one lock).
//!
//! Three APICs, all targeted by every message; APIC 0 stays enabled throughout, so every
//! message has an accepting destination and must arrive exactly once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use vlapic::delivery::{Delivery, DeliveryMode};
use vlapic::fabric::{FabricConfig, SharedFabric};
use vlapic::routing::{Destination, Message};
use vlapic::Effects;

const SVR: u64 = 0xF0;
const TPR: u64 = 0x80;
const LDR: u64 = 0xD0;
const EOI: u64 = 0xB0;
const APICS: usize = 3;
/// Messages per front end (a few seconds in a debug build).
const N: u32 = 100_000;
const VECTOR: u8 = 0x51;

fn setup() -> SharedFabric {
    let f = SharedFabric::new(FabricConfig::with_vcpus(APICS));
    for i in 0..APICS {
        // Flat logical model (DFR reset value): APIC i is bit i.
        f.lapic_mmio_write(i, LDR, &(1u32 << (24 + i)).to_le_bytes(), 0);
        f.lapic_mmio_write(i, SVR, &0x1FFu32.to_le_bytes(), 0);
    }
    // APIC 0 (never disabled) has the highest PPR, so it wins only when 1 and 2 are
    // both disabled: the winner is mostly an APIC that is being toggled. TPR 0x40
    // still lets vector 0x51 (class 5) through.
    f.lapic_mmio_write(0, TPR, &0x40u32.to_le_bytes(), 0);
    f
}

/// Takes every pending vector of every APIC (acknowledge + EOI), counting them.
fn drain(f: &SharedFabric, got: &mut [u64; APICS]) -> u64 {
    let mut total = 0;
    for (i, slot) in got.iter_mut().enumerate() {
        loop {
            let (v, _) = f
                .with_apic(i, 0, |a| {
                    let v = a.acknowledge();
                    let fx = if v.is_some() {
                        a.write_register(EOI, 0, 0)
                    } else {
                        Effects::default()
                    };
                    (v, fx)
                })
                .expect("vCPU exists");
            match v {
                Some(v) => {
                    assert_eq!(v, VECTOR);
                    *slot += 1;
                    total += 1;
                }
                None => break,
            }
        }
    }
    total
}

/// Runs `send` N times while another thread toggles software enable on APICs 1 and 2;
/// after each message exactly one APIC holds it.
fn race(send: impl Fn(&SharedFabric)) {
    let f = Arc::new(setup());
    let stop = Arc::new(AtomicBool::new(false));
    let toggler = {
        let (f, stop) = (f.clone(), stop.clone());
        thread::spawn(move || {
            let mut on = false;
            let mut toggles = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let svr: u32 = if on { 0x1FF } else { 0x0FF };
                for i in 1..APICS {
                    f.lapic_mmio_write(i, SVR, &svr.to_le_bytes(), 0);
                }
                on = !on;
                toggles += 1;
            }
            toggles
        })
    };
    let mut got = [0u64; APICS];
    let mut lost = 0u32;
    for k in 0..N {
        send(&f);
        match drain(&f, &mut got) {
            0 => lost += 1,
            1 => {}
            n => panic!("message {k} delivered {n} times"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let toggles = toggler.join().expect("toggler thread");
    assert!(toggles > 0, "the race ran");
    assert_eq!(lost, 0, "lost {lost} of {N} messages (per APIC: {got:?})");
    assert_eq!(got.iter().sum::<u64>(), u64::from(N));
    assert!(got[0] > 0, "APIC 0 took some: {got:?}");
}

#[test]
fn lowest_priority_message_survives_winner_disable() {
    let msg = Message {
        delivery: Delivery {
            mode: DeliveryMode::LowestPriority,
            vector: VECTOR,
            level_triggered: false,
        },
        dest: Destination::logical(0x07, false),
    };
    race(|f| {
        f.send(&msg, 0);
    });
}

#[test]
fn lowest_priority_msi_survives_winner_disable() {
    // Logical destination 0x07, redirection hint: lowest priority among all three.
    let address = 0xFEE0_0000u64 | 0x07 << 12 | 1 << 3 | 1 << 2;
    let data = u32::from(VECTOR);
    race(|f| {
        f.msi(address, data, 0).expect("well-formed MSI");
    });
}

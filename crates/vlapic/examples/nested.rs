//! Drives one local APIC through three nested interrupts, a TPR change and the EOIs
//! that unwind them, printing TPR, PPR, ISR and IRR at every step.
//!
//! Run: `cargo run -p vlapic --example nested`

use vlapic::{Delivery, LapicConfig, LocalApic};

const TPR: u64 = 0x80;
const EOI: u64 = 0xB0;
const SVR: u64 = 0xF0;

fn show(step: &str, a: &LocalApic) {
    let list = |s: &vlapic::VectorSet| {
        let v: Vec<String> = s.iter().map(|v| format!("{v:#04x}")).collect();
        format!("[{}]", v.join(" "))
    };
    println!(
        "{step:<38} TPR={:#04x} PPR={:#04x} ISR={:<22} IRR={}",
        a.tpr(),
        a.ppr(),
        list(a.isr()),
        list(a.irr())
    );
}

fn main() {
    let mut a = LocalApic::new(LapicConfig::default().with_verify(true));
    let _ = a.write_register(SVR, 0x1FF, 0);
    show("software-enabled", &a);

    // A device interrupt arrives and is taken; its handler re-enables interrupts.
    a.deliver(Delivery::fixed(0x41), 0);
    show("0x41 arrives", &a);
    a.acknowledge();
    show("0x41 accepted (in service)", &a);

    // A lower-class interrupt must wait; a higher one preempts.
    a.deliver(Delivery::fixed(0x35), 0);
    a.deliver(Delivery::fixed(0x62), 0);
    show("0x35 and 0x62 arrive", &a);
    println!(
        "  pending: {:?}",
        a.pending_vector().map(|v| format!("{v:#04x}"))
    );
    a.acknowledge();
    show("0x62 preempts", &a);

    a.deliver(Delivery::fixed_level(0x93), 0);
    a.acknowledge();
    show("level-triggered 0x93 preempts", &a);

    // Raising TPR above every class holds even high vectors back.
    let _ = a.write_register(TPR, 0xA0, 0);
    a.deliver(Delivery::fixed(0xA5), 0);
    show("TPR=0xa0, 0xa5 arrives", &a);
    println!(
        "  pending: {:?}",
        a.pending_vector().map(|v| format!("{v:#04x}"))
    );
    let _ = a.write_register(TPR, 0x00, 0);
    a.acknowledge();
    show("TPR=0, 0xa5 accepted (4 deep)", &a);

    for _ in 0..4 {
        let fx = a.write_register(EOI, 0, 0);
        let note = match fx.eoi {
            Some(v) => format!("EOI (level {v:#04x} -> IOAPIC)"),
            None => "EOI".to_string(),
        };
        show(&note, &a);
    }
    a.acknowledge();
    show("0x35 finally accepted", &a);
    let _ = a.write_register(EOI, 0, 0);
    show("EOI", &a);

    let v = a.verifier();
    println!(
        "verifier: deepest nesting {}, violations {}",
        v.max_depth(),
        v.violations()
    );
}

//! Unit tests of the 8259A pair (`pic.rs`) against the 8259A datasheet (Intel order
//! no. 231468) and the PIIX ELCR, and of its conversion to KVM's `kvm_pic_state`.

use super::*;
use zerocopy::IntoBytes as _;

/// The PC BIOS/Linux initialisation: ICW1 = 0x11 (edge, cascade, IC4), ICW2 = base,
/// ICW3 = 0x04 / 0x02, ICW4 = `icw4`; then all masked but `imr`s.
fn init(p: &mut PicPair, icw4: u8, imr: [u8; 2]) {
    for (cmd, data, base, icw3, mask) in
        [(0x20, 0x21, 0x20, 4, imr[0]), (0xA0, 0xA1, 0x28, 2, imr[1])]
    {
        p.write(cmd, 0x11);
        p.write(data, base);
        p.write(data, icw3);
        p.write(data, icw4);
        p.write(data, mask);
    }
}

fn ready() -> PicPair {
    let mut p = PicPair::default();
    init(&mut p, 0x01, [0, 0]);
    p
}

/// ICW1–ICW4 in order; ICW2 sets the vector base (bits 7:3), ICW4 AEOI and SFNM;
/// afterwards the data port is OCW1 (IMR), read back from the data port.
#[test]
fn initialisation_sequence_and_ocw1() {
    let mut p = PicPair::default();
    p.write(0x20, 0x11);
    assert_eq!(p.chips[0].init_state, 1);
    assert!(p.chips[0].init4);
    p.write(0x21, 0x37);
    assert_eq!(p.chips[0].irq_base, 0x30, "T2-T0 are not part of the base");
    assert_eq!(p.chips[0].init_state, 2);
    p.write(0x21, 0x04);
    assert_eq!(p.chips[0].init_state, 3);
    p.write(0x21, 0x13); // 8086, AEOI, SFNM
    assert_eq!(p.chips[0].init_state, 0);
    assert!(p.chips[0].auto_eoi && p.chips[0].special_fully_nested_mode);
    p.write(0x21, 0xA5);
    assert_eq!(p.read(0x21), 0xA5);
    // Without IC4 there is no ICW4, and its functions are cleared.
    p.write(0x20, 0x10);
    p.write(0x21, 0x08);
    p.write(0x21, 0x04);
    assert_eq!(p.chips[0].init_state, 0);
    assert!(!p.chips[0].auto_eoi);
    assert_eq!(p.read(0x21), 0, "ICW1 clears the IMR");
}

/// Edge mode: a rising edge latches IRR and raises INT; INTA returns base + IRQ,
/// sets ISR and clears IRR; a non-specific EOI (OCW2 0x20) clears the ISR bit.
#[test]
fn edge_request_inta_and_eoi() {
    let mut p = ready();
    assert!(!p.output());
    p.set_irq(3, true);
    assert!(p.output());
    assert_eq!(p.read(0x20), 1 << 3, "IRR read by default");
    assert_eq!(p.acknowledge(), 0x23);
    assert_eq!(p.chips[0].isr, 1 << 3);
    assert_eq!(p.chips[0].irr, 0);
    assert!(!p.output());
    // The line still high is no new edge.
    p.set_irq(3, true);
    assert_eq!(p.chips[0].irr, 0);
    p.write(0x20, 0x20);
    assert_eq!(p.chips[0].isr, 0);
    p.set_irq(3, false);
    p.set_irq(3, true);
    assert!(p.output(), "a new edge requests again");
}

/// Level mode through the ELCR: IRR follows the line; after EOI a line still high
/// requests again. The ELCR keeps IRQ0-2, 8 and 13 edge (PIIX).
#[test]
fn level_mode_via_elcr() {
    let mut p = ready();
    p.write(0x4D0, 0xFF);
    p.write(0x4D1, 0xFF);
    assert_eq!(p.read(0x4D0), 0xF8);
    assert_eq!(p.read(0x4D1), 0xDE);
    p.set_irq(5, true);
    assert_eq!(p.acknowledge(), 0x25);
    assert!(!p.output(), "in service");
    p.write(0x20, 0x20);
    assert!(p.output(), "still high after EOI: requests again");
    p.set_irq(5, false);
    assert!(!p.output());
    assert_eq!(p.chips[0].irr, 0);
}

/// Fully nested mode: IR0 highest; a request at or below the in-service level
/// waits, a higher one interrupts; IMR masks a request.
#[test]
fn priorities_and_masking() {
    let mut p = ready();
    p.set_irq(5, true);
    p.set_irq(3, true);
    assert_eq!(p.acknowledge(), 0x23);
    assert!(!p.output(), "IRQ5 is lower than IRQ3 in service");
    p.set_irq(1, true);
    assert!(p.output(), "IRQ1 is higher");
    p.write(0x21, 1 << 1);
    assert!(!p.output(), "masked");
    p.write(0x21, 0);
    assert_eq!(p.acknowledge(), 0x21);
    p.write(0x20, 0x20); // EOI for IRQ1 (highest in service)
    assert_eq!(p.chips[0].isr, 1 << 3);
    p.write(0x20, 0x63); // specific EOI for IRQ3
    assert_eq!(p.chips[0].isr, 0);
    assert_eq!(p.acknowledge(), 0x25);
}

/// The cascade: a slave request raises the master's IRQ2; INTA returns the slave's
/// vector and sets ISR bit 2 on the master and the IRQ's bit on the slave.
#[test]
fn cascade_on_irq2() {
    let mut p = ready();
    p.set_irq(10, true);
    assert!(p.output());
    assert_eq!(p.acknowledge(), 0x2A);
    assert_eq!(p.chips[0].isr, 1 << 2);
    assert_eq!(p.chips[1].isr, 1 << 2);
    p.write(0xA0, 0x20);
    p.write(0x20, 0x20);
    assert_eq!((p.chips[0].isr, p.chips[1].isr), (0, 0));
    // A masked slave IRQ does not reach the master.
    p.write(0xA1, 1 << 4);
    p.set_irq(12, true);
    assert!(!p.output());
}

/// A request that goes away before INTA: the master answers IRQ7 (base + 7) without
/// setting ISR; on the slave the spurious vector is IRQ15's, with the master's
/// ISR bit 2 set (the master saw a real IRQ2).
#[test]
fn spurious_irq7_and_irq15() {
    let mut p = ready();
    p.write(0x4D0, 1 << 4);
    p.set_irq(4, true);
    p.set_irq(4, false); // a level request withdrawn before INTA
    assert_eq!(p.acknowledge(), 0x27, "nothing pending");
    assert_eq!(p.chips[0].isr, 0);
    // Slave: the master latched IRQ2's edge, then the slave's request vanished
    // before INTA (its IRR cleared behind the cascade's back).
    p.set_irq(11, true);
    p.chips[1].irr = 0;
    assert!(p.output(), "the master latched IRQ2's edge");
    assert_eq!(p.acknowledge(), 0x2F);
    assert_eq!(p.chips[0].isr, 1 << 2);
    assert_eq!(p.chips[1].isr, 0);
}

/// Auto-EOI (ICW4 AEOI): INTA sets no ISR bit; with "rotate in AEOI" (OCW2 0x80) the
/// serviced IRQ becomes the lowest priority.
#[test]
fn auto_eoi_and_rotation_in_it() {
    let mut p = PicPair::default();
    init(&mut p, 0x03, [0, 0]);
    p.set_irq(1, true);
    assert_eq!(p.acknowledge(), 0x21);
    assert_eq!(p.chips[0].isr, 0);
    p.write(0x20, 0x80);
    p.set_irq(1, false);
    p.set_irq(1, true);
    assert_eq!(p.acknowledge(), 0x21);
    assert_eq!(p.chips[0].priority_add, 2, "IRQ1 lowest, IRQ2 highest");
    p.set_irq(1, false);
    p.set_irq(1, true);
    p.set_irq(4, true);
    assert_eq!(p.acknowledge(), 0x24, "IRQ4 now outranks IRQ1");
}

/// OCW2 rotation: rotate on non-specific EOI (0xA0) and set priority (0xC0 | L).
#[test]
fn rotation_commands() {
    let mut p = ready();
    p.set_irq(0, true);
    assert_eq!(p.acknowledge(), 0x20);
    p.write(0x20, 0xA0);
    assert_eq!(p.chips[0].priority_add, 1);
    p.set_irq(0, false);
    p.set_irq(0, true);
    p.set_irq(6, true);
    assert_eq!(p.acknowledge(), 0x26, "IRQ0 is now the lowest");
    p.write(0x20, 0xE6); // rotate on specific EOI for IRQ6
    assert_eq!(p.chips[0].priority_add, 7);
    p.write(0x20, 0xC4); // IRQ4 lowest
    assert_eq!(p.chips[0].priority_add, 5);
}

/// Special mask mode (OCW3 0x68): a masked in-service level no longer holds back
/// lower priorities; OCW3 0x48 leaves it.
#[test]
fn special_mask_mode() {
    let mut p = ready();
    p.set_irq(3, true);
    assert_eq!(p.acknowledge(), 0x23);
    p.set_irq(5, true);
    assert!(!p.output());
    p.write(0x21, 1 << 3);
    p.write(0x20, 0x68);
    assert!(p.chips[0].special_mask);
    assert!(p.output(), "IRQ5 goes through");
    p.write(0x20, 0x48);
    assert!(!p.output());
}

/// OCW3 poll (P): the next command-port read is 0x80 | level and acts as INTA; with
/// nothing pending it reads 0. RR/RIS select IRR or ISR for later reads.
#[test]
fn poll_and_read_register() {
    let mut p = ready();
    p.write(0x20, 0x0C);
    assert_eq!(p.read(0x20), 0);
    p.set_irq(6, true);
    p.write(0x20, 0x0C);
    assert_eq!(p.read(0x20), 0x86);
    assert_eq!(p.chips[0].isr, 1 << 6);
    p.write(0x20, 0x0B);
    assert_eq!(p.read(0x20), 1 << 6, "ISR");
    p.write(0x20, 0x0A);
    assert_eq!(p.read(0x20), 0, "IRR");
}

/// Special fully nested mode (ICW4 SFNM, master): a higher request on the slave
/// interrupts while the slave's lower one is in service.
#[test]
fn special_fully_nested_mode() {
    for (icw4, nests) in [(0x01, false), (0x11, true)] {
        let mut p = PicPair::default();
        init(&mut p, icw4, [0, 0]);
        p.set_irq(12, true);
        assert_eq!(p.acknowledge(), 0x2C);
        p.set_irq(9, true);
        assert_eq!(p.output(), nests, "ICW4 {icw4:#x}");
    }
}

/// The state is `struct kvm_pic_state` byte for byte: each field at its offset.
#[test]
fn kvm_layout_both_ways() {
    let k = kvm_bindings::kvm_pic_state {
        last_irr: 0x11,
        irr: 0x22,
        imr: 0x33,
        isr: 0x44,
        priority_add: 5,
        irq_base: 0x68,
        read_reg_select: 1,
        poll: 0,
        special_mask: 1,
        init_state: 3,
        auto_eoi: 1,
        rotate_on_auto_eoi: 0,
        special_fully_nested_mode: 1,
        init4: 1,
        elcr: 0x08,
        elcr_mask: SLAVE_ELCR_MASK,
    };
    let p = Pic::from_kvm(k.as_bytes(), SLAVE_ELCR_MASK).expect("valid");
    assert_eq!(
        (p.last_irr, p.irr, p.imr, p.isr, p.priority_add, p.irq_base),
        (0x11, 0x22, 0x33, 0x44, 5, 0x68)
    );
    assert!(p.read_reg_select && !p.poll && p.special_mask && p.auto_eoi);
    assert!(!p.rotate_on_auto_eoi && p.special_fully_nested_mode && p.init4);
    assert_eq!((p.init_state, p.elcr, p.elcr_mask), (3, 0x08, 0xDE));
    assert_eq!(&p.to_kvm()[..], k.as_bytes());
}

/// Bytes KVM would never produce are refused with a message naming the field.
#[test]
fn invalid_kvm_bytes_are_refused() {
    let good = ready().to_bytes();
    assert_eq!(PicPair::from_bytes(&good), Ok(ready()));
    let cases: [(usize, u8, &str); 6] = [
        (6, 2, "read_reg_select"),
        (4, 8, "priority_add"),
        (9, 4, "init_state"),
        (5, 0x21, "vector base"),
        (14, 0x01, "ELCR 0x1"),
        (31, 0xFF, "ELCR mask"),
    ];
    for (at, v, want) in cases {
        let mut b = good;
        b[at] = v;
        let e = PicPair::from_bytes(&b).expect_err(want);
        assert!(e.contains(want), "{e}");
    }
    assert!(PicPair::from_bytes(&good[..31]).is_err());
}

/// LINT0 follows INT: up on a request, down after INTA; with auto-EOI and a second
/// request still pending after INTA, down and up again (a new edge for the APIC,
/// whose ExtINT LINT0 is edge-sensitive) — the 8259A drops INT during the INTA
/// sequence.
#[test]
fn lint0_levels_follow_int_with_a_new_edge_after_each_inta() {
    let d = PicDevice::default();
    for (port, v) in [(0x20, 0x11), (0x21, 0x30), (0x21, 4), (0x21, 3), (0x21, 0)] {
        d.write(port, v);
    }
    assert_eq!(d.take_lint0(), Vec::<bool>::new());
    d.set_irq(3, true);
    d.set_irq(4, true);
    assert_eq!(d.take_lint0(), vec![true]);
    assert_eq!(
        d.take_lint0(),
        Vec::<bool>::new(),
        "no change, nothing to drive"
    );
    assert_eq!(d.acknowledge(), 0x33);
    assert_eq!(
        d.take_lint0(),
        vec![false, true],
        "IRQ4 still pending (AEOI)"
    );
    assert_eq!(d.acknowledge_if_requested(), Some(0x34));
    assert_eq!(d.take_lint0(), vec![false]);
    // An ExtINT with INT low (an ExtINT IPI, say) is dropped: no spurious INTA.
    assert_eq!(d.acknowledge_if_requested(), None);
    assert_eq!(d.save().chips[0].isr, 0);
    // A restored device re-drives its output.
    let e = PicDevice::default();
    let mut p = d.save();
    p.set_irq(5, true);
    e.restore(p);
    assert_eq!(e.take_lint0(), vec![true]);
}

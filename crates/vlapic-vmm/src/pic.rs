//! The PC's 8259A pair (master at 0x20/0x21, slave at 0xA0/0xA1 cascaded on IRQ2,
//! PIIX ELCR at 0x4D0/0x4D1) as pure logic: port accesses, IRQ inputs, INTA.
//!
//! Behaviour follows the Intel 8259A datasheet (order no. 231468; "ICW"/"OCW" below
//! are its initialization and operation command words) and, for edge/level
//! selection, the PIIX/PIIX3 ELCR registers (IRQ0–2, 8 and 13 are always edge).
//! Deviations, as KVM's in-kernel PIC makes them: single mode (ICW1 SNGL) and ICW1
//! LTIM are ignored (a PC is always cascaded, and the ELCR selects level mode), ICW3
//! is taken and ignored (the cascade is wired on IRQ2, slave ID 2), and only 8086
//! mode (vector = ICW2 base + IRQ) exists. The state is KVM's `struct
//! kvm_pic_state` field for field, so it converts to and from `KVM_GET_IRQCHIP`
//! chips 0 and 1 without loss ([`Pic::to_kvm`], [`Pic::from_kvm`]).

/// One 8259A, in `struct kvm_pic_state` order (16 bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pic {
    /// Input line levels (KVM's `last_irr`: the edge detector's memory).
    pub last_irr: u8,
    /// Interrupt request register.
    pub irr: u8,
    /// Interrupt mask register (OCW1).
    pub imr: u8,
    /// In-service register.
    pub isr: u8,
    /// The IRQ with the highest priority (rotation; 0 = IR0 highest, fully nested).
    pub priority_add: u8,
    /// Vector base (ICW2 bits 7:3).
    pub irq_base: u8,
    /// OCW3 RIS: a read of the command port returns ISR (else IRR).
    pub read_reg_select: bool,
    /// OCW3 P: the next command-port read is the poll word.
    pub poll: bool,
    /// OCW3 SMM: special mask mode.
    pub special_mask: bool,
    /// 0: initialized; 1, 2, 3: the next data-port write is ICW2, ICW3, ICW4.
    pub init_state: u8,
    /// ICW4 AEOI: automatic end of interrupt.
    pub auto_eoi: bool,
    /// OCW2 "rotate in automatic EOI mode".
    pub rotate_on_auto_eoi: bool,
    /// ICW4 SFNM: special fully nested mode.
    pub special_fully_nested_mode: bool,
    /// ICW1 IC4: an ICW4 follows.
    pub init4: bool,
    /// ELCR: level-triggered inputs.
    pub elcr: u8,
    /// ELCR bits that may be set (0xF8 master, 0xDE slave).
    pub elcr_mask: u8,
}

/// The master's ELCR mask: IRQ0–2 are always edge (PIIX).
pub const MASTER_ELCR_MASK: u8 = 0xF8;
/// The slave's ELCR mask: IRQ8 and IRQ13 are always edge (PIIX).
pub const SLAVE_ELCR_MASK: u8 = 0xDE;
/// Size of one chip's state (`struct kvm_pic_state`).
pub const KVM_PIC_STATE_LEN: usize = 16;

impl Pic {
    /// A chip at power-on with its ELCR mask.
    pub fn new(elcr_mask: u8) -> Self {
        Pic {
            elcr_mask,
            ..Pic::default()
        }
    }

    /// The highest-priority IRQ in `mask` under the current rotation.
    fn highest(&self, mask: u8) -> Option<u8> {
        (0..8u8)
            .map(|p| (p + self.priority_add) & 7)
            .find(|irq| mask >> irq & 1 != 0)
    }

    /// Priority rank (0 = highest) of `irq`.
    fn rank(&self, irq: u8) -> u8 {
        irq.wrapping_sub(self.priority_add) & 7
    }

    /// The IRQ this chip would raise INT for, if any (datasheet "Priority Resolver";
    /// `master` for special fully nested mode, where the slave's in-service IRQ2 does
    /// not hold back a higher request from the same slave).
    fn pending(&self, master: bool) -> Option<u8> {
        let irq = self.highest(self.irr & !self.imr)?;
        let mut in_service = self.isr;
        if self.special_mask {
            in_service &= !self.imr;
        }
        if master && self.special_fully_nested_mode {
            in_service &= !(1 << 2);
        }
        match self.highest(in_service) {
            Some(s) if self.rank(s) <= self.rank(irq) => None,
            _ => Some(irq),
        }
    }

    /// Drives input `irq` (0–7) to `level`: edge inputs latch IRR on a rising edge,
    /// level inputs (ELCR) follow the line.
    fn set_input(&mut self, irq: u8, level: bool) {
        let bit = 1u8 << (irq & 7);
        if self.elcr & bit != 0 {
            if level {
                self.irr |= bit;
            } else {
                self.irr &= !bit;
            }
        } else if level && self.last_irr & bit == 0 {
            self.irr |= bit;
        }
        if level {
            self.last_irr |= bit;
        } else {
            self.last_irr &= !bit;
        }
    }

    /// INTA on this chip for `irq`: IRR to ISR (not in AEOI mode; then a rotation
    /// if asked). An edge request is consumed; a level one stays while its line is
    /// high.
    fn acknowledge(&mut self, irq: u8) {
        let bit = 1u8 << irq;
        if self.elcr & bit == 0 {
            self.irr &= !bit;
        }
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.priority_add = (irq + 1) & 7;
            }
        } else {
            self.isr |= bit;
        }
    }

    /// ICW1 (datasheet "Initialization Command Words"): IMR cleared, IR7 lowest
    /// priority, special mask mode cleared, status read set to IRR, the edge sense
    /// reset (a request must rise again), ICW4 functions cleared when IC4 = 0.
    fn icw1(&mut self, v: u8) {
        *self = Pic {
            last_irr: self.last_irr,
            elcr: self.elcr,
            elcr_mask: self.elcr_mask,
            irq_base: self.irq_base,
            init4: v & 1 != 0,
            init_state: 1,
            ..Pic::default()
        };
        // Level inputs still high are requests again at once.
        self.irr = self.last_irr & self.elcr;
    }

    /// OCW2: EOI, rotation and priority commands (R, SL, EOI bits 7:5, level 2:0).
    fn ocw2(&mut self, v: u8) {
        let level = v & 7;
        match v >> 5 {
            // Non-specific EOI; with R: rotate on non-specific EOI.
            c @ (0b001 | 0b101) => {
                if let Some(irq) = self.highest(self.isr) {
                    self.isr &= !(1 << irq);
                    if c == 0b101 {
                        self.priority_add = (irq + 1) & 7;
                    }
                }
            }
            // Specific EOI; with R: rotate on specific EOI.
            c @ (0b011 | 0b111) => {
                self.isr &= !(1 << level);
                if c == 0b111 {
                    self.priority_add = (level + 1) & 7;
                }
            }
            0b100 => self.rotate_on_auto_eoi = true,
            0b000 => self.rotate_on_auto_eoi = false,
            // Set priority: `level` becomes the lowest.
            0b110 => self.priority_add = (level + 1) & 7,
            _ => {} // 0b010: no operation
        }
    }

    /// OCW3: special mask (ESMM, SMM), poll (P), read register (RR, RIS).
    fn ocw3(&mut self, v: u8) {
        if v & 0x40 != 0 {
            self.special_mask = v & 0x20 != 0;
        }
        if v & 0x04 != 0 {
            self.poll = true;
        }
        if v & 0x02 != 0 {
            self.read_reg_select = v & 0x01 != 0;
        }
    }

    /// A write to the command (`a0` false) or data (`a0` true) port.
    fn write(&mut self, a0: bool, v: u8) {
        if !a0 {
            if v & 0x10 != 0 {
                self.icw1(v);
            } else if v & 0x08 != 0 {
                self.ocw3(v);
            } else {
                self.ocw2(v);
            }
            return;
        }
        match self.init_state {
            1 => {
                self.irq_base = v & 0xF8;
                self.init_state = 2;
            }
            2 => self.init_state = if self.init4 { 3 } else { 0 },
            3 => {
                self.special_fully_nested_mode = v & 0x10 != 0;
                self.auto_eoi = v & 0x02 != 0;
                self.init_state = 0;
            }
            _ => self.imr = v,
        }
    }

    /// `struct kvm_pic_state`'s 16 bytes.
    pub fn to_kvm(&self) -> [u8; KVM_PIC_STATE_LEN] {
        [
            self.last_irr,
            self.irr,
            self.imr,
            self.isr,
            self.priority_add,
            self.irq_base,
            u8::from(self.read_reg_select),
            u8::from(self.poll),
            u8::from(self.special_mask),
            self.init_state,
            u8::from(self.auto_eoi),
            u8::from(self.rotate_on_auto_eoi),
            u8::from(self.special_fully_nested_mode),
            u8::from(self.init4),
            self.elcr,
            self.elcr_mask,
        ]
    }

    /// A chip from `struct kvm_pic_state`'s bytes, validated: flags 0 or 1,
    /// `priority_add` 0–7, `init_state` 0–3, the vector base a multiple of 8, ELCR
    /// inside `elcr_mask` (which must be the chip's PIIX mask `want_mask`).
    pub fn from_kvm(b: &[u8], want_mask: u8) -> Result<Self, String> {
        let b: &[u8; KVM_PIC_STATE_LEN] = b
            .try_into()
            .map_err(|_| format!("8259 state is {} bytes, not 16", b.len()))?;
        let flag = |i: usize, what: &str| match b[i] {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(format!("8259 {what} is {v}, not 0 or 1")),
        };
        let p = Pic {
            last_irr: b[0],
            irr: b[1],
            imr: b[2],
            isr: b[3],
            priority_add: b[4],
            irq_base: b[5],
            read_reg_select: flag(6, "read_reg_select")?,
            poll: flag(7, "poll")?,
            special_mask: flag(8, "special_mask")?,
            init_state: b[9],
            auto_eoi: flag(10, "auto_eoi")?,
            rotate_on_auto_eoi: flag(11, "rotate_on_auto_eoi")?,
            special_fully_nested_mode: flag(12, "special_fully_nested_mode")?,
            init4: flag(13, "init4")?,
            elcr: b[14],
            elcr_mask: b[15],
        };
        if p.priority_add > 7 {
            return Err(format!("8259 priority_add {} is not 0-7", p.priority_add));
        }
        if p.init_state > 3 {
            return Err(format!("8259 init_state {} is not 0-3", p.init_state));
        }
        if p.irq_base & 7 != 0 {
            return Err(format!(
                "8259 vector base {:#x} is not a multiple of 8",
                p.irq_base
            ));
        }
        if p.elcr_mask != want_mask {
            return Err(format!(
                "8259 ELCR mask {:#x}, expected {want_mask:#x}",
                p.elcr_mask
            ));
        }
        if p.elcr & !p.elcr_mask != 0 {
            return Err(format!(
                "8259 ELCR {:#x} sets bits outside {:#x}",
                p.elcr, p.elcr_mask
            ));
        }
        Ok(p)
    }
}

/// The cascaded pair: master (IRQ0–7) and slave (IRQ8–15 on the master's IRQ2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PicPair {
    /// Master (0x20/0x21, ELCR 0x4D0) and slave (0xA0/0xA1, ELCR 0x4D1).
    pub chips: [Pic; 2],
}

impl Default for PicPair {
    fn default() -> Self {
        PicPair {
            chips: [Pic::new(MASTER_ELCR_MASK), Pic::new(SLAVE_ELCR_MASK)],
        }
    }
}

/// The ports the pair owns.
pub fn owns(port: u16) -> bool {
    matches!(port, 0x20 | 0x21 | 0xA0 | 0xA1 | 0x4D0 | 0x4D1)
}

impl PicPair {
    /// The slave's INT output on the master's IRQ2 input.
    fn cascade(&mut self) {
        let slave_int = self.chips[1].pending(false).is_some();
        self.chips[0].set_input(2, slave_int);
    }

    /// Drives ISA IRQ `irq` (0–15; IRQ2 is the cascade and ignored) to `level`.
    pub fn set_irq(&mut self, irq: u8, level: bool) {
        match irq {
            2 => {}
            0..=7 => self.chips[0].set_input(irq, level),
            8..=15 => self.chips[1].set_input(irq - 8, level),
            _ => {}
        }
        self.cascade();
    }

    /// The master's INT output (what LINT0 sees in virtual-wire mode).
    pub fn output(&self) -> bool {
        self.chips[0].pending(true).is_some()
    }

    /// The INTA cycle: the vector of the highest-priority request, moved to ISR.
    /// With no request left (it went away before INTA), the spurious IRQ7 of the
    /// chip asked — the master's, or the slave's (IRQ15) when the master resolved
    /// IRQ2 — with no ISR bit set (datasheet, "Interrupt Sequence").
    pub fn acknowledge(&mut self) -> u8 {
        let Some(irq) = self.chips[0].pending(true) else {
            return self.chips[0].irq_base.wrapping_add(7);
        };
        self.chips[0].acknowledge(irq);
        let v = if irq == 2 {
            match self.chips[1].pending(false) {
                Some(s) => {
                    self.chips[1].acknowledge(s);
                    self.chips[1].irq_base.wrapping_add(s)
                }
                None => self.chips[1].irq_base.wrapping_add(7),
            }
        } else {
            self.chips[0].irq_base.wrapping_add(irq)
        };
        self.cascade();
        v
    }

    /// A guest IN from one of [`owns`]'s ports.
    pub fn read(&mut self, port: u16) -> u8 {
        match port {
            0x4D0 => self.chips[0].elcr,
            0x4D1 => self.chips[1].elcr,
            0x20 | 0xA0 => {
                let i = usize::from(port == 0xA0);
                let chip = &mut self.chips[i];
                if chip.poll {
                    // The poll word: I (bit 7) and the level; it acts as INTA.
                    chip.poll = false;
                    let v = match chip.pending(i == 0) {
                        Some(irq) => {
                            chip.acknowledge(irq);
                            0x80 | irq
                        }
                        None => 0,
                    };
                    self.cascade();
                    v
                } else if chip.read_reg_select {
                    chip.isr
                } else {
                    chip.irr
                }
            }
            0x21 => self.chips[0].imr,
            0xA1 => self.chips[1].imr,
            _ => 0xFF,
        }
    }

    /// A guest OUT to one of [`owns`]'s ports.
    pub fn write(&mut self, port: u16, v: u8) {
        match port {
            0x4D0 | 0x4D1 => {
                let c = &mut self.chips[usize::from(port == 0x4D1)];
                c.elcr = v & c.elcr_mask;
            }
            0x20 | 0x21 => self.chips[0].write(port == 0x21, v),
            0xA0 | 0xA1 => self.chips[1].write(port == 0xA1, v),
            _ => {}
        }
        self.cascade();
    }

    /// Both chips as `KVM_GET_IRQCHIP` chips 0 and 1 hold them (32 bytes).
    pub fn to_bytes(&self) -> [u8; 2 * KVM_PIC_STATE_LEN] {
        let mut out = [0u8; 2 * KVM_PIC_STATE_LEN];
        out[..KVM_PIC_STATE_LEN].copy_from_slice(&self.chips[0].to_kvm());
        out[KVM_PIC_STATE_LEN..].copy_from_slice(&self.chips[1].to_kvm());
        out
    }

    /// The pair from [`PicPair::to_bytes`]' layout, validated ([`Pic::from_kvm`]).
    pub fn from_bytes(b: &[u8]) -> Result<Self, String> {
        if b.len() != 2 * KVM_PIC_STATE_LEN {
            return Err(format!("8259 pair state is {} bytes, not 32", b.len()));
        }
        let (m, s) = b.split_at(KVM_PIC_STATE_LEN);
        Ok(PicPair {
            chips: [
                Pic::from_kvm(m, MASTER_ELCR_MASK).map_err(|e| format!("master: {e}"))?,
                Pic::from_kvm(s, SLAVE_ELCR_MASK).map_err(|e| format!("slave: {e}"))?,
            ],
        })
    }
}

#[cfg(test)]
#[path = "pic_tests.rs"]
mod tests;

/// The pair as the VMM's device: shared by the port bus (0x20/0x21/0xA0/0xA1,
/// 0x4D0/0x4D1, ISA IRQ lines) and the BSP's ExtINT source (INTA). Its INT output
/// drives LINT0 of vCPU 0 (virtual-wire mode; SDM Vol. 3A §11.5.1: LINT0 programmed
/// as ExtINT takes the 8259's INTR); [`PicDevice::take_lint0`] says which levels to
/// drive it to since the last call.
#[derive(Debug, Default)]
pub struct PicDevice {
    inner: std::sync::Mutex<PicWire>,
    dirty: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Default)]
struct PicWire {
    pair: PicPair,
    /// The LINT0 level last driven.
    lint0: bool,
    /// An INTA happened since: INT drops during the cycle, so a request still
    /// pending after it is a new rising edge.
    acked: bool,
}

impl PicDevice {
    fn with<R>(&self, f: impl FnOnce(&mut PicWire) -> R) -> R {
        let r = f(&mut crate::lock(&self.inner));
        self.dirty.store(true, std::sync::atomic::Ordering::Release);
        r
    }

    /// A guest IN from a port [`owns`] says is ours.
    pub fn read(&self, port: u16) -> u8 {
        self.with(|w| w.pair.read(port))
    }

    /// A guest OUT to a port [`owns`] says is ours.
    pub fn write(&self, port: u16, v: u8) {
        self.with(|w| w.pair.write(port, v));
    }

    /// ISA IRQ `irq` (0–15) to `level`.
    pub fn set_irq(&self, irq: u8, level: bool) {
        self.with(|w| w.pair.set_irq(irq, level));
    }

    /// The INTA cycle of an ExtINT: the vector.
    pub fn acknowledge(&self) -> u8 {
        self.with(|w| {
            w.acked = true;
            w.pair.acknowledge()
        })
    }

    /// The ExtINT source of the BSP: INTA when INT is up, else `None` (dropped). An
    /// ExtINT also comes from an IPI, IOAPIC entry or MSI in ExtINT mode; KVM's and
    /// QEMU's APICs drop those, so with nothing requested this does not make the
    /// spurious-IRQ7 INTA ([`PicPair::acknowledge`]) a hardware 8259 would answer.
    pub fn acknowledge_if_requested(&self) -> Option<u8> {
        self.with(|w| {
            w.pair.output().then(|| {
                w.acked = true;
                w.pair.acknowledge()
            })
        })
    }

    /// The LINT0 levels to drive, in order, since the last call (empty: no change).
    pub fn take_lint0(&self) -> Vec<bool> {
        if !self.dirty.swap(false, std::sync::atomic::Ordering::Acquire) {
            return Vec::new();
        }
        let mut w = crate::lock(&self.inner);
        let mut out = Vec::new();
        if std::mem::take(&mut w.acked) && w.lint0 {
            out.push(false);
            w.lint0 = false;
        }
        let level = w.pair.output();
        if level != w.lint0 {
            out.push(level);
            w.lint0 = level;
        }
        out
    }

    /// The pair's state (for a save file or a migration).
    pub fn save(&self) -> PicPair {
        crate::lock(&self.inner).pair
    }

    /// Continues `pair`; its INT output is driven onto LINT0 at the next
    /// [`PicDevice::take_lint0`] (a level LINT0 already has makes no new edge).
    pub fn restore(&self, pair: PicPair) {
        self.with(|w| {
            *w = PicWire {
                pair,
                lint0: false,
                acked: false,
            }
        });
    }
}

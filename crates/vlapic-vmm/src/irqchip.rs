//! The VMM's view of the interrupt fabric: every APIC/IOAPIC access goes through
//! [`Irqchip`], whose method names mirror `vlapic::fabric::SharedFabric`.
//!
//! Until the fabric (issue 3) lands, [`Irqchip`] is a temporary stand-in: the
//! local APICs behind one mutex each and a minimal IPI delivery (physical,
//! broadcast, flat/x2APIC-cluster logical, shorthands) so SMP start-up can be
//! exercised. It has no IOAPIC: IOAPIC MMIO reads zeros and IRQ lines are
//! counted only. Swapping in `SharedFabric` replaces this file's internals.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use vlapic::{
    Delivery, DeliveryMode, DestMode, Effects, GpFault, LapicConfig, LocalApic, Shorthand,
};

use crate::kick::lock;

/// The vCPUs an operation made runnable (to be kicked).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Wake {
    bits: Vec<u64>,
}

impl Wake {
    fn add(&mut self, vcpu: usize) {
        let w = vcpu / 64;
        if self.bits.len() <= w {
            self.bits.resize(w + 1, 0);
        }
        if let Some(word) = self.bits.get_mut(w) {
            *word |= 1u64 << (vcpu % 64);
        }
    }

    /// Whether nobody needs a kick.
    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|w| *w == 0)
    }

    /// Whether `vcpu` needs a kick.
    pub fn contains(&self, vcpu: usize) -> bool {
        self.bits
            .get(vcpu / 64)
            .is_some_and(|w| w & (1u64 << (vcpu % 64)) != 0)
    }

    /// The vCPU indices to kick.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.bits.iter().enumerate().flat_map(|(i, w)| {
            (0..64)
                .filter(move |b| w & (1u64 << b) != 0)
                .map(move |b| i * 64 + b)
        })
    }
}

/// Construction parameters (mirrors `vlapic::fabric::FabricConfig`).
#[derive(Clone, Debug)]
pub struct FabricConfig {
    /// One configuration per vCPU, in vCPU order.
    pub apics: Vec<LapicConfig>,
    /// Number of IOAPIC pins.
    pub ioapic_pins: u8,
    /// IOAPIC ID.
    pub ioapic_id: u8,
}

/// All local APICs of the VM and the routing between them.
pub struct Irqchip {
    apics: Vec<Mutex<LocalApic>>,
    /// IRQ line changes seen (no IOAPIC in the stand-in).
    pub irq_line_changes: AtomicU64,
}

impl Irqchip {
    /// A fabric for `cfg.apics.len()` vCPUs.
    pub fn new(cfg: FabricConfig) -> Self {
        Self {
            apics: cfg
                .apics
                .into_iter()
                .map(|c| Mutex::new(LocalApic::new(c)))
                .collect(),
            irq_line_changes: AtomicU64::new(0),
        }
    }

    /// Number of local APICs.
    pub fn len(&self) -> usize {
        self.apics.len()
    }

    /// Whether there are no APICs.
    pub fn is_empty(&self) -> bool {
        self.apics.is_empty()
    }

    /// Runs `f` on one APIC under its lock, then routes the effects it returns.
    pub fn with_apic<R>(
        &self,
        vcpu: usize,
        now: u64,
        f: impl FnOnce(&mut LocalApic) -> (R, Effects),
    ) -> Option<(R, Wake)> {
        let (r, fx) = {
            let mut a = lock(self.apics.get(vcpu)?);
            f(&mut a)
        };
        Some((r, self.route(vcpu, fx, now)))
    }

    /// xAPIC page read by `vcpu`.
    pub fn lapic_mmio_read(&self, vcpu: usize, offset: u64, data: &mut [u8], now: u64) {
        if let Some(a) = self.apics.get(vcpu) {
            lock(a).mmio_read(offset, data, now);
        } else {
            data.fill(0xFF);
        }
    }

    /// xAPIC page write by `vcpu`.
    pub fn lapic_mmio_write(&self, vcpu: usize, offset: u64, data: &[u8], now: u64) -> Wake {
        self.with_apic(vcpu, now, |a| ((), a.mmio_write(offset, data, now)))
            .map(|(_, w)| w)
            .unwrap_or_default()
    }

    /// RDMSR of an APIC MSR by `vcpu`.
    pub fn lapic_msr_read(&self, vcpu: usize, msr: u32, now: u64) -> Result<u64, GpFault> {
        let a = self.apics.get(vcpu).ok_or(GpFault)?;
        let r = lock(a).read_msr(msr, now);
        r
    }

    /// WRMSR of an APIC MSR by `vcpu`.
    pub fn lapic_msr_write(
        &self,
        vcpu: usize,
        msr: u32,
        value: u64,
        now: u64,
    ) -> Result<Wake, GpFault> {
        let fx = {
            let a = self.apics.get(vcpu).ok_or(GpFault)?;
            let r = lock(a).write_msr(msr, value, now);
            r?
        };
        Ok(self.route(vcpu, fx, now))
    }

    /// IOAPIC MMIO read (the stand-in has no IOAPIC: zeros).
    pub fn ioapic_mmio_read(&self, _offset: u64, data: &mut [u8], _now: u64) {
        data.fill(0);
    }

    /// IOAPIC MMIO write (ignored by the stand-in).
    pub fn ioapic_mmio_write(&self, _offset: u64, _data: &[u8], _now: u64) -> Wake {
        Wake::default()
    }

    /// Drives IOAPIC input `pin` (counted only by the stand-in).
    pub fn set_irq_line(&self, _pin: u32, _level: bool, _now: u64) -> Wake {
        self.irq_line_changes.fetch_add(1, Ordering::Relaxed);
        Wake::default()
    }

    fn matches(a: &LocalApic, msg: &vlapic::IpiMessage) -> bool {
        match msg.dest_mode {
            DestMode::Physical => msg.is_broadcast() || a.id() == msg.dest,
            DestMode::Logical => {
                if msg.is_broadcast() {
                    return true;
                }
                let ldr = a.ldr();
                if msg.x2apic {
                    ldr >> 16 == msg.dest >> 16 && ldr & msg.dest & 0xFFFF != 0
                } else if a.dfr() >> 28 == 0xF {
                    (ldr >> 24) & msg.dest & 0xFF != 0
                } else {
                    (ldr >> 28) == (msg.dest >> 4) & 0xF && (ldr >> 24) & msg.dest & 0xF != 0
                }
            }
        }
    }

    fn route(&self, src: usize, fx: Effects, now: u64) -> Wake {
        let mut wake = Wake::default();
        let Some(msg) = fx.ipi else {
            return wake;
        };
        let d = Delivery {
            mode: msg.mode,
            vector: msg.vector,
            level_triggered: false,
        };
        for (i, a) in self.apics.iter().enumerate() {
            let mut a = lock(a);
            let hit = match msg.shorthand {
                Shorthand::AllIncludingSelf => true,
                Shorthand::AllExcludingSelf => i != src,
                Shorthand::SelfOnly => i == src,
                Shorthand::None => Self::matches(&a, &msg),
            };
            if hit && a.deliver(d, now) {
                wake.add(i);
                if msg.mode == DeliveryMode::LowestPriority {
                    break;
                }
            }
        }
        wake
    }
}

//! `--trace` recording (feature `trace`): per-vCPU buffers filled from each APIC's
//! trace ring after every exit, plus the VM's pauses (migrations, save, restore).
//!
//! Each vCPU thread drains its own APIC's ring (library feature `trace`, stamped with
//! VM time) into its own buffer, under its own mutex: no lock is shared between vCPUs
//! on the hot path. The main thread adds the pauses while every vCPU is parked, and
//! [`crate::trace_json`] writes the lot as Chrome trace-event JSON at the end.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use vlapic::fabric::SharedFabric;
use vlapic::trace::TraceEvent;
use vlapic::Effects;

use crate::lock;

/// Events kept in all, shared equally among the vCPUs; more are counted in
/// [`Recorder::dropped`] (a bound on the recorder's memory, whatever the guest does:
/// 8 Mi events of at most 24 bytes is 192 MiB).
pub const MAX_EVENTS: usize = 1 << 23;

/// What one vCPU's thread recorded.
#[derive(Debug, Default, Clone)]
pub struct Lane {
    /// The APIC's events, oldest first.
    pub events: Vec<TraceEvent>,
    /// Verifier violations seen, as (VM ns, running total): the total grew at a drain.
    pub violations: Vec<(u64, u64)>,
    /// The verifier's violation count at the last drain (per fabric).
    pub(crate) seen_violations: u64,
    /// The ring's lost count at the last drain (per fabric).
    pub(crate) seen_lost: u64,
}

/// A pause of the whole VM: a live migration (in-process or to another process), a
/// save or a restore, with what was in service on each vCPU at that moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pause {
    /// `migration`, `save`, `restore`, `migrate-to` or `incoming`.
    pub kind: &'static str,
    /// VM time the VM stopped (ns).
    pub start_ns: u64,
    /// VM time it ran again (ns; equal to `start_ns` for a point such as a restore).
    pub end_ns: u64,
    /// Wall-clock downtime (µs).
    pub downtime_us: u64,
    /// Each vCPU's in-service vectors, lowest first.
    pub isr: Vec<Vec<u8>>,
}

/// The recorder one `--trace` run shares between its threads.
#[derive(Debug)]
pub struct Recorder {
    lanes: Vec<Mutex<Lane>>,
    /// Events kept per vCPU ([`MAX_EVENTS`] / vCPUs).
    cap: usize,
    pauses: Mutex<Vec<Pause>>,
    dropped: AtomicU64,
    lost: AtomicU64,
}

/// The vectors set in an ISR given as eight 32-bit words (ISR0–7), lowest first.
pub fn isr_vectors(words: &[u32; 8]) -> Vec<u8> {
    let mut out = Vec::new();
    for (w, bits) in words.iter().enumerate() {
        for b in 0..32u32 {
            if bits & (1 << b) != 0 {
                if let Ok(v) = u8::try_from(w as u32 * 32 + b) {
                    out.push(v);
                }
            }
        }
    }
    out
}

impl Recorder {
    /// A recorder for `vcpus` vCPUs.
    pub fn new(vcpus: usize) -> Self {
        Self {
            lanes: (0..vcpus).map(|_| Mutex::new(Lane::default())).collect(),
            cap: MAX_EVENTS / vcpus.max(1),
            pauses: Mutex::new(Vec::new()),
            dropped: AtomicU64::new(0),
            lost: AtomicU64::new(0),
        }
    }

    /// Turns recording on in every APIC of `chip` (a new fabric: at start and after
    /// each migration) and restarts the per-fabric counters.
    pub fn enable(&self, chip: &SharedFabric) {
        for (i, lane) in self.lanes.iter().enumerate() {
            let mut lane = lock(lane);
            chip.with_apic(i, 0, |a| {
                a.set_trace_enabled(true);
                lane.seen_violations = a.verifier().violations();
                lane.seen_lost = a.trace().lost();
                ((), Effects::default())
            });
        }
    }

    /// Moves vCPU `me`'s waiting events from its APIC into its buffer (the vCPU's
    /// thread, after each exit; the main thread for every vCPU before a fabric goes).
    #[inline]
    pub fn drain(&self, me: usize, chip: &SharedFabric) {
        let Some(lane) = self.lanes.get(me) else {
            return;
        };
        let mut lane = lock(lane);
        let lane = &mut *lane;
        let mut dropped = 0u64;
        let cap = self.cap;
        let res = chip.with_apic(me, 0, |a| {
            let mut last = 0;
            a.drain_trace(|e| {
                last = e.time;
                if lane.events.len() < cap {
                    lane.events.push(e);
                } else {
                    dropped += 1;
                }
            });
            let v = a.verifier().violations();
            let lost = a.trace().lost();
            ((v, lost, last.max(a.now())), Effects::default())
        });
        if let Some(((v, lost, at), _)) = res {
            if v > lane.seen_violations {
                let total = lane.violations.last().map_or(0, |x| x.1);
                let total = total.saturating_add(v - lane.seen_violations);
                lane.violations.push((at, total));
                lane.seen_violations = v;
            }
            if lost > lane.seen_lost {
                self.lost
                    .fetch_add(lost - lane.seen_lost, Ordering::Relaxed);
                lane.seen_lost = lost;
            }
        }
        if dropped > 0 {
            self.dropped.fetch_add(dropped, Ordering::Relaxed);
        }
    }

    /// Drains every vCPU (the VM is paused, or the run is over).
    pub fn drain_all(&self, chip: &SharedFabric) {
        for i in 0..self.lanes.len() {
            self.drain(i, chip);
        }
    }

    /// Records a pause of the whole VM.
    pub fn pause(&self, p: Pause) {
        lock(&self.pauses).push(p);
    }

    /// A pause whose ISRs are read from `chip` (paused, or not yet resumed).
    pub fn pause_from(
        &self,
        kind: &'static str,
        (start_ns, end_ns): (u64, u64),
        downtime_us: u64,
        chip: &SharedFabric,
    ) {
        let isr = (0..self.lanes.len())
            .map(|i| {
                chip.read_apic(i, |a| {
                    let mut out = Vec::new();
                    for v in 16..=255u8 {
                        if a.isr().contains(v) {
                            out.push(v);
                        }
                    }
                    out
                })
                .unwrap_or_default()
            })
            .collect();
        self.pause(Pause {
            kind,
            start_ns,
            end_ns,
            downtime_us,
            isr,
        });
    }

    /// Events not kept because a vCPU's buffer was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Events an APIC's ring could not hold between two drains.
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }

    /// Every vCPU's lane and the pauses, taken out (for writing at the end).
    pub fn take(&self) -> (Vec<Lane>, Vec<Pause>) {
        let lanes = self
            .lanes
            .iter()
            .map(|l| std::mem::take(&mut *lock(l)))
            .collect();
        (lanes, std::mem::take(&mut *lock(&self.pauses)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use vlapic::fabric::FabricConfig;
    use vlapic::trace::{Source, TraceKind};

    /// An IPI from vCPU 0 to 1 lands in vCPU 1's buffer with its sender; a pause
    /// reads each vCPU's ISR (SDM §11.8.4: acknowledge sets ISR).
    #[test]
    fn drain_moves_events_and_pause_reads_isr() {
        let f = SharedFabric::new(FabricConfig::with_vcpus(2));
        for i in 0..2 {
            f.lapic_mmio_write(i, 0xF0, &0x1FFu32.to_le_bytes(), 0);
        }
        let r = Recorder::new(2);
        r.enable(&f);
        f.lapic_mmio_write(0, 0x310, &(1u32 << 24).to_le_bytes(), 5);
        f.lapic_mmio_write(0, 0x300, &0x41u32.to_le_bytes(), 5);
        assert_eq!(f.plan_entry(1, 6, true).and_then(|p| p.inject), Some(0x41));
        r.drain_all(&f);
        r.pause_from("migration", (7, 9), 3, &f);
        let (lanes, pauses) = r.take();
        assert!(lanes[0].events.is_empty());
        let kinds: Vec<TraceKind> = lanes[1].events.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [
                TraceKind::Accepted {
                    vector: 0x41,
                    level: false,
                    source: Source::Ipi { from: 0 }
                },
                TraceKind::Acknowledged { vector: 0x41 }
            ]
        );
        assert_eq!(pauses[0].isr, [vec![], vec![0x41]]);
        assert_eq!((r.lost(), r.dropped()), (0, 0));
    }

    #[test]
    fn isr_words_to_vectors() {
        let mut w = [0u32; 8];
        w[1] = 1 << 1; // vector 0x21
        w[7] = 1 << 31; // vector 0xFF
        assert_eq!(isr_vectors(&w), [0x21, 0xFF]);
    }
}

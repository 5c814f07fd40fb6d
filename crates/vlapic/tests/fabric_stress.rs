//! Bounded stress test of `SharedFabric` (the threading contract in `fabric.rs`):
//! vCPU threads send IPIs to one another (and a device thread drives an IOAPIC pin);
//! every interrupt is delivered exactly once, none is lost, nobody deadlocks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vlapic::fabric::{FabricConfig, SharedFabric};
use vlapic::Effects;

const THREADS: usize = 8;
const PER_PAIR: u64 = 1000; // 8 × 7 × 1,000 = 56,000 IPIs

#[test]
fn ipis_between_threads_exactly_once() {
    let f = Arc::new(SharedFabric::new(FabricConfig::with_vcpus(THREADS)));
    for i in 0..THREADS {
        f.lapic_mmio_write(i, 0xF0, &0x1FFu32.to_le_bytes(), 0);
    }
    // sent[s][t] / received[s][t]: IPIs from s to t. A sender only sends to t again once
    // t has taken the previous one, so IRR never coalesces two of them: any loss stalls
    // the test (caught by the deadline), any duplicate shows in the counts.
    let sent: Arc<Vec<AtomicU64>> =
        Arc::new((0..THREADS * THREADS).map(|_| AtomicU64::new(0)).collect());
    let received: Arc<Vec<AtomicU64>> =
        Arc::new((0..THREADS * THREADS).map(|_| AtomicU64::new(0)).collect());
    let deadline = Instant::now() + Duration::from_secs(120);
    let handles: Vec<_> = (0..THREADS)
        .map(|me| {
            let (f, sent, received) = (f.clone(), sent.clone(), received.clone());
            std::thread::spawn(move || {
                let vector_of = |s: usize| 0x40 + 0x10 * (s as u8 % 8) + 1;
                loop {
                    let mut busy = false;
                    for t in (0..THREADS).filter(|&t| t != me) {
                        let k = me * THREADS + t;
                        let s = sent[k].load(Ordering::SeqCst);
                        if s < PER_PAIR && received[k].load(Ordering::SeqCst) == s {
                            busy = true;
                            sent[k].store(s + 1, Ordering::SeqCst);
                            // The IPI carries the sender in its vector (one class each).
                            f.lapic_mmio_write(me, 0x310, &((t as u32) << 24).to_le_bytes(), 0);
                            let low = 0x4000 | u32::from(vector_of(me));
                            f.lapic_mmio_write(me, 0x300, &low.to_le_bytes(), 0);
                        }
                    }
                    // Take every pending interrupt, EOI it, count it.
                    loop {
                        let (v, _) = f
                            .with_apic(me, 0, |a| {
                                let v = a.acknowledge();
                                let fx = if v.is_some() {
                                    a.write_register(0xB0, 0, 0)
                                } else {
                                    Effects::default()
                                };
                                (v, fx)
                            })
                            .unwrap();
                        let Some(v) = v else { break };
                        busy = true;
                        let s = usize::from((v - 0x41) / 0x10);
                        received[s * THREADS + me].fetch_add(1, Ordering::SeqCst);
                    }
                    let done = (0..THREADS).filter(|&t| t != me).all(|t| {
                        received[me * THREADS + t].load(Ordering::SeqCst) == PER_PAIR
                            && received[t * THREADS + me].load(Ordering::SeqCst) == PER_PAIR
                    });
                    if done {
                        return;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "stalled: an IPI was lost or a lock is stuck"
                    );
                    if !busy {
                        std::thread::yield_now();
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("vCPU thread");
    }
    for s in 0..THREADS {
        for t in 0..THREADS {
            let want = if s == t { 0 } else { PER_PAIR };
            assert_eq!(
                received[s * THREADS + t].load(Ordering::SeqCst),
                want,
                "{s}->{t}"
            );
        }
    }
}

// Both lock-order directions at once: a device thread drives a level-triggered IOAPIC pin
// (IOAPIC lock → APIC locks) routed lowest-priority to every vCPU, while the vCPUs EOI it
// (APIC lock released → IOAPIC lock) and send lowest-priority IPIs to one another.
// 82093AA remote IRR / SDM §11.6.2.4 lowest priority; bounded: 4 + 1 threads.
// It once stalled ~1 run in 40: vCPU 0's first IPI routed over a stale route map (see
// `routing_change_seen_by_racing_senders` below and BENCHMARKS.md, Soak).
#[test]
fn ioapic_level_and_lowest_priority_under_contention() {
    const VCPUS: usize = 4;
    const LEVEL_ROUNDS: u64 = 1000;
    const LP_PER_VCPU: u64 = 500;
    const LEVEL_VECTOR: u8 = 0xE0;
    let f = Arc::new(SharedFabric::new(FabricConfig::with_vcpus(VCPUS)));
    for i in 0..VCPUS {
        f.lapic_mmio_write(i, 0xF0, &0x1FFu32.to_le_bytes(), 0);
        f.lapic_mmio_write(i, 0xD0, &(1u32 << (24 + i)).to_le_bytes(), 0);
    }
    // Pin 3: level, lowest priority, logical destination 0x0F (all four).
    let rte: u64 = u64::from(LEVEL_VECTOR) | 1 << 8 | 1 << 11 | 1 << 15 | 0x0F << 56;
    f.ioapic_mmio_write(0, &[0x17], 0);
    f.ioapic_mmio_write(0x10, &((rte >> 32) as u32).to_le_bytes(), 0);
    f.ioapic_mmio_write(0, &[0x16], 0);
    f.ioapic_mmio_write(0x10, &(rte as u32).to_le_bytes(), 0);

    let handled = Arc::new(AtomicU64::new(0));
    let lp_sent: Arc<Vec<AtomicU64>> = Arc::new((0..VCPUS).map(|_| AtomicU64::new(0)).collect());
    let lp_received: Arc<Vec<AtomicU64>> =
        Arc::new((0..VCPUS).map(|_| AtomicU64::new(0)).collect());
    let deadline = Instant::now() + Duration::from_secs(120);

    let device = {
        let (f, handled) = (f.clone(), handled.clone());
        std::thread::spawn(move || {
            for k in 0..LEVEL_ROUNDS {
                while handled.load(Ordering::SeqCst) < k {
                    assert!(Instant::now() < deadline, "level interrupt {k} lost");
                    std::thread::yield_now();
                }
                f.set_irq_line(3, true, 0);
            }
        })
    };
    let vcpus: Vec<_> = (0..VCPUS)
        .map(|me| {
            let (f, handled, lp_sent, lp_received) = (
                f.clone(),
                handled.clone(),
                lp_sent.clone(),
                lp_received.clone(),
            );
            std::thread::spawn(move || {
                let lp_vector = 0x50 + 0x10 * me as u8;
                loop {
                    let mut busy = false;
                    let s = lp_sent[me].load(Ordering::SeqCst);
                    if s < LP_PER_VCPU && lp_received[me].load(Ordering::SeqCst) == s {
                        busy = true;
                        lp_sent[me].store(s + 1, Ordering::SeqCst);
                        f.lapic_mmio_write(me, 0x310, &(0x0Fu32 << 24).to_le_bytes(), 0);
                        f.lapic_mmio_write(
                            me,
                            0x300,
                            &(0x4900 | u32::from(lp_vector)).to_le_bytes(),
                            0,
                        );
                    }
                    loop {
                        let (v, _) = f
                            .with_apic(me, 0, |a| (a.acknowledge(), Effects::default()))
                            .unwrap();
                        let Some(v) = v else { break };
                        busy = true;
                        if v == LEVEL_VECTOR {
                            // The handler quiets the device, then EOIs (broadcast to the IOAPIC).
                            f.set_irq_line(3, false, 0);
                            handled.fetch_add(1, Ordering::SeqCst);
                        } else {
                            lp_received[usize::from((v - 0x50) / 0x10)]
                                .fetch_add(1, Ordering::SeqCst);
                        }
                        f.lapic_mmio_write(me, 0xB0, &0u32.to_le_bytes(), 0);
                    }
                    let done = handled.load(Ordering::SeqCst) == LEVEL_ROUNDS
                        && (0..VCPUS).all(|i| lp_received[i].load(Ordering::SeqCst) == LP_PER_VCPU);
                    if done {
                        return;
                    }
                    assert!(Instant::now() < deadline, "stalled");
                    if !busy {
                        std::thread::yield_now();
                    }
                }
            })
        })
        .collect();
    device.join().expect("device thread");
    for h in vcpus {
        h.join().expect("vCPU thread");
    }
    assert_eq!(handled.load(Ordering::SeqCst), LEVEL_ROUNDS);
    let remote_irr = f.with_ioapic(|io| io.entry(3).unwrap() & (1 << 14));
    assert_eq!(remote_irr, 0);
}

// A routing change made before two threads start must be seen by both. Each round
// gives a fresh fabric logical IDs (so its route map is stale), then two threads
// send, at the same instant, a lowest-priority IPI to logical destination 0x03,
// which only the new LDRs match: both IPIs must land. The map used to be marked
// fresh before the rebuilt one was published, so the second sender could route over
// the stale map (no logical IDs) and lose its IPI. SDM §11.6.2.2 (logical
// destination), §11.6.2.4 (lowest priority, one accepting target).
#[test]
fn routing_change_seen_by_racing_senders() {
    const ROUNDS: usize = 3000;
    for round in 0..ROUNDS {
        let f = Arc::new(SharedFabric::new(FabricConfig::with_vcpus(2)));
        for i in 0..2 {
            f.lapic_mmio_write(i, 0xF0, &0x1FFu32.to_le_bytes(), 0);
            f.lapic_mmio_write(i, 0xD0, &(1u32 << (24 + i)).to_le_bytes(), 0);
        }
        let start = Arc::new(std::sync::Barrier::new(2));
        let senders: Vec<_> = (0..2usize)
            .map(|me| {
                let (f, start) = (f.clone(), start.clone());
                std::thread::spawn(move || {
                    f.lapic_mmio_write(me, 0x310, &(0x03u32 << 24).to_le_bytes(), 0);
                    start.wait();
                    let vector = 0x50 + 0x10 * me as u32;
                    f.lapic_mmio_write(me, 0x300, &(0x4900 | vector).to_le_bytes(), 0);
                })
            })
            .collect();
        for s in senders {
            s.join().expect("sender thread");
        }
        let pending: Vec<u8> = (0..2)
            .flat_map(|i| {
                f.read_apic(i, |a| a.irr().iter().collect::<Vec<_>>())
                    .unwrap()
            })
            .collect();
        assert_eq!(pending.len(), 2, "round {round}: IRRs hold {pending:x?}");
    }
}

//! Bounded stress test of `SharedFabric` (the threading contract in `fabric.rs`):
//! 8 vCPU threads send edge IPIs to one another; every IPI is delivered exactly once
//! and nobody deadlocks. SDM §11.6.1 (ICR), §11.8.4 (edge acceptance into IRR).

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

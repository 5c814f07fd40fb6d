//! Issue 2 benchmarks: the arrival → pending → acknowledge → EOI cycle at nesting
//! depth 1, 4 and 15 (verifier off and on), and `pending_vector` on sparse and dense IRR.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use std::hint::black_box;
use vlapic::{Delivery, LapicConfig, LocalApic};

const EOI: u64 = 0xB0;

/// An enabled APIC with `depth - 1` interrupts already in service (classes 1..depth),
/// so one more cycle at class 15 runs at nesting depth `depth`.
fn nested(depth: u8, verify: bool) -> LocalApic {
    let mut a = LocalApic::new(LapicConfig::default());
    let _ = a.write_register(0xF0, 0x1FF, 0);
    for c in 1..depth {
        a.deliver(Delivery::fixed(c << 4), 0);
        a.acknowledge();
    }
    #[cfg(feature = "verify")]
    a.set_verifier_enabled(verify);
    #[cfg(not(feature = "verify"))]
    let _ = verify;
    a
}

fn cycle(c: &mut Criterion) {
    let mut g = c.benchmark_group("cycle");
    for depth in [1u8, 4, 15] {
        for verify in [false, true] {
            if verify && !cfg!(feature = "verify") {
                continue;
            }
            let id = BenchmarkId::new(
                if verify {
                    "verifier-on"
                } else {
                    "verifier-off"
                },
                depth,
            );
            g.bench_with_input(id, &depth, |b, &depth| {
                let mut a = nested(depth, verify);
                b.iter(|| {
                    a.deliver(Delivery::fixed(black_box(0xF3)), 0);
                    let v = a.pending_vector();
                    let acked = a.acknowledge();
                    let fx = a.write_register(EOI, 0, 0);
                    black_box((v, acked, fx))
                });
            });
        }
    }
    g.finish();
}

fn pending(c: &mut Criterion) {
    let mut g = c.benchmark_group("pending");
    let mut sparse = nested(1, false);
    sparse.deliver(Delivery::fixed(0x20), 0);
    g.bench_function("sparse", |b| b.iter(|| black_box(&sparse).pending_vector()));
    let mut dense = nested(1, false);
    for v in 16..=255u8 {
        dense.deliver(Delivery::fixed(v), 0);
    }
    g.bench_function("dense", |b| b.iter(|| black_box(&dense).pending_vector()));
    let mut blocked = nested(1, false);
    blocked.deliver(Delivery::fixed(0x20), 0);
    let _ = blocked.write_register(0x80, 0xF0, 0);
    g.bench_function("sparse-blocked-by-tpr", |b| {
        b.iter(|| black_box(&blocked).pending_vector())
    });
    g.finish();
}

criterion_group!(benches, cycle, pending);
criterion_main!(benches);

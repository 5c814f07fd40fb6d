//! Fabric benchmarks: physical unicast and broadcast at 1, 64 and 1,024 vCPUs (x2APIC
//! mode, IDs 0..N). Unicast must stay flat as N grows; broadcast grows linearly.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use std::hint::black_box;
use vlapic::fabric::{FabricConfig, SharedFabric};
use vlapic::routing::{Destination, Message};
use vlapic::{ApicMode, Delivery, LapicConfig};

const SIZES: [usize; 3] = [1, 64, 1024];

fn vm(n: usize) -> SharedFabric {
    let apics = (0..n)
        .map(|i| LapicConfig::with_id(i as u32).with_mode(ApicMode::X2Apic))
        .collect();
    let f = SharedFabric::new(
        FabricConfig::from_apics(apics)
            .with_ioapic_pins(24)
            .with_ioapic_id(0)
            .with_ioapic_base(vlapic::ioapic::IoApic::DEFAULT_BASE),
    );
    for i in 0..n {
        f.lapic_msr_write(i, 0x80F, 0x1FF, 0).unwrap();
    }
    f
}

fn bench(c: &mut Criterion) {
    // Resolution alone: the map lookup for a physical unicast.
    let mut g = c.benchmark_group("resolve_unicast");
    for n in SIZES {
        let f = vm(n);
        let map = f.route_map();
        let dest = Destination::physical((n - 1) as u32, true);
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                let mut hit = 0usize;
                map.resolve(black_box(&dest), None, |i| hit = i);
                hit
            })
        });
    }
    g.finish();

    // A full unicast IPI: WRMSR ICR on vCPU 0 → route → deliver into the target's IRR.
    let mut g = c.benchmark_group("unicast_ipi");
    for n in SIZES {
        let f = vm(n);
        let icr = (((n - 1) as u64) << 32) | 0x41;
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| f.lapic_msr_write(0, 0x830, black_box(icr), 0))
        });
    }
    g.finish();

    // A physical broadcast (0xFFFFFFFF) fixed interrupt, delivered to every vCPU.
    let mut g = c.benchmark_group("broadcast");
    for n in SIZES {
        let f = vm(n);
        let msg = Message {
            delivery: Delivery::fixed(0x42),
            dest: Destination::physical(u32::MAX, true),
        };
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| f.send(black_box(&msg), 0))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

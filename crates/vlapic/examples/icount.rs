//! Instruction-count harness (issue 14): runs N iterations of one scenario so that
//! `scripts/icount.sh` can run it under `valgrind --tool=callgrind` at two values of N
//! and divide the difference in instructions by the difference in N, which removes
//! process start-up and scenario setup from the figure.
//!
//! ```text
//! cargo run --release -p vlapic --example icount -- <scenario> <N>
//! ```
//!
//! Scenarios:
//!
//! * `cycle-off-D`, `cycle-on-D` (D = nesting depth, e.g. 1, 4, 15): a fixed edge
//!   interrupt at vector 0xF3 arrives (`deliver`), `pending_vector`, `acknowledge`,
//!   then the EOI write to MMIO offset 0xB0, with D − 1 lower-class vectors already in
//!   service; verifier off or on at run time. Without the `verify` feature only
//!   `cycle-off-D` exists (the verifier is compiled out).
//! * `ipi-xapic`: a unicast fixed IPI through [`SharedFabric`]: vCPU 0 writes ICR low
//!   (vector 0x41, physical destination 1, set once in ICR high) → vCPU 1's IRR →
//!   the [`vlapic::fabric::Wake`] naming vCPU 1. Two vCPUs, xAPIC mode.
//! * `ipi-x2apic`: the same through WRMSR 0x830 in x2APIC mode (the criterion
//!   `unicast_ipi` benchmark's operation).
//! * `ioapic-edge`: IOAPIC pin 4, edge-triggered, fixed vector 0x31 to APIC 1: the line
//!   rises (delivery into vCPU 1's IRR and a `Wake`) and falls; one iteration is the pair.
//!
//! With the `trace` feature compiled in, the environment variable `ICOUNT_TRACE=1`
//! turns recording on (every APIC's ring enabled; the cycle drains its APIC's ring
//! every iteration, the fabric scenarios drain the target's every 32 iterations, as
//! a VMM draining after each exit would); unset, the feature is compiled in but off.
//!
//! Every input goes through `black_box` so the loop cannot be folded.

use std::hint::black_box;
use vlapic::fabric::{FabricConfig, SharedFabric};
use vlapic::{ApicMode, Delivery, LapicConfig, LocalApic};

const EOI: u64 = 0xB0;

/// An enabled APIC with `depth - 1` interrupts in service (classes 1..depth).
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
    assert!(!verify, "the verifier is compiled out of this build");
    a
}

/// Whether this run records trace events (`ICOUNT_TRACE=1`, feature `trace`).
fn tracing() -> bool {
    let on = std::env::var_os("ICOUNT_TRACE").is_some_and(|v| v == "1");
    assert!(
        !on || cfg!(feature = "trace"),
        "ICOUNT_TRACE=1 needs the trace feature"
    );
    on
}

/// Drains `vcpu`'s trace ring (feature `trace`; nothing otherwise).
fn drain(_f: &SharedFabric, _vcpu: usize, _i: u64, _trace: bool) {
    #[cfg(feature = "trace")]
    if _trace && _i % 32 == 0 {
        _f.with_apic(_vcpu, 0, |a| {
            a.drain_trace(|e| {
                black_box(e);
            });
            ((), vlapic::Effects::default())
        });
    }
}

fn cycle(depth: u8, verify: bool, n: u64) {
    let mut a = nested(depth, verify);
    let trace = tracing();
    #[cfg(feature = "trace")]
    a.set_trace_enabled(trace);
    for _ in 0..n {
        // The inputs, opaque to the optimiser: vector, VM time, EOI offset.
        let (vector, now, eoi) = black_box((0xF3u8, 0u64, EOI));
        a.deliver(Delivery::fixed(vector), now);
        let v = a.pending_vector();
        let acked = a.acknowledge();
        let fx = a.write_register(eoi, 0, now);
        // What varies, kept once per iteration (the whole Effects would be copied
        // byte by byte; the other fields are constants of this scenario).
        black_box((v, acked, fx.eoi));
        #[cfg(feature = "trace")]
        if trace {
            a.drain_trace(|e| {
                black_box(e);
            });
        }
    }
    let _ = trace;
    #[cfg(feature = "verify")]
    assert_eq!(a.verifier().violations(), 0);
    assert!(a.isr().len() == u32::from(depth) - 1);
}

fn fabric(n_vcpus: usize, x2apic: bool) -> SharedFabric {
    let apics = (0..n_vcpus)
        .map(|i| {
            LapicConfig::with_id(i as u32).with_mode(if x2apic {
                ApicMode::X2Apic
            } else {
                ApicMode::XApic
            })
        })
        .collect();
    let mut cfg = FabricConfig::with_vcpus(n_vcpus);
    cfg.apics = apics;
    let f = SharedFabric::new(cfg);
    let _trace = tracing();
    for i in 0..n_vcpus {
        #[cfg(feature = "trace")]
        f.with_apic(i, 0, |a| {
            a.set_trace_enabled(_trace);
            ((), vlapic::Effects::default())
        });
        if x2apic {
            f.lapic_msr_write(i, 0x80F, 0x1FF, 0).unwrap();
        } else {
            f.lapic_mmio_write(i, 0xF0, &0x1FFu32.to_le_bytes(), 0);
        }
    }
    f
}

fn ipi_xapic(n: u64) {
    let f = fabric(2, false);
    let trace = tracing();
    f.lapic_mmio_write(0, 0x310, &(1u32 << 24).to_le_bytes(), 0);
    let low = 0x41u32.to_le_bytes();
    for i in 0..n {
        drain(&f, 1, i, trace);
        let w = f.lapic_mmio_write(
            black_box(0),
            black_box(0x300),
            black_box(&low),
            black_box(0),
        );
        assert!(w.contains(1));
        black_box(w);
    }
}

fn ipi_x2apic(n: u64) {
    let f = fabric(2, true);
    let trace = tracing();
    let icr = (1u64 << 32) | 0x41;
    for i in 0..n {
        drain(&f, 1, i, trace);
        let w = f
            .lapic_msr_write(black_box(0), black_box(0x830), black_box(icr), black_box(0))
            .unwrap();
        assert!(w.contains(1));
        black_box(w);
    }
}

fn ioapic_edge(n: u64) {
    let f = fabric(2, false);
    let trace = tracing();
    // IOREDTBL pin 4: high half = destination APIC 1, low half = fixed edge 0x31.
    let sel = |i: u32| drop(f.ioapic_mmio_write(0x00, &i.to_le_bytes(), 0));
    let win = |v: u32| drop(f.ioapic_mmio_write(0x10, &v.to_le_bytes(), 0));
    sel(0x10 + 2 * 4 + 1);
    win(1 << 24);
    sel(0x10 + 2 * 4);
    win(0x31);
    for i in 0..n {
        drain(&f, 1, i, trace);
        let w = f.set_irq_line(black_box(4), black_box(true), black_box(0));
        assert!(w.contains(1));
        black_box(w);
        black_box(f.set_irq_line(black_box(4), black_box(false), black_box(0)));
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let scenario = args.next().unwrap_or_default();
    let n: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1000);
    if let Some(rest) = scenario.strip_prefix("cycle-") {
        let (verify, depth) = match rest.split_once('-') {
            Some(("off", d)) => (false, d),
            Some(("on", d)) => (true, d),
            _ => usage(),
        };
        let depth: u8 = depth.parse().unwrap_or_else(|_| usage());
        if !(1..=15).contains(&depth) {
            usage();
        }
        if verify && !cfg!(feature = "verify") {
            eprintln!("the verify feature is compiled out: no cycle-on-*");
            std::process::exit(2);
        }
        cycle(depth, verify, n);
        return;
    }
    match scenario.as_str() {
        "ipi-xapic" => ipi_xapic(n),
        "ipi-x2apic" => ipi_x2apic(n),
        "ioapic-edge" => ioapic_edge(n),
        _ => usage(),
    }
}

fn usage() -> ! {
    eprintln!("usage: icount <cycle-off-D|cycle-on-D|ipi-xapic|ipi-x2apic|ioapic-edge> <N>");
    std::process::exit(2);
}

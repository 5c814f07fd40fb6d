//! Test harness: boots the mini guest (tests/mini/mini.S) on vlapic-kvm with a minimal
//! platform (COM1, 0xF4, fw_cfg CPU count, pc-testdev lines) and reports what happened.

#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_regs;
use vlapic::fabric::{FabricConfig, SharedFabric};
use vlapic::{ApicMode, TimerClock};
use vlapic_kvm::vcpu::VcpuCounters;
use vlapic_kvm::{setup, ApicRuntime, ApicVcpu, Exit, GuestRam, Handled, VmClock};

/// `Some(reason)` when /dev/kvm cannot run these tests; prints the SKIPPED line.
pub fn skip(test: &str) -> bool {
    match setup::kvm_usable() {
        Ok(_) => false,
        Err(e) => {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: {test}: no usable /dev/kvm ({e})"
            );
            true
        }
    }
}

/// The assembled mini guest (once per test binary).
pub fn mini() -> Vec<u8> {
    static IMG: OnceLock<Vec<u8>> = OnceLock::new();
    IMG.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mini");
        let out = std::env::temp_dir().join(format!("vlapic-kvm-mini-{}.elf", std::process::id()));
        let st = Command::new("sh")
            .arg(dir.join("build.sh"))
            .arg(&out)
            .status()
            .expect("sh");
        assert!(st.success(), "building the mini guest failed");
        std::fs::read(&out).expect("mini image")
    })
    .clone()
}

/// What a run showed.
#[derive(Debug, Default)]
pub struct Report {
    pub passed: Vec<String>,
    pub failed: Vec<String>,
    pub exit: Option<u32>,
    pub counters: Vec<VcpuCounters>,
    /// Per vCPU: handled exits by kind.
    pub handled: Vec<Vec<Handled>>,
    pub errors: Vec<String>,
}

impl Report {
    pub fn passed(&self, name: &str) -> bool {
        self.passed.iter().any(|p| p == name)
    }
    pub fn count(&self, vcpu: usize, h: Handled) -> usize {
        self.handled
            .get(vcpu)
            .map_or(0, |v| v.iter().filter(|x| **x == h).count())
    }
}

#[derive(Default)]
struct Platform {
    line: Vec<u8>,
    report: Report,
    key: u16,
    pos: usize,
    vcpus: u8,
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn load(ram: &GuestRam, elf: &[u8]) -> u64 {
    let phoff = u32_at(elf, 0x1C) as usize;
    let phentsize = (u32_at(elf, 0x2A) & 0xFFFF) as usize;
    let phnum = (u32_at(elf, 0x2C) & 0xFFFF) as usize;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(elf, ph) == 1 {
            let (off, pa, sz) = (
                u32_at(elf, ph + 4) as usize,
                u32_at(elf, ph + 12),
                u32_at(elf, ph + 16) as usize,
            );
            ram.write(u64::from(pa), &elf[off..off + sz]).unwrap();
        }
    }
    u64::from(u32_at(elf, 0x18))
}

/// Boots the mini guest on `n` vCPUs with every APIC in `mode`.
pub fn boot_mini(n: usize, mode: ApicMode) -> Report {
    let kvm = setup::kvm_usable().unwrap();
    let vm = kvm.create_vm().unwrap();
    setup::configure_vm(&vm).unwrap();
    let ram = GuestRam::new(64 << 20).unwrap();
    ram.register(&vm, 0).unwrap();
    let entry = load(&ram, &mini());
    let mut cfg = FabricConfig::with_vcpus(n);
    for a in &mut cfg.apics {
        a.mode = mode;
        a.verify = true;
    }
    let fds: Vec<_> = (0..n)
        .map(|i| setup::create_vcpu(&kvm, &vm, &cfg, i).unwrap())
        .collect();
    let regs = kvm_regs {
        rip: entry,
        rax: 0x2BAD_B002,
        ..Default::default()
    };
    setup::enter_protected_mode(&fds[0], &regs).unwrap();
    let clock = VmClock::from_vcpu(&fds[0]).unwrap();
    for a in &mut cfg.apics {
        a.clock = TimerClock {
            bus_cycle_ns: 1,
            tsc_hz: clock.tsc_hz(),
        };
    }
    let rt = ApicRuntime::new(SharedFabric::new(cfg), clock).unwrap();
    let pf = Arc::new(Mutex::new(Platform {
        vcpus: n as u8,
        ..Default::default()
    }));
    let mut threads = Vec::new();
    for (i, fd) in fds.into_iter().enumerate() {
        let mut vcpu = ApicVcpu::new(rt.clone(), i, fd).unwrap();
        let (rt, pf) = (rt.clone(), pf.clone());
        threads.push(std::thread::spawn(move || {
            let mut handled = Vec::new();
            let mut err = None;
            loop {
                let exit = match vcpu.run() {
                    Ok(e) => e,
                    Err(e) => {
                        err = Some(e.to_string());
                        break;
                    }
                };
                let mut p = pf.lock().unwrap();
                match exit {
                    Exit::Handled(h) => {
                        // The harness half of the mini guest's no_tf_leak_after_kick:
                        // its refused RDMSR 0x802 (xAPIC) gets vector 0x46, held back by
                        // TPR 0xF0, and an immediate exit: KVM queues the #GP and
                        // returns before delivering it.
                        if h == Handled::MsrFault(0x802) {
                            rt.msi(0xFEE0_0000, 0x46).unwrap();
                            rt.kicker(i).unwrap().set_immediate_exit();
                        }
                        handled.push(h)
                    }
                    Exit::IoOut(port, data) => {
                        let b = data[0];
                        match port {
                            0x3F8 if b == b'\n' => {
                                let l = String::from_utf8_lossy(&p.line).to_string();
                                if let Some(x) = l.strip_prefix("PASS ") {
                                    p.report.passed.push(x.into());
                                } else if l.starts_with("FAIL") {
                                    p.report.failed.push(l.clone());
                                }
                                p.line.clear();
                            }
                            0x3F8 => p.line.push(b),
                            0xF4 => {
                                p.report.exit = Some(u32::from(b));
                                rt.stop();
                            }
                            0x510 => {
                                p.key = u16::from(b);
                                p.pos = 0;
                            }
                            0x2000..=0x2017 => rt.set_irq_line(u32::from(port - 0x2000), b != 0),
                            _ => {}
                        }
                    }
                    Exit::IoIn(port, data) => {
                        for d in data.iter_mut() {
                            // 0x513: "this harness does its half of the mini guest's
                            // no_tf_leak_after_kick" (see the MsrFault arm above).
                            *d = if port == 0x513 {
                                0x5A
                            } else if port == 0x511 && p.key == 5 {
                                p.pos += 1;
                                if p.pos == 1 {
                                    p.vcpus
                                } else {
                                    0
                                }
                            } else {
                                0xFF
                            };
                        }
                    }
                    Exit::Stopped => break,
                    Exit::Idle | Exit::MmioRead(..) | Exit::MmioWrite(..) => {}
                    other => {
                        err = Some(format!("{other:?}"));
                        rt.stop();
                        break;
                    }
                }
            }
            (vcpu.counters(), handled, err)
        }));
    }
    let t0 = Instant::now();
    while !rt.is_stopped() && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(5));
    }
    rt.stop();
    let mut counters = Vec::new();
    let mut handled = Vec::new();
    let mut errors = Vec::new();
    for t in threads {
        let (c, h, e) = t.join().unwrap();
        counters.push(c);
        handled.push(h);
        errors.extend(e);
    }
    let mut p = pf.lock().unwrap();
    let mut r = std::mem::take(&mut p.report);
    r.counters = counters;
    r.handled = handled;
    r.errors = errors;
    r
}

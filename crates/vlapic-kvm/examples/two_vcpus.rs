//! A whole VMM on vlapic-kvm, in entirely safe Rust: boots the repository's mini
//! guest (a multiboot kernel, assembled here from `tests/mini/mini.S`) on 2 vCPUs with
//! the local APICs and the IOAPIC emulated in userspace, and exits 0 when the guest
//! took its timer interrupts, an IPI on each AP and an IOAPIC interrupt.
//!
//! ```sh
//! cargo run -p vlapic-kvm --example two_vcpus
//! ```
//!
//! The platform is the smallest the guest needs: COM1 output, the isa-debug-exit port
//! 0xF4, fw_cfg's CPU count (0x510/0x511) and pc-testdev's IRQ-line ports (0x2000+pin).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_regs;
use vlapic::fabric::{FabricConfig, SharedFabric};
use vlapic::TimerClock;
use vlapic_kvm::{setup, ApicRuntime, ApicVcpu, Error, Exit, GuestRam, VmClock};

const VCPUS: usize = 2;
const RAM: u64 = 64 << 20;
/// The multiboot v1 magic the loader leaves in EAX.
const BOOT_MAGIC: u64 = 0x2BAD_B002;

/// What the guest's port I/O reaches: a console, fw_cfg, pc-testdev lines, the exit.
#[derive(Default)]
struct Platform {
    console: Vec<u8>,
    passed: Vec<String>,
    failed: usize,
    fw_cfg_key: u16,
    fw_cfg_pos: usize,
    exit: Option<u32>,
}

impl Platform {
    /// A port write; drives IOAPIC lines through `rt`.
    fn port_out(&mut self, rt: &ApicRuntime, port: u16, data: &[u8]) {
        let byte = data.first().copied().unwrap_or(0);
        match port {
            0x3F8 => {
                self.console.push(byte);
                if byte == b'\n' {
                    let line = String::from_utf8_lossy(&self.console)
                        .trim_end()
                        .to_string();
                    println!("{line}");
                    if let Some(name) = line.strip_prefix("PASS ") {
                        self.passed.push(name.into());
                    }
                    self.failed += usize::from(line.starts_with("FAIL"));
                    self.console.clear();
                }
            }
            0xF4 => {
                let mut v = [0u8; 4];
                for (d, s) in v.iter_mut().zip(data) {
                    *d = *s;
                }
                self.exit = Some(u32::from_le_bytes(v));
                rt.stop();
            }
            0x510 => {
                self.fw_cfg_key =
                    u16::from(byte) | u16::from(data.get(1).copied().unwrap_or(0)) << 8;
                self.fw_cfg_pos = 0;
            }
            0x2000..=0x2017 => rt.set_irq_line(u32::from(port - 0x2000), byte != 0),
            _ => {} // the 8259 masks, port 0x80
        }
    }

    /// A port read.
    fn port_in(&mut self, port: u16, data: &mut [u8]) {
        let value: &[u8] = match (port, self.fw_cfg_key) {
            // fw_cfg key 5: the CPU count, little-endian.
            (0x511, 5) => &[VCPUS as u8, 0],
            (0x3FD, _) => &[0x60], // 16550 LSR: transmitter empty
            _ => &[],
        };
        for d in data.iter_mut() {
            *d = match port {
                0x511 => {
                    let b = value.get(self.fw_cfg_pos).copied().unwrap_or(0);
                    self.fw_cfg_pos += 1;
                    b
                }
                _ => value.first().copied().unwrap_or(0xFF),
            };
        }
    }
}

/// Assembles the mini guest with the repository's script (needs binutils).
fn build_guest() -> Result<Vec<u8>, String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mini");
    let out: PathBuf = std::env::temp_dir().join(format!("two-vcpus-{}.elf", std::process::id()));
    let st = Command::new("sh")
        .arg(dir.join("build.sh"))
        .arg(&out)
        .status()
        .map_err(|e| format!("cannot run build.sh: {e}"))?;
    if !st.success() {
        return Err(format!("build.sh failed ({st})"));
    }
    let image = std::fs::read(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let _ = std::fs::remove_file(&out);
    Ok(image)
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, String> {
    b.get(off..off + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| format!("ELF truncated at {off:#x}"))
}

/// Copies an ELF32 image's loadable segments to their physical addresses; returns
/// the entry point.
fn load_elf32(ram: &GuestRam, elf: &[u8]) -> Result<u64, String> {
    if elf.get(..4) != Some(b"\x7fELF") {
        return Err("not an ELF image".into());
    }
    let entry = u32_at(elf, 0x18)?;
    let phoff = u32_at(elf, 0x1C)? as usize;
    let half = |off: usize| u32_at(elf, off).map(|v| (v & 0xFFFF) as usize);
    let (phentsize, phnum) = (half(0x2A)?, half(0x2C)?);
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(elf, ph)? != 1 {
            continue; // not PT_LOAD
        }
        let (off, paddr, filesz) = (
            u32_at(elf, ph + 4)?,
            u32_at(elf, ph + 12)?,
            u32_at(elf, ph + 16)?,
        );
        let bytes = elf
            .get(off as usize..off as usize + filesz as usize)
            .ok_or("segment outside the file")?;
        ram.write(u64::from(paddr), bytes)
            .map_err(|e| e.to_string())?;
    }
    Ok(u64::from(entry))
}

/// One vCPU thread: the adapter does the APIC work; we serve the ports.
fn vcpu_thread(
    mut vcpu: ApicVcpu,
    rt: Arc<ApicRuntime>,
    pf: Arc<Mutex<Platform>>,
) -> Result<(), String> {
    let me = vcpu.index();
    loop {
        let exit = vcpu.run().map_err(|e| e.to_string())?;
        let mut p = pf.lock().map_err(|_| "platform lock poisoned")?;
        match exit {
            Exit::IoOut(port, data) => p.port_out(&rt, port, data),
            Exit::IoIn(port, data) => p.port_in(port, data),
            Exit::MmioRead(_, data) => data.fill(0xFF),
            Exit::Stopped => return Ok(()),
            Exit::AllStopped => {
                rt.stop();
                return Err("every vCPU stopped".into());
            }
            Exit::Handled(_) | Exit::Idle | Exit::MmioWrite(..) => {}
            other => {
                rt.stop();
                return Err(format!("vCPU {me}: {other:?}"));
            }
        }
    }
}

fn run() -> Result<bool, String> {
    let e = |e: Error| e.to_string();
    let image = build_guest()?;
    let kvm = setup::kvm_usable().map_err(e)?;
    let vm = kvm
        .create_vm()
        .map_err(|x| e(Error::kvm("KVM_CREATE_VM", x)))?;
    setup::configure_vm(&vm).map_err(e)?;
    let ram = GuestRam::new(RAM).map_err(e)?;
    ram.register(&vm, 0).map_err(e)?;
    let entry = load_elf32(&ram, &image)?;

    // The APICs: default configuration (xAPIC, x2APIC and TSC-deadline offered).
    let mut cfg = FabricConfig::with_vcpus(VCPUS);
    let mut fds = Vec::new();
    for i in 0..VCPUS {
        fds.push(setup::create_vcpu(&kvm, &vm, &cfg, i).map_err(e)?);
    }
    let regs = kvm_regs {
        rip: entry,
        rax: BOOT_MAGIC,
        ..Default::default()
    };
    setup::enter_protected_mode(&fds[0], &regs).map_err(e)?;
    // VM time from the guest TSC; the APIC timers count in it.
    let clock = VmClock::from_vcpu(&fds[0]).map_err(e)?;
    for a in &mut cfg.apics {
        a.clock = TimerClock {
            bus_cycle_ns: 1,
            tsc_hz: clock.tsc_hz(),
        };
    }
    let rt = ApicRuntime::new(SharedFabric::new(cfg), clock).map_err(e)?;

    let pf = Arc::new(Mutex::new(Platform::default()));
    let mut threads = Vec::new();
    for (i, fd) in fds.into_iter().enumerate() {
        let vcpu = ApicVcpu::new(rt.clone(), i, fd).map_err(e)?;
        let (rt, pf) = (rt.clone(), pf.clone());
        threads.push(std::thread::spawn(move || vcpu_thread(vcpu, rt, pf)));
    }
    let start = Instant::now();
    while !rt.is_stopped() && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(10));
    }
    rt.stop();
    let mut failed = Vec::new();
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(m)) => failed.push(m),
            Err(_) => failed.push("a vCPU thread panicked".into()),
        }
    }
    let p = pf.lock().map_err(|_| "platform lock poisoned")?;
    let (exit, fails) = (p.exit, p.failed);
    // What this example promises: timer, IPI and IOAPIC interrupts taken.
    let wanted = [
        "timer_oneshot",
        "timer_from_hlt_100",
        "ipi_to_aps",
        "ioapic_edge_and_level",
    ];
    let missing: Vec<&str> = wanted
        .into_iter()
        .filter(|w| !p.passed.iter().any(|x| x == w))
        .collect();
    drop(p);
    let taken: Vec<u64> = (0..VCPUS)
        .map(|i| {
            rt.fabric()
                .read_apic(i, |a| a.stats().accepted)
                .unwrap_or(0)
        })
        .collect();
    println!(
        "two_vcpus: guest exit {exit:?}, interrupts accepted per vCPU {taken:?}, {:?}",
        start.elapsed()
    );
    for f in &failed {
        eprintln!("two_vcpus: {f}");
    }
    if !missing.is_empty() {
        eprintln!("two_vcpus: missing PASS lines: {missing:?}");
    }
    Ok(exit == Some(0)
        && fails == 0
        && missing.is_empty()
        && failed.is_empty()
        && taken.iter().all(|&n| n > 0))
}

fn main() -> ExitCode {
    if let Err(why) = setup::kvm_usable() {
        eprintln!("SKIPPED: two_vcpus needs a usable /dev/kvm ({why})");
        return ExitCode::SUCCESS;
    }
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(m) => {
            eprintln!("two_vcpus: {m}");
            ExitCode::from(2)
        }
    }
}

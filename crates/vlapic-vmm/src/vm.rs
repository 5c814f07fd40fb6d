//! KVM VM setup without an in-kernel irqchip (user-space MSR exits, MSR filter for
//! APIC_BASE and TSC_DEADLINE, CPUID, boot registers) and a run from boot or restore to its vCPU threads.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vlapic::fabric::{FabricConfig, SharedFabric};
use vlapic::{ApicMode, LapicConfig, TimerClock};
use vlapic_kvm::{setup, ApicRuntime, RunState, VmClock};

use crate::boot::{self, Boot};
use crate::clocks::{ClockDevices, Clocks, IrqSink};
use crate::console::ConsoleOut;
use crate::devices::IoBus;
use crate::gate::MigrationGate;
use crate::incoming;
use crate::memory::GuestRam;
use crate::outcome::Outcome;
use crate::run_end::{finish_run, RunEnd};
use crate::savefile::{
    self, SaveFile, FLAG_KVM_APIC, FLAG_LINUX_CPUID, FLAG_VERIFY, FLAG_X2APIC, PAGE,
};
use crate::shared::{Shared, MAX_VCPUS};
use crate::stats::{ExitStats, Odd};
use crate::stream::LiveStats;
use crate::summary::RunReport;
use crate::supervisor::Supervisor;
use crate::vcpu::{run_vcpu, Vcpu};
use crate::{snapshot, VmmError};

pub use crate::config::{MigrateTo, SaveTo, VmConfig};

const IA32_TSC: u32 = 0x10;

fn setup(e: impl std::fmt::Display, what: &str) -> VmmError {
    VmmError::Setup(format!("{what}: {e}"))
}

/// Checks that /dev/kvm can run our VMs; `Err` says why not.
pub fn kvm_usable() -> Result<(), String> {
    setup::kvm_usable().map(|_| ()).map_err(|e| e.to_string())
}

/// A VM with `ram` as its memory: with KVM's in-kernel irqchip for comparison, else
/// prepared for the userspace APIC by vlapic-kvm (MSR exits and filter).
fn create_vm(
    kvm: &Kvm,
    ram: &GuestRam,
    kernel_irqchip: bool,
    dirty_log: bool,
) -> Result<VmFd, VmmError> {
    let vm = kvm.create_vm().map_err(|e| setup(e, "KVM_CREATE_VM"))?;
    if kernel_irqchip {
        vm.create_irq_chip()
            .map_err(|e| setup(e, "KVM_CREATE_IRQCHIP"))?;
        // KVM_GET/SET_LAPIC with the full 32-bit x2APIC ID (vlapic::state::kvm's
        // convention) instead of the legacy `id << 24`.
        let mut cap = kvm_bindings::kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_X2APIC_API,
            ..Default::default()
        };
        cap.args[0] = u64::from(kvm_bindings::KVM_X2APIC_API_USE_32BIT_IDS);
        vm.enable_cap(&cap)
            .map_err(|e| setup(e, "KVM_ENABLE_CAP(X2APIC_API)"))?;
        vm.set_tss_address(0xFFFB_D000)
            .map_err(|e| setup(e, "KVM_SET_TSS_ADDR"))?;
        let _ = vm.set_identity_map_address(0xFFFB_C000);
    } else {
        setup::configure_vm(&vm).map_err(|e| VmmError::Setup(e.to_string()))?;
    }
    ram.register_logged(&vm, dirty_log)
        .map_err(VmmError::Setup)?;
    Ok(vm)
}

/// Boots the guest described by `cfg` (or restores `cfg.restore`) and runs it to
/// the end (or, with `cfg.save`, to the save).
pub fn run_vm(cfg: &VmConfig) -> Result<RunReport, VmmError> {
    // A save file is read and checked completely before anything else.
    if (cfg.migrate_to.is_some() || cfg.incoming.is_some())
        && (cfg.migrate_every.is_some_and(|d| !d.is_zero()) || cfg.save.is_some())
    {
        return Err(VmmError::Setup(
            "--incoming/--migrate-to cannot be combined with --migrate-every or --save".into(),
        ));
    }
    #[cfg(not(feature = "trace"))]
    if cfg.trace.is_some() {
        return Err(VmmError::Setup(
            "--trace: this build has no recorder (vlapic-vmm feature `trace`)".into(),
        ));
    }
    #[cfg(feature = "trace")]
    let mut tracer =
        crate::trace_json::TraceFile::create(cfg.trace.as_deref(), cfg.kernel_irqchip)?;
    // `--incoming`: the VM arrives whole (RAM and a save file without memory) first.
    let mut incoming = None;
    let mut ram_in = None;
    let restore = match (&cfg.restore, &cfg.incoming) {
        (Some(p), _) => {
            let what = |e: String| VmmError::SaveFile(format!("{}: {e}", p.display()));
            let bytes = savefile::read_file(p).map_err(what)?;
            Some(SaveFile::decode(&bytes).map_err(what)?)
        }
        (None, Some(addr)) => {
            kvm_usable().map_err(VmmError::Setup)?;
            let l = incoming::listen(addr).map_err(VmmError::Setup)?;
            let mut inc =
                incoming::receive(l, addr, cfg.incoming_timeout).map_err(VmmError::Incoming)?;
            ram_in = inc.ram.take();
            let f = inc.file.take();
            incoming = Some(inc);
            f
        }
        (None, None) => None,
    };
    // Later problems with the file's contents (refused by KVM or the library).
    let bad = |m: String| match &cfg.incoming {
        Some(a) if cfg.restore.is_none() => {
            VmmError::Incoming(format!("incoming migration from {a} refused: {m}"))
        }
        _ => VmmError::SaveFile(format!(
            "{}: {m}",
            cfg.restore
                .as_deref()
                .unwrap_or(std::path::Path::new(""))
                .display()
        )),
    };
    let (n, memory_mib, x2apic, verify) = match &restore {
        Some(f) => (
            f.header.vcpus as usize,
            f.header.memory_mib,
            f.header.flags & FLAG_X2APIC != 0,
            f.header.flags & FLAG_VERIFY != 0,
        ),
        None => (cfg.vcpus, cfg.memory_mib, cfg.x2apic, cfg.verify),
    };
    let migrate_every = match &restore {
        Some(f) if cfg.migrate_every.is_none() && f.header.migrate_every_us > 0 => {
            Some(Duration::from_micros(f.header.migrate_every_us))
        }
        _ => cfg.migrate_every,
    }
    .filter(|d| !d.is_zero());
    if n == 0 || n > MAX_VCPUS {
        return Err(VmmError::Setup(format!(
            "--vcpus {n}: must be 1 to {MAX_VCPUS}"
        )));
    }
    if let Some(s) = &cfg.save {
        let dir = s
            .path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        if !dir.is_dir() {
            return Err(VmmError::Setup(format!(
                "--save {}: directory {} does not exist",
                s.path.display(),
                dir.display()
            )));
        }
    }
    // The image first: a malformed one is reported the same with or without KVM.
    let ram = match ram_in.take() {
        Some(r) => r,
        None => GuestRam::new(memory_mib).map_err(VmmError::Setup)?,
    };
    let boot = match &restore {
        None => Some(boot::load_image(
            &ram,
            &cfg.kernel,
            &cfg.cmdline,
            &cfg.modules,
            &cfg.initrd,
            n,
        )?),
        Some(f) => {
            for (i, page) in f.memory.index.iter().zip(f.memory.data.chunks(PAGE)) {
                ram.write(u64::from(*i) * PAGE as u64, page).map_err(bad)?;
            }
            None
        }
    };
    kvm_usable().map_err(VmmError::Setup)?;
    let kvm = Kvm::new().map_err(|e| setup(e, "/dev/kvm"))?;
    if cfg.kernel_irqchip
        && (migrate_every.is_some() || cfg.save.is_some() || cfg.restore.is_some())
    {
        return Err(VmmError::Setup(
            "--migrate-every, --save and --restore need the userspace irqchip (not --irqchip kernel)"
                .into(),
        ));
    }
    // KVM's APIC model (no CMCI, no directed EOI): on its in-kernel irqchip, and on
    // vlapic for a VM that came from there.
    let kvm_model = cfg.kernel_irqchip
        || restore
            .as_ref()
            .is_some_and(|f| f.header.flags & FLAG_KVM_APIC != 0);
    if cfg.kernel_irqchip && restore.is_some() && !kvm_model {
        return Err(bad(
            "its APICs were vlapic's model (CMCI, directed EOI), not KVM's in-kernel APIC's; \
             run the destination on vlapic (without --irqchip kernel)"
                .into(),
        ));
    }
    let vm = Arc::new(create_vm(
        &kvm,
        &ram,
        cfg.kernel_irqchip,
        cfg.migrate_to.is_some(),
    )?);
    if let Some(f) = &restore {
        // kvmclock (Linux's clocksource) resumes where the guest last read it: its own
        // pvclock page (saved RAM) read at the saved guest TSC.
        let msr = f
            .vcpus
            .first()
            .and_then(|v| v.kvm.msr(crate::kvmclock::MSR_KVM_SYSTEM_TIME_NEW));
        if let Some(ns) =
            msr.and_then(|m| crate::kvmclock::guest_reading(&ram, m, f.header.guest_tsc))
        {
            crate::kvmclock::set(&vm, ns).map_err(bad)?;
        }
    }
    let mut base_cpuid =
        setup::supported_cpuid(&kvm).map_err(|e| VmmError::Setup(e.to_string()))?;
    let linux_cpuid = matches!(boot, Some(Boot::Linux(_)))
        || restore
            .as_ref()
            .is_some_and(|f| f.header.flags & FLAG_LINUX_CPUID != 0);
    if linux_cpuid {
        // This host's emulator runs Linux's CPL0 code and lacks CMPXCHG16B and XRSTOR.
        vlapic_kvm::cpuid::hide_unemulated(&mut base_cpuid);
    }
    // The APICs (their clock is set once the guest TSC rate is known); CPUID is
    // derived from them.
    let mut fabric_cfg = FabricConfig::with_vcpus(n);
    fabric_cfg.ioapic_id = n as u8;
    fabric_cfg.apics = (0..n)
        .map(|i| {
            LapicConfig::default()
                .with_apic_id(i as u32)
                .with_bsp(i == 0)
                .with_mode(if x2apic {
                    ApicMode::X2Apic
                } else {
                    ApicMode::XApic
                })
                .with_x2apic(true)
                .with_tsc_deadline(true)
                .with_verify(verify)
                .with_cmci(!kvm_model)
                .with_eoi_broadcast_suppression(!kvm_model)
        })
        .collect();
    let make_vcpu = |vm: &VmFd, i: usize| -> Result<VcpuFd, String> {
        setup::create_vcpu_with(vm, &base_cpuid, &fabric_cfg, i)
            .map_err(|e| format!("vCPU {i}: {e}"))
    };
    let mut fds = Vec::with_capacity(n);
    for i in 0..n {
        fds.push(make_vcpu(&vm, i).map_err(VmmError::Setup)?);
    }
    if cfg.kernel_irqchip && x2apic && restore.is_none() {
        for (i, fd) in fds.iter().enumerate() {
            let base = 0xFEE0_0000u64 | 0xC00 | if i == 0 { 0x100 } else { 0 };
            let m = Msrs::from_entries(&[kvm_msr_entry {
                index: 0x1B,
                data: base,
                ..Default::default()
            }])
            .map_err(|e| setup(format!("{e:?}"), "MSR list"))?;
            fd.set_msrs(&m)
                .map_err(|e| setup(e, "KVM_SET_MSRS(IA32_APIC_BASE)"))?;
        }
    }
    let msr_list = if migrate_every.is_some() || cfg.save.is_some() || cfg.migrate_to.is_some() {
        snapshot::msr_list(&kvm).map_err(VmmError::Setup)?
    } else {
        Vec::new()
    };
    let Some(bsp) = fds.first() else {
        return Err(VmmError::Setup("no vCPU".into()));
    };

    // VM time from the guest TSC.
    let mut tsc_khz = bsp.get_tsc_khz().map_err(|e| setup(e, "KVM_GET_TSC_KHZ"))?;
    if let Some(f) = &restore {
        // The guest keeps the TSC rate it was saved with (KVM scales it if the
        // host's differs and can), then every vCPU gets its saved state.
        let want = u32::try_from(f.header.tsc_hz / 1000).unwrap_or(u32::MAX);
        if want != tsc_khz {
            for fd in &fds {
                fd.set_tsc_khz(want).map_err(|e| {
                    VmmError::Setup(format!(
                        "the saved guest TSC ran at {want} kHz, this host's at {tsc_khz} kHz, \
                         and KVM_SET_TSC_KHZ failed: {e}"
                    ))
                })?;
            }
            tsc_khz = want;
        }
        for (i, (fd, v)) in fds.iter().zip(&f.vcpus).enumerate() {
            // IA32_TSC as saved: hosts that honour the write resume VM time where
            // it stopped; this one (kvm_pvm) ignores it and time has moved on.
            v.kvm
                .restore(fd, || f.header.guest_tsc)
                .map_err(|e| bad(format!("VCPU {i}: KVM refused the state: {e}")))?;
        }
    }
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: IA32_TSC,
        ..Default::default()
    }])
    .map_err(|e| setup(format!("{e:?}"), "MSR list"))?;
    let host0 = VmClock::host_tsc();
    bsp.get_msrs(&mut msrs)
        .map_err(|e| setup(e, "KVM_GET_MSRS(IA32_TSC)"))?;
    let guest0 = msrs.as_slice().first().map_or(0, |m| m.data);
    let tsc_hz = u64::from(tsc_khz) * 1000;
    let clock = VmClock::new(host0, guest0, tsc_hz);

    if let Some(b) = &boot {
        boot::boot_bsp(bsp, b)?;
    }

    let mut fabric_cfg = fabric_cfg.clone();
    for a in &mut fabric_cfg.apics {
        a.clock = TimerClock {
            bus_cycle_ns: 1,
            tsc_hz,
        };
    }
    let chip = SharedFabric::new(fabric_cfg.clone());
    let exits = Arc::new(ExitStats::new(n));
    let (console, io) = match &restore {
        None => {
            let console = ConsoleOut::new(cfg.console, Some(exits.clone()));
            let io = IoBus::new(console.clone(), n as u16, ram.size());
            (console, io)
        }
        Some(f) => {
            // The APICs and the IOAPIC through the library's import, against VM
            // time now (timers that expired meanwhile fire at once).
            let state = vlapic::state::native::decode_fabric(&f.fabric)
                .map_err(|e| bad(format!("FABR: {e:?}")))?;
            let _wake = chip
                .import(&state, clock.now_ns())
                .map_err(|e| bad(format!("FABR: import refused: {e:?}")))?;
            if cfg.kernel_irqchip {
                // Validated by the import above; now into KVM's own irqchip.
                let runs: Vec<RunState> = f.vcpus.iter().map(|v| v.run).collect();
                let tclock = TimerClock {
                    bus_cycle_ns: 1,
                    tsc_hz,
                };
                crate::kernel_chip::load(&vm, &fds, &state, &runs, clock.now_ns(), &tclock)
                    .map_err(|e| bad(format!("KVM's irqchip refused the state: {e}")))?;
            }
            for (i, v) in f.vcpus.iter().enumerate() {
                exits.seed(i, &v.exits);
            }
            let console = ConsoleOut::with_log(cfg.console, Some(exits.clone()), f.console.clone());
            let io =
                IoBus::restore(console.clone(), n as u16, ram.size(), &f.devices).map_err(bad)?;
            let (c, first) = f.stats.odd[0];
            io.unknown_ports.set(c, first);
            (console, io)
        }
    };
    // The 8259 pair: its state from the file (PIC8; KVM's own PIC holds it with
    // `--irqchip kernel`), and its INTA as the BSP's ExtINT source.
    if let Some(p) = restore.as_ref().and_then(|f| f.pic) {
        if cfg.kernel_irqchip {
            crate::kernel_chip::load_pic(&vm, &p)
                .map_err(|e| bad(format!("KVM's 8259s refused the state: {e}")))?;
        } else {
            io.pic.restore(p);
        }
    }
    let pic = io.pic.clone();
    let extint: vlapic_kvm::runtime::ExtIntSource =
        Arc::new(move || pic.acknowledge_if_requested());
    let rt = ApicRuntime::with_options(
        chip,
        clock.clone(),
        vlapic_kvm::PollConfig::default(),
        Some(extint),
    )
    .map_err(|e| VmmError::Setup(e.to_string()))?;
    // The xAPIC page may not be moved over guest RAM (see ApicRuntime::refuse_apic_page_in).
    let ram_range = 0..ram.size();
    rt.refuse_apic_page_in(vec![ram_range]);
    // pc-testdev's page-flush port acts on guest RAM (alive until the end of run_vm).
    let io = io.with_ram(ram.host_base().map_err(VmmError::Setup)?, ram.size());
    // The HPET and the RTC: as saved, or at power-on with the RTC showing the host's
    // wall clock (UTC), read this once.
    let clock_devices = match restore
        .as_ref()
        .and_then(|f| f.clocks.clone().map(|d| (f, d)))
    {
        Some((f, mut d)) => {
            d.rebase(f.header.vm_ns, clock.now_ns());
            d
        }
        None => {
            let unix = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
            ClockDevices::new(unix, clock.now_ns(), ram.size())
        }
    };
    let sink: IrqSink = if cfg.kernel_irqchip {
        let vm = vm.clone();
        Box::new(move |pin, level| {
            let _ = vm.set_irq_line(pin, level);
        })
    } else {
        let rt = rt.clone();
        Box::new(move |pin, level| rt.set_irq_line(pin, level))
    };
    let clocks = Arc::new(Clocks::new(clock_devices, clock.clone(), sink));
    let carry = restore
        .as_ref()
        .map_or((0, 0), |f| (f.stats.max_nesting, f.stats.violations));
    let sh = Arc::new(Shared {
        rt,
        fabric_cfg,
        verifier_carry: Mutex::new(carry),
        io,
        clocks: clocks.clone(),
        outcome: Mutex::new(None),
        done: Condvar::new(),
        wild_mmio: Odd::default(),
        msr_gp: Odd::default(),
        soft_ints: Odd::default(),
        soft_int_ram: cfg.soft_interrupts.then(|| ram.memory().clone()),
        exits,
        migration: MigrationGate::new(n),
        msr_list,
        kernel_irqchip: cfg.kernel_irqchip.then(|| vm.clone()),
        #[cfg(feature = "trace")]
        trace: tracer.as_mut().map(|t| t.recorder(n)),
    });
    #[cfg(feature = "trace")]
    if let Some(t) = &sh.trace {
        t.enable(&sh.chip());
        if restore.is_some() && incoming.is_none() {
            let now = clock.now_ns();
            t.pause_from("restore", (now, now), 0, &sh.chip());
        }
    }
    let prior = restore.as_ref().map_or(Duration::ZERO, |f| {
        Duration::from_nanos(f.header.elapsed_ns)
    });
    if let Some(f) = &restore {
        let st = &f.stats;
        sh.wild_mmio.set(st.odd[1].0, st.odd[1].1);
        sh.msr_gp.set(st.odd[2].0, st.odd[2].1);
        let g = &sh.migration;
        g.done.store(st.migrations, Ordering::Relaxed);
        g.max_downtime_us
            .store(st.max_downtime_us, Ordering::Relaxed);
        g.nested_migrations
            .store(st.nested_migrations, Ordering::Relaxed);
        g.max_in_service.store(st.max_in_service, Ordering::Relaxed);
    }

    // `--incoming`: the commit handshake; only after it do the vCPUs run.
    let mut live_in: Option<LiveStats> = None;
    if let Some(inc) = incoming.as_mut() {
        inc.take_over().map_err(VmmError::Incoming)?;
        let d = inc.stats.downtime_us.unwrap_or(0);
        sh.migration.max_downtime_us.fetch_max(d, Ordering::Relaxed);
        #[cfg(feature = "trace")]
        if let Some(t) = &sh.trace {
            let now = clock.now_ns();
            t.pause_from("incoming", (now, now), d, &sh.chip());
        }
        live_in = Some(inc.stats.clone());
    }
    drop(incoming);

    let clocks_thread = {
        let c = clocks.clone();
        std::thread::Builder::new()
            .name("hpet-rtc".into())
            .spawn(move || c.run())
            .map_err(|e| VmmError::Setup(format!("cannot start the HPET/RTC thread: {e}")))?
    };
    let start = Instant::now();
    let mut handles = Vec::with_capacity(n);
    for (i, fd) in fds.into_iter().enumerate() {
        let saved = restore.as_ref().and_then(|f| f.vcpus.get(i));
        let v = Vcpu {
            index: i,
            fd,
            start: match saved {
                Some(s) => s.run,
                None if i == 0 => RunState::Running,
                None => RunState::WaitForSipi,
            },
            carried: saved.map(|s| s.events).unwrap_or_default(),
            counters: saved.map_or([0; 4], |s| [s.interrupts, s.nmis, s.sipis, 0]),
        };
        let s = sh.clone();
        match std::thread::Builder::new()
            .name(format!("vcpu{i}"))
            .spawn(move || run_vcpu(v, s))
        {
            Ok(h) => handles.push(h),
            Err(e) => {
                sh.finish(Outcome::VmmError(format!(
                    "cannot start vCPU thread {i}: {e}"
                )));
                break;
            }
        }
    }

    // Wait for the end or the deadline, migrating on the way if asked.
    let make_vm = |kvm: &Kvm| create_vm(kvm, &ram, false, false).map_err(|e| e.to_string());
    let supervisor = Supervisor {
        sh: &sh,
        kvm: &kvm,
        ram: &ram,
        console: &console,
        make_vm: &make_vm,
        make_vcpu: &make_vcpu,
        header: savefile::Header {
            vcpus: n as u32,
            memory_mib,
            flags: if x2apic { FLAG_X2APIC } else { 0 }
                | if verify { FLAG_VERIFY } else { 0 }
                | if kvm_model { FLAG_KVM_APIC } else { 0 }
                | if linux_cpuid { FLAG_LINUX_CPUID } else { 0 },
            tsc_hz,
            ..Default::default()
        },
        prior,
        start,
        timeout: cfg.timeout,
        migrate_every,
        save: cfg.save.clone(),
        migrate_to: cfg.migrate_to.clone(),
    };
    let (vm, live_out) = supervisor.watch(vm);

    Ok(finish_run(
        &sh,
        RunEnd {
            handles,
            clocks_thread,
            vm,
            clock,
            kernel_irqchip: cfg.kernel_irqchip,
            prior,
            start,
            tsc_hz,
            console,
            live_in,
            live_out,
            #[cfg(feature = "trace")]
            tracer,
        },
    ))
}

//! `vlapic run` boots a multiboot guest under KVM with its APICs in vlapic and prints
//! the summary; `vlapic bench` compares vlapic with KVM's in-kernel irqchip.

use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use vlapic_vmm::loader::multiboot_cmdline;
use vlapic_vmm::outgoing::PreCopy;
use vlapic_vmm::summary::ExitRules;
use vlapic_vmm::{exit_code, run_vm, ConsoleSink, MigrateTo, Module, Outcome, SaveTo, VmConfig};

/// `vlapic run --help` epilogue: the exit status conventions.
pub const RUN_AFTER_HELP: &str = "\
Command line: with --kernel FILE the guest's multiboot command line is FILE (as given),
a space, then --append, as QEMU and GRUB build it (kvm-unit-tests take argv[0] from it);
the built-in test guest gets --append alone.

Exit status:
  --kernel FILE     the guest wrote N to isa-debug-exit (port 0xF4): (N << 1) | 1, low
                    8 bits, as QEMU (kvm-unit-tests: 1 pass, 3 fail, 77 skip); the
                    summary still says what happened
  built-in guest    0: it ended, nothing failed and something passed; 1: a scenario
                    failed, none ran, or it ended without reporting
  either            2 setup error (bad argument, /dev/kvm, image, --restore file);
                    3 timeout; 4 guest crash; 5 VMM error; a --kernel guest that stops
                    without the write: 0 or 1 as the built-in guest
  --save            0 when the state was saved; --restore runs follow the built-in
                    guest's rules";

/// Arguments of `vlapic run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Kernel: multiboot v1 (ELF32/ELF64 or a.out kludge), or Linux (a bzImage, or a
    /// vmlinux with a PVH note); default: the built-in test guest.
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "")]
    pub append: String,
    /// Initial ramdisk for a Linux --kernel.
    #[arg(long, value_name = "FILE", requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Boot module (repeatable); its command line is the file name.
    #[arg(long, value_name = "FILE")]
    pub module: Vec<PathBuf>,
    /// Number of vCPUs (1–64).
    #[arg(long, default_value_t = 4)]
    pub vcpus: usize,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory: u64,
    /// Start every local APIC in x2APIC mode.
    #[arg(long)]
    pub x2apic: bool,
    /// Run the APIC nesting verifier (`--verify false` to turn it off).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub verify: bool,
    /// Wall-clock limit in seconds (0: none). On expiry each vCPU's state is printed.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// Print the summary as one JSON object on stdout (guest console goes to stderr).
    /// The object has `"schema": 1`; its keys are stable within a schema version:
    /// `outcome` is `{kind, code, message, text}`, `done` is `{line, passed, failed,
    /// skipped}` or null, numbers (addresses and ports too) are JSON integers, and
    /// what does not exist is null, never 0. See docs/vmm.md.
    #[arg(long)]
    pub json: bool,
    /// Do not copy the guest console to the terminal.
    #[arg(long)]
    pub quiet: bool,
    /// Interrupt controllers: `user` (vlapic, the default) or `kernel` (KVM's own, for comparison).
    #[arg(long, value_enum, default_value = "user")]
    pub irqchip: IrqchipArg,
    /// Live-migrate the VM into a brand-new KVM VM every MS milliseconds (0: never).
    /// Default: every 10 ms for the built-in test guest on vlapic (the main job), never
    /// for a `--kernel` image or with `--irqchip kernel`.
    #[arg(long, value_name = "MS")]
    pub migrate_every: Option<u64>,
    /// After `--save-after` ms, pause every vCPU, write the whole VM to FILE and exit
    /// (0 = saved). If the guest ends first, the run is reported as usual and nothing is saved.
    #[arg(long, value_name = "FILE")]
    pub save: Option<PathBuf>,
    /// When `--save` pauses the VM: milliseconds of wall time after the start.
    #[arg(long, value_name = "MS", default_value_t = 500, requires = "save")]
    pub save_after: u64,
    /// Start from a save file written by `--save` (in this or another process)
    /// instead of booting; vCPUs, memory, x2APIC and verifier settings come from it.
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with_all = ["kernel", "append", "module", "vcpus", "memory", "x2apic", "verify", "irqchip"]
    )]
    pub restore: Option<PathBuf>,
    /// Live migration between processes: wait on ADDR (`unix:PATH` or `tcp:HOST:PORT`)
    /// for a VM sent by `--migrate-to`, and run it (after the commit handshake)
    /// instead of booting; vCPUs, memory, x2APIC, verifier and the console transcript
    /// come with it. A foreign, newer or corrupt stream, or a source that goes away
    /// before its commit, ends this process with one line and exit code 2, having
    /// run nothing. May be combined with `--migrate-to` to pass the VM on (a chain),
    /// and with `--irqchip kernel` to run it on KVM's in-kernel irqchip (a VM that
    /// started there). The stream format: docs/migration-stream.md.
    #[arg(
        long,
        value_name = "ADDR",
        value_parser = parse_addr,
        conflicts_with_all = ["kernel", "append", "module", "vcpus", "memory", "x2apic", "verify", "restore", "save", "migrate_every"]
    )]
    pub incoming: Option<vlapic_vmm::stream::Addr>,
    /// How long `--incoming` waits for a source to connect, in milliseconds (default:
    /// for ever). Nobody in time: one line, exit code 2, nothing run.
    #[arg(long, value_name = "MS", requires = "incoming")]
    pub incoming_timeout: Option<u64>,
    /// Live-migrate the running VM to `vlapic run --incoming ADDR` in another process
    /// after `--migrate-after` ms: pre-copy of RAM with KVM's dirty log while the guest
    /// runs, then a short pause for the last pages and the vCPU, APIC and device state.
    /// Exits 0 once the destination acknowledged running the VM; if the destination
    /// refuses, dies or the connection drops first, the VM keeps running here.
    #[arg(long, value_name = "ADDR", value_parser = parse_addr, conflicts_with_all = ["save", "migrate_every"])]
    pub migrate_to: Option<vlapic_vmm::stream::Addr>,
    /// When `--migrate-to` starts: milliseconds of wall time after this process's VM
    /// started running (booted or, with `--incoming`, resumed).
    #[arg(
        long,
        value_name = "MS",
        default_value_t = 500,
        requires = "migrate_to"
    )]
    pub migrate_after: u64,
    /// Do not deliver `int3` / `int n` that KVM's instruction emulator fails on (a
    /// workaround for hosts whose emulator performs them only in real mode, such as
    /// nested KVM running guest CPL0 code through it): such an instruction then ends
    /// the run with the KVM internal error, as KVM reports it.
    #[arg(long)]
    pub no_soft_int: bool,
    /// Record every vCPU's interrupts (acceptance to EOI with their source, IPIs,
    /// timer expiries, NMI/INIT/SIPI, TPR, pauses with each vCPU's ISR, verifier
    /// violations) with VM-time stamps into FILE as Chrome trace-event JSON (opens in
    /// Perfetto and chrome://tracing); `vlapic timeline FILE` draws it. See docs/trace.md.
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
}

fn parse_addr(s: &str) -> Result<vlapic_vmm::stream::Addr, String> {
    vlapic_vmm::stream::Addr::parse(s)
}

/// Which interrupt controllers the VM uses.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqchipArg {
    /// vlapic in userspace (no in-kernel irqchip).
    User,
    /// KVM's in-kernel LAPICs, IOAPIC and PIC (KVM_CREATE_IRQCHIP).
    Kernel,
}

/// Arguments of `vlapic bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Multiboot kernel; default: the built-in test guest.
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// Kernel command line (the test guest's benchmark mode is `bench`).
    #[arg(long, default_value = "bench")]
    pub append: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 2)]
    pub vcpus: usize,
    /// Start the APICs in x2APIC mode.
    #[arg(long)]
    pub x2apic: bool,
    /// Wall-clock limit per run, seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Print the comparison as one JSON object: `{"schema": 1, "user": RUN, "kernel":
    /// RUN}`, each RUN being a `vlapic run --json` object.
    #[arg(long)]
    pub json: bool,
    /// Instead: host instructions in userspace per APIC exit (xAPIC EOI, x2APIC EOI, TPR
    /// write, ICR write) and exits per operation, counted by callgrind (needs valgrind)
    /// on generated guests; `--json` prints `{"schema": 1, "exit_cost": [...]}`.
    #[arg(long)]
    pub exit_cost: bool,
    /// With `--exit-cost`: the measured runs record their interrupts (`run --trace`),
    /// to show the recorder's per-exit cost.
    #[arg(long, requires = "exit_cost")]
    pub trace: bool,
}

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("vlapic run: {msg}");
    ExitCode::from(code)
}

/// The `--kernel` image, or the built-in test guest.
/// An image larger than guest RAM cannot be loaded: `--memory` bounds what is read.
fn load_kernel(path: &Option<PathBuf>, memory_mib: u64) -> Result<Vec<u8>, ExitCode> {
    match path {
        Some(p) => vlapic_vmm::files::read_bounded(
            p,
            memory_mib.saturating_mul(1 << 20),
            &format!("the --memory {memory_mib} MiB of guest RAM it must fit in"),
        )
        .map_err(|e| fail(exit_code::SETUP, e)),
        None => vlapic_vmm::guest::test_guest()
            .map(<[u8]>::to_vec)
            .ok_or_else(|| {
                fail(
                    exit_code::SETUP,
                    "no built-in test guest (it failed to build); pass --kernel FILE",
                )
            }),
    }
}

/// `vlapic run`.
pub fn run(a: RunArgs) -> ExitCode {
    let kernel = if a.restore.is_some() || a.incoming.is_some() {
        Vec::new()
    } else {
        match load_kernel(&a.kernel, a.memory) {
            Ok(k) => k,
            Err(code) => return code,
        }
    };
    let mut modules = Vec::new();
    for p in &a.module {
        let limit = a.memory.saturating_mul(1 << 20);
        let why = format!("the --memory {} MiB of guest RAM it must fit in", a.memory);
        match vlapic_vmm::files::read_bounded(p, limit, &why) {
            Ok(data) => modules.push(Module {
                data,
                cmdline: p.display().to_string(),
            }),
            Err(e) => return fail(exit_code::SETUP, format!("module {e}")),
        }
    }
    let initrd = match &a.initrd {
        Some(p) => {
            let limit = a.memory.saturating_mul(1 << 20);
            let why = format!("the --memory {} MiB of guest RAM it must fit in", a.memory);
            match vlapic_vmm::files::read_bounded(p, limit, &why) {
                Ok(data) => data,
                Err(e) => return fail(exit_code::SETUP, format!("initrd {e}")),
            }
        }
        None => Vec::new(),
    };
    // Linux takes --append alone (as QEMU passes it); multiboot gets "FILE APPEND".
    let cmdline = if vlapic_vmm::linux::detect(&kernel).is_some() {
        a.append.clone()
    } else {
        kernel_cmdline(&a.kernel, &a.append)
    };
    let cfg = VmConfig {
        kernel,
        initrd,
        cmdline,
        modules,
        vcpus: a.vcpus,
        memory_mib: a.memory,
        x2apic: a.x2apic,
        verify: a.verify,
        timeout: (a.timeout > 0).then(|| Duration::from_secs(a.timeout)),
        // 0 = never (the VMM drops a zero period). A restored run without
        // --migrate-every keeps the saved run's period.
        migrate_every: match (a.migrate_every, a.restore.is_some()) {
            (Some(ms), _) => Some(Duration::from_millis(ms)),
            (None, true) => None,
            (None, false) if a.incoming.is_some() || a.migrate_to.is_some() => None,
            (None, false) => (a.kernel.is_none() && a.irqchip == IrqchipArg::User)
                .then(|| Duration::from_millis(10)),
        },
        save: a.save.clone().map(|path| SaveTo {
            path,
            after: Duration::from_millis(a.save_after),
        }),
        restore: a.restore.clone(),
        trace: a.trace.clone(),
        incoming: a.incoming.clone(),
        incoming_timeout: a.incoming_timeout.map(Duration::from_millis),
        migrate_to: a.migrate_to.clone().map(|addr| MigrateTo {
            addr,
            after: Duration::from_millis(a.migrate_after),
            precopy: PreCopy {
                // Test hook (docs/migration-stream.md): before the pause, wait up to
                // this many ms for some APIC to have 3+ vectors in service.
                nested_wait: Duration::from_millis(
                    std::env::var("VLAPIC_MIGRATE_NESTED_WAIT_MS")
                        .ok()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0),
                ),
                ..PreCopy::default()
            },
        }),
        kernel_irqchip: a.irqchip == IrqchipArg::Kernel,
        soft_interrupts: !a.no_soft_int,
        console: if a.quiet {
            ConsoleSink::Quiet
        } else if a.json {
            ConsoleSink::Stderr
        } else {
            ConsoleSink::Stdout
        },
    };
    // A --kernel guest follows QEMU's isa-debug-exit status. (A --restore run
    // keeps the built-in guest's rules: the save file does not say which it was.)
    let rules = if a.kernel.is_some() {
        ExitRules::DebugExit
    } else {
        ExitRules::Scenarios
    };
    match run_vm(&cfg) {
        Ok(rep) => {
            let code = rep.exit_code_under(rules);
            if a.json {
                let mut j = rep.json();
                if let Some(o) = j.as_object_mut() {
                    o.insert("exit_code".into(), code.into());
                }
                println!("{j}");
            } else {
                print!("{}", rep.text());
            }
            if let (Some(s), false) = (&a.save, matches!(rep.outcome, Outcome::Saved(_))) {
                eprintln!(
                    "vlapic run: no state saved to {}: the run ended before the save point ({} ms)",
                    s.display(),
                    a.save_after
                );
            }
            ExitCode::from(code)
        }
        Err(e) => fail(e.exit_code(), e),
    }
}

/// The multiboot command line: for `--kernel FILE`, FILE as given, a space and
/// `append` (as QEMU builds it); for the built-in guest, `append` alone.
fn kernel_cmdline(kernel: &Option<PathBuf>, append: &str) -> String {
    match kernel {
        Some(p) => multiboot_cmdline(&p.to_string_lossy(), append),
        None => append.to_string(),
    }
}

/// `vlapic bench`: the same guest with vlapic in userspace and with KVM's
/// in-kernel irqchip, side by side (BENCH lines, per-scenario time and exits).
pub fn bench(a: BenchArgs) -> ExitCode {
    if a.exit_cost {
        return crate::exit_cost::run(a.json, a.trace);
    }
    let kernel = match load_kernel(&a.kernel, VmConfig::default().memory_mib) {
        Ok(k) => k,
        Err(code) => return code,
    };
    let mut reports = Vec::new();
    for kernel_irqchip in [false, true] {
        let cfg = VmConfig {
            kernel: kernel.clone(),
            cmdline: kernel_cmdline(&a.kernel, &a.append),
            vcpus: a.vcpus,
            x2apic: a.x2apic,
            timeout: (a.timeout > 0).then(|| Duration::from_secs(a.timeout)),
            console: ConsoleSink::Quiet,
            kernel_irqchip,
            ..VmConfig::default()
        };
        match run_vm(&cfg) {
            Ok(r) => reports.push(r),
            Err(e) => return fail(e.exit_code(), e),
        }
    }
    let (user, kern) = (&reports[0], &reports[1]);
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "schema": vlapic_vmm::summary::JSON_SCHEMA,
                "user": user.json(),
                "kernel": kern.json(),
            })
        );
    } else {
        println!(
            "{:<28} {:>16} {:>16}",
            "benchmark (median cycles)", "vlapic (user)", "KVM (kernel)"
        );
        let mut names: Vec<&str> = user.console.bench.iter().map(|b| b.name.as_str()).collect();
        for b in &kern.console.bench {
            if !names.contains(&b.name.as_str()) {
                names.push(&b.name);
            }
        }
        let get = |r: &vlapic_vmm::RunReport, n: &str| {
            r.console
                .bench
                .iter()
                .find(|b| b.name == n)
                .map_or("-".to_string(), |b| b.cycles.to_string())
        };
        for n in &names {
            println!("{:<28} {:>16} {:>16}", n, get(user, n), get(kern, n));
        }
        println!();
        println!(
            "{:<28} {:>16} {:>16}",
            "scenario (ms / exits)", "vlapic (user)", "KVM (kernel)"
        );
        for s in &user.console.scenarios {
            let k = kern.console.scenarios.iter().find(|k| k.name == s.name);
            let cell = |sc: &vlapic_vmm::console::Scenario| {
                format!(
                    "{} {:.1}/{}",
                    &sc.status[..1],
                    sc.elapsed.as_secs_f64() * 1e3,
                    sc.exits.iter().sum::<u64>()
                )
            };
            println!(
                "{:<28} {:>16} {:>16}",
                s.name,
                cell(s),
                k.map_or("-".to_string(), cell)
            );
        }
        println!();
        println!(
            "{:<28} {:>16} {:>16}",
            "total (s / exits)",
            format!(
                "{:.3}/{}",
                user.elapsed.as_secs_f64(),
                user.total_exits().iter().sum::<u64>()
            ),
            format!(
                "{:.3}/{}",
                kern.elapsed.as_secs_f64(),
                kern.total_exits().iter().sum::<u64>()
            )
        );
    }
    ExitCode::from(user.exit_code().max(kern.exit_code()))
}

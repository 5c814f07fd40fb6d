//! `vlapic qemu`: a QEMU-compatible front door to `vlapic run`, so that scripts
//! which build a `qemu-system-x86_64` command line (kvm-unit-tests' `x86/run` and
//! `run_tests.sh`) can boot their kernels on vlapic unchanged.
//!
//! It accepts the subset of QEMU options those scripts pass, maps them onto the
//! VMM's configuration, refuses every other option with one line naming it (exit
//! code 2), and answers the probes the scripts make (`-h`, `-version`,
//! `-device help`/`'?'`, `-machine help`, `-accel help`, `-cpu help`).
//! Conventions kept from QEMU: the multiboot command line is the `-kernel`
//! argument as given, a space, then `-append`; an isa-debug-exit write of N ends
//! the process with `(N << 1) | 1`; nothing else is printed on stdout but the
//! guest's serial output (`-serial stdio`), and nothing on stderr on success.

use std::ffi::OsString;
use std::io::Write as _;
use std::process::ExitCode;

use vlapic_vmm::loader::multiboot_cmdline;
use vlapic_vmm::summary::ExitRules;
use vlapic_vmm::{exit_code, run_vm, ConsoleSink, Module, Outcome, VmConfig};

mod help;
mod values;
use help::*;
use values::*;

/// The QEMU version the front door answers with (`-version`, first line of
/// `-h`). Its conventions (multiboot command line, isa-debug-exit status,
/// pc-testdev ports) were checked against QEMU 7.2.
pub const QEMU_VERSION: &str = "7.2.0";

/// Most vCPUs (the VMM's limit).
const MAX_CPUS: usize = vlapic_vmm::shared::MAX_VCPUS;

/// QEMU's default RAM size in MiB.
const DEFAULT_MEMORY_MIB: u64 = 128;

/// A parsed `vlapic qemu` command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Boot this configuration.
    Run(QemuRun),
    /// A probe: print this on stdout and exit 0.
    Probe(String),
}

/// What a QEMU command line asks for, in the VMM's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuRun {
    /// `-kernel FILE`, as given (it also starts the multiboot command line).
    pub kernel: String,
    /// `-append TEXT` (empty when absent).
    pub append: String,
    /// `-initrd "FILE[ ARGS][,FILE[ ARGS]...]"`: (file, module string) each.
    pub modules: Vec<(String, String)>,
    /// `-smp`.
    pub vcpus: usize,
    /// `-m`, MiB.
    pub memory_mib: u64,
    /// `-machine kernel_irqchip=on` / `-accel kvm,kernel-irqchip=on`: KVM's
    /// in-kernel irqchip instead of vlapic (the comparison baseline).
    pub kernel_irqchip: bool,
    /// `-serial stdio` (or `-nographic`): the guest console on stdout.
    pub console_stdout: bool,
    /// Options accepted that vlapic cannot honour exactly (printed as warnings).
    pub warnings: Vec<String>,
}

/// Parses a QEMU command line (without the program name).
pub fn parse(args: &[String]) -> Result<Parsed, String> {
    let mut kernel: Option<String> = None;
    let mut append = String::new();
    let mut modules = Vec::new();
    let mut vcpus = 1usize;
    let mut memory_mib = DEFAULT_MEMORY_MIB;
    let mut kernel_irqchip = false;
    let mut serial: Option<bool> = None;
    let mut nographic = false;
    let mut warnings = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let raw = &args[i];
        i += 1;
        let Some(name) = raw.strip_prefix("--").or_else(|| raw.strip_prefix('-')) else {
            return Err(format!(
                "'{raw}': positional arguments (disk images) are not supported"
            ));
        };
        let opt = format!("-{name}");
        // Options without a value.
        match name {
            "h" | "help" => return Ok(Parsed::Probe(help_text())),
            "version" => return Ok(Parsed::Probe(format!("{}\n", version_line()))),
            "nodefaults" | "no-reboot" | "no-user-config" | "enable-kvm" | "no-hpet"
            | "no-acpi" => continue,
            "nographic" => {
                nographic = true;
                continue;
            }
            "kernel" | "append" | "initrd" | "smp" | "m" | "cpu" | "machine" | "M" | "accel"
            | "device" | "serial" | "display" | "monitor" | "vga" | "global" | "name" => {}
            _ => return Err(format!("{opt}: option not supported by vlapic")),
        }
        let Some(v) = args.get(i) else {
            return Err(format!("{opt}: requires an argument"));
        };
        i += 1;
        match name {
            "kernel" => kernel = Some(v.clone()),
            "append" => append = v.clone(),
            "initrd" => modules = parse_initrd(v)?,
            "smp" => vcpus = parse_smp(v)?,
            "m" => memory_mib = parse_memory(v)?,
            "cpu" => {
                if is_help(v) {
                    return Ok(Parsed::Probe(cpu_help()));
                }
                let mut parts = v.split(',');
                let model = parts.next().unwrap_or("");
                if !CPU_MODELS.contains(&model) {
                    return Err(format!(
                        "-cpu: model '{model}' not supported (one of {})",
                        CPU_MODELS.join(", ")
                    ));
                }
                for f in parts.filter(|f| !f.is_empty()) {
                    let (feat, on) = if let Some(x) = f.strip_prefix('+') {
                        (x, true)
                    } else if let Some(x) = f.strip_prefix('-') {
                        (x, false)
                    } else if let Some((k, val)) = f.split_once('=') {
                        (k, !matches!(val, "off" | "false" | "no"))
                    } else {
                        (f, true)
                    };
                    let offered = matches!(feat, "x2apic" | "tsc-deadline" | "apic");
                    if !(offered && on) {
                        warnings.push(format!(
                            "-cpu {f}: ignored: the guest gets vlapic's CPUID (KVM's, with x2APIC and TSC-deadline offered)"
                        ));
                    }
                }
            }
            "machine" | "M" => {
                if is_help(v) {
                    return Ok(Parsed::Probe(MACHINE_HELP.into()));
                }
                for (k, val) in props(v) {
                    match k.as_str() {
                        "" | "type" => {
                            if is_help(&val) {
                                return Ok(Parsed::Probe(MACHINE_HELP.into()));
                            }
                            if !(val == "pc" || val.starts_with("pc-i440fx")) {
                                return Err(format!(
                                    "{opt}: machine '{val}' not supported (vlapic has one PC platform: pc)"
                                ));
                            }
                        }
                        "accel" => {
                            if val.split(':').next() != Some("kvm") {
                                return Err(format!(
                                    "{opt}: accel={val}: vlapic runs guests on KVM only"
                                ));
                            }
                        }
                        "kernel_irqchip" | "kernel-irqchip" => {
                            kernel_irqchip = irqchip_value(&opt, &val)?;
                        }
                        // The HPET is always there: `hpet=on` is what it is, `off`
                        // leaves it in place (a guest that does not look for it at
                        // 0xFED00000 is not affected).
                        "hpet" => {}
                        // None of these exists here: switching one off is a no-op,
                        // asking for one is refused.
                        "pit" | "smm" | "usb" | "vmport" | "graphics" => {
                            if !matches!(val.as_str(), "off" | "false" | "no") {
                                return Err(format!("{opt}: {k}={val}: vlapic's PC has no {k}"));
                            }
                        }
                        _ => return Err(format!("{opt}: property '{k}' not supported")),
                    }
                }
            }
            "accel" => {
                if is_help(v) {
                    return Ok(Parsed::Probe(ACCEL_HELP.into()));
                }
                for (k, val) in props(v) {
                    match k.as_str() {
                        "" => {
                            if val != "kvm" {
                                return Err(format!(
                                    "-accel {val}: vlapic runs guests on KVM only"
                                ));
                            }
                        }
                        "kernel_irqchip" | "kernel-irqchip" => {
                            kernel_irqchip = irqchip_value(&opt, &val)?;
                        }
                        _ => return Err(format!("-accel: property '{k}' not supported")),
                    }
                }
            }
            "device" => {
                if is_help(v) {
                    return Ok(Parsed::Probe(DEVICE_HELP.into()));
                }
                let p = props(v);
                let driver = p.first().map(|(_, d)| d.as_str()).unwrap_or("");
                match driver {
                    "isa-debug-exit" => {
                        for (k, val) in p.iter().skip(1) {
                            match k.as_str() {
                                "iobase" => {
                                    if parse_uint("-device isa-debug-exit", "iobase", val)? != 0xF4 {
                                        return Err(format!(
                                            "-device isa-debug-exit: iobase={val} not supported (vlapic's is at 0xf4)"
                                        ));
                                    }
                                }
                                "iosize" => {
                                    let n = parse_uint("-device isa-debug-exit", "iosize", val)?;
                                    if !(1..=4).contains(&n) {
                                        return Err(format!(
                                            "-device isa-debug-exit: iosize={val}: expected 1 to 4"
                                        ));
                                    }
                                }
                                _ => {
                                    return Err(format!(
                                        "-device isa-debug-exit: property '{k}' not supported"
                                    ))
                                }
                            }
                        }
                    }
                    "pc-testdev" => {
                        if let Some((k, _)) = p.get(1) {
                            return Err(format!("-device pc-testdev: property '{k}' not supported"));
                        }
                    }
                    _ => {
                        return Err(format!(
                            "-device {driver}: device not supported by vlapic (it has isa-debug-exit and pc-testdev)"
                        ))
                    }
                }
            }
            "serial" => {
                let stdout = match v.as_str() {
                    "stdio" | "mon:stdio" => true,
                    "none" | "null" => false,
                    _ => {
                        return Err(format!(
                            "-serial {v}: not supported (stdio, mon:stdio, none or null)"
                        ))
                    }
                };
                match serial {
                    // COM1.
                    None => serial = Some(stdout),
                    // Further ports do not exist here; "none" for them is fine.
                    Some(_) if !stdout => {}
                    Some(_) => {
                        return Err(format!("-serial {v}: vlapic has one serial port (COM1)"))
                    }
                }
            }
            "display" | "vga" | "monitor" if v != "none" => {
                return Err(format!("{opt} {v}: not supported (only {opt} none)"));
            }
            "global" if !v.starts_with("kvm-pit.") => {
                return Err(format!("-global {v}: not supported"));
            }
            // -display/-vga/-monitor none, -global kvm-pit.*, -name: nothing to do.
            _ => {}
        }
    }
    let Some(kernel) = kernel else {
        return Err("-kernel: required (vlapic boots multiboot kernels only)".into());
    };
    Ok(Parsed::Run(QemuRun {
        kernel,
        append,
        modules,
        vcpus,
        memory_mib,
        kernel_irqchip,
        console_stdout: serial.unwrap_or(nographic),
        warnings,
    }))
}

fn error(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "vlapic qemu: {msg}");
    ExitCode::from(code)
}

/// `vlapic qemu ARGS...` (ARGS after the subcommand name).
pub fn main(args: &[OsString]) -> ExitCode {
    let mut strs = Vec::with_capacity(args.len());
    for a in args {
        match a.to_str() {
            Some(s) => strs.push(s.to_string()),
            None => {
                return error(
                    exit_code::SETUP,
                    format!("argument {a:?} is not valid UTF-8"),
                )
            }
        }
    }
    let q = match parse(&strs) {
        Ok(Parsed::Probe(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Ok(Parsed::Run(q)) => q,
        Err(e) => return error(exit_code::SETUP, e),
    };
    // The words QEMU uses, which kvm-unit-tests' runner looks for when it
    // probes with a missing kernel.
    let kernel = match std::fs::read(&q.kernel) {
        Ok(k) => k,
        Err(e) => {
            return error(
                exit_code::SETUP,
                format!("could not load kernel '{}': {e}", q.kernel),
            )
        }
    };
    let mut modules = Vec::new();
    for (file, string) in &q.modules {
        match std::fs::read(file) {
            Ok(data) => modules.push(Module {
                data,
                cmdline: string.clone(),
            }),
            Err(e) => {
                return error(
                    exit_code::SETUP,
                    format!("-initrd: could not load '{file}': {e}"),
                )
            }
        }
    }
    for w in &q.warnings {
        let _ = writeln!(std::io::stderr(), "vlapic qemu: warning: {w}");
    }
    let cfg = VmConfig {
        kernel,
        initrd: Vec::new(),
        cmdline: multiboot_cmdline(&q.kernel, &q.append),
        modules,
        vcpus: q.vcpus,
        memory_mib: q.memory_mib,
        x2apic: false,
        verify: true,
        // QEMU has no time limit; the runner wraps it in timeout(1).
        timeout: None,
        console: if q.console_stdout {
            ConsoleSink::Stdout
        } else {
            ConsoleSink::Quiet
        },
        migrate_every: None,
        kernel_irqchip: q.kernel_irqchip,
        soft_interrupts: true,
        save: None,
        restore: None,
        incoming: None,
        incoming_timeout: None,
        migrate_to: None,
        trace: None,
    };
    let rep = match run_vm(&cfg) {
        Ok(r) => r,
        Err(e) => return error(e.exit_code(), e),
    };
    let code = rep.exit_code_under(ExitRules::DebugExit);
    if let Ok(path) = std::env::var("VLAPIC_QEMU_SUMMARY") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
        {
            let mut j = rep.json();
            if let Some(o) = j.as_object_mut() {
                o.insert("exit_code".into(), code.into());
            }
            let _ = writeln!(
                f,
                "== vlapic qemu {} (exit status {code}) ==\n{}json: {j}",
                strs.join(" "),
                rep.text()
            );
        }
    }
    match &rep.outcome {
        Outcome::DebugExit(_) | Outcome::PoweredOff => {}
        Outcome::AllStopped => {
            let _ = writeln!(
                std::io::stderr(),
                "vlapic qemu: the guest stopped without an isa-debug-exit write (every vCPU halted with IF=0 or waiting for SIPI)"
            );
        }
        Outcome::Timeout => {
            let _ = writeln!(std::io::stderr(), "vlapic qemu: timeout");
        }
        Outcome::GuestCrash(m) => {
            let _ = writeln!(std::io::stderr(), "vlapic qemu: guest crash: {m}");
        }
        Outcome::VmmError(m) => {
            let _ = writeln!(std::io::stderr(), "vlapic qemu: VMM error: {m}");
        }
        Outcome::Saved(_) | Outcome::Migrated(_) => {}
    }
    ExitCode::from(code)
}

#[cfg(test)]
mod tests;

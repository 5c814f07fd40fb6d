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

fn version_line() -> String {
    format!(
        "QEMU emulator version {QEMU_VERSION} (vlapic {}: QEMU-compatible front door to vlapic's KVM VMM, local APICs and IOAPIC in userspace; not QEMU)",
        env!("CARGO_PKG_VERSION")
    )
}

fn help_text() -> String {
    format!(
        "{}
usage: vlapic qemu [options]   (QEMU option syntax; -opt and --opt both work)

Accepted (everything else is refused with one line naming the option, exit 2):
  -kernel FILE            multiboot v1 kernel; command line = \"FILE APPEND\" as QEMU builds it
  -append TEXT            kernel command line after the file name
  -initrd FILE[ ARGS][,FILE...]  multiboot modules (module string = the whole entry)
  -smp [cpus=]N[,...]     vCPUs, 1-{MAX_CPUS} (maxcpus, if given, must equal cpus)
  -m [size=]N[K|M|G]      RAM (default {DEFAULT_MEMORY_MIB} MiB; 4-3072 MiB)
  -cpu MODEL[,+f,-f,f=on] qemu64, qemu32, kvm64, kvm32, host, max, base: all give vlapic's
                          CPUID (KVM's, with x2APIC and TSC-deadline); feature changes are
                          ignored with a warning
  -machine/-M [type=]pc[,accel=kvm][,kernel_irqchip=on|off|split][,pit=off,...]
                          kernel_irqchip=on uses KVM's in-kernel irqchip (the baseline);
                          off/split (the default here) use vlapic in userspace;
                          pit, smm, usb, vmport, graphics: only =off (none exists);
                          hpet=on|off (the HPET is always present)
  -accel kvm[,kernel-irqchip=...]   -enable-kvm
  -device isa-debug-exit,iobase=0xf4[,iosize=N]   -device pc-testdev
                          (both are always present; isa-debug-exit only at 0xf4)
  -serial stdio|mon:stdio|none|null   -display none   -vga none   -monitor none
  -nographic -nodefaults -no-reboot -no-user-config -no-acpi -name NAME
  -no-hpet                (accepted; the HPET at 0xFED00000 stays present)
  -global kvm-pit.lost_tick_policy=discard   (there is no PIT; accepted as a no-op)
Probes: -h/-help, -version, -device help|?, -machine help|?, -accel help|?, -cpu help|?

Exit status: an isa-debug-exit write of N gives (N << 1) | 1 (low 8 bits), as QEMU;
option and setup errors 2; guest crash 4; VMM error 5; a guest that stops without
the write 0 or 1 with one line on stderr. VLAPIC_QEMU_SUMMARY=FILE appends vlapic's
run summary (text, then one JSON line) to FILE.
",
        version_line()
    )
}

const DEVICE_HELP: &str = "Misc devices:
name \"isa-debug-exit\", bus ISA
name \"pc-testdev\", bus ISA
";

const MACHINE_HELP: &str = "Supported machines are:
pc                   vlapic's PC: i440FX-like ports, local APICs and IOAPIC in userspace (default)
";

const ACCEL_HELP: &str = "Accelerators supported in QEMU binary:
kvm
";

const CPU_MODELS: [&str; 7] = ["base", "host", "kvm32", "kvm64", "max", "qemu32", "qemu64"];

fn cpu_help() -> String {
    let mut s = String::from("Available CPUs (all give vlapic's CPUID: KVM's supported CPUID with x2APIC and TSC-deadline):\n");
    for m in CPU_MODELS {
        s.push_str(&format!("x86 {m}\n"));
    }
    s
}

fn is_help(v: &str) -> bool {
    v == "help" || v == "?"
}

/// `key=value` pairs of a QEMU option value; a leading element without `=`
/// comes back with an empty key.
fn props(v: &str) -> Vec<(String, String)> {
    v.split(',')
        .enumerate()
        .map(|(i, p)| match p.split_once('=') {
            Some((k, val)) => (k.to_string(), val.to_string()),
            None if i == 0 => (String::new(), p.to_string()),
            None => (p.to_string(), String::new()),
        })
        .collect()
}

fn parse_uint(opt: &str, what: &str, v: &str) -> Result<u64, String> {
    let r = if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(h, 16)
    } else {
        v.parse::<u64>()
    };
    r.map_err(|_| format!("{opt}: {what} '{v}' is not a number"))
}

fn parse_smp(v: &str) -> Result<usize, String> {
    let mut cpus: Option<u64> = None;
    let mut maxcpus: Option<u64> = None;
    let mut topo: u64 = 1;
    let mut any_topo = false;
    for (k, val) in props(v) {
        match k.as_str() {
            "" | "cpus" => cpus = Some(parse_uint("-smp", "cpus", &val)?),
            "maxcpus" => maxcpus = Some(parse_uint("-smp", "maxcpus", &val)?),
            "sockets" | "dies" | "clusters" | "cores" | "threads" => {
                any_topo = true;
                topo = topo.saturating_mul(parse_uint("-smp", &k, &val)?);
            }
            _ => return Err(format!("-smp: property '{k}' not supported")),
        }
    }
    let n = match cpus {
        Some(n) => n,
        None if any_topo => topo,
        None => maxcpus.unwrap_or(1),
    };
    if n == 0 {
        return Err("-smp: cpus must be at least 1".into());
    }
    if let Some(m) = maxcpus {
        if m != n {
            return Err(format!(
                "-smp: maxcpus={m} differs from cpus={n}: CPU hotplug is not supported"
            ));
        }
    }
    if n > MAX_CPUS as u64 {
        // The words QEMU uses, which kvm-unit-tests' --probe-maxsmp looks for
        // (it takes the last word as the limit).
        return Err(format!(
            "-smp: Invalid SMP CPUs {n}. The max CPUs supported by machine 'pc' is {MAX_CPUS}"
        ));
    }
    Ok(n as usize)
}

fn parse_memory(v: &str) -> Result<u64, String> {
    let mut size: Option<String> = None;
    for (k, val) in props(v) {
        match k.as_str() {
            "" | "size" => size = Some(val),
            _ => {
                return Err(format!(
                    "-m: property '{k}' not supported (no memory hotplug)"
                ))
            }
        }
    }
    let s = size.ok_or("-m: no size given")?;
    let (num, mult_kib): (&str, u64) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1,
                'M' => 1 << 10,
                'G' => 1 << 20,
                'T' => 1 << 30,
                _ => return Err(format!("-m: unknown size suffix in '{s}'")),
            };
            (&s[..i], m)
        }
        _ => (s.as_str(), 1 << 10),
    };
    let n = parse_uint("-m", "size", num)?;
    let kib = n
        .checked_mul(mult_kib)
        .ok_or_else(|| format!("-m: size '{s}' is too large"))?;
    if kib % 1024 != 0 {
        return Err(format!("-m: size '{s}' is not a whole number of MiB"));
    }
    let mib = kib / 1024;
    let (lo, hi) = (
        vlapic_vmm::memory::MIN_MEMORY_MIB,
        vlapic_vmm::memory::MAX_MEMORY_MIB,
    );
    if !(lo..=hi).contains(&mib) {
        return Err(format!("-m: {mib} MiB is outside {lo}-{hi} MiB"));
    }
    Ok(mib)
}

/// `-initrd`: comma-separated entries (`,,` is a literal comma), each a file name
/// optionally followed by a space and arguments; the module string is the whole
/// entry, as QEMU's multiboot loader passes it.
fn parse_initrd(v: &str) -> Result<Vec<(String, String)>, String> {
    let mut entries = vec![String::new()];
    let mut chars = v.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                if let Some(e) = entries.last_mut() {
                    e.push(',');
                }
            } else {
                entries.push(String::new());
            }
        } else if let Some(e) = entries.last_mut() {
            e.push(c);
        }
    }
    entries
        .into_iter()
        .map(|e| {
            let file = e.split(' ').next().unwrap_or("").to_string();
            if file.is_empty() {
                Err(format!("-initrd: empty module entry in '{v}'"))
            } else {
                Ok((file, e))
            }
        })
        .collect()
}

fn irqchip_value(opt: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "" => Ok(true),
        "off" | "split" => Ok(false),
        _ => Err(format!(
            "{opt}: kernel_irqchip={v}: expected on, off or split"
        )),
    }
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
#[path = "qemu_cmd_tests.rs"]
mod tests;

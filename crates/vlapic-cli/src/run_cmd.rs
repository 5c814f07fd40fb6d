//! `vlapic run`: boot a multiboot guest under KVM with every APIC access handled
//! by vlapic in userspace, then print the summary. `vlapic bench`: not built yet.

use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use vlapic_vmm::{exit_code, run_vm, ConsoleSink, Module, VmConfig};

/// Arguments of `vlapic run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Multiboot v1 kernel (ELF32/ELF64 or a.out kludge); default: the built-in test guest.
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "")]
    pub append: String,
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
    #[arg(long)]
    pub json: bool,
    /// Do not copy the guest console to the terminal.
    #[arg(long)]
    pub quiet: bool,
    /// Live-migrate the VM into a brand-new KVM VM every MS milliseconds.
    #[arg(long, value_name = "MS")]
    pub migrate_every: Option<u64>,
}

/// Arguments of `vlapic bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {}

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("vlapic run: {msg}");
    ExitCode::from(code)
}

/// `vlapic run`.
pub fn run(a: RunArgs) -> ExitCode {
    let kernel = match &a.kernel {
        Some(p) => match std::fs::read(p) {
            Ok(k) => k,
            Err(e) => {
                return fail(
                    exit_code::SETUP,
                    format!("cannot read {}: {e}", p.display()),
                )
            }
        },
        None => match vlapic_vmm::guest::test_guest() {
            Some(k) => k.to_vec(),
            None => {
                return fail(
                    exit_code::SETUP,
                    "no built-in test guest (it failed to build); pass --kernel FILE",
                )
            }
        },
    };
    let mut modules = Vec::new();
    for p in &a.module {
        match std::fs::read(p) {
            Ok(data) => modules.push(Module {
                data,
                cmdline: p.display().to_string(),
            }),
            Err(e) => {
                return fail(
                    exit_code::SETUP,
                    format!("cannot read module {}: {e}", p.display()),
                )
            }
        }
    }
    let cfg = VmConfig {
        kernel,
        cmdline: a.append.clone(),
        modules,
        vcpus: a.vcpus,
        memory_mib: a.memory,
        x2apic: a.x2apic,
        verify: a.verify,
        timeout: (a.timeout > 0).then(|| Duration::from_secs(a.timeout)),
        migrate_every: a
            .migrate_every
            .filter(|ms| *ms > 0)
            .map(Duration::from_millis),
        console: if a.quiet {
            ConsoleSink::Quiet
        } else if a.json {
            ConsoleSink::Stderr
        } else {
            ConsoleSink::Stdout
        },
    };
    match run_vm(&cfg) {
        Ok(rep) => {
            if a.json {
                println!("{}", rep.json());
            } else {
                print!("{}", rep.text());
            }
            ExitCode::from(rep.exit_code())
        }
        Err(e) => fail(e.exit_code(), e),
    }
}

/// `vlapic bench` (not built yet).
pub fn bench(_a: BenchArgs) -> ExitCode {
    eprintln!("vlapic bench: not built yet");
    ExitCode::from(2)
}

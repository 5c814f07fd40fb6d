//! `vlapic`: run a guest on the userspace local APIC, and inspect, convert or
//! replay saved APIC state. Each subcommand lives in its own module.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod exit_cost;
mod qemu_cmd;
mod run_cmd;
mod state_cmds;
mod timeline;
mod timeline_cmd;
mod timeline_html;

/// vlapic: an emulated x86 local APIC, its KVM test VMM and state tools.
#[derive(Parser, Debug)]
#[command(name = "vlapic", version, about, long_about = None)]
#[command(after_help = state_cmds::HELP_EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a guest under KVM with the LAPIC and IOAPIC emulated by vlapic in userspace.
    #[command(after_help = run_cmd::RUN_AFTER_HELP)]
    Run(run_cmd::RunArgs),
    /// Run the guest's benchmarks with our APIC and KVM's, side by side.
    Bench(run_cmd::BenchArgs),
    /// Draw a `vlapic run --trace` file as a self-contained HTML page (one lane per
    /// vCPU, nested handlers, IPI arrows, pauses, nesting depth), or a text digest.
    Timeline(timeline_cmd::TimelineArgs),
    /// Show saved APIC state in readable form (or JSON), listing every rule it breaks.
    Inspect(state_cmds::InspectArgs),
    /// Validate saved APIC state and convert it between formats.
    Convert(state_cmds::ConvertArgs),
    /// Drive one fresh APIC through a text trace of register accesses and interrupts.
    Replay(state_cmds::ReplayArgs),
    /// QEMU-compatible front door: `vlapic qemu -kernel K -smp 2 ...` takes QEMU's
    /// options (the subset kvm-unit-tests' runner passes; `vlapic qemu -h` lists
    /// them) and runs `vlapic run`; point the runner at scripts/vlapic-qemu.
    #[command(disable_help_flag = true)]
    Qemu {
        /// QEMU options.
        #[arg(num_args = 0.., allow_hyphen_values = true, trailing_var_arg = true)]
        args: Vec<std::ffi::OsString>,
    },
}

fn main() -> ExitCode {
    // QEMU's option syntax (-kernel, -h, -version, ...) is not clap's: `vlapic qemu`
    // takes its arguments untouched.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == "qemu") {
        return qemu_cmd::main(argv.get(2..).unwrap_or(&[]));
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Run(a) => run_cmd::run(a),
        Command::Bench(a) => run_cmd::bench(a),
        Command::Timeline(a) => timeline_cmd::timeline(a),
        Command::Inspect(a) => state_cmds::inspect(a),
        Command::Convert(a) => state_cmds::convert(a),
        Command::Replay(a) => state_cmds::replay(a),
        Command::Qemu { args } => qemu_cmd::main(&args),
    }
}

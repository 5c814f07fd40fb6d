//! `vlapic inspect`, `vlapic convert` and `vlapic replay`: saved APIC state read,
//! checked against the import rules, shown, converted, and replayed traffic.
//!
//! Exit codes: 0 success; 1 invalid input (a state file breaks a rule, cannot be
//! decoded or is larger than its format allows, a trace line is malformed, an import
//! in a trace is refused); 2 usage: bad arguments (clap) or an input file that cannot
//! be opened or read (as `vlapic run` for its `--restore` file); 3 I/O error writing
//! an output. Errors are one line: file, field, byte offset, reason.

use clap::{Args, ValueEnum};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use vlapic::lvt::{self, Lvt, TimerMode};
use vlapic::state::kvm::{self, KvmExtra};
use vlapic::state::{bhyve, native, Field, ImportError, LapicState};
use vlapic::{ApicMode, Delivery, LapicConfig, LocalApic, TimerClock};

/// Examples and exit codes for `vlapic --help`.
pub const HELP_EXAMPLES: &str = "\
Examples:
  vlapic inspect cpu0.kvm
      Readable view of saved state (mode, ID, TPR/PPR, ISR/IRR/TMR, LVTs, timer, APIC base),
      then every import rule it breaks, each with its byte offset.
  vlapic inspect --json --format bhyve cpu0.bin
      The same as one JSON object (\"schema\": 1; keys mode, id, tpr, ppr, isr, irr, tmr, timer,
      apic_base, ...).
  vlapic convert --to native --apic-base 0xFEE00900 --now 5000 cpu0.kvm cpu0.vlapic
      Validate as import does (invalid state is refused, the rule named) and convert; the input
      format is detected as inspect does (--from to name it).
  vlapic replay guest.trace
      Drive a fresh APIC through a trace of register accesses and interrupts (see replay --help);
      every output line starts with its trace line number. --json: one object.

State formats: native (vlapic's versioned file), kvm (bare 1024-byte kvm_lapic_state page),
bhyve (200-byte vdi_lapic_v1), json. See docs/state-formats.md.

JSON output (inspect --json, replay --json) carries \"schema\": 1; within a schema version keys
keep their names, types and meanings. Numbers (vectors, register values, addresses) are JSON
integers; a value that does not exist is null, never 0.

Exit codes (inspect, convert, replay): 0 success; 1 invalid state, undecodable or oversized file
or bad trace line (one line names the file, field and byte offset); 2 usage error or unreadable
input file; 3 I/O error writing an output.

Size limits, checked before reading: kvm 1024 bytes, bhyve 200, native 270, json 64 KiB (64 KiB
when the format is detected), replay traces 64 MiB.";

/// Exit code: invalid state, undecodable file, bad trace.
const EXIT_INVALID: u8 = 1;
/// Exit code: usage error, including an input file that cannot be opened or read.
const EXIT_USAGE: u8 = 2;
/// Exit code: I/O error writing an output.
const EXIT_IO: u8 = 3;

/// A state file format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// vlapic's versioned binary format (magic VLAPICST, postcard body, CRC-32).
    Native,
    /// KVM's `struct kvm_lapic_state`: the bare 1024-byte page of KVM_GET_LAPIC.
    Kvm,
    /// illumos bhyve's `struct vdi_lapic_v1` (200 bytes).
    Bhyve,
    /// The native state as JSON, for people.
    Json,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Native => "native",
            Format::Kvm => "kvm",
            Format::Bhyve => "bhyve",
            Format::Json => "json",
        }
    }

    /// Byte offset of a field in this format, if it has one.
    fn offset(self, state: &LapicState, field: Field) -> Option<usize> {
        match self {
            Format::Native => Some(native::field_offset(state, field)),
            Format::Kvm => kvm::field_offset(field),
            Format::Bhyve => bhyve::field_offset(field),
            Format::Json => None,
        }
    }
}

/// Parses a number in decimal or 0x-hex.
fn parse_num(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(&h.replace('_', ""), 16),
        None => t.replace('_', "").parse::<u64>(),
    };
    r.map_err(|_| format!("`{s}` is not a number (decimal or 0x-hex)"))
}

/// Options shared by `inspect` and `convert`: what the files leave out and the
/// destination APIC the rules are checked against.
#[derive(Args, Debug, Clone)]
pub struct StateOpts {
    /// IA32_APIC_BASE for a `kvm` input (the page does not hold it). Default:
    /// 0xFEE00900 (an enabled xAPIC BSP), or 0xFEE00D00 (x2APIC) when the page's ID and
    /// LDR are x2APIC-shaped (LDR = the x2APIC LDR derived from the ID register).
    #[arg(long, value_parser = parse_num)]
    apic_base: Option<u64>,
    /// IA32_TSC_DEADLINE for `kvm` and `bhyve` inputs.
    #[arg(long, value_parser = parse_num, default_value = "0")]
    tsc_deadline: u64,
    /// VM time in ns at which the state was saved (a KVM page's current count is
    /// relative to it; the expiry is absolute).
    #[arg(long, value_parser = parse_num, default_value = "0")]
    now: u64,
    /// Initial APIC ID of the destination (default: the state's own ID).
    #[arg(long, value_parser = parse_num)]
    apic_id: Option<u64>,
    /// Nanoseconds per APIC bus cycle (timer ticks are this times the divisor).
    #[arg(long, value_parser = parse_num, default_value = "1")]
    bus_cycle_ns: u64,
    /// Guest TSC frequency in Hz (TSC-deadline mode).
    #[arg(long, value_parser = parse_num, default_value = "1000000000")]
    tsc_hz: u64,
}

impl Default for StateOpts {
    fn default() -> Self {
        Self {
            apic_base: None,
            tsc_deadline: 0,
            now: 0,
            apic_id: None,
            bus_cycle_ns: 1,
            tsc_hz: 1_000_000_000,
        }
    }
}

impl StateOpts {
    fn clock(&self) -> TimerClock {
        TimerClock {
            bus_cycle_ns: u32::try_from(self.bus_cycle_ns).unwrap_or(u32::MAX),
            tsc_hz: self.tsc_hz,
        }
    }

    /// The configuration the rules are checked against.
    fn config(&self, state: &LapicState) -> LapicConfig {
        let mut cfg = state.implied_config();
        if let Some(id) = self.apic_id {
            cfg.apic_id = u32::try_from(id).unwrap_or(u32::MAX);
        }
        cfg.clock = self.clock();
        cfg
    }
}

/// Arguments of `vlapic inspect`.
#[derive(Args, Debug)]
#[command(
    after_help = "Example:\n  vlapic inspect --format kvm --apic-base 0xFEE00900 cpu0.lapic\n  vlapic inspect --json cpu0.vlapic\n\nA kvm page does not hold IA32_APIC_BASE: without --apic-base it is taken as an enabled\nxAPIC BSP, or as x2APIC when the page's ID and LDR are x2APIC-shaped (reported as inferred).\n\n--json prints one object with \"schema\": 1 (stable keys; see docs/state-formats.md):\nnumbers are JSON integers, a value that does not exist is null.\n\nExit codes: 0 valid, 1 invalid, undecodable or too large (every broken rule is listed), 2 unreadable file."
)]
pub struct InspectArgs {
    /// Input format (default: detected from the magic or the size).
    #[arg(long, value_enum)]
    format: Option<Format>,
    /// Print one JSON object ("schema": 1; keys mode, id, tpr, ppr, isr, irr, tmr, timer,
    /// apic_base, ...).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    opts: StateOpts,
    /// The state file.
    file: PathBuf,
}

/// Arguments of `vlapic convert`.
#[derive(Args, Debug)]
#[command(
    after_help = "Example:\n  vlapic convert --to kvm --now 5000000 cpu0.bhyve cpu0.kvm\n\nWithout --from the input format is detected as inspect does (native magic, 1024-byte kvm\npage, 200-byte bhyve, JSON).\nThe input is validated as import does; invalid state is refused (exit 1, the rule named).\nExit codes: 0 converted, 1 invalid, undecodable or too large input, 2 unreadable input, 3 output not written."
)]
pub struct ConvertArgs {
    /// Input format (default: detected from the magic or the size, as inspect does).
    #[arg(long, value_enum)]
    from: Option<Format>,
    /// Output format.
    #[arg(long, value_enum)]
    to: Format,
    #[command(flatten)]
    opts: StateOpts,
    /// Input file.
    input: PathBuf,
    /// Output file.
    output: PathBuf,
}

/// Arguments of `vlapic replay`.
#[derive(Args, Debug)]
#[command(
    after_help = "Trace lines (numbers decimal or 0x-hex, `#` starts a comment):\n  time NS | mmio-read OFF | mmio-write OFF VALUE | msr-read MSR | msr-write MSR VALUE\n  irq VECTOR edge|level | ack | eoi | export kvm|bhyve|native FILE | import kvm|bhyve|native FILE\n\nExample trace:\n  mmio-write 0xF0 0x1FF   # software enable\n  irq 0x41 level\n  ack                     # prints 3: 0x41\n  mmio-read 0xA0          # prints 4: 0xa0 = 0x40 (PPR)\n  eoi                     # prints 5: ioapic-eoi 0x41\n\nOne fresh APIC: ID 0, BSP, xAPIC mode at 0xFEE00000, verifier on. Every output line starts\nwith the number of the trace line that produced it (`N: `). Reads print `OFF = VALUE` or\n`MSR = #GP`; faulting writes print `MSR <- #GP`; ack prints the vector or `none`. The last\nlines (`end: `) give the verifier's violations and deepest nesting.\n--json prints one object instead: {\"schema\": 1, \"trace\", \"events\": [{\"line\", \"kind\", ...}],\n\"verifier\": {...}, \"error\": null or {\"line\", \"message\"}} (see docs/state-formats.md).\nExit codes: 0 done, 1 bad trace line, refused import or trace over 64 MiB, 2 unreadable trace or imported file, 3 export not written."
)]
pub struct ReplayArgs {
    /// Print one JSON object ("schema": 1) with every event and its trace line.
    #[arg(long)]
    json: bool,
    /// The trace file.
    trace: PathBuf,
}

/// A failure with its exit code and one-line message.
struct Failure {
    code: u8,
    msg: String,
}

impl Failure {
    fn invalid(msg: String) -> Self {
        Self {
            code: EXIT_INVALID,
            msg,
        }
    }

    fn io(path: &Path, e: std::io::Error) -> Self {
        Self {
            code: EXIT_IO,
            msg: format!("{}: {e}", path.display()),
        }
    }

    /// An input that cannot be opened or read: a usage error, as in `vlapic run`.
    fn unreadable(path: &Path, e: std::io::Error) -> Self {
        Self {
            code: EXIT_USAGE,
            msg: format!("{}: {e}", path.display()),
        }
    }
}

fn finish(r: Result<ExitCode, Failure>) -> ExitCode {
    match r {
        Ok(c) => c,
        Err(f) => {
            eprintln!("vlapic: {}", f.msg);
            ExitCode::from(f.code)
        }
    }
}

fn detect(bytes: &[u8]) -> Option<Format> {
    if bytes.starts_with(&native::MAGIC) {
        Some(Format::Native)
    } else if bytes.len() == kvm::PAGE_SIZE {
        Some(Format::Kvm)
    } else if bytes.len() == bhyve::SIZE {
        Some(Format::Bhyve)
    } else if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
        Some(Format::Json)
    } else {
        None
    }
}

/// Where the state's IA32_APIC_BASE came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BaseFrom {
    /// The file holds it (native, bhyve, json).
    File,
    /// `--apic-base` (or the replay's own APIC).
    Option,
    /// A kvm page without `--apic-base`: an enabled xAPIC BSP.
    Default,
    /// A kvm page without `--apic-base` whose ID and LDR are x2APIC-shaped.
    InferredX2Apic,
}

impl BaseFrom {
    fn name(self) -> &'static str {
        match self {
            BaseFrom::File => "file",
            BaseFrom::Option => "option",
            BaseFrom::Default => "default",
            BaseFrom::InferredX2Apic => "inferred-x2apic",
        }
    }
}

/// A KVM page saved in x2APIC mode: the ID register holds the full 32-bit ID and LDR
/// is the logical ID derived from it (member bit in 15:0, cluster in 31:16). In an
/// xAPIC page LDR bits 23:0 are reserved, so such an LDR is never valid xAPIC state.
fn x2apic_shaped(page: &[u8]) -> bool {
    let word = |off: usize| -> Option<u32> {
        let b = page.get(off..off.checked_add(4)?)?;
        Some(u32::from_le_bytes(b.try_into().ok()?))
    };
    page.len() == kvm::PAGE_SIZE
        && matches!((word(0x20), word(0xD0)), (Some(id), Some(ldr)) if ldr == vlapic::regs::x2apic_ldr(id))
}

/// The IA32_APIC_BASE a kvm page is read with, and where it came from.
fn kvm_apic_base(bytes: &[u8], opts: &StateOpts) -> (u64, BaseFrom) {
    match opts.apic_base {
        Some(b) => (b, BaseFrom::Option),
        None if x2apic_shaped(bytes) => (
            KvmExtra::default().apic_base | vlapic::regs::APIC_BASE_EXTD,
            BaseFrom::InferredX2Apic,
        ),
        None => (KvmExtra::default().apic_base, BaseFrom::Default),
    }
}

/// Decodes bytes in a format; the error is `field (byte N): reason`.
fn decode(bytes: &[u8], fmt: Format, opts: &StateOpts) -> Result<(LapicState, BaseFrom), String> {
    let r = match fmt {
        Format::Native => native::decode_lapic(bytes),
        Format::Kvm => {
            let (apic_base, from) = kvm_apic_base(bytes, opts);
            let extra = KvmExtra {
                apic_base,
                tsc_deadline: opts.tsc_deadline,
            };
            return kvm::decode(bytes, extra, opts.now, &opts.clock())
                .map(|st| (st, from))
                .map_err(|e| e.to_string());
        }
        Format::Bhyve => bhyve::decode(bytes, opts.tsc_deadline),
        Format::Json => {
            return serde_json::from_slice::<LapicState>(bytes)
                .map(|st| (st, BaseFrom::File))
                .map_err(|e| format!("json (line {}, column {}): {e}", e.line(), e.column()))
        }
    };
    r.map(|st| (st, BaseFrom::File)).map_err(|e| e.to_string())
}

fn encode(state: &LapicState, fmt: Format, opts: &StateOpts) -> Vec<u8> {
    match fmt {
        Format::Native => native::encode_lapic(state),
        Format::Kvm => kvm::encode(state, opts.now, &opts.clock()).0.to_vec(),
        Format::Bhyve => bhyve::encode(state).to_vec(),
        Format::Json => {
            let mut s = serde_json::to_string_pretty(state).unwrap_or_default();
            s.push('\n');
            s.into_bytes()
        }
    }
}

/// `FILE: field (byte 0xNN): message` for a broken rule.
fn rule_line(path: &Path, fmt: Format, state: &LapicState, e: &ImportError) -> String {
    let field = e.field();
    let msg = e.to_string();
    let reason = msg
        .strip_prefix(field.name())
        .and_then(|m| m.strip_prefix(": "))
        .unwrap_or(&msg);
    match fmt.offset(state, field) {
        Some(off) => format!(
            "{}: {field} (byte {off:#x}): {reason} [{}]",
            path.display(),
            e.rule()
        ),
        None => format!(
            "{}: {field} ({} has no such field): {reason} [{}]",
            path.display(),
            fmt.name(),
            e.rule()
        ),
    }
}

/// Largest JSON state file: a pretty-printed `LapicState` is under 3 KiB; 64 KiB
/// leaves room for any hand formatting.
const MAX_JSON: u64 = 64 << 10;
/// Largest replay trace (about three million lines).
const MAX_TRACE: u64 = 64 << 20;

/// The most bytes a state file in `fmt` can hold (`None`: not known yet, the largest
/// of them), and how the limit is named in the error.
fn state_limit(fmt: Option<Format>) -> (u64, String) {
    let n = match fmt {
        Some(Format::Native) => native::MAX_LAPIC_FILE,
        Some(Format::Kvm) => kvm::PAGE_SIZE,
        Some(Format::Bhyve) => bhyve::SIZE,
        Some(Format::Json) | None => MAX_JSON as usize,
    };
    let what = match fmt {
        Some(f) => format!("the most a {} state file can be", f.name()),
        None => "the most any state format takes".into(),
    };
    (n as u64, what)
}

fn too_large(path: &Path, limit: u64, what: &str) -> Failure {
    Failure::invalid(format!(
        "{}: file (byte {limit:#x}): larger than {limit} bytes, {what}",
        path.display()
    ))
}

/// Reads at most `limit` bytes: a longer input is refused before it is read into
/// memory (a regular file by its size, anything else after `limit + 1` bytes).
fn read(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>, Failure> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(|e| Failure::unreadable(path, e))?;
    let meta = file.metadata().map_err(|e| Failure::unreadable(path, e))?;
    if meta.is_file() && meta.len() > limit {
        return Err(too_large(path, limit, what));
    }
    let mut bytes = Vec::new();
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| Failure::unreadable(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(too_large(path, limit, what));
    }
    Ok(bytes)
}

/// A decoded state file.
struct Loaded {
    state: LapicState,
    fmt: Format,
    base_from: BaseFrom,
}

/// Reads and decodes a state file; without `fmt` the format is detected (`flag`
/// names the option that sets it, for the error).
fn load(path: &Path, fmt: Option<Format>, flag: &str, opts: &StateOpts) -> Result<Loaded, Failure> {
    let (limit, what) = state_limit(fmt);
    let bytes = read(path, limit, &what)?;
    let fmt = match fmt.or_else(|| detect(&bytes)) {
        Some(f) => {
            let (limit, what) = state_limit(Some(f));
            if bytes.len() as u64 > limit {
                return Err(too_large(path, limit, &what));
            }
            f
        }
        None => {
            return Err(Failure::invalid(format!(
                "{}: format (byte 0x0): not recognised ({} bytes); use {flag}",
                path.display(),
                bytes.len()
            )))
        }
    };
    let (state, base_from) = decode(&bytes, fmt, opts)
        .map_err(|e| Failure::invalid(format!("{}: {e}", path.display())))?;
    Ok(Loaded {
        state,
        fmt,
        base_from,
    })
}

/// Version of the `inspect --json` and `replay --json` objects (their `"schema"`
/// key). Raised when a key is removed or renamed or changes type or meaning.
const JSON_SCHEMA: u32 = 1;

mod trace_replay;
mod view;

pub use trace_replay::replay;
use view::{stdout_color, text, view};

// ----- inspect and convert --------------------------------------------------------

fn inspect_inner(a: &InspectArgs) -> Result<ExitCode, Failure> {
    let l = load(&a.file, a.format, "--format", &a.opts)?;
    let errors = l.state.validate(&a.opts.config(&l.state));
    let v = view(&l, &a.file, &a.opts, &errors);
    if a.json {
        println!("{v}");
    } else {
        print!("{}", text(&v, &l, &a.file, &errors, stdout_color()));
    }
    Ok(if errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_INVALID)
    })
}

/// `vlapic inspect`.
pub fn inspect(a: InspectArgs) -> ExitCode {
    finish(inspect_inner(&a))
}

// ----- convert ------------------------------------------------------------------

fn convert_inner(a: &ConvertArgs) -> Result<ExitCode, Failure> {
    let Loaded {
        state,
        fmt,
        base_from,
    } = load(&a.input, a.from, "--from", &a.opts)?;
    if base_from == BaseFrom::InferredX2Apic {
        eprintln!(
            "vlapic: {}: apic_base {:#x} inferred (x2APIC-shaped ID and LDR; --apic-base sets it)",
            a.input.display(),
            state.apic_base
        );
    }
    if let Err(e) = state.check(&a.opts.config(&state)) {
        return Err(Failure::invalid(rule_line(&a.input, fmt, &state, &e)));
    }
    let out = encode(&state, a.to, &a.opts);
    std::fs::write(&a.output, out).map_err(|e| Failure::io(&a.output, e))?;
    if a.to == Format::Kvm {
        eprintln!(
            "vlapic: {}: not in the KVM page: apic_base {:#x}, tsc_deadline {:#x}",
            a.output.display(),
            state.apic_base,
            state.tsc_deadline
        );
        if state.esr_pending != 0 {
            eprintln!(
                "vlapic: {}: esr_pending {:#x} dropped (KVM has no such latch)",
                a.output.display(),
                state.esr_pending
            );
        }
    }
    if a.to == Format::Bhyve && state.tsc_deadline != 0 {
        eprintln!(
            "vlapic: {}: not in vdi_lapic_v1: tsc_deadline {:#x}",
            a.output.display(),
            state.tsc_deadline
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `vlapic convert`.
pub fn convert(a: ConvertArgs) -> ExitCode {
    finish(convert_inner(&a))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(id: u32, ldr: u32) -> Vec<u8> {
        let mut p = vec![0u8; kvm::PAGE_SIZE];
        p[0x20..0x24].copy_from_slice(&id.to_le_bytes());
        p[0xD0..0xD4].copy_from_slice(&ldr.to_le_bytes());
        p
    }

    #[test]
    fn x2apic_shape_is_the_derived_ldr() {
        // x2APIC pages: the full ID, LDR = cluster << 16 | 1 << (id & 15).
        assert!(x2apic_shaped(&page(0, 0x1)));
        assert!(x2apic_shaped(&page(0x25, 0x0002_0020)));
        // xAPIC pages: ID in bits 31:24, LDR bits 23:0 reserved.
        assert!(!x2apic_shaped(&page(0, 0)));
        assert!(!x2apic_shaped(&page(0x0300_0000, 0x0800_0000)));
        // An LDR that is not the derived one is not inferred.
        assert!(!x2apic_shaped(&page(0x25, 0x1)));
        assert!(!x2apic_shaped(&page(0, 0x1)[..100]));
        let opts = StateOpts::default();
        assert_eq!(
            kvm_apic_base(&page(3, vlapic::regs::x2apic_ldr(3)), &opts),
            (0xFEE0_0D00, BaseFrom::InferredX2Apic)
        );
        assert_eq!(
            kvm_apic_base(&page(3 << 24, 0), &opts),
            (0xFEE0_0900, BaseFrom::Default)
        );
        let opts = StateOpts {
            apic_base: Some(0xFEE0_0800),
            ..StateOpts::default()
        };
        assert_eq!(
            kvm_apic_base(&page(0, 1), &opts),
            (0xFEE0_0800, BaseFrom::Option)
        );
    }
}

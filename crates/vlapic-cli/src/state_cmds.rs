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

// ----- inspect ------------------------------------------------------------------

fn mode_name(state: &LapicState) -> &'static str {
    match state.mode() {
        Some(ApicMode::Disabled) => "disabled",
        Some(ApicMode::XApic) => "xapic",
        Some(ApicMode::X2Apic) => "x2apic",
        None => "invalid",
    }
}

fn timer_mode_name(m: Option<TimerMode>) -> &'static str {
    match m {
        Some(TimerMode::OneShot) => "one-shot",
        Some(TimerMode::Periodic) => "periodic",
        Some(TimerMode::TscDeadline) => "tsc-deadline",
        None => "reserved",
    }
}

fn lvt_name(e: Lvt) -> &'static str {
    match e {
        Lvt::Cmci => "cmci",
        Lvt::Timer => "timer",
        Lvt::Thermal => "thermal",
        Lvt::Perf => "perf",
        Lvt::Lint0 => "lint0",
        Lvt::Lint1 => "lint1",
        Lvt::Error => "error",
    }
}

fn lvt_json(e: Lvt, v: u32) -> Value {
    let mode = e
        .delivery_mode(v)
        .map(|m| format!("{m:?}").to_lowercase())
        .unwrap_or_else(|| "reserved".into());
    let mut o = json!({
        "value": v,
        "vector": lvt::vector(v),
        "masked": lvt::is_masked(v),
        "delivery_mode": mode,
    });
    if matches!(e, Lvt::Lint0 | Lvt::Lint1) {
        o["level_triggered"] = json!(v & lvt::LVT_LEVEL != 0);
        o["active_low"] = json!(v & lvt::LVT_POLARITY_LOW != 0);
        o["remote_irr"] = json!(v & lvt::LVT_REMOTE_IRR != 0);
    }
    if e == Lvt::Timer {
        o["timer_mode"] = json!(timer_mode_name(TimerMode::from_lvt(v)));
    }
    o
}

/// Version of the `inspect --json` and `replay --json` objects (their `"schema"`
/// key). Raised when a key is removed or renamed or changes type or meaning.
const JSON_SCHEMA: u32 = 1;

fn view(l: &Loaded, path: &Path, opts: &StateOpts, errors: &[ImportError]) -> Value {
    let (state, fmt) = (&l.state, l.fmt);
    let clock = opts.clock();
    let vecs = |ws: &[u32; 8]| -> Vec<u8> { vlapic::VectorSet::from_words(*ws).iter().collect() };
    let mut lvts = serde_json::Map::new();
    for e in Lvt::ALL {
        lvts.insert(lvt_name(e).into(), lvt_json(e, state.lvt(e)));
    }
    let base = state.apic_base;
    json!({
        "schema": JSON_SCHEMA,
        "file": path.display().to_string(),
        "format": fmt.name(),
        "mode": mode_name(state),
        "id": state.id,
        "version": state.version,
        "tpr": state.tpr,
        "ppr": state.ppr(),
        "apr": state.apr,
        "ldr": state.ldr,
        "dfr": state.dfr,
        "svr": state.svr,
        "software_enabled": state.svr & vlapic::regs::SVR_ENABLE != 0,
        "spurious_vector": state.svr & 0xFF,
        "isr": vecs(&state.isr),
        "irr": vecs(&state.irr),
        "tmr": vecs(&state.tmr),
        "esr": state.esr,
        "esr_pending": state.esr_pending,
        "icr": state.icr,
        "lvt": lvts,
        "timer": {
            "mode": timer_mode_name(state.timer_mode()),
            "initial_count": state.timer_initial,
            "divide_config": state.timer_divide,
            "divisor": vlapic::timer::divisor(state.timer_divide),
            "armed": state.timer_deadline != 0,
            "deadline_ns": (state.timer_deadline != 0).then_some(state.timer_deadline),
            "current_count": kvm::current_count(state, opts.now, &clock),
            "now_ns": opts.now,
            "tsc_deadline": state.tsc_deadline,
        },
        "apic_base": base,
        "apic_base_from": l.base_from.name(),
        "apic_base_decoded": {
            "address": base & !0xFFF,
            "enabled": base & vlapic::regs::APIC_BASE_EN != 0,
            "x2apic": base & vlapic::regs::APIC_BASE_EXTD != 0,
            "bsp": base & vlapic::regs::APIC_BASE_BSP != 0,
        },
        "valid": errors.is_empty(),
        "violations": errors.iter().map(|e| json!({
            "rule": e.rule(),
            "field": e.field().name(),
            "offset": fmt.offset(state, e.field()),
            "message": e.to_string(),
        })).collect::<Vec<_>>(),
    })
}

fn hexlist(v: &Value) -> String {
    let items: Vec<String> = v
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_u64)
                .map(|n| format!("{n:#04x}"))
                .collect()
        })
        .unwrap_or_default();
    format!("[{}]", items.join(", "))
}

/// `INVALID` in red when `color` (standard output is a terminal and `NO_COLOR` is
/// unset).
fn invalid_word(color: bool) -> &'static str {
    if color {
        "\x1b[1;31mINVALID\x1b[0m"
    } else {
        "INVALID"
    }
}

/// Colour only for a person at a terminal (<https://no-color.org>).
fn stdout_color() -> bool {
    use std::io::IsTerminal as _;
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

fn text(v: &Value, l: &Loaded, path: &Path, errors: &[ImportError], color: bool) -> String {
    let (state, fmt) = (&l.state, l.fmt);
    let mut o = String::new();
    let t = &v["timer"];
    let b = &v["apic_base_decoded"];
    let _ = writeln!(o, "{} ({})", path.display(), fmt.name());
    let _ = writeln!(
        o,
        "mode       {}   id {:#x}   version {:#x}",
        mode_name(state),
        state.id,
        state.version
    );
    let _ = writeln!(
        o,
        "apic_base  {:#x} (address {:#x}{}{}{})",
        state.apic_base,
        state.apic_base & !0xFFF,
        if b["enabled"] == true { ", EN" } else { "" },
        if b["x2apic"] == true { ", EXTD" } else { "" },
        if b["bsp"] == true { ", BSP" } else { "" },
    );
    match l.base_from {
        BaseFrom::InferredX2Apic => {
            let _ = writeln!(
                o,
                "           inferred: x2APIC, as the page's ID and LDR are x2APIC-shaped (a kvm page has no APIC base; --apic-base sets it)"
            );
        }
        BaseFrom::Default => {
            let _ = writeln!(
                o,
                "           assumed: a kvm page has no APIC base (--apic-base sets it)"
            );
        }
        BaseFrom::File | BaseFrom::Option => {}
    }
    let _ = writeln!(
        o,
        "tpr {:#04x}   ppr {:#04x}   apr {:#04x}",
        state.tpr,
        state.ppr(),
        state.apr
    );
    let _ = writeln!(
        o,
        "ldr {:#010x}   dfr {:#010x}   svr {:#x} ({}, spurious vector {:#04x})",
        state.ldr,
        state.dfr,
        state.svr,
        if state.svr & vlapic::regs::SVR_ENABLE != 0 {
            "software-enabled"
        } else {
            "software-disabled"
        },
        state.svr & 0xFF
    );
    let _ = writeln!(o, "isr {}", hexlist(&v["isr"]));
    let _ = writeln!(o, "irr {}", hexlist(&v["irr"]));
    let _ = writeln!(o, "tmr {}", hexlist(&v["tmr"]));
    let _ = writeln!(
        o,
        "esr {:#x}   esr_pending {:#x}   icr {:#x}",
        state.esr, state.esr_pending, state.icr
    );
    for e in Lvt::ALL {
        let l = &v["lvt"][lvt_name(e)];
        let mut extra = String::new();
        if e == Lvt::Timer {
            extra = format!(" {}", l["timer_mode"].as_str().unwrap_or(""));
        }
        if matches!(e, Lvt::Lint0 | Lvt::Lint1) {
            extra = format!(
                " {}{}{}",
                if l["level_triggered"] == true {
                    "level"
                } else {
                    "edge"
                },
                if l["active_low"] == true {
                    " active-low"
                } else {
                    ""
                },
                if l["remote_irr"] == true {
                    " remote-irr"
                } else {
                    ""
                },
            );
        }
        let _ = writeln!(
            o,
            "lvt {:<8}{:#010x} {} vector {:#04x} {}{}",
            lvt_name(e),
            state.lvt(e),
            if l["masked"] == true {
                "masked  "
            } else {
                "unmasked"
            },
            state.lvt(e) & 0xFF,
            l["delivery_mode"].as_str().unwrap_or(""),
            extra
        );
    }
    let _ = writeln!(
        o,
        "timer      {} initial {:#x} divide {:#x} (/{}) {} current count {:#x} at {} ns tsc_deadline {:#x}",
        t["mode"].as_str().unwrap_or(""),
        state.timer_initial,
        state.timer_divide,
        t["divisor"],
        if state.timer_deadline == 0 { "not armed,".to_string() } else { format!("expires at {} ns,", state.timer_deadline) },
        t["current_count"].as_u64().unwrap_or(0),
        t["now_ns"],
        state.tsc_deadline
    );
    if errors.is_empty() {
        let _ = writeln!(o, "valid: every import rule holds");
    } else {
        let _ = writeln!(
            o,
            "{}: {} rule(s) broken",
            invalid_word(color),
            errors.len()
        );
        for e in errors {
            let _ = writeln!(o, "  {}", rule_line(path, fmt, state, e));
        }
    }
    o
}

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

// ----- replay -------------------------------------------------------------------

fn state_format(word: &str) -> Option<Format> {
    match word {
        "kvm" => Some(Format::Kvm),
        "bhyve" => Some(Format::Bhyve),
        "native" => Some(Format::Native),
        "json" => Some(Format::Json),
        _ => None,
    }
}

/// `LowestPriority` -> `lowest_priority`: enum names in replay's JSON.
fn snake(debug: impl std::fmt::Debug) -> String {
    let mut o = String::new();
    for (i, c) in format!("{debug:?}").chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                o.push('_');
            }
            o.push(c.to_ascii_lowercase());
        } else {
            o.push(c);
        }
    }
    o
}

/// One thing a trace line produced: its text (after `N: `) and its JSON form.
struct Event {
    /// Trace line number (1-based).
    line: usize,
    text: String,
    json: Value,
}

/// What a replay produced: the events in order, then the verifier's summary.
#[derive(Default)]
struct Replay {
    events: Vec<Event>,
    verifier: Vec<String>,
    verifier_json: Value,
}

impl Replay {
    fn push(&mut self, line: usize, text: String, mut json: Value) {
        json["line"] = json!(line);
        self.events.push(Event { line, text, json });
    }

    /// Text form: every event line prefixed with its trace line, the summary with `end`.
    fn text(&self) -> String {
        let mut o = String::new();
        for e in &self.events {
            let _ = writeln!(o, "{}: {}", e.line, e.text);
        }
        for l in &self.verifier {
            let _ = writeln!(o, "end: {l}");
        }
        o
    }

    /// JSON form (schema [`JSON_SCHEMA`]).
    fn json(&self, trace: &Path, error: Option<(usize, &str)>) -> Value {
        json!({
            "schema": JSON_SCHEMA,
            "trace": trace.display().to_string(),
            "events": self.events.iter().map(|e| e.json.clone()).collect::<Vec<_>>(),
            "verifier": self.verifier_json,
            "error": error.map(|(line, message)| json!({"line": line, "message": message})),
        })
    }
}

/// A replay failure: the trace line it happened at and the failure itself.
struct ReplayFailure {
    line: usize,
    failure: Failure,
}

/// Runs a trace; events go to `out`, and at the end (also after a failure) the
/// verifier's summary.
fn replay_trace(path: &Path, text: &str, out: &mut Replay) -> Result<(), ReplayFailure> {
    let cfg = LapicConfig::default().with_verify(true);
    let mut apic = LocalApic::new(cfg);
    let r = replay_lines(path, text, &mut apic, out);
    let ver = apic.verifier();
    out.verifier
        .push(format!("verifier violations {}", ver.violations()));
    let first = ver.first_violation();
    if let Some(v) = first {
        out.verifier.push(format!(
            "verifier first {:?} at {:?} vector {:?}",
            v.kind, v.at, v.vector
        ));
    }
    out.verifier
        .push(format!("deepest nesting {}", ver.max_depth()));
    out.verifier_json = json!({
        "violations": ver.violations(),
        "first": first.map(|v| json!({
            "kind": snake(v.kind),
            "at": snake(v.at),
            "vector": v.vector,
        })),
        "max_depth": ver.max_depth(),
    });
    r
}

fn replay_lines(
    path: &Path,
    text: &str,
    apic: &mut LocalApic,
    out: &mut Replay,
) -> Result<(), ReplayFailure> {
    let mut now: u64 = 0;
    for (i, raw) in text.lines().enumerate() {
        let lineno = i.saturating_add(1);
        replay_line(path, raw, lineno, apic, &mut now, out).map_err(|failure| ReplayFailure {
            line: lineno,
            failure,
        })?;
    }
    Ok(())
}

fn replay_line(
    path: &Path,
    raw: &str,
    lineno: usize,
    apic: &mut LocalApic,
    now: &mut u64,
    out: &mut Replay,
) -> Result<(), Failure> {
    let line = raw.split('#').next().unwrap_or("").trim();
    if line.is_empty() {
        return Ok(());
    }
    let bad =
        |msg: String| Failure::invalid(format!("{}:{lineno}: {msg}: `{line}`", path.display()));
    let words: Vec<&str> = line.split_whitespace().collect();
    let num = |k: usize| -> Result<u64, Failure> {
        let w = words.get(k).ok_or_else(|| bad("missing operand".into()))?;
        parse_num(w).map_err(bad)
    };
    let arity = |n: usize| -> Result<(), Failure> {
        if words.len() == n.saturating_add(1) {
            Ok(())
        } else {
            Err(bad(format!("expected {n} operand(s)")))
        }
    };
    let u32_of = |v: u64| u32::try_from(v).map_err(|_| bad("value does not fit 32 bits".into()));
    let op = words.first().copied().unwrap_or("");
    let mut effects = vlapic::Effects::default();
    match op {
        "time" => {
            arity(1)?;
            let t = num(1)?;
            if t > *now {
                *now = t;
            }
            if apic.advance(*now) {
                out.push(
                    lineno,
                    "timer-expired".into(),
                    json!({"kind": "timer_expired", "now_ns": *now}),
                );
            }
        }
        "mmio-read" => {
            arity(1)?;
            let off = num(1)?;
            if off > 0xFFF {
                return Err(bad("offset beyond the 4 KiB page".into()));
            }
            let v = apic.read_register(off, *now);
            out.push(
                lineno,
                format!("{off:#x} = {v:#x}"),
                json!({"kind": "mmio_read", "offset": off, "value": v}),
            );
        }
        "mmio-write" => {
            arity(2)?;
            let off = num(1)?;
            if off > 0xFFF {
                return Err(bad("offset beyond the 4 KiB page".into()));
            }
            effects = apic.write_register(off, u32_of(num(2)?)?, *now);
        }
        "msr-read" => {
            arity(1)?;
            let msr = u32_of(num(1)?)?;
            match apic.read_msr(msr, *now) {
                Ok(v) => out.push(
                    lineno,
                    format!("{msr:#x} = {v:#x}"),
                    json!({"kind": "msr_read", "msr": msr, "value": v, "gp": false}),
                ),
                Err(_) => out.push(
                    lineno,
                    format!("{msr:#x} = #GP"),
                    json!({"kind": "msr_read", "msr": msr, "value": null, "gp": true}),
                ),
            }
        }
        "msr-write" => {
            arity(2)?;
            let msr = u32_of(num(1)?)?;
            let value = num(2)?;
            match apic.write_msr(msr, value, *now) {
                Ok(fx) => effects = fx,
                Err(_) => out.push(
                    lineno,
                    format!("{msr:#x} <- #GP"),
                    json!({"kind": "msr_write_gp", "msr": msr, "value": value}),
                ),
            }
        }
        "irq" => {
            arity(2)?;
            let v = u8::try_from(num(1)?).map_err(|_| bad("vector above 255".into()))?;
            let d = match words.get(2).copied() {
                Some("edge") => Delivery::fixed(v),
                Some("level") => Delivery::fixed_level(v),
                _ => return Err(bad("trigger must be `edge` or `level`".into())),
            };
            apic.deliver(d, *now);
        }
        "ack" => {
            arity(0)?;
            let v = apic.acknowledge();
            out.push(
                lineno,
                v.map_or_else(|| "none".to_string(), |v| format!("{v:#x}")),
                json!({"kind": "ack", "vector": v}),
            );
        }
        "eoi" => {
            arity(0)?;
            effects = match apic.mode() {
                ApicMode::XApic => apic.write_register(0xB0, 0, *now),
                ApicMode::X2Apic => apic.write_msr(0x80B, 0, *now).unwrap_or_default(),
                ApicMode::Disabled => vlapic::Effects::default(),
            };
        }
        "export" | "import" => {
            arity(2)?;
            let fmt = words
                .get(1)
                .copied()
                .and_then(state_format)
                .ok_or_else(|| bad("format must be kvm, bhyve, native or json".into()))?;
            let file = PathBuf::from(words.get(2).copied().unwrap_or(""));
            let cur = apic.export();
            // The replayed APIC's own base and deadline: what a kvm page leaves out.
            let opts = StateOpts {
                now: *now,
                apic_base: Some(cur.apic_base),
                tsc_deadline: cur.tsc_deadline,
                ..StateOpts::default()
            };
            if op == "export" {
                std::fs::write(&file, encode(&cur, fmt, &opts))
                    .map_err(|e| Failure::io(&file, e))?;
            } else {
                let l = load(&file, Some(fmt), "a format", &opts).map_err(|f| Failure {
                    code: f.code,
                    msg: format!("{}:{lineno}: {}", path.display(), f.msg),
                })?;
                apic.import(&l.state, *now).map_err(|e| {
                    Failure::invalid(format!(
                        "{}:{lineno}: {}",
                        path.display(),
                        rule_line(&file, l.fmt, &l.state, &e)
                    ))
                })?;
            }
        }
        _ => return Err(bad(format!("unknown operation `{op}`"))),
    }
    if let Some(v) = effects.eoi {
        out.push(
            lineno,
            format!("ioapic-eoi {v:#x}"),
            json!({"kind": "ioapic_eoi", "vector": v}),
        );
    }
    if let Some(ipi) = effects.ipi {
        out.push(
            lineno,
            format!(
                "ipi {:?} vector {:#x} dest {:#x} {:?} {:?}",
                ipi.mode, ipi.vector, ipi.dest, ipi.dest_mode, ipi.shorthand
            ),
            json!({
                "kind": "ipi",
                "mode": snake(ipi.mode),
                "vector": ipi.vector,
                "dest": ipi.dest,
                "dest_mode": snake(ipi.dest_mode),
                "shorthand": snake(ipi.shorthand),
            }),
        );
    }
    Ok(())
}

fn replay_inner(a: &ReplayArgs) -> Result<ExitCode, Failure> {
    let bytes = read(&a.trace, MAX_TRACE, "the most a replay trace can be")?;
    let text = String::from_utf8(bytes).map_err(|e| {
        Failure::invalid(format!(
            "{}: byte {:#x}: not UTF-8",
            a.trace.display(),
            e.utf8_error().valid_up_to()
        ))
    })?;
    let mut out = Replay::default();
    let r = replay_trace(&a.trace, &text, &mut out);
    if a.json {
        let err = r.as_ref().err();
        println!(
            "{}",
            out.json(&a.trace, err.map(|f| (f.line, f.failure.msg.as_str())))
        );
    } else {
        // The events up to a failure; the verifier summary only after a full replay.
        if r.is_ok() {
            print!("{}", out.text());
        } else {
            for e in &out.events {
                println!("{}: {}", e.line, e.text);
            }
        }
    }
    r.map(|()| ExitCode::SUCCESS).map_err(|f| f.failure)
}

/// `vlapic replay`.
pub fn replay(a: ReplayArgs) -> ExitCode {
    finish(replay_inner(&a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_is_red_only_when_asked() {
        assert_eq!(invalid_word(false), "INVALID");
        assert_eq!(invalid_word(true), "\x1b[1;31mINVALID\x1b[0m");
    }

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

    #[test]
    fn enum_names_are_snake_case() {
        assert_eq!(
            snake(vlapic::DeliveryMode::LowestPriority),
            "lowest_priority"
        );
        assert_eq!(
            snake(vlapic::Shorthand::AllExcludingSelf),
            "all_excluding_self"
        );
        assert_eq!(snake(vlapic::DestMode::Physical), "physical");
    }
}

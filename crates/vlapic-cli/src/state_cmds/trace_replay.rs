//! `vlapic replay`: a fresh APIC driven through a trace of register accesses,
//! interrupts, exports and imports, each output line tagged with its trace line.

use super::*;

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

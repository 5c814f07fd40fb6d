//! `vlapic inspect`'s output: a loaded state as a JSON view and as readable text
//! (mode, registers, LVTs, timer, the import rules it breaks).

use super::*;

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

pub(super) fn view(l: &Loaded, path: &Path, opts: &StateOpts, errors: &[ImportError]) -> Value {
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
pub(super) fn invalid_word(color: bool) -> &'static str {
    if color {
        "\x1b[1;31mINVALID\x1b[0m"
    } else {
        "INVALID"
    }
}

/// Colour only for a person at a terminal (<https://no-color.org>).
pub(super) fn stdout_color() -> bool {
    use std::io::IsTerminal as _;
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

pub(super) fn text(
    v: &Value,
    l: &Loaded,
    path: &Path,
    errors: &[ImportError],
    color: bool,
) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_is_red_only_when_asked() {
        assert_eq!(invalid_word(false), "INVALID");
        assert_eq!(invalid_word(true), "\x1b[1;31mINVALID\x1b[0m");
    }
}

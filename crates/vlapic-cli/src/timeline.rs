//! The interrupt timeline read back from a `vlapic run --trace` file (Chrome trace-event
//! JSON): handlers, IPIs, instants and pauses per vCPU, and the `--text` digest.

use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// One handler: a vector in service from acknowledge to EOI.
#[derive(Clone, Debug, PartialEq)]
pub struct Handler {
    /// vCPU index.
    pub vcpu: usize,
    /// The vector.
    pub vector: u8,
    /// Start (µs of VM time).
    pub ts: f64,
    /// Duration (µs).
    pub dur: f64,
    /// Nesting depth (1 = not nested).
    pub depth: u8,
    /// Where it came from.
    pub source: String,
}

/// One IPI: sender, receiver, when.
#[derive(Clone, Debug, PartialEq)]
pub struct Ipi {
    /// Sending vCPU.
    pub from: usize,
    /// Receiving vCPU.
    pub to: usize,
    /// When (µs).
    pub ts: f64,
}

/// A point event on a vCPU: a timer expiry, NMI/INIT/SIPI, a verifier violation.
#[derive(Clone, Debug, PartialEq)]
pub struct Mark {
    /// vCPU index.
    pub vcpu: usize,
    /// When (µs).
    pub ts: f64,
    /// `timer`, `event` or `verifier`.
    pub cat: String,
    /// What (`timer 0xef`, `INIT`, `SIPI 0x09`, ...).
    pub name: String,
}

/// A pause of the whole VM (migration, save, restore) and what was in service.
#[derive(Clone, Debug, PartialEq)]
pub struct Pause {
    /// `migration`, `save`, `restore`, `migrate-to`, `incoming`.
    pub kind: String,
    /// When (µs).
    pub ts: f64,
    /// VM-time length (µs).
    pub dur: f64,
    /// Wall-clock downtime (µs).
    pub downtime_us: u64,
    /// In-service vectors per vCPU (`0x41 0x61`, or empty).
    pub isr: Vec<String>,
}

/// Everything the page and the digest show.
#[derive(Clone, Debug, Default)]
pub struct Model {
    /// vCPU lanes.
    pub vcpus: usize,
    /// Handlers, in file order (per vCPU, by end time).
    pub handlers: Vec<Handler>,
    /// IPIs.
    pub ipis: Vec<Ipi>,
    /// Timer expiries, events, violations.
    pub marks: Vec<Mark>,
    /// Pauses.
    pub pauses: Vec<Pause>,
    /// First and last time seen (µs from the first event: every time in the model
    /// is relative to it).
    pub span: (f64, f64),
    /// VM time of the first event (µs).
    pub origin_us: f64,
    /// `otherData.vlapic` figures: migrations, max_nesting, violations, outcome...
    pub summary: BTreeMap<String, String>,
}

/// A vCPU's deepest nesting: depth, the vectors in service then (outermost first),
/// and when (µs).
pub type Deepest = (u8, Vec<u8>, f64);

/// Largest vCPU index a trace may name (the VMM's limit).
const MAX_VCPUS: usize = 64;

fn num(e: &Value, k: &str) -> Option<f64> {
    e.get(k)?.as_f64().filter(|x| x.is_finite())
}

fn tid(e: &Value) -> Option<usize> {
    e.get("tid")?.as_u64().and_then(|t| usize::try_from(t).ok())
}

impl Model {
    /// Reads a trace. Errors are one line: what is wrong and where.
    pub fn parse(bytes: &[u8]) -> Result<Model, String> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
        let events = v
            .get("traceEvents")
            .and_then(Value::as_array)
            .ok_or("not a Chrome trace: no traceEvents array")?;
        let mut m = Model::default();
        if let Some(o) = v.pointer("/otherData/vlapic").and_then(Value::as_object) {
            for (k, x) in o {
                let s = match x {
                    Value::String(s) => s.clone(),
                    x => x.to_string(),
                };
                m.summary.insert(k.clone(), s);
            }
        }
        // Flow id -> (sender and time, receiver).
        type Ends = (Option<(usize, f64)>, Option<usize>);
        let mut flows: BTreeMap<u64, Ends> = BTreeMap::new();
        let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
        for (i, e) in events.iter().enumerate() {
            let bad = |what: &str| format!("traceEvents[{i}]: {what}");
            let ph = e.get("ph").and_then(Value::as_str).unwrap_or("");
            let cat = e.get("cat").and_then(Value::as_str).unwrap_or("");
            if ph == "M" {
                if e.get("name").and_then(Value::as_str) == Some("thread_name") {
                    let name = e
                        .pointer("/args/name")
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    if let Some(t) = tid(e).filter(|_| name.starts_with("vCPU ")) {
                        if t >= MAX_VCPUS {
                            return Err(bad("vCPU index above 63"));
                        }
                        m.vcpus = m.vcpus.max(t + 1);
                    }
                }
                continue;
            }
            let Some(ts) = num(e, "ts") else {
                continue; // events without a time are not drawn
            };
            let t = tid(e).ok_or_else(|| bad("no tid"))?;
            lo = lo.min(ts);
            hi = hi.max(ts + num(e, "dur").unwrap_or(0.0).max(0.0));
            match (ph, cat) {
                ("X", "irq") => {
                    let vector = e
                        .pointer("/args/vector")
                        .and_then(Value::as_u64)
                        .and_then(|x| u8::try_from(x).ok())
                        .ok_or_else(|| bad("handler without a vector 0-255"))?;
                    let depth = e
                        .pointer("/args/depth")
                        .and_then(Value::as_u64)
                        .map_or(1, |d| u8::try_from(d.clamp(1, 255)).unwrap_or(255));
                    let source = e
                        .pointer("/args/source")
                        .and_then(Value::as_str)
                        .unwrap_or("unknown")
                        .to_string();
                    let dur = num(e, "dur")
                        .ok_or_else(|| bad("handler without dur"))?
                        .max(0.0);
                    m.handlers.push(Handler {
                        vcpu: t,
                        vector,
                        ts,
                        dur,
                        depth,
                        source,
                    });
                }
                ("X", "pause") => {
                    let isr = e.pointer("/args/isr").and_then(Value::as_object);
                    let isr = (0..m.vcpus.max(1))
                        .map(|i| {
                            isr.and_then(|o| o.get(&i.to_string()))
                                .and_then(Value::as_array)
                                .map(|a| {
                                    a.iter()
                                        .filter_map(Value::as_str)
                                        .collect::<Vec<_>>()
                                        .join(" ")
                                })
                                .unwrap_or_default()
                        })
                        .collect();
                    m.pauses.push(Pause {
                        kind: e
                            .get("name")
                            .and_then(Value::as_str)
                            .unwrap_or("pause")
                            .into(),
                        ts,
                        dur: num(e, "dur").unwrap_or(0.0).max(0.0),
                        downtime_us: e
                            .pointer("/args/downtime_us")
                            .and_then(Value::as_u64)
                            .unwrap_or(0),
                        isr,
                    });
                }
                ("s", "ipi") | ("f", "ipi") => {
                    let id = e
                        .get("id")
                        .and_then(Value::as_u64)
                        .ok_or_else(|| bad("flow without id"))?;
                    let f = flows.entry(id).or_default();
                    if ph == "s" {
                        f.0 = Some((t, ts));
                    } else {
                        f.1 = Some(t);
                    }
                }
                ("i", c) => m.marks.push(Mark {
                    vcpu: t,
                    ts,
                    cat: c.into(),
                    name: e.get("name").and_then(Value::as_str).unwrap_or("").into(),
                }),
                _ => {}
            }
        }
        for (s, f) in flows.into_values() {
            if let (Some((from, ts)), Some(to)) = (s, f) {
                m.ipis.push(Ipi { from, to, ts });
            }
        }
        if m.vcpus == 0 {
            return Err("no vCPU tracks (thread_name \"vCPU N\")".into());
        }
        let n = m.vcpus;
        if m.handlers.iter().any(|h| h.vcpu >= n)
            || m.ipis.iter().any(|p| p.from >= n || p.to >= n)
            || m.marks.iter().any(|k| k.vcpu >= n)
        {
            return Err("an event names a vCPU with no track".into());
        }
        // Times shown from the first event (VM time itself counts from the guest
        // TSC's origin, which says nothing to a reader).
        let (lo, hi) = if lo <= hi { (lo, hi) } else { (0.0, 0.0) };
        m.origin_us = lo;
        m.span = (0.0, hi - lo);
        m.handlers.iter_mut().for_each(|h| h.ts -= lo);
        m.ipis.iter_mut().for_each(|p| p.ts -= lo);
        m.marks.iter_mut().for_each(|k| k.ts -= lo);
        m.pauses.iter_mut().for_each(|p| p.ts -= lo);
        Ok(m)
    }

    /// Deepest nesting per vCPU.
    pub fn deepest(&self) -> Vec<Deepest> {
        let mut out = vec![(0u8, Vec::new(), 0.0); self.vcpus];
        for (i, h) in self.handlers.iter().enumerate() {
            let Some(slot) = out.get_mut(h.vcpu) else {
                continue;
            };
            if h.depth <= slot.0 {
                continue;
            }
            // The enclosing handlers: same vCPU, lower depth, spanning h's start.
            let mut chain: Vec<(u8, u8)> = self
                .handlers
                .iter()
                .enumerate()
                .filter(|(j, o)| {
                    *j != i
                        && o.vcpu == h.vcpu
                        && o.depth < h.depth
                        && o.ts <= h.ts
                        && o.ts + o.dur >= h.ts
                })
                .map(|(_, o)| (o.depth, o.vector))
                .collect();
            chain.sort_unstable();
            chain.dedup_by_key(|c| c.0);
            let mut vs: Vec<u8> = chain.into_iter().map(|c| c.1).collect();
            vs.push(h.vector);
            *slot = (h.depth, vs, h.ts);
        }
        out
    }

    /// IPI counts per (from, to), busiest first.
    pub fn ipi_pairs(&self) -> Vec<((usize, usize), u64)> {
        let mut c: BTreeMap<(usize, usize), u64> = BTreeMap::new();
        for p in &self.ipis {
            *c.entry((p.from, p.to)).or_default() += 1;
        }
        let mut v: Vec<_> = c.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    }

    /// The longest-in-service handler.
    pub fn longest(&self) -> Option<&Handler> {
        self.handlers.iter().max_by(|a, b| a.dur.total_cmp(&b.dur))
    }

    /// The `--text` digest.
    pub fn digest(&self) -> String {
        let mut s = String::new();
        let span_ms = (self.span.1 - self.span.0) / 1000.0;
        let _ = writeln!(
            s,
            "trace: {} vCPUs, {:.1} ms of VM time, {} handlers, {} IPIs, {} pauses (times from the first event)",
            self.vcpus,
            span_ms,
            self.handlers.len(),
            self.ipis.len(),
            self.pauses.len()
        );
        for k in [
            "outcome",
            "migrations",
            "max_nesting",
            "violations",
            "lost",
            "dropped",
        ] {
            if let Some(v) = self.summary.get(k) {
                let _ = writeln!(s, "  run {k}: {v}");
            }
        }
        let _ = writeln!(s, "deepest nesting per vCPU:");
        for (i, (d, vs, ts)) in self.deepest().iter().enumerate() {
            if *d == 0 {
                let _ = writeln!(s, "  vCPU {i}: no handler");
                continue;
            }
            let chain: Vec<String> = vs.iter().map(|v| format!("{v:#04x}")).collect();
            let _ = writeln!(
                s,
                "  vCPU {i}: depth {d} ({}) at {:.3} ms",
                chain.join(" > "),
                ts / 1000.0
            );
        }
        if let Some(h) = self.longest() {
            let _ = writeln!(
                s,
                "longest in service: {:#04x} on vCPU {} ({}), {:.1} µs from {:.3} ms",
                h.vector,
                h.vcpu,
                h.source,
                h.dur,
                h.ts / 1000.0
            );
        }
        let _ = writeln!(s, "busiest IPI pairs:");
        let pairs = self.ipi_pairs();
        if pairs.is_empty() {
            let _ = writeln!(s, "  none");
        }
        for ((f, t), n) in pairs.iter().take(5) {
            let _ = writeln!(s, "  vCPU {f} -> vCPU {t}: {n}");
        }
        let nested: Vec<&Pause> = self
            .pauses
            .iter()
            .filter(|p| p.isr.iter().any(|x| !x.is_empty()))
            .collect();
        let _ = writeln!(
            s,
            "pauses: {} ({} with something in service); longest downtime {} µs",
            self.pauses.len(),
            nested.len(),
            self.pauses.iter().map(|p| p.downtime_us).max().unwrap_or(0)
        );
        s
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A two-vCPU trace as `vlapic run --trace` writes it: an IPI 0 → 1 whose handler
    /// (0x41) is interrupted by an MSI at 0x61 (a higher class nests, SDM §11.8.3.1).
    pub(crate) const SAMPLE: &str = r#"{"traceEvents":[
 {"ph":"M","name":"thread_name","pid":1,"tid":0,"args":{"name":"vCPU 0"}},
 {"ph":"M","name":"thread_name","pid":1,"tid":1,"args":{"name":"vCPU 1"}},
 {"ph":"M","name":"thread_name","pid":1,"tid":2,"args":{"name":"VM (pauses)"}},
 {"ph":"s","cat":"ipi","name":"IPI","id":1,"pid":1,"tid":0,"ts":1.0},
 {"ph":"f","bp":"e","cat":"ipi","name":"IPI","id":1,"pid":1,"tid":1,"ts":1.0},
 {"ph":"i","s":"t","cat":"timer","name":"timer 0xef","pid":1,"tid":0,"ts":5.0},
 {"ph":"X","cat":"irq","name":"0x61","pid":1,"tid":1,"ts":3.0,"dur":1.0,"args":{"vector":97,"class":6,"depth":2,"source":"MSI","wait_us":0.5}},
 {"ph":"X","cat":"irq","name":"0x41","pid":1,"tid":1,"ts":2.0,"dur":7.0,"args":{"vector":65,"class":4,"depth":1,"source":"IPI from vCPU 0","wait_us":1.0}},
 {"ph":"X","cat":"pause","name":"migration","pid":1,"tid":2,"ts":4.0,"dur":0.5,"args":{"downtime_us":800,"isr":{"0":[],"1":["0x41","0x61"]}}}
],"otherData":{"vlapic":{"migrations":1,"max_nesting":2}}}"#;

    #[test]
    fn parses_the_writers_layout() {
        let m = Model::parse(SAMPLE.as_bytes()).unwrap();
        assert_eq!(m.vcpus, 2);
        assert_eq!(m.handlers.len(), 2);
        assert_eq!(
            m.ipis,
            [Ipi {
                from: 0,
                to: 1,
                ts: 0.0
            }]
        );
        assert_eq!(m.marks.len(), 1);
        assert_eq!(m.pauses[0].isr, ["", "0x41 0x61"]);
        assert_eq!(m.span, (0.0, 8.0));
        assert_eq!((m.origin_us, m.handlers[1].ts), (1.0, 1.0));
        assert_eq!(m.summary.get("migrations").map(String::as_str), Some("1"));
    }

    #[test]
    fn digest_names_the_nesting_the_longest_and_the_pairs() {
        let d = Model::parse(SAMPLE.as_bytes()).unwrap().digest();
        assert!(d.contains("vCPU 1: depth 2 (0x41 > 0x61)"), "{d}");
        assert!(d.contains("vCPU 0: no handler"), "{d}");
        assert!(
            d.contains("longest in service: 0x41 on vCPU 1 (IPI from vCPU 0), 7.0 µs"),
            "{d}"
        );
        assert!(d.contains("vCPU 0 -> vCPU 1: 1"), "{d}");
        assert!(
            d.contains("pauses: 1 (1 with something in service); longest downtime 800 µs"),
            "{d}"
        );
    }

    #[test]
    fn bad_input_is_one_line() {
        for (input, want) in [
            ("", "not JSON"),
            ("{}", "no traceEvents"),
            (r#"{"traceEvents":[]}"#, "no vCPU tracks"),
            (
                r#"{"traceEvents":[{"ph":"M","name":"thread_name","tid":0,"args":{"name":"vCPU 0"}},{"ph":"X","cat":"irq","tid":0,"ts":1,"dur":1,"args":{"vector":300}}]}"#,
                "traceEvents[1]: handler without a vector 0-255",
            ),
            (
                r#"{"traceEvents":[{"ph":"M","name":"thread_name","tid":0,"args":{"name":"vCPU 0"}},{"ph":"i","cat":"timer","tid":7,"ts":1}]}"#,
                "an event names a vCPU with no track",
            ),
        ] {
            let e = Model::parse(input.as_bytes()).unwrap_err();
            assert!(e.contains(want), "{input}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }
}

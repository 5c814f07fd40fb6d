//! Writes a `--trace` recording as Chrome trace-event JSON (Perfetto, chrome://tracing):
//! one track per vCPU with a slice per handler (acknowledge to EOI), IPI flows, pauses.
//!
//! Layout (process 1): thread `i` is vCPU `i`; thread `n` is the VM (pauses). Handler
//! slices are `X` events of category `irq` named by vector, with `args` giving the
//! source, class, depth and when the vector was accepted; IPIs are `s`/`f` flow pairs
//! (category `ipi`) bound to zero-length `X` marks on sender and receiver; timer
//! expiries, NMI/INIT/SIPI and verifier violations are instants; TPR is a counter per
//! vCPU; pauses are `X` events of category `pause` on the VM thread. `otherData.vlapic`
//! carries the run's summary figures (docs/trace.md describes every field).

use std::io::{self, Write};

use vlapic::lvt::Lvt;
use vlapic::trace::{Source, TraceKind};
use vlapic::DeliveryMode;

use crate::trace::{Lane, Pause, Recorder};
use crate::VmmError;

/// `--trace FILE`: the file, created before the run so that a bad path fails at once,
/// and the recorder the run shares.
#[derive(Debug)]
pub struct TraceFile {
    path: std::path::PathBuf,
    file: std::fs::File,
    rec: std::sync::Arc<Recorder>,
}

impl TraceFile {
    /// Creates `path` (if given); the recorder is sized by [`TraceFile::recorder`].
    pub fn create(
        path: Option<&std::path::Path>,
        kernel_irqchip: bool,
    ) -> Result<Option<Self>, VmmError> {
        let Some(path) = path else { return Ok(None) };
        if kernel_irqchip {
            return Err(VmmError::Setup(
                "--trace records vlapic's APICs: not with --irqchip kernel".into(),
            ));
        }
        let file = std::fs::File::create(path)
            .map_err(|e| VmmError::Setup(format!("--trace {}: {e}", path.display())))?;
        Ok(Some(Self {
            path: path.to_path_buf(),
            file,
            rec: std::sync::Arc::new(Recorder::new(0)),
        }))
    }

    /// The recorder for a VM of `vcpus` vCPUs (known once a save file is read).
    pub fn recorder(&mut self, vcpus: usize) -> std::sync::Arc<Recorder> {
        self.rec = std::sync::Arc::new(Recorder::new(vcpus));
        self.rec.clone()
    }

    /// Takes what is still in the APICs' rings and writes the file. An error is one
    /// line naming the file (the run's report is not affected).
    pub fn finish(
        self,
        chip: &vlapic::fabric::SharedFabric,
        mut meta: TraceMeta,
    ) -> Result<TraceCounts, String> {
        self.rec.drain_all(chip);
        meta.lost = self.rec.lost();
        meta.dropped = self.rec.dropped();
        let (lanes, pauses) = self.rec.take();
        let mut w = io::BufWriter::with_capacity(1 << 20, self.file);
        write_chrome(&mut w, &lanes, &pauses, &meta)
            .and_then(|c| w.flush().map(|()| c))
            .map_err(|e| format!("--trace {}: {e}", self.path.display()))
    }
}

/// The run's figures written into `otherData.vlapic`.
#[derive(Debug, Clone, Default)]
pub struct TraceMeta {
    /// vCPUs.
    pub vcpus: usize,
    /// Migrations in the run's summary.
    pub migrations: u64,
    /// Deepest nesting in the run's summary (the verifier's).
    pub max_nesting: u8,
    /// Verifier violations in the summary.
    pub violations: u64,
    /// How the run ended (the summary's outcome line).
    pub outcome: String,
    /// Events an APIC ring could not hold between drains.
    pub lost: u64,
    /// Events dropped because a vCPU buffer was full.
    pub dropped: u64,
}

/// What the writer counted (also written into `otherData.vlapic`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceCounts {
    /// Handler slices written.
    pub handlers: u64,
    /// IPI flows written.
    pub ipis: u64,
    /// Deepest nesting seen in the slices, per vCPU.
    pub max_depth: Vec<u8>,
}

/// Where an interrupt came from, as the page shows it.
pub fn source_name(s: Source) -> String {
    match s {
        Source::Ipi { from } => format!("IPI from vCPU {from}"),
        Source::IoApic { pin } => format!("IOAPIC pin {pin}"),
        Source::Msi => "MSI".into(),
        Source::Host => "host".into(),
        Source::SelfIpi => "self IPI".into(),
        Source::Local(Lvt::Timer) => "timer".into(),
        Source::Local(Lvt::Lint0) => "LINT0".into(),
        Source::Local(Lvt::Lint1) => "LINT1".into(),
        Source::Local(Lvt::Error) => "APIC error".into(),
        Source::Local(Lvt::Thermal) => "thermal".into(),
        Source::Local(Lvt::Perf) => "perf counter".into(),
        Source::Local(Lvt::Cmci) => "CMCI".into(),
        _ => "unknown".into(),
    }
}

fn mode_name(m: DeliveryMode) -> &'static str {
    match m {
        DeliveryMode::Nmi => "NMI",
        DeliveryMode::Init => "INIT",
        DeliveryMode::StartUp => "SIPI",
        DeliveryMode::Smi => "SMI",
        DeliveryMode::ExtInt => "ExtINT",
        _ => "event",
    }
}

/// Microseconds (the format's unit) from VM nanoseconds, exact to the nanosecond.
fn us(ns: u64) -> String {
    format!("{}.{:03}", ns / 1000, ns % 1000)
}

/// One handler still in service.
struct Open {
    vector: u8,
    start: u64,
    accepted: Option<u64>,
    source: Source,
}

/// Writes the events one after another, comma-separated.
struct Out<'a, W: Write> {
    w: &'a mut W,
    first: bool,
}

impl<W: Write> Out<'_, W> {
    fn ev(&mut self, s: std::fmt::Arguments<'_>) -> io::Result<()> {
        if !self.first {
            self.w.write_all(b",\n")?;
        }
        self.first = false;
        self.w.write_fmt(s)
    }
}

fn slice<W: Write>(
    o: &mut Out<'_, W>,
    tid: usize,
    h: &Open,
    end: u64,
    depth: usize,
    how: &str,
) -> io::Result<()> {
    let wait = h
        .accepted
        .map_or("null".into(), |a| us(h.start.saturating_sub(a)));
    o.ev(format_args!(
        r#"{{"ph":"X","cat":"irq","name":"{:#04x}","pid":1,"tid":{tid},"ts":{},"dur":{},"args":{{"vector":{},"class":{},"depth":{depth},"source":"{}","wait_us":{wait}{how}}}}}"#,
        h.vector,
        us(h.start),
        us(end.saturating_sub(h.start)),
        h.vector,
        h.vector >> 4,
        source_name(h.source),
    ))
}

/// Writes `lanes` and `pauses` as one Chrome trace-event JSON object.
pub fn write_chrome<W: Write>(
    w: &mut W,
    lanes: &[Lane],
    pauses: &[Pause],
    meta: &TraceMeta,
) -> io::Result<TraceCounts> {
    let n = lanes.len();
    let end = lanes
        .iter()
        .filter_map(|l| l.events.last().map(|e| e.time))
        .chain(pauses.iter().map(|p| p.end_ns))
        .max()
        .unwrap_or(0);
    w.write_all(b"{\"displayTimeUnit\":\"ns\",\"traceEvents\":[\n")?;
    let mut o = Out { w, first: true };
    o.ev(format_args!(
        r#"{{"ph":"M","name":"process_name","pid":1,"tid":0,"args":{{"name":"vlapic VM ({n} vCPUs)"}}}}"#
    ))?;
    for i in 0..n {
        o.ev(format_args!(
            r#"{{"ph":"M","name":"thread_name","pid":1,"tid":{i},"args":{{"name":"vCPU {i}"}}}}"#
        ))?;
        o.ev(format_args!(
            r#"{{"ph":"M","name":"thread_sort_index","pid":1,"tid":{i},"args":{{"sort_index":{i}}}}}"#
        ))?;
    }
    o.ev(format_args!(
        r#"{{"ph":"M","name":"thread_name","pid":1,"tid":{n},"args":{{"name":"VM (pauses)"}}}}"#
    ))?;
    let mut counts = TraceCounts::default();
    let mut flow_id = 0u64;
    for (me, lane) in lanes.iter().enumerate() {
        let mut pending: [Option<(u64, Source)>; 256] = [None; 256];
        let mut stack: Vec<Open> = Vec::new();
        let mut max_depth = 0u8;
        for e in &lane.events {
            let t = e.time;
            match e.kind {
                TraceKind::Accepted { vector, source, .. } => {
                    let slot = &mut pending[usize::from(vector)];
                    if slot.is_none() {
                        *slot = Some((t, source));
                    }
                    if let Source::Ipi { from } = source {
                        flow_id += 1;
                        counts.ipis += 1;
                        ipi_flow(&mut o, flow_id, from, me, t, &format!("{vector:#04x}"))?;
                    }
                    if source == Source::Local(Lvt::Timer) {
                        o.ev(format_args!(
                            r#"{{"ph":"i","s":"t","cat":"timer","name":"timer {vector:#04x}","pid":1,"tid":{me},"ts":{}}}"#,
                            us(t)
                        ))?;
                    }
                }
                TraceKind::Acknowledged { vector } => {
                    let (accepted, source) = match pending[usize::from(vector)].take() {
                        Some((a, s)) => (Some(a), s),
                        None => (None, Source::Unknown),
                    };
                    stack.push(Open {
                        vector,
                        start: t,
                        accepted,
                        source,
                    });
                    max_depth = max_depth.max(u8::try_from(stack.len()).unwrap_or(u8::MAX));
                }
                TraceKind::Eoi { vector } => {
                    if let Some(pos) = stack.iter().rposition(|h| h.vector == vector) {
                        while stack.len() > pos + 1 {
                            if let Some(h) = stack.pop() {
                                let d = stack.len() + 1;
                                slice(
                                    &mut o,
                                    me,
                                    &h,
                                    t,
                                    d,
                                    r#","end":"retired under a lower EOI""#,
                                )?;
                                counts.handlers += 1;
                            }
                        }
                        if let Some(h) = stack.pop() {
                            slice(&mut o, me, &h, t, stack.len() + 1, "")?;
                            counts.handlers += 1;
                        }
                    }
                }
                TraceKind::Event {
                    mode,
                    vector,
                    source,
                } => {
                    let name = match mode {
                        DeliveryMode::StartUp => format!("SIPI {vector:#04x}"),
                        m => mode_name(m).into(),
                    };
                    if let Source::Ipi { from } = source {
                        flow_id += 1;
                        counts.ipis += 1;
                        ipi_flow(&mut o, flow_id, from, me, t, &name)?;
                    }
                    o.ev(format_args!(
                        r#"{{"ph":"i","s":"t","cat":"event","name":"{name}","pid":1,"tid":{me},"ts":{},"args":{{"source":"{}"}}}}"#,
                        us(t),
                        source_name(source)
                    ))?;
                }
                TraceKind::Tpr { tpr } => {
                    o.ev(format_args!(
                        r#"{{"ph":"C","cat":"tpr","name":"TPR vCPU {me}","pid":1,"tid":{me},"ts":{},"args":{{"tpr":{tpr}}}}}"#,
                        us(t)
                    ))?;
                }
                TraceKind::Reset => {
                    while let Some(h) = stack.pop() {
                        let d = stack.len() + 1;
                        slice(&mut o, me, &h, t, d, r#","end":"APIC reset (INIT)""#)?;
                        counts.handlers += 1;
                    }
                    pending = [None; 256];
                }
                _ => {}
            }
        }
        while let Some(h) = stack.pop() {
            let d = stack.len() + 1;
            slice(
                &mut o,
                me,
                &h,
                end.max(h.start),
                d,
                r#","end":"in service at the end""#,
            )?;
            counts.handlers += 1;
        }
        for (t, total) in &lane.violations {
            o.ev(format_args!(
                r#"{{"ph":"i","s":"t","cat":"verifier","name":"verifier violation","pid":1,"tid":{me},"ts":{},"args":{{"total":{total}}}}}"#,
                us(*t)
            ))?;
        }
        counts.max_depth.push(max_depth);
    }
    for p in pauses {
        let isr: Vec<String> = p
            .isr
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let v: Vec<String> = v.iter().map(|x| format!("\"{x:#04x}\"")).collect();
                format!("\"{i}\":[{}]", v.join(","))
            })
            .collect();
        o.ev(format_args!(
            r#"{{"ph":"X","cat":"pause","name":"{}","pid":1,"tid":{n},"ts":{},"dur":{},"args":{{"downtime_us":{},"isr":{{{}}}}}}}"#,
            p.kind,
            us(p.start_ns),
            us(p.end_ns.saturating_sub(p.start_ns)),
            p.downtime_us,
            isr.join(",")
        ))?;
    }
    let depths: Vec<String> = counts.max_depth.iter().map(u8::to_string).collect();
    let outcome = meta
        .outcome
        .replace(['"', '\\'], "'")
        .replace(['\n', '\r', '\t'], " ");
    write!(
        o.w,
        "\n],\"otherData\":{{\"vlapic\":{{\"format\":1,\"vcpus\":{},\"migrations\":{},\"pauses\":{},\"max_nesting\":{},\"violations\":{},\"handlers\":{},\"ipis\":{},\"max_depth\":[{}],\"lost\":{},\"dropped\":{},\"outcome\":\"{}\"}}}}}}\n",
        meta.vcpus,
        meta.migrations,
        pauses.len(),
        meta.max_nesting,
        meta.violations,
        counts.handlers,
        counts.ipis,
        depths.join(","),
        meta.lost,
        meta.dropped,
        outcome
    )?;
    Ok(counts)
}

/// An IPI: a zero-length mark on each side and a flow between them.
fn ipi_flow<W: Write>(
    o: &mut Out<'_, W>,
    id: u64,
    from: u32,
    to: usize,
    t: u64,
    what: &str,
) -> io::Result<()> {
    let ts = us(t);
    o.ev(format_args!(
        r#"{{"ph":"X","cat":"ipi","name":"IPI {what} to vCPU {to}","pid":1,"tid":{from},"ts":{ts},"dur":0}}"#
    ))?;
    o.ev(format_args!(
        r#"{{"ph":"s","cat":"ipi","name":"IPI","id":{id},"pid":1,"tid":{from},"ts":{ts}}}"#
    ))?;
    o.ev(format_args!(
        r#"{{"ph":"X","cat":"ipi","name":"IPI {what} from vCPU {from}","pid":1,"tid":{to},"ts":{ts},"dur":0}}"#
    ))?;
    o.ev(format_args!(
        r#"{{"ph":"f","bp":"e","cat":"ipi","name":"IPI","id":{id},"pid":1,"tid":{to},"ts":{ts}}}"#
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vlapic::trace::TraceEvent;

    fn ev(time: u64, kind: TraceKind) -> TraceEvent {
        TraceEvent { time, kind }
    }

    /// A 0x61 handler interrupting a 0x41 one (SDM §11.8.3.1: a higher class nests)
    /// gives two slices, the inner one inside the outer, depth 2; the IPI one flow.
    #[test]
    fn nested_handlers_and_an_ipi() {
        let lanes = vec![
            Lane::default(),
            Lane {
                events: vec![
                    ev(
                        1000,
                        TraceKind::Accepted {
                            vector: 0x41,
                            level: false,
                            source: Source::Ipi { from: 0 },
                        },
                    ),
                    ev(2000, TraceKind::Acknowledged { vector: 0x41 }),
                    ev(
                        2500,
                        TraceKind::Accepted {
                            vector: 0x61,
                            level: false,
                            source: Source::Msi,
                        },
                    ),
                    ev(3000, TraceKind::Acknowledged { vector: 0x61 }),
                    ev(4000, TraceKind::Eoi { vector: 0x61 }),
                    ev(9000, TraceKind::Eoi { vector: 0x41 }),
                ],
                ..Lane::default()
            },
        ];
        let mut buf = Vec::new();
        let c = write_chrome(&mut buf, &lanes, &[], &TraceMeta::default()).unwrap();
        assert_eq!(
            c,
            TraceCounts {
                handlers: 2,
                ipis: 1,
                max_depth: vec![0, 2]
            }
        );
        let v: serde_json::Value = serde_json::from_slice(&buf).expect("well-formed JSON");
        let evs = v["traceEvents"].as_array().unwrap();
        let irq: Vec<_> = evs.iter().filter(|e| e["cat"] == "irq").collect();
        assert_eq!(irq[0]["name"], "0x61");
        assert_eq!(
            (irq[0]["ts"].as_f64(), irq[0]["dur"].as_f64()),
            (Some(3.0), Some(1.0))
        );
        assert_eq!(irq[0]["args"]["depth"], 2);
        assert_eq!(irq[1]["name"], "0x41");
        assert_eq!(irq[1]["args"]["source"], "IPI from vCPU 0");
        assert_eq!(irq[1]["args"]["wait_us"].as_f64(), Some(1.0));
        assert_eq!(
            (irq[1]["ts"].as_f64(), irq[1]["dur"].as_f64()),
            (Some(2.0), Some(7.0))
        );
        let flows: Vec<_> = evs
            .iter()
            .filter(|e| e["ph"] == "s" || e["ph"] == "f")
            .collect();
        assert_eq!(
            (flows[0]["tid"].as_u64(), flows[1]["tid"].as_u64()),
            (Some(0), Some(1))
        );
        assert_eq!(v["otherData"]["vlapic"]["handlers"], 2);
    }

    /// INIT resets the APIC (SDM §11.4.7.3): a handler in service ends there.
    #[test]
    fn reset_closes_open_handlers() {
        let lanes = vec![Lane {
            events: vec![
                ev(10, TraceKind::Acknowledged { vector: 0x30 }),
                ev(20, TraceKind::Reset),
            ],
            ..Lane::default()
        }];
        let mut buf = Vec::new();
        let c = write_chrome(&mut buf, &lanes, &[], &TraceMeta::default()).unwrap();
        assert_eq!(c.handlers, 1);
        let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        let s = v["traceEvents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["cat"] == "irq")
            .unwrap()
            .clone();
        assert_eq!(s["args"]["end"], "APIC reset (INIT)");
        assert_eq!(s["args"]["source"], "unknown");
    }
}

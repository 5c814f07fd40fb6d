//! The guest console: COM1 output copied to the host (stdout or stderr) and
//! parsed line by line for the test guest's `PASS`/`FAIL`/`SKIP`/`DONE` reports.

use std::io::Write;
use std::sync::{Arc, Mutex};

use crate::lock;
use crate::stats::{exit_delta, ExitCounts, ExitStats};

/// Where guest console output is copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsoleSink {
    /// Host standard output.
    Stdout,
    /// Host standard error (used with `--json`, so stdout stays one JSON object).
    Stderr,
    /// Captured only.
    Quiet,
}

/// Outcome of one guest scenario.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scenario {
    /// Scenario name.
    pub name: String,
    /// `PASS`, `FAIL` or `SKIP`.
    pub status: String,
    /// Failure detail or skip reason.
    pub detail: String,
    /// VM exits (all vCPUs) between the previous report line and this one.
    pub exits: ExitCounts,
    /// Wall-clock time between the previous report line and this one.
    pub elapsed: std::time::Duration,
}

/// One `BENCH <name> cycles=<median> iters=<n>` line of the guest's bench mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BenchLine {
    /// Benchmark name.
    pub name: String,
    /// Median TSC cycles per operation.
    pub cycles: u64,
    /// Iterations measured.
    pub iters: u64,
}

/// Everything parsed from the console.
#[derive(Clone, Debug, Default)]
pub struct ConsoleLog {
    /// Scenario reports in order.
    pub scenarios: Vec<Scenario>,
    /// The `DONE ...` line, if seen.
    pub done: Option<String>,
    /// `BENCH` lines.
    pub bench: Vec<BenchLine>,
    /// Total bytes written by the guest.
    pub bytes: u64,
    /// The last lines (for crash reports).
    pub tail: Vec<String>,
    partial: Vec<u8>,
    last_exits: ExitCounts,
    last_time: Option<std::time::Instant>,
}

impl ConsoleLog {
    fn line(&mut self, line: &str, exits: Option<ExitCounts>) {
        if self.last_time.is_none() {
            self.last_time = Some(std::time::Instant::now());
        }
        let line = line.trim_end_matches('\r');
        if self.tail.len() >= 20 {
            self.tail.remove(0);
        }
        self.tail.push(line.to_string());
        for status in ["PASS", "FAIL", "SKIP"] {
            let Some(after) = line.strip_prefix(status) else {
                continue;
            };
            // Our guest: `PASS name` / `FAIL name: detail`. kvm-unit-tests:
            // `PASS: name` where the name itself may contain colons.
            let parsed = if let Some(rest) = after.strip_prefix(": ") {
                Some((rest.trim(), ""))
            } else {
                after
                    .strip_prefix(' ')
                    .map(|rest| match rest.split_once(':') {
                        Some((n, d)) => (n.trim(), d.trim()),
                        None => (rest.trim(), ""),
                    })
            };
            if let Some((name, detail)) = parsed {
                let now = exits.unwrap_or(self.last_exits);
                let delta = exit_delta(&now, &self.last_exits);
                self.last_exits = now;
                let t = std::time::Instant::now();
                let elapsed = self
                    .last_time
                    .map(|l| t.duration_since(l))
                    .unwrap_or_default();
                self.last_time = Some(t);
                self.scenarios.push(Scenario {
                    name: name.to_string(),
                    status: status.to_string(),
                    detail: detail.to_string(),
                    exits: delta,
                    elapsed,
                });
                return;
            }
        }
        if let Some(rest) = line.strip_prefix("BENCH ") {
            let mut it = rest.split_whitespace();
            if let Some(name) = it.next() {
                let mut b = BenchLine {
                    name: name.to_string(),
                    cycles: 0,
                    iters: 0,
                };
                for kv in it {
                    match kv.split_once('=') {
                        Some(("cycles", v)) => b.cycles = v.parse().unwrap_or(0),
                        Some(("iters", v)) => b.iters = v.parse().unwrap_or(0),
                        _ => {}
                    }
                }
                self.bench.push(b);
            }
            return;
        }
        if line.starts_with("DONE") {
            self.done = Some(line.to_string());
        }
    }

    /// Appends the save-file form (scenarios, DONE, BENCH, tail, the partial line,
    /// the exit counts and time since the last report line).
    pub(crate) fn encode(&self, w: &mut crate::wire::Writer) {
        w.u64(self.bytes);
        w.u32(self.scenarios.len() as u32);
        for s in &self.scenarios {
            w.str(&s.name);
            w.str(&s.status);
            w.str(&s.detail);
            w.u64(u64::try_from(s.elapsed.as_nanos()).unwrap_or(u64::MAX));
            w.exits(&s.exits);
        }
        w.u8(u8::from(self.done.is_some()));
        w.str(self.done.as_deref().unwrap_or(""));
        w.u32(self.bench.len() as u32);
        for b in &self.bench {
            w.str(&b.name);
            w.u64(b.cycles);
            w.u64(b.iters);
        }
        w.u32(self.tail.len() as u32);
        for t in &self.tail {
            w.str(t);
        }
        w.bytes(&self.partial);
        w.exits(&self.last_exits);
        w.u64(self.last_time.map_or(u64::MAX, |t| {
            u64::try_from(t.elapsed().as_nanos()).unwrap_or(0)
        }));
    }

    /// Reads what [`ConsoleLog::encode`] wrote.
    pub(crate) fn decode(r: &mut crate::wire::Reader<'_>) -> Result<Self, String> {
        let mut l = ConsoleLog {
            bytes: r.u64()?,
            ..ConsoleLog::default()
        };
        let n = r.count(1 << 20, "scenarios")?;
        for _ in 0..n {
            let name = r.str()?;
            let status = r.str()?;
            if !["PASS", "FAIL", "SKIP"].contains(&status.as_str()) {
                return Err(r.err(format!("scenario status {status:?}")));
            }
            l.scenarios.push(Scenario {
                name,
                status,
                detail: r.str()?,
                elapsed: std::time::Duration::from_nanos(r.u64()?),
                exits: r.exits()?,
            });
        }
        let has_done = r.u8()?;
        let done = r.str()?;
        l.done = match has_done {
            0 => None,
            1 => Some(done),
            x => return Err(r.err(format!("DONE flag {x}"))),
        };
        let n = r.count(1 << 20, "BENCH lines")?;
        for _ in 0..n {
            l.bench.push(BenchLine {
                name: r.str()?,
                cycles: r.u64()?,
                iters: r.u64()?,
            });
        }
        let n = r.count(20, "tail lines")?;
        for _ in 0..n {
            l.tail.push(r.str()?);
        }
        l.partial = r.bytes(4096)?.to_vec();
        l.last_exits = r.exits()?;
        let since = r.u64()?;
        l.last_time = (since != u64::MAX).then(|| {
            let now = std::time::Instant::now();
            now.checked_sub(std::time::Duration::from_nanos(since))
                .unwrap_or(now)
        });
        Ok(l)
    }

    /// Scenarios with the given status.
    pub fn count(&self, status: &str) -> usize {
        self.scenarios.iter().filter(|s| s.status == status).count()
    }
}

/// The `io::Write` the 16550 model writes into.
#[derive(Clone)]
pub struct ConsoleOut {
    sink: ConsoleSink,
    log: Arc<Mutex<ConsoleLog>>,
    stats: Option<Arc<ExitStats>>,
}

impl ConsoleOut {
    /// A console copying to `sink`; with `stats`, each scenario line records the
    /// exits since the previous one.
    pub fn new(sink: ConsoleSink, stats: Option<Arc<ExitStats>>) -> Self {
        Self {
            sink,
            log: Arc::new(Mutex::new(ConsoleLog::default())),
            stats,
        }
    }

    /// Like [`ConsoleOut::new`], continuing `log` (a restored run's transcript).
    pub fn with_log(sink: ConsoleSink, stats: Option<Arc<ExitStats>>, log: ConsoleLog) -> Self {
        Self {
            sink,
            log: Arc::new(Mutex::new(log)),
            stats,
        }
    }

    /// The log as it stands, the partial line kept partial (for a save file).
    pub fn raw_log(&self) -> ConsoleLog {
        lock(&self.log).clone()
    }

    /// A snapshot of what was parsed so far (a trailing partial line included).
    pub fn log(&self) -> ConsoleLog {
        let mut l = lock(&self.log).clone();
        if !l.partial.is_empty() {
            let s = String::from_utf8_lossy(&l.partial).into_owned();
            l.partial.clear();
            l.line(&s, self.stats.as_ref().map(|st| st.total()));
        }
        l
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.sink {
            ConsoleSink::Stdout => {
                let _ = std::io::stdout().write_all(buf);
            }
            ConsoleSink::Stderr => {
                let _ = std::io::stderr().write_all(buf);
            }
            ConsoleSink::Quiet => {}
        }
        let mut l = lock(&self.log);
        l.bytes = l.bytes.saturating_add(buf.len() as u64);
        for &b in buf {
            if b == b'\n' {
                let p = std::mem::take(&mut l.partial);
                l.line(
                    &String::from_utf8_lossy(&p),
                    self.stats.as_ref().map(|st| st.total()),
                );
            } else if l.partial.len() < 4096 {
                l.partial.push(b);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self.sink {
            ConsoleSink::Stdout => std::io::stdout().flush(),
            ConsoleSink::Stderr => std::io::stderr().flush(),
            ConsoleSink::Quiet => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Both report styles count: the test guest's `PASS name` / `FAIL name: detail`, and
    // kvm-unit-tests' `PASS: name` whose names contain colons.
    #[test]
    fn parses_our_lines_and_kvm_unit_tests_lines() {
        let mut l = ConsoleLog::default();
        for line in [
            "PASS nested-priorities",
            "FAIL esr: ESR reads 0",
            "SKIP x2apic-switch: CPU lacks x2APIC",
            "PASS: apic_disable: CR8: f",
            "FAIL: multiple nmi",
            "SKIP: pv ipi",
            "PASSED nothing",
            "hello",
        ] {
            l.line(line, None);
        }
        let got: Vec<(&str, &str, &str)> = l
            .scenarios
            .iter()
            .map(|s| (s.status.as_str(), s.name.as_str(), s.detail.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("PASS", "nested-priorities", ""),
                ("FAIL", "esr", "ESR reads 0"),
                ("SKIP", "x2apic-switch", "CPU lacks x2APIC"),
                ("PASS", "apic_disable: CR8: f", ""),
                ("FAIL", "multiple nmi", ""),
                ("SKIP", "pv ipi", ""),
            ]
        );
    }
}

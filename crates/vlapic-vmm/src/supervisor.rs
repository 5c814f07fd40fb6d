//! The VMM's main thread while the guest runs: it waits for the end or the deadline
//! and on the way saves (`--save`), migrates in-process (`--migrate-every`) or sends
//! the VM to another process (`--migrate-to`), each when its time comes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::capture;
use crate::config::{MigrateTo, SaveTo};
use crate::console::ConsoleOut;
use crate::lock;
use crate::memory::GuestRam;
use crate::migrate;
use crate::outcome::Outcome;
use crate::outgoing::{self, Sent};
use crate::savefile;
use crate::shared::Shared;
use crate::stream::LiveStats;

/// The shortest wait between two looks at the schedule.
const MIN_WAIT: Duration = Duration::from_micros(100);

/// What the main thread needs to watch a running VM.
pub struct Supervisor<'a> {
    /// The running VM's shared state.
    pub sh: &'a Shared,
    /// `/dev/kvm`, for the VMs in-process migration creates.
    pub kvm: &'a Kvm,
    /// Guest RAM.
    pub ram: &'a GuestRam,
    /// The console (its log travels in save files and streams).
    pub console: &'a ConsoleOut,
    /// A brand-new VM with this guest's RAM (in-process migration).
    pub make_vm: &'a dyn Fn(&Kvm) -> Result<VmFd, String>,
    /// vCPU `i` of a new VM, configured like the first.
    pub make_vcpu: &'a dyn Fn(&VmFd, usize) -> Result<VcpuFd, String>,
    /// The save-file header of this VM, without `migrate_every_us`, `elapsed_ns`
    /// and the time fields (filled in when a save or send happens).
    pub header: savefile::Header,
    /// Wall time the VM ran before this process (restored or received).
    pub prior: Duration,
    /// When this process's vCPUs started.
    pub start: Instant,
    /// `--timeout`.
    pub timeout: Option<Duration>,
    /// `--migrate-every` (never zero here).
    pub migrate_every: Option<Duration>,
    /// `--save`.
    pub save: Option<SaveTo>,
    /// `--migrate-to`.
    pub migrate_to: Option<MigrateTo>,
}

impl Supervisor<'_> {
    /// Waits until the run has an outcome or the deadline passes, saving and
    /// migrating on the way as scheduled. Returns the VM the guest now runs in (a
    /// new one after each in-process migration) and the outgoing live migration's
    /// figures, if one was tried.
    pub fn watch(&self, mut vm: Arc<VmFd>) -> (Arc<VmFd>, Option<LiveStats>) {
        let sh = self.sh;
        let start = self.start;
        let mut live_out = None;
        let deadline = self.timeout.map(|t| start + t);
        let mut next_migration = self.migrate_every.map(|p| Instant::now() + p);
        let mut next_save = self
            .save
            .as_ref()
            .map(|s| (start + s.after, s.path.clone()));
        let mut next_send = self
            .migrate_to
            .as_ref()
            .map(|m| (start + m.after, m.clone()));
        let mut g = lock(&sh.outcome);
        while g.is_none() {
            let now = Instant::now();
            if let Some((t, path)) = next_save.clone() {
                if now >= t {
                    drop(g);
                    next_save = None;
                    let every = self
                        .migrate_every
                        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
                    self.save(&path, self.header_now(every));
                    g = lock(&sh.outcome);
                    continue;
                }
            }
            if let Some((t, to)) = next_send.clone() {
                if now >= t {
                    drop(g);
                    next_send = None;
                    live_out = self.send(&vm, &to).or(live_out);
                    g = lock(&sh.outcome);
                    continue;
                }
            }
            if let (Some(t), Some(p)) = (next_migration, self.migrate_every) {
                if now >= t {
                    drop(g);
                    match migrate::migrate(sh, self.kvm, &vm, self.make_vm, self.make_vcpu) {
                        Ok(Some(new_vm)) => vm = Arc::new(new_vm),
                        Ok(None) => {}
                        Err(e) => sh.finish(Outcome::VmmError(format!("migration: {e}"))),
                    }
                    next_migration = Some(Instant::now() + p);
                    g = lock(&sh.outcome);
                    continue;
                }
            }
            let mut wait = match deadline {
                Some(d) => match d.checked_duration_since(now) {
                    Some(w) if !w.is_zero() => w,
                    _ => break,
                },
                None => Duration::from_secs(1),
            };
            let next = [
                next_save.as_ref().map(|(t, _)| *t),
                next_send.as_ref().map(|(t, _)| *t),
                next_migration,
            ];
            for t in next.into_iter().flatten() {
                wait = wait.min(t.saturating_duration_since(now).max(MIN_WAIT));
            }
            g = match sh.done.wait_timeout(g, wait) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        (vm, live_out)
    }

    /// The save-file header of this VM now.
    fn header_now(&self, migrate_every_us: u64) -> savefile::Header {
        let elapsed = self.prior + self.start.elapsed();
        savefile::Header {
            migrate_every_us,
            elapsed_ns: u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
            ..self.header.clone()
        }
    }

    /// `--save`: pauses the VM, writes the file and ends the run with the line
    /// saying what was saved (nothing if the run ended before every vCPU paused).
    fn save(&self, path: &std::path::Path, header: savefile::Header) {
        let sh = self.sh;
        let _t0 = (sh.rt.now_ns(), Instant::now());
        match save_now(sh, self.ram, self.console, header, path, self.start) {
            Ok(Some(line)) => {
                #[cfg(feature = "trace")]
                if let Some(t) = &sh.trace {
                    let down = u64::try_from(_t0.1.elapsed().as_micros()).unwrap_or(0);
                    t.pause_from("save", (_t0.0, sh.rt.now_ns()), down, &sh.chip());
                }
                sh.finish(Outcome::Saved(line))
            }
            Ok(None) => {}
            Err(e) => sh.finish(Outcome::VmmError(format!("save: {e}"))),
        }
    }

    /// `--migrate-to`: sends the VM; the run ends if the destination took it over,
    /// and goes on if the migration failed. Returns the migration's figures.
    fn send(&self, vm: &VmFd, to: &MigrateTo) -> Option<LiveStats> {
        let sh = self.sh;
        let header = self.header_now(0);
        match outgoing::send(
            sh,
            self.ram,
            vm,
            self.console,
            header,
            &to.addr,
            &to.precopy,
        ) {
            Ok(Sent::Moved(st)) => {
                #[cfg(feature = "trace")]
                if let Some(t) = &sh.trace {
                    let d = st.downtime_us.unwrap_or(0);
                    let now = sh.rt.now_ns();
                    t.pause_from("migrate-to", (now, now), d, &sh.chip());
                }
                sh.finish(Outcome::Migrated(to.addr.to_string()));
                Some(st)
            }
            Ok(Sent::Stayed(st)) => {
                eprintln!("vlapic run: live migration to {}: {}", to.addr, st.result);
                Some(st)
            }
            Ok(Sent::Ended) => None,
            Err(e) => {
                sh.finish(Outcome::VmmError(format!("live migration: {e}")));
                None
            }
        }
    }
}

/// `--save`: pauses the VM, writes the file, and returns the line saying what was
/// saved (`None` if the run ended before every vCPU paused).
fn save_now(
    sh: &Shared,
    ram: &GuestRam,
    console: &ConsoleOut,
    header: savefile::Header,
    path: &std::path::Path,
    start: Instant,
) -> Result<Option<String>, String> {
    let at = start.elapsed();
    let Some(file) = capture::capture(sh, ram, console, header)? else {
        return Ok(None);
    };
    let bytes = file.encode();
    savefile::write_file(path, &bytes)?;
    let scen = &file.console.scenarios;
    let count = |st: &str| scen.iter().filter(|s| s.status == st).count();
    Ok(Some(format!(
        "{}: {} bytes, {} vCPUs, {} MiB RAM ({} non-zero pages), {} scenario results so far \
         ({} passed, {} failed, {} skipped), after {} ms",
        path.display(),
        bytes.len(),
        file.vcpus.len(),
        file.header.memory_mib,
        file.memory.index.len(),
        scen.len(),
        count("PASS"),
        count("FAIL"),
        count("SKIP"),
        at.as_millis()
    )))
}

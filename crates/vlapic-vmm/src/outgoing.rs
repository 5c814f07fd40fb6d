//! `--migrate-to`: the source side of a live migration to another process
//! (docs/migration-stream.md). Pre-copy with KVM's dirty log while the guest runs,
//! then the pause (the migration gate), the last pages, the vCPUs, the fabric in the
//! native format, the console and devices, and the commit handshake.
//!
//! The VM is never lost and never runs twice: until the destination acknowledges
//! `RUNN` after our `COMT`, any failure (refusal, a dead destination, a dropped
//! connection, a corrupt reply) resumes the vCPUs in place, untouched; after `COMT`
//! only a closed connection (the destination is gone without taking over) resumes
//! here, and an undecidable answer (a timeout, garbage) ends the run with an error
//! instead of risking a second copy.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use vlapic::Events;

use crate::capture;
use crate::console::ConsoleOut;
use crate::memory::GuestRam;
use crate::savefile::Header;
use crate::shared::Shared;
use crate::stream::{self, tag, Addr, Conn, Hello, LiveStats, RecvError, PAGE};

/// How the pre-copy proceeds.
#[derive(Clone, Debug)]
pub struct PreCopy {
    /// Stop iterating once a round finds at most this many dirty pages.
    pub small_set: u64,
    /// At most this many rounds after the first full pass.
    pub max_rounds: u32,
    /// Before pausing, wait up to this long for some APIC to have at least 3 vectors
    /// in service (a test hook, `VLAPIC_MIGRATE_NESTED_WAIT_MS`; 0: do not wait).
    pub nested_wait: Duration,
}

impl Default for PreCopy {
    fn default() -> Self {
        Self {
            small_set: 64,
            max_rounds: 30,
            nested_wait: Duration::ZERO,
        }
    }
}

/// How an attempt ended.
pub enum Sent {
    /// The destination runs the VM; this process must end without resuming it.
    Moved(LiveStats),
    /// The VM stays here and keeps running (the reason is in the stats).
    Stayed(LiveStats),
    /// The run ended while migrating (the guest finished); nothing moved.
    Ended,
}

const PATIENCE: Duration = Duration::from_secs(5);
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// Pages of `bits` (KVM's dirty bitmap, one bit per page).
fn pages_of(bits: &[u64]) -> impl Iterator<Item = u32> + '_ {
    bits.iter().enumerate().flat_map(|(w, word)| {
        (0..64u32)
            .filter(move |b| word >> b & 1 != 0)
            .map(move |b| (w as u32) * 64 + b)
    })
}

/// Sends the pages listed (zero pages as such), batched; returns the pages sent.
fn send_pages(
    conn: &mut Conn,
    ram: &GuestRam,
    round: u32,
    pages: impl Iterator<Item = u32>,
) -> Result<u64, String> {
    let total = ram.size() / PAGE as u64;
    let mut buf = vec![0u8; stream::MAX_BATCH * PAGE];
    let mut batch: Vec<u32> = Vec::with_capacity(stream::MAX_BATCH);
    let mut n = 0u64;
    let flush = |conn: &mut Conn, batch: &mut Vec<u32>, buf: &mut Vec<u8>| {
        let mut list: Vec<(u32, Option<&[u8]>)> = Vec::with_capacity(batch.len());
        for (k, p) in batch.iter().enumerate() {
            let d = buf.get(k * PAGE..(k + 1) * PAGE).unwrap_or(&[]);
            list.push((*p, d.iter().any(|b| *b != 0).then_some(d)));
        }
        let body = stream::encode_pages(round, &list);
        batch.clear();
        conn.send(tag::PAGES, &body)
    };
    for p in pages {
        if u64::from(p) >= total {
            continue;
        }
        let k = batch.len();
        let slot = buf
            .get_mut(k * PAGE..(k + 1) * PAGE)
            .ok_or("batch buffer")?;
        ram.read(u64::from(p) * PAGE as u64, slot)?;
        batch.push(p);
        n += 1;
        if batch.len() == stream::MAX_BATCH {
            flush(conn, &mut batch, &mut buf)?;
        }
    }
    if !batch.is_empty() {
        flush(conn, &mut batch, &mut buf)?;
    }
    Ok(n)
}

/// The non-zero pages of RAM (the destination's RAM starts zeroed), tested a word
/// at a time.
fn nonzero_pages(ram: &GuestRam) -> Result<Vec<u32>, String> {
    use zerocopy::IntoBytes as _;
    const WORDS: usize = PAGE / 8;
    let mut out = Vec::new();
    let mut chunk = vec![0u64; (1 << 20) / 8];
    let mut addr = 0u64;
    while addr < ram.size() {
        let len = (ram.size() - addr).min((chunk.len() * 8) as u64) as usize;
        let buf = chunk.as_mut_bytes().get_mut(..len).ok_or("chunk")?;
        ram.read(addr, buf)?;
        let words = chunk.get(..len / 8).ok_or("chunk")?;
        for (k, page) in words.chunks(WORDS).enumerate() {
            if page.iter().any(|w| *w != 0) {
                out.push((addr / PAGE as u64) as u32 + k as u32);
            }
        }
        addr += len as u64;
    }
    Ok(out)
}

/// Most vectors in service on one APIC right now.
fn in_service(sh: &Shared) -> u64 {
    let chip = sh.chip();
    (0..sh.rt.vcpus())
        .filter_map(|i| chip.read_apic(i, |a| u64::from(a.isr().len())))
        .max()
        .unwrap_or(0)
}

/// Sends the running VM to `addr`. `Err` only when the outcome cannot be known (the
/// destination may run the VM): the caller must then end the run without resuming.
#[allow(clippy::too_many_arguments)]
pub fn send(
    sh: &Shared,
    ram: &GuestRam,
    vm: &VmFd,
    console: &ConsoleOut,
    header: Header,
    addr: &Addr,
    opts: &PreCopy,
) -> Result<Sent, String> {
    let t0 = Instant::now();
    let mut st = LiveStats {
        role: "source",
        peer: addr.to_string(),
        ..LiveStats::default()
    };
    let finish = |mut st: LiveStats, conn: Option<&Conn>, why: String| {
        st.bytes = conn.map_or(st.bytes, |c| c.sent);
        st.total_ms = t0.elapsed().as_secs_f64() * 1e3;
        st.result = format!("failed, the VM keeps running here: {why}");
        Sent::Stayed(st)
    };

    // Phase 1, the guest running: connect, shape, pre-copy rounds.
    let mut conn = match stream::connect(addr, PATIENCE) {
        Ok(c) => c,
        Err(e) => return Ok(finish(st, None, e)),
    };
    conn.set_timeout(Some(REPLY_TIMEOUT));
    let hello = Hello {
        vcpus: header.vcpus,
        memory_mib: header.memory_mib,
        flags: header.flags,
        tsc_hz: header.tsc_hz,
    };
    let pre = (|| -> Result<Option<Vec<u64>>, String> {
        conn.send_preamble()?;
        conn.send(tag::HELLO, &hello.encode())?;
        conn.expect(tag::OKAY, stream::MAX_CONTROL)
            .map_err(|e| e.to_string())?;
        ram.take_dirty(vm)?; // from now on every guest write is logged
        let mut round = 0u32;
        let mut pending: Option<Vec<u64>> = None;
        let mut prev = u64::MAX;
        loop {
            if sh.stopped() {
                return Ok(None);
            }
            let before = conn.sent;
            let n = match &pending {
                None => send_pages(&mut conn, ram, round, nonzero_pages(ram)?.into_iter())?,
                Some(bits) => send_pages(&mut conn, ram, round, pages_of(bits))?,
            };
            let bytes = conn.sent - before;
            conn.send(tag::ROUND, &stream::encode_round(round, n, bytes))?;
            st.round_pages.push(n);
            st.round_bytes.push(conn.sent - before);
            round += 1;
            let bits = ram.take_dirty(vm)?;
            let dirty: u64 = bits.iter().map(|w| u64::from(w.count_ones())).sum();
            // Converged, capped, or no longer shrinking: the rest goes paused.
            if dirty <= opts.small_set || round > opts.max_rounds || (dirty >= prev && round > 3) {
                st.rounds = round;
                return Ok(Some(bits));
            }
            prev = dirty;
            pending = Some(bits);
        }
    })();
    let pending = match pre {
        Ok(Some(b)) => b,
        Ok(None) => {
            conn.send_error("the source's run ended during the pre-copy");
            return Ok(Sent::Ended);
        }
        Err(e) => {
            conn.send_error(&e);
            return Ok(finish(st, Some(&conn), e));
        }
    };

    // Test hook: pause while some APIC is nested (bounded wait).
    if !opts.nested_wait.is_zero() {
        let until = Instant::now() + opts.nested_wait;
        while Instant::now() < until && in_service(sh) < 3 && !sh.stopped() {
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    // Phase 2, the guest paused.
    let gate = &sh.migration;
    if !gate.pause_all(&sh.rt)? {
        conn.send_error("the source's run ended before the pause");
        return Ok(Sent::Ended);
    }
    let paused = Instant::now();
    let paused_unix = stream::unix_ns();
    let chip = sh.chip();
    let n = sh.rt.vcpus();
    // APIC events pending for each vCPU (not APIC registers): into the file, or back
    // to the vCPUs if the VM stays.
    let taken: Vec<Events> = (0..n)
        .map(|i| chip.take_events(i).unwrap_or_default())
        .collect();
    let resume_here = |st: LiveStats, conn: &mut Conn, why: String| {
        conn.send_error(&why);
        gate.resume_in_place(taken.clone());
        finish(st, Some(conn), why)
    };
    let before = conn.sent;
    let last = (|| -> Result<u64, String> {
        let mut bits = ram.take_dirty(vm)?;
        for (a, b) in bits.iter_mut().zip(&pending) {
            *a |= *b;
        }
        let round = st.rounds;
        send_pages(&mut conn, ram, round, pages_of(&bits))
    })();
    let last_pages = match last {
        Ok(p) => p,
        Err(e) => return Ok(resume_here(st, &mut conn, e)),
    };
    let isr = in_service(sh);
    let mut file = match capture::gather(sh, None, console, header) {
        Ok(f) => f,
        Err(e) => return Ok(resume_here(st, &mut conn, e)),
    };
    for (v, e) in file.vcpus.iter_mut().zip(&taken) {
        v.events = vlapic_kvm::vcpu::merge_events(v.events, *e);
    }
    file.stats.migrations += 1;
    file.stats.max_in_service = file.stats.max_in_service.max(isr);
    if isr >= 3 {
        file.stats.nested_migrations += 1;
    }
    let body = stream::encode_final(paused_unix, st.rounds, &file.encode());
    if let Err(e) = conn.send(tag::FINAL, &body) {
        return Ok(resume_here(st, &mut conn, e));
    }
    st.round_pages.push(last_pages);
    st.round_bytes.push(conn.sent - before);
    match conn.expect(tag::READY, stream::MAX_CONTROL) {
        Ok(_) => {}
        Err(e) => return Ok(resume_here(st, &mut conn, e.to_string())),
    }
    if let Err(e) = conn.send(tag::COMMIT, &[]) {
        return Ok(resume_here(st, &mut conn, e));
    }
    match conn.expect(tag::RUNNING, stream::MAX_CONTROL) {
        Ok(_) => {
            st.downtime_us = Some(u64::try_from(paused.elapsed().as_micros()).unwrap_or(u64::MAX));
            st.bytes = conn.sent;
            st.total_ms = t0.elapsed().as_secs_f64() * 1e3;
            st.completed = true;
            st.result = "completed".into();
            gate.max_downtime_us
                .fetch_max(st.downtime_us.unwrap_or(0), Ordering::Relaxed);
            gate.done.fetch_add(1, Ordering::Relaxed);
            if isr >= 3 {
                gate.nested_migrations.fetch_add(1, Ordering::Relaxed);
            }
            gate.max_in_service.fetch_max(isr, Ordering::Relaxed);
            Ok(Sent::Moved(st))
        }
        // The destination is gone, or refused, without taking over: the VM is ours.
        Err(RecvError::Closed) | Err(RecvError::Peer(_)) => {
            gate.resume_in_place(taken.clone());
            Ok(finish(
                st,
                Some(&conn),
                "the destination went away after the commit without taking over".into(),
            ))
        }
        Err(RecvError::Bad(e)) => Err(format!(
            "the destination did not confirm taking over ({e}); the VM is not resumed here, \
             as it may be running there"
        )),
    }
}

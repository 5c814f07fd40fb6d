//! `--incoming`: the destination side of a live migration (docs/migration-stream.md).
//! Waits for one source, checks its stream (magic, version, every message's checksum,
//! every field), fills fresh guest RAM from the pre-copy, takes the paused VM's state
//! as a save file without memory, and, once the VM is built, runs the commit
//! handshake: `READ` → the source's `COMT` → `RUNN`, after which (and only after
//! which) the caller starts the vCPUs. A refused stream or a source that goes away
//! before its commit ends this process with one line and without running anything.

use std::time::{Duration, Instant};

use crate::memory::GuestRam;
use crate::savefile::{self, SaveFile, FLAG_KVM_APIC, FLAG_VERIFY, FLAG_X2APIC};
use crate::shared::MAX_VCPUS;
use crate::stream::{self, tag, Addr, Conn, Hello, Listener, LiveStats, PAGE};

/// A VM received but not yet running.
pub struct Incoming {
    conn: Conn,
    /// Guest RAM as the source had it at the pause (taken by the caller).
    pub ram: Option<GuestRam>,
    /// The paused VM (no memory pages: they are in `ram`; taken by the caller).
    pub file: Option<SaveFile>,
    /// The report so far.
    pub stats: LiveStats,
    paused_unix: u64,
    t0: Instant,
    _listener: Listener,
}

/// Binds `addr` (so a source may connect as soon as this returns).
pub fn listen(addr: &Addr) -> Result<Listener, String> {
    Listener::bind(addr)
}

/// Accepts one source on `listener` (within `accept_limit`, if given) and receives
/// its VM up to the pause. `Err` is one line (also sent to the source as `ERRO` when
/// the connection allows).
pub fn receive(
    listener: Listener,
    addr: &Addr,
    accept_limit: Option<Duration>,
) -> Result<Incoming, String> {
    let Some(mut conn) = listener.accept_within(accept_limit)? else {
        return Err(format!(
            "--incoming {addr}: no source connected within {} ms",
            accept_limit.unwrap_or_default().as_millis()
        ));
    };
    let t0 = Instant::now();
    conn.set_timeout(Some(std::time::Duration::from_secs(60)));
    match receive_on(&mut conn) {
        Ok((ram, file, paused_unix, round_pages, round_bytes, rounds)) => Ok(Incoming {
            stats: LiveStats {
                role: "destination",
                peer: addr.to_string(),
                rounds,
                round_pages,
                round_bytes,
                ..LiveStats::default()
            },
            conn,
            ram: Some(ram),
            file: Some(file),
            paused_unix,
            t0,
            _listener: listener,
        }),
        Err(e) => {
            conn.send_error(&e);
            Err(format!("incoming migration refused: {e}"))
        }
    }
}

type Received = (GuestRam, SaveFile, u64, Vec<u64>, Vec<u64>, u32);

fn receive_on(conn: &mut Conn) -> Result<Received, String> {
    conn.recv_preamble()?;
    let h = Hello::decode(
        &conn
            .expect(tag::HELLO, stream::MAX_CONTROL)
            .map_err(|e| e.to_string())?,
    )?;
    if h.vcpus == 0 || h.vcpus as usize > MAX_VCPUS {
        return Err(format!(
            "HELO: {} vCPUs (must be 1 to {MAX_VCPUS})",
            h.vcpus
        ));
    }
    if h.flags & !(FLAG_X2APIC | FLAG_VERIFY | FLAG_KVM_APIC) != 0 {
        return Err(format!("HELO: unknown flags {:#x}", h.flags));
    }
    if h.tsc_hz == 0 {
        return Err("HELO: TSC frequency 0".into());
    }
    let ram = GuestRam::new(h.memory_mib).map_err(|e| format!("HELO: {e}"))?;
    conn.send(tag::OKAY, &[])?;
    let total = ram.size() / PAGE as u64;
    // The state after the pause: a save file of this shape without memory.
    let max_final = usize::try_from(savefile::max_size(h.vcpus, 0)).unwrap_or(usize::MAX);
    let max = max_final.max(stream::MAX_PAGES_BODY);
    let mut round_pages = Vec::new();
    let mut round_bytes = Vec::new();
    let mut pages = 0u64;
    let mut start = conn.received;
    loop {
        let (t, body) = conn.recv(max).map_err(|e| match e {
            stream::RecvError::Closed => {
                "the source closed the connection before the commit".into()
            }
            e => e.to_string(),
        })?;
        if t == tag::PAGES {
            let (_, n) = stream::decode_pages(&body, total, |i, d| {
                let at = u64::from(i) * PAGE as u64;
                match d {
                    Some(d) => ram.write(at, d),
                    None => ram.zero(at, PAGE as u64),
                }
            })?;
            pages += n;
        } else if t == tag::ROUND {
            let (round, n, _) = stream::decode_round(&body)?;
            if round as usize != round_pages.len() || n != pages {
                return Err(format!(
                    "ROND: round {round} of {n} pages, {} pages received in round {}",
                    pages,
                    round_pages.len()
                ));
            }
            round_pages.push(pages);
            round_bytes.push(conn.received - start);
            start = conn.received;
            pages = 0;
        } else if t == tag::FINAL {
            let (paused, rounds, bytes) = stream::decode_final(&body)?;
            if rounds as usize != round_pages.len() {
                return Err(format!(
                    "FINL: {rounds} rounds announced, {} received",
                    round_pages.len()
                ));
            }
            let file = SaveFile::decode(bytes).map_err(|e| format!("FINL: {e}"))?;
            let fh = &file.header;
            if fh.vcpus != h.vcpus
                || fh.memory_mib != h.memory_mib
                || fh.flags != h.flags
                || fh.tsc_hz != h.tsc_hz
            {
                return Err("FINL: the state's shape differs from HELO's".into());
            }
            if !file.memory.index.is_empty() {
                return Err("FINL: memory pages in the state (they come as PAGS)".into());
            }
            round_pages.push(pages);
            round_bytes.push(conn.received - start);
            return Ok((ram, file, paused, round_pages, round_bytes, rounds));
        } else {
            return Err(format!(
                "message {:?} where PAGS, ROND or FINL was expected",
                String::from_utf8_lossy(&t)
            ));
        }
    }
}

impl Incoming {
    /// The commit handshake, with the VM built and its vCPUs not started: `READ`,
    /// wait for `COMT`, answer `RUNN`. `Ok` means this process now owns the VM and
    /// must run it; `Err` (one line) that it must not.
    pub fn take_over(&mut self) -> Result<(), String> {
        let fail =
            |e: String| format!("incoming migration abandoned, the VM does not run here: {e}");
        self.conn.send(tag::READY, &[]).map_err(fail)?;
        self.conn
            .expect(tag::COMMIT, stream::MAX_CONTROL)
            .map_err(|e| match e {
                stream::RecvError::Closed => fail("the source went away before its commit".into()),
                e => fail(e.to_string()),
            })?;
        self.conn.send(tag::RUNNING, &[]).map_err(fail)?;
        let now = stream::unix_ns();
        self.stats.downtime_us = Some(now.saturating_sub(self.paused_unix) / 1000);
        self.stats.bytes = self.conn.received;
        self.stats.total_ms = self.t0.elapsed().as_secs_f64() * 1e3;
        self.stats.completed = true;
        self.stats.result = "completed".into();
        Ok(())
    }

    /// Refuses the VM after receiving it (e.g. KVM would not take its state).
    pub fn refuse(&mut self, why: &str) {
        self.conn.send_error(why);
    }
}

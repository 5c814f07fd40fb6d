//! Taking a save file's contents from a running VM: every vCPU paused as for a
//! migration, then vCPUs, fabric, devices, console, counters and RAM gathered.

use std::sync::atomic::Ordering;

use vlapic::state::native;

use crate::console::ConsoleOut;
use crate::lock;
use crate::memory::GuestRam;
use crate::savefile::{Header, Memory, SaveFile, SavedVcpu, Stats, PAGE};
use crate::shared::Shared;

/// Pauses every vCPU exactly as a migration does (the last exit completed, state
/// saved, parked at the gate) and gathers the whole VM. `Ok(None)` when the run
/// ended meanwhile. The vCPUs stay parked; the caller ends the run.
pub fn capture(
    sh: &Shared,
    ram: &GuestRam,
    console: &ConsoleOut,
    header: Header,
) -> Result<Option<SaveFile>, String> {
    if !sh.migration.pause_all(&sh.rt)? {
        return Ok(None);
    }
    gather(sh, Some(ram), console, header).map(Some)
}

/// Gathers the whole paused VM (after `pause_all`): vCPUs, fabric, console, stats,
/// devices, and with `ram` its non-zero pages (`None`: no memory, as live migration
/// sends pages separately). The APIC events pending for each vCPU are taken from the
/// fabric into the file: a caller that resumes the VM here must hand them back.
pub fn gather(
    sh: &Shared,
    ram: Option<&GuestRam>,
    console: &ConsoleOut,
    mut header: Header,
) -> Result<SaveFile, String> {
    let paused = sh.migration.paused();
    // The HPET and RTC stay still (no line moves) while the fabric is exported.
    let clocks = sh.clocks.hold();
    let now = sh.clock().now_ns();
    header.vm_ns = now;
    header.guest_tsc = sh.clock().guest_tsc();
    let chip = sh.chip();
    let fabric = match &sh.kernel_irqchip {
        // KVM's in-kernel irqchip: its pages and IOAPIC, converted and validated.
        Some(vm) => {
            let apics = paused
                .iter()
                .map(|p| p.as_ref().and_then(|p| p.kernel_apic.clone()))
                .collect::<Option<Vec<_>>>()
                .ok_or("a vCPU paused without its in-kernel APIC state")?;
            let clock = sh
                .fabric_cfg
                .apics
                .first()
                .map(|a| a.clock)
                .unwrap_or_default();
            let st = crate::kernel_chip::capture(vm, &apics, &sh.fabric_cfg, now, &clock)?;
            let errors = st.validate(&sh.fabric_cfg.apics);
            if let Some(e) = errors.first() {
                return Err(format!(
                    "KVM's irqchip state is refused by the library: {e:?}"
                ));
            }
            native::encode_fabric(&st)
        }
        None => native::encode_fabric(&chip.export()),
    };
    let (mut max_nesting, mut violations) = *lock(&sh.verifier_carry);
    let mut vcpus = Vec::with_capacity(paused.len());
    for (i, p) in paused.into_iter().enumerate() {
        let p = p.ok_or_else(|| format!("vCPU {i} did not pause"))?;
        // Pending NMI/SMI/INIT/SIPI/ExtINT are not APIC registers: carried by hand.
        let ev = chip
            .take_events(i)
            .ok_or_else(|| format!("vCPU {i} has no APIC"))?;
        let (d, v) = chip
            .read_apic(i, |a| (a.verifier().max_depth(), a.verifier().violations()))
            .ok_or_else(|| format!("vCPU {i} has no APIC"))?;
        max_nesting = max_nesting.max(d);
        violations = violations.saturating_add(v);
        let events = vlapic_kvm::vcpu::merge_events(p.events, ev);
        vcpus.push(SavedVcpu {
            run: p.run,
            events,
            interrupts: p.counters[0],
            nmis: p.counters[1],
            sipis: p.counters[2],
            exits: sh.exits.vcpu(i),
            kvm: p.kvm,
        });
    }
    // Guest RAM, all-zero pages left out (read 1 MiB at a time).
    let mut memory = Memory::default();
    let mut chunk = vec![0u8; 1 << 20];
    let mut addr = 0u64;
    let size = ram.map_or(0, GuestRam::size);
    while let (true, Some(ram)) = (addr < size, ram) {
        let len = (ram.size() - addr).min(chunk.len() as u64) as usize;
        let buf = chunk.get_mut(..len).ok_or("chunk")?;
        ram.read(addr, buf)?;
        for (k, page) in buf.chunks(PAGE).enumerate() {
            if page.iter().any(|b| *b != 0) {
                let index = (addr / PAGE as u64) as usize + k;
                memory
                    .index
                    .push(u32::try_from(index).map_err(|_| "RAM too large")?);
                memory.data.extend_from_slice(page);
            }
        }
        addr += len as u64;
    }
    let g = &sh.migration;
    let stats = Stats {
        max_nesting,
        violations,
        migrations: g.done.load(Ordering::Relaxed),
        max_downtime_us: g.max_downtime_us.load(Ordering::Relaxed),
        nested_migrations: g.nested_migrations.load(Ordering::Relaxed),
        max_in_service: g.max_in_service.load(Ordering::Relaxed),
        odd: [
            sh.io.unknown_ports.get(),
            sh.wild_mmio.get(),
            sh.msr_gp.get(),
        ],
    };
    Ok(SaveFile {
        header,
        fabric,
        vcpus,
        memory,
        console: console.raw_log(),
        stats,
        devices: sh.io.save(),
        clocks: Some(clocks.clone()),
        pic: Some(match &sh.kernel_irqchip {
            Some(vm) => crate::kernel_chip::capture_pic(vm)?,
            None => sh.io.pic.save(),
        }),
    })
}

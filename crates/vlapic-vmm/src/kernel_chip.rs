//! KVM's in-kernel irqchip (`--irqchip kernel`) as migration state: its LAPIC pages
//! (`KVM_GET_LAPIC`/`KVM_SET_LAPIC` with IA32_APIC_BASE and IA32_TSC_DEADLINE) and
//! IOAPIC (`KVM_GET_IRQCHIP`/`KVM_SET_IRQCHIP`, chip 2) converted to and from the
//! library's architectural state through `vlapic::state::kvm`, with the library's
//! full import validation on the way in; and the 8259 pair (chips 0 and 1) to and
//! from the VMM's own (`pic`, whose state is KVM's `kvm_pic_state` field for field).

use kvm_bindings::{kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, Msrs};
use kvm_ioctls::{VcpuFd, VmFd};
use vlapic::fabric::FabricConfig;
use vlapic::state::kvm::{self as kfmt, KvmExtra};
use vlapic::state::{FabricState, IoApicState, LapicState};
use vlapic::TimerClock;
use vlapic_kvm::RunState;

use crate::pic::{PicPair, KVM_PIC_STATE_LEN};
use zerocopy::{FromBytes as _, IntoBytes as _};

const APIC_BASE: u32 = 0x1B;
const TSC_DEADLINE: u32 = 0x6E0;
const IOAPIC_CHIP: u32 = 2;
const PIC_MASTER_CHIP: u32 = 0;
const PIC_SLAVE_CHIP: u32 = 1;
/// `struct kvm_irqchip`: chip_id u32, pad u32, then the chip union.
const CHIP_DATA: usize = 8;
const KVM_IOAPIC_PINS: usize = 24;

/// One vCPU's in-kernel APIC as KVM hands it out.
#[derive(Clone, Debug)]
pub struct KernelApic {
    /// `struct kvm_lapic_state`.
    pub page: Vec<u8>,
    /// IA32_APIC_BASE and IA32_TSC_DEADLINE.
    pub extra: KvmExtra,
    /// KVM's multiprocessing state of the vCPU, as our run state.
    pub run: RunState,
}

fn msr(fd: &VcpuFd, index: u32) -> Result<u64, String> {
    let mut m = Msrs::from_entries(&[kvm_msr_entry {
        index,
        ..Default::default()
    }])
    .map_err(|e| format!("MSR list: {e:?}"))?;
    fd.get_msrs(&mut m)
        .map_err(|e| format!("KVM_GET_MSRS({index:#x}): {e}"))?;
    Ok(m.as_slice().first().map_or(0, |e| e.data))
}

fn set_msr(fd: &VcpuFd, index: u32, data: u64) -> Result<(), String> {
    let m = Msrs::from_entries(&[kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }])
    .map_err(|e| format!("MSR list: {e:?}"))?;
    match fd.set_msrs(&m) {
        Ok(1) => Ok(()),
        Ok(_) => Err(format!("KVM refused MSR {index:#x} = {data:#x}")),
        Err(e) => Err(format!("KVM_SET_MSRS({index:#x}): {e}")),
    }
}

/// Saves a paused vCPU's in-kernel APIC.
pub fn save_apic(fd: &VcpuFd) -> Result<KernelApic, String> {
    let st = fd.get_lapic().map_err(|e| format!("KVM_GET_LAPIC: {e}"))?;
    let mp = fd
        .get_mp_state()
        .map_err(|e| format!("KVM_GET_MP_STATE: {e}"))?;
    let if_flag = fd.get_regs().map(|r| r.rflags & 0x200 != 0).unwrap_or(true);
    let run = match mp.mp_state {
        kvm_bindings::KVM_MP_STATE_HALTED => RunState::Halted(if_flag),
        kvm_bindings::KVM_MP_STATE_INIT_RECEIVED | kvm_bindings::KVM_MP_STATE_UNINITIALIZED => {
            RunState::WaitForSipi
        }
        _ => RunState::Running,
    };
    Ok(KernelApic {
        page: st.regs.iter().map(|b| *b as u8).collect(),
        extra: KvmExtra {
            apic_base: msr(fd, APIC_BASE)?,
            tsc_deadline: msr(fd, TSC_DEADLINE)?,
        },
        run,
    })
}

/// The IOAPIC's bytes inside `struct kvm_irqchip` (chip 2): base u64, ioregsel u32,
/// id u32, irr u32, pad u32, 24 redirection entries u64.
fn ioapic_bytes(vm: &VmFd) -> Result<kvm_irqchip, String> {
    let mut chip = kvm_irqchip {
        chip_id: IOAPIC_CHIP,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(|e| format!("KVM_GET_IRQCHIP(IOAPIC): {e}"))?;
    Ok(chip)
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(b.get(o..o + 4).unwrap_or(&[0; 4]));
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b.get(o..o + 8).unwrap_or(&[0; 8]));
    u64::from_le_bytes(a)
}

/// The whole in-kernel irqchip as the library's state, at VM time `now`: every
/// page decoded with `vlapic::state::kvm` and the IOAPIC converted (KVM's `irr`,
/// its latched inputs, becomes the pin levels). The result is then validated and
/// imported by whoever takes it.
pub fn capture(
    vm: &VmFd,
    apics: &[KernelApic],
    cfg: &FabricConfig,
    now: u64,
    clock: &TimerClock,
) -> Result<FabricState, String> {
    let mut out = Vec::with_capacity(apics.len());
    for (i, a) in apics.iter().enumerate() {
        let s = kfmt::decode(&a.page, a.extra, now, clock)
            .map_err(|e| format!("vCPU {i}: KVM's LAPIC page does not decode: {e:?}"))?;
        out.push(s);
    }
    let chip = ioapic_bytes(vm)?;
    let b = chip.as_bytes();
    let io = b.get(8..).unwrap_or(&[]);
    let pins = usize::from(cfg.ioapic_pins).min(KVM_IOAPIC_PINS);
    let irr = u32_at(io, 16);
    Ok(FabricState {
        apics: out,
        ioapic: IoApicState {
            id: (u32_at(io, 12) & 0xF) as u8,
            select: u32_at(io, 8) as u8,
            redirection: (0..pins).map(|p| u64_at(io, 24 + 8 * p)).collect(),
            pin_levels: (0..pins).map(|p| irr >> p & 1 != 0).collect(),
        },
    })
}

/// Loads a (validated) fabric state into KVM's in-kernel irqchip: per vCPU
/// IA32_APIC_BASE, the page (`vlapic::state::kvm::encode` at `now`), the TSC
/// deadline (after the page: KVM ignores it unless LVTT is in TSC-deadline mode)
/// and the MP state from `runs`; then the IOAPIC.
pub fn load(
    vm: &VmFd,
    fds: &[VcpuFd],
    state: &FabricState,
    runs: &[RunState],
    now: u64,
    clock: &TimerClock,
) -> Result<(), String> {
    for (i, (fd, s)) in fds.iter().zip(&state.apics).enumerate() {
        load_apic(fd, s, now, clock).map_err(|e| format!("vCPU {i}: {e}"))?;
        let mp = match runs.get(i).copied().unwrap_or(RunState::Running) {
            RunState::Running => kvm_bindings::KVM_MP_STATE_RUNNABLE,
            RunState::Halted(_) => kvm_bindings::KVM_MP_STATE_HALTED,
            RunState::WaitForSipi => kvm_bindings::KVM_MP_STATE_INIT_RECEIVED,
        };
        fd.set_mp_state(kvm_mp_state { mp_state: mp })
            .map_err(|e| format!("vCPU {i}: KVM_SET_MP_STATE: {e}"))?;
    }
    let mut chip = ioapic_bytes(vm)?;
    let mut bytes = chip.as_bytes().to_vec();
    let io = &state.ioapic;
    let mut put = |o: usize, v: &[u8]| {
        if let Some(d) = bytes.get_mut(8 + o..8 + o + v.len()) {
            d.copy_from_slice(v);
        }
    };
    put(8, &u32::from(io.select).to_le_bytes());
    put(12, &u32::from(io.id).to_le_bytes());
    let irr = io
        .pin_levels
        .iter()
        .take(KVM_IOAPIC_PINS)
        .enumerate()
        .fold(0u32, |a, (p, l)| a | u32::from(*l) << p);
    put(16, &irr.to_le_bytes());
    for (p, r) in io.redirection.iter().take(KVM_IOAPIC_PINS).enumerate() {
        put(24 + 8 * p, &r.to_le_bytes());
    }
    chip = kvm_irqchip::read_from_bytes(&bytes).map_err(|_| "kvm_irqchip layout")?;
    vm.set_irqchip(&chip)
        .map_err(|e| format!("KVM_SET_IRQCHIP(IOAPIC): {e}"))
}

fn load_apic(fd: &VcpuFd, s: &LapicState, now: u64, clock: &TimerClock) -> Result<(), String> {
    // KVM_SET_LAPIC restarts the timer from TMCCT, and for a one-shot timer that
    // already expired (TMCCT 0, TMICT not 0) `set_target_expiration` takes a
    // deadline of 0: it fires again at once (seen as "one-shot fired 2 times" by the
    // test guest). Load such a timer with TMICT 0: nothing fires; the guest then
    // reads 0 from TMICT instead of its last initial count.
    let mut s = *s;
    if s.timer_mode() == Some(vlapic::TimerMode::OneShot) && s.timer_deadline == 0 {
        s.timer_initial = 0;
    }
    let (page, extra) = kfmt::encode(&s, now, clock);
    set_msr(fd, APIC_BASE, extra.apic_base)?;
    let mut st = kvm_lapic_state::default();
    for (d, b) in st.regs.iter_mut().zip(page.iter()) {
        *d = *b as _;
    }
    fd.set_lapic(&st)
        .map_err(|e| format!("KVM_SET_LAPIC: {e}"))?;
    if extra.tsc_deadline != 0 {
        set_msr(fd, TSC_DEADLINE, extra.tsc_deadline)?;
    }
    Ok(())
}

fn get_chip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, String> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(|e| format!("KVM_GET_IRQCHIP({chip_id}): {e}"))?;
    Ok(chip)
}

/// KVM's 8259 pair (`KVM_GET_IRQCHIP` chips 0 and 1) as the VMM's, validated
/// (`PicPair::from_bytes`).
pub fn capture_pic(vm: &VmFd) -> Result<PicPair, String> {
    let mut b = Vec::with_capacity(2 * KVM_PIC_STATE_LEN);
    for id in [PIC_MASTER_CHIP, PIC_SLAVE_CHIP] {
        let chip = get_chip(vm, id)?;
        let bytes = chip.as_bytes();
        b.extend_from_slice(
            bytes
                .get(CHIP_DATA..CHIP_DATA + KVM_PIC_STATE_LEN)
                .ok_or("kvm_irqchip layout")?,
        );
    }
    PicPair::from_bytes(&b).map_err(|e| format!("KVM's 8259 state: {e}"))
}

/// Loads the VMM's 8259 pair into KVM's (`KVM_SET_IRQCHIP` chips 0 and 1).
pub fn load_pic(vm: &VmFd, pair: &PicPair) -> Result<(), String> {
    for (id, pic) in [
        (PIC_MASTER_CHIP, &pair.chips[0]),
        (PIC_SLAVE_CHIP, &pair.chips[1]),
    ] {
        let mut bytes = get_chip(vm, id)?.as_bytes().to_vec();
        bytes
            .get_mut(CHIP_DATA..CHIP_DATA + KVM_PIC_STATE_LEN)
            .ok_or("kvm_irqchip layout")?
            .copy_from_slice(&pic.to_kvm());
        let chip = kvm_irqchip::read_from_bytes(&bytes).map_err(|_| "kvm_irqchip layout")?;
        vm.set_irqchip(&chip)
            .map_err(|e| format!("KVM_SET_IRQCHIP({id}): {e}"))?;
    }
    Ok(())
}

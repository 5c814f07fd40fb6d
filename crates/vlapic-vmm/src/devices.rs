//! Port-I/O platform devices: 16550 COM1, isa-debug-exit (0xF4), QEMU fw_cfg
//! (0x510/0x511), port 0x80, QEMU's pc-testdev (I/O data register 0xE0, page
//! flush 0xE4, IRQ lines 0x2000+N), a PCI host bridge with no devices
//! (0xCF8/0xCFC), ACPI sleep control/status (0x600/0x601), the 8259A pair (`pic`;
//! ports 0x20/0x21/0xA0/0xA1/0x4D0/0x4D1).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

use crate::acpi::{is_soft_off, SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT};
use crate::console::ConsoleOut;
use crate::lock;
use crate::pic::{self, PicDevice};
use crate::stats::Odd;

/// COM1 base port.
pub const COM1: u16 = 0x3F8;
/// isa-debug-exit port.
pub const DEBUG_EXIT: u16 = 0xF4;
/// fw_cfg selector port (data at +1).
pub const FW_CFG: u16 = 0x510;
/// First pc-testdev-style IRQ line port: `outb(level, TESTDEV_IRQ + n)`.
pub const TESTDEV_IRQ: u16 = 0x2000;
/// Number of IRQ line ports.
pub const TESTDEV_LINES: u16 = 24;
/// pc-testdev's 4-byte data register (0xE0..=0xE3), read back as written.
pub const TESTDEV_IOPORT: u16 = 0xE0;
/// pc-testdev's page-flush port: a 32-bit write of a guest-physical address.
pub const TESTDEV_FLUSH: u16 = 0xE4;
/// PCI configuration mechanism #1: CONFIG_ADDRESS (dword accesses only).
pub const PCI_CONFIG_ADDRESS: u16 = 0xCF8;
/// PCI configuration mechanism #1: CONFIG_DATA (0xCFC..=0xCFF, any width).
pub const PCI_CONFIG_DATA: u16 = 0xCFC;
/// The bits of CONFIG_ADDRESS a guest can set: enable (31), bus (23:16),
/// device (15:11), function (10:8), register (7:2). Bits 30:24 are reserved and
/// read 0, bits 1:0 read 0 (PCI Local Bus Specification 3.0, §3.2.2.3.2).
const PCI_ADDRESS_MASK: u32 = 0x80FF_FFFC;
const PAGE_SIZE: u64 = 4096;

/// The serial interrupt line is not wired (the guest polls LSR).
pub struct NoIrq;

impl Trigger for NoIrq {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

/// QEMU's fw_cfg legacy I/O interface (selector + byte-wide data).
struct FwCfg {
    key: u16,
    pos: usize,
    cpus: u16,
    ram: u64,
}

impl FwCfg {
    fn item(&self) -> Vec<u8> {
        match self.key {
            0x00 => b"QEMU".to_vec(),
            0x01 => 1u32.to_le_bytes().to_vec(),
            0x03 => self.ram.to_le_bytes().to_vec(),
            0x05 | 0x0F => self.cpus.to_le_bytes().to_vec(),
            _ => Vec::new(),
        }
    }
}

/// What the vCPU must do after a port access.
#[derive(Debug, Default)]
pub struct IoOutcome {
    /// Drive this IOAPIC input (pin, level) through the irqchip in use.
    pub irq: Option<(u32, bool)>,
    /// The guest asked to end the run with this isa-debug-exit value.
    pub exit: Option<u32>,
    /// The guest entered ACPI S5 through the sleep control register.
    pub power_off: bool,
}

impl IoOutcome {
    /// How the access ends the run, if it does.
    pub fn end(&self) -> Option<crate::outcome::Outcome> {
        match (self.exit, self.power_off) {
            (Some(n), _) => Some(crate::outcome::Outcome::DebugExit(n)),
            (None, true) => Some(crate::outcome::Outcome::PoweredOff),
            (None, false) => None,
        }
    }
}

/// Guest RAM as the page-flush port sees it: host address of guest-physical 0
/// and the size in bytes.
#[derive(Clone, Copy, Debug)]
struct RamWindow {
    base: usize,
    size: u64,
}

/// All port-I/O devices.
pub struct IoBus {
    serial: Mutex<Serial<NoIrq, NoEvents, ConsoleOut>>,
    fw_cfg: Mutex<FwCfg>,
    /// pc-testdev's data register at 0xE0.
    testdev_data: AtomicU32,
    /// The PCI CONFIG_ADDRESS latch at 0xCF8.
    pci_address: AtomicU32,
    /// Guest RAM for the page-flush port (none: flushes are counted, no-ops).
    ram: Option<RamWindow>,
    /// Page flushes done (0xE4 writes inside RAM).
    pub page_flushes: std::sync::atomic::AtomicU64,
    /// Accesses to ports nothing claims (reads return all ones), first port.
    pub unknown_ports: Odd,
    /// The 8259A pair (shared with the BSP's ExtINT source).
    pub pic: std::sync::Arc<PicDevice>,
}

impl IoBus {
    /// The bus of a VM with `cpus` vCPUs and `ram` bytes, console into `out`.
    pub fn new(out: ConsoleOut, cpus: u16, ram: u64) -> Self {
        Self {
            serial: Mutex::new(Serial::new(NoIrq, out)),
            fw_cfg: Mutex::new(FwCfg {
                key: 0,
                pos: 0,
                cpus,
                ram,
            }),
            testdev_data: AtomicU32::new(0),
            pci_address: AtomicU32::new(0),
            ram: None,
            page_flushes: Default::default(),
            unknown_ports: Odd::default(),
            pic: Default::default(),
        }
    }

    /// Lets the page-flush port (0xE4) reach guest RAM: `base` is the host
    /// address of guest-physical 0 in a mapping of `size` bytes that stays mapped
    /// for as long as this bus is used (the VM's `GuestRam`).
    pub fn with_ram(mut self, base: *mut u8, size: u64) -> Self {
        self.ram = Some(RamWindow {
            base: base as usize,
            size,
        });
        self
    }

    /// A bus continuing saved device state (a restored run).
    pub fn restore(out: ConsoleOut, cpus: u16, ram: u64, d: &DevicesState) -> Result<Self, String> {
        // Every field is named (no `..`): a new saved field does not compile until
        // its restore is written.
        let DevicesState {
            serial_regs,
            serial_in,
            fw_key,
            fw_pos,
        } = d;
        let [dll, dlm, ier, iir, lcr, lsr, mcr, msr, scr] = *serial_regs;
        let st = SerialState {
            baud_divisor_low: dll,
            baud_divisor_high: dlm,
            interrupt_enable: ier,
            interrupt_identification: iir,
            line_control: lcr,
            line_status: lsr,
            modem_control: mcr,
            modem_status: msr,
            scratch: scr,
            in_buffer: serial_in.clone(),
        };
        let serial = Serial::from_state(&st, NoIrq, NoEvents, out)
            .map_err(|e| format!("serial port state: {e:?}"))?;
        Ok(Self {
            serial: Mutex::new(serial),
            fw_cfg: Mutex::new(FwCfg {
                key: *fw_key,
                pos: usize::try_from(*fw_pos).unwrap_or(usize::MAX),
                cpus,
                ram,
            }),
            // Not in the save file (format 1): a restored guest finds the
            // pc-testdev data register and the PCI address latch at 0.
            testdev_data: AtomicU32::new(0),
            pci_address: AtomicU32::new(0),
            ram: None,
            page_flushes: Default::default(),
            unknown_ports: Odd::default(),
            pic: Default::default(),
        })
    }

    /// The devices' state for a save file.
    pub fn save(&self) -> DevicesState {
        // Every field is named (no `..`), here and in the device states: a new field
        // does not compile until someone decides whether it is saved.
        let IoBus {
            serial,
            fw_cfg,
            unknown_ports: _, // a diagnostic counter, not device state
            // Not migrated (save-file format 1 has no place for them): pc-testdev's
            // scratch data register and the PCI config address latch of a bus with no
            // device; a save between a guest's write and its read loses the value.
            testdev_data: _,
            pci_address: _,
            ram: _,          // host mapping for the page flush, not guest state
            page_flushes: _, // a diagnostic counter
            pic: _,          // its own save-file section (PIC8), see `SaveFile::pic`
        } = self;
        let SerialState {
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
            in_buffer,
        } = lock(serial).state();
        let FwCfg {
            key,
            pos,
            cpus: _, // configuration: the restoring VM supplies it
            ram: _,  // configuration: the restoring VM supplies it
        } = *lock(fw_cfg);
        DevicesState {
            serial_regs: [
                baud_divisor_low,
                baud_divisor_high,
                interrupt_enable,
                interrupt_identification,
                line_control,
                line_status,
                modem_control,
                modem_status,
                scratch,
            ],
            serial_in: in_buffer,
            fw_key: key,
            fw_pos: pos as u64,
        }
    }

    fn unknown(&self, port: u16) {
        self.unknown_ports.hit(u64::from(port));
    }

    /// A guest IN.
    pub fn port_in(&self, port: u16, data: &mut [u8]) {
        match port {
            p if (COM1..COM1 + 8).contains(&p) => {
                let v = lock(&self.serial).read((p - COM1) as u8);
                data.fill(0);
                if let Some(b) = data.first_mut() {
                    *b = v;
                }
            }
            FW_CFG => data.fill(0),
            p if p == FW_CFG + 1 => {
                let mut f = lock(&self.fw_cfg);
                let item = f.item();
                for b in data.iter_mut() {
                    *b = item.get(f.pos).copied().unwrap_or(0);
                    f.pos = f.pos.saturating_add(1);
                }
            }
            p if pic::owns(p) => {
                data.fill(0);
                if let Some(b) = data.first_mut() {
                    *b = self.pic.read(p);
                }
            }
            0x80 => data.fill(0),
            p if (TESTDEV_IRQ..TESTDEV_IRQ + TESTDEV_LINES).contains(&p) => data.fill(0),
            DEBUG_EXIT => data.fill(0),
            SLEEP_CONTROL_PORT | SLEEP_STATUS_PORT => data.fill(0),
            p if (TESTDEV_IOPORT..TESTDEV_IOPORT + 4).contains(&p) => {
                let reg = self.testdev_data.load(Ordering::Relaxed).to_le_bytes();
                let off = usize::from(p - TESTDEV_IOPORT);
                for (i, b) in data.iter_mut().enumerate() {
                    *b = reg.get(off + i).copied().unwrap_or(0);
                }
            }
            TESTDEV_FLUSH => data.fill(0),
            PCI_CONFIG_ADDRESS if data.len() == 4 => {
                data.copy_from_slice(&self.pci_address.load(Ordering::Relaxed).to_le_bytes());
            }
            p if (PCI_CONFIG_DATA..PCI_CONFIG_DATA + 4).contains(&p) => {
                // No device behind any address: the host bridge ends the cycle
                // with a master abort, which reads all ones (PCI 3.0 §3.7.1).
                // With the enable bit clear it is ordinary I/O nothing claims:
                // all ones as well.
                data.fill(0xFF);
            }
            _ => {
                self.unknown(port);
                data.fill(0xFF);
            }
        }
    }

    /// A guest OUT.
    pub fn port_out(&self, port: u16, data: &[u8]) -> IoOutcome {
        let mut v = [0u8; 4];
        for (d, s) in v.iter_mut().zip(data) {
            *d = *s;
        }
        let value = u32::from_le_bytes(v);
        match port {
            p if (COM1..COM1 + 8).contains(&p) => {
                // Output errors (closed stdout) must not stop the guest.
                let _ = lock(&self.serial).write((p - COM1) as u8, v[0]);
            }
            DEBUG_EXIT => {
                return IoOutcome {
                    exit: Some(value),
                    ..Default::default()
                }
            }
            SLEEP_CONTROL_PORT => {
                return IoOutcome {
                    power_off: is_soft_off(v[0]),
                    ..Default::default()
                }
            }
            FW_CFG => {
                let mut f = lock(&self.fw_cfg);
                f.key = value as u16;
                f.pos = 0;
            }
            p if p == FW_CFG + 1 => {}
            p if pic::owns(p) => self.pic.write(p, v[0]),
            0x80 | SLEEP_STATUS_PORT => {}
            p if (TESTDEV_IRQ..TESTDEV_IRQ + TESTDEV_LINES).contains(&p) => {
                let pin = u32::from(p - TESTDEV_IRQ);
                // ISA lines 0-15 reach the 8259s as well as the IOAPIC (as KVM's
                // default GSI routing wires them).
                if pin < 16 {
                    self.pic.set_irq(pin as u8, value & 0xFF != 0);
                }
                return IoOutcome {
                    irq: Some((pin, value & 0xFF != 0)),
                    ..Default::default()
                };
            }
            p if (TESTDEV_IOPORT..TESTDEV_IOPORT + 4).contains(&p) => {
                // Each byte written lands at its offset in the 4-byte register;
                // the other bytes keep their value (as QEMU's pc-testdev).
                let off = usize::from(p - TESTDEV_IOPORT);
                let mut reg = self.testdev_data.load(Ordering::Relaxed).to_le_bytes();
                for (i, b) in data.iter().enumerate() {
                    if let Some(r) = reg.get_mut(off + i) {
                        *r = *b;
                    }
                }
                self.testdev_data
                    .store(u32::from_le_bytes(reg), Ordering::Relaxed);
            }
            TESTDEV_FLUSH => self.flush_page(u64::from(value)),
            PCI_CONFIG_ADDRESS if data.len() == 4 => {
                self.pci_address
                    .store(value & PCI_ADDRESS_MASK, Ordering::Relaxed);
            }
            // Configuration writes to absent devices are dropped.
            p if (PCI_CONFIG_DATA..PCI_CONFIG_DATA + 4).contains(&p) => {}
            _ => self.unknown(port),
        }
        IoOutcome::default()
    }

    /// pc-testdev's page flush: take the guest page holding `gpa` away from KVM's
    /// MMU so that the guest's next access to it faults into the host again.
    /// As QEMU's pc-testdev does, the host mapping's protection is changed and
    /// restored; the change goes through the kernel's MMU notifier, which makes KVM
    /// drop its mappings (EPT/NPT or shadow entries) of the page. Only writes race
    /// with the short read-only window (another vCPU writing that page in it gets an
    /// error from KVM_RUN), never host code: the VMM touches guest RAM only at load
    /// and while every vCPU is parked. Addresses outside RAM are ignored.
    fn flush_page(&self, gpa: u64) {
        let Some(w) = self.ram else {
            return;
        };
        let page = gpa & !(PAGE_SIZE - 1);
        if page.checked_add(PAGE_SIZE).is_none_or(|end| end > w.size) {
            return;
        }
        let Ok(off) = usize::try_from(page) else {
            return;
        };
        let addr = w.base.wrapping_add(off) as *mut libc::c_void;
        // SAFETY: `addr` is page aligned (the mapping starts page aligned and `off`
        // is a multiple of 4096) and the page lies inside the guest RAM mapping
        // given to `with_ram`, which outlives this bus. mprotect does not access the
        // memory; the page is left read-write, as it was, before returning, and no
        // host code reads or writes guest RAM while a vCPU is in an I/O exit.
        let ok = unsafe {
            libc::mprotect(addr, PAGE_SIZE as usize, libc::PROT_READ) == 0
                && libc::mprotect(addr, PAGE_SIZE as usize, libc::PROT_READ | libc::PROT_WRITE) == 0
        };
        // (If the first call fails nothing changed; the second restores what the
        // first changed and cannot fail on a page the first call accepted.)
        if ok {
            self.page_flushes.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::ConsoleSink;
    use crate::memory::GuestRam;

    fn bus() -> IoBus {
        IoBus::new(ConsoleOut::new(ConsoleSink::Quiet, None), 1, 32 << 20)
    }

    fn inl(b: &IoBus, port: u16) -> u32 {
        let mut d = [0u8; 4];
        b.port_in(port, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn testdev_data_register_keeps_each_byte_lane() {
        // QEMU's pc-testdev: a 4-byte register at 0xE0; an access at 0xE0 + k of
        // width w reads/writes bytes k..k+w (kvm-unit-tests x86/emulator.c and
        // realmode.c write and read it back at widths 1, 2 and 4).
        let b = bus();
        b.port_out(0xE0, &0x1122_3344u32.to_le_bytes());
        assert_eq!(inl(&b, 0xE0), 0x1122_3344);
        b.port_out(0xE1, &[0xAA]);
        assert_eq!(inl(&b, 0xE0), 0x1122_AA44);
        b.port_out(0xE2, &0xBEEFu16.to_le_bytes());
        assert_eq!(inl(&b, 0xE0), 0xBEEF_AA44);
        let mut w = [0u8; 2];
        b.port_in(0xE1, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0xEFAA);
        let mut one = [0u8; 1];
        b.port_in(0xE3, &mut one);
        assert_eq!(one[0], 0xBE);
        // A dword at 0xE2 runs past the register: the missing bytes read 0 and
        // writes beyond it are dropped; never a panic.
        b.port_out(0xE3, &0xFFFF_FF01u32.to_le_bytes());
        assert_eq!(inl(&b, 0xE0), 0x01EF_AA44);
        assert_eq!(inl(&b, 0xE2), 0x0000_01EF);
        assert_eq!(b.unknown_ports.get().0, 0);
    }

    /// ACPI 6.4 §4.8.3.7: SLP_TYPx (bits 4:2) = the DSDT's `\_S5` value (5) with
    /// SLP_EN (bit 5) enters S5 and ends the run; anything else does nothing; both
    /// sleep registers read 0 (§4.8.3.8: WAK_STS clear).
    #[test]
    fn acpi_sleep_control_powers_off_on_s5_only() {
        let b = bus();
        assert!(b.port_out(SLEEP_CONTROL_PORT, &[0x34]).power_off);
        assert_eq!(
            b.port_out(SLEEP_CONTROL_PORT, &[0x34]).end(),
            Some(crate::outcome::Outcome::PoweredOff)
        );
        for v in [0x14u8, 0x20, 0x2C, 0x3C, 0] {
            assert!(!b.port_out(SLEEP_CONTROL_PORT, &[v]).power_off, "{v:#x}");
        }
        assert!(!b.port_out(SLEEP_STATUS_PORT, &[0x34]).power_off);
        for p in [SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT] {
            let mut d = [0xFFu8];
            b.port_in(p, &mut d);
            assert_eq!(d, [0]);
        }
        assert_eq!(b.unknown_ports.get().0, 0);
    }

    #[test]
    fn pci_host_bridge_latches_the_address_and_finds_no_device() {
        let b = bus();
        // CONFIG_ADDRESS reads back what was written, reserved bits 30:24 and
        // bits 1:0 as 0 (PCI Local Bus Specification 3.0 §3.2.2.3.2).
        b.port_out(0xCF8, &0x8000_0000u32.to_le_bytes());
        assert_eq!(inl(&b, 0xCF8), 0x8000_0000);
        b.port_out(0xCF8, &0xFFFF_FFFFu32.to_le_bytes());
        assert_eq!(inl(&b, 0xCF8), 0x80FF_FFFC);
        // Every device: vendor/device ID read all ones (master abort, §3.7.1).
        for devfn in 0..256u32 {
            b.port_out(0xCF8, &(0x8000_0000 | devfn << 8).to_le_bytes());
            assert_eq!(inl(&b, 0xCFC), 0xFFFF_FFFF, "devfn {devfn}");
        }
        // Byte and word reads of CONFIG_DATA, and with the enable bit clear.
        let mut w = [0u8; 2];
        b.port_in(0xCFE, &mut w);
        assert_eq!(w, [0xFF, 0xFF]);
        b.port_out(0xCF8, &0u32.to_le_bytes());
        assert_eq!(inl(&b, 0xCFC), 0xFFFF_FFFF);
        // Configuration writes are dropped, not counted as unknown.
        b.port_out(0xCFC, &0x1234u32.to_le_bytes());
        assert_eq!(
            b.unknown_ports.get().0,
            0,
            "the bridge claims 0xCF8 and 0xCFC"
        );
        // Only dword accesses reach CONFIG_ADDRESS; a byte access is ordinary
        // I/O nobody claims (all ones, counted) and leaves the latch alone.
        b.port_out(0xCF8, &0x8000_1000u32.to_le_bytes());
        let mut one = [0u8; 1];
        b.port_in(0xCF8, &mut one);
        assert_eq!(one[0], 0xFF);
        b.port_out(0xCF8, &[0x00]);
        assert_eq!(inl(&b, 0xCF8), 0x8000_1000);
        assert_eq!(b.unknown_ports.get(), (2, 0xCF8));
    }

    #[test]
    fn page_flush_keeps_the_page_and_ignores_addresses_outside_ram() {
        let ram = GuestRam::new(8).unwrap();
        ram.write(0x5123, b"flush me").unwrap();
        let b = bus().with_ram(ram.host_base().unwrap(), ram.size());
        // 32-bit write of a guest-physical address inside a page: that page.
        b.port_out(0xE4, &0x5123u32.to_le_bytes());
        assert_eq!(b.page_flushes.load(Ordering::Relaxed), 1);
        // The page is still readable and writable with its contents.
        let mut got = [0u8; 8];
        ram.read(0x5123, &mut got).unwrap();
        assert_eq!(&got, b"flush me");
        ram.write(0x5000, b"still rw").unwrap();
        // Outside RAM (and the last address): ignored, no flush, no panic.
        b.port_out(0xE4, &0xFFFF_FFFFu32.to_le_bytes());
        b.port_out(0xE4, &(8u32 << 20).to_le_bytes());
        assert_eq!(b.page_flushes.load(Ordering::Relaxed), 1);
        // Reading the port gives 0; a bus without RAM ignores flushes.
        assert_eq!(inl(&b, 0xE4), 0);
        let plain = bus();
        plain.port_out(0xE4, &0x5000u32.to_le_bytes());
        assert_eq!(plain.page_flushes.load(Ordering::Relaxed), 0);
        assert_eq!(b.unknown_ports.get().0, 0);
    }
}

/// Port-device state: the 16550 registers and fw_cfg's cursor.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DevicesState {
    /// DLL, DLM, IER, IIR, LCR, LSR, MCR, MSR, SCR.
    pub serial_regs: [u8; 9],
    /// Receive FIFO.
    pub serial_in: Vec<u8>,
    /// fw_cfg selected key.
    pub fw_key: u16,
    /// fw_cfg read position.
    pub fw_pos: u64,
}

//! Port-I/O platform devices: 16550 COM1, isa-debug-exit (0xF4), QEMU fw_cfg
//! (0x510/0x511), port 0x80, pc-testdev-style IRQ lines (0x2000+N), 8259 ports ignored.

use std::sync::Mutex;

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

use crate::console::ConsoleOut;
use crate::lock;
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
}

/// All port-I/O devices.
pub struct IoBus {
    serial: Mutex<Serial<NoIrq, NoEvents, ConsoleOut>>,
    fw_cfg: Mutex<FwCfg>,
    /// Accesses to ports nothing claims (reads return all ones), first port.
    pub unknown_ports: Odd,
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
            unknown_ports: Odd::default(),
        }
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
            unknown_ports: Odd::default(),
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
            0x20 | 0x21 | 0xA0 | 0xA1 => data.fill(0),
            0x80 => data.fill(0),
            p if (TESTDEV_IRQ..TESTDEV_IRQ + TESTDEV_LINES).contains(&p) => data.fill(0),
            DEBUG_EXIT => data.fill(0),
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
                    irq: None,
                    exit: Some(value),
                }
            }
            FW_CFG => {
                let mut f = lock(&self.fw_cfg);
                f.key = value as u16;
                f.pos = 0;
            }
            p if p == FW_CFG + 1 => {}
            0x20 | 0x21 | 0xA0 | 0xA1 | 0x80 => {}
            p if (TESTDEV_IRQ..TESTDEV_IRQ + TESTDEV_LINES).contains(&p) => {
                let pin = u32::from(p - TESTDEV_IRQ);
                return IoOutcome {
                    irq: Some((pin, value & 0xFF != 0)),
                    exit: None,
                };
            }
            _ => self.unknown(port),
        }
        IoOutcome::default()
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

//! Errors of state import and decoding. Every validation error names the field
//! it concerns; every decoding error carries the byte offset where it was found.

use crate::lvt::Lvt;
use core::fmt;

/// A field of [`crate::state::LapicState`], as named in error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Field {
    /// IA32_APIC_BASE.
    ApicBase,
    /// APIC ID.
    Id,
    /// Version register.
    Version,
    /// Task priority.
    Tpr,
    /// Arbitration priority.
    Apr,
    /// Logical destination.
    Ldr,
    /// Destination format.
    Dfr,
    /// Spurious-interrupt vector register.
    Svr,
    /// In-service register.
    Isr,
    /// Trigger-mode register.
    Tmr,
    /// Interrupt-request register.
    Irr,
    /// Visible error status.
    Esr,
    /// Latched, not yet visible error bits.
    EsrPending,
    /// Interrupt command register.
    Icr,
    /// One LVT entry.
    Lvt(Lvt),
    /// Timer initial count.
    TimerInitial,
    /// Timer divide configuration.
    TimerDivide,
    /// Timer expiry (absolute VM time).
    TimerDeadline,
    /// IA32_TSC_DEADLINE.
    TscDeadline,
}

impl Field {
    /// Every field, in native-format order.
    pub const ALL: [Field; 25] = [
        Field::ApicBase,
        Field::Id,
        Field::Version,
        Field::Tpr,
        Field::Apr,
        Field::Ldr,
        Field::Dfr,
        Field::Svr,
        Field::Isr,
        Field::Tmr,
        Field::Irr,
        Field::Esr,
        Field::EsrPending,
        Field::Icr,
        Field::Lvt(Lvt::Cmci),
        Field::Lvt(Lvt::Timer),
        Field::Lvt(Lvt::Thermal),
        Field::Lvt(Lvt::Perf),
        Field::Lvt(Lvt::Lint0),
        Field::Lvt(Lvt::Lint1),
        Field::Lvt(Lvt::Error),
        Field::TimerInitial,
        Field::TimerDivide,
        Field::TimerDeadline,
        Field::TscDeadline,
    ];

    /// The field's name (the JSON key of the native format).
    pub const fn name(self) -> &'static str {
        match self {
            Field::ApicBase => "apic_base",
            Field::Id => "id",
            Field::Version => "version",
            Field::Tpr => "tpr",
            Field::Apr => "apr",
            Field::Ldr => "ldr",
            Field::Dfr => "dfr",
            Field::Svr => "svr",
            Field::Isr => "isr",
            Field::Tmr => "tmr",
            Field::Irr => "irr",
            Field::Esr => "esr",
            Field::EsrPending => "esr_pending",
            Field::Icr => "icr",
            Field::Lvt(Lvt::Cmci) => "lvt.cmci",
            Field::Lvt(Lvt::Timer) => "lvt.timer",
            Field::Lvt(Lvt::Thermal) => "lvt.thermal",
            Field::Lvt(Lvt::Perf) => "lvt.perf",
            Field::Lvt(Lvt::Lint0) => "lvt.lint0",
            Field::Lvt(Lvt::Lint1) => "lvt.lint1",
            Field::Lvt(Lvt::Error) => "lvt.error",
            Field::TimerInitial => "timer_initial",
            Field::TimerDivide => "timer_divide",
            Field::TimerDeadline => "timer_deadline",
            Field::TscDeadline => "tsc_deadline",
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A validation rule a state breaks. Import stops at the first;
/// [`crate::state::LapicState::validate`] lists them all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ImportError {
    /// IA32_APIC_BASE sets reserved bits (at or above MAXPHYADDR, bits 7:0, 9,
    /// EXTD without x2APIC support) — illumos VVE_BAD_MSR_BASE.
    ApicBaseReserved {
        /// The value.
        value: u64,
        /// The offending bits.
        bits: u64,
    },
    /// IA32_APIC_BASE has EN = 0 with EXTD = 1, an illegal mode (SDM §11.12.1).
    ApicBaseMode {
        /// The value.
        value: u64,
    },
    /// IA32_APIC_BASE.BSP differs from the destination's configuration.
    ApicBaseBsp {
        /// The value.
        value: u64,
        /// Whether the destination is the BSP.
        bsp: bool,
    },
    /// The APIC ID is not the destination's — illumos VVE_BAD_ID. x2APIC mode: the
    /// full initial ID; disabled: its low 8 bits; xAPIC mode, where the guest may
    /// rewrite the ID register, any 8-bit ID (`expected` is then the initial one).
    Id {
        /// ID in the state.
        found: u32,
        /// ID the destination has.
        expected: u32,
    },
    /// The version register is not the destination's — illumos VVE_BAD_VERSION.
    Version {
        /// Version in the state.
        found: u32,
        /// Version of the destination.
        expected: u32,
    },
    /// TPR above 0xFF — illumos VVE_BAD_TPR.
    Tpr {
        /// The value.
        value: u32,
    },
    /// APR above 0xFF.
    Apr {
        /// The value.
        value: u32,
    },
    /// xAPIC LDR with bits 23:0 set (reserved, SDM Figure 11-13).
    LdrReserved {
        /// The value.
        value: u32,
    },
    /// x2APIC LDR not derived from the ID (SDM §11.12.10.2).
    LdrDerived {
        /// LDR in the state.
        found: u32,
        /// `(id >> 4) << 16 | 1 << (id & 0xF)`.
        expected: u32,
    },
    /// DFR bits 27:0 not all ones (reserved, SDM Figure 11-14).
    Dfr {
        /// The value.
        value: u32,
    },
    /// SVR sets reserved bits (bit 12 counts as reserved without EOI-broadcast
    /// suppression).
    Svr {
        /// The value.
        value: u32,
        /// The offending bits.
        bits: u32,
    },
    /// One of vectors 0–15 in ISR, TMR or IRR — illumos VVE_LOW_VECTOR.
    LowVector {
        /// Which register.
        field: Field,
        /// The vector.
        vector: u8,
    },
    /// Two in-service vectors of one 16-vector priority class: acceptance can never
    /// produce this (SDM §11.8.3.1). illumos VVE_ISR_PRIORITY checks per 8 vectors
    /// (gap O4); this rule checks per class.
    IsrPriority {
        /// The lower vector.
        first: u8,
        /// The higher vector.
        second: u8,
    },
    /// ESR or pending ESR outside bits 0–3 and 5–7 — illumos VVE_BAD_ESR.
    Esr {
        /// [`Field::Esr`] or [`Field::EsrPending`].
        field: Field,
        /// The value.
        value: u32,
    },
    /// ICR sets bits no write can store (xAPIC: outside the low-half mask and
    /// destination bits 63:56; x2APIC: outside the low-half mask and bits 63:32).
    Icr {
        /// The value.
        value: u64,
        /// The offending bits.
        bits: u64,
    },
    /// An LVT entry sets reserved bits (SDM Figure 11-8), including delivery status
    /// (derived, never stored) and the TSC-deadline mode bit when not offered.
    LvtReserved {
        /// The entry.
        entry: Lvt,
        /// The value.
        value: u32,
        /// The offending bits.
        bits: u32,
    },
    /// LVT timer mode 11 (reserved, SDM §11.5.4).
    LvtTimerMode {
        /// The value.
        value: u32,
    },
    /// LVT CMCI is not in its reset state although the destination has no CMCI.
    LvtAbsent {
        /// The entry.
        entry: Lvt,
        /// The value.
        value: u32,
    },
    /// An LVT entry is unmasked while the APIC is disabled (SDM §11.4.7.2: the
    /// mask bits are set and cannot be cleared).
    LvtUnmasked {
        /// The entry.
        entry: Lvt,
        /// The value.
        value: u32,
    },
    /// A hardware-disabled APIC (EN = 0) whose register differs from its
    /// power-up value: disabling resets the APIC and nothing can change it until
    /// it is enabled again (SDM §11.4.3).
    DisabledNotReset {
        /// The register.
        field: Field,
    },
    /// Divide configuration sets bits other than 0, 1 and 3 (SDM Figure 11-10).
    TimerDivide {
        /// The value.
        value: u32,
    },
    /// One-shot or periodic timer armed with initial count 0 — illumos
    /// VVE_TIMER_MISMATCH (bug 16183).
    TimerMismatch {
        /// The expiry.
        deadline: u64,
    },
    /// A timer expiry beyond `i64::MAX` ns: not representable as the signed VM
    /// time of the peers (bhyve `vl_timer_target`), about 292 years.
    TimerDeadlineRange {
        /// The expiry.
        deadline: u64,
    },
    /// IA32_TSC_DEADLINE non-zero outside TSC-deadline mode (it reads 0 there and
    /// no write can arm it, SDM §11.5.4.1).
    TscDeadlineMode {
        /// The value.
        value: u64,
    },
    /// TSC-deadline mode with exactly one of the expiry and IA32_TSC_DEADLINE zero.
    TscDeadlineMismatch {
        /// IA32_TSC_DEADLINE.
        tsc_deadline: u64,
        /// The expiry.
        deadline: u64,
    },
}

impl ImportError {
    /// The field the rule concerns.
    pub fn field(&self) -> Field {
        match *self {
            ImportError::ApicBaseReserved { .. }
            | ImportError::ApicBaseMode { .. }
            | ImportError::ApicBaseBsp { .. } => Field::ApicBase,
            ImportError::Id { .. } => Field::Id,
            ImportError::Version { .. } => Field::Version,
            ImportError::Tpr { .. } => Field::Tpr,
            ImportError::Apr { .. } => Field::Apr,
            ImportError::LdrReserved { .. } | ImportError::LdrDerived { .. } => Field::Ldr,
            ImportError::Dfr { .. } => Field::Dfr,
            ImportError::Svr { .. } => Field::Svr,
            ImportError::LowVector { field, .. }
            | ImportError::Esr { field, .. }
            | ImportError::DisabledNotReset { field } => field,
            ImportError::IsrPriority { .. } => Field::Isr,
            ImportError::Icr { .. } => Field::Icr,
            ImportError::LvtReserved { entry, .. }
            | ImportError::LvtAbsent { entry, .. }
            | ImportError::LvtUnmasked { entry, .. } => Field::Lvt(entry),
            ImportError::LvtTimerMode { .. } => Field::Lvt(Lvt::Timer),
            ImportError::TimerDivide { .. } => Field::TimerDivide,
            ImportError::TimerMismatch { .. } | ImportError::TimerDeadlineRange { .. } => {
                Field::TimerDeadline
            }
            ImportError::TscDeadlineMode { .. } | ImportError::TscDeadlineMismatch { .. } => {
                Field::TscDeadline
            }
        }
    }

    /// A short stable name of the rule (the illumos code where one exists).
    pub fn rule(&self) -> &'static str {
        match self {
            ImportError::ApicBaseReserved { .. } => "VVE_BAD_MSR_BASE",
            ImportError::ApicBaseMode { .. } => "APIC_BASE_MODE",
            ImportError::ApicBaseBsp { .. } => "APIC_BASE_BSP",
            ImportError::Id { .. } => "VVE_BAD_ID",
            ImportError::Version { .. } => "VVE_BAD_VERSION",
            ImportError::Tpr { .. } => "VVE_BAD_TPR",
            ImportError::Apr { .. } => "APR_RANGE",
            ImportError::LdrReserved { .. } => "LDR_RESERVED",
            ImportError::LdrDerived { .. } => "LDR_X2APIC_DERIVED",
            ImportError::Dfr { .. } => "DFR_RESERVED",
            ImportError::Svr { .. } => "SVR_RESERVED",
            ImportError::LowVector { .. } => "VVE_LOW_VECTOR",
            ImportError::IsrPriority { .. } => "VVE_ISR_PRIORITY",
            ImportError::Esr { .. } => "VVE_BAD_ESR",
            ImportError::Icr { .. } => "ICR_RESERVED",
            ImportError::LvtReserved { .. } => "LVT_RESERVED",
            ImportError::LvtTimerMode { .. } => "LVT_TIMER_MODE",
            ImportError::LvtAbsent { .. } => "LVT_ABSENT",
            ImportError::LvtUnmasked { .. } => "LVT_UNMASKED_DISABLED",
            ImportError::DisabledNotReset { .. } => "DISABLED_NOT_RESET",
            ImportError::TimerDivide { .. } => "DCR_RESERVED",
            ImportError::TimerMismatch { .. } => "VVE_TIMER_MISMATCH",
            ImportError::TimerDeadlineRange { .. } => "TIMER_DEADLINE_RANGE",
            ImportError::TscDeadlineMode { .. } => "TSC_DEADLINE_MODE",
            ImportError::TscDeadlineMismatch { .. } => "TSC_DEADLINE_MISMATCH",
        }
    }
}

impl fmt::Display for ImportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.field())?;
        match *self {
            ImportError::ApicBaseReserved { value, bits } => {
                write!(f, "reserved bits {bits:#x} set in {value:#x}")
            }
            ImportError::ApicBaseMode { value } => {
                write!(f, "EXTD set with EN clear in {value:#x} (illegal mode)")
            }
            ImportError::ApicBaseBsp { value, bsp } => write!(
                f,
                "BSP flag {} in {value:#x} but this APIC is {}the BSP",
                u8::from(!bsp),
                if bsp { "" } else { "not " }
            ),
            ImportError::Id { found, expected } => {
                if found > 0xFF && expected <= 0xFF {
                    write!(f, "{found:#x} is not an 8-bit xAPIC ID")
                } else {
                    write!(f, "{found:#x} is not this APIC's ID {expected:#x}")
                }
            }
            ImportError::Version { found, expected } => {
                write!(
                    f,
                    "{found:#x} differs from this APIC's version {expected:#x}"
                )
            }
            ImportError::Tpr { value } => write!(f, "{value:#x} is above 0xff"),
            ImportError::Apr { value } => write!(f, "{value:#x} is above 0xff"),
            ImportError::LdrReserved { value } => {
                write!(f, "reserved bits 23:0 set in {value:#x}")
            }
            ImportError::LdrDerived { found, expected } => write!(
                f,
                "{found:#x} is not the x2APIC logical ID {expected:#x} derived from the ID"
            ),
            ImportError::Dfr { value } => write!(f, "bits 27:0 of {value:#x} are not all ones"),
            ImportError::Svr { value, bits } => {
                write!(f, "reserved bits {bits:#x} set in {value:#x}")
            }
            ImportError::LowVector { vector, .. } => {
                write!(f, "illegal vector {vector:#x} (vectors 0-15 are reserved)")
            }
            ImportError::IsrPriority { first, second } => write!(
                f,
                "vectors {first:#x} and {second:#x} both in service in priority class {}",
                second >> 4
            ),
            ImportError::Esr { value, .. } => write!(
                f,
                "bits {:#x} of {value:#x} are outside the valid mask 0xef",
                value & !crate::regs::ESR_VALID_MASK
            ),
            ImportError::Icr { value, bits } => {
                write!(f, "reserved bits {bits:#x} set in {value:#x}")
            }
            ImportError::LvtReserved { value, bits, .. } => {
                write!(f, "reserved bits {bits:#x} set in {value:#x}")
            }
            ImportError::LvtTimerMode { value } => {
                write!(f, "reserved timer mode 11 in {value:#x}")
            }
            ImportError::LvtAbsent { value, .. } => write!(
                f,
                "{value:#x} but this APIC has no such entry (must read 0x10000)"
            ),
            ImportError::LvtUnmasked { value, .. } => {
                write!(f, "{value:#x} is unmasked while the APIC is disabled")
            }
            ImportError::DisabledNotReset { .. } => {
                f.write_str("not its power-up value although the APIC is disabled (EN = 0)")
            }
            ImportError::TimerDivide { value } => {
                write!(
                    f,
                    "reserved bits {:#x} set in {value:#x}",
                    value & !crate::regs::DCR_MASK
                )
            }
            ImportError::TimerMismatch { deadline } => {
                write!(f, "timer armed (expiry {deadline}) with initial count 0")
            }
            ImportError::TimerDeadlineRange { deadline } => {
                write!(
                    f,
                    "expiry {deadline} ns is beyond i64::MAX and cannot be represented"
                )
            }
            ImportError::TscDeadlineMode { value } => {
                write!(f, "{value:#x} set outside TSC-deadline mode")
            }
            ImportError::TscDeadlineMismatch {
                tsc_deadline,
                deadline,
            } => write!(
                f,
                "TSC-deadline mode with IA32_TSC_DEADLINE {tsc_deadline:#x} but expiry {deadline}"
            ),
        }
    }
}

#[cfg(feature = "std")]
#[cfg_attr(docsrs, doc(cfg(feature = "std")))]
impl std::error::Error for ImportError {}

/// A byte-format decoding error: where, in which field, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DecodeError {
    /// Byte offset in the input.
    pub offset: usize,
    /// The field or header item being decoded.
    pub field: &'static str,
    /// What was wrong.
    pub reason: &'static str,
    /// For a file of another format version: the version it holds and the one this
    /// build reads (shown in the message).
    pub version: Option<VersionMismatch>,
}

/// The format version a file holds, and the one this build reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VersionMismatch {
    /// Version in the file.
    pub found: u16,
    /// Version this build reads and writes.
    pub supported: u16,
}

impl DecodeError {
    pub(crate) const fn new(offset: usize, field: &'static str, reason: &'static str) -> Self {
        Self {
            offset,
            field,
            reason,
            version: None,
        }
    }

    /// An unsupported format version at `offset`.
    pub(crate) const fn version(
        offset: usize,
        field: &'static str,
        found: u16,
        supported: u16,
    ) -> Self {
        Self {
            offset,
            field,
            reason: "unsupported format version",
            version: Some(VersionMismatch { found, supported }),
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (byte {:#x}): {}",
            self.field, self.offset, self.reason
        )?;
        if let Some(v) = self.version {
            write!(f, " {} (this build reads version {})", v.found, v.supported)?;
        }
        Ok(())
    }
}

#[cfg(feature = "std")]
#[cfg_attr(docsrs, doc(cfg(feature = "std")))]
impl std::error::Error for DecodeError {}

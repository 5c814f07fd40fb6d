//! The VMM's view of the interrupt fabric: every LAPIC/IOAPIC access, IRQ line
//! and IPI goes through `vlapic::fabric::SharedFabric` (no router of our own).

pub use vlapic::fabric::{FabricConfig, SharedFabric as Irqchip, Wake};

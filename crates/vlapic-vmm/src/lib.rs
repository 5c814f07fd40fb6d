//! A KVM VMM whose guests' local APICs and IOAPIC are emulated in userspace by
//! `vlapic` (no in-kernel irqchip). All of the project's `unsafe` lives here.
//! (Issue 5: being built.)

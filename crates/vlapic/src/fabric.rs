//! The VM-level interrupt fabric: many local APICs, the IOAPIC and MSI, and who needs a kick.
//! (Issue 3: being built.)

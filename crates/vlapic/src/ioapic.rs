//! An 82093AA-compatible IOAPIC: redirection entries, remote IRR, level/edge pins.
//! (Issue 3: being built.)

//! Architectural state export/import and its file formats (native, KVM, bhyve).
//! (Issue 4: being built.)

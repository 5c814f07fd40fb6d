//! Prints KVM's supported CPUID leaves 1, 7 and 0xD (diagnostics).
fn main() {
    let kvm = kvm_ioctls::Kvm::new().expect("kvm");
    let c = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .expect("cpuid");
    for e in c.as_slice() {
        if matches!(e.function, 1 | 7 | 0xD | 0x8000_0001) {
            println!(
                "{:#x}.{} eax={:#x} ebx={:#x} ecx={:#x} edx={:#x}",
                e.function, e.index, e.eax, e.ebx, e.ecx, e.edx
            );
        }
    }
}

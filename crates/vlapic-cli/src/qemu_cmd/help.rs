//! What `vlapic qemu` answers to the probes scripts make (`-version`, `-h`,
//! `-device help`, `-machine help`, `-accel help`, `-cpu help`), worded as QEMU's.

use super::{DEFAULT_MEMORY_MIB, MAX_CPUS, QEMU_VERSION};

pub(super) fn version_line() -> String {
    format!(
        "QEMU emulator version {QEMU_VERSION} (vlapic {}: QEMU-compatible front door to vlapic's KVM VMM, local APICs and IOAPIC in userspace; not QEMU)",
        env!("CARGO_PKG_VERSION")
    )
}

pub(super) fn help_text() -> String {
    format!(
        "{}
usage: vlapic qemu [options]   (QEMU option syntax; -opt and --opt both work)

Accepted (everything else is refused with one line naming the option, exit 2):
  -kernel FILE            multiboot v1 kernel; command line = \"FILE APPEND\" as QEMU builds it
  -append TEXT            kernel command line after the file name
  -initrd FILE[ ARGS][,FILE...]  multiboot modules (module string = the whole entry)
  -smp [cpus=]N[,...]     vCPUs, 1-{MAX_CPUS} (maxcpus, if given, must equal cpus)
  -m [size=]N[K|M|G]      RAM (default {DEFAULT_MEMORY_MIB} MiB; 4-3072 MiB)
  -cpu MODEL[,+f,-f,f=on] qemu64, qemu32, kvm64, kvm32, host, max, base: all give vlapic's
                          CPUID (KVM's, with x2APIC and TSC-deadline); feature changes are
                          ignored with a warning
  -machine/-M [type=]pc[,accel=kvm][,kernel_irqchip=on|off|split][,pit=off,...]
                          kernel_irqchip=on uses KVM's in-kernel irqchip (the baseline);
                          off/split (the default here) use vlapic in userspace;
                          pit, smm, usb, vmport, graphics: only =off (none exists);
                          hpet=on|off (the HPET is always present)
  -accel kvm[,kernel-irqchip=...]   -enable-kvm
  -device isa-debug-exit,iobase=0xf4[,iosize=N]   -device pc-testdev
                          (both are always present; isa-debug-exit only at 0xf4)
  -serial stdio|mon:stdio|none|null   -display none   -vga none   -monitor none
  -nographic -nodefaults -no-reboot -no-user-config -no-acpi -name NAME
  -no-hpet                (accepted; the HPET at 0xFED00000 stays present)
  -global kvm-pit.lost_tick_policy=discard   (there is no PIT; accepted as a no-op)
Probes: -h/-help, -version, -device help|?, -machine help|?, -accel help|?, -cpu help|?

Exit status: an isa-debug-exit write of N gives (N << 1) | 1 (low 8 bits), as QEMU;
option and setup errors 2; guest crash 4; VMM error 5; a guest that stops without
the write 0 or 1 with one line on stderr. VLAPIC_QEMU_SUMMARY=FILE appends vlapic's
run summary (text, then one JSON line) to FILE.
",
        version_line()
    )
}

pub(super) const DEVICE_HELP: &str = "Misc devices:
name \"isa-debug-exit\", bus ISA
name \"pc-testdev\", bus ISA
";

pub(super) const MACHINE_HELP: &str = "Supported machines are:
pc                   vlapic's PC: i440FX-like ports, local APICs and IOAPIC in userspace (default)
";

pub(super) const ACCEL_HELP: &str = "Accelerators supported in QEMU binary:
kvm
";

pub(super) const CPU_MODELS: [&str; 7] =
    ["base", "host", "kvm32", "kvm64", "max", "qemu32", "qemu64"];

pub(super) fn cpu_help() -> String {
    let mut s = String::from("Available CPUs (all give vlapic's CPUID: KVM's supported CPUID with x2APIC and TSC-deadline):\n");
    for m in CPU_MODELS {
        s.push_str(&format!("x86 {m}\n"));
    }
    s
}

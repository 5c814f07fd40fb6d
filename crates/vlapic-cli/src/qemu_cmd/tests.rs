//! Unit tests of `qemu_cmd`: the accepted set, the mapping onto the VMM, the probes.

use super::*;

fn p(args: &str) -> Result<Parsed, String> {
    parse(
        &args
            .split_whitespace()
            .map(String::from)
            .collect::<Vec<_>>(),
    )
}

fn run(args: &str) -> QemuRun {
    match p(args) {
        Ok(Parsed::Run(r)) => r,
        other => panic!("{args}: {other:?}"),
    }
}

fn err(args: &str) -> String {
    match p(args) {
        Err(e) => e,
        other => panic!("{args}: expected an error, got {other:?}"),
    }
}

fn probe(args: &str) -> String {
    match p(args) {
        Ok(Parsed::Probe(t)) => t,
        other => panic!("{args}: expected a probe answer, got {other:?}"),
    }
}

/// The command line kvm-unit-tests' x86/run builds (scripts/arch-run.bash,
/// x86/run and unittests.cfg of kvm-unit-tests), for `apic` in x2APIC mode.
#[test]
fn kvm_unit_tests_command_line_is_accepted() {
    let r = run(
        "--no-reboot -nodefaults -global kvm-pit.lost_tick_policy=discard \
         -device pc-testdev -device isa-debug-exit,iobase=0xf4,iosize=0x4 -display none \
         -serial stdio -machine accel=kvm -kernel x86/apic.flat -smp 2 \
         -cpu qemu64,+x2apic,+tsc-deadline -initrd /tmp/env.abc",
    );
    assert_eq!(r.kernel, "x86/apic.flat");
    assert_eq!(r.append, "");
    assert_eq!(r.vcpus, 2);
    assert_eq!(r.memory_mib, 128, "QEMU's default RAM");
    assert!(r.console_stdout);
    assert!(!r.kernel_irqchip, "vlapic in userspace by default");
    assert_eq!(
        r.modules,
        vec![("/tmp/env.abc".into(), "/tmp/env.abc".into())]
    );
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    // vmexit_ipi: -machine pit=off; test_args become -append.
    let r = run("-machine accel=kvm -kernel x86/vmexit.flat -smp 2 -append ipi -machine pit=off");
    assert_eq!(r.append, "ipi");
    assert_eq!(cmd(&r), "x86/vmexit.flat ipi");
}

fn cmd(r: &QemuRun) -> String {
    multiboot_cmdline(&r.kernel, &r.append)
}

#[test]
fn values_map_onto_the_vmm() {
    let r = run("-kernel k -smp cpus=4 -m 1G");
    assert_eq!((r.vcpus, r.memory_mib), (4, 1024));
    assert_eq!(run("-kernel k -smp 3,maxcpus=3 -m size=256M").vcpus, 3);
    assert_eq!(run("-kernel k -smp sockets=2,cores=2,threads=2").vcpus, 8);
    assert_eq!(run("-kernel k -m 65536k").memory_mib, 64);
    assert_eq!(run("-kernel k -m 512").memory_mib, 512);
    assert!(run("-kernel k -machine kernel_irqchip=on").kernel_irqchip);
    assert!(run("-kernel k -accel kvm,kernel-irqchip=on").kernel_irqchip);
    assert!(!run("-kernel k -machine pc,accel=kvm,kernel_irqchip=split").kernel_irqchip);
    assert!(run("-kernel k -nographic").console_stdout);
    assert!(
        !run("-kernel k -nodefaults").console_stdout,
        "no serial without -serial"
    );
    assert!(!run("-kernel k -serial none").console_stdout);
    assert!(run("-kernel k -serial mon:stdio -serial none").console_stdout);
    // QEMU's multiboot -initrd: entries split at ",", ",," a literal comma,
    // the module string is the whole entry.
    let r = run("-kernel k -initrd a.env,b.bin,c,,d");
    assert_eq!(
        r.modules,
        vec![
            ("a.env".into(), "a.env".into()),
            ("b.bin".into(), "b.bin".into()),
            ("c,d".into(), "c,d".into())
        ]
    );
    let r = parse(&[
        "-kernel".into(),
        "k".into(),
        "-initrd".into(),
        "m.bin x=1".into(),
    ]);
    assert!(
        matches!(r, Ok(Parsed::Run(q)) if q.modules == vec![("m.bin".into(), "m.bin x=1".into())])
    );
    // Feature changes vlapic cannot make are accepted with a warning.
    let r = run("-kernel k -cpu qemu64,-x2apic,+tsc-deadline,+pdpe1gb");
    assert_eq!(r.warnings.len(), 2, "{:?}", r.warnings);
    assert!(r.warnings[0].contains("-x2apic"));
    assert!(run("-kernel k -cpu max").warnings.is_empty());
}

#[test]
fn the_rest_is_refused_with_one_line_naming_the_option() {
    for (args, names) in [
        ("-kernel k -chardev socket,id=mon", "-chardev"),
        ("-kernel k -mon chardev=mon", "-mon"),
        ("-kernel k -incoming unix:x", "-incoming"),
        ("-kernel k -S", "-S"),
        ("-kernel k -device pci-testdev", "pci-testdev"),
        (
            "-kernel k -device isa-debug-exit,iobase=0x501",
            "iobase=0x501",
        ),
        ("-kernel k -machine q35", "q35"),
        ("-kernel k -machine vmport=on", "vmport=on"),
        ("-kernel k -M pc,pit=on", "pit=on"),
        ("-kernel k -machine accel=tcg", "accel=tcg"),
        ("-kernel k -accel tcg", "-accel tcg"),
        ("-kernel k -cpu Skylake-Server", "Skylake-Server"),
        ("-kernel k -smp 0", "-smp"),
        ("-kernel k -smp 2,maxcpus=4", "maxcpus"),
        ("-kernel k -m 2", "-m"),
        ("-kernel k -m 4T", "-m"),
        ("-kernel k -m 128M,maxmem=1G", "maxmem"),
        ("-kernel k -serial pty", "-serial pty"),
        ("-kernel k -display gtk", "-display gtk"),
        ("-kernel k -global isa-debugcon.iobase=0x402", "-global"),
        ("-kernel k disk.img", "disk.img"),
        ("-kernel", "-kernel"),
        ("-smp 2", "-kernel"),
    ] {
        let e = err(args);
        assert!(e.contains(names), "{args}: {e}");
        assert_eq!(e.lines().count(), 1, "{args}: {e}");
    }
    // Above the VMM's limit: the words kvm-unit-tests' --probe-maxsmp parses
    // (grep 'SMP CPUs', the last word is the limit).
    let e = err("-kernel _NO_FILE_4Uhere_ -smp 65");
    assert!(e.contains("SMP CPUs"), "{e}");
    assert_eq!(e.rsplit(' ').next(), Some("64"));
}

#[test]
fn probes_answer_like_qemu() {
    // search_qemu_binary greps `--help` for "QEMU"; env_params reads the
    // version from the first line of `-h` with IFS='[ .]'.
    let h = probe("-h");
    let first = h.lines().next().unwrap();
    assert!(first.starts_with("QEMU emulator version 7.2.0 "), "{first}");
    assert_eq!(probe("--help"), h);
    assert!(probe("-version").starts_with("QEMU emulator version"));
    // x86/run: `-device '?'` must name "pc-testdev" in quotes, and must not
    // offer pci-testdev (the runner would then pass -device pci-testdev).
    for q in ["-device ?", "-device help"] {
        let d = probe(q);
        assert!(d.contains("\"pc-testdev\""), "{d}");
        assert!(d.contains("\"isa-debug-exit\""), "{d}");
        assert!(!d.contains("pci-testdev"), "{d}");
    }
    assert!(probe("-machine help").contains("pc "));
    assert!(probe("-M ?").contains("pc "));
    assert!(probe("-accel help").contains("kvm"));
    assert!(probe("-cpu help").contains("qemu64"));
    // A probe ends parsing, as QEMU's do.
    assert!(probe("-kernel k -device help").contains("pc-testdev"));
}

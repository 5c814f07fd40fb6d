//! Debian's 6.1 cloud kernel on the userspace APIC (issue 13): `vlapic run` boots its
//! vmlinux by the PVH entry on 2 vCPUs with an initramfs this test builds (a static
//! `/init`, tests/linux/init.c), which prints /proc/interrupts and powers off by ACPI.
//!
//! Where the kernel comes from: `VLAPIC_LINUX_DIR` (opt-in: a boot takes a quarter of an
//! hour or more on this host, so without the variable the tests print one `SKIPPED:`
//! line) holds the package unpacked by `apt-get download linux-image-6.1.0-NN-cloud-amd64
//! && dpkg-deb -x linux-image-*.deb $VLAPIC_LINUX_DIR/pkg`; the test takes the newest
//! `pkg/boot/vmlinuz-*`, unpacks its LZ4 payload to a vmlinux itself, and prints one
//! `SKIPPED:` line when the kernel, KVM or `gcc -static` is missing. The boot under
//! this host's nested KVM takes minutes (`VLAPIC_LINUX_TIMEOUT`, seconds, default
//! 1800). The checks: the run ends "powered off" (ACPI S5 via the FADT's sleep
//! control register), and /proc/interrupts shows local timer (LOC), function call
//! (CAL) and rescheduling (RES) interrupts counted on both CPUs.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

fn skip(why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED: {why}");
}

fn linux_dir() -> Option<PathBuf> {
    std::env::var_os("VLAPIC_LINUX_DIR").map(PathBuf::from)
}

/// The newest `vmlinuz-*` of the unpacked package.
fn bzimage(dir: &Path) -> Option<PathBuf> {
    let boot = dir.join("pkg/boot");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&boot)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    v.sort();
    v.pop()
}

/// The vmlinux inside a bzImage whose payload is LZ4 (legacy frame: magic
/// 0x184C2102, then blocks of up to 8 MiB each led by its compressed size; the
/// kernel's build appends the uncompressed size). `Err`: why not.
fn vmlinux_from(bz: &[u8]) -> Result<Vec<u8>, String> {
    let u32_at =
        |o: usize| -> Option<u32> { Some(u32::from_le_bytes(bz.get(o..o + 4)?.try_into().ok()?)) };
    let setup = (usize::from(*bz.get(0x1F1).ok_or("short bzImage")?) + 1) * 512;
    let off = u32_at(0x248).ok_or("no payload_offset")? as usize;
    let len = u32_at(0x24C).ok_or("no payload_length")? as usize;
    let p = bz
        .get(setup + off..setup + off + len)
        .ok_or("payload outside the file")?;
    if p.get(..4) != Some(&[0x02, 0x21, 0x4C, 0x18]) {
        return Err(format!(
            "payload is not LZ4 (starts {:02x?}); this test unpacks LZ4 only",
            p.get(..4)
        ));
    }
    let mut out = Vec::new();
    let mut block = vec![0u8; 8 << 20];
    let mut i = 4;
    while let Some(n) = p.get(i..i + 4) {
        let n = u32::from_le_bytes(n.try_into().map_err(|_| "size")?) as usize;
        if n == 0x184C_2102 {
            i += 4;
            continue;
        }
        let Some(src) = p.get(i + 4..i + 4 + n) else {
            break; // the trailing uncompressed size
        };
        let got = lz4_flex::block::decompress_into(src, &mut block)
            .map_err(|e| format!("LZ4 block at {i:#x}: {e}"))?;
        out.extend_from_slice(&block[..got]);
        i += 4 + n;
    }
    Ok(out)
}

/// A newc cpio archive (the initramfs format, Documentation/driver-api/early-userspace)
/// of `(name, mode, data)` entries; `/dev/console` is a character device 5:1.
fn cpio(entries: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let pad = |out: &mut Vec<u8>| out.resize(out.len().div_ceil(4) * 4, 0);
    let all = entries.iter().copied().chain([("TRAILER!!!", 0, &[][..])]);
    for (ino, (name, mode, data)) in all.enumerate() {
        let (maj, min) = if name == "dev/console" {
            (5, 1)
        } else {
            (0, 0)
        };
        let fields = [
            ino as u32 + 1,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            maj,
            min,
            name.len() as u32 + 1,
            0,
        ];
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        pad(&mut out);
        out.extend_from_slice(data);
        pad(&mut out);
    }
    out
}

/// The kernel (vmlinux) and the initramfs, or `None` after one SKIPPED line.
fn inputs(tag: &str) -> Option<(PathBuf, PathBuf)> {
    if let Err(reason) = vlapic_vmm::kvm_usable() {
        skip(&format!("/dev/kvm not available: {reason}"));
        return None;
    }
    let Some(dir) = linux_dir() else {
        skip("VLAPIC_LINUX_DIR not set (a Debian cloud kernel package unpacked there; see this test's module docs)");
        return None;
    };
    let Some(bz) = bzimage(&dir) else {
        skip(&format!(
            "no Debian kernel unpacked in {}/pkg/boot (see this test's module docs)",
            dir.display()
        ));
        return None;
    };
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("linux-{tag}"));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let vmlinux = dir.join("vmlinux");
    match std::fs::read(&bz)
        .map_err(|e| e.to_string())
        .and_then(|b| vmlinux_from(&b))
    {
        Ok(v) => std::fs::write(&vmlinux, v).expect("write vmlinux"),
        Err(e) => {
            skip(&format!("{}: {e}", bz.display()));
            return None;
        }
    }
    let init = dir.join("init");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/linux/init.c");
    match Command::new("gcc")
        .args(["-static", "-Os", "-o"])
        .arg(&init)
        .arg(&src)
        .output()
    {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            skip(&format!(
                "gcc -static failed (static libc missing?): {}",
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .next()
                    .unwrap_or("")
            ));
            return None;
        }
        Err(e) => {
            skip(&format!("gcc not found: {e}"));
            return None;
        }
    }
    let init = std::fs::read(&init).expect("init");
    let rd = dir.join("initrd.cpio");
    let archive = cpio(&[
        ("dev", 0o040755, &[]),
        ("dev/console", 0o020600, &[]),
        ("proc", 0o040755, &[]),
        ("init", 0o100755, &init),
    ]);
    std::fs::write(&rd, archive).expect("write initrd");
    Some((vmlinux, rd))
}

/// The command line: serial console; no XSAVE, POPCNT, SMAP or FSGSBASE (this host's
/// emulator lacks XRSTOR, POPCNT, CLAC/STAC and RD/WRGSBASE, and its KVM (`kvm_pvm`)
/// shows the guest the hardware's CPUID bits whatever the VMM sets, so CPUID alone
/// cannot hide them); no KASLR
/// (reproducible addresses for reports); no zeroing of every allocated page (boot time);
/// no soft-lockup reports (ftrace's record check keeps CPU 1 busy for minutes here, and
/// each report is a screenful on the polled serial port).
const APPEND: &str = "console=ttyS0 earlyprintk=serial noxsave clearcpuid=popcnt,smap \
                      nofsgsbase nokaslr init_on_alloc=0 nosoftlockup panic=-1";

fn timeout() -> String {
    std::env::var("VLAPIC_LINUX_TIMEOUT").unwrap_or_else(|_| "1800".into())
}

/// Runs `vlapic run` on the kernel with `extra` arguments; returns (exit status,
/// stdout + stderr).
fn run(kernel: &Path, initrd: &Path, extra: &[&str]) -> (Option<i32>, String) {
    let t = timeout();
    let o = Command::new(env!("CARGO_BIN_EXE_vlapic"))
        .args(["run", "--kernel"])
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .args(["--append", APPEND, "--vcpus", "2", "--memory", "256"])
        .args(["--timeout", &t])
        .args(extra)
        .output()
        .expect("run vlapic");
    let log = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    (o.status.code(), log)
}

/// The counts per CPU of the /proc/interrupts row `name` ("LOC:") as init printed it.
fn row(log: &str, name: &str) -> Option<Vec<u64>> {
    log.lines()
        .filter_map(|l| l.split_once("VLAPIC-INIT:").map(|(_, r)| r))
        .find_map(|r| {
            let mut w = r.split_whitespace();
            (w.next() == Some(name)).then(|| w.map_while(|x| x.parse().ok()).collect())
        })
}

/// What every boot must show: init ran, the three IPI/timer rows with a count on
/// each of the 2 CPUs, and the ACPI power-off ending the run with status 0.
fn check(code: Option<i32>, log: &str) {
    assert!(
        log.contains("VLAPIC-INIT: started"),
        "init never ran:\n{log}"
    );
    let loc = row(log, "LOC:").unwrap_or_else(|| panic!("no LOC row:\n{log}"));
    assert_eq!(loc.len(), 2, "LOC {loc:?}");
    assert!(
        loc.iter().all(|n| *n > 0),
        "local timer idle on a CPU: {loc:?}"
    );
    for name in ["CAL:", "RES:"] {
        let r = row(log, name).unwrap_or_else(|| panic!("no {name} row:\n{log}"));
        assert_eq!(r.len(), 2, "{name} {r:?}");
        assert!(r.iter().sum::<u64>() > 0, "{name} never counted: {r:?}");
    }
    assert!(log.contains("outcome:      powered off"), "{log}");
    assert_eq!(code, Some(0), "{log}");
}

#[test]
fn debian_cloud_kernel_boots_to_init_on_two_vcpus() {
    let Some((k, rd)) = inputs("plain") else {
        return;
    };
    let (code, log) = run(&k, &rd, &[]);
    std::fs::write(
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("linux-plain.log"),
        &log,
    )
    .expect("log");
    check(code, &log);
}

/// The number after `label` in the run summary ("migrations:   N ...").
fn summary_number(log: &str, label: &str) -> Option<u64> {
    log.lines()
        .find_map(|l| l.strip_prefix(label))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Issue 13 point 2: the whole boot with the VM live-migrated into a new KVM VM every
/// 10 ms (vCPUs, APICs, IOAPIC, kvmclock, memory), to the same end.
#[test]
fn debian_cloud_kernel_boots_while_migrating_every_10ms() {
    let Some((k, rd)) = inputs("migrate") else {
        return;
    };
    let (code, log) = run(&k, &rd, &["--migrate-every", "10"]);
    std::fs::write(
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("linux-migrate.log"),
        &log,
    )
    .expect("log");
    check(code, &log);
    let m = summary_number(&log, "migrations:").unwrap_or(0);
    assert!(m > 100, "only {m} migrations in a boot of minutes:\n{log}");
}

/// Issue 13 point 2: `--save` of a Linux VM in the middle of its boot, then a new
/// process `--restore`s it and the boot runs on to init and the power-off.
#[test]
fn debian_cloud_kernel_saved_mid_boot_resumes_in_a_new_process() {
    let Some((k, rd)) = inputs("save") else {
        return;
    };
    let file = Path::new(env!("CARGO_TARGET_TMPDIR")).join("linux-save.vsav");
    let _ = std::fs::remove_file(&file);
    let after = std::env::var("VLAPIC_LINUX_SAVE_AFTER_MS").unwrap_or_else(|_| "60000".into());
    let f = file.to_str().expect("utf-8 path");
    let (code, log) = run(&k, &rd, &["--save", f, "--save-after", &after]);
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("vlapic run: saved"), "{log}");
    assert!(
        !log.contains("VLAPIC-INIT: power off"),
        "booted before the save:\n{log}"
    );
    let o = Command::new(env!("CARGO_BIN_EXE_vlapic"))
        .args(["run", "--restore", f, "--timeout", &timeout()])
        .output()
        .expect("run vlapic --restore");
    let log = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    std::fs::write(
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("linux-restore.log"),
        &log,
    )
    .expect("log");
    check(o.status.code(), &log);
    let _ = std::fs::remove_file(&file);
}

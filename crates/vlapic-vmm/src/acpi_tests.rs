//! Tests of the ACPI tables: checksums, pointers, MADT entries per vCPU, the FADT's
//! hardware-reduced sleep registers, and `iasl -d` (acpica-tools) reading them.

use super::*;

fn cfg(n: u32) -> AcpiConfig {
    AcpiConfig {
        apic_ids: (0..n).collect(),
        ioapic_id: n as u8,
        ioapic_addr: 0xFEC0_0000,
        lapic_addr: 0xFEE0_0000,
    }
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// The table at guest-physical `addr` in the blob, its length and checksum checked
/// (ACPI 6.4 §5.2.6: the whole table sums to zero).
fn table(t: &AcpiTables, addr: u64) -> &[u8] {
    let off = (addr - t.rsdp) as usize;
    let len = u32_at(&t.bytes, off + 4) as usize;
    let b = &t.bytes[off..off + len];
    assert_eq!(
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)),
        0,
        "checksum of {}",
        String::from_utf8_lossy(&b[..4])
    );
    b
}

/// The XSDT's entries, by signature.
fn tables(t: &AcpiTables) -> Vec<(String, u64)> {
    let r = &t.bytes[..36];
    assert_eq!(&r[..8], b"RSD PTR ");
    assert_eq!(r[..20].iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
    assert_eq!(r.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
    assert_eq!(r[15], 2);
    let xsdt = table(t, u64_at(r, 24));
    assert_eq!(&xsdt[..4], b"XSDT");
    xsdt[36..]
        .chunks(8)
        .map(|c| {
            let a = u64::from_le_bytes(c.try_into().unwrap());
            (String::from_utf8_lossy(&table(t, a)[..4]).into_owned(), a)
        })
        .collect()
}

/// RSDP and XSDT checksums (ACPI 6.4 §5.2.5.3, §5.2.8), every table reachable, the
/// RSDP 16-byte aligned inside the BIOS area Linux scans (§5.2.5.1).
#[test]
fn rsdp_xsdt_and_checksums() {
    let t = build(&cfg(2)).unwrap();
    assert_eq!(t.rsdp, 0xE_0000);
    assert_eq!(t.rsdp % 16, 0);
    let names: Vec<String> = tables(&t).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["FACP", "APIC"]);
}

/// MADT (ACPI 6.4 §5.2.12): one enabled Local APIC entry per vCPU with its APIC
/// ID, the IOAPIC, IRQ0 → GSI 2 and LINT1 NMI; x2APIC entries from ID 255.
#[test]
fn madt_has_one_entry_per_vcpu() {
    for n in [1u32, 2, 7, 64] {
        let t = build(&cfg(n)).unwrap();
        let (_, a) = tables(&t).into_iter().find(|(s, _)| s == "APIC").unwrap();
        let m = table(&t, a);
        assert_eq!(u32_at(m, 36), 0xFEE0_0000);
        let mut off = 44;
        let (mut cpus, mut ioapic, mut iso) = (Vec::new(), None, None);
        while off < m.len() {
            let (ty, len) = (m[off], m[off + 1] as usize);
            assert!(len >= 2 && off + len <= m.len());
            match ty {
                0 => {
                    assert_eq!(u32_at(m, off + 4) & 1, 1, "enabled");
                    cpus.push(u32::from(m[off + 3]));
                }
                1 => ioapic = Some((m[off + 2], u32_at(m, off + 4), u32_at(m, off + 8))),
                2 => iso = Some((m[off + 3], u32_at(m, off + 4))),
                _ => {}
            }
            off += len;
        }
        assert_eq!(cpus, (0..n).collect::<Vec<_>>());
        assert_eq!(ioapic, Some((n as u8, 0xFEC0_0000, 0)));
        assert_eq!(iso, Some((0, 2)));
    }
    let mut c = cfg(1);
    c.apic_ids = vec![0, 300];
    let t = build(&c).unwrap();
    let (_, a) = tables(&t).into_iter().find(|(s, _)| s == "APIC").unwrap();
    let m = table(&t, a);
    let x2 = m.windows(2).position(|w| w == [9, 16]).unwrap();
    assert_eq!(u32_at(m, x2 + 4), 300);
}

/// FADT (ACPI 6.4 §5.2.9): revision 6, HW_REDUCED_ACPI, the DSDT in X_DSDT, the
/// sleep control and status registers as 8-bit system I/O; the DSDT's `\_S5`.
#[test]
fn fadt_is_hardware_reduced_with_sleep_registers() {
    let t = build(&cfg(2)).unwrap();
    let (_, a) = tables(&t).into_iter().find(|(s, _)| s == "FACP").unwrap();
    let f = table(&t, a);
    assert_eq!(f.len(), 276);
    assert_eq!(f[8], 6);
    assert_ne!(u32_at(f, 112) & (1 << 20), 0);
    let dsdt = table(&t, u64_at(f, 140));
    assert_eq!(&dsdt[..4], b"DSDT");
    assert_eq!(u64::from(u32_at(f, 40)), u64_at(f, 140));
    assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
    assert_eq!(&f[244..248], &[1, 8, 0, 1]);
    assert_eq!(u64_at(f, 248), u64::from(SLEEP_CONTROL_PORT));
    assert_eq!(u64_at(f, 260), u64::from(SLEEP_STATUS_PORT));
    // Linux's acpi_hw_extended_sleep writes (SLP_TYP << 2) | SLP_EN.
    assert!(is_soft_off((S5_SLEEP_TYPE << 2) | SLP_EN));
    assert!(!is_soft_off(S5_SLEEP_TYPE << 2));
    assert!(!is_soft_off((3 << 2) | SLP_EN));
}

#[test]
fn too_many_vcpus_is_an_error_not_a_panic() {
    let mut c = cfg(1);
    c.apic_ids = (0..20_000).collect();
    assert!(build(&c).unwrap_err().contains("more than"));
}

/// ACPICA's disassembler reads every table without complaint (`iasl -d`, from the
/// `acpica-tools` package; skipped when it is not installed).
#[test]
fn iasl_disassembles_the_tables() {
    if std::process::Command::new("iasl")
        .arg("-v")
        .output()
        .is_err()
    {
        println!("SKIPPED: iasl not installed (apt-get install acpica-tools)");
        return;
    }
    let t = build(&cfg(2)).unwrap();
    let dir = std::env::temp_dir().join(format!("vlapic-acpi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut files = Vec::new();
    for (name, a) in tables(&t) {
        let p = dir.join(format!("{}.dat", name.to_lowercase()));
        std::fs::write(&p, table(&t, a)).unwrap();
        files.push((name, p));
    }
    let f = table(&t, tables(&t)[0].1);
    let p = dir.join("dsdt.dat");
    std::fs::write(&p, table(&t, u64_at(f, 140))).unwrap();
    files.push(("DSDT".into(), p));
    for (name, p) in files {
        let out = std::process::Command::new("iasl")
            .arg("-d")
            .arg(&p)
            .current_dir(&dir)
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {log}");
        let dsl = std::fs::read_to_string(p.with_extension("dsl")).unwrap();
        match name.as_str() {
            "APIC" => {
                assert_eq!(dsl.matches("Processor Local APIC").count(), 2, "{dsl}");
                assert!(dsl.contains("I/O APIC"), "{dsl}");
                assert!(dsl.contains("Interrupt Source Override"), "{dsl}");
            }
            "FACP" => assert!(dsl.contains("Hardware Reduced (V5) : 1"), "{dsl}"),
            "DSDT" => assert!(dsl.contains("_S5"), "{dsl}"),
            _ => {}
        }
        assert!(!dsl.contains("Invalid"), "{name}: {dsl}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

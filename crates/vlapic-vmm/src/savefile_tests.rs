//! Save-file encoding and decoding: round trips, strict decoding, size bounds.

use super::*;
use vlapic::state::native;

#[test]
fn crc32_check_value() {
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    assert_eq!(crc32(b""), 0);
}

#[test]
fn reader_checks_offsets() {
    let mut r = Reader::new(&[1, 2, 3], "T");
    assert_eq!(r.u16().ok(), Some(0x0201));
    assert!(r.u32().unwrap_err().contains("ends early"));
    assert_eq!(r.u8().ok(), Some(3));
    assert!(r.finish().is_ok());
    let mut r = Reader::new(&[0xFF, 0xFF, 0xFF, 0xFF], "T");
    assert!(r.bytes(10).is_err());
}

fn sample() -> SaveFile {
    let fab = vlapic::fabric::SharedFabric::new(vlapic::fabric::FabricConfig::with_vcpus(2));
    let mut console = ConsoleLog::default();
    console.bytes = 42;
    console.tail.push("PASS a".into());
    console.scenarios.push(crate::console::Scenario {
        name: "a".into(),
        status: "PASS".into(),
        detail: String::new(),
        exits: [1; crate::stats::EXIT_REASONS],
        elapsed: std::time::Duration::from_millis(3),
    });
    let v = SavedVcpu {
        run: RunState::Halted(true),
        events: Events::default().with_nmi(2).with_sipi(Some(0x9)),
        interrupts: 7,
        nmis: 1,
        sipis: 1,
        exits: [2; crate::stats::EXIT_REASONS],
        kvm: VcpuState::blank(),
    };
    let mut page = vec![0u8; PAGE];
    page[5] = 0xAA;
    SaveFile {
        header: Header {
            vcpus: 2,
            memory_mib: 4,
            flags: FLAG_VERIFY,
            tsc_hz: 2_000_000_000,
            vm_ns: 5,
            guest_tsc: 10,
            migrate_every_us: 10_000,
            elapsed_ns: 1_000_000,
        },
        fabric: native::encode_fabric(&fab.export()),
        vcpus: vec![
            v.clone(),
            SavedVcpu {
                run: RunState::WaitForSipi,
                ..v
            },
        ],
        memory: Memory {
            index: vec![3],
            data: page,
        },
        console,
        stats: Stats {
            max_nesting: 4,
            violations: 0,
            odd: [(1, 0x99), (0, 0), (6, 0x80e)],
            ..Stats::default()
        },
        devices: DevicesState {
            serial_regs: [1, 0, 0, 1, 3, 0x60, 8, 0xB0, 0],
            serial_in: vec![],
            fw_key: 5,
            fw_pos: 2,
        },
        clocks: Some(ClockDevices::new(1_700_000_000, 5, 4 << 20)),
        pic: Some({
            let mut p = PicPair::default();
            p.write(0x20, 0x11);
            p.write(0x21, 0x30);
            p.set_irq(9, true);
            p
        }),
    }
}

/// Recomputes the length field and the checksum after an edit.
fn reseal(f: &mut [u8]) {
    let n = f.len();
    f[16..24].copy_from_slice(&(n as u64).to_le_bytes());
    let crc = crc32(&f[..n - 4]);
    f[n - 4..].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn round_trip() {
    let s = sample();
    let bytes = s.encode();
    let d = SaveFile::decode(&bytes).expect("decodes");
    assert_eq!(d.header, s.header);
    assert_eq!(d.fabric, s.fabric);
    assert_eq!(d.memory, s.memory);
    assert_eq!(d.stats, s.stats);
    assert_eq!(d.devices, s.devices);
    assert_eq!(d.clocks, s.clocks);
    assert_eq!(d.pic, s.pic);
    assert_eq!(d.console.scenarios, s.console.scenarios);
    assert_eq!(d.console.tail, s.console.tail);
    assert_eq!(d.vcpus.len(), 2);
    assert_eq!(d.vcpus[0].run, RunState::Halted(true));
    assert_eq!(d.vcpus[0].events, s.vcpus[0].events);
    assert_eq!(d.vcpus[1].run, RunState::WaitForSipi);
    assert_eq!(d.vcpus[0].kvm.tsc(), Some(1234));
    assert_eq!(d.encode(), bytes, "re-encoding is identical");
}

#[test]
fn version_1_files_without_hpet_and_rtc_are_still_read() {
    // A file from before the HPET/RTC sections: version 1, no such sections;
    // read with `clocks: None` (the restored VM gets them at power-on), and
    // re-encoded as it was. Version 2 without the sections is an error.
    let mut s = sample();
    s.clocks = None;
    // A version-1 file this build writes (a VM restored from one) has PIC8.
    let with_pic = s.encode();
    assert_eq!(with_pic[8..12], 1u32.to_le_bytes());
    let d = SaveFile::decode(&with_pic).expect("version 1 with PIC8");
    assert!(d.clocks.is_none() && d.pic.is_some());
    assert_eq!(d.encode(), with_pic);
    // As builds before the HPET/RTC wrote it: no PIC8 either.
    s.pic = None;
    let bytes = s.encode();
    let d = SaveFile::decode(&bytes).expect("a version-1 file decodes");
    assert!(d.clocks.is_none() && d.pic.is_none());
    assert_eq!(d.encode(), bytes);
    let mut v2 = bytes.clone();
    v2[8..12].copy_from_slice(&2u32.to_le_bytes());
    reseal(&mut v2);
    assert!(SaveFile::decode(&v2).unwrap_err().contains("HPET missing"));
    // And a version-2 file carries both devices.
    let full = sample().encode();
    assert_eq!(full[8..12], VERSION.to_le_bytes());
    assert!(SaveFile::decode(&full).expect("decodes").clocks.is_some());
}

#[test]
fn every_flipped_byte_is_an_error_not_a_panic() {
    let bytes = sample().encode();
    for i in 0..bytes.len() {
        let mut f = bytes.clone();
        f[i] ^= 0x20;
        let e = SaveFile::decode(&f).err().unwrap_or_default();
        assert!(!e.is_empty() && !e.contains('\n'), "byte {i}: {e:?}");
    }
}

#[test]
fn resealed_edits_never_panic() {
    // A flipped byte with the length and checksum made to match again reaches
    // the structural checks: an error or a (different) valid file, never a panic.
    let bytes = sample().encode();
    for i in 24..bytes.len() - 4 {
        for x in [0x01u8, 0x80, 0xFF] {
            let mut f = bytes.clone();
            f[i] ^= x;
            reseal(&mut f);
            if let Err(e) = SaveFile::decode(&f) {
                assert!(!e.contains('\n'), "{e}");
            }
        }
    }
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = sample().encode();
    // Cut right before the optional PIC8 section (tag, length, 32 bytes) and
    // resealed, the file is a valid one without it.
    let without_pic = bytes.len() - (4 + 8 + 32);
    for n in 0..bytes.len() {
        assert!(SaveFile::decode(&bytes[..n]).is_err(), "{n} bytes accepted");
        let mut f = bytes[..n.max(28)].to_vec();
        if f.len() >= 28 && f.len() < bytes.len() {
            reseal(&mut f);
            match SaveFile::decode(&f) {
                Ok(d) if n == without_pic && d.pic.is_none() => {}
                Ok(_) => panic!("resealed {n} bytes accepted"),
                Err(_) => {}
            }
        }
    }
    let mut long = bytes.clone();
    long.extend_from_slice(&[0; 8]);
    assert!(SaveFile::decode(&long).unwrap_err().contains("trailing"));
}

/// The optional PIC8 section: absent → no 8259 state (power-on); present →
/// validated like KVM's `kvm_pic_state` (`PicPair::from_bytes`); any other tag
/// after DEVS is refused.
#[test]
fn the_optional_pic_section() {
    let mut s = sample();
    s.pic = None;
    let d = SaveFile::decode(&s.encode()).expect("without PIC8");
    assert_eq!(d.pic, None);
    let bytes = sample().encode();
    let at = bytes.len() - 4 - 32;
    assert_eq!(&bytes[at - 12..at - 8], b"PIC8");
    let mut f = bytes.clone();
    f[at + 4] = 9; // master priority_add
    reseal(&mut f);
    let e = SaveFile::decode(&f).unwrap_err();
    assert!(e.contains("PIC8") && e.contains("priority_add"), "{e}");
    let mut f = bytes.clone();
    f[at - 12..at - 8].copy_from_slice(b"HPET");
    reseal(&mut f);
    let e = SaveFile::decode(&f).unwrap_err();
    assert!(e.contains("PIC8 or the end"), "{e}");
}

#[test]
fn foreign_and_short_files() {
    assert!(SaveFile::decode(b"").unwrap_err().contains("magic"));
    assert!(SaveFile::decode(b"\x7fELF....")
        .unwrap_err()
        .contains("magic"));
    let mut f = MAGIC.to_vec();
    assert!(SaveFile::decode(&f).unwrap_err().contains("ends early"));
    f.extend_from_slice(&3u32.to_le_bytes());
    assert!(SaveFile::decode(&f).unwrap_err().contains("version 3"));
}

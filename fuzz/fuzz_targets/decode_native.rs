//! Arbitrary bytes into the native decoders (LAPIC, IOAPIC, fabric): a state or an
//! error, never a panic; an accepted file is canonical (re-encodes to itself).
//! The input is tried as a whole file, and as a body framed with a correct header
//! and CRC (kind from the first byte) so the fuzzer gets past the checksum.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vlapic::state::native;

fn check(file: &[u8]) {
    if let Ok(s) = native::decode_lapic(file) {
        assert_eq!(native::encode_lapic(&s), file);
        let _ = s.validate(&s.implied_config());
    }
    if let Ok(s) = native::decode_ioapic(file) {
        assert_eq!(native::encode_ioapic(&s), file);
        let _ = s.validate();
    }
    if let Ok(s) = native::decode_fabric(file) {
        assert_eq!(native::encode_fabric(&s), file);
    }
}

/// CRC-32 (IEEE).
fn crc32(data: &[u8]) -> u32 {
    let mut crc = u32::MAX;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    let mut file = native::MAGIC.to_vec();
    file.extend_from_slice(&native::FORMAT_VERSION.to_le_bytes());
    file.extend_from_slice(&u16::from(kind % 3 + 1).to_le_bytes());
    file.extend_from_slice(&(body.len() as u32).to_le_bytes());
    file.extend_from_slice(body);
    let crc = crc32(&file);
    file.extend_from_slice(&crc.to_le_bytes());
    check(&file);
});

//! Arbitrary bytes into the KVM `kvm_lapic_state` decoder; the first 24 bytes
//! choose IA32_APIC_BASE, IA32_TSC_DEADLINE and `now`; the rest is tried as is and
//! padded or cut to the 1024-byte page.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vlapic::state::kvm::{self, KvmExtra};
use vlapic::TimerClock;

fuzz_target!(|data: &[u8]| {
    let word = |i: usize| {
        data.get(i * 8..i * 8 + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
            .unwrap_or(0)
    };
    let extra = KvmExtra {
        apic_base: word(0),
        tsc_deadline: word(1),
    };
    let now = word(2);
    let raw = data.get(24..).unwrap_or(&[]);
    let _ = kvm::decode(raw, extra, now, &TimerClock::default()); // any length
    let mut page = raw.to_vec();
    page.resize(kvm::PAGE_SIZE, 0);
    let clock = TimerClock {
        bus_cycle_ns: (now & 0xFF) as u32,
        tsc_hz: word(1) | 1,
    };
    if let Ok(s) = kvm::decode(&page, extra, now, &clock) {
        let _ = kvm::encode(&s, now, &clock);
        let _ = s.validate(&s.implied_config());
    }
});

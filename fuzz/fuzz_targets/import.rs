//! Arbitrary bytes, decoded by the format the first byte selects (or patched into
//! a valid state), imported into a
//! fresh APIC mid-way through its life: either the import succeeds and the APIC
//! exports a valid state, or it fails and the APIC is exactly as before.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vlapic::state::kvm::{self, KvmExtra};
use vlapic::state::{bhyve, native};
use vlapic::{Delivery, LapicConfig, LocalApic};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let cfg = LapicConfig::default().with_verify(true);
    let sized = |n: usize| {
        let mut v = rest.to_vec();
        v.resize(n, 0);
        v
    };
    let state = match sel % 4 {
        0 => native::decode_lapic(rest).ok(),
        1 => kvm::decode(
            &sized(kvm::PAGE_SIZE),
            KvmExtra::default(),
            1000,
            &cfg.clock,
        )
        .ok(),
        // Raw field values: every rule is reachable.
        2 => bhyve::decode(&sized(bhyve::SIZE), 0).ok(),
        // A valid state with a few fields overwritten from the input.
        _ => {
            let mut s = LocalApic::new(cfg).export();
            let w = |i: usize| {
                rest.get(i * 4..i * 4 + 4)
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .map(u32::from_le_bytes)
            };
            let words = [
                &mut s.tpr,
                &mut s.svr,
                &mut s.isr[2],
                &mut s.irr[3],
                &mut s.lvt[1],
                &mut s.timer_initial,
            ];
            for (i, f) in words.into_iter().enumerate() {
                if let Some(v) = w(i) {
                    *f = v;
                }
            }
            s.timer_deadline = w(6).map(u64::from).unwrap_or(0);
            Some(s)
        }
    };
    let Some(state) = state else { return };
    let mut apic = LocalApic::new(cfg);
    let _ = apic.write_register(0xF0, 0x1FF, 0);
    apic.deliver(Delivery::fixed_level(0x41), 0);
    apic.acknowledge();
    let before = apic.export();
    match apic.import(&state, 1000) {
        Ok(()) => {
            assert!(apic.export().validate(&cfg).is_empty());
            // The imported APIC keeps working: EOI everything, advance time.
            for _ in 0..16 {
                let _ = apic.write_register(0xB0, 0, 2000);
                apic.acknowledge();
            }
            apic.advance(u64::MAX / 2);
            assert_eq!(apic.verifier().violations(), 0);
        }
        Err(_) => assert_eq!(apic.export(), before),
    }
});

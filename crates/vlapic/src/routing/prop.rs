//! Property test: the map-based resolver and a naive scan over all APICs agree on random
//! topologies and random messages (matching rules of SDM §11.6.2 and §11.12.10).
//! A unit test because the naive scan and the views are internal.

use super::{resolve_naive, ApicView, Destination, RouteMap};
use crate::regs::x2apic_ldr;
use crate::{ApicMode, DestMode, Shorthand};
use proptest::prelude::*;

fn view() -> impl Strategy<Value = ApicView> {
    // Small ID and LDR ranges so that aliases and overlaps are frequent.
    (
        0u8..3,
        prop_oneof![0u32..8, 0u32..0x40, any::<u32>()],
        any::<u8>(),
        prop_oneof![Just(0xFFFF_FFFFu32), Just(0x0FFF_FFFF), any::<u32>()],
        any::<bool>(),
    )
        .prop_map(|(mode, id, ldr8, dfr, sw_enabled)| match mode {
            0 => ApicView {
                mode: ApicMode::Disabled,
                id: id & 0xFF,
                ldr: u32::from(ldr8) << 24,
                dfr,
                sw_enabled,
            },
            1 => ApicView {
                mode: ApicMode::XApic,
                id: id & 0xFF,
                ldr: u32::from(ldr8 & 0x3F) << 24,
                dfr,
                sw_enabled,
            },
            _ => ApicView {
                mode: ApicMode::X2Apic,
                id,
                ldr: x2apic_ldr(id),
                dfr: u32::MAX,
                sw_enabled,
            },
        })
}

fn destination() -> impl Strategy<Value = Destination> {
    (
        0u8..4,
        any::<bool>(),
        any::<bool>(),
        prop_oneof![
            0u32..0x40,
            Just(0xFF),
            Just(u32::MAX),
            0u32..0x0004_FFFF,
            any::<u32>()
        ],
    )
        .prop_map(|(sh, logical, x2, id)| Destination {
            shorthand: match sh {
                0 | 1 => Shorthand::None,
                2 => Shorthand::AllIncludingSelf,
                _ => Shorthand::AllExcludingSelf,
            },
            mode: if logical {
                DestMode::Logical
            } else {
                DestMode::Physical
            },
            id: if x2 { id } else { id & 0xFF },
            x2apic_format: x2,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn map_agrees_with_naive_scan(
        views in prop::collection::vec(view(), 1..40),
        dests in prop::collection::vec(destination(), 1..8),
        sender in prop::option::of(0usize..45),
        self_only in any::<bool>(),
    ) {
        let map = RouteMap::build(&views);
        for mut d in dests {
            if self_only {
                d.shorthand = Shorthand::SelfOnly;
            }
            let mut fast = map.targets(&d, sender);
            let n = fast.len();
            fast.sort_unstable();
            fast.dedup();
            prop_assert_eq!(fast.len(), n, "a target resolved twice");
            prop_assert_eq!(fast, resolve_naive(&views, &d, sender), "{:?}", d);
        }
    }
}

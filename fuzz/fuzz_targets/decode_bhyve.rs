//! Arbitrary bytes into the illumos `vdi_lapic_v1` decoder: a state or an error;
//! an accepted structure re-encodes to itself except for the padding. The input
//! is tried as is and padded or cut to 200 bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vlapic::state::bhyve;

fuzz_target!(|raw: &[u8]| {
    let _ = bhyve::decode(raw, 0); // any length
    let mut data = raw.to_vec();
    data.resize(bhyve::SIZE, 0);
    if let Ok(s) = bhyve::decode(&data, 0) {
        let mut want = data.clone();
        want[132..136].fill(0);
        want[196..200].fill(0);
        assert_eq!(bhyve::encode(&s).as_slice(), want.as_slice());
        let _ = s.validate(&s.implied_config());
    }
});

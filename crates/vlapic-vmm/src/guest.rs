//! The built-in test guest: `guest/` built by `scripts/build-guest.sh` from
//! build.rs, embedded so `vlapic run` boots it without `--kernel`.

#[cfg(vlapic_test_guest)]
static GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/vlapic-test-guest.elf"));

/// The embedded test guest image, if it was built.
pub fn test_guest() -> Option<&'static [u8]> {
    #[cfg(vlapic_test_guest)]
    {
        Some(GUEST)
    }
    #[cfg(not(vlapic_test_guest))]
    {
        None
    }
}

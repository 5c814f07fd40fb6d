//! Link the guest as a freestanding, statically positioned kernel image.
//!
//! The host target (`x86_64-unknown-linux-gnu`) is the only target available,
//! so instead of a custom target we keep the host target and take the C
//! runtime out of the link: no crt files, no libc, no PIE, our own linker
//! script (image at 1 MiB, multiboot header first).

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap();
    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--build-id=none",
        "-Wl,-n",
        "-Wl,-z,noexecstack",
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rustc-link-arg-bins=-Wl,-T,{dir}/link.ld");
    println!("cargo:rerun-if-changed=link.ld");
    println!("cargo:rerun-if-changed=build.rs");
}

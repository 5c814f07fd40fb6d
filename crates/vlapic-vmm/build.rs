//! Builds the test guest (`guest/` via `scripts/build-guest.sh`) into OUT_DIR so
//! the VMM can embed it; when that fails the VMM builds without a default guest.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(vlapic_test_guest)");
    println!("cargo:rerun-if-env-changed=VLAPIC_GUEST_IMAGE");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap_or_else(|_| ".".into()));
    let dest = out.join("vlapic-test-guest.elf");
    // A prebuilt image can be supplied (CI, or a machine without the guest toolchain).
    if let Ok(img) = std::env::var("VLAPIC_GUEST_IMAGE") {
        if std::fs::copy(&img, &dest).is_ok() {
            println!("cargo:rustc-cfg=vlapic_test_guest");
        }
        return;
    }
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default()).join("../..");
    let script = root.join("scripts/build-guest.sh");
    println!("cargo:rerun-if-changed={}", script.display());
    println!(
        "cargo:rerun-if-changed={}",
        root.join("guest/src").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        root.join("guest/Cargo.toml").display()
    );
    if !script.exists() {
        println!("cargo:warning=scripts/build-guest.sh not found: vlapic run needs --kernel");
        return;
    }
    let guest_out = out.join("guest");
    let status = Command::new("bash")
        .arg(&script)
        .arg(&guest_out)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .status();
    match status {
        Ok(s) if s.success() => {
            let found = std::fs::read_dir(&guest_out).ok().and_then(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.path())
                    .find(|p| p.extension().is_some_and(|x| x == "elf"))
            });
            match found.map(|p| std::fs::copy(p, &dest)) {
                Some(Ok(_)) => println!("cargo:rustc-cfg=vlapic_test_guest"),
                _ => println!("cargo:warning=build-guest.sh produced no .elf image"),
            }
        }
        _ => println!("cargo:warning=building the test guest failed: vlapic run needs --kernel"),
    }
}

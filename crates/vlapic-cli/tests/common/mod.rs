//! Helpers shared by the `vlapic` state-tool tests (`state_cli`, `replay_cli`):
//! run the binary, golden files, scratch paths, output as text or JSON.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn vlapic(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vlapic"))
        .args(args)
        .output()
        .expect("run vlapic")
}

pub fn golden(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../vlapic/tests/golden")
        .join(name)
        .display()
        .to_string()
}

pub fn tmp(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("state_cli");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn json_of(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}{}", stdout(o), stderr(o)))
}

pub fn broken_bhyve() -> PathBuf {
    let mut b = std::fs::read(golden("nested.bhyve")).unwrap();
    b[8..12].copy_from_slice(&0x100u32.to_le_bytes()); // vlp_tpr
    b[28 + 8] |= 1 << 2; // vlp_isr[2]: 0x42 next to 0x41
    let p = tmp("broken.bhyve");
    std::fs::write(&p, b).unwrap();
    p
}

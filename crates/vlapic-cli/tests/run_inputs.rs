//! `vlapic run` bounds every input before allocating for it (issue 10 finding 3): a
//! save file by what its own header allows, `--kernel` and `--module` by `--memory`.
//! These refusals happen before KVM is touched, so the tests run anywhere.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn vlapic(args: &[&str]) -> (Output, Duration) {
    let t = Instant::now();
    let o = Command::new(env!("CARGO_BIN_EXE_vlapic"))
        .args(args)
        .output()
        .expect("run vlapic");
    (o, t.elapsed())
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vlapic-run-inputs-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("tmp dir");
    d.join(name)
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// An endless device is refused after its first bytes, not read to exhaustion
/// (it grew past 4.6 GB before).
#[test]
fn restore_from_dev_zero_is_refused_at_once() {
    let (o, t) = vlapic(&["run", "--restore", "/dev/zero"]);
    assert_eq!(o.status.code(), Some(2), "{}", err(&o));
    assert!(err(&o).contains("bad magic"), "{}", err(&o));
    assert_eq!(err(&o).lines().count(), 1, "{}", err(&o));
    assert!(t < Duration::from_secs(10), "{t:?}");
}

/// A header announcing more bytes than its vCPU count and RAM size allow is refused
/// before the rest is read.
#[test]
fn restore_announcing_too_much_is_refused() {
    let mut f = Vec::new();
    f.extend_from_slice(b"VLAPICSV");
    f.extend_from_slice(&1u32.to_le_bytes()); // version
    f.extend_from_slice(&0u32.to_le_bytes()); // reserved
    f.extend_from_slice(&(1u64 << 40).to_le_bytes()); // total: 1 TiB
    f.extend_from_slice(b"HEAD");
    f.extend_from_slice(&52u64.to_le_bytes());
    f.extend_from_slice(&1u32.to_le_bytes()); // 1 vCPU
    f.extend_from_slice(&16u64.to_le_bytes()); // 16 MiB
    f.resize(f.len() + 40, 0);
    let p = tmp("huge.vlsave");
    std::fs::write(&p, &f).expect("write");
    let (o, _) = vlapic(&["run", "--restore", p.to_str().expect("utf-8")]);
    assert_eq!(o.status.code(), Some(2), "{}", err(&o));
    assert!(
        err(&o).contains("announces 1099511627776 bytes"),
        "{}",
        err(&o)
    );
}

/// A kernel or module that cannot fit in guest RAM is refused by its size.
#[test]
fn images_larger_than_guest_ram_are_refused() {
    let big = tmp("big.img");
    let f = std::fs::File::create(&big).expect("create");
    f.set_len((16 << 20) + 1).expect("sparse 16 MiB + 1");
    let b = big.to_str().expect("utf-8");
    let (o, _) = vlapic(&["run", "--kernel", b, "--memory", "16"]);
    assert_eq!(o.status.code(), Some(2), "{}", err(&o));
    assert!(
        err(&o).contains("larger than 16777216 bytes"),
        "{}",
        err(&o)
    );
    let (o, _) = vlapic(&["run", "--kernel", "/dev/zero", "--memory", "16"]);
    assert_eq!(o.status.code(), Some(2), "{}", err(&o));
    assert!(
        err(&o).contains("larger than 16777216 bytes"),
        "{}",
        err(&o)
    );
    let small = tmp("small.img");
    std::fs::write(&small, b"not a kernel").expect("write");
    let (o, _) = vlapic(&[
        "run",
        "--kernel",
        small.to_str().expect("utf-8"),
        "--module",
        b,
        "--memory",
        "16",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", err(&o));
    assert!(
        err(&o).contains("module") && err(&o).contains("larger than"),
        "{}",
        err(&o)
    );
}

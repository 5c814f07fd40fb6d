//! Builds a test kernel with its shell script, once per test process (included with
//! `#[path]` by the test files of vlapic-vmm and vlapic-cli that boot one).
//! Exit 0: the image; exit 77 (automake's "skip": the script found no toolchain): one
//! SKIPPED line and `None`; any other failure is a broken build and panics.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Runs `bash SCRIPT OUT` once per `cell` (the tests of one binary run in parallel and
/// share `out`). `script` is relative to the repository root.
pub fn build_once(
    cell: &'static OnceLock<Option<PathBuf>>,
    script: &str,
    out: PathBuf,
) -> Option<PathBuf> {
    cell.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let o = Command::new("bash")
            .arg(root.join(script))
            .arg(&out)
            .output()
            .unwrap_or_else(|e| panic!("running bash {script}: {e}"));
        let err = String::from_utf8_lossy(&o.stderr);
        match o.status.code() {
            Some(0) => Some(out),
            Some(77) => {
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIPPED: cannot build the test kernel ({script}): {}",
                    err.trim()
                );
                None
            }
            _ => panic!("{script} failed: {err}"),
        }
    })
    .clone()
}

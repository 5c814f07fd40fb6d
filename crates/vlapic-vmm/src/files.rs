//! Reading inputs with a size bound checked before allocation, and writing a file
//! atomically (fresh temporary name, no symlink followed, directory synced).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Reads `path` (a file, a pipe or a device) if it holds at most `limit` bytes. A regular
/// file is refused by its size before anything is read; anything else is read up to
/// `limit + 1` bytes and refused if that much came. `what` names the input and the
/// limit's reason in the one-line error.
pub fn read_bounded(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>, String> {
    let file =
        std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let too_big = || format!("{}: larger than {limit} bytes ({what})", path.display());
    if meta.is_file() && meta.len() > limit {
        return Err(too_big());
    }
    let mut bytes = Vec::new();
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if bytes.len() as u64 > limit {
        return Err(too_big());
    }
    Ok(bytes)
}

/// A temporary name beside `path` that no other writer uses: `.NAME.PID.NANOS.tmp`.
fn temp_beside(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "save".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    path.with_file_name(format!(".{name}.{}.{nanos}.tmp", std::process::id()))
}

/// Writes `bytes` to `path` atomically: into a fresh temporary file in the same
/// directory (created exclusively, so an existing file or symlink there is never
/// followed or overwritten), synced, renamed over `path`, then the directory synced
/// so the rename itself survives a crash. On failure nothing is left behind.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = temp_beside(path);
    let res = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::File::open(dir)?.sync_all()
    })();
    res.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot write {}: {e}", path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vlapic-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("tmp dir");
        d
    }

    #[test]
    fn bounded_reads_refuse_before_reading() {
        let d = dir("read");
        let p = d.join("f");
        std::fs::write(&p, [1u8; 10]).expect("write");
        assert_eq!(read_bounded(&p, 10, "test").expect("fits"), vec![1u8; 10]);
        let e = read_bounded(&p, 9, "the test limit").expect_err("too big");
        assert!(e.contains("larger than 9 bytes (the test limit)"), "{e}");
        // A device that never ends is cut at limit + 1 bytes.
        let e = read_bounded(Path::new("/dev/zero"), 4096, "t").expect_err("endless");
        assert!(e.contains("larger than 4096"), "{e}");
        assert!(read_bounded(&d.join("missing"), 1, "t").is_err());
    }

    /// A symlink planted at any temporary name is never followed: the temporary file
    /// is created exclusively under a fresh name and renamed over the target.
    #[test]
    fn atomic_write_replaces_and_leaves_nothing() {
        let d = dir("write");
        let p = d.join("vm.sav");
        let victim = d.join("victim");
        std::fs::write(&victim, b"keep").expect("victim");
        std::os::unix::fs::symlink(&victim, d.join("vm.sav.tmp")).expect("symlink");
        write_atomic(&p, b"one").expect("write");
        write_atomic(&p, b"two").expect("overwrite");
        assert_eq!(std::fs::read(&p).expect("read"), b"two");
        assert_eq!(std::fs::read(&victim).expect("victim"), b"keep");
        let left: Vec<_> = std::fs::read_dir(&d)
            .expect("dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp") && n.starts_with('.'))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        assert!(write_atomic(&d.join("no/such/dir/f"), b"x").is_err());
    }
}

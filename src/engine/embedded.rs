//! The agent and the restorer, embedded in the `limitless` binary at build time and
//! unpacked on first use into a private cache directory, named by content hash and
//! checked against it, so that copying the one binary is a complete install.
//!
//! The directory is the first usable of: `$LIMITLESS_CACHE_DIR`, `$XDG_CACHE_HOME/limitless`,
//! `$HOME/.cache/limitless`, `$TMPDIR/limitless-<uid>` (or `/tmp`). "Usable" means we can
//! create it, it is ours, not writable by others, and not on a `noexec` mount (the agent is
//! mapped executable and the restorer is executed). A user with no home directory ends up
//! in the temporary directory.

use anyhow::{bail, Context, Result};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The agent library.
pub static AGENT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/agent.so"));
/// The restorer executable.
pub static RESTORER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/restorer"));
include!(concat!(env!("OUT_DIR"), "/engine_hashes.rs"));

/// Where the unpacked engine files are.
#[derive(Clone, Debug)]
pub struct EngineFiles {
    /// The agent library (for `LD_PRELOAD`).
    pub agent: PathBuf,
    /// The restorer executable.
    pub restorer: PathBuf,
}

/// The file name of the agent of this build.
pub fn agent_file_name() -> String {
    format!("agent-{}.so", &AGENT_HASH[..16])
}

fn restorer_file_name() -> String {
    format!("restorer-{}", &RESTORER_HASH[..16])
}

/// Candidate cache directories, best first.
pub fn candidates() -> Vec<PathBuf> {
    let mut v = Vec::new();
    let abs = |s: std::ffi::OsString| {
        let p = PathBuf::from(s);
        p.is_absolute().then_some(p)
    };
    if let Some(p) = std::env::var_os("LIMITLESS_CACHE_DIR").and_then(abs) {
        v.push(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME").and_then(abs) {
        v.push(p.join("limitless"));
    }
    if let Some(p) = std::env::var_os("HOME").and_then(abs) {
        v.push(p.join(".cache").join("limitless"));
    }
    let tmp = std::env::var_os("TMPDIR").and_then(abs).unwrap_or_else(|| PathBuf::from("/tmp"));
    // SAFETY: getuid cannot fail and has no side effects.
    let uid = unsafe { libc::getuid() };
    v.push(tmp.join(format!("limitless-{uid}")));
    if tmp != Path::new("/tmp") {
        v.push(PathBuf::from(format!("/tmp/limitless-{uid}")));
    }
    v
}

fn usable(dir: &Path) -> bool {
    if fs::create_dir_all(dir).is_err() {
        return false;
    }
    let Ok(m) = fs::symlink_metadata(dir) else { return false };
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    if !m.is_dir() || m.uid() != uid {
        return false;
    }
    if m.mode() & 0o022 != 0 && fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).is_err() {
        return false;
    }
    match rustix::fs::statvfs(dir) {
        Ok(s) => !s.f_flag.contains(rustix::fs::StatVfsMountFlags::NOEXEC),
        Err(_) => false,
    }
}

/// Makes sure `path` holds exactly `bytes` (checked by hash), writing it atomically if not.
pub fn ensure_file(path: &Path, bytes: &[u8], hash: &str, mode: u32) -> Result<()> {
    if let Ok(existing) = fs::read(path) {
        if blake3::hash(&existing).to_hex().as_str() == hash {
            return Ok(());
        }
    }
    let dir = path.parent().context("cache path has no parent")?;
    let tmp = dir.join(format!(".{}.{}", path.file_name().and_then(|n| n.to_str()).unwrap_or("f"), std::process::id()));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path).with_context(|| format!("cannot install {}", path.display()))?;
    let check = fs::read(path)?;
    if blake3::hash(&check).to_hex().as_str() != hash {
        bail!("{} does not match the embedded copy after writing it", path.display());
    }
    Ok(())
}

/// Unpacks (or finds) the agent and the restorer.
pub fn unpack() -> Result<EngineFiles> {
    let mut tried = Vec::new();
    for dir in candidates() {
        if !usable(&dir) {
            tried.push(dir.display().to_string());
            continue;
        }
        let agent = dir.join(agent_file_name());
        let restorer = dir.join(restorer_file_name());
        if ensure_file(&agent, AGENT, AGENT_HASH, 0o755).is_ok() && ensure_file(&restorer, RESTORER, RESTORER_HASH, 0o755).is_ok() {
            return Ok(EngineFiles { agent, restorer });
        }
        tried.push(dir.display().to_string());
    }
    bail!(
        "no usable cache directory for the engine files (tried {}); set LIMITLESS_CACHE_DIR to a private, writable directory on a mount without noexec",
        tried.join(", ")
    )
}

/// Whether `path` names this build's agent (so a restore can put it back if it is missing).
pub fn is_our_agent(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()) == Some(agent_file_name().as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_files_match_their_hashes() {
        assert_eq!(blake3::hash(AGENT).to_hex().as_str(), AGENT_HASH);
        assert_eq!(blake3::hash(RESTORER).to_hex().as_str(), RESTORER_HASH);
        assert_eq!(&RESTORER[..4], b"\x7fELF");
    }

    #[test]
    fn ensure_file_repairs_a_changed_copy() {
        let d = std::env::temp_dir().join(format!("limitless-emb-{}", std::process::id()));
        fs::create_dir_all(&d).unwrap();
        let p = d.join("x");
        let h = blake3::hash(b"hello").to_hex().to_string();
        ensure_file(&p, b"hello", &h, 0o644).unwrap();
        fs::write(&p, b"tampered").unwrap();
        ensure_file(&p, b"hello", &h, 0o644).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"hello");
        fs::remove_dir_all(&d).unwrap();
    }
}

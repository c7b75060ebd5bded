//! File objects an image carries, put back at restore: memfds and shared anonymous memory
//! become one memfd each (every mapping of it maps that memfd, so aliasing is kept), files
//! deleted while open become unnamed files (`O_TMPFILE` in their directory, or a memfd),
//! and carried files and directories (`--carry`) are written back to their paths before the
//! program continues.

use anyhow::{anyhow, Context, Result};
use limitless_image::file::{FileRec, Image};
use limitless_image::format::file_kind;
use std::collections::HashMap;
use std::ffi::CString;
use std::fs::{self, File};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;

fn memfd(name: &str) -> Result<OwnedFd> {
    let c = CString::new(name.replace('\0', "_")).unwrap_or_default();
    // SAFETY: creates a new memfd with a NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(anyhow!("cannot create a memfd: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is new and ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An unnamed file in `dir` (where the deleted file was), or a memfd if that fails.
fn unnamed(dir: &Path, mode: u32) -> Result<OwnedFd> {
    if let Ok(c) = CString::new(dir.as_os_str().as_bytes()) {
        // SAFETY: opens an unnamed temporary file in `dir`.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC, mode & 0o7777) };
        if fd >= 0 {
            // SAFETY: `fd` is new and ours.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
    memfd("deleted")
}

fn fill(img: &Image, f: &FileRec, out: &File) -> Result<()> {
    out.set_len(f.info.size).context("cannot size a restored file")?;
    for d in img.file_data.iter().filter(|d| d.header.id == f.info.id) {
        let bytes = img.read_file_data(d).map_err(|e| anyhow!("{e}"))?;
        out.write_all_at(&bytes, d.header.offset).context("cannot write a restored file")?;
    }
    Ok(())
}

/// Creates the memfds and unnamed files of the image, filled; returns them by object id.
pub fn create(img: &Image) -> Result<HashMap<u32, OwnedFd>> {
    let mut out = HashMap::new();
    for f in &img.files {
        let fd = match f.info.kind {
            file_kind::SHM => memfd(&String::from_utf8_lossy(&f.name))?,
            file_kind::DELETED => {
                let p = String::from_utf8_lossy(&f.name).into_owned();
                unnamed(Path::new(&p).parent().unwrap_or(Path::new("/tmp")), f.info.mode)?
            }
            _ => continue,
        };
        let file = File::from(fd);
        fill(img, f, &file).with_context(|| format!("restoring {} {}", file_kind::name(f.info.kind), String::from_utf8_lossy(&f.name)))?;
        out.insert(f.info.id, OwnedFd::from(file));
    }
    Ok(out)
}

/// A new open file description of object `fd` (its own offset and flags), as the program's
/// descriptor had.
pub fn reopen(fd: &OwnedFd, open_flags: u32, pos: u64) -> Result<OwnedFd> {
    let path = CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL");
    let keep = libc::O_ACCMODE | libc::O_APPEND | libc::O_NONBLOCK;
    // SAFETY: opens the object again through its magic link.
    let r = unsafe { libc::open(path.as_ptr(), (open_flags as i32 & keep) | libc::O_CLOEXEC) };
    if r < 0 {
        return Err(anyhow!("cannot reopen a restored file: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `r` is new and ours.
    let f = File::from(unsafe { OwnedFd::from_raw_fd(r) });
    // SAFETY: plain lseek on our own descriptor.
    unsafe { libc::lseek(f.as_raw_fd(), pos as i64, libc::SEEK_SET) };
    Ok(OwnedFd::from(f))
}

/// Writes the carried directories, files and links back (directories first), with their
/// modes and modification times. Existing files are replaced: the program's view is the
/// one at the checkpoint.
pub fn write_carried(img: &Image) -> Result<()> {
    let mut carried: Vec<&FileRec> = img.files.iter().filter(|f| f.info.kind >= file_kind::CARRIED).collect();
    carried.sort_by_key(|f| (f.info.kind != file_kind::CARRIED_DIR, f.name.len()));
    for f in carried {
        let path = Path::new(std::ffi::OsStr::from_bytes(&f.name));
        let what = || format!("cannot restore the carried {} {}", file_kind::name(f.info.kind), path.display());
        match f.info.kind {
            file_kind::CARRIED_DIR => {
                fs::create_dir_all(path).with_context(what)?;
                let _ = fs::set_permissions(path, fs::Permissions::from_mode(f.info.mode & 0o7777));
            }
            file_kind::CARRIED_SYMLINK => {
                let mut target = Vec::new();
                for d in img.file_data.iter().filter(|d| d.header.id == f.info.id) {
                    target.extend(img.read_file_data(d).map_err(|e| anyhow!("{e}"))?);
                }
                let target = Path::new(std::ffi::OsStr::from_bytes(&target));
                if fs::read_link(path).ok().as_deref() != Some(target) {
                    let _ = fs::remove_file(path);
                    if let Some(d) = path.parent() {
                        fs::create_dir_all(d).with_context(what)?;
                    }
                    std::os::unix::fs::symlink(target, path).with_context(what)?;
                }
            }
            _ => {
                let dir = path.parent().unwrap_or(Path::new("/"));
                fs::create_dir_all(dir).with_context(what)?;
                let tmp = dir.join(format!(
                    ".{}.limitless-{}",
                    path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
                    std::process::id()
                ));
                let file = File::create(&tmp).with_context(what)?;
                fill(img, f, &file).with_context(what)?;
                file.sync_all().with_context(what)?;
                let _ = fs::set_permissions(&tmp, fs::Permissions::from_mode(f.info.mode & 0o7777));
                let mtime = std::time::UNIX_EPOCH + std::time::Duration::new(f.info.mtime_sec.max(0) as u64, f.info.mtime_nsec);
                let _ = file.set_modified(mtime);
                drop(file);
                fs::rename(&tmp, path).with_context(what)?;
            }
        }
    }
    Ok(())
}

/// Writes `data` as a whole file (for tests).
#[cfg(test)]
fn write_file(p: &Path, data: &[u8]) {
    use std::io::Write;
    File::create(p).and_then(|mut f| f.write_all(data)).expect("write");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopen_gives_a_separate_offset() {
        let d = std::env::temp_dir().join(format!("limitless-objects-{}", std::process::id()));
        fs::create_dir_all(&d).unwrap();
        let p = d.join("f");
        write_file(&p, b"hello world");
        let f = OwnedFd::from(File::open(&p).unwrap());
        let r = reopen(&f, libc::O_RDONLY as u32, 6).unwrap();
        let mut b = [0u8; 5];
        // SAFETY: reads into a local buffer from our descriptor.
        let n = unsafe { libc::read(r.as_raw_fd(), b.as_mut_ptr() as *mut libc::c_void, 5) };
        assert_eq!((n, &b), (5, b"world"));
        fs::remove_dir_all(d).unwrap();
    }
}

//! Files carried inside an image (`--carry DIR`, `--carry-written`): a FaaS container's
//! `/tmp` is empty at the next invocation, so the files a program wrote there would be lost
//! between steps. While the program is frozen the supervisor adds, as file objects, every
//! directory, regular file and symbolic link under the carried directories, and every
//! regular file the program has open for writing; the restore writes them back before the
//! program continues (`objects::write_carried`).

use anyhow::{Context, Result};
use limitless_image::file::Writer;
use limitless_image::format::{file_kind, kind, FileData, FileObj, FILE_DATA_MAX, SUPERVISOR_FILE_IDS};
use limitless_image::wire::Wire;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What to carry.
#[derive(Clone, Debug, Default)]
pub struct Carry {
    /// Directories carried whole (absolute paths).
    pub dirs: Vec<PathBuf>,
    /// Also carry every regular file the program has open for writing.
    pub written: bool,
}

impl Carry {
    /// Whether anything is carried.
    pub fn any(&self) -> bool {
        !self.dirs.is_empty() || self.written
    }

    /// From `LIMITLESS_CARRY` (directories separated by `:`) and `LIMITLESS_CARRY_WRITTEN=1`.
    pub fn from_env() -> Carry {
        let dirs = std::env::var_os("LIMITLESS_CARRY")
            .map(|v| std::env::split_paths(&v).filter(|p| p.is_absolute()).collect())
            .unwrap_or_default();
        Carry { dirs, written: std::env::var("LIMITLESS_CARRY_WRITTEN").as_deref() == Ok("1") }
    }
}

/// Adds carried files to an image being written.
pub struct Carrier {
    next_id: u32,
    /// Bytes of file contents added.
    pub bytes: u64,
    seen: std::collections::HashSet<PathBuf>,
}

impl Default for Carrier {
    fn default() -> Self {
        Carrier { next_id: SUPERVISOR_FILE_IDS, bytes: 0, seen: Default::default() }
    }
}

impl Carrier {
    fn object<W: Write>(&mut self, w: &mut Writer<W>, k: u32, path: &Path, md: &fs::Metadata, size: u64, data_bytes: u64) -> Result<u32> {
        let id = self.next_id;
        self.next_id += 1;
        let name = path.as_os_str().as_bytes();
        let o = FileObj {
            id,
            kind: k,
            dev: md.dev(),
            ino: md.ino(),
            size,
            mode: md.mode() & 0o7777,
            name_len: name.len() as u32,
            mtime_sec: md.mtime(),
            mtime_nsec: md.mtime_nsec() as u32,
            reserved: 0,
            data_bytes,
        };
        let mut b = vec![0u8; FileObj::SIZE];
        o.put(&mut b);
        b.extend_from_slice(name);
        w.plain(kind::FILE, &b)?;
        Ok(id)
    }

    fn data<W: Write>(&mut self, w: &mut Writer<W>, id: u32, offset: u64, bytes: &[u8]) -> Result<()> {
        let h = FileData { id, reserved: 0, offset, len: bytes.len() as u64 };
        let mut b = vec![0u8; FileData::SIZE];
        h.put(&mut b);
        b.extend_from_slice(bytes);
        w.plain(kind::FILE_DATA, &b)?;
        self.bytes += bytes.len() as u64;
        Ok(())
    }

    /// Adds one regular file (its contents as they are now: the program is frozen).
    fn file<W: Write>(&mut self, w: &mut Writer<W>, path: &Path, md: &fs::Metadata) -> Result<()> {
        let mut f = File::open(path).with_context(|| format!("cannot read the carried file {}", path.display()))?;
        let size = md.len();
        let id = self.object(w, file_kind::CARRIED, path, md, size, size)?;
        let mut buf = vec![0u8; FILE_DATA_MAX as usize];
        let mut off = 0u64;
        while off < size {
            let want = ((size - off) as usize).min(buf.len());
            f.read_exact(&mut buf[..want]).with_context(|| format!("{} changed while it was carried", path.display()))?;
            self.data(w, id, off, &buf[..want])?;
            off += want as u64;
        }
        Ok(())
    }

    /// Adds a path: a directory (recursively), a regular file or a symbolic link; other kinds
    /// of files (sockets, devices, FIFOs) are skipped.
    pub fn add<W: Write>(&mut self, w: &mut Writer<W>, path: &Path) -> Result<()> {
        if !self.seen.insert(path.to_path_buf()) {
            return Ok(());
        }
        let md = match fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("cannot carry {}", path.display())),
        };
        let ft = md.file_type();
        if ft.is_dir() {
            self.object(w, file_kind::CARRIED_DIR, path, &md, 0, 0)?;
            let mut entries: Vec<PathBuf> =
                fs::read_dir(path).with_context(|| format!("cannot list {}", path.display()))?.flatten().map(|e| e.path()).collect();
            entries.sort();
            for e in entries {
                self.add(w, &e)?;
            }
        } else if ft.is_file() {
            self.file(w, path, &md)?;
        } else if ft.is_symlink() {
            let target = fs::read_link(path)?;
            let t = target.as_os_str().as_bytes();
            let id = self.object(w, file_kind::CARRIED_SYMLINK, path, &md, t.len() as u64, t.len() as u64)?;
            if !t.is_empty() {
                self.data(w, id, 0, t)?;
            }
        }
        Ok(())
    }
}

/// Whether a descriptor record names a regular file open for writing; returns its path.
pub fn written_file(payload: &[u8]) -> Option<PathBuf> {
    use limitless_image::format::{fd_kind, FdInfo};
    let f = FdInfo::decode(payload)?;
    let acc = f.open_flags as i32 & libc::O_ACCMODE;
    if f.kind != fd_kind::REG || acc == libc::O_RDONLY {
        return None;
    }
    let p = payload.get(FdInfo::SIZE..FdInfo::SIZE + f.path_len as usize)?;
    Some(PathBuf::from(std::ffi::OsStr::from_bytes(p)))
}

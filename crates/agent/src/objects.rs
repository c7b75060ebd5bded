//! Files whose contents the image must carry because nothing else holds them: memfds and
//! shared anonymous memory (restored as one memfd mapped everywhere it was, so aliasing
//! is kept) and regular files deleted while open (restored unnamed).
//!
//! Contents come from a descriptor when the program holds one (a private reopen through
//! `/proc/self/fd`, walking data extents with `SEEK_DATA`/`SEEK_HOLE`), otherwise from the
//! mappings: the pages `mincore` reports resident in the shared object.

use crate::scratch::Scratch;
use crate::stream::Out;
use limitless_image::format::{file_kind, kind, FileData, FileObj, FILE_DATA_MAX, PAGE};
use limitless_image::wire::Wire;
use limitless_sys as sys;

/// Largest deleted file carried in an image.
pub const MAX_DELETED: u64 = 256 << 20;
/// Largest shared memory object carried in an image.
pub const MAX_SHM: u64 = 64 << 30;

/// One object.
#[derive(Clone, Copy, Default)]
pub struct Obj {
    pub id: u32,
    pub kind: u32,
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mode: u32,
    /// A descriptor of the program's that reads it (-1: read through the mappings).
    pub fd: i32,
    pub name_off: u32,
    pub name_len: u32,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
}

/// The objects of one checkpoint.
pub struct Objects {
    pub list: &'static mut [Obj],
    pub n: usize,
    names: &'static mut [u8],
    used: usize,
}

/// A mapping of an object: (start, end, object offset).
#[derive(Clone, Copy, Default)]
pub struct ObjMap {
    pub start: u64,
    pub end: u64,
    pub pgoff: u64,
    pub obj: u32,
    pub readable: bool,
}

impl Objects {
    pub fn new(s: &mut Scratch, max: usize) -> Option<Objects> {
        Some(Objects { list: s.array::<Obj>(max)?, n: 0, names: s.array::<u8>(max * 256 + 4096)?, used: 0 })
    }

    /// The object with this identity, if known.
    pub fn find(&mut self, dev: u64, ino: u64) -> Option<&mut Obj> {
        self.list[..self.n].iter_mut().find(|o| o.dev == dev && o.ino == ino)
    }

    /// Adds an object; returns its index, or `None` when the table is full.
    pub fn add(&mut self, mut o: Obj, name: &[u8]) -> Option<usize> {
        if self.n == self.list.len() {
            return None;
        }
        let k = name.len().min(255).min(self.names.len() - self.used);
        self.names[self.used..self.used + k].copy_from_slice(&name[..k]);
        o.name_off = self.used as u32;
        o.name_len = k as u32;
        o.id = self.n as u32 + 1;
        self.used += k;
        self.list[self.n] = o;
        self.n += 1;
        Some(self.n - 1)
    }

    /// The name of object `o`.
    pub fn name(&self, o: &Obj) -> &[u8] {
        &self.names[o.name_off as usize..(o.name_off + o.name_len) as usize]
    }
}

/// The memfd name in `/memfd:NAME (deleted)`, or the path of a deleted file.
pub fn display_name(path: &[u8]) -> &[u8] {
    let p = path.strip_suffix(b" (deleted)").unwrap_or(path);
    p.strip_prefix(b"/memfd:").unwrap_or(p)
}

/// Whether a file path names memfd or shared anonymous memory.
pub fn is_shm(path: &[u8]) -> bool {
    path.starts_with(b"/memfd:") || path == b"/dev/zero (deleted)" || path.starts_with(b"/dev/zero")
}

/// Data extents of object `o` read through a private reopen of its descriptor: calls
/// `f(offset, len)` for each run (split at FILE_DATA_MAX). Returns the total.
fn fd_extents(fd: i32, size: u64, mut f: impl FnMut(u64, u64) -> sys::Result<()>) -> sys::Result<u64> {
    const SEEK_DATA: i32 = 3;
    const SEEK_HOLE: i32 = 4;
    let mut total = 0;
    let mut at = 0u64;
    while at < size {
        let start = match sys::lseek(fd, at as i64, SEEK_DATA) {
            Ok(s) => s,
            Err(_) => break, // ENXIO: no more data
        };
        if start >= size {
            break;
        }
        let end = sys::lseek(fd, start as i64, SEEK_HOLE).unwrap_or(size).min(size);
        let mut o = start;
        while o < end {
            let l = (end - o).min(FILE_DATA_MAX);
            f(o, l)?;
            total += l;
            o += l;
        }
        at = end.max(start + 1);
    }
    Ok(total)
}

fn reopen(fd: i32) -> sys::Result<i32> {
    let mut p = [0u8; 48];
    sys::openat(sys::AT_FDCWD, crate::fds::proc_path(b"/proc/self/fd/", fd, &mut p), sys::O_RDONLY | sys::O_CLOEXEC, 0)
}

/// Resident pages of mapped objects, as (object, offset) runs: calls `f(map, offset, len)`
/// for each run of resident, not yet seen pages of object `obj` (split at FILE_DATA_MAX).
fn mapped_runs(
    maps: &[ObjMap],
    obj: u32,
    size: u64,
    vec: &mut [u8],
    seen: &mut [u64],
    mut f: impl FnMut(&ObjMap, u64, u64) -> sys::Result<()>,
) -> sys::Result<u64> {
    let mut total = 0;
    for m in maps.iter().filter(|m| m.obj == obj) {
        let mut at = m.start;
        while at < m.end {
            let n = (((m.end - at) / PAGE) as usize).min(vec.len());
            // SAFETY: mincore writes one byte per page of [at, at + n pages) into `vec`.
            unsafe { sys::sys(27, [at as usize, n * PAGE as usize, vec.as_mut_ptr() as usize, 0, 0, 0])? };
            let mut i = 0;
            while i < n {
                let off = m.pgoff + (at - m.start) + i as u64 * PAGE;
                let pg = (off / PAGE) as usize;
                let fresh = off < size && vec[i] & 1 == 1 && pg / 64 < seen.len() && seen[pg / 64] & (1 << (pg % 64)) == 0;
                if !fresh {
                    i += 1;
                    continue;
                }
                let s = i;
                while i < n {
                    let off2 = m.pgoff + (at - m.start) + i as u64 * PAGE;
                    let pg2 = (off2 / PAGE) as usize;
                    if off2 >= size
                        || vec[i] & 1 == 0
                        || pg2 / 64 >= seen.len()
                        || seen[pg2 / 64] & (1 << (pg2 % 64)) != 0
                        || (i - s) as u64 * PAGE >= FILE_DATA_MAX
                    {
                        break;
                    }
                    seen[pg2 / 64] |= 1 << (pg2 % 64);
                    i += 1;
                }
                let len = ((i - s) as u64 * PAGE).min(size - off);
                f(m, off, len)?;
                total += len;
            }
            at += n as u64 * PAGE;
        }
    }
    Ok(total)
}

/// Writes every object: its FILE record, then FILE_DATA records with its contents.
pub fn write(out: &mut Out, objs: &Objects, maps: &[ObjMap], s: &mut Scratch, mem_fd: i32) -> sys::Result<()> {
    let buf = s.array::<u8>(FILE_DATA_MAX as usize).ok_or(sys::Errno::ENOMEM)?;
    let vec = s.array::<u8>(4096).ok_or(sys::Errno::ENOMEM)?;
    for o in objs.list[..objs.n].iter() {
        let pages = o.size.div_ceil(PAGE) as usize;
        let seen_len = pages.div_ceil(64).max(1);
        let seen = s.array::<u64>(seen_len).ok_or(sys::Errno::ENOMEM)?;
        let src = if o.fd >= 0 { reopen(o.fd).ok() } else { None };
        // First pass: how many bytes (the FILE record says, before the data).
        let data_bytes = match src {
            Some(fd) => fd_extents(fd, o.size, |_, _| Ok(()))?,
            None => mapped_runs(maps, o.id, o.size, vec, seen, |_, _, _| Ok(()))?,
        };
        seen.fill(0);
        let fo = FileObj {
            id: o.id,
            kind: o.kind,
            dev: o.dev,
            ino: o.ino,
            size: o.size,
            mode: o.mode,
            name_len: o.name_len,
            mtime_sec: o.mtime_sec,
            mtime_nsec: o.mtime_nsec,
            reserved: 0,
            data_bytes,
        };
        let mut fb = [0u8; FileObj::SIZE];
        fo.put(&mut fb);
        out.record(kind::FILE, &[&fb, objs.name(o)])?;
        let emit = |out: &mut Out, off: u64, data: &[u8]| -> sys::Result<()> {
            let h = FileData { id: o.id, reserved: 0, offset: off, len: data.len() as u64 };
            let mut hb = [0u8; FileData::SIZE];
            h.put(&mut hb);
            out.record(kind::FILE_DATA, &[&hb, data])
        };
        match src {
            Some(fd) => {
                let r = fd_extents(fd, o.size, |off, len| {
                    let b = &mut buf[..len as usize];
                    let mut got = 0;
                    while got < b.len() {
                        match sys::pread(fd, &mut b[got..], off + got as u64) {
                            Ok(0) => break,
                            Ok(k) => got += k,
                            Err(sys::Errno::EINTR) => {}
                            Err(e) => return Err(e),
                        }
                    }
                    b[got..].fill(0);
                    emit(out, off, b)
                });
                let _ = sys::close(fd);
                r?;
            }
            None => {
                mapped_runs(maps, o.id, o.size, vec, seen, |m, off, len| {
                    let addr = m.start + (off - m.pgoff);
                    if m.readable {
                        // SAFETY: [addr, addr + len) is resident memory of a mapping of this
                        // process; every other thread is frozen.
                        let data = unsafe { core::slice::from_raw_parts(addr as *const u8, len as usize) };
                        emit(out, off, data)
                    } else {
                        let b = &mut buf[..len as usize];
                        crate::scan::read_mem(mem_fd, b, addr);
                        emit(out, off, b)
                    }
                })?;
            }
        }
    }
    Ok(())
}

/// The kind of object for a descriptor's or a mapping's path.
pub fn kind_of(path: &[u8]) -> u32 {
    if is_shm(path) {
        file_kind::SHM
    } else {
        file_kind::DELETED
    }
}

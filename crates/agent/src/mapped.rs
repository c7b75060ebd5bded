//! Page data that `restore --map` mapped copy-on-write from an image file into memory the
//! program had as private anonymous memory. Two things tell such a mapping from the
//! program's own file mappings (the restorer says whether it mapped any, and the file
//! starts with an image's magic), and two things differ from anonymous memory:
//!
//! - a checkpoint must copy every page of it, not refer to the image file (which the next
//!   step may delete): [`crate::scan`] treats it as a file that is gone;
//! - advice that discards pages (`MADV_DONTNEED`, `MADV_FREE`) must leave zeros, as it does
//!   on anonymous memory, not bring the image's bytes back: [`before_discard`] makes that
//!   part fresh anonymous memory first (calls through libc's `madvise` only; glibc's own
//!   internal calls, which never count on zeros, and raw system calls are not seen).

use crate::global::IMAGE_MAPPED;
use crate::maps::{self, MapEntry};
use crate::scratch::Scratch;
use core::sync::atomic::Ordering;
use limitless_sys as sys;

/// Most bytes of `/proc/self/maps` [`before_discard`] reads (about 40,000 areas).
const MAPS_CAP: usize = 4 << 20;
/// Its scratch memory: the text, then an entry for each line (reserved, not used).
const SCRATCH: usize = 4 * MAPS_CAP;

/// Whether `e`, a private file mapping named `name`, maps an image's page data. Only looked
/// for after a restore that mapped any, and only in areas such a restore maps (not
/// executable); the file's first bytes tell.
pub fn is_image(e: &MapEntry, name: &[u8]) -> bool {
    if !IMAGE_MAPPED.load(Ordering::Acquire) || e.shared || e.ino == 0 || e.prot & sys::PROT_EXEC as u32 != 0 {
        return false;
    }
    let mut p = [0u8; 4097];
    if name.len() >= p.len() || !name.starts_with(b"/") {
        return false;
    }
    p[..name.len()].copy_from_slice(name);
    let Ok(fd) = sys::openat(sys::AT_FDCWD, &p[..name.len() + 1], sys::O_RDONLY | sys::O_CLOEXEC, 0) else { return false };
    let mut magic = [0u8; 8];
    let got = sys::pread(fd, &mut magic, 0);
    let _ = sys::close(fd);
    got == Ok(8) && magic == limitless_image::format::MAGIC
}

/// Before `madvise` discards `addr..addr + len`: the parts of it that map an image's page
/// data become fresh anonymous memory with the same protection.
pub fn before_discard(addr: usize, len: usize) {
    if !IMAGE_MAPPED.load(Ordering::Acquire) {
        return;
    }
    let end = addr.saturating_add(len) as u64;
    let Ok(mut s) = Scratch::new(SCRATCH) else { return };
    let Ok(m) = maps::read(&mut s, MAPS_CAP) else { return };
    for e in &m.entries[..m.n] {
        if e.end <= addr as u64 || e.start >= end || !is_image(e, m.name(e)) {
            continue;
        }
        let (a, b) = (e.start.max(addr as u64), e.end.min(end));
        // SAFETY: replaces `a..b`, part of the range the program itself is discarding, with
        // fresh anonymous memory of the same protection: what the advice leaves there in
        // the program's original anonymous memory (zeros).
        let _ = unsafe {
            sys::mmap(a as usize, (b - a) as usize, e.prot as i32, sys::MAP_PRIVATE | sys::MAP_ANONYMOUS | sys::MAP_FIXED, -1, 0)
        };
    }
}

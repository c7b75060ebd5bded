//! Page data that `restore --map` mapped copy-on-write from an image file into memory the
//! program had as private anonymous memory. Two things differ from anonymous memory:
//!
//! - a checkpoint must copy every page of it, not refer to the image file (which the next
//!   step may delete): [`crate::scan`] treats it as a file that is gone;
//! - advice that discards pages (`MADV_DONTNEED`, `MADV_FREE`) must leave zeros, as it does
//!   on anonymous memory, not bring the image's bytes back: [`before_discard`] makes that
//!   part fresh anonymous memory first (calls through libc's `madvise` only; glibc's own
//!   internal calls, which never count on zeros, and raw system calls are not seen).
//!
//! Once a restore that mapped any has put every thread in place, and before they run, the
//! manager notes which files are images and where they are mapped ([`note`]): then the
//! files are still there (the program may delete one later, and a deleted file cannot be
//! opened by its name), and telling an image mapping takes no system call. Reading
//! `/proc/self/maps` at each discard took about 45 µs a call, against 3 µs for the
//! `madvise` itself (by hand, a small restored program), so a discard elsewhere than the
//! noted ranges reads nothing.

use crate::global::IMAGE_MAPPED;
use crate::maps::{self, MapEntry};
use crate::scratch::Scratch;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use limitless_sys as sys;

/// Most bytes of `/proc/self/maps` read here (about 40,000 areas).
const MAPS_CAP: usize = 4 << 20;
/// Its scratch memory: the text, then an entry for each line (reserved, not used).
const SCRATCH: usize = 4 * MAPS_CAP;
/// Image files noted (an image and the parents of a delta).
const MAX_FILES: usize = 16;
/// Ranges of image mappings noted, merged where they touch.
const MAX_RANGES: usize = 64;

#[allow(clippy::declare_interior_mutable_const)]
const PAIR: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
/// `(dev, ino)` of each image file noted. Written only by [`note`], before the program's
/// threads run; read afterwards.
static FILES: [[AtomicU64; 2]; MAX_FILES] = [PAIR; MAX_FILES];
static N_FILES: AtomicUsize = AtomicUsize::new(0);
/// More image files than [`FILES`] holds, or the map could not be read: a file is then
/// told by its first bytes, through its name.
static BY_NAME: AtomicBool = AtomicBool::new(false);
/// Start and end of each range of image mappings; like [`FILES`].
static RANGES: [[AtomicU64; 2]; MAX_RANGES] = [PAIR; MAX_RANGES];
static N_RANGES: AtomicUsize = AtomicUsize::new(0);
/// Whether [`RANGES`] holds every image mapping: not once `mremap` may have moved one
/// ([`moved`]), nor if there were too many.
static RANGES_HOLD: AtomicBool = AtomicBool::new(false);

/// Whether `e`, a mapping named `name`, maps an image's page data.
pub fn is_image(e: &MapEntry, name: &[u8]) -> bool {
    if !IMAGE_MAPPED.load(Ordering::Acquire) || !could_be(e) {
        return false;
    }
    let n = N_FILES.load(Ordering::Acquire);
    FILES[..n].iter().any(|[d, i]| (d.load(Ordering::Relaxed), i.load(Ordering::Relaxed)) == (e.dev, e.ino))
        || (BY_NAME.load(Ordering::Acquire) && image_file(name))
}

/// A private mapping of a file, not executable: what a restore maps from an image.
fn could_be(e: &MapEntry) -> bool {
    !e.shared && e.ino != 0 && e.prot & sys::PROT_EXEC as u32 == 0
}

/// Whether the file at `name` starts with an image's magic.
fn image_file(name: &[u8]) -> bool {
    let mut buf = [0u8; maps::PATH_BUF];
    let Some(p) = maps::c_path(name, &mut buf).filter(|_| name.starts_with(b"/")) else { return false };
    let Ok(fd) = sys::openat(sys::AT_FDCWD, p, sys::O_RDONLY | sys::O_CLOEXEC, 0) else { return false };
    let mut magic = [0u8; 8];
    let got = sys::pread(fd, &mut magic, 0);
    let _ = sys::close(fd);
    got == Ok(8) && magic == limitless_image::format::MAGIC
}

/// After a restore, before the program's threads run: notes the image files the restore
/// mapped from and where (nothing if it mapped none).
pub fn note() {
    N_FILES.store(0, Ordering::Relaxed);
    N_RANGES.store(0, Ordering::Relaxed);
    BY_NAME.store(false, Ordering::Relaxed);
    RANGES_HOLD.store(false, Ordering::Relaxed);
    if !IMAGE_MAPPED.load(Ordering::Acquire) {
        return;
    }
    let m = Scratch::new(SCRATCH).ok().and_then(|mut s| maps::read(&mut s, MAPS_CAP).ok().map(|m| (s, m)));
    let Some((_s, m)) = m else {
        BY_NAME.store(true, Ordering::Release);
        return;
    };
    let (mut files, mut ranges, mut hold) = (0, 0, true);
    // Image mappings come one per page window, one after another: open each file once.
    let mut last: Option<((u64, u64), bool)> = None;
    for e in m.entries[..m.n].iter().filter(|e| could_be(e)) {
        let id = (e.dev, e.ino);
        let image = match last {
            Some((l, v)) if l == id => v,
            _ => {
                let v = image_file(m.name(e));
                last = Some((id, v));
                if v && !FILES[..files].iter().any(|[d, i]| (d.load(Ordering::Relaxed), i.load(Ordering::Relaxed)) == id) {
                    if files == MAX_FILES {
                        BY_NAME.store(true, Ordering::Relaxed);
                    } else {
                        FILES[files][0].store(id.0, Ordering::Relaxed);
                        FILES[files][1].store(id.1, Ordering::Relaxed);
                        files += 1;
                    }
                }
                v
            }
        };
        if !image {
            continue;
        }
        if ranges > 0 && RANGES[ranges - 1][1].load(Ordering::Relaxed) == e.start {
            RANGES[ranges - 1][1].store(e.end, Ordering::Relaxed);
        } else if ranges == MAX_RANGES {
            hold = false;
        } else {
            RANGES[ranges][0].store(e.start, Ordering::Relaxed);
            RANGES[ranges][1].store(e.end, Ordering::Relaxed);
            ranges += 1;
        }
    }
    N_FILES.store(files, Ordering::Release);
    N_RANGES.store(ranges, Ordering::Release);
    RANGES_HOLD.store(hold, Ordering::Release);
}

/// After `mremap`, which may have moved an image mapping: every later discard reads the
/// map.
pub fn moved() {
    if IMAGE_MAPPED.load(Ordering::Acquire) {
        RANGES_HOLD.store(false, Ordering::Release);
    }
}

/// Whether `addr..end` may hold an image mapping.
fn may_hold(addr: u64, end: u64) -> bool {
    if !RANGES_HOLD.load(Ordering::Acquire) {
        return true;
    }
    let r = &RANGES[..N_RANGES.load(Ordering::Acquire)];
    r.iter().any(|[s, e]| s.load(Ordering::Relaxed) < end && addr < e.load(Ordering::Relaxed))
}

/// Before `madvise` discards `addr..addr + len`: the parts of it that map an image's page
/// data become fresh anonymous memory with the same protection.
pub fn before_discard(addr: usize, len: usize) {
    let end = addr.saturating_add(len) as u64;
    if !IMAGE_MAPPED.load(Ordering::Acquire) || !may_hold(addr as u64, end) {
        return;
    }
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

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
//!
//! Finding that part means reading `/proc/self/maps` (about 45 µs a call, against 3 µs for
//! the `madvise` itself, measured by hand in a small restored program), so the first such
//! call also notes where the image mappings are ([`Filter`]), and later calls elsewhere
//! skip the reading.

use crate::global::IMAGE_MAPPED;
use crate::maps::{self, MapEntry};
use crate::scratch::Scratch;
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
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

/// The ranges that held image mappings when the first [`before_discard`] after a restore
/// looked, merged where they touch. New image mappings appear only at a restore, and the
/// program can move one only with `mremap`, whose wrapper turns the filter off
/// ([`moved`]); a range that no longer holds one (unmapped, or made anonymous) only costs
/// a call the reading it could have skipped. States: [`NONE`], [`BUILDING`], [`READY`],
/// [`OFF`].
struct Filter;

const NONE: u32 = 0;
const BUILDING: u32 = 1;
const READY: u32 = 2;
const OFF: u32 = 3;
const MAX_RANGES: usize = 64;

static FILTER: AtomicU32 = AtomicU32::new(NONE);
static N_RANGES: AtomicUsize = AtomicUsize::new(0);
#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
/// Start and end of each range: written only while `BUILDING`, read only once `READY`.
static RANGES: [[AtomicU64; 2]; MAX_RANGES] = [EMPTY; MAX_RANGES];

impl Filter {
    /// Whether `addr..end` may hold an image mapping.
    fn may_hold(addr: u64, end: u64) -> bool {
        if FILTER.load(Ordering::Acquire) != READY {
            return true;
        }
        let r = &RANGES[..N_RANGES.load(Ordering::Relaxed)];
        r.iter().any(|[s, e]| s.load(Ordering::Relaxed) < end && addr < e.load(Ordering::Relaxed))
    }

    /// Notes the image mappings of `m`, unless another thread does or the filter is off.
    fn build(m: &maps::Maps) {
        if FILTER.compare_exchange(NONE, BUILDING, Ordering::Acquire, Ordering::Relaxed).is_err() {
            return;
        }
        let mut n = 0;
        let mut last: Option<((u64, u64), bool)> = None;
        for e in &m.entries[..m.n] {
            // Image mappings come one per page window: look at each file once.
            let image = if e.shared || e.ino == 0 || e.prot & sys::PROT_EXEC as u32 != 0 {
                false
            } else if let Some((_, v)) = last.filter(|(id, _)| *id == (e.dev, e.ino)) {
                v
            } else {
                let v = is_image(e, m.name(e));
                last = Some(((e.dev, e.ino), v));
                v
            };
            if !image {
                continue;
            }
            if n > 0 && RANGES[n - 1][1].load(Ordering::Relaxed) == e.start {
                RANGES[n - 1][1].store(e.end, Ordering::Relaxed);
            } else if n == MAX_RANGES {
                FILTER.store(OFF, Ordering::Release);
                return;
            } else {
                RANGES[n][0].store(e.start, Ordering::Relaxed);
                RANGES[n][1].store(e.end, Ordering::Relaxed);
                n += 1;
            }
        }
        N_RANGES.store(n, Ordering::Relaxed);
        // Unless `moved` turned it off meanwhile.
        let _ = FILTER.compare_exchange(BUILDING, READY, Ordering::Release, Ordering::Relaxed);
    }
}

/// At a restore: the filter of the process checkpointed no longer applies.
pub fn restored() {
    FILTER.store(NONE, Ordering::Release);
}

/// After `mremap`, which may have moved an image mapping: every later discard reads the
/// map.
pub fn moved() {
    if IMAGE_MAPPED.load(Ordering::Acquire) {
        FILTER.store(OFF, Ordering::Release);
    }
}

/// Before `madvise` discards `addr..addr + len`: the parts of it that map an image's page
/// data become fresh anonymous memory with the same protection.
pub fn before_discard(addr: usize, len: usize) {
    let end = addr.saturating_add(len) as u64;
    if !IMAGE_MAPPED.load(Ordering::Acquire) || !Filter::may_hold(addr as u64, end) {
        return;
    }
    let Ok(mut s) = Scratch::new(SCRATCH) else { return };
    let Ok(m) = maps::read(&mut s, MAPS_CAP) else { return };
    Filter::build(&m);
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

//! Dirty-page tracking between checkpoints, so that a delta image need not read memory the
//! program has not written since its parent.
//!
//! At a leave-running checkpoint that asks for it (`ckpt_flags::TRACK`), the agent opens a
//! userfaultfd with asynchronous write-protection (`UFFD_FEATURE_WP_ASYNC`, Linux 6.7+: a
//! write to a protected page is resolved by the kernel itself, with no handler and no
//! signal) and registers and write-protects the program's anonymous memory. From then on a
//! page's protection bit is cleared by the first write to it (by the program or by the
//! kernel on its behalf, as in `read(2)` into it: `../shared/probes/t_wp_kwrite.c`). At
//! every later checkpoint, while the program is frozen, one `PAGEMAP_SCAN` per tracked
//! area returns the pages written since and protects them again in the same step
//! (`PM_SCAN_WP_MATCHING`): that checkpoint is the next baseline, numbered by an epoch.
//!
//! A page window (up to 1 MiB) is sent as *unchanged* (its header only, no pages) when:
//! the supervisor says the parent image is the one taken at this agent's current baseline
//! epoch; the area is registered (`uw` in `/proc/self/smaps`) and was at the baseline with
//! the same offset (an area moved by `mremap` has another); no page of the window was
//! written; and the window's header (which pages are present and not zero) is exactly the
//! baseline's. A page whose protection bit is still set cannot have changed; a page that
//! went away (`MADV_DONTNEED`) changes the header; a page moved in from elsewhere loses its
//! bit. The supervisor turns an unchanged window into a reference to the parent's record
//! with that very header, and fails the checkpoint if there is none.
//!
//! The baseline (each tracked window's header and its area's offset) lives in a mapping of
//! its own that the memory scan leaves out. The descriptor and the mapping are not in the
//! image ([`forget`]): a restored process starts untracked, unless the restorer armed
//! tracking from the image itself ([`adopt`]). The descriptor is checked
//! at each checkpoint (a userfaultfd, with the inode it had): if the program closed it,
//! its registrations went with it, and tracking ends. Areas much larger than
//! what they hold are not registered (write-protecting installs page tables over the whole
//! area). Nothing here uses the program's allocator, stdio or locks.

use crate::global::Shared;
use crate::scan::{Area, Scan};
use crate::scratch::Scratch;
use limitless_image::format::{vma_kind, worth_tracking, PagesHeader, PAGE};
use limitless_image::plan::{PlanTrack, TRACK_FD_FLOOR};
use limitless_sys as sys;

/// One baseline window.
#[derive(Clone, Copy)]
struct BaseWin {
    hdr: PagesHeader,
    /// The area's offset minus its start (an anonymous area's origin).
    origin: u64,
}

struct Track {
    /// The userfaultfd, or -1.
    uffd: i32,
    /// Its inode number (each userfaultfd has its own on Linux 6.x), to tell it from a
    /// file the program may have put at the same number.
    ino: u64,
    /// The current baseline's epoch (0: none).
    epoch: u64,
    /// The last epoch handed out: epochs are never reused, so a stale one from the
    /// supervisor can never match a newer baseline.
    last: u64,
    /// The baseline mapping: `cap` windows, `n` used.
    base: usize,
    cap: usize,
    n: usize,
}

static TRACK: Shared<Track> = Shared::new(Track { uffd: -1, ino: 0, epoch: 0, last: 0, base: 0, cap: 0, n: 0 });

/// Whether the agent tracks memory now, and what its checkpoints report.
pub struct Outcome {
    /// The new baseline's epoch (0: not tracking).
    pub epoch: u64,
    /// One byte per window of the scan: 1 if unchanged since the parent.
    pub unchanged: Option<&'static mut [u8]>,
    pub unchanged_pages: u64,
}

/// The userfaultfd, if it is still ours; to leave out of the descriptor table.
pub fn fd() -> i32 {
    // SAFETY: only the manager thread touches TRACK, during checkpoints.
    let t = unsafe { &mut *TRACK.ptr() };
    if t.uffd >= 0 && !(is_uffd(t.uffd) && ino(t.uffd) == Some(t.ino)) {
        // The program closed it (the registrations went with it) or put another file at
        // its number: not ours any more.
        t.uffd = -1;
        t.epoch = 0;
    }
    t.uffd
}

/// The baseline mapping, which the memory scan must leave out: (start, end), or (0, 0).
pub fn hole() -> (u64, u64) {
    // SAFETY: as in `fd`.
    let t = unsafe { &*TRACK.ptr() };
    if t.base == 0 {
        (0, 0)
    } else {
        (t.base as u64, (t.base + map_len(t.cap)) as u64)
    }
}

/// A restored process: nothing of the old tracking exists (no descriptor, no baseline
/// mapping, no protected pages).
pub fn forget() {
    // SAFETY: the restored manager is the only thread using TRACK.
    unsafe { *TRACK.ptr() = Track { uffd: -1, ino: 0, epoch: 0, last: 0, base: 0, cap: 0, n: 0 } };
}

/// A restored process whose restorer armed tracking (`RestartArgs` version 2): `uffd`
/// has every tracked area registered and protected since just after the page data went
/// in, and `wins` holds `n` [`PlanTrack`] entries (address order): the image's windows in
/// those areas, which is exactly what that memory held. They become the baseline of a new
/// epoch, so a delta on top of the restored image may skip what is not written since.
/// Runs in the restart's leader, alone, before any checkpoint. Returns the epoch (0: none).
pub fn adopt(uffd: i32, wins: u64, n: u64) -> u64 {
    forget();
    if uffd < 0 || !is_uffd(uffd) {
        return 0;
    }
    // SAFETY: as in `forget`.
    let t = unsafe { &mut *TRACK.ptr() };
    t.uffd = uffd;
    t.ino = ino(uffd).unwrap_or(0);
    let cap = (n as usize).max(1);
    // SAFETY: a fresh private anonymous mapping at an address the kernel chooses.
    let Ok(m) = (unsafe { sys::mmap(0, map_len(cap), sys::PROT_READ | sys::PROT_WRITE, sys::MAP_PRIVATE | sys::MAP_ANONYMOUS, -1, 0) })
    else {
        // Tracking goes on without a baseline (the next checkpoint makes one).
        return 0;
    };
    // SAFETY: the mapping holds `cap` windows and belongs to TRACK alone.
    let nb = unsafe { core::slice::from_raw_parts_mut(m as *mut BaseWin, cap) };
    for (i, b) in nb.iter_mut().enumerate().take(n as usize) {
        // SAFETY: the restorer passes `n` entries at `wins`, in its gap, which stays mapped
        // until the restart is over.
        let raw = unsafe { core::slice::from_raw_parts((wins as usize + i * PlanTrack::SIZE) as *const u8, PlanTrack::SIZE) };
        let w = <PlanTrack as limitless_image::wire::Wire>::get(raw);
        // As `origin` computes it at the next checkpoint: the offset of an anonymous area
        // reads 0 in /proc/self/maps.
        *b = BaseWin { hdr: w.hdr, origin: 0u64.wrapping_sub(w.area_start) };
    }
    t.last = 1;
    t.epoch = 1;
    t.base = m;
    t.cap = cap;
    t.n = n as usize;
    t.epoch
}

/// The current baseline's epoch (0: none).
pub fn epoch() -> u64 {
    // SAFETY: as in `fd`.
    unsafe { (*TRACK.ptr()).epoch }
}

fn ino(fd: i32) -> Option<u64> {
    let mut st = sys::Stat::default();
    sys::fstat(fd, &mut st).ok().map(|_| st.ino)
}

fn is_uffd(fd: i32) -> bool {
    let mut link = [0u8; 64];
    let n = crate::fds::fd_path(fd, &mut link);
    &link[..n] == b"anon_inode:[userfaultfd]"
}

fn map_len(cap: usize) -> usize {
    (cap * core::mem::size_of::<BaseWin>()).div_ceil(PAGE as usize) * PAGE as usize
}

/// An anonymous area's origin: its offset minus its start (`mremap` keeps the offset).
fn origin(a: &Area) -> u64 {
    a.pgoff.wrapping_sub(a.info.start)
}

/// Runs while the program is frozen, after the memory scan: finds the windows unchanged
/// since the parent (if the parent is this agent's baseline, `parent_epoch`), protects
/// the written pages again, registers new areas if `arm`, and records the new baseline.
pub fn checkpoint(scan: &Scan, s: &mut Scratch, parent_epoch: u32, arm: bool) -> Outcome {
    // SAFETY: only the manager thread touches TRACK, during checkpoints.
    let t = unsafe { &mut *TRACK.ptr() };
    let mut out = Outcome { epoch: 0, unchanged: None, unchanged_pages: 0 };
    if t.uffd < 0 && arm {
        t.uffd = open();
        t.ino = ino(t.uffd).unwrap_or(0);
    }
    if t.uffd < 0 {
        return out;
    }
    let wins = &scan.wins[..scan.n_wins];
    let use_base = parent_epoch != 0 && parent_epoch as u64 == t.epoch && t.base != 0;
    let mut flags = s.array::<u8>(wins.len().max(1));
    // Without room for the scan's results nothing can be re-armed or claimed: tracking ends
    // (the registered areas' written pages stay unprotected, so they count as written if
    // it starts again).
    let Some(rv) = s.array::<sys::PageRegion>(1024) else {
        t.epoch = 0;
        return out;
    };
    let Ok(pm) = sys::openat(sys::AT_FDCWD, b"/proc/self/pagemap\0", sys::O_RDONLY | sys::O_CLOEXEC, 0) else {
        t.epoch = 0;
        return out;
    };
    // SAFETY: the baseline mapping holds `t.n` initialized windows (written below at the
    // previous checkpoint) and stays mapped until it is replaced further down.
    let base: &[BaseWin] = if use_base { unsafe { core::slice::from_raw_parts(t.base as *const BaseWin, t.n) } } else { &[] };
    for (ai, a) in scan.areas[..scan.n_areas].iter().enumerate() {
        if !vma_kind::tracked(a.info.kind) || !a.uffd_wp {
            continue;
        }
        // This area's windows (they are in address order, grouped by area).
        let first = wins.partition_point(|w| w.hdr.start < a.info.start);
        let last = wins.partition_point(|w| w.hdr.start < a.info.end);
        let mut clean = use_base;
        if let (Some(f), true) = (flags.as_deref_mut(), use_base) {
            f[first..last].fill(1);
        }
        // The pages written since the baseline; they are protected again as they are
        // reported. Without the baseline this only re-arms.
        let mut at = a.info.start;
        while at < a.info.end {
            let mut arg = sys::PmScanArg {
                size: core::mem::size_of::<sys::PmScanArg>() as u64,
                flags: sys::PM_SCAN_WP_MATCHING | sys::PM_SCAN_CHECK_WPASYNC,
                start: at,
                end: a.info.end,
                walk_end: 0,
                vec: rv.as_mut_ptr() as u64,
                vec_len: rv.len() as u64,
                max_pages: 0,
                category_inverted: 0,
                category_mask: 0,
                category_anyof_mask: sys::PAGE_IS_WRITTEN,
                return_mask: sys::PAGE_IS_WRITTEN,
            };
            // SAFETY: PAGEMAP_SCAN reads `arg` and writes at most vec_len regions to `rv`.
            match unsafe { sys::ioctl(pm, sys::PAGEMAP_SCAN, &mut arg as *mut sys::PmScanArg as usize) } {
                Ok(n) => {
                    if let Some(f) = flags.as_deref_mut() {
                        for r in &rv[..n] {
                            let from = wins.partition_point(|w| w.hdr.start + w.hdr.npages as u64 * PAGE <= r.start);
                            for (i, w) in wins.iter().enumerate().take(last).skip(from.max(first)) {
                                if w.hdr.start >= r.end {
                                    break;
                                }
                                f[i] = 0;
                            }
                        }
                    }
                    let next = sys::pagemap_scan_next(&arg, &rv[..n]);
                    if next <= at {
                        break;
                    }
                    at = next;
                }
                Err(_) => {
                    clean = false;
                    break;
                }
            }
        }
        let Some(f) = flags.as_deref_mut() else { continue };
        for (i, w) in wins.iter().enumerate().take(last).skip(first) {
            if f[i] == 0 {
                continue;
            }
            let same = clean
                && w.area as usize == ai
                && base
                    .binary_search_by_key(&w.hdr.start, |b| b.hdr.start)
                    .is_ok_and(|k| base[k].hdr == w.hdr && base[k].origin == origin(a));
            if same {
                out.unchanged_pages += w.hdr.count as u64;
            } else {
                f[i] = 0;
            }
        }
    }
    let _ = sys::close(pm);
    if arm {
        register_new(scan);
    }
    // The new baseline: every window of a tracked area.
    if t.base != 0 {
        // SAFETY: the old baseline mapping is TRACK's alone and not used after this.
        let _ = unsafe { sys::munmap(t.base, map_len(t.cap)) };
        t.base = 0;
        t.cap = 0;
        t.n = 0;
    }
    let cap = wins.len().max(1);
    // SAFETY: a fresh private anonymous mapping at an address the kernel chooses.
    let m = unsafe { sys::mmap(0, map_len(cap), sys::PROT_READ | sys::PROT_WRITE, sys::MAP_PRIVATE | sys::MAP_ANONYMOUS, -1, 0) };
    let Ok(m) = m else {
        t.epoch = 0;
        return out;
    };
    // SAFETY: the mapping holds `cap` windows and belongs to TRACK alone.
    let nb = unsafe { core::slice::from_raw_parts_mut(m as *mut BaseWin, cap) };
    let mut n = 0;
    for w in wins {
        let a = &scan.areas[w.area as usize];
        if vma_kind::tracked(a.info.kind) {
            nb[n] = BaseWin { hdr: w.hdr, origin: origin(a) };
            n += 1;
        }
    }
    t.last += 1;
    *t = Track { uffd: t.uffd, ino: t.ino, epoch: t.last, last: t.last, base: m, cap, n };
    out.epoch = t.epoch;
    out.unchanged = flags.filter(|_| use_base);
    out
}

/// Opens the userfaultfd (asynchronous write-protection), at a high descriptor number.
fn open() -> i32 {
    sys::uffd_wp_async(TRACK_FD_FLOOR).unwrap_or(-1)
}

/// Registers and write-protects the tracked kinds of areas that are not registered yet
/// and not much larger than what they hold. Failures leave an area untracked (its windows
/// are then always sent).
fn register_new(scan: &Scan) {
    // SAFETY: as in `checkpoint`.
    let uffd = unsafe { (*TRACK.ptr()).uffd };
    for a in scan.areas[..scan.n_areas].iter() {
        let len = a.info.end - a.info.start;
        if a.uffd_wp || !worth_tracking(&a.info) {
            continue;
        }
        // SAFETY: write-protect mode only: no fault in the area waits for a handler.
        if unsafe { sys::uffd_register(uffd, a.info.start, len, sys::UFFDIO_REGISTER_MODE_WP) }.is_err() {
            continue;
        }
        // SAFETY: the userfaultfd is asynchronous (`open`), so the program's writes
        // proceed (the kernel only notes them).
        let _ = unsafe { sys::uffd_writeprotect(uffd, a.info.start, len) };
    }
}

//! Classifies the memory areas and finds the pages an image must carry.
//!
//! - Private anonymous memory (`[heap]`, `[stack]`, thread stacks, `malloc` arenas): pages
//!   that are present or swapped, not the shared zero page, not guard pages, and not all
//!   zero bytes (touched-but-zero memory is common and comes back as zeros anyway).
//! - Private file mappings of files that still exist: only pages the program changed
//!   (copy-on-write anonymous pages); the rest comes from the file at restore.
//! - Private mappings of deleted or replaced files: every non-zero page, read through
//!   `/proc/self/mem` (which reports a page past the end of the file as an error instead of
//!   raising `SIGBUS`).
//! - Shared file mappings: no pages; restore maps the file shared again.
//!
//! Pages come from the `PAGEMAP_SCAN` ioctl (Linux 6.7+), or from `/proc/self/pagemap`
//! entries on older kernels. The vDSO block is recorded, not saved.

use crate::maps::{self, MapEntry, Maps};
use crate::objects::{self, Obj, ObjMap, Objects};
use crate::scratch::Scratch;
use limitless_image::format::{file_kind, vdso_kind, vma_kind, GuardRange, PagesHeader, VdsoArea, VdsoInfo, VmaInfo, PAGE, WINDOW_PAGES};
use limitless_sys as sys;

/// One memory area of the image.
#[derive(Clone, Copy, Default)]
pub struct Area {
    pub info: VmaInfo,
    pub name_off: u32,
    pub name_len: u32,
    /// Read its pages through `/proc/self/mem` (not readable in place, or file gone).
    pub via_mem: bool,
    /// Its guard ranges: `Scan::guards[guard_first..guard_first + info.n_guards]`.
    pub guard_first: u32,
    /// Registered for userfaultfd write-protection, and its offset (`/proc/self/maps`;
    /// for anonymous memory, where the area was first mapped), for dirty tracking.
    pub uffd_wp: bool,
    pub pgoff: u64,
}

/// One page window of the image.
#[derive(Clone, Copy, Default)]
pub struct Win {
    pub hdr: PagesHeader,
    pub area: u32,
}

/// Why an area cannot be saved.
pub struct Unsupported {
    pub start: u64,
    pub end: u64,
    pub name_off: u32,
    pub name_len: u32,
    pub why: &'static str,
}

pub enum ScanError {
    Unsupported(Unsupported),
    NoMem,
    Io(sys::Errno),
}

/// The result of a scan.
pub struct Scan {
    pub areas: &'static mut [Area],
    pub n_areas: usize,
    pub wins: &'static mut [Win],
    pub n_wins: usize,
    pub vdso: VdsoInfo,
    pub vdso_hash: u64,
    pub zero_pages: u64,
    pub pages: u64,
    /// Mappings of file objects (shared memory).
    pub objmaps: &'static mut [ObjMap],
    pub n_objmaps: usize,
    /// Guard-page ranges of all areas, in address order.
    pub guards: &'static mut [GuardRange],
    pub n_guards: usize,
}

impl Scan {
    /// The guard ranges of area `a`.
    pub fn guards_of(&self, a: &Area) -> &[GuardRange] {
        let f = a.guard_first as usize;
        &self.guards[f..f + a.info.n_guards as usize]
    }
}

const WINDOW: u64 = WINDOW_PAGES * PAGE;

/// Scans every area of `maps` except the scratch mapping itself and `hole` (the agent's
/// dirty-tracking baseline, or (0, 0)).
/// `self_contained`: store private file mappings whole, as if their files were gone.
pub fn scan(
    maps: &Maps,
    s: &mut Scratch,
    objs: &mut Objects,
    max_wins: usize,
    self_contained: bool,
    hole: (u64, u64),
) -> Result<Scan, ScanError> {
    let areas = s.array::<Area>(maps.n * 2 + 2).ok_or(ScanError::NoMem)?;
    let objmaps = s.array::<ObjMap>(maps.n + 1).ok_or(ScanError::NoMem)?;
    let wins = s.array::<Win>(max_wins).ok_or(ScanError::NoMem)?;
    let regions = s.array::<sys::PageRegion>(4096).ok_or(ScanError::NoMem)?;
    let membuf = s.array::<u8>(WINDOW as usize).ok_or(ScanError::NoMem)?;
    let pagemap = s.array::<u64>(4096).ok_or(ScanError::NoMem)?;
    let guards = s.array::<GuardRange>(maps.n + 4096).ok_or(ScanError::NoMem)?;
    let mut sc = Scan {
        areas,
        n_areas: 0,
        wins,
        n_wins: 0,
        vdso: VdsoInfo::zeroed(),
        vdso_hash: 0,
        zero_pages: 0,
        pages: 0,
        objmaps,
        n_objmaps: 0,
        guards,
        n_guards: 0,
    };
    let pm = sys::openat(sys::AT_FDCWD, b"/proc/self/pagemap\0", sys::O_RDONLY | sys::O_CLOEXEC, 0).map_err(ScanError::Io)?;
    let mem = sys::openat(sys::AT_FDCWD, b"/proc/self/mem\0", sys::O_RDONLY | sys::O_CLOEXEC, 0).map_err(ScanError::Io)?;
    let mut ctx = Ctx { pm, mem, use_scan: true, swap: None, regions, membuf, pagemap };
    let r = (|| {
        for e in maps.entries[..maps.n].iter() {
            let name = maps.name(e);
            if let Some(k) = special(name) {
                if k != vdso_kind::NONE {
                    let n = sc.vdso.count as usize;
                    if n < 4 {
                        sc.vdso.areas[n] = VdsoArea { kind: k, reserved: 0, start: e.start, len: e.end - e.start };
                        sc.vdso.count += 1;
                    }
                    if k == vdso_kind::VDSO {
                        // SAFETY: the vDSO is mapped readable at [start, end).
                        let code = unsafe { core::slice::from_raw_parts(e.start as *const u8, (e.end - e.start) as usize) };
                        sc.vdso_hash = limitless_image::format::fnv1a(code);
                    }
                }
                continue;
            }
            // Cut the scratch mapping and `hole` out of any area that contains them.
            let pieces = cut(e.start, e.end, [(s.base as u64, (s.base + s.len) as u64), hole]);
            for (a, b) in pieces {
                if a < b {
                    let mut piece = *e;
                    piece.pgoff += a - e.start;
                    piece.start = a;
                    piece.end = b;
                    add_area(&mut sc, &mut ctx, maps, objs, &piece, self_contained)?;
                }
            }
        }
        Ok(())
    })();
    let _ = sys::close(pm);
    let _ = sys::close(mem);
    r.map(|_| sc)
}

/// `[start, end)` without the (disjoint) ranges `holes`: up to three pieces, empty ones
/// as (0, 0).
fn cut(start: u64, end: u64, mut holes: [(u64, u64); 2]) -> [(u64, u64); 3] {
    if holes[0].0 > holes[1].0 {
        holes.swap(0, 1);
    }
    let mut out = [(0, 0); 3];
    let (mut n, mut at) = (0, start);
    for (hb, he) in holes {
        if hb >= he || he <= at || hb >= end {
            continue;
        }
        if hb > at {
            out[n] = (at, hb);
            n += 1;
        }
        at = he;
    }
    if at < end {
        out[n] = (at, end);
    }
    out
}

fn special(name: &[u8]) -> Option<u32> {
    match name {
        b"[vvar]" => Some(vdso_kind::VVAR),
        b"[vvar_vclock]" => Some(vdso_kind::VVAR_VCLOCK),
        b"[vdso]" => Some(vdso_kind::VDSO),
        b"[vsyscall]" | b"[uprobes]" => Some(vdso_kind::NONE),
        _ => None,
    }
}

struct Ctx {
    pm: i32,
    mem: i32,
    use_scan: bool,
    /// Whether swap holds pages: unknown (None) until asked.
    swap: Option<bool>,
    regions: &'static mut [sys::PageRegion],
    membuf: &'static mut [u8],
    pagemap: &'static mut [u64],
}

impl Ctx {
    fn swap_in_use(&mut self) -> bool {
        *self.swap.get_or_insert_with(crate::process::swap_in_use)
    }
}

fn unsupported(e: &MapEntry, why: &'static str) -> ScanError {
    ScanError::Unsupported(Unsupported { start: e.start, end: e.end, name_off: e.name_off, name_len: e.name_len, why })
}

/// What to keep of an area's pages.
#[derive(Clone, Copy, PartialEq)]
enum Want {
    Nothing,
    /// Present or swapped anonymous pages, skipping all-zero ones.
    Anon,
    /// Copy-on-write pages of a private file mapping.
    Cow,
    /// Every page with non-zero content, read through /proc/self/mem.
    All,
}

fn add_area(sc: &mut Scan, cx: &mut Ctx, maps: &Maps, objs: &mut Objects, e: &MapEntry, self_contained: bool) -> Result<(), ScanError> {
    let name = maps.name(e);
    let mut info = VmaInfo::zeroed();
    info.start = e.start;
    info.end = e.end;
    info.prot = e.prot;
    info.dev = e.dev;
    info.ino = e.ino;
    info.flags = e.flags;
    let mut via_mem = e.prot & 1 == 0;
    let want;
    let deleted = name.ends_with(b" (deleted)");
    if e.shared && name.starts_with(b"/SYSV") {
        return Err(unsupported(e, "System V shared memory (not supported yet; memfd and MAP_SHARED|MAP_ANONYMOUS are)"));
    }
    if e.shared && (objects::is_shm(name) || deleted) {
        // Shared memory: the object's contents go into the image once; every mapping of it
        // maps the restored object again.
        let k = objects::kind_of(name);
        let extent = e.pgoff + (e.end - e.start);
        let id = match objs.find(e.dev, e.ino) {
            Some(o) => {
                if o.fd < 0 {
                    o.size = o.size.max(extent);
                }
                o.id
            }
            None => {
                let o = Obj { kind: k, dev: e.dev, ino: e.ino, size: extent, mode: 0o600, fd: -1, ..Obj::default() };
                let i = objs.add(o, objects::display_name(name)).ok_or(ScanError::NoMem)?;
                objs.list[i].id
            }
        };
        if objs
            .find(e.dev, e.ino)
            .is_some_and(|o| o.size > objects::MAX_SHM || (o.kind == file_kind::DELETED && o.size > objects::MAX_DELETED))
        {
            return Err(unsupported(e, "shared memory too large to carry in an image"));
        }
        // Without an fd the contents are found with mincore, which does not see pages of
        // shared memory that went to swap: refuse rather than lose them.
        if objs.find(e.dev, e.ino).is_some_and(|o| o.fd < 0) && cx.swap_in_use() {
            return Err(unsupported(
                e,
                "shared memory with no open fd while swap is in use (swapped pages cannot be found; keep its memfd open)",
            ));
        }
        if sc.n_objmaps == sc.objmaps.len() || sc.n_areas == sc.areas.len() {
            return Err(ScanError::NoMem);
        }
        sc.objmaps[sc.n_objmaps] = ObjMap { start: e.start, end: e.end, pgoff: e.pgoff, obj: id, readable: e.prot & 1 != 0 };
        sc.n_objmaps += 1;
        info.kind = vma_kind::SHM;
        info.pgoff = e.pgoff;
        sc.areas[sc.n_areas] =
            Area { info, name_off: e.name_off, name_len: e.name_len, via_mem: false, guard_first: 0, uffd_wp: e.uffd_wp, pgoff: e.pgoff };
        sc.n_areas += 1;
        return Ok(());
    }
    if e.shared {
        if e.ino == 0 || !name.starts_with(b"/") {
            return Err(unsupported(e, "a shared mapping of a special object (not supported)"));
        }
        let st = stat_path(name).ok_or_else(|| unsupported(e, "a shared file mapping whose file cannot be found again"))?;
        if st.dev != e.dev || st.ino != e.ino {
            return Err(unsupported(e, "a shared file mapping whose file was replaced"));
        }
        info.kind = vma_kind::FILE_SHARED;
        info.pgoff = e.pgoff;
        info.file_size = st.size as u64;
        info.mtime_sec = st.mtime.sec;
        info.mtime_nsec = st.mtime.nsec as u32;
        want = Want::Nothing;
    } else if e.ino == 0 {
        info.kind = match name {
            b"[heap]" => vma_kind::HEAP,
            b"[stack]" => vma_kind::STACK,
            _ => vma_kind::ANON,
        };
        want = Want::Anon;
    } else if name == b"/dev/zero" {
        info.kind = vma_kind::ANON;
        want = Want::Anon;
    } else if name.starts_with(b"/") {
        info.pgoff = e.pgoff;
        match (deleted, stat_path(name)) {
            (false, Some(st))
                if !self_contained
                    && st.dev == e.dev
                    && st.ino == e.ino
                    && st.mode & sys::S_IFMT == sys::S_IFREG
                    && !crate::mapped::is_image(e, name) =>
            {
                info.kind = vma_kind::FILE_PRIVATE;
                info.file_size = st.size as u64;
                info.mtime_sec = st.mtime.sec;
                info.mtime_nsec = st.mtime.nsec as u32;
                want = Want::Cow;
            }
            _ => {
                info.kind = vma_kind::FILE_GONE;
                via_mem = true;
                want = Want::All;
            }
        }
    } else {
        return Err(unsupported(e, "a mapping of a special file or device is not supported"));
    }
    // One area with the one before (the anonymous memory both become), or a new one.
    let extend = info.kind == vma_kind::FILE_GONE && extends_gone(sc, e);
    if !extend && sc.n_areas == sc.areas.len() {
        return Err(ScanError::NoMem);
    }
    let ai = (sc.n_areas - extend as usize) as u32;
    let first_win = sc.n_wins;
    let guard_first = sc.n_guards;
    match want {
        Want::Nothing => {}
        Want::All => scan_all(sc, cx, e, ai)?,
        Want::Anon | Want::Cow => scan_present(sc, cx, e, ai, want, via_mem)?,
    }
    let pages: u64 = sc.wins[first_win..sc.n_wins].iter().map(|w| w.hdr.count as u64).sum();
    sc.pages += pages;
    if extend {
        let a = &mut sc.areas[ai as usize].info;
        a.end = e.end;
        a.pages += pages;
        return Ok(());
    }
    info.pages = pages;
    info.n_guards = (sc.n_guards - guard_first) as u32;
    sc.areas[sc.n_areas] = Area {
        info,
        name_off: e.name_off,
        name_len: e.name_len,
        via_mem,
        guard_first: guard_first as u32,
        uffd_wp: e.uffd_wp,
        pgoff: e.pgoff,
    };
    sc.n_areas += 1;
    Ok(())
}

/// Whether `e`, a private mapping of a file that is gone (or of an image's page data, see
/// [`crate::mapped`]), goes on the last area: a mapping of the same file right before it,
/// with the same protection and flags and no guard pages. Both are stored whole and
/// restored as anonymous memory, where the kernel would merge them anyway; and `restore
/// --map`, which maps each page window of an area separately, leaves one mapping per
/// window: stored as one area, the program's mapping is one again, as it was.
fn extends_gone(sc: &Scan, e: &MapEntry) -> bool {
    let Some(p) = sc.n_areas.checked_sub(1).map(|i| &sc.areas[i].info) else { return false };
    p.kind == vma_kind::FILE_GONE
        && p.end == e.start
        && (p.dev, p.ino) == (e.dev, e.ino)
        && p.prot == e.prot
        && p.flags == e.flags
        && p.n_guards == 0
}

fn stat_path(name: &[u8]) -> Option<sys::Stat> {
    let mut buf = [0u8; maps::PATH_BUF];
    let mut st = sys::Stat::default();
    sys::fstatat(sys::AT_FDCWD, maps::c_path(name, &mut buf)?, &mut st, 0).ok()?;
    Some(st)
}

fn add_page(sc: &mut Scan, addr: u64, ai: u32, e: &MapEntry) -> Result<(), ScanError> {
    let key = addr & !(WINDOW - 1);
    if sc.n_wins > 0 {
        let w = &mut sc.wins[sc.n_wins - 1];
        if w.area == ai && w.hdr.start <= addr && addr < w.hdr.start + w.hdr.npages as u64 * PAGE {
            let i = ((addr - w.hdr.start) / PAGE) as u32;
            if !w.hdr.has(i) {
                w.hdr.set(i);
                w.hdr.count += 1;
            }
            return Ok(());
        }
    }
    if sc.n_wins == sc.wins.len() {
        return Err(ScanError::NoMem);
    }
    let start = key.max(e.start);
    let end = (key + WINDOW).min(e.end);
    let mut hdr = PagesHeader { start, npages: ((end - start) / PAGE) as u32, ..PagesHeader::zeroed() };
    hdr.set(((addr - start) / PAGE) as u32);
    hdr.count = 1;
    sc.wins[sc.n_wins] = Win { hdr, area: ai };
    sc.n_wins += 1;
    Ok(())
}

/// Adds a guard range to the current area, whose ranges start at `first`.
fn add_guard(sc: &mut Scan, first: usize, start: u64, end: u64) -> Result<(), ScanError> {
    if sc.n_guards > first && sc.guards[sc.n_guards - 1].end == start {
        sc.guards[sc.n_guards - 1].end = end;
        return Ok(());
    }
    if sc.n_guards == sc.guards.len() {
        return Err(ScanError::NoMem);
    }
    sc.guards[sc.n_guards] = GuardRange { start, end };
    sc.n_guards += 1;
    Ok(())
}

/// Whether the page at `addr` (readable memory) is all zero bytes.
fn page_is_zero(addr: u64) -> bool {
    // SAFETY: the caller only passes present pages of readable areas; the program's threads
    // are frozen, so nothing unmaps them meanwhile.
    let words = unsafe { core::slice::from_raw_parts(addr as *const u64, PAGE as usize / 8) };
    words.chunks_exact(8).all(|c| c.iter().fold(0, |a, &w| a | w) == 0)
}

fn scan_present(sc: &mut Scan, cx: &mut Ctx, e: &MapEntry, ai: u32, want: Want, via_mem: bool) -> Result<(), ScanError> {
    let check_zero = want == Want::Anon && !via_mem;
    let first = sc.n_guards;
    let keep = |sc: &mut Scan, addr: u64| -> Result<(), ScanError> {
        if check_zero && page_is_zero(addr) {
            sc.zero_pages += 1;
            return Ok(());
        }
        add_page(sc, addr, ai, e)
    };
    if cx.use_scan {
        // Guard pages report as SWAPPED|GUARD: they come back as their own regions, recorded
        // as guard ranges and never read (reading one faults).
        let any = sys::PAGE_IS_PRESENT | sys::PAGE_IS_SWAPPED;
        let skip = match want {
            Want::Anon => sys::PAGE_IS_PFNZERO,
            _ => sys::PAGE_IS_FILE,
        };
        let mut at = e.start;
        while at < e.end {
            let mut arg = sys::PmScanArg {
                size: core::mem::size_of::<sys::PmScanArg>() as u64,
                flags: 0,
                start: at,
                end: e.end,
                walk_end: 0,
                vec: cx.regions.as_mut_ptr() as u64,
                vec_len: cx.regions.len() as u64,
                max_pages: 0,
                category_inverted: skip,
                category_mask: skip,
                category_anyof_mask: any,
                return_mask: any | sys::PAGE_IS_GUARD,
            };
            // SAFETY: PAGEMAP_SCAN reads `arg` and writes at most vec_len regions to `regions`.
            match unsafe { sys::ioctl(cx.pm, sys::PAGEMAP_SCAN, &mut arg as *mut sys::PmScanArg as usize) } {
                Ok(n) => {
                    for r in &cx.regions[..n] {
                        if r.categories & sys::PAGE_IS_GUARD != 0 {
                            add_guard(sc, first, r.start, r.end)?;
                            continue;
                        }
                        let mut p = r.start;
                        while p < r.end {
                            keep(sc, p)?;
                            p += PAGE;
                        }
                    }
                    let next = sys::pagemap_scan_next(&arg, &cx.regions[..n]);
                    if next <= at {
                        break;
                    }
                    at = next;
                }
                Err(sys::Errno::ENOTTY) | Err(sys::Errno::EINVAL) | Err(sys::Errno::EOPNOTSUPP) if at == e.start => {
                    cx.use_scan = false;
                    break;
                }
                Err(e) => return Err(ScanError::Io(e)),
            }
        }
        if cx.use_scan {
            return Ok(());
        }
    }
    // /proc/self/pagemap: bit 63 present, 62 swapped, 61 file-page or shared-anon.
    let mut at = e.start;
    while at < e.end {
        let n = (((e.end - at) / PAGE) as usize).min(cx.pagemap.len());
        let bytes = n * 8;
        // SAFETY: `pagemap` is a scratch array of at least n u64 entries.
        let buf = unsafe { core::slice::from_raw_parts_mut(cx.pagemap.as_mut_ptr() as *mut u8, bytes) };
        let got = sys::pread(cx.pm, buf, at / PAGE * 8).map_err(ScanError::Io)?;
        if got < 8 {
            break;
        }
        for i in 0..got / 8 {
            let v = cx.pagemap[i];
            let (present, swapped, file) = (v >> 63 & 1 == 1, v >> 62 & 1 == 1, v >> 61 & 1 == 1);
            let take = match want {
                Want::Anon => present || swapped,
                _ => (present && !file) || swapped,
            };
            if take {
                keep(sc, at + i as u64 * PAGE)?;
            }
        }
        at += (got / 8) as u64 * PAGE;
    }
    Ok(())
}

/// Every non-zero page of an area, read through `/proc/self/mem` (pages past the end of a
/// file read as errors and are left out).
fn scan_all(sc: &mut Scan, cx: &mut Ctx, e: &MapEntry, ai: u32) -> Result<(), ScanError> {
    let mut at = e.start;
    while at < e.end {
        let n = (e.end - at).min(WINDOW) as usize;
        let got = read_mem(cx.mem, &mut cx.membuf[..n], at);
        for i in 0..n / PAGE as usize {
            let pg = &cx.membuf[i * PAGE as usize..(i + 1) * PAGE as usize];
            if i < got && pg.iter().any(|&b| b != 0) {
                add_page(sc, at + i as u64 * PAGE, ai, e)?;
            } else if i < got {
                sc.zero_pages += 1;
            }
        }
        at += n as u64;
    }
    Ok(())
}

/// Reads `buf.len()` bytes of this process's memory at `addr` through `/proc/self/mem`;
/// pages that cannot be read (past the end of a file) read as zeros. Returns the number of
/// pages in `buf`.
pub fn read_mem(mem: i32, buf: &mut [u8], addr: u64) -> usize {
    let mut done = 0;
    while done < buf.len() {
        match sys::pread(mem, &mut buf[done..], addr + done as u64) {
            Ok(0) | Err(_) => {
                // Skip the unreadable page and try the next one.
                let page = done / PAGE as usize;
                let end = ((page + 1) * PAGE as usize).min(buf.len());
                buf[page * PAGE as usize..end].fill(0);
                done = end;
            }
            Ok(n) => done += n,
        }
    }
    buf.len() / PAGE as usize
}

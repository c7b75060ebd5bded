//! Step 4 of stage 1: the page data, read into place and checked.
//!
//! Every page record is one of the plan's checks ([`PlanCheck`]), and two threads share
//! them: this one and a helper started with raw `clone` (when there is enough to share).
//! - A record read in place from an image file: a thread takes the next one, reads its
//!   payload (its pages header and pages, at most 1 MiB and a bit) into a buffer of its own
//!   with one `pread`, checks its XXH3-128 while the bytes are still in the cache (from
//!   format 1.4; older images' records are checked by the supervisor), then copies each run
//!   of the record from there into place.
//! - A record the supervisor reads itself ([`pcf::STAGED`]: compressed, or from an object
//!   store), checked and decompressed there: the supervisor puts its pages in a slot of a
//!   shared ring (a memfd) and sends a token naming the record and the slot on the data
//!   pipe. Once done with the records read in place, each thread reads tokens, copies the
//!   runs from the slot and hands the slot back on the release pipe, until an end token.
//!
//! A run goes into place in one of two ways:
//! - Anonymous areas ([`pvf::COPY`]) are registered with a userfaultfd for missing pages,
//!   and each run is copied with `UFFDIO_COPY`: the kernel allocates each page and fills it
//!   from the buffer or slot, with no clearing first.
//!   Unprivileged (`UFFD_USER_MODE_ONLY`); closing the userfaultfd afterwards leaves the
//!   areas as plain anonymous memory.
//! - Otherwise (other areas, or where userfaultfd is not allowed, as under Docker's default
//!   seccomp profile): `MADV_POPULATE_WRITE`, then a copy.
//!
//! Most of the time goes to the kernel allocating pages, to copying from the page cache and
//! to the checksum. Measured on this 2-vCPU VM with a Rust program doing the same calls on
//! a page-cached 1 GiB file in 1 MiB records, two threads: `UFFDIO_COPY` from a mapping of
//! the file 275-282 ms without any check; through a buffer 256-290 ms without a check,
//! 297-327 ms with XXH3-128, 395-401 ms with BLAKE3. Allocating and clearing 1 GiB alone
//! takes 150-200 ms on two threads there.

use super::{entry, report, Stage1};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use limitless_image::diff;
use limitless_image::format::{PagesHeader, PAGE, WINDOW_PAGES};
use limitless_image::plan::{pcf, pk, prf, pvf, PlanCheck, PlanHeader, PlanRun, PlanVma, RING_SLOT_LEN, TOKEN_END};
use limitless_sys as sys;

/// Below this many bytes of page data, one thread does it all.
const SHARE_FROM: u64 = 32 << 20;
/// The helper's stack (it makes system calls and computes checksums).
const HELPER_STACK: usize = 64 * 1024;
/// A thread's buffer: the pages header at the end of the first page, so that the pages
/// start on a page boundary (`UFFDIO_COPY` copies from page-aligned memory), then a page
/// window's pages.
const BUF_LEN: usize = PAGE as usize + (WINDOW_PAGES * PAGE) as usize;

/// What both threads share.
struct Work<'a> {
    s: &'a Stage1,
    h: &'a PlanHeader,
    /// The next check to take.
    next: AtomicU64,
    /// The userfaultfd the `COPY` areas are registered with, or -1.
    uffd: i32,
    /// The ring's mapping (read-only), or 0.
    ring: usize,
    /// Whether any check is staged (then each thread reads tokens until a `TOKEN_END`).
    staged: bool,
    /// `TOKEN_END`s read so far.
    ends: AtomicU32,
    /// Records mapped from their files ([`map_runs`]).
    mapped: AtomicU64,
}

/// Reads every run of the plan into place, checking the records read in place; returns
/// the bytes read and whether any record was mapped from its file instead.
pub fn read_all(s: &Stage1, h: &PlanHeader) -> (u64, bool) {
    let total: u64 = (0..h.n_runs).map(|i| entry::<PlanRun>(s, h.runs_off, i).len).sum();
    let staged = (0..h.n_checks).any(|k| entry::<PlanCheck>(s, h.checks_off, k).flags & pcf::STAGED != 0);
    let ring_len = (h.ring_slots as u64 * RING_SLOT_LEN) as usize;
    let ring = if staged {
        if h.ring_fd < 0 || h.ring_slots == 0 {
            report::fail("the restore plan is inconsistent (staged records without a ring)");
        }
        // Not populated: that would allocate (and clear) the whole ring in the memfd, 12 MiB,
        // even for a few small records. Restores of a 1 MiB program's compressed image took
        // 12.9-16.6 ms with MAP_POPULATE and 4.1-6.0 ms without; of 64 and 256 MiB,
        // the same either way (four alternating pairs each, release builds).
        // SAFETY: a new read-only shared mapping of the ring memfd at an address the kernel
        // picks (a free one: it cannot replace any of the program's areas); only the kernel
        // reads it, in UFFDIO_COPY, or a copy reads a slot the supervisor has filled.
        match unsafe { sys::mmap(0, ring_len, sys::PROT_READ, sys::MAP_SHARED, h.ring_fd, 0) } {
            Ok(a) => a,
            Err(e) => report::fail_errno("cannot map the page data ring", e),
        }
    } else {
        0
    };
    let uffd = register_copy_areas(s, h);
    let w = Work { s, h, next: AtomicU64::new(0), uffd, ring, staged, ends: AtomicU32::new(0), mapped: AtomicU64::new(0) };
    let tid = AtomicU32::new(0);
    let mut stack = core::mem::MaybeUninit::<[u8; HELPER_STACK]>::uninit();
    let mut helper = false;
    if total >= SHARE_FROM {
        let top = (stack.as_mut_ptr() as usize + HELPER_STACK) & !15;
        // SAFETY: `stack` is this frame's, untouched by this thread until `join_thread`
        // below has seen the helper end; `helper_main` only runs `take_work` on `w`
        // (shared through atomics and read-only plan memory) and ends with `exit_thread`;
        // `tid` and `w` live in this frame until then too.
        helper = unsafe { sys::spawn_thread(top, &tid, helper_main, &w as *const Work as usize) }.is_ok();
    }
    take_work(&w);
    if helper {
        sys::join_thread(&tid);
    }
    // The supervisor sends two `TOKEN_END`s, one for each thread that may read tokens;
    // take those no thread took, so that the go-ahead byte is next.
    for _ in w.ends.load(Ordering::Relaxed)..2 {
        if read_token(h.data_fd) != TOKEN_END {
            report::fail("the supervisor sent page data the plan does not have");
        }
    }
    if ring != 0 {
        // SAFETY: unmaps exactly the ring mapped above; nothing reads it any more.
        let _ = unsafe { sys::munmap(ring, ring_len) };
    }
    if uffd >= 0 {
        // Unregisters every area: plain anonymous memory again.
        let _ = sys::close(uffd);
    }
    (total, w.mapped.load(Ordering::Relaxed) > 0)
}

/// Opens a userfaultfd and registers every [`pvf::COPY`] area with it for missing pages.
/// Returns it, or -1 (and nothing registered) where that is not possible.
fn register_copy_areas(s: &Stage1, h: &PlanHeader) -> i32 {
    let copy_area = |v: &PlanVma| v.kind == pk::ANON && v.flags & pvf::COPY != 0;
    if !(0..h.n_vmas as u64).any(|i| copy_area(&entry(s, h.vmas_off, i))) {
        return -1;
    }
    let Ok(uffd) = sys::userfaultfd_api(sys::O_CLOEXEC as usize, 0) else { return -1 };
    let mut ok = true;
    for i in 0..h.n_vmas as u64 {
        let v: PlanVma = entry(s, h.vmas_off, i);
        if !ok || !copy_area(&v) {
            continue;
        }
        // The whole area, as mapped: registering part of one would split it in two.
        // SAFETY: the range is an area this restorer mapped, which nothing touches until
        // its data is in (no fault in it waits for the missing pages).
        ok = unsafe { sys::uffd_register(uffd, v.start, v.len, sys::UFFDIO_REGISTER_MODE_MISSING) }
            .is_ok_and(|ioctls| ioctls & (1 << 3) != 0); // _UFFDIO_COPY
    }
    if !ok {
        // Closing unregisters whatever was registered.
        let _ = sys::close(uffd);
        return -1;
    }
    uffd
}

/// Fills the missing pages of `dst..dst + len` (in a registered area) from `src` with
/// `UFFDIO_COPY`.
fn uffd_copy(uffd: i32, dst: u64, src: u64, len: u64) {
    let mut done = 0u64;
    while done < len {
        let mut c = sys::UffdioCopy { dst: dst + done, src: src + done, len: len - done, mode: 0, copy: 0 };
        // SAFETY: UFFDIO_COPY reads and writes the structure passed; it fills missing pages
        // of `dst..dst + len`, inside a registered area nothing else uses, from `src`,
        // which the caller keeps readable for that long.
        match unsafe { sys::ioctl(uffd, sys::UFFDIO_COPY, &mut c as *mut sys::UffdioCopy as usize) } {
            Ok(_) => done = len,
            // Part done (or the address space was changing): go on from there.
            Err(sys::Errno::EAGAIN) if c.copy > 0 => done += c.copy as u64,
            Err(sys::Errno::EAGAIN | sys::Errno::EINTR) => sys::sched_yield(),
            Err(e) => report::fail_at_errno("cannot fill memory (UFFDIO_COPY) at", dst + done, e),
        }
    }
}

extern "C" fn helper_main(w: usize) -> ! {
    // SAFETY: `read_all` passes a pointer to its `Work`, which outlives this thread.
    take_work(unsafe { &*(w as *const Work) });
    sys::exit_thread(0)
}

/// One thread's share: records read in place, then records from the ring.
fn take_work(w: &Work) {
    take_checks(w);
    if w.staged {
        take_staged(w);
    }
}

/// Places the records the supervisor passes through the ring, as their tokens arrive,
/// until a `TOKEN_END`; returns each slot once its runs are in place.
fn take_staged(w: &Work) {
    loop {
        let t = read_token(w.h.data_fd);
        if t == TOKEN_END {
            w.ends.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let (k, slot) = (t as u32 as u64, (t >> 32) as u32);
        if k >= w.h.n_checks || slot >= w.h.ring_slots {
            report::fail("the supervisor sent page data the plan does not have");
        }
        let c: PlanCheck = entry(w.s, w.h.checks_off, k);
        if c.flags & pcf::STAGED == 0 {
            report::fail("the supervisor sent page data the plan does not have");
        }
        check_shape(w, &c);
        place_runs(w, &c, w.ring + (slot as u64 * RING_SLOT_LEN) as usize, true);
        if sys::write_all(w.h.release_fd, &slot.to_le_bytes()).is_err() {
            report::fail("the supervisor stopped while the page data was read");
        }
    }
}

/// Reads one token (eight bytes) from the data pipe.
fn read_token(fd: i32) -> u64 {
    let mut b = [0u8; 8];
    let mut got = 0;
    while got < b.len() {
        match sys::read(fd, &mut b[got..]) {
            Ok(0) => report::fail("the page data ended early (the supervisor stopped)"),
            Ok(n) => got += n,
            Err(sys::Errno::EINTR) => {}
            Err(e) => report::fail_errno("cannot read from the supervisor", e),
        }
    }
    u64::from_le_bytes(b)
}

/// Takes the checks of records read in place until none are left, reading, checking and
/// placing each record.
fn take_checks(w: &Work) {
    if w.next.load(Ordering::Relaxed) >= w.h.n_checks {
        return;
    }
    let buf = thread_buffer();
    // Where the pages of a record stored as changes are rebuilt before `UFFDIO_COPY`.
    let mut scratch = 0usize;
    loop {
        let k = w.next.fetch_add(1, Ordering::Relaxed);
        if k >= w.h.n_checks {
            break;
        }
        let c: PlanCheck = entry(w.s, w.h.checks_off, k);
        if c.flags & pcf::STAGED != 0 {
            continue;
        }
        check_shape(w, &c);
        read_checked(w, &c, buf);
        if c.flags & pcf::DIFF != 0 {
            if scratch == 0 {
                scratch = thread_buffer();
            }
            place_changes(w, &c, buf, scratch);
            continue;
        }
        match if c.flags & pcf::MAP != 0 { map_runs(w, &c) } else { Mapped::No } {
            Mapped::Yes => {
                w.mapped.fetch_add(1, Ordering::Relaxed);
            }
            Mapped::No => place_runs(w, &c, buf, true),
            Mapped::Replaced => place_runs(w, &c, buf, false),
        }
    }
    for b in [buf, scratch].into_iter().filter(|&b| b != 0) {
        // SAFETY: unmaps exactly a buffer mapped above, which nothing refers to any more.
        let _ = unsafe { sys::munmap(b, BUF_LEN) };
    }
}

/// A new buffer of [`BUF_LEN`] bytes for the calling thread alone, which unmaps it.
fn thread_buffer() -> usize {
    // SAFETY: a new private anonymous mapping at an address the kernel picks (a free one:
    // it cannot replace any of the program's areas).
    match unsafe { sys::mmap(0, BUF_LEN, sys::PROT_READ | sys::PROT_WRITE, sys::MAP_PRIVATE | sys::MAP_ANONYMOUS, -1, 0) } {
        Ok(b) => b,
        Err(e) => report::fail_errno("cannot get a buffer for the page data", e),
    }
}

/// Fails unless check `c`'s payload fits a window and its runs are in the plan.
fn check_shape(w: &Work, c: &PlanCheck) {
    let head = PagesHeader::SIZE as u64;
    if c.len < head || c.len > head + WINDOW_PAGES * PAGE || c.first_run.checked_add(c.n_runs as u64).is_none_or(|e| e > w.h.n_runs) {
        report::fail("the restore plan is inconsistent (a page record check)");
    }
}

/// What [`map_runs`] did.
enum Mapped {
    /// Every run of the record is mapped from its file.
    Yes,
    /// Nothing: the record's memory is as `map_vma` left it.
    No,
    /// Nothing, but the record's runs are now fresh anonymous memory that is not
    /// registered with the userfaultfd (a run's mapping failed part way).
    Replaced,
}

/// Maps the runs of check `c` ([`pcf::MAP`]), whose payload [`read_checked`] has read and
/// checked, copy-on-write from its image file: the page cache's pages are shared until the
/// program writes one. Where the kernel refuses a mapping (a file system without `mmap`),
/// the caller copies the runs from the buffer instead.
///
/// The check reads the payload into a buffer, as a copying restore does, rather than
/// through a mapping of it. A first version hashed a populated read-only view of the
/// payload instead: restoring 1 GiB took 99-105 ms that way against 43-49 ms this way
/// (release builds, a cached image, `restore --map` of `mem.c 1024 random`), populating the
/// view holding the address space's lock that the other thread's `mmap` calls waited for.
fn map_runs(w: &Work, c: &PlanCheck) -> Mapped {
    let runs = c.first_run..c.first_run + c.n_runs as u64;
    for j in runs.clone() {
        let r = run_in(w, c, j);
        let placed = map_run(&r, c.fd);
        if placed.is_ok_and(|a| a == r.start as usize) {
            continue;
        }
        if j == c.first_run && placed.is_err() {
            return Mapped::No;
        }
        // Part of the record is mapped: make all of it plain anonymous memory again.
        for k in runs {
            let r = run_in(w, c, k);
            if let Err(e) = map_run(&r, -1) {
                report::fail_at_errno("cannot create the memory area at", r.start, e);
            }
        }
        return Mapped::Replaced;
    }
    Mapped::Yes
}

/// Maps run `r` read-write over its part of its area: from the image file `fd` at the
/// run's offset, or (`fd` -1) as fresh anonymous memory.
fn map_run(r: &PlanRun, fd: i32) -> sys::Result<usize> {
    let (flags, off) = if fd < 0 { (sys::MAP_ANONYMOUS, 0) } else { (0, r.file_off) };
    // SAFETY: replaces part of an area this restorer created for the pages of one record
    // (the supervisor maps only runs inside anonymous, writable-for-now areas, and each
    // record goes to one thread, which placed nothing else there yet) with a private
    // mapping of the same bytes in the file, or with fresh memory; the program's
    // protection is set on the whole area in `finish_vma`.
    unsafe {
        sys::mmap(r.start as usize, r.len as usize, sys::PROT_READ | sys::PROT_WRITE, sys::MAP_PRIVATE | sys::MAP_FIXED | flags, fd, off)
    }
}

/// Run `j` of check `c`, once it is known to lie inside the record's pages: its `file_off`
/// a whole number of pages past the pages header, in the same file.
fn run_in(w: &Work, c: &PlanCheck, j: u64) -> PlanRun {
    let head = PagesHeader::SIZE as u64;
    let r: PlanRun = entry(w.s, w.h.runs_off, j);
    let at = r.file_off.checked_sub(c.file_off + head).filter(|a| a % PAGE == 0 && r.fd == c.fd);
    if at.filter(|a| a.checked_add(r.len).is_some_and(|e| e <= c.len - head)).is_none() {
        report::fail("the restore plan is inconsistent (a run outside its page record)");
    }
    r
}

/// Reads the payload of check `c` (its shape checked) into `buf` (`BUF_LEN` bytes of this
/// thread's) and checks its sum.
fn read_checked(w: &Work, c: &PlanCheck, buf: usize) {
    let head = PagesHeader::SIZE as u64;
    // The pages header goes at the end of the first page, the pages from the next one on.
    let payload = buf + (PAGE - head) as usize;
    let mut done = 0u64;
    while done < c.len {
        // SAFETY: `payload + done .. payload + c.len` lies inside this thread's buffer
        // (`c.len` was checked against a window above), which only this thread uses.
        let got = unsafe { sys::pread_raw(c.fd, payload + done as usize, (c.len - done) as usize, c.file_off + done) };
        match got {
            Ok(0) => report::fail("the page data ended early (the image is shorter than its index says)"),
            Ok(n) => done += n as u64,
            Err(sys::Errno::EINTR) => {}
            Err(e) => report::fail_at_errno("cannot read page data at image offset", c.file_off + done, e),
        }
    }
    if c.flags & pcf::VERIFY != 0 {
        // SAFETY: `c.len` bytes were just read into the buffer at `payload`.
        let bytes = unsafe { core::slice::from_raw_parts(payload as *const u8, c.len as usize) };
        if limitless_image::xxh::xxh3_128(bytes).to_le_bytes() != c.sum {
            let first: PlanRun = entry(w.s, w.h.runs_off, c.first_run);
            report::fail_at("image is corrupt: page data fails its checksum (damaged, or changed while it was read), for", first.start);
        }
    }
}

/// Rebuilds the pages of check `c` ([`pcf::DIFF`]), whose payload [`read_checked`] has
/// read into `buf` and checked, in place: each page's base is what its area holds (the
/// file a [`prf::FILE`] run's area maps, zeros in fresh anonymous memory) and its changed
/// words are written over it; in a userfaultfd-registered area the run is rebuilt in
/// `scratch` (`BUF_LEN` bytes of this thread's) and copied in. Fails unless the rebuilt
/// pages have the sum the record gives: the file may not be the one checkpointed.
fn place_changes(w: &Work, c: &PlanCheck, buf: usize, scratch: usize) {
    let head = PagesHeader::SIZE;
    let inconsistent = || -> ! { report::fail("the restore plan is inconsistent (a page record stored as changes)") };
    // SAFETY: `read_checked` read `c.len` bytes (at least a pages header, at most a window's
    // worth: `check_shape`) at one page minus the header into `buf`.
    let payload = unsafe { core::slice::from_raw_parts((buf + PAGE as usize - head) as *const u8, c.len as usize) };
    let h = PagesHeader::decode(payload).unwrap_or_else(|| inconsistent());
    let count = h.count as usize;
    let body = &payload[head..];
    let Some(file) = diff::parse(body, count) else {
        let first: PlanRun = entry(w.s, w.h.runs_off, c.first_run);
        report::fail_at("image is corrupt: page data stored as changes is malformed, for", first.start);
    };
    let mut sums = diff::Sums::default();
    let (mut k, mut at) = (0usize, diff::HEAD);
    for j in c.first_run..c.first_run + c.n_runs as u64 {
        let r: PlanRun = entry(w.s, w.h.runs_off, j);
        let pages = (r.len / PAGE) as usize;
        if r.fd != c.fd || !r.len.is_multiple_of(PAGE) || k + pages > count {
            inconsistent();
        }
        let copy = w.uffd >= 0 && r.flags & prf::COPY != 0;
        if !copy {
            // SAFETY: as in `place_runs`.
            let _ = unsafe { sys::madvise(r.start as usize, r.len as usize, sys::MADV_POPULATE_WRITE) };
        }
        for i in 0..pages {
            let based = diff::file_based(&file, k + i);
            if based && r.flags & prf::FILE == 0 {
                inconsistent();
            }
            let dst = if copy { scratch + i * PAGE as usize } else { (r.start + i as u64 * PAGE) as usize };
            // SAFETY: `dst` is a page of this thread's scratch buffer (`pages` is at most a
            // window: `k + pages <= count <= 256`), or a page of the run, which lies inside
            // an area this restorer mapped writable and no other thread writes (as in
            // `place_runs`).
            let page = unsafe { core::slice::from_raw_parts_mut(dst as *mut u8, PAGE as usize) };
            if copy || !based && r.flags & prf::FILE != 0 {
                // Zeros: a scratch page, or a page of a file mapping whose base is zeros.
                page.fill(0);
            }
            if !diff::apply_page(body, &mut at, page) || !sums.add(page) {
                inconsistent();
            }
        }
        if copy {
            uffd_copy(w.uffd, r.start, scratch as u64, r.len);
        }
        k += pages;
    }
    if k != count || at != body.len() {
        inconsistent();
    }
    if sums.finish() != diff::sum(body) {
        let first: PlanRun = entry(w.s, w.h.runs_off, c.first_run);
        report::fail_at(
            "page data stored as changes to a file the program had mapped does not rebuild: the file differs from the one checkpointed, for",
            first.start,
        );
    }
}

/// Copies the runs of check `c` into place from `base`, where its pages start one page in
/// (a thread's buffer, or a ring slot).
fn place_runs(w: &Work, c: &PlanCheck, base: usize, uffd: bool) {
    let head = PagesHeader::SIZE as u64;
    for j in c.first_run..c.first_run + c.n_runs as u64 {
        let r = run_in(w, c, j);
        // Where the run's bytes are in the payload: after the pages header, whole pages in.
        let at = r.file_off - (c.file_off + head);
        let src = base + PAGE as usize + at as usize;
        if uffd && w.uffd >= 0 && r.flags & prf::COPY != 0 {
            uffd_copy(w.uffd, r.start, src as u64, r.len);
        } else {
            // Allocate the run's pages in one call rather than one fault per page
            // (Linux 5.14+; where it fails the copy faults them in as before).
            // SAFETY: the run lies inside an area this restorer mapped writable (the
            // supervisor builds runs only inside areas flagged HAS_DATA), which no other
            // thread writes: each record goes to exactly one thread.
            let _ = unsafe { sys::madvise(r.start as usize, r.len as usize, sys::MADV_POPULATE_WRITE) };
            // SAFETY: as above for the destination; the source is `r.len` bytes of this
            // thread's buffer (checked above), and the two cannot overlap.
            unsafe { core::ptr::copy_nonoverlapping(src as *const u8, r.start as *mut u8, r.len as usize) };
        }
    }
}

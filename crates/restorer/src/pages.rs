//! Step 4 of stage 1: the page data, read into place.
//!
//! Page runs read at an offset in an image file are cut into pieces of [`PIECE`] bytes
//! that two threads take in turn: this one and a helper started with raw `clone` (when
//! there is enough to share). Most of the time goes to the kernel allocating and clearing
//! fresh pages and to copying from the page cache, and both scale with threads. Runs that
//! come through the data pipe arrive in order, so this thread reads them alone first, then
//! joins the helper on the pieces left.
//!
//! A piece goes into place in one of two ways:
//! - Anonymous areas whose data all comes from files ([`pvf::COPY`]) are registered with a
//!   userfaultfd for missing pages, and each piece is copied with `UFFDIO_COPY` from a
//!   read-only mapping of the image file: the kernel allocates each page and fills it from
//!   the page cache, with no clearing first. Unprivileged (`UFFD_USER_MODE_ONLY`); closing
//!   the userfaultfd afterwards leaves the areas as plain anonymous memory.
//! - Otherwise (other areas, or where userfaultfd is not allowed, as under Docker's default
//!   seccomp profile): `MADV_POPULATE_WRITE`, then `pread`.
//!
//! Measured with C programs doing the same calls on a page-cached 1 GiB file:
//! populate+`pread` 475-574 ms on one thread, 257-394 ms on two; `UFFDIO_COPY` 330-400 ms
//! on one, 174-233 ms on two.

use super::{entry, report, Stage1};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use limitless_image::plan::{pk, prf, pvf, PlanHeader, PlanRun, PlanVma};
use limitless_sys as sys;

/// Bytes a thread takes at a time.
const PIECE: u64 = 4 << 20;
/// Below this many bytes read at an offset, one thread does it all.
const SHARE_FROM: u64 = 32 << 20;
/// The helper's stack (it only makes system calls).
const HELPER_STACK: usize = 64 * 1024;

/// What both threads share.
struct Work<'a> {
    s: &'a Stage1,
    h: &'a PlanHeader,
    /// The next piece to take, counting the pieces of every offset run in plan order.
    next: AtomicU64,
    /// The userfaultfd the `COPY` areas are registered with, or -1.
    uffd: i32,
}

/// Reads every run of the plan into place; returns the bytes read.
pub fn read_all(s: &Stage1, h: &PlanHeader) -> u64 {
    let (mut total, mut at_offset) = (0u64, 0u64);
    for i in 0..h.n_runs {
        let r: PlanRun = entry(s, h.runs_off, i);
        total += r.len;
        if r.fd >= 0 {
            at_offset += r.len;
        }
    }
    let uffd = register_copy_areas(s, h);
    let w = Work { s, h, next: AtomicU64::new(0), uffd };
    let tid = AtomicU32::new(0);
    let mut stack = core::mem::MaybeUninit::<[u8; HELPER_STACK]>::uninit();
    let mut helper = false;
    if at_offset >= SHARE_FROM {
        let top = (stack.as_mut_ptr() as usize + HELPER_STACK) & !15;
        // SAFETY: `stack` is this frame's, untouched by this thread until `join_thread`
        // below has seen the helper end; `helper_main` only runs `take_pieces` on `w`
        // (shared through atomics and read-only plan memory) and ends with `exit_thread`;
        // `tid` and `w` live in this frame until then too.
        helper = unsafe { sys::spawn_thread(top, &tid, helper_main, &w as *const Work as usize) }.is_ok();
    }
    for i in 0..h.n_runs {
        let r: PlanRun = entry(s, h.runs_off, i);
        if r.fd < 0 {
            read_run(h.data_fd, false, &r);
        }
    }
    take_pieces(&w);
    if helper {
        sys::join_thread(&tid);
    }
    if uffd >= 0 {
        // Unregisters every area: plain anonymous memory again.
        let _ = sys::close(uffd);
    }
    total
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

/// Copies run `r` (inside a registered `COPY` area) from its image file with `UFFDIO_COPY`:
/// from a read-only mapping of the file, or where the file cannot be mapped, from a buffer
/// it is read into.
fn copy_run(uffd: i32, r: &PlanRun) {
    const PAGE: u64 = 4096;
    let skip = r.file_off % PAGE;
    let map_len = (r.len + skip) as usize;
    // SAFETY: a new read-only shared mapping of the image file at an address the kernel
    // picks (a free one: it cannot replace any of the program's areas); only the kernel
    // reads it, in UFFDIO_COPY (a file cut short makes that fail with EFAULT, not SIGBUS).
    if let Ok(a) = unsafe { sys::mmap(0, map_len, sys::PROT_READ, sys::MAP_SHARED | sys::MAP_POPULATE, r.fd, r.file_off - skip) } {
        uffd_copy(uffd, r.start, a as u64 + skip, r.len);
        // SAFETY: unmaps exactly the mapping made above, which nothing refers to any more.
        let _ = unsafe { sys::munmap(a, map_len) };
        return;
    }
    // SAFETY: a new private anonymous buffer at an address the kernel picks; only this
    // function uses it, and unmaps it at the end.
    let buf = match unsafe { sys::mmap(0, r.len as usize, sys::PROT_READ | sys::PROT_WRITE, sys::MAP_PRIVATE | sys::MAP_ANONYMOUS, -1, 0) }
    {
        Ok(b) => b,
        Err(e) => report::fail_at_errno("cannot get a buffer for the page data of", r.start, e),
    };
    read_run(r.fd, true, &PlanRun { start: buf as u64, ..*r });
    uffd_copy(uffd, r.start, buf as u64, r.len);
    // SAFETY: as above, for the buffer.
    let _ = unsafe { sys::munmap(buf, r.len as usize) };
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
    take_pieces(unsafe { &*(w as *const Work) });
    sys::exit_thread(0)
}

/// Takes pieces of the offset runs until none are left, reading each into place.
fn take_pieces(w: &Work) {
    // This thread's place in the plan: pieces only move forward, so it never looks back.
    let (mut i, mut first) = (0u64, 0u64);
    loop {
        let k = w.next.fetch_add(1, Ordering::Relaxed);
        loop {
            if i >= w.h.n_runs {
                return;
            }
            let r: PlanRun = entry(w.s, w.h.runs_off, i);
            let n = if r.fd >= 0 { r.len.div_ceil(PIECE) } else { 0 };
            if k < first + n {
                let off = (k - first) * PIECE;
                let piece = PlanRun { start: r.start + off, len: (r.len - off).min(PIECE), file_off: r.file_off + off, ..r };
                if w.uffd >= 0 && r.flags & prf::COPY != 0 {
                    copy_run(w.uffd, &piece);
                } else {
                    read_run(r.fd, true, &piece);
                }
                break;
            }
            first += n;
            i += 1;
        }
    }
}

/// Reads run `r` into place: with `pread` at its offset in the image file (`at_offset`),
/// else with `read` from a stream that carries the runs in order.
fn read_run(fd: i32, at_offset: bool, r: &PlanRun) {
    let mut done = 0usize;
    let len = r.len as usize;
    // Allocate the run's pages in one call rather than one fault per page during the read
    // (Linux 5.14+; where it fails the read faults them in as before).
    // SAFETY: the run lies inside an area this restorer mapped writable (see below).
    let _ = unsafe { sys::madvise(r.start as usize, len, sys::MADV_POPULATE_WRITE) };
    while done < len {
        let at = r.start as usize + done;
        // The run lies inside an area mapped writable by `map_vma` (the supervisor builds
        // runs only inside areas flagged HAS_DATA), and no other thread writes it: each
        // piece goes to exactly one thread.
        let got = if at_offset {
            // SAFETY: `at..at + len - done` is writable memory no one else uses (above).
            unsafe { sys::pread_raw(fd, at, len - done, r.file_off + done as u64) }
        } else {
            // SAFETY: as for the `pread` above.
            unsafe { sys::read_raw(fd, at, len - done) }
        };
        match got {
            Ok(0) => report::fail("the page data ended early (the image is shorter than its index says, or the supervisor stopped)"),
            Ok(n) => done += n,
            Err(sys::Errno::EINTR) => {}
            Err(e) => report::fail_at_errno("cannot read page data for", r.start, e),
        }
    }
}

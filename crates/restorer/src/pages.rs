//! Step 4 of stage 1: the page data, read into place.
//!
//! Page runs read at an offset in an image file are cut into pieces of [`PIECE`] bytes
//! that two threads take in turn: this one and a helper started with raw `clone` (when
//! there is enough to share). Most of the time goes to the kernel allocating and clearing
//! fresh pages and to copying from the page cache, and both scale with threads: measured
//! here, 1 GiB took 520-574 ms on one thread and 318-394 ms on two (a C test of the same
//! calls). Runs that come through the data pipe arrive in order, so this thread reads them
//! alone first, then joins the helper on the pieces left.

use super::{entry, report, Stage1};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use limitless_image::plan::{PlanHeader, PlanRun};
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
    let w = Work { s, h, next: AtomicU64::new(0) };
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
    total
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
                read_run(r.fd, true, &piece);
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

//! The copy-on-write snapshot of a leave-running checkpoint.
//!
//! Once the program is frozen and described (thread contexts, process state, descriptors,
//! memory map and page scan, shared memory written), the manager copies the process with a
//! raw `clone` (no `CLONE_VM`, no new stack): the child sees the memory as it was at that
//! instant and writes the page data of the image, while the parent lets the program's
//! threads run again. It is not glibc's `fork`: its `atfork` handlers, locks and allocator
//! would run while the other threads are frozen, possibly holding those locks (engine.md,
//! pitfall 1).
//!
//! - Exit signal 0: the program's `SIGCHLD` handler and its `wait`/`waitpid(-1)` never see
//!   the child (only `__WALL`/`__WCLONE` waits do); the manager reaps it with `__WALL`.
//! - The child inherits the manager's mask (every signal blocked) and sets it again, dies
//!   with the manager (`PR_SET_PDEATHSIG`), closes every descriptor but the stream, and
//!   ends with `exit_group`. Its result comes back through one shared anonymous page made
//!   after the memory map was read (so the page is in no image).
//! - Areas with `MADV_DONTFORK` (absent in the child) or `MADV_WIPEONFORK` (zeros there)
//!   that have pages to save: no snapshot ([`blocker`]); the stream is written frozen.
//! - Memory: pages the running program writes while the child exists are copied by the
//!   kernel (at most the checkpointed memory again). A `clone` that fails (`ENOMEM` under
//!   strict overcommit, a process limit) falls back to the frozen write.

use crate::scan::Scan;
use core::sync::atomic::{AtomicU32, Ordering};
use limitless_image::format::vflags;
use limitless_sys as sys;

/// What the child reports (in the shared page).
#[repr(C)]
struct Outcome {
    /// 1 once the fields below are final.
    done: AtomicU32,
    /// 0, or the errno of the failed write.
    errno: i32,
    bytes: u64,
    write_ns: u64,
}

/// A snapshot child writing the stream.
#[derive(Clone, Copy)]
pub struct Child {
    pub pid: i32,
    /// Time the `clone` took.
    pub clone_ns: u64,
    outcome: *mut Outcome,
}

/// Which side of the `clone` this is.
pub enum Side {
    Parent(Child),
    Child(Report),
}

/// The child's handle on the shared page, to report its result.
pub struct Report(*mut Outcome);

impl Report {
    /// Publishes the result and ends the child.
    pub fn finish(self, r: sys::Result<u64>, write_ns: u64) -> ! {
        // SAFETY: the page is a live shared mapping made for this report (see `fork`); the
        // parent reads it only after `done` is set (release/acquire) or the child is gone.
        unsafe {
            let o = &mut *self.0;
            match r {
                Ok(bytes) => o.bytes = bytes,
                Err(e) => o.errno = e.0.max(1),
            }
            o.write_ns = write_ns;
            o.done.store(1, Ordering::Release);
        }
        sys::exit_group(0)
    }
}

/// Why the process cannot be snapshot: the first area whose pages the child would not see
/// as they are (its start, and which flag).
pub fn blocker(scan: &Scan) -> Option<(u64, &'static [u8])> {
    scan.areas[..scan.n_areas].iter().filter(|a| a.info.pages > 0).find_map(|a| {
        if a.info.flags & vflags::DONTFORK != 0 {
            Some((a.info.start, &b"MADV_DONTFORK"[..]))
        } else if a.info.flags & vflags::WIPEONFORK != 0 {
            Some((a.info.start, &b"MADV_WIPEONFORK"[..]))
        } else {
            None
        }
    })
}

/// Makes the snapshot child. In the child every descriptor but `keep_fd` is closed.
pub fn fork(keep_fd: i32) -> sys::Result<Side> {
    // SAFETY: a fresh shared anonymous page at an address the kernel chooses; it is unmapped
    // in `wait` (parent) and ends with the child (child).
    let page = unsafe { sys::mmap(0, sys::PAGE_SIZE, sys::PROT_READ | sys::PROT_WRITE, sys::MAP_SHARED | sys::MAP_ANONYMOUS, -1, 0)? };
    let outcome = page as *mut Outcome;
    let parent = sys::getpid();
    let t0 = sys::monotonic_ns();
    // SAFETY: flags 0 (exit signal 0, no CLONE_VM, no new stack): a fork-like copy whose
    // child only runs the agent's code (raw system calls, no libc) and ends in exit_group.
    match unsafe { sys::clone(0) } {
        Ok(0) => {
            let all: u64 = !0;
            let _ = sys::rt_sigprocmask(sys::SIG_SETMASK, Some(&all), None);
            // SAFETY: PR_SET_PDEATHSIG takes a signal number, no pointer.
            let _ = unsafe { sys::prctl(sys::PR_SET_PDEATHSIG, sys::SIGKILL as usize, 0, 0, 0) };
            if sys::getppid() != parent {
                sys::exit_group(1); // the program ended in the meantime
            }
            if keep_fd > 0 {
                let _ = sys::close_range(0, keep_fd as u32 - 1, 0);
            }
            let _ = sys::close_range(keep_fd as u32 + 1, u32::MAX, 0);
            Ok(Side::Child(Report(outcome)))
        }
        Ok(pid) => Ok(Side::Parent(Child { pid, clone_ns: sys::monotonic_ns() - t0, outcome })),
        Err(e) => {
            // SAFETY: the page mapped above, unused.
            let _ = unsafe { sys::munmap(page, sys::PAGE_SIZE) };
            Err(e)
        }
    }
}

/// Why a snapshot child failed.
pub enum ChildError {
    /// Writing the stream failed with this errno.
    Write(sys::Errno),
    /// The child was killed by this signal.
    Killed(i32),
    /// It ended without a result (exit status).
    Lost(i32),
}

/// Waits for the child to end; returns (bytes written, write time).
pub fn wait(c: Child) -> Result<(u64, u64), ChildError> {
    let mut status = 0;
    let waited = loop {
        match sys::wait4(c.pid, &mut status, sys::__WALL) {
            Err(sys::Errno::EINTR) => continue,
            r => break r,
        }
    };
    // SAFETY: the shared page is mapped until the munmap below; the child is gone (or, if
    // the program reaped it itself with __WALL, ECHILD: it is gone too).
    let (done, errno, bytes, write_ns) = unsafe {
        let o = &*c.outcome;
        (o.done.load(Ordering::Acquire), o.errno, o.bytes, o.write_ns)
    };
    // SAFETY: the page mapped in `fork`; nothing refers to it any more.
    let _ = unsafe { sys::munmap(c.outcome as usize, sys::PAGE_SIZE) };
    if waited.is_ok() && status & 0x7f != 0 && done == 0 {
        return Err(ChildError::Killed(status & 0x7f));
    }
    match (done, errno) {
        (1, 0) => Ok((bytes, write_ns)),
        (1, e) => Err(ChildError::Write(sys::Errno(e))),
        _ => Err(ChildError::Lost((status >> 8) & 0xff)),
    }
}

//! Freezing and releasing the program's threads.
//!
//! The manager lists `/proc/self/task`, gives each thread a slot and sends it the checkpoint
//! signal with `rt_tgsigqueueinfo`, carrying the checkpoint generation and the slot number.
//! The handler describes its thread into the slot (TLS base, `pd->tid` address, robust list,
//! rseq area, name, signal mask), saves a suspend point and parks on a futex. The manager
//! lists the threads again until a pass finds no new ones. A thread that does not stop in
//! time fails the checkpoint; the others are released and the program runs on.

use crate::arch::{self, uc, Ctx};
use crate::global::*;
use core::mem::offset_of;
use core::sync::atomic::Ordering;
use limitless_image::format::{role, ThreadInfo};
use limitless_sys as sys;

/// Installs the checkpoint signal handler with a full mask and `SA_RESTART`.
pub fn install_handler() -> sys::Result<()> {
    let sa = sys::KSigaction {
        handler: handler as *const () as u64,
        flags: sys::SA_SIGINFO | sys::SA_RESTART | sys::SA_RESTORER,
        restorer: arch::restore_rt_addr(),
        mask: !0,
    };
    // SAFETY: `handler` is valid for the life of the process (the agent is never unloaded).
    unsafe { sys::rt_sigaction(SIG.load(Ordering::Relaxed), Some(&sa), None) }
}

/// Whether the checkpoint signal still has the agent's handler. The `sigaction` and
/// `signal` wrappers keep it, but a program can replace it with a raw system call (Go's
/// runtime installs its own handler for every signal): its threads would then never stop.
pub fn handler_installed() -> bool {
    let mut cur = sys::KSigaction::default();
    // SAFETY: only reads the current action into `cur`.
    match unsafe { sys::rt_sigaction(SIG.load(Ordering::Relaxed), None, Some(&mut cur)) } {
        Ok(()) => cur.handler == handler as *const () as u64,
        Err(_) => true,
    }
}

/// The checkpoint signal handler.
///
/// # Safety
/// Called by the kernel with valid `siginfo_t` and `ucontext_t` pointers.
unsafe extern "C" fn handler(_sig: i32, info: *const u8, ucp: *const u8) {
    // SAFETY: the kernel passes a complete siginfo_t (128 bytes).
    let (code, pid, val) = unsafe { (*(info.add(8) as *const i32), *(info.add(16) as *const i32), *(info.add(24) as *const u64)) };
    if code != sys::SI_QUEUE || pid != sys::getpid() {
        return;
    }
    let idx = (val & 0xffff_ffff) as usize;
    if (val >> 32) as u32 != GEN.load(Ordering::Acquire) || idx >= MAX_THREADS {
        return;
    }
    let slot = &SLOTS[idx];
    if slot.tid.load(Ordering::Acquire) != sys::gettid() || slot.state.load(Ordering::Acquire) != slot::SIGNALED {
        return;
    }
    crate::cputime::record_thread(idx);
    // SAFETY: this thread owns its slot's info until it publishes PARKED; `ucp` is valid.
    unsafe { describe(&mut *slot.info.get(), ucp) };
    // SAFETY: the slot's context lives in the agent's static memory, part of the image.
    let r = unsafe { arch::suspend_point(slot.ctx.get(), park) };
    if r != 0 {
        // A restored thread: put back what the kernel keeps per thread, then wait with the
        // others until the manager releases everyone.
        // SAFETY: the slot was filled before the checkpoint and restored with memory.
        let info = unsafe { &*slot.info.get() };
        restore_thread(info);
        crate::cputime::adopt_thread(idx, info.fs_base, info.tid_addr);
        arrive_and_wait();
    }
}

/// Called at the suspend point: publishes the parked state and waits for release.
unsafe extern "C" fn park(ctx: *mut Ctx) -> u64 {
    let base = SLOTS.as_ptr() as usize + offset_of!(Slot, ctx);
    let idx = (ctx as usize - base) / core::mem::size_of::<Slot>();
    let g = RELEASE.load(Ordering::Acquire);
    SLOTS[idx].state.store(slot::PARKED, Ordering::Release);
    PARKED.fetch_add(1, Ordering::AcqRel);
    let _ = sys::futex_wake(&PARKED, 1);
    while RELEASE.load(Ordering::Acquire) == g {
        let _ = sys::futex_wait(&RELEASE, g, None);
    }
    0
}

/// Counts this thread as arrived after a restart and waits for the release.
pub fn arrive_and_wait() {
    let g = RELEASE.load(Ordering::Acquire);
    PARKED.fetch_add(1, Ordering::AcqRel);
    let _ = sys::futex_wake(&PARKED, 1);
    while RELEASE.load(Ordering::Acquire) == g {
        let _ = sys::futex_wait(&RELEASE, g, None);
    }
}

/// Fills `t` with the calling thread's kernel state.
///
/// # Safety
/// `ucp` must be null or the `ucontext_t` of the signal being handled.
pub unsafe fn describe(t: &mut ThreadInfo, ucp: *const u8) {
    let tid = sys::gettid();
    t.tid = tid as u32;
    t.role = if tid == sys::getpid() { role::MAIN } else { role::OTHER };
    t.fs_base = sys::get_fs_base();
    t.gs_base = sys::get_gs_base();
    let mut tid_addr: u64 = 0;
    // SAFETY: PR_GET_TID_ADDRESS writes one pointer.
    let _ = unsafe { sys::prctl(sys::PR_GET_TID_ADDRESS, &mut tid_addr as *mut u64 as usize, 0, 0, 0) };
    t.tid_addr = tid_addr;
    let (h, l) = sys::get_robust_list().unwrap_or((0, 0));
    t.robust_head = h;
    t.robust_len = l;
    let (area, len) = probe_rseq(t.fs_base);
    t.rseq_area = area;
    t.rseq_len = len;
    t.rseq_sig = if len != 0 { sys::RSEQ_SIG } else { 0 };
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes.
    let _ = unsafe { sys::prctl(sys::PR_GET_NAME, name.as_mut_ptr() as usize, 0, 0, 0) };
    t.name = name;
    t.syscall = -1;
    if !ucp.is_null() {
        // SAFETY: the ucontext_t is laid out as in `arch::uc`.
        unsafe {
            t.sigmask = *(ucp.add(uc::SIGMASK) as *const u64);
            t.ip = *(ucp.add(uc::RIP) as *const u64);
            t.altstack_sp = *(ucp.add(uc::STACK_SP) as *const u64);
            t.altstack_flags = *(ucp.add(uc::STACK_FLAGS) as *const i32) as u32;
            t.altstack_size = *(ucp.add(uc::STACK_SIZE) as *const u64);
        }
    }
}

/// Finds the calling thread's registered rseq area: re-registering the same area with the
/// same length answers `EBUSY`. Returns (area, length), or (0, 0) when none is registered.
fn probe_rseq(fs: u64) -> (u64, u32) {
    if RSEQ_SIZE.load(Ordering::Relaxed) == 0 {
        return (0, 0);
    }
    let area = fs.wrapping_add(RSEQ_OFFSET.load(Ordering::Relaxed));
    let mut len = 32;
    while len <= 256 {
        // SAFETY: `area` is this thread's glibc rseq area (TLS); probing either fails or
        // registers it, and a fresh registration is undone at once.
        match unsafe { sys::rseq(area as usize, len, 0, sys::RSEQ_SIG) } {
            Err(sys::Errno::EBUSY) => return (area, len),
            Ok(()) => {
                // SAFETY: undoes the registration just made.
                let _ = unsafe { sys::rseq(area as usize, len, sys::RSEQ_FLAG_UNREGISTER, sys::RSEQ_SIG) };
                return (0, 0);
            }
            Err(sys::Errno::EINVAL) => len += 32,
            Err(_) => return (0, 0),
        }
    }
    (0, 0)
}

/// Puts back per-thread kernel state after a restart (the TLS base and `pd->tid` are set
/// by whoever created the thread).
pub fn restore_thread(t: &ThreadInfo) {
    if t.robust_head != 0 {
        // SAFETY: the list head is in restored memory where this thread had it.
        let _ = unsafe { sys::set_robust_list(t.robust_head as usize, t.robust_len as usize) };
    }
    if t.rseq_len != 0 {
        // SAFETY: the area is this thread's rseq area in restored TLS memory.
        let _ = unsafe { sys::rseq(t.rseq_area as usize, t.rseq_len, 0, t.rseq_sig) };
    }
    let mut name = [0u8; 17];
    name[..16].copy_from_slice(&t.name);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    let _ = unsafe { sys::prctl(sys::PR_SET_NAME, name.as_ptr() as usize, 0, 0, 0) };
}

/// Why a freeze failed.
pub enum FreezeError {
    /// This thread did not stop in time.
    Stuck(i32),
    /// More threads than the table holds.
    TooMany,
    /// `/proc/self/task` could not be read.
    Proc(sys::Errno),
}

fn task_state(tid: i32) -> u8 {
    let mut path = [0u8; 64];
    let mut b = [0u8; 512];
    let len = crate::process::read_file(crate::process::task_path(tid, b"stat", &mut path), &mut b);
    // The state follows the last ')' of the command name.
    match b[..len].iter().rposition(|&c| c == b')') {
        Some(i) if i + 2 < len => b[i + 2],
        _ => b'X',
    }
}

/// Stops every thread but the caller. On success the slots `0..NSLOTS` hold parked threads.
pub fn freeze(timeout_ns: u64) -> Result<(), FreezeError> {
    let me = sys::gettid();
    let pid = sys::getpid();
    let gen = GEN.fetch_add(1, Ordering::AcqRel) + 1;
    PARKED.store(0, Ordering::Release);
    for s in SLOTS.iter().take(NSLOTS.load(Ordering::Relaxed)) {
        s.state.store(slot::FREE, Ordering::Relaxed);
        s.tid.store(0, Ordering::Relaxed);
    }
    NSLOTS.store(0, Ordering::Release);
    // SAFETY: the manager owns the saved state during a checkpoint.
    unsafe { saved() }.main_exited = false;
    let dir = sys::openat(sys::AT_FDCWD, b"/proc/self/task\0", sys::O_RDONLY | sys::O_DIRECTORY | sys::O_CLOEXEC, 0)
        .map_err(FreezeError::Proc)?;
    let deadline = sys::monotonic_ns() + timeout_ns;
    let r = (|| loop {
        let mut found_new = false;
        sys::lseek(dir, 0, sys::SEEK_SET).map_err(FreezeError::Proc)?;
        let mut buf = [0u8; 8192];
        loop {
            let n = sys::getdents64(dir, &mut buf).map_err(FreezeError::Proc)?;
            if n == 0 {
                break;
            }
            let mut off = 0;
            while off + 19 < n {
                let reclen = u16::from_ne_bytes([buf[off + 16], buf[off + 17]]) as usize;
                let name = &buf[off + 19..off + reclen];
                off += reclen.max(1);
                let Some((tid, _)) = sys::parse_u64(name) else { continue };
                let tid = tid as i32;
                if tid == me || known(tid) {
                    continue;
                }
                if tid == pid && matches!(task_state(tid), b'Z' | b'X') {
                    // SAFETY: the manager owns the saved state during a checkpoint.
                    unsafe { saved() }.main_exited = true;
                    continue;
                }
                let idx = NSLOTS.load(Ordering::Relaxed);
                if idx + 1 >= MAX_THREADS {
                    return Err(FreezeError::TooMany);
                }
                SLOTS[idx].tid.store(tid, Ordering::Release);
                SLOTS[idx].state.store(slot::SIGNALED, Ordering::Release);
                NSLOTS.store(idx + 1, Ordering::Release);
                let sig = SIG.load(Ordering::Relaxed);
                if sys::tgsigqueue(pid, tid, sig, ((gen as u64) << 32) | idx as u64).is_err() {
                    SLOTS[idx].state.store(slot::GONE, Ordering::Release);
                }
                found_new = true;
            }
        }
        // Wait for everyone signalled so far.
        loop {
            let mut waiting = None;
            for s in SLOTS.iter().take(NSLOTS.load(Ordering::Acquire)) {
                if s.state.load(Ordering::Acquire) == slot::SIGNALED {
                    let tid = s.tid.load(Ordering::Relaxed);
                    if sys::tgkill(pid, tid, 0).is_err() {
                        s.state.store(slot::GONE, Ordering::Release);
                    } else {
                        waiting = Some(tid);
                    }
                }
            }
            let Some(tid) = waiting else { break };
            if sys::monotonic_ns() > deadline {
                return Err(FreezeError::Stuck(tid));
            }
            let p = PARKED.load(Ordering::Acquire);
            let _ = sys::futex_wait(&PARKED, p, Some(&sys::Timespec { sec: 0, nsec: 2_000_000 }));
        }
        if !found_new {
            return Ok(());
        }
    })();
    let _ = sys::close(dir);
    r
}

fn known(tid: i32) -> bool {
    SLOTS.iter().take(NSLOTS.load(Ordering::Relaxed)).any(|s| s.tid.load(Ordering::Relaxed) == tid)
}

/// Releases every parked thread (after a checkpoint, a failed freeze or a restart).
pub fn thaw() {
    GEN.fetch_add(1, Ordering::AcqRel);
    EPOCH.fetch_add(1, Ordering::AcqRel);
    RELEASE.fetch_add(1, Ordering::AcqRel);
    let _ = sys::futex_wake(&RELEASE, i32::MAX as u32);
}

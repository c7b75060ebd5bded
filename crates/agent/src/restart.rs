//! The restart: the restorer has rebuilt the memory and jumps here, on its gap stack, in the
//! process's only thread (the new thread-group leader).
//!
//! The leader puts back process-wide kernel state, recreates every saved thread with a raw
//! `clone` into its saved context (the manager included), and finally becomes the main
//! thread itself (or exits, if the program's main thread had already exited). Each thread
//! returns from its suspend point, restores its own robust list, rseq registration and
//! name, and waits. The manager waits for all of them, unmaps the restorer's gap, reports
//! `RESTORED` and releases everyone.

use crate::arch;
use crate::freeze;
use crate::global::*;
use crate::{ctl, process};
use core::sync::atomic::{AtomicU32, Ordering};
use limitless_image::ctl::{msg, Restored};
use limitless_image::format::role;
use limitless_image::plan::{RestartArgs, RESTART_MAGIC};
use limitless_sys as sys;

/// Cleared (and woken) by the kernel when a leader without a main thread exits.
static LEADER_TID: AtomicU32 = AtomicU32::new(0);

/// Address of the restart entry (recorded in images).
pub fn entry_address() -> u64 {
    limitless_restart as *const () as u64
}

fn fatal(msg_text: &[u8]) -> ! {
    ctl::send_text(msg::FAILED, &[b"restart failed: ", msg_text]);
    sys::exit_group(limitless_image::plan::RESTORER_FAILED)
}

/// The restart entry point, called by the restorer.
///
/// # Safety
/// Only the restorer calls it, once, with valid arguments, after restoring the memory.
#[no_mangle]
pub unsafe extern "C" fn limitless_restart(args: *const RestartArgs) -> ! {
    let all: u64 = !0;
    let _ = sys::rt_sigprocmask(sys::SIG_SETMASK, Some(&all), None);
    // SAFETY: the restorer passes a pointer to its argument block in the gap.
    let a = unsafe { *args };
    if a.magic != RESTART_MAGIC || a.version < 1 {
        fatal(b"bad arguments from the restorer");
    }
    // Dirty tracking: none survives in the image; the restorer may have armed it anew.
    if a.version >= 2 {
        crate::track::adopt(a.track_uffd, a.track, a.n_track);
    } else {
        crate::track::forget();
    }
    IMAGE_MAPPED.store(a.flags & limitless_image::plan::restart_flags::MAPPED != 0, Ordering::Release);
    // SAFETY: the leader is the only thread; it owns all agent state.
    let sv = unsafe { saved() };
    sv.gap_start = a.gap_start as usize;
    sv.gap_len = a.gap_len as usize;
    sv.restart_started_ns = a.started_ns;
    process::restore_kernel_state(sv);
    RESTORES.fetch_add(1, Ordering::AcqRel);
    crate::env_set_pid(a.pid as u64);
    PARKED.store(0, Ordering::Release);
    crate::tids::remember();
    crate::cputime::adopt();
    crate::zombies::adopt();

    let flags =
        sys::CLONE_VM | sys::CLONE_FS | sys::CLONE_FILES | sys::CLONE_SIGHAND | sys::CLONE_THREAD | sys::CLONE_SYSVSEM | sys::CLONE_SETTLS;
    let mut main = None;
    for s in SLOTS.iter().take(NSLOTS.load(Ordering::Acquire)) {
        if s.state.load(Ordering::Acquire) != slot::PARKED {
            continue;
        }
        // SAFETY: slots were filled before the checkpoint and restored with memory.
        let info = unsafe { &*s.info.get() };
        if info.role == role::MAIN {
            main = Some(s);
            continue;
        }
        let ctx = s.ctx.get();
        let tid_flags = if info.tid_addr != 0 { sys::CLONE_PARENT_SETTID | sys::CLONE_CHILD_CLEARTID } else { 0 };
        // SAFETY: reading the saved context.
        let stack = ((unsafe { (*ctx).rsp } - 512) & !15) as usize;
        // SAFETY: the context was saved by this thread's suspend point and its stack frames
        // are restored; `tid_addr` is its `pd->tid`, `fs_base` its TLS block.
        let r = unsafe {
            arch::clone_into(flags | tid_flags, stack, info.tid_addr as usize, info.tid_addr as usize, info.fs_base as usize, ctx)
        };
        if r < 0 {
            fatal(b"cannot create a thread (clone failed)");
        }
    }
    match main {
        Some(s) => {
            // SAFETY: as above.
            let info = unsafe { &*s.info.get() };
            if info.tid_addr != 0 {
                // SAFETY: `tid_addr` is the main thread's `pd->tid` in restored memory.
                unsafe {
                    let tid = sys::set_tid_address(info.tid_addr as usize);
                    (info.tid_addr as *mut i32).write_volatile(tid);
                }
            }
            if info.gs_base != 0 {
                // SAFETY: restores the saved GS base of this thread.
                let _ = unsafe { sys::arch_prctl(sys::ARCH_SET_GS, info.gs_base as usize) };
            }
            // SAFETY: the main thread's TLS block is restored memory; from here on this thread
            // is the main thread, and nothing below depends on the previous TLS.
            let _ = unsafe { sys::arch_prctl(sys::ARCH_SET_FS, info.fs_base as usize) };
            // SAFETY: the main thread's saved context, resumed exactly once.
            unsafe { arch::resume(s.ctx.get()) }
        }
        None => {
            // The program's main thread had exited: this leader exits as it did. The kernel
            // clears LEADER_TID when the thread is gone, so the manager knows the gap is free.
            LEADER_TID.store(sys::gettid() as u32, Ordering::Release);
            // SAFETY: LEADER_TID is static and lives as long as the process.
            unsafe { sys::set_tid_address(LEADER_TID.as_ptr() as usize) };
            sys::exit_thread(0)
        }
    }
}

/// The restored manager, returning from its suspend point.
pub fn continue_manager() {
    let mi = MANAGER_SLOT.load(Ordering::Acquire);
    // SAFETY: the manager's slot was filled before the checkpoint.
    freeze::restore_thread(unsafe { &*SLOTS[mi].info.get() });
    let expected =
        SLOTS.iter().take(NSLOTS.load(Ordering::Acquire)).filter(|s| s.state.load(Ordering::Acquire) == slot::PARKED).count() as u32 - 1;
    let deadline = sys::monotonic_ns() + 30_000_000_000;
    loop {
        let p = PARKED.load(Ordering::Acquire);
        if p >= expected {
            break;
        }
        if sys::monotonic_ns() > deadline {
            fatal(b"the restored threads did not start");
        }
        let _ = sys::futex_wait(&PARKED, p, Some(&sys::Timespec { sec: 0, nsec: 10_000_000 }));
    }
    loop {
        let t = LEADER_TID.load(Ordering::Acquire);
        if t == 0 {
            break;
        }
        let _ = sys::futex_wait(&LEADER_TID, t, Some(&sys::Timespec { sec: 0, nsec: 10_000_000 }));
    }
    // SAFETY: the manager owns the saved state until it releases the threads.
    let sv = unsafe { saved() };
    if sv.gap_len != 0 {
        // SAFETY: every thread has left the gap (they all arrived in their own stacks, and a
        // leader without a main thread has exited).
        let _ = unsafe { sys::munmap(sv.gap_start, sv.gap_len) };
        sv.gap_len = 0;
    }
    crate::mapped::note();
    let restore_ns = sys::monotonic_ns().saturating_sub(sv.restart_started_ns);
    let r = Restored { pid: sys::getpid() as u32, threads: expected + 1, restore_ns, epoch: crate::track::epoch() };
    let _ = ctl::send_wire(msg::RESTORED, &r);
    freeze::thaw();
}

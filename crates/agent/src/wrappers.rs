//! Functions the agent interposes (by `LD_PRELOAD` symbol precedence) so that the program
//! cannot take the checkpoint away from it, and so that a checkpoint stays invisible:
//!
//! - the checkpoint signal cannot be blocked (`sigprocmask`, `pthread_sigmask`,
//!   `sigsuspend`) or given another handler (`sigaction`, `signal`);
//! - the control socket cannot be closed (`close`, `close_range`, `closefrom`) or
//!   overwritten (`dup2`, `dup3` move it out of the way first);
//! - sleeps and semaphore waits interrupted by a checkpoint carry on instead of returning
//!   `EINTR` (`nanosleep`, `clock_nanosleep`, `sleep`, `usleep`, `sem_wait`,
//!   `sem_timedwait`). Other blocking calls are restarted by the kernel (`SA_RESTART`) or
//!   return `EINTR` as POSIX allows (see docs/engine.md);
//! - a read-write lock held for writing across a restore still works for the thread that
//!   holds it (`pthread_rwlock_*`): glibc names the writer by tid, which the restore changed;
//! - so does a recursive, error-checking or robust mutex held across a restore
//!   (`pthread_mutex_*`, `pthread_cond_*wait`, C11 `mtx_*` and `cnd_*wait`), which glibc
//!   names by its owner's tid too;
//! - children that had ended before a checkpoint and were not waited for can still be
//!   waited for after the restore (`wait`, `waitpid`, `wait3`, `wait4`, `waitid`; see
//!   [`crate::zombies`]);
//! - the process's and each thread's CPU time go on from the checkpoint's after a restore
//!   (`clock_gettime` of the CPU clocks, `clock`, `times`, `getrusage`; see
//!   [`crate::cputime`]);
//! - after `restore --map`, memory that was anonymous still reads as zeros once the program
//!   discards it (`madvise`, and `mremap`, which may move it; see [`crate::mapped`]).
//!
//! These run on the program's own threads, never while a checkpoint is freezing them, so
//! calling the next definition through libc is fine.

use crate::cputime;
use crate::global::{ACTIVE, CTL_FD, EPOCH, RESTORES, SIG};
use crate::libc::{next, set_errno, NEXT};
use core::sync::atomic::AtomicI32;
use core::sync::atomic::Ordering;
use limitless_sys as sys;

const EINTR: i32 = 4;
const EBADF: i32 = 9;
const EINVAL: i32 = 22;
const TIMER_ABSTIME: i32 = 1;

fn ours(sig: i32) -> bool {
    ACTIVE.load(Ordering::Relaxed) && sig == SIG.load(Ordering::Relaxed)
}

fn ctl() -> i32 {
    if ACTIVE.load(Ordering::Relaxed) {
        CTL_FD.load(Ordering::Relaxed)
    } else {
        -1
    }
}

macro_rules! call_next {
    ($slot:ident, $name:literal, fn($($t:ty),*) -> $r:ty, $($a:expr),*) => {{
        let p = next(&NEXT.$slot, concat!($name, "\0").as_bytes());
        if p == 0 {
            set_errno(38);
            return !0 as $r;
        }
        // SAFETY: `p` is the next definition of this libc function, with this signature.
        let f: unsafe extern "C" fn($($t),*) -> $r = unsafe { core::mem::transmute(p) };
        // SAFETY: the arguments are the caller's, passed through unchanged or as valid copies.
        unsafe { f($($a),*) }
    }};
}

/// A copy of a 128-byte `sigset_t` without the checkpoint signal.
///
/// # Safety
/// `set` must point at a `sigset_t`.
unsafe fn strip(set: *const u64) -> [u64; 16] {
    let mut c = [0u64; 16];
    // SAFETY: the caller passes a full sigset_t (128 bytes).
    unsafe { core::ptr::copy_nonoverlapping(set, c.as_mut_ptr(), 16) };
    let sig = SIG.load(Ordering::Relaxed);
    if ACTIVE.load(Ordering::Relaxed) {
        c[0] &= !(1u64 << (sig - 1));
    }
    c
}

/// `sigaction(2)`: the checkpoint signal's handler cannot be replaced.
///
/// # Safety
/// As for libc `sigaction`.
#[no_mangle]
pub unsafe extern "C" fn sigaction(sig: i32, act: *const u8, old: *mut u8) -> i32 {
    if ours(sig) {
        if !old.is_null() {
            // SAFETY: glibc's struct sigaction is 152 bytes; all-zero means SIG_DFL.
            unsafe { core::ptr::write_bytes(old, 0, 152) };
        }
        if !act.is_null() {
            set_errno(EINVAL);
            return -1;
        }
        return 0;
    }
    call_next!(sigaction, "sigaction", fn(i32, *const u8, *mut u8) -> i32, sig, act, old)
}

/// `signal(2)`.
///
/// # Safety
/// As for libc `signal`.
#[no_mangle]
pub unsafe extern "C" fn signal(sig: i32, handler: usize) -> usize {
    if ours(sig) {
        set_errno(EINVAL);
        return usize::MAX; // SIG_ERR
    }
    call_next!(signal, "signal", fn(i32, usize) -> usize, sig, handler)
}

/// `sigprocmask(2)`: the checkpoint signal stays unblocked.
///
/// # Safety
/// As for libc `sigprocmask`.
#[no_mangle]
pub unsafe extern "C" fn sigprocmask(how: i32, set: *const u64, old: *mut u64) -> i32 {
    if !set.is_null() && how != sys::SIG_UNBLOCK {
        // SAFETY: `set` is a sigset_t from the caller.
        let c = unsafe { strip(set) };
        return call_next!(sigprocmask, "sigprocmask", fn(i32, *const u64, *mut u64) -> i32, how, c.as_ptr(), old);
    }
    call_next!(sigprocmask, "sigprocmask", fn(i32, *const u64, *mut u64) -> i32, how, set, old)
}

/// `pthread_sigmask(3)`: the checkpoint signal stays unblocked.
///
/// # Safety
/// As for libc `pthread_sigmask`.
#[no_mangle]
pub unsafe extern "C" fn pthread_sigmask(how: i32, set: *const u64, old: *mut u64) -> i32 {
    if !set.is_null() && how != sys::SIG_UNBLOCK {
        // SAFETY: `set` is a sigset_t from the caller.
        let c = unsafe { strip(set) };
        return call_next!(pthread_sigmask, "pthread_sigmask", fn(i32, *const u64, *mut u64) -> i32, how, c.as_ptr(), old);
    }
    call_next!(pthread_sigmask, "pthread_sigmask", fn(i32, *const u64, *mut u64) -> i32, how, set, old)
}

/// `sigsuspend(2)`.
///
/// # Safety
/// As for libc `sigsuspend`.
#[no_mangle]
pub unsafe extern "C" fn sigsuspend(mask: *const u64) -> i32 {
    if mask.is_null() {
        return call_next!(sigsuspend, "sigsuspend", fn(*const u64) -> i32, mask);
    }
    // SAFETY: `mask` is a sigset_t from the caller.
    let c = unsafe { strip(mask) };
    call_next!(sigsuspend, "sigsuspend", fn(*const u64) -> i32, c.as_ptr())
}

/// `close(2)`: the control socket cannot be closed.
///
/// # Safety
/// As for libc `close`.
#[no_mangle]
pub unsafe extern "C" fn close(fd: i32) -> i32 {
    if fd >= 0 && fd == ctl() {
        set_errno(EBADF);
        return -1;
    }
    call_next!(close, "close", fn(i32) -> i32, fd)
}

/// `close_range(2)`: skips the control socket.
///
/// # Safety
/// As for libc `close_range`.
#[no_mangle]
pub unsafe extern "C" fn close_range(first: u32, last: u32, flags: i32) -> i32 {
    let c = ctl();
    if c >= 0 && first <= c as u32 && c as u32 <= last {
        let c = c as u32;
        if c > first {
            let r = call_next!(close_range, "close_range", fn(u32, u32, i32) -> i32, first, c - 1, flags);
            if r != 0 {
                return r;
            }
        }
        if c < last {
            return call_next!(close_range, "close_range", fn(u32, u32, i32) -> i32, c + 1, last, flags);
        }
        return 0;
    }
    call_next!(close_range, "close_range", fn(u32, u32, i32) -> i32, first, last, flags)
}

/// `closefrom(3)`: skips the control socket.
///
/// # Safety
/// As for libc `closefrom`.
#[no_mangle]
pub unsafe extern "C" fn closefrom(low: i32) {
    let c = ctl();
    if c >= 0 && c >= low {
        if c > low {
            let _ = sys::close_range(low as u32, c as u32 - 1, 0);
        }
        let _ = sys::close_range(c as u32 + 1, u32::MAX, 0);
        return;
    }
    let p = next(&NEXT.closefrom, b"closefrom\0");
    if p != 0 {
        // SAFETY: `p` is libc's closefrom.
        let f: unsafe extern "C" fn(i32) = unsafe { core::mem::transmute(p) };
        // SAFETY: forwarding the caller's argument.
        unsafe { f(low) }
    }
}

/// Moves the control socket to another descriptor when the program wants its number.
fn evict_ctl(new: i32) {
    let c = ctl();
    if c >= 0 && new == c {
        if let Ok(n) = sys::fcntl(c, sys::F_DUPFD, (c as usize).max(100) + 1) {
            CTL_FD.store(n as i32, Ordering::Release);
            crate::env_set_fd(n as i32);
        }
    }
}

/// `dup2(2)`.
///
/// # Safety
/// As for libc `dup2`.
#[no_mangle]
pub unsafe extern "C" fn dup2(old: i32, new: i32) -> i32 {
    if old != new {
        evict_ctl(new);
    }
    call_next!(dup2, "dup2", fn(i32, i32) -> i32, old, new)
}

/// `dup3(2)`.
///
/// # Safety
/// As for libc `dup3`.
#[no_mangle]
pub unsafe extern "C" fn dup3(old: i32, new: i32, flags: i32) -> i32 {
    if old != new {
        evict_ctl(new);
    }
    call_next!(dup3, "dup3", fn(i32, i32, i32) -> i32, old, new, flags)
}

/// `nanosleep(2)`: a checkpoint does not cut the sleep short.
///
/// # Safety
/// As for libc `nanosleep`.
#[no_mangle]
pub unsafe extern "C" fn nanosleep(req: *const sys::Timespec, rem: *mut sys::Timespec) -> i32 {
    if req.is_null() {
        return call_next!(nanosleep, "nanosleep", fn(*const sys::Timespec, *mut sys::Timespec) -> i32, req, rem);
    }
    // SAFETY: `req` is the caller's timespec.
    let mut want = unsafe { *req };
    loop {
        let e0 = EPOCH.load(Ordering::Acquire);
        let mut left = sys::Timespec::default();
        let r = call_next!(nanosleep, "nanosleep", fn(*const sys::Timespec, *mut sys::Timespec) -> i32, &want, &mut left);
        if r == -1 && errno() == EINTR && EPOCH.load(Ordering::Acquire) != e0 {
            want = left;
            continue;
        }
        if r == -1 && !rem.is_null() {
            // SAFETY: `rem` is the caller's timespec.
            unsafe { *rem = left };
        }
        return r;
    }
}

/// `clock_nanosleep(2)`.
///
/// # Safety
/// As for libc `clock_nanosleep`.
#[no_mangle]
pub unsafe extern "C" fn clock_nanosleep(clock: i32, flags: i32, req: *const sys::Timespec, rem: *mut sys::Timespec) -> i32 {
    if req.is_null() {
        return call_next!(
            clock_nanosleep,
            "clock_nanosleep",
            fn(i32, i32, *const sys::Timespec, *mut sys::Timespec) -> i32,
            clock,
            flags,
            req,
            rem
        );
    }
    // SAFETY: `req` is the caller's timespec.
    let mut want = unsafe { *req };
    loop {
        let e0 = EPOCH.load(Ordering::Acquire);
        let mut left = sys::Timespec::default();
        let r = call_next!(
            clock_nanosleep,
            "clock_nanosleep",
            fn(i32, i32, *const sys::Timespec, *mut sys::Timespec) -> i32,
            clock,
            flags,
            &want,
            &mut left
        );
        if r == EINTR && EPOCH.load(Ordering::Acquire) != e0 {
            if flags & TIMER_ABSTIME == 0 {
                want = left;
            }
            continue;
        }
        if r == EINTR && !rem.is_null() && flags & TIMER_ABSTIME == 0 {
            // SAFETY: `rem` is the caller's timespec.
            unsafe { *rem = left };
        }
        return r;
    }
}

/// `sleep(3)`, through the `nanosleep` wrapper.
///
/// # Safety
/// As for libc `sleep`.
#[no_mangle]
pub unsafe extern "C" fn sleep(secs: u32) -> u32 {
    let req = sys::Timespec { sec: secs as i64, nsec: 0 };
    let mut rem = sys::Timespec::default();
    // SAFETY: both timespecs are local.
    if unsafe { nanosleep(&req, &mut rem) } == -1 {
        return rem.sec as u32 + (rem.nsec != 0) as u32;
    }
    0
}

/// `usleep(3)`, through the `nanosleep` wrapper.
///
/// # Safety
/// As for libc `usleep`.
#[no_mangle]
pub unsafe extern "C" fn usleep(usec: u32) -> i32 {
    let req = sys::Timespec { sec: (usec / 1_000_000) as i64, nsec: (usec % 1_000_000) as i64 * 1000 };
    // SAFETY: the timespec is local.
    unsafe { nanosleep(&req, core::ptr::null_mut()) }
}

/// `sem_wait(3)`: a checkpoint does not make it fail with `EINTR`.
///
/// # Safety
/// As for libc `sem_wait`.
#[no_mangle]
pub unsafe extern "C" fn sem_wait(sem: *mut u8) -> i32 {
    loop {
        let e0 = EPOCH.load(Ordering::Acquire);
        let r = call_next!(sem_wait, "sem_wait", fn(*mut u8) -> i32, sem);
        if r == -1 && errno() == EINTR && EPOCH.load(Ordering::Acquire) != e0 {
            continue;
        }
        return r;
    }
}

/// `sem_timedwait(3)`.
///
/// # Safety
/// As for libc `sem_timedwait`.
#[no_mangle]
pub unsafe extern "C" fn sem_timedwait(sem: *mut u8, abs: *const sys::Timespec) -> i32 {
    loop {
        let e0 = EPOCH.load(Ordering::Acquire);
        let r = call_next!(sem_timedwait, "sem_timedwait", fn(*mut u8, *const sys::Timespec) -> i32, sem, abs);
        if r == -1 && errno() == EINTR && EPOCH.load(Ordering::Acquire) != e0 {
            continue;
        }
        return r;
    }
}

/// Byte offset of the writer's tid in glibc's `pthread_rwlock_t` on x86-64 (`__cur_writer`
/// since glibc 2.25, `__writer` before: the same place and meaning).
const RWLOCK_WRITER: usize = 24;

/// After a restore, hands a read-write lock that the calling thread held for writing at the
/// checkpoint back to it under its new tid. glibc decides with `__cur_writer == own tid`
/// whether an unlock releases the write lock (else it is taken as a reader's unlock, which
/// leaves the lock held for ever) and whether a lock call is the holder's own (`EDEADLK`,
/// which OpenSSL 3 relies on, instead of waiting for ever). Only the holder writes the
/// field, and it is the caller here; a writer tid that belongs to a live thread of this
/// process is left alone.
///
/// # Safety
/// `lock` must be null or point at a `pthread_rwlock_t`.
unsafe fn adopt_rwlock(lock: *mut u8) {
    if RESTORES.load(Ordering::Relaxed) == 0 || lock.is_null() {
        return;
    }
    // SAFETY: the field is an aligned `int` inside the caller's lock; glibc reads and
    // writes it with relaxed atomics.
    let writer = unsafe { &*(lock.add(RWLOCK_WRITER) as *const AtomicI32) };
    let w = writer.load(Ordering::Relaxed);
    // The table first: it answers without a system call for a writer that is no earlier
    // tid of any restored thread (a lock held by a thread of this run, say).
    if !crate::tids::was_mine(w) {
        return;
    }
    let me = sys::gettid();
    if w != me && sys::tgkill(sys::getpid(), w, 0).is_err() {
        writer.store(me, Ordering::Relaxed);
    }
}

macro_rules! rwlock_wrapper {
    ($name:ident, $slot:ident, $sym:literal $(, $a:ident: $t:ty)*) => {
        #[doc = concat!("`", $sym, "(3)`: see [`adopt_rwlock`].")]
        ///
        /// # Safety
        /// As for the libc function.
        #[no_mangle]
        pub unsafe extern "C" fn $name(lock: *mut u8 $(, $a: $t)*) -> i32 {
            // SAFETY: the caller passes a lock, as libc requires.
            unsafe { adopt_rwlock(lock) };
            call_next!($slot, $sym, fn(*mut u8 $(, $t)*) -> i32, lock $(, $a)*)
        }
    };
}

rwlock_wrapper!(pthread_rwlock_rdlock, rwlock_rdlock, "pthread_rwlock_rdlock");
rwlock_wrapper!(pthread_rwlock_tryrdlock, rwlock_tryrdlock, "pthread_rwlock_tryrdlock");
rwlock_wrapper!(pthread_rwlock_timedrdlock, rwlock_timedrdlock, "pthread_rwlock_timedrdlock", abs: *const sys::Timespec);
rwlock_wrapper!(pthread_rwlock_clockrdlock, rwlock_clockrdlock, "pthread_rwlock_clockrdlock", clock: i32, abs: *const sys::Timespec);
rwlock_wrapper!(pthread_rwlock_wrlock, rwlock_wrlock, "pthread_rwlock_wrlock");
rwlock_wrapper!(pthread_rwlock_trywrlock, rwlock_trywrlock, "pthread_rwlock_trywrlock");
rwlock_wrapper!(pthread_rwlock_timedwrlock, rwlock_timedwrlock, "pthread_rwlock_timedwrlock", abs: *const sys::Timespec);
rwlock_wrapper!(pthread_rwlock_clockwrlock, rwlock_clockwrlock, "pthread_rwlock_clockwrlock", clock: i32, abs: *const sys::Timespec);
rwlock_wrapper!(pthread_rwlock_unlock, rwlock_unlock, "pthread_rwlock_unlock");

/// Byte offsets in glibc's x86-64 `pthread_mutex_t` (`struct __pthread_mutex_s`; C11's
/// `mtx_t` is the same object): the futex word, the owner's tid, the kind.
const MUTEX_LOCK: usize = 0;
const MUTEX_OWNER: usize = 8;
const MUTEX_KIND: usize = 16;
/// Bits of the kind: the type (1 recursive, 2 error-checking), robust, priority inheritance
/// and priority protection.
const MUTEX_TYPE: i32 = 3;
const MUTEX_ROBUST: i32 = 16;
const MUTEX_PI_PP: i32 = 32 | 64;
/// The owner's tid in a robust mutex's futex word; the bits above are the kernel's flags.
const FUTEX_TID_MASK: i32 = 0x3fff_ffff;

/// After a restore, hands a mutex that the calling thread held at the checkpoint back to it
/// under its new tid. glibc compares the owner's tid with the caller's in recursive and
/// error-checking mutexes (`__owner`: a relock is granted or answered with `EDEADLK`, an
/// unlock by anyone else fails with `EPERM`) and in robust ones (the futex word holds the
/// tid, and the kernel reads it when the owner dies). With the tid gone stale the holder's
/// unlock would fail and leave the mutex held for ever, and its relock would wait for
/// itself. Only the owner writes these fields while it holds the mutex, and the caller here
/// is that owner; a tid that belongs to a live thread of this process is left alone. Normal
/// and adaptive mutexes do not check the owner, and priority-inheritance and
/// priority-protection ones are left as they are (the kernel and the scheduler read them).
///
/// Before the first restore this costs one load; afterwards two more, and a call only for a
/// recursive, error-checking or robust mutex held by a tid that may be an earlier one.
///
/// # Safety
/// `m` must be null or point at a `pthread_mutex_t`.
#[inline(always)]
unsafe fn adopt_mutex(m: *mut u8) {
    if RESTORES.load(Ordering::Relaxed) == 0 || m.is_null() {
        return;
    }
    // SAFETY: aligned `int` fields inside the caller's mutex, which glibc reads and writes
    // with atomics or under the mutex itself.
    let (kind, owner) = unsafe { (&*(m.add(MUTEX_KIND) as *const AtomicI32), &*(m.add(MUTEX_OWNER) as *const AtomicI32)) };
    let k = kind.load(Ordering::Relaxed);
    let robust = k & MUTEX_ROBUST != 0;
    if k & MUTEX_PI_PP != 0 || (!robust && !matches!(k & MUTEX_TYPE, 1 | 2)) {
        return;
    }
    let o = owner.load(Ordering::Relaxed);
    if crate::tids::may_be_old(o) {
        // SAFETY: as for this function.
        unsafe { adopt_held_mutex(m, o, robust) }
    }
}

/// [`adopt_mutex`] for a mutex held by `o`, which may be an earlier tid.
///
/// # Safety
/// `m` must point at a `pthread_mutex_t`.
#[inline(never)]
unsafe fn adopt_held_mutex(m: *mut u8, o: i32, robust: bool) {
    // SAFETY: as in `adopt_mutex`.
    let (lock, owner) = unsafe { (&*(m.add(MUTEX_LOCK) as *const AtomicI32), &*(m.add(MUTEX_OWNER) as *const AtomicI32)) };
    if !crate::tids::was_mine(o) {
        return;
    }
    let me = sys::gettid();
    if o == me || sys::tgkill(sys::getpid(), o, 0).is_ok() {
        return;
    }
    if robust {
        // Waiters may set FUTEX_WAITERS meanwhile: keep the flags, swap only the tid.
        let mut v = lock.load(Ordering::Relaxed);
        while v & FUTEX_TID_MASK == o {
            match lock.compare_exchange_weak(v, (v & !FUTEX_TID_MASK) | me, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => break,
                Err(now) => v = now,
            }
        }
    }
    let _ = owner.compare_exchange(o, me, Ordering::Relaxed, Ordering::Relaxed);
}

macro_rules! mutex_wrapper {
    ($name:ident, $slot:ident, $sym:literal, $m:ident, ($($a:ident: $t:ty),*)) => {
        #[doc = concat!("`", $sym, "(3)`: see [`adopt_mutex`].")]
        ///
        /// # Safety
        /// As for the libc function.
        #[no_mangle]
        pub unsafe extern "C" fn $name($($a: $t),*) -> i32 {
            // SAFETY: the caller passes a mutex, as libc requires.
            unsafe { adopt_mutex($m) };
            call_next!($slot, $sym, fn($($t),*) -> i32, $($a),*)
        }
    };
}

mutex_wrapper!(pthread_mutex_lock, mutex_lock, "pthread_mutex_lock", m, (m: *mut u8));
mutex_wrapper!(pthread_mutex_trylock, mutex_trylock, "pthread_mutex_trylock", m, (m: *mut u8));
mutex_wrapper!(pthread_mutex_timedlock, mutex_timedlock, "pthread_mutex_timedlock", m, (m: *mut u8, abs: *const sys::Timespec));
mutex_wrapper!(pthread_mutex_clocklock, mutex_clocklock, "pthread_mutex_clocklock", m, (m: *mut u8, clock: i32, abs: *const sys::Timespec));
mutex_wrapper!(pthread_mutex_unlock, mutex_unlock, "pthread_mutex_unlock", m, (m: *mut u8));
mutex_wrapper!(pthread_cond_wait, cond_wait, "pthread_cond_wait", m, (c: *mut u8, m: *mut u8));
mutex_wrapper!(pthread_cond_timedwait, cond_timedwait, "pthread_cond_timedwait", m, (c: *mut u8, m: *mut u8, abs: *const sys::Timespec));
mutex_wrapper!(pthread_cond_clockwait, cond_clockwait, "pthread_cond_clockwait", m, (c: *mut u8, m: *mut u8, clock: i32, abs: *const sys::Timespec));
mutex_wrapper!(mtx_lock, mtx_lock, "mtx_lock", m, (m: *mut u8));
mutex_wrapper!(mtx_trylock, mtx_trylock, "mtx_trylock", m, (m: *mut u8));
mutex_wrapper!(mtx_timedlock, mtx_timedlock, "mtx_timedlock", m, (m: *mut u8, abs: *const sys::Timespec));
mutex_wrapper!(mtx_unlock, mtx_unlock, "mtx_unlock", m, (m: *mut u8));
mutex_wrapper!(cnd_wait, cnd_wait, "cnd_wait", m, (c: *mut u8, m: *mut u8));
mutex_wrapper!(cnd_timedwait, cnd_timedwait, "cnd_timedwait", m, (c: *mut u8, m: *mut u8, abs: *const sys::Timespec));

/// `clock_getcpuclockid(0)`'s clock: this process's CPU time, like
/// `CLOCK_PROCESS_CPUTIME_ID`.
const SELF_CPU_CLOCK: i32 = !0 << 3 | 2;

/// Runs `f` (a call for CPU time) again until no restore came during it: a figure the
/// kernel gave the process before a checkpoint must not get the restored process's offset
/// too. (Loops that read their CPU time all the time are often inside the call when the
/// checkpoint comes; such a figure was counted twice.)
fn settled<T>(mut f: impl FnMut() -> T) -> T {
    loop {
        let g = RESTORES.load(Ordering::Acquire);
        let r = f();
        if RESTORES.load(Ordering::Acquire) == g {
            return r;
        }
    }
}

/// `clock_gettime(2)`: in a restored process the process CPU clock and the calling
/// thread's go on from the checkpoint's figures ([`crate::cputime`]); every other clock
/// passes straight through.
///
/// # Safety
/// As for libc `clock_gettime`.
#[no_mangle]
pub unsafe extern "C" fn clock_gettime(clock: i32, ts: *mut sys::Timespec) -> i32 {
    let process = clock == sys::CLOCK_PROCESS_CPUTIME_ID || clock == SELF_CPU_CLOCK;
    // A thread's own clock needs adjusting only after a restore; other clocks never do.
    if !process && (RESTORES.load(Ordering::Relaxed) == 0 || !cputime::is_own_thread_clock(clock)) {
        return call_next!(clock_gettime, "clock_gettime", fn(i32, *mut sys::Timespec) -> i32, clock, ts);
    }
    let r = settled(|| call_next!(clock_gettime, "clock_gettime", fn(i32, *mut sys::Timespec) -> i32, clock, ts));
    if r != 0 || ts.is_null() {
        return r;
    }
    let add = if process { cputime::offset(0) } else { cputime::thread_offsets()[0] };
    if add != 0 {
        // SAFETY: libc just filled the caller's timespec.
        let t = unsafe { &mut *ts };
        cputime::shift(&mut t.sec, &mut t.nsec, 1, add);
    }
    r
}

/// `clock(3)`: the process's CPU time in microseconds, going on across restores.
///
/// # Safety
/// As for libc `clock`.
#[no_mangle]
pub unsafe extern "C" fn clock() -> i64 {
    let r = settled(|| call_next!(clock, "clock", fn() -> i64,));
    if r == -1 || !cputime::active() {
        return r;
    }
    (r + cputime::offset(0) / 1000).max(0)
}

/// `times(2)`: the user and system times (in ticks of 10 ms) go on across restores. In a
/// restored process they are worked out from `getrusage` in nanoseconds, offset and then
/// cut to ticks once: two cuts could lose a tick, and the figure would go back.
///
/// # Safety
/// As for libc `times`.
#[no_mangle]
pub unsafe extern "C" fn times(buf: *mut [i64; 4]) -> i64 {
    let libc_times = |buf| -> i64 { call_next!(times, "times", fn(*mut [i64; 4]) -> i64, buf) };
    // `getrusage` only in a restored process: before that, `times` costs one call, as without
    // the engine.
    let (r, ru) = settled(|| (libc_times(buf), cputime::active().then(|| sys::getrusage(sys::RUSAGE_SELF))));
    if r == -1 || buf.is_null() {
        return r;
    }
    if let Some(Ok(ru)) = ru {
        // SAFETY: libc just filled the caller's struct tms.
        let t = unsafe { &mut *buf };
        const TICK_NS: i64 = 10_000_000;
        t[0] = ((cputime::tv_ns(ru.utime) + cputime::offset(1)) / TICK_NS).max(0);
        t[1] = ((cputime::tv_ns(ru.stime) + cputime::offset(2)) / TICK_NS).max(0);
    }
    r
}

/// `getrusage(2)`: for `RUSAGE_SELF` and `RUSAGE_THREAD` the user and system times go on
/// across restores.
///
/// # Safety
/// As for libc `getrusage`.
#[no_mangle]
pub unsafe extern "C" fn getrusage(who: i32, usage: *mut sys::Rusage) -> i32 {
    let r = settled(|| call_next!(getrusage, "getrusage", fn(i32, *mut sys::Rusage) -> i32, who, usage));
    if r != 0 || usage.is_null() || RESTORES.load(Ordering::Relaxed) == 0 {
        return r;
    }
    let add = match who {
        sys::RUSAGE_SELF => [0, cputime::offset(1), cputime::offset(2)],
        sys::RUSAGE_THREAD => cputime::thread_offsets(),
        _ => return r,
    };
    // SAFETY: libc just filled the caller's struct rusage.
    let u = unsafe { &mut *usage };
    cputime::shift(&mut u.utime.sec, &mut u.utime.usec, 1000, add[1]);
    cputime::shift(&mut u.stime.sec, &mut u.stime.usec, 1000, add[2]);
    r
}

fn errno() -> i32 {
    crate::libc::get_errno()
}

/// For a wait on `pid` (0 and below: any child), a zombie owed since the restore: one for
/// that pid only if no real child has it.
fn owed(pid: i32, keep: bool) -> Option<(i32, i32, i32)> {
    if !ACTIVE.load(Ordering::Relaxed) || !crate::zombies::any() {
        return None;
    }
    if pid > 0 && sys::waitid_pid(pid, sys::WEXITED | sys::WNOHANG | sys::WNOWAIT) != Err(sys::Errno::ECHILD) {
        // A real child has this pid (or it is not ours to answer): the kernel answers.
        return None;
    }
    crate::zombies::take(pid, keep)
}

/// Answers a `waitpid`-style call from an owed zombie.
///
/// # Safety
/// `status` is null or points at an int.
unsafe fn answer(z: (i32, i32, i32), status: *mut i32, rusage: *mut u8) -> i32 {
    if !status.is_null() {
        // SAFETY: the caller's status word.
        unsafe { *status = crate::zombies::wait_status(z.1, z.2) };
    }
    if !rusage.is_null() {
        // SAFETY: the caller's struct rusage (144 bytes): no usage is known.
        unsafe { core::ptr::write_bytes(rusage, 0, 144) };
    }
    z.0
}

/// `waitpid(2)`: see [`owed`].
///
/// # Safety
/// As for libc `waitpid`.
#[no_mangle]
pub unsafe extern "C" fn waitpid(pid: i32, status: *mut i32, options: i32) -> i32 {
    if let Some(z) = owed(pid, false) {
        // SAFETY: the caller's pointer, as waitpid takes it.
        return unsafe { answer(z, status, core::ptr::null_mut()) };
    }
    call_next!(waitpid, "waitpid", fn(i32, *mut i32, i32) -> i32, pid, status, options)
}

/// `wait(2)`: see [`owed`].
///
/// # Safety
/// As for libc `wait`.
#[no_mangle]
pub unsafe extern "C" fn wait(status: *mut i32) -> i32 {
    if let Some(z) = owed(-1, false) {
        // SAFETY: the caller's pointer, as wait takes it.
        return unsafe { answer(z, status, core::ptr::null_mut()) };
    }
    call_next!(wait, "wait", fn(*mut i32) -> i32, status)
}

/// `wait4(2)`: see [`owed`].
///
/// # Safety
/// As for libc `wait4`.
#[no_mangle]
pub unsafe extern "C" fn wait4(pid: i32, status: *mut i32, options: i32, rusage: *mut u8) -> i32 {
    if let Some(z) = owed(pid, false) {
        // SAFETY: the caller's pointers, as wait4 takes them.
        return unsafe { answer(z, status, rusage) };
    }
    call_next!(wait4, "wait4", fn(i32, *mut i32, i32, *mut u8) -> i32, pid, status, options, rusage)
}

/// `wait3(2)`: see [`owed`].
///
/// # Safety
/// As for libc `wait3`.
#[no_mangle]
pub unsafe extern "C" fn wait3(status: *mut i32, options: i32, rusage: *mut u8) -> i32 {
    if let Some(z) = owed(-1, false) {
        // SAFETY: the caller's pointers, as wait3 takes them.
        return unsafe { answer(z, status, rusage) };
    }
    call_next!(wait3, "wait3", fn(*mut i32, i32, *mut u8) -> i32, status, options, rusage)
}

/// `waitid(2)`: see [`owed`]. Only `P_ALL` and `P_PID` waits for ended children
/// (`WEXITED`) are answered from owed zombies; `WNOWAIT` leaves them owed.
///
/// # Safety
/// As for libc `waitid`.
#[no_mangle]
pub unsafe extern "C" fn waitid(idtype: i32, id: u32, info: *mut u8, options: i32) -> i32 {
    const P_ALL: i32 = 0;
    const SIGCHLD: i32 = 17;
    let pid = match idtype {
        P_ALL => Some(-1),
        sys::P_PID => Some(id as i32),
        _ => None,
    };
    if let Some(pid) = pid.filter(|_| options & sys::WEXITED != 0 && !info.is_null()) {
        if let Some((p, code, status)) = owed(pid, options & sys::WNOWAIT != 0) {
            let mut si = [0u8; 128];
            si[0..4].copy_from_slice(&SIGCHLD.to_ne_bytes());
            si[8..12].copy_from_slice(&code.to_ne_bytes());
            si[16..20].copy_from_slice(&p.to_ne_bytes());
            si[20..24].copy_from_slice(&sys::getuid().to_ne_bytes());
            si[24..28].copy_from_slice(&status.to_ne_bytes());
            // SAFETY: the caller's siginfo_t (128 bytes).
            unsafe { core::ptr::copy_nonoverlapping(si.as_ptr(), info, 128) };
            return 0;
        }
    }
    call_next!(waitid, "waitid", fn(i32, u32, *mut u8, i32) -> i32, idtype, id, info, options)
}

/// `madvise(2)`: after `restore --map`, discarding pages of memory mapped from the image
/// leaves zeros, as on the anonymous memory it stands for ([`crate::mapped`]).
///
/// # Safety
/// As for libc `madvise`.
#[no_mangle]
pub unsafe extern "C" fn madvise(addr: *mut u8, len: usize, advice: i32) -> i32 {
    if advice == sys::MADV_DONTNEED || advice == sys::MADV_FREE {
        crate::mapped::before_discard(addr as usize, len);
    }
    call_next!(madvise, "madvise", fn(*mut u8, usize, i32) -> i32, addr, len, advice)
}

/// `mremap(2)`: may move memory mapped from an image (`restore --map`), so the agent stops
/// trusting where it noted those mappings ([`crate::mapped`]). libc's `mremap` is variadic
/// (`new_address` only with `MREMAP_FIXED`); on x86-64 the fifth argument travels in a
/// register either way, and is passed on as it came.
///
/// # Safety
/// As for libc `mremap`.
#[no_mangle]
pub unsafe extern "C" fn mremap(old: *mut u8, old_len: usize, new_len: usize, flags: i32, new_addr: *mut u8) -> *mut u8 {
    crate::mapped::moved();
    call_next!(mremap, "mremap", fn(*mut u8, usize, usize, i32, *mut u8) -> *mut u8, old, old_len, new_len, flags, new_addr)
}

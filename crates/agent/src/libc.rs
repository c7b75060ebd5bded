//! The few libc functions the agent uses, all at load time or on the program's own threads
//! (never while threads are frozen): symbol lookup for the interposed functions, fork
//! handling, and `errno`. The manager thread uses none (see `checkpoint::start_manager`).

use crate::global::{Saved, ACTIVE, CTL_FD, RSEQ_OFFSET, RSEQ_SIZE};
use core::ffi::c_void;
use core::sync::atomic::{AtomicUsize, Ordering};
use limitless_sys as sys;

#[link(name = "c")]
extern "C" {
    fn dlsym(handle: *mut c_void, name: *const u8) -> *mut c_void;
    fn pthread_atfork(prepare: Option<extern "C" fn()>, parent: Option<extern "C" fn()>, child: Option<extern "C" fn()>) -> i32;
    fn gnu_get_libc_version() -> *const u8;
    fn __errno_location() -> *mut i32;
}

const RTLD_NEXT: *mut c_void = -1isize as *mut c_void;
const RTLD_DEFAULT: *mut c_void = core::ptr::null_mut();

/// The next definition of each interposed function (0: not found yet).
pub struct Next {
    pub sigaction: AtomicUsize,
    pub signal: AtomicUsize,
    pub sigprocmask: AtomicUsize,
    pub pthread_sigmask: AtomicUsize,
    pub sigsuspend: AtomicUsize,
    pub close: AtomicUsize,
    pub close_range: AtomicUsize,
    pub closefrom: AtomicUsize,
    pub dup2: AtomicUsize,
    pub dup3: AtomicUsize,
    pub nanosleep: AtomicUsize,
    pub clock_nanosleep: AtomicUsize,
    pub sem_wait: AtomicUsize,
    pub sem_timedwait: AtomicUsize,
    pub rwlock_rdlock: AtomicUsize,
    pub rwlock_tryrdlock: AtomicUsize,
    pub rwlock_timedrdlock: AtomicUsize,
    pub rwlock_clockrdlock: AtomicUsize,
    pub rwlock_wrlock: AtomicUsize,
    pub rwlock_trywrlock: AtomicUsize,
    pub rwlock_timedwrlock: AtomicUsize,
    pub rwlock_clockwrlock: AtomicUsize,
    pub rwlock_unlock: AtomicUsize,
    pub mutex_lock: AtomicUsize,
    pub mutex_trylock: AtomicUsize,
    pub mutex_timedlock: AtomicUsize,
    pub mutex_clocklock: AtomicUsize,
    pub mutex_unlock: AtomicUsize,
    pub cond_wait: AtomicUsize,
    pub cond_timedwait: AtomicUsize,
    pub cond_clockwait: AtomicUsize,
    pub mtx_lock: AtomicUsize,
    pub mtx_trylock: AtomicUsize,
    pub mtx_timedlock: AtomicUsize,
    pub mtx_unlock: AtomicUsize,
    pub cnd_wait: AtomicUsize,
    pub cnd_timedwait: AtomicUsize,
    pub clock_gettime: AtomicUsize,
    pub clock: AtomicUsize,
    pub times: AtomicUsize,
    pub getrusage: AtomicUsize,
    pub wait: AtomicUsize,
    pub waitpid: AtomicUsize,
    pub wait3: AtomicUsize,
    pub wait4: AtomicUsize,
    pub waitid: AtomicUsize,
    pub madvise: AtomicUsize,
    pub mremap: AtomicUsize,
}

pub static NEXT: Next = Next {
    sigaction: AtomicUsize::new(0),
    signal: AtomicUsize::new(0),
    sigprocmask: AtomicUsize::new(0),
    pthread_sigmask: AtomicUsize::new(0),
    sigsuspend: AtomicUsize::new(0),
    close: AtomicUsize::new(0),
    close_range: AtomicUsize::new(0),
    closefrom: AtomicUsize::new(0),
    dup2: AtomicUsize::new(0),
    dup3: AtomicUsize::new(0),
    nanosleep: AtomicUsize::new(0),
    clock_nanosleep: AtomicUsize::new(0),
    sem_wait: AtomicUsize::new(0),
    sem_timedwait: AtomicUsize::new(0),
    rwlock_rdlock: AtomicUsize::new(0),
    rwlock_tryrdlock: AtomicUsize::new(0),
    rwlock_timedrdlock: AtomicUsize::new(0),
    rwlock_clockrdlock: AtomicUsize::new(0),
    rwlock_wrlock: AtomicUsize::new(0),
    rwlock_trywrlock: AtomicUsize::new(0),
    rwlock_timedwrlock: AtomicUsize::new(0),
    rwlock_clockwrlock: AtomicUsize::new(0),
    rwlock_unlock: AtomicUsize::new(0),
    mutex_lock: AtomicUsize::new(0),
    mutex_trylock: AtomicUsize::new(0),
    mutex_timedlock: AtomicUsize::new(0),
    mutex_clocklock: AtomicUsize::new(0),
    mutex_unlock: AtomicUsize::new(0),
    cond_wait: AtomicUsize::new(0),
    cond_timedwait: AtomicUsize::new(0),
    cond_clockwait: AtomicUsize::new(0),
    mtx_lock: AtomicUsize::new(0),
    mtx_trylock: AtomicUsize::new(0),
    mtx_timedlock: AtomicUsize::new(0),
    mtx_unlock: AtomicUsize::new(0),
    cnd_wait: AtomicUsize::new(0),
    cnd_timedwait: AtomicUsize::new(0),
    clock_gettime: AtomicUsize::new(0),
    clock: AtomicUsize::new(0),
    times: AtomicUsize::new(0),
    getrusage: AtomicUsize::new(0),
    wait: AtomicUsize::new(0),
    waitpid: AtomicUsize::new(0),
    wait3: AtomicUsize::new(0),
    wait4: AtomicUsize::new(0),
    waitid: AtomicUsize::new(0),
    madvise: AtomicUsize::new(0),
    mremap: AtomicUsize::new(0),
};

/// Looks up the next definition of `name` (NUL-terminated), caching it in `slot`.
pub fn next(slot: &AtomicUsize, name: &[u8]) -> usize {
    let v = slot.load(Ordering::Relaxed);
    if v != 0 {
        return v;
    }
    // SAFETY: `name` is NUL-terminated; dlsym is called on a program thread outside any
    // checkpoint (wrappers and init only).
    let p = unsafe { dlsym(RTLD_NEXT, name.as_ptr()) } as usize;
    slot.store(p, Ordering::Relaxed);
    p
}

/// Resolves everything at load time so that wrappers rarely need `dlsym` later.
pub fn init(sv: &mut Saved) {
    let n = &NEXT;
    for (slot, name) in [
        (&n.sigaction, &b"sigaction\0"[..]),
        (&n.signal, b"signal\0"),
        (&n.sigprocmask, b"sigprocmask\0"),
        (&n.pthread_sigmask, b"pthread_sigmask\0"),
        (&n.sigsuspend, b"sigsuspend\0"),
        (&n.close, b"close\0"),
        (&n.close_range, b"close_range\0"),
        (&n.closefrom, b"closefrom\0"),
        (&n.dup2, b"dup2\0"),
        (&n.dup3, b"dup3\0"),
        (&n.nanosleep, b"nanosleep\0"),
        (&n.clock_nanosleep, b"clock_nanosleep\0"),
        (&n.sem_wait, b"sem_wait\0"),
        (&n.sem_timedwait, b"sem_timedwait\0"),
        (&n.rwlock_rdlock, b"pthread_rwlock_rdlock\0"),
        (&n.rwlock_tryrdlock, b"pthread_rwlock_tryrdlock\0"),
        (&n.rwlock_timedrdlock, b"pthread_rwlock_timedrdlock\0"),
        (&n.rwlock_clockrdlock, b"pthread_rwlock_clockrdlock\0"),
        (&n.rwlock_wrlock, b"pthread_rwlock_wrlock\0"),
        (&n.rwlock_trywrlock, b"pthread_rwlock_trywrlock\0"),
        (&n.rwlock_timedwrlock, b"pthread_rwlock_timedwrlock\0"),
        (&n.rwlock_clockwrlock, b"pthread_rwlock_clockwrlock\0"),
        (&n.rwlock_unlock, b"pthread_rwlock_unlock\0"),
        (&n.mutex_lock, b"pthread_mutex_lock\0"),
        (&n.mutex_trylock, b"pthread_mutex_trylock\0"),
        (&n.mutex_timedlock, b"pthread_mutex_timedlock\0"),
        (&n.mutex_clocklock, b"pthread_mutex_clocklock\0"),
        (&n.mutex_unlock, b"pthread_mutex_unlock\0"),
        (&n.cond_wait, b"pthread_cond_wait\0"),
        (&n.cond_timedwait, b"pthread_cond_timedwait\0"),
        (&n.cond_clockwait, b"pthread_cond_clockwait\0"),
        (&n.mtx_lock, b"mtx_lock\0"),
        (&n.mtx_trylock, b"mtx_trylock\0"),
        (&n.mtx_timedlock, b"mtx_timedlock\0"),
        (&n.mtx_unlock, b"mtx_unlock\0"),
        (&n.cnd_wait, b"cnd_wait\0"),
        (&n.cnd_timedwait, b"cnd_timedwait\0"),
        (&n.clock_gettime, b"clock_gettime\0"),
        (&n.clock, b"clock\0"),
        (&n.times, b"times\0"),
        (&n.getrusage, b"getrusage\0"),
        (&n.wait, b"wait\0"),
        (&n.waitpid, b"waitpid\0"),
        (&n.wait3, b"wait3\0"),
        (&n.wait4, b"wait4\0"),
        (&n.waitid, b"waitid\0"),
        (&n.madvise, b"madvise\0"),
        (&n.mremap, b"mremap\0"),
    ] {
        next(slot, name);
    }
    // SAFETY: plain symbol lookups with NUL-terminated names.
    unsafe {
        let off = dlsym(RTLD_DEFAULT, c"__rseq_offset".as_ptr() as *const u8) as *const isize;
        let size = dlsym(RTLD_DEFAULT, c"__rseq_size".as_ptr() as *const u8) as *const u32;
        if !off.is_null() && !size.is_null() {
            RSEQ_OFFSET.store(*off as u64, Ordering::Relaxed);
            RSEQ_SIZE.store(*size, Ordering::Relaxed);
        }
        let v = gnu_get_libc_version();
        if !v.is_null() {
            let mut i = 0;
            while i < sv.glibc_version.len() && *v.add(i) != 0 {
                sv.glibc_version[i] = *v.add(i);
                i += 1;
            }
        }
        pthread_atfork(None, None, Some(after_fork_child));
    }
}

/// In a child made by `fork`, the agent is dormant: the manager thread does not exist
/// there and the control socket belongs to the parent.
extern "C" fn after_fork_child() {
    // The child is a new process whose CPU time starts from zero, as it would without the
    // engine: the parent's offsets are not its own.
    crate::cputime::forget();
    if ACTIVE.swap(false, Ordering::AcqRel) {
        let fd = CTL_FD.swap(-1, Ordering::AcqRel);
        if fd >= 0 {
            let _ = sys::close(fd);
        }
    }
}

/// Sets the calling thread's `errno`.
pub fn set_errno(e: i32) {
    // SAFETY: __errno_location returns the calling thread's errno slot.
    unsafe { *__errno_location() = e };
}

/// The calling thread's `errno`.
pub fn get_errno() -> i32 {
    // SAFETY: __errno_location returns the calling thread's errno slot.
    unsafe { *__errno_location() }
}

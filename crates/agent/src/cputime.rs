//! The process's CPU time across restores.
//!
//! A restored process is a new one to the kernel, whose CPU clocks start again from zero
//! (its threads' too). A program that measures its CPU time (`clock()`,
//! `CLOCK_PROCESS_CPUTIME_ID`, `times()`, `getrusage(RUSAGE_SELF)`: Lua's `os.clock`,
//! Python's `time.process_time`, Node's `process.cpuUsage`) would see it go back at each
//! restore, and a loop that runs until it has used so much CPU time would never end in a
//! chain whose steps are shorter. So each
//! checkpoint records, while the threads are frozen, what the program has used so far, and
//! a restore makes the wrappers ([`crate::wrappers`]) add to the kernel's figures what it
//! takes to continue from there: the CPU time of the restore itself is not counted.
//!
//! Each thread's own CPU time (`CLOCK_THREAD_CPUTIME_ID`, `RUSAGE_THREAD`: Python's
//! `time.thread_time`) goes on the same way: every thread records its figures in the
//! checkpoint signal's handler, and takes its offsets there after the restore, in a row
//! that names it by TLS base and by its new tid. A thread created later (glibc may give it
//! the TLS block of one that ended) has another tid, so no row, and starts from zero.

use crate::arch;
use crate::global::{MAX_THREADS, NSLOTS};
use core::sync::atomic::{AtomicI32, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use limitless_sys as sys;

/// Process CPU time, user time and system time, in nanoseconds.
const N: usize = 3;

/// What to add to the kernel's figures in this process (0 until a restore).
static OFFSET: [AtomicI64; N] = [const { AtomicI64::new(0) }; N];
/// The program's figures at the last checkpoint (part of the image).
static AT_CHECKPOINT: [AtomicI64; N] = [const { AtomicI64::new(0) }; N];

fn ns(t: sys::Timespec) -> i64 {
    t.sec * 1_000_000_000 + t.nsec
}

pub fn tv_ns(t: sys::Timeval) -> i64 {
    t.sec * 1_000_000_000 + t.usec * 1000
}

/// The kernel's figures now, of the process or of the calling thread (CPU time from
/// `clock`, user and system time from `getrusage(who)`).
fn kernel(clock: i32, who: i32) -> [i64; N] {
    let r = sys::getrusage(who).unwrap_or_default();
    [ns(sys::clock_gettime(clock)), tv_ns(r.utime), tv_ns(r.stime)]
}

fn process_kernel() -> [i64; N] {
    kernel(sys::CLOCK_PROCESS_CPUTIME_ID, sys::RUSAGE_SELF)
}

fn thread_kernel() -> [i64; N] {
    kernel(sys::CLOCK_THREAD_CPUTIME_ID, sys::RUSAGE_THREAD)
}

/// Empties the thread rows.
fn clear_rows() {
    for r in &ROWS {
        r.fs.store(0, Ordering::Relaxed);
    }
}

/// Records the program's figures. Called by the manager while the threads are frozen.
pub fn record() {
    for (i, k) in process_kernel().into_iter().enumerate() {
        AT_CHECKPOINT[i].store(k + OFFSET[i].load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

/// Makes the figures continue from the checkpoint's. Called by the restart's leader while
/// it is the only thread.
pub fn adopt() {
    clear_rows();
    ROWS_IN_USE.store(NSLOTS.load(Ordering::Acquire).min(MAX_THREADS), Ordering::Release);
    for (i, k) in process_kernel().into_iter().enumerate() {
        OFFSET[i].store(AT_CHECKPOINT[i].load(Ordering::Relaxed) - k, Ordering::Release);
    }
}

/// Drops the offsets: in a child made by `fork`, whose CPU time is its own.
pub fn forget() {
    for o in &OFFSET {
        o.store(0, Ordering::Relaxed);
    }
    clear_rows();
}

/// A restored thread's offsets: thread CPU time, user time, system time.
struct Row {
    /// Its TLS base (0: an empty row).
    fs: AtomicU64,
    tid: AtomicI32,
    off: [AtomicI64; N],
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY_ROW: Row = Row { fs: AtomicU64::new(0), tid: AtomicI32::new(0), off: [const { AtomicI64::new(0) }; N] };

/// One row per thread slot, written by that thread after a restore.
static ROWS: [Row; MAX_THREADS] = [EMPTY_ROW; MAX_THREADS];
/// How many rows the last restore filled (its slots: a checkpoint counts its own slots anew
/// while the threads still look up theirs).
static ROWS_IN_USE: AtomicUsize = AtomicUsize::new(0);
/// Each slot's thread figures at the last checkpoint.
static THREAD_AT: [[AtomicI64; N]; MAX_THREADS] = [const { [const { AtomicI64::new(0) }; N] }; MAX_THREADS];
/// Where glibc keeps a thread's tid, from its TLS base (0: not known).
static TID_OFFSET: AtomicU64 = AtomicU64::new(0);

/// The calling thread's tid, from glibc's thread descriptor when its place is known.
fn current_tid(tp: u64) -> i32 {
    match TID_OFFSET.load(Ordering::Relaxed) {
        0 => sys::gettid(),
        // SAFETY: glibc's `pd->tid` of the calling thread, at the offset measured on a
        // thread of this process (`set_tid_address` pointed the kernel there).
        o => unsafe { core::ptr::read_volatile(tp.wrapping_add(o) as *const i32) },
    }
}

/// The calling thread's offsets (zero for a thread that has no row).
pub fn thread_offsets() -> [i64; N] {
    let tp = arch::thread_pointer();
    let mut tid = None;
    for r in ROWS.iter().take(ROWS_IN_USE.load(Ordering::Relaxed)) {
        if r.fs.load(Ordering::Acquire) == tp && r.tid.load(Ordering::Relaxed) == *tid.get_or_insert_with(|| current_tid(tp)) {
            return [0, 1, 2].map(|i| r.off[i].load(Ordering::Relaxed));
        }
    }
    [0; N]
}

/// Whether `clock` is the calling thread's CPU clock: `CLOCK_THREAD_CPUTIME_ID`,
/// `pthread_getcpuclockid` of itself, or the kernel's "this thread" encoding.
pub fn is_own_thread_clock(clock: i32) -> bool {
    clock == sys::CLOCK_THREAD_CPUTIME_ID
        || (clock < 0 && clock & 7 == 6 && (clock == -2 || !(clock >> 3) == current_tid(arch::thread_pointer())))
}

/// Records the calling thread's figures for slot `idx`. Called in the checkpoint
/// signal's handler, before the thread parks.
pub fn record_thread(idx: usize) {
    if idx >= MAX_THREADS {
        return;
    }
    let off = thread_offsets();
    for (i, k) in thread_kernel().into_iter().enumerate() {
        THREAD_AT[idx][i].store(k + off[i], Ordering::Relaxed);
    }
}

/// Makes the calling thread's figures continue from slot `idx`'s. Called by each restored
/// thread before it is released; `tid_addr` is its `pd->tid` (0 if it has none).
pub fn adopt_thread(idx: usize, fs: u64, tid_addr: u64) {
    if idx >= MAX_THREADS {
        return;
    }
    if tid_addr > fs && tid_addr - fs < 1 << 20 {
        TID_OFFSET.store(tid_addr - fs, Ordering::Relaxed);
    }
    let r = &ROWS[idx];
    for (i, k) in thread_kernel().into_iter().enumerate() {
        r.off[i].store(THREAD_AT[idx][i].load(Ordering::Relaxed) - k, Ordering::Relaxed);
    }
    r.tid.store(sys::gettid(), Ordering::Relaxed);
    r.fs.store(fs, Ordering::Release);
}

/// Nanoseconds to add to the process CPU time, user time or system time (0, 1, 2).
#[inline(always)]
pub fn offset(i: usize) -> i64 {
    OFFSET[i].load(Ordering::Relaxed)
}

/// Whether any figure needs adjusting (only in a restored process).
#[inline(always)]
pub fn active() -> bool {
    offset(0) != 0 || offset(1) != 0 || offset(2) != 0
}

/// Adds `add_ns` to a (seconds, sub-seconds) pair counted in `unit_ns`, never below zero.
pub fn shift(sec: &mut i64, sub: &mut i64, unit_ns: i64, add_ns: i64) {
    let per_sec = 1_000_000_000 / unit_ns;
    let total = (*sec * 1_000_000_000 + *sub * unit_ns + add_ns).max(0);
    *sec = total / 1_000_000_000;
    *sub = (total % 1_000_000_000) / unit_ns % per_sec;
}

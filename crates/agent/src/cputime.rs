//! The process's CPU time across restores.
//!
//! A restored process is a new one to the kernel, whose CPU clocks start again from zero. A
//! program that measures its CPU time (`clock()`, `CLOCK_PROCESS_CPUTIME_ID`, `times()`,
//! `getrusage(RUSAGE_SELF)`: Lua's `os.clock`, Python's `time.process_time`, Node's
//! `process.cpuUsage`) would see it go back at each restore, and a loop that runs until it
//! has used so much CPU time would never end in a chain whose steps are shorter. So each
//! checkpoint records, while the threads are frozen, what the program has used so far, and
//! a restore makes the wrappers ([`crate::wrappers`]) add to the kernel's figures what it
//! takes to continue from there: the CPU time of the restore itself is not counted. The
//! CPU time of single threads (`CLOCK_THREAD_CPUTIME_ID`, `RUSAGE_THREAD`) is not
//! carried.

use core::sync::atomic::{AtomicI64, Ordering};
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

fn tv_ns(t: sys::Timeval) -> i64 {
    t.sec * 1_000_000_000 + t.usec * 1000
}

/// The kernel's figures for this process now.
fn kernel() -> [i64; N] {
    let r = sys::getrusage(sys::RUSAGE_SELF).unwrap_or_default();
    [ns(sys::clock_gettime(sys::CLOCK_PROCESS_CPUTIME_ID)), tv_ns(r.utime), tv_ns(r.stime)]
}

/// Records the program's figures. Called by the manager while the threads are frozen.
pub fn record() {
    for (i, k) in kernel().into_iter().enumerate() {
        AT_CHECKPOINT[i].store(k + OFFSET[i].load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

/// Makes the figures continue from the checkpoint's. Called by the restart's leader while
/// it is the only thread.
pub fn adopt() {
    for (i, k) in kernel().into_iter().enumerate() {
        OFFSET[i].store(AT_CHECKPOINT[i].load(Ordering::Relaxed) - k, Ordering::Release);
    }
}

/// Drops the offsets: in a child made by `fork`, whose CPU time is its own.
pub fn forget() {
    for o in &OFFSET {
        o.store(0, Ordering::Relaxed);
    }
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

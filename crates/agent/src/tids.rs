//! The thread ids each thread had before restores.
//!
//! A restore gives every thread a new id, but glibc's read-write locks name their writer by
//! the id it had when it took the lock (`__cur_writer`), and compare that with the caller's
//! id: a lock held for writing across a restore is then neither released by its holder's
//! unlock (glibc takes it for a reader's) nor answered with `EDEADLK` when its holder asks
//! for it again (OpenSSL 3 relies on that). The lock wrappers ([`crate::wrappers`]) ask
//! [`was_mine`] whether a lock's writer is an earlier id of the calling thread, and if so
//! hand the lock back to it under its current id.
//!
//! A thread is known across restores by its TLS base, which a restore keeps. The table has
//! a row for each thread of the last checkpoint: its TLS base and its last [`HISTORY`] ids,
//! newest first, so a lock held untouched across that many restores is still recognised.
//! It lives in the agent's `.bss`, so it is part of every image. Only the restart's leader
//! writes it, before it creates any other thread; afterwards it is read-only until the next
//! restore. Two tables take turns, so that the new one is built from the old.

use crate::global::{Shared, MAX_THREADS, NSLOTS, SLOTS};
use core::sync::atomic::{AtomicUsize, Ordering};
use limitless_image::format::ThreadInfo;

/// Ids remembered per thread.
pub const HISTORY: usize = 8;

#[derive(Clone, Copy)]
struct Row {
    fs_base: u64,
    /// Newest first; 0: none.
    tids: [i32; HISTORY],
}

struct Table {
    n: usize,
    /// The smallest and largest id in `rows`: most ids asked about (a lock's holder in this
    /// run) are newer than all of them, and are answered without a search.
    lo: i32,
    hi: i32,
    rows: [Row; MAX_THREADS],
}

const EMPTY: Table = Table { n: 0, lo: 0, hi: 0, rows: [Row { fs_base: 0, tids: [0; HISTORY] }; MAX_THREADS] };

static TABLES: Shared<[Table; 2]> = Shared::new([EMPTY, EMPTY]);
/// Which table is current.
static CURRENT: AtomicUsize = AtomicUsize::new(0);

/// Records, for each thread of the checkpoint being restored, the id it had then. Called by
/// the restart's leader while it is the only thread.
pub fn remember() {
    let cur = CURRENT.load(Ordering::Acquire) & 1;
    // SAFETY: the restart's leader is the only thread of the process now; nothing else
    // reads or writes the tables until it has created the others (module documentation).
    let tables = unsafe { &mut *TABLES.ptr() };
    let (a, b) = tables.split_at_mut(1);
    let (old, new) = if cur == 0 { (&a[0], &mut b[0]) } else { (&b[0], &mut a[0]) };
    new.n = 0;
    new.lo = i32::MAX;
    new.hi = 0;
    for s in SLOTS.iter().take(NSLOTS.load(Ordering::Acquire).min(MAX_THREADS)) {
        if s.state.load(Ordering::Acquire) != crate::global::slot::PARKED {
            continue;
        }
        // SAFETY: the slots were filled before the checkpoint and restored with memory; the
        // leader is the only thread.
        let info: &ThreadInfo = unsafe { &*s.info.get() };
        let mut row = Row { fs_base: info.fs_base, tids: [0; HISTORY] };
        row.tids[0] = info.tid as i32;
        if let Some(prev) = old.rows[..old.n.min(MAX_THREADS)].iter().find(|r| r.fs_base == info.fs_base) {
            row.tids[1..].copy_from_slice(&prev.tids[..HISTORY - 1]);
        }
        for &t in row.tids.iter().filter(|&&t| t > 0) {
            new.lo = new.lo.min(t);
            new.hi = new.hi.max(t);
        }
        new.rows[new.n] = row;
        new.n += 1;
    }
    CURRENT.store(cur ^ 1, Ordering::Release);
}

/// Whether `tid` lies within the ids the table holds: a cheap first test for [`was_mine`],
/// for callers on a hot path.
#[inline(always)]
pub fn may_be_old(tid: i32) -> bool {
    let t = current();
    tid > 0 && tid >= t.lo && tid <= t.hi
}

fn current() -> &'static Table {
    let cur = CURRENT.load(Ordering::Acquire) & 1;
    // SAFETY: the current table is read-only while the program's threads run (module
    // documentation); they were created after it was written.
    unsafe { &(*TABLES.ptr())[cur] }
}

/// Whether `tid` was the calling thread's id before one of the last [`HISTORY`] restores.
pub fn was_mine(tid: i32) -> bool {
    if !may_be_old(tid) {
        return false;
    }
    let t = current();
    let fs = crate::arch::thread_pointer();
    t.rows[..t.n.min(MAX_THREADS)].iter().any(|r| r.fs_base == fs && r.tids.contains(&tid))
}

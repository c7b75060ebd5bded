//! Children that had ended but had not been waited for (zombies) when a checkpoint was
//! taken.
//!
//! A restored process has no children, so a zombie the program would reap later (Python's
//! `subprocess.Popen` reaps at its next `poll()` or `wait()`) would make that `waitpid`
//! fail with `ECHILD` and its exit status would be lost. The checkpoint looks at each
//! child's status with `waitid(WNOWAIT)`, which leaves it a zombie in the running process,
//! and still refuses a child that is alive. The statuses live in the agent's `.bss`, so
//! they are part of the image. After a restore the wait wrappers ([`crate::wrappers`])
//! answer from them: a wait for that pid when no real child has it, and a wait for any
//! child first, as a zombie is ready at once.
//!
//! [`SEEN`] is written by a checkpoint while every program thread is parked; [`adopt`]
//! moves it into [`OWED`] in a restart's leader before any other thread exists. After that
//! the program's threads (and their signal handlers) claim entries with a compare-and-swap
//! of the pid, so no lock is taken.

use crate::global::Shared;
use core::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use limitless_sys as sys;

/// The most zombies a checkpoint records.
pub const MAX: usize = 64;

#[derive(Clone, Copy)]
struct Zombie {
    pid: i32,
    /// `si_code` (`CLD_EXITED`, `CLD_KILLED`, `CLD_DUMPED`) and `si_status`.
    code: i32,
    status: i32,
}

struct Table {
    n: usize,
    z: [Zombie; MAX],
}

const NONE: Zombie = Zombie { pid: 0, code: 0, status: 0 };

/// The zombies of the checkpoint being taken.
static SEEN: Shared<Table> = Shared::new(Table { n: 0, z: [NONE; MAX] });

/// After a restore: the zombies not waited for yet. A pid of 0 is a claimed entry.
#[allow(clippy::declare_interior_mutable_const)]
const FREE: AtomicI32 = AtomicI32::new(0);
static OWED_PID: [AtomicI32; MAX] = [FREE; MAX];
static OWED: Shared<[(i32, i32); MAX]> = Shared::new([(0, 0); MAX]);
/// How many entries of [`OWED_PID`] are unclaimed.
static N_OWED: AtomicUsize = AtomicUsize::new(0);

/// Why a checkpoint cannot record the children.
pub enum Refusal {
    /// This child is alive (or could not be asked).
    Alive(u64),
    /// More than [`MAX`] zombies.
    TooMany,
}

/// Starts the record of a checkpoint. Called by the manager while the program's threads
/// are parked.
pub fn begin() {
    // SAFETY: only the checkpoint writes SEEN, while the program's threads are parked.
    unsafe { (*SEEN.ptr()).n = 0 };
}

/// Records child `pid` if it has ended; refuses it if it is alive.
pub fn record(pid: u64) -> Result<(), Refusal> {
    let p = pid as i32;
    // SAFETY: as in `begin`.
    let t = unsafe { &mut *SEEN.ptr() };
    if t.z[..t.n].iter().any(|z| z.pid == p) {
        return Ok(());
    }
    match sys::waitid_pid(p, sys::WEXITED | sys::WNOHANG | sys::WNOWAIT) {
        Ok(Some((code, status))) => {
            if t.n == MAX {
                return Err(Refusal::TooMany);
            }
            t.z[t.n] = Zombie { pid: p, code, status };
            t.n += 1;
            Ok(())
        }
        _ => Err(Refusal::Alive(pid)),
    }
}

/// In a restart's leader, while it is the only thread: the zombies of the checkpoint
/// being restored join those still owed from earlier restores.
pub fn adopt() {
    // SAFETY: the leader is the only thread (module documentation).
    let (seen, owed) = unsafe { (&*SEEN.ptr(), &mut *OWED.ptr()) };
    let mut n = 0;
    for i in 0..MAX {
        let pid = OWED_PID[i].load(Ordering::Relaxed);
        if pid != 0 {
            let e = owed[i];
            OWED_PID[n].store(pid, Ordering::Relaxed);
            owed[n] = e;
            n += 1;
        }
    }
    for z in &seen.z[..seen.n.min(MAX)] {
        if n < MAX && z.pid > 0 && !OWED_PID[..n].iter().any(|p| p.load(Ordering::Relaxed) == z.pid) {
            OWED_PID[n].store(z.pid, Ordering::Relaxed);
            owed[n] = (z.code, z.status);
            n += 1;
        }
    }
    for p in &OWED_PID[n..] {
        p.store(0, Ordering::Relaxed);
    }
    N_OWED.store(n, Ordering::Release);
}

/// An owed zombie for a wait on `pid` (a pid, or any child for 0 and below), claimed
/// unless `keep`: `(pid, si_code, si_status)`.
pub fn take(pid: i32, keep: bool) -> Option<(i32, i32, i32)> {
    if N_OWED.load(Ordering::Acquire) == 0 {
        return None;
    }
    for (i, slot) in OWED_PID.iter().enumerate() {
        let p = slot.load(Ordering::Acquire);
        if p == 0 || (pid > 0 && p != pid) {
            continue;
        }
        // SAFETY: entries are written only by `adopt`, before the program's threads exist.
        let (code, status) = unsafe { (*OWED.ptr())[i] };
        if keep {
            return Some((p, code, status));
        }
        if slot.compare_exchange(p, 0, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            N_OWED.fetch_sub(1, Ordering::AcqRel);
            return Some((p, code, status));
        }
    }
    None
}

/// Whether the process has any owed zombie.
pub fn any() -> bool {
    N_OWED.load(Ordering::Acquire) > 0
}

/// The `waitpid` status word for a `si_code` and `si_status`.
pub fn wait_status(code: i32, status: i32) -> i32 {
    match code {
        sys::CLD_EXITED => (status & 0xff) << 8,
        sys::CLD_DUMPED => (status & 0x7f) | 0x80,
        _ => status & 0x7f,
    }
}

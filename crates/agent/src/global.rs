//! The agent's state. It lives in the agent's own `.bss`, which is part of every image, so
//! a restored agent finds its thread table, saved contexts and process state in memory.
//!
//! Ownership: fields are written by the thread that owns them at that moment. Outside a
//! checkpoint only `init` and the wrappers touch configuration. During a checkpoint the
//! manager owns everything except each [`Slot`]'s thread-written part, which its thread
//! writes before publishing `PARKED` (release) and the manager reads after seeing it
//! (acquire). During a restart the leader owns everything until it releases the clones.

use crate::arch::Ctx;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicUsize};
use limitless_image::format::{ThreadInfo, RLIMITS};
use limitless_sys::{Itimerval, KSigaction, Rlimit};

/// Most threads one checkpoint can hold.
pub const MAX_THREADS: usize = 4096;
/// Highest fd whose close-on-exec flag is remembered across a restart.
pub const MAX_FD: usize = 65536;

/// Slot states.
pub mod slot {
    pub const FREE: u32 = 0;
    pub const SIGNALED: u32 = 1;
    pub const PARKED: u32 = 2;
    pub const GONE: u32 = 3;
}

/// One thread of the checkpoint.
#[repr(C)]
pub struct Slot {
    pub state: AtomicU32,
    pub tid: AtomicI32,
    pub ctx: UnsafeCell<Ctx>,
    pub info: UnsafeCell<ThreadInfo>,
}

/// A cell that is `Sync` because the protocol above says who may touch it when.
pub struct Shared<T>(UnsafeCell<T>);

// SAFETY: access follows the ownership rules in the module documentation.
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    pub const fn new(v: T) -> Self {
        Shared(UnsafeCell::new(v))
    }
    /// Raw pointer to the value.
    pub fn ptr(&self) -> *mut T {
        self.0.get()
    }
}

// SAFETY: slots are shared between the manager and the threads through atomics and the
// publish protocol described above.
unsafe impl Sync for Slot {}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY_SLOT: Slot = Slot {
    state: AtomicU32::new(slot::FREE),
    tid: AtomicI32::new(0),
    ctx: UnsafeCell::new(Ctx { rbx: 0, rbp: 0, r12: 0, r13: 0, r14: 0, r15: 0, rsp: 0, rip: 0, mxcsr: 0, fcw: 0 }),
    info: UnsafeCell::new(EMPTY_INFO),
};

const EMPTY_INFO: ThreadInfo = ThreadInfo {
    tid: 0,
    role: 0,
    fs_base: 0,
    gs_base: 0,
    tid_addr: 0,
    robust_head: 0,
    robust_len: 0,
    rseq_area: 0,
    rseq_len: 0,
    rseq_sig: 0,
    ctx: limitless_image::format::SavedCtx { rbx: 0, rbp: 0, r12: 0, r13: 0, r14: 0, r15: 0, rsp: 0, rip: 0, mxcsr: 0, fcw: 0 },
    sigmask: 0,
    ip: 0,
    syscall: 0,
    altstack_sp: 0,
    altstack_size: 0,
    altstack_flags: 0,
    reserved: 0,
    name: [0; 16],
};

/// The thread table.
pub static SLOTS: [Slot; MAX_THREADS] = [EMPTY_SLOT; MAX_THREADS];
/// Slots in use in the current checkpoint.
pub static NSLOTS: AtomicUsize = AtomicUsize::new(0);
/// Which slot is the manager's.
pub static MANAGER_SLOT: AtomicUsize = AtomicUsize::new(0);

/// The agent is managing this process (not dormant).
pub static ACTIVE: AtomicBool = AtomicBool::new(false);
/// Whether the last restore mapped page data from image files (`restore --map`): then a
/// checkpoint looks for private mappings of image files ([`crate::scan`]).
pub static IMAGE_MAPPED: AtomicBool = AtomicBool::new(false);
/// The control socket.
pub static CTL_FD: AtomicI32 = AtomicI32::new(-1);
/// The checkpoint signal.
pub static SIG: AtomicI32 = AtomicI32::new(61);
/// Checkpoint generation, carried in each freeze signal so that a stray signal is ignored.
pub static GEN: AtomicU32 = AtomicU32::new(0);
/// Futex: parked threads wait for it to change.
pub static RELEASE: AtomicU32 = AtomicU32::new(0);
/// Futex: number of threads parked (freeze) or arrived (restart).
pub static PARKED: AtomicU32 = AtomicU32::new(0);
/// Incremented every time threads are released; sleep wrappers use it to tell a
/// checkpoint's `EINTR` from the program's own.
pub static EPOCH: AtomicU32 = AtomicU32::new(0);
/// Checkpoints taken and restores done.
pub static GENERATION: AtomicU32 = AtomicU32::new(0);
pub static RESTORES: AtomicU32 = AtomicU32::new(0);
/// glibc's `__rseq_offset` and `__rseq_size` (0: rseq unused).
pub static RSEQ_OFFSET: AtomicU64 = AtomicU64::new(0);
pub static RSEQ_SIZE: AtomicU32 = AtomicU32::new(0);

/// Process-wide state the restart puts back (kernel state that memory does not carry).
pub struct Saved {
    pub sigactions: [KSigaction; 65],
    pub rlimits: [Rlimit; RLIMITS],
    pub itimers: [Itimerval; 3],
    pub umask: u32,
    pub cwd: [u8; 4096],
    pub cwd_len: usize,
    /// Close-on-exec flag per fd.
    pub cloexec: [u64; MAX_FD / 64],
    pub main_exited: bool,
    /// The environment string that carries our fd and pid (`LIMITLESS_AGENT=...`).
    pub env_slot: usize,
    pub glibc_version: [u8; 16],
    /// The restorer's gap, unmapped once every thread has left it.
    pub gap_start: usize,
    pub gap_len: usize,
    pub restart_started_ns: u64,
}

pub static SAVED: Shared<Saved> = Shared::new(Saved {
    sigactions: [KSigaction { handler: 0, flags: 0, restorer: 0, mask: 0 }; 65],
    rlimits: [Rlimit { cur: 0, max: 0 }; RLIMITS],
    itimers: [Itimerval { interval_sec: 0, interval_usec: 0, value_sec: 0, value_usec: 0 }; 3],
    umask: 0o022,
    cwd: [0; 4096],
    cwd_len: 0,
    cloexec: [0; MAX_FD / 64],
    main_exited: false,
    env_slot: 0,
    glibc_version: [0; 16],
    gap_start: 0,
    gap_len: 0,
    restart_started_ns: 0,
});

/// Raw access to [`SAVED`].
///
/// # Safety
/// The caller must own the state at this moment (module documentation).
#[allow(clippy::mut_from_ref)]
pub unsafe fn saved() -> &'static mut Saved {
    // SAFETY: forwarded to the caller.
    unsafe { &mut *SAVED.ptr() }
}

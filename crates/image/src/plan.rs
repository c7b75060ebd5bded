//! The restore plan: the pre-digested, flat input of the restorer.
//!
//! The supervisor reads and validates the image, then writes a plan into a memfd: where to
//! put the restorer while it works (candidate gaps), which memory areas to create from
//! which fds, the runs of page data that arrive in order on the data fd, the vDSO layout,
//! the `prctl(PR_SET_MM_MAP)` fields and where to jump. The restorer's own checks are bounds
//! checks only (like CRIU's `struct task_restore_args`).

use crate::format::{MmInfo, VdsoInfo, AUXV_WORDS};
use crate::wire;

/// `b"LMTLPLAN"`.
pub const PLAN_MAGIC: u64 = u64::from_le_bytes(*b"LMTLPLAN");
/// Version of the plan layout (the restorer and supervisor always come from one build).
pub const PLAN_VERSION: u32 = 8;
/// Most gap candidates in a plan.
pub const MAX_GAPS: u32 = 32;

wire! {
    /// The start of a plan.
    pub struct PlanHeader {
        pub magic: u64,
        pub version: u32,
        pub flags: u32,
        /// Total plan length in bytes.
        pub plan_len: u64,
        /// Bytes the restorer needs in its gap (itself, its stack, the plan, scratch).
        pub gap_len: u64,
        pub n_gaps: u32,
        pub n_vmas: u32,
        pub n_runs: u64,
        pub n_checks: u64,
        pub gaps_off: u64,
        pub vmas_off: u64,
        pub runs_off: u64,
        pub checks_off: u64,
        /// The supervisor writes tokens here ([`TOKEN_END`]), then one byte, [`VERIFIED`],
        /// once it has checked every page record; the program may run only after it
        /// arrives.
        pub data_fd: i32,
        /// Errors are written here (one line) before the restorer exits.
        pub err_fd: i32,
        pub vdso: VdsoInfo,
        pub mm: MmInfo,
        pub auxv: [u64; AUXV_WORDS],
        pub auxv_words: u32,
        /// Reserved (0).
        pub reserved: u32,
        /// Where to jump (the agent's restart entry), with a pointer to
        /// [`RestartArgs`] in `rdi`.
        pub restart_entry: u64,
        pub agent_state: u64,
        /// FS base to load before the jump (the main thread's TLS).
        pub leader_fs: u64,
        /// Highest fd the restorer may close when it is done (its own fds).
        pub close_from: i32,
        pub close_to: i32,
        /// The ring of [`RING_SLOT_LEN`]-byte slots (a memfd) through which the supervisor
        /// passes the records it reads itself ([`pcf::STAGED`]), or -1.
        pub ring_fd: i32,
        /// The restorer writes a slot's number (a `u32`) here once it has copied it out.
        pub release_fd: i32,
        pub ring_slots: u32,
        /// Reserved (0).
        pub reserved2: u32,
        /// Dirty tracking from the restored image on ([`pvf::TRACK`]): the image's windows
        /// in those areas ([`PlanTrack`]), in address order, that the agent takes as its
        /// baseline.
        pub n_track: u64,
        pub track_off: u64,
    }
}

/// The length of a ring slot: a page, then a page window's pages (the pages start on a page
/// boundary, as `UFFDIO_COPY` needs).
pub const RING_SLOT_LEN: u64 = crate::format::PAGE * (1 + crate::format::WINDOW_PAGES);

/// A token on `data_fd` (eight bytes, little-endian): check `t as u32` is in ring slot
/// `t >> 32`. The supervisor writes one per staged check, in check order, then two
/// [`TOKEN_END`]s (one for each restorer thread that reads tokens), then [`VERIFIED`].
pub const TOKEN_END: u64 = u64::MAX;

wire! {
    /// A free range of the restored address space the restorer may occupy.
    pub struct PlanGap {
        pub start: u64,
        pub len: u64,
    }
}

/// The byte the supervisor sends on `data_fd`, after the tokens, when every page record
/// checked out.
pub const VERIFIED: u8 = b'G';

/// Mapping kinds in a plan.
pub mod pk {
    /// `MAP_PRIVATE|MAP_ANONYMOUS`.
    pub const ANON: u32 = 1;
    /// `MAP_PRIVATE` of `fd` at `offset`.
    pub const FILE_PRIVATE: u32 = 2;
    /// `MAP_SHARED` of `fd` at `offset`.
    pub const FILE_SHARED: u32 = 3;
    /// Not a mapping: guard pages (`MADV_GUARD_INSTALL`) inside the area before it, installed
    /// once the page data is in.
    pub const GUARD: u32 = 4;
}

/// Plan VMA flags.
pub mod pvf {
    /// Map with `MAP_GROWSDOWN` (the main stack).
    pub const GROWSDOWN: u32 = 1;
    /// Page data for this area follows in the data stream (map writable, then mprotect).
    pub const HAS_DATA: u32 = 2;
    /// `madvise(MADV_DONTFORK)`.
    pub const DONTFORK: u32 = 4;
    /// `madvise(MADV_WIPEONFORK)`.
    pub const WIPEONFORK: u32 = 8;
    /// Anonymous: it may be filled with `UFFDIO_COPY` (into fresh pages, which the kernel
    /// then need not clear).
    pub const COPY: u32 = 16;
    /// Once its page data is in, register the area for asynchronous write-protection and
    /// protect it, so that the agent's dirty tracking starts from the image: a later delta
    /// on top of this image need not read what the program has not written since.
    pub const TRACK: u32 = 32;
}

/// Page run flags.
pub mod prf {
    /// The run's area has [`pvf::COPY`](super::pvf::COPY).
    pub const COPY: u32 = 1;
    /// The run's area is a private mapping of a file ([`pk::FILE_PRIVATE`]).
    pub const FILE: u32 = 2;
}

wire! {
    /// One memory area to create.
    pub struct PlanVma {
        pub start: u64,
        pub len: u64,
        pub offset: u64,
        pub kind: u32,
        pub prot: u32,
        pub flags: u32,
        pub fd: i32,
    }
}

wire! {
    /// A run of page data: `len` bytes to copy into `start` from its page record (the
    /// [`PlanCheck`] it belongs to), `file_off` being its place in the record's file (for a
    /// staged record: in the record's payload, as if the payload began at 0). A run lies
    /// inside one area and one record.
    pub struct PlanRun {
        pub start: u64,
        pub len: u64,
        pub file_off: u64,
        pub fd: i32,
        /// [`prf`] bits.
        pub flags: u32,
    }
}

/// Page record check flags.
pub mod pcf {
    /// Compare the payload's XXH3-128 with `sum` (else the supervisor checks the record).
    pub const VERIFY: u32 = 1;
    /// The supervisor reads, checks (and decompresses) the record and passes its pages in
    /// a ring slot (`fd` is the ring, `file_off` 0, `sum` unused); a token on `data_fd`
    /// says which slot.
    pub const STAGED: u32 = 2;
    /// With [`VERIFY`]: the record's pages start on a page boundary of its file, and every
    /// run lies in an area that may hold a private mapping of that file (`restore --map`).
    /// The restorer checks the payload through a read-only mapping of it, then maps each
    /// run from the file copy-on-write instead of copying it; if a mapping fails it copies
    /// the record instead.
    pub const MAP: u32 = 4;
    /// With [`VERIFY`]: the record is stored as its changes ([`crate::diff`]); `len` is its
    /// payload's length. The restorer applies them to each page in place (the file the
    /// run's area maps, [`prf::FILE`], or zeros) and checks the rebuilt pages' sum.
    pub const DIFF: u32 = 8;
}

wire! {
    /// One page record: its payload (pages header, then pages), `len` bytes at `file_off`
    /// in the image file `fd`, holds the data of runs `first_run .. first_run + n_runs`
    /// (each at its own `file_off`, a whole number of pages after the pages header). The
    /// restorer reads the payload once, checks it against `sum` (with [`pcf::VERIFY`]) and
    /// copies the runs from it; or, [`pcf::STAGED`], copies them from the ring slot a token
    /// names. Every record has one check, in record order, and every run belongs to one.
    pub struct PlanCheck {
        pub file_off: u64,
        pub len: u64,
        /// XXH3-128 of the payload, little-endian ([`crate::format::page_sum`]).
        pub sum: [u8; 16],
        pub first_run: u64,
        pub n_runs: u32,
        pub fd: i32,
        /// [`pcf`] bits.
        pub flags: u32,
        /// Reserved (0).
        pub reserved: u32,
    }
}

wire! {
    /// One window of the dirty-tracking baseline: its pages header as in the image, and
    /// the start of the area it lies in.
    pub struct PlanTrack {
        pub hdr: crate::format::PagesHeader,
        pub area_start: u64,
    }
}

/// The lowest descriptor number of the dirty-tracking userfaultfd (the agent's, or the
/// restorer's for `restore --track`), out of the program's way.
pub const TRACK_FD_FLOOR: usize = 900;

/// `b"LMTLRARG"`.
pub const RESTART_MAGIC: u64 = u64::from_le_bytes(*b"LMTLRARG");
/// Version of [`RestartArgs`]. The agent in an image may be older than the restorer, so
/// this layout only grows at the end.
pub const RESTART_VERSION: u32 = 2;

/// Bits of [`RestartArgs::flags`].
pub mod restart_flags {
    /// Some page data is mapped copy-on-write from image files ([`super::pcf::MAP`]): at
    /// a checkpoint, the agent copies every page of a private mapping of an image file, as
    /// for a file that is gone, instead of referring to the file.
    pub const MAPPED: u32 = 1;
}

/// What the restorer hands to the agent's restart entry (in memory, by pointer).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RestartArgs {
    pub magic: u64,
    pub version: u32,
    pub pid: u32,
    /// The restorer's gap, to unmap once every thread has left it.
    pub gap_start: u64,
    pub gap_len: u64,
    /// When the restorer started (CLOCK_MONOTONIC ns).
    pub started_ns: u64,
    /// Bytes of page data the restorer read.
    pub data_bytes: u64,
    /// From version 2: the userfaultfd the [`pvf::TRACK`] areas are registered with and
    /// write-protected (-1: none), and where the plan's `n_track` [`PlanTrack`] entries are
    /// (in the gap; the agent copies them before it unmaps the gap).
    pub track_uffd: i32,
    /// [`restart_flags`] bits (0 before any was defined).
    pub flags: u32,
    pub track: u64,
    pub n_track: u64,
}

/// Exit status of a restorer that failed before the program ran.
pub const RESTORER_FAILED: i32 = 121;

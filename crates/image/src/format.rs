//! The records of a checkpoint image.
//!
//! An image is a file header, a sequence of records, an index and a trailer
//! (`docs/image-format.md`). The agent produces the records as a stream (process, threads,
//! memory areas, file descriptors, then page data, then `END`); the supervisor adds the
//! header, any records of its own (pending standard input), the index with one checksum
//! per record (BLAKE3; XXH3-128 for page records, [`page_sum`]), and the trailer.

use crate::wire;

/// First bytes of every image file.
pub const MAGIC: [u8; 8] = *b"LMTLSIMG";
/// First bytes of the trailer.
pub const END_MAGIC: [u8; 8] = *b"LMTLSEND";
/// Format major version: a reader refuses any other.
pub const FORMAT_MAJOR: u16 = 1;
/// Format minor version: a reader refuses a newer one.
pub const FORMAT_MINOR: u16 = 7;
/// The first minor version whose `PAGES` records are checksummed with [`page_sum`] (BLAKE3
/// before).
pub const PAGE_SUM_MINOR: u16 = 4;
/// The first minor version with `PAD` records: from 1.5 the pages of an uncompressed
/// `PAGES` record of at least [`ALIGN_FROM_PAGES`] pages start on a page boundary of the
/// file, so that a restore may map them instead of copying them (`restore --map`).
pub const PAD_MINOR: u16 = 5;
/// Page records with at least this many pages are aligned (format 1.5 on). Smaller ones
/// are not worth up to a page of padding each.
pub const ALIGN_FROM_PAGES: u64 = 16;
/// The first minor version whose `PAGES` records may be stored as their changes from the
/// file mapped there or from zeros ([`rflags::DIFF`], [`crate::diff`]).
pub const DIFF_MINOR: u16 = 6;
/// The first minor version whose records stored as changes may be compressed too
/// (`DIFF | ZSTD`): the changes are then one zstd frame.
pub const DIFF_ZSTD_MINOR: u16 = 7;

/// The first minor version in which a record stored as changes may have record flags
/// `flags` ([`DIFF_ZSTD_MINOR`] if compressed too, else [`DIFF_MINOR`]).
pub fn diff_since(flags: u32) -> u16 {
    if flags & rflags::ZSTD != 0 {
        DIFF_ZSTD_MINOR
    } else {
        DIFF_MINOR
    }
}

/// The checksum of a `PAGES` record's stored payload (format 1.4 on): its XXH3-128,
/// little-endian, in the first 16 of the index entry's 32 hash bytes, the rest zero.
///
/// Page data is most of an image, and the restorer checks each record itself as it reads
/// it, in the same cache-warm pass that copies it into place; XXH3 costs a fraction of
/// BLAKE3 there and needs no runtime CPU dispatch. It detects damage, not forgery: an
/// unsealed image file can be rewritten whole, hashes included, by anyone who can write it
/// (BLAKE3 would not change that), and images in a shared store are sealed by a MAC over
/// BLAKE3 chunk names (`docs/store.md`). A delta image's writer never trusts it to tell
/// two records apart: it compares their bytes.
pub fn page_sum(payload: &[u8]) -> [u8; 32] {
    let mut h = [0u8; 32];
    h[..16].copy_from_slice(&crate::xxh::xxh3_128(payload).to_le_bytes());
    h
}

/// Page size the format is defined for.
pub const PAGE: u64 = 4096;
/// Largest address of user space on x86-64 with 4-level page tables (exclusive).
pub const USER_END: u64 = 0x7fff_ffff_f000;
/// Pages in one page window (one `PAGES` record covers at most this many).
pub const WINDOW_PAGES: u64 = 256;

/// Limits that a reader enforces before allocating anything.
pub mod limits {
    /// Threads in one image.
    pub const MAX_THREADS: u32 = 16_384;
    /// Memory areas in one image.
    pub const MAX_VMAS: u32 = 262_144;
    /// Most guard-page ranges in one memory area.
    pub const MAX_GUARDS: u32 = 65_536;
    /// File descriptors in one image.
    pub const MAX_FDS: u32 = 65_536;
    /// Length of a path or a memory area name.
    pub const MAX_PATH: u32 = 4096;
    /// Size of any metadata record payload.
    pub const MAX_META: u64 = 1 << 20;
    /// Size of a file descriptor record (unread pipe data rides in it).
    pub const MAX_FD_RECORD: u64 = 4 << 20;
    /// Interest-list entries of one epoll.
    pub const MAX_EPOLL_ITEMS: u32 = 65_536;
    /// Capacity of a pipe (Linux's default `fs.pipe-max-size`).
    pub const MAX_PIPE: u32 = 1 << 20;
    /// Pending standard input carried in an image.
    pub const MAX_STDIN: u64 = 64 << 20;
    /// Records in one image.
    pub const MAX_RECORDS: u64 = 1 << 28;
    /// Parent images a delta image may refer to.
    pub const MAX_PARENTS: u32 = 1024;
}

/// Record kinds.
pub mod kind {
    /// [`ProcessInfo`](super::ProcessInfo) + cwd + exe path. Exactly one, first.
    pub const PROCESS: u32 = 1;
    /// [`ThreadInfo`](super::ThreadInfo). One per thread.
    pub const THREAD: u32 = 2;
    /// [`VmaInfo`](super::VmaInfo) + name. One per memory area, in address order.
    pub const VMA: u32 = 3;
    /// [`FdInfo`](super::FdInfo) + path. One per file descriptor.
    pub const FD: u32 = 4;
    /// [`PagesHeader`](super::PagesHeader) + page data.
    pub const PAGES: u32 = 5;
    /// Bytes written to the program's standard input that it had not read yet.
    pub const STDIN: u32 = 6;
    /// [`EndInfo`](super::EndInfo): the agent's stream is complete.
    pub const END: u32 = 7;
    /// The index: [`IndexEntry`](super::IndexEntry) per record. Written by the supervisor.
    pub const INDEX: u32 = 8;
    /// [`FileObj`](super::FileObj) + name: a file the image carries (format 1.1).
    pub const FILE: u32 = 9;
    /// [`FileData`](super::FileData) + bytes: part of a carried file's contents.
    pub const FILE_DATA: u32 = 10;
    /// Every `PAGES` record's [`PagesHeader`](super::PagesHeader), in order (format 1.3):
    /// where each record's pages go, readable without reading the records. Written by the
    /// supervisor after `END`.
    pub const PAGEMAP: u32 = 11;
    /// The images a delta image takes unchanged page records from (format 1.3): `u32`
    /// count, then per image [`ParentInfo`](super::ParentInfo) and its path. Written by the
    /// supervisor after `END`, before `PAGEMAP`.
    pub const PARENTS: u32 = 12;
    /// The ELF build-ids of the executable files the program had mapped (format 1.3): `u32`
    /// count, `u32` reserved, then per file `path_len: u32, id_len: u32`, the id and the
    /// path. Written by the supervisor just before `END`; at most one.
    pub const FILE_IDS: u32 = 13;
    /// Zero bytes that put the pages of the next `PAGES` record on a page boundary of the
    /// file (format 1.5). Less than a page; a reader checks it only when verifying.
    pub const PAD: u32 = 14;

    /// A short name for a kind.
    pub fn name(k: u32) -> &'static str {
        match k {
            PROCESS => "process",
            THREAD => "thread",
            VMA => "vma",
            FD => "fd",
            PAGES => "pages",
            STDIN => "stdin",
            END => "end",
            INDEX => "index",
            FILE => "file",
            FILE_DATA => "file-data",
            PAGEMAP => "pagemap",
            PARENTS => "parents",
            FILE_IDS => "file-ids",
            PAD => "pad",
            _ => "unknown",
        }
    }
}

/// Record flags.
pub mod rflags {
    /// The payload is a zstd frame; `raw_len` is its decompressed length.
    pub const ZSTD: u32 = 1;
    /// A `PAGES` record whose pages are another image's record (format 1.3): the
    /// [`PagesHeader`](super::PagesHeader) is followed by a [`PageRef`](super::PageRef)
    /// instead of the pages.
    pub const REF: u32 = 2;
    /// A `PAGES` record stored as the words in which its pages differ from their bases
    /// (format 1.6, [`crate::diff`]); `raw_len` is the length of the record with its pages.
    /// With [`ZSTD`] too (format 1.7), the changes are one zstd frame.
    pub const DIFF: u32 = 4;
    /// All known flags.
    pub const ALL: u32 = ZSTD | REF | DIFF;
}

wire! {
    /// The first 64 bytes of an image file.
    pub struct FileHeader {
        pub magic: [u8; 8],
        pub major: u16,
        pub minor: u16,
        pub header_size: u32,
        pub flags: u64,
        pub created_unix_ns: u64,
        pub reserved: [u8; 32],
    }
}

wire! {
    /// Precedes every record payload.
    pub struct RecordHeader {
        pub kind: u32,
        pub flags: u32,
        /// Bytes of payload that follow in the file.
        pub stored_len: u64,
        /// Bytes of payload once decompressed (= `stored_len` when not compressed).
        pub raw_len: u64,
        pub reserved: u64,
    }
}

wire! {
    /// One entry of the index: where a record is and the BLAKE3 hash of its stored payload.
    pub struct IndexEntry {
        pub offset: u64,
        pub kind: u32,
        pub flags: u32,
        pub stored_len: u64,
        pub raw_len: u64,
        pub hash: [u8; 32],
    }
}

wire! {
    /// The last bytes of an image file.
    pub struct Trailer {
        pub magic: [u8; 8],
        /// File offset of the index record's header.
        pub index_offset: u64,
        /// Number of records before the index.
        pub record_count: u64,
        /// Total file length, trailer included.
        pub file_len: u64,
        /// BLAKE3 of the file header.
        pub header_hash: [u8; 32],
        /// BLAKE3 of the index record (header and payload).
        pub index_hash: [u8; 32],
        /// BLAKE3 of every byte of the trailer before this field.
        pub trailer_hash: [u8; 32],
    }
}

wire! {
    /// CPU identity and features the image depends on (ifunc choices, xsave layout).
    pub struct CpuInfo {
        pub vendor: [u8; 12],
        pub signature: u32,
        pub leaf1_ecx: u32,
        pub leaf1_edx: u32,
        pub leaf7_ebx: u32,
        pub leaf7_ecx: u32,
        pub leaf7_edx: u32,
        pub leaf7_1_eax: u32,
        pub leafd_1_eax: u32,
        pub ext1_ecx: u32,
        pub ext1_edx: u32,
        pub xcr0: u64,
        pub xsave_size: u32,
        pub reserved: u32,
    }
}

/// Kinds of the kernel's special mappings recorded in [`VdsoInfo`].
pub mod vdso_kind {
    /// Not used.
    pub const NONE: u32 = 0;
    /// `[vvar]`
    pub const VVAR: u32 = 1;
    /// `[vvar_vclock]`
    pub const VVAR_VCLOCK: u32 = 2;
    /// `[vdso]`
    pub const VDSO: u32 = 3;
}

wire! {
    /// One of the kernel's special mappings.
    pub struct VdsoArea {
        pub kind: u32,
        pub reserved: u32,
        pub start: u64,
        pub len: u64,
    }
}

wire! {
    /// Where the vDSO block was, and a hash of its code (it must match at restore).
    pub struct VdsoInfo {
        pub areas: [VdsoArea; 4],
        pub count: u32,
        pub reserved: u32,
        /// FNV-1a 64 of the `[vdso]` bytes.
        pub vdso_hash: u64,
    }
}

wire! {
    /// The memory-layout fields that `prctl(PR_SET_MM_MAP)` sets at restore.
    pub struct MmInfo {
        pub start_code: u64,
        pub end_code: u64,
        pub start_data: u64,
        pub end_data: u64,
        pub start_brk: u64,
        pub brk: u64,
        pub start_stack: u64,
        pub arg_start: u64,
        pub arg_end: u64,
        pub env_start: u64,
        pub env_end: u64,
    }
}

wire! {
    /// A signal action as `rt_sigaction` sees it.
    pub struct SigactionW {
        pub handler: u64,
        pub flags: u64,
        pub restorer: u64,
        pub mask: u64,
    }
}

wire! {
    /// A resource limit.
    pub struct RlimitW {
        pub cur: u64,
        pub max: u64,
    }
}

wire! {
    /// An interval timer (`setitimer`), microseconds.
    pub struct ItimerW {
        pub interval_usec: u64,
        pub value_usec: u64,
    }
}

/// Process flags.
pub mod pflags {
    /// The program kept running after this checkpoint (`--leave-running`).
    pub const LEFT_RUNNING: u32 = 1;
    /// The original main thread had exited before the checkpoint.
    pub const MAIN_EXITED: u32 = 2;
    /// All known flags.
    pub const ALL: u32 = LEFT_RUNNING | MAIN_EXITED;
}

/// Number of auxv words kept.
pub const AUXV_WORDS: usize = 64;
/// Number of resource limits kept (RLIMIT_CPU..RLIMIT_RTTIME).
pub const RLIMITS: usize = 16;

wire! {
    /// Process-wide state. Followed in the payload by `cwd_len` bytes of the working
    /// directory and `exe_len` bytes of the executable's path.
    pub struct ProcessInfo {
        pub pid: u32,
        pub uid: u32,
        pub gid: u32,
        pub page_size: u32,
        pub thread_count: u32,
        pub vma_count: u32,
        pub fd_count: u32,
        pub flags: u32,
        /// Checkpoints taken of this program so far, this one included.
        pub generation: u32,
        /// Restores this program went through before this checkpoint.
        pub restores: u32,
        pub kernel_release: [u8; 64],
        pub glibc_version: [u8; 16],
        pub agent_version: u32,
        pub ctl_fd: i32,
        pub cpu: CpuInfo,
        pub vdso: VdsoInfo,
        pub mm: MmInfo,
        pub auxv: [u64; AUXV_WORDS],
        pub auxv_words: u32,
        pub umask: u32,
        pub personality: u32,
        pub sig_ckpt: u32,
        /// Address of the agent's restart entry point in the restored memory.
        pub restart_entry: u64,
        /// Address of the agent's state block in the restored memory.
        pub agent_state: u64,
        pub sigactions: [SigactionW; 64],
        pub rlimits: [RlimitW; RLIMITS],
        pub itimers: [ItimerW; 3],
        pub realtime_ns: u64,
        pub monotonic_ns: u64,
        pub boottime_ns: u64,
        pub cwd_len: u32,
        pub exe_len: u32,
    }
}

/// Thread roles.
pub mod role {
    /// An ordinary thread.
    pub const OTHER: u32 = 0;
    /// The thread-group leader (the thread that ran `main`).
    pub const MAIN: u32 = 1;
    /// The agent's manager thread.
    pub const MANAGER: u32 = 2;
}

wire! {
    /// Callee-saved registers at a thread's suspend point.
    pub struct SavedCtx {
        pub rbx: u64,
        pub rbp: u64,
        pub r12: u64,
        pub r13: u64,
        pub r14: u64,
        pub r15: u64,
        pub rsp: u64,
        pub rip: u64,
        pub mxcsr: u32,
        pub fcw: u32,
    }
}

wire! {
    /// One thread.
    pub struct ThreadInfo {
        pub tid: u32,
        pub role: u32,
        pub fs_base: u64,
        pub gs_base: u64,
        /// `clear_child_tid` (glibc points it at `pd->tid`).
        pub tid_addr: u64,
        pub robust_head: u64,
        pub robust_len: u64,
        pub rseq_area: u64,
        pub rseq_len: u32,
        pub rseq_sig: u32,
        pub ctx: SavedCtx,
        /// Signal mask of the interrupted code.
        pub sigmask: u64,
        /// Instruction pointer of the interrupted code.
        pub ip: u64,
        /// System call the thread was in (-1: none).
        pub syscall: i64,
        pub altstack_sp: u64,
        pub altstack_size: u64,
        pub altstack_flags: u32,
        pub reserved: u32,
        pub name: [u8; 16],
    }
}

/// Memory area kinds.
pub mod vma_kind {
    /// Private anonymous memory.
    pub const ANON: u32 = 1;
    /// The program break area (`[heap]`).
    pub const HEAP: u32 = 2;
    /// The main thread's stack (`[stack]`, grows down).
    pub const STACK: u32 = 3;
    /// A private mapping of a file that still exists: unmodified pages come from the file.
    pub const FILE_PRIVATE: u32 = 4;
    /// A shared mapping of a file: no pages, writes reach the file.
    pub const FILE_SHARED: u32 = 5;
    /// A private mapping of a file that is gone: every page is in the image.
    pub const FILE_GONE: u32 = 6;
    /// A shared mapping of a memfd or of shared anonymous memory: the object (same
    /// `dev`/`ino`) is a [`FileObj`](super::FileObj) of kind SHM; mappings of one object
    /// stay aliased.
    pub const SHM: u32 = 7;

    /// Whether dirty tracking covers areas of kind `k`: anonymous memory, the heap and the
    /// stack.
    pub fn tracked(k: u32) -> bool {
        k == ANON || k == HEAP || k == STACK
    }

    /// A short name for a kind.
    pub fn name(k: u32) -> &'static str {
        match k {
            ANON => "anon",
            HEAP => "heap",
            STACK => "stack",
            FILE_PRIVATE => "file",
            FILE_SHARED => "file-shared",
            FILE_GONE => "file-deleted",
            SHM => "shared-memory",
            _ => "unknown",
        }
    }
}

/// Memory area flags.
pub mod vflags {
    /// `MADV_DONTFORK` was set.
    pub const DONTFORK: u32 = 1;
    /// `MADV_WIPEONFORK` was set.
    pub const WIPEONFORK: u32 = 2;
    /// All known flags.
    pub const ALL: u32 = DONTFORK | WIPEONFORK;
}

wire! {
    /// One memory area. Followed in the payload by `name_len` bytes of its name, then by
    /// `n_guards` [`GuardRange`]s (format 1.2+).
    pub struct VmaInfo {
        pub start: u64,
        pub end: u64,
        pub pgoff: u64,
        pub prot: u32,
        pub kind: u32,
        pub flags: u32,
        pub name_len: u32,
        pub dev: u64,
        pub ino: u64,
        pub file_size: u64,
        pub mtime_sec: i64,
        pub mtime_nsec: u32,
        /// Guard-page ranges (`MADV_GUARD_INSTALL`) inside this area.
        pub n_guards: u32,
        /// Pages of this area stored in the image.
        pub pages: u64,
    }
}

/// Whether dirty tracking registers the area `v` (the agent at a checkpoint, the restorer
/// after `restore --track`): a [tracked](vma_kind::tracked) kind, accessible, and not much
/// larger than the pages it holds (write-protecting installs page tables over all of it).
pub fn worth_tracking(v: &VmaInfo) -> bool {
    vma_kind::tracked(v.kind) && v.prot != 0 && v.end - v.start <= 16 * v.pages * PAGE + (4 << 20)
}

wire! {
    /// Pages of a memory area that fault when touched (`MADV_GUARD_INSTALL`, Linux 6.13+).
    /// They are invisible in `/proc/PID/maps`; restore installs them again.
    pub struct GuardRange {
        pub start: u64,
        pub end: u64,
    }
}

/// File descriptor kinds.
pub mod fd_kind {
    /// A regular file, reopened by path at its offset.
    pub const REG: u32 = 1;
    /// A directory, reopened by path.
    pub const DIR: u32 = 2;
    /// A character device, reopened by path.
    pub const CHR: u32 = 3;
    /// One of the supervisor's standard pipes (`aux` = 0, 1 or 2).
    pub const STDIO: u32 = 4;
    /// A pipe of the program's own (`ino`: the pipe, `aux`: its capacity; a read end's
    /// extra data is the bytes not read yet, recorded on one read end per pipe).
    pub const PIPE: u32 = 5;
    /// An eventfd (`pos`: the counter; `aux` 1: semaphore mode).
    pub const EVENTFD: u32 = 6;
    /// A timerfd (extra data: a [`TimerfdState`](super::TimerfdState)).
    pub const TIMERFD: u32 = 7;
    /// A signalfd (`pos`: its signal mask).
    pub const SIGNALFD: u32 = 8;
    /// An epoll (extra data: its interest list, [`EpollItem`](super::EpollItem)s).
    pub const EPOLL: u32 = 9;
    /// A memfd (the object with the same `dev`/`ino` is a SHM [`FileObj`](super::FileObj)).
    pub const SHM: u32 = 10;
    /// A regular file deleted while open (its contents are a DELETED file object).
    pub const DELETED: u32 = 11;
    /// A socket (extra data: a [`SocketState`](super::SocketState); `aux` says what the
    /// restore makes of it, see [`sock`](super::sock)).
    pub const SOCKET: u32 = 12;

    /// A short name for a kind.
    pub fn name(k: u32) -> &'static str {
        match k {
            REG => "file",
            DIR => "dir",
            CHR => "chardev",
            STDIO => "stdio",
            PIPE => "pipe",
            EVENTFD => "eventfd",
            TIMERFD => "timerfd",
            SIGNALFD => "signalfd",
            EPOLL => "epoll",
            SHM => "memfd",
            DELETED => "deleted-file",
            SOCKET => "socket",
            _ => "unknown",
        }
    }
}

wire! {
    /// One file descriptor. Followed in the payload by `path_len` bytes of its path, then
    /// `extra_len` bytes of kind-specific state (format 1.1; zero in 1.0 images).
    pub struct FdInfo {
        pub fd: i32,
        pub kind: u32,
        pub open_flags: u32,
        pub fd_flags: u32,
        pub pos: u64,
        pub dev: u64,
        pub ino: u64,
        pub size: u64,
        pub mode: u32,
        /// The lowest fd sharing this open file description (itself if none).
        pub share: i32,
        pub mtime_sec: i64,
        pub mtime_nsec: u32,
        pub aux: u32,
        pub path_len: u32,
        pub extra_len: u32,
    }
}

wire! {
    /// A timerfd's state: `timerfd_gettime` (time left, interval) and `fdinfo`.
    pub struct TimerfdState {
        pub clockid: u32,
        pub settime_flags: u32,
        /// Expirations not read yet.
        pub ticks: u64,
        pub value_sec: i64,
        pub value_nsec: i64,
        pub interval_sec: i64,
        pub interval_nsec: i64,
    }
}

wire! {
    /// One entry of an epoll interest list.
    pub struct EpollItem {
        pub tfd: i32,
        pub events: u32,
        pub data: u64,
    }
}

/// What a restore makes of a socket (`FdInfo::aux`).
pub mod sock {
    /// A listening socket: bound to its address again and listening.
    pub const LISTEN: u32 = 1;
    /// A bound datagram socket: bound to its address again.
    pub const BOUND: u32 = 2;
    /// A connected stream socket: closed (reads see the end, writes fail), so the program
    /// notices and reconnects.
    pub const CLOSED: u32 = 3;
    /// A socket with no address yet: a new one of the same kind.
    pub const FRESH: u32 = 4;

    /// A short name.
    pub fn name(s: u32) -> &'static str {
        match s {
            LISTEN => "listening",
            BOUND => "bound",
            CLOSED => "closed at restore",
            FRESH => "unbound",
            _ => "unknown",
        }
    }
}

/// Socket flags in [`SocketState`].
pub mod sock_flags {
    pub const REUSEADDR: u32 = 1;
    pub const REUSEPORT: u32 = 2;
    pub const V6ONLY: u32 = 4;
}

wire! {
    /// A socket: its kind, options and local address.
    pub struct SocketState {
        pub family: u32,
        pub sock_type: u32,
        pub protocol: u32,
        pub flags: u32,
        pub addr_len: u32,
        pub reserved: u32,
        pub addr: [u8; 128],
    }
}

/// Kinds of files an image carries.
pub mod file_kind {
    /// A memfd or shared anonymous memory (restored as a memfd).
    pub const SHM: u32 = 1;
    /// A regular file deleted while the program had it open (restored unnamed).
    pub const DELETED: u32 = 2;
    /// A regular file written back to its path at restore (`--carry`).
    pub const CARRIED: u32 = 3;
    /// A directory created at restore (`--carry`).
    pub const CARRIED_DIR: u32 = 4;
    /// A symbolic link created at restore (`--carry`); its data is the target.
    pub const CARRIED_SYMLINK: u32 = 5;

    /// A short name for a kind.
    pub fn name(k: u32) -> &'static str {
        match k {
            SHM => "shared-memory",
            DELETED => "deleted",
            CARRIED => "file",
            CARRIED_DIR => "dir",
            CARRIED_SYMLINK => "symlink",
            _ => "unknown",
        }
    }
}

/// Ids of file objects the supervisor adds start here (the agent's are below).
pub const SUPERVISOR_FILE_IDS: u32 = 1 << 24;
/// Most bytes in one `FILE_DATA` record.
pub const FILE_DATA_MAX: u64 = 1 << 20;

wire! {
    /// A file the image carries. Followed by `name_len` bytes: the memfd's name, or the
    /// file's path.
    pub struct FileObj {
        pub id: u32,
        pub kind: u32,
        /// Identity in the checkpointed process (links memfd mappings and descriptors).
        pub dev: u64,
        pub ino: u64,
        pub size: u64,
        pub mode: u32,
        pub name_len: u32,
        pub mtime_sec: i64,
        pub mtime_nsec: u32,
        pub reserved: u32,
        /// Bytes of contents in its `FILE_DATA` records (holes and zero runs are left out).
        pub data_bytes: u64,
    }
}

wire! {
    /// Part of a file's contents: `len` bytes at `offset` follow.
    pub struct FileData {
        pub id: u32,
        pub reserved: u32,
        pub offset: u64,
        pub len: u64,
    }
}

wire! {
    /// Page data of one window of at most [`WINDOW_PAGES`] pages inside one memory area.
    /// Followed by `count` pages, those whose bit is set in `bitmap`, in address order.
    pub struct PagesHeader {
        pub start: u64,
        pub npages: u32,
        pub count: u32,
        pub bitmap: [u64; 4],
    }
}

wire! {
    /// Where a delta image's unchanged page record is: record `record` of parent `parent`
    /// (an index into the `PARENTS` list), whose index entry has this `hash`.
    pub struct PageRef {
        pub parent: u32,
        pub reserved: u32,
        pub record: u64,
        pub hash: [u8; 32],
    }
}

wire! {
    /// One image a delta image refers to: its trailer hash and length (it must be exactly
    /// that image), followed by `path_len` bytes of its absolute path.
    pub struct ParentInfo {
        pub trailer_hash: [u8; 32],
        pub file_len: u64,
        pub path_len: u32,
        pub reserved: u32,
    }
}

wire! {
    /// Statistics that close the agent's stream.
    pub struct EndInfo {
        pub records: u64,
        pub pages: u64,
        pub zero_pages: u64,
        pub freeze_ns: u64,
        pub write_ns: u64,
        pub reserved: [u64; 3],
    }
}

/// FNV-1a 64-bit hash (for the vDSO code, which the agent hashes without a library).
pub fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl PagesHeader {
    /// Whether page `i` of the window is present.
    pub fn has(&self, i: u32) -> bool {
        i < 256 && self.bitmap[(i / 64) as usize] & (1u64 << (i % 64)) != 0
    }
    /// Marks page `i` of the window present.
    pub fn set(&mut self, i: u32) {
        self.bitmap[(i / 64) as usize] |= 1u64 << (i % 64);
    }
    /// Calls `f(start, len)` for each run of present pages, in order.
    pub fn runs(&self, mut f: impl FnMut(u64, u64)) {
        let mut i = 0;
        while i < self.npages.min(256) {
            if self.has(i) {
                let s = i;
                while i < self.npages.min(256) && self.has(i) {
                    i += 1;
                }
                f(self.start + s as u64 * PAGE, (i - s) as u64 * PAGE);
            } else {
                i += 1;
            }
        }
    }
    /// Number of set bits within `npages`.
    pub fn popcount(&self) -> u32 {
        let mut n = 0;
        for i in 0..self.npages.min(256) {
            n += self.has(i) as u32;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_stable() {
        // These sizes are part of the format: changing one needs a new major version.
        assert_eq!(FileHeader::SIZE, 64);
        assert_eq!(RecordHeader::SIZE, 32);
        assert_eq!(IndexEntry::SIZE, 64);
        assert_eq!(Trailer::SIZE, 128);
        assert_eq!(PagesHeader::SIZE, 48);
        assert_eq!(ThreadInfo::SIZE, 200);
    }

    #[test]
    fn page_runs() {
        let mut h = PagesHeader { start: 0x1000, npages: 10, ..Default::default() };
        for i in [0, 1, 2, 5, 9] {
            h.set(i);
        }
        h.count = h.popcount();
        assert_eq!(h.count, 5);
        let mut runs = [(0, 0); 4];
        let mut n = 0;
        h.runs(|s, l| {
            runs[n] = (s, l);
            n += 1;
        });
        assert_eq!(&runs[..n], &[(0x1000, 3 * PAGE), (0x1000 + 5 * PAGE, PAGE), (0x1000 + 9 * PAGE, PAGE)]);
    }
}

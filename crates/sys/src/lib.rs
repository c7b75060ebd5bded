//! Raw Linux x86-64 system calls for the Limitless agent and restorer.
//!
//! Both run where libc must not be touched: the restorer has no libc at all, and the agent
//! works while the program's threads are frozen, possibly inside libc with its locks held
//! (engine.md, pitfall 1). Every call here is a bare `syscall` instruction: no `errno`, no
//! locks, no allocation, so it is async-signal-safe and leaves the interrupted thread's
//! `errno` alone. Errors come back as [`Errno`].
//!
//! # Safety
//! This is one of the two places (with the agent's `arch` module) where the engine talks to
//! the kernel directly. Functions that take raw addresses are `unsafe fn` and say what the
//! caller must guarantee; functions that take Rust references or slices are safe because
//! the kernel only reads or writes within the memory those references cover.
#![no_std]
#![allow(clippy::too_many_arguments)]

use core::arch::asm;

pub mod nr;

/// An error number returned by the kernel (a positive `E*` value).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Errno(pub i32);

impl Errno {
    pub const EPERM: Errno = Errno(1);
    pub const ENOENT: Errno = Errno(2);
    pub const EINTR: Errno = Errno(4);
    pub const EIO: Errno = Errno(5);
    pub const EBADF: Errno = Errno(9);
    pub const EAGAIN: Errno = Errno(11);
    pub const ENOMEM: Errno = Errno(12);
    pub const EFAULT: Errno = Errno(14);
    pub const EBUSY: Errno = Errno(16);
    pub const EEXIST: Errno = Errno(17);
    pub const EINVAL: Errno = Errno(22);
    pub const ENOSPC: Errno = Errno(28);
    pub const EPIPE: Errno = Errno(32);
    pub const ERANGE: Errno = Errno(34);
    pub const ENOSYS: Errno = Errno(38);
    pub const ECHILD: Errno = Errno(10);
    pub const ENOTTY: Errno = Errno(25);
    pub const ETIMEDOUT: Errno = Errno(110);
    pub const EOPNOTSUPP: Errno = Errno(95);
}

/// Result of a system call.
pub type Result<T> = core::result::Result<T, Errno>;

#[inline(always)]
fn check(ret: usize) -> Result<usize> {
    if ret > (-4096isize) as usize {
        Err(Errno(-(ret as isize) as i32))
    } else {
        Ok(ret)
    }
}

/// Issues system call `n` with up to six arguments.
///
/// # Safety
/// The arguments must be valid for system call `n`: pointers must point to memory of the size
/// and mutability the kernel expects, and the call must not break invariants the caller's
/// program relies on (unmapping its own stack, closing an fd in use, ...).
#[inline(always)]
pub unsafe fn syscall6(n: usize, a1: usize, a2: usize, a3: usize, a4: usize, a5: usize, a6: usize) -> usize {
    let ret: usize;
    // SAFETY: the caller guarantees the arguments are valid for this system call; the
    // `syscall` instruction clobbers only rcx and r11, which are declared.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") n => ret,
            in("rdi") a1, in("rsi") a2, in("rdx") a3,
            in("r10") a4, in("r8") a5, in("r9") a6,
            lateout("rcx") _, lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// Issues a system call and converts the result to [`Result`].
///
/// # Safety
/// As for [`syscall6`].
#[inline(always)]
pub unsafe fn sys(n: usize, a: [usize; 6]) -> Result<usize> {
    // SAFETY: forwarded to the caller.
    check(unsafe { syscall6(n, a[0], a[1], a[2], a[3], a[4], a[5]) })
}

macro_rules! sc {
    ($n:expr) => { sc!($n, 0, 0, 0, 0, 0, 0) };
    ($n:expr, $a:expr) => { sc!($n, $a, 0, 0, 0, 0, 0) };
    ($n:expr, $a:expr, $b:expr) => { sc!($n, $a, $b, 0, 0, 0, 0) };
    ($n:expr, $a:expr, $b:expr, $c:expr) => { sc!($n, $a, $b, $c, 0, 0, 0) };
    ($n:expr, $a:expr, $b:expr, $c:expr, $d:expr) => { sc!($n, $a, $b, $c, $d, 0, 0) };
    ($n:expr, $a:expr, $b:expr, $c:expr, $d:expr, $e:expr) => { sc!($n, $a, $b, $c, $d, $e, 0) };
    ($n:expr, $a:expr, $b:expr, $c:expr, $d:expr, $e:expr, $f:expr) => {
        sys($n, [$a as usize, $b as usize, $c as usize, $d as usize, $e as usize, $f as usize])
    };
}

// ---------------------------------------------------------------------------------------
// Constants (values from the x86-64 Linux UAPI headers).

pub const O_RDONLY: i32 = 0;
pub const O_WRONLY: i32 = 1;
pub const O_RDWR: i32 = 2;
pub const O_ACCMODE: i32 = 3;
pub const O_CREAT: i32 = 0o100;
pub const O_EXCL: i32 = 0o200;
pub const O_NOCTTY: i32 = 0o400;
pub const O_TRUNC: i32 = 0o1000;
pub const O_APPEND: i32 = 0o2000;
pub const O_NONBLOCK: i32 = 0o4000;
pub const O_DIRECTORY: i32 = 0o200000;
pub const O_NOFOLLOW: i32 = 0o400000;
pub const O_CLOEXEC: i32 = 0o2000000;
pub const O_PATH: i32 = 0o10000000;
pub const AT_FDCWD: i32 = -100;
pub const AT_EMPTY_PATH: i32 = 0x1000;
pub const AT_SYMLINK_NOFOLLOW: i32 = 0x100;

pub const F_DUPFD: i32 = 0;
pub const F_GETFD: i32 = 1;
pub const F_SETFD: i32 = 2;
pub const F_GETFL: i32 = 3;
pub const F_SETFL: i32 = 4;
pub const F_DUPFD_CLOEXEC: i32 = 1030;
pub const F_SETPIPE_SZ: i32 = 1031;
pub const F_GETPIPE_SZ: i32 = 1032;
pub const SPLICE_F_NONBLOCK: u32 = 2;
pub const FD_CLOEXEC: i32 = 1;

pub const SEEK_SET: i32 = 0;
pub const SEEK_CUR: i32 = 1;

pub const PROT_NONE: i32 = 0;
pub const PROT_READ: i32 = 1;
pub const PROT_WRITE: i32 = 2;
pub const PROT_EXEC: i32 = 4;
pub const MAP_SHARED: i32 = 0x01;
pub const MAP_PRIVATE: i32 = 0x02;
pub const MAP_FIXED: i32 = 0x10;
pub const MAP_ANONYMOUS: i32 = 0x20;
pub const MAP_GROWSDOWN: i32 = 0x100;
pub const MAP_NORESERVE: i32 = 0x4000;
pub const MAP_POPULATE: i32 = 0x8000;
pub const MAP_FIXED_NOREPLACE: i32 = 0x100000;
pub const MREMAP_MAYMOVE: i32 = 1;
pub const MREMAP_FIXED: i32 = 2;
pub const MADV_DONTNEED: i32 = 4;
pub const MADV_FREE: i32 = 8;
pub const MADV_DONTFORK: i32 = 10;
pub const MADV_WIPEONFORK: i32 = 18;
pub const MADV_HUGEPAGE: i32 = 14;
pub const MADV_NOHUGEPAGE: i32 = 15;
pub const MADV_DONTDUMP: i32 = 16;
pub const MADV_GUARD_INSTALL: i32 = 102;
pub const MADV_POPULATE_WRITE: i32 = 23;

pub const PR_SET_NAME: i32 = 15;
pub const PR_GET_NAME: i32 = 16;
pub const PR_SET_MM: i32 = 35;
pub const PR_SET_MM_MAP: usize = 14;
pub const PR_SET_MM_MAP_SIZE: usize = 15;
pub const PR_GET_TID_ADDRESS: i32 = 40;
pub const PR_SET_PDEATHSIG: i32 = 1;
pub const PR_GET_DUMPABLE: i32 = 3;

pub const ARCH_SET_FS: i32 = 0x1002;
pub const ARCH_GET_FS: i32 = 0x1003;
pub const ARCH_SET_GS: i32 = 0x1001;
pub const ARCH_GET_GS: i32 = 0x1004;

pub const FUTEX_WAIT: i32 = 0;
pub const FUTEX_WAKE: i32 = 1;
pub const FUTEX_PRIVATE_FLAG: i32 = 128;

pub const CLONE_VM: usize = 0x100;
pub const CLONE_FS: usize = 0x200;
pub const CLONE_FILES: usize = 0x400;
pub const CLONE_SIGHAND: usize = 0x800;
pub const CLONE_THREAD: usize = 0x10000;
pub const CLONE_SYSVSEM: usize = 0x40000;
pub const CLONE_SETTLS: usize = 0x80000;
pub const CLONE_PARENT_SETTID: usize = 0x100000;
pub const CLONE_CHILD_CLEARTID: usize = 0x200000;
/// `wait4`/`waitid` option: wait for children of any kind, also those whose exit signal is
/// not `SIGCHLD` (such as a snapshot child made with exit signal 0).
pub const __WALL: i32 = 0x4000_0000;

pub const SIG_BLOCK: i32 = 0;
pub const SIG_UNBLOCK: i32 = 1;
pub const SIG_SETMASK: i32 = 2;
pub const SA_SIGINFO: u64 = 4;
pub const SA_ONSTACK: u64 = 0x0800_0000;
pub const SA_RESTART: u64 = 0x1000_0000;
pub const SA_RESTORER: u64 = 0x0400_0000;
pub const SIGKILL: i32 = 9;
pub const SIGSTOP: i32 = 19;
pub const SIGSEGV: i32 = 11;
pub const NSIG: usize = 64;
pub const SI_QUEUE: i32 = -1;

pub const RSEQ_SIG: u32 = 0x5305_3053;
pub const RSEQ_FLAG_UNREGISTER: i32 = 1;

pub const KCMP_FILE: i32 = 0;

pub const CLOCK_REALTIME: i32 = 0;
pub const CLOCK_MONOTONIC: i32 = 1;
pub const CLOCK_BOOTTIME: i32 = 7;
pub const CLOCK_PROCESS_CPUTIME_ID: i32 = 2;
pub const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
pub const RUSAGE_SELF: i32 = 0;
pub const RUSAGE_THREAD: i32 = 1;

pub const S_IFMT: u32 = 0o170000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFCHR: u32 = 0o020000;
pub const S_IFIFO: u32 = 0o010000;
pub const S_IFSOCK: u32 = 0o140000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFBLK: u32 = 0o060000;

pub const MSG_CMSG_CLOEXEC: i32 = 0x4000_0000;
pub const MSG_NOSIGNAL: i32 = 0x4000;
pub const SOL_SOCKET: i32 = 1;
pub const SCM_RIGHTS: i32 = 1;

pub const PAGE_SIZE: usize = 4096;

// ---------------------------------------------------------------------------------------
// Kernel structures.

/// `struct kernel_sigaction` as `rt_sigaction` takes it on x86-64 (not glibc's layout).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct KSigaction {
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

/// `struct timespec`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct Timespec {
    pub sec: i64,
    pub nsec: i64,
}

/// `struct stat` on x86-64.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct Stat {
    pub dev: u64,
    pub ino: u64,
    pub nlink: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub pad0: u32,
    pub rdev: u64,
    pub size: i64,
    pub blksize: i64,
    pub blocks: i64,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
    pub unused: [i64; 3],
}

/// `struct iovec`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Iovec {
    pub base: usize,
    pub len: usize,
}

/// `stack_t` for `sigaltstack`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct StackT {
    pub sp: u64,
    pub flags: i32,
    pub pad: i32,
    pub size: u64,
}

/// `struct rlimit`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct Rlimit {
    pub cur: u64,
    pub max: u64,
}

/// `struct itimerval` (two `struct timeval`).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct Itimerval {
    pub interval_sec: i64,
    pub interval_usec: i64,
    pub value_sec: i64,
    pub value_usec: i64,
}

/// `struct prctl_mm_map` for `prctl(PR_SET_MM, PR_SET_MM_MAP)`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct PrctlMmMap {
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
    pub auxv: u64,
    pub auxv_size: u32,
    pub exe_fd: u32,
}

/// `struct msghdr`.
#[repr(C)]
pub struct Msghdr {
    pub name: usize,
    pub namelen: u32,
    pub pad: u32,
    pub iov: *const Iovec,
    pub iovlen: usize,
    pub control: *mut u8,
    pub controllen: usize,
    pub flags: i32,
}

/// `struct pm_scan_arg` for the `PAGEMAP_SCAN` ioctl (Linux 6.7+).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct PmScanArg {
    pub size: u64,
    pub flags: u64,
    pub start: u64,
    pub end: u64,
    pub walk_end: u64,
    pub vec: u64,
    pub vec_len: u64,
    pub max_pages: u64,
    pub category_inverted: u64,
    pub category_mask: u64,
    pub category_anyof_mask: u64,
    pub return_mask: u64,
}

/// `struct page_region`, one result of `PAGEMAP_SCAN`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

pub const PAGEMAP_SCAN: u64 = 0xc060_6610;

/// Where the next `PAGEMAP_SCAN` call over the same range starts, after a call that
/// returned `regions`: its `walk_end`, or the end of the last region if that is further.
/// Linux (seen on 6.18) can return a stale `walk_end`: when the walk stopped once because
/// its internal buffer was full (512 regions) and then went on to the end, `walk_end`
/// still names that first stop, though the regions past it were reported too. Starting
/// there again would report them twice, and out of order.
pub fn pagemap_scan_next(arg: &PmScanArg, regions: &[PageRegion]) -> u64 {
    regions.last().map_or(arg.walk_end, |r| r.end.max(arg.walk_end))
}
pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
pub const PAGE_IS_FILE: u64 = 1 << 2;
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;
pub const PAGE_IS_GUARD: u64 = 1 << 8;
/// `PAGEMAP_SCAN` flags: write-protect the matching pages (again); fail with `EPERM` on an
/// area not registered for asynchronous userfaultfd write-protection.
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

/// `struct uffdio_register` (`range` is start, len).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct UffdioRegister {
    pub start: u64,
    pub len: u64,
    pub mode: u64,
    pub ioctls: u64,
}

/// `struct uffdio_writeprotect` (`range` is start, len).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct UffdioWriteprotect {
    pub start: u64,
    pub len: u64,
    pub mode: u64,
}

/// `struct uffdio_copy`: fill `len` bytes at `dst` (missing pages of a registered area)
/// from `src`; `copy` returns the bytes done or a negated errno.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct UffdioCopy {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    pub copy: i64,
}

pub const UFFD_API: u64 = 0xaa;
/// `userfaultfd(2)` flag: handle faults from user mode only (allowed unprivileged).
pub const UFFD_USER_MODE_ONLY: usize = 1;
/// A write to a write-protected page is resolved by the kernel itself (6.7+): no handler.
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
/// Write-protection also covers pages not populated yet (6.4+).
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
pub const UFFDIO_API: u64 = 0xc018_aa3f;
pub const UFFDIO_REGISTER: u64 = 0xc020_aa00;
pub const UFFDIO_WRITEPROTECT: u64 = 0xc018_aa06;
pub const UFFDIO_COPY: u64 = 0xc028_aa03;
// The ioctl number encodes the structure's size.
const _: () = assert!(core::mem::size_of::<UffdioCopy>() == 40);
pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
pub const UFFDIO_REGISTER_MODE_WP: u64 = 2;
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1;

/// `userfaultfd(2)`.
pub fn userfaultfd(flags: usize) -> Result<i32> {
    // SAFETY: userfaultfd takes only integer flags.
    check(unsafe { syscall6(nr::USERFAULTFD, flags, 0, 0, 0, 0, 0) }).map(|v| v as i32)
}

/// A userfaultfd for user-mode faults only (allowed unprivileged), opened with `flags`
/// (`O_CLOEXEC`, `O_NONBLOCK`) and with the `UFFDIO_API` handshake done for `features`;
/// closed again if the handshake fails.
pub fn userfaultfd_api(flags: usize, features: u64) -> Result<i32> {
    let fd = userfaultfd(flags | UFFD_USER_MODE_ONLY)?;
    let mut api = UffdioApi { api: UFFD_API, features, ioctls: 0 };
    // SAFETY: UFFDIO_API reads and writes the uffdio_api structure passed.
    match unsafe { ioctl(fd, UFFDIO_API, &mut api as *mut UffdioApi as usize) } {
        Ok(_) => Ok(fd),
        Err(e) => {
            let _ = close(fd);
            Err(e)
        }
    }
}

/// `UFFDIO_REGISTER` of `start..start + len` in `mode`; returns the ioctls the range
/// supports (a bit per `_UFFDIO_*` number).
///
/// # Safety
/// Registering changes how faults in the range are handled: missing pages (with
/// `UFFDIO_REGISTER_MODE_MISSING`) are not filled by the kernel until the userfaultfd is
/// closed or fills them.
pub unsafe fn uffd_register(uffd: i32, start: u64, len: u64, mode: u64) -> Result<u64> {
    let mut reg = UffdioRegister { start, len, mode, ioctls: 0 };
    // SAFETY: UFFDIO_REGISTER reads and writes the structure passed; the effect on the
    // range is the caller's to allow.
    unsafe { ioctl(uffd, UFFDIO_REGISTER, &mut reg as *mut UffdioRegister as usize) }.map(|_| reg.ioctls)
}

/// A userfaultfd for asynchronous write-protection (`UFFD_FEATURE_WP_ASYNC`, with
/// unpopulated pages protected too), close-on-exec and non-blocking, moved to the lowest
/// free descriptor at or above `floor`.
pub fn uffd_wp_async(floor: usize) -> Result<i32> {
    let fd = userfaultfd_api(O_CLOEXEC as usize | O_NONBLOCK as usize, UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED)?;
    let high = fcntl(fd, F_DUPFD_CLOEXEC, floor);
    let _ = close(fd);
    high.map(|h| h as i32)
}

/// `UFFDIO_WRITEPROTECT` of `start..start + len`: protects it.
///
/// # Safety
/// A write to a protected page waits for a handler unless the range's registration is
/// asynchronous ([`uffd_wp_async`]); the caller must allow that.
pub unsafe fn uffd_writeprotect(uffd: i32, start: u64, len: u64) -> Result<()> {
    let mut wp = UffdioWriteprotect { start, len, mode: UFFDIO_WRITEPROTECT_MODE_WP };
    // SAFETY: UFFDIO_WRITEPROTECT reads the structure passed; the effect on the range is
    // the caller's to allow.
    unsafe { ioctl(uffd, UFFDIO_WRITEPROTECT, &mut wp as *mut UffdioWriteprotect as usize) }.map(|_| ())
}

/// `struct utsname`.
#[repr(C)]
pub struct Utsname {
    pub sysname: [u8; 65],
    pub nodename: [u8; 65],
    pub release: [u8; 65],
    pub version: [u8; 65],
    pub machine: [u8; 65],
    pub domainname: [u8; 65],
}

// ---------------------------------------------------------------------------------------
// File descriptors and files.

/// `read(2)`.
pub fn read(fd: i32, buf: &mut [u8]) -> Result<usize> {
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
    unsafe { sc!(nr::READ, fd, buf.as_mut_ptr(), buf.len()) }
}

/// `read(2)` into raw memory.
///
/// # Safety
/// `[addr, addr+len)` must be writable memory that nothing else uses meanwhile.
pub unsafe fn read_raw(fd: i32, addr: usize, len: usize) -> Result<usize> {
    // SAFETY: forwarded to the caller.
    unsafe { sc!(nr::READ, fd, addr, len) }
}

/// `pread64(2)`.
pub fn pread(fd: i32, buf: &mut [u8], off: u64) -> Result<usize> {
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
    unsafe { sc!(nr::PREAD64, fd, buf.as_mut_ptr(), buf.len(), off) }
}

/// `pread64(2)` into raw memory.
///
/// # Safety
/// `[addr, addr+len)` must be writable memory that nothing else uses meanwhile.
pub unsafe fn pread_raw(fd: i32, addr: usize, len: usize, off: u64) -> Result<usize> {
    // SAFETY: forwarded to the caller.
    unsafe { sc!(nr::PREAD64, fd, addr, len, off) }
}

/// `write(2)`.
pub fn write(fd: i32, buf: &[u8]) -> Result<usize> {
    // SAFETY: the kernel reads at most `buf.len()` bytes from `buf`.
    unsafe { sc!(nr::WRITE, fd, buf.as_ptr(), buf.len()) }
}

/// Writes all of `buf`, retrying short writes and `EINTR`.
pub fn write_all(fd: i32, mut buf: &[u8]) -> Result<()> {
    while !buf.is_empty() {
        match write(fd, buf) {
            Ok(0) => return Err(Errno::EIO),
            Ok(n) => buf = &buf[n..],
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `writev(2)`.
///
/// # Safety
/// Every iovec must describe readable memory.
pub unsafe fn writev(fd: i32, iov: &[Iovec]) -> Result<usize> {
    // SAFETY: forwarded to the caller.
    unsafe { sc!(nr::WRITEV, fd, iov.as_ptr(), iov.len()) }
}

/// `vmsplice(2)`: puts references to the pages of `iov` into the pipe `fd` instead of
/// copying them; whoever reads the pipe later reads those pages as they are then.
///
/// # Safety
/// Every iovec must describe readable memory, and the pages must not change until the
/// reader has read them (or the caller does not mind what it reads).
pub unsafe fn vmsplice(fd: i32, iov: &[Iovec], flags: u32) -> Result<usize> {
    // SAFETY: forwarded to the caller.
    unsafe { sc!(nr::VMSPLICE, fd, iov.as_ptr(), iov.len(), flags) }
}

/// `openat(2)` with a NUL-terminated path.
pub fn openat(dirfd: i32, path: &[u8], flags: i32, mode: u32) -> Result<i32> {
    if path.last() != Some(&0) {
        return Err(Errno::EINVAL);
    }
    // SAFETY: `path` is NUL-terminated and lives for the call.
    unsafe { sc!(nr::OPENAT, dirfd, path.as_ptr(), flags, mode).map(|v| v as i32) }
}

/// `close(2)`.
pub fn close(fd: i32) -> Result<()> {
    // SAFETY: closing a descriptor has no memory effects.
    unsafe { sc!(nr::CLOSE, fd).map(|_| ()) }
}

/// `lseek(2)`.
pub fn lseek(fd: i32, off: i64, whence: i32) -> Result<u64> {
    // SAFETY: no memory arguments.
    unsafe { sc!(nr::LSEEK, fd, off, whence).map(|v| v as u64) }
}

/// `fcntl(2)` with an integer argument.
pub fn fcntl(fd: i32, cmd: i32, arg: usize) -> Result<usize> {
    // SAFETY: only integer commands are passed by callers (F_GETFL, F_SETFD, F_DUPFD...).
    unsafe { sc!(nr::FCNTL, fd, cmd, arg) }
}

/// `dup3(2)`.
pub fn dup3(old: i32, new: i32, flags: i32) -> Result<i32> {
    // SAFETY: no memory arguments.
    unsafe { sc!(nr::DUP3, old, new, flags).map(|v| v as i32) }
}

/// `fstat(2)`.
pub fn fstat(fd: i32, st: &mut Stat) -> Result<()> {
    // SAFETY: `st` is a valid, writable `struct stat`.
    unsafe { sc!(nr::FSTAT, fd, st as *mut Stat).map(|_| ()) }
}

/// `newfstatat(2)` with a NUL-terminated path.
pub fn fstatat(dirfd: i32, path: &[u8], st: &mut Stat, flags: i32) -> Result<()> {
    if path.last() != Some(&0) {
        return Err(Errno::EINVAL);
    }
    // SAFETY: `path` is NUL-terminated, `st` is writable.
    unsafe { sc!(nr::NEWFSTATAT, dirfd, path.as_ptr(), st as *mut Stat, flags).map(|_| ()) }
}

/// `readlinkat(2)`; returns the length written (not NUL-terminated).
pub fn readlinkat(dirfd: i32, path: &[u8], buf: &mut [u8]) -> Result<usize> {
    if path.last() != Some(&0) {
        return Err(Errno::EINVAL);
    }
    // SAFETY: `path` is NUL-terminated, the kernel writes at most `buf.len()` bytes.
    unsafe { sc!(nr::READLINKAT, dirfd, path.as_ptr(), buf.as_mut_ptr(), buf.len()) }
}

/// `getdents64(2)`.
pub fn getdents64(fd: i32, buf: &mut [u8]) -> Result<usize> {
    // SAFETY: the kernel writes at most `buf.len()` bytes.
    unsafe { sc!(nr::GETDENTS64, fd, buf.as_mut_ptr(), buf.len()) }
}

/// `ioctl(2)`.
///
/// # Safety
/// `arg` must be what request `req` expects on `fd`.
pub unsafe fn ioctl(fd: i32, req: u64, arg: usize) -> Result<usize> {
    // SAFETY: forwarded to the caller.
    unsafe { sc!(nr::IOCTL, fd, req, arg) }
}

/// `kcmp(2)`.
pub fn kcmp(pid1: i32, pid2: i32, ty: i32, idx1: usize, idx2: usize) -> Result<usize> {
    // SAFETY: KCMP_FILE takes only integers.
    unsafe { sc!(nr::KCMP, pid1, pid2, ty, idx1, idx2) }
}

/// `pipe2(2)`.
pub fn pipe2(fds: &mut [i32; 2], flags: i32) -> Result<()> {
    // SAFETY: the kernel writes two ints.
    unsafe { sc!(nr::PIPE2, fds.as_mut_ptr(), flags).map(|_| ()) }
}

/// `tee(2)`: copies up to `len` bytes from pipe `fd_in` to pipe `fd_out` without taking
/// them.
pub fn tee(fd_in: i32, fd_out: i32, len: usize, flags: u32) -> Result<usize> {
    // SAFETY: no memory arguments.
    unsafe { sc!(nr::TEE, fd_in, fd_out, len, flags) }
}

/// `timerfd_gettime(2)`: (interval, value) as four numbers (s, ns, s, ns).
pub fn timerfd_gettime(fd: i32) -> Result<[i64; 4]> {
    let mut v = [0i64; 4];
    // SAFETY: the kernel writes one struct itimerspec (four longs).
    unsafe { sc!(nr::TIMERFD_GETTIME, fd, v.as_mut_ptr())? };
    Ok(v)
}

/// `FIONREAD`: bytes waiting in a pipe or socket.
pub fn fionread(fd: i32) -> Result<usize> {
    let mut n: i32 = 0;
    // SAFETY: FIONREAD writes one int.
    unsafe { ioctl(fd, 0x541B, &mut n as *mut i32 as usize)? };
    Ok(n.max(0) as usize)
}

/// `getsockopt(2)` for an int option.
pub fn getsockopt_int(fd: i32, level: i32, opt: i32) -> Result<i32> {
    let mut v: i32 = 0;
    let mut len: u32 = 4;
    // SAFETY: the kernel writes at most `len` bytes into `v` and updates `len`.
    unsafe { sc!(nr::GETSOCKOPT, fd, level, opt, &mut v as *mut i32, &mut len as *mut u32)? };
    Ok(v)
}

/// `getsockname(2)` or `getpeername(2)` (`peer`): the address into `buf`, its length.
pub fn sockname(fd: i32, peer: bool, buf: &mut [u8; 128]) -> Result<usize> {
    let mut len: u32 = 128;
    let n = if peer { nr::GETPEERNAME } else { nr::GETSOCKNAME };
    // SAFETY: the kernel writes at most `len` bytes into `buf` and updates `len`.
    unsafe { sc!(n, fd, buf.as_mut_ptr(), &mut len as *mut u32)? };
    Ok((len as usize).min(128))
}

pub const SO_TYPE: i32 = 3;
pub const SO_REUSEADDR: i32 = 2;
pub const SO_REUSEPORT: i32 = 15;
pub const SO_ACCEPTCONN: i32 = 30;
pub const SO_PROTOCOL: i32 = 38;
pub const SO_DOMAIN: i32 = 39;
pub const IPPROTO_IPV6: i32 = 41;
pub const IPV6_V6ONLY: i32 = 26;
pub const AF_UNIX: i32 = 1;
pub const AF_INET: i32 = 2;
pub const AF_INET6: i32 = 10;
pub const SOCK_STREAM: i32 = 1;
pub const SOCK_DGRAM: i32 = 2;
pub const SOCK_SEQPACKET: i32 = 5;

/// `fsync(2)`.
pub fn fsync(fd: i32) -> Result<()> {
    // SAFETY: no memory arguments.
    unsafe { sc!(nr::FSYNC, fd).map(|_| ()) }
}

/// `sendmsg(2)`.
///
/// # Safety
/// `msg` must describe valid memory.
pub unsafe fn sendmsg(fd: i32, msg: &Msghdr, flags: i32) -> Result<usize> {
    // SAFETY: forwarded to the caller.
    unsafe { sc!(nr::SENDMSG, fd, msg as *const Msghdr, flags) }
}

/// `recvmsg(2)`.
///
/// # Safety
/// `msg` must describe valid writable memory.
pub unsafe fn recvmsg(fd: i32, msg: &mut Msghdr, flags: i32) -> Result<usize> {
    // SAFETY: forwarded to the caller.
    unsafe { sc!(nr::RECVMSG, fd, msg as *mut Msghdr, flags) }
}

// ---------------------------------------------------------------------------------------
// Memory.

/// `mmap(2)`.
///
/// # Safety
/// With `MAP_FIXED` the range is replaced: the caller must own it. Otherwise safe in itself,
/// but returned memory is raw.
pub unsafe fn mmap(addr: usize, len: usize, prot: i32, flags: i32, fd: i32, off: u64) -> Result<usize> {
    // SAFETY: forwarded to the caller.
    unsafe { sc!(nr::MMAP, addr, len, prot, flags, fd, off) }
}

/// `munmap(2)`.
///
/// # Safety
/// Nothing may use the range afterwards.
pub unsafe fn munmap(addr: usize, len: usize) -> Result<()> {
    // SAFETY: forwarded to the caller.
    unsafe { sc!(nr::MUNMAP, addr, len).map(|_| ()) }
}

/// `mprotect(2)`.
///
/// # Safety
/// The caller must not remove access that live code depends on.
pub unsafe fn mprotect(addr: usize, len: usize, prot: i32) -> Result<()> {
    // SAFETY: forwarded to the caller.
    unsafe { sc!(nr::MPROTECT, addr, len, prot).map(|_| ()) }
}

/// `mremap(2)`.
///
/// # Safety
/// As for `munmap` of the old range and `mmap(MAP_FIXED)` of the new one.
pub unsafe fn mremap(old: usize, old_len: usize, new_len: usize, flags: i32, new: usize) -> Result<usize> {
    // SAFETY: forwarded to the caller.
    unsafe { sc!(nr::MREMAP, old, old_len, new_len, flags, new) }
}

/// `madvise(2)`.
///
/// # Safety
/// Some advice values (`MADV_DONTNEED`) discard memory contents.
pub unsafe fn madvise(addr: usize, len: usize, advice: i32) -> Result<()> {
    // SAFETY: forwarded to the caller.
    unsafe { sc!(nr::MADVISE, addr, len, advice).map(|_| ()) }
}

// ---------------------------------------------------------------------------------------
// Processes, threads and signals.

/// `exit(2)`: ends the calling thread only.
pub fn exit_thread(code: i32) -> ! {
    // SAFETY: the thread ends; nothing of it runs afterwards.
    unsafe {
        syscall6(nr::EXIT, code as usize, 0, 0, 0, 0, 0);
    }
    #[allow(clippy::empty_loop)]
    loop {}
}

/// `exit_group(2)`: ends the whole process.
pub fn exit_group(code: i32) -> ! {
    // SAFETY: the process ends.
    unsafe {
        syscall6(nr::EXIT_GROUP, code as usize, 0, 0, 0, 0, 0);
    }
    #[allow(clippy::empty_loop)]
    loop {}
}

/// `clone(2)` with no new stack and without `CLONE_VM`: a copy of the calling thread in a
/// new process, as `fork` makes, but without any of glibc's `fork` work (no `atfork`
/// handlers, no locks, no allocation). The low byte of `flags` is the signal the parent
/// gets when the child ends (0: none). Returns the child's pid in the parent and 0 in the
/// child. See `man 2 clone`.
///
/// # Safety
/// `flags` must not contain `CLONE_VM`, `CLONE_THREAD`, `CLONE_SETTLS` or any flag that
/// takes a pointer argument: the child runs on a private copy of the caller's stack and
/// returns from this call like the parent does. The child is a copy of one thread of a
/// possibly multi-threaded process: it must not take locks that other threads may have
/// held (no libc) and should end with [`exit_group`].
#[doc(alias = "fork")]
pub unsafe fn clone(flags: usize) -> Result<i32> {
    // SAFETY: forwarded to the caller; without CLONE_VM and without a new stack the child
    // continues on a copy of this stack, so returning through Rust code is sound in both.
    unsafe { sc!(nr::CLONE, flags, 0, 0, 0, 0).map(|v| v as i32) }
}

/// Starts a thread in this process (raw `clone(2)` with `CLONE_VM`, `CLONE_THREAD` and the
/// other flags of a POSIX thread, but no new TLS) that calls `f(arg)` on the stack ending at
/// `stack_top`. The kernel writes the thread's id to `tid` before this returns and clears it
/// when the thread has ended ([`join_thread`] waits for that). Returns the thread id.
///
/// # Safety
/// `stack_top` must be the 16-byte aligned end of writable memory that nothing else uses
/// until the thread has ended, large enough for `f`; `f` must end the thread with
/// [`exit_thread`] (or the process), use no thread-local storage, and may use `arg` only as
/// the caller allows; `tid` must stay alive until [`join_thread`] returns.
pub unsafe fn spawn_thread(stack_top: usize, tid: &core::sync::atomic::AtomicU32, f: extern "C" fn(usize) -> !, arg: usize) -> Result<i32> {
    let flags =
        CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM | CLONE_PARENT_SETTID | CLONE_CHILD_CLEARTID;
    let ret: usize;
    // SAFETY: in this thread a plain system call. The new thread starts on `stack_top`
    // (aligned, so that after the `call` pushes its return address `f` sees the stack as
    // the ABI wants it) with copies of these registers, and only calls `f`, which never
    // returns.
    unsafe {
        asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "mov rdi, r13",
            "call r12",
            "ud2",
            "2:",
            inlateout("rax") nr::CLONE => ret,
            in("rdi") flags,
            in("rsi") stack_top,
            in("rdx") tid.as_ptr(),
            in("r10") tid.as_ptr(),
            in("r8") 0usize,
            in("r12") f as usize,
            in("r13") arg,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    check(ret).map(|t| t as i32)
}

/// Waits until the thread [`spawn_thread`] started with `tid` has ended.
pub fn join_thread(tid: &core::sync::atomic::AtomicU32) {
    loop {
        let t = tid.load(core::sync::atomic::Ordering::Acquire);
        if t == 0 {
            return;
        }
        // The kernel's wake-up at thread exit is a shared (not private) futex wake.
        // SAFETY: `tid` is a live, aligned u32; the kernel only reads it.
        let _ = unsafe { sc!(nr::FUTEX, tid.as_ptr(), FUTEX_WAIT, t, 0) };
    }
}

/// `wait4(2)` without resource usage; returns the pid that changed state (0 with
/// `WNOHANG` when none did).
pub fn wait4(pid: i32, status: &mut i32, options: i32) -> Result<i32> {
    // SAFETY: the kernel writes one int to `status`; a null rusage is allowed.
    unsafe { sc!(nr::WAIT4, pid, status as *mut i32, options, 0).map(|v| v as i32) }
}

/// `waitid(2)` for one child, `options` with or without `WNOWAIT`: `Some((si_code,
/// si_status))` if it has an event to report, `None` with `WNOHANG` when it has none.
pub fn waitid_pid(pid: i32, options: i32) -> Result<Option<(i32, i32)>> {
    // siginfo_t: si_signo, si_errno, si_code, then for SIGCHLD si_pid (16), si_uid (20),
    // si_status (24).
    let mut info = [0u8; 128];
    // SAFETY: the kernel writes at most a 128-byte siginfo_t; a null rusage is allowed.
    unsafe { sc!(nr::WAITID, P_PID, pid, info.as_mut_ptr(), options, 0)? };
    let at = |o: usize| i32::from_ne_bytes([info[o], info[o + 1], info[o + 2], info[o + 3]]);
    Ok((at(16) == pid).then(|| (at(8), at(24))))
}

/// `waitid(2)`'s `P_PID`.
pub const P_PID: i32 = 1;
/// Options of `waitid(2)` and `wait4(2)`.
pub const WNOHANG: i32 = 1;
pub const WEXITED: i32 = 4;
pub const WNOWAIT: i32 = 0x0100_0000;
/// `si_code` values of `SIGCHLD`.
pub const CLD_EXITED: i32 = 1;
pub const CLD_KILLED: i32 = 2;
pub const CLD_DUMPED: i32 = 3;

/// `getuid(2)`.
pub fn getuid() -> u32 {
    // SAFETY: no arguments.
    unsafe { syscall6(nr::GETUID, 0, 0, 0, 0, 0, 0) as u32 }
}

/// `getpid(2)`.
pub fn getpid() -> i32 {
    // SAFETY: no arguments.
    unsafe { syscall6(nr::GETPID, 0, 0, 0, 0, 0, 0) as i32 }
}

/// `gettid(2)`.
pub fn gettid() -> i32 {
    // SAFETY: no arguments.
    unsafe { syscall6(nr::GETTID, 0, 0, 0, 0, 0, 0) as i32 }
}

/// `getppid(2)`.
pub fn getppid() -> i32 {
    // SAFETY: no arguments.
    unsafe { syscall6(nr::GETPPID, 0, 0, 0, 0, 0, 0) as i32 }
}

/// `tgkill(2)`.
pub fn tgkill(tgid: i32, tid: i32, sig: i32) -> Result<()> {
    // SAFETY: no memory arguments.
    unsafe { sc!(nr::TGKILL, tgid, tid, sig).map(|_| ()) }
}

/// `kill(2)`.
pub fn kill(pid: i32, sig: i32) -> Result<()> {
    // SAFETY: no memory arguments.
    unsafe { sc!(nr::KILL, pid, sig).map(|_| ()) }
}

/// `rt_tgsigqueueinfo(2)` with `si_code = SI_QUEUE` and an integer payload.
pub fn tgsigqueue(tgid: i32, tid: i32, sig: i32, value: u64) -> Result<()> {
    // siginfo_t is 128 bytes: signo, errno, code, then (for SI_QUEUE) pid, uid, sigval.
    let mut info = [0u8; 128];
    info[0..4].copy_from_slice(&sig.to_ne_bytes());
    info[8..12].copy_from_slice(&SI_QUEUE.to_ne_bytes());
    info[16..20].copy_from_slice(&getpid().to_ne_bytes());
    info[24..32].copy_from_slice(&value.to_ne_bytes());
    // SAFETY: `info` is a complete 128-byte siginfo_t that the kernel only reads.
    unsafe { sc!(nr::RT_TGSIGQUEUEINFO, tgid, tid, sig, info.as_ptr()).map(|_| ()) }
}

/// `rt_sigaction(2)` with the kernel's structure.
///
/// # Safety
/// A new handler must be valid code for the whole life of the process.
pub unsafe fn rt_sigaction(sig: i32, new: Option<&KSigaction>, old: Option<&mut KSigaction>) -> Result<()> {
    let n = new.map_or(0, |p| p as *const KSigaction as usize);
    let o = old.map_or(0, |p| p as *mut KSigaction as usize);
    // SAFETY: forwarded to the caller; sigsetsize is 8 on x86-64.
    unsafe { sc!(nr::RT_SIGACTION, sig, n, o, 8).map(|_| ()) }
}

/// `rt_sigprocmask(2)`.
pub fn rt_sigprocmask(how: i32, set: Option<&u64>, old: Option<&mut u64>) -> Result<()> {
    let n = set.map_or(0, |p| p as *const u64 as usize);
    let o = old.map_or(0, |p| p as *mut u64 as usize);
    // SAFETY: both pointers, if any, are valid 8-byte sigsets.
    unsafe { sc!(nr::RT_SIGPROCMASK, how, n, o, 8).map(|_| ()) }
}

/// `sigaltstack(2)`.
pub fn sigaltstack(new: Option<&StackT>, old: Option<&mut StackT>) -> Result<()> {
    let n = new.map_or(0, |p| p as *const StackT as usize);
    let o = old.map_or(0, |p| p as *mut StackT as usize);
    // SAFETY: both pointers, if any, are valid stack_t structures.
    unsafe { sc!(nr::SIGALTSTACK, n, o).map(|_| ()) }
}

/// `prctl(2)` with integer arguments.
///
/// # Safety
/// Options that take pointers (PR_GET_NAME, PR_GET_TID_ADDRESS, PR_SET_MM_MAP...) need valid
/// memory of the documented size.
pub unsafe fn prctl(opt: i32, a2: usize, a3: usize, a4: usize, a5: usize) -> Result<usize> {
    // SAFETY: forwarded to the caller.
    unsafe { sc!(nr::PRCTL, opt, a2, a3, a4, a5) }
}

/// `arch_prctl(2)`.
///
/// # Safety
/// `ARCH_SET_FS` changes what thread-local storage means for the calling thread.
pub unsafe fn arch_prctl(code: i32, addr: usize) -> Result<usize> {
    // SAFETY: forwarded to the caller.
    unsafe { sc!(nr::ARCH_PRCTL, code, addr) }
}

/// Returns the FS base of the calling thread.
pub fn get_fs_base() -> u64 {
    let mut v: u64 = 0;
    // SAFETY: ARCH_GET_FS writes 8 bytes to `v`.
    let _ = unsafe { arch_prctl(ARCH_GET_FS, &mut v as *mut u64 as usize) };
    v
}

/// Returns the GS base of the calling thread.
pub fn get_gs_base() -> u64 {
    let mut v: u64 = 0;
    // SAFETY: ARCH_GET_GS writes 8 bytes to `v`.
    let _ = unsafe { arch_prctl(ARCH_GET_GS, &mut v as *mut u64 as usize) };
    v
}

/// `set_tid_address(2)`; returns the caller's tid.
///
/// # Safety
/// The kernel writes 0 to `addr` when the thread exits.
pub unsafe fn set_tid_address(addr: usize) -> i32 {
    // SAFETY: forwarded to the caller.
    unsafe { syscall6(nr::SET_TID_ADDRESS, addr, 0, 0, 0, 0, 0) as i32 }
}

/// `set_robust_list(2)`.
///
/// # Safety
/// The kernel walks the list when the thread exits.
pub unsafe fn set_robust_list(head: usize, len: usize) -> Result<()> {
    // SAFETY: forwarded to the caller.
    unsafe { sc!(nr::SET_ROBUST_LIST, head, len).map(|_| ()) }
}

/// `get_robust_list(2)` for the calling thread.
pub fn get_robust_list() -> Result<(u64, u64)> {
    let mut head: u64 = 0;
    let mut len: u64 = 0;
    // SAFETY: the kernel writes one pointer and one size.
    unsafe { sc!(nr::GET_ROBUST_LIST, 0, &mut head as *mut u64, &mut len as *mut u64)? };
    Ok((head, len))
}

/// `rseq(2)`.
///
/// # Safety
/// Registering makes the kernel write to `area` on every preemption of this thread.
pub unsafe fn rseq(area: usize, len: u32, flags: i32, sig: u32) -> Result<()> {
    // SAFETY: forwarded to the caller.
    unsafe { sc!(nr::RSEQ, area, len, flags, sig).map(|_| ()) }
}

/// `futex(FUTEX_WAIT_PRIVATE)`: sleeps while `*word == val`.
pub fn futex_wait(word: &core::sync::atomic::AtomicU32, val: u32, timeout: Option<&Timespec>) -> Result<()> {
    let t = timeout.map_or(0, |t| t as *const Timespec as usize);
    // SAFETY: `word` is a live, aligned u32; the kernel only reads it.
    unsafe { sc!(nr::FUTEX, word.as_ptr(), FUTEX_WAIT | FUTEX_PRIVATE_FLAG, val, t).map(|_| ()) }
}

/// `futex(FUTEX_WAKE_PRIVATE)`.
pub fn futex_wake(word: &core::sync::atomic::AtomicU32, n: u32) -> Result<usize> {
    // SAFETY: `word` is a live, aligned u32; the kernel does not write it.
    unsafe { sc!(nr::FUTEX, word.as_ptr(), FUTEX_WAKE | FUTEX_PRIVATE_FLAG, n) }
}

/// `sched_yield(2)`.
pub fn sched_yield() {
    // SAFETY: no arguments.
    unsafe {
        syscall6(nr::SCHED_YIELD, 0, 0, 0, 0, 0, 0);
    }
}

/// `clock_gettime(2)` as a real system call (not the vDSO).
pub fn clock_gettime(clock: i32) -> Timespec {
    let mut t = Timespec::default();
    // SAFETY: the kernel writes one timespec.
    let _ = unsafe { sc!(nr::CLOCK_GETTIME, clock, &mut t as *mut Timespec) };
    t
}

/// `struct rusage` on x86-64: user and system time, then 14 counters.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct Rusage {
    pub utime: Timeval,
    pub stime: Timeval,
    pub rest: [i64; 14],
}

/// `struct timeval`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct Timeval {
    pub sec: i64,
    pub usec: i64,
}

/// `getrusage(2)`.
pub fn getrusage(who: i32) -> Result<Rusage> {
    let mut r = Rusage::default();
    // SAFETY: the kernel writes one struct rusage.
    unsafe { sc!(nr::GETRUSAGE, who, &mut r as *mut Rusage).map(|_| r) }
}

/// Nanoseconds of `CLOCK_MONOTONIC`.
pub fn monotonic_ns() -> u64 {
    let t = clock_gettime(CLOCK_MONOTONIC);
    t.sec as u64 * 1_000_000_000 + t.nsec as u64
}

/// `nanosleep(2)` for `ns` nanoseconds (interrupted sleeps end early).
pub fn sleep_ns(ns: u64) {
    let t = Timespec { sec: (ns / 1_000_000_000) as i64, nsec: (ns % 1_000_000_000) as i64 };
    // SAFETY: the kernel reads one timespec.
    let _ = unsafe { sc!(nr::NANOSLEEP, &t as *const Timespec, 0) };
}

/// `uname(2)`.
pub fn uname(u: &mut Utsname) -> Result<()> {
    // SAFETY: the kernel writes one utsname.
    unsafe { sc!(nr::UNAME, u as *mut Utsname).map(|_| ()) }
}

/// `umask(2)`; returns the previous mask.
pub fn umask(mask: u32) -> u32 {
    // SAFETY: no memory arguments.
    unsafe { syscall6(nr::UMASK, mask as usize, 0, 0, 0, 0, 0) as u32 }
}

/// `chdir(2)` with a NUL-terminated path.
pub fn chdir(path: &[u8]) -> Result<()> {
    if path.last() != Some(&0) {
        return Err(Errno::EINVAL);
    }
    // SAFETY: `path` is NUL-terminated.
    unsafe { sc!(nr::CHDIR, path.as_ptr()).map(|_| ()) }
}

/// `getcwd(2)`; returns the length including the NUL.
pub fn getcwd(buf: &mut [u8]) -> Result<usize> {
    // SAFETY: the kernel writes at most `buf.len()` bytes.
    unsafe { sc!(nr::GETCWD, buf.as_mut_ptr(), buf.len()) }
}

/// `prlimit64(2)` on the calling process.
pub fn prlimit(res: i32, new: Option<&Rlimit>, old: Option<&mut Rlimit>) -> Result<()> {
    let n = new.map_or(0, |p| p as *const Rlimit as usize);
    let o = old.map_or(0, |p| p as *mut Rlimit as usize);
    // SAFETY: both pointers, if any, are valid rlimit structures.
    unsafe { sc!(nr::PRLIMIT64, 0, res, n, o).map(|_| ()) }
}

/// `getitimer(2)`.
pub fn getitimer(which: i32, v: &mut Itimerval) -> Result<()> {
    // SAFETY: the kernel writes one itimerval.
    unsafe { sc!(nr::GETITIMER, which, v as *mut Itimerval).map(|_| ()) }
}

/// `setitimer(2)`.
pub fn setitimer(which: i32, v: &Itimerval) -> Result<()> {
    // SAFETY: the kernel reads one itimerval.
    unsafe { sc!(nr::SETITIMER, which, v as *const Itimerval, 0).map(|_| ()) }
}

/// `personality(2)`: with `0xffffffff` it only reads the current value.
pub fn personality(p: u32) -> Result<u32> {
    // SAFETY: no memory arguments.
    unsafe { sc!(nr::PERSONALITY, p).map(|v| v as u32) }
}

/// `close_range(2)`.
pub fn close_range(first: u32, last: u32, flags: u32) -> Result<()> {
    // SAFETY: no memory arguments.
    unsafe { sc!(nr::CLOSE_RANGE, first, last, flags).map(|_| ()) }
}

// ---------------------------------------------------------------------------------------
// Small helpers used by both no_std users.

/// Formats `v` in decimal into `buf`, returning the digits.
pub fn fmt_u64(mut v: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    &buf[i..]
}

/// Formats `v` in lower-case hex into `buf`, returning the digits.
pub fn fmt_hex(mut v: u64, buf: &mut [u8; 16]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        let d = (v & 15) as u8;
        buf[i] = if d < 10 { b'0' + d } else { b'a' + d - 10 };
        v >>= 4;
        if v == 0 {
            break;
        }
    }
    &buf[i..]
}

/// Parses a decimal number at the start of `s`; returns the value and the bytes used.
pub fn parse_u64(s: &[u8]) -> Option<(u64, usize)> {
    let mut v: u64 = 0;
    let mut i = 0;
    while i < s.len() && s[i].is_ascii_digit() {
        v = v.checked_mul(10)?.checked_add((s[i] - b'0') as u64)?;
        i += 1;
    }
    if i == 0 {
        None
    } else {
        Some((v, i))
    }
}

/// Parses a hex number at the start of `s`; returns the value and the bytes used.
pub fn parse_hex(s: &[u8]) -> Option<(u64, usize)> {
    let mut v: u64 = 0;
    let mut i = 0;
    while i < s.len() {
        let d = match s[i] {
            b'0'..=b'9' => s[i] - b'0',
            b'a'..=b'f' => s[i] - b'a' + 10,
            b'A'..=b'F' => s[i] - b'A' + 10,
            _ => break,
        };
        if v >> 60 != 0 {
            return None;
        }
        v = (v << 4) | d as u64;
        i += 1;
    }
    if i == 0 {
        None
    } else {
        Some((v, i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_round_trip() {
        let mut b = [0u8; 20];
        assert_eq!(fmt_u64(0, &mut b), b"0");
        assert_eq!(fmt_u64(18446744073709551615, &mut b), b"18446744073709551615");
        let mut h = [0u8; 16];
        assert_eq!(fmt_hex(0x7fff_dead_beef, &mut h), b"7fffdeadbeef");
        assert_eq!(parse_hex(b"7fffdeadbeef-"), Some((0x7fff_dead_beef, 12)));
        assert_eq!(parse_u64(b"123 "), Some((123, 3)));
        assert_eq!(parse_u64(b"x"), None);
        assert_eq!(parse_hex(b"11112222333344445"), None);
    }

    #[test]
    fn syscalls_work() {
        assert!(getpid() > 0);
        assert!(gettid() > 0);
        let mut fds = [0; 2];
        pipe2(&mut fds, O_CLOEXEC).unwrap();
        write_all(fds[1], b"hi").unwrap();
        let mut b = [0u8; 4];
        assert_eq!(read(fds[0], &mut b).unwrap(), 2);
        close(fds[0]).unwrap();
        close(fds[1]).unwrap();
        assert_eq!(close(fds[0]), Err(Errno::EBADF));
        assert!(monotonic_ns() > 0);
    }
}

//! The file descriptor table, from `/proc/self/fd` without wrappers.
//!
//! Regular files, directories and character devices are reopened by path at restore (with
//! their flags and offsets); the supervisor's standard pipes are handed over anew.
//! Descriptors that share one open file description (`dup`) are found with
//! `kcmp(KCMP_FILE)` and restored shared. Anything else fails the checkpoint with a message
//! naming the descriptor; the program runs on.

use crate::global::{Saved, MAX_FD};
use crate::scratch::Scratch;
use limitless_image::format::{fd_kind, FdInfo};
use limitless_sys as sys;

/// One descriptor and where its path is in the path arena.
#[derive(Clone, Copy, Default)]
pub struct FdRec {
    pub info: FdInfo,
    pub path_off: u32,
}

/// The table.
pub struct FdTable {
    pub recs: &'static mut [FdRec],
    pub n: usize,
    pub paths: &'static mut [u8],
}

impl FdTable {
    /// The path of record `r`.
    pub fn path(&self, r: &FdRec) -> &[u8] {
        &self.paths[r.path_off as usize..(r.path_off + r.info.path_len) as usize]
    }
}

/// A descriptor that cannot be checkpointed.
pub struct FdError {
    pub fd: i32,
    pub what: &'static str,
    pub path: [u8; 96],
    pub path_len: usize,
}

fn fd_path(fd: i32, out: &mut [u8]) -> usize {
    let mut p = [0u8; 40];
    let pre = b"/proc/self/fd/";
    p[..pre.len()].copy_from_slice(pre);
    let mut d = [0u8; 20];
    let ds = sys::fmt_u64(fd as u64, &mut d);
    p[pre.len()..pre.len() + ds.len()].copy_from_slice(ds);
    let end = pre.len() + ds.len();
    sys::readlinkat(sys::AT_FDCWD, &p[..end + 1], out).unwrap_or(0)
}

/// Collects every descriptor except those in `skip`. The error is either a descriptor that
/// cannot be checkpointed or a failed system call (large, but the agent has no heap). `stdio_ino` are the inodes of the
/// supervisor's stdin, stdout and stderr pipes.
#[allow(clippy::result_large_err)]
pub fn collect(s: &mut Scratch, sv: &mut Saved, skip: &[i32], stdio_ino: [u64; 3]) -> Result<FdTable, Result<FdError, sys::Errno>> {
    let dir = sys::openat(sys::AT_FDCWD, b"/proc/self/fd\0", sys::O_RDONLY | sys::O_DIRECTORY | sys::O_CLOEXEC, 0).map_err(Err)?;
    let r = collect_in(s, sv, skip, stdio_ino, dir);
    let _ = sys::close(dir);
    r
}

#[allow(clippy::result_large_err)]
fn collect_in(
    s: &mut Scratch,
    sv: &mut Saved,
    skip: &[i32],
    stdio_ino: [u64; 3],
    dir: i32,
) -> Result<FdTable, Result<FdError, sys::Errno>> {
    let nums = s.array::<i32>(MAX_FD).ok_or(Err(sys::Errno::ENOMEM))?;
    let mut count = 0;
    let mut buf = [0u8; 4096];
    loop {
        let n = sys::getdents64(dir, &mut buf).map_err(Err)?;
        if n == 0 {
            break;
        }
        let mut off = 0;
        while off + 19 < n {
            let reclen = u16::from_ne_bytes([buf[off + 16], buf[off + 17]]) as usize;
            let name = &buf[off + 19..off + reclen];
            off += reclen.max(1);
            if let Some((fd, _)) = sys::parse_u64(name) {
                let fd = fd as i32;
                if fd != dir && !skip.contains(&fd) && count < nums.len() {
                    nums[count] = fd;
                    count += 1;
                }
            }
        }
    }
    nums[..count].sort_unstable();
    let recs = s.array::<FdRec>(count.max(1)).ok_or(Err(sys::Errno::ENOMEM))?;
    let paths = s.array::<u8>(count.max(1) * 4096).ok_or(Err(sys::Errno::ENOMEM))?;
    sv.cloexec = [0; MAX_FD / 64];
    let pid = sys::getpid();
    let mut used = 0usize;
    let mut n = 0;
    for &fd in nums[..count].iter() {
        let mut st = sys::Stat::default();
        if sys::fstat(fd, &mut st).is_err() {
            continue; // closed meanwhile (cannot happen while frozen, but harmless)
        }
        let plen = fd_path(fd, &mut paths[used..used + 4096]);
        let path = &paths[used..used + plen];
        let fail = |what: &'static str| {
            let mut e = FdError { fd, what, path: [0; 96], path_len: plen.min(96) };
            e.path[..e.path_len].copy_from_slice(&path[..e.path_len]);
            Ok(e)
        };
        let mut info = FdInfo::zeroed();
        info.fd = fd;
        info.dev = st.dev;
        info.ino = st.ino;
        info.size = st.size as u64;
        info.mode = st.mode;
        info.mtime_sec = st.mtime.sec;
        info.mtime_nsec = st.mtime.nsec as u32;
        info.open_flags = sys::fcntl(fd, sys::F_GETFL, 0).unwrap_or(0) as u32;
        let fdfl = sys::fcntl(fd, sys::F_GETFD, 0).unwrap_or(0) as u32;
        info.fd_flags = fdfl & sys::FD_CLOEXEC as u32;
        info.share = fd;
        match st.mode & sys::S_IFMT {
            sys::S_IFIFO => match stdio_ino.iter().position(|&i| i == st.ino && i != 0) {
                Some(k) => {
                    info.kind = fd_kind::STDIO;
                    info.aux = k as u32;
                }
                None => return Err(fail("a pipe (only the standard streams from the supervisor are supported yet)")),
            },
            sys::S_IFREG => {
                if path.ends_with(b" (deleted)") || !path.starts_with(b"/") {
                    return Err(fail("a deleted or unnamed file (memfd, O_TMPFILE)"));
                }
                info.kind = fd_kind::REG;
                info.pos = sys::lseek(fd, 0, sys::SEEK_CUR).unwrap_or(0);
            }
            sys::S_IFDIR => {
                if !path.starts_with(b"/") {
                    return Err(fail("a directory without a path"));
                }
                info.kind = fd_kind::DIR;
                info.pos = sys::lseek(fd, 0, sys::SEEK_CUR).unwrap_or(0);
            }
            sys::S_IFCHR => {
                if !path.starts_with(b"/") || path.ends_with(b" (deleted)") {
                    return Err(fail("a character device without a path"));
                }
                info.kind = fd_kind::CHR;
                info.pos = sys::lseek(fd, 0, sys::SEEK_CUR).unwrap_or(0);
            }
            sys::S_IFSOCK => return Err(fail("a socket (sockets are not supported yet)")),
            _ => return Err(fail("a kernel object such as eventfd, timerfd, epoll or signalfd (not supported yet)")),
        }
        // Shared open file description with an earlier descriptor?
        for r in recs[..n].iter() {
            if r.info.dev == info.dev
                && r.info.ino == info.ino
                && r.info.kind == info.kind
                && sys::kcmp(pid, pid, sys::KCMP_FILE, r.info.fd as usize, fd as usize) == Ok(0)
            {
                info.share = r.info.share;
                break;
            }
        }
        if info.fd_flags != 0 && (fd as usize) < MAX_FD {
            sv.cloexec[fd as usize / 64] |= 1 << (fd as usize % 64);
        }
        info.path_len = if info.kind == fd_kind::STDIO { 0 } else { plen as u32 };
        recs[n] = FdRec { info, path_off: used as u32 };
        used += plen;
        n += 1;
    }
    Ok(FdTable { recs, n, paths })
}

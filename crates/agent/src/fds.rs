//! The file descriptor table, from `/proc/self/fd` and `/proc/self/fdinfo` without wrappers.
//!
//! Regular files, directories and character devices are reopened by path at restore (with
//! their flags and offsets); the supervisor's standard pipes are handed over anew. The
//! program's own pipes keep their unread bytes (copied with `tee(2)`, not taken), eventfds
//! their counters, timerfds their settings, signalfds their masks and epolls their
//! interest lists. Descriptors that share one open file description (`dup`) are found with
//! `kcmp(KCMP_FILE)` and restored shared. Anything else fails the checkpoint with a message
//! naming the descriptor; the program runs on.

use crate::global::{Saved, MAX_FD};
use crate::objects::{self, Obj, Objects};
use crate::scratch::Scratch;
use limitless_image::format::{fd_kind, file_kind, sock, sock_flags, EpollItem, FdInfo, SocketState, TimerfdState};
use limitless_image::wire::Wire;
use limitless_sys as sys;

/// One descriptor; its path and extra state are in the table's arenas.
#[derive(Clone, Copy, Default)]
pub struct FdRec {
    pub info: FdInfo,
    pub path_off: u32,
    pub extra_off: u32,
}

/// The table.
pub struct FdTable {
    pub recs: &'static mut [FdRec],
    pub n: usize,
    pub paths: &'static mut [u8],
    pub extras: &'static mut [u8],
}

impl FdTable {
    /// The path of record `r`.
    pub fn path(&self, r: &FdRec) -> &[u8] {
        &self.paths[r.path_off as usize..(r.path_off + r.info.path_len) as usize]
    }

    /// The kind-specific state of record `r`.
    pub fn extra(&self, r: &FdRec) -> &[u8] {
        &self.extras[r.extra_off as usize..(r.extra_off + r.info.extra_len) as usize]
    }
}

/// A descriptor that cannot be checkpointed.
pub struct FdError {
    pub fd: i32,
    pub what: &'static str,
    pub path: [u8; 96],
    pub path_len: usize,
}

/// Bytes for the kind-specific state of all descriptors (unread pipe data mostly).
const EXTRAS: usize = 32 << 20;
/// Largest `/proc/self/fdinfo` file read (an epoll with many items).
const FDINFO_MAX: usize = 8 << 20;

/// `dir` (such as `/proc/self/fd/`) followed by `fd` and a NUL, in `buf`.
pub fn proc_path<'a>(dir: &[u8], fd: i32, buf: &'a mut [u8; 48]) -> &'a [u8] {
    buf[..dir.len()].copy_from_slice(dir);
    let mut d = [0u8; 20];
    let ds = sys::fmt_u64(fd as u64, &mut d);
    buf[dir.len()..dir.len() + ds.len()].copy_from_slice(ds);
    let end = dir.len() + ds.len();
    buf[end] = 0;
    &buf[..end + 1]
}

/// What `/proc/self/fd/<fd>` links to, into `out`; its length (0 if unreadable).
pub fn fd_path(fd: i32, out: &mut [u8]) -> usize {
    let mut b = [0u8; 48];
    sys::readlinkat(sys::AT_FDCWD, proc_path(b"/proc/self/fd/", fd, &mut b), out).unwrap_or(0)
}

/// Reads `/proc/self/fdinfo/<fd>` into `buf`; returns its text.
fn fdinfo(fd: i32, buf: &mut [u8]) -> &[u8] {
    let mut b = [0u8; 48];
    let n = crate::process::read_file(proc_path(b"/proc/self/fdinfo/", fd, &mut b), buf);
    &buf[..n]
}

/// The value after `key:` on its line (leading blanks skipped), if any.
fn field<'a>(text: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    for line in text.split(|&c| c == b'\n') {
        if let Some(rest) = line.strip_prefix(key).and_then(|r| r.strip_prefix(b":")) {
            let i = rest.iter().position(|&c| c != b' ' && c != b'\t').unwrap_or(rest.len());
            return Some(&rest[i..]);
        }
    }
    None
}

fn hex_field(text: &[u8], key: &[u8]) -> Option<u64> {
    field(text, key).and_then(sys::parse_hex).map(|v| v.0)
}

fn dec_field(text: &[u8], key: &[u8]) -> Option<u64> {
    field(text, key).and_then(sys::parse_u64).map(|v| v.0)
}

fn skip_blank(s: &[u8]) -> &[u8] {
    let i = s.iter().position(|&c| c != b' ' && c != b'\t').unwrap_or(s.len());
    &s[i..]
}

/// Parses the `tfd: N events: X data: Y ...` lines of an epoll's fdinfo into `out`.
fn epoll_items(text: &[u8], out: &mut [u8]) -> Option<usize> {
    let mut n = 0;
    for line in text.split(|&c| c == b'\n') {
        let Some(rest) = line.strip_prefix(b"tfd:") else { continue };
        let (tfd, k) = sys::parse_u64(skip_blank(rest))?;
        let rest = skip_blank(rest)[k..].strip_prefix(b" ").map(skip_blank)?;
        let rest = rest.strip_prefix(b"events:").map(skip_blank)?;
        let (events, k) = sys::parse_hex(rest)?;
        let rest = skip_blank(&rest[k..]).strip_prefix(b"data:").map(skip_blank)?;
        let (data, _) = sys::parse_hex(rest)?;
        let item = EpollItem { tfd: tfd as i32, events: events as u32, data };
        if n + EpollItem::SIZE > out.len() {
            return None;
        }
        item.put(&mut out[n..]);
        n += EpollItem::SIZE;
    }
    Some(n)
}

/// Whether an address says nothing (an unbound socket).
fn unspecified(family: i32, addr: &[u8]) -> bool {
    match family {
        sys::AF_INET | sys::AF_INET6 => addr.len() < 4 || addr[2] == 0 && addr[3] == 0,
        _ => addr.len() <= 2,
    }
}

/// What a socket is: (restore kind, state). `None`: a kind the engine does not handle.
pub fn socket_state(fd: i32) -> Option<(u32, SocketState)> {
    let family = sys::getsockopt_int(fd, sys::SOL_SOCKET, sys::SO_DOMAIN).ok()?;
    let ty = sys::getsockopt_int(fd, sys::SOL_SOCKET, sys::SO_TYPE).ok()?;
    let protocol = sys::getsockopt_int(fd, sys::SOL_SOCKET, sys::SO_PROTOCOL).unwrap_or(0);
    if ![sys::AF_UNIX, sys::AF_INET, sys::AF_INET6].contains(&family)
        || ![sys::SOCK_STREAM, sys::SOCK_DGRAM, sys::SOCK_SEQPACKET].contains(&ty)
    {
        return None;
    }
    let listening = sys::getsockopt_int(fd, sys::SOL_SOCKET, sys::SO_ACCEPTCONN) == Ok(1);
    let mut addr = [0u8; 128];
    let alen = sys::sockname(fd, false, &mut addr).unwrap_or(0);
    let mut peer = [0u8; 128];
    let connected = sys::sockname(fd, true, &mut peer).is_ok();
    let mut flags = 0;
    if sys::getsockopt_int(fd, sys::SOL_SOCKET, sys::SO_REUSEADDR) == Ok(1) {
        flags |= sock_flags::REUSEADDR;
    }
    if sys::getsockopt_int(fd, sys::SOL_SOCKET, sys::SO_REUSEPORT) == Ok(1) {
        flags |= sock_flags::REUSEPORT;
    }
    if family == sys::AF_INET6 && sys::getsockopt_int(fd, sys::IPPROTO_IPV6, sys::IPV6_V6ONLY) == Ok(1) {
        flags |= sock_flags::V6ONLY;
    }
    let aux = if listening {
        sock::LISTEN
    } else if connected {
        sock::CLOSED
    } else if !unspecified(family, &addr[..alen]) {
        sock::BOUND
    } else {
        sock::FRESH
    };
    let st = SocketState {
        family: family as u32,
        sock_type: ty as u32,
        protocol: protocol as u32,
        flags,
        addr_len: alen as u32,
        reserved: 0,
        addr,
    };
    Some((aux, st))
}

/// Whether the program has a connected TCP socket (for waiting until it has none).
pub fn has_tcp_connections() -> bool {
    let Ok(dir) = sys::openat(sys::AT_FDCWD, b"/proc/self/fd\0", sys::O_RDONLY | sys::O_DIRECTORY | sys::O_CLOEXEC, 0) else {
        return false;
    };
    let mut buf = [0u8; 4096];
    let mut found = false;
    'outer: loop {
        let n = match sys::getdents64(dir, &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut off = 0;
        while off + 19 < n {
            let reclen = u16::from_ne_bytes([buf[off + 16], buf[off + 17]]) as usize;
            let name = &buf[off + 19..off + reclen];
            off += reclen.max(1);
            let Some((fd, _)) = sys::parse_u64(name) else { continue };
            let mut st = sys::Stat::default();
            if sys::fstat(fd as i32, &mut st).is_err() || st.mode & sys::S_IFMT != sys::S_IFSOCK {
                continue;
            }
            if let Some((sock::CLOSED, s)) = socket_state(fd as i32) {
                if (s.family == sys::AF_INET as u32 || s.family == sys::AF_INET6 as u32) && s.sock_type == sys::SOCK_STREAM as u32 {
                    found = true;
                    break 'outer;
                }
            }
        }
    }
    let _ = sys::close(dir);
    found
}

/// Copies the unread bytes of pipe read end `fd` into `out` without taking them.
fn pipe_data(fd: i32, out: &mut [u8]) -> Option<usize> {
    let n = sys::fionread(fd).ok()?;
    if n == 0 {
        return Some(0);
    }
    if n > out.len() {
        return None;
    }
    let mut p = [0i32; 2];
    sys::pipe2(&mut p, sys::O_CLOEXEC | sys::O_NONBLOCK).ok()?;
    let _ = sys::fcntl(p[1], sys::F_SETPIPE_SZ, n.max(4096));
    let r = (|| {
        let copied = sys::tee(fd, p[1], n, sys::SPLICE_F_NONBLOCK).ok()?;
        let mut got = 0;
        while got < copied {
            match sys::read(p[0], &mut out[got..copied]) {
                Ok(0) | Err(_) => return None,
                Ok(k) => got += k,
            }
        }
        Some(copied)
    })();
    let _ = sys::close(p[0]);
    let _ = sys::close(p[1]);
    r
}

/// Collects every descriptor except those in `skip`. `stdio_ino` are the inodes of the
/// supervisor's stdin, stdout and stderr pipes. The error is either a descriptor that
/// cannot be checkpointed or a failed system call (large, but the agent has no heap).
#[allow(clippy::result_large_err)]
pub fn collect(
    s: &mut Scratch,
    sv: &mut Saved,
    objs: &mut Objects,
    skip: &[i32],
    stdio_ino: [u64; 3],
) -> Result<FdTable, Result<FdError, sys::Errno>> {
    let dir = sys::openat(sys::AT_FDCWD, b"/proc/self/fd\0", sys::O_RDONLY | sys::O_DIRECTORY | sys::O_CLOEXEC, 0).map_err(Err)?;
    let r = collect_in(s, sv, objs, skip, stdio_ino, dir);
    let _ = sys::close(dir);
    r
}

#[allow(clippy::result_large_err)]
fn collect_in(
    s: &mut Scratch,
    sv: &mut Saved,
    objs: &mut Objects,
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
    let extras = s.array::<u8>(EXTRAS).ok_or(Err(sys::Errno::ENOMEM))?;
    let info_buf = s.array::<u8>(FDINFO_MAX).ok_or(Err(sys::Errno::ENOMEM))?;
    let captured = s.array::<u64>(count.max(1)).ok_or(Err(sys::Errno::ENOMEM))?;
    let mut ncaptured = 0;
    sv.cloexec = [0; MAX_FD / 64];
    let pid = sys::getpid();
    let (mut used, mut xused) = (0usize, 0usize);
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
        let mut keep_path = true;
        let extra = &mut extras[xused..];
        let mut xlen = 0usize;
        match st.mode & sys::S_IFMT {
            sys::S_IFIFO => {
                keep_path = false;
                if let Some(k) = stdio_ino.iter().position(|&i| i == st.ino && i != 0) {
                    info.kind = fd_kind::STDIO;
                    info.aux = k as u32;
                } else if path.starts_with(b"pipe:[") {
                    info.kind = fd_kind::PIPE;
                    info.aux = sys::fcntl(fd, sys::F_GETPIPE_SZ, 0).unwrap_or(65536) as u32;
                    let read_end = info.open_flags as i32 & sys::O_ACCMODE == sys::O_RDONLY;
                    if read_end && !captured[..ncaptured].contains(&st.ino) {
                        match pipe_data(fd, extra) {
                            Some(k) => xlen = k,
                            None => return Err(fail("a pipe whose unread data could not be copied")),
                        }
                        captured[ncaptured] = st.ino;
                        ncaptured += 1;
                    }
                } else {
                    return Err(fail("a named FIFO (not supported yet)"));
                }
            }
            sys::S_IFREG if path.ends_with(b" (deleted)") || path.starts_with(b"/memfd:") => {
                // A memfd, or a file deleted while open: the image carries its contents.
                let k = objects::kind_of(path);
                let size = st.size as u64;
                if (k == file_kind::DELETED && size > objects::MAX_DELETED) || size > objects::MAX_SHM {
                    return Err(fail("a deleted file or memfd too large to carry in an image"));
                }
                if objs.find(st.dev, st.ino).is_none() {
                    let o = Obj {
                        kind: k,
                        dev: st.dev,
                        ino: st.ino,
                        size,
                        mode: st.mode & 0o7777,
                        fd,
                        mtime_sec: st.mtime.sec,
                        mtime_nsec: st.mtime.nsec as u32,
                        ..Obj::default()
                    };
                    if objs.add(o, objects::display_name(path)).is_none() {
                        return Err(fail("one file object too many"));
                    }
                }
                info.kind = if k == file_kind::SHM { fd_kind::SHM } else { fd_kind::DELETED };
                info.pos = sys::lseek(fd, 0, sys::SEEK_CUR).unwrap_or(0);
            }
            sys::S_IFREG => {
                if !path.starts_with(b"/") {
                    return Err(fail("an unnamed file"));
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
            sys::S_IFSOCK => {
                keep_path = false;
                match socket_state(fd) {
                    Some((aux, st)) => {
                        info.kind = fd_kind::SOCKET;
                        info.aux = aux;
                        st.put(extra);
                        xlen = SocketState::SIZE;
                    }
                    None => {
                        return Err(fail(
                            "a socket of a kind that is not supported (only Unix, IPv4 and IPv6 stream and datagram sockets are)",
                        ))
                    }
                }
            }
            _ => {
                keep_path = false;
                let text = fdinfo(fd, info_buf);
                match path {
                    b"anon_inode:[eventfd]" => {
                        info.kind = fd_kind::EVENTFD;
                        info.pos = hex_field(text, b"eventfd-count").unwrap_or(0);
                        info.aux = dec_field(text, b"eventfd-semaphore").unwrap_or(0) as u32;
                    }
                    b"anon_inode:[signalfd]" => {
                        info.kind = fd_kind::SIGNALFD;
                        info.pos = hex_field(text, b"sigmask").unwrap_or(0);
                    }
                    b"anon_inode:[timerfd]" => {
                        info.kind = fd_kind::TIMERFD;
                        let Ok(t) = sys::timerfd_gettime(fd) else { return Err(fail("a timerfd that cannot be read")) };
                        let flags = field(text, b"settime flags").and_then(sys::parse_u64).map_or(0, |v| v.0);
                        let ts = TimerfdState {
                            clockid: dec_field(text, b"clockid").unwrap_or(1) as u32,
                            // fdinfo prints the flags in octal; only TFD_TIMER_ABSTIME (1) and
                            // TFD_TIMER_CANCEL_ON_SET (2) exist, which read the same.
                            settime_flags: flags as u32 & 3,
                            ticks: dec_field(text, b"ticks").unwrap_or(0),
                            interval_sec: t[0],
                            interval_nsec: t[1],
                            value_sec: t[2],
                            value_nsec: t[3],
                        };
                        ts.put(extra);
                        xlen = TimerfdState::SIZE;
                    }
                    b"anon_inode:[eventpoll]" => {
                        info.kind = fd_kind::EPOLL;
                        match epoll_items(text, extra) {
                            Some(k) => xlen = k,
                            None => return Err(fail("an epoll whose interest list could not be read")),
                        }
                    }
                    b"anon_inode:[io_uring]" => return Err(fail("an io_uring instance, which cannot be checkpointed")),
                    b"anon_inode:[perf_event]" => return Err(fail("a perf event, which cannot be checkpointed")),
                    p if p.starts_with(b"anon_inode:bpf") => return Err(fail("a BPF object, which cannot be checkpointed")),
                    b"anon_inode:[pidfd]" | b"anon_inode:[pidfd]:" => return Err(fail("a pidfd (process trees are not supported yet)")),
                    b"anon_inode:[userfaultfd]" => return Err(fail("a userfaultfd, which cannot be checkpointed")),
                    b"anon_inode:inotify" => return Err(fail("an inotify instance (not supported yet)")),
                    _ => return Err(fail("a kernel object of a kind that is not supported yet")),
                }
            }
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
        info.path_len = if keep_path { plen as u32 } else { 0 };
        info.extra_len = xlen as u32;
        recs[n] = FdRec { info, path_off: used as u32, extra_off: xused as u32 };
        used += plen;
        xused += xlen;
        n += 1;
    }
    Ok(FdTable { recs, n, paths, extras })
}

//! Recreating a restored program's file descriptors, each at its recorded number: files
//! reopened by path at their offsets, the standard streams on the new supervisor's pipes,
//! the program's own pipes with their unread bytes, eventfds with their counters, timerfds
//! with their settings, signalfds with their masks, and epolls with their interest lists
//! (built in the child once everything else is in place). Descriptors that shared an open
//! file description share one again.

use super::spawn::{EpollSpec, FdMap};
use super::supervisor::Plumbing;
use anyhow::{anyhow, bail, Context, Result};
use limitless_image::file::{Fd, Image};
use limitless_image::format::{fd_kind, file_kind, sock, sock_flags, SocketState};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

fn cvt(r: libc::c_int, what: impl FnOnce() -> String) -> Result<OwnedFd> {
    if r < 0 {
        return Err(anyhow!("{}: {}", what(), std::io::Error::last_os_error()));
    }
    // SAFETY: `r` is a new descriptor this function owns from here.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

fn nonblock(f: &Fd) -> bool {
    f.info.open_flags as i32 & libc::O_NONBLOCK != 0
}

fn set_nonblock(fd: &OwnedFd) {
    // SAFETY: plain fcntl calls on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
}

fn reopen(f: &Fd) -> Result<OwnedFd> {
    let x = &f.info;
    let path = String::from_utf8_lossy(&f.path).into_owned();
    let acc = x.open_flags as i32 & libc::O_ACCMODE;
    let mut o = OpenOptions::new();
    o.read(acc == libc::O_RDONLY || acc == libc::O_RDWR).write(acc == libc::O_WRONLY || acc == libc::O_RDWR);
    let keep = libc::O_NONBLOCK | libc::O_DSYNC | libc::O_SYNC | libc::O_NOATIME | libc::O_DIRECT | libc::O_NOCTTY;
    let mut extra = x.open_flags as i32 & keep;
    if x.open_flags as i32 & libc::O_APPEND != 0 {
        o.append(true);
    }
    if x.kind == fd_kind::DIR {
        extra |= libc::O_DIRECTORY;
        o.read(true).write(false);
    }
    o.custom_flags(extra);
    let mut file = o.open(&path).with_context(|| format!("cannot reopen fd {} ({path})", x.fd))?;
    if x.kind != fd_kind::CHR || x.pos != 0 {
        if let Err(e) = file.seek(SeekFrom::Start(x.pos)) {
            if x.kind != fd_kind::CHR {
                bail!("cannot seek fd {} ({path}) to {}: {e}", x.fd, x.pos);
            }
        }
    }
    Ok(OwnedFd::from(file))
}

/// A new pipe with the recorded capacity and unread bytes. Returns (read end, write end).
fn pipe(capacity: u32, data: &[u8]) -> Result<(OwnedFd, OwnedFd)> {
    let (r, w) = super::stdio::pipe()?;
    let _ = rustix::pipe::fcntl_setpipe_size(&w, capacity as usize);
    if !data.is_empty() {
        // The pipe is empty and at least as large as the data: this cannot block.
        File::from(w.try_clone()?).write_all(data).context("cannot refill a pipe")?;
    }
    Ok((r, w))
}

fn eventfd(f: &Fd) -> Result<OwnedFd> {
    let mut flags = libc::EFD_CLOEXEC;
    if f.info.aux == 1 {
        flags |= libc::EFD_SEMAPHORE;
    }
    if nonblock(f) {
        flags |= libc::EFD_NONBLOCK;
    }
    // SAFETY: creates a new eventfd.
    let fd = cvt(unsafe { libc::eventfd(0, flags) }, || format!("cannot recreate eventfd {}", f.info.fd))?;
    if f.info.pos > 0 {
        File::from(fd.try_clone()?).write_all(&f.info.pos.to_ne_bytes()).context("cannot set an eventfd's counter")?;
    }
    Ok(fd)
}

fn signalfd(f: &Fd) -> Result<OwnedFd> {
    // SAFETY: sigset_t is plain data; the set is built with the libc functions.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::sigemptyset(&mut set) };
    for sig in 1..=64 {
        if f.info.pos & (1u64 << (sig - 1)) != 0 {
            // SAFETY: as above.
            unsafe { libc::sigaddset(&mut set, sig) };
        }
    }
    let mut flags = libc::SFD_CLOEXEC;
    if nonblock(f) {
        flags |= libc::SFD_NONBLOCK;
    }
    // SAFETY: creates a new signalfd from a valid set.
    cvt(unsafe { libc::signalfd(-1, &set, flags) }, || format!("cannot recreate signalfd {}", f.info.fd))
}

fn timerfd(f: &Fd) -> Result<OwnedFd> {
    let t = f.timerfd().ok_or_else(|| anyhow!("timerfd {} has no state", f.info.fd))?;
    let mut flags = libc::TFD_CLOEXEC;
    if nonblock(f) {
        flags |= libc::TFD_NONBLOCK;
    }
    // SAFETY: creates a new timerfd.
    let fd = cvt(unsafe { libc::timerfd_create(t.clockid as i32, flags) }, || {
        format!("cannot recreate timerfd {} (clock {})", f.info.fd, t.clockid)
    })?;
    let mut value = libc::timespec { tv_sec: t.value_sec, tv_nsec: t.value_nsec };
    if t.ticks > 0 && value.tv_sec == 0 && value.tv_nsec == 0 {
        // Expirations the program had not read: expire again at once (the count becomes 1).
        value.tv_nsec = 1;
    }
    let spec = libc::itimerspec { it_interval: libc::timespec { tv_sec: t.interval_sec, tv_nsec: t.interval_nsec }, it_value: value };
    // SAFETY: sets a timer we own, relative to now (the recorded value is time left).
    if unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) } < 0 {
        bail!("cannot arm timerfd {}: {}", f.info.fd, std::io::Error::last_os_error());
    }
    Ok(fd)
}

fn sockaddr_text(s: &SocketState) -> String {
    let a = &s.addr[..s.addr_len as usize];
    match s.family as i32 {
        libc::AF_INET if a.len() >= 8 => format!("{}.{}.{}.{}:{}", a[4], a[5], a[6], a[7], u16::from_be_bytes([a[2], a[3]])),
        libc::AF_INET6 if a.len() >= 24 => format!(
            "[{}]:{}",
            std::net::Ipv6Addr::from(<[u8; 16]>::try_from(&a[8..24]).unwrap_or([0; 16])),
            u16::from_be_bytes([a[2], a[3]])
        ),
        _ => String::from_utf8_lossy(a.get(2..).unwrap_or(&[])).trim_end_matches('\0').to_string(),
    }
}

fn socket(f: &Fd) -> Result<OwnedFd> {
    let s = SocketState::decode(&f.extra).ok_or_else(|| anyhow!("socket {} has no state", f.info.fd))?;
    let ty = s.sock_type as i32 | libc::SOCK_CLOEXEC;
    let fd = if f.info.aux == sock::CLOSED {
        // A socket whose peer is gone: reads see the end, writes fail with EPIPE.
        let mut sv = [0i32; 2];
        let t = if s.sock_type as i32 == libc::SOCK_DGRAM { libc::SOCK_DGRAM } else { s.sock_type as i32 } | libc::SOCK_CLOEXEC;
        // SAFETY: creates a pair of new sockets into `sv`.
        if unsafe { libc::socketpair(libc::AF_UNIX, t, 0, sv.as_mut_ptr()) } < 0 {
            bail!("cannot make a closed socket for fd {}: {}", f.info.fd, std::io::Error::last_os_error());
        }
        // SAFETY: both are new descriptors we own; the peer is closed at once.
        unsafe { libc::close(sv[1]) };
        cvt(sv[0], String::new)?
    } else {
        // SAFETY: creates a new socket.
        let fd = cvt(unsafe { libc::socket(s.family as i32, ty, s.protocol as i32) }, || format!("cannot recreate socket {}", f.info.fd))?;
        let on: libc::c_int = 1;
        let set = |level, opt| {
            // SAFETY: sets an int option on our socket.
            unsafe { libc::setsockopt(fd.as_raw_fd(), level, opt, &on as *const _ as *const libc::c_void, 4) };
        };
        // Bind again even while the old connections linger in TIME_WAIT.
        set(libc::SOL_SOCKET, libc::SO_REUSEADDR);
        if s.flags & sock_flags::REUSEPORT != 0 {
            set(libc::SOL_SOCKET, libc::SO_REUSEPORT);
        }
        if s.flags & sock_flags::V6ONLY != 0 {
            set(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY);
        }
        if f.info.aux == sock::LISTEN || f.info.aux == sock::BOUND {
            if s.family as i32 == libc::AF_UNIX && s.addr_len > 2 && s.addr[2] != 0 {
                // A path left behind by the dead original: bind needs it gone.
                let p = std::path::PathBuf::from(sockaddr_text(&s));
                if std::fs::symlink_metadata(&p).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type())) {
                    let _ = std::fs::remove_file(&p);
                }
            }
            // SAFETY: binds our socket to the recorded address (length checked on read).
            let r = unsafe { libc::bind(fd.as_raw_fd(), s.addr.as_ptr() as *const libc::sockaddr, s.addr_len) };
            if r < 0 {
                bail!("cannot bind socket {} to {} again: {}", f.info.fd, sockaddr_text(&s), std::io::Error::last_os_error());
            }
            // SAFETY: listens on our socket.
            if f.info.aux == sock::LISTEN && unsafe { libc::listen(fd.as_raw_fd(), 4096) } < 0 {
                bail!("cannot listen on {} again: {}", sockaddr_text(&s), std::io::Error::last_os_error());
            }
        }
        fd
    };
    if nonblock(f) {
        set_nonblock(&fd);
    }
    Ok(fd)
}

/// Opens every descriptor the program had, for its number in the child.
pub fn recreate(img: &Image, pl: &Plumbing, objs: &HashMap<u32, OwnedFd>, fds: &mut FdMap) -> Result<()> {
    let mut leaders: HashMap<i32, OwnedFd> = HashMap::new();
    let mut pipes: HashMap<u64, (Option<OwnedFd>, Option<OwnedFd>)> = HashMap::new();
    let mut epolls: HashMap<i32, EpollSpec> = HashMap::new();
    // Pipes first: one per inode, filled with what a read end had not read.
    for f in img.fds.iter().filter(|f| f.info.kind == fd_kind::PIPE) {
        let e = pipes.entry(f.info.ino).or_insert((None, None));
        if e.0.is_none() {
            let (r, w) = pipe(f.info.aux, &[])?;
            *e = (Some(r), Some(w));
        }
        if !f.extra.is_empty() {
            let w = e.1.as_ref().expect("created above");
            File::from(w.try_clone()?).write_all(&f.extra).context("cannot refill a pipe")?;
        }
    }
    for f in &img.fds {
        let x = &f.info;
        if x.kind == fd_kind::EPOLL {
            if x.share != x.fd {
                epolls.get_mut(&x.share).ok_or_else(|| anyhow!("fd {} shares a missing epoll", x.fd))?.dups.push(x.fd);
            } else {
                let items = f.epoll_items().iter().map(|i| (i.tfd, i.events, i.data)).collect();
                epolls.insert(x.fd, EpollSpec { target: x.fd, dups: Vec::new(), items });
            }
            continue;
        }
        let fd: OwnedFd = match x.kind {
            fd_kind::STDIO => match x.aux {
                0 => pl.stdin_r.try_clone()?,
                1 => pl.out_w.try_clone()?,
                _ => pl.err_w.try_clone()?,
            },
            _ if x.share != x.fd => leaders.get(&x.share).ok_or_else(|| anyhow!("fd {} shares a missing fd", x.fd))?.try_clone()?,
            fd_kind::PIPE => {
                let (r, w) = pipes.get(&x.ino).expect("created above");
                let end = if x.open_flags as i32 & libc::O_ACCMODE == libc::O_RDONLY { r } else { w };
                let fd = end.as_ref().expect("created above").try_clone()?;
                if nonblock(f) {
                    set_nonblock(&fd);
                }
                fd
            }
            fd_kind::SHM | fd_kind::DELETED => {
                let want = if x.kind == fd_kind::SHM { file_kind::SHM } else { file_kind::DELETED };
                let obj = img.file_by_identity(want, x.dev, x.ino).ok_or_else(|| anyhow!("fd {} has no file object", x.fd))?;
                super::objects::reopen(&objs[&obj.info.id], x.open_flags, x.pos)?
            }
            fd_kind::SOCKET => socket(f)?,
            fd_kind::EVENTFD => eventfd(f)?,
            fd_kind::SIGNALFD => signalfd(f)?,
            fd_kind::TIMERFD => timerfd(f)?,
            _ => reopen(f)?,
        };
        if x.share == x.fd {
            leaders.insert(x.fd, fd.try_clone()?);
        }
        fds.add(fd, x.fd);
    }
    for (_, e) in epolls {
        fds.add_epoll(e);
    }
    Ok(())
}

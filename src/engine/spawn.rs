//! Starting a child with file descriptors at exact numbers.
//!
//! Both the launched program and the restorer need fds at fixed numbers (the control socket
//! where the agent expects it, the program's own files where they were). The parent opens
//! everything close-on-exec at any number; between `fork` and `exec` the child moves each
//! source above every target, marks every other inherited fd close-on-exec, then `dup2`s
//! each source into place (which clears close-on-exec only on the target). So the child
//! gets exactly the fds given here. Only async-signal-safe calls run in the child.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

/// An epoll to build in the child once every other fd is in place (its interest list
/// names fds by number).
pub struct EpollSpec {
    /// Its fd number in the child.
    pub target: RawFd,
    /// Other numbers that share it (`dup`).
    pub dups: Vec<RawFd>,
    /// (fd, events, data) of each interest.
    pub items: Vec<(RawFd, u32, u64)>,
}

/// Fds to install in a child: (source, target number), and epolls to build there.
#[derive(Default)]
pub struct FdMap {
    pairs: Vec<(OwnedFd, RawFd)>,
    epolls: Vec<EpollSpec>,
}

impl FdMap {
    /// Installs `src` at `target` in the child.
    pub fn add(&mut self, src: OwnedFd, target: RawFd) {
        self.pairs.push((src, target));
    }

    /// Builds an epoll in the child (after every fd is placed).
    pub fn add_epoll(&mut self, e: EpollSpec) {
        self.epolls.push(e);
    }

    /// Highest target.
    pub fn max_target(&self) -> RawFd {
        self.pairs
            .iter()
            .map(|p| p.1)
            .chain(self.epolls.iter().flat_map(|e| std::iter::once(e.target).chain(e.dups.iter().copied())))
            .max()
            .unwrap_or(2)
    }

    /// Spawns `cmd` with these fds in place, the signal mask cleared, and `SIGKILL` when
    /// the supervisor dies (a program without its supervisor has nowhere to write).
    pub fn spawn(mut self, mut cmd: Command) -> io::Result<Child> {
        let top = self.max_target() + 1;
        let raw: Vec<(RawFd, RawFd)> = self.pairs.iter().map(|(s, t)| (s.as_raw_fd(), *t)).collect();
        let mut tmp: Vec<RawFd> = vec![-1; raw.len()];
        let epolls = std::mem::take(&mut self.epolls);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe system calls on preallocated memory.
        unsafe {
            cmd.pre_exec(move || {
                let mut need: libc::rlimit = std::mem::zeroed();
                if libc::getrlimit(libc::RLIMIT_NOFILE, &mut need) == 0 && (need.rlim_cur as i64) < (top as i64 + raw.len() as i64 + 16) {
                    need.rlim_cur = need.rlim_max;
                    libc::setrlimit(libc::RLIMIT_NOFILE, &need);
                }
                for (i, (src, _)) in raw.iter().enumerate() {
                    let t = libc::fcntl(*src, libc::F_DUPFD_CLOEXEC, top);
                    if t < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    tmp[i] = t;
                }
                // Nothing else this process inherited reaches the child.
                libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC);
                for (i, (_, target)) in raw.iter().enumerate() {
                    if libc::dup2(tmp[i], *target) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                // Epolls: all of them first (one may watch another), then their interests.
                for e in &epolls {
                    let ep = libc::epoll_create1(libc::EPOLL_CLOEXEC);
                    if ep < 0 || libc::dup2(ep, e.target) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    libc::close(ep);
                    for &d in &e.dups {
                        if libc::dup2(e.target, d) < 0 {
                            return Err(io::Error::last_os_error());
                        }
                    }
                }
                for e in &epolls {
                    for &(fd, events, data) in &e.items {
                        let mut ev = libc::epoll_event { events, u64: data };
                        // An interest in an fd that is gone is dropped, as the kernel would.
                        libc::epoll_ctl(e.target, libc::EPOLL_CTL_ADD, fd, &mut ev);
                    }
                }
                let empty: libc::sigset_t = std::mem::zeroed();
                libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
                Ok(())
            });
        }
        let child = cmd.spawn();
        drop(self.pairs);
        child
    }
}

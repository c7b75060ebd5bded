//! The program's standard streams, through pipes the supervisor owns.
//!
//! Output is copied to the supervisor's own stdout and stderr by one thread per stream; a
//! checkpoint waits until both pipes are empty so that everything the frozen program wrote
//! is out before the image is finished. Input is copied from the supervisor's stdin by a
//! thread that a checkpoint can pause; the bytes the program has not read yet are copied
//! out of the pipe with `tee(2)` (without taking them) into the image.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The descriptor the program's stderr is copied to: 2, unless this process moved it
/// ([`forward_stderr_to`]).
static STDERR_TO: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(2);

/// Copies the stderr of programs started after this to `fd` instead of our fd 2 (a chain
/// step keeps the program's stderr apart from its own messages). `fd` stays open for the
/// life of the process.
pub fn forward_stderr_to(fd: OwnedFd) {
    use std::os::fd::IntoRawFd;
    STDERR_TO.store(fd.into_raw_fd(), Ordering::SeqCst);
}

/// Where the program's stderr is copied to.
pub fn stderr_fd() -> RawFd {
    STDERR_TO.load(Ordering::SeqCst)
}

/// A pipe: (read end, write end), both close-on-exec.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?)
}

/// Bytes waiting in a pipe.
pub fn pending(fd: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) } == 0 {
        n.max(0) as usize
    } else {
        0
    }
}

/// Copies one output pipe of the program to one of our fds.
pub struct Forwarder {
    read_fd: RawFd,
    busy: Arc<AtomicBool>,
    /// Bytes forwarded so far.
    pub bytes: Arc<AtomicU64>,
    /// The last complete line (at most 1 MiB), and the line being written.
    tail: Arc<Mutex<(Vec<u8>, Vec<u8>)>>,
    thread: Option<JoinHandle<()>>,
}

/// Longest line kept as the last line.
const TAIL_MAX: usize = 1 << 20;

impl Forwarder {
    /// Starts copying from `src` to `dst_fd` (1 or 2). Write errors on our side (a closed
    /// terminal) do not stop the copy, so the program never blocks on a full pipe.
    pub fn start(src: OwnedFd, dst_fd: RawFd) -> Forwarder {
        let read_fd = src.as_raw_fd();
        let busy = Arc::new(AtomicBool::new(false));
        let bytes = Arc::new(AtomicU64::new(0));
        let tail = Arc::new(Mutex::new((Vec::new(), Vec::new())));
        let (b2, n2, t2) = (busy.clone(), bytes.clone(), tail.clone());
        let thread = std::thread::Builder::new()
            .name("limitless-out".into())
            .spawn(move || {
                let mut f = File::from(src);
                let mut buf = vec![0u8; 1 << 16];
                let mut out_ok = true;
                loop {
                    // Busy from before the bytes leave the pipe until they are written and
                    // counted, so that a drain sees them in the pipe or sees us busy.
                    let mut pfd = libc::pollfd { fd: f.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                    // SAFETY: polls one descriptor we own, described by `pfd`.
                    if unsafe { libc::poll(&mut pfd, 1, -1) } < 0 {
                        if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                            continue;
                        }
                        break;
                    }
                    b2.store(true, Ordering::SeqCst);
                    let n = match f.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                            b2.store(false, Ordering::SeqCst);
                            continue;
                        }
                        Err(_) => break,
                    };
                    if out_ok {
                        out_ok = write_all_fd(dst_fd, &buf[..n]).is_ok();
                    }
                    n2.fetch_add(n as u64, Ordering::Relaxed);
                    keep_tail(&t2, &buf[..n]);
                    b2.store(false, Ordering::SeqCst);
                }
                b2.store(false, Ordering::SeqCst);
            })
            .expect("spawn output thread");
        Forwarder { read_fd, busy, bytes, tail, thread: Some(thread) }
    }

    /// The last line of output (without its newline; the unfinished line if the output
    /// does not end with one).
    pub fn last_line(&self) -> Vec<u8> {
        let g = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        if g.1.is_empty() {
            g.0.clone()
        } else {
            g.1.clone()
        }
    }

    /// Waits until the pipe is empty and the last chunk is written (the program is frozen,
    /// so nothing new arrives), or until `limit` passes.
    pub fn drain(&self, limit: Duration) {
        let end = Instant::now() + limit;
        while (pending(self.read_fd) > 0 || self.busy.load(Ordering::SeqCst)) && Instant::now() < end {
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Waits for the program side to close (all writers gone), at most `limit`.
    pub fn finish(mut self, limit: Duration) {
        let end = Instant::now() + limit;
        if let Some(t) = self.thread.take() {
            while !t.is_finished() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(2));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

fn keep_tail(tail: &Mutex<(Vec<u8>, Vec<u8>)>, chunk: &[u8]) {
    let mut g = tail.lock().unwrap_or_else(|e| e.into_inner());
    for line in chunk.split_inclusive(|&b| b == b'\n') {
        if g.1.len() < TAIL_MAX {
            let k = line.len().min(TAIL_MAX - g.1.len());
            g.1.extend_from_slice(&line[..k]);
        }
        if line.ends_with(b"\n") {
            let mut done = std::mem::take(&mut g.1);
            done.pop();
            g.0 = done;
        }
    }
}

/// Writes all of `b` to `fd` (retrying short writes and `EINTR`).
pub fn write_all_fd(fd: RawFd, mut b: &[u8]) -> io::Result<()> {
    while !b.is_empty() {
        // SAFETY: writes from a valid buffer to our own stdout/stderr.
        let r = unsafe { libc::write(fd, b.as_ptr() as *const libc::c_void, b.len()) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        b = &b[r as usize..];
    }
    Ok(())
}

/// The feeding thread's side of the stdin pipe.
struct Feed {
    /// The write end (None once our stdin reached its end and the pipe was closed).
    file: Option<File>,
    /// A checkpoint is in progress: write nothing.
    paused: bool,
    /// Bytes of our stdin put into the pipe (not counting the preload).
    fed: u64,
}

/// The program's stdin pipe and the thread that feeds it from ours.
pub struct Input {
    feed: Arc<(Mutex<Feed>, Condvar)>,
    /// A read end kept by the supervisor, to `tee` unread bytes out at a checkpoint.
    peek: OwnedFd,
}

impl Input {
    /// Creates the pipe; returns the input and the read end for the program.
    pub fn new() -> io::Result<(Input, OwnedFd)> {
        let (r, w) = pipe()?;
        let peek = r.try_clone()?;
        // The feeding thread writes without blocking and waits for room with the lock
        // released, so that a checkpoint can pause it while the pipe is full (a program that
        // does not read its input). The program's read end stays blocking.
        rustix::fs::fcntl_setfl(&w, rustix::fs::fcntl_getfl(&w)? | rustix::fs::OFlags::NONBLOCK)?;
        let feed = Arc::new((Mutex::new(Feed { file: Some(File::from(w)), paused: false, fed: 0 }), Condvar::new()));
        Ok((Input { feed, peek }, r))
    }

    /// Starts copying our stdin into the pipe, after `preload` (input an image carried
    /// that the program had not read yet).
    pub fn start(&self, preload: Vec<u8>) {
        let feed = self.feed.clone();
        let _ = std::thread::Builder::new().name("limitless-in".into()).spawn(move || {
            // Only this thread closes the write end, so its number stays valid here.
            let Some(wfd) = feed.0.lock().unwrap_or_else(|e| e.into_inner()).file.as_ref().map(|f| f.as_raw_fd()) else {
                return;
            };
            let put = |mut bytes: &[u8], count: bool| -> bool {
                let (m, cv) = &*feed;
                while !bytes.is_empty() {
                    {
                        let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
                        while g.paused {
                            g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
                        }
                        let Some(f) = g.file.as_ref() else { return false };
                        match rustix::io::write(f, bytes) {
                            Ok(n) => {
                                if count {
                                    g.fed += n as u64;
                                }
                                bytes = &bytes[n..];
                                continue;
                            }
                            Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => {}
                            Err(_) => {
                                // The program closed its input.
                                g.file = None;
                                return false;
                            }
                        }
                    }
                    // Full: wait for room without the lock, so that a checkpoint can pause the
                    // feeding meanwhile.
                    let mut p = libc::pollfd { fd: wfd, events: libc::POLLOUT, revents: 0 };
                    // SAFETY: one valid pollfd; `wfd` is open until this thread closes it.
                    unsafe { libc::poll(&mut p, 1, 1000) };
                }
                true
            };
            if !preload.is_empty() && !put(&preload, false) {
                return;
            }
            let mut buf = vec![0u8; 1 << 16];
            let stdin = io::stdin();
            let mut src = stdin.lock();
            loop {
                match src.read(&mut buf) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Ok(0) | Err(_) => {
                        feed.0.lock().unwrap_or_else(|e| e.into_inner()).file = None;
                        return;
                    }
                    Ok(n) => {
                        if !put(&buf[..n], true) {
                            return;
                        }
                    }
                }
            }
        });
    }

    /// Pauses the feeding (until [`resume`](Self::resume)) and returns the bytes the
    /// program has not read yet (copied out of the pipe, not taken).
    pub fn pause_and_peek(&self) -> Vec<u8> {
        let mut g = self.feed.0.lock().unwrap_or_else(|e| e.into_inner());
        g.paused = true;
        let n = pending(self.peek.as_raw_fd());
        let mut out = Vec::new();
        if n > 0 {
            if let Ok((tr, tw)) = pipe() {
                // Make the scratch pipe big enough to take everything at once.
                let _ = rustix::pipe::fcntl_setpipe_size(&tw, n.max(4096));
                if let Ok(k) = rustix::pipe::tee(self.peek.as_fd(), &tw, n, rustix::pipe::SpliceFlags::NONBLOCK) {
                    drop(tw);
                    let mut f = File::from(tr);
                    out.resize(k, 0);
                    if f.read_exact(&mut out).is_err() {
                        out.clear();
                    }
                }
            }
        }
        out
    }

    /// How many bytes of our stdin have gone into the pipe (the preload not counted). While
    /// paused, every one of them was either read by the program or is among the bytes
    /// [`pause_and_peek`](Self::pause_and_peek) returned; bytes read from our stdin but not
    /// yet put into the pipe are not counted (they are lost if this process ends).
    pub fn fed(&self) -> u64 {
        self.feed.0.lock().unwrap_or_else(|e| e.into_inner()).fed
    }

    /// Lets the feeding continue after a pause.
    pub fn resume(&self) {
        self.feed.0.lock().unwrap_or_else(|e| e.into_inner()).paused = false;
        self.feed.1.notify_all();
    }

    /// The inode of the pipe (for the agent to recognise it).
    pub fn ino(&self) -> u64 {
        rustix::fs::fstat(&self.peek).map(|s| s.st_ino).unwrap_or(0)
    }
}

/// The inode of an fd.
pub fn ino(fd: impl AsFd) -> u64 {
    rustix::fs::fstat(fd).map(|s| s.st_ino).unwrap_or(0)
}

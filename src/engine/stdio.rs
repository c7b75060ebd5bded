//! The program's standard streams, through pipes the supervisor owns.
//!
//! Output is copied to the supervisor's own stdout and stderr by one thread per stream; a
//! checkpoint waits until both pipes are empty so that everything the frozen program wrote
//! is out before the image is finished. Input is copied from the supervisor's stdin by a
//! thread that a checkpoint can pause; the bytes the program has not read yet are copied
//! out of the pipe with `tee(2)` (without taking them) into the image.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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
    thread: Option<JoinHandle<()>>,
}

impl Forwarder {
    /// Starts copying from `src` to `dst_fd` (1 or 2). Write errors on our side (a closed
    /// terminal) do not stop the copy, so the program never blocks on a full pipe.
    pub fn start(src: OwnedFd, dst_fd: RawFd) -> Forwarder {
        let read_fd = src.as_raw_fd();
        let busy = Arc::new(AtomicBool::new(false));
        let bytes = Arc::new(AtomicU64::new(0));
        let (b2, n2) = (busy.clone(), bytes.clone());
        let thread = std::thread::Builder::new()
            .name("limitless-out".into())
            .spawn(move || {
                let mut f = File::from(src);
                let mut buf = vec![0u8; 1 << 16];
                let mut out_ok = true;
                loop {
                    let n = match f.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(_) => break,
                    };
                    b2.store(true, Ordering::SeqCst);
                    if out_ok {
                        out_ok = write_fd(dst_fd, &buf[..n]).is_ok();
                    }
                    n2.fetch_add(n as u64, Ordering::Relaxed);
                    b2.store(false, Ordering::SeqCst);
                }
            })
            .expect("spawn output thread");
        Forwarder { read_fd, busy, bytes, thread: Some(thread) }
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

fn write_fd(fd: RawFd, mut b: &[u8]) -> io::Result<()> {
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

/// The program's stdin pipe and the thread that feeds it from ours.
pub struct Input {
    /// The write end (None once our stdin reached its end and the pipe was closed).
    writer: Arc<Mutex<Option<File>>>,
    /// A read end kept by the supervisor, to `tee` unread bytes out at a checkpoint.
    peek: OwnedFd,
}

impl Input {
    /// Creates the pipe; returns the input and the read end for the program.
    pub fn new() -> io::Result<(Input, OwnedFd)> {
        let (r, w) = pipe()?;
        let peek = r.try_clone()?;
        Ok((Input { writer: Arc::new(Mutex::new(Some(File::from(w)))), peek }, r))
    }

    /// Starts copying our stdin into the pipe, after `preload` (input an image carried
    /// that the program had not read yet).
    pub fn start(&self, preload: Vec<u8>) {
        let w = self.writer.clone();
        let _ = std::thread::Builder::new().name("limitless-in".into()).spawn(move || {
            if !preload.is_empty() {
                let mut g = w.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(f) = g.as_mut() {
                    if f.write_all(&preload).is_err() {
                        *g = None;
                        return;
                    }
                }
            }
            let mut buf = vec![0u8; 1 << 16];
            let stdin = io::stdin();
            let mut src = stdin.lock();
            loop {
                let n = match src.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        *w.lock().unwrap_or_else(|e| e.into_inner()) = None;
                        return;
                    }
                    Ok(n) => n,
                };
                let mut g = w.lock().unwrap_or_else(|e| e.into_inner());
                match g.as_mut() {
                    Some(f) => {
                        if f.write_all(&buf[..n]).is_err() {
                            *g = None;
                            return;
                        }
                    }
                    None => return,
                }
            }
        });
    }

    /// Pauses the feeding thread and returns the bytes the program has not read yet
    /// (copied, not consumed). Feeding resumes when the guard is dropped.
    pub fn pause_and_peek(&self) -> (std::sync::MutexGuard<'_, Option<File>>, Vec<u8>) {
        let g = self.writer.lock().unwrap_or_else(|e| e.into_inner());
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
        (g, out)
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

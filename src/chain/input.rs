//! The program's stdin across a chain (`limitless run`).
//!
//! Each step reads the controller's stdin through a pipe of its own. A step's checkpoint
//! records how far into that stream the program had got (`Manifest::in_bytes`: what it
//! read, and what was still in its pipe, which the image carries). The controller keeps
//! the input from the latest checkpoint's offset on, in an unnamed temporary file, so
//! that a step that dies and runs again from that checkpoint gets the same bytes from the
//! same point. Input before the latest checkpoint's offset is let go (its blocks are
//! freed), so what is kept is at most what the program read since its last checkpoint,
//! plus what the step's pipes hold.
//!
//! A regular file as stdin needs none of that: each step's input is read from the file at
//! its offset. If the input cannot be kept (a full `$TMPDIR`), the program is still fed,
//! but a step that dies before the next checkpoint cannot be run again: the chain stops
//! and says so.
//!
//! Our stdin is read only as fast as a step takes it; with `--resume`, a new stdin is
//! taken as the same stream from its start, and its first bytes, up to the checkpoint's
//! offset, are skipped.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex};

/// Bytes read from our stdin, or copied to a step, at a time.
const CHUNK: usize = 1 << 16;

struct State {
    /// Stream offset of the first byte kept (bytes before it are gone).
    start: u64,
    /// Stream offset just past the last byte read from our stdin.
    end: u64,
    /// Our stdin has ended (or failed).
    eof: bool,
    /// A thread is reading our stdin now (with the lock released).
    reading: bool,
    /// Bytes `start..kept_until`, each at its stream offset (a sparse file: the blocks
    /// before `start` are freed). Created with the first byte to keep.
    kept: Option<File>,
    /// Bytes from here on are not in `kept` (see `broken`).
    kept_until: u64,
    /// Keeping in the file failed: until no step can start before `end`, bytes are kept
    /// in `mem` instead, at most `MEM_MAX` of them.
    broken: bool,
    /// Bytes `mem_from..end` while `broken` (those from `kept_until` to `mem_from` are lost).
    mem: Vec<u8>,
    mem_from: u64,
    /// The failure to keep the input was told (once per chain).
    told: bool,
}

/// The most input kept in memory once it cannot be kept in a file.
const MEM_MAX: usize = 64 << 20;

/// Our stdin, kept from the latest checkpoint's offset on.
pub struct Tape {
    src: Mutex<Option<File>>,
    /// A regular file as stdin, and its offset when we started: read at any offset, with
    /// nothing to keep.
    file: Option<(File, u64)>,
    /// Where the input is kept.
    dir: std::path::PathBuf,
    state: Mutex<State>,
    cv: Condvar,
}

impl Tape {
    /// Takes `src` (our stdin, or /dev/null) as the program's input, kept in `$TMPDIR`.
    pub fn new(src: File) -> Arc<Tape> {
        Tape::keeping_in(src, std::env::temp_dir())
    }

    /// [`Tape::new`], keeping the input in `dir`.
    pub fn keeping_in(src: File, dir: std::path::PathBuf) -> Arc<Tape> {
        let regular = src.metadata().is_ok_and(|m| m.file_type().is_file());
        let base = if regular { rustix::fs::seek(&src, rustix::fs::SeekFrom::Current(0)).ok() } else { None };
        let (src, file) = match base {
            Some(b) => (None, Some((src, b))),
            None => (Some(src), None),
        };
        let state = State {
            start: 0,
            end: 0,
            eof: false,
            reading: false,
            kept: None,
            kept_until: 0,
            broken: false,
            mem: Vec::new(),
            mem_from: 0,
            told: false,
        };
        Arc::new(Tape { src: Mutex::new(src), file, dir, state: Mutex::new(state), cv: Condvar::new() })
    }

    /// Whether a step can be given the input from stream offset `offset` on (false if
    /// bytes after it could not be kept).
    pub fn can_give(&self, offset: u64) -> bool {
        let st = self.lock();
        let lost = st.broken && st.kept_until < st.mem_from;
        self.file.is_some() || (offset >= st.start && (!lost || offset >= st.mem_from))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// No step will start before stream offset `offset` again: let the bytes before it go.
    pub fn keep_from(&self, offset: u64) {
        let mut st = self.lock();
        if offset <= st.start {
            return;
        }
        let (old, new) = (st.start, offset.min(st.end));
        if let Some(f) = &st.kept {
            if new > old {
                // Frees the blocks; a failure only keeps them.
                let _ = rustix::fs::fallocate(
                    f,
                    rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
                    old,
                    new - old,
                );
            }
        }
        st.start = offset;
        if st.broken && offset >= st.end {
            // Nothing that could not be kept in the file is needed any more: try it again.
            st.broken = false;
            st.kept_until = st.end;
            st.mem = Vec::new();
            st.mem_from = st.end;
        } else if st.broken && offset > st.mem_from {
            let k = (offset - st.mem_from) as usize;
            st.mem.drain(..k);
            st.mem_from = offset;
        }
        self.cv.notify_all();
    }

    /// Starts copying the input from stream offset `from` (`None`: from where it has been
    /// read to) into `pipe`, on a thread of its own. The thread ends at the input's end
    /// (closing the pipe), when the step closes its end, or when the bytes at its offset
    /// are let go.
    pub fn feed(self: &Arc<Tape>, from: Option<u64>, pipe: OwnedFd) {
        let tape = self.clone();
        let _ = std::thread::Builder::new().name("limitless-stdin".into()).spawn(move || {
            let mut out = File::from(pipe);
            let mut pos = from.unwrap_or_else(|| {
                let st = tape.lock();
                st.end.max(st.start)
            });
            let mut buf = vec![0u8; CHUNK];
            while let Some(n) = tape.read_at(pos, &mut buf) {
                if out.write_all(&buf[..n]).is_err() {
                    return;
                }
                pos += n as u64;
            }
        });
    }

    /// Copies bytes at stream offset `pos` into `buf`, reading our stdin if they have not
    /// been read yet. `None` at the input's end, or if they were let go.
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> Option<usize> {
        if let Some((f, base)) = &self.file {
            loop {
                match f.read_at(buf, base + pos) {
                    Ok(n) => return (n > 0).then_some(n),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        eprintln!("limitless: cannot read the program's input: {e}; its input ends here");
                        return None;
                    }
                }
            }
        }
        let mut st = self.lock();
        loop {
            if pos < st.start {
                return None;
            }
            if pos < st.end {
                if pos >= st.mem_from && st.broken {
                    let at = (pos - st.mem_from) as usize;
                    let n = (st.mem.len() - at).min(buf.len());
                    buf[..n].copy_from_slice(&st.mem[at..at + n]);
                    return Some(n);
                }
                if pos >= st.kept_until {
                    // Lost (the controller checks `can_give` before it starts a step).
                    return None;
                }
                let n = ((st.kept_until - pos) as usize).min(buf.len());
                let f = st.kept.as_ref()?;
                return match f.read_exact_at(&mut buf[..n], pos) {
                    Ok(()) => Some(n),
                    Err(e) => {
                        eprintln!("limitless: cannot read back the program's kept input: {e}; its input ends here");
                        None
                    }
                };
            }
            if st.eof {
                return None;
            }
            if st.reading {
                st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            st.reading = true;
            drop(st);
            let got = self.read_src(buf);
            st = self.lock();
            st.reading = false;
            self.cv.notify_all();
            match got {
                Ok(0) | Err(_) => st.eof = true,
                Ok(n) => {
                    let at = st.end;
                    if !st.broken {
                        if let Err(e) = keep(&mut st, at, &buf[..n], &self.dir) {
                            if !st.told {
                                st.told = true;
                                eprintln!(
                                    "limitless: cannot keep the program's input in {} ({e}); keeping at most the last {} MiB of it in memory (set TMPDIR to a roomier directory)",
                                    self.dir.display(),
                                    MEM_MAX >> 20
                                );
                            }
                            st.broken = true;
                            st.mem_from = at;
                        }
                    }
                    st.end = at + n as u64;
                    if !st.broken {
                        st.kept_until = st.end;
                    } else {
                        st.mem.extend_from_slice(&buf[..n]);
                        // (Trimmed by a quarter at a time, not at every chunk.)
                        if st.mem.len() > MEM_MAX + MEM_MAX / 4 {
                            let k = st.mem.len() - MEM_MAX;
                            st.mem.drain(..k);
                            st.mem_from += k as u64;
                        }
                    }
                    // The bytes are in `buf`: the reader they were read for takes them.
                    if pos == at {
                        return Some(n);
                    }
                }
            }
        }
    }

    /// One read of our stdin (retried when interrupted).
    fn read_src(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut src = self.src.lock().unwrap_or_else(|e| e.into_inner());
        let Some(f) = src.as_mut() else { return Ok(0) };
        loop {
            match f.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(0) | Err(_) => {
                    // Never read again: on a terminal, one Ctrl-D ends the input of the
                    // whole chain.
                    *src = None;
                    return Ok(0);
                }
                r => return r,
            }
        }
    }
}

/// Writes `bytes`, read at stream offset `at`, to the file, those at or after `st.start`.
fn keep(st: &mut State, at: u64, bytes: &[u8], dir: &std::path::Path) -> io::Result<()> {
    let skip = st.start.saturating_sub(at).min(bytes.len() as u64) as usize;
    if skip == bytes.len() {
        return Ok(());
    }
    if st.kept.is_none() {
        st.kept = Some(unnamed_file(dir)?);
    }
    let f = st.kept.as_ref().expect("created above");
    f.write_all_at(&bytes[skip..], at + skip as u64)
}

/// A file with no name in the temporary directory, gone when closed.
fn unnamed_file(dir: &std::path::Path) -> io::Result<File> {
    let fd = rustix::fs::open(dir, rustix::fs::OFlags::TMPFILE | rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC, 0o600.into());
    match fd {
        Ok(fd) => Ok(File::from(fd)),
        // File systems without O_TMPFILE: a named file, removed at once.
        Err(_) => {
            let path = dir.join(format!("limitless-stdin-{}-{}", std::process::id(), super::new_chain_id()));
            let f = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
            let _ = std::fs::remove_file(&path);
            Ok(f)
        }
    }
}

/// The program's input for `run`: our stdin, unless it is a terminal this process does
/// not have in the foreground (reading it would stop us), in which case /dev/null.
pub fn our_stdin() -> io::Result<File> {
    // SAFETY: isatty, tcgetpgrp and getpgrp only inspect fd 0 and this process.
    let background_tty = unsafe { libc::isatty(0) == 1 && libc::tcgetpgrp(0) != libc::getpgrp() };
    if background_tty {
        return File::open("/dev/null");
    }
    match rustix::io::fcntl_dupfd_cloexec(rustix::stdio::stdin(), 3) {
        Ok(fd) => Ok(File::from(fd)),
        // No stdin at all.
        Err(_) => File::open("/dev/null"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::stdio::pipe;

    /// A tape over a pipe we write to.
    fn tape() -> (Arc<Tape>, File) {
        let (r, w) = pipe().unwrap();
        (Tape::new(File::from(r)), File::from(w))
    }

    fn fed(t: &Arc<Tape>, from: Option<u64>, n: usize) -> Vec<u8> {
        let (r, w) = pipe().unwrap();
        t.feed(from, w);
        let mut got = vec![0u8; n];
        File::from(r).read_exact(&mut got).unwrap();
        got
    }

    #[test]
    fn a_step_run_again_gets_the_same_bytes_from_its_checkpoint() {
        let (t, mut w) = tape();
        w.write_all(b"0123456789").unwrap();
        assert_eq!(fed(&t, Some(0), 10), b"0123456789");
        // The checkpoint was at 4: a second attempt starts there.
        t.keep_from(4);
        assert_eq!(fed(&t, Some(4), 6), b"456789");
        w.write_all(b"abc").unwrap();
        assert_eq!(fed(&t, Some(4), 9), b"456789abc");
    }

    #[test]
    fn the_end_of_input_reaches_every_step_and_let_go_bytes_are_not_served() {
        let (t, mut w) = tape();
        w.write_all(b"hello").unwrap();
        drop(w);
        let (r, p) = pipe().unwrap();
        t.feed(Some(2), p);
        let mut got = Vec::new();
        File::from(r).read_to_end(&mut got).unwrap();
        assert_eq!(got, b"llo");
        let (r, p) = pipe().unwrap();
        t.feed(Some(5), p);
        let mut got = Vec::new();
        File::from(r).read_to_end(&mut got).unwrap();
        assert!(got.is_empty());
        t.keep_from(3);
        // A feeder behind what is kept ends at once (its step is not the latest).
        let (r, p) = pipe().unwrap();
        t.feed(Some(1), p);
        let mut got = Vec::new();
        File::from(r).read_to_end(&mut got).unwrap();
        assert!(got.is_empty());
    }

    #[test]
    fn a_resumed_chain_skips_the_input_before_its_checkpoint() {
        let (t, mut w) = tape();
        t.keep_from(7);
        w.write_all(b"abcdefghij").unwrap();
        assert_eq!(fed(&t, Some(7), 3), b"hij");
    }

    #[test]
    fn a_regular_file_is_read_at_each_steps_offset_from_where_it_was() {
        let dir = std::env::temp_dir().join(format!("limitless-tape-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("in");
        std::fs::write(&p, b"skip:0123456789").unwrap();
        let mut f = File::open(&p).unwrap();
        let mut skip = [0u8; 5];
        f.read_exact(&mut skip).unwrap();
        let t = Tape::keeping_in(f, dir.join("absent"));
        assert_eq!(fed(&t, Some(0), 10), b"0123456789");
        t.keep_from(6);
        assert!(t.can_give(6));
        let (r, w) = pipe().unwrap();
        t.feed(Some(6), w);
        let mut got = Vec::new();
        File::from(r).read_to_end(&mut got).unwrap();
        assert_eq!(got, b"6789");
        // Nothing was kept (the keeping directory does not even exist).
        assert!(t.lock().kept.is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn input_that_cannot_be_kept_in_a_file_is_kept_in_memory_up_to_a_limit() {
        let (r, w) = pipe().map(|(r, w)| (File::from(r), File::from(w))).unwrap();
        let t = Tape::keeping_in(r, std::path::PathBuf::from("/nonexistent/limitless"));
        let n = MEM_MAX + MEM_MAX / 2;
        let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        let d2 = data.clone();
        let writer = std::thread::spawn(move || {
            let mut w = w;
            w.write_all(&d2[..6]).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(50));
            w.write_all(&d2[6..]).unwrap();
        });
        assert_eq!(fed(&t, Some(0), 6), &data[..6]);
        assert!(t.lock().broken);
        // The first feeder's step is gone; its thread took one more chunk, which a re-run
        // from 0 still gets (from memory).
        assert!(t.can_give(0));
        assert_eq!(fed(&t, Some(0), 6), &data[..6]);
        let got = fed(&t, Some(6), n - 6);
        assert!(got == data[6..], "the input differs");
        writer.join().unwrap();
        // More than the memory holds went by: a re-run from 0 would need bytes that are
        // nowhere; one from where the memory starts would not.
        assert!(!t.can_give(0));
        let from = t.lock().mem_from;
        assert!(from > 0 && t.can_give(from));
        // A checkpoint past it all: the file is tried again (and fails again here).
        t.keep_from(n as u64);
        assert!(!t.lock().broken && t.can_give(n as u64));
    }

    #[test]
    fn let_go_input_frees_its_blocks() {
        let (t, mut w) = tape();
        let big = vec![7u8; 4 << 20];
        let writer = std::thread::spawn(move || w.write_all(&big).unwrap());
        assert_eq!(fed(&t, Some(0), 4 << 20).len(), 4 << 20);
        writer.join().unwrap();
        let blocks = |t: &Arc<Tape>| rustix::fs::fstat(t.lock().kept.as_ref().unwrap()).unwrap().st_blocks * 512;
        assert!(blocks(&t) >= 4 << 20);
        t.keep_from(4 << 20);
        let after = blocks(&t);
        assert!(after < 1 << 20, "{after} bytes still allocated after letting 4 MiB go");
    }
}

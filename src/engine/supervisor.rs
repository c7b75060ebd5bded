//! The supervisor: the parent of the program (launched or restored). It owns the program's
//! standard streams and the control socket to its agent, serves checkpoint requests, and
//! ends with the program's exit status.

use super::api::{ApiServer, Bound};
use super::embedded;
use super::link::{AgentMsg, Link};
use super::spawn::FdMap;
use super::stdio::{self, Forwarder, Input};
use super::{EXIT_CHECKPOINTED, SIG_CKPT};
use anyhow::{bail, Context, Result};
use limitless_image::ctl::{Hello, Restored};
use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Options shared by `launch` and `restore`.
#[derive(Clone, Debug)]
pub struct Options {
    /// Where to listen for control requests (`None`: nowhere).
    pub socket: Option<PathBuf>,
    /// Files every checkpoint carries in the image.
    pub carry: super::carry::Carry,
    /// After a restore from an image file, start the agent's dirty tracking from it, so
    /// that a delta on top of that image (`dump --parent`) need not read memory the
    /// program has not written since. Each first write to a page then costs a minor
    /// fault.
    pub track: bool,
    /// Restore from an image file by mapping its page data copy-on-write where the image
    /// allows it, instead of copying it: the restore reads and checks the data once and
    /// the program copies a page only when it first writes it (`restore --map`).
    pub map: bool,
}

/// What the agent has told us outside of a checkpoint.
#[derive(Default)]
pub struct AgentState {
    /// The agent's greeting after a launch.
    pub hello: Option<Hello>,
    /// The agent's report after a restore.
    pub restored: Option<Restored>,
    /// The last failure the agent reported.
    pub failed: Option<String>,
    /// The control socket closed: the program is gone.
    pub closed: bool,
}

/// The parts of a supervisor that the control-request thread shares.
pub struct Inner {
    /// The control socket to the agent.
    pub link: Link,
    /// What the agent said outside of checkpoints.
    pub state: Mutex<AgentState>,
    /// Signalled when `state` changes.
    pub changed: Condvar,
    /// FROZEN, RELEASED, NOTE, DONE and FAILED messages, for the checkpoint in progress.
    pub events: Mutex<mpsc::Receiver<AgentMsg>>,
    /// The program's stdin.
    pub input: Input,
    /// The program's stdout.
    pub out: Forwarder,
    /// The program's stderr.
    pub err: Forwarder,
    /// Inodes of the three standard pipes (the agent recognises them by these).
    pub stdio_ino: [u64; 3],
    /// The program's pidfd.
    pub pidfd: OwnedFd,
    /// The program's pid.
    pub pid: u32,
    /// The program was stopped after a checkpoint (exit with EXIT_CHECKPOINTED).
    pub stopped: AtomicBool,
    /// Only one checkpoint at a time.
    pub busy: Mutex<()>,
    /// Files every checkpoint carries in the image.
    pub carry: super::carry::Carry,
    /// The last image written with dirty tracking armed: its path, trailer hash and the
    /// agent's epoch for it (a delta on top of exactly that image may skip unchanged
    /// memory).
    pub tracked: Mutex<Option<(PathBuf, [u8; 32], u64)>>,
}

impl Inner {
    /// Sends `SIGKILL` to the program (race-free through its pidfd).
    pub fn kill(&self) {
        let _ = rustix::process::pidfd_send_signal(&self.pidfd, rustix::process::Signal::KILL);
    }

    /// Waits until `f` holds for the agent state, or `limit` passes; returns whether it held.
    pub fn wait_state(&self, limit: Duration, f: impl Fn(&AgentState) -> bool) -> bool {
        let end = Instant::now() + limit;
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if f(&g) {
                return true;
            }
            let now = Instant::now();
            if now >= end {
                return false;
            }
            g = self.changed.wait_timeout(g, end - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

/// A running, supervised program.
pub struct Supervisor {
    child: Child,
    /// What the control thread shares.
    pub inner: Arc<Inner>,
    api: Option<ApiServer>,
}

/// The pieces every supervised child needs, made before it starts.
pub struct Plumbing {
    /// Our end of the control socket.
    pub link: Link,
    /// The program's end of the control socket.
    pub child_ctl: OwnedFd,
    /// The stdin pipe's writer side.
    pub input: Input,
    /// The stdin pipe's read end, for the program.
    pub stdin_r: OwnedFd,
    /// The stdout pipe.
    pub out_r: OwnedFd,
    /// The stdout pipe's write end, for the program.
    pub out_w: OwnedFd,
    /// The stderr pipe.
    pub err_r: OwnedFd,
    /// The stderr pipe's write end, for the program.
    pub err_w: OwnedFd,
    /// The control socket, bound before the program starts.
    pub api: Option<Bound>,
    /// Files every checkpoint carries.
    pub carry: super::carry::Carry,
}

impl Plumbing {
    /// Creates the pipes, the control socket and (if asked) the bound API socket.
    pub fn new(opts: &Options) -> Result<Plumbing> {
        let api = opts.socket.as_deref().map(Bound::new).transpose()?;
        let (link, child_ctl) = Link::pair().context("cannot create the control socket")?;
        let (input, stdin_r) = Input::new().context("cannot create the stdin pipe")?;
        let (out_r, out_w) = stdio::pipe()?;
        let (err_r, err_w) = stdio::pipe()?;
        Ok(Plumbing { link, child_ctl, input, stdin_r, out_r, out_w, err_r, err_w, api, carry: opts.carry.clone() })
    }

    /// Adds the standard streams of the child to `fds` at 0, 1 and 2 (clones, so that an
    /// image's extra descriptors can share them too).
    pub fn stdio_fds(&self, fds: &mut FdMap) -> Result<()> {
        fds.add(self.stdin_r.try_clone()?, 0);
        fds.add(self.out_w.try_clone()?, 1);
        fds.add(self.err_w.try_clone()?, 2);
        Ok(())
    }

    /// Starts the supervisor around a spawned child.
    pub fn supervise(self, child: Child, preload_stdin: Vec<u8>) -> Result<Supervisor> {
        let pid = child.id();
        let pidfd = rustix::process::pidfd_open(
            rustix::process::Pid::from_raw(pid as i32).context("bad child pid")?,
            rustix::process::PidfdFlags::empty(),
        )
        .context("pidfd_open")?;
        let stdio_ino = [self.input.ino(), stdio::ino(self.out_w.as_fd()), stdio::ino(self.err_w.as_fd())];
        drop(self.stdin_r);
        drop(self.out_w);
        drop(self.err_w);
        drop(self.child_ctl);
        let out = Forwarder::start(self.out_r, 1);
        let err = Forwarder::start(self.err_r, stdio::stderr_fd());
        self.input.start(preload_stdin);
        let (tx, rx) = mpsc::channel();
        let inner = Arc::new(Inner {
            link: self.link,
            state: Mutex::new(AgentState::default()),
            changed: Condvar::new(),
            events: Mutex::new(rx),
            input: self.input,
            out,
            err,
            stdio_ino,
            pidfd,
            pid,
            stopped: AtomicBool::new(false),
            busy: Mutex::new(()),
            carry: self.carry,
            tracked: Mutex::new(None),
        });
        start_reader(inner.clone(), tx);
        let api = match self.api {
            Some(b) => Some(b.serve(inner.clone())?),
            None => None,
        };
        Ok(Supervisor { child, inner, api })
    }
}

fn start_reader(inner: Arc<Inner>, tx: mpsc::Sender<AgentMsg>) {
    let _ = std::thread::Builder::new().name("limitless-ctl".into()).spawn(move || loop {
        let m = inner.link.recv().unwrap_or(AgentMsg::Closed);
        let mut st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
        let done = matches!(m, AgentMsg::Closed);
        match &m {
            AgentMsg::Hello(h) => st.hello = Some(*h),
            AgentMsg::Restored(r) => st.restored = Some(*r),
            AgentMsg::Failed(t) => st.failed = Some(t.clone()),
            AgentMsg::Closed => st.closed = true,
            // The program runs again (snapshot checkpoint): its input may flow again too;
            // the unread input was copied before the agent let it go.
            AgentMsg::Released(r) => {
                inner.input.resume();
                tracing::debug!(
                    "checkpoint: threads released after {:.1} ms (the snapshot clone took {:.1} ms)",
                    r.frozen_ns as f64 / 1e6,
                    r.clone_ns as f64 / 1e6
                );
            }
            AgentMsg::Note(t) => tracing::info!("checkpoint: {t}"),
            _ => {}
        }
        drop(st);
        inner.changed.notify_all();
        let _ = tx.send(m);
        if done {
            return;
        }
    });
}

/// Finds `prog` like a shell does: as given if it has a slash, else in `$PATH`.
pub fn find_program(prog: &Path) -> Result<PathBuf, (i32, String)> {
    let check = |p: &Path| -> Option<Result<PathBuf, (i32, String)>> {
        let md = std::fs::metadata(p).ok()?;
        if md.is_dir() {
            return Some(Err((126, format!("{} is a directory", p.display()))));
        }
        if rustix::fs::access(p, rustix::fs::Access::EXEC_OK).is_err() {
            return Some(Err((126, format!("{} is not executable", p.display()))));
        }
        Some(Ok(p.to_path_buf()))
    };
    if prog.as_os_str().to_string_lossy().contains('/') {
        return check(prog).unwrap_or_else(|| Err((127, format!("program not found: {}", prog.display()))));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/local/bin:/usr/bin:/bin"));
    for dir in std::env::split_paths(&path) {
        if let Some(r) = check(&dir.join(prog)) {
            return r;
        }
    }
    Err((127, format!("program not found in PATH: {}", prog.display())))
}

/// Whether `path` can take the agent: a dynamically linked ELF program, or a script whose
/// interpreter is one. `Err` says why not (a statically linked program ignores
/// `LD_PRELOAD`, so it runs but cannot be checkpointed).
pub fn check_dynamic(path: &Path) -> Result<(), String> {
    check_dynamic_depth(path, 0)
}

fn check_dynamic_depth(path: &Path, depth: u32) -> Result<(), String> {
    use std::io::Read;
    let mut head = vec![0u8; 4096];
    let n = std::fs::File::open(path).and_then(|mut f| f.read(&mut head)).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let head = &head[..n];
    if head.starts_with(b"#!") && depth < 4 {
        let line = head[2..].split(|&b| b == b'\n').next().unwrap_or(&[]);
        let interp = String::from_utf8_lossy(line).split_whitespace().next().unwrap_or("").to_string();
        return check_dynamic_depth(Path::new(&interp), depth + 1);
    }
    if head.len() < 64 || &head[..4] != b"\x7fELF" || head[4] != 2 {
        return Ok(()); // not a 64-bit ELF file: let exec decide
    }
    let u16_at = |o: usize| u16::from_le_bytes([head[o], head[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(head[32..40].try_into().unwrap_or([0; 8])) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        if o + 4 > head.len() {
            return Ok(()); // program headers beyond the first page: do not guess
        }
        if u32::from_le_bytes(head[o..o + 4].try_into().unwrap_or([0; 4])) == 3 {
            return Ok(()); // PT_INTERP: dynamically linked
        }
    }
    Err(format!("{} is statically linked, so the engine's agent cannot be loaded into it and it cannot be checkpointed", path.display()))
}

/// The fd number for the agent's control socket in a launched program.
fn ctl_fd_number() -> i32 {
    let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile).current.unwrap_or(1024);
    (soft.min(1024) as i32 - 1).max(10)
}

impl Supervisor {
    /// Launches `prog` under the engine.
    pub fn launch(prog: &Path, args: &[OsString], opts: &Options) -> Result<Supervisor> {
        Self::launch_with_env(prog, args, &[], opts)
    }

    /// Launches `prog` under the engine with `env` added to this process's environment.
    pub fn launch_with_env(prog: &Path, args: &[OsString], env: &[(String, String)], opts: &Options) -> Result<Supervisor> {
        let files = embedded::unpack()?;
        let pl = Plumbing::new(opts)?;
        let ctl = ctl_fd_number();
        let mut fds = FdMap::default();
        pl.stdio_fds(&mut fds)?;
        fds.add(pl.child_ctl.try_clone()?, ctl);
        let mut cmd = Command::new(prog);
        cmd.args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut preload = files.agent.clone().into_os_string();
        if let Some(old) = std::env::var_os("LD_PRELOAD").filter(|v| !v.is_empty()) {
            preload.push(":");
            preload.push(old);
        }
        cmd.env("LD_PRELOAD", preload);
        cmd.env("LIMITLESS_AGENT", format!("fd={ctl:05},pid={:010},sig={SIG_CKPT:02}", 0));
        let child = fds.spawn(cmd).with_context(|| format!("cannot start {}", prog.display()))?;
        pl.supervise(child, Vec::new())
    }

    /// Waits for the agent's `HELLO` (the program has started under the engine).
    pub fn wait_ready(&self, limit: Duration) -> bool {
        self.inner.wait_state(limit, |s| s.hello.is_some() || s.restored.is_some() || s.closed)
            && !self.inner.state.lock().map(|s| s.closed && s.hello.is_none()).unwrap_or(true)
    }

    /// Waits for the program to end; returns the exit status to pass on.
    pub fn wait(mut self) -> Result<i32> {
        let status = loop {
            match self.child.wait() {
                Ok(s) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => bail!("waiting for the program failed: {e}"),
            }
        };
        Ok(self.finish(status))
    }

    /// Whether the program has ended, without waiting. When it has, the supervisor is done
    /// (its output is forwarded) and the exit status to pass on is returned.
    pub fn try_wait(&mut self) -> Result<Option<i32>> {
        match self.child.try_wait() {
            Ok(Some(status)) => Ok(Some(self.finish_in_place(status))),
            Ok(None) => Ok(None),
            Err(e) => bail!("waiting for the program failed: {e}"),
        }
    }

    fn finish_in_place(&mut self, status: std::process::ExitStatus) -> i32 {
        if let Some(api) = self.api.take() {
            api.stop();
        }
        let c = code(&self.inner, status);
        self.inner.out.drain(Duration::from_secs(5));
        self.inner.err.drain(Duration::from_secs(5));
        c
    }

    fn finish(mut self, status: std::process::ExitStatus) -> i32 {
        if let Some(api) = self.api.take() {
            api.stop();
        }
        let inner = match Arc::try_unwrap(self.inner) {
            Ok(i) => i,
            Err(a) => {
                // The control thread still holds a reference: just drain what we can.
                a.out.drain(Duration::from_secs(2));
                a.err.drain(Duration::from_secs(2));
                return code(&a, status);
            }
        };
        let c = code(&inner, status);
        inner.out.finish(Duration::from_secs(5));
        inner.err.finish(Duration::from_secs(5));
        c
    }

    /// CPU time and memory of the program now.
    pub fn proc_stats(&self) -> ProcStats {
        ProcStats::of(self.inner.pid)
    }

    /// The program's pid.
    pub fn pid(&self) -> u32 {
        self.inner.pid
    }

    /// What a checkpoint now would have to read and store, for a program with `rss_bytes`
    /// resident: all of it, less the memory not written since dirty tracking was armed
    /// (which a store that [takes unchanged memory](crate::store::Store::takes_unchanged)
    /// takes from the previous image unread). An estimate: written memory is counted in
    /// the image's page windows (1 MiB), as the agent sends it.
    pub fn send_estimate(&self, rss_bytes: u64) -> u64 {
        if self.inner.tracked.lock().unwrap_or_else(|e| e.into_inner()).is_none() {
            return rss_bytes;
        }
        match written_since_tracking(self.inner.pid) {
            Some((tracked, written)) => rss_bytes.saturating_sub(tracked) + written.min(tracked),
            None => rss_bytes,
        }
    }
}

/// The present pages in the areas of process `pid` that dirty tracking covers (registered
/// for asynchronous userfaultfd write-protection), and the page windows among them written
/// since they were last protected, in bytes. One read-only `PAGEMAP_SCAN` walk (Linux
/// 6.7+): it changes nothing and costs about 3 ms per GiB tracked (3.2 ms, mean of 100
/// calls on a 1 GiB process, on this VM). `None` if the scan is refused.
fn written_since_tracking(pid: u32) -> Option<(u64, u64)> {
    use limitless_sys as sys;
    const WINDOW: u64 = limitless_image::format::WINDOW_PAGES * limitless_image::format::PAGE;
    let pm = std::fs::File::open(format!("/proc/{pid}/pagemap")).ok()?;
    let mut rv = vec![sys::PageRegion::default(); 1024];
    let (mut at, end) = (0u64, 0x7fff_ffff_f000u64);
    let (mut tracked, mut written, mut next_win) = (0u64, 0u64, 0u64);
    while at < end {
        let mut arg = sys::PmScanArg {
            size: std::mem::size_of::<sys::PmScanArg>() as u64,
            flags: 0,
            start: at,
            end,
            walk_end: 0,
            vec: rv.as_mut_ptr() as u64,
            vec_len: rv.len() as u64,
            max_pages: 0,
            category_inverted: 0,
            category_mask: sys::PAGE_IS_WPALLOWED | sys::PAGE_IS_PRESENT,
            category_anyof_mask: 0,
            return_mask: sys::PAGE_IS_PRESENT | sys::PAGE_IS_WRITTEN,
        };
        use std::os::fd::AsRawFd;
        // SAFETY: PAGEMAP_SCAN reads `arg` and writes at most `vec_len` regions to `rv`,
        // which outlives the call; without PM_SCAN_WP_MATCHING it changes nothing.
        let n = unsafe { sys::ioctl(pm.as_raw_fd(), sys::PAGEMAP_SCAN, &mut arg as *mut sys::PmScanArg as usize) }.ok()?;
        for r in &rv[..n.min(rv.len())] {
            let len = r.end.saturating_sub(r.start);
            tracked += len;
            if r.categories & sys::PAGE_IS_WRITTEN != 0 && len > 0 {
                // The windows this region touches, each counted once (regions come in
                // address order).
                let (first, last) = ((r.start / WINDOW).max(next_win), (r.end - 1) / WINDOW);
                if last >= first {
                    written += (last - first + 1) * WINDOW;
                    next_win = last + 1;
                }
            }
        }
        let next = sys::pagemap_scan_next(&arg, &rv[..n.min(rv.len())]);
        if next <= at {
            break;
        }
        at = next;
    }
    Some((tracked, written))
}

fn code(inner: &Inner, status: std::process::ExitStatus) -> i32 {
    if inner.stopped.load(Ordering::SeqCst) {
        return EXIT_CHECKPOINTED;
    }
    match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        _ => 1,
    }
}

/// CPU time and memory use of a process.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ProcStats {
    /// User + system CPU time of all its threads.
    pub cpu_ms: f64,
    /// Resident memory now.
    pub rss_bytes: u64,
    /// Peak resident memory.
    pub peak_rss_bytes: u64,
}

impl ProcStats {
    /// Reads `/proc/PID/stat` and `/proc/PID/status` (zeros if the process is gone).
    pub fn of(pid: u32) -> ProcStats {
        let mut s = ProcStats::default();
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            if let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) {
                let f: Vec<&str> = rest.split_whitespace().collect();
                // Fields 14 and 15 (utime, stime) are at 11 and 12 after the state (field 3).
                let ticks: f64 = [11, 12].iter().filter_map(|&i| f.get(i)?.parse::<f64>().ok()).sum();
                let hz = rustix::param::clock_ticks_per_second() as f64;
                s.cpu_ms = ticks * 1000.0 / hz;
            }
        }
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            for line in status.lines() {
                let kb = |l: &str| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * 1024;
                if line.starts_with("VmRSS:") {
                    s.rss_bytes = kb(line);
                } else if line.starts_with("VmHWM:") {
                    s.peak_rss_bytes = kb(line);
                }
            }
        }
        s
    }
}

//! `limitless run`: the chain on one machine. This process plays the platform's part: it
//! starts each step as a fresh process (`limitless __step`, its own process group, like a
//! fresh container), kills the whole group with `SIGKILL` when the step's time limit ends
//! (no signal first, no grace), starts the next step when a step hands over, feeds the
//! program's input and forwards its output step after step, and ends with the program's
//! exit status.
//!
//! A step that dies without handing over or finishing (killed by the limit, crashed) is
//! run again from the last complete checkpoint, as a new attempt; after three failures in a
//! row the chain stops and can be resumed later with `limitless run --resume CHAIN`.

use super::input::Tape;
use super::report::{self, Progress};
use super::step::{read_result, Platform};
use super::*;
use crate::engine::spawn::FdMap;
use crate::engine::stdio;
use crate::store::Store;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How `run` runs a chain.
pub struct RunOptions {
    /// The store.
    pub store: Arc<dyn Store>,
    /// The store's URL, passed to the step processes.
    pub store_url: String,
    /// Each step's time limit.
    pub limit: Duration,
    /// The least time kept for a checkpoint.
    pub margin: Duration,
    /// Where to write the JSON report.
    pub report: Option<PathBuf>,
    /// Show a progress line (when stderr is a terminal).
    pub progress: bool,
    /// Keep the last image after the chain ends.
    pub keep_images: bool,
    /// Files every checkpoint carries (`--carry`).
    pub carry: crate::engine::carry::Carry,
    /// Wait up to this long for no connected TCP socket before each checkpoint.
    pub wait_idle: Duration,
}

/// Steps that die in a row before the chain gives up.
const MAX_FAILURES: u32 = 3;
/// The shortest limit a step can have.
pub const MIN_LIMIT: Duration = Duration::from_secs(1);

/// A message from a step process to this controller (one JSON object per line on fd 3).
#[derive(Serialize, Deserialize, Debug)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum LinkMsg {
    /// Start this step next.
    Invoke {
        /// The step.
        step: u32,
        /// Its attempt.
        attempt: u32,
    },
    /// The step plans to checkpoint at this time.
    Plan {
        /// Milliseconds since the epoch.
        at_unix_ms: u64,
    },
    /// A checkpoint failed (the step tries again until its limit).
    CheckpointFailed {
        /// Why.
        reason: String,
    },
}

/// The step side of the local platform: messages to the controller on fd 3.
pub struct LocalLink {
    out: std::sync::Mutex<File>,
}

impl LocalLink {
    /// Uses fd 3, which the controller opened for this step.
    pub fn from_fd3() -> Result<LocalLink> {
        // SAFETY: fd 3 is the control pipe the controller installed for this process; it is
        // owned by nothing else here.
        let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(3) };
        f.metadata().map_err(|_| anyhow!("__step is started by `limitless run`, which gives it a control pipe on fd 3"))?;
        Ok(LocalLink { out: std::sync::Mutex::new(f) })
    }

    fn send(&self, m: &LinkMsg) -> Result<()> {
        let mut line = serde_json::to_string(m)?;
        line.push('\n');
        self.out.lock().unwrap_or_else(|e| e.into_inner()).write_all(line.as_bytes())?;
        Ok(())
    }
}

/// In a step: sends this process's own messages (fd 2) to fd 4, which the controller opened
/// for them, and copies the program's stderr to the controller's fd 2 pipe instead, so
/// that the controller can tell the two apart (and print the program's stderr once).
pub fn messages_from_fd4() -> Result<()> {
    use std::os::fd::{AsFd, FromRawFd};
    // SAFETY: F_GETFD only asks whether fd 4 is open.
    if unsafe { libc::fcntl(4, libc::F_GETFD) } < 0 {
        bail!("__step is started by `limitless run`, which gives it a message pipe on fd 4");
    }
    // SAFETY: fd 4 is open (checked above): the message pipe the controller installed for
    // this process, owned by nothing else here.
    let messages = unsafe { OwnedFd::from_raw_fd(4) };
    let program_err = rustix::io::fcntl_dupfd_cloexec(std::io::stderr().as_fd(), 10)?;
    rustix::stdio::dup2_stderr(&messages)?;
    stdio::forward_stderr_to(program_err);
    Ok(())
}

impl Platform for LocalLink {
    fn invoke(&self, _chain: &str, step: u32, attempt: u32) -> Result<String> {
        // A full pipe only blocks; the controller reads it until this step ends.
        self.send(&LinkMsg::Invoke { step, attempt })?;
        Ok(format!("local-{step}.{attempt}"))
    }
    fn plan(&self, at: u64) {
        let _ = self.send(&LinkMsg::Plan { at_unix_ms: at });
    }
    fn checkpoint_failed(&self, reason: &str) {
        let _ = self.send(&LinkMsg::CheckpointFailed { reason: reason.to_string() });
    }
}

/// Starts a new chain running `argv`.
pub fn run_new(argv: &[OsString], opts: &RunOptions) -> Result<i32> {
    let argv: Vec<String> = argv
        .iter()
        .map(|a| a.to_str().map(str::to_owned).ok_or_else(|| anyhow!("argument {a:?} is not UTF-8, which chains cannot carry yet")))
        .collect::<Result<_>>()?;
    let cwd = std::env::current_dir()?.to_str().ok_or_else(|| anyhow!("the working directory is not UTF-8"))?.to_owned();
    let chain = new_chain_id();
    let spec = Spec {
        format: FORMAT,
        chain: chain.clone(),
        argv,
        cwd,
        limit_ms: opts.limit.as_millis() as u64,
        margin_ms: opts.margin.as_millis() as u64,
        created_unix_ms: now_unix_ms(),
        env: Vec::new(),
        carry: opts.carry.dirs.iter().map(|d| d.display().to_string()).collect(),
        carry_written: opts.carry.written,
        wait_idle_ms: opts.wait_idle.as_millis() as u64,
    };
    if !opts.store.put_if_absent(&keys::spec(&chain), serde_json::to_string(&spec)?.as_bytes())? {
        bail!("chain id {chain} is taken (try again)");
    }
    tracing::info!("chain {chain} in {}", opts.store.describe());
    drive(&chain, 0, 0, opts, false)
}

/// Continues chain `chain` from its last complete checkpoint.
pub fn resume(chain: &str, opts: &RunOptions) -> Result<i32> {
    let chain = if chain == "last" { latest_chain(&*opts.store)? } else { chain.to_string() };
    if !valid_chain_id(&chain) {
        bail!("`{chain}` is not a chain id");
    }
    if !opts.store.exists(&keys::spec(&chain))? {
        bail!("there is no chain {chain} in the store {}", opts.store.describe());
    }
    if let Some(r) = read_result(&*opts.store, &chain)? {
        eprintln!("limitless: chain {chain} already finished in step {} with status {}", r.step, r.exit_status);
        return Ok(r.exit_status);
    }
    let step = last_manifest(&*opts.store, &chain)?;
    let attempt = next_attempt(&*opts.store, &chain, step)?;
    drive(&chain, step, attempt, opts, true)
}

/// The most recently created chain in the store.
fn latest_chain(store: &dyn Store) -> Result<String> {
    let mut best: Option<(u64, String)> = None;
    for k in store.list("chains/")? {
        let id = k.trim_start_matches("chains/").to_string();
        if let Some(b) = store.get(&keys::spec(&id))? {
            if let Ok(s) = serde_json::from_slice::<Spec>(&b) {
                if best.as_ref().is_none_or(|(t, _)| s.created_unix_ms > *t) {
                    best = Some((s.created_unix_ms, id));
                }
            }
        }
    }
    best.map(|b| b.1).ok_or_else(|| anyhow!("the store {} has no chains", store.describe()))
}

/// The highest step with a manifest (0 if none: the chain starts over).
pub fn last_manifest(store: &dyn Store, chain: &str) -> Result<u32> {
    Ok(store
        .list(&format!("chains/{chain}/step-"))?
        .iter()
        .filter_map(|k| k.rsplit('/').next()?.strip_prefix("step-")?.strip_suffix(".manifest")?.parse().ok())
        .max()
        .unwrap_or(0))
}

/// One more than the highest attempt that claimed `step`.
pub fn next_attempt(store: &dyn Store, chain: &str, step: u32) -> Result<u32> {
    Ok(store
        .list(&format!("chains/{chain}/claim-{step}."))?
        .iter()
        .filter_map(|k| k.rsplit('.').next()?.parse::<u32>().ok())
        .max()
        .map_or(0, |a| a + 1))
}

struct StepProc {
    child: Child,
    out: std::thread::JoinHandle<()>,
    err: std::thread::JoinHandle<()>,
    msg: std::thread::JoinHandle<()>,
}

/// Which attempt of which step, and until when it may run.
struct Attempt<'a> {
    chain: &'a str,
    step: u32,
    attempt: u32,
    deadline: SystemTime,
}

fn spawn_step(
    at: &Attempt,
    opts: &RunOptions,
    tx: mpsc::Sender<LinkMsg>,
    progress: &Arc<Progress>,
    once: [output::StepOut; 2],
    input: (&Arc<Tape>, Option<u64>),
) -> Result<StepProc> {
    let (in_r, in_w) = stdio::pipe()?;
    let (out_r, out_w) = stdio::pipe()?;
    let (err_r, err_w) = stdio::pipe()?;
    let (ctl_r, ctl_w) = stdio::pipe()?;
    let (msg_r, msg_w) = stdio::pipe()?;
    let mut fds = FdMap::default();
    fds.add(in_r, 0);
    fds.add(out_w, 1);
    fds.add(err_w, 2);
    fds.add(ctl_w, 3);
    fds.add(msg_w, 4);
    let mut cmd = Command::new(std::env::current_exe().context("cannot find the limitless executable")?);
    let deadline_ms = at.deadline.duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    cmd.arg("__step")
        .args(["--store", &opts.store_url, "--chain", at.chain])
        .args(["--step", &at.step.to_string(), "--attempt", &at.attempt.to_string()])
        .args(["--deadline-unix-ms", &deadline_ms.to_string(), "--margin-ms", &opts.margin.as_millis().to_string()])
        .process_group(0);
    let child = fds.spawn(cmd).context("cannot start a step process")?;
    input.0.feed(input.1, in_w);
    let [stdout, stderr] = once;
    let out = forward(out_r, 1, progress.clone(), Some(stdout));
    let err = forward(err_r, 2, progress.clone(), Some(stderr));
    let msg = forward(msg_r, 2, progress.clone(), None);
    std::thread::spawn(move || {
        for line in BufReader::new(File::from(ctl_r)).lines() {
            let Ok(line) = line else { break };
            if let Ok(m) = serde_json::from_str::<LinkMsg>(&line) {
                let _ = tx.send(m);
            }
        }
    });
    Ok(StepProc { child, out, err, msg })
}

/// Copies a step's output to ours, clearing the progress line first; with `once`, only
/// what an attempt that died has not printed already.
fn forward(src: OwnedFd, dst: i32, progress: Arc<Progress>, mut once: Option<output::StepOut>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut f = File::from(src);
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = match f.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let (new, diverged) = match once.as_mut() {
                Some(o) => o.take(&buf[..n]),
                None => (std::borrow::Cow::Borrowed(&buf[..n]), false),
            };
            if diverged {
                let which = if dst == 1 { "stdout" } else { "stderr" };
                let msg = format!("limitless: the program, run again from its last checkpoint, printed other output on {which} than before; printing it from the line where it differs\n");
                let _ = progress.write_through(2, msg.as_bytes());
            }
            if !new.is_empty() {
                if let Err(e) = progress.write_through(dst, &new) {
                    if e.raw_os_error() == Some(libc::EPIPE) {
                        // Whoever read our output has gone (`| head`): the program would get
                        // SIGPIPE now, so the chain stops as if it had.
                        INTERRUPTED.store(libc::SIGPIPE, Ordering::SeqCst);
                        return;
                    }
                }
            }
        }
    })
}

/// Where in the program's stdout and stderr, and in its input, step `step` starts (from
/// its manifest; `None` if the manifest is of an earlier version or unreadable).
fn starts(store: &dyn Store, chain: &str, step: u32) -> ([Option<u64>; 2], Option<u64>) {
    if step == 0 {
        return ([Some(0); 2], Some(0));
    }
    let m: Option<Manifest> = store.get(&keys::manifest(chain, step)).ok().flatten().and_then(|b| serde_json::from_slice(&b).ok());
    m.map_or(([None; 2], None), |m| ([m.out_bytes, m.err_bytes], m.in_bytes))
}

/// The program's output streams, as named in store keys.
const STREAMS: [&str; 2] = ["out", "err"];

/// The signal that interrupted `run` (SIGINT, SIGTERM or SIGHUP; SIGPIPE when our output
/// was closed), or 0.
static INTERRUPTED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_interrupt(sig: libc::c_int) {
    INTERRUPTED.store(sig, Ordering::SeqCst);
}

/// Turns Ctrl-C, SIGTERM and SIGHUP into an orderly stop: the step is killed (as its limit
/// would), and the chain is kept for `--resume`. A signal this process was started with
/// ignored (a background job of a script) stays ignored.
fn catch_interrupts() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: sigaction with valid pointers; the handler only stores to an atomic,
        // which is async-signal-safe. SA_RESTART keeps the forwarding threads' reads from
        // failing with EINTR.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 || old.sa_sigaction == libc::SIG_IGN {
                continue;
            }
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_interrupt as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Runs steps from `step` (attempt `attempt`) until the chain ends.
fn drive(chain: &str, mut step: u32, mut attempt: u32, opts: &RunOptions, resumed: bool) -> Result<i32> {
    catch_interrupts();
    let t0 = Instant::now();
    let progress = Arc::new(Progress::new(opts.progress));
    let duplicate = std::env::var_os("LIMITLESS_TEST_DUPLICATE_STEPS").is_some();
    let mut failures = 0;
    let mut killed_in_a_row = 0;
    // Of the failures in a row, how many were kills by the limit.
    let mut killed_of_failures = 0;
    // How many steps in a row reached their limit after every checkpoint they tried had
    // failed, and the last reason.
    let mut refused_in_a_row = 0;
    let mut refusal = String::new();
    let mut steps_run = 0u32;
    // What a controller interrupted before us printed is not printed again.
    let printed = STREAMS.map(|s| {
        let saved = if resumed { opts.store.get(&keys::printed(chain, s)).ok().flatten() } else { None };
        saved.and_then(|b| output::Ledger::load(&b)).unwrap_or_else(output::Ledger::new)
    });
    let tape = Tape::new(super::input::our_stdin().context("cannot take stdin for the program")?);
    loop {
        let deadline = SystemTime::now() + opts.limit;
        let (tx, rx) = mpsc::channel();
        let (from, from_in) = starts(&*opts.store, chain, step);
        if let Some(i) = from_in {
            // Every later attempt starts at this checkpoint or a later one.
            tape.keep_from(i);
            if !tape.can_give(i) {
                bail!(
                    "step {step} cannot run again: the program's input since its checkpoint could not be kept (see above); \
                     resume the chain with the same input on stdin: `limitless run --store {} --resume {chain} < INPUT`",
                    opts.store.describe()
                );
            }
        }
        let at = Attempt { chain, step, attempt, deadline };
        let once = || [printed[0].stream(from[0]), printed[1].stream(from[1])];
        let mut procs = vec![spawn_step(&at, opts, tx.clone(), &progress, once(), (&tape, from_in))?];
        if duplicate {
            // A retried invocation of the same step, as a platform may deliver: it must see
            // the claim and run nothing.
            std::thread::sleep(Duration::from_millis(20));
            procs.push(spawn_step(&at, opts, tx.clone(), &progress, once(), (&tape, from_in))?);
        }
        drop(tx);
        steps_run += 1;
        progress.set_step(step, t0);
        let mut next = None;
        let mut killed = false;
        let mut refused: Option<String> = None;
        for p in procs.iter_mut() {
            loop {
                while let Ok(m) = rx.try_recv() {
                    match m {
                        LinkMsg::Invoke { step: s, attempt: a } => next = Some((s, a)),
                        LinkMsg::Plan { at_unix_ms } => progress.set_plan(at_unix_ms),
                        LinkMsg::CheckpointFailed { reason } => refused = Some(reason),
                    }
                }
                if p.child.try_wait()?.is_some() {
                    break;
                }
                let interrupted = INTERRUPTED.load(Ordering::SeqCst) != 0;
                if SystemTime::now() >= deadline || interrupted {
                    // The platform's time limit: the whole step, without warning. (Or
                    // Ctrl-C: the step is in a process group of its own, so the terminal
                    // signals only us.)
                    // SAFETY: signals the step's process group (its pid), which we created.
                    unsafe { libc::kill(-(p.child.id() as i32), libc::SIGKILL) };
                    let _ = p.child.wait();
                    killed = !interrupted;
                    break;
                }
                progress.draw();
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        for p in procs {
            let _ = p.out.join();
            let _ = p.err.join();
            let _ = p.msg.join();
        }
        while let Ok(m) = rx.try_recv() {
            match m {
                LinkMsg::Invoke { step: s, attempt: a } => next = Some((s, a)),
                LinkMsg::CheckpointFailed { reason } => refused = Some(reason),
                LinkMsg::Plan { .. } => {}
            }
        }
        progress.clear();
        if let Some(r) = read_result(&*opts.store, chain)? {
            return finish(chain, r, t0, steps_run, opts);
        }
        let sig = INTERRUPTED.load(Ordering::SeqCst);
        if sig == libc::SIGPIPE {
            // Quietly, as a program killed by SIGPIPE ends.
            return Ok(128 + sig);
        }
        if sig != 0 {
            for (s, ledger) in STREAMS.iter().zip(&printed) {
                if let Err(e) = opts.store.put(&keys::printed(chain, s), &ledger.save()) {
                    eprintln!("limitless: cannot record what was printed ({e:#}); a resumed chain prints again the output since its last checkpoint");
                }
            }
            eprintln!(
                "limitless: interrupted ({}); the chain is kept: resume it with `limitless run --store {} --resume {chain}`",
                match sig {
                    libc::SIGINT => "SIGINT",
                    libc::SIGTERM => "SIGTERM",
                    _ => "SIGHUP",
                },
                opts.store.describe()
            );
            return Ok(128 + sig);
        }
        if let Some((s, a)) = next {
            step = s;
            attempt = a;
            failures = 0;
            killed_of_failures = 0;
            refused_in_a_row = 0;
            if let Some((msg, least)) = report::too_short(&*opts.store, chain, opts.limit)? {
                bail!("{msg}; resume it with `limitless run --limit {least} --store {} --resume {chain}`", opts.store.describe());
            }
            continue;
        }
        failures += 1;
        killed_in_a_row = if killed { killed_in_a_row + 1 } else { 0 };
        killed_of_failures += killed as u32;
        // A step that had tried to checkpoint and did not hand over: every checkpoint it
        // tried had failed (it was killed at its limit, or gave up just before it).
        refused_in_a_row = if refused.is_some() { refused_in_a_row + 1 } else { 0 };
        if let Some(r) = &refused {
            refusal = r.clone();
        }
        let last = last_manifest(&*opts.store, chain)?;
        if failures >= MAX_FAILURES {
            let resume = format!("the chain is kept: resume it with `limitless run --store {} --resume {chain}`", opts.store.describe());
            if refused_in_a_row >= MAX_FAILURES {
                bail!("step {step} reached its limit {failures} times, each time after every checkpoint it tried had failed ({refusal}); {resume}");
            }
            if killed_in_a_row >= MAX_FAILURES {
                bail!(
                    "step {step} was killed by the limit {failures} times before it could hand over: {}; {resume}",
                    report::why_killed(&*opts.store, chain, opts.limit)?
                );
            }
            if killed_of_failures > 0 {
                bail!(
                    "step {step} failed {failures} times in a row, killed by the limit {killed_of_failures} of them (see the messages above): {}; {resume}",
                    report::why_killed(&*opts.store, chain, opts.limit)?
                );
            }
            bail!("step {step} of chain {chain} failed {failures} times in a row (see the messages above); {resume}");
        }
        let died = step;
        step = last;
        attempt = next_attempt(&*opts.store, chain, step)?;
        let why = match (&refused, killed) {
            (Some(_), _) => "reached its limit after every checkpoint it tried had failed",
            (None, true) => "was killed by the limit before it could checkpoint",
            (None, false) => "ended without a checkpoint or a result",
        };
        eprintln!("limitless: step {died} {why}; running again from the last checkpoint (step {step})");
    }
}

fn finish(chain: &str, r: ResultRecord, t0: Instant, _steps_run: u32, opts: &RunOptions) -> Result<i32> {
    let rep = report::collect(&*opts.store, chain, &r, t0.elapsed(), opts.limit)?;
    if let Some(p) = &opts.report {
        std::fs::write(p, serde_json::to_string_pretty(&rep)?).with_context(|| format!("cannot write the report {}", p.display()))?;
    }
    if !opts.keep_images {
        for k in opts.store.list(&format!("images/{chain}/"))? {
            let _ = opts.store.delete(&k);
        }
    }
    eprintln!("{}", report::summary(&rep));
    Ok(r.exit_status)
}

/// Whether `fd` is a terminal.
pub fn is_terminal(fd: &impl AsRawFd) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd.as_raw_fd()) == 1 }
}

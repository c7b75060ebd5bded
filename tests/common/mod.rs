//! Test harness for the engine's end-to-end tests: compiles the C programs in
//! `tests/programs/` with gcc, runs `limitless launch`/`dump`/`restore` as root and as an
//! unprivileged user (uid 65534 through `setpriv`, when the tests run as root), and
//! collects output.
#![allow(dead_code)]

pub mod s3;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

pub const EXIT_CHECKPOINTED: i32 = 75;

/// A world-readable directory for this test process's binaries (the checkout may live
/// where uid 65534 cannot reach, such as /root).
fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join("limitless-tests").join(format!("bin-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("bin dir");
        let _ = std::fs::set_permissions(d.parent().expect("parent"), std::fs::Permissions::from_mode(0o777));
        let _ = std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755));
        d
    })
}

/// The `limitless` binary under test, copied where every test user can run it.
pub fn limitless() -> &'static str {
    static BIN: OnceLock<String> = OnceLock::new();
    BIN.get_or_init(|| {
        let dst = bin_dir().join("limitless");
        std::fs::copy(env!("CARGO_BIN_EXE_limitless"), &dst).expect("copy limitless");
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        dst.to_string_lossy().into_owned()
    })
}

/// Who runs the commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum User {
    Root,
    Nobody,
}

pub fn is_root() -> bool {
    // SAFETY: getuid cannot fail.
    unsafe { libc::getuid() == 0 }
}

/// The users every scenario runs as: root and uid 65534 when we are root; only the current
/// (unprivileged) user otherwise, which is said loudly.
pub fn users() -> Vec<User> {
    static NOTE: Once = Once::new();
    if is_root() {
        vec![User::Nobody, User::Root]
    } else {
        NOTE.call_once(|| eprintln!("NOTE: tests are not running as root: the root variant of each engine test is NOT run; run them as root to cover both (CI does)"));
        vec![User::Nobody]
    }
}

/// A command for `user` (wrapped in setpriv for uid 65534 when we are root).
pub fn command(user: User, prog: &str) -> Command {
    if user == User::Nobody && is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "--"]).arg(prog);
        // A home the unprivileged user cannot write: exercises the cache-directory fallback.
        c.env("HOME", "/nonexistent");
        c.env_remove("XDG_CACHE_HOME");
        c.env_remove("XDG_RUNTIME_DIR");
        c
    } else {
        Command::new(prog)
    }
}

/// A scratch directory for one test and user, writable by both.
pub fn workdir(name: &str, user: User) -> PathBuf {
    let d = std::env::temp_dir().join("limitless-tests").join(format!("{name}-{user:?}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create workdir");
    for p in [d.parent().expect("parent"), d.as_path()] {
        let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777));
    }
    d
}

/// Compiles `tests/programs/<name>.c` once per test process; returns the binary (world
/// readable and executable).
pub fn program(name: &str) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/programs").join(format!("{name}.c"));
    let out = bin_dir().join(name);
    if !out.exists() {
        let st = Command::new("gcc")
            .args(["-O1", "-g", "-pthread", "-Wall", "-o"])
            .arg(&out)
            .arg(&src)
            .arg("-lm")
            .status()
            .expect("gcc is needed to build the test programs");
        assert!(st.success(), "compiling {} failed", src.display());
    }
    let _ = std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o755));
    out
}

/// Output collected from a pipe by a thread.
#[derive(Clone, Default)]
pub struct Collected(Arc<(Mutex<Vec<u8>>, Condvar)>);

impl Collected {
    fn start(mut r: impl Read + Send + 'static) -> Collected {
        let c = Collected::default();
        let c2 = c.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                match r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        c2.0 .0.lock().unwrap().extend_from_slice(&buf[..n]);
                        c2.0 .1.notify_all();
                    }
                }
            }
        });
        c
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0 .0.lock().unwrap()).into_owned()
    }

    /// Waits until the output contains `needle`.
    pub fn wait_for(&self, needle: &str, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        let mut g = self.0 .0.lock().unwrap();
        loop {
            if String::from_utf8_lossy(&g).contains(needle) {
                return true;
            }
            let now = Instant::now();
            if now >= end {
                return false;
            }
            g = self.0 .1.wait_timeout(g, end - now).unwrap().0;
        }
    }
}

/// A running `limitless launch` or `restore`.
pub struct Running {
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    pub out: Collected,
    pub err: Collected,
    pub socket: PathBuf,
}

impl Running {
    fn spawn(mut cmd: Command, socket: PathBuf) -> Running {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn limitless");
        let out = Collected::start(child.stdout.take().expect("stdout"));
        let err = Collected::start(child.stderr.take().expect("stderr"));
        let stdin = child.stdin.take();
        Running { child, stdin, out, err, socket }
    }

    /// Writes a line to the program's stdin.
    pub fn send(&mut self, line: &str) {
        let s = self.stdin.as_mut().expect("stdin open");
        s.write_all(line.as_bytes()).expect("write stdin");
        s.flush().expect("flush stdin");
    }

    /// Closes the program's stdin.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits for a line of output, panicking with everything seen so far if it does not come.
    pub fn expect_out(&self, needle: &str) {
        assert!(
            self.out.wait_for(needle, Duration::from_secs(30)),
            "no `{needle}` in stdout; stdout:\n{}\nstderr:\n{}",
            self.out.text(),
            self.err.text()
        );
    }

    /// Waits (at most 30 s) until its control socket exists: for a restored program that
    /// prints nothing before it is dumped again.
    pub fn wait_socket(&self) {
        let t = Instant::now();
        while !self.socket.exists() {
            assert!(t.elapsed() < Duration::from_secs(30), "no socket {}; stderr: {}", self.socket.display(), self.err.text());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the exit (at most 60 s); returns the status, stdout and stderr.
    pub fn finish(mut self) -> (ExitStatus, String, String) {
        self.stdin = None;
        let end = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                panic!("limitless did not exit within 60 s; stdout:\n{}\nstderr:\n{}", self.out.text(), self.err.text());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        // Let the collector threads see EOF.
        std::thread::sleep(Duration::from_millis(50));
        (status, self.out.text(), self.err.text())
    }
}

/// `limitless` as `user`, run through `wrapper` (a program that runs its arguments) if given.
fn limitless_via(user: User, wrapper: Option<&Path>) -> Command {
    match wrapper {
        Some(w) => {
            let mut c = command(user, w.to_str().expect("a UTF-8 path"));
            c.arg(limitless());
            c
        }
        None => command(user, limitless()),
    }
}

/// `limitless launch --socket DIR/NAME.sock -- PROG ARGS` as `user`.
pub fn launch(user: User, dir: &Path, prog: &Path, args: &[&str]) -> Running {
    launch_via(user, None, dir, prog, args)
}

/// [`launch`], through `wrapper` if given.
pub fn launch_via(user: User, wrapper: Option<&Path>, dir: &Path, prog: &Path, args: &[&str]) -> Running {
    let socket = dir.join("launch.sock");
    let mut c = limitless_via(user, wrapper);
    c.arg("launch").arg("--socket").arg(&socket).arg("--").arg(prog).args(args).current_dir(dir);
    Running::spawn(c, socket)
}

/// `limitless restore --socket DIR/restore-N.sock IMAGE` as `user`.
pub fn restore(user: User, dir: &Path, image: &Path) -> Running {
    restore_via(user, None, dir, image)
}

/// [`restore`], through `wrapper` if given.
pub fn restore_via(user: User, wrapper: Option<&Path>, dir: &Path, image: &Path) -> Running {
    restore_with(user, wrapper, dir, image, &[])
}

/// [`restore_via`] with more arguments before the image.
pub fn restore_with(user: User, wrapper: Option<&Path>, dir: &Path, image: &Path, args: &[&str]) -> Running {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let socket = dir.join(format!("restore-{n}.sock"));
    let mut c = limitless_via(user, wrapper);
    c.arg("restore").arg("--socket").arg(&socket).args(args).arg(image).current_dir(dir);
    Running::spawn(c, socket)
}

/// `limitless dump`; returns (success, stderr).
pub fn dump(user: User, socket: &Path, image: &Path, leave_running: bool) -> (bool, String) {
    dump_with(user, socket, image, if leave_running { &["--leave-running"] } else { &[] })
}

/// `limitless dump` with more arguments; returns (success, stderr).
pub fn dump_with(user: User, socket: &Path, image: &Path, args: &[&str]) -> (bool, String) {
    let o = command(user, limitless())
        .arg("dump")
        .arg("--socket")
        .arg(socket)
        .arg("--output")
        .arg(image)
        .args(args)
        .output()
        .expect("run limitless dump");
    (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// `dump` that must succeed.
pub fn dump_ok(user: User, r: &Running, image: &Path, leave_running: bool) {
    let (ok, err) = dump(user, &r.socket, image, leave_running);
    assert!(ok, "dump failed: {err}\nprogram stdout so far:\n{}\nstderr:\n{}", r.out.text(), r.err.text());
}

/// Runs `prog args` directly (no engine) with `input` on stdin; returns its stdout.
pub fn reference(prog: &Path, args: &[&str], input: &str) -> String {
    let mut c =
        Command::new(prog).args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("run reference");
    c.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("feed reference");
    let o = c.wait_with_output().expect("reference output");
    assert!(o.status.success(), "reference run of {} failed: {}", prog.display(), String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Lines of `s` (for readable assertion failures).
pub fn lines(s: &str) -> Vec<&str> {
    s.lines().collect()
}

/// Reads a file's lines into a vector.
pub fn read_lines(p: &Path) -> Vec<String> {
    BufReader::new(std::fs::File::open(p).expect("open")).lines().map(|l| l.expect("line")).collect()
}

pub fn each_user(name: &str, f: impl Fn(User, &Path)) {
    for u in users() {
        let d = workdir(name, u);
        eprintln!("== {name} as {u:?} in {}", d.display());
        f(u, &d);
    }
}

/// launch -> READY -> dump (stop) -> restore with `input` -> compare with a plain run.
pub fn stop_and_restore(name: &str, args: &[&str], input: &str) {
    stop_and_restore_prog(name, &program(name), args, input, "READY");
}

/// Dumps the program of `r` to `image`, a delta on top of `parent` if given, leaving it
/// running or not; asserts it worked and returns what `dump` said.
pub fn dump_delta(user: User, r: &Running, image: &Path, parent: Option<&Path>, leave_running: bool) -> String {
    let mut a: Vec<&str> = if leave_running { vec!["--leave-running"] } else { vec![] };
    if let Some(p) = parent {
        a.extend(["--parent", p.to_str().expect("a UTF-8 path")]);
    }
    let (ok, err) = dump_with(user, &r.socket, image, &a);
    assert!(ok, "dump to {} failed: {err}\nprogram stderr: {}", image.display(), r.err.text());
    err
}

/// Launches `prog args` as `user`, waits for `marker`, dumps it to `image` (with
/// `dump_args`) and stops it; returns what it printed before it stopped.
pub fn launch_and_stop(user: User, dir: &Path, prog: &Path, args: &[&str], marker: &str, image: &Path, dump_args: &[&str]) -> String {
    let r = launch(user, dir, prog, args);
    r.expect_out(marker);
    let (ok, err) = dump_with(user, &r.socket, image, dump_args);
    assert!(ok, "dump failed: {err}\nprogram stdout so far:\n{}\nstderr:\n{}", r.out.text(), r.err.text());
    let (st, out, err) = r.finish();
    assert_eq!(st.code(), Some(EXIT_CHECKPOINTED), "launch should exit 75 after the checkpoint; stderr: {err}");
    out
}

/// Dumps the program of `r` (stopping it) and restores it from that image, `steps` times,
/// calling `before(&r, step)` before each dump; returns the last restored program and what
/// the stopped ones printed.
pub fn stop_restore_steps(user: User, dir: &Path, mut r: Running, steps: usize, before: impl Fn(&Running, usize)) -> (Running, String) {
    let mut out = String::new();
    for step in 0..steps {
        before(&r, step);
        let img = dir.join(format!("image-{step}"));
        dump_ok(user, &r, &img, false);
        let (st, o, e) = r.finish();
        assert_eq!(st.code(), Some(EXIT_CHECKPOINTED), "step {step}: {e}");
        out += &o;
        r = restore(user, dir, &img);
    }
    (r, out)
}

/// As [`stop_and_restore`] for any program, dumping once `marker` appears in its output.
pub fn stop_and_restore_prog(name: &str, prog: &Path, args: &[&str], input: &str, marker: &str) {
    let prog = prog.to_path_buf();
    let refdir = workdir(&format!("{name}-ref"), User::Root);
    let want = reference_in(&prog, args, input, &refdir);
    each_user(name, |u, d| {
        let img = d.join("image");
        let out1 = launch_and_stop(u, d, &prog, args, marker, &img, &[]);
        let mut r2 = restore(u, d, &img);
        if !input.is_empty() {
            r2.send(input);
        }
        let (st2, out2, err2) = r2.finish();
        assert_eq!(st2.code(), Some(0), "restored program failed; stderr: {err2}");
        assert_eq!(lines(&(out1 + &out2)), lines(&want), "output differs from an uninterrupted run");
    });
}

pub fn reference_in(prog: &Path, args: &[&str], input: &str, dir: &Path) -> String {
    let o = std::process::Command::new(prog)
        .args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().expect("stdin").write_all(input.as_bytes())?;
            c.wait_with_output()
        })
        .expect("reference run");
    assert!(o.status.success(), "reference run failed");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

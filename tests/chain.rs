//! End-to-end tests of `limitless run`: workloads through chains of 3-10 steps, the race of
//! a program ending around a checkpoint, kills at each phase of a step, duplicate
//! invocations, `--resume`, and bad input.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The workloads in examples/, built once.
fn examples() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
            let dst = std::env::temp_dir().join("limitless-tests").join(format!("examples-{}", std::process::id()));
            std::fs::create_dir_all(&dst).unwrap();
            let st = Command::new("make").arg("-s").arg("-C").arg(&src).status().expect("make is needed to build examples/");
            assert!(st.success(), "building examples failed");
            for f in ["factors", "matrix", "count"] {
                std::fs::copy(src.join("bin").join(f), dst.join(f)).unwrap();
            }
            for f in ["factors.py", "matrix.py"] {
                std::fs::copy(src.join(f), dst.join(f)).unwrap();
            }
            let _ = Command::new("chmod").arg("-R").arg("a+rX").arg(&dst).status();
            dst
        })
        .clone()
}

struct ChainRun {
    code: Option<i32>,
    out: String,
    err: String,
    report: Option<serde_json::Value>,
}

/// `limitless run --limit LIMIT --store DIR/store --report DIR/report.json -- ARGS` as `user`.
fn run_chain(user: User, dir: &Path, limit: &str, args: &[&str], env: &[(&str, &str)]) -> ChainRun {
    run_chain_fed(user, dir, limit, args, env, Input::Null)
}

/// What `run`'s stdin is.
enum Input<'a> {
    /// /dev/null.
    Null,
    /// A pipe these bytes are written to.
    Pipe(&'a [u8]),
    /// This file.
    File(&'a Path),
}

/// [`run_chain`] with `input` as its stdin.
fn run_chain_fed(user: User, dir: &Path, limit: &str, args: &[&str], env: &[(&str, &str)], input: Input) -> ChainRun {
    let report = dir.join("report.json");
    let _ = std::fs::remove_file(&report);
    let mut c = command(user, limitless());
    c.arg("run")
        .arg("--limit")
        .arg(limit)
        .arg("--store")
        .arg(dir.join("store"))
        .arg("--report")
        .arg(&report)
        .arg("--")
        .args(args)
        .current_dir(dir);
    for (k, v) in env {
        c.env(k, v);
    }
    let o = match input {
        Input::Null => c.stdin(Stdio::null()).output().expect("limitless run"),
        Input::File(f) => c.stdin(std::fs::File::open(f).expect("open the input")).output().expect("limitless run"),
        Input::Pipe(input) => {
            let mut child = c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("limitless run");
            let mut w = child.stdin.take().expect("stdin");
            let data = input.to_vec();
            // A chain may end before it has read all of its input.
            let feeder = std::thread::spawn(move || {
                let _ = w.write_all(&data);
            });
            let o = child.wait_with_output().expect("limitless run");
            feeder.join().expect("feeder");
            o
        }
    };
    let report = std::fs::read(&report).ok().and_then(|b| serde_json::from_slice(&b).ok());
    ChainRun {
        code: o.status.code(),
        out: String::from_utf8_lossy(&o.stdout).into_owned(),
        err: String::from_utf8_lossy(&o.stderr).into_owned(),
        report,
    }
}

fn steps(r: &ChainRun) -> u64 {
    r.report.as_ref().and_then(|v| v["totals"]["steps"].as_u64()).unwrap_or(0)
}

fn plain(prog: &str, args: &[&str]) -> String {
    let o = Command::new(prog).args(args).stdin(Stdio::null()).output().expect("plain run");
    assert!(o.status.success());
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn check_chain(name: &str, limit: &str, args: &[&str], want: &str) {
    for u in users() {
        let d = workdir(name, u);
        let r = run_chain(u, &d, limit, args, &[]);
        assert_eq!(r.code, Some(0), "{name} as {u:?}: {}", r.err);
        assert_eq!(r.out, want, "{name} as {u:?}: output differs from an uninterrupted run");
        let n = steps(&r);
        // At least 3 steps; the upper bound only catches a runaway chain (a loaded machine
        // runs the program slower, so it takes more steps).
        assert!((3..=24).contains(&n), "{name} as {u:?}: {n} steps; stderr: {}", r.err);
        let last = r.err.lines().last().unwrap_or("");
        assert!(
            last.starts_with("limitless: ")
                && last.contains(" steps, ")
                && last.contains("checkpointing")
                && last.contains("largest image"),
            "summary line: {last}"
        );
        let rep = r.report.as_ref().expect("report");
        for s in rep["steps"].as_array().expect("steps") {
            for k in ["wall_ms", "cpu_ms", "peak_rss_bytes", "run_ms"] {
                assert!(s[k].is_number(), "report step lacks {k}: {s}");
            }
            if s["outcome"] == "checkpointed" {
                for k in ["checkpoint_ms", "frozen_ms", "image_bytes"] {
                    assert!(s[k].is_number(), "report step lacks {k}: {s}");
                }
            }
        }
        // Images are cleaned up when the chain ends.
        let imgs = d.join("store/images");
        let left = std::fs::read_dir(&imgs)
            .map(|rd| rd.flatten().flat_map(|e| std::fs::read_dir(e.path()).into_iter().flatten()).count())
            .unwrap_or(0);
        assert_eq!(left, 0, "images left in the store");
    }
}

#[test]
fn factors_in_c_through_a_chain() {
    let ex = examples();
    let f = ex.join("factors");
    let args = [f.to_str().unwrap(), "1200000000000000000"];
    check_chain("factors-c", "1s", &args, &plain(args[0], &args[1..]));
}

#[test]
fn matrix_in_c_through_a_chain() {
    let ex = examples();
    let m = ex.join("matrix");
    let args = [m.to_str().unwrap(), "1400"];
    check_chain("matrix-c", "1s", &args, &plain(args[0], &args[1..]));
}

#[test]
fn factors_in_python_through_a_chain() {
    let ex = examples();
    let f = ex.join("factors.py");
    // About 3.3 s plain on the 2-vCPU VM of docs/benchmarks.md (2688834647444046, 1.9 s,
    // sometimes finished in two steps of the 1 s limit).
    let args = ["python3", f.to_str().unwrap(), "9626367123889098"];
    check_chain("factors-py", "1s", &args, &plain(args[0], &args[1..]));
}

#[test]
fn matrix_in_python_through_a_chain() {
    let ex = examples();
    let m = ex.join("matrix.py");
    // About 2.7 s plain there (330: 1.6 s, sometimes two steps).
    let args = ["python3", m.to_str().unwrap(), "420"];
    check_chain("matrix-py", "1s", &args, &plain(args[0], &args[1..]));
}

/// (path, body) of each POST a receiver got.
type Posts = Arc<Mutex<Vec<(String, String)>>>;

/// A tiny HTTP receiver: records (path, body) of each POST.
fn receiver() -> (String, Posts) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://127.0.0.1:{}", l.local_addr().unwrap().port());
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let mut r = BufReader::new(c.try_clone().unwrap());
            let mut line = String::new();
            if r.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let mut len = 0;
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; len];
            let _ = r.read_exact(&mut body);
            g.lock().unwrap().push((path, String::from_utf8_lossy(&body).into_owned()));
            let mut c = c;
            let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        }
    });
    (url, got)
}

#[test]
fn count_posts_through_a_chain_exactly_once() {
    let ex = examples();
    let count = ex.join("count");
    for u in users() {
        let d = workdir("count", u);
        let (url, got) = receiver();
        let r = run_chain(u, &d, "1s", &[count.to_str().unwrap(), &url, "30", "120"], &[]);
        assert_eq!(r.code, Some(0), "{}", r.err);
        let want: String = (1..=30).map(|i| format!("count {i}\n")).collect::<String>() + "{\"result\": 30}\n";
        assert_eq!(r.out, want);
        let posts = got.lock().unwrap().clone();
        let expect = vec![
            ("/count".to_string(), "{\"count\": 10}".to_string()),
            ("/count".to_string(), "{\"count\": 20}".to_string()),
            ("/count".to_string(), "{\"count\": 30}".to_string()),
            ("/result".to_string(), "{\"result\": 30}".to_string()),
        ];
        assert_eq!(posts, expect, "each POST exactly once, in order");
        assert!((3..=12).contains(&steps(&r)), "{} steps", steps(&r));
    }
}

/// Steps that claimed to run in a chain's store, by step number.
fn claimed_steps(store: &Path) -> Vec<u32> {
    let mut v = Vec::new();
    let Ok(chains) = std::fs::read_dir(store.join("chains")) else { return v };
    for chain in chains.flatten() {
        let Ok(files) = std::fs::read_dir(chain.path()) else { continue };
        for f in files.flatten() {
            let n = f.file_name().to_string_lossy().into_owned();
            if let Some(rest) = n.strip_prefix("claim-") {
                v.push(rest.split('.').next().unwrap().parse().unwrap());
            }
        }
    }
    v.sort();
    v
}

fn result_record(store: &Path) -> serde_json::Value {
    let chain = std::fs::read_dir(store.join("chains")).unwrap().flatten().next().unwrap().path();
    serde_json::from_slice(&std::fs::read(chain.join("result")).expect("result")).unwrap()
}

#[test]
fn program_ending_around_the_checkpoint_gives_one_result_and_no_later_step() {
    let prog = program("endsat");
    let user = users()[0];
    let runs: u32 = std::env::var("LIMITLESS_RACE_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let (mut one, mut two) = (0, 0);
    let next = Arc::new(Mutex::new(0u32));
    let counts = Arc::new(Mutex::new((0u32, 0u32)));
    let threads: Vec<_> = (0..3)
        .map(|_| {
            let (next, counts, prog) = (next.clone(), counts.clone(), prog.clone());
            std::thread::spawn(move || loop {
                let i = {
                    let mut n = next.lock().unwrap();
                    if *n >= runs {
                        return;
                    }
                    *n += 1;
                    *n
                };
                let d = workdir(&format!("race-{i}"), user);
                // Ends between 650 and 850 ms after it starts; the first checkpoint is
                // planned about 750 ms into the step.
                let at = 650 + (i * 37 % 200);
                let r = run_chain(user, &d, "1s", &[prog.to_str().unwrap(), &at.to_string()], &[]);
                assert_eq!(r.code, Some(0), "run {i}: {}", r.err);
                // A step the limit killed (a loaded machine) runs again from the last
                // checkpoint and repeats what it printed since; the controller says so.
                let reruns = r.err.matches("running again from the last checkpoint").count();
                assert_eq!(r.out, "done\n".repeat(1 + reruns), "run {i}: the program's output once per run; stderr: {}", r.err);
                if reruns > 0 {
                    eprintln!("race run {i}: a step was killed by the limit and ran again");
                }
                let res = result_record(&d.join("store"));
                let end_step = res["step"].as_u64().unwrap() as u32;
                let claims = claimed_steps(&d.join("store"));
                assert!(
                    claims.iter().all(|&s| s <= end_step),
                    "run {i}: a step after the end ran: claims {claims:?}, result in step {end_step}"
                );
                assert_eq!(claims.iter().filter(|&&s| s == end_step).count(), 1, "run {i}: {claims:?}");
                let mut c = counts.lock().unwrap();
                if end_step == 0 {
                    c.0 += 1;
                } else {
                    c.1 += 1;
                }
                let _ = std::fs::remove_dir_all(&d);
            })
        })
        .collect();
    for t in threads {
        t.join().expect("race thread");
    }
    let c = counts.lock().unwrap();
    one += c.0;
    two += c.1;
    eprintln!("race: {runs} runs: {one} ended in the first step, {two} after a checkpoint; always exactly one result");
    assert_eq!(one + two, runs);
}

#[test]
fn kills_at_every_phase_still_end_with_the_right_result() {
    let prog = program("ticker");
    let args = [prog.to_str().unwrap(), "250", "both"];
    let want = reference(&prog, &args[1..], "");
    let want_err: String = want.lines().filter(|l| l.starts_with("tick ")).map(|l| l.replace("tick", "tock") + "\n").collect();
    let final_line = want.lines().last().unwrap().to_string();
    let user = users()[0];
    for phase in ["step.running", "checkpoint.frozen", "checkpoint.writing", "store.image", "store.manifest", "step.handover"] {
        let d = workdir(&format!("kill-{phase}"), user);
        let fp = format!("{phase}:1:0");
        let r = run_chain(user, &d, "1s", &args, &[("LIMITLESS_FAILPOINT", &fp)]);
        assert_eq!(r.code, Some(0), "killed at {phase}: {}", r.err);
        assert_eq!(r.out.lines().last(), Some(final_line.as_str()), "killed at {phase}: {}", r.out);
        // Exactly the output of an uninterrupted run: what the killed step printed after
        // its last checkpoint is not printed again when it runs again. The same for the
        // program's stderr, among Limitless's own messages there.
        assert_eq!(r.out, want, "killed at {phase}: output differs from an uninterrupted run; stderr: {}", r.err);
        let err: String = r.err.lines().filter(|l| l.starts_with("tock ")).map(|l| l.to_string() + "\n").collect();
        assert_eq!(err, want_err, "killed at {phase}: the program's stderr differs from an uninterrupted run's");
        let rep = r.report.expect("report");
        let attempts: Vec<u64> =
            rep["steps"].as_array().unwrap().iter().filter(|s| s["step"] == 1).map(|s| s["attempt"].as_u64().unwrap()).collect();
        if phase != "step.handover" {
            assert!(attempts.contains(&1), "killed at {phase}: step 1 should have run again: {attempts:?}");
        }
        let no_half_written = std::fs::read_dir(d.join("store/tmp")).map(|rd| rd.count()).unwrap_or(0);
        let _ = no_half_written; // staging files of killed steps may remain in tmp/; never under chains/ or images/
    }
}

/// Input for `sumin`: `n` bytes of lines that differ from one another.
fn numbered_input(n: usize) -> String {
    let mut s: String = (0..n / 19 + 1).map(|i| format!("input line {i:07}\n")).collect();
    s.truncate(n);
    s
}

#[test]
fn stdin_reaches_the_program_across_steps_exactly_once() {
    // 3 MiB read 4 KiB at a time, 2 ms apart: about 1.5 s of reading, so the steps'
    // checkpoints (1 s limit) catch it with every pipe on the way full. Each byte must
    // reach the program once, in order: sumin prints a hash of all it has read (and fails
    // if it gets more than the input).
    let prog = program("sumin");
    let input = numbered_input(3 << 20);
    let max = (3 << 20).to_string();
    let args = [prog.to_str().unwrap(), "2000", &max];
    let want = reference(&prog, &args[1..], &input);
    assert!(want.contains(&format!("end {} hash", 3 << 20)), "{want}");
    for u in users() {
        let d = workdir("stdin", u);
        let r = run_chain_fed(u, &d, "1s", &args, &[], Input::Pipe(input.as_bytes()));
        assert_eq!(r.code, Some(0), "as {u:?}: {}", r.err);
        assert_eq!(r.out, want, "as {u:?}: the program read other input than an uninterrupted run; stderr: {}", r.err);
        assert!(steps(&r) >= 2, "as {u:?}: the chain took {} step(s); stderr: {}", steps(&r), r.err);
    }
    // Killed at the points where the input's accounting matters: while it runs, while
    // frozen (input paused), and after the image is stored but before its manifest.
    let user = users()[0];
    // A file as stdin is read at each step's offset (nothing kept): also after a kill.
    let d = workdir("stdin-file", user);
    let file = d.join("input");
    std::fs::write(&file, &input).unwrap();
    let r = run_chain_fed(user, &d, "1s", &args, &[("LIMITLESS_FAILPOINT", "step.running:1:0")], Input::File(&file));
    assert_eq!(r.code, Some(0), "stdin from a file: {}", r.err);
    assert_eq!(r.out, want, "stdin from a file: other input than an uninterrupted run");
    for phase in ["step.running", "checkpoint.frozen", "store.manifest"] {
        let d = workdir(&format!("stdin-kill-{phase}"), user);
        let fp = format!("{phase}:1:0");
        let r = run_chain_fed(user, &d, "1s", &args, &[("LIMITLESS_FAILPOINT", &fp)], Input::Pipe(input.as_bytes()));
        assert_eq!(r.code, Some(0), "killed at {phase}: {}", r.err);
        assert_eq!(r.out, want, "killed at {phase}: the program read other input than an uninterrupted run; stderr: {}", r.err);
        let rep = r.report.expect("report");
        let reruns = rep["steps"].as_array().unwrap().iter().filter(|s| s["step"] == 1 && s["attempt"] == 1).count();
        assert_eq!(reruns, 1, "killed at {phase}: step 1 should have run again; stderr: {}", r.err);
    }
}

#[test]
fn a_duplicate_invocation_of_a_step_runs_nothing() {
    let prog = program("ticker");
    let want = reference(&prog, &["200"], "");
    for u in users() {
        let d = workdir("duplicate", u);
        let r = run_chain(u, &d, "1s", &[prog.to_str().unwrap(), "200"], &[("LIMITLESS_TEST_DUPLICATE_STEPS", "1")]);
        assert_eq!(r.code, Some(0), "{}", r.err);
        assert_eq!(r.out, want, "no output twice");
        let claims = claimed_steps(&d.join("store"));
        let mut dedup = claims.clone();
        dedup.dedup();
        assert_eq!(claims, dedup, "each step claimed once");
    }
}

/// `limitless run --limit LIMIT --store DIR/store -- ticker TICKS` as `user`, its output
/// piped; and what an uninterrupted `ticker TICKS` prints.
fn spawn_ticker_chain(user: User, d: &Path, limit: &str, ticks: &str) -> (std::process::Child, String) {
    let prog = program("ticker");
    let mut c = command(user, limitless());
    c.args(["run", "--limit", limit, "--store"]).arg(d.join("store")).arg("--").arg(&prog).arg(ticks).current_dir(d);
    // As from a terminal: SIGINT at its default even if the tests were started with it
    // ignored (`run` leaves an ignored SIGINT ignored, as a background job expects).
    // SAFETY: only async-signal-safe `signal` between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut c, || {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    let child = c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    (child, reference(&prog, &[ticks], ""))
}

/// Waits (at most 30 s) until the chain in `d` has claimed step `n`.
fn wait_for_claim(d: &Path, n: u32) {
    let t = Instant::now();
    while claimed_steps(&d.join("store")).iter().max().copied().unwrap_or(0) < n {
        assert!(t.elapsed() < Duration::from_secs(30), "step {n} was not claimed within 30 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn resume_continues_a_chain_after_the_controller_dies() {
    let user = users()[0];
    let d = workdir("resume", user);
    let (mut child, want) = spawn_ticker_chain(user, &d, "1s", "300");
    let mut out = child.stdout.take().unwrap();
    // Let it get past a couple of checkpoints, then kill the controller (and so its steps).
    wait_for_claim(&d, 2);
    let _ = child.kill();
    let _ = child.wait();
    let mut first = String::new();
    let _ = out.read_to_string(&mut first);
    let mut c = command(user, limitless());
    c.args(["run", "--limit", "1s", "--store"]).arg(d.join("store")).args(["--resume", "last"]).current_dir(&d);
    let o = c.stdin(Stdio::null()).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let rest = String::from_utf8_lossy(&o.stdout);
    assert_eq!(rest.lines().last(), want.lines().last());
    // Resuming a finished chain says so and gives its status.
    let mut c = command(user, limitless());
    c.args(["run", "--limit", "1s", "--store"]).arg(d.join("store")).args(["--resume", "last"]);
    let o = c.output().unwrap();
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stderr).contains("already finished"));
}

#[test]
fn ctrl_c_stops_the_step_and_keeps_the_chain() {
    let user = users()[0];
    let d = workdir("interrupt", user);
    // 7 s of ticks, a line every 250 ms, with 3 s steps: interrupted in step 1, seconds
    // before the program would end (a loaded machine is slow to start steps).
    let (mut child, want) = spawn_ticker_chain(user, &d, "3s", "700");
    let t0 = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    let out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            all.push_str(&l);
            all.push('\n');
            let _ = tx.send(());
        }
        all
    });
    wait_for_claim(&d, 1);
    // Once step 1 has printed a line after its checkpoint, what a terminal's Ctrl-C does:
    // SIGINT to `run` only (each step has a process group of its own).
    while rx.try_recv().is_ok() {}
    rx.recv_timeout(Duration::from_secs(10)).expect("a line from step 1");
    let sent = t0.elapsed();
    // SAFETY: signals the child we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    let first = reader.join().unwrap();
    assert_eq!(o.status.code(), Some(130), "SIGINT sent {:.1} s after the start; stderr: {err}", sent.as_secs_f64());
    let last = err.lines().last().unwrap_or("");
    assert!(last.contains("interrupted (SIGINT)") && last.contains("--resume"), "{err}");
    // No step of the chain is left running.
    let chain = std::fs::read_dir(d.join("store/chains")).unwrap().next().unwrap().unwrap().file_name();
    let chain = chain.to_str().unwrap();
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .filter(|c| c.contains("__step") && c.contains(chain))
        .collect();
    assert!(left.is_empty(), "steps still running: {left:?}");
    let mut c = command(user, limitless());
    c.args(["run", "--limit", "3s", "--store"]).arg(d.join("store")).args(["--resume", chain]).current_dir(&d);
    let o = c.stdin(Stdio::null()).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    // What the interrupted controller printed after the last checkpoint is not printed
    // again: the two outputs make exactly one uninterrupted run's.
    assert_eq!(first + &String::from_utf8_lossy(&o.stdout), want, "output lost or repeated across the interruption");
}

#[test]
fn a_closed_stdout_ends_the_chain_as_sigpipe_ends_the_program() {
    // `limitless run -- yes | head -2` must end as `yes | head -2` does, not run forever.
    let user = users()[0];
    let d = workdir("sigpipe", user);
    let mut c = command(user, limitless());
    c.args(["run", "--limit", "2s", "--store"]).arg(d.join("store")).args(["--", "/usr/bin/yes"]).current_dir(&d);
    let mut child = c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut first = [0u8; 4];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    assert_eq!(&first, b"y\ny\n");
    // (The read end is dropped here.)
    let t = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("limitless run went on for 10 s after its stdout was closed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(128 + 13), "exit status after its stdout was closed");
}

#[test]
fn a_limit_too_short_for_the_program_fails_naming_the_minimum() {
    let prog = program("mem");
    let user = users()[0];
    let d = workdir("too-short", user);
    // 700 MiB cannot be checkpointed and restored with time to run within one second.
    let r = run_chain(user, &d, "1s", &[prog.to_str().unwrap(), "700"], &[]);
    assert_eq!(r.code, Some(125), "{}", r.err);
    let last = r.err.lines().last().unwrap_or("");
    assert!(last.contains("--limit") && (last.contains("at least") || last.contains("longer")), "{}", r.err);
    assert!(last.contains("resume") || last.contains("almost no time"), "{}", r.err);
    let _ = std::fs::remove_dir_all(&d); // a 700 MiB image
}

#[test]
fn a_program_that_cannot_be_checkpointed_fails_saying_why() {
    // The shell waits for its child `sleep`: no checkpoint can be taken (process trees are
    // not supported), so every step is killed at its limit. The chain must say that, not
    // blame the program's memory.
    let user = users()[0];
    let d = workdir("refused", user);
    let r = run_chain(user, &d, "1s", &["/bin/sh", "-c", "sleep 10; echo done"], &[]);
    assert_eq!(r.code, Some(125), "{}", r.err);
    let last = r.err.lines().last().unwrap_or("");
    assert!(
        last.contains("every checkpoint it tried had failed") && last.contains("child process"),
        "last line: {last}\nstderr: {}",
        r.err
    );
    assert!(!last.contains("memory"), "blames memory: {last}");
    // Each attempt tells the reason once, not at every retry.
    let told = r.err.lines().filter(|l| l.contains("the checkpoint is tried again")).count();
    assert!((3..=6).contains(&told), "told {told} times: {}", r.err);
    assert!(!r.err.contains('\x1b'), "terminal colour codes in piped stderr: {:?}", r.err);
}

#[test]
fn bad_input_gives_one_clear_line() {
    let prog = program("ticker");
    for u in users() {
        let d = workdir("chain-bad", u);
        let run = |args: &[&str]| {
            let mut c = command(u, limitless());
            c.arg("run").args(args).current_dir(&d);
            let o = c.stdin(Stdio::null()).output().unwrap();
            (o.status.code(), String::from_utf8_lossy(&o.stderr).into_owned())
        };
        let store = d.join("store");
        let store = store.to_str().unwrap();
        let (code, err) = run(&["--limit", "300ms", "--store", store, "--", prog.to_str().unwrap()]);
        assert_eq!(code, Some(125));
        assert!(err.lines().count() == 1 && err.contains("too short") && err.contains("at least 1s"), "{err}");
        let (code, err) = run(&["--limit", "2s", "--margin", "1500ms", "--store", store, "--", prog.to_str().unwrap()]);
        assert!(code == Some(125) && err.lines().count() == 1 && err.contains("margin"), "{err}");
        let (code, err) = run(&["--limit", "5s", "--store", "/proc/no-store-here", "--", prog.to_str().unwrap()]);
        assert!(code == Some(125) && err.lines().count() == 1 && err.contains("/proc/no-store-here"), "{err}");
        let (code, err) = run(&["--limit", "5s", "--store", store, "--", "/nonexistent/program"]);
        assert!(code == Some(127) && err.lines().count() == 1 && err.contains("not found"), "{err}");
        let (code, err) = run(&["--limit", "5s", "--store", store, "--", "/sbin/ldconfig"]);
        assert!(code == Some(125) && err.lines().count() == 1 && err.contains("statically linked"), "{err}");
        let (code, err) = run(&["--limit", "5s", "--store", store, "--resume", "0123456789abcdef"]);
        assert!(code == Some(125) && err.lines().count() == 1 && err.contains("no chain"), "{err}");
    }
}

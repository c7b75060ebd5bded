//! Figures of the checkpoint engine: checkpoint time, time the program is frozen, image
//! size and restore time, for processes of 1 MiB and 1 GiB (random contents), of no
//! buffer, 1 MiB and 1 GiB of text-like memory (compressible to about half), 1 GiB of
//! touched-but-zero memory,
//! checkpointed and stopped, without compression and with it ("zstd idle", `dump
//! --compress`: only while the disk is behind; "zstd all", `--compress=all`: every record
//! that pays),
//! and checkpointed with `--leave-running` (a copy-on-write snapshot); each raw image of a
//! stopped program is restored twice, copied and with `restore --map` (mapped
//! copy-on-write), and the program then writes a byte of every page (the copies a mapped
//! restore leaves to it); and a delta image
//! (`dump --parent`) of a 1 GiB process that rewrote 1 % of its heap, with dirty-page
//! tracking and without. Beside them, the machine's reference
//! figures in the same run: `dd if=/dev/zero of=DIR/f bs=1M count=1024 conv=fdatasync` in
//! the image directory, `cat` of that 1 GiB page-cached file to /dev/null, and 1 GiB of
//! new memory (`MADV_POPULATE_WRITE` on two threads: what creating the memory a restore
//! fills costs on this machine); the table gives checkpoint / dd and restore / cat for the
//! 1 GiB rows.
//!
//! Then pages stored as their changes (the default) against `--whole-pages`, for the 1 MiB
//! program and a Python interpreter: image size, checkpoint and restore, alternately
//! (`cargo bench --bench engine -- changes` runs this alone; `-- compress` runs the
//! compression A/B alone).
//!
//! Last, the cost while running: a CPU-bound loop (`examples/factors.c`) plain and under
//! the engine, alternately, and what stdio, malloc and mutexes cost in a single-threaded
//! program (`tests/programs/locks.c`) plain and under `limitless launch`.
//!
//! Run with `cargo bench --bench engine`; each figure is the median of three runs. The
//! runs go in rounds (references, then every row once), with a `sync` before each, so that
//! figures compared with each other are taken close together. The images go to
//! $LIMITLESS_BENCH_DIR (default: the system temporary directory). With
//! $LIMITLESS_BENCH_SLOW_DIR set to a directory on a slower disk (`scripts/slow-disk.sh`
//! makes one), the compression rows run there too, with dd and cat measured there.

use limitless::engine::checkpoint::{After, Request};
use limitless::engine::compress::Compress::{self, All, Idle, Off};
use limitless::engine::restore::restore;
use limitless::engine::supervisor::{Options, Supervisor};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn build_mem(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/programs/mem.c");
    let out = dir.join("mem");
    let st = Command::new("gcc").args(["-O2", "-o"]).arg(&out).arg(&src).status().expect("gcc");
    assert!(st.success());
    out
}

struct Run {
    image_bytes: u64,
    checkpoint_ms: f64,
    frozen_ms: f64,
    /// The longest pause the program saw itself (leave-running runs only).
    seen_ms: Option<f64>,
    restore_ms: f64,
    /// Raw images of a stopped program: restored again with `restore --map` (ms).
    mapped_ms: Option<f64>,
    /// Then what the program took to read a word of every page, then to write a byte of
    /// every page, after each restore: [copied read, copied write, mapped read, mapped write].
    touch: Option<[f64; 4]>,
    snapshot: bool,
    /// Page records stored compressed, of all.
    compressed: (u64, u64),
}

/// Launches `prog args` under the engine and waits until it has printed something (it
/// prints READY when its memory is filled).
fn launch_ready(prog: &Path, args: &[std::ffi::OsString], opts: &Options) -> Supervisor {
    let sup = Supervisor::launch(prog, args, opts).expect("launch");
    assert!(sup.wait_ready(Duration::from_secs(30)), "agent did not start");
    let t = Instant::now();
    while sup.inner.out.bytes.load(Ordering::Relaxed) == 0 {
        assert!(t.elapsed() < Duration::from_secs(120), "program did not get ready");
        std::thread::sleep(Duration::from_millis(5));
    }
    sup
}

fn one(prog: &Path, dir: &Path, mib: u64, kind: &str, after: After, compress: Compress) -> Run {
    let opts = Options { socket: None, carry: Default::default(), track: false, map: false };
    let mut args = vec![mib.to_string().into(), kind.into()];
    if after == After::Resume {
        args.push("tick".into());
    }
    let sup = launch_ready(prog, &args, &opts);
    let img = dir.join("bench.img");
    let stats = sup.inner.checkpoint(&Request { compress, ..Request::new(img.clone(), after) }).expect("checkpoint");
    let mut seen_ms = None;
    if after == After::Resume {
        // Let it tick a little more, then ask for the longest gap it saw.
        std::thread::sleep(Duration::from_millis(50));
        let inner = sup.inner.clone();
        let _ =
            rustix::process::kill_process(rustix::process::Pid::from_raw(sup.pid() as i32).expect("pid"), rustix::process::Signal::TERM);
        sup.wait().expect("wait");
        let line = String::from_utf8_lossy(&inner.out.last_line()).into_owned();
        seen_ms = line.strip_prefix("max-gap-ms ").and_then(|v| v.trim().parse().ok());
    } else {
        sup.wait().expect("wait");
    }
    // Restore from a cold-ish page cache is not what we measure: the image was just written.
    let (sup2, rs) = restore(&img, &opts).expect("restore");
    let (mut mapped_ms, mut touch) = (None, None);
    if after == After::Kill && compress == Off {
        let copied = [touch_all(&sup2, false), touch_all(&sup2, true)];
        sup2.inner.kill();
        let _ = sup2.wait();
        let (sup3, ms) = restore(&img, &Options { map: true, ..opts.clone() }).expect("restore --map");
        mapped_ms = Some(ms.total_ms);
        touch = Some([copied[0], copied[1], touch_all(&sup3, false), touch_all(&sup3, true)]);
        sup3.inner.kill();
        let _ = sup3.wait();
    } else {
        sup2.inner.kill();
        let _ = sup2.wait();
    }
    let _ = std::fs::remove_file(&img);
    Run {
        image_bytes: stats.image_bytes,
        checkpoint_ms: stats.total_ms,
        frozen_ms: stats.frozen_ms,
        seen_ms,
        restore_ms: rs.total_ms,
        mapped_ms,
        touch,
        snapshot: stats.snapshot,
        compressed: (stats.compressed_records, stats.page_records),
    }
}

/// Asks a restored `mem` to write a byte of every page (SIGUSR1; `write`) or read a word of
/// every page (SIGUSR2) and returns the time that took, as it measured it ("touched-ms T",
/// "read-ms T"): after `restore --map`, the faults and copies the restore left to the
/// program.
fn touch_all(sup: &Supervisor, write: bool) -> f64 {
    let before = sup.inner.out.bytes.load(Ordering::Relaxed);
    let pid = rustix::process::Pid::from_raw(sup.pid() as i32).expect("pid");
    let (sig, prefix) = if write { (rustix::process::Signal::USR1, "touched-ms ") } else { (rustix::process::Signal::USR2, "read-ms ") };
    rustix::process::kill_process(pid, sig).expect("signal the program");
    let t = Instant::now();
    loop {
        let line = String::from_utf8_lossy(&sup.inner.out.last_line()).into_owned();
        if sup.inner.out.bytes.load(Ordering::Relaxed) > before {
            if let Some(v) = line.strip_prefix(prefix).and_then(|v| v.trim().parse().ok()) {
                return v;
            }
        }
        assert!(t.elapsed() < Duration::from_secs(60), "the restored program did not write its memory");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// How the delta of [`incremental`] finds what changed.
#[derive(Clone, Copy, PartialEq)]
enum Delta {
    /// Dirty tracking armed by the full leave-running checkpoint.
    Tracked,
    /// Content hashes alone (`LIMITLESS_TRACK=0`).
    Hashed,
    /// The full image stops the program, which is restored with tracking from that image
    /// (`restore --track`); the delta is taken from the restored program.
    Restored,
}

/// Incremental checkpoints: `churn 1024` (it rewrites the same 1 % of its 1 GiB heap every
/// 300 ms), a full image, then a delta on top of it a second later (see [`Delta`]).
/// Returns (full bytes, full ms, delta bytes, delta ms, restore of the delta ms, delta frozen
/// ms, pages found unchanged by tracking).
fn incremental(dir: &Path, how: Delta) -> (u64, f64, u64, f64, f64, f64, u64) {
    // Read by the supervisor (this process) at each checkpoint.
    std::env::set_var("LIMITLESS_TRACK", if how == Delta::Hashed { "0" } else { "1" });
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/programs/churn.c");
    let churn = dir.join("churn");
    assert!(Command::new("gcc").args(["-O2", "-o"]).arg(&churn).arg(&src).status().expect("gcc").success());
    let opts = Options { socket: None, carry: Default::default(), track: false, map: false };
    let sup = Supervisor::launch(&churn, &["1024".into(), "100000".into(), "300".into()], &opts).expect("launch");
    assert!(sup.wait_ready(Duration::from_secs(30)), "agent did not start");
    let t = Instant::now();
    while sup.inner.out.bytes.load(Ordering::Relaxed) == 0 {
        assert!(t.elapsed() < Duration::from_secs(120), "churn did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (full, delta) = (dir.join("full.img"), dir.join("delta.img"));
    let req = |output: &Path, parent: Option<PathBuf>| Request { parent, ..Request::new(output.to_path_buf(), After::Resume) };
    let (a, sup) = if how == Delta::Restored {
        let a = sup.inner.checkpoint(&Request { after: After::Kill, ..req(&full, None) }).expect("full checkpoint");
        let _ = sup.wait();
        (a, restore(&full, &Options { track: true, ..opts.clone() }).expect("restore of the full image").0)
    } else {
        (sup.inner.checkpoint(&req(&full, None)).expect("full checkpoint"), sup)
    };
    std::thread::sleep(Duration::from_secs(1));
    let b = sup.inner.checkpoint(&req(&delta, Some(full.clone()))).expect("delta checkpoint");
    sup.inner.kill();
    let _ = sup.wait();
    let (r, rs) = restore(&delta, &opts).expect("restore of the delta");
    r.inner.kill();
    let _ = r.wait();
    let _ = std::fs::remove_file(&full);
    let _ = std::fs::remove_file(&delta);
    (a.image_bytes, a.total_ms, b.image_bytes, b.total_ms, rs.total_ms, b.frozen_ms, b.unchanged_pages)
}

/// Time to copy 1 GiB in memory (both buffers already faulted in), median of three, in ms.
fn memcpy_ms() -> f64 {
    let src = vec![0x5au8; 1 << 30];
    let mut dst = vec![0xa5u8; 1 << 30];
    let v = (0..3)
        .map(|_| {
            let t = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&dst);
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    median(v)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Wall time of a shell command, in ms.
fn timed(cmd: &str) -> f64 {
    let t = Instant::now();
    let st = Command::new("sh").args(["-c", cmd]).stdout(Stdio::null()).stderr(Stdio::null()).status().expect("sh");
    assert!(st.success(), "`{cmd}` failed");
    t.elapsed().as_secs_f64() * 1000.0
}

/// (dd of 1 GiB with fdatasync into `dir`, cat of that page-cached file), one of each.
fn reference(dir: &Path) -> (f64, f64) {
    let f = dir.join("f");
    let f = f.display();
    settle();
    let dd = timed(&format!("dd if=/dev/zero of={f} bs=1M count=1024 conv=fdatasync"));
    timed(&format!("cat {f} > /dev/null")); // into the page cache, whatever dd left
    let cat = timed(&format!("cat {f} > /dev/null"));
    let _ = std::fs::remove_file(dir.join("f"));
    (dd, cat)
}

/// Wall time to allocate 1 GiB of new anonymous memory (`MADV_POPULATE_WRITE`, half on
/// each of two threads, as the restorer shares its work), in ms: what the kernel (and, in
/// a VM, the host) charges for memory that a restore must create, before any data is
/// copied into it.
fn new_memory_ms() -> f64 {
    const LEN: usize = 1 << 30;
    // SAFETY: a new private anonymous mapping at an address the kernel picks.
    let p = unsafe {
        libc::mmap(std::ptr::null_mut(), LEN, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap of 1 GiB");
    let at = p as usize;
    let t = Instant::now();
    std::thread::scope(|s| {
        for half in [0, LEN / 2] {
            s.spawn(move || {
                // SAFETY: populates half of the mapping made above, which nothing else uses.
                let r = unsafe { libc::madvise((at + half) as *mut libc::c_void, LEN / 2, 23) }; // MADV_POPULATE_WRITE
                assert_eq!(r, 0, "MADV_POPULATE_WRITE: {}", std::io::Error::last_os_error());
            });
        }
    });
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    // SAFETY: unmaps exactly the mapping made above, which nothing refers to any more.
    unsafe { libc::munmap(p, LEN) };
    ms
}

/// Lets write-back of earlier runs (and freeing deleted images) finish, so that it does
/// not land in the next measurement.
fn settle() {
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::thread::sleep(Duration::from_millis(300));
}

/// CPU time (user + system) of the reaped children so far, in ms.
fn children_cpu_ms() -> f64 {
    // SAFETY: an all-zero rusage is a valid value; getrusage fills it in.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable rusage for the call.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 * 1000.0 + v.tv_usec as f64 / 1000.0;
    t(u.ru_utime) + t(u.ru_stime)
}

/// Alternating runs of each side in the no-overhead figure. The target is 1 %, and on this
/// machine single runs of the loop spread over 8 % (935-1009 ms by hand), so the medians
/// of five runs each gave -0.49 % to +1.68 % from one bench run to another.
const OVERHEAD_RUNS: usize = 11;

/// A CPU-bound loop (`examples/factors.c`, about 1 s) run plain and under the engine
/// (launched with the agent, never checkpointed), alternately, `n` times each. Returns
/// (plain wall ms, engine wall ms, plain CPU ms, engine CPU ms), medians.
fn overhead(dir: &Path, n: usize) -> (f64, f64, f64, f64) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/factors.c");
    let prog = dir.join("factors");
    assert!(Command::new("gcc").args(["-O2", "-o"]).arg(&prog).arg(&src).arg("-lm").status().expect("gcc").success());
    let args = ["75000000000000000", "1"];
    let (mut pw, mut ew, mut pc, mut ec) = (vec![], vec![], vec![], vec![]);
    for _ in 0..n {
        let (t, c) = (Instant::now(), children_cpu_ms());
        let st = Command::new(&prog).args(args).stdout(Stdio::null()).status().expect("factors");
        assert!(st.success());
        pw.push(t.elapsed().as_secs_f64() * 1000.0);
        pc.push(children_cpu_ms() - c);
        let (t, c) = (Instant::now(), children_cpu_ms());
        let opts = Options { socket: None, carry: Default::default(), track: false, map: false };
        let sup = Supervisor::launch(&prog, &args.map(Into::into), &opts).expect("launch");
        sup.wait().expect("wait");
        ew.push(t.elapsed().as_secs_f64() * 1000.0);
        ec.push(children_cpu_ms() - c);
    }
    (median(pw), median(ew), median(pc), median(ec))
}

/// Alternating runs of each side in the locking figure.
const LOCK_RUNS: usize = 5;

/// What locking costs under the engine: `tests/programs/locks.c` (ns per `putc`, per small
/// malloc + free, per lock + unlock pair of a normal and of a recursive mutex) run plain and
/// under `limitless launch`, alternately, `n` times each. glibc makes each of these dearer
/// once a process has a second thread it knows of. Returns the figures' names and, for
/// each, (plain, engine) medians.
fn locking(dir: &Path, n: usize) -> Vec<(String, f64, f64)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/programs/locks.c");
    let prog = dir.join("locks");
    assert!(Command::new("gcc").args(["-O2", "-pthread", "-o"]).arg(&prog).arg(&src).status().expect("gcc").success());
    let figures = |c: &mut Command| -> Vec<(String, f64)> {
        let out = c.stderr(Stdio::null()).output().expect("locks");
        assert!(out.status.success(), "locks failed: {:?}", out.status);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let w: Vec<&str> = text.split_whitespace().collect();
        w.chunks(2).map(|p| (p[0].to_string(), p[1].parse().unwrap_or_else(|_| panic!("locks printed {text:?}")))).collect()
    };
    let (mut plain, mut engine) = (vec![], vec![]);
    for _ in 0..n {
        plain.push(figures(&mut Command::new(&prog)));
        engine.push(figures(Command::new(env!("CARGO_BIN_EXE_limitless")).arg("launch").arg("--").arg(&prog)));
    }
    (0..plain[0].len())
        .map(|i| {
            let col = |runs: &[Vec<(String, f64)>]| median(runs.iter().map(|r| r[i].1).collect());
            (plain[0][i].0.clone(), col(&plain), col(&engine))
        })
        .collect()
}

/// `--compress` against raw, 1 GiB of text-like memory stopped, `n` alternating pairs (a
/// closer look at "never slower than raw" than three rounds give on a noisy machine;
/// `cargo bench --bench engine -- compress` runs it alone, in the image directory).
fn compress_ab(prog: &Path, dir: &Path, n: usize) {
    let (mut raw, mut idle, mut compressed) = (Vec::new(), Vec::new(), 0);
    for i in 0..n {
        // Each side goes first in every other pair, so that what the run before leaves
        // (a deleted 1 GiB image, dirty pages) weighs on both alike.
        let order = if i % 2 == 0 { [Off, Idle] } else { [Idle, Off] };
        for mode in order {
            settle();
            let r = one(prog, dir, 1024, "text", After::Kill, mode);
            if mode == Off {
                raw.push(r.checkpoint_ms);
            } else {
                compressed += r.compressed.0;
                idle.push(r.checkpoint_ms);
            }
        }
    }
    let span = |v: &[f64]| format!("{:.0}-{:.0}", v.iter().cloned().fold(f64::MAX, f64::min), v.iter().cloned().fold(0.0, f64::max));
    let (r, i) = (median(raw.clone()), median(idle.clone()));
    println!(
        "compression A/B in {}, 1 GiB text stopped, {n} alternating pairs: raw median {r:.1} ms ({}), --compress median {i:.1} ms ({}): {:.3}x raw; {compressed} records compressed in all",
        dir.display(),
        span(&raw),
        span(&idle),
        i / r
    );
}

/// One stop-and-restore cycle of `prog args` (which prints a line when ready, then waits):
/// (image bytes, checkpoint ms, restore ms), with pages stored whole or as their changes,
/// compressed as `compress` says.
fn cycle(prog: &Path, args: &[std::ffi::OsString], dir: &Path, whole_pages: bool, compress: Compress) -> (u64, f64, f64) {
    let opts = Options { socket: None, carry: Default::default(), track: false, map: false };
    let sup = launch_ready(prog, args, &opts);
    let img = dir.join("cycle.img");
    let req = Request { compress, whole_pages, ..Request::new(img.clone(), After::Kill) };
    let stats = sup.inner.checkpoint(&req).expect("checkpoint");
    assert_eq!(stats.diff_records == 0, whole_pages, "records stored as changes: {}", stats.diff_records);
    sup.wait().expect("wait");
    let (sup2, rs) = restore(&img, &opts).expect("restore");
    sup2.inner.kill();
    let _ = sup2.wait();
    let _ = std::fs::remove_file(&img);
    (stats.image_bytes, stats.total_ms, rs.total_ms)
}

/// Pages stored as their changes from the file mapped there or from zeros (the default)
/// against `--whole-pages`, for the 1 MiB program and a Python interpreter that imported a
/// few modules and built a dict: image size, checkpoint and restore, `n` alternating pairs;
/// then both with `--compress=all`.
fn changes_ab(mem: &Path, dir: &Path, n: usize) {
    let py = "import json, decimal, sqlite3, ssl, hashlib, signal\nd = {i: str(i) * 3 for i in range(20000)}\nprint('READY', flush=True)\nsignal.pause()";
    let progs: [(&str, &Path, Vec<std::ffi::OsString>); 2] = [
        ("1 MiB program", mem, vec!["1".into(), "random".into()]),
        ("Python", Path::new("/usr/bin/python3"), vec!["-c".into(), py.into()]),
    ];
    for ((name, prog, args), compress) in progs.iter().flat_map(|p| [(p, Off), (p, All)]) {
        let mut runs: [Vec<(u64, f64, f64)>; 2] = [Vec::new(), Vec::new()];
        for _ in 0..n {
            for (k, whole) in [false, true].into_iter().enumerate() {
                runs[k].push(cycle(prog, args, dir, whole, compress));
            }
        }
        let name = if compress == Off { name.to_string() } else { format!("{name}, --compress=all") };
        let m = |k: usize| {
            let r = &runs[k];
            (
                median(r.iter().map(|x| x.0 as f64).collect()),
                median(r.iter().map(|x| x.1).collect()),
                median(r.iter().map(|x| x.2).collect()),
            )
        };
        let ((ci, cc, cr), (wi, wc, wr)) = (m(0), m(1));
        println!(
            "pages as changes A/B, {name}, {n} alternating pairs (medians): image {:.0} KiB vs {:.0} KiB whole ({:.3}x), checkpoint {cc:.1} vs {wc:.1} ms ({:.2}x), restore {cr:.1} vs {wr:.1} ms ({:.2}x)",
            ci / 1024.0,
            wi / 1024.0,
            ci / wi,
            cc / wc,
            cr / wr
        );
    }
}

/// A row of the table: size in MiB, contents, what follows the checkpoint, compression,
/// label.
type RowSpec = (u64, &'static str, After, Compress, &'static str);

/// A row's medians: label, image bytes, checkpoint ms, restore ms.
type Summary = (&'static str, u64, f64, f64);

/// Measures `spec` in `rounds` rounds with images in `dir` (each round: the references,
/// then every row once, so that the rows compared, and each row and its reference, are
/// measured close together in time), prints the table and returns each row's medians.
fn table(prog: &Path, dir: &Path, spec: &[RowSpec], rounds: usize) -> Vec<Summary> {
    let mut runs: Vec<Vec<Run>> = spec.iter().map(|_| Vec::new()).collect();
    let (mut dds, mut cats, mut news) = (Vec::new(), Vec::new(), Vec::new());
    for _round in 0..rounds {
        let (dd, cat) = reference(dir);
        dds.push(dd);
        cats.push(cat);
        news.push(new_memory_ms());
        for (i, &(mib, kind, after, compress, _)) in spec.iter().enumerate() {
            settle();
            runs[i].push(one(prog, dir, mib, kind, after, compress));
        }
    }
    let (dd, cat, new) = (median(dds), median(cats), median(news));
    let mapped = |runs: &[Run]| -> Option<(f64, [f64; 4])> {
        let ms: Vec<f64> = runs.iter().map(|r| r.mapped_ms).collect::<Option<_>>()?;
        let t: Vec<[f64; 4]> = runs.iter().map(|r| r.touch).collect::<Option<_>>()?;
        Some((median(ms), [0, 1, 2, 3].map(|k| median(t.iter().map(|x| x[k]).collect()))))
    };
    println!();
    println!("images in {}", dir.display());
    println!("dd if=/dev/zero of=DIR/f bs=1M count=1024 conv=fdatasync: {dd:.1} ms; cat of that 1 GiB page-cached file to /dev/null: {cat:.1} ms");
    println!(
        "1 GiB of new memory (MADV_POPULATE_WRITE on two threads, as much as any restore of 1 GiB allocates): {new:.1} ms ({:.2}x cat)",
        new / cat
    );
    println!(
        "{:<30} {:>10} {:>14} {:>10} {:>12} {:>11} {:>8} {:>12} {:>9} {:>11}",
        "process", "image", "checkpoint ms", "frozen ms", "seen gap ms", "restore ms", "ckpt/dd", "restore/cat", "snapshot", "compressed"
    );
    let mut out = Vec::new();
    let all = runs;
    for (r, runs) in spec.iter().zip(all.iter()) {
        let (label, mib) = (r.4, r.0);
        let ck = median(runs.iter().map(|r| r.checkpoint_ms).collect());
        let rs = median(runs.iter().map(|r| r.restore_ms).collect());
        let seen = runs.iter().map(|r| r.seen_ms).collect::<Option<Vec<f64>>>().map(median);
        let ratio = |v: f64, r: f64| if mib == 1024 { format!("{:.2}", v / r) } else { "-".into() };
        println!(
            "{:<30} {:>10} {:>14.1} {:>10.1} {:>12} {:>11.1} {:>8} {:>12} {:>9} {:>11}",
            label,
            // Small images to the KiB (is a 1 MiB program's image within 1 MiB?).
            if runs[0].image_bytes < 10 << 20 {
                format!("{} KiB", runs[0].image_bytes.div_ceil(1024))
            } else {
                limitless::util::bytes(runs[0].image_bytes)
            },
            ck,
            median(runs.iter().map(|r| r.frozen_ms).collect()),
            seen.map_or("-".into(), |s| format!("{s:.1}")),
            rs,
            ratio(ck, dd),
            ratio(rs, cat),
            format!("{}/{}", runs.iter().filter(|r| r.snapshot).count(), runs.len()),
            // Records stored compressed, of all, in each run.
            runs.iter().map(|r| format!("{}", r.compressed.0)).collect::<Vec<_>>().join("/") + &format!(" of {}", runs[0].compressed.1),
        );
        out.push((label, runs[0].image_bytes, ck, rs));
    }
    println!(
        "\nrestore --map (page data mapped copy-on-write from the image, not copied) against the copying restore; then the program reads a word of every page, then writes a byte of every page (ms):"
    );
    println!(
        "{:<30} {:>11} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12}",
        "process", "map ms", "map/cat", "copy ms", "copy: reads", "copy: writes", "map: reads", "map: writes"
    );
    for (r, runs) in spec.iter().zip(&all) {
        if let Some((ms, t)) = mapped(runs) {
            let rs = median(runs.iter().map(|r| r.restore_ms).collect());
            let ratio = if r.0 == 1024 { format!("{:.2}", ms / cat) } else { "-".into() };
            println!("{:<30} {:>11.1} {:>12} {:>12.1} {:>12.1} {:>12.1} {:>12.1} {:>12.1}", r.4, ms, ratio, rs, t[0], t[1], t[2], t[3]);
        }
    }
    out
}

/// Our rows beside DMTCP's published figures (stock, then with its socket fix), as the
/// speed issue quotes them: measured on another 2-core machine, so a guide, not a
/// comparison in one run.
fn against_dmtcp(rows: &[Summary]) {
    let row = |label: &str| *rows.iter().find(|r| r.0 == label).unwrap_or_else(|| panic!("no row {label}"));
    let (_, small, small_ck, small_rs) = row("stop, 1 MiB random");
    let (_, _, big_ck, big_rs) = row("stop, 1 GiB random");
    let (_, _, zip_ck, _) = row("stop, 1 GiB random, zstd idle");
    println!("\nbeside DMTCP's figures from the speed issue (stock / with its socket fix; another 2-core machine):");
    println!(
        "  1 MiB program: checkpoint {small_ck:.1} ms (DMTCP 430 / 39 ms), restore {small_rs:.1} ms (210 / 28 ms), image {} KiB (23.4 MiB)",
        small.div_ceil(1024)
    );
    println!(
        "  1 GiB random, uncompressed: checkpoint {big_ck:.1} ms to a durable image (970 / 600 ms), restore {big_rs:.1} ms (930 / 540 ms)"
    );
    println!("  1 GiB random, compression asked for: checkpoint {zip_ck:.1} ms (`--compress`; DMTCP's default gzip: 40 s)");
    // The target for "a 1 MiB program" is an image of at most 1 MiB, and it does
    // not say what the program holds: each reading's image, side by side.
    let kib = |label: &str| row(label).1.div_ceil(1024);
    println!(
        "  1 MiB program's image (target: at most 1024 KiB): 1 MiB random {} KiB ({} KiB zstd all); 1 MiB text {} KiB ({} KiB zstd all); no buffer {} KiB",
        kib("stop, 1 MiB random"),
        kib("stop, 1 MiB random, zstd all"),
        kib("stop, 1 MiB text"),
        kib("stop, 1 MiB text, zstd all"),
        kib("stop, C program, no buffer"),
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let bench_dir = |base: PathBuf| {
        let d = base.join(format!("limitless-bench-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("bench dir");
        d
    };
    let dir = bench_dir(std::env::var_os("LIMITLESS_BENCH_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir));
    let prog = build_mem(&dir);
    // `cargo bench --bench engine -- changes` (or `compress`): that A/B alone.
    let alone = std::env::args().skip(1).find(|a| a == "changes" || a == "compress");
    if let Some(ab) = alone {
        if ab == "changes" {
            changes_ab(&prog, &dir, 7);
        } else {
            compress_ab(&prog, &dir, 7);
        }
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    let memcpy = memcpy_ms();
    println!("memcpy of 1 GiB: {memcpy:.1} ms");
    let rows_spec = [
        // `mem.c 0`: a C program with no buffer (resident about 1.3 MiB plain, most of
        // it its libraries' unchanged pages), one reading of "a 1 MiB program".
        (0, "random", After::Kill, Off, "stop, C program, no buffer"),
        (1, "random", After::Kill, Off, "stop, 1 MiB random"),
        (1, "random", After::Kill, All, "stop, 1 MiB random, zstd all"),
        // 1 MiB of ordinary (compressible) data: another reading of "a 1 MiB program".
        (1, "text", After::Kill, Off, "stop, 1 MiB text"),
        (1, "text", After::Kill, All, "stop, 1 MiB text, zstd all"),
        (1024, "random", After::Kill, Off, "stop, 1 GiB random"),
        (1024, "random", After::Kill, Idle, "stop, 1 GiB random, zstd idle"),
        (1024, "zero", After::Kill, Off, "stop, 1 GiB zeros"),
        (1024, "text", After::Kill, Off, "stop, 1 GiB text"),
        (1024, "text", After::Kill, Idle, "stop, 1 GiB text, zstd idle"),
        (1024, "text", After::Kill, All, "stop, 1 GiB text, zstd all"),
        (1, "random", After::Resume, Off, "leave-running, 1 MiB random"),
        (1024, "random", After::Resume, Off, "leave-running, 1 GiB random"),
        (1024, "text", After::Resume, Off, "leave-running, 1 GiB text"),
        (1024, "text", After::Resume, Idle, "leave-running, 1 GiB text, zstd idle"),
    ];
    let rows = table(&prog, &dir, &rows_spec, 3);
    against_dmtcp(&rows);
    compress_ab(&prog, &dir, 7);
    changes_ab(&prog, &dir, 7);
    // Compression pays only where the disk is slower than the checkpoint's stream.
    match std::env::var_os("LIMITLESS_BENCH_SLOW_DIR") {
        Some(slow) => {
            let slow = bench_dir(PathBuf::from(slow));
            let spec = [
                (1024, "text", After::Kill, Off, "slow disk: stop, 1 GiB text"),
                (1024, "text", After::Kill, Idle, "slow disk: text, zstd idle"),
                (1024, "text", After::Kill, All, "slow disk: text, zstd all"),
                (1024, "random", After::Kill, Off, "slow disk: stop, 1 GiB random"),
                (1024, "random", After::Kill, Idle, "slow disk: random, zstd idle"),
            ];
            table(&prog, &slow, &spec, 2);
            compress_ab(&prog, &slow, 3);
            let _ = std::fs::remove_dir_all(&slow);
        }
        None => println!(
            "\nSLOW-DISK ROWS NOT RUN: set LIMITLESS_BENCH_SLOW_DIR to a directory on a slow disk (as root, scripts/slow-disk.sh makes one: a loop device throttled to 300 MB/s)"
        ),
    }
    settle();
    let inc: Vec<_> = [Delta::Tracked, Delta::Hashed, Delta::Restored].into_iter().map(|t| (t, incremental(&dir, t))).collect();
    let (plain_wall, engine_wall, plain_cpu, engine_cpu) = overhead(&dir, OVERHEAD_RUNS);
    let locks = locking(&dir, LOCK_RUNS);
    println!();
    for (how, (full, full_ms, delta, delta_ms, delta_restore_ms, delta_frozen_ms, unchanged)) in inc {
        println!(
            "incremental{}, churn 1 GiB (1 % rewritten): full image {} in {full_ms:.1} ms; a delta 1 s later {} ({:.2} % of the full) in {delta_ms:.1} ms, frozen {delta_frozen_ms:.1} ms, {} found unchanged by dirty tracking; restore of the delta {delta_restore_ms:.1} ms",
            match how {
                Delta::Tracked => "",
                Delta::Hashed => " (LIMITLESS_TRACK=0: hashes only)",
                Delta::Restored => " (after restore --track of the full image)",
            },
            limitless::util::bytes(full),
            limitless::util::bytes(delta),
            delta as f64 * 100.0 / full as f64,
            limitless::util::bytes(unchanged * 4096),
        );
    }
    println!(
        "no overhead while running, factors (about 1 s), {OVERHEAD_RUNS} alternating runs, medians: plain {plain_wall:.1} ms wall / {plain_cpu:.1} ms CPU; under the engine {engine_wall:.1} ms wall / {engine_cpu:.1} ms CPU ({:+.2} % wall, {:+.2} % CPU)",
        (engine_wall / plain_wall - 1.0) * 100.0,
        (engine_cpu / plain_cpu - 1.0) * 100.0
    );
    let locks: Vec<String> =
        locks.iter().map(|(name, p, e)| format!("{name} {p:.2} / {e:.2} ns ({:+.0} %)", (e / p - 1.0) * 100.0)).collect();
    println!("locking, plain / under the engine, {LOCK_RUNS} alternating runs, medians: {}", locks.join(", "));
    let _ = std::fs::remove_dir_all(&dir);
}

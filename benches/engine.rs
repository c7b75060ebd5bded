//! Figures of the checkpoint engine: checkpoint time, time the program is frozen, image
//! size and restore time, for processes of 1 MiB and 1 GiB (random contents), 1 GiB of
//! touched-but-zero memory and 1 GiB of text-like memory (compressible to about half),
//! checkpointed and stopped, without compression and with it ("zstd", `dump --compress`),
//! and checkpointed with `--leave-running` (a copy-on-write snapshot); and a delta image
//! (`dump --parent`) of a 1 GiB process that rewrote 1 % of its heap. Beside them, the machine's reference
//! figures in the same run: `dd if=/dev/zero of=DIR/f bs=1M count=1024 conv=fdatasync` in
//! the image directory, and `cat` of that 1 GiB page-cached file to /dev/null; the table
//! gives checkpoint / dd and restore / cat for the 1 GiB rows.
//!
//! Run with `cargo bench --bench engine`; each figure is the median of three runs. The
//! images go to $LIMITLESS_BENCH_DIR (default: the system temporary directory).

use limitless::engine::checkpoint::{After, Request};
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
    snapshot: bool,
}

fn one(prog: &Path, dir: &Path, mib: u64, kind: &str, after: After, compress: bool) -> Run {
    let opts = Options { socket: None, carry: Default::default() };
    let mut args = vec![mib.to_string().into(), kind.into()];
    if after == After::Resume {
        args.push("tick".into());
    }
    let sup = Supervisor::launch(prog, &args, &opts).expect("launch");
    assert!(sup.wait_ready(Duration::from_secs(30)), "agent did not start");
    // The program prints READY when its memory is filled; wait for its output to flow.
    let t = Instant::now();
    while sup.inner.out.bytes.load(Ordering::Relaxed) == 0 {
        assert!(t.elapsed() < Duration::from_secs(120), "program did not get ready");
        std::thread::sleep(Duration::from_millis(5));
    }
    let img = dir.join("bench.img");
    let stats = sup
        .inner
        .checkpoint(&Request {
            output: img.clone(),
            after,
            freeze_timeout: Duration::from_secs(10),
            wait_idle: Duration::ZERO,
            parent: None,
            compress,
            self_contained: false,
        })
        .expect("checkpoint");
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
    let (sup2, rs) = restore(&img, &Options { socket: None, carry: Default::default() }).expect("restore");
    sup2.inner.kill();
    let _ = sup2.wait();
    let _ = std::fs::remove_file(&img);
    Run {
        image_bytes: stats.image_bytes,
        checkpoint_ms: stats.total_ms,
        frozen_ms: stats.frozen_ms,
        seen_ms,
        restore_ms: rs.total_ms,
        snapshot: stats.snapshot,
    }
}

/// Incremental checkpoints: `churn 1024` (it rewrites the same 1 % of its 1 GiB heap every
/// 300 ms), a full leave-running image, then a delta on top of it a second later.
/// Returns (full bytes, full ms, delta bytes, delta ms, restore of the delta ms).
fn incremental(dir: &Path) -> (u64, f64, u64, f64, f64) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/programs/churn.c");
    let churn = dir.join("churn");
    assert!(Command::new("gcc").args(["-O2", "-o"]).arg(&churn).arg(&src).status().expect("gcc").success());
    let opts = Options { socket: None, carry: Default::default() };
    let sup = Supervisor::launch(&churn, &["1024".into(), "100000".into(), "300".into()], &opts).expect("launch");
    assert!(sup.wait_ready(Duration::from_secs(30)), "agent did not start");
    let t = Instant::now();
    while sup.inner.out.bytes.load(Ordering::Relaxed) == 0 {
        assert!(t.elapsed() < Duration::from_secs(120), "churn did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (full, delta) = (dir.join("full.img"), dir.join("delta.img"));
    let req = |output: &Path, parent: Option<PathBuf>| Request {
        output: output.to_path_buf(),
        after: After::Resume,
        freeze_timeout: Duration::from_secs(10),
        wait_idle: Duration::ZERO,
        parent,
        compress: false,
        self_contained: false,
    };
    let a = sup.inner.checkpoint(&req(&full, None)).expect("full checkpoint");
    std::thread::sleep(Duration::from_secs(1));
    let b = sup.inner.checkpoint(&req(&delta, Some(full.clone()))).expect("delta checkpoint");
    sup.inner.kill();
    let _ = sup.wait();
    let (r, rs) = restore(&delta, &opts).expect("restore of the delta");
    r.inner.kill();
    let _ = r.wait();
    let _ = std::fs::remove_file(&full);
    let _ = std::fs::remove_file(&delta);
    (a.image_bytes, a.total_ms, b.image_bytes, b.total_ms, rs.total_ms)
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

/// (dd of 1 GiB with fdatasync into `dir`, cat of that page-cached file), medians of three.
fn reference(dir: &Path) -> (f64, f64) {
    let f = dir.join("f");
    let f = f.display();
    let dd: Vec<f64> = (0..3).map(|_| timed(&format!("dd if=/dev/zero of={f} bs=1M count=1024 conv=fdatasync"))).collect();
    timed(&format!("cat {f} > /dev/null")); // into the page cache, whatever dd left
    let cat: Vec<f64> = (0..3).map(|_| timed(&format!("cat {f} > /dev/null"))).collect();
    let _ = std::fs::remove_file(dir.join("f"));
    (median(dd), median(cat))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let dir = std::env::var_os("LIMITLESS_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("limitless-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench dir");
    let prog = build_mem(&dir);
    let (dd, cat) = reference(&dir);
    let memcpy = memcpy_ms();
    let mut rows = Vec::new();
    for (mib, kind, after, compress, label) in [
        (1, "random", After::Kill, false, "stop, 1 MiB random"),
        (1, "random", After::Kill, true, "stop, 1 MiB random, zstd"),
        (1024, "random", After::Kill, false, "stop, 1 GiB random"),
        (1024, "random", After::Kill, true, "stop, 1 GiB random, zstd"),
        (1024, "zero", After::Kill, false, "stop, 1 GiB zeros"),
        (1024, "text", After::Kill, false, "stop, 1 GiB text"),
        (1024, "text", After::Kill, true, "stop, 1 GiB text, zstd"),
        (1, "random", After::Resume, false, "leave-running, 1 MiB random"),
        (1024, "random", After::Resume, false, "leave-running, 1 GiB random"),
        (1024, "text", After::Resume, true, "leave-running, 1 GiB text, zstd"),
    ] {
        let runs: Vec<Run> = (0..3).map(|_| one(&prog, &dir, mib, kind, after, compress)).collect();
        rows.push((label, mib, runs));
    }
    let inc = incremental(&dir);
    println!();
    println!("images in {}", dir.display());
    println!("dd if=/dev/zero of=DIR/f bs=1M count=1024 conv=fdatasync: {dd:.1} ms; cat of that 1 GiB page-cached file to /dev/null: {cat:.1} ms; memcpy of 1 GiB: {memcpy:.1} ms");
    println!(
        "{:<30} {:>10} {:>14} {:>10} {:>12} {:>11} {:>8} {:>12} {:>9}",
        "process", "image", "checkpoint ms", "frozen ms", "seen gap ms", "restore ms", "ckpt/dd", "restore/cat", "snapshot"
    );
    for (label, mib, runs) in rows {
        let ck = median(runs.iter().map(|r| r.checkpoint_ms).collect());
        let rs = median(runs.iter().map(|r| r.restore_ms).collect());
        let seen = runs.iter().map(|r| r.seen_ms).collect::<Option<Vec<f64>>>().map(median);
        let ratio = |v: f64, r: f64| if mib == 1024 { format!("{:.2}", v / r) } else { "-".into() };
        println!(
            "{:<30} {:>10} {:>14.1} {:>10.1} {:>12} {:>11.1} {:>8} {:>12} {:>9}",
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
        );
    }
    let (full, full_ms, delta, delta_ms, delta_restore_ms) = inc;
    println!();
    println!(
        "incremental, churn 1 GiB (1 % rewritten): full image {} in {full_ms:.1} ms; a delta 1 s later {} ({:.2} % of the full) in {delta_ms:.1} ms; restore of the delta {delta_restore_ms:.1} ms",
        limitless::util::bytes(full),
        limitless::util::bytes(delta),
        delta as f64 * 100.0 / full as f64
    );
    let _ = std::fs::remove_dir_all(&dir);
}

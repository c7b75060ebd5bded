//! First figures of the checkpoint engine: checkpoint time, time the program is frozen,
//! image size and restore time, for processes of 1 MiB and 1 GiB (random contents) and
//! 1 GiB of touched-but-zero memory. Run with `cargo bench --bench engine`; each figure is
//! the median of three runs. The image goes to $LIMITLESS_BENCH_DIR (default: the
//! system temporary directory).

use limitless::engine::checkpoint::Request;
use limitless::engine::restore::restore;
use limitless::engine::supervisor::{Options, Supervisor};
use std::path::{Path, PathBuf};
use std::process::Command;
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
    restore_ms: f64,
}

fn one(prog: &Path, dir: &Path, mib: u64, kind: &str) -> Run {
    let opts = Options { socket: None, carry: Default::default() };
    let sup = Supervisor::launch(prog, &[mib.to_string().into(), kind.into()], &opts).expect("launch");
    assert!(sup.wait_ready(Duration::from_secs(30)), "agent did not start");
    // The program prints READY when its memory is filled; wait for its output to flow.
    let t = Instant::now();
    while sup.inner.out.bytes.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(t.elapsed() < Duration::from_secs(120), "program did not get ready");
        std::thread::sleep(Duration::from_millis(5));
    }
    let img = dir.join("bench.img");
    let stats = sup
        .inner
        .checkpoint(&Request {
            output: img.clone(),
            after: limitless::engine::checkpoint::After::Kill,
            freeze_timeout: Duration::from_secs(10),
            wait_idle: Duration::ZERO,
        })
        .expect("checkpoint");
    sup.wait().expect("wait");
    // Restore from a cold-ish page cache is not what we measure: the image was just written.
    let (sup2, rs) = restore(&img, &Options { socket: None, carry: Default::default() }).expect("restore");
    sup2.inner.kill();
    let _ = sup2.wait();
    let _ = std::fs::remove_file(&img);
    Run { image_bytes: stats.image_bytes, checkpoint_ms: stats.total_ms, frozen_ms: stats.frozen_ms, restore_ms: rs.total_ms }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
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
    println!("{:<22} {:>12} {:>14} {:>11} {:>12}", "process", "image", "checkpoint ms", "frozen ms", "restore ms");
    for (mib, kind, label) in [(1, "random", "1 MiB random"), (1024, "random", "1 GiB random"), (1024, "zero", "1 GiB touched zeros")] {
        let runs: Vec<Run> = (0..3).map(|_| one(&prog, &dir, mib, kind)).collect();
        let img = runs[0].image_bytes;
        println!(
            "{:<22} {:>12} {:>14.1} {:>11.1} {:>12.1}",
            label,
            limitless::util::bytes(img),
            median(runs.iter().map(|r| r.checkpoint_ms).collect()),
            median(runs.iter().map(|r| r.frozen_ms).collect()),
            median(runs.iter().map(|r| r.restore_ms).collect()),
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

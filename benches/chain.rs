//! `limitless run --limit 10s` on workloads that take about a minute uninterrupted:
//! total wall time against the uninterrupted run (goal: at most 1.05), steps, time spent
//! checkpointing and restoring. Because the machine is noisy, it also prints the chain's
//! own overhead measured inside the one run: (chain wall time - time the program ran in
//! its steps) / time the program ran. Run with `cargo bench --bench chain`; set
//! LIMITLESS_BENCH_ONLY=name to run one workload. Sizes are for the benchmark machine
//! (examples/README.md).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let ex = root.join("examples");
    assert!(Command::new("make").arg("-s").arg("-C").arg(&ex).status().expect("make").success());
    let lim = env!("CARGO_BIN_EXE_limitless");
    let dir = std::env::temp_dir().join(format!("limitless-bench-chain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let only = std::env::var("LIMITLESS_BENCH_ONLY").ok();
    let workloads: Vec<(&str, Vec<String>)> = vec![
        ("factors (C)", vec![ex.join("bin/factors").display().to_string(), "1200000000000000000".into(), "15".into()]),
        ("matrix (C)", vec![ex.join("bin/matrix").display().to_string(), "2200".into()]),
        ("factors (Python)", vec!["python3".into(), ex.join("factors.py").display().to_string(), "1200000000000000000".into()]),
        ("matrix (Python)", vec!["python3".into(), ex.join("matrix.py").display().to_string(), "720".into()]),
    ];
    println!(
        "{:<18} {:>8} {:>8} {:>6} {:>9} {:>6} {:>12} {:>10} {:>10}",
        "workload", "plain s", "chain s", "ratio", "overhead", "steps", "checkpoint s", "restore s", "max image"
    );
    for (name, argv) in workloads {
        if only.as_deref().is_some_and(|o| !name.contains(o)) {
            continue;
        }
        let t = Instant::now();
        let plain = Command::new(&argv[0]).args(&argv[1..]).stdout(Stdio::piped()).output().expect("plain run");
        let plain_s = t.elapsed().as_secs_f64();
        assert!(plain.status.success());
        let report = dir.join("report.json");
        let t = Instant::now();
        let o = Command::new(lim)
            .args(["run", "--limit", "10s", "--store"])
            .arg(dir.join("store"))
            .arg("--report")
            .arg(&report)
            .arg("--")
            .args(&argv)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .expect("limitless run");
        let chain_s = t.elapsed().as_secs_f64();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(o.stdout, plain.stdout, "{name}: output differs");
        let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        let t = &r["totals"];
        let ran_ms: f64 = r["steps"].as_array().unwrap().iter().map(|s| s["run_ms"].as_f64().unwrap_or(0.0)).sum();
        println!(
            "{:<18} {:>8.1} {:>8.1} {:>6.3} {:>8.1}% {:>6} {:>12.2} {:>10.2} {:>10}",
            name,
            plain_s,
            chain_s,
            chain_s / plain_s,
            (chain_s * 1000.0 - ran_ms) / ran_ms * 100.0,
            t["steps"],
            t["checkpoint_ms"].as_f64().unwrap_or(0.0) / 1000.0,
            t["restore_ms"].as_f64().unwrap_or(0.0) / 1000.0,
            limitless::util::bytes(t["largest_image_bytes"].as_u64().unwrap_or(0))
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

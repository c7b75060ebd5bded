//! Engine breadth: the kernel objects real programs hold, and real runtimes (CPython with
//! numpy and a multi-threaded OpenBLAS, C++, Node.js, Java on HotSpot), each checkpointed,
//! killed and restored with output identical to an uninterrupted run, as uid 65534 and
//! as root. The runtimes are installed by the test command (scripts/test.sh); a test whose
//! runtime is missing fails and says what to install.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

#[test]
fn pipes_eventfds_timerfd_signalfd_and_epoll_keep_their_state() {
    stop_and_restore("kobjects", &[], "go\n");
}

fn need(tool: &str, hint: &str) -> PathBuf {
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).chain([PathBuf::from("/usr/bin")]) {
        let p = dir.join(tool);
        if p.is_file() && !p.starts_with("/root") {
            return p;
        }
    }
    panic!("{tool} is needed for this test: {hint} (scripts/test.sh installs it)");
}

fn source(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/programs").join(name)
}

/// A copy of a test source in a world-readable place (the checkout may be private).
fn shared_copy(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join("limitless-tests").join(format!("src-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let _ = Command::new("chmod").arg("755").arg(&dir).status();
    let dst = dir.join(name);
    std::fs::copy(source(name), &dst).unwrap();
    let _ = Command::new("chmod").arg("644").arg(&dst).status();
    dst
}

fn python() -> PathBuf {
    // The system Python (/usr/bin/python3), whose numpy and OpenBLAS come from Debian.
    let p = PathBuf::from("/usr/bin/python3");
    assert!(p.is_file(), "/usr/bin/python3 is needed: apt install python3");
    p
}

#[test]
fn cpython_pure_loop() {
    let script = shared_copy("rt_loop.py");
    stop_and_restore_prog("py-loop", &python(), &[script.to_str().unwrap()], "", "READY");
}

#[test]
fn cpython_numpy_with_a_multithreaded_openblas() {
    let ok = Command::new(python()).args(["-c", "import numpy"]).status().map(|s| s.success()).unwrap_or(false);
    assert!(ok, "numpy is needed: apt install python3-numpy libopenblas0-pthread");
    let script = shared_copy("rt_numpy.py");
    stop_and_restore_prog("py-numpy", &python(), &[script.to_str().unwrap()], "", "READY");
    // The image held OpenBLAS's worker threads, not just the interpreter's.
    let u = users()[0];
    let d = workdir("py-numpy-threads", u);
    let r = launch(u, &d, &python(), &[script.to_str().unwrap()]);
    r.expect_out("READY");
    let img = d.join("image");
    dump_ok(u, &r, &img, false);
    let _ = r.finish();
    let o = command(u, limitless()).args(["inspect", "--json", "--no-verify"]).arg(&img).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let threads = v["threads"].as_array().unwrap().len();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    assert!(threads >= 1 + cpus.min(2), "main + OpenBLAS workers + agent expected, image has {threads} threads");
}

#[test]
fn cpython_open_files_and_a_thread_pool() {
    let script = shared_copy("rt_files_pool.py");
    stop_and_restore_prog("py-files", &python(), &[script.to_str().unwrap()], "", "READY");
}

#[test]
fn cplusplus_threads_iostreams_and_exceptions() {
    let gxx = need("g++", "apt install g++");
    let out = std::env::temp_dir().join("limitless-tests").join(format!("rt_cpp-{}", std::process::id()));
    let st = Command::new(gxx).args(["-O1", "-pthread", "-o"]).arg(&out).arg(source("rt_cpp.cc")).status().unwrap();
    assert!(st.success());
    let _ = Command::new("chmod").arg("755").arg(&out).status();
    stop_and_restore_prog("cpp", &out, &[], "", "READY");
}

#[test]
fn nodejs_timers_promises_and_the_thread_pool() {
    let node = need("node", "apt install nodejs");
    let script = shared_copy("rt_node.js");
    stop_and_restore_prog("node", &node, &[script.to_str().unwrap()], "", "READY");
}

#[test]
fn java_on_hotspot_with_many_threads() {
    let javac = need("javac", "apt install openjdk-17-jdk-headless");
    let java = need("java", "apt install openjdk-17-jdk-headless");
    let dir = std::env::temp_dir().join("limitless-tests").join(format!("java-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let st = Command::new(javac).arg("-d").arg(&dir).arg(source("RtJava.java")).status().unwrap();
    assert!(st.success());
    let _ = Command::new("chmod").arg("-R").arg("a+rX").arg(&dir).status();
    // The JVM's perf-data file lives in /tmp/hsperfdata_<user>/<pid>; it stays there after the
    // original is killed, so the restore finds it mapped where it was.
    stop_and_restore_prog("java", &java, &["-cp", dir.to_str().unwrap(), "RtJava"], "", "READY");
}

//! Engine breadth: the kernel objects real programs hold, and real runtimes (CPython with
//! numpy and a multi-threaded OpenBLAS, C++, Rust, Perl, Ruby, PHP, Node.js, Java on
//! HotSpot), each checkpointed, killed and restored with output identical to an
//! uninterrupted run, as uid 65534 and as root. The runtimes are installed by the test command (scripts/test.sh); a test whose
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

/// Runs the script `script` (in tests/programs) with the interpreter `tool`, stopped at its
/// READY and restored.
fn interpreted(name: &str, tool: &str, hint: &str, script: &str) {
    let bin = need(tool, hint);
    let script = shared_copy(script);
    stop_and_restore_prog(name, &bin, &[script.to_str().unwrap()], "", "READY");
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
    assert!(threads > cpus.min(2), "main + OpenBLAS workers + agent expected, image has {threads} threads");
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
fn rust_std_threads_channels_and_a_caught_panic() {
    let out = std::env::temp_dir().join("limitless-tests").join(format!("rt_rust-{}", std::process::id()));
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let st = Command::new("rustc").args(["-O", "--edition", "2021", "-o"]).arg(&out).arg(source("rt_rust.rs")).status();
    assert!(
        st.map(|s| s.success()).unwrap_or(false),
        "rustc (the Rust toolchain that builds Limitless) must build tests/programs/rt_rust.rs"
    );
    let _ = Command::new("chmod").arg("755").arg(&out).status();
    stop_and_restore_prog("rust", &out, &[], "", "READY");
}

#[test]
fn perl_hashes_regexes_and_closures() {
    interpreted("perl", "perl", "apt install perl", "rt_perl.pl");
}

#[test]
fn ruby_threads_a_queue_and_exceptions() {
    // Ruby's heap keeps every other page in use: thousands of runs of pages, which once
    // made every checkpoint fail (see memory_in_thousands_of_separate_runs_of_pages).
    interpreted("ruby", "ruby", "apt install ruby", "rt_ruby.rb");
}

#[test]
fn php_arrays_regexes_closures_and_exceptions() {
    interpreted("php", "php", "apt install php-cli", "rt_php.php");
}

#[test]
fn nodejs_timers_promises_and_the_thread_pool() {
    // Checkpointed at startup, while OpenSSL 3 sets itself up on the main thread and the
    // first pbkdf2 runs in the thread pool: both take read-write locks for writing, and a
    // restore must hand them back to their holders under their new thread ids (about one
    // restore in fifteen hung here before the agent did; tests/programs/rwlocks.c is the
    // deterministic case).
    interpreted("node", "node", "apt install nodejs", "rt_node.js");
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

#[test]
fn memfd_shared_anonymous_memory_and_deleted_files_keep_contents_and_aliasing() {
    stop_and_restore("shm", &[], "go\n");
}

#[test]
fn shared_file_mappings_prot_none_areas_and_guard_pages() {
    // The reference run prints each guard page as "faults"; a restore that lost them would
    // print the page's contents instead.
    let out = reference_in(&program("memkinds"), &[], "go\n", &workdir("memkinds-probe", User::Root));
    assert!(out.contains("guard area page 3: faults"), "this kernel lacks MADV_GUARD_INSTALL (Linux 6.13+): {out}");
    stop_and_restore("memkinds", &[], "go\n");
}

#[test]
fn carried_scratch_files_and_written_files_come_back_in_a_fresh_container() {
    let prog = program("scratch");
    let refdir = workdir("scratch-ref", User::Root);
    let want = reference_in(&prog, &[], "go\n", &refdir);
    each_user("scratch", |u, d| {
        // Without --carry the files are gone and the restore says which one it misses.
        let r = launch(u, d, &prog, &[]);
        r.expect_out("READY");
        let img = d.join("plain.img");
        dump_ok(u, &r, &img, false);
        let _ = r.finish();
        let _ = std::fs::remove_dir_all(d.join("scratch"));
        let _ = std::fs::remove_file(d.join("written.log"));
        let (st, _, err) = restore(u, d, &img).finish();
        assert_eq!(st.code(), Some(125));
        assert!(err.contains("written.log"), "{err}");
        // With --carry the image holds them, and the restore writes them back first.
        let socket = d.join("carry.sock");
        let mut c = command(u, limitless());
        c.arg("launch").arg("--socket").arg(&socket).args(["--carry", "scratch", "--carry-written", "--"]).arg(&prog).current_dir(d);
        c.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
        let mut child = c.spawn().unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        std::io::BufRead::read_line(&mut out, &mut first).unwrap();
        assert_eq!(first, "READY\n");
        let img = d.join("carry.img");
        let (ok, err) = dump(u, &socket, &img, false);
        assert!(ok, "{err}");
        let _ = child.wait();
        std::fs::remove_dir_all(d.join("scratch")).unwrap();
        std::fs::remove_file(d.join("written.log")).unwrap();
        let mut r = restore(u, d, &img);
        r.send("go\n");
        let (st, out2, err2) = r.finish();
        assert_eq!(st.code(), Some(0), "{err2}");
        assert_eq!(lines(&(first + &out2)), lines(&want));
    });
}

fn free_port() -> u16 {
    loop {
        let p = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if p < 65000 && std::net::UdpSocket::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
}

#[test]
fn listeners_are_bound_again_and_connections_come_back_closed() {
    let prog = program("sockets");
    each_user("sockets", |u, d| {
        let port = free_port().to_string();
        let r = launch(u, d, &prog, &[&port]);
        r.expect_out("READY");
        let img = d.join("image");
        dump_ok(u, &r, &img, false);
        let (st, out1, _) = r.finish();
        assert_eq!(st.code(), Some(EXIT_CHECKPOINTED));
        let mut r2 = restore(u, d, &img);
        r2.send("go\n");
        let (st2, out2, err2) = r2.finish();
        assert_eq!(st2.code(), Some(0), "{err2}");
        // (An uninterrupted run would wait on its own open connection: this program is
        // only meaningful across a restore.)
        assert_eq!(
            lines(&(out1 + &out2)),
            vec!["READY", "old connection after restore: closed (EOF)", "new connection: hello again", "udp bound again: 1"]
        );
    });
}

#[test]
fn wait_idle_freezes_once_connections_close() {
    let prog = program("sockets");
    let u = users()[0];
    let d = workdir("wait-idle", u);
    let port = free_port();
    let mut r = launch(u, &d, &prog, &[&port.to_string(), "serve"]);
    r.expect_out("READY");
    // A client holds a connection for 400 ms; the checkpoint waits for it (up to 5 s).
    let client = std::thread::spawn(move || {
        let c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(400));
        drop(c);
    });
    std::thread::sleep(std::time::Duration::from_millis(50));
    let img = d.join("image");
    let t = std::time::Instant::now();
    let (ok, err) = dump_with(u, &r.socket, &img, &["--leave-running", "--wait-idle", "5s"]);
    let took = t.elapsed();
    assert!(ok, "{err}");
    assert!(
        took >= std::time::Duration::from_millis(250) && took < std::time::Duration::from_secs(4),
        "the checkpoint took {took:?}: it should wait for the connection and not much longer"
    );
    client.join().unwrap();
    // With a connection that stays open, the wait ends at its bound and the checkpoint is taken.
    let hold = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let t = std::time::Instant::now();
    let (ok, err) = dump_with(u, &r.socket, &img, &["--leave-running", "--wait-idle", "300ms"]);
    assert!(ok && t.elapsed() >= std::time::Duration::from_millis(300), "{err}");
    drop(hold);
    r.send("go\n");
    let (st, out, _) = r.finish();
    assert_eq!(st.code(), Some(0));
    assert!(out.contains("new connection: hello again"), "{out}");
}

//! The S3 store against a real S3 server: `s3s-fs` (installed by scripts/test.sh) on
//! 127.0.0.1, a fresh bucket directory per test. Store-level tests (round trips, tampering,
//! wrong key, outages, gc) call the library; chain tests run `limitless run --store s3://`.

mod common;

use common::s3::Server;
use common::*;
use limitless::store::{self, gc, Store};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const KEY: &str = "test-key-0123456789abcdef";

/// The process environment is global: tests that open stores in-process take turns.
static ENV: Mutex<()> = Mutex::new(());

/// Opens `s3://bkt/PREFIX` in-process with the server's settings and `key`.
fn open(srv: &Server, prefix: &str, key: Option<&str>) -> anyhow::Result<std::sync::Arc<dyn Store>> {
    for (k, v) in srv.env() {
        std::env::set_var(k, v);
    }
    match key {
        Some(k) => std::env::set_var("LIMITLESS_KEY", k),
        None => std::env::remove_var("LIMITLESS_KEY"),
    }
    for k in ["LIMITLESS_INSECURE_STORE", "AWS_SKIP_SIGNATURE", "LIMITLESS_S3_CONDITIONAL"] {
        std::env::remove_var(k);
    }
    store::open(&format!("s3://bkt/{prefix}"))
}

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn staged(s: &dyn Store, bytes: &[u8]) -> PathBuf {
    let p = s.staging_path("test").unwrap();
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn images_round_trip_in_chunks_and_a_changed_image_uploads_only_its_changes() {
    let _g = ENV.lock().unwrap_or_else(|e| e.into_inner());
    let srv = Server::start("roundtrip");
    let s = open(&srv, "p", Some(KEY)).unwrap();
    // 128 MiB: random, with a zero run (compressible).
    let mut img = random_bytes(128 << 20, 7);
    img[4 << 20..6 << 20].fill(0);
    let first = s.put_file("images/c/1.0.img", &staged(&*s, &img)).unwrap();
    assert!(first < img.len() as u64 && first > (img.len() as u64) * 3 / 4, "first upload sent {first} bytes of {}", img.len());
    let back = std::fs::read(s.fetch_file("images/c/1.0.img").unwrap().unwrap()).unwrap();
    assert!(back == img, "the image read back differs");
    // Change 1 % in one place.
    let n = img.len();
    for b in &mut img[n / 2..n / 2 + n / 100] {
        *b ^= 0x5a;
    }
    let second = s.put_file("images/c/2.0.img", &staged(&*s, &img)).unwrap();
    assert!(second * 100 <= first * 3, "the second upload sent {second} bytes, more than 3 % of the first ({first})");
    let back = std::fs::read(s.fetch_file("images/c/2.0.img").unwrap().unwrap()).unwrap();
    assert!(back == img, "the second image read back differs");
    // Insert a page (everything after it shifts): content-defined chunks find their
    // boundaries again after a few chunks.
    img.splice(3 << 20..3 << 20, random_bytes(4096, 9));
    let third = s.put_file("images/c/3.0.img", &staged(&*s, &img)).unwrap();
    assert!(third * 100 <= first * 3, "after an insertion the upload sent {third} bytes, more than 3 % of the first ({first})");
    let back = std::fs::read(s.fetch_file("images/c/3.0.img").unwrap().unwrap()).unwrap();
    assert!(back == img, "the third image read back differs");
    let pct = |x: u64| x as f64 * 100.0 / first as f64;
    eprintln!(
        "first upload {first} bytes, after a 1 % change {second} ({:.2} %), after an insertion {third} ({:.2} %)",
        pct(second),
        pct(third)
    );
}

/// `limitless run --limit LIMIT --store s3://bkt/PREFIX -- ARGS` with the server's settings.
fn run_chain(
    srv: &Server,
    prefix: &str,
    limit: &str,
    args: &[&str],
    extra: &[(&str, &str)],
) -> (Option<i32>, String, String, serde_json::Value) {
    run_chain_limited(srv, prefix, limit, args, extra, None)
}

/// [`run_chain`], with no file larger than `max_file` bytes writable (RLIMIT_FSIZE: a
/// larger write fails and SIGXFSZ kills the writer).
fn run_chain_limited(
    srv: &Server,
    prefix: &str,
    limit: &str,
    args: &[&str],
    extra: &[(&str, &str)],
    max_file: Option<u64>,
) -> (Option<i32>, String, String, serde_json::Value) {
    let dir = std::env::temp_dir().join("limitless-tests").join(format!("s3run-{prefix}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let report = dir.join("report.json");
    let _ = std::fs::remove_file(&report);
    let mut c = Command::new(limitless());
    c.args(["run", "--limit", limit, "--store", &format!("s3://bkt/{prefix}"), "--report"]).arg(&report).arg("--").args(args);
    c.env_remove("LIMITLESS_KEY").env_remove("LIMITLESS_INSECURE_STORE");
    for (k, v) in srv.env() {
        c.env(k, v);
    }
    for (k, v) in extra {
        c.env(k, v);
    }
    if let Some(n) = max_file {
        use std::os::unix::process::CommandExt;
        // SAFETY: setrlimit is async-signal-safe and touches only the child.
        unsafe {
            c.pre_exec(move || {
                let l = libc::rlimit { rlim_cur: n, rlim_max: n };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &l) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let o = c.stdin(Stdio::null()).output().expect("limitless run");
    let rep = std::fs::read(&report).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or(serde_json::Value::Null);
    (o.status.code(), String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned(), rep)
}

/// A chain through S3 whose program writes 1 % of its 128 MiB heap per iteration, then
/// from iteration 36 on (about 20 s in, past the fourth step) rewrites all of it: the checkpoints in between upload only what
/// changed and take the rest from the previous image unread; once the program writes
/// everything, the margin follows (the checkpoints store everything) and no step overruns
/// its limit more than once.
#[test]
fn a_chain_through_s3_uploads_only_changes_until_the_program_writes_everything() {
    let srv = Server::start("chain");
    let churn = program("churn");
    let churn = churn.to_str().unwrap();
    let args = [churn, "128", "44", "500", "random", "36"];
    let want = reference(Path::new(churn), &args[1..], "");
    // Images stream to and from the store: no file anywhere near an image's size (128 MiB)
    // may be written.
    let max_file = 16 << 20;
    let (code, out, err, rep) = run_chain_limited(&srv, "chain", "6s", &args, &[("LIMITLESS_KEY", KEY)], Some(max_file));
    assert_eq!(code, Some(0), "stderr: {err}");
    assert_eq!(out, want, "output differs from an uninterrupted run; stderr: {err}");
    let steps = rep["steps"].as_array().expect("report steps");
    let sent: Vec<u64> = steps.iter().filter_map(|s| s["stored_bytes"].as_u64()).collect();
    let imgs: Vec<u64> = steps.iter().filter_map(|s| s["image_bytes"].as_u64()).collect();
    let copied: Vec<u64> = steps.iter().filter_map(|s| s["copied_bytes"].as_u64()).collect();
    eprintln!("image bytes per checkpoint: {imgs:?}; bytes uploaded: {sent:?}; bytes copied from the previous image unread: {copied:?}");
    assert!(steps.len() >= 5, "{} steps; stderr: {err}", steps.len());
    assert_eq!(copied.len(), sent.len(), "{copied:?}");
    // Each step after the first restores with dirty tracking armed, and its checkpoint
    // takes the memory the program did not write (most of it) from the previous image's
    // chunks without reading it, until the program writes all of it.
    let tracked: Vec<bool> = copied.iter().zip(&imgs).map(|(&c, &n)| c * 10 >= n * 9).collect();
    let cheap = tracked.iter().skip(1).take_while(|&&t| t).count();
    assert!(
        cheap >= 3,
        "only {cheap} checkpoints took 90 % of their image from the previous one unread: {copied:?} of {imgs:?} (dirty tracking needs Linux 6.7+ and userfaultfd)"
    );
    for (i, &s) in sent.iter().enumerate().skip(1).take(cheap) {
        assert!(s * 100 <= sent[0] * 3, "checkpoint {} uploaded {s} bytes, more than 3 % of the first ({})", i + 1, sent[0]);
    }
    let full = &tracked[1 + cheap..];
    assert!(!full.is_empty() && full.iter().all(|&t| !t), "after the program started rewriting all its memory: {copied:?} of {imgs:?}");
    // (The first of these may have frozen the program halfway through its first rewrite.)
    for (i, (&s, &n)) in sent.iter().zip(&imgs).enumerate().skip(2 + cheap) {
        assert!(s * 10 >= n * 9, "checkpoint {} uploaded {s} bytes of an image of {n}, after the program rewrote all of it", i + 1);
    }
    // A step whose program starts writing everything just before its checkpoint may
    // overrun once; its next attempt keeps the margin of storing everything.
    let retried = steps.iter().filter(|s| s["attempt"].as_u64() != Some(0)).count();
    assert!(retried <= 1, "{retried} steps were attempted again; stderr: {err}");
    // Objects in the store are sealed: the spec ends with the MAC marker.
    let chain = std::fs::read_dir(srv.root.join("bkt/chain/chains")).unwrap().next().unwrap().unwrap().path();
    assert!(std::fs::read(chain.join("spec")).unwrap().ends_with(b"LMAC"), "the spec is not sealed");
}

#[test]
fn a_shared_store_without_a_key_is_refused_unless_insecure_is_asked_for() {
    let srv = Server::start("nokey");
    let echo = ["/bin/echo", "hello"];
    let (code, out, err, _) = run_chain(&srv, "nokey", "5s", &echo, &[]);
    assert_eq!(code, Some(125), "stderr: {err}");
    assert!(out.is_empty());
    let line = err.trim_end();
    assert!(!line.contains('\n') && line.contains("LIMITLESS_KEY") && line.contains("LIMITLESS_INSECURE_STORE=1"), "{err}");
    let (code, out, err, _) = run_chain(&srv, "nokey", "5s", &echo, &[("LIMITLESS_INSECURE_STORE", "1")]);
    assert_eq!((code, out.as_str()), (Some(0), "hello\n"), "stderr: {err}");
    // And a short key is refused with the reason.
    let (code, _, err, _) = run_chain(&srv, "nokey", "5s", &echo, &[("LIMITLESS_KEY", "short")]);
    assert_eq!(code, Some(125));
    assert!(err.contains("at least 16"), "{err}");
}

#[test]
fn tampered_chunks_and_manifests_and_a_wrong_key_are_refused_and_nothing_is_lost() {
    let _g = ENV.lock().unwrap_or_else(|e| e.into_inner());
    let srv = Server::start("tamper");
    let s = open(&srv, "t", Some(KEY)).unwrap();
    assert_eq!(store_conditional(&srv), "Enforced", "s3s-fs enforces If-None-Match");
    let img = random_bytes(3 << 20, 11);
    s.put_file("images/c/1.0.img", &staged(&*s, &img)).unwrap();
    assert!(s.put_if_absent("chains/c/step-1.manifest", b"{\"step\":1}").unwrap());
    assert!(!s.put_if_absent("chains/c/step-1.manifest", b"{\"step\":2}").unwrap(), "create-if-absent overwrote");
    // A wrong key: every sealed object is refused.
    let wrong = open(&srv, "t", Some("another-key-0123456789")).unwrap();
    let e = format!("{:#}", wrong.get("chains/c/step-1.manifest").unwrap_err());
    assert!(e.contains("does not verify") && e.contains("LIMITLESS_KEY"), "{e}");
    let e = format!("{:#}", wrong.fetch_file("images/c/1.0.img").unwrap_err());
    assert!(e.contains("does not verify"), "{e}");
    // A tampered manifest (one byte of the JSON), then restored.
    let mf = srv.file("t", "chains/c/step-1.manifest");
    let orig = std::fs::read(&mf).unwrap();
    let mut bad = orig.clone();
    bad[3] ^= 0x01;
    std::fs::write(&mf, &bad).unwrap();
    let e = format!("{:#}", s.get("chains/c/step-1.manifest").unwrap_err());
    assert!(e.contains("does not verify") && e.contains("tampered"), "{e}");
    std::fs::write(&mf, &orig).unwrap();
    assert_eq!(s.get("chains/c/step-1.manifest").unwrap().unwrap(), b"{\"step\":1}");
    // A tampered chunk (the same length, one byte changed).
    let chunks = s.chunks_of("images/c/1.0.img").unwrap().unwrap();
    let cf = srv.file("t", &chunks[1]);
    let orig = std::fs::read(&cf).unwrap();
    let mut bad = orig.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x80;
    std::fs::write(&cf, &bad).unwrap();
    let e = format!("{:#}", s.fetch_file("images/c/1.0.img").unwrap_err());
    assert!(e.contains(&chunks[1]) && e.contains("tampered"), "{e}");
    // A truncated chunk.
    std::fs::write(&cf, &orig[..orig.len() / 2]).unwrap();
    assert!(s.fetch_file("images/c/1.0.img").is_err());
    // A missing chunk.
    std::fs::remove_file(&cf).unwrap();
    let e = format!("{:#}", s.fetch_file("images/c/1.0.img").unwrap_err());
    assert!(e.contains("missing"), "{e}");
    // Nothing lost: put the chunk back and the image reads back whole.
    std::fs::write(&cf, &orig).unwrap();
    assert!(std::fs::read(s.fetch_file("images/c/1.0.img").unwrap().unwrap()).unwrap() == img);
}

fn store_conditional(srv: &Server) -> &'static str {
    for (k, v) in srv.env() {
        std::env::set_var(k, v);
    }
    match limitless::store::S3Store::open("s3://bkt/probe", limitless::store::seal::Sealer::from_env().unwrap(), &[]).unwrap().conditional()
    {
        limitless::store::s3::Conditional::Enforced => "Enforced",
        limitless::store::s3::Conditional::Emulated => "Emulated",
    }
}

#[test]
fn a_server_stopped_mid_upload_fails_the_upload_clearly_and_keeps_what_was_stored() {
    let _g = ENV.lock().unwrap_or_else(|e| e.into_inner());
    let mut srv = Server::start("outage");
    let s = open(&srv, "o", Some(KEY)).unwrap();
    let old = random_bytes(2 << 20, 3);
    s.put_file("images/c/1.0.img", &staged(&*s, &old)).unwrap();
    let big = staged(&*s, &random_bytes(256 << 20, 5));
    let (root, port) = (srv.root.clone(), srv.port);
    let s2 = s.clone();
    let big2 = big.clone();
    let up = std::thread::spawn(move || s2.put_file("images/c/2.0.img", &big2));
    std::thread::sleep(Duration::from_millis(300));
    srv.stop();
    let t = Instant::now();
    let e = format!("{:#}", up.join().unwrap().expect_err("an upload to a stopped server succeeded"));
    assert!(e.contains(&format!("127.0.0.1:{port}")), "the error does not name the endpoint: {e}");
    assert!(t.elapsed() < Duration::from_secs(60), "the upload took {:?} to give up", t.elapsed());
    let _ = std::fs::remove_file(&big);
    // The server comes back: the earlier image is intact, the failed one does not exist.
    let _srv = Server::start_at(root, port);
    assert!(std::fs::read(s.fetch_file("images/c/1.0.img").unwrap().unwrap()).unwrap() == old);
    assert!(s.fetch_file("images/c/2.0.img").unwrap().is_none());
}

#[test]
fn a_server_that_answers_errors_is_reported_with_the_endpoint() {
    let _g = ENV.lock().unwrap_or_else(|e| e.into_inner());
    // A server that answers every request with 503.
    let port = tcp_server(|mut c| {
        use std::io::{Read, Write};
        let mut buf = [0u8; 65536];
        let _ = c.set_read_timeout(Some(Duration::from_millis(200)));
        let _ = c.read(&mut buf);
        let _ = c.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    });
    let srv = Server { child: Command::new("true").spawn().unwrap(), root: PathBuf::new(), port };
    let t = Instant::now();
    let e = format!("{:#}", open(&srv, "x", Some(KEY)).err().expect("a store on a failing server opened"));
    assert!(e.contains(&format!("127.0.0.1:{port}")) && e.contains("503"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(30), "giving up took {:?}", t.elapsed());
}

#[test]
fn gc_removes_old_chains_and_unnamed_chunks_and_keeps_what_live_chains_need() {
    let _g = ENV.lock().unwrap_or_else(|e| e.into_inner());
    let srv = Server::start("gc");
    let s = open(&srv, "g", Some(KEY)).unwrap();
    let shared = random_bytes(2 << 20, 21);
    let mut old_img = shared.clone();
    old_img.extend(random_bytes(2 << 20, 22));
    let mut live_img = shared.clone();
    live_img.extend(random_bytes(2 << 20, 23));
    s.put("chains/old/spec", b"{}").unwrap();
    s.put_file("images/old/1.0.img", &staged(&*s, &old_img)).unwrap();
    s.put("chains/live/spec", b"{}").unwrap();
    s.put_file("images/live/1.0.img", &staged(&*s, &live_img)).unwrap();
    // An orphan chunk, as left by an image that was deleted.
    s.put_file("images/gone/1.0.img", &staged(&*s, &random_bytes(1 << 20, 24))).unwrap();
    let orphans = s.chunks_of("images/gone/1.0.img").unwrap().unwrap();
    s.delete("images/gone/1.0.img").unwrap();
    let old_chunks = s.chunks_of("images/old/1.0.img").unwrap().unwrap();
    let live_chunks = s.chunks_of("images/live/1.0.img").unwrap().unwrap();
    // Age the old chain and every chunk by two days (s3s-fs reports file times).
    let past = std::time::SystemTime::now() - Duration::from_secs(2 * 86_400);
    let mut files = vec![srv.file("g", "chains/old/spec"), srv.file("g", "images/old/1.0.img")];
    files.extend(old_chunks.iter().chain(&live_chunks).chain(&orphans).map(|c| srv.file("g", c)));
    for f in files {
        std::fs::File::options().write(true).open(&f).unwrap().set_modified(past).unwrap();
    }
    let opts = gc::Options { older_than: Duration::from_secs(86_400), grace: Duration::from_secs(3600), dry_run: false };
    let r = gc::collect(&*s, &opts).unwrap();
    assert_eq!(r.chains, vec!["old".to_string()]);
    for c in &live_chunks {
        assert!(s.exists(c).unwrap(), "gc removed {c}, which the live chain needs");
    }
    for c in old_chunks.iter().filter(|c| !live_chunks.contains(c)).chain(&orphans) {
        assert!(!s.exists(c).unwrap(), "gc kept {c}, which nothing names");
    }
    assert!(std::fs::read(s.fetch_file("images/live/1.0.img").unwrap().unwrap()).unwrap() == live_img);
    // Chunks younger than the grace period stay even when nothing names them yet.
    s.put_file("images/new/1.0.img", &staged(&*s, &random_bytes(1 << 20, 25))).unwrap();
    let fresh = s.chunks_of("images/new/1.0.img").unwrap().unwrap();
    s.delete("images/new/1.0.img").unwrap();
    gc::collect(&*s, &opts).unwrap();
    assert!(fresh.iter().all(|c| s.exists(c).unwrap()), "gc removed chunks younger than the grace period");
    // A checkpoint that finds old chunks in the store writes them again rather than reuse
    // them (a running gc may be about to remove them), which makes them recent.
    // (A fresh store: this one knows the live image's chunks from reading it above.)
    let s = open(&srv, "g", Some(KEY)).unwrap();
    let again = s.put_file("images/live/2.0.img", &staged(&*s, &live_img)).unwrap();
    assert!(again as usize >= live_img.len() * 9 / 10, "old chunks were reused without being refreshed ({again} bytes sent)");
    for c in &live_chunks {
        let age = std::fs::metadata(srv.file("g", c)).unwrap().modified().unwrap().elapsed().unwrap_or_default();
        assert!(age < Duration::from_secs(600), "{c} was not refreshed");
    }
    // A grace period shorter than the reuse window is refused.
    let e = gc::collect(&*s, &gc::Options { grace: Duration::from_secs(60), ..opts }).unwrap_err().to_string();
    assert!(e.contains("too short"), "{e}");
}

/// A proxy in front of `upstream` that drops `If-None-Match` from every request: a server
/// that does not enforce create-if-absent, as Garage 2.5.0 was seen to behave. (The
/// header is signed, so the s3s-fs behind it runs without authentication.)
fn header_dropping_proxy(upstream: u16) -> u16 {
    use std::io::{Read, Write};
    tcp_server(move |mut c| {
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match c.read(&mut b) {
                Ok(1) => head.push(b[0]),
                _ => return,
            }
        }
        let text = String::from_utf8_lossy(&head[..head.len() - 4]).into_owned();
        let mut out = String::new();
        for line in text.split("\r\n") {
            let lower = line.to_ascii_lowercase();
            if lower.starts_with("if-none-match:") || lower.starts_with("connection:") {
                continue;
            }
            out.push_str(line);
            out.push_str("\r\n");
        }
        out.push_str("Connection: close\r\n\r\n");
        let Ok(mut u) = std::net::TcpStream::connect(("127.0.0.1", upstream)) else { return };
        if u.write_all(out.as_bytes()).is_err() {
            return;
        }
        let (mut c2, mut u2) = (c.try_clone().unwrap(), u.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut c2, &mut u2);
        });
        let _ = std::io::copy(&mut u, &mut c);
        let _ = c.shutdown(std::net::Shutdown::Both);
    })
}

/// A TCP server on 127.0.0.1 that hands each connection to `handle` on its own thread;
/// returns its port.
fn tcp_server(handle: impl Fn(std::net::TcpStream) + Send + Sync + Copy + 'static) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || handle(c));
        }
    });
    port
}

#[test]
fn a_server_that_ignores_if_none_match_is_refused_or_used_in_the_weaker_mode_when_asked() {
    let _g = ENV.lock().unwrap_or_else(|e| e.into_inner());
    let mut srv = Server::start("noinm");
    // The same root again, without authentication, behind the proxy.
    srv.stop();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut open_srv = Server::start_with(srv.root.clone(), port, &[]);
    let proxy = Server { child: Command::new("true").spawn().unwrap(), root: PathBuf::new(), port: header_dropping_proxy(port) };
    // Unsigned requests: an s3s-fs without keys refuses signed ones.
    for (k, v) in proxy.env() {
        std::env::set_var(k, v);
    }
    std::env::set_var("AWS_SKIP_SIGNATURE", "true");
    let sealer = || limitless::store::seal::Sealer::new(KEY.as_bytes()).ok();
    let e = format!(
        "{:#}",
        store::S3Store::open("s3://bkt/c", sealer(), &[]).err().expect("a store whose server ignores If-None-Match opened")
    );
    assert!(e.contains("does not enforce If-None-Match") && e.contains("LIMITLESS_S3_CONDITIONAL=emulate"), "{e}");
    // Asked for the weaker mode: create-if-absent reads first.
    std::env::set_var("LIMITLESS_S3_CONDITIONAL", "emulate");
    let s = store::S3Store::open("s3://bkt/c", sealer(), &[]);
    std::env::remove_var("LIMITLESS_S3_CONDITIONAL");
    let s = s.unwrap();
    assert_eq!(s.conditional(), limitless::store::s3::Conditional::Emulated);
    assert!(s.put_if_absent("chains/c/result", b"first").unwrap());
    assert!(!s.put_if_absent("chains/c/result", b"second").unwrap());
    assert_eq!(s.get("chains/c/result").unwrap().unwrap(), b"first");
    // Directly on the same server, the header is enforced.
    for (k, v) in open_srv.env() {
        std::env::set_var(k, v);
    }
    let direct = store::S3Store::open("s3://bkt/c", sealer(), &[]).unwrap();
    std::env::remove_var("AWS_SKIP_SIGNATURE");
    assert_eq!(direct.conditional(), limitless::store::s3::Conditional::Enforced);
    assert!(!direct.put_if_absent("chains/c/result", b"third").unwrap());
    assert_eq!(direct.get("chains/c/result").unwrap().unwrap(), b"first");
    open_srv.stop();
}

/// Waits until `sup`'s program has written some output.
/// A checkpoint streamed on top of an image in the store, of a program whose dirty
/// tracking started at that image: the windows it did not write are taken from that
/// image's chunks unread, and the new image, whole, restores to the same memory (the
/// program checks all of it: its last checksum is the uninterrupted run's).
#[test]
fn a_checkpoint_on_top_of_a_stored_image_takes_unwritten_memory_from_its_chunks() {
    use limitless::engine::checkpoint::{After, Request};
    use limitless::engine::restore::restore_stream;
    use limitless::engine::supervisor::{Options, Supervisor};
    use limitless::store::ImageAt;
    let _g = ENV.lock().unwrap_or_else(|e| e.into_inner());
    let srv = Server::start("ontop");
    let s = open(&srv, "o", Some(KEY)).unwrap();
    let prog = program("wpedge");
    let args = ["16", "250"];
    let want = reference(&prog, &args, "");
    let opts = Options { socket: None, carry: Default::default(), track: false, map: false };
    let sup = Supervisor::launch(&prog, &args.map(Into::into), &opts).unwrap();
    assert!(sup.wait_ready(Duration::from_secs(30)), "the agent did not start");
    wait_output(&sup, "wpedge");
    let req = |after| Request::new(PathBuf::new(), after);
    let (first, second) = ("images/w/1.0.img", "images/w/2.0.img");
    let a = sup.inner.checkpoint_to(&req(After::Resume), s.image_sink(first, None).unwrap().unwrap()).unwrap();
    assert_ne!(a.epoch, 0, "a leave-running checkpoint to the store did not arm dirty tracking (it needs Linux 6.7+)");
    std::thread::sleep(Duration::from_millis(700));
    let b = sup.inner.checkpoint_to(&req(After::Kill), s.image_sink(second, Some(first)).unwrap().unwrap()).unwrap();
    let _ = sup.wait();
    eprintln!(
        "first image {} bytes, {:?} sent; on top of it: {} bytes, {:?} sent, {} copied unread, {} pages found unchanged",
        a.image_bytes, a.sent_bytes, b.image_bytes, b.sent_bytes, b.copied_bytes, b.unchanged_pages
    );
    // About 10 MiB of its 16 MiB area is never written.
    assert!(b.unchanged_pages * 4096 >= 8 << 20, "dirty tracking found only {} pages unchanged", b.unchanged_pages);
    assert!(b.copied_bytes >= 8 << 20, "only {} bytes were taken from the first image's chunks", b.copied_bytes);
    assert!(b.sent_bytes.unwrap() * 2 < a.sent_bytes.unwrap(), "the second image sent {:?} bytes", b.sent_bytes);
    // Restored from the store, it runs to the end with the uninterrupted run's checksums.
    let src = match s.open_image(second).unwrap() {
        ImageAt::Stream(src) => src,
        _ => panic!("the S3 store does not stream images"),
    };
    let (r, _) = restore_stream(src, second, &opts).unwrap();
    let inner = r.inner.clone();
    assert_eq!(r.wait().unwrap(), 0, "the restored program failed");
    let last = String::from_utf8_lossy(&inner.out.last_line()).into_owned();
    assert_eq!(last.trim_end(), want.lines().last().unwrap(), "the restored program ended otherwise than an uninterrupted run");
}

/// After a restore with dirty tracking, what a checkpoint would have to store (which the
/// chain's margin follows) is the memory written since: little while the program writes
/// 1 % of its heap, all of it once it rewrites the whole heap. Without tracking it is all
/// resident memory. No server needed: the image is a file.
#[test]
fn after_a_tracked_restore_the_estimate_of_what_to_store_follows_what_the_program_writes() {
    use limitless::engine::checkpoint::{After, Request};
    use limitless::engine::restore::restore;
    use limitless::engine::supervisor::{Options, Supervisor};
    let opts = Options { socket: None, carry: Default::default(), track: false, map: false };
    // 64 MiB; from iteration 40 on, every iteration rewrites all of it.
    let churn = program("churn");
    let args = ["64", "100000", "50", "random", "40"];
    let sup = Supervisor::launch(&churn, &args.map(Into::into), &opts).unwrap();
    assert!(sup.wait_ready(Duration::from_secs(30)), "the agent did not start");
    wait_output(&sup, "churn");
    let rss = sup.proc_stats().rss_bytes;
    assert_eq!(sup.send_estimate(rss), rss, "without tracking, a checkpoint stores all resident memory");
    let dir = std::env::temp_dir().join("limitless-tests").join(format!("estimate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("image");
    let req = Request::new(img.clone(), After::Kill);
    sup.inner.checkpoint(&req).unwrap();
    let _ = sup.wait();
    let (r, _) = restore(&img, &Options { track: true, ..opts }).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(r.inner.tracked.lock().unwrap().is_some(), "the restore did not arm dirty tracking (it needs Linux 6.7+ and userfaultfd)");
    let iteration = || {
        let line = String::from_utf8_lossy(&r.inner.out.last_line()).into_owned();
        line.split_whitespace().nth(1).and_then(|n| n.parse::<u32>().ok()).unwrap_or(0)
    };
    let wait_for = |n: u32| {
        let t = Instant::now();
        while iteration() < n {
            assert!(t.elapsed() < Duration::from_secs(60), "churn did not reach iteration {n} in 60 s");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    // A whole iteration after the restore: its 1 % window (640 KiB) is written.
    let first = iteration();
    assert!(first < 30, "churn was at iteration {first} when restored");
    wait_for(first + 2);
    let (rss, little) = (r.proc_stats().rss_bytes, r.send_estimate(r.proc_stats().rss_bytes));
    // From iteration 41 on, all 64 MiB have been rewritten.
    wait_for(41);
    let (rss2, all) = (r.proc_stats().rss_bytes, r.send_estimate(r.proc_stats().rss_bytes));
    r.inner.kill();
    let _ = r.wait();
    eprintln!("resident {rss} bytes, to store {little} while writing 1 %; resident {rss2}, to store {all} after rewriting it all");
    assert!(rss > 64 << 20, "resident {rss}");
    assert!(little < 16 << 20, "{little} bytes to store while the program wrote 640 KiB per iteration");
    assert!(all >= 64 << 20 && all * 10 >= rss2 * 9, "{all} bytes to store after it rewrote its 64 MiB heap (resident {rss2})");
}

fn wait_output(sup: &limitless::engine::supervisor::Supervisor, what: &str) {
    let t = Instant::now();
    while sup.inner.out.bytes.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(t.elapsed() < Duration::from_secs(60), "{what} wrote nothing in 60 s");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn an_image_streams_into_the_store_and_back_and_a_tampered_chunk_stops_the_restore_before_the_program_runs() {
    use limitless::engine::checkpoint::{After, Request};
    use limitless::engine::restore::restore_stream;
    use limitless::engine::supervisor::{Options, Supervisor};
    use limitless::store::ImageAt;
    let _g = ENV.lock().unwrap_or_else(|e| e.into_inner());
    let srv = Server::start("stream");
    let s = open(&srv, "r", Some(KEY)).unwrap();
    let key = "images/c/1.0.img";
    let opts = Options { socket: None, carry: Default::default(), track: false, map: false };
    let stream_of = |s: &dyn Store| match s.open_image(key).unwrap() {
        ImageAt::Stream(src) => src,
        _ => panic!("the S3 store does not stream images"),
    };
    // 32 MiB of random heap, checkpointed straight into the store; the program is killed.
    let churn = program("churn");
    let sup = Supervisor::launch(&churn, &["32".into(), "100000".into(), "50".into()], &opts).unwrap();
    assert!(sup.wait_ready(Duration::from_secs(30)), "the agent did not start");
    wait_output(&sup, "churn");
    let req = Request::new(PathBuf::new(), After::Kill);
    let st = sup.inner.checkpoint_to(&req, s.image_sink(key, None).unwrap().expect("the S3 store takes a stream")).unwrap();
    let _ = sup.wait();
    assert!(st.pages >= 32 * 256, "{} pages stored", st.pages);
    assert!(st.sent_bytes.unwrap() > 32 << 20, "sent {:?} bytes for 32 MiB of random memory", st.sent_bytes);
    // Restored from the store, it runs on.
    let (r, rs) = restore_stream(stream_of(&*s), key, &opts).unwrap();
    assert_eq!(rs.data_bytes, st.pages * 4096);
    wait_output(&r, "the restored churn");
    r.inner.kill();
    let _ = r.wait();
    // One flipped byte in a chunk of page data: the restore fails, naming the chunk, and
    // the program never runs.
    let chunks = s.chunks_of(key).unwrap().unwrap();
    let mid = &chunks[chunks.len() / 2];
    let file = srv.root.join("bkt/r").join(mid);
    let mut b = std::fs::read(&file).unwrap();
    let i = b.len() / 2;
    b[i] ^= 1;
    std::fs::write(&file, &b).unwrap();
    let e = format!("{:#}", restore_stream(stream_of(&*s), key, &opts).err().expect("a tampered image was restored"));
    assert!(e.contains(mid.as_str()) && e.contains("tampered"), "{e}");
}

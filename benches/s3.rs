//! The S3 store against a local S3 server (s3s-fs on 127.0.0.1): checkpoints of 256 MiB and
//! 1 GiB processes streamed into the store as chunks (request to stored image), a second
//! checkpoint after the process changed 1 % of its heap (on top of the first: dirty
//! tracking armed by the first, unchanged page records taken from its chunks unread), and
//! a restore streamed from the
//! store (request to running program), each against the raw throughput of the same server
//! for one plain PUT and GET of the same size, measured in the same run.
//!
//! Run with `cargo bench --bench s3` (needs `s3s-fs`: `cargo install s3s-fs@0.14.1
//! --features binary --locked`). Data goes to $LIMITLESS_BENCH_DIR (default: the system
//! temporary directory).

use limitless::engine::checkpoint::{After, Request, Stats};
use limitless::engine::restore::restore_stream;
use limitless::engine::supervisor::{Options, Supervisor};
use limitless::store::{ImageAt, S3Store, Store};
use object_store::{ObjectStoreExt, PutPayload};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn mib_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / (1 << 20) as f64 / secs
}

fn random(n: usize) -> Vec<u8> {
    let mut x = 0x2545F4914F6CDD1Du64;
    let mut v = vec![0u8; n];
    for c in v.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    v
}

/// Starts `churn MIB` (it rewrites the same 1 % of its heap, over and over) and waits
/// until its heap is written.
fn start_churn(churn: &Path, mib: u64) -> Supervisor {
    let opts = Options { socket: None, carry: Default::default(), track: false, map: false };
    let sup = Supervisor::launch(churn, &[mib.to_string().into(), "100000".into(), "200".into()], &opts).expect("launch");
    assert!(sup.wait_ready(Duration::from_secs(30)), "agent did not start");
    let t = Instant::now();
    while sup.inner.out.bytes.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(t.elapsed() < Duration::from_secs(120), "churn did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    sup
}

/// A leave-running checkpoint streamed into the store at `key`: (stats, seconds).
fn checkpoint_to_store(sup: &Supervisor, store: &S3Store, key: &str, parent: Option<&str>) -> (Stats, f64) {
    let req = Request::new(PathBuf::new(), After::Resume);
    let t = Instant::now();
    let sink = store.image_sink(key, parent).expect("sink").expect("the S3 store streams");
    let st = sup.inner.checkpoint_to(&req, sink).expect("checkpoint");
    (st, t.elapsed().as_secs_f64())
}

fn main() {
    let base = std::env::var_os("LIMITLESS_BENCH_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("limitless-s3-bench-{}", std::process::id()));
    let root = dir.join("s3");
    std::fs::create_dir_all(root.join("bench")).unwrap();
    let s3s = PathBuf::from(std::env::var("CARGO_HOME").unwrap_or_else(|_| format!("{}/.cargo", std::env::var("HOME").unwrap())))
        .join("bin/s3s-fs");
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut server = Command::new(&s3s)
        .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--access-key", "AKBENCH", "--secret-key", "SKBENCH12345678"])
        .arg(&root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start {} ({e}); install it with `cargo install s3s-fs@0.14.1 --features binary --locked`", s3s.display())
        });
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let endpoint = format!("http://127.0.0.1:{port}");
    for (k, v) in [
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        ("AWS_ACCESS_KEY_ID", "AKBENCH"),
        ("AWS_SECRET_ACCESS_KEY", "SKBENCH12345678"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ALLOW_HTTP", "true"),
        // The store sends unsigned payloads (its chunks carry their own hashes); so does
        // the raw client here, so that both pay the same.
        ("AWS_UNSIGNED_PAYLOAD", "true"),
        ("LIMITLESS_KEY", "bench-key-0123456789abcdef"),
    ] {
        std::env::set_var(k, v);
    }
    let churn = dir.join("churn");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/programs/churn.c");
    assert!(Command::new("gcc").args(["-O2", "-o"]).arg(&churn).arg(&src).status().expect("gcc").success());
    let raw = object_store::aws::AmazonS3Builder::from_env().with_bucket_name("bench").build().expect("raw client");
    let rt = tokio::runtime::Runtime::new().unwrap();

    println!(
        "| process | image | raw PUT | first checkpoint, streamed | ratio | 1 % changed: sent | taken from the first, unread | its time | raw GET | restore, streamed | ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for mib in [256u64, 1024] {
        // The server's raw throughput for one object of the same size.
        let blob = bytes::Bytes::from(random((mib as usize) << 20));
        let p = object_store::path::Path::from(format!("raw/{mib}"));
        let t = Instant::now();
        rt.block_on(raw.put(&p, PutPayload::from(blob.clone()))).expect("raw put");
        let put = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let got = rt.block_on(async { raw.get(&p).await?.bytes().await }).expect("raw get");
        let get = t.elapsed().as_secs_f64();
        assert_eq!(got.len(), blob.len());
        drop((blob, got));
        rt.block_on(raw.delete(&p)).unwrap();

        let store = S3Store::open(&format!("s3://bench/m{mib}"), limitless::store::seal::Sealer::from_env().unwrap(), &[]).expect("store");
        let sup = start_churn(&churn, mib);
        let (a, up_a) = checkpoint_to_store(&sup, &store, "images/x/1.0.img", None);
        std::thread::sleep(Duration::from_secs(1));
        let (b, up_b) = checkpoint_to_store(&sup, &store, "images/x/2.0.img", Some("images/x/1.0.img"));
        sup.inner.kill();
        let _ = sup.wait();
        let (na, sent_a, sent_b) = (a.image_bytes, a.sent_bytes.unwrap_or(0), b.sent_bytes.unwrap_or(0));
        // A fresh process (the next step in a chain) restores from the store: from the
        // request until the program runs, the image streamed into place.
        let opts = Options { socket: None, carry: Default::default(), track: false, map: false };
        let t = Instant::now();
        let src = match store.open_image("images/x/1.0.img").expect("open image") {
            ImageAt::Stream(s) => s,
            _ => panic!("the S3 store does not stream images"),
        };
        let (r, rs) = restore_stream(src, "bench image", &opts).expect("restore");
        let down = t.elapsed().as_secs_f64();
        assert_eq!(rs.data_bytes, a.pages * 4096);
        r.inner.kill();
        let _ = r.wait();
        println!(
            "| {mib} MiB random | {:.0} MiB | {:.0} MiB/s | {:.0} MiB/s ({up_a:.2} s, frozen {:.0} ms, {:.0} MiB sent) | {:.2} | {:.1} MiB ({:.2} % of the first) | {:.0} MiB | {up_b:.2} s | {:.0} MiB/s | {:.0} MiB/s ({down:.2} s) | {:.2} |",
            na as f64 / (1 << 20) as f64,
            mib_s(mib << 20, put),
            mib_s(na, up_a),
            a.frozen_ms,
            sent_a as f64 / (1 << 20) as f64,
            mib_s(na, up_a) / mib_s(mib << 20, put),
            sent_b as f64 / (1 << 20) as f64,
            sent_b as f64 * 100.0 / sent_a as f64,
            b.copied_bytes as f64 / (1 << 20) as f64,
            mib_s(mib << 20, get),
            mib_s(na, down),
            mib_s(na, down) / mib_s(mib << 20, get),
        );
        drop(store);
    }
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

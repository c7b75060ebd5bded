//! A real S3 server for tests: s3s-fs (installed by scripts/test.sh) on 127.0.0.1, with a
//! fresh root directory and a bucket `bkt`.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running s3s-fs.
pub struct Server {
    pub child: Child,
    pub root: PathBuf,
    pub port: u16,
}

pub fn s3s_fs() -> PathBuf {
    let home =
        std::env::var("CARGO_HOME").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cargo"));
    let p = home.join("bin/s3s-fs");
    assert!(
        p.exists(),
        "MISSING: {} is needed for the S3 tests; install it with `cargo install s3s-fs@0.14.1 --features binary --locked` (scripts/test.sh does)",
        p.display()
    );
    p
}

impl Server {
    pub fn start(name: &str) -> Server {
        let root = std::env::temp_dir().join("limitless-tests").join(format!("s3-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("bkt")).unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        Server::start_at(root, port)
    }

    pub fn start_at(root: PathBuf, port: u16) -> Server {
        Server::start_with(root, port, &["--access-key", "AKTEST", "--secret-key", "SKTEST12345678"])
    }

    /// s3s-fs with `extra` arguments (no keys: no authentication).
    pub fn start_with(root: PathBuf, port: u16, extra: &[&str]) -> Server {
        let child = Command::new(s3s_fs())
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(extra)
            .arg(&root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start s3s-fs");
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t.elapsed() < Duration::from_secs(10), "s3s-fs did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Server { child, root, port }
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", self.port)),
            ("AWS_ACCESS_KEY_ID", "AKTEST".into()),
            ("AWS_SECRET_ACCESS_KEY", "SKTEST12345678".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("LIMITLESS_S3_RETRY_SECS", "3".into()),
        ]
    }

    /// Where s3s-fs keeps `key` of `prefix` in the bucket.
    pub fn file(&self, prefix: &str, key: &str) -> PathBuf {
        self.root.join("bkt").join(prefix).join(key)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
        // The objects can be large (hundreds of MiB): do not leave them behind.
        if !self.root.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

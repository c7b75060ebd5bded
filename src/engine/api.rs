//! The control socket of `launch` and `restore`: a Unix stream socket speaking one JSON
//! object per line. `limitless dump` is its client; other tools can be too.
//!
//! Requests: `{"op":"dump","output":"/abs/image","leave_running":false,"freeze_timeout_ms":10000}`
//! and `{"op":"status"}`. Replies: `{"ok":true,...}` or `{"ok":false,"error":"..."}`.

use super::checkpoint::{After, Request, Stats};
use super::supervisor::Inner;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A request on the control socket.
#[derive(Serialize, Deserialize, Debug)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ApiRequest {
    /// Take a checkpoint.
    Dump {
        /// Where to write the image (absolute).
        output: PathBuf,
        /// Keep the program running afterwards.
        #[serde(default)]
        leave_running: bool,
        /// How long to wait for every thread to stop.
        #[serde(default)]
        freeze_timeout_ms: Option<u64>,
        /// Wait up to this long for no connected TCP socket before freezing.
        #[serde(default)]
        wait_idle_ms: Option<u64>,
        /// Write a delta image on top of this one (absolute).
        #[serde(default)]
        parent: Option<PathBuf>,
        /// Compress page records where that pays.
        #[serde(default)]
        compress: crate::engine::compress::Compress,
        /// Store the program's and its libraries' file pages too.
        #[serde(default)]
        self_contained: bool,
        /// Store every page whole, not as its changes.
        #[serde(default)]
        whole_pages: bool,
    },
    /// Report the program's pid and whether its agent is ready.
    Status,
}

/// A reply.
#[derive(Serialize, Deserialize, Debug, Default)]
pub struct ApiReply {
    /// The request succeeded.
    pub ok: bool,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What a checkpoint cost.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<Stats>,
    /// The program's pid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The agent is ready for checkpoints.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,
}

/// Default freeze timeout.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);

/// The listening side.
pub struct ApiServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

/// A bound control socket, not yet serving (bound before the program starts, so that it
/// exists by the time the program can be asked about).
pub struct Bound {
    path: PathBuf,
    listener: UnixListener,
}

impl Bound {
    /// Listens on `path`, refusing one that a live supervisor uses.
    pub fn new(path: &Path) -> Result<Bound> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                bail!("{} is in use by another limitless process; choose another --socket", path.display());
            }
            std::fs::remove_file(path).with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
        }
        if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        let listener = UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
        Ok(Bound { path: path.to_path_buf(), listener })
    }

    /// Serves requests for `inner` on a thread.
    pub fn serve(self, inner: Arc<Inner>) -> Result<ApiServer> {
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let l = self.listener;
        let thread = std::thread::Builder::new().name("limitless-api".into()).spawn(move || {
            for conn in l.incoming() {
                if s2.load(Ordering::SeqCst) {
                    return;
                }
                if let Ok(c) = conn {
                    serve(c, &inner);
                }
            }
        })?;
        Ok(ApiServer { path: self.path, stop, thread })
    }
}

impl ApiServer {
    /// Stops listening, waits until the request in progress (if any) has been answered, and
    /// removes the socket file. A stop-checkpoint ends the program before its reply is sent,
    /// so without the wait the client would see the connection close unanswered.
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.path);
        let _ = self.thread.join();
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(c: UnixStream, inner: &Inner) {
    let mut line = String::new();
    let mut r = BufReader::new(match c.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    if r.read_line(&mut line).is_err() || line.trim().is_empty() {
        return;
    }
    let reply = match serde_json::from_str::<ApiRequest>(&line) {
        Err(e) => ApiReply { error: Some(format!("bad request: {e}")), ..Default::default() },
        Ok(ApiRequest::Status) => {
            let st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
            ApiReply {
                ok: true,
                pid: Some(inner.pid),
                ready: Some((st.hello.is_some() || st.restored.is_some()) && !st.closed),
                ..Default::default()
            }
        }
        Ok(ApiRequest::Dump { output, leave_running, freeze_timeout_ms, wait_idle_ms, parent, compress, self_contained, whole_pages }) => {
            let after = if leave_running { After::Resume } else { After::Kill };
            let req = Request {
                output,
                after,
                freeze_timeout: freeze_timeout_ms.map_or(FREEZE_TIMEOUT, Duration::from_millis),
                wait_idle: Duration::from_millis(wait_idle_ms.unwrap_or(0)),
                parent,
                compress,
                self_contained,
                whole_pages,
            };
            match inner.checkpoint(&req) {
                Ok(s) => ApiReply { ok: true, stats: Some(s), pid: Some(inner.pid), ..Default::default() },
                Err(e) => ApiReply { error: Some(format!("{e:#}")), ..Default::default() },
            }
        }
    };
    let mut c = c;
    let mut text = serde_json::to_string(&reply).unwrap_or_else(|_| "{\"ok\":false}".into());
    text.push('\n');
    let _ = c.write_all(text.as_bytes());
}

/// Sends one request to the control socket at `path` and waits for the reply.
pub fn request(path: &Path, req: &ApiRequest) -> Result<ApiReply> {
    let mut c = UnixStream::connect(path).map_err(|e| {
        anyhow::anyhow!(
            "no limitless launch or restore is listening on {} ({e}); check the --socket path and that the program still runs",
            path.display()
        )
    })?;
    let mut text = serde_json::to_string(req)?;
    text.push('\n');
    c.write_all(text.as_bytes())?;
    let mut line = String::new();
    BufReader::new(c).read_line(&mut line)?;
    if line.trim().is_empty() {
        bail!("the supervisor on {} closed the connection without an answer (did the program exit?)", path.display());
    }
    serde_json::from_str(&line).context("bad reply on the control socket")
}

/// The default control socket of process `pid`.
pub fn default_socket(pid: u32) -> PathBuf {
    let base = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from).filter(|p| p.is_absolute() && p.is_dir()).unwrap_or_else(|| {
        // SAFETY: getuid cannot fail.
        PathBuf::from(format!("/tmp/limitless-{}", unsafe { libc::getuid() }))
    });
    base.join("limitless").join(format!("{pid}.sock"))
}

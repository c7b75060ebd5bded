//! A store in an S3 bucket (AWS S3, MinIO, Ceph RGW, Garage, IBM COS, ...), through the
//! `object_store` crate.
//!
//! Small objects (specs, claims, manifests, results, stats) are single objects sealed with
//! a MAC ([`super::seal`]). Images are split into content-defined chunks (FastCDC, about
//! 512 KiB), each stored once under `chunks/<hash>` (BLAKE3 of its contents), compressed with
//! zstd when that pays; the image's key holds the sealed list of its chunks. A later
//! checkpoint uploads only chunks the store does not have yet, and a restore checks every
//! chunk against its hash.
//!
//! Images are streamed both ways: [`ChunkSink`] cuts and uploads an image while the
//! engine writes it, and [`ChunkSource`] fetches the chunks a restore reads, a window of
//! them ahead, so neither needs the whole image on local disk or in memory.
//!
//! Create-if-absent writes use `If-None-Match: *`; [`S3Store::open`] checks that the
//! server enforces it before trusting it.

use super::seal::{self, Sealer};
use super::{check_key, ImageAt, ObjectInfo, Store};
use crate::engine::checkpoint::ImageSink;
use anyhow::{anyhow, bail, Context, Result};
use futures::TryStreamExt;
use limitless_image::file::{compress_if_smaller, Source};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as OsPath;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::task::JoinHandle;

/// Chunk sizes (FastCDC minimum, average, maximum): small enough that a change costs
/// little, large enough that a 1 GiB image is about 2000 requests.
const CHUNK_MIN: usize = 128 * 1024;
const CHUNK_AVG: usize = 512 * 1024;
const CHUNK_MAX: usize = 2 * 1024 * 1024;
/// Chunks in flight at once, each way, unless LIMITLESS_S3_PARALLEL says otherwise (bounds
/// memory: about this many times 2 * CHUNK_MAX).
const IN_FLIGHT: usize = 16;
/// Chunk encodings.
const RAW: u8 = 0;
const ZSTD: u8 = 1;

static SEQ: AtomicU64 = AtomicU64::new(0);

/// A chunk found in the store (not named by the image this step restored from) older than
/// this is uploaded again rather than reused; gc's grace period must be longer than this
/// plus the longest upload (`limitless gc` refuses a shorter grace).
pub const REFRESH_AFTER: Duration = Duration::from_secs(30 * 60);

fn age_of(t: impl Into<SystemTime>) -> Duration {
    SystemTime::now().duration_since(t.into()).unwrap_or_default()
}

/// How create-if-absent is done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conditional {
    /// The server enforces `If-None-Match: *`.
    Enforced,
    /// The server ignores it; a read before the write stands in (a race between two writers
    /// within one round trip can let both win). Only with `LIMITLESS_S3_CONDITIONAL=emulate`.
    Emulated,
}

/// The list of chunks an image is made of (sealed, at the image's key).
#[derive(Serialize, Deserialize)]
struct ChunkList {
    format: u32,
    /// Image size.
    bytes: u64,
    chunks: Vec<ChunkRef>,
}

#[derive(Serialize, Deserialize, Clone)]
struct ChunkRef {
    /// BLAKE3 of the chunk's contents (hex).
    h: String,
    /// Its length.
    n: u64,
}

/// An S3 store.
pub struct S3Store {
    url: String,
    endpoint: String,
    prefix: String,
    os: Arc<AmazonS3>,
    rt: tokio::runtime::Runtime,
    sealer: Option<Sealer>,
    conditional: Conditional,
    staged: Mutex<Vec<PathBuf>>,
    in_flight: usize,
    /// Chunks this process has seen in the store (those of the image it restored from):
    /// a checkpoint skips them without asking the server.
    known: Arc<Mutex<HashSet<String>>>,
}

fn chunk_key(h: &str) -> String {
    format!("chunks/{}/{h}", &h[..2])
}

fn is_exists(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. })
}

fn is_not_found(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. })
}

/// Encodes a chunk: zstd when it saves at least 1/32 of the size, raw otherwise.
fn encode(data: &[u8]) -> Vec<u8> {
    let (tag, body) = match compress_if_smaller(data) {
        Some(z) => (ZSTD, std::borrow::Cow::Owned(z)),
        None => (RAW, std::borrow::Cow::Borrowed(data)),
    };
    let mut out = Vec::with_capacity(body.len() + 1);
    out.push(tag);
    out.extend_from_slice(&body);
    out
}

/// Decodes and checks a chunk.
fn decode(key: &str, r: &ChunkRef, stored: &[u8]) -> Result<Vec<u8>> {
    let data = match stored.split_first() {
        Some((&RAW, d)) => d.to_vec(),
        Some((&ZSTD, d)) => {
            let mut out = Vec::with_capacity(r.n as usize);
            zstd::stream::copy_decode(d, &mut out).map_err(|e| anyhow!("the chunk {key} does not decompress ({e}): it is damaged"))?;
            out
        }
        _ => bail!("the chunk {key} has an unknown encoding: it is damaged"),
    };
    if data.len() as u64 != r.n || blake3::hash(&data).to_hex().as_str() != r.h {
        bail!("the chunk {key} does not match its hash: it was tampered with or damaged");
    }
    Ok(data)
}

impl S3Store {
    /// Opens `s3://bucket/prefix` with the standard AWS settings from the environment
    /// (`extra` overrides it) and `sealer` for MACs.
    pub fn open(url: &str, sealer: Option<Sealer>, extra: &[(String, String)]) -> Result<S3Store> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| anyhow!("`{url}` is not an s3:// URL"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            bail!("the store URL `{url}` names no bucket; write s3://BUCKET/PREFIX");
        }
        let prefix = prefix.trim_matches('/');
        if !prefix.is_empty() {
            check_key(prefix).with_context(|| format!("bad prefix in the store URL `{url}`"))?;
        }
        if sealer.is_none() && std::env::var("LIMITLESS_INSECURE_STORE").as_deref() != Ok("1") {
            bail!(
                "the S3 store {url} is shared, and LIMITLESS_KEY is not set: set it to a random secret (the same for every step), \
                 or set LIMITLESS_INSECURE_STORE=1 to store unauthenticated checkpoints"
            );
        }
        let var = |k: &str| extra.iter().rev().find(|(n, _)| n == k).map(|(_, v)| v.clone()).or_else(|| std::env::var(k).ok());
        let endpoint = var("AWS_ENDPOINT_URL_S3")
            .or_else(|| var("AWS_ENDPOINT_URL"))
            .or_else(|| var("AWS_ENDPOINT"))
            .unwrap_or_else(|| "AWS S3".into());
        let retry = RetryConfig {
            backoff: BackoffConfig { init_backoff: Duration::from_millis(100), max_backoff: Duration::from_secs(3), base: 2.0 },
            max_retries: env_num("LIMITLESS_S3_RETRIES", 4) as usize,
            retry_timeout: Duration::from_secs(env_num("LIMITLESS_S3_RETRY_SECS", 30)),
        };
        let client = ClientOptions::new()
            .with_allow_http(endpoint.starts_with("http://"))
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(120));
        // Payloads are not signed by default (no SHA-256 pass over every chunk): chunks are
        // checked against their BLAKE3 names and objects by their MAC at every read.
        let mut b = AmazonS3Builder::from_env();
        if var("AWS_UNSIGNED_PAYLOAD").is_none() {
            b = b.with_unsigned_payload(true);
        }
        for (k, v) in extra.iter().filter(|(k, _)| k.starts_with("AWS_")) {
            if let Ok(ck) = k.to_ascii_lowercase().parse() {
                b = b.with_config(ck, v);
            }
        }
        let os = b
            .with_bucket_name(bucket)
            .with_retry(retry)
            .with_client_options(client)
            .build()
            .with_context(|| format!("cannot use the S3 store {url} ({endpoint})"))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("limitless-s3")
            .enable_all()
            .build()
            .context("cannot start the S3 client's threads")?;
        let mut s = S3Store {
            url: url.to_string(),
            endpoint,
            prefix: if prefix.is_empty() { String::new() } else { format!("{prefix}/") },
            os: Arc::new(os),
            rt,
            sealer,
            conditional: Conditional::Enforced,
            staged: Mutex::new(Vec::new()),
            in_flight: (env_num("LIMITLESS_S3_PARALLEL", IN_FLIGHT as u64) as usize).clamp(1, 64),
            known: Arc::new(Mutex::new(HashSet::new())),
        };
        s.conditional = s.probe_conditional()?;
        Ok(s)
    }

    /// How create-if-absent works on this server.
    pub fn conditional(&self) -> Conditional {
        self.conditional
    }

    fn path(&self, key: &str) -> Result<OsPath> {
        check_key(key)?;
        OsPath::parse(format!("{}{key}", self.prefix)).map_err(|e| anyhow!("bad store key `{key}`: {e}"))
    }

    /// `S3 store URL at ENDPOINT: WHAT KEY`, the start of every request error.
    fn doing(&self, what: &str, key: &str) -> String {
        format!("S3 store {} at {}: {what} {key}", self.url, self.endpoint)
    }

    fn err(&self, what: &str, key: &str, e: impl std::fmt::Display) -> anyhow::Error {
        anyhow!("{} failed: {e}", self.doing(what, key))
    }

    /// Runs `f` on the store's runtime and waits for it (from any thread, inside another
    /// runtime or not).
    fn run<T: Send + 'static>(&self, f: impl std::future::Future<Output = T> + Send + 'static) -> T {
        let h = self.rt.spawn(f);
        futures::executor::block_on(h).expect("an S3 task panicked")
    }

    /// Writes a probe twice with create-if-absent: a server that lets the second write
    /// through does not enforce `If-None-Match`.
    fn probe_conditional(&self) -> Result<Conditional> {
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let key = format!("probes/{}-{nanos}", std::process::id());
        let p = self.path(&key)?;
        let os = self.os.clone();
        let p2 = p.clone();
        let (first, second) = self.run(async move {
            let create = || PutOptions { mode: PutMode::Create, ..Default::default() };
            let a = os.put_opts(&p2, PutPayload::from_static(b"1"), create()).await;
            let b = if a.is_ok() { Some(os.put_opts(&p2, PutPayload::from_static(b"2"), create()).await) } else { None };
            let _ = os.delete(&p2).await;
            (a, b)
        });
        first.map_err(|e| {
            anyhow!(
                "cannot use the S3 store {} at {}: writing a probe object failed: {e}; check the bucket exists and the AWS_* settings",
                self.url,
                self.endpoint
            )
        })?;
        match second {
            Some(Err(e)) if is_exists(&e) => Ok(Conditional::Enforced),
            Some(Err(e)) => Err(self.err("probe write", &key, e)),
            _ if std::env::var("LIMITLESS_S3_CONDITIONAL").as_deref() == Ok("emulate") => {
                tracing::warn!(
                    "the S3 server at {} ignores If-None-Match: create-if-absent is emulated by a read before the write \
                     (LIMITLESS_S3_CONDITIONAL=emulate), which two racing writers can both pass",
                    self.endpoint
                );
                Ok(Conditional::Emulated)
            }
            _ => bail!(
                "the S3 server at {} does not enforce If-None-Match (a create-if-absent write replaced an existing object), \
                 so two invocations could both decide a step of a chain; use a server that enforces it (AWS S3, MinIO, Ceph RGW, s3s), \
                 or set LIMITLESS_S3_CONDITIONAL=emulate to accept a weaker check",
                self.endpoint
            ),
        }
    }

    fn get_raw(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let p = self.path(key)?;
        let os = self.os.clone();
        let r = self.run(async move {
            match os.get(&p).await {
                Ok(g) => g.bytes().await.map(Some),
                Err(e) => Err(e),
            }
        });
        match r {
            Ok(b) => Ok(b.map(|b| b.to_vec())),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(self.err("reading", key, e)),
        }
    }

    fn put_raw(&self, key: &str, body: Vec<u8>, mode: PutMode) -> Result<bool> {
        let p = self.path(key)?;
        let os = self.os.clone();
        let r = self.run(async move { os.put_opts(&p, PutPayload::from(body), PutOptions { mode, ..Default::default() }).await });
        match r {
            Ok(_) => Ok(true),
            Err(e) if is_exists(&e) => Ok(false),
            Err(e) => Err(self.err("writing", key, e)),
        }
    }

    fn chunk_list(&self, key: &str) -> Result<Option<ChunkList>> {
        let Some(obj) = self.get_raw(key)? else { return Ok(None) };
        let body = seal::open(self.sealer.as_ref(), key, obj)?;
        let l: ChunkList = serde_json::from_slice(&body).map_err(|e| anyhow!("the image {key} is not a chunk list ({e})"))?;
        if l.format != 1 {
            bail!("the image {key} has chunk list format {}, which this version does not read", l.format);
        }
        if l.chunks.iter().any(|c| c.h.len() != 64 || !c.h.bytes().all(|b| b.is_ascii_hexdigit()) || c.n > CHUNK_MAX as u64) {
            bail!("the image {key} has a malformed chunk list");
        }
        if l.chunks.iter().map(|c| c.n).sum::<u64>() != l.bytes {
            bail!("the image {key} has a chunk list whose sizes do not add up");
        }
        Ok(Some(l))
    }

    /// Uploads one chunk unless the store has it. Returns the bytes sent.
    fn upload_chunk(&self, data: Vec<u8>, h: String) -> Result<JoinHandle<Result<u64>>> {
        let key = chunk_key(&h);
        let p = self.path(&key)?;
        let os = self.os.clone();
        let what = self.doing("uploading", &key);
        Ok(self.rt.spawn(async move {
            match os.head(&p).await {
                // A recent chunk is kept by gc (younger than its grace period); an older one
                // may be an orphan that a running gc is about to remove, so it is written
                // again, which makes it recent.
                Ok(m) if age_of(m.last_modified) < REFRESH_AFTER => return Ok(0),
                Ok(_) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => bail!("{what} failed: {e}"),
            }
            let body = tokio::task::spawn_blocking(move || encode(&data)).await?;
            let n = body.len() as u64;
            os.put_opts(&p, PutPayload::from(body), PutOptions::default()).await.map_err(|e| anyhow!("{what} failed: {e}"))?;
            Ok(n)
        }))
    }
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn wait<T>(h: JoinHandle<Result<T>>) -> Result<T> {
    futures::executor::block_on(h).map_err(|e| anyhow!("an S3 task failed: {e}"))?
}

impl Store for S3Store {
    fn put_if_absent(&self, key: &str, bytes: &[u8]) -> Result<bool> {
        let body = seal::seal(self.sealer.as_ref(), key, bytes);
        if self.conditional == Conditional::Emulated && self.get_raw(key)?.is_some() {
            return Ok(false);
        }
        let mode = if self.conditional == Conditional::Enforced { PutMode::Create } else { PutMode::Overwrite };
        self.put_raw(key, body, mode)
    }

    fn put(&self, key: &str, bytes: &[u8]) -> Result<()> {
        self.put_raw(key, seal::seal(self.sealer.as_ref(), key, bytes), PutMode::Overwrite).map(|_| ())
    }

    fn put_file(&self, key: &str, src: &Path) -> Result<u64> {
        let mut f = File::open(src).with_context(|| format!("cannot read {}", src.display()))?;
        let mut sink = Box::new(self.sink(key)?);
        std::io::copy(&mut f, &mut sink).map_err(|e| anyhow!("storing {} failed: {e}", src.display()))?;
        let sent = ImageSink::finish(sink)?;
        let _ = std::fs::remove_file(src);
        Ok(sent)
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        match self.get_raw(key)? {
            Some(obj) => seal::open(self.sealer.as_ref(), key, obj).map(Some),
            None => Ok(None),
        }
    }

    fn fetch_file(&self, key: &str) -> Result<Option<PathBuf>> {
        let Some(src) = self.source(key)? else { return Ok(None) };
        let dst = self.staging_path("restore")?;
        let mut out = File::create(&dst).with_context(|| format!("cannot write {}", dst.display()))?;
        self.staged.lock().expect("staged list").push(dst.clone());
        let mut off = 0;
        while off < src.len {
            let data = src.chunk(src.chunk_at(off))?;
            out.write_all(&data).with_context(|| format!("cannot write {}", dst.display()))?;
            off += data.len() as u64;
        }
        out.flush()?;
        Ok(Some(dst))
    }

    fn exists(&self, key: &str) -> Result<bool> {
        let p = self.path(key)?;
        let os = self.os.clone();
        match self.run(async move { os.head(&p).await }) {
            Ok(_) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(self.err("looking up", key, e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self.list_meta(prefix)?.into_iter().map(|o| o.key).collect())
    }

    fn list_meta(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        // List the folder part, then filter by the rest (object_store lists by path segment).
        let dir = prefix.rfind('/').map_or("", |i| &prefix[..i]);
        let base = if dir.is_empty() { self.prefix.trim_end_matches('/').to_string() } else { format!("{}{dir}", self.prefix) };
        let p = if base.is_empty() { None } else { Some(OsPath::parse(&base).map_err(|e| anyhow!("bad store prefix `{prefix}`: {e}"))?) };
        let os = self.os.clone();
        let metas =
            self.run(async move { os.list(p.as_ref()).try_collect::<Vec<_>>().await }).map_err(|e| self.err("listing", prefix, e))?;
        let mut out: Vec<ObjectInfo> = metas
            .into_iter()
            .filter_map(|m| {
                let k = m.location.as_ref().strip_prefix(&self.prefix)?.to_string();
                k.starts_with(prefix).then(|| ObjectInfo { key: k, modified: m.last_modified.into(), bytes: m.size })
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<()> {
        let p = self.path(key)?;
        let os = self.os.clone();
        match self.run(async move { os.delete(&p).await }) {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(self.err("deleting", key, e)),
        }
    }

    fn staging_path(&self, name: &str) -> Result<PathBuf> {
        let d = std::env::temp_dir().join(format!("limitless-staging-{}", rustix::process::getuid().as_raw()));
        std::fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
        Ok(d.join(format!("{name}.{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed))))
    }

    fn describe(&self) -> String {
        self.url.clone()
    }

    fn chunks_of(&self, key: &str) -> Result<Option<Vec<String>>> {
        Ok(self.chunk_list(key)?.map(|l| l.chunks.into_iter().map(|c| chunk_key(&c.h)).collect()))
    }

    fn image_sink(&self, key: &str, parent: Option<&str>) -> Result<Option<Box<dyn ImageSink + '_>>> {
        let mut sink = self.sink(key)?;
        // Without its parent the image is stored whole all the same, only slower.
        sink.parent = match parent.map(|p| (p, self.parent_chunks(p))) {
            Some((_, Ok(Some(pc)))) => Some(pc),
            Some((p, Ok(None))) => {
                tracing::info!(
                    "not taking unchanged chunks from {p}: its page records are not whole chunks (an image of an earlier version)"
                );
                None
            }
            Some((p, Err(e))) => {
                tracing::warn!("not taking unchanged chunks from {p}: {e:#}");
                None
            }
            None => None,
        };
        Ok(Some(Box::new(sink)))
    }

    fn takes_unchanged(&self) -> bool {
        true
    }

    fn open_image(&self, key: &str) -> Result<ImageAt> {
        Ok(match self.source(key)? {
            Some(s) => ImageAt::Stream(Box::new(s)),
            None => ImageAt::Missing,
        })
    }
}

/// Bytes a [`ChunkSink`] collects before it cuts chunks: enough that every chunk but the
/// last one cut is final (each cut depends only on the bytes since the previous one, at
/// most `CHUNK_MAX`).
const SINK_BUFFER: usize = 4 * CHUNK_MAX;

/// Stores an image as it is written: cuts it into content-defined chunks, uploads those
/// the store does not have (a window of them at once), and writes the sealed chunk list
/// at [`ImageSink::finish`]. Dropped unfinished, it writes no list (the chunks it sent are
/// orphans for gc).
pub struct ChunkSink<'a> {
    store: &'a S3Store,
    key: String,
    buf: Vec<u8>,
    list: ChunkList,
    pending: VecDeque<JoinHandle<Result<u64>>>,
    sent: u64,
    /// The image this one may take chunks from, if any.
    parent: Option<ParentChunks>,
}

/// An image a [`ChunkSink`] may take whole chunks from: its chunk list, where each chunk
/// starts, and the image itself (read as far as its index) until the checkpoint takes it.
struct ParentChunks {
    chunks: Vec<ChunkRef>,
    starts: Vec<u64>,
    image: Option<(limitless_image::file::Image, PathBuf)>,
}

impl S3Store {
    fn sink(&self, key: &str) -> Result<ChunkSink<'_>> {
        self.path(key)?;
        Ok(ChunkSink {
            store: self,
            key: key.to_string(),
            buf: Vec::with_capacity(SINK_BUFFER + (1 << 20)),
            list: ChunkList { format: 1, bytes: 0, chunks: Vec::new() },
            pending: VecDeque::new(),
            sent: 0,
            parent: None,
        })
    }

    /// The image at `key` as a parent a [`ChunkSink`] can take chunks from; `None` unless
    /// each of its page records is made of whole chunks (an image stored before sinks ended
    /// chunks there is not: copying its records would mean fetching them all).
    fn parent_chunks(&self, key: &str) -> Result<Option<ParentChunks>> {
        let mut src = self.source(key)?.ok_or_else(|| anyhow!("there is no image {key}"))?;
        // Only its metadata and index are read: no chunks fetched ahead.
        src.ahead = 1;
        let (chunks, starts, len) = (src.chunks.clone(), src.starts.clone(), src.len);
        let image = limitless_image::file::Image::from_source(Box::new(src)).map_err(|e| anyhow!("the image {key}: {e}"))?;
        let edge = |off: u64| off == len || starts.binary_search(&off).is_ok();
        let whole = image
            .index
            .iter()
            .filter(|e| e.kind == limitless_image::format::kind::PAGES)
            .all(|e| edge(e.offset) && edge(e.offset + limitless_image::format::RecordHeader::SIZE as u64 + e.stored_len));
        Ok(whole.then(|| ParentChunks { chunks, starts, image: Some((image, PathBuf::from(super::image_name(self, key)))) }))
    }

    fn source(&self, key: &str) -> Result<Option<ChunkSource>> {
        let Some(list) = self.chunk_list(key)? else { return Ok(None) };
        let mut starts = Vec::with_capacity(list.chunks.len());
        let mut at = 0;
        for c in &list.chunks {
            starts.push(at);
            at += c.n;
        }
        Ok(Some(ChunkSource {
            os: self.os.clone(),
            rt: self.rt.handle().clone(),
            prefix: self.prefix.clone(),
            doing: self.doing("downloading", ""),
            known: self.known.clone(),
            ahead: self.in_flight,
            len: list.bytes,
            chunks: list.chunks,
            starts,
            state: Mutex::new(Window::default()),
        }))
    }
}

impl ChunkSink<'_> {
    /// Cuts the buffered bytes into chunks and sends them, all of them at the end, else
    /// all but the last (which more data may extend).
    fn cut(&mut self, end: bool) -> Result<()> {
        let mut cuts: Vec<(usize, usize)> =
            fastcdc::v2020::FastCDC::new(&self.buf, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX).map(|c| (c.offset, c.length)).collect();
        if !end {
            cuts.pop();
        }
        let mut used = 0;
        for (off, len) in cuts {
            self.send(self.buf[off..off + len].to_vec())?;
            used = off + len;
        }
        self.buf.drain(..used);
        Ok(())
    }

    fn send(&mut self, data: Vec<u8>) -> Result<()> {
        let h = blake3::hash(&data).to_hex().to_string();
        self.list.bytes += data.len() as u64;
        self.list.chunks.push(ChunkRef { h: h.clone(), n: data.len() as u64 });
        if self.store.known.lock().expect("known chunks").contains(&h) {
            return Ok(());
        }
        if self.pending.len() >= self.store.in_flight {
            self.sent += wait(self.pending.pop_front().expect("in flight"))?;
        }
        self.pending.push_back(self.store.upload_chunk(data, h)?);
        Ok(())
    }
}

impl Write for ChunkSink<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= SINK_BUFFER {
            self.cut(false).map_err(|e| std::io::Error::other(format!("{e:#}")))?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ImageSink for ChunkSink<'_> {
    fn name(&self) -> Option<PathBuf> {
        Some(PathBuf::from(super::image_name(self.store, &self.key)))
    }

    fn parent(&mut self) -> Option<(limitless_image::file::Image, PathBuf)> {
        self.parent.as_mut().and_then(|p| p.image.take())
    }

    fn append_parent(&mut self, off: u64, len: u64) -> std::io::Result<bool> {
        let Some(p) = &self.parent else { return Ok(false) };
        let Ok(first) = p.starts.binary_search(&off) else { return Ok(false) };
        let (mut end, mut n) = (first, 0);
        while n < len && end < p.chunks.len() {
            n += p.chunks[end].n;
            end += 1;
        }
        if n != len {
            return Ok(false);
        }
        let take = p.chunks[first..end].to_vec();
        self.boundary()?;
        self.list.bytes += len;
        self.list.chunks.extend(take);
        Ok(true)
    }

    fn boundary(&mut self) -> std::io::Result<()> {
        self.cut(true).map_err(|e| std::io::Error::other(format!("{e:#}")))
    }

    fn finish(mut self: Box<Self>) -> Result<u64> {
        self.cut(true)?;
        for h in std::mem::take(&mut self.pending) {
            self.sent += wait(h)?;
        }
        let body = serde_json::to_vec(&self.list)?;
        self.sent += body.len() as u64;
        let s = self.store;
        s.put_raw(&self.key, seal::seal(s.sealer.as_ref(), &self.key, &body), PutMode::Overwrite)?;
        Ok(self.sent)
    }
}

/// Chunks fetched or being fetched by a [`ChunkSource`].
#[derive(Default)]
struct Window {
    ready: HashMap<usize, Arc<Vec<u8>>>,
    coming: HashMap<usize, JoinHandle<Result<Vec<u8>>>>,
    /// The chunk read last.
    last: Option<usize>,
}

/// Reads an image stored as chunks: each chunk is fetched when it is first read and
/// checked against its hash; while reads go forward, the next chunks are fetched ahead
/// (`LIMITLESS_S3_PARALLEL` at once). Only the chunks around the reader are kept.
pub struct ChunkSource {
    os: Arc<AmazonS3>,
    rt: tokio::runtime::Handle,
    prefix: String,
    doing: String,
    known: Arc<Mutex<HashSet<String>>>,
    ahead: usize,
    len: u64,
    chunks: Vec<ChunkRef>,
    starts: Vec<u64>,
    state: Mutex<Window>,
}

impl ChunkSource {
    /// The chunk holding byte `off` (`off` below the image's length).
    fn chunk_at(&self, off: u64) -> usize {
        self.starts.partition_point(|&s| s <= off) - 1
    }

    fn fetch(&self, i: usize) -> JoinHandle<Result<Vec<u8>>> {
        let r = self.chunks[i].clone();
        let ck = chunk_key(&r.h);
        let p = OsPath::parse(format!("{}{ck}", self.prefix));
        let os = self.os.clone();
        let what = format!("{}{ck}", self.doing);
        self.rt.spawn(async move {
            let p = p.map_err(|e| anyhow!("bad chunk key {ck}: {e}"))?;
            let stored = match os.get(&p).await {
                Ok(g) => g.bytes().await.map_err(|e| anyhow!("{what} failed: {e}"))?,
                Err(e) if is_not_found(&e) => bail!("{what} failed: the chunk is missing from the store"),
                Err(e) => bail!("{what} failed: {e}"),
            };
            tokio::task::spawn_blocking(move || decode(&ck, &r, &stored)).await?
        })
    }

    /// Chunk `i`, checked; fetches it (and, reading forward, the next ones) if needed.
    fn chunk(&self, i: usize) -> Result<Arc<Vec<u8>>> {
        let mut w = self.state.lock().expect("chunk window");
        let forward = w.last.is_some_and(|l| i == l || i == l + 1);
        w.last = Some(i);
        // Keep the chunk before this one (a record may straddle them) and those ahead.
        w.ready.retain(|&k, _| k + 1 >= i && k <= i + self.ahead);
        if let Some(d) = w.ready.get(&i) {
            return Ok(d.clone());
        }
        let want = if forward { (i..self.chunks.len()).take(self.ahead).collect::<Vec<_>>() } else { vec![i] };
        for k in want {
            if !w.ready.contains_key(&k) && !w.coming.contains_key(&k) {
                let h = self.fetch(k);
                w.coming.insert(k, h);
            }
        }
        let h = w.coming.remove(&i).expect("requested above");
        let d = Arc::new(wait(h)?);
        self.known.lock().expect("known chunks").insert(self.chunks[i].h.clone());
        w.ready.insert(i, d.clone());
        // Fetched chunks ahead move to the ready set as they arrive.
        let done: Vec<usize> = w.coming.iter().filter(|(_, h)| h.is_finished()).map(|(&k, _)| k).collect();
        for k in done {
            if let Some(h) = w.coming.remove(&k) {
                let d = wait(h)?;
                self.known.lock().expect("known chunks").insert(self.chunks[k].h.clone());
                w.ready.insert(k, Arc::new(d));
            }
        }
        Ok(d)
    }
}

impl Source for ChunkSource {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.len)
    }

    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let at = off + done as u64;
            if at >= self.len {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let i = self.chunk_at(at);
            let d = self.chunk(i).map_err(|e| std::io::Error::other(format!("{e:#}")))?;
            let o = (at - self.starts[i]) as usize;
            let n = (buf.len() - done).min(d.len() - o);
            buf[done..done + n].copy_from_slice(&d[o..o + n]);
            done += n;
        }
        Ok(())
    }
}

impl Drop for ChunkSource {
    fn drop(&mut self) {
        if let Ok(w) = self.state.get_mut() {
            for h in w.coming.values() {
                h.abort();
            }
        }
    }
}

impl Drop for S3Store {
    fn drop(&mut self) {
        for p in self.staged.lock().map(|v| v.clone()).unwrap_or_default() {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_encode_and_check() {
        let zeros = vec![0u8; 100_000];
        let z = encode(&zeros);
        assert_eq!(z[0], ZSTD);
        assert!(z.len() < 1000);
        let mut rnd = vec![0u8; 100_000];
        let mut x = 0x9E3779B97F4A7C15u64;
        for b in rnd.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let r = encode(&rnd);
        assert_eq!(r[0], RAW);
        for (data, enc) in [(&zeros, &z), (&rnd, &r)] {
            let cr = ChunkRef { h: blake3::hash(data).to_hex().to_string(), n: data.len() as u64 };
            assert_eq!(&decode("c", &cr, enc).unwrap(), data);
            let mut bad = enc.clone();
            let last = bad.len() - 1;
            bad[last] ^= 1;
            assert!(decode("c", &cr, &bad).is_err());
        }
    }
}

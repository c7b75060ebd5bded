//! Taking a checkpoint of a supervised program into an image file.
//!
//! The agent freezes the program and streams its records through a pipe; the supervisor
//! meanwhile empties the program's output pipes (so everything written before the freeze
//! is out) and copies the input it has not read yet, then writes the image file (header,
//! records, index with per-record hashes, trailer) with its write-back to disk started as it
//! goes ([`super::early`]), `fsync`s it, checks it reads back, and
//! renames it into place. Only then is the program resumed or killed: a failure at any step
//! leaves the program running and no image behind.
//!
//! A leave-running checkpoint is a *snapshot* when it can be: once the input is copied the
//! supervisor says `STDIO_SAVED`, and the agent lets the program run on while a
//! copy-on-write child process writes the page data (`RELEASED`; see the agent's
//! `snapshot` module). The program is then stopped only until the release, not until the
//! image is durable. Not with carried files (`--carry`: they are read at the end of the
//! stream and must not change meanwhile), nor with `LIMITLESS_SNAPSHOT=0` in the
//! environment.
//!
//! The image can go to an [`ImageSink`] instead of a file ([`Inner::checkpoint_to`]): an
//! object store that uploads it while it is written, so that no whole image is ever on
//! local disk or in memory.

use super::compress::{Compress, Compressor};
use super::early::EarlyFlush;
use super::link::AgentMsg;
use super::supervisor::Inner;
use anyhow::{anyhow, bail, Context, Result};
use limitless_image::ctl::{ckpt_flags, msg, Checkpoint};
use limitless_image::file::{read_stream, Finished, Image, ParentMap, Writer};
use limitless_image::format::{kind, page_sum, rflags, RecordHeader, FORMAT_MINOR};
use serde::{Deserialize, Serialize};
use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// What happens to the program once its image is durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum After {
    /// It continues (`--leave-running`). When it can, the agent lets it run again as soon
    /// as a copy-on-write snapshot of it exists, while the snapshot writes the image
    /// ([`Stats::snapshot`]).
    Resume,
    /// It is killed; `launch`/`restore` then exit with `EXIT_CHECKPOINTED`.
    Kill,
    /// It stays frozen, its input paused, until [`Inner::release`]: the caller stores the
    /// image elsewhere first and decides then.
    Hold,
}

/// A checkpoint request.
#[derive(Clone, Debug)]
pub struct Request {
    /// Where the image goes (written next to it, then renamed).
    pub output: PathBuf,
    /// What happens to the program afterwards.
    pub after: After,
    /// How long to wait for every thread to stop.
    pub freeze_timeout: Duration,
    /// Wait up to this long for a moment with no connected TCP socket before freezing.
    pub wait_idle: Duration,
    /// Write a delta image: page records that this earlier image (or the images it refers
    /// to) has unchanged are references to it, not copies. Image files only.
    pub parent: Option<PathBuf>,
    /// Compress page records where that pays (image files only; also with
    /// `LIMITLESS_COMPRESS` in the environment, see [`Compress::or_env`]).
    pub compress: Compress,
    /// Store private file mappings (the program, its libraries) whole, so that a restore
    /// needs none of those files.
    pub self_contained: bool,
    /// Store every page whole, never as its changes from the file mapped there or from
    /// zeros ([`super::diff`]; also with `LIMITLESS_DIFF=0` in the environment).
    pub whole_pages: bool,
}

impl Request {
    /// A checkpoint to `output` (an image file, or empty for a sink), then `after`; the
    /// rest as `dump` has it by default: freeze within [`super::api::FREEZE_TIMEOUT`], no
    /// wait for idle sockets, a full image, raw, pages stored as their changes.
    pub fn new(output: PathBuf, after: After) -> Request {
        Request {
            output,
            after,
            freeze_timeout: super::api::FREEZE_TIMEOUT,
            wait_idle: Duration::ZERO,
            parent: None,
            compress: Compress::Off,
            self_contained: false,
            whole_pages: false,
        }
    }
}

/// What a checkpoint cost.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Stats {
    /// Threads in the image (the agent's included).
    pub threads: u32,
    /// Time to stop every thread.
    pub freeze_ms: f64,
    /// Time the program was stopped in all (from the request to the threads running again:
    /// their release after a snapshot, else the resume or kill).
    pub frozen_ms: f64,
    /// Time the agent spent writing its stream.
    pub write_ms: f64,
    /// Request to durable image.
    pub total_ms: f64,
    /// Size of the image file.
    pub image_bytes: u64,
    /// Pages of memory stored.
    pub pages: u64,
    /// Unread input carried in the image.
    pub stdin_bytes: u64,
    /// Bytes of carried files (`--carry`).
    #[serde(default)]
    pub carried_bytes: u64,
    /// The image's trailer hash (hex), which names this exact image.
    #[serde(default)]
    pub trailer_hash: String,
    /// Bytes an [`ImageSink`] sent (after deduplication and compression).
    #[serde(default)]
    pub sent_bytes: Option<u64>,
    /// Bytes of page data a delta image takes from its parents instead of storing them.
    #[serde(default)]
    pub referenced_bytes: u64,
    /// Bytes of page data copied from the parent image, unread, where dirty tracking found
    /// them unchanged (an image streamed to a store that already holds them).
    #[serde(default)]
    pub copied_bytes: u64,
    /// Page records written.
    #[serde(default)]
    pub page_records: u64,
    /// Pages the agent's dirty tracking found unchanged since the parent image: not read,
    /// referenced.
    #[serde(default)]
    pub unchanged_pages: u64,
    /// The agent's dirty-tracking epoch of this checkpoint (0: not tracking).
    #[serde(default)]
    pub epoch: u64,
    /// Page records written compressed (`--compress` compresses a record only when it
    /// pays and a core is free).
    #[serde(default)]
    pub compressed_records: u64,
    /// Page records stored as their changes from the files mapped there or from zeros.
    #[serde(default)]
    pub diff_records: u64,
    /// The program keeps running.
    pub left_running: bool,
    /// The program ran on while a copy-on-write snapshot wrote the image.
    #[serde(default)]
    pub snapshot: bool,
    /// Why a leave-running checkpoint was not a snapshot, if the agent said.
    #[serde(default)]
    pub note: Option<String>,
}

/// Somewhere an image is streamed to as it is written (an object store's uploader).
pub trait ImageSink: Write + Send {
    /// Completes the image once every byte is written; returns the bytes sent. A sink
    /// dropped without `finish` abandons its image.
    fn finish(self: Box<Self>) -> Result<u64>;
    /// This image's name: what a restore from it, or a checkpoint on top of it, calls it
    /// (see [`crate::store::image_name`]). `None`: a sink that cannot be a parent.
    fn name(&self) -> Option<PathBuf> {
        None
    }
    /// The image (in the same store) that this one may take unchanged page records from,
    /// read as far as its index, and its name; taken once. With it, and a program whose
    /// dirty tracking started from that image, the agent sends only the windows written
    /// since, and the others are copied from the parent ([`Writer::copy_from_parent`]):
    /// the new image is still whole.
    fn parent(&mut self) -> Option<(Image, PathBuf)> {
        None
    }
    /// Appends the parent's bytes `off..off + len` without their passing through here, if
    /// the store holds them as whole chunks (true); false: the caller writes them.
    fn append_parent(&mut self, _off: u64, _len: u64) -> std::io::Result<bool> {
        Ok(false)
    }
    /// Ends a chunk here: what is written next starts a new one, so that a page record
    /// is made of whole chunks, which a later image can take again.
    fn boundary(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What [`Inner::run_checkpoint`] writes to: an image file or a sink.
trait ImageOut: Write {
    /// See [`ImageSink::append_parent`].
    fn append_parent(&mut self, _off: u64, _len: u64) -> std::io::Result<bool> {
        Ok(false)
    }
    /// See [`ImageSink::boundary`].
    fn boundary(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    /// Whether [`boundary`](Self::boundary) means anything here (then the writer's buffer
    /// is flushed around each page record, so that the boundary falls where it should).
    fn chunked(&self) -> bool {
        false
    }
}

impl ImageOut for EarlyFlush {}

impl ImageOut for Box<dyn ImageSink + '_> {
    fn append_parent(&mut self, off: u64, len: u64) -> std::io::Result<bool> {
        (**self).append_parent(off, len)
    }
    fn boundary(&mut self) -> std::io::Result<()> {
        (**self).boundary()
    }
    fn chunked(&self) -> bool {
        true
    }
}

/// The parent of a new image: a delta refers to its records; in copy mode the image
/// stays whole and takes unchanged windows from it.
struct ParentUse {
    map: ParentMap,
    copy: bool,
}

/// A checkpoint failed because its image could not be written (a full disk, a store that
/// went away), not because of the program or the agent.
#[derive(Debug)]
pub struct WriteFailed(pub String);

impl std::fmt::Display for WriteFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "writing the image failed: {}", self.0)
    }
}

impl std::error::Error for WriteFailed {}

/// Where a checkpoint writes.
enum Dest<'s> {
    File { tmp: PathBuf, file: File },
    Sink(Box<dyn ImageSink + 's>),
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn tmp_path(out: &Path) -> PathBuf {
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "image".into());
    out.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

impl Inner {
    fn next_event(&self, limit: Duration) -> Result<AgentMsg> {
        let rx = self.events.lock().unwrap_or_else(|e| e.into_inner());
        rx.recv_timeout(limit).map_err(|_| anyhow!("the agent did not answer within {} s", limit.as_secs()))
    }

    /// Takes a checkpoint into the file `req.output` (see the module documentation).
    pub fn checkpoint(&self, req: &Request) -> Result<Stats> {
        self.checkpoint_with(req, None)
    }

    /// Takes a checkpoint into `sink` (`req.output` is not used). The sink is finished
    /// before the program is released, so the image is complete before an
    /// [`After::Kill`] takes the program away.
    pub fn checkpoint_to<'s>(&self, req: &Request, sink: Box<dyn ImageSink + 's>) -> Result<Stats> {
        self.checkpoint_with(req, Some(sink))
    }

    fn checkpoint_with<'s>(&self, req: &Request, sink: Option<Box<dyn ImageSink + 's>>) -> Result<Stats> {
        let _one = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let t0 = Instant::now();
        // A request right after the launch can arrive before the agent's greeting has been
        // read; give it a moment (an exit ends the wait at once).
        self.wait_state(Duration::from_secs(2), |s| s.hello.is_some() || s.restored.is_some() || s.closed);
        {
            let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if st.closed {
                bail!("the program has exited");
            }
            if st.hello.is_none() && st.restored.is_none() {
                bail!("the program's agent has not started (is the program statically linked, or did it clear LD_PRELOAD?)");
            }
        }
        if self.stopped.load(Ordering::SeqCst) {
            bail!("the program was already checkpointed and stopped");
        }
        // Forget stale events from an earlier checkpoint.
        {
            let rx = self.events.lock().unwrap_or_else(|e| e.into_inner());
            while rx.try_recv().is_ok() {}
        }
        let mut sink = sink;
        let sink_name = sink.as_ref().and_then(|s| s.name());
        let in_store = sink.as_mut().and_then(|s| s.parent());
        let parent = match (&req.parent, &sink) {
            (None, _) => None,
            (Some(_), Some(_)) => bail!("a delta image (--parent) can only be written to a file"),
            (Some(p), None) => Some(parent_map(p)?),
        };
        // The agent may skip memory unchanged since the parent if the parent is the image
        // its dirty tracking started from (same name, same contents).
        let tracked = self.tracked.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let epoch_from = |path: &Path, hash: &[u8; 32]| match &tracked {
            Some((tpath, thash, epoch)) if path == tpath && hash == thash => *epoch as u32,
            _ => 0,
        };
        let (parent, parent_epoch) = match (parent, in_store) {
            (Some((map, path, hash)), _) => (Some(ParentUse { map, copy: false }), epoch_from(&path, &hash)),
            // A sink's parent is of use only for what tracking found unchanged, and only if
            // it is whole and of this format (its records are copied as they are).
            (None, Some((img, name))) => match epoch_from(&name, &img.trailer.trailer_hash) {
                e if e != 0 && img.parents.is_empty() && img.header.minor == FORMAT_MINOR => match ParentMap::of(img, &name) {
                    Ok(map) => (Some(ParentUse { map, copy: true }), e),
                    Err(err) => {
                        tracing::warn!("checkpoint: not taking unchanged memory from {}: {err}", name.display());
                        (None, 0)
                    }
                },
                _ => (None, 0),
            },
            (None, None) => (None, 0),
        };
        // Arm dirty tracking for a later checkpoint on top of this one: leave-running
        // checkpoints to files, or to sinks that can be parents.
        let track = req.after == After::Resume
            && (sink.is_none() || sink_name.is_some())
            && std::env::var_os("LIMITLESS_TRACK").is_none_or(|v| v != "0");
        let dest = match sink {
            Some(s) => Dest::Sink(s),
            None => {
                let dir = req.output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
                if !dir.is_dir() {
                    bail!("the directory {} does not exist", dir.display());
                }
                // The image replaces what is at the path by a rename; that must not be a
                // device (`-o /dev/null` would replace the device node), pipe or directory.
                if fs::metadata(&req.output).is_ok_and(|m| !m.is_file()) {
                    bail!("{} exists and is not a regular file; give the path of an image file to write", req.output.display());
                }
                let tmp = tmp_path(&req.output);
                let file = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
                Dest::File { tmp, file }
            }
        };
        let remove_tmp = |d: &Dest| {
            if let Dest::File { tmp, .. } = d {
                let _ = fs::remove_file(tmp);
            }
        };
        let (pr, pw) = super::stdio::pipe()?;
        let _ = rustix::pipe::fcntl_setpipe_size(&pw, 1 << 20);
        let snapshot = req.after == After::Resume && !self.carry.any() && std::env::var_os("LIMITLESS_SNAPSHOT").is_none_or(|v| v != "0");
        let c = Checkpoint {
            flags: match req.after {
                After::Resume if snapshot => ckpt_flags::LEAVE_RUNNING | ckpt_flags::SNAPSHOT,
                After::Resume => ckpt_flags::LEAVE_RUNNING,
                _ => 0,
            } | if req.self_contained { ckpt_flags::SELF_CONTAINED } else { 0 }
                | if track { ckpt_flags::TRACK } else { 0 },
            freeze_timeout_ms: req.freeze_timeout.as_millis().min(u32::MAX as u128) as u32,
            stdio_ino: self.stdio_ino,
            wait_idle_ms: req.wait_idle.as_millis().min(u32::MAX as u128) as u32,
            parent_epoch,
        };
        if let Err(e) = self.link.send_wire(msg::CHECKPOINT, &c, Some(pw.as_fd())) {
            remove_tmp(&dest);
            bail!("cannot reach the agent: {e}");
        }
        drop(pw);
        let r = match dest {
            Dest::File { tmp, file } => {
                let early = EarlyFlush::new(file);
                let mut squeeze = Compressor::new(req.compress.or_env());
                if let Some(b) = early.behind() {
                    squeeze = squeeze.when_behind(b);
                }
                self.run_checkpoint(req, early, pr, snapshot, squeeze, parent)
                    .and_then(|(stats, at, f, fin)| {
                        let t = Instant::now();
                        f.into_inner().sync_all().context("fsync of the image failed")?;
                        tracing::debug!("checkpoint: final fsync {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
                        finish_file(&tmp, &req.output)?;
                        Ok((stats, at, fin, None, fs::canonicalize(&req.output).ok()))
                    })
                    .inspect_err(|_| {
                        let _ = fs::remove_file(&tmp);
                    })
            }
            Dest::Sink(s) => self
                .run_checkpoint(req, s, pr, snapshot, Compressor::new(Compress::Off), parent)
                .and_then(|(stats, at, s, fin)| Ok((stats, at, fin, Some(s.finish()?), sink_name))),
        };
        match r {
            Ok((mut stats, frozen_at, fin, sent, name)) => {
                // A later checkpoint on top of this image may use the agent's tracking.
                *self.tracked.lock().unwrap_or_else(|e| e.into_inner()) =
                    name.filter(|_| stats.epoch != 0).map(|p| (p, fin.trailer_hash, stats.epoch));
                stats.image_bytes = fin.len;
                stats.trailer_hash = fin.trailer_hash.iter().map(|b| format!("{b:02x}")).collect();
                stats.sent_bytes = sent;
                stats.referenced_bytes = fin.referenced;
                stats.copied_bytes = fin.copied;
                match req.after {
                    After::Resume => self.release(true),
                    After::Kill => self.release(false),
                    After::Hold => {}
                }
                if !stats.snapshot {
                    stats.frozen_ms = stats.freeze_ms + ms(frozen_at.elapsed());
                }
                stats.total_ms = ms(t0.elapsed());
                stats.left_running = req.after == After::Resume;
                Ok(stats)
            }
            Err(e) => {
                self.release(true);
                Err(e)
            }
        }
    }

    /// Ends a checkpoint: the program continues (`resume`) or is killed; its input flows
    /// again either way. Called by [`checkpoint`](Self::checkpoint) itself unless the
    /// request said [`After::Hold`].
    pub fn release(&self, resume: bool) {
        if resume {
            let _ = self.link.send(msg::RESUME, &[], None);
        } else {
            self.stopped.store(true, Ordering::SeqCst);
            self.kill();
        }
        self.input.resume();
    }

    /// Streams the image into `out`; returns the statistics, when the program froze, `out`
    /// and what was written. The program's input stays paused until
    /// [`release`](Self::release), so none is lost.
    fn run_checkpoint<W: ImageOut>(
        &self,
        req: &Request,
        out: W,
        pr: std::os::fd::OwnedFd,
        snapshot: bool,
        mut squeeze: Compressor,
        parent: Option<ParentUse>,
    ) -> Result<(Stats, Instant, W, Finished)> {
        let mut stats = Stats::default();
        let wait = req.freeze_timeout + req.wait_idle + Duration::from_secs(10);
        loop {
            match self.next_event(wait)? {
                AgentMsg::Frozen(f) => {
                    stats.threads = f.threads;
                    stats.freeze_ms = f.freeze_ns as f64 / 1e6;
                    break;
                }
                // A greeting that reached the event queue just after the stale events were
                // dropped (the reader thread records it before it queues it).
                AgentMsg::Hello(_) | AgentMsg::Restored(_) | AgentMsg::Note(_) => continue,
                AgentMsg::Failed(t) => bail!("the checkpoint failed: {t}"),
                AgentMsg::Closed => bail!("the program exited before it could be checkpointed"),
                m => bail!("unexpected message from the agent: {m:?}"),
            }
        }
        let frozen_at = Instant::now();
        crate::failpoint::hit("checkpoint.frozen");
        // Everything the program wrote before the freeze goes out before the image is done.
        self.out.drain(Duration::from_secs(10));
        self.err.drain(Duration::from_secs(10));
        let stdin = self.input.pause_and_peek();
        stats.stdin_bytes = stdin.len() as u64;
        if snapshot {
            // The agent may let the program go once its copy-on-write child exists.
            self.link.send(msg::STDIO_SAVED, &[], None).context("cannot reach the agent")?;
        }
        let chunked = out.chunked();
        let mut w = Writer::new(BufWriter::with_capacity(1 << 20, out), now_unix_ns())?;
        if chunked {
            // A pad would start the chunks of the page record after it.
            w.unaligned();
        }
        let copy = parent.as_ref().is_some_and(|p| p.copy);
        match parent {
            Some(ParentUse { map, copy: true }) => w.copy_from_parent(map),
            Some(ParentUse { map, copy: false }) => w.set_parents(map),
            None => {}
        }
        // In a store that keeps chunks, each page record is made of whole chunks, so that a
        // later image can take it again without reading it (copy mode).
        let boundary = |w: &mut Writer<BufWriter<W>>| -> std::io::Result<()> {
            if chunked {
                w.out_mut().flush()?;
                w.out_mut().get_mut().boundary()?;
            }
            Ok(())
        };
        // Small: it serves record headers and small records. A page record's payload
        // (1 MiB) is mostly read past it, straight from the pipe, instead of being copied
        // through it.
        let reader = BufReader::with_capacity(64 << 10, File::from(pr));
        let mut records = 0u64;
        let mut written: Vec<std::path::PathBuf> = Vec::new();
        let mut carrier = super::carry::Carrier::default();
        // Why writing the image failed (a full disk, a store that went away), as opposed
        // to the agent's stream breaking off.
        let mut write_err: Option<String> = None;
        let mut exec_files = ExecFiles::default();
        let mut differ = super::diff::Differ::new(!req.whole_pages);
        let streamed = read_stream_ahead(reader, squeeze.wants_sums(), |h, payload, sum| {
            records += 1;
            if h.kind == kind::PAGES && h.flags == rflags::REF {
                // A window the agent's dirty tracking found unchanged since the parent.
                squeeze.flush(&mut w).inspect_err(|e| write_err = Some(e.to_string()))?;
                let r = if copy {
                    w.unchanged_copied(&payload, |bw, off, len| {
                        bw.flush()?;
                        bw.get_mut().append_parent(off, len)
                    })
                } else {
                    w.unchanged(&payload)
                };
                return r.map(|()| Some(payload)).inspect_err(|e| write_err = Some(e.to_string()));
            }
            if h.kind == kind::PAGES {
                let r = boundary(&mut w)
                    .and_then(|()| match differ.encode(&payload) {
                        // In order, after the records queued for compression.
                        Some(changes) => squeeze.changes(&mut w, payload, changes),
                        None => squeeze.pages(&mut w, payload, sum),
                    })
                    .and_then(|p| boundary(&mut w).map(|()| p));
                return r.inspect_err(|e| write_err = Some(e.to_string()));
            }
            squeeze.flush(&mut w).inspect_err(|e| write_err = Some(e.to_string()))?;
            if records == 20 {
                crate::failpoint::hit("checkpoint.writing");
            }
            if h.kind == kind::FD && self.carry.written {
                written.extend(super::carry::written_file(&payload));
            }
            if h.kind == kind::VMA {
                exec_files.note(&payload);
                differ.note(&payload);
            }
            if h.kind == kind::END {
                if let Some(ids) = exec_files.record() {
                    w.plain(kind::FILE_IDS, &ids).inspect_err(|e| write_err = Some(e.to_string()))?;
                }
                // The program is frozen: its files are as it left them.
                for p in self.carry.dirs.iter().chain(written.iter()) {
                    carrier.add(&mut w, p).map_err(|e| std::io::Error::other(format!("{e:#}")))?;
                }
                if !stdin.is_empty() {
                    w.plain(kind::STDIN, &stdin).inspect_err(|e| write_err = Some(e.to_string()))?;
                }
            }
            w.plain(h.kind, &payload).map(|()| Some(payload)).inspect_err(|e| write_err = Some(e.to_string()))
        });
        stats.carried_bytes = carrier.bytes;
        stats.diff_records = squeeze.changes + squeeze.compressed_changes;
        stats.page_records = squeeze.compressed + squeeze.raw + stats.diff_records;
        stats.compressed_records = squeeze.compressed + squeeze.compressed_changes;
        if let Err(e) = streamed {
            if let Some(why) = write_err {
                return Err(WriteFailed(why).into());
            }
            // The agent says why, if it can.
            let why = loop {
                break match self.next_event(Duration::from_secs(5)) {
                    Ok(AgentMsg::Released(_) | AgentMsg::Note(_)) => continue,
                    Ok(AgentMsg::Failed(t)) => t,
                    Ok(AgentMsg::Closed) => "the program exited during the checkpoint".into(),
                    _ => format!("the image stream broke off ({e})"),
                };
            };
            bail!("the checkpoint failed: {why}");
        }
        loop {
            match self.next_event(Duration::from_secs(30))? {
                AgentMsg::Released(r) => {
                    stats.snapshot = true;
                    stats.frozen_ms = r.frozen_ns as f64 / 1e6;
                }
                AgentMsg::Note(t) => stats.note = Some(t),
                AgentMsg::Done(d) => {
                    stats.pages = d.pages;
                    stats.write_ms = d.write_ns as f64 / 1e6;
                    stats.epoch = d.epoch;
                    stats.unchanged_pages = d.unchanged_pages;
                    break;
                }
                AgentMsg::Failed(t) => bail!("the checkpoint failed: {t}"),
                AgentMsg::Closed => bail!("the program exited during the checkpoint"),
                m => bail!("unexpected message from the agent: {m:?}"),
            }
        }
        let (bw, fin) = w.finish().map_err(|e| anyhow!("writing the image failed: {e}"))?;
        let out = bw.into_inner().map_err(|e| anyhow!("writing the image failed: {}", e.error()))?;
        Ok((stats, frozen_at, out, fin))
    }
}

/// The executable files a program has mapped, for their build-ids.
#[derive(Default)]
struct ExecFiles(Vec<Vec<u8>>);

impl ExecFiles {
    /// Notes the file of a VMA record's payload if it is mapped executable.
    fn note(&mut self, payload: &[u8]) {
        use limitless_image::format::{vma_kind, VmaInfo};
        let Some(v) = VmaInfo::decode(payload) else { return };
        let Some(name) = payload.get(VmaInfo::SIZE..VmaInfo::SIZE + v.name_len as usize) else { return };
        if v.kind == vma_kind::FILE_PRIVATE && v.prot & 4 != 0 && !self.0.iter().any(|n| n == name) {
            self.0.push(name.to_vec());
        }
    }

    /// The FILE_IDS payload: the build-id of each noted file that has one.
    fn record(&self) -> Option<Vec<u8>> {
        use std::os::unix::ffi::OsStrExt;
        let mut body = Vec::new();
        let mut n = 0u32;
        for name in &self.0 {
            let Some(id) = super::elf::build_id(Path::new(std::ffi::OsStr::from_bytes(name))) else { continue };
            body.extend_from_slice(&(name.len() as u32).to_le_bytes());
            body.extend_from_slice(&(id.len() as u32).to_le_bytes());
            body.extend_from_slice(&id);
            body.extend_from_slice(name);
            n += 1;
        }
        (n > 0).then(|| [&n.to_le_bytes()[..], &[0; 4], &body].concat())
    }
}

/// The page records the image at `path` (and the images it refers to) holds, for a delta
/// image on top of it.
/// The page records a delta on top of `path` can refer to, with the parent's canonical
/// path and trailer hash.
fn parent_map(path: &Path) -> Result<(ParentMap, PathBuf, [u8; 32])> {
    let abs = fs::canonicalize(path).with_context(|| format!("cannot use {} as the parent image", path.display()))?;
    let mut img = Image::open(&abs).map_err(|e| anyhow!("cannot use {} as the parent image: {e}", path.display()))?;
    img.attach_parents().map_err(|e| anyhow!("cannot use {} as the parent image: {e}", path.display()))?;
    let named = img.trailer.trailer_hash;
    let m = ParentMap::of(img, &abs).map_err(|e| anyhow!("cannot use {} as the parent image: {e}", path.display()))?;
    Ok((m, abs, named))
}

/// [`read_stream`] on a thread of its own, with `f` called here for each record: reading
/// the pipe then overlaps with checksumming, compressing and writing the image. One thread
/// doing all of it was the bottleneck of a large checkpoint (busy nearly all of a 1 GiB
/// checkpoint into tmpfs, while the agent was busy less than half of it). The reading
/// thread also computes each page record's [`page_sum`] while its bytes are in its cache
/// and passes it to `f`: the writing thread, which copies the bytes into the page cache,
/// was still the busier of the two. At most four records wait between the two.
///
/// `f` returns the payload's buffer when it is done with it (not queued for compression);
/// the reader reads later records into those buffers rather than new ones. Without `sums`
/// the reader computes no checksum (`f` gets `None`).
fn read_stream_ahead<R: std::io::Read + Send + 'static>(
    r: R,
    sums: bool,
    mut f: impl FnMut(RecordHeader, Vec<u8>, Option<[u8; 32]>) -> std::io::Result<Option<Vec<u8>>>,
) -> std::io::Result<()> {
    let (tx, rx) = std::sync::mpsc::sync_channel(4);
    // Buffers handed back; no more can be in it than records in flight.
    let (back_tx, back_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let reader = std::thread::Builder::new().name("limitless-read".into()).spawn(move || {
        read_stream(
            r,
            || back_rx.try_recv().unwrap_or_default(),
            |h, p| {
                let sum = (sums && h.kind == kind::PAGES && h.flags == 0).then(|| page_sum(&p));
                tx.send((h, p, sum)).map_err(|_| std::io::Error::other("the image writer stopped"))
            },
        )
    })?;
    for (h, p, sum) in rx.iter() {
        // On an error the receiver goes; the reader then stops at its next record and
        // closes the pipe, as this thread closing it did before.
        if let Some(b) = f(h, p, sum)? {
            // The reader may have ended (after `END`): then the buffer just goes.
            let _ = back_tx.send(b);
        }
    }
    reader.join().unwrap_or_else(|_| Err(std::io::Error::other("the image stream reader panicked")))
}

/// Checks the written image reads back, renames it into place and makes the rename durable.
fn finish_file(tmp: &Path, out: &Path) -> Result<()> {
    Image::open(tmp).map_err(|e| anyhow!("the image just written does not read back: {e}"))?;
    fs::rename(tmp, out).with_context(|| format!("cannot rename the image to {}", out.display()))?;
    let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn now_unix_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

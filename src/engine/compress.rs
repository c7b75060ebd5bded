//! Compression of an image file's page records, when it can make a checkpoint faster.
//!
//! Compressing costs CPU time and memory bandwidth, which the checkpoint itself uses; it
//! saves only the time the disk would spend on the bytes it removes. So by default
//! ([`Compress::Idle`], `dump --compress`) it is opportunistic: a page record (at most
//! 1 MiB of pages) is compressed only while the disk is behind (the image file's data
//! from [`LAG`](super::early) ago is not yet written, which the writer asks the kernel at
//! every write-back request) *and* a worker is free; otherwise it is stored raw at once.
//! While the disk keeps up, then, the checkpoint runs as raw. A record about to be
//! compressed is first tried on a 16 KiB sample; one that does not compress (random,
//! already compressed) is stored raw at the cost of that small trial. The workers run under
//! `SCHED_IDLE`. Records are written in their order: raw records that come behind one still
//! being compressed wait in memory (at most [`HELD`] of them) and are written as soon as it
//! is done. A sink that cannot tell whether its disk keeps up (no `cachestat`) gets every
//! record a free worker can take. A record stored as its changes ([`super::diff`]) goes the
//! same way, its changes compressed in place of its pages (image format 1.7).
//!
//! With [`Compress::All`] (`dump --compress=all`) every record whose sample compresses is
//! compressed, the writer waiting for a free worker, and the workers run at normal
//! priority: the smallest image, at the cost of time (on this machine about 1.5x raw for
//! text-like memory, docs/benchmarks.md).
//!
//! It is off unless asked for (`dump --compress[=all]`, or `LIMITLESS_COMPRESS=1` or `=all`
//! in the supervisor's environment). An image with compressed records restores through the
//! supervisor rather than by `pread`, which is slower. Images for a store that takes a
//! stream are not compressed here: the store compresses its chunks.

use limitless_image::file::{compress_if_smaller, sample_compresses, Writer};
use limitless_image::format::{kind, PagesHeader};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Whether and how page records are compressed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Compress {
    /// Stored raw.
    #[default]
    Off,
    /// Compressed while the disk is behind and a core is idle to do it; never waited for.
    Idle,
    /// Every record that compresses, waiting for the workers.
    All,
}

impl Compress {
    /// This, or if it is `Off`, what `LIMITLESS_COMPRESS` in the environment asks for
    /// (`1` or `idle`, `all`).
    pub fn or_env(self) -> Compress {
        if self != Compress::Off {
            return self;
        }
        match std::env::var("LIMITLESS_COMPRESS").as_deref() {
            Ok("1" | "idle") => Compress::Idle,
            Ok("all") => Compress::All,
            _ => Compress::Off,
        }
    }
}

/// Records held in memory behind one that is being compressed before the writer waits.
const HELD: usize = 32;

/// A page record on its way out: its pages, or (`changes`) its changes ([`super::diff`]),
/// each after its pages header.
enum Slot {
    /// Stored as it is.
    Raw(Vec<u8>, bool),
    /// With a worker; its result carries this sequence number.
    Working(u64, bool),
    /// Compressed (`Some`) or found not worth it (`None`).
    Done(Vec<u8>, Option<Vec<u8>>, bool),
}

/// A finished job: sequence number, the record, its compressed pages if they are smaller.
type Compressed = (u64, Vec<u8>, Option<Vec<u8>>);

/// The worker threads and their queues.
struct Pool {
    jobs: Option<Sender<(u64, Vec<u8>)>>,
    results: Receiver<Compressed>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    fn start(n: usize, idle: bool) -> Pool {
        let (jobs, job_rx) = channel::<(u64, Vec<u8>)>();
        let (done, results) = channel();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let threads = (0..n)
            .map(|_| {
                let job_rx = job_rx.clone();
                let done = done.clone();
                std::thread::spawn(move || {
                    if idle {
                        lower_priority();
                    }
                    loop {
                        let job = job_rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        let Ok((seq, raw)) = job else { return };
                        let z = raw.get(PagesHeader::SIZE..).and_then(compress_if_smaller);
                        if done.send((seq, raw, z)).is_err() {
                            return;
                        }
                    }
                })
            })
            .collect();
        Pool { jobs: Some(jobs), results, threads }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Closing the job queue ends each worker after its current job.
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Runs the calling thread under `SCHED_IDLE`: it gets a core only when nothing else
/// wants it. Any thread may lower its own priority so; if it fails, the thread simply
/// competes as usual.
fn lower_priority() {
    let p = libc::sched_param { sched_priority: 0 };
    // SAFETY: `p` is a valid sched_param that outlives the call; pid 0 is this thread.
    unsafe {
        libc::sched_setscheduler(0, libc::SCHED_IDLE, &p);
    }
}

/// Writes page records in order, compressed where a free worker could do it.
pub struct Compressor {
    mode: Compress,
    workers: usize,
    pool: Option<Pool>,
    /// Whether the disk is behind (`Idle` compresses only then); `None`: cannot tell.
    behind: Option<Arc<AtomicBool>>,
    queue: VecDeque<Slot>,
    next_seq: u64,
    busy: usize,
    /// Page records written compressed.
    pub compressed: u64,
    /// Page records written raw.
    pub raw: u64,
    /// Page records written as their changes, raw.
    pub changes: u64,
    /// Page records written as their changes, compressed.
    pub compressed_changes: u64,
}

impl Compressor {
    /// A compressor; `Compress::Off` writes every record as it comes.
    pub fn new(mode: Compress) -> Compressor {
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 8);
        Compressor {
            mode,
            workers,
            pool: None,
            behind: None,
            queue: VecDeque::new(),
            next_seq: 0,
            busy: 0,
            compressed: 0,
            raw: 0,
            changes: 0,
            compressed_changes: 0,
        }
    }

    /// Whether a page record's [`page_sum`](limitless_image::format::page_sum) is worth
    /// computing ahead for [`pages`](Self::pages): not with `All`, where most records are
    /// compressed and their sum goes unused (one that stays raw gets its sum as written).
    pub fn wants_sums(&self) -> bool {
        self.mode != Compress::All
    }

    /// In `Idle` mode, compresses only while `behind` is set (see [`EarlyFlush::behind`](super::early::EarlyFlush::behind)).
    pub fn when_behind(mut self, behind: Arc<AtomicBool>) -> Compressor {
        self.behind = Some(behind);
        self
    }

    /// Writes the PAGES record `payload` (pages header, then pages), or queues it. `sum`,
    /// if given, is its [`page_sum`](limitless_image::format::page_sum), for a record
    /// written raw at once. Returns `payload` if it was written at once, for reuse.
    pub fn pages<W: Write>(&mut self, w: &mut Writer<W>, payload: Vec<u8>, sum: Option<[u8; 32]>) -> io::Result<Option<Vec<u8>>> {
        self.put(w, payload, sum, false)
    }

    /// Writes the PAGES record `payload` stored as its changes `record` (its pages header,
    /// then the changes, [`Writer::diff_pages`]), or queues that; the changes are
    /// compressed as pages would be. Returns `payload`, for reuse.
    pub fn changes<W: Write>(&mut self, w: &mut Writer<W>, payload: Vec<u8>, record: Vec<u8>) -> io::Result<Option<Vec<u8>>> {
        self.put(w, record, None, true).map(|_| Some(payload))
    }

    /// Writes `rec` (pages, or `changes`), compressed or not, or queues it; returns it if
    /// it was written at once.
    fn put<W: Write>(&mut self, w: &mut Writer<W>, rec: Vec<u8>, sum: Option<[u8; 32]>, changes: bool) -> io::Result<Option<Vec<u8>>> {
        if self.mode == Compress::Off {
            return self.write(w, rec, None, sum, changes);
        }
        self.collect(w, false)?;
        // While the disk is behind, compressing costs no time: wait for a worker as `All`
        // does. Otherwise (`Idle`) only a free worker is used, and none while the disk is
        // known to keep up, which also saves the trial.
        let behind = self.behind.as_ref().map(|b| b.load(Ordering::Relaxed));
        let wait = self.mode == Compress::All || behind == Some(true);
        let worth = (wait || (self.busy < self.workers && behind.is_none())) && rec.get(PagesHeader::SIZE..).is_some_and(sample_compresses);
        while worth && wait && self.busy >= self.workers {
            self.collect(w, true)?;
        }
        if !worth {
            if self.queue.is_empty() {
                return self.write(w, rec, None, sum, changes);
            }
            self.queue.push_back(Slot::Raw(rec, changes));
        } else {
            let (workers, idle) = (self.workers, self.mode == Compress::Idle);
            let pool = self.pool.get_or_insert_with(|| Pool::start(workers, idle));
            let seq = self.next_seq;
            self.next_seq += 1;
            match pool.jobs.as_ref().map(|j| j.send((seq, rec))) {
                Some(Ok(())) => {
                    self.busy += 1;
                    self.queue.push_back(Slot::Working(seq, changes));
                }
                // The workers are gone (cannot happen while the pool lives): store raw.
                Some(Err(e)) => self.queue.push_back(Slot::Raw(e.0 .1, changes)),
                None => return Err(io::Error::other("the compression workers are closed")),
            }
        }
        while self.queue.len() > HELD {
            self.collect(w, true)?;
        }
        Ok(None)
    }

    /// Writes `rec` (pages, or `changes`), as `z` if that is given, and counts it; returns
    /// `rec`.
    fn write<W: Write>(
        &mut self,
        w: &mut Writer<W>,
        rec: Vec<u8>,
        z: Option<Vec<u8>>,
        sum: Option<[u8; 32]>,
        changes: bool,
    ) -> io::Result<Option<Vec<u8>>> {
        let (r, n) = match (changes, &z, sum) {
            (true, _, _) => (w.diff_pages(&rec, z.as_deref()), if z.is_some() { &mut self.compressed_changes } else { &mut self.changes }),
            (false, Some(z), _) => (w.compressed_pages(&rec, z), &mut self.compressed),
            (false, None, Some(s)) => (w.plain_pages(&rec, s), &mut self.raw),
            (false, None, None) => (w.plain(kind::PAGES, &rec), &mut self.raw),
        };
        r?;
        *n += 1;
        Ok(Some(rec))
    }

    /// Writes every queued record, waiting for the workers.
    pub fn flush<W: Write>(&mut self, w: &mut Writer<W>) -> io::Result<()> {
        while !self.queue.is_empty() {
            self.collect(w, true)?;
        }
        Ok(())
    }

    /// Takes in the workers' results (waiting for one if `wait`) and writes the records at
    /// the head of the queue that are ready.
    fn collect<W: Write>(&mut self, w: &mut Writer<W>, wait: bool) -> io::Result<()> {
        if let Some(pool) = &self.pool {
            let mut next = if wait && self.busy > 0 { pool.results.recv().ok() } else { pool.results.try_recv().ok() };
            while let Some((seq, raw, z)) = next {
                self.busy -= 1;
                if let Some(s) = self.queue.iter_mut().find(|s| matches!(s, Slot::Working(n, _) if *n == seq)) {
                    let changes = matches!(s, Slot::Working(_, true));
                    *s = Slot::Done(raw, z, changes);
                }
                next = pool.results.try_recv().ok();
            }
        }
        while let Some(s) = self.queue.front() {
            match s {
                Slot::Working(..) if self.busy == 0 => return Err(io::Error::other("a compression worker stopped")),
                Slot::Working(..) => break,
                _ => {}
            }
            match self.queue.pop_front() {
                Some(Slot::Raw(r, changes)) => self.write(w, r, None, None, changes)?,
                Some(Slot::Done(r, z, changes)) => self.write(w, r, z, None, changes)?,
                _ => None,
            };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use limitless_image::diff;
    use limitless_image::format::{rflags, FileHeader, RecordHeader};
    use limitless_image::wire::Wire;

    fn record(start: u64, fill: &mut dyn FnMut(usize) -> u8) -> Vec<u8> {
        let mut bitmap = [0u64; 4];
        bitmap[0] = u64::MAX;
        let h = PagesHeader { start, npages: 64, count: 64, bitmap };
        let mut p = vec![0u8; PagesHeader::SIZE + 64 * 4096];
        h.put(&mut p);
        for (i, b) in p[PagesHeader::SIZE..].iter_mut().enumerate() {
            *b = fill(i);
        }
        p
    }

    /// Text-like and random records through the workers come out in their order, each
    /// decompressing to what went in; some were compressed, and random ones never.
    #[test]
    fn records_come_out_in_order_and_whole() {
        for mode in [Compress::Idle, Compress::All] {
            let c = in_order_and_whole(Compressor::new(mode));
            assert!(c.compressed > 0, "no record was compressed");
            if mode == Compress::All {
                assert_eq!((c.compressed, c.compressed_changes), (68, 12), "every text-like record is compressed");
            }
        }
    }

    /// With a gauge, `Idle` compresses nothing while the disk keeps up and every text-like
    /// record while it is behind; the records still come out in order and whole.
    #[test]
    fn idle_follows_the_disk() {
        let behind = Arc::new(AtomicBool::new(false));
        let c = in_order_and_whole(Compressor::new(Compress::Idle).when_behind(behind.clone()));
        assert_eq!(c.compressed + c.compressed_changes, 0, "compressed while the disk kept up");
        behind.store(true, Ordering::Relaxed);
        let c = in_order_and_whole(Compressor::new(Compress::Idle).when_behind(behind));
        assert_eq!((c.compressed, c.compressed_changes), (68, 12), "every text-like record is compressed while the disk is behind");
    }

    /// Writes 120 records (two in three text-like, the others random, one in seven stored
    /// as changes) through `c`, checks what comes out and returns `c`.
    fn in_order_and_whole(mut c: Compressor) -> Compressor {
        let mut out = Vec::new();
        let mut rng = 0x9e3779b97f4a7c15u64;
        let mut want = Vec::new();
        {
            let mut w = Writer::new(&mut out, 0).unwrap();
            for r in 0..120u64 {
                let text = r % 3 != 0;
                let rec = record(0x100000 * (r + 1), &mut |i| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    if text {
                        b"the quick brown fox jumps "[(i + (rng % 3) as usize) % 26]
                    } else {
                        rng as u8
                    }
                });
                want.push((text, rec.clone()));
                if r % 7 == 0 {
                    // Changes from zeros: every word (larger than the record, which the
                    // writer does not judge).
                    let mut changes = rec[..PagesHeader::SIZE].to_vec();
                    assert!(diff::encode(&rec[PagesHeader::SIZE..], &vec![0; 64 * 4096], [0; 4], usize::MAX, &mut changes));
                    assert!(c.changes(&mut w, rec, changes).unwrap().is_some(), "the pages are not handed back");
                } else {
                    c.pages(&mut w, rec, None).unwrap();
                }
            }
            c.flush(&mut w).unwrap();
        }
        assert_eq!((c.compressed + c.raw, c.changes + c.compressed_changes), (120 - 18, 18));
        let mut at = FileHeader::SIZE;
        let mut zstd_seen = 0;
        for (i, (text, rec)) in want.iter().enumerate() {
            let mut h = RecordHeader::get(&out[at..]);
            at += RecordHeader::SIZE;
            // A raw record's pages start on a page boundary (format 1.5): zeros before it.
            if h.kind == kind::PAD {
                assert!(out[at..at + h.stored_len as usize].iter().all(|&b| b == 0), "the pad before record {i}");
                at += h.stored_len as usize;
                h = RecordHeader::get(&out[at..]);
                at += RecordHeader::SIZE;
                assert_eq!(h.flags, 0, "a pad before compressed record {i}");
                assert_eq!((at + PagesHeader::SIZE) % 4096, 0, "record {i}'s pages are not on a page boundary");
            }
            let stored = &out[at..at + h.stored_len as usize];
            at += h.stored_len as usize;
            assert_eq!(h.kind, kind::PAGES, "record {i}");
            assert_eq!(h.raw_len, rec.len() as u64, "record {i}");
            assert_eq!(h.flags & rflags::DIFF != 0, i % 7 == 0, "record {i}: flags {}", h.flags);
            zstd_seen += (h.flags & rflags::ZSTD != 0) as u64;
            if h.flags & rflags::DIFF != 0 {
                assert_eq!(stored[..PagesHeader::SIZE], rec[..PagesHeader::SIZE]);
                let changes = match h.flags & rflags::ZSTD {
                    0 => stored[PagesHeader::SIZE..].to_vec(),
                    _ => {
                        assert!(text, "random record {i} was compressed");
                        zstd::bulk::decompress(&stored[PagesHeader::SIZE..], 2 * rec.len()).unwrap()
                    }
                };
                let mut pages = vec![0; 64 * 4096];
                assert!(diff::apply(&changes, 64, &mut pages).is_some());
                assert!(pages == rec[PagesHeader::SIZE..], "record {i} rebuilds to other pages");
            } else if h.flags & rflags::ZSTD != 0 {
                assert!(text, "random record {i} was compressed");
                assert_eq!(stored[..PagesHeader::SIZE], rec[..PagesHeader::SIZE]);
                let pages = zstd::bulk::decompress(&stored[PagesHeader::SIZE..], rec.len()).unwrap();
                assert!(pages == rec[PagesHeader::SIZE..], "record {i} decompresses to other pages");
            } else {
                assert!(stored == &rec[..], "raw record {i} differs");
            }
        }
        assert_eq!(zstd_seen, c.compressed + c.compressed_changes, "records counted as compressed are not");
        c
    }
}

//! Compression of an image file's page records, on worker threads.
//!
//! The supervisor queues the agent's page records and compresses a batch at a time, one
//! share per core, then writes them in their order. Each record is tried on a 16 KiB
//! sample first and stored raw when it does not compress, so memory that does not compress
//! (random, already compressed) costs one small trial per record. With a leave-running
//! snapshot this happens while the program runs again; in stop mode it is part of the
//! checkpoint.
//!
//! It is off unless asked for (`dump --compress`, or `LIMITLESS_COMPRESS=1` in the
//! supervisor's environment): where the image goes to the page cache and a disk that
//! writes 1 GB/s, compressing costs more time than it saves (docs/benchmarks.md), and an
//! image with compressed records restores through the supervisor rather than by `pread`.
//! It pays when the image is kept long or goes over a slow disk or network. Images for a
//! store that takes a stream are not compressed here: the store compresses its chunks.

use limitless_image::file::{compress_if_smaller, sample_compresses, Writer};
use limitless_image::format::{kind, PagesHeader};
use std::io::{self, Write};

/// Page records compressed together (each at most 1 MiB of pages).
const BATCH: usize = 16;

/// Queues page records and writes them, compressed where that pays.
pub struct Compressor {
    on: bool,
    threads: usize,
    queue: Vec<Vec<u8>>,
}

impl Compressor {
    /// A compressor; `on: false` writes every record as it comes.
    pub fn new(on: bool) -> Compressor {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 8);
        Compressor { on, threads, queue: Vec::new() }
    }

    /// Whether the environment asks for compression (`LIMITLESS_COMPRESS=1`).
    pub fn wanted() -> bool {
        std::env::var_os("LIMITLESS_COMPRESS").is_some_and(|v| v == "1")
    }

    /// Writes the PAGES record `payload` (pages header, then pages), or queues it.
    pub fn pages<W: Write>(&mut self, w: &mut Writer<W>, payload: Vec<u8>) -> io::Result<()> {
        // A record whose sample does not compress is written at once when nothing is
        // queued before it, so that memory that does not compress is not held back in
        // batches (which would stop the agent's stream while the batch is written).
        if !self.on || (self.queue.is_empty() && !payload.get(PagesHeader::SIZE..).is_some_and(sample_compresses)) {
            return w.plain(kind::PAGES, &payload);
        }
        self.queue.push(payload);
        if self.queue.len() >= BATCH {
            self.flush(w)?;
        }
        Ok(())
    }

    /// Compresses and writes the queued records, in order.
    pub fn flush<W: Write>(&mut self, w: &mut Writer<W>) -> io::Result<()> {
        if self.queue.is_empty() {
            return Ok(());
        }
        let raw = std::mem::take(&mut self.queue);
        let per = raw.len().div_ceil(self.threads.min(raw.len()));
        let squeeze = |r: &Vec<u8>| r.get(PagesHeader::SIZE..).and_then(compress_if_smaller);
        let zs: Vec<Option<Vec<u8>>> = std::thread::scope(|s| {
            let parts: Vec<_> = raw.chunks(per).map(|part| s.spawn(move || part.iter().map(squeeze).collect::<Vec<_>>())).collect();
            // A worker that panicked leaves its records raw.
            parts.into_iter().zip(raw.chunks(per)).flat_map(|(h, part)| h.join().unwrap_or_else(|_| vec![None; part.len()])).collect()
        });
        for (r, z) in raw.iter().zip(zs) {
            match z {
                Some(z) => w.compressed_pages(r, &z)?,
                None => w.plain(kind::PAGES, r)?,
            }
        }
        Ok(())
    }
}

//! Page records stored as their changes ([`limitless_image::diff`]), chosen as the image
//! is written.
//!
//! The pages a program writes in its libraries' data and relocations, and much of its heap
//! and stacks, differ from their starting point (the file, or zeros) in a few words each.
//! For a Python interpreter that imported a few modules and built a dict, the image shrank
//! from 8.9 to 7.1-7.4 MiB so (docs/benchmarks.md). A record is tried only if its first
//! page differs from its base in at most half its words, so random or text-like memory
//! costs one page's look; it is stored so only if that takes at most 7/8 of its pages
//! ([`diff::max_len`]).
//!
//! The restorer rebuilds such records in place (the file is mapped there again, fresh
//! anonymous memory is zeros) and checks the rebuilt pages' sum; records the supervisor
//! stages (compressed ones, and an object store's) it rebuilds itself, reading the base
//! files.
//! `dump --whole-pages`, or `LIMITLESS_DIFF=0` in the environment of launch/restore,
//! stores every record whole.

use limitless_image::diff::{self, Bases};
use limitless_image::file::Vma;
use limitless_image::format::{PagesHeader, PAGE};

/// Decides, record by record, whether to store pages as their changes.
pub struct Differ {
    on: bool,
    /// The program's areas, from the image's `VMA` records, in address order.
    vmas: Vec<Vma>,
    /// Whether `vmas` was found in address order (checked at the first page record).
    ordered: bool,
    bases: Bases,
    /// The bases of a record's pages.
    base: Vec<u8>,
}

impl Differ {
    /// A differ, on if `on` and `LIMITLESS_DIFF=0` is not in the environment.
    pub fn new(on: bool) -> Differ {
        let on = on && std::env::var("LIMITLESS_DIFF").as_deref() != Ok("0");
        Differ { on, vmas: Vec::new(), ordered: false, bases: Bases::same_inodes(), base: Vec::new() }
    }

    /// Notes the area of a `VMA` record's payload.
    pub fn note(&mut self, payload: &[u8]) {
        if let Some(v) = Vma::decode(payload) {
            self.vmas.push(v);
        }
    }

    /// The page record `payload` (pages header, then pages) stored as its changes (pages
    /// header, then changes), if that is worth it.
    pub fn encode(&mut self, payload: &[u8]) -> Option<Vec<u8>> {
        if !self.on {
            return None;
        }
        let h = PagesHeader::decode(payload)?;
        let pages = payload.get(PagesHeader::SIZE..)?;
        let count = h.count as usize;
        if count == 0 || pages.len() != count * PAGE as usize {
            return None;
        }
        if !self.ordered {
            // Not in address order, the bases could not be found (never so from the agent).
            self.on = self.vmas.windows(2).all(|w| w[0].info.end <= w[1].info.start);
            self.ordered = true;
            if !self.on {
                return None;
            }
        }
        let addrs = diff::page_addrs(&h);
        if addrs.len() != count {
            return None;
        }
        self.base.resize(pages.len(), 0);
        let mut file = [0u64; 4];
        for (k, (&addr, base)) in addrs.iter().zip(self.base.chunks_exact_mut(PAGE as usize)).enumerate() {
            // A file that cannot be read serves as no base: zeros instead.
            if !self.bases.fill(&self.vmas, addr, true, base).unwrap_or(false) {
                base.fill(0);
            } else {
                file[k / 64] |= 1 << (k % 64);
            }
            // One look at the first page: most of it changed, the rest likely too.
            if k == 0 && diff::changed_words(&pages[..PAGE as usize], base) > diff::WORDS / 2 {
                return None;
            }
        }
        let mut body = Vec::with_capacity(diff::max_len(count) / 4);
        body.extend_from_slice(&payload[..PagesHeader::SIZE]);
        if !diff::encode(pages, &self.base, file, diff::max_len(count), &mut body) {
            return None;
        }
        Some(body)
    }
}

//! Reading, validating and writing image files (`std` feature).
//!
//! [`Writer`] turns the agent's record stream into a file: header, records, index (one
//! checksum per record: BLAKE3, or [`page_sum`] for page records), trailer. [`Image::open`] reads one back and checks every byte
//! that it returns: the header and trailer against hashes in the trailer, each record
//! header against its index entry, each metadata payload against its hash, and the meaning
//! of every field (ranges, counts, addresses, ordering) before anything may use it. Page
//! payloads are large, so their hashes are checked when they are read
//! ([`Image::read_pages`]), which a restore does before the data reaches the program.
//!
//! An image is read through a [`Source`]: a file, or anything that can read at an offset
//! (an image stored as chunks in an object store). Opening one reads only the header, the
//! metadata records, the page map and the index, so a remote image can be checked before
//! its page data is fetched.

use crate::format::*;
use crate::wire::Wire;
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Why an image cannot be used.
#[derive(Debug)]
pub enum ImageError {
    /// Reading or writing failed.
    Io(io::Error),
    /// The file does not start with the image magic.
    NotAnImage,
    /// The file ends before its trailer: it was not completely written.
    Truncated(String),
    /// The image needs a newer or different reader.
    Version { major: u16, minor: u16 },
    /// A checksum or a field is wrong.
    Corrupt(String),
}

impl fmt::Display for ImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageError::Io(e) => write!(f, "{e}"),
            ImageError::NotAnImage => write!(f, "not a Limitless checkpoint image (bad magic)"),
            ImageError::Truncated(w) => write!(f, "image is truncated ({w}): it was not completely written"),
            ImageError::Version { major, minor } => write!(
                f,
                "image format {major}.{minor} is not supported by this build (it reads {FORMAT_MAJOR}.0 to {FORMAT_MAJOR}.{FORMAT_MINOR}); use the limitless version that wrote it"
            ),
            ImageError::Corrupt(w) => write!(f, "image is corrupt: {w}"),
        }
    }
}

impl std::error::Error for ImageError {}

impl From<io::Error> for ImageError {
    fn from(e: io::Error) -> Self {
        ImageError::Io(e)
    }
}

fn corrupt(s: impl Into<String>) -> ImageError {
    ImageError::Corrupt(s.into())
}

/// The checksum of a record of `kind` in an image of format 1.`minor`: [`page_sum`] for
/// page records from 1.4 on, else BLAKE3.
pub fn record_sum(minor: u16, kind: u32, payload: &[u8]) -> [u8; 32] {
    if kind == kind::PAGES && minor >= PAGE_SUM_MINOR {
        page_sum(payload)
    } else {
        hash(&[payload])
    }
}

/// BLAKE3 of `parts` concatenated.
pub fn hash(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for p in parts {
        h.update(p);
    }
    *h.finalize().as_bytes()
}

/// `data` compressed with zstd (level 1), if that saves at least 1/32 of it. A 16 KiB
/// sample from the middle is tried first, so data that does not compress (random, already
/// compressed) costs one small trial, not a pass over all of it.
pub fn compress_if_smaller(data: &[u8]) -> Option<Vec<u8>> {
    if !sample_compresses(data) {
        return None;
    }
    zstd::bulk::compress(data, 1).ok().filter(|z| saves(data, z))
}

/// Whether compressing saves at least 1/32.
fn saves(d: &[u8], z: &[u8]) -> bool {
    z.len() < d.len() - d.len() / 32
}

/// Whether a 16 KiB sample from the middle of `data` compresses (all of `data` if it is
/// that small): the cheap test [`compress_if_smaller`] starts with.
pub fn sample_compresses(data: &[u8]) -> bool {
    const SAMPLE: usize = 16 * 1024;
    let mid = data.len() / 2;
    let sample = &data[mid.saturating_sub(SAMPLE / 2)..(mid + SAMPLE / 2).min(data.len())];
    data.len() <= SAMPLE || zstd::bulk::compress(sample, 1).is_ok_and(|z| saves(sample, &z))
}

/// The entry count of a list record (`FILE_IDS`, `PARENTS`): a `u32` count from 1 to `max`,
/// then four zero bytes; `None` if either is wrong.
fn list_count(p: &[u8], max: u32) -> Option<u32> {
    let n = u32::from_le_bytes(p.get(..4)?.try_into().ok()?);
    (p.get(4..8) == Some(&[0; 4]) && (1..=max).contains(&n)).then_some(n)
}

fn enc<T: crate::wire::Wire>(v: &T) -> Vec<u8> {
    let mut b = vec![0u8; T::SIZE];
    v.put(&mut b);
    b
}

// ---------------------------------------------------------------------------------------
// Writing.

/// Writes an image file record by record.
pub struct Writer<W: Write> {
    out: W,
    /// The format minor version written ([`FORMAT_MINOR`], or older for tests of old images).
    minor: u16,
    offset: u64,
    header_hash: [u8; 32],
    index: Vec<IndexEntry>,
    /// The `PAGES` records' headers, written as the `PAGEMAP` record at the end.
    pagemap: Vec<u8>,
    /// Records earlier images have (a delta image refers to them instead of storing them).
    parent: Option<ParentMap>,
    /// For each image of `parent`, its number in this image's `PARENTS` list once used.
    parent_ids: Vec<Option<u32>>,
    /// The images this one refers to, in `PARENTS` order.
    parents_used: Vec<Parent>,
    /// Raw bytes of page records taken from parents.
    referenced: u64,
    /// A parent's record, read to compare with one being written.
    theirs: Vec<u8>,
    /// Copy mode ([`Writer::copy_from_parent`]): the image stays whole, and windows found
    /// unchanged are copied from the parent's records instead of referred to.
    copy: bool,
    /// Raw bytes of page records the output took from the parent itself in copy mode.
    copied: u64,
    /// Put large page records' pages on page boundaries ([`PAD_MINOR`] on); see
    /// [`unaligned`](Self::unaligned).
    align: bool,
}

/// An image a delta image refers to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parent {
    pub info: ParentInfo,
    /// Its absolute path.
    pub path: Vec<u8>,
}

/// Where a parent map holds a window: the image and record, and its stored bytes' checksum.
type Held = (u32, u64, [u8; 32]);

/// The page records a delta image can take from earlier images: for each window (by its
/// pages header), the image and record holding it and its stored bytes' checksum.
#[derive(Clone, Debug, Default)]
pub struct ParentMap {
    images: Vec<Parent>,
    by_header: std::collections::HashMap<[u8; PagesHeader::SIZE], Held>,
    /// The parent image, to compare records with (`images` lists its parents, then it).
    parent: Option<std::sync::Arc<Image>>,
}

impl ParentMap {
    /// The page records of `parent` (the image at the absolute path `path`) and those it
    /// takes from its own parents (attached, [`Image::attach_parents`], so that their
    /// records can be compared with new ones).
    pub fn of(parent: Image, path: &Path) -> Result<ParentMap, ImageError> {
        let mut m = ParentMap { images: parent.parents.clone(), by_header: Default::default(), parent: None };
        let own = m.images.len() as u32;
        let path = path.as_os_str().as_encoded_bytes().to_vec();
        m.images.push(Parent {
            info: ParentInfo {
                trailer_hash: parent.trailer.trailer_hash,
                file_len: parent.trailer.file_len,
                path_len: path.len() as u32,
                reserved: 0,
            },
            path,
        });
        for p in &parent.pages {
            let e = parent.index[p.index];
            let at = if e.flags & rflags::REF != 0 {
                let r = parent.page_ref(p.index)?;
                (r.parent, r.record, r.hash)
            } else {
                (own, p.index as u64, e.hash)
            };
            let mut key = [0u8; PagesHeader::SIZE];
            p.header.put(&mut key);
            m.by_header.insert(key, at);
        }
        m.parent = Some(std::sync::Arc::new(parent));
        Ok(m)
    }

    /// Whether record `record` of image `img` (as in `by_header`) stores exactly `payload`
    /// with record flags `flags`, read through `buf`. False where it cannot be read (a
    /// parent whose own parents are not attached): the record is then stored again, which
    /// is never wrong.
    fn stored_is(&self, (img, record, _): Held, flags: u32, payload: &[u8], buf: &mut Vec<u8>) -> io::Result<bool> {
        let Some(p) = &self.parent else { return Ok(false) };
        let holder = if img as usize + 1 == self.images.len() { Some(&**p) } else { p.ancestors.get(img as usize) };
        let Some(h) = holder else { return Ok(false) };
        let Some(e) = usize::try_from(record).ok().and_then(|i| h.index.get(i)) else { return Ok(false) };
        if e.flags != flags || e.stored_len != payload.len() as u64 {
            return Ok(false);
        }
        buf.resize(payload.len(), 0);
        match h.src.read_exact_at(buf, e.offset + RecordHeader::SIZE as u64) {
            Ok(()) => Ok(buf[..] == *payload),
            Err(e) => Err(io::Error::new(e.kind(), format!("cannot read the parent image to compare a page record: {e}"))),
        }
    }
}

/// What [`Writer::finish`] wrote.
#[derive(Clone, Copy, Debug)]
pub struct Finished {
    /// The image's length.
    pub len: u64,
    /// The trailer's hash, which names this exact image.
    pub trailer_hash: [u8; 32],
    /// Raw bytes of page records taken from parent images (a delta image).
    pub referenced: u64,
    /// Raw bytes of page records the output took from the parent image itself, unread
    /// here (copy mode).
    pub copied: u64,
}

impl<W: Write> Writer<W> {
    /// Starts an image: writes the file header.
    pub fn new(out: W, created_unix_ns: u64) -> io::Result<Self> {
        Self::with_minor(out, created_unix_ns, FORMAT_MINOR)
    }

    /// [`new`](Self::new), writing format 1.`minor` (3 or 4): for tests that need an image
    /// as an older version wrote it.
    #[doc(hidden)]
    pub fn with_minor(mut out: W, created_unix_ns: u64, minor: u16) -> io::Result<Self> {
        if !(3..=FORMAT_MINOR).contains(&minor) {
            return Err(io::Error::other(format!("cannot write image format 1.{minor}")));
        }
        let h = FileHeader {
            magic: MAGIC,
            major: FORMAT_MAJOR,
            minor,
            header_size: FileHeader::SIZE as u32,
            flags: 0,
            created_unix_ns,
            reserved: [0; 32],
        };
        let b = enc(&h);
        out.write_all(&b)?;
        Ok(Writer {
            out,
            minor,
            offset: b.len() as u64,
            header_hash: hash(&[&b]),
            index: Vec::new(),
            pagemap: Vec::new(),
            parent: None,
            parent_ids: Vec::new(),
            parents_used: Vec::new(),
            referenced: 0,
            theirs: Vec::new(),
            copy: false,
            copied: 0,
            align: true,
        })
    }

    /// Makes this a delta image: a page record whose stored bytes an image of `map` has
    /// for the same window is written as a reference to it.
    pub fn set_parents(&mut self, map: ParentMap) {
        self.parent_ids = vec![None; map.images.len()];
        self.parent = Some(map);
    }

    /// Makes the windows the agent found unchanged since `map`'s image copies of that
    /// image's records ([`unchanged_copied`](Self::unchanged_copied)): the image stays whole
    /// (no references, no parents list), and records sent in full are written as they are.
    /// For an image store that keeps the parent's bytes and can take them again without
    /// their passing through here.
    pub fn copy_from_parent(&mut self, map: ParentMap) {
        self.set_parents(map);
        self.copy = true;
    }

    /// Writes no `PAD` records: for a store that splits the image into chunks at page
    /// records (each record whole chunks, so that a later image can take it again), whose
    /// images are never mapped anyway (a restore reads them through the supervisor).
    pub fn unaligned(&mut self) {
        self.align = false;
    }

    /// Appends a record whose payload is stored as given (`raw_len` is its decompressed
    /// length when `flags` says it is compressed, else `payload.len()`). A `PAGEMAP` record
    /// or `PARENTS` record is not copied: [`finish`](Self::finish) writes the image's own.
    pub fn record(&mut self, kind: u32, flags: u32, raw_len: u64, payload: &[u8]) -> io::Result<()> {
        self.record_summed(kind, flags, raw_len, payload, record_sum(self.minor, kind, payload))
    }

    /// Appends an uncompressed page record (`payload`: pages header, then pages) whose
    /// [`page_sum`] the caller has computed already (on another thread, while the bytes were
    /// in its cache). An image of a format before XXH3 page sums still gets its BLAKE3
    /// computed here.
    pub fn plain_pages(&mut self, payload: &[u8], sum: [u8; 32]) -> io::Result<()> {
        debug_assert_eq!(sum, page_sum(payload), "a page record's precomputed sum is wrong");
        let h = if self.minor >= PAGE_SUM_MINOR { sum } else { record_sum(self.minor, kind::PAGES, payload) };
        self.record_summed(kind::PAGES, 0, payload.len() as u64, payload, h)
    }

    /// [`record`](Self::record), with the record's checksum `h` given.
    fn record_summed(&mut self, kind: u32, flags: u32, raw_len: u64, payload: &[u8], h: [u8; 32]) -> io::Result<()> {
        if kind == kind::PAGEMAP || kind == kind::PARENTS {
            return Ok(());
        }
        if kind == kind::PAGES {
            let head = payload.get(..PagesHeader::SIZE).ok_or_else(|| io::Error::other("a page record without its header"))?;
            self.pagemap.extend_from_slice(head);
            if self.copy {
                return self.put(kind, flags, raw_len, payload, h);
            }
            let found = self.in_parent(head)?.filter(|f| f.2 == h && flags & rflags::REF == 0);
            // Same window, same checksum: the same bytes, if the parent's record says so byte
            // for byte (a checksum is no proof). `found` comes from the parent map.
            if let (Some(f), Some(m)) = (found, &self.parent) {
                if m.stored_is(f, flags, payload, &mut self.theirs)? {
                    return self.put_ref(head, f, raw_len);
                }
            }
        }
        self.put(kind, flags, raw_len, payload, h)
    }

    /// Appends a reference to the parent's page record with exactly the pages header
    /// `head`: the agent found the window unchanged since the parent was taken (dirty-page
    /// tracking), so it sent no pages. An error if no parent image has that record.
    pub fn unchanged(&mut self, head: &[u8]) -> io::Result<()> {
        let (found, raw_len) = self.unchanged_in_parent(head)?;
        self.pagemap.extend_from_slice(head);
        self.put_ref(head, found, raw_len)
    }

    /// The parent's record for the window `head` that the agent sent as unchanged
    /// ([`in_parent`](Self::in_parent)), and the window's raw record length; an error if
    /// `head` is not a pages header or the parent has no such record.
    fn unchanged_in_parent(&self, head: &[u8]) -> io::Result<(Held, u64)> {
        let h = PagesHeader::decode(head)
            .filter(|_| head.len() == PagesHeader::SIZE)
            .ok_or_else(|| io::Error::other("a bad unchanged page window"))?;
        let found = self.in_parent(head)?.ok_or_else(|| {
            io::Error::other(format!(
                "the agent sent the page window at {:#x} as unchanged, but the parent image has no such record",
                h.start
            ))
        })?;
        Ok((found, PagesHeader::SIZE as u64 + h.count as u64 * PAGE))
    }

    /// In copy mode ([`copy_from_parent`](Self::copy_from_parent)): appends the parent's
    /// page record for the window `head`, which the agent found unchanged since the parent
    /// (dirty-page tracking), byte for byte. `append(out, off, len)` may put the parent's
    /// bytes `off..off + len` in the output itself (a store that holds them already) and
    /// return true; otherwise they are read from the parent, checked and written here.
    pub fn unchanged_copied(&mut self, head: &[u8], append: impl FnOnce(&mut W, u64, u64) -> io::Result<bool>) -> io::Result<()> {
        let bad = |what: &str| io::Error::other(format!("the unchanged page window cannot be copied from the parent image: {what}"));
        if !self.copy {
            return Err(bad("not writing in copy mode"));
        }
        let ((img, record, _), _) = self.unchanged_in_parent(head)?;
        let m = self.parent.as_ref().ok_or_else(|| bad("no parent"))?;
        let p = m.parent.clone().ok_or_else(|| bad("no parent"))?;
        if img as usize + 1 != m.images.len() {
            return Err(bad("the parent takes it from an earlier image"));
        }
        let e = usize::try_from(record).ok().and_then(|i| p.index.get(i)).copied().ok_or_else(|| bad("no such record"))?;
        if e.kind != kind::PAGES || e.flags & rflags::REF != 0 || p.header.minor != self.minor {
            return Err(bad("the record is a reference or of another format"));
        }
        let len = RecordHeader::SIZE as u64 + e.stored_len;
        if e.flags == 0 {
            self.align_pages(e.stored_len)?;
        }
        if append(&mut self.out, e.offset, len)? {
            self.copied += e.raw_len;
        } else {
            self.theirs.resize(len as usize, 0);
            p.src.read_exact_at(&mut self.theirs, e.offset)?;
            p.check_record(record as usize, &self.theirs).map_err(|e| bad(&e.to_string()))?;
            self.out.write_all(&self.theirs)?;
        }
        self.pagemap.extend_from_slice(head);
        self.index.push(IndexEntry { offset: self.offset, ..e });
        self.offset += len;
        Ok(())
    }

    /// The parent map's page record with exactly the pages header `head`, if any:
    /// (image, record, hash).
    fn in_parent(&self, head: &[u8]) -> io::Result<Option<Held>> {
        let key: [u8; PagesHeader::SIZE] = head.try_into().map_err(io::Error::other)?;
        Ok(self.parent.as_ref().and_then(|m| m.by_header.get(&key).copied()))
    }

    /// Writes a `REF` page record for `head` pointing at `(image, record, hash)` of the
    /// parent map.
    fn put_ref(&mut self, head: &[u8], (img, record, ph): Held, raw_len: u64) -> io::Result<()> {
        let m = self.parent.as_ref().ok_or_else(|| io::Error::other("a page reference without a parent image"))?;
        let id = match self.parent_ids[img as usize] {
            Some(id) => id,
            None => {
                let id = self.parents_used.len() as u32;
                self.parents_used.push(m.images[img as usize].clone());
                self.parent_ids[img as usize] = Some(id);
                id
            }
        };
        let mut stored = head.to_vec();
        stored.extend_from_slice(&enc(&PageRef { parent: id, reserved: 0, record, hash: ph }));
        self.referenced += raw_len;
        let sh = record_sum(self.minor, kind::PAGES, &stored);
        self.put(kind::PAGES, rflags::REF, raw_len, &stored, sh)
    }

    fn put(&mut self, kind: u32, flags: u32, raw_len: u64, payload: &[u8], h: [u8; 32]) -> io::Result<()> {
        if kind == kind::PAGES && flags == 0 {
            self.align_pages(payload.len() as u64)?;
        }
        let rh = RecordHeader { kind, flags, stored_len: payload.len() as u64, raw_len, reserved: 0 };
        self.out.write_all(&enc(&rh))?;
        self.out.write_all(payload)?;
        self.index.push(IndexEntry { offset: self.offset, kind, flags, stored_len: payload.len() as u64, raw_len, hash: h });
        self.offset += RecordHeader::SIZE as u64 + payload.len() as u64;
        Ok(())
    }

    /// Before an uncompressed page record of `stored_len` bytes: from format 1.5, if it has
    /// at least [`ALIGN_FROM_PAGES`] pages, writes the `PAD` record that puts its pages on a
    /// page boundary of the file.
    fn align_pages(&mut self, stored_len: u64) -> io::Result<()> {
        let head = (RecordHeader::SIZE + PagesHeader::SIZE) as u64;
        if !self.align || self.minor < PAD_MINOR || stored_len < PagesHeader::SIZE as u64 + ALIGN_FROM_PAGES * PAGE {
            return Ok(());
        }
        let pad = (PAGE - (self.offset + RecordHeader::SIZE as u64 + head) % PAGE) % PAGE;
        let zeros = vec![0u8; pad as usize];
        self.put(kind::PAD, 0, pad, &zeros, record_sum(self.minor, kind::PAD, &zeros))
    }

    /// Appends a PAGES record whose pages (`raw`: pages header, then pages) were compressed
    /// into `zpages`: the header stays as it is, the pages are one zstd frame.
    pub fn compressed_pages(&mut self, raw: &[u8], zpages: &[u8]) -> io::Result<()> {
        let h = raw.get(..PagesHeader::SIZE).ok_or_else(|| io::Error::other("a page record without its header"))?;
        let mut stored = Vec::with_capacity(h.len() + zpages.len());
        stored.extend_from_slice(h);
        stored.extend_from_slice(zpages);
        self.record(kind::PAGES, rflags::ZSTD, raw.len() as u64, &stored)
    }

    /// Appends a PAGES record stored as its changes ([`crate::diff`]): `record` is its pages
    /// header, then the changes. With `z`, those changes compressed into one zstd frame,
    /// which is stored instead (format 1.7).
    pub fn diff_pages(&mut self, record: &[u8], z: Option<&[u8]>) -> io::Result<()> {
        let flags = if z.is_some() { rflags::DIFF | rflags::ZSTD } else { rflags::DIFF };
        if self.minor < diff_since(flags) {
            return Err(io::Error::other(format!("image format 1.{} cannot store pages as changes this way", self.minor)));
        }
        let (h, head) = PagesHeader::decode(record)
            .zip(record.get(..PagesHeader::SIZE))
            .ok_or_else(|| io::Error::other("a page record without its header"))?;
        let raw_len = PagesHeader::SIZE as u64 + h.count as u64 * PAGE;
        match z {
            None => self.record(kind::PAGES, flags, raw_len, record),
            Some(z) => self.record(kind::PAGES, flags, raw_len, &[head, z].concat()),
        }
    }

    /// Appends an uncompressed record.
    pub fn plain(&mut self, kind: u32, payload: &[u8]) -> io::Result<()> {
        self.record(kind, 0, payload.len() as u64, payload)
    }

    /// The output, for what writes no bytes of its own (flushing it, or telling a store
    /// that a chunk ends here): bytes written through it would be missing from the index.
    pub fn out_mut(&mut self) -> &mut W {
        &mut self.out
    }

    /// Records written so far.
    pub fn records(&self) -> usize {
        self.index.len()
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.offset
    }

    /// Writes the page map, the index and the trailer; returns the output and what was
    /// written.
    pub fn finish(mut self) -> io::Result<(W, Finished)> {
        if !self.parents_used.is_empty() {
            let mut list = Vec::new();
            list.extend_from_slice(&(self.parents_used.len() as u32).to_le_bytes());
            list.extend_from_slice(&[0; 4]);
            for p in &self.parents_used {
                list.extend_from_slice(&enc(&p.info));
                list.extend_from_slice(&p.path);
            }
            let h = hash(&[&list]);
            self.put(kind::PARENTS, 0, list.len() as u64, &list, h)?;
        }
        if !self.pagemap.is_empty() {
            let map = std::mem::take(&mut self.pagemap);
            let h = hash(&[&map]);
            self.put(kind::PAGEMAP, 0, map.len() as u64, &map, h)?;
        }
        let mut payload = Vec::with_capacity(self.index.len() * IndexEntry::SIZE);
        for e in &self.index {
            payload.extend_from_slice(&enc(e));
        }
        let rh = RecordHeader { kind: kind::INDEX, flags: 0, stored_len: payload.len() as u64, raw_len: payload.len() as u64, reserved: 0 };
        let rhb = enc(&rh);
        let index_offset = self.offset;
        self.out.write_all(&rhb)?;
        self.out.write_all(&payload)?;
        self.offset += rhb.len() as u64 + payload.len() as u64;
        let file_len = self.offset + Trailer::SIZE as u64;
        let mut t = Trailer {
            magic: END_MAGIC,
            index_offset,
            record_count: self.index.len() as u64,
            file_len,
            header_hash: self.header_hash,
            index_hash: hash(&[&rhb, &payload]),
            trailer_hash: [0; 32],
        };
        let tb = enc(&t);
        t.trailer_hash = hash(&[&tb[..Trailer::SIZE - 32]]);
        self.out.write_all(&enc(&t))?;
        Ok((self.out, Finished { len: file_len, trailer_hash: t.trailer_hash, referenced: self.referenced, copied: self.copied }))
    }
}

// ---------------------------------------------------------------------------------------
// Reading.

/// A memory area and its name.
#[derive(Clone, Debug)]
pub struct Vma {
    pub info: VmaInfo,
    pub name: Vec<u8>,
    /// Guard-page ranges inside the area.
    pub guards: Vec<GuardRange>,
}

impl Vma {
    /// A `VMA` record's payload, if its lengths are right (its fields are checked with the
    /// rest of the image).
    pub fn decode(p: &[u8]) -> Option<Vma> {
        let v = VmaInfo::decode(p)?;
        let name_end = VmaInfo::SIZE + v.name_len as usize;
        if v.name_len > limits::MAX_PATH || v.n_guards > limits::MAX_GUARDS || p.len() != name_end + v.n_guards as usize * GuardRange::SIZE
        {
            return None;
        }
        let guards = p[name_end..].chunks_exact(GuardRange::SIZE).filter_map(GuardRange::decode).collect();
        Some(Vma { info: v, name: p[VmaInfo::SIZE..name_end].to_vec(), guards })
    }
}

/// A file descriptor, its path, and its kind-specific state.
#[derive(Clone, Debug)]
pub struct Fd {
    pub info: FdInfo,
    pub path: Vec<u8>,
    pub extra: Vec<u8>,
}

impl Fd {
    /// A timerfd's state.
    pub fn timerfd(&self) -> Option<TimerfdState> {
        TimerfdState::decode(&self.extra)
    }

    /// An epoll's interest list.
    pub fn epoll_items(&self) -> Vec<EpollItem> {
        self.extra.chunks_exact(EpollItem::SIZE).filter_map(EpollItem::decode).collect()
    }
}

/// A file object the image carries, and its name.
#[derive(Clone, Debug)]
pub struct FileRec {
    pub info: FileObj,
    pub name: Vec<u8>,
}

/// Where one `FILE_DATA` record is.
#[derive(Clone, Copy, Debug)]
pub struct FileDataRecord {
    /// Position in the index.
    pub index: usize,
    pub header: FileData,
}

/// Where a page record's pages can be read in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PagesAt {
    /// In this image's file, at offset `.0`, with the checksum the restorer checks itself
    /// (`.1`, see [`Image::pages_at`]).
    Here(u64, Option<[u8; 16]>),
    /// In attached parent image `.0` (as in [`Image::parents`]), at offset `.1`, with the
    /// checksum `.2` as for `Here`.
    Parent(usize, u64, Option<[u8; 16]>),
    /// Stored as changes ([`crate::diff`], format 1.6): in this image's file (`.0` is
    /// `None`) or in attached parent `.0`, the payload after the pages header at offset
    /// `.1`, `.2` bytes of payload (pages header included), with the checksum `.3` of the
    /// payload as stored, for a restorer that rebuilds the pages in place.
    Changes(Option<usize>, u64, u64, [u8; 16]),
    /// Only through [`Image::check_pages`] (compressed, or in a stream).
    Packed,
}

/// Where one `PAGES` record is.
#[derive(Clone, Copy, Debug)]
pub struct PageRecord {
    /// Position in the index.
    pub index: usize,
    pub header: PagesHeader,
}

/// Where an image's bytes are read from.
pub trait Source: Send + Sync {
    /// The image's length in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Fills `buf` from offset `off`; an `UnexpectedEof` error if the image ends first.
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
}

impl Source for File {
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, off)
    }
}

impl fmt::Debug for dyn Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Source")
    }
}

/// A validated image: every metadata field checked, page records located.
#[derive(Debug)]
pub struct Image {
    src: Box<dyn Source>,
    pub header: FileHeader,
    pub trailer: Trailer,
    pub index: Vec<IndexEntry>,
    pub process: ProcessInfo,
    pub cwd: Vec<u8>,
    pub exe: Vec<u8>,
    pub threads: Vec<ThreadInfo>,
    pub vmas: Vec<Vma>,
    pub fds: Vec<Fd>,
    pub pages: Vec<PageRecord>,
    pub stdin: Vec<u8>,
    pub end: EndInfo,
    pub files: Vec<FileRec>,
    pub file_data: Vec<FileDataRecord>,
    /// The images a delta image takes page records from (`PARENTS`).
    pub parents: Vec<Parent>,
    /// ELF build-ids of mapped executable files: (path, build-id), from `FILE_IDS`.
    pub build_ids: Vec<(Vec<u8>, Vec<u8>)>,
    /// Those images, opened by [`attach_parents`](Self::attach_parents).
    ancestors: Vec<Image>,
}

fn read_exact_at(f: &dyn Source, buf: &mut [u8], off: u64, what: &str) -> Result<(), ImageError> {
    f.read_exact_at(buf, off).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ImageError::Truncated(format!("{what} at offset {off} is cut short"))
        } else {
            ImageError::Io(e)
        }
    })
}

fn path_str(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

impl Image {
    /// Opens and validates an image file.
    pub fn open(path: &Path) -> Result<Image, ImageError> {
        let file = File::open(path)?;
        Image::from_file(file)
    }

    /// Validates an image from an open file.
    pub fn from_file(file: File) -> Result<Image, ImageError> {
        Image::from_source(Box::new(file))
    }

    /// Validates an image read through `src`.
    pub fn from_source(src: Box<dyn Source>) -> Result<Image, ImageError> {
        let file = &*src;
        let len = file.size()?;
        let mut hb = [0u8; FileHeader::SIZE];
        if len < 8 {
            return Err(if len == 0 { ImageError::Truncated("the file is empty".into()) } else { ImageError::NotAnImage });
        }
        let n = len.min(FileHeader::SIZE as u64) as usize;
        read_exact_at(file, &mut hb[..n], 0, "the file header")?;
        if hb[..8] != MAGIC {
            return Err(ImageError::NotAnImage);
        }
        if n < FileHeader::SIZE {
            return Err(ImageError::Truncated("the file header".into()));
        }
        let header = FileHeader::decode(&hb).ok_or_else(|| corrupt("file header"))?;
        if header.major != FORMAT_MAJOR || header.minor > FORMAT_MINOR {
            return Err(ImageError::Version { major: header.major, minor: header.minor });
        }
        if header.header_size as usize != FileHeader::SIZE || header.flags != 0 || header.reserved != [0; 32] {
            return Err(corrupt("file header fields"));
        }
        let min = (FileHeader::SIZE + RecordHeader::SIZE + Trailer::SIZE) as u64;
        if len < min {
            return Err(ImageError::Truncated(format!("{len} bytes is less than the smallest image")));
        }
        let mut tb = [0u8; Trailer::SIZE];
        read_exact_at(file, &mut tb, len - Trailer::SIZE as u64, "the trailer")?;
        if tb[..8] != END_MAGIC {
            return Err(ImageError::Truncated("no trailer at the end of the file".into()));
        }
        let trailer = Trailer::decode(&tb).ok_or_else(|| corrupt("trailer"))?;
        if hash(&[&tb[..Trailer::SIZE - 32]]) != trailer.trailer_hash {
            return Err(corrupt("the trailer fails its checksum"));
        }
        if trailer.file_len != len {
            return Err(if trailer.file_len > len {
                ImageError::Truncated(format!("{len} of {} bytes", trailer.file_len))
            } else {
                corrupt(format!("file is {len} bytes but its trailer says {}", trailer.file_len))
            });
        }
        if hash(&[&hb]) != trailer.header_hash {
            return Err(corrupt("the file header fails its checksum"));
        }
        if trailer.record_count == 0 || trailer.record_count > limits::MAX_RECORDS {
            return Err(corrupt(format!("record count {}", trailer.record_count)));
        }
        let index_len = trailer.record_count * IndexEntry::SIZE as u64;
        let index_end = trailer
            .index_offset
            .checked_add(RecordHeader::SIZE as u64)
            .and_then(|v| v.checked_add(index_len))
            .ok_or_else(|| corrupt("index offset"))?;
        if trailer.index_offset < FileHeader::SIZE as u64 || index_end != len - Trailer::SIZE as u64 {
            return Err(corrupt("index position does not match the trailer"));
        }
        let mut ib = vec![0u8; (RecordHeader::SIZE as u64 + index_len) as usize];
        read_exact_at(file, &mut ib, trailer.index_offset, "the index")?;
        if hash(&[&ib]) != trailer.index_hash {
            return Err(corrupt("the index fails its checksum"));
        }
        let irh = RecordHeader::decode(&ib).ok_or_else(|| corrupt("index header"))?;
        if irh.kind != kind::INDEX || irh.flags != 0 || irh.stored_len != index_len || irh.raw_len != index_len || irh.reserved != 0 {
            return Err(corrupt("index record header"));
        }
        let mut index = Vec::with_capacity(trailer.record_count as usize);
        let mut expect = FileHeader::SIZE as u64;
        for i in 0..trailer.record_count as usize {
            let o = RecordHeader::SIZE + i * IndexEntry::SIZE;
            let e = IndexEntry::decode(&ib[o..]).ok_or_else(|| corrupt("index entry"))?;
            if e.offset != expect {
                return Err(corrupt(format!("record {i} is not where the index says")));
            }
            if e.flags & !rflags::ALL != 0 || (e.flags == 0 && e.raw_len != e.stored_len) {
                return Err(corrupt(format!("record {i} has bad flags or lengths")));
            }
            expect = e
                .offset
                .checked_add(RecordHeader::SIZE as u64)
                .and_then(|v| v.checked_add(e.stored_len))
                .ok_or_else(|| corrupt(format!("record {i} length")))?;
            if expect > trailer.index_offset {
                return Err(corrupt(format!("record {i} runs past the index")));
            }
            index.push(e);
        }
        if expect != trailer.index_offset {
            return Err(corrupt("records do not end where the index starts"));
        }
        let mut img = Image {
            src,
            header,
            trailer,
            index,
            process: ProcessInfo::zeroed(),
            cwd: Vec::new(),
            exe: Vec::new(),
            threads: Vec::new(),
            vmas: Vec::new(),
            fds: Vec::new(),
            pages: Vec::new(),
            stdin: Vec::new(),
            end: EndInfo::zeroed(),
            files: Vec::new(),
            file_data: Vec::new(),
            parents: Vec::new(),
            build_ids: Vec::new(),
            ancestors: Vec::new(),
        };
        img.load_records()?;
        img.validate()?;
        Ok(img)
    }

    /// Reads one record's stored payload and checks its header and hash.
    pub fn read_record(&self, i: usize) -> Result<Vec<u8>, ImageError> {
        let mut buf = Vec::new();
        self.read_record_into(i, &mut buf)?;
        Ok(buf.split_off(RecordHeader::SIZE))
    }

    /// Reads record `i` (its header, then its stored payload) into `buf` and checks the
    /// header and the payload's hash.
    fn read_record_into(&self, i: usize, buf: &mut Vec<u8>) -> Result<(), ImageError> {
        let e = self.index.get(i).ok_or_else(|| corrupt("record number"))?;
        buf.resize(RecordHeader::SIZE + e.stored_len as usize, 0);
        read_exact_at(&*self.src, buf, e.offset, "a record")?;
        self.check_record(i, buf)
    }

    /// Checks record `i`'s bytes `buf` (header and stored payload): the header against the
    /// index, the payload against its hash.
    fn check_record(&self, i: usize, buf: &[u8]) -> Result<(), ImageError> {
        let e = &self.index[i];
        self.check_header(i, buf)?;
        if record_sum(self.header.minor, e.kind, &buf[RecordHeader::SIZE..]) != e.hash {
            return Err(corrupt(format!("record {i} ({}) at offset {} fails its checksum", kind::name(e.kind), e.offset)));
        }
        Ok(())
    }

    fn check_header(&self, i: usize, b: &[u8]) -> Result<(), ImageError> {
        let e = &self.index[i];
        let rh = RecordHeader::decode(b).ok_or_else(|| corrupt("record header"))?;
        if rh.kind != e.kind || rh.flags != e.flags || rh.stored_len != e.stored_len || rh.raw_len != e.raw_len || rh.reserved != 0 {
            return Err(corrupt(format!("record {i} header at offset {} does not match the index", e.offset)));
        }
        Ok(())
    }

    /// Reads the page data of page record `p` (the pages only, after its header), checking
    /// the record's hash first.
    pub fn read_pages(&self, p: &PageRecord) -> Result<Vec<u8>, ImageError> {
        let mut pages = vec![0; p.header.count as usize * PAGE as usize];
        self.check_pages(p, &mut Vec::new(), Some(&mut pages))?;
        Ok(pages)
    }

    /// Checks page record `p` (record header, hash, pages header) and puts its pages in
    /// `out` if given, which must hold them (`p.header.count` pages), decompressing them
    /// straight there if the record is compressed. The record's bytes are read through
    /// `buf` (reused between calls, so that checking a large image does not allocate and
    /// fault in a fresh buffer per record). Returns the page bytes.
    pub fn check_pages(&self, p: &PageRecord, buf: &mut Vec<u8>, out: Option<&mut [u8]>) -> Result<u64, ImageError> {
        self.read_record_into(p.index, buf)?;
        self.check_pages_header(p, buf)?;
        let head = RecordHeader::SIZE + PagesHeader::SIZE;
        let e = &self.index[p.index];
        if e.flags & rflags::REF != 0 {
            let r = buf.get(head..).and_then(PageRef::decode).ok_or_else(|| corrupt(format!("page reference {}", p.index)))?;
            let (k, q) = self.resolve_ref(p, &r)?;
            return self.ancestors[k].check_pages(&q, buf, out);
        }
        // `raw_len` was checked against the header's page count.
        let want = e.raw_len as usize - PagesHeader::SIZE;
        let out = match out {
            Some(o) => Some(o.get_mut(..want).ok_or_else(|| corrupt(format!("page record {} holds more pages than asked for", p.index)))?),
            None => None,
        };
        if e.flags & rflags::DIFF != 0 {
            let unpacked;
            let body = if e.flags & rflags::ZSTD == 0 {
                &buf[head..]
            } else {
                // Changes are never longer than the pages they stand for (see `load_records`).
                unpacked = zstd::bulk::decompress(&buf[head..], want)
                    .map_err(|err| corrupt(format!("page record {} (compressed changes) does not decompress ({err})", p.index)))?;
                &unpacked[..]
            };
            return self.rebuild(p, body, out).map(|()| want as u64);
        }
        if e.flags & rflags::ZSTD != 0 {
            // Compressed pages are checked by decompressing them, into room of their own if
            // the caller keeps none.
            let mut room = Vec::new();
            let out = out.unwrap_or_else(|| {
                room.resize(want, 0);
                &mut room[..]
            });
            let n = zstd::bulk::decompress_to_buffer(&buf[head..], out)
                .map_err(|err| corrupt(format!("page record {} does not decompress ({err})", p.index)))?;
            if n != want {
                return Err(corrupt(format!("page record {} decompresses to {n} bytes, not {want}", p.index)));
            }
        } else {
            let pages = buf.get(head..).filter(|b| b.len() == want);
            let pages =
                pages.ok_or_else(|| corrupt(format!("page record {} has {} bytes of pages, not {want}", p.index, buf.len() - head)))?;
            if let Some(o) = out {
                o.copy_from_slice(pages);
            }
        }
        Ok(want as u64)
    }

    /// Checks the changes `body` of page record `p` (stored as changes, [`crate::diff`]) and,
    /// given `out`, rebuilds its pages there from their bases: the files the image's
    /// private file mappings map (which must have the size and modification time the image
    /// records) and zeros. Without `out` only the form is checked, so that an image can be
    /// verified where its files are not.
    fn rebuild(&self, p: &PageRecord, body: &[u8], out: Option<&mut [u8]>) -> Result<(), ImageError> {
        let count = p.header.count as usize;
        let file = crate::diff::parse(body, count).ok_or_else(|| corrupt(format!("page record {} has malformed changes", p.index)))?;
        let Some(out) = out else { return Ok(()) };
        let mut bases = crate::diff::Bases::default();
        for ((k, addr), page) in crate::diff::page_addrs(&p.header).into_iter().enumerate().zip(out.chunks_exact_mut(PAGE as usize)) {
            if !bases.fill(&self.vmas, addr, crate::diff::file_based(&file, k), page)? {
                return Err(ImageError::Io(io::Error::other(format!(
                    "page record {} is stored as changes to the file mapped at {addr:#x}, which is missing or not the file checkpointed (its size or time differs)",
                    p.index
                ))));
            }
        }
        let Some(sum) = crate::diff::apply(body, count, out) else {
            return Err(corrupt(format!("page record {} has malformed changes", p.index)));
        };
        if sum != crate::diff::sum(body) {
            return Err(ImageError::Io(io::Error::other(format!(
                "page record {} (stored as changes to files the program had mapped) does not rebuild to the pages it was made from: one of those files differs from the one checkpointed",
                p.index
            ))));
        }
        Ok(())
    }

    /// Checks that the pages header in record bytes `b` is the one the page map gave.
    fn check_pages_header(&self, p: &PageRecord, b: &[u8]) -> Result<(), ImageError> {
        let h = b.get(RecordHeader::SIZE..).and_then(PagesHeader::decode).ok_or_else(|| corrupt("pages header"))?;
        if h != p.header {
            return Err(corrupt(format!("page record {} does not match the page map, or changed while it was read", p.index)));
        }
        Ok(())
    }

    /// The reference in page record `i` (a `REF` record), checked against the parents list.
    pub fn page_ref(&self, i: usize) -> Result<PageRef, ImageError> {
        let b = self.read_record(i)?;
        let r = b.get(PagesHeader::SIZE..).and_then(PageRef::decode).ok_or_else(|| corrupt(format!("page reference {i}")))?;
        if r.parent as usize >= self.parents.len() || r.reserved != 0 {
            return Err(corrupt(format!("page reference {i} names parent {} of {}", r.parent, self.parents.len())));
        }
        Ok(r)
    }

    /// Opens the parent images of a delta image (each must be exactly the image its
    /// `PARENTS` entry names: same trailer hash and length), so that its page references can
    /// be read.
    pub fn attach_parents(&mut self) -> Result<(), ImageError> {
        self.attach_parents_with(|p| File::open(p))
    }

    /// [`attach_parents`](Self::attach_parents), opening each parent with `open` (so that
    /// the caller can keep the very file that was checked).
    pub fn attach_parents_with(&mut self, mut open: impl FnMut(&Path) -> io::Result<File>) -> Result<(), ImageError> {
        if self.pages.iter().any(|p| self.index[p.index].flags & rflags::REF != 0) && self.parents.is_empty() {
            return Err(corrupt("page references without a list of parent images"));
        }
        let mut out = Vec::new();
        for p in &self.parents {
            let path = Path::new(std::ffi::OsStr::from_bytes(&p.path));
            let img = open(path).map_err(ImageError::from).and_then(Image::from_file).map_err(|e| {
                ImageError::Io(io::Error::other(format!(
                    "this is a delta image and its parent image {} cannot be used: {e}",
                    path.display()
                )))
            })?;
            if img.trailer.trailer_hash != p.info.trailer_hash || img.trailer.file_len != p.info.file_len {
                return Err(ImageError::Io(io::Error::other(format!(
                    "this is a delta image and its parent image {} has changed since (it is another image now)",
                    path.display()
                ))));
            }
            out.push(img);
        }
        self.ancestors = out;
        Ok(())
    }

    /// Where the pages of record `p` can be read in place, if they can, and the checksum
    /// the restorer then checks itself: the XXH3-128 ([`page_sum`]) of the payload (pages
    /// header, then pages) of the record holding its data, or `None` where that image
    /// predates format 1.4 (its BLAKE3 must be checked by the caller).
    pub fn pages_at(&self, p: &PageRecord) -> Result<PagesAt, ImageError> {
        let skip = (RecordHeader::SIZE + PagesHeader::SIZE) as u64;
        let (k, img, q) = self.holder(p)?;
        let e = &img.index[q.index];
        let sum = (img.header.minor >= PAGE_SUM_MINOR).then(|| {
            let mut sum = [0u8; 16];
            sum.copy_from_slice(&e.hash[..16]);
            sum
        });
        Ok(match k {
            _ if e.flags == rflags::DIFF => match sum {
                Some(s) => PagesAt::Changes(k, e.offset + skip, e.stored_len, s),
                None => PagesAt::Packed,
            },
            _ if e.flags != 0 => PagesAt::Packed,
            Some(k) => PagesAt::Parent(k, e.offset + skip, sum),
            None => PagesAt::Here(e.offset + skip, sum),
        })
    }

    /// The image that holds the data of page record `p` (`None`: this one; else its
    /// position among the attached parents), and the record there.
    fn holder(&self, p: &PageRecord) -> Result<(Option<usize>, &Image, PageRecord), ImageError> {
        if self.index[p.index].flags & rflags::REF != 0 {
            let (k, q) = self.resolve_ref(p, &self.page_ref(p.index)?)?;
            return Ok((Some(k), &self.ancestors[k], q));
        }
        Ok((None, self, *p))
    }

    /// Checks the headers of page record `p` (of the record holding its data: its record
    /// header against the index, its pages header against the page map) but not its data,
    /// for a record whose data the restorer checks (the sum [`pages_at`](Self::pages_at)
    /// gives).
    /// Returns the page bytes.
    pub fn check_pages_head(&self, p: &PageRecord) -> Result<u64, ImageError> {
        let (_, img, q) = self.holder(p)?;
        let e = &img.index[q.index];
        let mut b = [0u8; RecordHeader::SIZE + PagesHeader::SIZE];
        read_exact_at(&*img.src, &mut b, e.offset, "a page record header")?;
        img.check_header(q.index, &b)?;
        img.check_pages_header(&q, &b)?;
        Ok(q.header.count as u64 * PAGE)
    }

    /// The parent image (its position among the attached ones) and record a `REF` record
    /// names, checked: a data record with the same header and the hash the reference gives.
    fn resolve_ref(&self, p: &PageRecord, r: &PageRef) -> Result<(usize, PageRecord), ImageError> {
        let a = self.ancestors.get(r.parent as usize).ok_or_else(|| {
            if r.parent as usize >= self.parents.len() {
                corrupt(format!("page reference {} names parent {} of {}", p.index, r.parent, self.parents.len()))
            } else {
                ImageError::Io(io::Error::other("this is a delta image and its parent images are not open"))
            }
        })?;
        let at = a.pages.partition_point(|q| (q.index as u64) < r.record);
        match a.pages.get(at).filter(|q| q.index as u64 == r.record) {
            Some(q) if q.header == p.header && a.index[q.index].hash == r.hash && a.index[q.index].flags & rflags::REF == 0 => {
                Ok((r.parent as usize, *q))
            }
            _ => Err(corrupt(format!("page reference {} does not match record {} of its parent image", p.index, r.record))),
        }
    }

    /// Checks the hash of every page, file data and pad record (what `inspect` and
    /// `restore` verify).
    pub fn verify_pages(&self) -> Result<(), ImageError> {
        // One buffer for all records: a record is at most a window (1 MiB) and its headers,
        // so it stays in the cache while its checksum is computed.
        let mut buf = Vec::new();
        for p in &self.pages {
            self.check_pages(p, &mut buf, None)?;
        }
        for d in &self.file_data {
            self.read_file_data(d)?;
        }
        for i in (0..self.index.len()).filter(|&i| self.index[i].kind == kind::PAD) {
            if self.read_record(i)?.iter().any(|&b| b != 0) {
                return Err(corrupt(format!("record {i} (pad) is not zeros")));
            }
        }
        Ok(())
    }

    /// Reads the bytes of file data record `d`, checking the record's hash first.
    pub fn read_file_data(&self, d: &FileDataRecord) -> Result<Vec<u8>, ImageError> {
        let mut payload = self.read_record(d.index)?;
        let h = FileData::decode(&payload).ok_or_else(|| corrupt("file data header"))?;
        if h != d.header {
            return Err(corrupt(format!("record {} changed while it was read", d.index)));
        }
        Ok(payload.split_off(FileData::SIZE))
    }

    /// The file object `id`.
    pub fn file(&self, id: u32) -> Option<&FileRec> {
        self.files.iter().find(|f| f.info.id == id)
    }

    /// The file object of kind `k` with this identity.
    pub fn file_by_identity(&self, k: u32, dev: u64, ino: u64) -> Option<&FileRec> {
        self.files.iter().find(|f| f.info.kind == k && f.info.dev == dev && f.info.ino == ino)
    }

    fn load_records(&mut self) -> Result<(), ImageError> {
        let n = self.index.len();
        // Since format 1.3 the last record lists every page record's header, so that the
        // page records need not be read to learn where their pages go. Each record's own
        // header is compared with its entry when the record is read.
        let n_pages = self.index.iter().filter(|e| e.kind == kind::PAGES).count();
        let map_len = (n_pages * PagesHeader::SIZE) as u64;
        let mut map = None;
        if let Some(last) = self.index.last().filter(|e| e.kind == kind::PAGEMAP) {
            if last.stored_len != map_len || n_pages == 0 {
                return Err(corrupt(format!("the page map lists {} bytes for {n_pages} page records", last.stored_len)));
            }
            let b = self.read_record(n - 1)?;
            let hs = b
                .chunks_exact(PagesHeader::SIZE)
                .map(|c| PagesHeader::decode(c).ok_or_else(|| corrupt("page map entry")))
                .collect::<Result<Vec<_>, _>>()?;
            map = Some(hs.into_iter());
        }
        let mut stage = 0; // 0 process, 1 threads, 2 vmas, 3 fds, 4 data, 5 end, 6 parents, 7 page map
        for i in 0..n {
            let e = self.index[i];
            let meta_limit = match e.kind {
                kind::PAGEMAP => map_len,
                kind::PAGES => PagesHeader::SIZE as u64 + WINDOW_PAGES * PAGE,
                kind::PAD => PAGE - 1,
                kind::FILE_DATA => FileData::SIZE as u64 + FILE_DATA_MAX,
                kind::STDIN => limits::MAX_STDIN,
                kind::FD => limits::MAX_FD_RECORD,
                _ => limits::MAX_META,
            };
            if e.stored_len > meta_limit {
                return Err(corrupt(format!("record {i} ({}) is {} bytes", kind::name(e.kind), e.stored_len)));
            }
            // A PAD (1.5) only ever goes right before the page record it aligns.
            if e.kind == kind::PAD
                && (self.header.minor < PAD_MINOR
                    || e.raw_len != e.stored_len
                    || self.index.get(i + 1).is_none_or(|n| n.kind != kind::PAGES))
            {
                return Err(corrupt(format!("record {i} (pad) is not allowed there")));
            }
            if e.kind != kind::PAGES && e.flags != 0 {
                return Err(corrupt(format!("record {i} ({}) has flags", kind::name(e.kind))));
            }
            if e.flags & rflags::REF != 0 && (e.flags != rflags::REF || e.stored_len != (PagesHeader::SIZE + PageRef::SIZE) as u64) {
                return Err(corrupt(format!("page reference {i} has the wrong flags or length")));
            }
            // Stored as changes only where that is smaller (so a restorer's buffer for the
            // record's pages holds it too); compressed too from 1.7.
            if e.flags & rflags::DIFF != 0 {
                let zstd = e.flags == rflags::DIFF | rflags::ZSTD;
                let least = if zstd { 1 } else { crate::diff::HEAD };
                if (e.flags != rflags::DIFF && !zstd)
                    || self.header.minor < diff_since(e.flags)
                    || e.stored_len < (PagesHeader::SIZE + least) as u64
                    || e.stored_len > e.raw_len
                {
                    return Err(corrupt(format!("page record {i} (stored as changes) has the wrong flags or length")));
                }
            }
            let want = match e.kind {
                kind::PROCESS => 0,
                kind::THREAD => 1,
                kind::VMA => 2,
                kind::FD => 3,
                kind::PAGES | kind::PAD | kind::STDIN | kind::FILE | kind::FILE_DATA | kind::FILE_IDS => 4,
                kind::END => 5,
                kind::PARENTS => 6,
                kind::PAGEMAP => 7,
                _ => return Err(corrupt(format!("record {i} has unknown kind {}", e.kind))),
            };
            // After END: at most one PARENTS, then at most one PAGEMAP.
            let bad = if want >= 6 {
                stage < 5 || want <= stage
            } else {
                want < stage || stage >= 5 || (want == 0 && i != 0) || (i == 0 && want != 0)
            };
            if bad {
                return Err(corrupt(format!("record {i} ({}) is out of order", kind::name(e.kind))));
            }
            stage = want;
            match e.kind {
                // Nothing reads a PAD's bytes but `verify_pages`.
                kind::PAGEMAP | kind::PAD => {}
                kind::PAGES => {
                    if (e.stored_len as usize) < PagesHeader::SIZE {
                        return Err(corrupt(format!("page record {i} is too short")));
                    }
                    if let Some(m) = map.as_mut() {
                        let h = m.next().ok_or_else(|| corrupt("the page map is short"))?;
                        self.pages.push(PageRecord { index: i, header: h });
                        continue;
                    }
                    let mut b = [0u8; RecordHeader::SIZE + PagesHeader::SIZE];
                    read_exact_at(&*self.src, &mut b, e.offset, "a page record")?;
                    self.check_header(i, &b)?;
                    let h = PagesHeader::decode(&b[RecordHeader::SIZE..]).ok_or_else(|| corrupt("pages header"))?;
                    self.pages.push(PageRecord { index: i, header: h });
                }
                kind::FILE_DATA => {
                    let mut b = [0u8; RecordHeader::SIZE + FileData::SIZE];
                    if (e.stored_len as usize) < FileData::SIZE {
                        return Err(corrupt(format!("file data record {i} is too short")));
                    }
                    read_exact_at(&*self.src, &mut b, e.offset, "a file data record")?;
                    self.check_header(i, &b)?;
                    let h = FileData::decode(&b[RecordHeader::SIZE..]).ok_or_else(|| corrupt("file data header"))?;
                    if e.raw_len != FileData::SIZE as u64 + h.len || h.len > FILE_DATA_MAX || h.len == 0 || h.reserved != 0 {
                        return Err(corrupt(format!("file data record {i} has the wrong length")));
                    }
                    if !self.files.iter().any(|f| f.info.id == h.id) {
                        return Err(corrupt(format!("file data record {i} names file {} before it is described", h.id)));
                    }
                    self.file_data.push(FileDataRecord { index: i, header: h });
                }
                _ => {
                    let p = self.read_record(i)?;
                    self.parse_meta(i, e.kind, &p)?;
                }
            }
        }
        if stage < 5 {
            return Err(ImageError::Truncated("the agent's stream has no end record".into()));
        }
        Ok(())
    }

    fn parse_meta(&mut self, i: usize, k: u32, p: &[u8]) -> Result<(), ImageError> {
        let bad_len = || corrupt(format!("record {i} ({}) has the wrong length", kind::name(k)));
        match k {
            kind::PROCESS => {
                let pi = ProcessInfo::decode(p).ok_or_else(bad_len)?;
                if pi.cwd_len > limits::MAX_PATH || pi.exe_len > limits::MAX_PATH {
                    return Err(corrupt("process paths are too long"));
                }
                let total = ProcessInfo::SIZE + pi.cwd_len as usize + pi.exe_len as usize;
                if p.len() != total {
                    return Err(bad_len());
                }
                self.cwd = p[ProcessInfo::SIZE..ProcessInfo::SIZE + pi.cwd_len as usize].to_vec();
                self.exe = p[ProcessInfo::SIZE + pi.cwd_len as usize..].to_vec();
                self.process = pi;
            }
            kind::THREAD => {
                if p.len() != ThreadInfo::SIZE {
                    return Err(bad_len());
                }
                self.threads.push(ThreadInfo::decode(p).ok_or_else(bad_len)?);
            }
            kind::VMA => self.vmas.push(Vma::decode(p).ok_or_else(bad_len)?),
            kind::FD => {
                let f = FdInfo::decode(p).ok_or_else(bad_len)?;
                if f.path_len > limits::MAX_PATH || p.len() as u64 != FdInfo::SIZE as u64 + f.path_len as u64 + f.extra_len as u64 {
                    return Err(bad_len());
                }
                let path_end = FdInfo::SIZE + f.path_len as usize;
                self.fds.push(Fd { info: f, path: p[FdInfo::SIZE..path_end].to_vec(), extra: p[path_end..].to_vec() });
            }
            kind::FILE => {
                let f = FileObj::decode(p).ok_or_else(bad_len)?;
                if f.name_len > limits::MAX_PATH || p.len() != FileObj::SIZE + f.name_len as usize {
                    return Err(bad_len());
                }
                self.files.push(FileRec { info: f, name: p[FileObj::SIZE..].to_vec() });
            }
            kind::STDIN => {
                if !self.stdin.is_empty() {
                    return Err(corrupt("two stdin records"));
                }
                self.stdin = p.to_vec();
            }
            kind::END => {
                if p.len() != EndInfo::SIZE {
                    return Err(bad_len());
                }
                self.end = EndInfo::decode(p).ok_or_else(bad_len)?;
            }
            kind::FILE_IDS => {
                let n = list_count(p, limits::MAX_VMAS).filter(|_| self.build_ids.is_empty());
                let Some(n) = n else { return Err(corrupt(format!("record {i} lists a bad number of build-ids"))) };
                let word = |o: usize| p.get(o..o + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
                let mut o = 8;
                for _ in 0..n {
                    let (plen, ilen) = (word(o).ok_or_else(bad_len)?, word(o + 4).ok_or_else(bad_len)?);
                    o += 8;
                    if plen as u32 > limits::MAX_PATH || !(1..=64).contains(&ilen) {
                        return Err(corrupt(format!("record {i} has a bad build-id entry")));
                    }
                    let id = p.get(o..o + ilen).ok_or_else(bad_len)?.to_vec();
                    let path = p.get(o + ilen..o + ilen + plen).ok_or_else(bad_len)?.to_vec();
                    o += ilen + plen;
                    if !self
                        .vmas
                        .iter()
                        .any(|v| v.name == path && (v.info.kind == vma_kind::FILE_PRIVATE || v.info.kind == vma_kind::FILE_SHARED))
                    {
                        return Err(corrupt(format!("record {i} gives a build-id for a file the program had not mapped")));
                    }
                    self.build_ids.push((path, id));
                }
                if o != p.len() {
                    return Err(bad_len());
                }
            }
            kind::PARENTS => {
                let Some(n) = list_count(p, limits::MAX_PARENTS) else {
                    return Err(corrupt(format!("record {i} lists a bad number of parent images")));
                };
                let mut o = 8;
                for _ in 0..n {
                    let info = p.get(o..).and_then(ParentInfo::decode).ok_or_else(bad_len)?;
                    o += ParentInfo::SIZE;
                    let path = p.get(o..o + info.path_len as usize).ok_or_else(bad_len)?;
                    if info.path_len > limits::MAX_PATH || info.reserved != 0 || path.first() != Some(&b'/') {
                        return Err(corrupt(format!("record {i} names a parent image badly")));
                    }
                    o += path.len();
                    self.parents.push(Parent { info, path: path.to_vec() });
                }
                if o != p.len() {
                    return Err(bad_len());
                }
            }
            _ => return Err(corrupt(format!("record {i} has unknown kind {k}"))),
        }
        Ok(())
    }

    /// The memory area containing `addr`, if any.
    pub fn vma_at(&self, addr: u64) -> Option<&Vma> {
        let i = self.vmas.partition_point(|v| v.info.end <= addr);
        self.vmas.get(i).filter(|v| v.info.start <= addr)
    }

    fn check_addr(&self, what: &str, addr: u64, need_prot: u32) -> Result<(), ImageError> {
        match self.vma_at(addr) {
            Some(v) if v.info.prot & need_prot == need_prot => Ok(()),
            _ => Err(corrupt(format!("{what} {addr:#x} is not in a suitable memory area"))),
        }
    }

    fn validate(&self) -> Result<(), ImageError> {
        let p = &self.process;
        if p.page_size as u64 != PAGE {
            return Err(corrupt(format!("page size {}", p.page_size)));
        }
        if p.thread_count == 0 || p.thread_count > limits::MAX_THREADS || p.thread_count as usize != self.threads.len() {
            return Err(corrupt("thread count"));
        }
        if p.vma_count == 0 || p.vma_count > limits::MAX_VMAS || p.vma_count as usize != self.vmas.len() {
            return Err(corrupt("memory area count"));
        }
        if p.fd_count > limits::MAX_FDS || p.fd_count as usize != self.fds.len() {
            return Err(corrupt("file descriptor count"));
        }
        if p.flags & !pflags::ALL != 0 {
            return Err(corrupt("process flags"));
        }
        if p.auxv_words as usize > AUXV_WORDS || !p.auxv_words.is_multiple_of(2) {
            return Err(corrupt("auxv length"));
        }
        if p.ctl_fd < 0 || p.ctl_fd as u32 >= limits::MAX_FDS {
            return Err(corrupt("control fd"));
        }
        if p.sig_ckpt < 32 || p.sig_ckpt > 64 {
            return Err(corrupt("checkpoint signal"));
        }
        let m = &p.mm;
        for (n, v) in [
            ("start_code", m.start_code),
            ("end_code", m.end_code),
            ("start_data", m.start_data),
            ("end_data", m.end_data),
            ("start_brk", m.start_brk),
            ("brk", m.brk),
            ("start_stack", m.start_stack),
            ("arg_start", m.arg_start),
            ("arg_end", m.arg_end),
            ("env_start", m.env_start),
            ("env_end", m.env_end),
        ] {
            if v >= USER_END {
                return Err(corrupt(format!("{n} {v:#x} is outside user space")));
            }
        }
        if m.start_code > m.end_code
            || m.start_data > m.end_data
            || m.start_brk > m.brk
            || m.arg_start > m.arg_end
            || m.env_start > m.env_end
        {
            return Err(corrupt("memory layout fields are out of order"));
        }
        // vDSO block: sorted, contiguous, page aligned.
        let vd = &p.vdso;
        if vd.count == 0 || vd.count > 4 || vd.areas[vd.count as usize..].iter().any(|a| *a != VdsoArea::zeroed()) {
            return Err(corrupt("vDSO area count"));
        }
        let mut prev_end = 0;
        for a in &vd.areas[..vd.count as usize] {
            if !(1..=3).contains(&a.kind)
                || a.start % PAGE != 0
                || a.len % PAGE != 0
                || a.len == 0
                || a.len > 1 << 20
                || a.start.checked_add(a.len).is_none_or(|e| e > USER_END)
            {
                return Err(corrupt("vDSO area"));
            }
            if prev_end != 0 && a.start != prev_end {
                return Err(corrupt("vDSO areas are not contiguous"));
            }
            prev_end = a.start + a.len;
        }
        // Memory areas.
        let mut last_end = 0;
        let vstart = vd.areas[0].start;
        for (i, v) in self.vmas.iter().enumerate() {
            let x = &v.info;
            if x.start % PAGE != 0 || x.end % PAGE != 0 || x.start >= x.end || x.end > USER_END || x.start < last_end {
                return Err(corrupt(format!("memory area {i} ({:#x}-{:#x}) is misplaced", x.start, x.end)));
            }
            last_end = x.end;
            if x.start < prev_end && x.end > vstart {
                return Err(corrupt(format!("memory area {i} overlaps the vDSO")));
            }
            if x.prot > 7 || x.flags & !vflags::ALL != 0 || x.pgoff % PAGE != 0 || x.mtime_nsec >= 1_000_000_000 {
                return Err(corrupt(format!("memory area {i} fields")));
            }
            let mut at = x.start;
            for g in &v.guards {
                if g.start % PAGE != 0 || g.end % PAGE != 0 || g.start < at || g.start >= g.end || g.end > x.end {
                    return Err(corrupt(format!("memory area {i} has a misplaced guard range")));
                }
                at = g.end;
            }
            if !v.guards.is_empty() && matches!(x.kind, vma_kind::FILE_SHARED | vma_kind::SHM) {
                return Err(corrupt(format!("shared memory area {i} has guard pages")));
            }
            let npages = (x.end - x.start) / PAGE;
            if x.pages > npages {
                return Err(corrupt(format!("memory area {i} claims more pages than it has")));
            }
            match x.kind {
                vma_kind::ANON | vma_kind::HEAP | vma_kind::STACK => {}
                vma_kind::SHM => {}
                vma_kind::FILE_PRIVATE | vma_kind::FILE_SHARED | vma_kind::FILE_GONE => {
                    if v.name.first() != Some(&b'/') {
                        return Err(corrupt(format!("memory area {i} has no file path")));
                    }
                    if x.kind == vma_kind::FILE_SHARED && x.pages != 0 {
                        return Err(corrupt(format!("shared memory area {i} has pages")));
                    }
                }
                _ => return Err(corrupt(format!("memory area {i} has unknown kind {}", x.kind))),
            }
            if v.name.contains(&0) {
                return Err(corrupt(format!("memory area {i} name")));
            }
        }
        self.check_addr("restart entry", p.restart_entry, 4)?;
        self.check_addr("agent state", p.agent_state, 3)?;
        // Threads.
        let mut managers = 0;
        let mut mains = 0;
        let mut tids: Vec<u32> = self.threads.iter().map(|t| t.tid).collect();
        tids.sort_unstable();
        if tids.windows(2).any(|w| w[0] == w[1]) || tids.first() == Some(&0) {
            return Err(corrupt("thread ids are not unique"));
        }
        for (i, t) in self.threads.iter().enumerate() {
            match t.role {
                role::MANAGER => managers += 1,
                role::MAIN => mains += 1,
                role::OTHER => {}
                _ => return Err(corrupt(format!("thread {i} role"))),
            }
            self.check_addr(&format!("thread {i} stack pointer"), t.ctx.rsp, 3)?;
            self.check_addr(&format!("thread {i} resume point"), t.ctx.rip, 4)?;
            if t.fs_base >= USER_END || t.gs_base >= USER_END {
                return Err(corrupt(format!("thread {i} TLS base")));
            }
            if t.tid_addr != 0 {
                self.check_addr(&format!("thread {i} tid address"), t.tid_addr, 3)?;
            }
            if t.rseq_len != 0 {
                if t.rseq_len < 32 || t.rseq_len > 1024 || t.rseq_len % 32 != 0 {
                    return Err(corrupt(format!("thread {i} rseq length")));
                }
                self.check_addr(&format!("thread {i} rseq area"), t.rseq_area, 3)?;
            }
            if t.robust_len > 4096 || t.robust_head >= USER_END {
                return Err(corrupt(format!("thread {i} robust list")));
            }
            if t.ctx.mxcsr & !0xffff != 0 || t.ctx.fcw & !0xffff != 0 || t.reserved != 0 {
                return Err(corrupt(format!("thread {i} registers")));
            }
        }
        if managers != 1 || mains > 1 || (mains == 0) != (p.flags & pflags::MAIN_EXITED != 0) {
            return Err(corrupt("thread roles"));
        }
        // File descriptors.
        let mut fds: Vec<i32> = self.fds.iter().map(|f| f.info.fd).collect();
        fds.sort_unstable();
        if fds.windows(2).any(|w| w[0] == w[1]) {
            return Err(corrupt("file descriptors are not unique"));
        }
        let mut pipe_data: Vec<u64> = Vec::new();
        for (i, f) in self.fds.iter().enumerate() {
            let x = &f.info;
            if x.fd < 0 || x.fd as u32 >= limits::MAX_FDS || x.fd == p.ctl_fd || x.fd_flags & !1 != 0 || x.mtime_nsec >= 1_000_000_000 {
                return Err(corrupt(format!("fd record {i}")));
            }
            let bad = |what: &str| corrupt(format!("fd {} ({}) {what}", x.fd, fd_kind::name(x.kind)));
            let no_extra = f.extra.is_empty();
            match x.kind {
                fd_kind::STDIO => {
                    if x.aux > 2 || !no_extra {
                        return Err(bad("stdio stream"));
                    }
                }
                fd_kind::REG | fd_kind::DIR | fd_kind::CHR => {
                    if f.path.first() != Some(&b'/') || f.path.contains(&0) || !no_extra {
                        return Err(bad("path"));
                    }
                }
                fd_kind::PIPE => {
                    if x.aux < PAGE as u32 || x.aux > limits::MAX_PIPE || f.extra.len() as u64 > x.aux as u64 {
                        return Err(bad("pipe capacity or data"));
                    }
                    if !no_extra {
                        if x.open_flags & 3 != 0 || pipe_data.contains(&x.ino) {
                            return Err(bad("pipe data on a write end, or twice"));
                        }
                        pipe_data.push(x.ino);
                    }
                }
                fd_kind::EVENTFD | fd_kind::SIGNALFD => {
                    if !no_extra || x.aux > 1 || (x.kind == fd_kind::EVENTFD && x.pos == u64::MAX) {
                        return Err(bad("state"));
                    }
                }
                fd_kind::TIMERFD => match f.timerfd() {
                    Some(t)
                        if f.extra.len() == TimerfdState::SIZE
                            && [0u32, 1, 7, 8, 9].contains(&t.clockid)
                            && t.value_sec >= 0
                            && t.interval_sec >= 0
                            && (0..1_000_000_000).contains(&t.value_nsec)
                            && (0..1_000_000_000).contains(&t.interval_nsec) => {}
                    _ => return Err(bad("timer state")),
                },
                fd_kind::SHM | fd_kind::DELETED => {}
                fd_kind::SOCKET => match SocketState::decode(&f.extra) {
                    Some(s)
                        if f.extra.len() == SocketState::SIZE
                            && (sock::LISTEN..=sock::FRESH).contains(&x.aux)
                            && [1u32, 2, 10].contains(&s.family)
                            && [1u32, 2, 5].contains(&s.sock_type)
                            && s.addr_len <= 128
                            && s.reserved == 0
                            && s.flags & !7 == 0 => {}
                    _ => return Err(bad("socket state")),
                },
                fd_kind::EPOLL => {
                    let n = f.extra.len() / EpollItem::SIZE;
                    if f.extra.len() % EpollItem::SIZE != 0
                        || n as u32 > limits::MAX_EPOLL_ITEMS
                        || f.epoll_items().iter().any(|it| it.tfd < 0)
                    {
                        return Err(bad("interest list"));
                    }
                }
                _ => return Err(corrupt(format!("fd {} has unknown kind {}", x.fd, x.kind))),
            }
            if x.share != x.fd {
                match self.fds.iter().find(|o| o.info.fd == x.share) {
                    Some(o) if o.info.share == o.info.fd && o.info.kind == x.kind && o.info.fd < x.fd => {}
                    _ => return Err(corrupt(format!("fd {} shares with fd {}", x.fd, x.share))),
                }
            }
        }
        // File objects: unique, well formed, their data inside them and adding up.
        let mut ids: Vec<u32> = self.files.iter().map(|f| f.info.id).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return Err(corrupt("file object ids are not unique"));
        }
        for f in &self.files {
            let x = &f.info;
            let what = |w: &str| corrupt(format!("file object {} ({}) {w}", x.id, file_kind::name(x.kind)));
            if !(file_kind::SHM..=file_kind::CARRIED_SYMLINK).contains(&x.kind)
                || x.reserved != 0
                || x.mtime_nsec >= 1_000_000_000
                || x.size > 1 << 40
            {
                return Err(what("fields"));
            }
            if f.name.contains(&0) {
                return Err(what("name"));
            }
            if x.kind >= file_kind::CARRIED {
                let p = String::from_utf8_lossy(&f.name);
                if !p.starts_with('/') || p.split('/').any(|c| c == "..") || x.id < SUPERVISOR_FILE_IDS {
                    return Err(what("path"));
                }
            }
            let mut at = 0u64;
            let mut sum = 0u64;
            for d in self.file_data.iter().filter(|d| d.header.id == x.id) {
                let h = &d.header;
                if h.offset < at || h.offset.checked_add(h.len).is_none_or(|e| e > x.size) || x.kind == file_kind::CARRIED_DIR {
                    return Err(what("data is out of place"));
                }
                at = h.offset + h.len;
                sum += h.len;
            }
            if sum != x.data_bytes {
                return Err(what("data does not add up"));
            }
        }
        for v in &self.vmas {
            let has_obj = self.file_by_identity(file_kind::SHM, v.info.dev, v.info.ino).is_some()
                || self.file_by_identity(file_kind::DELETED, v.info.dev, v.info.ino).is_some();
            if v.info.kind == vma_kind::SHM && (v.info.pages != 0 || !has_obj) {
                return Err(corrupt(format!("shared memory area {:#x} has no object", v.info.start)));
            }
        }
        for f in &self.fds {
            let want = match f.info.kind {
                fd_kind::SHM => file_kind::SHM,
                fd_kind::DELETED => file_kind::DELETED,
                _ => continue,
            };
            if self.file_by_identity(want, f.info.dev, f.info.ino).is_none() || !f.extra.is_empty() {
                return Err(corrupt(format!("fd {} has no file object", f.info.fd)));
            }
        }
        // Page records: inside areas that take pages, in order, counts consistent.
        let mut per_vma = vec![0u64; self.vmas.len()];
        let mut last = 0u64;
        let mut total = 0u64;
        for pr in &self.pages {
            let h = &pr.header;
            let e = &self.index[pr.index];
            let what = || format!("page record {} at {:#x}", pr.index, h.start);
            if h.npages == 0 || h.npages as u64 > WINDOW_PAGES || h.start % PAGE != 0 || h.start < last {
                return Err(corrupt(what()));
            }
            let end = h.start + h.npages as u64 * PAGE;
            if end > USER_END || h.start / (WINDOW_PAGES * PAGE) != (end - 1) / (WINDOW_PAGES * PAGE) {
                return Err(corrupt(what()));
            }
            for i in h.npages..256 {
                if h.has(i) {
                    return Err(corrupt(what()));
                }
            }
            if h.count != h.popcount() || h.count == 0 || e.raw_len != PagesHeader::SIZE as u64 + h.count as u64 * PAGE {
                return Err(corrupt(what()));
            }
            let vi = self.vmas.partition_point(|v| v.info.end <= h.start);
            match self.vmas.get(vi) {
                Some(v)
                    if v.info.start <= h.start
                        && end <= v.info.end
                        && v.info.kind != vma_kind::FILE_SHARED
                        && v.info.kind != vma_kind::SHM => {}
                _ => return Err(corrupt(format!("{} is outside any memory area that holds pages", what()))),
            }
            per_vma[vi] += h.count as u64;
            total += h.count as u64;
            last = end;
        }
        for (i, v) in self.vmas.iter().enumerate() {
            if v.info.pages != per_vma[i] {
                return Err(corrupt(format!("memory area {i} page count does not match its page records")));
            }
        }
        if self.end.pages != total {
            return Err(corrupt("end record page count"));
        }
        Ok(())
    }

    /// The image's stored bytes of page data.
    pub fn page_bytes(&self) -> u64 {
        self.pages.iter().map(|p| p.header.count as u64 * PAGE).sum()
    }

    /// The file length.
    pub fn file_len(&self) -> u64 {
        self.trailer.file_len
    }

    /// Human-readable name of a memory area.
    pub fn vma_name(v: &Vma) -> String {
        path_str(&v.name)
    }
}

/// Re-writes an image with a changed process record, keeping everything else, and seals it
/// again (used by tests to make images "from another machine").
pub fn rewrite_process(src: &Path, dst: &Path, mut f: impl FnMut(&mut ProcessInfo)) -> Result<(), ImageError> {
    rewrite(src, dst, |k, payload| {
        if k == kind::PROCESS {
            if let Some(mut p) = ProcessInfo::decode(payload) {
                f(&mut p);
                let _ = p.encode(payload);
            }
        }
    })
}

/// Re-writes an image, letting `f` change each record's stored payload (given its kind),
/// and seals it again (used by tests to make images that are consistent but different).
pub fn rewrite(src: &Path, dst: &Path, f: impl FnMut(u32, &mut Vec<u8>)) -> Result<(), ImageError> {
    rewrite_as(src, dst, FORMAT_MINOR, f)
}

/// [`rewrite`] in format 1.`minor` (3 or 4), as an older version would have written it.
pub fn rewrite_as(src: &Path, dst: &Path, minor: u16, mut f: impl FnMut(u32, &mut Vec<u8>)) -> Result<(), ImageError> {
    let img = Image::open(src)?;
    let out = File::create(dst)?;
    let mut w = Writer::with_minor(io::BufWriter::new(out), img.header.created_unix_ns, minor)?;
    w.parents_used = img.parents.clone();
    for i in 0..img.index.len() {
        let e = img.index[i];
        let mut payload = img.read_record(i)?;
        if e.flags & rflags::DIFF != 0 && minor < diff_since(e.flags) {
            // Rebuilt from the files mapped, as an older version stored it.
            let p = img.pages.iter().find(|p| p.index == i).ok_or_else(|| corrupt("a page record not in the page map"))?;
            payload.truncate(PagesHeader::SIZE);
            payload.extend_from_slice(&img.read_pages(p)?);
            f(e.kind, &mut payload);
            w.record(e.kind, 0, payload.len() as u64, &payload)?;
            continue;
        }
        f(e.kind, &mut payload);
        w.record(e.kind, e.flags, e.raw_len, &payload)?;
    }
    let (mut bw, _) = w.finish()?;
    bw.flush()?;
    Ok(())
}

/// Reads a whole stream of records as the agent writes them (header + payload each),
/// calling `f` for each; stops after `END`. Each payload is read into a buffer from
/// `buf` (`Vec::new` will do), so that a caller can hand used buffers back instead of
/// having a new one allocated and cleared for every record: reading 1 GiB spent about a
/// fifth of its time clearing fresh buffers.
pub fn read_stream<R: Read>(
    mut r: R,
    mut buf: impl FnMut() -> Vec<u8>,
    mut f: impl FnMut(RecordHeader, Vec<u8>) -> io::Result<()>,
) -> io::Result<()> {
    loop {
        let mut hb = [0u8; RecordHeader::SIZE];
        r.read_exact(&mut hb)?;
        let h = RecordHeader::decode(&hb).ok_or_else(|| io::Error::other("short record header"))?;
        let max = match h.kind {
            kind::PAGES => PagesHeader::SIZE as u64 + WINDOW_PAGES * PAGE,
            kind::FILE_DATA => FileData::SIZE as u64 + FILE_DATA_MAX,
            kind::FD => limits::MAX_FD_RECORD,
            _ => limits::MAX_META,
        };
        let known =
            matches!(h.kind, kind::PROCESS | kind::THREAD | kind::VMA | kind::FD | kind::PAGES | kind::END | kind::FILE | kind::FILE_DATA);
        // A page window unchanged since the parent image: its header only, `raw_len` the
        // size of the record it stands for (checked by `Writer::unchanged`).
        let unchanged = h.kind == kind::PAGES && h.flags == rflags::REF && h.stored_len == PagesHeader::SIZE as u64;
        if h.stored_len > max || (h.flags != 0 && !unchanged) || (h.raw_len != h.stored_len && !unchanged) || !known {
            return Err(io::Error::other(format!("the agent sent a bad record (kind {}, {} bytes)", h.kind, h.stored_len)));
        }
        let mut payload = buf();
        // Only bytes beyond what the buffer already held are cleared.
        payload.resize(h.stored_len as usize, 0);
        r.read_exact(&mut payload)?;
        let end = h.kind == kind::END;
        f(h, payload)?;
        if end {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Wire;

    fn enc_all<T: Wire>(v: &T, tail: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; T::SIZE];
        v.put(&mut b);
        b.extend_from_slice(tail);
        b
    }

    /// A small valid image: one anonymous area with two stored pages and a guard range,
    /// one thread, no fds.
    pub(crate) fn synthetic() -> Vec<u8> {
        synthetic_with(&[GuardRange { start: 0x1c000, end: 0x1e000 }])
    }

    fn synthetic_with(guards: &[GuardRange]) -> Vec<u8> {
        synthetic_map(guards, |_| {})
    }

    /// A synthetic image whose page map `f` may change before it is written.
    fn synthetic_map(guards: &[GuardRange], f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        synthetic_full(guards, None, f)
    }

    /// A synthetic image, a delta on top of `parent` if given.
    fn synthetic_full(guards: &[GuardRange], parent: Option<ParentMap>, f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        synthetic_as(FORMAT_MINOR, 7, guards, parent, f)
    }

    /// [`synthetic_full`] in format 1.`minor`, its two pages filled with `fill`.
    fn synthetic_as(minor: u16, fill: u8, guards: &[GuardRange], parent: Option<ParentMap>, f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        synthetic_n(minor, fill, 2, guards, parent, f)
    }

    /// The process and thread records of the synthetic images, with `vmas` areas.
    fn synthetic_process(vmas: u32) -> (ProcessInfo, ThreadInfo) {
        let mut p = ProcessInfo::zeroed();
        p.pid = 42;
        p.page_size = PAGE as u32;
        p.thread_count = 1;
        p.vma_count = vmas;
        p.sig_ckpt = 61;
        p.ctl_fd = 1023;
        p.mm.start_code = 0x10000;
        p.mm.end_code = 0x11000;
        p.vdso.count = 1;
        p.vdso.areas[0] = VdsoArea { kind: vdso_kind::VDSO, reserved: 0, start: 0x7fff_0000_0000, len: 8192 };
        p.restart_entry = 0x10100;
        p.agent_state = 0x10200;
        p.flags = pflags::MAIN_EXITED;
        let mut t = ThreadInfo::zeroed();
        t.tid = 43;
        t.role = role::MANAGER;
        t.ctx.rsp = 0x18000;
        t.ctx.rip = 0x10400;
        (p, t)
    }

    /// [`synthetic_as`] with `n` pages (2, or the first `n` of the area).
    fn synthetic_n(
        minor: u16,
        fill: u8,
        n: u32,
        guards: &[GuardRange],
        parent: Option<ParentMap>,
        f: impl FnOnce(&mut Vec<u8>),
    ) -> Vec<u8> {
        let (p, t) = synthetic_process(1);
        let v = VmaInfo {
            start: 0x10000,
            end: 0x20000,
            prot: 7,
            kind: vma_kind::ANON,
            pages: n as u64,
            n_guards: guards.len() as u32,
            ..VmaInfo::zeroed()
        };
        let mut gb = Vec::new();
        for g in guards {
            gb.extend_from_slice(&enc_all(g, &[]));
        }
        let mut ph = PagesHeader { start: 0x10000, npages: 16, ..PagesHeader::zeroed() };
        if n == 2 {
            ph.set(0);
            ph.set(3);
        } else {
            (0..n).for_each(|i| ph.set(i));
        }
        ph.count = n;
        let end = EndInfo { pages: n as u64, ..EndInfo::zeroed() };
        let mut w = Writer::with_minor(Vec::new(), 1, minor).unwrap();
        if let Some(m) = parent {
            w.set_parents(m);
        }
        w.plain(kind::PROCESS, &enc_all(&p, &[])).unwrap();
        w.plain(kind::THREAD, &enc_all(&t, &[])).unwrap();
        w.plain(kind::VMA, &enc_all(&v, &gb)).unwrap();
        w.plain(kind::PAGES, &enc_all(&ph, &vec![fill; n as usize * PAGE as usize])).unwrap();
        w.plain(kind::END, &enc_all(&end, &[])).unwrap();
        f(&mut w.pagemap);
        w.finish().unwrap().0
    }

    /// A record stored as changes to a private file mapping's pages rebuilds them from the
    /// file; with the file changed in its contents only, rebuilding fails (verifying the
    /// image, which reads no base file, still passes), and so does a malformed record.
    #[test]
    fn pages_stored_as_changes_rebuild_from_their_file() {
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("limitless-diff-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let base = dir.join("lib.so");
        let contents: Vec<u8> = (0..4 * PAGE as usize).map(|i| (i % 253) as u8).collect();
        std::fs::write(&base, &contents).unwrap();
        let m = std::fs::metadata(&base).unwrap();
        // Records of changes, compressed (format 1.7) or not, with `body_fix` applied to the
        // file's changes before compressing them.
        let image = |zstd: bool, body_fix: &dyn Fn(&mut Vec<u8>)| {
            let (p, t) = synthetic_process(2);
            let anon = VmaInfo { start: 0x10000, end: 0x20000, prot: 7, kind: vma_kind::ANON, pages: 1, ..VmaInfo::zeroed() };
            let name = base.as_os_str().as_bytes();
            let file = VmaInfo {
                start: 0x20000,
                end: 0x24000,
                prot: 3,
                kind: vma_kind::FILE_PRIVATE,
                name_len: name.len() as u32,
                ino: m.ino(),
                dev: m.dev(),
                file_size: m.size(),
                mtime_sec: m.mtime(),
                mtime_nsec: m.mtime_nsec() as u32,
                pages: 2,
                ..VmaInfo::zeroed()
            };
            // Page 0 of the anonymous area (zeros but a word), pages 0 and 3 of the file's:
            // a record each (a record lies in one area).
            let mut anon_h = PagesHeader { start: 0x10000, npages: 1, count: 1, ..PagesHeader::zeroed() };
            anon_h.set(0);
            let mut anon_page = vec![0u8; PAGE as usize];
            anon_page[8] = 1;
            let mut anon_body = Vec::new();
            assert!(crate::diff::encode(&anon_page, &[0; PAGE as usize], [0; 4], usize::MAX, &mut anon_body));
            let mut ph = PagesHeader { start: 0x20000, npages: 4, count: 2, ..PagesHeader::zeroed() };
            ph.set(0);
            ph.set(3);
            let mut pages = [&contents[..PAGE as usize], &contents[3 * PAGE as usize..]].concat();
            let bases = pages.clone();
            pages[100] ^= 0x55;
            pages[2 * PAGE as usize - 1] ^= 0x55;
            let mut body = Vec::new();
            assert!(crate::diff::encode(&pages, &bases, [0b11, 0, 0, 0], usize::MAX, &mut body));
            assert!(body.len() <= crate::diff::max_len(2), "{} bytes of changes", body.len());
            body_fix(&mut body);
            let end = EndInfo { pages: 3, ..EndInfo::zeroed() };
            let mut w = Writer::new(Vec::new(), 1).unwrap();
            w.plain(kind::PROCESS, &enc_all(&p, &[])).unwrap();
            w.plain(kind::THREAD, &enc_all(&t, &[])).unwrap();
            w.plain(kind::VMA, &enc_all(&anon, &[])).unwrap();
            w.plain(kind::VMA, &enc_all(&file, name)).unwrap();
            let z = |b: &[u8]| zstd.then(|| zstd::bulk::compress(b, 1).unwrap());
            w.diff_pages(&enc_all(&anon_h, &anon_body), z(&anon_body).as_deref()).unwrap();
            w.diff_pages(&enc_all(&ph, &body), z(&body).as_deref()).unwrap();
            w.plain(kind::END, &enc_all(&end, &[])).unwrap();
            (w.finish().unwrap().0, anon_page, pages)
        };
        let (b, anon_page, pages) = image(false, &|_| {});
        let (bz, ..) = image(true, &|_| {});
        for (b, flags) in [(&b, rflags::DIFF), (&bz, rflags::DIFF | rflags::ZSTD)] {
            let img = open_bytes(b).unwrap();
            assert!(img.pages.iter().all(|p| img.index[p.index].flags == flags));
            assert!(img.read_pages(&img.pages[0]).unwrap() == anon_page, "the anonymous page did not rebuild");
            assert!(img.read_pages(&img.pages[1]).unwrap() == pages, "the file's pages did not rebuild");
        }
        // A byte too many: malformed, caught by verifying alone.
        for zstd in [false, true] {
            let (bad, ..) = image(zstd, &|b| b.push(0));
            assert!(matches!(open_bytes(&bad), Err(ImageError::Corrupt(_))), "a malformed record verified");
        }
        // Changes longer than the pages: refused when the image is opened.
        let (bad, ..) = image(false, &|b| b.resize(3 * PAGE as usize, 0));
        let e = open_bytes(&bad).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("stored as changes) has the wrong flags or length"), "{e}");
        // Compressed changes that decompress to more than the pages: refused when verified.
        let (bad, ..) = image(true, &|b| b.resize(2 * PAGE as usize + 1, 0));
        let e = open_bytes(&bad).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("(compressed changes) does not decompress"), "{e}");
        // The file changed in its last page, same size and time.
        let mut changed = contents.clone();
        changed[3 * PAGE as usize + 7] ^= 1;
        std::fs::write(&base, &changed).unwrap();
        std::fs::File::options().write(true).open(&base).unwrap().set_modified(m.modified().unwrap()).unwrap();
        let imgs = [open_bytes(&b).unwrap(), open_bytes(&bz).unwrap()];
        for img in &imgs {
            let e = img.read_pages(&img.pages[1]).unwrap_err().to_string();
            assert!(e.contains("does not rebuild"), "{e}");
        }
        // Another time: the file is no base at all.
        std::fs::File::options().write(true).open(&base).unwrap().set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
        for img in &imgs {
            let e = img.read_pages(&img.pages[1]).unwrap_err().to_string();
            assert!(e.contains("not the file checkpointed"), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn open_bytes(b: &[u8]) -> Result<Image, ImageError> {
        let d = std::env::temp_dir().join(format!("limitless-image-test-{}-{:?}", std::process::id(), std::thread::current().id()));
        std::fs::write(&d, b).unwrap();
        let r = Image::open(&d).and_then(|i| i.verify_pages().map(|_| i));
        std::fs::remove_file(&d).unwrap();
        r
    }

    #[test]
    fn synthetic_image_round_trips() {
        let img = open_bytes(&synthetic()).unwrap();
        assert_eq!(img.threads.len(), 1);
        assert_eq!(img.vmas.len(), 1);
        assert_eq!(img.pages.len(), 1);
        assert_eq!(img.read_pages(&img.pages[0]).unwrap().len(), 2 * PAGE as usize);
    }

    #[test]
    fn the_page_map_locates_pages_and_images_without_one_still_read() {
        let g = [GuardRange { start: 0x1c000, end: 0x1e000 }];
        let with = open_bytes(&synthetic()).unwrap();
        assert_eq!(with.index.last().unwrap().kind, kind::PAGEMAP);
        // Before format 1.3 there was no page map: every page record's header is read.
        let without = open_bytes(&synthetic_map(&g, |m| m.clear())).unwrap();
        assert_eq!(without.index.last().unwrap().kind, kind::END);
        assert_eq!(with.pages[0].header, without.pages[0].header);
        assert_eq!(with.read_pages(&with.pages[0]).unwrap(), without.read_pages(&without.pages[0]).unwrap());
    }

    /// Writes the synthetic image and a delta image on top of it into a fresh directory
    /// named after `test`: (directory, parent, delta, the delta's bytes).
    fn parent_and_delta(test: &str) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
        let g = [GuardRange { start: 0x1c000, end: 0x1e000 }];
        let dir = std::env::temp_dir().join(format!("limitless-{test}-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let parent_path = dir.join("parent");
        std::fs::write(&parent_path, synthetic()).unwrap();
        let map = ParentMap::of(Image::open(&parent_path).unwrap(), &parent_path).unwrap();
        let delta = synthetic_full(&g, Some(map), |_| {});
        let delta_path = dir.join("delta");
        std::fs::write(&delta_path, &delta).unwrap();
        (dir, parent_path, delta_path, delta)
    }

    #[test]
    fn page_records_carry_xxh3_from_1_4_and_older_images_still_read() {
        let g = [GuardRange { start: 0x1c000, end: 0x1e000 }];
        for minor in [3, FORMAT_MINOR] {
            let b = synthetic_as(minor, 7, &g, None, |_| {});
            let img = open_bytes(&b).unwrap();
            assert_eq!(img.header.minor, minor);
            let e = img.index[img.pages[0].index];
            let payload = &b[(e.offset as usize + RecordHeader::SIZE)..][..e.stored_len as usize];
            let want = if minor >= PAGE_SUM_MINOR { page_sum(payload) } else { hash(&[payload]) };
            assert_eq!(e.hash, want, "format 1.{minor}");
            assert_ne!(page_sum(payload), hash(&[payload]));
            // Metadata records keep BLAKE3 in either version.
            let t = img.index.iter().find(|e| e.kind == kind::THREAD).unwrap();
            assert_eq!(t.hash, hash(&[&b[(t.offset as usize + RecordHeader::SIZE)..][..t.stored_len as usize]]));
            // Every flipped byte of the page record is caught, by either checksum.
            for i in e.offset as usize..(e.offset + RecordHeader::SIZE as u64 + e.stored_len) as usize {
                let mut c = b.clone();
                c[i] ^= 0x10;
                assert!(open_bytes(&c).is_err(), "format 1.{minor}: a flipped byte at {i} went unnoticed");
            }
        }
        assert!(Writer::with_minor(Vec::new(), 1, 2).is_err());
    }

    #[test]
    fn a_delta_takes_a_parent_record_only_when_its_bytes_are_the_same() {
        let g = [GuardRange { start: 0x1c000, end: 0x1e000 }];
        let dir = std::env::temp_dir().join(format!("limitless-same-bytes-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let parent_path = dir.join("parent");
        std::fs::write(&parent_path, synthetic()).unwrap();
        let map = || ParentMap::of(Image::open(&parent_path).unwrap(), &parent_path).unwrap();
        // Same bytes: a reference.
        std::fs::write(dir.join("same"), synthetic_as(FORMAT_MINOR, 7, &g, Some(map()), |_| {})).unwrap();
        let same = Image::open(&dir.join("same")).unwrap();
        assert_eq!(same.index[same.pages[0].index].flags, rflags::REF);
        // Other bytes under a checksum that matches (as a collision would): stored, not
        // referred to.
        let mut m = map();
        let mut ph = PagesHeader { start: 0x10000, npages: 16, ..PagesHeader::zeroed() };
        ph.set(0);
        ph.set(3);
        ph.count = 2;
        let theirs = enc_all(&ph, &[9u8; 2 * PAGE as usize]);
        for v in m.by_header.values_mut() {
            v.2 = page_sum(&theirs);
        }
        let other = open_bytes(&synthetic_as(FORMAT_MINOR, 9, &g, Some(m), |_| {})).unwrap();
        assert_eq!(other.index[other.pages[0].index].flags, 0);
        assert!(other.parents.is_empty());
        assert_eq!(other.read_pages(&other.pages[0]).unwrap(), vec![9u8; 2 * PAGE as usize]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The parent's records written again in copy mode, each page record as unchanged
    /// (`append` decides how), on top of the image at `parent_path`.
    fn copied_from(parent_path: &Path, append: impl Fn(&mut Vec<u8>, u64, u64) -> io::Result<bool>) -> io::Result<(Vec<u8>, Finished)> {
        let img = Image::open(parent_path).unwrap();
        let mut w = Writer::with_minor(Vec::new(), 1, img.header.minor).unwrap();
        w.copy_from_parent(ParentMap::of(Image::open(parent_path).unwrap(), parent_path).unwrap());
        for (i, e) in img.index.iter().enumerate() {
            match e.kind {
                kind::PAGEMAP | kind::INDEX => {}
                kind::PAGES => w.unchanged_copied(&img.read_record(i).unwrap()[..PagesHeader::SIZE], &append)?,
                k => w.plain(k, &img.read_record(i).unwrap())?,
            }
        }
        w.finish()
    }

    #[test]
    fn copy_mode_writes_unchanged_windows_from_the_parent_byte_for_byte() {
        let dir = std::env::temp_dir().join(format!("limitless-copy-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let parent_path = dir.join("parent");
        let parent = synthetic();
        std::fs::write(&parent_path, &parent).unwrap();
        // Read from the parent here, or put in place by the output (a store holding the
        // bytes): either way the very image the parent is, whole, with no references.
        let (read, f) = copied_from(&parent_path, |_, _, _| Ok(false)).unwrap();
        assert_eq!(read, parent);
        assert_eq!((f.copied, f.referenced), (0, 0));
        let (taken, f) = copied_from(&parent_path, |out, off, len| {
            out.extend_from_slice(&parent[off as usize..(off + len) as usize]);
            Ok(true)
        })
        .unwrap();
        assert_eq!(taken, parent);
        assert_eq!(f.copied, PagesHeader::SIZE as u64 + 2 * PAGE);
        let img = open_bytes(&taken).unwrap();
        assert!(img.parents.is_empty());
        assert_eq!(img.read_pages(&img.pages[0]).unwrap(), vec![7u8; 2 * PAGE as usize]);
        // A parent record damaged since the parent was opened is not copied unchecked.
        let img = Image::open(&parent_path).unwrap();
        let e = img.index[img.pages[0].index];
        let head = img.read_record(img.pages[0].index).unwrap()[..PagesHeader::SIZE].to_vec();
        let mut w = Writer::with_minor(Vec::new(), 1, FORMAT_MINOR).unwrap();
        w.copy_from_parent(ParentMap::of(img, &parent_path).unwrap());
        let mut bad = parent.clone();
        bad[(e.offset + e.stored_len) as usize] ^= 1;
        std::fs::write(&parent_path, &bad).unwrap();
        let r = w.unchanged_copied(&head, |_, _, _| Ok(false));
        assert!(matches!(&r, Err(e) if e.to_string().contains("cannot be copied") && e.to_string().contains("checksum")), "{r:?}");
        // Nor is a window the parent does not have, nor anything outside copy mode.
        std::fs::write(&parent_path, &parent).unwrap();
        let mut w = Writer::with_minor(Vec::new(), 1, FORMAT_MINOR).unwrap();
        w.copy_from_parent(ParentMap::of(Image::open(&parent_path).unwrap(), &parent_path).unwrap());
        let other = enc(&PagesHeader { start: 0x40000, npages: 16, ..PagesHeader::zeroed() });
        assert!(w.unchanged_copied(&other, |_, _, _| Ok(false)).is_err());
        let mut w = Writer::with_minor(Vec::new(), 1, FORMAT_MINOR).unwrap();
        assert!(w.unchanged_copied(&head, |_, _, _| Ok(false)).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_delta_image_refers_to_its_parent_and_every_change_to_either_is_caught() {
        let (dir, parent_path, delta_path, delta) = parent_and_delta("delta");
        assert!(delta.len() + PAGE as usize <= synthetic().len(), "the delta ({} bytes) copied the pages", delta.len());
        let mut img = Image::open(&delta_path).unwrap();
        assert_eq!(img.index[img.pages[0].index].flags, rflags::REF);
        assert_eq!(img.parents.len(), 1);
        assert!(img.read_pages(&img.pages[0]).is_err(), "pages read before the parent was opened");
        img.attach_parents().unwrap();
        assert_eq!(img.read_pages(&img.pages[0]).unwrap(), vec![7u8; 2 * PAGE as usize]);
        // Every flipped byte of the delta is caught: when it is opened, its parent attached
        // or its pages read.
        let bad = dir.join("bad");
        for i in 0..delta.len() {
            let mut b = delta.clone();
            b[i] ^= 0x41;
            std::fs::write(&bad, &b).unwrap();
            let r = Image::open(&bad).and_then(|mut d| d.attach_parents().and_then(|_| d.verify_pages()));
            assert!(r.is_err(), "a flipped byte at {i} of the delta went unnoticed");
        }
        // A parent that is another image now is refused.
        std::fs::write(&parent_path, synthetic_with(&[])).unwrap();
        let mut img = Image::open(&delta_path).unwrap();
        let r = img.attach_parents();
        assert!(matches!(&r, Err(e) if e.to_string().contains("has changed")), "{r:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn header_checks_agree_with_read_checks_and_catch_every_flipped_header_byte() {
        let (dir, parent_path, delta_path, _) = parent_and_delta("head");
        let good = synthetic();
        let img = Image::open(&parent_path).unwrap();
        let p = img.pages[0];
        let want = img.read_pages(&p).unwrap().len() as u64;
        let e = img.index[p.index];
        assert_eq!(img.check_pages_head(&p).unwrap(), want);
        let sum = |i: &Image, p: &PageRecord| match i.pages_at(p).unwrap() {
            PagesAt::Here(_, s) | PagesAt::Parent(_, _, s) => s,
            PagesAt::Packed | PagesAt::Changes(..) => panic!("a raw record"),
        };
        assert_eq!(sum(&img, &p).map(|s| s.to_vec()), Some(e.hash[..16].to_vec()));
        // Through a delta's reference, the parent's record is the one checked.
        let mut delta = Image::open(&delta_path).unwrap();
        delta.attach_parents().unwrap();
        assert_eq!(delta.check_pages_head(&delta.pages[0]).unwrap(), want);
        assert_eq!(sum(&delta, &delta.pages[0]), sum(&img, &p));
        // Every byte of the record header and pages header flipped in the file: caught
        // when the image is opened or by the header check (the pages are the restorer's
        // to check, against the sum `pages_at` gives).
        let bad = dir.join("bad");
        for i in e.offset as usize..e.offset as usize + RecordHeader::SIZE + PagesHeader::SIZE {
            let mut b = good.clone();
            b[i] ^= 0x41;
            std::fs::write(&bad, &b).unwrap();
            if let Ok(b) = Image::open(&bad) {
                let r = b.check_pages_head(&b.pages[0]);
                assert!(r.is_err(), "a flipped byte at {i} went unnoticed: {r:?}");
            }
        }
        // A 1.3 image's pages are checked here (BLAKE3), not by the restorer.
        let g = [GuardRange { start: 0x1c000, end: 0x1e000 }];
        std::fs::write(&bad, synthetic_as(3, 7, &g, None, |_| {})).unwrap();
        let old = Image::open(&bad).unwrap();
        assert_eq!(sum(&old, &old.pages[0]), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_page_map_that_disagrees_with_its_records_is_refused() {
        let g = [GuardRange { start: 0x1c000, end: 0x1e000 }];
        // The same page count, other pages (sealed consistently: only the comparison with
        // the record itself can catch it).
        let moved = synthetic_map(&g, |m| {
            let mut h = PagesHeader::decode(m).unwrap();
            h.bitmap = [0; 4];
            h.set(1);
            h.set(2);
            h.put(m);
        });
        let r = open_bytes(&moved);
        assert!(matches!(&r, Err(ImageError::Corrupt(w)) if w.contains("page map")), "{r:?}");
        // A map of the wrong length.
        let r = open_bytes(&synthetic_map(&g, |m| m.extend_from_slice(&[0; 48])));
        assert!(matches!(&r, Err(ImageError::Corrupt(w)) if w.contains("page map")), "{r:?}");
    }

    #[test]
    fn guard_ranges_are_read_and_checked() {
        let img = open_bytes(&synthetic()).unwrap();
        assert_eq!(img.vmas[0].guards, vec![GuardRange { start: 0x1c000, end: 0x1e000 }]);
        let g = |start, end| GuardRange { start, end };
        for bad in [
            vec![g(0x1c000, 0x21000)],                      // past the area
            vec![g(0x8000, 0x11000)],                       // before it
            vec![g(0x1c000, 0x1c000)],                      // empty
            vec![g(0x1c001, 0x1d000)],                      // not page aligned
            vec![g(0x1c000, 0x1e000), g(0x1d000, 0x1f000)], // overlapping
            vec![g(0x1d000, 0x1e000), g(0x1c000, 0x1d000)], // out of order
        ] {
            let r = open_bytes(&synthetic_with(&bad));
            assert!(matches!(r, Err(ImageError::Corrupt(_))), "{bad:?} was accepted: {r:?}");
        }
    }

    #[test]
    fn bad_magic_is_not_an_image() {
        let mut b = synthetic();
        b[0] ^= 0xff;
        assert!(matches!(open_bytes(&b), Err(ImageError::NotAnImage)));
        assert!(matches!(open_bytes(b"hello world, not an image"), Err(ImageError::NotAnImage)));
    }

    #[test]
    fn other_versions_are_refused() {
        let mut b = synthetic();
        b[8] = 2; // major
        assert!(matches!(open_bytes(&b), Err(ImageError::Version { major: 2, .. })));
        let mut b = synthetic();
        b[10] = 9; // minor newer than this reader
        assert!(matches!(open_bytes(&b), Err(ImageError::Version { minor: 9, .. })));
    }

    #[test]
    fn large_page_records_start_their_pages_on_a_page_boundary_from_1_5() {
        let n = ALIGN_FROM_PAGES as u32;
        let b = synthetic_n(FORMAT_MINOR, 7, n, &[], None, |_| {});
        let img = open_bytes(&b).unwrap();
        let k = img.pages[0].index;
        assert_eq!((img.index[k].offset + (RecordHeader::SIZE + PagesHeader::SIZE) as u64) % PAGE, 0);
        let pad = img.index[k - 1];
        assert_eq!(pad.kind, kind::PAD);
        // The pad is covered by its checksum.
        let mut bad = b.clone();
        bad[pad.offset as usize + RecordHeader::SIZE + 5] = 1;
        assert!(open_bytes(&bad).is_err(), "a changed pad byte went unnoticed");
        // Smaller records, and images of 1.4, have none.
        let small = open_bytes(&synthetic()).unwrap();
        assert!(small.index.iter().all(|e| e.kind != kind::PAD));
        let old = open_bytes(&synthetic_n(4, 7, n, &[], None, |_| {})).unwrap();
        assert!(old.index.iter().all(|e| e.kind != kind::PAD));
        assert_eq!(old.read_pages(&old.pages[0]).unwrap(), vec![7u8; n as usize * PAGE as usize]);
        assert_eq!(img.read_pages(&img.pages[0]).unwrap(), old.read_pages(&old.pages[0]).unwrap());
    }

    #[test]
    fn every_corrupted_byte_is_detected() {
        let good = synthetic();
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x41;
            assert!(open_bytes(&b).is_err(), "a flipped byte at {i} of {} went unnoticed", good.len());
        }
    }

    #[test]
    fn every_truncation_is_detected() {
        let good = synthetic();
        for n in (0..good.len()).step_by(7).chain([good.len() - 1]) {
            let r = open_bytes(&good[..n]);
            assert!(
                matches!(r, Err(ImageError::Truncated(_)) | Err(ImageError::NotAnImage) | Err(ImageError::Corrupt(_))),
                "truncated to {n}: {r:?}"
            );
        }
    }
}

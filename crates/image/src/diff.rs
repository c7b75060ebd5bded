//! Page records stored as their changes (format 1.6, [`rflags::DIFF`](crate::format::rflags::DIFF)).
//!
//! Most pages a program has written differ little from what they started as: a page of a
//! library's data or relocations differs from the file in its pointers, a page of the heap
//! or a stack is mostly zeros. Such a record is stored as the 8-byte words in which each
//! page differs from its *base*: the bytes of the file a private file mapping maps there
//! (an area of kind `FILE_PRIVATE`, whose file a restore maps again), zeros for any other
//! page.
//!
//! The payload after the [`PagesHeader`](crate::format::PagesHeader):
//! - `sum`: 16 bytes, [`Sums::finish`] of the record's pages as they are, which a reader
//!   compares after rebuilding them: it fails if a base file is not the one the record was
//!   made against;
//! - `file`: 4 × `u64`, bit `i` set if page `i` of the record (in the header's page order)
//!   has its file as base, clear for zeros; no bit at or past the header's `count`;
//! - per page, in order: an 8 × `u64` map of its 512 words (bit `w` set: word `w` differs
//!   from the base), then those words in order.
//!
//! A record is stored so only where that is smaller ([`max_len`]). Decoding checks every
//! length against the payload and never reads past it.

use crate::format::PAGE;

/// Bytes before the first page's map: `sum` and `file`.
pub const HEAD: usize = 16 + 32;
/// Bytes of a page's word map.
pub const MAP: usize = 64;
/// Words in a page.
pub const WORDS: usize = PAGE as usize / 8;

/// The most bytes the changes of `count` pages (after the pages header) may take for the
/// record to be stored so instead of whole: 7/8 of the pages, so that a small saving does
/// not cost rebuilding the pages at every restore.
pub fn max_len(count: usize) -> usize {
    count * PAGE as usize / 8 * 7
}

fn word(b: &[u8], w: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[w * 8..w * 8 + 8]);
    u64::from_le_bytes(x)
}

/// Words of `page` that differ from `base` (both a page long).
pub fn changed_words(page: &[u8], base: &[u8]) -> usize {
    page.chunks_exact(8).zip(base.chunks_exact(8)).filter(|(v, b)| v != b).count()
}

/// The file-base bits of a payload's changes (`body`: the payload after the pages header),
/// if it is well formed for `count` pages: every page's map and words, and nothing after.
pub fn parse(body: &[u8], count: usize) -> Option<[u64; 4]> {
    let head = body.get(..HEAD)?;
    let mut file = [0u64; 4];
    for (i, f) in file.iter_mut().enumerate() {
        *f = word(&head[16..], i);
    }
    for (i, f) in file.iter().enumerate() {
        // No base bits past `count`.
        let keep = count.saturating_sub(i * 64).min(64);
        if keep < 64 && f >> keep != 0 {
            return None;
        }
    }
    let mut at = HEAD;
    for _ in 0..count {
        let map = body.get(at..at + MAP)?;
        let n: u32 = (0..8).map(|i| word(map, i).count_ones()).sum();
        at = at.checked_add(MAP + n as usize * 8)?;
    }
    (at == body.len()).then_some(file)
}

/// Whether page `i` has its file as base, by the `file` bits.
pub fn file_based(file: &[u64; 4], i: usize) -> bool {
    i < 256 && file[i / 64] >> (i % 64) & 1 != 0
}

/// The stored `sum` of a payload's changes that [`parse`] accepted.
pub fn sum(body: &[u8]) -> u128 {
    let mut x = [0u8; 16];
    x.copy_from_slice(&body[..16]);
    u128::from_le_bytes(x)
}

/// The `sum` of a record's pages, page by page (so that a restorer can compute it as each
/// page goes into place): the XXH3-128 of the pages' XXH3-128s in order.
pub struct Sums {
    sums: [u8; 16 * 256],
    n: usize,
}

impl Default for Sums {
    fn default() -> Self {
        Sums { sums: [0; 16 * 256], n: 0 }
    }
}

impl Sums {
    /// Adds the next page; false after 256 pages.
    pub fn add(&mut self, page: &[u8]) -> bool {
        let Some(s) = self.sums.get_mut(self.n * 16..self.n * 16 + 16) else { return false };
        s.copy_from_slice(&crate::xxh::xxh3_128(page).to_le_bytes());
        self.n += 1;
        true
    }

    /// The sum of the pages added.
    pub fn finish(&self) -> u128 {
        crate::xxh::xxh3_128(&self.sums[..self.n * 16])
    }
}

/// Applies the changes of the next page, at `*at` in `body` (accepted by [`parse`]; [`HEAD`]
/// for the first page), to `page`, which holds its base; moves `*at` to the next page's.
/// Returns false if `body` ends too early or `page` is not a page long.
pub fn apply_page(body: &[u8], at: &mut usize, page: &mut [u8]) -> bool {
    if page.len() != PAGE as usize {
        return false;
    }
    let Some(map) = body.get(*at..*at + MAP) else { return false };
    let mut p = *at + MAP;
    for i in 0..8 {
        let mut bits = word(map, i);
        while bits != 0 {
            let w = i * 64 + bits.trailing_zeros() as usize;
            bits &= bits - 1;
            let Some(v) = body.get(p..p + 8) else { return false };
            page[w * 8..w * 8 + 8].copy_from_slice(v);
            p += 8;
        }
    }
    *at = p;
    true
}

/// Applies the changes `body` (accepted by [`parse`]) to `out`, which holds the bases of
/// its `count` pages: `out` then holds the pages. Returns the pages' [`Sums`] total, or
/// `None` if `out` is not `count` pages long or `body` does not match it.
pub fn apply(body: &[u8], count: usize, out: &mut [u8]) -> Option<u128> {
    if out.len() != count * PAGE as usize || count > 256 {
        return None;
    }
    let mut at = HEAD;
    let mut sums = Sums::default();
    for page in out.chunks_exact_mut(PAGE as usize) {
        if !apply_page(body, &mut at, page) || !sums.add(page) {
            return None;
        }
    }
    (at == body.len()).then(|| sums.finish())
}

/// Encodes `pages` (at most 256) as their changes from `bases` (as long), with `file` the
/// file-base bits, appending the body to `out`. Stops early, returning false, once the
/// body would pass `limit` bytes ([`max_len`] for a record to be stored so): the pages'
/// sum is computed only for a body that is kept.
#[cfg(feature = "std")]
pub fn encode(pages: &[u8], bases: &[u8], file: [u64; 4], limit: usize, out: &mut Vec<u8>) -> bool {
    let start = out.len();
    if pages.len() > 256 * PAGE as usize {
        return false;
    }
    // The sum goes first; it is filled in at the end.
    out.extend_from_slice(&[0; 16]);
    for f in file {
        out.extend_from_slice(&f.to_le_bytes());
    }
    for (page, base) in pages.chunks_exact(PAGE as usize).zip(bases.chunks_exact(PAGE as usize)) {
        let at = out.len();
        out.extend_from_slice(&[0; MAP]);
        let mut map = [0u64; 8];
        for (w, (v, b)) in page.chunks_exact(8).zip(base.chunks_exact(8)).enumerate() {
            if v != b {
                map[w / 64] |= 1 << (w % 64);
                out.extend_from_slice(v);
            }
        }
        for (i, m) in map.iter().enumerate() {
            out[at + i * 8..at + i * 8 + 8].copy_from_slice(&m.to_le_bytes());
        }
        if out.len() - start > limit {
            return false;
        }
    }
    let mut sums = Sums::default();
    for page in pages.chunks_exact(PAGE as usize) {
        sums.add(page);
    }
    out[start..start + 16].copy_from_slice(&sums.finish().to_le_bytes());
    true
}

/// The address of each page of the record with header `h`, in the record's order.
#[cfg(feature = "std")]
pub fn page_addrs(h: &crate::format::PagesHeader) -> Vec<u64> {
    let mut addrs = Vec::with_capacity(h.count as usize);
    h.runs(|start, len| addrs.extend((start..start + len).step_by(PAGE as usize)));
    addrs
}

/// The bases of pages, read from the files of an image's private file mappings (each file
/// opened and its size and time read once).
#[cfg(feature = "std")]
#[derive(Default)]
pub struct Bases {
    /// Files by name; `None` if it cannot be opened.
    files: Vec<(Vec<u8>, Option<BaseFile>)>,
    /// Whether a file must also have the inode its area records (where the image is made:
    /// elsewhere the inode numbers differ).
    inodes: bool,
}

/// An open base file, with its size, modification time (seconds, nanoseconds) and inode.
#[cfg(feature = "std")]
type BaseFile = (std::fs::File, u64, i64, i64, u64);

#[cfg(feature = "std")]
impl Bases {
    /// Bases whose files must also have the inode their areas record: for the writer, so
    /// that a file replaced at its path since the program mapped it serves as no base.
    pub fn same_inodes() -> Bases {
        Bases { inodes: true, ..Bases::default() }
    }

    /// Fills `page` with the base of the page at `addr`: zeros unless `file`; with `file`,
    /// the bytes the private file mapping among `vmas` (in address order) that holds
    /// `addr` maps there (zeros past the file's end). Returns false, with `file`, where
    /// that is not so: no such area, a page wholly past the file's end, or a file that
    /// cannot be opened or has another size or modification time than the area records.
    /// An error if the file cannot be read.
    pub fn fill(&mut self, vmas: &[crate::file::Vma], addr: u64, file: bool, page: &mut [u8]) -> std::io::Result<bool> {
        use std::os::unix::fs::FileExt;
        page.fill(0);
        if !file {
            return Ok(true);
        }
        let at = vmas.partition_point(|v| v.info.end <= addr);
        let Some(v) = vmas.get(at).filter(|v| v.info.start <= addr && v.info.kind == crate::format::vma_kind::FILE_PRIVATE) else {
            return Ok(false);
        };
        let Some(off) = v.info.pgoff.checked_add(addr - v.info.start).filter(|&o| o < v.info.file_size) else {
            return Ok(false);
        };
        let Some(f) = self.open(v) else { return Ok(false) };
        let n = (v.info.file_size - off).min(PAGE) as usize;
        f.read_exact_at(&mut page[..n], off).map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot read {}, which the program had mapped: {e}", String::from_utf8_lossy(&v.name)))
        })?;
        Ok(true)
    }

    /// The file of area `v`, opened, if it is a regular file of the size and modification
    /// time `v` records.
    fn open(&mut self, v: &crate::file::Vma) -> Option<&std::fs::File> {
        use std::os::unix::fs::MetadataExt;
        let i = match self.files.iter().position(|(n, _)| *n == v.name) {
            Some(i) => i,
            None => {
                let path = std::path::Path::new(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&v.name));
                let f = std::fs::File::open(path).ok().and_then(|f| {
                    let m = f.metadata().ok().filter(|m| m.is_file())?;
                    Some((f, m.size(), m.mtime(), m.mtime_nsec(), m.ino()))
                });
                self.files.push((v.name.clone(), f));
                self.files.len() - 1
            }
        };
        let (f, size, sec, nsec, ino) = self.files[i].1.as_ref()?;
        let same = *size == v.info.file_size && *sec == v.info.mtime_sec && *nsec == i64::from(v.info.mtime_nsec);
        (same && (!self.inodes || *ino == v.info.ino)).then_some(f)
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;

    fn pages(n: usize, f: impl Fn(usize) -> u8) -> Vec<u8> {
        (0..n * PAGE as usize).map(f).collect()
    }

    /// Changes from mixed bases decode to the pages, and a damaged body is refused.
    #[test]
    fn round_trip_and_damage() {
        let base = pages(3, |i| (i * 7 % 251) as u8);
        let mut want = base.clone();
        want[8] ^= 1;
        want[PAGE as usize + 4000] = 9;
        // Page 1 is zero-based: its base is zeros, so every non-zero word is a change.
        let mut bases = base.clone();
        bases[PAGE as usize..2 * PAGE as usize].fill(0);
        let file = [0b101, 0, 0, 0];
        let mut body = Vec::new();
        assert!(encode(&want, &bases, file, usize::MAX, &mut body));
        assert_eq!(parse(&body, 3), Some(file));
        let mut out = bases.clone();
        assert_eq!(apply(&body, 3, &mut out), Some(sum(&body)));
        assert!(out == want, "the pages did not come back");
        // Page 0 changed one word, page 2 none.
        assert_eq!(body.len(), HEAD + 3 * MAP + 8 + changed_words(&want[4096..8192], &[0; 4096]) * 8);
        assert!(body.len() <= max_len(3), "{} bytes of changes", body.len());
        // Cut short, one byte more, a base bit past the pages: refused.
        assert_eq!(parse(&body[..body.len() - 1], 3), None);
        let mut longer = body.clone();
        longer.push(0);
        assert_eq!(parse(&longer, 3), None);
        let mut bad = body.clone();
        bad[16] |= 1 << 3;
        assert_eq!(parse(&bad, 3), None);
        // A map that claims more words than there are.
        let mut bad = body.clone();
        bad[HEAD] = 0xff;
        assert_eq!(parse(&bad, 3), None);
        assert_eq!(apply(&bad, 3, &mut bases.clone()), None);
    }

    /// A file serves as a base only with the size, time (and for the writer, inode) its
    /// area records, and only within the file.
    #[test]
    fn a_base_file_must_be_the_one_mapped() {
        use crate::file::Vma;
        use crate::format::{vma_kind, VmaInfo};
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::MetadataExt;
        let path = std::env::temp_dir().join(format!("limitless-bases-test-{}", std::process::id()));
        let contents = pages(2, |i| (i % 251) as u8);
        std::fs::write(&path, &contents).unwrap();
        let m = std::fs::metadata(&path).unwrap();
        let info = VmaInfo {
            start: 0x10000,
            end: 0x13000,
            kind: vma_kind::FILE_PRIVATE,
            file_size: m.size(),
            mtime_sec: m.mtime(),
            mtime_nsec: m.mtime_nsec() as u32,
            ino: m.ino(),
            ..VmaInfo::zeroed()
        };
        let area = |info: VmaInfo| vec![Vma { info, name: path.as_os_str().as_bytes().to_vec(), guards: Vec::new() }];
        let mut page = vec![1u8; PAGE as usize];
        assert!(Bases::same_inodes().fill(&area(info), 0x11000, true, &mut page).unwrap());
        assert!(page == contents[PAGE as usize..], "not the file's second page");
        // Without `file`: zeros.
        assert!(Bases::same_inodes().fill(&area(info), 0x11000, false, &mut page).unwrap());
        assert!(page.iter().all(|&b| b == 0));
        // Past the file's end, outside the area, or another inode, size or time: no base.
        assert!(!Bases::default().fill(&area(info), 0x12000, true, &mut page).unwrap());
        assert!(!Bases::default().fill(&area(info), 0x13000, true, &mut page).unwrap());
        let other = VmaInfo { ino: m.ino() + 1, ..info };
        assert!(!Bases::same_inodes().fill(&area(other), 0x10000, true, &mut page).unwrap());
        assert!(Bases::default().fill(&area(other), 0x10000, true, &mut page).unwrap(), "the inode counts only where the image is made");
        assert!(!Bases::default().fill(&area(VmaInfo { file_size: m.size() + 1, ..info }), 0x10000, true, &mut page).unwrap());
        assert!(!Bases::default().fill(&area(VmaInfo { mtime_nsec: info.mtime_nsec ^ 1, ..info }), 0x10000, true, &mut page).unwrap());
        std::fs::remove_file(&path).unwrap();
    }

    /// Encoding stops once past its limit.
    #[test]
    fn limit_stops_early() {
        let want = pages(4, |i| (i % 200 + 1) as u8);
        let mut body = Vec::new();
        assert!(!encode(&want, &vec![0; want.len()], [0; 4], 4096, &mut body));
        assert!(body.len() < 2 * 4096 + MAP + HEAD, "it went on past the limit");
    }
}

//! Restoring an image as a child of this process.
//!
//! Everything that can be checked is checked before the restorer starts: the image (every
//! field), the kernel's vDSO layout, the CPU's features, the files the program had mapped
//! (same size and time, and the same ELF build-id for executables) and open (they must
//! open again). The supervisor then opens every
//! file the program needs at its recorded number, writes the restore plan into a memfd,
//! and starts the restorer, which reads the page data from the image file record by
//! record, checks each record's XXH3-128 and copies it into place (see the restorer's
//! `pages.rs`), while the supervisor checks each record's headers
//! ([`Image::check_pages_head`]; for an image older than format 1.4, its BLAKE3 hash,
//! [`Image::check_pages`]); the restorer lets the program run only after the supervisor's
//! go-ahead, and the
//! agent then reports `RESTORED`. Any failure before that kills the restorer, so there is
//! never a partly restored program, and the image file is only ever read.
//!
//! An image can also be read through a [`Source`] ([`restore_stream`]): an object store's
//! reader that fetches the image's chunks as they are read. Opening it reads only the
//! metadata, the page map and the index; the supervisor then reads each page record in
//! order, checks it and passes its pages to the restorer through a ring of slots in a
//! memfd ([`Ring`]; the plan has no image fd), so no copy of the image is kept. An image
//! file with compressed page records is restored the same way, the supervisor
//! decompressing each record. The
//! supervisor checks (and decompresses) the records of an image file on several threads,
//! passing them on in order ([`check_and_pass`]); a stream's on one.

use super::embedded::{self, EngineFiles};
use super::host;
use super::plan::{self, InPlace, PlanFds};
use super::spawn::FdMap;
use super::supervisor::{Options, Plumbing, Supervisor};
use anyhow::{anyhow, bail, Context, Result};
use limitless_image::file::{Image, PagesAt, Source};
use limitless_image::format::{file_kind, vma_kind, PAGE};
use limitless_image::plan::{RESTORER_FAILED, RING_SLOT_LEN, TOKEN_END, VERIFIED};
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Statistics of a restore.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RestoreStats {
    /// From the start of `restore` until the program runs.
    pub total_ms: f64,
    /// Bytes of page data restored (checked by the supervisor, read by the restorer).
    pub data_bytes: u64,
    /// Threads restored (the agent's included).
    pub threads: u32,
    /// Dirty tracking started from the image ([`Options::track`]).
    pub tracked: bool,
}

/// Validates `img` for this machine and writes back the files it carries (`--carry`).
fn check_here(img: &Image) -> Result<()> {
    // Carried files first: the program may have them mapped, which the checks below verify.
    super::objects::write_carried(img)?;
    host::check_vdso(&img.process.vdso)?;
    host::check_cpu(&img.process.cpu)?;
    host::check_files(img, |p| {
        embedded::is_our_agent(p) && embedded::ensure_file(p, embedded::AGENT, embedded::AGENT_HASH, 0o755).is_ok()
    })?;
    Ok(())
}

/// Restores the image file `image` and supervises it.
pub fn restore(image: &Path, opts: &Options) -> Result<(Supervisor, RestoreStats)> {
    let t0 = Instant::now();
    // The restorer reads the very files that were checked (the same open files), not
    // whatever is at those paths a moment later.
    let file = File::open(image).with_context(|| format!("cannot open {}", image.display()))?;
    let mut img = Image::from_file(file.try_clone()?).map_err(|e| anyhow!("{}: {e}", image.display()))?;
    let mut parents = Vec::new();
    img.attach_parents_with(|p| {
        let f = File::open(p)?;
        parents.push(f.try_clone()?);
        Ok(f)
    })
    .map_err(|e| anyhow!("{}: {e}", image.display()))?;
    // Dirty tracking needs the image's own path: a later delta names its parent by path.
    let base = fs::canonicalize(image).ok().filter(|_| opts.track);
    restore_image(img, Some(file), parents, base, opts, t0)
}

/// Restores the image read through `src` (`name` says which, in messages, and names it
/// for dirty tracking, see [`crate::store::image_name`]) and supervises it; the page data
/// streams from `src` to the restorer.
pub fn restore_stream(src: Box<dyn Source>, name: &str, opts: &Options) -> Result<(Supervisor, RestoreStats)> {
    let t0 = Instant::now();
    let img = Image::from_source(src).map_err(|e| anyhow!("{name}: {e}"))?;
    let base = Some(PathBuf::from(name)).filter(|_| opts.track);
    restore_image(img, None, Vec::new(), base, opts, t0)
}

/// Restores `img`; the restorer reads its pages in place from `file` and the `parents`
/// files (a delta image), or from the data pipe: compressed records, and all of them
/// when there is no file. With `base` (the image file's canonical path, or a stored
/// image's name), dirty tracking starts from the image.
fn restore_image(
    img: Image,
    file: Option<File>,
    parents: Vec<File>,
    base: Option<PathBuf>,
    opts: &Options,
    t0: Instant,
) -> Result<(Supervisor, RestoreStats)> {
    let files: EngineFiles = embedded::unpack()?;
    check_here(&img)?;
    let img = Arc::new(img);
    tracing::debug!("restore: image read and checked at {:.1} ms", t0.elapsed().as_secs_f64() * 1000.0);
    let pl = Plumbing::new(opts)?;
    let mut fds = FdMap::default();
    let objs = super::objects::create(&img)?;
    super::fds::recreate(&img, &pl, &objs, &mut fds)?;
    let ctl = img.process.ctl_fd;
    fds.add(pl.child_ctl.try_clone()?, ctl);
    // Our own descriptors go above all of the program's.
    let mut next = img.fds.iter().map(|f| f.info.fd).chain([ctl, 2]).max().unwrap_or(2) + 1;
    let close_from = next;
    let mut alloc = || {
        let n = next;
        next += 1;
        n
    };
    // One fd per mapped file (and access mode).
    let mut by_path: HashMap<(String, bool), i32> = HashMap::new();
    let mut vma_fd = vec![-1; img.vmas.len()];
    let mut by_obj: HashMap<u32, i32> = HashMap::new();
    for (i, v) in img.vmas.iter().enumerate() {
        if v.info.kind == vma_kind::SHM {
            // Every mapping of a shared object maps the one restored memfd (aliasing kept).
            let obj = img
                .files
                .iter()
                .find(|f| f.info.dev == v.info.dev && f.info.ino == v.info.ino && f.info.kind < file_kind::CARRIED)
                .ok_or_else(|| anyhow!("shared memory at {:#x} has no object", v.info.start))?;
            let n = match by_obj.get(&obj.info.id) {
                Some(&n) => n,
                None => {
                    let n = alloc();
                    fds.add(objs[&obj.info.id].try_clone()?, n);
                    by_obj.insert(obj.info.id, n);
                    n
                }
            };
            vma_fd[i] = n;
            continue;
        }
        if v.info.kind != vma_kind::FILE_PRIVATE && v.info.kind != vma_kind::FILE_SHARED {
            continue;
        }
        let path = Image::vma_name(v);
        let rw = v.info.kind == vma_kind::FILE_SHARED && v.info.prot & 2 != 0;
        if let Some(&n) = by_path.get(&(path.clone(), rw)) {
            vma_fd[i] = n;
            continue;
        }
        let f = OpenOptions::new()
            .read(true)
            .write(rw)
            .open(&path)
            .with_context(|| format!("cannot open {path}, which the program had mapped"))?;
        let n = alloc();
        fds.add(OwnedFd::from(f), n);
        by_path.insert((path, rw), n);
        vma_fd[i] = n;
    }
    let (data_r, data_w) = super::stdio::pipe()?;
    let (err_r, err_w) = super::stdio::pipe()?;
    let data_fd = alloc();
    let err_fd = alloc();
    let mut add_file = |f: File| {
        let n = alloc();
        fds.add(OwnedFd::from(f), n);
        n
    };
    let streamed = file.is_none();
    let image_fd = file.map(&mut add_file);
    let parent_fds: Vec<i32> = parents.into_iter().map(&mut add_file).collect();
    // Where each page record is read from: in place (and checked by the restorer, from
    // format 1.4 on), or (None) through the ring.
    let mut srcs: Vec<Option<InPlace>> = Vec::with_capacity(img.pages.len());
    for p in &img.pages {
        srcs.push(match img.pages_at(p).map_err(|e| anyhow!("{e}"))? {
            PagesAt::Here(data_off, sum) => image_fd.map(|fd| InPlace { fd, data_off, sum, changes: None }),
            PagesAt::Parent(k, data_off, sum) => parent_fds.get(k).map(|&fd| InPlace { fd, data_off, sum, changes: None }),
            PagesAt::Changes(k, data_off, len, sum) => match k {
                None => image_fd,
                Some(k) => parent_fds.get(k).copied(),
            }
            .map(|fd| InPlace { fd, data_off, sum: Some(sum), changes: Some(len) }),
            PagesAt::Packed => None,
        });
    }
    // The records this process reads itself (compressed, or from a stream) reach the
    // restorer through a ring of slots in a memfd.
    let ring = if srcs.iter().any(Option::is_none) { Some(Ring::new()?) } else { None };
    let (ring, ring_fd, release_fd) = match ring {
        // The release pipe's write end goes to the restorer alone (the fd map closes ours
        // once it has started), so that its end is seen.
        Some((ring, release_w)) => {
            let (a, b) = (alloc(), alloc());
            fds.add(OwnedFd::from(ring.memfd.try_clone()?), a);
            fds.add(release_w, b);
            (Some(ring), a, b)
        }
        None => (None, -1, -1),
    };
    let plan_fd = alloc();
    fds.add(data_r, data_fd);
    fds.add(err_w, err_fd);
    let pfds = PlanFds {
        data_fd,
        err_fd,
        close_from,
        close_to: plan_fd,
        ring_fd,
        release_fd,
        ring_slots: if ring.is_some() { RING_SLOTS } else { 0 },
        // An agent before version 2 would not take the tracking over (nor its descriptor).
        track: base.is_some() && img.process.agent_version >= 2,
        map: opts.map,
    };
    let plan = plan::build(&img, |i| vma_fd[i], |i| srcs[i], &pfds);
    let memfd = rustix::fs::memfd_create("limitless-plan", rustix::fs::MemfdFlags::CLOEXEC)?;
    let mut mf = File::from(memfd);
    mf.write_all(&plan)?;
    fds.add(OwnedFd::from(mf), plan_fd);
    pl.stdio_fds(&mut fds)?;

    let mut cmd = Command::new(&files.restorer);
    cmd.arg(plan_fd.to_string()).env_clear();
    let child = fds.spawn(cmd).with_context(|| format!("cannot start the restorer {}", files.restorer.display()))?;
    tracing::debug!("restore: restorer started at {:.1} ms", t0.elapsed().as_secs_f64() * 1000.0);

    // Check every page record against its hash while the restorer reads the pages (or
    // pass them to it, checked, when it has no image file); the go-ahead byte lets it
    // continue past the page data.
    let data_err: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let checker = {
        let img = img.clone();
        let data_err = data_err.clone();
        std::thread::spawn(move || {
            // A stream (an object store's chunks) is read in order, one record at a time:
            // its read-ahead follows a single reader.
            let workers = if streamed { 1 } else { std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 4) };
            let total = check_and_pass(&img, &srcs, File::from(data_w), ring, &data_err, workers);
            tracing::debug!("restore: page records checked at {:.1} ms", t0.elapsed().as_secs_f64() * 1000.0);
            total
        })
    };
    let errtext = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = File::from(err_r).read_to_string(&mut s);
        s
    });

    let sup = pl.supervise(child, img.stdin.clone())?;
    let deadline = Duration::from_secs(300);
    let mut failure: Option<String> = None;
    loop {
        if let Some(e) = data_err.lock().unwrap_or_else(|e| e.into_inner()).take() {
            failure = Some(e);
            break;
        }
        let st = sup.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.restored.is_some() {
            break;
        }
        if let Some(t) = &st.failed {
            failure = Some(t.clone());
            break;
        }
        if st.closed {
            failure = Some(String::new());
            break;
        }
        if t0.elapsed() > deadline {
            failure = Some(format!("the restore did not finish within {} s", deadline.as_secs()));
            break;
        }
        drop(sup.inner.changed.wait_timeout(st, Duration::from_millis(20)));
    }
    if let Some(f) = failure {
        sup.inner.kill();
        let code = sup.wait().unwrap_or(1);
        let text = errtext.join().unwrap_or_default();
        let text = text.trim();
        let why = if !f.is_empty() {
            f
        } else if !text.is_empty() {
            text.to_string()
        } else if code == RESTORER_FAILED {
            "the restorer failed".to_string()
        } else {
            format!("the restored process died (status {code}) before it ran")
        };
        bail!("restore failed: {why}");
    }
    tracing::debug!("restore: program restored at {:.1} ms", t0.elapsed().as_secs_f64() * 1000.0);
    let data_bytes = checker.join().unwrap_or(0);
    drop(errtext);
    let restored = sup.inner.state.lock().map(|s| s.restored).unwrap_or(None);
    let threads = restored.map_or(0, |r| r.threads);
    // A delta on top of exactly this image may use the tracking the restorer armed.
    let mut tracked = false;
    if let (Some(path), Some(r)) = (base, restored.filter(|r| r.epoch != 0)) {
        tracing::debug!("restore: dirty tracking from the image, epoch {}", r.epoch);
        *sup.inner.tracked.lock().unwrap_or_else(|e| e.into_inner()) = Some((path, img.trailer.trailer_hash, r.epoch));
        tracked = true;
    }
    Ok((sup, RestoreStats { total_ms: t0.elapsed().as_secs_f64() * 1000.0, data_bytes, threads, tracked }))
}

/// The slots each checking worker holds at most: one it fills while the writer passes on
/// the other.
const SLOTS_PER_WORKER: u32 = 2;
/// Ring slots: enough for up to four workers, plus four for both restorer threads to work on
/// while the workers fill more.
const RING_SLOTS: u32 = 4 * SLOTS_PER_WORKER + 4;
const _: () = assert!(RING_SLOTS <= 32, "FreeSlots::lent has a bit per slot");

/// The ring through which the supervisor passes the pages of the records it reads itself:
/// `RING_SLOTS` slots of [`RING_SLOT_LEN`] bytes in a memfd, each holding one record's
/// pages from one page in, and a pipe on which the restorer returns each slot it has
/// copied out. The memfd is mapped here too ([`Slots`]), so that a worker checks (and
/// decompresses) a record's pages straight into a slot.
struct Ring {
    memfd: File,
    slots: Slots,
    free: FreeSlots,
}

/// The ring's memfd, mapped shared and writable.
struct Slots(*mut u8);

// SAFETY: shared memory that lives as long as this; which thread may write which slot is
// settled by who holds its number (see `slot`).
unsafe impl Sync for Slots {}
// SAFETY: as for Sync; nothing in it is tied to the thread that made it.
unsafe impl Send for Slots {}

/// The slots not in use, and the pipe the restorer hands slots back on.
struct FreeSlots {
    release_r: File,
    /// Slots not handed out yet.
    unused: Vec<u32>,
    /// The slots passed to the restorer and not handed back yet (one bit each): a number it
    /// hands back is taken only once, so no two workers ever get the same slot.
    lent: u32,
}

impl Ring {
    /// A new ring, and the write end of its release pipe (for the restorer).
    fn new() -> Result<(Ring, OwnedFd)> {
        use rustix::mm::{MapFlags, ProtFlags};
        let memfd = File::from(rustix::fs::memfd_create("limitless-ring", rustix::fs::MemfdFlags::CLOEXEC)?);
        let len = RING_SLOTS as u64 * RING_SLOT_LEN;
        memfd.set_len(len)?;
        // SAFETY: a new shared mapping of our own memfd at an address the kernel picks (it
        // cannot replace any other mapping); it is unmapped only when `Slots` drops.
        let map = unsafe {
            rustix::mm::mmap(std::ptr::null_mut(), len as usize, ProtFlags::READ | ProtFlags::WRITE, MapFlags::SHARED, &memfd, 0)
        }?;
        let (r, w) = super::stdio::pipe()?;
        let free = FreeSlots { release_r: File::from(r), unused: (0..RING_SLOTS).rev().collect(), lent: 0 };
        Ok((Ring { memfd, slots: Slots(map.cast()), free }, w))
    }
}

impl Slots {
    /// Slot `slot`'s room for pages.
    ///
    /// # Safety
    /// The caller holds `slot`: it took the number from [`FreeSlots::take`] (through the
    /// writer) and has not passed it on, so no other thread touches that slot meanwhile
    /// (the restorer only reads a slot it has been passed, until it hands it back).
    #[allow(clippy::mut_from_ref)]
    unsafe fn slot(&self, slot: u32) -> &mut [u8] {
        assert!(slot < RING_SLOTS);
        let at = (slot as u64 * RING_SLOT_LEN + PAGE) as usize;
        // SAFETY: inside the mapping (slot < RING_SLOTS); exclusive as the caller promises.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(at), (RING_SLOT_LEN - PAGE) as usize) }
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `Ring::new`, of this length; no slot is borrowed any
        // more (a borrow of a slot borrows this).
        let _ = unsafe { rustix::mm::munmap(self.0.cast(), (RING_SLOTS as u64 * RING_SLOT_LEN) as usize) };
    }
}

impl FreeSlots {
    /// A free slot, waiting for the restorer to hand one back; `None` if it stopped (or
    /// handed back a slot it did not have).
    fn take(&mut self) -> Option<u32> {
        if let Some(s) = self.unused.pop() {
            return Some(s);
        }
        let mut b = [0u8; 4];
        self.release_r.read_exact(&mut b).ok()?;
        let s = u32::from_le_bytes(b);
        if s >= RING_SLOTS || self.lent & 1 << s == 0 {
            return None;
        }
        self.lent &= !(1 << s);
        Some(s)
    }

    /// Notes that `slot` went to the restorer.
    fn lend(&mut self, slot: u32) {
        self.lent |= 1 << slot;
    }
}

/// What a checking worker sends the writer for a record: the check's result (the page
/// bytes) and the slot it put the pages in, if it used one.
type Checked = (Result<u64, String>, Option<u32>);

/// Checks every page record of `img` on `n` threads and passes, in order, the pages of
/// those the restorer does not read in place (`srcs[i]` is `None`) through `ring`, with a
/// token for each in `w`; then the two end tokens and the go-ahead byte. Records are
/// handed out round-robin; each worker checks its share in order, putting the pages of a
/// record the restorer does not read in place straight into a ring slot it holds, so the
/// writer takes them in image order and only sends tokens. Checking (hashing,
/// decompressing) thus uses every core while the restorer reads.
/// Returns the page bytes checked; on a bad record, says why in `err`.
fn check_and_pass(img: &Image, srcs: &[Option<InPlace>], mut w: File, ring: Option<Ring>, err: &Mutex<Option<String>>, n: usize) -> u64 {
    let fail = |e: String| *err.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
    let (map, mut free) = match ring {
        Some(Ring { slots, free, .. }) => (Some(slots), Some(free)),
        None => (None, None),
    };
    let map = map.as_ref();
    // Each worker's staged records not passed on yet: it holds a slot for each of the next
    // ones, up to SLOTS_PER_WORKER, and gets no slot it will not use (taking one may wait
    // for the restorer to hand one back).
    let mut left: Vec<u32> = vec![0; n];
    for (i, src) in srcs.iter().enumerate().take(img.pages.len()) {
        if src.is_none() {
            left[i % n] += 1;
        }
    }
    let total = std::thread::scope(|s| {
        let (mut results, mut slots) = (Vec::new(), Vec::new());
        for (k, &l) in left.iter().enumerate() {
            let (done_tx, done_rx) = std::sync::mpsc::sync_channel::<Checked>(SLOTS_PER_WORKER as usize);
            let (slot_tx, slot_rx) = std::sync::mpsc::channel::<u32>();
            for _ in 0..SLOTS_PER_WORKER.min(l) {
                if let Some(slot) = free.as_mut().and_then(FreeSlots::take) {
                    let _ = slot_tx.send(slot);
                }
            }
            s.spawn(move || {
                let mut buf = Vec::new();
                for (p, src) in img.pages.iter().zip(srcs).skip(k).step_by(n) {
                    let (r, slot) = match (src, map) {
                        // Pages the restorer reads in place need only their headers checked
                        // where it checks their sums itself (format 1.4 on).
                        (Some(InPlace { sum: Some(_), .. }), _) => (img.check_pages_head(p), None),
                        (Some(_), _) => (img.check_pages(p, &mut buf, None), None),
                        (None, Some(map)) => {
                            // The writer stopped.
                            let Ok(slot) = slot_rx.recv() else { return };
                            // SAFETY: this worker holds `slot` until it sends it on below.
                            (img.check_pages(p, &mut buf, Some(unsafe { map.slot(slot) })), Some(slot))
                        }
                        (None, None) => return,
                    };
                    // The writer stopped (a bad record, a restorer that stopped reading).
                    if done_tx.send((r.map_err(|e| e.to_string()), slot)).is_err() {
                        return;
                    }
                }
            });
            results.push(done_rx);
            slots.push(slot_tx);
        }
        let mut total = 0u64;
        for (i, src) in srcs.iter().enumerate().take(img.pages.len()) {
            let Ok((r, slot)) = results[i % n].recv() else {
                fail("a page check stopped".into());
                return total;
            };
            match (r, slot, free.as_mut()) {
                (Ok(len), Some(slot), Some(free)) => {
                    free.lend(slot);
                    let token = (slot as u64) << 32 | i as u64;
                    // A restorer that stopped reading has failed and says why itself.
                    if w.write_all(&token.to_le_bytes()).is_err() {
                        return total;
                    }
                    // The worker gets another slot if it has a record left to fill it.
                    left[i % n] -= 1;
                    if left[i % n] >= SLOTS_PER_WORKER {
                        match free.take() {
                            Some(s) => drop(slots[i % n].send(s)),
                            None => return total,
                        }
                    }
                    total += len;
                }
                (Ok(len), None, _) if src.is_some() => total += len,
                (Ok(_), ..) => {
                    fail("the page check and the ring disagree".into());
                    return total;
                }
                (Err(e), ..) => {
                    fail(e);
                    return total;
                }
            }
        }
        let mut tail = [TOKEN_END.to_le_bytes(), TOKEN_END.to_le_bytes()].concat();
        tail.push(VERIFIED);
        let _ = w.write_all(&tail);
        total
    });
    if let Some(mut f) = free {
        // The restorer still returns the last slots: keep the pipe open (a write to a
        // closed one would kill it) until it closes its end as it finishes.
        let _ = std::io::copy(&mut f.release_r, &mut std::io::sink());
    }
    total
}

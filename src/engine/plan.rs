//! Building the restorer's plan from a validated image: the flat, fixed-layout input the
//! restorer follows without parsing anything itself (see `limitless_image::plan`).

use limitless_image::file::Image;
use limitless_image::format::{role, vma_kind, worth_tracking, PagesHeader, PAGE, USER_END, WINDOW_PAGES};
use limitless_image::plan::*;
use limitless_image::wire::Wire;

/// Lowest address offered to the restorer as a gap.
const GAP_LOW: u64 = 0x1000_0000;
/// Smallest gap worth offering.
const GAP_MIN: u64 = 64 << 20;

/// Descriptor numbers the restorer will find open.
pub struct PlanFds {
    /// The supervisor's go-ahead arrives here.
    pub data_fd: i32,
    /// The restorer reports errors here.
    pub err_fd: i32,
    /// First of the restorer's own fds, which it closes before the jump.
    pub close_from: i32,
    /// Last of the restorer's own fds.
    pub close_to: i32,
    /// The ring the supervisor passes the records it reads itself through, or -1.
    pub ring_fd: i32,
    /// Where the restorer returns ring slots, or -1.
    pub release_fd: i32,
    /// Slots in the ring.
    pub ring_slots: u32,
    /// Start the agent's dirty tracking from the image ([`pvf::TRACK`]).
    pub track: bool,
    /// Map the page records that allow it from their files rather than copy them
    /// ([`pcf::MAP`]).
    pub map: bool,
}

/// Whether the pages of area `v` may be mapped from an image file ([`pcf::MAP`]): private
/// anonymous memory (or a private mapping of a file that is gone, which restores as
/// anonymous memory) that is not executable (the image may be on a `noexec` mount), not
/// wiped on fork (a file mapping cannot be) and not tracked (the baseline assumes copied
/// pages). The heap and the stack are left alone: the kernel grows them itself.
///
/// And only an area that spans more than one page window: each window's record becomes a
/// mapping of its own, so such an area is never one mapping again, and `mremap` of the
/// whole of it fails (glibc's `realloc` then copies) instead of growing it with whatever
/// follows in the image file, or past its end, where the new pages would raise `SIGBUS`.
fn mappable(v: &limitless_image::format::VmaInfo, track: bool) -> bool {
    const PROT_EXEC: u32 = 4;
    let window = WINDOW_PAGES * PAGE;
    v.start / window != (v.end - 1) / window
        && matches!(v.kind, vma_kind::ANON | vma_kind::FILE_GONE)
        && v.prot & PROT_EXEC == 0
        && v.flags & limitless_image::format::vflags::WIPEONFORK == 0
        && !(track && worth_tracking(v))
}

/// Free ranges of the restored address space, largest first.
pub fn gaps(img: &Image) -> Vec<PlanGap> {
    let mut used: Vec<(u64, u64)> = img.vmas.iter().map(|v| (v.info.start, v.info.end)).collect();
    let vd = &img.process.vdso;
    for a in &vd.areas[..vd.count as usize] {
        used.push((a.start, a.start + a.len));
    }
    used.sort_unstable();
    let mut free = Vec::new();
    let mut at = GAP_LOW;
    // Leave the top of the address space alone (the stack grows down from there).
    let top = USER_END - (1 << 30);
    for (s, e) in used {
        if s > at && s.min(top) > at {
            free.push((at, s.min(top)));
        }
        at = at.max(e);
    }
    if top > at {
        free.push((at, top));
    }
    let mut g: Vec<PlanGap> = free
        .into_iter()
        .filter(|(s, e)| e - s >= GAP_MIN)
        .map(|(s, e)| PlanGap { start: (s + PAGE - 1) & !(PAGE - 1), len: (e - s) & !(PAGE - 1) })
        .collect();
    g.sort_by_key(|x| std::cmp::Reverse(x.len));
    g.truncate(MAX_GAPS as usize);
    g
}

/// Where page record `img.pages[i]` is read from, for [`build`].
#[derive(Clone, Copy, Debug)]
pub struct InPlace {
    /// The image file's fd number in the restorer.
    pub fd: i32,
    /// The offset of the record's pages in it.
    pub data_off: u64,
    /// The payload's XXH3-128 for the restorer to check, or `None` if the supervisor
    /// checks it.
    pub sum: Option<[u8; 16]>,
    /// For a record stored as its changes ([`pcf::DIFF`]): its payload's length.
    pub changes: Option<u64>,
}

/// Builds the plan. `vma_fd(i)` is the fd number at which the file of area `i` is open
/// (or -1 for anonymous areas).
/// `pages_fd(i)` says where page record `img.pages[i]` is read from in place, or `None` if
/// the supervisor passes it through the ring.
pub fn build(img: &Image, vma_fd: impl Fn(usize) -> i32, pages_fd: impl Fn(usize) -> Option<InPlace>, fds: &PlanFds) -> Vec<u8> {
    let gaps = gaps(img);
    // Runs first, each inside one area (`area` is its index in `img.vmas`, if any).
    let area_of = |a: u64| {
        let i = img.vmas.partition_point(|v| v.info.end <= a);
        img.vmas.get(i).filter(|v| v.info.start <= a).map(|_| i)
    };
    let mut runs: Vec<(PlanRun, Option<usize>)> = Vec::new();
    let mut checks: Vec<PlanCheck> = Vec::new();
    for (i, p) in img.pages.iter().enumerate() {
        let at = pages_fd(i);
        // A staged record's runs are placed in its payload as if the payload began at 0.
        let (fd, mut off) = at.map_or((fds.ring_fd, PagesHeader::SIZE as u64), |a| (a.fd, a.data_off));
        let first_run = runs.len();
        p.header.runs(|mut s, mut l| {
            while l > 0 {
                let area = area_of(s);
                let take = area.map_or(l, |k| l.min(img.vmas[k].info.end - s));
                let ours = runs.len() > first_run;
                match runs.last_mut() {
                    // Consecutive in memory and in the same record, in the same area.
                    Some((r, a)) if *a == area && ours && r.start + r.len == s && r.file_off + r.len == off => r.len += take,
                    _ => runs.push((PlanRun { start: s, len: take, file_off: off, fd, flags: 0 }, area)),
                }
                (s, l, off) = (s + take, l - take, off + take);
            }
        });
        let sum = at.and_then(|a| a.sum);
        let changes = at.and_then(|a| a.changes);
        let map = fds.map
            && changes.is_none()
            && sum.is_some()
            && at.is_some_and(|a| a.data_off % PAGE == 0)
            && runs[first_run..].iter().all(|(_, a)| a.is_some_and(|k| mappable(&img.vmas[k].info, fds.track)));
        checks.push(PlanCheck {
            // Where the payload starts in its file (0 in a ring slot).
            file_off: at.map_or(0, |a| a.data_off - PagesHeader::SIZE as u64),
            len: changes.unwrap_or(PagesHeader::SIZE as u64 + p.header.count as u64 * PAGE),
            sum: sum.unwrap_or_default(),
            first_run: first_run as u64,
            n_runs: (runs.len() - first_run) as u32,
            fd,
            flags: if at.is_none() {
                pcf::STAGED
            } else if changes.is_some() {
                pcf::VERIFY | pcf::DIFF
            } else if map {
                pcf::VERIFY | pcf::MAP
            } else if sum.is_some() {
                pcf::VERIFY
            } else {
                0
            },
            reserved: 0,
        });
    }
    // Anonymous areas may be filled by UFFDIO_COPY (from a buffer or a ring slot).
    let copy: Vec<bool> =
        img.vmas.iter().map(|v| !matches!(v.info.kind, vma_kind::FILE_PRIVATE | vma_kind::FILE_SHARED | vma_kind::SHM)).collect();
    let runs: Vec<PlanRun> = runs
        .into_iter()
        .map(|(mut r, a)| {
            if a.is_some_and(|k| copy[k]) {
                r.flags |= prf::COPY;
            }
            if a.is_some_and(|k| img.vmas[k].info.kind == vma_kind::FILE_PRIVATE) {
                r.flags |= prf::FILE;
            }
            r
        })
        .collect();
    let mut vmas = Vec::with_capacity(img.vmas.len());
    for (i, v) in img.vmas.iter().enumerate() {
        let x = &v.info;
        let mut flags = 0;
        if x.pages > 0 {
            flags |= pvf::HAS_DATA;
            if copy[i] {
                flags |= pvf::COPY;
            }
        }
        if x.kind == vma_kind::STACK {
            flags |= pvf::GROWSDOWN;
        }
        if fds.track && worth_tracking(x) {
            flags |= pvf::TRACK;
        }
        if x.flags & limitless_image::format::vflags::DONTFORK != 0 {
            flags |= pvf::DONTFORK;
        }
        if x.flags & limitless_image::format::vflags::WIPEONFORK != 0 {
            flags |= pvf::WIPEONFORK;
        }
        let (kind, fd, offset) = match x.kind {
            vma_kind::FILE_PRIVATE => (pk::FILE_PRIVATE, vma_fd(i), x.pgoff),
            vma_kind::FILE_SHARED | vma_kind::SHM => (pk::FILE_SHARED, vma_fd(i), x.pgoff),
            _ => (pk::ANON, -1, 0),
        };
        vmas.push(PlanVma { start: x.start, len: x.end - x.start, offset, kind, prot: x.prot, flags, fd });
        for g in &v.guards {
            vmas.push(PlanVma { start: g.start, len: g.end - g.start, offset: 0, kind: pk::GUARD, prot: 0, flags: 0, fd: -1 });
        }
    }
    let gaps_off = PlanHeader::SIZE as u64;
    let vmas_off = gaps_off + (gaps.len() * PlanGap::SIZE) as u64;
    let runs_off = vmas_off + (vmas.len() * PlanVma::SIZE) as u64;
    let checks_off = runs_off + (runs.len() * PlanRun::SIZE) as u64;
    // The baseline: every window of the tracked areas.
    let mut track: Vec<PlanTrack> = Vec::new();
    if fds.track {
        for p in &img.pages {
            if let Some(v) = area_of(p.header.start).map(|k| &img.vmas[k].info).filter(|v| worth_tracking(v)) {
                track.push(PlanTrack { hdr: p.header, area_start: v.start });
            }
        }
        track.sort_by_key(|t| t.hdr.start);
    }
    let track_off = checks_off + (checks.len() * PlanCheck::SIZE) as u64;
    let plan_len = track_off + (track.len() * PlanTrack::SIZE) as u64;
    let p = &img.process;
    let leader_fs = img.threads.iter().find(|t| t.role == role::MAIN).map_or(0, |t| t.fs_base);
    let h = PlanHeader {
        magic: PLAN_MAGIC,
        version: PLAN_VERSION,
        flags: 0,
        plan_len,
        gap_len: 0,
        n_gaps: gaps.len() as u32,
        n_vmas: vmas.len() as u32,
        n_runs: runs.len() as u64,
        n_checks: checks.len() as u64,
        gaps_off,
        vmas_off,
        runs_off,
        checks_off,
        data_fd: fds.data_fd,
        err_fd: fds.err_fd,
        vdso: p.vdso,
        mm: p.mm,
        auxv: p.auxv,
        auxv_words: p.auxv_words,
        reserved: 0,
        restart_entry: p.restart_entry,
        agent_state: p.agent_state,
        leader_fs,
        close_from: fds.close_from,
        close_to: fds.close_to,
        ring_fd: fds.ring_fd,
        release_fd: fds.release_fd,
        ring_slots: fds.ring_slots,
        reserved2: 0,
        n_track: track.len() as u64,
        track_off,
    };
    let mut out = vec![0u8; plan_len as usize];
    h.put(&mut out);
    let mut o = gaps_off as usize;
    for g in &gaps {
        g.put(&mut out[o..]);
        o += PlanGap::SIZE;
    }
    for v in &vmas {
        v.put(&mut out[o..]);
        o += PlanVma::SIZE;
    }
    for r in &runs {
        r.put(&mut out[o..]);
        o += PlanRun::SIZE;
    }
    for c in &checks {
        c.put(&mut out[o..]);
        o += PlanCheck::SIZE;
    }
    for t in &track {
        t.put(&mut out[o..]);
        o += PlanTrack::SIZE;
    }
    out
}

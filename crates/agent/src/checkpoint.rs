//! The manager thread and the checkpoint sequence.
//!
//! freeze -> `FROZEN` -> describe the process (kernel state, descriptors, memory map, page
//! scan) -> suspend point -> stream the image -> `DONE` -> wait for `RESUME` (or be killed).
//! Any failure before the stream ends releases the threads and reports `FAILED`: the
//! program keeps running. The manager's own suspend point is where a restored manager
//! continues ([`crate::restart::continue_manager`]).
//!
//! A snapshot checkpoint (leave-running, [`crate::snapshot`]) writes the records and the
//! shared memory frozen, then `clone`s a copy-on-write child that writes the page data;
//! the manager waits for `STDIO_SAVED`, lets the threads go (`RELEASED`), reaps the child
//! and reports `DONE`.

use crate::arch::{self, Ctx};
use crate::fds::{self, FdTable};
use crate::freeze::{self, FreezeError};
use crate::global::*;
use crate::maps::{self, Maps};
use crate::objects::Objects;
use crate::process;
use crate::scan::{self, Scan, ScanError};
use crate::scratch::Scratch;
use crate::snapshot::{self, Side};
use crate::stream::Out;
use crate::zombies;
use crate::{ctl, restart, track};
use core::sync::atomic::Ordering;
use limitless_image::ctl::{ckpt_flags, msg, Checkpoint, Done, Frozen, Hello, Released};
use limitless_image::format::*;
use limitless_sys as sys;

/// The manager's stack (above one guard page).
const MANAGER_STACK: usize = 512 * 1024;
/// The manager's TLS block: its FS base is one page in.
const MANAGER_TLS: usize = 4 * 4096;

/// Starts the manager thread with every signal blocked.
///
/// It is a raw `clone`, not `pthread_create`: glibc never learns of it, so a program that
/// has one thread keeps glibc's single-thread paths. With a second pthread, glibc locks
/// every `FILE` on each stdio call and takes mutexes with atomic instructions for the rest
/// of the process's life: `putc` took 11.4 ns under the agent against 1.5 ns plain
/// (docs/benchmarks.md). The manager uses no glibc function, so it needs no thread
/// descriptor; it gets a TLS block of its own, zeroed but for the two self pointers at the
/// start of glibc's `tcbhead_t`, so that nothing it does can reach another thread's.
pub fn start_manager() {
    let all: u64 = !0;
    let mut old: u64 = 0;
    let _ = sys::rt_sigprocmask(sys::SIG_SETMASK, Some(&all), Some(&mut old));
    let anon = sys::MAP_PRIVATE | sys::MAP_ANONYMOUS;
    let rw = sys::PROT_READ | sys::PROT_WRITE;
    // SAFETY: fresh anonymous mappings that only the manager uses.
    let mapped = unsafe { (sys::mmap(0, 4096 + MANAGER_STACK, rw, anon, -1, 0), sys::mmap(0, MANAGER_TLS, rw, anon, -1, 0)) };
    if let (Ok(stack), Ok(tls)) = mapped {
        let tp = tls + 4096;
        // SAFETY: `stack`'s first page becomes its guard; `tp` and `tp + 16` lie inside the
        // TLS mapping, which nothing else uses yet.
        unsafe {
            let _ = sys::mprotect(stack, 4096, sys::PROT_NONE);
            (tp as *mut u64).write(tp as u64);
            ((tp + 16) as *mut u64).write(tp as u64);
        }
        let flags = sys::CLONE_VM
            | sys::CLONE_FS
            | sys::CLONE_FILES
            | sys::CLONE_SIGHAND
            | sys::CLONE_THREAD
            | sys::CLONE_SYSVSEM
            | sys::CLONE_SETTLS;
        // SAFETY: a thread in this address space on its own stack and TLS; `manager_main`
        // never returns and uses raw system calls only.
        if unsafe { arch::spawn(flags, stack + 4096 + MANAGER_STACK, tp, manager_main) } < 0 {
            // SAFETY: the failed clone left both mappings unused.
            let _ = unsafe { (sys::munmap(stack, 4096 + MANAGER_STACK), sys::munmap(tls, MANAGER_TLS)) };
        }
    }
    let _ = sys::rt_sigprocmask(sys::SIG_SETMASK, Some(&old), None);
}

extern "C" fn manager_main() -> ! {
    // SAFETY: PR_SET_NAME reads a NUL-terminated string.
    let _ = unsafe { sys::prctl(sys::PR_SET_NAME, c"limitless".as_ptr() as usize, 0, 0, 0) };
    let hello = Hello {
        pid: sys::getpid() as u32,
        agent_version: crate::AGENT_VERSION,
        ctl_fd: CTL_FD.load(Ordering::Relaxed),
        sig_ckpt: SIG.load(Ordering::Relaxed) as u32,
    };
    let _ = ctl::send_wire(msg::HELLO, &hello);
    serve();
    sys::exit_thread(0)
}

/// Serves control requests until the supervisor goes away.
pub fn serve() {
    loop {
        match ctl::recv() {
            Ok(Some(p)) if p.kind == msg::CHECKPOINT => match Checkpoint::decode(&p.body[..p.len]) {
                Some(c) if p.fd >= 0 => checkpoint(&c, p.fd),
                _ => {
                    if p.fd >= 0 {
                        let _ = sys::close(p.fd);
                    }
                    ctl::send_text(msg::FAILED, &[b"bad checkpoint request"]);
                }
            },
            Ok(Some(p)) => {
                if p.fd >= 0 {
                    let _ = sys::close(p.fd);
                }
            }
            Ok(None) | Err(_) => return,
        }
    }
}

/// What the write phase needs (static: the manager's stack frames above its suspend point
/// must not change while they are being written).
struct Job {
    out_fd: i32,
    flags: u32,
    freeze_ns: u64,
    maps: *const Maps,
    scan: *const Scan,
    fds: *const FdTable,
    objs: *const Objects,
    scratch: *mut Scratch,
    membuf: *mut u8,
    mem_fd: i32,
    result: sys::Result<(u64, u64)>,
    write_ns: u64,
    /// Take a copy-on-write snapshot before the page data.
    snapshot: bool,
    /// The snapshot child (in the parent, after the write phase).
    child: Option<snapshot::Child>,
    /// One byte per scanned window, 1 if unchanged since the parent (null: none are).
    unchanged: *const u8,
    /// Dirty tracking's epoch for this checkpoint, and the pages found unchanged.
    epoch: u64,
    unchanged_pages: u64,
}

static JOB: Shared<Job> = Shared::new(Job {
    out_fd: -1,
    flags: 0,
    freeze_ns: 0,
    maps: core::ptr::null(),
    scan: core::ptr::null(),
    fds: core::ptr::null(),
    objs: core::ptr::null(),
    scratch: core::ptr::null_mut(),
    membuf: core::ptr::null_mut(),
    mem_fd: -1,
    result: Ok((0, 0)),
    write_ns: 0,
    snapshot: false,
    child: None,
    unchanged: core::ptr::null(),
    epoch: 0,
    unchanged_pages: 0,
});

fn fail(parts: &[&[u8]]) {
    ctl::send_text(msg::FAILED, parts);
}

fn resident_pages() -> usize {
    let mut b = [0u8; 128];
    let n = process::read_file(b"/proc/self/statm\0", &mut b);
    let mut it = b[..n].split(|&c| c == b' ');
    it.next();
    it.next().and_then(sys::parse_u64).map_or(0, |v| v.0 as usize)
}

fn checkpoint(c: &Checkpoint, out_fd: i32) {
    let t0 = sys::monotonic_ns();
    let resident = resident_pages();
    // NORESERVE: only what is used takes memory (descriptor state, maps, page lists).
    let scratch = Scratch::new((128 << 20) + resident * 64);
    let Ok(mut s) = scratch else {
        let _ = sys::close(out_fd);
        return fail(&[b"cannot reserve memory for the checkpoint"]);
    };
    if let Some(tracer) = tracer_pid() {
        let _ = sys::close(out_fd);
        let mut d = [0u8; 20];
        return fail(&[
            b"the program is being traced (ptrace) by process ",
            sys::fmt_u64(tracer, &mut d),
            b"; a traced program cannot be checkpointed",
        ]);
    }
    if !freeze::handler_installed() {
        let _ = sys::close(out_fd);
        let mut d = [0u8; 20];
        return fail(&[
            b"the program replaced the handler of the checkpoint signal (",
            sys::fmt_u64(SIG.load(Ordering::Relaxed) as u64, &mut d),
            b") with a raw system call that the agent cannot intercept (Go's runtime does), so its threads cannot be stopped",
        ]);
    }
    let timeout = (c.freeze_timeout_ms.max(10) as u64) * 1_000_000;
    // With --wait-idle: freeze at a moment with no connected TCP socket, if one comes in time.
    let idle_deadline = t0 + c.wait_idle_ms as u64 * 1_000_000;
    loop {
        while c.wait_idle_ms > 0 && fds::has_tcp_connections() && sys::monotonic_ns() < idle_deadline {
            sys::sleep_ns(5_000_000);
        }
        if let Err(e) = freeze::freeze(timeout) {
            freeze::thaw();
            let _ = sys::close(out_fd);
            return report_freeze_error(e, c.freeze_timeout_ms);
        }
        // A connection may have come between the look and the freeze.
        if c.wait_idle_ms == 0 || !fds::has_tcp_connections() || sys::monotonic_ns() >= idle_deadline {
            break;
        }
        freeze::thaw();
    }
    let freeze_ns = sys::monotonic_ns() - t0;
    crate::cputime::record();
    let threads = live_threads() + 1;
    let _ = ctl::send_wire(msg::FROZEN, &Frozen { threads: threads as u32, reserved: 0, freeze_ns });

    // The manager describes itself into the last slot.
    let mi = NSLOTS.load(Ordering::Relaxed);
    SLOTS[mi].tid.store(sys::gettid(), Ordering::Relaxed);
    SLOTS[mi].state.store(slot::PARKED, Ordering::Relaxed);
    // SAFETY: the manager owns its own slot; a null ucontext is allowed.
    unsafe { freeze::describe(&mut *SLOTS[mi].info.get(), core::ptr::null()) };
    // SAFETY: as above.
    unsafe { (*SLOTS[mi].info.get()).role = role::MANAGER };
    NSLOTS.store(mi + 1, Ordering::Release);
    MANAGER_SLOT.store(mi, Ordering::Release);

    // SAFETY: every other thread is parked; the manager owns the saved state.
    let sv = unsafe { saved() };
    process::save_kernel_state(sv);
    let ctl_fd = CTL_FD.load(Ordering::Relaxed);
    let Some(mut objs) = Objects::new(&mut s, 4096) else {
        freeze::thaw();
        let _ = sys::close(out_fd);
        return fail(&[b"the checkpoint ran out of scratch memory"]);
    };
    let uffd = track::fd();
    let fdt = match fds::collect(&mut s, sv, &mut objs, &[ctl_fd, out_fd, uffd], c.stdio_ino) {
        Ok(t) => t,
        Err(e) => {
            freeze::thaw();
            let _ = sys::close(out_fd);
            return match e {
                Ok(e) => {
                    let mut d = [0u8; 20];
                    fail(&[b"fd ", sys::fmt_u64(e.fd as u64, &mut d), b" (", &e.path[..e.path_len], b") is ", e.what.as_bytes()])
                }
                Err(_) => fail(&[b"cannot list the open file descriptors"]),
            };
        }
    };
    if let Err(r) = record_children() {
        freeze::thaw();
        let _ = sys::close(out_fd);
        let mut d = [0u8; 20];
        return match r {
            zombies::Refusal::Alive(child) => {
                fail(&[b"the program has a child process (pid ", sys::fmt_u64(child, &mut d), b"); process trees are not supported yet"])
            }
            zombies::Refusal::TooMany => fail(&[b"the program has more than 64 ended child processes it has not waited for"]),
        };
    }
    let cap = 16 << 20;
    let maps = match maps::read(&mut s, cap).and_then(|mut m| maps::read_vmflags(&mut s, &mut m).map(|_| m)) {
        Ok(m) => m,
        Err(_) => {
            freeze::thaw();
            let _ = sys::close(out_fd);
            return fail(&[b"cannot read /proc/self/maps"]);
        }
    };
    let self_contained = c.flags & ckpt_flags::SELF_CONTAINED != 0;
    // Windows: at most one per resident page, plus (self-contained) one per 1 MiB of the
    // mappings, whose pages need not be resident.
    let mapped: usize = if self_contained { maps.entries[..maps.n].iter().map(|e| ((e.end - e.start) >> 20) as usize).sum() } else { 0 };
    let max_wins = resident + mapped + 2 * maps.n + 1024;
    let scan = match scan::scan(&maps, &mut s, &mut objs, max_wins, self_contained, track::hole()) {
        Ok(sc) => sc,
        Err(e) => {
            freeze::thaw();
            let _ = sys::close(out_fd);
            return match e {
                ScanError::Unsupported(u) => {
                    let (mut a, mut b) = ([0u8; 16], [0u8; 16]);
                    let name = &maps.text[u.name_off as usize..(u.name_off + u.name_len) as usize];
                    fail(&[
                        b"memory area ",
                        sys::fmt_hex(u.start, &mut a),
                        b"-",
                        sys::fmt_hex(u.end, &mut b),
                        b" ",
                        name,
                        b" is ",
                        u.why.as_bytes(),
                    ])
                }
                ScanError::NoMem => fail(&[b"the checkpoint ran out of scratch memory"]),
                ScanError::Io(e) => {
                    let mut d = [0u8; 20];
                    fail(&[b"cannot read /proc/self/pagemap or /proc/self/mem (errno ", sys::fmt_u64(e.0 as u64, &mut d), b")"])
                }
            };
        }
    };
    let mut snap = c.flags & (ckpt_flags::LEAVE_RUNNING | ckpt_flags::SNAPSHOT) == ckpt_flags::LEAVE_RUNNING | ckpt_flags::SNAPSHOT;
    if let (true, Some((start, why))) = (snap, snapshot::blocker(&scan)) {
        snap = false;
        let mut a = [0u8; 16];
        note(&[
            b"no snapshot: the memory area at ",
            sys::fmt_hex(start, &mut a),
            b" has ",
            why,
            b"; the program stays frozen while its image is written",
        ]);
    }
    // Dirty tracking: which windows are unchanged since the parent; the new baseline.
    let arm = c.flags & (ckpt_flags::TRACK | ckpt_flags::LEAVE_RUNNING) == ckpt_flags::TRACK | ckpt_flags::LEAVE_RUNNING;
    let tracked = track::checkpoint(&scan, &mut s, c.parent_epoch, arm);
    let membuf = s.array::<u8>((WINDOW_PAGES * PAGE) as usize);
    let mem_fd = sys::openat(sys::AT_FDCWD, b"/proc/self/mem\0", sys::O_RDONLY | sys::O_CLOEXEC, 0).unwrap_or(-1);
    GENERATION.fetch_add(1, Ordering::AcqRel);
    // SAFETY: the manager owns JOB during a checkpoint.
    unsafe {
        let j = &mut *JOB.ptr();
        j.out_fd = out_fd;
        j.flags = c.flags;
        j.freeze_ns = freeze_ns;
        j.maps = &maps;
        j.scan = &scan;
        j.fds = &fdt;
        j.objs = &objs;
        j.scratch = &mut s;
        j.membuf = membuf.map_or(core::ptr::null_mut(), |m| m.as_mut_ptr());
        j.mem_fd = mem_fd;
        j.result = Ok((0, 0));
        j.snapshot = snap;
        j.child = None;
        j.unchanged = tracked.unchanged.as_ref().map_or(core::ptr::null(), |u| u.as_ptr());
        j.epoch = tracked.epoch;
        j.unchanged_pages = tracked.unchanged_pages;
    }
    // SAFETY: the manager's context lives in its slot (static memory, part of the image).
    let r = unsafe { arch::suspend_point(SLOTS[mi].ctx.get(), write_image) };
    if r != 0 {
        // This is a restored process: the scratch mapping (and the maps, scan and fd table
        // in it) no longer exists; it must not be unmapped, and nothing in it is used again.
        core::mem::forget(s);
        restart::continue_manager();
        return;
    }
    if mem_fd >= 0 {
        let _ = sys::close(mem_fd);
    }
    let _ = sys::close(out_fd);
    // SAFETY: the write phase is over; the manager owns JOB.
    let (result, write_ns, child) = unsafe { ((*JOB.ptr()).result, (*JOB.ptr()).write_ns, (*JOB.ptr()).child) };
    if let Some(child) = child {
        return finish_snapshot(child, t0, s);
    }
    drop(s);
    match result {
        Ok((bytes, pages)) => {
            let _ = ctl::send_wire(msg::DONE, &done(bytes, pages, write_ns));
        }
        Err(e) => {
            let mut d = [0u8; 20];
            fail(&[b"writing the image failed (errno ", sys::fmt_u64(e.0 as u64, &mut d), b")"]);
        }
    }
    // Wait for the supervisor: RESUME, or it kills the process (or goes away).
    while let Ok(Some(p)) = ctl::recv() {
        if p.fd >= 0 {
            let _ = sys::close(p.fd);
        }
        if p.kind == msg::RESUME {
            break;
        }
    }
    freeze::thaw();
}

/// Parent side of a snapshot checkpoint: the child writes the page data. Waits until the
/// supervisor has saved the program's input (`STDIO_SAVED`, or `RESUME` if it gave up),
/// lets the threads go, reaps the child and reports. No `RESUME` wait afterwards: the
/// threads already run, and [`serve`] ignores the supervisor's `RESUME`.
fn finish_snapshot(child: snapshot::Child, t0: u64, s: Scratch) {
    while let Ok(Some(p)) = ctl::recv() {
        if p.fd >= 0 {
            let _ = sys::close(p.fd);
        }
        if p.kind == msg::STDIO_SAVED || p.kind == msg::RESUME {
            break;
        }
    }
    freeze::thaw();
    let frozen_ns = sys::monotonic_ns() - t0;
    let _ = ctl::send_wire(msg::RELEASED, &Released { frozen_ns, clone_ns: child.clone_ns, child_pid: child.pid as u32, reserved: 0 });
    let r = snapshot::wait(child);
    drop(s);
    // SAFETY: the manager owns JOB; the write phase is over.
    let pages = unsafe { (*(*JOB.ptr()).scan).pages };
    let mut d = [0u8; 20];
    match r {
        Ok((bytes, write_ns)) => {
            let _ = ctl::send_wire(msg::DONE, &done(bytes, pages, write_ns));
        }
        Err(snapshot::ChildError::Write(e)) => {
            fail(&[b"writing the image failed (errno ", sys::fmt_u64(e.0 as u64, &mut d), b")"]);
        }
        Err(snapshot::ChildError::Killed(sig)) => {
            fail(&[b"the snapshot process writing the image was killed by signal ", sys::fmt_u64(sig as u64, &mut d)]);
        }
        Err(snapshot::ChildError::Lost(code)) => {
            fail(&[b"the snapshot process writing the image ended without a result (status ", sys::fmt_u64(code as u64, &mut d), b")"]);
        }
    }
}

/// `DONE` for the checkpoint under way, with its tracking figures from `JOB`.
fn done(bytes: u64, pages: u64, write_ns: u64) -> Done {
    // SAFETY: the manager owns JOB; the write phase is over.
    let (epoch, unchanged_pages) = unsafe { ((*JOB.ptr()).epoch, (*JOB.ptr()).unchanged_pages) };
    Done { bytes, pages, write_ns, epoch, unchanged_pages }
}

fn note(parts: &[&[u8]]) {
    ctl::send_text(msg::NOTE, parts);
}

/// The pid tracing this process, if one is (`TracerPid` in `/proc/self/status`).
fn tracer_pid() -> Option<u64> {
    process::proc_field(b"/proc/self/status\0", b"TracerPid:").filter(|&p| p != 0)
}

fn live_threads() -> usize {
    SLOTS.iter().take(NSLOTS.load(Ordering::Relaxed)).filter(|s| s.state.load(Ordering::Acquire) == slot::PARKED).count()
}

fn report_freeze_error(e: FreezeError, timeout_ms: u32) {
    let mut d = [0u8; 20];
    let mut t = [0u8; 20];
    match e {
        FreezeError::Stuck(tid) => {
            let mut comm = [0u8; 32];
            let mut path = [0u8; 64];
            let cl = process::read_file(process::task_path(tid, b"comm", &mut path), &mut comm);
            let name = comm[..cl].strip_suffix(b"\n").unwrap_or(&comm[..cl]);
            let mut d2 = [0u8; 20];
            fail(&[
                b"thread ",
                sys::fmt_u64(tid as u64, &mut d2),
                b" (",
                name,
                b") did not stop within ",
                sys::fmt_u64(timeout_ms as u64, &mut t),
                b" ms; it may block the checkpoint signal",
            ])
        }
        FreezeError::TooMany => {
            fail(&[b"the program has more threads than the agent supports (", sys::fmt_u64(MAX_THREADS as u64, &mut d), b")"])
        }
        FreezeError::Proc(e) => {
            fail(&[b"cannot list the program's threads in /proc/self/task (errno ", sys::fmt_u64(e.0 as u64, &mut d), b")"])
        }
    }
}

/// Records the children of every thread that have ended (zombies, which a restore owes
/// the program); refuses a live child.
fn record_children() -> Result<(), zombies::Refusal> {
    zombies::begin();
    for s in SLOTS.iter().take(NSLOTS.load(Ordering::Relaxed)) {
        if s.state.load(Ordering::Acquire) != slot::PARKED {
            continue;
        }
        let mut path = [0u8; 64];
        let mut b = [0u8; 1024];
        let len = process::read_file(process::task_path(s.tid.load(Ordering::Relaxed), b"children", &mut path), &mut b);
        let mut rest = &b[..len];
        while let Some(i) = rest.iter().position(u8::is_ascii_digit) {
            let Some((pid, k)) = sys::parse_u64(&rest[i..]) else { break };
            // (A list cut off by the buffer ends in a partial pid: asking about it refuses
            // it, as there are too many children anyway.)
            zombies::record(pid)?;
            rest = &rest[i + k..];
        }
    }
    Ok(())
}

/// The write phase, run at the manager's suspend point.
unsafe extern "C" fn write_image(_ctx: *mut Ctx) -> u64 {
    let t0 = sys::monotonic_ns();
    // SAFETY: the manager owns JOB; the pointers in it refer to its live stack frame.
    let j = unsafe { &mut *JOB.ptr() };
    // SAFETY: as above.
    let (maps, scan, fdt) = unsafe { (&*j.maps, &*j.scan, &*j.fds) };
    let mut buf = [0u8; 65536];
    let mut out = Out::new(j.out_fd, &mut buf);
    let mut report = None;
    let r = write_all(&mut out, j, maps, scan, fdt, t0, &mut report);
    j.write_ns = sys::monotonic_ns() - t0;
    if let Some(rep) = report {
        // The snapshot child: report and end.
        rep.finish(r.map(|_| out.bytes), j.write_ns);
    }
    j.result = r.map(|_| (out.bytes, scan.pages));
    0
}

/// Writes the stream. In a snapshot checkpoint the parent returns after the shared memory
/// (its child, with `report` set, writes the rest).
fn write_all(
    out: &mut Out,
    j: &mut Job,
    maps: &Maps,
    scan: &Scan,
    fdt: &FdTable,
    t0: u64,
    report: &mut Option<snapshot::Report>,
) -> sys::Result<()> {
    // SAFETY: the manager owns the saved state during a checkpoint.
    let sv = unsafe { saved() };
    let mut p = ProcessInfo::zeroed();
    let mut exe = [0u8; 4096];
    process::describe(sv, &mut p, &mut exe);
    let threads: usize =
        SLOTS.iter().take(NSLOTS.load(Ordering::Relaxed)).filter(|s| s.state.load(Ordering::Acquire) == slot::PARKED).count();
    p.thread_count = threads as u32;
    p.vma_count = scan.n_areas as u32;
    p.fd_count = fdt.n as u32;
    p.vdso = scan.vdso;
    p.vdso.vdso_hash = scan.vdso_hash;
    if j.flags & ckpt_flags::LEAVE_RUNNING != 0 {
        p.flags |= pflags::LEFT_RUNNING;
    }
    if sv.main_exited {
        p.flags |= pflags::MAIN_EXITED;
    }
    let mut pb = [0u8; ProcessInfo::SIZE];
    p.encode(&mut pb).ok_or(sys::Errno::EINVAL)?;
    out.record(kind::PROCESS, &[&pb, &sv.cwd[..p.cwd_len as usize], &exe[..p.exe_len as usize]])?;
    for s in SLOTS.iter().take(NSLOTS.load(Ordering::Relaxed)) {
        if s.state.load(Ordering::Acquire) != slot::PARKED {
            continue;
        }
        // SAFETY: parked threads published their info; the manager wrote its own.
        let (mut info, ctx) = unsafe { (*s.info.get(), *s.ctx.get()) };
        info.ctx = SavedCtx {
            rbx: ctx.rbx,
            rbp: ctx.rbp,
            r12: ctx.r12,
            r13: ctx.r13,
            r14: ctx.r14,
            r15: ctx.r15,
            rsp: ctx.rsp,
            rip: ctx.rip,
            mxcsr: ctx.mxcsr,
            fcw: ctx.fcw & 0xffff,
        };
        out.wire(kind::THREAD, &info, &[])?;
    }
    for a in scan.areas[..scan.n_areas].iter() {
        let mut v = a.info;
        let name = &maps.text[a.name_off as usize..(a.name_off + a.name_len) as usize];
        v.name_len = name.len() as u32;
        out.wire_items(kind::VMA, &v, name, scan.guards_of(a))?;
    }
    for r in fdt.recs[..fdt.n].iter() {
        let mut ib = [0u8; FdInfo::SIZE];
        r.info.encode(&mut ib).ok_or(sys::Errno::EINVAL)?;
        out.record(kind::FD, &[&ib, fdt.path(r), fdt.extra(r)])?;
    }
    // SAFETY: the manager owns JOB and the scratch mapping during the write phase.
    let (objs, scratch) = unsafe { (&*j.objs, &mut *j.scratch) };
    crate::objects::write(out, objs, &scan.objmaps[..scan.n_objmaps], scratch, j.mem_fd)?;
    if j.snapshot {
        match snapshot::fork(j.out_fd) {
            Ok(Side::Parent(c)) => {
                j.child = Some(c);
                return Ok(());
            }
            Ok(Side::Child(r)) => {
                *report = Some(r);
                // The descriptor the parent opened reads the parent's memory, which runs on.
                j.mem_fd = sys::openat(sys::AT_FDCWD, b"/proc/self/mem\0", sys::O_RDONLY | sys::O_CLOEXEC, 0).unwrap_or(-1);
            }
            Err(e) => {
                let mut d = [0u8; 20];
                note(&[
                    b"no snapshot: clone failed (errno ",
                    sys::fmt_u64(e.0 as u64, &mut d),
                    b"); the program stays frozen while its image is written",
                ]);
            }
        }
    }
    for (wi, w) in scan.wins[..scan.n_wins].iter().enumerate() {
        // SAFETY: `unchanged` has one byte per window of this scan (scratch memory, which
        // the snapshot child has too).
        if !j.unchanged.is_null() && unsafe { *j.unchanged.add(wi) } == 1 {
            out.unchanged(&w.hdr)?;
            continue;
        }
        let area = &scan.areas[w.area as usize];
        let mut runs = [(0usize, 0usize); 130];
        let mut nr = 0;
        if area.via_mem {
            if j.membuf.is_null() || j.mem_fd < 0 {
                return Err(sys::Errno::ENOMEM);
            }
            let mut off = 0usize;
            let mut err = None;
            w.hdr.runs(|a, l| {
                // SAFETY: membuf holds WINDOW_PAGES pages; the runs of one window fit.
                let dst = unsafe { core::slice::from_raw_parts_mut(j.membuf.add(off), l as usize) };
                scan::read_mem(j.mem_fd, dst, a);
                if nr < runs.len() {
                    runs[nr] = (j.membuf as usize + off, l as usize);
                    nr += 1;
                } else {
                    err = Some(sys::Errno::EINVAL);
                }
                off += l as usize;
            });
            if let Some(e) = err {
                return Err(e);
            }
        } else {
            w.hdr.runs(|a, l| {
                if nr < runs.len() {
                    runs[nr] = (a as usize, l as usize);
                    nr += 1;
                }
            });
        }
        // SAFETY: the runs are present pages of readable private areas, which stay as they
        // are until the supervisor has read them (the program stays frozen until the image
        // is durable, or this is the snapshot child), so they may go by reference; or the
        // scratch buffer just filled, which is reused for the next window: copied.
        unsafe { out.pages(&w.hdr, &runs[..nr], !area.via_mem)? };
    }
    let end = EndInfo {
        records: out.records + 1,
        pages: scan.pages,
        zero_pages: scan.zero_pages,
        freeze_ns: j.freeze_ns,
        write_ns: sys::monotonic_ns() - t0,
        reserved: [0; 3],
    };
    out.wire(kind::END, &end, &[])?;
    out.flush()
}

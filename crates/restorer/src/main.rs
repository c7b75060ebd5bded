//! The Limitless restorer: a static, `no_std`, libc-free program that turns a fresh process
//! into the checkpointed one.
//!
//! The supervisor `exec`s it with a restore plan (`limitless_image::plan`) on the fd given
//! as `argv[1]`, the page data on a pipe, and every file the program needs already open.
//!
//! - **Stage 0** runs wherever the kernel loaded it. It applies its own relocations (it is a
//!   static PIE and has no dynamic loader), reads the plan header, maps a *gap* that is free
//!   in the checkpointed address space, copies itself there, relocates the copy, moves onto a
//!   stack in the gap and jumps to stage 1 in the copy.
//! - **Stage 1** runs from the gap: it unmaps everything else, moves the vDSO block to where
//!   the program had it, creates every memory area, reads the page data into place, sets the
//!   memory-layout fields with `prctl(PR_SET_MM_MAP)`, and jumps into the agent's restart
//!   entry inside the restored memory. The agent recreates the threads and unmaps the gap.
//!
//! Errors are written as one line to the plan's error fd, then the process exits with
//! `RESTORER_FAILED` before any of the program's code has run.
#![no_std]
#![no_main]

mod elf;
mod mem;
mod pages;
mod report;

use core::arch::{asm, global_asm};
use limitless_image::format::VdsoInfo;
use limitless_image::plan::*;
use limitless_sys as sys;
use report::{fail, fail_errno};

// The entry point: the kernel leaves argc at the stack pointer.
global_asm!(
    ".globl _start",
    "_start:",
    "xor ebp, ebp",
    "mov rdi, rsp",
    "and rsp, -16",
    "call {stage0}",
    "ud2",
    stage0 = sym stage0,
);

/// Size of the stack in the gap (the agent's restart code runs on it too).
const STACK_LEN: usize = 512 * 1024;
/// Buffer for `/proc/self/maps` of this (small) process.
const MAPS_LEN: usize = 64 * 1024;
/// Room for stage-1 arguments and the restart arguments.
const ARGS_LEN: usize = 4096;

/// What stage 0 hands to stage 1 (lives in the gap).
#[repr(C)]
struct Stage1 {
    gap: usize,
    gap_len: usize,
    plan: usize,
    plan_len: usize,
    maps: usize,
    vdso_tmp: usize,
    args: usize,
    started_ns: u64,
}

/// Stage 0, at the kernel's load address.
///
/// # Safety
/// Called once, from `_start`, with the initial stack pointer.
unsafe extern "C" fn stage0(sp: *const usize) -> ! {
    let base = elf::image_base();
    // SAFETY: this is the first thing the process does; nothing has read relocated data yet.
    unsafe { elf::relocate(base, base) };
    let started_ns = sys::monotonic_ns();

    // argv[1] is the plan fd.
    // SAFETY: the kernel's initial stack holds argc then argc argv pointers.
    let argc = unsafe { *sp };
    if argc < 2 {
        fail("usage: limitless-restorer PLAN_FD (started by `limitless restore`)");
    }
    // SAFETY: argv[1] is a NUL-terminated string from the kernel.
    let arg1 = unsafe { mem::cstr(*sp.add(2) as *const u8) };
    let plan_fd = match sys::parse_u64(arg1) {
        Some((v, n)) if n == arg1.len() && v < 1 << 20 => v as i32,
        _ => fail("argv[1] is not a file descriptor number"),
    };
    let mut hb = [0u8; PlanHeader::SIZE];
    match sys::pread(plan_fd, &mut hb, 0) {
        Ok(n) if n == hb.len() => {}
        Ok(_) => fail("the restore plan is cut short"),
        Err(e) => fail_errno("cannot read the restore plan", e),
    }
    let h = match PlanHeader::decode(&hb) {
        Some(h) if h.magic == PLAN_MAGIC && h.version == PLAN_VERSION => h,
        _ => fail("the restore plan has a bad magic or version"),
    };
    report::set_err_fd(h.err_fd);
    if h.plan_len < PlanHeader::SIZE as u64 || h.plan_len > 1 << 34 || h.n_gaps == 0 || h.n_gaps > MAX_GAPS {
        fail("the restore plan header is inconsistent");
    }

    // Layout of the gap: [restorer copy][stack][plan][maps buffer][vDSO scratch][args].
    let self_len = elf::image_len(base);
    let plan_len = page_up(h.plan_len as usize);
    let vdso_len = page_up(vdso_span(&h.vdso));
    let need = self_len + STACK_LEN + plan_len + MAPS_LEN + vdso_len + ARGS_LEN;

    let gap = match pick_gap(plan_fd, &h, need) {
        Some(g) => g,
        None => fail("no gap in the restored address space is free for the restorer"),
    };
    // SAFETY: `gap` is a fresh private mapping of `need` bytes that nothing else uses; the
    // copy covers this program's loaded segments, which lie inside [base, base+self_len).
    unsafe {
        mem::copy(gap, base, self_len);
        elf::relocate(base, gap);
        elf::protect_text(base, gap);
    }
    let plan = gap + self_len + STACK_LEN;
    // SAFETY: `plan` has `plan_len` writable bytes in the gap.
    match unsafe { sys::pread_raw(plan_fd, plan, h.plan_len as usize, 0) } {
        Ok(n) if n as u64 == h.plan_len => {}
        Ok(_) => fail("the restore plan is cut short"),
        Err(e) => fail_errno("cannot read the restore plan", e),
    }
    let maps = plan + plan_len;
    let vdso_tmp = maps + MAPS_LEN;
    let args = vdso_tmp + vdso_len;
    let s1 = args as *mut Stage1;
    // SAFETY: `args` has ARGS_LEN writable bytes, enough for Stage1.
    unsafe { s1.write(Stage1 { gap, gap_len: need, plan, plan_len: h.plan_len as usize, maps, vdso_tmp, args: args + 512, started_ns }) };
    let entry = stage1 as *const () as usize - base + gap;
    let stack_top = (gap + self_len + STACK_LEN) & !15;
    // SAFETY: the copy at `gap` is relocated and executable; `entry` is stage1 in the copy and
    // `stack_top` is the top of the gap stack. Nothing returns here.
    unsafe {
        asm!(
            "mov rsp, {st}",
            "xor ebp, ebp",
            "call {e}",
            "ud2",
            st = in(reg) stack_top,
            e = in(reg) entry,
            in("rdi") s1,
            options(noreturn),
        )
    }
}

fn page_up(v: usize) -> usize {
    (v + 4095) & !4095
}

fn vdso_span(v: &VdsoInfo) -> usize {
    if v.count == 0 || v.count > 4 {
        return 0;
    }
    let first = v.areas[0].start;
    let last = &v.areas[v.count as usize - 1];
    (last.start + last.len - first) as usize
}

/// Maps `need` bytes at the first candidate gap that is free here too.
fn pick_gap(plan_fd: i32, h: &PlanHeader, need: usize) -> Option<usize> {
    for i in 0..h.n_gaps as u64 {
        let mut gb = [0u8; PlanGap::SIZE];
        let off = h.gaps_off + i * PlanGap::SIZE as u64;
        if sys::pread(plan_fd, &mut gb, off).ok()? != gb.len() {
            return None;
        }
        let g = PlanGap::decode(&gb)?;
        if (g.len as usize) < need || g.start % 4096 != 0 {
            continue;
        }
        // Try the start, the middle and the end of the candidate.
        let span = g.len as usize - need;
        for at in [0, (span / 2) & !4095, span & !4095] {
            let addr = g.start as usize + at;
            // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping.
            let r = unsafe {
                sys::mmap(
                    addr,
                    need,
                    sys::PROT_READ | sys::PROT_WRITE,
                    sys::MAP_PRIVATE | sys::MAP_ANONYMOUS | sys::MAP_FIXED_NOREPLACE,
                    -1,
                    0,
                )
            };
            match r {
                Ok(a) if a == addr => return Some(a),
                Ok(a) => {
                    // An old kernel ignored the flag and placed it elsewhere.
                    // SAFETY: `a` is the mapping just made.
                    let _ = unsafe { sys::munmap(a, need) };
                }
                Err(_) => {}
            }
        }
    }
    None
}

/// Reads entry `i` of a table in the plan.
fn entry<T: limitless_image::wire::Wire>(s: &Stage1, off: u64, i: u64) -> T {
    let o = off as usize + i as usize * T::SIZE;
    if o + T::SIZE > s.plan_len {
        fail("the restore plan is cut short");
    }
    // SAFETY: [plan+o, plan+o+SIZE) is inside the plan buffer, checked above.
    let b = unsafe { core::slice::from_raw_parts((s.plan + o) as *const u8, T::SIZE) };
    T::get(b)
}

/// Stage 1, running from the gap.
///
/// # Safety
/// Called once by stage 0 with a filled `Stage1` in the gap.
unsafe extern "C" fn stage1(s: *const Stage1) -> ! {
    // SAFETY: stage 0 wrote a complete Stage1.
    let s = unsafe { &*s };
    // SAFETY: the plan buffer holds at least a header (checked in stage 0).
    let h = <PlanHeader as limitless_image::wire::Wire>::get(unsafe { core::slice::from_raw_parts(s.plan as *const u8, PlanHeader::SIZE) });

    // 1. Unmap everything but the gap, the vDSO block and vsyscall.
    let cur = unmap_all_but(s);
    // 2. Move the vDSO block to where the program had it.
    move_vdso(s, &h.vdso, &cur);
    // 3. Create the memory areas.
    for i in 0..h.n_vmas as u64 {
        let v: PlanVma = entry(s, h.vmas_off, i);
        map_vma(&v);
    }
    // 4. Page data, in order, from the image files (or from the data pipe).
    let (bytes, mapped) = pages::read_all(s, &h);
    // The program may run only once the supervisor has checked every record's hash.
    let mut go = [0u8; 1];
    loop {
        match sys::read(h.data_fd, &mut go) {
            Ok(1) if go[0] == VERIFIED => break,
            Err(sys::Errno::EINTR) => {}
            _ => fail("the supervisor did not confirm the page data (it failed its checks)"),
        }
    }
    // 5. Final protections and advice.
    for i in 0..h.n_vmas as u64 {
        let v: PlanVma = entry(s, h.vmas_off, i);
        finish_vma(&v);
    }
    // 6. Memory-layout fields (program break, arguments, environment, auxv).
    set_mm(s, &h);
    // 7. Close our fds and jump into the agent.
    if h.close_from >= 0 && h.close_to >= h.close_from {
        for fd in h.close_from..=h.close_to {
            if fd != h.err_fd {
                let _ = sys::close(fd);
            }
        }
    }
    // 8. Dirty tracking from here on, if asked (after our fds are gone: its descriptor
    // must not be among them).
    let (track_uffd, track, n_track) = arm_tracking(s, &h);
    let args = s.args as *mut RestartArgs;
    // SAFETY: `s.args` points at free, writable space in the gap.
    unsafe {
        args.write(RestartArgs {
            magic: RESTART_MAGIC,
            version: RESTART_VERSION,
            pid: sys::getpid() as u32,
            gap_start: s.gap as u64,
            gap_len: s.gap_len as u64,
            started_ns: s.started_ns,
            data_bytes: bytes,
            track_uffd,
            flags: if mapped { restart_flags::MAPPED } else { 0 },
            track,
            n_track,
        })
    };
    if h.err_fd >= 0 && h.err_fd >= h.close_from && h.err_fd <= h.close_to {
        let _ = sys::close(h.err_fd);
    }
    if h.leader_fs != 0 {
        // SAFETY: the value is the restored main thread's TLS block, now mapped again. The
        // restart entry does not depend on TLS before it sets it up itself.
        let _ = unsafe { sys::arch_prctl(sys::ARCH_SET_FS, h.leader_fs as usize) };
    }
    let stack_top = (s.gap + elf_self_len(s)) & !15;
    // SAFETY: `restart_entry` is the agent's restart function in the restored memory (the
    // supervisor checked it lies in an executable area of the image); it never returns. The
    // stack is the gap stack, which the agent leaves before it unmaps the gap.
    unsafe {
        asm!(
            "mov rsp, {st}",
            "xor ebp, ebp",
            "call {e}",
            "ud2",
            st = in(reg) stack_top,
            e = in(reg) h.restart_entry,
            in("rdi") args,
            options(noreturn),
        )
    }
}

/// Registers the [`pvf::TRACK`] areas with a new userfaultfd for asynchronous
/// write-protection and protects them: from now on the kernel notes every page written,
/// by the program or by the agent's restart. Returns the descriptor and where the plan's
/// baseline windows are, or (-1, 0, 0): then nothing stays registered and the restored
/// process starts untracked, as it would without the plan asking.
fn arm_tracking(s: &Stage1, h: &PlanHeader) -> (i32, u64, u64) {
    const NONE: (i32, u64, u64) = (-1, 0, 0);
    let end = (h.n_track as u128) * PlanTrack::SIZE as u128 + h.track_off as u128;
    let any = (0..h.n_vmas as u64).any(|i| entry::<PlanVma>(s, h.vmas_off, i).flags & pvf::TRACK != 0);
    if !any || end > s.plan_len as u128 {
        return NONE;
    }
    let Ok(uffd) = sys::uffd_wp_async(TRACK_FD_FLOOR) else {
        return NONE;
    };
    for i in 0..h.n_vmas as u64 {
        let v: PlanVma = entry(s, h.vmas_off, i);
        if v.flags & pvf::TRACK == 0 {
            continue;
        }
        // SAFETY: write-protect mode only: no fault in the area waits for a handler (the
        // kernel resolves them itself, WP_ASYNC). The area is one this restorer mapped.
        let registered = unsafe { sys::uffd_register(uffd, v.start, v.len, sys::UFFDIO_REGISTER_MODE_WP) }.is_ok();
        // SAFETY: the protection is asynchronous, so later writes proceed (the kernel only
        // notes them).
        if !registered || unsafe { sys::uffd_writeprotect(uffd, v.start, v.len) }.is_err() {
            // An area registered but not protected would hide writes: none at all then
            // (closing unregisters every area).
            let _ = sys::close(uffd);
            return NONE;
        }
    }
    (uffd, (s.plan as u64) + h.track_off, h.n_track)
}

/// Top of the gap stack, as an offset from the gap start.
fn elf_self_len(s: &Stage1) -> usize {
    s.plan - s.gap
}

/// The vDSO block of this process, as found in `/proc/self/maps`.
struct CurVdso {
    areas: [(u32, usize, usize); 4],
    n: usize,
}

fn unmap_all_but(s: &Stage1) -> CurVdso {
    let fd = match sys::openat(sys::AT_FDCWD, b"/proc/self/maps\0", sys::O_RDONLY | sys::O_CLOEXEC, 0) {
        Ok(fd) => fd,
        Err(e) => fail_errno("cannot open /proc/self/maps", e),
    };
    let mut len = 0;
    loop {
        // SAFETY: [maps+len, maps+MAPS_LEN) is writable scratch space in the gap.
        match unsafe { sys::read_raw(fd, s.maps + len, MAPS_LEN - len) } {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(sys::Errno::EINTR) => {}
            Err(e) => fail_errno("cannot read /proc/self/maps", e),
        }
        if len == MAPS_LEN {
            fail("/proc/self/maps of the restorer is too large");
        }
    }
    let _ = sys::close(fd);
    // SAFETY: `len` bytes were just read into the buffer.
    let text = unsafe { core::slice::from_raw_parts(s.maps as *const u8, len) };
    let mut cur = CurVdso { areas: [(0, 0, 0); 4], n: 0 };
    let mut drop: [(usize, usize); 64] = [(0, 0); 64];
    let mut nd = 0;
    for line in text.split(|&b| b == b'\n') {
        let Some((start, n1)) = sys::parse_hex(line) else { continue };
        let Some((end, _)) = line.get(n1 + 1..).and_then(sys::parse_hex) else { continue };
        let (start, end) = (start as usize, end as usize);
        let name = mem::maps_name(line);
        let k = match name {
            b"[vvar]" => 1,
            b"[vvar_vclock]" => 2,
            b"[vdso]" => 3,
            _ => 0,
        };
        if k != 0 {
            if cur.n == 4 {
                fail("too many vDSO areas");
            }
            cur.areas[cur.n] = (k, start, end - start);
            cur.n += 1;
            continue;
        }
        if name == b"[vsyscall]" || (start >= s.gap && end <= s.gap + s.gap_len) {
            continue;
        }
        if nd == drop.len() {
            fail("the restorer has too many mappings to clean up");
        }
        drop[nd] = (start, end - start);
        nd += 1;
    }
    for &(a, l) in &drop[..nd] {
        // SAFETY: these are the restorer's original segments, stack and heap; stage 1 runs in
        // the gap and uses none of them.
        if let Err(e) = unsafe { sys::munmap(a, l) } {
            fail_errno("cannot unmap the restorer's original memory", e);
        }
    }
    cur
}

fn move_vdso(s: &Stage1, want: &VdsoInfo, cur: &CurVdso) {
    if want.count as usize != cur.n {
        fail("this kernel's vDSO layout differs from the checkpointed one");
    }
    let n = cur.n;
    for i in 0..n {
        let w = &want.areas[i];
        let (k, _, l) = cur.areas[i];
        if w.kind != k || w.len as usize != l || w.start as usize - want.areas[0].start as usize != cur.areas[i].1 - cur.areas[0].1 {
            fail("this kernel's vDSO layout differs from the checkpointed one");
        }
    }
    if n == 0 || cur.areas[0].1 == want.areas[0].start as usize {
        return;
    }
    // Via the scratch area, so that source and target never overlap.
    for step in 0..2 {
        for i in 0..n {
            let (_, start, len) = cur.areas[i];
            let off = start - cur.areas[0].1;
            let (from, to) = if step == 0 { (start, s.vdso_tmp + off) } else { (s.vdso_tmp + off, want.areas[i].start as usize) };
            // SAFETY: the source is a vDSO area (or its scratch copy); the target is scratch
            // space in the gap or the vDSO's checkpointed address, which no plan area covers.
            let r = unsafe { sys::mremap(from, len, len, sys::MREMAP_MAYMOVE | sys::MREMAP_FIXED, to) };
            if let Err(e) = r {
                fail_errno("cannot move the vDSO", e);
            }
        }
    }
}

fn map_vma(v: &PlanVma) {
    if v.kind == pk::GUARD {
        return;
    }
    let has_data = v.flags & pvf::HAS_DATA != 0;
    let prot = if has_data { v.prot as i32 | sys::PROT_READ | sys::PROT_WRITE } else { v.prot as i32 };
    let mut flags = sys::MAP_FIXED_NOREPLACE;
    let fd = match v.kind {
        pk::ANON => {
            flags |= sys::MAP_PRIVATE | sys::MAP_ANONYMOUS;
            -1
        }
        pk::FILE_PRIVATE => {
            flags |= sys::MAP_PRIVATE;
            v.fd
        }
        pk::FILE_SHARED => {
            flags |= sys::MAP_SHARED;
            v.fd
        }
        _ => fail("the restore plan has an unknown mapping kind"),
    };
    if v.flags & pvf::GROWSDOWN != 0 {
        flags |= sys::MAP_GROWSDOWN;
    }
    // SAFETY: MAP_FIXED_NOREPLACE never replaces a mapping; the address space holds only the
    // gap and the vDSO, which the plan's areas avoid.
    match unsafe { sys::mmap(v.start as usize, v.len as usize, prot, flags, fd, if fd < 0 { 0 } else { v.offset }) } {
        Ok(a) if a == v.start as usize => {}
        Ok(_) => report::fail_at("a memory area landed at the wrong address", v.start),
        Err(e) => report::fail_at_errno("cannot create the memory area at", v.start, e),
    }
}

fn finish_vma(v: &PlanVma) {
    let (a, l) = (v.start as usize, v.len as usize);
    if v.kind == pk::GUARD {
        // SAFETY: installs guard markers in an area this restorer created; the program had
        // them there (its page data, already read, never covers them).
        if let Err(e) = unsafe { sys::madvise(a, l, sys::MADV_GUARD_INSTALL) } {
            report::fail_at_errno("cannot install the guard pages (MADV_GUARD_INSTALL, Linux 6.13+) at", v.start, e);
        }
        return;
    }
    if v.flags & pvf::HAS_DATA != 0 && v.prot as i32 != (v.prot as i32 | sys::PROT_READ | sys::PROT_WRITE) {
        // SAFETY: sets the checkpointed protection on an area this restorer created.
        if let Err(e) = unsafe { sys::mprotect(a, l, v.prot as i32) } {
            report::fail_at_errno("cannot protect the memory area at", v.start, e);
        }
    }
    for (bit, adv) in [(pvf::DONTFORK, sys::MADV_DONTFORK), (pvf::WIPEONFORK, sys::MADV_WIPEONFORK)] {
        if v.flags & bit != 0 {
            // SAFETY: advice that only affects later forks.
            let _ = unsafe { sys::madvise(a, l, adv) };
        }
    }
}

fn set_mm(s: &Stage1, h: &PlanHeader) {
    // The auxv words go into scratch memory the kernel copies from.
    let auxv = s.args + 1024;
    let words = (h.auxv_words as usize).min(h.auxv.len());
    for (i, w) in h.auxv[..words].iter().enumerate() {
        // SAFETY: [args+1024, args+1024+64*8) is inside the ARGS_LEN scratch area.
        unsafe { ((auxv + i * 8) as *mut u64).write(*w) };
    }
    let m = sys::PrctlMmMap {
        start_code: h.mm.start_code,
        end_code: h.mm.end_code,
        start_data: h.mm.start_data,
        end_data: h.mm.end_data,
        start_brk: h.mm.start_brk,
        brk: h.mm.brk,
        start_stack: h.mm.start_stack,
        arg_start: h.mm.arg_start,
        arg_end: h.mm.arg_end,
        env_start: h.mm.env_start,
        env_end: h.mm.env_end,
        auxv: if words > 0 { auxv as u64 } else { 0 },
        auxv_size: (words * 8) as u32,
        exe_fd: u32::MAX,
    };
    // SAFETY: `m` is a complete prctl_mm_map; the kernel copies it and the auxv words.
    let r = unsafe {
        sys::prctl(sys::PR_SET_MM, sys::PR_SET_MM_MAP, &m as *const sys::PrctlMmMap as usize, core::mem::size_of::<sys::PrctlMmMap>(), 0)
    };
    if let Err(e) = r {
        fail_errno("prctl(PR_SET_MM_MAP) refused the checkpointed memory layout", e);
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    fail("internal error (panic)")
}

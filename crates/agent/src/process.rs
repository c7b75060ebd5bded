//! Process-wide state: what the image records about the process, and the kernel state the
//! restart must put back (signal actions, limits, timers, umask, working directory).

use crate::global::*;
use core::sync::atomic::Ordering;
use limitless_image::format::*;
use limitless_image::wire::fixed;
use limitless_sys as sys;

/// Reads a small /proc file into `buf`; returns the length.
pub fn read_file(path: &[u8], buf: &mut [u8]) -> usize {
    let Ok(fd) = sys::openat(sys::AT_FDCWD, path, sys::O_RDONLY | sys::O_CLOEXEC, 0) else { return 0 };
    let mut n = 0;
    while n < buf.len() {
        match sys::read(fd, &mut buf[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    let _ = sys::close(fd);
    n
}

/// The number after `key` (e.g. `b"TracerPid:"`) in a small `key: value` /proc file.
pub fn proc_field(path: &[u8], key: &[u8]) -> Option<u64> {
    let mut b = [0u8; 4096];
    let n = read_file(path, &mut b);
    let text = &b[..n];
    let i = text.windows(key.len()).position(|w| w == key)?;
    let rest = &text[i + key.len()..];
    let j = rest.iter().position(|&c| c != b' ' && c != b'\t')?;
    sys::parse_u64(&rest[j..]).map(|(v, _)| v)
}

/// Whether any swap space holds pages (then `mincore` does not see every page of shared
/// memory).
pub fn swap_in_use() -> bool {
    let total = proc_field(b"/proc/meminfo\0", b"SwapTotal:").unwrap_or(0);
    let free = proc_field(b"/proc/meminfo\0", b"SwapFree:").unwrap_or(0);
    total > free
}

/// Builds `/proc/self/task/<tid>/<leaf>` (NUL-terminated) in `buf`; returns it.
pub fn task_path<'a>(tid: i32, leaf: &[u8], buf: &'a mut [u8; 64]) -> &'a [u8] {
    let pre = b"/proc/self/task/";
    buf[..pre.len()].copy_from_slice(pre);
    let mut n = pre.len();
    let mut d = [0u8; 20];
    let ds = sys::fmt_u64(tid as u64, &mut d);
    buf[n..n + ds.len()].copy_from_slice(ds);
    n += ds.len();
    buf[n] = b'/';
    n += 1;
    let k = leaf.len().min(buf.len() - n - 1);
    buf[n..n + k].copy_from_slice(&leaf[..k]);
    n += k;
    buf[n] = 0;
    &buf[..n + 1]
}

/// Saves the kernel state that the restart puts back.
pub fn save_kernel_state(sv: &mut Saved) {
    for s in 1..=64 {
        let mut a = sys::KSigaction::default();
        // SAFETY: reading an action does not change it.
        if unsafe { sys::rt_sigaction(s, None, Some(&mut a)) }.is_ok() {
            sv.sigactions[s as usize] = a;
        }
    }
    for (i, r) in sv.rlimits.iter_mut().enumerate() {
        let _ = sys::prlimit(i as i32, None, Some(r));
    }
    for (i, t) in sv.itimers.iter_mut().enumerate() {
        let _ = sys::getitimer(i as i32, t);
    }
    let old = sys::umask(0o022);
    sys::umask(old);
    sv.umask = old;
    sv.cwd_len = match sys::getcwd(&mut sv.cwd) {
        Ok(n) if n > 0 => n - 1,
        _ => 0,
    };
}

/// Fills the process record; `exe` receives the executable's path.
pub fn describe(sv: &Saved, p: &mut ProcessInfo, exe: &mut [u8]) {
    p.pid = sys::getpid() as u32;
    // SAFETY: no arguments.
    p.uid = unsafe { sys::syscall6(102, 0, 0, 0, 0, 0, 0) } as u32;
    // SAFETY: no arguments.
    p.gid = unsafe { sys::syscall6(104, 0, 0, 0, 0, 0, 0) } as u32;
    p.page_size = PAGE as u32;
    let mut u =
        sys::Utsname { sysname: [0; 65], nodename: [0; 65], release: [0; 65], version: [0; 65], machine: [0; 65], domainname: [0; 65] };
    let _ = sys::uname(&mut u);
    p.kernel_release = fixed(limitless_image::wire::unfixed(&u.release));
    p.glibc_version = sv.glibc_version;
    p.agent_version = crate::AGENT_VERSION;
    p.ctl_fd = CTL_FD.load(Ordering::Relaxed);
    p.sig_ckpt = SIG.load(Ordering::Relaxed) as u32;
    p.cpu = limitless_image::cpu::current();
    p.mm = mm_fields();
    let mut auxv = [0u8; AUXV_WORDS * 8];
    let n = read_file(b"/proc/self/auxv\0", &mut auxv) / 8;
    // Keep whole (type, value) pairs, up to and including AT_NULL.
    let mut words = 0;
    while words + 1 < n.min(AUXV_WORDS) {
        let t = u64::from_ne_bytes(auxv[words * 8..words * 8 + 8].try_into().unwrap_or([0; 8]));
        p.auxv[words] = t;
        p.auxv[words + 1] = u64::from_ne_bytes(auxv[words * 8 + 8..words * 8 + 16].try_into().unwrap_or([0; 8]));
        words += 2;
        if t == 0 {
            break;
        }
    }
    p.auxv_words = words as u32;
    p.umask = sv.umask;
    p.personality = sys::personality(0xffff_ffff).unwrap_or(0);
    for s in 1..=64usize {
        let a = sv.sigactions[s];
        p.sigactions[s - 1] = SigactionW { handler: a.handler, flags: a.flags, restorer: a.restorer, mask: a.mask };
    }
    for (i, r) in sv.rlimits.iter().enumerate() {
        p.rlimits[i] = RlimitW { cur: r.cur, max: r.max };
    }
    for (i, t) in sv.itimers.iter().enumerate() {
        p.itimers[i] = ItimerW {
            interval_usec: (t.interval_sec as u64) * 1_000_000 + t.interval_usec as u64,
            value_usec: (t.value_sec as u64) * 1_000_000 + t.value_usec as u64,
        };
    }
    let ns = |c| {
        let t = sys::clock_gettime(c);
        t.sec as u64 * 1_000_000_000 + t.nsec as u64
    };
    p.realtime_ns = ns(sys::CLOCK_REALTIME);
    p.monotonic_ns = ns(sys::CLOCK_MONOTONIC);
    p.boottime_ns = ns(sys::CLOCK_BOOTTIME);
    p.generation = GENERATION.load(Ordering::Relaxed);
    p.restores = RESTORES.load(Ordering::Relaxed);
    p.restart_entry = crate::restart::entry_address();
    p.agent_state = SAVED.ptr() as u64;
    p.cwd_len = sv.cwd_len as u32;
    p.exe_len = match sys::readlinkat(sys::AT_FDCWD, b"/proc/self/exe\0", exe) {
        Ok(n) => n as u32,
        Err(_) => 0,
    };
}

/// The memory-layout fields from `/proc/self/stat` (fields 26-28 and 45-51) and the
/// current program break.
fn mm_fields() -> MmInfo {
    let mut buf = [0u8; 2048];
    let n = read_file(b"/proc/self/stat\0", &mut buf);
    let mut f = [0u64; 53];
    if let Some(close) = buf[..n].iter().rposition(|&c| c == b')') {
        // Field 3 (state) starts two bytes after the ')'.
        let mut idx = 3;
        for tok in buf[close + 2..n].split(|&c| c == b' ' || c == b'\n') {
            if tok.is_empty() {
                continue;
            }
            if idx < f.len() {
                f[idx] = sys::parse_u64(tok).map_or(0, |v| v.0);
            }
            idx += 1;
        }
    }
    // SAFETY: brk(0) only reports the current break.
    let brk = unsafe { sys::syscall6(12, 0, 0, 0, 0, 0, 0) } as u64;
    MmInfo {
        start_code: f[26],
        end_code: f[27],
        start_stack: f[28],
        start_data: f[45],
        end_data: f[46],
        start_brk: f[47],
        brk,
        arg_start: f[48],
        arg_end: f[49],
        env_start: f[50],
        env_end: f[51],
    }
}

/// Puts back process-wide kernel state after a restart.
pub fn restore_kernel_state(sv: &Saved) {
    for s in 1..=64 {
        if s == sys::SIGKILL || s == sys::SIGSTOP {
            continue;
        }
        let a = sv.sigactions[s as usize];
        // SAFETY: these are the program's own actions as saved at the checkpoint; the
        // handlers are in restored memory at the same addresses.
        let _ = unsafe { sys::rt_sigaction(s, Some(&a), None) };
    }
    for (i, r) in sv.rlimits.iter().enumerate() {
        // Only soft limits can be restored without privileges where the new hard limit is
        // lower; keep the current hard limit in that case.
        let mut cur = sys::Rlimit::default();
        if sys::prlimit(i as i32, None, Some(&mut cur)).is_ok() && *r != cur && sys::prlimit(i as i32, Some(r), None).is_err() {
            let soft = sys::Rlimit { cur: r.cur.min(cur.max), max: cur.max };
            let _ = sys::prlimit(i as i32, Some(&soft), None);
        }
    }
    for (i, t) in sv.itimers.iter().enumerate() {
        if t.value_sec != 0 || t.value_usec != 0 {
            let _ = sys::setitimer(i as i32, t);
        }
    }
    sys::umask(sv.umask);
    if sv.cwd_len > 0 && sv.cwd_len < sv.cwd.len() {
        let mut buf = [0u8; crate::maps::PATH_BUF];
        if let Some(p) = crate::maps::c_path(&sv.cwd[..sv.cwd_len], &mut buf) {
            let _ = sys::chdir(p);
        }
    }
    for fd in 0..MAX_FD {
        if sv.cloexec[fd / 64] & (1 << (fd % 64)) != 0 {
            let _ = sys::fcntl(fd as i32, sys::F_SETFD, sys::FD_CLOEXEC as usize);
        }
    }
}

//! Failure reports: one line on the plan's error fd, then `exit_group`.
//!
//! No formatting machinery: messages are static strings plus a number.

use core::sync::atomic::{AtomicI32, Ordering};
use limitless_image::plan::RESTORER_FAILED;
use limitless_sys as sys;

static ERR_FD: AtomicI32 = AtomicI32::new(2);

/// Where failure reports go from now on.
pub fn set_err_fd(fd: i32) {
    if fd >= 0 {
        ERR_FD.store(fd, Ordering::Relaxed);
    }
}

fn emit(parts: &[&[u8]]) -> ! {
    let fd = ERR_FD.load(Ordering::Relaxed);
    let mut line = [0u8; 512];
    let mut n = 0;
    for p in core::iter::once(&b"restorer: "[..]).chain(parts.iter().copied()).chain(core::iter::once(&b"\n"[..])) {
        let k = p.len().min(line.len() - n);
        line[n..n + k].copy_from_slice(&p[..k]);
        n += k;
    }
    let _ = sys::write_all(fd, &line[..n]);
    sys::exit_group(RESTORER_FAILED)
}

/// Reports `msg` and exits.
pub fn fail(msg: &str) -> ! {
    emit(&[msg.as_bytes()])
}

/// Reports `msg` with an errno and exits.
pub fn fail_errno(msg: &str, e: sys::Errno) -> ! {
    let mut b = [0u8; 20];
    let n = sys::fmt_u64(e.0 as u64, &mut b);
    emit(&[msg.as_bytes(), b" (errno ", n, b")"])
}

/// Reports `msg` about an address and exits.
pub fn fail_at(msg: &str, addr: u64) -> ! {
    let mut h = [0u8; 16];
    let a = sys::fmt_hex(addr, &mut h);
    emit(&[msg.as_bytes(), b" 0x", a])
}

/// Reports `msg` about an address with an errno and exits.
pub fn fail_at_errno(msg: &str, addr: u64, e: sys::Errno) -> ! {
    let mut h = [0u8; 16];
    let a = sys::fmt_hex(addr, &mut h);
    let mut b = [0u8; 20];
    let n = sys::fmt_u64(e.0 as u64, &mut b);
    emit(&[msg.as_bytes(), b" 0x", a, b" (errno ", n, b")"])
}

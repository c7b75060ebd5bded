//! The agent's side of the control socket: fixed-size packets, optionally with one fd.

use crate::global::CTL_FD;
use core::sync::atomic::{AtomicU32, Ordering};
use limitless_image::ctl::{self, CtlHeader, MAX_PACKET};
use limitless_sys as sys;

static SEQ: AtomicU32 = AtomicU32::new(1);

/// Sends one packet.
pub fn send(kind: u16, payload: &[u8]) -> sys::Result<()> {
    let mut p = [0u8; 256 + CtlHeader::SIZE];
    let body = &payload[..payload.len().min(256)];
    let n = ctl::encode(kind, SEQ.fetch_add(1, Ordering::Relaxed), body, &mut p).ok_or(sys::Errno::EINVAL)?;
    let fd = CTL_FD.load(Ordering::Relaxed);
    let iov = [sys::Iovec { base: p.as_ptr() as usize, len: n }];
    let msg =
        sys::Msghdr { name: 0, namelen: 0, pad: 0, iov: iov.as_ptr(), iovlen: 1, control: core::ptr::null_mut(), controllen: 0, flags: 0 };
    loop {
        // SAFETY: `msg` describes `p`, which lives for the call.
        match unsafe { sys::sendmsg(fd, &msg, sys::MSG_NOSIGNAL) } {
            Err(sys::Errno::EINTR) => continue,
            r => return r.map(|_| ()),
        }
    }
}

/// Sends a payload structure.
pub fn send_wire<T: limitless_image::wire::Wire>(kind: u16, v: &T) -> sys::Result<()> {
    let mut b = [0u8; 128];
    if T::SIZE > b.len() {
        return Err(sys::Errno::EINVAL);
    }
    v.put(&mut b);
    send(kind, &b[..T::SIZE])
}

/// Sends a text message (`FAILED`), truncated to fit a packet.
pub fn send_text(kind: u16, parts: &[&[u8]]) {
    let mut b = [0u8; 256];
    let mut n = 0;
    for p in parts {
        let k = p.len().min(b.len() - n);
        b[n..n + k].copy_from_slice(&p[..k]);
        n += k;
    }
    let _ = send(kind, &b[..n]);
}

/// A received packet.
pub struct Packet {
    pub kind: u16,
    pub len: usize,
    pub body: [u8; 256],
    /// An fd that came with it (-1: none).
    pub fd: i32,
}

/// Waits for the next packet. `Ok(None)` means the supervisor closed the socket.
pub fn recv() -> sys::Result<Option<Packet>> {
    let mut buf = [0u8; MAX_PACKET];
    let mut cmsg = [0u64; 8];
    let fd = CTL_FD.load(Ordering::Relaxed);
    loop {
        let iov = [sys::Iovec { base: buf.as_mut_ptr() as usize, len: buf.len() }];
        let mut msg = sys::Msghdr {
            name: 0,
            namelen: 0,
            pad: 0,
            iov: iov.as_ptr(),
            iovlen: 1,
            control: cmsg.as_mut_ptr() as *mut u8,
            controllen: core::mem::size_of_val(&cmsg),
            flags: 0,
        };
        // SAFETY: `msg` describes `buf` and `cmsg`, which live for the call.
        let n = match unsafe { sys::recvmsg(fd, &mut msg, sys::MSG_CMSG_CLOEXEC) } {
            Ok(0) => return Ok(None),
            Ok(n) => n,
            Err(sys::Errno::EINTR) => continue,
            Err(e) => return Err(e),
        };
        let mut got_fd = -1;
        if msg.controllen >= 20 {
            // struct cmsghdr { u64 len; i32 level; i32 type; } then the data.
            let c = &cmsg;
            let level = c[1] as u32 as i32;
            let ty = (c[1] >> 32) as u32 as i32;
            if level == sys::SOL_SOCKET && ty == sys::SCM_RIGHTS && c[0] >= 20 {
                got_fd = c[2] as u32 as i32;
            }
        }
        let Some((h, body)) = ctl::decode(&buf[..n]) else {
            if got_fd >= 0 {
                let _ = sys::close(got_fd);
            }
            continue;
        };
        let mut p = Packet { kind: h.kind, len: body.len().min(256), body: [0; 256], fd: got_fd };
        p.body[..p.len].copy_from_slice(&body[..p.len]);
        return Ok(Some(p));
    }
}

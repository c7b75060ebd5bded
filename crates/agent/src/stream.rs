//! Writes the agent's record stream to the fd the supervisor passed: small records through
//! a buffer, page data straight from the program's memory with `writev`, or by reference
//! with `vmsplice` where the memory stays as it is until the supervisor has read it.

use limitless_image::format::{PagesHeader, RecordHeader};
use limitless_image::wire::Wire;
use limitless_sys as sys;

/// A buffered writer of records.
pub struct Out<'a> {
    fd: i32,
    buf: &'a mut [u8],
    len: usize,
    pub bytes: u64,
    pub records: u64,
    /// Whether page data may still go by reference (`vmsplice`): until a call fails (the
    /// fd is not a pipe, a system call filter, pages it cannot take).
    splice: bool,
}

impl<'a> Out<'a> {
    pub fn new(fd: i32, buf: &'a mut [u8]) -> Self {
        Out { fd, buf, len: 0, bytes: 0, records: 0, splice: true }
    }

    fn put(&mut self, mut b: &[u8]) -> sys::Result<()> {
        while !b.is_empty() {
            if self.len == self.buf.len() {
                self.flush()?;
            }
            let k = b.len().min(self.buf.len() - self.len);
            self.buf[self.len..self.len + k].copy_from_slice(&b[..k]);
            self.len += k;
            b = &b[k..];
        }
        Ok(())
    }

    /// Writes out the buffer.
    pub fn flush(&mut self) -> sys::Result<()> {
        sys::write_all(self.fd, &self.buf[..self.len])?;
        self.bytes += self.len as u64;
        self.len = 0;
        Ok(())
    }

    /// Appends a record whose payload is the concatenation of `parts`.
    pub fn record(&mut self, kind: u32, parts: &[&[u8]]) -> sys::Result<()> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let h = RecordHeader { kind, flags: 0, stored_len: total as u64, raw_len: total as u64, reserved: 0 };
        let mut hb = [0u8; RecordHeader::SIZE];
        h.put(&mut hb);
        self.put(&hb)?;
        for p in parts {
            self.put(p)?;
        }
        self.records += 1;
        Ok(())
    }

    /// Appends a record made of one wire structure and an optional byte tail.
    /// Appends a record of `v`, then `tail`, then each of `items` encoded.
    pub fn wire_items<T: Wire, I: Wire>(&mut self, kind: u32, v: &T, tail: &[u8], items: &[I]) -> sys::Result<()> {
        let mut b = [0u8; 4096];
        if T::SIZE > b.len() || I::SIZE > b.len() {
            return Err(sys::Errno::EINVAL);
        }
        let total = T::SIZE + tail.len() + items.len() * I::SIZE;
        let h = RecordHeader { kind, flags: 0, stored_len: total as u64, raw_len: total as u64, reserved: 0 };
        h.put(&mut b);
        self.put(&b[..RecordHeader::SIZE])?;
        v.put(&mut b);
        self.put(&b[..T::SIZE])?;
        self.put(tail)?;
        for it in items {
            it.put(&mut b);
            self.put(&b[..I::SIZE])?;
        }
        self.records += 1;
        Ok(())
    }

    pub fn wire<T: Wire>(&mut self, kind: u32, v: &T, tail: &[u8]) -> sys::Result<()> {
        let mut b = [0u8; 4096];
        if T::SIZE > b.len() {
            return Err(sys::Errno::EINVAL);
        }
        v.put(&mut b);
        self.record(kind, &[&b[..T::SIZE], tail])
    }

    /// Appends a page window unchanged since the parent image: a `PAGES` record with the
    /// `REF` flag and only its header (`raw_len` is the size of the record it stands for).
    pub fn unchanged(&mut self, h: &PagesHeader) -> sys::Result<()> {
        let rh = RecordHeader {
            kind: limitless_image::format::kind::PAGES,
            flags: limitless_image::format::rflags::REF,
            stored_len: PagesHeader::SIZE as u64,
            raw_len: PagesHeader::SIZE as u64 + h.count as u64 * limitless_image::format::PAGE,
            reserved: 0,
        };
        let mut hb = [0u8; RecordHeader::SIZE + PagesHeader::SIZE];
        rh.put(&mut hb);
        h.put(&mut hb[RecordHeader::SIZE..]);
        self.put(&hb)?;
        self.records += 1;
        Ok(())
    }

    /// Appends a `PAGES` record whose data comes from `runs` (address, length) of memory.
    /// With `by_reference` the pages go into the pipe by reference (`vmsplice`) rather than
    /// copied, and the supervisor's read copies them: one copy of every page less, which
    /// was about a sixth of a checkpoint's CPU time.
    ///
    /// # Safety
    /// Every run must be readable memory of this process. With `by_reference`, it must also
    /// stay as it is until the supervisor has read it: the program's private memory while
    /// it stays frozen until the image is durable, or the snapshot child's (the kernel
    /// copies a page the running program writes, since the pipe holds a reference to it);
    /// never a buffer that is reused, nor shared memory the running program can write.
    pub unsafe fn pages(&mut self, h: &PagesHeader, runs: &[(usize, usize)], by_reference: bool) -> sys::Result<()> {
        self.flush()?;
        let data: usize = runs.iter().map(|r| r.1).sum();
        let rh = RecordHeader {
            kind: limitless_image::format::kind::PAGES,
            flags: 0,
            stored_len: (PagesHeader::SIZE + data) as u64,
            raw_len: (PagesHeader::SIZE + data) as u64,
            reserved: 0,
        };
        let mut hb = [0u8; RecordHeader::SIZE + PagesHeader::SIZE];
        rh.put(&mut hb);
        h.put(&mut hb[RecordHeader::SIZE..]);
        let mut iov = [sys::Iovec { base: 0, len: 0 }; 160];
        iov[0] = sys::Iovec { base: hb.as_ptr() as usize, len: hb.len() };
        let mut n = 1;
        for &(a, l) in runs {
            if n == iov.len() {
                return Err(sys::Errno::EINVAL);
            }
            iov[n] = sys::Iovec { base: a, len: l };
            n += 1;
        }
        let mut at = 0;
        if by_reference && self.splice {
            // The header lives on this stack: copied.
            sys::write_all(self.fd, &hb)?;
            at = 1;
            // SAFETY: the caller guarantees the runs are readable and stay unchanged.
            if unsafe { put_iov(self.fd, &mut iov[..n], &mut at, true) }.is_err() {
                // Copy the rest, and from now on; a lasting error shows there again.
                self.splice = false;
            }
        }
        // SAFETY: the caller guarantees the runs are readable; the header lives on our stack.
        unsafe { put_iov(self.fd, &mut iov[..n], &mut at, false)? };
        self.bytes += (hb.len() + data) as u64;
        self.records += 1;
        Ok(())
    }
}

/// Writes `iov[*at..]` with `writev`, or with `vmsplice` if `splice`, until everything is
/// written; `*at` and the iovec it names then tell what is left, also after an error.
///
/// # Safety
/// Every iovec must describe readable memory (and, with `splice`, memory that does not
/// change until the pipe is read).
unsafe fn put_iov(fd: i32, iov: &mut [sys::Iovec], at: &mut usize, splice: bool) -> sys::Result<()> {
    while *at < iov.len() {
        let rest = &iov[*at..];
        // SAFETY: forwarded to the caller.
        let r = unsafe {
            if splice {
                sys::vmsplice(fd, rest, 0)
            } else {
                sys::writev(fd, rest)
            }
        };
        let mut done = match r {
            Ok(0) => return Err(sys::Errno::EIO),
            Ok(n) => n,
            Err(sys::Errno::EINTR) => continue,
            Err(e) => return Err(e),
        };
        while *at < iov.len() && done >= iov[*at].len {
            done -= iov[*at].len;
            *at += 1;
        }
        if done > 0 {
            iov[*at].base += done;
            iov[*at].len -= done;
        }
    }
    Ok(())
}

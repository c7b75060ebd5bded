//! Memory for one checkpoint: a private mapping the agent reserves before it reads the
//! memory map, hands out in pieces, and unmaps afterwards. It is never part of an image
//! (the memory scan cuts it out), and it keeps the agent off the program's allocator.

use limitless_sys as sys;

/// A bump allocator over one `MAP_NORESERVE` mapping.
pub struct Scratch {
    pub base: usize,
    pub len: usize,
    used: usize,
}

impl Scratch {
    /// Reserves `len` bytes (only pages actually used take memory).
    pub fn new(len: usize) -> sys::Result<Scratch> {
        let len = (len + 4095) & !4095;
        // SAFETY: a fresh private anonymous mapping at an address the kernel chooses.
        let base = unsafe {
            sys::mmap(0, len, sys::PROT_READ | sys::PROT_WRITE, sys::MAP_PRIVATE | sys::MAP_ANONYMOUS | sys::MAP_NORESERVE, -1, 0)?
        };
        Ok(Scratch { base, len, used: 0 })
    }

    /// A zeroed array of `n` values of `T` (`T` must be valid when all-zero).
    pub fn array<T: Copy>(&mut self, n: usize) -> Option<&'static mut [T]> {
        let align = core::mem::align_of::<T>().max(16);
        let start = (self.base + self.used + align - 1) & !(align - 1);
        let bytes = n.checked_mul(core::mem::size_of::<T>())?;
        let end = start.checked_add(bytes)?;
        if end > self.base + self.len {
            return None;
        }
        self.used = end - self.base;
        // SAFETY: [start, end) is inside this mapping, aligned for T, zero-filled by the
        // kernel and handed out once; the types used here are plain data valid when zero.
        Some(unsafe { core::slice::from_raw_parts_mut(start as *mut T, n) })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // SAFETY: the slices handed out do not outlive the checkpoint that owns `self`.
        let _ = unsafe { sys::munmap(self.base, self.len) };
    }
}

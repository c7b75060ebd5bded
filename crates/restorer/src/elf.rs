//! The restorer's view of its own ELF image: where it is loaded, how long it is, and its
//! relocations, which it applies itself (a static PIE has no dynamic loader to do it).
//!
//! Only `R_X86_64_RELATIVE` relocations are handled; `build.rs` checks at build time that
//! the linked restorer has no other kind, no interpreter and no TLS.

use core::arch::asm;

const DT_NULL: i64 = 0;
const DT_RELA: i64 = 7;
const DT_RELASZ: i64 = 8;
const DT_RELAENT: i64 = 9;
const R_X86_64_RELATIVE: u64 = 8;
const PT_LOAD: u32 = 1;
const PF_X: u32 = 1;

/// Address of this program's ELF header (its load base: the restorer is linked at 0).
#[inline(always)]
pub fn image_base() -> usize {
    let r: usize;
    // SAFETY: a RIP-relative `lea` of a linker-defined symbol; reads no memory.
    unsafe { asm!("lea {}, [rip + __ehdr_start]", out(reg) r, options(nostack, pure, nomem)) };
    r
}

/// Address of this program's `_DYNAMIC` array.
#[inline(always)]
fn dynamic() -> usize {
    let r: usize;
    // SAFETY: as above.
    unsafe { asm!("lea {}, [rip + _DYNAMIC]", out(reg) r, options(nostack, pure, nomem)) };
    r
}

/// Applies this program's relocations, read from the image loaded at `base`, to a copy of
/// it at `target` (which may be `base` itself).
///
/// Runs before relocation, so it only uses locals and RIP-relative addresses.
///
/// # Safety
/// `[target, target + image_len)` must be a writable copy of the image at `base`.
#[inline(always)]
pub unsafe fn relocate(base: usize, target: usize) {
    let mut d = dynamic();
    let (mut rela, mut relasz, mut relaent) = (0usize, 0usize, 24usize);
    loop {
        // SAFETY: `_DYNAMIC` is an array of (tag, value) pairs ending with DT_NULL.
        let (tag, val) = unsafe { (*(d as *const i64), *((d + 8) as *const usize)) };
        match tag {
            DT_NULL => break,
            DT_RELA => rela = val,
            DT_RELASZ => relasz = val,
            DT_RELAENT => relaent = val,
            _ => {}
        }
        d += 16;
    }
    if rela == 0 || relaent == 0 {
        return;
    }
    let mut off = 0;
    while off < relasz {
        let r = base + rela + off;
        // SAFETY: each entry of the RELA table is (offset, info, addend), 24 bytes.
        let (r_offset, r_info, r_addend) = unsafe { (*(r as *const usize), *((r + 8) as *const u64), *((r + 16) as *const usize)) };
        if r_info & 0xffff_ffff == R_X86_64_RELATIVE {
            // SAFETY: the linker put the relocated word inside the image; the caller gave a
            // writable copy of it at `target`.
            unsafe { *((target + r_offset) as *mut usize) = target.wrapping_add(r_addend) };
        }
        off += relaent;
    }
}

fn phdrs(base: usize) -> (usize, usize) {
    // SAFETY: the ELF header is mapped at `base` (it is in the first loaded segment).
    unsafe {
        let phoff = *((base + 0x20) as *const u64) as usize;
        let phnum = *((base + 0x38) as *const u16) as usize;
        (base + phoff, phnum)
    }
}

/// One loaded segment: (virtual address, memory size, flags).
fn load_segment(ph: usize) -> Option<(usize, usize, u32)> {
    // SAFETY: `ph` points at a 56-byte program header inside the mapped ELF header page.
    unsafe {
        if *(ph as *const u32) != PT_LOAD {
            return None;
        }
        let flags = *((ph + 4) as *const u32);
        let vaddr = *((ph + 16) as *const u64) as usize;
        let memsz = *((ph + 40) as *const u64) as usize;
        Some((vaddr, memsz, flags))
    }
}

/// Length of the loaded image (end of the last segment, page aligned).
pub fn image_len(base: usize) -> usize {
    let (ph, n) = phdrs(base);
    let mut end = 0;
    for i in 0..n {
        if let Some((va, sz, _)) = load_segment(ph + i * 56) {
            end = end.max(va + sz);
        }
    }
    (end + 4095) & !4095
}

/// Makes the code segments of the copy at `target` executable (and read-only).
///
/// # Safety
/// `target` must hold a relocated copy of the image at `base`.
pub unsafe fn protect_text(base: usize, target: usize) {
    let (ph, n) = phdrs(base);
    for i in 0..n {
        if let Some((va, sz, fl)) = load_segment(ph + i * 56) {
            if fl & PF_X != 0 {
                let s = va & !4095;
                let e = (va + sz + 4095) & !4095;
                // SAFETY: the range is the copy's code segment, which nothing writes.
                if let Err(e) = unsafe { limitless_sys::mprotect(target + s, e - s, limitless_sys::PROT_READ | limitless_sys::PROT_EXEC) } {
                    crate::report::fail_errno("cannot make the restorer's copy executable", e);
                }
            }
        }
    }
}

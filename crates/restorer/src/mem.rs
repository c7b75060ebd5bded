//! Memory primitives: the C symbols the compiler may call (`memcpy`, `memset`, ...), which
//! a libc-free program must provide itself, and small helpers.

use core::arch::asm;

/// `memcpy`.
///
/// # Safety
/// As for C `memcpy`.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: `rep movsb` copies n bytes forward; the caller guarantees valid ranges.
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _, options(nostack, preserves_flags));
    }
    dst
}

/// `memmove`.
///
/// # Safety
/// As for C `memmove`.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize) + n {
        // SAFETY: a forward copy is correct when dst is below src or the ranges are disjoint.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: a backward copy (direction flag set, restored after) handles dst above src.
    unsafe {
        asm!(
            "std",
            "rep movsb",
            "cld",
            inout("rcx") n => _,
            inout("rdi") dst.add(n).wrapping_sub(1) => _,
            inout("rsi") src.add(n).wrapping_sub(1) => _,
            options(nostack),
        );
    }
    dst
}

/// `memset`.
///
/// # Safety
/// As for C `memset`.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: `rep stosb` writes n bytes; the caller guarantees the range is valid.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8, options(nostack, preserves_flags));
    }
    dst
}

/// `memcmp`.
///
/// # Safety
/// As for C `memcmp`.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n and the caller guarantees n readable bytes on both sides.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

/// `bcmp`.
///
/// # Safety
/// As for C `bcmp`.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: forwarded.
    unsafe { memcmp(a, b, n) }
}

/// Copies `n` bytes between raw addresses.
///
/// # Safety
/// Both ranges must be valid and must not overlap.
pub unsafe fn copy(dst: usize, src: usize, n: usize) {
    // SAFETY: forwarded to the caller.
    unsafe { memcpy(dst as *mut u8, src as *const u8, n) };
}

/// The bytes of a NUL-terminated string.
///
/// # Safety
/// `p` must point at a NUL-terminated string that outlives the result.
pub unsafe fn cstr<'a>(p: *const u8) -> &'a [u8] {
    // SAFETY: forwarded to the caller.
    let n = unsafe { strlen(p) };
    // SAFETY: the n bytes before the NUL are readable.
    unsafe { core::slice::from_raw_parts(p, n) }
}

/// The name field (sixth column) of a `/proc/self/maps` line.
pub fn maps_name(line: &[u8]) -> &[u8] {
    let mut fields = 0;
    let mut i = 0;
    while i < line.len() && fields < 5 {
        while i < line.len() && line[i] != b' ' {
            i += 1;
        }
        while i < line.len() && line[i] == b' ' {
            i += 1;
        }
        fields += 1;
    }
    &line[i..]
}

/// `strlen` (the compiler turns NUL-scanning loops into calls to it).
///
/// # Safety
/// As for C `strlen`.
#[no_mangle]
pub unsafe extern "C" fn strlen(s: *const u8) -> usize {
    let mut n = 0;
    // SAFETY: the caller guarantees a NUL-terminated string. The volatile read keeps the
    // compiler from turning this loop back into a call to `strlen`.
    while unsafe { core::ptr::read_volatile(s.add(n)) } != 0 {
        n += 1;
    }
    n
}

//! XXH3-128 (the seedless variant with the default secret), the checksum of page records.
//!
//! The hashes are exactly those of `xxhash_rust::xxh3::xxh3_128`, which this module calls
//! for inputs of up to 240 bytes and on CPUs without AVX-512. That crate picks its vector
//! code when it is compiled, and our binaries are built for every x86-64 CPU, so they get
//! its SSE2 loop. Page records are long (4 KiB and more), and on a CPU with AVX-512F the
//! long-input loop here does each 64-byte stripe in one 512-bit step instead: 1.9x the
//! rate in a microbenchmark on this project's machine (256 MiB in 9.1 ms against 17.6 ms),
//! where the checksum is about a sixth of a restore's time. Written from the XXH3
//! specification (`doc/xxhash_spec.md` of the xxHash project): its accumulate and scramble
//! steps, the default secret and the 128-bit merge.

/// The default secret of XXH3 (192 bytes), from the specification.
const SECRET: [u8; 192] = [
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c, 0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90,
    0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f, 0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d,
    0xcc, 0xff, 0x72, 0x21, 0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c, 0x3c, 0x28,
    0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3, 0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e,
    0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8, 0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b,
    0x4f, 0x1d, 0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64, 0xea, 0xc5, 0xac, 0x83,
    0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb, 0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16,
    0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e, 0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
];

const P32_1: u64 = 0x9E37_79B1;
const P32_2: u64 = 0x85EB_CA77;
const P32_3: u64 = 0xC2B2_AE3D;
const P64_1: u64 = 0x9E37_79B1_85EB_CA87;
const P64_2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P64_3: u64 = 0x1656_67B1_9E37_79F9;
const P64_4: u64 = 0x85EB_CA77_C2B2_AE63;
const P64_5: u64 = 0x27D4_EB2F_1656_67C5;

/// Inputs up to this long take XXH3's short paths (left to the crate).
const MIDSIZE_MAX: usize = 240;
const STRIPE: usize = 64;
/// Stripes per block: (secret length - stripe) / 8.
const STRIPES_PER_BLOCK: usize = (SECRET.len() - STRIPE) / 8;
const BLOCK: usize = STRIPE * STRIPES_PER_BLOCK;

/// XXH3-128 of `data`, identical to `xxhash_rust::xxh3::xxh3_128`.
pub fn xxh3_128(data: &[u8]) -> u128 {
    #[cfg(target_arch = "x86_64")]
    if data.len() > MIDSIZE_MAX && avx512::available() {
        // SAFETY: the CPU has AVX-512F and the kernel saves its registers (checked).
        return unsafe { avx512::long(data) };
    }
    xxhash_rust::xxh3::xxh3_128(data)
}

fn read64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

fn avalanche(mut h: u64) -> u64 {
    h ^= h >> 37;
    h = h.wrapping_mul(0x1656_6791_9E37_79F9);
    h ^ (h >> 32)
}

fn mul_fold(a: u64, b: u64) -> u64 {
    let p = a as u128 * b as u128;
    p as u64 ^ (p >> 64) as u64
}

fn merge(acc: &[u64; 8], secret_at: usize, start: u64) -> u64 {
    let mut r = start;
    for i in 0..4 {
        let s = secret_at + 16 * i;
        r = r.wrapping_add(mul_fold(acc[2 * i] ^ read64(&SECRET, s), acc[2 * i + 1] ^ read64(&SECRET, s + 8)));
    }
    avalanche(r)
}

/// The 128-bit result from the accumulators of an input of `len` bytes.
fn finish(acc: &[u64; 8], len: usize) -> u128 {
    let len = len as u64;
    let low = merge(acc, 11, len.wrapping_mul(P64_1));
    let high = merge(acc, SECRET.len() - STRIPE - 11, !len.wrapping_mul(P64_2));
    (high as u128) << 64 | low as u128
}

const ACC_INIT: [u64; 8] = [P32_3, P64_1, P64_2, P64_3, P64_4, P32_2, P64_5, P32_1];

/// The order of the long path's steps: for each full block of 16 stripes, the stripes
/// then a scramble; the stripes of the last, partial block; then the input's last 64
/// bytes against the secret 7 bytes before its end. Calls `stripe(data_at, secret_at)`
/// and `scramble()` in that order.
#[cfg(test)]
fn long_steps(len: usize, mut stripe: impl FnMut(usize, usize), mut scramble: impl FnMut()) {
    let blocks = (len - 1) / BLOCK;
    for b in 0..blocks {
        for s in 0..STRIPES_PER_BLOCK {
            stripe(b * BLOCK + s * STRIPE, s * 8);
        }
        scramble();
    }
    for s in 0..((len - 1) - BLOCK * blocks) / STRIPE {
        stripe(blocks * BLOCK + s * STRIPE, s * 8);
    }
    stripe(len - STRIPE, SECRET.len() - STRIPE - 7);
}

/// The long path in plain integer code, to check the vector one against.
#[cfg(test)]
fn long_scalar(data: &[u8]) -> u128 {
    let acc = core::cell::RefCell::new(ACC_INIT);
    long_steps(
        data.len(),
        |at, key_at| {
            let mut acc = acc.borrow_mut();
            for i in 0..8 {
                let v = read64(data, at + 8 * i);
                let k = v ^ read64(&SECRET, key_at + 8 * i);
                acc[i ^ 1] = acc[i ^ 1].wrapping_add(v);
                acc[i] = acc[i].wrapping_add((k & 0xffff_ffff) * (k >> 32));
            }
        },
        || {
            for (i, a) in acc.borrow_mut().iter_mut().enumerate() {
                let mut x = *a;
                x ^= x >> 47;
                x ^= read64(&SECRET, SECRET.len() - STRIPE + 8 * i);
                *a = x.wrapping_mul(P32_1);
            }
        },
    );
    let acc = acc.into_inner();
    finish(&acc, data.len())
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use core::arch::x86_64::*;
    use core::sync::atomic::{AtomicU8, Ordering};

    /// 0: not checked yet; 1: no; 2: yes.
    static HAVE: AtomicU8 = AtomicU8::new(0);

    /// Whether the CPU has AVX-512F and the kernel saves the AVX-512 state (XCR0: SSE, AVX,
    /// opmask and both halves of the ZMM registers).
    pub fn available() -> bool {
        match HAVE.load(Ordering::Relaxed) {
            0 => {
                let yes = check();
                HAVE.store(if yes { 2 } else { 1 }, Ordering::Relaxed);
                yes
            }
            v => v == 2,
        }
    }

    fn check() -> bool {
        // CPUID leaf 1 ECX bit 27: OSXSAVE (XGETBV usable); leaf 7 EBX bit 16: AVX512F.
        let l1 = __cpuid(1);
        if l1.ecx & (1 << 27) == 0 || __cpuid(0).eax < 7 {
            return false;
        }
        if __cpuid_count(7, 0).ebx & (1 << 16) == 0 {
            return false;
        }
        // SAFETY: OSXSAVE is set, so XGETBV exists.
        let xcr0 = unsafe { xgetbv0() };
        xcr0 & 0xe6 == 0xe6
    }

    /// # Safety
    /// The CPU must have XSAVE enabled by the OS (CPUID OSXSAVE).
    #[target_feature(enable = "xsave")]
    unsafe fn xgetbv0() -> u64 {
        // SAFETY: the caller checked OSXSAVE; XCR0 is readable.
        unsafe { _xgetbv(0) }
    }

    /// One stripe: the 64 bytes at `v` against the secret at `k`.
    ///
    /// # Safety
    /// AVX-512F; 64 readable bytes at each pointer.
    #[target_feature(enable = "avx512f")]
    unsafe fn stripe(acc: __m512i, v: *const u8, k: *const u8) -> __m512i {
        // SAFETY: the caller passes 64 readable bytes at each; unaligned loads.
        let (v, key) = unsafe { (_mm512_loadu_si512(v as *const _), _mm512_loadu_si512(k as *const _)) };
        let k = _mm512_xor_si512(v, key);
        // Low half of each key word times its high half, plus the data with each pair of
        // words swapped (lane i gets word i ^ 1).
        let product = _mm512_mul_epu32(k, _mm512_srli_epi64::<32>(k));
        let swapped = _mm512_shuffle_epi32::<_MM_PERM_BADC>(v);
        _mm512_add_epi64(product, _mm512_add_epi64(acc, swapped))
    }

    /// The long path with each stripe and scramble in 512-bit registers, in the order of
    /// the specification (as `long_steps` in the tests spells it out).
    ///
    /// # Safety
    /// The CPU must support AVX-512F ([`available`]); `data` is longer than 240 bytes.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn long(data: &[u8]) -> u128 {
        assert!(data.len() > MIDSIZE_MAX);
        let (len, d, sec) = (data.len(), data.as_ptr(), SECRET.as_ptr());
        // SAFETY: every stripe lies inside `data` (the last one is its final 64 bytes, and
        // len > 240) and every key inside SECRET (offsets at most 192 - 64); the
        // accumulators are 64 bytes, loaded and stored unaligned.
        unsafe {
            let mut acc = _mm512_loadu_si512(ACC_INIT.as_ptr() as *const _);
            let prime = _mm512_set1_epi64(P32_1 as i64);
            let scramble_key = _mm512_loadu_si512(sec.add(SECRET.len() - STRIPE) as *const _);
            let blocks = (len - 1) / BLOCK;
            for b in 0..blocks {
                for s in 0..STRIPES_PER_BLOCK {
                    acc = stripe(acc, d.add(b * BLOCK + s * STRIPE), sec.add(s * 8));
                }
                let x = _mm512_xor_si512(acc, _mm512_srli_epi64::<47>(acc));
                let k = _mm512_xor_si512(x, scramble_key);
                // Each word times a 32-bit prime, in two 32x32 halves.
                let lo = _mm512_mul_epu32(k, prime);
                let hi = _mm512_mul_epu32(_mm512_srli_epi64::<32>(k), prime);
                acc = _mm512_add_epi64(lo, _mm512_slli_epi64::<32>(hi));
            }
            for s in 0..((len - 1) - BLOCK * blocks) / STRIPE {
                acc = stripe(acc, d.add(blocks * BLOCK + s * STRIPE), sec.add(s * 8));
            }
            acc = stripe(acc, d.add(len - STRIPE), sec.add(SECRET.len() - STRIPE - 7));
            let mut lanes = [0u64; 8];
            _mm512_storeu_si512(lanes.as_mut_ptr() as *mut _, acc);
            finish(&lanes, len)
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    /// Deterministic bytes (xorshift), so a failure can be repeated.
    fn bytes(n: usize, seed: u64) -> alloc_free::Buf {
        let mut x = seed | 1;
        let mut b = alloc_free::Buf::new(n);
        for byte in b.as_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *byte = x as u8;
        }
        b
    }

    /// A fixed buffer large enough for the lengths tested, without `alloc`.
    mod alloc_free {
        pub struct Buf {
            b: [u8; 20000],
            n: usize,
        }
        impl Buf {
            pub fn new(n: usize) -> Buf {
                assert!(n <= 20000);
                Buf { b: [0; 20000], n }
            }
            pub fn as_mut(&mut self) -> &mut [u8] {
                &mut self.b[..self.n]
            }
            pub fn as_ref(&self) -> &[u8] {
                &self.b[..self.n]
            }
        }
    }

    #[test]
    fn equals_the_xxhash_crate_at_every_length_class() {
        // Short lengths (the crate's own paths), both sides of each block and stripe
        // boundary, a page record's sizes and odd lengths between.
        let mut n = 0;
        let mut check = |len: usize| {
            for seed in [1u64, 0x9e37_79b9, 0xdead_beef_1234] {
                let d = bytes(len, seed ^ len as u64);
                let want = xxhash_rust::xxh3::xxh3_128(d.as_ref());
                assert_eq!(xxh3_128(d.as_ref()), want, "length {len}");
                if len > MIDSIZE_MAX {
                    assert_eq!(long_scalar(d.as_ref()), want, "length {len}, plain code");
                    #[cfg(target_arch = "x86_64")]
                    if avx512::available() {
                        // SAFETY: AVX-512F is there (checked).
                        assert_eq!(unsafe { avx512::long(d.as_ref()) }, want, "length {len}, AVX-512 loop");
                    }
                }
            }
            n += 1;
        };
        for len in 0..=300 {
            check(len);
        }
        for base in [BLOCK, 2 * BLOCK, 4096, 4096 + 48, 2 * 4096 + 48, 16 * 1024] {
            for d in 0..=65 {
                check(base - 33 + d);
            }
        }
        for len in (301..20000).step_by(997) {
            check(len);
        }
        assert!(n > 700);
        #[cfg(target_arch = "x86_64")]
        if !avx512::available() {
            std::eprintln!("NOTE: this CPU lacks AVX-512F: only the crate's path and the plain code were checked, not the vector loop");
        }
    }
}

//! CPU features an image depends on.
//!
//! glibc picks string and math routines by CPU feature at load time (ifuncs) and the
//! signal frames in the image hold xsave state laid out for the CPU's XCR0. A restore on a
//! CPU without one of those features would crash later with `SIGILL`, so the image records
//! them and a restore refuses a CPU that lacks any.

use crate::format::CpuInfo;

/// One instruction-set feature: which register word of [`CpuInfo`], which bit, its name.
pub struct Feature {
    pub word: Word,
    pub bit: u8,
    pub name: &'static str,
}

/// The CPUID register words recorded in [`CpuInfo`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Word {
    Leaf1Ecx,
    Leaf1Edx,
    Leaf7Ebx,
    Leaf7Ecx,
    Leaf7Edx,
    Leaf7_1Eax,
    LeafD1Eax,
    Ext1Ecx,
    Ext1Edx,
}

macro_rules! features {
    ($($w:ident $b:literal $n:literal),* $(,)?) => {
        /// Features user-space code can depend on (system and speculation-control bits,
        /// which differ between hosts without changing what code runs, are left out).
        pub const FEATURES: &[Feature] = &[$(Feature { word: Word::$w, bit: $b, name: $n }),*];
    };
}

features! {
    Leaf1Edx 0 "fpu", Leaf1Edx 4 "tsc", Leaf1Edx 8 "cx8", Leaf1Edx 15 "cmov", Leaf1Edx 23 "mmx",
    Leaf1Edx 24 "fxsr", Leaf1Edx 25 "sse", Leaf1Edx 26 "sse2",
    Leaf1Ecx 0 "sse3", Leaf1Ecx 1 "pclmulqdq", Leaf1Ecx 9 "ssse3", Leaf1Ecx 12 "fma",
    Leaf1Ecx 13 "cx16", Leaf1Ecx 19 "sse4_1", Leaf1Ecx 20 "sse4_2", Leaf1Ecx 22 "movbe",
    Leaf1Ecx 23 "popcnt", Leaf1Ecx 25 "aes", Leaf1Ecx 26 "xsave", Leaf1Ecx 27 "osxsave",
    Leaf1Ecx 28 "avx", Leaf1Ecx 29 "f16c", Leaf1Ecx 30 "rdrand",
    Leaf7Ebx 0 "fsgsbase", Leaf7Ebx 3 "bmi1", Leaf7Ebx 4 "hle", Leaf7Ebx 5 "avx2",
    Leaf7Ebx 8 "bmi2", Leaf7Ebx 9 "erms", Leaf7Ebx 11 "rtm", Leaf7Ebx 16 "avx512f",
    Leaf7Ebx 17 "avx512dq", Leaf7Ebx 18 "rdseed", Leaf7Ebx 19 "adx", Leaf7Ebx 21 "avx512ifma",
    Leaf7Ebx 23 "clflushopt", Leaf7Ebx 24 "clwb", Leaf7Ebx 28 "avx512cd", Leaf7Ebx 29 "sha_ni",
    Leaf7Ebx 30 "avx512bw", Leaf7Ebx 31 "avx512vl",
    Leaf7Ecx 1 "avx512vbmi", Leaf7Ecx 3 "pku", Leaf7Ecx 5 "waitpkg", Leaf7Ecx 6 "avx512_vbmi2",
    Leaf7Ecx 8 "gfni", Leaf7Ecx 9 "vaes", Leaf7Ecx 10 "vpclmulqdq", Leaf7Ecx 11 "avx512_vnni",
    Leaf7Ecx 12 "avx512_bitalg", Leaf7Ecx 14 "avx512_vpopcntdq", Leaf7Ecx 22 "rdpid",
    Leaf7Ecx 27 "movdiri", Leaf7Ecx 28 "movdir64b",
    Leaf7Edx 4 "fsrm", Leaf7Edx 14 "serialize", Leaf7Edx 16 "tsxldtrk", Leaf7Edx 22 "amx_bf16",
    Leaf7Edx 23 "avx512_fp16", Leaf7Edx 24 "amx_tile", Leaf7Edx 25 "amx_int8",
    Leaf7_1Eax 4 "avx_vnni", Leaf7_1Eax 5 "avx512_bf16",
    LeafD1Eax 0 "xsaveopt", LeafD1Eax 1 "xsavec", LeafD1Eax 3 "xsaves",
    Ext1Ecx 0 "lahf_lm", Ext1Ecx 5 "abm", Ext1Ecx 8 "3dnowprefetch",
    Ext1Edx 27 "rdtscp", Ext1Edx 29 "lm",
}

fn word(c: &CpuInfo, w: Word) -> u32 {
    match w {
        Word::Leaf1Ecx => c.leaf1_ecx,
        Word::Leaf1Edx => c.leaf1_edx,
        Word::Leaf7Ebx => c.leaf7_ebx,
        Word::Leaf7Ecx => c.leaf7_ecx,
        Word::Leaf7Edx => c.leaf7_edx,
        Word::Leaf7_1Eax => c.leaf7_1_eax,
        Word::LeafD1Eax => c.leafd_1_eax,
        Word::Ext1Ecx => c.ext1_ecx,
        Word::Ext1Edx => c.ext1_edx,
    }
}

/// Whether `c` has feature `f`.
pub fn has(c: &CpuInfo, f: &Feature) -> bool {
    word(c, f.word) & (1u32 << f.bit) != 0
}

/// Sets or clears feature `f` in `c` (for tests that build an image for another CPU).
pub fn set(c: &mut CpuInfo, f: &Feature, on: bool) {
    let w = match f.word {
        Word::Leaf1Ecx => &mut c.leaf1_ecx,
        Word::Leaf1Edx => &mut c.leaf1_edx,
        Word::Leaf7Ebx => &mut c.leaf7_ebx,
        Word::Leaf7Ecx => &mut c.leaf7_ecx,
        Word::Leaf7Edx => &mut c.leaf7_edx,
        Word::Leaf7_1Eax => &mut c.leaf7_1_eax,
        Word::LeafD1Eax => &mut c.leafd_1_eax,
        Word::Ext1Ecx => &mut c.ext1_ecx,
        Word::Ext1Edx => &mut c.ext1_edx,
    };
    if on {
        *w |= 1 << f.bit;
    } else {
        *w &= !(1 << f.bit);
    }
}

/// The first feature the image needs that `here` lacks, if any.
pub fn first_missing(image: &CpuInfo, here: &CpuInfo) -> Option<&'static Feature> {
    FEATURES.iter().find(|f| has(image, f) && !has(here, f))
}

/// Reads this CPU's features with `cpuid` and `xgetbv`.
pub fn current() -> CpuInfo {
    use core::arch::x86_64::__cpuid_count;
    let mut c = CpuInfo::zeroed();
    let l0 = __cpuid_count(0, 0);
    let mut vendor = [0u8; 12];
    vendor[0..4].copy_from_slice(&l0.ebx.to_le_bytes());
    vendor[4..8].copy_from_slice(&l0.edx.to_le_bytes());
    vendor[8..12].copy_from_slice(&l0.ecx.to_le_bytes());
    c.vendor = vendor;
    let l1 = __cpuid_count(1, 0);
    c.signature = l1.eax;
    c.leaf1_ecx = l1.ecx;
    c.leaf1_edx = l1.edx;
    if l0.eax >= 7 {
        let l7 = __cpuid_count(7, 0);
        c.leaf7_ebx = l7.ebx;
        c.leaf7_ecx = l7.ecx;
        c.leaf7_edx = l7.edx;
        if l7.eax >= 1 {
            c.leaf7_1_eax = __cpuid_count(7, 1).eax;
        }
    }
    if l0.eax >= 0xd {
        let d0 = __cpuid_count(0xd, 0);
        c.xsave_size = d0.ebx;
        c.leafd_1_eax = __cpuid_count(0xd, 1).eax;
    }
    let e0 = __cpuid_count(0x8000_0000, 0);
    if e0.eax >= 0x8000_0001 {
        let e1 = __cpuid_count(0x8000_0001, 0);
        c.ext1_ecx = e1.ecx;
        c.ext1_edx = e1.edx;
    }
    if c.leaf1_ecx & (1 << 27) != 0 {
        // SAFETY: OSXSAVE is set, so `xgetbv` is enabled; the target feature is enabled
        // for this one call only.
        c.xcr0 = unsafe { xgetbv0() };
    }
    c
}

#[target_feature(enable = "xsave")]
unsafe fn xgetbv0() -> u64 {
    // SAFETY: the caller checked OSXSAVE.
    unsafe { core::arch::x86_64::_xgetbv(0) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_cpu_has_sse2_and_lm() {
        let c = current();
        let sse2 = FEATURES.iter().find(|f| f.name == "sse2").unwrap();
        let lm = FEATURES.iter().find(|f| f.name == "lm").unwrap();
        assert!(has(&c, sse2) && has(&c, lm));
        assert!(first_missing(&c, &c).is_none());
        let mut less = c;
        set(&mut less, sse2, false);
        assert_eq!(first_missing(&c, &less).map(|f| f.name), Some("sse2"));
    }
}

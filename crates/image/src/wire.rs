//! Fixed-layout little-endian encoding for the structures of the image, the control
//! protocol and the restore plan.
//!
//! Every structure is declared with [`wire!`], which gives it a constant `SIZE` and
//! `encode`/`decode` that copy field by field. Nothing is transmuted, so a decoder never
//! depends on alignment or on the bytes being well-formed: decoding only fails on a short
//! buffer, and the meaning of each field is checked separately (see `validate`).

/// A value with a fixed little-endian encoding.
pub trait Wire: Sized + Copy {
    /// Encoded size in bytes.
    const SIZE: usize;
    /// Writes the value into the first `SIZE` bytes of `out` (which must be that long).
    fn put(&self, out: &mut [u8]);
    /// Reads the value from the first `SIZE` bytes of `b` (which must be that long).
    fn get(b: &[u8]) -> Self;
}

macro_rules! wire_int {
    ($($t:ty),*) => {$(
        impl Wire for $t {
            const SIZE: usize = core::mem::size_of::<$t>();
            #[inline]
            fn put(&self, out: &mut [u8]) {
                out[..Self::SIZE].copy_from_slice(&self.to_le_bytes());
            }
            #[inline]
            fn get(b: &[u8]) -> Self {
                let mut a = [0u8; core::mem::size_of::<$t>()];
                a.copy_from_slice(&b[..Self::SIZE]);
                <$t>::from_le_bytes(a)
            }
        }
    )*};
}
wire_int!(u8, u16, u32, u64, i32, i64);

impl<T: Wire, const N: usize> Wire for [T; N] {
    const SIZE: usize = T::SIZE * N;
    fn put(&self, out: &mut [u8]) {
        for (i, v) in self.iter().enumerate() {
            v.put(&mut out[i * T::SIZE..]);
        }
    }
    fn get(b: &[u8]) -> Self {
        core::array::from_fn(|i| T::get(&b[i * T::SIZE..]))
    }
}

/// Declares a plain structure with a fixed wire layout (fields in order, no padding).
#[macro_export]
macro_rules! wire {
    ($(#[$m:meta])* pub struct $name:ident { $($(#[$fm:meta])* pub $f:ident : $t:ty),* $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub struct $name { $($(#[$fm])* pub $f: $t),* }

        impl $crate::wire::Wire for $name {
            const SIZE: usize = 0 $(+ <$t as $crate::wire::Wire>::SIZE)*;
            fn put(&self, out: &mut [u8]) {
                let mut _o = 0;
                $(
                    <$t as $crate::wire::Wire>::put(&self.$f, &mut out[_o..]);
                    _o += <$t as $crate::wire::Wire>::SIZE;
                )*
            }
            fn get(b: &[u8]) -> Self {
                let mut _o = 0;
                $(
                    let $f = <$t as $crate::wire::Wire>::get(&b[_o..]);
                    _o += <$t as $crate::wire::Wire>::SIZE;
                )*
                Self { $($f),* }
            }
        }

        impl $name {
            /// Encoded size in bytes.
            pub const SIZE: usize = <Self as $crate::wire::Wire>::SIZE;
            /// Encodes into the first `SIZE` bytes of `out`; `None` when `out` is too short.
            pub fn encode(&self, out: &mut [u8]) -> Option<()> {
                if out.len() < Self::SIZE {
                    return None;
                }
                <Self as $crate::wire::Wire>::put(self, out);
                Some(())
            }
            /// Decodes from the first `SIZE` bytes of `b`; `None` when `b` is too short.
            pub fn decode(b: &[u8]) -> Option<Self> {
                if b.len() < Self::SIZE {
                    return None;
                }
                Some(<Self as $crate::wire::Wire>::get(b))
            }
            /// The all-zero value.
            pub fn zeroed() -> Self {
                <Self as $crate::wire::Wire>::get(&[0u8; <Self as $crate::wire::Wire>::SIZE])
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::zeroed()
            }
        }
    };
}

/// Copies `src` into a fixed array, truncating, and returns it (for names and paths).
pub fn fixed<const N: usize>(src: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    let n = src.len().min(N);
    a[..n].copy_from_slice(&src[..n]);
    a
}

/// The bytes of a NUL-padded fixed array up to the first NUL.
pub fn unfixed(a: &[u8]) -> &[u8] {
    let n = a.iter().position(|&b| b == 0).unwrap_or(a.len());
    &a[..n]
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::wire! {
        /// A test structure.
        pub struct T {
            pub a: u8,
            pub b: u64,
            pub c: [u16; 3],
            pub d: i32,
        }
    }

    #[test]
    fn round_trip() {
        let t = T { a: 7, b: 0x0102_0304_0506_0708, c: [1, 2, 0xffff], d: -5 };
        assert_eq!(T::SIZE, 1 + 8 + 6 + 4);
        let mut buf = [0u8; 19];
        t.encode(&mut buf).unwrap();
        assert_eq!(buf[1], 8, "little-endian");
        assert_eq!(T::decode(&buf), Some(t));
        assert_eq!(T::decode(&buf[..18]), None);
        assert!(t.encode(&mut [0u8; 4]).is_none());
        assert_eq!(T::default(), T { a: 0, b: 0, c: [0; 3], d: 0 });
    }

    #[test]
    fn fixed_strings() {
        let a: [u8; 4] = fixed(b"abcdef");
        assert_eq!(&a, b"abcd");
        let b: [u8; 8] = fixed(b"ab");
        assert_eq!(unfixed(&b), b"ab");
    }
}

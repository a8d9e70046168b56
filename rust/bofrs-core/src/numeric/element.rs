//! Element types (f32, bf16, f16) and exact, branch-free conversions between them.
//!
//! bf16 and f16 are carried as their raw `u16` bits ([`Bf16`], [`F16`]) so that buffers coming
//! from torch / numpy can be viewed without copies ([`Half`]). Widening to f32 is exact;
//! narrowing rounds to nearest, ties to even (what torch and numpy do).
//!
//! [`Element`] is the one trait of the three types: the encoder reads them, the decoder writes
//! them, the fused matvec takes them as activations. Its implementations are the table of
//! per-type facts (one row per type, as ggml's type traits); it is sealed, so kernels may match
//! on [`Element::KIND`] exhaustively.

mod sealed {
    /// Only the element types of this module implement [`super::Element`] and [`super::Half`].
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for super::Bf16 {}
    impl Sealed for super::F16 {}
}

/// Which element type a generic `E: Element` is (a constant: matches on it compile away).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Float32,
    BFloat16,
    Float16,
}

/// A float element type: f32, bf16 or f16.
pub trait Element: sealed::Sealed + Copy + Default + Send + Sync + 'static {
    /// Name used in messages.
    const NAME: &'static str;
    /// Which type this is.
    const KIND: Kind;
    /// `abs_bits() >= NON_FINITE_ABS_BITS` exactly when the value is NaN or infinite.
    const NON_FINITE_ABS_BITS: u32;
    /// The largest finite value of the type.
    const MAX_FINITE: f32;
    /// The bits of `|self|`; for finite values their order is the order of magnitudes.
    fn abs_bits(self) -> u32;
    /// The value as f32 (exact for every type here).
    fn to_f32(self) -> f32;
    /// An f32 rounded to this type (nearest, ties to even; f32 itself unchanged).
    fn from_f32(v: f32) -> Self;
    /// The f32 value of a magnitude given by its `abs_bits`.
    fn abs_bits_to_f32(bits: u32) -> f32;
}

/// bfloat16 stored as raw bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(transparent)]
pub struct Bf16(pub u16);

/// IEEE half precision stored as raw bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(transparent)]
pub struct F16(pub u16);

impl Element for f32 {
    const NAME: &'static str = "float32";
    const KIND: Kind = Kind::Float32;
    const NON_FINITE_ABS_BITS: u32 = 0x7f80_0000;
    const MAX_FINITE: f32 = f32::MAX;
    #[inline(always)]
    fn abs_bits(self) -> u32 {
        self.to_bits() & 0x7fff_ffff
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
    #[inline(always)]
    fn abs_bits_to_f32(bits: u32) -> f32 {
        f32::from_bits(bits)
    }
}

/// `Element` for a 16-bit float type stored as its bits (`.0`): name, kind, the absolute bits
/// from which a value is non-finite, the largest finite value, and the bit conversions.
macro_rules! half_element {
    ($ty:ident, $name:literal, $kind:ident, $non_finite:literal, $max:expr, $to:ident, $from:ident) => {
        impl Element for $ty {
            const NAME: &'static str = $name;
            const KIND: Kind = Kind::$kind;
            const NON_FINITE_ABS_BITS: u32 = $non_finite;
            const MAX_FINITE: f32 = $max;
            #[inline(always)]
            fn abs_bits(self) -> u32 {
                (self.0 & 0x7fff) as u32
            }
            #[inline(always)]
            fn to_f32(self) -> f32 {
                $to(self.0)
            }
            #[inline(always)]
            fn from_f32(v: f32) -> Self {
                $ty($from(v))
            }
            #[inline(always)]
            fn abs_bits_to_f32(bits: u32) -> f32 {
                $to(bits as u16)
            }
        }
    };
}

half_element!(
    Bf16,
    "bfloat16",
    BFloat16,
    0x7f80,
    f32::from_bits(0x7f7f_0000),
    bf16_to_f32,
    f32_to_bf16
);
half_element!(F16, "float16", Float16, 0x7c00, 65504.0, f16_to_f32, f32_to_f16);

/// A 16-bit element type carried as its raw bits: a `u16` buffer (numpy's view of a torch
/// bfloat16 / float16 tensor) is a buffer of these without a copy.
pub trait Half: Element {
    /// `bits` viewed as values of this type.
    fn from_bits_slice(bits: &[u16]) -> &[Self];
    /// `bits` viewed as values of this type, writable.
    fn from_bits_slice_mut(bits: &mut [u16]) -> &mut [Self];
}

macro_rules! half_views {
    ($($t:ty),*) => {$(
        impl Half for $t {
            #[inline(always)]
            fn from_bits_slice(bits: &[u16]) -> &[Self] {
                // SAFETY: the type is `repr(transparent)` over `u16`: same size, alignment and
                // validity (every bit pattern is a value).
                unsafe { std::slice::from_raw_parts(bits.as_ptr() as *const Self, bits.len()) }
            }
            #[inline(always)]
            fn from_bits_slice_mut(bits: &mut [u16]) -> &mut [Self] {
                // SAFETY: as above; the borrow of `bits` is moved into the result.
                unsafe {
                    std::slice::from_raw_parts_mut(bits.as_mut_ptr() as *mut Self, bits.len())
                }
            }
        }
    )*};
}
half_views!(Bf16, F16);

/// Exact bf16 -> f32.
#[inline(always)]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// f32 -> bf16, round to nearest even; NaN stays NaN (quiet).
#[inline(always)]
pub fn f32_to_bf16(f: f32) -> u16 {
    let b = f.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1));
    let is_nan = (b & 0x7fff_ffff) > 0x7f80_0000;
    if is_nan {
        ((b >> 16) | 0x0040) as u16
    } else {
        (rounded >> 16) as u16
    }
}

/// Exact f16 -> f32, subnormals and infinities included.
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let magnitude = h & 0x7fff;
    // Placing exponent+mantissa 13 bits up and scaling by 2^112 rebiases normals and
    // subnormals alike (the product is exact).
    let scaled = (f32::from_bits(magnitude << 13) * f32::from_bits(0x7780_0000)).to_bits();
    let bits = if magnitude >= 0x7c00 {
        (magnitude << 13) | 0x7f80_0000
    } else {
        scaled
    };
    f32::from_bits(bits | sign)
}

/// f32 -> f16, round to nearest even; values beyond the f16 range become infinities.
#[inline(always)]
pub fn f32_to_f16(f: f32) -> u16 {
    let x = f.to_bits();
    let sign = ((x >> 16) & 0x8000) as u16;
    let a = x & 0x7fff_ffff;
    let magnitude = if a >= 0x4780_0000 {
        // >= 65536 (or inf / NaN): infinity, NaN stays NaN.
        if a > 0x7f80_0000 {
            0x7e00
        } else {
            0x7c00
        }
    } else if a < 0x3880_0000 {
        // Below 2^-14: the f16 result is subnormal or zero. Adding 0.5 aligns the f16
        // subnormal step with the f32 ulp, so the FPU's round-to-nearest-even does the rounding.
        let aligned = f32::from_bits(a) + 0.5;
        (aligned.to_bits() - 0x3f00_0000) as u16
    } else {
        // Normal: rebias the exponent (127 -> 15) and round 13 mantissa bits away, ties to even.
        let odd = (a >> 13) & 1;
        ((a.wrapping_sub(112 << 23) + 0xfff + odd) >> 13) as u16
    };
    magnitude | sign
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference f32 -> f16 by exhaustive search over f16 values (slow, exact).
    fn nearest_f16(f: f32) -> u16 {
        let mut best = 0u16;
        let mut best_err = f64::INFINITY;
        for h in 0..0x7c00u16 {
            let v = f16_to_f32(h) as f64;
            let err = (v - (f.abs() as f64)).abs();
            if err < best_err || (err == best_err && h % 2 == 0) {
                best_err = err;
                best = h;
            }
        }
        // Overflow threshold: halfway between 65504 and 65536 rounds to inf.
        if f.abs() >= 65520.0 {
            best = 0x7c00;
        }
        best | if f.is_sign_negative() { 0x8000 } else { 0 }
    }

    #[test]
    fn f16_roundtrip_all_finite() {
        for h in 0..=u16::MAX {
            let f = f16_to_f32(h);
            if f.is_nan() {
                assert!(f32_to_f16(f) & 0x7fff > 0x7c00);
            } else {
                assert_eq!(f32_to_f16(f), h, "h={h:#x}");
            }
        }
    }

    #[test]
    fn f16_rounding_matches_exhaustive_reference() {
        let samples = [
            1.0f32,
            1.0004883,
            1.0009766,
            65504.0,
            65519.99,
            65520.0,
            1e-8,
            2.9802322e-8,
            5.9604645e-8,
            8.940697e-8,
            6.1035156e-5,
            6.1e-5,
            3.0517578e-5,
            0.33333334,
            -2.5e-6,
        ];
        for f in samples {
            assert_eq!(f32_to_f16(f), nearest_f16(f), "f={f:e}");
        }
    }

    #[test]
    fn bf16_rounding_is_nearest_even() {
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
        // Exactly halfway between 0x3f80 and 0x3f81: ties to even (0x3f80).
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
        assert_eq!(f32_to_bf16(f32::MAX), 0x7f80); // rounds up to inf
    }

    #[test]
    fn half_views_are_the_bits() {
        let mut bits = [0x3f80u16, 0xc000, 0x7bff];
        assert_eq!(Bf16::from_bits_slice(&bits)[1].to_f32(), -2.0);
        assert_eq!(F16::from_bits_slice(&bits)[2].to_f32(), 65504.0);
        F16::from_bits_slice_mut(&mut bits)[0] = F16::from_f32(1.0);
        assert_eq!(bits[0], 0x3c00);
    }

    #[test]
    fn abs_bits_flags_non_finite() {
        assert!(f32::NAN.abs_bits() >= f32::NON_FINITE_ABS_BITS);
        assert!(f32::NEG_INFINITY.abs_bits() >= f32::NON_FINITE_ABS_BITS);
        assert!(f32::MAX.abs_bits() < f32::NON_FINITE_ABS_BITS);
        assert!(Bf16(0xff80).abs_bits() >= Bf16::NON_FINITE_ABS_BITS);
        assert!(F16(0x7bff).abs_bits() < F16::NON_FINITE_ABS_BITS);
        assert!(F16(0xfc00).abs_bits() >= F16::NON_FINITE_ABS_BITS);
    }
}

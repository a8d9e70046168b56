//! OPQ, outlier-preserving quantization: which values of a block are outliers, and how they
//! are stored.
//!
//! Rule, for a block of `n` values `w` (`n` = block size, or the length of the partial last
//! block: the threshold always uses the block's *actual* length):
//!
//! - `sigma` = sample standard deviation of the block (mean subtracted, divisor `n - 1`);
//! - `t(n, q) = Phi^-1((q^(1/n) + 1) / 2)`: the q-quantile of the largest magnitude of `n`
//!   standard normal values;
//! - `w_i` is an outlier iff `|w_i| > sigma * t(n, q)`, strictly. A block with fewer than two
//!   values, or with zero spread (constant, all zero), has none.
//!
//! Outliers are replaced by 0 before the block scale is taken, encoded as part of the block as
//! the value 0, and stored separately: their flat indices (ascending) and their values rounded
//! to 16 bits ([`OutlierDType`]). Decoding writes the stored value back.
//!
//! Exact evaluation (f64, every kernel variant alike): shifted sums with the block's first value
//! as shift `K`, `d = w - K`, sixteen accumulator lanes (value `i` into lane `i % 16`, multiply
//! then add, no FMA) combined as `m_j = l_j + l_(j+8)`, `((m0+m4)+(m2+m6)) + ((m1+m5)+(m3+m7))`
//! into `S = sum(d)` and `SS = sum(d*d)`; then
//! `limit2 = max(0, SS - (S*S) * (1/n)) * (t^2 / (n-1))` and `w_i` is an outlier iff
//! `w_i * w_i > limit2` (the squared form of the rule; a constant block gives exactly
//! `limit2 = 0`).
//!
//! Speed (results unchanged): vector kernels first try [`Threshold::provably_clean`], a float32
//! estimate of the sums with a rigorous error bound that clears most blocks without the f64
//! sums, and test values in f32 against [`f32_limit`], which is exactly equivalent.

use crate::blockwise::codebook::Normalization;
use crate::error::{Error, Result};
use crate::numeric::element::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16, Bf16, Element};
use crate::numeric::gauss::{normal_cdf, normal_pdf};

/// The 16-bit type outlier values are stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutlierDType {
    BFloat16,
    Float16,
}

impl OutlierDType {
    /// Parses "bfloat16" / "float16".
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "bfloat16" => Ok(Self::BFloat16),
            "float16" => Ok(Self::Float16),
            other => Err(Error::InvalidArgument {
                name: "outlier_dtype",
                message: format!("expected 'bfloat16' or 'float16', got {other:?}"),
            }),
        }
    }

    /// The name [`OutlierDType::parse`] accepts.
    pub fn name(self) -> &'static str {
        match self {
            Self::BFloat16 => "bfloat16",
            Self::Float16 => "float16",
        }
    }

    /// The value of stored bits.
    #[inline(always)]
    pub fn to_f32(self, bits: u16) -> f32 {
        match self {
            Self::BFloat16 => bf16_to_f32(bits),
            Self::Float16 => f16_to_f32(bits),
        }
    }

    /// Stored bits of an outlier value: nearest (ties to even); a result beyond `input_max`
    /// (the input dtype's largest finite value) or a bfloat16 overflow steps one value toward
    /// zero, so decoding never overflows. `None` when a float16 rounding overflows (the value is
    /// beyond the float16 range: refused rather than clamped).
    #[inline(always)]
    pub fn store(self, value: f32, input_max: f32) -> Option<u16> {
        let bits = match self {
            Self::BFloat16 => f32_to_bf16(value),
            Self::Float16 => f32_to_f16(value),
        };
        let back = self.to_f32(bits);
        if back.is_finite() && back.abs() <= input_max {
            Some(bits)
        } else if back.is_finite() || self == Self::BFloat16 {
            // Sign-magnitude bits: minus one is one step toward zero (inf -> largest finite).
            Some(bits - 1)
        } else {
            None
        }
    }
}

/// OPQ settings: the quantile `q` in (0, 1) and the outlier storage type.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OpqOptions {
    pub q: f64,
    pub dtype: OutlierDType,
}

impl OpqOptions {
    /// Validates `q` (finite, strictly between 0 and 1).
    pub fn new(q: f64, dtype: OutlierDType) -> Result<Self> {
        if !(q > 0.0 && q < 1.0) {
            return Err(Error::InvalidArgument {
                name: "opq",
                message: format!("the quantile must be strictly between 0 and 1, got {q}"),
            });
        }
        Ok(Self { q, dtype })
    }
}

/// One outlier: flat index (below [`Outlier::INDEX_LIMIT`]) and stored 16-bit value, packed in
/// one word (`index << 16 | value`) so that collecting one is a single store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(transparent)]
pub struct Outlier(u64);

impl Outlier {
    /// Flat indices are below this (2^48 values: far beyond any addressable tensor).
    pub const INDEX_LIMIT: u64 = 1 << 48;

    /// Packs an index (below [`Outlier::INDEX_LIMIT`]) and a stored value.
    #[inline(always)]
    pub fn new(index: u64, value: u16) -> Self {
        debug_assert!(index < Self::INDEX_LIMIT);
        Self(index << 16 | value as u64)
    }

    /// The flat index.
    #[inline(always)]
    pub fn index(self) -> u64 {
        self.0 >> 16
    }

    /// The stored 16-bit value.
    #[inline(always)]
    pub fn value(self) -> u16 {
        self.0 as u16
    }
}

/// `z` with `P(Z > z) = tail` for a standard normal `Z`, `tail` in (0, 1).
///
/// Acklam's rational approximation (relative error 1.2e-9) refined by two Halley steps on the
/// exact tail `erfc`: accurate to a few ulp over the whole range.
#[allow(clippy::excessive_precision)] // the published coefficients, verbatim
pub fn normal_upper_quantile(tail: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969683028665376e1,
        2.209460984245205e2,
        -2.759285104469687e2,
        1.383577518672690e2,
        -3.066479806614716e1,
        2.506628277459239,
    ];
    const B: [f64; 5] = [
        -5.447609879822406e1,
        1.615858368580409e2,
        -1.556989798598866e2,
        6.680131188771972e1,
        -1.328068155288572e1,
    ];
    const C: [f64; 6] = [
        -7.784894002430293e-3,
        -3.223964580411365e-1,
        -2.400758277161838,
        -2.549732539343734,
        4.374664141464968,
        2.938163982698783,
    ];
    const D: [f64; 4] = [
        7.784695709041462e-3,
        3.224671290700398e-1,
        2.445134137142996,
        3.754408661907416,
    ];
    let tail_form = |p: f64| {
        // Lower-tail quantile for small p (negative).
        let r = (-2.0 * p.ln()).sqrt();
        (((((C[0] * r + C[1]) * r + C[2]) * r + C[3]) * r + C[4]) * r + C[5])
            / ((((D[0] * r + D[1]) * r + D[2]) * r + D[3]) * r + 1.0)
    };
    // x = Phi^-1(tail); z = -x.
    let x = if tail < 0.02425 {
        tail_form(tail)
    } else if tail > 1.0 - 0.02425 {
        -tail_form(1.0 - tail)
    } else {
        let u = tail - 0.5;
        let r = u * u;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * u
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    };
    let mut z = -x;
    for _ in 0..2 {
        // Upper tail Q(z) = Phi(-z); Newton direction u, Halley correction.
        let e = normal_cdf(-z) - tail;
        let u = e / normal_pdf(z);
        z += u / (1.0 - 0.5 * z * u);
    }
    z
}

/// The OPQ threshold factor `t(n, q) = Phi^-1((q^(1/n) + 1) / 2)` (computed through the upper
/// tail `(1 - q^(1/n)) / 2 = -expm1(ln(q) / n) / 2` for accuracy near 1).
pub fn threshold(n: usize, q: f64) -> f64 {
    let tail = -libm::expm1(q.ln() / n.max(1) as f64) * 0.5;
    normal_upper_quantile(tail)
}

/// The threshold of blocks of one length `n`, in the squared form the kernels compare:
/// `limit2 = max(0, SS - (S * S) * (1 / n)) * (t(n, q)^2 / (n - 1))`, i.e. `(sigma * t)^2`.
/// Blocks of fewer than two values get `limit2 = 0` (no outliers).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Threshold {
    pub(crate) inv_n: f64,
    pub(crate) factor: f64,
}

impl Threshold {
    /// The constants for blocks of `n` values and quantile `q`.
    pub fn new(n: usize, q: f64) -> Self {
        let t = threshold(n, q);
        Self {
            inv_n: 1.0 / n.max(1) as f64,
            factor: if n < 2 { 0.0 } else { t * t / (n - 1) as f64 },
        }
    }

    /// Whether a block of `n` values provably has no outlier, judged from f32 sums (any order)
    /// `s32 = sum(fl(w - K))` and `ss32 = sum(fl(w - K)^2)` (fused or not) and its largest
    /// magnitude: a cheap filter in front of the exact f64 test. `true` only when the exact
    /// test would find `max_abs^2 <= limit2` (see [`FilterBound`]); never for non-finite sums.
    #[inline(always)]
    pub fn provably_clean(&self, max_abs: f32, s32: f32, ss32: f32, bound: &FilterBound) -> bool {
        let max = max_abs as f64;
        self.bracket(s32, ss32, bound)
            .is_some_and(|(lo, _)| max * max <= lo)
    }

    /// Bounds `(lo, hi)` on the exact limit of a block ([`Threshold::limit2`] of its
    /// [`block_sums`]) from the same f32 sums as [`Threshold::provably_clean`]:
    /// `lo <= limit2 <= hi` when `lo >= 0`; `lo < 0` when the sums prove no lower bound above 0
    /// (nothing is then known about `limit2 > 0`). `None` for non-finite sums.
    ///
    /// Upper side (notation of [`FilterBound`]): `|S - s| <= b := nT + e sqrt(n SS_hi)`, so
    /// `S^2 >= (|s| - b)^2 >= s^2 (1-e) - b^2 (1/e - 1)` (by `2ab <= e a^2 + b^2 / e`; the bound
    /// is negative when `|s| < b`) `>= s^2 (1-e) - 2 n^2 T^2 / e - 2 e n SS_hi`, and
    /// `M2 <= SS_hi (1 + 2e) + 2 n T^2 / e - s^2 (1-e) / n`; `3e-12 SS_hi` covers the f64
    /// rounding of the exact path (as on the lower side) and of this bound, a factor
    /// `1 + 1e-12` that of the product: `m2_hi = ss h_ss + h_0 - s^2 h_a`.
    #[inline(always)]
    pub fn bracket(&self, s32: f32, ss32: f32, bound: &FilterBound) -> Option<(f64, f64)> {
        // Overflowed sums (inf, or NaN from inf - inf) prove nothing.
        if !(s32.is_finite() && ss32.is_finite()) {
            return None;
        }
        let (s, ss) = (s32 as f64, ss32 as f64);
        let a = s.abs() + bound.c_tiny;
        let m2_lo = ss * bound.c_ss - a * a * bound.c_a - bound.c_0;
        let lo = if m2_lo > 0.0 {
            m2_lo * self.factor * (1.0 - 1e-12)
        } else {
            -1.0
        };
        let m2_hi = ss * bound.h_ss + bound.h_0 - s * s * bound.h_a;
        Some((lo, m2_hi.max(0.0) * self.factor * (1.0 + 1e-12)))
    }

    /// `(sigma * t)^2` from a block's shifted sums ([`block_sums`]).
    #[inline(always)]
    pub fn limit2(&self, sums: (f64, f64)) -> f64 {
        let (s, ss) = sums;
        (ss - (s * s) * self.inv_n).max(0.0) * self.factor
    }
}

/// Constants of the lower bound used by [`Threshold::provably_clean`] for blocks of `n` values.
///
/// With `u = 2^-24`, `e = 2 gamma_(n+4) = 2 (n+4) u / (1 - (n+4) u)` bounds the relative error of
/// f32 sums of `n` terms in any order (squares by FMA or not), and `T = 2^-149` the absolute
/// error of underflow. With `S, SS` the exact sums: `SS <= ss/(1-e) + nT =: SS_hi`,
/// `|S| <= |s| + nT + e sqrt(n SS_hi)`, and `S^2 <= (|s| + nT)^2 (1+e) + e (1+e) n SS_hi`
/// (by `2ab <= e a^2 + b^2 / e`). So `M2 = SS - S^2/n >= (ss - nT)/(1+e) - (|s| + nT)^2 (1+e)/n
/// - e (1+e) SS_hi`, and a further `1e-12 SS_hi` covers the f64 rounding of the exact path:
/// `m2_lo = ss c_ss - (|s| + c_tiny)^2 c_a - c_0`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FilterBound {
    pub(crate) c_ss: f64,
    pub(crate) c_a: f64,
    pub(crate) c_0: f64,
    pub(crate) c_tiny: f64,
    /// Upper bound ([`Threshold::bracket`]): `(1 + 2e + 3e-12) / (1 - e)`.
    pub(crate) h_ss: f64,
    /// `nT (1 + 2e + 3e-12) + 2 n T^2 / e`.
    pub(crate) h_0: f64,
    /// `(1 - e) / n`.
    pub(crate) h_a: f64,
}

impl FilterBound {
    /// The constants for blocks of `n` values.
    pub fn new(n: usize) -> Self {
        const U: f64 = 1.0 / 16_777_216.0; // 2^-24
        const TINY: f64 = 1.401298464324817e-45; // 2^-149
        let nf = n.max(1) as f64;
        let k = (nf + 4.0) * U;
        let e = 2.0 * k / (1.0 - k);
        let slack = e * (1.0 + e) + 1e-12; // times SS_hi
        let nt = nf * TINY;
        Self {
            c_ss: 1.0 / (1.0 + e) - slack / (1.0 - e),
            c_a: (1.0 + e) / nf,
            c_0: nt / (1.0 + e) + slack * nt,
            c_tiny: nt,
            h_ss: (1.0 + 2.0 * e + 3e-12) / (1.0 - e),
            h_0: nt * (1.0 + 2.0 * e + 3e-12) + 2.0 * nf * TINY * TINY / e,
            h_a: (1.0 - e) / nf,
        }
    }
}

/// Factors of [`f32_bracket`]: `sqrt(lo)` is narrowed, `sqrt(hi)` widened by `2^-22`.
pub(crate) const NARROW: f64 = 1.0 - 1.0 / (1u64 << 22) as f64;
pub(crate) const WIDEN: f64 = 1.0 + 1.0 / (1u64 << 22) as f64;

/// f32 thresholds `(t_lo, t_hi)` for bounds `0 < lo <= limit2 <= hi` ([`Threshold::bracket`]):
/// `t_lo^2 <= lo` and `t_hi^2 >= hi` (exact f64 squares of f32), so for every finite f32 `x`,
/// `|x| <= t_lo` proves `x * x <= limit2` (kept) and `|x| > t_hi` proves `x * x > limit2`
/// (outlier); only values in between need the exact limit. `None` when `lo <= 0` or a
/// rounded threshold misses its side (then the exact limit decides).
#[inline(always)]
pub fn f32_bracket(lo: f64, hi: f64) -> Option<(f32, f32)> {
    let t_lo = (lo.sqrt() * NARROW) as f32;
    let t_hi = (hi.sqrt() * WIDEN) as f32;
    let square = |t: f32| (t as f64) * (t as f64);
    (lo > 0.0 && square(t_lo) <= lo && square(t_hi) >= hi).then_some((t_lo, t_hi))
}

/// Accumulator lanes of [`block_sums`].
pub const LANES: usize = 16;

/// The shifted sums `(S, SS)` of a block (see the module doc for the exact order). The
/// portable definition; vector kernels reproduce it bit for bit.
#[inline(always)]
pub fn block_sums<E: Element>(block: &[E]) -> (f64, f64) {
    let Some(first) = block.first() else {
        return (0.0, 0.0);
    };
    let shift = first.to_f32() as f64;
    let mut s = [0f64; LANES];
    let mut ss = [0f64; LANES];
    let mut chunks = block.chunks_exact(LANES);
    for c in &mut chunks {
        for j in 0..LANES {
            let d = c[j].to_f32() as f64 - shift;
            s[j] += d;
            ss[j] += d * d;
        }
    }
    sums_from_lanes(chunks.remainder(), shift, s, ss)
}

/// Adds the last `len % 16` values of a block (`rest`, into lanes 0..) to the lane sums and
/// combines the lanes: `m_j = l_j + l_(j+8)`, then `((m0+m4)+(m2+m6)) + ((m1+m5)+(m3+m7))`.
#[inline(always)]
pub fn sums_from_lanes<E: Element>(
    rest: &[E],
    shift: f64,
    mut s: [f64; LANES],
    mut ss: [f64; LANES],
) -> (f64, f64) {
    for (j, v) in rest.iter().enumerate() {
        let d = v.to_f32() as f64 - shift;
        s[j] += d;
        ss[j] += d * d;
    }
    let combine = |l: [f64; LANES]| {
        let m: [f64; 8] = std::array::from_fn(|j| l[j] + l[j + 8]);
        ((m[0] + m[4]) + (m[2] + m[6])) + ((m[1] + m[5]) + (m[3] + m[7]))
    };
    (combine(s), combine(ss))
}

/// Words of a block's outlier bit mask (bit `i % 64` of word `i / 64` marks value `i`).
pub const MASK_WORDS: usize = crate::blockwise::layout::MAX_BLOCK_SIZE / 64;

/// Marks the values of a block with `w * w > limit2` (f64): the portable definition of the scan.
#[inline(always)]
pub fn scan<E: Element>(block: &[E], limit2: f64, mask: &mut [u64; MASK_WORDS]) {
    mask[..block.len().div_ceil(64)].fill(0);
    for (i, v) in block.iter().enumerate() {
        let x = v.to_f32() as f64;
        mask[i / 64] |= ((x * x > limit2) as u64) << (i % 64);
    }
}

/// Appends the values a [`scan`] marked as outliers (flat indices from `first_index`, values
/// stored per [`OutlierDType::store`]) and returns how many there were.
#[inline(always)]
pub fn collect<E: Element>(
    block: &[E],
    mask: &[u64; MASK_WORDS],
    opq: &OpqOptions,
    first_index: usize,
    input_max: f32,
    out: &mut Vec<Outlier>,
) -> Result<usize> {
    let before = out.len();
    for (w, &word) in mask[..block.len().div_ceil(64)].iter().enumerate() {
        collect_word(
            &block[w * 64..],
            word,
            opq,
            first_index + w * 64,
            input_max,
            out,
        )?;
    }
    Ok(out.len() - before)
}

/// [`collect`] for one mask word: bit `i` marks `values[i]` (flat index `first_index + i`);
/// only bits below `values.len()` may be set, and `values` is not empty.
///
/// For bfloat16 values stored as bfloat16 (the bits themselves), the first two marks are taken
/// without a data-dependent branch (a block rarely has more); the rest, and other types, one
/// by one.
#[inline(always)]
pub fn collect_word<E: Element>(
    values: &[E],
    word: u64,
    opq: &OpqOptions,
    first_index: usize,
    input_max: f32,
    out: &mut Vec<Outlier>,
) -> Result<()> {
    const UNROLL: usize = 2;
    // bfloat16 values stored as bfloat16: the bits themselves (what `store` returns for them).
    let same_bits = std::any::TypeId::of::<E>() == std::any::TypeId::of::<Bf16>()
        && opq.dtype == OutlierDType::BFloat16;
    let mut bits = word;
    if same_bits {
        // No conversion, no error: the first two without a data-dependent branch.
        out.reserve(UNROLL);
        let len = out.len();
        let spare = &mut out.spare_capacity_mut()[..UNROLL];
        let mut taken = 0;
        for _ in 0..UNROLL {
            // With no bit left this reads `values[0]` and takes nothing.
            let i = bits.trailing_zeros() as usize & 63;
            let value = (values[i].to_f32().to_bits() >> 16) as u16;
            spare[taken].write(Outlier::new((first_index + i) as u64, value));
            taken += (bits != 0) as usize;
            bits &= bits.wrapping_sub(1);
        }
        // SAFETY: the first `taken` spare slots were written above (slot `taken` is written at
        // every step, and `taken` only grows past a written slot).
        unsafe { out.set_len(len + taken) };
    }
    while bits != 0 {
        let i = bits.trailing_zeros() as usize;
        bits &= bits - 1;
        let x = values[i].to_f32();
        let stored = opq
            .dtype
            .store(x, input_max)
            .ok_or_else(|| Error::InvalidArgument {
                name: "outlier_dtype",
                message: format!(
                    "outlier {x:e} at flat index {} is beyond the float16 range; \
                 use outlier_dtype='bfloat16'",
                    first_index + i
                ),
            })?;
        out.push(Outlier::new((first_index + i) as u64, stored));
    }
    Ok(())
}

/// The largest f32 `T >= 0` with `(T as f64)^2 <= limit2` (`limit2 > 0`): for every f32 `x`,
/// `x * x > limit2` (f64) iff `|x| > T`, because f64 rounding of squares is monotone. Lets
/// vector kernels test outliers in f32 with exactly the f64 rule's result.
#[inline(always)]
pub fn f32_limit(limit2: f64) -> f32 {
    let square = |t: f32| (t as f64) * (t as f64);
    let mut t = (limit2.sqrt() as f32).min(f32::MAX);
    while t > 0.0 && square(t) > limit2 {
        t = f32::from_bits(t.to_bits() - 1);
    }
    while t < f32::MAX && square(f32::from_bits(t.to_bits() + 1)) <= limit2 {
        t = f32::from_bits(t.to_bits() + 1);
    }
    t
}

/// The raw scale of a block with its outliers (the values with `w * w > limit2`, as in
/// [`scan`]) counted as 0: the largest kept magnitude (absmax), or the first kept value reaching
/// it (signed absmax); 0 if every value is an outlier. Portable definition.
#[inline(always)]
pub fn raw_scale_within<E: Element>(block: &[E], limit2: f64, normalization: Normalization) -> f32 {
    let max = block
        .iter()
        .map(|v| {
            let x = v.to_f32() as f64;
            if x * x > limit2 {
                0
            } else {
                v.abs_bits()
            }
        })
        .fold(0u32, u32::max);
    let max = E::abs_bits_to_f32(max);
    match normalization {
        Normalization::Absmax => max,
        Normalization::SignedAbsmax => signed_scale_within(block, limit2, max),
    }
}

/// The signed-absmax raw scale given the largest kept magnitude `max`: the first kept value of
/// that magnitude; when every kept value is zero, the first value if it is kept (a +-0), else +0
/// (as if the outliers had been replaced by +0 first).
#[inline(always)]
pub fn signed_scale_within<E: Element>(block: &[E], limit2: f64, max: f32) -> f32 {
    let kept = |x: f32| (x as f64) * (x as f64) <= limit2;
    if max == 0.0 {
        return match block.first() {
            Some(v) if kept(v.to_f32()) => v.to_f32(),
            _ => 0.0,
        };
    }
    block
        .iter()
        .map(|v| v.to_f32())
        .find(|&x| x.abs() == max && kept(x))
        .unwrap_or(0.0)
}

/// [`signed_scale_within`] with the outliers given by their mask (as [`scan`] marks them)
/// instead of the limit: the same result when the mask is the scan's.
#[inline(always)]
pub fn signed_scale_masked<E: Element>(block: &[E], mask: &[u64; MASK_WORDS], max: f32) -> f32 {
    let kept = |i: usize| mask[i / 64] >> (i % 64) & 1 == 0;
    if max == 0.0 {
        return match block.first() {
            Some(v) if kept(0) => v.to_f32(),
            _ => 0.0,
        };
    }
    block
        .iter()
        .enumerate()
        .find(|&(i, v)| v.to_f32().abs() == max && kept(i))
        .map_or(0.0, |(_, v)| v.to_f32())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numeric::element::F16;

    #[test]
    fn upper_quantile_inverts_the_tail() {
        for &tail in &[
            1e-300, 1e-20, 1e-9, 1e-4, 0.01, 0.02425, 0.1, 0.3, 0.5, 0.7, 0.99,
        ] {
            let z = normal_upper_quantile(tail);
            let back = normal_cdf(-z);
            assert!(
                (back - tail).abs() <= 1e-12 * tail,
                "tail={tail} z={z} back={back}"
            );
        }
        // Published values.
        assert!((normal_upper_quantile(0.025) - 1.959963984540054).abs() < 1e-14);
        assert!((normal_upper_quantile(0.5)).abs() < 1e-15);
    }

    #[test]
    fn threshold_matches_definition() {
        // t(64, 0.95): P(max |z| <= t) over 64 normals = 0.95.
        for &(n, q) in &[
            (64usize, 0.95f64),
            (16, 0.99),
            (4096, 0.5),
            (1, 0.95),
            (3, 0.1),
        ] {
            let t = threshold(n, q);
            let p_max = (2.0 * normal_cdf(t) - 1.0).powi(n as i32);
            assert!((p_max - q).abs() < 1e-12, "n={n} q={q} t={t} p={p_max}");
        }
    }

    #[test]
    fn limit_is_sigma_times_t_squared() {
        let x: Vec<f32> = (0..37)
            .map(|i| ((i * 7919) % 101) as f32 * 0.37 - 11.0)
            .collect();
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / 37.0;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / 36.0;
        let th = Threshold::new(37, 0.9);
        let want = var * threshold(37, 0.9).powi(2);
        assert!((th.limit2(block_sums(&x)) - want).abs() < 1e-12 * want);
        let th64 = Threshold::new(64, 0.95);
        assert_eq!(th64.limit2(block_sums(&[3.5f32; 64])), 0.0);
        assert_eq!(Threshold::new(1, 0.95).limit2(block_sums(&[3.5f32])), 0.0);
        assert_eq!(block_sums::<f32>(&[]), (0.0, 0.0));
    }

    /// f32 sums in one sequential pass (the worst order for the error bound's assumptions is
    /// covered by the bound; this is one legitimate order).
    fn f32_sums(x: &[f32]) -> (f32, f32) {
        let k = x[0];
        x.iter().fold((0f32, 0f32), |(s, q), &v| {
            let d = v - k;
            (s + d, d.mul_add(d, q))
        })
    }

    #[test]
    fn the_filter_never_clears_a_block_with_outliers() {
        let th = Threshold::new(64, 0.95);
        let mut state = 7u64;
        let mut rand = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let (mut plain, mut plain_cleared) = (0, 0);
        for trial in 0..20000 {
            let offset = [0.0, 100.0, 1e6, -3.0][trial % 4] as f32;
            let scale = [1.0f32, 1e-20, 1e-40, 1e30][(trial / 4) % 4];
            let mut x: Vec<f32> = (0..64)
                .map(|_| ((rand() - 0.5) * 3.46) as f32 * scale + offset * scale)
                .collect();
            // Put one value right at the exact limit (both sides), sometimes at position 0.
            let limit2 = th.limit2(block_sums(&x));
            let at = if trial % 3 == 0 { 0 } else { trial % 64 };
            if (trial / 16) % 2 == 0 && limit2 > 0.0 {
                x[at] = (limit2.sqrt() * (1.0 + (rand() - 0.5) * 1e-6)) as f32;
            }
            let max_abs = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let exact = th.limit2(block_sums(&x));
            let (s32, ss32) = f32_sums(&x);
            let clean = th.provably_clean(max_abs, s32, ss32, &FilterBound::new(64));
            if offset == 0.0 && scale == 1.0 && (trial / 16) % 2 == 1 {
                plain += 1;
                plain_cleared += clean as usize;
            }
            if clean {
                let m = max_abs as f64;
                assert!(
                    m * m <= exact,
                    "trial {trial}: filter cleared a block with an outlier"
                );
            }
        }
        // Gaussian-like blocks without an outlier: nearly all cleared by the filter.
        assert!(plain_cleared * 10 > plain * 9, "{plain_cleared} of {plain}");
    }

    #[test]
    fn bracket_contains_the_exact_limit() {
        let mut state = 11u64;
        let mut rand = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut decided = 0;
        for trial in 0..20000 {
            let n = [64usize, 16, 37, 4096][trial % 4];
            let (th, bound) = (Threshold::new(n, 0.95), FilterBound::new(n));
            let offset = [0.0, 100.0, 1e6, -3.0][(trial / 4) % 4] as f32;
            let scale = [1.0f32, 1e-20, 1e-40, 1e30][(trial / 16) % 4];
            let heavy = (trial / 64) % 2 == 1;
            let x: Vec<f32> = (0..n)
                .map(|_| {
                    let u = (rand() - 0.5) * 3.46;
                    let v = if heavy {
                        u / rand().max(1e-3).powf(0.25)
                    } else {
                        u
                    };
                    v as f32 * scale + offset * scale
                })
                .collect();
            let exact = th.limit2(block_sums(&x));
            let (s32, ss32) = f32_sums(&x);
            let Some((lo, hi)) = th.bracket(s32, ss32, &bound) else {
                continue;
            };
            assert!(exact <= hi, "trial {trial}: limit {exact} above {hi}");
            if lo >= 0.0 {
                assert!(lo <= exact, "trial {trial}: limit {exact} below {lo}");
            }
            if let Some((t_lo, t_hi)) = f32_bracket(lo, hi) {
                decided += 1;
                assert!(exact > 0.0 && t_lo <= t_hi);
                // Every value is decided the same way by the thresholds and the exact limit.
                for &v in &x {
                    let outlier = (v as f64) * (v as f64) > exact;
                    if v.abs() <= t_lo {
                        assert!(!outlier, "trial {trial}");
                    }
                    if v.abs() > t_hi {
                        assert!(outlier, "trial {trial}");
                    }
                }
            }
        }
        assert!(decided > 10000, "{decided}");
    }

    #[test]
    fn collect_takes_every_marked_value_in_order() {
        // bfloat16 (bit copy, four per word without branches, then the rest) against float32
        // (the general path) on the same values, 0 to 64 marked per word.
        let x: Vec<f32> = (0..256).map(|i| (i as f32 - 100.5) * 1.25).collect();
        let xb: Vec<Bf16> = x.iter().map(|&v| Bf16(f32_to_bf16(v))).collect();
        let opq = OpqOptions::new(0.95, OutlierDType::BFloat16).unwrap();
        for marked in [0usize, 1, 3, 4, 5, 9, 63, 64] {
            for len in [256usize, 200, 64] {
                let mut mask = [0u64; MASK_WORDS];
                for (w, word) in mask[..len.div_ceil(64)].iter_mut().enumerate() {
                    for k in 0..marked {
                        let i = w * 64 + (k * 37 + w) % 64;
                        if i < len {
                            *word |= 1 << (i % 64);
                        }
                    }
                }
                let (mut a, mut b) = (Vec::new(), vec![Outlier::new(7, 7)]);
                let na = collect(&xb[..len], &mask, &opq, 1000, Bf16::MAX_FINITE, &mut a).unwrap();
                let xf: Vec<f32> = xb[..len].iter().map(|v| v.to_f32()).collect();
                let nb = collect(&xf, &mask, &opq, 1000, f32::MAX, &mut b).unwrap();
                assert_eq!((na, nb), (a.len(), b.len() - 1));
                assert_eq!(a, b[1..], "marked={marked} len={len}");
                let want: Vec<u64> = (0..len)
                    .filter(|&i| mask[i / 64] >> (i % 64) & 1 == 1)
                    .map(|i| 1000 + i as u64)
                    .collect();
                assert_eq!(a.iter().map(|o| o.index()).collect::<Vec<_>>(), want);
                assert!(a
                    .iter()
                    .all(|o| o.value() == f32_to_bf16(xb[(o.index() - 1000) as usize].to_f32())));
            }
        }
    }

    #[test]
    fn store_never_overflows() {
        let bf = OutlierDType::BFloat16;
        let h = OutlierDType::Float16;
        assert_eq!(bf.store(1.0, f32::MAX), Some(0x3f80));
        assert_eq!(bf.store(f32::MAX, f32::MAX), Some(0x7f7f));
        assert_eq!(bf.store(-f32::MAX, f32::MAX), Some(0xff7f));
        // f16 input: 65504 rounds to 65536 in bf16, one step down.
        assert_eq!(bf.to_f32(bf.store(65504.0, 65504.0).unwrap()), 65280.0);
        assert_eq!(h.store(65504.0, f32::MAX), Some(0x7bff));
        assert_eq!(h.store(70000.0, f32::MAX), None);
        assert_eq!(h.store(-1.0, Bf16::MAX_FINITE), Some(0xbc00));
        let _ = F16::MAX_FINITE;
    }

    #[test]
    fn outliers_of_a_block() {
        let mut x = vec![0f32; 64];
        for (i, v) in x.iter_mut().enumerate() {
            *v = ((i * 37 % 64) as f32 - 31.5) / 32.0;
        }
        x[10] = 40.0;
        x[50] = -35.0;
        let opq = OpqOptions::new(0.95, OutlierDType::BFloat16).unwrap();
        let mut out = Vec::new();
        let th = Threshold::new(64, 0.95);
        let limit2 = th.limit2(block_sums(&x));
        let mut mask = [0u64; MASK_WORDS];
        scan(&x, limit2, &mut mask);
        assert_eq!(mask[0], (1 << 10) | (1 << 50));
        let n = collect(&x, &mask, &opq, 128, f32::MAX, &mut out).unwrap();
        assert_eq!(n, 2);
        assert_eq!(
            out,
            vec![Outlier::new(138, 0x4220), Outlier::new(178, 0xc20c)]
        );
        let largest_kept = x.iter().enumerate().filter(|(i, _)| *i != 10 && *i != 50);
        let want = largest_kept.fold(0f32, |m, (_, v)| m.max(v.abs()));
        assert_eq!(raw_scale_within(&x, limit2, Normalization::Absmax), want);
        let signed = raw_scale_within(&x, limit2, Normalization::SignedAbsmax);
        let first = x.iter().find(|v| v.abs() == want).copied();
        assert_eq!(Some(signed), first);
        // The f32 form of the limit.
        for l2 in [limit2, 1e-80, 2.0, 1e300, 1.1754943508222875e-38] {
            let t = f32_limit(l2);
            assert!((t as f64).powi(2) <= l2, "{l2}");
            let up = f32::from_bits(t.to_bits() + 1);
            assert!(t == f32::MAX || (up as f64) * (up as f64) > l2, "{l2}");
        }
        // Every value an outlier: scale +0.
        let all = raw_scale_within(&x, -1.0, Normalization::SignedAbsmax);
        assert!(all == 0.0 && all.is_sign_positive());
        let z = raw_scale_within(&[-0.0f32, 9.0], 1.0, Normalization::SignedAbsmax);
        assert!(z == 0.0 && z.is_sign_negative());
        // Constant block: no spread, no outliers.
        assert_eq!(th.limit2(block_sums(&[5f32; 64])), 0.0);
        let h = [F16(0x3c00); 3];
        let mut m3 = [0u64; MASK_WORDS];
        m3[0] = 0b10;
        let half = OpqOptions::new(0.9, OutlierDType::Float16).unwrap();
        assert_eq!(collect(&h, &m3, &half, 7, 65504.0, &mut out).unwrap(), 1);
        assert_eq!(out.last(), Some(&Outlier::new(8, 0x3c00)));
        let top = Outlier::new(Outlier::INDEX_LIMIT - 1, 0xffff);
        assert_eq!(
            (top.index(), top.value()),
            (Outlier::INDEX_LIMIT - 1, 0xffff)
        );
        assert!(OpqOptions::new(1.0, OutlierDType::BFloat16).is_err());
        assert!(OpqOptions::new(f64::NAN, OutlierDType::BFloat16).is_err());
    }
}

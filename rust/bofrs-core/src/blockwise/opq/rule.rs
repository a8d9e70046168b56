//! The OPQ threshold: `t(n, q)`, the squared limit of a block, and the rigorous float32 bounds
//! on it that let vector kernels clear or split a block without the exact f64 sums.

use crate::numeric::gauss::{normal_cdf, normal_pdf};

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
    /// [`block_sums`](super::block_sums)) from the same f32 sums as [`Threshold::provably_clean`]:
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

    /// `(sigma * t)^2` from a block's shifted sums ([`block_sums`](super::block_sums)).
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

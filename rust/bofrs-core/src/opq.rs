//! OPQ, outlier-preserving quantization: which values of a block are outliers, and how they
//! are stored.
//!
//! Rule, for a block of `n` values `w` (`n` = block size, or the length of the partial last
//! block: the threshold always uses the block's *actual* length):
//!
//! - `sigma` = sample standard deviation of the block (mean subtracted, divisor `n - 1`),
//!   computed in f64;
//! - `t(n, q) = Phi^-1((q^(1/n) + 1) / 2)`: the q-quantile of the largest magnitude of `n`
//!   standard normal values;
//! - `w_i` is an outlier iff `sigma > 0` and `|w_i| > sigma * t(n, q)` (f64 comparison, strict).
//!   A block with fewer than two values, or with zero spread (constant, all zero), has none.
//!
//! Outliers are replaced by 0 before the block scale is taken, encoded as part of the block as
//! the value 0, and stored separately: their flat indices (ascending) and their values rounded
//! to 16 bits ([`OutlierDType`]). Decoding writes the stored value back.
//!
//! `sigma` uses the shifted one-pass formula with the block's first value as shift `K`, eight
//! f64 accumulator lanes (value `i` into lane `i % 8`) combined as
//! `((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))`: `S = sum(d)`, `SS = sum(d*d)`, `d = w - K`,
//! `var = max(0, (SS - S*S/n) / (n - 1))`. The order is fixed so every kernel variant gives the
//! same result; a constant block gives exactly `sigma = 0`.

use crate::element::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16, Element};
use crate::error::{Error, Result};
use crate::gauss::{normal_cdf, normal_pdf};

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

/// One outlier: flat index and stored 16-bit value.
pub type Outlier = (u64, u16);

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

/// Sample standard deviation of a block (see the module doc for the exact computation); 0 for
/// fewer than two values.
#[inline(always)]
pub fn block_sigma<E: Element>(block: &[E]) -> f64 {
    let n = block.len();
    if n < 2 {
        return 0.0;
    }
    let shift = block[0].to_f32() as f64;
    let mut s = [0f64; 8];
    let mut ss = [0f64; 8];
    let mut chunks = block.chunks_exact(8);
    for c in &mut chunks {
        for j in 0..8 {
            let d = c[j].to_f32() as f64 - shift;
            s[j] += d;
            ss[j] += d * d;
        }
    }
    for (j, v) in chunks.remainder().iter().enumerate() {
        let d = v.to_f32() as f64 - shift;
        s[j] += d;
        ss[j] += d * d;
    }
    let combine = |l: [f64; 8]| ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
    let (s, ss) = (combine(s), combine(ss));
    let var = (ss - s * s / n as f64) / (n - 1) as f64;
    var.max(0.0).sqrt()
}

/// Appends the outliers of one block to `out` (flat indices from `first_index`) and returns
/// how many there were. `max_abs` is the block's largest magnitude (a shortcut: no scan when
/// it is within the threshold), `t` the threshold factor for the block's length, `input_max`
/// the input dtype's largest finite value.
#[inline(always)]
pub fn block_outliers<E: Element>(
    block: &[E],
    max_abs: f32,
    t: f64,
    opq: &OpqOptions,
    first_index: usize,
    input_max: f32,
    out: &mut Vec<Outlier>,
) -> Result<usize> {
    let sigma = block_sigma(block);
    let limit = sigma * t;
    if sigma <= 0.0 || (max_abs as f64) <= limit {
        return Ok(0);
    }
    let before = out.len();
    for (i, v) in block.iter().enumerate() {
        let x = v.to_f32();
        if (x.abs() as f64) > limit {
            let index = first_index + i;
            let bits = opq
                .dtype
                .store(x, input_max)
                .ok_or(Error::InvalidArgument {
                    name: "outlier_dtype",
                    message: format!(
                        "outlier {x:e} at flat index {index} is beyond the float16 range; \
                     use outlier_dtype='bfloat16'"
                    ),
                })?;
            out.push((index as u64, bits));
        }
    }
    Ok(out.len() - before)
}

/// The block as f32 with its outliers (given by flat index, `first_index` = flat index of the
/// block's first value) replaced by 0, written to the front of `scratch`.
#[inline(always)]
pub fn zero_outliers<'a, E: Element>(
    block: &[E],
    outliers: &[Outlier],
    first_index: usize,
    scratch: &'a mut Vec<f32>,
) -> &'a [f32] {
    scratch.clear();
    scratch.extend(block.iter().map(|v| v.to_f32()));
    for &(index, _) in outliers {
        scratch[index as usize - first_index] = 0.0;
    }
    scratch
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::element::{Bf16, F16};

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
    fn sigma_is_the_sample_std() {
        let x: Vec<f32> = (0..37)
            .map(|i| ((i * 7919) % 101) as f32 * 0.37 - 11.0)
            .collect();
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / 37.0;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / 36.0;
        assert!((block_sigma(&x) - var.sqrt()).abs() < 1e-12 * var.sqrt());
        assert_eq!(block_sigma(&[3.5f32; 64]), 0.0);
        assert_eq!(block_sigma(&[3.5f32]), 0.0);
        assert_eq!(block_sigma::<f32>(&[]), 0.0);
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
        let t = threshold(64, 0.95);
        let n = block_outliers(&x, 40.0, t, &opq, 128, f32::MAX, &mut out).unwrap();
        assert_eq!(n, 2);
        assert_eq!(out, vec![(138, 0x4220), (178, 0xc20c)]);
        let mut scratch = Vec::new();
        let z = zero_outliers(&x, &out, 128, &mut scratch);
        assert_eq!((z[10], z[50], z[11]), (0.0, 0.0, x[11]));
        // Constant block: no spread, no outliers.
        assert_eq!(
            block_outliers(&[5f32; 64], 5.0, t, &opq, 0, f32::MAX, &mut out).unwrap(),
            0
        );
        assert!(OpqOptions::new(1.0, OutlierDType::BFloat16).is_err());
        assert!(OpqOptions::new(f64::NAN, OutlierDType::BFloat16).is_err());
    }
}

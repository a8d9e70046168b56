//! Pieces shared by the integer-activation paths of the fused matvec ([`crate::blockwise::matvec::int16`] and
//! [`crate::blockwise::matvec::int8`]): rounding the 16 levels, quantizing activations per group into the
//! order a kernel reads them, the portable integer row kernel (the definition of both paths'
//! results) and the per-product error bound.
//!
//! Activations are quantized per group of consecutive inputs to `q = round(x / d)` with
//! `d = max|x| / QMAX` over the group, the levels to `round(level / dl)` with
//! `dl = max|level| / QMAX`. Each (block, group) piece is an exact integer dot product, scaled by
//! `d * scale` in f32, and the row total by `dl`.

use crate::numeric::element::Element;

/// An integer type activations and levels are rounded to (a symmetric range `[-QMAX, QMAX]`).
pub trait QInt: Copy + Default + Send + Sync + Into<i64> + Ord {
    /// Largest magnitude used.
    const QMAX: f32;
    /// `v` (inside `[-QMAX - 1, QMAX + 1]`) truncated toward zero.
    fn from_rounded(v: f32) -> Self;
}

impl QInt for i16 {
    const QMAX: f32 = 16383.0;
    fn from_rounded(v: f32) -> i16 {
        v as i16
    }
}

impl QInt for i8 {
    const QMAX: f32 = 127.0;
    fn from_rounded(v: f32) -> i8 {
        v as i8
    }
}

/// Levels rounded to integers in `[-QMAX, QMAX]`, and the step `dl` they are in units of.
pub fn quantize_levels<Q: QInt>(levels: &[f32; 16]) -> ([Q; 16], f32) {
    let top = levels.iter().fold(0f32, |m, l| m.max(l.abs()));
    if top == 0.0 {
        return ([Q::default(); 16], 0.0);
    }
    let step = top / Q::QMAX;
    (
        levels.map(|l| Q::from_rounded((l / step).round().clamp(-Q::QMAX, Q::QMAX))),
        step,
    )
}

/// Quantized activations of `batch` rows: `q[b * padded + j]` (the order the kernel reads,
/// zero-padded to `padded` values per row) and `d[b * groups + g]`.
pub struct Quantized<Q> {
    /// The quantized values, `batch * padded`.
    pub q: Vec<Q>,
    /// The step of each group, `batch * groups`.
    pub d: Vec<f32>,
    /// Values per row of `q` (`in_features` rounded up to a multiple of 32).
    pub padded: usize,
    /// Groups per row.
    pub groups: usize,
    /// Inputs per group.
    pub group: usize,
}

/// Which kernel activations are laid out for (each path defines the orders' [`Layout`]s).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Order {
    /// Natural order (the portable kernel).
    Natural,
    /// The AVX2 kernel for 32-value steps (block sizes 16 and 32).
    Step32,
    /// The AVX2 kernel for 64-value steps (block sizes >= 64).
    Step64,
}

/// The order a kernel reads activations in: within every `chunk` values, source `j` goes to
/// `dest(j)`.
#[derive(Clone, Copy)]
pub struct Layout {
    /// Values per reordered chunk (32 or 64).
    pub chunk: usize,
    /// Destination of source index `j < chunk` inside its chunk.
    pub dest: fn(usize) -> usize,
}

impl Layout {
    /// The natural order.
    pub const NATURAL: Layout = Layout {
        chunk: 32,
        dest: |j| j,
    };
}

/// Quantizes `batch` rows of `n_in` activations per `group` and lays them out in `layout`.
/// A non-finite value makes its group's step non-finite (so the outputs it feeds are too).
/// Rounding is to nearest, halves away from zero (as `f32::round`, written so that it
/// vectorizes on baseline x86-64: a truncating conversion of `r + copysign(0.5, r)`).
pub fn quantize_activations<X: Element, Q: QInt>(
    x: &[X],
    batch: usize,
    n_in: usize,
    group: usize,
    layout: Layout,
) -> Quantized<Q> {
    let padded = n_in.div_ceil(32) * 32;
    let groups = n_in.div_ceil(group);
    let mut q = vec![Q::default(); batch * padded];
    let mut d = vec![0f32; batch * groups];
    let c = layout.chunk;
    let perm: Vec<usize> = (0..c).map(layout.dest).collect();
    let mut wide = vec![0f32; n_in];
    let mut row = vec![Q::default(); padded.div_ceil(c) * c];
    for b in 0..batch {
        for (w, v) in wide.iter_mut().zip(&x[b * n_in..(b + 1) * n_in]) {
            *w = v.to_f32();
        }
        for (g, chunk) in wide.chunks(group).enumerate() {
            let finite = chunk.iter().fold(true, |ok, v| {
                ok & (v.to_bits() & 0x7F80_0000 != 0x7F80_0000)
            });
            let top = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
            d[b * groups + g] = if finite { top / Q::QMAX } else { f32::NAN };
            let out = &mut row[g * group..g * group + chunk.len()];
            if finite && top > 0.0 {
                // |v| <= top, so |r| <= QMAX up to one rounding: the truncation stays in range.
                let inv = Q::QMAX / top;
                for (o, v) in out.iter_mut().zip(chunk) {
                    let r = (v * inv).clamp(-Q::QMAX, Q::QMAX);
                    *o = Q::from_rounded(r + 0.5f32.copysign(r));
                }
            } else {
                out.fill(Q::default());
            }
        }
        let dst = &mut q[b * padded..(b + 1) * padded];
        for (k, src) in row.chunks_exact(c).enumerate() {
            for (&to, &v) in perm.iter().zip(src) {
                if let Some(slot) = dst.get_mut(k * c + to) {
                    *slot = v;
                }
            }
        }
    }
    Quantized {
        q,
        d,
        padded,
        groups,
        group,
    }
}

/// The per-product error bound of an integer path for a level `l`, activation `x`, group step `d`
/// and level step `dl` (multiply by `|scale|` and sum over a row): `|l| d / 2 + (|x| + d / 2) dl / 2`.
pub fn error_bound_terms(l: f32, x: f32, d: f32, dl: f32) -> f64 {
    let (l, x, d, dl) = (l.abs() as f64, x.abs() as f64, d as f64, dl as f64);
    l * d / 2.0 + (x + d / 2.0) * dl / 2.0
}

/// Portable integer row kernel (natural order): the definition of an integer path's results.
#[allow(clippy::too_many_arguments)]
pub fn row_dot_portable<Q: QInt>(
    codes: &[u8],
    scales: &[f32],
    levels: &[Q; 16],
    dl: f32,
    block_size: usize,
    xq: &Quantized<Q>,
    first_row: usize,
    y: &mut [f32],
) {
    let n_in = codes.len() * 2;
    let group = xq.group;
    for (k, yb) in y.iter_mut().enumerate() {
        let b = first_row + k;
        let q = &xq.q[b * xq.padded..b * xq.padded + n_in];
        let d = &xq.d[b * xq.groups..(b + 1) * xq.groups];
        let mut total = 0f32;
        for (blk, &s) in scales.iter().enumerate() {
            let start = blk * block_size;
            let mut acc = 0f32;
            // The (block, group) pieces of this block, in order.
            let mut i = start;
            while i < start + block_size {
                let g = i / group;
                let end = (start + block_size).min((g + 1) * group);
                let mut part = 0i64;
                for j in i..end {
                    let byte = codes[j / 2];
                    let c = if j % 2 == 0 { byte >> 4 } else { byte & 15 };
                    part += levels[c as usize].into() * q[j].into();
                }
                acc += part as f32 * d[g];
                i = end;
            }
            total += acc * s;
        }
        *yb = total * dl;
    }
}

/// Horizontal sum of the eight lanes.
///
/// # Safety
/// The CPU must support AVX.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub unsafe fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

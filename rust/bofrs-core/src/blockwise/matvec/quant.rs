//! The opt-in integer-activation paths of the fused matvec ([`super::Activations::Int16`] and
//! [`super::Activations::Int8`]): one generic path, one [`QInt`] row per integer type.
//!
//! Activations are quantized per group of [`QInt::GROUP`] consecutive inputs to
//! `q = round(x / d)` with `d = max|x| / QMAX` over the group, the 16 levels to
//! `round(level / dl)` with `dl = max|level| / QMAX`. Each (block, group) piece is an exact
//! integer dot product, scaled by `d * scale` in f32, and the row total by `dl`. This trades the
//! float path's exactness (results within f32 rounding of `x @ W.T`) for less decode work: per
//! product the error is at most `|level| d / 2 + (|x| + d / 2) dl / 2`, times the block scale
//! ([`error_bound_terms`]). Relative to `sum |w x|` that is about 6e-5 for int16 and 0.7 % for
//! int8 on Gaussian activations (the 4-bit weight error itself is about 10 %).
//!
//! - int16 (`pmaddwd` on AVX2): groups of 64, `QMAX = 2^14 - 1`, so a product is below 2^28 and
//!   every i32 lane of the AVX2 kernel sums at most 8 of them per group (no overflow); the
//!   portable kernel sums in i64.
//! - int8 (`pmaddubsw` on AVX2, 32 products per instruction; the scheme llama.cpp uses for its
//!   4-bit formats): groups of 32, `QMAX = 127`, so each `pmaddubsw` pair sum is at most
//!   `2 * 127 * 127 < 2^15` (no saturation; the level's sign is moved onto the activation so
//!   the unsigned operand is `|level|`), and every i32 lane then sums 8 products of one group.

use super::WeightRow;
use crate::numeric::element::Element;

/// An integer type activations and levels are rounded to (a symmetric range `[-QMAX, QMAX]`):
/// the facts of one integer path.
pub trait QInt: Copy + Default + Send + Sync + Into<i64> + Ord + 'static {
    /// Activations per quantization group (one f32 step each).
    const GROUP: usize;
    /// Largest magnitude used.
    const QMAX: f32;
    /// Whether the AVX2 kernel for [`Order::Step64`] reads per-lane steps
    /// ([`Quantized::lane_steps`]).
    const LANE_STEPS: bool;
    /// `v` (inside `[-QMAX - 1, QMAX + 1]`) truncated toward zero.
    fn from_rounded(v: f32) -> Self;
    /// Where value `j` of a 32- or 64-value chunk goes in this path's kernels.
    fn layout(order: Order) -> Layout;
    /// This type's AVX2 row kernel: dot products of one weight row with `y.len()` (1..=4)
    /// activation rows of `xq` from row `first_row`, against `levels` (integers, their step).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `xq` is in [`Order::Step64`] for block sizes >= 64,
    /// else in [`Order::Step32`].
    #[cfg(target_arch = "x86_64")]
    unsafe fn avx2_rows(
        w: &WeightRow<'_>,
        levels: (&[Self; 16], f32),
        xq: &Quantized<Self>,
        first_row: usize,
        y: &mut [f32],
    );
}

impl QInt for i16 {
    const GROUP: usize = 64;
    const QMAX: f32 = 16383.0;
    const LANE_STEPS: bool = false;
    #[inline(always)]
    fn from_rounded(v: f32) -> i16 {
        v as i16
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn avx2_rows(
        w: &WeightRow<'_>,
        levels: (&[i16; 16], f32),
        xq: &Quantized<i16>,
        first_row: usize,
        y: &mut [f32],
    ) {
        super::x86::int16_rows(w, levels, xq, first_row, y)
    }
    fn layout(order: Order) -> Layout {
        match order {
            Order::Natural => Layout::NATURAL,
            // Source 16u + 2k + lane (k < 8) -> 16u + 8 lane + k.
            Order::Step32 => Layout {
                chunk: 32,
                dest: |j| {
                    let (u, r) = (j / 16, j % 16);
                    16 * u + 8 * (r % 2) + r / 2
                },
            },
            // Source 32 lane + 16u + 2k + h -> 32h + 16u + 8 lane + k.
            Order::Step64 => Layout {
                chunk: 64,
                dest: |j| {
                    let (lane, r) = (j / 32, j % 32);
                    let (u, s) = (r / 16, r % 16);
                    32 * (s % 2) + 16 * u + 8 * lane + s / 2
                },
            },
        }
    }
}

impl QInt for i8 {
    const GROUP: usize = 32;
    const QMAX: f32 = 127.0;
    const LANE_STEPS: bool = true;
    #[inline(always)]
    fn from_rounded(v: f32) -> i8 {
        v as i8
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn avx2_rows(
        w: &WeightRow<'_>,
        levels: (&[i8; 16], f32),
        xq: &Quantized<i8>,
        first_row: usize,
        y: &mut [f32],
    ) {
        super::x86::int8_rows(w, levels, xq, first_row, y)
    }
    /// [`Order::Step32`] puts, per 32 values, the even ones then the odd ones (the high and
    /// low nibbles of 16 code bytes); [`Order::Step64`], per 64, the even ones of each 32, then
    /// the odd ones of each 32 (the nibbles of 32 code bytes).
    fn layout(order: Order) -> Layout {
        match order {
            Order::Natural => Layout::NATURAL,
            // Source 2k + h -> 16h + k.
            Order::Step32 => Layout {
                chunk: 32,
                dest: |j| 16 * (j % 2) + j / 2,
            },
            // Source 32c + 2k + h -> 32h + 16c + k.
            Order::Step64 => Layout {
                chunk: 64,
                dest: |j| {
                    let (c, r) = (j / 32, j % 32);
                    32 * (r % 2) + 16 * c + r / 2
                },
            },
        }
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
    /// For [`Order::Step64`] where [`QInt::LANE_STEPS`]: per row and 64 values, the step of each
    /// i32 lane of the kernel (`[d0; 4]` then `[d1; 4]`, the two groups of the 64); else empty.
    pub lane_steps: Vec<f32>,
}

/// Which kernel activations are laid out for (each integer type defines the orders'
/// [`Layout`]s).
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

/// Quantizes `batch` rows of `n_in` activations per [`QInt::GROUP`] and lays them out in
/// `order`. A non-finite value makes its group's step non-finite (so the outputs it feeds are
/// too). Rounding is to nearest, halves away from zero (as `f32::round`, written so that it
/// vectorizes on baseline x86-64: a truncating conversion of `r + copysign(0.5, r)`).
pub fn quantize_activations<X: Element, Q: QInt>(
    x: &[X],
    batch: usize,
    n_in: usize,
    order: Order,
) -> Quantized<Q> {
    let group = Q::GROUP;
    let layout = Q::layout(order);
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
    let lane_steps = if Q::LANE_STEPS && order == Order::Step64 {
        lane_steps(&d, batch, groups, padded)
    } else {
        Vec::new()
    };
    Quantized {
        q,
        d,
        padded,
        groups,
        lane_steps,
    }
}

/// Per row and 64 values, the steps of the 8 i32 lanes of a 64-value kernel step: `[d0; 4]`
/// then `[d1; 4]` (groups of 32).
fn lane_steps(d: &[f32], batch: usize, groups: usize, padded: usize) -> Vec<f32> {
    let per_row = padded.div_ceil(64) * 8;
    let mut steps = vec![0f32; batch * per_row];
    for b in 0..batch {
        for (g, &step) in d[b * groups..(b + 1) * groups].iter().enumerate() {
            let at = b * per_row + (g / 2) * 8 + (g % 2) * 4;
            steps[at..at + 4].fill(step);
        }
    }
    steps
}

/// The per-product error bound of an integer path for a level `l`, activation `x`, group step `d`
/// and level step `dl` (multiply by `|scale|` and sum over a row): `|l| d / 2 + (|x| + d / 2) dl / 2`.
pub fn error_bound_terms(l: f32, x: f32, d: f32, dl: f32) -> f64 {
    let (l, x, d, dl) = (l.abs() as f64, x.abs() as f64, d as f64, dl as f64);
    l * d / 2.0 + (x + d / 2.0) * dl / 2.0
}

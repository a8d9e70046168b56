//! The opt-in 8-bit integer path of the fused matvec ([`crate::blockwise::matvec::Activations::Int8`]), the
//! scheme llama.cpp uses for its 4-bit formats: activations quantized to int8 per group of
//! [`GROUP`], the 16 levels rounded to int8, exact integer dot products (`pmaddubsw` on AVX2, 32
//! products per instruction), one f32 multiply per group (see [`crate::blockwise::matvec::quant`]).
//!
//! Per product the error is at most `|level| d / 2 + (|x| + d / 2) dl / 2` times the block
//! scale ([`error_bound_terms`], with `d = max|x| / 127` per group and `dl = max|level| / 127`);
//! on Gaussian activations the result is off by about 0.7 % of its norm (the int16 path: 6e-5,
//! the float path: f32 rounding), much less than the 4-bit weight error itself (about 10 %).
//!
//! Ranges: `|q|, |level| <= 127`, so each `pmaddubsw` pair sum is at most `2 * 127 * 127 <
//! 2^15` (no saturation; the level's sign is moved onto the activation so the unsigned operand
//! is `|level|`), and every i32 lane then sums 8 products of one group.

pub use crate::blockwise::matvec::quant::error_bound_terms;
pub use crate::blockwise::matvec::quant::Order;
use crate::blockwise::matvec::quant::{self as quant, Layout, QInt};
use crate::numeric::element::Element;

/// Activations per quantization group (one f32 step each).
pub const GROUP: usize = 32;
/// Largest magnitude of a quantized activation or level.
pub const QMAX: f32 = <i8 as QInt>::QMAX;

/// Levels rounded to integers in `[-QMAX, QMAX]`, and the step `dl` they are in units of.
pub fn quantize_levels(levels: &[f32; 16]) -> ([i8; 16], f32) {
    quant::quantize_levels(levels)
}

/// Where value `j` of a 32- or 64-value chunk goes in this path's kernels: [`Order::Step32`]
/// puts, per 32 values, the even ones then the odd ones (the high and low nibbles of 16 code
/// bytes); [`Order::Step64`], per 64, the even ones of each 32, then the odd ones of each 32
/// (the nibbles of 32 code bytes).
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

/// Activations quantized for this path, in a kernel's order.
pub struct Quantized {
    /// Values, steps and sizes (`group` = [`GROUP`]).
    pub values: quant::Quantized<i8>,
    /// For [`Order::Step64`]: per row and 64 values, the step of each i32 lane of the kernel
    /// (`[d0; 4]` then `[d1; 4]`, the two groups of the 64); empty otherwise.
    pub lane_steps: Vec<f32>,
}

/// Quantizes `batch` rows of `n_in` activations per [`GROUP`] and lays them out in `order`.
/// A non-finite value makes its group's step non-finite (so the outputs it feeds are too).
pub fn quantize_activations<X: Element>(
    x: &[X],
    batch: usize,
    n_in: usize,
    order: Order,
) -> Quantized {
    let values = quant::quantize_activations(x, batch, n_in, GROUP, layout(order));
    let lane_steps = if order == Order::Step64 {
        let per_row = values.padded.div_ceil(64) * 8;
        let mut steps = vec![0f32; batch * per_row];
        for b in 0..batch {
            let d = &values.d[b * values.groups..(b + 1) * values.groups];
            for (g, &step) in d.iter().enumerate() {
                let at = b * per_row + (g / 2) * 8 + (g % 2) * 4;
                steps[at..at + 4].fill(step);
            }
        }
        steps
    } else {
        Vec::new()
    };
    Quantized { values, lane_steps }
}

/// Portable int8 row kernel (natural order): the definition of this path's results.
#[allow(clippy::too_many_arguments)]
pub fn row_dot_portable(
    codes: &[u8],
    scales: &[f32],
    l8: &[i8; 16],
    dl: f32,
    block_size: usize,
    xq: &Quantized,
    first_row: usize,
    y: &mut [f32],
) {
    quant::row_dot_portable(codes, scales, l8, dl, block_size, &xq.values, first_row, y)
}

#[cfg(target_arch = "x86_64")]
pub mod x86 {
    //! AVX2 int8 row kernels for `NB` activation rows.
    use super::Quantized;
    use crate::blockwise::matvec::quant::hsum;
    use std::arch::x86_64::*;

    /// `sum(|w| * (x with the sign of w))` over each 4 bytes: the i32 dot products of `w` and
    /// `x` (32 int8 values each, all in `[-127, 127]`), per lane of 4.
    #[inline(always)]
    unsafe fn dot4(abs_w: __m256i, w: __m256i, x: __m256i) -> __m256i {
        let pairs = _mm256_maddubs_epi16(abs_w, _mm256_sign_epi8(x, w));
        _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
    }

    /// Runs `step(0..n)` alternating between two sets of accumulators (two independent FMA
    /// chains), returned as they are.
    #[inline(always)]
    unsafe fn two_chains<const NB: usize>(
        n: usize,
        mut step: impl FnMut(usize, &mut [__m256; NB]),
    ) -> [[__m256; NB]; 2] {
        let mut tot = [[_mm256_setzero_ps(); NB]; 2];
        let mut t = 0;
        while t + 1 < n {
            step(t, &mut tot[0]);
            step(t + 1, &mut tot[1]);
            t += 2;
        }
        if t < n {
            step(t, &mut tot[0]);
        }
        tot
    }

    /// `y[b] = dl * (sum of both accumulators of row b)`.
    #[inline(always)]
    unsafe fn finish<const NB: usize>(tot: [[__m256; NB]; 2], dl: f32, y: &mut [f32]) {
        for (b, yb) in y.iter_mut().enumerate().take(NB) {
            *yb = hsum(_mm256_add_ps(tot[0][b], tot[1][b])) * dl;
        }
    }

    /// Row kernel, `Order::Step64` activations; block size a multiple of 64. Steps of 64
    /// values alternate between two accumulators (two independent FMA chains).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `xq` holds rows `first_row..first_row + NB` in
    /// `Order::Step64`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    pub unsafe fn row_dot64<const NB: usize>(
        codes: &[u8],
        scales: &[f32],
        l8: &[i8; 16],
        dl: f32,
        block_size: usize,
        xq: &Quantized,
        first_row: usize,
        y: &mut [f32],
    ) {
        let table = _mm256_broadcastsi128_si256(_mm_loadu_si128(l8.as_ptr() as *const __m128i));
        let nib = _mm256_set1_epi8(15);
        let cp = codes.as_ptr();
        let sp = scales.as_ptr();
        let v = &xq.values;
        let per_row = v.padded.div_ceil(64) * 8;
        let qp: [*const i8; NB] =
            std::array::from_fn(|b| v.q.as_ptr().add((first_row + b) * v.padded));
        let dp: [*const f32; NB] =
            std::array::from_fn(|b| xq.lane_steps.as_ptr().add((first_row + b) * per_row));
        let steps_per_block = block_size / 64;
        let n_steps = codes.len() / 32;
        // One step: 64 codes, their levels, NB dot products scaled by step * block scale.
        let step = |st: usize, tot: &mut [__m256; NB]| {
            let raw = _mm256_loadu_si256(cp.add(st * 32) as *const __m256i);
            let even = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(raw, 4), nib));
            let odd = _mm256_shuffle_epi8(table, _mm256_and_si256(raw, nib));
            let (abs_even, abs_odd) = (_mm256_abs_epi8(even), _mm256_abs_epi8(odd));
            let s = _mm256_broadcast_ss(&*sp.add(st / steps_per_block));
            for b in 0..NB {
                let xb = qp[b].add(st * 64);
                let xe = _mm256_loadu_si256(xb as *const __m256i);
                let xo = _mm256_loadu_si256(xb.add(32) as *const __m256i);
                let p = _mm256_add_epi32(dot4(abs_even, even, xe), dot4(abs_odd, odd, xo));
                let ds = _mm256_mul_ps(_mm256_loadu_ps(dp[b].add(st * 8)), s);
                tot[b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), ds, tot[b]);
            }
        };
        finish(two_chains(n_steps, step), dl, y);
    }

    /// Row kernel, `Order::Step32` activations; block size 16 or 32 (a trailing half step when
    /// `in % 32 == 16`).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `xq` holds rows `first_row..first_row + NB` in
    /// `Order::Step32`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    pub unsafe fn row_dot32<const NB: usize>(
        codes: &[u8],
        scales: &[f32],
        l8: &[i8; 16],
        dl: f32,
        block_size: usize,
        xq: &Quantized,
        first_row: usize,
        y: &mut [f32],
    ) {
        let n_in = codes.len() * 2;
        let table = _mm256_broadcastsi128_si256(_mm_loadu_si128(l8.as_ptr() as *const __m128i));
        let nib = _mm_set1_epi8(15);
        let v = &xq.values;
        let qp: [*const i8; NB] =
            std::array::from_fn(|b| v.q.as_ptr().add((first_row + b) * v.padded));
        let dp: [*const f32; NB] =
            std::array::from_fn(|b| v.d.as_ptr().add((first_row + b) * v.groups));
        // One step: 32 codes, their levels, NB dot products scaled by step * block scale(s).
        let step = |t: usize, tot: &mut [__m256; NB]| {
            let base = t * 32;
            let whole = base + 32 <= n_in;
            let mut tail = [0u8; 16];
            let p = if whole {
                codes.as_ptr().add(base / 2)
            } else {
                tail[..8].copy_from_slice(&codes[base / 2..base / 2 + 8]);
                tail.as_ptr()
            };
            let raw = _mm_loadu_si128(p as *const __m128i);
            let idx = _mm256_set_m128i(
                _mm_and_si128(raw, nib),
                _mm_and_si128(_mm_srli_epi16(raw, 4), nib),
            );
            let w = _mm256_shuffle_epi8(table, idx);
            let abs_w = _mm256_abs_epi8(w);
            // i32 lanes 0, 1, 4, 5 hold values base..base+16, lanes 2, 3, 6, 7 the rest.
            let s = if block_size == 16 {
                let first = scales[base / 16];
                let second = if whole { scales[base / 16 + 1] } else { 0.0 };
                _mm256_setr_ps(first, first, second, second, first, first, second, second)
            } else {
                _mm256_set1_ps(scales[base / 32])
            };
            for b in 0..NB {
                let x = _mm256_loadu_si256(qp[b].add(base) as *const __m256i);
                let d = _mm256_mul_ps(s, _mm256_broadcast_ss(&*dp[b].add(t)));
                tot[b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot4(abs_w, w, x)), d, tot[b]);
            }
        };
        finish(two_chains(n_in.div_ceil(32), step), dl, y);
    }
}

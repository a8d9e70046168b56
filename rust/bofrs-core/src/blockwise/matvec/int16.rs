//! The opt-in 16-bit integer path of the fused matvec ([`crate::blockwise::matvec::Activations::Int16`]).
//!
//! Activations are quantized per group of [`GROUP`] consecutive inputs to `q = round(x / d)` with
//! `d = max|x| / QMAX` over the group, the 16 levels to `round(level / dl)` with
//! `dl = max|level| / QMAX`; each (block, group) piece is an exact integer dot product of the
//! two (`pmaddwd` on AVX2), scaled by `d * scale` in f32, and the row total by `dl`. This trades
//! the float path's exactness (results within f32 rounding of `x @ W.T`) for about half the
//! decode work: per product the error is at most `|level| d / 2 + (|x| + d / 2) dl / 2`, times
//! the block scale (see [`error_bound_terms`]); relative to `sum |w x|` that is about 6e-5.
//!
//! Ranges: `|q|, |level| <= QMAX = 2^14 - 1`, so a product is below 2^28 and every i32 lane of
//! the AVX2 kernel sums at most 8 of them per group (no overflow); the portable kernel sums in
//! i64.

pub use crate::blockwise::matvec::quant::error_bound_terms;
pub use crate::blockwise::matvec::quant::Order;
use crate::blockwise::matvec::quant::{self as quant, Layout, QInt};
use crate::numeric::element::Element;

/// Activations per quantization group (one f32 scale each).
pub const GROUP: usize = 64;
/// Largest magnitude of a quantized activation or level.
pub const QMAX: f32 = <i16 as QInt>::QMAX;

/// Quantized activations of this path.
pub type Quantized = quant::Quantized<i16>;

/// Levels rounded to integers in `[-QMAX, QMAX]`, and the step `dl` they are in units of.
pub fn quantize_levels(levels: &[f32; 16]) -> ([i16; 16], f32) {
    quant::quantize_levels(levels)
}

/// Where value `j` of a 32- or 64-value chunk goes in this path's kernels.
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

/// Quantizes `batch` rows of `n_in` activations per [`GROUP`] and lays them out in `order`.
/// A non-finite value makes its group's step non-finite (so the outputs it feeds are too).
pub fn quantize_activations<X: Element>(
    x: &[X],
    batch: usize,
    n_in: usize,
    order: Order,
) -> Quantized {
    quant::quantize_activations(x, batch, n_in, GROUP, layout(order))
}

/// Portable int16 row kernel (natural order): the definition of this path's results.
#[allow(clippy::too_many_arguments)]
pub fn row_dot_portable(
    codes: &[u8],
    scales: &[f32],
    l16: &[i16; 16],
    dl: f32,
    block_size: usize,
    xq: &Quantized,
    first_row: usize,
    y: &mut [f32],
) {
    quant::row_dot_portable(codes, scales, l16, dl, block_size, xq, first_row, y)
}

#[cfg(target_arch = "x86_64")]
pub mod x86 {
    //! AVX2 int16 row kernels for `NB` activation rows.
    use super::{Quantized, GROUP};
    use crate::blockwise::matvec::quant::hsum;
    use std::arch::x86_64::*;

    /// Low and high bytes of the integer levels, each broadcast to both lanes.
    #[inline(always)]
    unsafe fn tables(l16: &[i16; 16]) -> (__m256i, __m256i) {
        let lo = l16.map(|v| v as u16 as u8);
        let hi = l16.map(|v| ((v as u16) >> 8) as u8);
        (
            _mm256_broadcastsi128_si256(_mm_loadu_si128(lo.as_ptr() as *const __m128i)),
            _mm256_broadcastsi128_si256(_mm_loadu_si128(hi.as_ptr() as *const __m128i)),
        )
    }

    /// Row kernel, `Order::Step64` activations; block size a multiple of 64.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `xq` holds rows `first_row..first_row + NB`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    pub unsafe fn row_dot64<const NB: usize>(
        codes: &[u8],
        scales: &[f32],
        l16: &[i16; 16],
        dl: f32,
        block_size: usize,
        xq: &Quantized,
        first_row: usize,
        y: &mut [f32],
    ) {
        let (tlo, thi) = tables(l16);
        let nib = _mm256_set1_epi8(15);
        let cp = codes.as_ptr();
        let qp: [*const i16; NB] =
            std::array::from_fn(|b| xq.q.as_ptr().add((first_row + b) * xq.padded));
        let dp: [*const f32; NB] =
            std::array::from_fn(|b| xq.d.as_ptr().add((first_row + b) * xq.groups));
        let per_block = block_size / GROUP;
        let mut tot = [_mm256_setzero_ps(); NB];
        for (blk, &s) in scales.iter().enumerate() {
            let mut acc = [_mm256_setzero_ps(); NB];
            for gi in 0..per_block {
                let g = blk * per_block + gi;
                let base = g * GROUP;
                let raw = _mm256_loadu_si256(cp.add(base / 2) as *const __m256i);
                let ids = [
                    _mm256_and_si256(_mm256_srli_epi16(raw, 4), nib),
                    _mm256_and_si256(raw, nib),
                ];
                let mut part = [_mm256_setzero_si256(); NB];
                for (h, idx) in ids.iter().enumerate() {
                    let l = _mm256_shuffle_epi8(tlo, *idx);
                    let hh = _mm256_shuffle_epi8(thi, *idx);
                    let w0 = _mm256_unpacklo_epi8(l, hh);
                    let w1 = _mm256_unpackhi_epi8(l, hh);
                    for b in 0..NB {
                        let xb = qp[b].add(base + 32 * h);
                        let x0 = _mm256_loadu_si256(xb as *const __m256i);
                        let x1 = _mm256_loadu_si256(xb.add(16) as *const __m256i);
                        let m =
                            _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1));
                        part[b] = _mm256_add_epi32(part[b], m);
                    }
                }
                for b in 0..NB {
                    let d = _mm256_broadcast_ss(&*dp[b].add(g));
                    acc[b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(part[b]), d, acc[b]);
                }
            }
            let vs = _mm256_set1_ps(s);
            for b in 0..NB {
                tot[b] = _mm256_fmadd_ps(acc[b], vs, tot[b]);
            }
        }
        for b in 0..NB {
            y[b] = hsum(tot[b]) * dl;
        }
    }

    /// Row kernel, `Order::Step32` activations; block size 16 or 32 (a trailing half step when
    /// `in % 32 == 16`).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `xq` holds rows `first_row..first_row + NB`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    pub unsafe fn row_dot32<const NB: usize>(
        codes: &[u8],
        scales: &[f32],
        l16: &[i16; 16],
        dl: f32,
        block_size: usize,
        xq: &Quantized,
        first_row: usize,
        y: &mut [f32],
    ) {
        let n_in = codes.len() * 2;
        let (tlo, thi) = tables(l16);
        let shifts = _mm256_setr_epi32(4, 4, 4, 4, 0, 0, 0, 0);
        let nib = _mm256_set1_epi8(15);
        let qp: [*const i16; NB] =
            std::array::from_fn(|b| xq.q.as_ptr().add((first_row + b) * xq.padded));
        let dp: [*const f32; NB] =
            std::array::from_fn(|b| xq.d.as_ptr().add((first_row + b) * xq.groups));
        let mut tot = [_mm256_setzero_ps(); NB];
        for t in 0..n_in.div_ceil(32) {
            let base = t * 32;
            let whole = base + 32 <= n_in;
            let mut tail = [0u8; 16];
            let p = if whole {
                codes.as_ptr().add(base / 2)
            } else {
                tail[..8].copy_from_slice(&codes[base / 2..base / 2 + 8]);
                tail.as_ptr()
            };
            let raw = _mm256_broadcastsi128_si256(_mm_loadu_si128(p as *const __m128i));
            let idx = _mm256_and_si256(_mm256_srlv_epi32(raw, shifts), nib);
            let l = _mm256_shuffle_epi8(tlo, idx);
            let hh = _mm256_shuffle_epi8(thi, idx);
            // w0: values base..base+16, w1: base+16..base+32 (lane 0 even, lane 1 odd ones).
            let w0 = _mm256_unpacklo_epi8(l, hh);
            let w1 = _mm256_unpackhi_epi8(l, hh);
            let g = base / GROUP;
            for b in 0..NB {
                let xb = qp[b].add(base);
                let m0 = _mm256_madd_epi16(w0, _mm256_loadu_si256(xb as *const __m256i));
                let d = *dp[b].add(g);
                if block_size == 16 {
                    let s0 = _mm256_set1_ps(scales[base / 16] * d);
                    tot[b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(m0), s0, tot[b]);
                    if whole {
                        let m1 =
                            _mm256_madd_epi16(w1, _mm256_loadu_si256(xb.add(16) as *const __m256i));
                        let s1 = _mm256_set1_ps(scales[base / 16 + 1] * d);
                        tot[b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(m1), s1, tot[b]);
                    }
                } else {
                    let m1 =
                        _mm256_madd_epi16(w1, _mm256_loadu_si256(xb.add(16) as *const __m256i));
                    let s0 = _mm256_set1_ps(scales[base / 32] * d);
                    tot[b] =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(m0, m1)), s0, tot[b]);
                }
            }
        }
        for b in 0..NB {
            y[b] = hsum(tot[b]) * dl;
        }
    }
}

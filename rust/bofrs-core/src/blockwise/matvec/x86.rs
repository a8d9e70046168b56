//! The AVX2 row kernels of the fused matvec: float (exact f32 levels rebuilt by byte shuffles)
//! and the two integer paths (int16 by `pmaddwd`, int8 by `pmaddubsw`), each for block sizes
//! of 64 and more (64-value steps) and for 16 and 32 (32-value steps), monomorphized for 1 to
//! 4 activation rows.

use super::quant::{QInt, Quantized};
use super::WeightRow;
use crate::numeric::element::Element;
use std::arch::x86_64::*;

/// Calls the row kernel `$f` monomorphized for the tile height `$y.len()` (1..=4).
macro_rules! by_tile {
    ($f:ident, $y:ident, ($($arg:expr),*)) => {
        match $y.len() {
            1 => $f::<1>($($arg,)* $y),
            2 => $f::<2>($($arg,)* $y),
            3 => $f::<3>($($arg,)* $y),
            _ => $f::<4>($($arg,)* $y),
        }
    };
}

/// Float dot products of one weight row with `y.len()` (1..=4) activation rows of `x`
/// ([`permute`]d for the row's block size).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[inline(always)]
pub(super) unsafe fn float_rows(
    w: &WeightRow<'_>,
    bytes: &[[u8; 16]; 4],
    x: &[f32],
    y: &mut [f32],
) {
    by_tile!(float_step, y, (w, bytes, x))
}

/// int16 dot products of one weight row with `y.len()` (1..=4) activation rows of `xq` from
/// row `first_row` (in [`Order::Step64`](super::quant::Order::Step64) for block sizes >= 64,
/// else `Step32`).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[inline(always)]
pub(super) unsafe fn int16_rows(
    w: &WeightRow<'_>,
    levels: (&[i16; 16], f32),
    xq: &Quantized<i16>,
    first_row: usize,
    y: &mut [f32],
) {
    if w.block_size >= 64 {
        by_tile!(int16_step64, y, (w, levels, xq, first_row))
    } else {
        by_tile!(int16_step32, y, (w, levels, xq, first_row))
    }
}

/// [`int16_rows`] for int8 activations and levels.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[inline(always)]
pub(super) unsafe fn int8_rows(
    w: &WeightRow<'_>,
    levels: (&[i8; 16], f32),
    xq: &Quantized<i8>,
    first_row: usize,
    y: &mut [f32],
) {
    if w.block_size >= 64 {
        by_tile!(int8_step64, y, (w, levels, xq, first_row))
    } else {
        by_tile!(int8_step32, y, (w, levels, xq, first_row))
    }
}

/// Activations in f32, permuted to the order the float kernel's decoder yields: within every
/// 64 values for block sizes >= 64 (`wide`), within every 8 otherwise.
pub(super) fn permute<X: Element>(x: &[X], wide: bool) -> Vec<f32> {
    let mut v = vec![0f32; x.len()];
    if wide {
        // Source 32 lane + 8 r + 2 k + h -> 32 h + 8 r + 4 lane + k (see `decode64`).
        for (dst, src) in v.chunks_exact_mut(64).zip(x.chunks_exact(64)) {
            for (j, value) in src.iter().enumerate() {
                let (lane, r, k, h) = (j / 32, (j % 32) / 8, (j % 8) / 2, j % 2);
                dst[32 * h + 8 * r + 4 * lane + k] = value.to_f32();
            }
        }
    } else {
        for (dst, src) in v.chunks_exact_mut(8).zip(x.chunks_exact(8)) {
            for j in 0..4 {
                dst[j] = src[2 * j].to_f32();
                dst[4 + j] = src[2 * j + 1].to_f32();
            }
        }
    }
    v
}

/// Pointers to rows `first..first + NB` of `data` (`per_row` values each).
#[inline(always)]
fn row_ptrs<T, const NB: usize>(data: &[T], per_row: usize, first: usize) -> [*const T; NB] {
    std::array::from_fn(|b| data[(first + b) * per_row..].as_ptr())
}

/// Byte `k` of every level's f32 bits, per `k` (the float kernel's lookup tables).
pub(super) fn byte_tables(levels: &[f32; 16]) -> [[u8; 16]; 4] {
    let mut bytes = [[0u8; 16]; 4];
    for (i, l) in levels.iter().enumerate() {
        for (k, b) in l.to_bits().to_le_bytes().into_iter().enumerate() {
            bytes[k][i] = b;
        }
    }
    bytes
}

// The float path.

/// The four byte tables, each broadcast to both 128-bit lanes.
#[inline(always)]
unsafe fn tables(bytes: &[[u8; 16]; 4]) -> [__m256i; 4] {
    bytes.map(|t| _mm256_broadcastsi128_si256(_mm_loadu_si128(t.as_ptr() as *const __m128i)))
}

/// Decodes 32 codes (16 bytes at `p`) to 32 f32 levels in four registers. Register `r` holds
/// values `8r + [0, 2, 4, 6, 1, 3, 5, 7]` (the order the activations are permuted to).
#[inline(always)]
unsafe fn decode32(p: *const u8, t: &[__m256i; 4], shifts: __m256i, nib: __m256i) -> [__m256; 4] {
    // Lane 0: high nibbles (even values), lane 1: low nibbles (odd values).
    let raw = _mm256_broadcastsi128_si256(_mm_loadu_si128(p as *const __m128i));
    levels32(_mm256_and_si256(_mm256_srlv_epi32(raw, shifts), nib), t)
}

/// The f32 levels of 32 codes whose nibble indices are in `idx` (one per byte).
#[inline(always)]
unsafe fn levels32(idx: __m256i, t: &[__m256i; 4]) -> [__m256; 4] {
    let b0 = _mm256_shuffle_epi8(t[0], idx);
    let b1 = _mm256_shuffle_epi8(t[1], idx);
    let b2 = _mm256_shuffle_epi8(t[2], idx);
    let b3 = _mm256_shuffle_epi8(t[3], idx);
    let lo01 = _mm256_unpacklo_epi8(b0, b1);
    let hi01 = _mm256_unpackhi_epi8(b0, b1);
    let lo23 = _mm256_unpacklo_epi8(b2, b3);
    let hi23 = _mm256_unpackhi_epi8(b2, b3);
    [
        _mm256_castsi256_ps(_mm256_unpacklo_epi16(lo01, lo23)),
        _mm256_castsi256_ps(_mm256_unpackhi_epi16(lo01, lo23)),
        _mm256_castsi256_ps(_mm256_unpacklo_epi16(hi01, hi23)),
        _mm256_castsi256_ps(_mm256_unpackhi_epi16(hi01, hi23)),
    ]
}

/// Decodes 64 codes (32 bytes at `p`) to 64 f32 levels: `[h][r]` holds values
/// `8r + [0, 2, 4, 6] + h` (low lane) and `32 + 8r + [0, 2, 4, 6] + h` (high lane), the order
/// `permute` gives the activations (one shift per 64 codes instead of one per 32).
#[inline(always)]
unsafe fn decode64(p: *const u8, t: &[__m256i; 4], nib: __m256i) -> [[__m256; 4]; 2] {
    let raw = _mm256_loadu_si256(p as *const __m256i);
    [
        levels32(_mm256_and_si256(_mm256_srli_epi16(raw, 4), nib), t),
        levels32(_mm256_and_si256(raw, nib), t),
    ]
}

/// Horizontal sum of the eight lanes.
#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// Float row kernel for `NB` activation rows of `x` (in [`permute`]'s order).
///
/// # Safety
/// The CPU must support AVX2 and FMA; `x` holds `NB` rows of the weight row's width.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)]
unsafe fn float_step<const NB: usize>(
    w: &WeightRow<'_>,
    bytes: &[[u8; 16]; 4],
    x: &[f32],
    y: &mut [f32],
) {
    let (codes, scales, block_size) = (w.codes, w.scales, w.block_size);
    let n_in = codes.len() * 2;
    debug_assert!(x.len() >= NB * n_in && y.len() >= NB);
    let t = tables(bytes);
    let shifts = _mm256_setr_epi32(4, 4, 4, 4, 0, 0, 0, 0);
    let nib = _mm256_set1_epi8(15);
    let cp = codes.as_ptr();
    let xp = x.as_ptr();
    // Independent FMA chains per activation row (hide the FMA latency; fewer rows, more).
    let ch = if NB == 1 {
        4
    } else if NB == 2 {
        2
    } else {
        1
    };
    let mut tot = [_mm256_setzero_ps(); NB];
    if block_size >= 64 {
        let groups = block_size / 64;
        for (blk, &s) in scales.iter().enumerate() {
            let mut acc = [[_mm256_setzero_ps(); 4]; NB];
            for g in 0..groups {
                let base = blk * block_size + g * 64;
                let w = decode64(cp.add(base / 2), &t, nib);
                for b in 0..NB {
                    let xb = xp.add(b * n_in + base);
                    for (h, wh) in w.iter().enumerate() {
                        for (r, wr) in wh.iter().enumerate() {
                            let a = &mut acc[b][r % ch];
                            let xv = _mm256_loadu_ps(xb.add(32 * h + 8 * r));
                            *a = _mm256_fmadd_ps(*wr, xv, *a);
                        }
                    }
                }
            }
            let vs = _mm256_set1_ps(s);
            for b in 0..NB {
                let mut sum = acc[b][0];
                for a in &acc[b][1..ch] {
                    sum = _mm256_add_ps(sum, *a);
                }
                tot[b] = _mm256_fmadd_ps(sum, vs, tot[b]);
            }
        }
    } else if block_size == 32 {
        let groups = block_size / 32;
        for (blk, &s) in scales.iter().enumerate() {
            let mut acc = [[_mm256_setzero_ps(); 4]; NB];
            for g in 0..groups {
                let base = blk * block_size + g * 32;
                let w = decode32(cp.add(base / 2), &t, shifts, nib);
                for b in 0..NB {
                    let xb = xp.add(b * n_in + base);
                    for (r, wr) in w.iter().enumerate() {
                        let a = &mut acc[b][r % ch];
                        *a = _mm256_fmadd_ps(*wr, _mm256_loadu_ps(xb.add(8 * r)), *a);
                    }
                }
            }
            let vs = _mm256_set1_ps(s);
            for b in 0..NB {
                let mut sum = acc[b][0];
                for a in &acc[b][1..ch] {
                    sum = _mm256_add_ps(sum, *a);
                }
                tot[b] = _mm256_fmadd_ps(sum, vs, tot[b]);
            }
        }
    } else {
        // Block size 16: the first two registers of a group belong to one block, the last
        // two to the next; a trailing half group (in % 32 == 16) is decoded the same way.
        for g in 0..n_in.div_ceil(32) {
            let base = g * 32;
            let whole = base + 32 <= n_in;
            let w = if whole {
                decode32(cp.add(base / 2), &t, shifts, nib)
            } else {
                let mut tail = [0u8; 16];
                tail[..8].copy_from_slice(&codes[base / 2..base / 2 + 8]);
                decode32(tail.as_ptr(), &t, shifts, nib)
            };
            let s0 = _mm256_set1_ps(scales[2 * g]);
            for b in 0..NB {
                let xb = xp.add(b * n_in + base);
                let mut a = _mm256_mul_ps(w[0], _mm256_loadu_ps(xb));
                a = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xb.add(8)), a);
                tot[b] = _mm256_fmadd_ps(a, s0, tot[b]);
                if whole {
                    let s1 = _mm256_set1_ps(scales[2 * g + 1]);
                    let mut c = _mm256_mul_ps(w[2], _mm256_loadu_ps(xb.add(16)));
                    c = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xb.add(24)), c);
                    tot[b] = _mm256_fmadd_ps(c, s1, tot[b]);
                }
            }
        }
    }
    for b in 0..NB {
        y[b] = hsum(tot[b]);
    }
}

// The int16 path.

/// Low and high bytes of the integer levels, each broadcast to both lanes.
#[inline(always)]
unsafe fn int16_tables(l16: &[i16; 16]) -> (__m256i, __m256i) {
    let lo = l16.map(|v| v as u16 as u8);
    let hi = l16.map(|v| ((v as u16) >> 8) as u8);
    (
        _mm256_broadcastsi128_si256(_mm_loadu_si128(lo.as_ptr() as *const __m128i)),
        _mm256_broadcastsi128_si256(_mm_loadu_si128(hi.as_ptr() as *const __m128i)),
    )
}

/// int16 row kernel, `Order::Step64` activations; block size a multiple of 64.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `xq` holds rows `first_row..first_row + NB`.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)]
unsafe fn int16_step64<const NB: usize>(
    w: &WeightRow<'_>,
    (l16, dl): (&[i16; 16], f32),
    xq: &Quantized<i16>,
    first_row: usize,
    y: &mut [f32],
) {
    let (codes, scales, block_size) = (w.codes, w.scales, w.block_size);
    const GROUP: usize = <i16 as QInt>::GROUP;
    let (tlo, thi) = int16_tables(l16);
    let nib = _mm256_set1_epi8(15);
    let cp = codes.as_ptr();
    let qp: [*const i16; NB] = row_ptrs(&xq.q, xq.padded, first_row);
    let dp: [*const f32; NB] = row_ptrs(&xq.d, xq.groups, first_row);
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
                    let m = _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1));
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

/// int16 row kernel, `Order::Step32` activations; block size 16 or 32 (a trailing half step
/// when `in % 32 == 16`).
///
/// # Safety
/// The CPU must support AVX2 and FMA; `xq` holds rows `first_row..first_row + NB`.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)]
unsafe fn int16_step32<const NB: usize>(
    w: &WeightRow<'_>,
    (l16, dl): (&[i16; 16], f32),
    xq: &Quantized<i16>,
    first_row: usize,
    y: &mut [f32],
) {
    let (codes, scales, block_size) = (w.codes, w.scales, w.block_size);
    const GROUP: usize = <i16 as QInt>::GROUP;
    let n_in = codes.len() * 2;
    let (tlo, thi) = int16_tables(l16);
    let shifts = _mm256_setr_epi32(4, 4, 4, 4, 0, 0, 0, 0);
    let nib = _mm256_set1_epi8(15);
    let qp: [*const i16; NB] = row_ptrs(&xq.q, xq.padded, first_row);
    let dp: [*const f32; NB] = row_ptrs(&xq.d, xq.groups, first_row);
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
                let m1 = _mm256_madd_epi16(w1, _mm256_loadu_si256(xb.add(16) as *const __m256i));
                let s0 = _mm256_set1_ps(scales[base / 32] * d);
                tot[b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(m0, m1)), s0, tot[b]);
            }
        }
    }
    for b in 0..NB {
        y[b] = hsum(tot[b]) * dl;
    }
}

// The int8 path.

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

/// int8 row kernel, `Order::Step64` activations; block size a multiple of 64. Steps of 64
/// values alternate between two accumulators (two independent FMA chains).
///
/// # Safety
/// The CPU must support AVX2 and FMA; `xq` holds rows `first_row..first_row + NB` in
/// `Order::Step64`.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)]
unsafe fn int8_step64<const NB: usize>(
    w: &WeightRow<'_>,
    (l8, dl): (&[i8; 16], f32),
    xq: &Quantized<i8>,
    first_row: usize,
    y: &mut [f32],
) {
    let (codes, scales, block_size) = (w.codes, w.scales, w.block_size);
    let table = _mm256_broadcastsi128_si256(_mm_loadu_si128(l8.as_ptr() as *const __m128i));
    let nib = _mm256_set1_epi8(15);
    let cp = codes.as_ptr();
    let sp = scales.as_ptr();
    let v = xq;
    let per_row = v.padded.div_ceil(64) * 8;
    let qp: [*const i8; NB] = row_ptrs(&v.q, v.padded, first_row);
    let dp: [*const f32; NB] = row_ptrs(&xq.lane_steps, per_row, first_row);
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

/// int8 row kernel, `Order::Step32` activations; block size 16 or 32 (a trailing half step
/// when `in % 32 == 16`).
///
/// # Safety
/// The CPU must support AVX2 and FMA; `xq` holds rows `first_row..first_row + NB` in
/// `Order::Step32`.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)]
unsafe fn int8_step32<const NB: usize>(
    w: &WeightRow<'_>,
    (l8, dl): (&[i8; 16], f32),
    xq: &Quantized<i8>,
    first_row: usize,
    y: &mut [f32],
) {
    let (codes, scales, block_size) = (w.codes, w.scales, w.block_size);
    let n_in = codes.len() * 2;
    let table = _mm256_broadcastsi128_si256(_mm_loadu_si128(l8.as_ptr() as *const __m128i));
    let nib = _mm_set1_epi8(15);
    let v = xq;
    let qp: [*const i8; NB] = row_ptrs(&v.q, v.padded, first_row);
    let dp: [*const f32; NB] = row_ptrs(&v.d, v.groups, first_row);
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

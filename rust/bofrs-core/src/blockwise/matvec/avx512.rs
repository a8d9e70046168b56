//! The AVX-512 row kernels of the fused matvec, for [`Isa::Avx512`](crate::isa::Isa::Avx512):
//! 128 weights (64 code bytes, one 512-bit load) per step.
//!
//! - float (every block size): each i32 lane of the codes holds 8 nibbles; shifting the lanes
//!   by `4k` and `vpermps` (which reads the low 4 bits of each index) against the 16 f32 levels
//!   in one register yields the exact levels of weights `8j + (k ^ 1)` in lane `j`: 7 shifts and
//!   8 permutes per 128 weights, against 8 shuffles + 16 unpacks on AVX2. Activations are
//!   permuted once per call to that order ([`permute128`]). Sums are in another order than the
//!   portable and AVX2 kernels': within float tolerance of them, not bit for bit.
//! - int8 (block sizes >= 64): `vpshufb` turns 64 nibbles into `level + 128` (unsigned bytes),
//!   `vpdpbusd` multiplies them with the int8 activations and sums 4 products per i32 lane; the
//!   accumulator starts at `-128 * sum(x)` of the lane's 8 activations, so each lane ends at the
//!   exact integer `sum(level * x)` of the AVX2 kernel's lane (no saturation: `|level + 128| <=
//!   255`, 4 products per step). Lanes 0-7 are one 64-value step of the AVX2 kernel, lanes 8-15
//!   the next, i.e. its two accumulator chains: the float operations are the AVX2 kernel's, lane
//!   for lane, so results are bit-identical to [`super::x86`]'s.
//! - int16 (block sizes >= 64): a `vpermb` puts the code bytes of each AVX2 i32 lane into one
//!   i32 lane, `vpermw` looks up the int16 levels, `vpdpwssd` sums pairs of products: the same
//!   integer lane sums as the AVX2 kernel, then its float operations on 256-bit halves, so
//!   results are bit-identical to it too.

use super::quant::Quantized;
use super::WeightRow;
use crate::numeric::element::Element;
use std::arch::x86_64::*;

/// Weights per kernel step.
pub(super) const CHUNK: usize = 128;

/// Float dot products of one weight row with `y.len()` (1..=4) activation rows of `x`
/// ([`permute128`]d, rows `stride` apart).
///
/// # Safety
/// The CPU must support [`crate::isa::Isa::Avx512`].
#[inline(always)]
pub(super) unsafe fn float_rows(
    w: &WeightRow<'_>,
    levels: &[f32; 16],
    x: &[f32],
    stride: usize,
    y: &mut [f32],
) {
    by_tile!(float_chunks, y, (w, levels, x, stride))
}

/// int8 dot products of one weight row (block size >= 64) with `y.len()` (1..=4) activation
/// rows of `xq` from row `first_row` (in [`Order::Step128`](super::quant::Order::Step128)).
///
/// # Safety
/// The CPU must support [`crate::isa::Isa::Avx512`].
#[inline(always)]
pub(super) unsafe fn int8_rows(
    w: &WeightRow<'_>,
    levels: (&[i8; 16], f32),
    xq: &Quantized<i8>,
    first_row: usize,
    y: &mut [f32],
) {
    by_tile!(int8_chunks, y, (w, levels, xq, first_row))
}

/// int16 dot products of one weight row (block size >= 64) with `y.len()` (1..=4) activation
/// rows of `xq` from row `first_row` (in [`Order::Step128`](super::quant::Order::Step128)).
///
/// # Safety
/// The CPU must support [`crate::isa::Isa::Avx512`].
#[inline(always)]
pub(super) unsafe fn int16_rows(
    w: &WeightRow<'_>,
    levels: (&[i16; 16], f32),
    xq: &Quantized<i16>,
    first_row: usize,
    y: &mut [f32],
) {
    by_tile!(int16_chunks, y, (w, levels, xq, first_row))
}

/// Position of weight `j` of a 128-weight chunk in the float kernel's order: lane `j / 8` of
/// register `(j % 8) ^ 1`.
#[inline(always)]
pub(super) fn float_dest(j: usize) -> usize {
    16 * ((j % 8) ^ 1) + j / 8
}

/// Activations in f32 in the float kernel's order, each row zero-padded to a multiple of
/// [`CHUNK`]; returns them and the row stride.
pub(super) fn permute128<X: Element>(x: &[X], batch: usize, n_in: usize) -> (Vec<f32>, usize) {
    let stride = n_in.div_ceil(CHUNK) * CHUNK;
    let mut v = vec![0f32; batch * stride];
    for (dst, src) in v.chunks_exact_mut(stride).zip(x.chunks_exact(n_in)) {
        for (c, part) in src.chunks(CHUNK).enumerate() {
            let out = &mut dst[c * CHUNK..(c + 1) * CHUNK];
            for (j, value) in part.iter().enumerate() {
                out[float_dest(j)] = value.to_f32();
            }
        }
    }
    (v, stride)
}

/// Pointers to rows `first..first + NB` of `data` (`per_row` values each).
#[inline(always)]
fn row_ptrs<T, const NB: usize>(data: &[T], per_row: usize, first: usize) -> [*const T; NB] {
    std::array::from_fn(|b| data[(first + b) * per_row..].as_ptr())
}

/// The 64 code bytes of chunk `c` (fewer, zero-filled, for a partial last chunk of `bytes`).
#[inline(always)]
unsafe fn load_codes(codes: &[u8], c: usize) -> __m512i {
    let at = c * CHUNK / 2;
    let left = codes.len() - at;
    if left >= 64 {
        _mm512_loadu_si512(codes.as_ptr().add(at) as *const __m512i)
    } else {
        _mm512_maskz_loadu_epi8((1u64 << left) - 1, codes.as_ptr().add(at) as *const i8)
    }
}

// The float path.

/// The block scale of each lane of chunk `c` (lane `j` holds weights `128c + 8j..+8`): block
/// sizes 16..=128 (a partial last chunk reads only the scales it has).
#[inline(always)]
unsafe fn lane_scales(scales: &[f32], block_size: usize, c: usize) -> __m512 {
    if block_size >= CHUNK {
        return _mm512_set1_ps(*scales.get_unchecked(c * CHUNK / block_size));
    }
    let per = CHUNK / block_size;
    let at = c * per;
    let have = (scales.len() - at).min(per);
    let loaded = _mm512_maskz_loadu_ps(((1u32 << have) - 1) as u16, scales.as_ptr().add(at));
    // Lane j takes scale 8j / block_size.
    let shift = block_size.trailing_zeros() - 3;
    let idx = _mm512_srlv_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(shift as i32),
    );
    _mm512_permutexvar_ps(idx, loaded)
}

/// How far ahead of its loads the float kernel prefetches codes. The hardware prefetchers alone
/// leave long rows (4096 x 11008) up to 1.6x slower per weight than short ones; 2 KiB ahead
/// closed most of that gap in `examples/matvec_time`, and 4 KiB gave about the same.
const PREFETCH_BYTES: usize = 2048;

/// Float row kernel for `NB` activation rows of `x` (in [`permute128`]'s order, `stride`
/// apart).
///
/// # Safety
/// The CPU must support [`crate::isa::Isa::Avx512`]; `x` holds `NB` rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma")]
#[allow(clippy::needless_range_loop)]
unsafe fn float_chunks<const NB: usize>(
    w: &WeightRow<'_>,
    levels: &[f32; 16],
    x: &[f32],
    stride: usize,
    y: &mut [f32],
) {
    let (codes, scales, block_size) = (w.codes, w.scales, w.block_size);
    let n_in = codes.len() * 2;
    debug_assert!(x.len() >= (NB - 1) * stride + n_in.div_ceil(CHUNK) * CHUNK && y.len() >= NB);
    let lv = _mm512_loadu_ps(levels.as_ptr());
    let xp: [*const f32; NB] = std::array::from_fn(|b| x.as_ptr().add(b * stride));
    let n_chunks = n_in.div_ceil(CHUNK);
    // Chunks per block scale (1 for block sizes up to 128).
    let per_block = (block_size / CHUNK).max(1);
    let mut tot = [_mm512_setzero_ps(); NB];
    let mut blk = [_mm512_setzero_ps(); NB];
    for c in 0..n_chunks {
        // A hint, never a fault: the codes this row (or the next one, rows are contiguous)
        // reads PREFETCH_BYTES on.
        _mm_prefetch::<_MM_HINT_T0>(
            codes.as_ptr().wrapping_add(c * 64 + PREFETCH_BYTES) as *const i8
        );
        let raw = load_codes(codes, c);
        let wv = [
            _mm512_permutexvar_ps(raw, lv),
            _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(raw), lv),
            _mm512_permutexvar_ps(_mm512_srli_epi32::<8>(raw), lv),
            _mm512_permutexvar_ps(_mm512_srli_epi32::<12>(raw), lv),
            _mm512_permutexvar_ps(_mm512_srli_epi32::<16>(raw), lv),
            _mm512_permutexvar_ps(_mm512_srli_epi32::<20>(raw), lv),
            _mm512_permutexvar_ps(_mm512_srli_epi32::<24>(raw), lv),
            _mm512_permutexvar_ps(_mm512_srli_epi32::<28>(raw), lv),
        ];
        for b in 0..NB {
            let xc = xp[b].add(c * CHUNK);
            let mut a0 = _mm512_mul_ps(wv[0], _mm512_loadu_ps(xc));
            let mut a1 = _mm512_mul_ps(wv[1], _mm512_loadu_ps(xc.add(16)));
            for k in (2..8).step_by(2) {
                a0 = _mm512_fmadd_ps(wv[k], _mm512_loadu_ps(xc.add(16 * k)), a0);
                a1 = _mm512_fmadd_ps(wv[k + 1], _mm512_loadu_ps(xc.add(16 * k + 16)), a1);
            }
            let a = _mm512_add_ps(a0, a1);
            if per_block == 1 {
                tot[b] = _mm512_fmadd_ps(a, lane_scales(scales, block_size, c), tot[b]);
            } else {
                blk[b] = _mm512_add_ps(blk[b], a);
            }
        }
        if per_block > 1 && (c + 1) % per_block == 0 {
            let s = _mm512_set1_ps(*scales.get_unchecked(c / per_block));
            for b in 0..NB {
                tot[b] = _mm512_fmadd_ps(blk[b], s, tot[b]);
                blk[b] = _mm512_setzero_ps();
            }
        }
    }
    for b in 0..NB {
        y[b] = _mm512_reduce_add_ps(tot[b]);
    }
}

// The integer paths.

/// `y[b] = dl * hsum(chain 0 + chain 1)` with the chains in the low and high 256-bit halves of
/// `tot[b]` (the AVX2 kernels' final reduction, operation for operation).
#[inline(always)]
unsafe fn finish_halves<const NB: usize>(tot: [__m512; NB], dl: f32, y: &mut [f32]) {
    for (b, yb) in y.iter_mut().enumerate().take(NB) {
        let lo = _mm512_castps512_ps256(tot[b]);
        let hi = _mm512_extractf32x8_ps::<1>(tot[b]);
        *yb = super::x86::hsum(_mm256_add_ps(lo, hi)) * dl;
    }
}

/// int8 row kernel, [`Order::Step128`](super::quant::Order::Step128) activations; block size a
/// multiple of 64. Bit-identical to the AVX2 `int8_step64` (see the module docs).
///
/// # Safety
/// The CPU must support [`crate::isa::Isa::Avx512`]; `xq` holds rows `first_row..first_row +
/// NB` in `Order::Step128`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma")]
#[allow(clippy::needless_range_loop)]
unsafe fn int8_chunks<const NB: usize>(
    w: &WeightRow<'_>,
    (l8, dl): (&[i8; 16], f32),
    xq: &Quantized<i8>,
    first_row: usize,
    y: &mut [f32],
) {
    let (codes, scales, block_size) = (w.codes, w.scales, w.block_size);
    // level + 128 as unsigned bytes, the table in every 128-bit lane.
    let biased = l8.map(|l| (l as i16 + 128) as u8);
    let table = _mm512_broadcast_i32x4(_mm_loadu_si128(biased.as_ptr() as *const __m128i));
    let nib = _mm512_set1_epi8(15);
    let per_row = xq.padded / 8;
    let qp: [*const i8; NB] = row_ptrs(&xq.q, xq.padded, first_row);
    let dp: [*const f32; NB] = row_ptrs(&xq.lane_steps, per_row, first_row);
    let cp: [*const i32; NB] = row_ptrs(&xq.lane_sums, per_row, first_row);
    let steps_per_block = block_size / 64;
    let n_steps = codes.len() / 32;
    let sp = scales.as_ptr();
    // Lanes 0-7 take step 2c's scale, lanes 8-15 step 2c + 1's.
    let pair = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    let mut tot = [_mm512_setzero_ps(); NB];
    for c in 0..n_steps.div_ceil(2) {
        let raw = load_codes(codes, c);
        let even = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16::<4>(raw), nib));
        let odd = _mm512_shuffle_epi8(table, _mm512_and_si512(raw, nib));
        let whole = 2 * c + 1 < n_steps;
        let s = if steps_per_block == 1 {
            let two = _mm512_maskz_loadu_ps(if whole { 0b11 } else { 0b01 }, sp.add(2 * c));
            _mm512_permutexvar_ps(pair, two)
        } else {
            _mm512_set1_ps(*sp.add(2 * c / steps_per_block))
        };
        for b in 0..NB {
            let xc = qp[b].add(c * CHUNK);
            let mut acc = _mm512_loadu_si512(cp[b].add(16 * c) as *const __m512i);
            acc = _mm512_dpbusd_epi32(acc, even, _mm512_loadu_si512(xc as *const __m512i));
            acc = _mm512_dpbusd_epi32(acc, odd, _mm512_loadu_si512(xc.add(64) as *const __m512i));
            let ds = _mm512_mul_ps(_mm512_loadu_ps(dp[b].add(16 * c)), s);
            let p = _mm512_cvtepi32_ps(acc);
            tot[b] = if whole {
                _mm512_fmadd_ps(p, ds, tot[b])
            } else {
                // A last single step belongs to chain 0 only.
                _mm512_mask3_fmadd_ps(p, ds, tot[b], 0x00FF)
            };
        }
    }
    finish_halves(tot, dl, y);
}

/// Where the int16 kernel's `vpermb` takes each byte of its 64 code bytes from: i32 lane `i`
/// (group `i / 8`, AVX2 lane `L = i % 8`) gets code bytes `base, base + 1, base + 8, base + 9`
/// of its group with `base = 2L` (`L < 4`) or `2L + 8`: the bytes of the AVX2 int16 kernel's
/// lane `L`.
pub(super) const fn int16_byte_source(i: usize) -> [usize; 4] {
    let (group, lane) = (i / 8, i % 8);
    let base = 32 * group + if lane < 4 { 2 * lane } else { 2 * lane + 8 };
    [base, base + 1, base + 8, base + 9]
}

/// The int16 kernel's `vpermb` indices, [`int16_byte_source`] for its 64 bytes (built at compile
/// time: a per-row loop cost as much as the products of a 4096-wide row).
static INT16_BYTE_PERM: [u8; 64] = {
    let mut perm = [0u8; 64];
    let mut p = 0;
    while p < 64 {
        perm[p] = int16_byte_source(p / 4)[p % 4] as u8;
        p += 1;
    }
    perm
};

/// Position, in the int16 kernel's order, of weight `j` of a 128-weight chunk: the inverse of
/// [`int16_byte_source`] for its code byte, then word `w` of register `r` holds nibble `r` of
/// permuted word `w` (`r = 0`: low nibble of its first byte, 1: high nibble, 2 and 3: the same
/// of its second byte).
pub(super) fn int16_dest(j: usize) -> usize {
    // Weight j is the nibble (high if j is even) of code byte j / 2.
    let (group, b) = (j / 64, (j / 2) % 32);
    let lane = 4 * (b / 16) + (b % 8) / 2;
    let slot = 2 * ((b % 16) / 8) + b % 2;
    let at = 4 * (8 * group + lane) + slot;
    let (word, second) = (at / 2, at % 2);
    32 * (2 * second + usize::from(j % 2 == 0)) + word
}

/// int16 row kernel, [`Order::Step128`](super::quant::Order::Step128) activations; block size
/// a multiple of 64. Bit-identical to the AVX2 `int16_step64` (see the module docs).
///
/// # Safety
/// The CPU must support [`crate::isa::Isa::Avx512`]; `xq` holds rows `first_row..first_row +
/// NB` in `Order::Step128`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma")]
#[allow(clippy::needless_range_loop)]
unsafe fn int16_chunks<const NB: usize>(
    w: &WeightRow<'_>,
    (l16, dl): (&[i16; 16], f32),
    xq: &Quantized<i16>,
    first_row: usize,
    y: &mut [f32],
) {
    let (codes, scales, block_size) = (w.codes, w.scales, w.block_size);
    let mut table = [0i16; 32];
    table[..16].copy_from_slice(l16);
    table[16..].copy_from_slice(l16);
    let lt = _mm512_loadu_si512(table.as_ptr() as *const __m512i);
    let perm = _mm512_loadu_si512(INT16_BYTE_PERM.as_ptr() as *const __m512i);
    let nib = _mm512_set1_epi16(15);
    let qp: [*const i16; NB] = row_ptrs(&xq.q, xq.padded, first_row);
    let dp: [*const f32; NB] = row_ptrs(&xq.d, xq.groups, first_row);
    let groups_per_block = block_size / 64;
    let n_groups = codes.len() / 32;
    let mut tot = [_mm256_setzero_ps(); NB];
    let mut acc = [_mm256_setzero_ps(); NB];
    for c in 0..n_groups.div_ceil(2) {
        let raw = _mm512_permutexvar_epi8(perm, load_codes(codes, c));
        let wv = [
            _mm512_permutexvar_epi16(_mm512_and_si512(raw, nib), lt),
            _mm512_permutexvar_epi16(_mm512_and_si512(_mm512_srli_epi16::<4>(raw), nib), lt),
            _mm512_permutexvar_epi16(_mm512_and_si512(_mm512_srli_epi16::<8>(raw), nib), lt),
            _mm512_permutexvar_epi16(_mm512_srli_epi16::<12>(raw), lt),
        ];
        let two = 2 * c + 1 < n_groups;
        let mut part = [_mm512_setzero_ps(); NB];
        for b in 0..NB {
            let xc = qp[b].add(c * CHUNK);
            let mut m = _mm512_setzero_si512();
            for (r, wr) in wv.iter().enumerate() {
                let xv = _mm512_loadu_si512(xc.add(32 * r) as *const __m512i);
                m = _mm512_dpwssd_epi32(m, *wr, xv);
            }
            part[b] = _mm512_cvtepi32_ps(m);
        }
        // The float steps of the AVX2 kernel, one group (256-bit half) at a time.
        for half in 0..1 + usize::from(two) {
            let g = 2 * c + half;
            for b in 0..NB {
                let p = if half == 0 {
                    _mm512_castps512_ps256(part[b])
                } else {
                    _mm512_extractf32x8_ps::<1>(part[b])
                };
                let d = _mm256_broadcast_ss(&*dp[b].add(g));
                acc[b] = _mm256_fmadd_ps(p, d, acc[b]);
            }
            if (g + 1) % groups_per_block == 0 {
                let vs = _mm256_set1_ps(*scales.get_unchecked(g / groups_per_block));
                for b in 0..NB {
                    tot[b] = _mm256_fmadd_ps(acc[b], vs, tot[b]);
                    acc[b] = _mm256_setzero_ps();
                }
            }
        }
    }
    for b in 0..NB {
        y[b] = super::x86::hsum(tot[b]) * dl;
    }
}

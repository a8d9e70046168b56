//! The AVX2 kernels of the OPQ pass: the exact rule's twins of [`super::portable`] (the same
//! results bit for bit) and the cheap filter in front of it ([`FilterKernels`]: it only decides
//! which blocks the exact rule is applied to).

use super::pass::{
    filtered_pass, Blocks, ExactKernels, FilterKernels, Found, GroupPlan, Kept, GROUP_BLOCKS,
};
use super::portable::MASK_WORDS;
use super::rule::{FilterBound, Threshold, NARROW, WIDEN};
use super::Outlier;
use crate::blockwise::codebook::Normalization;
use crate::blockwise::encode::x86::{abs_equal_word, load8, word_of_masks16, Avx2};
use crate::numeric::element::{Bf16, Element, Kind};
use std::arch::x86_64::*;

impl ExactKernels for Avx2<'_> {
    #[inline(always)]
    fn sums<T: Element>(&self, block: &[T]) -> (f64, f64) {
        // SAFETY: an `Avx2` exists only where AVX2 runs (see `Avx2::new`).
        unsafe { sums_avx2(block) }
    }
    #[inline(always)]
    fn scan<T: Element>(&self, block: &[T], limit2: f64, t32: f32, mask: &mut [u64; MASK_WORDS]) {
        // SAFETY: as above.
        unsafe { scan_avx2(block, limit2, t32, mask) }
    }
    #[inline(always)]
    fn raw_scale<T: Element>(
        &self,
        block: &[T],
        limit2: f64,
        t32: f32,
        norm: Normalization,
    ) -> f32 {
        // SAFETY: as above.
        match unsafe { kept_max_avx2(block, t32) } {
            None => super::raw_scale_within(block, limit2, norm),
            Some(max) if norm == Normalization::Absmax => max,
            Some(max) => super::signed_scale_within(block, limit2, max),
        }
    }
    #[inline(always)]
    fn signed_masked<T: Element>(&self, block: &[T], mask: &[u64; MASK_WORDS], max: f32) -> f32 {
        // SAFETY: as above.
        unsafe { signed_masked_avx2(block, mask, max) }
    }
    #[inline(always)]
    fn first_pass<E: Element>(
        &self,
        task: Blocks<'_, E>,
        scales: &mut [f32],
        found: &mut Found,
    ) -> usize {
        filtered_pass(self, task, scales, found)
    }
}

impl FilterKernels for Avx2<'_> {
    #[inline(always)]
    fn f32_sums<T: Element>(&self, block: &[T]) -> Option<(f32, f32)> {
        // SAFETY: as above.
        unsafe { f32_sums_avx2(block) }
    }
    #[inline(always)]
    fn group_filter<T: Element>(
        &self,
        group: &[T],
        (bs, norm): (usize, Normalization),
        (threshold, bound): (&Threshold, &FilterBound),
        plan: &mut GroupPlan,
    ) -> bool {
        // SAFETY: as above.
        unsafe {
            match norm {
                Normalization::Absmax => {
                    group_filter_avx2::<T, false>(group, bs, threshold, bound, plan)
                }
                Normalization::SignedAbsmax => {
                    group_filter_avx2::<T, true>(group, bs, threshold, bound, plan)
                }
            }
        }
    }
    #[inline(always)]
    fn split<T: Element>(
        &self,
        block: &[T],
        (t_lo, t_hi): (f32, f32),
        norm: Normalization,
        mask: &mut [u64; MASK_WORDS],
    ) -> Option<Kept> {
        // SAFETY: as above.
        unsafe {
            match norm {
                Normalization::Absmax => split_avx2::<T, false>(block, t_lo, t_hi, mask),
                Normalization::SignedAbsmax => split_avx2::<T, true>(block, t_lo, t_hi, mask),
            }
        }
    }
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn take_decided<T: Element>(
        &self,
        group: &[T],
        (bs, norm): (usize, Normalization),
        plan: &GroupPlan,
        bits: u32,
        first_index: u64,
        scales: &mut [f32],
        outliers: &mut Vec<Outlier>,
    ) -> Option<u32> {
        if !matches!(T::KIND, Kind::BFloat16)
            || bs != 64
            || group.len() != GROUP_BLOCKS * 64
            || scales.len() != GROUP_BLOCKS
        {
            return None;
        }
        // SAFETY: `T` is `Bf16` (checked), so the cast keeps the type.
        let group =
            unsafe { std::slice::from_raw_parts(group.as_ptr() as *const Bf16, group.len()) };
        // SAFETY: as above; the lengths were checked.
        Some(unsafe {
            match norm {
                Normalization::Absmax => {
                    take_decided_bf16::<false>(group, plan, bits, first_index, scales, outliers)
                }
                Normalization::SignedAbsmax => {
                    take_decided_bf16::<true>(group, plan, bits, first_index, scales, outliers)
                }
            }
        })
    }
}

/// f32 shifted sums `sum(v - shift)` and sums of squares (fused) in two chains each.
struct ShiftedSums {
    s: [__m256; 2],
    q: [__m256; 2],
}

impl ShiftedSums {
    #[inline(always)]
    unsafe fn new() -> Self {
        Self {
            s: [_mm256_setzero_ps(); 2],
            q: [_mm256_setzero_ps(); 2],
        }
    }

    /// Adds 16 values (`v0` into the first chains, `v1` into the second).
    #[inline(always)]
    unsafe fn add(&mut self, v0: __m256, v1: __m256, shift: __m256) {
        let d0 = _mm256_sub_ps(v0, shift);
        let d1 = _mm256_sub_ps(v1, shift);
        self.s[0] = _mm256_add_ps(self.s[0], d0);
        self.s[1] = _mm256_add_ps(self.s[1], d1);
        self.q[0] = _mm256_fmadd_ps(d0, d0, self.q[0]);
        self.q[1] = _mm256_fmadd_ps(d1, d1, self.q[1]);
    }

    /// The sums, lane by lane (the two chains added).
    #[inline(always)]
    unsafe fn s(&self) -> __m256 {
        _mm256_add_ps(self.s[0], self.s[1])
    }

    /// The sums of squares, lane by lane.
    #[inline(always)]
    unsafe fn q(&self) -> __m256 {
        _mm256_add_ps(self.q[0], self.q[1])
    }
}

/// Lanes of 4 vectors reduced by `op` across each vector, as the 4 lanes of one
/// (`[op(v0), .., op(v3)]`), by a transposing tree (`op` associative and commutative).
#[inline(always)]
unsafe fn reduce4(v: [__m256; 4], op: impl Fn(__m256, __m256) -> __m256) -> __m128 {
    let pair = |a: __m256, b: __m256| op(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
    let (a, b) = (
        _mm256_castps_pd(pair(v[0], v[1])),
        _mm256_castps_pd(pair(v[2], v[3])),
    );
    let quad = op(
        _mm256_castpd_ps(_mm256_unpacklo_pd(a, b)),
        _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)),
    );
    let halves = op(quad, _mm256_permute2f128_ps::<0x01>(quad, quad));
    _mm256_castps256_ps128(halves)
}

/// One block's maxima and its f32 shifted sums (as [`f32_sums_avx2`], in another order: any
/// order is fine for the filter), in one pass of 16 values at a time (`block.len() % 16 ==
/// 0`). The maxima are 32-bit lanes: without `SIGNS`, of the
/// `abs_bits` (and zeros); with `SIGNS`, of the raw bits as unsigned (the largest is a
/// negative value's, sign bit set, when the block has one) and as signed (sign-extended: the
/// largest is a non-negative value's, when the block has one), which [`sign_split`] turns
/// into magnitudes.
#[inline(always)]
unsafe fn block_stats<E: Element, const SIGNS: bool>(
    block: *const E,
    len: usize,
) -> (__m256i, __m256i, __m256, __m256) {
    let vk = _mm256_set1_ps((*block).to_f32());
    let mut sums = ShiftedSums::new();
    let half = !matches!(E::KIND, Kind::Float32);
    // Start at the least unsigned (0) and signed (the sign bit alone) raw bits.
    let (mut hi_u, mut hi_s) = if half {
        (_mm256_setzero_si256(), _mm256_set1_epi16(i16::MIN))
    } else {
        (_mm256_setzero_si256(), _mm256_set1_epi32(i32::MIN))
    };
    for i in 0..len / 16 {
        let p = block.add(i * 16);
        let (v0, v1) = if half {
            let raw = _mm256_loadu_si256(p as *const __m256i);
            if SIGNS {
                hi_u = _mm256_max_epu16(hi_u, raw);
                hi_s = _mm256_max_epi16(hi_s, raw);
            } else {
                let abs = _mm256_and_si256(raw, _mm256_set1_epi16(0x7fff));
                hi_u = _mm256_max_epu16(hi_u, abs);
            }
            if matches!(E::KIND, Kind::BFloat16) {
                // Each 32-bit lane holds two bfloat16: shifted up, the first; masked, the
                // second (exact f32 values, in another order than load8's).
                (
                    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(raw)),
                    _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(-65536))),
                )
            } else {
                (
                    _mm256_cvtph_ps(_mm256_castsi256_si128(raw)),
                    _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(raw)),
                )
            }
        } else {
            let (v0, v1) = (
                _mm256_loadu_ps(p as *const f32),
                _mm256_loadu_ps(p.add(8) as *const f32),
            );
            let (r0, r1) = (_mm256_castps_si256(v0), _mm256_castps_si256(v1));
            if SIGNS {
                hi_u = _mm256_max_epu32(hi_u, _mm256_max_epu32(r0, r1));
                hi_s = _mm256_max_epi32(hi_s, _mm256_max_epi32(r0, r1));
            } else {
                let abs = _mm256_set1_epi32(0x7fff_ffff);
                let bits = _mm256_max_epu32(_mm256_and_si256(r0, abs), _mm256_and_si256(r1, abs));
                hi_u = _mm256_max_epu32(hi_u, bits);
            }
            (v0, v1)
        };
        sums.add(v0, v1, vk);
    }
    if half {
        // 16 u16 / i16 maxima to 8 zero- / sign-extended 32-bit lanes.
        let zero = _mm256_setzero_si256();
        hi_u = _mm256_max_epu32(
            _mm256_unpacklo_epi16(hi_u, zero),
            _mm256_unpackhi_epi16(hi_u, zero),
        );
        if SIGNS {
            hi_s = _mm256_max_epi32(
                _mm256_srai_epi32::<16>(_mm256_unpacklo_epi16(zero, hi_s)),
                _mm256_srai_epi32::<16>(_mm256_unpackhi_epi16(zero, hi_s)),
            );
        }
    }
    (hi_u, hi_s, sums.s(), sums.q())
}

/// From the largest raw bits of four blocks (unsigned `hi_u`, signed `hi_s`, as
/// [`block_stats`] leaves them, reduced per block): each block's largest `abs_bits`, and
/// the masks of blocks whose values of that magnitude are all negative / all non-negative
/// (neither: both signs have it, the first value decides).
#[inline(always)]
unsafe fn sign_split<E: Element>(hi_u: __m128i, hi_s: __m128i) -> (__m128i, __m128i, __m128i) {
    let sign_shift = if matches!(E::KIND, Kind::Float32) {
        31
    } else {
        15
    };
    let magnitude = _mm_set1_epi32(((1u32 << sign_shift) - 1) as i32);
    // Largest negative magnitude, or -1 without a negative value.
    let has_negative = _mm_sub_epi32(
        _mm_setzero_si128(),
        _mm_srl_epi32(hi_u, _mm_cvtsi32_si128(sign_shift)),
    );
    let negative = _mm_or_si128(
        _mm_and_si128(hi_u, magnitude),
        _mm_xor_si128(has_negative, _mm_set1_epi32(-1)),
    );
    // Largest non-negative magnitude, or negative without a non-negative value.
    let positive = hi_s;
    (
        _mm_max_epi32(negative, positive),
        _mm_cmpgt_epi32(negative, positive),
        _mm_cmpgt_epi32(positive, negative),
    )
}

/// Four `abs_bits` (u32 lanes) as f32 lanes (exact).
#[inline(always)]
unsafe fn abs_bits_to_f32_lanes4<E: Element>(bits: __m128i) -> __m128 {
    if matches!(E::KIND, Kind::BFloat16) {
        _mm_castsi128_ps(_mm_slli_epi32::<16>(bits))
    } else if matches!(E::KIND, Kind::Float16) {
        // Lanes are below 2^16: pack to u16 in order, then convert.
        _mm_cvtph_ps(_mm_packus_epi32(bits, bits))
    } else {
        _mm_castsi128_ps(bits)
    }
}

/// Four blocks' statistics, as [`four_block_verdict`] takes them.
type FourStats = (__m128i, __m128i, __m128i, __m256d, __m256d);

/// The statistics of four consecutive blocks of `bs` values from `p`: their largest
/// `abs_bits`, their sign masks ([`sign_split`]; with `SIGNS`, else 0), and their f32
/// shifted sums and sums of squares as f64 lanes.
#[inline(always)]
unsafe fn four_block_stats<E: Element, const SIGNS: bool>(p: *const E, bs: usize) -> FourStats {
    let c = _mm256_castsi256_ps;
    let umax = |a: __m256, b: __m256| {
        c(_mm256_max_epu32(
            _mm256_castps_si256(a),
            _mm256_castps_si256(b),
        ))
    };
    let smax = |a: __m256, b: __m256| {
        c(_mm256_max_epi32(
            _mm256_castps_si256(a),
            _mm256_castps_si256(b),
        ))
    };
    let add = |a: __m256, b: __m256| _mm256_add_ps(a, b);
    let (u0, i0, s0, q0) = block_stats::<E, SIGNS>(p, bs);
    let (u1, i1, s1, q1) = block_stats::<E, SIGNS>(p.add(bs), bs);
    let (u2, i2, s2, q2) = block_stats::<E, SIGNS>(p.add(2 * bs), bs);
    let (u3, i3, s3, q3) = block_stats::<E, SIGNS>(p.add(3 * bs), bs);
    let hi_u = _mm_castps_si128(reduce4([c(u0), c(u1), c(u2), c(u3)], umax));
    let (max_bits, negative, positive) = if SIGNS {
        let hi_s = _mm_castps_si128(reduce4([c(i0), c(i1), c(i2), c(i3)], smax));
        sign_split::<E>(hi_u, hi_s)
    } else {
        (hi_u, _mm_setzero_si128(), _mm_setzero_si128())
    };
    let s = _mm256_cvtps_pd(reduce4([s0, s1, s2, s3], add));
    let ss = _mm256_cvtps_pd(reduce4([q0, q1, q2, q3], add));
    (max_bits, negative, positive, s, ss)
}

/// The filter's verdict on four blocks from their statistics ([`four_block_stats`]), in
/// f64 exactly the scalar steps of [`Threshold::provably_clean`], [`Threshold::bracket`],
/// [`super::f32_bracket`] and `f32_thresholds` (the same operations in the same order,
/// so the same verdicts): stores their maxima and f32 thresholds at `plan`'s lanes
/// `at..at + 4` and returns the masks (bit `j`: block `at + j`) of finite blocks, suspects
/// and decided suspects. Branch-free, so that the two halves of a group overlap.
#[inline(always)]
unsafe fn four_block_verdict<E: Element>(
    (max_bits, negative, positive, s, ss): FourStats,
    threshold: &Threshold,
    bound: &FilterBound,
    plan: &mut GroupPlan,
    at: usize,
) -> (u32, u32, u32, u32) {
    let pd = |x: f64| _mm256_set1_pd(x);
    let abs = _mm256_castsi256_pd(_mm256_set1_epi64x(0x7fff_ffff_ffff_ffff));
    let inf = pd(f64::INFINITY);
    _mm_storeu_si128(plan.max_bits.as_mut_ptr().add(at) as *mut __m128i, max_bits);
    let max32 = abs_bits_to_f32_lanes4::<E>(max_bits);
    _mm_storeu_ps(plan.max_abs.as_mut_ptr().add(at), max32);
    // The signed-absmax raw scales where one sign has the largest magnitude.
    let sign = _mm_and_si128(negative, _mm_set1_epi32(i32::MIN));
    _mm_storeu_ps(
        plan.signed.as_mut_ptr().add(at),
        _mm_or_ps(max32, _mm_castsi128_ps(sign)),
    );
    let decided_sign = _mm_movemask_ps(_mm_castsi128_ps(_mm_or_si128(negative, positive))) as u32;
    // Magnitude bits are below 2^31: a signed compare orders them.
    let non_finite = _mm_set1_epi32(E::NON_FINITE_ABS_BITS as i32);
    let finite_blocks =
        _mm_movemask_ps(_mm_castsi128_ps(_mm_cmpgt_epi32(non_finite, max_bits))) as u32;
    let max = _mm256_cvtps_pd(max32);
    // Finite sums (ordered compares: false for NaN).
    let finite = _mm256_and_pd(
        _mm256_cmp_pd::<_CMP_LT_OQ>(_mm256_and_pd(s, abs), inf),
        _mm256_cmp_pd::<_CMP_LT_OQ>(_mm256_and_pd(ss, abs), inf),
    );
    // Threshold::bracket.
    let a = _mm256_add_pd(_mm256_and_pd(s, abs), pd(bound.c_tiny));
    let m2_lo = _mm256_sub_pd(
        _mm256_sub_pd(
            _mm256_mul_pd(ss, pd(bound.c_ss)),
            _mm256_mul_pd(_mm256_mul_pd(a, a), pd(bound.c_a)),
        ),
        pd(bound.c_0),
    );
    let positive = _mm256_cmp_pd::<_CMP_GT_OQ>(m2_lo, _mm256_setzero_pd());
    let lo = _mm256_blendv_pd(
        pd(-1.0),
        _mm256_mul_pd(_mm256_mul_pd(m2_lo, pd(threshold.factor)), pd(1.0 - 1e-12)),
        positive,
    );
    let m2_hi = _mm256_sub_pd(
        _mm256_add_pd(_mm256_mul_pd(ss, pd(bound.h_ss)), pd(bound.h_0)),
        _mm256_mul_pd(_mm256_mul_pd(s, s), pd(bound.h_a)),
    );
    let hi = _mm256_mul_pd(
        _mm256_mul_pd(
            _mm256_max_pd(m2_hi, _mm256_setzero_pd()),
            pd(threshold.factor),
        ),
        pd(1.0 + 1e-12),
    );
    // Threshold::provably_clean.
    let clean = _mm256_and_pd(
        finite,
        _mm256_cmp_pd::<_CMP_LE_OQ>(_mm256_mul_pd(max, max), lo),
    );
    let suspects = !_mm256_movemask_pd(clean) as u32 & 0xf;
    // f32_bracket, and f32_thresholds' `max_abs > t_hi` (meaningful for suspects only).
    let lo32 = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_sqrt_pd(lo), pd(NARROW)));
    let hi32 = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_sqrt_pd(hi), pd(WIDEN)));
    let (lo64, hi64) = (_mm256_cvtps_pd(lo32), _mm256_cvtps_pd(hi32));
    let decided = _mm256_and_pd(
        _mm256_and_pd(finite, _mm256_cmp_pd::<_CMP_GT_OQ>(lo, _mm256_setzero_pd())),
        _mm256_and_pd(
            _mm256_cmp_pd::<_CMP_LE_OQ>(_mm256_mul_pd(lo64, lo64), lo),
            _mm256_cmp_pd::<_CMP_GE_OQ>(_mm256_mul_pd(hi64, hi64), hi),
        ),
    );
    let above = _mm256_cvtps_pd(_mm_cmpgt_ps(max32, hi32));
    let decided = _mm256_movemask_pd(_mm256_and_pd(decided, above)) as u32 & suspects;
    _mm_storeu_ps(plan.t_lo.as_mut_ptr().add(at), lo32);
    _mm_storeu_ps(plan.t_hi.as_mut_ptr().add(at), hi32);
    (finite_blocks, suspects, decided, !decided_sign & 0xf)
}

/// [`FilterKernels::group_filter`]: every block's largest `abs_bits` (and sign masks, with
/// `SIGNS`) and f32 shifted sums ([`block_stats`]), then the verdicts of
/// [`four_block_verdict`], into `plan`; `false` where unsupported (blocks not a
/// multiple of 16).
#[inline(always)]
pub(super) unsafe fn group_filter_avx2<E: Element, const SIGNS: bool>(
    group: &[E],
    bs: usize,
    threshold: &Threshold,
    bound: &FilterBound,
    plan: &mut GroupPlan,
) -> bool {
    if bs == 0 || bs % 16 != 0 || group.len() != GROUP_BLOCKS * bs {
        return false;
    }
    let p = group.as_ptr();
    // Both halves' statistics first, then both verdicts without a branch between them.
    let first = four_block_stats::<E, SIGNS>(p, bs);
    let second = four_block_stats::<E, SIGNS>(p.add(4 * bs), bs);
    let (f0, s0, d0, t0) = four_block_verdict::<E>(first, threshold, bound, plan, 0);
    let (f1, s1, d1, t1) = four_block_verdict::<E>(second, threshold, bound, plan, 4);
    plan.sign_ties = t0 | t1 << 4;
    plan.finite = (f0 & f1) == 0xf;
    plan.suspects = s0 | s1 << 4;
    plan.decided = d0 | d1 << 4;
    true
}

/// [`FilterKernels::take_decided`] for bfloat16 blocks of 64 values: one word of outlier bits
/// per block, kept in a register from the split to the outliers it takes.
///
/// # Safety
/// AVX2 must be supported; `group` holds [`GROUP_BLOCKS`] blocks of 64 values and
/// `scales` one slot per block.
#[inline(always)]
unsafe fn take_decided_bf16<const SIGNS: bool>(
    group: &[Bf16],
    plan: &GroupPlan,
    mut bits: u32,
    first_index: u64,
    scales: &mut [f32],
    outliers: &mut Vec<Outlier>,
) -> u32 {
    debug_assert!(group.len() == GROUP_BLOCKS * 64 && scales.len() == GROUP_BLOCKS);
    outliers.reserve(group.len() + 1);
    let len = outliers.len();
    let dst = outliers.spare_capacity_mut().as_mut_ptr();
    let mut n = 0;
    while bits != 0 {
        let j = bits.trailing_zeros() as usize;
        if plan.decided >> j & 1 == 0 {
            break;
        }
        let block = &group[j * 64..(j + 1) * 64];
        let mut word = 0u64;
        let kept = split_bf16::<Bf16, SIGNS>(
            block,
            plan.t_lo[j],
            plan.t_hi[j],
            std::slice::from_mut(&mut word),
        );
        let scale = match kept {
            Some(kept) if !SIGNS => kept.max,
            Some(Kept {
                signed: Some(signed),
                ..
            }) => signed,
            _ => break,
        };
        scales[j] = scale;
        let base = first_index + (j * 64) as u64;
        // A decided suspect has an outlier, mostly one or two: both slots are written
        // without a branch (a second slot past the block's count is rewritten by the next
        // block or left beyond the length), a loop takes any others.
        let count = word.count_ones() as usize;
        let second = word & word.wrapping_sub(1);
        let (i0, i1) = (
            (word.trailing_zeros() & 63) as usize,
            (second.trailing_zeros() & 63) as usize,
        );
        // SAFETY: `i0, i1 < 64` (masked: a word of 0 writes slots it does not count); the
        // slots written are below `n + max(count, 2)`, at most `group.len() + 1`, reserved
        // above (`n + count <= group.len()`, and a block after `group.len()` outliers is
        // impossible).
        unsafe {
            let write = |slot: usize, i: usize| {
                let value = block.get_unchecked(i).0;
                (*dst.add(slot)).write(Outlier::new(base + i as u64, value));
            };
            write(n, i0);
            write(n + 1, i1);
            let mut rest = second & second.wrapping_sub(1);
            let mut slot = n + 2;
            while rest != 0 {
                write(slot, rest.trailing_zeros() as usize);
                rest &= rest - 1;
                slot += 1;
            }
        }
        n += count;
        bits &= bits - 1;
    }
    // SAFETY: the first `n` spare slots were written above.
    unsafe { outliers.set_len(len + n) };
    bits
}

/// [`FilterKernels::split`] for whole words of 64 values: 8 values at a time, the mask of
/// `|x| > t_hi` and the maximum of the other magnitudes. A value lies between the two
/// thresholds exactly when that maximum is above `t_lo`.
#[inline(always)]
pub(super) unsafe fn split_avx2<E: Element, const SIGNS: bool>(
    block: &[E],
    t_lo: f32,
    t_hi: f32,
    mask: &mut [u64; MASK_WORDS],
) -> Option<Kept> {
    if block.is_empty() || block.len() % 64 != 0 {
        return None;
    }
    if matches!(E::KIND, Kind::BFloat16) {
        let words = block.len() / 64;
        return split_bf16::<E, SIGNS>(block, t_lo, t_hi, &mut mask[..words]);
    }
    let hi = _mm256_set1_ps(t_hi);
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let mut acc = _mm256_setzero_ps();
    for (w, word) in mask[..block.len() / 64].iter_mut().enumerate() {
        let mut bits = 0u64;
        for k in 0..8 {
            let v = _mm256_and_ps(load8(block.as_ptr().add(w * 64 + k * 8)), abs);
            let out = _mm256_cmp_ps::<_CMP_GT_OQ>(v, hi);
            acc = _mm256_max_ps(acc, _mm256_andnot_ps(out, v));
            bits |= (_mm256_movemask_ps(out) as u8 as u64) << (k * 8);
        }
        *word = bits;
    }
    let kept = hmax(acc);
    (kept <= t_lo).then_some(Kept::magnitude(kept))
}

/// [`split_avx2`] for bfloat16, 16 values at a time on the magnitude bits: for a bfloat16
/// `x` and an f32 `t >= 0`, `|x| > t` iff `abs_bits(x) > B`, `B` the bits of the largest
/// bfloat16 `<= t` (`t` truncated), and magnitude bits order like the magnitudes. A value
/// lies between the thresholds exactly when the largest kept bits exceed `t_lo`'s `B`.
///
/// The kept raw bits (outliers as +0) are also maximized as unsigned and as signed
/// numbers ([`sign_split`]): when only one sign has the largest magnitude, and that is not
/// 0, it is the signed-absmax scale's.
#[inline(always)]
unsafe fn split_bf16<E: Element, const SIGNS: bool>(
    block: &[E],
    t_lo: f32,
    t_hi: f32,
    mask: &mut [u64],
) -> Option<Kept> {
    let below = |t: f32| t.to_bits() >> 16;
    let hi = _mm256_set1_epi16(below(t_hi) as i16);
    let abs = _mm256_set1_epi16(0x7fff);
    let mut hi_u = _mm256_setzero_si256();
    let mut hi_s = _mm256_set1_epi16(i16::MIN);
    let p = block.as_ptr() as *const __m256i;
    for (w, word) in mask[..block.len() / 64].iter_mut().enumerate() {
        let mut out = [_mm256_setzero_si256(); 4];
        for (k, o) in out.iter_mut().enumerate() {
            let raw = _mm256_loadu_si256(p.add(w * 4 + k));
            // Finite magnitudes are at most 0x7f7f: positive as i16.
            let magnitude = _mm256_and_si256(raw, abs);
            *o = _mm256_cmpgt_epi16(magnitude, hi);
            if SIGNS {
                let kept = _mm256_andnot_si256(*o, raw);
                hi_u = _mm256_max_epu16(hi_u, kept);
                hi_s = _mm256_max_epi16(hi_s, kept);
            } else {
                hi_u = _mm256_max_epu16(hi_u, _mm256_andnot_si256(*o, magnitude));
            }
        }
        *word = word_of_masks16(out);
    }
    // Largest u16 lane: the smallest of the complements (`minpos`), complemented; the
    // largest i16 lane likewise, after flipping the sign bit (signed to unsigned order).
    let largest = |v: __m256i, flip: i16| {
        let v = _mm256_xor_si256(v, _mm256_set1_epi16(flip));
        let eight = _mm_max_epu16(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let least = _mm_minpos_epu16(_mm_xor_si128(eight, _mm_set1_epi16(-1)));
        (_mm_cvtsi128_si32(least) as u32 & 0xffff) ^ 0xffff ^ (flip as u16 as u32)
    };
    let top_u = largest(hi_u, 0);
    if !SIGNS {
        return (top_u <= below(t_lo)).then(|| Kept::magnitude(E::abs_bits_to_f32(top_u)));
    }
    let top_s = largest(hi_s, i16::MIN);
    // Magnitudes, -1 for a sign without kept values (`top_s` below 0x8000: non-negative),
    // by arithmetic: the signs of random data would defeat branch prediction.
    let negative = (top_u & 0x7fff) as i32 | ((top_u >> 15) as i32 - 1);
    let positive = top_s as i32 | -((top_s >> 15) as i32);
    let kept = negative.max(positive) as u32;
    if kept > below(t_lo) {
        return None;
    }
    let max = E::abs_bits_to_f32(kept);
    let signed = f32::from_bits(max.to_bits() | ((negative > positive) as u32) << 31);
    // Outliers count as +0 above: a kept magnitude of 0 is left to the exact search.
    let decided = kept != 0 && negative != positive;
    Some(Kept {
        max,
        signed: decided.then_some(signed),
    })
}

/// Largest lane of a vector of non-negative values.
#[inline(always)]
unsafe fn hmax(acc: __m256) -> f32 {
    let x = _mm_max_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
    let x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    _mm_cvtss_f32(_mm_max_ss(x, _mm_shuffle_ps::<0b01>(x, x)))
}

/// [`super::signed_scale_masked`] for whole words of 64 values (else the portable
/// code): the first value of magnitude `max` whose mask bit is clear.
#[inline(always)]
pub(super) unsafe fn signed_masked_avx2<E: Element>(
    block: &[E],
    mask: &[u64; MASK_WORDS],
    max: f32,
) -> f32 {
    if max == 0.0 || block.len() % 64 != 0 {
        return super::signed_scale_masked(block, mask, max);
    }
    // `max` is a magnitude of the block: its bits in the element type, exactly.
    let bits = if matches!(E::KIND, Kind::BFloat16) {
        max.to_bits() >> 16
    } else if matches!(E::KIND, Kind::Float16) {
        crate::numeric::element::f32_to_f16(max) as u32
    } else {
        max.to_bits()
    };
    for (w, &outliers) in mask[..block.len() / 64].iter().enumerate() {
        let kept = abs_equal_word(block.as_ptr().add(w * 64), bits) & !outliers;
        if kept != 0 {
            return block[w * 64 + kept.trailing_zeros() as usize].to_f32();
        }
    }
    0.0
}

/// [`super::scan`] 8 values at a time in f32: `|x| > t32` (`t32` from
/// [`super::f32_limit`]) is exactly the f64 test `x * x > limit2`.
#[inline(always)]
pub(super) unsafe fn scan_avx2<E: Element>(
    block: &[E],
    limit2: f64,
    t32: f32,
    mask: &mut [u64; MASK_WORDS],
) {
    if block.len() % 64 != 0 {
        return super::scan(block, limit2, mask);
    }
    let limit = _mm256_set1_ps(t32);
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    for (w, word) in mask[..block.len() / 64].iter_mut().enumerate() {
        let mut bits = 0u64;
        for k in 0..8 {
            let v = _mm256_and_ps(load8(block.as_ptr().add(w * 64 + k * 8)), abs);
            let m = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(v, limit));
            bits |= (m as u8 as u64) << (k * 8);
        }
        *word = bits;
    }
}

/// The largest magnitude `<= t32` of a block, as f32 (`None`: use the portable code).
#[inline(always)]
pub(super) unsafe fn kept_max_avx2<E: Element>(block: &[E], t32: f32) -> Option<f32> {
    if block.len() % 8 != 0 {
        return None;
    }
    let limit = _mm256_set1_ps(t32);
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let mut acc = _mm256_setzero_ps();
    for k in 0..block.len() / 8 {
        let v = _mm256_and_ps(load8(block.as_ptr().add(k * 8)), abs);
        let kept = _mm256_cmp_ps::<_CMP_LE_OQ>(v, limit);
        acc = _mm256_max_ps(acc, _mm256_and_ps(v, kept));
    }
    Some(hmax(acc))
}

/// f32 shifted sums for the outlier filter (FMA for the squares; any order is fine, the
/// filter's bound covers it). `None` for lengths not a multiple of 16.
#[inline(always)]
pub(super) unsafe fn f32_sums_avx2<E: Element>(block: &[E]) -> Option<(f32, f32)> {
    if block.is_empty() || block.len() % 16 != 0 {
        return None;
    }
    let vk = _mm256_set1_ps(block[0].to_f32());
    let mut sums = ShiftedSums::new();
    let bf16 = matches!(E::KIND, Kind::BFloat16);
    for i in 0..block.len() / 16 {
        let p = block.as_ptr().add(i * 16);
        let (v0, v1) = if bf16 {
            // bfloat16 bits in the high half of each 32-bit lane are the f32 values (in
            // another order than load8's, which the sums do not care about).
            let raw = _mm256_loadu_si256(p as *const __m256i);
            let zero = _mm256_setzero_si256();
            (
                _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, raw)),
                _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, raw)),
            )
        } else {
            (load8(p), load8(p.add(8)))
        };
        sums.add(v0, v1, vk);
    }
    // [s, s, q, q | s, s, q, q] -> [s, s, q, q] -> [s, q, s, q].
    let h = _mm256_hadd_ps(sums.s(), sums.q());
    let x = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
    let x = _mm_hadd_ps(x, x);
    Some((
        _mm_cvtss_f32(x),
        _mm_cvtss_f32(_mm_shuffle_ps::<0b01>(x, x)),
    ))
}

/// [`super::block_sums`] with the sixteen f64 lanes in four registers (values
/// `16k+4r..16k+4r+3` in register `r`): the same operations in the same order
/// (multiply then add, no FMA; lanes combined pairwise as the portable code does), so the
/// same result.
#[inline(always)]
pub(super) unsafe fn sums_avx2<E: Element>(block: &[E]) -> (f64, f64) {
    if block.is_empty() {
        return super::block_sums(block);
    }
    let shift = block[0].to_f32() as f64;
    let vshift = _mm256_set1_pd(shift);
    // Lanes 0-3, 4-7, 8-11, 12-15 of S and SS.
    let mut s = [_mm256_setzero_pd(); 4];
    let mut q = [_mm256_setzero_pd(); 4];
    let full = block.len() / 16;
    for i in 0..full {
        let p = block.as_ptr().add(i * 16);
        let (v0, v1) = (load8(p), load8(p.add(8)));
        let d = [
            _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v0)), vshift),
            _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v0)), vshift),
            _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v1)), vshift),
            _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v1)), vshift),
        ];
        for k in 0..4 {
            s[k] = _mm256_add_pd(s[k], d[k]);
            q[k] = _mm256_add_pd(q[k], _mm256_mul_pd(d[k], d[k]));
        }
    }
    let rest = &block[full * 16..];
    if rest.is_empty() {
        // m = [l0+l8 .. l3+l11], [l4+l12 .. l7+l15]; then [m0+m4 .. m3+m7];
        // then [(m0+m4)+(m2+m6), (m1+m5)+(m3+m7)]; then their sum.
        let combine = |l: [__m256d; 4]| {
            let pairs = _mm256_add_pd(_mm256_add_pd(l[0], l[2]), _mm256_add_pd(l[1], l[3]));
            let halves = _mm_add_pd(
                _mm256_castpd256_pd128(pairs),
                _mm256_extractf128_pd::<1>(pairs),
            );
            _mm_cvtsd_f64(_mm_add_sd(halves, _mm_unpackhi_pd(halves, halves)))
        };
        return (combine(s), combine(q));
    }
    let mut sl = [0f64; 16];
    let mut ql = [0f64; 16];
    for k in 0..4 {
        _mm256_storeu_pd(sl.as_mut_ptr().add(4 * k), s[k]);
        _mm256_storeu_pd(ql.as_mut_ptr().add(4 * k), q[k]);
    }
    super::sums_from_lanes(rest, shift, sl, ql)
}

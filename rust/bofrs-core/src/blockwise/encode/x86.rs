//! The encoder's AVX2 kernels: the twins of [`super::portable`], bit-identical to it.

use super::portable::{encode_tail, encode_zero_block};
use super::task::run_task;
use super::{BlockKernels, TaskContext, TaskOut, STEP};
use crate::blockwise::codebook::{Codebook, Normalization};
use crate::blockwise::opq::Outlier;
use crate::error::Result;
use crate::numeric::element::{Element, Kind};
use std::arch::x86_64::*;

/// Loads 8 values as f32 (exact widening).
#[inline(always)]
pub(crate) unsafe fn load8<E: Element>(p: *const E) -> __m256 {
    match E::KIND {
        Kind::Float32 => _mm256_loadu_ps(p as *const f32),
        Kind::BFloat16 => {
            let h = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
        }
        Kind::Float16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
    }
}

/// Largest `abs_bits` of a block: 16-bit types 16 at a time, f32 8 at a time.
#[inline(always)]
unsafe fn max_abs_bits_avx2<E: Element>(block: &[E]) -> u32 {
    let half = !matches!(E::KIND, Kind::Float32);
    let lanes = if half { 16 } else { 8 };
    let full = block.len() / lanes;
    let p = block.as_ptr() as *const __m256i;
    let mut acc = _mm256_setzero_si256();
    if half {
        let mask = _mm256_set1_epi16(0x7fff);
        for i in 0..full {
            acc = _mm256_max_epu16(acc, _mm256_and_si256(_mm256_loadu_si256(p.add(i)), mask));
        }
        // Widen the 16 u16 maxima to 32-bit lanes (zero-extended), then reduce as u32.
        let lo = _mm256_unpacklo_epi16(acc, _mm256_setzero_si256());
        let hi = _mm256_unpackhi_epi16(acc, _mm256_setzero_si256());
        acc = _mm256_max_epu32(lo, hi);
    } else {
        let mask = _mm256_set1_epi32(0x7fff_ffff);
        for i in 0..full {
            acc = _mm256_max_epu32(acc, _mm256_and_si256(_mm256_loadu_si256(p.add(i)), mask));
        }
    }
    let quad = _mm_max_epu32(
        _mm256_castsi256_si128(acc),
        _mm256_extracti128_si256::<1>(acc),
    );
    let pair = _mm_max_epu32(quad, _mm_shuffle_epi32::<0b01_00_11_10>(quad));
    let one = _mm_max_epu32(pair, _mm_shuffle_epi32::<0b10_11_00_01>(pair));
    let vector_max = _mm_cvtsi128_si32(one) as u32;
    vector_max.max(crate::blockwise::scale::max_abs_bits(
        &block[full * lanes..],
    ))
}

/// The 15 thresholds arranged for a 4-step branch-free binary search: code bits are decided
/// from the most significant down, each step comparing against the threshold that splits the
/// remaining range. `#{k : y > t_k}` is the partition point of a monotone predicate, so the
/// search gives exactly the count the portable kernel computes.
struct SearchTables {
    mid: __m256,    // t7
    q_lo: __m256,   // t3
    q_hi: __m256,   // t11
    eighth: __m256, // [t1, t5, t9, t13] by bits 3..2
    last: __m256,   // [t0, t2, ..., t14] by bits 3..1
}

#[inline(always)]
unsafe fn search_tables(codebook: &Codebook) -> SearchTables {
    let t = codebook.thresholds();
    SearchTables {
        mid: _mm256_set1_ps(t[7]),
        q_lo: _mm256_set1_ps(t[3]),
        q_hi: _mm256_set1_ps(t[11]),
        eighth: _mm256_setr_ps(t[1], t[5], t[9], t[13], 0.0, 0.0, 0.0, 0.0),
        last: _mm256_setr_ps(t[0], t[2], t[4], t[6], t[8], t[10], t[12], t[14]),
    }
}

/// All-ones where `y > t`, else 0, per 32-bit lane.
#[inline(always)]
unsafe fn above(y: __m256, t: __m256) -> __m256i {
    _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(y, t))
}

/// Appends a search bit to the code: `2 c + 1` where `mask` is set, else `2 c`.
#[inline(always)]
unsafe fn push_bit(code: __m256i, mask: __m256i) -> __m256i {
    _mm256_sub_epi32(_mm256_add_epi32(code, code), mask)
}

/// Codes of 8 normalized values, as 32-bit lanes (short dependency chain: masks feed the
/// blend and the codes directly).
#[inline(always)]
unsafe fn search(y: __m256, tables: &SearchTables) -> __m256i {
    let m3 = above(y, tables.mid);
    let code = _mm256_sub_epi32(_mm256_setzero_si256(), m3); // bit 3
    let t2 = _mm256_blendv_ps(tables.q_lo, tables.q_hi, _mm256_castsi256_ps(m3));
    let code = push_bit(code, above(y, t2)); // bits 3..2
    let code = push_bit(
        code,
        above(y, _mm256_permutevar8x32_ps(tables.eighth, code)),
    );
    push_bit(code, above(y, _mm256_permutevar8x32_ps(tables.last, code)))
}

/// The AVX2 kernels of the encoder (and, in [`crate::blockwise::opq`], of the OPQ pass). Only
/// built by [`Avx2::new`], whose caller guarantees AVX2 support: every method relies on it.
pub(crate) struct Avx2<'a> {
    codebook: &'a Codebook,
    tables: SearchTables,
}

impl<'a> Avx2<'a> {
    /// The kernels for `codebook`.
    ///
    /// # Safety
    /// The CPU must support [`crate::isa::Isa::Avx2`].
    #[inline(always)]
    pub(crate) unsafe fn new(codebook: &'a Codebook) -> Self {
        Self {
            codebook,
            tables: search_tables(codebook),
        }
    }
}

impl BlockKernels for Avx2<'_> {
    #[inline(always)]
    fn max_abs_bits<T: Element>(&self, block: &[T]) -> u32 {
        // SAFETY: an `Avx2` exists only where AVX2 runs (see `Avx2::new`).
        unsafe { max_abs_bits_avx2(block) }
    }
    #[inline(always)]
    fn raw_scale_from_max<T: Element>(&self, block: &[T], max: u32, norm: Normalization) -> f32 {
        let fast = match norm {
            Normalization::Absmax => Some(T::abs_bits_to_f32(max)),
            // SAFETY: as above.
            Normalization::SignedAbsmax => unsafe { signed_scale_avx2(block, max) },
        };
        // Cannot fail for a finite maximum.
        fast.unwrap_or_else(|| {
            crate::blockwise::scale::raw_block_scale_from_max(block, max, norm).unwrap_or(0.0)
        })
    }
    #[inline(always)]
    fn encode<T: Element>(&self, block: &[T], scale: f32, out: &mut [u8]) {
        // SAFETY: as above.
        unsafe { encode_block_avx2(block, scale, self.codebook, &self.tables, out) }
    }
}

/// The mask of the 64 values from `p` whose `abs_bits` equal
/// `bits` (bit `i` for value `i`): 16-bit types 16 at a time on their bits, f32 8 at a time.
#[inline(always)]
pub(crate) unsafe fn abs_equal_word<E: Element>(p: *const E, bits: u32) -> u64 {
    if matches!(E::KIND, Kind::Float32) {
        let (abs, target) = (
            _mm256_set1_epi32(0x7fff_ffff),
            _mm256_set1_epi32(bits as i32),
        );
        let mut word = 0u64;
        for k in 0..8 {
            let v = _mm256_and_si256(_mm256_loadu_si256(p.add(k * 8) as *const __m256i), abs);
            let hit = _mm256_castsi256_ps(_mm256_cmpeq_epi32(v, target));
            word |= (_mm256_movemask_ps(hit) as u8 as u64) << (k * 8);
        }
        return word;
    }
    let (abs, target) = (_mm256_set1_epi16(0x7fff), _mm256_set1_epi16(bits as i16));
    let q = p as *const __m256i;
    let hit =
        |k: usize| _mm256_cmpeq_epi16(_mm256_and_si256(_mm256_loadu_si256(q.add(k)), abs), target);
    word_of_masks16([hit(0), hit(1), hit(2), hit(3)])
}

/// Four 16-lane compare masks (values `16k..16k+15` in mask `k`) as one 64-bit word, bit `i`
/// for value `i`.
#[inline(always)]
pub(crate) unsafe fn word_of_masks16(m: [__m256i; 4]) -> u64 {
    // Bytes [a0-7, b0-7 | a8-15, b8-15] -> [a0-15, b0-15]: one bit per value, in order.
    let half = |a: __m256i, b: __m256i| {
        let packed = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi16(a, b));
        _mm256_movemask_epi8(packed) as u32 as u64
    };
    half(m[0], m[1]) | (half(m[2], m[3]) << 32)
}

/// The signed-absmax raw scale of a finite block with largest `abs_bits` `max_bits`, as
/// [`crate::blockwise::scale::raw_block_scale_from_max`] gives it (the first value of that magnitude),
/// for whole words of 64 values (`None`: use the portable code).
#[inline(always)]
unsafe fn signed_scale_avx2<E: Element>(block: &[E], max_bits: u32) -> Option<f32> {
    if block.is_empty() || block.len() % 64 != 0 {
        return None;
    }
    for w in 0..block.len() / 64 {
        let hits = abs_equal_word(block.as_ptr().add(w * 64), max_bits);
        if hits != 0 {
            return Some(block[w * 64 + hits.trailing_zeros() as usize].to_f32());
        }
    }
    // Unreachable for a true maximum; the portable code decides otherwise.
    None
}

/// One task with the AVX2 kernels (the shared driver is inlined here, so its loops are
/// compiled for AVX2 too).
///
/// # Safety
/// The CPU must support [`crate::isa::Isa::Avx2`].
#[target_feature(enable = "avx2,fma,f16c,bmi1,bmi2,popcnt,lzcnt")]
pub(super) unsafe fn pack_task<E: Element>(
    input: &[E],
    context: &TaskContext<'_>,
    out: TaskOut<'_>,
    first_block: usize,
) -> Result<Vec<Outlier>> {
    let kernel = Avx2::new(context.options.codebook);
    run_task(&kernel, input, context, out, first_block)
}

/// AVX2 encoder of one block: 32 values per step, packed to 16 bytes.
#[inline(always)]
unsafe fn encode_block_avx2<E: Element>(
    block: &[E],
    scale: f32,
    codebook: &Codebook,
    tables: &SearchTables,
    out: &mut [u8],
) {
    if scale == 0.0 {
        return encode_zero_block(block.len(), codebook, out);
    }
    let vscale = _mm256_set1_ps(scale);
    // Restores value order after the in-lane packs: 4-byte groups [0,4,1,5,2,6,3,7].
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let nibble_pairs = _mm256_set1_epi16(0x0110); // first byte * 16 + second byte
    let steps = block.len() / STEP;
    for s in 0..steps {
        let p = block.as_ptr().add(s * STEP);
        let c0 = search(_mm256_div_ps(load8(p), vscale), tables);
        let c1 = search(_mm256_div_ps(load8(p.add(8)), vscale), tables);
        let c2 = search(_mm256_div_ps(load8(p.add(16)), vscale), tables);
        let c3 = search(_mm256_div_ps(load8(p.add(24)), vscale), tables);
        let ab = _mm256_packs_epi32(c0, c1);
        let cd = _mm256_packs_epi32(c2, c3);
        let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), order);
        let pairs = _mm256_maddubs_epi16(bytes, nibble_pairs);
        let packed = _mm256_permute4x64_epi64(_mm256_packus_epi16(pairs, pairs), 0b10_00);
        _mm_storeu_si128(
            out.as_mut_ptr().add(s * STEP / 2) as *mut __m128i,
            _mm256_castsi256_si128(packed),
        );
    }
    encode_tail(
        &block[steps * STEP..],
        scale,
        codebook,
        &mut out[steps * STEP / 2..],
    );
}

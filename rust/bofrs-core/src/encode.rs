//! Encoding: per-block scales, nearest-level codes, two codes per byte.
//!
//! For each block with stored scale `S` (see [`crate::scale`]), each value `x` becomes
//! `y = x / S` (f32 division; `y = 0` when `S == 0`) and then the code `#{k : y > t_k}` against
//! the codebook's midpoint thresholds. Codes `2j` and `2j+1` share byte `j` (high, low nibble).

use crate::codebook::{Codebook, Normalization};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::isa::Isa;
use crate::layout::BlockLayout;
use crate::pool::{blocks_per_task, pool};
use crate::scale::{stored_block_scale, ScaleDType};
use rayon::prelude::*;

/// What to encode with.
#[derive(Debug, Clone, Copy)]
pub struct EncodeOptions<'a> {
    pub codebook: &'a Codebook,
    pub block_size: usize,
    pub normalization: Normalization,
    pub scale_dtype: ScaleDType,
}

/// Values encoded per inner step (16 code bytes).
const STEP: usize = 32;

/// Packs `input` into `codes` (`numel.div_ceil(2)` bytes) and `scales` (one per block, already
/// rounded to the storage type), on the pool, with the best instruction set of this CPU.
pub fn pack<E: Element>(
    input: &[E],
    options: &EncodeOptions<'_>,
    codes: &mut [u8],
    scales: &mut [f32],
) -> Result<()> {
    pack_with_isa(Isa::best(), input, options, codes, scales)
}

/// [`pack`] with an explicit kernel variant (for tests and benches).
pub fn pack_with_isa<E: Element>(
    isa: Isa,
    input: &[E],
    options: &EncodeOptions<'_>,
    codes: &mut [u8],
    scales: &mut [f32],
) -> Result<()> {
    isa.ensure_supported()?;
    let layout = BlockLayout::new(input.len(), options.block_size)?;
    layout.check_buffers(codes.len(), scales.len())?;
    let bpt = blocks_per_task(options.block_size);
    let task_values = bpt * options.block_size;
    let outcome = pool().install(|| {
        input
            .par_chunks(task_values)
            .zip(codes.par_chunks_mut(task_values / 2))
            .zip(scales.par_chunks_mut(bpt))
            .enumerate()
            .try_for_each(|(task, ((x, c), s))| {
                // SAFETY: `isa` was checked to be supported by this CPU above.
                unsafe { pack_task(isa, x, options, c, s, task * bpt) }
            })
    });
    // Parallel tasks may fail in any order; report the first failure in flat order.
    outcome.map_err(|_| first_error(input, options))
}

/// The first error of a sequential scan (only called once a task has failed).
fn first_error<E: Element>(input: &[E], options: &EncodeOptions<'_>) -> Error {
    input
        .chunks(options.block_size)
        .enumerate()
        .find_map(|(b, block)| {
            stored_block_scale(
                block,
                options.normalization,
                options.scale_dtype,
                b * options.block_size,
                b,
            )
            .err()
        })
        .unwrap_or(Error::InvalidArgument {
            name: "input",
            message: "encoding failed".into(),
        })
}

/// Dispatches one task to the kernel variant.
///
/// # Safety
/// `isa` must be supported by the running CPU.
unsafe fn pack_task<E: Element>(
    isa: Isa,
    input: &[E],
    options: &EncodeOptions<'_>,
    codes: &mut [u8],
    scales: &mut [f32],
    first_block: usize,
) -> Result<()> {
    match isa {
        Isa::Portable => pack_blocks(input, options, codes, scales, first_block),
        // AVX-512 CPUs run the AVX2 kernels (no AVX-512-specific encoder yet).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => {
            x86::pack_blocks_avx2(input, options, codes, scales, first_block)
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => pack_blocks(input, options, codes, scales, first_block),
    }
}

/// The portable body: scales of all blocks of one task, then their codes.
#[inline(always)]
fn pack_blocks<E: Element>(
    input: &[E],
    options: &EncodeOptions<'_>,
    codes: &mut [u8],
    scales: &mut [f32],
    first_block: usize,
) -> Result<()> {
    let bs = options.block_size;
    for (b, (block, scale)) in input.chunks(bs).zip(scales.iter_mut()).enumerate() {
        let index = first_block + b;
        *scale = stored_block_scale(
            block,
            options.normalization,
            options.scale_dtype,
            index * bs,
            index,
        )?;
    }
    for ((block, out), &scale) in input
        .chunks(bs)
        .zip(codes.chunks_mut(bs / 2))
        .zip(scales.iter())
    {
        encode_block(block, scale, options.codebook, out);
    }
    Ok(())
}

/// Fills the codes of a block whose stored scale is 0: every value encodes as 0.
#[inline(always)]
fn encode_zero_block(len: usize, codebook: &Codebook, out: &mut [u8]) {
    let zero = codebook.encode_one(0.0);
    out.fill((zero << 4) | zero);
    if len % 2 == 1 {
        if let Some(last) = out.last_mut() {
            *last = zero << 4;
        }
    }
}

/// Encodes one block against its stored scale into `out` (`block.len().div_ceil(2)` bytes).
#[inline(always)]
fn encode_block<E: Element>(block: &[E], scale: f32, codebook: &Codebook, out: &mut [u8]) {
    if scale == 0.0 {
        return encode_zero_block(block.len(), codebook, out);
    }
    let thresholds = codebook.thresholds();
    let mut values = block.chunks_exact(STEP);
    let mut bytes = out.chunks_exact_mut(STEP / 2);
    for (x, o) in (&mut values).zip(&mut bytes) {
        let mut y = [0f32; STEP];
        for (yi, xi) in y.iter_mut().zip(x) {
            *yi = xi.to_f32() / scale;
        }
        let mut q = [0u32; STEP];
        for &t in thresholds {
            for (qi, &yi) in q.iter_mut().zip(&y) {
                *qi += (yi > t) as u32;
            }
        }
        for (byte, pair) in o.iter_mut().zip(q.chunks_exact(2)) {
            *byte = ((pair[0] << 4) | pair[1]) as u8;
        }
    }
    // Index the tail (not `into_remainder`, which is empty when the loop never ran).
    let done = block.len() / STEP * STEP;
    encode_tail(values.remainder(), scale, codebook, &mut out[done / 2..]);
}

/// Scalar encoding of the values after the last full step (any count, possibly odd).
#[inline(always)]
fn encode_tail<E: Element>(values: &[E], scale: f32, codebook: &Codebook, out: &mut [u8]) {
    for (byte, pair) in out.iter_mut().zip(values.chunks(2)) {
        let hi = codebook.encode_one(pair[0].to_f32() / scale);
        let lo = pair
            .get(1)
            .map_or(0, |v| codebook.encode_one(v.to_f32() / scale));
        *byte = (hi << 4) | lo;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{encode_tail, encode_zero_block, EncodeOptions, STEP};
    use crate::codebook::Codebook;
    use crate::element::{Bf16, Element, F16};
    use crate::error::Result;
    use crate::scale::stored_block_scale_from_max;
    use std::any::TypeId;
    use std::arch::x86_64::*;

    /// Loads 8 values as f32 (exact widening).
    #[inline(always)]
    unsafe fn load8<E: Element>(p: *const E) -> __m256 {
        let kind = TypeId::of::<E>();
        if kind == TypeId::of::<f32>() {
            _mm256_loadu_ps(p as *const f32)
        } else if kind == TypeId::of::<Bf16>() {
            let h = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
        } else if kind == TypeId::of::<F16>() {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        } else {
            let mut tmp = [0f32; 8];
            for (i, t) in tmp.iter_mut().enumerate() {
                *t = (*p.add(i)).to_f32();
            }
            _mm256_loadu_ps(tmp.as_ptr())
        }
    }

    /// Largest `abs_bits` of a block: 16-bit types 16 at a time, f32 8 at a time.
    #[inline(always)]
    unsafe fn max_abs_bits_avx2<E: Element>(block: &[E]) -> u32 {
        let kind = TypeId::of::<E>();
        let half = kind == TypeId::of::<Bf16>() || kind == TypeId::of::<F16>();
        if !(half || kind == TypeId::of::<f32>()) {
            return crate::scale::max_abs_bits(block);
        }
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
        vector_max.max(crate::scale::max_abs_bits(&block[full * lanes..]))
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

    /// The blocks of one task: all scales, then all codes.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn pack_blocks_avx2<E: Element>(
        input: &[E],
        options: &EncodeOptions<'_>,
        codes: &mut [u8],
        scales: &mut [f32],
        first_block: usize,
    ) -> Result<()> {
        let bs = options.block_size;
        for (b, (block, scale)) in input.chunks(bs).zip(scales.iter_mut()).enumerate() {
            let index = first_block + b;
            *scale = stored_block_scale_from_max(
                block,
                max_abs_bits_avx2(block),
                options.normalization,
                options.scale_dtype,
                index * bs,
                index,
            )?;
        }
        let tables = search_tables(options.codebook);
        for ((block, out), &scale) in input
            .chunks(bs)
            .zip(codes.chunks_mut(bs / 2))
            .zip(scales.iter())
        {
            encode_block_avx2(block, scale, options.codebook, &tables, out);
        }
        Ok(())
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codebook::NF4;

    fn lcg(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    fn encode(isa: Isa, x: &[f32], bs: usize, norm: Normalization) -> (Vec<u8>, Vec<f32>) {
        let cb = Codebook::new(&NF4).unwrap();
        let opts = EncodeOptions {
            codebook: &cb,
            block_size: bs,
            normalization: norm,
            scale_dtype: ScaleDType::BFloat16,
        };
        let layout = BlockLayout::new(x.len(), bs).unwrap();
        let mut codes = vec![0u8; layout.code_bytes()];
        let mut scales = vec![0f32; layout.num_blocks()];
        pack_with_isa(isa, x, &opts, &mut codes, &mut scales).unwrap();
        (codes, scales)
    }

    #[test]
    fn every_isa_matches_scalar_reference() {
        let cb = Codebook::new(&NF4).unwrap();
        for &n in &[0usize, 1, 7, 31, 63, 64, 65, 95, 1000, 4095, 70001] {
            let x = lcg(n, n as u64 + 1);
            for &bs in &[16usize, 64, 4096] {
                for norm in [Normalization::Absmax, Normalization::SignedAbsmax] {
                    let (codes, scales) = encode(Isa::Portable, &x, bs, norm);
                    for (i, &v) in x.iter().enumerate() {
                        let s = scales[i / bs];
                        let want = cb.encode_one(v / s);
                        let byte = codes[i / 2];
                        let got = if i % 2 == 0 { byte >> 4 } else { byte & 15 };
                        assert_eq!(got, want, "n={n} bs={bs} i={i}");
                    }
                    for isa in Isa::supported() {
                        assert_eq!(encode(isa, &x, bs, norm), (codes.clone(), scales.clone()));
                    }
                }
            }
        }
    }

    #[test]
    fn zero_block_and_odd_tail() {
        let x = vec![0f32; 33];
        let (codes, scales) = encode(Isa::Portable, &x, 16, Normalization::Absmax);
        assert_eq!(scales, vec![0.0; 3]);
        assert_eq!(codes.len(), 17);
        assert_eq!(codes[16] & 15, 0, "pad nibble is zero");
        assert_eq!(codes[16] >> 4, 7, "zero encodes to NF4's zero level");
    }

    #[test]
    fn reports_first_non_finite_index() {
        let mut x = lcg(100_000, 3);
        x[77_777] = f32::NAN;
        x[90_000] = f32::INFINITY;
        let cb = Codebook::new(&NF4).unwrap();
        let opts = EncodeOptions {
            codebook: &cb,
            block_size: 64,
            normalization: Normalization::Absmax,
            scale_dtype: ScaleDType::Float32,
        };
        let mut codes = vec![0u8; 50_000];
        let mut scales = vec![0f32; 1563];
        let err = pack(&x, &opts, &mut codes, &mut scales).unwrap_err();
        assert_eq!(err, Error::NonFinite { index: 77_777 });
    }

    #[test]
    fn signed_absmax_maps_extreme_to_top_level() {
        let x = [
            0.1f32, -3.0, 0.5, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
        ];
        let (codes, scales) = encode(Isa::Portable, &x, 16, Normalization::SignedAbsmax);
        assert_eq!(scales[0], -3.0);
        assert_eq!(codes[0] & 15, 15);
    }
}

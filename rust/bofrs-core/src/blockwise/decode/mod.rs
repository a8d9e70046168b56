//! Decoding: `value = level[code] * scale`, computed in f32 and rounded (nearest even) to the
//! output type.

use crate::blockwise::codebook::Codebook;
use crate::blockwise::layout::BlockLayout;
use crate::blockwise::opq::OutlierDType;
use crate::error::{Error, Result};
use crate::isa::Isa;
use crate::numeric::element::{f32_to_bf16, f32_to_f16, Bf16, F16};
use crate::runtime::pool::{blocks_per_task, pool};
use rayon::prelude::*;

/// An output element of the decoder.
pub trait Output: Copy + Default + Send + Sync + 'static {
    /// Rounds an f32 to this type.
    fn from_f32(v: f32) -> Self;
}

impl Output for f32 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Output for Bf16 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        Bf16(f32_to_bf16(v))
    }
}

impl Output for F16 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        F16(f32_to_f16(v))
    }
}

/// Unpacks `codes` / `scales` into `out` (one value per original element), on the pool, with the
/// best instruction set of this CPU.
pub fn unpack<O: Output>(
    codes: &[u8],
    scales: &[f32],
    codebook: &Codebook,
    block_size: usize,
    out: &mut [O],
) -> Result<()> {
    unpack_with_isa(Isa::best(), codes, scales, codebook, block_size, out)
}

/// [`unpack`] with an explicit kernel variant (for tests and benches).
pub fn unpack_with_isa<O: Output>(
    isa: Isa,
    codes: &[u8],
    scales: &[f32],
    codebook: &Codebook,
    block_size: usize,
    out: &mut [O],
) -> Result<()> {
    unpack_ext_with_isa(isa, codes, scales, codebook, block_size, None, out)
}

/// Stored OPQ outliers: flat indices (strictly ascending) and 16-bit values.
#[derive(Debug, Clone, Copy)]
pub struct OutlierView<'a> {
    pub indices: &'a [u64],
    pub values: &'a [u16],
    pub dtype: OutlierDType,
}

impl OutlierView<'_> {
    /// Checks lengths, order, range and finiteness against a tensor of `numel` values.
    pub fn validate(&self, numel: usize) -> Result<()> {
        if self.indices.len() != self.values.len() {
            return Err(Error::LengthMismatch {
                what: "outlier_values",
                expected: self.indices.len(),
                actual: self.values.len(),
            });
        }
        if let Some(i) = self.indices.windows(2).position(|w| w[0] >= w[1]) {
            return Err(Error::InvalidArgument {
                name: "outlier_indices",
                message: format!("must be strictly ascending (position {})", i + 1),
            });
        }
        if let Some(&last) = self.indices.last() {
            if last >= numel as u64 {
                return Err(Error::InvalidArgument {
                    name: "outlier_indices",
                    message: format!("index {last} is out of range for {numel} values"),
                });
            }
        }
        if let Some(i) = self
            .values
            .iter()
            .position(|&v| !self.dtype.to_f32(v).is_finite())
        {
            return Err(Error::InvalidArgument {
                name: "outlier_values",
                message: format!("outlier {i} is not finite"),
            });
        }
        Ok(())
    }
}

/// [`unpack_with_isa`] that also writes OPQ outliers back (the decoded value of an outlier is
/// its stored 16-bit value, rounded to the output type).
pub fn unpack_ext_with_isa<O: Output>(
    isa: Isa,
    codes: &[u8],
    scales: &[f32],
    codebook: &Codebook,
    block_size: usize,
    outliers: Option<OutlierView<'_>>,
    out: &mut [O],
) -> Result<()> {
    isa.ensure_supported()?;
    let layout = BlockLayout::new(out.len(), block_size)?;
    layout.check_buffers(codes.len(), scales.len())?;
    if let Some(b) = scales.iter().position(|s| !s.is_finite()) {
        return Err(Error::InvalidArgument {
            name: "scales",
            message: format!("scale of block {b} is not finite"),
        });
    }
    if let Some(view) = &outliers {
        view.validate(out.len())?;
    }
    let bpt = blocks_per_task(block_size);
    let task_values = bpt * block_size;
    let levels = codebook.levels();
    pool().install(|| {
        out.par_chunks_mut(task_values)
            .zip(codes.par_chunks(task_values / 2))
            .zip(scales.par_chunks(bpt))
            .enumerate()
            .for_each(|(task, ((o, c), s))| {
                for ((block, bytes), &scale) in o
                    .chunks_mut(block_size)
                    .zip(c.chunks(block_size / 2))
                    .zip(s)
                {
                    // SAFETY: `isa` was checked to be supported by this CPU above.
                    unsafe { decode_block(isa, bytes, scale, levels, block) };
                }
                if let Some(view) = &outliers {
                    let base = (task * task_values) as u64;
                    let end = base + o.len() as u64;
                    let from = view.indices.partition_point(|&i| i < base);
                    let to = view.indices.partition_point(|&i| i < end);
                    for (&i, &v) in view.indices[from..to].iter().zip(&view.values[from..to]) {
                        o[(i - base) as usize] = O::from_f32(view.dtype.to_f32(v));
                    }
                }
            })
    });
    Ok(())
}

/// Dispatches one block to the kernel variant.
///
/// # Safety
/// `isa` must be supported by the running CPU.
#[inline(always)]
unsafe fn decode_block<O: Output>(
    isa: Isa,
    codes: &[u8],
    scale: f32,
    levels: &[f32; 16],
    out: &mut [O],
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => x86::decode_block_avx2(codes, scale, levels, out),
        _ => decode_block_portable(codes, scale, levels, out),
    }
}

/// Portable decoder of one block: the definition of the results.
#[inline(always)]
fn decode_block_portable<O: Output>(codes: &[u8], scale: f32, levels: &[f32; 16], out: &mut [O]) {
    let mut scaled = [0f32; 16];
    for (s, &l) in scaled.iter_mut().zip(levels) {
        *s = l * scale;
    }
    let mut pairs = out.chunks_exact_mut(2);
    for (pair, &byte) in (&mut pairs).zip(codes) {
        pair[0] = O::from_f32(scaled[(byte >> 4) as usize]);
        pair[1] = O::from_f32(scaled[(byte & 15) as usize]);
    }
    if let ([last], Some(&byte)) = (pairs.into_remainder(), codes.last()) {
        *last = O::from_f32(scaled[(byte >> 4) as usize]);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{decode_block_portable, Output};
    use crate::numeric::element::{Bf16, F16};
    use std::any::TypeId;
    use std::arch::x86_64::*;

    /// AVX2 decoder: the 16 scaled levels live in two registers; each group of 8 codes is looked
    /// up with two in-register permutes and a blend on bit 3 of the code.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn decode_block_avx2<O: Output>(
        codes: &[u8],
        scale: f32,
        levels: &[f32; 16],
        out: &mut [O],
    ) {
        let vscale = _mm256_set1_ps(scale);
        let lo = _mm256_mul_ps(_mm256_loadu_ps(levels.as_ptr()), vscale);
        let hi = _mm256_mul_ps(_mm256_loadu_ps(levels.as_ptr().add(8)), vscale);
        let kind = TypeId::of::<O>();
        if kind == TypeId::of::<Bf16>() || kind == TypeId::of::<F16>() {
            let table = if kind == TypeId::of::<Bf16>() {
                let packed = _mm256_packus_epi32(round_bf16(lo), round_bf16(hi));
                _mm256_permute4x64_epi64(packed, 0b11_01_10_00)
            } else {
                let l = _mm256_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT);
                _mm256_set_m128i(_mm256_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT), l)
            };
            return decode_halves(codes, table, scale, levels, out);
        }
        let shifts = _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0);
        let nibble = _mm256_set1_epi32(15);
        let full = (out.len() / 16).min(codes.len() / 8);
        for g in 0..full {
            let raw = (codes.as_ptr().add(g * 8) as *const u64).read_unaligned();
            let bytes = _mm_cvtsi64_si128(raw as i64);
            let doubled = _mm_unpacklo_epi8(bytes, bytes);
            let first = lookup(_mm256_cvtepu8_epi32(doubled), shifts, nibble, lo, hi);
            let upper = _mm_unpackhi_epi64(doubled, doubled);
            let second = lookup(_mm256_cvtepu8_epi32(upper), shifts, nibble, lo, hi);
            let dst = out.as_mut_ptr().add(g * 16);
            if kind == TypeId::of::<f32>() {
                _mm256_storeu_ps(dst as *mut f32, first);
                _mm256_storeu_ps((dst as *mut f32).add(8), second);
            } else if kind == TypeId::of::<Bf16>() {
                let packed = _mm256_packus_epi32(round_bf16(first), round_bf16(second));
                let ordered = _mm256_permute4x64_epi64(packed, 0b11_01_10_00);
                _mm256_storeu_si256(dst as *mut __m256i, ordered);
            } else if kind == TypeId::of::<F16>() {
                let a = _mm256_cvtps_ph(first, _MM_FROUND_TO_NEAREST_INT);
                let b = _mm256_cvtps_ph(second, _MM_FROUND_TO_NEAREST_INT);
                _mm256_storeu_si256(dst as *mut __m256i, _mm256_set_m128i(b, a));
            } else {
                decode_block_portable(
                    &codes[g * 8..g * 8 + 8],
                    scale,
                    levels,
                    &mut out[g * 16..g * 16 + 16],
                );
            }
        }
        decode_block_portable(&codes[full * 8..], scale, levels, &mut out[full * 16..]);
    }

    /// 16-bit outputs: the 16 rounded, scaled levels (`table`, 16 u16 in order) are split into a
    /// low-byte and a high-byte table, and 32 codes at a time are looked up with byte shuffles.
    /// The table entries are exactly the per-value roundings, so results match the portable path.
    #[inline(always)]
    unsafe fn decode_halves<O: Output>(
        codes: &[u8],
        table: __m256i,
        scale: f32,
        levels: &[f32; 16],
        out: &mut [O],
    ) {
        // Per lane: even bytes (low halves) first, then odd bytes (high halves).
        let split = _mm256_setr_epi8(
            0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, //
            0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
        );
        let bytes = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(table, split), 0b11_01_10_00);
        let low_table = _mm256_permute2x128_si256(bytes, bytes, 0x00);
        let high_table = _mm256_permute2x128_si256(bytes, bytes, 0x11);
        let nibble = _mm_set1_epi8(15);
        let full = (out.len() / 32).min(codes.len() / 16);
        for g in 0..full {
            let c = _mm_loadu_si128(codes.as_ptr().add(g * 16) as *const __m128i);
            let high_nibbles = _mm_and_si128(_mm_srli_epi16(c, 4), nibble);
            let low_nibbles = _mm_and_si128(c, nibble);
            let idx = _mm256_set_m128i(
                _mm_unpackhi_epi8(high_nibbles, low_nibbles),
                _mm_unpacklo_epi8(high_nibbles, low_nibbles),
            );
            let low = _mm256_shuffle_epi8(low_table, idx);
            let high = _mm256_shuffle_epi8(high_table, idx);
            let a = _mm256_unpacklo_epi8(low, high); // values 0..7 | 16..23
            let b = _mm256_unpackhi_epi8(low, high); // values 8..15 | 24..31
            let dst = out.as_mut_ptr().add(g * 32) as *mut __m256i;
            _mm256_storeu_si256(dst, _mm256_permute2x128_si256(a, b, 0x20));
            _mm256_storeu_si256(dst.add(1), _mm256_permute2x128_si256(a, b, 0x31));
        }
        decode_block_portable(&codes[full * 16..], scale, levels, &mut out[full * 32..]);
    }

    /// 8 scaled levels for 8 doubled code bytes: shift out the nibble, look it up in the two
    /// 8-entry halves, blend on bit 3.
    #[inline(always)]
    unsafe fn lookup(
        idx: __m256i,
        shifts: __m256i,
        nibble: __m256i,
        lo: __m256,
        hi: __m256,
    ) -> __m256 {
        let idx = _mm256_and_si256(_mm256_srlv_epi32(idx, shifts), nibble);
        let from_lo = _mm256_permutevar8x32_ps(lo, idx);
        let from_hi = _mm256_permutevar8x32_ps(hi, idx);
        _mm256_blendv_ps(
            from_lo,
            from_hi,
            _mm256_castsi256_ps(_mm256_slli_epi32::<28>(idx)),
        )
    }

    /// f32 -> bf16 bits (nearest even) in the low half of each 32-bit lane; inputs are finite.
    #[inline(always)]
    unsafe fn round_bf16(v: __m256) -> __m256i {
        let bits = _mm256_castps_si256(v);
        let odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
        let biased = _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
        _mm256_srli_epi32(biased, 16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockwise::codebook::NF4;
    use crate::numeric::element::{bf16_to_f32, f16_to_f32};

    fn data(n: usize, bs: usize) -> (Vec<u8>, Vec<f32>) {
        let codes = (0..n.div_ceil(2))
            .map(|i| (i * 37 + 11) as u8)
            .collect::<Vec<u8>>();
        let scales = (0..n.div_ceil(bs))
            .map(|b| (b as f32 - 3.5) * 1.37e-3)
            .collect();
        let mut codes = codes;
        if n % 2 == 1 {
            *codes.last_mut().unwrap() &= 0xf0;
        }
        (codes, scales)
    }

    #[test]
    fn every_isa_and_output_matches_definition() {
        let cb = Codebook::new(&NF4).unwrap();
        for &n in &[0usize, 1, 15, 16, 17, 64, 99, 4097, 70001] {
            for &bs in &[16usize, 64, 256] {
                let (codes, scales) = data(n, bs);
                let expect: Vec<f32> = (0..n)
                    .map(|i| {
                        let c = if i % 2 == 0 {
                            codes[i / 2] >> 4
                        } else {
                            codes[i / 2] & 15
                        };
                        NF4[c as usize] * scales[i / bs]
                    })
                    .collect();
                for isa in Isa::supported() {
                    let mut f = vec![0f32; n];
                    unpack_with_isa(isa, &codes, &scales, &cb, bs, &mut f).unwrap();
                    assert_eq!(f, expect, "{isa:?} n={n} bs={bs}");
                    let mut b = vec![Bf16::default(); n];
                    unpack_with_isa(isa, &codes, &scales, &cb, bs, &mut b).unwrap();
                    for (i, v) in b.iter().enumerate() {
                        assert_eq!(v.0, f32_to_bf16(expect[i]), "{isa:?} bf16 i={i}");
                        assert!((bf16_to_f32(v.0) - expect[i]).abs() <= expect[i].abs() / 128.0);
                    }
                    let mut h = vec![F16::default(); n];
                    unpack_with_isa(isa, &codes, &scales, &cb, bs, &mut h).unwrap();
                    for (i, v) in h.iter().enumerate() {
                        assert_eq!(v.0, f32_to_f16(expect[i]), "{isa:?} f16 i={i}");
                        assert!(
                            (f16_to_f32(v.0) - expect[i]).abs() <= 1e-3 * expect[i].abs() + 6e-8
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn rejects_wrong_lengths_and_bad_scales() {
        let cb = Codebook::new(&NF4).unwrap();
        let mut out = vec![0f32; 64];
        assert!(unpack(&[0u8; 31], &[1.0], &cb, 64, &mut out).is_err());
        assert!(unpack(&[0u8; 32], &[1.0, 2.0], &cb, 64, &mut out).is_err());
        assert!(unpack(&[0u8; 32], &[f32::NAN], &cb, 64, &mut out).is_err());
        assert!(unpack(&[0u8; 32], &[1.0], &cb, 48, &mut out).is_err());
    }
}

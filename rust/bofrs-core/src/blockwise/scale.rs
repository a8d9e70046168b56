//! Per-block scales: absmax or signed absmax, and their rounding to the storage type.

use crate::blockwise::codebook::Normalization;
use crate::error::{Error, Result};
use crate::names::named_enum;
use crate::numeric::element::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16, Element};

/// The type block scales are stored in. Scales are rounded to it *before* encoding, so the codes
/// are chosen against the scale the decoder will actually use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScaleDType {
    Float32,
    BFloat16,
    Float16,
}

named_enum!(ScaleDType, "scale_dtype", { BFloat16 => "bfloat16", Float16 => "float16", Float32 => "float32" });

impl ScaleDType {
    /// Storage bits per scale.
    pub fn bits(self) -> usize {
        match self {
            Self::Float32 => 32,
            Self::BFloat16 | Self::Float16 => 16,
        }
    }

    /// Rounds a finite scale to this type (nearest, ties to even), returned as f32.
    #[inline(always)]
    pub fn round(self, s: f32) -> f32 {
        match self {
            Self::Float32 => s,
            Self::BFloat16 => bf16_to_f32(f32_to_bf16(s)),
            Self::Float16 => f16_to_f32(f32_to_f16(s)),
        }
    }

    /// The neighbour of a nonzero value of this type one step toward zero.
    #[inline(always)]
    fn toward_zero(self, s: f32) -> f32 {
        match self {
            Self::Float32 => f32::from_bits(s.to_bits() - 1),
            Self::BFloat16 => bf16_to_f32(f32_to_bf16(s) - 1),
            Self::Float16 => f16_to_f32(f32_to_f16(s) - 1),
        }
    }

    /// The stored scale of a block whose raw scale is `raw`, for input values bounded by
    /// `input_max`: `raw` rounded to nearest (ties to even), then, if that exceeds `input_max`
    /// (an f16 tensor with bf16 scales: 65504 rounds to 65536), one step toward zero, so decoding
    /// in the input's own type never overflows. `None` when `raw` rounds to infinity.
    #[inline(always)]
    pub fn store(self, raw: f32, input_max: f32) -> Option<f32> {
        let stored = self.round(raw);
        if !stored.is_finite() {
            return None;
        }
        Some(if stored.abs() > input_max {
            self.toward_zero(stored)
        } else {
            stored
        })
    }
}

/// The largest `abs_bits` of a block (portable; the encoder has vector versions).
#[inline(always)]
pub fn max_abs_bits<E: Element>(block: &[E]) -> u32 {
    block.iter().fold(0u32, |m, v| m.max(v.abs_bits()))
}

/// The raw scale of one block given its [`max_abs_bits`], or the in-block index of its first
/// non-finite value.
///
/// Absmax: the largest magnitude. Signed absmax: the signed value of the *first* element
/// reaching the largest magnitude.
#[inline(always)]
pub fn raw_block_scale_from_max<E: Element>(
    block: &[E],
    max_bits: u32,
    normalization: Normalization,
) -> std::result::Result<f32, usize> {
    if max_bits >= E::NON_FINITE_ABS_BITS {
        let bad = block
            .iter()
            .position(|v| v.abs_bits() >= E::NON_FINITE_ABS_BITS);
        return Err(bad.unwrap_or(0));
    }
    Ok(match normalization {
        Normalization::Absmax => E::abs_bits_to_f32(max_bits),
        Normalization::SignedAbsmax => {
            let at = block
                .iter()
                .position(|v| v.abs_bits() == max_bits)
                .unwrap_or(0);
            block.get(at).map_or(0.0, |v| v.to_f32())
        }
    })
}

/// [`raw_block_scale_from_max`] with the portable maximum.
#[inline(always)]
pub fn raw_block_scale<E: Element>(
    block: &[E],
    normalization: Normalization,
) -> std::result::Result<f32, usize> {
    raw_block_scale_from_max(block, max_abs_bits(block), normalization)
}

/// The stored scale of a block given its [`max_abs_bits`]; errors carry absolute positions
/// (`first_index` is the flat index of the block's first value, `block_index` its number).
#[inline(always)]
pub fn stored_block_scale_from_max<E: Element>(
    block: &[E],
    max_bits: u32,
    normalization: Normalization,
    dtype: ScaleDType,
    first_index: usize,
    block_index: usize,
) -> Result<f32> {
    let raw =
        raw_block_scale_from_max(block, max_bits, normalization).map_err(|i| Error::NonFinite {
            index: first_index + i,
        })?;
    dtype.store(raw, E::MAX_FINITE).ok_or(Error::ScaleOverflow {
        block: block_index,
        value: raw,
        dtype: dtype.name(),
    })
}

/// [`stored_block_scale_from_max`] with the portable maximum.
#[inline(always)]
pub fn stored_block_scale<E: Element>(
    block: &[E],
    normalization: Normalization,
    dtype: ScaleDType,
    first_index: usize,
    block_index: usize,
) -> Result<f32> {
    stored_block_scale_from_max(
        block,
        max_abs_bits(block),
        normalization,
        dtype,
        first_index,
        block_index,
    )
}

/// The 16-bit storage bits of scales already rounded to `dtype` (exact for such scales), in
/// parallel on the pool: lets callers hold bfloat16 / float16 scales without converting them
/// again. `None` for float32 (not a 16-bit type).
///
/// # Panics
/// When `out` is not as long as `scales`.
pub fn storage_bits(scales: &[f32], dtype: ScaleDType, out: &mut [u16]) -> Option<()> {
    use rayon::prelude::*;
    let convert: fn(f32) -> u16 = match dtype {
        ScaleDType::BFloat16 => f32_to_bf16,
        ScaleDType::Float16 => f32_to_f16,
        ScaleDType::Float32 => return None,
    };
    assert_eq!(scales.len(), out.len(), "one slot per scale");
    const CHUNK: usize = 1 << 16;
    let chunk =
        |(o, s): (&mut [u16], &[f32])| o.iter_mut().zip(s).for_each(|(o, &s)| *o = convert(s));
    if scales.len() <= CHUNK {
        // Not worth a trip through the pool.
        chunk((out, scales));
    } else {
        crate::runtime::pool::pool().install(|| {
            out.par_chunks_mut(CHUNK)
                .zip(scales.par_chunks(CHUNK))
                .for_each(chunk)
        });
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numeric::element::Bf16;

    #[test]
    fn storage_bits_are_the_rounded_scales_bits() {
        let raw: Vec<f32> = (0..200_001).map(|i| (i as f32 - 1e5) * 0.37).collect();
        for dtype in [ScaleDType::BFloat16, ScaleDType::Float16] {
            let stored: Vec<f32> = raw
                .iter()
                .map(|&r| dtype.store(r, f32::MAX).unwrap())
                .collect();
            let mut bits = vec![0u16; stored.len()];
            storage_bits(&stored, dtype, &mut bits).unwrap();
            for (&b, &s) in bits.iter().zip(&stored) {
                let back = if dtype == ScaleDType::BFloat16 {
                    bf16_to_f32(b)
                } else {
                    f16_to_f32(b)
                };
                assert_eq!(back.to_bits(), s.to_bits());
            }
        }
        assert!(storage_bits(&[1.0], ScaleDType::Float32, &mut [0]).is_none());
    }

    #[test]
    fn absmax_and_signed() {
        let b = [0.5f32, -2.0, 1.0, 2.0];
        assert_eq!(raw_block_scale(&b, Normalization::Absmax), Ok(2.0));
        // First element reaching the max magnitude wins: -2.0 comes before 2.0.
        assert_eq!(raw_block_scale(&b, Normalization::SignedAbsmax), Ok(-2.0));
        assert_eq!(
            raw_block_scale(&[0.0f32; 4], Normalization::SignedAbsmax),
            Ok(0.0)
        );
    }

    #[test]
    fn non_finite_reports_first_bad_index() {
        let b = [0.5f32, 1.0, f32::INFINITY, f32::NAN];
        assert_eq!(raw_block_scale(&b, Normalization::Absmax), Err(2));
        let h = [Bf16(0x3f80), Bf16(0x7fc0)];
        assert_eq!(raw_block_scale(&h, Normalization::Absmax), Err(1));
        let e = stored_block_scale(&b, Normalization::Absmax, ScaleDType::Float32, 64, 1);
        assert_eq!(e, Err(Error::NonFinite { index: 66 }));
    }

    #[test]
    fn float16_scale_overflow_is_an_error() {
        let b = [70000.0f32];
        assert!(stored_block_scale(&b, Normalization::Absmax, ScaleDType::Float16, 0, 0).is_err());
        assert_eq!(ScaleDType::BFloat16.store(70000.0, f32::MAX), Some(70144.0));
        // f16 input, bf16 scale: 65504 would round up to 65536 (inf in f16); one step down.
        assert_eq!(ScaleDType::BFloat16.store(65504.0, 65504.0), Some(65280.0));
        assert_eq!(
            ScaleDType::BFloat16.store(-65504.0, 65504.0),
            Some(-65280.0)
        );
        assert_eq!(ScaleDType::Float16.store(65504.0, 65504.0), Some(65504.0));
        assert_eq!(ScaleDType::Float16.store(65519.0, f32::MAX), Some(65504.0));
        assert_eq!(ScaleDType::Float16.store(65520.0, f32::MAX), None);
        assert_eq!(ScaleDType::BFloat16.store(f32::MAX, f32::MAX), None);
    }
}

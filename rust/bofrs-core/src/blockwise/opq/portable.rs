//! The portable kernels of the OPQ rule (see [`super`] for its exact evaluation order): the
//! definition of the results, which the AVX2 twins in `x86` reproduce bit for bit.

use super::pass::ExactKernels;
use super::{OpqOptions, Outlier, OutlierDType};
use crate::blockwise::codebook::Normalization;
use crate::blockwise::encode::portable::Portable;
use crate::error::{Error, Result};
use crate::numeric::element::{Element, Kind};

impl ExactKernels for Portable<'_> {
    #[inline(always)]
    fn sums<T: Element>(&self, block: &[T]) -> (f64, f64) {
        block_sums(block)
    }
    #[inline(always)]
    fn scan<T: Element>(&self, block: &[T], limit2: f64, _t32: f32, mask: &mut [u64; MASK_WORDS]) {
        scan(block, limit2, mask)
    }
    #[inline(always)]
    fn raw_scale<T: Element>(
        &self,
        block: &[T],
        limit2: f64,
        _t32: f32,
        norm: Normalization,
    ) -> f32 {
        raw_scale_within(block, limit2, norm)
    }
    #[inline(always)]
    fn signed_masked<T: Element>(&self, block: &[T], mask: &[u64; MASK_WORDS], max: f32) -> f32 {
        signed_scale_masked(block, mask, max)
    }
}

/// Accumulator lanes of [`block_sums`].
pub const LANES: usize = 16;

/// The shifted sums `(S, SS)` of a block (see the module doc for the exact order). The
/// portable definition; vector kernels reproduce it bit for bit.
#[inline(always)]
pub fn block_sums<E: Element>(block: &[E]) -> (f64, f64) {
    let Some(first) = block.first() else {
        return (0.0, 0.0);
    };
    let shift = first.to_f32() as f64;
    let mut s = [0f64; LANES];
    let mut ss = [0f64; LANES];
    let mut chunks = block.chunks_exact(LANES);
    for c in &mut chunks {
        for j in 0..LANES {
            let d = c[j].to_f32() as f64 - shift;
            s[j] += d;
            ss[j] += d * d;
        }
    }
    sums_from_lanes(chunks.remainder(), shift, s, ss)
}

/// Adds the last `len % 16` values of a block (`rest`, into lanes 0..) to the lane sums and
/// combines the lanes: `m_j = l_j + l_(j+8)`, then `((m0+m4)+(m2+m6)) + ((m1+m5)+(m3+m7))`.
#[inline(always)]
pub fn sums_from_lanes<E: Element>(
    rest: &[E],
    shift: f64,
    mut s: [f64; LANES],
    mut ss: [f64; LANES],
) -> (f64, f64) {
    for (j, v) in rest.iter().enumerate() {
        let d = v.to_f32() as f64 - shift;
        s[j] += d;
        ss[j] += d * d;
    }
    let combine = |l: [f64; LANES]| {
        let m: [f64; 8] = std::array::from_fn(|j| l[j] + l[j + 8]);
        ((m[0] + m[4]) + (m[2] + m[6])) + ((m[1] + m[5]) + (m[3] + m[7]))
    };
    (combine(s), combine(ss))
}

/// Words of a block's outlier bit mask (bit `i % 64` of word `i / 64` marks value `i`).
pub const MASK_WORDS: usize = crate::blockwise::layout::MAX_BLOCK_SIZE / 64;

/// Marks the values of a block with `w * w > limit2` (f64): the portable definition of the scan.
#[inline(always)]
pub fn scan<E: Element>(block: &[E], limit2: f64, mask: &mut [u64; MASK_WORDS]) {
    mask[..block.len().div_ceil(64)].fill(0);
    for (i, v) in block.iter().enumerate() {
        let x = v.to_f32() as f64;
        mask[i / 64] |= ((x * x > limit2) as u64) << (i % 64);
    }
}

/// Appends the values a [`scan`] marked as outliers (flat indices from `first_index`, values
/// stored per [`OutlierDType::store`]) and returns how many there were.
#[inline(always)]
pub fn collect<E: Element>(
    block: &[E],
    mask: &[u64; MASK_WORDS],
    opq: &OpqOptions,
    first_index: usize,
    input_max: f32,
    out: &mut Vec<Outlier>,
) -> Result<usize> {
    let before = out.len();
    for (w, &word) in mask[..block.len().div_ceil(64)].iter().enumerate() {
        collect_word(
            &block[w * 64..],
            word,
            opq,
            first_index + w * 64,
            input_max,
            out,
        )?;
    }
    Ok(out.len() - before)
}

/// [`collect`] for one mask word: bit `i` marks `values[i]` (flat index `first_index + i`);
/// only bits below `values.len()` may be set, and `values` is not empty.
///
/// For bfloat16 values stored as bfloat16 (the bits themselves), the first two marks are taken
/// without a data-dependent branch (a block rarely has more); the rest, and other types, one
/// by one.
#[inline(always)]
pub fn collect_word<E: Element>(
    values: &[E],
    word: u64,
    opq: &OpqOptions,
    first_index: usize,
    input_max: f32,
    out: &mut Vec<Outlier>,
) -> Result<()> {
    const UNROLL: usize = 2;
    // bfloat16 values stored as bfloat16: the bits themselves (what `store` returns for them).
    let same_bits = matches!(E::KIND, Kind::BFloat16) && opq.dtype == OutlierDType::BFloat16;
    let mut bits = word;
    if same_bits {
        // No conversion, no error: the first two without a data-dependent branch.
        out.reserve(UNROLL);
        let len = out.len();
        let spare = &mut out.spare_capacity_mut()[..UNROLL];
        let mut taken = 0;
        for _ in 0..UNROLL {
            // With no bit left this reads `values[0]` and takes nothing.
            let i = bits.trailing_zeros() as usize & 63;
            let value = (values[i].to_f32().to_bits() >> 16) as u16;
            spare[taken].write(Outlier::new((first_index + i) as u64, value));
            taken += (bits != 0) as usize;
            bits &= bits.wrapping_sub(1);
        }
        // SAFETY: the first `taken` spare slots were written above (slot `taken` is written at
        // every step, and `taken` only grows past a written slot).
        unsafe { out.set_len(len + taken) };
    }
    while bits != 0 {
        let i = bits.trailing_zeros() as usize;
        bits &= bits - 1;
        let x = values[i].to_f32();
        let stored = opq.dtype.store(x, input_max).ok_or_else(|| {
            Error::invalid(
                "outlier_dtype",
                format!(
                    "outlier {x:e} at flat index {} is beyond the float16 range; \
                 use outlier_dtype='bfloat16'",
                    first_index + i
                ),
            )
        })?;
        out.push(Outlier::new((first_index + i) as u64, stored));
    }
    Ok(())
}

/// The raw scale of a block with its outliers (the values with `w * w > limit2`, as in
/// [`scan`]) counted as 0: the largest kept magnitude (absmax), or the first kept value reaching
/// it (signed absmax); 0 if every value is an outlier. Portable definition.
#[inline(always)]
pub fn raw_scale_within<E: Element>(block: &[E], limit2: f64, normalization: Normalization) -> f32 {
    let max = block
        .iter()
        .map(|v| {
            let x = v.to_f32() as f64;
            if x * x > limit2 {
                0
            } else {
                v.abs_bits()
            }
        })
        .fold(0u32, u32::max);
    let max = E::abs_bits_to_f32(max);
    match normalization {
        Normalization::Absmax => max,
        Normalization::SignedAbsmax => signed_scale_within(block, limit2, max),
    }
}

/// The signed-absmax raw scale given the largest kept magnitude `max`: the first kept value of
/// that magnitude; when every kept value is zero, the first value if it is kept (a +-0), else +0
/// (as if the outliers had been replaced by +0 first).
#[inline(always)]
pub fn signed_scale_within<E: Element>(block: &[E], limit2: f64, max: f32) -> f32 {
    let kept = |x: f32| (x as f64) * (x as f64) <= limit2;
    if max == 0.0 {
        return match block.first() {
            Some(v) if kept(v.to_f32()) => v.to_f32(),
            _ => 0.0,
        };
    }
    block
        .iter()
        .map(|v| v.to_f32())
        .find(|&x| x.abs() == max && kept(x))
        .unwrap_or(0.0)
}

/// [`signed_scale_within`] with the outliers given by their mask (as [`scan`] marks them)
/// instead of the limit: the same result when the mask is the scan's.
#[inline(always)]
pub fn signed_scale_masked<E: Element>(block: &[E], mask: &[u64; MASK_WORDS], max: f32) -> f32 {
    let kept = |i: usize| mask[i / 64] >> (i % 64) & 1 == 0;
    if max == 0.0 {
        return match block.first() {
            Some(v) if kept(0) => v.to_f32(),
            _ => 0.0,
        };
    }
    block
        .iter()
        .enumerate()
        .find(|&(i, v)| v.to_f32().abs() == max && kept(i))
        .map_or(0.0, |(_, v)| v.to_f32())
}

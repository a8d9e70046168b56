//! The encoder's portable kernels: the definition of the results.

use super::{BlockKernels, STEP};
use crate::blockwise::codebook::{Codebook, Normalization};
use crate::blockwise::scale::{max_abs_bits, raw_block_scale_from_max};
use crate::numeric::element::Element;

/// The portable kernels (the encoder's here, the OPQ rule's in
/// [`crate::blockwise::opq::portable`]).
pub(crate) struct Portable<'a> {
    pub(crate) codebook: &'a Codebook,
}

impl BlockKernels for Portable<'_> {
    #[inline(always)]
    fn max_abs_bits<T: Element>(&self, block: &[T]) -> u32 {
        max_abs_bits(block)
    }
    #[inline(always)]
    fn raw_scale_from_max<T: Element>(&self, block: &[T], max: u32, norm: Normalization) -> f32 {
        // Cannot fail for a finite maximum.
        raw_block_scale_from_max(block, max, norm).unwrap_or(0.0)
    }
    #[inline(always)]
    fn encode<T: Element>(&self, block: &[T], scale: f32, out: &mut [u8]) {
        encode_block(block, scale, self.codebook, out)
    }
}

/// Fills the codes of a block whose stored scale is 0: every value encodes as 0.
#[inline(always)]
pub(crate) fn encode_zero_block(len: usize, codebook: &Codebook, out: &mut [u8]) {
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
pub(crate) fn encode_tail<E: Element>(
    values: &[E],
    scale: f32,
    codebook: &Codebook,
    out: &mut [u8],
) {
    for (byte, pair) in out.iter_mut().zip(values.chunks(2)) {
        let hi = codebook.encode_one(pair[0].to_f32() / scale);
        let lo = pair
            .get(1)
            .map_or(0, |v| codebook.encode_one(v.to_f32() / scale));
        *byte = (hi << 4) | lo;
    }
}

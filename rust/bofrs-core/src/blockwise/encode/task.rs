//! One encoder task (a run of whole blocks, or whole dq8 groups), generic over the kernel set:
//! the same driver runs the portable kernels and, inlined into a function compiled for AVX2,
//! the AVX2 ones.

use super::{TaskContext, TaskOut};
use crate::blockwise::dq::{quantize_group, GROUP};
use crate::blockwise::opq::pass::{task_outliers, ExactKernels};
use crate::blockwise::opq::Outlier;
use crate::error::{Error, Result};
use crate::numeric::element::Element;

/// One task: the raw scale of every block (after removing its outliers, see
/// [`crate::blockwise::opq::pass`]), the scales' storage rounding or double quantization, then
/// the codes against the decoded scales.
///
/// In passes, so that the common case runs without unpredictable branches: every block's
/// maximum, raw scale and (with OPQ) the cheap outlier filter; then only the blocks the filter
/// could not clear (their outlier masks, raw scale without them; bfloat16 outliers of a
/// bfloat16 tensor, which cannot fail, are taken right there); then the other outliers' stored
/// values; then the scales' storage; then every block's codes; then the outliers' codes set to
/// the code of 0. Errors are those of the first bad block in flat order (within a block:
/// non-finite value, outlier, scale).
#[inline(always)]
pub(super) fn run_task<E: Element, K: ExactKernels>(
    kernel: &K,
    input: &[E],
    context: &TaskContext<'_>,
    out: TaskOut<'_>,
    first_block: usize,
) -> Result<Vec<Outlier>> {
    let options = context.options;
    let bs = options.block_size;
    let norm = options.normalization;
    let blocks = out.scales.len();
    // Blocks before the first one with a non-finite value, the outliers (OPQ only), and the
    // first block whose outliers cannot be stored, with the error.
    let (finite_blocks, outliers, outlier_error) = match &context.opq {
        None => {
            let mut finite_blocks = blocks;
            for (b, (block, scale)) in input.chunks(bs).zip(out.scales.iter_mut()).enumerate() {
                let max_bits = kernel.max_abs_bits(block);
                if max_bits >= E::NON_FINITE_ABS_BITS {
                    finite_blocks = b;
                    break;
                }
                // Cannot fail for a finite maximum.
                *scale = kernel.raw_scale_from_max(block, max_bits, norm);
            }
            (finite_blocks, Vec::new(), None)
        }
        Some(opq) => {
            let found = task_outliers(kernel, input, opq, (bs, norm), out.scales, first_block);
            (found.finite_blocks, found.outliers, found.error)
        }
    };
    let stored_blocks = outlier_error.as_ref().map_or(finite_blocks, |e| e.0);
    if !context.double_quant {
        for (b, scale) in out.scales[..stored_blocks].iter_mut().enumerate() {
            let raw = *scale;
            *scale = options
                .scale_dtype
                .store(raw, E::MAX_FINITE)
                .ok_or(Error::ScaleOverflow {
                    block: first_block + b,
                    value: raw,
                    dtype: options.scale_dtype.name(),
                })?;
        }
    }
    if let Some((_, err)) = outlier_error {
        return Err(err);
    }
    if finite_blocks < blocks {
        let block = input.chunks(bs).nth(finite_blocks).unwrap_or_default();
        let bad = block
            .iter()
            .position(|v| v.abs_bits() >= E::NON_FINITE_ABS_BITS);
        return Err(Error::NonFinite {
            index: (first_block + finite_blocks) * bs + bad.unwrap_or(0),
        });
    }
    if context.double_quant {
        for ((scales, codes), params) in out
            .scales
            .chunks_mut(GROUP)
            .zip(out.scale_codes.chunks_mut(GROUP))
            .zip(out.scale_params.chunks_mut(2))
        {
            params.copy_from_slice(&quantize_group(
                scales,
                context.signed,
                E::MAX_FINITE,
                codes,
            ));
        }
    }
    for ((block, codes), &scale) in input
        .chunks(bs)
        .zip(out.codes.chunks_mut(bs / 2))
        .zip(out.scales.iter())
    {
        kernel.encode(block, scale, codes);
    }
    // Outliers are coded as the value 0 (codes depend only on the value and the scale).
    let zero = options.codebook.encode_one(0.0);
    code_outliers_as(zero, &outliers, (first_block * bs) as u64, out.codes);
    Ok(outliers)
}

/// Sets the code of every outlier (flat indices from `task_start`, within `codes`) to `zero`.
/// Not inlined: a short loop of its own, outside the task's register pressure.
#[inline(never)]
fn code_outliers_as(zero: u8, outliers: &[Outlier], task_start: u64, codes: &mut [u8]) {
    // High nibble for even `i`, low for odd, without a data-dependent branch: the nibble kept
    // and the one put in, by parity.
    let keep = [0x0f_u8, 0xf0];
    let put = [zero << 4, zero & 0x0f];
    for outlier in outliers {
        let i = (outlier.index() - task_start) as usize;
        let byte = &mut codes[i / 2];
        *byte = (*byte & keep[i & 1]) | put[i & 1];
    }
}

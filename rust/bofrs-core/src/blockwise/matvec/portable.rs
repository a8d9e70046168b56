//! The portable row kernels: the definition of the results (activations in natural order).

use super::quant::{QInt, Quantized};
use super::WeightRow;

/// Float dot products of one weight row with `y.len()` activation rows of `x` (f32).
pub(super) fn float_rows(w: &WeightRow<'_>, levels: &[f32; 16], x: &[f32], y: &mut [f32]) {
    let n_in = w.codes.len() * 2;
    for (b, yb) in y.iter_mut().enumerate() {
        let xb = &x[b * n_in..(b + 1) * n_in];
        let mut total = 0f32;
        for ((c, xv), &s) in w
            .codes
            .chunks_exact(w.block_size / 2)
            .zip(xb.chunks_exact(w.block_size))
            .zip(w.scales)
        {
            let mut acc = 0f32;
            for (&byte, pair) in c.iter().zip(xv.chunks_exact(2)) {
                acc += levels[(byte >> 4) as usize] * pair[0];
                acc += levels[(byte & 15) as usize] * pair[1];
            }
            total += acc * s;
        }
        *yb = total;
    }
}

/// Integer dot products of one weight row with `y.len()` activation rows of `xq` from row
/// `first_row`, against the integer levels `levels` in units of `dl`.
#[allow(clippy::needless_range_loop)]
pub(super) fn int_rows<Q: QInt>(
    w: &WeightRow<'_>,
    (levels, dl): (&[Q; 16], f32),
    xq: &Quantized<Q>,
    first_row: usize,
    y: &mut [f32],
) {
    let n_in = w.codes.len() * 2;
    let group = Q::GROUP;
    for (k, yb) in y.iter_mut().enumerate() {
        let b = first_row + k;
        let q = &xq.q[b * xq.padded..b * xq.padded + n_in];
        let d = &xq.d[b * xq.groups..(b + 1) * xq.groups];
        let mut total = 0f32;
        for (blk, &s) in w.scales.iter().enumerate() {
            let start = blk * w.block_size;
            let mut acc = 0f32;
            // The (block, group) pieces of this block, in order.
            let mut i = start;
            while i < start + w.block_size {
                let g = i / group;
                let end = (start + w.block_size).min((g + 1) * group);
                let mut part = 0i64;
                for j in i..end {
                    let byte = w.codes[j / 2];
                    let c = if j % 2 == 0 { byte >> 4 } else { byte & 15 };
                    part += levels[c as usize].into() * q[j].into();
                }
                acc += part as f32 * d[g];
                i = end;
            }
            total += acc * s;
        }
        *yb = total * dl;
    }
}

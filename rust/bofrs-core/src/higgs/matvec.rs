//! Fused HIGGS products: `y = W_rot x_rot` for rotated activations, decoding one group of the
//! packed weight at a time into a small buffer (scale applied) and taking its dot product with
//! every token's slice; the dense weight never exists. Rows are spread over the pool.

use super::quantize::{decode_row, HiggsLayout};
use super::search::GridSearch;
use crate::error::{check_finite_scales, check_lengths, Result};
use crate::runtime::pool::pool;
use rayon::prelude::*;

/// `out[t, r] = sum_c w_rot[r, c] * x_rot[t, c]` for `tokens` rows of rotated activations
/// (`tokens x padded_cols`, zero padding included); `out` is `tokens x rows`.
pub fn higgs_matvec(
    x_rot: &[f32],
    tokens: usize,
    codes: &[u8],
    scales: &[f32],
    layout: &HiggsLayout,
    grid: &GridSearch,
    out: &mut [f32],
) -> Result<()> {
    let width = layout.padded_cols();
    check_lengths(&[
        ("x", tokens * width, x_rot.len()),
        ("codes", layout.code_bytes(), codes.len()),
        ("scales", layout.num_groups(), scales.len()),
        ("out", tokens * layout.rows, out.len()),
    ])?;
    check_finite_scales(scales, "group")?;
    if layout.rows == 0 || tokens == 0 {
        return Ok(());
    }
    let g = layout.group_size;
    // Row-major results per output row, transposed into `out` afterwards.
    let mut by_row = vec![0f32; layout.rows * tokens];
    pool().install(|| {
        by_row.par_chunks_mut(tokens).enumerate().for_each_init(
            || vec![0f32; g],
            |w, (row, acc)| {
                decode_row(codes, scales, (layout, grid), row, w, |group, w| {
                    for (t, a) in acc.iter_mut().enumerate() {
                        let xs = &x_rot[t * width + group * g..t * width + (group + 1) * g];
                        *a += dot(w, xs);
                    }
                })
            },
        )
    });
    for (row, acc) in by_row.chunks_exact(tokens).enumerate() {
        for (t, &v) in acc.iter().enumerate() {
            out[t * layout.rows + row] = v;
        }
    }
    Ok(())
}

/// Dot product with eight interleaved accumulators (vectorizes without reassociation flags).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let tail: f32 = a[a.len() / 8 * 8..]
        .iter()
        .zip(&b[b.len() / 8 * 8..])
        .map(|(x, y)| x * y)
        .sum();
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7])) + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::higgs::grid::{plane_grid, scalar_grid};
    use crate::higgs::quantize::higgs_unpack;
    use crate::testing::{higgs_packed, HiggsPacked};

    #[test]
    fn equals_the_decoded_product() {
        let (rows, cols, tokens) = (37, 200, 3);
        let data: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 300.0)
            .collect();
        // 4-bit codes (two a byte) and 5-bit scalar codes (straddling bytes).
        for grid in [plane_grid(16, 0).unwrap(), scalar_grid(32).unwrap()] {
            check_against_decoded(rows, cols, tokens, &data, &grid);
        }
    }

    fn check_against_decoded(
        rows: usize,
        cols: usize,
        tokens: usize,
        data: &[f32],
        grid: &crate::higgs::Grid,
    ) {
        let HiggsPacked {
            search,
            layout,
            codes,
            scales,
        } = higgs_packed(data, (rows, cols), 64, grid);
        let width = layout.padded_cols();
        let mut w_rot = vec![0f32; rows * width];
        higgs_unpack(&codes, &scales, &layout, &search, true, &mut w_rot).unwrap();
        let x: Vec<f32> = (0..tokens * width)
            .map(|i| ((i * 31 % 97) as f32 - 48.0) / 50.0)
            .collect();
        let mut out = vec![0f32; tokens * rows];
        higgs_matvec(&x, tokens, &codes, &scales, &layout, &search, &mut out).unwrap();
        for t in 0..tokens {
            for r in 0..rows {
                let want: f64 = (0..width)
                    .map(|c| w_rot[r * width + c] as f64 * x[t * width + c] as f64)
                    .sum();
                assert!((out[t * rows + r] as f64 - want).abs() < 1e-4 * (1.0 + want.abs()));
            }
        }
        assert!(
            higgs_matvec(&x[1..], tokens, &codes, &scales, &layout, &search, &mut out).is_err()
        );
    }
}
